"""One training run of the tiny model on image and text rows, for the distributed tests: launched by torchrun (a
sharded run) or as a plain process (the one-process reference). Writes metrics under ``--out`` and, with
``--weights FILE``, the final weights (gathered by rank 0).

python tests/distributed/train_worker.py --out DIR --steps 4 [--resume] [--die-at STEP] [--weights FILE] [--alternate]
    [--rows PATTERN] [--train PART ...] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import numpy as np
import torch
from PIL import Image

from kimivl import KimiVL, KimiVLConfig, KimiVLProcessor
from kimivl.data.mixture import Mixture
from kimivl.distributed.gather import gathered_tensors, save_gathered
from kimivl.distributed.load import load_sharded_checkpoint, local_rows
from kimivl.distributed.parallelize import parallelize
from kimivl.distributed.world import close_world, init_world
from kimivl.processing.tokenizer import train_bpe
from kimivl.train.loop import LoopConfig, train_loop
from kimivl.train.optim import build_optimizer
from kimivl.train.schedule import WarmupCosine, scheduler_at
from kimivl.train.trainable import set_trainable

CORPUS = ["What colour is the square? It is red.", "Count the circles: there are 3 circles and 2 squares."] * 5


def images(folder: str) -> list[str]:
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 180, 30), (30, 30, 220)]):
        path = os.path.join(folder, f"image{i}.png")
        if not os.path.exists(path):
            pixels = np.zeros((56, 84, 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
            pixels[10 + 5 * i : 30, 20:40] = 255
            Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class Alternating:
    """Rows of images (``i`` in ``pattern``) and rows of text (``t``) in the pattern's order, repeated; by default in
    turn (under 2 ranks, rank 0 trains image rows only, rank 1 text rows)."""

    def __init__(self, images: Mixture, text: Mixture, pattern: str = "it", rows: int = 64):
        drawn = {"i": images.batches(0), "t": text.batches(0)}
        self.rows = [next(drawn[kind])[0] for kind in itertools.islice(itertools.cycle(pattern), rows)]

    def batches(self, position: int):
        for i in range(position, len(self.rows)):
            yield self.rows[i], i + 1


def build(folder: str, pattern: str | None = None) -> tuple:
    processor = KimiVLProcessor(train_bpe(CORPUS, vocab_size=280))
    base = KimiVLConfig.from_preset("tiny")
    n = processor.tokenizer.n_ranks
    # odd sizes: FSDP splits the vocabulary rows and the dense MLP's rows unevenly, as torch.chunk does
    text = dataclasses.replace(
        base.text_config, vocab_size=n + 257, intermediate_size=255, bos_token_id=n, eos_token_id=[n + 1, n + 2]
    )
    config = dataclasses.replace(base, text_config=text, media_placeholder_token_id=processor.tokenizer.media_pad_id)
    torch.manual_seed(0)
    model = KimiVL(config)
    chats = [
        [
            {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": f"It is colour {i}."},
        ]
        for i, path in enumerate(images(folder))
    ]

    def encode(kind, item):
        return processor.encode_text(item) if kind == "text" else processor.encode_for_training(item)

    if pattern:
        kinds = (("chat", chats), ("text", CORPUS))
        mixtures = [Mixture({k: v}, encode, budget=160, start={k: 1}, seed=1) for k, v in kinds]
        return model, Alternating(*mixtures, pattern)
    data = Mixture({"chat": chats, "text": CORPUS}, encode, budget=160, start={"chat": 2, "text": 1}, seed=1)
    return model, data


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--die-at", type=int, help="rank 1 exits abruptly while drawing this step's rows")
    ap.add_argument("--weights", help="write the final weights (whole) here")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    ap.add_argument("--alternate", action="store_true", help="image rows and text rows in turn (see Alternating)")
    ap.add_argument("--rows", help="image (i) and text (t) rows in this order, repeated (--alternate: it)")
    ap.add_argument("--train", nargs="+", help="the parts trained (set_trainable); all by default")
    ap.add_argument("--ep", type=int)
    ap.add_argument("--replicate", type=int, help="dp_replicate: weight copies (one per node)")
    ap.add_argument("--load", help="no training: read this official checkpoint into the sharded model ...")
    ap.add_argument("--init", type=int, help="no training: fresh weights of this seed drawn shard by shard ...")
    ap.add_argument("--export", help="... and write it back, gathered, in the official format here")
    ap.add_argument("--timeout", type=int, help="parallel.timeout: seconds a collective waits (a mismatch fails then)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    layout = (("ep", args.ep), ("dp_replicate", args.replicate), ("timeout", args.timeout))
    parallel = {k: v for k, v in layout if v} or None
    world = init_world(parallel, args.device)
    try:
        model, data = build(args.out, args.rows or ("it" if args.alternate else None))
        if args.train:
            set_trainable(model, args.train)
        model = model.to(world.device if world.active else args.device)
        loss_fn = _loss
        if args.die_at is not None and world.rank == 1:
            calls = iter(range(10**6))
            per_step = args.accum // world.size

            def loss_fn(model, batch):
                if next(calls) == (args.die_at - 1) * per_step:
                    os._exit(9)  # mid-step, before its backward
                return _loss(model, batch)

        if world.active:
            parallelize(model, world)
        if args.load:
            for t in model.parameters():
                torch.nn.init.zeros_(t.to_local())
            load_sharded_checkpoint(model, args.load, world)
            save_gathered(model, args.export, world, dtype=torch.bfloat16, max_shard_bytes=2**20)  # several files
            return 0
        if args.init is not None:
            model.init_weights(args.init, shard=local_rows)
            save_gathered(model, args.export, world, max_shard_bytes=2**20)
            return 0
        optimizer = build_optimizer(model, lr=3e-3)
        scheduler = scheduler_at(optimizer, WarmupCosine(2, 8))
        cfg = LoopConfig(steps=args.steps, ckpt_every=2, log_every=1, bf16=False, accum=args.accum)
        train_loop(
            model,
            loss_fn,
            data,
            optimizer,
            scheduler,
            cfg,
            args.out,
            "s",
            resume=args.resume,
            progress=False,
            world=world,
        )
        if world.active:
            state = dict(gathered_tensors(model, world))  # whole on rank 0, which saves it
        else:
            state = {k: v.detach().clone() for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
        if args.weights and world.main:
            torch.save(state, args.weights)
    finally:
        close_world(world)
    return 0


def _loss(model, batch):
    out = model(**batch.kwargs())
    return out.loss, {"efficiency": batch.efficiency}, batch.n_tokens


if __name__ == "__main__":
    sys.exit(main())
