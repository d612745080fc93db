"""Attestation verification: the one verifier used by clients, the key broker and tests.

A document passes only if its quote verifies with DCAP (dcap-qvl) against Intel collateral, the TCB
status and measurements are allowed by the Policy, the debug bit is clear, dstack event logs replay,
and the report_data read from the verified quote body binds the node's keys and the caller's nonce.
Beside it: `policy` (what is accepted), `document` (what a node serves and what verification yields),
`measurements` (quote parsing, RTMR replay), `gpu` (GPU evidence); their names are importable from here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import dcap_qvl
from eth_utils import to_checksum_address

from dcml.client.attestation.document import SIMULATED_MARKER, AttestationDocument, VerifiedNode
from dcml.client.attestation.gpu import GpuEvidenceError, GpuResult, verify_bundle
from dcml.client.attestation.measurements import (
    QuoteFormatError,
    TdxQuote,
    compose_hash_from_events,
    dev_signer,
    expected_mr_config_id,
    parse_tdx_quote,
    quote_tee_type,
    replay_rtmrs,
    verify_simulated_quote,
)
from dcml.client.attestation.policy import (
    ANY,
    DstackPolicy,
    GpuPolicy,
    MeasurementPolicy,
    ModelTrust,
    Policy,
    SimulatedPolicy,
    TcbPolicy,
)
from dcml.client.wire.errors import AttestationReason, DcmlError, ErrorType
from dcml.client.wire.hexutil import from_hex
from dcml.client.wire.identity import HPKE_PUBLIC_KEY_LEN, NONCE_LEN
from dcml.client.wire.identity import report_data as binding_report_data

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")


Reason = AttestationReason  # the shared enum (client.wire.errors), under its historic name here



class AttestationError(DcmlError):
    """A document failed verification. `reason` is machine-readable; the message says what to do.

    For GPU evidence, `gpu_reason` is the verifier's GpuReason (e.g. rim_mismatch) and `gpu_index` the GPU.
    """

    error_type = ErrorType.ATTESTATION
    reason_in_str = True
    reason: AttestationReason

    def __init__(self, reason: Reason, message: str, *, gpu_reason: str | None = None,
                 gpu_index: int | None = None) -> None:
        super().__init__(message, reason=reason)
        self.gpu_reason = gpu_reason
        self.gpu_index = gpu_index


# --- collateral -------------------------------------------------------------------------------

Collateral: TypeAlias = dict[str, Any] | dcap_qvl.QuoteCollateralV3
_collateral_cache: dict[str, dcap_qvl.QuoteCollateralV3] = {}


def _to_collateral(collateral: Collateral) -> dcap_qvl.QuoteCollateralV3:
    if isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        return collateral
    return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(collateral))


def _issued(collateral: dcap_qvl.QuoteCollateralV3) -> str:
    """The TCB info's issue date (ISO 8601 UTC, so it orders as a string)."""
    return str(json.loads(collateral.tcb_info).get("issueDate", ""))


def _fmspc(quote: bytes) -> str:
    try:
        return dcap_qvl.Quote.parse(quote).fmspc()
    except (ValueError, TypeError) as exc:  # a corrupted quote or PCK certificate chain
        raise AttestationError(Reason.QUOTE_MALFORMED, f"cannot read the quote's platform (FMSPC): {exc}") from exc


def cache_collateral(quote: bytes, collateral: Collateral, *, now: int | None = None) -> bool:
    """Remember collateral for the quote's platform (FMSPC) so later verifications can omit it. Only valid
    collateral is kept (it must verify this quote, at `now`), and it replaces what is cached only if it is at
    least as new: an old or bad one can never displace good collateral. Returns whether it was stored;
    raises AttestationError if it does not verify the quote."""
    col = _to_collateral(collateral)
    fmspc = _fmspc(quote)
    try:
        dcap_verify(quote, col, int(time.time()) if now is None else now)
    except ValueError as exc:
        raise AttestationError(Reason.QUOTE_INVALID, f"collateral does not verify this quote ({exc}); not cached") \
            from exc
    cached = _collateral_cache.get(fmspc)
    if cached is not None and _issued(col) < _issued(cached):
        return False
    _collateral_cache[fmspc] = col
    return True


async def fetch_collateral(quote: bytes, pccs_url: str = dcap_qvl.INTEL_PCS_URL) -> dcap_qvl.QuoteCollateralV3:
    """Fetch Intel collateral from a PCS/PCCS and cache it (integrity comes from Intel's signatures)."""
    collateral = await dcap_qvl.get_collateral(pccs_url, quote)
    cache_collateral(quote, collateral)
    return collateral


@dataclass(frozen=True)
class DcapResult:
    status: str
    advisory_ids: tuple[str, ...]
    report: dict[str, Any]


def dcap_verify(quote: bytes, collateral: Collateral, now: int) -> DcapResult:
    """Run dcap-qvl's signature, certificate, CRL and TCB matching. Raises ValueError on failure."""
    verified = dcap_qvl.verify(quote, _to_collateral(collateral), now)
    data = json.loads(verified.to_json())
    return DcapResult(verified.status, tuple(verified.advisory_ids), data.get("report", {}))


# --- verification -----------------------------------------------------------------------------


def _hex(value: str, what: str) -> bytes:
    try:
        return from_hex(value, None, what)
    except ValueError as exc:
        raise AttestationError(Reason.BAD_DOCUMENT, f"{what} is not hex") from exc


def _check_allowed(name: str, value: bytes, allowed: list[str], reason: Reason, where: str) -> None:
    if ANY in allowed or value.hex() in allowed:
        return
    raise AttestationError(
        reason,
        f"{name} {value.hex()} is not in the policy allow-list; if you trust this build, add it to "
        f"{where} in configs/policy.toml",
    )


def verify_attestation(
    doc: AttestationDocument,
    *,
    nonce: bytes,
    policy: Policy,
    collateral: Collateral | None = None,
    now: int | None = None,
    allow_simulated: bool = False,
    expected_report_data: bytes | None = None,
) -> VerifiedNode:
    """Verify `doc` fetched with `nonce`; return the node's attested keys or raise AttestationError.

    `expected_report_data` replaces the key/nonce binding (only for fixed-report-data test vectors).
    `collateral` defaults to what fetch_collateral/cache_collateral stored for the quote's FMSPC.
    Fails closed: whatever goes wrong, including inside the parsers, is an AttestationError with a reason.
    """
    try:
        return _verify_attestation(doc, nonce=nonce, policy=policy, collateral=collateral, now=now,
                                   allow_simulated=allow_simulated, expected_report_data=expected_report_data)
    except AttestationError:
        raise
    except Exception as exc:  # a parser's bare error on hostile input: still a typed refusal, never a crash
        raise AttestationError(Reason.BAD_DOCUMENT, f"the document cannot be verified ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from exc


def _verify_attestation(
    doc: AttestationDocument,
    *,
    nonce: bytes,
    policy: Policy,
    collateral: Collateral | None,
    now: int | None,
    allow_simulated: bool,
    expected_report_data: bytes | None,
) -> VerifiedNode:
    if len(nonce) != NONCE_LEN:
        raise AttestationError(Reason.NONCE_MISMATCH, f"nonce must be {NONCE_LEN} bytes (use os.urandom(32))")
    if not hmac.compare_digest(_hex(doc.nonce, "nonce"), nonce):
        raise AttestationError(
            Reason.NONCE_MISMATCH, "document answers a different nonce (stale or replayed); fetch it again"
        )
    quote = _hex(doc.quote, "quote")
    hpke_public_key = _hex(doc.hpke_public_key, "hpke_public_key")
    if len(hpke_public_key) != HPKE_PUBLIC_KEY_LEN:
        raise AttestationError(Reason.BAD_DOCUMENT, f"hpke_public_key must be {HPKE_PUBLIC_KEY_LEN} bytes")
    try:
        signing_address = to_checksum_address(doc.signing_address)
        expected = (
            expected_report_data
            if expected_report_data is not None
            else binding_report_data(signing_address, hpke_public_key, nonce)
        )
    except ValueError as exc:
        raise AttestationError(Reason.BAD_DOCUMENT, str(exc)) from exc

    advisories: tuple[str, ...] = ()
    if doc.tee_type == "simulated":
        parsed = _verify_simulated(quote, policy, allow_simulated)
        tcb_status = "Simulated"
    else:
        parsed, tcb_status, advisories = _verify_tdx(quote, policy, collateral, now)

    compose_hash = None
    if doc.tee_type == "dstack":
        compose_hash = _verify_dstack(doc, parsed, policy)
    elif doc.tee_type == "tdx":
        m = policy.measurements
        _check_allowed("RTMR3", parsed.body["rt_mr3"], m.rtmr3, Reason.MEASUREMENT_NOT_ALLOWED, "[measurements].rtmr3")

    # The binding is read from the verified quote body, never from the JSON around it.
    if not hmac.compare_digest(parsed.report_data, expected):
        raise AttestationError(
            Reason.REPORT_DATA_MISMATCH,
            "quote report_data does not bind this signing address, HPKE key and nonce; the keys in the "
            "document are not the attested ones: do not use this node",
        )
    gpus = _verify_gpus(doc, parsed.report_data, policy.gpu, now)
    return VerifiedNode(
        signing_address=signing_address,
        hpke_public_key=hpke_public_key,
        tee_type=doc.tee_type,
        tcb_status=tcb_status,
        measurements=parsed.measurements(),
        simulated=doc.tee_type == "simulated",
        advisory_ids=advisories,
        compose_hash=compose_hash,
        gpu_evidence_verified=bool(gpus),
        gpus=gpus,
    )


def _verify_gpus(doc: AttestationDocument, report_data: bytes, policy: GpuPolicy,
                 now: int | None) -> tuple[GpuResult, ...]:
    """Stapled GPU evidence must bind the verified report_data and pass; the policy may require it."""
    if doc.gpu_evidence is None:
        if policy.required:
            raise AttestationError(Reason.GPU_EVIDENCE_MISSING, "the policy requires GPU evidence and the document "
                                   "has none: this node has no attested GPU (or its tee.gpu is off)")
        return ()
    when = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)
    try:
        results = verify_bundle(doc.gpu_evidence, report_data=report_data, now=when)
    except GpuEvidenceError as exc:
        raise AttestationError(Reason.GPU_EVIDENCE, exc.message, gpu_reason=exc.reason.value) from exc
    for i, r in enumerate(results):
        if not r.ok:
            raise AttestationError(Reason.GPU_EVIDENCE, f"GPU {i}: {r.describe()}", gpu_reason=str(r.reason),
                                   gpu_index=i)
        problem = None
        if r.architecture not in policy.allowed_architectures and ANY not in policy.allowed_architectures:
            problem = f"architecture {r.architecture} is not in policy gpu.allowed_architectures"
        elif policy.driver_too_old(r.driver_version):
            problem = (f"driver {r.driver_version} is older than policy gpu.min_driver_version "
                       f"{policy.min_driver_version}")
        elif ANY not in policy.allowed_vbios_versions and (r.vbios_version or "") not in policy.allowed_vbios_versions:
            problem = (f"VBIOS {r.vbios_version} is not in policy gpu.allowed_vbios_versions; if you trust it, add "
                       "it in configs/policy.toml")
        elif policy.revocation_required and not r.revocation_checked:
            problem = "no revocation data was stapled and policy gpu.revocation_required is set"
        if problem:
            raise AttestationError(Reason.GPU_NOT_ALLOWED, f"GPU {i}: {problem}", gpu_index=i)
    return tuple(results)


def _verify_simulated(quote: bytes, policy: Policy, allow_simulated: bool) -> TdxQuote:
    if not (allow_simulated or policy.allow_simulated):
        raise AttestationError(
            Reason.SIMULATED_REFUSED,
            f"{SIMULATED_MARKER}: this node runs no TEE; only accept it for local development "
            "(allow_simulated=True or allow_simulated = true in the policy)",
        )
    signers = [bytes.fromhex(s) for s in policy.simulated.signers] or [
        dev_signer().public_key().public_bytes_raw()
    ]
    try:
        return verify_simulated_quote(quote, signers)
    except ValueError as exc:
        raise AttestationError(Reason.SIMULATED_INVALID, str(exc)) from exc


def _verify_tdx(
    quote: bytes, policy: Policy, collateral: Collateral | None, now: int | None
) -> tuple[TdxQuote, str, tuple[str, ...]]:
    try:
        version, tee_type = quote_tee_type(quote)
        if tee_type != 0x81 or version not in (4, 5):
            raise AttestationError(
                Reason.NOT_TDX, f"quote v{version} tee_type {tee_type:#x} is not a TDX quote (SGX refused)"
            )
        parsed = parse_tdx_quote(quote)
    except QuoteFormatError as exc:
        raise AttestationError(Reason.QUOTE_MALFORMED, str(exc)) from exc
    if parsed.qe_vendor_id != INTEL_QE_VENDOR_ID:  # dcap-qvl#127: not every version checked it
        raise AttestationError(Reason.QUOTE_INVALID, f"QE vendor {parsed.qe_vendor_id.hex()} is not Intel's")

    if collateral is None:
        fmspc = _fmspc(quote)
        collateral = _collateral_cache.get(fmspc)
        if collateral is None:
            raise AttestationError(
                Reason.COLLATERAL_MISSING,
                f"no Intel collateral for FMSPC {fmspc}: await fetch_collateral(quote) or pass collateral=",
            )
    try:
        result = dcap_verify(quote, collateral, int(time.time()) if now is None else now)
    except ValueError as exc:
        # The cached collateral stays: one bad quote (anyone's) must not disable the platform's honest nodes.
        # Expired collateral is replaced by fetching newer (fetch_collateral / cache_collateral).
        raise AttestationError(
            Reason.QUOTE_INVALID, f"DCAP verification failed ({exc}); if collateral expired, fetch it again"
        ) from exc
    # Belt and braces: what we parse must be what dcap-qvl verified.
    verified_body: dict[str, Any] = next(iter(result.report.values()), {}) if result.report else {}
    if verified_body.get("report_data", parsed.report_data.hex()) != parsed.report_data.hex():
        raise AttestationError(Reason.QUOTE_MALFORMED, "parsed report_data differs from dcap-qvl's verified body")

    # dcap-qvl reports OutOfDate/ConfigurationNeeded without failing: gate it here.
    if result.status not in policy.tcb.allowed_statuses:
        raise AttestationError(
            Reason.TCB_STATUS,
            f"TCB status {result.status} is not allowed (policy allows {policy.tcb.allowed_statuses}); "
            "the platform needs a firmware/microcode update",
        )
    bad = sorted(set(result.advisory_ids) & set(policy.tcb.rejected_advisories))
    if bad:
        raise AttestationError(Reason.ADVISORY, f"platform is affected by rejected advisories {bad}")
    if parsed.debug:
        raise AttestationError(Reason.DEBUG_ENABLED, "TD debug attribute is set: the host can read its memory")
    m = policy.measurements
    where = "[measurements]."
    _check_allowed("MRTD", parsed.body["mr_td"], m.mrtd, Reason.MEASUREMENT_NOT_ALLOWED, where + "mrtd")
    for i, allowed in enumerate((m.rtmr0, m.rtmr1, m.rtmr2)):
        _check_allowed(
            f"RTMR{i}", parsed.body[f"rt_mr{i}"], allowed, Reason.MEASUREMENT_NOT_ALLOWED, f"{where}rtmr{i}"
        )
    return parsed, result.status, result.advisory_ids


def _verify_dstack(doc: AttestationDocument, parsed: TdxQuote, policy: Policy) -> str:
    if not doc.event_log:
        raise AttestationError(Reason.EVENT_LOG_INVALID, "dstack document has no event log to replay")
    try:
        replayed = replay_rtmrs(doc.event_log)
        compose_hash = compose_hash_from_events(doc.event_log)
    except ValueError as exc:
        raise AttestationError(Reason.EVENT_LOG_INVALID, f"{exc}; the event log was altered") from exc
    for i, (got, want) in enumerate(zip(replayed, parsed.rtmrs, strict=True)):
        if got != want:
            raise AttestationError(
                Reason.EVENT_LOG_MISMATCH, f"replayed RTMR{i} differs from the quote: the event log was altered"
            )
    if parsed.body["mr_config_id"] != expected_mr_config_id(compose_hash):
        raise AttestationError(
            Reason.COMPOSE_HASH_MISMATCH, "mr_config_id is not 0x01||compose_hash (needs dstack >= 0.5.1)"
        )
    if doc.app_info is not None:
        app_compose = (doc.app_info.get("tcb_info") or {}).get("app_compose")
        stated = str(doc.app_info.get("compose_hash", "")).lower()
        if app_compose is None or hashlib.sha256(app_compose.encode()).digest() != compose_hash:
            raise AttestationError(
                Reason.COMPOSE_HASH_MISMATCH, "sha256(app_info.tcb_info.app_compose) is not the measured hash"
            )
        if stated != compose_hash.hex():
            raise AttestationError(Reason.COMPOSE_HASH_MISMATCH, "app_info.compose_hash is not the measured hash")
    _check_allowed(
        "compose hash", compose_hash, policy.dstack.compose_hashes, Reason.COMPOSE_HASH_NOT_ALLOWED,
        "[dstack].compose_hashes",
    )
    return compose_hash.hex()


__all__ = [  # callers import the verifier's names from here, wherever they are defined
    "ANY", "INTEL_QE_VENDOR_ID", "SIMULATED_MARKER", "AttestationDocument", "AttestationError", "Collateral",
    "DcapResult", "DstackPolicy", "GpuPolicy", "MeasurementPolicy", "ModelTrust", "Policy", "Reason",
    "SimulatedPolicy", "TcbPolicy", "VerifiedNode", "cache_collateral", "dcap_verify", "fetch_collateral",
    "verify_attestation",
]
