// The web page's OT client (static/ot.js, static/doc-client.js) against OT.md.
//
//   node --test tests/web/ot.test.mjs          (run by `cargo test --test web_ot`)
//
// Node built-ins only. Every random case has its own seed, printed when it fails; rerun just that
// case with OT_SEED=<seed> (add --test-name-pattern to pick the test). OT_RUNS=<factor> scales
// the number of cases, e.g. OT_RUNS=20 for a long local fuzz.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  OtError,
  apply,
  baseLength,
  compose,
  diff,
  diffFine,
  isNoop,
  normalize,
  splitsPair,
  transform,
  transformCaret,
} from "../../static/ot.js";
import { DocClient } from "../../static/doc-client.js";

// ---- seeded randomness ---------------------------------------------------------------------------

function mulberry32(seed) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  next.int = (n) => Math.floor(next() * n);
  next.pick = (items) => items[next.int(items.length)];
  next.chance = (p) => next() < p;
  return next;
}

function hash(s) {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

const ONLY_SEED = process.env.OT_SEED === undefined ? null : Number(process.env.OT_SEED) >>> 0;
const SCALE = Number(process.env.OT_RUNS || 1);

/** The seeds of a property's cases: fixed per test name and case number. */
function seeds(name, runs) {
  if (ONLY_SEED !== null) return [ONLY_SEED];
  const n = Math.max(1, Math.round(runs * SCALE));
  return Array.from({ length: n }, (_, i) => (hash(name) ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0);
}

function withSeed(name, seed, err) {
  const pattern = `^${name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`; // a regex, for the shell's "…"
  const how = `OT_SEED=${seed} node --test --test-name-pattern="${pattern}" tests/web/ot.test.mjs`;
  return new Error(`failed with seed ${seed} (reproduce: ${how})\n${err?.message ?? err}`, { cause: err });
}

/** A test running `body(random, seed)` once per seed. */
function property(name, runs, body) {
  test(name, async () => {
    for (const seed of seeds(name, runs)) {
      try {
        await body(mulberry32(seed), seed);
      } catch (err) {
        throw withSeed(name, seed, err);
      }
    }
  });
}

// ---- random texts and operations -----------------------------------------------------------------

// Surrogate pairs that share halves: 😀 😁 👍 share the high surrogate D83D, 🈀 and 😀 the low
// DE00; 👍🏽 is two code points; e + U+0301 is two BMP code points.
const ALPHABET = ["a", "b", "c", " ", "\n", "é", "e\u0301", "😀", "😁", "👍", "🈀", "𝄞", "👍🏽"];

function randText(r, max, alphabet = ALPHABET) {
  let s = "";
  const n = r.int(max + 1);
  for (let i = 0; i < n; i++) s += r.pick(alphabet);
  return s;
}

/** Unit offsets of the code point boundaries of `text`, 0 and text.length included. */
function boundaries(text) {
  const out = [0];
  let at = 0;
  for (const cp of text) out.push((at += cp.length));
  return out;
}

/**
 * A random valid operation on `text`: cuts only at code point boundaries, often not canonical
 * (split retains, deletes before inserts, explicit final retains).
 */
function randOp(r, text) {
  const cps = [...text];
  const ops = [];
  let i = 0;
  const ins = () => ops.push({ insert: randText(r, 3) || "z" });
  while (i < cps.length) {
    const roll = r();
    const take = 1 + r.int(Math.min(4, cps.length - i));
    const units = cps.slice(i, i + take).join("").length;
    if (roll < 0.25) ins();
    else if (roll < 0.55) {
      ops.push({ delete: units });
      i += take;
    } else {
      ops.push({ retain: units });
      i += take;
    }
  }
  if (r.chance(0.4)) ins();
  if (r.chance(0.5)) while (ops.length && ops[ops.length - 1].retain !== undefined) ops.pop();
  return ops;
}

const kind = (c) => Object.keys(c)[0];

function assertCanonical(op, what = "operation") {
  const show = JSON.stringify(op);
  assert.ok(Array.isArray(op), `${what} is not an array`);
  assert.deepEqual(normalize(op), op, `${what} is not canonical: ${show}`);
  for (const c of op) {
    assert.equal(Object.keys(c).length, 1, `${what}: ${show}`);
    if (c.insert !== undefined) assert.ok(typeof c.insert === "string" && c.insert.length > 0, `${what}: ${show}`);
    else assert.ok(Number.isSafeInteger(c.retain ?? c.delete) && (c.retain ?? c.delete) >= 1, `${what}: ${show}`);
  }
  if (op.length) assert.notEqual(kind(op[op.length - 1]), "retain", `${what} ends in a retain: ${show}`);
  for (let i = 1; i < op.length; i++) {
    assert.notEqual(kind(op[i]), kind(op[i - 1]), `${what} has unmerged components: ${show}`);
    assert.ok(!(kind(op[i - 1]) === "delete" && kind(op[i]) === "insert"), `${what} has a delete before an insert: ${show}`);
  }
}

/**
 * The reference model. Several canonical operations, all written against `text`, merged: at each
 * position p, the inserts of ops[0], ops[1], … in that order (the earlier op wins ties), then
 * text[p] unless some op deletes it. With one op this is what apply must give; with two it is what
 * both sides of a transform must give (OT.md: x's insert goes first).
 */
function model(text, ...ops) {
  const n = text.length;
  const ins = ops.map(() => new Array(n + 1).fill(""));
  const del = new Array(n).fill(false);
  ops.forEach((op, k) => {
    let at = 0;
    for (const c of op) {
      if (c.retain !== undefined) at += c.retain;
      else if (c.insert !== undefined) ins[k][at] += c.insert;
      else for (const end = at + c.delete; at < end; at++) del[at] = true;
    }
  });
  let out = "";
  for (let p = 0; p <= n; p++) {
    for (let k = 0; k < ops.length; k++) out += ins[k][p];
    if (p < n && !del[p]) out += text[p];
  }
  return out;
}

// ---- ot.js -------------------------------------------------------------------------------------

property("apply agrees with the reference model; normalize is canonical and idempotent", 3000, (r) => {
  const S = randText(r, 14);
  const x = randOp(r, S);
  const nx = normalize(x);
  assertCanonical(nx, "normalize(x)");
  assert.deepEqual(normalize(nx), nx, "normalize is not idempotent");
  assert.equal(baseLength(nx) <= S.length, true);
  const got = apply(S, x);
  assert.equal(got, model(S, nx), JSON.stringify({ S, x }));
  assert.equal(apply(S, nx), got, "apply differs on the normalized op");
});

property("transform converges, and x's insert goes first on ties", 6000, (r) => {
  const S = randText(r, 14);
  const x = randOp(r, S);
  const y = randOp(r, S);
  const [x1, y1] = transform(x, y);
  const ctx = () => JSON.stringify({ S, x, y, x1, y1 });
  assertCanonical(x1, "x′");
  assertCanonical(y1, "y′");
  const viaY = apply(apply(S, y), x1);
  const viaX = apply(apply(S, x), y1);
  assert.equal(viaY, viaX, `apply(apply(S, y), x′) !== apply(apply(S, x), y′): ${ctx()}`);
  // Exactly the merge with x first at every shared position (OT.md's tie rule), nothing else.
  assert.equal(viaX, model(S, normalize(x), normalize(y)), `not the x-first merge: ${ctx()}`);
});

property("transform tie: inserts at one position come out x first, whatever their text", 2000, (r) => {
  const S = randText(r, 10);
  const at = r.pick(boundaries(S));
  const pre = at ? [{ retain: at }] : [];
  const a = randText(r, 3) || "X";
  const b = randText(r, 3) || "Y";
  const x = [...pre, { insert: a }];
  const y = [...pre, { insert: b }];
  const want = S.slice(0, at) + a + b + S.slice(at);
  const [x1, y1] = transform(x, y);
  assert.equal(apply(apply(S, x), y1), want, JSON.stringify({ S, x, y }));
  assert.equal(apply(apply(S, y), x1), want, JSON.stringify({ S, x, y }));
  // The argument order decides, not the content.
  const [y2, x2] = transform(y, x);
  assert.equal(apply(apply(S, y), x2), S.slice(0, at) + b + a + S.slice(at));
  assert.equal(apply(apply(S, x), y2), S.slice(0, at) + b + a + S.slice(at));
});

test("transform: the cases OT.md spells out", () => {
  // y′ retains over x's inserted text.
  assert.deepEqual(transform([{ insert: "a" }], [{ insert: "b" }]), [[{ insert: "a" }], [{ retain: 1 }, { insert: "b" }]]);
  // Both delete the same range: neither result deletes it again.
  assert.deepEqual(transform([{ retain: 1 }, { delete: 2 }], [{ retain: 1 }, { delete: 2 }]), [[], []]);
  // One deletes what the other retains: the delete survives, the retain shrinks.
  assert.deepEqual(transform([{ delete: 3 }], [{ retain: 1 }, { delete: 1 }]), [[{ delete: 2 }], []]);
  assert.deepEqual(transform([{ retain: 4 }, { insert: "x" }], [{ delete: 2 }]), [[{ retain: 2 }, { insert: "x" }], [{ delete: 2 }]]);
  // An omitted final retain covers whatever the other side still has.
  assert.deepEqual(transform([], [{ retain: 3 }, { insert: "z" }]), [[], [{ retain: 3 }, { insert: "z" }]]);
});

property("compose(a, b) applied equals a then b; a buffered edit rebases as the server does", 4000, (r) => {
  const S = randText(r, 14);
  const a = randOp(r, S);
  const A = apply(S, a);
  const b = randOp(r, A);
  const c = compose(a, b);
  const ctx = () => JSON.stringify({ S, a, b, c });
  assertCanonical(c, "compose(a, b)");
  assert.equal(apply(S, c), apply(A, b), `compose: ${ctx()}`);
  // AwaitingWithBuffer(o = a, b) receiving a doc frame s (OT.md steps 1-3): the client's text,
  // A then b then s2, is what the server will hold: S then s then o′ then b′ (b′ is sent after
  // the ack, with a base that already includes s, so the server applies it as it is).
  const s = randOp(r, S);
  const [s1, a1] = transform(s, a);
  const [s2, b1] = transform(s1, b);
  const client = apply(apply(apply(S, s), a1), b1);
  assert.equal(client, apply(apply(A, b), s2), `buffer rebase: ${JSON.stringify({ S, s, a, b })}`);
  // (Rebasing compose(a, b) in one go converges too, but may order ties differently from the
  // step-by-step rebase above: a's delete can move b's insert next to s's. The server rebases o
  // and b one at a time, so the client must too, as OT.md's steps 1-3 do.)
});

/** Length in units of the longest common prefix of whole code points. */
function cpPrefix(a, b) {
  const x = [...a];
  const y = [...b];
  let n = 0;
  for (let i = 0; i < x.length && i < y.length && x[i] === y[i]; i++) n += x[i].length;
  return n;
}

/** Length in units of the longest common suffix of whole code points, at most `limit` units. */
function cpSuffix(a, b, limit) {
  const x = [...a].reverse();
  const y = [...b].reverse();
  let n = 0;
  for (let i = 0; i < x.length && i < y.length && x[i] === y[i] && n + x[i].length <= limit; i++) n += x[i].length;
  return n;
}

/** A text to diff against `S`: unrelated, an edit of it, or one code point swapped for a sibling. */
function randTarget(r, S) {
  const roll = r();
  if (roll < 0.3) return randText(r, 14);
  if (roll < 0.7) return apply(S, randOp(r, S));
  // Replace or add one emoji next to others that share a surrogate half.
  const at = r.pick(boundaries(S));
  const cut = r.chance(0.5) && at < S.length ? [...S.slice(at)][0].length : 0;
  return S.slice(0, at) + r.pick(["😀", "😁", "👍", "🈀", "\uD83D\uDE02"]) + S.slice(at + cut);
}

/** Checks that `op` turns `from` into `to` and that none of its cuts splits a pair of either. */
function assertCleanCuts(from, to, op) {
  let src = 0;
  let dst = 0;
  for (const c of op) {
    if (c.retain !== undefined) {
      src += c.retain;
      dst += c.retain;
    } else if (c.insert !== undefined) {
      assert.ok(c.insert.isWellFormed(), `insert ${JSON.stringify(c.insert)} holds half a pair`);
      dst += c.insert.length;
    } else src += c.delete;
    assert.ok(!splitsPair(from, src), `cuts a pair of the old text at ${src}: ${JSON.stringify({ from, to, op })}`);
    assert.ok(!splitsPair(to, dst), `cuts a pair of the new text at ${dst}: ${JSON.stringify({ from, to, op })}`);
  }
}

property("diff round-trips, is prefix/insert/delete/suffix, and never splits a surrogate pair", 4000, (r) => {
  const S = randText(r, 14);
  const T = randTarget(r, S);
  const d = diff(S, T);
  const ctx = () => JSON.stringify({ S, T, d });
  assertCanonical(d, "diff");
  assert.equal(apply(S, d), T, `round trip: ${ctx()}`);
  assertCleanCuts(S, T, d);
  assert.ok(d.filter((c) => c.insert !== undefined).length <= 1, ctx());
  assert.ok(d.filter((c) => c.delete !== undefined).length <= 1, ctx());
  // The common prefix and suffix are as long as whole code points allow.
  const prefix = d[0]?.retain ?? 0;
  assert.equal(prefix, S === T ? 0 : cpPrefix(S, T), `prefix: ${ctx()}`);
  const deleted = d.find((c) => c.delete !== undefined)?.delete ?? 0;
  const suffix = S.length - prefix - deleted;
  if (S !== T) assert.equal(suffix, cpSuffix(S, T, Math.min(S.length, T.length) - prefix), `suffix: ${ctx()}`);
});

test("diff: surrogate pairs that share a half", () => {
  assert.deepEqual(diff("a😀b", "a😁b"), [{ retain: 1 }, { insert: "😁" }, { delete: 2 }]);
  assert.deepEqual(diff("😀", "😀😀"), [{ retain: 2 }, { insert: "😀" }]);
  assert.deepEqual(diff("😀😀", "😀🈀"), [{ retain: 2 }, { insert: "🈀" }, { delete: 2 }]);
  assert.deepEqual(diff("🈀", "😀"), [{ insert: "😀" }, { delete: 2 }]);
  assert.deepEqual(diff("same", "same"), []);
});

property("diffFine round-trips, cuts only between code points, deletes no more than diff", 1500, (r) => {
  const S = randText(r, 20);
  const T = randTarget(r, S);
  const d = diffFine(S, T, r.chance(0.2) ? r.int(4) : undefined);
  const ctx = () => JSON.stringify({ S, T, d });
  assertCanonical(d, "diffFine");
  assert.equal(apply(S, d), T, `round trip: ${ctx()}`);
  assertCleanCuts(S, T, d);
  const deleted = (op) => op.reduce((n, c) => n + (c.delete ?? 0), 0);
  assert.ok(deleted(d) <= deleted(diff(S, T)), `deletes more than diff: ${ctx()}`);
});

test("diffFine keeps unchanged stretches between changes", () => {
  const d = diffFine("<a1><b2><c3><d4>", "<a1><x9><b2><c3><y8><d4>");
  assert.ok(d.every((c) => c.delete === undefined), JSON.stringify(d));
  assert.equal(apply("<a1><b2><c3><d4>", d), "<a1><x9><b2><c3><y8><d4>");
});

property("transformCaret keeps the caret next to the same text", 2000, (r) => {
  const S = randText(r, 12);
  const op = normalize(randOp(r, S));
  const out = apply(S, op);
  // Model: the caret at p lands after everything the op puts before position p (own inserts
  // at p too, someone else's not). In a deleted range it lands where the range was.
  const n = S.length;
  const ins = new Array(n + 1).fill("");
  const kept = new Array(n).fill(true);
  let at = 0;
  for (const c of op) {
    if (c.retain !== undefined) at += c.retain;
    else if (c.insert !== undefined) ins[at] += c.insert;
    else for (const end = at + c.delete; at < end; at++) kept[at] = false;
  }
  let before = 0; // units of `out` before position p's inserts
  for (let p = 0; p <= n; p++) {
    if (!splitsPair(S, p)) {
      const ctx = JSON.stringify({ S, op, p });
      assert.equal(transformCaret(p, op, false), before, `someone else's edit: ${ctx}`);
      assert.equal(transformCaret(p, op, true), before + ins[p].length, `own edit: ${ctx}`);
      assert.ok(!splitsPair(out, before), ctx);
    }
    before += ins[p].length + (p < n && kept[p] ? 1 : 0);
  }
});

// ---- rejections --------------------------------------------------------------------------------

const PAST_THE_END = [
  ["abc", [{ retain: 4 }]],
  ["abc", [{ delete: 4 }]],
  ["abc", [{ retain: 3 }, { delete: 1 }]],
  ["abc", [{ retain: 2 }, { retain: 2 }, { insert: "x" }]],
  ["", [{ retain: 1 }]],
  ["", [{ delete: 1 }]],
  ["a😀", [{ retain: 4 }]],
];
const SPLITTING = [
  ["😀", [{ retain: 1 }, { insert: "x" }]],
  ["😀", [{ delete: 1 }]],
  ["😀", [{ retain: 1 }, { delete: 1 }]],
  ["a😀", [{ retain: 2 }]],
  ["a😀b", [{ retain: 2 }, { delete: 2 }]],
  ["😀😀", [{ delete: 3 }]],
  ["x👍🏽", [{ retain: 4 }, { insert: "y" }]],
];
const MALFORMED = [
  [{ retain: 0 }],
  [{ delete: 0 }],
  [{ retain: -1 }],
  [{ retain: 1.5 }],
  [{ retain: "1" }],
  [{ insert: "" }],
  [{ insert: 5 }],
  [{ retain: 1, delete: 1 }],
  [{ move: 1 }],
  [{}],
  [null],
  { retain: 1 },
];

test("invalid operations throw OtError", () => {
  for (const [text, op] of [...PAST_THE_END, ...SPLITTING, ...MALFORMED.map((op) => ["abc", op])]) {
    assert.throws(() => apply(text, op), OtError, `apply(${JSON.stringify(text)}, ${JSON.stringify(op)})`);
  }
  // Malformed components are refused by every entry point, not only apply.
  for (const op of MALFORMED) {
    for (const f of [normalize, (o) => transform(o, []), (o) => transform([], o), (o) => compose(o, []), (o) => compose([], o)]) {
      assert.throws(() => f(op), OtError, `${f} on ${JSON.stringify(op)}`);
    }
  }
  // The boundary cases that are fine.
  assert.equal(apply("abc", [{ retain: 3 }]), "abc");
  assert.equal(apply("a😀", [{ retain: 3 }, { insert: "x" }]), "a😀x");
  assert.equal(apply("😀", [{ delete: 2 }]), "");
});

property("operations that reach past the end or split a pair are rejected", 3000, (r) => {
  let S = randText(r, 10);
  if (!/[\uD800-\uDBFF]/.test(S)) {
    const at = r.pick(boundaries(S));
    S = S.slice(0, at) + r.pick(["😀", "𝄞", "👍🏽"]) + S.slice(at);
  }
  const mids = [];
  for (let i = 1; i < S.length; i++) if (splitsPair(S, i)) mids.push(i);
  const m = r.pick(mids); // inside a pair
  const j = r.pick(boundaries(S).filter((b) => b < m)); // a good cut before it
  const valid = normalize(randOp(r, S));
  const pre = j ? [{ retain: j }] : [];
  const bad = r.pick([
    // cutting at m
    [{ retain: m }, { insert: "x" }],
    [{ retain: m }, { delete: 1 }],
    [{ retain: m }],
    [{ delete: m }],
    [{ delete: m }, { insert: "x" }],
    [...pre, { delete: m - j }],
    [...pre, { insert: "x" }, { delete: m - j }, { retain: S.length - m }],
    [...pre, { delete: m - j }, { insert: "\uDE00" }],
    // past the end
    [...valid, { retain: S.length - baseLength(valid) + 1 }],
    [...valid, { delete: S.length - baseLength(valid) + 1 }],
    [{ retain: S.length }, { delete: 1 + r.int(3) }],
    [{ delete: S.length + 1 }],
  ]);
  assert.throws(() => apply(S, bad), OtError, JSON.stringify({ S, bad }));
});

// ---- doc-client.js: the state machine ------------------------------------------------------------

/** A transport whose requests the test settles by hand. */
function manualTransport() {
  const sent = [];
  const fetches = [];
  return {
    sent,
    fetches,
    sendEdit(doc, base, ops) {
      return new Promise((resolve, reject) => sent.push({ doc, base, ops: structuredClone(ops), resolve, reject }));
    },
    fetchDoc(doc) {
      return new Promise((resolve, reject) => fetches.push({ doc, resolve, reject }));
    },
  };
}

/** Timers the test fires by hand. */
function manualTimers() {
  const pending = new Map();
  let id = 0;
  return {
    setTimeout(f, ms) {
      pending.set(++id, { f, ms });
      return id;
    },
    clearTimeout(t) {
      pending.delete(t);
    },
    runAll() {
      for (const [t, { f }] of [...pending]) {
        pending.delete(t);
        f();
      }
    },
  };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

test("DocClient walks Synchronized → AwaitingConfirm → AwaitingWithBuffer as OT.md says", async () => {
  const t = manualTransport();
  const dc = new DocClient({ name: "d", version: 3, text: "hello", transport: t, timers: manualTimers() });
  assert.equal(dc.state, "synchronized");

  dc.localText("hello!"); // Synchronized: send e, base = known version
  assert.equal(dc.state, "awaiting");
  assert.equal(t.sent.length, 1);
  assert.deepEqual([t.sent[0].base, t.sent[0].ops], [3, [{ retain: 5 }, { insert: "!" }]]);

  dc.localEdit([{ insert: ">" }]); // AwaitingConfirm: buffer, nothing sent
  dc.localEdit([{ retain: 1 }, { insert: " " }]); // AwaitingWithBuffer: compose into the buffer
  assert.equal(dc.state, "buffering");
  assert.equal(t.sent.length, 1);
  assert.deepEqual(dc.buffer, [{ insert: "> " }]);
  assert.equal(dc.text, "> hello!");

  // A doc frame for known + 1: it wins ties against both the in-flight edit and the buffer.
  dc.remote({ version: 4, ops: [{ insert: "<" }, { retain: 5 }, { insert: "?" }] });
  assert.equal(dc.version, 4);
  assert.equal(dc.text, "<> hello?!");
  assert.deepEqual(dc.inflight, [{ retain: 7 }, { insert: "!" }]);
  assert.deepEqual(dc.buffer, [{ retain: 1 }, { insert: "> " }]);

  // The ack: send the buffer with base = the acked version.
  t.sent[0].resolve({ version: 5 });
  await settle();
  assert.equal(dc.version, 5);
  assert.equal(dc.state, "awaiting");
  assert.equal(t.sent.length, 2);
  assert.deepEqual([t.sent[1].base, t.sent[1].ops], [5, [{ retain: 1 }, { insert: "> " }]]);
  assert.equal(dc.serverText, "<hello?!");

  t.sent[1].resolve({ version: 6 });
  await settle();
  assert.equal(dc.state, "synchronized");
  assert.equal(dc.serverText, dc.text);
  assert.equal(dc.version, 6);
});

test("DocClient refuses invalid local edits and never applies an invalid doc frame", async () => {
  const t = manualTransport();
  const timers = manualTimers();
  const changes = [];
  const dc = new DocClient({ name: "d", version: 1, text: "a😀b", transport: t, timers, onChange: (c) => changes.push(c) });
  for (const op of [[{ retain: 2 }, { insert: "x" }], [{ retain: 5 }, { insert: "x" }], [{ delete: 9 }], [{ retain: 0 }], [{ bogus: 1 }]]) {
    assert.throws(() => dc.localEdit(op), OtError, JSON.stringify(op));
    assert.equal(dc.text, "a😀b");
    assert.equal(dc.state, "synchronized");
    assert.equal(t.sent.length, 0, "an invalid edit was sent");
  }
  // Awaiting an ack, a frame that does not fit: not applied; the client reloads instead.
  dc.localEdit([{ insert: "!" }]);
  for (const ops of [[{ retain: 2 }, { insert: "x" }], [{ retain: 9 }, { insert: "x" }], [{ delete: 2 }], [{ retain: 0 }]]) {
    const v = dc.version;
    changes.length = 0;
    dc.remote({ version: v + 1, ops });
    assert.equal(dc.text, "!a😀b", JSON.stringify(ops));
    assert.equal(dc.version, v);
    assert.equal(changes.length, 0, "an invalid frame changed the text");
    assert.equal(dc.loading, true, "an invalid frame must trigger a reload");
    timers.runAll();
    assert.equal(t.fetches.length, 1);
    t.fetches.pop().resolve({ version: v + 1, text: "a😀b" });
    await settle();
    assert.equal(dc.loading, false);
    assert.deepEqual([dc.text, dc.version, dc.state], ["a😀b", v + 1, "synchronized"]);
    dc.localEdit([{ insert: "!" }]);
  }
});

// ---- end to end: three DocClients against an OT.md server -----------------------------------------

// Markers for insert-only runs: single code points, unique within a run, BMP and astral (some
// share the high surrogate D83D with the base text's emoji). The base text never contains them.
const MARKER_RANGES = [0x4e00, 0x1f680, 0x20000];
const markerAt = (k) => String.fromCodePoint(MARKER_RANGES[k % 3] + Math.floor(k / 3));
const BASE_ALPHABET = ["a", "b", " ", "é", "😀", "👍🏽", "𝄞"];

/**
 * One run: `clients` DocClients and a server implementing OT.md's server side (history ring;
 * rebase an incoming op on the history since its base, history first on ties). Every channel
 * (client → server, server → client, REST replies) is FIFO with its own random delays; the order
 * in which due deliveries happen is random. Returns what happened; throws on any divergence.
 */
async function simulate(seed, { clients = 3, edits = 40, insertOnly = false, ring = 1000, serverEdits = 0 }) {
  const r = mulberry32(seed);
  const initial = insertOnly ? randText(r, 8, BASE_ALPHABET) : randText(r, 12);
  const server = { text: initial, version: 0, history: [], texts: [initial] };
  const stats = { versions: 0, framesInAwaiting: 0, framesInBuffering: 0, acksWithBuffer: 0, noopAcks: 0, resyncs: 0, reloads: 0, events: 0 };
  let now = 0;

  const timers = new Map();
  let timerId = 0;
  const fakeTimers = {
    setTimeout: (f, ms) => {
      timers.set(++timerId, { at: now + ms, f });
      return timerId;
    },
    clearTimeout: (id) => timers.delete(id),
  };

  // Each client's link has its own latency: some fast, some slow and jittery.
  const cls = [];
  for (let i = 0; i < clients; i++) {
    const c = { id: `c${i}`, up: [], down: [], rest: [], pending: new Map(), nextRef: 1, lastUp: 0, lastDown: 0, maxDelay: r.pick([0, 1, 3, 8, 25]), discarded: 0 };
    const delay = () => now + r.int(c.maxDelay + 1);
    c.sendUp = (m) => c.up.push({ at: (c.lastUp = Math.max(c.lastUp, delay())), m });
    c.sendDown = (m) => c.down.push({ at: (c.lastDown = Math.max(c.lastDown, delay())), m });
    const transport = {
      sendEdit(doc, base, ops) {
        assert.equal(c.pending.size, 0, `${c.id} sent a second edit before the first was acked`);
        assert.equal(base, c.dc.version, `${c.id} sent base ${base} while it knows ${c.dc.version}`);
        assertCanonical(ops, `${c.id}'s edit`);
        assert.ok(!isNoop(ops), `${c.id} sent a no-op`);
        const ref = c.nextRef++;
        c.sendUp({ ref, base, ops: structuredClone(ops) });
        return new Promise((resolve, reject) => c.pending.set(ref, { resolve, reject }));
      },
      fetchDoc() {
        return new Promise((resolve) => c.rest.push({ at: delay(), resolve }));
      },
    };
    c.dc = new DocClient({
      name: "main",
      version: 0,
      text: initial,
      transport,
      timers: fakeTimers,
      onNotice: (n) => {
        if (n.discarded) c.discarded++;
      },
    });
    cls.push(c);
  }

  const commit = (op, text, from) => {
    server.text = text;
    server.version++;
    server.texts.push(text);
    server.history.push([server.version, op]);
    if (server.history.length > ring) server.history.shift();
    for (const c of cls) if (c !== from) c.sendDown({ type: "doc", version: server.version, ops: structuredClone(op) });
    stats.versions++;
  };

  /** OT.md "An incoming edit {base, ops}". */
  const receive = (from, base, ops) => {
    if (base > server.version) return { error: "bad_request", message: `base ${base} is ahead` };
    if (base < server.version - server.history.length) return { error: "resync_required" };
    let op;
    try {
      op = normalize(ops);
      if (baseLength(op) > server.texts[base].length) throw new OtError("reaches past the end of its base");
      for (const [v, h] of server.history) if (v > base) op = transform(h, op)[1];
      const text = apply(server.text, op);
      if (isNoop(op)) return { version: server.version };
      commit(op, text, from);
      return { version: server.version };
    } catch (err) {
      return { error: "bad_request", message: err.message };
    }
  };

  let made = 0;
  let nextMarker = 0;
  const markers = [];
  let nextEditAt = 0;

  const localEdit = (c) => {
    const dc = c.dc;
    if (!insertOnly) {
      const op = randOp(r, dc.text);
      if (r.chance(0.5)) dc.localText(apply(dc.text, op)); // as the textarea does
      else dc.localEdit(op);
      return;
    }
    const count = r.chance(0.7) ? 1 : 2 + r.int(2);
    const spots = Array.from({ length: count }, () => r.pick(boundaries(dc.text))).sort((a, b) => a - b);
    let op = [];
    let at = 0;
    let newText = "";
    for (const spot of spots) {
      const m = markerAt(nextMarker++);
      markers.push(m);
      if (spot > at) op.push({ retain: spot - at });
      op.push({ insert: m });
      newText += dc.text.slice(at, spot) + m;
      at = spot;
    }
    newText += dc.text.slice(at);
    if (count === 1 && r.chance(0.5)) dc.localText(newText);
    else {
      dc.localEdit(op);
      assert.equal(dc.text, newText);
    }
  };

  const checkClient = (c) => {
    const dc = c.dc;
    if (dc.loading) return;
    assert.equal(dc.serverText, server.texts[dc.version], `${c.id}'s copy of version ${dc.version} is wrong`);
    const mine = apply(apply(dc.serverText, dc.inflight ?? []), dc.buffer ?? []);
    assert.equal(dc.text, mine, `${c.id}'s text is not its server text plus its pending edits`);
  };

  for (let step = 0; ; step++) {
    assert.ok(step < 200_000, "no quiescence");
    const due = [];
    const consider = (at, run) => due.push({ at, run });
    for (const c of cls) {
      if (c.up.length) {
        consider(c.up[0].at, () => {
          const { m } = c.up.shift();
          const res = receive(c, m.base, m.ops);
          if (res.error === "bad_request") throw new Error(`the server refused ${c.id}'s edit: ${res.message} ${JSON.stringify(m)}`);
          if (res.error === "resync_required") stats.resyncs++;
          c.sendDown(res.error ? { type: "error", ref: m.ref, code: res.error } : { type: "ack", ref: m.ref, version: res.version });
        });
      }
      if (c.down.length) {
        consider(c.down[0].at, () => {
          const { m } = c.down.shift();
          if (m.type === "doc") {
            if (c.dc.state === "awaiting") stats.framesInAwaiting++;
            if (c.dc.state === "buffering") stats.framesInBuffering++;
            c.dc.remote(m);
          } else {
            const p = c.pending.get(m.ref);
            c.pending.delete(m.ref);
            assert.ok(p, `${c.id} got a reply to an unknown request ${m.ref}`);
            if (m.type === "ack") {
              if (c.dc.state === "buffering") stats.acksWithBuffer++;
              if (m.version === c.dc.version) stats.noopAcks++;
              p.resolve({ version: m.version });
            } else p.reject({ code: m.code, message: m.code });
          }
        });
      }
      for (const q of c.rest) {
        consider(q.at, () => {
          c.rest.splice(c.rest.indexOf(q), 1);
          q.resolve({ name: "main", version: server.version, text: server.text });
        });
      }
    }
    for (const [id, t] of timers) {
      consider(t.at, () => {
        timers.delete(id);
        t.f();
      });
    }
    if (made < edits) {
      consider(nextEditAt, () => {
        made++;
        nextEditAt = now + r.int(4);
        if (serverEdits && r.chance(serverEdits)) {
          // A change from elsewhere (a Yjs client): a new version every JSON client gets.
          const op = normalize(randOp(r, server.text));
          if (!isNoop(op)) commit(op, apply(server.text, op), null);
        } else localEdit(r.pick(cls));
      });
    }
    if (due.length === 0) break;
    const first = Math.min(...due.map((d) => d.at));
    const ready = due.filter((d) => d.at === first);
    now = Math.max(now, first);
    r.pick(ready).run();
    stats.events++;
    await settle(); // let acks settle their promises, as client.js does, before the next frame
    for (const c of cls) checkClient(c);
  }

  for (const c of cls) {
    const dc = c.dc;
    assert.equal(dc.text, server.text, `${c.id}'s text differs from the server's`);
    assert.equal(dc.version, server.version, `${c.id}'s version`);
    assert.equal(dc.state, "synchronized", `${c.id} still has pending edits`);
    assert.equal(dc.loading, false);
    stats.reloads += dc.stats.reloads;
  }
  const discarded = cls.reduce((n, c) => n + c.discarded, 0);
  if (insertOnly) {
    const missing = [];
    for (const m of markers) {
      const n = server.text.split(m).length - 1;
      if (discarded === 0) assert.equal(n, 1, `marker ${m} (U+${m.codePointAt(0).toString(16)}) appears ${n} times`);
      else assert.ok(n <= 1, `marker ${m} appears ${n} times`);
      if (n === 0) missing.push(m);
    }
    if (discarded === 0) {
      // Nothing else either: the base text's code points plus the markers, and nothing more.
      const sorted = (cps) => cps.sort().join("");
      assert.equal(sorted([...server.text]), sorted([...initial, ...markers]), "the text holds something besides the base and the markers");
    }
    stats.markers = markers.length;
  }
  stats.discarded = discarded;
  return stats;
}

function e2e(name, runs, options, check) {
  test(name, async (t) => {
    const total = {};
    for (const seed of seeds(name, runs)) {
      let stats;
      try {
        stats = await simulate(seed, options);
      } catch (err) {
        throw withSeed(name, seed, err);
      }
      for (const [k, v] of Object.entries(stats)) total[k] = (total[k] || 0) + v;
    }
    t.diagnostic(`${seeds(name, runs).length} runs: ${JSON.stringify(total)}`);
    // Guard against a simulation that stopped exercising anything interesting.
    if (ONLY_SEED === null) check(total);
  });
}

e2e("three clients with random edits and delays converge on the server's text", 300, { edits: 40, serverEdits: 0.1 }, (t) => {
  assert.ok(t.framesInAwaiting > 0 && t.framesInBuffering > 0 && t.acksWithBuffer > 0, JSON.stringify(t));
  assert.ok(t.noopAcks > 0, `no edit ever became a no-op on the server: ${JSON.stringify(t)}`);
  assert.equal(t.resyncs + t.reloads + t.discarded, 0, JSON.stringify(t));
});

e2e("three clients inserting unique markers: each marker ends up exactly once", 300, { edits: 40, insertOnly: true }, (t) => {
  assert.ok(t.framesInAwaiting > 0 && t.framesInBuffering > 0 && t.acksWithBuffer > 0, JSON.stringify(t));
  assert.equal(t.discarded, 0, JSON.stringify(t));
});

e2e("a history ring of 3: resync_required, reload, and still everyone converges", 100, { edits: 40, ring: 3 }, (t) => {
  assert.ok(t.resyncs > 0 && t.reloads > 0, JSON.stringify(t));
});
