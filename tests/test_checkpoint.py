"""Saving and loading the official safetensors layout: round trips, sharding, dtypes, and every bad case."""

import json
import logging
import os
import re
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimivl import KimiVL, KimiVLConfig
from kimivl.checkpoint import INDEX, CheckpointError, CheckpointWriteError, convert_checkpoint, weights_size
from kimivl.config import ConfigError
from kimivl.devices import DeviceError, check_device
from kimivl.model.moe import to_dtype
from kimivl.train.plan import header_dtype


def official_keys(cfg):
    """The spec's key list (§7) expanded for a config."""
    v, t = cfg.vision_config, cfg.text_config
    keys = [
        "vision_tower.patch_embed.proj.weight",
        "vision_tower.patch_embed.proj.bias",
        "vision_tower.patch_embed.pos_emb.weight",
        "vision_tower.encoder.final_layernorm.weight",
        "vision_tower.encoder.final_layernorm.bias",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ]
    for i in range(v.num_hidden_layers):
        for m in ("norm0", "wqkv", "wo", "norm1", "mlp.fc0", "mlp.fc1"):
            keys += [f"vision_tower.encoder.blocks.{i}.{m}.weight", f"vision_tower.encoder.blocks.{i}.{m}.bias"]
    keys += [f"multi_modal_projector.{m}.{p}" for m in ("pre_norm", "linear_1", "linear_2") for p in ("weight", "bias")]
    for layer in range(t.num_hidden_layers):
        p = f"language_model.model.layers.{layer}."
        keys += [
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
            p + "self_attn.kv_a_layernorm.weight",
        ]
        keys += [p + f"self_attn.{m}.weight" for m in ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")]
        if layer < t.first_k_dense_replace:
            keys += [p + f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
        else:
            keys += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            keys += [p + f"mlp.shared_experts.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
            keys += [
                p + f"mlp.experts.{e}.{m}.weight"
                for e in range(t.n_routed_experts)
                for m in ("gate_proj", "up_proj", "down_proj")
            ]
    return keys


def test_state_dict_keys_are_the_official_ones(tiny_model, tiny_config):
    assert sorted(tiny_model.state_dict()) == sorted(official_keys(tiny_config))


def test_expert_tensors_have_official_shapes(tiny_model, tiny_config):
    t = tiny_config.text_config
    sd = tiny_model.state_dict()
    assert sd["language_model.model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (
        t.moe_intermediate_size,
        t.hidden_size,
    )
    assert sd["language_model.model.layers.1.mlp.experts.3.down_proj.weight"].shape == (
        t.hidden_size,
        t.moe_intermediate_size,
    )
    assert sd["language_model.model.layers.1.self_attn.kv_b_proj.weight"].shape == (
        t.num_attention_heads * (t.qk_nope_head_dim + t.v_head_dim),
        t.kv_lora_rank,
    )


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 300_000])
def test_round_trip_is_bit_exact(tiny_model, tmp_path, shard_bytes):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    sharded = os.path.isfile(tmp_path / INDEX)
    assert sharded == (shard_bytes < 5 * 2**30)
    if sharded:
        index = json.loads((tmp_path / INDEX).read_text())
        assert set(index["weight_map"]) == set(tiny_model.state_dict())
        assert len(set(index["weight_map"].values())) > 1
    loaded = KimiVL.from_pretrained(tmp_path, dtype=torch.float32)
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(tiny_model(ids).logits, loaded(ids).logits)


def test_the_config_names_the_dtype_the_files_hold(tiny_model, tmp_path):
    """Without a dtype, from_pretrained loads what the config names: a float32 save must reload in float32."""
    assert tiny_model.dtype == torch.float32 and tiny_model.config.text_config.torch_dtype == "bfloat16"
    for dtype, name in ((None, "float32"), (torch.bfloat16, "bfloat16")):
        tiny_model.save_pretrained(tmp_path / name, dtype=dtype)
        assert json.loads((tmp_path / name / "config.json").read_text())["text_config"]["torch_dtype"] == name
        assert KimiVL.from_pretrained(tmp_path / name).dtype == getattr(torch, name)
    assert tiny_model.config.text_config.torch_dtype == "bfloat16"  # the model's own config is left alone


def test_every_dtype_field_of_a_saved_config_names_the_dtype_saved(tiny_model, tmp_path):
    """An official config also names the dtype at the top level and in vision_config (transformers' ``"auto"`` reads
    the top-level one): a float32 save left those saying bfloat16."""
    tiny_model.save_pretrained(tmp_path / "official", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    config["vision_config"]["torch_dtype"] = config["torch_dtype"] = config["dtype"] = "bfloat16"
    (tmp_path / "official" / "config.json").write_text(json.dumps(config))
    model = KimiVL.from_pretrained(tmp_path / "official", dtype=torch.float32)
    model.save_pretrained(tmp_path / "f32")
    saved = json.loads((tmp_path / "f32" / "config.json").read_text())
    dtypes = [saved["torch_dtype"], saved["dtype"], saved["vision_config"]["torch_dtype"]]
    assert dtypes + [saved["text_config"]["torch_dtype"]] == ["float32"] * 4
    assert "dtype" not in saved["text_config"] and "dtype" not in saved["vision_config"]
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "f32" / "model.safetensors").values())
    assert model.config.to_dict()["torch_dtype"] == "bfloat16"  # the model's own config is left alone


@pytest.mark.parametrize("declared", ["top-level torch_dtype", "transformers 5 dtype"])
def test_a_dtype_named_only_at_the_top_level_is_the_stored_one(tiny_model, tmp_path, declared):
    """A float32 checkpoint whose text_config names no dtype loaded in bfloat16 (rounded) although the top level said
    float32; it loads in float32, exactly."""
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_config"]["torch_dtype"]
    if declared == "top-level torch_dtype":
        config["torch_dtype"] = "float32"
    else:
        config["dtype"] = config["text_config"]["dtype"] = "float32"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = KimiVL.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32
    for (k, a), b in zip(tiny_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_config_naming_different_dtypes_is_read_by_text_config_with_a_warning(tiny_model, tmp_path, caplog):
    """What kimivl's own float32 saves wrote before every dtype field was kept in step: text_config float32, the top
    level bfloat16. text_config's is the weights' dtype, and the contradiction is named."""
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    with caplog.at_level(logging.WARNING, logger="kimivl.config"):
        assert KimiVL.from_pretrained(tmp_path).dtype == torch.float32
    assert "different dtypes for its weights (text_config.torch_dtype float32, torch_dtype bfloat16)" in caplog.text


def test_a_model_held_in_bf16_saves_and_reloads_in_bf16(tiny_model, tmp_path):
    """The routers stay float32 in a bf16 model; the config named them (float32), so a bf16 checkpoint saved as held
    reloaded in float32, twice the memory."""
    tiny_model.save_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    held = KimiVL.from_pretrained(tmp_path / "a")
    assert held.dtype == torch.bfloat16 and held.language_model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    held.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["text_config"]["torch_dtype"] == "bfloat16"
    again = KimiVL.from_pretrained(tmp_path / "b")
    assert again.dtype == torch.bfloat16
    for (k, a), (k2, b) in zip(held.state_dict().items(), again.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    again.save_pretrained(tmp_path / "c")
    b, c = load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert b.keys() == c.keys() and all(b[k].dtype == c[k].dtype and torch.equal(b[k], c[k]) for k in b)


def test_from_pretrained_names_a_bad_dtype_or_device(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype .* got 'float32'"):
        KimiVL.from_pretrained(tmp_path, dtype="float32")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        KimiVL.from_pretrained(tmp_path, dtype=torch.int8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, words in (("meta", "meta holds no weights"), ("cuda", "CUDA is not available"), ("gpu", "not a")):
        with pytest.raises(DeviceError, match=f"device='{device}': {words}"):
            KimiVL.from_pretrained(tmp_path, device=device)
    assert KimiVL.from_pretrained(tmp_path, device=None).language_model.lm_head.weight.device.type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac: prefill's kernel is CPU-only
    with pytest.raises(DeviceError, match="device='mps': mps is not supported by kimivl; use device='cpu'"):
        KimiVL.from_pretrained(tmp_path, device="mps")


def test_check_device_with_a_gpu_takes_its_indices_and_names_other_devices(monkeypatch):
    """On a machine of one GPU: cuda and cuda:0 are taken, cuda:1 is named; a value no device name is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    devices = (None, "cuda", "cuda:0", torch.device("cuda", 0))
    assert [check_device(d) for d in devices] == ["cuda", "cuda", "cuda:0", "cuda:0"]
    with pytest.raises(DeviceError, match=r"--device cuda:1: this machine has 1 CUDA device\(s\); use cuda:0..cuda:0$"):
        check_device("cuda:1", "--device")
    with pytest.raises(DeviceError, match="device='1.5': not a device name"):
        check_device(1.5)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac: other devices are still absent
    with pytest.raises(DeviceError, match="device='xpu': xpu is not available here; use device='cpu' or cuda"):
        check_device("xpu")


def test_resharding_removes_stale_shards(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    tiny_model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    KimiVL.from_pretrained(tmp_path)


def test_shards_take_the_official_one_based_names(tiny_model, tmp_path):
    """The files of a sharded save are named as the release's are, ``model-00001-of-0000N`` up to N, each named by
    the index."""
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(set(json.loads((tmp_path / INDEX).read_text())["weight_map"].values())) == shards


def _full_disk_at(monkeypatch, n):
    """``save_file`` failing as on a full disk at its ``n``-th call."""
    from safetensors import SafetensorError

    from kimivl import checkpoint

    calls, real = [], checkpoint.save_file

    def save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def _changed_and_cut_short(model, path, monkeypatch, n):
    """Every parameter of ``model`` moved by 1, then saved over ``path`` in shards, the disk full at the ``n``-th."""
    from kimivl.checkpoint import CheckpointWriteError

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with monkeypatch.context() as m:
        _full_disk_at(m, n)
        with pytest.raises(CheckpointWriteError, match="disk is full"):
            model.save_pretrained(path, max_shard_bytes=300_000)


def test_a_save_cut_short_over_a_sharded_one_is_refused_not_mixed(tiny_model, tmp_path, monkeypatch):
    """A full disk at the second shard of a save over a sharded save of other weights leaves shards of both: loading
    refuses them (it loaded 35 new tensors and 121 old ones), and a save in full mends the folder. A conversion in
    place cut short leaves one save's weights, which load."""
    from kimivl.checkpoint import CheckpointWriteError

    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    _changed_and_cut_short(tiny_model, tmp_path, monkeypatch, 2)
    with pytest.raises(CheckpointError, match="holds shards of two saves: model-00001-of-.* save or convert"):
        KimiVL.from_pretrained(tmp_path)
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    loaded = KimiVL.from_pretrained(tmp_path).state_dict()  # the new weights: every parameter moved by 1
    assert all(torch.equal(loaded[k], t) for k, t in tiny_model.state_dict().items())
    with monkeypatch.context() as m:
        _full_disk_at(m, 3)
        with pytest.raises(CheckpointWriteError, match="disk is full"):
            convert_checkpoint(tmp_path, tmp_path, torch.bfloat16)
    half = KimiVL.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    for k, t in tiny_model.state_dict().items():
        torch.testing.assert_close(half[k], t, atol=0, rtol=2**-8)


def test_a_save_cut_short_over_an_unnamed_save_is_refused_too(tiny_model, tmp_path, monkeypatch):
    """Over an older kimivl save or a gathered one (every file marked ``UNNAMED``), whose index stays when the new
    save is cut short: the new save's marked shards are refused beside it (they loaded, 34 new tensors and 125 old)."""
    from types import SimpleNamespace

    from kimivl import checkpoint
    from kimivl.checkpoint import UNNAMED, WRITER

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "uuid", SimpleNamespace(uuid4=lambda: SimpleNamespace(hex=UNNAMED)))
        tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    assert json.loads((tmp_path / INDEX).read_text())["metadata"][WRITER] == UNNAMED
    KimiVL.from_pretrained(tmp_path)
    _changed_and_cut_short(tiny_model, tmp_path, monkeypatch, 3)
    with pytest.raises(CheckpointError, match="holds shards of two saves: model-00001-of-"):
        KimiVL.from_pretrained(tmp_path)


def test_a_conversion_marks_every_file_as_its_sources_index_frozen_shards_too(tiny_model, tmp_path):
    """A training checkpoint's frozen shards, linked from the one before, bear that one's mark and a fingerprint; its
    conversion marks every file with the index's save and keeps no fingerprint, so that a conversion of another
    checkpoint cut short over it is refused whichever files it reached."""
    from safetensors import safe_open

    from kimivl.checkpoint import FROZEN_FINGERPRINT, WRITER, save_checkpoint

    tiny_model.vision_tower.requires_grad_(False)
    save_checkpoint(tiny_model, tmp_path / "a", max_shard_bytes=300_000, frozen_apart=True)
    save_checkpoint(tiny_model, tmp_path / "b", max_shard_bytes=300_000, frozen_apart=True, frozen_from=tmp_path / "a")
    tiny_model.config.save_pretrained(tmp_path / "b")

    def marks(path):
        index = json.loads((path / INDEX).read_text())["metadata"][WRITER]
        shards = []
        for file in sorted(path.glob("model-*.safetensors")):
            with safe_open(file, framework="pt") as f:
                meta = f.metadata()
            shards.append((meta[WRITER], FROZEN_FINGERPRINT in meta))
        return index, shards

    index, shards = marks(tmp_path / "b")
    assert {(m == index, frozen) for m, frozen in shards} == {(False, True), (True, False)}  # linked, and written
    convert_checkpoint(tmp_path / "b", tmp_path / "c", torch.bfloat16)
    assert marks(tmp_path / "c") == (index, [(index, False)] * len(shards))
    KimiVL.from_pretrained(tmp_path / "c")


def test_a_checkpoint_converted_file_by_file_equals_one_saved_in_that_dtype(tiny_model, tmp_path):
    """An export: each file of a float32 checkpoint written again in bf16 (same files and keys, the index's size
    updated), into a directory holding an older single-file save, whose file goes."""
    tiny_model.save_pretrained(tmp_path / "f32", max_shard_bytes=300_000)
    tiny_model.save_pretrained(tmp_path / "out")  # an older export of one file
    convert_checkpoint(tmp_path / "f32", tmp_path / "out", torch.bfloat16)
    files = sorted(p.name for p in (tmp_path / "f32").iterdir())
    assert len(files) > 3 and sorted(p.name for p in (tmp_path / "out").iterdir()) == files
    tiny_model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    expected = load_file(tmp_path / "bf16" / "model.safetensors")
    got = {}
    for file in (tmp_path / "out").glob("*.safetensors"):
        got |= load_file(file)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    assert (tmp_path / "out" / "config.json").read_text() == (tmp_path / "bf16" / "config.json").read_text()
    assert KimiVL.from_pretrained(tmp_path / "out").dtype == torch.bfloat16  # the config names what it holds
    loaded = KimiVL.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(
        loaded(ids).logits, KimiVL.from_pretrained(tmp_path / "bf16", dtype=torch.float32)(ids).logits
    )


def test_a_conversion_holds_one_file_at_a_time(tiny_model, tmp_path, monkeypatch):
    """Memory of one file, not two: when a tensor is converted, every tensor of the files written before is freed, and
    so is the source tensor converted before it (the source is read a tensor at a time)."""
    from kimivl import checkpoint

    tiny_model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, max_shard_bytes=300_000)
    written, sources = [], []  # weak references to the tensors of the files written, and to each source tensor
    for_file, atomic_save = checkpoint._for_file, checkpoint._atomic_save

    def converted(key, t, dtype):
        assert not [r for r in written + sources if r() is not None], f"{key}: an earlier tensor is still held"
        sources.append(weakref.ref(t))
        return for_file(key, t, dtype)

    def save(tensors, file, *marks):
        atomic_save(tensors, file, *marks)
        written.extend(weakref.ref(t) for t in tensors.values())

    monkeypatch.setattr(checkpoint, "_for_file", converted)
    monkeypatch.setattr(checkpoint, "_atomic_save", save)
    convert_checkpoint(tmp_path / "bf16", tmp_path / "f32", torch.float32)
    assert len(list((tmp_path / "f32").glob("*.safetensors"))) > 3 and len(sources) == len(tiny_model.state_dict())


ROUTER = "language_model.model.layers.1.mlp.gate."


def _routed_by_its_bias(model):
    """``model`` with layer 1's router choosing by its selection bias: biases 1 + k/1000 (no bf16 value: bf16 holds
    1, 1.0078 ... there) over scores that differ by less, from a router weight scaled down (values bf16 cannot hold
    either). Returns the router and a batch of hidden states for it."""
    gate = model.language_model.model.layers[1].mlp.gate
    with torch.no_grad():
        gate.weight.mul_(1e-3)
        gate.e_score_correction_bias.copy_(1.0 + 1e-3 * torch.tensor([3.0, 7, 0, 5, 1, 6, 2, 4]))
    return gate, torch.randn(16, gate.weight.shape[1], generator=torch.Generator().manual_seed(0))


def test_a_narrower_save_keeps_the_routers_in_float32_so_a_reload_routes_alike(tiny_model, tmp_path):
    """Saved in bf16 (or converted to it), every float tensor is bf16 in the file but the routers' weight and selection
    bias, which stay float32 as ``to_dtype`` holds them: reloaded, they are the saved values exactly and choose the
    same experts with the same weights. In bf16 the bias's small trained steps round away and the choice changes."""
    gate, x = _routed_by_its_bias(tiny_model)
    weights, experts, _ = gate(x)
    tiny_model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    tiny_model.save_pretrained(tmp_path / "f32", max_shard_bytes=300_000)
    convert_checkpoint(tmp_path / "f32", tmp_path / "converted", torch.bfloat16)
    held = to_dtype(KimiVL.from_pretrained(tmp_path / "f32"), torch.bfloat16).state_dict()  # as a bf16 save writes
    for name in ("bf16", "converted"):
        loaded = KimiVL.from_pretrained(tmp_path / name)
        again = loaded.language_model.model.layers[1].mlp.gate
        weights_again, experts_again, _ = again(x)
        assert torch.equal(experts_again, experts), name
        torch.testing.assert_close(weights_again, weights, rtol=0, atol=0)
        assert torch.equal(again.weight, gate.weight)
        assert torch.equal(again.e_score_correction_bias, gate.e_score_correction_bias)
        assert loaded.dtype == torch.bfloat16
        for (key, a), b in zip(held.items(), loaded.state_dict().values()):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        on_disk = {}
        for file in (tmp_path / name).glob("*.safetensors"):
            on_disk |= load_file(file)
        routers = {k for k in on_disk if ".mlp.gate." in k}
        assert len(routers) == 2 * (tiny_model.config.text_config.num_hidden_layers - 1)
        assert {on_disk[k].dtype for k in routers} == {torch.float32}, name
        assert {t.dtype for k, t in on_disk.items() if k not in routers and t.is_floating_point()} == {torch.bfloat16}
    index = json.loads((tmp_path / "converted" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())


def test_an_official_checkpoint_with_bf16_routers_loads_them_in_float32(tiny_model, tmp_path):
    """Released checkpoints store the routers in bf16: loaded, they hold those values in float32, and a bf16 save
    writes them in float32."""
    tiny_model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    _rewrite(tmp_path, lambda t: t.update({k: v.bfloat16() for k, v in t.items() if ".mlp.gate." in k}))
    official = load_file(tmp_path / "model.safetensors")
    assert {t.dtype for t in official.values()} == {torch.bfloat16}
    loaded = KimiVL.from_pretrained(tmp_path)
    state = loaded.state_dict()
    for name in ("weight", "e_score_correction_bias"):
        key = ROUTER + name
        assert state[key].dtype == torch.float32 and torch.equal(state[key], official[key].float()), key
    loaded.save_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again[ROUTER + "weight"].dtype == torch.float32 and torch.equal(
        again[ROUTER + "weight"], state[ROUTER + "weight"]
    )


def test_shards_fill_to_exactly_the_limit_and_the_index_counts_the_saved_dtype(tiny_model, tmp_path):
    """Tensors whose bytes sum to ``max_shard_bytes`` share one file; saved in bf16, the index's ``total_size`` is
    the bf16 bytes the files hold, not the float32 bytes the model holds."""
    limit, first = 0, set()
    for key, t in tiny_model.state_dict().items():
        first.add(key)
        limit += t.numel() * t.element_size()
        if len(first) == 3:
            break
    tiny_model.save_pretrained(tmp_path / "f32", max_shard_bytes=limit)
    shards = sorted((tmp_path / "f32").glob("model-*.safetensors"))
    assert len(shards) > 2 and set(load_file(shards[0])) == first
    tiny_model.save_pretrained(tmp_path / "bf16", max_shard_bytes=limit, dtype=torch.bfloat16)
    held = [t for file in (tmp_path / "bf16").glob("model-*.safetensors") for t in load_file(file).values()]
    assert {t.dtype for t in held} == {torch.bfloat16, torch.float32}  # the routers stay float32
    index = json.loads((tmp_path / "bf16" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in held)


@pytest.mark.parametrize("held, saved", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_shards_are_sized_in_the_dtype_written(tiny_model, tmp_path, held, saved):
    """A model saved in another dtype is cut into files as a model held in that dtype is: no file holds more than
    ``max_shard_bytes`` of tensors when saving wider (sized by the dtype held, a bf16 model's float32 files reached
    1.6x the limit), and files are not left half full when saving narrower."""
    limit = 4_000_000  # above every tensor (the largest is 2.1 MB in float32)
    to_dtype(tiny_model, held).save_pretrained(tmp_path / "cast", max_shard_bytes=limit, dtype=saved)
    to_dtype(tiny_model, saved).save_pretrained(tmp_path / "held", max_shard_bytes=limit)
    files = sorted((tmp_path / "cast").glob("model-*.safetensors"))
    assert len(files) > 1
    for file in files:
        assert sum(t.numel() * t.element_size() for t in load_file(file).values()) <= limit, file.name
    index, expected = (json.loads((tmp_path / d / INDEX).read_text()) for d in ("cast", "held"))
    assert index["weight_map"] == expected["weight_map"]
    assert index["metadata"]["total_size"] == expected["metadata"]["total_size"]


def test_bf16_and_float32_loading(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert all(t.dtype == (torch.float32 if ".mlp.gate." in k else torch.bfloat16) for k, t in on_disk.items())
    bf16 = KimiVL.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp32 = KimiVL.from_pretrained(tmp_path, dtype=torch.float32)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    gate = "language_model.model.layers.1.mlp.gate.weight"
    assert bf16.state_dict()[gate].dtype == torch.float32  # the router stays float32 for exact routing
    for k, t in on_disk.items():
        assert torch.equal(fp32.state_dict()[k], t.float()), k
    assert KimiVL.from_pretrained(tmp_path).dtype == torch.bfloat16  # config torch_dtype is the default


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_mismatches_are_listed_together(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)

    def break_it(t):
        del t["language_model.model.norm.weight"]
        t["language_model.model.layers.0.extra.weight"] = torch.zeros(2)
        t["language_model.lm_head.weight"] = torch.zeros(3, 3)

    _rewrite(tmp_path, break_it)
    with pytest.raises(CheckpointError) as e:
        KimiVL.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing tensors (1)" in msg and "language_model.model.norm.weight" in msg
    assert "unexpected tensors (1)" in msg and "layers.0.extra.weight" in msg
    assert "wrongly shaped tensors (1)" in msg and "lm_head.weight: checkpoint [3, 3]" in msg


def test_ignorable_rotary_buffers_are_skipped(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    _rewrite(
        tmp_path, lambda t: t.update({"language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    )
    KimiVL.from_pretrained(tmp_path)


def test_missing_and_pickle_checkpoints(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        KimiVL.from_pretrained(tmp_path)
    tiny_model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        KimiVL.from_pretrained(tmp_path)


def test_a_file_of_a_checkpoint_given_for_its_directory_is_named(checkpoint):
    """KimiVL.from_pretrained('.../config.json') said "no model.safetensors or model.safetensors.index.json in
    .../config.json", the processor "tokenizer directory .../config.json has no tiktoken.model", as if the path
    were a directory; each now says it is a file and names the directory, as the command line's --model does."""
    from kimivl import KimiVLProcessor

    for name in ("config.json", "model.safetensors"):
        file = checkpoint / name
        message = "^" + re.escape(f"{file} is a file: give the checkpoint directory ({checkpoint})") + "$"
        for load in (KimiVL.from_pretrained, KimiVLProcessor.from_pretrained, convert_checkpoint):
            args = (file, checkpoint.parent / "converted", torch.float32) if load is convert_checkpoint else (file,)
            with pytest.raises(CheckpointError, match=message):
                load(*args)
            with pytest.raises(CheckpointError, match=message):
                load(str(file), *args[1:])
    assert not (checkpoint.parent / "converted").exists()


def test_the_weights_size_counts_no_broken_link(tmp_path):
    """The size the command line announces a load with: a shard that is a dangling link counts as no file, no bytes
    (its stat would raise; from_pretrained names it)."""
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "missing")
    (tmp_path / "c.json").write_bytes(b"x" * 100)
    assert weights_size(tmp_path) == (1, 10)


def test_corrupt_safetensors_file(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        KimiVL.from_pretrained(tmp_path)


def test_weights_or_a_folder_this_user_may_not_read_are_named_as_such(tiny_model, tmp_path, unprivileged):
    """safetensors calls a file it may not read "No such file or directory", and a folder that may not be entered
    was "no config.json at" it: another user's checkpoint sent the user looking for files that are there."""
    tiny_model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").chmod(0)
    for read in (KimiVL.from_pretrained, header_dtype):  # loading, and planning (kimivl info --train)
        with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors: Permission denied$"):
            unprivileged(lambda: read(tmp_path / "m"))
    (tmp_path / "m").chmod(0o600)  # readable, not to be entered
    with pytest.raises(ConfigError, match=r"cannot read .*m/config\.json: Permission denied$"):
        unprivileged(lambda: KimiVL.from_pretrained(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="no config.json at"):  # a name the OS cannot be given: none there
        KimiVLConfig.from_pretrained(f"{tmp_path}/m\x00")
    (tmp_path / "m").chmod(0o700)
    (tmp_path / "m" / "config.json").chmod(0)
    with pytest.raises(ConfigError, match=r"cannot read .*m/config\.json: Permission denied$"):
        unprivileged(lambda: KimiVL.from_pretrained(tmp_path / "m"))


def test_a_save_or_conversion_into_a_folder_that_cannot_be_made_is_a_write_error(tiny_model, tmp_path, unprivileged):
    """The folder was made outside the save's error handling: a read-only or full disk gave a bare OSError, where
    ``save_pretrained`` promises a ``CheckpointError``."""
    tiny_model.save_pretrained(tmp_path / "m")
    (tmp_path / "ro").mkdir(mode=0o555)
    for save in (
        lambda: tiny_model.save_pretrained(tmp_path / "ro" / "new"),
        lambda: convert_checkpoint(tmp_path / "m", tmp_path / "ro" / "new", torch.bfloat16),
    ):
        with pytest.raises(CheckpointWriteError, match=r"cannot write .*/ro/new: Permission denied"):
            unprivileged(save)


def test_index_naming_absent_shard(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        KimiVL.from_pretrained(tmp_path)


def test_broken_indexes_and_shards_that_disagree_with_them(tiny_model, tmp_path):
    """The index is authoritative: a shard lacking a key it assigns, or a key it assigns to two files, is named;
    a key a shard holds but the index assigns elsewhere is taken from where the index says."""
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    first, second = (tmp_path / name for name in shards[:2])
    moved = next(k for k, name in index["weight_map"].items() if name == shards[1])

    # a stale copy of `moved` (zeros) in the first shard: ignored, the index points at the second
    tensors = load_file(first)
    save_file({**tensors, moved: torch.zeros_like(load_file(second)[moved])}, first)
    loaded = KimiVL.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.state_dict()[moved], tiny_model.state_dict()[moved])
    # and in the second shard, read after the first, a stale copy of a key of the first and a key the index never names
    kept = next(k for k, name in index["weight_map"].items() if name == shards[0])
    later = load_file(second)
    save_file({**later, kept: torch.zeros_like(tensors[kept]), "stray.weight": torch.ones(2)}, second)
    loaded = KimiVL.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.state_dict()[kept], tiny_model.state_dict()[kept]) and tensors[kept].abs().sum() > 0
    save_file(later, second)

    # the index assigns `moved` to the first shard, which now lacks it
    save_file(tensors, first)
    (tmp_path / INDEX).write_text(json.dumps({**index, "weight_map": {**index["weight_map"], moved: shards[0]}}))
    with pytest.raises(CheckpointError, match=f"lacks keys its index assigns to it: \\['{moved}'\\]"):
        KimiVL.from_pretrained(tmp_path)

    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not a valid safetensors index"):
        KimiVL.from_pretrained(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="is not a valid safetensors index: KeyError"):
        KimiVL.from_pretrained(tmp_path)


def test_config_mismatch_reports_shapes(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"experts\.0\.gate_proj\.weight: checkpoint \[64, 128\] vs model \[32, 128\]"
    ):
        KimiVL.from_pretrained(tmp_path)


def test_loading_fills_preallocated_storage(tiny_model, tmp_path):
    """Tensors are copied into the model built on the meta device, not collected into a second state dict."""
    from kimivl.checkpoint import load_checkpoint

    tiny_model.save_pretrained(tmp_path)
    target = KimiVL(tiny_model.config)
    ptrs = {k: v.data_ptr() for k, v in target.state_dict(keep_vars=True).items()}
    load_checkpoint(target, tmp_path)
    assert {k: v.data_ptr() for k, v in target.state_dict(keep_vars=True).items()} == ptrs
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), tiny_model.state_dict().values()))


def test_a_float64_checkpoint_keeps_its_routers_in_float64(tiny_model, tmp_path):
    gate = "language_model.model.layers.1.mlp.gate."
    tiny_model.save_pretrained(tmp_path, dtype=torch.float64)
    on_disk = load_file(tmp_path / "model.safetensors")
    on_disk[gate + "weight"] += 1e-12  # values that float32 cannot hold
    save_file(on_disk, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = KimiVL.from_pretrained(tmp_path)
    state = loaded.state_dict()
    assert loaded.dtype == torch.float64
    for name in ("weight", "e_score_correction_bias"):
        assert state[gate + name].dtype == torch.float64 and torch.equal(state[gate + name], on_disk[gate + name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_save_is_bit_exact(tiny_model, tmp_path, dtype):
    """A model held in ``dtype`` (its routers in float32), saved, loaded in ``dtype`` and saved again: the same
    tensors, bit for bit, in the same dtypes."""
    to_dtype(tiny_model, dtype).save_pretrained(tmp_path / "first")
    KimiVL.from_pretrained(tmp_path / "first", dtype=dtype).save_pretrained(tmp_path / "second")
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second"))
    assert first.keys() == second.keys() == tiny_model.state_dict().keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    assert {t.dtype for t in first.values()} == {dtype, torch.float32}
