"""Another process's run holding a run directory, for tests of what a second run or build is told."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path


@contextlib.contextmanager
def run_held_elsewhere(out: Path):
    """Another process's run holding ``out`` (its ``run_lock``) for the block; yields that process."""
    holds = f"from pathlib import Path\nfrom kimivl.train.lock import run_lock\nwith run_lock(Path({str(out)!r})):\n"
    holds += "    print('held', flush=True)\n    input()\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", holds], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        yield holder
    finally:
        holder.communicate(b"\n", timeout=60)
