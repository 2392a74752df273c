"""The checks that need a GPU, which CI does not have: ``bash .ci/device-check`` (the repo on PYTHONPATH, nothing
installed: the device machines have torch and no network). ``--device cpu`` runs the same code here.

1. kimivl-tiny on the bundled held-out questions: greedy answers on the device against the CPU's (bf16 kernels differ,
   so a few answers may), and its accuracy.
2. One packed training step of kimivl-tiny (bf16 autocast): loss and gradient norm on the device against the CPU's.
3. A recipe with a vit, a joint (experts frozen) and an rl stage trains on the device, resumes, and exports; a
   fine-tune of kimivl-tiny (bf16 checkpoint: frozen experts held in bf16) with accumulation, a held-out loss and
   sampling without replacement runs too.
4. With flash-attn installed, packed attention through it against the exact SDPA path.
5. Sharded training (FSDP2 over nccl, one rank under torchrun): the losses of a one-process run on the device.
6. Long context on the device's SDPA paths (``kernels.dispatch.sdpa_prefill`` / ``sdpa_decode``): a left-padded batch
   of 3,000-token prompts prefilled in chunks of 512 into the block cache, then decoding steps, logits against the
   CPU's key-block prefill and split-K decoding in float32.
7. benchmarks/train_throughput.py on the device (packed against padded useful tokens/s; share of the matmul peak).
Prints one line per check and exits non-zero when one fails.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "kimivl-tiny"


def answers(device: str) -> tuple[list[str], float]:
    from kimivl import KimiVL, KimiVLProcessor
    from kimivl.eval.synthetic import evaluate, heldout_records

    model = KimiVL.from_pretrained(MODEL, dtype=torch.bfloat16, device=device)
    accuracy, rows = evaluate(
        model,
        KimiVLProcessor.from_pretrained(MODEL),
        heldout_records(REPO / "examples/heldout"),
        max_new_tokens=160,
        progress=False,
    )
    return [r["prediction"] for r in rows], accuracy["all"]


def train_step(device: str) -> tuple[float, float]:
    from kimivl import KimiVL, KimiVLProcessor
    from kimivl.data.formats import iter_records
    from kimivl.data.packing import pack
    from kimivl.train.loop import to_device

    processor = KimiVLProcessor.from_pretrained(MODEL)
    records = list(iter_records(REPO / "examples/heldout/caption.jsonl"))[:6]
    batch = to_device(pack([processor.encode_for_training(r["messages"]) for r in records], 4096), torch.device(device))
    model = KimiVL.from_pretrained(MODEL, dtype=torch.float32, device=device).train()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = model(**batch.kwargs()).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    return loss.item(), norm.item()


def recipe_runs(device: str, work: Path) -> str:
    from kimivl.cli import main

    recipe = {
        "name": "device-check",
        "out": str(work / "run"),
        "device": device,
        "base": {"preset": "tiny"},
        "tokenizer": {"train_vocab": 600},
        "world": {"seed": 0, "train": 40, "heldout": 4},
        "sources": {
            "caption": "world/train/caption.jsonl",
            "text": "world/train/text.jsonl",
            "reasoning": "world/train/reasoning.jsonl",
        },
        "export": {"path": str(work / "export")},
        "stages": [
            {"name": "vit", "kind": "vit", "steps": 3, "lr": 1e-3, "sources": ["caption"], "images_per_batch": 4},
            {
                "name": "joint",
                "kind": "joint",
                "steps": 3,
                "lr": 1e-3,
                "budget": 1024,
                "ckpt_every": 2,
                "mix": {"caption": 1, "text": 1},
                "freeze": ["*.mlp.experts.*"],
                "recompute": True,
            },
            {
                "name": "rl",
                "kind": "rl",
                "steps": 2,
                "lr": 1e-4,
                "budget": 1024,
                "sources": ["reasoning"],
                "rl": {"problems": 2, "samples": 2, "max_new_tokens": 16},
            },
        ],
    }
    heldout = REPO / "examples/heldout"
    tune = {
        "name": "device-tune",
        "out": str(work / "tune"),
        "device": device,
        "base": {"checkpoint": str(MODEL)},
        "sources": {"caption": str(heldout / "caption.jsonl"), "ocr": str(heldout / "ocr.jsonl")},
        "stages": [
            {
                "name": "sft",
                "kind": "joint",
                "steps": 4,
                "lr": 1e-4,
                "budget": 2048,
                "accum": 2,
                "freeze": ["*.mlp.experts.*"],
                "replacement": False,
                "mix": {"caption": 1},
                "val": {"sources": ["ocr"], "every": 2, "rows": 2},
            }
        ],
    }
    for name, spec in (("recipe", recipe), ("tune", tune)):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        if main(["train", str(path)]) != 0 or main(["train", str(path), "--resume"]) != 0:
            raise RuntimeError(f"kimivl train {name} failed")
    metrics = [
        json.loads(line) for run in ("run", "tune") for line in (work / run / "metrics.jsonl").read_text().splitlines()
    ]
    if not all(math.isfinite(m["loss"]) for m in metrics) or not any("val_loss" in m for m in metrics):
        raise RuntimeError(f"a non-finite loss or no held-out loss: {metrics}")
    return f"{len(metrics)} metric rows, all finite; exported {sorted(p.name for p in (work / 'export').iterdir())}"


def flash_against_sdpa(device: str) -> str:
    from kimivl.kernels import attention, fused

    if not fused.use_flash(torch.zeros(1, device=device, dtype=torch.bfloat16)):
        return "flash-attn not usable here: skipped"
    torch.manual_seed(0)
    q, k = (torch.randn(1, 700, 8, 192, device=device, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 700, 8, 128, device=device, dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 450, 700], dtype=torch.int32, device=device)
    fast = attention(q, k, v, cu_seqlens=cu)
    kernel, fused.flash_attn_varlen_func = fused.flash_attn_varlen_func, None
    try:
        exact = attention(q, k, v, cu_seqlens=cu)
    finally:
        fused.flash_attn_varlen_func = kernel
    err = (fast.float() - exact.float()).abs().max().item()
    if err > 2e-2:
        raise RuntimeError(f"flash-attn differs from SDPA by {err}")
    return f"flash-attn within {err:.1e} of SDPA"


def long_context(device: str) -> str:
    from kimivl import KimiVL, KimiVLConfig
    from kimivl.inference.cache import MLACache
    from kimivl.inference.generate import prefill

    torch.manual_seed(0)
    model = KimiVL(KimiVLConfig.from_preset("tiny")).eval()
    cfg = model.config.text_config
    lengths = (3000, 2200)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 3000, (2, max(lengths)), generator=g)
    mask = torch.ones_like(ids)
    mask[1, : max(lengths) - lengths[1]] = 0
    logits = {}
    for dev in (device, "cpu"):
        lm = model.language_model.to(dev)
        m, positions = mask.to(dev), (mask.cumsum(1) - 1).clamp(min=0).to(dev)
        cache = MLACache(cfg, 2, ids.shape[1] + 8, device=dev)
        with torch.inference_mode():
            hidden = prefill(lm, lm.model.embed_tokens(ids.to(dev)), positions, cache, m, 512)
            out = [lm.logits(hidden[:, -1])]
            for step in range(8):
                m, positions = torch.cat([m, torch.ones_like(m[:, :1])], 1), positions[:, -1:] + 1
                token = torch.full((2, 1), 100 + step, device=dev)
                hidden = lm(lm.model.embed_tokens(token), position_ids=positions, cache=cache, attention_mask=m)
                out.append(lm.logits(hidden[:, -1]))
        logits[dev] = torch.stack(out).cpu()
    err = (logits[device] - logits["cpu"]).abs().max().item()
    if not err <= 1e-3:
        raise RuntimeError(f"long-context logits on {device} differ from the CPU's by {err}")
    return f"3,000-token padded prefill in chunks of 512 and 8 steps within {err:.1e} of the CPU (float32)"


def throughput(device: str) -> str:
    steps = "64" if device != "cpu" else "16"
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/train_throughput.py"), "--device", device, "--steps", steps],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keep = ("ratio packed", "vision tower", "achieved")
    return " | ".join(line for line in out.splitlines() if line.startswith(keep))


def sharded(device: str, work: Path) -> str:
    worker = REPO / "tests" / "distributed" / "train_worker.py"
    runs = {
        "single": [sys.executable, str(worker)],
        "sharded": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=1",
            "--master-addr=127.0.0.1",
            "--master-port=29533",
            str(worker),
        ],
    }
    losses = {}
    for name, cmd in runs.items():
        out = work / name
        subprocess.run([*cmd, "--out", str(out), "--steps", "4", "--device", device], check=True, cwd=REPO, timeout=600)
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    if any(abs(a - b) > 1e-3 * abs(b) for a, b in zip(losses["sharded"], losses["single"])):
        raise RuntimeError(f"sharded losses {losses['sharded']} against {losses['single']}")
    return f"losses {', '.join(f'{x:.4f}' for x in losses['sharded'])} as in one process"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    device = ap.parse_args().device
    failed = False

    def check(name, fn):
        nonlocal failed
        start = time.perf_counter()
        try:
            print(f"ok   {name}: {fn()} ({time.perf_counter() - start:.0f} s)", flush=True)
        except Exception as e:  # report every check, then fail
            failed = True
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)

    def same_answers():
        (here, acc_here), (cpu, acc_cpu) = answers(device), answers("cpu")
        same = sum(a == b for a, b in zip(here, cpu))
        if same < 0.9 * len(cpu):
            raise RuntimeError(f"only {same} of {len(cpu)} answers equal the CPU's")
        return f"{same}/{len(cpu)} answers as on the CPU; accuracy {100 * acc_here:.1f}% vs {100 * acc_cpu:.1f}%"

    def same_step():
        (loss, norm), (loss_cpu, norm_cpu) = train_step(device), train_step("cpu")
        if abs(loss - loss_cpu) > 0.02 * loss_cpu or abs(norm - norm_cpu) > 0.05 * norm_cpu:
            raise RuntimeError(f"loss {loss} / grad norm {norm} against the CPU's {loss_cpu} / {norm_cpu}")
        return f"loss {loss:.4f} vs {loss_cpu:.4f}, gradient norm {norm:.3f} vs {norm_cpu:.3f}"

    check("generation", same_answers)
    check("training step", same_step)
    with tempfile.TemporaryDirectory() as work:
        check("recipe", lambda: recipe_runs(device, Path(work)))
    check("flash-attn", lambda: flash_against_sdpa(device))
    with tempfile.TemporaryDirectory() as work:
        check("sharded training", lambda: sharded(device, Path(work)))
    check("long context", lambda: long_context(device))
    check("packing throughput", lambda: throughput(device))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
