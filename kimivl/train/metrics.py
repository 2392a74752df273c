"""Training metrics: one JSON object per logged step in ``metrics.jsonl`` (TensorBoard too when installed), and
PNG curves drawn from that file."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
from pathlib import Path

from kimivl.files import write_error, write_text_atomic, writing

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
        self._tb, self._hook = None, None
        self.tb_dir = Path(run_dir) / "tensorboard" / stage
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        if threading.excepthook is not _quiet_tensorboard_writer:  # the process's hook comes back at close
            self._hook = _quiet_tensorboard_writer.fallback = threading.excepthook
            threading.excepthook = _quiet_tensorboard_writer
        self._tb = SummaryWriter(str(self.tb_dir), purge_step=start + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append one record; a failed write (a full disk) is a ``WriteError`` naming the file or directory. A value
        that is no finite number (a ``kl_ref`` whose exp overflowed) is written as ``null``, standard JSON, and
        warned of (``json.dumps`` would write ``Infinity``, which other JSON readers refuse)."""
        bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            log.warning("%s step %d: %s not finite, logged as null", self.stage, step, ", ".join(bad))
        record = {"stage": self.stage, "step": step, **{k: None if k in bad else v for k, v in values.items()}}
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            with self._tensorboard():
                for k, v in values.items():
                    self._tb.add_scalar(k, v, step)
                self._tb.flush()

    @contextlib.contextmanager
    def _tensorboard(self):
        """A failure of the TensorBoard writer (its thread's, raised on the next call) names its directory and
        stops it (closing it again would raise it again)."""
        try:
            yield
        except OSError as e:
            writer, self._tb = self._tb, None
            with contextlib.suppress(OSError):
                writer.close()
            raise write_error(e, self.tb_dir) from None

    def close(self) -> None:
        try:
            if self._tb is not None:
                with self._tensorboard():
                    self._tb.close()
        finally:
            if self._hook is not None and threading.excepthook is _quiet_tensorboard_writer:
                threading.excepthook, self._hook = self._hook, None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # the error that ended the block is the one to report
            with contextlib.suppress(OSError):
                self.close()


def _quiet_tensorboard_writer(args: threading.ExceptHookArgs) -> None:
    """``threading.excepthook`` that leaves unprinted the ``OSError`` (a full disk) of TensorBoard's writer thread,
    which ``MetricsLog.write`` raises naming the directory, rather than a traceback amid the run's output."""
    if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
        return
    _quiet_tensorboard_writer.fallback(args)


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
    """One panel per stage that logged any of the given keys, the keys against the step. Drawn on a figure of its
    own: matplotlib's backend (a notebook's) is left as it is."""
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_file)
    stages = list(dict.fromkeys(r["stage"] for r in rows if any(key in r for key in keys)))
    if not stages:
        raise ValueError(f"{metrics_file} holds no metrics of {', '.join(keys)}")
    cols = min(4, len(stages))
    nrows = (len(stages) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 3 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        mine = [r for r in rows if r["stage"] == stage]
        for key in keys:
            pts = [(r["step"], r[key]) for r in mine if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend()
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
