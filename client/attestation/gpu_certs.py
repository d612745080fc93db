"""NVIDIA GPU evidence, part 2: the pinned roots, the device certificate chain (with its DICE FWID) and
optional revocation data (OCSP responses, CRLs), all checked offline at an explicit time."""

from __future__ import annotations

import base64
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from dcml.client.attestation.gpu_report import GpuEvidenceError, GpuReason

MAX_CHAIN_BYTES = 32 * 1024
MAX_CHAIN_CERTS = 8

# DICE TcbInfo: the leaf certificate's FWID lives under a different OID per architecture.
TCB_INFO_OIDS = {
    "hopper": x509.ObjectIdentifier("2.23.133.5.4.1"),
    "blackwell": x509.ObjectIdentifier("2.23.133.5.4.1.1"),
}


# --- roots --------------------------------------------------------------------------------------


@cache
def _packaged_root(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(resources.files("dcml.client.attestation.roots").joinpath(name).read_bytes())


def device_root() -> x509.Certificate:
    """NVIDIA Device Identity CA: the pinned root of every GPU's device certificate chain."""
    return _packaged_root("nvidia_device_identity_ca.pem")


def rim_root() -> x509.Certificate:
    """NVIDIA CoRIM signing Root CA: the pinned root of every RIM's signing chain."""
    return _packaged_root("nvidia_rim_root_ca.pem")



# --- certificates -------------------------------------------------------------------------------


def load_chain(pem: bytes | str) -> list[x509.Certificate]:
    if isinstance(pem, str):
        pem = pem.encode()
    if len(pem) > MAX_CHAIN_BYTES:
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"certificate chain is {len(pem)} bytes")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except Exception as exc:  # ValueError, or x509.InvalidVersion for a garbled version field
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"certificate chain does not parse ({exc})") from exc
    if not 1 <= len(certs) <= MAX_CHAIN_CERTS:
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"chain has {len(certs)} certificates")
    return certs


def _subject(cert: x509.Certificate) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:  # a corrupted name must not turn a refusal into a crash
        return "<unreadable subject>"


def verify_chain(
    certs: Sequence[x509.Certificate], root: x509.Certificate, now: datetime, *, bad: GpuReason
) -> None:
    """Leaf-first chain: each certificate signed by the next, the last equal to or issued by `root`.

    Every link's signature is checked first (failing with `bad`), so EXPIRED is only ever said of genuine
    certificates outside their validity at `now`.
    """
    path = list(certs)
    if path[-1] != root:
        path.append(root)
    for i, cert in enumerate(path):
        issuer = path[i + 1] if i + 1 < len(path) else root
        try:
            if i > 0 and not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise GpuEvidenceError(bad, f"{_subject(cert)} is not a CA but issues")
            cert.verify_directly_issued_by(issuer)
        except GpuEvidenceError:
            raise
        except Exception as exc:  # bad signature, wrong issuer, unsupported key, duplicate or garbled extensions
            raise GpuEvidenceError(bad, f"{_subject(cert)} is not validly signed by {_subject(issuer)} "
                                   f"({type(exc).__name__})") from exc
    for cert in path:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise GpuEvidenceError(
                GpuReason.EXPIRED,
                f"certificate {_subject(cert)} is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d}, not at {now:%Y-%m-%dT%H:%M:%SZ}",
            )


def _der_items(buf: bytes) -> Iterable[tuple[int, bytes]]:
    """Top-level DER TLVs of `buf` (definite lengths only)."""
    pos = 0
    while pos < len(buf):
        if pos + 2 > len(buf):
            raise ValueError("truncated DER")
        tag, length = buf[pos], buf[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > len(buf):
                raise ValueError("bad DER length")
            length = int.from_bytes(buf[pos : pos + n], "big")
            pos += n
        if pos + length > len(buf):
            raise ValueError("truncated DER")
        yield tag, buf[pos : pos + length]
        pos += length


def certificate_fwids(cert: x509.Certificate, arch: str) -> list[bytes]:
    """FWID digests in the leaf's TcbInfo extension: every FWID ::= SEQUENCE {hashAlg OID, digest OCTET STRING}.

    Hopper carries {version, SubjectPublicKeyInfo, FWID}; Blackwell a DICE TcbInfo whose fwids are field [6].
    """
    try:
        ext = cert.extensions.get_extension_for_oid(TCB_INFO_OIDS[arch])
    except Exception:  # absent, unknown architecture, or garbled extensions: no FWID to match
        return []
    out: list[bytes] = []

    def walk(der: bytes, depth: int) -> None:
        items = list(_der_items(der))
        if [t for t, _ in items] == [0x06, 0x04]:
            out.append(items[1][1])
            return
        if depth < 4:
            for tag, value in items:
                if tag == 0x30 or tag & 0xE0 == 0xA0:  # SEQUENCE or constructed context tag
                    walk(value, depth + 1)

    try:
        walk(ext.value.public_bytes(), 0)  # UnrecognizedExtension: the raw extnValue
    except ValueError:
        return []
    return out



# --- revocation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    """Supplied revocation data: DER OCSP responses and/or DER CRLs, for the device and RIM chains."""

    ocsp: tuple[bytes, ...] = ()
    crls: tuple[bytes, ...] = ()

    @classmethod
    def from_json(cls, data: dict | None) -> Revocation:
        if not data:
            return cls()
        try:
            return cls(
                tuple(base64.b64decode(x, validate=True) for x in data.get("ocsp", [])),
                tuple(base64.b64decode(x, validate=True) for x in data.get("crls", [])),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise GpuEvidenceError(GpuReason.REVOCATION_INVALID, "revocation data is not base64 DER") from exc

    def to_json(self) -> dict[str, list[str]]:
        return {"ocsp": [base64.b64encode(x).decode() for x in self.ocsp],
                "crls": [base64.b64encode(x).decode() for x in self.crls]}

    def __bool__(self) -> bool:
        return bool(self.ocsp or self.crls)


def check_revocation(chain: Sequence[x509.Certificate], root: x509.Certificate, data: Revocation,
                     now: datetime) -> None:
    """Every non-root certificate must be covered by a fresh, issuer-signed OCSP response or CRL saying good.

    Raises REVOKED for a revoked certificate, REVOCATION_INVALID when coverage is missing, stale or forged.
    """
    path = list(chain) if chain[-1] == root else [*chain, root]
    try:
        crls = [x509.load_der_x509_crl(c) for c in data.crls]
        responses = [ocsp.load_der_ocsp_response(r) for r in data.ocsp]
    except ValueError as exc:
        raise GpuEvidenceError(GpuReason.REVOCATION_INVALID, f"revocation data does not parse ({exc})") from exc
    for cert, issuer in itertools.pairwise(path):
        try:
            covered = _crl_covers(cert, issuer, crls, now) or _ocsp_covers(cert, issuer, responses, now)
        except GpuEvidenceError:
            raise
        except Exception as exc:  # e.g. an OCSP hash algorithm we cannot compute: not usable evidence
            raise GpuEvidenceError(GpuReason.REVOCATION_INVALID, f"revocation data unusable ({exc})") from exc
        if not covered:
            raise GpuEvidenceError(GpuReason.REVOCATION_INVALID, f"no fresh OCSP response or CRL covers "
                                   f"{_subject(cert)}")


def _fresh(this_update: datetime, next_update: datetime | None, now: datetime) -> bool:
    return this_update <= now and (next_update is None or now <= next_update)


def _crl_covers(cert: x509.Certificate, issuer: x509.Certificate, crls: list[x509.CertificateRevocationList],
                now: datetime) -> bool:
    for crl in crls:
        if crl.issuer != issuer.subject or not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            continue
        if not _fresh(crl.last_update_utc, crl.next_update_utc, now):
            continue
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise GpuEvidenceError(GpuReason.REVOKED, f"{_subject(cert)} is on its issuer's CRL")
        return True
    return False


def _ocsp_covers(cert: x509.Certificate, issuer: x509.Certificate, responses: list[ocsp.OCSPResponse],
                 now: datetime) -> bool:
    for resp in responses:
        if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            continue
        for single in resp.responses:
            if single.serial_number != cert.serial_number:
                continue
            algo = single.hash_algorithm.name
            name_hash = hashlib.new(algo, issuer.subject.public_bytes()).digest()
            if single.issuer_name_hash != name_hash or single.issuer_key_hash != _issuer_key_hash(issuer, algo):
                continue
            signer = _ocsp_signer(resp, issuer)
            if signer is None or not _fresh(single.this_update_utc, single.next_update_utc, now):
                continue
            if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
                raise GpuEvidenceError(GpuReason.REVOKED, f"OCSP says {_subject(cert)} is revoked")
            if single.certificate_status == ocsp.OCSPCertStatus.GOOD:
                return True
    return False


def _issuer_key_hash(issuer: x509.Certificate, algo: str) -> bytes:
    # issuerKeyHash hashes the subjectPublicKey BIT STRING value (the point), not the whole SPKI.
    key = issuer.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        raw = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    else:
        raw = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.new(algo, raw).digest()


def _ocsp_signer(resp: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate | None:
    """The issuer itself, or a delegated responder it issued with the OCSPSigning EKU; None if forged."""
    for candidate in [issuer, *resp.certificates]:
        if candidate is not issuer:
            try:
                candidate.verify_directly_issued_by(issuer)
                eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
                continue
            if x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                continue
        try:
            key = candidate.public_key()
            algorithm = resp.signature_hash_algorithm
            if not isinstance(key, ec.EllipticCurvePublicKey) or algorithm is None:  # NVIDIA's are ECDSA throughout
                continue
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(algorithm))
            return candidate
        except (InvalidSignature, ValueError, TypeError):
            continue
    return None

