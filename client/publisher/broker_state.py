"""The key broker's state and refusals: the audit log and revocations (SQLite), single-use nonces bound to the
model and the node, and per-client rate limits. `client.publisher.key_broker` serves them over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

from dcml.client.wire.errors import DcmlError
from dcml.client.wire.identity import NONCE_LEN


class BrokerReason(StrEnum):
    UNKNOWN_MODEL = "unknown_model"
    BAD_REQUEST = "bad_request"
    NONCE_UNKNOWN = "nonce_unknown"  # never issued, expired, or already used
    ATTESTATION = "attestation"
    SIMULATED_REFUSED = "simulated_refused"
    MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
    REVOKED = "revoked"
    UNREGISTERED = "unregistered"
    RATE_LIMITED = "rate_limited"


_STATUS = {BrokerReason.UNKNOWN_MODEL: 404, BrokerReason.BAD_REQUEST: 400, BrokerReason.RATE_LIMITED: 429}


class BrokerRefusal(DcmlError):
    """The broker will not release the key; `reason` is machine-readable, the message says what to do."""

    reason_in_str = True
    reason: BrokerReason

    def __init__(self, reason: BrokerReason, message: str, detail: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.detail = detail  # e.g. the attestation verifier's own reason

    @property
    def status(self) -> int:
        return _STATUS.get(self.reason, 403)


class AuditLog:
    """Every key request and its outcome, plus the publisher's revocations. Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.executescript("""
                PRAGMA journal_mode=WAL;
                CREATE TABLE IF NOT EXISTS releases (
                    id INTEGER PRIMARY KEY, at REAL NOT NULL, model_id TEXT NOT NULL, node TEXT,
                    client TEXT, outcome TEXT NOT NULL, reason TEXT, measurement TEXT, kid TEXT,
                    quote_sha256 TEXT);
                CREATE TABLE IF NOT EXISTS revocations (
                    kind TEXT NOT NULL, value TEXT NOT NULL, model_id TEXT NOT NULL, at REAL NOT NULL,
                    note TEXT, PRIMARY KEY (kind, value, model_id));
            """)

    def record(self, *, model_id: str, outcome: str, client: str | None, node: str | None = None,
               reason: str | None = None, measurement: str | None = None, kid: str | None = None,
               quote_sha256: str | None = None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO releases (at, model_id, node, client, outcome, reason, measurement, kid, quote_sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), model_id, node, client, outcome, reason, measurement, kid, quote_sha256))

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM releases ORDER BY id")
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def revoke(self, kind: str, value: str, *, model_id: str = "*", note: str = "") -> None:
        """kind "node": a signing address; "measurement": a measurement id or a raw MRTD/RTMR (hex)."""
        if kind not in ("node", "measurement"):
            raise ValueError("revoke a 'node' (its signing address) or a 'measurement' (hex)")
        value = value.lower().removeprefix("0x")
        bytes.fromhex(value)  # a typo must not silently revoke nothing
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO revocations VALUES (?, ?, ?, ?, ?)",
                             (kind, value, model_id.lower(), time.time(), note))

    def revoked(self, kind: str, values: set[str], model_id: str) -> str | None:
        if not values:
            return None
        marks = ",".join("?" * len(values))
        with self._lock:
            row = self._db.execute(
                f"SELECT value FROM revocations WHERE kind = ? AND model_id IN ('*', ?) AND value IN ({marks})",
                (kind, model_id.lower(), *values)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NonceStore:
    """Nonces bound to the model and to the requesting node, valid for `ttl_s`, used once; issuing keeps no state.

    nonce = expiry_ms u64 ‖ random(8) ‖ HMAC-SHA256(secret, label ‖ model_id ‖ node address ‖ expiry ‖ random)[:16].
    A stranger can fetch as many nonces as the rate limiter lets it, for any node address: they fill no pool
    (the v1 store held every outstanding nonce, so 10,000 of them from many addresses starved real nodes), and
    a nonce only verifies for the node it was asked for. Single use: a nonce whose attestation verified is
    remembered until it expires (only real enclaves get there; still bounded by `max_outstanding`)."""

    _LABEL = b"dcml-broker-nonce-v1"

    def __init__(self, ttl_s: float = 60.0, max_outstanding: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_outstanding, self._clock = ttl_s, max_outstanding, clock
        self._secret = os.urandom(32)
        self._used: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def _mac(self, model_id: bytes, node: bytes, head: bytes) -> bytes:
        return hmac.new(self._secret, self._LABEL + model_id + node + head, hashlib.sha256).digest()[:16]

    def issue(self, model_id: bytes, node: bytes) -> bytes:
        head = int(1000 * (self._clock() + self.ttl_s)).to_bytes(8, "big") + os.urandom(8)
        return head + self._mac(model_id, node, head)

    def check(self, model_id: bytes, node: bytes, nonce: bytes) -> None:
        """Cheap, before the attestation is verified: issued here, for this model and node, not expired."""
        if len(nonce) != NONCE_LEN or not hmac.compare_digest(nonce[16:], self._mac(model_id, node, nonce[:16])):
            raise BrokerRefusal(BrokerReason.NONCE_UNKNOWN, "nonce was not issued here for this model and node: "
                                "fetch one from /nonce?node=<your signing address> and attest again")
        if int.from_bytes(nonce[:8], "big") / 1000 <= self._clock():
            raise BrokerRefusal(BrokerReason.NONCE_UNKNOWN,
                                f"nonce expired (valid {self.ttl_s:.0f} s): fetch a fresh one and attest again")

    def consume(self, model_id: bytes, node: bytes, nonce: bytes) -> None:
        """After the attestation over `nonce` verified: mark it used (a second use is a replay)."""
        self.check(model_id, node, nonce)
        now = self._clock()
        with self._lock:
            if nonce in self._used:
                raise BrokerRefusal(BrokerReason.NONCE_UNKNOWN,
                                    "nonce already used: fetch a fresh one from /nonce and attest again")
            if len(self._used) >= self.max_outstanding:
                self._used = {n: exp for n, exp in self._used.items() if exp > now}
                if len(self._used) >= self.max_outstanding:
                    raise BrokerRefusal(BrokerReason.RATE_LIMITED, "too many keys released lately; retry shortly")
            self._used[nonce] = int.from_bytes(nonce[:8], "big") / 1000


class RateLimiter:
    """Token bucket per client: `burst` requests at once, refilled at `per_minute`."""

    def __init__(self, per_minute: float = 30, burst: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = per_minute / 60.0, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                wait = (1 - tokens) / self.rate if self.rate > 0 else 60.0
                raise BrokerRefusal(BrokerReason.RATE_LIMITED, f"too many requests; retry in {wait:.0f} s")
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 100_000:  # forget idle clients (they are back at full burst anyway)
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 600}
