// Against stand-in servers (the ws package's WebSocketServer) that misbehave on purpose: one
// that never answers, one that stops answering after welcome, one that drops the connection
// instead of answering, and byes the real hub seldom sends.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocketServer } from "ws";
import { Hub } from "../src/wirehub.js";
import { next, record } from "./helpers.js";

const servers = [];
const hubs = [];
after(() => { for (const h of hubs) h.disconnect(); for (const s of servers) s.close(); });

/** A WebSocket server on a free loopback port; `onFrame(frame, socket)` sees each frame. */
async function fake(onFrame) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  servers.push(wss);
  await new Promise((r) => wss.on("listening", r));
  wss.frames = [];
  wss.sockets = [];
  wss.on("connection", (socket) => {
    wss.sockets.push(socket);
    wss.emit("socket", socket);
    socket.on("message", (raw) => {
      const f = JSON.parse(raw);
      wss.frames.push(f);
      onFrame(f, socket);
    });
  });
  wss.url = `ws://127.0.0.1:${wss.address().port}/`;
  return wss;
}
let clients = 0;
const welcome = (socket, f, heartbeat = 25) =>
  socket.send(JSON.stringify({ op: "welcome", client: `c${++clients}`, user: "u", heartbeat, server: "fake", ref: f.ref }));
const nextSocket = (wss) => new Promise((resolve) => wss.once("socket", resolve));

function client(url, options) {
  const hub = new Hub(url, { minReconnectDelay: 10, maxReconnectDelay: 20, ...options });
  hubs.push(hub);
  return hub;
}

test("a server that never answers: requests and the handshake time out, and the client retries", async () => {
  const wss = await fake(() => {});
  const hub = client(wss.url, { timeout: 300 });
  const retry = next(hub, "reconnecting");
  hub.connect();
  const started = Date.now();
  await assert.rejects(hub.publish("room", 1), (e) => e.code == "timeout" && /never sent/.test(e.message));
  assert.ok(Date.now() - started >= 290);
  const why = await retry;
  assert.equal(why.reason, "timeout");
  assert.equal(why.detail.code, "timeout");
  await nextSocket(wss); // it connects again
  assert.ok(wss.frames.every((f) => f.op == "hello"), "only hellos: the publish was never sent");
});

test("a server that stops answering after welcome: a timeout error, then missing pongs drop the connection", async () => {
  const wss = await fake((f, socket) => { if (f.op == "hello") welcome(socket, f, 0.2); });
  const hub = client(wss.url, { timeout: 300, pongTimeout: 150 });
  hub.connect();
  await next(hub, "connected");
  await assert.rejects(hub.publish("room", 1), (e) => e.code == "timeout" && /may still apply/.test(e.message));
  const again = nextSocket(wss);
  const why = await next(hub, "reconnecting");
  assert.equal(why.reason, "heartbeat");
  assert.ok(wss.frames.some((f) => f.op == "ping"), "it pinged");
  await again;
});

test("a request the connection dropped is refused, never sent twice", async () => {
  const wss = await fake((f, socket) => {
    if (f.op == "hello") welcome(socket, f);
    else if (f.op == "pub" && f.data == "first") socket.terminate(); // gone before it answers
    else if (f.op == "pub") socket.send(JSON.stringify({ op: "ok", ref: f.ref, seq: 2 }));
  });
  const hub = client(wss.url);
  hub.connect();
  await next(hub, "connected");
  await assert.rejects(hub.publish("room", "first"), (e) => e.code == "disconnected" && /may or may not/.test(e.message));
  await next(hub, "connected");
  assert.equal(await hub.publish("room", "second"), 2);
  assert.deepEqual(wss.frames.filter((f) => f.op == "pub").map((f) => f.data), ["first", "second"]);
});

test("a bye with reconnect:false stops, whatever its reason; bye shutdown reconnects at once", async () => {
  let byes = [{ op: "bye", reason: "shutdown", reconnect: true }, { op: "bye", reason: "auth_failed", reconnect: false }];
  const wss = await fake((f, socket) => {
    if (f.op != "hello") return;
    welcome(socket, f);
    socket.send(JSON.stringify(byes.shift()));
    socket.close();
  });
  const hub = client(wss.url, { minReconnectDelay: 100000, maxReconnectDelay: 100000 }); // only "at once" can pass
  const reconnecting = record(hub, "reconnecting");
  const gone = next(hub, "disconnected");
  hub.connect();
  assert.equal((await gone).reason, "auth_failed");
  assert.equal(hub.state, "disconnected");
  assert.equal(reconnecting.length, 1);
  assert.equal(reconnecting[0].reason, "shutdown");
  assert.ok(reconnecting[0].delay <= 250);
  assert.equal(wss.sockets.length, 2);
});

test("a live message that skips seqs is a reported gap; a repeated one is dropped", async () => {
  const wss = await fake((f, socket) => {
    const send = (frame) => socket.send(JSON.stringify(frame));
    if (f.op == "hello") welcome(socket, f);
    if (f.op != "join") return;
    send({ op: "joined", room: f.room, seq: 0, epoch: "e1", recovered: false, ref: f.ref });
    for (const seq of [1, 3, 3, 2, 4]) send({ op: "msg", room: f.room, seq, from: "x", data: seq, ts: 1 });
  });
  const hub = client(wss.url);
  const room = hub.room("r");
  const msgs = record(room, "msg");
  const gaps = record(room, "gap");
  hub.connect();
  await room.join();
  if (msgs.length < 3) await next(room, "msg", (m) => m.seq == 4);
  assert.deepEqual(msgs.map((m) => m.data), [1, 3, 4]);
  assert.deepEqual(gaps, [{ from: 2, to: 2, epochChanged: false }]);
});
