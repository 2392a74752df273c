"""config.json schema: round trips, unknown fields, validation, presets and parameter counts."""

import json

import pytest

from kimivl import KimiVLConfig
from kimivl.cli import main
from kimivl.config import ConfigError
from kimivl.model.params import parameter_counts


def official_dict():
    d = KimiVLConfig.from_preset("kimi-vl-a3b").to_dict()
    d["auto_map"] = {"AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration"}
    d["text_config"]["some_future_field"] = [1, 2]
    d["vision_config"]["torch_dtype"] = "bfloat16"
    return d


def test_round_trip_keeps_unknown_fields(tmp_path):
    d = official_dict()
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = KimiVLConfig.from_pretrained(tmp_path)
    assert cfg.extra["auto_map"] == d["auto_map"]
    assert cfg.text_config.extra == {"some_future_field": [1, 2]}
    cfg.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == d


def test_a3b_values():
    cfg = KimiVLConfig.from_preset("kimi-vl-a3b")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.kv_lora_rank, t.n_routed_experts) == (
        163840,
        2048,
        27,
        512,
        64,
    )
    assert (t.routed_scaling_factor, t.rope_theta, t.max_position_embeddings) == (2.446, 800000.0, 131072)
    assert (v.hidden_size, v.num_hidden_layers, v.head_dim, v.merged_dim) == (1152, 27, 72, 4608)
    assert cfg.media_placeholder_token_id == 163605
    assert (t.bos_token_id, t.eos_token_id) == (163584, [163585, 163586])  # [BOS]; [EOS] and <|im_end|>
    assert [t.is_moe_layer(i) for i in range(3)] == [False, True, True]


def test_tiny_exercises_every_structure():
    t = KimiVLConfig.from_preset("tiny").text_config
    moe = [t.is_moe_layer(i) for i in range(t.num_hidden_layers)]
    assert moe[0] is False and sum(moe) >= 2 and t.n_shared_experts >= 1 and t.n_group > 1


@pytest.mark.parametrize(
    "part,field,value,message",
    [
        ("vision_config", "num_attention_heads", 7, "must divide hidden_size"),
        ("vision_config", "hidden_size", 1120, "multiple of 4"),
        ("text_config", "n_group", 5, "must divide n_routed_experts"),
        ("text_config", "topk_group", 2, "must not exceed n_group"),
        ("text_config", "num_experts_per_tok", 65, "exceeds the experts reachable"),
        ("text_config", "q_lora_rank", 1536, "no query compression"),
        ("text_config", "num_key_value_heads", 8, "must equal num_attention_heads"),
        ("text_config", "hidden_size", 0, "positive integer"),
        ("text_config", "scoring_func", "softmax", "unsupported"),
    ],
)
def test_impossible_values_are_rejected(part, field, value, message):
    d = official_dict()
    d[part][field] = value
    with pytest.raises(ConfigError, match=message):
        KimiVLConfig.from_dict(d)


def test_placeholder_outside_vocab_and_bad_files(tmp_path):
    d = official_dict()
    d["media_placeholder_token_id"] = 200000
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        KimiVLConfig.from_dict(d)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        KimiVLConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "kimi_vl"}))
    with pytest.raises(ConfigError, match="no vision_config"):
        KimiVLConfig.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        KimiVLConfig.from_preset("huge")


def test_a3b_parameter_counts_match_the_spec():
    c = parameter_counts(KimiVLConfig.from_preset("kimi-vl-a3b"))
    assert round(c["language_model"].total / 1e9, 3) == 15.960
    assert round(c["vision_tower"].total / 1e9, 3) == 0.417
    assert round(c["multi_modal_projector"].total / 1e9, 3) == 0.031
    assert round(c["total"].total / 1e9, 3) == 16.408
    assert round(c["language_model"].active / 1e9, 1) == 2.9


def test_info_command(capsys, tmp_path):
    assert main(["info", "--preset", "kimi-vl-a3b"]) == 0
    out = capsys.readouterr().out
    assert "16.408B" in out and "15.960B" in out and "2.915B" in out
    assert "a text token uses the LM's alone" in out  # the total's 3.362B adds the vision tower, which text skips
    KimiVLConfig.from_preset("tiny").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "language_model" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "absent")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_the_kimivl_tiny_preset_is_the_shipped_architecture():
    """Only what the recipe sets differs: the trained tokenizer's vocabulary and special ids, and the RoPE base that
    long-context activation raised."""
    import dataclasses
    from pathlib import Path

    preset = KimiVLConfig.from_preset("kimivl-tiny")
    for name in ("kimivl-tiny", "kimivl-tiny-thinking"):
        shipped = KimiVLConfig.from_pretrained(Path(__file__).parents[1] / "models" / name)
        assert shipped.vision_config == preset.vision_config
        recipe_set = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta"}
        differ = {
            f.name
            for f in dataclasses.fields(preset.text_config)
            if getattr(preset.text_config, f.name) != getattr(shipped.text_config, f.name)
        }
        assert differ <= recipe_set and shipped.text_config.rope_theta == 800_000.0
        assert shipped.text_config.vocab_size == 2048 + 256  # the recipe's tokenizer: train_vocab + special tokens
        assert f"{parameter_counts(shipped)['total'].total / 1e6:.1f}M" == "5.6M"
    assert (preset.text_config.vocab_size, preset.text_config.rope_theta) == (4096, 50_000.0)
    assert f"{parameter_counts(preset)['total'].total / 1e6:.1f}M" == "6.5M"  # as its docstring says


def test_set_weight_dtype_rewrites_every_dtype_field_present_and_adds_none_but_text_configs():
    from kimivl.config import set_weight_dtype

    d = {"torch_dtype": "bfloat16", "text_config": {}, "vision_config": {"dtype": "bfloat16"}}
    set_weight_dtype(d, "float32")
    assert d == {
        "torch_dtype": "float32",
        "text_config": {"torch_dtype": "float32"},
        "vision_config": {"dtype": "float32"},
    }
