"""Paths and loaders for the shared attestation vectors (../shared/vectors from the repository root), for
the attestation tests and bench_gpu_evidence."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from dcml.client.chain.devnet import REPO

VECTORS = REPO.parent / "shared" / "vectors"  # beside the checkout, not shipped
TDX = VECTORS / "tdx"
DSTACK = VECTORS / "dstack"

DSTACK_COMPOSE_HASH = "62dd36d22b7d704aaa4d598226801ed4e6a3bfd17dde762b2efd9876768be800"


def ts(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def tdx_quote(name: str) -> bytes:
    return (TDX / name).read_bytes()


def collateral(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def dstack_vector() -> tuple[bytes, list[dict[str, Any]], dict[str, Any]]:
    """(quote, event log, app_info) of the real dstack CVM attestation."""
    data = json.loads((DSTACK / "quote_with_event_log.json").read_text())
    app_info = json.loads((DSTACK / "app_info.json").read_text())
    return bytes.fromhex(data["quote"]), json.loads(data["event_log"]), app_info
