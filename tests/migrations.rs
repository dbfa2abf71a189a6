//! Schema migrations on a database that already holds data: what a node wrote under an older
//! schema is all there, in order, after a newer node migrates it, and the constraints the
//! session relies on still hold.

mod common;

use std::path::Path;

use common::{owned_session, stored_chat, stored_texts};
use conclave::protocol::{DocName, SessionId};
use conclave::store::{DocUpdate, StoreLocation};
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

/// The last SQLite migration before the event and document logs moved to arrival order.
const CLUSTERED_LOGS: i64 = 20261127000005;

fn update(doc: &DocName, seq: u64) -> DocUpdate {
    DocUpdate {
        doc: doc.clone(),
        seq,
        version: seq,
        data: vec![seq as u8; 3],
    }
}

async fn table_sql(pool: &SqlitePool, table: &str) -> String {
    sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?")
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("table definition")
}

/// Two sessions write interleaved events and document updates under the clustered schema. After
/// the migration to arrival order every event replays in offset order, every update loads, a
/// taken offset is still refused, and new writes land after the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_written_under_the_clustered_schema_survive_the_move_to_arrival_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("conclave.sqlite3");
    let raw = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .expect("raw pool");
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    Migrator::new(migrations.as_path())
        .await
        .expect("migrations")
        .run_to(CLUSTERED_LOGS, &raw)
        .await
        .expect("the older schema");
    assert!(table_sql(&raw, "events").await.contains("WITHOUT ROWID"));

    let ids: Vec<SessionId> = ["old-a", "old-b"]
        .iter()
        .map(|name| SessionId::parse(name).expect("id"))
        .collect();
    let doc = DocName::parse("notes").expect("doc");
    let location = StoreLocation::Sqlite(path.clone());
    {
        let old = conclave::store::connect(&location)
            .await
            .expect("old store");
        let fences = [
            owned_session(&old, &ids[0]).await,
            owned_session(&old, &ids[1]).await,
        ];
        for offset in 1..=40 {
            for (id, fence) in ids.iter().zip(&fences) {
                old.commit_batch(
                    id,
                    fence,
                    &[stored_chat(offset, &format!("{id} {offset}"))],
                    &[update(&doc, offset)],
                )
                .await
                .expect("old commit");
            }
        }
    }

    let store = conclave::store::connect(&location).await.expect("store");
    store
        .migrate()
        .await
        .expect("the migration to arrival order");
    assert!(!table_sql(&raw, "events").await.contains("WITHOUT ROWID"));
    assert!(
        !table_sql(&raw, "doc_updates")
            .await
            .contains("WITHOUT ROWID")
    );

    for id in &ids {
        let expected: Vec<String> = (1..=40)
            .map(|offset| json!({ "text": format!("{id} {offset}") }).to_string())
            .collect();
        assert_eq!(stored_texts(&store, id).await, expected, "{id}");
        let docs = store.load_docs(id).await.expect("docs");
        assert_eq!(docs.len(), 1);
        let seqs: Vec<u64> = docs[0].updates.iter().map(|u| u.seq).collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "{id}");
        assert_eq!(docs[0].updates[6].data, vec![7u8; 3]);
    }

    let fence = owned_session(&store, &ids[0]).await;
    assert!(
        store
            .commit_batch(&ids[0], &fence, &[stored_chat(40, "again")], &[])
            .await
            .is_err(),
        "a taken offset was accepted after the migration"
    );
    assert!(
        store
            .commit_batch(&ids[0], &fence, &[], &[update(&doc, 40)])
            .await
            .is_err(),
        "a taken document seq was accepted after the migration"
    );
    store
        .commit_batch(
            &ids[0],
            &fence,
            &[stored_chat(41, "new")],
            &[update(&doc, 41)],
        )
        .await
        .expect("a write after the migration");
    let after = store.events_after(&ids[0], 39, 10).await.expect("events");
    let offsets: Vec<u64> = after.iter().map(|event| event.offset).collect();
    assert_eq!(offsets, vec![40, 41]);
    assert_eq!(after[1].data.get(), r#"{"text":"new"}"#);
}
