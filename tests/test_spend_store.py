"""The spend store on its own: persistence across connections, monotonic amounts, sealed session keys."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from eth_account import Account

from dcml.client.sdk.spend_store import SessionKeyLocked, SpendStore, StoredChannel
from dcml.client.wire.receipts import Acceptance, Receipt, sign_acceptance, sign_receipt

CID = "0x" + "ab" * 32


def _channel(**kw) -> StoredChannel:
    base = dict(channel_id=CID, node_url="http://n", model="m", model_id="0x" + "01" * 32, payer="0xPayer",
                payee="0xNode", escrow="0xEscrow", chain_id=31337, token="0xToken", session_address="",
                deposit=10**30, accepted=0, spent=0, price_in=2, price_out=3, prepay=0, credit_window=12,
                status="open", opened_at=1.0)
    return StoredChannel(**{**base, **kw})


def _receipt(cost: int, cumulative: int, rid: str) -> Receipt:
    return Receipt(receiptId=rid, requestHash="0x" + "11" * 32, responseHash="0x" + "22" * 32, channelId=CID,
                   modelId="0x" + "01" * 32, inputTokens=1, outputTokens=1, cost=cost, cumulativeSpent=cumulative,
                   acceptedAt=1, ttftMs=1, durationMs=1)


def test_persists_across_processes_and_keeps_amounts_exact(tmp_path: Path) -> None:
    wallet, session, node = Account.create(), Account.create(), Account.create()
    path = tmp_path / "sub" / "spend.sqlite"
    store = SpendStore(path)
    store.add_channel(_channel(session_address=session.address, payer=wallet.address), wallet=wallet,
                      session_key=session)
    big = 2**127 + 5  # beyond SQLite integers and JSON doubles
    store.record_voucher(CID, big, "0xsig2")
    store.record_voucher(CID, 7, "0xsig1")  # a lower one is kept for the audit trail, accepted stays
    store.record_receipt(sign_receipt(_receipt(5, 5, "0x" + "03" * 32), node), node_url="http://n", request_body=b"{}")
    store.record_violation(node_url="http://n", reason="wrong_signer", message="m", channel_id=CID)
    store.close()

    again = SpendStore(path)
    (ch,) = again.channels(payer=wallet.address)
    assert (ch.accepted, ch.spent) == (big, 5)
    assert again.highest_voucher(CID) == (big, "0xsig2")
    assert [v[0] for v in again.vouchers(CID)] == [7, big]
    assert again.receipts()[0].request_body == b"{}" and again.receipts()[0].cost == 5
    assert again.violations()[0].reason == "wrong_signer"
    assert again.find_open(payer=wallet.address, payee="0xnode", escrow="0xescrow", chain_id=31337,
                           model="m") == ch
    assert again.session_key(CID, wallet).address == session.address
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_session_key_is_sealed_to_the_wallet(tmp_path: Path) -> None:
    wallet, session = Account.create(), Account.create()
    store = SpendStore(tmp_path / "s.sqlite")
    store.add_channel(_channel(session_address=session.address), wallet=wallet, session_key=session)
    assert bytes(session.key).hex() not in (tmp_path / "s.sqlite").read_bytes().hex()
    with pytest.raises(SessionKeyLocked, match="another wallet"):
        store.session_key(CID, Account.create())


def test_update_and_status_filters(tmp_path: Path) -> None:
    wallet = Account.create()
    store = SpendStore(tmp_path / "s.sqlite")
    store.add_channel(_channel(session_address=wallet.address), wallet=wallet, session_key=wallet)
    store.update_channel(CID, status="closing", deposit=42)
    assert store.channels(status="open") == []
    assert store.channel(CID).deposit == 42
    with pytest.raises(ValueError):
        store.update_channel(CID, payee="0xEvil")


def _acceptance(request: str, deadline: int) -> Acceptance:
    return Acceptance(requestHash=request, channelId=CID, acceptedAt=0, deadline=deadline)


def test_acceptances_become_overdue_unless_answered(tmp_path: Path) -> None:
    node = Account.create()
    store = SpendStore(tmp_path / "s.sqlite")
    late, answered, future = "0x" + "a1" * 32, "0x" + "a2" * 32, "0x" + "a3" * 32
    for request, deadline in ((late, 100), (answered, 100), (future, 1000)):
        store.record_acceptance(sign_acceptance(_acceptance(request, deadline), node), node_address=node.address,
                                node_url="http://n", model_id="0x" + "01" * 32)
    store.record_acceptance(sign_acceptance(_acceptance(late, 100), node), node_address=node.address,
                            node_url="http://n", model_id="0x" + "01" * 32)  # the same promise again: kept once
    assert store.mark_answered(node.address.upper().replace("0X", "0x"), answered, "0x" + "e1" * 32) == 1
    assert [a.request_hash for a in store.overdue_acceptances(500)] == [late]
    assert [a.request_hash for a in store.overdue_acceptances(2000)] == [late, future]

    (a,) = store.acceptances(request_hash=late)
    assert a.signed.acceptance.deadline == 100 and a.node_address == node.address.lower()
    store.update_acceptance(a.id, dispute_id="0x" + "d0" * 32, dispute_status="open", answer_by=900,
                            expected=2**127 + 1)
    assert store.overdue_acceptances(2000)[0].request_hash == future  # disputed: no longer overdue
    (opened,) = store.disputed_acceptances("open")
    assert (opened.answer_by, opened.expected, opened.amount) == (900, 2**127 + 1, None)
    with pytest.raises(ValueError):
        store.update_acceptance(a.id, deadline=1)


def test_breach_claims_once_per_node_and_request(tmp_path: Path) -> None:
    node = Account.create()
    store = SpendStore(tmp_path / "s.sqlite")
    first = sign_receipt(_receipt(5, 5, "0x" + "03" * 32), node)
    again = sign_receipt(_receipt(5, 10, "0x" + "04" * 32), node)  # another receipt for the same request
    assert store.record_breach_claim(first, node_address=node.address, node_url="http://n", broken=1, expected=7)
    assert not store.record_breach_claim(again, node_address=node.address, node_url="http://n", broken=1,
                                         expected=7)
    (claim,) = store.breach_claims("pending")
    assert (claim.receipt_id, claim.expected, claim.signed) == (first.receipt.receipt_id, 7, first)
    store.update_breach_claim(claim.receipt_id, status="claimed", amount=2**127, tx="0xabc")
    assert store.breach_claims("pending") == []
    assert store.breach_claim(claim.receipt_id).amount == 2**127


def test_a_store_written_before_the_sla_tables_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE channels (channel_id TEXT PRIMARY KEY, node_url TEXT NOT NULL, model TEXT NOT NULL,
            model_id TEXT NOT NULL, payer TEXT NOT NULL, payee TEXT NOT NULL, escrow TEXT NOT NULL,
            chain_id INTEGER NOT NULL, token TEXT NOT NULL, session_address TEXT NOT NULL, session_key BLOB NOT NULL,
            deposit TEXT NOT NULL, accepted TEXT NOT NULL DEFAULT '0', spent TEXT NOT NULL DEFAULT '0',
            price_in TEXT NOT NULL, price_out TEXT NOT NULL, prepay TEXT NOT NULL, credit_window TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'open', opened_at REAL NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE vouchers (id INTEGER PRIMARY KEY AUTOINCREMENT, channel_id TEXT NOT NULL,
            cumulative TEXT NOT NULL, signature TEXT NOT NULL, signed_at REAL NOT NULL,
            UNIQUE (channel_id, cumulative));
        CREATE TABLE receipts (receipt_id TEXT PRIMARY KEY, channel_id TEXT NOT NULL, node_url TEXT NOT NULL,
            cost TEXT NOT NULL, cumulative_spent TEXT NOT NULL, input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL, request_body BLOB, signed_json TEXT NOT NULL, recorded_at REAL NOT NULL);
        CREATE TABLE violations (id INTEGER PRIMARY KEY AUTOINCREMENT, channel_id TEXT, receipt_id TEXT,
            node_url TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, evidence TEXT, at REAL NOT NULL);
        INSERT INTO violations (node_url, reason, message, at) VALUES ('http://n', 'wrong_signer', 'm', 1.0);
    """)
    db.close()
    store = SpendStore(path)
    assert store.violations()[0].reason == "wrong_signer"
    assert store.breach_claims() == [] and store.overdue_acceptances(10**12) == []
    node = Account.create()
    store.record_acceptance(sign_acceptance(_acceptance("0x" + "a1" * 32, 5), node), node_address=node.address,
                            node_url="http://n", model_id="0x" + "01" * 32)
    assert len(store.overdue_acceptances(10)) == 1
