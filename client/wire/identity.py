"""The enclave identity as clients see it: the report_data binding and the HPKE suite.

report_data (64 bytes in a TDX quote) = sha256(b"dcml-identity-v1" || address(20) || hpke_public_key) || nonce(32).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

IDENTITY_DOMAIN = b"dcml-identity-v1"
NONCE_LEN = 32
REPORT_DATA_LEN = 64

# RFC 9180 with the post-quantum hybrid KEM (ML-KEM-768 + X25519).
HPKE_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
MLKEM768_PUBLIC_LEN = 1184
X25519_PUBLIC_LEN = 32
# Serialized as ML-KEM-768 encapsulation key || X25519 public key (the hybrid KEM's encoding).
HPKE_PUBLIC_KEY_LEN = MLKEM768_PUBLIC_LEN + X25519_PUBLIC_LEN


def address_bytes(signing_address: str) -> bytes:
    """The 20 bytes of an Ethereum address given as 0x-hex (any case)."""
    text = signing_address[2:] if signing_address.lower().startswith("0x") else signing_address
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise ValueError(f"signing address {signing_address!r} is not hex; pass a 0x-prefixed address") from exc
    if len(raw) != 20:
        raise ValueError(f"signing address {signing_address!r} is {len(raw)} bytes, expected 20")
    return raw


def identity_hash(signing_address: str, hpke_public_key: bytes) -> bytes:
    """sha256(b"dcml-identity-v1" || address(20) || hpke_public_key): the first half of report_data."""
    if len(hpke_public_key) != HPKE_PUBLIC_KEY_LEN:
        raise ValueError(
            f"HPKE public key is {len(hpke_public_key)} bytes, expected {HPKE_PUBLIC_KEY_LEN} (ML-KEM-768+X25519)"
        )
    return hashlib.sha256(IDENTITY_DOMAIN + address_bytes(signing_address) + hpke_public_key).digest()


def report_data(signing_address: str, hpke_public_key: bytes, nonce: bytes) -> bytes:
    """The 64 bytes a quote must carry: identity hash || the verifier's 32-byte nonce."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce is {len(nonce)} bytes, expected {NONCE_LEN}: generate it with os.urandom(32)")
    return identity_hash(signing_address, hpke_public_key) + nonce


def hpke_public_key_from_bytes(data: bytes) -> hpke.MLKEM768X25519PublicKey:
    """Rebuild the node's HPKE public key (to seal prompts or model keys to it with HPKE_SUITE)."""
    if len(data) != HPKE_PUBLIC_KEY_LEN:
        raise ValueError(f"HPKE public key is {len(data)} bytes, expected {HPKE_PUBLIC_KEY_LEN}")
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(data[:MLKEM768_PUBLIC_LEN]),
        x25519.X25519PublicKey.from_public_bytes(data[MLKEM768_PUBLIC_LEN:]),
    )
