//! Acked means durable: the real binary is killed with SIGKILL while chats are in flight, then
//! restarted on the same store; every acked chat is in the log at exactly its acked offset, and
//! the offsets are gap-free. Both backends.

mod common;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    BinaryServer, PgDatabase, WsClient, all_events, assert_gap_free, data_dir_args, spawn_binary,
};
use serde_json::{Value, json};

const CLIENTS: usize = 10;
const PER_CLIENT: usize = 30;
/// The kill comes once this many acks have arrived, so later chats are still in flight.
const KILL_AFTER_ACKS: usize = 100;
/// Each client's pause between two chats: 30 chats take about 300 ms.
const SEND_PAUSE: Duration = Duration::from_millis(10);

/// What the clients learned before the node died.
struct Outcome {
    epoch: String,
    /// Acked chats: text → offset.
    acked: HashMap<String, u64>,
    sent: HashSet<String>,
}

/// Opens the clients, fires every chat at once, and kills the node with SIGKILL once
/// `KILL_AFTER_ACKS` acks have arrived. Acks keep being recorded until the sockets die.
async fn fire_and_kill(server: &mut BinaryServer, session: &str) -> Outcome {
    let acked = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let ack_count = Arc::new(AtomicUsize::new(0));
    let mut epoch = String::new();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = WsClient::connect_hello(&server.ws_url(), &format!("writer-{i}")).await;
        let joined = client.join(session, None, None).await;
        epoch = joined["epoch"].as_str().expect("epoch").to_owned();
        clients.push(client);
    }

    let mut sent = HashSet::new();
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let texts: Vec<String> = (0..PER_CLIENT)
            .map(|j| format!("c{i}-m{j}-{}", uuid::Uuid::now_v7().simple()))
            .collect();
        sent.extend(texts.iter().cloned());
        let acked = acked.clone();
        let ack_count = ack_count.clone();
        let session = session.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = client.split();
            let sender = async {
                for text in &texts {
                    let frame =
                        json!({"type": "chat", "ref": text, "session": session, "text": text});
                    // Sends fail once the node is dead; that is the point of this test.
                    if tx.try_send(frame).await.is_err() {
                        break;
                    }
                    // Paced, so that the kill lands while chats are still being sent and
                    // committed; all ten clients still write at once.
                    tokio::time::sleep(SEND_PAUSE).await;
                }
            };
            let receiver = async {
                // Until the socket dies (the kill) or nothing comes for a while.
                while let Ok(Some(frame)) = rx.next_frame(Duration::from_secs(10)).await {
                    if frame["type"] == "ack" {
                        let text = frame["ref"].as_str().expect("ack ref").to_owned();
                        let offset = frame["offset"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("chat ack without offset: {frame}"));
                        let previous = acked.lock().expect("lock").insert(text.clone(), offset);
                        assert!(previous.is_none(), "{text} was acked twice");
                        ack_count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            };
            tokio::join!(sender, receiver);
        }));
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    while ack_count.load(Ordering::SeqCst) < KILL_AFTER_ACKS {
        assert!(
            Instant::now() < deadline,
            "only {} acks within 20 s",
            ack_count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill_9();
    let at_kill = ack_count.load(Ordering::SeqCst);

    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("a client did not notice the kill within 20 s")
            .expect("a client task failed");
    }
    let acked = Arc::try_unwrap(acked)
        .expect("all tasks are done")
        .into_inner()
        .expect("lock");
    eprintln!(
        "prepared {}, acked {} ({} when the kill was sent)",
        sent.len(),
        acked.len(),
        at_kill
    );
    assert!(
        acked.len() < sent.len(),
        "every chat was acked before the kill: the test did not kill the node mid-stream"
    );
    Outcome { epoch, acked, sent }
}

/// After the restart: every acked chat at its offset, gap-free offsets, no unknown or repeated
/// chat, the same epoch, replay from offset 0 equal to the log, and new writes go on.
async fn verify_after_restart(server: &BinaryServer, session: &str, outcome: &Outcome) {
    let log = all_events(&server.http_url(), session).await;
    assert!(!log.is_empty(), "the log is empty after the restart");
    assert_gap_free(&log, 1);
    let mut texts = HashSet::new();
    for event in log.iter().filter(|e| e["kind"] == "chat") {
        let text = event["data"]["text"].as_str().expect("text");
        assert!(
            outcome.sent.contains(text),
            "the log holds a chat nobody sent: {event}"
        );
        assert!(
            texts.insert(text.to_owned()),
            "a chat is in the log twice: {event}"
        );
    }
    let mut missing = Vec::new();
    for (text, offset) in &outcome.acked {
        let event: &Value = &log
            .get((*offset - 1) as usize)
            .cloned()
            .unwrap_or(Value::Null);
        if event["kind"] != "chat" || event["data"]["text"] != text.as_str() {
            missing.push(format!("{text} acked at {offset}, log has {event}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acked chats are lost or moved after kill -9:\n{}",
        missing.len(),
        outcome.acked.len(),
        missing.join("\n")
    );

    // The history is unbroken: same epoch, and a replay from the start equals the log.
    let head = log.len() as u64;
    let mut reader = WsClient::connect_hello(&server.ws_url(), "reader").await;
    let joined = reader.join(session, Some(0), Some(&outcome.epoch)).await;
    assert_eq!(
        joined["epoch"],
        outcome.epoch.as_str(),
        "a new epoch after a clean log: {joined}"
    );
    assert_eq!(joined["offset"].as_u64(), Some(head), "{joined}");
    let mut replayed = Vec::new();
    while (replayed.len() as u64) < head {
        let frame = reader.recv().await;
        assert_eq!(frame["type"], "event", "during replay: {frame}");
        replayed.push(frame);
    }
    for (live, stored) in replayed.iter().zip(&log) {
        assert_eq!(live["offset"], stored["offset"]);
        assert_eq!(live["data"], stored["data"]);
    }
    // New writes continue right after the log.
    let next = reader.chat(session, "after the restart").await;
    assert!(
        next > head,
        "offset {next} reused after restart (head {head})"
    );
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_chat_sqlite() {
    let data = tempfile::tempdir().expect("data dir");
    let args = data_dir_args(data.path());
    let session = "durable-sqlite";
    let mut server = spawn_binary(&args, &[]).await;
    let outcome = fire_and_kill(&mut server, session).await;
    drop(server);
    let server = spawn_binary(&args, &[]).await;
    verify_after_restart(&server, session, &outcome).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_chat_postgres() {
    let db = PgDatabase::create();
    // A data dir of its own, so that nothing can fall back to a shared SQLite file.
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    args.push("--database-url".into());
    args.push(db.url.clone().into());
    let session = "durable-postgres";
    let mut server = spawn_binary(&args, &[]).await;
    let outcome = fire_and_kill(&mut server, session).await;
    drop(server);
    let server = spawn_binary(&args, &[]).await;
    let (_, ready) = common::get_json(&format!("{}/readyz", server.http_url())).await;
    assert_eq!(
        ready["store"], "postgres",
        "the binary is not on PostgreSQL: {ready}"
    );
    verify_after_restart(&server, session, &outcome).await;
    assert!(
        !data.path().join("conclave.sqlite3").exists(),
        "a SQLite file was created although PostgreSQL was configured"
    );
    drop(server);
    drop(db);
}

/// Edits from several clients, all against version 0 (so each is rebased), killed mid-stream.
/// Returns the acked edits (token → version) and every token prepared.
async fn edit_and_kill(
    server: &mut BinaryServer,
    session: &str,
) -> (HashMap<String, u64>, HashSet<String>) {
    const EDITORS: usize = 4;
    const EDITS: usize = 40;
    let acked = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let ack_count = Arc::new(AtomicUsize::new(0));
    let mut sent = HashSet::new();
    let mut tasks = Vec::new();
    for i in 0..EDITORS {
        let mut client = WsClient::connect_hello(&server.ws_url(), &format!("editor-{i}")).await;
        client.join(session, None, None).await;
        let tokens: Vec<String> = (0..EDITS).map(|j| format!("[e{i}-{j}]")).collect();
        sent.extend(tokens.iter().cloned());
        let acked = acked.clone();
        let ack_count = ack_count.clone();
        let session = session.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = client.split();
            let sender = async {
                for token in &tokens {
                    let frame = json!({"type": "edit", "ref": token, "session": session,
                                       "doc": "main", "base": 0, "ops": [{"insert": token}]});
                    if tx.try_send(frame).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(SEND_PAUSE).await;
                }
            };
            let receiver = async {
                while let Ok(Some(frame)) = rx.next_frame(Duration::from_secs(10)).await {
                    if frame["type"] == "ack" {
                        let token = frame["ref"].as_str().expect("ack ref").to_owned();
                        let version = frame["version"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("edit ack without version: {frame}"));
                        acked.lock().expect("lock").insert(token, version);
                        ack_count.fetch_add(1, Ordering::SeqCst);
                    } else if frame["type"] == "error" {
                        panic!("an edit was refused: {frame}");
                    }
                }
            };
            tokio::join!(sender, receiver);
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ack_count.load(Ordering::SeqCst) < 40 {
        assert!(Instant::now() < deadline, "too few edit acks within 20 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.kill_9();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("an editor did not notice the kill within 20 s")
            .expect("an editor task failed");
    }
    let acked = Arc::try_unwrap(acked)
        .expect("tasks done")
        .into_inner()
        .expect("lock");
    assert!(
        acked.len() < sent.len(),
        "every edit was acked before the kill"
    );
    eprintln!("edits: prepared {}, acked {}", sent.len(), acked.len());
    (acked, sent)
}

async fn verify_doc_after_restart(
    server: &BinaryServer,
    session: &str,
    acked: &HashMap<String, u64>,
    sent: &HashSet<String>,
) {
    let url = format!("{}/v1/sessions/{session}/docs/main", server.http_url());
    let (status, doc) = common::get_json(&url).await;
    assert_eq!(status, 200, "{doc}");
    let version = doc["version"].as_u64().expect("version");
    let text = doc["text"].as_str().expect("text");
    let tokens: Vec<String> = text.split_inclusive(']').map(str::to_owned).collect();
    assert_eq!(tokens.concat(), text);
    let unique: HashSet<&String> = tokens.iter().collect();
    assert_eq!(unique.len(), tokens.len(), "an edit applied twice: {text}");
    for token in &tokens {
        assert!(
            sent.contains(token),
            "the text holds an edit nobody sent: {token} in {text}"
        );
    }
    assert_eq!(
        tokens.len() as u64,
        version,
        "each version adds one token: {doc}"
    );
    let max_acked = acked.values().copied().max().unwrap_or(0);
    assert!(
        version >= max_acked,
        "version {version} is behind an acked version {max_acked}"
    );
    let lost: Vec<&String> = acked.keys().filter(|t| !unique.contains(t)).collect();
    assert!(
        lost.is_empty(),
        "acked edits lost after kill -9: {lost:?}\ntext: {text}"
    );
}

async fn kill_9_loses_no_acked_edit(extra: &[OsString]) {
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    // Compact often, so that loading goes through a snapshot and the updates after it.
    args.extend(["--doc-compact-every".into(), "10".into()]);
    args.extend(extra.iter().cloned());
    let session = "durable-doc";
    let mut server = spawn_binary(&args, &[]).await;
    let (acked, sent) = edit_and_kill(&mut server, session).await;
    drop(server);
    let server = spawn_binary(&args, &[]).await;
    verify_doc_after_restart(&server, session, &acked, &sent).await;
    // And the document goes on from there.
    let mut client = WsClient::connect_hello(&server.ws_url(), "after").await;
    let joined = client.join(session, None, None).await;
    let version = joined["docs"][0]["version"]
        .as_u64()
        .expect("doc version in joined");
    client
        .send(
            json!({"type": "edit", "ref": "next", "session": session, "doc": "main",
                     "base": version, "ops": [{"insert": "[next]"}]}),
        )
        .await;
    let ack = client.recv_until(|f| f["ref"] == "next").await;
    assert_eq!(ack["version"].as_u64(), Some(version + 1), "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_edit_sqlite() {
    kill_9_loses_no_acked_edit(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acked_edit_postgres() {
    let db = PgDatabase::create();
    kill_9_loses_no_acked_edit(&["--database-url".into(), db.url.clone().into()]).await;
    drop(db);
}
