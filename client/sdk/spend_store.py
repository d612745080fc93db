"""The client's durable record of its spending: channels (with their session keys), vouchers signed,
receipts verified, violations seen, and the SLA remedies they give (acceptances that may need a
no-response dispute, receipts that break the node's terms), in one SQLite file.

A later process reuses a channel from here. Session keys are stored encrypted (AES-256-GCM under a key
derived by HKDF from the wallet's private key, so the file alone does not let anyone sign vouchers) and
the file is created with mode 0600 in a 0700 directory. Amounts are uint128 wei, beyond SQLite's
integers, so they are stored as decimal text.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.signers.local import LocalAccount

from dcml.client.wire.errors import DcmlError
from dcml.client.wire.receipts import SignedAcceptance, SignedReceipt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id      TEXT PRIMARY KEY,      -- 0x-hex, lower case
    node_url        TEXT NOT NULL,
    model           TEXT NOT NULL,         -- served model name the channel was opened for
    model_id        TEXT NOT NULL,         -- bytes32 hex (the channel's modelId)
    payer           TEXT NOT NULL,
    payee           TEXT NOT NULL,         -- the attested node signing address
    escrow          TEXT NOT NULL,
    chain_id        INTEGER NOT NULL,
    token           TEXT NOT NULL,
    session_address TEXT NOT NULL,
    session_key     BLOB NOT NULL,         -- nonce(12) || AES-GCM(wallet-derived key, private key)
    deposit         TEXT NOT NULL,
    accepted        TEXT NOT NULL DEFAULT '0',  -- highest voucher signed
    spent           TEXT NOT NULL DEFAULT '0',  -- highest verified receipt cumulativeSpent
    price_in        TEXT NOT NULL,
    price_out       TEXT NOT NULL,
    prepay          TEXT NOT NULL,
    credit_window   TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'open',  -- open | closing | closed
    opened_at       REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vouchers (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id  TEXT NOT NULL,
    cumulative  TEXT NOT NULL,
    signature   TEXT NOT NULL,
    signed_at   REAL NOT NULL,
    UNIQUE (channel_id, cumulative)
);
CREATE TABLE IF NOT EXISTS receipts (
    receipt_id       TEXT PRIMARY KEY,
    channel_id       TEXT NOT NULL,
    node_url         TEXT NOT NULL,
    cost             TEXT NOT NULL,
    cumulative_spent TEXT NOT NULL,
    input_tokens     INTEGER NOT NULL,
    output_tokens    INTEGER NOT NULL,
    request_body     BLOB,               -- kept so `dcml receipts verify` can recheck the requestHash
    signed_json      TEXT NOT NULL,
    recorded_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS violations (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id  TEXT,
    receipt_id  TEXT,
    node_url    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    message     TEXT NOT NULL,
    evidence    TEXT,                   -- the offending signed receipt/acceptance JSON, if any
    at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS acceptances (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    node_address   TEXT NOT NULL,         -- lower case: the attested signing key (channel payee)
    request_hash   TEXT NOT NULL,
    node_url       TEXT NOT NULL,         -- where to fetch a missing receipt before disputing
    channel_id     TEXT NOT NULL,
    model_id       TEXT NOT NULL,         -- whose published terms apply
    deadline       INTEGER NOT NULL,
    signature      TEXT NOT NULL,
    signed_json    TEXT NOT NULL,         -- SignedAcceptance JSON: the dispute's evidence
    receipt_id     TEXT,                  -- set once a receipt for the request arrived (or was fetched)
    dispute_id     TEXT,
    dispute_status TEXT,                  -- open | answered | finalized | refused
    answer_by      INTEGER,
    expected       TEXT,                  -- the court's noResponseCompensation at opening
    amount         TEXT,                  -- what finalizing paid
    tx             TEXT,
    reason         TEXT,                  -- last refusal or failure
    recorded_at    REAL NOT NULL,
    updated_at     REAL NOT NULL,
    UNIQUE (node_address, request_hash, deadline)
);
CREATE INDEX IF NOT EXISTS acceptances_open ON acceptances (receipt_id, dispute_status, deadline);
CREATE TABLE IF NOT EXISTS breach_claims (
    receipt_id     TEXT PRIMARY KEY,
    node_address   TEXT NOT NULL,
    node_url       TEXT NOT NULL,
    channel_id     TEXT NOT NULL,
    request_hash   TEXT NOT NULL,
    broken         INTEGER NOT NULL,      -- client.sla.Broken bits
    expected       TEXT NOT NULL,         -- Terms.compensation (before the cap by the node's stake)
    signed_json    TEXT NOT NULL,         -- the signed receipt: the claim's evidence
    status         TEXT NOT NULL DEFAULT 'pending',  -- pending | claimed | refused
    amount         TEXT,
    tx             TEXT,
    reason         TEXT,
    recorded_at    REAL NOT NULL,
    updated_at     REAL NOT NULL,
    UNIQUE (node_address, request_hash)   -- the court pays once per (node, request)
);
"""
_KEY_INFO = b"dcml spend-store session key v1"


class SessionKeyLocked(DcmlError):
    """The stored session key does not decrypt with this wallet."""

    reason = "session_key_locked"


def _cipher(wallet: LocalAccount) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(bytes(wallet.key))
    return AESGCM(key)


def seal_session_key(wallet: LocalAccount, session_key: LocalAccount) -> bytes:
    nonce = os.urandom(12)
    return nonce + _cipher(wallet).encrypt(nonce, bytes(session_key.key), session_key.address.lower().encode())


def open_session_key(wallet: LocalAccount, blob: bytes, address: str) -> LocalAccount:
    try:
        raw = _cipher(wallet).decrypt(blob[:12], blob[12:], address.lower().encode())
    except InvalidTag as exc:
        raise SessionKeyLocked(f"the session key of {address} was stored by another wallet; use that wallet's "
                               "key (--key-env/--key-file) or open a new channel") from exc
    return Account.from_key(raw)


@dataclass(frozen=True)
class StoredChannel:
    channel_id: str
    node_url: str
    model: str
    model_id: str
    payer: str
    payee: str
    escrow: str
    chain_id: int
    token: str
    session_address: str
    deposit: int
    accepted: int
    spent: int
    price_in: int
    price_out: int
    prepay: int
    credit_window: int
    status: str
    opened_at: float

    def as_json(self) -> dict:
        out = dict(self.__dict__)
        for k in ("chain_id", "deposit", "accepted", "spent", "price_in", "price_out", "prepay", "credit_window"):
            out[k] = str(out[k])  # every uint a decimal string: JSON numbers lose precision past 2**53
        return out


@dataclass(frozen=True)
class StoredReceipt:
    receipt_id: str
    channel_id: str
    node_url: str
    cost: int
    cumulative_spent: int
    input_tokens: int
    output_tokens: int
    request_body: bytes | None
    signed: SignedReceipt
    recorded_at: float

    def as_json(self) -> dict:
        return {"receipt_id": self.receipt_id, "channel_id": self.channel_id, "node_url": self.node_url,
                "cost": str(self.cost), "cumulative_spent": str(self.cumulative_spent),
                "input_tokens": str(self.input_tokens), "output_tokens": str(self.output_tokens),
                "recorded_at": self.recorded_at}


@dataclass(frozen=True)
class Violation:
    id: int
    channel_id: str | None
    receipt_id: str | None
    node_url: str
    reason: str
    message: str
    evidence: str | None
    at: float


@dataclass(frozen=True)
class StoredAcceptance:
    """A verified acceptance, and the no-response dispute over it once there is one."""

    id: int
    node_address: str
    request_hash: str
    node_url: str
    channel_id: str
    model_id: str
    deadline: int
    signed: SignedAcceptance
    receipt_id: str | None
    dispute_id: str | None
    dispute_status: str | None  # None (not disputed) | open | answered | finalized | refused
    answer_by: int | None
    expected: int | None
    amount: int | None
    tx: str | None
    reason: str | None
    recorded_at: float


@dataclass(frozen=True)
class BreachClaim:
    """A verified receipt whose own figures break the node's terms: a claim to send (or sent) to the court."""

    receipt_id: str
    node_address: str
    node_url: str
    channel_id: str
    request_hash: str
    broken: int  # client.sla.Broken bits
    expected: int
    signed: SignedReceipt
    status: str  # pending | claimed | refused
    amount: int | None
    tx: str | None
    reason: str | None
    recorded_at: float


_ACCEPTANCE_COLS = ("id, node_address, request_hash, node_url, channel_id, model_id, deadline, signed_json, "
                    "receipt_id, dispute_id, dispute_status, answer_by, expected, amount, tx, reason, recorded_at")
_CLAIM_COLS = ("receipt_id, node_address, node_url, channel_id, request_hash, broken, expected, signed_json, status, "
               "amount, tx, reason, recorded_at")


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _acceptance(row: tuple) -> StoredAcceptance:
    (aid, node, rh, url, cid, mid, deadline, js, rid, did, dstatus, answer_by, expected, amount, tx, reason,
     at) = row
    return StoredAcceptance(aid, node, rh, url, cid, mid, deadline, SignedAcceptance.model_validate_json(js), rid,
                            did, dstatus, answer_by, _int(expected), _int(amount), tx, reason, at)


def _claim(row: tuple) -> BreachClaim:
    rid, node, url, cid, rh, broken, expected, js, status, amount, tx, reason, at = row
    return BreachClaim(rid, node, url, cid, rh, broken, int(expected), SignedReceipt.from_json(js), status,
                       _int(amount), tx, reason, at)


_CHANNEL_COLS = ("channel_id, node_url, model, model_id, payer, payee, escrow, chain_id, token, session_address, "
                 "deposit, accepted, spent, price_in, price_out, prepay, credit_window, status, opened_at")


def _channel(row: tuple) -> StoredChannel:
    (cid, url, model, mid, payer, payee, escrow, chain, token, sess, dep, acc, spent, pin, pout, pre, credit,
     status, opened) = row
    return StoredChannel(cid, url, model, mid, payer, payee, escrow, chain, token, sess, int(dep), int(acc),
                         int(spent), int(pin), int(pout), int(pre), int(credit), status, opened)


class SpendStore:
    """Thread-safe; one connection guarded by a lock (writes are small and rare next to inference)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)  # holds (encrypted) session keys and request bodies
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- channels --------------------------------------------------------------------------------

    def add_channel(self, ch: StoredChannel, *, wallet: LocalAccount, session_key: LocalAccount) -> None:
        blob = seal_session_key(wallet, session_key)
        now = time.time()
        with self._tx() as db:
            db.execute(
                f"INSERT INTO channels ({_CHANNEL_COLS}, session_key, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (ch.channel_id.lower(), ch.node_url, ch.model, ch.model_id.lower(), ch.payer, ch.payee, ch.escrow,
                 ch.chain_id, ch.token, ch.session_address, str(ch.deposit), str(ch.accepted), str(ch.spent),
                 str(ch.price_in), str(ch.price_out), str(ch.prepay), str(ch.credit_window), ch.status,
                 ch.opened_at, blob, now))

    def channel(self, channel_id: str) -> StoredChannel | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_CHANNEL_COLS} FROM channels WHERE channel_id = ?",
                                   (channel_id.lower(),)).fetchone()
        return _channel(row) if row else None

    def channels(self, *, payer: str | None = None, status: str | None = None) -> list[StoredChannel]:
        sql, args = f"SELECT {_CHANNEL_COLS} FROM channels WHERE 1=1", []
        if payer:
            sql, args = sql + " AND lower(payer) = ?", [*args, payer.lower()]
        if status:
            sql, args = sql + " AND status = ?", [*args, status]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY opened_at", args).fetchall()
        return [_channel(r) for r in rows]

    def find_open(self, *, payer: str, payee: str, escrow: str, chain_id: int, model: str) -> StoredChannel | None:
        """The newest open channel from `payer` to `payee` for the served model `model`."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_CHANNEL_COLS} FROM channels WHERE status = 'open' AND lower(payer) = ? AND "
                "lower(payee) = ? AND lower(escrow) = ? AND chain_id = ? AND model = ? "
                "ORDER BY opened_at DESC LIMIT 1",
                (payer.lower(), payee.lower(), escrow.lower(), chain_id, model),
            ).fetchone()
        return _channel(row) if row else None

    def session_key(self, channel_id: str, wallet: LocalAccount) -> LocalAccount:
        with self._lock:
            row = self._db.execute("SELECT session_key, session_address FROM channels WHERE channel_id = ?",
                                   (channel_id.lower(),)).fetchone()
        if row is None:
            raise KeyError(f"channel {channel_id} is not in the spend store {self.path}")
        return open_session_key(wallet, row[0], row[1])

    def update_channel(self, channel_id: str, **fields: int | str) -> None:
        allowed = {"deposit", "status", "price_in", "price_out", "prepay", "credit_window", "accepted", "spent"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [v if k == "status" else str(v) for k, v in fields.items()]
        with self._tx() as db:
            db.execute(f"UPDATE channels SET {sets}, updated_at = ? WHERE channel_id = ?",
                       (*values, time.time(), channel_id.lower()))

    # -- vouchers --------------------------------------------------------------------------------

    def record_voucher(self, channel_id: str, cumulative: int, signature: str) -> None:
        """Append a signed voucher and raise the channel's `accepted` (only ever upwards)."""
        cid = channel_id.lower()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO vouchers (channel_id, cumulative, signature, signed_at) "
                       "VALUES (?,?,?,?)", (cid, str(cumulative), signature, time.time()))
            (accepted,) = db.execute("SELECT accepted FROM channels WHERE channel_id = ?", (cid,)).fetchone()
            if cumulative > int(accepted):
                db.execute("UPDATE channels SET accepted = ?, updated_at = ? WHERE channel_id = ?",
                           (str(cumulative), time.time(), cid))

    def highest_voucher(self, channel_id: str) -> tuple[int, str] | None:
        with self._lock:
            rows = self._db.execute("SELECT cumulative, signature FROM vouchers WHERE channel_id = ?",
                                    (channel_id.lower(),)).fetchall()
        if not rows:
            return None
        amount, sig = max(rows, key=lambda r: int(r[0]))
        return int(amount), sig

    def vouchers(self, channel_id: str) -> list[tuple[int, str, float]]:
        with self._lock:
            rows = self._db.execute("SELECT cumulative, signature, signed_at FROM vouchers WHERE channel_id = ?",
                                    (channel_id.lower(),)).fetchall()
        return sorted(((int(a), s, t) for a, s, t in rows), key=lambda r: r[0])

    # -- receipts and violations -----------------------------------------------------------------

    def record_receipt(self, signed: SignedReceipt, *, node_url: str, request_body: bytes | None) -> None:
        r = signed.receipt
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (r.receipt_id, r.channel_id, node_url, str(r.cost), str(r.cumulative_spent), r.input_tokens,
                        r.output_tokens, request_body, signed.model_dump_json(by_alias=True), time.time()))
            row = db.execute("SELECT spent FROM channels WHERE channel_id = ?", (r.channel_id,)).fetchone()
            if row is not None and r.cumulative_spent > int(row[0]):
                db.execute("UPDATE channels SET spent = ?, updated_at = ? WHERE channel_id = ?",
                           (str(r.cumulative_spent), time.time(), r.channel_id))

    def receipts(self, channel_id: str | None = None) -> list[StoredReceipt]:
        sql, args = "SELECT * FROM receipts", ()
        if channel_id:
            sql, args = sql + " WHERE channel_id = ?", (channel_id.lower(),)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY recorded_at, rowid", args).fetchall()
        return [StoredReceipt(rid, cid, url, int(cost), int(cum), i, o, body, SignedReceipt.from_json(js), at)
                for rid, cid, url, cost, cum, i, o, body, js, at in rows]

    def record_violation(self, *, node_url: str, reason: str, message: str, channel_id: str | None = None,
                         receipt_id: str | None = None, evidence: str | None = None) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO violations (channel_id, receipt_id, node_url, reason, message, evidence, at) "
                       "VALUES (?,?,?,?,?,?,?)", (channel_id, receipt_id, node_url, reason, message, evidence,
                                                  time.time()))

    def violations(self) -> list[Violation]:
        with self._lock:
            rows = self._db.execute("SELECT id, channel_id, receipt_id, node_url, reason, message, evidence, at "
                                    "FROM violations ORDER BY id").fetchall()
        return [Violation(*r) for r in rows]

    # -- acceptances (no-response disputes) ------------------------------------------------------

    def record_acceptance(self, signed: SignedAcceptance, *, node_address: str, node_url: str, model_id: str) -> None:
        """Keep a verified acceptance: the evidence for a no-response dispute if its receipt never comes."""
        a, now = signed.acceptance, time.time()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO acceptances (node_address, request_hash, node_url, channel_id, model_id, "
                       "deadline, signature, signed_json, recorded_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (node_address.lower(), a.request_hash, node_url, a.channel_id, model_id.lower(), a.deadline,
                        signed.signature, signed.model_dump_json(by_alias=True), now, now))

    def mark_answered(self, node_address: str, request_hash: str, receipt_id: str) -> int:
        """The node answered `request_hash`: its unanswered acceptances need no dispute (the court takes any
        receipt of the node for the same request as the answer). Returns how many were marked."""
        with self._tx() as db:
            return db.execute("UPDATE acceptances SET receipt_id = ?, updated_at = ? WHERE node_address = ? AND "
                              "request_hash = ? AND receipt_id IS NULL",
                              (receipt_id, time.time(), node_address.lower(), request_hash.lower())).rowcount

    def _acceptances(self, where: str, args: tuple = ()) -> list[StoredAcceptance]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_ACCEPTANCE_COLS} FROM acceptances WHERE {where} ORDER BY id",
                                    args).fetchall()
        return [_acceptance(r) for r in rows]

    def acceptance(self, acceptance_id: int) -> StoredAcceptance | None:
        found = self._acceptances("id = ?", (acceptance_id,))
        return found[0] if found else None

    def acceptances(self, *, node_address: str | None = None, request_hash: str | None = None
                    ) -> list[StoredAcceptance]:
        where, args = "1=1", []
        if node_address:
            where, args = where + " AND node_address = ?", [*args, node_address.lower()]
        if request_hash:
            where, args = where + " AND request_hash = ?", [*args, request_hash.lower()]
        return self._acceptances(where, tuple(args))

    def overdue_acceptances(self, now: int) -> list[StoredAcceptance]:
        """No receipt, not disputed, and the deadline is behind `now` (chain time: the court's clock)."""
        return self._acceptances("receipt_id IS NULL AND dispute_status IS NULL AND deadline < ?", (now,))

    def disputed_acceptances(self, status: str | None = None) -> list[StoredAcceptance]:
        if status is None:
            return self._acceptances("dispute_status IS NOT NULL")
        return self._acceptances("dispute_status = ?", (status,))

    def update_acceptance(self, acceptance_id: int, **fields: int | str | None) -> None:
        allowed = {"receipt_id", "dispute_id", "dispute_status", "answer_by", "expected", "amount", "tx", "reason"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        values = [str(v) if k in ("expected", "amount") and v is not None else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE acceptances SET {sets}, updated_at = ? WHERE id = ?",
                       (*values, time.time(), acceptance_id))

    # -- breach claims (broken terms) ------------------------------------------------------------

    def record_breach_claim(self, signed: SignedReceipt, *, node_address: str, node_url: str, broken: int,
                            expected: int) -> bool:
        """A pending claim for a receipt that breaks the terms; False if this (node, request) already has one."""
        r, now = signed.receipt, time.time()
        with self._tx() as db:
            return db.execute(
                "INSERT OR IGNORE INTO breach_claims (receipt_id, node_address, node_url, channel_id, request_hash, "
                "broken, expected, signed_json, recorded_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (r.receipt_id, node_address.lower(), node_url, r.channel_id, r.request_hash, int(broken),
                 str(expected), signed.model_dump_json(by_alias=True), now, now)).rowcount == 1

    def breach_claims(self, status: str | None = None) -> list[BreachClaim]:
        sql, args = f"SELECT {_CLAIM_COLS} FROM breach_claims", ()
        if status:
            sql, args = sql + " WHERE status = ?", (status,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY recorded_at, rowid", args).fetchall()
        return [_claim(r) for r in rows]

    def breach_claim(self, receipt_id: str) -> BreachClaim | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_CLAIM_COLS} FROM breach_claims WHERE receipt_id = ?",
                                   (receipt_id.lower(),)).fetchone()
        return _claim(row) if row else None

    def update_breach_claim(self, receipt_id: str, **fields: int | str | None) -> None:
        allowed = {"status", "amount", "tx", "reason"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        values = [str(v) if k == "amount" and v is not None else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE breach_claims SET {sets}, updated_at = ? WHERE receipt_id = ?",
                       (*values, time.time(), receipt_id.lower()))
