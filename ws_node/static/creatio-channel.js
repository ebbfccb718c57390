// The Creatio messaging protocol over a raw WebSocket, spoken the way Creatio's own browser
// client (Terrasoft.MsgServiceCtiProvider + Terrasoft.WebSocketChannel) speaks it, so the console
// exercises exactly what a CRM agent's panel does. docs/creatio-protocol.md has the wire details.
//
// Theory of operation: one CreatioChannel per line. start() opens the socket and runs the
// client's handshake (LoadLibrary -> LIBRARY_INITIALIZED -> OpenConnection -> CONNECTION_CREATED
// -> QueryActiveCallSnapshot). Every LIBRARY_INITIALIZED is answered with OpenConnection and every
// CONNECTION_CREATED with a snapshot query, as the client does. When the socket drops (or the
// server sends ERROR 2/5 or DISCONNECTED without ignoreTryReconnection) it waits 5 s, then longer,
// and starts again; the snapshot after the reconnect replaces whatever the page showed. No DOM here:
// the page listens to the "status", "frame" and "message" events.

export const MsgEventType = Object.freeze({
  NONE: 0, LIBRARY_INITIALIZED: 1, CONNECTION_CREATED: 2, ERROR: 3, COMMAND_INFO: 4, RING_STARTED: 5,
  RING_FINISHED: 6, COMMUTATION_STARTED: 7, PUT_HOLD_ACTION: 8, END_HOLD_ACTION: 9, ACTIVE_CALL_SNAPSHOT: 10,
  LINE_STATE_CHANGED: 11, AGENT_STATE_CHANGED: 12, ABONENT_BUSY: 13, DISCONNECTED: 14, CALL_SAVED_IN_DB: 15,
  RAW_DATA: 16, CALL_INFO_CHANGED: 17, DTMF_ENTERED: 18,
});
export const EVENT_NAMES = Object.freeze(Object.fromEntries(Object.entries(MsgEventType).map(([k, v]) => [v, k])));

export const MsgErrorType = Object.freeze({
  GENERAL_ERROR: 0, LOAD_LIBRARY_ERROR: 1, OPEN_CONNECTION_ERROR: 2, COMMAND_ERROR: 3,
  COMMAND_NOT_IMPLEMENTED_ERROR: 4, CALL_CENTRE_NOT_AVAILABLE_ERROR: 5, AUTHENTICATION_ERROR: 6,
  CALL_SAVING_ERROR: 7, EVENT_HANDLER_ERROR: 8, CONNECTION_CONFIG_ERROR: 9,
});
export const ERROR_NAMES = Object.freeze(Object.fromEntries(Object.entries(MsgErrorType).map(([k, v]) => [v, k])));

/** Terrasoft.GeneralizedCallState */
export const CallState = Object.freeze({
  NONE: 0, ALERTING: 1, CONNECTED: 2, HOLDED: 3, CONFERENCED: 4, UNKNOWN: 5, BUSY: 6,
});

/** Terrasoft.CallFeaturesSet (bitmask) */
export const Feature = Object.freeze({
  RECALL: 0x1, DIAL: 0x2, ANSWER: 0x4, DROP: 0x8, HOLD: 0x10, UNHOLD: 0x20, SETUP_TRANSFER: 0x40,
  COMPLETE_TRANSFER: 0x80, BLIND_TRANSFER: 0x100, MAKE_CONSULT_CALL: 0x200, DTMF: 0x400, VIDEO: 0x800,
  MUTE: 0x1000, CANCEL_COMPLETE_TRANSFER: 0x2000,
});

/** Terrasoft.CallDirection: GUID strings. */
export const Direction = Object.freeze({
  UNKNOWN: "c072be2c-3d82-4468-9d4a-6db47d1f4cca",
  OUT: "53f71b5f-7e17-4cf5-bf14-6a59212db422",
  IN: "1d96a65f-2131-4916-8825-2d142b1000b2",
});

export const EXECUTOR_TYPE_CALL = "Terrasoft.Messaging.Common.Call, Terrasoft.Messaging.Common";

/** Line names the nodes accept in connectionParams.ExtensionName. */
export const LINE_PATTERN = /^[A-Za-z0-9_-]{1,32}$/;

// The properties Terrasoft.Telephony.Call.serialize() writes, in its order.
const SERIALIZED_CALL_FIELDS = [
  "id", "databaseUId", "userContactUId", "deviceId", "callerId", "calledId", "direction", "callContext",
  "callContextType", "state", "redirectingId", "redirectionId",
];

const FIRST_RETRY_MS = 5000;
const LONGEST_RETRY_MS = 185000;
const MAX_ATTEMPTS = 200;

/** A call as the client serialises it into commandExecutor: only the non-empty fields (0 is kept). */
export function serializeCall(call) {
  const out = {};
  for (const key of SERIALIZED_CALL_FIELDS) {
    const value = call[key];
    if (value !== undefined && value !== null && value !== "") out[key] = value;
  }
  return out;
}

/** Terrasoft.decode: JSON.parse for a string, the value itself otherwise. */
export function decodeContent(content) {
  if (typeof content !== "string") return content;
  try {
    return JSON.parse(content);
  } catch {
    return content;
  }
}

/** ws(s)://<this page's host and folder>/[?key=...]: the nodes serve the WebSocket at "/" beside /console. */
export function socketUrl(pageHref, key) {
  const url = new URL("./", pageHref);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  if (key) url.searchParams.set("key", key);
  return url.href;
}

/** Delay before reconnect attempt n (1-based): 5 s, doubling up to about 185 s, +-10 % jitter. */
export function reconnectDelayMs(attempt, random = Math.random) {
  const base = Math.min(FIRST_RETRY_MS * 2 ** Math.max(0, attempt - 1), LONGEST_RETRY_MS);
  return Math.round(base * (0.9 + 0.2 * random()));
}

export class CreatioChannel extends EventTarget {
  /**
   * @param {{url: string, line: string, libraryName?: string}} options
   *   url: the WebSocket URL (key included); line: the agent's line (ExtensionName).
   */
  constructor({ url, line, libraryName = "Asterisk" }) {
    super();
    this.url = url;
    this.line = line;
    this.libraryName = libraryName;
    this.libraryInstanceUId = "";
    this.connectionUId = "";
    this.state = "idle";
    this.attempt = 0;
    this.retryAt = 0;
    this._ws = null;
    this._timer = 0;
    this._stopped = true;
  }

  get isOpen() {
    return this.state === "open" && this._ws !== null && this._ws.readyState === WebSocket.OPEN;
  }

  start() {
    this._stopped = false;
    this.attempt = 0;
    this._connect();
  }

  /** Log off as Creatio does (CloseConnection, then close the socket); no reconnect. */
  stop() {
    this._stopped = true;
    clearTimeout(this._timer);
    const ws = this._ws;
    if (ws !== null && ws.readyState === WebSocket.OPEN && this.connectionUId) this.send("CloseConnection");
    this._ws = null;
    if (ws !== null && ws.readyState <= WebSocket.OPEN) ws.close(1000, "agent logged off");
    this.connectionUId = "";
    this._setState("stopped");
  }

  /** Skip the rest of the wait and reconnect now. */
  retryNow() {
    if (this.state !== "waiting") return;
    clearTimeout(this._timer);
    this._connect();
  }

  /**
   * Send one command in MsgCommandInfo form. `executor` is the call a call command acts on.
   * Returns false when the socket is not open (Creatio's client refuses to post then, too).
   */
  send(command, { parameters, executor } = {}) {
    const ws = this._ws;
    if (ws === null || ws.readyState !== WebSocket.OPEN) return false;
    const body = {
      commandUId: "",
      command,
      libraryInstanceUId: this.libraryInstanceUId,
      connectionUId: this.connectionUId,
      commandExecutorId: executor ? executor.id : "",
      commandExecutorType: executor ? EXECUTOR_TYPE_CALL : "",
    };
    if (executor) body.commandExecutor = JSON.stringify(serializeCall(executor));
    if (parameters && Object.keys(parameters).length > 0) body.parameters = parameters;
    const text = JSON.stringify(body);
    ws.send(text);
    this._emit("frame", { direction: "out", command, body, text });
    return true;
  }

  // ---- internals --------------------------------------------------------------------------------

  _connect() {
    clearTimeout(this._timer);
    this.connectionUId = "";
    this._setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (error) {
      // A malformed URL: nothing a retry can fix.
      this._stopped = true;
      this._setState("failed", String(error && error.message ? error.message : error));
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.addEventListener("open", () => {
      if (this._ws !== ws) return;
      opened = true;
      this._setState("handshake");
      this.send("LoadLibrary", { parameters: { AssemblyName: this.libraryName } });
    });
    ws.addEventListener("message", (event) => {
      if (this._ws === ws) this._received(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this.connectionUId = "";
      if (this._stopped) {
        this._setState("stopped");
        return;
      }
      const why = opened
        ? `connection closed (code ${event.code}${event.reason ? `: ${event.reason}` : ""})`
        : "could not connect (server down, wrong address or wrong key)";
      this._scheduleReconnect(why);
    });
  }

  _scheduleReconnect(reason) {
    this.attempt += 1;
    if (this.attempt > MAX_ATTEMPTS) {
      this._stopped = true;
      this._setState("failed", `${reason}; gave up after ${MAX_ATTEMPTS} attempts`);
      return;
    }
    const delay = reconnectDelayMs(this.attempt);
    this.retryAt = Date.now() + delay;
    this._setState("waiting", reason);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  /** Close the socket and go through the reconnect timer, as the client does on ERROR 2/5. */
  _restart(reason) {
    const ws = this._ws;
    if (ws === null) return;
    this._ws = null;
    this.connectionUId = "";
    ws.close(1000, "reconnecting");
    this._scheduleReconnect(reason);
  }

  _received(text) {
    let envelope;
    try {
      envelope = JSON.parse(text);
    } catch {
      this._emit("frame", { direction: "in", text, invalid: "not JSON" });
      return;
    }
    if (envelope === null || typeof envelope !== "object" || typeof envelope.eventType !== "number") {
      // The client ignores frames whose eventType is not a number.
      this._emit("frame", { direction: "in", text, invalid: "no numeric eventType" });
      return;
    }
    const type = envelope.eventType;
    // LIBRARY_INITIALIZED content is used raw; everything else goes through Terrasoft.decode.
    const content = type === MsgEventType.LIBRARY_INITIALIZED ? envelope.content : decodeContent(envelope.content);
    const message = { type, name: EVENT_NAMES[type] || `EVENT_${type}`, content, envelope, text };
    this._emit("frame", { direction: "in", ...message });

    switch (type) {
      case MsgEventType.LIBRARY_INITIALIZED:
        this.libraryInstanceUId = typeof envelope.content === "string" ? envelope.content : "";
        this.send("OpenConnection", {
          parameters: { connectionParams: JSON.stringify({ ExtensionName: this.line }) },
        });
        break;
      case MsgEventType.CONNECTION_CREATED:
        this.connectionUId = typeof envelope.connectionUId === "string" ? envelope.connectionUId : "";
        this.attempt = 0;
        this._setState("open");
        this.send("QueryActiveCallSnapshot");
        this.send("QueryMsgUserState");
        break;
      default:
        break;
    }
    this._emit("message", message);

    if (type === MsgEventType.ERROR && content && typeof content === "object") {
      const errorType = content.errorType;
      if (errorType === MsgErrorType.OPEN_CONNECTION_ERROR || errorType === MsgErrorType.CALL_CENTRE_NOT_AVAILABLE_ERROR) {
        this._restart(`server error ${ERROR_NAMES[errorType]}`);
      }
    } else if (type === MsgEventType.DISCONNECTED) {
      const ignore = Boolean(envelope.privateData && envelope.privateData.ignoreTryReconnection);
      if (!ignore && !this._stopped) this._restart("server reported DISCONNECTED");
    }
  }

  _setState(state, reason = "") {
    this.state = state;
    this._emit("status", { state, reason, attempt: this.attempt, retryAt: this.retryAt });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
