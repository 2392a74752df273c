"""Inference memory by formula and ``kimivl info --context``: the cache is linear in the context, the prefill's
attention term follows the chunk and the key block (not the context), its MLP term the chunk, only the prompt's
embeddings grow with the context, and chunking bounds the a3b prefill at 128K."""

import pytest

from kimivl import KimiVLConfig
from kimivl.cli import main
from kimivl.inference.memory import cache_bytes, prefill_activation_bytes

GIB = 2**30


def test_cache_and_prefill_scale_as_the_formula_says():
    a3b = KimiVLConfig.from_preset("kimi-vl-a3b").text_config
    assert cache_bytes(a3b, 131072) == 131072 * 27 * 576 * 2  # 3.80 GiB
    short, long = prefill_activation_bytes(a3b, 32768, 4096), prefill_activation_bytes(a3b, 65536, 4096)
    for part in ("residual", "attention", "mlp"):  # per chunk and key block, whatever the context
        assert long[part] == short[part]
    assert long["prompt"] - short["prompt"] == 32768 * 2048 * 2  # but for the prompt's embeddings
    # a key block of 4096 tokens, each 576 + 16 x (256 + 2 x 192) values; 4 x 16 x 192 per query, 8 x 16 x 128 bytes
    assert long["attention"] == 4096 * (576 + 16 * (256 + 2 * 192)) * 2 + 4096 * 4 * 16 * 192 * 2 + 4096 * 8 * 16 * 128
    wider = prefill_activation_bytes(a3b, 65536, 4096, key_block=8192)["attention"]
    assert wider - long["attention"] == 4096 * (576 + 16 * (256 + 2 * 192)) * 2  # linear in the key block
    chunked, one_pass = prefill_activation_bytes(a3b, 131072, 2048), prefill_activation_bytes(a3b, 131072, 131072)
    assert chunked["peak"] < GIB < 4 * GIB < one_pass["peak"]  # chunks keep the routed experts' rows small
    assert one_pass["mlp"] == 64 * chunked["mlp"]
    assert prefill_activation_bytes(a3b, 1000, 4096) == prefill_activation_bytes(a3b, 1000, 1000)  # one chunk
    with pytest.raises(ValueError, match="positive"):
        prefill_activation_bytes(a3b, 0, 4096)


def test_info_context(capsys):
    assert main(["info", "--context", "131072"]) == 0  # the a3b preset by default
    out = capsys.readouterr().out
    assert "16.408B" in out and "compressed cache 31104 bytes/token" in out and "3.80 GiB at 131072 tokens" in out
    assert "prefill activations in chunks of 2048 tokens: peak 798.50 MiB" in out and "embeddings 512.00 MiB" in out
    assert main(["info", "--preset", "tiny", "--context", "4096", "--prefill-chunk", "512"]) == 0
    assert "in chunks of 512 tokens" in capsys.readouterr().out
    assert main(["info", "--preset", "tiny", "--context", "5000"]) == 2
    assert "--context must be 1..4096 tokens" in capsys.readouterr().err
    assert main(["info"]) == 2
    assert "checkpoint directory or --preset" in capsys.readouterr().err
