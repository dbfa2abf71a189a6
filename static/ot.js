// Operational transformation for document edits, exactly as OT.md fixes it (the server's
// src/session/ot.rs is the same algorithm in Rust).
//
// An operation is an array of components: {retain: n}, {insert: "s"}, {delete: n}. Lengths and
// offsets count UTF-16 code units, which is what JavaScript string indices count, so no
// conversion is ever needed. Every function here returns operations in canonical form:
//   - adjacent components of the same kind merged;
//   - where an insert and a delete touch, the insert first;
//   - no final retain.
// Plain data, no DOM: this module also runs under Node for the tests.

/** Thrown for an operation that is malformed, too long for its text, or splits a surrogate pair. */
export class OtError extends Error {
  constructor(message) {
    super(message);
    this.name = "OtError";
  }
}

const isHigh = (c) => c >= 0xd800 && c <= 0xdbff;
const isLow = (c) => c >= 0xdc00 && c <= 0xdfff;

/** Is index `i` of `text` inside a surrogate pair (between its two halves)? */
export function splitsPair(text, i) {
  return i > 0 && i < text.length && isHigh(text.charCodeAt(i - 1)) && isLow(text.charCodeAt(i));
}

// ---- building canonical operations --------------------------------------------------------------

/** Builds a canonical operation component by component. */
class Builder {
  constructor() {
    this.ops = [];
  }

  retain(n) {
    if (n <= 0) return this;
    const last = this.ops[this.ops.length - 1];
    if (last && last.retain !== undefined) last.retain += n;
    else this.ops.push({ retain: n });
    return this;
  }

  insert(s) {
    if (!s) return this;
    const ops = this.ops;
    // An insert goes before a touching delete, so equal edits have one canonical form.
    const at = ops.length > 0 && ops[ops.length - 1].delete !== undefined ? ops.length - 1 : ops.length;
    const prev = ops[at - 1];
    if (prev && prev.insert !== undefined) prev.insert += s;
    else ops.splice(at, 0, { insert: s });
    return this;
  }

  delete(n) {
    if (n <= 0) return this;
    const last = this.ops[this.ops.length - 1];
    if (last && last.delete !== undefined) last.delete += n;
    else this.ops.push({ delete: n });
    return this;
  }

  finish() {
    const last = this.ops[this.ops.length - 1];
    if (last && last.retain !== undefined) this.ops.pop();
    return this.ops;
  }
}

const isCount = (n) => Number.isSafeInteger(n) && n >= 1;

/** The kind of one component, or throws if it is not exactly one valid component. */
function kindOf(c) {
  if (!c || typeof c !== "object" || Array.isArray(c)) throw new OtError("a component must be an object");
  const keys = Object.keys(c);
  if (keys.length !== 1) throw new OtError("a component has exactly one of retain, insert, delete");
  const [key] = keys;
  if (key === "retain" || key === "delete") {
    if (!isCount(c[key])) throw new OtError(`a ${key} must count at least 1`);
    return key;
  }
  if (key === "insert") {
    if (typeof c.insert !== "string" || c.insert.length === 0) throw new OtError("an insert must be a non-empty string");
    return key;
  }
  throw new OtError(`unknown component "${key}"`);
}

/**
 * Validates an operation and returns it in canonical form (a new array; the input is untouched).
 * Throws OtError on a malformed component.
 */
export function normalize(op) {
  if (!Array.isArray(op)) throw new OtError("an operation is an array of components");
  const b = new Builder();
  for (const c of op) {
    const kind = kindOf(c);
    if (kind === "retain") b.retain(c.retain);
    else if (kind === "insert") b.insert(c.insert);
    else b.delete(c.delete);
  }
  return b.finish();
}

/** Retains plus deletes: the shortest text this operation applies to. */
export function baseLength(op) {
  let n = 0;
  for (const c of op) n += c.retain ?? c.delete ?? 0;
  return n;
}

/** The length of the text after applying `op` to a text of length `len`. */
export function targetLength(op, len) {
  let n = len;
  for (const c of op) {
    if (c.insert !== undefined) n += c.insert.length;
    else if (c.delete !== undefined) n -= c.delete;
  }
  return n;
}

export function isNoop(op) {
  return op.every((c) => c.retain !== undefined);
}

/**
 * Applies `op` to `text`. Throws OtError if the operation reaches past the end of the text or
 * cuts a surrogate pair; the rest of the text after the operation is kept (the omitted final
 * retain).
 */
export function apply(text, op) {
  const ops = normalize(op);
  const need = baseLength(op); // as written: a final retain past the end is an error too
  if (need > text.length) {
    throw new OtError(`the operation reaches ${need} code units into a text of ${text.length}`);
  }
  let out = "";
  let cursor = 0;
  for (const c of ops) {
    if (splitsPair(text, cursor)) throw new OtError(`the operation splits a surrogate pair at ${cursor}`);
    if (c.retain !== undefined) {
      out += text.slice(cursor, cursor + c.retain);
      cursor += c.retain;
    } else if (c.insert !== undefined) {
      out += c.insert;
    } else {
      cursor += c.delete;
    }
  }
  for (const at of [cursor, need]) {
    if (splitsPair(text, at)) throw new OtError(`the operation splits a surrogate pair at ${at}`);
  }
  return out + text.slice(cursor);
}

// ---- walking two operations in step -------------------------------------------------------------

/**
 * Reads an operation's components in parts on demand. Past the end it yields an endless retain
 * (kind "end"): an omitted final retain covers whatever the other side still has.
 */
class Cursor {
  constructor(op) {
    this.ops = op;
    this.index = 0;
    this.used = 0; // code units already consumed from the current component
  }

  /** {kind, n, s}: the rest of the current component. */
  peek() {
    const c = this.ops[this.index];
    if (!c) return { kind: "end", n: Infinity };
    if (c.retain !== undefined) return { kind: "retain", n: c.retain - this.used };
    if (c.delete !== undefined) return { kind: "delete", n: c.delete - this.used };
    const s = c.insert.slice(this.used);
    return { kind: "insert", n: s.length, s };
  }

  /** Consumes `n` code units of the current component. */
  advance(n) {
    const c = this.ops[this.index];
    if (!c) return;
    const len = c.retain ?? c.delete ?? c.insert.length;
    if (this.used + n < len) this.used += n;
    else {
      this.index += 1;
      this.used = 0;
    }
  }
}

/**
 * Rebases two operations written against the same text: returns [x′, y′] where x′ applies after
 * y, y′ applies after x, and apply(apply(S, y), x′) === apply(apply(S, x), y′).
 * Tie rule: where both insert at one position, x's insert goes first. Pass first the operation
 * the server ordered first.
 */
export function transform(x, y) {
  const xs = new Builder();
  const ys = new Builder();
  const a = new Cursor(normalize(x));
  const b = new Cursor(normalize(y));
  for (;;) {
    const p = a.peek();
    const q = b.peek();
    if (p.kind === "end" && q.kind === "end") break;
    if (p.kind === "insert") {
      // x's insert first, also on a tie; y′ steps over it.
      xs.insert(p.s);
      ys.retain(p.n);
      a.advance(p.n);
    } else if (q.kind === "insert") {
      xs.retain(q.n);
      ys.insert(q.s);
      b.advance(q.n);
    } else {
      // Both consume base text now: retain, delete, or the endless retain at "end".
      const k = Math.min(p.n, q.n);
      const xDel = p.kind === "delete";
      const yDel = q.kind === "delete";
      if (xDel && yDel) {
        // Both removed the same text: neither result deletes it again.
      } else if (xDel) {
        xs.delete(k); // y retains it: the delete survives in x′, y′ shrinks
      } else if (yDel) {
        ys.delete(k);
      } else {
        xs.retain(k);
        ys.retain(k);
      }
      a.advance(k);
      b.advance(k);
    }
  }
  return [xs.finish(), ys.finish()];
}

/** One operation with the effect of `a` then `b`: apply(apply(S, a), b) === apply(S, compose(a, b)). */
export function compose(a, b) {
  const out = new Builder();
  const x = new Cursor(normalize(a));
  const y = new Cursor(normalize(b));
  for (;;) {
    const p = x.peek();
    const q = y.peek();
    if (p.kind === "end" && q.kind === "end") break;
    if (p.kind === "delete") {
      // a's deletes happened before b saw the text.
      out.delete(p.n);
      x.advance(p.n);
    } else if (q.kind === "insert") {
      // b's inserts are new text, whatever a did there.
      out.insert(q.s);
      y.advance(q.n);
    } else if (p.kind === "end") {
      // Past a's end, b works on the original text directly.
      if (q.kind === "retain") out.retain(q.n);
      else out.delete(q.n);
      y.advance(q.n);
    } else if (q.kind === "end") {
      if (p.kind === "retain") out.retain(p.n);
      else out.insert(p.s);
      x.advance(p.n);
    } else {
      const k = Math.min(p.n, q.n);
      if (p.kind === "retain") {
        if (q.kind === "retain") out.retain(k);
        else out.delete(k);
      } else if (q.kind === "retain") {
        out.insert(p.s.slice(0, k)); // a's inserted text, kept by b
      }
      // else: b deletes text a inserted; it never existed.
      x.advance(k);
      y.advance(k);
    }
  }
  return out.finish();
}

// ---- textarea helpers ---------------------------------------------------------------------------

/**
 * The operation that turns `oldText` into `newText`: common prefix, common suffix, then one
 * delete and one insert between them. Never cuts a surrogate pair of either text.
 */
export function diff(oldText, newText) {
  if (oldText === newText) return [];
  const max = Math.min(oldText.length, newText.length);
  let prefix = 0;
  while (prefix < max && oldText.charCodeAt(prefix) === newText.charCodeAt(prefix)) prefix++;
  // Back off to a code point boundary in both texts (they agree on everything before `prefix`).
  while (prefix > 0 && (splitsPair(oldText, prefix) || splitsPair(newText, prefix))) prefix--;
  const maxSuffix = max - prefix;
  let suffix = 0;
  while (suffix < maxSuffix &&
    oldText.charCodeAt(oldText.length - 1 - suffix) === newText.charCodeAt(newText.length - 1 - suffix)) suffix++;
  while (suffix > 0 &&
    (splitsPair(oldText, oldText.length - suffix) || splitsPair(newText, newText.length - suffix))) suffix--;
  const deleted = oldText.length - prefix - suffix;
  const inserted = newText.slice(prefix, newText.length - suffix);
  return new Builder().retain(prefix).insert(inserted).delete(deleted).finish();
}

/**
 * A fine-grained operation turning `oldText` into `newText`: a shortest edit script over code
 * points (Myers), so that unchanged stretches between several changes are retained. Used to
 * rebase edits onto a snapshot when the changes in between are unknown. Falls back to diff()
 * when the texts differ in more than `maxEdits` code points.
 */
export function diffFine(oldText, newText, maxEdits = 2000) {
  if (oldText === newText) return [];
  const coarse = diff(oldText, newText);
  // Trim what diff() already found common; run Myers on the middle only.
  const prefix = coarse[0]?.retain ?? 0;
  const cut = (t, len) => t.slice(prefix, t.length - len);
  const del = coarse.find((c) => c.delete !== undefined)?.delete ?? 0;
  const suffix = oldText.length - prefix - del;
  const a = [...cut(oldText, suffix)];
  const b = [...cut(newText, suffix)];
  const n = a.length;
  const m = b.length;
  const maxD = Math.min(maxEdits, n + m);
  const off = maxD + 1;
  let v = new Int32Array(2 * maxD + 3);
  const trace = [];
  let found = -1;
  outer: for (let d = 0; d <= maxD; d++) {
    trace.push(v.slice());
    for (let k = -d; k <= d; k += 2) {
      let x = k === -d || (k !== d && v[off + k - 1] < v[off + k + 1]) ? v[off + k + 1] : v[off + k - 1] + 1;
      let y = x - k;
      while (x < n && y < m && a[x] === b[y]) {
        x++;
        y++;
      }
      v[off + k] = x;
      if (x >= n && y >= m) {
        found = d;
        break outer;
      }
    }
  }
  if (found < 0) return coarse;
  // Walk back through the trace to get the script, last step first.
  const steps = []; // "=", "-", "+" with the element
  let x = n;
  let y = m;
  for (let d = found; d > 0; d--) {
    const vp = trace[d];
    const k = x - y;
    const down = k === -d || (k !== d && vp[off + k - 1] < vp[off + k + 1]);
    const pk = down ? k + 1 : k - 1;
    const px = vp[off + pk];
    const py = px - pk;
    while (x > px + (down ? 0 : 1) && y > py + (down ? 1 : 0)) steps.push(["=", a[--x]]), y--;
    if (down) steps.push(["+", b[--y]]);
    else steps.push(["-", a[--x]]);
  }
  while (x > 0 && y > 0) steps.push(["=", a[--x]]), y--;
  const out = new Builder().retain(prefix);
  for (let i = steps.length - 1; i >= 0; i--) {
    const [kind, cp] = steps[i];
    if (kind === "=") out.retain(cp.length);
    else if (kind === "-") out.delete(cp.length);
    else out.insert(cp);
  }
  return out.finish();
}

/**
 * Moves a caret (a UTF-16 index into the text before `op`) through `op`.
 * `isOwn`: the op was made by the caret's owner, so an insert right at the caret pushes the
 * caret past it (as when typing). Someone else's insert at the caret leaves the caret before it.
 * A caret inside a deleted range moves to where the range was.
 */
export function transformCaret(pos, op, isOwn = false) {
  let cursor = 0; // position in the old text
  let shift = 0; // new index minus old index, for positions at `cursor`
  for (const c of op) {
    if (c.retain !== undefined) {
      if (pos < cursor + c.retain) break;
      cursor += c.retain;
    } else if (c.insert !== undefined) {
      if (cursor < pos || (cursor === pos && isOwn)) shift += c.insert.length;
      else break;
    } else {
      if (pos <= cursor) break;
      if (pos < cursor + c.delete) return cursor + shift; // inside the deleted range
      shift -= c.delete;
      cursor += c.delete;
    }
  }
  return pos + shift;
}
