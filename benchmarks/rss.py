"""The process's resident-set high-water mark, resettable, for the memory benchmarks (Linux /proc; elsewhere the
lifetime peak, ``ru_maxrss``)."""

from __future__ import annotations

import resource
import sys


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRise:
    """``with PeakRise() as rise: ...`` then ``rise.bytes``: how far the high-water mark rose above the resident set
    at entry (``rise.exact`` False: VmHWM could not be reset, so the rise of the process's lifetime peak, ru_maxrss,
    stands in: a lower bound, 0 for a block that stays under an earlier peak)."""

    def __enter__(self) -> PeakRise:
        self.exact = reset_peak()
        self._before = status_kib("VmRSS") * 1024 if self.exact else max_rss()
        return self

    def __exit__(self, *exc) -> None:
        peak = status_kib("VmHWM") * 1024 if self.exact else max_rss()
        self.bytes = peak - self._before


def max_rss() -> int:
    """The process's peak resident set in bytes (``ru_maxrss`` counts bytes on macOS, KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
