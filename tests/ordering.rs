//! Event ordering over real sockets: every member sees one order, offsets are gap-free and
//! strictly increasing, and each ack names the offset of its own event.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Backend, TestServer, WsClient, all_events, assert_gap_free};
use serde_json::{Value, json};

/// Chats each client sends.
const PER_CLIENT: usize = 150;

/// What one client saw: every event frame in arrival order, and its acks by chat text.
struct Seen {
    joined_offset: u64,
    events: Vec<Value>,
    acks: HashMap<String, u64>,
    /// The order in which this client's acks arrived, by text.
    ack_order: Vec<String>,
}

/// Sends `PER_CLIENT` chats as fast as possible while reading, until the client has its own
/// acks and `expected_chats` chat events.
async fn chatter(
    client: WsClient,
    joined_offset: u64,
    tag: &'static str,
    session: &str,
    expected_chats: usize,
) -> Seen {
    let (mut tx, mut rx) = client.split();
    let send = async {
        for i in 0..PER_CLIENT {
            let text = format!("{tag}-{i}");
            tx.send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
                .await;
        }
    };
    let receive = async {
        let mut seen = Seen {
            joined_offset,
            events: Vec::new(),
            acks: HashMap::new(),
            ack_order: Vec::new(),
        };
        let mut chats = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while chats < expected_chats || seen.acks.len() < PER_CLIENT {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = match rx.next_frame(left).await {
                Ok(Some(frame)) => frame,
                Ok(None) => panic!(
                    "{tag}: timed out with {chats}/{expected_chats} chat events and {}/{PER_CLIENT} acks",
                    seen.acks.len()
                ),
                Err(err) => panic!("{tag}: socket ended: {err}"),
            };
            match frame["type"].as_str() {
                Some("ack") => {
                    let reference = frame["ref"].as_str().expect("ack ref").to_owned();
                    assert!(
                        reference.starts_with(tag),
                        "{tag} got someone else's ack: {frame}"
                    );
                    let offset = frame["offset"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("chat ack without offset: {frame}"));
                    assert!(
                        seen.acks.insert(reference.clone(), offset).is_none(),
                        "{tag}: two acks for {reference}"
                    );
                    seen.ack_order.push(reference);
                }
                Some("event") => {
                    assert_eq!(
                        frame["session"], session,
                        "event of another session: {frame}"
                    );
                    if frame["kind"] == "chat" {
                        chats += 1;
                    }
                    seen.events.push(frame);
                }
                Some("presence") => {}
                _ => panic!("{tag}: unexpected frame {frame}"),
            }
        }
        seen
    };
    let ((), seen) = tokio::join!(send, receive);
    seen
}

fn check_event_shape(event: &Value) {
    assert!(event["offset"].is_u64(), "event without offset: {event}");
    assert!(event["kind"].is_string(), "event without kind: {event}");
    assert!(
        event["actor"]["id"].is_string(),
        "event without actor.id: {event}"
    );
    assert!(
        event["actor"]["name"].is_string(),
        "event without actor.name: {event}"
    );
    let at = event["at"]
        .as_str()
        .unwrap_or_else(|| panic!("event without at: {event}"));
    let parsed = chrono::DateTime::parse_from_rfc3339(at)
        .unwrap_or_else(|e| panic!("event time {at:?} is not RFC 3339: {e}"));
    assert_eq!(
        parsed.offset().local_minus_utc(),
        0,
        "event time {at} is not UTC"
    );
    assert!(
        event["data"].is_object(),
        "event data is not an object: {event}"
    );
}

async fn two_clients_see_one_order(backend: Backend) {
    let server = TestServer::start(backend, |_| {});
    let session = "ordering";
    let mut alice = WsClient::connect_hello(&server.ws_url(), "alice").await;
    let mut bob = WsClient::connect_hello(&server.ws_url(), "bob").await;
    let alice_id = alice.user_id();
    let bob_id = bob.user_id();
    let joined_a = alice.join(session, None, None).await["offset"]
        .as_u64()
        .expect("offset");
    let joined_b = bob.join(session, None, None).await["offset"]
        .as_u64()
        .expect("offset");

    let (a, b) = tokio::join!(
        chatter(alice, joined_a, "a", session, 2 * PER_CLIENT),
        chatter(bob, joined_b, "b", session, 2 * PER_CLIENT),
    );

    for (tag, seen) in [("alice", &a), ("bob", &b)] {
        // Every event after `joined`, live, with no gap or repeat.
        assert_gap_free(&seen.events, seen.joined_offset + 1);
        for event in &seen.events {
            check_event_shape(event);
        }
        // Each ack names the offset of the event carrying that very chat.
        for (text, offset) in &seen.acks {
            let event = seen
                .events
                .iter()
                .find(|e| e["kind"] == "chat" && e["data"]["text"] == text.as_str())
                .unwrap_or_else(|| panic!("{tag}: no event for acked chat {text}"));
            assert_eq!(
                event["offset"].as_u64(),
                Some(*offset),
                "{tag}: ack of {text} says {offset}, its event says {}",
                event["offset"]
            );
        }
        // Every chat of both clients arrived exactly once.
        let texts: Vec<&str> = seen
            .events
            .iter()
            .filter(|e| e["kind"] == "chat")
            .map(|e| e["data"]["text"].as_str().expect("chat text"))
            .collect();
        let unique: HashSet<&str> = texts.iter().copied().collect();
        assert_eq!(texts.len(), 2 * PER_CLIENT, "{tag}: chat count");
        assert_eq!(unique.len(), 2 * PER_CLIENT, "{tag}: a chat arrived twice");
    }

    // One order for everyone: the chat events are identical, offset for offset.
    let chats = |seen: &Seen| -> Vec<(u64, String, String)> {
        seen.events
            .iter()
            .filter(|e| e["kind"] == "chat")
            .map(|e| {
                (
                    e["offset"].as_u64().expect("offset"),
                    e["data"]["text"].as_str().expect("text").to_owned(),
                    e["actor"]["id"].as_str().expect("actor").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        chats(&a),
        chats(&b),
        "alice and bob saw different chat orders"
    );

    // The actor of a chat is its sender.
    for (offset, text, actor) in chats(&a) {
        let want = if text.starts_with("a-") {
            &alice_id
        } else {
            &bob_id
        };
        assert_eq!(&actor, want, "chat {text} at {offset} has the wrong actor");
    }

    // One sender's chats keep the order in which they were sent, and so do its acks.
    for (tag, seen) in [("a", &a), ("b", &b)] {
        let mut last = 0;
        for i in 0..PER_CLIENT {
            let offset = seen.acks[&format!("{tag}-{i}")];
            assert!(
                offset > last,
                "{tag}-{i} committed at {offset}, before an earlier chat ({last})"
            );
            last = offset;
        }
        let sent: Vec<String> = (0..PER_CLIENT).map(|i| format!("{tag}-{i}")).collect();
        assert_eq!(seen.ack_order, sent, "{tag}: acks arrived out of order");
    }

    // Alice, who joined first, saw bob's arrival as a `member.joined` event.
    let bob_joined = a
        .events
        .iter()
        .find(|e| e["kind"] == "member.joined" && e["data"]["user"]["id"] == bob_id.as_str())
        .unwrap_or_else(|| panic!("alice never saw bob's member.joined: {:?}", &a.events[..3]));
    assert_eq!(bob_joined["data"]["user"]["name"], "bob", "{bob_joined}");
    assert_eq!(bob_joined["actor"]["id"], bob_id.as_str(), "{bob_joined}");

    // The durable log is what the members saw, and it holds both arrivals.
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
    for kind_user in [&alice_id, &bob_id] {
        assert!(
            log.iter()
                .any(|e| e["kind"] == "member.joined"
                    && e["data"]["user"]["id"] == kind_user.as_str()),
            "the log has no member.joined for {kind_user}"
        );
    }
    for seen in [&a, &b] {
        for event in &seen.events {
            let offset = event["offset"].as_u64().expect("offset");
            let stored = &log[(offset - 1) as usize];
            for field in ["offset", "kind", "actor", "at", "data"] {
                assert_eq!(
                    stored[field], event[field],
                    "the log and the broadcast differ at offset {offset} in {field}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_see_one_gap_free_order_sqlite() {
    two_clients_see_one_order(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_see_one_gap_free_order_postgres() {
    two_clients_see_one_order(Backend::Postgres).await;
}

/// A client in two sessions gets each session's events, gap-free per session; a client in one
/// session never sees the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_isolated_and_each_is_gap_free() {
    let server = TestServer::sqlite();
    let mut both = WsClient::connect_hello(&server.ws_url(), "both").await;
    let mut only_x = WsClient::connect_hello(&server.ws_url(), "only-x").await;
    let x0 = both.join("iso-x", None, None).await["offset"]
        .as_u64()
        .expect("offset");
    let y0 = both.join("iso-y", None, None).await["offset"]
        .as_u64()
        .expect("offset");
    only_x.join("iso-x", None, None).await;

    for i in 0..20 {
        for session in ["iso-x", "iso-y"] {
            let text = format!("{session}-{i}");
            both.send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
                .await;
        }
    }
    let mut per_session: HashMap<String, Vec<Value>> = HashMap::new();
    let mut acks = 0;
    while acks < 40
        || per_session
            .values()
            .map(|v| v.iter().filter(|e| e["kind"] == "chat").count())
            .sum::<usize>()
            < 40
    {
        let frame = both.recv().await;
        match frame["type"].as_str() {
            Some("ack") => acks += 1,
            Some("event") => per_session
                .entry(frame["session"].as_str().expect("session").to_owned())
                .or_default()
                .push(frame),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_gap_free(&per_session["iso-x"], x0 + 1);
    assert_gap_free(&per_session["iso-y"], y0 + 1);
    for (session, events) in &per_session {
        for event in events.iter().filter(|e| e["kind"] == "chat") {
            let text = event["data"]["text"].as_str().expect("text");
            assert!(
                text.starts_with(session.as_str()),
                "{text} delivered as an event of {session}"
            );
        }
    }

    // The client in iso-x only: the 20 iso-x chats, nothing from iso-y.
    let mut x_chats = 0;
    while x_chats < 20 {
        let frame = only_x.recv().await;
        if frame["type"] == "event" {
            assert_eq!(frame["session"], "iso-x", "a foreign event leaked: {frame}");
            if frame["kind"] == "chat" {
                x_chats += 1;
            }
        }
    }
    let extra = only_x.drain(Duration::from_millis(300)).await;
    assert!(
        extra.iter().all(|f| f["session"] != "iso-y"),
        "iso-y frames reached a client not in iso-y: {extra:?}"
    );
}
