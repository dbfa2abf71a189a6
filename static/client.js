// A small client for the Conclave protocol v1 on `/v1/ws` (see PROTOCOL.md).
//
// It owns one WebSocket and keeps it alive: it says `hello`, (re)joins the sessions it was asked
// to join with `since`/`epoch` so that missed events are replayed, pings every 20 s, and
// reconnects with exponential backoff and jitter. Requests carry a `ref`; the reply with the same
// `ref` settles the request's promise. Everything else the server says is dispatched as a DOM
// event on the client (it is an EventTarget):
//
//   state      {state, attempt, retryAt, reason}   connecting | live | reconnecting | offline | stopped
//   welcome    the welcome frame
//   joined     the joined frame (after a join or an automatic rejoin)
//   event      an event frame, in offset order, never twice
//   reset      {session}: replay was impossible; rely on the joined snapshot
//   presence   a presence frame
//   doc        a doc frame
//   archived   {session}: the session was archived; it is no longer joined
//   joinfailed {session, error}: a join (or automatic rejoin) was refused
//   error      an error frame that matches no pending request
//   frame      every frame, before the specific event
//
// All this is plain data; the client never touches the DOM beyond the socket.

export const SESSION_NAME = /^[A-Za-z0-9._-]{1,128}$/;

/** A refusal from the server, or a local failure (`code` is then `disconnected` or `timeout`). */
export class RequestError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "RequestError";
    this.code = code;
  }
}

const DEFAULTS = {
  pingIntervalMs: 20_000,
  // No frame at all (not even a pong) for this long means the socket is dead.
  silenceTimeoutMs: 50_000,
  requestTimeoutMs: 15_000,
  backoffBaseMs: 500,
  backoffMaxMs: 30_000,
};

/** The socket address on the page's own origin. */
export function defaultSocketUrl(loc = globalThis.location) {
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.host}/v1/ws`;
}

/** Full jitter over an exponentially growing cap: random in [cap/2, cap]. */
export function backoffDelay(attempt, baseMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 16));
  return Math.round(cap / 2 + random() * (cap / 2));
}

export class ConclaveClient extends EventTarget {
  /**
   * @param {object} options
   * @param {string} options.name    display name sent in hello
   * @param {string} [options.token] optional JWT
   * @param {string} [options.url]   defaults to ws(s)://<page host>/v1/ws
   */
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    this.url = options.url || defaultSocketUrl();
    this.name = options.name || "";
    this.token = options.token || "";

    this.state = "stopped";
    this.user = null; // from welcome
    this.conn = null;
    this.node = null;

    /** session name → {offset, epoch, joined, sentSince, snapshotOffset, presence} */
    this.sessions = new Map();
    /** ref → {resolve, reject, timer, type, session} */
    this.pending = new Map();

    this._ws = null;
    this._nextRef = 1;
    this._attempt = 0;
    this._retryTimer = null;
    this._pingTimer = null;
    this._silenceTimer = null;
    this._running = false;
    this._welcomed = false;
    this._onOnline = () => this._online();
    this._onOffline = () => this._offline();
  }

  // ---- lifecycle ------------------------------------------------------------------------------

  /** Connects, and keeps reconnecting until stop(). */
  start() {
    if (this._running) return;
    this._running = true;
    if (typeof window !== "undefined") {
      window.addEventListener("online", this._onOnline);
      window.addEventListener("offline", this._onOffline);
    }
    this._connect();
  }

  /** Closes the socket for good; pending requests fail with `disconnected`. */
  stop() {
    this._running = false;
    if (typeof window !== "undefined") {
      window.removeEventListener("online", this._onOnline);
      window.removeEventListener("offline", this._onOffline);
    }
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._teardown(1000, "bye");
    this._setState("stopped");
  }

  /** Reconnects now, skipping any backoff wait (e.g. after the token changed). */
  reconnectNow() {
    if (!this._running) return this.start();
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._teardown(1000, "reconnecting");
    this._attempt = 0;
    this._connect();
  }

  get live() {
    return this.state === "live";
  }

  /** Whether a frame sent now is written to an open socket (false while it is closing). */
  get canSend() {
    return this.live && !!this._ws && this._ws.readyState === WebSocket.OPEN;
  }

  // ---- requests -------------------------------------------------------------------------------

  /**
   * Joins a session, now and after every reconnect. Resolves with the `joined` frame.
   * A rejoin sends `since` (the last offset seen) and the epoch, so missed events are replayed.
   */
  join(session) {
    if (!SESSION_NAME.test(session)) {
      return Promise.reject(new RequestError("bad_request", "invalid session name"));
    }
    if (!this.sessions.has(session)) {
      this.sessions.set(session, {
        offset: null,
        epoch: null,
        joined: false,
        sentSince: null,
        snapshotOffset: null,
        presence: null,
      });
    }
    if (!this.live) {
      // Joined as soon as the socket is up; the caller hears through the `joined` event.
      return new Promise((resolve, reject) => {
        const onJoined = (e) => {
          if (e.detail.session !== session) return;
          cleanup();
          resolve(e.detail);
        };
        const onFailed = (e) => {
          if (e.detail.session !== session) return;
          cleanup();
          reject(e.detail.error);
        };
        const cleanup = () => {
          this.removeEventListener("joined", onJoined);
          this.removeEventListener("joinfailed", onFailed);
        };
        this.addEventListener("joined", onJoined);
        this.addEventListener("joinfailed", onFailed);
      });
    }
    return this._sendJoin(session);
  }

  /** Leaves a session; it is no longer rejoined. */
  leave(session) {
    const known = this.sessions.delete(session);
    if (!known || !this.live) return Promise.resolve(null);
    return this.request({ type: "leave", session });
  }

  /** Posts a chat message. Resolves with the ack (`{offset}`). */
  chat(session, text) {
    return this.request({ type: "chat", session, text });
  }

  /**
   * Publishes this connection's presence state. It is remembered and sent again after every
   * rejoin, since presence dies with the connection.
   */
  setPresence(session, state) {
    const entry = this.sessions.get(session);
    if (!entry) return false;
    entry.presence = state;
    if (!this.live || !entry.joined) return false;
    return this.send({ type: "presence", session, state });
  }

  /**
   * Sends a frame with a fresh `ref` and resolves with the reply carrying that ref
   * (`ack`, `joined`, …), or rejects with a RequestError (`error` frame, timeout, disconnect).
   */
  request(frame) {
    if (!this.live) {
      return Promise.reject(new RequestError("disconnected", "not connected to the server"));
    }
    const ref = String(this._nextRef++);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.pending.delete(ref)) {
          reject(new RequestError("timeout", "the server did not answer in time"));
        }
      }, this.options.requestTimeoutMs);
      this.pending.set(ref, { resolve, reject, timer, type: frame.type, session: frame.session });
      if (!this.send({ ...frame, ref })) {
        clearTimeout(timer);
        this.pending.delete(ref);
        reject(new RequestError("disconnected", "not connected to the server"));
      }
    });
  }

  /** Sends a raw frame. Returns false when the socket is not open. */
  send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  // ---- internals ------------------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, attempt: this._attempt, ...extra });
  }

  _connect() {
    if (!this._running) return;
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      this._setState("offline", { reason: "the browser is offline" });
      return;
    }
    this._welcomed = false;
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting", { retryAt: null });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this._scheduleReconnect(String(err));
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      const hello = { type: "hello", name: this.name };
      if (this.token) hello.token = this.token;
      ws.send(JSON.stringify(hello));
      this._armSilence();
    };
    ws.onmessage = (msg) => {
      if (this._ws !== ws) return;
      this._armSilence();
      let frame;
      try {
        frame = JSON.parse(msg.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object") this._onFrame(frame);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._dropConnection();
      if (this._running && this.state !== "offline") {
        this._scheduleReconnect(ev.reason || `socket closed (${ev.code})`);
      }
    };
    ws.onerror = () => {
      // A close event always follows; reconnecting is handled there.
    };
  }

  /** Forgets everything tied to the connection that just went. */
  _dropConnection() {
    clearInterval(this._pingTimer);
    clearTimeout(this._silenceTimer);
    this._pingTimer = null;
    this._silenceTimer = null;
    for (const entry of this.sessions.values()) entry.joined = false;
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(new RequestError("disconnected", "the connection was lost"));
    }
    this.conn = null;
  }

  _teardown(code, reason) {
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch {
        /* already closing */
      }
    }
    this._dropConnection();
  }

  _scheduleReconnect(reason) {
    clearTimeout(this._retryTimer);
    const delay = backoffDelay(this._attempt, this.options.backoffBaseMs, this.options.backoffMaxMs);
    this._attempt += 1;
    this._setState("reconnecting", { retryAt: Date.now() + delay, reason });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._connect();
    }, delay);
  }

  _online() {
    if (this._running && !this._ws) {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._connect();
    }
  }

  _offline() {
    if (!this._running) return;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._teardown(1001, "offline");
    this._setState("offline", { reason: "the browser is offline" });
  }

  _armSilence() {
    clearTimeout(this._silenceTimer);
    this._silenceTimer = setTimeout(() => {
      // Nothing heard for too long: treat the socket as dead and start over.
      const ws = this._ws;
      this._teardown(4000, "silent");
      if (ws && this._running) this._scheduleReconnect("the server stopped answering");
    }, this.options.silenceTimeoutMs);
  }

  _sendJoin(session) {
    const entry = this.sessions.get(session);
    const frame = { type: "join", session };
    if (entry && entry.offset !== null) {
      frame.since = entry.offset;
      if (entry.epoch) frame.epoch = entry.epoch;
    }
    if (entry) entry.sentSince = frame.since ?? null;
    return this.request(frame).catch((error) => {
      // A refused join is not retried (the session may be archived, or we may not be allowed).
      if (error.code !== "disconnected" && error.code !== "timeout") {
        this.sessions.delete(session);
      }
      this._emit("joinfailed", { session, error });
      throw error;
    });
  }

  _onFrame(frame) {
    this._emit("frame", frame);
    const ref = typeof frame.ref === "string" ? frame.ref : null;
    const waiting = ref !== null ? this.pending.get(ref) : undefined;

    switch (frame.type) {
      case "welcome":
        this.user = frame.user || null;
        this.conn = frame.conn || null;
        this.node = frame.node || null;
        this._welcomed = true;
        this._attempt = 0;
        this._setState("live");
        this._emit("welcome", frame);
        clearInterval(this._pingTimer);
        this._pingTimer = setInterval(() => this.send({ type: "ping" }), this.options.pingIntervalMs);
        for (const session of this.sessions.keys()) {
          this._sendJoin(session).catch(() => {});
        }
        return;
      case "joined":
        this._onJoined(frame);
        break;
      case "event":
        this._onEvent(frame);
        return;
      case "reset": {
        const entry = this.sessions.get(frame.session);
        if (entry && entry.snapshotOffset !== null) entry.offset = entry.snapshotOffset;
        this._emit("reset", frame);
        return;
      }
      case "archived":
        this.sessions.delete(frame.session);
        this._emit("archived", frame);
        return;
      case "presence":
        this._emit("presence", frame);
        return;
      case "doc":
        this._emit("doc", frame);
        return;
      case "pong":
        return;
      case "error":
        if (waiting) {
          this.pending.delete(ref);
          clearTimeout(waiting.timer);
          waiting.reject(new RequestError(frame.code, frame.message));
        } else if (!this._welcomed) {
          // Before welcome, an error refuses the hello: retrying will not help until the
          // name or token changes.
          this._running = false;
          clearTimeout(this._retryTimer);
          this._teardown(1000, "hello refused");
          this._setState("offline", { reason: frame.message, code: frame.code });
          this._emit("error", frame);
        } else {
          this._emit("error", frame);
        }
        return;
      default:
        break;
    }

    if (waiting) {
      this.pending.delete(ref);
      clearTimeout(waiting.timer);
      waiting.resolve(frame);
    }
  }

  _onJoined(frame) {
    let entry = this.sessions.get(frame.session);
    if (!entry) return; // left meanwhile
    entry.joined = true;
    entry.snapshotOffset = frame.offset;
    if (entry.epoch !== null && entry.epoch !== frame.epoch) {
      // Another history: the server answers with `reset`; start again from the snapshot.
      entry.offset = frame.offset;
    } else if (entry.sentSince === null) {
      // No replay was asked for: live events follow the snapshot.
      entry.offset = frame.offset;
    }
    // Otherwise the replayed events advance the offset one by one, so a drop mid-replay
    // resumes where it stopped.
    entry.epoch = frame.epoch;
    // Presence dies with a connection: publish ours again before anyone hears of the join.
    if (entry.presence) this.send({ type: "presence", session: frame.session, state: entry.presence });
    this._emit("joined", frame);
  }

  _onEvent(frame) {
    const entry = this.sessions.get(frame.session);
    if (!entry) return;
    if (typeof frame.offset === "number") {
      if (entry.offset !== null && frame.offset <= entry.offset) return; // seen already
      entry.offset = frame.offset;
    }
    const detail = { ...frame, replayed: entry.snapshotOffset !== null && frame.offset <= entry.snapshotOffset };
    this._emit("event", detail);
  }
}
