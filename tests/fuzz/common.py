"""Shared pieces of the fuzz suite: hypothesis settings, a per-case time limit, the case counter, and ``expect``."""

from __future__ import annotations

import signal
from collections import Counter
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

# Generated cases run per test (read by conftest.py's summary at the end of the session).
CASES: Counter[str] = Counter()
CASE_SECONDS = 5.0


def fuzz(max_examples: int):
    """Hypothesis settings of the suite: reproducible (derandomized, no example database), a per-case deadline."""
    return settings(
        max_examples=max_examples,
        deadline=CASE_SECONDS * 1000,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


class CaseTimeout(BaseException):
    """A case that ran past ``CASE_SECONDS``: a hang (a BaseException, so that no ``except Exception`` hides it)."""


@contextmanager
def case(name: str, seconds: float = CASE_SECONDS):
    """Count one generated case of test ``name`` and stop it with ``CaseTimeout`` if it runs past ``seconds``."""
    CASES[name] += 1

    def on_alarm(signum, frame):
        raise CaseTimeout(f"{name}: a generated case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expect(fn, *allowed: type[BaseException]):
    """``fn()``'s result, or None when it raised one of ``allowed`` (the project's own errors); any other exception
    propagates and fails the test."""
    try:
        return fn()
    except allowed:
        return None
