"""The NodeRegistry's signed messages and the attestation hash: what a node signs to register or re-attest and
what a client checks, exactly as `contracts/src/NodeRegistry.sol` hashes them, under the domain
`{name: "NodeRegistry", version: "1", chainId, verifyingContract: registry}`:

    Registration(address node,address operator,string endpoint,bytes peerId,bytes hpkePublicKey,
                 bytes32 attestationHash,uint8 teeType,bytes32 epoch,uint256 deadline)
    Reattestation(address node,string endpoint,bytes peerId,bytes32 attestationHash,bytes32 epoch,
                  uint256 deadline)

`node` is the enclave signing address, which signs both. `epoch` is the registry's `currentEpoch()`
(or the previous one) and is also the nonce half of the quote's report_data, so the attestation
behind `attestationHash` was produced after that epoch started.

Attestation hash (`attestation_hash`): sha256(b"dcml-attestation-v1" || canonical JSON) where the
canonical JSON is the object {hpke_public_key, nonce, quote, signing_address, tee_type} with sorted
keys, no whitespace, hex in lower case without 0x, the address lower case with 0x. Those are the
fields a verifier trusts (the quote) or checks against the quote (keys, nonce, TEE type); the rest of
the document (measurements, report_data copies, version) is informational and re-derived from the
quote.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field

from dcml.client.attestation.verify import AttestationDocument
from dcml.client.wire import eip712
from dcml.client.wire.hexutil import lower_hex
from dcml.client.wire.identity import HPKE_PUBLIC_KEY_LEN

DOMAIN_NAME = "NodeRegistry"
DOMAIN_VERSION = "1"
ATTESTATION_HASH_DOMAIN = b"dcml-attestation-v1"
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"

# TEE type labels, as the contract numbers them.
TEE_TYPES: dict[str, int] = {"tdx": 1, "dstack": 2, "simulated": 3}
TEE_NAMES: dict[int, str] = {v: k for k, v in TEE_TYPES.items()}

REGISTRATION = eip712.struct("Registration", [
    ("node", "address"), ("operator", "address"), ("endpoint", "string"), ("peerId", "bytes"),
    ("hpkePublicKey", "bytes"), ("attestationHash", "bytes32"), ("teeType", "uint8"), ("epoch", "bytes32"),
    ("deadline", "uint256"),
])
REATTESTATION = eip712.struct("Reattestation", [
    ("node", "address"), ("endpoint", "string"), ("peerId", "bytes"), ("attestationHash", "bytes32"),
    ("epoch", "bytes32"), ("deadline", "uint256"),
])
EIP712_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, 0, ZERO_ADDRESS).struct.types(),
    "Registration": REGISTRATION.types(),
    "Reattestation": REATTESTATION.types(),
}
_STRUCTS = {"Registration": REGISTRATION, "Reattestation": REATTESTATION}

# --- the attestation hash ---------------------------------------------------------------------


def attestation_hash(document: AttestationDocument) -> bytes:
    """sha256(b"dcml-attestation-v1" || canonical JSON of the trusted fields) — see the module doc."""
    canonical = {
        "hpke_public_key": lower_hex(document.hpke_public_key),
        "nonce": lower_hex(document.nonce),
        "quote": lower_hex(document.quote),
        "signing_address": document.signing_address.lower(),
        "tee_type": document.tee_type,
    }
    body = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(ATTESTATION_HASH_DOMAIN + body).digest()


# --- the signed messages ----------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True)

    node: str
    endpoint: str = Field(min_length=1, max_length=256)
    peer_id: bytes = Field(min_length=1, max_length=128)
    attestation_hash: bytes = Field(min_length=32, max_length=32)
    epoch: bytes = Field(min_length=32, max_length=32)
    deadline: int = Field(ge=0)


class Registration(_Message):
    """What a node signs to be registered by `operator` (field order = the EIP-712 type)."""

    operator: str
    hpke_public_key: bytes = Field(min_length=HPKE_PUBLIC_KEY_LEN, max_length=HPKE_PUBLIC_KEY_LEN)
    tee_type: int = Field(ge=1, le=255)

    def message(self) -> dict[str, Any]:
        return {
            "node": to_checksum_address(self.node),
            "operator": to_checksum_address(self.operator),
            "endpoint": self.endpoint,
            "peerId": self.peer_id,
            "hpkePublicKey": self.hpke_public_key,
            "attestationHash": self.attestation_hash,
            "teeType": self.tee_type,
            "epoch": self.epoch,
            "deadline": self.deadline,
        }

    def as_tuple(self) -> tuple:
        """The `NodeRegistry.Registration` struct as the contract call takes it."""
        return tuple(self.message().values())


class Reattestation(_Message):
    """What a registered node signs to refresh its attestation (and its endpoint and peer id)."""

    def message(self) -> dict[str, Any]:
        return {
            "node": to_checksum_address(self.node),
            "endpoint": self.endpoint,
            "peerId": self.peer_id,
            "attestationHash": self.attestation_hash,
            "epoch": self.epoch,
            "deadline": self.deadline,
        }

    def as_tuple(self) -> tuple:
        return tuple(self.message().values())


class RegistryDomain(BaseModel):
    """Which registry on which chain a message is for."""

    model_config = ConfigDict(frozen=True)

    chain_id: int
    registry: str

    @property
    def eip712_domain(self) -> eip712.Domain:
        return eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, to_checksum_address(self.registry))

    def typed_data(self, message: Registration | Reattestation) -> dict[str, Any]:
        return self.eip712_domain.typed_data(_STRUCTS[type(message).__name__], message.message())

    def digest(self, message: Registration | Reattestation) -> bytes:
        struct = _STRUCTS[type(message).__name__]
        return self.eip712_domain.digest(struct.hash_message(message.message()))

    def sign(self, signer: LocalAccount, message: Registration | Reattestation) -> bytes:
        """65-byte signature; the signer must be the enclave key at `message.node` to be accepted."""
        return eip712.sign(self.digest(message), signer)

    def recover(self, message: Registration | Reattestation, signature: bytes) -> str:
        """The checksummed address that signed `message` under this domain (raises eip712.SignatureError
        for a malformed or malleable signature)."""
        return to_checksum_address(eip712.recover(self.digest(message), signature))
