// Compiled by `tsc -p test/tsconfig.json` (types.test.js): the declarations in src/wirehub.d.ts
// check, and read the way the guide uses them. Never run.
import { Hub, HubError, type Message, type Member, type Gap, type HubState, type PresenceMode } from "wirehub-client";

async function example(): Promise<void> {
  const hub = new Hub("wss://example.invalid/", { getToken: async () => "token", name: "alice", offline: "refuse" });
  const off = hub.on("state", (state: HubState, previous: HubState) => console.log(previous, "->", state));
  hub.on("reconnecting", ({ reason, delay }) => console.log(reason, delay.toFixed(0)));
  hub.on("disconnected", ({ reason, detail }) => console.log(reason, detail));
  hub.on("message", (m: Message) => console.log(m.from, m.data));
  hub.connect();
  const room = hub.room("lobby");
  room.on("msg", (m) => console.log(m.seq + 1, m.ts, m.room, m.data));
  room.on("joined", ({ recovered, wasRecovering, epoch, presence }) => console.log(recovered, wasRecovering, epoch.length, presence));
  const mode: PresenceMode | null = room.presenceMode;
  if (mode == "query") console.log("no presence events in this room: ask room.presence()");
  room.on("gap", (g: Gap) => console.log(g.from, g.to ?? "new epoch", g.epochChanged));
  room.on("join", (m: Member) => console.log(m.client, m.name));
  await room.join();
  const seq: number = await room.publish({ text: "hi" });
  const members: Member[] = await room.presence();
  const page = await room.history({ limit: 10 });
  if (page.more) await room.history({ before: page.messages[0].seq });
  await hub.send(members[0].client, [1, 2, 3]);
  const sum = await hub.rpc<number>("sum", [1, 2]);
  try {
    await hub.publish("room", seq + sum);
  } catch (e) {
    if (e instanceof HubError && e.code == "timeout") console.log(e.frame?.message);
  }
  // @ts-expect-error data must be JSON
  await room.publish(() => 1);
  // @ts-expect-error no such event
  room.on("message", () => {});
  off();
  hub.disconnect();
}
void example;
