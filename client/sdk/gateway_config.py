"""What the gateway is told (`configs/gateway.toml`) and what it may spend: the per-request, per-hour and
per-channel limits, held against a worst-case estimate before anything is sent."""

from __future__ import annotations

import asyncio
import collections
import time
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dcml.client.wire.errors import DcmlError, ErrorType


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SpendingLimits(_Section):
    """wei of the channel token; None = no limit."""

    per_request: int | None = Field(None, gt=0)  # worst case: prompt bytes x input price + max_tokens x output
    per_hour: int | None = Field(None, gt=0)  # verified receipts of the last hour + requests in flight
    per_channel: int | None = Field(None, gt=0)  # the most one channel is ever funded with (no top-up past it)


class GatewayConfig(_Section):
    host: str = "127.0.0.1"  # loopback: the gateway spends the wallet's money for whoever can reach it
    port: int = Field(8400, ge=0, le=65535)
    deployment: Path = Path(".devnet/deployment.json")
    wallet_key_env: str = "DCML_WALLET_KEY"
    store_dir: Path = Path("~/.dcml/gateway")  # one SDK spend store per node
    policy: Path | None = None  # attestation policy (configs/policy.toml); None = the strict default
    allow_simulated: bool = False  # development only
    nodes: list[str] = Field(default_factory=list)  # static base URLs
    registry: bool = False  # also every active node in the deployment's NodeRegistry
    require_registered: bool = False  # use a node only if its attested key is active in the NodeRegistry
    deposit: int = Field(10**18, gt=0)  # opening deposit (capped by limits.per_channel)
    limits: SpendingLimits = Field(default_factory=SpendingLimits)
    default_max_tokens: int = Field(256, gt=0)  # set when a request names none: bounds its cost
    first_token_timeout_s: float = Field(30.0, gt=0)  # admission + first token; then the next node
    backoff_s: float = Field(5.0, gt=0)  # a failing node is skipped this long, doubling per failure ...
    max_backoff_s: float = Field(300.0, gt=0)  # ... up to this
    refresh_s: float = Field(60.0, gt=0)  # re-attest and re-read models and prices this often
    # Concurrent requests to one node, each on its own channel: a channel carries one request at a time, so
    # vouchers of concurrent streams never race (opened lazily, each with its own deposit).
    channels_per_node: int = Field(4, gt=0)
    auto_dispute: bool = False  # open and finalize SLA disputes as the SDK does

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> GatewayConfig:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


class LimitExceeded(DcmlError):
    """A request would pass one of the gateway's spending limits; `code` (the reason) names which."""

    error_type = ErrorType.PAYMENT

    def __init__(self, which: str, message: str) -> None:
        super().__init__(message, reason=f"spending_limit_{which}")
        self.code = self.reason


class Spending:
    """Verified receipts of the last hour and the worst case of requests in flight, against the limits."""

    def __init__(self, limits: SpendingLimits) -> None:
        self.limits = limits
        self._spent: collections.deque[tuple[float, int]] = collections.deque()  # (time, cost) of receipts
        self.reserved = 0  # worst-case cost of requests in flight (per-hour limit)
        self._lock = asyncio.Lock()

    def last_hour(self) -> int:
        cutoff = time.time() - 3600
        while self._spent and self._spent[0][0] < cutoff:
            self._spent.popleft()
        return sum(c for _, c in self._spent)

    async def reserve(self, worst: int) -> None:
        limits = self.limits
        if limits.per_request is not None and worst > limits.per_request:
            raise LimitExceeded("per_request", f"this request may cost up to {worst} wei (prompt and max_tokens at "
                                f"the cheapest node's prices), over the per-request limit of {limits.per_request} "
                                "wei: lower max_tokens or raise limits.per_request. Nothing was paid.")
        async with self._lock:
            if limits.per_hour is not None:
                used = self.last_hour() + self.reserved
                if used + worst > limits.per_hour:
                    raise LimitExceeded("per_hour", f"{used} wei spent or in flight in the last hour; this request "
                                        f"may cost up to {worst} wei, over the hourly limit of {limits.per_hour} "
                                        "wei. Nothing was paid.")
            self.reserved += worst

    async def release(self, worst: int, cost: int) -> None:
        async with self._lock:
            self.reserved -= worst
            if cost:
                self._spent.append((time.time(), cost))
