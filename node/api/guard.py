"""Fair under slow and junk clients: deadlines and connection caps at the HTTP protocol layer, below the app.

uvicorn has a keep-alive timeout and a server-wide `limit_concurrency` (503), but no deadline for a request's
headers or body and no per-source cap, so a few bytes per connection could hold sockets and file descriptors
forever. `GuardedHttpTools` is uvicorn's httptools protocol with:

* a header deadline, from the connection (or the first byte of the next keep-alive request) to the end of the
  headers, and a body deadline, from the end of the headers to the end of the body: past either the connection
  is closed (the app sees an ordinary client disconnect);
* request line and headers bounded to `max_header_bytes` (httptools itself buffers them without limit): 431;
* at most `max_connections_per_source` open connections per source address; more are closed on arrival.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dcml.client.wire.errors import ErrorType, error_body
from dcml.node.config import ServerConfig


class GuardedHttpTools(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits: ServerConfig = getattr(self.config, "dcml_server", None) or ServerConfig()
        self.header_timeout_s, self.body_timeout_s = limits.header_timeout_s, limits.body_timeout_s
        self.max_per_source = limits.max_connections_per_source
        # Per-source counts live on the server's shared state: one table per server, not per process.
        if not hasattr(self.server_state, "dcml_sources"):
            self.server_state.dcml_sources = {}  # type: ignore[attr-defined]
        self._sources: dict[str, int] = self.server_state.dcml_sources  # type: ignore[attr-defined]
        self.max_header_bytes = limits.max_header_bytes
        self._deadline: asyncio.TimerHandle | None = None
        self._source: str | None = None
        self._in_headers = True  # reading a request line and headers (httptools buffers them, unbounded)
        self._header_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        source = self.client[0] if self.client else "?"
        if self._sources.get(source, 0) >= self.max_per_source:
            transport.close()  # refused before a byte is read; counted nowhere
            return
        self._source = source
        self._sources[source] = self._sources.get(source, 0) + 1
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._source is not None:
            left = self._sources.get(self._source, 1) - 1
            if left > 0:
                self._sources[self._source] = left
            else:
                self._sources.pop(self._source, None)
            self._source = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse(431, b"Request Header Fields Too Large")

    def _refuse(self, status: int, reason: bytes) -> None:
        body = error_body("request headers are too large", ErrorType.INVALID_REQUEST, code="headers_too_large")
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._header_bytes = True, 0
        if self._deadline is None:  # the next request on a kept-alive connection
            self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_headers, self._header_bytes = True, 0  # until the next request's headers are read
        super().on_message_complete()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
