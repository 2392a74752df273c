"""Long context on a mid-size MoE (hidden 1024, latent 256, 64 experts of 256 top-6 + 2 shared, bf16, batch 1):
prefill time and peak extra memory from 1K to 128K tokens, and decode ms/token from 1K to 128K of context, each
beside a baseline measured in the same run and, for decode, the memory-bandwidth roofline.

- Prefill (``--layers``, default 1, an MoE layer: attention at 128K is quadratic, and even one layer takes minutes
  on 2 shared cores; the peak is one layer's, whatever the layer count) runs ``generate.prefill`` in chunks of
  ``PREFILL_CHUNK`` tokens; peak extra memory is the resident set's high-water rise minus the cache it filled.
  Baselines: the former path (each chunk expands the whole cache to per-head keys and values, one SDPA call; up to
  ``--baseline-max``) and transformers' ``DeepseekV3ForCausalLM`` in one pass with the same weights (up to
  ``--hf-max``). A length whose predicted time would pass ``--time-limit`` is skipped.
- Decode (``--decode-layers``, default 8: the issue's 404M-parameter shape) times greedy steps on a cache filled with
  random latents (decode cost does not depend on their values), median of ``--steps``. Baselines: the former step
  (the whole cache widened to float32, one SDPA call) and transformers (up to ``--hf-decode-max``; 5.25 caches the
  compressed latent and rope key, as kimivl does, and expands the whole cache to per-head keys and values every
  step). Roofline: (cache bytes + weight bytes read per step) / the bandwidth of a large tensor copy measured at the
  start. Compute floor: the weights' read time plus the longer of the cache's read time and its
  attention FLOPs (MLA's absorbed step: heads x (latent + rope + latent) x 2 per cached token and layer) at the rate
  of a square bf16 matmul measured at the start, the fastest this CPU multiplies.

    python benchmarks/long_context.py [--lengths 1024 4096] [--decode-lengths 1024 8192] [--steps 8] [--threads 1]
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kimivl.config import TextConfig
from kimivl.exits import run_command
from kimivl.inference.cache import MLACache
from kimivl.inference.generate import PREFILL_CHUNK, prefill
from kimivl.kernels import dispatch
from kimivl.model import mla

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from arguments import at_least, parser  # noqa: E402
from hf_reference import hf_reference, random_lm, to_bf16  # noqa: E402
from rss import PeakRise  # noqa: E402

MIB = 2**20


def bench_config(layers: int, context: int) -> TextConfig:
    """The mid-size MoE at ``layers`` layers; the first is dense when there are several."""
    return TextConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
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
        first_k_dense_replace=min(1, layers - 1),
        n_group=4,
        topk_group=2,
        max_position_embeddings=context,
        rope_theta=50000.0,
        bos_token_id=1,
        eos_token_id=2,
    )


def best_seconds(fn, repeats: int = 5) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth() -> float:
    """Bytes/s of a 256 MiB float32 copy (read + write), best of 5."""
    src = torch.randn(64 * MIB)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: dst.copy_(src))


def matmul_rate() -> float:
    """FLOP/s of a 2048 x 2048 bf16 matmul, best of 5 after a warm-up."""
    a, b = torch.randn(2, 2048, 2048).bfloat16()
    a @ b
    return 2 * 2048**3 / best_seconds(lambda: a @ b)


def attention_flops_per_token(cfg: TextConfig) -> int:
    """FLOPs of the absorbed decoding step per cached token, all layers: scores over latent + rope, output over the
    latent, for every head."""
    width = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.num_hidden_layers * cfg.num_attention_heads * width


def weight_bytes_per_step(lm) -> int:
    """Weights a batch-1 decoding step reads: all but the embedding table and the unchosen routed experts."""
    cfg = lm.config
    total = sum(p.nbytes for name, p in lm.named_parameters() if "embed_tokens" not in name and ".experts." not in name)
    for layer in lm.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.nbytes for p in experts.parameters()) // cfg.n_routed_experts
            total += cfg.num_experts_per_tok * per_expert
    return total


def former_decode(q_BHX, blocks_BNX, value_dim, *, scale, key_valid_BK=None):
    """The decoding step before split-K: the whole cache widened to float32, one fused softmax."""
    k_B1KX = torch.cat(blocks_BNX, 1).float()[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q_BHX.float()[:, :, None], k_B1KX, k_B1KX[..., :value_dim], scale=scale, enable_gqa=True
    )
    return o[:, :, 0].to(q_BHX.dtype)


def fresh() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so each high-water rise starts low
    except OSError:
        pass


def time_prefill(lm, ids: torch.Tensor) -> tuple[float, int]:
    """Seconds and peak extra bytes (beyond the cache it fills) of a chunked prefill of ``ids`` (1, L)."""
    fresh()
    cache = MLACache(lm.config, 1, ids.shape[1], dtype=torch.bfloat16)
    with torch.inference_mode(), PeakRise() as rise:
        start = time.perf_counter()
        embeds = lm.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        prefill(lm, embeds, positions, cache, None, PREFILL_CHUNK)
        seconds = time.perf_counter() - start
    return seconds, rise.bytes - cache.nbytes()


def time_hf_prefill(ref, ids: torch.Tensor) -> tuple[float, int]:
    fresh()
    with torch.inference_mode(), PeakRise() as rise:
        start = time.perf_counter()
        out = ref(input_ids=ids, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - start
        cache_bytes = sum(t.nbytes for layer in out.cache.layers for t in vars(layer).values() if torch.is_tensor(t))
    return seconds, rise.bytes - cache_bytes


def time_decode(lm, context: int, steps: int, g: torch.Generator) -> float:
    """Median ms per greedy step after ``context`` cached tokens of random latents."""
    cfg = lm.config
    cache = MLACache(cfg, 1, context + steps + 2, dtype=torch.bfloat16)
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache.load(torch.randn(cfg.num_hidden_layers, 1, context, width, generator=g).bfloat16())
    token = torch.randint(10, cfg.vocab_size, (1, 1), generator=g)
    times = []
    with torch.inference_mode():
        for _ in range(steps + 2):
            start = time.perf_counter()
            hidden = lm(lm.model.embed_tokens(token), cache=cache)
            token = lm.logits(hidden[:, -1]).argmax(-1, keepdim=True)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def time_hf_decode(ref, context: int, steps: int, g: torch.Generator) -> float:
    ids = torch.randint(10, ref.config.vocab_size, (1, context), generator=g)
    times = []
    with torch.inference_mode():
        out = ref(input_ids=ids, use_cache=True, logits_to_keep=1)
        for _ in range(steps + 2):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            out = ref(input_ids=token, cache=out.cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:])


def bf16_models(layers: int, context: int, with_reference: bool):
    """The config, kimivl's random LM and (if asked) transformers' copy of it, both in bf16."""
    cfg = bench_config(layers, context)
    lm = random_lm(cfg)
    ref = hf_reference(cfg, lm) if with_reference else None
    to_bf16(lm)
    if ref is not None:
        to_bf16(ref)
    return cfg, lm, ref


def prefill_table(args, context: int, g: torch.Generator, began: float) -> None:
    cfg, lm, ref = bf16_models(args.layers, context, min(args.lengths) <= args.hf_max)
    weights = sum(p.nbytes for p in lm.parameters())
    time_prefill(lm, torch.randint(10, cfg.vocab_size, (1, 1024), generator=g))  # warm-up of the kernels
    print(
        f"\nprefill: {args.layers} layer(s), {weights / MIB:.0f} MiB of weights, chunks of {PREFILL_CHUNK}; "
        "seconds and peak extra MiB beyond weights and cache",
        flush=True,
    )
    print("| tokens | kimivl s | kimivl MiB | former s | former MiB | transformers s | transformers MiB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    last = None
    for n in sorted(args.lengths):
        if last is not None:  # quadratic in the length: skip what would overrun the time limit
            predicted = last[1] * (n / last[0]) ** 2 * (2 if n <= args.baseline_max else 1)
            if time.perf_counter() - began + predicted > args.time_limit:
                print(f"| {n} | skipped: about {predicted:.0f} s more would pass --time-limit {args.time_limit} s |")
                continue
        ids = torch.randint(10, cfg.vocab_size, (1, n), generator=g)
        ours = time_prefill(lm, ids)
        last = (n, ours[0])
        former = hf = None
        if n <= args.baseline_max:
            patched, mla.latent_prefill_attention = mla.latent_prefill_attention, dispatch.sdpa_prefill
            try:
                former = time_prefill(lm, ids)
            finally:
                mla.latent_prefill_attention = patched
        if ref is not None and n <= args.hf_max:
            hf = time_hf_prefill(ref, ids)
        cells = [f"{r[0]:.2f} | {r[1] / MIB:.0f}" if r is not None else "- | -" for r in (ours, former, hf)]
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)


def decode_table(args, context: int, g: torch.Generator, bw: float, rate: float) -> None:
    cfg, lm, ref = bf16_models(args.decode_layers, context, min(args.decode_lengths) <= args.hf_decode_max)
    per_step = weight_bytes_per_step(lm)
    params = sum(p.numel() for p in lm.parameters()) / 1e6
    print(
        f"\ndecode: {args.decode_layers} layers, {params:.0f}M parameters, {per_step / MIB:.0f} MiB of weights read "
        f"per step; ms/token, median of {args.steps}; roofline = (cache + weights read) / bandwidth; compute floor = "
        "weights read / bandwidth + the longer of cache read and attention FLOPs / bf16 matmul rate",
        flush=True,
    )
    print(
        "| context | kimivl ms | roofline ms | kimivl / roofline | compute floor ms | kimivl / floor | former ms "
        "| transformers ms |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    ms = {}
    for n in sorted(args.decode_lengths):
        ms[n] = time_decode(lm, n, args.steps, g)
        patched, mla.latent_decode_attention = mla.latent_decode_attention, former_decode
        try:
            former = time_decode(lm, n, args.steps, g)
        finally:
            mla.latent_decode_attention = patched
        hf = time_hf_decode(ref, n, args.steps, g) if ref is not None and n <= args.hf_decode_max else None
        cache_read = MLACache.bytes_per_token(cfg) * n / bw
        roof = 1000 * (per_step / bw + cache_read)
        floor = 1000 * (per_step / bw + max(cache_read, attention_flops_per_token(cfg) * n / rate))
        hf_cell = f"{hf:.1f}" if hf is not None else "-"
        print(
            f"| {n} | {ms[n]:.1f} | {roof:.1f} | {ms[n] / roof:.2f} | {floor:.1f} | {ms[n] / floor:.2f} | "
            f"{former:.1f} | {hf_cell} |",
            flush=True,
        )
    if 1024 in ms and 32768 in ms:
        print(f"decode at 32K / at 1K: {ms[32768] / ms[1024]:.2f}x (target <= 3x)", flush=True)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--lengths", type=at_least(1), nargs="*", default=[1024, 4096, 16384, 32768, 65536, 131072])
    ap.add_argument("--decode-lengths", type=at_least(1), nargs="*", default=[1024, 8192, 32768, 131072])
    ap.add_argument("--layers", type=at_least(1), default=1, help="layers of the prefill model (one: an MoE layer)")
    ap.add_argument("--decode-layers", type=at_least(1), default=8, help="layers of the decode model")
    ap.add_argument("--steps", type=at_least(1), default=8)
    ap.add_argument("--baseline-max", type=int, default=32768, help="longest prompt for the former prefill")
    ap.add_argument("--hf-max", type=int, default=4096, help="longest prompt for transformers' prefill")
    ap.add_argument("--hf-decode-max", type=int, default=8192, help="longest context for transformers' decode")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--time-limit", type=float, default=1140, help="seconds: longer prefills are skipped")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    context = max([*args.lengths, *args.decode_lengths, 1024]) + args.steps + 8
    bw, rate = bandwidth(), matmul_rate()
    print(
        f"memory bandwidth (256 MiB copy): {bw / 1e9:.1f} GB/s; bf16 matmul {rate / 1e9:.0f} GFLOP/s; "
        f"{torch.get_num_threads()} threads; load average "
        f"{os.getloadavg()[0]:.1f}; hidden 1024, 8 heads of 64 + 32 (values 64), latent 256, 64 experts of 256 "
        "top-6 + 2 shared, vocab 8192, bf16",
        flush=True,
    )
    if args.decode_lengths:
        decode_table(args, context, g, bw, rate)
    fresh()
    if args.lengths:
        prefill_table(args, context, g, began)
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(run_command("long_context.py", main))
