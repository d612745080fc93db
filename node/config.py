"""Typed node configuration: a TOML file, overridden by `DCML_NODE__SECTION__KEY` environment variables.

Example: ``DCML_NODE__ENGINE__KIND=synthetic DCML_NODE__SERVER__PORT=9000 dcml-node run --config configs/node.toml``.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from dcml.client.chain.deployment import Deployment
from dcml.client.wire.errors import DcmlError
from dcml.client.wire.receipts import ReceiptDomain

_toml_path: ContextVar[Path | None] = ContextVar("dcml_node_toml_path", default=None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in the TOML is an error, not a silent default


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Seconds uvicorn waits for in-flight streams to finish after SIGTERM before cutting them.
    graceful_shutdown_s: float = Field(30.0, ge=0)
    # Slow and junk clients (node.api.guard): a connection must finish its request headers, and then its body,
    # within these deadlines or it is closed; one source address holds at most max_connections_per_source
    # connections; past max_concurrency connections or requests in all, new requests get 503.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    max_header_bytes: int = Field(65536, gt=0)  # request line + headers; more gets 431
    keep_alive_s: float = Field(5.0, gt=0)
    max_connections_per_source: int = Field(512, gt=0)  # behind a reverse proxy every client is one source: raise it
    max_concurrency: int = Field(4096, gt=0)


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"


class GpuTeeConfig(_Section):
    """NVIDIA GPU evidence (NVML) stapled to every quote; clients verify it offline (client/attestation/gpu.py)."""

    enabled: bool = False
    rim_dir: Path = Path("rims")  # driver and VBIOS RIMs (*.swidtag, *.xml) fetched ahead of time
    revocation_dir: Path | None = None  # optional OCSP responses (*.ocsp) and CRLs (*.crl), DER
    devices: list[int] = Field(default_factory=list)  # NVML indices; empty = every GPU


class TeeConfig(_Section):
    provider: Literal["simulated", "tdx", "dstack"] = "simulated"
    # Provider-specific options, passed as keyword arguments to the provider's constructor
    # (e.g. tdx: {configfs_path = "/sys/kernel/config/tsm/report"}, dstack: {socket = "/var/run/dstack.sock"}).
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    gpu: GpuTeeConfig = Field(default_factory=GpuTeeConfig)


class EncryptedModelConfig(_Section):
    """An encrypted bundle whose key a publisher's broker releases only to attested nodes."""

    bundle_dir: Path
    broker_url: str
    # openai/vLLM only: decrypt here (must be tmpfs/ramfs, never disk), then `vllm serve <tmpfs_dir>`.
    tmpfs_dir: Path | None = None
    # The expected manifest signer and release; default (payments on): ModelRegistry.terms / listing.
    publisher: str | None = None
    manifest_hash: str | None = None


class VLLMConfig(_Section):
    """kind = "openai" with a vLLM the node starts and stops itself (a CPU box, the demo): it serves model_dir, or
    the encrypted model's tmpfs_dir (whose clear weights are deleted once vLLM has loaded them), on loopback at
    base_url's port. In a GPU CVM vLLM runs beside the node instead (docker/) and this section is left out."""

    python: Path = Path(".venv-vllm/bin/python")  # `make vllm-venv` builds it
    max_model_len: int = Field(512, gt=0)
    dtype: str = "float32"
    args: list[str] = Field(default_factory=list)  # more `vllm serve` options
    ready_timeout_s: float = Field(600.0, gt=0)
    log_file: Path | None = None


class EngineConfig(_Section):
    kind: Literal["embedded", "openai", "synthetic"] = "embedded"
    served_model_name: str = "dcml-demo"
    model_dir: Path | None = Path("models/demo")  # embedded
    base_url: str | None = None  # openai upstream, e.g. "http://127.0.0.1:8001" (a trailing /v1 is dropped)
    api_key: SecretStr | None = None  # openai upstream (never printed by show-config)
    # Extra keyword arguments for the engine's constructor (e.g. synthetic: {tokens_per_second = 200}).
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Weights from an encrypted bundle instead of model_dir (embedded: decrypted in memory only).
    encrypted: EncryptedModelConfig | None = None
    vllm: VLLMConfig | None = None  # openai: start this vLLM (see VLLMConfig)


class LimitsConfig(_Section):
    max_prompt_tokens: int = Field(4096, gt=0)
    max_tokens_cap: int = Field(1024, gt=0)  # the largest max_tokens a request may ask for
    default_max_tokens: int = Field(256, gt=0)  # when the request names none (capped by the context left)
    max_body_bytes: int = Field(1_048_576, gt=0)
    body_read_timeout_s: float = Field(10.0, gt=0)  # the whole request body must arrive within this (408)


class ReceiptsConfig(_Section):
    # EIP-712 domain of receipts/acceptances (`resolve_receipt_domain`). Unset (the default): the deployment's
    # SLA court when payments or the registry are on and the deployment names one, else chain 31337 and the
    # zero address. Set verifying_contract (with chain_id) only to sign for another court.
    chain_id: int | None = Field(None, gt=0)
    verifying_contract: str | None = None
    # modelId in receipts; empty means keccak256(served_model_name).
    model_id: str = ""

    @field_validator("verifying_contract")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not (v.startswith("0x") and len(v) == 42):
            raise ValueError("verifying_contract must be a 0x-prefixed 20-byte address")
        bytes.fromhex(v[2:])
        return v

    @model_validator(mode="after")
    def _chain_with_contract(self) -> ReceiptsConfig:
        if self.verifying_contract is not None and self.chain_id is None:
            raise ValueError("[receipts] verifying_contract is set: set chain_id too (the chain the contract is on)")
        return self


class ModelPrice(_Section):
    """Prices in the channel token's smallest unit (wei) per token, and who may take a royalty on them: the
    ModelRegistry is first come, first served, so the node admits only channels whose snapshotted publisher is
    `publisher` (when set) with at most `max_royalty_bps`. Unset: channels with no royalty only."""

    price_per_input_token: int = Field(ge=0)
    price_per_output_token: int = Field(gt=0)
    publisher: str | None = None
    max_royalty_bps: int | None = Field(None, ge=0, le=10_000)  # None: 10_000 with a publisher, else 0


class PaymentsConfig(_Section):
    """Paid inference through payment channels (x402 `channel` scheme). Off: every request is free."""

    enabled: bool = False
    # Chain id, RPC and contract addresses (written by the devnet); also used by [registry] and [p2p].
    deployment: Path = Path(".devnet/deployment.json")
    rpc_url: str | None = None  # overrides the deployment file's RPC
    token: str | None = None  # the channel token clients must use; default: the deployment's token
    prices: dict[str, ModelPrice] = Field(default_factory=dict)  # by served model name
    prepay_tokens: int = Field(64, ge=0)  # output tokens a client pays ahead (its exposure)
    credit_tokens: int = Field(16, ge=0)  # output tokens served beyond what is paid (the node's exposure)
    voucher_timeout_s: float = Field(30.0, gt=0)  # a paused stream ends if no voucher comes in this time
    response_deadline_s: int = Field(300, gt=0)  # the deadline an acceptance promises
    settle_threshold: int = Field(10**18, gt=0)  # settle a channel once this much is unsettled
    settle_interval_s: float = Field(5.0, gt=0)
    close_margin_s: int = Field(60, ge=0)  # refuse vouchers this close to a requested close's deadline
    # Sybil resistance (issue 19): channels holding less than min_deposit are refused; a settle or close worth
    # less than min_settle_value (about its gas, in the token) is never sent: dust is left to the payer's withdraw.
    min_deposit: int = Field(0, ge=0)
    min_settle_value: int = Field(0, ge=0)
    # A channel is trusted (vouchers on it counted) once its opening has this many confirmations (1: mined).
    # Set it to what your chain needs for a reorg not to undo the opening (e.g. 3+ on an L2, 12+ on L1).
    confirmations: int = Field(1, ge=1)
    # How often the node follows the escrow's logs into its channel index (admission reads the index; a channel
    # opened since the last poll costs one batched read and one shared sync when its first voucher arrives).
    index_poll_s: float = Field(1.0, gt=0)
    # Channels whose session signer is a contract (ERC-1271) can revoke it after being served, so their vouchers
    # stop settling. "refuse" (default): such channels are not served. "settle_first": each new voucher is settled
    # on-chain before it is counted, so what such a payer owes unsettled never exceeds the credit window.
    contract_signers: Literal["refuse", "settle_first"] = "refuse"
    batch_settlement: bool = True  # also offer x402's batch-settlement where its contract is deployed


class RegistryConfig(_Section):
    """On-chain NodeRegistry: register (or re-attest) at start, with a stake paid by the operator."""

    enabled: bool = False
    operator_key_env: str = "DCML_OPERATOR_KEY"  # the operator's wallet key (pays stake and gas), from the env
    stake: int = Field(100 * 10**18, gt=0)  # in the registry's stake token (smallest unit)
    endpoint: str = ""  # the public base URL clients call; default http://{server.host}:{server.port}


class P2PConfig(_Section):
    """The libp2p overlay: signed adverts on GossipSub, model providers in the Kademlia DHT."""

    enabled: bool = False
    listen: str = "/ip4/0.0.0.0/tcp/4001"
    bootstrap: list[str] = Field(default_factory=list)  # "/ip4/…/tcp/…/p2p/<peer id>"; configure several
    advert_interval_s: float = Field(30.0, gt=0)
    advert_ttl_s: int = Field(120, gt=0)  # must exceed the interval


class SlaConfig(_Section):
    """Service terms published in the SLA court, backed by the registry stake. Bounds of 0 are no bounds.

    At start the node benchmarks its engine against the terms and refuses to start (or warns) if it cannot
    meet them, publishes them when they changed, and answers no-response disputes with its stored receipts.
    """

    enabled: bool = False
    max_ttft_ms: int = Field(0, ge=0, lt=2**32)
    min_tokens_per_sec: int = Field(0, ge=0, lt=2**32)  # decode rate: tokens after the first / time after it
    max_duration_ms: int = Field(0, ge=0, lt=2**32)  # whole answer, up to limits.max_tokens_cap tokens
    response_window_s: int = Field(3600, gt=0, le=7 * 86400)  # to answer a no-response dispute
    breach_cost_bps: int = Field(0, ge=0, le=1_000_000)  # a broken-terms claim pays cost x bps / 10000 ...
    breach_fixed: int = Field(0, ge=0, lt=2**128)  # ... plus this (stake token, smallest unit)
    no_response_compensation: int = Field(0, ge=0, lt=2**128)  # stake token, smallest unit
    on_unmet: Literal["refuse", "warn"] = "refuse"  # the benchmark misses the terms: do not start, or warn
    benchmark_runs: int = Field(3, gt=0)
    benchmark_prompt_tokens: int = Field(32, gt=0)
    benchmark_max_tokens: int = Field(32, ge=2)  # at least 2: the decode rate needs tokens after the first
    watch_interval_s: float = Field(5.0, gt=0)  # how often the court is polled for disputes


class StatusConfig(_Section):
    """The operator status page (`/status`): it shows money, so it is served only with this token.
    Set it with DCML_NODE__STATUS__TOKEN rather than in the file; unset: the page is off."""

    token: SecretStr | None = Field(None, min_length=16)


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DCML_NODE__", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path(".data/node")
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    tee: TeeConfig = Field(default_factory=TeeConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    receipts: ReceiptsConfig = Field(default_factory=ReceiptsConfig)
    payments: PaymentsConfig = Field(default_factory=PaymentsConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    p2p: P2PConfig = Field(default_factory=P2PConfig)
    sla: SlaConfig = Field(default_factory=SlaConfig)
    status: StatusConfig = Field(default_factory=StatusConfig)

    @model_validator(mode="after")
    def _sla_needs_stake_and_payments(self) -> NodeSettings:
        # Terms are backed by the registry stake and published with the operator key; they judge paid requests.
        if self.sla.enabled and not (self.registry.enabled and self.payments.enabled):
            raise ValueError("[sla] enabled needs [registry] enabled (the stake backs the terms, the operator key "
                             "publishes them) and [payments] enabled (the court judges paid requests)")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Priority: explicit arguments > environment > TOML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


class ConfigError(DcmlError):
    """The configuration cannot be loaded; the message names the file and the problem."""

    reason = "bad_config"


def load_settings(path: Path | str | None = None, **overrides) -> NodeSettings:
    """Settings from `path` (TOML) with environment overrides; `overrides` win over both (tests)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; start from configs/node.toml")
    token = _toml_path.set(path)
    try:
        return NodeSettings(**overrides)
    finally:
        _toml_path.reset(token)


def resolve_receipt_domain(settings: NodeSettings) -> ReceiptDomain:
    """The EIP-712 domain receipts and acceptances are signed under; clients must verify under the same one.

    1. `[receipts] verifying_contract` (with `chain_id`) when set explicitly;
    2. else, when payments or the registry are on and the deployment file names an SLA court, that court on the
       deployment's chain: receipts the court can judge;
    3. else `ReceiptDomain()` (chain 31337, the zero address), or that with `[receipts] chain_id` if set.
    """
    rc = settings.receipts
    if rc.verifying_contract is not None:
        assert rc.chain_id is not None  # checked by ReceiptsConfig
        return ReceiptDomain(rc.chain_id, rc.verifying_contract)
    if settings.payments.enabled or settings.registry.enabled:
        dep = Deployment.load(settings.payments.deployment)
        if dep.sla_court:
            if rc.chain_id is not None and rc.chain_id != dep.chain_id:
                raise ValueError(f"[receipts] chain_id {rc.chain_id} is not the deployment's chain {dep.chain_id}: "
                                 "remove it (the SLA court's chain is used)")
            return ReceiptDomain(dep.chain_id, dep.sla_court)
    return ReceiptDomain() if rc.chain_id is None else ReceiptDomain(rc.chain_id)
