// The client side of collaborative editing (OT.md, "Client side"): one DocClient per document.
//
// It holds the text the user sees and the last server version it knows, and is always in one of
// three states:
//   Synchronized                 inflight === null
//   AwaitingConfirm(o)           inflight === o, buffer === null
//   AwaitingWithBuffer(o, b)     inflight === o, buffer === b (local edits since o, composed)
// One edit is in flight at a time; later local edits wait in the buffer.
//
// It talks to the server through a small transport, so it runs in the page (over client.js) and
// under Node in the tests (over a fake server):
//   transport.sendEdit(doc, base, ops) → Promise<{version}>   rejects with {code, message}
//   transport.fetchDoc(doc)            → Promise<{version, text}>
// It reports through callbacks:
//   onChange({text, op, source, actor})  the text changed; `op` turns the previous text into the
//                                        new one (source: "remote" or "reload"); not called for
//                                        local edits, whose text the caller already has
//   onState(docClient)                   version, saving or loading changed
//   onNotice({message, code, discarded}) something the user should know (a reload, a refusal)
//
// Acks and doc frames must be fed in the server's commit order. client.js settles a request's
// promise in a microtask of the task that received the ack, so a doc frame received after the
// ack is always handled after it.

import { apply, compose, diff, diffFine, isNoop, normalize, transform } from "./ot.js";

/** Refusals after which the edit is retried as it is, after a pause. */
const RETRY_CODES = new Set(["rate_limited"]);
/** A refusal that the server follows with `reset` and a fresh `joined` of its own. */
const AWAIT_RESET_CODES = new Set(["storage_unavailable"]);

export class DocClient {
  /**
   * @param {object} o
   * @param {string} o.name
   * @param {number} o.version   the server version `text` is at
   * @param {string} o.text
   * @param {object} o.transport {sendEdit, fetchDoc}
   */
  constructor({ name, version = 0, text = "", transport, onChange, onState, onNotice, timers }) {
    this.name = name;
    this.version = version;
    this.text = text;
    this.inflight = null;
    this.buffer = null;
    /** Whether `inflight` was handed to the transport (it may have reached the server). */
    this.inflightSent = false;
    /** The server's text at `version`: `text` without the pending edits. */
    this.serverText = text;
    this.transport = transport;
    this.onChange = onChange || (() => {});
    this.onState = onState || (() => {});
    this.onNotice = onNotice || (() => {});
    this.timers = timers || { setTimeout: (f, ms) => setTimeout(f, ms), clearTimeout: (t) => clearTimeout(t) };

    /**
     * The connection is down: nothing is sent until the next `joined` says where the server
     * stands, and so whether the edit in flight landed (see rejoined).
     */
    this.offline = false;
    /** A refused edit that the server follows with `reset` and a snapshot: wait for it. */
    this.uncertain = false;
    /** A REST reload is under way: doc frames wait in `queue`. */
    this.loading = false;
    this.queue = [];
    /** Bumped on every re-initialization: replies to older requests are ignored. */
    this.generation = 0;
    this.retryTimer = null;
    this.reloadTimer = null;
    this.reloadAttempt = 0;
    this.closed = false;
    this.staleAckVersion = 0;
    this.stats = { sent: 0, acked: 0, remote: 0, reloads: 0 };
  }

  /** "synchronized" | "awaiting" | "buffering": the OT.md state. */
  get state() {
    if (!this.inflight) return "synchronized";
    return this.buffer ? "buffering" : "awaiting";
  }

  /** Local edits the server has not acknowledged yet. */
  get saving() {
    return this.inflight !== null;
  }

  close() {
    this.closed = true;
    this.generation++;
    this.timers.clearTimeout(this.retryTimer);
    this.timers.clearTimeout(this.reloadTimer);
  }

  // ---- local edits ------------------------------------------------------------------------------

  /** The user changed the text from `this.text` to `newText`. Returns the operation. */
  localText(newText) {
    const op = diff(this.text, newText);
    this.localEdit(op);
    return op;
  }

  /** A local edit `op`, written against `this.text`. */
  localEdit(op) {
    op = normalize(op);
    if (isNoop(op)) return;
    this.text = apply(this.text, op);
    if (this.inflight === null) {
      this.inflight = op;
      this.inflightSent = false;
      this._send();
    } else {
      this.buffer = this.buffer === null ? op : compose(this.buffer, op);
    }
    this.onState(this);
  }

  _send() {
    if (this.closed) return;
    // While reloading or waiting for a rejoin, the edit stays pending; it is sent (or dropped)
    // when that finishes.
    if (this.loading || this.uncertain || this.offline) return;
    const generation = this.generation;
    const op = this.inflight;
    this.inflightSent = true;
    this.stats.sent++;
    this.transport.sendEdit(this.name, this.version, op).then(
      (ack) => {
        if (generation === this.generation) this._onAck(ack);
        else this._onStaleAck(ack);
      },
      (error) => {
        if (generation === this.generation) this._onRefused(error || {});
      },
    );
  }

  _onAck(ack) {
    this.stats.acked++;
    this.reloadAttempt = 0;
    const v = ack?.version;
    // Every version before ours came as a doc frame ahead of this ack, so the ack is for
    // known + 1 (or known itself, for an edit that became a no-op on the server).
    if (typeof v !== "number" || v > this.version + 1) {
      // A version we never saw: our copy is missing something. The snapshot will contain this
      // edit; only the buffer (never sent) is still pending, and is dropped (and reported).
      this.inflight = this.buffer;
      this.inflightSent = false;
      this.buffer = null;
      this.reload("This document got out of step with the server and was reloaded.", "gap");
      return;
    }
    this.version = Math.max(this.version, v);
    // The server applied exactly our rebased edit (it transformed it through the same frames).
    this.serverText = apply(this.serverText, this.inflight);
    this.inflight = null;
    if (this.buffer !== null) {
      const b = this.buffer;
      this.buffer = null;
      if (!isNoop(b)) {
        this.inflight = b;
        this.inflightSent = false;
        this._send();
      }
    }
    this.onState(this);
  }

  /**
   * An ack for an edit that a reload since then dropped from our state. If the server committed
   * it after the snapshot we reloaded from, our text lacks it and no doc frame will bring it (the
   * sender gets none): reload again.
   */
  _onStaleAck(ack) {
    if (this.closed || typeof ack?.version !== "number" || ack.version <= this.version) return;
    // Checked again after the reload: its snapshot must reach this version.
    this.staleAckVersion = Math.max(this.staleAckVersion || 0, ack.version);
    if (!this.loading) this.reload(null, "stale_ack");
  }

  _onRefused(error) {
    const code = error.code || "internal";
    if (code === "disconnected") {
      // Applied or not, we cannot tell yet: the `joined` after reconnecting decides. A request
      // refused before it was written to the socket (`unsent`) is known not to have landed.
      if (error.unsent) this.inflightSent = false;
      this.offline = true;
      this.onState(this);
      return;
    }
    if (RETRY_CODES.has(code)) {
      // The same edit, rebased through every doc frame since, is still good against `version`.
      const generation = this.generation;
      this.timers.clearTimeout(this.retryTimer);
      this.retryTimer = this.timers.setTimeout(() => {
        if (generation === this.generation && this.inflight) this._send();
      }, 1000);
      return;
    }
    if (AWAIT_RESET_CODES.has(code)) {
      // The server reloads the document and sends `reset` with a fresh snapshot; should none
      // come, reload it ourselves.
      this.uncertain = true;
      const generation = this.generation;
      this.timers.clearTimeout(this.reloadTimer);
      this.reloadTimer = this.timers.setTimeout(() => {
        if (generation === this.generation) this.reload(`The server could not save an edit (${code}).`, code);
      }, 3000);
      this.onState(this);
      return;
    }
    // resync_required, bad_request, timeout (no answer: we cannot know), forbidden, …
    const why = code === "resync_required"
      ? "This document moved on too far while your edit was on its way."
      : code === "timeout"
        ? "The server did not confirm an edit in time."
        : `The server refused an edit: ${error.message || code} (${code}).`;
    this.reload(why, code);
  }

  // ---- remote edits -----------------------------------------------------------------------------

  /** A `doc` frame: {version, ops, actor}, whose ops apply to version - 1. */
  remote(frame) {
    if (this.closed) return;
    if (this.loading) {
      this.queue.push(frame);
      return;
    }
    const v = frame.version;
    if (typeof v !== "number" || v <= this.version) return; // already in our text
    if (v !== this.version + 1) {
      this.reload(null, "gap", [frame]);
      return;
    }
    let s;
    try {
      s = normalize(frame.ops);
      // s was ordered by the server before anything still pending here: s wins ties.
      let shown = s;
      let o = this.inflight;
      let b = this.buffer;
      if (o !== null) {
        let o2;
        [shown, o2] = transform(s, o);
        o = o2;
        if (b !== null) {
          let b2;
          [shown, b2] = transform(shown, b);
          b = b2;
        }
      }
      const text = apply(this.text, shown);
      this.serverText = apply(this.serverText, s);
      this.text = text;
      this.inflight = o;
      this.buffer = b;
      this.version = v;
      this.stats.remote++;
      this.onChange({ text, op: shown, source: "remote", actor: frame.actor || null });
      this.onState(this);
    } catch (err) {
      // An operation that does not fit our text: our copy went wrong somewhere.
      this.reload(null, "bad_frame", [frame]);
    }
  }

  // ---- re-initialization ------------------------------------------------------------------------

  /**
   * Re-initializes from a snapshot {version, text}, dropping anything pending. Announces it when
   * `notice` is given or local edits were dropped.
   */
  reset(snapshot, notice = null, code = "reset") {
    const discarded = this.inflight !== null;
    this.generation++;
    this.timers.clearTimeout(this.retryTimer);
    this.timers.clearTimeout(this.reloadTimer);
    this.inflight = null;
    this.buffer = null;
    this.inflightSent = false;
    this.uncertain = false;
    this.loading = false;
    const text = typeof snapshot?.text === "string" ? snapshot.text : "";
    const version = typeof snapshot?.version === "number" ? snapshot.version : 0;
    const op = diff(this.text, text);
    this.text = text;
    this.serverText = text;
    this.version = version;
    if (op.length) this.onChange({ text, op, source: "reload", actor: null });
    if (notice || discarded) {
      const message = [notice, discarded ? "Your unsaved changes to this document were discarded." : ""]
        .filter(Boolean).join(" ");
      this.onNotice({ message, code, discarded });
    }
    this.onState(this);
    // Frames that arrived during a reload and are newer than its snapshot.
    const queued = this.queue;
    this.queue = [];
    queued.sort((a, b) => a.version - b.version);
    for (const frame of queued) this.remote(frame);
    if (!this.loading && this.staleAckVersion > this.version) {
      this.staleAckVersion = 0;
      this.reload(null, "stale_ack");
    } else if (!this.loading) this.staleAckVersion = 0;
  }

  /** Reloads the document over REST and re-initializes from it (see reset). */
  reload(notice = null, code = "reload", queued = []) {
    if (this.closed) return;
    this.stats.reloads++;
    this.generation++;
    this.timers.clearTimeout(this.retryTimer);
    this.timers.clearTimeout(this.reloadTimer);
    if (!this.loading) this.queue = [];
    this.queue.push(...queued);
    this.loading = true;
    this.onState(this);
    const generation = this.generation;
    const attempt = this.reloadAttempt++;
    const delay = attempt === 0 ? 0 : Math.min(10_000, 250 * 2 ** Math.min(attempt, 6));
    this.reloadTimer = this.timers.setTimeout(() => {
      this.transport.fetchDoc(this.name).then(
        (snapshot) => {
          if (generation !== this.generation) return;
          if (typeof snapshot?.version === "number" && snapshot.version < this.version && code !== "bad_frame") {
            // Older than what we already have (a lagging reader): ask again later, keeping the
            // frames queued meanwhile.
            this.reload(notice, code);
            return;
          }
          this.reset(snapshot, notice, code);
        },
        () => {
          if (generation !== this.generation) return;
          this.reload(notice, code); // still loading: the queue is kept
        },
      );
    }, delay);
  }

  /**
   * Moves pending edits onto a newer snapshot when the changes in between are unknown: treats
   * diffFine(baseText, snapshot.text) as the one remote change and transforms `pending` (an
   * operation on baseText, or null) through it. `this.text` must be apply(baseText, pending).
   */
  rebase({ version, text }, baseText, pending) {
    const missed = diffFine(baseText, text);
    let shown = missed;
    let mine = null;
    if (pending !== null) [shown, mine] = transform(missed, pending);
    this.generation++;
    this.timers.clearTimeout(this.retryTimer);
    this.timers.clearTimeout(this.reloadTimer);
    this.text = apply(this.text, shown);
    this.serverText = text;
    this.version = version;
    this.buffer = null;
    this.inflight = mine === null || isNoop(mine) ? null : mine;
    this.inflightSent = false;
    this.stats.rebases = (this.stats.rebases || 0) + 1;
    if (shown.length) this.onChange({ text: this.text, op: shown, source: "reload", actor: null });
    if (this.inflight) this._send();
    this.onState(this);
  }

  /**
   * The connection went down: hold every edit until the next `joined` (rejoined), which tells
   * whether the one in flight landed. Requests in flight fail with `disconnected` too.
   */
  disconnected() {
    if (this.closed) return;
    this.offline = true;
    this.onState(this);
  }

  /**
   * A `joined` after a reconnect (not the first one), with this document's snapshot from
   * `joined.docs` ({version: 0, text: ""} when it is not listed). `reset`: the server said
   * `reset` just before, so its snapshot is the only truth.
   */
  rejoined(snapshot, reset = false) {
    if (this.closed) return;
    const version = typeof snapshot?.version === "number" ? snapshot.version : 0;
    const text = typeof snapshot?.text === "string" ? snapshot.text : "";
    this.offline = false;
    if (reset) {
      this.reset({ version, text }, this.inflight ? "The server reloaded this document." : null, "reset");
      return;
    }
    if (this.loading) {
      // A REST reload is already under way; the snapshot is at least as good.
      this.reset({ version, text }, null, "reload");
      return;
    }
    if (version === this.version) {
      this.uncertain = false;
      if (this.inflight !== null) {
        // Nothing was committed since our known version, so the in-flight edit never landed:
        // send it again with everything typed since.
        this.inflight = this.buffer === null ? this.inflight : compose(this.inflight, this.buffer);
        this.buffer = null;
        this.generation++;
        this.stats.resent = (this.stats.resent || 0) + 1;
        this._send();
        this.onState(this);
      }
      return;
    }
    if (this.inflight === null) {
      // Nothing pending: edits we never saw (doc frames are not replayed); take the snapshot.
      this.reset({ version, text }, null, "rejoin");
      return;
    }
    if (!this.inflightSent && !this.uncertain) {
      // Nothing of ours reached the server: rebase all of it on the snapshot.
      this.rebase({ version, text }, this.serverText,
        this.buffer === null ? this.inflight : compose(this.inflight, this.buffer));
      return;
    }
    // The edit in flight may or may not have landed before the connection went.
    const withMine = apply(this.serverText, this.inflight);
    if (version === this.version + 1 && text === withMine) {
      // Exactly one change since, and it is ours: it landed. Carry on as if acknowledged.
      this.uncertain = false;
      this.version = version;
      this.serverText = text;
      this.inflight = null;
      const b = this.buffer;
      this.buffer = null;
      this.generation++;
      if (b !== null && !isNoop(b)) {
        this.inflight = b;
        this.inflightSent = false;
        this._send();
      }
      this.onState(this);
      return;
    }
    // Unknown: keep what was typed after it (rebased as if it landed; if it did not, its text
    // goes away with the snapshot) and say so.
    this.uncertain = false;
    this.rebase({ version, text }, withMine, this.buffer);
    this.onNotice({
      message: "Reconnected. Your last change before the connection dropped may not have been saved; please check the text.",
      code: "uncertain",
      discarded: true,
    });
  }
}
