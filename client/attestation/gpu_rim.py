"""NVIDIA GPU evidence, part 3: reference integrity manifests (RIMs): hostile-XML-safe parsing, the
XML signature and its chain to the pinned RIM root, and the golden measurements they carry."""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from lxml import etree
from signxml import SignatureConfiguration, SignatureMethod, XMLVerifier
from signxml.algorithms import DigestAlgorithm
from signxml.exceptions import SignXMLException

from dcml.client.attestation.gpu_certs import MAX_CHAIN_CERTS, verify_chain
from dcml.client.attestation.gpu_report import DIGEST_LEN, GpuEvidenceError, GpuReason

MAX_RIM_BYTES = 256 * 1024  # a real RIM is ~20 KiB

SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
RIM_HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"


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


def verify_rim(xml: bytes | str, now: datetime, root: x509.Certificate) -> Rim:
    """Verify a RIM's enveloped XML signature and signing chain to `root`; return what the signature covers.

    `gpu.verify_rim` calls this with the pinned RIM root by default."""
    tree = parse_rim_xml(xml)
    certs = _rim_certs(tree)
    verify_chain(certs, root, now, bad=GpuReason.RIM_CHAIN_INVALID)
    signer = certs[0]
    try:
        result = XMLVerifier().verify(
            tree, x509_cert=signer, expect_config=replace(_RIM_SIG_CONFIG, verification_time=now),
            validate_schema=True, parser=_PARSER,
        )
    except (SignXMLException, InvalidSignature, ValueError, TypeError, etree.LxmlError) as exc:
        raise GpuEvidenceError(GpuReason.RIM_SIGNATURE_INVALID, f"RIM XML signature does not verify ({exc})") from exc
    if isinstance(result, list):  # only with expect_references > 1, which the configuration never asks for
        raise GpuEvidenceError(GpuReason.RIM_SIGNATURE_INVALID, "RIM carries more than one signed reference")
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

