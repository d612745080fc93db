"""The nodes a gateway pays, as it sees them: verified prices, measured time to first token, back-off after a
failure, and the slots (one SDK client and channel each) that serve one request at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import httpx

from dcml.client.sdk.client import Client
from dcml.client.sdk.gateway_config import GatewayConfig
from dcml.client.wire.errors import DcmlError

log = logging.getLogger("dcml.gateway")


@dataclass
class Price:
    input: int
    output: int


@dataclass
class Slot:
    """One SDK client (its own spend store and channel) serving one request at a time."""

    client: Client
    http: httpx.AsyncClient
    ready: set[str] = field(default_factory=set)  # models with a usable channel on this slot


@dataclass
class Upstream:
    """One node as the gateway sees it."""

    url: str
    slots: list[Slot]
    free: asyncio.Queue = field(default_factory=asyncio.Queue)
    prices: dict[str, Price] = field(default_factory=dict)  # model -> verified terms
    ttft_s: float | None = None  # moving average of admission + first token
    failures: int = 0
    down_until: float = 0.0
    refreshed_at: float = 0.0
    last_error: str = ""

    def failed(self, reason: str, cfg: GatewayConfig) -> None:
        self.failures += 1
        backoff = min(cfg.backoff_s * 2 ** (self.failures - 1), cfg.max_backoff_s)
        self.down_until = time.monotonic() + backoff
        self.last_error = reason
        self.refreshed_at = 0.0  # re-attested before it is used again: it may have restarted with new keys
        log.warning("node %s failed (%s); skipped for %.0f s", self.url, reason, backoff)

    @property
    def client(self) -> Client:
        """The first slot's client: attests the node and reads its terms for the gateway."""
        return self.slots[0].client

    def succeeded(self, ttft_s: float) -> None:
        self.failures, self.last_error = 0, ""
        self.ttft_s = ttft_s if self.ttft_s is None else 0.8 * self.ttft_s + 0.2 * ttft_s


class NodeFailed(DcmlError):
    """This node cannot answer this request before its first token: try the next one."""

    reason = "node_failed"
