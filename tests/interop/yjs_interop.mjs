// Interop check: the real `yjs` + `y-websocket` clients against a running Conclave node.
//
//   node tests/interop/yjs_interop.mjs http://127.0.0.1:PORT
//
// Three Yjs clients and one JSON client edit one document concurrently; all converge, REST shows
// the same text, a late Yjs joiner gets the whole document, and awareness is relayed. Exits
// non-zero with a message on the first failed check. Run by tests/yjs_interop.rs.

import assert from 'node:assert/strict';
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';

const base = process.argv[2];
if (!base) {
  console.error('usage: yjs_interop.mjs http://127.0.0.1:PORT');
  process.exit(2);
}
const wsBase = base.replace(/^http/, 'ws');
const session = `interop-${Date.now()}`;
const docName = 'main';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, check, timeoutMs = 10000) {
  const start = Date.now();
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

function yjsClient(name) {
  const doc = new Y.Doc();
  const provider = new WebsocketProvider(`${wsBase}/v1/yjs`, `${session}/${docName}`, doc, {
    WebSocketPolyfill: WebSocket,
    disableBc: true,
  });
  provider.awareness.setLocalStateField('user', { name });
  return { name, doc, text: doc.getText('content'), provider };
}

/** A JSON client speaking the native protocol with the OT client state machine of OT.md. */
async function jsonClient() {
  const ws = new WebSocket(`${wsBase}/v1/ws`);
  await new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('error', reject);
  });
  const frames = [];
  const waiters = [];
  ws.on('message', (data) => {
    const frame = JSON.parse(data.toString());
    frames.push(frame);
    for (const w of waiters.splice(0)) w();
  });
  const next = async (pred) => {
    for (;;) {
      const i = frames.findIndex(pred);
      if (i >= 0) return frames.splice(i, 1)[0];
      await new Promise((resolve, reject) => {
        waiters.push(resolve);
        setTimeout(() => reject(new Error('json client: no matching frame within 10s')), 10000);
      });
    }
  };
  ws.send(JSON.stringify({ type: 'hello', name: 'json' }));
  await next((f) => f.type === 'welcome');
  ws.send(JSON.stringify({ type: 'join', ref: 'j', session }));
  const joined = await next((f) => f.type === 'joined');
  const doc = (joined.docs || []).find((d) => d.name === docName) || { version: 0, text: '' };
  return { ws, next, frames, version: doc.version, text: doc.text };
}

async function main() {
  // Create the session first so every client joins the same one.
  const created = await fetch(`${base}/v1/sessions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ id: session }),
  });
  assert.equal(created.status, 201, 'session created');

  const clients = ['a', 'b', 'c'].map(yjsClient);
  await waitFor('yjs clients synced', () => clients.every((c) => c.provider.synced));

  // Awareness: each client sees the other two.
  await waitFor('awareness relayed', () =>
    clients.every((c) => c.provider.awareness.getStates().size >= 3),
  );

  const json = await jsonClient();

  // Concurrent edits: every Yjs client inserts in bursts, the JSON client edits in between.
  // Every insert is one unique code point, so a later insert can never split a marker and each
  // can be counted: Yjs clients insert emoji (surrogate pairs), the JSON client circled digits.
  const yjsMarker = (i, round) => String.fromCodePoint(0x1f400 + i * 20 + round);
  const jsonMarker = (round) => String.fromCharCode(0x2460 + round);
  for (let round = 0; round < 10; round++) {
    for (const [i, c] of clients.entries()) {
      const len = c.text.length;
      const at = Math.floor(Math.random() * (len + 1));
      // Insert between code points: editors never split a surrogate pair.
      const str = c.text.toString();
      const safe = at > 0 && at < str.length && /[\uDC00-\uDFFF]/.test(str[at]) ? at - 1 : at;
      c.text.insert(safe, yjsMarker(i, round));
      void len;
    }
    // The JSON client sends one edit against the version it knows, then applies what it hears.
    const ref = `e${round}`;
    json.ws.send(
      JSON.stringify({
        type: 'edit',
        ref,
        session,
        doc: docName,
        base: json.version,
        ops: [{ insert: jsonMarker(round) }],
      }),
    );
    const ack = await json.next((f) => (f.type === 'ack' || f.type === 'error') && f.ref === ref);
    assert.equal(ack.type, 'ack', `edit acked: ${JSON.stringify(ack)}`);
    json.version = ack.version;
    await sleep(20);
  }

  // Everyone converges.
  const textOf = (c) => c.text.toString();
  await waitFor('yjs clients converge', () =>
    clients.every((c) => textOf(c) === textOf(clients[0])),
  );
  const final = textOf(clients[0]);
  const count = (text, marker) => text.split(marker).length - 1;
  for (let round = 0; round < 10; round++) {
    assert.equal(count(final, jsonMarker(round)), 1, `JSON insert ${round} is there exactly once`);
    for (let i = 0; i < clients.length; i++) {
      assert.equal(count(final, yjsMarker(i, round)), 1, `Yjs insert ${i}/${round} exactly once`);
    }
  }
  await waitFor('REST agrees', async () => {
    const res = await fetch(`${base}/v1/sessions/${session}/docs/${docName}`);
    const body = await res.json();
    return body.text === textOf(clients[0]) ? body : null;
  });

  // A Yjs deletion reaches REST (and JSON clients) too: drop the first code point.
  const first = String.fromCodePoint(final.codePointAt(0));
  clients[0].text.delete(0, first.length);
  const afterDelete = final.slice(first.length);
  await waitFor('deletion converges', async () => {
    const res = await fetch(`${base}/v1/sessions/${session}/docs/${docName}`);
    const body = await res.json();
    return body.text === afterDelete && clients.every((c) => textOf(c) === afterDelete);
  });
  const rest = await (await fetch(`${base}/v1/sessions/${session}/docs/${docName}`)).json();
  assert.ok(rest.version >= 10, `version counts every change (got ${rest.version})`);

  // A late joiner gets the whole document.
  const late = yjsClient('late');
  await waitFor('late joiner synced', () => late.provider.synced && textOf(late) === afterDelete);

  // Awareness removal: when a client leaves, the others drop its state.
  const leaving = clients[2];
  const leavingId = leaving.doc.clientID;
  leaving.provider.destroy();
  await waitFor('awareness state removed', () =>
    !clients[0].provider.awareness.getStates().has(leavingId),
  );

  for (const c of [...clients.slice(0, 2), late]) c.provider.destroy();
  json.ws.close();
  console.log(`ok: converged on ${afterDelete.length} UTF-16 units at version ${rest.version}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`interop failed: ${err.stack || err}`);
    process.exit(1);
  },
);
