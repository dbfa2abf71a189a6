//! The `idle` scenario: N sockets that say hello, join a session and then only keep alive, to
//! measure what an open connection costs the server in resident memory.
//!
//! With `--protocol yjs` the sockets open Yjs rooms instead (`{url}/<prefix>-<i>/idle`, synced
//! once with an empty document, in the `--framing` of the server), so the same measure applies to
//! Conclave's `/v1/yjs` and to any y-websocket or Hocuspocus server.
//!
//! Memory is read before the first socket opens and again once all are open and settled: from
//! `/proc/PID/status` (`VmRSS`) with `--pid`, or else from the server's `/metrics`
//! (`process_resident_memory_bytes`) if it exports it. The difference divided by the sockets
//! open is the report's bytes per socket. The sockets answer the server's pings (tungstenite
//! does, as the stream is read), so the server's idle timeout never closes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use url::Url;
use yrs::sync::SyncMessage;
use yrs::{Doc, ReadTxn as _, Transact as _};

use super::conduct::{
    Conductor, Cue, Phase, Plan, close_limit, connections, everyone, gather, outcome, ramp_delay,
    ramp_limit, stage,
};
use super::framing::{Codec, Framing, Incoming};
use super::progress::{Live, Progress, Track};
use super::report::{Memory, Report};
use super::stats::Errors;
use super::target::Target;
use super::ws::{self, Failure, Socket};
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
    /// Sessions (or Yjs rooms) the sockets join, round-robin (Conclave admits 1000 members per
    /// session by default).
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// How long to hold the sockets once all are open.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// What the sockets speak: `native` joins sessions on /v1/ws; `yjs` opens Yjs rooms
    /// (default URL ws://127.0.0.1:8080/v1/yjs).
    #[arg(long, value_enum, default_value_t = IdleProtocol::Native)]
    pub protocol: IdleProtocol,
    /// The Yjs server's envelope, with `--protocol yjs`.
    #[arg(long, value_enum, default_value_t = Framing::YWebsocket)]
    pub framing: Framing,
}

/// The protocol of the idle sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdleProtocol {
    Native,
    Yjs,
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
    target: Target,
    protocol: IdleProtocol,
    framing: Framing,
    timeout: Duration,
    live: Arc<Live>,
}

impl Ctx {
    /// Opens socket `name` in `room` (a session, or a Yjs room) and waits until the server has
    /// taken it in: joined, or synced.
    async fn open(&self, name: &str, room: &str) -> Result<Socket, Failure> {
        match self.protocol {
            IdleProtocol::Native => {
                let url = self.target.socket("/v1/ws", false);
                let token = self.target.token();
                let joined = ws::join_session(&url, token, name, room, None, self.timeout).await?;
                Ok(joined.0)
            }
            IdleProtocol::Yjs => {
                let url = self.target.socket(room, true);
                let codec = Codec::new(self.framing, room);
                let mut ws = ws::connect(&url, self.timeout).await?;
                let synced = sync_empty(&mut ws, &codec, self.target.token(), self.timeout).await;
                match synced {
                    Ok(()) => Ok(ws),
                    Err(failure) => {
                        ws::close(&mut ws).await;
                        Err(failure)
                    }
                }
            }
        }
    }
}

async fn send(ws: &mut Socket, frame: Bytes) -> Result<(), Failure> {
    ws.send(Message::Binary(frame))
        .await
        .map_err(|err| Failure::new("send", err.to_string()))
}

/// Syncs an empty document in a Yjs room, as a provider does on connect: auth (Hocuspocus), sync
/// step 1, then reads until the server's sync step 2, answering its step 1.
async fn sync_empty(
    ws: &mut Socket,
    codec: &Codec,
    token: Option<&str>,
    limit: Duration,
) -> Result<(), Failure> {
    let deadline = Instant::now() + limit;
    let doc = Doc::new();
    if let Some(hello) = codec.hello(token) {
        send(ws, hello).await?;
    }
    let step1 = codec.sync(SyncMessage::SyncStep1(doc.transact().state_vector()));
    send(ws, step1).await?;
    loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(Failure::new("timeout", "no sync step 2 in time")),
            Ok(Some(Ok(Message::Binary(frame)))) => frame,
            Ok(Some(Ok(Message::Close(close)))) => {
                return Err(Failure::new(
                    "closed",
                    format!("closed while syncing: {close:?}"),
                ));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(err))) => return Err(Failure::new("closed", err.to_string())),
            Ok(None) => return Err(Failure::new("closed", "the stream ended while syncing")),
        };
        for message in codec.decode(&frame) {
            match message {
                Ok(Incoming::Sync(SyncMessage::SyncStep2(_))) => return Ok(()),
                Ok(Incoming::Sync(SyncMessage::SyncStep1(sv))) => {
                    let diff = doc.transact().encode_state_as_update_v1(&sv);
                    send(ws, codec.sync(SyncMessage::SyncStep2(diff))).await?;
                }
                Ok(Incoming::Denied(reason)) => {
                    return Err(Failure::new("permission_denied", reason));
                }
                Ok(Incoming::TokenRequest) => {
                    if let Some(hello) = codec.hello(token) {
                        send(ws, hello).await?;
                    }
                }
                Ok(Incoming::Closed(reason)) => return Err(Failure::new("closed", reason)),
                Ok(Incoming::Authenticated | Incoming::Other | Incoming::Sync(_)) => {}
                Err(err) => return Err(Failure::new("bad_frame", err.0)),
            }
        }
    }
}

#[derive(Default)]
struct SocketResult {
    connected: bool,
    errors: Errors,
    dropped: Option<String>,
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
    let mut ws = match ctx.open(&name, &session).await {
        Ok(ws) => ws,
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
                    let how = match message {
                        Some(Ok(Message::Close(Some(frame)))) => {
                            format!("{} \"{}\"", u16::from(frame.code), frame.reason)
                        }
                        Some(Err(err)) => err.to_string(),
                        _ => "no close frame".to_owned(),
                    };
                    let why = format!("{name}: the server closed an idle socket ({how})");
                    Live::bump(&ctx.live.errors);
                    out.errors.add_detail("closed", || why.clone());
                    out.dropped = Some(why);
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
    let raw_url = common.url.as_deref().unwrap_or(match args.protocol {
        IdleProtocol::Native => "ws://127.0.0.1:8080",
        IdleProtocol::Yjs => "ws://127.0.0.1:8080/v1/yjs",
    });
    let target = Target::resolve(raw_url, common.token.clone(), common.allow_remote).await?;
    let http = reqwest::Client::builder().timeout(common.timeout).build()?;
    let source = match common.pid {
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
        target: target.clone(),
        protocol: args.protocol,
        framing: args.framing,
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
                match args.protocol {
                    IdleProtocol::Native => format!("{prefix}-{}", i % args.sessions),
                    IdleProtocol::Yjs => format!("{prefix}-{}/idle", i % args.sessions),
                },
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
                essential: everyone(total),
                run_track: None,
                quiet: 0..0,
                drain: common.drain,
                drain_phase: false,
                run_start_us: &run_start,
                server_pid: common.pid,
            },
            ready,
        )
        .await;
    let results = gather(handles, close_limit(common), progress).await?;

    let url = match args.protocol {
        IdleProtocol::Native => target.socket("/v1/ws", false).to_string(),
        IdleProtocol::Yjs => format!(
            "{}/{prefix}-<i>/idle",
            target.url().as_str().trim_end_matches('/')
        ),
    };
    let mut report = Report::of_run("idle", url, timeline);
    report.param("count", args.count);
    if args.protocol == IdleProtocol::Yjs {
        report.param(
            "protocol",
            match args.framing {
                Framing::YWebsocket => "yjs",
                Framing::Hocuspocus => "yjs (hocuspocus)",
            },
        );
    }
    report.param("sessions", args.sessions);
    report.param(
        "hold",
        humantime::format_duration(args.duration).to_string(),
    );
    report.param("prefix", prefix);
    report.connections = connections(&results);
    let mut frames = 0;
    for r in &results {
        report.errors.merge(&r.errors);
        frames += r.frames;
    }
    report.count("frames_received", frames, false);
    report.count("closed_by_server", report.connections.dropped, false);
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
