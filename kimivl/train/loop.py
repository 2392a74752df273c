"""The training loop of the vit and joint stages: bf16 autocast (where the device multiplies bf16 fast), gradient
accumulation, the shared optimizer step (clipping, non-finite guard), MoE bias balancing, atomic resumable checkpoints,
a held-out loss, progress bar and metrics; Ctrl-C saves the step and stops."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kimivl.distributed.vision_sync import has_images, pad_embeddings, vision_pad
from kimivl.distributed.world import World
from kimivl.kernels import training_attention
from kimivl.model.moe import Router
from kimivl.precision import autocast, use_bf16
from kimivl.progress import progress_bar
from kimivl.train.balance import ExpertLoadTracker
from kimivl.train.interrupt import StopRequest, stop_on_interrupt
from kimivl.train.metrics import MetricsLog
from kimivl.train.state import TrainState
from kimivl.train.step import TrainingError, UntrainedRows, check_loss, optimizer_step


class Batches(Protocol):
    def batches(self, position: int) -> Iterator[tuple[Any, int]]:
        """Batches from data ``position`` on, each with the position just after it, enough for every step left (the
        built-in streams never end; one that does stops ``train_loop`` with a ``TrainingError``, its state saved). A
        stream with ``state_dict`` and ``load_state_dict`` (a ``Mixture``'s draw counts, a stream's name) has that state
        saved and restored with the position; ``load_state_dict`` returns what of it differs from the stream's own and
        was left, or None."""


@dataclass
class LoopConfig:
    steps: int
    ckpt_every: int = 100
    log_every: int = 10
    clip: float = 1.0
    bf16: bool | None = None  # bf16 autocast; None: where the device multiplies bf16 fast (kimivl.precision)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step; 0 disables
    keep_checkpoints: int = 2
    accum: int = 1  # batches (micro-batches) whose gradients add up to one optimizer step
    val_every: int = 100  # steps between calls of train_loop's ``validate`` (and after the last step)
    settings: dict[str, Any] | None = None  # the stage's settings a resume compares (``TrainState.settings``)
    sources: dict[str, dict[str, Any]] | None = None  # its data sources' records (``TrainState.sources``)


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float], int]]


def to_device(batch: Any, device: torch.device) -> Any:
    """A dataclass ``batch`` with its tensor fields on ``device`` (anything else is returned as it is)."""
    if not dataclasses.is_dataclass(batch):
        return batch
    moved = {
        f.name: value.to(device)
        for f in dataclasses.fields(batch)
        if isinstance(value := getattr(batch, f.name), torch.Tensor)
    }
    return dataclasses.replace(batch, **moved)


def check_accum(stage: str, accum: int, ranks: int) -> None:
    """A ``ValueError`` unless a step's ``accum`` batches divide evenly among the data-parallel ``ranks``."""
    if accum % ranks:
        raise ValueError(
            f"{stage}: accum ({accum} batches per step over all ranks) must be a multiple of the {ranks} "
            "data-parallel ranks"
        )


def train_loop(
    model: torch.nn.Module,
    loss_fn: LossFn,
    data: Batches,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: LoopConfig,
    run_dir: str | Path,
    stage: str,
    resume: bool = True,
    progress: bool = True,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    world: World | None = None,
) -> dict[str, float]:
    """Run ``cfg.steps`` optimizer steps of one stage under ``run_dir/stage``; resume from its latest checkpoint
    when there is one. ``loss_fn(model, batch)`` returns (loss, metrics, tokens). Each step back-propagates
    ``cfg.accum`` batches, each loss weighing 1/accum (their logged loss and metrics are the mean, tokens the sum); a
    batch whose loss reaches no trained weight (a row without images when only the vision side trains) adds a zero
    gradient, its loss counted in the mean all the same.
    ``validate(model)``, every ``cfg.val_every`` steps and after the last, adds its metrics (e.g. a held-out loss) to
    that step's. Returns the last metrics.

    Across the ranks of a sharded ``world`` a step's ``cfg.accum`` batches are the same as in one process: rank r
    trains batches r, r + size, ... of them (so ``accum`` must be a multiple of the world size); losses, token counts
    and expert loads are summed over ranks, and rank 0 alone shows progress and writes metrics."""
    world = world or World()
    check_accum(stage, cfg.accum, world.size)
    device = torch.device(world.device) if world.active else next(model.parameters()).device
    state = TrainState(
        Path(run_dir) / stage / "checkpoints",
        stage,
        model,
        optimizer,
        scheduler,
        keep=cfg.keep_checkpoints,
        world=world,
        settings=cfg.settings,
        sources=cfg.sources,
        bf16=use_bf16(device, cfg.bf16),
        stream=data if hasattr(data, "state_dict") else None,
    )
    if resume:
        state.resume()
    last: dict[str, float] = {}
    tokens_seen, t0 = 0, time.perf_counter()
    untrained = UntrainedRows()
    progress = progress and world.main
    model.train()
    moe = any(isinstance(m, Router) for m in model.modules())
    with (
        progress_bar(
            total=cfg.steps, initial=state.step, desc=stage, disable=not progress, unit="step", dynamic_ncols=True
        ) as bar,  # closed however the loop ends: a bar left open garbles the next one in a notebook
        MetricsLog(run_dir, stage, start=state.step) if world.main else NoMetrics() as metrics,
        stop_on_interrupt() as stop,
        ExpertLoadTracker(model) if moe else contextlib.nullcontext() as tracker,
    ):
        batches = data.batches(state.position)
        while state.step < cfg.steps:
            where = f"{stage}: step {state.step + 1}"
            micro = []
            for j in range(cfg.accum):
                try:
                    batch, next_position = next(batches)
                except StopIteration:  # not bad data: a stream of the caller's that ends
                    raise TrainingError(
                        f"{stage}: no batch for step {state.step + 1}: the data stream ended (it must yield "
                        f"{cfg.accum} batch(es) per step for all {cfg.steps} steps); the state before it is saved at "
                        f"{state.save()}"
                    ) from None
                except Exception as e:  # bad data: keep the progress made, resume once the data is fixed
                    fix = "make the file readable again" if isinstance(e, OSError) else "fix the record in place"
                    raise TrainingError(
                        f"{stage}: no batch for step {state.step + 1}: {e}; the state before it is "
                        f"saved at {state.save()} ({fix}, then resume)"
                    ) from e
                if j % world.size == world.rank:
                    micro.append(batch)
            optimizer.zero_grad(set_to_none=True)
            losses, metered, n_tokens = [], [], 0
            for batch in micro:
                with autocast(device, cfg.bf16), training_attention():
                    pad = vision_pad(model, world, has_images(getattr(batch, "pixel_values", None)))
                    with pad_embeddings(model, pad):
                        loss, values, n = loss_fn(model, to_device(batch, device))
                    loss = loss + pad
                check_loss(loss, where, state.last_good, world)
                untrained.backward(
                    loss / len(micro) if len(micro) > 1 else loss, f"{stage}: step {state.step + 1} has a row that"
                )
                losses.append(loss.detach())
                metered.append(values)
                n_tokens += n
            loss, values, n_tokens = _over_ranks(losses, metered, n_tokens, world)
            lr = scheduler.get_last_lr()[0]  # the rate this step trained at (the scheduler moves on next)
            grad_norm = optimizer_step(model, optimizer, cfg.clip, where, state.last_good, world)
            scheduler.step()
            if moe and world.active:
                for counts in tracker.counts.values():
                    world.sum(counts)
            imbalance = max(tracker.imbalance().values(), default=1.0) if moe else None
            if moe and cfg.bias_update_rate:
                tracker.update_biases(cfg.bias_update_rate)
            elif moe:
                tracker.reset()
            state.advance(next_position)
            step = state.step
            tokens_seen += n_tokens
            rate = tokens_seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}", refresh=False)  # shown by update's refresh
            bar.update(1)
            held_out = validate(model) if validate and (step % cfg.val_every == 0 or step == cfg.steps) else {}
            if moe and held_out:
                tracker.reset()  # held-out forwards are no training load for the next bias update
            if held_out or step % cfg.log_every == 0 or step == cfg.steps:
                last = {
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "tokens_per_s": rate,
                    **values,
                    **held_out,
                }
                if imbalance is not None:
                    last["expert_imbalance"] = imbalance
                metrics.write(step, last)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                state.save()
            state.stop_if_asked(agreed(stop, world), cfg.steps)
    return last


def _over_ranks(
    losses: list[torch.Tensor], metered: list[dict[str, float]], n_tokens: int, world: World
) -> tuple[torch.Tensor, dict[str, float], int]:
    """The step's mean loss and metrics over all its batches, and its tokens, summed over the ranks."""
    keys = sorted(metered[0])
    device = losses[0].device
    local = [torch.stack(losses).float().sum()] + [torch.tensor(sum(v[k] for v in metered)) for k in keys]
    totals = world.sum(
        torch.stack(
            [t.to(device, torch.float64) for t in local] + [torch.tensor(n_tokens, device=device, dtype=torch.float64)]
        )
    )
    batches = len(losses) * world.size
    return (
        (totals[0] / batches).float(),
        {k: float(totals[i + 1]) / batches for i, k in enumerate(keys)},
        int(totals[-1]),
    )


def agreed(stop: StopRequest, world: World) -> StopRequest:
    """Ctrl-C reaches the ranks at different moments: they stop after the same step when any of them was asked. The
    decision is a new request; ``stop`` keeps its own, so one that arrives while the ranks agree counts next step."""
    if not world.active:
        return stop
    decision = StopRequest()
    decision.requested = bool(world.sum(torch.tensor(float(stop.requested), device=world.device)) > 0)
    return decision


class NoMetrics(contextlib.nullcontext):
    """The metrics log of ranks other than 0."""

    def __enter__(self):
        return self

    def write(self, step: int, values: dict[str, float]) -> None:
        pass
