//! Fuzzes the y-websocket side: one binary frame, decoded as `YjsConn` decodes it and handled as
//! the session actor handles each message, on the server's own `Document`.
//!
//! - Sync step 1 is answered with a diff, sync step 2 and updates are applied (and committed;
//!   consecutive ones as one group and one stored update, `Document::apply_yjs_updates`), awareness updates are applied
//!   and relayed, an awareness query is answered; the first malformed message ends the frame, as
//!   it closes the socket.
//! - The client's awareness states are removed as on disconnect.
//! - What was accepted survives a restart: reloading the document from the accepted updates, and
//!   from a compaction snapshot, gives the same text.
//!
//! Arbitrary bytes must never panic, except where the server itself catches the panic: yrs 0.28
//! panics on some hostile data, and `Document` decodes and encodes under `catch_unwind` (see
//! `session::document`). libFuzzer's panic hook aborts at the panic, caught or not, so this target
//! swaps it for one that only prints; libfuzzer-sys still aborts on a panic that escapes.

#![no_main]

use std::sync::Once;

use conclave::config::Limits;
use conclave::protocol::{DocName, yjs};
use conclave::session::document::Document;
use conclave::store::StoredDoc;
use libfuzzer_sys::fuzz_target;
use yrs::sync::{Message, SyncMessage};

/// Replaces libFuzzer's abort-on-any-panic hook, once.
fn report_panics_without_aborting() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    });
}

fn reload(name: &DocName, stored: StoredDoc, want: &str, how: &str) {
    let doc = Document::load(stored)
        .unwrap_or_else(|e| panic!("{how}: what the server accepted does not load: {e}"));
    assert_eq!(
        doc.summary().text,
        want,
        "{how}: the reloaded text differs for {name}"
    );
}

fuzz_target!(|data: &[u8]| {
    report_panics_without_aborting();
    let name = DocName::parse("main").expect("a valid literal name");
    let max = Limits::default().max_doc_units;
    let mut doc = Document::new(name.clone());
    let mut accepted = Vec::new();
    let mut clients = Vec::new();
    // Consecutive updates apply as one group, as a session applies the updates that queued up.
    let mut group: Vec<Vec<u8>> = Vec::new();
    let mut apply = |doc: &mut Document, group: &mut Vec<Vec<u8>>| {
        if let Some(applied) = doc.apply_yjs_updates(std::mem::take(group), max).applied {
            doc.committed(applied.version, applied.op.as_ref());
            yjs::update(applied.update.data.clone());
            accepted.push(applied.update);
        }
    };
    for message in yjs::decode(data) {
        if !matches!(
            message,
            Ok(Message::Sync(
                SyncMessage::SyncStep2(_) | SyncMessage::Update(_)
            ))
        ) {
            apply(&mut doc, &mut group);
        }
        match message {
            Ok(Message::Sync(SyncMessage::SyncStep1(sv))) => {
                yjs::sync_step2(doc.diff(&sv));
            }
            Ok(Message::Sync(SyncMessage::SyncStep2(update) | SyncMessage::Update(update))) => {
                group.push(update);
            }
            Ok(Message::Awareness(update)) => {
                clients.extend(update.clients.keys().copied());
                if doc.apply_awareness(update.clone()).is_ok() {
                    yjs::awareness(update);
                }
            }
            Ok(Message::AwarenessQuery) => {
                if let Ok(states) = doc.awareness().update() {
                    yjs::awareness(states);
                }
            }
            Ok(Message::Auth(_) | Message::Custom(..)) => {}
            Err(_) => break,
        }
    }
    apply(&mut doc, &mut group);
    for client in &clients {
        doc.remove_awareness(*client);
    }
    if let Ok(gone) = doc.awareness().update_with_clients(clients) {
        yjs::awareness(gone);
    }

    let text = doc.summary().text;
    let log = StoredDoc {
        name: name.clone(),
        snapshot: None,
        updates: accepted,
    };
    reload(&name, log, &text, "from the update log");
    if let Some(snapshot) = doc.begin_compaction() {
        let compacted = StoredDoc {
            name: name.clone(),
            snapshot: Some(snapshot),
            updates: Vec::new(),
        };
        reload(&name, compacted, &text, "from a snapshot");
    }
});
