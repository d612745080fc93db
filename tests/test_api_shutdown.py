"""Graceful shutdown: in-flight streams finish (receipt included), the engine stops, then the port closes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dcml.client.wire.receipts import parse_sse_stream
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.config import load_settings
from dcml.node.engine.base import GenerationRequest, TokenChunk
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.receipts.store import ReceiptStore
from dcml.node.tee.simulated import SimulatedProvider

ROOT = Path(__file__).resolve().parent.parent
MODEL = "synthetic"


class SlowEngine(SyntheticEngine):
    """10 ms per token, and remembers being stopped."""

    stopped = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in super().stream(request):
            await asyncio.sleep(0.01)
            yield chunk

    async def stop(self) -> None:
        self.stopped = True


def stream_in_thread(url: str, result: dict, started: threading.Event) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 60, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        data = b""
        for part in r.iter_bytes():
            data += part
            started.set()
        result["body"] = data


def test_in_flight_stream_completes_during_shutdown(tmp_path):
    engine = SlowEngine(model_name=MODEL)
    settings = load_settings(None, data_dir=tmp_path)
    app = create_app(settings, engine=engine, identity=EnclaveIdentity.generate(), provider=SimulatedProvider())
    srv = BackgroundServer(app, graceful_shutdown_s=20).start()
    result: dict = {}
    started = threading.Event()
    client = threading.Thread(target=stream_in_thread, args=(srv.url, result, started))
    client.start()
    assert started.wait(10)
    t0 = time.monotonic()
    srv.stop()  # what SIGTERM does: stop accepting, drain, lifespan shutdown
    client.join(10)
    assert time.monotonic() - t0 > 0.2  # it waited for the stream rather than cutting it
    payloads, receipt = parse_sse_stream(result["body"])
    assert payloads[-1] == b"[DONE]" and receipt is not None and receipt.receipt.output_tokens == 60
    assert engine.stopped
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")

    async def stored():
        store = ReceiptStore(tmp_path / "receipts.sqlite")
        store.open()
        try:
            return await store.get(receipt.receipt.receipt_id)
        finally:
            await store.close()

    assert asyncio.run(stored()) == receipt


def test_client_disconnect_frees_the_engine_slot(tmp_path):
    engine = SlowEngine(model_name=MODEL)
    app = create_app(load_settings(None, data_dir=tmp_path), engine=engine, identity=EnclaveIdentity.generate(),
                     provider=SimulatedProvider())
    with BackgroundServer(app) as srv:
        body = {"model": MODEL, "prompt": "long", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
            chunks = r.iter_bytes()  # keep a reference: a discarded iterator closes the connection early
            for _ in range(5):
                next(chunks)
            assert engine._inflight == 1
        deadline = time.monotonic() + 5  # 500 tokens would take 5 s; the abort must come much sooner
        while engine._inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine._inflight == 0 and time.monotonic() < deadline - 3
        assert httpx.get(srv.url + "/health").status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_daemon_runs_and_stops_on_sigterm(tmp_path):
    port = free_port()
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[server]\nport = {port}\n[logging]\nformat = "json"\n'
                   '[engine]\nkind = "synthetic"\nserved_model_name = "synthetic"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DCML_NODE__LIMITS__MAX_TOKENS_CAP": "99"}
    proc = subprocess.Popen([sys.executable, "-m", "dcml.node.cli", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100})
        assert r.status_code == 400 and r.json()["error"]["code"] == "max_tokens_too_large"  # env override
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn re-raises the captured SIGTERM after its clean shutdown, so "killed by SIGTERM" is the clean exit.
    assert proc.returncode in (0, -signal.SIGTERM), err.decode()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    names = [e.get("event") for e in events]
    assert "node_started" in names and names.index("node_stopped") > names.index("node_started")
    assert any("SIMULATED TEE" in e.get("event", "") and e["level"] == "warning" for e in events)
