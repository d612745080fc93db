"""The app factory: wires config, engine, enclave identity, TEE provider, receipt store, payment gate and
the SLA court (terms checked and published at start, disputes answered) into FastAPI.

Tests inject their own parts through `create_app`'s keyword arguments.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from dcml.client.chain.connect import connect
from dcml.client.wire.receipts import ReceiptDomain, model_id_for
from dcml.node import __version__
from dcml.node.api import attestation, openai, receipts
from dcml.node.api.body_limit import BodyLimitMiddleware
from dcml.node.api.errors import install_error_handlers
from dcml.node.api.metrics import MetricsMiddleware, NodeMetrics
from dcml.node.api.openapi import install_openapi
from dcml.node.api.payments import payments_router
from dcml.node.api.state import NodeState, node_state
from dcml.node.api.status import status_router
from dcml.node.api.voucher_route import VoucherRoute
from dcml.node.config import NodeSettings, resolve_receipt_domain
from dcml.node.engine.base import Engine
from dcml.node.identity import EnclaveIdentity
from dcml.node.logging import get_logger
from dcml.node.payments.gate import PaymentGate
from dcml.node.payments.service import Payments, PaymentSettings
from dcml.node.receipts.signer import ReceiptSigner
from dcml.node.receipts.store import ReceiptStore
from dcml.node.status import StatusCollector
from dcml.node.tee.base import AttestationProvider

if TYPE_CHECKING:
    from dcml.client.chain.sla import Terms
    from dcml.node.model_source import EncryptedModelSource
    from dcml.node.sla.watcher import SlaWatcher


log = get_logger("dcml.node")


def build_provider(settings: NodeSettings) -> AttestationProvider:
    provider = _tee_provider(settings)
    if settings.tee.gpu.enabled:  # every quote then carries NVML evidence; refuses to start without CC mode
        from dcml.node.tee.gpu import with_gpu_evidence

        return with_gpu_evidence(provider, settings.tee.gpu)
    return provider


def _tee_provider(settings: NodeSettings) -> AttestationProvider:
    tee = settings.tee
    if tee.provider == "simulated":
        from dcml.node.tee.simulated import SimulatedProvider

        return SimulatedProvider()
    if tee.provider == "tdx":
        from dcml.node.tee.tdx import TdxProvider

        return TdxProvider(**tee.options)  # type: ignore[arg-type]
    from dcml.node.tee.dstack import DstackProvider  # needs dstack-sdk: imported only when chosen

    return DstackProvider(**tee.options)  # type: ignore[arg-type]


def build_identity(settings: NodeSettings, provider: AttestationProvider) -> EnclaveIdentity:
    if provider.tee_type == "dstack":  # KMS-derived: the same address after a restart
        return EnclaveIdentity.from_seed(provider.derive_identity_seed())  # type: ignore[attr-defined]
    if provider.tee_type == "simulated":
        return EnclaveIdentity.load_or_create_dev_seed(settings.data_dir)
    return EnclaveIdentity.generate()  # plain TDX: fresh keys each boot, re-registered on chain


def encrypted_source(settings: NodeSettings) -> EncryptedModelSource:
    """`[engine.encrypted]`, with the expected publisher and release read from ModelRegistry when the node
    knows the chain (payments on) and the config does not pin them."""
    from dcml.node.model_source import EncryptedModelSource  # torch: imported only when an encrypted model is used

    enc = settings.engine.encrypted
    assert enc is not None
    publisher, manifest_hash = enc.publisher, enc.manifest_hash
    if settings.payments.enabled and (publisher is None or manifest_hash is None):

        from dcml.client.chain.contracts import contract
        from dcml.client.chain.deployment import Deployment

        dep = Deployment.load(settings.payments.deployment)
        registry = contract(connect(settings.payments.rpc_url or dep.rpc_url), "ModelRegistry",
                            dep.model_registry)
        model = bytes.fromhex(model_id_for(settings.engine.served_model_name)[2:])
        publisher = publisher or registry.functions.terms(model).call()[0]
        manifest_hash = manifest_hash or "0x" + bytes(registry.functions.listing(model).call()[0]).hex()
    return EncryptedModelSource(enc.bundle_dir, enc.broker_url, publisher,
                                bytes.fromhex(manifest_hash.removeprefix("0x")) if manifest_hash else None)


def build_engine(settings: NodeSettings, identity: EnclaveIdentity, provider: AttestationProvider) -> Engine:
    e = settings.engine
    if e.kind == "synthetic":
        from dcml.node.engine.synthetic import SyntheticEngine

        return SyntheticEngine(model_name=e.served_model_name, **e.options)  # type: ignore[arg-type]
    if e.kind == "openai":
        from dcml.node.engine.openai_upstream import OpenAIUpstreamEngine

        if not e.base_url:
            raise ValueError("engine.kind = 'openai' needs engine.base_url (e.g. http://127.0.0.1:8000)")
        api_key = e.api_key.get_secret_value() if e.api_key else None
        tokenizer_dir = e.model_dir
        if e.encrypted is not None:  # clear weights in tmpfs for the vLLM sidecar, never on disk
            from dcml.node.model_source import materialize_to_tmpfs

            if e.encrypted.tmpfs_dir is None:
                raise ValueError("engine.encrypted with kind = 'openai' needs tmpfs_dir (a tmpfs mount vLLM reads)")
            materialize_to_tmpfs(encrypted_source(settings), identity, provider, e.encrypted.tmpfs_dir,
                                 node_version=__version__)
            tokenizer_dir = e.encrypted.tmpfs_dir
        if e.vllm is not None:
            return supervised_vllm(settings, tokenizer_dir, api_key)
        options: dict[str, Any] = dict(e.options)  # passed through to the engine, which checks its own options
        return OpenAIUpstreamEngine(e.base_url, e.served_model_name, api_key=api_key, tokenizer_dir=tokenizer_dir,
                                    **options)
    if e.encrypted is not None:  # decrypted in memory only
        from dcml.node.model_source import encrypted_embedded_engine

        return encrypted_embedded_engine(encrypted_source(settings), identity, provider, node_version=__version__,
                                         model_name=e.served_model_name, **e.options)  # type: ignore[arg-type]
    from dcml.node.engine.embedded import EmbeddedEngine  # torch: imported only when chosen

    if e.model_dir is None or not e.model_dir.is_dir():
        raise ValueError(f"engine.model_dir {e.model_dir} is not a directory; build the demo model or set "
                         "engine.kind = 'synthetic'")
    return EmbeddedEngine(e.model_dir, model_name=e.served_model_name, **e.options)  # type: ignore[arg-type]


def supervised_vllm(settings: NodeSettings, model_dir: Path | None, api_key: str | None) -> Engine:
    """`[engine.vllm]`: the node starts vLLM on `model_dir` (the tmpfs copy of an encrypted model: scrubbed once
    loaded) at base_url's loopback port."""
    from urllib.parse import urlsplit

    from dcml.node.engine.vllm_server import SupervisedVLLMEngine, VLLMServer

    e, v = settings.engine, settings.engine.vllm
    assert v is not None and e.base_url
    url = urlsplit(e.base_url)
    if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
        raise ValueError("[engine.vllm] needs engine.base_url on loopback with a port, e.g. http://127.0.0.1:8001")
    if model_dir is None:
        raise ValueError("[engine.vllm] needs engine.model_dir (or engine.encrypted)")
    server = VLLMServer(model_dir, e.served_model_name, port=url.port, host=url.hostname,
                        max_model_len=v.max_model_len, dtype=v.dtype, python=v.python, extra_args=v.args,
                        log_path=v.log_file)
    scrub = e.encrypted.tmpfs_dir if e.encrypted is not None else None
    return SupervisedVLLMEngine(server, ready_timeout_s=v.ready_timeout_s, scrub_dir=scrub, tokenizer_dir=model_dir,
                                api_key=api_key, **e.options)


def build_gate(settings: NodeSettings, identity: EnclaveIdentity, engine: Engine, domain: ReceiptDomain,
               model_id: str, store: ReceiptStore | None = None) -> PaymentGate:
    """Payments: the node's enclave key is the payee (clients pay only the key they attested)."""
    cfg = settings.payments
    if engine.model_name not in cfg.prices:
        raise ValueError(f"payments are on but [payments.prices.{engine.model_name}] is missing in the config")
    payments = Payments(PaymentSettings(cfg.deployment, settings.data_dir, settle_threshold=cfg.settle_threshold,
                                        settle_interval=cfg.settle_interval_s, rpc_url=cfg.rpc_url,
                                        close_margin=cfg.close_margin_s, min_settle_value=cfg.min_settle_value,
                                        confirmations=cfg.confirmations, index_poll_s=cfg.index_poll_s),
                        identity.account)
    return PaymentGate(payments, cfg, signer=identity.account, receipt_domain=domain,
                       model_ids={engine.model_name: model_id},
                       record_acceptance=store.put_acceptance if store is not None else None)


async def check_sla_terms(settings: NodeSettings, engine: Engine) -> Terms:
    """Benchmark the (started) engine against `[sla]`: raise `TermsUnmet` if it cannot meet them and
    `on_unmet = "refuse"`, warn loudly if "warn". Returns the terms to publish."""
    from dcml.node.sla.terms import TermsUnmet, measure, terms_from_config, unmet

    sla = settings.sla
    terms = terms_from_config(sla)
    bench = await measure(engine, sla.benchmark_runs, sla.benchmark_prompt_tokens, sla.benchmark_max_tokens)
    reasons = unmet(terms, bench, max_tokens=settings.limits.max_tokens_cap)
    log.info("sla_benchmark", ttft_ms=round(bench.ttft_ms, 1), tokens_per_sec=round(bench.tokens_per_sec, 1),
             duration_ms=round(bench.duration_ms, 1), runs=bench.runs, max_tokens=bench.max_tokens)
    if reasons and sla.on_unmet == "refuse":
        raise TermsUnmet(reasons, bench)
    if reasons:
        log.warning("SLA TERMS NOT MET BY THIS ENGINE, PUBLISHING THEM ANYWAY (on_unmet = \"warn\"): clients "
                    "may claim compensation from the stake for every breach", reasons=reasons,
                    measured=bench.describe())
    return terms


def start_sla_court(settings: NodeSettings, identity: EnclaveIdentity, store: ReceiptStore, model_id: str,
                    domain: ReceiptDomain, terms: Terms) -> tuple[SlaWatcher, int]:
    """Publish `terms` if they changed and start answering no-response disputes. Blocking (web3): run it in
    a thread. The node must already be registered (the court accepts terms of active nodes only). Returns the
    watcher and the `validFrom` of the terms now published (requests accepted before it have none)."""
    from eth_account import Account

    from dcml.client.chain.deployment import Deployment
    from dcml.client.chain.sla import SLACourtClient
    from dcml.node.sla.terms import publish_terms_if_changed
    from dcml.node.sla.watcher import DISPUTE_LOOKBACK_S, SlaWatcher, first_block_since

    dep = Deployment.load(settings.payments.deployment)
    if not dep.sla_court:
        raise ValueError("[sla] is enabled but the deployment file names no sla_court")
    if (domain.chain_id, domain.verifying_contract.lower()) != (dep.chain_id, dep.sla_court.lower()):
        raise ValueError(f"[sla] is enabled but receipts are signed for {domain}, not the deployment's SLA court "
                         f"{dep.sla_court} on chain {dep.chain_id}: unset [receipts] verifying_contract and chain_id")
    key = os.environ.get(settings.registry.operator_key_env)
    if not key:
        raise ValueError(f"[sla] is enabled: put the operator's key in ${settings.registry.operator_key_env}")
    operator = Account.from_key(key)
    w3 = connect(settings.payments.rpc_url or dep.rpc_url)
    court = SLACourtClient(w3, dep.sla_court)
    published = publish_terms_if_changed(court, operator, identity.address, model_id, terms)
    latest = court.latest_terms(identity.address, model_id)
    assert latest is not None  # just published, or unchanged
    log.info("sla_terms", published=published, node=identity.address, model_id=model_id, court=dep.sla_court,
             valid_from=latest.valid_from)
    # A dispute is answerable until openedAt + its response window (at most the court's maximum), so every
    # dispute a restarted node can still answer, including those opened while it was down, is in this range.
    now = w3.eth.get_block("latest")["timestamp"]
    from_block = first_block_since(w3, now - DISPUTE_LOOKBACK_S, low=dep.start_block)
    watcher = SlaWatcher(w3, dep.sla_court, identity.address, store.lookup_request, operator,
                         interval_s=settings.sla.watch_interval_s, from_block=from_block)
    watcher.start()
    return watcher, latest.valid_from


async def wait_for_terms(valid_from: int, limit_s: float = 60.0) -> None:
    """Wait until our clock reaches the terms' `validFrom` (the court's block time + 1) before serving, so every
    acceptance we sign falls under them. Bounded: past `limit_s` the gate still signs none before `validFrom`."""
    wait = valid_from - time.time()
    if wait > limit_s:
        log.warning("sla_terms_in_future", valid_from=valid_from, wait_s=round(wait, 1),
                    hint="the chain's clock is ahead of ours: no acceptances are signed until then")
    if wait > 0:
        await asyncio.sleep(min(wait, limit_s))


def _freeze_heap() -> None:
    """Take everything alive once the node has started (modules, model, app) out of the garbage collector's scans:
    its full collections otherwise walk those million long-lived objects every few thousand requests, a pause every
    stream and voucher in flight shares (bench_payments: vouchers/s 4,200-5,500 run to run without, ~5,300 with).
    For the daemon, which runs one app until it exits (`freeze_heap=True`); not for a process that builds many."""
    gc.collect()
    gc.freeze()


class NodeApp(FastAPI):
    """The node's app: FastAPI, with `POST /v1/payments/vouchers` served before its middleware and router
    (`node.api.voucher_route`: the hot voucher path, counted and bounded the same way)."""

    voucher_route: VoucherRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.voucher_route is not None and VoucherRoute.matches(scope):
            await self.voucher_route(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: NodeSettings,
    *,
    engine: Engine | None = None,
    identity: EnclaveIdentity | None = None,
    provider: AttestationProvider | None = None,
    freeze_heap: bool = False,
) -> FastAPI:
    provider = provider or build_provider(settings)
    identity = identity or build_identity(settings, provider)
    engine = engine or build_engine(settings, identity, provider)
    metrics = NodeMetrics(engine.queue_depth)
    domain = resolve_receipt_domain(settings)
    model_id = settings.receipts.model_id or model_id_for(engine.model_name)
    store = ReceiptStore(settings.data_dir / "receipts.sqlite")
    gate = build_gate(settings, identity, engine, domain, model_id, store) if settings.payments.enabled else None
    presence = None
    if settings.registry.enabled or settings.p2p.enabled:
        from dcml.node.network.presence import (
            NodePresence,  # libp2p: imported only when the dcml.node joins the network
        )

        presence = NodePresence(settings, identity, provider, model_id=model_id,
                                price=settings.payments.prices.get(engine.model_name))
    state = NodeState(
        settings=settings, engine=engine, identity=identity, provider=provider, store=store,
        signer=ReceiptSigner(identity.account, domain, model_id),
        metrics=metrics, node_version=__version__, gate=gate,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if provider.tee_type == "simulated":
            log.warning("SIMULATED TEE: NOT CONFIDENTIAL. Keys and prompts are unprotected and clients refuse "
                        "this node unless they set allow_simulated. Development only.")
        started: list[str] = []  # what to stop, also when the start itself fails
        try:
            state.store.open()
            started.append("store")
            await engine.start()
            started.append("engine")
            # Benchmarked before registering: a node refusing its own terms does not touch the chain.
            terms = await check_sla_terms(settings, engine) if settings.sla.enabled else None
            if presence is not None:
                started.append("presence")
                await presence.start()
            if terms is not None:
                app.state.sla_watcher, valid_from = await asyncio.to_thread(
                    start_sla_court, settings, identity, state.store, model_id, domain, terms)
                if gate is not None:
                    gate.terms_in_force_from[engine.model_name] = valid_from
                await wait_for_terms(valid_from)
                collector.sla_watcher = app.state.sla_watcher
            if gate is not None:
                gate.payments.start()
                started.append("payments")
                log.info("payments_on", payee=identity.address, escrow=gate.payments.deployment.payment_channels,
                         chain_id=gate.payments.deployment.chain_id, token=gate.token)
        except BaseException:
            await _shutdown(app, started)
            raise
        if freeze_heap:
            _freeze_heap()
        log.info("node_started", address=identity.address, tee=provider.tee_type, model=engine.model_name,
                 version=__version__, receipts_chain_id=domain.chain_id,
                 receipts_verifying_contract=domain.verifying_contract)
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests drained (or graceful_shutdown_s ran out).
            log.info("node_stopping")
            await _shutdown(app, started)
            log.info("node_stopped")

    async def _shutdown(app: FastAPI, started: list[str]) -> None:
        watcher = app.state.sla_watcher
        if watcher is not None:  # before the store closes: it reads receipts from it
            await asyncio.to_thread(watcher.stop)
            app.state.sla_watcher = None
        if "presence" in started and presence is not None:
            await presence.stop()
        if "engine" in started:
            await engine.stop()
        if "store" in started:
            await state.store.close()
        if gate is not None:
            if "payments" in started:  # settles whatever is unsettled before the process exits
                await run_in_threadpool(gate.payments.stop)
            gate.close()

    app = NodeApp(title="dcml node", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.node = state
    app.state.presence = presence
    app.state.sla_watcher = None  # the running SlaWatcher while [sla] is enabled
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(attestation.router)
    app.include_router(receipts.router)
    if gate is not None:
        app.include_router(payments_router(gate.payments, gate.accept))
    collector = StatusCollector(state, presence)  # the operator status page (node/api/status.py)
    token = settings.status.token
    app.include_router(status_router(collector, token.get_secret_value() if token else None))

    @app.get("/health")
    async def health(request: Request) -> Response:
        s = node_state(request)
        check = getattr(s.engine, "check_ready", None)  # an upstream engine (vLLM) may be down or still loading
        ready = await check() if check is not None else True
        body = {"status": "ok" if ready else "unavailable", "model": s.engine.model_name,
                "address": s.identity.address, "tee": s.provider.tee_type, "version": __version__}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        body, content_type = node_state(request).metrics.render()
        return Response(body, media_type=content_type)

    install_openapi(app)  # after every route: request bodies, statuses and content types as the node answers
    if gate is not None:
        app.voucher_route = VoucherRoute(gate.accept, metrics, settings.limits.max_body_bytes)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: also counts 413s
    return app
