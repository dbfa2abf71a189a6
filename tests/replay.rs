//! Resuming from an offset: a reconnecting client gets exactly the events it missed, in order,
//! then live ones; a wrong epoch or an offset from the future gets `reset`; replay older than
//! the in-memory tail comes from the store.

mod common;

use std::time::{Duration, Instant};

use common::{Backend, TestServer, WsClient, all_events, assert_gap_free, get_json};
use serde_json::{Value, json};

/// Reads frames until an event with offset `last` has arrived; returns every event frame seen.
/// Any frame other than an event, or presence, fails the test.
async fn events_through(client: &mut WsClient, last: u64) -> Vec<Value> {
    let mut events: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.last().and_then(|e| e["offset"].as_u64()) < Some(last) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = client.try_recv(left).await.unwrap_or_else(|| {
            panic!(
                "events up to {last} did not arrive; got offsets {:?}",
                events
                    .iter()
                    .map(|e| e["offset"].clone())
                    .collect::<Vec<_>>()
            )
        });
        match frame["type"].as_str() {
            Some("event") => events.push(frame),
            Some("presence") => {}
            _ => panic!("unexpected frame while waiting for events: {frame}"),
        }
    }
    events
}

/// The fields an event frame shares with its stored record.
fn same_event(live: &Value, stored: &Value) {
    for field in ["offset", "kind", "actor", "at", "data"] {
        assert_eq!(
            live[field], stored[field],
            "{field} differs: live {live} / stored {stored}"
        );
    }
}

/// A's first visit: joins, sees its own `member.joined`, and returns (last offset, epoch).
async fn first_visit(server: &TestServer, session: &str) -> (u64, String, String) {
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let a_id = a.user_id();
    let joined = a.join(session, None, None).await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_owned();
    let own = a
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    assert_eq!(own["data"]["user"]["id"], a_id.as_str(), "{own}");
    let last = own["offset"].as_u64().expect("offset");
    assert_eq!(
        last,
        joined["offset"].as_u64().expect("offset") + 1,
        "{own}"
    );
    a.close().await;
    // Wait for A's `member.left` to be committed, so that the log stands still.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = all_events(&server.http_url(), session).await;
        if log.len() as u64 == last + 1 {
            assert_eq!(log[last as usize]["kind"], "member.left", "{log:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A's leaving was never logged: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (last, epoch, a_id)
}

async fn reconnect_gets_exactly_the_missed_events(backend: Backend) {
    let server = TestServer::start(backend, |_| {});
    let session = "replay";
    let (last, epoch, a_id) = first_visit(&server, session).await;

    // While A is away, B comes and posts.
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let b_id = b.user_id();
    b.join(session, None, None).await;
    for i in 0..20 {
        b.chat(session, &format!("missed-{i}")).await;
    }

    // A comes back with its offset and epoch.
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let joined = a.join(session, Some(last), Some(&epoch)).await;
    assert_eq!(
        joined["epoch"],
        epoch.as_str(),
        "the epoch changed: {joined}"
    );
    let upto = joined["offset"].as_u64().expect("offset");
    assert!(
        upto >= last + 22,
        "joined at {upto}, but 22 events followed {last}"
    );

    let log = all_events(&server.http_url(), session).await;
    let missed: Vec<&Value> = log
        .iter()
        .filter(|e| (last + 1..=upto).contains(&e["offset"].as_u64().expect("offset")))
        .collect();
    let replayed = events_through(&mut a, upto).await;
    assert_eq!(replayed.len(), missed.len(), "replayed {replayed:?}");
    assert_gap_free(&replayed, last + 1);
    for (live, stored) in replayed.iter().zip(&missed) {
        assert_eq!(live["session"], session, "{live}");
        same_event(live, stored);
    }
    // Every kind of event is replayed, membership included.
    assert!(
        replayed
            .iter()
            .any(|e| e["kind"] == "member.left" && e["data"]["user"]["id"] == a_id.as_str()),
        "A's member.left was not replayed: {replayed:?}"
    );
    assert!(
        replayed
            .iter()
            .any(|e| e["kind"] == "member.joined" && e["data"]["user"]["id"] == b_id.as_str()),
        "B's member.joined was not replayed: {replayed:?}"
    );
    let texts: Vec<&str> = replayed
        .iter()
        .filter(|e| e["kind"] == "chat")
        .map(|e| e["data"]["text"].as_str().expect("text"))
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("missed-{i}")).collect();
    assert_eq!(texts, want, "the missed chats, in order");

    // Then live events follow on, with no gap.
    let offset = b.chat(session, "live-after-replay").await;
    let live = events_through(&mut a, offset).await;
    assert_gap_free(&live, upto + 1);
    let last_live = live.last().expect("a live event");
    assert_eq!(
        last_live["data"]["text"], "live-after-replay",
        "{last_live}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_gets_exactly_the_missed_events_sqlite() {
    reconnect_gets_exactly_the_missed_events(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_gets_exactly_the_missed_events_postgres() {
    reconnect_gets_exactly_the_missed_events(Backend::Postgres).await;
}

/// After `joined`, a `reset` and no replay; only live events after the snapshot follow.
async fn expect_reset(client: &mut WsClient, session: &str, since: u64, epoch: &str) {
    let joined = client.join(session, Some(since), Some(epoch)).await;
    let upto = joined["offset"].as_u64().expect("offset");
    let reset = client.recv().await;
    assert_eq!(
        reset,
        json!({"type": "reset", "session": session}),
        "since={since} epoch={epoch:?}: expected reset right after joined"
    );
    for frame in client.drain(Duration::from_millis(300)).await {
        if frame["type"] == "event" {
            assert!(
                frame["offset"].as_u64().expect("offset") > upto,
                "an event from before the snapshot was replayed after reset: {frame}"
            );
        }
    }
}

#[tokio::test]
async fn a_wrong_epoch_gets_reset() {
    let server = TestServer::sqlite();
    let session = "wrong-epoch";
    let (last, epoch, _) = first_visit(&server, session).await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    b.join(session, None, None).await;
    b.chat(session, "one").await;

    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let other = format!("{epoch}-other");
    expect_reset(&mut a, session, last, &other).await;
}

#[tokio::test]
async fn an_offset_beyond_the_log_gets_reset() {
    let server = TestServer::sqlite();
    let session = "future";
    let (_, epoch, _) = first_visit(&server, session).await;
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let current = all_events(&server.http_url(), session).await.len() as u64;
    expect_reset(&mut a, session, current + 100, &epoch).await;
}

#[tokio::test]
async fn since_at_the_head_replays_nothing_and_without_since_only_live_follows() {
    let server = TestServer::sqlite();
    let session = "head";
    let (_, epoch, _) = first_visit(&server, session).await;
    let head = all_events(&server.http_url(), session).await.len() as u64;

    // since = the current offset: no reset, nothing replayed; the next event is live.
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let joined = a.join(session, Some(head), Some(&epoch)).await;
    let upto = joined["offset"].as_u64().expect("offset");
    assert_eq!(upto, head, "{joined}");
    let next = a.recv().await;
    assert_eq!(next["type"], "event", "expected only live events: {next}");
    assert_eq!(next["offset"].as_u64(), Some(head + 1), "{next}");

    // No since: nothing from before the join, even though the log is not empty.
    let mut c = WsClient::connect_hello(&server.ws_url(), "cy").await;
    let joined = c.join(session, None, None).await;
    let upto = joined["offset"].as_u64().expect("offset");
    assert!(upto > 0);
    let next = c.recv().await;
    assert_eq!(next["type"], "event", "{next}");
    assert_eq!(
        next["offset"].as_u64(),
        Some(upto + 1),
        "no since, yet old events came: {next}"
    );
}

/// With a tail of 8 events, a replay from offset 1 of a 50-event log must come from the store,
/// and must still be exact while new events keep arriving during it.
async fn replay_beyond_the_tail(backend: Backend) {
    let server = TestServer::start(backend, |config| config.limits.event_tail = 8);
    let session = "deep-replay";
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let joined = b.join(session, None, None).await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_owned();
    for i in 0..50 {
        b.chat(session, &format!("old-{i}")).await;
    }

    // A joins from offset 1 while B keeps posting.
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    a.send(json!({"type": "join", "ref": "deep", "session": session, "since": 1, "epoch": epoch}))
        .await;
    for i in 0..30 {
        let text = format!("during-{i}");
        b.send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
            .await;
    }
    let mut acked = 0;
    while acked < 30 {
        let frame = b.recv().await;
        if frame["type"] == "ack" {
            acked += 1;
        } else {
            assert_eq!(frame["type"], "event", "{frame}");
        }
    }

    let joined = a.recv().await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["ref"], "deep", "{joined}");
    let log = all_events(&server.http_url(), session).await;
    let head = log.last().expect("events")["offset"]
        .as_u64()
        .expect("offset");
    assert!(
        head >= 81,
        "the log should hold 81 events or more, has {head}"
    );
    let seen = events_through(&mut a, head).await;
    assert_gap_free(&seen, 2);
    for event in &seen {
        let offset = event["offset"].as_u64().expect("offset");
        same_event(event, &log[(offset - 1) as usize]);
    }
    let chats: Vec<&str> = seen
        .iter()
        .filter(|e| e["kind"] == "chat")
        .map(|e| e["data"]["text"].as_str().expect("text"))
        .collect();
    let want: Vec<String> = (0..50)
        .map(|i| format!("old-{i}"))
        .chain((0..30).map(|i| format!("during-{i}")))
        .collect();
    assert_eq!(chats, want, "replayed and live chats, in order, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_older_than_the_tail_comes_from_the_store_sqlite() {
    replay_beyond_the_tail(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_older_than_the_tail_comes_from_the_store_postgres() {
    replay_beyond_the_tail(Backend::Postgres).await;
}

/// A session that passivated (idle, no subscribers) reloads from the store with the same epoch
/// and offset, and replays exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_after_passivation_is_exact() {
    let server = TestServer::sqlite_with(|config| config.limits.idle_timeout_s = 1);
    let session = "passivate";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let joined = a.join(session, None, None).await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_owned();
    for i in 0..5 {
        a.chat(session, &format!("before-{i}")).await;
    }
    a.close().await;

    // Wait until the session has no live owner: it passivated.
    let url = format!("{}/v1/sessions/{session}", server.http_url());
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let (status, body) = get_json(&url).await;
        assert_eq!(status, 200, "{body}");
        if body["owner"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the idle session never passivated: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let log = all_events(&server.http_url(), session).await;
    let head = log.len() as u64;
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let joined = a.join(session, Some(2), Some(&epoch)).await;
    assert_eq!(
        joined["epoch"],
        epoch.as_str(),
        "the epoch changed on reload: {joined}"
    );
    assert_eq!(joined["offset"].as_u64(), Some(head), "{joined}");
    let seen = events_through(&mut a, head).await;
    assert_gap_free(&seen, 3);
    for event in &seen {
        let offset = event["offset"].as_u64().expect("offset");
        same_event(event, &log[(offset - 1) as usize]);
    }
    // The reloaded session goes on from its last offset.
    let next = a.chat(session, "after").await;
    assert!(
        next > head,
        "offset {next} reused after reload (head {head})"
    );
}
