"""The one SSE reader/writer (`client.wire.sse`): any cut of the bytes reads the same, bounds hold, the writer
produces exactly what the node has always sent (receipts hash those payloads)."""

from __future__ import annotations

import pytest

from dcml.client.wire import sse
from dcml.client.wire.sse import Event, SseError, SseReader

STREAM = (b'data: {"a":1}\n\n'
          b": keep-alive\n\n"
          b"event: payment-need-voucher\r\ndata: {\"x\":2}\r\n\r\n"
          b"data:no-space\rdata:  two spaces\r\r"
          b"id: 7\nretry: 10\nunknown\ndata\ndata: last line\n\n"
          b"event: dcml-receipt\ndata: {\"r\":3}\n\n"
          b"event:\ndata: [DONE]\n\n")
EVENTS = [Event(b'{"a":1}'), Event(b'{"x":2}', "payment-need-voucher"), Event(b"no-space\n two spaces"),
          Event(b"\nlast line"), Event(b'{"r":3}', "dcml-receipt"), Event(b"[DONE]")]


def _fed(chunks: list[bytes]) -> list[Event]:
    reader = SseReader()
    out = [e for c in chunks for e in reader.feed(c)]
    reader.close()
    return out


def test_whole_stream_reads_comments_crlf_cr_and_multiline_data() -> None:
    assert sse.parse(STREAM) == EVENTS
    assert [e.unnamed for e in EVENTS] == [True, False, True, True, False, True]


def test_every_cut_reads_the_same() -> None:
    """Cut at every byte into two pieces (CRLF split included), and one byte at a time."""
    for k in range(len(STREAM) + 1):
        assert _fed([STREAM[:k], b"", STREAM[k:]]) == EVENTS, k
    assert _fed([STREAM[i:i + 1] for i in range(len(STREAM))]) == EVENTS


def test_an_event_cut_by_the_end_of_the_stream_is_not_dispatched() -> None:
    for end in (b'data: {"b"', b'data: {"b":1}', b'data: {"b":1}\n'):
        assert sse.parse(b'data: {"a":1}\n\n' + end) == [Event(b'{"a":1}')]


def test_oversized_line_and_event_raise_without_buffering_everything() -> None:
    reader = SseReader(max_line=64, max_event=100)
    reader.feed(b"data: " + b"x" * 58)  # 64 bytes: at the bound
    with pytest.raises(SseError, match="line"):
        reader.feed(b"y")
    with pytest.raises(SseError, match="line"):  # no line end at all, fed in small pieces
        r = SseReader(max_line=64)
        for _ in range(100):
            r.feed(b"a" * 8)
    reader = SseReader(max_line=64, max_event=100)
    with pytest.raises(SseError, match="event"):  # many short data lines, never a blank line
        reader.feed(b"data: 0123456789\n" * 20)


def test_writer_bytes_are_the_nodes_and_round_trip() -> None:
    assert sse.data_event(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert sse.named_event("dcml-receipt", b"{}") == b"event: dcml-receipt\ndata: {}\n\n"
    assert sse.DONE_EVENT == b"data: [DONE]\n\n"
    assert sse.format_event(b"a\nb") == b"data: a\ndata: b\n\n"
    for data, name in ((b"a\n\nb", "message"), (b"", "x"), (b'{"k":"v"}', "payment-timeout")):
        assert sse.parse(sse.format_event(data, name)) == [Event(data, name)]
    with pytest.raises(SseError):
        sse.format_event(b"a\rb")
    with pytest.raises(SseError):
        sse.format_event(b"a", "x\ndata: injected")
