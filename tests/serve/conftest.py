"""A live uvicorn server on loopback (a free port, a background thread) over the shipped trained models."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from kimivl import KimiVL, KimiVLProcessor
from kimivl.serve.app import create_app
from kimivl.serve.engine import Engine

MODELS = Path(__file__).resolve().parents[2] / "models"


@contextlib.contextmanager
def live_server(
    model_dir: str,
    *,
    max_batch: int = 8,
    max_queue: int = 64,
    start: bool = True,
    server_options: dict | None = None,
    **app_kwargs,
):
    """Yield (base_url, engine) of a server on 127.0.0.1; with ``start=False`` the engine's worker is not started
    (requests stay queued) until the test calls ``engine.start()``. ``server_options``: more ``uvicorn.Config``
    arguments (as ``kimivl serve`` passes them)."""
    model = KimiVL.from_pretrained(MODELS / model_dir, dtype=torch.float32, device="cpu")
    processor = KimiVLProcessor.from_pretrained(MODELS / model_dir)
    engine = Engine(model, processor, max_batch=max_batch, max_queue=max_queue)
    app = create_app(engine, model_dir, start_engine=start, **app_kwargs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **(server_options or {}))
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()


@pytest.fixture(scope="module")
def tiny():
    with live_server("kimivl-tiny", api_key="secret-key") as served:
        yield served
