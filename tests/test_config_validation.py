"""Every config field's type and range is checked when the config is read; impossible sizes fail fast."""

import dataclasses
import json
import time

import pytest
import torch

from kimivl import KimiVL, KimiVLConfig
from kimivl.config import MAX_PARAMETERS, ConfigError, estimated_parameters
from kimivl.inference.generate import generate_ids
from kimivl.inference.sampling import SamplingParams
from kimivl.model.params import parameter_counts


def tiny_dict():
    return KimiVLConfig.from_preset("tiny").to_dict()


@pytest.mark.parametrize(
    "part,field,value,message",
    [
        ("text_config", "rope_theta", 0, "rope_theta must be a finite number > 0"),
        ("text_config", "rope_theta", -10000.0, "rope_theta must be a finite number > 0"),
        ("text_config", "rope_theta", "1e4", "rope_theta must be a finite number > 0"),
        ("text_config", "rms_norm_eps", -1e-6, "rms_norm_eps must be a finite number > 0"),
        ("text_config", "rms_norm_eps", float("nan"), "rms_norm_eps must be a finite number > 0"),
        ("text_config", "rope_theta", 10**400, "rope_theta must be a finite number > 0"),  # no OverflowError
        ("text_config", "routed_scaling_factor", float("inf"), "routed_scaling_factor"),
        ("text_config", "initializer_range", -0.02, "initializer_range must be a finite number >= 0"),
        ("text_config", "aux_loss_alpha", True, "aux_loss_alpha"),
        ("text_config", "eos_token_id", "[EOS]", "eos_token_id must be a token id or a non-empty list"),
        ("text_config", "eos_token_id", [], "eos_token_id must be a token id or a non-empty list"),
        ("text_config", "eos_token_id", [3841, 99999], "eos_token_id must be a token id in"),
        ("text_config", "bos_token_id", -1, "bos_token_id must be a token id in"),
        ("text_config", "pad_token_id", 4096, "pad_token_id must be a token id in"),
        ("text_config", "n_shared_experts", -1, "n_shared_experts must be an integer >= 0"),
        ("text_config", "first_k_dense_replace", -2, "first_k_dense_replace must be an integer >= 0"),
        ("text_config", "num_hidden_layers", True, "num_hidden_layers must be a positive integer"),
        ("text_config", "hidden_size", 128.0, "hidden_size must be a positive integer"),
        ("text_config", "vocab_size", "4096", "vocab_size must be a positive integer"),
        ("text_config", "num_experts_per_tok", False, "num_experts_per_tok must be a positive integer"),
        ("text_config", "norm_topk_prob", 1, "norm_topk_prob must be a boolean"),
        ("text_config", "tie_word_embeddings", "false", "tie_word_embeddings must be a boolean"),
        ("text_config", "tie_word_embeddings", True, "tie_word_embeddings must be false: .* not supported"),
        ("text_config", "rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling is not supported: .*plain RoPE"),
        ("text_config", "torch_dtype", "int8", "torch_dtype must name a float type"),
        ("text_config", "torch_dtype", "bool", "torch_dtype must name a float type"),
        ("text_config", "torch_dtype", None, "torch_dtype must be a string"),
        ("text_config", "hidden_act", 3, "hidden_act must be a string"),
        ("vision_config", "rope_theta", -1, "vision_config.rope_theta must be a finite number > 0"),
        ("vision_config", "layer_norm_eps", 0.0, "layer_norm_eps must be a finite number > 0"),
        ("vision_config", "patch_size", 14.5, "patch_size must be a positive integer"),
        ("vision_config", "merge_kernel_size", 2, "merge_kernel_size must be two positive integers"),
        ("vision_config", "merge_kernel_size", "22", "merge_kernel_size must be two positive integers"),
        ("vision_config", "merge_kernel_size", [2, True], "merge_kernel_size must be two positive integers"),
        (None, "media_placeholder_token_id", "3861", "outside the vocabulary"),
        (None, "ignore_index", None, "ignore_index must be -100"),
        (None, "ignore_index", -1, "ignore_index must be -100, the label kimivl's processor"),  # met at step 1
        (None, "ignore_index", 5, "ignore_index must be -100"),  # token 5 silently left out of the loss
        (None, "ignore_index", -100.0, "ignore_index must be -100"),  # a float compares equal, yet is no label
        (None, "pad_token_id", 3861, r"pad_token_id \(3861\) is the media_placeholder_token_id"),
        ("text_config", "pad_token_id", 3861, r"text_config.pad_token_id \(3861\) is the media_placeholder"),
        (None, "pad_token_id", -5, "pad_token_id must be a token id in"),
        (None, "architectures", "KimiVL", "architectures must be a list of strings"),
    ],
)
def test_bad_field_values_are_config_errors(part, field, value, message):
    d = tiny_dict()
    (d[part] if part else d)[field] = value
    with pytest.raises(ConfigError, match=message):
        KimiVLConfig.from_dict(d)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"n_group": 2, "topk_group": 1, "num_experts_per_tok": 5}, "exceeds the experts reachable in topk_group=1"),
        ({"n_group": 8, "topk_group": 1, "num_experts_per_tok": 1}, "every group needs at least 2 experts"),
    ],
)
def test_grouped_routing_that_cannot_pick_its_experts_is_refused(fields, message):
    """Of 8 experts in 2 groups, top-1 group reaches only 4; groups of one expert have no top-2 to score them."""
    d = tiny_dict()
    assert d["text_config"]["n_routed_experts"] == 8
    d["text_config"].update(fields)
    with pytest.raises(ConfigError, match=message):
        KimiVLConfig.from_dict(d)


def test_moe_layer_freq_leaves_the_layers_between_dense():
    d = tiny_dict()
    d["text_config"].update(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)
    model = KimiVL(KimiVLConfig.from_dict(d))
    moe = [any("experts" in n for n, _ in layer.named_parameters()) for layer in model.language_model.model.layers]
    assert moe == [False, False, True, False]


def test_no_shared_experts_builds_without_a_warning_and_adds_nothing(recwarn):
    """Zero-width shared experts made torch warn at every build (a crash under -W error)."""
    d = tiny_dict()
    d["text_config"]["n_shared_experts"] = 0
    model = KimiVL(KimiVLConfig.from_dict(d))
    assert not [w for w in recwarn if "zero-element" in str(w.message)]
    mlp = model.language_model.model.layers[-1].mlp
    x = torch.randn(1, 3, d["text_config"]["hidden_size"])
    assert mlp.shared_experts.gate_proj.weight.shape == (0, d["text_config"]["hidden_size"])
    assert torch.equal(mlp.shared_experts(x), torch.zeros_like(x))


def test_every_layer_may_be_dense():
    """``first_k_dense_replace`` equal to the layer count (a dense model) is valid: no layer holds experts."""
    d = tiny_dict()
    d["text_config"]["first_k_dense_replace"] = d["text_config"]["num_hidden_layers"]
    model = KimiVL(KimiVLConfig.from_dict(d))
    assert not any("experts" in name for name, _ in model.named_parameters())
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, d["text_config"]["vocab_size"])


@pytest.mark.parametrize(
    "text",
    ["[1, 2]", '"kimi"', "null", "3", "[" * 100_000 + "]" * 100_000],
    ids=["list", "string", "null", "number", "deeply-nested"],
)
def test_a_config_that_is_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json"):
        KimiVLConfig.from_pretrained(tmp_path)


def test_non_utf8_config_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        KimiVLConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "part,field,value", [("text_config", "num_hidden_layers", 10**9), ("vision_config", "num_hidden_layers", 10**9)]
)
def test_absurd_layer_counts_fail_fast(tmp_path, part, field, value):
    d = tiny_dict()
    d[part][field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"{part}.num_hidden_layers .*at most 1024.*1000000000"):
        KimiVL.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 1.0


def test_absurd_model_size_is_refused_naming_the_size():
    d = tiny_dict()
    d["text_config"]["hidden_size"] = 2**30
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"about 1\.63e\+13 parameters .*GiB in bfloat16"):
        KimiVLConfig.from_dict(d)
    assert time.perf_counter() - start < 1.0


def test_estimate_matches_the_built_models():
    for name in ("tiny", "kimivl-tiny", "kimi-vl-a3b"):
        config = KimiVLConfig.from_preset(name)
        built = parameter_counts(config)["total"].total
        assert abs(estimated_parameters(config) - built) / built < 0.01, name
    assert estimated_parameters(KimiVLConfig.from_preset("kimi-vl-a3b")) < MAX_PARAMETERS


def test_null_pad_token_id_is_kept_and_generation_pads_with_the_first_eos(tmp_path):
    """transformers writes ``pad_token_id: null`` in DeepSeek-V3 text configs: the null is kept (a round trip writes
    it back), padding uses the first eos id, and left-padded batches generate exactly what each prompt gives alone."""
    d = tiny_dict()
    d["text_config"]["pad_token_id"] = None
    d["pad_token_id"] = None
    (tmp_path / "config.json").write_text(json.dumps(d))
    config = KimiVLConfig.from_pretrained(tmp_path)
    assert config.to_dict() == d and config.to_dict()["text_config"]["pad_token_id"] is None
    config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == d
    first_eos = d["text_config"]["eos_token_id"][0]
    assert config.text_config.pad_id == first_eos
    torch.manual_seed(0)
    model = KimiVL(config).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    params = SamplingParams(max_new_tokens=6)
    batch = generate_ids(model, prompts, params=params)
    alone = [generate_ids(model, [p], params=params)[0] for p in prompts]
    assert batch == alone and all(len(row) == 6 for row in batch)
    d["text_config"]["eos_token_id"] = 3843
    assert KimiVLConfig.from_dict(d).text_config.pad_id == 3843
    d["text_config"]["pad_token_id"] = 7
    assert KimiVLConfig.from_dict(d).text_config.pad_id == 7


QUANTIZED = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


@pytest.mark.parametrize(
    "part,field,value,message",
    [
        ("text_config", "rope_interleave", False, r"text_config.rope_interleave false is not supported: .*interleaved"),
        ("text_config", "rope_interleave", None, r"text_config.rope_interleave null is not supported"),
        ("text_config", "mlp_bias", True, r"text_config.mlp_bias true is not supported: .*no biases"),
        ("text_config", "head_dim", 24, r"text_config.head_dim 24 is not supported: .*qk_rope_head_dim \(8\)"),
        ("text_config", "qk_head_dim", 16, r"text_config.qk_head_dim 16 must be .* \(24\)"),
        (
            "text_config",
            "rope_parameters",
            {"rope_type": "yarn", "factor": 4.0, "rope_theta": 50000.0},
            r"text_config.rope_parameters .*yarn.* is not supported: Kimi-VL uses plain RoPE",
        ),
        (
            "text_config",
            "rope_parameters",
            {"rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5},
            r"rope_parameters .*partial_rotary_factor.* is not supported",
        ),
        (
            "text_config",
            "rope_parameters",
            {"rope_type": "default", "rope_theta": 10000.0},
            r"text_config.rope_parameters.rope_theta 10000.0 disagrees with rope_theta 50000.0",
        ),
        ("text_config", "model_type", "deepseek_v2", r"text_config.model_type 'deepseek_v2' is not supported"),
        ("vision_config", "model_type", "siglip", r"vision_config.model_type 'siglip' is not supported: .*MoonViT"),
        (None, "tie_word_embeddings", True, r"^tie_word_embeddings true is not supported: .*separate weights"),
        (None, "quantization_config", QUANTIZED, r"^quantization_config .*fp8.*: quantized checkpoints are not sup"),
        ("text_config", "quantization_config", QUANTIZED, r"text_config.quantization_config .*: quantized checkpoi"),
        ("vision_config", "quantization_config", QUANTIZED, r"vision_config.quantization_config .*: quantized chec"),
        (None, "torch_dtype", "int8", r"^torch_dtype must name a float type .*got \"int8\""),
        ("vision_config", "dtype", "float8_e4m3fn", r"vision_config.dtype must name a float type"),
    ],
)
def test_fields_kimivl_does_not_read_that_would_change_the_math_are_refused(part, field, value, message):
    """Fields of other DeepSeek-V3 or transformers configs that kimivl has no field for but that change what the model
    computes: a value other than the one kimivl computes is refused, not kept in ``extra`` and ignored."""
    d = tiny_dict()
    (d[part] if part else d)[field] = value
    with pytest.raises(ConfigError, match=message):
        KimiVLConfig.from_dict(d)


def test_those_fields_load_and_round_trip_when_they_say_what_kimivl_computes():
    """What transformers writes for the model kimivl implements, and the official files' other fields, load and are
    written back unchanged."""
    d = tiny_dict()
    t = d["text_config"]
    t |= {"rope_interleave": True, "mlp_bias": False, "head_dim": 8, "qk_head_dim": 24, "quantization_config": None}
    t |= {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, "rope_theta": 50000}
    t |= {"attention_dropout": 0.0, "ep_size": 1, "pretraining_tp": 1, "use_cache": True, "pad_token_id": None}
    d |= {"tie_word_embeddings": False, "transformers_version": "4.50.3", "auto_map": {"AutoConfig": "x.KimiVLConfig"}}
    config = KimiVLConfig.from_dict(d)
    assert config.to_dict() == d
    d["text_config"]["mlp_bias"] = d["tie_word_embeddings"] = None  # null is false, as transformers reads it
    assert KimiVLConfig.from_dict(d).to_dict() == d


def test_rope_parameters_give_the_rope_base_where_rope_theta_is_absent():
    """transformers 5 writes ``rope_parameters`` in place of ``rope_theta``: its base is the one RoPE uses, and the
    config is written back with that base in both (a long-context stage that sets rope_theta changes both)."""
    d = tiny_dict()
    d["text_config"].pop("rope_theta")
    d["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    config = KimiVLConfig.from_dict(d)
    assert config.text_config.rope_theta == 12345.0
    config.text_config.rope_theta = 800000.0
    written = config.to_dict()["text_config"]
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == 800000.0
    assert KimiVLConfig.from_dict(config.to_dict()).text_config.rope_theta == 800000.0


def test_shipped_configs_still_load_unchanged():
    from pathlib import Path

    for name in ("kimivl-tiny", "kimivl-tiny-thinking"):
        path = Path(__file__).parents[1] / "models" / name / "config.json"
        d = json.loads(path.read_text())
        assert KimiVLConfig.from_pretrained(path).to_dict() == d
    a3b = KimiVLConfig.from_preset("kimi-vl-a3b")
    assert dataclasses.replace(a3b.text_config, torch_dtype="float32").torch_dtype == "float32"


def test_a_model_is_not_built_on_a_config_changed_since_it_was_checked():
    """benchmarks/checkpoint_write.py gave the A3B config a 32,000-entry text_config and kept the placeholder id
    163605: KimiVL was built on it, and the config refused only when the first checkpoint was saved."""
    config = KimiVLConfig.from_preset("tiny")
    config.text_config = dataclasses.replace(config.text_config, vocab_size=3000, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ConfigError, match=r"media_placeholder_token_id \(3861\) is outside the vocabulary"):
        KimiVL(config)
    config = KimiVLConfig.from_preset("tiny")
    config.text_config.num_experts_per_tok = 9  # a part's field set in place: more than its 8 experts
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) exceeds the experts reachable"):
        KimiVL(config)
    config = KimiVLConfig.from_preset("tiny")
    config.vision_config.num_attention_heads = 5  # the vision part's too: 5 heads do not divide its width 64
    with pytest.raises(ConfigError, match=r"vision_config.num_attention_heads \(5\) must divide"):
        KimiVL(config)
