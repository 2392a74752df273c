"""Untrusted text made safe to print: what a data file, a model's answer or an error quoting either holds may not
steer the terminal (escape sequences that clear it, retitle it or set the clipboard; carriage returns and backspaces
that overwrite what was printed; bidirectional overrides that reorder what follows) or add cells to a table."""

from __future__ import annotations

import unicodedata


def printable(value: object, keep: str = "") -> str:
    """``value`` as text safe to print or log: control characters (a terminal's escape sequences, line and paragraph
    breaks, the bidirectional overrides), other than those in ``keep`` (``"\\n\\t"`` for an answer's lines), written as
    their escapes; any other text (spaces of other scripts, joiners, new emoji) as it is."""
    text = str(value)
    return "".join(repr(c)[1:-1] if c not in keep and _control(c) else c for c in text)


def _control(c: str) -> bool:
    return unicodedata.category(c) in ("Cc", "Zl", "Zp") or "\u202a" <= c <= "\u202e" or "\u2066" <= c <= "\u2069"


def is_terminal(stream) -> bool:
    """Whether ``stream`` writes to a terminal (not to a pipe, a file or a test's capture; no stream or a closed one:
    no)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def table_cell(value: object) -> str:
    """``value`` as one Markdown table cell: printable, its ``|`` escaped (a group name cannot add cells or rows)."""
    return printable(value).replace("|", "\\|")
