"""Server-sent events as the node writes them: the framing is the wire's (`client.wire.sse`), shared with the
clients that read it."""

from __future__ import annotations

from dcml.client.wire.sse import DONE, data_event, named_event

__all__ = ["DONE", "SSE_HEADERS", "data_event", "named_event"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
