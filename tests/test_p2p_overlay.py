"""Ten real node processes on loopback form an overlay; a client discovers, verifies and ranks them.

Nodes 0-5 serve "demo", 6-7 serve "other" (all registered); node 8 serves "demo" but is not registered;
node 9 is registered but its attestation does not verify. An in-process attacker peer gossips a forged,
an expired and a replayed advert. The registry is an in-memory view (the only test double: the chain read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from eth_account import Account

from dcml.client.demo.kit.p2p import NodeInfo, NodeProcess, spawn, wait_ready
from dcml.client.network.bridge import TrioThread
from dcml.client.network.overlay import Overlay, OverlayConfig, peer_key_from_secret
from dcml.client.sdk.discovery import Discovery, RegisteredNode, StaticRegistry
from dcml.client.wire.advert import (
    Advert,
    AdvertDomain,
    AdvertReason,
    SignedAdvert,
    advert_dht_key,
    model_dht_key,
    resolve_model_id,
    sign_advert,
)

INTERVAL, TTL = 2.0, 6
DEMO, OTHER = resolve_model_id("demo"), resolve_model_id("other")
DOMAIN = AdvertDomain()


class Cluster:
    def __init__(self, procs: list[NodeProcess]) -> None:
        self.procs = procs
        self.nodes: list[NodeInfo] = [p.nodes[0] for p in procs]
        self.bootstrap = self.nodes[0].addrs[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base: Path = tmp_path_factory.mktemp("overlay")
    t0 = time.monotonic()
    first = wait_ready(spawn(base / "n0", ["demo"], interval=INTERVAL, ttl=TTL))
    boot = [first.nodes[0].addrs[0]]
    rest = [spawn(base / f"n{i}", ["demo"] if i < 6 or i >= 8 else ["other"], bootstrap=boot,
                  interval=INTERVAL, ttl=TTL, bad_attestation=(i == 9)) for i in range(1, 10)]
    procs = [first]
    try:
        procs += [wait_ready(p) for p in rest]
        logging.getLogger(__name__).info("10 node processes up in %.1f s", time.monotonic() - t0)
        yield Cluster(procs)
    finally:
        for p in [first, *rest]:
            p.stop()


@pytest.fixture(scope="module")
def registry(cluster: Cluster) -> StaticRegistry:
    return StaticRegistry([n.registered() for i, n in enumerate(cluster.nodes) if i != 8])


@pytest.fixture(scope="module")
def discovery(cluster: Cluster, registry: StaticRegistry) -> Iterator[Discovery]:
    with Discovery([cluster.bootstrap], registry, allow_simulated=True) as d:
        yield d


def discover_until(d: Discovery, model: str, want: set[str], timeout: float = 20.0) -> set[str]:
    deadline = time.monotonic() + timeout
    found: set[str] = set()
    while time.monotonic() < deadline:
        found = {o.address for o in d.discover(model)}
        if found == want:
            return found
        time.sleep(0.5)
    return found


def reasons_for(d: Discovery, node: str) -> set[AdvertReason]:
    return {i.reason for i in d.ignored if i.node == node}


def wait_for_reason(d: Discovery, node: str, reason: AdvertReason, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d.process_inbox()
        if reason in reasons_for(d, node):
            return True
        time.sleep(0.2)
    return False


def test_client_finds_exactly_the_nodes_serving_a_model(cluster: Cluster, discovery: Discovery,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dcml.discovery")
    n = cluster.nodes
    t0 = time.monotonic()
    demo = discover_until(discovery, "demo", {x.address for x in n[:6]})
    elapsed = time.monotonic() - t0
    assert demo == {x.address for x in n[:6]}, "every registered, attested demo node and nothing else"
    assert discover_until(discovery, "other", {n[6].address, n[7].address}) == {n[6].address, n[7].address}
    offers = discovery.discover("demo")
    assert all(o.model_id == DEMO and o.price_out == 2 and o.latency_ms > 0 for o in offers)
    assert [o.latency_ms for o in offers] == sorted(o.latency_ms for o in offers)  # equal prices: by latency
    # The unregistered node and the node whose attestation fails were seen and ignored, with a logged reason.
    assert wait_for_reason(discovery, n[8].address, AdvertReason.UNREGISTERED)
    discovery.discover("demo")
    assert AdvertReason.ATTESTATION_FAILED in reasons_for(discovery, n[9].address)
    logged = caplog.text
    assert f"node={n[8].address} reason=unregistered" in logged
    assert f"node={n[9].address} reason=attestation_failed" in logged
    print(f"\nall 6 demo nodes verified {elapsed:.2f} s after the first discover call")


def test_dht_holds_signed_adverts_of_model_providers(cluster: Cluster, discovery: Discovery) -> None:
    """The DHT path alone (providers of the model id -> signature-validated advert records) finds the demo nodes."""
    bridge, ov = discovery._bridge, discovery._overlay
    assert bridge is not None and ov is not None
    providers = set(bridge.call(ov.find_providers, model_dht_key(DEMO), timeout=30))
    n = cluster.nodes
    assert {x.peer_id for x in n[:6]} <= providers
    assert not providers & {x.peer_id for x in n[6:8]}  # "other" nodes do not provide "demo"
    for x in n[:6]:  # the iterative DHT lookup, validated by the namespaced validator
        raw = bridge.call(ov.get_value, advert_dht_key(x.peer_id), timeout=30)
        assert raw is not None and SignedAdvert.from_bytes(raw).advert.node == x.address


def test_api_stays_responsive_while_overlay_works(cluster: Cluster, discovery: Discovery) -> None:
    worst = 0.0
    with httpx.Client(timeout=5) as http:
        for _ in range(20):
            t0 = time.perf_counter()
            assert http.get(f"{cluster.nodes[0].endpoint}/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.05)
    assert worst < 0.5, f"/health took {worst:.3f} s on the bootstrap node"


@pytest.fixture(scope="module")
def attacker(cluster: Cluster, discovery: Discovery) -> Iterator[Overlay]:
    """A hostile peer on the overlay, also connected straight to the client (nodes drop forged gossip)."""
    bridge = TrioThread("attacker")
    holder: list[Overlay] = []
    client_addr = discovery._bridge.call(_addrs, discovery._overlay)[0]  # type: ignore[union-attr]

    async def setup(nursery: trio.Nursery) -> None:
        config = OverlayConfig(listen="/ip4/127.0.0.1/tcp/0", bootstrap=(cluster.bootstrap, client_addr),
                               dht_server=False)
        ov = Overlay(peer_key_from_secret(b"attacker"), config, DOMAIN)
        await ov.open(nursery)
        holder.append(ov)

    bridge.start(setup)
    holder[0].bridge = bridge  # type: ignore[attr-defined]
    yield holder[0]
    bridge.stop()


async def _addrs(ov: Overlay) -> list[str]:
    return ov.addrs()


def gossip(attacker: Overlay, data: bytes) -> None:
    attacker.bridge.call(attacker.publish, data, timeout=10)  # type: ignore[attr-defined]


def _advert(node: str, *, seq: int, issued: int, ttl: int = 60) -> Advert:
    return Advert(node=node, peerId="12D3KooWattacker", endpoint="http://127.0.0.1:9", models=[DEMO], pricesIn=[0],
                  pricesOut=[0], attestationHash="0x" + "ee" * 32, issuedAt=issued, expiresAt=issued + ttl,
                  sequence=seq)


def test_forged_expired_and_replayed_adverts_are_ignored(cluster: Cluster, registry: StaticRegistry,
                                                          discovery: Discovery, attacker: Overlay) -> None:
    victim = cluster.nodes[0]
    now = int(time.time())
    # Forged: claims to be node 0 (cheaper than everyone) but is signed by another key.
    fake = Advert(**{**_advert(victim.address, seq=2**40, issued=now).model_dump(by_alias=True),
                     "attestationHash": victim.attestation_hash})
    wrong_key = Account.create()
    sig = bytes(wrong_key.sign_message(fake.signable(DOMAIN)).signature).hex()
    # Expired: correctly signed by a registered key, but its expiry has passed.
    old_key = Account.create()
    registry.add(RegisteredNode(old_key.address, "0x" + "ee" * 32))
    expired = sign_advert(old_key, _advert(old_key.address, seq=1, issued=now - 120, ttl=60), DOMAIN)
    # Replayed: a genuine, still unexpired advert of node 0, re-sent after the node published a newer one.
    discovery.process_inbox()
    captured = discovery._latest[victim.address]
    deadline = time.monotonic() + 10
    while discovery._last_seq[victim.address] <= captured.advert.sequence and time.monotonic() < deadline:
        time.sleep(0.2)
        discovery.process_inbox()
    assert discovery._last_seq[victim.address] > captured.advert.sequence, "node 0 republishes every interval"

    for data in (SignedAdvert(advert=fake, signature="0x" + sig).to_bytes(), expired.to_bytes(), captured.to_bytes()):
        gossip(attacker, data)
    assert wait_for_reason(discovery, victim.address, AdvertReason.BAD_SIGNATURE)
    assert wait_for_reason(discovery, old_key.address, AdvertReason.EXPIRED)
    assert wait_for_reason(discovery, victim.address, AdvertReason.REPLAYED)
    # None of it changed what the client uses.
    offers = discovery.discover("demo")
    assert {o.address for o in offers} == {x.address for x in cluster.nodes[:6]}
    assert all(o.endpoint == x.endpoint for o in offers for x in cluster.nodes if x.address == o.address)


def test_node_that_leaves_disappears_once_its_advert_expires(cluster: Cluster, discovery: Discovery) -> None:
    leaving = cluster.nodes[7]
    assert leaving.address in {o.address for o in discovery.discover("other")}
    cluster.procs[7].stop()
    t0 = time.monotonic()
    while leaving.address in {a.node for a, _ in discovery.candidates(OTHER)}:
        assert time.monotonic() - t0 < TTL + INTERVAL + 5, "a stale advert outlived its expiry"
        asyncio.run(discovery.refresh(OTHER))
        time.sleep(0.5)
    assert {o.address for o in discovery.discover("other")} == {cluster.nodes[6].address}
