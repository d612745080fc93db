"""`dcml`: chat with an attested node and pay per token; manage channels and receipts.

    export DCML_WALLET_KEY=0x...   # or --key-file
    dcml node attest http://127.0.0.1:8080 --allow-simulated
    dcml chat --node http://127.0.0.1:8080 --model dcml-demo "Hello" --allow-simulated
    dcml channel list --json
    dcml disputes list             # SLA claims and no-response disputes; `open` / `finalize` send them
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from dcml.client.attestation.verify import AttestationDocument, AttestationError, Policy, verify_attestation
from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.sla import SLAError
from dcml.client.chain.tx import TransactionFailed
from dcml.client.publisher.cli import model_app
from dcml.client.sdk.client import ChatResult, ChatStream, Client, NodeError, PaymentError
from dcml.client.sdk.disputes import DisputeRow, Disputes, broken_names
from dcml.client.sdk.spend_store import SessionKeyLocked, SpendStore, StoredChannel
from dcml.client.wire.receipts import Price, ReceiptError, request_hash, verify_receipt

app = typer.Typer(name="dcml", help="Pay attested LLM nodes per token and verify every answer.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
channel_app = typer.Typer(help="Open, top up, close and list payment channels.", no_args_is_help=True)
receipts_app = typer.Typer(help="List and re-verify stored receipts.", no_args_is_help=True)
node_app = typer.Typer(help="Inspect nodes.", no_args_is_help=True)
app.add_typer(channel_app, name="channel")
app.add_typer(receipts_app, name="receipts")
app.add_typer(node_app, name="node")
app.add_typer(model_app, name="model")
nodes_app = typer.Typer(help="Find nodes on the overlay.", no_args_is_help=True)
app.add_typer(nodes_app, name="nodes")
disputes_app = typer.Typer(help="SLA court: claim broken terms, dispute unanswered requests, collect.",
                           no_args_is_help=True)
app.add_typer(disputes_app, name="disputes")

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


@app.callback()
def main(
    ctx: typer.Context,
    deployment: Annotated[Path, typer.Option(help="Deployment JSON written by the devnet.")] = Path(
        ".devnet/deployment.json"),
    key_env: Annotated[str, typer.Option(help="Environment variable holding the wallet key.")] = "DCML_WALLET_KEY",
    key_file: Annotated[Path | None, typer.Option(help="File holding the wallet key (instead of --key-env).")] = None,
    store: Annotated[Path, typer.Option(help="Spend store (SQLite).")] = Path("~/.dcml/client.sqlite"),
    allow_simulated: Annotated[bool, typer.Option(help="Accept simulated TEEs (development only).")] = False,
    policy: Annotated[Path | None, typer.Option(help="Attestation policy TOML.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    ctx.obj = Options(deployment, key_env, key_file, store.expanduser(), allow_simulated, policy, json_out)


@contextmanager
def _handled(opts: Options) -> Iterator[None]:
    """Expected failures become one readable line (or a JSON error object) and exit code 1."""
    try:
        yield
    except EXPECTED as exc:
        if opts.json:
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        else:
            err.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None


def _emit(opts: Options, data: Any, human: Callable[[], None]) -> None:
    if opts.json:
        print(json.dumps(data))
    else:
        human()


def _eth(wei: int) -> str:
    return f"{wei} wei ({wei / 10**18:.9f})"


# -- chat -------------------------------------------------------------------------------------------


@app.command()
def chat(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The user message ('-' reads stdin).")],
    node: Annotated[str, typer.Option(help="Node URL.")] = "http://127.0.0.1:8080",
    model: Annotated[str, typer.Option(help="Served model name.")] = "dcml-demo",
    max_tokens: Annotated[int | None, typer.Option(help="Most tokens to generate.")] = None,
    deposit: Annotated[int, typer.Option(help="Deposit (wei) for a new channel, and per top-up.")] = 10**18,
    max_price: Annotated[int | None, typer.Option(help="Refuse nodes charging more wei per token.")] = None,
    stream: Annotated[bool, typer.Option(help="Stream tokens as they come.")] = True,
    seal: Annotated[bool, typer.Option(help="Seal the prompt end to end to the node's attested key "
                                       "(--no-seal sends it in clear).")] = True,
) -> None:
    """Send one chat message, print the answer and what it cost."""
    opts: Options = ctx.obj
    text = sys.stdin.read() if prompt == "-" else prompt
    params = {} if max_tokens is None else {"max_tokens": max_tokens}
    with _handled(opts), opts.client(node, deposit=deposit, max_price=max_price, seal=seal) as client:
        if not opts.json:
            attested = client.attest()
            err.print(f"[dim]node {attested.signing_address} ({attested.marker})[/]", highlight=False)
        messages = [{"role": "user", "content": text}]
        if stream and not opts.json:
            s = client.chat(messages, model, stream=True, **params)
            assert isinstance(s, ChatStream)
            for delta in s:
                out.print(delta, end="", highlight=False, markup=False)
            out.print()
            result = s.result
        else:
            result = client.chat(messages, model, **params)
        assert isinstance(result, ChatResult)
        receipt = result.receipt.receipt if result.receipt else None
        broken = broken_names(result.sla_broken)

        def human() -> None:
            if not stream:
                out.print(result.text, highlight=False, markup=False)
            err.print(f"[green]paid {_eth(result.cost)}[/] for {receipt.input_tokens if receipt else '?'} in + "
                      f"{receipt.output_tokens if receipt else '?'} out tokens; receipt "
                      f"{receipt.receipt_id if receipt else '-'} verified", highlight=False)
            if broken:
                err.print(f"[yellow]the answer broke the node's SLA terms ({', '.join(broken)}): a claim is pending, "
                          "send it with `dcml disputes open`[/]", highlight=False)

        _emit(opts, {"text": result.text, "usage": result.usage, "cost": str(result.cost),
                     "channel_id": result.channel_id, "receipt_id": receipt.receipt_id if receipt else None,
                     "sla_broken": broken, "sealed": result.sealed}, human)


# -- channels ---------------------------------------------------------------------------------------


def _channel_row(ch: StoredChannel) -> str:
    return (f"{ch.channel_id}  {ch.status:<7}  model={ch.model}  deposit={ch.deposit}  signed={ch.accepted}  "
            f"spent={ch.spent}  node={ch.node_url}")


@channel_app.command("open")
def channel_open(
    ctx: typer.Context,
    node: Annotated[str, typer.Option(help="Node URL.")],
    model: Annotated[str, typer.Option(help="Served model name.")] = "dcml-demo",
    deposit: Annotated[int, typer.Option(help="Deposit in wei.")] = 10**18,
    max_price: Annotated[int | None, typer.Option(help="Refuse nodes charging more wei per token.")] = None,
) -> None:
    """Attest the node, read its terms and open a channel paying its attested key."""
    opts: Options = ctx.obj
    with _handled(opts), opts.client(node, deposit=deposit, max_price=max_price) as client:
        ch = client.open_channel(model, deposit)
        _emit(opts, ch.as_json(), lambda: out.print(f"opened {_channel_row(ch)}", highlight=False))


def _stored_client(opts: Options, channel_id: str) -> Client:
    from dcml.client.sdk.spend_store import SpendStore

    store = SpendStore(opts.store)
    try:
        ch = store.channel(channel_id)
    finally:
        store.close()
    if ch is None:
        raise KeyError(f"channel {channel_id} is not in {opts.store}; `dcml channel list` shows the known ones")
    return opts.client(ch.node_url)


@channel_app.command("topup")
def channel_topup(ctx: typer.Context, channel_id: str, amount: Annotated[int, typer.Argument(help="wei")]) -> None:
    """Add `amount` wei to a channel's deposit (this also cancels a requested close)."""
    opts: Options = ctx.obj
    with _handled(opts), _stored_client(opts, channel_id) as client:
        ch = client.top_up(channel_id, amount)
        _emit(opts, ch.as_json(), lambda: out.print(f"topped up {_channel_row(ch)}", highlight=False))


@channel_app.command("close")
def channel_close(ctx: typer.Context, channel_id: str) -> None:
    """Request a close: the node settles and refunds, or `withdraw` after the grace period."""
    opts: Options = ctx.obj
    with _handled(opts), _stored_client(opts, channel_id) as client:
        ch = client.close_channel(channel_id)
        grace = client.deployment.close_grace_period
        _emit(opts, {**ch.as_json(), "grace_period_s": grace},
              lambda: out.print(f"close requested for {ch.channel_id}; the node settles and refunds, or run "
                                f"`dcml channel withdraw {ch.channel_id}` after {grace} s", highlight=False))


@channel_app.command("withdraw")
def channel_withdraw(ctx: typer.Context, channel_id: str) -> None:
    """Refund the unsettled deposit once the grace period has passed."""
    opts: Options = ctx.obj
    with _handled(opts), _stored_client(opts, channel_id) as client:
        ch = client.withdraw(channel_id)
        _emit(opts, ch.as_json(), lambda: out.print(f"withdrawn {_channel_row(ch)}", highlight=False))


@channel_app.command("list")
def channel_list(ctx: typer.Context, chain: Annotated[bool, typer.Option(help="Also read on-chain state.")] = False
                 ) -> None:
    """Channels in the spend store for this wallet."""
    opts: Options = ctx.obj
    with _handled(opts), opts.client("http://unused") as client:
        rows = []
        for ch in client.channels():
            row = ch.as_json()
            if chain:
                st = client.channel_state(ch.channel_id)
                row.update(onchain_deposit=str(st.deposit), onchain_settled=str(st.settled), finalized=st.finalized,
                           close_requested_at=st.close_requested_at)
            rows.append(row)
        _emit(opts, rows, lambda: [out.print(_channel_row(c), highlight=False) for c in client.channels()]
              or out.print("no channels yet: `dcml chat` or `dcml channel open` opens one"))


# -- receipts ---------------------------------------------------------------------------------------


@receipts_app.command("list")
def receipts_list(ctx: typer.Context, channel: Annotated[str | None, typer.Option(help="Only this channel.")] = None
                  ) -> None:
    """Receipts kept in the spend store."""
    opts: Options = ctx.obj
    with _handled(opts), opts.client("http://unused") as client:
        rows = client.receipts(channel)
        _emit(opts, [r.as_json() for r in rows],
              lambda: [out.print(f"{r.receipt_id}  channel={r.channel_id[:10]}…  in={r.input_tokens} "
                                 f"out={r.output_tokens}  cost={r.cost}  cumulative={r.cumulative_spent}",
                                 highlight=False) for r in rows] or out.print("no receipts yet"))


@receipts_app.command("verify")
def receipts_verify(ctx: typer.Context) -> None:
    """Re-check every stored receipt offline: signer = the channel's (attested) payee, requestHash = the
    stored request body, cost = tokens x the channel's prices. Exit code 1 if any fails."""
    opts: Options = ctx.obj
    with _handled(opts), opts.client("http://unused") as client:
        results = []
        channels = {c.channel_id: c for c in client.channels()}
        for r in client.receipts():
            ch = channels.get(r.channel_id)
            rec = r.signed.receipt
            try:
                verify_receipt(rec, r.signed.signature, expected_signer=ch.payee if ch else r.signed.signer,
                               request_bytes=r.request_body or b"", response_bytes=b"", domain=client.receipt_domain)
                problem = None
            except ReceiptError as exc:
                # The response bytes are not kept: only that check may fail here, and it was made on arrival.
                problem = None if exc.reason.value == "response_hash_mismatch" else str(exc)
            if problem is None and r.request_body is not None and request_hash(r.request_body) != rec.request_hash:
                problem = "request_hash_mismatch"
            if problem is None and ch and rec.cost != Price(ch.price_in, ch.price_out).cost(rec.input_tokens,
                                                                                          rec.output_tokens):
                problem = f"cost_mismatch: {rec.cost}"
            results.append({"receipt_id": r.receipt_id, "ok": problem is None, "problem": problem})
        _emit(opts, {"receipts": results, "violations": len(client.violations())},
              lambda: [out.print(f"{'[green]ok[/]' if x['ok'] else '[red]BAD[/]'}  {x['receipt_id']}"
                                 f"{'  ' + x['problem'] if x['problem'] else ''}") for x in results]
              or out.print("no receipts yet"))
        if not all(x["ok"] for x in results):
            raise typer.Exit(1)


# -- node -------------------------------------------------------------------------------------------


@node_app.command("attest")
def node_attest(ctx: typer.Context, url: str) -> None:
    """Verify a node's attestation with a fresh nonce and print its attested keys."""
    opts: Options = ctx.obj
    policy = Policy.load(opts.policy) if opts.policy else Policy()
    with _handled(opts):
        nonce = os.urandom(32)
        response = httpx.get(url.rstrip("/") + "/v1/attestation", params={"nonce": nonce.hex()}, timeout=30)
        if response.status_code != 200:
            raise NodeError(response.status_code, None, response.text[:300])
        node = verify_attestation(AttestationDocument.model_validate(response.json()), nonce=nonce, policy=policy,
                                  allow_simulated=opts.allow_simulated)
        data = {"url": url, "signing_address": node.signing_address, "hpke_public_key": node.hpke_public_key.hex(),
                "tee_type": node.tee_type, "tcb_status": node.tcb_status, "simulated": node.simulated,
                "compose_hash": node.compose_hash,
                "gpus": [{"architecture": g.architecture, "driver_version": g.driver_version,
                          "vbios_version": g.vbios_version, "revocation_checked": g.revocation_checked}
                         for g in node.gpus]}
        gpus = "".join(f"\n  gpu {i}            {g.describe()}; revocation "
                       f"{'checked' if g.revocation_checked else 'NOT checked (no OCSP/CRL stapled)'}"
                       for i, g in enumerate(node.gpus))
        _emit(opts, data, lambda: out.print(
            f"[green]verified[/] {url}\n  signing address  {node.signing_address}\n  tee              "
            f"{node.tee_type} ({node.marker})\n  tcb status       {node.tcb_status}\n  hpke key         "
            f"{node.hpke_public_key.hex()[:32]}…{gpus}", highlight=False))


# -- nodes ------------------------------------------------------------------------------------------


@nodes_app.command("list")
def nodes_list(
    ctx: typer.Context,
    bootstrap: Annotated[list[str], typer.Option("--bootstrap", envvar="DCML_BOOTSTRAP",
                                                 help="Overlay peer multiaddr (/ip4/…/tcp/…/p2p/<id>); repeat.")],
    model: Annotated[str | None, typer.Option(help="Only nodes serving this model (name or 0x id).")] = None,
) -> None:
    """Nodes whose signed adverts check out against the registry and their live attestation, cheapest first."""
    from dcml.client.sdk.client import discover

    opts: Options = ctx.obj
    with _handled(opts):
        offers = discover(Deployment.load(opts.deployment), bootstrap, model,
                          policy=Policy.load(opts.policy) if opts.policy else None,
                          allow_simulated=opts.allow_simulated)
        rows = [{"address": o.address, "endpoint": o.endpoint, "model_id": o.model_id, "price_in": str(o.price_in),
                 "price_out": str(o.price_out), "latency_ms": round(o.latency_ms, 1), "tee": o.tee_type}
                for o in offers]

        def human() -> None:
            if not rows:
                out.print("no verified node found" + (f" for {model}" if model else ""))
            for r in rows:
                out.print(f"{r['address']}  {r['endpoint']}  {r['model_id'][:10]}…  in={r['price_in']} "
                          f"out={r['price_out']}  {r['latency_ms']} ms  {r['tee']}", highlight=False)

        _emit(opts, rows, human)


# -- disputes ---------------------------------------------------------------------------------------


def _short(value: str | None, n: int = 10) -> str:
    return "-" if not value else value if len(value) <= n + 2 else value[: n + 2] + "…"


def _dispute_table(rows: list[DisputeRow], empty: str) -> None:
    if not rows:
        out.print(empty)
        return
    table = Table(box=None, pad_edge=False)
    for col in ("kind", "id", "status", "due", "node", "expected", "paid", "broken / reason"):
        table.add_column(col)
    for r in rows:
        note = ", ".join(r.broken) + ("; " if r.broken and r.reason else "") + (r.reason or "")
        table.add_row(r.kind, _short(r.id), r.status, "yes" if r.due else "", _short(r.node),
                      "-" if r.expected is None else str(r.expected), "-" if r.amount is None else str(r.amount),
                      note or "-")
    out.print(table, highlight=False)


@disputes_app.command("list")
def disputes_list(ctx: typer.Context,
                  due: Annotated[bool, typer.Option(help="Only items with something to send now.")] = False) -> None:
    """Breach claims (receipts that broke the node's terms) and no-response disputes, with their amounts."""
    opts: Options = ctx.obj
    with _handled(opts), opts.disputes() as disputes:
        rows = [r for r in disputes.list() if r.due or not due]
        _emit(opts, [r.as_json() for r in rows],
              lambda: _dispute_table(rows, "nothing to claim or dispute" if due else "no claims or disputes yet"))


@disputes_app.command("open")
def disputes_open(
    ctx: typer.Context,
    node: Annotated[str | None, typer.Option(help="Only this node (signing address or URL).")] = None,
    request_hash: Annotated[str | None, typer.Option(help="Only this request (0x sha256 of its body).")] = None,
    receipt: Annotated[str | None, typer.Option(help="Only the breach claim of this receipt id.")] = None,
) -> None:
    """Claim every pending breach and open a no-response dispute (bond paid) for every accepted request past
    its deadline without a receipt, unless the node serves the receipt when asked."""
    opts: Options = ctx.obj
    with _handled(opts), opts.disputes() as disputes:
        rows = disputes.open_due(node=node, request_hash=request_hash, receipt_id=receipt)
        _emit(opts, [r.as_json() for r in rows], lambda: _dispute_table(rows, "nothing due"))


@disputes_app.command("finalize")
def disputes_finalize(
    ctx: typer.Context,
    dispute_id: Annotated[str | None, typer.Argument(help="One dispute id (default: every open one).")] = None,
) -> None:
    """Collect compensation for disputes the node left unanswered past their window; record answered ones."""
    opts: Options = ctx.obj
    with _handled(opts), opts.disputes() as disputes:
        rows = disputes.finalize_due(dispute_id=dispute_id)
        _emit(opts, [r.as_json() for r in rows], lambda: _dispute_table(rows, "no dispute is ready to finalize"))


@app.command()
def gateway(
    config: Annotated[Path, typer.Option("--config", "-c", help="Gateway TOML")] = Path("configs/gateway.toml"),
    host: Annotated[str | None, typer.Option(help="Override the listen address (default loopback)")] = None,
    port: Annotated[int | None, typer.Option(help="Override the port")] = None,
) -> None:
    """A local OpenAI-compatible endpoint that picks, attests, pays and fails over across nodes."""
    from dcml.client.sdk.gateway import main as run_gateway

    run_gateway(config, host=host, port=port)
