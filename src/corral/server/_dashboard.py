"""The live dashboard: one self-contained HTML page (no external assets) that polls
``/v1/workers`` and ``/v1/events`` every second and draws each worker with its tenant,
pid (and the kernel's own pid where it differs), state, memory against its limits,
requests, age and idle time; the sandbox layers in force; and the recent stops with
their date, time and reason. Over a Ray cluster (``/v1/workers`` then has ``nodes``), each
worker also shows its node (address, and the node id on hover), a "Nodes" panel lists
every node with its state, workers against its ``max_workers``, memory pressure and
start error, and each stop says on which node it happened.

Everything the page shows from the JSON goes in as text (``textContent``, ``title``,
``dataset``), never as markup: tenant keys are chosen by clients. A long key is cut
with an ellipsis by CSS (the full key is in the element's text and its ``title``, shown
on hover), so that no key can widen the page.

A gateway started with ``--auth-token`` serves this page without the token (it holds
no data) but not the JSON it polls. Open the page as ``/#token=TOKEN``: the fragment
never leaves the browser (it is not in the request, a server's log or a ``Referer``);
the script keeps the token for the tab (``sessionStorage``), takes it off the address
bar, and sends it as ``Authorization: Bearer`` with each poll. Without it the page says
how to give it."""

from __future__ import annotations

__all__ = ["DASHBOARD_HTML"]

DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>corral</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  :root { --bg:#0f1419; --panel:#171d24; --line:#26303b; --text:#d7dde4; --dim:#7f8b97;
          --ok:#3fb950; --busy:#d29922; --warn:#f0883e; --bad:#f85149; --start:#58a6ff; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, sans-serif; background:var(--bg); color:var(--text); }
  header { padding:14px 22px; border-bottom:1px solid var(--line); display:flex; gap:18px;
           align-items:baseline; flex-wrap:wrap; }
  h1 { font-size:18px; margin:0; letter-spacing:.5px; }
  .muted { color:var(--dim); }
  main { padding:18px 22px; display:grid; gap:18px;
         grid-template-columns: minmax(0, 3fr) minmax(0, 1.2fr); }
  .side { display:grid; gap:18px; align-content:start; min-width:0; }
  @media (max-width: 1000px) { main { grid-template-columns: 1fr; } }
  .cards { display:flex; gap:12px; flex-wrap:wrap; }
  .card { background:var(--panel); border:1px solid var(--line); border-radius:8px;
          padding:8px 14px; min-width:110px; }
  .card b { display:block; font-size:20px; }
  section { background:var(--panel); border:1px solid var(--line); border-radius:8px;
            padding:12px 14px; overflow:auto; }
  h2 { font-size:14px; margin:0 0 8px; color:var(--dim); font-weight:600;
       text-transform:uppercase; letter-spacing:.6px; }
  table { width:100%; border-collapse:collapse; }
  th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line);
           white-space:nowrap; }
  th { color:var(--dim); font-weight:500; }
  .state { padding:1px 8px; border-radius:10px; font-size:12px; color:#0f1419; }
  .ready { background:var(--ok); } .busy { background:var(--busy); }
  .starting { background:var(--start); } .draining, .stopping { background:var(--warn); }
  .bar { position:relative; width:120px; height:10px; background:#0b0f13; border-radius:5px; }
  .bar i { position:absolute; left:0; top:0; bottom:0; border-radius:5px; background:var(--ok); }
  .bar i.high { background:var(--warn); } .bar i.over { background:var(--bad); }
  .bar s { position:absolute; top:-3px; bottom:-3px; width:2px; background:var(--bad); }
  ol, ul { list-style:none; margin:0; padding:0; }
  li { padding:5px 0; border-bottom:1px solid var(--line); overflow-wrap:anywhere; }
  .reason, time, .num { font-family:ui-monospace, monospace; }
  /* A tenant key as text, cut to one line: the full key is in its title (on hover). */
  .key { display:inline-block; max-width:18em; overflow:hidden; text-overflow:ellipsis;
         white-space:nowrap; vertical-align:bottom; }
  li .key { max-width:12em; }
  time { color:var(--dim); }
  .layer { display:flex; justify-content:space-between; gap:12px; }
  .layer .name { white-space:nowrap; } .layer .status { text-align:right; }
  .on { color:var(--ok); } .off { color:var(--dim); } .unavailable { color:var(--warn); }
  .bad { color:var(--bad); } .warn { color:var(--warn); } .ok { color:var(--ok); }
  #error { color:var(--bad); }
</style>
</head>
<body>
<header>
  <h1>corral</h1>
  <span class="muted" id="summary">loading...</span>
  <span id="error"></span>
</header>
<main>
  <div>
    <div class="cards" id="cards"></div>
    <section style="margin-top:14px">
      <h2>Workers</h2>
      <table>
        <thead><tr><th>tenant</th><th class="node-col" hidden>node</th><th>pid</th>
          <th>state</th><th>memory</th>
          <th>requests</th><th>in flight</th><th>age</th>
          <th title="since its last call ended; none while a call runs">idle</th></tr></thead>
        <tbody id="workers"></tbody>
      </table>
      <p class="muted" id="empty">No live workers. Call a tenant to start one:
        <code>curl -X POST localhost:8000/v1/tenants/alice/call/whoami</code></p>
    </section>
  </div>
  <div class="side">
    <section id="nodes-panel" hidden>
      <h2>Nodes</h2>
      <ul id="nodes"></ul>
    </section>
    <section>
      <h2>Sandbox</h2>
      <ul id="sandbox"></ul>
    </section>
    <section>
      <h2>Recent stops</h2>
      <ol id="stops"></ol>
    </section>
  </div>
</main>
<script>
"use strict";
// With --auth-token: the page is opened as /#token=TOKEN (see the module docstring).
const TOKEN = (() => {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem("corral-token", given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("corral-token");
})();
const FETCH = TOKEN ? { headers: { Authorization: "Bearer " + TOKEN } } : {};
const FAILURES = new Set(["crashed", "timeout", "protocol_error", "pipe_closed",
  "start_failed", "start_timeout", "memory_limit", "memory_hard_limit", "warden_died",
  "launch_failed"]);
function mib(bytes) { return bytes == null ? "-" : (bytes / 1048576).toFixed(1) + " MiB"; }
function age(seconds) {
  if (seconds < 60) return seconds.toFixed(0) + "s";
  if (seconds < 3600) return (seconds / 60).toFixed(0) + "m";
  return (seconds / 3600).toFixed(1) + "h";
}
function pad(n) { return String(n).padStart(2, "0"); }
function stamp(seconds) {  // local date and time, e.g. 2026-12-04 05:12:31
  const d = new Date(seconds * 1000);
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
    pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
}
function cell(row, text, cls) {
  const td = row.insertCell(); td.textContent = text; if (cls) td.className = cls; return td;
}
function key(tenant) {  // a tenant key: text, cut by CSS, in full on hover
  const span = document.createElement("span");
  span.className = "key"; span.textContent = tenant; span.title = tenant;
  return span;
}
function memoryCell(row, rss, limits) {
  const td = row.insertCell();
  const cap = limits.hard || limits.soft;
  const text = document.createElement("span");
  text.textContent = mib(rss) + (cap ? " / " + mib(cap) : "");
  if (cap && rss != null) {
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("i");
    const share = rss / cap;
    fill.style.width = Math.min(100, share * 100).toFixed(1) + "%";
    if (share > 1) fill.className = "over"; else if (share > 0.8) fill.className = "high";
    bar.appendChild(fill);
    if (limits.soft && limits.hard) {
      const mark = document.createElement("s");
      mark.style.left = Math.min(100, limits.soft / limits.hard * 100).toFixed(1) + "%";
      mark.title = "soft limit " + mib(limits.soft);
      bar.appendChild(mark);
    }
    td.appendChild(bar);
  }
  td.appendChild(text);
}
function shortNode(id) { return id ? id.slice(0, 8) : "?"; }
function renderWorkers(data) {
  const body = document.getElementById("workers");
  body.replaceChildren();
  const cluster = Array.isArray(data.nodes);  // a gateway over a Ray cluster
  for (const th of document.querySelectorAll("th.node-col")) th.hidden = !cluster;
  for (const w of data.workers) {
    const row = body.insertRow();
    row.className = "worker"; row.dataset.tenant = w.tenant; row.dataset.state = w.state;
    row.insertCell().appendChild(key(w.tenant));
    if (cluster) {
      const node = cell(row, (w.node_address || "?") + " " + shortNode(w.node), "num node");
      node.dataset.node = w.node || ""; node.title = "Ray node " + (w.node || "unknown");
    }
    // Under namespaces pid is corral's init and the kernel runs as its child.
    const pid = cell(row, w.pid == null ? "-" : String(w.pid), "num");
    if (w.kernel_pid != null && w.kernel_pid !== w.pid) {
      pid.textContent += " (kernel " + w.kernel_pid + ")";
      pid.title = "pid " + w.pid + ": corral's init in the worker's PID namespace; " +
        "the kernel runs as host pid " + w.kernel_pid;
    }
    const st = cell(row, ""); const tag = document.createElement("span");
    tag.className = "state " + w.state; tag.textContent = w.state; st.appendChild(tag);
    memoryCell(row, w.rss, data.limits);
    cell(row, String(w.requests), "num"); cell(row, String(w.in_flight), "num");
    cell(row, age(data.now - w.started_at), "age");
    // Idle time counts from the last completion, and only for a worker with nothing to do.
    const idle = w.state === "ready" && w.in_flight === 0;
    const td = cell(row, idle ? age(data.now - w.last_used) : "-", "idle");
    if (!idle) td.title = w.in_flight ? w.in_flight + " call(s) running" : w.state;
  }
  document.getElementById("empty").style.display = data.workers.length ? "none" : "";
  const stops = Object.entries(data.stops).sort((a, b) => b[1] - a[1]);
  const cards = [["live workers", data.workers.length + " / " + data.max_workers],
    ["started", data.starts], ["stopped", stops.reduce((n, [, c]) => n + c, 0)],
    ["in backoff", data.tenants_in_backoff],
    ["memory", data.memory_pressure ? "pressure" : "ok"]];
  if (cluster) {
    const up = data.nodes.filter(n => n.state === "up").length;
    cards.splice(1, 0, ["nodes up", up + " / " + data.nodes.length]);
  }
  for (const [reason, count] of stops.slice(0, 4)) cards.push(["stops: " + reason, count]);
  const box = document.getElementById("cards"); box.replaceChildren();
  for (const [label, value] of cards) {
    const card = document.createElement("div"); card.className = "card";
    const b = document.createElement("b"); b.textContent = String(value);
    card.appendChild(b); card.appendChild(document.createTextNode(label)); box.appendChild(card);
  }
  document.getElementById("summary").textContent = "state " + data.state +
    " | hard memory limit: " + data.memory_enforcement;
  renderSandbox(data.sandbox || {});
  renderNodes(cluster ? data.nodes : null);
}
function renderNodes(nodes) {  // ClusterStats.nodes: state, placed, workers, pressure, error
  document.getElementById("nodes-panel").hidden = !nodes;
  const list = document.getElementById("nodes");
  list.replaceChildren();
  for (const n of nodes || []) {
    const li = document.createElement("li"); li.className = "layer node"; li.dataset.node = n.node;
    const name = document.createElement("span"); name.className = "name num";
    name.textContent = n.address + " " + shortNode(n.node); name.title = "Ray node " + n.node;
    const text = document.createElement("span");
    const trouble = n.error || n.memory_pressure;
    text.className = "status " + (n.state !== "up" ? "bad" : trouble ? "warn" : "on");
    text.textContent = n.state + ", " + n.workers + " / " + n.max_workers + " workers" +
      (n.memory_pressure ? ", memory pressure: " + n.memory_pressure : "") +
      (n.error ? ", " + n.error : "");
    li.append(name, text); list.appendChild(li);
  }
}
function renderSandbox(layers) {  // layer -> LayerStatus: {state: on|off|unavailable, detail}
  const list = document.getElementById("sandbox");
  list.replaceChildren();
  for (const [layer, status] of Object.entries(layers)) {
    const li = document.createElement("li"); li.className = "layer"; li.dataset.layer = layer;
    const name = document.createElement("span"); name.className = "name";
    name.textContent = layer;
    const text = document.createElement("span");
    const detail = status.detail || "";
    text.className = "status " + status.state;
    text.textContent = status.state === "unavailable" ? "unavailable: " + detail :
      status.state + (detail ? " (" + detail + ")" : "");
    li.append(name, text); list.appendChild(li);
  }
}
function renderEvents(events) {
  const list = document.getElementById("stops");
  list.replaceChildren();
  const stops = events.filter(e => e.kind === "stopped" || e.kind === "backoff").reverse();
  for (const e of stops.slice(0, 40)) {
    const li = document.createElement("li"); li.className = "stop"; li.dataset.tenant = e.tenant;
    const when = document.createElement("time");
    when.dateTime = new Date(e.at * 1000).toISOString(); when.textContent = stamp(e.at);
    const reason = document.createElement("span"); reason.className = "reason " +
      (e.kind === "backoff" ? "warn" : FAILURES.has(e.reason) ? "bad" : "ok");
    reason.textContent = e.kind === "backoff"
      ? "backoff " + e.retry_after.toFixed(1) + "s (" + e.reason + ")" : e.reason;
    li.append(when, " ", key(e.tenant), " ", reason);
    if (e.node) li.append("  on " + (e.node_address || "?") + " " + shortNode(e.node));
    if (e.returncode != null && e.kind === "stopped") li.append("  rc " + e.returncode);
    list.appendChild(li);
  }
}
async function refresh() {
  try {
    const [w, e] = await Promise.all([fetch("/v1/workers", FETCH), fetch("/v1/events", FETCH)]);
    if (w.status === 401 || e.status === 401) {
      document.getElementById("error").textContent = TOKEN
        ? "the token this page was given is refused (401): open it again as /#token=TOKEN"
        : "this gateway needs its token (--auth-token): open this page as /#token=TOKEN";
      document.body.dataset.loaded = "401";
      return;
    }
    if (!w.ok || !e.ok) throw new Error("HTTP " + w.status + "/" + e.status);
    renderWorkers(await w.json()); renderEvents((await e.json()).events);
    document.getElementById("error").textContent = "";
    document.body.dataset.loaded = "1";
  } catch (err) {
    document.getElementById("error").textContent = "cannot reach the gateway: " + err.message;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
