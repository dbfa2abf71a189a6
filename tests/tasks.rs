//! Workers and tasks over real sockets: capacity, leases as fencing tokens, retries on worker
//! loss and timeouts, cancel, fairness across sessions, the session log's `task.*` events, and
//! bad input. Each runs against SQLite and, where the claim SQL matters, PostgreSQL.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::worker::{TestWorker, new_session, submit, task, wait_task};
use common::{Backend, TestServer, WsClient, all_events, get_json, post_json};
use serde_json::json;

const LONG: Duration = Duration::from_secs(15);

fn fast_retries(config: &mut conclave::ServeConfig) {
    config.limits.task_retry_base_ms = 20;
    config.limits.task_retry_max_ms = 200;
}

/// Tokens are checked and nobody is let in without one.
fn tokens_only(config: &mut conclave::ServeConfig) {
    common::with_tokens(config);
    config.anonymous = Some(false);
}

fn server(backend: Backend) -> TestServer {
    TestServer::start(backend, fast_retries)
}

async fn capacity_is_never_exceeded(backend: Backend) {
    let server = server(backend);
    let base = server.http_url();
    let session = new_session(&base, "cap").await;
    for i in 0..6 {
        submit(&base, &session, json!({"kind": "echo", "input": {"i": i}})).await;
    }
    let mut worker = TestWorker::connect(server.addr, &["echo"], 2).await;
    let first = worker.next_task().await;
    let second = worker.next_task().await;
    assert_ne!(first["id"], second["id"]);
    // Full: nothing more arrives, however long we wait.
    let extra = worker.drain(Duration::from_millis(1500)).await;
    assert!(
        extra.iter().all(|f| f["type"] != "assign"),
        "a worker of capacity 2 got a third task: {extra:?}"
    );
    let (_, workers) = get_json(&format!("{base}/v1/workers")).await;
    let me = workers
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["id"] == worker.id.as_str()))
        .unwrap_or_else(|| panic!("worker missing from {workers}"));
    assert_eq!(
        (me["load"].as_u64(), me["capacity"].as_u64()),
        (Some(2), Some(2)),
        "{me}"
    );
    assert_eq!(me["capabilities"], json!(["echo"]));

    // Each completion frees exactly one slot.
    let mut done = 0;
    let mut holding = vec![first, second];
    while let Some(task) = holding.pop() {
        let ack = worker.complete(&task, json!({"echo": task["input"]})).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        done += 1;
        if done <= 4 {
            holding.push(worker.next_task().await);
        }
        let extra = worker.drain(Duration::from_millis(200)).await;
        let assigns = extra.iter().filter(|f| f["type"] == "assign").count();
        assert_eq!(assigns, 0, "over capacity after a completion: {extra:?}");
    }
    assert_eq!(done, 6);
}

#[tokio::test]
async fn capacity_is_never_exceeded_sqlite() {
    capacity_is_never_exceeded(Backend::Sqlite).await;
}

#[tokio::test]
async fn capacity_is_never_exceeded_postgres() {
    capacity_is_never_exceeded(Backend::Postgres).await;
}

#[tokio::test]
async fn a_completed_task_keeps_its_output_and_logs_every_transition() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "log").await;
    let mut watcher = WsClient::connect_hello(&server.ws_url(), "watcher").await;
    watcher.join(&session, None, None).await;
    let mut worker = TestWorker::connect(server.addr, &["echo"], 1).await;
    let id = submit(&base, &session, json!({"kind": "echo", "input": {"q": 1}})).await;
    let assigned = worker.next_task().await;
    assert_eq!(assigned["id"], id.as_str());
    assert_eq!(assigned["kind"], "echo");
    assert_eq!(assigned["input"], json!({"q": 1}));
    assert_eq!(assigned["session"], session.as_str());
    assert_eq!(assigned["attempt"], 1);
    assert!(assigned["deadline"].is_string(), "{assigned}");
    assert_eq!(task(&base, &id).await["state"], "working");
    let ack = worker.progress(&assigned, json!({"pct": 50})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ack = worker.complete(&assigned, json!({"answer": 42})).await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let done = task(&base, &id).await;
    assert_eq!(done["state"], "completed");
    assert_eq!(done["output"], json!({"answer": 42}));
    assert_eq!(done["attempt"], 1);
    for field in ["id", "kind", "session", "input", "created_at", "updated_at"] {
        assert!(
            !done[field].is_null(),
            "GET /v1/tasks lacks {field}: {done}"
        );
    }

    // Subscribers hear each transition, in order.
    let mut kinds = Vec::new();
    while kinds.last().map(String::as_str) != Some("task.completed") {
        let frame = watcher.recv_until(|f| f["type"] == "event").await;
        if frame["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("task."))
        {
            assert_eq!(frame["data"]["task"], id.as_str(), "{frame}");
            kinds.push(frame["kind"].as_str().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(
        kinds,
        [
            "task.submitted",
            "task.working",
            "task.progress",
            "task.completed"
        ]
    );
    let events = all_events(&base, &session).await;
    let completed = events
        .iter()
        .find(|e| e["kind"] == "task.completed")
        .expect("task.completed in the stored log");
    assert_eq!(completed["data"]["output"], json!({"answer": 42}));
}

#[tokio::test]
async fn a_stale_or_unknown_lease_is_fenced_with_conflict() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "fence").await;
    let mut worker = TestWorker::connect(server.addr, &["echo"], 1).await;
    let id = submit(&base, &session, json!({"kind": "echo"})).await;
    let assigned = worker.next_task().await;

    let mut forged = assigned.clone();
    forged["lease"] = json!("not-the-lease");
    for answer in [
        worker.complete(&forged, json!({"forged": true})).await,
        worker.progress(&forged, json!({})).await,
        worker.fail(&forged, "forged", false).await,
    ] {
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], "conflict", "{answer}");
    }
    let mut unknown = assigned.clone();
    unknown["id"] = json!("0190a0a0-0000-7000-8000-000000000000");
    let answer = worker.complete(&unknown, json!({})).await;
    assert_eq!(answer["code"], "conflict", "{answer}");
    // None of that changed the task.
    assert_eq!(task(&base, &id).await["state"], "working");

    assert_eq!(
        worker.complete(&assigned, json!({"real": true})).await["type"],
        "ack"
    );
    // The lease is spent: a second completion is stale.
    let again = worker.complete(&assigned, json!({"second": true})).await;
    assert_eq!(again["code"], "conflict", "{again}");
    let done = task(&base, &id).await;
    assert_eq!(done["output"], json!({"real": true}), "{done}");
}

async fn a_lost_worker_s_task_is_retried_elsewhere(backend: Backend) {
    let server = server(backend);
    let base = server.http_url();
    let session = new_session(&base, "loss").await;
    let mut doomed = TestWorker::connect(server.addr, &["echo"], 1).await;
    let id = submit(&base, &session, json!({"kind": "echo", "max_attempts": 3})).await;
    let first = doomed.next_task().await;
    assert_eq!(first["attempt"], 1);
    // The worker dies mid-task: its socket drops without a word.
    drop(doomed);
    let mut rescuer = TestWorker::connect(server.addr, &["echo"], 1).await;
    let second = rescuer.next_task().await;
    assert_eq!(second["id"], id.as_str());
    assert_eq!(second["attempt"], 2, "the retry counts as a new attempt");
    assert_ne!(
        second["lease"], first["lease"],
        "every assignment gets a fresh lease"
    );
    assert_eq!(
        rescuer.complete(&second, json!({"ok": 1})).await["type"],
        "ack"
    );
    let done = task(&base, &id).await;
    assert_eq!(
        (done["state"].as_str(), done["attempt"].as_u64()),
        (Some("completed"), Some(2))
    );
    assert!(
        done["error"]
            .as_str()
            .is_some_and(|e| e.contains("disconnected")),
        "the last error is kept: {done}"
    );
}

#[tokio::test]
async fn a_lost_worker_s_task_is_retried_elsewhere_sqlite() {
    a_lost_worker_s_task_is_retried_elsewhere(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_lost_worker_s_task_is_retried_elsewhere_postgres() {
    a_lost_worker_s_task_is_retried_elsewhere(Backend::Postgres).await;
}

#[tokio::test]
async fn a_task_past_its_timeout_is_taken_back_and_retried() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "timeout").await;
    let mut slow = TestWorker::connect(server.addr, &["slow"], 1).await;
    let id = submit(&base, &session, json!({"kind": "slow", "timeout_s": 1})).await;
    let first = slow.next_task().await;
    // The worker sits on it; past the deadline the server takes it back…
    let cancel = slow.expect_within("cancel", Duration::from_secs(5)).await;
    assert_eq!(cancel["task"], id.as_str());
    // …and, the slot being free again, hands it out anew.
    let second = slow.next_task().await;
    assert_eq!(
        (second["id"].as_str(), second["attempt"].as_u64()),
        (Some(id.as_str()), Some(2))
    );
    let late = slow.complete(&first, json!({"late": true})).await;
    assert_eq!(
        late["code"], "conflict",
        "the timed-out lease is stale: {late}"
    );
    assert_eq!(
        slow.complete(&second, json!({"on_time": true})).await["type"],
        "ack"
    );
    let done = task(&base, &id).await;
    assert_eq!(done["output"], json!({"on_time": true}));
}

#[tokio::test]
async fn retryable_failures_back_off_until_max_attempts_then_fail_with_the_last_error() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "retry").await;
    let mut worker = TestWorker::connect(server.addr, &["flaky"], 1).await;
    let id = submit(&base, &session, json!({"kind": "flaky", "max_attempts": 3})).await;
    for attempt in 1..=3 {
        let assigned = worker.next_task().await;
        assert_eq!(assigned["attempt"], attempt);
        let ack = worker
            .fail(&assigned, &format!("boom {attempt}"), true)
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let failed = wait_task(&base, &id, LONG, |t| t["state"] == "failed").await;
    assert_eq!(failed["attempt"], 3);
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("boom 3")),
        "{failed}"
    );
    assert!(
        worker
            .drain(Duration::from_millis(500))
            .await
            .iter()
            .all(|f| f["type"] != "assign"),
        "a task out of attempts is not assigned again"
    );

    // `retryable: false` fails at once, whatever attempts are left.
    let id = submit(&base, &session, json!({"kind": "flaky", "max_attempts": 5})).await;
    let assigned = worker.next_task().await;
    worker.fail(&assigned, "bad input", false).await;
    let failed = task(&base, &id).await;
    assert_eq!(
        (failed["state"].as_str(), failed["attempt"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(failed["error"], "bad input");
}

#[tokio::test]
async fn cancel_ends_a_queued_task_at_once_and_takes_a_working_one_from_its_worker() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "cancel").await;

    // Queued: no worker can take it.
    let queued = submit(&base, &session, json!({"kind": "nobody"})).await;
    let (status, body) = post_json(&format!("{base}/v1/tasks/{queued}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "canceled");
    let (status, body) = post_json(&format!("{base}/v1/tasks/{queued}/cancel"), &json!({})).await;
    assert_eq!(status, 409, "canceling twice: {body}");

    // Working: its worker is told, and its late result is refused.
    let mut worker = TestWorker::connect(server.addr, &["echo"], 1).await;
    let working = submit(&base, &session, json!({"kind": "echo"})).await;
    let assigned = worker.next_task().await;
    // Over the socket, this time.
    let mut user = WsClient::connect_hello(&server.ws_url(), "canceller").await;
    user.send(json!({"type": "task.cancel", "ref": "c1", "task": working}))
        .await;
    let ack = user.recv_until(|f| f["ref"] == "c1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["task"], working.as_str());
    let cancel = worker.expect_within("cancel", Duration::from_secs(5)).await;
    assert_eq!(cancel["task"], working.as_str());
    assert_eq!(task(&base, &working).await["state"], "canceled");
    let late = worker.complete(&assigned, json!({})).await;
    assert_eq!(late["code"], "conflict", "{late}");
    // The slot is free again.
    let next = submit(&base, &session, json!({"kind": "echo"})).await;
    assert_eq!(worker.next_task().await["id"], next.as_str());
    let events = all_events(&base, &session).await;
    let canceled: HashSet<&str> = events
        .iter()
        .filter(|e| e["kind"] == "task.canceled")
        .filter_map(|e| e["data"]["task"].as_str())
        .collect();
    assert_eq!(canceled, HashSet::from([queued.as_str(), working.as_str()]));
}

async fn a_flooding_session_cannot_starve_another(backend: Backend) {
    let server = TestServer::start(backend, |config| {
        fast_retries(config);
        config.limits.rate_per_s = 100_000;
        config.limits.rate_burst = 100_000;
    });
    let base = server.http_url();
    let flood = new_session(&base, "flood").await;
    let small = new_session(&base, "small").await;
    let mut submitter = WsClient::connect_hello(&server.ws_url(), "submitter").await;
    let mut last_task = String::new();
    for (session, count) in [(&flood, 2000), (&small, 10)] {
        for i in 0..count {
            submitter
                .send(
                    json!({"type": "task.submit", "ref": format!("{session}-{i}"),
                    "session": session, "kind": "work", "input": {"i": i}}),
                )
                .await;
        }
        // Every submission of this session is durable before the next session's start.
        let mut acked = 0;
        while acked < count {
            let frame = submitter
                .recv_until(|f| f["type"] == "ack" || f["type"] == "error")
                .await;
            assert_eq!(frame["type"], "ack", "{frame}");
            acked += 1;
            last_task = frame["task"].as_str().unwrap_or_default().to_owned();
        }
    }
    // One worker works through the queue; B's tasks come in the first few rounds.
    let mut worker = TestWorker::connect(server.addr, &["work"], 4).await;
    let mut order = Vec::new();
    while order.iter().filter(|s: &&String| **s == small).count() < 10 {
        assert!(
            order.len() < 300,
            "session B still waits after {} tasks: {:?} {}",
            order.len(),
            &order[..20],
            task(&base, &last_task).await
        );
        let assigned = worker.next_task().await;
        order.push(assigned["session"].as_str().unwrap_or_default().to_owned());
        assert_eq!(worker.complete(&assigned, json!({})).await["type"], "ack");
    }
    // Round-robin: B's ten finish within the first ~twenty, not after A's two thousand.
    assert!(
        order.len() <= 40,
        "B's tasks finished only by position {}",
        order.len()
    );
}

#[tokio::test]
async fn a_flooding_session_cannot_starve_another_sqlite() {
    a_flooding_session_cannot_starve_another(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_flooding_session_cannot_starve_another_postgres() {
    a_flooding_session_cannot_starve_another(Backend::Postgres).await;
}

#[tokio::test]
async fn priority_comes_first() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "prio").await;
    let low = submit(&base, &session, json!({"kind": "p", "priority": 0})).await;
    let high = submit(&base, &session, json!({"kind": "p", "priority": 10})).await;
    let mut worker = TestWorker::connect(server.addr, &["p"], 1).await;
    let first = worker.next_task().await;
    assert_eq!(first["id"], high.as_str());
    worker.complete(&first, json!({})).await;
    assert_eq!(worker.next_task().await["id"], low.as_str());
}

#[tokio::test]
async fn unknown_kinds_wait_for_a_capable_worker() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "unknown").await;
    let mut other = TestWorker::connect(server.addr, &["something-else"], 4).await;
    let id = submit(&base, &session, json!({"kind": "rare"})).await;
    let frames = other.drain(Duration::from_millis(1500)).await;
    assert!(frames.iter().all(|f| f["type"] != "assign"), "{frames:?}");
    assert_eq!(
        task(&base, &id).await["state"],
        "submitted",
        "no error, it waits"
    );
    let mut capable = TestWorker::connect(server.addr, &["rare"], 1).await;
    assert_eq!(capable.next_task().await["id"], id.as_str());
}

#[tokio::test]
async fn bad_submissions_and_bad_worker_frames_are_refused_and_the_server_stays_up() {
    let server = TestServer::start(Backend::Sqlite, |config| {
        fast_retries(config);
        config.limits.max_task_output_bytes = 1024;
    });
    let base = server.http_url();
    let session = new_session(&base, "bad").await;
    for body in [
        json!({"kind": "k", "priority": -1}),
        json!({"kind": "k", "priority": 1_000_000}),
        json!({"kind": "k", "max_attempts": 0}),
        json!({"kind": "k", "max_attempts": 1u64 << 40}),
        json!({"kind": "k", "timeout_s": -1}),
        json!({"kind": "k", "timeout_s": 10_000_000}),
        json!({"kind": "has space"}),
        json!({"input": {}}),
    ] {
        let (status, answer) =
            post_json(&format!("{base}/v1/sessions/{session}/tasks"), &body).await;
        assert_eq!(status, 400, "{body} → {answer}");
        common::assert_error_body(&answer, "bad_request");
    }
    let mut user = WsClient::connect_hello(&server.ws_url(), "user").await;
    user.send(
        json!({"type": "task.submit", "ref": "b", "session": session, "kind": "k",
        "max_attempts": -3}),
    )
    .await;
    let refused = user.recv_until(|f| f["ref"] == "b").await;
    assert_eq!(refused["code"], "bad_request", "{refused}");

    // The worker door: hello first, sane capacity.
    for hello in [
        json!({"type": "hello", "capabilities": ["k"], "capacity": 0}),
        json!({"type": "hello", "capabilities": ["k"], "capacity": -4}),
        json!({"type": "hello", "capabilities": ["k"], "capacity": 1_000_000}),
        json!({"type": "hello", "capabilities": [], "capacity": 1}),
        json!({"type": "hello", "capabilities": ["k"]}),
    ] {
        let mut ws = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
        ws.send(hello.clone()).await;
        let answer = ws.recv().await;
        assert_eq!(answer["code"], "bad_request", "{hello} → {answer}");
    }
    let mut ws = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
    ws.send(json!({"type": "heartbeat", "ref": "early"})).await;
    assert_eq!(ws.recv().await["code"], "unauthorized");
    for garbage in [
        "not json",
        "{}",
        r#"{"type":"assign"}"#,
        r#"{"type":"complete","task":"x"}"#,
    ] {
        ws.send_text(garbage).await;
        assert_eq!(ws.recv().await["code"], "bad_request", "{garbage}");
    }

    // An output over the limit is refused, and the task fails with a clear error.
    let mut worker = TestWorker::connect(server.addr, &["big"], 1).await;
    let id = submit(&base, &session, json!({"kind": "big"})).await;
    let assigned = worker.next_task().await;
    let refused = worker
        .complete(&assigned, json!({"blob": "x".repeat(4096)}))
        .await;
    assert_eq!(refused["code"], "too_large", "{refused}");
    let failed = task(&base, &id).await;
    assert_eq!(failed["state"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("exceeds the limit")),
        "{failed}"
    );
    // Still serving.
    let (status, _) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(status, 200);
    let ok = submit(&base, &session, json!({"kind": "big"})).await;
    let assigned = worker.next_task().await;
    assert_eq!(assigned["id"], ok.as_str());
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_is_dropped_and_its_task_retried() {
    let server = TestServer::start(Backend::Sqlite, |config| {
        fast_retries(config);
        config.limits.worker_heartbeat_s = 1;
    });
    let base = server.http_url();
    let session = new_session(&base, "hb").await;
    let mut silent = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
    silent
        .send(json!({"type": "hello", "capabilities": ["hb"], "capacity": 1}))
        .await;
    assert_eq!(silent.recv().await["type"], "welcome");
    let id = submit(&base, &session, json!({"kind": "hb"})).await;
    let assigned = silent.recv_until(|f| f["type"] == "assign").await;
    assert_eq!(assigned["task"]["id"], id.as_str());
    // No heartbeats: after three missed ones (3 s) the server lets the worker go.
    // wait_end fails the test if the socket is still open after 8 s.
    let (ending, frames) = silent.wait_end(Duration::from_secs(8)).await;
    assert!(
        frames.iter().any(|f| f["type"] == "error"),
        "dropped without a word ({ending:?}): {frames:?}"
    );
    let retried = wait_task(&base, &id, LONG, |t| {
        t["state"] == "submitted" && t["attempt"] == 1
    })
    .await;
    assert!(
        retried["error"]
            .as_str()
            .is_some_and(|e| e.contains("disconnected")),
        "{retried}"
    );
}

#[tokio::test]
async fn the_worker_door_admits_agents_and_admins_only() {
    let server = TestServer::start(Backend::Sqlite, tokens_only);
    use conclave::protocol::Role;
    for (role, admitted) in [
        (Role::Agent, true),
        (Role::Admin, true),
        (Role::Editor, false),
        (Role::Viewer, false),
    ] {
        let token = common::token("w", role);
        let mut ws = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
        ws.send(json!({"type": "hello", "token": token, "capabilities": ["k"], "capacity": 1}))
            .await;
        let answer = ws.recv().await;
        if admitted {
            assert_eq!(answer["type"], "welcome", "{role:?}: {answer}");
        } else {
            assert_eq!(answer["code"], "forbidden", "{role:?}: {answer}");
        }
    }
    let mut ws = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
    ws.send(json!({"type": "hello", "capabilities": ["k"], "capacity": 1}))
        .await;
    assert_eq!(
        ws.recv().await["code"],
        "unauthorized",
        "no token, no entry"
    );
    let mut ws = WsClient::connect(&format!("ws://{}/v1/workers", server.addr)).await;
    ws.send(
        json!({"type": "hello", "token": "forged.token.here", "capabilities": ["k"],
        "capacity": 1}),
    )
    .await;
    assert_eq!(ws.recv().await["code"], "unauthorized");
}

#[tokio::test]
async fn task_routes_check_roles_and_scopes() {
    let server = TestServer::start(Backend::Sqlite, tokens_only);
    let base = server.http_url();
    let admin = common::token("admin", conclave::protocol::Role::Admin);
    let client = common::http();
    let (status, _) = common::send_with(
        client
            .post(format!("{base}/v1/sessions"))
            .bearer_auth(&admin)
            .json(&json!({"id": "scoped-a"})),
    )
    .await;
    assert_eq!(status, 201);
    let submit_as = |token: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            common::send_with(
                client
                    .post(format!("{base}/v1/sessions/scoped-a/tasks"))
                    .bearer_auth(token)
                    .json(&json!({"kind": "k"})),
            )
            .await
        }
    };
    let (status, body) = submit_as(common::token("v", conclave::protocol::Role::Viewer)).await;
    assert_eq!(status, 403, "a viewer may not submit: {body}");
    let (status, body) = submit_as(common::scoped_token(
        "e",
        conclave::protocol::Role::Editor,
        &["other-*"],
    ))
    .await;
    assert_eq!(status, 403, "outside the editor's scope: {body}");
    let (status, body) = submit_as(common::scoped_token(
        "e",
        conclave::protocol::Role::Editor,
        &["scoped-*"],
    ))
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let (status, _) = common::send_with(client.get(format!("{base}/v1/tasks/{id}"))).await;
    assert_eq!(status, 401, "no token");
    let outsider = common::scoped_token("o", conclave::protocol::Role::Admin, &["other-*"]);
    let (status, _) = common::send_with(
        client
            .get(format!("{base}/v1/tasks/{id}"))
            .bearer_auth(&outsider),
    )
    .await;
    assert_eq!(status, 403, "a task outside the scope is forbidden");
    let (status, _) = common::send_with(
        client
            .post(format!("{base}/v1/tasks/{id}/cancel"))
            .bearer_auth(common::token("v", conclave::protocol::Role::Viewer)),
    )
    .await;
    assert_eq!(status, 403, "a viewer may not cancel");
    let (status, task) = common::send_with(
        client
            .get(format!("{base}/v1/tasks/{id}"))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!((status, task["state"].as_str()), (200, Some("submitted")));
}

#[tokio::test]
async fn a_draining_worker_finishes_its_tasks_and_takes_no_more() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "drain").await;
    let mut worker = TestWorker::connect(server.addr, &["d"], 2).await;
    let first = submit(&base, &session, json!({"kind": "d"})).await;
    let assigned = worker.next_task().await;
    assert_eq!(assigned["id"], first.as_str());
    let ack = worker.request(json!({"type": "drain"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let second = submit(&base, &session, json!({"kind": "d"})).await;
    let frames = worker.drain(Duration::from_millis(800)).await;
    assert!(
        frames.iter().all(|f| f["type"] != "assign"),
        "a draining worker got new work: {frames:?}"
    );
    // What it holds still completes.
    assert_eq!(worker.complete(&assigned, json!({})).await["type"], "ack");
    assert_eq!(task(&base, &first).await["state"], "completed");
    // Another worker takes what the draining one would not.
    let mut fresh = TestWorker::connect(server.addr, &["d"], 1).await;
    assert_eq!(fresh.next_task().await["id"], second.as_str());
}

#[tokio::test]
async fn a_store_outage_refuses_task_writes_and_service_resumes() {
    let server = server(Backend::Sqlite);
    let base = server.http_url();
    let session = new_session(&base, "outage").await;
    let mut worker = TestWorker::connect(server.addr, &["o"], 1).await;
    let held = submit(&base, &session, json!({"kind": "o"})).await;
    let assigned = worker.next_task().await;

    server.switch.set_outage(true);
    let (status, body) = post_json(
        &format!("{base}/v1/sessions/{session}/tasks"),
        &json!({"kind": "o"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    common::assert_error_body(&body, "storage_unavailable");
    let mut user = WsClient::connect_hello(&server.ws_url(), "user").await;
    user.send(json!({"type": "task.submit", "ref": "s", "session": session, "kind": "o"}))
        .await;
    assert_eq!(
        user.recv_until(|f| f["ref"] == "s").await["code"],
        "storage_unavailable"
    );
    let (status, body) = post_json(
        &format!("{base}/v1/sessions/{session}/councils"),
        &json!({"question": "q", "members": {"user": "ada"}, "strategy": "majority"}),
    )
    .await;
    assert_eq!(status, 503, "a council is not opened unsaved: {body}");
    // A completion that cannot be stored is not acked, and the task stays the worker's.
    let refused = worker.complete(&assigned, json!({"try": 1})).await;
    assert_eq!(refused["code"], "storage_unavailable", "{refused}");
    assert_eq!(task(&base, &held).await["state"], "working");

    server.switch.set_outage(false);
    assert_eq!(
        worker.complete(&assigned, json!({"try": 2})).await["type"],
        "ack"
    );
    assert_eq!(task(&base, &held).await["output"], json!({"try": 2}));
    let next = submit(&base, &session, json!({"kind": "o"})).await;
    assert_eq!(worker.next_task().await["id"], next.as_str());
}
