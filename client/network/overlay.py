"""One libp2p host (TCP + Noise + yamux, never plaintext) with GossipSub on the advert topic and a Kademlia DHT.

Everything here runs inside the trio thread (`node.p2p.bridge.TrioThread`); nodes and clients share it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from dcml.client.network.records import AdvertRecordValidator
from dcml.client.wire.advert import DHT_ADVERT_NS, TOPIC, AdvertDomain

if TYPE_CHECKING:  # trio's bundled stubs (trio-stubs, from trio_typing) predate trio.TaskStatus
    from trio_typing import TaskStatus

log = logging.getLogger("dcml.p2p")

GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
# A joining client asks a peer for the adverts it holds (gossip has no history for late joiners).
# Response: frames of 4-byte big-endian length + SignedAdvert JSON, then EOF. Receivers check everything.
SYNC_PROTOCOL = TProtocol("/dcml/advert-sync/1.0.0")
SYNC_MAX_BYTES = 4 * 1024 * 1024
MessageHandler = Callable[[bytes, str], None]
AdvertSource = Callable[[], list[bytes]]


@dataclass(frozen=True)
class OverlayConfig:
    listen: str = "/ip4/0.0.0.0/tcp/4001"
    bootstrap: tuple[str, ...] = ()  # full multiaddrs with /p2p/<peer id>
    dht_server: bool = True  # nodes serve the DHT; clients only query it
    gossip_degree: int = 6
    heartbeat_s: int = 1
    # Loopback and small private overlays share one IP: the IP-diversity rule would fight the mesh.
    eclipse_protection: bool = False
    redial_s: float = 5.0
    # Fill the routing table at start by dialing the peers closest to us. Off by default: in py-libp2p
    # 0.8.1 every extra connection costs steady CPU (pubsub and peer-record traffic); measured on one
    # process with 20 nodes: 10.8 CPU-s per 10 s with it, 0.3 without. Nodes then hang off their
    # bootstrap peers (configure several), which hold the routing table everyone's lookups go through.
    dht_refresh: bool = False


def peer_key_from_secret(secret: bytes) -> KeyPair:
    """A stable Ed25519 libp2p key derived from an enclave secret (so the peer id survives restarts)."""
    return create_new_key_pair(hashlib.sha256(b"dcml-libp2p-v1" + secret).digest())


class Overlay:
    """Build with `Overlay(...)`, then `await overlay.open(nursery)` inside trio."""

    def __init__(self, key_pair: KeyPair, config: OverlayConfig, domain: AdvertDomain,
                 on_message: MessageHandler | None = None,
                 topic_validator: Callable[[bytes], bool] | None = None,
                 advert_source: AdvertSource | None = None) -> None:
        self.config = config
        self.key_pair = key_pair
        # Explicit security: Noise only (py-libp2p offers plaintext by default).
        sec_opt = {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=x25519_key_pair().private_key)}
        self.listen = multiaddr.Multiaddr(config.listen)
        self.host: IHost = new_host(key_pair=key_pair, sec_opt=sec_opt, muxer_preference="YAMUX",
                                    listen_addrs=[self.listen])
        self.gossip = GossipSub(
            protocols=GOSSIP_PROTOCOLS, degree=config.gossip_degree, degree_low=max(1, config.gossip_degree - 2),
            degree_high=config.gossip_degree * 2, heartbeat_initial_delay=0.1, heartbeat_interval=config.heartbeat_s,
            eclipse_protection_enabled=config.eclipse_protection, max_messages_per_topic_per_second=1000.0,
        )
        self.pubsub = Pubsub(self.host, self.gossip)
        # Created before any connection so identify advertises /ipfs/kad/1.0.0 (else no routing table).
        self.dht = KadDHT(self.host, DHTMode.SERVER if config.dht_server else DHTMode.CLIENT, strict_validation=True)
        self.dht.register_validator(DHT_ADVERT_NS, AdvertRecordValidator(domain))
        self._on_message = on_message
        self._topic_validator = topic_validator
        self.bootstrap = [info_from_p2p_addr(multiaddr.Multiaddr(a)) for a in config.bootstrap]
        if advert_source is not None:
            source = advert_source

            async def serve_sync(stream) -> None:
                try:
                    out, total = bytearray(), 0
                    for raw in source():
                        total += 4 + len(raw)
                        if total > SYNC_MAX_BYTES:
                            break
                        out += len(raw).to_bytes(4, "big") + raw
                    await stream.write(bytes(out))
                finally:
                    await stream.close()

            self.host.set_stream_handler(SYNC_PROTOCOL, serve_sync)

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self.host.get_connected_peers()]

    async def open(self, nursery: trio.Nursery) -> None:
        """Start listening, the services, the topic subscription and the bootstrap dialer; return when ready."""
        await nursery.start(self._serve)
        if self._topic_validator is not None:
            check = self._topic_validator
            self.pubsub.set_topic_validator(TOPIC, lambda _peer, msg: check(msg.data), False)
        sub = await self.pubsub.subscribe(TOPIC)
        nursery.start_soon(self._read, sub)
        await self._dial_bootstrap()
        nursery.start_soon(self._keep_bootstrap)
        log.info("overlay up: peer %s listening on %s, %d bootstrap peer(s) connected", self.peer_id,
                 self.addrs(), sum(1 for b in self.bootstrap if b.peer_id in self.host.get_connected_peers()))

    async def _serve(self, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.host.run(listen_addrs=[self.listen]), background_trio_service(self.pubsub), \
                background_trio_service(self.gossip), background_trio_service(self.dht):
            await self.pubsub.wait_until_ready()
            task_status.started()
            await trio.sleep_forever()

    async def _read(self, sub) -> None:
        while True:
            msg = await sub.get()
            if self._on_message is not None:
                try:
                    self._on_message(msg.data, str(ID(msg.from_id)))
                except Exception:  # a bad message must not stop the reader
                    log.exception("advert handler failed")

    async def _dial_bootstrap(self) -> None:
        async def dial(info: PeerInfo) -> None:
            if info.peer_id == self.host.get_id() or info.peer_id in self.host.get_connected_peers():
                return
            try:
                with trio.fail_after(10):
                    await self.host.connect(info)
            except Exception as exc:
                log.warning("bootstrap peer %s unreachable: %r; retrying in %.0f s", info.peer_id, exc,
                            self.config.redial_s)

        async with trio.open_nursery() as n:
            for info in self.bootstrap:
                n.start_soon(dial, info)
        if self.config.dht_refresh and self.config.dht_server and self.host.get_connected_peers():
            # Fill the routing table (dials the peers closest to us): a richer mesh than a star.
            with trio.move_on_after(10):
                try:
                    await self.dht.refresh_routing_table()
                except Exception as exc:
                    log.debug("routing table refresh failed: %r", exc)

    async def _keep_bootstrap(self) -> None:
        while True:
            await trio.sleep(self.config.redial_s)
            if self.bootstrap and not self.host.get_connected_peers():
                await self._dial_bootstrap()

    async def sync_adverts(self, peer: str) -> list[bytes]:
        """Ask `peer` for the adverts it holds (unverified: the caller checks each one)."""
        stream = await self.host.new_stream(ID.from_base58(peer), [SYNC_PROTOCOL])
        buf = bytearray()
        try:
            while len(buf) <= SYNC_MAX_BYTES:
                try:
                    chunk = await stream.read(65536)
                except EOFError:  # StreamEOF
                    break
                if not chunk:
                    break
                buf += chunk
        finally:
            await stream.close()
        out, i = [], 0
        while i + 4 <= len(buf):
            n = int.from_bytes(buf[i:i + 4], "big")
            out.append(bytes(buf[i + 4:i + 4 + n]))
            i += 4 + n
        return out

    async def publish(self, data: bytes) -> None:
        await self.pubsub.publish(TOPIC, data)

    async def put_value(self, key: str, value: bytes) -> None:
        await self.dht.put_value(key, value)

    async def provide(self, key: str) -> bool:
        return await self.dht.provide(key)

    async def find_providers(self, key: str, count: int = 200) -> list[str]:
        if not self.config.dht_server:
            # py-libp2p answers from the local provider cache whenever it holds any entry for the key, and
            # caches the first answers: a client would never see a provider that joined later.
            self.dht.provider_store.providers.pop(_encode_key(key), None)
        return [str(p.peer_id) for p in await self.dht.find_providers(key, count)]

    async def get_value(self, key: str) -> bytes | None:
        return await self.dht.get_value(key)

    async def get_value_from(self, peer: str, key: str) -> bytes | None:
        """GET_VALUE to one peer (the provider holds its own record): one round trip instead of a lookup.

        Validated here like `get_value` validates. Uses a private py-libp2p 0.8.1 method (pinned exactly).
        """
        value = await self.dht.value_store._get_from_peer(ID.from_base58(peer), key.encode())
        if not isinstance(value, bytes):
            return None
        if self.dht.validator is None:  # registered in __init__: only a py-libp2p change could drop it
            raise RuntimeError("the DHT lost its record validator; refusing an unvalidated record")
        self.dht.validator.validate(key, value)
        return value
