"""Sharded training on 2 CPU processes (gloo, torchrun, loopback) against one process on the same global batch:
losses, gradient norms and final weights; kill a rank mid-step, resume; a recipe end to end under torchrun."""

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from kimivl import KimiVL
from kimivl.checkpoint import INDEX, CheckpointError, CheckpointReadError, CheckpointWriteError
from kimivl.distributed.checkpoint import is_sharded, load_sharded, save_sharded
from kimivl.distributed.world import World, _launch_variables, init_world
from kimivl.train.optim import build_optimizer
from kimivl.train.recipe import RecipeError
from tests.train.test_pipeline import data_dir, recipe_dict  # noqa: F401 (data_dir is a fixture)

WORKER = Path(__file__).with_name("train_worker.py")
ROOT = Path(__file__).parents[2]
TIMEOUT = 300  # seconds: a hang fails the test instead of stalling the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int | None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``args`` as one plain process (``nproc`` None) or under torchrun on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc is None:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            *args,
        ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a: list[dict], b: list[dict], keys=("loss", "grad_norm", "expert_imbalance", "efficiency")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert ra[key] == pytest.approx(rb[key], rel=2e-5), (ra["step"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process run: 4 steps of 4 rows (images and text), Muon + AdamW, bias balancing on."""
    out = tmp_path_factory.mktemp("single")
    done = run([str(WORKER), "--out", str(out), "--steps", "4", "--weights", str(out / "w.pt")], None)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "nproc, layout",
    [(2, []), (2, ["--ep", "2"]), (4, ["--ep", "2"]), (4, ["--ep", "2", "--replicate", "2"])],
    ids=["dp_shard 2", "dp_shard 2 ep 2", "dp_shard 4 ep 2", "dp_replicate 2 x dp_shard 2 ep 2"],
)
def test_sharded_ranks_train_as_one_process(reference, tmp_path, nproc, layout):
    """Weights sharded over the ranks (and with ep, each layer's experts split over expert groups): the losses,
    gradient norms, expert loads and final weights of one process on the same global batch."""
    done = run(
        [str(WORKER), "--out", str(tmp_path), "--steps", "4", "--weights", str(tmp_path / "w.pt"), *layout], nproc
    )
    assert done.returncode == 0, done.stderr[-3000:]
    close(metrics(tmp_path), metrics(reference))
    assert metrics(reference)[-1]["loss"] < metrics(reference)[0]["loss"] - 1  # it learns
    whole, sharded = torch.load(reference / "w.pt"), torch.load(tmp_path / "w.pt")
    assert whole.keys() == sharded.keys() and len(whole) > 80
    moved = 0
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], rtol=1e-4, atol=1e-4, msg=name)
        moved += name.endswith("e_score_correction_bias") and bool(whole[name].abs().sum() > 0)
    assert moved == 3  # every MoE layer's bias moved, alike on both ranks


@pytest.mark.parametrize("layout", [[], ["--ep", "2"]], ids=["dp_shard 2", "dp_shard 2 ep 2"])
def test_a_killed_rank_ends_the_job_and_the_run_resumes_to_the_same_losses(reference, tmp_path, layout):
    """With ep, each expert group's experts are saved under their own keys and resumed as they were."""
    died = run([str(WORKER), "--out", str(tmp_path), "--steps", "4", "--die-at", "3", *layout], 2)
    assert died.returncode != 0
    checkpoints = tmp_path / "s" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-0000002"
    assert not list(checkpoints.glob(".*.tmp"))
    resumed = run([str(WORKER), "--out", str(tmp_path), "--steps", "4", "--resume", *layout], 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    close(metrics(tmp_path), metrics(reference))


def test_a_sharded_run_resumes_only_with_its_expert_split(tmp_path):
    """Written with ep 2, resumed with ep 1: DCP's partial load found none of the split experts' keys and left the
    experts at the stage's start, without a word (other losses from step 3 on)."""
    first = run([str(WORKER), "--out", str(tmp_path), "--steps", "2", "--ep", "2"], 2)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run([str(WORKER), "--out", str(tmp_path), "--steps", "4", "--resume"], 2)
    assert again.returncode != 0 and "was written with ep 2 and this run has ep 1: resume with ep 2" in again.stderr


def test_two_nodes_on_localhost_hybrid_sharded_train_as_one_process(reference, tmp_path):
    """Two torchrun agents (one process each) meet by c10d rendezvous, as two nodes would; dp_replicate 2 keeps one
    copy of the weights per node."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=kimivl-test",
                *(["--rdzv-conf=is_host=1"] if node == 0 else ["--rdzv-conf=is_host=0"]),
                str(WORKER),
                "--out",
                str(tmp_path),
                "--steps",
                "4",
                "--replicate",
                "2",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in range(2)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=TIMEOUT)
        assert node.returncode == 0, err[-3000:]
    close(metrics(tmp_path), metrics(reference))


@pytest.mark.parametrize("layout", [[], ["--ep", "2"]], ids=["dp_shard 2", "dp_shard 2 ep 2"])
def test_an_official_checkpoint_loads_sharded_and_exports_back_equal(tmp_path, layout):
    """Each rank reads only its rows (and its experts) of an official checkpoint; gathered and written again, every
    tensor equals the original."""
    source = tmp_path / "official"
    made = run(["-c", MAKE_CHECKPOINT.format(worker=WORKER.parent, out=tmp_path, path=source)], None)
    assert made.returncode == 0, made.stderr[-3000:]
    done = run(
        [str(WORKER), "--out", str(tmp_path), "--load", str(source), "--export", str(tmp_path / "back"), *layout], 2
    )
    assert done.returncode == 0, done.stderr[-3000:]
    back = {}
    for file in sorted((tmp_path / "back").glob("model-*.safetensors")):  # written file by file, 1 MiB each
        back |= load_file(file)
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1 and (tmp_path / "back" / INDEX).is_file()
    original = load_file(source / "model.safetensors")
    assert original.keys() == back.keys() and any(".experts.7.down_proj" in k for k in original)
    for key in original:
        torch.testing.assert_close(back[key], original[key], rtol=0, atol=0, msg=key)


MAKE_CHECKPOINT = """
import sys, torch
sys.path.insert(0, "{worker}")
from train_worker import build
model, _ = build("{out}")
with torch.no_grad():
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.normal_(0, 0.05)
model.save_pretrained("{path}", dtype=torch.bfloat16)
model.init_weights(5)
from safetensors.torch import save_file
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, "{path}/fresh.safetensors")
"""


@pytest.mark.parametrize("layout", [[], ["--ep", "2"]], ids=["dp_shard 2", "dp_shard 2 ep 2"])
def test_fresh_weights_drawn_shard_by_shard_equal_one_process(tmp_path, layout):
    """Each rank draws only its rows (and its experts) of a fresh model: gathered, every tensor equals the one-process
    initialisation of the same seed."""
    whole = tmp_path / "whole"
    made = run(["-c", MAKE_CHECKPOINT.format(worker=WORKER.parent, out=tmp_path, path=whole)], None)
    assert made.returncode == 0, made.stderr[-3000:]
    done = run([str(WORKER), "--out", str(tmp_path), "--init", "5", "--export", str(tmp_path / "drawn"), *layout], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    drawn = {}
    for file in sorted((tmp_path / "drawn").glob("model-*.safetensors")):
        drawn |= load_file(file)
    expected = load_file(whole / "fresh.safetensors")
    assert drawn.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(drawn[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_layout_that_does_not_fit_the_world_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RecipeError, match=r"dp_shard 3 x dp_replicate 1 = 3 ranks, but the world has 2"):
        init_world({"dp_shard": 3}, "cpu")
    for ep in (3, 4):  # experts split over more ranks than a shard group holds
        with pytest.raises(RecipeError, match=rf"ep \({ep}\) must divide dp_shard \(2\)"):
            init_world({"ep": ep}, "cpu")
    with pytest.raises(RecipeError, match="parallel.dp_shard must be an integer >= 1"):
        init_world({"dp_shard": 0}, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RecipeError, match=r"ep \(4\) must divide dp_shard \(2\)"):  # dp_shard: a replica's ranks
        init_world({"dp_replicate": 2, "ep": 4}, "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RecipeError, match="launch with torchrun"):
        init_world({"dp_shard": 2}, "cpu")
    assert init_world({"dp_shard": 1, "ep": 1}, "cpu") == init_world(None, "cpu") == World()  # one process


def test_local_rank_is_bounded_by_local_world_size_only_where_the_launcher_sets_it(monkeypatch):
    """torchrun sets LOCAL_WORLD_SIZE; a launcher that does not may still give rank 3 of 4 the local rank 1. The
    highest port is 65535."""
    for name, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _launch_variables() == (4, 3, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "65535")
    assert _launch_variables() == (4, 3, 1)
    monkeypatch.setenv("MASTER_PORT", "65536")
    with pytest.raises(RecipeError, match="MASTER_PORT='65536' must be the rendezvous port"):
        _launch_variables()


def test_a_sharded_checkpoint_cut_short_or_of_another_model_is_refused_naming_why(
    tiny_config, tmp_path, file_size_limit
):
    """One process (DCP without a process group writes the same format): weights and optimiser state come back
    equal, the experts under their own names (no ``@ep``); a shard file cut short or a damaged index is named, a
    shard of the right length but damaged bytes and another model's shapes are said apart; a write the disk refuses
    is named with its errno."""

    def trained(config):
        torch.manual_seed(0)
        model = KimiVL(config)
        optimizer = build_optimizer(model, lr=1e-3)
        ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        return model, optimizer

    model, optimizer = trained(tiny_config)
    path = tmp_path / "ckpt"
    save_sharded(path, model, optimizer, World())
    assert is_sharded(path) and not is_sharded(tmp_path)
    assert "model/language_model.model.layers.1.mlp.experts.gate_up_proj" in read_metadata(path)
    again = KimiVL(tiny_config)
    again_optimizer = build_optimizer(again, lr=1e-3)
    load_sharded(path, again, again_optimizer, World())
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        for key, v in optimizer.state[p].items():
            torch.testing.assert_close(again_optimizer.state[q][key], v, rtol=0, atol=0, msg=(name, key))
    other = dataclasses.replace(tiny_config, text_config=dataclasses.replace(tiny_config.text_config, vocab_size=4000))
    with pytest.raises(CheckpointError, match=rf"{path} does not fit this model \(rank 0: Size mismatch"):
        load_sharded(path, *trained(other), World())
    (shard,) = path.glob("*.distcp")
    written = shard.read_bytes()
    shard.write_bytes(bytes(len(written)))
    with pytest.raises(CheckpointReadError, match=rf"cannot read the files of {path}: damaged \(rank 0: "):
        load_sharded(path, again, again_optimizer, World())
    shard.write_bytes(written[:-1])  # its last byte lost
    with pytest.raises(CheckpointReadError, match=rf"cannot read {shard}: damaged or cut short \(rank 0\)"):
        load_sharded(path, again, again_optimizer, World())
    (path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointReadError, match=rf"cannot read {path / '.metadata'}: damaged or cut short"):
        load_sharded(path, again, again_optimizer, World())
    file_size_limit(100_000)
    with pytest.raises(CheckpointWriteError, match=r"cannot write .*File too large") as failed:
        save_sharded(tmp_path / "full", model, optimizer, World())
    file_size_limit(None)
    assert failed.value.errno == errno.EFBIG


def read_metadata(path: Path) -> dict:
    """The tensors of the DCP checkpoint at ``path`` by key."""
    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


FINALS = ("vit/final", "align/final", "pretrain/final")


def test_a_recipe_under_torchrun_matches_one_process(data_dir, tmp_path):  # noqa: F811
    """From a preset, vit (with recompute), a projector-only joint stage, a joint stage with image standardisation
    and lr_scale: the same losses and exported weights as one process; no rank ever holds the whole model (the
    preset's weights are drawn shard by shard, the vit stage reads the tower alone, the others their shards); rank 0
    alone writes metrics."""
    results = {}
    for name, nproc in (("single", None), ("sharded", 2)):
        d = recipe_dict(data_dir, tmp_path / name)
        d["stages"] = [d["stages"][0], d["stages"][1], d["stages"][2]]
        d["stages"][2]["lr_scale"] = {"vision_tower": 0.1}  # parameter groups by name work on shards too
        for stage in d["stages"]:
            stage["accum"] = 2
        d["schedule"] = {"warmup": 1}
        d["bf16"] = False
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
        done = run(["-m", "kimivl", "train", str(tmp_path / f"{name}.yaml")], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = tmp_path / name
    out = tmp_path / "sharded"
    for line in (
        "initial weights of preset tiny drawn shard by shard (seed 0)",
        f"stage vit: every rank reads only the vision tower of {out / 'initial'}",
        f"stage align: every rank reads only its shards of {out / 'vit' / 'final'}",
        f"stage pretrain: every rank reads only its shards of {out / 'align' / 'final'}",
        "standardised image features over",
    ):
        assert line in done.stderr, line
    plan = run(["-m", "kimivl", "train", str(tmp_path / "sharded.yaml"), "--plan", "--dp-shard", "2"], None)
    memory = [line for line in plan.stdout.splitlines() if "holds" in line or "per rank" in line]
    assert len(memory) == 3 and "before FSDP shards it over 2 ranks" in memory[0] and "per rank" in memory[1]
    for line in memory:  # the plan per rank is what the ranks log
        assert line in done.stderr, line
    close(metrics(results["sharded"]), metrics(results["single"]), keys=("loss", "grad_norm"))
    assert len(metrics(results["single"])) == 5  # vit logs its last step, the joint stages every step
    for run_dir, stage in [(results["sharded"], "initial")] + [(r, s) for r in results.values() for s in FINALS]:
        config = json.loads((run_dir / stage / "config.json").read_text())  # float32 on disk, and it says so
        assert config["text_config"]["torch_dtype"] == "float32", (run_dir, stage)
    a, b = (
        load_file(results["single"] / "export" / "model.safetensors"),
        load_file(results["sharded"] / "export" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=1e-2, atol=1e-3, msg=key)


def test_a_vit_stage_runs_under_expert_parallelism(data_dir, tmp_path):  # noqa: F811
    """The tower has no experts: splitting them failed ('the model has no MoE layer'), so no recipe launched with
    --ep could run its vit stage."""
    d = recipe_dict(data_dir, tmp_path / "run")
    d["stages"], d["schedule"], d["bf16"] = [d["stages"][0]], {"warmup": 1}, False
    d["stages"][0]["accum"] = 2
    del d["export"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    done = run(["-m", "kimivl", "train", str(tmp_path / "r.yaml"), "--ep", "2"], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "vit" / "final" / "config.json").is_file()


SLOW_EXPORT = """
import sys, time
import kimivl.train.pipeline as pipeline
from kimivl.cli import main

convert = pipeline.convert_checkpoint
pipeline.convert_checkpoint = lambda *a, **k: (time.sleep(6), convert(*a, **k))[1]
sys.exit(main(["train", sys.argv[1]]))
"""


def test_an_export_longer_than_the_collective_timeout_completes(data_dir, tmp_path):  # noqa: F811
    """Rank 0 exported while the others waited in a collective barrier: an export longer than parallel.timeout
    (minutes for the A3B) killed the job mid-write."""
    d = recipe_dict(data_dir, tmp_path / "run")
    d["stages"], d["schedule"], d["bf16"] = [d["stages"][1]], {"warmup": 1}, False
    d["stages"][0]["accum"] = 2
    d["parallel"] = {"timeout": 3}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    (tmp_path / "slow.py").write_text(SLOW_EXPORT)
    done = run([str(tmp_path / "slow.py"), str(tmp_path / "r.yaml")], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


HANG = """
import time
import torch.distributed as dist
from kimivl.distributed.world import init_world

world = init_world({"timeout": 2}, "cpu")
if world.rank == 1:
    time.sleep(90)  # a stuck rank
dist.barrier()
"""


def test_a_stuck_rank_ends_the_job_after_parallel_timeout(tmp_path):
    """The others wait for a stuck rank ``parallel.timeout`` seconds in a collective, not the default 10 minutes."""
    (tmp_path / "hang.py").write_text(HANG)
    start = time.monotonic()
    done = run([str(tmp_path / "hang.py")], 2)
    assert done.returncode != 0 and time.monotonic() - start < 60, done.stderr[-3000:]


def test_the_rl_update_of_two_ranks_equals_one_process_on_all_answers(tmp_path):
    """Each rank updates on its share of 8 answers of different lengths (so the ranks pack different numbers of rows,
    the short one running weightless repeats): the weights after the step equal one process's on all 8."""
    weights = {}
    for name, nproc in (("single", None), ("sharded", 2)):
        out = tmp_path / name
        done = run([str(WORKER.with_name("rl_worker.py")), "--out", str(out), "--weights", str(out / "w.pt")], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        weights[name] = torch.load(out / "w.pt")
    assert weights["single"].keys() == weights["sharded"].keys()
    for key, whole in weights["single"].items():
        torch.testing.assert_close(weights["sharded"][key], whole, rtol=1e-5, atol=1e-5, msg=key)


def test_an_rl_recipe_runs_data_parallel(tmp_path):
    """Two ranks, each its own problems and rollouts: one metrics row per iteration (rank 0), a checkpoint per
    iteration in the sharded format, the export, and a resume that finds the stage done. No tensor is sent between the
    ranks as a pickled object (the answers' losses once were: on GPUs each arrived on its sender's device, and the
    first iteration's end failed)."""
    root = tmp_path / "problems"
    make = run(["-c", MAKE_PROBLEMS.format(root=root)], None)
    assert make.returncode == 0, make.stderr[-3000:]
    out = tmp_path / "run"
    recipe = {
        "name": "rl-dp",
        "out": str(out),
        "base": {"preset": "tiny"},
        "tokenizer": {"train_vocab": 260},
        "sources": {"reasoning": str(root / "reasoning.jsonl")},
        "export": {"path": str(out / "export")},
        "stages": [
            {
                "name": "rl",
                "kind": "rl",
                "steps": 2,
                "lr": 1e-3,
                "budget": 512,
                "ckpt_every": 1,
                "sources": ["reasoning"],
                # 6 asked of 4 problems: the ranks share the 4 (fewer than asked had failed in the gather's order)
                "rl": {"problems": 6, "samples": 2, "max_new_tokens": 6, "length_weight": 1.0},
            }
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "launch.py").write_text(NO_TENSOR_OBJECTS)
    done = run([str(tmp_path / "launch.py"), "train", str(tmp_path / "r.yaml")], 2)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(out)
    assert [(r["stage"], r["step"]) for r in rows] == [("rl", 1), ("rl", 2)]
    assert all(0 <= r["accuracy"] <= 1 and r["mean_length"] > 0 for r in rows)
    assert (out / "rl" / "checkpoints" / "step-0000002" / ".metadata").is_file()
    assert (out / "export" / "model.safetensors").is_file()
    again = run(["-m", "kimivl", "train", str(tmp_path / "r.yaml"), "--resume"], 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(metrics(out)) == 2


NO_TENSOR_OBJECTS = """
import io, pickle, sys
import torch, torch.distributed as dist
from kimivl.cli import main

class Plain(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            raise AssertionError("a tensor sent to the other ranks as an object")

def plain_only(out, obj, group=None):
    Plain(io.BytesIO()).dump(obj)
    return gather(out, obj, group=group)

gather, dist.all_gather_object = dist.all_gather_object, plain_only
sys.exit(main(sys.argv[1:]))
"""

MAKE_PROBLEMS = """
import json, pathlib
root = pathlib.Path("{root}")
root.mkdir(parents=True)
rows = [dict(messages=[dict(role="user", content=f"What is {{i}} + {{i}}?"),
                       dict(role="assistant", content=f"\u25c1think\u25b7{{i}} + {{i}}\u25c1/think\u25b7{{2 * i}}")],
             meta=dict(task="reasoning", gold=2 * i, difficulty="easy")) for i in range(4)]
(root / "reasoning.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
"""
