"""A smoke run of every stage kind of a recipe on the tiny preset, on hand-made data."""

import itertools
import json
import logging
import random
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from kimivl import KimiVL, KimiVLProcessor, precision
from kimivl.checkpoint import CheckpointError, checkpoint_files
from kimivl.cli import main
from kimivl.data.formats import DataError, write_records
from kimivl.data.world import build_world
from kimivl.distributed.plan import rank_memory_plan
from kimivl.distributed.recompute import recomputed
from kimivl.processing.tokenizer import train_bpe
from kimivl.train.pipeline import Sources, base_config, recipe_processor, run_recipe
from kimivl.train.plan import plan_recipe
from kimivl.train.recipe import RecipeError, load_recipe
from kimivl.train.stages.base import StageContext
from kimivl.train.stages.joint import stage_mixture
from kimivl.train.state import TRAINER_FILE, latest_checkpoint
from kimivl.train.trainable import memory_plan
from kimivl.train.validation import heldout_loss, heldout_rows

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "img").mkdir()
    records = []
    for i in range(12):
        name = list(COLOURS)[i % 3]
        w, h = (28 * (1 + i % 3), 28 * (1 + (i // 3) % 2))
        Image.fromarray(np.full((h, w, 3), COLOURS[name], dtype=np.uint8)).save(root / "img" / f"{i}.png")
        records.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"img/{i}.png"},
                            {"type": "text", "text": "What colour is it?"},
                        ],
                    },
                    {"role": "assistant", "content": name},
                ],
                "meta": {"task": "colour", "gold": name},
            }
        )
    write_records(root / "colour.jsonl", records)
    texts = [f"The {c} square is next to the {d} circle." for c in COLOURS for d in COLOURS] * 20
    (root / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def recipe_dict(data_dir, out):
    joint = {"kind": "joint", "steps": 2, "lr": 1e-3, "budget": 192, "ckpt_every": 1, "log_every": 1}
    return {
        "name": "smoke",
        "seed": 0,
        "out": str(out),
        "base": {"preset": "tiny"},
        "tokenizer": {"train_vocab": 280},
        "sources": {"colour": str(data_dir / "colour.jsonl"), "text": str(data_dir / "text.jsonl")},
        "schedule": {"warmup": 1, "decay_stages": ["cooldown"]},
        "export": {"path": str(out / "export"), "dtype": "bfloat16", "generation": {"temperature": 0.7, "top_p": 0.9}},
        "stages": [
            {
                "name": "vit",
                "kind": "vit",
                "steps": 2,
                "lr": 1e-3,
                "sources": ["colour"],
                "images_per_batch": 4,
                "recompute": True,
                "accum": 2,
            },
            {"name": "align", **joint, "train": ["multi_modal_projector"], "mix": {"colour": 1}},
            {
                "name": "pretrain",
                **joint,
                "mix": {"text": 3, "colour": 1},
                "mix_end": {"text": 1, "colour": 3},
                "standardize_images": 1.0,
            },
            {"name": "cooldown", **joint, "mix": {"text": 1, "colour": 1}, "accum": 2},
            {
                "name": "long-context",
                **joint,
                "budget": 384,
                "rope_theta": 800000.0,
                "mix": {"text": 1, "colour": 1},
                "recompute": True,
            },
            {
                "name": "sft",
                **joint,
                "schedule": "cosine",
                "warmup": 1,
                "mix": {"colour": 1},
                "lr_scale": {"vision_tower": 0.1, "multi_modal_projector": 0.1},
                "freeze": ["*.mlp.experts.*"],
                "replacement": False,
            },
        ],
    }


def test_every_stage_runs_and_chains(data_dir, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(data_dir, out)))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    for stage in ("vit", "align", "pretrain", "cooldown", "long-context", "sft"):
        assert (out / stage / "final" / "model.safetensors").is_file(), stage
    vit = load_file(out / "vit" / "final" / "model.safetensors")
    align = load_file(out / "align" / "final" / "model.safetensors")
    pretrain = load_file(out / "pretrain" / "final" / "model.safetensors")
    key_lm, key_proj = "language_model.model.norm.weight", "multi_modal_projector.linear_1.weight"
    key_vit = "vision_tower.encoder.blocks.0.wqkv.weight"
    assert torch.equal(vit[key_lm], align[key_lm]) and torch.equal(vit[key_vit], align[key_vit])  # frozen
    assert not torch.equal(vit[key_proj], align[key_proj])  # trained
    assert not torch.equal(align[key_lm], pretrain[key_lm])
    long, sft = (load_file(out / stage / "final" / "model.safetensors") for stage in ("long-context", "sft"))
    routed = [k for k in sft if ".mlp.experts." in k]
    assert routed and all(torch.equal(long[k], sft[k]) for k in routed)  # frozen by the sft stage's pattern
    assert not torch.equal(long[key_lm], sft[key_lm])
    exported = KimiVL.from_pretrained(out / "export")
    assert exported.dtype == torch.bfloat16 and exported.config.text_config.rope_theta == 800000.0
    assert (out / "export" / "tiktoken.model").is_file() and (out / "curves.png").is_file()
    written = json.loads((out / "export" / "generation_config.json").read_text())
    assert written == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}  # the recipe's, for chat and HF
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"vit", "align", "pretrain", "cooldown", "long-context", "sft"}
    assert all("siglip" in r and "caption" in r for r in rows if r["stage"] == "vit")
    lrs = {r["stage"]: r["lr"] for r in rows if r["step"] == 2}
    assert lrs["cooldown"] < lrs["pretrain"]  # the shared schedule decays during cooldown
    # a second call refuses to overwrite; --resume skips every finished stage
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    assert main(["train", str(tmp_path / "r.yaml"), "--resume"]) == 0


def test_recipe_errors(data_dir, tmp_path):
    bad = recipe_dict(data_dir, tmp_path)
    bad["stages"][1]["mix"] = {"nope": 1}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="uses sources \\['nope'\\]"):
        load_recipe(tmp_path / "bad.yaml")
    bad = recipe_dict(data_dir, tmp_path)
    bad["stages"][1]["train"] = ["eyes"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(RecipeError, match="unknown parts"):
        load_recipe(tmp_path / "bad.yaml")
    for stage, lr_scale, match in (
        (1, {"eyes": 0.1}, "lr_scale maps parts"),
        (1, {"vision_tower": 0}, "factors > 0"),
        (0, {"vision_tower": 0.1}, "lr_scale does not apply"),
    ):
        bad = recipe_dict(data_dir, tmp_path)
        bad["stages"][stage]["lr_scale"] = lr_scale
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(RecipeError, match=match):
            load_recipe(tmp_path / "bad.yaml")


def _stage(i, **changes):
    def edit(recipe):
        recipe["stages"][i].update(changes)

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_stage(1, kind="dpo"), "kind must be 'vit', 'joint' or 'rl', got 'dpo'"),
        (_stage(1, steps=0), "steps >= 1 and lr > 0 are required"),
        (_stage(1, budget=8), "budget \\(tokens of a packed row\\) must be an integer >= 16, got 8"),
        (_stage(1, schedule="linear"), "schedule must be 'continue' or 'cosine', got 'linear'"),
        (_stage(1, train=[]), "train is empty; choose from"),
        (_stage(1, standardize_images=0), "standardize_images is a target std > 0, got 0"),
        (_stage(0, standardize_images=1.0), "standardize_images does not apply to a vit stage"),
        (_stage(1, mix={}), "a joint stage needs a 'mix'"),
        (_stage(0, sources=[]), "a vit stage needs caption 'sources'"),
        (
            lambda r: r["stages"].append({"name": "rl", "kind": "rl", "steps": 1, "lr": 1e-3}),
            "stage 'rl': an rl stage needs problem 'sources'",
        ),
        (_stage(1, rl={"k": 4}), "stage 'align': rl does not apply to a joint stage"),
        (_stage(1, recompute="yes"), "recompute is true or false, got 'yes'"),
        (_stage(1, val={"sources": ["nope"]}), "uses sources \\['nope'\\]"),
        (_stage(1, val={"sources": []}), "val needs 'sources', a list of source names"),
        (_stage(1, val={"sources": ["colour"], "every": 0}), "val every must be an integer >= 1, got 0"),
        (_stage(1, val={"sources": ["colour"], "steps": 3}), "val is a mapping of 'sources', 'every' and 'rows'"),
        (_stage(0, val={"sources": ["colour"]}), "val does not apply to a vit stage"),
        (_stage(1, steps="100"), "steps >= 1 and lr > 0 are required, got '100'"),
        (_stage(1, ckpt_every=0), "ckpt_every must be an integer >= 1, got 0"),
        (_stage(1, log_every=2.5), "log_every must be an integer >= 1, got 2.5"),
        (_stage(0, images_per_batch=0), "images_per_batch must be an integer >= 1"),
        (_stage(1, clip=0), "clip must be a number >= 0 \\(and not 0\\), got 0"),
        (_stage(1, weight_decay=-0.1), "weight_decay must be a number >= 0, got -0.1"),
        (_stage(1, ns_dtype="float16"), "ns_dtype is 'float32' or 'bfloat16', got 'float16'"),
        (_stage(1, rope_theta=0), "rope_theta must be a number > 0, got 0"),
        (_stage(1, mix={"colour": -1}), "mix maps source names to finite weights >= 0"),
        (_stage(2, mix_end={"text": "lots"}), "mix_end maps source names to finite weights >= 0"),
        # these passed the check, then failed with numpy's bare "Total of weights must be finite"
        (
            _stage(1, mix={"colour": float("inf")}),
            r"mix maps source names to finite weights >= 0, got \{'colour': inf\}",
        ),
        (_stage(1, mix={"colour": 1e308, "text": 1e308}), "mix weights must have a positive, finite sum"),
        (_stage(1, replacement="no"), "replacement is true or false, got 'no'"),
        (_stage(1, accum=0), "accum must be an integer >= 1, got 0"),
        (_stage(1, accum=1.5), "accum must be an integer >= 1, got 1.5"),
        (
            lambda r: r["stages"][1].update(kind="rl", sources=["colour"], accum=2),
            "accum, log_every, mix do not apply to an rl stage",
        ),
        (_stage(1, freeze="*.experts.*"), "freeze is a list of parameter-name patterns, got '\\*.experts.\\*'"),
        (_stage(0, freeze=["*.wqkv.*"]), "freeze does not apply to a vit stage"),
        (_stage(1, epochs=3), "unknown keys \\['epochs'\\]; a joint stage takes \\['accum', "),
        (_stage(2, name="align"), "stage names must be unique"),
        (_stage(2, name="ALIGN"), "stage names must be unique, letter case aside"),  # one folder on macOS, Windows
        (
            lambda r: r["schedule"].update(decay_stages=["warmdown"]),
            r"decay_stages names unknown stages \['warmdown'\]",
        ),
        # each of these had trained at a wrong rate: negative (gradient ascent), rising, undecayed, or decayed early
        (lambda r: r["schedule"].update(min_ratio=-0.5), r"min_ratio must be a number in \[0, 1\].*got -0.5"),
        (lambda r: r["schedule"].update(min_ratio=3), r"min_ratio must be a number in \[0, 1\].*got 3"),
        (lambda r: r["schedule"].update(warmup=10.5), "warmup must be a whole number of steps >= 0, got 10.5"),
        (lambda r: r["schedule"].update(warmup=-5), "warmup must be a whole number of steps >= 0, got -5"),
        (lambda r: r["schedule"].update(decay_stages=["sft"]), r"names \['sft'\], which run their own schedule"),
        (lambda r: r["schedule"].update(decay_stages=["align", "cooldown"]), "must follow one another"),
        (
            lambda r: r.update(eval={"after": ["final"], "split": "world/heldout"}),
            r"eval.after names unknown stages \['final'\]",
        ),
        (lambda r: r.update(base={"hub": "moonshotai/Kimi-VL"}), "base must be {preset: NAME} or {checkpoint: PATH}"),
        (lambda r: r.update(device="gpu"), "device must name a torch device such as 'cpu' or 'cuda', got 'gpu'"),
        (lambda r: r.update(device="cuda:99"), "device 'cuda:99' is not available here"),
        (lambda r: r.update(device="meta"), "device 'meta': training runs on 'cpu' or 'cuda'"),
        (
            lambda r: r.update(bf16="auto"),
            "bf16 is true, false or null .where the device multiplies bf16 fast., got 'auto'",
        ),
        (lambda r: r.update(stages=[]), "has no stages"),
        (lambda r: r.update(epochs=3), r"unknown keys \['epochs'\]"),
        (lambda r: r["schedule"].update(warm_up=10), r"schedule has unknown keys \['warm_up'\]"),
        (lambda r: r.update(eval={"after": ["sft"], "split": "world/heldout", "limt": 5}), r"eval has unknown keys"),
        (lambda r: r.update(eval={"after": ["sft"]}), "eval needs a split"),
        (lambda r: r.update(tokenizer={"path": "tok", "train_vocab": 300}), "tokenizer takes one of"),
        (lambda r: r.update(tokenizer="tok"), "tokenizer must be a mapping"),
        (lambda r: r["export"].update(dtype="float16"), "export needs a path and a dtype of bfloat16"),
        (lambda r: r.update(export={"dtype": "float32"}), "export needs a path"),
        (lambda r: r["export"].update(generation={"temprature": 0.7}), r"export.generation has unknown keys"),
        (
            lambda r: r["export"].update(generation={"temperature": -1}),
            "export.generation: temperature must be .* got -1",
        ),
        (
            lambda r: r["export"].update(generation={"temperature": 0.2, "max_new_tokens": 0}),
            "export.generation: max_new_tokens",
        ),
        (lambda r: r["export"].update(generation=0.7), "export.generation must be a mapping"),
        (lambda r: r["export"].update(generation={"top_p": 0.9}), "export.generation needs a temperature"),
        (
            lambda r: r["sources"].update(text={"path": r["sources"]["text"], "answer_only": True}),
            r"data source 'text': unknown keys \['answer_only'\]",
        ),
        (lambda r: r["sources"].update(text={"difficulty": ["easy"]}), "data source 'text': give a path"),
        (lambda r: r["sources"].update(text=3), "data source 'text': give a path"),
        (
            lambda r: r["sources"].update(text={"path": r["sources"]["text"], "answers_only": "yes"}),
            "answers_only must be true or false",
        ),
        (
            lambda r: r["sources"].update(text={"path": r["sources"]["text"], "difficulty": ["extreme"]}),
            "data source 'text': difficulty must be a list of some of",
        ),
        # each of these had passed the load: a traceback, an error after the world was built or a stage trained, or
        # a silent misreading (a typo of world.seed made a split named 'sed'; NaN trained into the router biases)
        (lambda r: r.update(name=["a"]), r"name must be the run's name, a string, got \['a'\]"),
        (lambda r: r.update(sources=["colour", "text"]), r"sources must be a mapping of source names to paths"),
        (lambda r: r["sources"].update({5: r["sources"]["text"]}), "data source 5: a source's name is a string"),
        (lambda r: r.update(base=["preset"]), r"base must be {preset: NAME} or {checkpoint: PATH}, got \['preset'\]"),
        (lambda r: r.update(base={"preset": "kimivl_tiny"}), r"base.preset 'kimivl_tiny' is unknown; choose one of \["),
        (lambda r: r.update(base={"checkpoint": 5}), "base.checkpoint must be a checkpoint directory, got 5"),
        (lambda r: r.update(tokenizer=None), r"base {preset: tiny} needs a tokenizer"),
        (lambda r: r.update(tokenizer={"train_vocab": "280"}), "tokenizer.train_vocab must be an integer >= 256"),
        (
            lambda r: r.update(tokenizer={"train_vocab": 100}),
            "tokenizer.train_vocab must be an integer >= 256, got 100",
        ),
        (lambda r: r.update(tokenizer={"path": 5}), "tokenizer.path must be a tokenizer directory, got 5"),
        (lambda r: r.update(world=[20, 3]), r"world must be a mapping, got \[20, 3\]"),
        (lambda r: r.update(world={"sed": 7, "train": 20}), r"world has unknown keys \['sed'\]; it takes \['heldout'"),
        (lambda r: r.update(world={"train": "20"}), "world.train must be an integer >= 0, got '20'"),
        (lambda r: r.update(world={"heldout": -10}), "world.heldout must be an integer >= 0, got -10"),
        (lambda r: r.update(world={"seed": "0"}), "world.seed must be an integer >= 0, got '0'"),
        (lambda r: r.update(world={"tasks": ["ocr", "smell"]}), r"world.tasks names unknown tasks \['smell'\]"),
        (lambda r: r.update(world={"tasks": "ocr"}), "world.tasks must be a list of tasks, got 'ocr'"),
        (lambda r: r.update(eval={"split": 5}), "eval.split must be a directory of held-out <task>.jsonl files, got 5"),
        (lambda r: r.update(eval={"split": "h", "limit": -1}), "eval.limit must be an integer >= 1, got -1"),
        (lambda r: r.update(eval={"split": "h", "limit": 0}), "eval.limit must be an integer >= 1, got 0"),
        (lambda r: r.update(eval={"split": "h", "max_new_tokens": 0}), "eval.max_new_tokens must be an integer >= 1"),
        (lambda r: r.update(eval={"split": "h", "max_new_tokens": "4"}), "eval.max_new_tokens must be an integer"),
        (lambda r: r.update(eval={"split": "h", "after": "sft"}), "eval.after must be a list of stages, got 'sft'"),
        (lambda r: r.update(eval={"split": "h", "base": "no"}), "eval.base is true or false .*, got 'no'"),
        (lambda r: r.update(out=" "), "out must be the run's directory, got ' '"),
        (lambda r: r.update(out=5), "out must be the run's directory, got 5"),
        (lambda r: r["export"].update(path=5), "export.path must be the directory to write the model to, got 5"),
        (lambda r: r["export"].update(path=""), "export.path must be the directory to write the model to, got ''"),
        (_stage(1, train=None), "stage 'align': train must be a list of parts, got None"),
        (_stage(0, sources="colour"), "stage 'vit': sources must be a list of source names, got 'colour'"),
        (_stage(1, bias_update_rate=float("nan")), "bias_update_rate must be a number >= 0, got nan"),
        (_stage(1, lr=float("nan")), "lr > 0 are required, got 2, nan"),
        (_stage(1, clip=float("inf")), "clip must be a number >= 0 .and not 0., got inf"),
        (_stage(1, weight_decay=float("nan")), "weight_decay must be a number >= 0, got nan"),
        (_stage(1, lr_scale={"vision_tower": float("inf")}), "lr_scale maps parts .* factors > 0"),
        (_stage(1, rope_theta=float("inf")), "rope_theta must be a number > 0, got inf"),
        (_stage(1, standardize_images=float("inf")), "standardize_images is a target std > 0, got inf"),
        (lambda r: r["schedule"].update(min_ratio=float("nan")), r"min_ratio must be a number in \[0, 1\].*got nan"),
        (_stage(1, lr=10**400), "lr > 0 are required, got 2, 1000"),  # too large for a float: no OverflowError
        (_stage(1, weight_decay=10**400), "weight_decay must be a number >= 0, got 1000"),
        (lambda r: r["schedule"].update(min_ratio=10**400), r"min_ratio must be a number in \[0, 1\]"),
        (lambda r: r.update(stages=r["stages"][0]), r"stages is a list of stage mappings, .* got \{'accum': 2"),
        (
            lambda r: r.update(stages="sft"),
            "stages is a list of stage mappings, each starting '- name: ...', got 'sft'",
        ),
        (lambda r: r.pop("name"), r"has no name: give the run one \(name: my-run\)"),
        (_stage(0, kind=["vit"]), r"stage 'vit': kind must be 'vit', 'joint' or 'rl', got \['vit'\]"),
        (lambda r: r["stages"].append("sft"), "a stage is a mapping with a name, kind, steps and lr, got 'sft'"),
        (lambda r: r["stages"][0].pop("lr"), r"stage 'vit': missing \['lr'\]"),
        (  # it passed, then torch overflowed (int64 nanoseconds) when the ranks met
            lambda r: r.update(parallel={"timeout": 9_999_999_999}),
            r"parallel.timeout must be at most 31,536,000 seconds \(one year\), got 9999999999",
        ),
    ],
)
def test_every_recipe_mistake_is_named(data_dir, tmp_path, edit, match):
    recipe = recipe_dict(data_dir, tmp_path)
    edit(recipe)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=match):
        load_recipe(tmp_path / "bad.yaml")


def test_a_parallel_timeout_of_one_year_exactly_is_taken(data_dir, tmp_path):
    """parallel.timeout is at most a year, 31,536,000 seconds: that many load, one more is refused."""
    recipe = {**recipe_dict(data_dir, tmp_path), "parallel": {"timeout": 31_536_000}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert load_recipe(tmp_path / "r.yaml").parallel == {"timeout": 31_536_000}
    recipe["parallel"]["timeout"] += 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(
        RecipeError, match="parallel.timeout must be at most 31,536,000 seconds .one year., got 31536001"
    ):
        load_recipe(tmp_path / "r.yaml")


def test_empty_settings_take_their_defaults(data_dir, tmp_path):
    recipe = {**recipe_dict(data_dir, tmp_path), "base": {"checkpoint": "ckpt"}, "tokenizer": None, "schedule": None}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(tmp_path / "r.yaml")
    assert loaded.tokenizer == {} and loaded.schedule == {}


def test_a_stage_trains_with_its_own_optimiser_settings(data_dir, tmp_path, capsys):
    """A stage's lr, lr_scale, weight_decay and ns_dtype are those its checkpoints' optimiser ran with; a run without
    ``progress`` shows no bar."""
    d = recipe_dict(data_dir, tmp_path / "run")
    align = {**d["stages"][1], "train": ["multi_modal_projector", "language_model"], "steps": 1}
    align |= {"weight_decay": 0.05, "ns_dtype": "bfloat16"}
    d["stages"], d["schedule"] = [{**align, "lr_scale": {"multi_modal_projector": 0.5}}], {}
    del d["export"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert "100%|" not in capsys.readouterr().err
    trainer = torch.load(latest_checkpoint(tmp_path / "run" / "align" / "checkpoints") / TRAINER_FILE)
    groups = trainer["optimizer"]["param_groups"]
    assert {g["name"] for g in groups} >= {"muon", "muon@multi_modal_projector", "adamw_no_decay"}
    for g in groups:
        scaled, decays = "@multi_modal_projector" in g["name"], not g["name"].startswith("adamw_no_decay")
        assert g["initial_lr"] == (5e-4 if scaled else 1e-3) and g["weight_decay"] == (0.05 if decays else 0.0)
        assert g["ns_dtype"] == "bfloat16", g["name"]


def test_a_preset_base_takes_the_tokenizer_s_special_tokens(data_dir, tmp_path, small_processor):
    """A model trained from a preset stops generating at <|im_end|> as at [EOS], and pads with the tokenizer's pad."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(data_dir, tmp_path / "run")))
    tok = small_processor.tokenizer
    config = base_config(load_recipe(tmp_path / "r.yaml"), tok)
    text = config.text_config
    assert (text.vocab_size, text.bos_token_id, text.pad_token_id) == (tok.n_ranks + 256, tok.bos_id, tok.pad_id)
    assert text.eos_token_id == [tok.eos_id, tok.im_end_id] and tok.im_end_id != tok.eos_id
    assert (config.media_placeholder_token_id, config.pad_token_id) == (tok.media_pad_id, tok.pad_id)


def test_an_unreadable_recipe_is_named(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe .*missing.yaml"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("stages: [\n")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "broken.yaml")


def test_a_source_can_keep_only_some_difficulties(data_dir, tmp_path):
    def record(i, level):
        meta = {} if level is None else {"difficulty": level}
        return {
            "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": str(i)}],
            "meta": meta,
        }

    def sources(levels, records):
        write_records(tmp_path / "levels.jsonl", records)
        d = recipe_dict(data_dir, tmp_path)
        d["sources"]["levels"] = {"path": str(tmp_path / "levels.jsonl"), "difficulty": levels}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
        return Sources(load_recipe(tmp_path / "r.yaml"))

    mixed = [record(i, level) for i, level in enumerate(("easy", "hard", "easy", "medium"))]
    assert [r["messages"][1]["content"] for r in sources(["easy"], mixed).items["levels"]] == ["0", "2"]
    assert len(sources(["easy", "medium"], mixed).items["levels"]) == 3
    with pytest.raises(RecipeError, match="difficulty must be a list of some of"):
        sources(["extreme"], mixed)
    with pytest.raises(RecipeError, match="difficulty must be a list"):
        sources("easy", mixed)
    with pytest.raises(RecipeError, match="difficulty must be a list of some of"):  # keeping none: not a source
        sources([], mixed)
    with pytest.raises(RecipeError, match="levels.jsonl:2 has no meta.difficulty"):
        sources(["easy"], [record(0, "easy"), record(1, None)])
    with pytest.raises(RecipeError, match="no record of .*levels.jsonl has difficulty \\['hard'\\]"):
        sources(["hard"], [record(0, "easy")])
    with pytest.raises(RecipeError, match="levels.jsonl holds text documents, and difficulty keeps conversation"):
        sources(["easy"], [{"text": "a document", "meta": {"difficulty": "easy"}}])


def test_a_source_without_records_is_named_before_any_stage(data_dir, tmp_path):
    """An empty file had planned and run a vit stage into a ZeroDivisionError (its passes over the sources)."""
    (tmp_path / "empty.jsonl").write_text("")
    d = recipe_dict(data_dir, tmp_path)
    d["sources"]["colour"] = str(tmp_path / "empty.jsonl")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match=f"data source 'colour': {tmp_path / 'empty.jsonl'} holds no records"):
        Sources(load_recipe(tmp_path / "r.yaml"))


def test_an_answers_only_source_drops_the_thinking_of_text_and_of_text_parts(data_dir, tmp_path):
    image = str(tmp_path / "red.png")
    Image.new("RGB", (28, 28), COLOURS["red"]).save(image)
    turns = [
        "◁think▷ 2 + 2 ◁/think▷ 4",
        [{"type": "text", "text": "◁think▷ r ◁/think▷ 4"}],
        [{"type": "image", "image": image}, {"type": "text", "text": "◁think▷ red? ◁/think▷ red"}],
        [{"type": "text", "text": "no thinking "}, {"type": "image", "image": image}],
        [{"type": "text", "text": "r ◁/think▷ 4"}],
    ]
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": t}]} for t in turns]
    write_records(tmp_path / "cot.jsonl", records)
    d = recipe_dict(data_dir, tmp_path)
    d["sources"]["cot"] = {"path": str(tmp_path / "cot.jsonl"), "answers_only": True}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    answers = [r["messages"][1]["content"] for r in Sources(load_recipe(tmp_path / "r.yaml")).items["cot"]]
    assert answers == [
        "4",
        [{"type": "text", "text": "4"}],
        [{"type": "image", "image": image}, {"type": "text", "text": "red"}],
        [{"type": "text", "text": "no thinking "}, {"type": "image", "image": image}],  # no marker: as it was
        [{"type": "text", "text": "4"}],  # a closing marker alone ends the thinking too
    ]


def test_a_file_named_by_several_sources_trains_the_recipe_tokenizer_once(data_dir, tmp_path, monkeypatch):
    """Sources over one file (the same path twice, a link to it, other difficulties, answers only) give each of its
    records to the BPE once: as a source without answers_only reads it where one does, else answers only."""
    from collections import Counter

    from kimivl.data.formats import iter_records, iter_texts
    from kimivl.processing.tokenizer import train_bpe
    from kimivl.train import pipeline

    cot = []
    for a, level in enumerate(["easy", "medium", "hard"]):
        turns = [{"role": "user", "content": f"What is {a} + {a}?"}]
        turns.append({"role": "assistant", "content": f"◁think▷{a} and {a} make {2 * a}◁/think▷{2 * a}"})
        cot.append({"messages": turns, "meta": {"difficulty": level}})
    write_records(tmp_path / "cot.jsonl", cot)
    (tmp_path / "text-link.jsonl").symlink_to(data_dir / "text.jsonl")
    d = recipe_dict(data_dir, tmp_path)
    d["sources"] = {
        "text": str(data_dir / "text.jsonl"),
        "colour": str(data_dir / "colour.jsonl"),
        "text_again": str(data_dir / "text.jsonl"),
        "text_link": str(tmp_path / "text-link.jsonl"),
        "cot": {"path": str(tmp_path / "cot.jsonl"), "answers_only": True},
        "cot_easy": {"path": str(tmp_path / "cot.jsonl"), "difficulty": ["easy"]},
        "cot_later": {"path": str(tmp_path / "cot.jsonl"), "answers_only": True, "difficulty": ["easy", "hard"]},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    recipe = load_recipe(tmp_path / "r.yaml")
    records = [*iter_records(data_dir / "colour.jsonl"), cot[0], *map(pipeline._answers_only, cot[1:])]
    once = [*iter_texts(data_dir / "text.jsonl"), *map(pipeline._record_text, records)]
    given = []

    def recorded(texts, **kwargs):
        given.extend(texts)
        return train_bpe(given, **kwargs)

    monkeypatch.setattr(pipeline, "train_bpe", recorded)
    tok = pipeline.recipe_tokenizer(recipe, Sources(recipe), None, save=False)
    assert Counter(given) == Counter(once)  # as many texts as the files hold records
    assert "◁think▷1 and 1 make 2◁/think▷2" not in " ".join(given) and "◁think▷0 and 0 make 0" in " ".join(given)
    assert tok.mergeable_ranks == train_bpe(once, vocab_size=280).mergeable_ranks


def test_the_recipe_tokenizer_is_used_again_only_for_the_recipe_it_was_trained_for(
    data_dir, tmp_path, monkeypatch, caplog
):
    """A changed train_vocab was ignored once out/tokenizer existed: the run went on with the old tokenizer without a
    word. Its record (train_vocab, each source's records) decides: the same recipe reuses it; another one trains it
    again while nothing was trained with it, and once a stage was, is refused naming both values; records fixed in
    place keep it with a warning; a tokenizer saved with no record (an earlier kimivl) is kept and recorded."""
    from kimivl.train import pipeline

    texts = tmp_path / "text.jsonl"
    texts.write_bytes((data_dir / "text.jsonl").read_bytes())
    trained = []

    def recorded(texts, vocab_size):
        trained.append(vocab_size)
        return train_bpe(list(texts), vocab_size=vocab_size)

    def tokenizer(vocab=280, sources=None, save=True):
        d = recipe_dict(data_dir, tmp_path / "run")
        d["tokenizer"] = {"train_vocab": vocab}
        d["sources"] = sources or {"colour": str(data_dir / "colour.jsonl"), "text": str(texts)}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
        recipe = load_recipe(tmp_path / "r.yaml")
        return pipeline.recipe_tokenizer(recipe, Sources(recipe), None, save=save)

    monkeypatch.setattr(pipeline, "train_bpe", recorded)
    record = tmp_path / "run" / "tokenizer" / pipeline.TOKENIZER_RECORD
    first = tokenizer()
    assert tokenizer().mergeable_ranks == first.mergeable_ranks and trained == [280]  # saved, then used again
    assert json.loads(record.read_text())["train_vocab"] == 280
    assert tokenizer(290).n_ranks == 290 and trained == [280, 290]  # nothing trained with it yet: trained again
    assert json.loads(record.read_text())["train_vocab"] == 290
    (tmp_path / "run" / "pre" / "checkpoints" / "step-0000001").mkdir(parents=True)  # a stage began with it
    for save in (True, False):  # the run, and its --plan
        with pytest.raises(
            RecipeError,
            match=r"run/tokenizer was trained with train_vocab 290, not 280: the run's stages were trained with that "
            r"tokenizer .*, so resume with train_vocab 290, or give another --out to train with 280",
        ):
            tokenizer(280, save=save)
    more = {"colour": str(data_dir / "colour.jsonl"), "text": str(texts), "again": str(data_dir / "text.jsonl")}
    with pytest.raises(RecipeError, match=r"was trained on other records .* \(again: no records then, 180 now\)"):
        tokenizer(290, more)
    lines = texts.read_text().splitlines(keepends=True)
    texts.write_text("".join(lines[:-1]))
    with pytest.raises(
        RecipeError, match=r"\(text: 180 records then, 179 now\): .*\(tokenizer: \{path: .*run/tokenizer\}\)"
    ):
        tokenizer(290)
    texts.write_text("".join(lines[:-1]) + json.dumps({"text": "a record fixed in place"}) + "\n")
    assert tokenizer(290).n_ranks == 290 and trained == [280, 290]
    assert "run/tokenizer was trained on data sources text before they changed" in caplog.text
    record.unlink()  # a run begun before kimivl kept the record
    assert tokenizer(290).n_ranks == 290 and trained == [280, 290]
    assert "holds no record of what it was trained on" in caplog.text
    assert json.loads(record.read_text())["train_vocab"] == 290


def test_a_tokenizer_saved_without_a_record_is_kept_only_at_the_recipe_s_size(data_dir, tmp_path):
    """A run begun before kimivl recorded its BPE (280 ranks), resumed under train_vocab 300, went on with that BPE and
    recorded it as trained with 300; resuming with the true 280 was then refused. Its size is compared first."""
    from kimivl.train import pipeline

    def tokenizer(vocab, save=True):
        d = recipe_dict(data_dir, tmp_path / "run")
        d["tokenizer"] = {"train_vocab": vocab}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
        recipe = load_recipe(tmp_path / "r.yaml")
        return pipeline.recipe_tokenizer(recipe, Sources(recipe), None, save=save)

    first = tokenizer(280)
    record = tmp_path / "run" / "tokenizer" / pipeline.TOKENIZER_RECORD
    record.unlink()  # as a kimivl before the record wrote it
    (tmp_path / "run" / "pre" / "checkpoints" / "step-0000001").mkdir(parents=True)  # a stage began with it
    for save in (True, False):  # the run, and its --plan
        with pytest.raises(
            RecipeError,
            match=r"run/tokenizer holds a BPE of 280 ranks \(no record of what it was trained on: .*\), not the 300 "
            r"of the recipe's train_vocab: the run's stages were trained with that tokenizer .*, so resume with "
            r"train_vocab 280, or give another --out to train with 300",
        ):
            tokenizer(300, save=save)
    with pytest.raises(RecipeError, match=r"holds a BPE of 280 ranks .*, not the 270 of"):  # fewer asked for, too
        tokenizer(270)
    assert not record.exists()
    assert tokenizer(280).mergeable_ranks == first.mergeable_ranks
    assert json.loads(record.read_text())["train_vocab"] == 280


def test_a_failing_stage_leaves_the_model_as_it_came(data_dir, tmp_path, monkeypatch):
    from kimivl.processing.processor import KimiVLProcessor
    from kimivl.train import pipeline
    from kimivl.train.stages import joint

    d = recipe_dict(data_dir, tmp_path)
    d["stages"][1].update(recompute=True, train=["multi_modal_projector"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    recipe = load_recipe(tmp_path / "r.yaml")
    sources = Sources(recipe)
    processor = KimiVLProcessor(pipeline.recipe_tokenizer(recipe, sources, None))
    model = pipeline._base_model(recipe, processor.tokenizer)
    seen = {}

    def crash(trainee, *args, **kwargs):
        seen["recompute"] = recomputed(trainee)
        seen["frozen"] = not trainee.language_model.lm_head.weight.requires_grad
        raise RuntimeError("disk full")

    monkeypatch.setattr(joint, "train_loop", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.run_stage(recipe, recipe.stages[1], model, processor, sources, progress=False)
    assert seen == {"recompute": True, "frozen": True}  # the stage ran as configured
    assert not recomputed(model)
    assert all(p.requires_grad for p in model.parameters())


def test_a_freeze_pattern_that_matches_nothing_fails_before_training(data_dir, tmp_path):
    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["stages"][-1]["freeze"] = ["*.mlp.expert.*"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"stage 'sft': freeze pattern '\*\.mlp\.expert\.\*' matches no parameter"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert not (tmp_path / "run" / "vit").exists()


def test_the_seed_comes_from_the_recipe_or_the_command_line(data_dir, tmp_path, monkeypatch):
    import kimivl.train.pipeline as pipeline

    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["seed"] = 3
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    seen = []
    monkeypatch.setattr(pipeline, "run_recipe", lambda r, world: seen.append((r.seed, r.out)))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    assert main(["train", str(tmp_path / "r.yaml"), "--seed", "0", "--out", str(tmp_path / "s0")]) == 0
    assert seen == [(3, tmp_path / "run"), (0, tmp_path / "s0")]


def test_the_device_comes_from_the_recipe_or_the_command_line(data_dir, tmp_path, capsys):
    recipe = recipe_dict(data_dir, tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert load_recipe(tmp_path / "r.yaml").device == "cpu"
    assert load_recipe(tmp_path / "r.yaml", {"device": "cpu:0"}).device == "cpu:0"
    assert main(["train", str(tmp_path / "r.yaml"), "--device", "cuda:99"]) == 2
    assert "device 'cuda:99' is not available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fine_tuning_a_bf16_checkpoint_holds_frozen_weights_in_bf16_and_trains_the_same(
    data_dir, tmp_path, small_model, small_processor, monkeypatch, caplog
):
    base = tmp_path / "base"
    small_model.save_pretrained(base, dtype=torch.bfloat16)
    small_processor.save_pretrained(base)
    stage = {
        "name": "sft",
        "kind": "joint",
        "steps": 2,
        "lr": 1e-3,
        "budget": 192,
        "ckpt_every": 1,
        "train": ["multi_modal_projector", "language_model"],
        "freeze": ["*.mlp.experts.*"],
        "mix": {"colour": 1},
    }
    finals = {}
    for run, hold in (("held", True), ("float32", False)):
        if not hold:
            monkeypatch.setattr("kimivl.train.pipeline.hold_frozen_in_bf16", lambda model: [])
        recipe = {
            "name": run,
            "out": str(tmp_path / run),
            "base": {"checkpoint": str(base)},
            "sources": {"colour": str(data_dir / "colour.jsonl")},
            "stages": [stage],
        }
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(recipe))
        with caplog.at_level("INFO", logger="kimivl.train.pipeline"):
            model = run_recipe(load_recipe(tmp_path / f"{run}.yaml"), progress=False)
        assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())  # as it came
        finals[run] = load_file(tmp_path / run / "sft" / "final" / "model.safetensors")
        checkpoint = {
            k: t
            for f in checkpoint_files(tmp_path / run / "sft" / "checkpoints" / "step-0000001")
            for k, t in load_file(f).items()
        }
        expert = next(k for k in checkpoint if ".mlp.experts." in k)
        assert checkpoint[expert].dtype == (torch.bfloat16 if hold else torch.float32)
    assert all(torch.equal(finals["held"][k], finals["float32"][k]) for k in finals["held"])
    plans = [r.getMessage() for r in caplog.records if "holds weights" in r.getMessage()]
    assert len(plans) == 2 and plans[0] != plans[1]


def test_bf16_autocast_follows_the_recipe_the_command_line_or_the_cpu(
    data_dir, tmp_path, small_model, small_processor, monkeypatch, caplog, capsys
):
    base = tmp_path / "base"
    small_model.save_pretrained(base, dtype=torch.bfloat16)
    small_processor.save_pretrained(base)
    stage = {
        "name": "sft",
        "kind": "joint",
        "steps": 2,
        "lr": 1e-3,
        "budget": 192,
        "ckpt_every": 1,
        "train": ["multi_modal_projector", "language_model"],
        "freeze": ["*.mlp.experts.*"],
        "mix": {"colour": 1},
    }
    finals, logged = {}, {}
    # (run, the recipe's bf16, --bf16 / --no-bf16, how much slower this CPU multiplies bf16)
    for run, bf16, flag, slowdown in (
        ("auto-slow", None, None, 100.0),
        ("off", False, None, 1.0),
        ("on", None, "--bf16", 100.0),
    ):
        monkeypatch.setattr(precision, "cpu_bf16_slowdown", lambda s=slowdown: s)
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: False)
        recipe = {
            "name": run,
            "out": str(tmp_path / run),
            "base": {"checkpoint": str(base)},
            "bf16": bf16,
            "sources": {"colour": str(data_dir / "colour.jsonl")},
            "stages": [stage],
        }
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(recipe))
        args = ["train", str(tmp_path / f"{run}.yaml")] + ([flag] if flag else [])
        assert main(args + ["--plan"]) == 0
        planned = capsys.readouterr().out.splitlines()
        caplog.clear()
        with caplog.at_level("INFO", logger="kimivl.train.pipeline"):
            assert main(args) == 0
        logged[run] = [r.getMessage() for r in caplog.records if r.getMessage() in planned]
        assert logged[run] == planned and len(planned) == 3  # compute, data, memory: as planned
        finals[run] = load_file(tmp_path / run / "sft" / "final" / "model.safetensors")
        checkpoint = {
            k: t
            for f in checkpoint_files(tmp_path / run / "sft" / "checkpoints" / "step-0000001")
            for k, t in load_file(f).items()
        }
        expert = next(k for k in checkpoint if ".mlp.experts." in k)  # frozen experts are held in bf16 for autocast
        assert checkpoint[expert].dtype == (torch.bfloat16 if run == "on" else torch.float32)
    assert logged["auto-slow"][0] == logged["off"][0] == "training on cpu in float32, no bf16 autocast"
    assert logged["on"][0] == "training on cpu in bf16 autocast"
    assert logged["auto-slow"][2] == logged["off"][2] != logged["on"][2]
    assert all(torch.equal(finals["auto-slow"][k], finals["off"][k]) for k in finals["off"])
    assert not all(torch.equal(finals["on"][k], finals["off"][k]) for k in finals["off"])


def test_a_stage_logs_its_held_out_loss(data_dir, tmp_path, small_model, small_processor):
    base = tmp_path / "base"
    small_model.save_pretrained(base)
    small_processor.save_pretrained(base)
    recipe = {
        "name": "val",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(base)},
        "sources": {"colour": str(data_dir / "colour.jsonl"), "text": str(data_dir / "text.jsonl")},
        "stages": [
            {
                "name": "sft",
                "kind": "joint",
                "steps": 5,
                "lr": 1e-3,
                "budget": 192,
                "log_every": 4,
                "mix": {"colour": 1},
                "val": {"sources": ["text", "colour"], "every": 2, "rows": 3},
            }
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    model = run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_loss" in r) for r in rows] == [(2, True), (4, True), (5, True)]
    sources = Sources(load_recipe(tmp_path / "r.yaml"))
    held = heldout_rows(
        {"text": sources.items["text"], "colour": sources.items["colour"]}, sources.encoder(small_processor), 192, 3
    )
    assert len(held) == 3 and all(r.pixel_values is not None for r in held)  # images and texts packed together
    assert rows[-1]["val_loss"] == pytest.approx(heldout_loss(model.train(), held), rel=1e-6)
    assert rows[0]["val_loss"] > rows[-1]["val_loss"]
    del recipe["stages"][0]["val"]  # validating leaves training as it was (the held-out forwards move no bias)
    recipe["out"] = str(tmp_path / "plain")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    plain, validated = (load_file(tmp_path / run / "sft" / "final" / "model.safetensors") for run in ("plain", "run"))
    assert all(torch.equal(plain[k], validated[k]) for k in plain)


def test_held_out_rows_that_score_nothing_are_named_and_the_model_keeps_its_mode(tiny_model):
    tiny_model.train()
    with pytest.raises(ValueError, match="the validation rows score no token"):
        heldout_loss(tiny_model, [])
    assert tiny_model.training


def test_a_stage_says_how_many_passes_over_its_sources_it_makes(data_dir, tmp_path, caplog):
    """The samples were counted as if rows were full (budget / mean length), a quarter more than a run draws with
    small budgets; the mix moved over that many, so a stage ended short of ``mix_end``."""
    recipe = recipe_dict(data_dir, tmp_path / "run")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with caplog.at_level("INFO", logger="kimivl.train.pipeline"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("stage pretrain: about"))
    found = re.match(r"stage pretrain: about (\d+) samples \(\d+ tokens each on average, ([\d.]+) a row\)", line)
    samples, per_row = int(found[1]), float(found[2])
    assert samples == int(2 * per_row)  # steps x samples a packed row holds (budget / mean length counted rows full)
    used = torch.load(tmp_path / "run" / "pretrain" / "checkpoints" / "step-0000002" / "trainer.pt")["position"]
    assert abs(samples - used) <= 1  # what the run then drew, within a sample (the mix moves over it; before, 8 of 7)
    passes = dict(re.findall(r"(\w+) ([\d.]+)", line.split("each source: ")[1]))
    # pretrain's weights go from text 3 : colour 1 to 1 : 3, so each source gets half of the samples
    assert float(passes["colour"]) == pytest.approx(samples / 2 / 12, abs=0.01)
    assert float(passes["text"]) == pytest.approx(samples / 2 / 180, abs=0.01)


def test_the_plan_counts_the_samples_the_run_then_draws(tmp_path, checkpoint):
    """The plan packed 32 sampled records into rows, the row they ended in counted whole: here 32 documents of about
    130 tokens filled a 4,096-token row and a few more, so 16 a row where rows hold about 30 (and where 32 fit one row,
    32 of any budget): too few samples and passes, and the mix reached ``mix_end`` that much before the stage's end.
    Now it samples on until its samples fill rows, the last counted by its tokens."""
    words = "the red square is next to a blue circle count quick brown fox jumps over lazy dog".split()
    rng = random.Random(0)
    for name, fewest, most in (("short", 20, 60), ("long", 60, 120)):
        texts = (" ".join(rng.choices(words, k=rng.randint(fewest, most))) for _ in range(200))
        write_records(tmp_path / f"{name}.jsonl", [{"text": text} for text in texts])
    recipe = {
        "name": "w",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(checkpoint)},
        "sources": {name: str(tmp_path / f"{name}.jsonl") for name in ("short", "long")},
        "stages": [
            {"name": "lc", "kind": "joint", "steps": 20, "accum": 2, "lr": 1e-3, "budget": 4096}
            | {"mix": {"short": 1}, "mix_end": {"long": 1}}
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(tmp_path / "r.yaml")
    line = plan_recipe(recipe)[1]
    planned = int(re.match(r"stage lc: about (\d+) samples \(", line)[1])
    sources = Sources(recipe, False)
    processor = recipe_processor(recipe, sources, checkpoint, save=False)
    data, said = stage_mixture(recipe.stages[0], StageContext(recipe, sources, processor), sources.encoder(processor))
    assert said == line and data.horizon == planned  # the plan's line is the stage's
    drawn = [i for _, i in itertools.islice(data.batches(0), 40)]  # samples drawn by the end of each row
    assert planned == pytest.approx(drawn[-1], rel=0.03), (line, drawn[-1])  # before: 640 planned (16 a row), 1029
    # the mix reaches mix_end ({long: 1}) as the stage ends, not before (before: by step 11 of 20)
    assert data.weights(drawn[-5])[0] < 0.95 and data.weights(drawn[-1] - 1)[0] > 0.97


def test_the_plan_is_what_the_run_then_logs(data_dir, tmp_path, small_model, small_processor, caplog, capsys):
    base = tmp_path / "base"
    small_model.save_pretrained(base, dtype=torch.bfloat16)
    small_processor.save_pretrained(base)
    joint = {"kind": "joint", "steps": 2, "lr": 1e-3, "budget": 192, "mix": {"colour": 2, "text": 1}}
    recipe = {
        "name": "plan",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(base)},
        "sources": {"colour": str(data_dir / "colour.jsonl"), "text": str(data_dir / "text.jsonl")},
        "stages": [
            {"name": "vit", "kind": "vit", "steps": 2, "lr": 1e-3, "sources": ["colour"], "images_per_batch": 4},
            {"name": "lm", **joint, "train": ["language_model"], "freeze": ["*.mlp.experts.*"]},
            {"name": "projector", **joint, "train": ["multi_modal_projector"], "mix": {"colour": 1}, "accum": 2},
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml"), "--plan"]) == 0
    planned = capsys.readouterr().out.splitlines()
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    with caplog.at_level("INFO", logger="kimivl.train.pipeline"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    logged = [
        r.getMessage()
        for r in caplog.records
        if re.match(r"stage \S+(:| trains)|training on", r.getMessage()) and "steps" not in r.getMessage()
    ]
    assert planned == logged and len(planned) == 7 and planned[0] == "training on cpu in bf16 autocast"
    # the projector stage still holds the experts (frozen since the checkpoint) in bf16, but no longer the LM weights
    # that the stage before trained
    lm, projector = (float(re.search(r"holds weights ([\d.]+) MB", line).group(1)) for line in planned[4::2])
    assert lm < projector < sum(4 * p.numel() for p in small_model.parameters()) / 1e6


def test_a_plan_refuses_a_budget_no_sample_fits_or_past_the_context(data_dir, tmp_path, small_model, small_processor):
    """Both failed at the run's first step (after writing a checkpoint); the plan and the run now refuse them first."""
    base = tmp_path / "base"
    small_model.save_pretrained(base)
    small_processor.save_pretrained(base)
    context = small_model.config.text_config.max_position_embeddings
    for budget, words in ((16, "none of 32 sampled records fits the budget of 16 tokens"), (context + 1, "context")):
        stage = {"name": "lm", "kind": "joint", "steps": 2, "lr": 1e-3, "budget": budget, "mix": {"text": 1}}
        recipe = {
            "name": "p",
            "out": str(tmp_path / "run"),
            "base": {"checkpoint": str(base)},
            "sources": {"text": str(data_dir / "text.jsonl")},
            "stages": [stage],
        }
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(RecipeError, match=f"stage 'lm': .*{words}"):
            plan_recipe(load_recipe(tmp_path / "r.yaml"))
    stage["budget"] = 25  # some samples fit: the plan counts those and says how many are skipped
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "stages": [stage]}))
    line = plan_recipe(load_recipe(tmp_path / "r.yaml"))[1]
    over = int(re.search(r"(\d+) of 32 sampled records are over the budget and skipped", line).group(1))
    assert 0 < over < 32


def test_records_that_cannot_fit_the_budget_are_skipped_without_tokenizing_them(
    data_dir, tmp_path, small_model, small_processor, monkeypatch, caplog
):
    """A 5 MB document took 52 s to plan (each of the 32 sampled records tokenized whole) before "none of 32 sampled
    records fits", and a run tokenized it again at every draw; a document or chat whose characters over the longest
    token's bytes are over the budget is now skipped unread, in the plan, the check, the stage and its validation,
    and the records that fit train as before."""
    from kimivl.processing.tokenizer import KimiTokenizer

    base = tmp_path / "base"
    small_model.save_pretrained(base)
    small_processor.save_pretrained(base)
    huge = "lorem ipsum " * 100_000  # 1.2 MB: 171,429 tokens at the least
    write_records(tmp_path / "huge.jsonl", [{"text": huge}])
    write_records(tmp_path / "docs.jsonl", [{"text": huge}] + [{"text": "The red square."}] * 2)
    ask = [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "red"}]
    long_ask = [{"role": "user", "content": [{"type": "text", "text": huge}]}, ask[1]]
    write_records(tmp_path / "chats.jsonl", [{"messages": ask}] * 2 + [{"messages": long_ask}])
    tokenized, encode = [], KimiTokenizer.encode
    monkeypatch.setattr(
        KimiTokenizer, "encode", lambda self, text, *a, **k: tokenized.append(text) or encode(self, text, *a, **k)
    )
    stage = {"name": "lm", "kind": "joint", "steps": 2, "lr": 1e-3, "budget": 128, "mix": {"huge": 1}}
    recipe = {
        "name": "big",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(base)},
        "sources": {n: str(tmp_path / f"{n}.jsonl") for n in ("huge", "docs", "chats")},
        "stages": [stage],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"none of 32 sampled records fits .*the shortest holds at least 171429\)"):
        plan_recipe(load_recipe(tmp_path / "r.yaml"))
    stage.update(mix={"docs": 1, "chats": 1}, val={"sources": ["docs", "chats"], "every": 2, "rows": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with caplog.at_level("WARNING"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert not [t for t in tokenized if len(t) > 1000]
    over = re.findall(r"\(([^,]+) of source '(\w+)', at least (\d+) tokens\) exceeds the 128-token budget", caplog.text)
    assert {(where.split("/")[-1], name, int(n)) for where, name, n in over} == {
        ("docs.jsonl:1", "docs", 171429),
        ("chats.jsonl:3", "chats", 171429),
    }
    assert "stage lm: " in caplog.text and "samples over the budget of 128 tokens were skipped" in caplog.text


def test_a_plan_holds_nothing_in_bf16_from_a_float32_checkpoint(
    data_dir, tmp_path, small_model, small_processor, capsys
):
    """``info CKPT --train`` held the frozen weights of every checkpoint in bf16 and said "from a bfloat16
    checkpoint": for a float32 one (a stage's final) it planned less memory than the plan, and the run, hold."""
    plans, infos = {}, {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # float16 values are not bfloat16 ones: as float32
        base = tmp_path / str(dtype)
        small_model.save_pretrained(base, dtype=dtype)
        small_processor.save_pretrained(base)
        recipe = {
            "name": "plan",
            "out": str(tmp_path / "run"),
            "base": {"checkpoint": str(base)},
            "sources": {"colour": str(data_dir / "colour.jsonl")},
            "stages": [
                {
                    "name": "sft",
                    "kind": "joint",
                    "steps": 2,
                    "lr": 1e-3,
                    "budget": 192,
                    "train": ["multi_modal_projector"],
                    "mix": {"colour": 1},
                }
            ],
        }
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        plans[dtype] = plan_recipe(load_recipe(tmp_path / "r.yaml"))[-1]
        capsys.readouterr()
        assert main(["info", str(base), "--train", "multi_modal_projector"]) == 0
        infos[dtype] = capsys.readouterr().out.splitlines()[-1]
    float32 = sum(4 * p.numel() for p in small_model.parameters()) / 1e6
    assert f"holds weights {float32:.1f} MB" in plans[torch.float32] and plans[torch.bfloat16] != plans[torch.float32]
    assert plans[torch.float16] == plans[torch.float32]
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        said = f"training multi_modal_projector from a {name} checkpoint under bf16 autocast: "
        assert infos[dtype] == said + plans[dtype].removeprefix("stage sft "), (infos[dtype], plans[dtype])


def test_a_checkpoint_s_dtype_is_that_of_most_of_its_tensors(tmp_path):
    from safetensors.torch import save_file

    from kimivl.train.plan import header_dtype

    tensors = {f"w{i}": torch.zeros(2) for i in range(10)} | {"b": torch.zeros(2, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert header_dtype(tmp_path) == "float32"


def test_a_plan_for_sharded_ranks_gives_the_memory_per_rank(data_dir, tmp_path, small_model, small_processor):
    """With a layout the plan gives the per-rank plan of ``rank_memory_plan`` (the run under torchrun logs the same
    lines: tests/distributed), without it the one-process plan, saying so when the recipe is parallel."""
    base = tmp_path / "base"
    small_model.save_pretrained(base, dtype=torch.bfloat16)
    small_processor.save_pretrained(base)
    stage = {"name": "lm", "kind": "joint", "steps": 2, "lr": 1e-3, "budget": 192, "mix": {"text": 1}, "accum": 4}
    recipe = {
        "name": "p",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(base)},
        "sources": {"text": str(data_dir / "text.jsonl")},
        "stages": [{**stage, "train": ["language_model"]}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"accum \(4 batches per step over all ranks\) must be a multiple of the 8"):
        plan_recipe(load_recipe(tmp_path / "r.yaml", {"parallel": {"dp_shard": 4, "dp_replicate": 2}}))
    one = plan_recipe(load_recipe(tmp_path / "r.yaml"))
    sharded = plan_recipe(load_recipe(tmp_path / "r.yaml", {"parallel": {"dp_shard": 4, "ep": 2}}))
    unsized = plan_recipe(load_recipe(tmp_path / "r.yaml", {"parallel": {"dp_replicate": 2}}))
    small_model.requires_grad_(False)
    small_model.language_model.requires_grad_(True)
    try:
        lm_only = memory_plan(small_model)
        per_rank = rank_memory_plan(small_model, 4, 2, 192, torch.bfloat16, recompute=False)
    finally:  # the session's model, which later tests save and train whole
        small_model.requires_grad_(True)
    assert sharded[-1] == f"stage lm {lm_only.counts}; {per_rank}"
    assert "per rank (dp_shard 4, ep 2)" in sharded[-1] and "per rank" not in one[-1]
    # one process holds the frozen bf16 checkpoint weights in bf16; sharded ranks do not
    assert one[-1] != f"stage lm {lm_only}"
    assert unsized[1] == "memory is planned for one process: give --dp-shard N for the plan per rank of N"
    assert unsized[-1] == f"stage lm {lm_only}"  # nothing held in bf16, as on sharded ranks


def test_a_run_goes_on_only_with_the_seed_it_was_trained_with(data_dir, tmp_path, capsys, caplog):
    """``--resume --seed N`` with another seed silently changed the rest of each stage's data stream."""
    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["stages"], recipe["schedule"] = [recipe["stages"][1]], {"warmup": 1}
    del recipe["export"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "seed.json").write_text('{"seed": 5}\n')  # nothing trained yet: the seed may still change
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert json.loads((tmp_path / "run" / "seed.json").read_text()) == {"seed": 0}
    with pytest.raises(RecipeError, match="was trained with seed 0, not 7: .* resume with --seed 0"):
        run_recipe(load_recipe(tmp_path / "r.yaml", {"seed": 7}), progress=False)
    assert main(["train", str(tmp_path / "r.yaml"), "--resume", "--seed", "7"]) == 2
    assert "resume with --seed 0, or give another --out to train with seed 7" in capsys.readouterr().err
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)  # the same seed goes on (here: all finished)
    (tmp_path / "run" / "seed.json").unlink()  # a run begun before seeds were kept: it goes on, with a warning
    with caplog.at_level("WARNING", logger="kimivl.train.pipeline"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert "holds no record of its seed" in caplog.text


def test_a_missing_base_checkpoint_is_named_before_anything_runs(data_dir, tmp_path):
    recipe = {
        "name": "x",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(tmp_path / "nope")},
        "sources": {"colour": str(data_dir / "colour.jsonl")},
        "stages": [{"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "mix": {"colour": 1}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for run in (run_recipe, plan_recipe):
        with pytest.raises(RecipeError, match="base checkpoint .*nope has no config.json"):
            run(load_recipe(tmp_path / "r.yaml"))
    assert not (tmp_path / "run").exists()


def test_a_recipe_tokenizer_that_is_not_the_base_models_is_refused_before_training(
    data_dir, tmp_path, small_model, small_processor
):
    """The same BPE with <|media_pad|> one id further: before, the run trained until its first image failed."""
    from kimivl.processing.tokenizer import DEFAULT_SPECIAL_NAMES, KimiTokenizer

    base, tok = tmp_path / "base", tmp_path / "tok"
    small_model.save_pretrained(base)
    small_processor.save_pretrained(base)
    names = {22 if i == 21 else i: name for i, name in DEFAULT_SPECIAL_NAMES.items()}
    n = small_processor.tokenizer.n_ranks
    KimiTokenizer(small_processor.tokenizer.mergeable_ranks, {n + i: s for i, s in names.items()}).save_pretrained(tok)
    recipe = {
        "name": "x",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(base)},
        "tokenizer": {"path": str(tok)},
        "sources": {"colour": str(data_dir / "colour.jsonl")},
        "stages": [{"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "budget": 192, "mix": {"colour": 1}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(CheckpointError, match=rf"media_placeholder_token_id {n + 21}, but the tokenizer in {tok} "):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert not (tmp_path / "run" / "sft").exists()


def test_a_run_from_a_checkpoint_processes_images_as_its_preprocessor_config_says(
    data_dir, tmp_path, small_model, small_processor
):
    """The run built the default image processor, not the base checkpoint's: a base with another ``image_mean`` (or
    token limit) trained on images normalised otherwise than it was trained and served with, and its export wrote the
    defaults over the base's settings. One whose patches are not its vision tower's is refused before training."""
    base = tmp_path / "base"
    small_model.save_pretrained(base)
    small_processor.save_pretrained(base)
    pre = json.loads((base / "preprocessor_config.json").read_text())
    pre.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], in_token_limit=1024)
    (base / "preprocessor_config.json").write_text(json.dumps(pre))
    recipe = {
        "name": "x",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(base)},
        "sources": {"colour": str(data_dir / "colour.jsonl")},
        "stages": [{"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "budget": 192, "mix": {"colour": 1}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert json.loads((tmp_path / "run" / "sft" / "final" / "preprocessor_config.json").read_text()) == pre
    pre["patch_size"] = 16
    (base / "preprocessor_config.json").write_text(json.dumps(pre))
    recipe["out"] = str(tmp_path / "run2")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    for run in (run_recipe, plan_recipe):
        with pytest.raises(CheckpointError, match=r"preprocessor_config.json gives patch_size 16, but .* has vision_"):
            run(load_recipe(tmp_path / "r.yaml"))
    assert not (tmp_path / "run2" / "sft").exists()


def test_a_held_out_split_without_answers_to_score_fails_before_training(data_dir, tmp_path):
    split = tmp_path / "heldout"
    split.mkdir()
    write_records(
        split / "mine.jsonl",
        [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}],
    )
    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["eval"] = {"after": ["sft"], "split": str(split)}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(DataError, match="mine.jsonl: record 1 has no meta.task and meta.gold to score it by"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert not (tmp_path / "run" / "vit").exists()


def test_an_evaluation_cut_short_runs_again_on_resume(data_dir, tmp_path, monkeypatch):
    """A finished stage (and the base model) is evaluated again only when its evaluation was cut short, and its data
    is not checked again; a stage trained anew (its folder removed) is checked and evaluated anew whatever eval files
    are left."""
    from kimivl.train.stages import KINDS

    checked = []
    for kind, _ in KINDS.values():
        check = kind.check_data
        monkeypatch.setattr(
            kind, "check_data", lambda self, ctx, check=check: checked.append(self.name) or check(self, ctx)
        )
    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["eval"] = {"base": True, "after": ["sft"], "split": str(data_dir), "limit": 2, "max_new_tokens": 4}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    evaluated = sorted(p.name for p in (tmp_path / "run" / "eval").iterdir())
    files = [".json", ".lengths.json", ".position_loss.json", ".predictions.jsonl"]
    assert evaluated == [f"{name}{end}" for name in ("base", "sft") for end in files]
    first = (tmp_path / "run" / "eval" / "sft.json").read_text()
    for name in ("base", "sft"):  # killed before the last file was written
        (tmp_path / "run" / "eval" / f"{name}.position_loss.json").unlink()
    checked.clear()
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "eval").iterdir()) == evaluated
    assert (tmp_path / "run" / "eval" / "sft.json").read_text() == first and checked == []
    shutil.rmtree(tmp_path / "run" / "sft")
    (tmp_path / "run" / "eval" / "sft.json").write_text("{}")  # the evaluation of the sft trained before
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert (tmp_path / "run" / "eval" / "sft.json").read_text() == first and set(checked) == {"sft"}


def test_a_kill_while_a_stage_saves_its_result_leaves_no_half_final(data_dir, tmp_path, monkeypatch):
    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["stages"], recipe["schedule"]["decay_stages"] = recipe["stages"][:2], []
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def killed(self, path):
        raise KeyboardInterrupt  # after the weights, before the tokenizer files

    with monkeypatch.context() as patch:
        patch.setattr(KimiVLProcessor, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert not (tmp_path / "run" / "vit" / "final").exists()
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)  # finishes the stage from its last checkpoint
    for stage in ("vit", "align"):
        assert {"config.json", "model.safetensors", "tiktoken.model"} <= {
            p.name for p in (tmp_path / "run" / stage / "final").iterdir()
        }


def test_plan_before_the_world_is_built_says_what_the_run_builds(tmp_path):
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "tiny.yaml", {"out": str(tmp_path / "run")})
    lines = plan_recipe(recipe)
    assert lines[1] == (
        f"kimivl train first builds the synthetic world under {tmp_path / 'run' / 'world'} (seed 0, "
        "4000 train, 100 heldout samples per task of every task), then trains a 2048-rank tokenizer "
        "on it"
    )
    assert lines[2].startswith("stage vit: vit, 300 steps; its data and memory are planned once the world is built")
    assert len(lines) == 3 + len(recipe.stages) and not (tmp_path / "run").exists()  # nothing written
    export = tmp_path / "run" / "models" / "kimivl-tiny"  # --out moves the relative export path under it
    assert lines[-1] == f"the last stage's model is exported in bfloat16 to {export}"


def test_a_plan_before_the_world_is_built_refuses_what_the_run_refuses_first(tmp_path):
    """A missing base checkpoint, or an export path that is a file, stops the run before anything runs: the plan of a
    recipe whose world is not built yet said nothing of them and exited 0."""
    recipe = {
        "name": "x",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(tmp_path / "nope")},
        "world": {"seed": 0, "train": 2, "heldout": 1, "tasks": ["reasoning"]},
        "sources": {"reasoning": "world/train/reasoning.jsonl"},
        "stages": [{"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "mix": {"reasoning": 1}}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="base checkpoint .*nope has no config.json"):
        plan_recipe(load_recipe(tmp_path / "r.yaml"))
    (tmp_path / "a-file").write_text("")
    recipe.update(base={"preset": "tiny"}, tokenizer={"train_vocab": 260}, export={"path": str(tmp_path / "a-file")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="export path .*a-file exists and is not a directory"):
        plan_recipe(load_recipe(tmp_path / "r.yaml"))
    assert not (tmp_path / "run").exists()


def test_plan_with_a_world_the_run_would_rebuild_says_so(tmp_path):
    """A world built with other settings than the recipe's is rebuilt by the run: the plan does not count its
    samples."""
    from pathlib import Path

    build_world(tmp_path / "run" / "world", sizes={"train": 2, "heldout": 1}, tasks=["caption"], progress=False)
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "tiny.yaml", {"out": str(tmp_path / "run")})
    lines = plan_recipe(recipe)
    assert lines[1].startswith(
        f"kimivl train first rebuilds the synthetic world under {tmp_path / 'run' / 'world'} (the one there was "
        "built with other settings) (seed 0, 4000 train, 100 heldout samples per task of every task)"
    )
    assert lines[2].startswith("stage vit: vit, 300 steps; its data and memory are planned once the world is built")


def test_ctrl_c_between_steps_says_which_stages_are_kept_and_how_to_resume(
    data_dir, tmp_path, monkeypatch, capsys, caplog
):
    """Ctrl-C during a recipe's held-out evaluation (or its world build, a model's write, the export) printed
    "kimivl train: interrupted" alone: nothing of the finished stage kept nor how to go on."""
    from kimivl.train import pipeline

    recipe = recipe_dict(data_dir, tmp_path / "out")
    recipe["stages"], recipe["schedule"] = (
        [{**recipe["stages"][1], "steps": 1}, {**recipe["stages"][2], "steps": 1}],
        {},
    )
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_export", interrupted)
    caplog.set_level(logging.INFO, logger="kimivl.train.pipeline")
    assert main(["train", str(tmp_path / "r.yaml")]) == 130
    err = capsys.readouterr().err.splitlines()
    names = ", ".join(s["name"] for s in recipe["stages"])
    assert err[-2:] == [
        f"kimivl train: interrupted; finished stages {names} kept under {tmp_path / 'out'}; a stage under way resumes "
        "from its last checkpoint",
        f"resume with: kimivl train {tmp_path / 'r.yaml'} --resume",
    ]
    first = tmp_path / "out" / recipe["stages"][0]["name"] / "final"
    assert f"writing the stage's model to {first}" in caplog.messages  # before the write, minutes at scale


def test_an_interrupted_run_prints_a_resume_command_with_its_settings_and_keeps_its_precision(
    data_dir, tmp_path, monkeypatch, capsys
):
    """The printed command kept only --out and --seed, so a run begun with --no-bf16 resumed in bf16 autocast (which
    no resume check compared), and one begun with --device or a layout failed; now every flag given is repeated, and
    a resume under the other precision is refused, naming the flag (a checkpoint with no record of it resumes)."""
    from kimivl.train import loop
    from kimivl.train.interrupt import StopRequest
    from kimivl.train.state import TRAINER_FILE

    recipe = recipe_dict(data_dir, tmp_path / "elsewhere")
    recipe["stages"], recipe["schedule"] = [{**recipe["stages"][1], "steps": 3}], {"warmup": 1}
    del recipe["export"]
    path, out = str(tmp_path / "r.yaml"), tmp_path / "b16"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    asked = StopRequest()
    asked.requested = True
    agreed = loop.agreed
    monkeypatch.setattr(loop, "agreed", lambda stop, world: asked)  # Ctrl-C after every step
    flags = ["--device", "cpu", "--no-bf16", "--out", str(out), "--seed", "3", "--dp-shard", "1", "--ep", "1"]
    assert main(["train", path, *flags]) == 130
    again = shlex.split(capsys.readouterr().err.split("resume with: ")[1].splitlines()[0])
    assert again[:4] == ["kimivl", "train", path, "--resume"] and sorted(again[4:]) == sorted(flags)
    # without --no-bf16 the rest of the stage would run in bf16 autocast (this CPU counts as fast: conftest)
    assert main(["train", path, "--resume", "--out", str(out), "--seed", "3"]) == 2
    assert (
        "align: " + str(out / "align" / "checkpoints" / "step-0000001") + " was trained in float32, without bf16 "
        "autocast, and this run computes in bf16 autocast: resume with --no-bf16"
    ) in capsys.readouterr().err.replace("\n", " ")
    assert main(again[1:]) == 130  # the printed command resumes, and is stopped after step 2
    assert "align: stopped at your request after step 2 of 3" in capsys.readouterr().err
    saved = out / "align" / "checkpoints" / "step-0000002" / TRAINER_FILE
    trainer = torch.load(saved, weights_only=True)
    assert trainer.pop("bf16") is False
    torch.save(trainer, saved)  # as written before kimivl recorded the precision: resumable as before
    monkeypatch.setattr(loop, "agreed", agreed)
    assert main(["train", path, "--resume", "--out", str(out), "--seed", "3"]) == 0
    assert (out / "align" / "final" / "config.json").is_file()


def test_a_resume_refuses_another_rope_theta_or_source_size_and_warns_of_a_record_fixed_in_place(
    data_dir, tmp_path, monkeypatch, caplog
):
    """A stage stopped after step 1 and resumed with another rope_theta in the recipe went on silently, two RoPE bases
    in one stage; so did one whose text source gained records meanwhile (the samples still to come, picked by index,
    named other records). Now both are refused; a record fixed in place, as the error of a bad sample asks, resumes
    with a warning naming its source."""
    import shutil

    from kimivl.train import loop
    from kimivl.train.interrupt import Interrupted, StopRequest
    from kimivl.train.step import TrainingError

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    recipe = recipe_dict(data, tmp_path / "run")
    recipe["stages"], recipe["schedule"] = [{**recipe["stages"][3], "steps": 2, "accum": 1}], {"warmup": 1}
    del recipe["export"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    asked = StopRequest()
    asked.requested = True
    with monkeypatch.context() as m:
        m.setattr(loop, "agreed", lambda stop, world: asked)  # Ctrl-C after step 1
        with pytest.raises(Interrupted, match="cooldown: stopped at your request after step 1 of 2"):
            run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    recipe["stages"][0]["rope_theta"] = 800000.0
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(TrainingError, match=r"cooldown: the settings .*\(rope_theta: None then, 800000.0 now\)"):
        run_recipe(load_recipe(tmp_path / "other.yaml"), progress=False)
    text = data / "text.jsonl"
    lines = text.read_text().splitlines(keepends=True)
    text.write_text("".join(lines + [json.dumps({"text": "A red circle."}) + "\n"]))
    with pytest.raises(
        RecipeError, match=r"run/tokenizer was trained on other records .*\(text: 180 records then, 181"
    ):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)  # the BPE read them too
    kept = yaml.safe_load((tmp_path / "r.yaml").read_text())
    kept["tokenizer"] = {"path": str(tmp_path / "run" / "tokenizer")}  # the run's tokenizer, as that error says
    (tmp_path / "kept.yaml").write_text(yaml.safe_dump(kept))
    with pytest.raises(TrainingError, match=r"cooldown: the data sources .*\(text: 180 records then, 181 now\)"):
        run_recipe(load_recipe(tmp_path / "kept.yaml"), progress=False)
    text.write_text("".join([json.dumps({"text": "A red circle."}) + "\n", *lines[1:]]))
    with caplog.at_level("WARNING", logger="kimivl.train.state"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    assert "cooldown: data sources text changed since " in caplog.text
    assert (tmp_path / "run" / "cooldown" / "final" / "config.json").is_file()


def test_a_plan_is_for_the_recipes_device_even_where_this_machine_lacks_it(
    data_dir, tmp_path, small_model, small_processor, capsys
):
    """``--plan`` refused a recipe whose GPU this machine lacks ("device 'cuda' is not available here"): a GPU run
    could not be planned on a laptop. Now it plans for that device, in bf16 autocast unless the recipe or --no-bf16
    says otherwise, and says the device is not here; the run itself still refuses it."""
    base = tmp_path / "base"
    small_model.save_pretrained(base, dtype=torch.bfloat16)
    small_processor.save_pretrained(base)
    stage = {"name": "lm", "kind": "joint", "steps": 2, "lr": 1e-3, "budget": 192, "mix": {"text": 1}}
    recipe = {
        "name": "gpu",
        "out": str(tmp_path / "run"),
        "device": "cuda:99",
        "base": {"checkpoint": str(base)},
        "sources": {"text": str(data_dir / "text.jsonl")},
        "stages": [{**stage, "train": ["language_model"], "freeze": ["*.mlp.experts.*"]}],
    }
    path = str(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    plans = {}
    for flags in ([], ["--no-bf16"], ["--device", "cpu", "--bf16"], ["--device", "cpu", "--no-bf16"]):
        assert main(["train", path, "--plan", *flags]) == 0
        plans[" ".join(flags)] = capsys.readouterr().out.splitlines()
    assert plans[""][:2] == [
        "training on cuda:99 in bf16 autocast",
        "cuda:99 is not present on this machine: planned for it, in bf16 autocast as a GPU from Ampere on would "
        "choose (--no-bf16 plans float32)",
    ]
    assert plans["--no-bf16"][:2] == [
        "training on cuda:99 in float32, no bf16 autocast",
        "cuda:99 is not present on this machine: planned for it",
    ]
    # the stages are planned as on a device here with the same precision (frozen bf16 experts held only under bf16)
    assert plans[""][2:] == plans["--device cpu --bf16"][1:] != plans["--no-bf16"][2:]
    assert plans["--no-bf16"][2:] == plans["--device cpu --no-bf16"][1:]
    assert main(["train", path]) == 2
    assert "device 'cuda:99' is not available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_run_and_its_plan_say_where_a_relative_export_path_lands(data_dir, tmp_path, monkeypatch, capsys, caplog):
    """A relative export path is taken from the current directory, except under --out DIR, which moves it under DIR
    (even when DIR is the recipe's own out); the plan and the run's first lines give the absolute path."""
    stage = {"name": "lm", "kind": "joint", "steps": 1, "lr": 1e-3, "budget": 192, "mix": {"text": 1}}
    out = tmp_path / "abs-run"
    recipe = {
        "name": "where",
        "out": str(out),
        "tokenizer": {"train_vocab": 280},
        "sources": {"text": str(data_dir / "text.jsonl")},
        "export": {"path": "export"},
        "stages": [stage],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    said = "the last stage's model is exported in bfloat16 to "
    for flags, export in (([], tmp_path / "cwd" / "export"), (["--out", str(out)], out / "export")):
        assert main(["train", str(tmp_path / "r.yaml"), "--plan", *flags]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == said + str(export)
    with caplog.at_level("INFO", logger="kimivl.train.pipeline"):
        assert main(["train", str(tmp_path / "r.yaml")]) == 0
    assert said + str(tmp_path / "cwd" / "export") in caplog.messages
    assert (tmp_path / "cwd" / "export" / "config.json").is_file() and not (out / "export").exists()


def test_a_tilde_in_a_recipes_paths_is_the_home_directory(data_dir, tmp_path, monkeypatch, caplog):
    """``out: ~/runs/x`` made a literal ``./~/runs/x`` under the current directory (where ``rm -rf ~/runs`` typed to
    clean it hits the real home), and ``~`` in sources, base, tokenizer, export and eval paths named nothing."""
    import shutil

    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    shutil.copy(data_dir / "text.jsonl", home / "data" / "text.jsonl")
    monkeypatch.setenv("HOME", str(home))
    stage = {"name": "lm", "kind": "joint", "steps": 1, "lr": 1e-3, "budget": 192, "mix": {"text": 1}}
    recipe = {
        "name": "tilde",
        "out": "~/runs/x",
        "tokenizer": {"train_vocab": 280},
        "sources": {"text": "~/data/text.jsonl"},
        "export": {"path": "~/models/x"},
        "stages": [stage],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with caplog.at_level("INFO", logger="kimivl.train.pipeline"):
        assert main(["train", str(tmp_path / "r.yaml")]) == 0
    assert "the last stage's model is exported in bfloat16 to " + str(home / "models" / "x") in caplog.messages
    assert (home / "models" / "x" / "config.json").is_file() and (home / "runs" / "x" / "lm" / "final").is_dir()
    assert not any((tmp_path / "cwd").iterdir())
    # --out ~/other (as --out=~/other leaves it) moves the export only when it is relative: ~/models/x is not
    assert load_recipe(tmp_path / "r.yaml", {"out": "~/other"}).out == home / "other"
    other = {"base": {"checkpoint": "~/m"}, "tokenizer": {"path": "~/tok"}, "eval": {"split": "~/heldout"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, **other, "sources": {"text": {"path": "~/t.jsonl"}}}))
    loaded = load_recipe(tmp_path / "r.yaml")
    assert (loaded.base["checkpoint"], loaded.tokenizer["path"]) == (str(home / "m"), str(home / "tok"))
    assert loaded.out / loaded.eval["split"] == home / "heldout"
    assert loaded.source_path("text") == home / "t.jsonl" and loaded.export["path"] == str(home / "models" / "x")


def test_the_recipe_tokenizer_streams_the_sources_texts_into_the_same_bpe(data_dir, tmp_path, monkeypatch, caplog):
    import logging

    from kimivl.data.formats import iter_records, iter_texts
    from kimivl.processing.tokenizer import train_bpe
    from kimivl.train import pipeline

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict(data_dir, tmp_path)))
    recipe = load_recipe(tmp_path / "r.yaml")
    # the texts as they were gathered in one list: the text source's documents, then each record's text
    texts = [*iter_texts(data_dir / "text.jsonl")]
    texts += [pipeline._record_text(r) for r in iter_records(data_dir / "colour.jsonl")]
    given = []

    def recorded(texts, **kwargs):
        given.append(texts)
        return train_bpe(texts, **kwargs)

    monkeypatch.setattr(pipeline, "train_bpe", recorded)
    with caplog.at_level(logging.INFO, logger=pipeline.log.name):
        tok = pipeline.recipe_tokenizer(recipe, Sources(recipe), None, save=False)
    assert not isinstance(given[0], (list, tuple)) and iter(given[0]) is given[0]  # an iterator, not held texts
    assert tok.mergeable_ranks == train_bpe(texts, vocab_size=280).mergeable_ranks
    assert f"trained the BPE on {len(texts)} texts" in caplog.text


def test_a_run_whose_export_path_another_run_took_meanwhile_keeps_its_model_and_replaces_nothing(
    data_dir, tmp_path, monkeypatch, capsys
):
    """Two runs (other outs) sharing an export path both passed the export check at their start, both logged
    `exported`, and the later to finish replaced the other's export. Now the later one is refused at its export, once
    its checkpoint is written, naming the other run and the command that exports its model from there."""
    import kimivl.train.pipeline as pipeline

    shared = tmp_path / "shared"
    for run in ("a", "b"):
        d = recipe_dict(data_dir, tmp_path / run)
        d["stages"], d["schedule"] = [{"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "mix": {"text": 1}}], {}
        d["export"] = {"path": str(shared)}
        (tmp_path / f"{run}.yaml").write_text(yaml.safe_dump(d))
    stages = pipeline._run_stages

    def a_finishes_while_b_trains(recipe, *args):
        done = stages(recipe, *args)
        if recipe.out == tmp_path / "b":
            run_recipe(load_recipe(tmp_path / "a.yaml"), progress=False)
        return done

    monkeypatch.setattr(pipeline, "_run_stages", a_finishes_while_b_trains)
    assert main(["train", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        f"export path {shared} holds a model written by the run in {tmp_path / 'a'}, not by this run "
        f"({tmp_path / 'b'}); this run's trained model is kept in {tmp_path / 'b' / 'sft' / 'final'}, not exported"
    ) in err
    assert err.rstrip().endswith(
        f"and resume with: {shlex.join(['kimivl', 'train', str(tmp_path / 'b.yaml')])} --resume"
    )
    assert json.loads((shared / "kimivl-run.json").read_text()) == {"out": "../a"}  # a's export, whole
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary dir, no lock
    monkeypatch.undo()
    d = yaml.safe_load((tmp_path / "b.yaml").read_text())
    d["export"]["path"] = str(tmp_path / "b-export")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(d))
    assert main(["train", str(tmp_path / "b.yaml"), "--resume"]) == 0  # as told: only the export runs
    trained, exported = (
        load_file(p / "model.safetensors") for p in (tmp_path / "b" / "sft" / "final", tmp_path / "b-export")
    )
    key = "language_model.model.norm.weight"
    assert torch.equal(trained[key].bfloat16(), exported[key])
    assert json.loads((tmp_path / "b-export" / "kimivl-run.json").read_text()) == {"out": "../b"}


def _rename(recipe: dict, old: str, new: str) -> dict:
    """``recipe`` with its stage ``old`` named ``new``, where the stage is listed and where the schedule names it."""
    renamed = json.loads(json.dumps(recipe))
    for stage in renamed["stages"]:
        stage["name"] = new if stage["name"] == old else stage["name"]
    decay = renamed["schedule"].get("decay_stages", [])
    renamed["schedule"]["decay_stages"] = [new if name == old else name for name in decay]
    return renamed


@pytest.fixture(scope="module")
def renamed_runs(data_dir, tmp_path_factory):
    """A recipe of a vit stage and a joint stage whose mix moves (without replacement), and its final weights
    trained without a stop."""
    root = tmp_path_factory.mktemp("renamed")
    recipe = recipe_dict(data_dir, root / "whole")
    vit, pretrain = recipe["stages"][0], recipe["stages"][2]
    recipe["stages"] = [
        {**vit, "steps": 3, "accum": 1, "ckpt_every": 1},
        {**pretrain, "steps": 3, "replacement": False},
    ]
    recipe["schedule"] = {"warmup": 1, "decay_stages": ["pretrain"]}
    recipe["bf16"] = False  # set: this module's fixture comes before conftest's bf16_is_fast
    del recipe["export"]
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(root / "r.yaml"), progress=False)
    return recipe, load_file(root / "whole" / "pretrain" / "final" / "model.safetensors")


@pytest.mark.parametrize("stage, stop_after, new", [("vit", 1, "captions"), ("pretrain", 5, "pre")])
def test_a_stage_renamed_between_a_stop_and_its_resume_trains_what_it_would_have(
    renamed_runs, tmp_path, monkeypatch, caplog, stage, stop_after, new
):
    """A stage's name seeds its data stream (and the probe its moving mix's horizon comes from), and a resume may
    rename it: renamed, its folder moved along, it went on in another stream (a pass without replacement drawing
    some records twice and others never), with an info line. It goes on with the stream the checkpoint saved (and
    the horizon of its moving mix, which the new name's probe puts elsewhere), and the run ends with the weights of
    a run never stopped."""
    from kimivl.train import loop
    from kimivl.train.interrupt import Interrupted, StopRequest

    recipe, whole = renamed_runs
    recipe = {**recipe, "out": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    steps = itertools.count(1)
    asked = StopRequest()
    with monkeypatch.context() as m:
        m.setattr(loop, "agreed", lambda stop, world: asked if next(steps) == stop_after else stop)
        asked.requested = True
        with pytest.raises(Interrupted, match=f"{stage}: stopped at your request after step"):
            run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    for folder in (tmp_path / "run", tmp_path / "run" / "tensorboard"):
        (folder / stage).rename(folder / new)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_rename(recipe, stage, new)))
    with caplog.at_level("INFO"):
        run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    last = new if stage == "pretrain" else "pretrain"
    resumed = load_file(tmp_path / "run" / last / "final" / "model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert f"going on with the stream {stage!r} the saved" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "data stream" in r.message]


def test_a_stage_to_train_before_one_that_trained_is_refused(data_dir, tmp_path):
    """A stage renamed in the recipe alone (its folder left under the old name) trained again from scratch, and the
    finished stage after it was loaded as it was (or a begun one resumed), trained from the old one: a run whose
    stages were no longer one chain, without a word. The run (and its plan) refuses it before training, saying what
    to do; moving the folder along keeps the run as it was."""
    from kimivl.train.plan import plan_recipe

    recipe = recipe_dict(data_dir, tmp_path / "run")
    recipe["stages"] = [{**recipe["stages"][i], "steps": 1} for i in (1, 3)]
    recipe["schedule"] = {}
    del recipe["export"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)
    kept = {p: p.read_bytes() for p in (tmp_path / "run").glob("*/final/model.safetensors")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_rename(recipe, "align", "projector")))
    run = tmp_path / "run"
    said = (
        f"stage projector is still to train, and cooldown after it has trained already: trained from something else "
        f"than this projector (an earlier one, or a stage since renamed), they would be kept, or resumed, as they are "
        f"while projector trains anew. Remove {run / 'cooldown'} to train them again after the new projector, or "
        f"restore {run / 'projector'} (a stage renamed: move its folder there)"
    )
    # cooldown finished; finished, its checkpoints removed (its final model alone); begun (its checkpoints alone)
    for aside in (None, "checkpoints", "final"):
        if aside:
            (run / "cooldown" / aside).rename(tmp_path / aside)
        for attempt in (lambda r: run_recipe(r, progress=False), plan_recipe):
            with pytest.raises(RecipeError, match=re.escape(said)):
                attempt(load_recipe(tmp_path / "r.yaml"))
        if aside == "checkpoints":
            (tmp_path / aside).rename(run / "cooldown" / aside)
    (tmp_path / "final").rename(run / "cooldown" / "final")
    assert not (run / "projector").exists()
    (run / "align").rename(run / "projector")
    run_recipe(load_recipe(tmp_path / "r.yaml"), progress=False)  # both finished: kept
    moved = {Path(str(p).replace("/align/", "/projector/")): b for p, b in kept.items()}
    assert {p: p.read_bytes() for p in run.glob("*/final/model.safetensors")} == moved
