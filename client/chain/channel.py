"""The payer's side of a payment channel over web3.py: open, top up, request close, withdraw, read.

The wallet that opens a channel names a hot session key (`authorizedSigner`) that signs vouchers,
so the wallet's own key signs only on-chain transactions.

The escrow stores only what changes (deposit, settled, close request, finalized, refunded); a channel's fixed
parameters are re-derived from calldata and checked against its id, which saves most of the gas.
So callers need those parameters: they come from the `ChannelOpened` event, are checked here against
the id (never trusting the RPC), and are cached for good since they never change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from eth_abi import encode
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD
from web3.types import TxReceipt

from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.tx import send
from dcml.client.wire.errors import ChainError, PaymentReason
from dcml.client.wire.keccak import keccak
from dcml.client.wire.voucher import Voucher, VoucherDomain

ZERO_ADDRESS = "0x" + "00" * 20
ETH = ZERO_ADDRESS  # token address for native ETH channels
_ID_TYPES = ["address", "address", "address", "bytes32", "address", "bytes32", "address", "uint16", "address",
             "uint256"]


class UnknownChannel(ChainError, LookupError):
    """No channel with this id was opened on this escrow."""

    reason = PaymentReason.UNKNOWN_CHANNEL


@dataclass(frozen=True)
class ChannelParams:
    """A channel's fixed terms, in the order the contract hashes them into the channel id."""

    payer: str
    payee: str
    token: str
    salt: bytes
    authorized_signer: str
    model_id: bytes
    publisher: str
    publisher_bps: int

    def channel_id(self, escrow: str, chain_id: int) -> bytes:
        return keccak(encode(_ID_TYPES, [self.payer, self.payee, self.token, self.salt, self.authorized_signer,
                                         self.model_id, self.publisher, self.publisher_bps, escrow, chain_id]))

    def as_struct(self) -> tuple:
        """The `ChannelParams` calldata tuple."""
        return (Web3.to_checksum_address(self.payer), Web3.to_checksum_address(self.payee),
                Web3.to_checksum_address(self.token), self.salt, Web3.to_checksum_address(self.authorized_signer),
                self.model_id, Web3.to_checksum_address(self.publisher), self.publisher_bps)


@dataclass(frozen=True)
class ChannelState:
    """A channel as the chain has it now: fixed terms plus `getChannel`'s mutable state."""

    channel_id: bytes
    params: ChannelParams
    deposit: int
    settled: int
    close_requested_at: int
    finalized: bool
    refunded: bool = False  # the payer claimed its refund (`claimRefund`) after finalization

    @property
    def payer(self) -> str:
        return self.params.payer

    @property
    def payee(self) -> str:
        return self.params.payee

    @property
    def token(self) -> str:
        return self.params.token

    @property
    def authorized_signer(self) -> str:
        return self.params.authorized_signer

    @property
    def remaining(self) -> int:
        return self.deposit - self.settled


def find_params(escrow: Contract, channel_id: bytes, *, chain_id: int, from_block: int = 0) -> ChannelParams:
    """A channel's terms from its `ChannelOpened` event, checked against the id (a lying RPC fails here)."""
    logs = escrow.events.ChannelOpened.get_logs(from_block=from_block, argument_filters={"channelId": channel_id})
    for log in logs:
        a = log["args"]
        params = ChannelParams(a["payer"], a["payee"], a["token"], bytes(a["salt"]), a["authorizedSigner"],
                               bytes(a["modelId"]), a["publisher"], a["publisherBps"])
        if params.channel_id(escrow.address, chain_id) == channel_id:
            return params
    raise UnknownChannel(f"channel 0x{channel_id.hex()} was never opened on escrow {escrow.address}")


def read_state(escrow: Contract, channel_id: bytes, params: ChannelParams) -> ChannelState:
    """`getChannel`, decoded by the ABI's component names so struct field order never matters."""
    names = [c["name"] for c in escrow.get_function_by_name("getChannel").abi["outputs"][0]["components"]]
    raw = dict(zip(names, escrow.functions.getChannel(channel_id).call(), strict=True))
    return ChannelState(channel_id, params, raw["deposit"], raw["settled"], raw["closeRequestedAt"],
                        raw["finalized"], raw["refunded"])


def batch_voucher(params: ChannelParams, cumulative_amount: int, signature: bytes) -> tuple:
    """A `BatchVoucher` calldata tuple for `settleBatch`: the channel's own terms and the 65-byte (r, s, v)
    signature in its EIP-2098 compact form (r, vs), `vs = (v - 27) << 255 | s`."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise ValueError("a batch voucher needs a 65-byte ECDSA signature with v in {27, 28}")
    s = int.from_bytes(signature[32:64], "big")
    vs = ((signature[64] - 27) << 255) | s
    return (Web3.to_checksum_address(params.payer), params.salt, Web3.to_checksum_address(params.authorized_signer),
            cumulative_amount, signature[:32], vs.to_bytes(32, "big"))


class ChannelBook:
    """Channel terms by id for one escrow: learned at open or from the chain, cached forever."""

    def __init__(self, escrow: Contract, deployment: Deployment) -> None:
        self.escrow = escrow
        self.deployment = deployment
        self._params: dict[bytes, ChannelParams] = {}

    def add(self, channel_id: bytes, params: ChannelParams) -> None:
        self._params[channel_id] = params

    def known(self, channel_id: bytes) -> bool:
        return channel_id in self._params

    def params(self, channel_id: bytes) -> ChannelParams:
        found = self._params.get(channel_id)
        if found is None:
            found = find_params(self.escrow, channel_id, chain_id=self.deployment.chain_id,
                                from_block=self.deployment.start_block)
            self._params[channel_id] = found
        return found

    def state(self, channel_id: bytes) -> ChannelState:
        return read_state(self.escrow, channel_id, self.params(channel_id))


class ChannelClient:
    """Payer operations for one wallet against one deployment."""

    def __init__(self, w3: Web3, deployment: Deployment, wallet: LocalAccount) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.wallet = wallet
        self.escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
        self.registry = contract(w3, "ModelRegistry", deployment.model_registry)
        self.domain = VoucherDomain(deployment.chain_id, deployment.payment_channels)
        self.book = ChannelBook(self.escrow, deployment)

    def royalty_terms(self, model_id: bytes) -> tuple[str, int]:
        publisher, bps = self.registry.functions.terms(model_id).call()
        return publisher, bps

    def open(
        self,
        payee: str,
        deposit: int,
        *,
        session_key: str,
        model_id: bytes = b"\0" * 32,
        token: str | None = None,
        salt: bytes | None = None,
        expected_bps: int | None = None,
    ) -> bytes:
        """Lock `deposit` for `payee`; returns the channel id. ERC-20 deposits are approved first. The open
        reverts unless the model's royalty is still `expected_bps` (default: what the registry says now)."""
        token = self.deployment.token if token is None else token
        salt = salt or os.urandom(32)
        bps = self.royalty_terms(model_id)[1] if expected_bps is None else expected_bps
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
        a = event["args"]
        channel_id = bytes(a["channelId"])
        self.book.add(channel_id, ChannelParams(a["payer"], a["payee"], a["token"], bytes(a["salt"]),
                                                a["authorizedSigner"], bytes(a["modelId"]), a["publisher"],
                                                a["publisherBps"]))
        return channel_id

    def top_up(self, channel_id: bytes, amount: int) -> TxReceipt:
        params = self.book.params(channel_id)
        if params.token != ETH:
            self._approve(params.token, amount)
        return send(self.w3, self.wallet, self.escrow.functions.topUp(params.as_struct(), amount),
                    value=amount if params.token == ETH else 0, action="top up")

    def request_close(self, channel_id: bytes) -> TxReceipt:
        fn = self.escrow.functions.requestClose(self.book.params(channel_id).as_struct())
        return send(self.w3, self.wallet, fn, action="request close")

    def withdraw(self, channel_id: bytes) -> TxReceipt:
        fn = self.escrow.functions.withdraw(self.book.params(channel_id).as_struct())
        return send(self.w3, self.wallet, fn, action="withdraw")

    def claim_refund(self, channel_id: bytes) -> TxReceipt:
        """The payer's refund (`deposit - settled`) of a finalized channel, paid to this wallet."""
        fn = self.escrow.functions.claimRefund(self.book.params(channel_id).as_struct())
        return send(self.w3, self.wallet, fn, action="claim refund")

    def claim_earnings(self, token: str | None = None) -> TxReceipt:
        token = Web3.to_checksum_address(self.deployment.token if token is None else token)
        return send(self.w3, self.wallet, self.escrow.functions.claimEarnings(token), action="claim earnings")

    def get(self, channel_id: bytes) -> ChannelState:
        return self.book.state(channel_id)

    def sign_voucher(self, session_key: LocalAccount, channel_id: bytes, cumulative_amount: int) -> Voucher:
        return self.domain.sign(session_key, channel_id, cumulative_amount)

    def _approve(self, token: str, amount: int) -> None:
        erc20 = contract(self.w3, "TestToken", token)
        allowance = erc20.functions.allowance(self.wallet.address, self.escrow.address).call()
        if allowance < amount:
            send(self.w3, self.wallet, erc20.functions.approve(self.escrow.address, amount), action="approve")
