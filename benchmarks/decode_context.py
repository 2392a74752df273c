"""Decode time per token at given context lengths on a small MoE config (bf16, batch 1): the cost of attention over
the compressed MLA cache as the context grows. The prompt is prefilled once per length, then a few greedy steps are
timed (median per step).

    python benchmarks/decode_context.py [--contexts 1024 8192] [--steps 16] [--layers 4]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from kimivl.exits import run_command
from kimivl.inference.cache import MLACache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the small MoE config of decode_speed.py
from arguments import at_least, parser  # noqa: E402
from decode_speed import bench_config, kimivl_with  # noqa: E402
from hf_reference import random_lm, to_bf16  # noqa: E402  (decode_speed put tests/ on the path)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--contexts", type=at_least(1), nargs="+", default=[1024, 8192])
    ap.add_argument("--steps", type=at_least(1), default=16)
    ap.add_argument("--layers", type=at_least(1), default=4)
    args = ap.parse_args()
    cfg = dataclasses.replace(bench_config(args.layers), max_position_embeddings=max(args.contexts) + args.steps + 8)
    model = kimivl_with(random_lm(cfg))
    to_bf16(model)
    lm = model.language_model
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for ctx in args.contexts:
            ids = torch.randint(10, cfg.vocab_size, (1, ctx), generator=g)
            cache = MLACache(cfg, 1, ctx + args.steps + 2, dtype=torch.bfloat16)
            start = time.perf_counter()
            hidden = lm(lm.model.embed_tokens(ids), cache=cache)
            prefill = time.perf_counter() - start
            times = []
            for _ in range(args.steps + 2):
                token = lm.logits(hidden[:, -1]).argmax(-1)
                start = time.perf_counter()
                hidden = lm(lm.model.embed_tokens(token[:, None]), cache=cache)
                times.append(time.perf_counter() - start)
            ms = 1000 * statistics.median(times[2:])
            print(f"context {ctx:>6}: decode {ms:7.1f} ms/token (median of {args.steps}), prefill {prefill:.1f} s")
    print(
        f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"kv_lora_rank {cfg.kv_lora_rank}, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; bf16, "
        f"{torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    sys.exit(run_command("decode_context.py", main))
