// Shared by the tests: a real `wirehub serve` in a child process, and waiting for events with
// a deadline (never sleeping for a condition).
import { spawn, execFile } from "node:child_process";
import { after } from "node:test";

export const PYTHON = process.env.JS_TEST_PYTHON || "python3";
export const WAIT = 15000;
const running = new Set();
after(() => { for (const p of running) p.kill("SIGKILL"); });
process.on("exit", () => { for (const p of running) p.kill("SIGKILL"); });

/**
 * Starts `python -m wirehub serve` with a WebSocket and an admin listener on loopback (free
 * ports unless `ports` names them) and no TCP/UDP. Resolves once both listen.
 */
export function startHub(args = [], ports = {}) {
  const proc = spawn(PYTHON, ["-m", "wirehub", "serve", "--tcp", "off", "--udp", "off",
    "--ws", `127.0.0.1:${ports.ws ?? 0}`, "--admin", `127.0.0.1:${ports.admin ?? 0}`, ...args],
    { stdio: ["ignore", "pipe", "pipe"] });
  running.add(proc);
  const exited = new Promise((resolve) => proc.on("exit", (code, signal) => { running.delete(proc); resolve(code ?? signal); }));
  let log = "";
  return new Promise((resolve, reject) => {
    const found = {};
    const timer = setTimeout(() => { proc.kill("SIGKILL"); reject(new Error(`wirehub serve did not listen within ${WAIT} ms:\n${log}`)); }, WAIT);
    const read = (chunk) => {
      log += chunk;
      for (const m of log.matchAll(/listening transport=(ws|admin) address=(\S+)/g)) found[m[1]] = m[2];
      if (found.ws && found.admin && timer) {
        clearTimeout(timer);
        const port = (a) => Number(a.split(":").pop());
        resolve({
          proc, exited, args,
          log: () => log,
          ws: `ws://${found.ws}/`,
          admin: `http://${found.admin}`,
          ports: { ws: port(found.ws), admin: port(found.admin) },
          /** Stops it (SIGTERM drains with bye shutdown; SIGKILL drops every socket) and waits for the exit. */
          async stop(signal = "SIGTERM") {
            if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
            return within(exited, WAIT, "wirehub serve to exit");
          },
          /** The same server again, on the same ports. */
          restart() { return startHub(args, this.ports); },
        });
      }
    };
    proc.stdout.on("data", read);
    proc.stderr.on("data", read);
    exited.then((code) => { clearTimeout(timer); reject(new Error(`wirehub serve exited (${code}):\n${log}`)); });
  });
}

/** Rejects when `promise` has not settled within `ms`. */
export function within(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms); }),
  ]);
}

/** The arguments of the next `event` of `emitter` for which `test(...args)` holds. */
export function next(emitter, event, test = () => true, ms = WAIT) {
  let off;
  return within(new Promise((resolve) => {
    off = emitter.on(event, (...args) => { if (test(...args)) { off(); resolve(args.length > 1 ? args : args[0]); } });
  }), ms, `event ${event}`).finally(() => off());
}

/** Records every `event` of `emitter`: a list of first arguments. */
export function record(emitter, event) {
  const seen = [];
  emitter.on(event, (arg) => seen.push(arg));
  return seen;
}

/** A fetch of the admin API: the JSON body (or null) and the status. */
export async function admin(hub, method, path, body) {
  const res = await fetch(hub.admin + path, { method, body: body && JSON.stringify(body), headers: body ? { "content-type": "application/json" } : {} });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

/** A token from `wirehub token`. */
export function mintToken(secret, sub, ttl = "1h", ...more) {
  return new Promise((resolve, reject) =>
    execFile(PYTHON, ["-m", "wirehub", "token", "--sub", sub, "--ttl", ttl, "--secret", secret, ...more], { timeout: WAIT }, (err, out) =>
      err ? reject(err) : resolve(out.trim())));
}

export const unique = (what) => `js-${what}-${process.pid}-${Date.now().toString(36)}`;
