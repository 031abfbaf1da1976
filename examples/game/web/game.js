// The browser side of the wirehub arena: plain JavaScript, no bundler, no dependency.
// It speaks the game's binary protocol (examples/game/README.md, "Protocol") over one
// WebSocket: HELLO, then an INPUT every tick; it decodes each SNAPSHOT against the one it
// names as its base and acknowledges the newest. Other players are drawn 100 ms in the
// past, interpolated between the two snapshots around that moment (as Source does); our own
// player is predicted from the commands the server has not applied yet, and corrected when
// a snapshot disagrees.
"use strict";

const T = { HELLO: 0x01, INPUT: 0x02, BYE: 0x03, WELCOME: 0x12, SNAPSHOT: 0x13, BOARD: 0x14, NAMES: 0x15, ERROR: 0x1f };
const VERSION = 1;
const HELLO_MIN = 32;
const MAX_NAME = 16;
const MAX_CMDS = 4;
const POS = 8; // positions travel in 1/8 world units
const PELLET_BIT = 0x8000;
const KEEP_SNAPSHOTS = 32; // decoded snapshots kept (delta bases and the interpolation buffer)
const INTERP_MS = 100; // others are drawn this far in the past
const MAX_UNACKED = 120;

function clampVelocity(vx, vy, max) {
  const s2 = vx * vx + vy * vy;
  if (s2 <= max * max) return [vx, vy];
  const k = max / Math.sqrt(s2);
  return [vx * k, vy * k];
}

// the same as world.py's settle(): out of the obstacles, inside the walls
function settle(x, y, r, w, h, rects) {
  for (const [rx, ry, rw, rh] of rects) {
    const cx = Math.min(Math.max(x, rx), rx + rw);
    const cy = Math.min(Math.max(y, ry), ry + rh);
    const dx = x - cx, dy = y - cy;
    const d2 = dx * dx + dy * dy;
    if (d2 >= r * r) continue;
    if (d2 > 1e-9) {
      const d = Math.sqrt(d2);
      x = cx + (dx / d) * r;
      y = cy + (dy / d) * r;
    } else {
      const exits = [[x - rx + r, -1, 0], [rx + rw - x + r, 1, 0], [y - ry + r, 0, -1], [ry + rh - y + r, 0, 1]];
      let best = exits[0];
      for (const e of exits) if (e[0] < best[0]) best = e;
      x += best[1] * best[0];
      y += best[2] * best[0];
    }
  }
  return [Math.min(Math.max(x, r), w - r), Math.min(Math.max(y, r), h - r)];
}

class Game {
  constructor(url, name, canvas) {
    this.url = url;
    this.name = name;
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.keys = new Set();
    this.pointer = null; // world point the mouse holds, or null
    this.forced = null; // [vx, vy] set by setMove() (tests, scripts)
    this.retry = 500;
    this.reset();
    this.bindInput();
    requestAnimationFrame((t) => this.frame(t));
  }

  reset() {
    this.welcome = null;
    this.snapshots = []; // [{tick, state: Map id -> [x, y, score?], at}] oldest first
    this.tick = 0;
    this.serverAck = 0;
    this.seq = 0;
    this.unacked = []; // [seq, vx, vy]
    this.recent = [];
    this.me = null; // predicted [x, y]
    this.corrections = 0;
    this.offset = null; // local ms minus server ms, smallest seen (then drifting slowly)
    this.names = new Map();
    this.board = null;
    this.players = 0;
    this.lastSize = 0;
    this.renderTick = 0;
    this.rendered = new Map(); // id -> [x, y] drawn in the last frame
  }

  // ------------------------------------------------------------------ connection

  connect() {
    this.state = "connecting";
    const ws = (this.ws = new WebSocket(this.url));
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      this.state = "connected";
      this.retry = 500;
      ws.send(this.hello());
    };
    ws.onmessage = (ev) => this.receive(new DataView(ev.data));
    ws.onclose = () => {
      clearInterval(this.timer);
      this.timer = null;
      this.state = `disconnected; retrying in ${(this.retry / 1000).toFixed(1)} s`;
      setTimeout(() => { this.reset(); this.connect(); }, this.retry);
      this.retry = Math.min(this.retry * 2, 5000);
    };
  }

  hello() {
    let text = [...this.name].filter((ch) => ch >= " ").join("").trim();
    while (new TextEncoder().encode(text).length > MAX_NAME) text = [...text].slice(0, -1).join(""); // whole characters
    const name = new TextEncoder().encode(text);
    const out = new Uint8Array(Math.max(HELLO_MIN, 4 + name.length));
    out.set([T.HELLO, VERSION, 0, name.length]);
    out.set(name, 4);
    return out;
  }

  receive(dv) {
    if (dv.byteLength === 0) return;
    switch (dv.getUint8(0)) {
      case T.WELCOME: return this.onWelcome(dv);
      case T.SNAPSHOT: return this.onSnapshot(dv);
      case T.BOARD: return this.onBoard(dv);
      case T.NAMES: return this.onNames(dv);
      case T.ERROR: this.error = new TextDecoder().decode(new Uint8Array(dv.buffer, 1)); return;
    }
  }

  onWelcome(dv) {
    const rects = [];
    for (let i = 0, n = dv.getUint8(19); i < n; i++) {
      const at = 20 + i * 8;
      rects.push([dv.getUint16(at, true), dv.getUint16(at + 2, true), dv.getUint16(at + 4, true), dv.getUint16(at + 6, true)]);
    }
    this.welcome = {
      player: dv.getUint16(2, true), token: dv.getUint32(4, true), tickHz: dv.getUint8(8), width: dv.getUint16(9, true), height: dv.getUint16(11, true),
      radius: dv.getUint8(13), pelletRadius: dv.getUint8(14), maxSpeed: dv.getUint16(15, true), view: dv.getUint16(17, true), obstacles: rects,
    };
    this.names.set(this.welcome.player, this.name);
    if (!this.timer) this.timer = setInterval(() => this.sendInput(), 1000 / this.welcome.tickHz);
  }

  onSnapshot(dv) {
    const tick = dv.getUint32(1, true), base = dv.getUint32(5, true), ack = dv.getUint32(9, true);
    const nRemoved = dv.getUint8(13), nRecords = dv.getUint8(14);
    if (tick <= this.tick) return; // late: a newer one is decoded already
    let state;
    if (base === 0) state = new Map();
    else {
      const from = this.snapshots.find((s) => s.tick === base);
      if (!from) return; // a base we no longer hold: our ack stays older, the server sends a full one
      state = new Map(from.state);
    }
    let at = 15;
    for (let i = 0; i < nRemoved; i++, at += 2) state.delete(dv.getUint16(at, true));
    for (let i = 0; i < nRecords; i++) {
      const id = dv.getUint16(at, true);
      if (id & PELLET_BIT) {
        state.set(id, [dv.getUint16(at + 2, true) / POS, dv.getUint16(at + 4, true) / POS]);
        at += 6;
      } else {
        state.set(id, [dv.getUint16(at + 2, true) / POS, dv.getUint16(at + 4, true) / POS, dv.getUint16(at + 6, true)]);
        at += 8;
      }
    }
    const now = performance.now();
    const sample = now - (tick * 1000) / this.welcome.tickHz;
    this.offset = this.offset === null || sample < this.offset ? sample : this.offset + (sample - this.offset) * 0.01;
    this.snapshots.push({ tick, state, at: now });
    if (this.snapshots.length > KEEP_SNAPSHOTS) this.snapshots.shift();
    this.tick = tick;
    this.serverAck = ack;
    this.lastSize = dv.byteLength;
    this.reconcile(state);
  }

  onBoard(dv) {
    this.players = dv.getUint16(1, true);
    const top = [];
    let at = 4;
    for (let i = 0, n = dv.getUint8(3); i < n; i++) {
      const id = dv.getUint16(at, true), score = dv.getUint16(at + 2, true), len = dv.getUint8(at + 4);
      const name = new TextDecoder().decode(new Uint8Array(dv.buffer, at + 5, len));
      this.names.set(id, name);
      top.push([id, score, name]);
      at += 5 + len;
    }
    this.board = top;
    this.drawBoard();
  }

  onNames(dv) {
    let at = 2;
    for (let i = 0, n = dv.getUint8(1); i < n; i++) {
      const len = dv.getUint8(at + 2);
      this.names.set(dv.getUint16(at, true), new TextDecoder().decode(new Uint8Array(dv.buffer, at + 3, len)));
      at += 3 + len;
    }
  }

  // ------------------------------------------------------------------ our player: input, prediction

  velocity() {
    if (this.forced) return this.forced;
    let dx = 0, dy = 0;
    if (this.keys.has("ArrowLeft") || this.keys.has("a")) dx -= 1;
    if (this.keys.has("ArrowRight") || this.keys.has("d")) dx += 1;
    if (this.keys.has("ArrowUp") || this.keys.has("w")) dy -= 1;
    if (this.keys.has("ArrowDown") || this.keys.has("s")) dy += 1;
    if (this.pointer && this.me) {
      dx = this.pointer[0] - this.me[0];
      dy = this.pointer[1] - this.me[1];
      if (Math.hypot(dx, dy) < this.welcome.radius / 2) dx = dy = 0;
    }
    const len = Math.hypot(dx, dy);
    return len ? [(dx / len) * this.welcome.maxSpeed, (dy / len) * this.welcome.maxSpeed] : [0, 0];
  }

  step(x, y, vx, vy) {
    const w = this.welcome;
    [vx, vy] = clampVelocity(vx, vy, w.maxSpeed);
    return settle(x + vx / w.tickHz, y + vy / w.tickHz, w.radius, w.width, w.height, w.obstacles);
  }

  sendInput() {
    if (!this.welcome || this.ws.readyState !== WebSocket.OPEN) return;
    const [vx, vy] = this.velocity().map((v) => Math.max(-32768, Math.min(32767, Math.trunc(v))));
    this.seq += 1;
    this.unacked.push([this.seq, vx, vy]);
    if (this.unacked.length > MAX_UNACKED) this.unacked.shift();
    this.recent.push([vx, vy]);
    if (this.recent.length > MAX_CMDS) this.recent.shift();
    if (this.me) this.me = this.step(this.me[0], this.me[1], vx, vy);
    const out = new DataView(new ArrayBuffer(14 + 4 * this.recent.length));
    out.setUint8(0, T.INPUT);
    out.setUint32(1, this.welcome.token, true); // the session's token, from its WELCOME
    out.setUint32(5, this.tick, true);
    out.setUint32(9, this.seq, true);
    out.setUint8(13, this.recent.length);
    this.recent.forEach(([cx, cy], i) => { out.setInt16(14 + 4 * i, cx, true); out.setInt16(16 + 4 * i, cy, true); });
    this.ws.send(out.buffer);
  }

  reconcile(state) {
    const mine = state.get(this.welcome.player);
    if (!mine) return;
    while (this.unacked.length && this.unacked[0][0] <= this.serverAck) this.unacked.shift();
    let [x, y] = mine;
    for (const [, vx, vy] of this.unacked) [x, y] = this.step(x, y, vx, vy);
    if (this.me && Math.hypot(x - this.me[0], y - this.me[1]) > 1) this.corrections += 1;
    this.me = [x, y];
  }

  setMove(vx, vy) { this.forced = vx === null ? null : [vx, vy]; }

  bindInput() {
    addEventListener("keydown", (e) => { this.keys.add(e.key.length === 1 ? e.key.toLowerCase() : e.key); });
    addEventListener("keyup", (e) => { this.keys.delete(e.key.length === 1 ? e.key.toLowerCase() : e.key); });
    addEventListener("blur", () => this.keys.clear());
    const point = (e) => { this.pointer = this.toWorld(e.clientX, e.clientY); };
    this.canvas.addEventListener("pointerdown", (e) => { this.canvas.setPointerCapture(e.pointerId); point(e); });
    this.canvas.addEventListener("pointermove", (e) => { if (this.pointer) point(e); });
    this.canvas.addEventListener("pointerup", () => { this.pointer = null; });
  }

  // ------------------------------------------------------------------ others: interpolation

  // Every entity as it was INTERP_MS ago, between the two snapshots around that moment.
  interpolated() {
    const out = new Map();
    const snaps = this.snapshots;
    if (!snaps.length || this.offset === null) return out;
    const renderMs = performance.now() - this.offset - INTERP_MS;
    const rt = (this.renderTick = (renderMs * this.welcome.tickHz) / 1000);
    let a = snaps[0], b = snaps[snaps.length - 1];
    if (rt <= a.tick) b = a;
    else if (rt >= b.tick) a = b;
    else for (let i = snaps.length - 1; i > 0; i--) if (snaps[i - 1].tick <= rt) { a = snaps[i - 1]; b = snaps[i]; break; }
    const t = b.tick === a.tick ? 1 : (rt - a.tick) / (b.tick - a.tick);
    for (const [id, fb] of b.state) {
      const fa = a.state.get(id);
      out.set(id, fa ? [fa[0] + (fb[0] - fa[0]) * t, fa[1] + (fb[1] - fa[1]) * t, fb[2]] : fb);
    }
    return out;
  }

  // ------------------------------------------------------------------ drawing

  toWorld(px, py) {
    const v = this.camera;
    return v ? [v.x + (px * devicePixelRatio - this.canvas.width / 2) / v.scale, v.y + (py * devicePixelRatio - this.canvas.height / 2) / v.scale] : null;
  }

  frame() {
    requestAnimationFrame((t) => this.frame(t));
    const c = this.canvas, g = this.ctx;
    const w = Math.round(c.clientWidth * devicePixelRatio), h = Math.round(c.clientHeight * devicePixelRatio);
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    g.fillStyle = "#10141b";
    g.fillRect(0, 0, w, h);
    document.getElementById("status").textContent = this.statusLine();
    const W = this.welcome;
    if (!W || !this.me) return;
    const scale = Math.min(w, h * 1.5) / (2.6 * W.view);
    const cam = (this.camera = { x: this.me[0], y: this.me[1], scale });
    g.save();
    g.translate(w / 2, h / 2);
    g.scale(scale, scale);
    g.translate(-cam.x, -cam.y);
    g.fillStyle = "#161b24";
    g.fillRect(0, 0, W.width, W.height);
    g.strokeStyle = "#1f2633";
    g.lineWidth = 1 / scale;
    g.beginPath();
    for (let x = 0; x <= W.width; x += 100) { g.moveTo(x, 0); g.lineTo(x, W.height); }
    for (let y = 0; y <= W.height; y += 100) { g.moveTo(0, y); g.lineTo(W.width, y); }
    g.stroke();
    g.strokeStyle = "#4c566a";
    g.lineWidth = 4;
    g.strokeRect(0, 0, W.width, W.height);
    g.fillStyle = "#3b4252";
    for (const [x, y, rw, rh] of W.obstacles) g.fillRect(x, y, rw, rh);
    const seen = this.interpolated();
    seen.set(W.player, [this.me[0], this.me[1], (seen.get(W.player) || [0, 0, 0])[2]]);
    this.rendered = seen;
    g.fillStyle = "#ebcb8b";
    for (const [id, [x, y]] of seen) {
      if (!(id & PELLET_BIT)) continue;
      g.beginPath();
      g.arc(x, y, W.pelletRadius, 0, 2 * Math.PI);
      g.fill();
    }
    g.textAlign = "center";
    g.font = `${Math.round(13 / scale * devicePixelRatio)}px system-ui, sans-serif`;
    for (const [id, [x, y, score]] of seen) {
      if (id & PELLET_BIT) continue;
      g.beginPath();
      g.arc(x, y, W.radius, 0, 2 * Math.PI);
      g.fillStyle = `hsl(${(id * 137) % 360} 65% 60%)`;
      g.fill();
      if (id === W.player) { g.lineWidth = 3; g.strokeStyle = "#fff"; g.stroke(); }
      g.fillStyle = "#d8dee9";
      g.fillText(`${this.names.get(id) || "#" + id} ${score}`, x, y - W.radius - 6);
    }
    g.restore();
  }

  statusLine() {
    if (this.error && this.state !== "connected") return `${this.state}: ${this.error}`;
    if (!this.welcome) return `${this.state} to ${this.url}`;
    const others = [...(this.snapshots.at(-1)?.state.keys() || [])].filter((id) => !(id & PELLET_BIT)).length;
    return `${this.state} · player #${this.welcome.player} · ${this.players} playing, ${others} in view · tick ${this.tick} · `
      + `last snapshot ${this.lastSize} B · others drawn ${INTERP_MS} ms behind · ${this.corrections} corrections`;
  }

  drawBoard() {
    const ol = document.getElementById("top");
    ol.replaceChildren(...this.board.map(([id, score, name]) => {
      const li = document.createElement("li");
      li.textContent = `${name} — ${score}`;
      if (this.welcome && id === this.welcome.player) li.className = "me";
      return li;
    }));
    document.getElementById("count").textContent = `${this.players} players`;
  }
}

const params = new URLSearchParams(location.search);
const meta = document.querySelector('meta[name="wirehub-game-ws"]').content;
const url = params.get("ws") || (meta.startsWith("ws") ? meta : `ws://${location.hostname || "127.0.0.1"}:7401/`);
const name = params.get("name") || `guest${Math.floor(Math.random() * 1000)}`;
const game = (window.game = new Game(url, name, document.getElementById("arena")));
game.connect();
