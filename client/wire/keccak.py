"""Keccak-256, Ethereum's hash, for every signed type of the protocol.

With safe-pysha3 installed (the node's extra) it is one C call (~0.5 µs); otherwise eth_hash's pycryptodome
backend, whose Python wrapping costs ~3.5 µs a call. A voucher costs three (struct hash, digest, the recovered
key's address), on the event loop of a node that accepts thousands a second.
"""

from __future__ import annotations

from collections.abc import Callable

from eth_hash.auto import keccak as _eth_hash_keccak


def _pick() -> Callable[[bytes], bytes]:
    try:
        from sha3 import keccak_256  # safe-pysha3, a maintained build of pysha3 (eth_hash's other backend)
    except ImportError:  # the client's base install
        return _eth_hash_keccak

    def keccak(data: bytes) -> bytes:
        return keccak_256(data).digest()
    return keccak


keccak = _pick()
