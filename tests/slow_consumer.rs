//! Slow consumers: a client that stops reading is dropped once its bounded outbound queue is
//! full, after a gap-free prefix of the events, with a close code, while everyone else is
//! served in full; and a client that reads can always resume from its offset.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Ending, TestServer, WsClient, assert_gap_free, post_json};
use serde_json::{Value, json};

const QUEUE_BYTES: usize = 256 * 1024;
/// Chats of 8 KB: 800 of them are 6.5 MB, beyond every socket buffer on the way.
const CHATS: usize = 800;
const CHAT_BYTES: usize = 8 * 1024;
/// The writer never runs more than this many chats ahead of the reading client, so a client
/// that does read is never close to the queue bound.
const WINDOW: usize = 16;

fn small_queue() -> TestServer {
    TestServer::sqlite_with(|config| {
        config.limits.outbound_queue_bytes = QUEUE_BYTES;
        // The writer floods on purpose; its rate limit is not what these tests are about.
        config.limits.rate_per_s = 100_000;
        config.limits.rate_burst = 100_000;
    })
}

/// What the slow client got.
struct Firehose {
    joined: u64,
    head: u64,
    ending: Ending,
    events: Vec<Value>,
}

/// A slow client joins and stops reading; a writer posts `CHATS` big chats while a reader
/// reads them all (each checked gap-free). Then the slow client reads what it was sent.
async fn firehose(server: &TestServer, session: &str) -> Firehose {
    let mut slow = WsClient::connect_small_window(server.addr, &server.ws_url(), 4096).await;
    slow.hello("slow").await;
    let joined = slow.join(session, None, None).await["offset"]
        .as_u64()
        .expect("offset");

    let mut reader = WsClient::connect_hello(&server.ws_url(), "reader").await;
    reader.join(session, None, None).await;
    let mut writer = WsClient::connect_hello(&server.ws_url(), "writer").await;
    writer.join(session, None, None).await;

    let started = Instant::now();
    let (mut tx, mut rx) = writer.split();
    let pad = "p".repeat(CHAT_BYTES);
    let read_so_far = AtomicUsize::new(0);
    let send = async {
        for i in 0..CHATS {
            let deadline = Instant::now() + Duration::from_secs(30);
            while i >= read_so_far.load(Ordering::SeqCst) + WINDOW {
                assert!(Instant::now() < deadline, "the reading client stalled");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let text = format!("{i}:{pad}");
            tx.send(
                json!({"type": "chat", "ref": i.to_string(), "session": session, "text": text}),
            )
            .await;
        }
    };
    let acks = async {
        let mut last = 0;
        let mut acked = 0;
        while acked < CHATS {
            let frame = match rx.next_frame(Duration::from_secs(30)).await {
                Ok(Some(frame)) => frame,
                other => {
                    panic!("the writer lost its socket or stalled after {acked} acks: {other:?}")
                }
            };
            if frame["type"] == "ack" {
                let offset = frame["offset"].as_u64().expect("offset");
                assert!(offset > last, "acks out of order");
                last = offset;
                acked += 1;
            } else {
                assert_ne!(frame["type"], "error", "the writer was refused: {frame}");
            }
        }
        last
    };
    let read_all = async {
        let mut chats = 0;
        let mut last = None::<u64>;
        while chats < CHATS {
            let frame = reader.recv_within(Duration::from_secs(30)).await;
            if frame["type"] == "event" {
                let offset = frame["offset"].as_u64().expect("offset");
                if let Some(prev) = last {
                    assert_eq!(offset, prev + 1, "the reading client saw a gap");
                }
                last = Some(offset);
                if frame["kind"] == "chat" {
                    chats += 1;
                    read_so_far.store(chats, Ordering::SeqCst);
                }
            }
        }
    };
    let ((), head, ()) = tokio::join!(send, acks, read_all);
    eprintln!(
        "{CHATS} chats of {CHAT_BYTES} bytes committed and read in {:?}",
        started.elapsed()
    );

    let (ending, frames) = slow.wait_end(Duration::from_secs(20)).await;
    let events: Vec<Value> = frames
        .into_iter()
        .filter(|f| f["type"] == "event")
        .collect();
    eprintln!(
        "the slow client got {} events, then {ending:?}",
        events.len()
    );
    Firehose {
        joined,
        head,
        ending,
        events,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_a_gap_free_prefix() {
    let server = small_queue();
    let outcome = firehose(&server, "firehose").await;
    assert_gap_free(&outcome.events, outcome.joined + 1);
    let got = outcome
        .events
        .last()
        .and_then(|e| e["offset"].as_u64())
        .unwrap_or(outcome.joined);
    assert!(
        got < outcome.head,
        "the slow client was sent everything ({got} of {}): its queue is not bounded",
        outcome.head
    );
    let (status, body) = common::get_json(&format!("{}/healthz", server.http_url())).await;
    assert_eq!(status, 200, "{body}");
}

/// DESIGN.md: "A client that falls behind is dropped with a close code"; the configuration
/// documents the code as 1013 (try again later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slow_client_gets_close_code_1013() {
    let server = small_queue();
    let outcome = firehose(&server, "firehose-close").await;
    assert!(
        matches!(outcome.ending, Ending::Closed(Some(1013))),
        "the slow client was dropped without the close code 1013: {:?}",
        outcome.ending
    );
}

/// A client that reads as fast as it can resumes from an old offset and gets every event it
/// missed, even when they add up to more than the outbound queue bound. (Otherwise a client
/// that fell behind could never catch up: every resume would drop it again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_the_queue_bound_is_delivered_in_full() {
    let server = small_queue();
    let base = server.http_url();
    let session = "backlog";
    let (status, body) = post_json(&format!("{base}/v1/sessions"), &json!({"id": session})).await;
    assert_eq!(status, 201, "{body}");
    let mut probe = WsClient::connect_hello(&server.ws_url(), "probe").await;
    let epoch = probe.join(session, None, None).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned();
    probe.close().await;

    // 100 chats of 8 KB: 800 KB of backlog, three times the queue bound.
    let pad = "b".repeat(CHAT_BYTES);
    for i in 0..100 {
        let (status, body) = post_json(
            &format!("{base}/v1/sessions/{session}/messages"),
            &json!({"text": format!("{i}:{pad}")}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    let head = common::all_events(&base, session).await.len() as u64;
    let mut client = WsClient::connect_hello(&server.ws_url(), "resumer").await;
    client
        .send(json!({"type": "join", "ref": "j", "session": session, "since": 0, "epoch": epoch}))
        .await;
    let mut events = Vec::new();
    while (events.len() as u64) < head {
        match client.next_frame(Duration::from_secs(5)).await {
            Ok(Some(frame)) if frame["type"] == "event" => events.push(frame),
            Ok(Some(frame)) => assert_ne!(frame["type"], "error", "{frame}"),
            Ok(None) => panic!("the replay stopped after {} of {head} events", events.len()),
            Err(end) => panic!(
                "a client reading as fast as it can was dropped during the replay, after {} of \
                 {head} events: {end}",
                events.len()
            ),
        }
    }
    assert_gap_free(&events, 1);
}

/// A process's resident and peak resident memory (VmRSS, VmHWM), in bytes, from /proc.
fn resident_bytes(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The bound: 20 senders × 400 chats of 8 KB (64 MB in all) to a session whose one
/// other member never reads. The server (a real process, measured from /proc) drops that client
/// and its peak resident memory grows by less than 40 MiB: a stalled reader's backlog never
/// accumulates in the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_never_grows_server_memory() {
    const SENDERS: usize = 20;
    const PER_SENDER: usize = 400;
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().to_str().expect("utf-8 path").to_owned();
    let server = common::spawn_binary(&["--data-dir", data_dir.as_str()], &[]).await;
    let base = server.http_url();
    let session = common::worker::new_session(&base, "stalled-reader").await;
    let session = session.as_str();
    let text = "x".repeat(CHAT_BYTES);
    // Warm up: the session live, the store's pages and the HTTP workers' buffers allocated.
    for _ in 0..20 {
        let (status, _) = post_json(
            &format!("{base}/v1/sessions/{session}/messages"),
            &json!({"text": text, "name": "warm-up"}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut stalled = WsClient::connect_small_window(server.addr, &server.ws_url(), 4 * 1024).await;
    stalled.hello("stalled").await;
    stalled.join(session, None, None).await;
    let (baseline, _) = resident_bytes(server.pid());

    let posted = std::sync::Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| {
            let (url, text, posted) = (
                format!("{base}/v1/sessions/{session}/messages"),
                text.clone(),
                posted.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..PER_SENDER {
                    let (status, body) =
                        post_json(&url, &json!({"text": text, "name": format!("sender-{i}")}))
                            .await;
                    assert_eq!(status, 200, "{body}");
                    posted.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.expect("a sender failed");
    }
    assert_eq!(posted.load(Ordering::Relaxed), SENDERS * PER_SENDER);

    let (now, peak) = resident_bytes(server.pid());
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "resident memory: baseline {} KiB, peak {} KiB (+{} KiB), now {} KiB",
        baseline >> 10,
        peak >> 10,
        growth >> 10,
        now >> 10
    );
    assert!(
        growth < 40 << 20,
        "peak resident memory grew by {} MiB (baseline {} MiB, peak {} MiB, now {} MiB)",
        growth >> 20,
        baseline >> 20,
        peak >> 20,
        now >> 20
    );
    // The stalled client was dropped: the server says so, and the session has no member left.
    assert!(
        common::metric(&base, "conclave_slow_consumers_total", "").await >= 1.0,
        "no slow consumer was dropped"
    );
    let (_, inspect) = common::get_json(&format!("{base}/v1/sessions/{session}")).await;
    assert_eq!(
        inspect["members"].as_array().map(Vec::len),
        Some(0),
        "the stalled reader is still a member: {inspect}"
    );
    drop(stalled);
}
