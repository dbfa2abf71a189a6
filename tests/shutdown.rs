//! Graceful shutdown of the real binary: SIGTERM drains every session, closes every socket with
//! 1001 and exits with status 0 within a few seconds, and every acked chat is in the store after
//! a restart.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use common::{Ending, WsClient, all_events, assert_gap_free, data_dir_args, spawn_binary};
use serde_json::json;

/// Chats streamed while the node shuts down.
const STREAM: usize = 1000;

fn sent_total() -> usize {
    20 + STREAM
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0_keeping_every_acked_chat() {
    let data = tempfile::tempdir().expect("data dir");
    let args = data_dir_args(data.path());
    let session = "graceful";
    let mut server = spawn_binary(&args, &[]).await;

    // Some chats acked one by one, then a stream still flowing when SIGTERM arrives.
    let mut writer = WsClient::connect_hello(&server.ws_url(), "writer").await;
    writer.join(session, None, None).await;
    let mut idle = WsClient::connect_hello(&server.ws_url(), "idle").await;
    idle.join("other-session", None, None).await;
    let mut acked: HashMap<String, u64> = HashMap::new();
    for i in 0..20 {
        let text = format!("steady-{i}");
        let offset = writer.chat(session, &text).await;
        acked.insert(text, offset);
    }
    let (mut tx, mut rx) = writer.split();
    let sender = async {
        for i in 0..STREAM {
            let text = format!("stream-{i}");
            let frame = json!({"type": "chat", "ref": text, "session": session, "text": text});
            if tx.try_send(frame).await.is_err() {
                break; // the node is gone
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let receiver = async {
        let mut streamed = 0;
        let mut signalled = false;
        // Acks that arrive after SIGTERM are durable too. The socket ends with the process.
        while let Ok(Some(frame)) = rx.next_frame(Duration::from_secs(10)).await {
            if frame["type"] == "ack" {
                let text = frame["ref"].as_str().expect("ref").to_owned();
                acked.insert(text, frame["offset"].as_u64().expect("offset"));
                streamed += 1;
                if streamed == 50 && !signalled {
                    server.sigterm();
                    signalled = true;
                }
            }
        }
        assert!(signalled, "the stream ended before SIGTERM was sent");
    };
    tokio::join!(sender, receiver);
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM\n{}", server.log()));
    assert!(
        status.success(),
        "SIGTERM exit status {status}\n{}",
        server.log()
    );
    assert_eq!(status.code(), Some(0), "{status}");
    eprintln!("acked {} chats before the node stopped", acked.len());
    assert!(
        acked.len() < sent_total(),
        "every chat was acked: SIGTERM did not land while chats were flowing"
    );
    drop(idle);
    drop(server);

    let server = spawn_binary(&args, &[]).await;
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
    for (text, offset) in &acked {
        let event = &log[(*offset - 1) as usize];
        assert_eq!(
            event["kind"], "chat",
            "acked {text} at {offset}, log has {event}"
        );
        assert_eq!(
            event["data"]["text"],
            text.as_str(),
            "acked {text} at {offset}, log has {event}"
        );
    }
    // Chats are in the order they were sent, each at most once.
    let texts: Vec<&str> = log
        .iter()
        .filter(|e| e["kind"] == "chat")
        .map(|e| e["data"]["text"].as_str().expect("text"))
        .collect();
    let sent: Vec<String> = (0..20)
        .map(|i| format!("steady-{i}"))
        .chain((0..STREAM).map(|i| format!("stream-{i}")))
        .collect();
    assert_eq!(
        texts,
        sent[..texts.len()],
        "the log is not a prefix of what was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_an_idle_node_exits_0_promptly() {
    let data = tempfile::tempdir().expect("data dir");
    let args = data_dir_args(data.path());
    let mut server = spawn_binary(&args, &[]).await;
    // Open, idle sockets of every kind must not hold the process, and each is told why it
    // ends: a close frame with 1001 (going away), not a reset.
    let mut client = WsClient::connect_hello(&server.ws_url(), "idle").await;
    client.join("quiet", None, None).await;
    let (mut yjs, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/yjs/quiet/main", server.addr))
            .await
            .expect("opening a Yjs socket");
    let mut worker = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
    worker
        .send(json!({"type": "hello", "capabilities": ["k"], "capacity": 1}))
        .await;
    assert_eq!(worker.recv().await["type"], "welcome");
    server.sigterm();
    // The Yjs socket speaks binary, which `WsClient` refuses: read it raw.
    let yjs_close = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match yjs.next().await {
                Some(Ok(Message::Close(close))) => {
                    break Ending::Closed(close.map(|frame| u16::from(frame.code)));
                }
                Some(Ok(_)) => {}
                Some(Err(err)) => break Ending::Dropped(err.to_string()),
                None => break Ending::Dropped("stream ended".into()),
            }
        }
    })
    .await
    .expect("the Yjs socket was not ended within 5 s");
    assert!(
        matches!(yjs_close, Ending::Closed(Some(1001))),
        "the Yjs socket ended with {yjs_close:?}, not a 1001 close\n{}",
        server.log()
    );
    for (name, socket) in [("user", &mut client), ("worker", &mut worker)] {
        let (ending, _) = socket.wait_end(Duration::from_secs(5)).await;
        assert!(
            matches!(ending, Ending::Closed(Some(1001))),
            "the {name} socket ended with {ending:?}, not a 1001 close\n{}",
            server.log()
        );
    }
    let status = server
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no exit within 5 s of SIGTERM\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{status}\n{}", server.log());
}

/// A client that stopped reading cannot take its close frame, so shutdown cuts it after its
/// grace. Its departure is then among the node's last session writes, which may still be
/// running while the process winds down: the node waits for the store's last queries rather
/// than drop one mid-flight (which panicked inside the store's connection pool, once), and the
/// departure is in the log after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_client_that_stopped_reading_exits_cleanly() {
    let data = tempfile::tempdir().expect("data dir");
    let args = data_dir_args(data.path());
    let mut server = spawn_binary(&args, &[]).await;
    let session = "backed-up";
    let mut stuck = WsClient::connect_small_window(server.addr, &server.ws_url(), 4096).await;
    stuck.hello("stuck").await;
    stuck.join(session, None, None).await;
    // About three megabytes of broadcasts: more than the socket buffers hold, less than the
    // outbound queue allows, so the stuck client is backed up but not dropped as slow.
    let mut writer = WsClient::connect_hello(&server.ws_url(), "writer").await;
    writer.join(session, None, None).await;
    let text = "x".repeat(32 << 10);
    for _ in 0..96 {
        writer.chat(session, &text).await;
    }
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("no exit within 15 s of SIGTERM\n{}", server.log()));
    let log = server.log();
    assert!(
        log.contains("some sockets had not closed"),
        "the stuck client took its close frame, so this test did not cut a socket\n{log}"
    );
    assert_eq!(status.code(), Some(0), "{status}\n{log}");
    assert!(!log.contains("panicked"), "a panic during shutdown\n{log}");
    drop(stuck);
    drop(server);
    let server = spawn_binary(&args, &[]).await;
    // The cut client's departure was committed before the node exited.
    let log = all_events(&server.http_url(), session).await;
    assert_gap_free(&log, 1);
    assert!(
        log.iter()
            .any(|e| e["kind"] == "member.left" && e["actor"]["name"] == "stuck"),
        "the cut client's departure is not in the log"
    );
}
