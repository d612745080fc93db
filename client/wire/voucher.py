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

from eth_account.signers.local import LocalAccount
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dcml.client.wire import eip712, safejson
from dcml.client.wire.eip712 import SECP256K1_N  # noqa: F401  (re-exported: tests build high-s signatures)
from dcml.client.wire.errors import PaymentError, PaymentReason
from dcml.client.wire.hexutil import from_hex, to_hex

DOMAIN_NAME = "PaymentChannels"
DOMAIN_VERSION = "1"
UINT128_MAX = 2**128 - 1
MAX_HEADER_CHARS = 2048  # a PAYMENT-SIGNATURE header is ~300 characters; anything longer is refused unparsed

VOUCHER = eip712.struct("Voucher", [("channelId", "bytes32"), ("cumulativeAmount", "uint128")])
VOUCHER_TYPEHASH = VOUCHER.typehash
EIP712_TYPES = {"EIP712Domain": eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, 0, "0x" + "00" * 20).struct.types(),
                "Voucher": VOUCHER.types()}


class MalformedVoucher(PaymentError, ValueError):
    """The bytes on the wire are not a voucher: wrong lengths, encodings or ranges."""

    reason = PaymentReason.MALFORMED


@dataclass(frozen=True)
class VoucherDomain:
    """Which escrow on which chain a voucher is for; its separator is computed once."""

    chain_id: int
    escrow: str

    @cached_property
    def eip712_domain(self) -> eip712.Domain:
        return eip712.Domain(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id, self.escrow)

    def typed_data(self, channel_id: bytes, cumulative_amount: int) -> dict:
        return self.eip712_domain.typed_data(VOUCHER, {"channelId": channel_id, "cumulativeAmount": cumulative_amount})

    @property
    def separator(self) -> bytes:
        return self.eip712_domain.separator

    def digest(self, channel_id: bytes, cumulative_amount: int) -> bytes:
        """EIP-712 digest, the hot path of voucher verification (two keccaks, nothing rebuilt)."""
        return self.eip712_domain.digest(VOUCHER.hash(channel_id, cumulative_amount))

    def sign(self, signer: LocalAccount, channel_id: bytes, cumulative_amount: int) -> Voucher:
        _check_fields(channel_id, cumulative_amount)
        return Voucher(
            channel_id=to_hex(channel_id),
            cumulative_amount=cumulative_amount,
            signature=eip712.sign_hex(self.digest(channel_id, cumulative_amount), signer),
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
    """`eip712.check_signature`, raising MalformedVoucher (what the payment paths catch)."""
    try:
        eip712.check_signature(signature)
    except eip712.SignatureError as exc:
        raise MalformedVoucher(str(exc)) from exc


def recover_digest_signer(digest: bytes, signature: bytes) -> str:
    """`eip712.recover` (the one low-s rule), raising MalformedVoucher (what the payment paths catch)."""
    try:
        return eip712.recover(digest, signature)
    except eip712.SignatureError as exc:
        raise MalformedVoucher(str(exc)) from exc


def _hex_bytes(value: str, length: int | None, what: str) -> bytes:
    try:
        return from_hex(value, length, what, prefix=True)
    except ValueError as exc:
        raise MalformedVoucher(str(exc)) from exc


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
