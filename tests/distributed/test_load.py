"""The sharded loader (``load_sharded_checkpoint``) in one process: as strict as ``load_checkpoint``."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimivl import KimiVL
from kimivl.checkpoint import INDEX, CheckpointError
from kimivl.distributed.expert_parallel import apply_expert_parallel
from kimivl.distributed.load import copy_rows, load_sharded_checkpoint
from kimivl.distributed.world import World
from tests.distributed.test_expert_parallel import _Group

EXPERT = "language_model.model.layers.1.mlp.experts.0.gate_proj.weight"


@pytest.fixture()
def saved(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    return tmp_path


def _edit(path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _empty(config) -> KimiVL:
    with torch.device("meta"):
        model = KimiVL(config)
    return model.to_empty(device="cpu")


def test_a_checkpoint_loads_equal(tiny_model, saved):
    model = _empty(tiny_model.config)
    load_sharded_checkpoint(model, saved, World())
    for (k, a), b in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_rows_copied_into_a_tensor_not_sharded_are_all_of_them():
    t, scalar = torch.zeros(3, 2), torch.zeros(())
    copy_rows(t, torch.arange(6.0).view(3, 2))
    copy_rows(scalar, torch.tensor(5.0))
    assert torch.equal(t, torch.arange(6.0).view(3, 2)) and scalar.item() == 5


@pytest.mark.parametrize("rank", [0, 1])
def test_an_expert_parallel_rank_loads_its_experts_and_leaves_the_others(tiny_model, saved, rank):
    model = _empty(tiny_model.config)
    apply_expert_parallel(model, _Group(2, rank))
    load_sharded_checkpoint(model, saved, World())
    official = tiny_model.state_dict()
    mine = model.state_dict()
    n = tiny_model.config.text_config.n_routed_experts
    last = f"language_model.model.layers.1.mlp.experts.{n - 1}.down_proj.weight"
    assert (last in mine, EXPERT in mine) == (rank == 1, rank == 0)
    for k, v in mine.items():
        assert torch.equal(v, official[k]), k


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.update({EXPERT: t[EXPERT][:1]}), rf"wrongly shaped tensors \(1\):\n  {EXPERT}: checkpoint \[1, "),
        (lambda t: t.update({EXPERT: t[EXPERT].T.contiguous()}), rf"wrongly shaped tensors \(1\):\n  {EXPERT}"),
        (
            lambda t: t.update({"language_model.model.layers.9.mlp.gate.weight": torch.zeros(2, 2)}),
            r"unexpected tensors \(1\):\n  language_model.model.layers.9.mlp.gate.weight",
        ),
        (
            lambda t: t.update({EXPERT.replace("experts.0", "experts.99"): t[EXPERT].clone()}),
            r"unexpected tensors \(1\):\n  language_model.model.layers.1.mlp.experts.99.gate_proj.weight",
        ),
        (
            lambda t: t.update({"language_model.lm_head.weight": t["language_model.lm_head.weight"].to(torch.int32)}),
            r"wrong kind .*\n  language_model.lm_head.weight: checkpoint I32 where the model holds torch.float32",
        ),
        (lambda t: t.pop(EXPERT), rf"missing tensors \(1\):\n  {EXPERT}"),
    ],
    ids=["expert broadcast", "expert transposed", "extra layer", "extra expert", "int32 weight", "missing expert"],
)
def test_a_checkpoint_that_does_not_match_is_refused_naming_the_tensor(tiny_model, saved, edit, message):
    _edit(saved, edit)
    with pytest.raises(CheckpointError, match=message):
        load_sharded_checkpoint(_empty(tiny_model.config), saved, World())


def test_a_tower_alone_refuses_only_what_lies_under_its_prefix(tiny_model, saved):
    extra = "vision_tower.encoder.blocks.99.norm0.weight"
    _edit(saved, lambda t: t.update({extra: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensors \(1\):\n  {extra}"):
        load_sharded_checkpoint(_empty(tiny_model.config).vision_tower, saved, World(), prefix="vision_tower.")
    _edit(saved, lambda t: t.pop(extra))
    tower = _empty(tiny_model.config).vision_tower
    load_sharded_checkpoint(tower, saved, World(), prefix="vision_tower.")
    assert torch.equal(tower.patch_embed.proj.weight, tiny_model.vision_tower.patch_embed.proj.weight)


def test_non_finite_values_are_named_in_a_warning(tiny_model, saved, caplog):
    _edit(saved, lambda t: t[EXPERT].__setitem__((0, 0), float("nan")))
    with caplog.at_level(logging.WARNING, logger="kimivl.checkpoint"):
        load_sharded_checkpoint(_empty(tiny_model.config), saved, World())
    assert f"NaN or inf values in 1 tensors: {EXPERT}" in caplog.text


def test_a_gathered_save_checks_its_arguments_before_writing(tiny_model, tmp_path):
    from kimivl.distributed.gather import save_gathered

    for bad, words in (({"dtype": torch.int8}, "dtype"), ({"max_shard_bytes": 0}, "max_shard_bytes")):
        with pytest.raises(ValueError, match=words):
            save_gathered(tiny_model, tmp_path / "out", World(), **bad)
        assert not (tmp_path / "out").exists()


def test_a_gathered_save_in_bf16_writes_what_save_pretrained_does(tiny_model, tmp_path):
    """The same tensors in the same dtypes: bf16, but the routers' weight and selection bias in float32; the index
    counts the bytes written."""
    from kimivl.distributed.gather import save_gathered

    tiny_model.save_pretrained(tmp_path / "one", dtype=torch.bfloat16)
    save_gathered(tiny_model, tmp_path / "gathered", World(), dtype=torch.bfloat16, max_shard_bytes=2**20)
    files = sorted((tmp_path / "gathered").glob("model-*.safetensors"))
    written = {k: v for f in files for k, v in load_file(f).items()}
    expected = load_file(tmp_path / "one" / "model.safetensors")
    assert len(files) > 1 and written.keys() == expected.keys()
    assert {t.dtype for k, t in written.items() if ".mlp.gate." in k} == {torch.float32}
    for key in expected:
        torch.testing.assert_close(written[key], expected[key], rtol=0, atol=0, msg=key)
    index = json.loads((tmp_path / "gathered" / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    save_gathered(tiny_model, tmp_path / "whole", World(), dtype=torch.bfloat16)  # one file, as save_pretrained
    assert sorted(p.name for p in (tmp_path / "whole").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )


def test_a_gathered_save_copies_what_the_model_did_not_load_in_the_planned_dtype(tiny_model, tmp_path):
    """A vit stage's sharded ranks hold the tower alone: the rest comes from the stage's source, a file's worth at a
    time, in the layout's dtype (float32 here, from a bfloat16 source), files of copied tensors alone included."""
    from kimivl.distributed.gather import save_gathered

    source = tmp_path / "source"
    tiny_model.save_pretrained(source, dtype=torch.bfloat16)
    with torch.device("meta"):
        model = KimiVL(tiny_model.config)
    model.vision_tower.to_empty(device="cpu")
    load_sharded_checkpoint(model.vision_tower, source, World(), prefix="vision_tower.")
    with torch.no_grad():
        for p in model.vision_tower.parameters():
            p.add_(1)  # the stage trained the tower: its weights are written, not the source's
    save_gathered(model, tmp_path / "out", World(), max_shard_bytes=2**20, source=source)
    files = sorted((tmp_path / "out").glob("model-*.safetensors"))
    written = {k: v for f in files for k, v in load_file(f).items()}
    assert any(all(k.startswith("language_model.") for k in load_file(f)) for f in files)  # copied tensors alone
    assert written.keys() == tiny_model.state_dict().keys()
    trained = {f"vision_tower.{n}" for n, _ in model.vision_tower.named_parameters()}
    for key, whole in tiny_model.state_dict().items():
        stored = whole if ".mlp.gate." in key else whole.bfloat16().float()  # the source's routers are float32
        want = stored + (1 if key in trained else 0)
        assert written[key].dtype == torch.float32, key
        torch.testing.assert_close(written[key], want, rtol=0, atol=0, msg=key)


def test_a_gathered_save_writes_each_file_in_order_as_soon_as_its_tensors_are_in(tiny_model, tmp_path, monkeypatch):
    """Rank 0 holds about one file: tensors are gathered in the order the files are planned in, so the files are
    written first to last and at most two (those a module's expert stacks span) are pending at once. Gathering the
    buffers after every parameter held back each file with a router's selection bias until the end (4 of 7 pending)."""
    from kimivl.distributed import gather

    events = []  # (key, None) as a tensor joins the pending files, (file name, its keys) as a file is written
    for_file, atomic_save = gather._for_file, gather._atomic_save

    def held(key, t, dtype):
        events.append((key, None))
        return for_file(key, t, dtype)

    def written(tensors, file, metadata=None):
        events.append((os.path.basename(file), set(tensors)))
        atomic_save(tensors, file, metadata)

    monkeypatch.setattr(gather, "_for_file", held)
    monkeypatch.setattr(gather, "_atomic_save", written)
    gather.save_gathered(tiny_model, tmp_path / "out", World(), max_shard_bytes=2**20)
    files = [(name, keys) for name, keys in events if keys is not None]
    assert len(files) == 7 and [name for name, _ in files] == sorted(name for name, _ in files)
    file_of = {k: name for name, keys in files for k in keys}
    pending, most = set(), 0
    for name, keys in events:
        pending = pending - keys if keys is not None else pending | {name}
        most = max(most, len({file_of[k] for k in pending}))
    assert most == 2
