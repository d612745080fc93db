"""The signed node advert: what a node gossips and stores in the DHT, its EIP-712 type, checks and ranking.

An advert is a claim, signed by the enclave key, about where a node serves which models at what price.
It proves nothing by itself: clients accept it only after the registry and a live attestation agree.
Domain: ``{name: "dcml-adverts", version: "1", chainId, verifyingContract}``, the verifying contract
being the NodeRegistry that the advert's attestation hash refers to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dcml.client.wire import eip712
from dcml.client.wire.errors import DcmlError
from dcml.client.wire.hexutil import ZERO_ADDRESS, check_hex32, from_hex, to_hex
from dcml.client.wire.receipts import model_id_for

DOMAIN_NAME = "dcml-adverts"
DOMAIN_VERSION = "1"
TOPIC = "/dcml/adverts/1"  # GossipSub topic
DHT_ADVERT_NS = "dcml-advert"  # DHT value namespace: /dcml-advert/<libp2p peer id> -> SignedAdvert JSON
DHT_MODEL_NS = "dcml-model"  # DHT provider key: /dcml-model/<model id hex>
MAX_ADVERT_BYTES = 16 * 1024
MAX_MODELS = 64

ADVERT = eip712.struct("Advert", [
    ("node", "address"), ("peerId", "string"), ("endpoint", "string"), ("models", "bytes32[]"),
    ("pricesIn", "uint256[]"), ("pricesOut", "uint256[]"), ("attestationHash", "bytes32"), ("issuedAt", "uint64"),
    ("expiresAt", "uint64"), ("sequence", "uint64"),
])
ADVERT_FIELDS = ADVERT.types()


class AdvertReason(StrEnum):
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad_signature"
    UNREGISTERED = "unregistered"
    INACTIVE = "inactive"
    ATTESTATION_HASH_MISMATCH = "attestation_hash_mismatch"
    PEER_ID_MISMATCH = "peer_id_mismatch"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    ATTESTATION_FAILED = "attestation_failed"
    UNREACHABLE = "unreachable"


class AdvertError(DcmlError):
    """An advert that must be ignored; `reason` says which check failed."""

    reason_in_str = True
    reason: AdvertReason

    def __init__(self, reason: AdvertReason, message: str) -> None:
        super().__init__(message, reason=reason)


@dataclass(frozen=True)
class AdvertDomain:
    """The chain and NodeRegistry an advert refers to (a signature for one registry is void on another)."""

    chain_id: int = 31337
    registry: str = ZERO_ADDRESS

    @cached_property
    def eip712_domain(self) -> eip712.Domain:
        return eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, to_checksum_address(self.registry))

    def as_eip712(self) -> dict:
        return self.eip712_domain.as_dict()


class Advert(BaseModel):
    """The advert struct (field names follow the EIP-712 type; prices are per token, in wei)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    node: str
    peer_id: str = Field(alias="peerId", max_length=128)
    endpoint: str = Field(max_length=512)
    models: tuple[str, ...] = Field(max_length=MAX_MODELS)
    prices_in: tuple[int, ...] = Field(alias="pricesIn")
    prices_out: tuple[int, ...] = Field(alias="pricesOut")
    attestation_hash: str = Field(alias="attestationHash")
    issued_at: int = Field(alias="issuedAt", ge=0, lt=2**64)
    expires_at: int = Field(alias="expiresAt", ge=0, lt=2**64)
    sequence: int = Field(ge=0, lt=2**64)

    @field_validator("node")
    @classmethod
    def _address(cls, v: str) -> str:
        return to_checksum_address(v)

    @field_validator("models")
    @classmethod
    def _model_ids(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_hex32(m, "model id") for m in v)

    @field_validator("prices_in", "prices_out")
    @classmethod
    def _prices(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(p < 0 or p >= 2**256 for p in v):
            raise ValueError("prices must be uint256")
        return v

    @field_validator("attestation_hash")
    @classmethod
    def _att(cls, v: str) -> str:
        return check_hex32(v, "attestationHash")

    @model_validator(mode="after")
    def _same_lengths(self) -> Advert:
        if not (len(self.models) == len(self.prices_in) == len(self.prices_out)):
            raise ValueError("models, pricesIn and pricesOut must have the same length")
        return self

    def price_of(self, model_id: str) -> tuple[int, int] | None:
        """(price per input token, price per output token) for `model_id`, or None if not served."""
        try:
            i = self.models.index(model_id.lower())
        except ValueError:
            return None
        return self.prices_in[i], self.prices_out[i]

    def eip712_message(self) -> dict[str, Any]:
        return {
            "node": self.node, "peerId": self.peer_id, "endpoint": self.endpoint,
            "models": [from_hex(m) for m in self.models],
            "pricesIn": list(self.prices_in), "pricesOut": list(self.prices_out),
            "attestationHash": from_hex(self.attestation_hash),
            "issuedAt": self.issued_at, "expiresAt": self.expires_at, "sequence": self.sequence,
        }

    def digest(self, domain: AdvertDomain) -> bytes:
        return domain.eip712_domain.digest(ADVERT.hash_message(self.eip712_message()))

    def signable(self, domain: AdvertDomain) -> SignableMessage:
        """The same digest as eth_account's SignableMessage (`Account.sign_message`, `recover_message`)."""
        return domain.eip712_domain.signable(ADVERT.hash_message(self.eip712_message()))


class SignedAdvert(BaseModel):
    """An advert as it travels (gossip message and DHT value): the struct and a 65-byte signature."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    advert: Advert
    signature: str

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedAdvert:
        if len(raw) > MAX_ADVERT_BYTES:
            raise AdvertError(AdvertReason.MALFORMED, f"advert is {len(raw)} bytes (max {MAX_ADVERT_BYTES})")
        try:
            return cls.model_validate_json(raw)
        except (ValueError, ValidationError) as exc:
            raise AdvertError(AdvertReason.MALFORMED, f"not a signed advert: {exc}") from exc


def sign_advert(account: LocalAccount, advert: Advert, domain: AdvertDomain) -> SignedAdvert:
    if to_checksum_address(account.address) != advert.node:
        raise ValueError("an advert must be signed by the node key it names")
    return SignedAdvert(advert=advert, signature=to_hex(eip712.sign(advert.digest(domain), account)))


def verify_signature(signed: SignedAdvert, domain: AdvertDomain) -> Advert:
    """Return the advert if `node` signed it (under the one low-s rule); raise AdvertError(BAD_SIGNATURE)."""
    try:
        signer = to_checksum_address(eip712.recover(signed.advert.digest(domain), signed.signature))
    except eip712.SignatureError as exc:
        raise AdvertError(AdvertReason.BAD_SIGNATURE, f"signature does not recover: {exc}") from exc
    if signer != signed.advert.node:
        raise AdvertError(AdvertReason.BAD_SIGNATURE,
                          f"signed by {signer}, not by the node it names ({signed.advert.node}): forged")
    return signed.advert


def check_fresh(advert: Advert, now: float | None = None, max_skew_s: int = 60) -> None:
    now = time.time() if now is None else now
    if advert.expires_at <= now:
        raise AdvertError(AdvertReason.EXPIRED, f"expired {int(now - advert.expires_at)} s ago")
    if advert.issued_at > now + max_skew_s:
        raise AdvertError(AdvertReason.MALFORMED, "issued in the future (clock skew beyond "
                          f"{max_skew_s} s)")


def resolve_model_id(model: str) -> str:
    """A model id (0x + 64 hex) as is, otherwise keccak256 of the served model name."""
    if model.startswith("0x") and len(model) == 66:
        return check_hex32(model, "model id")
    return model_id_for(model)


def advert_dht_key(peer_id: str) -> str:
    return f"/{DHT_ADVERT_NS}/{peer_id}"


def model_dht_key(model_id: str) -> str:
    return f"/{DHT_MODEL_NS}/{resolve_model_id(model_id)}"


@dataclass(frozen=True)
class NodeOffer:
    """A verified node for one model: its advert, price and measured latency."""

    address: str
    endpoint: str
    model_id: str
    price_in: int
    price_out: int
    latency_ms: float
    advert: Advert
    tee_type: str = ""


def rank_offers(offers: list[NodeOffer]) -> list[NodeOffer]:
    """Cheapest first (output price, then input price), then lowest measured latency."""
    return sorted(offers, key=lambda o: (o.price_out, o.price_in, o.latency_ms, o.address))
