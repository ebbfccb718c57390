// Cluster status page: polls /status/data (with this page's ?key= or ?token=) and fills the tables.
// Every value goes in with textContent: nothing from the server is parsed as HTML.

const POLL_MS = 5000;
const dataUrl = new URL("/status/data" + window.location.search, window.location.href);

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  const hours = Math.floor(seconds / 3600);
  return hours < 48 ? `${hours} h ${Math.floor((seconds % 3600) / 60)} min` : `${Math.floor(hours / 24)} d`;
}

function fmt(value) {
  if (value === null || value === undefined) return "…";
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

function cell(row, field, text, state) {
  const td = el("td", text, { "data-field": field });
  if (state) td.dataset.state = state;
  row.append(td);
}

function fillGateways(gateways) {
  const body = document.querySelector("#gateways tbody");
  body.replaceChildren();
  for (const g of gateways) {
    const row = el("tr", null, { "data-gateway": g.id });
    cell(row, "id", g.id);
    cell(row, "state", g.state, g.state);
    cell(row, "role", g.role);
    cell(row, "ami", g.ami, g.ami === "connected" ? "up" : "down");
    cell(row, "ami_peer", g.ami_peer);
    cell(row, "last_ami_event", g.last_ami_event_seconds === null ? "none yet" : `${ago(g.last_ami_event_seconds)} ago`);
    cell(row, "calls", g.calls_in_progress);
    cell(row, "outbox", g.outbox);
    cell(row, "uptime", ago(g.uptime_seconds));
    cell(row, "last_seen", `${ago(g.last_seen_seconds)} ago`);
    if (g.error) row.title = g.error;
    body.append(row);
  }
  if (!gateways.length) {
    const row = el("tr");
    row.append(el("td", "no gateway has registered", { colspan: "10" }));
    body.append(row);
  }
}

function fillNodes(nodes) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren();
  for (const n of nodes) {
    const row = el("tr", null, { "data-node": n.id });
    cell(row, "id", n.id);
    cell(row, "state", n.draining ? "draining" : n.state, n.draining ? "unhealthy" : n.state);
    cell(row, "ready", n.ready ? "yes" : "no", n.ready ? "up" : "down");
    cell(row, "agents", n.agents);
    cell(row, "lines", n.lines);
    cell(row, "broker", n.broker, n.broker === "connected" ? "up" : "down");
    cell(row, "uptime", ago(n.uptime_seconds));
    cell(row, "last_seen", `${ago(n.last_seen_seconds)} ago`);
    if (n.error) row.title = n.error;
    body.append(row);
  }
  if (!nodes.length) {
    const row = el("tr");
    row.append(el("td", "no node has registered", { colspan: "8" }));
    body.append(row);
  }
}

function fillRates(rates) {
  const body = document.querySelector("#rates tbody");
  body.replaceChildren();
  for (const r of rates) {
    const row = el("tr", null, { "data-counter": r.counter });
    // An error counter is highlighted only while it is rising.
    if (r.error && (r.per_minute["5m"] || 0) > 0) row.classList.add("error-row");
    cell(row, "label", r.label);
    cell(row, "counter", r.counter);
    for (const window of ["1m", "5m", "15m"]) cell(row, window, fmt(r.per_minute[window]));
    cell(row, "total", fmt(r.total));
    body.append(row);
  }
}

function fill(data) {
  document.getElementById("prefix").textContent = data.prefix;
  document.getElementById("served-by").textContent = data.served_by;
  const updated = document.getElementById("updated");
  updated.textContent = new Date(data.generated_at * 1000).toLocaleTimeString();
  updated.dateTime = new Date(data.generated_at * 1000).toISOString();
  for (const dd of document.querySelectorAll("[data-total]")) {
    const value = data.totals[dd.dataset.total];
    dd.textContent = value === undefined ? "0" : fmt(value);
  }
  const broker = document.getElementById("broker-state");
  broker.textContent = `${data.broker.state} (${data.broker.nodes_connected}/${data.broker.nodes} nodes)`;
  broker.dataset.state = data.broker.state === "connected" ? "up" : "down";
  const redis = document.getElementById("redis-state");
  redis.textContent = data.redis.state === "connected" ? `connected (ping ${data.redis.ping_ms} ms)`
    : `${data.redis.state}: ${data.redis.error}`;
  redis.dataset.state = data.redis.state === "connected" ? "up" : "down";
  const warnings = document.getElementById("warnings");
  warnings.replaceChildren(...data.warnings.map((w) => el("li", w)));
  fillGateways(data.gateways);
  fillNodes(data.nodes);
  fillRates(data.rates);
}

async function poll() {
  const state = document.getElementById("load-state");
  try {
    const response = await fetch(dataUrl, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) {
      state.dataset.state = "error";
      state.textContent = response.status === 401 || response.status === 403
        ? `Access refused (${response.status}): open this page with ?token=… or ?key=…`
        : `Status unavailable (HTTP ${response.status})`;
    } else {
      fill(await response.json());
      state.dataset.state = "ok";
      state.textContent = "Live";
    }
  } catch (error) {
    state.dataset.state = "error";
    state.textContent = `Node unreachable: ${error.message}`;
  }
  window.setTimeout(poll, POLL_MS);
}

poll();
