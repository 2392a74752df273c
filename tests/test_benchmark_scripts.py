"""What the benchmark scripts build, compare and leave behind: checkpoint_write's config can be saved, decode_speed's
parity check holds for short prompts, serve_load's server runs the model named from any folder and says why it did
not start, SIGTERM to serve_load or distributed alone stops their children, every script answers --help under -OO,
and each script's main path runs at tiny sizes."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kimivl import KimiVL, KimiVLConfig

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
HELPERS = ("arguments.py", "children.py", "rss.py")  # modules the scripts import, no scripts themselves


@pytest.fixture()
def script(monkeypatch):
    """``script(NAME)``: the globals of ``benchmarks/NAME.py``, its ``main`` not run (its folder on the path)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return lambda name: runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name=f"benchmark_{name}")


def test_checkpoint_write_builds_a_config_its_checkpoints_can_be_saved_with(script):
    """The script died at its first save for every argument set: it gave the A3B config a 32,000-entry vocabulary and
    kept the image placeholder id 163605, which ``stored_config`` (reading the config back) refused."""
    config = script("checkpoint_write")["bench_config"](2)
    t = config.text_config
    assert (t.vocab_size, t.num_hidden_layers, t.hidden_size, t.n_routed_experts) == (32000, 2, 2048, 64)
    assert config.media_placeholder_token_id < t.vocab_size and KimiVLConfig.from_dict(config.to_dict()) == config
    with torch.device("meta"):
        model = KimiVL(config)
    assert model.stored_config(torch.bfloat16).text_config.torch_dtype == "bfloat16"  # what each checkpoint writes


def test_decode_speed_parity_check_reads_the_new_tokens_after_a_prompt_under_32(script, tiny_model):
    """``--prompt 16`` printed a parity failure: transformers' new tokens were taken from position 32 on."""
    from kimivl.inference.generate import generate_ids
    from kimivl.inference.sampling import SamplingParams

    class Reference:  # generate as transformers returns it: the prompt, then the new tokens (``shift`` off kimivl's)
        def __init__(self, shift: int):
            self.shift = shift

        def generate(self, ids, max_new_tokens, **_):
            new = generate_ids(tiny_model, ids.tolist(), params=SamplingParams(max_new_tokens=max_new_tokens))
            return torch.cat([ids, torch.tensor(new) + self.shift], 1)

    same_greedy_tokens = script("decode_speed")["same_greedy_tokens"]
    ids = torch.randint(10, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert same_greedy_tokens(tiny_model, Reference(0), ids, new=4)
        assert not same_greedy_tokens(tiny_model, Reference(1), ids, new=4)


def test_rollout_speed_finds_its_default_model_from_any_folder(script, tmp_path, monkeypatch, capsys):
    """The default ``--model models/kimivl-tiny`` was relative to the folder the script ran from."""
    monkeypatch.chdir(tmp_path)
    main = script("rollout_speed")["main"]
    monkeypatch.setattr(sys, "argv", ["rollout_speed.py", "--problems", "1", "--k", "2", "--new", "2", "--batch", "2"])
    main()
    out = capsys.readouterr().out
    assert "one at a time" in out and "(2 answers x 2 tokens)" in out and "batched / one at a time" in out


def test_serve_load_names_the_baseline_it_compares_with(script):
    table = script("serve_load")["table"]
    level = {"requests": 4, "errors": [], "rps": 1.0, "ttft": (0.1, 0.2), "itl": (0.01, 0.02), "texts": ["a"] * 4}
    lines = table([{**level, "clients": 8, "tps": 50.0}, {**level, "clients": 32, "tps": 100.0}])
    assert "| vs 8 clients |" in lines[0] and "| 32 | 4 (0 failed) | 1.00 | 100.0 | 2.00x |" in lines[3]
    assert "| vs 1 client |" in table([{**level, "clients": 1, "tps": 50.0}])[0]


def test_serve_load_gives_the_server_its_model_from_this_folder_and_shows_why_it_did_not_start(tmp_path):
    """A relative ``--model`` went unchanged to the server, which runs in the repository (there it found none, or
    another model); and a server that did not start said nothing more (its stderr went to /dev/null)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_bytes((ROOT / "models" / "kimivl-tiny" / "config.json").read_bytes())
    cmd = [sys.executable, str(BENCHMARKS / "serve_load.py"), "--model", "mine", "--requests", "1", "--max-tokens", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "the server did not start; the end of its log:" in done.stderr
    assert f"tokenizer directory {tmp_path / 'mine'} has no tiktoken.model" in done.stderr  # the server's own words


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def terminated_alone(cmd: list[str], cwd: Path, depth: int, env: dict = ENV) -> tuple[int, list[int]]:
    """Start ``cmd``, wait until it has ``depth`` generations of children, send SIGTERM to it alone (not its group);
    its exit status and its descendants then (each killed here afterwards, should it still run)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = []
    try:
        deadline = time.monotonic() + 120
        generation = [proc.pid]
        for _ in range(depth):
            while not (found := [c for p in generation for c in children(p)]):
                assert proc.poll() is None and time.monotonic() < deadline, "the script ended before its children began"
                time.sleep(0.1)
            seen += found
            generation = found
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        deadline = time.monotonic() + 10
        while any(map(alive, seen)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return code, [pid for pid in seen if alive(pid)]
    finally:
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the children in /proc")
def test_sigterm_to_serve_load_alone_stops_its_server(tmp_path):
    """The server ran on forever, its parent gone."""
    cmd = [sys.executable, str(BENCHMARKS / "serve_load.py"), "--requests", "64", "--max-tokens", "16"]
    code, left = terminated_alone(cmd, tmp_path, depth=1)
    assert code == 143 and left == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the children in /proc")
def test_sigterm_to_distributed_alone_stops_torchrun_and_its_ranks_and_removes_its_folder(tmp_path):
    """torchrun and its rank ran on, their parent gone, and the temporary folder of results stayed."""
    (tmp_path / "tmp").mkdir()
    cmd = [sys.executable, str(BENCHMARKS / "distributed.py"), "--steps", "50", "--rows", "2", "--budget", "64",
           "--hidden", "64", "--layers", "1", "--bf16", "off"]  # fmt: skip
    env = ENV | {"TMPDIR": str(tmp_path / "tmp")}
    code, left = terminated_alone(cmd, tmp_path, depth=2, env=env)  # torchrun, then its rank
    assert code == 143 and left == []
    # the script's temporary folder of results is gone (torchrun and the ranks leave torch's own, on every run)
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("tmp")] == []


def test_every_script_and_module_command_answers_help_under_python_OO():
    """``python -OO`` strips docstrings: every parser described by ``__doc__`` met None with an AttributeError."""
    run = (
        f"HELPERS = {HELPERS}"
        + """
import runpy, sys
from pathlib import Path
assert __doc__ is None and sys.flags.optimize == 2
sys.path.insert(0, "benchmarks")
scripts = sorted(str(p) for p in Path("benchmarks").glob("*.py") if p.name not in HELPERS)
for target in scripts + ["kimivl.rl.compare", "kimivl.rl.passk"]:
    sys.argv = [target, "--help"]
    try:
        (runpy.run_path if target.endswith(".py") else runpy.run_module)(target, run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, (target, e.code)
    print("ok", target)
"""
    )
    done = subprocess.run([sys.executable, "-OO", "-c", run], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    scripts = [p for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS]
    assert len(scripts) == 14 and done.stdout.count("ok ") == len(scripts) + 2, done.stdout


# every command (each benchmark script, compare and passk) run in one process: ``exit_code(target)``
COMMANDS = f"""
import argparse, io, json, os, runpy, signal, sys, time, warnings
from pathlib import Path
HELPERS = {HELPERS}
warnings.filterwarnings("ignore", "'kimivl.rl.compare' found in sys.modules")  # imported by rl_signal.py
sys.path.insert(0, "benchmarks")
scripts = sorted(str(p) for p in Path("benchmarks").glob("*.py") if p.name not in HELPERS)
targets = scripts + ["kimivl.rl.compare", "kimivl.rl.passk"]

def exit_code(target):
    try:
        (runpy.run_path if target.endswith(".py") else runpy.run_module)(target, run_name="__main__")
    except SystemExit as e:
        return e.code
    return "no exit"
"""

STOPPED = (
    COMMANDS
    + """
signal.signal(signal.SIGINT, signal.default_int_handler)
stdout, said, results = os.dup(1), {}, Path(sys.argv[1])  # stdout: a pipe whose reader has gone

def stopped(parser, *args, **kwargs):  # each command stopped as it parses its arguments
    if how == "interrupt":
        print("started", file=sys.__stderr__, flush=True)  # the test sends SIGINT
        time.sleep(60)
    print("line\\n" * 100_000)  # more than a pipe holds

argparse.ArgumentParser.parse_args = stopped
for target in targets:
    for how in ("interrupt", "pipe"):
        os.dup2(stdout, 1)
        sys.argv, sys.stderr = [target], io.StringIO()
        try:
            code = exit_code(target)
        except BaseException as e:
            code = type(e).__name__
        said[f"{target} {how}"] = [code, sys.stderr.getvalue()]
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
results.write_text(json.dumps(said))
"""
)


def test_every_script_and_module_command_stops_on_ctrl_c_and_a_reader_gone_as_kimivl_does(tmp_path):
    """Ctrl-C printed a torch traceback (no script caught KeyboardInterrupt), and stdout's reader gone (``| true``,
    ``| head``) a BrokenPipeError traceback, or for ``kimivl.rl.compare`` its usage and 'error: [Errno 32] Broken
    pipe' with exit 2. Each now stops as ``kimivl`` does: Ctrl-C one line and 130; the reader gone quietly, 141. Here
    every command, run in one process, gets SIGINT from outside once it has started, then writes to a stdout whose
    reader has gone."""
    read, write = os.pipe()
    os.close(read)
    results = tmp_path / "said.json"
    cmd = [sys.executable, "-c", STOPPED, str(results)]
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as a shell runs it
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    other = []
    try:
        for line in proc.stderr:
            if line == "started\n":
                proc.send_signal(signal.SIGINT)
            else:
                other.append(line)
        assert proc.wait(timeout=60) == 0, "".join(other)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    said = json.loads(results.read_text())
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)
    progs = {f"benchmarks/{s}": s for s in scripts}
    progs |= {m: f"python -m {m}" for m in ("kimivl.rl.compare", "kimivl.rl.passk")}
    assert len(said) == 2 * len(progs) == 32
    for target, prog in progs.items():
        assert said[f"{target} interrupt"] == [130, f"\n{prog}: interrupted\n"], target
        assert said[f"{target} pipe"] == [141, ""], target


CLOSED = (
    COMMANDS
    + """
assert sys.stdout is None  # started with stdout closed (>&-)
argparse.ArgumentParser.parse_args = lambda *args, **kwargs: sys.exit("parsed")  # not refused: it would run
said, results = {}, Path(sys.argv[1])
for target in targets:
    sys.argv, sys.stderr = [target], io.StringIO()
    said[target] = [exit_code(target), sys.stderr.getvalue()]
results.write_text(json.dumps(said))
"""
)


def test_every_script_and_module_command_refuses_a_closed_stdout_as_kimivl_does(tmp_path):
    """``python -m kimivl.rl.compare RUN >&-`` exited 0 with its table, its only result, printed into nothing (and
    passk's and the benchmarks' tables alike); ``kimivl`` refused it. Each now says so on stderr and exits 2 before
    it starts (here: before it parses its arguments)."""
    results = tmp_path / "said.json"
    cmd = [sys.executable, "-c", CLOSED, str(results)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(results.read_text())
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)
    progs = {f"benchmarks/{s}": s for s in scripts} | {
        m: f"python -m {m}" for m in ("kimivl.rl.compare", "kimivl.rl.passk")
    }
    assert len(said) == len(progs) == 16
    message = "error: stdout is closed, so the result would be lost: redirect it to a file (or /dev/null)"
    for target, prog in progs.items():
        assert said[target] == [2, f"{prog}: {message}\n"], target


def test_the_peak_rise_reads_proc_in_kib_and_counts_bytes_on_linux(script, monkeypatch):
    """Where VmHWM can be reset, the rise is VmHWM at exit less VmRSS at entry, both KiB in /proc/self/status."""
    rss = script("rss")["PeakRise"].__enter__.__globals__
    monkeypatch.setitem(rss, "reset_peak", lambda: True)
    monkeypatch.setitem(rss, "status_kib", {"VmRSS": 1000, "VmHWM": 1500}.__getitem__)
    with rss["PeakRise"]() as rise:
        pass
    assert (rise.exact, rise.bytes) == (True, 500 * 1024)


def test_the_peak_rise_counts_bytes_where_ru_maxrss_does_macos(script, monkeypatch):
    """Without /proc (macOS) the memory benchmarks took ``ru_maxrss`` for KiB, as Linux counts it, and printed 200 GiB
    for a block of 200 MiB: macOS counts it in bytes."""
    import resource

    rss = script("rss")["PeakRise"].__enter__.__globals__  # the module's own globals (run_path returns a copy)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux's answer, in KiB
    block = 400 * 2**20

    class Darwin:  # getrusage as macOS answers it: bytes, the peak risen by the block
        def __init__(self, risen: bool):
            self.ru_maxrss = kib * 1024 + (block if risen else 0)

    answers = iter([Darwin(False), Darwin(True)])
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setitem(rss, "reset_peak", lambda: False)  # no /proc/self/clear_refs
    monkeypatch.setattr(resource, "getrusage", lambda who: next(answers))
    with rss["PeakRise"]() as rise:
        pass
    assert (rise.exact, rise.bytes) == (False, block)


def test_train_throughput_runs_both_arms_on_the_synthetic_world():
    """The script died at its first cycle since ``Mixture.sample`` returns ``(encoded or None, tokens)``: it read the
    pair as a sample."""
    flags = "--steps 1 --accum 1 --budget 256 --batch 4 --width 64 --vision-width 32 --tasks text,caption".split()
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), *flags],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ratio = float(done.stdout.split("ratio packed / padded: ")[1].split("x")[0])
    flops = float(done.stdout.split("their model FLOPs: ")[1].split("x")[0])
    assert ratio > 0 and 1.0 <= flops < 3.0  # packing never adds model FLOPs; these short samples pad little


SMOKE = {  # each script's main path at the smallest sizes, and a line of its result
    "decode_context": ("--contexts 64 128 --steps 2 --layers 1", r"context +128: decode +[0-9.]+ ms/token"),
    "decode_speed": (
        "--batch 1 --prompt 16 --new 4 --layers 1 --repeats 1 --threads 1",
        r"fp32 greedy tokens identical to transformers on a short prompt: True",
    ),
    "lm_speed": ("--batch 1 --seq 32 --layers 1 --repeats 1 --threads 1", r"ratio kimivl / transformers: [0-9.]+x"),
    "loss_memory": (
        "--positions 64 --vocab 1024 --hidden 64",
        r"largest relative gradient difference [0-9.]+e[-+][0-9]+",
    ),
    "moonvit_memory": ("--layers 1 --side 8", r"peak extra / features +[0-9.]+"),
    "source_memory": ("--records 200", r"indexed holds [0-9.]+ of the list's memory"),
    "rollout_speed": ("--problems 2 --k 2 --new 4 --batch 4 --threads 1", r"batched / one at a time: [0-9.]+x"),
    "long_context": (
        "--lengths 64 --decode-lengths 64 --layers 1 --decode-layers 1 --steps 1 --baseline-max 64 --hf-max 64 "
        "--hf-decode-max 64 --threads 1 --time-limit 30",
        r"\| 64 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|",
    ),
}


@pytest.mark.parametrize("name", SMOKE)
def test_each_benchmark_script_runs_its_main_path(name):
    """Every script end to end at tiny sizes: an internal change (train_throughput read ``Mixture.sample``'s new pair
    as a sample) broke a script for a whole session, as only its --help and helpers were tested."""
    import re

    flags, result = SMOKE[name]
    cmd = [sys.executable, str(BENCHMARKS / f"{name}.py"), *flags.split()]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(result, done.stdout), done.stdout[-2000:]
