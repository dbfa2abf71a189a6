//! The web page in a real browser: starts a real node on a random loopback port (checking tokens,
//! still admitting anonymous people) with scripted worker agents (one that echoes `echo` tasks,
//! three council members), then runs
//! `tests/web/browser.test.mjs`, which drives Debian's headless Chromium through `playwright-core`
//! against the node, and asserts that it passes. Screenshots land in `target/web-screenshots/`.
//!
//! Needs `/usr/bin/chromium` (`apt-get install -y chromium`) and the pinned npm packages
//! (`cd tests/web && npm ci`); `scripts/test.sh` installs both. Without them this test fails with
//! the fix, never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::worker::TestWorker;
use common::{TestServer, token, with_tokens};
use conclave::protocol::Role;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The whole browser run, launch to last assertion; the script's own waits are much shorter.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);

/// How long a scripted worker waits for its next frame before it gives up.
const WORKER_IDLE: Duration = Duration::from_secs(180);

/// What a scripted worker does with one task: its progress reports, then its output (`None`:
/// it never answers).
type Script = Arc<dyn Fn(&str, &Value) -> (Vec<Value>, Option<Value>) + Send + Sync>;

/// Connects a worker with `capabilities` that handles every `assign` by `script`, until the
/// returned task is aborted.
async fn worker(
    addr: std::net::SocketAddr,
    capabilities: &[&str],
    script: Script,
) -> JoinHandle<()> {
    let mut worker = TestWorker::connect(addr, capabilities, 4).await;
    tokio::spawn(async move {
        while let Some(frame) = worker.try_recv(WORKER_IDLE).await {
            if frame["type"] != "assign" {
                continue;
            }
            let task = frame["task"].clone();
            let (progress, output) =
                script(task["kind"].as_str().unwrap_or_default(), &task["input"]);
            for data in progress {
                worker.progress(&task, data).await;
            }
            if let Some(output) = output {
                worker.complete(&task, output).await;
            }
        }
    })
}

/// Echoes an `echo` task's input back, after one progress report.
fn echo() -> Script {
    Arc::new(|_, input| {
        (
            vec![json!({"percent": 50, "message": "halfway"})],
            Some(json!({"echoed": input, "by": "the test worker"})),
        )
    })
}

/// A council member that proposes `answer` and ranks the proposals it is shown in label order.
fn council_agent(answer: &'static str, confidence: f64) -> Script {
    Arc::new(move |kind, input| {
        let output = match kind {
            "council.propose" => json!({"answer": answer, "confidence": confidence}),
            "council.review" => {
                let mut labels: Vec<String> = input["proposals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["label"].as_str().map(str::to_owned))
                    .collect();
                labels.sort();
                json!({"ranking": labels, "critique": format!("{answer} is still my pick")})
            }
            "council.synthesize" => json!({"answer": answer}),
            _ => return (Vec::new(), None),
        };
        (Vec::new(), Some(output))
    })
}

/// The target directory (parent of `CARGO_TARGET_TMPDIR`), where screenshots are kept.
fn screenshot_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).join("web-screenshots")
}

fn check_prerequisites(web: &Path) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser tests drive Debian's Chromium. \
         Fix: apt-get install -y chromium (scripts/test.sh does this)"
    );
    assert!(
        web.join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed in tests/web. \
         Fix: (cd tests/web && npm ci) (scripts/test.sh does this)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_works_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let web = root.join("tests/web");
    check_prerequisites(&web);
    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).expect("creating target/web-screenshots");

    // Tokens are checked, and anonymous people are still let in: Ada signs in with a token (so
    // the server can tell her REST reads from anyone's), Bob and Cy come as they are.
    let server = TestServer::sqlite_with(with_tokens);
    let mut workers = vec![worker(server.addr, &["echo"], echo()).await];
    // Majority: "Paris" twice (one of them spelled " paris ") against "Lyon".
    for (answer, confidence) in [("Paris", 0.9), (" paris ", 0.8), ("Lyon", 0.6)] {
        workers.push(worker(server.addr, &["council"], council_agent(answer, confidence)).await);
    }

    let mut command = tokio::process::Command::new("node");
    command
        .args([
            "--test",
            "--test-reporter=spec",
            "--test-concurrency=1",
            "browser.test.mjs",
        ])
        .current_dir(&web)
        .env("CONCLAVE_URL", server.http_url())
        .env("ADA_TOKEN", token("Ada", Role::Editor))
        .env("CONCLAVE_SCREENSHOTS", &shots)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap_or_else(|e| {
        panic!("could not run `node` ({e}): Node.js 20 or later must be on the PATH")
    });
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!("the browser tests did not finish within {RUN_TIMEOUT:?} (the node process was killed)")
        })
        .expect("waiting for node");

    for worker in &workers {
        worker.abort();
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser tests failed ({}); screenshots are in {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status,
        shots.display()
    );
    // A script that registered no test would exit 0 too: count what ran.
    let passed = stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("ℹ pass "))
        .and_then(|n| n.trim().parse::<u32>().ok());
    assert!(
        passed.is_some_and(|n| n >= 8) && stdout.contains("ℹ fail 0"),
        "the browser tests ran fewer checks than expected (passed: {passed:?})\n{stdout}"
    );
    // Shown with `--nocapture`: which browser checks ran.
    println!("{stdout}");
    server.stop();
}
