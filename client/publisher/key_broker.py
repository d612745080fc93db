"""The publisher's key broker: releases a model key only to an attested, registered, allowed enclave.

Protocol (JSON over HTTP)::

    GET  /v1/models/{model_id}/nonce?node=<signing address>  -> {"nonce": <64 hex>, "expires_in": s}
    POST /v1/models/{model_id}/key    {"nonce": <hex>, "attestation": AttestationDocument}
                                      -> {"model_id", "kid", "sealed_key": <base64>, "manifest_hash"}
    GET  /v1/models/{model_id}/manifest, /v1/models/{model_id}/files/{path}   (the public bundle)

A nonce is bound to the model and to the requesting node's signing address (an HMAC under a broker secret,
see `NonceStore`), single-use and short-lived, so a document is good for one request, and issuing one keeps
no state: strangers asking for nonces cannot exhaust anything a real node needs. A key is released when:
the document verifies with `client.attestation.verify_attestation` against the broker's policy and
that nonce (simulated quotes only with the development flag); the enclave's measurement id is in the
model's allow-list (the on-chain `ModelRegistry.allowedMeasurements` when a registry is configured)
and not revoked; and, when a NodeRegistry is configured, the node is active there with the same HPKE
key and TEE type. The key is sealed with HPKE (`client.identity.HPKE_SUITE`) to the attested HPKE key,
with ``info = b"dcml-model-key-v1" || model_id || nonce``. Every decision goes to the audit log.

Measurement id (32 bytes, what `ModelRegistry` lists): the compose hash for dstack, otherwise
``sha256(b"dcml-measurement-v1" || MRTD || RTMR0 || RTMR1 || RTMR2 || RTMR3)``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from web3 import Web3

from dcml.client.attestation.verify import (
    AttestationDocument,
    AttestationError,
    Policy,
    VerifiedNode,
    verify_attestation,
)
from dcml.client.chain.registration import TEE_TYPES
from dcml.client.chain.registry import RegistryClient, key_matches
from dcml.client.publisher.broker_state import AuditLog, BrokerReason, BrokerRefusal, NonceStore, RateLimiter
from dcml.client.publisher.bundle import MANIFEST_FILE, SignedManifest
from dcml.client.wire.errors import AttestationReason
from dcml.client.wire.key_release import seal_model_key


def measurement_id(node: VerifiedNode) -> bytes:
    if node.compose_hash:
        return bytes.fromhex(node.compose_hash)
    m = node.measurements
    return hashlib.sha256(b"dcml-measurement-v1" + b"".join(
        bytes.fromhex(v) for v in (m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2, m.rtmr3))).digest()


def _measurement_values(node: VerifiedNode) -> set[str]:
    m = node.measurements
    values = {measurement_id(node).hex(), m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2, m.rtmr3}
    return {v.lower() for v in values}


# --- registries ---------------------------------------------------------------------------------


class RegistryNodeCheck:
    """The node must be active in the on-chain NodeRegistry with the attested HPKE key and TEE type."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry

    def __call__(self, node: VerifiedNode) -> None:
        record = self.registry.node(node.signing_address)
        if record is None or not self.registry.is_active(node.signing_address):
            raise BrokerRefusal(BrokerReason.UNREGISTERED, f"{node.signing_address} is not an active node in "
                                f"NodeRegistry {self.registry.address}: register (and stake) first")
        if not key_matches(record, node.hpke_public_key):  # the record keeps keccak256 of the key
            raise BrokerRefusal(BrokerReason.UNREGISTERED, "the attested HPKE key is not the one registered for "
                                "this node: re-attest on-chain after a key change")
        if record.tee_type != TEE_TYPES.get(node.tee_type):
            raise BrokerRefusal(BrokerReason.UNREGISTERED, f"node registered as TEE type {record.tee_name}, "
                                f"attests as {node.tee_type}")


class ChainMeasurements:
    """`ModelRegistry.allowedMeasurements(modelId)`, read on every request so revocations apply at once."""

    def __init__(self, w3: Web3, model_registry: str) -> None:
        from dcml.client.chain.contracts import contract

        self.contract = contract(w3, "ModelRegistry", model_registry)

    def __call__(self, model_id: bytes) -> frozenset[bytes]:
        return frozenset(bytes(m) for m in self.contract.functions.allowedMeasurements(model_id).call())


# --- the broker ---------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    model_id: bytes
    key: bytes = field(repr=False)
    allowed_measurements: frozenset[bytes] = frozenset()  # used when no ModelRegistry is configured
    bundle_dir: Path | None = None  # served read-only (it holds only sealed weights and clear metadata)
    manifest: SignedManifest | None = None


class KeyRequest(BaseModel):
    nonce: str
    attestation: AttestationDocument


class KeyRelease(BaseModel):
    model_id: str
    kid: str  # sha256 of the HPKE public key the key is sealed to
    sealed_key: str  # base64
    manifest_hash: str | None = None


@dataclass
class KeyBroker:
    models: dict[bytes, ModelEntry]
    policy: Policy
    audit: AuditLog
    allow_simulated: bool = False  # DEVELOPMENT ONLY: accept simulated (not confidential) quotes
    node_check: Callable[[VerifiedNode], None] | None = None  # e.g. RegistryNodeCheck
    measurements: Callable[[bytes], frozenset[bytes]] | None = None  # e.g. ChainMeasurements
    nonces: NonceStore = field(default_factory=NonceStore)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    collateral: Any = None  # passed to verify_attestation (default: its FMSPC cache)

    def model(self, model_id: bytes) -> ModelEntry:
        entry = self.models.get(model_id)
        if entry is None:
            raise BrokerRefusal(BrokerReason.UNKNOWN_MODEL, f"this broker holds no key for model 0x{model_id.hex()}")
        return entry

    def issue_nonce(self, model_id: bytes, node: str) -> bytes:
        self.model(model_id)
        return self.nonces.issue(model_id, _address(node))

    def release(self, model_id: bytes, request: KeyRequest, client: str = "") -> KeyRelease:
        """Check everything and seal the key, logging the outcome (release or refusal) either way."""
        mid = "0x" + model_id.hex()
        doc = request.attestation
        log: dict[str, Any] = {"model_id": mid, "client": client, "node": doc.signing_address,
                               "quote_sha256": hashlib.sha256(doc.quote.encode()).hexdigest()}
        try:
            out = self._release(model_id, request, log)
        except BrokerRefusal as exc:
            self.audit.record(outcome="refused", reason=exc.detail or exc.reason.value, **log)
            raise
        self.audit.record(outcome="released", **log)
        return out

    def _release(self, model_id: bytes, request: KeyRequest, log: dict[str, Any]) -> KeyRelease:
        entry = self.model(model_id)
        try:
            nonce = bytes.fromhex(request.nonce.removeprefix("0x"))
        except ValueError as exc:
            raise BrokerRefusal(BrokerReason.BAD_REQUEST, "nonce is not hex") from exc
        self.nonces.check(model_id, _address(request.attestation.signing_address), nonce)  # before costly checks
        try:
            node = verify_attestation(request.attestation, nonce=nonce, policy=self.policy,
                                      collateral=self.collateral, allow_simulated=self.allow_simulated)
        except AttestationError as exc:
            reason = (BrokerReason.SIMULATED_REFUSED if exc.reason == AttestationReason.SIMULATED_REFUSED
                      else BrokerReason.ATTESTATION)
            if exc.reason == AttestationReason.NONCE_MISMATCH:
                raise BrokerRefusal(BrokerReason.NONCE_UNKNOWN, "the attestation answers another nonce (a replayed "
                                    "document): attest again over the nonce you were given", exc.reason.value) from exc
            raise BrokerRefusal(reason, str(exc), exc.reason.value) from exc
        self.nonces.consume(model_id, _address(node.signing_address), nonce)
        mid_hex = measurement_id(node).hex()
        log.update(node=node.signing_address, measurement=mid_hex,
                   kid=hashlib.sha256(node.hpke_public_key).hexdigest())

        allowed = self.measurements(model_id) if self.measurements else entry.allowed_measurements
        if measurement_id(node) not in allowed:  # an empty list refuses everyone (fail closed)
            raise BrokerRefusal(BrokerReason.MEASUREMENT_NOT_ALLOWED,
                                f"measurement id {mid_hex} is not allowed for this model; the publisher must add it "
                                "(ModelRegistry.setAllowedMeasurements or --allow-measurement)")
        hit = self.audit.revoked("measurement", _measurement_values(node), log["model_id"])
        if hit:
            raise BrokerRefusal(BrokerReason.REVOKED, f"measurement {hit} was revoked by the publisher")
        if self.audit.revoked("node", {node.signing_address.lower().removeprefix("0x")}, log["model_id"]):
            raise BrokerRefusal(BrokerReason.REVOKED, f"node {node.signing_address} was revoked by the publisher")
        if self.node_check is not None:
            self.node_check(node)

        sealed = seal_model_key(entry.key, node.hpke_public_key, model_id=model_id, nonce=nonce)
        manifest_hash = entry.manifest.manifest_hash.hex() if entry.manifest else None
        return KeyRelease(model_id=log["model_id"], kid=log["kid"], sealed_key=base64.b64encode(sealed).decode(),
                          manifest_hash=manifest_hash)


def _model_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise BrokerRefusal(BrokerReason.BAD_REQUEST, "model id must be 32 bytes of hex (0x + 64 hex digits)")
    return raw


def _address(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except (ValueError, AttributeError):
        raw = b""
    if len(raw) != 20:
        raise BrokerRefusal(BrokerReason.BAD_REQUEST, "node must be the requesting enclave's signing address "
                            "(0x + 40 hex digits): the nonce is bound to it")
    return raw


def _refusal(exc: BrokerRefusal) -> JSONResponse:
    headers = {"Retry-After": "60"} if exc.reason == BrokerReason.RATE_LIMITED else None
    body = exc.to_wire()  # the one wire error shape, with the verifier's own reason beside it
    body["error"]["detail"] = exc.detail
    return JSONResponse(body, status_code=exc.status, headers=headers)


def create_app(broker: KeyBroker) -> FastAPI:
    app = FastAPI(title="dcml key broker")
    app.state.broker = broker

    @app.exception_handler(BrokerRefusal)
    async def _handle(_: Request, exc: BrokerRefusal) -> JSONResponse:
        return _refusal(exc)

    def _client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    @app.get("/v1/models/{model_id}/nonce")
    def nonce(model_id: str, request: Request, node: str = "") -> dict[str, Any]:
        broker.limiter.check(_client(request))
        return {"nonce": broker.issue_nonce(_model_id(model_id), node).hex(), "expires_in": broker.nonces.ttl_s}

    @app.post("/v1/models/{model_id}/key")
    async def key(model_id: str, request: Request) -> JSONResponse:
        client = _client(request)
        broker.limiter.check(client)
        mid = _model_id(model_id)
        try:
            body = KeyRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise BrokerRefusal(BrokerReason.BAD_REQUEST, f"body must be {{nonce, attestation}}: {exc}") from exc
        release = await asyncio.to_thread(broker.release, mid, body, client)  # verification is CPU work
        return JSONResponse(release.model_dump())

    @app.get("/v1/models/{model_id}/manifest")
    def manifest(model_id: str) -> JSONResponse:
        entry = broker.model(_model_id(model_id))
        if entry.manifest is None:
            raise BrokerRefusal(BrokerReason.UNKNOWN_MODEL, "this broker does not serve the bundle")
        return JSONResponse(entry.manifest.model_dump())

    @app.get("/v1/models/{model_id}/files/{path:path}")
    def bundle_file(model_id: str, path: str) -> FileResponse:
        entry = broker.model(_model_id(model_id))
        if entry.manifest is None or entry.bundle_dir is None:
            raise BrokerRefusal(BrokerReason.UNKNOWN_MODEL, "this broker does not serve the bundle")
        # Only files the manifest names (never a path the client makes up): no traversal, no key files.
        served = {MANIFEST_FILE} | {f.sealed.path if f.sealed else f.name for f in entry.manifest.manifest.files}
        if path not in served:
            raise BrokerRefusal(BrokerReason.UNKNOWN_MODEL, f"{path} is not part of the bundle")
        return FileResponse(entry.bundle_dir / path)

    return app
