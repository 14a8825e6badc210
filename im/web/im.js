/**
 * The browser SDK of the IM gateway: one dependency-free ES module.
 *
 * It speaks the `im.v1.json` WebSocket subprotocol (docs/PROTOCOL.md) and keeps one session
 * alive: it asks the dispatcher where to connect (or walks a fixed address list),
 * authenticates with a token, sends heartbeats, reconnects with exponential backoff and full
 * jitter, and moves elsewhere when the server hints `reconnect`. QoS 1 pushes are ACKed once
 * every `message` handler has returned (or its promise resolved), and a redelivered id is
 * handed to the application only once. Usage and the event surface: docs/SDK-JS.md.
 *
 * @module im
 */

export const SUBPROTOCOL = "im.v1.json";

/** @enum {string} */
export const State = Object.freeze({
  CONNECTING: "connecting",
  ONLINE: "online",
  OFFLINE: "offline",
  CLOSED: "closed",
});

const ACK_DELAY_MS = 10; // an ack may wait this long for company
const ACK_BATCH = 100; // ids that make an ack frame go out at once
const MAX_ACK_IDS = 1000; // ids in one ack frame (the server's limit)
const MAX_PENDING_ACKS = 10000; // acks kept while offline; older ones get redelivered
const DEDUP_SIZE = 10000; // QoS 1 ids remembered to drop redeliveries
const HB_MISSES = 3; // heartbeat intervals of server silence that mean a dead connection
const MAX_ROOMS = 1000; // rooms kept for re-joining
const MAX_UPS = 1000; // `up` frames waiting for their answer
const MAX_RETRY = 32; // failed addresses named to the dispatcher
const MAX_WAIT_MS = 60000; // longest pause a dispatcher's retry_after_ms can impose
const MAX_SEQ = Number.MAX_SAFE_INTEGER;
const MAX_ROOM_LEN = 128;
const MAX_TYPE_LEN = 64;

/** Close codes after which reconnecting would be refused again or undo the server's will. */
const TERMINAL = new Set([4001, 4011, 4016]); // auth_failed, replaced, kicked
/** Error codes the server follows with closing the connection (the close is reported). */
const CLOSING = new Set([4000, 4001, 4002, 4006, 4007, 4008, 4009, 4010, 4011, 4015, 4016]);
/** Close codes that send the client to another address. */
const MOVE_ON = new Set([4010]); // server_shutdown

/**
 * A failure the application may want to know about. `code` is the protocol's error or close
 * code (4000-4999), or 0 for failures on this side (timeouts, no connection).
 */
export class ImError extends Error {
  /**
   * @param {number} code
   * @param {string} reason
   * @param {{seq?: number, terminal?: boolean, afterMs?: number}} [extra]
   */
  constructor(code, reason, extra = {}) {
    super(code ? `${code} ${reason}` : reason);
    this.name = "ImError";
    this.code = code;
    this.reason = reason;
    /** @type {number|undefined} the refused `up` frame's seq */
    this.seq = extra.seq;
    /** true when the client stopped for good (call connect() again to restart) */
    this.terminal = Boolean(extra.terminal);
    /** @type {number|undefined} for a `reconnect` hint: how long to wait before moving */
    this.afterMs = extra.afterMs;
  }
}

/**
 * @typedef {Object} ImMessage
 * @property {string} id message id (sorts in creation order)
 * @property {string} type the business's message type
 * @property {"high"|"normal"|"low"} pri
 * @property {0|1} qos 1: ACKed by the SDK once the handlers returned
 * @property {number} ts ms since the epoch when center accepted it
 * @property {*} body what the business sent (undefined for a push-pull notify)
 * @property {string|null} room the chat room, or null for a push to the user
 * @property {string|null} pull the key to fetch the body with, for a push-pull notify
 * @property {Object} raw the whole map as the server sent it
 */

/**
 * @typedef {Object} ImOptions
 * @property {string} product
 * @property {string} uid
 * @property {string|(() => string|Promise<string>)} token a JWT, or a function asked before
 *   each login
 * @property {string} [device] a later login with the same uid and device replaces this one
 * @property {string} [dispatcher] the dispatcher's base URL (http://host:port); asked for addresses
 * @property {string[]} [addresses] ws:// or wss:// URLs, used without a dispatcher or when it
 *   fails
 * @property {string} [idc] the client's IDC, passed to the dispatcher
 * @property {number} [hb] heartbeat interval to ask for, seconds (the server clamps it)
 * @property {number} [backoffMin] ms, default 200
 * @property {number} [backoffMax] ms, default 10000
 * @property {number} [connectTimeout] ms for connect plus auth, default 5000
 * @property {number} [requestTimeout] ms to wait for `joined`, `left` or `up_ack`, default 5000
 */

/** Exponential backoff with full jitter: attempt n waits U(lo, min(hi, lo * 2^(n+1))). */
export function backoffDelay(attempt, lo, hi) {
  const cap = Math.min(hi, lo * 2 ** Math.min(attempt + 1, 32));
  return lo + Math.random() * (cap - lo);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

function checkName(what, value, max) {
  if (typeof value !== "string" || value.length < 1 || value.length > max) {
    throw new TypeError(`${what} must be a string of 1 to ${max} characters`);
  }
}

/** A promise with its settle functions and an optional timeout that rejects it. */
function waiter(timeoutMs, what) {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  const late = () => reject(new ImError(0, `no answer to ${what} in ${timeoutMs} ms`));
  const timer = setTimeout(late, timeoutMs);
  const done = () => clearTimeout(timer);
  return {
    promise,
    resolve: (value) => {
      done();
      resolve(value);
    },
    reject: (err) => {
      done();
      reject(err);
    },
  };
}

/** The dispatcher answered "wait": nothing can take the client for `ms`. */
class Wait {
  constructor(ms) {
    this.ms = ms;
  }
}

/** Keeps a session with the gateway and hands its pushes to the application. */
export class ImClient {
  #opts;
  #handlers = { message: new Set(), state: new Set(), error: new Set() };
  #state = State.OFFLINE;
  #conn = null;
  #ws = null;
  #url = null;
  #stop = null; // AbortController of the connection loop
  #connected = []; // waiters of connect()
  #seen = new Map(); // QoS 1 id -> "handling" | "acked", oldest first
  #acks = [];
  #ackTimer = null;
  #rooms = new Set();
  #joining = new Map(); // room -> waiters
  #leaving = new Map(); // room -> waiters
  #sentJoins = []; // joins on this connection awaiting an answer, oldest first
  #ups = new Map(); // seq -> waiter
  #seq = 0;
  #index = 0; // next address of a fixed list
  #route = null; // {addresses, expires} from the dispatcher
  #failed = []; // addresses that failed since the last route
  #lastRecv = 0;
  #lastSend = 0;

  /** Counters for the curious (and the tests). */
  stats = { connects: 0, pushes: 0, duplicates: 0, acked: 0 };

  /** @param {ImOptions} options */
  constructor(options) {
    const o = { device: "", addresses: [], dispatcher: "", idc: "", ...options };
    checkName("product", o.product, 64);
    checkName("uid", o.uid, 128);
    if (typeof o.token !== "string" && typeof o.token !== "function") {
      throw new TypeError("token must be a string or a function returning one");
    }
    if (!Array.isArray(o.addresses) || o.addresses.some((a) => !/^wss?:\/\//.test(a))) {
      throw new TypeError("addresses must be a list of ws:// or wss:// URLs");
    }
    if (!o.dispatcher && o.addresses.length === 0) {
      throw new TypeError("give a dispatcher URL or at least one address");
    }
    o.backoffMin = o.backoffMin ?? 200;
    o.backoffMax = o.backoffMax ?? 10000;
    o.connectTimeout = o.connectTimeout ?? 5000;
    o.requestTimeout = o.requestTimeout ?? 5000;
    if (!(o.backoffMin > 0 && o.backoffMin <= o.backoffMax)) {
      throw new RangeError("need 0 < backoffMin <= backoffMax");
    }
    this.#opts = o;
  }

  /** @returns {string} one of State */
  get state() {
    return this.#state;
  }

  /** The server's id of the current connection, or null when offline. */
  get connId() {
    return this.#conn;
  }

  /** The address of the current connection, or null. */
  get url() {
    return this.#url;
  }

  /** Rooms joined (or being joined); joined again after every reconnect. */
  get rooms() {
    return [...this.#rooms];
  }

  /**
   * Listen to "message" (an ImMessage; a returned promise delays the ACK of a QoS 1 push
   * until it resolves), "state" ({state, conn, url}) or "error" (an ImError).
   * @returns {() => void} a function that removes the handler
   */
  on(event, handler) {
    const set = this.#handlers[event];
    if (!set) throw new TypeError(`unknown event ${event}; expected message, state or error`);
    set.add(handler);
    return () => set.delete(handler);
  }

  /**
   * Start the session; resolves at the first successful auth. Failed attempts are retried
   * with backoff (each one reported as an "error" event); rejects only when the server ends
   * the session for good (a refused token, a newer login of the same device, a kick: the
   * client then stays offline until connect() is called again) or close() is called first.
   * @returns {Promise<void>}
   */
  connect() {
    if (this.#state === State.CLOSED) return Promise.reject(new ImError(0, "client is closed"));
    if (this.#state === State.ONLINE) return Promise.resolve();
    const done = new Promise((resolve, reject) => this.#connected.push({ resolve, reject }));
    if (!this.#stop) {
      this.#stop = new AbortController();
      this.#run(this.#stop.signal);
    }
    return done;
  }

  /**
   * Join a chat room; resolves with its member count as the server counts it. Offline, the
   * join goes out after the next auth. Rejects (and forgets the room) on refusal or timeout.
   * @param {string} room
   * @returns {Promise<number>}
   */
  async join(room) {
    checkName("room", room, MAX_ROOM_LEN);
    if (this.#state === State.CLOSED) throw new ImError(0, "client is closed");
    if (!this.#rooms.has(room) && this.#rooms.size >= MAX_ROOMS) {
      throw new ImError(0, `at most ${MAX_ROOMS} rooms per client`);
    }
    const w = waiter(this.#opts.requestTimeout, `join ${room}`);
    w.promise.catch(() => this.#forgetJoin(room, w));
    this.#rooms.add(room);
    this.#waiters(this.#joining, room).push(w);
    if (this.#state === State.ONLINE) this.#sendJoin(room);
    return w.promise;
  }

  /**
   * Leave a chat room; once resolved, no more pushes of it arrive.
   * @param {string} room
   * @returns {Promise<void>}
   */
  async leave(room) {
    checkName("room", room, MAX_ROOM_LEN);
    this.#rooms.delete(room);
    if (!this.#sentJoins.includes(room)) {
      const early = new ImError(0, `left room ${room} before it was joined`);
      this.#settleAll(this.#joining, room, early);
    }
    if (this.#state !== State.ONLINE) return;
    const w = waiter(this.#opts.requestTimeout, `leave ${room}`);
    this.#waiters(this.#leaving, room).push(w);
    this.#send({ op: "leave", room });
    return w.promise;
  }

  /**
   * Send a message to the business (op `up`); resolves once the server queued it for the
   * business's webhook, rejects with an ImError carrying the server's code (4013 and 4014:
   * retry later; 4004: no upstream for this product) or code 0 when offline or unanswered.
   * @param {string} type
   * @param {*} body any JSON value
   * @returns {Promise<void>}
   */
  async up(type, body) {
    checkName("type", type, MAX_TYPE_LEN);
    if (this.#state !== State.ONLINE) throw new ImError(0, "not connected");
    if (this.#ups.size >= MAX_UPS) throw new ImError(0, `${MAX_UPS} up frames are already waiting`);
    this.#seq = this.#seq >= MAX_SEQ ? 1 : this.#seq + 1;
    const seq = this.#seq;
    const w = waiter(this.#opts.requestTimeout, `up ${seq}`);
    this.#ups.set(seq, w);
    w.promise.catch(() => this.#ups.delete(seq));
    this.#send({ op: "up", seq, type, body: body === undefined ? null : body });
    return w.promise;
  }

  /** Send pending ACKs, close the connection and stop for good. */
  close() {
    if (this.#state === State.CLOSED) return;
    this.#flushAcks();
    this.#setState(State.CLOSED);
    this.#stop?.abort();
    this.#stop = null;
    const ws = this.#ws;
    if (ws) ws.close(1000, "client closed");
    this.#fail(new ImError(0, "client closed", { terminal: true }));
  }

  // -- the connection loop -------------------------------------------------------------

  async #run(signal) {
    let failures = 0;
    while (!signal.aborted) {
      let candidates;
      try {
        candidates = await this.#candidates();
      } catch (err) {
        if (err instanceof Wait) {
          this.#setState(State.OFFLINE);
          await sleep(err.ms, signal);
        } else {
          this.#report(err instanceof ImError ? err : new ImError(0, String(err)));
          failures += 1;
          await sleep(this.#backoff(failures), signal);
        }
        continue;
      }
      let connected = false;
      for (const url of candidates) {
        if (signal.aborted) return;
        let ws;
        try {
          ws = await this.#open(url, signal);
        } catch (err) {
          if (err.terminal) return this.#finish(err);
          if (signal.aborted) return;
          this.#report(err);
          this.#failedAt(url);
          continue;
        }
        connected = true;
        failures = 0;
        const end = await this.#session(ws, url);
        if (end.terminal) return this.#finish(end);
        if (signal.aborted) return;
        if (end.afterMs === undefined) this.#report(end);
        if (end.afterMs !== undefined || MOVE_ON.has(end.code)) this.#moveOn(url);
        const pause = end.afterMs ?? this.#backoff(0);
        await sleep(pause, signal);
        break;
      }
      if (!connected && !signal.aborted) {
        failures += 1;
        this.#setState(State.OFFLINE);
        await sleep(this.#backoff(failures), signal);
      }
    }
  }

  #backoff(attempt) {
    return backoffDelay(attempt, this.#opts.backoffMin, this.#opts.backoffMax);
  }

  /** Addresses to try now, in order; throws Wait when the dispatcher says so. */
  async #candidates() {
    const fixed = this.#opts.addresses;
    if (!this.#opts.dispatcher) {
      const start = this.#index % fixed.length;
      return [...fixed.slice(start), ...fixed.slice(0, start)];
    }
    const route = this.#route;
    if (route && route.expires > Date.now()) {
      const left = route.addresses.filter((a) => !this.#failed.includes(a));
      if (left.length) return left;
    }
    try {
      return await this.#ask();
    } catch (err) {
      if (err instanceof Wait || fixed.length === 0) throw err;
      this.#report(err);
      return fixed; // the dispatcher is down: the configured addresses still work
    }
  }

  async #ask() {
    const o = this.#opts;
    const params = new URLSearchParams({ product: o.product, uid: o.uid, transport: "ws" });
    if (o.idc) params.append("idc", o.idc);
    for (const address of this.#failed) params.append("retry", address);
    const url = `${o.dispatcher.replace(/\/+$/, "")}/v1/route?${params}`;
    let answer;
    try {
      const response = await fetch(url, {
        cache: "no-store",
        signal: AbortSignal.timeout(o.connectTimeout),
      });
      answer = await response.json();
      if (!response.ok) {
        const message = answer?.error?.message ?? `HTTP ${response.status}`;
        throw new ImError(0, `dispatcher refused: ${message}`);
      }
    } catch (err) {
      if (err instanceof ImError) throw err;
      throw new ImError(0, `dispatcher ${o.dispatcher} failed: ${err}`);
    }
    const addresses = answer?.addresses;
    if (!Array.isArray(addresses) || addresses.some((a) => typeof a !== "string")) {
      throw new ImError(0, "dispatcher answered a malformed route");
    }
    this.#failed = [];
    if (addresses.length === 0) {
      this.#route = null;
      const ms = Number(answer.retry_after_ms);
      throw new Wait(Math.min(MAX_WAIT_MS, Number.isFinite(ms) && ms > 0 ? ms : o.backoffMax));
    }
    const ttl = Number(answer.ttl_s);
    this.#route = { addresses, expires: Date.now() + (Number.isFinite(ttl) ? ttl * 1000 : 0) };
    return addresses;
  }

  #failedAt(url) {
    if (!this.#opts.dispatcher) {
      this.#index += 1;
    } else if (!this.#failed.includes(url) && this.#failed.length < MAX_RETRY) {
      this.#failed.push(url);
    }
  }

  /** The server sent us away from `url`: next time, start elsewhere. */
  #moveOn(url) {
    if (this.#opts.dispatcher) {
      this.#route = null; // ask again, naming the address we left
      this.#failedAt(url);
    } else if (this.#opts.addresses[this.#index % this.#opts.addresses.length] === url) {
      this.#index += 1;
    }
  }

  async #token() {
    const token = this.#opts.token;
    return typeof token === "function" ? await token() : token;
  }

  /** Connect and authenticate within connectTimeout; resolves with the open socket. */
  async #open(url, signal) {
    this.#setState(State.CONNECTING);
    const o = this.#opts;
    const auth = { op: "auth", product: o.product, uid: o.uid, device: o.device };
    try {
      auth.token = await this.#token();
    } catch (err) {
      throw new ImError(0, `the token source failed: ${err}`);
    }
    if (o.hb !== undefined) auth.hb = o.hb;
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(url, SUBPROTOCOL);
      } catch (err) {
        reject(new ImError(0, `cannot open ${url}: ${err}`));
        return;
      }
      const fail = (err) => {
        clearTimeout(timer);
        signal.removeEventListener("abort", abort);
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        if (ws.readyState <= WebSocket.OPEN) ws.close(1000);
        reject(err);
      };
      const abort = () => fail(new ImError(0, "client closed"));
      signal.addEventListener("abort", abort);
      const timer = setTimeout(
        () => fail(new ImError(0, `no auth_ok from ${url} in ${o.connectTimeout} ms`)),
        o.connectTimeout,
      );
      ws.onopen = () => {
        if (ws.protocol !== SUBPROTOCOL) {
          fail(new ImError(0, `${url} did not accept subprotocol ${SUBPROTOCOL}`));
          return;
        }
        ws.send(JSON.stringify(auth));
      };
      ws.onmessage = (event) => {
        const message = parse(event.data);
        if (message?.op === "auth_ok" && typeof message.conn === "string") {
          clearTimeout(timer);
          signal.removeEventListener("abort", abort);
          ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
          resolve({ ws, hb: Number(message.hb) > 0 ? Number(message.hb) : 30, conn: message.conn });
        } else if (message?.op === "error") {
          const code = Number(message.code);
          fail(new ImError(code, String(message.reason), { terminal: TERMINAL.has(code) }));
        }
      };
      ws.onclose = (event) => {
        const reason = event.reason || `connection to ${url} closed`;
        const code = event.code >= 4000 ? event.code : 0;
        fail(new ImError(code, reason, { terminal: TERMINAL.has(code) }));
      };
      ws.onerror = () => {}; // onclose follows with the code
    });
  }

  /** Run one authenticated connection; resolves with why it ended (an ImError). */
  #session({ ws, hb, conn }, url) {
    return new Promise((resolve) => {
      const hbMs = hb * 1000;
      let ended = false;
      const end = (err) => {
        if (ended) return;
        ended = true;
        clearInterval(ticker);
        ws.onmessage = ws.onclose = ws.onerror = null;
        if (ws.readyState <= WebSocket.OPEN) ws.close(1000);
        this.#offline();
        resolve(err);
      };
      this.#ws = ws;
      this.#conn = conn;
      this.#url = url;
      this.#lastRecv = this.#lastSend = Date.now();
      this.stats.connects += 1;
      ws.onmessage = (event) => {
        this.#lastRecv = Date.now();
        const message = parse(event.data);
        if (message === null) {
          this.#report(new ImError(0, "dropped a frame that is not a JSON object with an op"));
          return;
        }
        if (message.op === "reconnect") {
          const after = Number(message.after_ms);
          const afterMs = Number.isFinite(after) && after >= 0 ? Math.min(after, MAX_WAIT_MS) : 0;
          end(new ImError(0, `server asked to reconnect (${message.reason})`, { afterMs }));
          return;
        }
        const stop = this.#handle(message);
        if (stop) end(stop);
      };
      ws.onclose = (event) => {
        const code = event.code >= 4000 ? event.code : 0;
        const reason = event.reason || "connection lost";
        end(new ImError(code, reason, { terminal: TERMINAL.has(code) }));
      };
      ws.onerror = () => {};
      const ticker = setInterval(() => {
        const now = Date.now();
        if (now - this.#lastRecv >= HB_MISSES * hbMs) {
          end(new ImError(0, `no frame from the server for ${HB_MISSES * hb} s`));
        } else if (now - this.#lastSend >= hbMs) {
          this.#send({ op: "ping" });
        }
      }, Math.min(1000, hbMs / 2));
      this.#setState(State.ONLINE);
      for (const room of this.#rooms) this.#sendJoin(room);
      this.#flushAcks();
      for (const w of this.#connected.splice(0)) w.resolve();
    });
  }

  /** One server map; returns an ImError when the connection must end. */
  #handle(message) {
    switch (message.op) {
      case "push":
        this.#onPush(message);
        break;
      case "batch":
        if (Array.isArray(message.msgs)) for (const push of message.msgs) this.#onPush(push);
        break;
      case "joined": {
        const at = this.#sentJoins.indexOf(message.room);
        if (at >= 0) this.#sentJoins.splice(at, 1);
        this.#settleAll(this.#joining, message.room, null, Number(message.members));
        break;
      }
      case "left":
        this.#settleAll(this.#leaving, message.room, null);
        break;
      case "up_ack": {
        const w = this.#ups.get(message.seq);
        if (w) {
          this.#ups.delete(message.seq);
          w.resolve();
        }
        break;
      }
      case "error":
        return this.#onError(message);
      default:
        break; // pong, and ops newer than this SDK
    }
    return null;
  }

  #onError(message) {
    const code = Number(message.code);
    const reason = String(message.reason ?? "");
    const err = new ImError(code, reason, { seq: message.seq, terminal: TERMINAL.has(code) });
    if (Number.isInteger(message.seq) && this.#ups.has(message.seq)) {
      const w = this.#ups.get(message.seq);
      this.#ups.delete(message.seq);
      w.reject(err);
      return null;
    }
    if (reason.startsWith("join:") && this.#sentJoins.length) {
      const room = this.#sentJoins.shift();
      this.#rooms.delete(room);
      this.#settleAll(this.#joining, room, err);
      return null;
    }
    if (err.terminal) return err;
    if (!CLOSING.has(code)) this.#report(err);
    return null;
  }

  #onPush(raw) {
    if (raw === null || typeof raw !== "object" || typeof raw.id !== "string") return;
    const qos = raw.qos === 1 ? 1 : 0;
    if (qos === 1) {
      const seen = this.#seen.get(raw.id);
      if (seen !== undefined) {
        this.stats.duplicates += 1;
        if (seen === "acked") this.#queueAck(raw.id); // our ack was lost: send it again
        return;
      }
      this.#remember(raw.id, "handling");
    }
    this.stats.pushes += 1;
    /** @type {ImMessage} */
    const message = Object.freeze({
      id: raw.id,
      type: raw.type,
      pri: raw.pri,
      qos,
      ts: raw.ts,
      body: raw.body,
      room: raw.room ?? null,
      pull: raw.pull ?? null,
      raw,
    });
    Promise.all(this.#emit("message", message)).then(
      () => {
        if (qos === 0) return;
        this.#remember(raw.id, "acked");
        this.#queueAck(raw.id);
      },
      (err) => {
        if (qos === 1) this.#seen.delete(raw.id); // not handled: a redelivery gets another go
        this.#report(new ImError(0, `message handler failed for ${raw.id}: ${err}`));
      },
    );
  }

  #remember(id, state) {
    this.#seen.delete(id);
    this.#seen.set(id, state);
    if (this.#seen.size > DEDUP_SIZE) this.#seen.delete(this.#seen.keys().next().value);
  }

  #queueAck(id) {
    this.#acks.push(id);
    const over = this.#acks.length - MAX_PENDING_ACKS;
    if (over > 0) this.#acks.splice(0, over);
    if (this.#acks.length >= ACK_BATCH) {
      this.#flushAcks();
    } else if (this.#ackTimer === null) {
      this.#ackTimer = setTimeout(() => this.#flushAcks(), ACK_DELAY_MS);
    }
  }

  #flushAcks() {
    clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    if (this.#state !== State.ONLINE || this.#acks.length === 0) return;
    const ids = this.#acks.splice(0);
    for (let i = 0; i < ids.length; i += MAX_ACK_IDS) {
      this.#send({ op: "ack", ids: ids.slice(i, i + MAX_ACK_IDS) });
    }
    this.stats.acked += ids.length;
  }

  #sendJoin(room) {
    if (this.#sentJoins.includes(room)) return;
    this.#sentJoins.push(room);
    this.#send({ op: "join", room });
  }

  #send(message) {
    const ws = this.#ws;
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(message));
      this.#lastSend = Date.now();
    }
  }

  #waiters(table, room) {
    let list = table.get(room);
    if (!list) table.set(room, (list = []));
    return list;
  }

  #settleAll(table, room, err, value) {
    const list = table.get(room);
    if (!list) return;
    table.delete(room);
    for (const w of list) (err ? w.reject(err) : w.resolve(value));
  }

  #forgetJoin(room, w) {
    const list = this.#joining.get(room);
    if (list?.includes(w)) {
      list.splice(list.indexOf(w), 1);
      if (!list.length) this.#joining.delete(room);
      this.#rooms.delete(room);
    }
  }

  /** The connection ended: memberships and unanswered requests went with it. */
  #offline() {
    this.#ws = null;
    this.#conn = null;
    this.#url = null;
    this.#sentJoins = [];
    for (const room of [...this.#leaving.keys()]) this.#settleAll(this.#leaving, room, null);
    const lost = new ImError(0, "connection lost before the answer");
    for (const w of this.#ups.values()) w.reject(lost);
    this.#ups.clear();
    this.#setState(State.OFFLINE);
  }

  /** Stop after a terminal error; a new connect() starts again (asking for a new token). */
  #finish(err) {
    this.#stop = null;
    this.#report(err);
    this.#setState(State.OFFLINE);
    this.#fail(err);
  }

  #fail(err) {
    for (const w of this.#connected.splice(0)) w.reject(err);
    for (const room of [...this.#joining.keys()]) this.#settleAll(this.#joining, room, err);
    for (const w of this.#ups.values()) w.reject(err);
    this.#ups.clear();
  }

  #setState(state) {
    if (this.#state === State.CLOSED || this.#state === state) return;
    this.#state = state;
    this.#emit("state", { state, conn: this.#conn, url: this.#url });
  }

  #report(err) {
    this.#emit("error", err);
  }

  /** Call each handler; returns what they returned (promises delay QoS 1 ACKs). */
  #emit(event, value) {
    const results = [];
    for (const handler of this.#handlers[event]) {
      try {
        results.push(handler(value));
      } catch (err) {
        if (event === "message") results.push(Promise.reject(err));
        else if (event === "state") this.#report(new ImError(0, `state handler threw: ${err}`));
        else console.error("im: an error handler threw", err);
      }
    }
    return results;
  }
}

/** A server map from a text frame, or null for anything that is not an object with an op. */
function parse(data) {
  if (typeof data !== "string") return null;
  try {
    const value = JSON.parse(data);
    const isMap = value !== null && typeof value === "object" && typeof value.op === "string";
    return isMap ? value : null;
  } catch {
    return null;
  }
}
