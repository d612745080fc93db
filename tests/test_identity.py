"""The enclave identity and its report_data binding."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import stat

import pytest
from eth_account.messages import encode_defunct

from dcml.client.wire.identity import (
    HPKE_PUBLIC_KEY_LEN,
    HPKE_SUITE,
    IDENTITY_DOMAIN,
    hpke_public_key_from_bytes,
    identity_hash,
    report_data,
)
from dcml.node.identity import DEV_SEED_FILE, EnclaveIdentity

SEED = b"\x42" * 32


def test_identity_hash_formula():
    ident = EnclaveIdentity.from_seed(SEED)
    pk = ident.hpke_public_bytes()
    addr = bytes.fromhex(ident.address[2:])
    assert IDENTITY_DOMAIN == b"dcml-identity-v1"
    assert identity_hash(ident.address, pk) == hashlib.sha256(b"dcml-identity-v1" + addr + pk).digest()
    assert identity_hash(ident.address.lower(), pk) == identity_hash(ident.address, pk)  # case-insensitive


def test_report_data_layout():
    ident = EnclaveIdentity.from_seed(SEED)
    nonce = os.urandom(32)
    rd = ident.report_data(nonce)
    assert len(rd) == 64 and rd[32:] == nonce
    assert rd == report_data(ident.address, ident.hpke_public_bytes(), nonce)
    for bad in (b"", b"\0" * 31, b"\0" * 33):
        with pytest.raises(ValueError, match="32"):
            ident.report_data(bad)


def test_from_seed_is_deterministic_and_domain_separated():
    a, b = EnclaveIdentity.from_seed(SEED), EnclaveIdentity.from_seed(SEED)
    assert a.address == b.address and a.hpke_public_bytes() == b.hpke_public_bytes()
    c = EnclaveIdentity.from_seed(b"\x43" * 32)
    assert c.address != a.address and c.hpke_public_bytes() != a.hpke_public_bytes()
    assert EnclaveIdentity.generate().address != EnclaveIdentity.generate().address
    with pytest.raises(ValueError, match="32"):
        EnclaveIdentity.from_seed(b"short")


def test_keys_work():
    ident = EnclaveIdentity.generate()
    pk = ident.hpke_public_bytes()
    assert len(pk) == HPKE_PUBLIC_KEY_LEN
    sealed = HPKE_SUITE.encrypt(b"prompt", hpke_public_key_from_bytes(pk), info=b"dcml")
    assert HPKE_SUITE.decrypt(sealed, ident.hpke_private_key, info=b"dcml") == b"prompt"
    signed = ident.account.sign_message(encode_defunct(text="hi"))
    from eth_account import Account

    assert Account.recover_message(encode_defunct(text="hi"), signature=signed.signature) == ident.address


def test_keys_never_serialize():
    ident = EnclaveIdentity.generate()
    assert "EnclaveIdentity(address=" in repr(ident) and ident.account.key.hex() not in repr(ident)
    with pytest.raises(TypeError):
        pickle.dumps(ident)


def test_dev_seed_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        first = EnclaveIdentity.load_or_create_dev_seed(tmp_path)
    assert "DEV ONLY" in caplog.text
    path = tmp_path / DEV_SEED_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert EnclaveIdentity.load_or_create_dev_seed(tmp_path).address == first.address
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        EnclaveIdentity.load_or_create_dev_seed(tmp_path)
