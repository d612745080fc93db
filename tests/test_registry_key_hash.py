"""The registry stores the hash of a node's HPKE key, not the key, and neither its endpoint nor peer id: readers
get them from the node's latest events and check the key against the hash, and a key that does not hash to
the record's is refused. Against a real anvil (the module's own: it registers nodes of its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account
from web3 import Web3

from dcml.client.attestation.measurements import Measurements
from dcml.client.attestation.verify import VerifiedNode
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import Devnet
from dcml.client.chain.registry import RegistryClient, RegistryError, key_matches
from dcml.client.publisher.key_broker import BrokerRefusal, RegistryNodeCheck
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.tee.simulated import SimulatedProvider

PEER_ID = bytes.fromhex("002408011220") + b"\x22" * 32


@pytest.fixture(scope="module")
def net() -> Iterator[Deployment]:
    with Devnet() as devnet:
        assert devnet.deployment is not None
        yield devnet.deployment


def _register(net: Deployment, identity: EnclaveIdentity, endpoint: str):
    w3 = Web3(Web3.HTTPProvider(net.rpc_url))
    operator = Account.from_key(net.accounts["node"].private_key)
    return w3, ensure_registered(w3, net.node_registry, identity, SimulatedProvider(), operator, endpoint=endpoint,
                                 peer_id=PEER_ID, stake=10**20, node_version="test")


def _verified(identity: EnclaveIdentity, key: bytes) -> VerifiedNode:
    zero = Measurements(**{f: "00" for f in Measurements.model_fields})
    return VerifiedNode(signing_address=identity.address, hpke_public_key=key, tee_type="simulated",
                        tcb_status="UpToDate", measurements=zero, simulated=True)


def test_record_keeps_hashes_and_the_reader_restores_the_bytes_from_events(net: Deployment) -> None:
    identity = EnclaveIdentity.generate()
    w3, first = _register(net, identity, "http://127.0.0.1:9001")
    registry = RegistryClient(w3, net.node_registry)
    raw = registry.contract.functions.getNode(identity.address).call()
    assert bytes(raw[-1]) == Web3.keccak(identity.hpke_public_bytes())  # only the key's hash is stored
    record = registry.node(identity.address)
    assert record is not None and record == first.record
    assert (record.endpoint, record.peer_id, record.hpke_public_key) == (
        "http://127.0.0.1:9001", PEER_ID, identity.hpke_public_bytes())
    assert key_matches(record, identity.hpke_public_bytes())
    assert not key_matches(record, EnclaveIdentity.generate().hpke_public_bytes())
    assert identity.address in [n.node for n in registry.nodes()]

    # A node that moved re-attests: the reader follows the latest event; the key is unchanged.
    _, moved = _register(net, identity, "https://moved.example:8443/some/long/path/past/one/word")
    assert moved.action == "reattested"
    again = registry.node(identity.address)
    assert again is not None and again.endpoint == "https://moved.example:8443/some/long/path/past/one/word"
    assert again.hpke_public_key == identity.hpke_public_bytes()


def test_a_key_that_does_not_hash_to_the_record_is_refused(net: Deployment) -> None:
    identity = EnclaveIdentity.generate()
    w3, _ = _register(net, identity, "http://127.0.0.1:9002")
    check = RegistryNodeCheck(RegistryClient(w3, net.node_registry))
    check(_verified(identity, identity.hpke_public_bytes()))  # the registered key: accepted
    with pytest.raises(BrokerRefusal, match="not the one registered"):
        check(_verified(identity, EnclaveIdentity.generate().hpke_public_bytes()))


def test_events_whose_key_does_not_match_the_record_are_refused(net: Deployment) -> None:
    """An RPC that serves a forged event (here: the right events with another key) is caught by the record's hash."""
    identity = EnclaveIdentity.generate()
    w3, _ = _register(net, identity, "http://127.0.0.1:9003")

    class LyingEvents(RegistryClient):
        def _service_from_events(self, address: str) -> tuple[str, bytes, bytes]:
            endpoint, peer_id, _ = super()._service_from_events(address)
            return endpoint, peer_id, EnclaveIdentity.generate().hpke_public_bytes()

    with pytest.raises(RegistryError, match="RecordMismatch"):
        LyingEvents(w3, net.node_registry).node(identity.address)
