"""A stand-in for NVIDIA GPUs in CC mode: real SPDM reports signed by per-GPU P-384 device keys, certificate
chains with a DICE TcbInfo FWID, and RIMs signed as enveloped XML signatures (signxml), all under test roots
that tests pin in place of NVIDIA's. It replaces only the hardware (NVML); every check runs for real.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml import CanonicalizationMethod, SignatureMethod, XMLSigner, methods
from signxml.algorithms import DigestAlgorithm

from dcml.client.attestation.gpu import RIM_HASH_NS, SWID_NS
from dcml.node.tee.gpu import GpuReport

DRIVER = "550.54.15"
VBIOS = bytes([0x00, 0x9F, 0x00, 0x96, 0x01])  # reads 96.00.9F.00.01
VBIOS_TEXT = "96.00.9F.00.01"
DRIVER_INDICES = (7, *range(21, 36))  # RIM indices the driver RIM pins (35 = NVDEC0, disabled below)
VBIOS_INDICES = (1, 2, 3, 9, 10, 11)
TCB_INFO_HOPPER = x509.ObjectIdentifier("2.23.133.5.4.1")
SHA384_OID = bytes.fromhex("0609608648016503040202")


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(ln)]) + ln + body


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, days: int = 3650, ext=()) -> x509.Certificate:
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    for e in ext:
        b = b.add_extension(e, critical=False)
    return b.sign(issuer_key, hashes.SHA384())


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _opaque(kind: int, value: bytes) -> bytes:
    return kind.to_bytes(2, "little") + len(value).to_bytes(2, "little") + value


@dataclass
class FakeGpu:
    key: ec.EllipticCurvePrivateKey
    chain: str
    fwid: bytes


@dataclass
class FakeGpuMachine:
    """`n` Hopper GPUs sharing one driver and VBIOS; `collect` is what NVML would return."""

    n: int = 1
    driver: str = DRIVER
    device_root_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    rim_root_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))
    measurements: dict[int, bytes] = field(default_factory=lambda: {i: os.urandom(48) for i in range(1, 65)})

    def __post_init__(self) -> None:
        self.device_root = _cert("Test Device Identity CA", self.device_root_key, "Test Device Identity CA",
                                 self.device_root_key, ca=True)
        self.rim_root = _cert("Test RIM Root CA", self.rim_root_key, "Test RIM Root CA", self.rim_root_key, ca=True)
        self.rim_signer_key = ec.generate_private_key(ec.SECP384R1())
        self.rim_signer = _cert("Test RIM Signer", self.rim_signer_key, "Test RIM Root CA", self.rim_root_key,
                                ca=False)
        self.gpus = [self._gpu() for _ in range(self.n)]

    def _gpu(self) -> FakeGpu:
        key = ec.generate_private_key(ec.SECP384R1())
        fwid = os.urandom(48)
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        tcb = _der(0x30, _der(0x02, b"\x01") + spki + _der(0x30, SHA384_OID + _der(0x04, fwid)))
        leaf = _cert("GH100 A01 GSP FMC LF", key, "Test Device Identity CA", self.device_root_key, ca=False,
                     ext=[x509.UnrecognizedExtension(TCB_INFO_HOPPER, tcb)])
        return FakeGpu(key, _pem(leaf, self.device_root), fwid)

    def report(self, gpu: FakeGpu, nonce: bytes, measurements: dict[int, bytes] | None = None) -> bytes:
        m = measurements or self.measurements
        request = bytes([0x11, 0xE0, 0x01, 0xFF]) + nonce + b"\x00"
        blocks = b"".join(bytes([i, 1]) + (51).to_bytes(2, "little") + b"\x01" + (48).to_bytes(2, "little") + m[i]
                          for i in range(1, 65))
        opaque = b"".join([
            _opaque(3, self.driver.encode() + b"\0"), _opaque(6, VBIOS + b"\0\0\0"), _opaque(11, b"\x55"),
            _opaque(15, b"882\0"), _opaque(17, b"1010\0"), _opaque(18, b"0200\0"), _opaque(20, gpu.fwid),
        ])
        response = (bytes([0x11, 0x60, 0, 0, 64]) + len(blocks).to_bytes(3, "little") + blocks + os.urandom(32)
                    + len(opaque).to_bytes(2, "little") + opaque)
        r, s = decode_dss_signature(gpu.key.sign(request + response, ec.ECDSA(hashes.SHA384())))
        return request + response + r.to_bytes(48, "big") + s.to_bytes(48, "big")

    def collect(self, nonce: bytes) -> list[GpuReport]:
        return [GpuReport(self.report(g, nonce), g.chain) for g in self.gpus]

    def rim(self, version: str, indices: tuple[int, ...], golden: dict[int, bytes] | None = None) -> str:
        """A signed RIM pinning `indices` (RIM index i = SPDM block i + 1) to this machine's measurements."""
        root = etree.Element(f"{{{SWID_NS}}}SoftwareIdentity", nsmap={None: SWID_NS, "ns2": RIM_HASH_NS},
                             name="GH100", tagId=os.urandom(8).hex(), version="1.0")
        etree.SubElement(root, f"{{{SWID_NS}}}Meta", colloquialVersion=version, product="GH100")
        payload = etree.SubElement(root, f"{{{SWID_NS}}}Payload")
        for i in range(64):
            value = (golden or {}).get(i, self.measurements[i + 1])
            etree.SubElement(payload, f"{{{SWID_NS}}}Resource", {
                "type": "Measurement", "index": str(i), "active": "True" if i in indices else "False",
                "alternatives": "1", f"{{{RIM_HASH_NS}}}Hash0": value.hex() if i in indices else "00" * 48,
                "name": f"Measurement_{i}", "size": "48"})
        signer = XMLSigner(method=methods.enveloped, signature_algorithm=SignatureMethod.ECDSA_SHA384,
                           digest_algorithm=DigestAlgorithm.SHA384,
                           c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1)
        key = self.rim_signer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())
        signed = signer.sign(root, key=key, cert=[_pem(self.rim_signer), _pem(self.rim_root)])
        return etree.tostring(signed).decode()

    def driver_rim(self) -> str:
        return self.rim(self.driver, DRIVER_INDICES)

    def vbios_rim(self, golden: dict[int, bytes] | None = None) -> str:
        return self.rim(VBIOS_TEXT, VBIOS_INDICES, golden)
