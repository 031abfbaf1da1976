// rpc: the reply's data, an application error with its code, an unknown method, a timeout.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { Hub } from "../src/wirehub.js";
import { startHub } from "./helpers.js";

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
