"""NodeRegistry against a real anvil: enclave-signed registration, re-attestation, unbonding, reads.

The module runs its own anvil (not the session devnet): it moves the chain's clock forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import Devnet, deploy_contract
from dcml.client.chain.registration import Reattestation, Registration, attestation_hash
from dcml.client.chain.registry import NodeStatus, RegistryClient, RegistryError
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import NodeRegistrationError, ensure_registered
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.simulated import SimulatedProvider

MIN_STAKE = 10**18
UNBONDING = 3600
EPOCH = 600
PEER_ID = bytes.fromhex("002408011220") + b"\x11" * 32
ZERO = "0x0000000000000000000000000000000000000000"


@pytest.fixture(scope="module")
def net() -> Iterator[Deployment]:
    with Devnet() as devnet:
        assert devnet.deployment is not None
        yield devnet.deployment


@pytest.fixture(scope="module")
def chain(net: Deployment) -> Web3:
    return Web3(Web3.HTTPProvider(net.rpc_url, request_kwargs={"timeout": 30}))


def _acct(net: Deployment, role: str) -> LocalAccount:
    return Account.from_key(net.accounts[role].private_key)


@pytest.fixture(scope="module")
def operator(net: Deployment) -> LocalAccount:
    return _acct(net, "node")


def _deploy(chain: Web3, net: Deployment, token: str) -> RegistryClient:
    deployer = _acct(net, "deployer")
    address = deploy_contract(chain, deployer, "NodeRegistry", token, MIN_STAKE, UNBONDING, EPOCH, deployer.address)
    return RegistryClient(chain, address)


@pytest.fixture(scope="module")
def eth_registry(chain: Web3, net: Deployment) -> RegistryClient:
    return _deploy(chain, net, ZERO)


@pytest.fixture(scope="module")
def erc20_registry(chain: Web3, net: Deployment) -> RegistryClient:
    return _deploy(chain, net, net.token)


@pytest.fixture(scope="module")
def provider() -> SimulatedProvider:
    return SimulatedProvider()


def _time_travel(chain: Web3, seconds: int) -> None:
    chain.provider.make_request("evm_increaseTime", [seconds])
    chain.provider.make_request("evm_mine", [])


def _registration(registry: RegistryClient, identity: EnclaveIdentity, operator: LocalAccount) -> Registration:
    return Registration(
        node=identity.address, operator=operator.address, endpoint="https://n.example:8443", peer_id=PEER_ID,
        hpke_public_key=identity.hpke_public_bytes(), attestation_hash=b"\x01" * 32, tee_type=3,
        epoch=registry.current_epoch(), deadline=2**40,
    )


def test_digests_match_the_contract(eth_registry: RegistryClient, operator: LocalAccount) -> None:
    identity = EnclaveIdentity.generate()
    reg = _registration(eth_registry, identity, operator)
    domain = eth_registry.domain
    assert domain.digest(reg) == bytes(eth_registry.contract.functions.hashRegistration(reg.as_tuple()).call())
    reatt = Reattestation(node=identity.address, endpoint="e", peer_id=b"p", attestation_hash=b"\x02" * 32,
                          epoch=reg.epoch, deadline=5)
    assert domain.digest(reatt) == bytes(eth_registry.contract.functions.hashReattestation(reatt.as_tuple()).call())
    assert domain.recover(reg, domain.sign(identity.account, reg)) == identity.address


def test_registration_not_signed_by_the_enclave_key_is_refused(
    chain: Web3, eth_registry: RegistryClient, operator: LocalAccount
) -> None:
    identity = EnclaveIdentity.generate()
    reg = _registration(eth_registry, identity, operator)
    forged = eth_registry.domain.sign(operator, reg)  # the operator signs for a key it does not control

    with pytest.raises(RegistryError, match=r"InvalidSignature.*enclave key") as info:
        eth_registry.register(operator, reg, forged, MIN_STAKE)
    assert info.value.reason == "InvalidSignature"

    # Mined anyway (no gas estimate in the way): the chain itself reverts it.
    fn = eth_registry.contract.functions.register(reg.as_tuple(), MIN_STAKE, forged)
    tx = fn.build_transaction({
        "from": operator.address, "value": MIN_STAKE, "gas": 2_000_000,
        "nonce": chain.eth.get_transaction_count(operator.address), "chainId": chain.eth.chain_id,
    })
    tx_hash = chain.eth.send_raw_transaction(operator.sign_transaction(tx).raw_transaction)
    assert chain.eth.wait_for_transaction_receipt(tx_hash)["status"] == 0
    assert eth_registry.node(identity.address) is None

    # Another operator cannot reuse the node's genuine signature either.
    genuine = eth_registry.domain.sign(identity.account, reg)
    thief = Account.create()
    stolen = reg.model_copy(update={"operator": thief.address})
    assert eth_registry.domain.recover(stolen, genuine) != identity.address


def test_register_then_reattest_with_a_fresh_epoch(
    chain: Web3, erc20_registry: RegistryClient, operator: LocalAccount, provider: SimulatedProvider
) -> None:
    identity = EnclaveIdentity.generate()
    start_block = chain.eth.block_number + 1
    kwargs = dict(endpoint="https://n.example:8443", peer_id=PEER_ID, stake=MIN_STAKE * 2, node_version="test")

    first = ensure_registered(chain, erc20_registry.address, identity, provider, operator, **kwargs)
    assert first.action == "registered" and first.active
    epoch = erc20_registry.current_epoch()
    assert bytes.fromhex(first.document.nonce) == epoch  # the quote's nonce half is the registry epoch
    assert identity.report_data(epoch).hex() == first.document.report_data
    rec = first.record
    assert (rec.operator, rec.status, rec.tee_name, rec.stake) == (operator.address, NodeStatus.ACTIVE, "simulated",
                                                                  MIN_STAKE * 2)
    assert (rec.endpoint, rec.peer_id, rec.hpke_public_key) == (kwargs["endpoint"], PEER_ID,
                                                                identity.hpke_public_bytes())
    assert rec.attestation_hash == attestation_hash(first.document) and rec.epoch == epoch
    assert rec.stake_token == erc20_registry.stake_token
    assert erc20_registry.check_attestation(identity.address, first.document) == rec

    # A restart in the same epoch with the same attestation changes nothing (and sends nothing).
    again = ensure_registered(chain, erc20_registry.address, identity, provider, operator, **kwargs)
    assert again.action == "unchanged" and again.tx_hash is None and again.record == rec

    # Next epoch: the node bumps it and re-attests; the endpoint moved meanwhile.
    _time_travel(chain, EPOCH)
    kwargs["endpoint"] = "https://moved.example"
    later = ensure_registered(chain, erc20_registry.address, identity, provider, operator, **kwargs)
    assert later.action == "reattested"
    assert later.record.epoch_index == rec.epoch_index + 1
    assert later.record.epoch == erc20_registry.current_epoch() != epoch
    assert later.record.attestation_hash == attestation_hash(later.document) != rec.attestation_hash
    assert later.record.endpoint == "https://moved.example"
    with pytest.raises(RegistryError, match="AttestationHashMismatch"):
        erc20_registry.check_attestation(identity.address, first.document)  # the old document is retired

    # RegistryClient reads what was registered, from state and from events.
    assert identity.address in [n.node for n in erc20_registry.nodes()]
    names = [e.name for e in erc20_registry.events(from_block=start_block)
             if e.args.get("node") in (None, identity.address)]
    assert names == ["NodeRegistered", "EpochAdvanced", "NodeReattested"]

    # Another operator cannot take the node over.
    other = Account.from_key(Account.create().key)
    with pytest.raises(NodeRegistrationError, match="OperatorMismatch"):
        ensure_registered(chain, erc20_registry.address, identity, provider, other, **kwargs)


def test_stake_released_only_after_the_unbonding_delay(
    chain: Web3, eth_registry: RegistryClient, operator: LocalAccount, provider: SimulatedProvider
) -> None:
    identity = EnclaveIdentity.generate()
    kwargs = dict(endpoint="https://n.example", peer_id=PEER_ID, stake=MIN_STAKE, node_version="test")
    ensure_registered(chain, eth_registry.address, identity, provider, operator, **kwargs)
    eth_registry.request_exit(operator, identity.address)
    record = eth_registry.node(identity.address)
    assert record is not None and record.status == NodeStatus.EXITING and not eth_registry.is_active(identity.address)

    with pytest.raises(NodeRegistrationError, match="NodeExiting"):
        ensure_registered(chain, eth_registry.address, identity, provider, operator, **kwargs)
    with pytest.raises(RegistryError, match="UnbondingActive") as info:
        eth_registry.withdraw_stake(operator, identity.address)
    assert info.value.reason == "UnbondingActive"

    _time_travel(chain, UNBONDING - 30)
    with pytest.raises(RegistryError, match="UnbondingActive"):
        eth_registry.withdraw_stake(operator, identity.address)

    _time_travel(chain, 30)
    before = chain.eth.get_balance(operator.address)
    receipt = eth_registry.withdraw_stake(operator, identity.address)
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.eth.get_balance(operator.address) == before + MIN_STAKE - fee
    assert eth_registry.node(identity.address).status == NodeStatus.WITHDRAWN  # type: ignore[union-attr]

    # The same enclave key can come back with a fresh registration.
    back = ensure_registered(chain, eth_registry.address, identity, provider, operator, **kwargs)
    assert back.action == "registered" and back.active


def test_attestation_hash_covers_the_trusted_fields(provider: SimulatedProvider) -> None:
    identity = EnclaveIdentity.generate()
    doc = build_attestation_document(identity, provider, b"\x07" * 32, node_version="a")
    assert attestation_hash(doc) == attestation_hash(doc.model_copy(update={"node_version": "b"}))
    assert attestation_hash(doc) == attestation_hash(doc.model_copy(update={"quote": doc.quote.upper()}))
    other = build_attestation_document(identity, provider, b"\x08" * 32, node_version="a")
    assert attestation_hash(doc) != attestation_hash(other)
    assert attestation_hash(doc) != attestation_hash(doc.model_copy(update={"tee_type": "tdx"}))
