"""`dcml disputes`: claim broken SLA terms, dispute unanswered requests, collect what the court awards."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dcml.client.sdk.cli_common import Options, emit, handled, out, short
from dcml.client.sdk.disputes import DisputeRow

disputes_app = typer.Typer(help="SLA court: claim broken terms, dispute unanswered requests, collect.",
                           no_args_is_help=True)


def _dispute_table(rows: list[DisputeRow], empty: str) -> None:
    if not rows:
        out.print(empty)
        return
    table = Table(box=None, pad_edge=False)
    for col in ("kind", "id", "status", "due", "node", "expected", "paid", "broken / reason"):
        table.add_column(col)
    for r in rows:
        note = ", ".join(r.broken) + ("; " if r.broken and r.reason else "") + (r.reason or "")
        table.add_row(r.kind, short(r.id), r.status, "yes" if r.due else "", short(r.node),
                      "-" if r.expected is None else str(r.expected), "-" if r.amount is None else str(r.amount),
                      note or "-")
    out.print(table, highlight=False)


@disputes_app.command("list")
def disputes_list(ctx: typer.Context,
                  due: Annotated[bool, typer.Option(help="Only items with something to send now.")] = False) -> None:
    """Breach claims (receipts that broke the node's terms) and no-response disputes, with their amounts."""
    opts: Options = ctx.obj
    with handled(opts), opts.disputes() as disputes:
        rows = [r for r in disputes.list() if r.due or not due]
        emit(opts, [r.as_json() for r in rows],
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
    with handled(opts), opts.disputes() as disputes:
        rows = disputes.open_due(node=node, request_hash=request_hash, receipt_id=receipt)
        emit(opts, [r.as_json() for r in rows], lambda: _dispute_table(rows, "nothing due"))


@disputes_app.command("finalize")
def disputes_finalize(
    ctx: typer.Context,
    dispute_id: Annotated[str | None, typer.Argument(help="One dispute id (default: every open one).")] = None,
) -> None:
    """Collect compensation for disputes the node left unanswered past their window; record answered ones."""
    opts: Options = ctx.obj
    with handled(opts), opts.disputes() as disputes:
        rows = disputes.finalize_due(dispute_id=dispute_id)
        emit(opts, [r.as_json() for r in rows], lambda: _dispute_table(rows, "no dispute is ready to finalize"))
