"""Structured logging for the daemon: structlog for our events, stdlib (uvicorn) routed through the same renderer.

Two rules for a confidential node:
* logging never blocks the event loop: a call only enqueues the record; one background thread formats and
  writes it (a full queue drops records and counts them rather than wait);
* a traceback shows where an error happened (files, lines, functions, exception types), never local variables
  nor exception messages, which may quote a prompt, a request body or generated text.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import traceback

import structlog
from structlog.typing import EventDict, WrappedLogger

_QUEUE_SIZE = 10_000
_listener: logging.handlers.QueueListener | None = None


def safe_traceback(exc_info: object) -> str:
    """Frames and exception types of an exception chain; no locals, no messages."""
    if exc_info is True:
        exc_info = sys.exc_info()
    exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    if not isinstance(exc, BaseException):
        return ""
    parts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)
        parts.append("".join(traceback.format_list(frames)) + f"{type(exc).__module__}.{type(exc).__qualname__} "
                     "(message withheld: it may quote request data)")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\nwhich was raised while handling or from:\n".join(reversed(parts))


def _capture_exc_info(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """On the caller's thread: resolve `exc_info=True` to the exception itself (formatted later, elsewhere)."""
    if event_dict.get("exc_info") is True:
        event_dict["exc_info"] = sys.exc_info()
    return event_dict


def _render_exception(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        text = safe_traceback(exc_info)
        if text:
            event_dict["exception"] = text
    event_dict.pop("stack_info", None)
    return event_dict


class _EnqueueOnly(logging.handlers.QueueHandler):
    """Hands the record over as is (the stdlib's QueueHandler formats it on the caller's thread) and never
    waits for room."""

    dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            _EnqueueOnly.dropped += 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a test runner may swap it and close the old one)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """One call at start: JSON lines (`fmt="json"`, for collectors) or human-readable console output."""
    global _listener
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                   exception_formatter=structlog.dev.plain_traceback))
    structlog.configure(
        # filter_by_level first: a debug event below the level costs one check, not the whole chain.
        processors=[structlog.stdlib.filter_by_level, *shared, _capture_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _render_exception, renderer],
    ))
    if _listener is not None:
        _listener.stop()
    records: queue.Queue[logging.LogRecord] = queue.Queue(_QUEUE_SIZE)
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_EnqueueOnly(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def flush_logging() -> None:
    """Write out what is queued (at exit, and for tests that read the log)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(flush_logging)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
