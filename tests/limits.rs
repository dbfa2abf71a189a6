//! Every configurable limit, crossed: the frame rate (`rate_limited`, then 1008), sessions per
//! connection, members per session, document size and live sessions per node. Frame size is in
//! `bad_input.rs`, slow consumers in `slow_consumer.rs`.

mod common;

use std::time::Duration;

use common::{Ending, TestServer, WsClient};
use serde_json::json;

#[tokio::test]
async fn a_flood_is_rate_limited_then_closed_with_1008() {
    let server = TestServer::sqlite_with(|c| {
        c.limits.rate_per_s = 5;
        c.limits.rate_burst = 20;
        c.limits.rate_abuse_strikes = 30;
    });
    let mut client = WsClient::connect_hello(&server.ws_url(), "flood").await;
    // hello took one token: 19 more pass, then frames are refused, each with its ref.
    for i in 0..25 {
        client
            .send(json!({"type": "ping", "ref": format!("p{i}")}))
            .await;
    }
    let mut pongs = 0;
    let mut limited = Vec::new();
    for _ in 0..25 {
        let frame = client.recv().await;
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                limited.push(frame["ref"].as_str().unwrap_or("").to_owned());
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    // 19 from the burst, plus at most a token or two refilled while sending on a slow machine.
    assert!(
        (19..=21).contains(&pongs),
        "the burst was not honoured: {pongs} pongs"
    );
    assert_eq!(limited.len(), 25 - pongs);
    assert!(
        limited.iter().all(|r| r.starts_with('p')),
        "refs lost: {limited:?}"
    );
    // A pause refills the bucket: the socket is still usable.
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.ping_pong().await;
    // Sustained abuse closes the socket with 1008.
    for i in 0..60 {
        if client
            .try_send_text(&json!({"type": "ping", "ref": format!("q{i}")}).to_string())
            .await
            .is_err()
        {
            break;
        }
    }
    let (ending, _) = client.wait_end(Duration::from_secs(5)).await;
    assert!(
        matches!(ending, Ending::Closed(Some(1008))),
        "expected 1008, got {ending:?}"
    );
    // The node is fine.
    let (status, _) = common::get_json(&format!("{}/healthz", server.http_url())).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn sessions_per_connection_are_capped() {
    let server = TestServer::sqlite_with(|c| c.limits.max_sessions_per_conn = 3);
    let mut client = WsClient::connect_hello(&server.ws_url(), "many").await;
    for s in ["s1", "s2", "s3"] {
        client.join(s, None, None).await;
    }
    client
        .send(json!({"type": "join", "ref": "four", "session": "s4"}))
        .await;
    let reply = client.recv_until(|f| f["ref"] == "four").await;
    assert_eq!(reply["code"], "too_large", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or("")
            .contains("at most 3"),
        "{reply}"
    );
    // Leaving one makes room; re-joining a joined session does not count twice.
    client
        .send(json!({"type": "leave", "ref": "bye", "session": "s1"}))
        .await;
    let ack = client.recv_until(|f| f["ref"] == "bye").await;
    assert_eq!(ack["type"], "ack");
    client.join("s4", None, None).await;
    client.join("s4", None, None).await;
}

#[tokio::test]
async fn members_per_session_are_capped() {
    let server = TestServer::sqlite_with(|c| c.limits.max_members = 2);
    let mut a = WsClient::connect_hello(&server.ws_url(), "a").await;
    let mut b = WsClient::connect_hello(&server.ws_url(), "b").await;
    a.join("room", None, None).await;
    b.join("room", None, None).await;
    let mut c = WsClient::connect_hello(&server.ws_url(), "c").await;
    c.send(json!({"type": "join", "ref": "c", "session": "room"}))
        .await;
    let reply = c.recv_until(|f| f["ref"] == "c").await;
    assert_eq!(reply["code"], "too_large", "{reply}");
    assert!(
        reply["message"].as_str().unwrap_or("").contains("full"),
        "{reply}"
    );
    // Once someone leaves, there is room again.
    drop(b);
    let mut joined = false;
    for _ in 0..20 {
        c.send(json!({"type": "join", "ref": "c2", "session": "room"}))
            .await;
        let reply = c.recv_until(|f| f["ref"] == "c2").await;
        if reply["type"] == "joined" {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(joined, "no room after a member left");
}

#[tokio::test]
async fn documents_are_capped_in_size() {
    let server = TestServer::sqlite_with(|c| c.limits.max_doc_units = 100);
    let base = server.http_url();
    let http = common::http();
    http.post(format!("{base}/v1/sessions"))
        .json(&json!({"id": "big"}))
        .send()
        .await
        .expect("create");
    let edit = |base_version: u64, text: String| {
        http.post(format!("{base}/v1/sessions/big/docs/main/edits"))
            .json(&json!({"base": base_version, "ops": [{"insert": text}]}))
            .send()
    };
    let full = edit(0, "x".repeat(100)).await.expect("edit");
    assert_eq!(
        full.status().as_u16(),
        200,
        "an edit up to the limit was refused"
    );
    let over = edit(1, "y".to_owned()).await.expect("edit");
    assert_eq!(over.status().as_u16(), 413);
    common::assert_error_body(&over.json().await.expect("json"), "too_large");
    let (_, doc) = common::get_json(&format!("{base}/v1/sessions/big/docs/main")).await;
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["text"].as_str().map(str::len), Some(100));
}

#[tokio::test]
async fn live_sessions_per_node_are_capped() {
    let server = TestServer::sqlite_with(|c| c.limits.max_live_sessions = 3);
    let mut client = WsClient::connect_hello(&server.ws_url(), "busy").await;
    for s in ["l1", "l2", "l3"] {
        client.join(s, None, None).await;
    }
    client
        .send(json!({"type": "join", "ref": "l4", "session": "l4"}))
        .await;
    let reply = client.recv_until(|f| f["ref"] == "l4").await;
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or("")
            .contains("maximum of 3"),
        "{reply}"
    );
    let http = common::http();
    http.post(format!("{}/v1/sessions", server.http_url()))
        .json(&json!({"id": "l5"}))
        .send()
        .await
        .expect("create");
    let response = http
        .post(format!("{}/v1/sessions/l5/messages", server.http_url()))
        .json(&json!({"text": "hi"}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status().as_u16(), 429);
    // Sessions already live keep working.
    client.chat("l1", "still here").await;
}
