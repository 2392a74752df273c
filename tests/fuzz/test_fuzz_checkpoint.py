"""Generated checkpoints: corrupt bytes, tensors of random kinds and shapes, hostile indexes. Every case loads or is
a CheckpointError."""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from kimivl import KimiVL, KimiVLConfig
from kimivl.checkpoint import INDEX, SINGLE, CheckpointError, load_checkpoint
from tests.fuzz.common import case, expect, fuzz

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64, torch.bool, torch.uint8]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KimiVL(KimiVLConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def good(model):
    """The model's checkpoint, as (state dict, single-file bytes)."""
    path = Path(tempfile.mkdtemp())
    model.save_pretrained(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = (path / SINGLE).read_bytes()
    shutil.rmtree(path)
    return state, data


@pytest.fixture()
def folder():
    path = Path(tempfile.mkdtemp())
    yield path
    shutil.rmtree(path)


def _load(model, path):
    load_checkpoint(model, path)
    return True


@fuzz(60)
@given(st.one_of(st.binary(max_size=400), st.tuples(st.integers(0, 10**7), st.integers(1, 255), st.integers(0, 10**7))))
def test_corrupt_file_bytes(model, good, folder, edit):
    _, data = good
    if isinstance(edit, tuple):  # flip one byte, then cut the file
        at, xor, cut = edit
        at %= len(data)
        data = data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :]
        data = data[: max(8, cut % (len(data) + 1))]
    else:
        data = edit
    (folder / SINGLE).write_bytes(data)
    with case("checkpoint: corrupt bytes"):
        expect(lambda: _load(model, folder), CheckpointError)


@fuzz(40)
@given(st.data())
def test_tensors_of_random_kind_and_shape(model, good, folder, data):
    state = dict(good[0])
    keys = sorted(state)
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        action = data.draw(st.sampled_from(["dtype", "shape", "drop", "rename"]))
        if action == "dtype":
            state[key] = state[key].to(data.draw(st.sampled_from(DTYPES)))
        elif action == "shape":
            state[key] = torch.zeros(data.draw(st.lists(st.integers(0, 4), max_size=3)))
        elif action == "drop":
            del state[key]
        else:
            state[key + data.draw(st.sampled_from([".x", "_", "2"]))] = state.pop(key)
    save_file(state, folder / SINGLE)
    with case("checkpoint: tensor kinds and shapes"):
        loaded = expect(lambda: _load(model, folder), CheckpointError)
    if loaded:
        for k, v in model.state_dict().items():
            assert v.dtype.is_floating_point == good[0][k].dtype.is_floating_point, k


JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=30),
        st.sampled_from(
            [
                "model.safetensors",
                "/etc/passwd",
                "../model.safetensors",
                "a/../../model.safetensors",
                "sub/model.safetensors",
                "",
            ]
        ),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=40), inner, max_size=3),
    max_leaves=8,
)


@fuzz(60)
@given(
    st.one_of(JSONISH, st.dictionaries(st.sampled_from(["weight_map", "metadata"]), JSONISH, max_size=2)), st.booleans()
)
def test_hostile_indexes(model, good, folder, index, with_file):
    if with_file:
        (folder / SINGLE).write_bytes(good[1])
    (folder / INDEX).write_text(json.dumps(index))
    with case("checkpoint: hostile indexes"):
        expect(lambda: _load(model, folder), CheckpointError)
