"""Language-model forward speed: kimivl's ``LanguageModel`` against transformers' ``DeepseekV3ForCausalLM``.

Both get the same random weights (official key names; experts fused into transformers' stacked layout) on a small
Moonlight-shaped config (``bench_config``: MLA, one dense layer then MoE layers, 64 experts top-6 with group-limited
routing, two shared experts). First the two are checked to agree in float32 (max abs logit difference on a short
input; the bf16 error of each against those float32 logits is printed too), then both run full-sequence forwards to
float32 logits (kimivl: ``lm.logits(lm(embeds))``; transformers: ``.logits.float()``) in bf16 under
``torch.inference_mode``, interleaved so that machine noise hits both alike. Printed: median tokens/s of each and
the ratio (target: kimivl at least 2x). transformers runs with the faster of its 'sdpa' and 'eager' attention
(timed once each at warm-up) and its default experts implementation (``grouped_mm`` in 5.x); both are printed.
transformers is needed only here and in the tests.

    python benchmarks/lm_speed.py [--batch 2] [--seq 1024] [--layers 6] [--repeats 7] [--threads 1]

One thread by default: on a machine shared with other jobs, multi-threaded runs stall whenever a core is taken away
and the timings then say more about the neighbours than about the models.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from arguments import at_least, parser

from kimivl.config import TextConfig
from kimivl.exits import run_command

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the transformers reference
from hf_reference import hf_reference, random_lm, to_bf16  # noqa: E402


def bench_config(layers: int) -> TextConfig:
    return TextConfig(
        vocab_size=8192,
        hidden_size=768,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        n_group=8,
        topk_group=4,
        max_position_embeddings=4096,
        rope_theta=50000.0,
        bos_token_id=1,
        eos_token_id=2,
    )


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=at_least(1), default=2)
    ap.add_argument("--seq", type=at_least(1), default=1024)
    ap.add_argument("--layers", type=at_least(1), default=6)
    ap.add_argument("--repeats", type=at_least(1), default=7)
    ap.add_argument("--threads", type=at_least(0), default=1, help="torch threads; 0 for torch's default")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = bench_config(args.layers)
    lm = random_lm(cfg)
    ref = hf_reference(cfg, lm)

    def ours(x):
        return lm.logits(lm(x))

    def theirs(x):
        return ref(inputs_embeds=x, use_cache=False).logits.float()

    print(
        f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers (first dense), "
        f"{cfg.num_attention_heads} heads, kv_lora_rank {cfg.kv_lora_rank}, {cfg.n_routed_experts} experts "
        f"top-{cfg.num_experts_per_tok} (n_group {cfg.n_group}, topk_group {cfg.topk_group}) x "
        f"{cfg.moe_intermediate_size} + {cfg.n_shared_experts} shared, vocab {cfg.vocab_size}; "
        f"batch {args.batch} x seq {args.seq}; torch threads {torch.get_num_threads()}"
    )

    with torch.inference_mode():
        x = torch.randn(2, 64, cfg.hidden_size)
        exact = ours(x)
        diff = (exact - theirs(x)).abs().max().item()
        print(f"fp32 parity: max abs logit diff {diff:.2e} (logits up to {exact.abs().max().item():.2f})")
        if diff > 1e-4:
            raise RuntimeError("kimivl and transformers disagree in float32; the timing would compare different models")
        to_bf16(lm)
        to_bf16(ref)
        x = x.bfloat16()
        print(
            f"bf16 error against those fp32 logits: kimivl {(ours(x) - exact).abs().max().item():.3f}, "
            f"transformers {(theirs(x) - exact).abs().max().item():.3f} (max abs)"
        )
        x = torch.randn(args.batch, args.seq, cfg.hidden_size, dtype=torch.bfloat16)
        ours(x)  # warm-up
        attn = {}
        for impl in ("sdpa", "eager"):  # transformers' CPU attention backends: keep the faster one here
            ref.set_attn_implementation(impl)
            theirs(x)
            attn[impl] = timed(theirs, x)
        ref.set_attn_implementation(min(attn, key=attn.get))
        print(
            f"transformers {transformers.__version__}: attention {ref.config._attn_implementation!r} "
            f"({', '.join(f'{k} {v:.2f} s' for k, v in attn.items())}), "
            f"experts {ref.config._experts_implementation!r} (its default)"
        )
        times = {"kimivl": [], "transformers": []}
        for _ in range(args.repeats):
            times["kimivl"].append(timed(ours, x))
            times["transformers"].append(timed(theirs, x))

    tokens = args.batch * args.seq
    speed = {name: tokens / statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(
            f"{name:>12}: {speed[name]:8.0f} tokens/s  (median of {len(t)}: "
            f"{', '.join(f'{s:.2f}' for s in sorted(t))} s)"
        )
    print(f"ratio kimivl / transformers: {speed['kimivl'] / speed['transformers']:.2f}x")


if __name__ == "__main__":
    sys.exit(run_command("lm_speed.py", main))
