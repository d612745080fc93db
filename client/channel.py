"""The payer's side of a payment channel over web3.py: open, top up, request close, withdraw, read.

The wallet that opens a channel names a hot session key (`authorizedSigner`) that signs vouchers,
so the wallet's own key signs only on-chain transactions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from client.contracts import contract
from client.deployment import Deployment
from client.tx import send
from client.voucher import Voucher, VoucherDomain

ZERO_ADDRESS = "0x" + "00" * 20
ETH = ZERO_ADDRESS  # token address for native ETH channels


@dataclass(frozen=True)
class ChannelState:
    """On-chain state of one channel (`getChannel`)."""

    channel_id: bytes
    payer: str
    payee: str
    token: str
    authorized_signer: str
    publisher: str
    publisher_bps: int
    deposit: int
    settled: int
    close_requested_at: int
    finalized: bool

    @property
    def exists(self) -> bool:
        return self.payer != ZERO_ADDRESS

    @property
    def remaining(self) -> int:
        return self.deposit - self.settled


_FIELDS = {
    "payer": "payer",
    "payee": "payee",
    "token": "token",
    "authorizedSigner": "authorized_signer",
    "publisher": "publisher",
    "publisherBps": "publisher_bps",
    "deposit": "deposit",
    "settled": "settled",
    "closeRequestedAt": "close_requested_at",
    "finalized": "finalized",
}


def read_channel(escrow, channel_id: bytes) -> ChannelState:
    """Decode `getChannel` by the ABI's component names, so field order in the struct never matters."""
    names = [c["name"] for c in escrow.get_function_by_name("getChannel").abi["outputs"][0]["components"]]
    raw = dict(zip(names, escrow.functions.getChannel(channel_id).call(), strict=True))
    return ChannelState(channel_id=channel_id, **{py: raw[sol] for sol, py in _FIELDS.items()})


class ChannelClient:
    """Payer operations for one wallet against one deployment."""

    def __init__(self, w3: Web3, deployment: Deployment, wallet: LocalAccount) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.wallet = wallet
        self.escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
        self.registry = contract(w3, "ModelRegistry", deployment.model_registry)
        self.domain = VoucherDomain(deployment.chain_id, deployment.payment_channels)

    def royalty_bps(self, model_id: bytes) -> int:
        return self.registry.functions.terms(model_id).call()[1]

    def open(
        self,
        payee: str,
        deposit: int,
        *,
        session_key: str,
        model_id: bytes = b"\0" * 32,
        token: str | None = None,
        salt: bytes | None = None,
    ) -> bytes:
        """Lock `deposit` for `payee`; returns the channel id. ERC-20 deposits are approved first."""
        token = self.deployment.token if token is None else token
        salt = salt or os.urandom(32)
        bps = self.royalty_bps(model_id)
        payee, token, session_key = (Web3.to_checksum_address(a) for a in (payee, token, session_key))
        value = 0
        if token == ETH:
            value = deposit
        else:
            self._approve(token, deposit)
        receipt = send(
            self.w3,
            self.wallet,
            self.escrow.functions.open(payee, token, deposit, salt, session_key, model_id, bps),
            value=value,
            action="open channel",
        )
        (event,) = self.escrow.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
        return bytes(event["args"]["channelId"])

    def top_up(self, channel_id: bytes, amount: int) -> TxReceipt:
        state = self.get(channel_id)
        value = amount if state.token == ETH else 0
        if state.token != ETH:
            self._approve(state.token, amount)
        return send(self.w3, self.wallet, self.escrow.functions.topUp(channel_id, amount), value=value,
                    action="top up")

    def request_close(self, channel_id: bytes) -> TxReceipt:
        return send(self.w3, self.wallet, self.escrow.functions.requestClose(channel_id), action="request close")

    def withdraw(self, channel_id: bytes) -> TxReceipt:
        return send(self.w3, self.wallet, self.escrow.functions.withdraw(channel_id), action="withdraw")

    def claim_earnings(self, token: str | None = None) -> TxReceipt:
        token = Web3.to_checksum_address(self.deployment.token if token is None else token)
        return send(self.w3, self.wallet, self.escrow.functions.claimEarnings(token), action="claim earnings")

    def get(self, channel_id: bytes) -> ChannelState:
        return read_channel(self.escrow, channel_id)

    def sign_voucher(self, session_key: LocalAccount, channel_id: bytes, cumulative_amount: int) -> Voucher:
        return self.domain.sign(session_key, channel_id, cumulative_amount)

    def _approve(self, token: str, amount: int) -> None:
        erc20 = contract(self.w3, "TestToken", token)
        allowance = erc20.functions.allowance(self.wallet.address, self.escrow.address).call()
        if allowance < amount:
            send(self.w3, self.wallet, erc20.functions.approve(self.escrow.address, amount), action="approve")
