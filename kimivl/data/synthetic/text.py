"""A text-only corpus: short templated English documents about the synthetic world, numbers and words."""

from __future__ import annotations

import random

from kimivl.data.synthetic.draw import COLOURS, POSITIONS, SHAPES, place_phrase
from kimivl.data.synthetic.vocab import GUI_BUTTONS, NAMES, NUMBER_WORDS, WORDS

THINGS = ("apples", "books", "cups", "balls", "stars", "coins", "pens", "boxes", "birds", "shells")


def _scene(rng: random.Random) -> str:
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    return f"The {colour} {shape} is {place_phrase(rng.choice(POSITIONS))}."


def _sum(rng: random.Random) -> str:
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    words = f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
    return words if rng.random() < 0.5 else f"{words} In digits, {a} + {b} = {a + b}."


def _product(rng: random.Random) -> str:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a} times {b} is {a * b}, so {a * b} divided by {b} is {a}."


def _story(rng: random.Random) -> str:
    x, y = rng.sample(NAMES, 2)
    a, b, thing = rng.randint(1, 9), rng.randint(1, 9), rng.choice(THINGS)
    if rng.random() < 0.5:
        return f"{x} has {a} {thing}. {y} gives {x} {b} more. Now {x} has {a + b} {thing}."
    a += b
    return f"{x} has {a} {thing} and gives {b} to {y}. Now {x} has {a - b} {thing} left."


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, 14)
    return "Counting: " + ", ".join(NUMBER_WORDS[start : start + rng.randint(3, 6)]) + "."


def _spelling(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    return f"The word {word} is spelled {'-'.join(word)} and has {len(word)} letters."


def _compare(rng: random.Random) -> str:
    a, b = rng.sample(range(100), 2)
    return f"{max(a, b)} is greater than {min(a, b)}, and {min(a, b)} is less than {max(a, b)}."


def _chart(rng: random.Random) -> str:
    letter, value = rng.choice("ABCDEF"), rng.randint(1, 9)
    return f"In the chart, bar {letter} reaches {value}, so the value of bar {letter} is {value}."


def _gui(rng: random.Random) -> str:
    a, b = rng.sample(GUI_BUTTONS, 2)
    return f"The screen has two buttons, labelled {a} and {b}."


def _geometry(rng: random.Random) -> str:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"A rectangle {a} wide and {b} tall has an area of {a * b} and a perimeter of {2 * (a + b)}."


def _words(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, rng.randint(4, 8))).capitalize() + "."


SENTENCES = (_scene, _sum, _product, _story, _counting, _spelling, _compare, _chart, _gui, _geometry, _words)


def sentence(rng: random.Random) -> str:
    """One templated sentence (or two) from a random family."""
    return rng.choice(SENTENCES)(rng)


def filler(rng: random.Random) -> str:
    """Like ``sentence`` but never about a shape scene, so it cannot contradict a nearby figure."""
    return rng.choice([f for f in SENTENCES if f is not _scene])(rng)


def make_text(rng: random.Random) -> str:
    """A document: one or two paragraphs (separated by a blank line) of 1-4 templated sentences."""
    paragraphs = [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 2))]
    return "\n\n".join(paragraphs)
