"""The node's side of the overlay: publish a signed advert at start and periodically, keep DHT records fresh.

`P2PService.start()/stop()` block (use `astart()/astop()` from the asyncio daemon's lifespan); the
overlay itself runs on trio in its own thread, so the HTTP API never waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from dcml.client.network.bridge import TrioThread
from dcml.client.network.overlay import Overlay, OverlayConfig, peer_key_from_secret
from dcml.client.wire.advert import (
    Advert,
    AdvertDomain,
    AdvertError,
    SignedAdvert,
    advert_dht_key,
    check_fresh,
    model_dht_key,
    sign_advert,
    verify_signature,
)
from dcml.node.identity import EnclaveIdentity

log = logging.getLogger("dcml.p2p")

# Right after start the mesh is still forming: publish again shortly, then every interval.
_STARTUP_REPUBLISH_S = (1.0, 3.0)


@dataclass(frozen=True)
class ModelOffer:
    model_id: str  # bytes32 hex (client.advert.resolve_model_id of the served name)
    price_in: int
    price_out: int


@dataclass(frozen=True)
class AdvertTerms:
    endpoint: str  # the public HTTPS/HTTP base URL clients call
    models: tuple[ModelOffer, ...]
    attestation_hash: str  # bytes32 hex: what the NodeRegistry holds for this node


def gossip_validator(domain: AdvertDomain) -> Callable[[bytes], bool]:
    """Topic validator for nodes: relay only well-formed, correctly signed, unexpired adverts."""

    def check(data: bytes) -> bool:
        try:
            check_fresh(verify_signature(SignedAdvert.from_bytes(data), domain))
        except AdvertError as exc:
            log.debug("dropping gossip advert: %s", exc)
            return False
        return True

    return check


class P2PService:
    def __init__(self, identity: EnclaveIdentity, terms: AdvertTerms, config: OverlayConfig,
                 domain: AdvertDomain, *, interval_s: float = 30.0, ttl_s: int = 120) -> None:
        if ttl_s <= interval_s:
            raise ValueError(f"advert ttl ({ttl_s} s) must exceed the republish interval ({interval_s} s)")
        self.identity = identity
        self.terms = terms
        self.config = config
        self.domain = domain
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self._bridge = TrioThread("libp2p-node")
        self._overlay: Overlay | None = None
        self._sequence = 0
        self.current: SignedAdvert | None = None
        self.published = 0
        self._held: dict[str, SignedAdvert] = {}  # other nodes' adverts seen on the topic (validated)

    @property
    def overlay(self) -> Overlay:
        if self._overlay is None:
            raise RuntimeError("P2PService is not started")
        return self._overlay

    def start(self, timeout: float = 30.0) -> None:
        self._bridge.start(self._setup, timeout)

    def stop(self) -> None:
        self._bridge.stop()
        log.info("overlay stopped")

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def addrs(self) -> list[str]:
        return self._bridge.call(self._addrs)

    async def _addrs(self) -> list[str]:
        return self.overlay.addrs()

    async def _setup(self, nursery: trio.Nursery) -> None:
        key = peer_key_from_secret(bytes(self.identity.account.key))
        self._overlay = Overlay(key, self.config, self.domain, on_message=self._hold,
                                topic_validator=gossip_validator(self.domain), advert_source=self._held_adverts)
        await self._overlay.open(nursery)
        nursery.start_soon(self._advertise_forever)

    def _hold(self, data: bytes, _from_peer: str) -> None:
        """Keep the newest advert per node (the topic validator already checked signature and expiry)."""
        signed = SignedAdvert.from_bytes(data)
        if signed.advert.node == self.identity.address:
            return
        old = self._held.get(signed.advert.node)
        if old is None or signed.advert.sequence > old.advert.sequence:
            self._held[signed.advert.node] = signed

    def _held_adverts(self) -> list[bytes]:
        now = time.time()
        for node in [n for n, s in self._held.items() if s.advert.expires_at <= now]:
            del self._held[node]
        own = [self.current] if self.current is not None else []
        return [s.to_bytes() for s in [*own, *self._held.values()]]

    def sign_next(self, now: float | None = None) -> SignedAdvert:
        now = time.time() if now is None else now
        # Milliseconds since the epoch: monotonic across restarts without storing anything.
        self._sequence = max(self._sequence + 1, int(now * 1000))
        t = self.terms
        advert = Advert(
            node=self.identity.address, peer_id=self.overlay.peer_id, endpoint=t.endpoint,
            models=tuple(m.model_id for m in t.models), prices_in=tuple(m.price_in for m in t.models),
            prices_out=tuple(m.price_out for m in t.models), attestation_hash=t.attestation_hash,
            issued_at=int(now), expires_at=int(now) + self.ttl_s, sequence=self._sequence,
        )
        return sign_advert(self.identity.account, advert, self.domain)

    async def _advertise_forever(self) -> None:
        delays = [*_STARTUP_REPUBLISH_S]
        first = True
        while True:
            await self.advertise(with_dht=first or not delays)
            first = False
            await trio.sleep(delays.pop(0) if delays else self.interval_s)

    async def advertise(self, with_dht: bool = True) -> None:
        """Sign a fresh advert, gossip it and (re)store it and the model provider records in the DHT."""
        signed = self.sign_next()
        self.current = signed
        data = signed.to_bytes()
        try:
            await self.overlay.publish(data)
            self.published += 1
        except Exception as exc:
            log.warning("advert gossip failed: %r", exc)
        if not with_dht:
            return
        ov = self.overlay
        try:
            with trio.move_on_after(15):
                await ov.put_value(advert_dht_key(ov.peer_id), data)
                for m in self.terms.models:
                    await ov.provide(model_dht_key(m.model_id))
        except Exception as exc:  # no DHT peers yet: the next round retries
            log.warning("advert DHT update failed: %r", exc)
        log.debug("advert %d published (expires %d)", signed.advert.sequence, signed.advert.expires_at)
