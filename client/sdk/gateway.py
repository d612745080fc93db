"""`dcml gateway`: a local OpenAI-compatible endpoint that attests, pays and fails over for any application.

    dcml gateway --config configs/gateway.toml      # then point any OpenAI client at http://127.0.0.1:8400/v1

For every request it picks a node serving the model (a static list and/or the NodeRegistry's active nodes),
verified against the attestation policy (and, when asked, registered and active on chain), cheapest first
and then fastest (measured time to first token). It pays over that node's channel through the SDK
(`client.sdk.Client` + `AsyncPayingTransport`: acceptance and receipt verified, everything in the SDK's
spend store), within the user's limits: per request and per hour (checked before anything is sent, against
a worst-case estimate) and per channel (the channel's deposit, never topped up past it). A limit is a clear
402 `spending_limit_*` error, never a payment.

A node that refuses, errors, times out or fails attestation before the first token is skipped and the next
one is tried; it is then avoided with exponential backoff. The request is paid once: only the node that
answers signs a receipt; a voucher an abandoned node holds stays credit on its channel for later requests.

The receipt reaches the application as the `x-dcml-receipt` header (non-streamed) or, streamed, as a last
chunk before `[DONE]` with empty `choices` and a `dcml_receipt` field (OpenAI clients ignore both).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
from fastapi.responses import Response, StreamingResponse

from dcml.client.attestation.verify import Policy
from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.sdk.client import Client, InsufficientDeposit, NodeError
from dcml.client.sdk.exchange import EXCHANGE_EXTENSION, Exchange, PaymentError
from dcml.client.sdk.gateway_app import (
    ClientFault,
    answer,
    answer_headers,
    create_gateway_app,
    error,
    main,
    receipt_chunk,
)
from dcml.client.sdk.gateway_config import GatewayConfig, LimitExceeded, Spending, SpendingLimits
from dcml.client.sdk.gateway_nodes import NodeFailed, Price, Slot, Upstream
from dcml.client.sdk.transport import AsyncPayingTransport
from dcml.client.wire import sse

# Kept importable from here: the app, the CLI entry point and the config were defined in this module.
__all__ = ["Gateway", "GatewayConfig", "SpendingLimits", "create_gateway_app", "main"]

if TYPE_CHECKING:
    from dcml.client.chain.registry import RegistryClient

log = logging.getLogger("dcml.gateway")
_First = tuple[bytes, AsyncIterator[bytes]]  # a stream's first chunk, and the iterator for the rest


class Gateway:
    def __init__(self, cfg: GatewayConfig, wallet: Any, *, deployment: Deployment | None = None) -> None:
        self.cfg = cfg
        self.wallet = wallet
        self.deployment = deployment or Deployment.load(cfg.deployment)
        self.policy = Policy.load(cfg.policy) if cfg.policy else Policy()
        self.store_dir = cfg.store_dir.expanduser()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, Upstream] = {}
        self.spending = Spending(cfg.limits)
        self._tx_lock = asyncio.Lock()  # channel openings: one wallet transaction at a time
        self._registry: RegistryClient | None = None
        self._registry_read: tuple[float, list[str]] = (-1e9, [])  # (when, active endpoints)

    # -- nodes -----------------------------------------------------------------------------------

    def _urls(self) -> list[str]:
        """The static list, plus the registry's active nodes (read at most every refresh_s)."""
        urls = [u.rstrip("/") for u in self.cfg.nodes]
        if self.cfg.registry:
            if time.monotonic() - self._registry_read[0] > self.cfg.refresh_s:
                found = [r.endpoint.rstrip("/") for r in self._registry_client().nodes()
                         if r.status.name == "ACTIVE" and r.endpoint]
                self._registry_read = (time.monotonic(), found)
            urls += self._registry_read[1]
        return list(dict.fromkeys(urls))

    def _registry_client(self) -> RegistryClient:
        if self._registry is None:

            from dcml.client.chain.registry import RegistryClient

            if not self.deployment.node_registry:
                raise ValueError("registry = true but the deployment names no node_registry")
            w3 = connect(self.deployment.rpc_url)
            self._registry = RegistryClient(w3, self.deployment.node_registry)
        return self._registry

    def _upstream(self, url: str) -> Upstream:
        node = self.nodes.get(url)
        if node is None:
            node = self.nodes[url] = Upstream(url, [self._slot(url, 0)])
            node.free.put_nowait(node.slots[0])
        return node

    def _slot(self, url: str, index: int) -> Slot:
        per_channel = self.cfg.limits.per_channel
        deposit = min(self.cfg.deposit, per_channel) if per_channel else self.cfg.deposit
        store = self.store_dir / f"node-{hashlib.sha256(url.encode()).hexdigest()[:16]}-{index}.sqlite"
        client = Client(url, self.wallet, deployment=self.deployment, policy=self.policy,
                        allow_simulated=self.cfg.allow_simulated, store=store, deposit=deposit,
                        auto_top_up=per_channel is None, auto_dispute=self.cfg.auto_dispute and index == 0,
                        timeout=max(self.cfg.first_token_timeout_s, 120.0))
        http = httpx.AsyncClient(base_url=url, transport=AsyncPayingTransport(client),
                                 timeout=httpx.Timeout(max(self.cfg.first_token_timeout_s, 120.0),
                                                       connect=min(self.cfg.first_token_timeout_s, 10.0)))
        return Slot(client, http)

    async def _acquire(self, node: Upstream, model: str) -> Slot:
        """A free slot of `node`, a new one (a new client: it attests before it pays) while under
        channels_per_node, else wait for one. Its channel is opened here, one wallet transaction at a time
        (the slots' SDK clients would otherwise race on the wallet's nonce)."""
        if node.free.empty() and len(node.slots) < self.cfg.channels_per_node:
            slot = self._slot(node.url, len(node.slots))
            node.slots.append(slot)
        else:
            slot = await node.free.get()
        if model not in slot.ready:
            try:
                async with self._tx_lock:
                    if not await asyncio.to_thread(slot.client.has_channel, model):  # no usable channel yet
                        await asyncio.to_thread(slot.client.open_channel, model)
            except BaseException:
                node.free.put_nowait(slot)
                raise
            slot.ready.add(model)
        return slot

    def _refresh(self, node: Upstream) -> None:
        """Attest (fresh nonce, the policy), check the registry if asked, read models and verified prices.
        Blocking: run in a thread. Raises on any failure; the node is then not used."""
        verified = node.client.attest()
        if self.cfg.require_registered and not self._registry_client().is_active(verified.signing_address):
            raise NodeError(0, "unregistered", f"{verified.signing_address} is not active in the NodeRegistry")
        models = httpx.get(f"{node.url}/v1/models", timeout=10).json()["data"]
        prices = {}
        for m in models:
            t = node.client.terms(m["id"]).extra  # checked against the attested payee by the SDK
            prices[m["id"]] = Price(t.price_per_input_token, t.price_per_output_token)
        node.prices, node.refreshed_at = prices, time.monotonic()

    async def refresh(self, *, force: bool = False) -> None:
        """Bring every known node up to date (in parallel); a failing one is backed off, never used."""
        urls = await asyncio.to_thread(self._urls)
        now = time.monotonic()
        due = [self._upstream(u) for u in urls]
        due = [n for n in due if now >= n.down_until and (force or not n.prices or now - n.refreshed_at >
                                                           self.cfg.refresh_s)]

        async def one(node: Upstream) -> None:
            try:
                await asyncio.to_thread(self._refresh, node)
                log.info("node %s verified: %s", node.url,
                         ", ".join(f"{m} in {p.input} out {p.output}" for m, p in node.prices.items()))
            except Exception as exc:
                node.prices = {}
                node.failed(f"not usable: {exc}", self.cfg)

        await asyncio.gather(*(one(n) for n in due))

    def candidates(self, model: str) -> list[Upstream]:
        now = time.monotonic()
        usable = [n for n in self.nodes.values() if model in n.prices and now >= n.down_until]
        # Cheapest first (output price dominates an answer), then the fastest measured; unmeasured last.
        return sorted(usable, key=lambda n: (n.prices[model].output, n.prices[model].input,
                                             n.ttft_s if n.ttft_s is not None else 1e9))

    # -- one request -----------------------------------------------------------------------------

    async def handle(self, path: str, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if not isinstance(model, str):
            return error(400, "invalid_request_error", "missing_model", "the request names no model")
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is not None and not (type(value) is int and value > 0):
                return error(400, "invalid_request_error", "invalid_max_tokens", f"{key} must be a positive integer")
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = self.cfg.default_max_tokens  # bounds the worst case the limits are checked on
        stream = bool(body.get("stream"))
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        raw = json.dumps(body).encode()
        await self.refresh()
        nodes = self.candidates(model)
        if not nodes:
            return error(503, "service_unavailable", "no_node", f"no verified node serves {model!r} now"
                          + "".join(f"; {n.url}: {n.last_error}" for n in self.nodes.values() if n.last_error))
        max_tokens = body.get("max_completion_tokens") or body["max_tokens"]
        cost, worst = 0, 0
        tried: list[str] = []
        try:
            for node in nodes:
                price = node.prices[model]
                need = len(raw) * price.input + max_tokens * price.output  # a token is at least one byte
                if need != worst:  # the worst case at this node's prices, held against the limits
                    await self.spending.release(worst, 0)
                    worst = 0
                    try:
                        await self.spending.reserve(need)
                    except LimitExceeded as exc:
                        if not tried:  # the cheapest node is over a limit: say so, nothing was sent
                            log.warning("refused: %s", exc)
                            return error(402, "spending_limit", exc.code, str(exc))
                        tried.append(f"{node.url}: {exc}")
                        continue
                    worst = need
                try:
                    slot = await self._acquire(node, model)
                except Exception as exc:  # attestation of a new slot, or opening its channel, failed
                    node.failed(f"{type(exc).__name__}: {exc}", self.cfg)
                    tried.append(f"{node.url}: {exc}")
                    continue
                try:
                    response, exchange, first = await self._send(node, slot, path, raw, stream)
                except (NodeFailed, LimitExceeded) as exc:
                    node.free.put_nowait(slot)
                    tried.append(f"{node.url}: {exc}")
                    continue
                except BaseException:
                    node.free.put_nowait(slot)
                    raise
                if first is None:  # not streamed
                    node.free.put_nowait(slot)
                    cost = exchange.cost
                    log.info("%s answered by %s: %d wei", model, node.url, cost)
                    return answer(response, node, exchange)
                held, worst = worst, 0  # released when the stream ends
                return StreamingResponse(self._relay(response, exchange, first, node, slot, model, held),
                                         media_type="text/event-stream", headers=answer_headers(node, exchange))
            if any("spending_limit" in t for t in tried):
                return error(402, "spending_limit", "spending_limit_per_channel" if any(
                    "per_channel" in t for t in tried) else "spending_limit_per_request",
                    "no node could answer within the spending limits: " + "; ".join(tried) + ". Nothing more "
                    "was paid.")
            return error(502, "bad_gateway", "all_nodes_failed", "every node failed before its first token: "
                          + "; ".join(tried))
        finally:
            if worst:
                await self.spending.release(worst, cost)

    async def _relay(self, response: httpx.Response, exchange: Exchange, first: _First, node: Upstream, slot: Slot,
                     model: str, held: int) -> Any:
        """Pass the node's stream through; the verified receipt goes out as a last chunk before [DONE]."""
        cost = 0
        block, blocks = first
        try:
            async for event in _events(block, blocks):
                if event.unnamed and event.data == sse.DONE:
                    yield receipt_chunk(exchange, node, model)
                yield sse.format_event(event.data, event.name)
            cost = exchange.cost
            log.info("%s streamed by %s: %d wei", model, node.url, cost)
        finally:
            await response.aclose()
            node.free.put_nowait(slot)
            await self.spending.release(held, exchange.cost)

    async def _send(self, node: Upstream, slot: Slot, path: str, raw: bytes, stream: bool
                    ) -> tuple[httpx.Response, Exchange, _First | None]:
        start = time.monotonic()
        request = slot.http.build_request("POST", path, content=raw, headers={"content-type": "application/json"})
        response = None
        try:
            async with asyncio.timeout(self.cfg.first_token_timeout_s):
                response = await slot.http.send(request, stream=stream)
                if response.status_code >= 400:
                    body = await response.aread()
                    await response.aclose()
                    if response.status_code < 500 and response.status_code not in (402, 408, 429):
                        raise ClientFault(response.status_code, body)
                    raise NodeFailed(f"answered {response.status_code}: {body[:200].decode(errors='replace')}")
                exchange: Exchange = response.extensions[EXCHANGE_EXTENSION]
                first: _First | None = None
                if stream:  # the same iterator feeds the relay: a response streams once
                    blocks = response.aiter_raw()
                    first = (await anext(blocks), blocks)
        except InsufficientDeposit as exc:
            raise LimitExceeded("per_channel", f"spending_limit_per_channel: {exc}") from None
        except (httpx.HTTPError, PaymentError, NodeError, TimeoutError, StopAsyncIteration, OSError) as exc:
            if response is not None:
                await response.aclose()  # the SDK marks the exchange aborted: no receipt, nothing charged here
            reason = "timed out before the first token" if isinstance(exc, TimeoutError) else \
                f"{type(exc).__name__}: {exc}"
            node.failed(reason, self.cfg)
            raise NodeFailed(reason) from None
        except NodeFailed as exc:
            node.failed(str(exc), self.cfg)
            raise
        node.succeeded(time.monotonic() - start)
        return response, exchange, first

    async def models(self) -> dict[str, Any]:
        await self.refresh()
        offers: dict[str, list[tuple[Upstream, Price]]] = collections.defaultdict(list)
        for n in self.nodes.values():
            if time.monotonic() >= n.down_until:
                for m, p in n.prices.items():
                    offers[m].append((n, p))
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "dcml",
             "dcml": {"nodes": len(o), "price_per_input_token": str(min(p.input for _, p in o)),
                      "price_per_output_token": str(min(p.output for _, p in o)),
                      "offers": [{"node": n.url, "price_per_input_token": str(p.input),
                                  "price_per_output_token": str(p.output)} for n, p in o]}}
            for m, o in sorted(offers.items())]}

    def spend(self) -> dict[str, Any]:
        nodes: list[dict[str, Any]] = []
        for n in self.nodes.values():
            nodes.append({
                "url": n.url, "prices": {m: {"input": str(p.input), "output": str(p.output)}
                                         for m, p in n.prices.items()},
                "ttft_ms": round(n.ttft_s * 1000, 1) if n.ttft_s is not None else None, "failures": n.failures,
                "last_error": n.last_error,
                "channels": [c.as_json() for slot in n.slots for c in slot.client.channels()],
                "receipts": [r.as_json() for slot in n.slots for r in slot.client.receipts()],
                "violations": [{"reason": v.reason, "message": v.message} for slot in n.slots
                               for v in slot.client.violations()]})
        return {"spent_last_hour": str(self.spending.last_hour()), "in_flight_reserved": str(self.spending.reserved),
                "limits": self.cfg.limits.model_dump(), "nodes": nodes}

    async def aclose(self) -> None:
        for n in self.nodes.values():
            for slot in n.slots:
                await slot.http.aclose()
                await asyncio.to_thread(slot.client.close)


async def _events(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[sse.Event]:
    """The events of a paid stream (already filtered by the SDK's transport), read with the wire's reader."""
    reader = sse.SseReader()
    for event in reader.feed(first):
        yield event
    async for chunk in rest:
        for event in reader.feed(chunk):
            yield event
    reader.close()
