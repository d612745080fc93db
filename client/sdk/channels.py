"""The payment channels one wallet holds with one node, as a `Client` keeps them: the node's terms checked
against the attested key, the deployment and the policy; channels found, opened, funded and closed on chain;
vouchers signed (never lower than one already signed) and kept in the spend store before they leave."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount

from dcml.client.attestation.verify import Policy, VerifiedNode
from dcml.client.chain.channel import ChannelClient, ChannelState
from dcml.client.chain.deployment import Deployment
from dcml.client.sdk.exchange import PaymentError
from dcml.client.sdk.results import NodeError
from dcml.client.sdk.spend_store import SpendStore, StoredChannel, StoredReceipt, Violation
from dcml.client.wire.errors import PaymentReason
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import PAYMENT_REQUIRED, SCHEME, PaymentRequired, PaymentRequirement


class UntrustedTerms(PaymentError):
    """The node's payment terms do not match what this client verified or allows."""

    reason = PaymentReason.UNTRUSTED_TERMS


class InsufficientDeposit(PaymentError):
    """The channel's deposit cannot cover what the node asks and automatic top-up is off."""

    reason = PaymentReason.INSUFFICIENT_DEPOSIT


@dataclass
class LiveChannel:
    """In-process bookkeeping per channel that must not outlive the process."""

    inflight: int = 0
    offered: int = 0  # requests sent with a voucher on the channel and not yet admitted (the node may charge them)
    epoch: int = 0  # bumped whenever a request is offered or admitted on the channel
    uncertain: bool = True  # until a receipt checks exactly, spend by other processes may be unseen


class PayerChannels:
    """Channel bookkeeping of the `Client` (which sets these attributes). Call the verbs from any thread; the
    underscored helpers expect `_lock` held."""

    node_url: str
    wallet: LocalAccount
    deployment: Deployment
    session_key: LocalAccount | None
    policy: Policy
    deposit: int
    max_price_per_token: int | None
    auto_top_up: bool
    chain: ChannelClient
    store: SpendStore
    _http: httpx.Client  # unpaid requests to the node
    _lock: threading.RLock
    _live: dict[str, LiveChannel]
    _checked: set[str]  # stored channels whose on-chain state was checked this process

    def _node(self) -> VerifiedNode:
        """The attested node (attesting it first if needed)."""
        raise NotImplementedError

    def terms(self, model: str) -> PaymentRequirement:
        """Ask the node for its terms for `model` (an unpaid request: answered 402 before any inference)."""
        node = self._node()
        body = {"model": model, "messages": [{"role": "user", "content": "terms?"}], "max_tokens": 1}
        response = self._http.post("/v1/chat/completions", json=body)
        if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
            raise NodeError(response.status_code, None, f"expected a 402 with {PAYMENT_REQUIRED}: is payment "
                            "enabled on this node?")
        return self._check_terms(PaymentRequired.from_header(response.headers[PAYMENT_REQUIRED]), node)

    def open_channel(self, model: str, deposit: int | None = None) -> StoredChannel:
        req = self.terms(model)
        with self._lock:
            return self._open(req, model, deposit or self.deposit)

    def channels(self) -> list[StoredChannel]:
        return self.store.channels(payer=self.wallet.address)

    def channel_state(self, channel_id: str) -> ChannelState:
        return self.chain.get(_b32(channel_id))

    def top_up(self, channel_id: str, amount: int) -> StoredChannel:
        with self._lock:
            self.chain.top_up(_b32(channel_id), amount)
            self.store.update_channel(channel_id, deposit=self.channel_state(channel_id).deposit, status="open")
        return self._stored(channel_id)

    def close_channel(self, channel_id: str) -> StoredChannel:
        """Ask to close: the node settles what it holds and refunds the rest, or `withdraw` after the grace period."""
        with self._lock:
            self.chain.request_close(_b32(channel_id))
            self.store.update_channel(channel_id, status="closing")
        return self._stored(channel_id)

    def withdraw(self, channel_id: str) -> StoredChannel:
        """After the grace period (if the node did not close it first): refund the unsettled deposit."""
        with self._lock:
            state = self.channel_state(channel_id)
            if not state.finalized:
                self.chain.withdraw(_b32(channel_id))
            if not state.refunded and state.deposit > state.settled:
                self.chain.claim_refund(_b32(channel_id))  # the refund waits in the channel's record
            self.store.update_channel(channel_id, status="closed")
        return self._stored(channel_id)

    def receipts(self, channel_id: str | None = None) -> list[StoredReceipt]:
        return self.store.receipts(channel_id)

    def violations(self) -> list[Violation]:
        return self.store.violations()

    def _stored(self, channel_id: str) -> StoredChannel:
        ch = self.store.channel(channel_id)
        if ch is None:
            raise PaymentError(f"channel {channel_id} is not in the spend store {self.store.path}")
        return ch

    def _check_terms(self, required: PaymentRequired, node: VerifiedNode) -> PaymentRequirement:
        req = next((r for r in required.accepts if isinstance(r, PaymentRequirement)), None)
        if req is None:
            raise UntrustedTerms(f"the node offers no '{SCHEME}' payment scheme; this client pays only through "
                                 "payment channels")
        dep = self.deployment
        if req.pay_to.lower() != node.signing_address.lower():
            raise UntrustedTerms(f"the node asks to be paid at {req.pay_to}, not at its attested key "
                                 f"{node.signing_address}: refusing to pay an unattested address")
        if req.extra.escrow.lower() != dep.payment_channels.lower() or req.chain_id != dep.chain_id:
            raise UntrustedTerms(f"the node names escrow {req.extra.escrow} on chain {req.chain_id}; your deployment "
                                 f"is {dep.payment_channels} on {dep.chain_id}: use the node's deployment file")
        highest = max(req.extra.price_per_input_token, req.extra.price_per_output_token)
        if self.max_price_per_token is not None and highest > self.max_price_per_token:
            raise UntrustedTerms(f"the node charges {highest} wei per token, above your max_price_per_token "
                                 f"{self.max_price_per_token}; raise the limit or pick another node")
        return req

    def _check_publisher(self, model: str, model_id: bytes) -> int:
        """The registry's publisher and royalty for `model_id` against our policy (`Policy.models`), before any
        money is locked: a squatter who registered the id first would otherwise take the royalty."""
        publisher, bps = self.chain.royalty_terms(model_id)
        trust = self.policy.models.get(model)
        if trust is None:
            if bps:
                raise UntrustedTerms(f"model {model} (0x{model_id.hex()}) pays a {bps} bps royalty to {publisher}, "
                                     f"whom your policy does not name: add [models.\"{model}\"] with its publisher "
                                     "and max_royalty_bps if you trust it (model ids can be squatted)")
            return bps
        if trust.publisher is not None and publisher.lower() != trust.publisher.lower():
            raise UntrustedTerms(f"model {model} (0x{model_id.hex()}) is registered to {publisher}, not to the "
                                 f"publisher your policy names ({trust.publisher}): a squatted model id")
        if bps > trust.max_royalty_bps:
            raise UntrustedTerms(f"model {model} pays a {bps} bps royalty, above your max_royalty_bps "
                                 f"{trust.max_royalty_bps}")
        return bps  # the open reverts if it changes before the channel is opened

    def _open(self, req: PaymentRequirement, model: str, deposit: int) -> StoredChannel:
        session = self.session_key or Account.create()
        t = req.extra
        model_id = bytes.fromhex(t.model_id.removeprefix("0x"))
        bps = self._check_publisher(model, model_id)
        channel_id = self.chain.open(req.pay_to, deposit, session_key=session.address, model_id=model_id,
                                     token=req.asset, expected_bps=bps)
        stored = StoredChannel(
            channel_id="0x" + channel_id.hex(), node_url=self.node_url, model=model, model_id=t.model_id.lower(),
            payer=self.wallet.address, payee=req.pay_to, escrow=t.escrow, chain_id=req.chain_id, token=req.asset,
            session_address=session.address, deposit=deposit, accepted=0, spent=0, price_in=t.price_per_input_token,
            price_out=t.price_per_output_token, prepay=t.prepay, credit_window=t.credit_window, status="open",
            opened_at=time.time())
        self.store.add_channel(stored, wallet=self.wallet, session_key=session)
        self._checked.add(stored.channel_id)
        self._live[stored.channel_id] = LiveChannel(uncertain=False)  # new: we see every receipt from here on
        return stored

    def _usable(self, model: str) -> StoredChannel | None:
        """The newest open stored channel for this node and model, checked once on-chain per process."""
        node = self._node()
        while True:
            ch = self.store.find_open(payer=self.wallet.address, payee=node.signing_address,
                                      escrow=self.deployment.payment_channels, chain_id=self.deployment.chain_id,
                                      model=model)
            if ch is None or ch.channel_id in self._checked:
                return ch
            state = self.channel_state(ch.channel_id)
            self._checked.add(ch.channel_id)
            if state.finalized or state.close_requested_at:
                self.store.update_channel(ch.channel_id, status="closed" if state.finalized else "closing")
                continue
            if state.deposit != ch.deposit:
                self.store.update_channel(ch.channel_id, deposit=state.deposit)
            return self.store.channel(ch.channel_id)

    def _sign(self, ch: StoredChannel, amount: int) -> Voucher:
        """A voucher for at least `amount` (never re-signing lower), topping up when the deposit is short."""
        highest = self.store.highest_voucher(ch.channel_id)
        if highest is not None and highest[0] >= amount:
            return Voucher(channel_id=ch.channel_id, cumulative_amount=highest[0], signature=highest[1])
        if amount > ch.deposit:
            if not self.auto_top_up:
                raise InsufficientDeposit(f"the node asks for {amount} wei cumulative but channel {ch.channel_id} "
                                          f"holds {ch.deposit}: `dcml channel topup` or enable auto_top_up")
            extra = max(self.deposit, amount - ch.deposit)
            self.chain.top_up(_b32(ch.channel_id), extra)
            self.store.update_channel(ch.channel_id, deposit=ch.deposit + extra)
        key = self.store.session_key(ch.channel_id, self.wallet)
        voucher = self.chain.sign_voucher(key, _b32(ch.channel_id), amount)
        self.store.record_voucher(ch.channel_id, amount, voucher.signature)  # before it leaves the process
        return voucher

    def _release(self, ch: StoredChannel, amount: int) -> Voucher:
        """A voucher for exactly `amount`, below the highest one (which stays the channel's current voucher)."""
        key = self.store.session_key(ch.channel_id, self.wallet)
        voucher = self.chain.sign_voucher(key, _b32(ch.channel_id), amount)
        self.store.record_voucher(ch.channel_id, amount, voucher.signature)  # evidence; `accepted` stays the highest
        return voucher

    def has_channel(self, model: str) -> bool:
        """Whether an open channel of ours can pay for `model` now (else `open_channel` first)."""
        with self._lock:
            return self._usable(model) is not None


def _b32(channel_id: str) -> bytes:
    raw = bytes.fromhex(channel_id.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError(f"channel id {channel_id} is not 32 bytes of hex")
    return raw

