//! The `idle` scenario: N sockets that say hello, join a session and then only keep alive, to
//! measure what an open connection costs the server in resident memory.
//!
//! Memory is read before the first socket opens and again once all are open and settled: from
//! `/proc/PID/status` (`VmRSS`) with `--pid`, or else from the server's `/metrics`
//! (`process_resident_memory_bytes`) if it exports it. The difference divided by the sockets
//! open is the report's bytes per socket. The sockets answer the server's pings (tungstenite
//! does, as the stream is read), so the server's idle timeout never closes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use super::conduct::{
    Conductor, Cue, Phase, Plan, close_limit, connections, gather, outcome, ramp_delay, ramp_limit,
    stage,
};
use super::progress::{Live, Progress, Track};
use super::report::{Memory, Report};
use super::stats::Errors;
use super::target::Target;
use super::ws;
use super::{CommonArgs, LoadError};

/// How long after the last socket opens before memory is read: the joins' broadcasts and the
/// server's allocations settle.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Sockets to hold open.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Sessions the sockets join, round-robin (the server admits 1000 members per session by
    /// default).
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// The server's process id: resident memory is read from /proc/PID/status.
    #[arg(long)]
    pub pid: Option<u32>,
    /// How long to hold the sockets once all are open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// Where the server's resident memory is read.
enum MemorySource {
    Proc(u32),
    Metrics(Url),
}

impl MemorySource {
    fn describe(&self) -> String {
        match self {
            Self::Proc(pid) => format!("VmRSS of pid {pid}"),
            Self::Metrics(_) => "/metrics process_resident_memory_bytes".into(),
        }
    }

    async fn read(&self, http: &reqwest::Client) -> Option<u64> {
        match self {
            Self::Proc(pid) => {
                let status = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
                    .await
                    .ok()?;
                parse_vmrss(&status)
            }
            Self::Metrics(url) => {
                let text = http.get(url.clone()).send().await.ok()?.text().await.ok()?;
                parse_prometheus_rss(&text)
            }
        }
    }
}

/// `VmRSS:   123456 kB` in `/proc/PID/status`, in bytes.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        Some("kB") | None => 1024,
        Some("mB") => 1024 * 1024,
        Some(_) => return None,
    };
    Some(value * unit)
}

/// `process_resident_memory_bytes <value>` in Prometheus text, in bytes.
pub fn parse_prometheus_rss(text: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?.trim();
            (name == "process_resident_memory_bytes")
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .map(|v| v as u64)
}

struct Ctx {
    url: Url,
    token: Option<String>,
    timeout: Duration,
    live: Arc<Live>,
}

#[derive(Default)]
struct SocketResult {
    connected: bool,
    errors: Errors,
    dropped: bool,
    frames: u64,
}

outcome!(SocketResult);

async fn socket_task(
    ctx: Arc<Ctx>,
    index: usize,
    session: String,
    delay: Duration,
    mut cue: Cue,
) -> SocketResult {
    let mut out = SocketResult::default();
    if !cue.ramp_sleep(delay).await {
        return out;
    }
    let name = format!("idle-{index}");
    let joined = ws::join_session(
        &ctx.url,
        ctx.token.as_deref(),
        &name,
        &session,
        None,
        ctx.timeout,
    )
    .await;
    let mut ws = match joined {
        Ok((ws, _)) => ws,
        Err(failure) => {
            Live::bump(&ctx.live.failed);
            out.errors
                .add_detail(&failure.code, || format!("{name}: {}", failure.detail));
            return out;
        }
    };
    out.connected = true;
    Live::bump(&ctx.live.connected);
    cue.reach(stage::READY);
    cue.reach(stage::DRAINED);
    loop {
        if cue.phase() == Phase::Close {
            break;
        }
        tokio::select! {
            _ = cue.changed() => {}
            message = ws.next() => match message {
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    out.dropped = true;
                    Live::bump(&ctx.live.errors);
                    out.errors.add_detail("closed", || format!("{name}: the server closed an idle socket"));
                    break;
                }
                Some(Ok(_)) => out.frames += 1,
            },
        }
    }
    ws::close(&mut ws).await;
    out
}

pub async fn run(args: IdleArgs) -> Result<Report, LoadError> {
    let common = &args.common;
    if args.count == 0 || args.sessions == 0 || args.count > 200_000 {
        return Err(LoadError::InvalidArgs(
            "--count must be 1 to 200000 and --sessions at least 1".into(),
        ));
    }
    let raw_url = common.url.as_deref().unwrap_or("ws://127.0.0.1:8080");
    let target = Target::resolve(raw_url, common.token.clone(), common.allow_remote).await?;
    let http = reqwest::Client::builder().timeout(common.timeout).build()?;
    let source = match args.pid {
        Some(pid) => MemorySource::Proc(pid),
        None => MemorySource::Metrics(target.http("/metrics")),
    };
    if let MemorySource::Proc(pid) = source
        && source.read(&http).await.is_none()
    {
        return Err(LoadError::InvalidArgs(format!(
            "cannot read VmRSS from /proc/{pid}/status: is {pid} the server's pid?"
        )));
    }
    let before = source.read(&http).await;

    let prefix = common.prefix();
    let live = Arc::new(Live::default());
    let ctx = Arc::new(Ctx {
        url: target.socket("/v1/ws", false),
        token: target.token().map(str::to_owned),
        timeout: common.timeout,
        live: live.clone(),
    });
    let total = args.count;
    let mut conductor = Conductor::new(total);
    let progress = Progress::start(common.json, live.clone());
    progress.stage("connect", total as u64, Track::Connections);
    let handles: Vec<_> = (0..total)
        .map(|i| {
            tokio::spawn(socket_task(
                ctx.clone(),
                i,
                format!("{prefix}-{}", i % args.sessions),
                ramp_delay(i, total, common.ramp_up),
                conductor.cue(i),
            ))
        })
        .collect();
    let ready = conductor.ramp(ramp_limit(common)).await;
    let opened_now = live.connected.load(Ordering::Relaxed);
    let after = if opened_now > 0 {
        tokio::time::sleep(SETTLE).await;
        source.read(&http).await
    } else {
        None
    };
    let run_start = AtomicU64::new(0);
    let timeline = conductor
        .run(
            Plan {
                progress: &progress,
                live: &live,
                bound: args.duration,
                done: None,
                run_track: None,
                quiet: 0..0,
                drain: common.drain,
                drain_phase: false,
                run_start_us: &run_start,
            },
            ready,
        )
        .await;
    let results = gather(handles, close_limit(common), progress).await?;

    let mut report = Report::of_run("idle", ctx.url.to_string(), timeline);
    report.param("count", args.count);
    report.param("sessions", args.sessions);
    report.param(
        "hold",
        humantime::format_duration(args.duration).to_string(),
    );
    report.param("prefix", prefix);
    report.connections = connections(&results);
    let mut frames = 0;
    let mut dropped = 0;
    for r in &results {
        report.errors.merge(&r.errors);
        frames += r.frames;
        dropped += u64::from(r.dropped);
    }
    report.count("frames_received", frames, false);
    report.count("closed_by_server", dropped, false);
    match (before, after) {
        (Some(before), Some(after)) => {
            if after < before {
                report.notes.push(
                    "resident memory fell while the sockets opened: the server freed other \
                     memory meanwhile (passivated sessions?); measure on a quiet server"
                        .into(),
                );
            }
            report.memory = Some(Memory {
                source: source.describe(),
                rss_before_bytes: before,
                rss_after_bytes: after,
                sockets: opened_now,
                bytes_per_socket: (after as f64 - before as f64) / opened_now.max(1) as f64,
            });
        }
        _ => report.notes.push(format!(
            "resident memory unknown: {} could not be read (give --pid SERVER_PID)",
            source.describe()
        )),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vmrss() {
        let status = "Name:\tconclave\nVmPeak:\t  999 kB\nVmRSS:\t   40960 kB\nThreads:\t4\n";
        assert_eq!(parse_vmrss(status), Some(40960 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        assert_eq!(parse_vmrss("VmRSS: lots\n"), None);
    }

    #[test]
    fn reads_prometheus_rss() {
        let text = "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes 1.2345e7\n\
                    conclave_connections 3\n";
        assert_eq!(parse_prometheus_rss(text), Some(12_345_000));
        assert_eq!(
            parse_prometheus_rss("process_resident_memory_bytes{a=\"b\"} 42\n"),
            Some(42)
        );
        assert_eq!(parse_prometheus_rss("other 1\n"), None);
    }
}
