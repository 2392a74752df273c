"""Decode speed and cache size: kimivl's generation on its compressed MLA cache against transformers'
``DeepseekV3ForCausalLM.generate`` on the same small config and weights.

Both decode greedily from the same random prompts for the same number of new tokens (no early stop), in bf16,
interleaved so that machine noise hits both alike; printed are median new tokens/s and the ratio (target: kimivl
at least 2x). Cache bytes per token: kimivl's by formula and measured, transformers' measured from its cache after
generation, and the A3B shape's compressed cache against per-head keys and values by formula (target ~9x).

    python benchmarks/decode_speed.py [--batch 4] [--prompt 512] [--new 64] [--repeats 3]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from arguments import at_least, parser

from kimivl import KimiVL, KimiVLConfig
from kimivl.config import TextConfig, VisionConfig
from kimivl.exits import run_command
from kimivl.inference.cache import MLACache
from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the transformers reference
from hf_reference import hf_reference, random_lm, to_bf16  # noqa: E402


def bench_config(layers: int) -> TextConfig:
    return TextConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=192,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        bos_token_id=1,
        eos_token_id=2,
    )


def kimivl_with(lm) -> KimiVL:
    """A KimiVL around the language model ``lm`` (a tiny, unused vision tower)."""
    vision = VisionConfig(
        num_attention_heads=2,
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=32,
        init_pos_emb_height=4,
        init_pos_emb_width=4,
    )
    model = KimiVL(KimiVLConfig(vision_config=vision, text_config=lm.config, media_placeholder_token_id=3))
    model.language_model.load_state_dict(lm.state_dict())
    return model.eval()


def hf_cache_bytes_per_token(ref, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        out = ref(input_ids=ids, use_cache=True)
    tensors = [t for layer in out.cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.nbytes for t in tensors) / ids.numel()


def same_greedy_tokens(model, ref, prompt_ids: torch.Tensor, new: int = 8) -> bool:
    """Whether kimivl's greedy tokens after ``prompt_ids`` (B, P) equal transformers' ``generate``'s."""
    theirs = ref.generate(
        prompt_ids,
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt_ids),
    )
    ours = generate_ids(model, prompt_ids.tolist(), params=SamplingParams(max_new_tokens=new))
    return ours == theirs[:, prompt_ids.shape[1] :].tolist()


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=at_least(1), default=4)
    ap.add_argument("--prompt", type=at_least(1), default=512)
    ap.add_argument("--new", type=at_least(1), default=64)
    ap.add_argument("--layers", type=at_least(1), default=4)
    ap.add_argument("--repeats", type=at_least(1), default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = bench_config(args.layers)
    lm = random_lm(cfg)
    ref = hf_reference(cfg, lm)
    model = kimivl_with(lm)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, cfg.vocab_size, (args.batch, args.prompt), generator=g)
    params = SamplingParams(max_new_tokens=args.new)

    def ours():
        return generate_ids(model, ids.tolist(), params=params)

    def theirs():
        out = ref.generate(
            ids,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
            pad_token_id=0,
            attention_mask=torch.ones_like(ids),
        )
        return out[:, args.prompt :].tolist()

    with torch.inference_mode():
        same = same_greedy_tokens(model, ref, ids[:, :32])  # a short prompt: at most 32 tokens
        print(f"fp32 greedy tokens identical to transformers on a short prompt: {same}")
        to_bf16(model)
        to_bf16(ref)
        ours(), theirs()  # warm-up
        times = {"kimivl": [], "transformers": []}
        for _ in range(args.repeats):
            for name, fn in (("kimivl", ours), ("transformers", theirs)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    new_tokens = args.batch * args.new
    speed = {name: new_tokens / statistics.median(t) for name, t in times.items()}
    print(
        f"config: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"kv_lora_rank {cfg.kv_lora_rank}, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; batch "
        f"{args.batch}, prompt {args.prompt}, {args.new} new tokens, bf16, {torch.get_num_threads()} threads; "
        f"transformers {transformers.__version__}"
    )
    for name in times:
        print(f"{name:>12}: {speed[name]:7.1f} new tokens/s (prefill included; median of {args.repeats})")
    print(f"ratio kimivl / transformers: {speed['kimivl'] / speed['transformers']:.2f}x")

    filled = MLACache(cfg, args.batch, 100, dtype=torch.bfloat16)
    filled.reserve(100)
    measured = filled.nbytes() / (args.batch * 100)
    print(
        f"cache bytes/token, this shape, bf16: kimivl {MLACache.bytes_per_token(cfg)} by formula, {measured:.0f} "
        f"measured; transformers {hf_cache_bytes_per_token(ref, ids[:, :64]):.0f} measured; per-head K/V would be "
        f"{MLACache.uncompressed_bytes_per_token(cfg)}"
    )
    a3b = KimiVLConfig.from_preset("kimi-vl-a3b").text_config
    ratio = MLACache.uncompressed_bytes_per_token(a3b) / MLACache.bytes_per_token(a3b)
    print(
        f"A3B shape, bf16: compressed {MLACache.bytes_per_token(a3b) / 1024:.1f} KiB/token vs per-head K/V "
        f"{MLACache.uncompressed_bytes_per_token(a3b) / 1024:.1f} KiB/token: {ratio:.1f}x smaller"
    )


if __name__ == "__main__":
    sys.exit(run_command("decode_speed.py", main))
