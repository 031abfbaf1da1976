// HubProvider: a Yjs document kept in sync through the wirehub hub (the y-websocket protocol
// mapped onto the hub's rooms; examples/collab/README.md has the mapping).
//
//   doc:NAME        Yjs updates, {"update": BASE64}; the server stores each (collab.py)
//   awareness:NAME  awareness updates, {"awareness": BASE64, "hello"?: true}; kept nowhere
//   rpc "sync"      {"doc", "sv"} -> {"update", "sv"}: sync step 1 answered by step 2
//
// On every (re)join of doc:NAME the provider asks the server for what it lacks (sync), then
// publishes what the server lacks when it has edited offline. Local edits made while not
// synced are not sent one by one: that sync sends them together.
import * as Y from "yjs";
import { Observable } from "lib0/observable";
import * as decoding from "lib0/decoding";
import { Awareness, applyAwarenessUpdate, encodeAwarenessUpdate, removeAwarenessStates } from "y-protocols/awareness";
import { Hub } from "../../../../clients/js/src/wirehub.js";

export const toBase64 = (bytes) => {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
};
export const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

const EMPTY_UPDATE = 2; // Y.encodeStateAsUpdate of nothing: no structs, no deletions

/**
 * Events (lib0 Observable): "status" ({status: "connecting" | "connected" | "disconnected"}),
 * "synced" (true once the server's copy is merged, false when the connection goes),
 * "error" (a HubError: an update the hub refused, a failed sync).
 */
export class HubProvider extends Observable {
  /**
   * @param {string} url the hub's WebSocket, ws://HOST:PORT/
   * @param {string} name the document's name (rooms doc:NAME and awareness:NAME)
   * @param {Y.Doc} doc
   * @param {{awareness?: Awareness, hub?: object, connect?: boolean}} [options] hub: options for the Hub client
   */
  constructor(url, name, doc, { awareness = new Awareness(doc), hub = {}, connect = true } = {}) {
    super();
    this.name = name;
    this.doc = doc;
    this.awareness = awareness;
    this.hub = new Hub(url, { offline: "refuse", ...hub });
    this.docRoom = this.hub.room("doc:" + name);
    this.awarenessRoom = this.hub.room("awareness:" + name);
    this.synced = false;
    this.unsent = false; // local edits the server may lack: the next sync sends them
    this.pending = 0; // publications not acknowledged yet
    this.status = "disconnected";
    this.peers = new Map(); // hub client id -> the awareness client ids it announced

    this._onUpdate = (update, origin) => {
      if (origin === this) return;
      if (this.synced) this._publishUpdate(update);
      else this.unsent = true;
    };
    this._onAwareness = ({ added, updated, removed }, origin) => {
      if (origin !== "local") return;
      const mine = [...added, ...updated, ...removed].includes(doc.clientID);
      if (mine && this.awarenessRoom.state == "joined") this._publishAwareness(false);
    };
    doc.on("update", this._onUpdate);
    awareness.on("update", this._onAwareness);

    this.docRoom.on("joined", () => this._sync());
    this.docRoom.on("msg", (m) => {
      if (m.from !== this.hub.client && m.data && typeof m.data.update == "string") this._apply(m.data.update);
    });
    this.docRoom.on("leave", (member) => this._forget(member.client)); // presence of doc:NAME
    this.awarenessRoom.on("joined", () => this._publishAwareness(true));
    this.awarenessRoom.on("msg", (m) => this._remoteAwareness(m));
    this.hub.on("state", (state) => {
      if (state != "connected") this._offline();
      this._status(state);
    });
    if (connect) this.connect();
  }

  get connected() {
    return this.hub.state != "disconnected";
  }

  /** Connects (and stays connected, reconnecting with backoff) until disconnect(). */
  connect() {
    this.hub.connect();
    for (const room of [this.docRoom, this.awarenessRoom]) room.join().catch(() => {}); // errors: the room's "error" event
  }

  /** Goes offline: edits stay local until connect(), whose sync sends them. */
  disconnect() {
    this.hub.disconnect();
  }

  destroy() {
    removeAwarenessStates(this.awareness, [this.doc.clientID], "local");
    this.disconnect();
    this.doc.off("update", this._onUpdate);
    this.awareness.off("update", this._onAwareness);
    super.destroy();
  }

  _status(status) {
    if (status != this.status) this.emit("status", [{ status: (this.status = status) }]);
  }

  _setSynced(synced) {
    if (synced != this.synced) {
      this.synced = synced;
      this.emit("synced", [synced]);
    }
  }

  _apply(update) {
    try {
      Y.applyUpdate(this.doc, fromBase64(update), this);
    } catch (e) {
      this.emit("error", [e]);
    }
  }

  /** Sync step 1 to the server, step 2 back; then the client's own step 2 if it edited offline. */
  async _sync() {
    this._setSynced(false);
    const hadUnsent = this.unsent;
    this.unsent = false; // edits from now on: their own publication or the next sync
    let reply;
    try {
      reply = await this.hub.rpc("sync", { doc: this.name, sv: toBase64(Y.encodeStateVector(this.doc)) });
    } catch (e) {
      this.unsent ||= hadUnsent;
      if (e.code != "disconnected") {
        this.emit("error", [e]);
        setTimeout(() => this.docRoom.state == "joined" && !this.synced && this._sync(), 1000); // a re-join syncs anyway
      }
      return;
    }
    this._apply(reply.update);
    if (this.docRoom.state != "joined") return void (this.unsent ||= hadUnsent); // dropped meanwhile: the re-join syncs
    if (hadUnsent || this.unsent) {
      this.unsent = false;
      const missing = Y.encodeStateAsUpdate(this.doc, fromBase64(reply.sv));
      if (missing.length > EMPTY_UPDATE) this._publishUpdate(missing);
    }
    this._setSynced(true);
  }

  _publishUpdate(update) {
    this.pending++;
    this.docRoom
      .publish({ update: toBase64(update) })
      .catch((e) => {
        this.unsent = true; // the next sync sends it
        this.emit("error", [e]);
      })
      .finally(() => this.pending--);
  }

  _publishAwareness(hello) {
    const data = { awareness: toBase64(encodeAwarenessUpdate(this.awareness, [this.doc.clientID])) };
    if (hello) data.hello = true; // the others answer with their own state
    this.awarenessRoom.publish(data).catch(() => {}); // ephemeral: the next change or renewal resends it
  }

  _remoteAwareness(m) {
    if (m.from === this.hub.client || !m.data || typeof m.data.awareness != "string") return;
    const update = fromBase64(m.data.awareness);
    const ids = this.peers.get(m.from) || new Set();
    try {
      const decoder = decoding.createDecoder(update); // a count, then each client's id, clock, state
      if (decoding.readVarUint(decoder) > 0) ids.add(decoding.readVarUint(decoder)); // each peer sends its own state only
      this.peers.set(m.from, ids);
      applyAwarenessUpdate(this.awareness, update, this);
    } catch (e) {
      return this.emit("error", [e]);
    }
    if (m.data.hello) this._publishAwareness(false);
  }

  /** A hub client left the document: its cursors go. */
  _forget(client) {
    const ids = this.peers.get(client);
    this.peers.delete(client);
    if (ids) removeAwarenessStates(this.awareness, [...ids], this);
  }

  _offline() {
    this._setSynced(false);
    const others = [...this.awareness.getStates().keys()].filter((id) => id !== this.doc.clientID);
    removeAwarenessStates(this.awareness, others, this);
    this.peers.clear();
  }
}
