"""The processes of a run and how they split the work: ``parallel: {dp_shard: N, ep: M, dp_replicate: R}``.

Every rank trains its own rows. R groups of N ranks each hold one copy of the weights, sharded over the group's N
ranks (FSDP2; R > 1 is hybrid sharding, e.g. one group per node); within a group, M ranks (M divides N) split each
MoE layer's routed experts. The world size must be N x R. Ranks lie on the mesh in the order
(``dp_replicate``, ``dp_shard_mod_ep``, ``ep``), so the M ranks of an expert group are neighbours (one node).

A run launched without torchrun, and without ``parallel``, is one process exactly as before (``World()``).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kimivl.train.recipe import RecipeError, check_parallel

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 600  # seconds a collective waits for a dead or stuck rank before the job ends with an error


@dataclass
class World:
    """This process's place in the run. ``World()`` is one process, no torch.distributed."""

    rank: int = 0
    size: int = 1
    dp_shard: int = 1
    ep: int = 1
    dp_replicate: int = 1
    device: str = "cpu"
    mesh: Any = None  # DeviceMesh (dp_replicate, dp_shard)
    ep_mesh: Any = None  # the same ranks as (dp_replicate, dp_shard_mod_ep, ep)
    waits: Any = None  # a gloo group without the collective timeout, for ``wait_for_main``

    @property
    def active(self) -> bool:
        """Whether torch.distributed runs (even on one rank: the sharded code path)."""
        return self.mesh is not None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes logs, metrics, plots and progress."""
        return self.rank == 0

    def fsdp_mesh(self):
        """The mesh the non-expert weights shard over: ``dp_shard`` (1-D), or (``dp_replicate``, ``dp_shard``)."""
        return self.mesh["dp_shard"] if self.dp_replicate == 1 else self.mesh

    def expert_fsdp_mesh(self):
        """The mesh an expert group's local experts shard over (the ranks holding the same experts)."""
        if self.dp_replicate == 1:
            return self.ep_mesh["dp_shard_mod_ep"]
        return self.ep_mesh["dp_replicate", "dp_shard_mod_ep"]

    def ep_group(self):
        return self.ep_mesh["ep"].get_group()

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert group."""
        return self.ep_mesh["ep"].get_local_rank() if self.active else 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place (sum over every rank); returns it."""
        if self.active:
            dist.all_reduce(t)
        return t

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, holding no tensors), in rank order; ``[obj]`` in one process. Tensors are
        refused: torch pickles one with its device, so a GPU tensor would arrive on the sending rank's device (or fail
        to load where that device is not visible): send ``.tolist()`` instead."""
        _PlainPickler(io.BytesIO()).dump(obj)
        if not self.active:
            return [obj]
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, obj)
        return every

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wait_for_main(self, outcome: Any = None) -> Any:
        """A barrier while rank 0 works alone (writing a stage's checkpoint, the export), which may outlast the
        collective timeout: over a group of its own that waits as long as it takes (a rank that fails ends the job
        through torchrun). Rank 0's ``outcome`` (a plain object: what its work came to) is returned on every rank."""
        if not self.active:
            return outcome
        box = [outcome]
        dist.broadcast_object_list(box, src=0, group=self.waits)
        return box[0]


class _PlainPickler(pickle.Pickler):
    """Pickles what ``World.gather`` sends, refusing tensors."""

    def persistent_id(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            raise TypeError(f"World.gather sends no tensors (got one of shape {tuple(obj.shape)}): send .tolist()")
        return None


@contextlib.contextmanager
def main_first(world: World, lock: Path) -> Iterator[bool]:
    """Rank 0 runs the block first (building data, training a tokenizer, evaluating), holding the file ``lock``; the
    other ranks wait for the lock, not in a collective (the work may outlast the process-group timeout), then run the
    block themselves (to read what rank 0 wrote). Yields whether this is rank 0. One process: just the block."""
    if not world.active:
        yield True
        return
    import fcntl  # not at import: a platform without it (Windows) still imports the trainer, eval and RL

    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no writing: another user's lock file serves
    try:
        if world.main:
            fcntl.flock(fd, fcntl.LOCK_EX)
        world.barrier()  # rank 0 holds the lock before anyone waits for it
        if not world.main:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield world.main
    finally:
        os.close(fd)


def max_over_ranks(n: int, world: World) -> int:
    """The largest ``n`` of any rank."""
    t = torch.tensor(n, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _launch_variables() -> tuple[int, int, int]:
    """WORLD_SIZE, RANK and LOCAL_RANK (0 when unset) as torchrun sets them; one of them, LOCAL_WORLD_SIZE or
    MASTER_PORT set to anything else is a ``RecipeError`` naming it, its value and what it must be."""
    size = _variable("WORLD_SIZE", "the number of processes, an integer >= 1", 1)
    rank = _variable("RANK", f"this process's rank, an integer from 0 to WORLD_SIZE - 1 ({size - 1})", 0, size - 1)
    local = _variable("LOCAL_RANK", "this process's rank on its machine, an integer >= 0", 0)
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun's processes on this machine; cuda:LOCAL_RANK must be one of them
        machine = _variable(
            "LOCAL_WORLD_SIZE", f"the number of processes on this machine, from 1 to WORLD_SIZE ({size})", 1, size
        )
        _variable(
            "LOCAL_RANK",
            f"this process's rank on its machine, an integer from 0 to LOCAL_WORLD_SIZE - 1 ({machine - 1})",
            0,
            machine - 1,
        )
    if "MASTER_PORT" in os.environ:  # read by torch's rendezvous, whose error names no variable
        _variable("MASTER_PORT", "the rendezvous port, an integer from 1 to 65535", 1, 65535)
    return size, rank, local


def _variable(name: str, what: str, least: int, most: int | None = None) -> int:
    """The integer, ``what``, from ``least`` to ``most``, in the environment variable ``name`` (``least`` unset)."""
    value = os.environ.get(name, str(least))
    if not (value.isascii() and value.isdigit() and least <= int(value) <= (int(value) if most is None else most)):
        raise RecipeError(
            f"the environment variable {name}={value!r} must be {what}: torchrun sets it; to run one process, "
            "launch without torchrun and with neither WORLD_SIZE nor RANK set"
        )
    return int(value)


def init_world(parallel: dict | None, device: str) -> World:
    """Join the process group torchrun set up and lay out the mesh; ``World()`` when not launched by torchrun and
    ``parallel`` asks for one process. A layout that does not fit the world is a ``RecipeError`` naming both, and a
    launch variable unlike torchrun's one naming it, before anything runs."""
    parallel = dict(parallel or {})
    check_parallel(parallel)
    size, rank, local = _launch_variables() if launched() else (1, 0, 0)
    replicate = parallel.get("dp_replicate") or 1
    shard = parallel.get("dp_shard") or size // replicate
    ep = parallel.get("ep") or 1
    if shard * replicate != size:
        how = "launch with torchrun --nproc-per-node N" if not launched() else "change parallel or the launch"
        raise RecipeError(
            f"parallel asks for dp_shard {shard} x dp_replicate {replicate} = {shard * replicate} ranks, but the "
            f"world has {size} (WORLD_SIZE): {how}"
        )
    if shard % ep:
        raise RecipeError(f"parallel.ep ({ep}) must divide dp_shard ({shard}): expert groups lie within a shard group")
    if not launched():
        return World()
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    timeout = datetime.timedelta(seconds=parallel.get("timeout") or DEFAULT_TIMEOUT)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(kind, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    ep_mesh = mesh._unflatten("dp_shard", (shard // ep, ep), ("dp_shard_mod_ep", "ep"))
    log.info(
        "rank %d of %d on %s: dp_shard %d, ep %d, dp_replicate %d (%s)",
        rank,
        size,
        device,
        shard,
        ep,
        replicate,
        dist.get_backend(),
    )
    waits = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return World(rank, size, shard, ep, replicate, device, mesh, ep_mesh, waits)


def close_world(world: World) -> None:
    """Tear the process groups down, each rank first waiting (a minute at most) for the others to be done over the
    gloo group of ``wait_for_main``: a rank that tore its groups down while another still finished the last collective
    (a refusal every rank met together) made that one abort ("terminate called without an active exception")."""
    if world.active and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a rank that failed alone: the others are not waited for longer
            dist.monitored_barrier(group=world.waits, timeout=datetime.timedelta(seconds=60))
        dist.destroy_process_group()
