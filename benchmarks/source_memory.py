"""Memory of a training data source: every record parsed into a list (how the pipeline held sources before) against
``JsonlRecords`` (byte offsets only), on a generated JSONL of conversations, each an image and four messages (two
questions, two answers), in a temporary folder removed at the end.

    python benchmarks/source_memory.py [--records 200000]
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

from arguments import at_least, parser
from PIL import Image
from rss import PeakRise, status_kib

from kimivl.data.formats import iter_records, write_records
from kimivl.data.indexed import JsonlRecords
from kimivl.exits import run_command


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    words = "the a red blue circle square left right above below how many which colour count shape".split()
    for i in range(n):
        ask = " ".join(rng.choices(words, k=rng.randint(8, 30)))
        yield {
            "id": i,
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": ask}]},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(5, 60)))},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(5, 60)))},
            ],
            "meta": {"task": "caption", "difficulty": rng.choice(["easy", "medium", "hard"])},
        }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--records", type=at_least(1), default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        Image.new("RGB", (28, 28)).save(Path(root) / "img.png")
        path = Path(root) / "data.jsonl"
        write_records(path, conversations(args.records))
        print(f"{args.records} conversations, {path.stat().st_size / 2**20:.0f} MiB of JSONL")
        measure(path)


def measure(path: Path) -> None:
    """Load ``path`` both ways; print the memory each holds, its load time and a random read's."""

    results = {}
    # the index first: memory the list frees stays with the allocator and would hide the index's own
    for name, load in (("indexed", lambda: JsonlRecords(path, False)), ("list", lambda: list(iter_records(path)))):
        before = status_kib("VmRSS")
        start = time.perf_counter()
        with PeakRise() as rise:
            records = load()
        seconds = time.perf_counter() - start
        held = (status_kib("VmRSS") - before) / 1024
        rng = random.Random(1)
        picks = [rng.randrange(len(records)) for _ in range(2000)]
        start = time.perf_counter()
        for i in picks:
            records[i]
        per_read = (time.perf_counter() - start) / len(picks) * 1e6
        results[name] = held
        print(
            f"{name:8s} load {seconds:5.1f} s, held {held:7.1f} MiB (peak rise {rise.bytes / 2**20:.1f} MiB"
            f"{'' if rise.exact else ', lower bound'}), random read {per_read:.1f} us"
        )
        del records
    print(f"indexed holds {results['indexed'] / max(results['list'], 1e-9):.4f} of the list's memory")


if __name__ == "__main__":
    sys.exit(run_command("source_memory.py", main))
