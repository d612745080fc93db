"""The node's durable record of what each channel has paid: accepted, spent and settled.

SQLite in WAL mode with `synchronous=FULL`: a voucher is committed to disk before the node
acknowledges it, so a crash never loses money a client was told was received. Amounts are uint128
(wei), beyond SQLite's 64-bit integers, so they are stored as decimal text and compared in Python
inside one write transaction (the lock below serialises writers; SQLite's own lock guards processes).
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dcml.client.wire.errors import PaymentError
from dcml.node.storage.group_commit import GroupCommitWriter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id   TEXT PRIMARY KEY,          -- 0x-hex, lower case
    accepted     TEXT NOT NULL DEFAULT '0', -- highest valid voucher (cumulative wei)
    signature    TEXT,                      -- its signature: what settlement submits
    spent        TEXT NOT NULL DEFAULT '0', -- cost of what was served (persisted before serving)
    settled      TEXT NOT NULL DEFAULT '0', -- confirmed on-chain
    finalized    INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL,
    released     TEXT,                      -- a lower voucher the payer signed after its receipt: settle only
    released_sig TEXT                       -- this much while nothing more is served (NULL: settle accepted)
);
CREATE TABLE IF NOT EXISTS vouchers (       -- append-only audit trail of every accepted voucher
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id   TEXT NOT NULL,
    cumulative   TEXT NOT NULL,
    signature    TEXT NOT NULL,
    received_at  REAL NOT NULL,
    UNIQUE (channel_id, cumulative)
);
"""

_SELECT = ("SELECT channel_id, accepted, signature, spent, settled, finalized, released, released_sig "
           "FROM channels")


class LedgerConflict(PaymentError):
    """A write would break the ledger's monotonic rules (a replayed or out-of-order voucher)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


@dataclass(frozen=True)
class ChannelBalance:
    channel_id: str
    accepted: int
    signature: str | None
    spent: int
    settled: int
    finalized: bool
    released: int | None = None  # see `settle_target`
    released_signature: str | None = None

    @property
    def unsettled(self) -> int:
        return self.settle_target[0] - self.settled

    @property
    def settle_target(self) -> tuple[int, str | None]:
        """The voucher to settle: the payer's release (a voucher re-signed down to its receipts' total after an
        answer that did not use all it reserved, e.g. a non-streamed max_tokens) while it still covers what was
        served, else the highest voucher. So with prepay 0 what is settled equals the receipts."""
        if self.released is not None and self.released >= self.spent:
            return self.released, self.released_signature
        return self.accepted, self.signature

    @property
    def available(self) -> int:
        """Paid for but not yet served."""
        return self.accepted - self.spent


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # durable at commit: we acknowledge after it
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(channels)")}
        for column in ("released", "released_sig"):  # ledgers written before releases existed
            if column not in columns:
                self._db.execute(f"ALTER TABLE channels ADD COLUMN {column} TEXT")
        self._balances: dict[str, ChannelBalance] = {row[0]: _balance(row) for row in self._db.execute(_SELECT)}
        # Reads use their own connection: in WAL mode they see the last commit without waiting for the
        # writer, whose lock is held across the fsync (a read must never stall the event loop on it).
        # A pool of them, one per concurrent reader: a read never waits on a lock that another thread holds while
        # it waits for the GIL (the event loop's reads would queue behind the verifier threads'). deque's append
        # and pop are atomic; the pool holds as many connections as there were reads at once.
        self._readers: collections.deque[sqlite3.Connection] = collections.deque()
        self._all_readers: list[sqlite3.Connection] = []

    def close(self) -> None:
        with self._lock:
            self._db.close()
            for reader in self._all_readers:
                reader.close()
            self._all_readers.clear()

    # -- reads ---------------------------------------------------------------------------------

    # Reads see committed data only. `get` and `accepted` (the admission's and the verifier's, on the event loop)
    # read the in-memory mirror of the channels table, written after each commit under the write lock: no SQLite
    # read and no thread on the paid path. The mirror is this process's view; every op re-reads the row inside its
    # own transaction, so a write another process made (none does in the node) is still checked against.

    def get(self, channel_id: str) -> ChannelBalance | None:
        return self._balances.get(channel_id.lower())

    def accepted(self, channel_id: str) -> int:
        balance = self._balances.get(channel_id.lower())
        return balance.accepted if balance is not None else 0

    def open_channels(self, *, changed_since: float | None = None) -> list[ChannelBalance]:
        """Every channel not yet finalized: what the settlement worker watches (only those written at or after
        `changed_since`, unix time, when given)."""
        if changed_since is not None:
            return [_balance(r) for r in self._read(f"{_SELECT} WHERE finalized=0 AND updated_at>=?", (changed_since,))]
        return [_balance(r) for r in self._read(f"{_SELECT} WHERE finalized=0", ())]

    def channels(self) -> list[ChannelBalance]:
        """Every channel this node was ever paid on, finalized or not (the operator status page)."""
        return [_balance(r) for r in self._read(f"{_SELECT} ORDER BY updated_at", ())]

    def voucher_count(self, channel_id: str) -> int:
        return self._read("SELECT COUNT(*) FROM vouchers WHERE channel_id=?", (channel_id.lower(),))[0][0]

    def _read(self, sql: str, args: tuple) -> list[tuple]:
        try:
            reader = self._readers.pop()
        except IndexError:
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._all_readers.append(reader)
        try:
            return reader.execute(sql, args).fetchall()
        finally:
            self._readers.append(reader)

    # -- writes (each one transaction, committed before returning) ------------------------------

    # One write path: every change is an op (below) applied by `apply_groups`, in one transaction per batch.
    # The node's hot path batches through `LedgerWriter`; the helpers here apply one op each (tests, the
    # settlement worker's thread).

    def record_voucher(self, channel_id: str, cumulative: int, signature: str) -> ChannelBalance:
        """Store a verified voucher if it raises the channel's accepted amount; durable on return."""
        return self.apply(VoucherOp(channel_id, cumulative, signature))

    def add_spent(self, channel_id: str, amount: int, *, slack: int = 0) -> int:
        """Charge `amount` unless spent would pass accepted + `slack`; returns the new spent total."""
        return self.apply(ChargeOp(channel_id, amount, slack)).spent

    def refund(self, channel_id: str, amount: int) -> int:
        """Take back a charge for output that was never sent; returns the new spent total."""
        return self.apply(RefundOp(channel_id, amount)).spent

    def set_settled(self, channel_id: str, settled: int, *, finalized: bool = False) -> None:
        """Record the on-chain settled amount (the chain is authoritative; it only ever grows)."""
        with contextlib.suppress(LedgerConflict):  # a channel this ledger never saw: nothing to record
            self.apply(SettledOp(channel_id, settled, finalized))

    def apply(self, op: LedgerOp) -> ChannelBalance:
        """One op, committed on return; raises the LedgerConflict that refused it."""
        (result,) = self.apply_groups([[op]])
        if isinstance(result, LedgerConflict):
            raise result
        return result[0]

    def apply_groups(self, groups: list[list[LedgerOp]]) -> list[list[ChannelBalance] | LedgerConflict]:
        """Groups of ops in ONE transaction; each group is all or nothing (a savepoint), so a request's
        voucher and charge land together or not at all."""
        results: list[list[ChannelBalance] | LedgerConflict] = []
        with self._lock:
            with _WriteTxn(self._db) as db:
                for group in groups:
                    if len(group) == 1:  # every op checks before it writes: a lone op needs no savepoint
                        try:
                            results.append([group[0].apply(db)])
                        except LedgerConflict as exc:
                            results.append(exc)
                        continue
                    db.execute("SAVEPOINT grp")
                    try:
                        results.append([op.apply(db) for op in group])
                        db.execute("RELEASE grp")
                    except LedgerConflict as exc:
                        db.execute("ROLLBACK TO grp")
                        db.execute("RELEASE grp")
                        results.append(exc)
            for result in results:  # committed: the mirror follows, in commit order (still under the lock)
                if isinstance(result, list):
                    for balance in result:
                        self._balances[balance.channel_id] = balance
        return results


@dataclass(frozen=True)
class VoucherOp:
    """Record a verified voucher: it must raise the channel's accepted amount."""

    channel_id: str
    cumulative: int
    signature: str

    def apply(self, db: sqlite3.Connection) -> ChannelBalance:
        cid = self.channel_id.lower()
        row = db.execute(f"{_SELECT} WHERE channel_id=?", (cid,)).fetchone()
        current = _balance(row) if row else None
        if current and current.finalized:
            raise LedgerConflict("channel_finalized", f"channel {cid} is already closed")
        if current and self.cumulative <= current.accepted:
            raise LedgerConflict("not_increasing", f"voucher amount {self.cumulative} does not exceed the accepted "
                                 f"{current.accepted} (replayed or out of order); sign a higher cumulative amount")
        now = time.time()
        db.execute("INSERT INTO channels (channel_id, accepted, signature, updated_at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT(channel_id) DO UPDATE SET accepted=excluded.accepted, "
                   "signature=excluded.signature, updated_at=excluded.updated_at, released=NULL, released_sig=NULL",
                   (cid, str(self.cumulative), self.signature, now))
        db.execute("INSERT INTO vouchers (channel_id, cumulative, signature, received_at) VALUES (?, ?, ?, ?)",
                   (cid, str(self.cumulative), self.signature, now))
        if current is None:
            return ChannelBalance(cid, self.cumulative, self.signature, 0, 0, False)
        return replace(current, accepted=self.cumulative, signature=self.signature, released=None,
                       released_signature=None)


@dataclass(frozen=True)
class ChargeOp:
    """Charge `amount` for service; spent may reach accepted + `slack` (the credit the node extends). With
    `earned_credit` the slack is at most what the channel has paid (accepted): a channel that paid nothing (a
    Sybil's 1-wei voucher) gets no credit, and no channel gets more unpaid service than it paid for."""

    channel_id: str
    amount: int
    slack: int = 0
    earned_credit: bool = False

    def apply(self, db: sqlite3.Connection) -> ChannelBalance:
        before = _existing(db, self.channel_id)
        cid = before.channel_id
        slack = min(self.slack, before.accepted) if self.earned_credit else self.slack
        spent, limit = before.spent + self.amount, before.accepted + slack
        if spent > limit:
            raise LedgerConflict("insufficient_funds", f"charging {self.amount} would take spent to {spent}, "
                                 f"past {limit}")
        db.execute("UPDATE channels SET spent=?, updated_at=? WHERE channel_id=?", (str(spent), time.time(), cid))
        return replace(before, spent=spent)


@dataclass(frozen=True)
class ReleaseOp:
    """Record a verified voucher *below* the accepted one that the payer signed after a receipt: the part of
    its earlier voucher that no answer used (a reservation) is released, settlement takes this one instead.
    It must still cover everything served; a higher voucher later supersedes it."""

    channel_id: str
    cumulative: int
    signature: str

    def apply(self, db: sqlite3.Connection) -> ChannelBalance:
        b = _existing(db, self.channel_id)
        cid = b.channel_id
        if b.finalized:
            raise LedgerConflict("channel_finalized", f"channel {cid} is already closed")
        if not (max(b.spent, b.settled) <= self.cumulative < b.accepted):
            raise LedgerConflict("bad_release", f"a release must cover what was served and settled "
                                 f"({max(b.spent, b.settled)}) and stay below the accepted {b.accepted}")
        if b.released is not None and self.cumulative <= b.released:
            raise LedgerConflict("not_increasing", f"release {self.cumulative} does not exceed {b.released}")
        if db.execute("SELECT 1 FROM vouchers WHERE channel_id=? AND cumulative=?", (cid, str(self.cumulative))
                      ).fetchone():  # an old voucher replayed (by anyone who saw it) is not the payer's release
            raise LedgerConflict("not_increasing", f"voucher {self.cumulative} was already received (replayed); "
                                 "sign a higher cumulative amount")
        now = time.time()
        db.execute("UPDATE channels SET released=?, released_sig=?, updated_at=? WHERE channel_id=?",
                   (str(self.cumulative), self.signature, now, cid))
        db.execute("INSERT INTO vouchers (channel_id, cumulative, signature, received_at) VALUES (?, ?, ?, ?)",
                   (cid, str(self.cumulative), self.signature, now))
        return replace(b, released=self.cumulative, released_signature=self.signature)


@dataclass(frozen=True)
class RefundOp:
    """Take back `amount` of a charge whose output was never sent (spent never goes below 0)."""

    channel_id: str
    amount: int

    def apply(self, db: sqlite3.Connection) -> ChannelBalance:
        b = _existing(db, self.channel_id)
        spent = max(b.spent - self.amount, 0)
        db.execute("UPDATE channels SET spent=?, updated_at=? WHERE channel_id=?",
                   (str(spent), time.time(), b.channel_id))
        return replace(b, spent=spent)


@dataclass(frozen=True)
class SettledOp:
    """What the chain says is settled (and whether the channel is finalized); both only ever grow."""

    channel_id: str
    settled: int
    finalized: bool = False

    def apply(self, db: sqlite3.Connection) -> ChannelBalance:
        b = _existing(db, self.channel_id)
        settled, finalized = max(self.settled, b.settled), b.finalized or self.finalized
        db.execute("UPDATE channels SET settled=?, finalized=?, updated_at=? WHERE channel_id=?",
                   (str(settled), int(finalized), time.time(), b.channel_id))
        return replace(b, settled=settled, finalized=finalized)


LedgerOp = VoucherOp | ChargeOp | ReleaseOp | RefundOp | SettledOp


class LedgerWriter:
    """The ledger's group commit (`node.storage`): vouchers and charges that arrive while one commit is on disk
    go in the next one, so a commit costs each request one fsync wait however many requests there are."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._writer: GroupCommitWriter[list[LedgerOp], list[ChannelBalance]] = GroupCommitWriter(
            ledger.apply_groups, name="ledger-writer")

    async def write(self, op: LedgerOp) -> ChannelBalance:
        """The channel's balance once `op` is durable; raises the LedgerConflict that refused it."""
        return (await self._writer.submit([op]))[0]

    async def write_many(self, ops: list[LedgerOp]) -> list[ChannelBalance]:
        """Several ops in the same commit, all or nothing: if one is refused none of them is applied."""
        return await self._writer.submit(ops)

    def close(self) -> None:
        self._writer.close()


class _WriteTxn:
    """`BEGIN IMMEDIATE` ... `COMMIT` (the caller holds the write lock); rolls back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _existing(db: sqlite3.Connection, channel_id: str) -> ChannelBalance:
    cid = channel_id.lower()
    row = db.execute(f"{_SELECT} WHERE channel_id=?", (cid,)).fetchone()
    if row is None:
        raise LedgerConflict("unknown_channel", f"no voucher accepted for channel {cid}")
    return _balance(row)


def _balance(row: tuple) -> ChannelBalance:
    return ChannelBalance(
        channel_id=row[0],
        accepted=int(row[1]),
        signature=row[2],
        spent=int(row[3]),
        settled=int(row[4]),
        finalized=bool(row[5]),
        released=None if row[6] is None else int(row[6]),
        released_signature=row[7],
    )
