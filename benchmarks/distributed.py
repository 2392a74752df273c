"""What sharding costs and saves on this machine: one training run on 1 and on 2 ranks (torchrun, gloo, loopback)
over the same global batch, a mid-size MoE on random tokens. Per rank: the peak memory the run adds (resident set,
from before the weights are allocated to the end of the last step) against ``kimivl.distributed.plan``'s figures;
and tokens/s of the whole run (the CPU's cores are split evenly between the ranks).

    python benchmarks/distributed.py [--steps 6] [--rows 4] [--budget 1024] [--hidden 512] [--layers 4] [--bf16 on|off]

Each rank count runs twice. The plan counts the tensors alive at once, which the resident set shows only when freed
memory goes back to the system: the first run fixes glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``, so every
large tensor is mapped and unmapped) and gives the peak compared with the plan. The second runs with the default
allocator, whose peak adds its slack (freed memory kept in the heap), and gives tokens/s (mapping every tensor anew
costs about a third of the speed).

A rank's model is built on the meta device, sharded, then allocated (no rank ever holds it whole), as a sharded load
of an official checkpoint does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import at_least, parser
from children import exit_on_sigterm, run

from kimivl import KimiVL, KimiVLConfig
from kimivl.exits import run_command

ROOT = Path(__file__).resolve().parents[1]


def config(args) -> KimiVLConfig:
    base = KimiVLConfig.from_preset("tiny")
    text = dataclasses.replace(
        base.text_config,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=None,
        kv_lora_rank=args.hidden // 4,
        vocab_size=8192,
    )
    return dataclasses.replace(base, text_config=text)


def rank_main(args) -> None:
    """One rank of a run: build, shard, allocate, train; rank 0 writes the results as JSON to ``args.result``."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rss import PeakRise

    from kimivl.distributed.load import local_rows
    from kimivl.distributed.parallelize import parallelize
    from kimivl.distributed.plan import rank_memory_plan
    from kimivl.distributed.world import close_world, init_world
    from kimivl.precision import autocast
    from kimivl.train.optim import build_optimizer
    from kimivl.train.step import optimizer_step

    world = init_world(None, "cpu")
    cfg = config(args)
    with torch.device("meta"):
        model = KimiVL(cfg)
    bf16 = args.bf16 == "on"
    plan = rank_memory_plan(
        model,
        world.dp_shard,
        1,
        tokens=args.budget,  # one row of --budget tokens goes forward and backward at a time
        compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        recompute=False,
    )
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 8192, (1, args.budget), generator=g) for _ in range(args.rows * (args.steps + 1))]
    with PeakRise() as rise:
        parallelize(model, world)
        model.to_empty(device="cpu")
        model.init_weights(0, shard=local_rows)  # each rank draws its own rows of one process's fresh weights
        optimizer = build_optimizer(model, lr=1e-3)
        mine = [rows[i] for i in range(world.rank, len(rows), world.size)]
        per_step = args.rows // world.size
        start = None
        for step in range(args.steps + 1):  # the first step is an untimed warm-up
            if step == 1:
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            for ids in mine[step * per_step : (step + 1) * per_step]:
                with autocast("cpu", bf16):
                    loss = model(ids, labels=ids).loss
                (loss / per_step).backward()
            optimizer_step(model, optimizer, 1.0, "benchmark", lambda ok: "", world)
        seconds = time.perf_counter() - start
    if world.main:
        Path(args.result).write_text(
            json.dumps(
                {
                    "ranks": world.size,
                    "peak": rise.bytes,
                    "exact": rise.exact,
                    "plan": dataclasses.asdict(plan) | {"total": plan.total},
                    "tokens_per_s": args.steps * args.rows * args.budget / seconds,
                }
            ),
            encoding="utf-8",
        )
    close_world(world)


def launch(args, ranks: int, result: Path, live: bool) -> dict:
    """One run on ``ranks`` ranks; ``live``: with glibc's mmap threshold fixed, so the peak is the live tensors'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if live:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        __file__,
        "--rank-main",
        "--result",
        str(result),
        *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("rank_main", "result")],
    ]
    run(cmd, timeout=1800, env=env)  # cut short, torchrun gets SIGTERM (not SIGKILL) and stops its ranks
    return json.loads(result.read_text(encoding="utf-8"))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=at_least(1), default=6, help="timed steps")
    ap.add_argument("--rows", type=int, default=4, help="rows of --budget tokens per step, over all ranks")
    ap.add_argument("--budget", type=at_least(1), default=1024)
    ap.add_argument("--hidden", type=at_least(4), default=512, help="LM hidden size (the latent is a quarter of it)")
    ap.add_argument("--layers", type=at_least(1), default=4)
    ap.add_argument("--bf16", choices=("on", "off"), help="bf16 autocast (default: where this CPU multiplies it fast)")
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rows < 2 or args.rows % 2:
        ap.error(f"--rows {args.rows}: must be a positive even number, so that 1 and 2 ranks do the same work")
    if args.rank_main:
        rank_main(args)
        return
    exit_on_sigterm()  # SIGTERM to this process alone stops torchrun and its ranks and removes the temporary folder
    load = os.getloadavg()[0]
    if args.bf16 is None:  # decided once, so that both runs compute alike
        from kimivl.precision import use_bf16

        args.bf16 = "on" if use_bf16("cpu", None) else "off"
    with tempfile.TemporaryDirectory() as work:
        runs = [
            (launch(args, n, Path(work) / f"{n}-live.json", True), launch(args, n, Path(work) / f"{n}.json", False))
            for n in (1, 2)
        ]
    mib = 2**20
    print(f"load average before: {load:.1f} on {os.cpu_count()} cores; bf16 autocast {args.bf16}")
    print("ranks  live peak MiB  plan MiB (w+g+opt+gathered+act)  peak/plan  default-allocator peak MiB  tokens/s")
    for live, default in runs:
        p = live["plan"]
        parts = "+".join(f"{p[k] / mib:.0f}" for k in ("weights", "gradients", "optimizer", "gathered", "activations"))
        print(
            f"{live['ranks']:>5}  {live['peak'] / mib:>13.0f}  {p['total'] / mib:>8.0f} ({parts})  "
            f"{live['peak'] / p['total']:>9.2f}  {default['peak'] / mib:>10.0f} (x{default['peak'] / live['peak']:.2f})"
            f"  {default['tokens_per_s']:>17.0f}"
        )
    (live1, default1), (live2, default2) = runs
    print(
        f"2 ranks against 1: live memory per rank x{live2['peak'] / live1['peak']:.2f}, "
        f"tokens/s x{default2['tokens_per_s'] / default1['tokens_per_s']:.2f}"
    )


if __name__ == "__main__":
    sys.exit(run_command("distributed.py", main))
