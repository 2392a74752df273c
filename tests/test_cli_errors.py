"""The command line: devices, defaults, streaming, and every user mistake as one line on stderr with exit code 2."""

import errno
import json
import re

import pytest
import torch

from kimivl import KimiVL, KimiVLProcessor, cli, generate
from kimivl.checkpoint import CheckpointError
from kimivl.cli import CommandError, _ints, main, resolve_device
from kimivl.data.formats import DataError, iter_records, iter_texts
from kimivl.demo import DEFAULT_EXAMPLES, DEFAULT_MODEL
from kimivl.train.loop import TrainingError
from kimivl.train.recipe import RecipeError


def _one_line_error(capsys, command: str, *parts: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"kimivl {command}: error: ")
    for part in parts:
        assert part in err, err
    return err


@pytest.mark.parametrize(
    "device,parts",
    [
        ("cuda", ["--device cuda: CUDA is not available on this machine", "use --device cpu"]),
        ("cuda:1", ["--device cuda:1: CUDA is not available", "use --device cpu"]),
        ("gpu", ["--device gpu: not a device name; use cpu, cuda or cuda:N"]),
        ("meta", ["--device meta: meta holds no weights", "use --device cpu or cuda"]),
        ("tpu", ["--device tpu"]),
    ],
)
@pytest.mark.parametrize("command", ["chat", "eval"])
def test_unusable_devices_are_one_line(monkeypatch, capsys, device, parts, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = (
        ["chat", "--device", device, "hi"]
        if command == "chat"
        else ["eval", "--task", "synthetic", "--model", str(DEFAULT_MODEL), "--device", device]
    )
    assert main(argv) == 2
    _one_line_error(capsys, command, *parts)


def test_default_device_is_a_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(CommandError, match=r"has 2 CUDA device\(s\); use cuda:0..cuda:1"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    for command in ("chat", "eval"):
        assert (
            cli.build_parser().parse_args([command, "--task", "x"] if command == "eval" else [command]).device is None
        )


def test_chat_uses_the_shipped_model_by_default_and_streams(monkeypatch, capsys):
    """Without --model, chat answers with models/kimivl-tiny, exactly as generate does; the answer is printed piece
    by piece while it is generated."""
    from kimivl.inference import chat

    model, processor = KimiVL.from_pretrained(DEFAULT_MODEL), KimiVLProcessor.from_pretrained(DEFAULT_MODEL)
    question = [{"role": "user", "content": [{"type": "text", "text": "Read the text in the image."}]}]
    expected = generate(model, processor, question, max_new_tokens=6, temperature=0.0, seed=0, top_p=1.0)
    real = chat.stream_generate
    seen = []

    def watched(*args, **kwargs):
        for piece in real(*args, **kwargs):
            seen.append((piece, capsys.readouterr().out))  # what was printed before this piece was handed out
            yield piece

    monkeypatch.setattr(chat, "stream_generate", watched)
    assert (
        main(["chat", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu", "Read the text in the image."])
        == 0
    )
    printed = "".join(out for _, out in seen) + capsys.readouterr().out
    assert printed.strip() == expected.strip() and len(seen) >= 2
    assert any(out for _, out in seen[1:]), "nothing was printed before the answer ended"


@pytest.mark.parametrize(
    "error,parts",
    [
        (TrainingError("step 12: the loss is NaN"), ["step 12: the loss is NaN"]),
        (OSError(errno.ENOSPC, "No space left on device"), ["the disk is full (No space left on device)"]),
        (
            OSError(errno.ENOSPC, "No space left on device", "/out/seed.json"),
            ["the disk is full: writing /out/seed.json failed (No space left on device)"],
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/root/x.png"), ["Permission denied", "/root/x.png"]),
        (CheckpointError("the disk is full: writing m failed"), ["the disk is full"]),
        (RecipeError("stage 'sft': steps (5) below warmup (10)"), ["stage 'sft'"]),
        (DataError("data.jsonl:3: invalid JSON"), ["data.jsonl:3"]),
    ],
)
def test_project_and_os_errors_are_one_line(monkeypatch, capsys, error, parts):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_demo", fail)
    assert main(["demo"]) == 2
    _one_line_error(capsys, "demo", *parts)


def test_bugs_still_show_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_demo", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["demo"])


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_demo", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err.strip() == "kimivl demo: interrupted"


def test_bad_sampling_flags_and_configs_are_one_line(capsys, tmp_path):
    assert main(["chat", "--temperature", "nan", "--device", "cpu", "hi"]) == 2
    _one_line_error(capsys, "chat", "temperature must be >= 0: 0 (greedy) or a finite number")
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    config["text_config"]["eos_token_id"] = "[EOS]"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["info", str(tmp_path)]) == 2
    _one_line_error(capsys, "info", "eos_token_id must be a token id")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-new-tokens", "0", "--max-new-tokens must be an integer >= 1, got 0"),
        ("--top-p", "0", r"--top-p must be in \(0, 1\] \(a number\), got 0.0"),
        ("--temperature", "-1", r"--temperature must be >= 0: 0 \(greedy\) or a finite number"),
    ],
)
def test_a_bad_chat_sampling_flag_is_named_as_typed(monkeypatch, capsys, flag, value, message):
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda *a: loaded.append(a))
    assert main(["chat", flag, value, "--device", "cpu", "hi"]) == 2
    assert re.search(f"^kimivl chat: error: {message}", capsys.readouterr().err.strip().splitlines()[-1])
    assert not loaded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"temperature": "0.8"}', "temperature must be >= 0"),
        ('{"temperature": -1}', "temperature must be >= 0"),
        ('{"top_p": 0}', "top_p must be in (0, 1]"),
        ('{"max_new_tokens": 0}', "max_new_tokens must be an integer >= 1"),
        ('{"max_new_tokens": 1.5}', "max_new_tokens must be an integer >= 1"),
        ('{"do_sample": "yes"}', "do_sample must be true or false"),
        ("[0.8]", "must be a JSON object of generation settings"),
        ('{"temperature": 0.8,}', "invalid JSON"),
    ],
)
def test_a_bad_generation_config_is_named_before_the_model_loads(tmp_path, monkeypatch, capsys, text, message):
    (tmp_path / "generation_config.json").write_text(text)
    loaded = []
    monkeypatch.setattr(cli, "_load", lambda *a: loaded.append(a))
    assert main(["chat", "--model", str(tmp_path), "hi"]) == 2
    _one_line_error(capsys, "chat", f"{tmp_path / 'generation_config.json'}", message)
    assert not loaded


def test_chat_refuses_a_config_whose_image_placeholder_is_not_the_tokenizers_before_loading_weights(
    tmp_path, monkeypatch, capsys
):
    import shutil

    shutil.copytree(DEFAULT_MODEL, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["media_placeholder_token_id"] = 2068  # the tokenizer's <|media_pad|> is 2069
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = []
    monkeypatch.setattr(KimiVL, "from_pretrained", lambda *a, **k: loaded.append(a))
    assert main(["chat", "--model", str(tmp_path / "m"), "--device", "cpu", "hi"]) == 2
    _one_line_error(capsys, "chat", "media_placeholder_token_id 2068", "<|media_pad|> at id 2069", "config.json")
    assert not loaded


def test_do_sample_false_in_a_generation_config_is_greedy(tmp_path):
    from kimivl.inference.generation_config import generation_defaults, write_generation_config

    write_generation_config(tmp_path, {"temperature": 0.0, "max_new_tokens": 9})  # greedy: as transformers reads it
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"do_sample": False, "max_new_tokens": 9}
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "max_new_tokens": 9}
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6, "top_p": 0.9}')
    assert generation_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.9}
    assert generation_defaults(tmp_path / "elsewhere") == {}


def _ocr_recipe(tmp_path, steps: int) -> None:
    """``tmp_path / 'r.yaml'``: one joint stage of ``steps`` on the bundled OCR questions from kimivl-tiny."""
    stage = {"name": "sft", "kind": "joint", "steps": steps, "lr": 1e-3, "mix": {"ocr": 1}}
    recipe = {
        "name": "p",
        "out": str(tmp_path / "run"),
        "base": {"checkpoint": str(DEFAULT_MODEL)},
        "sources": {"ocr": str(DEFAULT_EXAMPLES / "ocr.jsonl")},
        "stages": [stage],
    }
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))  # JSON is YAML


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dp-shard", "0"], "--dp-shard must be >= 1, got 0"),
        (["--dp-shard", "-1"], "--dp-shard must be >= 1, got -1"),
        (["--ep", "0"], "--ep must be >= 1, got 0"),
        (["--dp-shard", "2", "--ep", "0"], "--ep must be >= 1, got 0"),
    ],
)
def test_train_refuses_a_parallel_layout_below_one(tmp_path, capsys, flags, message):
    """``--dp-shard 0`` and ``--ep 0`` were dropped as if not given: the plan (or the run) went on without them."""
    _ocr_recipe(tmp_path, steps=2)
    assert main(["train", str(tmp_path / "r.yaml"), "--plan"]) == 0  # the recipe plans without the flags
    assert "stage sft trains" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "r.yaml"), "--plan", *flags]) == 2
    _one_line_error(capsys, "train", message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flag", "value"), [("--out", ""), ("--device", ""), ("--out", " ")])
def test_train_refuses_an_empty_out_or_device(tmp_path, capsys, flag, value):
    """``--out ""`` (an unset $OUT in a script) was dropped: the run trained into the recipe's out."""
    _ocr_recipe(tmp_path, steps=1)
    assert main(["train", str(tmp_path / "r.yaml"), flag, value]) == 2
    key = flag.removeprefix("--")
    _one_line_error(capsys, "train", f"{flag} is empty: give one, or leave {flag} out for the recipe's '{key}'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("chunk", ["0", "-1"])
def test_info_refuses_a_prefill_chunk_below_one_without_context_too(capsys, chunk):
    assert main(["info", "--preset", "tiny", "--prefill-chunk", chunk]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"kimivl info: error: --prefill-chunk must be >= 1, got {chunk}"
    assert captured.out == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "info needs a checkpoint directory or --preset NAME"),
        (["--preset", "tiny", "--prefill-chunk", "512"], "--prefill-chunk sizes the prefill of --context's memory"),
        (
            ["--preset", "tiny", "--train", "language_model", "--dp-shard", "2", "--ep", "3"],
            "ep (3) must divide dp_shard (2)",
        ),
        (["--preset", "tiny", "--freeze", "nothing*"], "freeze pattern 'nothing*' matches no parameter"),
    ],
)
def test_info_errors_are_the_commands_one_line_and_come_before_the_table(capsys, flags, message):
    """info printed 'error: ...' without 'kimivl info:', the whole table before a layout the plan refuses, and
    ignored --prefill-chunk without --context."""
    assert main(["info", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("kimivl info: error: ") and message in captured.err
    assert captured.err.count("\n") == 1, captured.err


def test_deeply_nested_jsonl_lines_are_data_errors(tmp_path):
    nested = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "deep.jsonl").write_text('{"text": "fine"}\n' + nested + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl:2: JSON nested too deeply"):
        list(iter_texts(tmp_path / "deep.jsonl"))
    (tmp_path / "deep_chat.jsonl").write_text('{"messages": ' + "[" * 50_000 + "]" * 50_000 + "}\n")
    with pytest.raises(DataError, match=r"deep_chat\.jsonl:1: JSON nested too deeply"):
        list(iter_records(tmp_path / "deep_chat.jsonl"))


def test_multi_line_checkpoint_errors_print_as_one_line(checkpoint, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"].to(torch.int8)
    del tensors["language_model.model.norm.weight"]
    save_file(tensors, broken / "model.safetensors")
    assert main(["chat", "--model", str(broken), "--device", "cpu", "hi"]) == 2
    _one_line_error(
        capsys,
        "chat",
        "does not match the model that ",
        "config.json describes: missing tensors (1): language_model.model.norm.weight",
        "wrong kind",
        "language_model.lm_head.weight: checkpoint I8",
    )


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("merge_kernel_size", 2, "merge_kernel_size must be two positive integers"),
        ("image_std", ["a", 1, 1], "image_mean/image_std need 3 finite numbers"),
        ("image_mean", [0.5, float("nan"), 0.5], "image_mean/image_std need 3 finite numbers"),
        ("in_token_limit", 0, "in_token_limit must be a positive integer, got 0"),
        ("patch_size", 0, "patch_size must be a positive integer, got 0"),
        ("image_mean", [0.5, 0.5], "image_mean/image_std need 3 finite numbers"),
        ("max_bytes", "1e9", "max_bytes must be a positive integer, got '1e9'"),
        ("pad_input", "yes", "pad_input must be true or false, got 'yes'"),
    ],
)
def test_bad_preprocessor_configs(tmp_path, field, value, message):
    from kimivl.processing.image import ImageProcessor

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ValueError, match=message) as e:
        ImageProcessor.from_pretrained(tmp_path)
    # named: config.json's vision_config has a patch_size and merge_kernel_size too
    assert str(e.value).startswith(f"{tmp_path / 'preprocessor_config.json'} is not a valid preprocessor_config.json: ")


def test_an_empty_question_is_an_error_not_a_session(capsys):
    assert main(["chat", "  "]) == 2
    _one_line_error(capsys, "chat", "the question is empty")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be the number of processes, an integer >= 1"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be the number of processes, an integer >= 1"),
        ({"RANK": ""}, "RANK='' must be this process's rank, an integer from 0 to WORLD_SIZE - 1 (1)"),
        ({"RANK": "2"}, "RANK='2' must be this process's rank, an integer from 0 to WORLD_SIZE - 1 (1)"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' must be this process's rank on its machine, an integer >= 0"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be this process's rank on its machine, an integer >= 0"),
        ({"LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE='3' must be the number of processes on this machine, from 1 to"),
        (
            {"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "1"},
            "LOCAL_RANK='1' must be this process's rank on its machine, an integer from 0 to LOCAL_WORLD_SIZE - 1 (0)",
        ),
        ({"MASTER_PORT": "notaport"}, "MASTER_PORT='notaport' must be the rendezvous port, an integer from 1 to 65535"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT='70000' must be the rendezvous port"),
    ],
)
def test_a_launch_variable_that_is_not_a_number_in_range_is_named(tmp_path, monkeypatch, capsys, variables, message):
    """``WORLD_SIZE=abc`` (or a bad RANK, LOCAL_RANK, MASTER_PORT) said only "invalid literal for int() with base 10:
    'abc'"; a RANK past the world was not checked."""
    stage = {"name": "sft", "kind": "joint", "steps": 2, "lr": 1e-3, "mix": {"ocr": 1}}
    recipe = {"name": "p", "out": str(tmp_path / "run"), "tokenizer": {"train_vocab": 260}}
    recipe["sources"] = {"ocr": str(DEFAULT_EXAMPLES / "ocr.jsonl")}
    (tmp_path / "r.yaml").write_text(json.dumps({**recipe, "stages": [stage]}))
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "29500", **variables}.items():
        monkeypatch.setenv(name, value)
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    _one_line_error(capsys, "train", f"the environment variable {message}", "torchrun sets it")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["", " k"])
def test_an_unusable_api_key_says_where_it_came_from(monkeypatch, capsys, key):
    """A bad KIMIVL_API_KEY was reported as "the API key must be ..." as if --api-key had given it."""
    monkeypatch.setenv("KIMIVL_API_KEY", key)
    assert main(["serve"]) == 2
    _one_line_error(
        capsys, "serve", "the API key must be non-empty", "came from the environment variable KIMIVL_API_KEY"
    )
    assert main(["serve", "--api-key", key]) == 2
    _one_line_error(capsys, "serve", "the API key must be non-empty", "(this one came from --api-key)")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("127.0.0.1", "(Address already in use); another server listens there: choose another --port"),
        ("192.0.2.1", "(Cannot assign requested address); give --host an address of this machine"),
    ],
)
def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(monkeypatch, capsys, host, message):
    """A port in use was found by uvicorn after the model loaded (minutes for the A3B): its own log line, exit 3."""
    import socket

    loaded = []
    monkeypatch.setattr(cli, "_load", lambda *a: loaded.append(a))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--host", host, "--port", str(port)]) == 2
    _one_line_error(capsys, "serve", f"cannot listen on --host/--port {host}:{port} {message}")
    assert not loaded


@pytest.mark.parametrize(
    ("field", "value", "shown", "model"),
    [("merge_kernel_size", [4, 4], "[4, 4]", "[2, 2]"), ("patch_size", 16, "16", "14")],
)
def test_a_preprocessor_config_not_the_models_is_refused_before_loading_weights(
    tmp_path, monkeypatch, capsys, field, value, shown, model
):
    """It loaded, and every image request failed with a placeholder count naming neither file."""
    import shutil

    shutil.copytree(DEFAULT_MODEL, tmp_path / "m")
    pre = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({**pre, field: value}))
    loaded = []
    monkeypatch.setattr(KimiVL, "from_pretrained", lambda *a, **k: loaded.append(a))
    assert main(["chat", "--model", str(tmp_path / "m"), "--device", "cpu", "hi"]) == 2
    _one_line_error(
        capsys,
        "chat",
        f"{tmp_path / 'm' / 'preprocessor_config.json'} gives {field} {shown}",
        f"{tmp_path / 'm' / 'config.json'} has vision_config.{field} {model}",
    )
    assert not loaded


def test_the_default_image_processor_must_fit_the_model_too(tmp_path):
    import shutil

    shutil.copytree(DEFAULT_MODEL, tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").unlink()
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["vision_config"]["patch_size"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"the default image processor \(no preprocessor_config.json in .*\) gives"
    ):
        KimiVLProcessor.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("text", ["1k,abc", "k", "1k,inf"])
def test_niah_lengths_that_are_not_numbers_are_named(capsys, text):
    """argparse named the type function: 'invalid _ints value: '1k,abc''."""
    with pytest.raises(SystemExit):
        main(["eval", "--task", "niah", "--model", str(DEFAULT_MODEL), "--lengths", text])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    bad = text.split(",")[-1]
    assert err == (
        f"kimivl eval: error: argument --lengths: {bad!r} in {text!r} is not a number; give numbers, k for 1024, "
        "comma-separated (e.g. 1k,2k)"
    )


@pytest.mark.parametrize(("flag", "text", "bad"), [("--depths", "0,1.5", "1.5"), ("--lengths", "1k,0.3k", "0.3k")])
def test_niah_numbers_that_are_not_whole_are_named_not_rounded(capsys, flag, text, bad):
    """``--depths 1.5`` ran at depth 1 and ``--lengths 0.3k`` at 307 tokens, each rounded down without a word."""
    with pytest.raises(SystemExit):
        main(["eval", "--task", "niah", "--model", str(DEFAULT_MODEL), flag, text])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"kimivl eval: error: argument {flag}: {bad!r} in {text!r} is not a whole number; give whole numbers"


def test_niah_lengths_in_fractions_of_k_that_are_whole_are_kept():
    assert _ints("1.5k,2k,100") == [1536, 2048, 100]


@pytest.mark.parametrize("command", [["chat", "hi"], ["serve"], ["eval", "--task", "synthetic"]])
def test_a_model_given_as_a_file_is_named_as_such(capsys, command):
    """``--model DIR/config.json`` failed with 'tokenizer directory DIR/config.json has no tiktoken.model'."""
    file = DEFAULT_MODEL / "config.json"
    assert main([*command, "--model", str(file), "--device", "cpu"]) == 2
    _one_line_error(capsys, command[0], f"--model {file} is a file: give the checkpoint directory ({DEFAULT_MODEL})")


@pytest.mark.parametrize("lines", [3, 100_000])  # all in the buffer (flushed at the end), more than a pipe holds
def test_a_reader_that_stops_early_ends_the_command_quietly_with_141(tmp_path, lines):
    """``kimivl info ... | head -1`` printed 'error: [Errno 32] Broken pipe' and exited 2."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "demo.py"
    script.write_text(
        "import sys\n"
        "from kimivl import cli\n"
        f"cli.cmd_demo = lambda args: print('line\\n' * {lines}, end='') or 0\n"
        "sys.exit(cli.main(['demo']))\n"
    )
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    # stdout buffered, as a shell runs it: under PYTHONUNBUFFERED (which a test environment may set) each print met
    # the broken pipe itself and the last flush at the exit was never tried
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    done = subprocess.run([sys.executable, str(script)], stdout=write, stderr=subprocess.PIPE, env=env, text=True)
    os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_reader_gone_from_stderr_ends_the_command_quietly_with_141(tmp_path):
    """``kimivl eval ... 2>&1 >out | grep -m1 x``: once grep had gone, the progress bar's write to stderr raised
    BrokenPipeError, whose error line (to the same stderr) raised again: a traceback into nothing and exit 1. A log
    filter gone from stderr ends the command as a reader gone from stdout does; what it printed is kept."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "demo.py"
    script.write_text(
        "import sys\n"
        "from kimivl import cli\n"
        "cli.cmd_demo = lambda args: print('result') or print('progress', file=sys.stderr) or 0\n"
        "sys.exit(cli.main(['demo']))\n"
    )
    read, write = os.pipe()
    os.close(read)  # the reader has gone
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    with open(tmp_path / "out.txt", "w") as out:
        done = subprocess.run([sys.executable, str(script)], stdout=out, stderr=write, env=env)
    os.close(write)
    assert done.returncode == 141 and (tmp_path / "out.txt").read_text() == "result\n"
    bad = [sys.executable, "-m", "kimivl", "chat", "--model", str(tmp_path / "absent"), "hi"]
    read, write = os.pipe()
    os.close(read)
    done = subprocess.run(bad, stdout=subprocess.DEVNULL, stderr=write, env=env)
    os.close(write)
    assert done.returncode == 2  # a user's error, unsaid: its status kept (a traceback into nothing exited 1)


def test_a_broken_pipe_that_is_not_stdout_is_an_error(monkeypatch, capsys, tmp_path):
    """Only stdout's reader going away ends a command quietly: another pipe or socket breaking is named, exit 2,
    whether stdout is a capture with no file descriptor, a file, or a pipe whose reader is there (polled, both say
    they can be written: no error, so not the quiet exit 141)."""
    import os
    import sys

    monkeypatch.setattr(cli, "cmd_demo", lambda args: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))
    assert main(["demo"]) == 2
    _one_line_error(capsys, "demo", "[Errno 32] Broken pipe")
    read, write = os.pipe()
    with open(tmp_path / "out.txt", "w") as file, open(write, "w") as pipe, open(read):
        for stdout in (file, pipe):
            with monkeypatch.context() as patch:
                patch.setattr(sys, "stdout", stdout)
                assert main(["demo"]) == 2, stdout
            _one_line_error(capsys, "demo", "[Errno 32] Broken pipe")


@pytest.mark.parametrize("command", [["info", "--preset", "tiny"], ["train", "recipes/tiny.yaml", "--plan"]])
def test_a_closed_stdout_is_refused_where_the_result_is_printed(command):
    """``kimivl info >&-`` printed its table into nothing and exited 0 (then, once stdout was flushed at the end, an
    AttributeError traceback)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from kimivl.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *command], cwd=root, env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    message = "error: stdout is closed, so the result would be lost: redirect it to a file (or /dev/null)"
    assert done.stderr.strip().endswith(f"kimivl {command[0]}: {message}")


@pytest.mark.parametrize(
    "command",
    [["chat", "--model", "m", "hi"], ["demo"], ["info"], ["eval", "--task", "mmmu", "--model", "m"]],
)
def test_every_command_whose_result_is_printed_refuses_a_closed_stdout_before_it_runs(command, monkeypatch, capsys):
    """chat, demo, info and eval print their result: with stdout closed each is refused before its work (eval's
    scores would be computed for an hour, then lost)."""
    import sys

    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(cli, f"cmd_{command[0]}", lambda args: pytest.fail("ran with stdout closed"))
    assert main(command) == 2
    assert f"kimivl {command[0]}: error: stdout is closed" in capsys.readouterr().err


def test_a_closed_stdout_is_refused_only_where_the_result_is_printed(monkeypatch, capsys):
    import sys

    from kimivl.exits import run_command

    monkeypatch.setattr(sys, "stdout", None)  # ``>&-``: Python's sys.stdout is None
    assert run_command("x", lambda: 0, prints=False) == 0  # kimivl train logs to stderr and writes files
    assert run_command("x", lambda: 0) == 2 and "x: error: stdout is closed" in capsys.readouterr().err


def test_a_commands_status_is_its_own_none_counting_as_zero():
    from kimivl.exits import run_command

    assert [run_command("x", lambda code=code: code) for code in (None, 0, 1, 3)] == [0, 0, 1, 3]


def test_a_full_pipe_whose_reader_is_there_and_no_stream_are_no_reader_gone():
    """A slow reader (``| less`` not scrolled) has left the pipe full: the poll answers at once, no error."""
    import os
    import threading

    from kimivl.exits import reader_gone

    read, write = os.pipe()
    os.set_blocking(write, False)
    with open(write, "wb", buffering=0) as pipe, open(read):
        while pipe.write(b"x" * 4096):  # None once the pipe is full
            pass
        answers = []
        poll = threading.Thread(target=lambda: answers.append(reader_gone(pipe)), daemon=True)
        poll.start()
        poll.join(10)
        assert answers == [False]
    closed = open(os.devnull, "w")
    closed.close()
    assert reader_gone(None) is False and reader_gone(closed) is False  # ``>&-`` (sys.stdout is None), a closed file


def test_an_error_quoting_a_data_file_prints_its_escapes_not_its_control_characters(tmp_path, capsys):
    """``kimivl demo --examples DIR`` whose media path held terminal escapes printed them raw in the looked-for path of
    its error (the path quoted with repr was escaped): a data file could clear the screen and retitle the terminal."""
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "media/\x1b[2J\x1b]0;t\x07x\r.png"}]},
            {"role": "assistant", "content": "35"},
        ],
        "meta": {"task": "reasoning", "gold": 35},
    }
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "reasoning.jsonl").write_text(json.dumps(record) + "\n")
    assert main(["demo", "--examples", str(tmp_path / "ex")]) == 2
    err = _one_line_error(capsys, "demo", f"(looked for {tmp_path}/ex/media/\\x1b[2J\\x1b]0;t\\x07x\\r.png)")
    assert err.count("x1b[2J\\x1b]0;t\\x07x\\r.png") == 2 and not any(c in err for c in "\x1b\x07\r"), err


def test_eval_data_and_predictions_of_several_tasks_are_refused_before_loading(tmp_path, monkeypatch, capsys):
    """With several tasks a bare ``--data FILE`` names no task (it went to the first one), and ``--predictions``
    re-scores one task: both are one line, before any model loads."""
    import kimivl

    monkeypatch.setattr(kimivl.KimiVL, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    data = tmp_path / "tasks.jsonl"
    data.write_text("{}\n")
    tasks = ["--task", "synthetic,niah", "--model", str(DEFAULT_MODEL)]
    assert main(["eval", *tasks, "--data", str(data)]) == 2
    _one_line_error(capsys, "eval", f"--data {data}: with several tasks, write --data TASK=FILE, TASK one of")
    assert main(["eval", "--task", "synthetic,niah", "--predictions", str(data)]) == 2
    _one_line_error(capsys, "eval", "--predictions re-scores one task at a time")


@pytest.mark.parametrize("context", ["0", "-1", "4097"])
def test_info_context_outside_the_models_is_one_line(context, capsys):
    assert main(["info", "--preset", "tiny", "--context", context]) == 2
    _one_line_error(capsys, "info", f"--context must be 1..4096 tokens (the model's context), got {context}")
