"""Quote formats: the TDX quote body parser (v4 and v5), dstack event-log replay, and the simulated quote.

Pure parsing and hashing; trust decisions live in client/attestation/verify.py.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict

from dcml.client.wire.errors import AttestationReason, DcmlError, ErrorType

HEADER_LEN = 48
TEE_TYPE_SGX = 0x00
TEE_TYPE_TDX = 0x81
TD10_LEN = 584
TD15_LEN = 648
SGX_REPORT_LEN = 384
# v5 body descriptor types
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3

# TD1.0 body offsets (Intel TDX DCAP quote library; dcap-qvl src/quote.rs)
_TD10_FIELDS = {
    "tee_tcb_svn": (0, 16),
    "mr_seam": (16, 48),
    "mr_signer_seam": (64, 48),
    "seam_attributes": (112, 8),
    "td_attributes": (120, 8),
    "xfam": (128, 8),
    "mr_td": (136, 48),
    "mr_config_id": (184, 48),
    "mr_owner": (232, 48),
    "mr_owner_config": (280, 48),
    "rt_mr0": (328, 48),
    "rt_mr1": (376, 48),
    "rt_mr2": (424, 48),
    "rt_mr3": (472, 48),
    "report_data": (520, 64),
}
TD_ATTRIBUTES_DEBUG = 0x01  # bit 0 of TDATTRIBUTES: the TD is debuggable (host can read its memory)


class QuoteFormatError(DcmlError, ValueError):
    """The bytes are not a quote this parser understands."""

    reason = AttestationReason.QUOTE_MALFORMED
    error_type = ErrorType.ATTESTATION


class Measurements(BaseModel):
    """TD measurements as lowercase hex, for documents, policies and logs."""

    model_config = ConfigDict(frozen=True)

    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    rtmr3: str
    mr_config_id: str
    mr_owner: str
    mr_owner_config: str
    mr_seam: str
    td_attributes: str
    xfam: str
    tee_tcb_svn: str


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote: header fields, the TD report body, and the trailing signature data."""

    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    body_type: int  # BODY_TD10 or BODY_TD15
    body: dict[str, bytes]
    signed_bytes: bytes  # header || (descriptor) || body: what the attestation key signs
    signature_data: bytes

    @property
    def report_data(self) -> bytes:
        return self.body["report_data"]

    @property
    def rtmrs(self) -> list[bytes]:
        return [self.body[f"rt_mr{i}"] for i in range(4)]

    @property
    def debug(self) -> bool:
        return bool(self.body["td_attributes"][0] & TD_ATTRIBUTES_DEBUG)

    def measurements(self) -> Measurements:
        b = self.body
        return Measurements(
            mrtd=b["mr_td"].hex(),
            rtmr0=b["rt_mr0"].hex(),
            rtmr1=b["rt_mr1"].hex(),
            rtmr2=b["rt_mr2"].hex(),
            rtmr3=b["rt_mr3"].hex(),
            mr_config_id=b["mr_config_id"].hex(),
            mr_owner=b["mr_owner"].hex(),
            mr_owner_config=b["mr_owner_config"].hex(),
            mr_seam=b["mr_seam"].hex(),
            td_attributes=b["td_attributes"].hex(),
            xfam=b["xfam"].hex(),
            tee_tcb_svn=b["tee_tcb_svn"].hex(),
        )


def quote_tee_type(quote: bytes) -> tuple[int, int]:
    """(version, tee_type) from the header, without parsing the body."""
    if len(quote) < HEADER_LEN:
        raise QuoteFormatError(f"quote is {len(quote)} bytes, shorter than its 48-byte header")
    version, _key_type, tee_type = struct.unpack_from("<HHI", quote, 0)
    return version, tee_type


def parse_tdx_quote(quote: bytes) -> TdxQuote:
    """Parse a TDX quote v4 (TD1.0 body) or v5 (TD1.0 or TD1.5 body). Refuses SGX quotes."""
    version, tee_type = quote_tee_type(quote)
    att_key_type = struct.unpack_from("<H", quote, 2)[0]
    if tee_type != TEE_TYPE_TDX:
        raise QuoteFormatError(f"quote tee_type is {tee_type:#x}, not TDX (0x81): an SGX quote is not a TD")
    if version == 4:
        body_type, offset, size = BODY_TD10, HEADER_LEN, TD10_LEN
    elif version == 5:
        if len(quote) < HEADER_LEN + 6:
            raise QuoteFormatError("v5 quote is truncated before its body descriptor")
        body_type, size = struct.unpack_from("<HI", quote, HEADER_LEN)
        offset = HEADER_LEN + 6
        expected = {BODY_TD10: TD10_LEN, BODY_TD15: TD15_LEN}.get(body_type)
        if expected is None or size != expected:
            raise QuoteFormatError(f"v5 body type {body_type} of {size} bytes is not a TD1.0/TD1.5 report")
    else:
        raise QuoteFormatError(f"quote version {version} is not a TDX quote (expected 4 or 5)")
    end = offset + size
    if len(quote) < end + 4:
        raise QuoteFormatError(f"quote is {len(quote)} bytes, truncated inside its {size}-byte body")
    raw = quote[offset:end]
    body = {name: raw[o : o + n] for name, (o, n) in _TD10_FIELDS.items()}
    if body_type == BODY_TD15:
        body["tee_tcb_svn2"] = raw[584:600]
        body["mr_service_td"] = raw[600:648]
    sig_len = struct.unpack_from("<I", quote, end)[0]
    signature_data = quote[end + 4 : end + 4 + sig_len]
    if len(signature_data) != sig_len:
        raise QuoteFormatError("quote signature data is truncated")
    return TdxQuote(
        version=version,
        att_key_type=att_key_type,
        tee_type=tee_type,
        qe_vendor_id=quote[12:28],
        body_type=body_type,
        body=body,
        signed_bytes=quote[:end],
        signature_data=signature_data,
    )


# --- dstack event log -------------------------------------------------------------------------

DSTACK_EVENT_TYPE = 0x08000001
_ZERO_RTMR = bytes(48)


class EventLogEntry(BaseModel):
    """One measured event as dstack reports it (hex digest and payload)."""

    imr: int
    event_type: int
    digest: str = ""  # some dstack guest agents leave RTMR3 digests out: they are recomputed from the payload
    event: str = ""
    event_payload: str = ""

    def payload_bytes(self) -> bytes:
        return bytes.fromhex(self.event_payload)


def runtime_event_digest(event_type: int, event: str, payload: bytes) -> bytes:
    """dstack's RTMR3 event digest (V1): SHA384(le32(event_type) || ":" || event || ":" || payload)."""
    return hashlib.sha384(struct.pack("<I", event_type) + b":" + event.encode() + b":" + payload).digest()


def replay_rtmrs(events: list[EventLogEntry]) -> list[bytes]:
    """Replay RTMR0-3 from an event log. RTMR3 digests are recomputed from payloads, never trusted.

    An RTMR3 event without a digest is replayed from its payload (the digest is derived data anyway).
    Raises ValueError when an RTMR3 event's stated digest disagrees with its payload, or an imr is
    out of range. RTMR0-2 digests are taken as given: their payloads are firmware structures this
    verifier does not interpret; the replayed values are still pinned by the quote and the allow-list.
    """
    rtmrs = [_ZERO_RTMR] * 4
    for i, ev in enumerate(events):
        if ev.imr not in range(4):
            raise ValueError(f"event {i} extends imr {ev.imr}; only RTMR0-3 exist")
        if ev.imr == 3:
            digest = runtime_event_digest(ev.event_type, ev.event, ev.payload_bytes())
            if ev.digest and digest.hex() != ev.digest.lower().removeprefix("0x"):
                raise ValueError(f"RTMR3 event {i} ({ev.event!r}): digest does not match its payload")
        else:
            digest = bytes.fromhex(ev.digest)
            if len(digest) != 48:
                raise ValueError(f"event {i}: digest is {len(digest)} bytes, expected 48 (SHA-384)")
        rtmrs[ev.imr] = hashlib.sha384(rtmrs[ev.imr] + digest).digest()
    return rtmrs


def compose_hash_from_events(events: list[EventLogEntry]) -> bytes:
    """The payload of the single RTMR3 `compose-hash` event (dstack's app identity)."""
    found = [ev for ev in events if ev.imr == 3 and ev.event == "compose-hash"]
    if len(found) != 1:
        raise ValueError(f"event log has {len(found)} compose-hash events in RTMR3, expected exactly one")
    payload = found[0].payload_bytes()
    if len(payload) != 32:
        raise ValueError(f"compose-hash payload is {len(payload)} bytes, expected 32 (sha256)")
    return payload


def expected_mr_config_id(compose_hash: bytes) -> bytes:
    """dstack >= 0.5.1 sets MRCONFIGID = 0x01 || compose_hash, zero-padded to 48 bytes."""
    return (b"\x01" + compose_hash).ljust(48, b"\x00")


# --- simulated quote (development only) --------------------------------------------------------
# Laid out like a TDX v4 quote so the same parser reads it, but the QE vendor id marks it, and the
# "signature data" is an Ed25519 signature by a development key over header||body, then that key.

SIMULATED_QE_VENDOR_ID = b"DCML-SIMULATED\x00\x00"
_DEV_SIGNER_SEED = hashlib.sha256(b"dcml-simulated-tee-dev-key-v1").digest()


def dev_signer() -> Ed25519PrivateKey:
    """The well-known development signer. Public on purpose: a simulated quote proves nothing."""
    return Ed25519PrivateKey.from_private_bytes(_DEV_SIGNER_SEED)


def build_simulated_quote(report_data: bytes, signer: Ed25519PrivateKey) -> bytes:
    if len(report_data) != 64:
        raise ValueError(f"report_data is {len(report_data)} bytes, expected 64")
    header = struct.pack("<HHIHH", 4, 2, TEE_TYPE_TDX, 0, 0) + SIMULATED_QE_VENDOR_ID + bytes(20)
    body = bytearray(TD10_LEN)
    body[520:584] = report_data
    signed = header + bytes(body)
    pub = signer.public_key().public_bytes_raw()
    sig = signer.sign(signed)
    return signed + struct.pack("<I", len(sig) + len(pub)) + sig + pub


def verify_simulated_quote(quote: bytes, trusted_signers: list[bytes]) -> TdxQuote:
    """Parse a simulated quote and check its Ed25519 signature by one of `trusted_signers` (raw keys)."""
    parsed = parse_tdx_quote(quote)
    if parsed.qe_vendor_id != SIMULATED_QE_VENDOR_ID or len(parsed.signature_data) != 96:
        raise QuoteFormatError("not a simulated quote (wrong vendor marker or signature layout)")
    sig, pub = parsed.signature_data[:64], parsed.signature_data[64:]
    if pub not in trusted_signers:
        raise ValueError(f"simulated quote signed by untrusted development key {pub.hex()}")
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, parsed.signed_bytes)
    except InvalidSignature as exc:
        raise ValueError("simulated quote signature is invalid (body altered or wrong key)") from exc
    return parsed
