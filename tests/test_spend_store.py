"""The spend store on its own: persistence across connections, monotonic amounts, sealed session keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from eth_account import Account

from client.receipts import Receipt, sign_receipt
from client.spend_store import SessionKeyLocked, SpendStore, StoredChannel

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
