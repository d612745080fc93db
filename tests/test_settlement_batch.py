"""Batched settlement against a real anvil: one `settleBatch` transaction per token and model settles every due
channel of the round, exact to the wei with royalties; a bad voucher in a batch is skipped and reported."""

from __future__ import annotations

import random

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD

from dcml.client.chain.channel import ETH, ChannelClient
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.payments import new_model, node_payments, token_balance


def _held(w3: Web3, deployment: Deployment, who: str, token: str) -> int:
    """Balance plus unclaimed earnings in the escrow: what `who` owns of `token`, claimed or not."""
    escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
    owned = w3.eth.get_balance(who) if token == ETH else token_balance(w3, deployment, who)
    return owned + escrow.functions.earnings(Web3.to_checksum_address(token), who).call()


def test_one_transaction_per_token_and_model_settles_every_due_channel_to_the_wei(
    w3: Web3, deployment: Deployment, channels: ChannelClient, node_account: LocalAccount,
    publisher: LocalAccount, session_key: LocalAccount, tmp_path,
) -> None:
    bps = 333
    royalty_model, free_model = new_model(w3, deployment, publisher, bps), new_model(w3, deployment, publisher, 0)
    node = node_payments(w3, deployment, node_account, tmp_path)
    rng = random.Random(17)
    opened = [(channels.open(node_account.address, 10**20, session_key=session_key.address, model_id=m), m)
              for m in [royalty_model] * 7 + [free_model] * 2]
    expected: dict[bytes, int] = {}
    for cid, _ in opened:
        cumulative = 0
        for _ in range(3):  # the ledger settles the latest of several vouchers
            cumulative += rng.randrange(1, 10**18)  # odd amounts: the royalty's rounding must not drift
            node.verifier.accept(channels.sign_voucher(session_key, cid, cumulative))
        expected[cid] = cumulative
    token = deployment.token
    node_before = _held(w3, deployment, node_account.address, token)
    publisher_before = _held(w3, deployment, publisher.address, token)
    escrow_before = token_balance(w3, deployment, deployment.payment_channels)
    # Earnings an earlier test on this session's chain left unclaimed: the worker's claim takes them out too.
    unclaimed = contract(w3, "PaymentChannels", deployment.payment_channels).functions.earnings(
        Web3.to_checksum_address(token), node_account.address).call()

    actions = node.worker.run_once(flush=True)

    assert sorted(bytes.fromhex(a.channel_id[2:]) for a in actions) == sorted(expected)
    assert {a.action for a in actions} == {"settle"}
    assert len({a.tx_hash for a in actions}) == 2  # one transaction per (token, model terms)
    for cid, cumulative in expected.items():
        assert channels.get(cid).settled == cumulative
        assert node.ledger.get("0x" + cid.hex()).settled == cumulative
    royalty = sum(expected[cid] * bps // 10_000 for cid, m in opened if m == royalty_model)
    total = sum(expected.values())
    assert _held(w3, deployment, publisher.address, token) - publisher_before == royalty
    assert _held(w3, deployment, node_account.address, token) - node_before == total - royalty
    # The worker claimed the node's share; the publisher's stays in the escrow until it claims.
    assert escrow_before - token_balance(w3, deployment, deployment.payment_channels) == total - royalty + unclaimed
    assert node.worker.run_once(flush=True) == []  # nothing is settled twice


def test_a_bad_voucher_in_a_batch_is_skipped_and_the_rest_settle(
    w3: Web3, deployment: Deployment, channels: ChannelClient, node_account: LocalAccount,
    session_key: LocalAccount, tmp_path,
) -> None:
    node = node_payments(w3, deployment, node_account, tmp_path)
    escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
    good, stale, closed = (channels.open(node_account.address, 10**18, session_key=session_key.address, token=ETH)
                           for _ in range(3))
    v_stale = channels.sign_voucher(session_key, stale, 500)
    node.chain.settle(node_account, stale, 500, v_stale.signature_bytes)  # already settled at 500
    node.chain.close(node_account, closed, 0, b"")
    vouchers = [(cid, amount, channels.sign_voucher(session_key, cid, amount).signature_bytes)
                for cid, amount in ((good, 700), (stale, 500), (closed, 100))]
    forged = channels.sign_voucher(session_key, good, 10**18).signature_bytes  # signed for good, sent for stale
    vouchers.append((stale, 10**18, forged))

    receipt, skipped = node.chain.settle_batch(node_account, vouchers)

    assert receipt["status"] == 1
    selector = {e["name"]: Web3.keccak(text=f"{e['name']}({','.join(i['type'] for i in e['inputs'])})")[:4]
                for e in escrow.abi if e["type"] == "error"}
    # Keyed by channel: the stale channel's last skip (the forged voucher) is the one kept.
    assert skipped == {stale: selector["InvalidSignature"], closed: selector["ChannelFinalized"]}
    logs = escrow.events.SettlementSkipped().process_receipt(receipt, errors=DISCARD)
    reasons = [bytes(e["args"]["reason"]) for e in logs]
    assert reasons == [selector["AmountNotIncreasing"], selector["ChannelFinalized"], selector["InvalidSignature"]]
    assert channels.get(good).settled == 700
    assert channels.get(stale).settled == 500
    assert channels.get(closed).settled == 0
