//! Tasks survive `kill -9`: the real binary dies with tasks queued, working and completed; after
//! a restart on the same store, the completed ones keep their results, the working ones are
//! retried once their leases lapse, the queued ones run, and every task completes exactly once
//! from the submitter's point of view. Both backends.

mod common;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::time::{Duration, Instant};

use common::worker::{TestWorker, new_session, submit, task};
use common::{PgDatabase, all_events, data_dir_args, spawn_binary};
use serde_json::json;

const TASKS: usize = 20;

async fn tasks_survive_kill_9(extra: &[OsString]) {
    let data = tempfile::tempdir().expect("data dir");
    let mut args = data_dir_args(data.path());
    // One-second heartbeats: a dead node's leases lapse after three seconds.
    for arg in ["--worker-heartbeat-s", "1", "--task-retry-base-ms", "20"] {
        args.push(arg.into());
    }
    args.extend(extra.iter().cloned());

    let mut server = spawn_binary(&args, &[]).await;
    let base = server.http_url();
    let session = new_session(&base, "durable").await;
    let mut ids = Vec::new();
    for i in 0..TASKS {
        ids.push(submit(&base, &session, json!({"kind": "echo", "input": {"i": i}})).await);
    }
    let mut before = TestWorker::connect(server.addr, &["echo"], 4).await;
    let mut completed_before = HashMap::new();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(before.next_task().await);
    }
    // Two complete (acked: durable), two are still working when the node dies.
    for assigned in held.drain(..2) {
        let ack = before
            .complete(
                &assigned,
                json!({"echo": assigned["input"], "by": "before"}),
            )
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        completed_before.insert(
            assigned["id"].as_str().unwrap_or_default().to_owned(),
            assigned,
        );
    }
    // The completions' log events are appended right after the ack; give them their commit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The freed slots were filled again meanwhile: count what is working at the kill.
    let mut working_at_kill = 0;
    for id in &ids {
        if task(&base, id).await["state"] == "working" {
            working_at_kill += 1;
        }
    }
    assert!(working_at_kill >= 2, "{working_at_kill} tasks working");
    server.kill_9();
    drop(before);

    let server = spawn_binary(&args, &[]).await;
    let base = server.http_url();
    for (id, assigned) in &completed_before {
        let kept = task(&base, id).await;
        assert_eq!(
            kept["state"], "completed",
            "an acked completion was lost: {kept}"
        );
        assert_eq!(kept["output"]["echo"], assigned["input"], "{kept}");
        assert_eq!(kept["output"]["by"], "before");
    }
    let mut after = TestWorker::connect(server.addr, &["echo"], 4).await;
    let mut completed_after = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while completed_after.len() + completed_before.len() < TASKS {
        assert!(
            Instant::now() < deadline,
            "only {} tasks completed",
            completed_after.len()
        );
        let assigned = after.next_task().await;
        let id = assigned["id"].as_str().unwrap_or_default().to_owned();
        assert!(
            !completed_before.contains_key(&id),
            "a completed task ran again: {assigned}"
        );
        let ack = after
            .complete(&assigned, json!({"echo": assigned["input"], "by": "after"}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert!(completed_after.insert(id), "a task was completed twice");
    }
    // Nothing more comes: every task is done.
    let extra = after.drain(Duration::from_millis(1500)).await;
    assert!(extra.iter().all(|f| f["type"] != "assign"), "{extra:?}");

    let mut retried = 0;
    for id in &ids {
        let done = task(&base, id).await;
        assert_eq!(done["state"], "completed", "{done}");
        assert_eq!(done["output"]["echo"], done["input"], "{done}");
        if done["attempt"] == 2 {
            retried += 1;
        }
    }
    assert_eq!(
        retried, working_at_kill,
        "each task working at the kill was retried once"
    );
    // The submitter's view: one task.completed per task, never two.
    let events = all_events(&base, &session).await;
    let mut completions: HashMap<String, usize> = HashMap::new();
    for event in events.iter().filter(|e| e["kind"] == "task.completed") {
        *completions
            .entry(
                event["data"]["task"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    assert_eq!(completions.len(), TASKS, "{completions:?}");
    assert!(completions.values().all(|n| *n == 1), "{completions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_kill_9_sqlite() {
    tasks_survive_kill_9(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_kill_9_postgres() {
    let db = PgDatabase::create();
    tasks_survive_kill_9(&["--database-url".into(), db.url.clone().into()]).await;
    drop(db);
}
