"""Where the contracts live: the deployment file the devnet writes and nodes and clients read."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class DevAccount(BaseModel):
    """A funded devnet account (anvil's well-known keys: never use them on a live chain)."""

    address: str
    private_key: str


class Deployment(BaseModel):
    model_config = ConfigDict(frozen=True)

    chain_id: int
    rpc_url: str
    payment_channels: str
    model_registry: str
    node_registry: str | None = None  # NodeRegistry (None in deployment files written before it existed)
    sla_court: str | None = None  # SLACourt (None in deployment files written before it existed)
    token: str
    batch_settlement: str | None = None  # x402's batch-settlement contract (canonical address), where placed
    close_grace_period: int
    start_block: int = 0  # where to start looking for the escrow's events
    accounts: dict[str, DevAccount] = {}

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        try:
            return cls.model_validate_json(Path(path).read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no deployment file at {path}: start the devnet first (`make devnet`)") from exc

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
        tmp.replace(path)  # readers never see a half-written file
