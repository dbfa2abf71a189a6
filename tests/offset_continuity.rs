//! Offset continuity under random store failures, as a proptest against a real node.
//!
//! Each case drives one fresh session with a generated sequence of writes (bursts of chats from
//! two sockets at once, REST posts) interleaved with injected failures (the next n commits fail,
//! or the store goes down and comes back). Then it checks the guarantees of DESIGN.md:
//!
//! - every write gets exactly one answer: an `ack` with an offset, or `storage_unavailable`;
//! - during an outage nothing is acked;
//! - the acked offsets are distinct, and strictly increasing in the order each writer saw them;
//! - replayed from 0 (over the socket, and from the store over REST) the log is gap-free from 1,
//!   holds every acked chat at its acked offset, and no refused one.
//!
//! One node serves every case (a fresh session each), so the cases run in a few seconds.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{TestServer, WsClient, all_events, assert_gap_free, post_json};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// What happens next in a case.
#[derive(Debug, Clone)]
enum Step {
    /// Each socket client sends this many chats back to back; then the answers are read.
    Burst(usize, usize),
    /// This many chats posted over REST, one after the other.
    Rest(usize),
    /// The next n commits fail.
    FailNext(u32),
    /// The store goes down (every write fails) or comes back.
    Outage(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..6usize, 0..6usize).prop_map(|(a, b)| Step::Burst(a, b)),
        1 => (1..4usize).prop_map(Step::Rest),
        2 => (1..4u32).prop_map(Step::FailNext),
        1 => any::<bool>().prop_map(Step::Outage),
    ]
}

/// Random steps around one failure that a burst meets, so that no case goes without one.
fn steps() -> impl Strategy<Value = Vec<Step>> {
    let failure = prop_oneof![(1..4u32).prop_map(Step::FailNext), Just(Step::Outage(true)),];
    let (before, after) = (
        proptest::collection::vec(step(), 0..6),
        proptest::collection::vec(step(), 0..8),
    );
    (before, failure, 1..6usize, after).prop_map(|(mut steps, failure, count, after)| {
        steps.push(failure);
        steps.push(Step::Burst(count, count));
        steps.extend(after);
        steps
    })
}

/// Every write of a case and what became of it.
#[derive(Default)]
struct Outcomes {
    /// Chat text by acked offset.
    acked: BTreeMap<u64, String>,
    refused: HashSet<String>,
}

impl Outcomes {
    /// Books one answer; `down` says the store was down when it was written.
    fn book(&mut self, text: String, answer: &Value, down: bool) {
        match answer["type"].as_str() {
            Some("ack") => {
                assert!(!down, "{text:?} was acked during an outage: {answer}");
                let offset = answer["offset"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("an ack without an offset: {answer}"));
                if let Some(other) = self.acked.insert(offset, text.clone()) {
                    panic!("offset {offset} was acked twice: {other:?} and {text:?}");
                }
            }
            Some("error") if answer["code"] == "storage_unavailable" => {
                self.refused.insert(text);
            }
            _ => panic!("{text:?} was answered with {answer}"),
        }
    }
}

/// Sends `count` chats without waiting, then reads their answers in order of arrival. Returns
/// the texts with their answers, in the order the answers came.
async fn burst(
    client: &mut WsClient,
    session: &str,
    tag: &str,
    count: usize,
) -> Vec<(String, Value)> {
    let texts: Vec<String> = (0..count).map(|i| format!("{tag}-{i}")).collect();
    for text in &texts {
        client
            .send(json!({"type": "chat", "ref": text, "session": session, "text": text}))
            .await;
    }
    let mut answers = Vec::new();
    while answers.len() < count {
        let frame = client
            .recv_until(|f| {
                f["ref"]
                    .as_str()
                    .is_some_and(|r| texts.iter().any(|t| t == r))
            })
            .await;
        let text = frame["ref"].as_str().unwrap_or_default().to_owned();
        assert!(
            answers.iter().all(|(t, _)| *t != text),
            "{text:?} was answered twice"
        );
        answers.push((text, frame));
    }
    answers
}

/// A socket client joined to `session`, once its own `member.joined` is committed, and the
/// session's epoch.
async fn member(server: &TestServer, session: &str, name: &str) -> (WsClient, String) {
    let mut client = WsClient::connect_hello(&server.ws_url(), name).await;
    let joined = client.join(session, None, None).await;
    client
        .recv_until(|f| f["type"] == "event" && f["kind"] == "member.joined")
        .await;
    let epoch = joined["epoch"].as_str().expect("joined has an epoch");
    (client, epoch.to_owned())
}

/// The log as a new client replays it over the socket from offset 0.
async fn socket_replay(server: &TestServer, session: &str, epoch: &str) -> Vec<Value> {
    let mut client = WsClient::connect_hello(&server.ws_url(), "replayer").await;
    let joined = client.join(session, Some(0), Some(epoch)).await;
    let head = joined["offset"].as_u64().expect("joined has an offset");
    let mut events = Vec::new();
    while events.len() < head as usize {
        let frame = client
            .recv_until(|f| f["type"] == "event" && f["session"] == session)
            .await;
        events.push(frame);
    }
    events
}

/// Runs one case; returns how many writes were acked and how many refused.
async fn run_case(server: &TestServer, steps: &[Step]) -> (usize, usize) {
    let session = format!("continuity-{}", uuid::Uuid::now_v7().simple());
    let session = session.as_str();
    server.switch.fail_next_commits(0);
    server.switch.set_outage(false);
    let (ada, epoch) = member(server, session, "ada").await;
    let (bob, _) = member(server, session, "bob").await;
    let mut clients = [ada, bob];
    let messages = format!("{}/v1/sessions/{session}/messages", server.http_url());
    let mut outcomes = Outcomes::default();
    // The last acked offset each writer (two sockets, REST) saw.
    let mut last_seen = [0u64; 3];
    let mut down = false;
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::FailNext(n) => server.switch.fail_next_commits(n),
            Step::Outage(on) => {
                server.switch.set_outage(on);
                down = on;
            }
            Step::Rest(count) => {
                for j in 0..count {
                    let text = format!("rest-{i}-{j}");
                    let (status, body) = post_json(&messages, &json!({"text": text})).await;
                    let answer = match status {
                        200 => json!({"type": "ack", "offset": body["offset"]}),
                        503 => json!({"type": "error", "code": body["error"]["code"]}),
                        _ => panic!("POST {text:?} answered {status}: {body}"),
                    };
                    track(&mut last_seen[2], &answer, &text);
                    outcomes.book(text, &answer, down);
                }
            }
            Step::Burst(a, b) => {
                let [first, second] = &mut clients;
                let (ada_tag, bob_tag) = (format!("ada-{i}"), format!("bob-{i}"));
                let (x, y) = tokio::join!(
                    burst(first, session, &ada_tag, a),
                    burst(second, session, &bob_tag, b),
                );
                for (k, answers) in [x, y].into_iter().enumerate() {
                    for (text, answer) in answers {
                        track(&mut last_seen[k], &answer, &text);
                        outcomes.book(text, &answer, down);
                    }
                }
            }
        }
    }
    server.switch.fail_next_commits(0);
    server.switch.set_outage(false);

    let stored = all_events(&server.http_url(), session).await;
    assert_gap_free(&stored, 1);
    let replayed = socket_replay(server, session, &epoch).await;
    let offsets = |log: &[Value]| log.iter().map(|e| e["offset"].clone()).collect::<Vec<_>>();
    assert_eq!(
        offsets(&replayed),
        offsets(&stored[..replayed.len().min(stored.len())]),
        "the socket replay and the store disagree"
    );
    assert_gap_free(&replayed, 1);
    for (offset, text) in &outcomes.acked {
        let event = stored
            .get(*offset as usize - 1)
            .unwrap_or_else(|| panic!("acked {text:?} at {offset}, past the log's end"));
        assert_eq!(
            (event["kind"].as_str(), event["data"]["text"].as_str()),
            (Some("chat"), Some(text.as_str())),
            "acked {text:?} at {offset}, but the log has {event}"
        );
    }
    for event in stored.iter().filter(|e| e["kind"] == "chat") {
        let text = event["data"]["text"].as_str().unwrap_or_default();
        assert!(
            !outcomes.refused.contains(text),
            "{text:?} was refused but is in the log: {event}"
        );
        assert!(
            outcomes
                .acked
                .get(&event["offset"].as_u64().unwrap_or_default())
                .is_some_and(|t| t == text),
            "{event} is in the log but was never acked"
        );
    }
    (outcomes.acked.len(), outcomes.refused.len())
}

/// Checks that an ack's offset is above every offset this writer was acked before.
fn track(last: &mut u64, answer: &Value, text: &str) {
    if let Some(offset) = answer["offset"].as_u64() {
        assert!(
            offset > *last,
            "{text:?} acked at {offset} after this writer was acked at {last}"
        );
        *last = offset;
    }
}

#[test]
fn acked_offsets_stay_gap_free_under_random_store_failures() {
    let server = TestServer::sqlite();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    let (acked, refused) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let result = runner.run(&steps(), |steps| {
        let (a, r) = runtime.block_on(run_case(&server, &steps));
        acked.fetch_add(a, Ordering::Relaxed);
        refused.fetch_add(r, Ordering::Relaxed);
        Ok(())
    });
    if let Err(err) = result {
        panic!("{err}");
    }
    // The failures must have bitten, or the properties above were checked on nothing. (The
    // switch is node-wide, so a stray commit of an earlier case may take one failure; not all.)
    let (acked, refused) = (acked.into_inner(), refused.into_inner());
    eprintln!("{acked} writes acked, {refused} refused");
    assert!(acked > 0 && refused > 0, "{acked} acked, {refused} refused");
}
