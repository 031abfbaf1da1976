// rpc: the reply's data, an application error with its code, an unknown method, a timeout.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { Hub } from "../src/wirehub.js";
import { startHub, next, record } from "./helpers.js";

const APP = fileURLToPath(new URL("./apps/rpc_hooks.py", import.meta.url));
let server;
before(async () => { server = await startHub(["--app", `${APP}:hub`]); });
after(() => server?.stop());

test("rpc resolves with the result and rejects with the hub's error codes", async () => {
  const hub = new Hub(server.ws, { timeout: 500 });
  hub.connect();
  const result = await hub.rpc("echo", { n: 1 });
  assert.deepEqual(result, { you_sent: { n: 1 }, client: hub.client });
  await assert.rejects(hub.rpc("refuse", null), { code: "app.nope" });
  await assert.rejects(hub.rpc("no-such-method", null), { code: "no_such_method" });
  await assert.rejects(hub.rpc("slow", 1), { code: "timeout" }); // the client's own timeout
  hub.disconnect();
  // (the hub answers a connection's frames in order: that connection's next reply waits for
  // the slow one; another connection's does not)
  const other = new Hub(server.ws, { timeout: 500 });
  other.connect();
  assert.deepEqual(await other.rpc("echo", "still fine"), { you_sent: "still fine", client: other.client });
  other.disconnect();
});

test("a message published without history (no seq) is delivered and does not move the room's seq", async () => {
  const hub = new Hub(server.ws, { timeout: 2000 });
  hub.connect();
  const room = hub.room(`live.${process.pid}`);
  await room.join();
  const msgs = record(room, "msg");
  const gaps = record(room, "gap");
  await hub.publish(room.name, { keep: true }); // kept: seq 1
  await hub.publish(room.name, "now only"); // the hook drops history: no seq
  if (msgs.length < 2) await next(room, "msg", (m) => m.data == "now only");
  assert.equal(room.seq, 1, "a reconnect now recovers from seq 1");
  await hub.publish(room.name, { keep: true }); // seq 2
  if (msgs.length < 3) await next(room, "msg", (m) => m.seq == 2);
  assert.deepEqual(msgs.map((m) => [m.seq, m.data]), [[1, { keep: true }], [undefined, "now only"], [2, { keep: true }]]);
  assert.equal(room.seq, 2, "the seq to recover from stays the last kept one");
  assert.deepEqual(gaps, []);
  hub.disconnect();
});
