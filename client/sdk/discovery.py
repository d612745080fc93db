"""Finding nodes: signed adverts from the libp2p overlay (gossip + DHT), checked against registry and attestation.

An advert is accepted only if, in this order: its signature recovers to the node it names; the registry
holds that node, active, with the same attestation hash (and peer id, if recorded); it has not expired;
its sequence is not older than the last one seen from that node (replay); and the node's live
attestation, fetched now with a fresh nonce, verifies for that key. Every ignored advert is logged with
its reason (and kept in `Discovery.ignored`). Offers are ranked by price, then measured latency.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import httpx
import trio

from dcml.client.attestation.verify import AttestationDocument, AttestationError, Policy, verify_attestation
from dcml.client.chain.registry import RegistryClient
from dcml.client.wire.advert import (
    Advert,
    AdvertDomain,
    AdvertError,
    AdvertReason,
    NodeOffer,
    SignedAdvert,
    advert_dht_key,
    check_fresh,
    model_dht_key,
    rank_offers,
    resolve_model_id,
    verify_signature,
)

if TYPE_CHECKING:
    from dcml.client.network.bridge import TrioThread
    from dcml.client.network.overlay import Overlay

log = logging.getLogger("dcml.discovery")
_STORED = ("dht", "sync")  # copies held by others: stale or expired ones are expected, not hostile


# --- the registry, as discovery needs it ------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredNode:
    """What the NodeRegistry says about a node (only the fields discovery checks)."""

    address: str
    attestation_hash: str  # bytes32 hex
    active: bool = True
    peer_id: str = ""  # empty: not recorded, not checked
    endpoint: str = ""
    hpke_public_key: bytes = b""  # empty: not checked
    tee_type: str = ""


class RegistryView(Protocol):
    def get_node(self, address: str) -> RegisteredNode | None: ...


@runtime_checkable
class RegistryPeers(Protocol):
    """Optional: the libp2p peer ids of registered nodes (from the registry's events), looked up in the DHT."""

    def peer_ids(self) -> Iterable[str]: ...


class StaticRegistry:
    """An in-memory registry view (tests, benchmarks, offline development); the chain reader has the same shape."""

    def __init__(self, nodes: Iterable[RegisteredNode] = ()) -> None:
        self._nodes = {n.address.lower(): n for n in nodes}

    def add(self, node: RegisteredNode) -> None:
        self._nodes[node.address.lower()] = node

    def get_node(self, address: str) -> RegisteredNode | None:
        return self._nodes.get(address.lower())

    def peer_ids(self) -> list[str]:
        return [n.peer_id for n in self._nodes.values() if n.peer_id and n.active]


class ChainRegistry:
    """The on-chain NodeRegistry seen through `RegistryView` (and `RegistryPeers`, from its records)."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry

    def get_node(self, address: str) -> RegisteredNode | None:
        record = self.registry.node(address)
        if record is None:
            return None
        return RegisteredNode(
            address=record.node, attestation_hash="0x" + record.attestation_hash.hex(),
            active=self.registry.is_active(record.node),
            peer_id=_peer_id_text(record.peer_id), endpoint=record.endpoint,
            hpke_public_key=record.hpke_public_key, tee_type=record.tee_name)

    def peer_ids(self) -> list[str]:
        return [_peer_id_text(r.peer_id) for r in self.registry.nodes() if r.peer_id]


def _peer_id_text(raw: bytes) -> str:
    from libp2p.peer.id import ID  # libp2p only where the overlay is used

    return ID(raw).to_base58() if raw else ""


def _hex32(value: str | bytes) -> str:
    return (value if isinstance(value, str) else "0x" + bytes(value).hex()).lower()


# --- discovery ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ignored:
    node: str
    reason: AdvertReason
    detail: str
    source: str
    at: float = field(default_factory=time.time)


@dataclass
class _Attested:
    verified_at: float
    tee_type: str


class Discovery:
    """A libp2p client host (own trio thread) that collects adverts; `discover(model)` returns verified offers.

    `bootstrap`: multiaddrs with /p2p/<peer id>. `registry`: anything with `get_node(address)` (the on-chain
    `client.registry.RegistryClient` through an adapter, or `StaticRegistry`).
    """

    def __init__(self, bootstrap: Sequence[str], registry: RegistryView, *, policy: Policy | None = None,
                 allow_simulated: bool = False, domain: AdvertDomain | None = None,
                 listen: str = "/ip4/127.0.0.1/tcp/0", http_timeout_s: float = 5.0,
                 attestation_ttl_s: float = 300.0, registry_ttl_s: float = 10.0, max_ignored: int = 1000) -> None:
        self.bootstrap = tuple(bootstrap)
        self.registry = registry
        self.policy = policy or Policy()
        self.allow_simulated = allow_simulated
        self.domain = domain or AdvertDomain()
        self.listen = listen
        self.http_timeout_s = http_timeout_s
        self.attestation_ttl_s = attestation_ttl_s
        self.registry_ttl_s = registry_ttl_s
        self.ignored: collections.deque[Ignored] = collections.deque(maxlen=max_ignored)
        self._inbox: collections.deque[tuple[bytes, str]] = collections.deque(maxlen=10_000)
        self._lock = threading.Lock()
        self._latest: dict[str, SignedAdvert] = {}  # node address -> newest authentic, registered advert
        self._last_seq: dict[str, int] = {}
        self._registry_cache: dict[str, tuple[float, RegisteredNode | None]] = {}
        self._attested: dict[tuple[str, str, str], _Attested] = {}
        self._bridge: TrioThread | None = None
        self._overlay: Overlay | None = None

    # lifecycle ------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Discovery:
        from dcml.client.network.bridge import TrioThread  # libp2p (heavy) only when the overlay is used
        from dcml.client.network.overlay import Overlay, OverlayConfig, peer_key_from_secret

        config = OverlayConfig(listen=self.listen, bootstrap=self.bootstrap, dht_server=False)
        self._bridge = TrioThread("libp2p-client")

        async def setup(nursery: trio.Nursery) -> None:
            self._overlay = Overlay(peer_key_from_secret(os.urandom(32)), config, self.domain,
                                    on_message=self._on_message)
            await self._overlay.open(nursery)

        self._bridge.start(setup, timeout)
        return self

    def stop(self) -> None:
        if self._bridge is not None:
            self._bridge.stop()
            self._bridge = None

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_message(self, data: bytes, from_peer: str) -> None:  # trio thread: only enqueue
        self._inbox.append((data, "gossip"))

    # admission: signature -> registry -> expiry -> replay ------------------------------------------------

    def _ignore(self, node: str, reason: AdvertReason, detail: str, source: str) -> None:
        self.ignored.append(Ignored(node, reason, detail, source))
        log.warning("advert ignored: node=%s reason=%s source=%s: %s", node or "?", reason.value, source, detail)

    def _registered(self, address: str) -> RegisteredNode | None:
        now = time.monotonic()
        hit = self._registry_cache.get(address)
        if hit is not None and now - hit[0] < self.registry_ttl_s:
            return hit[1]
        node = self.registry.get_node(address)
        self._registry_cache[address] = (now, node)
        return node

    def admit(self, raw: bytes, source: str = "direct") -> Advert | None:
        """Run the offline checks on one received advert; keep it if it passes. Returns it, or None."""
        node = ""
        try:
            signed = SignedAdvert.from_bytes(raw)
            node = signed.advert.node
            advert = verify_signature(signed, self.domain)
            reg = self._registered(advert.node)
            if reg is None:
                raise AdvertError(AdvertReason.UNREGISTERED, "not in the NodeRegistry")
            if not reg.active:
                raise AdvertError(AdvertReason.INACTIVE, "registered but not active (exiting or slashed)")
            if _hex32(reg.attestation_hash) != advert.attestation_hash:
                raise AdvertError(AdvertReason.ATTESTATION_HASH_MISMATCH, f"advert claims {advert.attestation_hash}, "
                                  f"registry holds {_hex32(reg.attestation_hash)}")
            if reg.peer_id and reg.peer_id != advert.peer_id:
                raise AdvertError(AdvertReason.PEER_ID_MISMATCH, f"registry peer id {reg.peer_id} != {advert.peer_id}")
            check_fresh(advert)
            with self._lock:
                last = self._last_seq.get(advert.node, -1)
                if source in _STORED and advert.sequence <= last:
                    # DHT and sync copies lag the gossip: stale, not hostile (and ignored all the same).
                    log.debug("stale %s advert of %s (%d <= %d)", source, advert.node, advert.sequence, last)
                    return None
                if advert.sequence < last or (advert.sequence == last and self._latest[advert.node] != signed):
                    raise AdvertError(AdvertReason.REPLAYED,
                                      f"sequence {advert.sequence} is older than the last seen ({last})")
                if advert.sequence > last:
                    self._last_seq[advert.node] = advert.sequence
                    self._latest[advert.node] = signed
            return advert
        except AdvertError as exc:
            if source in _STORED and exc.reason is AdvertReason.EXPIRED:  # a departed node's record, still held
                log.debug("expired DHT advert of %s: %s", node, exc)
                return None
            self._ignore(node, exc.reason, str(exc).split(": ", 1)[-1], source)
            return None

    def process_inbox(self) -> None:
        """Admit (or ignore, with a logged reason) every advert received by gossip since the last call."""
        while self._inbox:
            raw, source = self._inbox.popleft()
            self.admit(raw, source)

    # DHT ------------------------------------------------------------------------------------------------

    async def _sync_adverts(self, max_peers: int = 3) -> list[bytes]:
        """Trio side: the adverts a few connected peers (bootstrap first) hold; one round trip each."""
        ov = self._overlay
        assert ov is not None
        connected = ov.connected_peers()
        boot = [str(b.peer_id) for b in ov.bootstrap if str(b.peer_id) in connected]
        peers = (boot + [p for p in connected if p not in boot])[:max_peers]
        out: list[bytes] = []

        async def ask(peer: str) -> None:
            with trio.move_on_after(self.http_timeout_s):
                try:
                    out.extend(await ov.sync_adverts(peer))
                except Exception as exc:
                    log.debug("advert sync with %s failed: %r", peer, exc)

        async with trio.open_nursery() as n:
            for peer in peers:
                n.start_soon(ask, peer)
        return out

    async def _dht_adverts(self, model_id: str | None, known: set[str]) -> list[bytes]:
        """Trio side: providers of the model (and registry peers) not yet `known` -> their signed advert records."""
        ov = self._overlay
        assert ov is not None
        peers: set[str] = set()
        if model_id is not None:
            with trio.move_on_after(self.http_timeout_s):
                peers.update(await ov.find_providers(model_dht_key(model_id)))
        if isinstance(self.registry, RegistryPeers):
            peers.update(self.registry.peer_ids())
        peers -= known
        out: list[bytes] = []
        limiter = trio.CapacityLimiter(16)

        async def fetch(peer: str) -> None:
            async with limiter:
                with trio.move_on_after(self.http_timeout_s):
                    key = advert_dht_key(peer)
                    value = None
                    try:  # ask the provider itself first, then search the DHT
                        value = await ov.get_value_from(peer, key)
                    except Exception as exc:
                        log.debug("provider %s did not return its advert record: %r", peer, exc)
                    try:
                        value = value or await ov.get_value(key)
                    except Exception as exc:
                        log.debug("DHT advert of %s unavailable: %r", peer, exc)
                    if value is not None:
                        out.append(value)

        async with trio.open_nursery() as n:
            for peer in peers:
                n.start_soon(fetch, peer)
        return out

    async def refresh(self, model_id: str | None = None, *, use_dht: bool = True) -> None:
        """Pull adverts held by connected peers, then from the DHT (providers of `model_id` and registry peers
        we hold nothing from), and admit everything received."""
        if self._bridge is not None:
            for raw in await self._bridge.acall(self._sync_adverts):
                self._inbox.append((raw, "sync"))
        self.process_inbox()
        if use_dht and self._bridge is not None:
            with self._lock:
                known = {s.advert.peer_id for s in self._latest.values()}
            for raw in await self._bridge.acall(self._dht_adverts, model_id, known):
                self._inbox.append((raw, "dht"))
            self.process_inbox()

    # live checks -------------------------------------------------------------------------------------

    async def _attest(self, http: httpx.AsyncClient, advert: Advert) -> str:
        key = (advert.node, advert.endpoint, advert.attestation_hash)
        hit = self._attested.get(key)
        if hit is not None and time.monotonic() - hit.verified_at < self.attestation_ttl_s:
            return hit.tee_type
        nonce = os.urandom(32)
        try:
            r = await http.get(f"{advert.endpoint}/v1/attestation", params={"nonce": nonce.hex()})
            r.raise_for_status()
            doc = AttestationDocument.model_validate_json(r.content)
        except (httpx.HTTPError, ValueError) as exc:
            raise AdvertError(AdvertReason.UNREACHABLE,
                              f"GET {advert.endpoint}/v1/attestation failed: {exc!r}") from exc
        try:
            verified = await asyncio.to_thread(verify_attestation, doc, nonce=nonce, policy=self.policy,
                                               allow_simulated=self.allow_simulated)
        except AttestationError as exc:
            raise AdvertError(AdvertReason.ATTESTATION_FAILED, str(exc)) from exc
        if verified.signing_address != advert.node:
            raise AdvertError(AdvertReason.ATTESTATION_FAILED,
                              f"endpoint attests {verified.signing_address}, not the advert's {advert.node}")
        reg = self._registered(advert.node)
        if reg is not None and reg.hpke_public_key and reg.hpke_public_key != verified.hpke_public_key:
            raise AdvertError(AdvertReason.ATTESTATION_FAILED, "attested HPKE key differs from the registry's")
        self._attested[key] = _Attested(time.monotonic(), verified.tee_type)
        return verified.tee_type

    async def _offer(self, http: httpx.AsyncClient, advert: Advert, model_id: str) -> NodeOffer | None:
        try:
            tee_type = await self._attest(http, advert)
            t0 = time.perf_counter()
            try:
                (await http.get(f"{advert.endpoint}/health")).raise_for_status()
            except httpx.HTTPError as exc:
                raise AdvertError(AdvertReason.UNREACHABLE, f"GET {advert.endpoint}/health failed: {exc!r}") from exc
            latency_ms = (time.perf_counter() - t0) * 1000
        except AdvertError as exc:
            self._ignore(advert.node, exc.reason, str(exc).split(": ", 1)[-1], "live-check")
            return None
        price = advert.price_of(model_id)
        assert price is not None
        return NodeOffer(advert.node, advert.endpoint, model_id, price[0], price[1], latency_ms, advert, tee_type)

    def candidates(self, model_id: str | None) -> list[tuple[Advert, str]]:
        """Held, unexpired adverts serving `model_id` (all models if None), as (advert, model id) pairs."""
        now = time.time()
        out = []
        with self._lock:
            for address, signed in list(self._latest.items()):
                a = signed.advert
                if a.expires_at <= now:  # the node stopped refreshing it: gone
                    log.info("advert of %s expired %d s ago; dropped", address, int(now - a.expires_at))
                    del self._latest[address]
                    continue
                for mid in a.models:
                    if model_id is None or mid == model_id:
                        out.append((a, mid))
        return out

    async def adiscover(self, model: str | None = None, *, use_dht: bool = True) -> list[NodeOffer]:
        """Verified offers for `model` (served name or 0x model id; None: every model), best first."""
        model_id = resolve_model_id(model) if model is not None else None
        await self.refresh(model_id, use_dht=use_dht)
        sem = asyncio.Semaphore(32)

        async def one(advert: Advert, mid: str) -> NodeOffer | None:
            async with sem:
                return await self._offer(http, advert, mid)

        async with httpx.AsyncClient(timeout=self.http_timeout_s, trust_env=False) as http:
            offers = await asyncio.gather(*(one(a, mid) for a, mid in self.candidates(model_id)))
        return rank_offers([o for o in offers if o is not None])

    def discover(self, model: str | None = None, *, use_dht: bool = True) -> list[NodeOffer]:
        """Blocking form of `adiscover` (for the CLI and the synchronous `Client`)."""
        return asyncio.run(self.adiscover(model, use_dht=use_dht))
