// Restarts of a real `wirehub serve`: the client reconnects, re-joins with since/epoch and
// recovers what was published meanwhile (shared Redis broker), or reports the gap (memory
// broker, whose restart starts a new epoch).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { Hub } from "../src/wirehub.js";
import { startHub, next, record, admin, unique } from "./helpers.js";

const REDIS = process.env.JS_TEST_REDIS || "redis://127.0.0.1:6379/11";
const fast = { minReconnectDelay: 50, maxReconnectDelay: 300 };
const cleanup = [];
after(async () => { for (const f of cleanup.reverse()) await f(); });

test("a restart on a shared broker: the client re-joins and recovers the outage's messages, none doubled", async () => {
  const a = await startHub(["--broker", REDIS]);
  const b = await startHub(["--broker", REDIS]); // a second node: publishes while a is down
  let a2;
  cleanup.push(() => b.stop(), () => a.stop("SIGKILL"), () => a2?.stop());
  const hub = new Hub(a.ws, fast);
  cleanup.push(() => hub.disconnect());
  const room = hub.room(unique("recover"));
  const msgs = record(room, "msg");
  const joins = record(room, "joined");
  const gaps = record(room, "gap");
  hub.connect();
  await room.join();
  const first = next(room, "msg");
  assert.equal(await room.publish("before"), 1);
  await first;

  const dropped = next(hub, "reconnecting");
  await a.stop("SIGTERM");
  assert.equal((await dropped).reason, "shutdown", "the drain says bye shutdown");
  assert.equal(hub.state, "connecting");
  assert.equal(room.state, "joining");
  const queued = room.publish("queued while down"); // waits for the connection, sent once
  const pub = await admin(b, "POST", `/api/rooms/${room.name}/publish`, { data: "during the outage" });
  assert.equal(pub.status, 200);
  assert.equal(pub.body.seq, 2);

  const rejoined = next(room, "joined");
  a2 = await a.restart();
  assert.deepEqual(await rejoined, { seq: 2, epoch: room.epoch, recovered: true, wasRecovering: true, presence: "events" });
  assert.equal(room.recovered, true);
  assert.equal(await queued, 3);
  if (msgs.length < 3) await next(room, "msg", (m) => m.seq == 3);
  const fence = next(room, "msg", (m) => m.data == "after");
  await room.publish("after");
  await fence;
  assert.deepEqual(msgs.map((m) => [m.seq, m.data]), [[1, "before"], [2, "during the outage"], [3, "queued while down"], [4, "after"]]);
  assert.equal(joins.length, 2);
  assert.deepEqual(gaps, [], "no gap was reported");
});

test("a restart on the memory broker: the client reports a known gap", async () => {
  const a = await startHub();
  let a2;
  cleanup.push(() => a.stop("SIGKILL"), () => a2?.stop());
  const hub = new Hub(a.ws, fast);
  cleanup.push(() => hub.disconnect());
  const room = hub.room(unique("gap"));
  hub.connect();
  await room.join();
  await room.publish("lost with the process");
  const epoch = room.epoch;

  const dropped = next(hub, "reconnecting");
  await a.stop("SIGKILL"); // no bye: the socket just closes
  assert.equal((await dropped).reason, "closed");
  const rejoined = next(room, "joined");
  const gap = next(room, "gap");
  a2 = await a.restart();
  const j = await rejoined;
  assert.equal(j.recovered, false);
  assert.equal(j.wasRecovering, true);
  assert.notEqual(j.epoch, epoch);
  assert.deepEqual(await gap, { from: 2, to: null, epochChanged: true });
  assert.equal(room.seq, 0, "the room goes on from the new stream's position");
  const got = next(room, "msg");
  assert.equal(await room.publish("new epoch"), 1);
  assert.equal((await got).data, "new epoch");
});

test("after bye shutdown the backoff window stops growing at 2 s while the hub restarts; after a plain drop it does not", async () => {
  const random = Math.random;
  Math.random = () => 0.999; // the top of each full-jitter window, so each delay shows its window
  cleanup.push(() => { Math.random = random; });
  const a = await startHub();
  cleanup.push(() => a.stop("SIGKILL"));
  const hub = new Hub(a.ws, { minReconnectDelay: 2500, maxReconnectDelay: 20000 });
  cleanup.push(() => hub.disconnect());
  const waits = record(hub, "reconnecting");
  hub.connect();
  await next(hub, "connected");
  await a.stop("SIGTERM"); // bye shutdown, and nobody listens any more
  await next(hub, "reconnecting", (e) => e.reason != "shutdown"); // the first retry was refused
  hub.disconnect();
  assert.equal(waits[0].reason, "shutdown");
  assert.ok(waits[0].delay <= 250, `the first retry after a drain's bye: ${waits[0].delay} ms`);
  assert.equal(Math.round(waits[1].delay), 1998, "the restart cap (2 s), not minReconnectDelay (2.5 s)");

  const b = await startHub(); // the same without bye: SIGKILL drops the socket
  cleanup.push(() => b.stop("SIGKILL"));
  const other = new Hub(b.ws, { minReconnectDelay: 2500, maxReconnectDelay: 20000 });
  cleanup.push(() => other.disconnect());
  other.connect();
  await next(other, "connected");
  const dropped = next(other, "reconnecting");
  await b.stop("SIGKILL");
  const plain = await dropped;
  other.disconnect();
  assert.notEqual(plain.reason, "shutdown");
  assert.equal(Math.round(plain.delay), 2498, "the client's own backoff window");
});
