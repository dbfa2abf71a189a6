//! Document micro-benches: a JSON edit rebased and applied on a 100 KiB document, and a Yjs
//! update applied and re-encoded for the broadcast.
//!
//!     cargo bench --bench documents

use std::time::Duration;

use conclave::protocol::DocName;
use conclave::session::document::Document;
use conclave::session::ot::Component;
use conclave::store::{DocSnapshot, StoredDoc};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use yrs::updates::decoder::Decode;
use yrs::{Doc, GetString, OffsetKind, Options, StateVector, Text, Transact, Update};

const DOC_BYTES: usize = 100 * 1024;

fn big_text() -> String {
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit 😀. "
        .chars()
        .cycle()
        .take(DOC_BYTES)
        .collect()
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

criterion_group!(benches, json_edits, yjs_updates);
criterion_main!(benches);
