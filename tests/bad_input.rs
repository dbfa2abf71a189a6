//! Bad input over a real socket: every malformed or misplaced frame gets an `error` frame with
//! the right code and the request's `ref`, the socket keeps working, oversized frames get
//! `too_large` and repeated ones close the socket with 1009, and the node stays up.

mod common;

use std::time::Duration;

use common::{Ending, TestServer, WsClient, get_json};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const MAX_FRAME: usize = 4096;

fn small_frames() -> TestServer {
    TestServer::sqlite_with(|config| config.limits.max_frame_bytes = MAX_FRAME)
}

/// Reads the reply to a bad frame and checks it is an error with `code` and `reference`.
async fn expect_error(client: &mut WsClient, what: &str, code: &str, reference: Option<&str>) {
    let frame = client.recv().await;
    assert_eq!(
        frame["type"], "error",
        "{what}: expected an error, got {frame}"
    );
    assert_eq!(frame["code"], code, "{what}: {frame}");
    match reference {
        Some(reference) => assert_eq!(frame["ref"], reference, "{what}: ref not echoed: {frame}"),
        None => assert!(
            frame.get("ref").is_none(),
            "{what}: unexpected ref: {frame}"
        ),
    }
    assert!(
        frame["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error without a message: {frame}"
    );
}

async fn assert_healthy(server: &TestServer) {
    let (status, body) = get_json(&format!("{}/healthz", server.http_url())).await;
    assert_eq!(status, 200, "healthz after bad input: {body}");
}

#[tokio::test]
async fn frames_before_hello_are_unauthorized() {
    let server = small_frames();
    let mut client = WsClient::connect(&server.ws_url()).await;
    for (what, frame) in [
        ("ping before hello", json!({"type": "ping", "ref": "p0"})),
        (
            "join before hello",
            json!({"type": "join", "ref": "j0", "session": "s"}),
        ),
        (
            "chat before hello",
            json!({"type": "chat", "ref": "c0", "session": "s", "text": "hi"}),
        ),
    ] {
        client.send(frame.clone()).await;
        let reference = frame["ref"].as_str();
        expect_error(&mut client, what, "unauthorized", reference).await;
    }
    // The socket still works: hello, then ping.
    client.hello("late").await;
    client.ping_pong().await;
    assert_healthy(&server).await;
}

#[tokio::test]
async fn malformed_and_misplaced_frames_get_bad_request_and_the_socket_lives_on() {
    let server = small_frames();
    let mut client = WsClient::connect_hello(&server.ws_url(), "mallory").await;
    client.join("joined-one", None, None).await;
    // Skip this client's own member.joined so that replies come next.
    client
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;

    let cases: &[(&str, &str, Option<&str>)] = &[
        ("non-JSON text", "this is not json", None),
        ("truncated JSON", r#"{"type":"chat","ref":"t1","#, None),
        (
            "unknown type",
            r#"{"type":"teleport","ref":"r1"}"#,
            Some("r1"),
        ),
        ("no type", r#"{"ref":"r1b","session":"s"}"#, Some("r1b")),
        (
            "wrong field type",
            r#"{"type":"chat","ref":"r2","session":"joined-one","text":5}"#,
            Some("r2"),
        ),
        (
            "wrong since type",
            r#"{"type":"join","ref":"r2b","session":"joined-one","since":"ten"}"#,
            Some("r2b"),
        ),
        (
            "missing field",
            r#"{"type":"chat","ref":"r3","session":"joined-one"}"#,
            Some("r3"),
        ),
        (
            "invalid session name",
            r#"{"type":"join","ref":"r4","session":"bad name!"}"#,
            Some("r4"),
        ),
        (
            "empty session name",
            r#"{"type":"join","ref":"r4b","session":""}"#,
            Some("r4b"),
        ),
        (
            "overlong session name",
            &format!(
                r#"{{"type":"join","ref":"r4c","session":"{}"}}"#,
                "a".repeat(129)
            ),
            Some("r4c"),
        ),
        ("a JSON array", r#"[{"type":"ping"}]"#, None),
        ("a JSON string", r#""ping""#, None),
        ("a non-string ref", r#"{"type":"teleport","ref":7}"#, None),
        (
            "chat to a session not joined",
            r#"{"type":"chat","ref":"r5","session":"elsewhere","text":"hi"}"#,
            Some("r5"),
        ),
        (
            "presence to a session not joined",
            r#"{"type":"presence","ref":"r6","session":"elsewhere","state":{"x":1}}"#,
            Some("r6"),
        ),
        (
            "leave of a session not joined",
            r#"{"type":"leave","ref":"r7","session":"elsewhere"}"#,
            Some("r7"),
        ),
        (
            "second hello",
            r#"{"type":"hello","ref":"r8","name":"again"}"#,
            Some("r8"),
        ),
        (
            "empty chat text",
            r#"{"type":"chat","ref":"r9","session":"joined-one","text":""}"#,
            Some("r9"),
        ),
    ];
    for (what, text, reference) in cases {
        client.send_text(text).await;
        expect_error(&mut client, what, "bad_request", *reference).await;
        client.ping_pong().await;
    }

    // A binary frame is not part of protocol v1.
    client
        .send_message(Message::binary(vec![0u8, 1, 2, 3]))
        .await;
    expect_error(&mut client, "binary frame", "bad_request", None).await;
    client.ping_pong().await;

    // The session the client did join was not disturbed: a chat still lands, right after.
    let offset = client.chat("joined-one", "still fine").await;
    assert_eq!(offset, 2, "the only events are the join and this chat");
    let log = common::all_events(&server.http_url(), "joined-one").await;
    assert_eq!(log.len(), 2, "bad frames wrote to the log: {log:?}");
    assert_healthy(&server).await;
}

#[tokio::test]
async fn oversized_frames_get_too_large_and_the_third_closes_with_1009() {
    let server = small_frames();
    let mut client = WsClient::connect_hello(&server.ws_url(), "big").await;
    let huge = json!({"type": "ping", "ref": "big", "pad": "x".repeat(MAX_FRAME)}).to_string();
    assert!(huge.len() > MAX_FRAME);

    for strike in 1..=2 {
        client.send_text(&huge).await;
        expect_error(
            &mut client,
            &format!("oversize #{strike}"),
            "too_large",
            None,
        )
        .await;
        client.ping_pong().await;
    }
    // A frame just at the limit is fine.
    let mut at_limit = json!({"type": "ping", "pad": ""}).to_string();
    let pad = MAX_FRAME - at_limit.len();
    at_limit = json!({"type": "ping", "pad": "y".repeat(pad)}).to_string();
    assert_eq!(at_limit.len(), MAX_FRAME);
    client.send_text(&at_limit).await;
    assert_eq!(
        client.recv().await,
        json!({"type": "pong"}),
        "a frame at the limit was refused"
    );

    client.send_text(&huge).await;
    let (ending, frames) = client.wait_end(Duration::from_secs(5)).await;
    let codes: Vec<&Value> = frames.iter().map(|f| &f["code"]).collect();
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "error" && f["code"] == "too_large"),
        "no too_large before the close: {frames:?}"
    );
    assert!(
        matches!(ending, Ending::Closed(Some(1009))),
        "the third oversized frame should close with 1009, got {ending:?} (codes {codes:?})"
    );
    assert_healthy(&server).await;

    // Other clients are unaffected.
    let mut other = WsClient::connect_hello(&server.ws_url(), "other").await;
    other.ping_pong().await;
}

#[tokio::test]
async fn a_frame_far_beyond_the_limit_closes_with_1009() {
    let server = small_frames();
    let mut client = WsClient::connect_hello(&server.ws_url(), "giant").await;
    let giant = "z".repeat(MAX_FRAME * 8);
    client.send_text(&giant).await;
    let (ending, _) = client.wait_end(Duration::from_secs(5)).await;
    assert!(
        matches!(ending, Ending::Closed(Some(1009))),
        "a frame 8x the limit should close with 1009, got {ending:?}"
    );
    assert_healthy(&server).await;
}

#[tokio::test]
async fn no_hello_within_the_timeout_closes_with_1008() {
    let server = TestServer::sqlite_with(|config| config.limits.hello_timeout_s = 1);
    let mut client = WsClient::connect(&server.ws_url()).await;
    // A socket that never says hello is closed with 1008.
    client
        .expect_closed_with(Duration::from_secs(5), "unauthorized", 1008)
        .await;
    assert_healthy(&server).await;
}

/// Many bad frames from many sockets at once leave the node serving and its sessions intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrage_of_garbage_does_not_hurt_the_node() {
    let server = small_frames();
    let mut good = WsClient::connect_hello(&server.ws_url(), "good").await;
    good.join("steady", None, None).await;
    let before = good.chat("steady", "before").await;

    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut bad = WsClient::connect_hello(&url, &format!("bad-{i}")).await;
            bad.join("steady", None, None).await;
            for j in 0..50 {
                let garbage = match j % 5 {
                    0 => "{".to_owned(),
                    1 => r#"{"type":"chat","session":"steady","text":null}"#.to_owned(),
                    2 => r#"{"type":"join","session":"../../etc"}"#.to_owned(),
                    3 => "\u{0}\u{1}".to_owned(),
                    _ => r#"{"type":"presence","session":"steady"}"#.to_owned(),
                };
                if bad.try_send_text(&garbage).await.is_err() {
                    break; // closed for abuse; checked below
                }
            }
            // Each bad frame gets an error. A server may also end repeated abuse, but only
            // with close code 1008.
            let mut errors = 0;
            while errors < 50 {
                match bad.next_frame(Duration::from_secs(5)).await {
                    Ok(Some(frame)) if frame["type"] == "error" => {
                        assert!(
                            frame["code"] == "bad_request" || frame["code"] == "rate_limited",
                            "{frame}"
                        );
                        errors += 1;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("bad frames went unanswered after {errors} errors"),
                    Err(end) => {
                        assert!(
                            end.contains("Policy"),
                            "a garbage socket ended other than with 1008: {end}"
                        );
                        return;
                    }
                }
            }
            bad.send(json!({"type": "ping"})).await;
            bad.recv_until(|f| f["type"] == "pong").await;
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("a garbage client hung")
            .expect("a garbage client failed");
    }
    let after = good.chat("steady", "after").await;
    assert!(after > before);
    let log = common::all_events(&server.http_url(), "steady").await;
    common::assert_gap_free(&log, 1);
    let chats: Vec<&Value> = log.iter().filter(|e| e["kind"] == "chat").collect();
    assert_eq!(chats.len(), 2, "garbage reached the log: {chats:?}");
    assert_healthy(&server).await;
}

#[tokio::test]
async fn display_names_are_trimmed_bounded_and_never_empty() {
    let server = small_frames();
    for (name, want) in [
        (json!("  Ada  "), "Ada".to_owned()),
        (json!("   "), "anonymous".to_owned()),
        (Value::Null, "anonymous".to_owned()),
        (json!("é".repeat(1000)), "é".repeat(64)),
    ] {
        let mut client = WsClient::connect(&server.ws_url()).await;
        client.send(json!({"type": "hello", "name": name})).await;
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["user"]["name"], want.as_str(), "name {name}");
    }
}

/// A hostile Yjs update whose block clocks run past `u32::MAX` (found by the `yjs` fuzz target;
/// release builds of yrs 0.28.1 wrapped them and then divided by zero in `apply_update`) is
/// refused: the session's actor does not panic, the update changes nothing, and the same socket
/// and another Yjs client go on editing.
#[tokio::test]
async fn a_yjs_update_whose_clocks_overflow_is_refused_without_a_panic() {
    use common::yjs::{yjs_connect, yjs_insert};
    use futures_util::SinkExt;

    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = common::unique_session("yjs-hostile");
    let path = format!("{session}/main");
    let hostile = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/corpus/yjs/divide-by-zero-in-apply-update"
    ))
    .expect("the committed reproducer");
    let panics_before = common::metric(&base, "conclave_actor_panics_total", "").await;

    let mut attacker = yjs_connect(server.addr, &path, "").await.expect("connects");
    yjs_insert(&mut attacker, "before ").await;
    for _ in 0..3 {
        attacker
            .send(Message::Binary(hostile.clone().into()))
            .await
            .expect("send the hostile frame");
    }
    yjs_insert(&mut attacker, "after").await;

    let mut editor = yjs_connect(server.addr, &path, "").await.expect("connects");
    yjs_insert(&mut editor, "!").await;
    let doc_path = format!("{base}/v1/sessions/{session}/docs/main");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let (status, body) = get_json(&doc_path).await;
        assert_eq!(status, 200, "{body}");
        let text = body["text"].as_str().unwrap_or_default().to_owned();
        if text.contains('!') || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for word in ["before ", "after", "!"] {
        assert!(text.contains(word), "{word:?} missing from {text:?}");
    }
    assert_eq!(
        common::metric(&base, "conclave_actor_panics_total", "").await,
        panics_before,
        "a session panicked on the hostile update"
    );
    assert_healthy(&server).await;
}
