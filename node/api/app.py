"""The app factory: wires config, engine, enclave identity, TEE provider and receipt store into FastAPI.

Tests and the (later) payment gate inject their own parts through `create_app`'s keyword arguments.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from client.receipts import ReceiptDomain, model_id_for
from node import __version__
from node.api import attestation, openai, receipts
from node.api.body_limit import BodyLimitMiddleware
from node.api.errors import install_error_handlers
from node.api.metrics import MetricsMiddleware, NodeMetrics
from node.api.state import NodeState, node_state
from node.config import NodeSettings
from node.engine.base import Engine
from node.identity import EnclaveIdentity
from node.logging import get_logger
from node.payments.gate import PaymentGate
from node.payments.service import Payments, PaymentSettings
from node.receipts import ReceiptSigner, ReceiptStore
from node.tee.base import AttestationProvider

if TYPE_CHECKING:
    from node.model_source import EncryptedModelSource

log = get_logger("dcml.node")


def build_provider(settings: NodeSettings) -> AttestationProvider:
    tee = settings.tee
    if tee.provider == "simulated":
        from node.tee.simulated import SimulatedProvider

        return SimulatedProvider()
    if tee.provider == "tdx":
        from node.tee.tdx import TdxProvider

        return TdxProvider(**tee.options)  # type: ignore[arg-type]
    from node.tee.dstack import DstackProvider  # needs dstack-sdk: imported only when chosen

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
    from node.model_source import EncryptedModelSource  # torch: imported only when an encrypted model is used

    enc = settings.engine.encrypted
    assert enc is not None
    publisher, manifest_hash = enc.publisher, enc.manifest_hash
    if settings.payments.enabled and (publisher is None or manifest_hash is None):
        from web3 import Web3

        from client.contracts import contract
        from client.deployment import Deployment

        dep = Deployment.load(settings.payments.deployment)
        registry = contract(Web3(Web3.HTTPProvider(settings.payments.rpc_url or dep.rpc_url)), "ModelRegistry",
                            dep.model_registry)
        model = bytes.fromhex(model_id_for(settings.engine.served_model_name)[2:])
        publisher = publisher or registry.functions.terms(model).call()[0]
        manifest_hash = manifest_hash or "0x" + bytes(registry.functions.listing(model).call()[0]).hex()
    return EncryptedModelSource(enc.bundle_dir, enc.broker_url, publisher,
                                bytes.fromhex(manifest_hash.removeprefix("0x")) if manifest_hash else None)


def build_engine(settings: NodeSettings, identity: EnclaveIdentity, provider: AttestationProvider) -> Engine:
    e = settings.engine
    if e.kind == "synthetic":
        from node.engine.synthetic import SyntheticEngine

        return SyntheticEngine(model_name=e.served_model_name, **e.options)  # type: ignore[arg-type]
    if e.kind == "openai":
        from node.engine.openai_upstream import OpenAIUpstreamEngine

        if not e.base_url:
            raise ValueError("engine.kind = 'openai' needs engine.base_url (e.g. http://127.0.0.1:8000)")
        api_key = e.api_key.get_secret_value() if e.api_key else None
        tokenizer_dir = e.model_dir
        if e.encrypted is not None:  # clear weights in tmpfs for the vLLM sidecar, never on disk
            from node.model_source import materialize_to_tmpfs

            if e.encrypted.tmpfs_dir is None:
                raise ValueError("engine.encrypted with kind = 'openai' needs tmpfs_dir (a tmpfs mount vLLM reads)")
            materialize_to_tmpfs(encrypted_source(settings), identity, provider, e.encrypted.tmpfs_dir,
                                 node_version=__version__)
            tokenizer_dir = e.encrypted.tmpfs_dir
        return OpenAIUpstreamEngine(e.base_url, e.served_model_name, api_key=api_key,  # type: ignore[arg-type]
                                    tokenizer_dir=tokenizer_dir, **e.options)
    if e.encrypted is not None:  # decrypted in memory only
        from node.model_source import encrypted_embedded_engine

        return encrypted_embedded_engine(encrypted_source(settings), identity, provider, node_version=__version__,
                                         model_name=e.served_model_name, **e.options)  # type: ignore[arg-type]
    from node.engine.embedded import EmbeddedEngine  # torch: imported only when chosen

    if e.model_dir is None or not e.model_dir.is_dir():
        raise ValueError(f"engine.model_dir {e.model_dir} is not a directory; build the demo model or set "
                         "engine.kind = 'synthetic'")
    return EmbeddedEngine(e.model_dir, model_name=e.served_model_name, **e.options)  # type: ignore[arg-type]


def build_gate(settings: NodeSettings, identity: EnclaveIdentity, engine: Engine, domain: ReceiptDomain,
               model_id: str) -> PaymentGate:
    """Payments: the node's enclave key is the payee (clients pay only the key they attested)."""
    cfg = settings.payments
    if engine.model_name not in cfg.prices:
        raise ValueError(f"payments are on but [payments.prices.{engine.model_name}] is missing in the config")
    payments = Payments(PaymentSettings(cfg.deployment, settings.data_dir, settle_threshold=cfg.settle_threshold,
                                        settle_interval=cfg.settle_interval_s, rpc_url=cfg.rpc_url,
                                        close_margin=cfg.close_margin_s), identity.account)
    return PaymentGate(payments, cfg, signer=identity.account, receipt_domain=domain,
                       model_ids={engine.model_name: model_id})


def create_app(
    settings: NodeSettings,
    *,
    engine: Engine | None = None,
    identity: EnclaveIdentity | None = None,
    provider: AttestationProvider | None = None,
) -> FastAPI:
    provider = provider or build_provider(settings)
    identity = identity or build_identity(settings, provider)
    engine = engine or build_engine(settings, identity, provider)
    rc = settings.receipts
    metrics = NodeMetrics(engine.queue_depth)
    domain = ReceiptDomain(rc.chain_id, rc.verifying_contract)
    model_id = rc.model_id or model_id_for(engine.model_name)
    gate = build_gate(settings, identity, engine, domain, model_id) if settings.payments.enabled else None
    presence = None
    if settings.registry.enabled or settings.p2p.enabled:
        from node.network import NodePresence  # libp2p: imported only when the node joins the network

        presence = NodePresence(settings, identity, provider, model_id=model_id,
                                price=settings.payments.prices.get(engine.model_name))
    state = NodeState(
        settings=settings, engine=engine, identity=identity, provider=provider,
        store=ReceiptStore(settings.data_dir / "receipts.sqlite"),
        signer=ReceiptSigner(identity.account, domain, model_id),
        metrics=metrics, node_version=__version__, gate=gate,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if provider.tee_type == "simulated":
            log.warning("SIMULATED TEE: NOT CONFIDENTIAL. Keys and prompts are unprotected and clients refuse "
                        "this node unless they set allow_simulated. Development only.")
        state.store.open()
        await engine.start()
        if presence is not None:
            await presence.start()
        if gate is not None:
            gate.payments.start()
            log.info("payments_on", payee=identity.address, escrow=gate.payments.deployment.payment_channels,
                     chain_id=gate.payments.deployment.chain_id, token=gate.token)
        log.info("node_started", address=identity.address, tee=provider.tee_type, model=engine.model_name,
                 version=__version__, receipts_chain_id=rc.chain_id)
        try:
            yield
        finally:
            # uvicorn calls this after in-flight requests drained (or graceful_shutdown_s ran out).
            log.info("node_stopping")
            if presence is not None:
                await presence.stop()
            await engine.stop()
            await state.store.close()
            if gate is not None:  # settles whatever is unsettled before the process exits
                await run_in_threadpool(gate.payments.stop)
                gate.close()
            log.info("node_stopped")

    app = FastAPI(title="dcml node", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.node = state
    app.state.presence = presence
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(attestation.router)
    app.include_router(receipts.router)
    if gate is not None:
        app.include_router(gate.router())

    @app.get("/health")
    async def health(request: Request) -> dict:
        s = node_state(request)
        return {"status": "ok", "model": s.engine.model_name, "address": s.identity.address,
                "tee": s.provider.tee_type, "version": __version__}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        body, content_type = node_state(request).metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: also counts 413s
    return app
