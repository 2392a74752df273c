"""End to end: joint training teaches the model to answer from the pixels (the question never names the answer)."""

import copy
import random

import torch
from PIL import Image

from kimivl.data.packing import pack
from kimivl.train.optim import build_optimizer

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
QUESTION = "What colour is the square?"


def _prompt(colour: str, rng: random.Random) -> list[dict]:
    image = Image.new("RGB", (rng.randint(28, 84), rng.randint(28, 84)), COLOURS[colour])
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def _accuracy(model, processor, rng: random.Random) -> float:
    """Share of fresh images whose colour's first answer token scores highest among the four colours'."""
    first = {c: processor.tokenizer.encode(c)[0] for c in COLOURS}
    assert len(set(first.values())) == len(COLOURS)
    hits = 0
    trials = [c for c in COLOURS for _ in range(5)]
    for colour in trials:
        enc = processor.encode(_prompt(colour, rng))
        with torch.no_grad():
            logits = model(torch.tensor([enc.input_ids]), enc.pixel_values, enc.image_grid_hws).logits[0, -1]
        hits += max(COLOURS, key=lambda c: logits[first[c]]) == colour
    return hits / len(trials)


def test_joint_training_learns_what_the_image_shows(small_model, small_processor):
    torch.manual_seed(0)
    model = copy.deepcopy(small_model).train()
    optimizer = build_optimizer(model, lr=3e-3)
    rng = random.Random(0)
    for _ in range(120):
        samples = []
        for colour in rng.choices(list(COLOURS), k=8):
            messages = [*_prompt(colour, rng), {"role": "assistant", "content": colour}]
            samples.append(small_processor.encode_for_training(messages))
        model(**pack(samples, 1024).kwargs()).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # a model blind to the image scores at most 25% (each colour is asked equally often)
    assert _accuracy(model.eval(), small_processor, random.Random(1)) >= 0.9
