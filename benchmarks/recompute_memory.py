"""Peak extra memory and time of one training step's forward and backward with activation checkpointing
(``kimivl.distributed.recompute``) against without, on a packed text row. CPU, bf16 autocast.

The language model has the A3B's width and expert shapes (hidden 2048, 64 experts of 1408, top 6, 2 shared) with
``--layers`` layers and a ``--vocab`` of 32,000, float32 weights as in training. Peak extra memory is the rise of the
resident-set high-water mark over the resident set before each arm (see rss.py), and the memory kept from forward
for backward the rise of the resident set over forward; losses and gradients are compared.

    python benchmarks/recompute_memory.py [--layers 2] [--tokens 4096]
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from arguments import at_least, parser
from rss import PeakRise, status_kib

from kimivl import KimiVL, KimiVLConfig
from kimivl.distributed.recompute import apply_recompute, remove_recompute
from kimivl.exits import run_command

MIB = 1 << 20


def run(model, batch, recompute: bool):
    """Loss, the last layer's gradients, the memory kept from forward for backward, the peak over forward and
    backward (gradient buffers exist already, so neither counts them), seconds."""
    model.zero_grad(set_to_none=False)
    (apply_recompute if recompute else remove_recompute)(model)
    start = time.perf_counter()
    before_kib = status_kib("VmRSS")
    with PeakRise() as peak:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        kept = (status_kib("VmRSS") - before_kib) * 1024
        loss.backward()
    seconds = time.perf_counter() - start
    grads = [p.grad.clone() for p in model.language_model.model.layers[-1].parameters()]
    return loss.detach(), grads, kept, peak.bytes, seconds


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--layers", type=at_least(1), default=2)
    ap.add_argument("--tokens", type=at_least(1), default=4096, help="positions in the packed row")
    ap.add_argument("--vocab", type=at_least(4), default=32000, help="its last id is the image placeholder")
    args = ap.parse_args()

    config = KimiVLConfig.from_preset("kimi-vl-a3b")
    text = dataclasses.replace(
        config.text_config, num_hidden_layers=args.layers, vocab_size=args.vocab, bos_token_id=1, eos_token_id=2
    )
    config = dataclasses.replace(config, text_config=text, media_placeholder_token_id=args.vocab - 1)
    torch.manual_seed(0)
    model = KimiVL(config).train()
    ids = torch.randint(0, args.vocab - 1, (1, args.tokens))  # text only: no image placeholder
    starts = list(range(0, args.tokens, 512)) + [args.tokens]  # samples of 512 tokens
    batch = {"input_ids": ids, "labels": ids, "cu_seqlens": torch.tensor(starts, dtype=torch.int32)}
    run(model, batch, recompute=False)  # warm-up: kernels and allocator
    plain = run(model, batch, recompute=False)
    recomputed = run(model, batch, recompute=True)

    print(
        f"LM hidden {config.text_config.hidden_size}, {args.layers} layers (first dense), "
        f"{config.text_config.n_routed_experts} experts top {config.text_config.num_experts_per_tok}, "
        f"{args.tokens} tokens in samples of 512, bf16 autocast, CPU, {torch.get_num_threads()} threads"
    )
    for name, (_, _, kept, peak, seconds) in (("without recompute", plain), ("with recompute", recomputed)):
        print(
            f"{name:18s} kept for backward {kept / MIB:8.0f} MiB  peak extra {peak / MIB:8.0f} MiB  "
            f"forward+backward {seconds:6.2f} s"
        )
    peak = plain[3] / max(recomputed[3], 1)
    lower = f"{peak:.2f}x lower peak" if peak >= 1 else f"{1 / peak:.2f}x higher peak"
    print(
        f"with recompute: {plain[2] / max(recomputed[2], 1):.1f}x less kept, {lower}, {recomputed[4] / plain[4]:.2f}x "
        "the time"
    )
    grad_err = max(((a - b).norm() / b.norm()).item() for a, b in zip(recomputed[1], plain[1]))
    print(
        f"loss {recomputed[0].item():.6f} vs {plain[0].item():.6f}; largest relative gradient difference "
        f"(last layer) {grad_err:.1e}"
    )


if __name__ == "__main__":
    sys.exit(run_command("recompute_memory.py", main))
