"""0x-hex <-> bytes, in one place: the wire carries hashes, ids and signatures as 0x-prefixed hex strings."""

from __future__ import annotations

ZERO_ADDRESS = "0x" + "00" * 20
ZERO32 = "0x" + "00" * 32


def to_hex(raw: bytes) -> str:
    """`0x` + lower-case hex of `raw`."""
    return "0x" + bytes(raw).hex()


hex32 = to_hex  # the name callers use for 32-byte hashes


def from_hex(value: str, length: int | None = None, what: str = "value", *, prefix: bool = False) -> bytes:
    """The bytes of a hex string (`0x` optional unless `prefix`), of exactly `length` bytes when given.

    Raises ValueError with a message naming `what`."""
    if not isinstance(value, str) or (prefix and not value.startswith("0x")):
        raise ValueError(f"{what} must be a 0x-prefixed hex string")
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError as exc:
        raise ValueError(f"{what} is not valid hex") from exc
    if length is not None and len(raw) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


def bytes32(value: str | bytes, what: str = "value") -> bytes:
    """32 bytes from raw bytes or hex (a channel id, a model id, a hash)."""
    if isinstance(value, bytes | bytearray):
        if len(value) != 32:
            raise ValueError(f"{what} must be 32 bytes, got {len(value)}")
        return bytes(value)
    return from_hex(value, 32, what)


def check_hex32(value: object, what: str = "value") -> str:
    """`value` lower-cased if it is exactly `0x` + 64 hex digits (the wire form of a bytes32)."""
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 66:
        raise ValueError(f"{what} must be 0x followed by 64 hex digits")
    from_hex(value, 32, what)
    return value.lower()


def is_hex32(value: object) -> bool:
    try:
        check_hex32(value)
    except ValueError:
        return False
    return True


def lower_hex(value: str) -> str:
    """Lower-case hex without `0x` (the canonical form inside hashed JSON documents)."""
    return value.lower().removeprefix("0x")
