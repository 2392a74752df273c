"""Generated config.json content: every case is a ConfigError or a config that builds a sane size estimate."""

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from kimivl import KimiVLConfig
from kimivl.config import ConfigError, estimated_parameters
from tests.fuzz.common import case, expect, fuzz

BASE = KimiVLConfig.from_preset("tiny").to_dict()
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["bfloat16", "int8", "silu", "sigmoid", "noaux_tc", "kimi_vl", "float32"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
PATHS = (
    [(k,) for k in BASE if k not in ("vision_config", "text_config")]
    + [(part, k) for part in ("vision_config", "text_config") for k in BASE[part]]
    + [("vision_config",), ("text_config",)]
)


def _mutated(edits) -> dict:
    d = json.loads(json.dumps(BASE))
    for path, value, delete in edits:
        target = d
        for key in path[:-1]:
            target = target[key] if isinstance(target.get(key), dict) else {}
        if delete:
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    return d


def _check(config) -> None:
    if config is None:
        return
    n = estimated_parameters(config)
    assert isinstance(n, int) and 0 < n and math.isfinite(n)
    again = KimiVLConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@fuzz(300)
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES, st.booleans()), min_size=1, max_size=4))
def test_mutated_configs(edits):
    with case("config: mutated fields"):
        _check(expect(lambda: KimiVLConfig.from_dict(_mutated(edits)), ConfigError))


@fuzz(100)
@given(VALUES)
def test_whole_config_replaced(value):
    with case("config: not an object"):
        _check(expect(lambda: KimiVLConfig.from_dict(value), ConfigError))


@fuzz(100)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda d, cut: json.dumps(d)[:cut].encode(), st.just(BASE), st.integers(0, 2000)),
    )
)
def test_config_file_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_bytes(data)
    with case("config: file bytes"):
        _check(expect(lambda: KimiVLConfig.from_pretrained(path.parent), ConfigError))
