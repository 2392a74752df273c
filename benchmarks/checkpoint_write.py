"""Training checkpoints of a fine-tune that freezes the routed experts: frozen shards hard-linked from the previous
checkpoint (what ``save_state`` does) against every tensor written at every checkpoint (as before), time per
checkpoint and disk used by ``--checkpoints`` of them.

The model has the A3B's LM width and expert shapes (hidden 2048, 64 experts of 1408) with ``--layers`` layers (the
first dense), a 32,000-entry vocabulary and a one-block vision tower; its weights are bf16 values in float32, as after
loading a bf16 checkpoint, so the stage holds the frozen matrices in bf16.

    python benchmarks/checkpoint_write.py [--layers 2] [--checkpoints 3] [--dir DIR]

The checkpoints (GiBs) go to a temporary folder in ``--dir`` (default: the system's temporary directory), removed
at the end.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import parser

from kimivl import KimiVL, KimiVLConfig
from kimivl.checkpoint import save_checkpoint
from kimivl.exits import run_command
from kimivl.files import unwritable
from kimivl.model.moe import to_dtype
from kimivl.train.state import save_state
from kimivl.train.trainable import hold_frozen_in_bf16, set_trainable


def disk_bytes(root: Path) -> int:
    """Bytes of the distinct files under ``root`` (a hard-linked file counts once)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        st = path.stat()
        if path.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


def bench_config(layers: int) -> KimiVLConfig:
    """The A3B's LM width and expert shapes with ``layers`` layers, a 32,000-entry vocabulary (its special ids, the
    image placeholder's among them, inside it) and a one-block vision tower."""
    config = KimiVLConfig.from_preset("kimi-vl-a3b")
    text = dataclasses.replace(
        config.text_config, num_hidden_layers=layers, vocab_size=32000, bos_token_id=1, eos_token_id=2
    )
    vision = dataclasses.replace(config.vision_config, num_hidden_layers=1)
    return dataclasses.replace(config, text_config=text, vision_config=vision, media_placeholder_token_id=31999)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--dir", type=Path, help="where the checkpoints are written (default: the system's temp dir)")
    args = ap.parse_args()
    if args.layers < 2 or args.checkpoints < 2:
        ap.error("--layers must be >= 2 (the first layer is dense; the experts frozen are the others') and "
                 "--checkpoints >= 2 (the first checkpoint links nothing; later ones are compared)")  # fmt: skip
    if args.dir is not None and not args.dir.is_dir():
        ap.error(f"--dir {args.dir}: not a directory")
    if args.dir is not None and (why := unwritable(args.dir / "checkpoint_write")):
        ap.error(f"--dir {args.dir}: {why}; choose another --dir")

    torch.manual_seed(0)
    model = to_dtype(KimiVL(bench_config(args.layers)), torch.bfloat16).float()
    set_trainable(model, ["multi_modal_projector", "language_model"], ["*.mlp.experts.*"])
    held = hold_frozen_in_bf16(model)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {frozen / 1e6:.0f}M frozen "
        f"({sum(p.numel() for p in held) / 1e6:.0f}M held in bf16)"
    )

    times = {"linked": [], "full": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        linked, full = Path(work) / "linked", Path(work) / "full"
        for step in range(1, args.checkpoints + 1):
            with torch.no_grad():  # a training step moves the trained weights
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(1e-3)
            start = time.perf_counter()
            save_state(linked, model, {"step": step}, keep=args.checkpoints)
            os.sync()  # both arms' times include writing to disk
            times["linked"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.config.save_pretrained(full / f"step-{step}")
            save_checkpoint(model, full / f"step-{step}")
            os.sync()
            times["full"].append(time.perf_counter() - start)
        sizes = {"linked": disk_bytes(linked), "full": disk_bytes(full)}
    for arm in ("linked", "full"):
        later = times[arm][1:]
        print(
            f"{arm:>6}: first checkpoint {times[arm][0]:.1f} s, later ones {sum(later) / len(later):.1f} s each; "
            f"{args.checkpoints} checkpoints take {sizes[arm] / 2**30:.2f} GiB on disk"
        )
    later = {arm: sum(t[1:]) / (len(t) - 1) for arm, t in times.items()}
    print(
        f"later checkpoints {later['full'] / later['linked']:.1f}x faster, "
        f"{sizes['full'] / sizes['linked']:.1f}x less disk"
    )


if __name__ == "__main__":
    sys.exit(run_command("checkpoint_write.py", main))
