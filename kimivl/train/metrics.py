"""Training metrics: one JSON object per logged step in ``metrics.jsonl`` (TensorBoard too when installed), and
PNG curves drawn from that file."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kimivl.files import write_text_atomic

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends a stage's metrics to ``run_dir/metrics.jsonl`` and, when tensorboard is installed, to
    ``run_dir/tensorboard/<stage>`` (flushed at every write, so a live TensorBoard follows the run). A stage resumed
    from step ``start`` first drops its records logged after that step by the interrupted run, from the JSONL and,
    by TensorBoard's purge, from the curves. Close it when the stage ends (or use it in a ``with`` block)."""

    def __init__(self, run_dir: str | os.PathLike, stage: str, start: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        if self.path.is_file():
            rows = read_metrics(self.path)
            kept = [r for r in rows if r["stage"] != stage or r["step"] <= start]
            torn = not self.path.read_bytes().endswith(b"\n")  # a kill or a full disk cut the last line short
            if len(kept) < len(rows) or torn:
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard" / stage), purge_step=start + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": self.stage, "step": step, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; a last line cut short (by a kill or a full disk) is passed over, any other
    bad line is a ``ValueError`` naming it."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines):
                raise ValueError(f"{path}:{i} is not a JSON record; remove that line to resume") from None
            log.warning("%s: passing over its last line, cut short: %r", path, line[:80])
    return rows


def plot_curves(metrics_file: str | os.PathLike, out_png: str | os.PathLike, keys: tuple[str, ...] = ("loss",)) -> None:
    """One panel per stage with the given keys against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if not stages:
        raise ValueError(f"{metrics_file} holds no metrics")
    cols = min(4, len(stages))
    nrows = (len(stages) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        mine = [r for r in rows if r["stage"] == stage]
        for key in keys:
            pts = [(r["step"], r[key]) for r in mine if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend()
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
