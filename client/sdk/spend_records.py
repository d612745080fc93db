"""The spend store's records (channels, receipts, violations, acceptances, breach claims) and their rows, and
the sealing of session keys: AES-256-GCM under a key derived by HKDF from the wallet's private key, so the store
file alone does not let anyone sign vouchers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.signers.local import LocalAccount

from dcml.client.wire.errors import DcmlError
from dcml.client.wire.receipts import SignedAcceptance, SignedReceipt

_KEY_INFO = b"dcml spend-store session key v1"


class SessionKeyLocked(DcmlError):
    reason = "session_key_locked"

    """The stored session key does not decrypt with this wallet."""


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


ACCEPTANCE_COLS = ("id, node_address, request_hash, node_url, channel_id, model_id, deadline, signed_json, "
                    "receipt_id, dispute_id, dispute_status, answer_by, expected, amount, tx, reason, recorded_at")
CLAIM_COLS = ("receipt_id, node_address, node_url, channel_id, request_hash, broken, expected, signed_json, status, "
               "amount, tx, reason, recorded_at")


def _int(value: str | None) -> int | None:
    return None if value is None else int(value)


def acceptance_row(row: tuple) -> StoredAcceptance:
    (aid, node, rh, url, cid, mid, deadline, js, rid, did, dstatus, answer_by, expected, amount, tx, reason,
     at) = row
    return StoredAcceptance(aid, node, rh, url, cid, mid, deadline, SignedAcceptance.model_validate_json(js), rid,
                            did, dstatus, answer_by, _int(expected), _int(amount), tx, reason, at)


def claim_row(row: tuple) -> BreachClaim:
    rid, node, url, cid, rh, broken, expected, js, status, amount, tx, reason, at = row
    return BreachClaim(rid, node, url, cid, rh, broken, int(expected), SignedReceipt.from_json(js), status,
                       _int(amount), tx, reason, at)


CHANNEL_COLS = ("channel_id, node_url, model, model_id, payer, payee, escrow, chain_id, token, session_address, "
                 "deposit, accepted, spent, price_in, price_out, prepay, credit_window, status, opened_at")


def channel_row(row: tuple) -> StoredChannel:
    (cid, url, model, mid, payer, payee, escrow, chain, token, sess, dep, acc, spent, pin, pout, pre, credit,
     status, opened) = row
    return StoredChannel(cid, url, model, mid, payer, payee, escrow, chain, token, sess, int(dep), int(acc),
                         int(spent), int(pin), int(pout), int(pre), int(credit), status, opened)
