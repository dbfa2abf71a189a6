//! Councils over real sockets, with scripted agent members: each strategy to a known result,
//! quorum, abstention on timeout, self-exclusion and anonymity in reviews, early stop, revision
//! rounds, a person as a member (who alone reads their own label), the audit trail, bad
//! requests, and `kill -9` mid-council.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::worker::{TestWorker, new_session};
use common::{Backend, TestServer, WsClient, all_events, get_json, post_json};
use serde_json::{Value, json};

/// How a scripted agent answers each council task kind; `None` stays silent.
type Script = Arc<dyn Fn(&str, &Value) -> Option<Value> + Send + Sync>;

/// Every input a scripted agent received, by kind.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// Connects `count` agents with capability `council` that answer by `script`, each in its own
/// task until the test ends. Returns what they saw.
async fn agents(addr: std::net::SocketAddr, scripts: Vec<Script>) -> Seen {
    let seen: Seen = Arc::default();
    for script in scripts {
        let mut worker = TestWorker::connect(addr, &["council"], 2).await;
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(frame) = worker.try_recv(Duration::from_secs(60)).await {
                if frame["type"] != "assign" {
                    continue;
                }
                let task = frame["task"].clone();
                let kind = task["kind"].as_str().unwrap_or_default().to_owned();
                seen.lock()
                    .expect("seen")
                    .push((kind.clone(), task["input"].clone()));
                if let Some(output) = script(&kind, &task["input"]) {
                    worker.complete(&task, output).await;
                }
            }
        });
    }
    seen
}

/// An agent that proposes `answer` with `confidence` and ranks the proposals it is shown in
/// label order (or by `prefer`, best first, when given).
fn agent(answer: &'static str, confidence: f64, prefer: &'static [&'static str]) -> Script {
    Arc::new(move |kind, input| match kind {
        "council.propose" => Some(json!({"answer": answer, "confidence": confidence})),
        "council.review" => {
            let mut shown: Vec<(String, String)> = input["proposals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let label = p["label"].as_str().unwrap_or_default().to_owned();
                    let answer = p["answer"].as_str().unwrap_or_default().to_owned();
                    (label, answer)
                })
                .collect();
            shown.sort_by_key(|(label, answer)| {
                (
                    prefer
                        .iter()
                        .position(|p| p == answer)
                        .unwrap_or(usize::MAX),
                    label.clone(),
                )
            });
            Some(
                json!({"ranking": shown.iter().map(|(l, _)| l).collect::<Vec<_>>(),
                "critique": "fine"}),
            )
        }
        "council.synthesize" => Some(json!({"answer": "synthesized"})),
        _ => None,
    })
}

fn silent() -> Script {
    Arc::new(|_, _| None)
}

async fn open(base: &str, session: &str, body: Value) -> String {
    let (status, council) =
        post_json(&format!("{base}/v1/sessions/{session}/councils"), &body).await;
    assert_eq!(status, 201, "{body} → {council}");
    council["id"].as_str().expect("council id").to_owned()
}

/// Waits for the review phase in the session log: its event, and the labels it shows.
async fn review_labels(client: &mut WsClient) -> (Value, Vec<String>) {
    let phase = client
        .recv_until(|f| f["kind"] == "council.phase" && f["data"]["phase"] == "review")
        .await;
    let labels = phase["data"]["proposals"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    (phase, labels)
}

async fn wait_concluded(base: &str, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, council) = get_json(&format!("{base}/v1/councils/{id}")).await;
        if council["state"] != "deliberating" {
            return council;
        }
        assert!(
            Instant::now() < deadline,
            "council still deliberating: {council}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn majority_decides_with_a_full_audit_and_anonymous_reviews() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "council").await;
    let seen = agents(
        server.addr,
        vec![
            agent("Paris", 0.9, &[]),
            agent("  paris ", 0.8, &[]),
            agent("Lyon", 0.6, &[]),
        ],
    )
    .await;
    let id = open(
        &base,
        &session,
        json!({"question": "Capital of France?",
        "members": {"capability": "council", "count": 3}, "strategy": "majority",
        "rounds": 1, "phase_timeout_s": 10, "quorum": 2}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(15)).await;
    assert_eq!(council["state"], "decided", "{council}");
    let decision = &council["decision"];
    assert_eq!(decision["outcome"], "decided");
    assert_eq!(normalize(&decision["answer"]), "paris");
    assert_eq!(
        decision["dissent"].as_array().map(Vec::len),
        Some(1),
        "{decision}"
    );
    let label_map = council["label_map"]
        .as_object()
        .expect("label map once decided");
    assert_eq!(label_map.len(), 3);
    assert_eq!(
        label_map.keys().cloned().collect::<Vec<_>>(),
        ["A", "B", "C"]
    );

    // Every member proposed and reviewed; every ballot is in the audit.
    let ballots = council["ballots"].as_array().expect("ballots");
    assert_eq!(
        ballots
            .iter()
            .filter(|b| b["phase"] == "propose" && b["valid"] == true)
            .count(),
        3
    );
    assert_eq!(
        ballots
            .iter()
            .filter(|b| b["phase"] == "review" && b["valid"] == true)
            .count(),
        3
    );

    // Reviews: two proposals each (never the reviewer's own), labels and answers only.
    let seen = seen.lock().expect("seen").clone();
    let reviews: Vec<&Value> = seen
        .iter()
        .filter(|(k, _)| k == "council.review")
        .map(|(_, i)| i)
        .collect();
    assert_eq!(reviews.len(), 3);
    for input in &reviews {
        let proposals = input["proposals"].as_array().expect("proposals");
        assert_eq!(proposals.len(), 2, "{input}");
        for p in proposals {
            let keys: Vec<&String> = p
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            assert_eq!(keys, ["answer", "label"], "only labels and answers: {p}");
        }
        assert!(
            !input.to_string().contains("worker:"),
            "no member ids: {input}"
        );
    }
    let propose = seen
        .iter()
        .find(|(k, _)| k == "council.propose")
        .map(|(_, i)| i)
        .expect("propose");
    assert_eq!(propose["round"], 1);
    assert_eq!(propose["others"], json!([]));

    // The session log: opened, one event per phase, decided with the audit. The council's
    // events reach the log through the session's own group commit, after the council's row
    // says decided, so the log is read until the decision is in it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let events = all_events(&base, &session).await;
        if events.iter().any(|e| e["kind"] == "council.decided") || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .filter(|k| k.starts_with("council."))
        .collect();
    assert_eq!(
        kinds,
        [
            "council.opened",
            "council.phase",
            "council.phase",
            "council.decided"
        ]
    );
    let decided = events
        .iter()
        .find(|e| e["kind"] == "council.decided")
        .expect("decided");
    for field in ["decision", "label_map", "ballots", "weights", "dissent"] {
        assert!(
            !decided["data"][field].is_null(),
            "the audit lacks {field}: {decided}"
        );
    }
}

fn normalize(v: &Value) -> String {
    v.as_str().unwrap_or_default().trim().to_lowercase()
}

#[tokio::test]
async fn borda_and_chair_reach_their_known_results() {
    let server = TestServer::postgres();
    let base = server.http_url();
    let session = new_session(&base, "borda").await;
    // Everyone likes "beta" best after their own: beta collects the most rank points.
    agents(
        server.addr,
        vec![
            agent("alpha", 0.5, &["beta", "gamma"]),
            agent("beta", 0.5, &["gamma", "alpha"]),
            agent("gamma", 0.5, &["beta", "alpha"]),
        ],
    )
    .await;
    let id = open(
        &base,
        &session,
        json!({"question": "Which?", "strategy": "borda",
        "members": {"capability": "council", "count": 3}, "phase_timeout_s": 10, "quorum": 3}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(15)).await;
    assert_eq!(council["decision"]["answer"], "beta", "{council}");
    assert_eq!(council["decision"]["scores"]["beta"], 4.0);

    // Confidence: all three state 0.5 (weight 3 each), a three-way tie that Borda points break
    // for beta.
    let id = open(
        &base,
        &session,
        json!({"question": "Which?", "strategy": "confidence",
        "members": {"capability": "council", "count": 3}, "phase_timeout_s": 10, "quorum": 2}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(15)).await;
    assert_eq!(council["decision"]["answer"], "beta", "{council}");
    assert_eq!(council["decision"]["tie_break"], "borda", "{council}");
    assert_eq!(council["decision"]["scores"]["alpha"], 3.0);

    let id = open(
        &base,
        &session,
        json!({"question": "Which?", "strategy": "chair",
        "members": {"capability": "council", "count": 3}, "phase_timeout_s": 10, "quorum": 2}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(15)).await;
    assert_eq!(council["decision"]["answer"], "synthesized", "{council}");
    let chair_ballots = council["ballots"]
        .as_array()
        .expect("ballots")
        .iter()
        .filter(|b| b["phase"] == "synthesize")
        .count();
    assert_eq!(chair_ballots, 1, "exactly one member synthesizes");
}

#[tokio::test]
async fn a_silent_member_abstains_and_quorum_decides() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "quorum").await;
    agents(
        server.addr,
        vec![agent("yes", 0.5, &[]), agent("yes", 0.5, &[]), silent()],
    )
    .await;
    let started = Instant::now();
    let id = open(
        &base,
        &session,
        json!({"question": "Ship it?", "strategy": "majority",
        "members": {"capability": "council", "count": 3}, "phase_timeout_s": 1, "quorum": 2}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(10)).await;
    assert_eq!(council["state"], "decided", "{council}");
    assert_eq!(council["decision"]["answer"], "yes");
    assert_eq!(
        council["decision"]["abstained"].as_array().map(Vec::len),
        Some(1)
    );
    assert!(
        council["ballots"]
            .as_array()
            .expect("ballots")
            .iter()
            .any(|b| b["abstained"] == true),
        "the abstention is in the audit"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "it waited for the timeout"
    );

    // Quorum 3 with one silent member: no quorum.
    let id = open(
        &base,
        &session,
        json!({"question": "Again?", "strategy": "majority",
        "members": {"capability": "council", "count": 3}, "phase_timeout_s": 1, "quorum": 3}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(10)).await;
    assert_eq!(council["state"], "no_quorum", "{council}");
    assert_eq!(council["decision"]["outcome"], "no_quorum");

    // Nobody with the capability: no quorum at once.
    let id = open(
        &base,
        &session,
        json!({"question": "Anyone?", "strategy": "majority",
        "members": {"capability": "nobody-has-this", "count": 2}, "phase_timeout_s": 5}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(3)).await;
    assert_eq!(council["state"], "no_quorum", "{council}");
}

#[tokio::test]
async fn rounds_stop_early_on_agreement_and_revise_on_disagreement() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "rounds").await;
    // Agreeing from the start: no revise phase, whatever rounds allows.
    agents(
        server.addr,
        vec![agent("same", 0.5, &[]), agent("SAME", 0.5, &[])],
    )
    .await;
    let id = open(
        &base,
        &session,
        json!({"question": "q", "strategy": "majority", "rounds": 3,
        "members": {"capability": "council", "count": 2}, "phase_timeout_s": 10}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(10)).await;
    assert!(
        council["ballots"]
            .as_array()
            .expect("ballots")
            .iter()
            .all(|b| b["phase"] != "revise"),
        "{council}"
    );

    // Disagreeing: a member that sees the other's answer in round 2 adopts it.
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "revise").await;
    let follower: Script = Arc::new(|kind, input| match kind {
        "council.propose" if input["round"] == 1 => Some(json!({"answer": "mine"})),
        "council.propose" => {
            let theirs = input["others"][0]["answer"]
                .as_str()
                .unwrap_or("mine")
                .to_owned();
            Some(json!({"answer": theirs}))
        }
        "council.review" => {
            let label = input["proposals"][0]["label"].clone();
            Some(json!({"ranking": [label]}))
        }
        _ => None,
    });
    agents(server.addr, vec![agent("theirs", 0.9, &[]), follower]).await;
    let id = open(
        &base,
        &session,
        json!({"question": "q", "strategy": "majority", "rounds": 2,
        "members": {"capability": "council", "count": 2}, "phase_timeout_s": 10}),
    )
    .await;
    let council = wait_concluded(&base, &id, Duration::from_secs(10)).await;
    assert_eq!(council["decision"]["answer"], "theirs", "{council}");
    assert_eq!(
        council["decision"]["dissent"],
        json!([]),
        "they agree after revising"
    );
    assert!(
        council["ballots"]
            .as_array()
            .expect("ballots")
            .iter()
            .any(|b| b["phase"] == "revise")
    );
}

#[tokio::test]
async fn a_person_is_a_member_and_bad_ballots_are_audited() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "person").await;
    agents(server.addr, vec![agent("tea", 0.5, &[])]).await;
    let mut ada = WsClient::connect_hello(&server.ws_url(), "Ada").await;
    let user = ada.user_id();
    ada.join(&session, None, None).await;
    ada.send(
        json!({"type": "council.open", "ref": "o", "session": session, "question": "Drink?",
        "members": [{"capability": "council", "count": 1}, {"user": user}],
        "strategy": "majority", "phase_timeout_s": 10, "quorum": 2}),
    )
    .await;
    let ack = ada.recv_until(|f| f["ref"] == "o").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["council"].as_str().expect("council id").to_owned();

    // A review before the review phase is refused; a bad proposal is refused and audited.
    ada.send(
        json!({"type": "council.ballot", "ref": "r0", "council": id, "phase": "review",
        "ballot": {"ranking": ["A"]}}),
    )
    .await;
    assert_eq!(
        ada.recv_until(|f| f["ref"] == "r0").await["code"],
        "conflict"
    );
    ada.send(
        json!({"type": "council.ballot", "ref": "p0", "council": id, "phase": "propose",
        "ballot": {"answer": "   "}}),
    )
    .await;
    assert_eq!(
        ada.recv_until(|f| f["ref"] == "p0").await["code"],
        "bad_request"
    );
    ada.send(
        json!({"type": "council.ballot", "ref": "p1", "council": id, "phase": "propose",
        "ballot": {"answer": "Tea", "confidence": 0.7}}),
    )
    .await;
    assert_eq!(ada.recv_until(|f| f["ref"] == "p1").await["type"], "ack");

    // The review phase shows the labeled proposals in the session log.
    let (phase, labels) = review_labels(&mut ada).await;
    assert_eq!(labels.len(), 2, "{phase}");
    // Ranking every label includes Ada's own: an invalid ballot, audited, not a crash.
    ada.send(
        json!({"type": "council.ballot", "ref": "r1", "council": id, "phase": "review",
        "ballot": {"ranking": labels}}),
    )
    .await;
    let refused = ada.recv_until(|f| f["ref"] == "r1").await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
    let council = wait_concluded(&base, &id, Duration::from_secs(15)).await;
    assert_eq!(
        normalize(&council["decision"]["answer"]),
        "tea",
        "{council}"
    );
    let invalid = council["ballots"]
        .as_array()
        .expect("ballots")
        .iter()
        .filter(|b| b["member"] == format!("user:{user}").as_str() && b["valid"] == false)
        .count();
    assert!(
        invalid >= 2,
        "the invalid ballots are in the audit: {council}"
    );
}

#[tokio::test]
async fn a_member_reads_its_own_label_and_nobody_else_does() {
    let server = TestServer::sqlite_with(common::with_tokens);
    let base = server.http_url();
    let session = new_session(&base, "own-label").await;
    // Everyone answers alike: only the server can tell Ada which label is hers.
    agents(
        server.addr,
        vec![agent("same", 0.5, &[]), agent("same", 0.5, &[])],
    )
    .await;
    let ada_token = common::token("ada", conclave::protocol::Role::Editor);
    let mut ada = WsClient::connect(&server.ws_url()).await;
    ada.send(json!({"type": "hello", "token": ada_token, "name": "Ada"}))
        .await;
    assert_eq!(ada.recv().await["type"], "welcome");
    ada.join(&session, None, None).await;
    ada.send(
        json!({"type": "council.open", "ref": "o", "session": session, "question": "Same?",
        "members": [{"capability": "council", "count": 2}, {"user": "ada"}],
        "strategy": "majority", "phase_timeout_s": 10, "quorum": 2}),
    )
    .await;
    let id = ada.recv_until(|f| f["ref"] == "o").await["council"]
        .as_str()
        .expect("council id")
        .to_owned();
    ada.send(
        json!({"type": "council.ballot", "ref": "p", "council": id, "phase": "propose",
        "ballot": {"answer": "same"}}),
    )
    .await;
    assert_eq!(ada.recv_until(|f| f["ref"] == "p").await["type"], "ack");
    let (phase, labels) = review_labels(&mut ada).await;
    assert_eq!(labels.len(), 3, "{phase}");

    // The view is saved a moment after the phase is announced: read until it has caught up.
    let url = format!("{base}/v1/councils/{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let view = loop {
        let (status, view) =
            common::send_with(common::http().get(&url).bearer_auth(&ada_token)).await;
        assert_eq!(status, 200, "{view}");
        if view["phase"] == "review" {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "the view never reached review: {view}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let own = view["your_label"]
        .as_str()
        .expect("your_label for a member");
    assert!(
        labels.iter().any(|l| l == own),
        "{own} is one of {labels:?}"
    );
    let (_, anonymous) = get_json(&url).await;
    assert!(anonymous.get("your_label").is_none(), "{anonymous}");

    // Ranking the others, and only them, is a valid ballot.
    let ranking: Vec<&String> = labels.iter().filter(|l| *l != own).collect();
    ada.send(
        json!({"type": "council.ballot", "ref": "r", "council": id, "phase": "review",
        "ballot": {"ranking": ranking}}),
    )
    .await;
    let answer = ada.recv_until(|f| f["ref"] == "r").await;
    assert_eq!(answer["type"], "ack", "{answer}");
    let council = wait_concluded(&base, &id, Duration::from_secs(15)).await;
    assert_eq!(council["decision"]["answer"], "same", "{council}");
}

#[tokio::test]
async fn bad_council_requests_are_refused() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "bad-council").await;
    for body in [
        json!({"question": "q", "members": {"capability": "c", "count": 2}, "strategy": "plurality"}),
        json!({"question": "q", "members": {"capability": "c", "count": 2}, "strategy": "borda", "quorum": 3}),
        json!({"question": "q", "members": {"capability": "c", "count": 2}, "strategy": "borda", "rounds": 0}),
        json!({"question": "q", "members": {"capability": "c", "count": 2}, "strategy": "borda", "phase_timeout_s": -1}),
        json!({"question": "", "members": {"capability": "c", "count": 2}, "strategy": "borda"}),
        json!({"members": {"capability": "c", "count": 2}, "strategy": "borda"}),
    ] {
        let (status, answer) =
            post_json(&format!("{base}/v1/sessions/{session}/councils"), &body).await;
        assert_eq!(status, 400, "{body} → {answer}");
    }
    let (status, _) = get_json(&format!("{base}/v1/councils/no-such-council")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_council_resumes_after_kill_9_and_decides() {
    let data = tempfile::tempdir().expect("data dir");
    let args = common::data_dir_args(data.path());
    let mut server = common::spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let session = new_session(&base, "resume").await;
    // Proposals come at once; reviews never do, so the node dies mid-review.
    let no_review = |answer: &'static str| -> Script {
        Arc::new(move |kind, _| (kind == "council.propose").then(|| json!({"answer": answer})))
    };
    agents(
        server.addr,
        vec![no_review("red"), no_review("red"), no_review("blue")],
    )
    .await;
    let id = open(
        &base,
        &session,
        json!({"question": "Colour?", "strategy": "majority",
        "members": {"capability": "council", "count": 3}, "phase_timeout_s": 3, "quorum": 2}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, council) = get_json(&format!("{base}/v1/councils/{id}")).await;
        if council["phase"] == "review" {
            break;
        }
        assert!(Instant::now() < deadline, "never reached review: {council}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill_9();

    let server = common::spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let council = wait_concluded(&base, &id, Duration::from_secs(20)).await;
    assert_eq!(council["state"], "decided", "{council}");
    assert_eq!(council["decision"]["answer"], "red");
    let proposals = council["ballots"]
        .as_array()
        .expect("ballots")
        .iter()
        .filter(|b| b["phase"] == "propose" && b["valid"] == true)
        .count();
    assert_eq!(
        proposals, 3,
        "the proposals made before the crash were kept"
    );
}

#[tokio::test]
async fn the_council_is_persisted_after_each_phase() {
    let server = TestServer::start(Backend::Sqlite, |_| {});
    let base = server.http_url();
    let session = new_session(&base, "persisted").await;
    agents(server.addr, vec![agent("x", 0.5, &[]), silent()]).await;
    let id = open(
        &base,
        &session,
        json!({"question": "q", "strategy": "confidence",
        "members": {"capability": "council", "count": 2}, "phase_timeout_s": 2}),
    )
    .await;
    // While it waits on the silent member, the stored state already has the first proposal.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, council) = get_json(&format!("{base}/v1/councils/{id}")).await;
        assert_eq!(council["state"], "deliberating", "{council}");
        assert!(
            council.get("label_map").is_none(),
            "labels stay secret while deliberating"
        );
        if council["ballots"].as_array().is_some_and(|b| !b.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no ballot saved: {council}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let council = wait_concluded(&base, &id, Duration::from_secs(10)).await;
    assert_eq!(council["decision"]["answer"], "x");
    assert_eq!(
        council["decision"]["weights"].as_object().map(|w| w.len()),
        Some(1)
    );
}
