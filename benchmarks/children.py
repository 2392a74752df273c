"""The child processes of the benchmark scripts: SIGTERM to a script alone (a ``kill PID``, a job runner) stops its
children too, each as SIGTERM stops it (torchrun its ranks, ``kimivl serve`` its server, ``kimivl train`` after saving
the step in progress), and leaves no temporary folder behind."""

from __future__ import annotations

import signal
import subprocess
import sys


def exit_on_sigterm() -> None:
    """SIGTERM raises ``SystemExit(143)`` in the main thread, so that the script's ``finally`` blocks and ``with``
    exits (its children stopped, its temporary folders removed) run."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def run(cmd: list[str], timeout: float | None = None, **popen) -> None:
    """``subprocess.run(cmd, check=True, timeout=timeout, **popen)``, except that a child cut short (SIGTERM to this
    process, Ctrl-C, the timeout) gets SIGTERM, not SIGKILL, and is waited for."""
    child = subprocess.Popen(cmd, **popen)
    try:
        code = child.wait(timeout=timeout)
    finally:
        if child.poll() is None:
            child.terminate()
            child.wait()
    if code:
        raise subprocess.CalledProcessError(code, cmd)
