"""The client SDK: attest a node, pay it per token through a payment channel, verify every answer.

    client = Client("http://node:8080", wallet, deployment=Deployment.load(".devnet/deployment.json"),
                    deposit=10**18, allow_simulated=True)
    print(client.chat([{"role": "user", "content": "hi"}], "dcml-demo").text)
    oai = client.openai()          # the official SDK, paying and verifying through PayingTransport

The facade: `Client` is the payer the transports call (`client.sdk.payer`, over the channel bookkeeping of
`client.sdk.channels`), with the calls, the attestation and the disputes of one node on top.

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
import os
import threading
from pathlib import Path
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount
from openai import AsyncOpenAI, OpenAI
from web3 import Web3

from dcml.client.attestation.verify import AttestationDocument, Policy, VerifiedNode, verify_attestation
from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.sdk.channels import InsufficientDeposit, LiveChannel, UntrustedTerms
from dcml.client.sdk.disputes import AutoDisputer, Disputes
from dcml.client.sdk.exchange import (
    EXCHANGE_EXTENSION,
    Exchange,
    PaymentError,
    PaymentRejected,
    ReceiptViolation,
)
from dcml.client.sdk.payer import ChannelPayer
from dcml.client.sdk.results import ChatResult, ChatStream, NodeError, node_error
from dcml.client.sdk.spend_store import SpendStore
from dcml.client.sdk.transport import AsyncPayingTransport, PayingTransport
from dcml.client.wire.receipts import DEFAULT_DOMAIN, ReceiptDomain

__all__ = ["ChatResult", "ChatStream", "Client", "InsufficientDeposit", "NodeError", "PaymentError",
           "PaymentRejected", "ReceiptViolation", "UntrustedTerms", "discover"]


class Client(ChannelPayer):
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
        self.w3 = w3 or connect(deployment.rpc_url)
        self.chain = ChannelClient(self.w3, deployment, wallet)
        self.store = SpendStore(store)
        self.node: VerifiedNode | None = None
        self._lock = threading.RLock()
        self._live: dict[str, LiveChannel] = {}
        self._checked: set[str] = set()  # stored channels whose on-chain state was checked this process
        self._unbonding: int | None = None  # NodeRegistry.unbondingDelay (immutable), read once
        self._http = httpx.Client(base_url=self.node_url, timeout=timeout)
        self._paying = httpx.Client(base_url=self.node_url, timeout=timeout, transport=PayingTransport(self))
        self._disputes: Disputes | None = None
        self._answering: set[str] = set()  # request hashes admitted whose answer is still arriving
        # Fails now, not in the thread, when the deployment has no court.
        self._disputer = AutoDisputer(self.disputes, dispute_interval_s) if auto_dispute else None

    @staticmethod
    def discover(deployment: Deployment, bootstrap: list[str], model: str | None = None, **kwargs: Any) -> list:
        """See `client.sdk.discover`: verified, ranked offers for `model` from the overlay."""
        return discover(deployment, bootstrap, model, **kwargs)

    def close(self) -> None:
        if self._disputer is not None:
            self._disputer.stop()  # a transaction in flight finishes, so its outcome is recorded
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

    # -- attestation -----------------------------------------------------------------------------

    def attest(self) -> VerifiedNode:
        """Fetch and verify the node's attestation with a fresh nonce; remembers the attested keys."""
        nonce = os.urandom(32)
        try:
            response = self._http.get("/v1/attestation", params={"nonce": nonce.hex()})
        except httpx.HTTPError as exc:
            raise NodeError(0, "unreachable", f"cannot reach {self.node_url}: {exc}") from exc
        if response.status_code != 200:
            raise node_error(response)
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
            raise node_error(response)
        exchange: Exchange = response.extensions[EXCHANGE_EXTENSION]
        data = response.json()
        choice = (data.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
        return ChatResult(text, data.get("usage"), exchange.receipt, exchange.cost, exchange.channel_id, data,
                          sla_broken=self._sla_of(exchange.receipt), sealed=exchange.sealed)

    def openai(self, **kwargs: Any) -> OpenAI:
        """The official client, paying and verifying through this Client."""
        http = httpx.Client(transport=PayingTransport(self), timeout=self.timeout)
        # openai 3.51 annotates httpx2 clients; it drives any httpx-compatible client, as this one is.
        return OpenAI(base_url=self.node_url + "/v1", api_key="dcml", http_client=http,  # type: ignore[arg-type]
                      **kwargs)

    def async_openai(self, **kwargs: Any) -> AsyncOpenAI:
        http = httpx.AsyncClient(transport=AsyncPayingTransport(self), timeout=self.timeout)
        return AsyncOpenAI(base_url=self.node_url + "/v1", api_key="dcml",
                           http_client=http, **kwargs)  # type: ignore[arg-type]  # as in `openai`


def discover(deployment: Deployment, bootstrap: list[str], model: str | None = None, *,
             policy: Policy | None = None, allow_simulated: bool = False, w3: Web3 | None = None) -> list:
    """Nodes serving `model` found through the overlay (bootstrap peers), each advert checked against the
    on-chain NodeRegistry and the node's live attestation; ranked by price, then latency (`NodeOffer`s)."""
    from dcml.client.chain.registry import RegistryClient
    from dcml.client.sdk.discovery import ChainRegistry, Discovery
    from dcml.client.wire.advert import AdvertDomain

    if not deployment.node_registry:
        raise ValueError("the deployment names no node_registry: discovery needs it to check adverts")
    w3 = w3 or connect(deployment.rpc_url)
    registry = ChainRegistry(RegistryClient(w3, deployment.node_registry))
    with Discovery(bootstrap, registry, policy=policy, allow_simulated=allow_simulated,
                   domain=AdvertDomain(deployment.chain_id, deployment.node_registry)) as overlay:
        return overlay.discover(model)
