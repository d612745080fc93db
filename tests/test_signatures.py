"""Every signed type of the protocol goes through the one EIP-712 module, so every one refuses the same
things: a high-s (malleable) twin of a valid signature, a signature of the wrong length, and a signature
made under another domain (name, version, verifying contract or chain id). Each case drives the type's
own public sign and verify functions, and its digest is checked against eth_account's generic encoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_account.signers.local import LocalAccount

from dcml.client.chain.registration import REATTESTATION, REGISTRATION, Reattestation, Registration, RegistryDomain
from dcml.client.publisher.bundle import (
    MANIFEST,
    MANIFEST_EIP712_DOMAIN,
    BundleError,
    Manifest,
    SignedManifest,
    manifest_signing_digest,
    manifest_typed_data,
    sign_manifest,
    verify_manifest,
)
from dcml.client.wire import eip712
from dcml.client.wire.advert import (
    ADVERT,
    Advert,
    AdvertDomain,
    AdvertError,
    SignedAdvert,
    sign_advert,
    verify_signature,
)
from dcml.client.wire.hexutil import to_hex
from dcml.client.wire.identity import HPKE_PUBLIC_KEY_LEN
from dcml.client.wire.receipts import (
    ACCEPTANCE,
    RECEIPT,
    Acceptance,
    Receipt,
    ReceiptDomain,
    ReceiptError,
    acceptance_digest,
    receipt_digest,
    request_hash,
    response_hash,
    sign_acceptance,
    sign_receipt,
    verify_acceptance,
    verify_receipt,
)
from dcml.client.wire.voucher import VOUCHER, MalformedVoucher, Voucher, VoucherDomain

CHAIN_ID = 31337
CONTRACT = "0x" + "c0" * 20
SIGNER: LocalAccount = Account.from_key("0x" + "11" * 32)
OPERATOR = Account.from_key("0x" + "22" * 32).address


@dataclass(frozen=True)
class Case:
    """One signed type: its domain and digest, and its own public sign/verify functions."""

    name: str
    domain: eip712.Domain
    digest: bytes  # the type's own digest of the sample message
    struct_hash: bytes  # hashStruct of the sample message (re-signed under altered domains)
    typed_data: dict  # the same message for eth_account's generic encoder
    sign: Callable[[], bytes]  # the type's signing API
    accepts: Callable[[bytes], bool]  # the type's verifying API: True if accepted as SIGNER's


def _voucher() -> Case:
    domain, cid, amount = VoucherDomain(CHAIN_ID, CONTRACT), b"\x07" * 32, 10**20

    def accepts(sig: bytes) -> bool:
        try:
            voucher = Voucher(channel_id=to_hex(cid), cumulative_amount=amount, signature=to_hex(sig))
            return domain.recover(voucher) == SIGNER.address.lower()
        except MalformedVoucher:
            return False
    return Case("Voucher", domain.eip712_domain, domain.digest(cid, amount), VOUCHER.hash(cid, amount),
                domain.typed_data(cid, amount), lambda: domain.sign(SIGNER, cid, amount).signature_bytes, accepts)


def _receipt() -> Case:
    domain = ReceiptDomain(CHAIN_ID, CONTRACT)
    receipt = Receipt(receipt_id="0x" + "01" * 32, request_hash=request_hash(b"q"), response_hash=response_hash(b"a"),
                      channel_id="0x" + "02" * 32, model_id="0x" + "03" * 32, input_tokens=3, output_tokens=5,
                      cost=2**100, cumulative_spent=2**101, accepted_at=1_700_000_000, ttft_ms=9, duration_ms=99)

    def accepts(sig: bytes) -> bool:
        try:
            verify_receipt(receipt, to_hex(sig), expected_signer=SIGNER.address, request_bytes=b"q",
                           response_bytes=b"a", domain=domain)
            return True
        except ReceiptError:
            return False
    return Case("Receipt", domain.eip712_domain, receipt_digest(receipt, domain),
                RECEIPT.hash_message(receipt.model_dump(by_alias=True)),
                domain.eip712_domain.typed_data(RECEIPT, receipt.eip712_message()),
                lambda: bytes.fromhex(sign_receipt(receipt, SIGNER, domain).signature[2:]), accepts)


def _acceptance() -> Case:
    domain = ReceiptDomain(CHAIN_ID, CONTRACT)
    acceptance = Acceptance(request_hash="0x" + "04" * 32, channel_id="0x" + "05" * 32, accepted_at=1, deadline=2**63)

    def accepts(sig: bytes) -> bool:
        try:
            verify_acceptance(acceptance, to_hex(sig), expected_signer=SIGNER.address, domain=domain)
            return True
        except ReceiptError:
            return False
    return Case("Acceptance", domain.eip712_domain, acceptance_digest(acceptance, domain),
                ACCEPTANCE.hash_message(acceptance.model_dump(by_alias=True)),
                domain.eip712_domain.typed_data(ACCEPTANCE, acceptance.eip712_message()),
                lambda: bytes.fromhex(sign_acceptance(acceptance, SIGNER, domain).signature[2:]), accepts)


def _registry(kind: str) -> Case:
    domain = RegistryDomain(chain_id=CHAIN_ID, registry=CONTRACT)
    common = dict(node=SIGNER.address, endpoint="https://node.example", peer_id=b"\x00\x24peer",
                  attestation_hash=b"\x06" * 32, epoch=b"\x08" * 32, deadline=2**255)
    message: Registration | Reattestation = (
        Registration(**common, operator=OPERATOR, hpke_public_key=b"\x09" * HPKE_PUBLIC_KEY_LEN, tee_type=3)
        if kind == "Registration" else Reattestation(**common))

    def accepts(sig: bytes) -> bool:
        try:
            return domain.recover(message, sig) == SIGNER.address
        except eip712.SignatureError:
            return False
    struct = REGISTRATION if kind == "Registration" else REATTESTATION
    return Case(kind, domain.eip712_domain, domain.digest(message), struct.hash_message(message.message()),
                domain.typed_data(message), lambda: domain.sign(SIGNER, message), accepts)


def _advert() -> Case:
    domain = AdvertDomain(CHAIN_ID, CONTRACT)
    advert = Advert(node=SIGNER.address, peer_id="12D3KooWtest", endpoint="https://node.example",
                    models=("0x" + "0a" * 32, "0x" + "0b" * 32), prices_in=(1, 2**200), prices_out=(3, 4),
                    attestation_hash="0x" + "0c" * 32, issued_at=1, expires_at=2, sequence=7)

    def accepts(sig: bytes) -> bool:
        try:
            verify_signature(SignedAdvert(advert=advert, signature=to_hex(sig)), domain)
            return True
        except AdvertError:
            return False
    return Case("Advert", domain.eip712_domain, advert.digest(domain), ADVERT.hash_message(advert.eip712_message()),
                domain.eip712_domain.typed_data(ADVERT, advert.eip712_message()),
                lambda: bytes.fromhex(sign_advert(SIGNER, advert, domain).signature[2:]), accepts)


def _manifest() -> Case:
    manifest = Manifest(model_id="0x" + "0d" * 32, model_name="tiny", publisher=SIGNER.address, chunk_size=1024,
                        created_at=1, key_commitment="0e" * 32, weights_hash="0x" + "0f" * 32, files=[])

    def accepts(sig: bytes) -> bool:
        try:
            verify_manifest(SignedManifest(manifest=manifest, signature=to_hex(sig)), publisher=SIGNER.address)
            return True
        except BundleError:
            return False
    typed = manifest_typed_data(manifest)
    return Case("BundleManifest", MANIFEST_EIP712_DOMAIN, manifest_signing_digest(manifest),
                MANIFEST.hash_message(typed["message"]), typed,
                lambda: bytes.fromhex(sign_manifest(manifest, SIGNER).signature[2:]), accepts)


CASES = [_voucher(), _receipt(), _acceptance(), _registry("Registration"), _registry("Reattestation"), _advert(),
         _manifest()]
by_name = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def _high_s_twin(sig: bytes) -> bytes:
    """The other valid ECDSA signature of the same digest by the same key: s -> n - s, v flipped."""
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (eip712.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])


@by_name
def test_a_valid_signature_is_accepted_and_equals_the_generic_encoders(case: Case) -> None:
    sig = case.sign()
    assert case.accepts(sig)
    assert sig == eip712.sign(case.digest, SIGNER)  # the type signs its digest under its own domain
    assert case.domain.digest(case.struct_hash) == case.digest
    assert _hash_eip191_message(encode_typed_data(full_message=case.typed_data)) == case.digest


@by_name
def test_the_high_s_twin_of_a_valid_signature_is_refused(case: Case) -> None:
    twin = _high_s_twin(case.sign())
    assert Account._recover_hash(case.digest, signature=twin) == SIGNER.address  # ecrecover alone would take it
    assert not case.accepts(twin)


@by_name
@pytest.mark.parametrize("cut", [lambda s: s[:64], lambda s: s + b"\x00", lambda s: b"", lambda s: s[:64] + b"\x01"],
                         ids=["64 bytes", "66 bytes", "empty", "v=1"])
def test_a_signature_of_the_wrong_shape_is_refused(case: Case, cut: Callable[[bytes], bytes]) -> None:
    assert not case.accepts(cut(case.sign()))


@by_name
@pytest.mark.parametrize("change", [
    {"name": "another-name"}, {"version": "9"}, {"verifying_contract": "0x" + "dd" * 20}, {"chain_id": 1},
], ids=["name", "version", "verifying contract", "chain id"])
def test_a_signature_under_another_domain_is_refused(case: Case, change: dict) -> None:
    other = replace(case.domain, **change)
    sig = eip712.sign(other.digest(case.struct_hash), SIGNER)
    assert other.separator != case.domain.separator
    assert not case.accepts(sig)


def test_recover_applies_one_rule() -> None:
    digest = b"\x42" * 32
    sig = eip712.sign(digest, SIGNER)
    assert eip712.recover(digest, sig) == eip712.recover(digest, to_hex(sig)) == SIGNER.address.lower()
    for bad in (_high_s_twin(sig), sig[:64], sig + b"\0", bytes(32) + sig[32:], "0xzz"):
        with pytest.raises(eip712.SignatureError):
            eip712.recover(digest, bad)


def test_access_auth_signatures_follow_the_same_rule() -> None:
    """The EIP-191 `X-DCML-Auth` header is recovered by the same function: its high-s twin is refused too."""
    from dcml.client.wire.access import AUTH_HEADER, auth_header, recover_auth

    node = "0x" + "ab" * 20
    value = auth_header(SIGNER, node, "channel 0x01", now=1_000)[AUTH_HEADER]
    assert recover_auth(value, node, "channel 0x01", now=1_000) == SIGNER.address
    ts, _, sig = value.partition(":")
    twin = f"{ts}:{to_hex(_high_s_twin(bytes.fromhex(sig[2:])))}"
    assert recover_auth(twin, node, "channel 0x01", now=1_000) is None
    assert recover_auth(f"{ts}:{sig[:-2]}", node, "channel 0x01", now=1_000) is None
