"""Training throughput of kimivl-tiny: packed rows against a padded-batch baseline, and achieved GFLOP/s against
the device's matmul peak (in the compute dtype) measured in the same run.

Both arms train the same model on the same samples (the synthetic world's ``--tasks`` in a seeded mix, by default
every task and text but the long documents, or those of your ``--data`` JSONL files, encoded by ``--tokenizer``'s
tokenizer) with bf16 autocast where the device multiplies bf16 fast (else in float32; ``--bf16``/``--no-bf16``
decide) and the Muon/AdamW optimiser. Packed: samples laid end to end in rows of ``--budget`` tokens. Padded: the
same samples, ``--batch`` per step (or as many as fit ``--padded-tokens`` with their padding), right-padded to the
longest (padding is causal-safe and unscored). The arms alternate in cycles: ``--accum`` packed rows then their
samples padded, the optimiser stepping once per cycle in each (Newton-Schulz in ``--ns-dtype``, by default the
compute dtype), as in training with gradient accumulation; the first cycle is an untimed warm-up. Printed: useful
(non-padding) tokens/s of each and their ratio (target >= 1.5x, and its range over the cycles), beside the ratio of
their model FLOPs (``model_flops``; padding is computed, so the padded arm does more: the most packing can give,
were every FLOP equally fast) and the share of it reached; the vision tower's share (timed alone on the same images:
its work is identical in both arms) and the ratio of the rest; and the packed arm's achieved GFLOP/s as a share of
the matmul peak.

With ``--recipe``, the same for what a recipe's joint stages train: each stage's own mixture, rows and model (at
random weights), ``--steps`` micro-batches spread over its samples (its mix may move from ``mix`` to ``mix_end``),
each stage's times, tokens and FLOPs weighted by the rows it trains.

    python benchmarks/train_throughput.py [--steps 64] [--budget 2048] [--batch 16 | --padded-tokens N] [--accum 8]
                                          [--width 256] [--vision-width 128] [--ns-dtype bfloat16] [--tasks T,...]
                                          [--data FILE ...] [--device cuda] [--bf16 | --no-bf16]
    python benchmarks/train_throughput.py --recipe recipes/tiny.yaml [--steps 32] [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from arguments import at_least, parser

from kimivl import KimiVL, KimiVLConfig, KimiVLProcessor
from kimivl.data.formats import is_text_file, iter_records, iter_texts
from kimivl.data.mixture import Mixture
from kimivl.data.synthetic import TASKS
from kimivl.data.world import build_world, ensure_world
from kimivl.exits import run_command
from kimivl.kernels import training_attention
from kimivl.model.params import parameter_counts
from kimivl.precision import autocast, use_bf16
from kimivl.processing.processor import IGNORE_INDEX
from kimivl.processing.tokenizer import train_bpe
from kimivl.train.optim import build_optimizer
from kimivl.train.pipeline import Sources, base_checkpoint, base_config, recipe_tokenizer
from kimivl.train.recipe import load_recipe
from kimivl.train.stages.base import StageContext
from kimivl.train.stages.joint import JointStage, stage_mixture


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def padded(samples, pad_id):
    """One right-padded batch: (input_ids, labels, pixel_values, grids, real tokens)."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id)
    labels = torch.full((len(samples), width), IGNORE_INDEX)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    with_images = [s for s in samples if len(s.image_grid_hws)]
    pixels = torch.cat([s.pixel_values for s in with_images]) if with_images else None
    grids = torch.cat([s.image_grid_hws for s in with_images]) if with_images else None
    kwargs = {"input_ids": ids, "labels": labels, "pixel_values": pixels, "image_grid_hws": grids}
    return kwargs, sum(len(s.input_ids) for s in samples)


def by_tokens(samples, limit: int):
    """Consecutive samples grouped while (samples x the longest) stays within ``limit`` tokens."""
    groups, group, longest = [], [], 0
    for s in samples:
        n = len(s.input_ids)
        if group and (len(group) + 1) * max(longest, n) > limit:
            groups.append(group)
            group, longest = [], 0
        group.append(s)
        longest = max(longest, n)
    return groups + [group] if group else groups


def on(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def step_time(model, opt, kwargs, update: bool, bf16: bool) -> float:
    """One micro-batch forward and backward (its tensors moved to the model's device first); the optimiser steps
    when ``update``."""
    kwargs = on(kwargs, model.device)
    sync(model.device)
    start = time.perf_counter()
    with training_attention(), autocast(model.device, bf16):
        loss = model(**kwargs).loss
    loss.backward()
    if update:
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(model.device)
    return time.perf_counter() - start


def vision_time(model, kwargs, bf16: bool) -> float:
    """Forward and backward of the vision tower and projector alone on one micro-batch's images."""
    if kwargs["pixel_values"] is None:
        return 0.0
    kwargs = on(kwargs, model.device)
    sync(model.device)
    start = time.perf_counter()
    with autocast(model.device, bf16):
        features = model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_hws"])
    features.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    sync(model.device)
    return time.perf_counter() - start


def trainee(config, device: torch.device, bf16: bool, args):
    """The model both arms train (seeded initial weights) and its Muon/AdamW optimiser, Newton-Schulz in
    ``--ns-dtype`` or the compute dtype."""
    torch.manual_seed(0)
    model = KimiVL(config).to(device).train()
    return model, build_optimizer(model, lr=1e-4, ns_dtype=args.ns_dtype or ("bfloat16" if bf16 else "float32"))


@dataclass
class Arms:
    """Both arms' totals over timed cycles."""

    times: dict = field(default_factory=lambda: {"packed": 0.0, "padded": 0.0})
    tokens: dict = field(default_factory=lambda: {"packed": 0.0, "padded": 0.0})
    flops: dict = field(default_factory=lambda: {"packed": 0.0, "padded": 0.0})
    micro: dict = field(default_factory=lambda: {"packed": 0, "padded": 0})  # micro-batches timed
    shared: float = 0.0  # the vision tower's time on the same images, identical in both arms
    fills: list = field(default_factory=list)
    shares: list = field(default_factory=list)
    ratios: list = field(default_factory=list)  # per cycle

    def add(self, other: Arms, weight: float = 1.0) -> None:
        """Count ``other``'s times, tokens and FLOPs ``weight`` times (a stage's share of a recipe)."""
        for name in ("times", "tokens", "flops"):
            for arm in ("packed", "padded"):
                getattr(self, name)[arm] += weight * getattr(other, name)[arm]
        for arm in ("packed", "padded"):
            self.micro[arm] += other.micro[arm]
        self.shared += weight * other.shared
        self.fills += other.fills
        self.shares += other.shares
        self.ratios += other.ratios


def cycle(model, opt, mix, position: int, args, bf16: bool, pad_id: int, counts) -> tuple[Arms, int]:
    """``args.accum`` packed rows from sample ``position`` of ``mix``, then the same samples in padded batches, the
    optimiser stepping once in each arm, as in training with gradient accumulation (``counts``: the model's
    ``parameter_counts``, for its FLOPs). Returns the cycle's measurements and the sample position after it."""
    stream = mix.batches(position)
    rows = []
    for _ in range(args.accum):
        row, end = next(stream)
        rows.append(row)
    samples = [s for s, _ in map(mix.sample, range(position, end)) if s is not None and len(s.input_ids) <= mix.budget]
    batches = [
        padded(group, pad_id)
        for group in (
            by_tokens(samples, args.padded_tokens)
            if args.padded_tokens
            else [samples[i : i + args.batch] for i in range(0, len(samples), args.batch)]
        )
    ]
    packed_time = sum(step_time(model, opt, row.kwargs(), k == len(rows) - 1, bf16) for k, row in enumerate(rows))
    padded_time = sum(step_time(model, opt, kw, k == len(batches) - 1, bf16) for k, (kw, _) in enumerate(batches))
    config = model.config
    one = Arms(
        times={"packed": packed_time, "padded": padded_time},
        tokens={"packed": sum(row.n_tokens for row in rows), "padded": sum(real for _, real in batches)},
        micro={"packed": len(rows), "padded": len(batches)},
        shared=sum(vision_time(model, row.kwargs(), bf16) for row in rows),
        fills=[row.efficiency for row in rows],
        shares=[real / kw["input_ids"].numel() for kw, real in batches],
        ratios=[padded_time / packed_time],
    )  # the same samples in both arms
    one.flops["packed"] = sum(
        model_flops(
            config, counts, (row.cu_seqlens[1:] - row.cu_seqlens[:-1]).tolist(), scored(row.labels), row.image_grid_hws
        )
        for row in rows
    )
    one.flops["padded"] = sum(
        model_flops(
            config,
            counts,
            [kw["input_ids"].shape[1]] * kw["input_ids"].shape[0],
            scored(kw["labels"]),
            kw["image_grid_hws"],
        )
        for kw, _ in batches
    )
    return one, end


def model_flops(config, counts, lengths, scored, grids) -> float:
    """Forward-and-backward FLOPs of one micro-batch: 6 per matrix parameter per position (the LM's positions without
    its embedding table and head, the head's ``scored`` positions, the vision tower's patches without its position
    table, the projector's merged tokens), plus attention within each of the LM's sequences of ``lengths`` (causal)
    and within each image of ``grids``."""
    t, v = config.text_config, config.vision_config
    flops = 6 * (counts["language_model"].active - 2 * t.vocab_size * t.hidden_size) * sum(lengths)
    flops += 6 * t.vocab_size * t.hidden_size * scored
    head_dims = t.num_attention_heads * (t.qk_head_dim + t.v_head_dim)
    flops += 3 * t.num_hidden_layers * head_dims * sum(n * n for n in lengths)
    if grids is not None:
        patches = (grids[:, 0] * grids[:, 1]).tolist()
        table = v.init_pos_emb_height * v.init_pos_emb_width * v.hidden_size
        merge = v.merge_kernel_size[0] * v.merge_kernel_size[1]
        flops += 6 * (counts["vision_tower"].active - table) * sum(patches)
        flops += 12 * v.num_hidden_layers * v.hidden_size * sum(n * n for n in patches)
        flops += 6 * counts["multi_modal_projector"].active * sum(patches) // merge
    return flops


def scored(labels) -> int:
    """Positions whose next token is scored: the only ones that go through the LM head in training."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument(
        "--steps",
        type=at_least(1),
        default=64,
        help="packed micro-batches timed (whole cycles of --accum, after one warm-up cycle)",
    )
    ap.add_argument("--budget", type=at_least(1), default=2048)
    ap.add_argument("--batch", type=at_least(1), default=16)
    ap.add_argument(
        "--padded-tokens",
        type=at_least(1),
        help="instead of --batch samples, padded batches of as many samples (in order) as fit this many "
        "tokens with their padding (a max-tokens batch; --budget gives both arms equal rows; at least the rows' "
        "length, which a sample may fill)",
    )
    ap.add_argument("--width", type=at_least(1), default=256, help="LM hidden size (kimivl-tiny: 256)")
    ap.add_argument("--vision-width", type=at_least(1), default=128, help="vision tower hidden size (kimivl-tiny: 128)")
    ap.add_argument(
        "--accum", type=at_least(1), default=8, help="micro-batches per optimiser step (gradient accumulation)"
    )
    ap.add_argument(
        "--ns-dtype", choices=["bfloat16", "float32"], help="Muon's Newton-Schulz (default: the compute dtype)"
    )
    ap.add_argument(
        "--tasks",
        default=",".join(t for t in TASKS if t != "long"),
        help="the synthetic world's tasks to mix, each weighted 1 or TASK:WEIGHT (default: all but the "
        "long documents, which only recipes/tiny.yaml's long-context stage trains on; its mix: "
        "--budget 4096 --tasks text,interleaved,video,caption,long:0.15)",
    )
    ap.add_argument(
        "--data",
        nargs="+",
        type=Path,
        help="your own JSONL files (conversations or texts, equally weighted) instead of the synthetic "
        "world, to see what packing gives on their lengths",
    )
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=Path(__file__).parents[1] / "models" / "kimivl-tiny",
        help="checkpoint directory whose tokenizer encodes --data",
    )
    ap.add_argument("--device", default="cpu", help="where both arms train (cuda: flash-attn when installed)")
    ap.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast on or off (default: where the device multiplies bf16 fast)",
    )
    ap.add_argument(
        "--recipe",
        type=Path,
        help="instead: every joint stage of this recipe on its own data, rows and mix (--steps micro-"
        "batches each, spread over the stage), weighted by the stage's rows (builds the recipe's "
        "world under its out if it is not there)",
    )
    args = ap.parse_args()
    if args.padded_tokens is not None:  # a sample may fill a packed row: a batch of it alone must fit the limit
        stages = load_recipe(args.recipe).stages if args.recipe else []
        rows = max([s.budget for s in stages if isinstance(s, JointStage)], default=args.budget)
        if args.padded_tokens < rows:
            ap.error(f"--padded-tokens {args.padded_tokens}: must be >= {rows}, the packed rows' length")
    device = torch.device(args.device)
    bf16 = use_bf16(device, args.bf16)
    if args.recipe:
        recipe_arms(args, device, bf16)
        return

    with tempfile.TemporaryDirectory() as world:  # the synthetic world, removed at the end (its images load as read)
        files, weights = args.data, None
        if not files:
            weights = {t: float(w or 1) for t, _, w in (item.partition(":") for item in args.tasks.split(","))}
            build_world(world, seed=1, sizes={"train": 120}, tasks=list(weights), progress=False)
            files = [Path(world) / "train" / f"{task}.jsonl" for task in sorted(weights)]
        texts = {p.stem: is_text_file(p) for p in files}
        sources = {p.stem: list(iter_texts(p) if texts[p.stem] else iter_records(p)) for p in files}
        corpus = [t for name in sources if texts[name] for t in sources[name]]
        if not args.data and not corpus:
            ap.error("--tasks needs a text corpus (text or long) to train the benchmark's tokenizer on")
        processor = (
            KimiVLProcessor.from_pretrained(args.tokenizer)
            if args.data
            else KimiVLProcessor(train_bpe(corpus, vocab_size=1024))
        )

        def encode(name, item):
            return processor.encode_text(item) if texts[name] else processor.encode_for_training(item["messages"])

        config = KimiVLConfig.from_preset("kimivl-tiny")
        t, tokenizer = config.text_config, processor.tokenizer
        scale = args.width / t.hidden_size
        text = dataclasses.replace(
            t,
            hidden_size=args.width,
            intermediate_size=round(t.intermediate_size * scale),
            moe_intermediate_size=round(t.moe_intermediate_size * scale),
            vocab_size=tokenizer.n_ranks + 256,  # the tokenizer's, its special ids among them
            bos_token_id=tokenizer.bos_id,
            eos_token_id=[tokenizer.eos_id, tokenizer.im_end_id],
        )
        v = config.vision_config
        widen = args.vision_width / v.hidden_size
        vision = dataclasses.replace(
            v, hidden_size=args.vision_width, intermediate_size=round(v.intermediate_size * widen)
        )
        config = dataclasses.replace(
            config, text_config=text, vision_config=vision, media_placeholder_token_id=tokenizer.media_pad_id
        )
        model, opt = trainee(config, device, bf16, args)
        mix = Mixture(sources, encode, args.budget, weights or {k: 1 for k in sources}, seed=0)

        # Cycle 0 warms both arms up (and creates the optimiser state); the others alternate, timed.
        arms, position, counts = Arms(), 0, parameter_counts(config)
        for c in range(max(1, args.steps // args.accum) + 1):
            one, position = cycle(model, opt, mix, position, args, bf16, processor.tokenizer.pad_id, counts)
            if c:
                arms.add(one)
        data = ", ".join(map(str, args.data)) if args.data else f"the synthetic world ({args.tasks})"
        report(
            arms,
            device,
            bf16,
            args,
            f"on {data}: kimivl-tiny at LM width {args.width}, vision width "
            f"{args.vision_width} ({counts['total'].total / 1e6:.1f}M parameters), packed rows of "
            f"{args.budget}",
        )


def recipe_arms(args, device: torch.device, bf16: bool) -> None:
    """Every joint stage of ``args.recipe`` on its own data, rows and mix (``args.steps`` micro-batches spread over
    the stage's samples), weighted by the stage's rows; the recipe's model at random weights."""
    recipe = load_recipe(args.recipe)
    if recipe.world is not None:
        ensure_world(recipe.out / "world", progress=True, **recipe.world)
    sources = Sources(recipe, progress=True)
    processor = KimiVLProcessor(recipe_tokenizer(recipe, sources, base_checkpoint(recipe), save=False))
    config = base_config(recipe, processor.tokenizer)
    model, opt = trainee(config, device, bf16, args)
    encode, total, warm, counts = sources.encoder(processor), Arms(), False, parameter_counts(config)
    cycles = max(1, args.steps // args.accum)

    def run(mix, position: int) -> Arms:
        return cycle(model, opt, mix, position, args, bf16, processor.tokenizer.pad_id, counts)[0]

    ctx = StageContext(recipe, sources, processor)
    for stage in (s for s in recipe.stages if isinstance(s, JointStage)):
        mix, _ = stage_mixture(stage, ctx, encode)
        if not warm:
            run(mix, 0)
            warm = True
        arms = Arms()
        for k in range(cycles):  # spread over the stage, whose mix may move from mix to mix_end
            arms.add(run(mix, mix.horizon * k // cycles))
        total.add(arms, stage.steps * stage.accum / arms.micro["packed"])
        print(
            f"stage {stage.name} ({stage.steps * stage.accum} rows of {stage.budget}): packed / padded "
            f"{arms.times['padded'] / arms.times['packed']:.2f}x, model FLOPs "
            f"{arms.flops['padded'] / arms.flops['packed']:.2f}x",
            flush=True,
        )
    report(
        total,
        device,
        bf16,
        args,
        f"on the joint stages of {args.recipe}, each weighted by its rows: "
        f"{recipe.name} ({counts['total'].total / 1e6:.1f}M parameters)",
    )


def report(arms: Arms, device: torch.device, bf16: bool, args, heading: str) -> None:
    """Print both arms' useful tokens/s, their ratio beside the FLOP ratio, the vision tower's share, and the packed
    arm's achieved GFLOP/s against the matmul peak."""
    times, tokens, flops, shared = arms.times, arms.tokens, arms.flops, arms.shared
    assert abs(tokens["packed"] - tokens["padded"]) <= 1e-6 * tokens["packed"], "both arms train on the same samples"
    speed = {name: tokens[name] / times[name] for name in times}
    achieved = flops["packed"] / times["packed"] / 1e9
    compute = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_peak(device, compute)
    print(
        f"{heading}, {'bf16 autocast' if bf16 else 'float32'}, "
        + (f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device))
    )
    print(f"packed: {speed['packed']:.0f} useful tokens/s (budget filled {100 * statistics.mean(arms.fills):.0f}%)")
    shape = f"of at most {args.padded_tokens} tokens with padding" if args.padded_tokens else f"of {args.batch}"
    print(
        f"padded batches {shape}: {speed['padded']:.0f} useful tokens/s (real tokens "
        f"{100 * statistics.mean(arms.shares):.0f}%, {arms.micro['padded'] / arms.micro['packed']:.2f} batches per "
        "packed row)"
    )
    ratio, flop_ratio = speed["packed"] / speed["padded"], flops["padded"] / flops["packed"]
    print(
        f"ratio packed / padded: {ratio:.2f}x (target >= 1.5x); their model FLOPs: {flop_ratio:.2f}x (the ratio "
        "if every FLOP took the same time, the most packing can give on these samples): "
        f"{100 * ratio / flop_ratio:.0f}% of it"
    )
    print(
        f"per cycle of {args.accum} rows: {min(arms.ratios):.2f}x to {max(arms.ratios):.2f}x over "
        f"{len(arms.ratios)} cycles"
    )
    print(
        f"vision tower and projector, the same images in both arms: {100 * shared / times['packed']:.0f}% of the "
        f"packed arm's time; the rest (LM, loss, optimiser) runs "
        f"{(times['padded'] - shared) / (times['packed'] - shared):.2f}x faster packed"
    )
    print(
        f"achieved {achieved:.1f} GFLOP/s ({flops['packed'] / tokens['packed'] / 1e6:.1f} MFLOP/token) "
        f"vs {str(compute).removeprefix('torch.')} matmul peak {peak:.0f} GFLOP/s: "
        f"{100 * achieved / peak:.1f}% of peak"
    )


if __name__ == "__main__":
    sys.exit(run_command("train_throughput.py", main))
