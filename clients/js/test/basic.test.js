// Connect, join, publish with acks, presence, history, direct messages, error codes and the
// offline queue, against a real `wirehub serve` (memory broker).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Hub, HubError } from "../src/wirehub.js";
import { startHub, next, record, unique } from "./helpers.js";

let server;
const hubs = [];
before(async () => { server = await startHub(); });
after(async () => { for (const h of hubs) h.disconnect(); await server?.stop(); });

function client(options = {}) {
  const hub = new Hub(server.ws, options);
  hubs.push(hub);
  return hub;
}

test("connects, joins and publishes with acks", async () => {
  const hub = client({ name: "alice" });
  const states = record(hub, "state");
  const welcome = next(hub, "connected");
  hub.connect();
  const w = await welcome;
  assert.deepEqual(states, ["connecting", "connected"]);
  assert.equal(hub.client, w.client);
  assert.match(w.server, /^wirehub\//);

  const room = hub.room(unique("basic"));
  assert.equal(hub.room(room.name), room, "one room object per name");
  const msgs = record(room, "msg");
  const joined = next(room, "joined");
  await room.join();
  assert.equal(room.state, "joined");
  assert.deepEqual(await joined, { seq: 0, epoch: room.epoch, recovered: false, wasRecovering: false, presence: "events" });
  assert.equal(room.presenceMode, "events");

  const seqs = await Promise.all([room.publish({ n: 1 }), room.publish({ n: 2 }), hub.publish(room.name, "three")]);
  assert.deepEqual(seqs, [1, 2, 3], "each ack carries its own publication's seq");
  if (msgs.length < 3) await next(room, "msg", (m) => m.seq == 3);
  assert.deepEqual(msgs.map((m) => [m.seq, m.data, m.from]), [[1, { n: 1 }, hub.client], [2, { n: 2 }, hub.client], [3, "three", hub.client]]);
  assert.equal(room.seq, 3);

  const members = await room.presence();
  assert.deepEqual(members, [{ client: hub.client, user: hub.user, name: "alice" }]);
  const page = await room.history({ limit: 2 });
  assert.deepEqual(page.messages.map((m) => m.seq), [2, 3]);
  assert.equal(page.epoch, room.epoch);
  const older = await room.history({ before: page.messages[0].seq });
  assert.deepEqual(older.messages.map((m) => m.data), [{ n: 1 }]);
  assert.equal(older.more, false);

  await room.leave();
  assert.equal(room.state, "left");
  await assert.rejects(room.presence(), { code: "not_member" });
});

test("presence events and direct messages between two clients", async () => {
  const a = client({ name: "ann" });
  const b = client({ name: "bob" });
  a.connect();
  b.connect();
  const name = unique("pair");
  const ra = a.room(name);
  await ra.join();
  const arrived = next(ra, "join");
  await b.room(name).join();
  const member = await arrived;
  assert.equal(member.client, b.client);
  assert.equal(member.name, "bob");

  const got = next(b, "message");
  await a.send(b.client, { hi: "bob" }); // resolves on the hub's ok
  const m = await got;
  assert.deepEqual([m.from, m.data], [a.client, { hi: "bob" }]);
  await assert.rejects(a.send("nobody", 1), (e) => e instanceof HubError && e.code == "no_such_client");

  const left = next(ra, "leave");
  await b.room(name).leave();
  assert.equal((await left).client, b.client);
});

test("errors carry the SPEC code", async () => {
  const hub = client();
  hub.connect();
  await assert.rejects(hub.room(unique("never-joined")).history(), { code: "not_member" });
  await assert.rejects(hub.rpc("sum", [1, 2]), { code: "no_such_method" }); // a hub without on_rpc hooks
  await assert.rejects(hub.publish("x".repeat(201), 1), { code: "bad_frame" });
});

test("frames sent while connecting wait in a bounded queue and go out once", async () => {
  const watcher = client();
  watcher.connect();
  const room = watcher.room(unique("queue"));
  const msgs = record(room, "msg");
  await room.join();

  const hub = client({ maxQueue: 2 });
  await assert.rejects(hub.publish(room.name, 0), { code: "disconnected" }, "before connect() it is refused");
  hub.connect();
  assert.equal(hub.state, "connecting");
  const queued = [hub.publish(room.name, 1), hub.publish(room.name, 2)];
  await assert.rejects(hub.publish(room.name, 3), (e) => e.code == "limit" && /maxQueue/.test(e.message));
  assert.deepEqual(await Promise.all(queued), [1, 2]);
  const fence = next(room, "msg", (m) => m.data == "fence");
  await room.publish("fence"); // the watcher's own message comes after both
  await fence;
  assert.deepEqual(msgs.map((m) => m.data), [1, 2, "fence"], "each queued frame was published exactly once");

  const strict = client({ offline: "refuse" });
  strict.connect();
  await assert.rejects(strict.publish(room.name, 4), (e) => e.code == "disconnected" && /refuse/.test(e.message));
});

test("join before connect, and disconnect() ends everything", async () => {
  const hub = client();
  const room = hub.room(unique("early"));
  const joined = room.join(); // waits for the connection
  assert.equal(room.state, "joining");
  hub.connect();
  assert.equal(await joined, room);
  const pending = hub.request({ op: "ping" });
  hub.disconnect();
  assert.equal(hub.state, "disconnected");
  assert.equal(room.state, "left");
  await assert.rejects(pending, { code: "disconnected" });
  await assert.rejects(room.publish(1), { code: "disconnected" });
});
