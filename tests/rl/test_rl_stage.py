"""The rl stage kind inside a recipe: a two-iteration run on hand-made problems, and the shipped RL recipes."""

import json
import logging
import re
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kimivl import KimiVL
from kimivl.cli import main
from kimivl.data.formats import DataError, write_records
from kimivl.rl.sampler import ProblemSampler
from kimivl.rl.trainer import prompt_of
from kimivl.train.recipe import RecipeError, load_recipe
from kimivl.train.stages import check_layout
from kimivl.train.stages.rl import check_prompts, rl_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    root = tmp_path_factory.mktemp("problems")
    (root / "img").mkdir()
    records = []
    for i in range(6):
        Image.fromarray(np.full((28, 56, 3), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        records.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": str(root / "img" / f"{i}.png")},
                            {"type": "text", "text": f"What is {i} + {i}?"},
                        ],
                    },
                    {"role": "assistant", "content": f"◁think▷{i} + {i} = {2 * i}◁/think▷{2 * i}"},
                ],
                "meta": {"task": "reasoning", "gold": 2 * i, "difficulty": ["easy", "hard"][i % 2]},
            }
        )
    write_records(root / "train" / "reasoning.jsonl", records[:4])
    write_records(root / "heldout" / "reasoning.jsonl", records[4:])
    write_records(
        root / "heldout" / "notes.jsonl", [{"id": str(i), "text": f"{i} + {i} = {2 * i}. " * 40} for i in range(3)]
    )
    return root


def settings(problems, tmp_path, **more):
    """A recipe's settings besides its stages: source ``p``, the problems' train split."""
    p = str(problems / "train" / "reasoning.jsonl")
    return {"name": "x", "out": str(tmp_path), "tokenizer": {"train_vocab": 260}, "sources": {"p": p}, **more}


def test_an_rl_stage_runs_in_a_recipe(problems, tmp_path):
    out = tmp_path / "run"
    recipe = {
        "name": "rl-smoke",
        "out": str(out),
        "base": {"preset": "tiny"},
        "tokenizer": {"train_vocab": 260},
        "sources": {"reasoning": str(problems / "train" / "reasoning.jsonl")},
        "export": {"path": str(out / "export"), "dtype": "bfloat16"},
        "eval": {"base": True, "after": ["rl"], "split": str(problems / "heldout"), "max_new_tokens": 4},
        "stages": [
            {
                "name": "rl",
                "kind": "rl",
                "steps": 2,
                "lr": 1e-3,
                "budget": 512,
                "ckpt_every": 1,
                "sources": ["reasoning"],
                "rl": {
                    "problems": 2,
                    "samples": 2,
                    "max_new_tokens": 4,
                    "length_weight": 1.0,
                    "curriculum": {0.0: {"easy": 1}, 0.5: {"easy": 1, "hard": 1}},
                },
            }
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("rl", 1), ("rl", 2)]
    assert "length_reward" in rows[0] and 0 <= rows[-1]["accuracy"] <= 1
    assert (out / "rl" / "final" / "model.safetensors").is_file() and (out / "rl" / "checkpoints" / "latest").is_file()
    for name in ("base", "rl"):
        assert "reasoning" in json.loads((out / "eval" / f"{name}.json").read_text())
        assert "all" in json.loads((out / "eval" / f"{name}.lengths.json").read_text())
        losses = json.loads((out / "eval" / f"{name}.position_loss.json").read_text())
        assert list(losses) == ["notes"] and list(losses["notes"]) == ["0-512"] and losses["notes"]["0-512"] > 0
    assert KimiVL.from_pretrained(out / "export").config.text_config.vocab_size > 0


def test_bad_rl_settings_are_recipe_errors(problems, tmp_path):
    base = settings(problems, tmp_path)
    stage = {"name": "rl", "kind": "rl", "steps": 2, "lr": 1e-3, "sources": ["p"]}
    for bad, match in (
        ({**stage, "sources": []}, "problem 'sources'"),
        ({**stage, "kind": "joint", "mix": {"p": 1}, "rl": {}}, "rl, sources do not apply to a joint stage"),
        ({**stage, "rl": {"objective": "ppo"}}, "objective"),
        ({**stage, "rl": {"priority": "bogus"}}, "rl: rl priority is 'signal'"),
        ({**stage, "rl": {"samplez": 4}}, "samplez"),
        ({**stage, "rl": {"bf16": False}}, "bf16 is set for the whole recipe"),
        (
            {**stage, "rl": {"kl_coef": 0.1, "grpo_level": "sequence"}},
            "rl: grpo_level, kl_coef set, which only objective grpo reads, and the stage trains with objective opmd: "
            "remove them, or set objective: grpo",
        ),
        ({**stage, "rl": {"objective": "grpo", "tau": 0.3}}, "rl: tau set, which only objective opmd reads"),
        (
            {**stage, "rl": {"problems": 2, "samples": 2, "updates": 5}},
            r"rl: rl updates \(5 optimizer steps.*\) is more than the 4 answers a rank has per iteration",
        ),
        # these had loaded: a misspelt difficulty silently drew none of its problems, a phase from 1 on was never in
        # force, the others failed when the rl stage started (after the stages before it trained) or gave NaN
        (
            {**stage, "rl": {"curriculum": {0.0: {"easy": 1, "mediun": 1}}}},
            r"rl: curriculum phase 0.0: unknown difficulties \['mediun'\]; a phase weighs some of \['easy', 'medium'",
        ),
        ({**stage, "rl": {"curriculum": {"start": {"easy": 1}}}}, r"curriculum phase 'start': .* a number in \[0, 1\)"),
        ({**stage, "rl": {"curriculum": {0.0: {"easy": 1}, 1.5: {"hard": 1}}}}, r"curriculum phase 1.5: .*\[0, 1\)"),
        ({**stage, "rl": {"curriculum": {0.5: {"easy": 1}}}}, "the curriculum must start at progress 0"),
        (
            {**stage, "rl": {"curriculum": {0.0: {"easy": -1, "medium": 2}}}},
            r"curriculum phase 0.0: weights must be finite numbers >= 0 with a positive sum, got \{'easy': -1",
        ),
        ({**stage, "rl": {"curriculum": {0.0: {"easy": 0}}}}, "curriculum phase 0.0: weights .* a positive sum"),
        ({**stage, "rl": {"curriculum": {0.0: {"easy": float("nan")}}}}, "curriculum phase 0.0: weights must be"),
        ({**stage, "rl": {"curriculum": {0.0: None}}}, "curriculum phase 0.0: a phase maps difficulties to weights"),
        (  # the 2 iterations draw at progress 0 and 0.5: the phase was silently never in force
            {**stage, "rl": {"curriculum": {0.0: {"easy": 1}, 0.6: {"hard": 1}}}},
            r"rl: curriculum phase 0.6 starts after the stage's last iteration \(its 2 iterations reach progress 0.5\)",
        ),
        ({**stage, "rl": {"samples": "2"}}, "rl: rl samples must be an integer, got '2'"),
        ({**stage, "rl": {"tau": float("nan")}}, "rl: rl tau must be a finite number, got nan"),
        ({**stage, "rl": {"length_weight": float("nan")}}, "rl: rl length_weight must be a finite number, got nan"),
        ({**stage, "rl": {"stop": "<|im_end|>"}}, "rl: rl stop must be a list of special-token names"),
        ({**stage, "sources": "p"}, "stage 'rl': sources must be a list of source names, got 'p'"),
        ({**stage, "sources": ["q"]}, r"stage 'rl' uses sources \['q'\] that 'sources' does not define"),
        ({**stage, "rl": "tau"}, "stage 'rl': 'rl' settings are a mapping, got 'tau'"),
    ):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, "stages": [bad]}))
        with pytest.raises(RecipeError, match=match):  # when the recipe loads, before anything runs
            load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, "seed": "0", "stages": [stage]}))
    with pytest.raises(RecipeError, match="^seed must be an integer in"):  # not the rl seed's sum with a string
        load_recipe(tmp_path / "r.yaml")
    given = {**stage, "rl": None, "budget": 512, "clip": 0.5, "ckpt_every": 3}  # an empty `rl:`
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, "bf16": False, "stages": [given]}))
    recipe = load_recipe(tmp_path / "r.yaml")
    cfg = rl_config(recipe, recipe.stages[0])
    assert (cfg.bf16, cfg.iterations, cfg.budget, cfg.clip, cfg.ckpt_every) == (False, 2, 512, 0.5, 3)


@pytest.mark.parametrize(
    ("rl", "match"),
    [
        ({"curriculum": {0.0: {"medium": 1}}}, r"rl: curriculum phase 0.0 gives no weight to any difficulty present"),
        ({"stop": ["<|im_end|>", "<|endoftext|>"]}, r"rl: this tokenizer has no special token '<\|endoftext\|>'"),
        ({"problems": 2, "bad": {}}, r"data source 'bad': .*bad.jsonl:1 is no RL problem"),
        (  # a TypeError traceback ('unhashable type') as the sampler grouped the problems by difficulty
            {"problems": 2, "bad": {"gold": 4, "difficulty": ["easy"]}},
            r"data source 'bad': .*bad.jsonl:1 has a meta.difficulty of type list: a difficulty is a label",
        ),
        (  # a GenerationError naming neither problem nor file when the problem was first drawn, maybe hours in
            {"problems": 2, "bad": {"gold": 4}, "prompt": "1 + " * 3000 + "1?"},
            r"'bad': .*bad.jsonl:1 is a problem whose prompt takes \d{4} tokens, which does not fit the model's "
            r"context of 4096 tokens",
        ),
        (  # refused by its text's floor of tokens, unencoded
            {"problems": 2, "bad": {"gold": 4}, "prompt": "1 + " * 60000},
            r"'bad': .*bad.jsonl:1 is a problem whose prompt takes at least \d+ tokens, which does not fit",
        ),
    ],
)
def test_an_rl_stage_s_data_is_checked_before_the_first_stage_trains(problems, tmp_path, capsys, rl, match):
    """A curriculum weighing no difficulty the problems hold, a stop token the tokenizer lacks, a problem without a
    gold answer, with a difficulty that is no string or with a prompt over the model's context failed when the rl
    stage started (or, the prompt, when first drawn), after the stages before it had trained."""
    rl = {"problems": 2, "samples": 2, "max_new_tokens": 2, **rl}
    bad, prompt = rl.pop("bad", None), rl.pop("prompt", "2 + 2?")
    record = {"messages": [{"role": "user", "content": prompt}], "meta": bad or {}}
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    sources = ["bad"] if bad is not None else ["p"]
    stages = [
        {"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "budget": 256, "mix": {"p": 1}},
        {"name": "rl", "kind": "rl", "steps": 2, "lr": 1e-3, "budget": 256, "sources": sources, "rl": rl},
    ]
    d = settings(problems, tmp_path / "run")
    d["base"], d["sources"]["bad"] = {"preset": "tiny"}, str(tmp_path / "bad.jsonl")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**d, "stages": stages}))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run" / "sft").exists()


def test_the_prompt_check_refuses_a_prompt_of_exactly_the_context_and_warns_where_answers_are_cut(
    small_processor, caplog
):
    """Generation refuses a prompt of ``context`` tokens (no room for one answer token), so the check before the
    first stage does too; one that leaves fewer than ``max_new_tokens`` of room is trained on with a warning."""
    record = {"messages": [{"role": "user", "content": "What is 2 + 2? " * 40}], "meta": {"task": "reasoning"}}
    n = len(small_processor.encode(prompt_of(record)).input_ids)
    fewest = small_processor.fewest_tokens(prompt_of(record))
    assert fewest < n

    def check(context, max_new_tokens=1):
        sources = types.SimpleNamespace(checked=set(), items={"p": [record, record]})
        ctx = types.SimpleNamespace(processor=small_processor, sources=sources)
        check_prompts(types.SimpleNamespace(sources=["p"]), ctx, context, max_new_tokens)

    with pytest.raises(DataError, match=f"record 1 is a problem whose prompt takes {n} tokens, .* context of {n} "):
        check(n)
    with pytest.raises(DataError, match=f"takes at least {fewest} tokens, .* context of {fewest} tokens"):
        check(fewest)  # refused by its text's floor alone, unencoded
    with caplog.at_level(logging.WARNING, logger="kimivl.train.stages.rl"):
        check(n + 1)  # room for the one answer token asked for
        check(n + 3, max_new_tokens=3)
        assert caplog.text == ""
        check(n + 1, max_new_tokens=2)
    assert f"2 problems leave fewer than max_new_tokens (2) of the {n + 1}-token context to answer in" in caplog.text


def test_the_prompt_check_warns_once_a_run_and_again_for_a_stage_answering_longer(small_processor, caplog):
    """The check is made once a source and context (before the first stage, and when each stage starts): a later stage
    on the same problems with a larger max_new_tokens was told nothing of the answers it cuts short."""
    record = {"messages": [{"role": "user", "content": "What is 2 + 2? " * 10}], "meta": {"task": "reasoning"}}
    n = len(small_processor.encode(prompt_of(record)).input_ids)
    sources = types.SimpleNamespace(checked=set(), items={"p": [record]})
    ctx = types.SimpleNamespace(processor=small_processor, sources=sources)
    with caplog.at_level(logging.WARNING, logger="kimivl.train.stages.rl"):
        for max_new_tokens in (8, 8, 20, 20, 8):
            check_prompts(types.SimpleNamespace(sources=["p"]), ctx, n + 10, max_new_tokens)
    assert caplog.text.count("1 problems leave fewer than max_new_tokens (20)") == 1
    assert "max_new_tokens (8)" not in caplog.text


def test_a_second_rl_stage_draws_other_problems_than_the_first(problems, tmp_path):
    """The first rl stage samples with the recipe's seed (the shipped runs), each later one with the next seed."""
    stage = {"kind": "rl", "steps": 2, "lr": 1e-3, "sources": ["p"], "rl": {"problems": 2, "samples": 2}}
    stages = [{**stage, "name": "rl1"}, {"name": "sft", "kind": "joint", "steps": 1, "lr": 1e-3, "mix": {"p": 1}}]
    stages.append({**stage, "name": "rl2"})
    d = settings(problems, tmp_path, seed=5)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**d, "stages": stages}))
    recipe = load_recipe(tmp_path / "r.yaml")
    first, second = (rl_config(recipe, s) for s in (recipe.stages[0], recipe.stages[2]))
    assert (first.seed, second.seed) == (5, 6)
    draws = [ProblemSampler(["easy"] * 100, seed=cfg.seed).sample(8, 0.0) for cfg in (first, second)]
    assert draws[0] != draws[1]
    d["seed"] = 2**64 - 1  # the largest seed: the next wraps round
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**d, "stages": stages}))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert rl_config(recipe, recipe.stages[2]).seed == 0


def test_more_updates_than_a_rank_has_answers_is_refused_before_the_first_stage(problems, tmp_path):
    """4 problems x 2 samples: 8 answers in one process, 4 per rank of 2; updates 5 fits 1 rank, not 2."""
    stage = {"name": "rl", "kind": "rl", "steps": 2, "lr": 1e-3, "sources": ["p"]}
    stage["rl"] = {"problems": 4, "samples": 2, "updates": 5}
    d = settings(problems, tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**d, "stages": [stage]}))
    recipe = load_recipe(tmp_path / "r.yaml")
    check_layout(recipe, 1, 1)
    with pytest.raises(RecipeError, match=r"'rl': rl updates \(5 .*4 answers .*\(4 problems / 2 ranks x 2 samples\)"):
        check_layout(recipe, 2, 1)


def test_an_rl_stage_under_expert_parallelism_or_splitting_its_problems_unevenly_is_refused(problems, tmp_path):
    """An rl stage runs with ep 1, its problems a multiple of the ranks: 4 problems fit 2 ranks, not 3, nor ep 2."""
    stage = {"name": "rl", "kind": "rl", "steps": 2, "lr": 1e-3, "sources": ["p"], "rl": {"problems": 4, "samples": 2}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**settings(problems, tmp_path), "stages": [stage]}))
    recipe = load_recipe(tmp_path / "r.yaml")
    check_layout(recipe, 2, 1)
    for ranks, ep in ((3, 1), (2, 2)):
        with pytest.raises(
            RecipeError, match=rf"'rl': .* \(ep 1\), its problems \(4\) a multiple of the {ranks} ranks"
        ):
            check_layout(recipe, ranks, ep)


@pytest.mark.parametrize("name", ["tiny-rl.yaml", "tiny-rl-nolen.yaml", "tiny-rl-grpo.yaml"])
def test_shipped_rl_recipes_are_valid(name):
    recipe = load_recipe(RECIPES / name)
    assert recipe.base == {"checkpoint": "models/kimivl-tiny"} and recipe.world["seed"] == 0
    cfg = rl_config(recipe, recipe.stages[0])
    assert cfg.iterations * cfg.problems * cfg.samples <= 48 * 16 * 8  # the same budget for every comparison
    assert cfg.objective == ("grpo" if "grpo" in name else "opmd")
    assert (cfg.length_weight > 0) == (name != "tiny-rl-nolen.yaml")
    assert cfg.priority == "signal" and "hard" not in str(cfg.curriculum)  # the budget where the model has signal


def test_an_unknown_rl_setting_is_named_with_the_settings_rl_takes(problems, tmp_path):
    """A typo under ``rl:`` read "RLConfig.__init__() got an unexpected keyword argument 'tua'", and a setting the
    stage gives elsewhere "got multiple values for keyword argument"; every other recipe mistake lists what is taken."""
    from dataclasses import fields

    from kimivl.rl.trainer import RLConfig

    base = settings(problems, tmp_path)
    stage = {"name": "rl", "kind": "rl", "steps": 2, "lr": 1e-3, "sources": ["p"]}
    taken = sorted({f.name for f in fields(RLConfig)} - {"iterations", "budget", "clip", "ckpt_every", "seed", "bf16"})
    assert "tau" in taken and "samples" in taken
    for rl, words in (
        ({"tua": 0.3, "samples": 4}, f"stage 'rl': rl has unknown keys ['tua']; it takes {taken}"),
        (
            {"budget": 512, "iterations": 3},
            "stage 'rl': rl: iterations, budget set, which the stage takes elsewhere (iterations from the stage's "
            "steps, budget from the stage's budget)",
        ),
    ):
        (tmp_path / "r.yaml").write_text(yaml.safe_dump({**base, "stages": [{**stage, "rl": rl}]}))
        with pytest.raises(RecipeError) as e:
            load_recipe(tmp_path / "r.yaml")
        assert str(e.value) == words


def test_an_rl_stage_reads_each_problem_once_for_its_difficulty(problems, tmp_path, monkeypatch):
    """The sampling check (the curriculum against the problems' difficulties) read every problem again before the
    first stage, again when the stage started and once more for the trainer's sampler."""
    from kimivl.data.indexed import JsonlRecords

    reads, get = [], JsonlRecords.__getitem__
    monkeypatch.setattr(JsonlRecords, "__getitem__", lambda self, i: reads.append(i) or get(self, i))
    stage = {"name": "rl", "kind": "rl", "steps": 1, "lr": 1e-3, "budget": 256, "sources": ["p"]}
    stage["rl"] = {"problems": 2, "samples": 2, "max_new_tokens": 2, "curriculum": {0.0: {"easy": 1}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**settings(problems, tmp_path / "run"), "stages": [stage]}))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0
    # problems 1 and 3 are hard, never sampled: read to train the tokenizer, to check them, for their difficulty and
    # to check that their prompts fit the model's context (once, before the first stage)
    assert reads.count(1) == reads.count(3) == 4 and {0, 2} <= set(reads)


def test_a_run_gives_each_data_warning_once(problems, tmp_path, caplog):
    """Each stage's data is checked before the first stage trains and again when it starts (and the rl trainer builds
    its sampler once more): the curriculum's undrawn problems were warned of three times, a vision-only stage's
    imageless source twice."""
    plain = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
    write_records(tmp_path / "plain.jsonl", [plain] * 2)
    recipe = settings(problems, tmp_path / "run")
    recipe["sources"]["c"] = str(tmp_path / "plain.jsonl")
    align = {"name": "align", "kind": "joint", "steps": 1, "lr": 1e-3, "budget": 256, "mix": {"p": 1, "c": 1}}
    align["train"] = ["multi_modal_projector"]
    rl = {"name": "rl", "kind": "rl", "steps": 1, "lr": 1e-3, "budget": 256, "sources": ["p"]}
    rl["rl"] = {"problems": 2, "samples": 2, "max_new_tokens": 2, "curriculum": {0.0: {"easy": 1}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**recipe, "stages": [align, rl]}))
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(tmp_path / "r.yaml")]) == 0
    assert caplog.text.count("the curriculum never draws 2 of the 4 problems") == 1
    assert "stage rl: the curriculum never draws" in caplog.text
    assert caplog.text.count("the first 2 records of data source 'c' hold no image") == 1
