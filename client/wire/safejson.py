"""JSON from strangers: bounded in size before it is parsed, and parsed by jiter (pydantic-core's Rust parser),
whose nesting limit (`MAX_DEPTH`) turns deep input into a clean `ValueError` instead of a C-stack overflow.

The standard library's `json` recurses once per nesting level; with Python's default recursion limit that is a
`RecursionError`, but `py_ecc` (imported through eth-account) raises the limit to 100,000, after which a
100k-deep array overflows the C stack and kills the process. So every payload from the network goes through
`loads` here, and `restore_recursion_limit` puts the limit back to what Python ships with.
"""

from __future__ import annotations

import sys
from typing import Any

import pydantic_core

from dcml.client.wire.errors import DcmlError

MAX_DEPTH = 200  # jiter's built-in nesting limit (pydantic-core); deeper input is refused, never recursed into
PYTHON_RECURSION_LIMIT = 1000  # CPython's default


class JSONRejected(DcmlError, ValueError):
    """Not JSON, too large or too deeply nested; the message says which (and never quotes the payload)."""

    reason = "malformed_json"


def loads(data: bytes | bytearray | str, *, max_bytes: int) -> Any:
    if len(data) > max_bytes:
        raise JSONRejected(f"JSON payload is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return pydantic_core.from_json(data)
    except ValueError as exc:  # jiter's message has a position, not the content
        raise JSONRejected(f"not valid JSON (or nested deeper than {MAX_DEPTH}): {exc}") from None


def restore_recursion_limit() -> None:
    """Undo dependencies raising the recursion limit at import (py_ecc sets 100,000): deep recursion must fail
    as a RecursionError, not overflow the C stack."""
    import py_ecc  # noqa: F401  # imported first so that its import-time raise happens before ours, not after

    sys.setrecursionlimit(PYTHON_RECURSION_LIMIT)
