"""The attestation policy: what a verifier accepts (TCB statuses, measurement allow-lists, dstack compose
hashes, simulated signers, GPU requirements, model royalty trust), loaded from configs/policy.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ANY = "*"  # explicit wildcard in a policy allow-list (never the default)


def _hex_list(values: list[str]) -> list[str]:
    out = []
    for v in values:
        v = v.strip().lower().removeprefix("0x")
        if v != ANY:
            bytes.fromhex(v)  # reject typos at load time, not at verification time
        out.append(v)
    return out


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TcbPolicy(_Section):
    allowed_statuses: list[str] = ["UpToDate"]
    rejected_advisories: list[str] = []


class MeasurementPolicy(_Section):
    """Allow-lists of hex values. Empty refuses every real quote; ["*"] accepts any value (unsafe)."""

    mrtd: list[str] = []
    rtmr0: list[str] = []
    rtmr1: list[str] = []
    rtmr2: list[str] = []
    rtmr3: list[str] = []  # plain TDX only: a dstack RTMR3 is replayed from its event log instead

    _norm = field_validator("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")(_hex_list)


class DstackPolicy(_Section):
    compose_hashes: list[str] = []

    _norm = field_validator("compose_hashes")(_hex_list)


class SimulatedPolicy(_Section):
    signers: list[str] = []  # raw Ed25519 public keys; empty = the well-known development key

    _norm = field_validator("signers")(_hex_list)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")) if v else ()


def _driver_older(version: str | None, minimum: str) -> bool:
    try:
        return _version_tuple(version or "") < _version_tuple(minimum)
    except ValueError:
        return True  # a driver version that is not dotted numbers cannot be shown to meet a minimum


class GpuPolicy(_Section):
    """NVIDIA GPU evidence (verified offline, see client/attestation/gpu.py): what a verifier requires of it."""

    required: bool = False  # refuse documents without GPU evidence
    allowed_architectures: list[str] = ["hopper", "blackwell"]
    min_driver_version: str = ""  # e.g. "550.54.15"; empty = any driver NVIDIA signed a RIM for
    allowed_vbios_versions: list[str] = []  # e.g. ["96.00.5E.00.01"]; empty refuses any GPU, "*" accepts any
    revocation_required: bool = False  # refuse evidence stapled without OCSP/CRL data for both chains

    @field_validator("min_driver_version")
    @classmethod
    def _driver(cls, v: str) -> str:
        _version_tuple(v)  # a typo fails at load time
        return v

    @field_validator("allowed_vbios_versions")
    @classmethod
    def _vbios(cls, v: list[str]) -> list[str]:
        return [x.upper() for x in v]

    def driver_too_old(self, version: str | None) -> bool:
        return _driver_older(version, self.min_driver_version)


class ModelTrust(_Section):
    """Who may take a royalty on a model (`[models."<served name>"]`): the ModelRegistry is first come, first
    served, so a squatter can register a model id before its real publisher; a client pays only channels whose
    registry terms match what it names here."""

    publisher: str | None = None  # the publisher's address; None: any, as long as the royalty is within bounds
    max_royalty_bps: int = Field(0, ge=0, le=10_000)


class Policy(_Section):
    """What a verifier accepts; load it from configs/policy.toml."""

    allow_simulated: bool = False
    tcb: TcbPolicy = TcbPolicy()
    measurements: MeasurementPolicy = MeasurementPolicy()
    dstack: DstackPolicy = DstackPolicy()
    simulated: SimulatedPolicy = SimulatedPolicy()
    gpu: GpuPolicy = GpuPolicy()
    # By served model name. A model not named here is paid only without a royalty (registry bps 0).
    models: dict[str, ModelTrust] = {}

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        with open(path, "rb") as f:
            return cls.from_toml(f.read().decode())

    @classmethod
    def from_toml(cls, text: str) -> Policy:
        try:
            return cls.model_validate(tomllib.loads(text))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ValueError(f"invalid attestation policy: {exc}") from exc
