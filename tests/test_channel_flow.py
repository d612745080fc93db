"""A channel's whole life against a real anvil: every balance exact to the wei, royalty included."""

from __future__ import annotations

import random

from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ETH, ChannelClient
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.payments import new_model, node_payments, token_balance


def test_open_1000_vouchers_settle_close_exact_to_the_wei(
    w3: Web3, deployment: Deployment, channels: ChannelClient, payer: LocalAccount, node_account: LocalAccount,
    publisher: LocalAccount, session_key: LocalAccount, tmp_path,
) -> None:
    bps = 250
    model = new_model(w3, deployment, publisher, bps)
    deposit = 10**21 + 7
    node = node_payments(w3, deployment, node_account, tmp_path)
    escrow = deployment.payment_channels
    _claim_leftovers(w3, deployment, deployment.token, node_account, publisher)
    before = {who: token_balance(w3, deployment, who)
              for who in (payer.address, node_account.address, publisher.address, escrow)}

    channel_id = channels.open(node_account.address, deposit, session_key=session_key.address, model_id=model)
    rng = random.Random(7)
    cumulative = 0
    for _ in range(1000):
        cumulative += rng.randrange(1, 10**17)  # odd amounts: rounding of the royalty must not drift
        node.verifier.accept(channels.sign_voucher(session_key, channel_id, cumulative))
    assert node.ledger.get("0x" + channel_id.hex()).accepted == cumulative
    assert node.ledger.voucher_count("0x" + channel_id.hex()) == 1000

    actions = node.worker.run_once(flush=True)  # settles and claims the node's share
    assert [a.action for a in actions] == ["settle"]
    state = channels.get(channel_id)
    assert state.settled == cumulative and not state.finalized

    balance = node.ledger.get("0x" + channel_id.hex())
    node.chain.close(node_account, channel_id, balance.accepted, bytes.fromhex(balance.signature[2:]))
    assert channels.get(channel_id).finalized
    channels.claim_refund(channel_id)  # the payer's refund
    ChannelClient(w3, deployment, publisher).claim_earnings()

    royalty = cumulative * bps // 10_000
    assert token_balance(w3, deployment, payer.address) == before[payer.address] - cumulative
    assert token_balance(w3, deployment, node_account.address) == before[node_account.address] + cumulative - royalty
    assert token_balance(w3, deployment, publisher.address) == before[publisher.address] + royalty
    assert token_balance(w3, deployment, escrow) == before[escrow]
    esc = contract(w3, "PaymentChannels", escrow)
    for who in (payer, node_account, publisher):
        assert esc.functions.earnings(deployment.token, who.address).call() == 0


def _claim_leftovers(w3: Web3, deployment: Deployment, token: str, *accounts: LocalAccount) -> None:
    """Earnings earlier tests on this session's chain left unclaimed: claimed now, so this test's worker claims
    only what this test earns."""
    esc = contract(w3, "PaymentChannels", deployment.payment_channels)
    for acct in accounts:
        if esc.functions.earnings(Web3.to_checksum_address(token), acct.address).call():
            ChannelClient(w3, deployment, acct).claim_earnings(token)


def gas_spent(w3: Web3, address: str, from_block: int) -> int:
    """Wei an account paid for gas in blocks after `from_block`."""
    total = 0
    for n in range(from_block + 1, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(n, full_transactions=True)["transactions"]:
            if tx["from"] == address:
                r = w3.eth.get_transaction_receipt(tx["hash"])
                total += r["gasUsed"] * r["effectiveGasPrice"]
    return total


def test_native_eth_channel_exact_with_gas_accounted(
    w3: Web3, deployment: Deployment, channels: ChannelClient, payer: LocalAccount, node_account: LocalAccount,
    session_key: LocalAccount, tmp_path,
) -> None:
    node = node_payments(w3, deployment, node_account, tmp_path)
    _claim_leftovers(w3, deployment, ETH, node_account)
    start_block = w3.eth.block_number
    start_payer = w3.eth.get_balance(payer.address)
    start_node = w3.eth.get_balance(node_account.address)
    paid = 123456789 * 10**9

    channel_id = channels.open(node_account.address, 10**18, session_key=session_key.address, token=ETH)
    for amount in (10**15, 3 * 10**15, paid):
        node.verifier.accept(channels.sign_voucher(session_key, channel_id, amount))
    assert [a.action for a in node.worker.run_once(flush=True)] == ["settle"]  # and claims the node's share
    channels.request_close(channel_id)
    assert [a.action for a in node.worker.run_once()] == ["close"]  # notices the request, refunds the rest
    assert channels.get(channel_id).finalized
    channels.claim_refund(channel_id)

    assert w3.eth.get_balance(payer.address) == start_payer - paid - gas_spent(w3, payer.address, start_block)
    assert w3.eth.get_balance(node_account.address) == start_node + paid - gas_spent(
        w3, node_account.address, start_block)
