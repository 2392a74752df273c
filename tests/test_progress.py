"""Progress bars in logs: rare refreshes where stderr is no terminal, log records on lines of their own."""

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kimivl.progress import progress_bar
from kimivl.rl.passk import count_correct
from tests.test_cli_errors import _ocr_recipe


def test_a_bar_that_no_terminal_shows_refreshes_rarely(capsys):
    """Into a file, a bar wrote a '\\r' refresh ten times a second (7,200 for recipes/tiny.yaml's training)."""

    def generate(records, samples, seed):
        time.sleep(0.02)
        return ["0"] * (len(records) * samples)

    problems = [{"meta": {}}] * 60
    counts = count_correct(generate, problems, 1, reward_fn=lambda text, meta: 1.0, chunk=1, progress=True)
    assert counts == [1] * 60  # in 1.2 s
    err = capsys.readouterr().err
    assert "60/60" in err and err.count("\r") <= 2, err.count("\r")  # opened and closed, nothing between


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_keeps_tqdms_refreshes_and_one_elsewhere_waits_30_s_for_either(monkeypatch):
    """A terminal's bar refreshes as tqdm's does (an update 0.1 s after the last refresh shows); elsewhere neither an
    update nor tqdm's monitor thread (which refreshes a bar not refreshed for 10 s) refreshes it sooner than 30 s
    after the last refresh."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    for stream, intervals in ((_Terminal(), (0.1, 10.0)), (io.StringIO(), (30.0, 30.0))):
        bar = progress_bar(total=3, file=stream)
        assert (bar.mininterval, bar.maxinterval) == intervals, stream
        bar.close()
        monkeypatch.setattr(sys, "stderr", stream)  # tqdm's own stream, when none is given
        bar = progress_bar(total=3)
        assert (bar.mininterval, bar.maxinterval) == intervals, stream
        bar.close()
    bar = progress_bar(total=3, file=io.StringIO(), mininterval=1.0)  # a caller's interval wins
    assert (bar.mininterval, bar.maxinterval) == (1.0, 30.0)
    bar.close()
    # and so does the environment's (which tqdm reads once, as it is imported)
    code = "import io; from kimivl.progress import progress_bar; b = progress_bar(total=3, file=io.StringIO()); "
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "TQDM_MININTERVAL": "5"}
    done = subprocess.run(
        [sys.executable, "-c", code + "print(b.mininterval, b.maxinterval)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.stdout == "5.0 10.0\n", done.stderr


def test_train_logs_each_record_on_a_line_of_its_own_not_glued_to_a_bar(tmp_path):
    """'...tok_s=43]2026-12-07 03:10:07,081 kimivl.train.state: checkpoint ... written' in a log file."""
    _ocr_recipe(tmp_path, steps=3)
    script = tmp_path / "train.py"
    script.write_text(
        "import logging, sys\n"
        "from tqdm.auto import tqdm\n"
        "from kimivl import cli\n"
        "import kimivl.train.pipeline\n"
        "def run(recipe, world):\n"
        "    bar = tqdm(total=3, desc='sft')\n"
        "    bar.update()\n"
        "    logging.getLogger('kimivl.train.state').info('checkpoint written')\n"
        "    bar.update(2)\n"
        "    bar.close()\n"
        "kimivl.train.pipeline.run_recipe = run\n"
        "sys.exit(cli.main(['train', sys.argv[1]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "r.yaml")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    record = r"\d{4}-\d\d-\d\d [\d:,]+ kimivl\.train\.state: checkpoint written"
    assert re.search(record, done.stderr) and re.search(rf"(^|[\r\n]){record}\n", done.stderr), done.stderr


def test_a_training_loops_bar_keeps_its_interval_and_is_closed_when_it_fails(small_model, small_processor, capsys):
    """``set_postfix`` refreshed the bar at every step, past its 30 s interval (19 redraws for 12 steps in a log);
    a loop that raised left its bar open, so the next bar in a notebook kernel was drawn one line down, garbled."""
    import tqdm

    from kimivl.train.loop import LoopConfig, train_loop
    from tests.train.test_loop import joint_loss, setup

    calls = []

    def failing_at_step_7(model, batch):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("a failure of one's own")
        return joint_loss(model, batch)

    model, data, opt, sched = setup(small_model, small_processor)
    before = len(tqdm.tqdm._instances)
    with pytest.raises(RuntimeError, match="of one's own"), tempfile.TemporaryDirectory() as run:
        train_loop(model, failing_at_step_7, data, opt, sched, LoopConfig(steps=8, ckpt_every=100), run, "s")
    err = capsys.readouterr().err
    assert "s:" in err and "6/8" in err and err.count("\r") <= 2, err  # opened and closed, nothing between
    assert len(tqdm.tqdm._instances) == before


def test_a_command_called_from_python_shows_its_log_and_leaves_logging_as_it_was():
    """``main(['train', ...])`` in a notebook left the root logger at INFO with kimivl's handler: the user's own
    records printed in kimivl's format and their later ``basicConfig`` did nothing. The CPU is made one without bf16
    instructions, so that the plan logs its warning on any machine (on one with them it logged nothing)."""
    script = (
        "import logging, sys\n"
        "import kimivl.precision as precision\n"
        "precision.cpu_native_bf16, precision.cpu_flags_known = lambda: False, lambda: True\n"
        "from kimivl.cli import main\n"
        "root = logging.getLogger()\n"
        "before = (root.level, list(root.handlers))\n"
        "assert main(['train', 'recipes/tiny.yaml', '--plan']) == 0\n"
        "assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)\n"
        "logging.getLogger('mine').info('not shown')\n"
    )
    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d\d:\d\d:\d\d,\d+ kimivl\.\w+", done.stderr) and "not shown" not in done.stderr, done.stderr


def test_a_command_called_where_logging_is_configured_keeps_that_configuration():
    """A notebook's root logger at WARNING with its own handler: kimivl's INFO records stay hidden there."""
    from kimivl.cli import _console_log

    root, seen = logging.getLogger(), []
    handler, level = logging.Handler(), root.level
    handler.emit = lambda record: seen.append(record.getMessage())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    try:
        with _console_log(logging.INFO, "%(message)s"):
            logging.getLogger("kimivl.x").info("hidden")
            logging.getLogger("kimivl.x").warning("shown")
        assert root.level == logging.WARNING and handler in root.handlers
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert seen == ["shown"]
