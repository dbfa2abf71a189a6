//! A store that fails: a failed commit is refused with `storage_unavailable` and never acked,
//! leaves no gap and no trace in the log; an outage makes the node unready and refuses writes,
//! and service comes back with the store.

mod common;

use std::time::Duration;

use common::{
    Backend, TestServer, WsClient, all_events, assert_error_body, assert_gap_free, get_json,
    post_json,
};
use serde_json::{Value, json};

/// Sends a chat and returns the reply to it (an ack or an error), checking on the way that no
/// event carrying `text` arrives before the reply. Other frames are returned too.
async fn chat_reply(client: &mut WsClient, session: &str, text: &str) -> (Value, Vec<Value>) {
    client
        .send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
        .await;
    let mut others = Vec::new();
    loop {
        let frame = client.recv().await;
        if frame["ref"] == text {
            return (frame, others);
        }
        others.push(frame);
    }
}

/// Joins and waits for the client's own `member.joined` to be committed, so that later commit
/// failures hit the chats and nothing else.
async fn settled_member(server: &TestServer, session: &str) -> WsClient {
    let mut client = WsClient::connect_hello(&server.ws_url(), "ada").await;
    client.join(session, None, None).await;
    client
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    client
}

fn chat_texts(log: &[Value]) -> Vec<&str> {
    log.iter()
        .filter(|e| e["kind"] == "chat")
        .map(|e| e["data"]["text"].as_str().expect("text"))
        .collect()
}

async fn a_failed_commit_acks_nothing_and_leaves_no_gap(backend: Backend) {
    let server = TestServer::start(backend, |_| {});
    let session = "flaky";
    let mut client = settled_member(&server, session).await;
    let mut watcher = settled_member(&server, session).await;

    let first = client.chat(session, "first").await;

    server.switch.fail_next_commits(1);
    let (reply, _) = chat_reply(&mut client, session, "lost").await;
    assert_eq!(
        reply["type"], "error",
        "a failed commit was answered with {reply}"
    );
    assert_eq!(reply["code"], "storage_unavailable", "{reply}");
    assert!(reply.get("offset").is_none(), "{reply}");

    // The next chat takes the very next offset: the failure left no gap.
    let (reply, before) = chat_reply(&mut client, session, "second").await;
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(
        reply["offset"].as_u64(),
        Some(first + 1),
        "a gap after the failed commit"
    );
    for frame in &before {
        assert_ne!(
            frame["data"]["text"], "lost",
            "the failed chat was broadcast: {frame}"
        );
    }

    // Nobody ever saw the failed chat, and the log does not have it.
    let seen = watcher.drain(Duration::from_millis(300)).await;
    assert!(
        seen.iter().all(|f| f["data"]["text"] != "lost"),
        "another member saw the failed chat: {seen:?}"
    );
    let texts: Vec<&str> = seen
        .iter()
        .filter(|f| f["type"] == "event" && f["kind"] == "chat")
        .map(|f| f["data"]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, ["first", "second"], "what the other member saw");
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
    assert_eq!(chat_texts(&log), ["first", "second"], "the durable log");

    // Several failures in a row, then recovery: still gap-free.
    server.switch.fail_next_commits(3);
    for i in 0..3 {
        let (reply, _) = chat_reply(&mut client, session, &format!("lost-{i}")).await;
        assert_eq!(reply["code"], "storage_unavailable", "{reply}");
    }
    let third = client.chat(session, "third").await;
    assert_eq!(third, first + 2);
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
    assert_eq!(chat_texts(&log), ["first", "second", "third"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_acks_nothing_and_leaves_no_gap_sqlite() {
    a_failed_commit_acks_nothing_and_leaves_no_gap(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_acks_nothing_and_leaves_no_gap_postgres() {
    a_failed_commit_acks_nothing_and_leaves_no_gap(Backend::Postgres).await;
}

/// Every chat of a batch that fails to commit is refused, not only the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_of_a_failed_batch_is_refused() {
    let server = TestServer::sqlite_with(|config| config.limits.commit_window_ms = 50);
    let session = "batch";
    let mut client = settled_member(&server, session).await;
    let head = client.chat(session, "before").await;

    server.switch.fail_next_commits(1);
    for i in 0..10 {
        let text = format!("doomed-{i}");
        client
            .send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
            .await;
    }
    let mut refused = 0;
    let mut acked = Vec::new();
    while refused + acked.len() < 10 {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("error") => {
                assert_eq!(frame["code"], "storage_unavailable", "{frame}");
                refused += 1;
            }
            Some("ack") => acked.push(frame["offset"].as_u64().expect("offset")),
            _ => {}
        }
    }
    assert!(refused >= 1, "no chat was refused");
    // Whatever was acked came after the failure and is in the log, gap-free.
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
    for offset in &acked {
        assert!(
            *offset > head && *offset <= log.len() as u64,
            "acked {offset}, log {log:?}"
        );
    }
    assert_eq!(
        log.len() as u64,
        head + acked.len() as u64,
        "refused chats reached the log"
    );
}

#[tokio::test]
async fn rest_posts_under_a_failing_commit_get_503() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let messages = format!("{base}/v1/sessions/rest-flaky/messages");
    let (status, body) = post_json(
        &format!("{base}/v1/sessions"),
        &json!({"id": "rest-flaky", "title": "t"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_json(&messages, &json!({"text": "one"})).await;
    assert_eq!(status, 200, "{body}");
    let one = body["offset"].as_u64().expect("offset");

    server.switch.fail_next_commits(1);
    let (status, body) = post_json(&messages, &json!({"text": "refused"})).await;
    assert_eq!(status, 503, "{body}");
    assert_error_body(&body, "storage_unavailable");

    let (status, body) = post_json(&messages, &json!({"text": "two"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["offset"].as_u64(),
        Some(one + 1),
        "a gap after the refused post"
    );
    let log = all_events(&base, "rest-flaky").await;
    assert_gap_free(&log, 1);
    assert_eq!(chat_texts(&log), ["one", "two"]);
}

#[tokio::test]
async fn an_outage_makes_the_node_unready_and_refuses_writes_until_it_ends() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = "outage";
    let mut client = settled_member(&server, session).await;
    let before = client.chat(session, "before").await;

    let (status, body) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");

    server.switch.set_outage(true);
    let (status, body) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(status, 503, "readyz during an outage: {body}");
    let (status, body) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(status, 200, "the process is alive during an outage: {body}");
    for i in 0..3 {
        let (reply, _) = chat_reply(&mut client, session, &format!("down-{i}")).await;
        assert_eq!(
            reply["type"], "error",
            "a write was accepted during an outage: {reply}"
        );
        assert_eq!(reply["code"], "storage_unavailable", "{reply}");
    }
    let (status, body) = post_json(
        &format!("{base}/v1/sessions/{session}/messages"),
        &json!({"text": "down"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_error_body(&body, "storage_unavailable");
    // The socket itself still serves.
    client.ping_pong().await;

    server.switch.set_outage(false);
    let (status, body) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "readyz after the outage: {body}");
    let after = client.chat(session, "after").await;
    assert_eq!(after, before + 1, "offsets moved during the outage");
    let log = all_events(&base, session).await;
    assert_gap_free(&log, 1);
    assert_eq!(chat_texts(&log), ["before", "after"]);
}
