"""The server's end: ``kimivl serve`` in a child process stops within ``--shutdown-timeout`` of SIGTERM whatever its
clients do, and a request body has a total deadline as well as an idle one."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from conftest import MODELS, live_server

ROOT = MODELS.parent
ENDLESS = (  # kimivl serve whose answers never meet a stop token: they are all running when it is told to stop
    "import sys, kimivl.serve.engine as e; from kimivl.cli import main; init = e.Engine.__init__; "
    "e.Engine.__init__ = lambda self, *a, **k: (init(self, *a, **k), self._stop_ids.clear())[1]; "
    "sys.exit(main(sys.argv[1:]))"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open(port: int, body: dict | bytes, length: int | None = None, rcvbuf: int | None = None) -> socket.socket:
    """A connection that has sent a POST's head and ``body`` (JSON of a dict, or raw bytes of ``length``)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {length or len(data)}\r\n\r\n".encode() + data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_sigterm_cancels_what_is_left_after_the_shutdown_timeout_and_the_process_exits(tmp_path):
    """SIGTERM waited for good on a client sending its body a byte a second (a second SIGTERM did not force it) and on
    a stream nobody read; a forced end answered plain requests 'Internal Server Error' with a traceback each. Now the
    open requests are cancelled after --shutdown-timeout: those not yet answered get a JSON 503, the log has no
    traceback, and the process exits."""
    port, log = _free_port(), tmp_path / "serve.log"
    command = [sys.executable, "-c", ENDLESS, "serve", "--model", str(MODELS / "kimivl-tiny"), "--device", "cpu"]
    command += ["--dtype", "float32", "--port", str(port), "--max-batch", "4", "--shutdown-timeout", "2"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.2)
        long = {"model": "kimivl-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3000}
        plain = _open(port, long)
        unread = _open(port, {**long, "stream": True, "n": 2}, rcvbuf=4096)  # never read
        slow = _open(port, b"{", length=1000)
        dripping = threading.Event()

        def drip():  # a byte a second: never idle long enough for the body's idle timeout
            while not dripping.wait(1):
                try:
                    slow.send(b" ")
                except OSError:
                    return

        threading.Thread(target=drip, daemon=True).start()
        deadline = time.monotonic() + 30
        while b"kimivl_batch_size 3" not in (
            metrics := urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert int(re.search(rb"kimivl_cache_bytes (\d+)", metrics)[1]) > 0  # three rows decoding hold their cache
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
        assert time.monotonic() - start < 15
        dripping.set()
        for sock in (plain, slow):
            head, _, body = _read_all(sock).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head, head
            assert json.loads(body)["error"]["message"] == "the server is shutting down; retry later"
        streamed = _read_all(unread)  # what the server had sent when it cut the stream
        assert streamed.startswith(b"HTTP/1.1 200") and b"[DONE]" not in streamed
    finally:
        server.kill()
        server.wait()
    text = log.read_text()
    assert "Traceback" not in text and "POST /v1/chat/completions: cancelled, the server is shutting down" in text
    assert "timeout graceful shutdown exceeded" in text


def test_a_body_that_keeps_trickling_in_is_refused_at_the_total_deadline(monkeypatch):
    """A client sending a byte every 0.5 s never hit the idle timeout, so its request was read for as long as it
    liked (and held the server open on shutdown)."""
    import kimivl.serve.app as app_module

    monkeypatch.setattr(app_module, "BODY_IDLE_SECONDS", 1)
    monkeypatch.setattr(app_module, "BODY_TOTAL_SECONDS", 2)
    with live_server("kimivl-tiny") as (url, _):
        sock = _open(int(url.rsplit(":", 1)[1]), b"{", length=1000)
        start, reply = time.monotonic(), b""
        with sock:
            while not reply and time.monotonic() - start < 10:
                sock.send(b" ")
                time.sleep(0.5)
                sock.setblocking(False)
                try:
                    reply = sock.recv(65536)
                except BlockingIOError:
                    pass
                sock.setblocking(True)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b"the request body took over 2 s to arrive" in reply and time.monotonic() - start < 4
