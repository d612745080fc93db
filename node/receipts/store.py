"""The node's durable receipts and acceptances (SQLite, WAL), written through the node's one group commit.

Receipts are committed (fsync'd) before the response's last byte leaves, so a receipt a client was
promised can always be fetched again (`GET /v1/receipts/{id}`, or by request hash), even after a crash,
and posted to the SLA court against a no-response dispute. The signed acceptances of paid requests are
kept the same way, before they leave. Commits from concurrent requests are grouped into one transaction
(`node.storage`) on the store's one thread, which also serves its reads.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from dcml.client.wire.receipts import SignedAcceptance, SignedReceipt
from dcml.node.storage.group_commit import GroupCommitWriter

_INSERT_RECEIPT = "INSERT INTO receipts (id, created_at, body) VALUES (?, ?, ?)"
_INSERT_ACCEPTANCE = ("INSERT INTO acceptances (request_hash, channel_id, deadline, body, created_at) "
                      "VALUES (?, ?, ?, ?, ?)")
# The lookup by request hash uses this exact expression, so SQLite uses the index (no schema migration needed).
_RECEIPT_REQUEST = "json_extract(body, '$.receipt.requestHash')"
_RECEIPT_CHANNEL = "json_extract(body, '$.receipt.channelId')"


class ReceiptStore:
    """Durable signed receipts (by id and by request hash) and acceptances (by request hash).
    Use `open()`/`close()` around the app's life."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._writer: GroupCommitWriter[tuple[str, tuple], None] | None = None  # (insert statement, row)

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One thread owns the connection (the writer's): SQLite objects must not be shared across threads.
        self._writer = GroupCommitWriter(self._write, name="receipt-store")
        self._writer.call(self._open)

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
        if self._writer is None:
            return
        writer = self._writer
        await writer.drain()
        await writer.run(self._close)
        writer.close()
        self._writer = None

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
        await self._live().submit((statement, row))

    def _write(self, rows: list[tuple[str, tuple]]) -> list[Exception | None]:
        """One transaction (one fsync) per batch, receipts and acceptances alike. One bad row (say a duplicate
        id) must not fail its neighbours: the batch is then written row by row."""
        try:
            self._write_all(rows)
            return [None] * len(rows)
        except Exception as exc:
            if len(rows) == 1:
                return [exc]
        results: list[Exception | None] = []
        for row in rows:
            try:
                self._write_all([row])
                results.append(None)
            except Exception as one:
                results.append(one)
        return results

    def _write_all(self, rows: list[tuple[str, tuple]]) -> None:
        assert self._conn is not None, "ReceiptStore.open() was not called"
        by_statement: dict[str, list[tuple]] = {}
        for sql, row in rows:
            by_statement.setdefault(sql, []).append(row)
        self._conn.execute("BEGIN")
        try:
            for sql, group in by_statement.items():
                self._conn.executemany(sql, group)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _live(self) -> GroupCommitWriter[tuple[str, tuple], None]:
        if self._writer is None:
            raise RuntimeError("the receipt store is closed")
        return self._writer

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
        channel = channel_id.lower() if channel_id else None
        body = self._live().call(self._read_by_request, request_hash.lower(), channel)
        return None if body is None else SignedReceipt.model_validate_json(body)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await self._live().run(fn, *args)

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
