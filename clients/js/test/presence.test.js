// Presence in big rooms: a room above presence_threshold members sends presence_diff frames,
// which the client splits into join/leave events; above presence_max it sends none, and
// room.presenceMode follows (docs/hub.md "Presence in big rooms").
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Hub } from "../src/wirehub.js";
import { startHub, next, unique } from "./helpers.js";

let server;
const hubs = [];
before(async () => { server = await startHub(["--rooms", "big.*:presence_threshold=0,presence_max=2"]); });
after(async () => { for (const h of hubs) h.disconnect(); await server?.stop(); });

function client(name) {
  const hub = new Hub(server.ws, { name });
  hubs.push(hub);
  hub.connect();
  return hub;
}

test("a big room's diffs arrive as join and leave events, and the mode is kept", async () => {
  const name = "big." + unique("room");
  const ada = client("ada").room(name);
  await ada.join();
  assert.equal(ada.presenceMode, "diff");
  const bobHub = client("bob");
  const bob = bobHub.room(name);
  const joined = next(ada, "join", (m) => m.name == "bob");
  await bob.join();
  const member = await joined;
  assert.deepEqual(member, { client: bobHub.client, user: bobHub.user, name: "bob" });
  const left = next(ada, "leave", (m) => m.client == bobHub.client);
  await bob.leave();
  await left;

  // past presence_max=2 members the room goes quiet and says so
  const quiet = next(ada, "join", () => false, 2000).catch(() => "quiet");
  const third = client("cy").room(name);
  await third.join();
  const fourth = client("di").room(name);
  await fourth.join();
  assert.equal(fourth.presenceMode, "query");
  await quiet;
  assert.equal(ada.presenceMode, "query");
  assert.equal((await ada.presence()).length, 3);
});
