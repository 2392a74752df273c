"""Peak extra memory and time of the training loss through the LM head at Kimi-VL-A3B's vocabulary: full logits and
cross-entropy (what the model did before, and what transformers' models do) against ``target_logprobs``, which
runs the head at scored positions only, in chunks. CPU, bf16 autocast, forward and backward.

Both arms score the same ``--scored`` share of ``--positions`` positions (the rest are prompt or padding, as in SFT)
with the same weights; their losses and gradients are compared. Peak extra memory is the rise of the resident-set
high-water mark over the resident set before each arm (see rss.py).

    python benchmarks/loss_memory.py [--positions 2048] [--scored 0.25] [--vocab 163840] [--hidden 2048]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from arguments import at_least, parser
from rss import PeakRise

from kimivl.exits import run_command
from kimivl.model.target_logprobs import target_logprobs
from kimivl.processing.processor import IGNORE_INDEX

MIB = 1 << 20


def full_logits(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def scored_only(hidden, weight, labels):
    scored = labels != IGNORE_INDEX
    return -target_logprobs(hidden[scored], weight, labels[scored]).mean()


def run(loss_fn, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    start = time.perf_counter()
    with PeakRise() as rise:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(h, w, labels)
        loss.backward()
    return loss.detach(), h.grad, w.grad, rise, time.perf_counter() - start


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--positions", type=at_least(1), default=2048)
    ap.add_argument("--scored", type=float, default=0.25, help="share of positions with a target")
    ap.add_argument("--vocab", type=at_least(1), default=163840, help="Kimi-VL-A3B: 163840")
    ap.add_argument("--hidden", type=at_least(1), default=2048, help="Kimi-VL-A3B: 2048")
    args = ap.parse_args()
    if not 0 < args.scored <= 1:
        ap.error("--scored must be in (0, 1]")

    torch.manual_seed(0)
    hidden = torch.randn(args.positions, args.hidden)
    weight = torch.randn(args.vocab, args.hidden) * args.hidden**-0.5
    labels = torch.randint(0, args.vocab, (args.positions,))
    labels[torch.rand(args.positions) >= args.scored] = IGNORE_INDEX
    if not (labels != IGNORE_INDEX).any():  # the losses would be nan
        ap.error(f"--positions {args.positions} at --scored {args.scored}: none drew a target; give more of either")

    arms = {"full logits + cross-entropy": full_logits, "target_logprobs": scored_only}
    results = {name: run(fn, hidden, weight, labels) for name, fn in arms.items()}
    (ref, *ref_grads, _, _), (got, *grads, _, _) = results.values()
    logits_mib = args.positions * args.vocab * 4 / MIB
    print(
        f"head {args.vocab} x {args.hidden}, {args.positions} positions, {int((labels != IGNORE_INDEX).sum())} "
        f"scored, bf16 autocast, CPU, {torch.get_num_threads()} threads; float32 logits of every position: "
        f"{logits_mib:.0f} MiB"
    )
    for name, (_, _, _, rise, seconds) in results.items():
        bound = "" if rise.exact else "  (ru_maxrss: a lower bound)"
        print(f"{name:28s} peak extra {rise.bytes / MIB:8.0f} MiB  forward+backward {seconds:6.2f} s{bound}")
    full, lean = (r[3].bytes for r in results.values())
    print(
        f"memory ratio full / target_logprobs: {full / max(lean, 1):.1f}x; time ratio: "
        f"{results['full logits + cross-entropy'][4] / results['target_logprobs'][4]:.2f}x"
    )
    grad_err = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads))
    print(f"loss {got.item():.6f} vs {ref.item():.6f}; largest relative gradient difference {grad_err:.2e}")


if __name__ == "__main__":
    sys.exit(run_command("loss_memory.py", main))
