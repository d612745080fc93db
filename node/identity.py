"""The enclave's identity: a secp256k1 signing key and an HPKE (ML-KEM-768 + X25519) key pair.

Keys live only in this process. Persistence is by re-derivation from a seed: the dstack KMS gives the
same seed to the same app after a restart; the dev-only seed file exists for the simulated provider.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.signers.local import LocalAccount

from dcml.client.wire.identity import IDENTITY_DOMAIN, report_data

log = logging.getLogger(__name__)

SEED_LEN = 32
DEV_SEED_FILE = "identity-seed.DEV-ONLY"
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _derive(seed: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=IDENTITY_DOMAIN, info=label).derive(seed)


class EnclaveIdentity:
    """Holds the node's keys. No method writes them anywhere; derive them again from the seed instead."""

    __slots__ = ("_account", "_hpke_private", "_hpke_public_bytes")

    def __init__(self, account: LocalAccount, mlkem_key: mlkem.MLKEM768PrivateKey, x25519_key: x25519.X25519PrivateKey):
        self._account = account
        self._hpke_private = hpke.MLKEM768X25519PrivateKey(mlkem_key, x25519_key)
        # The hybrid public key object cannot serialize itself: encode ML-KEM key || X25519 key.
        self._hpke_public_bytes = (
            mlkem_key.public_key().public_bytes_raw() + x25519_key.public_key().public_bytes_raw()
        )

    @classmethod
    def generate(cls) -> EnclaveIdentity:
        """Fresh random keys (lost on restart: fine for a plain TDX node that re-registers)."""
        return cls.from_seed(os.urandom(SEED_LEN))

    @classmethod
    def from_seed(cls, seed: bytes) -> EnclaveIdentity:
        """Derive both keys deterministically (HKDF-SHA256, one label per key) from a secret seed."""
        if len(seed) < SEED_LEN:
            raise ValueError(f"identity seed is {len(seed)} bytes; need at least {SEED_LEN} secret bytes")
        for counter in range(256):  # a scalar >= n has probability ~2^-128; loop for completeness
            sk = _derive(seed, b"secp256k1/" + bytes([counter]), 32)
            if 0 < int.from_bytes(sk, "big") < _SECP256K1_N:
                break
        else:
            raise ValueError("could not derive a secp256k1 key from this seed")
        account = Account.from_key(sk)
        mlkem_key = mlkem.MLKEM768PrivateKey.from_seed_bytes(_derive(seed, b"hpke/mlkem768", 64))
        x25519_key = x25519.X25519PrivateKey.from_private_bytes(_derive(seed, b"hpke/x25519", 32))
        return cls(account, mlkem_key, x25519_key)

    @classmethod
    def load_or_create_dev_seed(cls, data_dir: str | Path) -> EnclaveIdentity:
        """DEVELOPMENT ONLY (simulated TEE): keep the seed in a 0600 file so the address is stable."""
        path = Path(data_dir) / DEV_SEED_FILE
        log.warning(
            "DEV ONLY: identity seed is stored in plaintext at %s; this node's keys are NOT protected. "
            "Never use this outside the simulated TEE provider.",
            path,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            if path.stat().st_mode & 0o077:
                raise PermissionError(f"{path} is readable by others; chmod 600 it or delete it") from None
            return cls.from_seed(path.read_bytes())
        seed = os.urandom(SEED_LEN)
        with os.fdopen(fd, "wb") as f:
            f.write(seed)
        return cls.from_seed(seed)

    @property
    def account(self) -> LocalAccount:
        return self._account

    @property
    def address(self) -> str:
        return self._account.address

    @property
    def hpke_private_key(self) -> hpke.MLKEM768X25519PrivateKey:
        return self._hpke_private

    def hpke_public_bytes(self) -> bytes:
        return self._hpke_public_bytes

    def report_data(self, nonce: bytes) -> bytes:
        return report_data(self.address, self._hpke_public_bytes, nonce)

    def __repr__(self) -> str:
        return f"EnclaveIdentity(address={self.address})"

    def __reduce__(self):  # no pickling: that would serialize the private keys
        raise TypeError("EnclaveIdentity cannot be pickled: keys never leave the process")
