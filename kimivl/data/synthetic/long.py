"""Long documents for long-context activation: pages of the text corpus's sentences that state a few numbered facts
and end by recalling one of them, so predicting its number needs a look hundreds or thousands of tokens back.

The length is log-uniform between ``MIN_SENTENCES`` and ``MAX_SENTENCES`` sentences (about 160 to 3,500 tokens with
kimivl-tiny's tokenizer), the facts (one to three, of one form, with different keys) sit at uniform depths, and the
closing sentence recalls a random one of them.
"""

from __future__ import annotations

import math
import random

from kimivl.data.synthetic.draw import COLOURS
from kimivl.data.synthetic.text import filler
from kimivl.data.synthetic.vocab import NAMES

MIN_SENTENCES, MAX_SENTENCES = 10, 220
RECALL = "Remember this: "

# kind: (keys, fact template naming a key and a number)
FACTS = {
    "code": (NAMES, "The code of {key}'s locker is {n}."),
    "box": (tuple(sorted(COLOURS)), "The {key} box holds {n} marbles."),
    "room": (tuple(range(1, 30)), "The guest in room {key} paid {n} coins."),
}


def make_long(rng: random.Random) -> str:
    """One long document: filler with one to three facts at random depths, then the recall of one of them."""
    keys, fact = FACTS[rng.choice(sorted(FACTS))]
    n_sentences = round(math.exp(rng.uniform(math.log(MIN_SENTENCES), math.log(MAX_SENTENCES))))
    sentences = [filler(rng) for _ in range(n_sentences)]
    facts = []
    for key in rng.sample(keys, rng.randint(1, 3)):
        digits = rng.randint(3, 7)
        facts.append(fact.format(key=key, n=rng.randint(10 ** (digits - 1), 10**digits - 1)))
    for f in facts:
        sentences.insert(rng.randint(0, len(sentences)), f)
    return " ".join(sentences) + "\n\n" + RECALL + rng.choice(facts)
