//! Presence: relayed to every member with `conn`, `user` and `state`, listed in `joined`,
//! withdrawn with `gone` when a socket drops, and coalesced under a flood.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WsClient};
use serde_json::{Value, json};

fn is_presence_of(frame: &Value, conn: &str) -> bool {
    frame["type"] == "presence" && frame["conn"] == conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_relayed_listed_and_withdrawn() {
    let server = TestServer::sqlite();
    let session = "cursors";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let a_conn = a.conn_id();
    let a_user = a.welcome.as_ref().expect("welcome")["user"].clone();
    a.join(session, None, None).await;
    b.join(session, None, None).await;

    let state = json!({"cursor": {"doc": "main", "anchor": 3, "head": 7}, "status": "typing"});
    a.send(json!({"type": "presence", "session": session, "state": state}))
        .await;

    // B, and A itself, get the update with the connection, the user and the state.
    for (who, client) in [("bea", &mut b), ("ada", &mut a)] {
        let frame = client.recv_until(|f| is_presence_of(f, &a_conn)).await;
        assert_eq!(frame["session"], session, "{who}: {frame}");
        assert_eq!(frame["user"], a_user, "{who}: {frame}");
        assert_eq!(frame["state"], state, "{who}: {frame}");
        assert!(
            frame.get("gone").is_none_or(|g| g == false),
            "{who}: {frame}"
        );
    }

    // A later joiner finds the current presence in `joined`.
    let mut c = WsClient::connect_hello(&server.ws_url(), "cy").await;
    let joined = c.join(session, None, None).await;
    let listed = joined["presence"]
        .as_array()
        .unwrap_or_else(|| panic!("joined without a presence list: {joined}"));
    let entry = listed
        .iter()
        .find(|p| p["conn"] == a_conn.as_str())
        .unwrap_or_else(|| panic!("A's presence is not listed in joined: {joined}"));
    assert_eq!(entry["user"], a_user, "{entry}");
    assert_eq!(entry["state"], state, "{entry}");
    assert_eq!(listed.len(), 1, "only A has set presence: {joined}");
    let members = joined["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "three members are in: {joined}");

    // A's socket drops without a goodbye: the others hear that A is gone.
    drop(a);
    for (who, client) in [("bea", &mut b), ("cy", &mut c)] {
        let frame = client.recv_until(|f| is_presence_of(f, &a_conn)).await;
        assert_eq!(
            frame,
            json!({"type": "presence", "session": session, "conn": a_conn, "gone": true}),
            "{who}"
        );
    }
    // And a later joiner no longer sees it.
    let mut d = WsClient::connect_hello(&server.ws_url(), "dan").await;
    let joined = d.join(session, None, None).await;
    assert_eq!(
        joined["presence"],
        json!([]),
        "a gone connection is still listed: {joined}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_flood_is_coalesced_and_ends_on_the_last_state() {
    // The flood is deliberate; the frame rate limit is tested in limits.rs.
    let server = TestServer::sqlite_with(|c| c.limits.rate_burst = 10_000);
    let session = "flood";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let a_conn = a.conn_id();
    a.join(session, None, None).await;
    b.join(session, None, None).await;

    const UPDATES: u64 = 200;
    let started = Instant::now();
    for n in 0..UPDATES {
        a.send(json!({"type": "presence", "session": session, "state": {"n": n}}))
            .await;
    }
    let last_state = json!({"n": UPDATES - 1});

    // B counts A's broadcasts until the final state arrives.
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = b
            .try_recv(left)
            .await
            .unwrap_or_else(|| panic!("the final state never arrived; got {received:?}"));
        if is_presence_of(&frame, &a_conn) {
            let state = frame["state"].clone();
            received.push(state.clone());
            if state == last_state {
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    // Nothing more after the final state: it stays the last one B knows.
    for frame in b.drain(Duration::from_millis(300)).await {
        if is_presence_of(&frame, &a_conn) {
            assert_eq!(
                frame["state"], last_state,
                "a stale state after the final one"
            );
            received.push(frame["state"].clone());
        }
    }

    // At most one broadcast per 50 ms interval, plus the first one.
    let allowed = (elapsed.as_secs_f64() * 20.0).ceil() as usize + 2;
    assert!(
        received.len() <= allowed,
        "{} presence broadcasts in {elapsed:?}; at most {allowed} expected",
        received.len()
    );
    assert!(
        (received.len() as u64) < UPDATES / 4,
        "{} broadcasts for {UPDATES} updates: not coalesced",
        received.len()
    );
    // States only move forward.
    let ns: Vec<u64> = received
        .iter()
        .map(|s| s["n"].as_u64().expect("n"))
        .collect();
    assert!(
        ns.windows(2).all(|w| w[0] <= w[1]),
        "states went backwards: {ns:?}"
    );
    assert_eq!(received.last(), Some(&last_state));
}

/// Updates spread over time keep flowing at the coalescing rate: not one per update, and not
/// held back until the sender stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_presence_flows_at_the_coalescing_rate() {
    let server = TestServer::sqlite();
    let session = "steady";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "bea").await;
    let a_conn = a.conn_id();
    a.join(session, None, None).await;
    b.join(session, None, None).await;

    // 100 updates, one every 5 ms: about half a second.
    let sender = async {
        let started = Instant::now();
        for n in 0..100u64 {
            a.send(json!({"type": "presence", "session": session, "state": {"n": n}}))
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    };
    let receiver = async {
        let mut received = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = b
                .try_recv(left)
                .await
                .unwrap_or_else(|| panic!("the final state never arrived; got {received:?}"));
            if is_presence_of(&frame, &a_conn) {
                let n = frame["state"]["n"].as_u64().expect("n");
                received.push(n);
                if n == 99 {
                    return received;
                }
            }
        }
    };
    let (elapsed, received) = tokio::join!(sender, receiver);
    let allowed = (elapsed.as_secs_f64() * 20.0).ceil() as usize + 2;
    assert!(
        received.len() <= allowed,
        "{} broadcasts in {elapsed:?}; at most {allowed} expected: {received:?}",
        received.len()
    );
    assert!(
        received.len() >= 4,
        "only {} broadcasts over {elapsed:?}: presence is held back, not coalesced: {received:?}",
        received.len()
    );
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "states repeated or went back: {received:?}"
    );
}

#[tokio::test]
async fn presence_is_never_persisted() {
    let server = TestServer::sqlite();
    let session = "ephemeral";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    let a_conn = a.conn_id();
    a.join(session, None, None).await;
    a.recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    a.send(json!({"type": "presence", "session": session, "state": {"x": 1}}))
        .await;
    a.recv_until(|f| is_presence_of(f, &a_conn)).await;
    let log = common::all_events(&server.http_url(), session).await;
    assert!(
        log.iter()
            .all(|e| e["kind"] != "presence" && e["data"].get("state").is_none()),
        "presence reached the event log: {log:?}"
    );
    assert_eq!(
        log.len(),
        1,
        "only A's member.joined is in the log: {log:?}"
    );
}
