"""Server-sent events: the one reader and the one writer of the protocol, for the node and the client.

The writer frames events exactly as vLLM does (`data: <payload>\\n\\n`, a stream ending with `data: [DONE]`),
so the bytes a node sends are the bytes an OpenAI client expects. The reader follows the WHATWG event-stream
rules (lines end in CRLF, LF or CR; `:` opens a comment; one space after the colon is dropped; data lines join
with LF; an event is dispatched at a blank line, and only if it carries data) and is fed bytes as they arrive,
cut anywhere. It is hostile-input safe: a line or an event larger than its bound raises `SseError` instead of
growing without end, and an event cut off by the end of the stream is never dispatched.

What a receipt's responseHash covers is the `data` of the unnamed events, as this reader returns it
(`client.wire.receipts`): the writer and the reader must agree on those bytes, and they do by construction.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from dcml.client.wire.errors import DcmlError

DONE = b"[DONE]"  # the last data payload of an OpenAI stream
MESSAGE = "message"  # the name of an event without an `event:` field
MAX_LINE = 4 << 20  # bytes in one line: far above any chunk an engine sends, far below what hurts
MAX_EVENT = 4 << 20  # bytes of data in one event

_EOL = re.compile(rb"\r\n?|\n")


class SseError(DcmlError, ValueError):
    """The stream breaks a bound (a line or an event too large) or the writer was given unframeable input."""

    reason = "malformed_stream"


class Event(NamedTuple):
    data: bytes  # the data lines joined with LF
    name: str = MESSAGE  # the `event:` field; unnamed events are "message"

    @property
    def unnamed(self) -> bool:
        return self.name == MESSAGE


class SseReader:
    """Incremental parser: `feed` raw bytes in any cut, get the events they complete."""

    def __init__(self, *, max_line: int = MAX_LINE, max_event: int = MAX_EVENT) -> None:
        self.max_line, self.max_event = max_line, max_event
        self._line = bytearray()
        self._cr = False  # the last chunk ended with CR: an LF opening the next one ends no second line
        self._data: list[bytes] = []
        self._size = 0
        self._name = MESSAGE

    def feed(self, chunk: bytes) -> list[Event]:
        out: list[Event] = []
        if not chunk:
            return out
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        lines = _EOL.split(chunk)
        rest = lines.pop()  # the start of a line not yet ended
        if lines:
            if self._line:
                lines[0] = bytes(self._line) + lines[0]
                self._line.clear()
            for line in lines:
                if len(line) > self.max_line:
                    raise SseError(f"an event-stream line exceeds {self.max_line} bytes")
                self._field(line, out)
            self._cr = chunk.endswith(b"\r")
        self._line += rest
        if len(self._line) > self.max_line:
            raise SseError(f"an event-stream line exceeds {self.max_line} bytes")
        return out

    def close(self) -> None:
        """The stream ended: an event not yet terminated by a blank line is discarded (it may be cut short)."""
        self._line.clear()
        self._data, self._size, self._name, self._cr = [], 0, MESSAGE, False

    def _field(self, line: bytes, out: list[Event]) -> None:
        if not line:  # blank line: dispatch
            if self._data:
                out.append(Event(b"\n".join(self._data), self._name))
            self._data, self._size, self._name = [], 0, MESSAGE
            return
        if line.startswith(b"data: "):  # the usual line, first
            name, value = b"data", line[6:]
        elif line[:1] == b":":
            return  # a comment (keep-alive)
        else:
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._size += len(value) + 1
            if self._size > self.max_event:
                raise SseError(f"an event's data exceeds {self.max_event} bytes")
            self._data.append(value)
        elif name == b"event":
            self._name = value.decode("utf-8", errors="replace") or MESSAGE
        # id and retry mean nothing to this protocol; unknown fields are ignored, as the standard says


def parse(raw: bytes, *, max_line: int = MAX_LINE, max_event: int = MAX_EVENT) -> list[Event]:
    """Every complete event of a whole stream body."""
    reader = SseReader(max_line=max_line, max_event=max_event)
    events = reader.feed(raw)
    reader.close()
    return events


def format_event(data: bytes, name: str | None = None) -> bytes:
    """One event: `event: <name>` (unless unnamed), then a `data: ` line per line of `data`, then a blank line."""
    if b"\r" in data:
        raise SseError("event data must not contain CR: a reader would split the line there")
    head = b""
    if name is not None and name != MESSAGE:
        if "\n" in name or "\r" in name:
            raise SseError("an event name must be one line")
        head = b"event: " + name.encode() + b"\n"
    if b"\n" not in data:  # the usual case: one JSON payload
        return head + b"data: " + data + b"\n\n"
    return head + b"".join(b"data: " + line + b"\n" for line in data.split(b"\n")) + b"\n"


def data_event(payload: bytes) -> bytes:
    """An unnamed event: the node's hot path (one per streamed chunk), so the usual one-line payload is framed
    directly."""
    if b"\n" in payload or b"\r" in payload:
        return format_event(payload)
    return b"data: " + payload + b"\n\n"


def named_event(name: str, payload: bytes) -> bytes:
    return format_event(payload, name)


DONE_EVENT = data_event(DONE)
