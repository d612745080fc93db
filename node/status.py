"""What the operator status page and `dcml-node status` show: one JSON-able snapshot of the node.

Load figures are read from the node's own Prometheus registry (the numbers `/metrics` serves); money is read
from the ledger and, for everything the chain decides (settled amounts, close deadlines, claimable earnings,
royalties, stake), from the chain itself. Amounts are decimal strings: wei exceeds JavaScript's 2^53.
Blocking (SQLite, RPC, a quote): call it in a thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from dcml.client.wire.receipts import model_id_for

if TYPE_CHECKING:
    from dcml.node.api.state import NodeState
    from dcml.node.network.presence import NodePresence
    from dcml.node.sla.watcher import SlaWatcher

BPS = 10_000


class StatusCollector:
    """Builds snapshots; remembers the previous output-token count to report tokens/s between two polls."""

    def __init__(self, state: NodeState, presence: NodePresence | None = None,
                 sla_watcher: SlaWatcher | None = None) -> None:
        self.state = state
        self.presence = presence
        self.sla_watcher = sla_watcher
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._last_tokens: tuple[float, float] | None = None  # (monotonic time, output tokens)
        self._measurements: dict[str, str] | None = None

    def snapshot(self) -> dict[str, Any]:
        s = self.state
        out: dict[str, Any] = {"generated_at": int(time.time()), "uptime_s": int(time.time() - self.started_at)}
        out["identity"] = self._identity()
        out["engine"] = {"model": s.engine.model_name, "kind": s.settings.engine.kind, "healthy": True,
                         "queue_depth": s.engine.queue_depth()}
        out["load"] = self._load()
        out["registry"] = self._registry()
        out["payments"] = self._payments()
        out["sla"] = self._sla()
        return out

    # -- identity and attestation ----------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        s = self.state
        if self._measurements is None:  # fixed for the enclave's life: quote once
            from dcml.node.tee.document import build_attestation_document

            doc = build_attestation_document(s.identity, s.provider, os.urandom(32), node_version=s.node_version)
            m = doc.measurements
            self._measurements = {"mrtd": m.mrtd, "rtmr0": m.rtmr0, "rtmr1": m.rtmr1, "rtmr2": m.rtmr2,
                                  "rtmr3": m.rtmr3}
        return {"address": s.identity.address, "tee_type": s.provider.tee_type, "version": s.node_version,
                "simulated": s.provider.tee_type == "simulated", "measurements": self._measurements,
                "attestation_hash": getattr(self.presence, "attestation_hash", None)}

    # -- load: the /metrics figures ---------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        s = self.state
        reg = s.metrics.registry
        model = {"model": s.engine.model_name}
        out_tokens = reg.get_sample_value("dcml_output_tokens_total", model) or 0.0
        now = time.monotonic()
        with self._lock:
            last, self._last_tokens = self._last_tokens, (now, out_tokens)
        rate = (out_tokens - last[1]) / (now - last[0]) if last and now > last[0] else 0.0
        return {"in_flight": int(reg.get_sample_value("dcml_in_flight_requests") or 0),
                "prompt_tokens": int(reg.get_sample_value("dcml_prompt_tokens_total", model) or 0),
                "output_tokens": int(out_tokens), "tokens_per_s": round(rate, 2),
                "requests": int(sum(m.value for f in reg.collect() if f.name == "dcml_http_requests"
                                    for m in f.samples if m.name == "dcml_http_requests_total"))}

    # -- registry ---------------------------------------------------------------------------------

    def _registry(self) -> dict[str, Any]:
        s = self.state
        if not s.settings.registry.enabled or s.gate is None:
            return {"enabled": False}
        dep = s.gate.payments.deployment
        if not dep.node_registry:
            return {"enabled": True, "error": "the deployment names no node_registry"}
        from dcml.client.chain.registry import RegistryClient

        record = RegistryClient(s.gate.payments.w3, dep.node_registry).node(s.identity.address)
        if record is None:
            return {"enabled": True, "status": "unregistered"}
        return {"enabled": True, "status": record.status.name.lower(), "operator": record.operator,
                "stake": str(record.stake), "slashed": str(record.slashed), "stake_token": record.stake_token,
                "registered_at": record.registered_at, "last_attested_at": record.attested_at,
                "tee": record.tee_name, "endpoint": record.endpoint}

    # -- channels, earnings, royalties ------------------------------------------------------------

    def _payments(self) -> dict[str, Any]:
        gate = self.state.gate
        if gate is None:
            return {"enabled": False}
        payments = gate.payments
        chain = payments.chain
        names = {mid.lower(): name for name, mid in gate.model_ids.items()}
        now = chain.chain_time()
        channels: list[dict[str, Any]] = []
        earned: defaultdict[str, int] = defaultdict(int)
        royalties: defaultdict[str, int] = defaultdict(int)
        totals: defaultdict[str, int] = defaultdict(int)
        chain.sync()  # one index sync, then every channel from memory
        for bal in payments.ledger.channels():
            state = chain.channel(bytes.fromhex(bal.channel_id[2:]))
            p = state.params
            royalty = state.settled * p.publisher_bps // BPS  # the escrow's integer split (_royalty)
            model = names.get("0x" + p.model_id.hex(), "0x" + p.model_id.hex())
            earned[model] += state.settled - royalty
            if royalty:
                royalties[p.publisher] += royalty
            deadline = state.close_requested_at + chain.grace_period if state.close_requested_at else None
            channels.append({
                "channel_id": bal.channel_id, "payer": p.payer, "model": model, "deposit": str(state.deposit),
                "accepted": str(bal.accepted), "spent": str(bal.spent), "settled": str(state.settled),
                "unsettled": str(max(bal.accepted - state.settled, 0)), "finalized": state.finalized,
                "close_requested_at": state.close_requested_at or None, "close_deadline": deadline,
                "close_in_s": deadline - now if deadline and not state.finalized else None,
            })
            for key, value in (("accepted", bal.accepted), ("spent", bal.spent), ("settled", state.settled)):
                totals[key] += value
        return {
            "enabled": True, "payee": self.state.identity.address, "token": gate.token,
            "escrow": payments.deployment.payment_channels, "chain_id": payments.deployment.chain_id,
            "chain_time": now, "claimable": str(chain.earnings(gate.token, self.state.identity.address)),
            "prices": {name: {"input": str(p.price_per_input_token), "output": str(p.price_per_output_token)}
                       for name, p in gate.config.prices.items()},
            "totals": {k: str(v) for k, v in totals.items()},
            "earnings_by_model": {k: str(v) for k, v in earned.items()},
            "royalties_by_publisher": {k: str(v) for k, v in royalties.items()},
            "pending_closes": [c for c in channels if c["close_deadline"] and not c["finalized"]],
            "channels": channels,
        }

    # -- SLA --------------------------------------------------------------------------------------

    def _sla(self) -> dict[str, Any]:
        s = self.state
        if not s.settings.sla.enabled or s.gate is None:
            return {"enabled": False}
        dep = s.gate.payments.deployment
        out: dict[str, Any] = {"enabled": True, "court": dep.sla_court}
        if dep.sla_court:
            from dcml.client.chain.sla import SLACourtClient

            model_id = s.settings.receipts.model_id or model_id_for(s.engine.model_name)
            terms = SLACourtClient(s.gate.payments.w3, dep.sla_court).latest_terms(s.identity.address, model_id)
            out["terms"] = terms.model_dump(mode="json") if terms is not None else None
        w = self.sla_watcher
        out["open_disputes"] = ["0x" + d.hex() for d in sorted(w.open_disputes)] if w is not None else []
        out["answered_disputes"] = ["0x" + d.hex() for d in w.answered] if w is not None else []
        return out


# -- the terminal view (`dcml-node status`) --------------------------------------------------------


def print_status(s: dict[str, Any], console: Any = None) -> None:
    """The same snapshot as the page, as rich tables. Strings from outside are printed as text, not markup."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()

    def kv(title: str, rows: list[tuple[str, Any]]) -> None:
        table = Table(title=title, show_header=False, title_justify="left")
        for key, value in rows or [("none", "")]:
            table.add_row(Text(key), Text("–" if value is None else str(value)))
        console.print(table)

    i, r, e, load, p, sla = s["identity"], s["registry"], s["engine"], s["load"], s["payments"], s["sla"]
    kv("Identity and attestation", [("address", i["address"]), ("TEE", i["tee_type"] + (
        " (SIMULATED: NOT CONFIDENTIAL)" if i["simulated"] else "")), ("version", i["version"]),
        *[(k.upper(), v) for k, v in i["measurements"].items()], ("attestation hash", i["attestation_hash"])])
    kv("Registry", [(k.replace("_", " "), v) for k, v in r.items() if k != "enabled"] if r["enabled"]
       else [("registry", "off")])
    kv("Engine and model", [("model", e["model"]), ("engine", e["kind"]), ("health", "serving" if e["healthy"]
        else "down"), ("queue depth", e["queue_depth"]), ("uptime (s)", s["uptime_s"])])
    kv("Load", [("requests in flight (this one included, as in /metrics)", load["in_flight"]),
                ("tokens/s", load["tokens_per_s"]), ("output tokens", load["output_tokens"]),
                ("prompt tokens", load["prompt_tokens"]), ("HTTP requests", load["requests"])])
    if not p["enabled"]:
        kv("Money", [("payments", "off")])
    else:
        t = p["totals"]
        kv("Money (wei)", [("accepted", t.get("accepted", "0")), ("spent", t.get("spent", "0")),
                           ("settled", t.get("settled", "0")), ("claimable", p["claimable"]), ("token", p["token"]),
                           ("escrow", p["escrow"]), ("chain", p["chain_id"])])
        kv("Earnings by model (settled, payee share)", list(p["earnings_by_model"].items()))
        kv("Publisher royalties paid", list(p["royalties_by_publisher"].items()))
        cols = ("channel_id", "model", "deposit", "accepted", "spent", "settled", "unsettled", "finalized",
                "close_deadline")
        table = Table(*cols, title="Channels", title_justify="left")
        for c in p["channels"]:
            table.add_row(*(Text("–" if c[k] is None else str(c[k])) for k in cols))
        console.print(table)
    if sla["enabled"]:
        kv("SLA", [("court", sla["court"]), ("terms", sla.get("terms")),
                   ("open disputes", " ".join(sla["open_disputes"]) or "none"),
                   ("answered disputes", len(sla["answered_disputes"]))])
    else:
        kv("SLA", [("SLA", "off")])
