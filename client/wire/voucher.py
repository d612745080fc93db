"""The payment-channel voucher: one EIP-712 definition, signed by clients and checked by nodes.

`Voucher(bytes32 channelId,uint128 cumulativeAmount)` under the domain
`{name: "PaymentChannels", version: "1", chainId, verifyingContract: escrow}`, exactly as
`contracts/src/PaymentChannels.sol` hashes it. The fast digest path (`VoucherDomain.digest`) is
derived from the same definition and tested against eth_account's generic encoder and the
contract's `hashVoucher`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from functools import cached_property

from coincurve import PublicKey
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcml.client.wire import safejson
from dcml.client.wire.errors import PaymentError, PaymentReason

DOMAIN_NAME = "PaymentChannels"
DOMAIN_VERSION = "1"
UINT128_MAX = 2**128 - 1
MAX_HEADER_CHARS = 2048  # a PAYMENT-SIGNATURE header is ~300 characters; anything longer is refused unparsed
# secp256k1 group order; signatures with s above half of it are malleable and refused (as on-chain).
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

EIP712_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "Voucher": [
        {"name": "channelId", "type": "bytes32"},
        {"name": "cumulativeAmount", "type": "uint128"},
    ],
}
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 cumulativeAmount)")
_DOMAIN_TYPEHASH = keccak(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)


class MalformedVoucher(PaymentError, ValueError):
    """The bytes on the wire are not a voucher: wrong lengths, encodings or ranges."""

    reason = PaymentReason.MALFORMED


@dataclass(frozen=True)
class VoucherDomain:
    """Which escrow on which chain a voucher is for; its separator is computed once."""

    chain_id: int
    escrow: str

    def typed_data(self, channel_id: bytes, cumulative_amount: int) -> dict:
        return {
            "types": EIP712_TYPES,
            "primaryType": "Voucher",
            "domain": {
                "name": DOMAIN_NAME,
                "version": DOMAIN_VERSION,
                "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(self.escrow),
            },
            "message": {"channelId": channel_id, "cumulativeAmount": cumulative_amount},
        }

    @cached_property
    def separator(self) -> bytes:
        return keccak(
            _DOMAIN_TYPEHASH
            + keccak(DOMAIN_NAME.encode())
            + keccak(DOMAIN_VERSION.encode())
            + self.chain_id.to_bytes(32, "big")
            + bytes.fromhex(self.escrow[2:]).rjust(32, b"\0")
        )

    def digest(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        """EIP-712 digest, the hot path of voucher verification (two keccaks, nothing rebuilt)."""
        struct_hash = keccak(VOUCHER_TYPEHASH + channel_id + cumulative_amount.to_bytes(32, "big"))
        return keccak(b"\x19\x01" + self.separator + struct_hash)

    def sign(self, signer: LocalAccount, channel_id: bytes, cumulative_amount: int) -> Voucher:
        _check_fields(channel_id, cumulative_amount)
        signed = signer.sign_message(encode_typed_data(full_message=self.typed_data(channel_id, cumulative_amount)))
        return Voucher(
            channel_id="0x" + channel_id.hex(),
            cumulative_amount=cumulative_amount,
            signature="0x" + bytes(signed.signature).hex(),
        )

    def recover(self, voucher: Voucher) -> str:
        """The address that signed this voucher under this domain (any other domain gives another one)."""
        return recover_digest_signer(self.digest(voucher.channel_id_bytes, voucher.cumulative_amount),
                                     voucher.signature_bytes)


def _check_fields(channel_id: bytes, cumulative_amount: int) -> None:
    if len(channel_id) != 32:
        raise MalformedVoucher(f"channelId must be 32 bytes, got {len(channel_id)}")
    if not 0 < cumulative_amount <= UINT128_MAX:
        raise MalformedVoucher("cumulativeAmount must be in 1..2**128-1")


def check_signature_shape(signature: bytes) -> None:
    """65 bytes, r in range, low s, v in {27, 28}: the same rules OpenZeppelin's ECDSA applies on-chain."""
    if len(signature) != 65:
        raise MalformedVoucher(f"signature must be 65 bytes (r, s, v), got {len(signature)}")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big")
    if not 0 < r < SECP256K1_N:
        raise MalformedVoucher("signature has a zero or out-of-range r value")
    if s == 0 or s > SECP256K1_N // 2:
        raise MalformedVoucher("signature has a high or zero s value (malleable); sign again with low s")
    if signature[64] not in (27, 28):
        raise MalformedVoucher(f"signature v must be 27 or 28, got {signature[64]}")


def recover_digest_signer(digest: bytes, signature: bytes) -> str:
    """The lower-case 0x address that signed `digest`. Uses coincurve (libsecp256k1, the backend
    eth_keys itself uses) directly: eth_account's wrapper adds object building and checksum encoding
    that cost more than the recovery on the node's hot path."""
    check_signature_shape(signature)
    try:
        public = PublicKey.from_signature_and_message(signature[:64] + bytes([signature[64] - 27]), digest, hasher=None)
    except ValueError as exc:
        raise MalformedVoucher("signature does not recover to any key") from exc
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()


def _hex_bytes(value: str, length: int | None, what: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise MalformedVoucher(f"{what} must be a 0x-prefixed hex string")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise MalformedVoucher(f"{what} is not valid hex") from exc
    if length is not None and len(raw) != length:
        raise MalformedVoucher(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


class Voucher(BaseModel):
    """A signed voucher as it travels (JSON body or the base64 `PAYMENT-SIGNATURE` header)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    channel_id: str = Field(alias="channelId")
    cumulative_amount: int = Field(alias="cumulativeAmount")
    signature: str

    @field_validator("channel_id")
    @classmethod
    def _channel_id(cls, v: str) -> str:
        _hex_bytes(v, 32, "channelId")
        return v.lower()

    @field_validator("cumulative_amount", mode="before")
    @classmethod
    def _amount(cls, v: object) -> int:
        # Amounts travel as decimal strings too (JSON numbers lose precision above 2**53 in many clients).
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise MalformedVoucher("cumulativeAmount must be an integer or a decimal string")
        amount = int(v) if isinstance(v, int) else _parse_decimal(v)
        if not 0 < amount <= UINT128_MAX:
            raise MalformedVoucher("cumulativeAmount must be in 1..2**128-1")
        return amount

    @field_validator("signature")
    @classmethod
    def _signature(cls, v: str) -> str:
        _hex_bytes(v, None, "signature")
        return v.lower()

    @property
    def channel_id_bytes(self) -> bytes:
        return bytes.fromhex(self.channel_id[2:])

    @property
    def signature_bytes(self) -> bytes:
        return bytes.fromhex(self.signature[2:])

    def to_wire(self) -> dict[str, str]:
        return {"channelId": self.channel_id, "cumulativeAmount": str(self.cumulative_amount),
                "signature": self.signature}

    def to_header(self) -> str:
        return base64.b64encode(json.dumps(self.to_wire(), separators=(",", ":")).encode()).decode()

    @classmethod
    def from_header(cls, value: str) -> Voucher:
        if len(value) > MAX_HEADER_CHARS:  # bounded before decoding: a voucher is ~300 characters
            raise MalformedVoucher(f"PAYMENT-SIGNATURE is {len(value)} characters; a voucher takes at most "
                                   f"{MAX_HEADER_CHARS}")
        try:
            data = safejson.loads(base64.b64decode(value, validate=True), max_bytes=MAX_HEADER_CHARS)
        except (ValueError, TypeError) as exc:
            raise MalformedVoucher("PAYMENT-SIGNATURE is not base64-encoded JSON (or is nested too deep)") from exc
        if not isinstance(data, dict):
            raise MalformedVoucher("PAYMENT-SIGNATURE must encode a JSON object {channelId, cumulativeAmount, "
                                   "signature}")
        return cls.model_validate(data)


def is_decimal(v: str) -> bool:
    """ASCII digits only, at most 78 (2**256 has 78): `str.isdigit` and `int` also take other scripts'
    digits ("١٢٣" is 123), signs, spaces and underscores, none of which an amount on the wire may carry."""
    return 0 < len(v) <= 78 and v.isascii() and v.isdigit()


def _parse_decimal(v: str) -> int:
    if not is_decimal(v) or len(v) > 40:  # 2**128 has 39 digits
        raise MalformedVoucher("cumulativeAmount must be a decimal integer string (ASCII digits 0-9)")
    return int(v)
