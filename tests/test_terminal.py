"""printable: what may steer a terminal is written as its escape, the rest of Unicode as it is; is_terminal."""

import io

import pytest

from kimivl.terminal import is_terminal, printable

# embeddings and overrides (U+202A-202E), isolates (U+2066-2069): each reorders what follows it on screen
BIDI = [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
ESCAPES = {"\x1b": "\\x1b", "\r": "\\r", "\x08": "\\x08", "\x7f": "\\x7f", "\x85": "\\x85"}
ESCAPES |= {chr(c): f"\\u{c:04x}" for c in (0x2028, 0x2029, *BIDI)}  # and the line and paragraph separators


@pytest.mark.parametrize("c", ESCAPES)
def test_terminal_steering_characters_print_as_their_escapes(c):
    assert printable(f"x{c}y") == f"x{ESCAPES[c]}y"


def test_other_text_and_what_keep_names_print_as_they_are():
    text = "\u202f\u2065\u206a\u200d é 字 🙂"  # neighbours of the escaped ranges, a joiner, other scripts
    assert printable(text) == text
    assert printable("a\nb\tc\u2029", keep="\n\t") == "a\nb\tc\\u2029"
    assert printable("a\nb", keep="\t") == "a\\nb"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_no_stream_or_a_closed_one_is_a_terminal():
    """A closed stream's isatty raises ValueError (sys.stdout closed by a caller): it is no terminal, not an error."""
    assert is_terminal(_Terminal()) and not is_terminal(io.StringIO()) and not is_terminal(None)
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)
