"""A stand-in dstack guest agent: HTTP on a Unix socket, the endpoints dstack-sdk 0.5.4 calls.

GetQuote answers with the REAL dstack vector quote and event log (so its report_data is 64×0x01, not
the caller's); GetKey derives deterministic keys from path/purpose; Info returns the vector's app info.
"""

from __future__ import annotations

import hashlib
import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "dstack"


class _Handler(BaseHTTPRequestHandler):
    server: _AgentServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        method = self.path.lstrip("/")
        self.server.calls.append((method, body))
        handler = getattr(self.server.agent, f"rpc_{method}", None)
        if handler is None:
            self._reply(404, {"error": f"unknown method {method}"})
            return
        self._reply(200, handler(body))

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # Unix sockets have no client address
        pass


class _AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, agent: FakeDstackAgent) -> None:
        self.agent = agent
        self.calls: list[tuple[str, dict[str, Any]]] = []
        super().__init__(path, _Handler)


class FakeDstackAgent:
    def __init__(self, socket_path: str | Path) -> None:
        self.socket_path = str(socket_path)
        vector = json.loads((VECTORS / "quote_with_event_log.json").read_text())
        self.quote_hex: str = vector["quote"]
        self.event_log_json: str = vector["event_log"]
        self.app_info: dict[str, Any] = json.loads((VECTORS / "app_info.json").read_text())
        self._server = _AgentServer(self.socket_path, self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def calls(self) -> list[tuple[str, dict[str, Any]]]:
        return self._server.calls

    def __enter__(self) -> FakeDstackAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def rpc_GetQuote(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"quote": self.quote_hex, "event_log": self.event_log_json, "report_data": body["report_data"]}

    def rpc_GetKey(self, body: dict[str, Any]) -> dict[str, Any]:
        key = hashlib.sha256(f"fake-kms|{body['path']}|{body['purpose']}".encode()).hexdigest()
        return {"key": key, "signature_chain": []}

    def rpc_Info(self, body: dict[str, Any]) -> dict[str, Any]:
        info = dict(self.app_info)
        info["tcb_info"] = json.dumps(info["tcb_info"])  # the real agent sends tcb_info as a JSON string
        return info
