"""The RL update on fixed answers, for the distributed tests: one process updates on all of them, a sharded run on
its ranks' shares (answer i on rank i mod size, of different lengths, so the ranks pack different numbers of rows).
Writes the updated weights (gathered) to ``--weights``.

python tests/distributed/rl_worker.py --out DIR --weights FILE [--objective opmd|grpo] [--images]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_worker import (
    CORPUS,  # noqa: E402
    build,  # noqa: E402
    images,  # noqa: E402
)

from kimivl.distributed.gather import gathered_tensors  # noqa: E402
from kimivl.distributed.parallelize import gathered, parallelize  # noqa: E402
from kimivl.distributed.world import close_world, init_world  # noqa: E402
from kimivl.processing.processor import KimiVLProcessor  # noqa: E402
from kimivl.processing.tokenizer import train_bpe  # noqa: E402
from kimivl.rl.rollouts import token_logprobs  # noqa: E402
from kimivl.rl.trainer import RLConfig, RLTrainer, _images  # noqa: E402
from kimivl.train.optim import build_optimizer  # noqa: E402
from kimivl.train.schedule import WarmupCosine, scheduler_at  # noqa: E402

ANSWERS = 8


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--objective", default="opmd")
    ap.add_argument("--images", action="store_true", help="even answers' prompts hold an image (rank 0's, of 2)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    world = init_world(None, "cpu")
    try:
        model, _ = build(args.out)
        processor = KimiVLProcessor(train_bpe(CORPUS, vocab_size=280))
        if world.active:
            parallelize(model, world)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 250, (5 + i % 3,), generator=g).tolist() for i in range(ANSWERS)]
        responses = [torch.randint(0, 250, (3 + 5 * i,), generator=g).tolist() for i in range(ANSWERS)]
        advantage = torch.randn(ANSWERS, generator=g)
        encoded = [processor.encode([{"role": "user", "content": "q"}])] * ANSWERS
        if args.images:
            chat = [{"role": "user", "content": [{"type": "image", "image": images(args.out)[0]}]}]
            encoded[::2] = [processor.encode(chat)] * len(encoded[::2])
            prompts[::2] = [e.input_ids for e in encoded[::2]]
        mine = list(range(world.rank, ANSWERS, world.size))
        prompts, responses, advantage = [prompts[i] for i in mine], [responses[i] for i in mine], advantage[mine]
        encoded = [encoded[i] for i in mine]
        cfg = RLConfig(
            iterations=1, problems=world.size, samples=2, updates=1, budget=48, objective=args.objective, bf16=False
        )
        optimizer = build_optimizer(model, lr=1e-3)
        problems = [{"messages": [{"role": "user", "content": "q"}], "meta": {"gold": "1"}}] * world.size
        trainer = RLTrainer(
            model,
            processor,
            problems,
            cfg,
            optimizer,
            scheduler_at(optimizer, WarmupCosine(0, 4)),
            args.out,
            world=world,
        )
        with gathered(model) if world.active else torch.no_grad(), torch.no_grad():
            ref_tokens = token_logprobs(model, prompts, responses, *_images(encoded), cfg.budget)
        ref_seq = torch.stack([t.sum() + 0.1 for t in ref_tokens])  # pi_i a little off, so the loss is not flat
        trainer._update(torch.arange(len(mine)), prompts, responses, encoded, ref_tokens, ref_seq, advantage)
        if world.active:
            state = dict(gathered_tensors(model, world))  # whole on rank 0, which saves it
        else:
            state = {k: v.detach().clone() for k, v in itertools.chain(model.named_parameters(), model.named_buffers())}
        if world.main:
            torch.save(state, args.weights)
    finally:
        close_world(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
