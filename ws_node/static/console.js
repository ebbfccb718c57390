// The agent console page: the line's calls, the buttons Creatio's panel has, and a live log of
// every frame. The protocol lives in creatio-channel.js; this file only keeps the page's view of
// the line and draws it. Server data is only ever put in the page as text (never as HTML).

import {
  CallState, CreatioChannel, Direction, ERROR_NAMES, Feature, LINE_PATTERN, MsgEventType, decodeContent, serializeCall, socketUrl,
} from "./creatio-channel.js";

const LOG_LIMIT = 300;
const RECENT_LIMIT = 10;
const ALERT_LIMIT = 3;
const ALERT_LIFETIME_MS = 30000;
const TARGET_PATTERN = /^[0-9A-Za-z+*#_]{1,64}$/;

const STATE_LABELS = {
  [CallState.NONE]: "Finished",
  [CallState.ALERTING]: "Ringing",
  [CallState.CONNECTED]: "Connected",
  [CallState.HOLDED]: "On hold",
  [CallState.CONFERENCED]: "Conference",
  [CallState.UNKNOWN]: "Unknown",
  [CallState.BUSY]: "Busy",
};
const STATE_KEYS = {
  [CallState.NONE]: "finished",
  [CallState.ALERTING]: "ringing",
  [CallState.CONNECTED]: "connected",
  [CallState.HOLDED]: "held",
  [CallState.CONFERENCED]: "conference",
  [CallState.UNKNOWN]: "unknown",
  [CallState.BUSY]: "busy",
};
// What the agent reads for each MsgErrorType (the log keeps the protocol names).
const ERROR_TITLES = {
  0: "Error", 1: "Library not loaded", 2: "Connection not opened", 3: "Command failed", 4: "Not supported",
  5: "Call centre not available", 6: "Not authorised", 7: "Call not saved", 8: "Event not handled",
  9: "Configuration error",
};
const TALKING_STATES = new Set([CallState.CONNECTED, CallState.HOLDED, CallState.CONFERENCED]);
const CALL_EVENTS = new Set([
  MsgEventType.RING_STARTED, MsgEventType.RING_FINISHED, MsgEventType.COMMUTATION_STARTED,
  MsgEventType.PUT_HOLD_ACTION, MsgEventType.END_HOLD_ACTION, MsgEventType.ABONENT_BUSY,
  MsgEventType.CALL_INFO_CHANGED, MsgEventType.CALL_SAVED_IN_DB,
]);

const $ = (id) => {
  const el = document.getElementById(id);
  if (el === null) throw new Error(`console.html has no #${id}`);
  return el;
};
const ui = {
  connectForm: $("connect-form"), lineInput: $("line-input"), keyInput: $("key-input"),
  connectButton: $("connect-button"), disconnectButton: $("disconnect-button"), status: $("connection-status"),
  alerts: $("alerts"),
  dialForm: $("dial-form"), numberInput: $("number-input"), callButton: $("call-button"),
  blindButton: $("blind-transfer-button"), consultButton: $("consult-button"),
  agentState: $("agent-state"), pauseReason: $("pause-reason"), pauseButton: $("pause-button"),
  unpauseButton: $("unpause-button"), dndButton: $("dnd-button"),
  consultBar: $("consult-bar"), completeButton: $("complete-transfer-button"), cancelButton: $("cancel-transfer-button"),
  calls: $("calls"), callsCount: $("calls-count"), noCalls: $("no-calls"),
  recent: $("recent"), noRecent: $("no-recent"),
  log: $("log"), rawToggle: $("raw-toggle"), clearLog: $("clear-log-button"), announcer: $("announcer"),
};

const query = new URLSearchParams(window.location.search);
// Creatio's SysMsgUserState codes are configuration on the nodes (AgentStateCodes); these are its defaults.
const codes = { ready: query.get("ready") || "Active", paused: query.get("paused") || "Paused" };

const view = {
  channel: null,
  line: "",
  /** call id -> {call, features, ringAt, answeredAt, approximate, el}; insertion order = oldest first */
  calls: new Map(),
  currentId: "",
  lineFeatures: 0,
  agent: "",
};

// ---- small DOM helpers ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) el.append(child);
  }
  return el;
}

function clock(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function duration(ms) {
  const total = Math.max(0, Math.floor(ms / 1000));
  const s = total % 60;
  const m = Math.floor(total / 60) % 60;
  const hours = Math.floor(total / 3600);
  return hours > 0 ? `${hours}:${String(m).padStart(2, "0")}:${String(s).padStart(2, "0")}` : `${m}:${String(s).padStart(2, "0")}`;
}

function shortId(id) {
  return typeof id === "string" && id.length > 8 ? id.slice(0, 8) : String(id ?? "");
}

function has(features, bit) {
  return (Number(features) & bit) === bit;
}

function featureNames(features) {
  const names = Object.entries(Feature).filter(([, bit]) => has(features, bit)).map(([name]) => name);
  return names.length ? names.join(" ") : "NOTHING";
}

// ---- alerts -----------------------------------------------------------------------------------

function alertUser(message, kind = "error") {
  // The same message again (a button clicked twice) bumps a counter instead of stacking up.
  for (const existing of ui.alerts.children) {
    if (existing.dataset.message === message) {
      const count = Number(existing.dataset.count) + 1;
      existing.dataset.count = String(count);
      existing.querySelector(".alert-count").textContent = `\u00d7${count}`;
      ui.alerts.prepend(existing);
      return;
    }
  }
  const item = h("div", { class: `alert ${kind}`, "data-message": message, "data-count": "1" },
    h("span", { class: "alert-text", text: message }),
    h("span", { class: "alert-count" }),
    h("button", { type: "button", class: "alert-close", "aria-label": "Dismiss", text: "\u00d7", onclick: () => item.remove() }));
  ui.alerts.prepend(item);
  while (ui.alerts.children.length > ALERT_LIMIT) ui.alerts.lastElementChild.remove();
  setTimeout(() => item.remove(), ALERT_LIFETIME_MS);
}

// ---- event log --------------------------------------------------------------------------------

function logLine(direction, name, summary, raw = "", kind = "") {
  const arrow = { in: "\u2190", out: "\u2192", local: "\u2022" }[direction];
  const spoken = { in: "received", out: "sent", local: "note" }[direction];
  const item = h("li", { class: `log-${direction}${kind ? ` log-${kind}` : ""}`, "data-name": name },
    h("time", { text: clock(Date.now()) }),
    h("span", { class: "arrow", "aria-hidden": "true", text: arrow }),
    h("span", { class: "visually-hidden", text: `${spoken} ` }),
    h("span", { class: "ev", text: name }),
    h("span", { class: "sum", text: summary }),
    raw ? h("code", { class: "raw", text: raw.length > 4000 ? `${raw.slice(0, 4000)}\u2026` : raw }) : null);
  ui.log.prepend(item);
  while (ui.log.children.length > LOG_LIMIT) ui.log.lastElementChild.remove();
}

function callSummary(call) {
  if (!call || typeof call !== "object") return "";
  const state = STATE_LABELS[call.state] ?? `state ${call.state}`;
  return `${state} ${call.callerId || "?"} \u2192 ${call.calledId || "?"} [${shortId(call.id)}]`;
}

function summarize(message) {
  const { type, content } = message;
  if (CALL_EVENTS.has(type)) return callSummary(content);
  switch (type) {
    case MsgEventType.LIBRARY_INITIALIZED:
      return `library ${shortId(content)}`;
    case MsgEventType.CONNECTION_CREATED:
      return `connection ${shortId(message.envelope.connectionUId)}`;
    case MsgEventType.ERROR:
      return content && typeof content === "object"
        ? `${ERROR_NAMES[content.errorType] ?? content.errorType}: ${content.data ?? ""}`
        : String(content);
    case MsgEventType.ACTIVE_CALL_SNAPSHOT: {
      const calls = (content && content.ActiveCalls) || [];
      return `${calls.length} active call${calls.length === 1 ? "" : "s"}`;
    }
    case MsgEventType.LINE_STATE_CHANGED:
      return content && typeof content === "object"
        ? `${featureNames(content.callFeaturesSet)}${content.callId ? ` [${shortId(content.callId)}]` : " (line)"}`
        : String(content);
    case MsgEventType.AGENT_STATE_CHANGED:
    case MsgEventType.DTMF_ENTERED:
    case MsgEventType.DISCONNECTED:
      return String(content);
    default:
      return typeof content === "string" ? content.slice(0, 120) : "";
  }
}

function commandSummary(body) {
  const parts = [];
  const params = body.parameters || {};
  if (params.targetAddress) parts.push(`to ${params.targetAddress}`);
  if (params.code) parts.push(`code ${params.code}`);
  if (params.connectionParams) parts.push(`line ${view.line}`);
  if (body.commandExecutorId) parts.push(`[${shortId(body.commandExecutorId)}]`);
  return parts.join(" ");
}

// ---- the line's calls -------------------------------------------------------------------------

function parseContext(call) {
  if (!call || typeof call.callContext !== "string" || !call.callContext) return {};
  const ctx = decodeContent(call.callContext);
  return ctx && typeof ctx === "object" ? ctx : {};
}

function asCall(content) {
  const call = decodeContent(content);
  return call && typeof call === "object" && typeof call.id === "string" && call.id ? call : null;
}

function upsertCall(call, { fromSnapshot = false, answered = false } = {}) {
  const now = Date.now();
  let entry = view.calls.get(call.id);
  if (entry === undefined) {
    entry = { call, features: 0, ringAt: now, answeredAt: 0, approximate: fromSnapshot, el: null };
    view.calls.set(call.id, entry);
  } else {
    entry.call = { ...entry.call, ...call };
  }
  if (typeof call.callFeaturesSet === "number") entry.features = call.callFeaturesSet;
  if (!entry.answeredAt && (answered || TALKING_STATES.has(entry.call.state))) entry.answeredAt = now;
  if (!view.currentId || !view.calls.has(view.currentId)) view.currentId = call.id;
  // As the client does: the current call's features are the line's features.
  if (call.id === view.currentId) view.lineFeatures = entry.features;
  return entry;
}

/** Tell screen reader users about what changes the agent's next move (a ring, an answer, an end). */
function announce(text) {
  ui.announcer.textContent = text;
}

function finishCall(call, note = "") {
  const entry = view.calls.get(call.id);
  const merged = entry ? { ...entry.call, ...call } : call;
  view.calls.delete(call.id);
  if (entry && entry.el) entry.el.remove();
  if (view.currentId === call.id) view.currentId = view.calls.keys().next().value ?? "";
  const now = Date.now();
  const ringAt = entry ? entry.ringAt : now;
  const answeredAt = entry ? entry.answeredAt : 0;
  addRecent(merged, { ringAt, answeredAt, endedAt: now, approximate: entry ? entry.approximate : true, note });
}

function addRecent(call, times) {
  const ctx = parseContext(call);
  const incoming = call.direction !== Direction.OUT;
  const other = incoming ? call.callerId : call.calledId;
  const otherName = incoming ? ctx.callerName : ctx.calledName;
  const rang = duration((times.answeredAt || times.endedAt) - times.ringAt);
  const talked = times.answeredAt ? duration(times.endedAt - times.answeredAt) : "";
  const approx = times.approximate ? "\u2265" : "";
  const bits = [
    `${incoming ? "from" : "to"} ${other || "?"}${otherName ? ` (${otherName})` : ""}`,
    `rang ${approx}${rang}`,
    talked ? `talked ${approx}${talked}` : "not answered",
  ];
  if (ctx.queue) bits.push(`queue ${ctx.queue}`);
  if (ctx.hangupCause) bits.push(ctx.hangupCause);
  if (times.note) bits.push(times.note);
  const item = h("li", { class: "recent-item", "data-call-id": call.id },
    h("time", { text: clock(times.endedAt).slice(0, 8) }),
    h("span", { class: `dir ${incoming ? "in" : "out"}`, text: incoming ? "In" : "Out" }),
    h("span", { class: "recent-text", text: bits.join(" \u00b7 ") }));
  ui.recent.prepend(item);
  while (ui.recent.children.length > RECENT_LIMIT) ui.recent.lastElementChild.remove();
}

function applySnapshot(content) {
  const list = content && Array.isArray(content.ActiveCalls) ? content.ActiveCalls : [];
  const seen = new Set();
  for (const raw of list) {
    const call = asCall(raw);
    if (call === null) continue;
    seen.add(call.id);
    upsertCall(call, { fromSnapshot: true });
  }
  for (const [id, entry] of [...view.calls]) {
    if (!seen.has(id)) finishCall(entry.call, "ended while away");
  }
  const current = content ? asCall(content.CurrentCall) : null;
  view.currentId = current && view.calls.has(current.id) ? current.id : (view.calls.keys().next().value ?? "");
  if (view.calls.size === 0) view.lineFeatures = Feature.DIAL;
}

function onMessage(message) {
  const { type, content } = message;
  switch (type) {
    case MsgEventType.RING_STARTED:
    case MsgEventType.COMMUTATION_STARTED:
    case MsgEventType.PUT_HOLD_ACTION:
    case MsgEventType.END_HOLD_ACTION:
    case MsgEventType.ABONENT_BUSY:
    case MsgEventType.CALL_INFO_CHANGED:
    case MsgEventType.CALL_SAVED_IN_DB: {
      const call = asCall(content);
      if (call === null) break;
      if (type === MsgEventType.ABONENT_BUSY) call.state = CallState.BUSY;
      const known = view.calls.has(call.id);
      upsertCall(call, { answered: type === MsgEventType.COMMUTATION_STARTED });
      const party = call.direction === Direction.OUT ? call.calledId : call.callerId;
      if (!known && call.state === CallState.ALERTING) {
        announce(`${call.direction === Direction.OUT ? "Calling" : "Incoming call from"} ${party || "unknown number"}`);
      } else if (type === MsgEventType.COMMUTATION_STARTED) {
        announce(`Connected with ${party || "unknown number"}`);
      }
      break;
    }
    case MsgEventType.RING_FINISHED: {
      const call = asCall(content);
      if (call !== null) {
        finishCall(call);
        announce(`Call with ${(call.direction === Direction.OUT ? call.calledId : call.callerId) || "unknown number"} ended`);
      }
      break;
    }
    case MsgEventType.ACTIVE_CALL_SNAPSHOT:
      applySnapshot(content);
      break;
    case MsgEventType.LINE_STATE_CHANGED:
      if (content && typeof content === "object" && typeof content.callFeaturesSet === "number") {
        const entry = content.callId ? view.calls.get(content.callId) : undefined;
        if (entry) entry.features = content.callFeaturesSet;
        if (!content.callId || content.callId === view.currentId) view.lineFeatures = content.callFeaturesSet;
      }
      break;
    case MsgEventType.AGENT_STATE_CHANGED:
      view.agent = typeof content === "string" ? content : JSON.stringify(content);
      break;
    case MsgEventType.DISCONNECTED:
      // As the client does: the server no longer vouches for any call; the next snapshot brings them back.
      for (const entry of view.calls.values()) if (entry.el) entry.el.remove();
      view.calls.clear();
      view.currentId = "";
      view.lineFeatures = 0;
      break;
    case MsgEventType.ERROR: {
      const text = content && typeof content === "object"
        ? `${ERROR_TITLES[content.errorType] ?? `Error ${content.errorType}`}: ${content.data || "no details"}`
        : `Server error: ${String(content)}`;
      alertUser(text);
      break;
    }
    case MsgEventType.DTMF_ENTERED:
      alertUser(`DTMF entered: ${String(content)}`, "info");
      break;
    default:
      break;
  }
  render();
}

// ---- drawing ----------------------------------------------------------------------------------

function callCard(entry) {
  const id = entry.call.id;
  const el = h("li", { class: "call", "data-call-id": id },
    h("div", { class: "call-head" },
      h("span", { class: "badge", "data-part": "state" }),
      h("span", { class: "dir", "data-part": "direction" }),
      h("span", { class: "queue", "data-part": "queue" })),
    h("h3", { class: "party" },
      h("span", { class: "number", "data-part": "number" }),
      h("span", { class: "name", "data-part": "name" })),
    h("p", { class: "route", "data-part": "route" }),
    h("dl", { class: "timers" },
      h("div", {}, h("dt", { text: "Since ring" }), h("dd", { "data-part": "ring-timer", text: "0:00" })),
      h("div", {}, h("dt", { text: "Since answer" }), h("dd", { "data-part": "talk-timer", text: "\u2014" }))),
    h("div", { class: "actions", role: "group", "aria-label": "Call actions" },
      h("button", { type: "button", class: "btn primary", "data-action": "answer", text: "Answer",
        onclick: () => callCommand("AnswerCall", id) }),
      h("button", { type: "button", class: "btn", "data-action": "hold", text: "Hold",
        onclick: () => callCommand("HoldCall", id) }),
      h("button", { type: "button", class: "btn danger", "data-action": "drop", text: "Hang up",
        onclick: () => callCommand("DropCall", id) })));
  return el;
}

function part(el, name) {
  return el.querySelector(`[data-part="${name}"]`);
}

function updateCard(entry) {
  const { call, features } = entry;
  const el = entry.el;
  const ctx = parseContext(call);
  const incoming = call.direction !== Direction.OUT;
  const stateKey = STATE_KEYS[call.state] ?? "unknown";
  el.dataset.state = stateKey;
  el.classList.toggle("current", call.id === view.currentId && view.calls.size > 1);
  part(el, "state").textContent = STATE_LABELS[call.state] ?? `State ${call.state}`;
  part(el, "direction").textContent = call.direction === Direction.IN ? "Incoming"
    : call.direction === Direction.OUT ? "Outgoing" : "Call";
  part(el, "queue").textContent = ctx.queue ? `Queue ${ctx.queue}` : "";
  part(el, "number").textContent = (incoming ? call.callerId : call.calledId) || "unknown number";
  part(el, "name").textContent = (incoming ? ctx.callerName : ctx.calledName) || "";
  const route = `from ${call.callerId || "?"} to ${call.calledId || "?"}`;
  part(el, "route").textContent = call.redirectingId ? `${route} \u00b7 redirected by ${call.redirectingId}` : route;
  const answer = el.querySelector('[data-action="answer"]');
  answer.hidden = !has(features, Feature.ANSWER);
  const hold = el.querySelector('[data-action="hold"]');
  const canUnhold = has(features, Feature.UNHOLD);
  hold.textContent = canUnhold ? "Resume" : "Hold";
  hold.disabled = !(canUnhold || has(features, Feature.HOLD));
  el.querySelector('[data-action="drop"]').disabled = !has(features, Feature.DROP);
  updateTimers(entry);
}

function updateTimers(entry) {
  const now = Date.now();
  const approx = entry.approximate ? "\u2265" : "";
  part(entry.el, "ring-timer").textContent = approx + duration(now - entry.ringAt);
  part(entry.el, "talk-timer").textContent = entry.answeredAt ? approx + duration(now - entry.answeredAt) : "\u2014";
}

function render() {
  const open = view.channel !== null && view.channel.isOpen;
  let previous = null;
  for (const entry of view.calls.values()) {
    if (entry.el === null) entry.el = callCard(entry);
    // Keep DOM order = call order without recreating cards (buttons keep their focus).
    const expected = previous ? previous.nextElementSibling : ui.calls.firstElementChild;
    if (expected !== entry.el) ui.calls.insertBefore(entry.el, expected);
    updateCard(entry);
    entry.el.querySelectorAll("button").forEach((b) => { if (!open) b.disabled = true; });
    previous = entry.el;
  }
  ui.callsCount.textContent = String(view.calls.size);
  ui.noCalls.hidden = view.calls.size > 0;
  ui.noRecent.hidden = ui.recent.children.length > 0;

  const current = view.calls.get(view.currentId);
  const consult = consultPair();
  ui.callButton.disabled = !open || !(view.calls.size === 0 || has(view.lineFeatures, Feature.DIAL));
  ui.blindButton.disabled = !open || !current || !has(current.features, Feature.BLIND_TRANSFER);
  ui.consultButton.disabled = !open || !current || !has(current.features, Feature.MAKE_CONSULT_CALL);
  ui.consultBar.hidden = consult === null;
  ui.completeButton.disabled = !open || consult === null
    || !(has(consult.main.features, Feature.COMPLETE_TRANSFER) || has(consult.other.features, Feature.COMPLETE_TRANSFER));
  ui.cancelButton.disabled = !open || consult === null;
  for (const b of [ui.pauseButton, ui.unpauseButton, ui.dndButton]) b.disabled = !open;
  ui.agentState.textContent = view.agent || "unknown";
  ui.agentState.dataset.state = !view.agent ? "unknown"
    : view.agent === codes.paused ? "paused" : view.agent === codes.ready ? "ready" : "other";

  const ringing = [...view.calls.values()].filter((e) => e.call.state === CallState.ALERTING).length;
  document.title = view.line
    ? `${ringing ? `(${ringing} ringing) ` : ""}Line ${view.line} \u00b7 Agent console`
    : "Agent console";
}

function consultPair() {
  if (view.calls.size < 2) return null;
  const main = view.calls.get(view.currentId) ?? view.calls.values().next().value;
  const other = [...view.calls.values()].find((e) => e !== main);
  return other ? { main, other } : null;
}

// ---- commands ---------------------------------------------------------------------------------

function send(command, options) {
  const channel = view.channel;
  if (channel === null || !channel.isOpen || !channel.send(command, options)) {
    alertUser(`${command} not sent: not connected`);
    return false;
  }
  return true;
}

function callCommand(command, callId) {
  const entry = view.calls.get(callId);
  if (!entry) {
    alertUser(`${command}: that call is gone`);
    return;
  }
  send(command, { executor: entry.call });
}

/** The number field, cleaned as the nodes clean it, or "" after telling the user what is wrong. */
function targetNumber() {
  const cleaned = ui.numberInput.value.replace(/[\s().-]/g, "");
  const ok = TARGET_PATTERN.test(cleaned);
  ui.numberInput.setAttribute("aria-invalid", ok ? "false" : "true");
  if (!ok) {
    alertUser(cleaned ? "That is not a number the PBX can dial" : "Enter a number first");
    ui.numberInput.focus();
    return "";
  }
  return cleaned;
}

function onDial(event) {
  event.preventDefault();
  if (ui.callButton.disabled) return;
  const number = targetNumber();
  if (number) send("MakeCall", { parameters: { targetAddress: number } });
}

function onTransfer(command) {
  const entry = view.calls.get(view.currentId);
  const number = entry ? targetNumber() : "";
  if (entry && number) send(command, { executor: entry.call, parameters: { targetAddress: number } });
}

function onCompleteTransfer() {
  const pair = consultPair();
  if (pair === null) return;
  send("TransferCall", {
    executor: pair.main.call,
    parameters: { consultationCall: JSON.stringify(serializeCall(pair.other.call)) },
  });
}

function onCancelTransfer() {
  const pair = consultPair();
  if (pair === null) return;
  send("CancelTransfer", {
    parameters: {
      currentCall: JSON.stringify(serializeCall(pair.main.call)),
      consultCall: JSON.stringify(serializeCall(pair.other.call)),
    },
  });
}


// ---- connection -------------------------------------------------------------------------------

function describeStatus(detail) {
  switch (detail.state) {
    case "connecting": return "Connecting\u2026";
    case "handshake": return `Signing in line ${view.line}\u2026`;
    case "open": return `Connected \u00b7 line ${view.line}`;
    case "waiting": {
      const seconds = Math.max(0, Math.ceil((detail.retryAt - Date.now()) / 1000));
      return `Reconnecting in ${seconds} s (attempt ${detail.attempt})`;
    }
    case "failed": return "Connection failed";
    default: return "Not connected";
  }
}

let lastStatus = { state: "idle", reason: "", attempt: 0, retryAt: 0 };

function showStatus(detail) {
  lastStatus = detail;
  ui.status.dataset.state = detail.state;
  ui.status.textContent = describeStatus(detail);
  ui.status.title = detail.reason || "";
  const active = detail.state !== "idle" && detail.state !== "stopped" && detail.state !== "failed";
  ui.disconnectButton.disabled = !active;
  ui.connectButton.textContent = detail.state === "waiting" ? "Retry now" : "Connect";
}

function connect(line, key) {
  disconnect(false);
  view.line = line;
  const channel = new CreatioChannel({ url: socketUrl(window.location.href, key), line });
  view.channel = channel;
  channel.addEventListener("status", (event) => {
    if (view.channel !== channel) return;
    const detail = event.detail;
    showStatus(detail);
    if (detail.state === "waiting" || detail.state === "failed") {
      logLine("local", detail.state === "waiting" ? "RECONNECT" : "FAILED", `${detail.reason}; ${describeStatus(detail)}`, "", "error");
      if (detail.state === "failed") alertUser(`Connection failed: ${detail.reason}`);
    } else if (detail.state === "connecting") {
      logLine("local", "CONNECTING", `line ${line}`);
    }
    render();
  });
  channel.addEventListener("frame", (event) => {
    if (view.channel !== channel) return;
    const d = event.detail;
    if (d.direction === "out") logLine("out", d.command, commandSummary(d.body), d.text);
    else if (d.invalid) logLine("in", "INVALID", d.invalid, d.text, "error");
    else logLine("in", d.name, summarize(d), d.text, d.type === MsgEventType.ERROR ? "error" : "");
  });
  channel.addEventListener("message", (event) => {
    if (view.channel === channel) onMessage(event.detail);
  });
  channel.start();
}

function disconnect(userAsked = true) {
  const channel = view.channel;
  if (channel === null) return;
  channel.stop();
  view.channel = null;
  for (const entry of view.calls.values()) if (entry.el) entry.el.remove();
  view.calls.clear();
  view.currentId = "";
  view.agent = "";
  if (userAsked) {
    showStatus({ state: "stopped", reason: "", attempt: 0, retryAt: 0 });
    logLine("local", "DISCONNECTED", "by you");
  }
  render();
}

function onConnectSubmit(event) {
  event.preventDefault();
  const line = ui.lineInput.value.trim();
  const key = ui.keyInput.value;
  if (!LINE_PATTERN.test(line)) {
    ui.lineInput.setAttribute("aria-invalid", "true");
    alertUser("Enter the line (extension) to watch: letters, digits, '-' or '_', up to 32");
    ui.lineInput.focus();
    return;
  }
  ui.lineInput.setAttribute("aria-invalid", "false");
  if (view.channel !== null && view.channel.line === line && view.channel.state === "waiting") {
    view.channel.retryNow();
    return;
  }
  // Keep the line in the address bar (bookmarkable); a key typed in the form stays out of it.
  const params = new URLSearchParams(window.location.search);
  params.set("line", line);
  if (params.get("key") !== key) params.delete("key");
  window.history.replaceState(null, "", `${window.location.pathname}?${params}`);
  connect(line, key);
}

// ---- wiring -----------------------------------------------------------------------------------

ui.connectForm.addEventListener("submit", onConnectSubmit);
ui.disconnectButton.addEventListener("click", () => disconnect(true));
ui.dialForm.addEventListener("submit", onDial);
ui.blindButton.addEventListener("click", () => onTransfer("BlindTransferCall"));
ui.consultButton.addEventListener("click", () => onTransfer("MakeConsultCall"));
ui.completeButton.addEventListener("click", onCompleteTransfer);
ui.cancelButton.addEventListener("click", onCancelTransfer);
ui.pauseButton.addEventListener("click", () => send("SetMsgUserState", {
  parameters: { code: codes.paused, reason: ui.pauseReason.value.trim() },
}));
ui.unpauseButton.addEventListener("click", () => send("SetMsgUserState", { parameters: { code: codes.ready, reason: "" } }));
ui.dndButton.addEventListener("click", () => send("SetDnd"));
ui.rawToggle.addEventListener("change", () => ui.log.classList.toggle("show-raw", ui.rawToggle.checked));
ui.clearLog.addEventListener("click", () => ui.log.replaceChildren());
ui.numberInput.addEventListener("input", () => ui.numberInput.removeAttribute("aria-invalid"));

setInterval(() => {
  for (const entry of view.calls.values()) if (entry.el) updateTimers(entry);
  if (lastStatus.state === "waiting") ui.status.textContent = describeStatus(lastStatus);
}, 1000);

const initialLine = (query.get("line") || "").trim();
ui.lineInput.value = initialLine;
ui.keyInput.value = query.get("key") || "";
render();
if (initialLine) {
  if (LINE_PATTERN.test(initialLine)) connect(initialLine, ui.keyInput.value);
  else alertUser(`"${initialLine.slice(0, 40)}" is not a line name`);
} else {
  ui.lineInput.focus();
}
