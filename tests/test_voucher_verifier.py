"""Every way a voucher can be wrong: a typed error with a clear message, and the ledger unchanged."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.payments import node_payments
from dcml.client.wire.voucher import SECP256K1_N, Voucher, VoucherDomain
from dcml.node.payments.verifier import VoucherRejected, parse_voucher

DEPOSIT = 10**18


@pytest.fixture
def setup(w3: Web3, deployment: Deployment, channels: ChannelClient, node_account: LocalAccount,
          session_key: LocalAccount, tmp_path):
    node = node_payments(w3, deployment, node_account, tmp_path)
    channel_id = channels.open(node_account.address, DEPOSIT, session_key=session_key.address)
    node.verifier.accept(channels.sign_voucher(session_key, channel_id, 1000))
    return node, channel_id


def rejected(node, voucher: Voucher, reason: str, channel_id: bytes) -> VoucherRejected:
    before = node.ledger.get("0x" + channel_id.hex())
    count = node.ledger.voucher_count("0x" + channel_id.hex())
    with pytest.raises(VoucherRejected) as info:
        node.verifier.accept(voucher)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value)  # a message that says what happened
    assert node.ledger.get("0x" + channel_id.hex()) == before
    assert node.ledger.voucher_count("0x" + channel_id.hex()) == count
    return info.value


def test_wrong_signer(setup, channels) -> None:
    node, cid = setup
    err = rejected(node, channels.sign_voucher(Account.create(), cid, 2000), "bad_signature", cid)
    assert "authorized signer" in str(err)


def test_voucher_for_another_channel(setup, channels, node_account, session_key) -> None:
    node, cid = setup
    other = channels.open(node_account.address, DEPOSIT, session_key=session_key.address)
    signed_for_other = channels.sign_voucher(session_key, other, 2000)
    moved = Voucher(channelId="0x" + cid.hex(), cumulativeAmount=2000, signature=signed_for_other.signature)
    rejected(node, moved, "bad_signature", cid)


def test_another_chain_id(setup, deployment, session_key) -> None:
    node, cid = setup
    foreign = VoucherDomain(deployment.chain_id + 1, deployment.payment_channels).sign(session_key, cid, 2000)
    rejected(node, foreign, "bad_signature", cid)


def test_another_contract(setup, deployment, session_key) -> None:
    node, cid = setup
    foreign = VoucherDomain(deployment.chain_id, deployment.model_registry).sign(session_key, cid, 2000)
    rejected(node, foreign, "bad_signature", cid)


def test_lower_and_equal_amounts(setup, channels, session_key) -> None:
    node, cid = setup
    rejected(node, channels.sign_voucher(session_key, cid, 999), "not_increasing", cid)
    rejected(node, channels.sign_voucher(session_key, cid, 1000), "not_increasing", cid)  # exact replay


def test_above_the_deposit(setup, channels, session_key) -> None:
    node, cid = setup
    err = rejected(node, channels.sign_voucher(session_key, cid, DEPOSIT + 1), "exceeds_deposit", cid)
    assert "top up" in str(err)


def test_top_up_is_noticed_despite_the_cache(setup, channels, session_key) -> None:
    node, cid = setup
    channels.top_up(cid, 5)
    assert node.verifier.accept(channels.sign_voucher(session_key, cid, DEPOSIT + 5)).accepted == DEPOSIT + 5


def test_finalized_channel(setup, channels, session_key, node_account) -> None:
    node, cid = setup
    balance = node.ledger.get("0x" + cid.hex())
    node.chain.close(node_account, cid, balance.accepted, bytes.fromhex(balance.signature[2:]))
    rejected(node, channels.sign_voucher(session_key, cid, 2000), "channel_finalized", cid)


def test_high_s_signature(setup, channels, session_key) -> None:
    node, cid = setup
    good = channels.sign_voucher(session_key, cid, 2000)
    sig = good.signature_bytes
    s = int.from_bytes(sig[32:64], "big")
    flipped = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])  # same signer, high s
    malleated = Voucher(channelId=good.channel_id, cumulativeAmount=2000, signature="0x" + flipped.hex())
    err = rejected(node, malleated, "malformed_signature", cid)
    assert "high" in str(err)


def test_64_byte_and_garbage_signatures(setup, channels, session_key) -> None:
    node, cid = setup
    good = channels.sign_voucher(session_key, cid, 2000)
    short = Voucher(channelId=good.channel_id, cumulativeAmount=2000, signature=good.signature[:130])
    rejected(node, short, "malformed_signature", cid)


def test_malformed_wire_vouchers_are_rejected_before_any_check(setup) -> None:
    _, cid = setup
    base = {"channelId": "0x" + cid.hex(), "cumulativeAmount": "5", "signature": "0x" + "11" * 65}
    for bad in (
        {**base, "channelId": "0x1234"},
        {**base, "channelId": "zz"},
        {**base, "cumulativeAmount": "-1"},
        {**base, "cumulativeAmount": 2**128},
        {**base, "cumulativeAmount": "1e9"},
        {**base, "signature": "0xnothex"},
        {k: v for k, v in base.items() if k != "signature"},
        "not an object",
    ):
        with pytest.raises(VoucherRejected) as info:
            parse_voucher(bad)
        assert info.value.reason == "malformed"


def test_unknown_channel(setup, channels, session_key) -> None:
    node, _ = setup
    ghost = b"\x42" * 32
    with pytest.raises(VoucherRejected) as info:
        node.verifier.accept(channels.sign_voucher(session_key, ghost, 5))
    assert info.value.reason == "unknown_channel"
    assert node.ledger.get("0x" + ghost.hex()) is None


def test_channel_paying_another_node(w3, deployment, channels, session_key, tmp_path) -> None:
    other_node = Account.from_key(deployment.accounts["node2"].private_key)
    node = node_payments(w3, deployment, Account.from_key(deployment.accounts["node"].private_key), tmp_path)
    cid = channels.open(other_node.address, DEPOSIT, session_key=session_key.address)
    with pytest.raises(VoucherRejected) as info:
        node.verifier.accept(channels.sign_voucher(session_key, cid, 5))
    assert info.value.reason == "wrong_payee"
