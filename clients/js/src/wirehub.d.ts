// Types of wirehub-client (src/wirehub.js). The guide: docs/js-client.md in the wirehub repository.

/** Any JSON value: what `data` carries. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** Client states: `connecting` covers the handshake and every wait between reconnect attempts. */
export type HubState = "disconnected" | "connecting" | "connected";
/** Room states: `joining` until the hub's `joined` reply, and again while the client reconnects. */
export type RoomState = "left" | "joining" | "joined";

/**
 * A SPEC error code the hub sent (`bad_frame`, `unknown_op`, `too_large`, `unauthorized`,
 * `forbidden`, `rate_limited`, `not_member`, `no_such_client`, `room_full`, `no_such_method`,
 * `limit`, `timeout`, `internal`, or an application's own), or one of the client's:
 * `timeout` (no reply in time), `disconnected` (not connected, or the connection closed before
 * the reply), `limit` (options.maxQueue), `cancelled` (left the room before its join completed).
 */
export type ErrorCode =
  | "bad_frame" | "unknown_op" | "too_large" | "unauthorized" | "forbidden" | "rate_limited"
  | "not_member" | "no_such_client" | "room_full" | "no_such_method" | "limit" | "timeout"
  | "internal" | "disconnected" | "cancelled" | (string & {});

export class HubError extends Error {
  constructor(code: ErrorCode, message: string, frame?: ErrorFrame);
  readonly name: "HubError";
  readonly code: ErrorCode;
  /** The hub's `error` frame, when the hub sent one. */
  readonly frame?: ErrorFrame;
}

export interface HubOptions {
  /** A token (HS256 JWT) for `hello`. */
  token?: string;
  /**
   * Called for a token when there is none (the first connect, or after the hub refused or
   * expired the last one) and before the current one expires (from its `exp` claim: at half
   * the time left, at most 30 s early), which is then sent in a `refresh`. While connecting, a
   * rejection is retried with the reconnect backoff and an empty answer stops the client
   * (`unauthorized`); a failed refresh is reported as an `error` event (the hub then says bye
   * `auth_expired`, and the reconnect asks getToken again).
   */
  getToken?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Display name sent in `hello` (1 to 64 characters). */
  name?: string;
  /** ms for the hub's reply to a request, and for the handshake (WebSocket open to welcome). Default 10000. */
  timeout?: number;
  /** Reconnect waits are random (full jitter) up to minReconnectDelay * 2^attempt, capped by maxReconnectDelay. Defaults 500 and 20000 ms. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** ms a ping may go unanswered (nothing at all arrives) before the connection counts as dead; at most the heartbeat. Default 10000. */
  pongTimeout?: number;
  /** Requests made while connecting: wait in the queue ("queue", the default) or fail at once with code disconnected ("refuse"). */
  offline?: "queue" | "refuse";
  /** Requests that may wait for the connection; more fail with code limit. Default 100. */
  maxQueue?: number;
  /** The WebSocket class: default globalThis.WebSocket, else the `ws` package (Node 20). */
  WebSocket?: new (url: string) => WebSocketLike;
}

/** What the client uses of a WebSocket (the browser's, or the `ws` package's). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number): void;
  onopen: ((event: any) => void) | null;
  onclose: ((event: { code: number }) => void) | null;
  onerror: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
}

export interface Welcome {
  op: "welcome";
  client: string;
  user: string;
  /** Seconds between the client's pings. */
  heartbeat: number;
  server: string;
}

export interface Member {
  client: string;
  user: string;
  name?: string | null;
}

/** A publication in a room (`room` set), or a direct message (`room` absent). */
export interface Message<T = Json> {
  op: "msg";
  room?: string;
  seq?: number;
  from: string;
  data: T;
  /** Server time, ms since the epoch (room messages). */
  ts?: number;
}

export interface ErrorFrame {
  op: "error";
  code: ErrorCode;
  message: string;
  ref?: number | string;
}

export interface ByeFrame {
  op: "bye";
  reason: "shutdown" | "idle" | "kicked" | "slow_consumer" | "auth_expired" | "too_many_errors" | "protocol" | (string & {});
  reconnect: boolean;
}

/** Why the connection dropped: a bye reason, a hello error code, or the client's own: closed, timeout, heartbeat, error, client. */
export interface Drop {
  reason: string;
  /** The bye frame, the HubError, or the WebSocket close code. */
  detail?: ByeFrame | HubError | Error | number;
}

export interface HubEvents {
  state: (state: HubState, previous: HubState) => void;
  connected: (welcome: Welcome) => void;
  /** The connection dropped and the client will try again after `delay` ms. */
  reconnecting: (drop: Drop & { delay: number }) => void;
  /** The client stopped for good: disconnect(), or a drop it must not retry (a bye with reconnect:false, a refused token). */
  disconnected: (drop: Drop) => void;
  /** A token refresh the hub accepted. */
  refreshed: (reply: { op: "refreshed"; exp: number | null }) => void;
  /** An error frame that answers no request, or a failure to get or refresh a token. */
  error: (error: HubError | Error) => void;
  /** A direct message (`send`) from another client. */
  message: (msg: Message) => void;
}

export interface Joined {
  /** The room's last seq when it answered. */
  seq: number;
  epoch: string;
  /** Every message since the last one seen follows (true), or the hub could not replay them (false). */
  recovered: boolean;
  /** This join asked to recover (a re-join with since/epoch). */
  wasRecovering: boolean;
  /** How the hub tells this room's presence changes (null from a hub that does not say). */
  presence: PresenceMode | null;
}

/**
 * `events`: a join/leave frame per change; `diff`: a big room's changes coalesced per window
 * (split into join/leave events all the same); `query`: no events, ask `presence()`; `off`.
 */
export type PresenceMode = "events" | "diff" | "query" | "off";

/** Messages the client knows it missed: from..to (to null when the room's stream started over, epochChanged). */
export interface Gap {
  from: number;
  to: number | null;
  epochChanged: boolean;
}

export interface RoomEvents {
  state: (state: RoomState, previous: RoomState) => void;
  /** Each joined reply: the first join, and every re-join after a reconnect. */
  joined: (joined: Joined) => void;
  /** A publication, in seq order, each once. */
  msg: (msg: Message & { room: string; seq: number; ts: number }) => void;
  /** A known gap: a re-join that could not recover, or a live message that skipped seqs. */
  gap: (gap: Gap) => void;
  /** Presence: a member arrived (or left); presence_diff frames are split into these, leaves first (a diff may list this client itself). */
  join: (member: Member) => void;
  leave: (member: Member) => void;
  /** The hub refused a (re-)join: the room is left. */
  error: (error: HubError) => void;
}

declare class Emitter<E> {
  /** Calls `listener` on each `event`; returns a function that removes it. */
  on<K extends keyof E>(event: K, listener: E[K]): () => void;
  off<K extends keyof E>(event: K, listener: E[K]): void;
}

export interface HistoryPage {
  /** Oldest first. */
  messages: (Message & { room: string; seq: number; ts: number })[];
  epoch: string;
  /** Older messages were left out: ask for them with `{ before: messages[0].seq }`. */
  more: boolean;
}

export class Room extends Emitter<RoomEvents> {
  readonly hub: Hub;
  readonly name: string;
  readonly state: RoomState;
  /** The seq of the last message delivered (null before the first join). */
  readonly seq: number | null;
  readonly epoch: string | null;
  /** The last join recovered everything missed. */
  readonly recovered: boolean;
  /** How the hub tells this room's presence (from joined; kept up to date as the room grows or shrinks). */
  readonly presenceMode: PresenceMode | null;
  /** Joins, and re-joins after every reconnect with since/epoch; resolves on the first joined. May be called before connect(). */
  join(): Promise<Room>;
  /** Leaves; a later join starts afresh, without recovery. */
  leave(): Promise<void>;
  /** Publishes; resolves with the publication's seq. */
  publish(data: Json): Promise<number>;
  presence(): Promise<Member[]>;
  history(options?: { limit?: number; before?: number }): Promise<HistoryPage>;
}

export class Hub extends Emitter<HubEvents> {
  constructor(url: string, options?: HubOptions);
  readonly url: string;
  readonly options: Required<Omit<HubOptions, "token" | "getToken" | "name" | "WebSocket">> & HubOptions;
  readonly state: HubState;
  /** This connection's client id (from welcome); it changes on each reconnect. */
  readonly client: string | null;
  readonly user: string | null;
  readonly rooms: ReadonlyMap<string, Room>;
  /** Connects, and reconnects after every drop until disconnect() or a bye with reconnect:false. */
  connect(): void;
  /** Closes for good; requests waiting or unanswered fail with code disconnected; rooms are left (a later join recovers). */
  disconnect(): void;
  /** The room object for a name (the same one each time). */
  room(name: string): Room;
  publish(room: string, data: Json): Promise<number>;
  /** A direct message to a client id; resolves when the hub delivered it. */
  send(to: string, data: Json): Promise<void>;
  /** Calls an application method; resolves with its result's data. */
  rpc<T = Json>(method: string, data?: Json): Promise<T>;
  /** Any frame, with a fresh ref: resolves with the reply frame that carries it. */
  request<T = Record<string, any>>(frame: { op: string; [key: string]: unknown }, timeout?: number): Promise<T>;
}
