//! `conclave worker --exec`: a shell script becomes a worker of a real node. Its stdout is the
//! output, its stderr lines are progress, a non-zero exit is a retryable failure, and SIGTERM
//! drains it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::worker::{new_session, submit, wait_task};
use common::{Backend, TestServer, all_events, get_json};
use serde_json::json;

const SCRIPT: &str = r#"#!/bin/sh
input=$(cat)
echo "working on $CONCLAVE_TASK_KIND" >&2
case "$input" in
  *fail*) echo "it went wrong" >&2; exit 3 ;;
  *text*) echo "plain words" ;;
  *) printf '{"got": %s, "attempt": %s}' "$input" "$CONCLAVE_TASK_ATTEMPT" ;;
esac
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_script_works_as_a_worker() {
    let server = TestServer::start(Backend::Sqlite, |config| {
        config.limits.task_retry_base_ms = 20;
    });
    let base = server.http_url();
    let dir = tempfile::tempdir().expect("script dir");
    let script = dir.path().join("worker.sh");
    std::fs::write(&script, SCRIPT).expect("writing the script");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_conclave"))
        .args(["worker", "--url", &format!("ws://{}", server.addr)])
        .args(["--capability", "sh", "--capacity", "2", "--name", "script"])
        .arg("--exec")
        .arg(format!("sh {}", script.display()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting conclave worker");

    // It shows up as a connected worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, workers) = get_json(&format!("{base}/v1/workers")).await;
        if workers
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == "script"))
        {
            assert_eq!(workers[0]["capacity"], 2, "{workers}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never connected: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let session = new_session(&base, "exec").await;
    let json_task = submit(&base, &session, json!({"kind": "sh", "input": {"n": 2}})).await;
    let text_task = submit(
        &base,
        &session,
        json!({"kind": "sh", "input": "text please"}),
    )
    .await;
    let failing = submit(
        &base,
        &session,
        json!({"kind": "sh", "input": "please fail", "max_attempts": 2}),
    )
    .await;

    let done = wait_task(&base, &json_task, Duration::from_secs(15), |t| {
        t["state"] == "completed"
    })
    .await;
    assert_eq!(
        done["output"],
        json!({"got": {"n": 2}, "attempt": 1}),
        "stdout JSON is the output"
    );
    let done = wait_task(&base, &text_task, Duration::from_secs(15), |t| {
        t["state"] == "completed"
    })
    .await;
    assert_eq!(
        done["output"],
        json!({"text": "plain words\n"}),
        "other stdout is text"
    );
    let failed = wait_task(&base, &failing, Duration::from_secs(15), |t| {
        t["state"] == "failed"
    })
    .await;
    assert_eq!(failed["attempt"], 2, "a non-zero exit is retried: {failed}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains('3') && error.contains("it went wrong"),
        "{error}"
    );

    let events = all_events(&base, &session).await;
    let progress = events
        .iter()
        .find(|e| e["kind"] == "task.progress" && e["data"]["task"] == json_task.as_str())
        .expect("stderr became progress");
    assert_eq!(progress["data"]["progress"]["line"], "working on sh");

    // SIGTERM drains it: it exits cleanly and leaves the node's worker list.
    let pid = i32::try_from(worker.id()).expect("pid");
    // SAFETY: signalling the child this test started, by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = worker.try_wait().expect("waiting for the worker") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the worker exited with {status}");
    let (_, workers) = get_json(&format!("{base}/v1/workers")).await;
    assert_eq!(workers, json!([]), "it left the node");
}
