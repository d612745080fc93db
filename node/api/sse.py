"""Server-sent events framing, exactly as vLLM writes it: `data: <payload>\n\n`, ending with `data: [DONE]`."""

from __future__ import annotations

DONE = b"[DONE]"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def data_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def named_event(event: str, payload: bytes) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"
