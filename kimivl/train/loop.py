"""The training loop shared by every stage: bf16 autocast (where the device multiplies bf16 fast), clipping, MoE
bias balancing, atomic resumable checkpoints, NaN guard, progress bar and metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from kimivl.model.moe import Router
from kimivl.precision import autocast
from kimivl.train.balance import ExpertLoadTracker
from kimivl.train.metrics import MetricsLog
from kimivl.train.state import latest_checkpoint, load_state, save_state

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where the last good state is."""


class Batches(Protocol):
    def batches(self, position: int) -> Iterator[tuple[Any, int]]:
        """Batches from data ``position`` on, each with the position just after it."""


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


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float], int]]


def to_device(batch: Any, device: torch.device) -> Any:
    """A dataclass ``batch`` with its tensor fields on ``device`` (anything else is returned as it is)."""
    if not dataclasses.is_dataclass(batch):
        return batch
    moved = {f.name: value.to(device) for f in dataclasses.fields(batch)
             if isinstance(value := getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **moved)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, found: Path, stage: str) -> None:
    """``optimizer.load_state_dict(saved)``, where state that does not fit (the run now trains other parameters) is a
    ``TrainingError`` naming the checkpoint."""
    try:
        optimizer.load_state_dict(saved)
    except ValueError as e:
        raise TrainingError(f"{stage}: the optimiser state in {found} does not fit the parameters this run trains "
                            f"({e}); resume with the stage's settings of that run (train, freeze, lr_scale), or "
                            "start the stage afresh") from None


def train_loop(model: torch.nn.Module, loss_fn: LossFn, data: Batches, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: LoopConfig, run_dir: str | Path,
               stage: str, resume: bool = True, progress: bool = True,
               validate: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> dict[str, float]:
    """Run ``cfg.steps`` optimizer steps of one stage under ``run_dir/stage``; resume from its latest checkpoint
    when there is one. ``loss_fn(model, batch)`` returns (loss, metrics, tokens). Each step back-propagates
    ``cfg.accum`` batches, each loss weighing 1/accum (their logged loss and metrics are the mean, tokens the sum).
    ``validate(model)``, every ``cfg.val_every`` steps and after the last, adds its metrics (e.g. a held-out loss) to
    that step's. Returns the last metrics."""
    stage_dir = Path(run_dir) / stage
    ckpt_dir = stage_dir / "checkpoints"
    step, position = 0, 0
    found = latest_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        state = load_state(found, model)
        load_optimizer_state(optimizer, state["optimizer"], found, stage)
        scheduler.load_state_dict(state["scheduler"])
        step, position = state["step"], state["position"]
        log.info("%s: resumed at step %d from %s", stage, step, found)

    def checkpoint() -> Path:
        return save_state(ckpt_dir, model, {"step": step, "position": position, "optimizer": optimizer.state_dict(),
                                            "scheduler": scheduler.state_dict()}, keep=cfg.keep_checkpoints)

    device = next(model.parameters()).device
    last: dict[str, float] = {}
    tokens_seen, t0 = 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=stage, disable=not progress, unit="step", dynamic_ncols=True)
    model.train()
    moe = any(isinstance(m, Router) for m in model.modules())
    with MetricsLog(run_dir, stage, start=step) as metrics, \
            ExpertLoadTracker(model) if moe else contextlib.nullcontext() as tracker:
        batches = data.batches(position)
        saved = found  # the checkpoint of the current step, None while it has progress not on disk
        while step < cfg.steps:
            micro = []
            for _ in range(cfg.accum):
                try:
                    batch, next_position = next(batches)
                except Exception as e:  # bad data: keep the progress made, resume once the data is fixed
                    where = saved or checkpoint()
                    raise TrainingError(f"{stage}: no batch for step {step + 1}: {e}; the state before it is saved "
                                        f"at {where} (fix the data, then resume)") from e
                micro.append(batch)
            optimizer.zero_grad(set_to_none=True)
            losses, metered, n_tokens = [], [], 0
            for batch in micro:
                with autocast(device, cfg.bf16):
                    loss, values, n = loss_fn(model, to_device(batch, device))
                if not torch.isfinite(loss):
                    raise TrainingError(f"{stage}: loss is {loss.item()} at step {step}; the last good state is "
                                        f"saved at {checkpoint()}")
                (loss / len(micro) if len(micro) > 1 else loss).backward()
                losses.append(loss.detach())
                metered.append(values)
                n_tokens += n
            loss = torch.stack(losses).mean()
            values = {k: sum(v[k] for v in metered) / len(metered) for k in metered[0]}
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            if not torch.isfinite(grad_norm):
                raise TrainingError(f"{stage}: gradient norm is {grad_norm.item()} at step {step}; the last good "
                                    f"state is saved at {checkpoint()}")
            optimizer.step()
            scheduler.step()
            imbalance = max(tracker.imbalance().values(), default=1.0) if moe else None
            if moe and cfg.bias_update_rate:
                tracker.update_biases(cfg.bias_update_rate)
            elif moe:
                tracker.reset()
            step, position, saved = step + 1, next_position, None
            tokens_seen += n_tokens
            rate = tokens_seen / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
            held_out = validate(model) if validate and (step % cfg.val_every == 0 or step == cfg.steps) else {}
            if moe and held_out:
                tracker.reset()  # held-out forwards are no training load for the next bias update
            if held_out or step % cfg.log_every == 0 or step == cfg.steps:
                last = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                        "tokens_per_s": rate, **values, **held_out}
                if imbalance is not None:
                    last["expert_imbalance"] = imbalance
                metrics.write(step, last)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                saved = checkpoint()
    bar.close()
    return last
