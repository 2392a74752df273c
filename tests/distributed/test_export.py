"""A sharded run's export: rank 0 writes it while the others wait, and a refusal ends every rank alike."""

import json

import yaml

from tests.distributed.test_same_run import recipe
from tests.distributed.test_sharded_training import run

FOREIGN_EXPORT_MEANWHILE = """
import json, sys
import kimivl.train.pipeline as pipeline
from kimivl.cli import main

export = pipeline._export

def meanwhile(recipe, final, processor, path):  # another run's export lands while this one trains
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "kimivl-run.json").write_text(json.dumps({"out": "../other-run"}))
    return export(recipe, final, processor, path)

pipeline._export = meanwhile
sys.exit(main(sys.argv[1:]))
"""


def test_an_export_refused_on_rank_0_stops_every_rank_with_its_reason(tmp_path):
    """Rank 0 refused the export in one line, and rank 1, waiting in a barrier, died with a gloo traceback
    ("Connection closed by peer") that torchrun named as the job's root cause."""
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump({**recipe(tmp_path, 1e-3), "export": {"path": str(tmp_path / "exported")}})
    )
    lines = [" ".join(f"w{(i * 31 + j) % 997}" for j in range(8)) for i in range(300)]  # text for 280 tokens
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    (tmp_path / "launch.py").write_text(FOREIGN_EXPORT_MEANWHILE)
    done = run([str(tmp_path / "launch.py"), "train", str(tmp_path / "r.yaml")], 2)
    assert done.returncode != 0
    said = "kimivl train: error: export path"
    assert done.stderr.count(said) == 2, done.stderr[-3000:]  # each rank, with rank 0's reason
    assert "holds a model written by the run in" in done.stderr and "resume with: " in done.stderr
    assert "Connection closed" not in done.stderr and "[rank1]:" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "run" / "s" / "final" / "config.json").is_file()  # the trained model is kept
    assert (tmp_path / "exported" / "kimivl-run.json").read_text() == '{"out": "../other-run"}'
