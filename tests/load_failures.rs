//! `conclave load` when things go wrong, run as a user runs it (the binary): bad flags, a target
//! it must not reach, one it cannot reach, one that never answers, and one that drops every
//! connection mid-run. Each ends promptly with a message that says what happened and a failing
//! exit status; a run cut short still prints its report, with the drops in it.

mod common;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, get_json};
use serde_json::Value;

/// What a failing run must at least say, and how soon: a start of the debug binary plus a
/// refused connection is well under this, a run that waited out its bound is far over it.
const PROMPT: Duration = Duration::from_secs(8);

/// Every scenario, in the order the tests try them.
const SCENARIOS: [&str; 4] = ["native", "yjs", "idle", "tasks"];

/// Arguments for scenario `name` that keep it small, pointed at `base` (the Yjs run at its Yjs
/// path) and bounded far beyond what a test waits for: only a failure ends it early.
fn scenario(name: &str, base: &str, prefix: &str) -> Vec<String> {
    let yjs_url = format!("{base}/v1/yjs");
    let tasks_session = format!("{prefix}-0");
    let specific: Vec<&str> = match name {
        "native" | "yjs" => {
            let url = if name == "yjs" { &yjs_url } else { base };
            vec![
                "--url",
                url,
                "--sessions",
                "2",
                "--clients",
                "2",
                "--rate",
                "20",
            ]
        }
        "idle" => vec!["--url", base, "--count", "4", "--sessions", "2"],
        _ => vec![
            "--url",
            base,
            "--workers",
            "2",
            "--submitters",
            "1",
            "--count",
            "100000000",
            "--session",
            &tasks_session,
        ],
    };
    std::iter::once(name)
        .chain(specific)
        .chain(["--prefix", prefix, "--json", "--duration", "120s"])
        .map(str::to_owned)
        .collect()
}

fn load_command(args: &[String]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_conclave"));
    command
        .arg("load")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `conclave load ARGS` to its end, which must come within `limit`.
async fn run_within(args: &[String], limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let output = tokio::time::timeout(limit, load_command(args).output())
        .await
        .unwrap_or_else(|_| panic!("conclave load {args:?} still ran after {limit:?}"))
        .expect("running conclave load");
    (output, started.elapsed())
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A failed run: a failing status, `expected` in the message, nothing on stdout.
fn assert_refused(args: &[String], output: &Output, expected: &[&str]) {
    let message = stderr(output);
    assert!(!output.status.success(), "{args:?} succeeded: {message}");
    for part in expected {
        assert!(
            message.contains(part),
            "{args:?}: the message does not say {part:?}: {message}"
        );
    }
    assert!(
        output.stdout.is_empty(),
        "{args:?} printed a report for a run that never ran: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| (*a).to_owned()).collect()
}

#[tokio::test]
async fn bad_flags_are_refused_at_once_with_a_clear_error() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["flood"], &["unrecognized subcommand 'flood'"]),
        (
            &["native", "--sessions", "0"],
            &["--sessions", "at least 1"],
        ),
        (&["native", "--clients", "0"], &["--clients", "at least 1"]),
        (
            &["native", "--rate", "abc"],
            &["invalid value 'abc'", "--rate"],
        ),
        (&["native", "--rate=0"], &["--rate must be above 0"]),
        (&["native", "--rate=20000"], &["at most 10000 per second"]),
        (
            &["native", "--duration", "soon"],
            &["invalid value 'soon'", "--duration"],
        ),
        (&["native", "--edits", "lots"], &["invalid value 'lots'"]),
        (
            &["native", "--frobnicate"],
            &["unexpected argument '--frobnicate'"],
        ),
        (
            &["yjs", "--framing", "sse"],
            &["invalid value 'sse'", "--framing"],
        ),
        (&["idle", "--count", "0"], &["--count must be 1 to 200000"]),
        (&["tasks", "--workers", "abc"], &["invalid value 'abc'"]),
        (
            &["native", "--url", "ftp://127.0.0.1:1/"],
            &["invalid --url", "ftp://127.0.0.1:1/"],
        ),
        // No process has this pid (above the kernel's pid_max), so no CPU can be read for it.
        (
            &["yjs", "--pid", "4294967295"],
            &["--pid 4294967295", "cannot read /proc/4294967295/stat"],
        ),
    ];
    for (list, expected) in cases {
        let args = args(list);
        let (output, took) = run_within(&args, PROMPT).await;
        assert_refused(&args, &output, expected);
        assert!(took < PROMPT, "{args:?} took {took:?} to refuse");
    }
}

/// Nothing is sent: the address is checked before any connection (TEST-NET-1 and the IPv6
/// documentation prefix would not answer anyway).
#[tokio::test]
async fn a_remote_target_is_refused_before_any_connection() {
    for remote in ["ws://192.0.2.1:80", "ws://[2001:db8::1]:80"] {
        for name in SCENARIOS {
            let args = scenario(name, remote, "remote");
            let (output, took) = run_within(&args, PROMPT).await;
            assert_refused(
                &args,
                &output,
                &["not a loopback address", "--allow-remote"],
            );
            assert!(took < PROMPT, "{name}: {took:?} to refuse {remote}");
        }
    }
}

/// A loopback port bound but not listening: every connection is refused at once.
#[tokio::test]
async fn an_unreachable_target_fails_fast_with_the_reason() {
    let closed = tokio::net::TcpSocket::new_v4().expect("socket");
    closed
        .bind("127.0.0.1:0".parse().expect("literal"))
        .expect("binding a port");
    let base = format!("ws://{}", closed.local_addr().expect("bound address"));
    for name in SCENARIOS {
        let args = scenario(name, &base, "unreachable");
        let (output, took) = run_within(&args, PROMPT).await;
        let opened = if name == "tasks" {
            "no worker could connect"
        } else {
            "no connection could be opened"
        };
        assert_refused(&args, &output, &[opened, "Connection refused"]);
        assert!(took < PROMPT, "{name}: {took:?} to give up on {base}");
    }
}

/// A listener that takes connections and never answers the upgrade: every scenario gives up
/// after `--timeout`, not after its bound.
#[tokio::test]
async fn a_target_that_never_answers_times_out_after_the_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding");
    let base = format!("ws://{}", silent.local_addr().expect("bound address"));
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    for name in SCENARIOS {
        let mut args = scenario(name, &base, "silent");
        args.extend(["--timeout".into(), "1s".into()]);
        let (output, took) = run_within(&args, PROMPT).await;
        assert_refused(&args, &output, &["took over 1s"]);
        assert!(
            took >= Duration::from_secs(1),
            "{name} gave up before its 1 s timeout ({took:?}): {}",
            stderr(&output)
        );
    }
    held.abort();
}

/// Waits until the run against `server` is in its measured phase: traffic has reached the
/// session (or, for idle sockets, every socket has joined).
async fn wait_until_running(server: &TestServer, name: &str, prefix: &str) {
    let url = format!("{}/v1/sessions/{prefix}-0", server.http_url());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, view) = get_json(&url).await;
        let running = status == 200
            && match name {
                "idle" => view["members"].as_array().is_some_and(|m| m.len() == 2),
                "yjs" => view["docs"]
                    .as_array()
                    .is_some_and(|docs| docs.iter().any(|d| d["version"].as_u64() >= Some(5))),
                _ => view["offset"].as_u64() >= Some(5),
            };
        if running {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the {name} run never got going: {status} {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node stops in the middle of each scenario's run. The run must end soon after, not at
/// its 120 s bound; say so in a failing exit status; and print the report of what it did,
/// stopped by "dropped" with the dropped connections counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_drops_every_connection_ends_the_run_and_reports_it() {
    for name in SCENARIOS {
        let prefix = common::unique_session(&format!("dropped-{name}"));
        let server = TestServer::sqlite();
        let args = scenario(name, &format!("ws://{}", server.addr), &prefix);
        let child = load_command(&args).spawn().expect("starting conclave load");
        wait_until_running(&server, name, &prefix).await;

        let stopped = Instant::now();
        tokio::task::spawn_blocking(move || server.stop())
            .await
            .expect("stopping the node");
        let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{name}: the run went on for 30 s after its target stopped"))
            .expect("waiting for conclave load");
        let took = stopped.elapsed();

        let message = stderr(&output);
        assert!(!output.status.success(), "{name} succeeded: {message}");
        assert!(
            message.contains("the target ended") && message.contains("could not go on"),
            "{name}: the message does not say the target dropped the run: {message}"
        );
        let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{name}: no JSON report ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        });
        assert_eq!(report["stopped_by"], "dropped", "{name}: {report}");
        let connections = &report["connections"];
        let dropped = connections["dropped"].as_u64().unwrap_or(0);
        assert!(
            dropped >= 1 && Some(dropped) <= connections["opened"].as_u64(),
            "{name}: {connections}"
        );
        assert!(
            report["errors"]["closed"].as_u64() >= Some(1)
                || report["errors"]["send"].as_u64() >= Some(1),
            "{name}: the drops are not among the errors: {report}"
        );
        assert!(
            report["elapsed_s"].as_f64() < Some(60.0),
            "{name}: the measured phase ran to {} s",
            report["elapsed_s"]
        );
        if name != "tasks" {
            // The node said goodbye (a submitter may hit the closed socket with a send first).
            let sample = report["error_samples"]["closed"].to_string();
            assert!(
                sample.contains("the server is shutting down"),
                "{name}: the close reason is not reported: {report}"
            );
        }
        if name == "native" {
            // Every chat sent is accounted for: acked, or counted as unanswered.
            let counts = &report["counts"];
            let unanswered = report["errors"]["no_reply"].as_u64().unwrap_or(0);
            assert_eq!(
                counts["sent"].as_u64(),
                counts["acked"].as_u64().map(|a| a + unanswered),
                "{name}: {report}"
            );
        }
        eprintln!("{name}: ended {took:?} after the node stopped: {connections}");
    }
}

/// A server that rate-limits the run: the refusals are counted, and the report says that what
/// it measured is the server's limit, and how to lift it.
#[tokio::test]
async fn a_rate_limited_run_says_it_measured_the_limit() {
    let server = TestServer::sqlite_with(|c| {
        c.limits.rate_per_s = 5;
        c.limits.rate_burst = 5;
    });
    let mut args = scenario("native", &format!("ws://{}", server.addr), "limited");
    args.extend([
        "--count".into(),
        "40".into(),
        "--timeout".into(),
        "5s".into(),
    ]);
    let (output, _) = run_within(&args, Duration::from_secs(60)).await;
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {} {}",
            String::from_utf8_lossy(&output.stdout),
            stderr(&output)
        )
    });
    assert!(
        report["errors"]["rate_limited"].as_u64() >= Some(1),
        "the run was not rate-limited: {report}"
    );
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("rate-limited") && notes.contains("--rate-per-s"),
        "no note about the limit: {report}"
    );
}

/// A `tasks` run against a node that rate-limits its submitter: the submitter backs off rather
/// than send into the limit, so it is not closed for abuse, and the run ends by its count with
/// the refusals counted. Without the backoff a full window is refused at each turn, and 30
/// refusals in a row close the socket with 1008.
#[tokio::test]
async fn a_rate_limited_submitter_backs_off_and_is_not_closed() {
    let server = TestServer::sqlite_with(|c| {
        c.limits.rate_per_s = 20;
        c.limits.rate_burst = 20;
        c.limits.rate_abuse_strikes = 30;
    });
    let session = common::unique_session("limited-tasks");
    let args = args(&[
        "tasks",
        "--url",
        &format!("ws://{}", server.addr),
        "--workers",
        "2",
        "--submitters",
        "1",
        "--window",
        "32",
        "--count",
        "120",
        "--session",
        &session,
        "--json",
        "--duration",
        "60s",
    ]);
    let (output, _) = run_within(&args, Duration::from_secs(60)).await;
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", stderr(&output)));
    assert!(output.status.success(), "{}\n{report}", stderr(&output));
    assert_eq!(report["stopped_by"], "count", "{report}");
    assert_eq!(report["connections"]["dropped"], 0, "{report}");
    assert!(
        report["errors"]["rate_limited"].as_u64() >= Some(1),
        "the run was not rate-limited: {report}"
    );
    let counts = &report["counts"];
    assert_eq!(counts["submitted"], 120, "{report}");
    assert_eq!(
        counts["completed"].as_u64(),
        counts["acked"].as_u64(),
        "an acked task did not complete: {report}"
    );
    assert_eq!(
        counts["acked"]
            .as_u64()
            .map(|a| a + report["errors"]["rate_limited"].as_u64().unwrap_or(0)),
        Some(120),
        "a submit is neither acked nor refused: {report}"
    );
}
