#!/usr/bin/env node
// A Creatio 8.x communication panel reduced to its wire behaviour, on Microsoft's own SignalR
// client (@microsoft/signalr from npm), for the Python e2e tests.
//
//   node signalr_agent.js --url http://127.0.0.1:2013/?key=K --line 305 [--skip-negotiation]
//                         [--negotiate-via http://127.0.0.1:PORT_A] [--no-open] [--origin O] [--contact GUID]
//                         [--library UID]
//
// Like Terrasoft.SignalRChannel it builds HubConnectionBuilder().withUrl(url) with no automatic
// reconnect, listens to "ServerMessage" and invokes "SendRawMessage" with the JSON text Creatio's
// MsgCommandInfo.serialize() produces. Like MsgServiceCtiProvider it sends LoadLibrary on start,
// OpenConnection on LIBRARY_INITIALIZED and QueryActiveCallSnapshot on CONNECTION_CREATED.
//
// Like MsgCommandInfo every command carries libraryInstanceUId (the LIBRARY_INITIALIZED content, kept by the
// singleton provider across reconnects); --library starts with one, as a panel reconnecting after a drop does.
//
// --negotiate-via sends the negotiate POST to another server than the WebSocket (the "negotiate on
// node A, connect on node B" case) through a custom HttpClient, so the client is otherwise intact.
//
// stdout: one JSON object per line: {"kind":"started"|"event"|"invoked"|"invoke-error"|"closed"|
// "start-error", ...}. stdin: one JSON object per line: {"op":"send","command":..,"parameters":..,
// "executor":..}, {"op":"invoke","method":..,"args":[..]}, {"op":"stop"}.
"use strict";

const readline = require("readline");
const signalR = require("@microsoft/signalr");

function parseArgs(argv) {
  const args = { url: "", line: "", skipNegotiation: false, negotiateVia: "", open: true, origin: "", contact: "",
    library: "" };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--url") args.url = argv[++i];
    else if (flag === "--line") args.line = argv[++i];
    else if (flag === "--skip-negotiation") args.skipNegotiation = true;
    else if (flag === "--negotiate-via") args.negotiateVia = argv[++i];
    else if (flag === "--no-open") args.open = false;
    else if (flag === "--origin") args.origin = argv[++i];
    else if (flag === "--user") args.user = argv[++i];
    else if (flag === "--contact") args.contact = argv[++i];
    else if (flag === "--library") args.library = argv[++i];
    else throw new Error(`unknown flag ${flag}`);
  }
  if (!args.url) throw new Error("--url is required");
  return args;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

class RedirectingHttpClient extends signalR.DefaultHttpClient {
  constructor(logger, origin) {
    super(logger);
    this.origin = origin;
  }

  send(request) {
    const target = new URL(request.url);
    const via = new URL(this.origin);
    target.protocol = via.protocol;
    target.host = via.host;
    emit({ kind: "http", method: request.method, url: target.toString() });
    return super.send({ ...request, url: target.toString() });
  }
}

const MsgEventType = { LIBRARY_INITIALIZED: 1, CONNECTION_CREATED: 2 };

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const logger = signalR.LogLevel.Warning;
  const options = {};
  if (args.skipNegotiation) {
    options.skipNegotiation = true;
    options.transport = signalR.HttpTransportType.WebSockets;
  }
  if (args.negotiateVia) {
    options.httpClient = new RedirectingHttpClient(new signalR.NullLogger(), args.negotiateVia);
  }
  if (args.origin) {
    options.headers = { Origin: args.origin };
  }
  const connection = new signalR.HubConnectionBuilder()
    .withUrl(args.url, options)
    .configureLogging(logger)
    .build();

  let connectionUId = "";
  let libraryInstanceUId = args.library;
  const send = (command, parameters, executor) => {
    // Terrasoft.MsgCommandInfo.serialize(): nested objects travel as JSON strings, commandUId empty.
    const body = { command, parameters: parameters || {}, commandUId: "", connectionUId, libraryInstanceUId };
    if (executor !== undefined && executor !== null) {
      body.commandExecutor = typeof executor === "string" ? executor : JSON.stringify(executor);
    }
    return invoke("SendRawMessage", [JSON.stringify(body)], command);
  };
  const invoke = (method, invokeArgs, label) =>
    connection.invoke(method, ...invokeArgs).then(
      (result) => emit({ kind: "invoked", method, label: label || method, result: result === undefined ? null : result }),
      (error) => emit({ kind: "invoke-error", method, label: label || method, error: String(error && error.message) }),
    );

  connection.on("ServerMessage", (text) => {
    let envelope = null;
    try {
      envelope = JSON.parse(text);
    } catch (e) {
      emit({ kind: "bad-message", text: String(text).slice(0, 500), type: typeof text });
      return;
    }
    emit({ kind: "event", eventType: envelope.eventType, envelope, argType: typeof text });
    if (!args.open) return;
    if (envelope.eventType === MsgEventType.LIBRARY_INITIALIZED) {
      libraryInstanceUId = String(envelope.content || "");
      const connectionParams = JSON.stringify({ ExtensionName: args.line, OriginateContext: "", debugMode: false });
      // --user: who the agent is (line ownership); --contact: sessionServiceParams as Creatio sends
      // them (UserContactUId: whose calls are saved)
      const params = {};
      if (args.contact) Object.assign(params, { UserUId: args.contact, UserContactUId: args.contact, ServiceUrl: "http://creatio/0" });
      if (args.user) params.UserUId = args.user;
      const sessionServiceParams = JSON.stringify(params);
      send("OpenConnection", { connectionParams, sessionServiceParams });
    } else if (envelope.eventType === MsgEventType.CONNECTION_CREATED) {
      connectionUId = envelope.connectionUId || "";
      send("QueryActiveCallSnapshot", {});
    }
  });
  connection.onclose((error) => {
    emit({ kind: "closed", error: error ? String(error.message || error) : null });
    process.exit(0);
  });

  try {
    await connection.start();
  } catch (error) {
    emit({ kind: "start-error", error: String(error && error.message) });
    process.exit(3);
  }
  emit({ kind: "started", connectionId: connection.connectionId, state: connection.state });
  if (args.open) {
    send("LoadLibrary", { AssemblyName: "Asterisk" });
  }

  const input = readline.createInterface({ input: process.stdin });
  input.on("line", (line) => {
    if (!line.trim()) return;
    let op;
    try {
      op = JSON.parse(line);
    } catch (e) {
      emit({ kind: "harness-error", error: `bad stdin line: ${line.slice(0, 200)}` });
      return;
    }
    if (op.op === "send") send(op.command, op.parameters, op.executor);
    else if (op.op === "invoke") invoke(op.method, op.args || [], op.label);
    else if (op.op === "stop") connection.stop();
  });
  input.on("close", () => connection.stop());
}

main().catch((error) => {
  emit({ kind: "harness-error", error: String(error && error.stack) });
  process.exit(4);
});
