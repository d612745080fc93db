"""What every `dcml` command shares: the global options (wallet, deployment, store, policy), one readable line
or JSON object per expected failure, and the output helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from pydantic import ValidationError
from rich.console import Console

from dcml.client.attestation.verify import AttestationError, Policy
from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.sla import SLAError
from dcml.client.chain.tx import TransactionFailed
from dcml.client.sdk.client import Client, NodeError, PaymentError
from dcml.client.sdk.disputes import Disputes
from dcml.client.sdk.spend_store import SessionKeyLocked, SpendStore
from dcml.client.wire.receipts import ReceiptError

out = Console()
err = Console(stderr=True)
EXPECTED = (PaymentError, NodeError, AttestationError, ReceiptError, TransactionFailed, SessionKeyLocked, SLAError,
            FileNotFoundError, httpx.HTTPError, ValidationError, ValueError, KeyError)


@dataclass
class Options:
    deployment: Path
    key_env: str
    key_file: Path | None
    store: Path
    allow_simulated: bool
    policy: Path | None
    json: bool

    def wallet(self) -> LocalAccount:
        if self.key_file is not None:
            key = self.key_file.expanduser().read_text().strip()
        else:
            key = os.environ.get(self.key_env, "")
            if not key:
                raise ValueError(f"no wallet key: set ${self.key_env} or pass --key-file")
        return Account.from_key(key)

    def client(self, node_url: str, *, deposit: int = 10**18, max_price: int | None = None,
               seal: bool = True) -> Client:
        return Client(node_url, self.wallet(), deployment=Deployment.load(self.deployment),
                      policy=Policy.load(self.policy) if self.policy else None, allow_simulated=self.allow_simulated,
                      store=self.store, deposit=deposit, max_price_per_token=max_price, seal=seal)

    @contextmanager
    def disputes(self) -> Iterator[Disputes]:
        """The payer wallet's SLA claims and disputes; node URLs come from the stored acceptances."""
        deployment = Deployment.load(self.deployment)
        wallet = self.wallet()
        store = SpendStore(self.store)
        try:
            w3 = connect(deployment.rpc_url)
            yield Disputes(w3, deployment, wallet, store)
        finally:
            store.close()


@contextmanager
def handled(opts: Options) -> Iterator[None]:
    """Expected failures become one readable line (or a JSON error object) and exit code 1."""
    try:
        yield
    except EXPECTED as exc:
        if opts.json:
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        else:
            err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None


def emit(opts: Options, data: Any, human: Callable[[], None]) -> None:
    if opts.json:
        print(json.dumps(data))
    else:
        human()


def eth(wei: int) -> str:
    return f"{wei} wei ({wei / 10**18:.9f})"


def short(value: str | None, n: int = 10) -> str:
    return "-" if not value else value if len(value) <= n + 2 else value[: n + 2] + "…"
