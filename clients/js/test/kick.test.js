// The hub's bye reasons: a client kicked through the admin API stops for good.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Hub } from "../src/wirehub.js";
import { startHub, next, record, admin, unique, within } from "./helpers.js";

let server;
before(async () => { server = await startHub(); });
after(() => server?.stop());

test("bye kicked stops reconnecting", async () => {
  const hub = new Hub(server.ws, { name: "kickme", minReconnectDelay: 10, maxReconnectDelay: 20 });
  const room = hub.room(unique("kick"));
  hub.connect();
  await room.join();
  const conns = await admin(server, "GET", `/api/connections?room=${room.name}`);
  assert.deepEqual(conns.body.map((c) => c.id), [hub.client]);

  const states = record(hub, "state");
  const reconnecting = record(hub, "reconnecting");
  const gone = next(hub, "disconnected");
  const pending = room.presence().catch((e) => e); // sent, never answered: it fails, it is not lost
  const kicked = await admin(server, "DELETE", `/api/connections/${hub.client}`);
  assert.ok(kicked.status < 300, `admin DELETE answered ${kicked.status}`);
  const bye = await gone;
  assert.equal(bye.reason, "kicked");
  assert.equal(bye.detail.op, "bye");
  assert.equal(hub.state, "disconnected");
  assert.equal(room.state, "left");
  const err = await pending;
  assert.ok(err.code == "disconnected" || Array.isArray(err), `presence: ${err}`);
  await assert.rejects(room.publish("after the kick"), { code: "disconnected" });

  // A reconnect would come within 20 ms: give it 20 times that, then check nothing happened,
  // neither in the client nor at the hub.
  await within(new Promise((r) => setTimeout(r, 400)), 1000, "the quiet period");
  assert.deepEqual(states, ["disconnected"]);
  assert.deepEqual(reconnecting, []);
  const after = await admin(server, "GET", `/api/connections?room=${room.name}`);
  assert.deepEqual(after.body, []);
});
