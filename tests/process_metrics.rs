//! `/metrics` carries the process figures, read at scrape time: resident and virtual memory and
//! open file descriptors. `conclave load idle` reads the resident memory from here when it is not
//! given `--pid`, so the test reads it with the load generator's own parser.
//!
//! The test node runs in the test's process, so the figures are this process's: they can be
//! checked against `/proc/self` directly.

mod common;

use std::time::Duration;

use common::{TestServer, WsClient, http};
use conclave::load::CommonArgs;
use conclave::load::framing::Framing;
use conclave::load::idle::{self, IdleArgs, IdleProtocol, parse_prometheus_rss, parse_vmrss};

const MIB: f64 = 1024.0 * 1024.0;

async fn scrape(base: &str) -> String {
    let url = format!("{base}/metrics");
    let response = http()
        .get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(response.status().as_u16(), 200, "GET {url}");
    response
        .text()
        .await
        .unwrap_or_else(|e| panic!("reading {url}: {e}"))
}

/// The value of an unlabelled series, panicking with the exposition if it is missing.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            (series == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("/metrics has no {name}:\n{text}"))
}

#[tokio::test]
async fn metrics_report_the_process_memory_and_descriptors() {
    let server = TestServer::sqlite();
    let base = server.http_url();

    let before = scrape(&base).await;
    for name in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} gauge")),
            "{name} is not described as a gauge:\n{before}"
        );
    }
    let rss = series(&before, "process_resident_memory_bytes");
    assert!(
        rss > MIB && rss < 4096.0 * MIB,
        "resident memory {rss} bytes is implausible"
    );
    assert!(
        series(&before, "process_virtual_memory_bytes") >= rss,
        "virtual memory is smaller than resident memory"
    );
    assert_eq!(
        parse_prometheus_rss(&before),
        Some(rss as u64),
        "the load generator reads another figure"
    );
    // The same process, read directly: the scrape is this moment's figure, not a stale one.
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let vmrss = parse_vmrss(&status).expect("VmRSS in /proc/self/status") as f64;
    assert!(
        (rss - vmrss).abs() < vmrss / 4.0,
        "/metrics says {rss} bytes resident, /proc/self/status {vmrss}"
    );

    // Every socket is two descriptors in this process: the client's and the node's.
    let fds_before = series(&before, "process_open_fds");
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(WsClient::connect_hello(&server.ws_url(), &format!("fd-{i}")).await);
    }
    let after = scrape(&base).await;
    let fds_after = series(&after, "process_open_fds");
    assert!(
        fds_after >= fds_before + 40.0,
        "20 more sockets, yet open descriptors went from {fds_before} to {fds_after}"
    );
    for client in clients {
        client.close().await;
    }
    server.stop();
}

/// `conclave load idle` without `--pid` reads the server's memory from `/metrics`, for native
/// sockets and for Yjs rooms alike.
#[tokio::test(flavor = "multi_thread")]
async fn idle_reads_the_resident_memory_from_metrics() {
    let server = TestServer::sqlite();
    for (protocol, url) in [
        (IdleProtocol::Native, format!("ws://{}", server.addr)),
        (IdleProtocol::Yjs, format!("ws://{}/v1/yjs", server.addr)),
    ] {
        let args = IdleArgs {
            common: CommonArgs {
                url: Some(url),
                token: None,
                allow_remote: false,
                ramp_up: Duration::ZERO,
                json: true,
                timeout: Duration::from_secs(10),
                drain: Duration::from_secs(2),
                prefix: None,
                pid: None,
            },
            count: 20,
            sessions: 2,
            duration: Duration::from_millis(200),
            protocol,
            framing: Framing::YWebsocket,
        };
        let report = idle::run(args).await.expect("the idle run reports");
        assert_eq!(
            report.connections.opened, 20,
            "{protocol:?}: {:?}",
            report.errors.counts
        );
        assert!(
            report.errors.counts.is_empty(),
            "{protocol:?}: {:?}",
            report.errors.counts
        );
        let memory = report
            .memory
            .unwrap_or_else(|| panic!("{protocol:?}: no memory figure: {:?}", report.notes));
        assert_eq!(memory.source, "/metrics process_resident_memory_bytes");
        assert_eq!(memory.sockets, 20);
        assert!(
            memory.rss_before_bytes > 1 << 20 && memory.rss_after_bytes > 1 << 20,
            "{protocol:?}: {memory:?}"
        );
    }
    server.stop();
}
