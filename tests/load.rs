//! `conclave load` against real nodes, run as a user runs it (the binary, `--json`), briefly and
//! with small N. Each run must account for every message it sent (acked, no errors, nothing
//! unfinished) and converge; the native run across two nodes also checks that relays keep one
//! order and one document for clients of a session on different nodes.

mod common;

use common::{PgDatabase, TestServer};
use serde_json::{Value, json};

/// Runs `conclave load ARGS --json` and returns its report; fails on a failing exit status
/// (which includes a run that did not converge).
fn load(args: &[&str]) -> Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conclave"))
        .arg("load")
        .args(args)
        .args(["--json", "--timeout", "10s", "--drain", "10s"])
        .output()
        .expect("running conclave load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "conclave load {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {stdout}"))
}

/// The checks every chat/edit run shares: all `expected` sends were acked, nothing failed, and
/// every client converged.
fn assert_accounted(report: &Value, clients: u64, expected: u64) {
    assert_eq!(report["stopped_by"], "count", "{report}");
    assert_eq!(report["connections"]["opened"], clients, "{report}");
    assert_eq!(report["connections"]["failed"], 0, "{report}");
    assert_eq!(report["counts"]["sent"], expected, "{report}");
    assert_eq!(report["errors"], json!({}), "{report}");
    assert_eq!(report["convergence"]["passed"], true, "{report}");
    assert!(
        report["counts"]["delivered"].as_u64() >= Some(expected),
        "fewer deliveries than messages: {report}"
    );
}

/// The node's address as the load generator takes it.
fn base(server: &TestServer) -> String {
    format!("ws://{}", server.addr)
}

/// The size of every chat and Yjs run: 2 sessions × 3 clients, 20 messages each at 20/s.
const SMALL: [&str; 8] = [
    "--sessions",
    "2",
    "--clients",
    "3",
    "--rate",
    "20",
    "--count",
    "20",
];

fn native(url: &str, extra: &[&str]) -> Value {
    let mut args = vec![
        "native",
        "--url",
        url,
        "--edits",
        "0.3",
        "--ramp-up",
        "300ms",
    ];
    args.extend_from_slice(&SMALL);
    args.extend_from_slice(extra);
    load(&args)
}

#[test]
fn native_load_is_fully_accounted_for_and_converges() {
    let server = TestServer::sqlite();
    // The node runs in this test's process, so that is the pid whose CPU the report gives.
    let pid = std::process::id().to_string();
    let report = native(&base(&server), &["--pid", &pid]);
    assert_accounted(&report, 6, 120);
    assert_eq!(report["counts"]["acked"], 120, "{report}");
    let cpu = &report["cpu"];
    assert_eq!(
        cpu["server_pid"].as_u64(),
        Some(u64::from(std::process::id()))
    );
    // A run of about a second is a few 10 ms ticks of CPU: present and sane, not a figure.
    for busy in ["server_cores", "load_generator_cores"] {
        let cores = cpu[busy].as_f64().unwrap_or(-1.0);
        assert!((0.0..64.0).contains(&cores), "{busy}: {cpu}");
    }
}

/// Clients of each session on two nodes of one cluster: the node that does not own a session
/// relays its clients to the owner, through Redis. Every chat and edit is acked, every client
/// sees the same events in the same order, and every replica of each document converges.
#[test]
fn native_load_across_two_nodes_converges_through_relays() {
    let db = PgDatabase::create();
    let prefix = format!("load-{}", uuid::Uuid::now_v7());
    let node = |prefix: String| {
        let url = db.url.clone();
        TestServer::sqlite_with(move |config| {
            config.database_url = Some(url);
            config.redis_url = Some("redis://127.0.0.1:6379".into());
            config.bus_prefix = prefix;
        })
    };
    let (a, b) = (node(prefix.clone()), node(prefix));
    let also = base(&b);
    let report = native(&base(&a), &["--also-url", &also]);
    assert_accounted(&report, 6, 120);
    assert_eq!(report["counts"]["acked"], 120, "{report}");
    assert!(
        report["latency_ms"]["broadcast"]["count"].as_u64() > Some(0),
        "no broadcast latency was measured: {report}"
    );
}

#[test]
fn yjs_load_is_fully_accounted_for_and_converges() {
    let server = TestServer::sqlite();
    let url = format!("{}/v1/yjs", base(&server));
    for typing in ["runs", "interleaved"] {
        let mut args = vec!["yjs", "--url", url.as_str(), "--typing", typing];
        args.extend_from_slice(&SMALL);
        let report = load(&args);
        assert_eq!(report["params"]["typing"], typing, "{report}");
        assert_accounted(&report, 6, 120);
        // Each typing does what it says: runs keep a client's markers together (3 runs in a
        // document of 3 clients), interleaved appends mix them.
        let mixed = report["counts"]["adjacent_from_other_clients_pct"].as_u64();
        eprintln!("{typing}: {mixed:?}% of adjacent markers by different clients");
        match typing {
            "runs" => assert!(mixed <= Some(10), "runs that mix: {report}"),
            _ => assert!(
                mixed >= Some(50),
                "interleaved typing that did not mix: {report}"
            ),
        }
    }
}

#[test]
fn tasks_load_completes_every_task_on_a_real_node() {
    let server = TestServer::sqlite();
    let report = load(&[
        "tasks",
        "--url",
        &base(&server),
        "--workers",
        "2",
        "--capacity",
        "2",
        "--count",
        "100",
        "--submitters",
        "2",
        "--duration",
        "60s",
    ]);
    assert_eq!(report["stopped_by"], "count", "{report}");
    assert_eq!(report["counts"]["submitted"], 100, "{report}");
    assert_eq!(report["counts"]["completed"], 100, "{report}");
    assert_eq!(report["counts"]["unfinished_at_end"], 0, "{report}");
    assert_eq!(report["errors"], json!({}), "{report}");
}
