//! Node-wide group commit: the batches of many sessions share one transaction, and still each
//! batch is all or nothing under its own fence. A deposed session or a batch that fails on its
//! own never fails the others, and many sessions writing at once are really grouped.

mod common;

use std::time::Duration;

use common::{
    PgDatabase, TestServer, WsClient, all_events, assert_gap_free, metric, owned_session,
    stored_chat, stored_texts,
};
use conclave::protocol::SessionId;
use conclave::store::{Fence, Ownership, SessionBatch, SharedStore, StoreError, StoreLocation};
use serde_json::json;

fn batch(session: &SessionId, fence: &Fence, offset: u64, text: &str) -> SessionBatch {
    SessionBatch {
        session: session.clone(),
        fence: fence.clone(),
        events: vec![stored_chat(offset, text)],
        updates: Vec::new(),
    }
}

async fn open(location: StoreLocation) -> SharedStore {
    let store = conclave::store::connect(&location).await.expect("store");
    store.migrate().await.expect("migrations");
    store
}

/// On PostgreSQL: three sessions in one group, the middle one's lease taken over by another
/// node. Only that batch is refused, as `Deposed`; the others commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_batch_of_a_group_is_fenced_by_its_own_lease() {
    let db = PgDatabase::create();
    let store = open(StoreLocation::Postgres(db.url.clone())).await;
    let ttl = Duration::from_secs(30);
    let ids: Vec<SessionId> = ["g-a", "g-b", "g-c"]
        .iter()
        .map(|name| SessionId::parse(name).expect("id"))
        .collect();
    let mut fences = Vec::new();
    for id in &ids {
        fences.push(owned_session(&store, id).await);
    }
    store
        .release_session(&ids[1], &fences[1])
        .await
        .expect("release");
    assert!(matches!(
        store
            .acquire_session(&ids[1], "b", ttl)
            .await
            .expect("takeover"),
        Ownership::Acquired(_)
    ));

    let group: Vec<SessionBatch> = ids
        .iter()
        .zip(&fences)
        .map(|(id, fence)| batch(id, fence, 1, "from a"))
        .collect();
    let results = store.commit_group(&group).await;
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(StoreError::Deposed)),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert_eq!(stored_texts(&store, &ids[0]).await.len(), 1);
    assert!(
        stored_texts(&store, &ids[1]).await.is_empty(),
        "the deposed batch was written"
    );
    assert_eq!(stored_texts(&store, &ids[2]).await.len(), 1);
}

/// On both backends: a batch whose offset is taken already fails alone; the rest of its group
/// commits, each batch whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_does_not_fail_the_rest_of_its_group() {
    let db = PgDatabase::create();
    let dir = tempfile::tempdir().expect("temp dir");
    for location in [
        StoreLocation::Postgres(db.url.clone()),
        StoreLocation::Sqlite(dir.path().join("group.sqlite3")),
    ] {
        let store = open(location).await;
        let mut fences = Vec::new();
        let ids: Vec<SessionId> = ["f-a", "f-b", "f-c"]
            .iter()
            .map(|name| SessionId::parse(name).expect("id"))
            .collect();
        for id in &ids {
            fences.push(owned_session(&store, id).await);
        }
        store
            .commit_batch(&ids[1], &fences[1], &[stored_chat(1, "first")], &[])
            .await
            .expect("the first write");

        let mut group: Vec<SessionBatch> = ids
            .iter()
            .zip(&fences)
            .map(|(id, fence)| batch(id, fence, 1, "grouped"))
            .collect();
        // Two events in the first batch: both land, or neither.
        group[0].events.push(stored_chat(2, "grouped too"));
        let results = store.commit_group(&group).await;
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(
            matches!(results[1], Err(StoreError::Database(_))),
            "a taken offset was not refused: {:?}",
            results[1]
        );
        assert!(results[2].is_ok(), "{:?}", results[2]);
        assert_eq!(stored_texts(&store, &ids[0]).await.len(), 2);
        assert_eq!(
            stored_texts(&store, &ids[1]).await,
            vec![r#"{"text":"first"}"#.to_owned()]
        );
        assert_eq!(stored_texts(&store, &ids[2]).await.len(), 1);
    }
}

/// Many sessions writing at once over real sockets: every ack is in its session's gap-free
/// log, and `/metrics` shows that commits really carried several sessions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_writing_at_once_share_commits_and_lose_nothing() {
    const SESSIONS: usize = 40;
    const CHATS: usize = 25;
    let server = TestServer::sqlite();
    let mut writers = Vec::new();
    for s in 0..SESSIONS {
        let url = server.ws_url();
        writers.push(tokio::spawn(async move {
            let session = format!("grouped-{s}");
            let mut client = WsClient::connect_hello(&url, &format!("writer{s}")).await;
            client.join(&session, None, None).await;
            for c in 0..CHATS {
                client
                    .send(json!({"type": "chat", "ref": format!("c{c}"), "session": session, "text": format!("{s}/{c}")}))
                    .await;
            }
            let mut acked = Vec::new();
            while acked.len() < CHATS {
                let frame = client.recv().await;
                if frame["type"] == "ack" {
                    acked.push(frame["offset"].as_u64().expect("offset"));
                }
                assert_ne!(frame["type"], "error", "{frame}");
            }
            (session, acked)
        }));
    }
    for writer in writers {
        let (session, acked) = writer.await.expect("writer");
        let events = all_events(&server.http_url(), &session).await;
        let chats: Vec<_> = events.iter().filter(|e| e["kind"] == "chat").collect();
        assert_eq!(chats.len(), CHATS, "{session}: {events:?}");
        assert_gap_free(&events, 1);
        for offset in acked {
            assert!(
                events.iter().any(|e| e["offset"] == offset),
                "{session}: acked offset {offset} is not in the log"
            );
        }
    }
    let batches = metric(&server.http_url(), "conclave_commit_group_sessions_sum", "").await;
    let groups = metric(
        &server.http_url(),
        "conclave_commit_group_sessions_count",
        "",
    )
    .await;
    assert!(
        batches >= (SESSIONS * 2) as f64,
        "too few batches counted: {batches}"
    );
    assert!(
        groups < batches,
        "no commit carried more than one session: {groups} groups for {batches} batches"
    );
}
