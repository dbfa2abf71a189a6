//! Supervision: a panic in one session actor restarts it from its checkpoint; its connections
//! stay open and get a `reset` with a fresh snapshot; other sessions never notice; a crash loop
//! is given up. Likewise a council (resumed from its saved state, ballots kept) and the
//! scheduler (its workers stay connected; what they held is canceled and retried).

mod common;

use std::time::{Duration, Instant};

use common::worker::{TestWorker, new_session, submit, wait_task};
use common::{TestServer, WsClient, get_json};
use serde_json::{Value, json};

async fn panic_session(server: &TestServer, session: &str) {
    let status = common::http()
        .post(format!(
            "{}/v1/faults/sessions/{session}/panic",
            server.http_url()
        ))
        .send()
        .await
        .expect("fault route")
        .status()
        .as_u16();
    assert_eq!(status, 202, "the fault route did not take");
}

async fn metric(server: &TestServer, name: &str) -> u64 {
    metric_where(server, name, "").await
}

async fn metric_where(server: &TestServer, name: &str, label: &str) -> u64 {
    common::metric(&server.http_url(), name, label).await as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_restarts_and_its_clients_recover() {
    let server = TestServer::sqlite();
    let mut victim = WsClient::connect_hello(&server.ws_url(), "victim").await;
    let mut bystander = WsClient::connect_hello(&server.ws_url(), "bystander").await;
    victim.join("crashy", None, None).await;
    bystander.join("calm", None, None).await;
    let before = victim.chat("crashy", "acked before the crash").await;
    // An edit, too: the document must come back from the store.
    victim
        .send(
            json!({"type": "edit", "ref": "e", "session": "crashy", "doc": "main",
                     "base": 0, "ops": [{"insert": "kept"}]}),
        )
        .await;
    let ack = victim.recv_until(|f| f["ref"] == "e").await;
    assert_eq!(ack["version"], 1, "{ack}");

    panic_session(&server, "crashy").await;

    // The victim's socket stays open: it gets reset, then a snapshot with the committed state.
    let reset = victim.recv_until(|f| f["type"] == "reset").await;
    assert_eq!(reset["session"], "crashy");
    let snapshot = victim
        .recv_until(|f| f["type"] == "joined" && f["ref"].is_null())
        .await;
    assert_eq!(snapshot["offset"].as_u64(), Some(before), "{snapshot}");
    assert_eq!(snapshot["docs"][0]["text"], "kept", "{snapshot}");
    assert!(
        snapshot["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|u| u["name"] == "victim")),
        "the victim is no longer a member: {snapshot}"
    );
    // And it goes on, without rejoining, with gap-free offsets.
    let after = victim.chat("crashy", "after the crash").await;
    assert_eq!(after, before + 1, "offsets jumped across the restart");

    // The other session never noticed.
    bystander.chat("calm", "all quiet").await;
    let extra = bystander.drain(Duration::from_millis(200)).await;
    assert!(
        extra.iter().all(|f| f["type"] != "reset"),
        "a bystander was reset: {extra:?}"
    );
    assert!(metric(&server, "conclave_actor_panics_total").await >= 1);
    assert!(metric(&server, "conclave_actor_restarts_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_given_up() {
    let server = TestServer::sqlite();
    let mut client = WsClient::connect_hello(&server.ws_url(), "looper").await;
    client.join("loop", None, None).await;
    let mut gave_up = None;
    for _ in 0..10 {
        // Wait for the session to be back before crashing it again.
        let mut live = false;
        for _ in 0..100 {
            let status = common::http()
                .post(format!(
                    "{}/v1/faults/sessions/loop/panic",
                    server.http_url()
                ))
                .send()
                .await
                .expect("fault route")
                .status()
                .as_u16();
            if status == 202 {
                live = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(live, "the session never came back");
        let frame = client
            .recv_until(|f| f["type"] == "reset" || f["type"] == "error")
            .await;
        if frame["type"] == "error" {
            gave_up = Some(frame);
            break;
        }
    }
    let frame = gave_up.expect("the crash loop was never given up");
    assert_eq!(frame["code"], "internal", "{frame}");
    assert!(
        frame["message"]
            .as_str()
            .unwrap_or("")
            .contains("failed repeatedly"),
        "{frame}"
    );
    assert_eq!(
        metric(&server, "conclave_supervisor_gave_up_total").await,
        1
    );
    // Membership ended: a chat is refused as "not joined", and the node is healthy.
    client
        .send(json!({"type": "chat", "ref": "c", "session": "loop", "text": "hi"}))
        .await;
    let reply = client.recv_until(|f| f["ref"] == "c").await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    client.ping_pong().await;
}

async fn post_fault(server: &TestServer, path: &str) -> u16 {
    common::http()
        .post(format!("{}/v1/faults/{path}", server.http_url()))
        .send()
        .await
        .expect("fault route")
        .status()
        .as_u16()
}

/// Sends a ballot until the council takes it: while a crashed council restarts, ballots are
/// refused as `conflict` ("restarting").
async fn ballot(client: &mut WsClient, council: &str, phase: &str, ballot: Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 0.. {
        let reference = format!("{phase}-{attempt}");
        client
            .send(
                json!({"type": "council.ballot", "ref": reference, "council": council,
                "phase": phase, "ballot": ballot}),
            )
            .await;
        let reply = client.recv_until(|f| f["ref"] == reference.as_str()).await;
        if reply["type"] == "ack" {
            return;
        }
        assert!(
            reply["message"]
                .as_str()
                .unwrap_or("")
                .contains("restarting"),
            "ballot refused: {reply}"
        );
        assert!(Instant::now() < deadline, "the council never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_council_resumes_from_its_saved_state() {
    let server = TestServer::sqlite();
    let base = server.http_url();
    let session = new_session(&base, "council-crash").await;
    let mut ada = WsClient::connect_hello(&server.ws_url(), "Ada").await;
    let mut bob = WsClient::connect_hello(&server.ws_url(), "Bob").await;
    ada.join(&session, None, None).await;
    bob.join(&session, None, None).await;
    let members = json!([{"user": ada.user_id()}, {"user": bob.user_id()}]);
    ada.send(
        json!({"type": "council.open", "ref": "o", "session": session, "question": "Drink?",
        "members": members, "strategy": "majority", "phase_timeout_s": 30, "quorum": 2}),
    )
    .await;
    let ack = ada.recv_until(|f| f["ref"] == "o").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["council"].as_str().expect("council id").to_owned();
    ballot(
        &mut ada,
        &id,
        "propose",
        json!({"answer": "Tea", "confidence": 0.9}),
    )
    .await;

    assert_eq!(
        post_fault(&server, &format!("councils/{id}/panic")).await,
        202
    );

    // Bob's proposal reaches the restarted council, which still has Ada's: the review starts
    // with both, and the deliberation ends in a decision.
    ballot(
        &mut bob,
        &id,
        "propose",
        json!({"answer": "Coffee", "confidence": 0.4}),
    )
    .await;
    let phase = ada
        .recv_until(|f| f["kind"] == "council.phase" && f["data"]["phase"] == "review")
        .await;
    let shown = phase["data"]["proposals"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(shown.len(), 2, "a proposal was lost in the crash: {phase}");
    let label_of = |answer: &str| {
        shown
            .iter()
            .find(|(_, a)| a.as_str() == Some(answer))
            .map(|(label, _)| label.clone())
            .unwrap_or_else(|| panic!("no proposal {answer} in {phase}"))
    };
    let (tea, coffee) = (label_of("Tea"), label_of("Coffee"));
    ballot(&mut ada, &id, "review", json!({"ranking": [coffee]})).await;
    ballot(&mut bob, &id, "review", json!({"ranking": [tea]})).await;
    let decided = ada.recv_until(|f| f["kind"] == "council.decided").await;
    assert_eq!(decided["data"]["council"], id.as_str(), "{decided}");
    let (_, council) = get_json(&format!("{base}/v1/councils/{id}")).await;
    assert_eq!(council["state"], "decided", "{council}");
    assert!(metric_where(&server, "conclave_actor_panics_total", "kind=\"council\"").await >= 1);
    assert!(metric_where(&server, "conclave_actor_restarts_total", "kind=\"council\"").await >= 1);
}

/// Waits until the node's scheduler answers (it is restarted after a crash).
async fn scheduler_answers(server: &TestServer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_json(&format!("{}/v1/workers", server.http_url()))
        .await
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "the scheduler never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_scheduler_restarts_and_its_workers_recover() {
    let server = TestServer::sqlite_with(|c| c.limits.task_retry_base_ms = 50);
    let base = server.http_url();
    let session = new_session(&base, "scheduler-crash").await;
    let mut worker = TestWorker::connect(server.addr, &["echo"], 1).await;
    let mut client = WsClient::connect_hello(&server.ws_url(), "bystander").await;
    client.join(&session, None, None).await;
    let task = submit(&base, &session, json!({"kind": "echo", "input": {"n": 1}})).await;
    let first = worker.next_task().await;
    assert_eq!(first["id"], task.as_str());

    assert_eq!(post_fault(&server, "scheduler/panic").await, 202);

    // The worker's socket stays open. What it held is canceled first, then retried on it.
    let cancel = worker
        .expect_within("cancel", Duration::from_secs(10))
        .await;
    assert_eq!(cancel["task"], task.as_str(), "{cancel}");
    let again = worker.next_task().await;
    assert_eq!(again["id"], task.as_str());
    assert_eq!(again["attempt"], 2, "{again}");
    // The old lease is fenced off; the new one completes the task.
    let stale = worker.complete(&first, json!({"stale": true})).await;
    assert_eq!(stale["code"], "conflict", "{stale}");
    let done = worker.complete(&again, json!({"echo": 1})).await;
    assert_eq!(done["type"], "ack", "{done}");
    let record = wait_task(&base, &task, Duration::from_secs(10), |t| {
        t["state"] == "completed"
    })
    .await;
    assert_eq!(record["output"], json!({"echo": 1}), "{record}");

    // The restarted scheduler assigns new work to the same connection.
    let next = submit(&base, &session, json!({"kind": "echo", "input": {"n": 2}})).await;
    let assigned = worker.next_task().await;
    assert_eq!(assigned["id"], next.as_str());
    let (_, workers) = get_json(&format!("{base}/v1/workers")).await;
    assert_eq!(workers.as_array().map(Vec::len), Some(1), "{workers}");
    assert_eq!(workers[0]["load"], 1, "{workers}");
    // Sessions never noticed.
    client.chat(&session, "still here").await;
    assert!(
        metric_where(
            &server,
            "conclave_actor_restarts_total",
            "kind=\"scheduler\""
        )
        .await
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_crash_loop_is_given_up_and_its_workers_are_let_go() {
    let server = TestServer::sqlite();
    let mut worker = TestWorker::connect(server.addr, &["echo"], 1).await;
    for _ in 0..6 {
        scheduler_answers(&server).await;
        assert_eq!(post_fault(&server, "scheduler/panic").await, 202);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker
        .ws
        .expect_closed_with(Duration::from_secs(10), "internal", 1011)
        .await;
    assert_eq!(
        metric_where(
            &server,
            "conclave_supervisor_gave_up_total",
            "kind=\"scheduler\""
        )
        .await,
        1
    );
    let (status, ready) = get_json(&format!("{}/readyz", server.http_url())).await;
    assert_eq!(status, 503, "{ready}");
    // Sessions are served still.
    let mut client = WsClient::connect_hello(&server.ws_url(), "after").await;
    client.join("after-give-up", None, None).await;
    client.chat("after-give-up", "still serving").await;
}
