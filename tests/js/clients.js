// Chat clients as users ship them, driven by tests/test_chat.py over stdin/stdout.
//
//   node clients.js '{"url": "http://127.0.0.1:PORT", "polling": 8, "websocket": 8,
//                     "upgrade": 8, "raw": 8}'
//
// Kinds: "polling" and "websocket" are socket.io-client on the /chat namespace with
// that one transport, "upgrade" with its default (long-polling, then an upgrade to
// websocket); default options otherwise: its own reconnection and backoff;
// withCredentials makes Node keep cookies, as a browser does, so the route cookie pins
// the long-polling session. "raw" is the ws package on /ws, reconnecting on close
// after 250 ms (ws has no reconnection of its own).
//
// Every line on stdout is one JSON object: {"event": "ready"} once every client is
// connected, and one answer per command. Commands, one JSON object per stdin line:
//   {"cmd": "say", "kind": K, "text": T}  the first connected client of kind K sends T
//   {"cmd": "where", "times": N}          every Socket.IO client asks `where` N times
//   {"cmd": "status"}                     the state of every client
//   {"cmd": "flood", "kind": K, "text": T, "n": N}  the first connected client of kind K
//                                         sends T-0 .. T-(N-1) at once, then waits for the acks
//   {"cmd": "counts", "prefix": P}        per client: how many distinct texts starting with P
//                                         it got, and how many in all (duplicates included)
//   {"cmd": "quit"}                       close everything and exit
"use strict";

const readline = require("node:readline");
const { io } = require("socket.io-client");
const WebSocket = require("ws");

const config = JSON.parse(process.argv[2]);
const url = config.url;
const ACK_TIMEOUT = 5000;
const clients = [];

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function newClient(kind, n) {
  return {
    id: `${kind}-${n}`, kind, connected: false, where: null,
    connects: [],      // [ms since epoch, pid, slot, instance] per (re)connection
    disconnects: [],   // [ms since epoch, reason]
    received: {},      // text -> times received
    wheres: [],        // pids answered by `where` (the "where" command)
    errors: [],
  };
}

function onConnected(c, where) {
  c.connected = true;
  c.where = where;
  c.connects.push([Date.now(), where.pid, where.slot, where.instance]);
}

function received(c, text) {
  c.received[text] = (c.received[text] || 0) + 1;
}

function socketio(kind, n) {
  const c = newClient(kind, n);
  const transports = kind === "upgrade" ? {} : { transports: [kind] };
  const sock = io(url + "/chat", { ...transports, withCredentials: true });
  c.sock = sock;
  sock.on("connect", async () => {
    try {
      onConnected(c, await sock.timeout(ACK_TIMEOUT).emitWithAck("where"));
    } catch (err) {
      c.errors.push(`where after connect: ${err.message}`);
    }
  });
  sock.on("disconnect", (reason) => {
    c.connected = false;
    c.disconnects.push([Date.now(), reason]);
  });
  sock.on("connect_error", (err) => c.errors.push(`connect_error: ${err.message}`));
  sock.on("said", (msg) => received(c, msg.text));
  c.say = async (text) => sock.timeout(ACK_TIMEOUT).emitWithAck("say", { text });
  c.close = () => sock.disconnect();
  return c;
}

function raw(n) {
  const c = newClient("raw", n);
  let closing = false;
  const open = () => {
    const ws = new WebSocket(url.replace(/^http/, "ws") + "/ws");
    c.ws = ws;
    ws.on("message", (data) => {
      const msg = JSON.parse(data.toString());
      if (msg.type === "hello") onConnected(c, msg);
      else if (msg.type === "message") received(c, msg.text);
      else if (msg.type === "error") c.errors.push(`error frame: ${msg.error}`);
    });
    ws.on("error", (err) => c.errors.push(`ws error: ${err.message}`));
    ws.on("close", (code) => {
      if (c.connected) c.disconnects.push([Date.now(), `close ${code}`]);
      c.connected = false;
      if (!closing) setTimeout(open, 250);
    });
  };
  open();
  c.say = async (text) => {
    c.ws.send(JSON.stringify({ text }));
    return { sent: true };
  };
  c.close = () => {
    closing = true;
    c.ws.close();
  };
  return c;
}

function status() {
  return clients.map((c) => ({
    id: c.id, kind: c.kind, connected: c.connected, where: c.where, connects: c.connects,
    disconnects: c.disconnects, received: c.received, wheres: c.wheres, errors: c.errors,
    transport: c.sock && c.sock.io.engine ? c.sock.io.engine.transport.name : null,
  }));
}

async function handle(line) {
  const cmd = JSON.parse(line);
  if (cmd.cmd === "say") {
    const sender = clients.find((c) => c.kind === cmd.kind && c.connected && c.where);
    if (!sender) return out({ event: "said", error: `no connected ${cmd.kind} client` });
    try {
      const ack = await sender.say(cmd.text);
      out({ event: "said", id: sender.id, where: sender.where, ack });
    } catch (err) {
      out({ event: "said", id: sender.id, error: err.message });
    }
  } else if (cmd.cmd === "where") {
    await Promise.all(clients.filter((c) => c.sock).map(async (c) => {
      for (let i = 0; i < cmd.times; i++) {
        try {
          c.wheres.push((await c.sock.timeout(ACK_TIMEOUT).emitWithAck("where")).pid);
        } catch (err) {
          c.errors.push(`where: ${err.message}`);
        }
      }
    }));
    out({ event: "where" });
  } else if (cmd.cmd === "flood") {
    const sender = clients.find((c) => c.kind === cmd.kind && c.connected && c.where);
    if (!sender || !sender.sock) {
      return out({ event: "flooded", error: `no connected Socket.IO ${cmd.kind} client` });
    }
    const acks = [];
    for (let i = 0; i < cmd.n; i++) {
      acks.push(sender.sock.timeout(30000).emitWithAck("say", { text: `${cmd.text}-${i}` })
        .then((a) => (a && a.error ? 1 : 0), () => 1));
    }
    const failed = (await Promise.all(acks)).reduce((a, b) => a + b, 0);
    out({ event: "flooded", id: sender.id, where: sender.where, failed });
  } else if (cmd.cmd === "counts") {
    out({ event: "counts", clients: clients.map((c) => {
      const texts = Object.keys(c.received).filter((t) => t.startsWith(cmd.prefix));
      return { id: c.id, kind: c.kind, distinct: texts.length,
               total: texts.reduce((n, t) => n + c.received[t], 0) };
    }) });
  } else if (cmd.cmd === "status") {
    out({ event: "status", clients: status() });
  } else if (cmd.cmd === "quit") {
    for (const c of clients) c.close();
    out({ event: "bye" });
    setTimeout(() => process.exit(0), 100);
  } else {
    out({ event: "error", error: `unknown command ${cmd.cmd}` });
  }
}

for (const kind of ["polling", "websocket", "upgrade"]) {
  for (let n = 0; n < (config[kind] || 0); n++) clients.push(socketio(kind, n));
}
for (let n = 0; n < (config.raw || 0); n++) clients.push(raw(n));

const started = Date.now();
const ready = setInterval(() => {
  if (clients.every((c) => c.connected && c.where)) {
    clearInterval(ready);
    out({ event: "ready", ms: Date.now() - started });
  }
}, 20);

// Commands run one at a time, in order.
let queue = Promise.resolve();
readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim()) queue = queue.then(() => handle(line)).catch((err) => out({ event: "error", error: String(err) }));
});
process.stdin.on("end", () => process.exit(0));
