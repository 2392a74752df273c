"""Checkpoints that are wrong in kind, hold non-finite values, point outside their directory, share a directory with
another model, or meet a full disk."""

import errno
import json
import logging
import os
import re
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimivl import KimiVL
from kimivl import checkpoint as ckpt
from kimivl.checkpoint import INDEX, CheckpointError
from kimivl.config import ConfigError
from kimivl.train.pipeline import _unloaded_model


@pytest.fixture()
def saved(tiny_model, tmp_path):
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "part, sizes, wrong",
    [
        (
            "text_config",
            {"vocab_size": 10**9},
            r"embed_tokens\.weight: checkpoint \[4096, 128\] vs model \[1000000000, 128\]",
        ),
        (
            "text_config",
            {"n_routed_experts": 10**6},
            r"layers\.1\.mlp\.gate\.weight: checkpoint \[8, 128\] vs model \[1000000, 128\]",
        ),
        (
            "vision_config",
            {"init_pos_emb_height": 10**5, "init_pos_emb_width": 10**5},
            r"pos_emb\.weight: checkpoint \[16, 16, (\d+)\] vs model \[100000, 100000, \1\]",
        ),
    ],
    ids=["vocab", "experts", "pos_emb"],
)
@pytest.mark.parametrize("load", [KimiVL.from_pretrained, _unloaded_model], ids=["from_pretrained", "sharded_run"])
def test_config_sizes_far_from_the_weights_are_refused_before_the_model_is_allocated(
    saved, monkeypatch, part, sizes, wrong, load
):
    """A config.json asking for terabytes (under the parameter cap) met the allocator before its shapes were compared
    with the weights': a raw 'DefaultCPUAllocator: can't allocate' error. The weights' headers are compared with the
    model on the meta device first; a million experts are refused from the routers, before a state names each one.
    A sharded training run, which builds the model of each stage's checkpoint unloaded and has each rank allocate
    its shards, compares them as early."""
    config = json.loads((saved / "config.json").read_text())
    config[part].update(sizes)
    (saved / "config.json").write_text(json.dumps(config))

    def allocate(*args, **kwargs):
        raise AssertionError("the model was allocated")

    monkeypatch.setattr(torch.nn.Module, "to_empty", allocate)
    with pytest.raises(CheckpointError) as e:
        load(saved)
    message = str(e.value)
    assert f"does not match the model that {saved / 'config.json'} describes:\nwrongly shaped tensors" in message
    assert re.search(wrong, message), message


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_float_tensors_are_refused(saved, dtype):
    tensors = load_file(saved / "model.safetensors")
    name = "language_model.model.embed_tokens.weight"
    tensors[name] = (tensors[name] * 100).to(dtype)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=rf"wrong kind.*\n  {name}: checkpoint (I8|BOOL|I64) where the model "
        r"holds torch\.(bfloat16|float32)",
    ):
        KimiVL.from_pretrained(saved)


@pytest.mark.parametrize("with_scales", [False, True])
def test_quantized_weights_are_refused_by_name(saved, tmp_path, with_scales):
    """float8 weights were cast into the model with no scale (values 8x off, no warning); with their
    ``weight_scale_inv`` tensors the error named only unexpected tensors. Loading and converting refuse both as a
    quantized checkpoint, before anything is written."""
    tensors = load_file(saved / "model.safetensors")
    for k in [k for k in tensors if "q_proj" in k]:
        tensors[k] = (tensors[k] * 8).to(torch.float8_e4m3fn)
        if with_scales:
            tensors[k + "_scale_inv"] = torch.full((1, 1), 0.125)
    save_file(tensors, saved / "model.safetensors")
    message = (
        r"holds float8_e4m3fn \(4 tensors, e\.g\. language_model\.model\.layers\.0\.self_attn\.q_proj\.weight\): "
        r"float8_e4m3fn weights \(a quantized checkpoint\) are not supported; use the bf16 release"
    )
    with pytest.raises(CheckpointError, match=message):
        KimiVL.from_pretrained(saved)
    with pytest.raises(CheckpointError, match=message):
        ckpt.convert_checkpoint(saved, tmp_path / "out", torch.bfloat16)
    assert not (tmp_path / "out").exists()


def test_a_conversion_refuses_a_source_whose_config_is_not_kimi_vls_before_writing(saved, tmp_path):
    """A config.json that loading would refuse (here without its vision_config) is refused before a converted copy of
    the weights, with that config, is written."""
    config = json.loads((saved / "config.json").read_text())
    del config["vision_config"]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json has no vision_config object"):
        ckpt.convert_checkpoint(saved, tmp_path / "out", torch.bfloat16)
    assert not (tmp_path / "out").exists()


def test_non_finite_values_are_named_in_a_warning(saved, caplog):
    tensors = load_file(saved / "model.safetensors")
    bad = ["language_model.lm_head.weight", "vision_tower.patch_embed.proj.bias"]
    tensors[bad[0]][3, 5] = float("nan")
    tensors[bad[1]][0] = float("-inf")
    save_file(tensors, saved / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="kimivl.checkpoint"):
        model = KimiVL.from_pretrained(saved, dtype=torch.float32)
    [record] = [r for r in caplog.records if "NaN or inf" in r.message]
    assert "in 2 tensors" in record.message and all(b in record.message for b in bad)
    assert torch.isnan(model.language_model.lm_head.weight[3, 5])


def test_a_warning_of_ten_non_finite_tensors_names_them_all_and_of_eleven_says_more(caplog):
    with caplog.at_level(logging.WARNING, logger="kimivl.checkpoint"):
        ckpt.warn_non_finite("c", [f"t{i}" for i in range(10)])
        ckpt.warn_non_finite("c", [f"t{i}" for i in range(11)])
    ten, eleven = (r.message for r in caplog.records)
    assert ten.endswith("t8, t9; its outputs will not be usable")
    assert eleven.endswith("t8, t9 ...; its outputs will not be usable") and "t10" not in eleven


def test_integer_tensors_keep_their_dtype_in_a_save_of_another_dtype():
    assert ckpt.saved_dtype("x.mask", torch.zeros(2, dtype=torch.int64), torch.bfloat16) == torch.int64
    assert ckpt.saved_dtype("x.weight", torch.zeros(2), torch.bfloat16) == torch.bfloat16


def test_a_frozen_shard_s_fingerprint_tells_values_of_equal_sum_apart():
    """Summed alone, [1, -1] and [2, -2] agree: the sum of magnitudes tells them apart."""
    a, b = {"w": torch.tensor([1.0, -1.0])}, {"w": torch.tensor([2.0, -2.0])}
    assert ckpt._fingerprint(a, ["w"]) != ckpt._fingerprint(b, ["w"])


def test_a_save_into_a_folder_of_other_files_that_it_overwrites_none_of_is_allowed(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    ckpt.check_overwrite(tmp_path, ["model.safetensors", "config.json"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="would overwrite its config.json"):
        ckpt.check_overwrite(tmp_path, ["model.safetensors", "config.json"])


@pytest.mark.parametrize("dtype", ckpt.WEIGHT_DTYPES)
def test_is_finite_finds_any_nan_or_inf(dtype):
    """``is_finite`` (by the least and greatest values) agrees with ``isfinite(t).all()``: one NaN, +inf or -inf
    anywhere (a non-contiguous view too), both infinities, NaN alone; an empty tensor and an integer one are finite."""
    inf, nan = float("inf"), float("nan")
    assert ckpt.is_finite(torch.randn(64, 33).to(dtype)) and ckpt.is_finite(torch.tensor(65504.0, dtype=dtype))
    assert ckpt.is_finite(torch.empty(0, 5, dtype=dtype)) and ckpt.is_finite(torch.tensor([], dtype=torch.int64))
    for bad in ([nan], [inf], [-inf], [-inf, inf], [nan, inf], [-inf, nan, 1.0]):
        assert not ckpt.is_finite(torch.tensor(bad, dtype=dtype)), bad
    for value in (nan, inf, -inf):
        for at in ((0, 0), (17, 5), (63, 32)):
            t = torch.randn(64, 33).to(dtype)
            t[at] = value
            assert not ckpt.is_finite(t), (value, at)
            assert ckpt.is_finite(t.t()[5:]) == (at[1] < 5), (value, at)  # a non-contiguous view: columns 5 on


def test_finite_checkpoints_load_without_warning(saved, caplog):
    with caplog.at_level(logging.WARNING, logger="kimivl.checkpoint"):
        KimiVL.from_pretrained(saved)
    assert not caplog.records


@pytest.mark.parametrize(
    "weight_map,message",
    [
        (["model-00001-of-00002.safetensors"], "'weight_map' must map tensor names to shard file names, got list"),
        ("model.safetensors", "'weight_map' must map tensor names to shard file names, got str"),
        ({"language_model.lm_head.weight": 3}, "maps to 3"),
        ({"language_model.lm_head.weight": None}, "maps to None"),
        ({"language_model.lm_head.weight": ""}, "maps to ''"),
        ({"language_model.lm_head.weight": ["a", "b"]}, r"maps to \['a', 'b'\]"),
    ],
)
def test_malformed_weight_maps(tiny_model, tmp_path, weight_map, message):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        KimiVL.from_pretrained(tmp_path)


def test_nested_index_json(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    (tmp_path / INDEX).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        KimiVL.from_pretrained(tmp_path)


@pytest.mark.parametrize("outside", ["absolute", "dotdot", "nested-dotdot"])
def test_index_entries_outside_the_directory_are_refused(tiny_model, tmp_path, outside):
    ckpt_dir = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt_dir, max_shard_bytes=300_000)
    index = json.loads((ckpt_dir / INDEX).read_text())
    first = min(index["weight_map"].values())
    (tmp_path / "elsewhere").mkdir()
    os.replace(ckpt_dir / first, tmp_path / "elsewhere" / first)  # the shard exists, but outside
    name = {
        "absolute": str(tmp_path / "elsewhere" / first),
        "dotdot": f"../elsewhere/{first}",
        "nested-dotdot": f"sub/../../elsewhere/{first}",
    }[outside]
    index["weight_map"] = {k: name if v == first else v for k, v in index["weight_map"].items()}
    (ckpt_dir / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        KimiVL.from_pretrained(ckpt_dir)


def test_shards_in_subdirectories_are_allowed(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / INDEX).read_text())
    (tmp_path / "shards").mkdir()
    for name in set(index["weight_map"].values()):
        os.replace(tmp_path / name, tmp_path / "shards" / name)
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    (tmp_path / INDEX).write_text(json.dumps(index))
    loaded = KimiVL.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded.language_model.lm_head.weight, tiny_model.language_model.lm_head.weight)


def _listing(path):
    return {p.name: p.stat().st_mtime_ns for p in path.iterdir()}


def test_save_refuses_a_directory_holding_another_models_shards(tiny_model, tmp_path):
    """Shards that kimivl did not write are never deleted: the save is refused before anything is written."""
    foreign = {"x": torch.ones(3)}
    save_file(foreign, tmp_path / "model-00001-of-00002.safetensors")
    save_file(foreign, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    before = _listing(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"kimivl did not write: model-00001-of-00002\.safetensors, "
        r"model-00002-of-00002\.safetensors, model\.safetensors\.index\.json",
    ):
        ckpt.save_checkpoint(tiny_model, tmp_path)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize(
    ("weights", "config", "refused"),
    [
        (True, "llama", "config.json, model.safetensors"),
        (False, "llama", "config.json"),
        (True, None, "model.safetensors"),
        (True, "kimi_vl", "model.safetensors"),  # a Kimi-VL config beside weights kimivl did not write
        (False, "not json", "config.json"),
    ],
)
def test_a_save_never_overwrites_another_models_files(tiny_model, tmp_path, weights, config, refused):
    """A file of the same name that kimivl did not write (weights without its mark, a config.json that is not a
    Kimi-VL model's) is never overwritten: the save is refused before anything is written."""
    if weights:
        save_file({"foreign.weight": torch.ones(3)}, tmp_path / "model.safetensors")
    if config is not None:
        kimi_vl = json.dumps(tiny_model.config.to_dict())
        texts = {"llama": '{"model_type": "llama"}', "kimi_vl": kimi_vl, "not json": "{"}
        (tmp_path / "config.json").write_text(texts[config])
    before = _listing(tmp_path)
    for save in (tiny_model.save_pretrained, lambda path: ckpt.save_checkpoint(tiny_model, path)):
        with pytest.raises(CheckpointError, match=f"kimivl did not write: {refused}; save into an empty directory"):
            save(tmp_path)
        assert _listing(tmp_path) == before
    if weights:
        assert torch.equal(load_file(tmp_path / "model.safetensors")["foreign.weight"], torch.ones(3))


def test_a_conversion_never_overwrites_another_models_shards(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "src", max_shard_bytes=3_000_000)
    shards = sorted(p.name for p in (tmp_path / "src").glob("model-*.safetensors"))
    assert len(shards) > 1
    (tmp_path / "other").mkdir()
    for name in shards:  # another model sharded into as many files
        save_file({"foreign.weight": torch.ones(3)}, tmp_path / "other" / name)
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    before = _listing(tmp_path / "other")
    with pytest.raises(CheckpointError, match=f"kimivl did not write: config.json, {', '.join(shards)};"):
        ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "other", torch.bfloat16)
    assert _listing(tmp_path / "other") == before
    (tmp_path / "other" / "config.json").unlink()  # the weights alone are refused too
    with pytest.raises(CheckpointError, match=f"kimivl did not write: {', '.join(shards)};"):
        ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "other", torch.bfloat16)
    assert torch.equal(load_file(tmp_path / "other" / shards[0])["foreign.weight"], torch.ones(3))


def _unmarked(path):
    """Strip kimivl's mark from the safetensors files under ``path``, as a checkpoint from elsewhere (or a kimivl
    export older than the mark) has none."""
    for file in path.glob("*.safetensors"):
        save_file(load_file(file), file, metadata={"format": "pt"})


def test_a_conversion_in_place_and_saves_over_kimivls_own_files_are_allowed(tiny_model, tmp_path):
    src = tmp_path / "src"
    tiny_model.save_pretrained(src)
    _unmarked(src)  # e.g. the official checkpoint converted where it lies
    ckpt.convert_checkpoint(src, src, torch.bfloat16)
    assert load_file(src / "model.safetensors")["language_model.lm_head.weight"].dtype == torch.bfloat16
    assert json.loads((src / "config.json").read_text())["text_config"]["torch_dtype"] == "bfloat16"
    ckpt.convert_checkpoint(src, tmp_path / "out", torch.float32)
    ckpt.convert_checkpoint(src, tmp_path / "out", torch.float16)  # over its own earlier conversion
    assert load_file(tmp_path / "out" / "model.safetensors")["language_model.lm_head.weight"].dtype == torch.float16
    tiny_model.save_pretrained(tmp_path / "out", dtype=torch.float32)  # a save over a conversion
    loaded = KimiVL.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(loaded.language_model.lm_head.weight, tiny_model.language_model.lm_head.weight)


def test_a_recipes_export_is_kimivls_even_without_the_mark(tiny_model, tmp_path):
    """An export older than the mark (the shipped kimivl-tiny) is recognised by its run record."""
    export = tmp_path / "export"
    tiny_model.save_pretrained(export, dtype=torch.bfloat16)
    _unmarked(export)
    with pytest.raises(CheckpointError, match="kimivl did not write: model.safetensors;"):
        tiny_model.save_pretrained(export)
    (export / ckpt.EXPORT_RECORD).write_text(json.dumps({"out": "../run"}))
    tiny_model.save_pretrained(tmp_path / "final", dtype=torch.float32)
    ckpt.convert_checkpoint(tmp_path / "final", export, torch.float32)  # the run exporting again
    assert load_file(export / "model.safetensors")["language_model.lm_head.weight"].dtype == torch.float32
    _unmarked(export)
    tiny_model.save_pretrained(export, dtype=torch.bfloat16)
    assert load_file(export / "model.safetensors")["language_model.lm_head.weight"].dtype == torch.bfloat16


def test_save_keeps_unrelated_files_and_replaces_an_older_kimivl_save(tiny_model, tmp_path):
    save_file({"x": torch.ones(3)}, tmp_path / "adapter.safetensors")
    (tmp_path / "notes.txt").write_text("mine")
    tiny_model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    tiny_model.save_pretrained(tmp_path)  # the older save's shards and index are kimivl's: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter.safetensors",
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert torch.equal(load_file(tmp_path / "adapter.safetensors")["x"], torch.ones(3))
    KimiVL.from_pretrained(tmp_path)


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_files(tiny_model, tmp_path, monkeypatch):
    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partly written temporary file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    fresh = tmp_path / "fresh"
    with pytest.raises(
        CheckpointError,
        match=r"the disk is full: writing .*model\.safetensors failed "
        r"\(No space left on device\)",
    ):
        tiny_model.save_pretrained(fresh)
    assert not fresh.exists()  # the directory this call created is removed

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="the disk is full"):
        tiny_model.save_pretrained(existing, max_shard_bytes=300_000)
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]  # no *.tmp left, no config without weights


def test_a_full_disk_during_a_training_checkpoint_removes_its_temporary_directory(tiny_model, tmp_path, monkeypatch):
    from kimivl.train.state import save_state
    from kimivl.train.step import TrainingError

    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(TrainingError, match="checkpoint .*step-0000003 not written: the disk is full: writing "):
        save_state(tmp_path / "ckpts", tiny_model, {"step": 3})
    assert list((tmp_path / "ckpts").iterdir()) == []


def test_other_write_failures_name_the_file(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(CheckpointError, match=r"cannot write .*model\.safetensors: I/O error"):
        tiny_model.save_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"dtype": torch.int8}, r"dtype must be a floating torch.dtype .*, got torch.int8"),
        ({"dtype": torch.bool}, r"dtype must be a floating torch.dtype .*, got torch.bool"),
        ({"dtype": torch.complex64}, r"dtype must be a floating torch.dtype .*, got torch.complex64"),
        ({"dtype": torch.float8_e4m3fn}, r"dtype must be a floating torch.dtype .*, got torch.float8_e4m3fn"),
        ({"dtype": "bfloat16"}, r"dtype must be a floating torch.dtype .*, got 'bfloat16'"),
        ({"max_shard_bytes": None}, "max_shard_bytes must be a positive number of bytes, got None"),
        ({"max_shard_bytes": 0}, "max_shard_bytes must be a positive number of bytes, got 0"),
    ],
)
def test_bad_save_arguments_are_refused_before_anything_is_written(tiny_model, tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.save_pretrained(tmp_path / "new", **arguments)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match=message):
        ckpt.save_checkpoint(tiny_model, tmp_path / "direct", **arguments)
    assert not (tmp_path / "direct").exists()


def test_any_failed_save_removes_the_directory_it_created(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        tiny_model.save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_a_conversion_checks_its_dtype_and_source_config_before_writing(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype .*, got torch.int8"):
        ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "int8", torch.int8)
    (tmp_path / "src" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config.json in .*src: a checkpoint to convert needs"):
        ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "out", torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_failed_conversion_removes_the_directory_it_created(tiny_model, tmp_path, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(CheckpointError, match=r"the disk is full: writing .*out.model\.safetensors failed"):
        ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "out", torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_conversion_names_its_dtype_in_every_dtype_field(tiny_model, tmp_path):
    """The top level's and vision_config's dtype fields (``torch_dtype``, or transformers 5's ``dtype``) too: a
    converted config that still said float32 there contradicted itself."""
    tiny_model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["vision_config"] |= {"torch_dtype": "float32", "dtype": "float32"}
    (tmp_path / "src" / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "dtype": "float32"}))
    ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "out", torch.bfloat16)
    converted = json.loads((tmp_path / "out" / "config.json").read_text())
    parts = (converted, converted["vision_config"])
    fields = [part[k] for part in parts for k in ("torch_dtype", "dtype")] + [converted["text_config"]["torch_dtype"]]
    assert fields == ["bfloat16"] * 5
    assert "dtype" not in converted["text_config"]  # fields the source lacks are not added


def test_saved_files_that_are_symlinks_are_replaced_and_their_targets_left_alone(tiny_model, small_processor, tmp_path):
    """A Hugging Face cache directory holds symlinks into its blobs: a save there must not rewrite the blobs."""
    names = ["config.json", "tiktoken.model", "tokenizer_config.json", "preprocessor_config.json"]
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshot").mkdir()
    cached = {name: "the cached file" for name in names}
    cached["config.json"] = json.dumps(tiny_model.config.to_dict())  # a Kimi-VL config: a save may replace it
    for name in names:
        (tmp_path / "blobs" / name).write_text(cached[name])
        (tmp_path / "snapshot" / name).symlink_to(tmp_path / "blobs" / name)
    tiny_model.save_pretrained(tmp_path / "snapshot")
    small_processor.save_pretrained(tmp_path / "snapshot")
    for name in names:
        assert (tmp_path / "blobs" / name).read_text() == cached[name], name
        assert not (tmp_path / "snapshot" / name).is_symlink(), name
    assert KimiVL.from_pretrained(tmp_path / "snapshot").config.to_dict() == tiny_model.stored_config().to_dict()
    # the tokenizer alone: this preset model and small tokenizer are no pair (their image placeholders differ)
    assert type(small_processor.tokenizer).from_pretrained(tmp_path / "snapshot").encode("the cached file") == (
        small_processor.tokenizer.encode("the cached file")
    )


def test_a_write_the_disk_refuses_is_named_with_its_errno_and_leaves_nothing(tiny_model, tmp_path, file_size_limit):
    tiny_model.save_pretrained(tmp_path / "src")
    file_size_limit(100_000)  # safetensors raises its SafetensorError: "... File too large (os error 27)"
    with pytest.raises(CheckpointError, match=r"cannot write .*m.model\.safetensors: File too large") as failed:
        tiny_model.save_pretrained(tmp_path / "m")
    assert failed.value.errno == errno.EFBIG and isinstance(failed.value, OSError)
    with pytest.raises(CheckpointError, match=r"cannot write .*out.model\.safetensors: File too large"):
        ckpt.convert_checkpoint(tmp_path / "src", tmp_path / "out", torch.bfloat16)
    file_size_limit(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_saved_weights_are_as_readable_as_the_config(tiny_model, tmp_path):
    umask = os.umask(0o022)
    try:
        tiny_model.save_pretrained(tmp_path / "m", max_shard_bytes=2_000_000)
        ckpt.convert_checkpoint(tmp_path / "m", tmp_path / "bf16", torch.bfloat16)
    finally:
        os.umask(umask)
    files = sorted((tmp_path / "m").iterdir()) + sorted((tmp_path / "bf16").iterdir())
    assert len(files) > 4
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}
