"""NVIDIA confidential-computing GPU evidence, verified offline: SPDM report, device chain, RIMs, FWID.

Like a TDX quote checked with supplied collateral: the roots are pinned (shipped in client/attestation/roots/), the time
is an explicit input, and revocation data is optional and reported. Nothing here touches the network.
Every failure is a `GpuResult` with a `GpuReason`; no input, however hostile, makes `verify_gpu` raise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import ocsp
from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from signxml import SignatureConfiguration, SignatureMethod, XMLVerifier
from signxml.algorithms import DigestAlgorithm
from signxml.exceptions import SignXMLException

from dcml.client.wire.errors import DcmlError, ErrorType, GpuReason

GPU_NONCE_DOMAIN = b"dcml-gpu-v1"
MAX_REPORT_BYTES = 16 * 1024  # a real report is ~4 KiB
MAX_CHAIN_BYTES = 32 * 1024
MAX_RIM_BYTES = 256 * 1024  # a real RIM is ~20 KiB
MAX_CHAIN_CERTS = 8

# SPDM 1.1 GET_MEASUREMENTS: request = 11 E0 <attrs> <op=FF: all blocks> nonce(32) slot(1).
SPDM_REQUEST_LEN = 37
SIGNATURE_LEN = 96  # ECDSA P-384 raw r || s
DIGEST_LEN = 48  # SHA-384 measurement values

# Opaque field types in NVIDIA's MEASUREMENTS response.
OPAQUE_DRIVER_VERSION = 3
OPAQUE_VBIOS_VERSION = 6
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_CHIP_SKU = 15
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_FWID = 20
NVDEC0_DISABLED = 0x55
NVDEC0_MEASUREMENT_INDEX = 35  # RIM index not compared while NVDEC0 is disabled

# DICE TcbInfo: the leaf certificate's FWID lives under a different OID per architecture.
TCB_INFO_OIDS = {
    "hopper": x509.ObjectIdentifier("2.23.133.5.4.1"),
    "blackwell": x509.ObjectIdentifier("2.23.133.5.4.1.1"),
}
ARCHITECTURES = {"GH100": "hopper", "GB100": "blackwell", "GB200": "blackwell"}

SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
RIM_HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"


class GpuEvidenceError(DcmlError, ValueError):
    """A check failed; `reason` is machine-readable and `indices` names mismatching RIM measurements."""

    error_type = ErrorType.ATTESTATION
    reason_in_str = True
    reason: GpuReason

    def __init__(self, reason: GpuReason, message: str, indices: tuple[int, ...] = ()) -> None:
        super().__init__(message, reason=reason)
        self.indices = indices


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


# --- SPDM report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasurementReport:
    """A parsed SPDM GET_MEASUREMENTS request + signed response (NVIDIA GPU attestation report)."""

    request: bytes
    response: bytes
    nonce: bytes  # the requester's nonce (what binds the report to the verifier)
    responder_nonce: bytes
    measurements: dict[int, bytes]  # SPDM block index (1-based) -> value
    opaque: dict[int, bytes]
    signature: bytes  # 96 bytes raw r || s

    @property
    def signed_bytes(self) -> bytes:
        return self.request + self.response[: -SIGNATURE_LEN]

    def _text(self, kind: int) -> str | None:
        v = self.opaque.get(kind)
        return None if v is None else v.split(b"\0", 1)[0].decode("ascii", "replace")

    @property
    def driver_version(self) -> str | None:
        return self._text(OPAQUE_DRIVER_VERSION)

    @property
    def vbios_version(self) -> str | None:
        v = self.opaque.get(OPAQUE_VBIOS_VERSION)
        if v is None or len(v) < 5:
            return None
        return ".".join(f"{b:02X}" for b in (v[3], v[2], v[1], v[0], v[4]))

    @property
    def project(self) -> str | None:
        return self._text(OPAQUE_PROJECT)

    @property
    def project_sku(self) -> str | None:
        return self._text(OPAQUE_PROJECT_SKU)

    @property
    def chip_sku(self) -> str | None:
        return self._text(OPAQUE_CHIP_SKU)

    @property
    def nvdec0_disabled(self) -> bool:
        return self.opaque.get(OPAQUE_NVDEC0_STATUS) == bytes([NVDEC0_DISABLED])

    @property
    def fwid(self) -> bytes | None:
        return self.opaque.get(OPAQUE_FWID)


def _take(buf: bytes, off: int, n: int, what: str) -> tuple[bytes, int]:
    if n < 0 or off + n > len(buf):
        raise GpuEvidenceError(GpuReason.MALFORMED, f"report truncated in {what}")
    return buf[off : off + n], off + n


def parse_report(data: bytes) -> MeasurementReport:
    """Parse request (37 bytes) ‖ MEASUREMENTS response; bounds-checked, raises GpuEvidenceError(MALFORMED)."""
    if len(data) > MAX_REPORT_BYTES:
        raise GpuEvidenceError(GpuReason.MALFORMED, f"report is {len(data)} bytes (limit {MAX_REPORT_BYTES})")
    request, off = _take(data, 0, SPDM_REQUEST_LEN, "request")
    if request[0] != 0x11 or request[1] != 0xE0:
        raise GpuEvidenceError(GpuReason.MALFORMED, "request is not an SPDM 1.1 GET_MEASUREMENTS")
    response = data[off:]
    header, roff = _take(response, 0, 8, "response header")
    if header[0] != 0x11 or header[1] != 0x60:
        raise GpuEvidenceError(GpuReason.MALFORMED, "response is not an SPDM 1.1 MEASUREMENTS")
    count, record_len = header[4], int.from_bytes(header[5:8], "little")
    record, roff = _take(response, roff, record_len, "measurement record")
    measurements: dict[int, bytes] = {}
    pos = 0
    for _ in range(count):
        head, pos = _take(record, pos, 4, "measurement block")
        index, size = head[0], int.from_bytes(head[2:4], "little")
        body, pos = _take(record, pos, size, "measurement block")
        if size < 3 or int.from_bytes(body[1:3], "little") != size - 3:
            raise GpuEvidenceError(GpuReason.MALFORMED, f"measurement block {index} has inconsistent sizes")
        if index in measurements:
            raise GpuEvidenceError(GpuReason.MALFORMED, f"measurement block {index} appears twice")
        measurements[index] = body[3:]
    if pos != len(record):
        raise GpuEvidenceError(GpuReason.MALFORMED, "measurement record length disagrees with its blocks")
    responder_nonce, roff = _take(response, roff, 32, "responder nonce")
    opaque_len_b, roff = _take(response, roff, 2, "opaque length")
    opaque_raw, roff = _take(response, roff, int.from_bytes(opaque_len_b, "little"), "opaque data")
    signature, roff = _take(response, roff, SIGNATURE_LEN, "signature")
    if roff != len(response):
        raise GpuEvidenceError(GpuReason.MALFORMED, f"{len(response) - roff} trailing bytes after the signature")
    opaque: dict[int, bytes] = {}
    pos = 0
    while pos < len(opaque_raw):
        head, pos = _take(opaque_raw, pos, 4, "opaque field")
        kind, size = struct.unpack("<HH", head)
        if kind in opaque:
            raise GpuEvidenceError(GpuReason.MALFORMED, f"opaque field {kind} appears twice")
        opaque[kind], pos = _take(opaque_raw, pos, size, f"opaque field {kind}")
    return MeasurementReport(request, response, request[4:36], responder_nonce, measurements, opaque, signature)


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


# --- RIMs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rim:
    """A verified reference integrity manifest (read from the XML the signature covers, nothing else)."""

    version: str
    product: str
    golden: dict[int, tuple[bytes, ...]]  # active RIM index -> allowed values
    chain: tuple[x509.Certificate, ...]  # signer first, as embedded (verified to the RIM root)


# No DTD, no entities, no network, no huge trees: XXE and billion-laughs fail here, typed.
_PARSER = etree.XMLParser(
    resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False, huge_tree=False,
    remove_comments=False,
)


def parse_rim_xml(xml: bytes | str) -> etree._Element:
    if isinstance(xml, str):
        xml = xml.encode()
    if len(xml) > MAX_RIM_BYTES:
        raise GpuEvidenceError(GpuReason.RIM_MALFORMED, f"RIM is {len(xml)} bytes (limit {MAX_RIM_BYTES})")
    try:
        tree = etree.fromstring(xml, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise GpuEvidenceError(GpuReason.RIM_MALFORMED, f"RIM is not well-formed XML ({exc})") from exc
    doc = tree.getroottree()
    if doc.docinfo.doctype or doc.docinfo.internalDTD is not None:
        raise GpuEvidenceError(GpuReason.RIM_MALFORMED, "RIM carries a DOCTYPE (entities are refused)")
    if tree.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise GpuEvidenceError(GpuReason.RIM_MALFORMED, f"RIM root is {tree.tag}, not a SWID SoftwareIdentity")
    return tree


def _rim_certs(tree: etree._Element) -> list[x509.Certificate]:
    nodes = tree.findall(f"{{{DSIG_NS}}}Signature/{{{DSIG_NS}}}KeyInfo/{{{DSIG_NS}}}X509Data/"
                         f"{{{DSIG_NS}}}X509Certificate")
    if not 1 <= len(nodes) <= MAX_CHAIN_CERTS:
        raise GpuEvidenceError(GpuReason.RIM_CHAIN_INVALID, f"RIM embeds {len(nodes)} signer certificates")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode("".join((n.text or "").split()))) for n in nodes]
    except Exception as exc:  # ValueError, or x509.InvalidVersion for a garbled version field
        raise GpuEvidenceError(GpuReason.RIM_CHAIN_INVALID, f"RIM signer certificate does not parse ({exc})") from exc


_RIM_SIG_CONFIG = SignatureConfiguration(
    location="./",  # enveloped, directly under SoftwareIdentity
    signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
    digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
    expect_references=1,
)


def verify_rim(xml: bytes | str, now: datetime, root: x509.Certificate | None = None) -> Rim:
    """Verify a RIM's enveloped XML signature and signing chain; return what the signature covers."""
    tree = parse_rim_xml(xml)
    certs = _rim_certs(tree)
    verify_chain(certs, root or rim_root(), now, bad=GpuReason.RIM_CHAIN_INVALID)
    signer = certs[0]
    try:
        result = XMLVerifier().verify(
            tree, x509_cert=signer, expect_config=replace(_RIM_SIG_CONFIG, verification_time=now),
            validate_schema=True, parser=_PARSER,
        )
    except (SignXMLException, InvalidSignature, ValueError, TypeError, etree.LxmlError) as exc:
        raise GpuEvidenceError(GpuReason.RIM_SIGNATURE_INVALID, f"RIM XML signature does not verify ({exc})") from exc
    signed = result.signed_xml  # "see what is signed": read only this
    if signed is None or signed.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise GpuEvidenceError(GpuReason.RIM_SIGNATURE_INVALID, "RIM signature does not cover the SoftwareIdentity")
    meta = signed.find(f"{{{SWID_NS}}}Meta")
    payload = signed.find(f"{{{SWID_NS}}}Payload")
    if meta is None or payload is None:
        raise GpuEvidenceError(GpuReason.RIM_MALFORMED, "RIM lacks Meta or Payload")
    golden: dict[int, tuple[bytes, ...]] = {}
    try:
        for res in payload.findall(f"{{{SWID_NS}}}Resource"):
            if res.get("type") != "Measurement" or res.get("active", "").lower() != "true":
                continue
            n = int(res.get("alternatives", "1"))
            values = tuple(bytes.fromhex(res.get(f"{{{RIM_HASH_NS}}}Hash{k}", "")) for k in range(n))
            if n < 1 or any(len(v) != DIGEST_LEN for v in values):
                raise ValueError(f"measurement {res.get('index')} has bad golden values")
            golden[int(res.get("index", ""))] = values
    except ValueError as exc:
        raise GpuEvidenceError(GpuReason.RIM_MALFORMED, f"RIM payload does not parse ({exc})") from exc
    return Rim(meta.get("colloquialVersion", ""), meta.get("product", ""), golden, tuple(certs))


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
        raw = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)  # type: ignore[arg-type]
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
            if not isinstance(key, ec.EllipticCurvePublicKey):  # NVIDIA's chains are ECDSA throughout
                continue
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
            return candidate
        except (InvalidSignature, ValueError, TypeError):
            continue
    return None


# --- the verifier -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuResult:
    """Outcome for one GPU. `ok` is the verdict; on failure `reason`/`message` (and `indices`) say why."""

    ok: bool
    reason: GpuReason | None = None
    message: str = ""
    indices: tuple[int, ...] = ()  # RIM indices that mismatched
    architecture: str | None = None
    driver_version: str | None = None
    vbios_version: str | None = None
    fwid_checked: bool = False
    rims_checked: bool = False
    revocation_checked: bool = False
    report: MeasurementReport | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.ok:
            return f"GPU ok ({self.architecture}, driver {self.driver_version}, VBIOS {self.vbios_version})"
        extra = f" at RIM indices {list(self.indices)}" if self.indices else ""
        return f"{self.reason}{extra}: {self.message}"


def gpu_nonce(report_data: bytes) -> bytes:
    """The nonce a node collects GPU evidence with: binds its keys and the verifier's nonce (via report_data)."""
    if len(report_data) != 64:
        raise ValueError("report_data must be 64 bytes")
    return hashlib.sha256(GPU_NONCE_DOMAIN + report_data).digest()


def _architecture(leaf: x509.Certificate) -> str:
    chip = gpu_chip(leaf)
    if chip not in ARCHITECTURES:
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"leaf certificate names an unknown GPU {chip!r}")
    return ARCHITECTURES[chip]


def gpu_chip(leaf: x509.Certificate) -> str:
    """The chip a device leaf certificate names (CN "GH100 A01 GSP FMC LF" -> "GH100"); RIMs name the same."""
    try:
        cns = leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    except Exception:
        return ""
    return str(cns[0].value).split(" ", 1)[0] if cns else ""


def compare_measurements(report: MeasurementReport, rims: Sequence[Rim]) -> tuple[int, ...]:
    """RIM indices whose report value is none of the golden alternatives (RIM index i = SPDM block i + 1)."""
    bad = []
    for rim in rims:
        for index, allowed in sorted(rim.golden.items()):
            if index == NVDEC0_MEASUREMENT_INDEX and report.nvdec0_disabled:
                continue
            got = report.measurements.get(index + 1)
            if got is None or not any(hmac.compare_digest(got, v) for v in allowed):
                bad.append(index)
    return tuple(sorted(set(bad)))


def verify_gpu(
    report: bytes,
    cert_chain: bytes | str,
    *,
    nonce: bytes,
    now: datetime,
    driver_rim: bytes | str | Rim | None = None,
    vbios_rim: bytes | str | Rim | None = None,
    require_rims: bool = True,
    revocation: Revocation | None = None,
    device_root_cert: x509.Certificate | None = None,
    rim_root_cert: x509.Certificate | None = None,
) -> GpuResult:
    """Verify one GPU's evidence offline at time `now`; never raises for bad input (see GpuResult).

    RIMs may be passed pre-verified (`Rim`, from verify_rim) so a document verifies each RIM once.
    """
    state: dict = {}
    try:
        _verify_gpu(report, cert_chain, nonce, now, driver_rim, vbios_rim, require_rims, revocation,
                    device_root_cert or device_root(), rim_root_cert or rim_root(), state)
    except GpuEvidenceError as exc:
        return GpuResult(False, exc.reason, exc.message, exc.indices, **state)
    except Exception as exc:
        return GpuResult(False, GpuReason.MALFORMED, f"evidence could not be processed ({type(exc).__name__})",
                         **state)
    return GpuResult(True, **state)


def _verify_gpu(report_bytes, cert_chain, nonce, now, driver_rim, vbios_rim, require_rims, revocation,
                droot, rroot, state) -> None:
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if isinstance(report_bytes, str):
        try:
            report_bytes = bytes.fromhex(report_bytes)
        except ValueError as exc:
            raise GpuEvidenceError(GpuReason.MALFORMED, "report is not hex") from exc
    report = parse_report(report_bytes)
    state.update(report=report, driver_version=report.driver_version, vbios_version=report.vbios_version)
    chain = load_chain(cert_chain)
    verify_chain(chain, droot, now, bad=GpuReason.CHAIN_INVALID)
    leaf = chain[0]
    arch = _architecture(leaf)
    state["architecture"] = arch
    try:
        key = leaf.public_key()
    except Exception as exc:  # a garbled SubjectPublicKeyInfo
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, f"leaf public key does not parse ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise GpuEvidenceError(GpuReason.CHAIN_INVALID, "leaf key is not ECDSA P-384")
    sig = report.signature
    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    try:
        key.verify(der, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as exc:
        raise GpuEvidenceError(GpuReason.SIGNATURE_INVALID, "report signature does not verify with the leaf key") \
            from exc
    # After the signature: a tampered report says signature_invalid, a genuine but stale one nonce_mismatch.
    if not hmac.compare_digest(report.nonce, nonce):
        raise GpuEvidenceError(GpuReason.NONCE_MISMATCH,
                               f"report answers nonce {report.nonce.hex()}, expected {nonce.hex()} (stale or replayed)")
    if report.fwid is not None:
        if report.fwid not in certificate_fwids(leaf, arch):
            raise GpuEvidenceError(GpuReason.FWID_MISMATCH,
                                   f"report FWID {report.fwid.hex()} is not in the leaf's DICE TcbInfo ({arch} OID)")
        state["fwid_checked"] = True
    if revocation:
        check_revocation(chain, droot, revocation, now)
    if driver_rim is None and vbios_rim is None and not require_rims:
        return
    if driver_rim is None or vbios_rim is None:
        raise GpuEvidenceError(GpuReason.RIM_MISSING, "driver and VBIOS RIMs are both needed to check measurements")
    rims = [r if isinstance(r, Rim) else verify_rim(r, now, rroot) for r in (driver_rim, vbios_rim)]
    if revocation:
        for rim in rims:
            check_revocation(rim.chain, rroot, revocation, now)
    chip = gpu_chip(leaf)
    for rim, want, what in ((rims[0], report.driver_version, "driver"), (rims[1], report.vbios_version, "VBIOS")):
        if rim.version.upper() != (want or "").upper() or rim.product != chip:
            raise GpuEvidenceError(GpuReason.RIM_VERSION_MISMATCH,
                                   f"{what} RIM is for {rim.product} {rim.version}, the report says {chip} {want}")
    bad = compare_measurements(report, rims)
    if bad:
        raise GpuEvidenceError(GpuReason.RIM_MISMATCH, "golden measurements differ from the report", bad)
    state["rims_checked"] = True
    state["revocation_checked"] = bool(revocation)


# --- the document: one report per GPU, RIMs once, revocation data --------------------------------

BUNDLE_FORMAT = "dcml-gpu-v1"
MAX_GPUS = 16
MAX_RIMS = 32


class GpuItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    report: str = Field(max_length=2 * MAX_REPORT_BYTES)  # hex: SPDM request ‖ signed response
    certificate_chain: str = Field(max_length=MAX_CHAIN_BYTES)  # PEM, leaf first
    driver_rim: int = Field(ge=0, lt=MAX_RIMS)  # index into GpuEvidenceBundle.rims
    vbios_rim: int = Field(ge=0, lt=MAX_RIMS)


class GpuEvidenceBundle(BaseModel):
    """`gpu_evidence` of an attestation document: everything a verifier needs offline, RIMs shared by GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dcml-gpu-v1"] = BUNDLE_FORMAT
    gpus: list[GpuItem] = Field(min_length=1, max_length=MAX_GPUS)
    rims: list[str] = Field(max_length=MAX_RIMS)  # RIM XML text
    revocation: dict[str, list[str]] | None = None  # {"ocsp": [base64 DER], "crls": [base64 DER]}


def build_bundle(gpus: Sequence[tuple[bytes, str, str, str]], revocation: Revocation | None = None) -> dict[str, Any]:
    """Staple (report, PEM chain, driver RIM XML, VBIOS RIM XML) per GPU; identical RIMs are stored once."""
    rims: list[str] = []

    def index(xml: str) -> int:
        if xml not in rims:
            rims.append(xml)
        return rims.index(xml)

    items = [GpuItem(report=r.hex(), certificate_chain=c, driver_rim=index(d), vbios_rim=index(v))
             for r, c, d, v in gpus]
    bundle = GpuEvidenceBundle(gpus=items, rims=rims, revocation=revocation.to_json() if revocation else None)
    return bundle.model_dump(exclude_none=True)


def verify_bundle(bundle: dict[str, Any] | GpuEvidenceBundle, *, report_data: bytes, now: datetime,
                  device_root_cert: x509.Certificate | None = None,
                  rim_root_cert: x509.Certificate | None = None) -> list[GpuResult]:
    """Verify every GPU of a stapled bundle against nonce sha256("dcml-gpu-v1" ‖ report_data); each RIM once.

    Raises GpuEvidenceError(MALFORMED) only when the bundle itself does not parse.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    try:
        parsed = bundle if isinstance(bundle, GpuEvidenceBundle) else GpuEvidenceBundle.model_validate(bundle)
    except ValidationError as exc:
        raise GpuEvidenceError(GpuReason.MALFORMED, f"gpu_evidence is not a {BUNDLE_FORMAT} bundle: "
                               f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from exc
    revocation = Revocation.from_json(parsed.revocation)
    rroot = rim_root_cert or rim_root()
    rims: dict[int, Rim | GpuEvidenceError] = {}
    nonce = gpu_nonce(report_data)
    results = []
    for item in parsed.gpus:
        failed = None
        for i in (item.driver_rim, item.vbios_rim):
            if i >= len(parsed.rims):
                failed = GpuEvidenceError(GpuReason.RIM_MISSING, f"RIM {i} is not in the bundle")
                break
            if i not in rims:
                try:
                    rims[i] = verify_rim(parsed.rims[i], now, rroot)
                except GpuEvidenceError as exc:
                    rims[i] = exc
                except Exception as exc:
                    rims[i] = GpuEvidenceError(GpuReason.RIM_MALFORMED, f"RIM could not be processed "
                                               f"({type(exc).__name__})")
            if isinstance(rims[i], GpuEvidenceError):
                failed = rims[i]
                break
        if failed is not None:
            results.append(GpuResult(False, failed.reason, failed.message, failed.indices))
            continue
        results.append(verify_gpu(item.report, item.certificate_chain, nonce=nonce, now=now,
                                  driver_rim=rims[item.driver_rim], vbios_rim=rims[item.vbios_rim],
                                  revocation=revocation, device_root_cert=device_root_cert, rim_root_cert=rroot))
    return results
