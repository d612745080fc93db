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
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydantic_core
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dcml.client.attestation.verify import Policy
from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.sdk.client import Client, InsufficientDeposit, NodeError
from dcml.client.sdk.transport import EXCHANGE_EXTENSION, AsyncPayingTransport, Exchange, PaymentError
from dcml.client.wire.errors import DcmlError, ErrorType, error_object

log = logging.getLogger("dcml.gateway")

RECEIPT_HEADER = "x-dcml-receipt"
MAX_BODY = 1 << 20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpendingLimits(_Section):
    """wei of the channel token; None = no limit."""

    per_request: int | None = Field(None, gt=0)  # worst case: prompt bytes x input price + max_tokens x output
    per_hour: int | None = Field(None, gt=0)  # verified receipts of the last hour + requests in flight
    per_channel: int | None = Field(None, gt=0)  # the most one channel is ever funded with (no top-up past it)


class GatewayConfig(_Section):
    host: str = "127.0.0.1"  # loopback: the gateway spends the wallet's money for whoever can reach it
    port: int = Field(8400, ge=0, le=65535)
    deployment: Path = Path(".devnet/deployment.json")
    wallet_key_env: str = "DCML_WALLET_KEY"
    store_dir: Path = Path("~/.dcml/gateway")  # one SDK spend store per node
    policy: Path | None = None  # attestation policy (configs/policy.toml); None = the strict default
    allow_simulated: bool = False  # development only
    nodes: list[str] = Field(default_factory=list)  # static base URLs
    registry: bool = False  # also every active node in the deployment's NodeRegistry
    require_registered: bool = False  # use a node only if its attested key is active in the NodeRegistry
    deposit: int = Field(10**18, gt=0)  # opening deposit (capped by limits.per_channel)
    limits: SpendingLimits = Field(default_factory=SpendingLimits)
    default_max_tokens: int = Field(256, gt=0)  # set when a request names none: bounds its cost
    first_token_timeout_s: float = Field(30.0, gt=0)  # admission + first token; then the next node
    backoff_s: float = Field(5.0, gt=0)  # a failing node is skipped this long, doubling per failure ...
    max_backoff_s: float = Field(300.0, gt=0)  # ... up to this
    refresh_s: float = Field(60.0, gt=0)  # re-attest and re-read models and prices this often
    # Concurrent requests to one node, each on its own channel: a channel carries one request at a time, so
    # vouchers of concurrent streams never race (opened lazily, each with its own deposit).
    channels_per_node: int = Field(4, gt=0)
    auto_dispute: bool = False  # open and finalize SLA disputes as the SDK does

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> GatewayConfig:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


class LimitExceeded(DcmlError):
    """A request would pass one of the gateway's spending limits; `code` (the reason) names which."""

    error_type = ErrorType.PAYMENT

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message, reason=f"spending_limit_{which}")
        self.code = self.reason


@dataclass
class Price:
    input: int
    output: int


@dataclass
class Slot:
    """One SDK client (its own spend store and channel) serving one request at a time."""

    client: Client
    http: httpx.AsyncClient
    ready: set[str] = field(default_factory=set)  # models with a usable channel on this slot


@dataclass
class Upstream:
    """One node as the gateway sees it."""

    url: str
    slots: list[Slot]
    free: asyncio.Queue = field(default_factory=asyncio.Queue)
    prices: dict[str, Price] = field(default_factory=dict)  # model -> verified terms
    ttft_s: float | None = None  # moving average of admission + first token
    failures: int = 0
    down_until: float = 0.0
    refreshed_at: float = 0.0
    last_error: str = ""

    def failed(self, reason: str, cfg: GatewayConfig) -> None:
        self.failures += 1
        backoff = min(cfg.backoff_s * 2 ** (self.failures - 1), cfg.max_backoff_s)
        self.down_until = time.monotonic() + backoff
        self.last_error = reason
        self.refreshed_at = 0.0  # re-attested before it is used again: it may have restarted with new keys
        log.warning("node %s failed (%s); skipped for %.0f s", self.url, reason, backoff)

    @property
    def client(self) -> Client:
        """The first slot's client: attests the node and reads its terms for the gateway."""
        return self.slots[0].client

    def succeeded(self, ttft_s: float) -> None:
        self.failures, self.last_error = 0, ""
        self.ttft_s = ttft_s if self.ttft_s is None else 0.8 * self.ttft_s + 0.2 * ttft_s


class _NodeFailed(Exception):
    """This node cannot answer this request before its first token: try the next one."""


class Gateway:
    def __init__(self, cfg: GatewayConfig, wallet: Any, *, deployment: Deployment | None = None) -> None:
        self.cfg = cfg
        self.wallet = wallet
        self.deployment = deployment or Deployment.load(cfg.deployment)
        self.policy = Policy.load(cfg.policy) if cfg.policy else Policy()
        self.store_dir = cfg.store_dir.expanduser()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, Upstream] = {}
        self._spent: collections.deque[tuple[float, int]] = collections.deque()  # (time, cost) of receipts
        self._reserved = 0  # worst-case cost of requests in flight (per-hour limit)
        self._lock = asyncio.Lock()
        self._tx_lock = asyncio.Lock()  # channel openings: one wallet transaction at a time
        self._registry = None
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

    def _registry_client(self):
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

    # -- spending limits -------------------------------------------------------------------------

    def _spent_last_hour(self) -> int:
        cutoff = time.time() - 3600
        while self._spent and self._spent[0][0] < cutoff:
            self._spent.popleft()
        return sum(c for _, c in self._spent)

    async def _reserve(self, worst: int) -> None:
        limits = self.cfg.limits
        if limits.per_request is not None and worst > limits.per_request:
            raise LimitExceeded("per_request", f"this request may cost up to {worst} wei (prompt and max_tokens at "
                                f"the cheapest node's prices), over the per-request limit of {limits.per_request} "
                                "wei: lower max_tokens or raise limits.per_request. Nothing was paid.")
        async with self._lock:
            if limits.per_hour is not None:
                used = self._spent_last_hour() + self._reserved
                if used + worst > limits.per_hour:
                    raise LimitExceeded("per_hour", f"{used} wei spent or in flight in the last hour; this request "
                                        f"may cost up to {worst} wei, over the hourly limit of {limits.per_hour} "
                                        "wei. Nothing was paid.")
            self._reserved += worst

    async def _release(self, worst: int, cost: int) -> None:
        async with self._lock:
            self._reserved -= worst
            if cost:
                self._spent.append((time.time(), cost))

    # -- one request -----------------------------------------------------------------------------

    async def handle(self, path: str, body: dict[str, Any]) -> Response:
        model = body.get("model")
        if not isinstance(model, str):
            return _error(400, "invalid_request_error", "missing_model", "the request names no model")
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is not None and not (type(value) is int and value > 0):
                return _error(400, "invalid_request_error", "invalid_max_tokens", f"{key} must be a positive integer")
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = self.cfg.default_max_tokens  # bounds the worst case the limits are checked on
        stream = bool(body.get("stream"))
        if stream:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        raw = json.dumps(body).encode()
        await self.refresh()
        nodes = self.candidates(model)
        if not nodes:
            return _error(503, "service_unavailable", "no_node", f"no verified node serves {model!r} now"
                          + "".join(f"; {n.url}: {n.last_error}" for n in self.nodes.values() if n.last_error))
        max_tokens = body.get("max_completion_tokens") or body["max_tokens"]
        cost, tried, worst = 0, [], 0
        try:
            for node in nodes:
                price = node.prices[model]
                need = len(raw) * price.input + max_tokens * price.output  # a token is at least one byte
                if need != worst:  # the worst case at this node's prices, held against the limits
                    await self._release(worst, 0)
                    worst = 0
                    try:
                        await self._reserve(need)
                    except LimitExceeded as exc:
                        if not tried:  # the cheapest node is over a limit: say so, nothing was sent
                            log.warning("refused: %s", exc)
                            return _error(402, "spending_limit", exc.code, str(exc))
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
                except (_NodeFailed, LimitExceeded) as exc:
                    node.free.put_nowait(slot)
                    tried.append(f"{node.url}: {exc}")
                    continue
                except BaseException:
                    node.free.put_nowait(slot)
                    raise
                if not stream:
                    node.free.put_nowait(slot)
                    cost = exchange.cost
                    log.info("%s answered by %s: %d wei", model, node.url, cost)
                    return _answer(response, node, exchange)
                held, worst = worst, 0  # released when the stream ends
                return StreamingResponse(self._relay(response, exchange, first, node, slot, model, held),
                                         media_type="text/event-stream", headers=_headers(node, exchange))
            if any("spending_limit" in t for t in tried):
                return _error(402, "spending_limit", "spending_limit_per_channel" if any(
                    "per_channel" in t for t in tried) else "spending_limit_per_request",
                    "no node could answer within the spending limits: " + "; ".join(tried) + ". Nothing more "
                    "was paid.")
            return _error(502, "bad_gateway", "all_nodes_failed", "every node failed before its first token: "
                          + "; ".join(tried))
        finally:
            if worst:
                await self._release(worst, cost)

    async def _relay(self, response: httpx.Response, exchange: Exchange, first: tuple, node: Upstream, slot: Slot,
                     model: str, held: int) -> Any:
        """Pass the node's stream through; the verified receipt goes out as a last chunk before [DONE]."""
        cost = 0
        block, blocks = first
        try:
            yield block
            async for block in blocks:
                if block.startswith(b"data: [DONE]"):
                    yield _receipt_chunk(exchange, node, model)
                yield block
            cost = exchange.cost
            log.info("%s streamed by %s: %d wei", model, node.url, cost)
        finally:
            await response.aclose()
            node.free.put_nowait(slot)
            await self._release(held, exchange.cost)

    async def _send(self, node: Upstream, slot: Slot, path: str, raw: bytes, stream: bool
                    ) -> tuple[httpx.Response, Exchange, tuple | None]:
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
                        raise _ClientFault(response.status_code, body)
                    raise _NodeFailed(f"answered {response.status_code}: {body[:200].decode(errors='replace')}")
                exchange: Exchange = response.extensions[EXCHANGE_EXTENSION]
                first = None
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
            raise _NodeFailed(reason) from None
        except _NodeFailed as exc:
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
        out = {"spent_last_hour": str(self._spent_last_hour()), "in_flight_reserved": str(self._reserved),
               "limits": self.cfg.limits.model_dump(), "nodes": []}
        for n in self.nodes.values():
            out["nodes"].append({
                "url": n.url, "prices": {m: {"input": str(p.input), "output": str(p.output)}
                                         for m, p in n.prices.items()},
                "ttft_ms": round(n.ttft_s * 1000, 1) if n.ttft_s is not None else None, "failures": n.failures,
                "last_error": n.last_error,
                "channels": [c.as_json() for slot in n.slots for c in slot.client.channels()],
                "receipts": [r.as_json() for slot in n.slots for r in slot.client.receipts()],
                "violations": [{"reason": v.reason, "message": v.message} for slot in n.slots
                               for v in slot.client.violations()]})
        return out

    async def aclose(self) -> None:
        for n in self.nodes.values():
            for slot in n.slots:
                await slot.http.aclose()
                await asyncio.to_thread(slot.client.close)


class _ClientFault(Exception):
    """The node refused the request itself (4xx): another node would too; passed back as is."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


def _error(status: int, type_: str, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_object(message, type_, code), status_code=status)


def _headers(node: Upstream, exchange: Exchange) -> dict[str, str]:
    out = {"x-dcml-node": node.url}
    if exchange.channel_id:
        out["x-dcml-channel"] = exchange.channel_id
    return out


def _answer(response: httpx.Response, node: Upstream, exchange: Exchange) -> Response:
    headers = _headers(node, exchange)
    if exchange.receipt is not None:
        headers[RECEIPT_HEADER] = exchange.receipt.to_header()
        headers["x-dcml-cost"] = str(exchange.cost)
    return Response(response.content, status_code=response.status_code, headers=headers,
                    media_type=response.headers.get("content-type", "application/json"))


def _receipt_chunk(exchange: Exchange, node: Upstream, model: str) -> bytes:
    """A last chunk OpenAI clients ignore (no choices), carrying the verified receipt."""
    receipt = exchange.receipt.model_dump(mode="json") if exchange.receipt is not None else None
    chunk = {"id": "dcml-receipt", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
             "choices": [], "dcml_receipt": receipt, "dcml_node": node.url, "dcml_cost": str(exchange.cost)}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def create_gateway_app(gateway: Gateway) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.refresh(force=True)
        yield
        await gateway.aclose()

    app = FastAPI(title="dcml gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def body_of(request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return _error(413, "invalid_request_error", "body_too_large", f"the body exceeds {MAX_BODY} bytes")
        try:  # pydantic-core's parser: a nesting limit, where json.loads can overflow a thread's C stack
            body = pydantic_core.from_json(raw)
        except ValueError:
            return _error(400, "invalid_request_error", "invalid_json", "the body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_request_error", "invalid_json", "the body is not a JSON object")
        return body

    async def route(path: str, request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        try:
            return await gateway.handle(path, body)
        except _ClientFault as exc:
            return Response(exc.body, status_code=exc.status, media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await route("/v1/chat/completions", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await route("/v1/completions", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await gateway.models()

    @app.get("/dcml/spend")
    async def spend() -> dict[str, Any]:
        return await asyncio.to_thread(gateway.spend)

    return app


def main(config: Path, host: str | None = None, port: int | None = None) -> None:
    import uvicorn
    from eth_account import Account

    cfg = GatewayConfig.load(config, host=host, port=port)
    key = os.environ.get(cfg.wallet_key_env)
    if not key:
        raise SystemExit(f"error: put the paying wallet's key in ${cfg.wallet_key_env}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gateway = Gateway(cfg, Account.from_key(key))
    log.info("dcml gateway on http://%s:%d/v1 (wallet %s)", cfg.host, cfg.port, gateway.wallet.address)
    uvicorn.run(create_gateway_app(gateway), host=cfg.host, port=cfg.port, log_level="warning")
