"""The benchmark scripts refuse bad arguments as they parse them, naming the flag and its range: a count of 0 met a
traceback (StatisticsError, ZeroDivisionError, UnboundLocalError) or printed a table of nan after the work."""

import os
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def on_the_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when a script runs: its folder first


def refusal(name: str, argv: list[str], monkeypatch, capsys) -> str:
    """What ``benchmarks/NAME.py ARGV`` says as it exits with status 2 (argparse's usage error)."""
    main = runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name=f"benchmark_{name}")["main"]
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    "name,argv,message",
    [
        ("decode_speed", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        ("decode_speed", ["--prompt", "0"], "argument --prompt: must be >= 1, got 0"),
        ("decode_context", ["--contexts", "64", "0"], "argument --contexts: must be >= 1, got 0"),
        ("decode_context", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        ("lm_speed", ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        ("long_context", ["--lengths", "0"], "argument --lengths: must be >= 1, got 0"),
        ("long_context", ["--steps", "x"], "argument --steps: must be a whole number >= 1, got 'x'"),
        ("source_memory", ["--records", "0"], "argument --records: must be >= 1, got 0"),
        ("loss_memory", ["--positions", "0"], "argument --positions: must be >= 1, got 0"),
        ("moonvit_memory", ["--side", "0"], "argument --side: must be >= 1, got 0"),
        ("recompute_memory", ["--vocab", "3"], "argument --vocab: must be >= 4, got 3"),
        ("train_throughput", ["--accum", "0"], "argument --accum: must be >= 1, got 0"),
        ("train_throughput", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
        ("train_throughput", ["--budget", "-5"], "argument --budget: must be >= 1, got -5"),
        ("rollout_speed", ["--k", "0"], "argument --k: must be >= 1, got 0"),
        ("rollout_speed", ["--batch", "-1"], "argument --batch: must be >= 1, got -1"),
        ("distributed", ["--budget", "0"], "argument --budget: must be >= 1, got 0"),
        ("rl_signal", ["--samples", "1"], "argument --samples: must be >= 2, got 1"),
        ("rl_signal", ["--problems", "0"], "argument --problems: must be >= 1, got 0"),
        ("rl_signal", ["--seeds", ""], "--seeds '': give whole numbers separated by commas, e.g. 0,1,2"),
        ("rl_signal", ["--seeds", "0,,1"], "--seeds '0,,1': give whole numbers separated by commas"),
    ],
)
def test_counts_below_their_least_are_refused_as_parsed(name, argv, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert message in refusal(name, argv, monkeypatch, capsys)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_padded_batches_smaller_than_a_row_are_refused(monkeypatch, capsys):
    """``--padded-tokens 10`` printed 'at most 10 tokens', every batch holding a longer sample alone."""
    said = refusal("train_throughput", ["--budget", "256", "--padded-tokens", "10"], monkeypatch, capsys)
    assert "--padded-tokens 10: must be >= 256, the packed rows' length" in said
    said = refusal(
        "train_throughput",
        ["--recipe", str(BENCHMARKS.parent / "recipes" / "tiny.yaml"), "--padded-tokens", "2048"],
        monkeypatch,
        capsys,
    )
    assert "--padded-tokens 2048: must be >= 4096" in said  # the recipe's long-context stage has rows of 4096


def test_a_loss_with_no_scored_position_is_refused_not_printed_as_nan(monkeypatch, capsys):
    argv = ["--positions", "2", "--scored", "0.001", "--vocab", "16", "--hidden", "8"]
    said = refusal("loss_memory", argv, monkeypatch, capsys)
    assert "--positions 2 at --scored 0.001: none drew a target; give more of either" in said


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as for a user without write access
    said = refusal("checkpoint_write", ["--dir", str(tmp_path)], monkeypatch, capsys)
    assert f"--dir {tmp_path}: {tmp_path} is not writable; choose another --dir" in said


def test_serve_load_refuses_a_model_folder_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    said = refusal("serve_load", ["--model", "mine"], monkeypatch, capsys)
    assert f"--model {tmp_path / 'mine'}: no checkpoint there (no config.json)" in said  # the path made absolute
