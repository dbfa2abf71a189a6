//! Document micro-benches: a JSON edit rebased and applied on a 100 KiB document, a Yjs
//! update applied and re-encoded for the broadcast, and Yjs updates applied and committed to a
//! 4 MiB document, one at a time and in groups.
//!
//!     cargo bench --bench documents

use std::time::{Duration, Instant};

use conclave::protocol::DocName;
use conclave::session::document::Document;
use conclave::session::ot::Component;
use conclave::store::{DocSnapshot, StoredDoc};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, OffsetKind, Options, StateVector, Text, Transact, Update};

const DOC_BYTES: usize = 100 * 1024;

fn text_of(chars: usize) -> String {
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit 😀. "
        .chars()
        .cycle()
        .take(chars)
        .collect()
}

fn big_text() -> String {
    text_of(DOC_BYTES)
}

/// A document holding ~100 KiB, with `history` recent versions to rebase over.
fn document_with_history(history: u64) -> Document {
    let name = DocName::parse("bench").expect("valid name");
    let mut doc = Document::new(name);
    doc.edit(0, vec![Component::Insert(big_text())], u64::MAX)
        .expect("initial insert");
    for i in 0..history {
        doc.edit(
            doc.version(),
            vec![Component::Retain(10 + i), Component::Insert("x".into())],
            u64::MAX,
        )
        .expect("history edit");
    }
    doc
}

fn json_edits(c: &mut Criterion) {
    let mut group = c.benchmark_group("json_edit_100KiB");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("current_base", |b| {
        b.iter_batched_ref(
            || document_with_history(0),
            |doc| {
                let base = doc.version();
                doc.edit(
                    base,
                    vec![Component::Retain(50_000), Component::Insert("hello".into())],
                    u64::MAX,
                )
                .expect("edit applies")
            },
            BatchSize::LargeInput,
        );
    });
    group.bench_function("stale_base_rebased_over_100", |b| {
        b.iter_batched_ref(
            || document_with_history(100),
            |doc| {
                let base = doc.version() - 100;
                doc.edit(
                    base,
                    vec![Component::Retain(50_000), Component::Delete(20)],
                    u64::MAX,
                )
                .expect("edit applies")
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

fn yjs_updates(c: &mut Criterion) {
    // A stored 100 KiB document, and a Yjs client that synced it and typed one word.
    let snapshot = document_with_history(0).diff(&StateVector::default());
    let stored = StoredDoc {
        name: DocName::parse("bench").expect("valid name"),
        snapshot: Some(DocSnapshot {
            upto_seq: 1,
            version: 1,
            data: snapshot.clone(),
        }),
        updates: Vec::new(),
    };
    let client = Doc::with_options(Options {
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    client
        .transact_mut()
        .apply_update(Update::decode_v1(&snapshot).expect("snapshot decodes"))
        .expect("snapshot applies");
    let client_text = client.get_or_insert_text("content");
    let update = {
        let mut txn = client.transact_mut();
        client_text.insert(&mut txn, 40_000, "typed");
        txn.encode_update_v1()
    };

    let mut group = c.benchmark_group("yjs_update_100KiB");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    // What the session actor does per Yjs update: decode, apply, turn the text delta into an
    // OT version, and frame the update for the other Yjs clients.
    group.bench_function("apply_and_encode_broadcast", |b| {
        b.iter_batched_ref(
            || Document::load(stored.clone()).expect("loads"),
            |doc| {
                let applied = doc
                    .apply_yjs_update(update.clone(), u64::MAX)
                    .expect("applies");
                conclave::protocol::yjs::update(applied.update.data).len()
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
    assert!(client_text.get_string(&client.transact()).contains("typed"));
}

/// What a Yjs update costs a large document once committed: applied, then the committed text
/// (what `joined` and REST show) moved by its operation. Ten writers each type on at the end of
/// a run of their own, spread through 4 MiB of text, as in `conclave load yjs`. With the
/// committed text in a flat buffer, commits copied the whole document every few hundred
/// updates, a cost that grew with the document.
fn committed_yjs_updates(c: &mut Criterion) {
    const CHARS: u32 = 4 * 1024 * 1024;
    const WRITERS: u32 = 10;
    const MARKER: &str = "<17:1733500000000000>";
    let mut seed = Document::new(DocName::parse("bench").expect("valid name"));
    let first = seed
        .edit(
            0,
            vec![Component::Insert(text_of(CHARS as usize))],
            u64::MAX,
        )
        .expect("initial insert")
        .expect("a change");
    seed.committed(first.version, Some(&first.op));
    let snapshot = seed.diff(&StateVector::default());
    let synced = |client_id: u64| {
        let doc = Doc::with_options(Options {
            client_id: yrs::block::ClientID::new(client_id),
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        doc.transact_mut()
            .apply_update(Update::decode_v1(&snapshot).expect("snapshot decodes"))
            .expect("snapshot applies");
        let text = doc.get_or_insert_text("content");
        (doc, text)
    };
    // A writer sees the snapshot and its own run only, which is all it needs to append to it.
    let writers: Vec<_> = (0..WRITERS).map(|w| synced(1000 + u64::from(w))).collect();
    let (observer, observer_text) = synced(999);
    let mut typed = vec![0u32; WRITERS as usize];
    let mut next = 0usize;
    // The writers' next `n` updates, round robin. They are made before the clock starts, so
    // that only the node's work is timed.
    let mut type_on = |n: u64| -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let w = next % WRITERS as usize;
                next += 1;
                let (writer, text) = &writers[w];
                let mut txn = writer.transact_mut();
                let at = CHARS / WRITERS * w as u32 + typed[w];
                text.insert(&mut txn, at, MARKER);
                typed[w] += MARKER.len() as u32;
                txn.encode_update_v1()
            })
            .collect()
    };
    let mut doc = seed;
    let mut group = c.benchmark_group("yjs_commit_4MiB");
    group
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    // One at a time, and as a session applies a backlog under load: ten queued updates at a
    // time, in one transaction, stored and sent as one update. The observer applies only what
    // was stored, so the final check also shows that a group's one update carries all of it.
    for (name, size) in [
        ("apply_and_commit", 1),
        ("apply_and_commit_in_groups_of_10", 10),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let updates = type_on(iters);
                let start = Instant::now();
                let stored: Vec<Vec<u8>> = updates
                    .chunks(size)
                    .filter_map(|chunk| {
                        let applied = doc.apply_yjs_updates(chunk.to_vec(), u64::MAX).applied?;
                        doc.committed(applied.version, applied.op.as_ref());
                        Some(applied.update.data)
                    })
                    .collect();
                let elapsed = start.elapsed();
                let mut txn = observer.transact_mut();
                for update in stored {
                    txn.apply_update(Update::decode_v1(&update).expect("decodes"))
                        .expect("applies");
                }
                elapsed
            });
        });
    }
    group.finish();
    assert_eq!(
        doc.summary().text,
        observer_text.get_string(&observer.transact()),
        "the committed text is every writer's"
    );
}

criterion_group!(benches, json_edits, yjs_updates, committed_yjs_updates);
criterion_main!(benches);
