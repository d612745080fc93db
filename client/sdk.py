"""The client SDK: attest a node, pay it per token through a payment channel, verify every answer.

    client = Client("http://node:8080", wallet, deployment=Deployment.load(".devnet/deployment.json"),
                    deposit=10**18, allow_simulated=True)
    print(client.chat([{"role": "user", "content": "hi"}], "dcml-demo").text)
    oai = client.openai()          # the official SDK, paying and verifying through PayingTransport

Trust: the node's keys come only from its verified attestation; a channel pays only that attested
signing address; every acceptance and receipt must be signed by it and commit to the exact bytes sent
and received, at the advertised prices. Everything signed or verified is kept in the spend store.

Sealing: every inference request is sealed end to end to the node's attested HPKE key (`client.e2e`), and
its answer, acceptance and receipt are opened here; pass ``seal=False`` to send prompts in clear (opt out).

SLA: with a deployment that names an SLA court, acceptances and receipts are verified under the court's
EIP-712 domain and kept as evidence. Each receipt is checked against the node's published terms; a broken
term does not fail the call (the answer is valid and paid): it shows in `ChatResult.sla_broken` and becomes a
pending claim in `client.disputes` (`dcml disputes open` sends it). An acceptance whose receipt never came is
disputed after its deadline by `client.disputes.open_due()`, or automatically with ``auto_dispute=True``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from client.attestation import AttestationDocument, Policy, VerifiedNode, verify_attestation
from client.channel import ChannelClient, ChannelState
from client.contracts import contract
from client.deployment import Deployment
from client.disputes import Disputes
from client.paying_transport import (
    EXCHANGE_EXTENSION,
    AsyncPayingTransport,
    Exchange,
    PayingTransport,
    PaymentError,
    PaymentRejected,
    ReceiptViolation,
)
from client.receipts import (
    DEFAULT_DOMAIN,
    Price,
    ReceiptDomain,
    ReceiptError,
    SignedAcceptance,
    SignedReceipt,
    request_hash,
    verify_acceptance,
    verify_receipt,
)
from client.sla import Broken
from client.spend_store import SpendStore, StoredChannel, StoredReceipt, Violation
from client.voucher import Voucher
from client.x402 import (
    ACCEPTANCE_HEADER,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    SCHEME,
    NeedVoucher,
    PaymentRequired,
    PaymentRequirement,
    PaymentResponse,
)

__all__ = ["ChatResult", "ChatStream", "Client", "InsufficientDeposit", "NodeError", "PaymentError",
           "PaymentRejected", "ReceiptViolation", "UntrustedTerms"]

log = logging.getLogger("dcml.client")
# A node signs acceptances only under SLA terms in force by its clock; ours may differ by this much.
TERMS_CLOCK_MARGIN_S = 10

# Codes after which the channel we named can never admit a request: open another one.
_DEAD_CHANNEL = {"unknown_channel", "channel_finalized", "channel_closing", "wrong_payee", "wrong_model",
                 "wrong_token"}
# Receipt checks that fail only after the signature, request hash and channel checked out: such a receipt
# still answers a no-response dispute on-chain, so its acceptance must not be disputed.
_SIGNED_FOR_THE_REQUEST = {"response_hash_mismatch", "cost_mismatch", "cumulative_mismatch", "accepted_at_skew"}


class UntrustedTerms(PaymentError):
    """The node's payment terms do not match what this client verified or allows."""


class InsufficientDeposit(PaymentError):
    """The channel's deposit cannot cover what the node asks and automatic top-up is off."""


class NodeError(Exception):
    """The node answered with an error; `status` and `code` are the node's."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"node answered {status}{f' ({code})' if code else ''}: {message}")
        self.status, self.code = status, code


def _node_error(response: httpx.Response) -> NodeError:
    try:
        err = response.json()["error"]
        return NodeError(response.status_code, err.get("code"), str(err.get("message")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return NodeError(response.status_code, None, response.text[:300])


@dataclass(frozen=True)
class ChatResult:
    text: str
    usage: dict[str, int] | None
    receipt: SignedReceipt | None
    cost: int  # wei, from the verified receipt
    channel_id: str | None
    response: dict[str, Any] | None = None  # the full JSON body (non-streamed)
    sla_broken: Broken = Broken.NONE  # terms the receipt breaks: a claim is pending in `Client.disputes`
    sealed: bool = False  # the request and its answer travelled sealed end to end


@dataclass
class ChatStream:
    """Iterate for text deltas; `result` is set once the stream ended and its receipt verified."""

    _client: httpx.Client
    _path: str
    _body: bytes
    result: ChatResult | None = None
    _parts: list[str] = field(default_factory=list)
    _sla_of: Callable[[SignedReceipt | None], Broken] | None = None

    def __iter__(self) -> Iterator[str]:
        usage = None
        with self._client.stream("POST", self._path, content=self._body,
                                 headers={"Content-Type": "application/json"}) as response:
            if response.status_code >= 400:
                response.read()
                raise _node_error(response)
            exchange: Exchange = response.extensions[EXCHANGE_EXTENSION]
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    continue
                obj = json.loads(payload)
                if obj.get("error"):
                    raise NodeError(200, obj["error"].get("code"), str(obj["error"].get("message")))
                usage = obj.get("usage") or usage
                for choice in obj.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if delta:
                        self._parts.append(delta)
                        yield delta
        broken = self._sla_of(exchange.receipt) if self._sla_of else Broken.NONE
        self.result = ChatResult("".join(self._parts), usage, exchange.receipt, exchange.cost, exchange.channel_id,
                                 sla_broken=broken, sealed=exchange.sealed)


@dataclass
class _Live:
    """In-process bookkeeping per channel that must not outlive the process."""

    inflight: int = 0
    offered: int = 0  # requests sent with a voucher on the channel and not yet admitted (the node may charge them)
    epoch: int = 0  # bumped whenever a request is offered or admitted on the channel
    uncertain: bool = True  # until a receipt checks exactly, spend by other processes may be unseen


class Client:
    """Pays one node for inference. Thread-safe; channel and voucher decisions are serialized.

    `receipt_domain` defaults to the deployment's SLA court (else `DEFAULT_DOMAIN`), as nodes sign.
    `check_sla` checks each receipt against the node's published terms; `auto_dispute` runs a daemon thread
    that every `dispute_interval_s` opens due disputes and finalizes unanswered ones (see `client.disputes`).
    Dispute transactions come from the same wallet as channel top-ups, so they hold the same lock while they
    are mined (rare: only after a broken term or a missing answer).
    """

    def __init__(
        self,
        node_url: str,
        wallet: LocalAccount,
        *,
        deployment: Deployment,
        session_key: LocalAccount | None = None,
        policy: Policy | None = None,
        allow_simulated: bool = False,
        store: str | Path = "~/.dcml/client.sqlite",
        deposit: int,
        receipt_domain: ReceiptDomain | None = None,
        max_price_per_token: int | None = None,
        auto_top_up: bool = True,
        timeout: float = 120.0,
        w3: Web3 | None = None,
        check_sla: bool = True,
        auto_dispute: bool = False,
        dispute_interval_s: float = 30.0,
        max_clock_skew_s: float = 300.0,
        seal: bool = True,
    ) -> None:
        if deposit <= 0:
            raise ValueError("deposit must be a positive amount of wei")
        self.node_url = node_url.rstrip("/")
        self.wallet = wallet
        self.deployment = deployment
        self.session_key = session_key
        self.policy = policy or Policy()
        self.allow_simulated = allow_simulated
        self.deposit = deposit
        if receipt_domain is None:
            receipt_domain = (ReceiptDomain(deployment.chain_id, deployment.sla_court) if deployment.sla_court
                              else DEFAULT_DOMAIN)
        self.receipt_domain = receipt_domain
        self.check_sla = check_sla
        self.seal = seal  # seal requests to the attested HPKE key (end to end); False sends them in clear
        # A node's signed acceptedAt picks the SLA terms a request is judged by: one far from our clock could
        # move the request under older, laxer terms (or before any), so it is a violation.
        self.max_clock_skew_s = max_clock_skew_s
        self.dispute_interval_s = dispute_interval_s
        self.max_price_per_token = max_price_per_token
        self.auto_top_up = auto_top_up
        self.timeout = timeout
        self.w3 = w3 or Web3(Web3.HTTPProvider(deployment.rpc_url, request_kwargs={"timeout": 30}))
        self.chain = ChannelClient(self.w3, deployment, wallet)
        self.store = SpendStore(store)
        self.node: VerifiedNode | None = None
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._checked: set[str] = set()  # stored channels whose on-chain state was checked this process
        self._unbonding: int | None = None  # NodeRegistry.unbondingDelay (immutable), read once
        self._http = httpx.Client(base_url=self.node_url, timeout=timeout)
        self._paying = httpx.Client(base_url=self.node_url, timeout=timeout, transport=PayingTransport(self))
        self._disputes: Disputes | None = None
        self._answering: set[str] = set()  # request hashes admitted whose answer is still arriving
        self._stop = threading.Event()
        self._disputer: threading.Thread | None = None
        if auto_dispute:
            self.disputes  # noqa: B018 -- fails now, not in the thread, when the deployment has no court
            self._disputer = threading.Thread(target=self._dispute_loop, name="dcml-disputes", daemon=True)
            self._disputer.start()

    @staticmethod
    def discover(deployment: Deployment, bootstrap: list[str], model: str | None = None, **kwargs: Any) -> list:
        """See `client.sdk.discover`: verified, ranked offers for `model` from the overlay."""
        return discover(deployment, bootstrap, model, **kwargs)

    def close(self) -> None:
        self._stop.set()
        if self._disputer is not None:
            self._disputer.join(timeout=30)  # a transaction in flight finishes, so its outcome is recorded
        self._paying.close()
        self._http.close()
        self.store.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- SLA disputes ----------------------------------------------------------------------------

    @property
    def disputes(self) -> Disputes:
        """Breach claims and no-response disputes of this wallet (`client.disputes.Disputes`); needs a court."""
        with self._lock:
            if self._disputes is None:
                # tx_lock: disputes are sent from the wallet that also tops up channels here (one nonce sequence)
                self._disputes = Disputes(self.w3, self.deployment, self.wallet, self.store,
                                          domain=self.receipt_domain, tx_lock=self._lock,
                                          answering=self._answering.__contains__)
            return self._disputes

    def _dispute_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.disputes.open_due()
                self.disputes.finalize_due()
            except Exception:
                log.exception("automatic disputes failed; retrying in %s s", self.dispute_interval_s)
            self._stop.wait(self.dispute_interval_s)

    def _sla_of(self, signed: SignedReceipt | None) -> Broken:
        claim = self.store.breach_claim(signed.receipt.receipt_id) if signed is not None else None
        return Broken(claim.broken) if claim is not None else Broken.NONE

    def _unbonding_delay(self) -> int:
        """The registry's unbonding delay (0 without a registry or on a failed read: no check)."""
        if self._unbonding is None and self.deployment.node_registry:
            try:
                self._unbonding = contract(self.w3, "NodeRegistry", self.deployment.node_registry
                                           ).functions.unbondingDelay().call()
            except Exception as exc:
                log.warning("could not read the registry's unbonding delay: %s", exc)
                return 0
        return self._unbonding or 0

    def _terms_in_force(self, node_address: str, model_id: str, at: float) -> bool:
        """Whether the node has SLA terms in force for `model_id` at our time `at`, less a margin for clocks
        (nodes sign acceptances only under terms in force). No court, or a failed chain read: assume it has."""
        if not self.deployment.sla_court:
            return False
        try:
            return self.disputes.terms_at(node_address, model_id, int(at) - TERMS_CLOCK_MARGIN_S) is not None
        except Exception as exc:
            log.warning("could not read the node's SLA terms: %s", exc)
            return True

    def _check_sla(self, exchange: Exchange) -> None:
        """The receipt against the node's terms; never fails the call: a broken term is a claim, not an error,
        and a failed chain read only skips the check."""
        signed = exchange.receipt
        if not (self.check_sla and self.deployment.sla_court and signed is not None and exchange.channel_id):
            return
        try:
            self.disputes.check_receipt(signed, node_address=self._node().signing_address, node_url=self.node_url)
        except Exception as exc:
            log.warning("SLA check of receipt %s skipped: %s", signed.receipt.receipt_id, exc)

    # -- attestation -----------------------------------------------------------------------------

    def attest(self) -> VerifiedNode:
        """Fetch and verify the node's attestation with a fresh nonce; remembers the attested keys."""
        nonce = os.urandom(32)
        try:
            response = self._http.get("/v1/attestation", params={"nonce": nonce.hex()})
        except httpx.HTTPError as exc:
            raise NodeError(0, "unreachable", f"cannot reach {self.node_url}: {exc}") from exc
        if response.status_code != 200:
            raise _node_error(response)
        doc = AttestationDocument.model_validate(response.json())
        node = verify_attestation(doc, nonce=nonce, policy=self.policy, allow_simulated=self.allow_simulated)
        with self._lock:
            self.node = node
        return node

    def _node(self) -> VerifiedNode:
        with self._lock:
            if self.node is None:
                self.attest()
            assert self.node is not None
            return self.node

    # -- the OpenAI-compatible calls -------------------------------------------------------------

    def chat(self, messages: list[dict[str, Any]], model: str, *, stream: bool = False,
             **params: Any) -> ChatResult | ChatStream:
        return self._call("/v1/chat/completions", {"model": model, "messages": messages, **params}, stream)

    def complete(self, prompt: str, model: str, *, stream: bool = False, **params: Any) -> ChatResult | ChatStream:
        return self._call("/v1/completions", {"model": model, "prompt": prompt, **params}, stream)

    def _call(self, path: str, request: dict[str, Any], stream: bool) -> ChatResult | ChatStream:
        if stream:
            request = {"stream": True, "stream_options": {"include_usage": True}, **request}
            return ChatStream(self._paying, path, json.dumps(request).encode(), _sla_of=self._sla_of)
        response = self._paying.post(path, content=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        if response.status_code >= 400:
            raise _node_error(response)
        exchange: Exchange = response.extensions[EXCHANGE_EXTENSION]
        data = response.json()
        choice = (data.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        return ChatResult(text, data.get("usage"), exchange.receipt, exchange.cost, exchange.channel_id, data,
                          sla_broken=self._sla_of(exchange.receipt), sealed=exchange.sealed)

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """The official client, paying and verifying through this Client."""
        http = httpx.Client(transport=PayingTransport(self), timeout=self.timeout)
        return openai.OpenAI(base_url=self.node_url + "/v1", api_key="dcml", http_client=http, **kwargs)

    def async_openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=AsyncPayingTransport(self), timeout=self.timeout)
        return openai.AsyncOpenAI(base_url=self.node_url + "/v1", api_key="dcml", http_client=http, **kwargs)

    # -- channels --------------------------------------------------------------------------------

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
        self._live[stored.channel_id] = _Live(uncertain=False)  # new: we see every receipt from here on
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

    # -- Payer: called by the paying transports ---------------------------------------------------

    def has_channel(self, model: str) -> bool:
        """Whether an open channel of ours can pay for `model` now (else `open_channel` first)."""
        with self._lock:
            return self._usable(model) is not None

    def prepare(self, model: str, exchange: Exchange) -> Voucher | None:
        with self._lock:
            ch = self._usable(model)
            if ch is None:
                return None
            highest = self.store.highest_voucher(ch.channel_id)
            if highest is None:
                return None
            return self._offer(exchange, Voucher(channel_id=ch.channel_id, cumulative_amount=highest[0],
                                                 signature=highest[1]))

    def _offer(self, exchange: Exchange, voucher: Voucher) -> Voucher:
        """Count a request sent with a voucher on a channel: from then on the node may charge it there, so the
        channel is not ours alone (`_ceiling`, `_headroom`). Call with the lock held."""
        channel = voucher.channel_id.lower()
        if exchange.offered != channel:
            self._unoffer(exchange)
            live = self._live.setdefault(channel, _Live())
            live.offered += 1
            live.epoch += 1
            exchange.offered = channel
        return voucher

    def _unoffer(self, exchange: Exchange) -> None:
        if exchange.offered is not None:
            live = self._live.get(exchange.offered)
            if live is not None:
                live.offered = max(0, live.offered - 1)
            exchange.offered = None

    def on_payment_required(self, required: PaymentRequired, exchange: Exchange, sent: Voucher | None) -> Voucher:
        req = self._check_terms(required, self._node())
        code = required.error or "payment_required"
        if sent is not None and code == "channel_unconfirmed":  # the node waits for more blocks on the opening
            time.sleep(1.0)
            with self._lock:
                return self._offer(exchange, sent)
        with self._lock:
            if sent is not None and code in _DEAD_CHANNEL:
                self.store.update_channel(sent.channel_id, status="closed")
            elif sent is not None and code == "not_increasing":
                # A concurrent request of ours got a higher voucher to the node first: name the channel with it.
                highest = self.store.highest_voucher(sent.channel_id)
                if highest is None or highest[0] <= sent.cumulative_amount:
                    raise PaymentRejected(code, f"{required.message or 'voucher refused'} (channel {sent.channel_id})")
                return self._offer(exchange, Voucher(channel_id=sent.channel_id, cumulative_amount=highest[0],
                                                     signature=highest[1]))
            elif sent is not None and code not in ("insufficient_funds", "payment_required"):
                raise PaymentRejected(code, f"{required.message or 'voucher refused'} (channel {sent.channel_id})")
            ch = self._usable(exchange.model)
            if ch is None:
                ch = self._open(req, exchange.model, self.deposit)
            t = req.extra
            if (t.price_per_input_token, t.price_per_output_token) != (ch.price_in, ch.price_out):
                self.store.update_channel(ch.channel_id, price_in=t.price_per_input_token,
                                          price_out=t.price_per_output_token, prepay=t.prepay,
                                          credit_window=t.credit_window)
            if required.required_cumulative is not None:
                amount = required.required_cumulative + self._headroom(exchange, ch.channel_id,
                                                                       t.price_per_output_token)
            else:  # a fresh voucher names the channel; the node's next 402 gives the exact amount
                amount = max(ch.accepted, ch.spent + max(t.prepay, 1))
            if sent is not None and amount <= sent.cumulative_amount and sent.channel_id == ch.channel_id:
                raise PaymentRejected(code, f"the node asks for {amount} wei cumulative but already holds "
                                      f"{sent.cumulative_amount}: {required.message}")
            return self._offer(exchange, self._sign(self._stored(ch.channel_id), amount))

    def _headroom(self, exchange: Exchange, channel_id: str, price_out: int) -> int:
        """Extra to sign on a 402 while other requests of ours use the channel: their streams spend what the node
        asked for during our round trip, so an exact voucher would always arrive stale. The extra is this request's
        own output at most (max_tokens x price, what a non-streamed request reserves), which its answer spends:
        with every answer run to max_tokens the vouchers still equal the receipts; one that stops early leaves
        the rest paid ahead on the channel, for the next request."""
        live = self._live.get(channel_id, _Live())
        if live.inflight + live.offered - (exchange.offered == channel_id) == 0:
            return 0
        try:
            body = json.loads(exchange.request_body)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        except (ValueError, AttributeError):
            return 0
        return max_tokens * price_out if isinstance(max_tokens, int) and max_tokens > 0 else 0

    def seal_key(self) -> bytes | None:
        return self._node().hpke_public_key if self.seal else None

    def on_admitted(self, headers: httpx.Headers, exchange: Exchange) -> None:
        node = self._node()
        if PAYMENT_RESPONSE not in headers:
            return  # a free node: the receipt is still checked
        pr = PaymentResponse.from_header(headers[PAYMENT_RESPONSE])
        exchange.channel_id, exchange.accepted, exchange.spent_at_admission = (pr.channel_id.lower(), pr.accepted,
                                                                               pr.spent)
        with self._lock:
            self._unoffer(exchange)
            live = self._live.setdefault(exchange.channel_id, _Live())
            live.inflight += 1
            live.epoch += 1
            # Alone on the channel from here on while the epoch stays put (`_ceiling`).
            exchange.alone_epoch = live.epoch if live.inflight == 1 and not live.offered else None
        try:
            ch = self.store.channel(exchange.channel_id)
            if ch is None:
                raise ReceiptViolation("unknown_channel", f"the node charged channel {pr.channel_id}, not ours")
            value = headers.get(ACCEPTANCE_HEADER)
            if value is None:
                if not self._terms_in_force(node.signing_address, ch.model_id, exchange.started_at):
                    return  # no SLA terms in force: the node promises nothing the court could judge
                raise ReceiptViolation("missing_acceptance", "a paid request was admitted without a signed "
                                       "acceptance although the node's SLA terms are in force")
            try:
                signed = SignedAcceptance.model_validate_json(_b64(value))
                verify_acceptance(signed.acceptance, signed.signature, expected_signer=node.signing_address,
                                  domain=self.receipt_domain)
            except ReceiptError as exc:
                raise ReceiptViolation(exc.reason.value, str(exc)) from exc
            except ValueError as exc:
                raise ReceiptViolation("malformed", f"{ACCEPTANCE_HEADER} is not a signed acceptance: {exc}") from exc
            a = signed.acceptance
            if a.request_hash != request_hash(exchange.request_body):
                raise ReceiptViolation("request_hash_mismatch", "the acceptance does not commit to the body you sent")
            if a.channel_id != exchange.channel_id:
                raise ReceiptViolation("channel_mismatch", f"acceptance names channel {a.channel_id}")
            if abs(a.accepted_at - time.time()) > self.max_clock_skew_s or a.deadline < a.accepted_at:
                raise ReceiptViolation("accepted_at_skew", f"the acceptance says accepted at {a.accepted_at}, "
                                       f"deadline {a.deadline}; our clock says {int(time.time())}")
            if (unbonding := self._unbonding_delay()) and a.deadline - a.accepted_at > unbonding // 2:
                # A node exiting as it accepts could withdraw its stake before a dispute could even be opened.
                raise ReceiptViolation("deadline_too_far", f"the acceptance's deadline is {a.deadline - a.accepted_at}"
                                       f" s away, more than half the registry's {unbonding} s unbonding delay")
            # Before the answer starts: if it never comes, this is the evidence for a no-response dispute.
            self.store.record_acceptance(signed, node_address=node.signing_address, node_url=self.node_url,
                                         model_id=ch.model_id)
            exchange.request_hash = a.request_hash
            self._answering.add(a.request_hash)
        except ReceiptViolation as exc:
            self._violation(exc, exchange, evidence=headers.get(ACCEPTANCE_HEADER))
            self.on_aborted(exchange)
            raise

    def on_need_voucher(self, need: NeedVoucher, exchange: Exchange) -> Voucher:
        with self._lock:
            if need.channel_id.lower() != exchange.channel_id:
                exc = ReceiptViolation("channel_mismatch", f"the node asks for a voucher on {need.channel_id}, "
                                       f"not on this request's channel {exchange.channel_id}")
                self._violation(exc, exchange)
                raise exc
            ch = self._stored(need.channel_id)
            ceiling = self._ceiling(exchange, ch)
            if ceiling is not None and need.required_cumulative > ceiling:
                exc = ReceiptViolation("overcharge", f"the node asks for {need.required_cumulative} wei cumulative, "
                                       f"more than this request can cost ({ceiling}: spent at admission + "
                                       "max_tokens x price); not paying")
                self._violation(exc, exchange)
                raise exc
            voucher = self._sign(ch, need.required_cumulative)
            exchange.vouchers.append(voucher)
            return voucher

    def _ceiling(self, exchange: Exchange, ch: StoredChannel) -> int | None:
        """The most this request can bring the channel's spent to, when it has been alone on the channel since its
        admission and names max_tokens: what was spent at admission (its prompt included) + max_tokens x price."""
        live = self._live.get(exchange.channel_id, _Live())
        alone = exchange.alone_epoch is not None and exchange.alone_epoch == live.epoch
        if not alone or live.inflight != 1 or live.offered or exchange.spent_at_admission is None:
            return None
        try:
            body = json.loads(exchange.request_body)
        except ValueError:
            return None
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_tokens, int):
            return None
        return exchange.spent_at_admission + max_tokens * ch.price_out

    def on_receipt(self, exchange: Exchange, signed: SignedReceipt | None, *, response_bytes: bytes | None = None,
                   sse_payloads: list[bytes] | None = None) -> Voucher | None:
        settle = self._receipt(exchange, signed, response_bytes=response_bytes, sse_payloads=sse_payloads)
        self._check_sla(exchange)  # outside the lock: a chain read (on a cache miss) holds up no other request
        return settle

    def _receipt(self, exchange: Exchange, signed: SignedReceipt | None, *, response_bytes: bytes | None,
                 sse_payloads: list[bytes] | None) -> Voucher | None:
        node = self._node()
        with self._lock:
            self._answering.discard(exchange.request_hash or "")
            live = self._live.get(exchange.channel_id or "")
            exact = live is not None and live.inflight == 1 and not live.offered and not live.uncertain
            if live is not None:
                live.inflight -= 1
            try:
                if signed is None:
                    raise ReceiptViolation("missing_receipt", "the answer came without a readable receipt; the "
                                           "node breaks Proof of Response (fetch it at /v1/receipts/{id})")
                r = signed.receipt
                ch = self.store.channel(exchange.channel_id) if exchange.channel_id else None
                if exchange.channel_id and r.channel_id != exchange.channel_id:
                    raise ReceiptViolation("channel_mismatch", f"receipt charges {r.channel_id}, not this request's "
                                           f"channel {exchange.channel_id}")
                try:
                    verify_receipt(r, signed.signature, expected_signer=node.signing_address,
                                   request_bytes=exchange.request_body, response_bytes=response_bytes,
                                   sse_payloads=sse_payloads,
                                   price=Price(ch.price_in, ch.price_out) if ch else None,
                                   previous_cumulative=ch.spent if ch and exact else None, domain=self.receipt_domain)
                except ReceiptError as exc:
                    raise ReceiptViolation(exc.reason.value, str(exc)) from exc
                if not (exchange.started_at - self.max_clock_skew_s <= r.accepted_at
                        <= time.time() + self.max_clock_skew_s):
                    raise ReceiptViolation("accepted_at_skew", f"the receipt says accepted at {r.accepted_at}; the "
                                           f"request was sent at {int(exchange.started_at)} by our clock")
                # Not provably alone on the channel: concurrent requests finish in any order, so the receipt is
                # checked against its own admission (the node's spent then can only have grown).
                floor = exchange.spent_at_admission
                if ch and not exact and floor is not None and r.cumulative_spent < floor:
                    raise ReceiptViolation("cumulative_mismatch", f"cumulativeSpent {r.cumulative_spent} went back: "
                                           f"the node said {floor} when it admitted this request")
            except ReceiptViolation as exc:
                self._violation(exc, exchange, evidence=signed.model_dump_json(by_alias=True) if signed else None)
                if signed is not None and exc.reason in _SIGNED_FOR_THE_REQUEST:
                    self.store.mark_answered(node.signing_address, signed.receipt.request_hash,
                                             signed.receipt.receipt_id)
                raise
            self.store.record_receipt(signed, node_url=self.node_url, request_body=exchange.request_body)
            self.store.mark_answered(node.signing_address, r.request_hash, r.receipt_id)
            exchange.receipt = signed
            if ch is None:
                return None
            if live is not None:
                # With nothing else in flight the store's spent is the node's again: check the next exactly.
                live.uncertain = live.inflight > 0 or live.offered > 0
            ch = self._stored(ch.channel_id)
            # Pay the credit this answer used now, as its verified receipt shows, so the node's exposure
            # between requests is zero and the next request needs no extra round trip.
            if r.cumulative_spent > ch.accepted:
                return self._sign(ch, r.cumulative_spent)
            if exact and r.cumulative_spent < ch.accepted:
                # It reserved more than it used (a non-streamed max_tokens, a prepay): re-sign down to exactly
                # the receipts, which the node settles instead (a release), so settled = receipts.
                return self._release(ch, r.cumulative_spent)
            return None

    def on_aborted(self, exchange: Exchange) -> None:
        with self._lock:
            self._unoffer(exchange)
            self._answering.discard(exchange.request_hash or "")
            live = self._live.get(exchange.channel_id or "")
            if live is not None and not exchange.finished:
                exchange.finished = True
                live.inflight = max(0, live.inflight - 1)
                live.uncertain = True  # the node charged for a receipt we never saw

    def _violation(self, exc: ReceiptViolation, exchange: Exchange, evidence: str | None = None) -> None:
        receipt_id = exchange.receipt.receipt.receipt_id if exchange.receipt else None
        self.store.record_violation(node_url=self.node_url, reason=exc.reason, message=str(exc),
                                    channel_id=exchange.channel_id, receipt_id=receipt_id, evidence=evidence)


def _b32(channel_id: str) -> bytes:
    raw = bytes.fromhex(channel_id.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError(f"channel id {channel_id} is not 32 bytes of hex")
    return raw


def _b64(value: str) -> bytes:
    import base64

    return base64.b64decode(value, validate=True)


def discover(deployment: Deployment, bootstrap: list[str], model: str | None = None, *,
             policy: Policy | None = None, allow_simulated: bool = False, w3: Web3 | None = None) -> list:
    """Nodes serving `model` found through the overlay (bootstrap peers), each advert checked against the
    on-chain NodeRegistry and the node's live attestation; ranked by price, then latency (`NodeOffer`s)."""
    from client.advert import AdvertDomain
    from client.discovery import ChainRegistry, Discovery
    from client.registry import RegistryClient

    if not deployment.node_registry:
        raise ValueError("the deployment names no node_registry: discovery needs it to check adverts")
    w3 = w3 or Web3(Web3.HTTPProvider(deployment.rpc_url, request_kwargs={"timeout": 30}))
    registry = ChainRegistry(RegistryClient(w3, deployment.node_registry))
    with Discovery(bootstrap, registry, policy=policy, allow_simulated=allow_simulated,
                   domain=AdvertDomain(deployment.chain_id, deployment.node_registry)) as overlay:
        return overlay.discover(model)
