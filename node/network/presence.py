"""The node's presence on the network: its registration in the on-chain NodeRegistry (fresh attestation
against the registry's epoch) and its libp2p overlay (signed adverts that point at that attestation).

Start order matters: the peer id (derived from the enclave key) goes into the registration, and the
registration's attestation hash goes into every advert, so clients can check one against the other.
"""

from __future__ import annotations

import asyncio
import os

from libp2p.peer.id import ID

from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.network.overlay import OverlayConfig, peer_key_from_secret
from dcml.client.wire.advert import AdvertDomain
from dcml.node import __version__
from dcml.node.config import ModelPrice, NodeSettings
from dcml.node.identity import EnclaveIdentity
from dcml.node.logging import get_logger
from dcml.node.network.registration import ensure_registered
from dcml.node.network.service import AdvertTerms, ModelOffer, P2PService
from dcml.node.tee.base import AttestationProvider

log = get_logger("dcml.network")


def peer_id_of(identity: EnclaveIdentity) -> ID:
    """The libp2p peer id the overlay will use (derived from the enclave key, stable across restarts)."""
    return ID.from_pubkey(peer_key_from_secret(bytes(identity.account.key)).public_key)


class NodePresence:
    def __init__(self, settings: NodeSettings, identity: EnclaveIdentity, provider: AttestationProvider, *,
                 model_id: str, price: ModelPrice | None) -> None:
        self.settings = settings
        self.identity = identity
        self.provider = provider
        self.model_id = model_id
        self.price = price
        self.attestation_hash = "0x" + "00" * 32
        self.p2p: P2PService | None = None

    @property
    def endpoint(self) -> str:
        s = self.settings
        return s.registry.endpoint or f"http://{s.server.host}:{s.server.port}"

    async def start(self) -> None:
        s = self.settings
        deployment = Deployment.load(s.payments.deployment)
        if s.registry.enabled:
            await asyncio.to_thread(self._register, deployment)
        if s.p2p.enabled:
            offer = ModelOffer(self.model_id, self.price.price_per_input_token if self.price else 0,
                               self.price.price_per_output_token if self.price else 0)
            self.p2p = P2PService(
                self.identity, AdvertTerms(self.endpoint, (offer,), self.attestation_hash),
                OverlayConfig(listen=s.p2p.listen, bootstrap=tuple(s.p2p.bootstrap)),
                AdvertDomain(deployment.chain_id, deployment.node_registry or "0x" + "00" * 20),
                interval_s=s.p2p.advert_interval_s, ttl_s=s.p2p.advert_ttl_s)
            await self.p2p.astart()
            log.info("overlay_up", peer_id=str(peer_id_of(self.identity)), addrs=self.p2p.addrs())

    def _register(self, deployment: Deployment) -> None:
        from eth_account import Account

        s = self.settings.registry
        if not deployment.node_registry:
            raise ValueError("[registry] is enabled but the deployment file names no node_registry")
        key = os.environ.get(s.operator_key_env)
        if not key:
            raise ValueError(f"[registry] is enabled: put the operator's key in ${s.operator_key_env}")
        w3 = connect(self.settings.payments.rpc_url or deployment.rpc_url)
        registered = ensure_registered(w3, deployment.node_registry, self.identity, self.provider,
                                       Account.from_key(key), endpoint=self.endpoint,
                                       peer_id=peer_id_of(self.identity).to_bytes(), stake=s.stake,
                                       node_version=__version__)
        self.attestation_hash = "0x" + registered.attestation_hash.hex()
        log.info("registry", action=registered.action, attestation_hash=self.attestation_hash,
                 active=registered.active)

    async def stop(self) -> None:
        if self.p2p is not None:  # stop advertising first: clients drop the node once its advert expires
            await self.p2p.astop()
