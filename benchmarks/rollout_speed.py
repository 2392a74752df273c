"""RL rollout speed: k sampled answers per reasoning problem generated in batches against one at a time.

Both run ``kimivl.rl.rollouts.rollout`` on the same prompts (synthetic reasoning problems with their images) with
the same sampling settings; only the number of rows per generation batch differs. Stop tokens are off so that both
generate exactly ``--new`` tokens per answer; printed are new tokens/s of each and the ratio.

    python benchmarks/rollout_speed.py [--model models/kimivl-tiny] [--problems 8] [--k 8] [--new 96] [--batch 64]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
from arguments import at_least, parser

from kimivl import KimiVL, KimiVLProcessor
from kimivl.data.synthetic.reasoning import make_reasoning
from kimivl.exits import run_command
from kimivl.inference.sampling import SamplingParams
from kimivl.rl.rollouts import rollout

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default=str(ROOT / "models" / "kimivl-tiny"))
    ap.add_argument("--problems", type=at_least(1), default=8)
    ap.add_argument("--k", type=at_least(1), default=8)
    ap.add_argument("--new", type=at_least(1), default=96)
    ap.add_argument("--batch", type=at_least(1), default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = KimiVL.from_pretrained(args.model, dtype=torch.float32)
    processor = KimiVLProcessor.from_pretrained(args.model)
    rng = random.Random(0)
    encoded = []
    for _ in range(args.problems):
        sample = make_reasoning(rng)
        parts = [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in sample.content
        ]
        encoded.append(processor.encode([{"role": "user", "content": parts}]))
    prompts = [e.input_ids for e in encoded]
    pv = torch.cat([e.pixel_values for e in encoded])
    grids = torch.cat([e.image_grid_hws for e in encoded])
    params = SamplingParams(max_new_tokens=args.new, temperature=0.8, seed=0)
    results = {}
    for name, batch in (("one at a time", 1), (f"batches of {args.batch}", args.batch)):
        start = time.perf_counter()
        rolls = rollout(model, processor, prompts, pv, grids, args.k, params, stop_ids=(), batch_size=batch)
        results[name] = sum(r.length for r in rolls) / (time.perf_counter() - start)
        print(f"{name:>16}: {results[name]:8.0f} new tokens/s ({len(rolls)} answers x {args.new} tokens)")
    one, many = results.values()
    print(f"batched / one at a time: {many / one:.1f}x")


if __name__ == "__main__":
    sys.exit(run_command("rollout_speed.py", main))
