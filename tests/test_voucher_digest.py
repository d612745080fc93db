"""One voucher definition: Python's digest equals the contract's, and Python's signatures settle on-chain."""

from __future__ import annotations

import os

from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_hash.auto import keccak as eth_hash_keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from dcml.client.chain.contracts import contract
from dcml.client.wire import keccak as module
from dcml.client.wire.voucher import UINT128_MAX, VOUCHER_TYPEHASH, VoucherDomain


def test_digest_equals_hash_voucher_on_chain(w3, deployment) -> None:
    escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
    domain = VoucherDomain(deployment.chain_id, deployment.payment_channels)
    assert bytes(escrow.functions.VOUCHER_TYPEHASH().call()) == VOUCHER_TYPEHASH
    for channel_id, amount in ((b"\x00" * 32, 1), (bytes(range(32)), 12345), (b"\xff" * 32, UINT128_MAX)):
        assert bytes(escrow.functions.hashVoucher(channel_id, amount).call()) == domain.digest(channel_id, amount)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(1, UINT128_MAX), st.integers(1, 2**64))
def test_fast_digest_equals_eth_account_encoder(channel_id: bytes, amount: int, chain_id: int) -> None:
    domain = VoucherDomain(chain_id, "0x" + "ab" * 20)
    generic = _hash_eip191_message(encode_typed_data(full_message=domain.typed_data(channel_id, amount)))
    assert domain.digest(channel_id, amount) == generic


def test_python_signed_voucher_settles_on_chain(w3, deployment, channels, node_account, session_key) -> None:
    from dcml.node.payments.chain import ChannelChain

    channel_id = channels.open(node_account.address, 10**6, session_key=session_key.address)
    voucher = channels.sign_voucher(session_key, channel_id, 777)
    ChannelChain(w3, deployment).settle(node_account, channel_id, 777, voucher.signature_bytes)
    assert channels.get(channel_id).settled == 777


def test_keccak_is_ethereums_on_every_block_boundary_and_the_node_gets_the_c_one() -> None:
    for n in (0, 1, 31, 32, 33, 64, 135, 136, 137, 272, 1000):  # 136: keccak-256's rate, in bytes
        data = os.urandom(n)
        assert module.keccak(data) == eth_hash_keccak(data)
    assert module.keccak(b"") == bytes.fromhex("c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470")
    assert module.keccak is not eth_hash_keccak  # the [node] extra brings safe-pysha3: one C call per hash
