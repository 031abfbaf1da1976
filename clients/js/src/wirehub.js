// wirehub-client: the hub's WebSocket client for browsers and Node 20+.
// Reconnect with full-jitter backoff, re-join with recovery (since/epoch), heartbeats, token
// refresh, and requests matched to their replies by ref. The types are in wirehub.d.ts; the
// guide is docs/js-client.md. No dependencies in a browser; `ws` in Node without WebSocket.

/** An error the hub sent (its SPEC code), or one of the client's own: timeout, disconnected, limit, cancelled. */
export class HubError extends Error {
  constructor(code, message, frame) {
    super(`${code}: ${message}`);
    this.name = "HubError";
    this.code = code;
    this.frame = frame;
  }
}

const noop = () => {};
const later = setTimeout;
const RESTART_CAP = 2000; // ms: the largest reconnect wait while a hub that said bye shutdown restarts

class Emitter {
  #on = {};
  /** Calls fn(...args) on each `event`; returns a function that removes it. */
  on(event, fn) {
    (this.#on[event] ||= new Set()).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this.#on[event]?.delete(fn);
  }
  _emit(event, ...args) {
    for (const fn of [...(this.#on[event] || [])]) {
      try {
        fn(...args);
      } catch (e) {
        later(() => { throw e; }); // a listener's bug is reported, and never breaks the client
      }
    }
  }
}

/** The `exp` claim of a JWT, in ms; 0 when it has none or is not a JWT. */
const expiry = (token) => {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).exp * 1000 || 0;
  } catch {
    return 0;
  }
};

export class Hub extends Emitter {
  /**
   * @param {string} url ws:// or wss:// address of the hub's WebSocket listener
   * @param {object} [options] see HubOptions in wirehub.d.ts
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      timeout: 10000,
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      pongTimeout: 10000,
      offline: "queue",
      maxQueue: 100,
      ...options,
    };
    this.state = "disconnected";
    this.client = this.user = null;
    /** @type {Map<string, Room>} */
    this.rooms = new Map();
    this.#token = options.token;
  }

  // null when disconnected; a Symbol while an attempt prepares or waits to reconnect; else the WebSocket
  #ws = null;
  #ref = 0;
  #pending = new Map(); // ref -> request, queued or sent
  #queue = []; // requests waiting for the connection, in call order
  #attempt = 0; // reconnect attempts since the last welcome
  #restarting = false; // the last drop was a bye shutdown: retries are capped at RESTART_CAP
  #timer = null; // the reconnect wait, or the handshake deadline
  #renew = null; // the token refresh
  #beat = null; // the heartbeat interval
  #pong = null; // set when a ping went out and nothing came back yet
  #token;
  #fresh = false; // the token came from getToken for this attempt

  /** Opens the connection (and keeps it open, reconnecting) until disconnect() or a bye that says not to. */
  connect() {
    if (this.state != "disconnected") return;
    this.#set("connecting");
    this.#open();
  }

  /** Closes the connection for good: no reconnect; unanswered and queued requests fail with code disconnected. */
  disconnect() {
    this.#drop("client", false);
  }

  /** The room object for `name` (one per name): join it, listen to it, publish to it. */
  room(name) {
    let room = this.rooms.get(name);
    if (!room) this.rooms.set(name, (room = new Room(this, name)));
    return room;
  }

  /** Publishes `data` to a room (membership is not needed); resolves with its seq. */
  async publish(room, data) {
    return (await this.request({ op: "pub", room, data })).seq;
  }

  /** Sends `data` to one client; resolves once the hub delivered it. */
  async send(to, data) {
    await this.request({ op: "send", to, data });
  }

  /** Calls the application's handler for `method`; resolves with its result data. */
  async rpc(method, data) {
    return (await this.request({ op: "rpc", method, data })).data;
  }

  /**
   * Sends one frame with a fresh `ref` and resolves with the reply that carries it (rejects
   * with a HubError for an `error` reply, after `timeout` ms, or when the connection drops
   * before the reply). While the client is connecting the frame waits in a bounded queue
   * (options.offline "queue") or is refused at once ("refuse"); when disconnected it is refused.
   */
  request(frame, timeout = this.options.timeout) {
    return new Promise((resolve, reject) => this.#call(frame, timeout, (e, f) => (e ? reject(e) : resolve(f))));
  }

  /** request() with a callback, called synchronously with the reply (for the room's joined). */
  _call(frame, done) {
    this.#call(frame, this.options.timeout, done);
  }

  #call(frame, timeout, done, now) {
    const o = this.options;
    const ref = ++this.#ref;
    const req = { frame: { ...frame, ref }, done, sent: false };
    if (now || this.state == "connected") this.#write(req);
    else if (this.state == "disconnected" || o.offline != "queue")
      return done(new HubError("disconnected", this.state == "disconnected" ? "not connected: call connect() first" : "not connected, and options.offline is refuse"));
    else if (this.#queue.length >= o.maxQueue)
      return done(new HubError("limit", `${o.maxQueue} frames already wait for the connection (options.maxQueue)`));
    else this.#queue.push(req);
    this.#pending.set(ref, req);
    req.timer = later(() => {
      this.#pending.delete(ref);
      this.#queue = this.#queue.filter((r) => r != req);
      done(new HubError("timeout", `no reply to ${frame.op} within ${timeout} ms` + (req.sent ? "; the hub may still apply it" : "; it was never sent")));
    }, timeout);
  }

  #write(req) {
    req.sent = true;
    try {
      this.#ws.send(JSON.stringify(req.frame));
    } catch (e) {
      this.#drop("error", true, e); // a socket that cannot send is a dead one
    }
  }

  #set(state) {
    const prev = this.state;
    if (prev != state) {
      this.state = state;
      this._emit("state", state, prev);
    }
  }

  async #open() {
    const o = this.options;
    const mine = (this.#ws = Symbol()); // a newer attempt or a disconnect() replaces it
    try {
      if (!this.#token && o.getToken) {
        this.#token = await o.getToken();
        this.#fresh = true;
        if (!this.#token) throw new HubError("unauthorized", "getToken gave no token");
      }
      const WS = o.WebSocket || globalThis.WebSocket || (await import("ws")).default;
      if (this.#ws != mine) return;
      const ws = (this.#ws = new WS(this.url));
      ws.onerror = noop; // close follows
      ws.onclose = (e) => this.#drop("closed", true, e.code);
      ws.onmessage = (e) => this.#frame(e.data);
      ws.onopen = () =>
        this.#call({ op: "hello", token: this.#token || undefined, name: o.name }, o.timeout, (e, w) => {
          if (this.#ws != ws) return;
          if (!e) return this.#welcome(w);
          const stale = (e.code == "unauthorized" || e.code == "forbidden") && o.getToken && !this.#fresh;
          if (stale) this.#token = null; // the next attempt asks getToken for a new one
          this.#drop(e.code, !!stale || e.code == "timeout", e); // any other refusal stops the client
        }, true);
      this.#timer = later(() => this.#drop("timeout", true, new HubError("timeout", `no welcome within ${o.timeout} ms`)), o.timeout);
    } catch (e) {
      if (this.#ws != mine) return;
      this._emit("error", e);
      this.#drop("error", !(e.code == "unauthorized" || e instanceof SyntaxError), e);
    }
  }

  #welcome(w) {
    clearTimeout(this.#timer);
    this.#attempt = 0;
    this.#restarting = false;
    this.#fresh = false;
    this.client = w.client;
    this.user = w.user;
    this.#set("connected");
    const every = w.heartbeat * 1000;
    if (every > 0)
      this.#beat = setInterval(() => {
        this.#write({ frame: { op: "ping" } });
        this.#pong ??= later(() => this.#drop("heartbeat", true, new HubError("timeout", "no pong from the hub")), Math.min(this.options.pongTimeout, every));
      }, every);
    this.#refresh(false);
    for (const room of this.rooms.values()) if (room.state != "left") room._join();
    const queued = this.#queue;
    this.#queue = [];
    for (const req of queued) this.state == "connected" ? this.#write(req) : this.#queue.push(req);
    if (this.state == "connected") this._emit("connected", w);
  }

  /** Schedules (now false) or makes (now true) a token refresh before the token expires. */
  async #refresh(now) {
    const o = this.options;
    if (!o.getToken) return;
    if (now)
      try {
        const token = await o.getToken();
        if (!token) throw new HubError("unauthorized", "getToken gave no token");
        this.#token = token;
        if (this.state != "connected") return;
        this._emit("refreshed", await this.request({ op: "refresh", token }));
      } catch (e) {
        return this._emit("error", e); // the hub then says bye auth_expired, and the reconnect gets a new token
      }
    const left = expiry(this.#token) - Date.now();
    clearTimeout(this.#renew);
    if (left > 0 && this.state == "connected") this.#renew = later(() => this.#refresh(true), left - Math.min(30000, left / 2));
  }

  #frame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    clearTimeout(this.#pong); // any frame shows the connection is alive
    this.#pong = null;
    const req = f.ref != null && this.#pending.get(f.ref);
    if (req) {
      this.#pending.delete(f.ref);
      clearTimeout(req.timer);
      return f.op == "error" ? req.done(new HubError(f.code, f.message, f)) : req.done(null, f);
    }
    const room = f.room != null && this.rooms.get(f.room);
    if (f.op == "bye") this.#drop(f.reason, f.reconnect !== false, f);
    else if (f.op == "error") this._emit("error", new HubError(f.code, f.message, f));
    else if (f.op == "msg" && f.room == null) this._emit("message", f);
    else if (room) room._frame(f);
  }

  /** The connection is gone (or disconnect()): fail what was sent, then reconnect or stop. */
  #drop(reason, reconnect, detail) {
    if (this.state == "disconnected") return;
    const ws = this.#ws;
    this.#ws = null;
    if (ws?.close) {
      ws.onclose = ws.onmessage = ws.onopen = noop;
      try {
        ws.close(1000);
      } catch {}
    }
    for (const t of [this.#timer, this.#renew, this.#pong]) clearTimeout(t);
    clearInterval(this.#beat);
    this.#pong = this.#beat = null;
    if (reason == "auth_expired") this.#token = null;
    const lost = new HubError("disconnected", reconnect ? `the connection closed (${reason}) before the hub answered; the hub may or may not have applied the frame` : `disconnected (${reason})`);
    for (const [ref, req] of this.#pending)
      if (req.sent || !reconnect) {
        this.#pending.delete(ref);
        clearTimeout(req.timer);
        req.done(lost);
      }
    for (const room of this.rooms.values()) reconnect ? room._lost() : room._closed(lost);
    const o = this.options;
    // full jitter: a random wait up to a cap that doubles per attempt (0.25 s after a drain's bye
    // shutdown, then at most RESTART_CAP until the restarted hub answers)
    if (reason == "shutdown") this.#restarting = true;
    const cap = this.#restarting ? Math.min(o.maxReconnectDelay, RESTART_CAP) : o.maxReconnectDelay;
    const delay = Math.random() * (reason == "shutdown" ? 250 : Math.min(cap, o.minReconnectDelay * 2 ** this.#attempt++));
    if (reconnect) {
      this.#set("connecting");
      this.#ws = Symbol(); // waiting
      this.#timer = later(() => this.#open(), delay);
      this._emit("reconnecting", { reason, delay, detail });
    } else {
      this.#queue = [];
      this.#set("disconnected");
      this._emit("disconnected", { reason, detail });
    }
  }
}

export class Room extends Emitter {
  constructor(hub, name) {
    super();
    this.hub = hub;
    this.name = name;
    this.state = "left";
    this.seq = this.epoch = this.presenceMode = null;
    this.recovered = false;
  }

  #waiting = []; // [resolve, reject] of join() calls
  #try = 0; // the join attempt whose reply counts

  /** Joins (and re-joins after every reconnect, recovering what it missed); resolves once joined. */
  join() {
    if (this.state == "joined") return Promise.resolve(this);
    return new Promise((resolve, reject) => {
      this.#waiting.push([resolve, reject]);
      if (this.state == "left") {
        this.#set("joining");
        if (this.hub.state == "connected") this._join(); // else the welcome joins it
      }
    });
  }

  /** Leaves the room; the next join starts afresh (no recovery). */
  async leave() {
    if (this.state == "left") return;
    this.#try++;
    this.seq = this.epoch = null;
    this.#set("left");
    this.#settle(1, new HubError("cancelled", `left ${this.name} before the join completed`));
    if (this.hub.state == "connected") await this.hub.request({ op: "leave", room: this.name }).catch(noop);
  }

  publish(data) {
    return this.hub.publish(this.name, data);
  }

  /** The members, as {client, user, name} objects. */
  async presence() {
    return (await this.hub.request({ op: "presence", room: this.name })).members;
  }

  /** A page of history, oldest first: {messages, epoch, more}; {before: messages[0].seq} asks for the page before. */
  async history({ limit, before } = {}) {
    const f = await this.hub.request({ op: "history", room: this.name, limit, before });
    return { messages: f.messages, epoch: f.epoch, more: !!f.more };
  }

  _join() {
    const n = ++this.#try;
    const since = this.seq;
    const epoch = this.epoch;
    const frame = { op: "join", room: this.name };
    if (since != null) Object.assign(frame, { since, epoch });
    this.hub._call(frame, (e, f) => {
      if (e) {
        if (n != this.#try || e.code == "disconnected") return; // the reconnect re-joins
        this.#try++;
        this.#set("left");
        if (e.code == "timeout") this.hub.request({ op: "leave", room: this.name }).catch(noop); // in case it arrives late
        this._emit("error", e);
        return this.#settle(1, e);
      }
      if (n != this.#try) return;
      const wasRecovering = since != null;
      const recovered = (this.recovered = wasRecovering && !!f.recovered);
      const epochChanged = wasRecovering && f.epoch != epoch;
      if (!recovered) this.seq = f.seq;
      this.epoch = f.epoch;
      this.presenceMode = f.presence ?? null;
      this.#set("joined");
      this._emit("joined", { seq: f.seq, epoch: f.epoch, recovered, wasRecovering, presence: this.presenceMode });
      if (wasRecovering && !recovered && (epochChanged || f.seq > since))
        this._emit("gap", { from: since + 1, to: epochChanged ? null : f.seq, epochChanged });
      this.#settle(0, this);
    });
  }

  _frame(f) {
    if (this.state != "joined") return;
    if (f.op == "msg") {
      if (f.seq == null) return this._emit("msg", f); // published without history: no seq to follow
      const last = this.seq;
      if (last != null && f.seq <= last) return; // already delivered
      if (last != null && f.seq > last + 1) this._emit("gap", { from: last + 1, to: f.seq - 1, epochChanged: false });
      this.seq = f.seq;
      this._emit("msg", f);
    } else if (f.op == "join" || f.op == "leave") this._emit(f.op, f);
    else if (f.op == "presence_diff") {
      if (f.presence) this.presenceMode = f.presence;
      for (const m of f.leaves || []) this._emit("leave", m);
      for (const m of f.joins || []) this._emit("join", m);
    }
  }

  _lost() {
    this.#try++;
    if (this.state == "joined") this.#set("joining");
  }

  _closed(err) {
    this.#try++;
    if (this.state != "left") this.#set("left");
    this.#settle(1, err);
  }

  #settle(i, value) {
    const waiting = this.#waiting;
    this.#waiting = [];
    for (const w of waiting) w[i](value);
  }

  #set(state) {
    const prev = this.state;
    if (prev != state) {
      this.state = state;
      this._emit("state", state, prev);
    }
  }
}
