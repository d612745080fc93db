"""EIP-712, written once: every signed type of the protocol (voucher, receipt, acceptance, registration,
reattestation, advert, bundle manifest) is a `Struct` hashed under a `Domain`, signed with `sign` and
checked with `recover`, which applies OpenZeppelin's on-chain rules to every signature (65 bytes,
r in range, low s, v in {27, 28}), so a signature the contracts would refuse is refused off-chain too.

Type hashes and domain separators are computed once per struct and domain, and each field's encoder is
picked once, so a digest costs two keccaks and the field encodings (the node's voucher hot path).
Only flat structs are supported (atomic fields and arrays of atomic types): that is all the protocol
signs; `typed_data` gives the same message in the JSON form wallets, ethers and eth_account take.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from coincurve import PublicKey
from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from eth_keys.datatypes import PrivateKey
from eth_utils import to_checksum_address

from dcml.client.wire.errors import DcmlError
from dcml.client.wire.hexutil import from_hex, to_hex
from dcml.client.wire.keccak import keccak

# secp256k1 group order; signatures with s above half of it are malleable and refused (as on-chain).
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SIGNATURE_LEN = 65

Encoder = Callable[[Any], bytes]


class SignatureError(DcmlError, ValueError):
    """A signature that must not be accepted: not hex, wrong length, r or s out of range (high s is
    malleable), v not 27/28, or no key recovers from it."""

    reason = "bad_signature"


# --- field encoding (EIP-712 encodeData) -------------------------------------------------------

def _raw(value: bytes | str, what: str) -> bytes:
    return bytes(value) if isinstance(value, bytes | bytearray) else from_hex(value, None, what)


def _uint(bits: int) -> Encoder:
    limit = 1 << bits

    def encode(v: int) -> bytes:
        if isinstance(v, bool) or not 0 <= v < limit:
            raise ValueError(f"{v!r} is not a uint{bits}")
        return v.to_bytes(32, "big")
    return encode


def _int(bits: int) -> Encoder:
    half = 1 << (bits - 1)

    def encode(v: int) -> bytes:
        if isinstance(v, bool) or not -half <= v < half:
            raise ValueError(f"{v!r} is not an int{bits}")
        return v.to_bytes(32, "big", signed=True)
    return encode


def _bytes32(v: bytes | str) -> bytes:
    raw = v if type(v) is bytes else _raw(v, "bytes32")  # the hot case first: raw bytes, used as they are
    if len(raw) != 32:
        raise ValueError(f"bytes32 value has {len(raw)} bytes")
    return raw


def _fixed_bytes(n: int) -> Encoder:
    def encode(v: bytes | str) -> bytes:
        raw = _raw(v, f"bytes{n}")
        if len(raw) != n:
            raise ValueError(f"bytes{n} value has {len(raw)} bytes")
        return raw.ljust(32, b"\0")
    return encode


def _address(v: bytes | str) -> bytes:
    raw = _raw(v, "address")
    if len(raw) != 20:
        raise ValueError(f"an address has 20 bytes, got {len(raw)}")
    return raw.rjust(32, b"\0")


def _bool(v: bool) -> bytes:
    if not isinstance(v, bool):
        raise ValueError(f"{v!r} is not a bool")
    return int(v).to_bytes(32, "big")


def _string(v: str) -> bytes:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a string")
    return keccak(v.encode())


def _dynamic_bytes(v: bytes | str) -> bytes:
    return keccak(_raw(v, "bytes"))


_SIZED = re.compile(r"(u?int|bytes)(\d+)")


@functools.cache
def encoder(type_name: str) -> Encoder:
    """The 32-byte encoder of one EIP-712 type (atomic, dynamic, or an array of those)."""
    if type_name.endswith("[]"):
        inner = encoder(type_name[:-2])
        return lambda values: keccak(b"".join(inner(v) for v in values))
    fixed: dict[str, Encoder] = {"address": _address, "bool": _bool, "string": _string, "bytes": _dynamic_bytes}
    if type_name in fixed:
        return fixed[type_name]
    m = _SIZED.fullmatch(type_name)
    if m is not None:
        kind, size = m.group(1), int(m.group(2))
        if kind == "bytes" and size == 32:
            return _bytes32
        if kind == "bytes" and 1 <= size <= 32:
            return _fixed_bytes(size)
        if kind != "bytes" and size % 8 == 0 and 8 <= size <= 256:
            return _uint(size) if kind == "uint" else _int(size)
    raise ValueError(f"EIP-712 type {type_name!r} is not supported here (flat structs of atomic types only)")


# --- structs and domains ------------------------------------------------------------------------

@dataclass(frozen=True)
class Struct:
    """One EIP-712 struct type: `name` and its (field name, type) pairs in signing order."""

    name: str
    fields: tuple[tuple[str, str], ...]

    @cached_property
    def encoded_type(self) -> str:
        return f"{self.name}({','.join(f'{t} {n}' for n, t in self.fields)})"

    @cached_property
    def typehash(self) -> bytes:
        return keccak(self.encoded_type.encode())

    @cached_property
    def _encoders(self) -> tuple[Encoder, ...]:
        return tuple(encoder(t) for _, t in self.fields)

    def hash(self, *values: Any) -> bytes:
        """hashStruct of the field values, given in field order."""
        encoders = self._encoders
        if len(values) != len(encoders):
            raise ValueError(f"{self.name} has {len(encoders)} fields, got {len(values)} values")
        return keccak(self.typehash + b"".join([enc(v) for enc, v in zip(encoders, values)]))  # noqa: B905  (checked)

    def hash_message(self, message: Mapping[str, Any]) -> bytes:
        """hashStruct of a message given by field name (exactly the struct's fields)."""
        if set(message) != {n for n, _ in self.fields}:
            raise ValueError(f"{self.name} message fields {sorted(message)} are not {[n for n, _ in self.fields]}")
        return self.hash(*(message[n] for n, _ in self.fields))

    def types(self) -> list[dict[str, str]]:
        """The field list as wallets, ethers and eth_account take it."""
        return [{"name": n, "type": t} for n, t in self.fields]


def struct(name: str, fields: Sequence[tuple[str, str]]) -> Struct:
    return Struct(name, tuple(fields))


@dataclass(frozen=True)
class Domain:
    """An EIP-712 domain; fields left None are not part of it (the bundle manifest has no chain)."""

    name: str
    version: str
    chain_id: int | None = None
    verifying_contract: str | None = None

    @cached_property
    def _present(self) -> list[tuple[str, str, Any]]:
        candidates = (("name", "string", self.name), ("version", "string", self.version),
                      ("chainId", "uint256", self.chain_id), ("verifyingContract", "address", self.verifying_contract))
        return [c for c in candidates if c[2] is not None]

    @cached_property
    def struct(self) -> Struct:
        return struct("EIP712Domain", [(n, t) for n, t, _ in self._present])

    @cached_property
    def separator(self) -> bytes:
        return self.struct.hash(*(v for _, _, v in self._present))

    def digest(self, struct_hash: bytes) -> bytes:
        """keccak(0x1901 ‖ domain separator ‖ hashStruct): what is signed."""
        return keccak(b"\x19\x01" + self.separator + struct_hash)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.chain_id is not None:
            out["chainId"] = self.chain_id
        if self.verifying_contract is not None:
            out["verifyingContract"] = to_checksum_address(self.verifying_contract)
        return out

    def typed_data(self, primary: Struct, message: dict[str, Any]) -> dict[str, Any]:
        """The full typed-data JSON (eth_signTypedData_v4, ethers, eth_account's `encode_typed_data`)."""
        return {"types": {"EIP712Domain": self.struct.types(), primary.name: primary.types()},
                "primaryType": primary.name, "domain": self.as_dict(), "message": message}

    def signable(self, struct_hash: bytes) -> SignableMessage:
        """The same digest as eth_account's SignableMessage (for `Account.sign_message`/`recover_message`)."""
        return SignableMessage(version=b"\x01", header=self.separator, body=struct_hash)


# --- signing and recovery ------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _private_key(raw: bytes) -> PrivateKey:
    """Deriving the public key costs more than the signature: keep the key object per signer."""
    return PrivateKey(raw)


def sign(digest: bytes, account: LocalAccount) -> bytes:
    """65-byte r ‖ s ‖ v (v in {27, 28}) over `digest`: RFC 6979, low s, the form `recover` accepts."""
    sig = _private_key(bytes(account.key)).sign_msg_hash(digest)
    return sig.r.to_bytes(32, "big") + sig.s.to_bytes(32, "big") + bytes([sig.v + 27])


def sign_hex(digest: bytes, account: LocalAccount) -> str:
    return to_hex(sign(digest, account))


def check_signature(signature: bytes) -> None:
    """65 bytes, r in range, low s, v in {27, 28}: the rules OpenZeppelin's ECDSA applies on-chain."""
    if len(signature) != SIGNATURE_LEN:
        raise SignatureError(f"signature must be {SIGNATURE_LEN} bytes (r, s, v), got {len(signature)}")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    if not 0 < r < SECP256K1_N:
        raise SignatureError("signature has a zero or out-of-range r value")
    if s == 0 or s > SECP256K1_N // 2:
        raise SignatureError("signature has a high or zero s value (malleable); sign again with low s")
    if signature[64] not in (27, 28):
        raise SignatureError(f"signature v must be 27 or 28, got {signature[64]}")


def recover(digest: bytes, signature: bytes | str) -> str:
    """The lower-case 0x address that signed `digest`, after `check_signature`.

    Uses coincurve (libsecp256k1, the backend eth_keys itself uses) directly: eth_account's wrapper adds
    object building and checksum encoding that cost more than the recovery on the node's hot path."""
    if isinstance(signature, str):
        try:
            signature = from_hex(signature, None, "signature")
        except ValueError as exc:
            raise SignatureError(str(exc)) from exc
    check_signature(signature)
    try:
        public = PublicKey.from_signature_and_message(signature[:64] + bytes([signature[64] - 27]), digest, hasher=None)
    except ValueError as exc:
        raise SignatureError("signature does not recover to any key") from exc
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()
