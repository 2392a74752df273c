"""Expert parallelism on 2 and 4 gloo processes against one process computing every rank's tokens.

Each rank builds the same model from the same seed, feeds its own tokens and saves what it computed; the test
process computes all ranks' tokens at once with the whole model. Losses are sums over tokens (divided by a constant
that every rank knows), so the one-process gradient is the sum of the ranks' gradients: a rank's local expert
gradient must equal its slice of the one-process gradient (it already holds every rank's tokens for its experts),
replicated parameters' gradients summed over the ranks must equal the one-process gradient.

This file is also the worker: ``python test_expert_parallel.py RANK WORLD PORT OUTDIR``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from kimivl.config import KimiVLConfig
from kimivl.distributed.expert_parallel import apply_expert_parallel, expert_ranges
from kimivl.model.language_model import LanguageModel
from kimivl.model.moe import MoE

ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.25  # the "scaled" case's weight_grad_scale


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within float32 rounding: 1e-5 relative, and 1e-5 of the largest magnitude for entries near zero (sums
    taken in another order differ by that much there)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _text_config():
    cfg = KimiVLConfig.from_preset("tiny").text_config  # 8 experts, top 2, 2 groups of which 1 is kept
    assert cfg.n_routed_experts == 8 and cfg.n_group == 2 and cfg.topk_group == 1
    return cfg


def _moe(skewed: bool) -> MoE:
    """A tiny MoE layer; ``skewed`` biases the choice to experts 0-3 (group 0), so ranks holding experts 4-7
    receive no token."""
    torch.manual_seed(0)
    moe = MoE(_text_config())
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
        if skewed:
            moe.gate.e_score_correction_bias[:4] += 10.0
    return moe


def _moe_inputs(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each rank's (tokens, upstream gradient): uneven token counts 6, 11, 16, ..."""
    g = torch.Generator().manual_seed(1)
    d = _text_config().hidden_size
    return [(torch.randn(6 + 5 * r, d, generator=g), torch.randn(6 + 5 * r, d, generator=g)) for r in range(world)]


def _lm() -> LanguageModel:
    torch.manual_seed(0)
    lm = LanguageModel(_text_config())
    with torch.no_grad():
        for p in lm.parameters():
            p.normal_(0, 0.05)
        for layer in lm.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    lm.recompute = True  # layers run again in backward: the exchanges are repeated there, in the same order
    return lm


def _lm_ids(world: int) -> torch.Tensor:
    """(world, 2, 9) token ids: rank r trains rows [r]."""
    return torch.randint(0, _text_config().vocab_size, (world, 2, 9), generator=torch.Generator().manual_seed(2))


def _lm_loss(lm: LanguageModel, ids: torch.Tensor, n_all: int) -> torch.Tensor:
    """Next-token cross entropy summed over ``ids`` and divided by ``n_all``, the predicted tokens of all ranks."""
    logits = lm.logits(lm(lm.model.embed_tokens(ids)))
    targets = ids[:, 1:].flatten()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets, reduction="sum") / n_all


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    group = torch.distributed.group.WORLD
    results = {}
    for case in ("moe", "skewed", "autocast", "scaled"):
        moe = _moe(case == "skewed")
        apply_expert_parallel(moe, group, weight_grad_scale=SCALE if case == "scaled" else 1.0)
        x, upstream = _moe_inputs(world)[rank]
        x.requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
            y = moe(x)
        (y * upstream).sum().backward()
        results[case] = dict(
            y=y.detach(),
            x_grad=x.grad,
            router_grad=moe.gate.weight.grad,
            shared_grad=moe.shared_experts.down_proj.weight.grad,
            gate_up=moe.experts.gate_up_proj.detach(),
            gate_up_grad=moe.experts.gate_up_proj.grad,
            down_grad=moe.experts.down_proj.grad,
            ranges=expert_ranges(moe),
            keys=sorted(moe.state_dict()),
        )
    if world == 2:
        lm = _lm()
        apply_expert_parallel(lm, group)
        ids = _lm_ids(world)
        loss = _lm_loss(lm, ids[rank], ids[:, :, 1:].numel())
        loss.backward()
        results["lm"] = dict(loss=loss.detach(), grads={n: p.grad for n, p in lm.named_parameters()})
        sharded = fully_shard(_moe(False), mesh=init_device_mesh("cpu", (world,)))
        try:
            apply_expert_parallel(sharded, group)
        except ValueError as e:
            results["fsdp_first"] = str(e)
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, out: Path) -> list[dict]:
    """``world`` worker processes on 127.0.0.1; a hang fails after 240 s instead of blocking the suite."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    logs = [out / f"rank{r}.log" for r in range(world)]
    procs = []
    for r, log in enumerate(logs):  # output to files: a pipe nobody reads yet could fill and block a rank
        with log.open("w") as f:
            cmd = [sys.executable, __file__, str(r), str(world), str(port), str(out)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{log.read_text()}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(2, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _launch(4, tmp_path_factory.mktemp("ep4"))


def _moe_reference(skewed: bool, world: int, autocast: bool = False):
    moe = _moe(skewed)
    inputs = _moe_inputs(world)
    x = torch.cat([x for x, _ in inputs]).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = moe(x)
    (y * torch.cat([u for _, u in inputs])).sum().backward()
    _, idx, _ = moe.gate(x)
    return moe, x, y.detach(), idx


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["moe", "skewed"])
def test_expert_parallel_moe_equals_one_process(request, world, case):
    results = request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[world])
    moe, x, y, idx = _moe_reference(case == "skewed", world)
    local = 8 // world
    if case == "skewed":  # the ranks that hold experts 4-7 receive no token
        assert int(idx.min()) == 0 and int(idx.max()) <= 3
    else:
        assert torch.bincount(idx.flatten() // local, minlength=world).min() > 0
    sizes = [6 + 5 * r for r in range(world)]
    for r, (res, y_r, xg_r) in enumerate(zip(results, y.split(sizes), x.grad.split(sizes))):
        got = results[r][case]
        close(got["y"], y_r)
        close(got["x_grad"], xg_r)
        lo, hi = r * local, (r + 1) * local
        assert got["ranges"] == {"experts": range(lo, hi)}
        torch.testing.assert_close(got["gate_up"], moe.experts.gate_up_proj.detach()[lo:hi], rtol=0, atol=0)
        close(got["gate_up_grad"], moe.experts.gate_up_proj.grad[lo:hi])
        close(got["down_grad"], moe.experts.down_proj.grad[lo:hi])
        if case == "skewed" and lo >= 4:
            assert not got["gate_up_grad"].any() and not got["down_grad"].any()
        else:
            assert got["down_grad"].flatten(1).abs().sum(1).gt(0).all()  # every local expert got tokens
        experts = {k for k in got["keys"] if k.startswith("experts.")}
        assert experts == {f"experts.{e}.{p}_proj.weight" for e in range(lo, hi) for p in ("gate", "up", "down")}
    for name, param in (("router_grad", moe.gate.weight), ("shared_grad", moe.shared_experts.down_proj.weight)):
        close(sum(res[case][name] for res in results), param.grad)


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_under_bf16_autocast_computes_what_one_process_does(request, world):
    """The received rows go through the same bf16 grouped matmuls as in one process, the weight scaling the hidden
    activation, the outputs summed in float32."""
    results = request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[world])
    moe, x, y, _ = _moe_reference(False, world, autocast=True)
    assert y.dtype == torch.float32
    local = 8 // world
    sizes = [6 + 5 * r for r in range(world)]
    for r, (y_r, xg_r) in enumerate(zip(y.split(sizes), x.grad.split(sizes))):
        got = results[r]["autocast"]
        close(got["y"], y_r)
        close(got["x_grad"], xg_r)
        close(got["gate_up_grad"], moe.experts.gate_up_proj.grad[r * local : (r + 1) * local])
    # the router's bf16 matmul rounds each rank's sum over its tokens to bf16, one process rounds the sum over all:
    # data parallelism, not the exchange, makes these differ by bf16 rounding
    want = moe.gate.weight.grad
    torch.testing.assert_close(
        sum(res["autocast"]["router_grad"] for res in results), want, rtol=1e-2, atol=1e-2 * float(want.abs().max())
    )


@pytest.mark.parametrize("world", [2, 4])
def test_weight_grad_scale_scales_only_the_local_experts_weight_gradients(request, world):
    """``weight_grad_scale`` (``parallelize`` passes 1/ep): the outputs and every other gradient as without it."""
    results = request.getfixturevalue({2: "two_ranks", 4: "four_ranks"}[world])
    for res in results:
        got, plain = res["scaled"], res["moe"]
        for key in ("y", "x_grad", "router_grad", "shared_grad"):
            close(got[key], plain[key])
        for key in ("gate_up_grad", "down_grad"):
            close(got[key], SCALE * plain[key])


def test_expert_parallel_language_model_equals_one_process(two_ranks):
    """Every MoE layer of a whole decoder split over 2 ranks, with recompute on: the loss and every gradient."""
    world, results = 2, two_ranks
    lm = _lm()
    ids = _lm_ids(world)
    loss = _lm_loss(lm, ids.flatten(0, 1), ids[:, :, 1:].numel())
    loss.backward()
    close(sum(res["lm"]["loss"] for res in results), loss.detach())
    n_moe = 0
    for name, p in lm.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            n_moe += 1
            for r, res in enumerate(results):
                close(res["lm"]["grads"][name], p.grad[r * 4 : (r + 1) * 4])
        else:
            close(sum(res["lm"]["grads"][name] for res in results), p.grad)
    assert n_moe == 2 * (len(lm.model.layers) - 1)


def test_expert_parallel_comes_before_fsdp(two_ranks):
    for res in two_ranks:
        assert res["fsdp_first"] == "experts is already sharded (FSDP): apply expert parallelism before fully_shard"


class _Group:
    """The size and rank of a process group: all that splitting the parameters reads (no exchange runs here)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_a_group_size_that_does_not_divide_the_experts_is_refused():
    moe = _moe(False)
    before = moe.experts.gate_up_proj
    with pytest.raises(ValueError, match="8 routed experts, which 3 expert-parallel ranks cannot split evenly"):
        apply_expert_parallel(moe, _Group(3, 0))
    assert moe.experts.gate_up_proj is before and moe.experts.n_experts == 8  # nothing changed
    apply_expert_parallel(moe, _Group(4, 1))
    with pytest.raises(ValueError, match="already applied to experts"):
        apply_expert_parallel(moe, _Group(4, 1))
    with pytest.raises(ValueError, match="no MoE layer"):
        apply_expert_parallel(torch.nn.Linear(2, 2), _Group(2, 0))


def test_a_rank_saves_and_loads_its_experts_under_their_official_global_names():
    full = _moe(False)
    official = full.state_dict()
    moe = _moe(False)
    apply_expert_parallel(moe, _Group(4, 2))
    assert moe.experts.gate_up_proj.shape == (2, 128, 128) and moe.experts.down_proj.shape == (2, 128, 64)
    assert moe.experts.expert_offset == 4 and moe.experts.n_experts == 2
    mine = moe.state_dict()
    assert {k for k in mine if k.startswith("experts.")} == {
        f"experts.{e}.{p}_proj.weight" for e in (4, 5) for p in ("gate", "up", "down")
    }
    for k, v in mine.items():
        assert torch.equal(v, official[k]), k
    with torch.no_grad():
        moe.experts.gate_up_proj.zero_()
        moe.experts.down_proj.zero_()
    own = {k: v for k, v in official.items() if not k.startswith("experts.") or int(k.split(".")[1]) in (4, 5)}
    moe.load_state_dict(own)  # strict: exactly this rank's experts
    assert torch.equal(moe.experts.gate_up_proj, full.experts.gate_up_proj[4:6])
    assert torch.equal(moe.experts.down_proj, full.experts.down_proj[4:6])
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*experts\.0\.gate_proj\.weight"):
        moe.load_state_dict(official)


def test_experts_frozen_before_the_split_stay_frozen():
    """A stage freezes (``freeze``) before it parallelizes: each rank's share of frozen experts must stay frozen."""
    moe = _moe(False)
    moe.experts.requires_grad_(False)
    apply_expert_parallel(moe, _Group(2, 1))
    assert not moe.experts.gate_up_proj.requires_grad and not moe.experts.down_proj.requires_grad
    assert moe.gate.weight.requires_grad


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
