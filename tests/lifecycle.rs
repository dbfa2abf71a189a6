//! Session lifecycle: a session with subscribers never passivates, a session never unloads
//! while a write is pending, and a client may pipeline a chat right behind its join.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WsClient, all_events, assert_gap_free, get_json, post_json};
use serde_json::json;

async fn owner(server: &TestServer, session: &str) -> serde_json::Value {
    let (status, body) = get_json(&format!("{}/v1/sessions/{session}", server.http_url())).await;
    assert_eq!(status, 200, "{body}");
    body["owner"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_a_subscriber_stays_live_past_the_idle_timeout() {
    let server = TestServer::sqlite_with(|config| config.limits.idle_timeout_s = 1);
    let session = "kept";
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    a.join(session, None, None).await;
    let first = a.chat(session, "one").await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        owner(&server, session).await,
        server.node_id.as_str(),
        "a session with a subscriber passivated"
    );
    let second = a.chat(session, "two").await;
    assert_eq!(second, first + 1);
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
}

/// A write waits in its batch (a long commit window) longer than the idle timeout; the
/// session must not unload under it, and the write must commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_never_unloads_with_a_write_pending() {
    let server = TestServer::sqlite_with(|config| {
        config.limits.idle_timeout_s = 1;
        config.limits.commit_window_ms = 2500;
    });
    let base = server.http_url();
    let session = "pending";
    let (status, body) = post_json(&format!("{base}/v1/sessions"), &json!({"id": session})).await;
    assert_eq!(status, 201, "{body}");
    let started = Instant::now();
    let (status, body) = post_json(
        &format!("{base}/v1/sessions/{session}/messages"),
        &json!({"text": "slow commit"}),
    )
    .await;
    assert_eq!(status, 200, "the pending write was dropped: {body}");
    assert_eq!(body["offset"], 1, "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(2000),
        "the commit window was not honoured ({:?}); the test proves nothing",
        started.elapsed()
    );
    let log = all_events(&base, session).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["data"]["text"], "slow commit");
}

#[tokio::test]
async fn a_chat_pipelined_behind_its_join_lands() {
    let server = TestServer::sqlite();
    let mut a = WsClient::connect_hello(&server.ws_url(), "ada").await;
    a.send(json!({"type": "join", "ref": "j", "session": "eager"}))
        .await;
    a.send(json!({"type": "chat", "ref": "c", "session": "eager", "text": "right away"}))
        .await;
    let joined = a.recv().await;
    assert_eq!(joined["type"], "joined", "{joined}");
    assert_eq!(joined["ref"], "j", "{joined}");
    let ack = a.recv_until(|f| f["ref"] == "c").await;
    assert_eq!(ack["type"], "ack", "a chat right behind its join: {ack}");
    assert_eq!(ack["offset"], 2, "after the member.joined: {ack}");
}
