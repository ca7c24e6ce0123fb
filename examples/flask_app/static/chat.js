// The example's chat page: Socket.IO namespace /chat of this same origin (see chat.py).
// No framework and no build step; text is always set with textContent, never as HTML.
"use strict";
(function () {
  const status = document.getElementById("status");
  const messages = document.getElementById("messages");
  const form = document.getElementById("say");
  const input = form.elements.text;
  const error = document.getElementById("error");
  // A WebSocket first: one connection for the whole session, which any worker can hold
  // (`make run` with several workers, no nginx). Should it fail (a proxy without
  // WebSocket support), long-polling: its requests must all reach one worker, which
  // the route cookie does behind nginx. /chat?transport=polling uses long-polling only.
  const polling = new URLSearchParams(location.search).get("transport") === "polling";
  const socket = io("/chat", polling
    ? {transports: ["polling"]}
    : {transports: ["websocket", "polling"], tryAllTransports: true});

  function show(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function where(w) {
    return w.instance + " \u00b7 worker " + w.slot;
  }

  function fail(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  let worker = null;  // what "where" answered for this connection
  function connected() {
    const transport = socket.io.engine.transport.name;
    status.dataset.transport = transport;
    show("connected", worker
      ? "connected to " + where(worker) + " (pid " + worker.pid + ") over " + transport
      : "connected over " + transport);
  }

  socket.on("connect", () => {
    worker = null;
    connected();
    socket.io.engine.once("upgrade", connected);
    socket.emit("where", (w) => {
      worker = w;
      Object.assign(status.dataset, {instance: w.instance, slot: w.slot, pid: w.pid});
      connected();
    });
  });
  socket.on("disconnect", (reason) => show("disconnected", "disconnected: " + reason));
  socket.on("connect_error", (err) => show("error", "cannot connect: " + err.message));

  socket.on("said", (m) => {
    const item = document.createElement("li");
    item.dataset.id = m.id;
    item.dataset.instance = m.instance;
    item.dataset.slot = m.slot;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.text;
    const via = document.createElement("span");
    via.className = "via";
    via.textContent = "via " + where(m) + ", " + new Date(m.time * 1000).toLocaleTimeString();
    item.append(text, via);
    messages.append(item);
    item.scrollIntoView({block: "end"});
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value;
    if (!text.trim()) {
      return;
    }
    socket.timeout(5000).emit("say", {text: text}, (err, ack) => {
      if (err) {
        fail("not sent: no answer from the server");
      } else if (ack.error) {
        fail("not sent: " + ack.error);
      } else {
        fail("");
        input.value = "";
      }
    });
  });
})();
