//! Documents over their lifetime: Yjs updates survive `kill -9` on both stores, compaction keeps
//! the content identical across restarts, and passivation gives memory back.

mod common;

use std::ffi::OsString;
use std::time::{Duration, Instant};

use common::yjs::{yjs_connect, yjs_insert};
use common::{PgDatabase, data_dir_args, get_json, spawn_binary};
use serde_json::json;

/// Polls the REST view of a document until `check` accepts it.
async fn doc_until(
    base: &str,
    path: &str,
    mut check: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get_json(&format!("{base}/v1/sessions/{path}")).await;
        if status == 200 && check(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "document never matched: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn yjs_updates_survive_kill_9(extra: &[OsString]) {
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    args.extend(["--doc-compact-every".into(), "4".into()]);
    args.extend(extra.iter().cloned());
    let mut server = spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let mut expected = String::new();
    for i in 0..10 {
        // A fresh Yjs client each time: it syncs the whole document, then appends.
        let mut socket = yjs_connect(server.addr, "yjs-durable/main", "")
            .await
            .expect("connects");
        let word = format!("[{i}😀]");
        yjs_insert(&mut socket, &word).await;
        expected.push_str(&word);
        // Visible over REST means committed: REST shows only the committed mirror.
        let want = expected.clone();
        doc_until(&base, "yjs-durable/docs/main", |d| {
            d["text"] == want.as_str()
        })
        .await;
    }
    let before = doc_until(&base, "yjs-durable/docs/main", |_| true).await;
    server.kill_9();
    drop(server);
    let server = spawn_binary(&args, &[]).await;
    let after = doc_until(&server.http_url(), "yjs-durable/docs/main", |_| true).await;
    assert_eq!(
        after["text"],
        expected.as_str(),
        "Yjs text lost after kill -9"
    );
    assert_eq!(
        after["version"], before["version"],
        "version changed across restart"
    );
    assert_eq!(after["version"].as_u64(), Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_updates_survive_kill_9_sqlite() {
    yjs_updates_survive_kill_9(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_updates_survive_kill_9_postgres() {
    let db = PgDatabase::create();
    yjs_updates_survive_kill_9(&["--database-url".into(), db.url.clone().into()]).await;
    drop(db);
}

/// Yjs updates that queue up while a session is busy are applied, stored and committed as one
/// update per group. Four clients each send 50 appends back to back, so groups form (the
/// document ends at fewer versions than updates: one per group). Once REST shows every append
/// committed, `kill -9` and a restart must give back the same text and version, rebuilt from
/// the groups' stored updates alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_yjs_updates_survive_kill_9() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use yrs::sync::{Message as YMessage, SyncMessage};
    use yrs::updates::encoder::Encode;
    use yrs::{Doc, Text, Transact};

    const CLIENTS: u64 = 4;
    const APPENDS: u64 = 50;
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    // No compaction by count: the reload replays the stored groups themselves.
    args.extend(["--doc-compact-every".into(), "1000000".into()]);
    let mut server = spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let writers = (0..CLIENTS).map(|c| {
        let addr = server.addr;
        tokio::spawn(async move {
            let mut socket = yjs_connect(addr, "yjs-groups/main", "")
                .await
                .expect("connects");
            // A client of its own: it appends to its own run, which the CRDT keeps whole.
            let doc = Doc::with_client_id(100 + c);
            let content = doc.get_or_insert_text("content");
            for i in 0..APPENDS {
                let update = {
                    let mut txn = doc.transact_mut();
                    let len = content.len(&txn);
                    content.insert(&mut txn, len, &format!("<{c}:{i}>"));
                    txn.encode_update_v1()
                };
                let frame = YMessage::Sync(SyncMessage::Update(update)).encode_v1();
                socket
                    .send(Message::Binary(frame.into()))
                    .await
                    .expect("send an update");
            }
            socket
        })
    });
    let sockets = futures_util::future::join_all(writers).await;
    let all_in = |d: &serde_json::Value| {
        let text = d["text"].as_str().unwrap_or_default();
        (0..CLIENTS).all(|c| (0..APPENDS).all(|i| text.contains(&format!("<{c}:{i}>"))))
    };
    let before = doc_until(&base, "yjs-groups/docs/main", all_in).await;
    let versions = before["version"].as_u64().expect("a version");
    assert!(
        versions < CLIENTS * APPENDS,
        "{versions} versions for {} updates: no group formed, so this test checks nothing",
        CLIENTS * APPENDS
    );
    drop(sockets);
    server.kill_9();
    drop(server);
    let server = spawn_binary(&args, &[]).await;
    let after = doc_until(&server.http_url(), "yjs-groups/docs/main", |_| true).await;
    assert_eq!(after["text"], before["text"], "grouped Yjs updates lost");
    assert_eq!(
        after["version"], before["version"],
        "version changed across restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_content_identical() {
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    args.extend(["--doc-compact-every".into(), "5".into()]);
    let server = spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let http = common::http();
    http.post(format!("{base}/v1/sessions"))
        .json(&json!({"id": "compact"}))
        .send()
        .await
        .expect("create");
    let mut version = 0;
    for i in 0..23u64 {
        // Inserts at the front and the back, and a delete now and then.
        let ops = match i % 3 {
            0 => json!([{"insert": format!("<{i}é😀>")}]),
            1 => json!([{"retain": 1}, {"insert": format!("({i})")}]),
            _ => json!([{"delete": 1}]),
        };
        let body: serde_json::Value = http
            .post(format!("{base}/v1/sessions/compact/docs/main/edits"))
            .json(&json!({"base": version, "ops": ops}))
            .send()
            .await
            .expect("edit")
            .json()
            .await
            .expect("json");
        version = body["version"].as_u64().expect("version");
    }
    let live = doc_until(&base, "compact/docs/main", |_| true).await;
    server.sigterm();
    drop(server);

    // The store holds a snapshot and only the updates after it.
    let db = data.path().join("conclave.sqlite3");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("open the store");
    let snapshots: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM doc_snapshots")
        .fetch_one(&pool)
        .await
        .expect("count snapshots");
    let updates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM doc_updates")
        .fetch_one(&pool)
        .await
        .expect("count updates");
    pool.close().await;
    assert_eq!(snapshots, 1, "no snapshot was written");
    assert!(
        updates < 5,
        "{updates} updates left after compaction every 5"
    );

    let server = spawn_binary(&args, &[]).await;
    let reloaded = doc_until(&server.http_url(), "compact/docs/main", |_| true).await;
    assert_eq!(
        reloaded["text"], live["text"],
        "compaction changed the text"
    );
    assert_eq!(reloaded["version"], live["version"]);
    assert_eq!(reloaded["version"].as_u64(), Some(version));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn live_sessions(base: &str) -> u64 {
    common::metric(base, "conclave_sessions_live", "").await as u64
}

/// Touch 10,000 sessions once; after the idle timeout they passivate, and the node gives most of
/// the memory they took back. Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passivation_gives_memory_back() {
    const SESSIONS: usize = 10_000;
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    // Long enough that every touched session is live at once, short enough for a test.
    args.extend(["--idle-timeout-s".into(), "20".into()]);
    let server = spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let http = common::http();
    // Touching a session activates it: its actor loads it (creating it) and stays until idle.
    let touch = |i: usize| {
        let http = http.clone();
        let url = format!("{base}/v1/sessions/p{i}/docs/main");
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    };
    // Create them in bulk through the socket-free path: the first GET 404s, so create first.
    for chunk in (0..SESSIONS).collect::<Vec<_>>().chunks(200) {
        let creates = chunk.iter().map(|i| {
            http.post(format!("{base}/v1/sessions"))
                .json(&json!({"id": format!("p{i}")}))
                .send()
        });
        for response in futures_util::future::join_all(creates).await {
            assert_eq!(response.expect("create").status().as_u16(), 201);
        }
    }
    // The baseline is taken after creating them: the store's caches are warm, no actor is live.
    let deadline = Instant::now() + Duration::from_secs(30);
    while live_sessions(&base).await > 0 {
        assert!(Instant::now() < deadline, "creation left live sessions");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let baseline = rss_kib(server.pid());
    let mut peak = baseline;
    let mut peak_live = 0;
    for chunk in (0..SESSIONS).collect::<Vec<_>>().chunks(200) {
        for status in futures_util::future::join_all(chunk.iter().map(|&i| touch(i))).await {
            assert_eq!(status.expect("touch"), 200);
        }
        peak = peak.max(rss_kib(server.pid()));
        peak_live = peak_live.max(live_sessions(&base).await);
    }
    // Idle timeout 20 s, checked every 5 s; the allocator returns freed pages about a second
    // after they are freed (the binary's jemalloc options).
    let deadline = Instant::now() + Duration::from_secs(60);
    while live_sessions(&base).await > 0 {
        assert!(Instant::now() < deadline, "sessions never passivated");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = rss_kib(server.pid());
    println!(
        "passivation: baseline {baseline} KiB, peak {peak} KiB with up to {peak_live} live sessions, \
         after passivating all {SESSIONS}: {after} KiB"
    );
    assert!(
        peak_live >= SESSIONS as u64 / 4,
        "sessions were not live at once ({peak_live})"
    );
    let grew = peak.saturating_sub(baseline);
    let given_back = peak.saturating_sub(after);
    assert!(
        given_back * 3 >= grew,
        "memory did not come back: baseline {baseline}, peak {peak}, after {after} KiB"
    );
}

/// A session whose load fails is not served, and nothing is written over its stored state:
/// once loads work again, the document is exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_never_serves_or_overwrites_the_document() {
    let server = common::TestServer::sqlite_with(|config| config.limits.idle_timeout_s = 1);
    let base = server.http_url();
    let http = common::http();
    http.post(format!("{base}/v1/sessions"))
        .json(&json!({"id": "fragile"}))
        .send()
        .await
        .expect("create");
    let edit = http
        .post(format!("{base}/v1/sessions/fragile/docs/main/edits"))
        .json(&json!({"base": 0, "ops": [{"insert": "precious text"}]}))
        .send()
        .await
        .expect("edit");
    assert_eq!(edit.status().as_u16(), 200);
    // Let the session passivate, so the next use must load it from the store.
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_sessions(&base).await > 0 {
        assert!(Instant::now() < deadline, "the session never passivated");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.switch.set_fail_loads(true);
    let (status, body) = get_json(&format!("{base}/v1/sessions/fragile/docs/main")).await;
    assert_eq!(status, 503, "served while its load fails: {body}");
    common::assert_error_body(&body, "storage_unavailable");
    let write = http
        .post(format!("{base}/v1/sessions/fragile/docs/main/edits"))
        .json(&json!({"base": 0, "ops": [{"insert": "overwrite"}]}))
        .send()
        .await
        .expect("edit");
    assert_eq!(
        write.status().as_u16(),
        503,
        "accepted a write while unloaded"
    );
    let mut client = common::WsClient::connect_hello(&server.ws_url(), "j").await;
    client
        .send(json!({"type": "join", "ref": "j", "session": "fragile"}))
        .await;
    let reply = client.recv_until(|f| f["ref"] == "j").await;
    assert_eq!(
        reply["code"], "storage_unavailable",
        "joined an unloaded session: {reply}"
    );

    server.switch.set_fail_loads(false);
    let (status, body) = get_json(&format!("{base}/v1/sessions/fragile/docs/main")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], "precious text");
    assert_eq!(body["version"], 1);
}
