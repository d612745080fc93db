// Polls /status/data (same origin, cookie auth) and renders it with textContent only: values such as a
// registry endpoint come from outside, so nothing is ever parsed as HTML.
"use strict";

const REFRESH_MS = 5000;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function kv(id, rows) {
  const table = document.getElementById(id);
  table.replaceChildren();
  if (!rows.length) rows = [["none", ""]];
  for (const [key, value, cls] of rows) {
    const tr = el("tr");
    tr.append(el("th", key), el("td", value === null || value === undefined ? "–" : value, cls));
    tr.dataset.key = key;
    table.append(tr);
  }
}

function grid(id, columns, items, empty) {
  const table = document.getElementById(id);
  table.replaceChildren();
  if (!items.length) { table.append(el("tr")); table.firstChild.append(el("td", empty)); return; }
  const head = el("tr");
  for (const [title] of columns) head.append(el("th", title));
  table.append(head);
  for (const item of items) {
    const tr = el("tr");
    tr.dataset.channel = item.channel_id || "";
    for (const [, field] of columns) {
      const td = el("td", item[field] === null || item[field] === undefined ? "–" : item[field]);
      td.dataset.field = field;
      tr.append(td);
    }
    table.append(tr);
  }
}

function when(ts) { return ts ? new Date(ts * 1000).toISOString() : null; }

function render(s) {
  const id = s.identity;
  kv("identity", [["address", id.address], ["TEE", id.tee_type, id.simulated ? "warn" : "ok"],
    ["node version", id.version], ["MRTD", id.measurements.mrtd], ["RTMR0", id.measurements.rtmr0],
    ["RTMR1", id.measurements.rtmr1], ["RTMR2", id.measurements.rtmr2], ["RTMR3", id.measurements.rtmr3],
    ["attestation hash", id.attestation_hash]]);
  const r = s.registry;
  kv("registry", r.enabled ? [["status", r.status, r.status === "active" ? "ok" : "warn"], ["stake", r.stake],
    ["slashed", r.slashed], ["stake token", r.stake_token], ["operator", r.operator],
    ["last re-attestation", when(r.last_attested_at)], ["registered", when(r.registered_at)],
    ["endpoint", r.endpoint], ["error", r.error]] : [["registry", "off"]]);
  kv("engine", [["model", s.engine.model], ["engine", s.engine.kind], ["health", s.engine.healthy ? "serving" : "down",
    s.engine.healthy ? "ok" : "error"], ["queue depth", s.engine.queue_depth], ["uptime (s)", s.uptime_s]]);
  kv("load", [["requests in flight (this poll included, as in /metrics)", s.load.in_flight], ["tokens/s", s.load.tokens_per_s],
    ["output tokens", s.load.output_tokens], ["prompt tokens", s.load.prompt_tokens],
    ["HTTP requests", s.load.requests]]);
  const p = s.payments;
  if (p.enabled) {
    kv("money", [["accepted", p.totals.accepted || "0"], ["spent", p.totals.spent || "0"],
      ["settled", p.totals.settled || "0"], ["claimable", p.claimable], ["token", p.token], ["escrow", p.escrow],
      ["chain", p.chain_id], ["prices", Object.entries(p.prices).map(([m, v]) => `${m}: in ${v.input} out ${v.output}`)
        .join("; ")]]);
    kv("earnings", Object.entries(p.earnings_by_model).map(([m, v]) => [m, v]));
    kv("royalties", Object.entries(p.royalties_by_publisher).map(([m, v]) => [m, v]));
    grid("channels", [["channel", "channel_id"], ["model", "model"], ["payer", "payer"], ["deposit", "deposit"],
      ["accepted", "accepted"], ["spent", "spent"], ["settled", "settled"], ["unsettled", "unsettled"],
      ["finalized", "finalized"]], p.channels, "no channels yet");
    grid("closes", [["channel", "channel_id"], ["requested at", "close_requested_at"],
      ["deadline", "close_deadline"], ["seconds left", "close_in_s"]], p.pending_closes, "none");
  } else {
    kv("money", [["payments", "off"]]);
  }
  const sla = s.sla;
  kv("sla", sla.enabled ? [["court", sla.court], ["terms", sla.terms ? JSON.stringify(sla.terms) : "none published"],
    ["open disputes", sla.open_disputes.length ? sla.open_disputes.join(" ") : "none",
      sla.open_disputes.length ? "warn" : "ok"], ["answered disputes", sla.answered_disputes.length]]
    : [["SLA", "off"]]);
  document.getElementById("updated").textContent = "updated " + when(s.generated_at);
  document.body.dataset.generatedAt = String(s.generated_at);
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("/status/data", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) { window.location.assign("/status"); return; }
    if (!response.ok) throw new Error(`status data: HTTP ${response.status}`);
    render(await response.json());
    error.textContent = "";
  } catch (e) {
    error.textContent = String(e.message || e);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
