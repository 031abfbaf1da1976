// The size budget: the minified bundle is at most 8 KiB gzipped, and it works as the source does.
import { test } from "node:test";
import assert from "node:assert/strict";
import { buildMin, BUDGET } from "../scripts/build.js";

test("the minified build fits in 8 KiB gzipped", async (t) => {
  const { bytes, gzipped } = await buildMin();
  t.diagnostic(`dist/wirehub.min.js: ${bytes} bytes minified, ${gzipped} bytes gzipped (budget ${BUDGET})`);
  assert.ok(gzipped <= BUDGET, `${gzipped} bytes gzipped is over the ${BUDGET} byte budget`);
  const built = await import(`../dist/wirehub.min.js?${Date.now()}`);
  assert.deepEqual(Object.keys(built).sort(), ["Hub", "HubError", "Room"]);
  const hub = new built.Hub("ws://127.0.0.1:9/");
  assert.equal(hub.state, "disconnected");
  await assert.rejects(hub.publish("r", 1), { code: "disconnected" });
});
