"""Load on ``kimivl serve``: the same streamed requests (held-out questions with images, greedy) sent by 1, 8 and 32
concurrent clients to a server on loopback; requests/s, output tokens/s, time to first token and inter-token latency
(p50, p99), against one client (the requests served one at a time) in the same run. Bounded: ``--requests`` per
level, and no new request starts after ``--time-limit`` seconds of a level.

    python benchmarks/serve_load.py [--model models/kimivl-tiny] [--requests 256] [--max-tokens 64] [--tasks ...]
                                    [--dtype float32]

The server is ``python -m kimivl.cli serve`` in a child process on 127.0.0.1 (``--max-batch 32``), so the clients
(threads here) do not share its interpreter. It runs in ``kimivl serve``'s default dtype (the checkpoint's: bf16 for
kimivl-tiny, float32 on a CPU that multiplies bf16 slowly) unless ``--dtype`` names one; the dtype is printed.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from arguments import parser
from children import exit_on_sigterm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kimivl, as the server's PYTHONPATH

from kimivl.exits import run_command  # noqa: E402

HELDOUT = REPO / "examples" / "heldout"
TASKS = ("caption", "ocr", "gui", "chart", "reasoning", "video")


def _url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode((HELDOUT / path).read_bytes()).decode()


def questions(count: int, tasks: tuple[str, ...] = TASKS) -> list[list[dict]]:
    """``count`` held-out questions, the tasks taken in turn, as OpenAI messages with data: URL images and videos."""
    per_task = {t: (HELDOUT / f"{t}.jsonl").read_text(encoding="utf-8").splitlines() for t in tasks}
    out = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        lines = per_task[task]
        parts = []
        for p in json.loads(lines[(i // len(tasks)) % len(lines)])["messages"][0]["content"]:
            if p["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": _url(p["image"])}})
            elif p["type"] == "video":
                parts.append({"type": "video", "video": [_url(f) for f in p["frames"]], "timestamps": p["timestamps"]})
            else:
                parts.append(p)
        out.append([{"role": "user", "content": parts}])
    return out


def ask(port: int, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: its answer, output tokens, time to first token and the gaps between later tokens."""
    body = json.dumps(
        {
            "model": model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    times, text, tokens = [], [], 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            piece = choice["delta"].get("content") or choice["delta"].get("reasoning_content")
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
    conn.close()
    end = time.perf_counter()
    ttft = (times[0] if times else end) - start
    return {"text": "".join(text), "tokens": tokens, "ttft": ttft, "gaps": [b - a for a, b in zip(times, times[1:])]}


def level(port: int, model: str, prompts: list, clients: int, max_tokens: int, time_limit: float) -> dict:
    """Serve ``prompts`` with ``clients`` threads, each taking the next prompt when its last answer is in."""
    results: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []
    lock, next_index = threading.Lock(), [0]
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                i = next_index[0]
                if i >= len(prompts) or time.perf_counter() - start > time_limit:
                    return
                next_index[0] += 1
            try:
                results[i] = ask(port, model, prompts[i], max_tokens)
            except Exception as e:  # counted and reported, the level goes on
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]  # none outlives a SIGTERM
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = [r for r in results if r is not None]
    ttft = sorted(r["ttft"] for r in done)
    gaps = sorted(g for r in done for g in r["gaps"])

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "clients": clients,
        "requests": len(done),
        "errors": errors,
        "wall": wall,
        "rps": len(done) / wall,
        "tps": sum(r["tokens"] for r in done) / wall,
        "tokens": statistics.mean(r["tokens"] for r in done) if done else 0.0,
        "ttft": (pct(ttft, 0.5), pct(ttft, 0.99)),
        "itl": (pct(gaps, 0.5), pct(gaps, 0.99)),
        "texts": [r["text"] if r else None for r in results],
    }


def table(rows: list[dict]) -> list[str]:
    """The levels' rows (``level``'s results), each against the first: the baseline, named in the header."""
    base = rows[0]
    baseline = f"{base['clients']} client{'s' if base['clients'] > 1 else ''}"
    lines = [
        f"| clients | requests | req/s | output tok/s | vs {baseline} | TTFT p50 / p99 s | ITL p50 / p99 ms "
        "| same answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = sum(a == b for a, b in zip(r["texts"], base["texts"]) if a is not None)
        lines.append(
            f"| {r['clients']} | {r['requests']} ({len(r['errors'])} failed) | {r['rps']:.2f} | {r['tps']:.1f} | "
            f"{r['tps'] / base['tps']:.2f}x | {r['ttft'][0]:.2f} / {r['ttft'][1]:.2f} | "
            f"{r['itl'][0] * 1000:.0f} / {r['itl'][1] * 1000:.0f} | {same}/{r['requests']} |"
        )
    return lines


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", default=str(REPO / "models" / "kimivl-tiny"))
    ap.add_argument("--requests", type=int, default=256, help="requests per level (default 256: 8 per client at 32)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,8,32", help="concurrency levels; the first is the baseline")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level before no new request starts")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: kimivl serve's (the checkpoint's)")
    ap.add_argument("--tasks", default=",".join(TASKS), help="held-out tasks whose questions are sent, in turn")
    args = ap.parse_args()
    try:
        levels = [int(c) for c in args.clients.split(",")]
    except ValueError:
        ap.error(f"--clients {args.clients!r}: give whole numbers separated by commas, e.g. 1,8,32")
    unknown = [t for t in args.tasks.split(",") if not (HELDOUT / f"{t}.jsonl").is_file()]
    if unknown:
        ap.error(f"--tasks: no held-out questions for {unknown} in {HELDOUT}")
    if args.requests < 1 or args.max_tokens < 1 or min(levels) < 1:
        ap.error("--requests, --max-tokens and every --clients level must be >= 1")
    args.model = str(Path(args.model).resolve())  # the server runs in REPO
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: no checkpoint there (no config.json); give a kimivl checkpoint directory")
    from kimivl import KimiVLConfig

    context = KimiVLConfig.from_pretrained(args.model).text_config.max_position_embeddings
    if args.max_tokens >= context:  # the server refuses a prompt and answer over the context
        ap.error(f"--max-tokens {args.max_tokens}: the model's context is {context} tokens, prompt included")

    if args.dtype is None:  # what `kimivl serve` picks without --dtype; passed on, so that the printed one is used
        from kimivl.precision import checkpoint_load_dtype

        args.dtype = str(checkpoint_load_dtype(args.model, "cpu")).removeprefix("torch.")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = "bench"
    exit_on_sigterm()  # SIGTERM to this process alone stops the server too (the finally below)
    log = tempfile.TemporaryFile()  # the server's stderr, shown if it does not start
    server = subprocess.Popen(
        [sys.executable, "-m", "kimivl.cli", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", args.dtype, "--device", "cpu", "--max-batch", str(max(levels)), "--max-queue", "1024",
         "--served-model-name", name],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace").splitlines()[-20:]
                raise SystemExit("the server did not start; the end of its log:\n" + "\n".join(tail))
            time.sleep(0.2)
        prompts = questions(args.requests, tuple(args.tasks.split(",")))
        ask(port, name, prompts[0], 4)  # warm-up
        rows = [level(port, name, prompts, c, args.max_tokens, args.time_limit) for c in levels]
    finally:
        server.terminate()
        server.wait(timeout=30)

    for r in rows:  # first, so that they show whatever follows
        for e in r["errors"][:3]:
            print(f"  {r['clients']} clients: {e}")
    for r in rows:
        if not r["requests"]:
            raise SystemExit(f"with {r['clients']} clients no request completed ({len(r['errors'])} failed, above)")
    print(f"server dtype {args.dtype}; load average at the end: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print("\n".join(table(rows)))
    print(f"mean output tokens per request: {rows[0]['tokens']:.1f} (max_tokens {args.max_tokens})")


if __name__ == "__main__":
    sys.exit(run_command("serve_load.py", main))
