"""Proof of Response on the node: sign a receipt for every answer and keep it durably (SQLite, WAL).

Receipts are committed (fsync'd) before the response's last byte leaves, so a receipt a client was
promised can always be fetched again at `GET /v1/receipts/{id}`, even after a crash. Commits from
concurrent requests are grouped into one transaction on one writer thread.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from client.receipts import ZERO32, Receipt, ReceiptDomain, SignedReceipt, hex32, sign_receipt


def new_receipt_id() -> str:
    """Random 32 bytes chosen by the node: never derived from anything the client controls."""
    return hex32(os.urandom(32))


@dataclass(frozen=True)
class Metering:
    """What the HTTP layer measured about one answer."""

    request_hash: str
    response_hash: str
    input_tokens: int
    output_tokens: int
    accepted_at: float  # unix seconds
    ttft_s: float
    duration_s: float
    channel_id: str = ZERO32
    cost: int = 0
    cumulative_spent: int = 0


def _ms(seconds: float) -> int:
    return min(max(round(seconds * 1000), 0), 2**32 - 1)


@dataclass(frozen=True)
class ReceiptSigner:
    account: LocalAccount
    domain: ReceiptDomain
    model_id: str

    def sign(self, receipt_id: str, m: Metering) -> SignedReceipt:
        receipt = Receipt(
            receiptId=receipt_id, requestHash=m.request_hash, responseHash=m.response_hash,
            channelId=m.channel_id, modelId=self.model_id, inputTokens=m.input_tokens,
            outputTokens=m.output_tokens, cost=m.cost, cumulativeSpent=m.cumulative_spent,
            acceptedAt=int(m.accepted_at), ttftMs=_ms(m.ttft_s), durationMs=_ms(m.duration_s),
        )
        return sign_receipt(receipt, self.account, self.domain)


class ReceiptStore:
    """Durable map receipt id -> signed receipt JSON. Use `open()`/`close()` around the app's life."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, int, str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread owns the connection: SQLite objects must not be shared across threads concurrently.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receipt-store")
        self._executor.submit(self._open).result()

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we report it done
        conn.execute("CREATE TABLE IF NOT EXISTS receipts (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, "
                     "body TEXT NOT NULL)")
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def put(self, signed: SignedReceipt) -> None:
        """Return once the receipt is committed to disk."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((signed.receipt.receipt_id, int(time.time()),
                              signed.model_dump_json(by_alias=True), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._executor, self._write, [row[:3] for row in batch])
            except Exception as exc:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    def _write(self, rows: list[tuple[str, int, str]]) -> None:
        assert self._conn is not None, "ReceiptStore.open() was not called"
        self._conn.execute("BEGIN")  # one transaction (one fsync) per batch
        try:
            self._conn.executemany("INSERT INTO receipts (id, created_at, body) VALUES (?, ?, ?)", rows)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    async def get(self, receipt_id: str) -> SignedReceipt | None:
        body = await asyncio.get_running_loop().run_in_executor(self._executor, self._read, receipt_id.lower())
        return None if body is None else SignedReceipt.model_validate_json(body)

    def _read(self, receipt_id: str) -> str | None:
        assert self._conn is not None, "ReceiptStore.open() was not called"
        row = self._conn.execute("SELECT body FROM receipts WHERE id = ?", (receipt_id,)).fetchone()
        return None if row is None else row[0]
