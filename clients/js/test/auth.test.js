// Token auth (--secret): getToken refreshes a token before it expires, and replaces an
// expired one; without getToken an expired token stops the client with unauthorized.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { Hub } from "../src/wirehub.js";
import { startHub, next, record, mintToken, unique, within } from "./helpers.js";

const SECRET = "js-client-test-secret-of-at-least-32-bytes";
let server;
const hubs = [];
before(async () => { server = await startHub(["--secret", SECRET]); });
after(async () => { for (const h of hubs) h.disconnect(); await server?.stop(); });

/** An HS256 token that expired a minute ago (wirehub token cannot mint one in the past). */
function expiredToken(sub) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) - 60 })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

test("getToken refreshes a 5-second token before it expires: the connection outlives it", async () => {
  const minted = [];
  const getToken = async () => {
    const token = await mintToken(SECRET, "alice", "5s");
    minted.push(JSON.parse(Buffer.from(token.split(".")[1], "base64url")).exp * 1000);
    return token;
  };
  const hub = new Hub(server.ws, { getToken });
  hubs.push(hub);
  const reconnecting = record(hub, "reconnecting");
  const errors = record(hub, "error");
  const refreshed = [];
  const second = new Promise((resolve) => hub.on("refreshed", (r) => refreshed.push(r) == 2 && resolve()));
  hub.connect();
  await next(hub, "connected");
  assert.equal(hub.user, "alice");
  const client = hub.client;
  await within(second, 15000, "two refreshes");
  assert.ok(Date.now() > minted[0], "the first token has expired by now");
  assert.equal(refreshed[0].exp * 1000, minted[1], "the hub took the new token");
  assert.deepEqual([hub.state, hub.client], ["connected", client], "the same connection");
  assert.deepEqual(reconnecting, []);
  assert.deepEqual(errors, []);
  assert.equal(await hub.publish(unique("auth"), "still allowed"), 1);
});

test("an expired token is replaced through getToken", async () => {
  let calls = 0;
  const hub = new Hub(server.ws, {
    token: expiredToken("bob"),
    getToken: () => { calls++; return mintToken(SECRET, "bob"); },
    minReconnectDelay: 10,
  });
  hubs.push(hub);
  const reconnecting = next(hub, "reconnecting");
  hub.connect();
  const why = await reconnecting;
  assert.equal(why.reason, "unauthorized");
  assert.match(why.detail.message, /expired/);
  await next(hub, "connected");
  assert.equal(hub.user, "bob");
  assert.equal(calls, 1);
});

test("without getToken an expired token stops the client with unauthorized", async () => {
  const hub = new Hub(server.ws, { token: expiredToken("carol"), minReconnectDelay: 10 });
  hubs.push(hub);
  const states = record(hub, "state");
  const gone = next(hub, "disconnected");
  hub.connect();
  const why = await gone;
  assert.equal(why.reason, "unauthorized");
  assert.equal(why.detail.code, "unauthorized");
  assert.deepEqual(states, ["connecting", "disconnected"]);
});

test("a join the token does not allow is refused: the room is left, with the SPEC code", async () => {
  const hub = new Hub(server.ws, { token: await mintToken(SECRET, "dora", "1h", "--rooms", "ok.*") });
  hubs.push(hub);
  hub.connect();
  const allowed = hub.room(unique("ok.room").replace(/^js-/, "ok."));
  await allowed.join();
  const room = hub.room(unique("secret"));
  const states = record(room, "state");
  const refused = next(room, "error");
  await assert.rejects(room.join(), (e) => e.code == "forbidden" && e.frame.op == "error");
  assert.equal((await refused).code, "forbidden");
  assert.deepEqual(states, ["joining", "left"]);
  assert.equal(allowed.state, "joined");
});
