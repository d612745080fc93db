"""Running the app on uvicorn: the daemon's foreground server and a background one for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from dcml.node.api.guard import GuardedHttpTools
from dcml.node.config import ServerConfig


class GuardedConfig(uvicorn.Config):
    """uvicorn's config plus the `[server]` limits that GuardedHttpTools enforces."""

    dcml_server: ServerConfig


def uvicorn_config(app: FastAPI, *, host: str, port: int, graceful_shutdown_s: float,
                   limits: ServerConfig | None = None) -> uvicorn.Config:
    """`limits`: deadlines and caps against slow and junk clients (node.api.guard); default: the app's
    `[server]` settings when it is a node app, else the defaults."""
    if limits is None:
        node = getattr(getattr(app, "state", None), "node", None)  # a plain ASGI wrapper has no state
        limits = node.settings.server if node is not None else ServerConfig()
    # log_config=None: logging is ours (node.logging); access logs off: the metrics count requests.
    # uvicorn annotates both timeouts as int, but takes (and waits) fractional seconds.
    config = GuardedConfig(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                           timeout_graceful_shutdown=graceful_shutdown_s,  # type: ignore[arg-type]
                           http=GuardedHttpTools, timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
                           limit_concurrency=limits.max_concurrency)
    config.dcml_server = limits  # read by GuardedHttpTools
    return config


class BackgroundServer:
    """A real uvicorn server on a loopback port, in its own thread and event loop.

    `stop()` behaves like SIGTERM: stop accepting, let in-flight responses finish, run lifespan shutdown.
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", graceful_shutdown_s: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=self.port,
                                                    graceful_shutdown_s=graceful_shutdown_s))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start; see the log above")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
