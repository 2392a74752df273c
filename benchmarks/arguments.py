"""What the benchmark scripts' arguments share: counts and sizes below their least are refused as the arguments are
parsed, not met as a traceback (or a table of nan) after the work; each parser is described by its script's
docstring."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``low`` (``parser.error`` names the flag and the range otherwise)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return whole


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's parser, described by the first line of its docstring ``doc`` (None under ``python -OO``, which
    strips docstrings: then no description)."""
    return argparse.ArgumentParser(description=(doc or "").partition("\n")[0])
