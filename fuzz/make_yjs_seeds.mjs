// Writes the seed corpus of the `yjs` fuzz target: real y-websocket frames, encoded by the real
// yjs and y-protocols that the interop test pins (tests/interop). Run it after
// `npm ci --prefix tests/interop`:   node fuzz/make_yjs_seeds.mjs
//
// Each file is one binary frame as a WebsocketProvider sends it; some pack several messages,
// as a frame may. Inputs that once crashed the target sit beside these, named for the bug.

import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../tests/interop/package.json', import.meta.url));
const Y = require('yjs');
const sync = require('y-protocols/sync');
const awarenessProtocol = require('y-protocols/awareness');
const encoding = require('lib0/encoding');

// y-websocket's message types.
const MESSAGE_SYNC = 0;
const MESSAGE_AWARENESS = 1;
const MESSAGE_AUTH = 2;
const MESSAGE_QUERY_AWARENESS = 3;

const out = new URL('corpus/yjs/', import.meta.url);
mkdirSync(out, { recursive: true });

/** Builds one frame from message writers. */
function frame(...writers) {
  const encoder = encoding.createEncoder();
  for (const write of writers) write(encoder);
  return encoding.toUint8Array(encoder);
}

const step1 = (doc) => (e) => {
  encoding.writeVarUint(e, MESSAGE_SYNC);
  sync.writeSyncStep1(e, doc);
};
const step2 = (doc, sv) => (e) => {
  encoding.writeVarUint(e, MESSAGE_SYNC);
  sync.writeSyncStep2(e, doc, sv);
};
const update = (bytes) => (e) => {
  encoding.writeVarUint(e, MESSAGE_SYNC);
  sync.writeUpdate(e, bytes);
};
const awareness = (aw, clients) => (e) => {
  encoding.writeVarUint(e, MESSAGE_AWARENESS);
  encoding.writeVarUint8Array(e, awarenessProtocol.encodeAwarenessUpdate(aw, clients));
};

/** The updates a change makes, one per transaction. */
function updatesOf(doc, change) {
  const seen = [];
  const listen = (u) => seen.push(u);
  doc.on('update', listen);
  change();
  doc.off('update', listen);
  return seen;
}

const seeds = {};

const ada = new Y.Doc();
ada.clientID = 1;
const text = ada.getText('content');
seeds.sync_step1_empty = frame(step1(ada));
const [insertHello] = updatesOf(ada, () => text.insert(0, 'hello 😀 world'));
seeds.sync_step2_full = frame(step2(ada, new Uint8Array([0])));
seeds.sync_step1_with_state = frame(step1(ada));
const [insertMiddle] = updatesOf(ada, () => text.insert(6, 'wide '));
seeds.update_insert = frame(update(insertMiddle));
// Alone, on a fresh document, this one's dependencies are missing: yrs keeps it pending.
const [deleteRange] = updatesOf(ada, () => text.delete(0, 6));
seeds.update_delete = frame(update(deleteRange));
const [formatted] = updatesOf(ada, () => {
  text.insertEmbed(2, { image: 'a.png' });
  text.format(0, 3, { bold: true });
});
seeds.update_embed_and_format = frame(update(formatted));
const [otherType] = updatesOf(ada, () => ada.getMap('meta').set('title', 'notes'));
seeds.update_other_type = frame(update(otherType));

// A second client, concurrent with the first: its update depends on text it has not seen.
const bob = new Y.Doc();
bob.clientID = 2;
Y.applyUpdate(bob, insertHello);
const [concurrent] = updatesOf(bob, () => bob.getText('content').insert(5, ',🎉'));
seeds.update_concurrent = frame(update(concurrent));
seeds.packed_step1_and_updates = frame(step1(bob), update(insertHello), update(concurrent));

const aw = new awarenessProtocol.Awareness(ada);
aw.setLocalState({ user: { name: 'Ada', color: '#30bced' }, cursor: { anchor: 3, head: 5 } });
seeds.awareness_state = frame(awareness(aw, [ada.clientID]));
aw.setLocalState(null);
seeds.awareness_gone = frame(awareness(aw, [ada.clientID]));
seeds.awareness_query = frame((e) => encoding.writeVarUint(e, MESSAGE_QUERY_AWARENESS));
seeds.auth_permission_denied = frame((e) => {
  encoding.writeVarUint(e, MESSAGE_AUTH);
  encoding.writeVarUint(e, 0);
  encoding.writeVarString(e, 'permission denied');
});
// Its timer would keep node running.
aw.destroy();

for (const [name, bytes] of Object.entries(seeds)) {
  writeFileSync(new URL(name, out), bytes);
}
console.log(`wrote ${Object.keys(seeds).length} seeds to ${out.pathname}`);
