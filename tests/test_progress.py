"""Progress bars in logs: rare refreshes where stderr is no terminal, log records on lines of their own."""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

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
