// wirehub's admin dashboard. One WebSocket (/api/live) brings a tick every second: totals,
// the hub's rooms and nodes, and one page of the connection table as this page asked for it.
// Actions go to the admin API with the token as a bearer header; the token is never in a URL.
"use strict";

const $ = (id) => document.getElementById(id);
const WINDOW = 120; // seconds of history each chart shows
const COLORS = ["--c0", "--c1", "--c2", "--c3", "--c4", "--c5"].map((v) => getComputedStyle(document.documentElement).getPropertyValue(v).trim() || "#4aa3ff");

let token = sessionStorage.getItem("wirehub-admin-token") || "";
let ws = null;
let retry = 0;
let refused = false;
let prev = null; // the previous tick, for rates
let roomSeq = new Map(); // room -> [seq, epoch, t] of the previous tick
let lastTick = null;
const query = { state: "open", sort: "connected_at", order: "asc", offset: 0, limit: 50, transport: "", user: "", room: "", peer: "" };

// ------------------------------------------------------------------ formatting

const nf = new Intl.NumberFormat("en-US");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const num = (n) => (n == null ? "–" : nf.format(Math.round(n)));
function rate(n) {
  if (n == null) return "–";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return n >= 10 ? String(Math.round(n)) : n.toFixed(n ? 1 : 0);
}
function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}
function duration(s) {
  if (s == null) return "–";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

// ------------------------------------------------------------------ charts (canvas, no library)

class Chart {
  constructor(canvas, unit) {
    this.canvas = canvas;
    this.unit = unit || ((v) => rate(v));
    this.series = new Map(); // name -> [values]
    this.times = [];
    const legend = document.createElement("div");
    legend.className = "legend";
    canvas.after(legend);
    this.legend = legend;
  }
  push(t, values) {
    this.times.push(t);
    for (const name of Object.keys(values)) if (!this.series.has(name)) this.series.set(name, this.times.map(() => null));
    for (const [name, list] of this.series) list.push(values[name] ?? 0);
    if (this.times.length > WINDOW + 1) {
      this.times.shift();
      for (const list of this.series.values()) list.shift();
    }
    this.draw();
  }
  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    let max = 0;
    for (const list of this.series.values()) for (const v of list) if (v != null && v > max) max = v;
    const top = niceCeil(max);
    g.font = "10px system-ui, sans-serif";
    const left = 8 + Math.max(...[0, 0.5, 1].map((f) => g.measureText(this.unit(top * f)).width)), bottom = h - 14, right = w - 4;
    g.strokeStyle = "#27313c"; g.fillStyle = "#8595a6"; g.lineWidth = 1;
    for (const f of [0, 0.5, 1]) {
      const y = Math.round(bottom - f * (bottom - 6)) + 0.5;
      g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
      g.textAlign = "right"; g.fillText(this.unit(top * f), left - 4, y + 3);
    }
    const n = this.times.length, now = this.times[n - 1];
    // the window grows to WINDOW seconds as samples come, so a fresh page is not empty
    const span = Math.max(30, Math.min(WINDOW, Math.ceil(now - this.times[0])));
    g.textAlign = "left"; g.fillText(`-${span}s`, left, h - 2); g.textAlign = "right"; g.fillText("now", right, h - 2);
    const x = (t) => left + (right - left) * (1 - (now - t) / span);
    const y = (v) => bottom - (top ? v / top : 0) * (bottom - 6);
    let i = 0;
    const legend = [];
    for (const [name, list] of this.series) {
      const color = COLORS[i % COLORS.length];
      g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
      let started = false;
      for (let k = 0; k < n; k++) {
        if (list[k] == null) continue;
        const px = x(this.times[k]), py = y(list[k]);
        if (!started) { g.moveTo(px, py); started = true; } else g.lineTo(px, py);
      }
      g.stroke();
      legend.push(`<span><i class="l${i % COLORS.length}"></i>${esc(name)} ${esc(this.unit(list[n - 1] ?? 0))}</span>`);
      i++;
    }
    this.legend.innerHTML = legend.join("");
  }
}
function niceCeil(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

const charts = {
  conns: new Chart($("chart-conns"), (v) => rate(v)),
  frames: new Chart($("chart-frames")),
  bytes: new Chart($("chart-bytes"), (v) => bytes(v) + "/s"),
  drops: new Chart($("chart-drops")),
  lag: new Chart($("chart-lag"), (v) => (v >= 10 ? Math.round(v) : v.toFixed(1)) + " ms"),
  pubs: new Chart($("chart-pubs")),
};
window.addEventListener("resize", () => Object.values(charts).forEach((c) => c.draw()));

// ------------------------------------------------------------------ the live stream

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "pill " + kind;
}

function liveQuery() {
  const q = {};
  for (const [k, v] of Object.entries(query)) if (v !== "" && v != null) q[k] = String(v);
  return q;
}

function connect() {
  if (ws) { ws.onclose = null; ws.close(); }
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/api/live";
  ws = new WebSocket(url);
  setStatus("connecting", "wait");
  ws.onopen = () => ws.send(JSON.stringify({ token, conns: liveQuery() }));
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "error") {
      if (msg.error === "unauthorized") { refused = true; askToken(token ? "That token was refused." : ""); }
      else showConnsError(msg.message);
      return;
    }
    if (msg.type === "welcome") {
      retry = 0;
      refused = false;
      setStatus("live", "ok");
      const n = msg.node;
      $("node").textContent = `${n.host} · pid ${n.pid}${n.worker != null ? " · worker " + n.worker : ""} · wirehub ${n.version}`;
      return;
    }
    if (msg.type === "tick") tick(msg);
  };
  ws.onclose = (event) => {
    if (refused || event.code === 4401) return; // the token dialog is open
    setStatus("disconnected: retrying", "bad");
    const wait = Math.min(10000, 500 * 2 ** retry++);
    setTimeout(connect, wait);
  };
}

function sendQuery() {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ conns: liveQuery() }));
}

// ------------------------------------------------------------------ one tick

function tick(msg) {
  const t = msg.t, tot = msg.totals, app = msg.app;
  lastTick = msg;
  const dt = prev ? Math.max(0.001, t - prev.t) : null;
  const per = (key) => (prev && dt ? Math.max(0, (tot[key] - prev.totals[key]) / dt) : null);
  const fin = per("frames_in"), fout = per("frames_out"), bin = per("bytes_in"), bout = per("bytes_out");
  const drops = per("frames_dropped"), slow = per("slow_consumer");
  $("total-connections").textContent = num(tot.connections);
  $("by-transport").textContent = Object.entries(tot.by_transport).sort().map(([k, v]) => `${k} ${num(v)}`).join(" · ") || "none open";
  $("frames-rate").textContent = fin == null ? "–" : `${rate(fin)} · ${rate(fout)}`;
  $("frames-total").textContent = `total ${num(tot.frames_in)} in · ${num(tot.frames_out)} out`;
  $("bytes-rate").textContent = bin == null ? "–" : `${bytes(bin)} · ${bytes(bout)}`;
  $("bytes-total").textContent = `total ${bytes(tot.bytes_in)} in · ${bytes(tot.bytes_out)} out`;
  $("dropped-rate").textContent = drops == null ? "–" : rate(drops);
  $("slow-total").textContent = `${num(tot.frames_dropped)} in all · ${num(tot.slow_consumer)} slow consumers cut`;
  $("lag").textContent = (tot.loop_lag * 1000).toFixed(1) + " ms";
  $("send-buffer").textContent = `${bytes(tot.send_buffer)} queued to peers`;
  $("draining").hidden = !msg.node.draining;
  $("drain").disabled = msg.node.draining;
  $("updated").textContent = "updated " + new Date(t * 1000).toLocaleTimeString();
  const pubs = app && prev && prev.app && dt ? Math.max(0, (app.published - prev.app.published) / dt) : null;
  if (app) {
    $("rooms-total").textContent = `${num(app.rooms_total)} · ${num(app.members)}`;
    $("pubs-rate").textContent = `${pubs == null ? "–" : rate(pubs)} publications/s · ${num(app.joins)} joins`;
  }
  const byT = {};
  for (const k of Object.keys(tot.by_transport).sort()) byT[k] = tot.by_transport[k];
  if (!Object.keys(byT).length) byT.all = 0;
  charts.conns.push(t, byT);
  if (prev) {
    charts.frames.push(t, { in: fin, out: fout });
    charts.bytes.push(t, { in: bin, out: bout });
    charts.drops.push(t, { dropped: drops, "slow consumers": slow });
    if (app) charts.pubs.push(t, { published: pubs });
  }
  charts.lag.push(t, { lag: tot.loop_lag * 1000 });
  if (app) { renderRooms(app, t); renderNodes(app); }
  else { $("rooms-panel").hidden = true; $("nodes-panel").hidden = true; }
  if (msg.app_error) $("rooms-note").textContent = "(" + msg.app_error + ")";
  renderConns(msg.conns, t);
  prev = msg;
}

function renderRooms(app, t) {
  const next = new Map();
  const rows = app.rooms.map((r) => {
    const before = roomSeq.get(r.room);
    const pubs = before && before[1] === r.epoch && t > before[2] ? (r.seq - before[0]) / (t - before[2]) : null;
    next.set(r.room, [r.seq, r.epoch, t]);
    return `<tr data-room="${esc(r.room)}"><td class="wrap">${esc(r.room)}</td><td class="num">${num(r.members)}</td><td class="num">${num(r.seq)}</td>` +
      `<td class="num">${num(r.history_size)}</td><td class="num">${pubs == null ? "–" : rate(pubs)}</td>` +
      `<td><button class="link" data-act="history">history</button><button class="link" data-act="presence">presence</button><button class="link" data-act="use">publish</button></td></tr>`;
  });
  roomSeq = next;
  $("rooms-table").tBodies[0].innerHTML = rows.join("") || `<tr><td colspan="6" class="muted">no rooms yet</td></tr>`;
  $("rooms-note").textContent = app.rooms_total > app.rooms.length ? `(the ${app.rooms.length} busiest of ${num(app.rooms_total)})` : "";
}

function renderNodes(app) {
  $("nodes-table").tBodies[0].innerHTML = app.nodes.map((n) =>
    `<tr><td title="${esc(n.node)}">${esc(n.host)}:${esc(n.pid)}${n.self ? ' <span class="muted">(this)</span>' : ""}</td>` +
    `<td><span class="dot${n.up ? " up" : ""}"></span> ${n.up ? (n.draining ? "draining" : "up") : "down"}</td>` +
    `<td class="num">${num(n.connections)}</td><td>${esc(Object.entries(n.by_transport || {}).sort().map(([k, v]) => `${k} ${v}`).join(" · "))}</td>` +
    `<td class="num">${num(n.rooms)}</td><td class="num">${duration(n.seen_s)} ago</td></tr>`).join("");
  $("nodes-note").textContent = app.nodes_note;
  const b = app.broker;
  $("broker").textContent = `broker ${b.scheme}:// ${b.up ? "up" : "DOWN"} · ${num(b.in_flight)} publications in flight` +
    (b.heartbeat_rtt != null ? ` · heartbeat round trip ${(b.heartbeat_rtt * 1000).toFixed(1)} ms` : "");
}

const OPEN_COLS = [
  ["id", "ID", "id"], ["transport", "Transport", "transport"], ["peer", "Peer", "peer"], ["user", "User", null], ["rooms", "Rooms", null],
  ["age", "Age", "connected_at"], ["idle", "Idle", "idle_s"], ["in", "In", "msgs_in"], ["out", "Out", "msgs_out"],
  ["bytes", "Bytes in · out", "bytes_out"], ["buffer", "Send buffer", "send_buffer"], ["kick", "", null],
];
const CLOSED_COLS = [
  ["id", "ID", "id"], ["transport", "Transport", "transport"], ["peer", "Peer", "peer"], ["user", "User", null], ["rooms", "Rooms", null],
  ["closed", "Closed", "closed_at"], ["reason", "Reason", "reason"], ["lived", "Lived", "connected_at"], ["in", "In", "msgs_in"], ["out", "Out", "msgs_out"],
  ["dropped", "Dropped", "msgs_dropped"],
];

function renderHead() {
  const cols = query.state === "closed" ? CLOSED_COLS : OPEN_COLS;
  const numeric = new Set(["age", "idle", "in", "out", "bytes", "buffer", "lived", "dropped"]);
  $("conns-table").tHead.rows[0].innerHTML = cols.map(([key, label, sort]) => {
    const cls = [sort ? "sortable" : "", numeric.has(key) ? "num" : "", sort === query.sort ? "sorted" : ""].filter(Boolean).join(" ");
    const arrow = sort === query.sort ? (query.order === "desc" ? " ▾" : " ▴") : "";
    return `<th class="${cls}"${sort ? ` data-sort="${sort}"` : ""}>${esc(label)}${arrow}</th>`;
  }).join("");
}

function renderConns(page, t) {
  if (!page) return;
  showConnsError(page.error || "");
  const closed = page.state === "closed";
  const rows = page.rows.map((c) => {
    const common = `<td><code>${esc(c.id)}</code></td><td>${esc(c.transport)}</td><td>${esc(c.peer)}</td><td>${esc(c.user ?? "–")}</td>` +
      `<td class="wrap">${esc((c.rooms || []).join(", ") || "–")}</td>`;
    if (closed) {
      return `<tr data-id="${esc(c.id)}">${common}<td>${esc(new Date(c.closed_at * 1000).toLocaleTimeString())}</td><td>${esc(c.reason)}</td>` +
        `<td class="num">${duration(c.closed_at - c.connected_at)}</td><td class="num">${num(c.msgs_in)}</td><td class="num">${num(c.msgs_out)}</td><td class="num">${num(c.msgs_dropped)}</td></tr>`;
    }
    return `<tr data-id="${esc(c.id)}">${common}<td class="num">${duration(Math.max(0, t - c.connected_at))}</td><td class="num">${duration(c.idle_s)}</td>` +
      `<td class="num">${num(c.msgs_in)}</td><td class="num">${num(c.msgs_out)}</td><td class="num">${bytes(c.bytes_in)} · ${bytes(c.bytes_out)}</td>` +
      `<td class="num">${bytes(c.send_buffer)}</td><td><button class="kick danger" data-id="${esc(c.id)}">kick</button></td></tr>`;
  });
  const cols = closed ? CLOSED_COLS.length : OPEN_COLS.length;
  $("conns-table").tBodies[0].innerHTML = rows.join("") || `<tr><td colspan="${cols}" class="muted">no ${closed ? "recently closed" : "open"} connections match</td></tr>`;
  const first = page.total ? page.offset + 1 : 0, last = page.offset + page.rows.length;
  $("page-info").textContent = `${num(first)}–${num(last)} of ${num(page.total)}`;
  $("conns-count").textContent = `(${num(page.total)} ${closed ? "recently closed" : "open"}${query.transport || query.user || query.room || query.peer ? ", filtered" : ""})`;
  $("page-prev").disabled = page.offset <= 0;
  $("page-next").disabled = last >= page.total;
}

function showConnsError(text) {
  $("conns-error").hidden = !text;
  $("conns-error").textContent = text;
}

// ------------------------------------------------------------------ the admin API

async function api(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body, cache: "no-store" });
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (response.status === 401) { refused = true; askToken("That token was refused."); }
  if (!response.ok) throw new Error((data && data.message) || `HTTP ${response.status}`);
  return data;
}

function confirmThen(title, text, action) {
  const d = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  d.returnValue = "";
  d.onclose = () => { if (d.returnValue === "yes") action(); };
  d.showModal();
}

function view(title, value) {
  $("viewer-title").textContent = title;
  $("viewer-body").textContent = typeof value === "string" ? value : JSON.stringify(value, null, 2);
  $("viewer").showModal();
}

function askToken(error) {
  const d = $("login");
  $("login-error").hidden = !error;
  $("login-error").textContent = error;
  setStatus(error ? "token refused" : "token needed", "bad");
  if (!d.open) d.showModal();
  $("token-input").focus();
}

// ------------------------------------------------------------------ wiring

$("login-form").addEventListener("submit", () => {
  token = $("token-input").value;
  sessionStorage.setItem("wirehub-admin-token", token);
  $("token-input").value = "";
  refused = false;
  connect();
});

$("conns-table").addEventListener("click", (event) => {
  const th = event.target.closest("th[data-sort]");
  if (th) {
    const sort = th.dataset.sort;
    if (query.sort === sort) query.order = query.order === "desc" ? "asc" : "desc";
    else { query.sort = sort; query.order = ["id", "transport", "peer", "reason"].includes(sort) ? "asc" : sort === "connected_at" ? "asc" : "desc"; }
    query.offset = 0;
    renderHead();
    sendQuery();
    return;
  }
  const kick = event.target.closest("button.kick");
  if (kick) {
    const id = kick.dataset.id;
    const row = kick.closest("tr");
    const who = row ? `${row.cells[2].textContent}, user ${row.cells[3].textContent}` : "";
    confirmThen("Kick this connection?", `Connection ${id} (${who}) gets "bye kicked" and is closed. It is told not to reconnect.`, async () => {
      try { await api("DELETE", "/api/connections/" + encodeURIComponent(id)); flash(`kicked ${id}`); }
      catch (e) { flash(`could not kick ${id}: ${e.message}`, true); }
    });
  }
});

function flash(text, bad) {
  const el = $("conns-error");
  el.hidden = false;
  el.className = bad ? "error" : "muted";
  el.textContent = text;
  setTimeout(() => { if (el.textContent === text) { el.hidden = true; el.className = "error"; } }, 4000);
}

$("rooms-table").addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-act]");
  if (!button) return;
  const room = button.closest("tr").dataset.room;
  const act = button.dataset.act;
  if (act === "use") { $("publish-room").value = room; $("publish-data").focus(); return; }
  try {
    if (act === "history") {
      const h = await api("GET", `/api/rooms/${encodeURIComponent(room)}/history?limit=50`);
      view(`History of ${room} (newest ${h.messages.length}, epoch ${h.epoch}, seq ${h.seq})`, h.messages);
    } else {
      const r = await api("GET", `/api/rooms/${encodeURIComponent(room)}`);
      view(`Presence in ${room} (${r.members} members)`, r.member_list);
    }
  } catch (e) { view(`${act} of ${room}`, "could not read it: " + e.message); }
});

$("publish-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const room = $("publish-room").value.trim();
  const raw = $("publish-data").value;
  const out = $("publish-result");
  let data;
  try { data = JSON.parse(raw); } catch (e) { out.className = "error"; out.textContent = "data must be JSON (a string needs quotes): " + e.message; return; }
  try {
    const r = await api("POST", `/api/rooms/${encodeURIComponent(room)}/publish`, JSON.stringify({ data }));
    out.className = "muted";
    out.textContent = `published to ${r.room}: seq ${r.seq}`;
  } catch (e) { out.className = "error"; out.textContent = "not published: " + e.message; }
});

$("drain").addEventListener("click", () => {
  const n = lastTick ? lastTick.totals.connections : "every";
  confirmThen("Drain this node?", `This node stops accepting connections, tells its ${n} clients to reconnect elsewhere (bye shutdown), and exits. It does what SIGTERM does; it cannot be undone from here.`, async () => {
    try { await api("POST", "/api/drain"); flash("draining: the node exits once its clients are gone"); }
    catch (e) { flash("could not drain: " + e.message, true); }
  });
});

let typing = null;
function filtersChanged() {
  query.state = $("f-state").value;
  if (query.state === "closed" && !["closed_at", "reason", "id", "transport", "peer", "msgs_in", "msgs_out", "msgs_dropped", "connected_at"].includes(query.sort)) { query.sort = "closed_at"; query.order = "desc"; }
  if (query.state === "open" && ["closed_at", "reason"].includes(query.sort)) { query.sort = "connected_at"; query.order = "asc"; }
  query.transport = $("f-transport").value;
  query.user = $("f-user").value.trim();
  query.room = $("f-room").value.trim();
  query.peer = $("f-peer").value.trim();
  query.limit = Number($("f-limit").value);
  query.offset = 0;
  renderHead();
  sendQuery();
}
for (const id of ["f-state", "f-transport", "f-limit"]) $(id).addEventListener("change", filtersChanged);
for (const id of ["f-user", "f-room", "f-peer"]) $(id).addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(filtersChanged, 300); });
$("filters").addEventListener("submit", (event) => { event.preventDefault(); filtersChanged(); });
$("page-prev").addEventListener("click", () => { query.offset = Math.max(0, query.offset - query.limit); sendQuery(); });
$("page-next").addEventListener("click", () => { query.offset += query.limit; sendQuery(); });

renderHead();
connect();
