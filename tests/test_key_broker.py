"""Key broker: releases a model key only to a fresh, allowed, registered enclave, sealed to its HPKE key."""

from __future__ import annotations

import base64
import os

import pytest
from fastapi.testclient import TestClient

from dcml.client.attestation.verify import Policy
from dcml.client.chain.devnet import NODE_MIN_STAKE
from dcml.client.chain.registry import RegistryClient
from dcml.client.demo.kit.nodes import simulated_measurement
from dcml.client.publisher.bundle import generate_key
from dcml.client.publisher.cli import publish_model
from dcml.client.publisher.key_broker import (
    AuditLog,
    ChainMeasurements,
    KeyBroker,
    ModelEntry,
    NonceStore,
    RateLimiter,
    RegistryNodeCheck,
    create_app,
)
from dcml.client.wire.key_release import open_model_key, seal_model_key
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.simulated import SimulatedProvider

MODEL = bytes.fromhex("ab" * 32)
URL = f"/v1/models/0x{MODEL.hex()}"
PROVIDER = SimulatedProvider()


SIM = simulated_measurement(PROVIDER)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(tmp_path, clock):
    def build(**kw) -> tuple[TestClient, KeyBroker]:
        entry = ModelEntry(model_id=MODEL, key=kw.pop("key", b"k" * 32),
                           allowed_measurements=kw.pop("allowed", frozenset({SIM})))
        broker = KeyBroker(models={MODEL: entry}, policy=Policy(), audit=AuditLog(tmp_path / "audit.sqlite"),
                           allow_simulated=kw.pop("allow_simulated", True), nonces=NonceStore(60, clock=clock),
                           limiter=kw.pop("limiter", RateLimiter(per_minute=600, burst=100, clock=clock)), **kw)
        return TestClient(create_app(broker)), broker
    return build


def _attest(client: TestClient, ident: EnclaveIdentity, nonce: bytes | None = None) -> tuple[bytes, dict]:
    nonce = nonce or bytes.fromhex(client.get(URL + "/nonce", params={"node": ident.address}).json()["nonce"])
    doc = build_attestation_document(ident, PROVIDER, nonce, node_version="t")
    return nonce, {"nonce": nonce.hex(), "attestation": doc.model_dump(mode="json")}


def _refused(response, code: str, status: int = 403) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_releases_key_sealed_to_the_attested_hpke_key_only(make):
    client, broker = make(key=b"K" * 32)
    ident = EnclaveIdentity.generate()
    nonce, body = _attest(client, ident)
    r = client.post(URL + "/key", json=body)
    assert r.status_code == 200, r.text
    sealed = base64.b64decode(r.json()["sealed_key"])
    assert open_model_key(sealed, ident.hpke_private_key, model_id=MODEL, nonce=nonce) == b"K" * 32
    for other in (EnclaveIdentity.generate().hpke_private_key,):
        with pytest.raises(ValueError, match="does not open"):
            open_model_key(sealed, other, model_id=MODEL, nonce=nonce)
    with pytest.raises(ValueError):  # bound to the model and nonce too
        open_model_key(sealed, ident.hpke_private_key, model_id=bytes(32), nonce=nonce)
    log = broker.audit.entries()
    assert [(e["outcome"], e["node"], e["measurement"]) for e in log] == [("released", ident.address, SIM.hex())]


def test_sealed_key_cannot_be_opened_by_any_other_key():
    key, nonce = generate_key(), os.urandom(32)
    target = EnclaveIdentity.generate()
    sealed = seal_model_key(key, target.hpke_public_bytes(), model_id=MODEL, nonce=nonce)
    for _ in range(3):
        with pytest.raises(ValueError):
            open_model_key(sealed, EnclaveIdentity.generate().hpke_private_key, model_id=MODEL, nonce=nonce)
    assert open_model_key(sealed, target.hpke_private_key, model_id=MODEL, nonce=nonce) == key


def test_simulated_quote_refused_without_development_flag(make):
    client, broker = make(allow_simulated=False)
    _, body = _attest(client, EnclaveIdentity.generate())
    _refused(client.post(URL + "/key", json=body), "simulated_refused")
    assert broker.audit.entries()[-1]["outcome"] == "refused"


def test_measurement_not_allowed_is_refused(make):
    client, _ = make(allowed=frozenset({os.urandom(32)}))
    _, body = _attest(client, EnclaveIdentity.generate())
    _refused(client.post(URL + "/key", json=body), "measurement_not_allowed")
    client, _ = make(allowed=frozenset())  # an empty allow-list fails closed
    _, body = _attest(client, EnclaveIdentity.generate())
    _refused(client.post(URL + "/key", json=body), "measurement_not_allowed")


def test_revoked_measurement_and_node_are_refused(make):
    client, broker = make()
    ident = EnclaveIdentity.generate()
    broker.audit.revoke("node", ident.address)
    _refused(client.post(URL + "/key", json=_attest(client, ident)[1]), "revoked")
    other = EnclaveIdentity.generate()
    assert client.post(URL + "/key", json=_attest(client, other)[1]).status_code == 200
    broker.audit.revoke("measurement", SIM.hex(), model_id="0x" + MODEL.hex())
    _refused(client.post(URL + "/key", json=_attest(client, other)[1]), "revoked")


def test_stale_reused_and_replayed_nonces_are_refused(make, clock):
    client, _ = make()
    ident = EnclaveIdentity.generate()
    _, body = _attest(client, ident)
    clock.now += 61
    _refused(client.post(URL + "/key", json=body), "nonce_unknown")  # stale

    _, body = _attest(client, ident)
    assert client.post(URL + "/key", json=body).status_code == 200
    _refused(client.post(URL + "/key", json=body), "nonce_unknown")  # reused nonce

    fresh = client.get(URL + "/nonce", params={"node": ident.address}).json()["nonce"]
    replay = {**body, "nonce": fresh}  # the old document under a fresh nonce
    r = client.post(URL + "/key", json=replay)
    _refused(r, "nonce_unknown")
    assert "replayed" in r.json()["error"]["message"]
    _refused(client.post(URL + "/key", json={**body, "nonce": "00" * 32}), "nonce_unknown")  # never issued


def test_rate_limit_and_bad_requests(make, clock):
    client, _ = make(limiter=RateLimiter(per_minute=60, burst=2, clock=clock))
    node = {"node": EnclaveIdentity.generate().address}
    assert client.get(URL + "/nonce", params=node).status_code == 200
    assert client.get(URL + "/nonce", params=node).status_code == 200
    r = client.get(URL + "/nonce", params=node)
    _refused(r, "rate_limited", 429)
    assert r.headers["Retry-After"]
    clock.now += 1
    assert client.get(URL + "/nonce", params=node).status_code == 200
    clock.now += 10
    _refused(client.get("/v1/models/0x" + "cd" * 32 + "/nonce", params=node), "unknown_model", 404)
    _refused(client.post(URL + "/key", json={"nonce": "zz"}), "bad_request", 400)
    clock.now += 10
    _refused(client.get(URL + "/nonce"), "bad_request", 400)  # a nonce is always bound to a requesting node


def test_unregistered_node_refused_and_measurements_read_on_chain(make, w3, deployment, node_account, publisher):
    registry = RegistryClient(w3, deployment.node_registry)
    registered, stranger = EnclaveIdentity.generate(), EnclaveIdentity.generate()
    ensure_registered(w3, deployment.node_registry, registered, PROVIDER, node_account, endpoint="http://n",
                      peer_id=b"\x00\x24" + os.urandom(34), stake=NODE_MIN_STAKE, node_version="t")
    from dcml.client.publisher.bundle import Manifest, SignedManifest

    manifest = Manifest(model_id="0x" + MODEL.hex(), model_name="m", publisher=publisher.address, chunk_size=1,
                        created_at=0, key_commitment="00", weights_hash="0x" + "11" * 32, files=[])
    publish_model(w3, deployment.model_registry, publisher, SignedManifest(manifest=manifest, signature="0x"),
                  royalty_bps=100, price_floor=1, broker_url="http://broker", measurements=[SIM])
    chain = ChainMeasurements(w3, deployment.model_registry)
    client, _ = make(allowed=frozenset(), node_check=RegistryNodeCheck(registry), measurements=chain)
    _refused(client.post(URL + "/key", json=_attest(client, stranger)[1]), "unregistered")
    assert client.post(URL + "/key", json=_attest(client, registered)[1]).status_code == 200


# ---- issue 19, finding 9: nonce flooding --------------------------------------------------------

def test_nonce_flood_from_many_sources_does_not_starve_a_real_node(make):
    """10,000 nonces from 1,000 source addresses (the pool the v1 broker kept held 10,000 at most), asked
    for the real node's address and for strangers': the real node still gets its key, and a nonce asked for
    one node is refused for another."""
    import httpx

    _, broker = make()
    app = create_app(broker)
    real = EnclaveIdentity.generate()

    async def flood() -> int:
        ok = 0
        for i in range(1000):
            transport = httpx.ASGITransport(app=app, client=(f"10.{i // 250}.{i % 250}.1", 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://broker") as c:
                for j in range(10):
                    who = real.address if j % 2 else "0x" + os.urandom(20).hex()
                    ok += (await c.get(URL + "/nonce", params={"node": who})).status_code == 200
        return ok

    import asyncio

    assert asyncio.run(flood()) == 10_000
    client = TestClient(app)
    stolen = bytes.fromhex(client.get(URL + "/nonce", params={"node": real.address}).json()["nonce"])
    _, body = _attest(client, EnclaveIdentity.generate(), stolen)  # another enclave uses the real node's nonce
    _refused(client.post(URL + "/key", json=body), "nonce_unknown")
    nonce, body = _attest(client, real)
    r = client.post(URL + "/key", json=body)
    assert r.status_code == 200, r.text
    assert open_model_key(base64.b64decode(r.json()["sealed_key"]), real.hpke_private_key, model_id=MODEL,
                          nonce=nonce) == b"k" * 32
