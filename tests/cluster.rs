//! Session ownership across nodes that share one PostgreSQL: each session has one owner, named
//! by a lease with an epoch; other nodes say where it is served; when the owner dies, another
//! node takes over once the lease has run out, with every acked event kept and offsets going
//! on without a gap; and a deposed owner that wakes up cannot write (the epoch fences it).

mod common;

use std::time::{Duration, Instant};

use common::{
    BinaryServer, PgDatabase, TestServer, WsClient, all_events, assert_gap_free, post_json,
    spawn_binary,
};
use conclave::protocol::SessionId;
use conclave::store::{Fence, Ownership, StoreError, StoreLocation};
use serde_json::json;

/// The lease TTL of every node here: short, so failover is quick to test.
const TTL_MS: u64 = 1500;

/// An in-process node on the shared database.
fn node_on(db: &PgDatabase) -> TestServer {
    let url = db.url.clone();
    TestServer::sqlite_with(move |config| {
        config.database_url = Some(url);
        config.limits.owner_lease_ttl_ms = TTL_MS;
    })
}

/// A node as a real process on the shared database, to kill or pause.
async fn process_on(db: &PgDatabase, node_id: &str) -> BinaryServer {
    process_with(db, node_id, &[]).await
}

/// As [`process_on`], on the Redis bus under `prefix`, so it relays and is relayed to.
async fn bus_process_on(db: &PgDatabase, node_id: &str, prefix: &str) -> BinaryServer {
    process_with(
        db,
        node_id,
        &[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--bus-prefix",
            prefix,
        ],
    )
    .await
}

async fn process_with(db: &PgDatabase, node_id: &str, more: &[&str]) -> BinaryServer {
    let ttl = TTL_MS.to_string();
    let mut args = vec![
        "--database-url",
        db.url.as_str(),
        "--node-id",
        node_id,
        "--owner-lease-ttl-ms",
        ttl.as_str(),
    ];
    args.extend_from_slice(more);
    spawn_binary(&args, &[]).await
}

/// Joins `session`, retrying while another node's lease holds it; returns the `joined` frame
/// and how long it took.
async fn join_when_free(
    client: &mut WsClient,
    session: &str,
    within: Duration,
) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    for attempt in 0.. {
        let reference = format!("j{attempt}");
        client
            .send(json!({"type": "join", "ref": reference, "session": session}))
            .await;
        let reply = client.recv_until(|f| f["ref"] == reference.as_str()).await;
        if reply["type"] == "joined" {
            return (reply, started.elapsed());
        }
        // `conflict` while the other node holds it; `storage_unavailable` ("retry") if the
        // join reached this node's actor for the session just as it stopped after a conflict.
        assert!(
            reply["code"] == "conflict" || reply["code"] == "storage_unavailable",
            "{reply}"
        );
        assert!(
            started.elapsed() < within,
            "the session was not taken over within {within:?}: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_has_one_owner_and_other_nodes_say_where() {
    let db = PgDatabase::create();
    let a = node_on(&db);
    let b = node_on(&db);
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join("owned", None, None).await;
    ada.chat("owned", "served by a").await;

    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    bob.send(json!({"type": "join", "ref": "j", "session": "owned"}))
        .await;
    let refused = bob.recv_until(|f| f["ref"] == "j").await;
    assert_eq!(refused["code"], "conflict", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&a.node_id),
        "the refusal does not name the owner: {refused}"
    );
    let (status, body) = post_json(
        &format!("{}/v1/sessions/owned/messages", b.http_url()),
        &json!({"text": "via b", "name": "Bob"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // The owner goes on; nothing from b reached the log.
    ada.chat("owned", "still served by a").await;
    let events = all_events(&a.http_url(), "owned").await;
    assert_gap_free(&events, 1);
    assert!(events.iter().all(|e| e["data"]["text"] != "via b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_kill_9_keeps_acked_events_and_offsets_go_on() {
    let db = PgDatabase::create();
    let mut a = process_on(&db, "node-a").await;
    let b = node_on(&db);
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join("failover", None, None).await;
    let mut last = 0;
    for i in 0..20 {
        last = ada.chat("failover", &format!("acked {i}")).await;
    }

    a.kill_9();
    let killed = Instant::now();
    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    let (joined, _) = join_when_free(
        &mut bob,
        "failover",
        Duration::from_millis(TTL_MS) + Duration::from_secs(5),
    )
    .await;
    let failover = killed.elapsed();
    eprintln!(
        "failover: the session was served again {failover:?} after kill -9 (lease TTL {TTL_MS} ms)"
    );
    assert!(
        failover <= Duration::from_millis(TTL_MS) + Duration::from_secs(2),
        "failover took {failover:?}"
    );
    assert_eq!(joined["offset"].as_u64(), Some(last), "{joined}");
    // last + 1 is Bob's member.joined; nothing was skipped or reused.
    let next = bob.chat("failover", "after the failover").await;
    assert_eq!(next, last + 2, "offsets jumped across the failover");
    let events = all_events(&b.http_url(), "failover").await;
    assert_gap_free(&events, 1);
    for i in 0..20 {
        let text = format!("acked {i}");
        assert!(
            events.iter().any(|e| e["data"]["text"] == text.as_str()),
            "acked chat {text:?} was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_deposed_owner_cannot_overwrite() {
    let db = PgDatabase::create();
    let a = process_on(&db, "node-a").await;
    let b = node_on(&db);
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join("fenced", None, None).await;
    let last = ada.chat("fenced", "before the pause").await;

    // SIGSTOP: the owner neither renews nor knows its lease ran out.
    let pid = libc::pid_t::try_from(a.pid()).expect("pid");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    let (joined, _) = join_when_free(&mut bob, "fenced", Duration::from_secs(10)).await;
    assert_eq!(joined["offset"].as_u64(), Some(last), "{joined}");
    let taken = bob.chat("fenced", "the new owner's").await;
    assert_eq!(taken, last + 2, "last + 1 is Bob's member.joined");

    // Ada writes to the paused owner, which then wakes up: it must refuse, not ack.
    ada.send(json!({"type": "chat", "ref": "late", "session": "fenced", "text": "from the deposed owner"}))
        .await;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // The chat is never acked: the owner learns it was deposed (from its lease heartbeat or
    // from the fenced commit, whichever comes first) and answers with errors.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|f: &serde_json::Value| f["ref"] == "late") && Instant::now() < deadline
    {
        if let Some(frame) = ada.try_recv(Duration::from_millis(200)).await {
            seen.push(frame);
        }
    }
    assert!(
        !seen
            .iter()
            .any(|f| f["ref"] == "late" && f["type"] == "ack"),
        "the deposed owner acked a write: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|f| f["type"] == "error" && f["code"] == "conflict"),
        "the client was not told the session moved: {seen:?}"
    );

    let events = all_events(&b.http_url(), "fenced").await;
    assert_gap_free(&events, 1);
    assert!(
        events
            .iter()
            .all(|e| e["data"]["text"] != "from the deposed owner"),
        "the deposed owner wrote: {events:?}"
    );
    assert_eq!(bob.chat("fenced", "still the owner").await, taken + 1);
    drop(a);
}

/// The lease rules themselves, on PostgreSQL; SQLite serves one node, so it neither stores nor
/// fences leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_fence_writes_on_a_shared_store() {
    let db = PgDatabase::create();
    let ttl = Duration::from_secs(30);
    let session = SessionId::parse("leased").expect("id");
    let store = conclave::store::connect(&StoreLocation::Postgres(db.url.clone()))
        .await
        .expect("store");
    store.migrate().await.expect("migrations");
    assert!(store.shared());
    store.open_session(&session).await.expect("session");
    let Ownership::Acquired(first) = store
        .acquire_session(&session, "a", ttl)
        .await
        .expect("acquire")
    else {
        panic!("a fresh session was not acquired");
    };
    assert_eq!(first.epoch, 1);
    match store
        .acquire_session(&session, "b", ttl)
        .await
        .expect("acquire")
    {
        Ownership::HeldBy { node, .. } => assert_eq!(node, "a"),
        other => panic!("a live lease was taken over: {other:?}"),
    }
    store
        .release_session(&session, &first)
        .await
        .expect("release");
    let Ownership::Acquired(second) = store
        .acquire_session(&session, "b", ttl)
        .await
        .expect("acquire")
    else {
        panic!("a released lease was not free");
    };
    assert_eq!(second.epoch, 2);
    let renewed = store.renew_sessions("b", ttl).await.expect("renew");
    assert_eq!(renewed, vec![(session.clone(), 2)]);
    assert!(
        store
            .renew_sessions("a", ttl)
            .await
            .expect("renew")
            .is_empty()
    );
    // The deposed fence writes nothing; the current one does.
    let stale = Fence {
        node: "a".into(),
        epoch: 1,
    };
    assert!(matches!(
        store.commit_batch(&session, &stale, &[chat(1)], &[]).await,
        Err(StoreError::Deposed)
    ));
    store
        .commit_batch(&session, &second, &[chat(1)], &[])
        .await
        .expect("the owner's commit");
    assert_eq!(
        store
            .events_after(&session, 0, 10)
            .await
            .expect("events")
            .len(),
        1
    );
    // The owner may always take its own lease back (a restart), under a new epoch.
    match store
        .acquire_session(&session, "b", ttl)
        .await
        .expect("acquire")
    {
        Ownership::Acquired(fence) => assert_eq!(fence.epoch, 3),
        other => panic!("the owner could not take its lease back: {other:?}"),
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = conclave::store::connect(&StoreLocation::Sqlite(dir.path().join("one.sqlite3")))
        .await
        .expect("sqlite");
    assert!(
        !sqlite.shared(),
        "SQLite must not pay for leases it never needs"
    );
}

fn chat(offset: u64) -> conclave::session::log::Event {
    conclave::session::log::NewEvent::new(
        conclave::session::log::EventKind::Chat,
        conclave::session::log::Actor {
            id: "tester".into(),
            name: "tester".into(),
        },
        &json!({"text": "hello"}),
    )
    .at_offset(offset)
}

/// A Redis of the test's own, on a free port, to stop and start again.
struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let mut redis = Self {
            port: common::free_port(),
            child: None,
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let port = self.port.to_string();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                port.as_str(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_bus_reports_an_outage_and_resubscribes_after_it() {
    use conclave::cluster::{Bus, Channel, RedisBus};
    let mut redis = PrivateRedis::start();
    let a = RedisBus::connect(&redis.url(), "t").await.expect("bus a");
    let b = RedisBus::connect(&redis.url(), "t").await.expect("bus b");
    let mut wakeups = b.subscribe(&Channel::Tasks).await.expect("subscribe");
    a.publish(&Channel::Tasks, "one".into())
        .await
        .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(5), wakeups.recv()).await;
    assert_eq!(got.ok().flatten().as_deref(), Some(&b"one"[..]));

    redis.stop();
    until(
        "the bus reports the outage",
        Duration::from_secs(10),
        || !b.is_up(),
    )
    .await;
    assert!(
        a.publish(&Channel::Tasks, "lost".into()).await.is_err(),
        "a publish into an outage succeeded"
    );

    redis.restart();
    until("the bus resubscribes", Duration::from_secs(15), || {
        b.is_up()
    })
    .await;
    // The subscription made before the outage works again, without subscribing anew.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = a.publish(&Channel::Tasks, "two".into()).await;
        if let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(200), wakeups.recv()).await
        {
            assert_eq!(message.as_ref(), b"two");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no message after Redis came back"
        );
    }
}

/// Two in-process nodes on the shared database and the machine's Redis, under a prefix of
/// their own; the sweep is slowed to a minute, so only a bus wake-up gets a task claimed fast.
fn bus_node_on(db: &PgDatabase, prefix: &str) -> TestServer {
    bus_node_at(db, "redis://127.0.0.1:6379", prefix)
}

/// As [`bus_node_on`], on the Redis at `redis`.
fn bus_node_at(db: &PgDatabase, redis: &str, prefix: &str) -> TestServer {
    let (url, redis, prefix) = (db.url.clone(), redis.to_owned(), prefix.to_owned());
    TestServer::sqlite_with(move |config| {
        config.database_url = Some(url);
        config.redis_url = Some(redis);
        config.bus_prefix = prefix;
        config.limits.owner_lease_ttl_ms = TTL_MS;
        config.limits.task_sweep_ms = 60_000;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_queued_on_one_node_is_taken_at_once_on_another_and_its_events_reach_the_owner() {
    let db = PgDatabase::create();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let a = bus_node_on(&db, &prefix);
    let b = bus_node_on(&db, &prefix);
    let (_, ready) = common::get_json(&format!("{}/readyz", b.http_url())).await;
    assert_eq!(ready["bus"], "redis", "{ready}");
    assert_eq!(ready["bus_state"], "up", "{ready}");

    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join("cross", None, None).await;
    let mut worker = common::worker::TestWorker::connect(b.addr, &["echo"], 1).await;
    // Let the worker's first claim (at registration) come up empty before the task exists.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let submitted = Instant::now();
    let task = common::worker::submit(
        &a.http_url(),
        "cross",
        json!({"kind": "echo", "input": {"n": 1}}),
    )
    .await;
    let assigned = worker
        .expect_within("assign", Duration::from_secs(10))
        .await;
    let waited = submitted.elapsed();
    eprintln!("a task submitted on node a was assigned on node b after {waited:?}");
    assert_eq!(assigned["task"]["id"], task.as_str());
    assert!(
        waited < Duration::from_secs(5),
        "no wake-up: the task waited {waited:?}"
    );
    let done = worker.complete(&assigned["task"], json!({"echo": 1})).await;
    assert_eq!(done["type"], "ack", "{done}");

    // Node b settled the task; its events went to the owner, node a, over the bus.
    let completed = ada
        .recv_until_within(Duration::from_secs(10), |f| f["kind"] == "task.completed")
        .await;
    assert_eq!(completed["data"]["task"], task.as_str(), "{completed}");
    let events = all_events(&a.http_url(), "cross").await;
    assert_gap_free(&events, 1);
    assert!(
        events.iter().any(|e| e["kind"] == "task.working"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_bus_command_is_dropped_and_counted() {
    use conclave::cluster::{Bus, Channel, RedisBus};
    let db = PgDatabase::create();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let a = bus_node_on(&db, &prefix);
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join("corrupt", None, None).await;
    let bus = RedisBus::connect("redis://127.0.0.1:6379", &prefix)
        .await
        .expect("bus");
    let session = SessionId::parse("corrupt").expect("id");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        bus.publish(&Channel::SessionIn(session.clone()), "{not json".into())
            .await
            .expect("publish");
        if common::metric(&a.http_url(), "conclave_bus_corrupt_total", "").await >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the corrupt command was never counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The session goes on.
    ada.chat("corrupt", "still fine").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_degrades_the_bus_but_a_node_serves_its_sessions() {
    let mut redis = PrivateRedis::start();
    let pg = PgDatabase::create();
    let (db, url) = (pg.url.clone(), redis.url());
    let node = TestServer::sqlite_with(move |config| {
        config.database_url = Some(db);
        config.redis_url = Some(url);
        config.bus_prefix = "outage".into();
    });
    let ready = || async { common::get_json(&format!("{}/readyz", node.http_url())).await };
    let mut ada = WsClient::connect_hello(&node.ws_url(), "Ada").await;
    ada.join("through-the-outage", None, None).await;
    let before = ada.chat("through-the-outage", "before").await;

    redis.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = ready().await;
        assert_eq!(status, 200, "a bus outage made the node unready: {body}");
        if body["bus_state"] == "degraded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the outage was not reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The node's own session is served and acked as ever.
    let during = ada.chat("through-the-outage", "during").await;
    assert_eq!(during, before + 1);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready().await.1["bus_state"] != "up" {
        assert!(Instant::now() < deadline, "the bus did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ada.chat("through-the-outage", "after").await, during + 1);
    let events = all_events(&node.http_url(), "through-the-outage").await;
    assert_gap_free(&events, 1);
}

/// Sends `count` chats (`"{who} {i}"`, also their `ref`) from `sender`, without waiting for acks.
async fn fire_chats(sender: &mut common::WsSender, session: &str, who: &str, count: usize) {
    for i in 0..count {
        let text = format!("{who} {i}");
        sender
            .send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
            .await;
    }
}

/// Reads frames until `count` chat events and `acks` acks have arrived; returns the chat events
/// as `(offset, text)` in arrival order and the acks' offsets by `ref`.
async fn collect_chats(
    receiver: &mut common::WsReceiver,
    count: usize,
    acks: usize,
) -> (Vec<(u64, String)>, std::collections::HashMap<String, u64>) {
    let mut chats = Vec::new();
    let mut acked = std::collections::HashMap::new();
    while chats.len() < count || acked.len() < acks {
        let frame = match receiver.next_frame(Duration::from_secs(10)).await {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!(
                "stalled after {} chats and {} acks: {chats:?}",
                chats.len(),
                acked.len()
            ),
            Err(end) => panic!("the socket ended: {end}"),
        };
        match frame["type"].as_str() {
            Some("event") if frame["kind"] == "chat" => chats.push((
                frame["offset"].as_u64().expect("offset"),
                frame["data"]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )),
            Some("ack") => {
                let reference = frame["ref"].as_str().unwrap_or_default().to_owned();
                acked.insert(reference, frame["offset"].as_u64().expect("ack offset"));
            }
            Some("error") => panic!("an error came back: {frame}"),
            _ => {}
        }
    }
    (chats, acked)
}

/// A client on node b joins a session node a owns: b relays it through Redis. Chats from both
/// nodes, sent at once, reach both clients in one order, the owner's, which is the log's; acks
/// name the offsets the events carry; edits and presence cross both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_nodes_share_a_session_through_a_relay_in_one_order() {
    let db = PgDatabase::create();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let a = bus_node_on(&db, &prefix);
    let b = bus_node_on(&db, &prefix);
    let session = "relayed";
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join(session, None, None).await;
    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    let joined = bob.join(session, None, None).await;
    let members: Vec<&str> = joined["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(members.contains(&"Ada"), "{joined}");

    // Chats from both sides at once.
    const EACH: usize = 40;
    let (mut ada_out, mut ada_in) = ada.split();
    let (mut bob_out, mut bob_in) = bob.split();
    let sends = async {
        tokio::join!(
            fire_chats(&mut ada_out, session, "ada", EACH),
            fire_chats(&mut bob_out, session, "bob", EACH)
        )
    };
    let receives = async {
        tokio::join!(
            collect_chats(&mut ada_in, 2 * EACH, EACH),
            collect_chats(&mut bob_in, 2 * EACH, EACH)
        )
    };
    let (_, ((ada_saw, ada_acks), (bob_saw, bob_acks))) = tokio::join!(sends, receives);
    assert_eq!(
        ada_saw, bob_saw,
        "the two nodes' clients saw different orders"
    );
    assert!(
        ada_saw.windows(2).all(|w| w[0].0 < w[1].0),
        "offsets do not increase: {ada_saw:?}"
    );
    for (reference, offset) in ada_acks.iter().chain(&bob_acks) {
        assert!(
            ada_saw.contains(&(*offset, reference.clone())),
            "ack {reference} at {offset} does not match an event"
        );
    }
    // Each sender's own chats are in the order it sent them.
    for who in ["ada", "bob"] {
        let own: Vec<&String> = ada_saw
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with(who))
            .collect();
        let sent: Vec<String> = (0..EACH).map(|i| format!("{who} {i}")).collect();
        assert_eq!(
            own,
            sent.iter().collect::<Vec<_>>(),
            "{who}'s chats reordered"
        );
    }
    let events = all_events(&a.http_url(), session).await;
    assert_gap_free(&events, 1);
    let logged: Vec<(u64, String)> = events
        .iter()
        .filter(|e| e["kind"] == "chat")
        .map(|e| {
            (
                e["offset"].as_u64().unwrap_or_default(),
                e["data"]["text"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(logged, ada_saw, "the log's order is not the clients' order");

    // An edit from the relayed client is acked by the owner and reaches the owner's client; and
    // back.
    bob_out
        .send(
            json!({"type": "edit", "ref": "e1", "session": session, "doc": "main", "base": 0,
            "ops": [{"insert": "from b"}]}),
        )
        .await;
    let ack = recv_until(&mut bob_in, |f| f["ref"] == "e1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["version"], 1, "{ack}");
    let doc = recv_until(&mut ada_in, |f| f["type"] == "doc").await;
    assert_eq!(doc["version"], 1, "{doc}");
    ada_out
        .send(
            json!({"type": "edit", "ref": "e2", "session": session, "doc": "main", "base": 1,
            "ops": [{"insert": "a: "}]}),
        )
        .await;
    let doc = recv_until(&mut bob_in, |f| f["type"] == "doc").await;
    assert_eq!(doc["version"], 2, "{doc}");
    assert_eq!(doc["ops"], json!([{"insert": "a: "}]), "{doc}");

    // Presence both ways.
    bob_out
        .send(json!({"type": "presence", "session": session, "state": {"status": "typing"}}))
        .await;
    let seen = recv_until(&mut ada_in, |f| {
        f["type"] == "presence" && f["state"]["status"] == "typing"
    })
    .await;
    assert_eq!(seen["user"]["name"], "Bob", "{seen}");
    ada_out
        .send(json!({"type": "presence", "session": session, "state": {"status": "reading"}}))
        .await;
    let seen = recv_until(&mut bob_in, |f| {
        f["type"] == "presence" && f["state"]["status"] == "reading"
    })
    .await;
    assert_eq!(seen["user"]["name"], "Ada", "{seen}");

    // The relayed client goes; the owner's client sees it leave.
    drop((bob_out, bob_in));
    let left = recv_until(&mut ada_in, |f| f["kind"] == "member.left").await;
    assert_eq!(left["data"]["user"]["name"], "Bob", "{left}");
}

async fn recv_until(
    receiver: &mut common::WsReceiver,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    loop {
        let frame = receiver.recv().await;
        if pred(&frame) {
            return frame;
        }
    }
}

/// The owner of a relayed session is killed: the relay tells its client once the lease has
/// lapsed, the client joins again on its own node, which takes the session over, and every
/// acked chat, from either node, is in the log with offsets going on without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_client_resumes_on_its_own_node_after_the_owner_is_killed() {
    let db = PgDatabase::create();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let mut a = bus_process_on(&db, "node-a", &prefix).await;
    let b = bus_node_on(&db, &prefix);
    let session = "relay-failover";
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join(session, None, None).await;
    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    bob.join(session, None, None).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        for (client, who) in [(&mut ada, "ada"), (&mut bob, "bob")] {
            let text = format!("{who} {i}");
            acked.push((client.chat(session, &text).await, text));
        }
    }
    let last_seen = bob
        .recv_until(|f| f["kind"] == "chat" && f["data"]["text"] == "bob 9")
        .await["offset"]
        .as_u64()
        .expect("offset");

    a.kill_9();
    let killed = Instant::now();
    let ended = bob
        .recv_until_within(Duration::from_millis(TTL_MS * 4), |f| f["type"] == "error")
        .await;
    assert_eq!(ended["code"], "conflict", "{ended}");
    eprintln!(
        "the relay ended its client's membership {:?} after kill -9 of the owner",
        killed.elapsed()
    );
    let joined = loop {
        bob.send(json!({"type": "join", "ref": "again", "session": session, "since": last_seen}))
            .await;
        let reply = bob.recv_until(|f| f["ref"] == "again").await;
        if reply["type"] == "joined" {
            break reply;
        }
        // `conflict` while the other node holds it; `storage_unavailable` ("retry") if the
        // join reached this node's actor for the session just as it stopped after a conflict.
        assert!(
            reply["code"] == "conflict" || reply["code"] == "storage_unavailable",
            "{reply}"
        );
        assert!(
            killed.elapsed() < Duration::from_millis(TTL_MS) + Duration::from_secs(5),
            "node b never took the session over: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "node b served the session {:?} after kill -9 of its owner",
        killed.elapsed()
    );
    let resumed_at = joined["offset"].as_u64().expect("offset");
    assert!(resumed_at >= last_seen, "{joined}");
    let next = bob.chat(session, "after the failover").await;
    assert!(
        next > resumed_at,
        "offsets went back: {next} after {resumed_at}"
    );
    let events = all_events(&b.http_url(), session).await;
    assert_gap_free(&events, 1);
    for (offset, text) in &acked {
        assert!(
            events
                .iter()
                .any(|e| e["offset"] == *offset && e["data"]["text"] == text.as_str()),
            "acked chat {text:?} at {offset} was lost"
        );
    }
}

/// Redis restarts under a relayed session: the owner acks its own client's chats meanwhile;
/// once the bus is back, the relayed client gets every one of them, in order, before anything
/// later: sent back to resume from its offset, with the owner replaying them from the log, or
/// live, if none was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_a_relayed_client_gets_what_it_missed_from_the_log() {
    let mut redis = PrivateRedis::start();
    let db = PgDatabase::create();
    let a = bus_node_at(&db, &redis.url(), "restart");
    let b = bus_node_at(&db, &redis.url(), "restart");
    let session = "relay-restart";
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join(session, None, None).await;
    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    bob.join(session, None, None).await;
    let before = ada.chat(session, "before").await;
    bob.recv_until(|f| f["kind"] == "chat" && f["offset"] == before)
        .await;

    redis.stop();
    let degraded = || async {
        common::get_json(&format!("{}/readyz", b.http_url()))
            .await
            .1["bus_state"]
            == "degraded"
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !degraded().await {
        assert!(Instant::now() < deadline, "the outage was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut missed = Vec::new();
    for i in 0..5 {
        let text = format!("during {i}");
        missed.push((ada.chat(session, &text).await, text));
    }
    redis.restart();

    // Either the relay noticed the outage and ends bob's membership (he resumes from his
    // offset and the owner replays what he missed), or, when the owner's publishes waited for
    // Redis and bob's node had resubscribed by then, every chat arrives live and in order.
    let chat = |frame: &serde_json::Value| {
        (
            frame["offset"].as_u64().expect("offset"),
            frame["data"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let mut received = Vec::new();
    while received != missed {
        let frame = bob
            .recv_until_within(Duration::from_secs(20), |f| {
                f["type"] == "error" || f["kind"] == "chat"
            })
            .await;
        if frame["type"] == "error" {
            assert_eq!(frame["code"], "conflict", "{frame}");
            bob.send(json!({"type": "join", "ref": "again", "session": session, "since": before}))
                .await;
            let joined = bob
                .recv_until_within(Duration::from_secs(20), |f| f["ref"] == "again")
                .await;
            assert_eq!(joined["type"], "joined", "{joined}");
            received.clear();
            continue;
        }
        received.push(chat(&frame));
        assert!(
            missed.starts_with(&received),
            "the relayed client did not get what it missed, in order: {received:?} of {missed:?}"
        );
    }
    // Live fan-out resumed.
    let after = ada.chat(session, "after").await;
    let live = bob
        .recv_until(|f| f["kind"] == "chat" && f["data"]["text"] == "after")
        .await;
    assert_eq!(live["offset"], after, "{live}");
}

/// The text a fresh Yjs client on `addr` syncs for `path` (sync step 1 with an empty state
/// vector, then the server's step 2 applied to an empty doc).
async fn yjs_synced_text(addr: std::net::SocketAddr, path: &str) -> String {
    use futures_util::SinkExt;
    use yrs::sync::{Message as YMessage, SyncMessage};
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;
    use yrs::{GetString, Transact};
    let mut socket = common::yjs::yjs_connect(addr, path, "")
        .await
        .expect("yjs connects");
    let step1 = YMessage::Sync(SyncMessage::SyncStep1(yrs::StateVector::default())).encode_v1();
    socket
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            step1.into(),
        ))
        .await
        .expect("send step 1");
    let YMessage::Sync(SyncMessage::SyncStep2(update)) = common::yjs::yjs_until(&mut socket, |m| {
        matches!(m, YMessage::Sync(SyncMessage::SyncStep2(_)))
    })
    .await
    else {
        unreachable!("yjs_until returned another message");
    };
    let doc = yrs::Doc::with_options(yrs::Options {
        offset_kind: yrs::OffsetKind::Utf16,
        ..yrs::Options::default()
    });
    let text = doc.get_or_insert_text("content");
    doc.transact_mut()
        .apply_update(yrs::Update::decode_v1(&update).expect("step 2 decodes"))
        .expect("step 2 applies");
    text.get_string(&doc.transact())
}

/// Yjs sockets on a node that does not own the session are relayed too: an update typed on
/// node b reaches the owner's JSON client as a `doc` frame and its log, an update on the owner
/// reaches a Yjs client that syncs on node b, and both nodes' Yjs clients agree with REST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yjs_clients_on_a_relay_node_edit_the_owners_document() {
    use common::yjs::{yjs_connect, yjs_insert};
    let db = PgDatabase::create();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let a = bus_node_on(&db, &prefix);
    let b = bus_node_on(&db, &prefix);
    let session = "yjs-relay";
    let path = format!("{session}/main");
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join(session, None, None).await;

    let mut on_b = yjs_connect(b.addr, &path, "").await.expect("yjs on b");
    yjs_insert(&mut on_b, "typed on b. ").await;
    let doc = ada
        .recv_until_within(Duration::from_secs(10), |f| f["type"] == "doc")
        .await;
    assert_eq!(doc["ops"], json!([{"insert": "typed on b. "}]), "{doc}");

    let mut on_a = yjs_connect(a.addr, &path, "").await.expect("yjs on a");
    yjs_insert(&mut on_a, "typed on a.").await;
    ada.recv_until_within(Duration::from_secs(10), |f| {
        f["type"] == "doc" && f["version"] == 2
    })
    .await;

    let want = "typed on b. typed on a.";
    let (status, body) =
        common::get_json(&format!("{}/v1/sessions/{session}/docs/main", a.http_url())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["text"], want, "{body}");
    assert_eq!(yjs_synced_text(b.addr, &path).await, want);
    assert_eq!(yjs_synced_text(a.addr, &path).await, want);
}

/// A relay's node dies with a client on it: the owner stops hearing its keepalives and, within
/// about a lease TTL, drops the client, so the others see it leave instead of a ghost member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_forgets_the_clients_of_a_relay_node_that_died() {
    let db = PgDatabase::create();
    let prefix = format!("test-{}", uuid::Uuid::now_v7());
    let a = bus_node_on(&db, &prefix);
    let mut b = bus_process_on(&db, "node-b", &prefix).await;
    let session = "relay-node-dies";
    let mut ada = WsClient::connect_hello(&a.ws_url(), "Ada").await;
    ada.join(session, None, None).await;
    let mut bob = WsClient::connect_hello(&b.ws_url(), "Bob").await;
    bob.join(session, None, None).await;
    let joined = ada
        .recv_until(|f| f["kind"] == "member.joined" && f["data"]["user"]["name"] == "Bob")
        .await;
    assert_eq!(joined["type"], "event", "{joined}");

    b.kill_9();
    let killed = Instant::now();
    let left = ada
        .recv_until_within(Duration::from_millis(TTL_MS * 4), |f| {
            f["kind"] == "member.left"
        })
        .await;
    assert_eq!(left["data"]["user"]["name"], "Bob", "{left}");
    eprintln!(
        "the owner dropped the dead relay's client {:?} after kill -9",
        killed.elapsed()
    );
    drop(bob);
}
