"""Proof of Response on the node: sign a receipt for every answer and keep it durably (SQLite, WAL).

Receipts are committed (fsync'd) before the response's last byte leaves, so a receipt a client was
promised can always be fetched again (`GET /v1/receipts/{id}`, or by request hash), even after a crash,
and posted to the SLA court against a no-response dispute. The signed acceptances of paid requests are
kept the same way, before they leave. Commits from concurrent requests are grouped into one transaction
on one writer thread.
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

from dcml.client.wire.receipts import (
    ZERO32,
    Receipt,
    ReceiptDomain,
    SignedAcceptance,
    SignedReceipt,
    hex32,
    sign_receipt,
)

_INSERT_RECEIPT = "INSERT INTO receipts (id, created_at, body) VALUES (?, ?, ?)"
_INSERT_ACCEPTANCE = ("INSERT INTO acceptances (request_hash, channel_id, deadline, body, created_at) "
                      "VALUES (?, ?, ?, ?, ?)")
# The lookup by request hash uses this exact expression, so SQLite uses the index (no schema migration needed).
_RECEIPT_REQUEST = "json_extract(body, '$.receipt.requestHash')"
_RECEIPT_CHANNEL = "json_extract(body, '$.receipt.channelId')"


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
    """Durable signed receipts (by id and by request hash) and acceptances (by request hash).
    Use `open()`/`close()` around the app's life."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, tuple, asyncio.Future[None]]] = []  # (insert statement, row, done)
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
        # IF NOT EXISTS throughout: a store written by an older node gains the new table and index here.
        conn.execute("CREATE TABLE IF NOT EXISTS receipts (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, "
                     "body TEXT NOT NULL)")
        conn.execute(f"CREATE INDEX IF NOT EXISTS receipts_by_request ON receipts ({_RECEIPT_REQUEST})")
        conn.execute("CREATE TABLE IF NOT EXISTS acceptances (request_hash TEXT NOT NULL, channel_id TEXT NOT NULL, "
                     "deadline INTEGER NOT NULL, body TEXT NOT NULL, created_at INTEGER NOT NULL)")
        conn.execute("CREATE INDEX IF NOT EXISTS acceptances_by_request ON acceptances (request_hash)")
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

    # -- writes (group-committed) ------------------------------------------------------------------

    async def put(self, signed: SignedReceipt) -> None:
        """Return once the receipt is committed to disk."""
        await self._commit(_INSERT_RECEIPT, (signed.receipt.receipt_id, int(time.time()),
                                             signed.model_dump_json(by_alias=True)))

    async def put_acceptance(self, signed: SignedAcceptance) -> None:
        """Return once the signed acceptance is committed to disk (before it may leave the node)."""
        a = signed.acceptance
        await self._commit(_INSERT_ACCEPTANCE, (a.request_hash, a.channel_id, a.deadline,
                                                signed.model_dump_json(by_alias=True), int(time.time())))

    async def _commit(self, statement: str, row: tuple) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((statement, row, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await loop.run_in_executor(self._executor, self._write, [(sql, row) for sql, row, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    if not batch[0][2].done():
                        batch[0][2].set_exception(exc)
                    continue
                # One bad row (say a duplicate id) must not fail its neighbours: write them one by one.
                for sql, row, fut in batch:
                    try:
                        await loop.run_in_executor(self._executor, self._write, [(sql, row)])
                    except Exception as one:
                        if not fut.done():
                            fut.set_exception(one)
                    else:
                        if not fut.done():
                            fut.set_result(None)
            else:
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_result(None)

    def _write(self, rows: list[tuple[str, tuple]]) -> None:
        assert self._conn is not None, "ReceiptStore.open() was not called"
        by_statement: dict[str, list[tuple]] = {}
        for sql, row in rows:
            by_statement.setdefault(sql, []).append(row)
        self._conn.execute("BEGIN")  # one transaction (one fsync) per batch, receipts and acceptances alike
        try:
            for sql, group in by_statement.items():
                self._conn.executemany(sql, group)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- reads -------------------------------------------------------------------------------------

    async def get(self, receipt_id: str) -> SignedReceipt | None:
        body = await self._run(self._read, receipt_id.lower())
        return None if body is None else SignedReceipt.model_validate_json(body)

    async def get_by_request(self, request_hash: str) -> SignedReceipt | None:
        """The newest receipt for the request whose body hashes to `request_hash` (0x hex), or None."""
        body = await self._run(self._read_by_request, request_hash.lower())
        return None if body is None else SignedReceipt.model_validate_json(body)

    async def get_acceptance(self, request_hash: str) -> SignedAcceptance | None:
        """The newest acceptance signed for `request_hash`, or None."""
        body = await self._run(self._read_acceptance, request_hash.lower())
        return None if body is None else SignedAcceptance.model_validate_json(body)

    def lookup_request(self, request_hash: str, channel_id: str | None = None) -> SignedReceipt | None:
        """`get_by_request` for other threads (the SLA watcher): runs on the store's thread and waits. With
        `channel_id`, only a receipt charged to that channel (the same body may have been sent on two)."""
        if self._executor is None:
            raise RuntimeError("the receipt store is closed")
        body = self._executor.submit(self._read_by_request, request_hash.lower(),
                                     channel_id.lower() if channel_id else None).result()
        return None if body is None else SignedReceipt.model_validate_json(body)

    async def _run(self, fn, *args):
        if self._executor is None:
            raise RuntimeError("the receipt store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _one(self, sql: str, *args: str) -> str | None:
        assert self._conn is not None, "ReceiptStore.open() was not called"
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def _read(self, receipt_id: str) -> str | None:
        return self._one("SELECT body FROM receipts WHERE id = ?", receipt_id)

    def _read_by_request(self, request_hash: str, channel_id: str | None = None) -> str | None:
        if channel_id is None:
            return self._one(f"SELECT body FROM receipts WHERE {_RECEIPT_REQUEST} = ? ORDER BY rowid DESC LIMIT 1",
                             request_hash)
        return self._one(f"SELECT body FROM receipts WHERE {_RECEIPT_REQUEST} = ? AND {_RECEIPT_CHANNEL} = ? "
                         "ORDER BY rowid DESC LIMIT 1", request_hash, channel_id)

    def _read_acceptance(self, request_hash: str) -> str | None:
        return self._one("SELECT body FROM acceptances WHERE request_hash = ? ORDER BY rowid DESC LIMIT 1",
                         request_hash)
