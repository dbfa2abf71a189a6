//! Group commit as a client sees it: the time from sending a `chat` frame to receiving its `ack`.
//!
//! An `ack` is sent only after the session's batch has committed (see `src/session/actor.rs`), so
//! send→ack is the commit latency a client pays, group commit window included. For each backend
//! (SQLite in a temporary directory, then PostgreSQL in a fresh database that is dropped at the
//! end) this starts a real node in-process, connects `BENCH_CLIENTS` WebSocket clients spread over
//! `BENCH_SESSIONS` sessions, and has every client send `BENCH_CHATS` chats pipelined with at most
//! `BENCH_WINDOW` unacknowledged. It then reads `conclave_commit_seconds` and
//! `conclave_committed_events_total` from `/metrics` (the difference across the chat phase) for
//! the server's own view: mean batch commit time and mean batch size.
//!
//! This is a load script, not a criterion bench (`harness = false`):
//!
//! ```text
//! cargo bench --bench group_commit
//! BENCH_BACKENDS=sqlite BENCH_CLIENTS=32 BENCH_WINDOW=1 cargo bench --bench group_commit
//! ```
//!
//! Every loop is bounded in count, and every wait in time: a phase that exceeds
//! `BENCH_TIMEOUT_S` (default 120 s) stops and reports what it measured so far.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[path = "support/scratch_db.rs"]
mod scratch_db;

use scratch_db::ScratchDatabase;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The longest wait for any single frame from the server.
const FRAME_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait for a node to start or to shut down.
const NODE_TIMEOUT: Duration = Duration::from_secs(30);
/// Latencies are recorded in microseconds, up to a minute.
const MAX_LATENCY_US: u64 = 60_000_000;

// ---- parameters ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Params {
    clients: usize,
    sessions: usize,
    chats: usize,
    window: usize,
    timeout: Duration,
    backends: Vec<Backend>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The `backend` label the store puts on its metrics.
    fn label(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

fn env_usize(name: &str, default: usize, max: usize) -> anyhow::Result<usize> {
    let value = match std::env::var(name) {
        Ok(raw) => raw
            .trim()
            .parse::<usize>()
            .with_context(|| format!("{name}={raw:?} is not a whole number"))?,
        Err(_) => default,
    };
    if value == 0 || value > max {
        bail!("{name}={value} is out of range 1..={max}");
    }
    Ok(value)
}

impl Params {
    fn from_env() -> anyhow::Result<Self> {
        let backends = std::env::var("BENCH_BACKENDS")
            .unwrap_or_else(|_| "sqlite,postgres".into())
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|name| match name {
                "sqlite" => Ok(Backend::Sqlite),
                "postgres" | "pg" => Ok(Backend::Postgres),
                other => Err(anyhow!(
                    "BENCH_BACKENDS: unknown backend {other:?} (sqlite, postgres)"
                )),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if backends.is_empty() {
            bail!("BENCH_BACKENDS names no backend");
        }
        Ok(Self {
            clients: env_usize("BENCH_CLIENTS", 16, 1024)?,
            sessions: env_usize("BENCH_SESSIONS", 4, 1024)?,
            chats: env_usize("BENCH_CHATS", 500, 1_000_000)?,
            window: env_usize("BENCH_WINDOW", 8, 4096)?,
            timeout: Duration::from_secs(env_usize("BENCH_TIMEOUT_S", 120, 3600)? as u64),
            backends,
        })
    }
}

// ---- the node under test -------------------------------------------------------------------

/// A node running on its own thread, in its own actix `System`.
struct NodeThread {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeThread {
    fn start(config: conclave::ServeConfig) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("conclave-node".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    match conclave::start(config).await {
                        Ok(server) => {
                            let _ = ready_tx.send(Ok(server.local_addr()));
                            // Also resumes if the bench drops its end: the node never outlives it.
                            let _ = stop_rx.await;
                            server.shutdown().await;
                        }
                        Err(err) => {
                            let _ = ready_tx.send(Err(err.to_string()));
                        }
                    }
                });
                let _ = done_tx.send(());
            })
            .context("spawning the node thread")?;
        let addr = match ready_rx.recv_timeout(NODE_TIMEOUT) {
            Ok(Ok(addr)) => addr,
            Ok(Err(err)) => bail!("the node failed to start: {err}"),
            Err(_) => bail!("the node did not start within {NODE_TIMEOUT:?}"),
        };
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            done: done_rx,
            thread: Some(thread),
        })
    }

    /// Graceful shutdown (flushes every session), bounded in time.
    fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.done.recv_timeout(NODE_TIMEOUT) {
            Ok(()) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(_) => eprintln!("warning: the node did not shut down within {NODE_TIMEOUT:?}"),
        }
    }
}

// ---- /metrics --------------------------------------------------------------------------------

/// The commit series of one backend, as read from `/metrics`.
#[derive(Debug, Clone, Default)]
struct CommitStats {
    /// Batches committed.
    count: f64,
    /// Seconds spent committing them.
    sum: f64,
    /// Events committed.
    events: f64,
    /// Cumulative bucket counts by upper bound (seconds).
    buckets: Vec<(f64, f64)>,
}

impl CommitStats {
    fn parse(text: &str, backend: &str) -> Self {
        let wanted = format!("backend=\"{backend}\"");
        let mut stats = Self::default();
        let mut buckets = BTreeMap::<u64, (f64, f64)>::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            if !labels.split(',').any(|l| l == wanted) {
                continue;
            }
            match name {
                "conclave_commit_seconds_count" => stats.count = value,
                "conclave_commit_seconds_sum" => stats.sum = value,
                "conclave_committed_events_total" => stats.events = value,
                "conclave_commit_seconds_bucket" => {
                    let le = labels
                        .split(',')
                        .find_map(|l| l.strip_prefix("le=\""))
                        .map(|l| l.trim_end_matches('"'));
                    let bound = match le {
                        Some("+Inf") => f64::INFINITY,
                        Some(raw) => match raw.parse::<f64>() {
                            Ok(bound) => bound,
                            Err(_) => continue,
                        },
                        None => continue,
                    };
                    buckets.insert(bound.to_bits(), (bound, value));
                }
                _ => {}
            }
        }
        stats.buckets = buckets.into_values().collect();
        stats
            .buckets
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        stats
    }

    /// What happened between `before` and `self`.
    fn since(&self, before: &Self) -> Self {
        let buckets = self
            .buckets
            .iter()
            .map(|&(bound, count)| {
                let earlier = before
                    .buckets
                    .iter()
                    .find(|(b, _)| *b == bound)
                    .map_or(0.0, |(_, c)| *c);
                (bound, count - earlier)
            })
            .collect();
        Self {
            count: self.count - before.count,
            sum: self.sum - before.sum,
            events: self.events - before.events,
            buckets,
        }
    }

    fn mean_commit_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count * 1000.0)
    }

    fn mean_batch(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.events / self.count)
    }

    /// The upper bound of the bucket holding quantile `q`, in ms: Prometheus buckets only bound
    /// a quantile, they do not give it.
    fn quantile_bound_ms(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank)
            .map(|(bound, _)| bound * 1000.0)
    }
}

async fn scrape(http: &reqwest::Client, addr: SocketAddr, backend: Backend) -> CommitStats {
    let text = async {
        http.get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
    .await;
    match text {
        Ok(text) => CommitStats::parse(&text, backend.label()),
        Err(err) => {
            eprintln!("warning: scraping /metrics failed: {err}");
            CommitStats::default()
        }
    }
}

// ---- clients ---------------------------------------------------------------------------------

/// The next text frame, skipping control frames, within `FRAME_TIMEOUT` and before `deadline`.
async fn next_text(ws: &mut Ws, deadline: Instant) -> anyhow::Result<String> {
    // Bounded: every iteration either returns or consumes one control frame, and the whole call
    // is bounded in time.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the time limit ran out");
        }
        let frame = tokio::time::timeout(left.min(FRAME_TIMEOUT), ws.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "no frame from the server within {:?}",
                    left.min(FRAME_TIMEOUT)
                )
            })?;
        match frame {
            None => bail!("the server closed the socket"),
            Some(Err(err)) => bail!("websocket error: {err}"),
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(close))) => bail!("the server closed the socket: {close:?}"),
            Some(Ok(_)) => {}
        }
    }
}

/// Waits for the frame of `kind` whose `ref` is `reference`; an `error` with it fails.
async fn expect_reply(
    ws: &mut Ws,
    kind: &str,
    reference: Option<&str>,
    deadline: Instant,
) -> anyhow::Result<serde_json::Value> {
    for _ in 0..10_000 {
        let text = next_text(ws, deadline).await?;
        let frame: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("server sent non-JSON {text}"))?;
        let same_ref = frame.get("ref").and_then(|r| r.as_str()) == reference;
        match frame.get("type").and_then(|t| t.as_str()) {
            Some(t) if t == kind && (reference.is_none() || same_ref) => return Ok(frame),
            Some("error") if same_ref || frame.get("ref").is_none() => {
                bail!("server refused while waiting for {kind}: {text}")
            }
            _ => {}
        }
    }
    bail!("no {kind} among 10000 frames")
}

/// A connected client that has said hello and joined its session.
struct Client {
    ws: Ws,
    session: String,
    name: String,
}

async fn connect_client(
    addr: SocketAddr,
    index: usize,
    session: String,
    deadline: Instant,
) -> anyhow::Result<Client> {
    let url = format!("ws://{addr}/v1/ws");
    // Nagle off, as browsers have it for WebSockets, so the client adds no delay of its own.
    let (mut ws, _) = tokio::time::timeout(
        FRAME_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url, None, true),
    )
    .await
    .map_err(|_| anyhow!("connecting timed out"))?
    .context("connecting")?;
    let name = format!("bench-{index}");
    let hello = serde_json::json!({"type": "hello", "name": name}).to_string();
    ws.send(Message::text(hello)).await?;
    expect_reply(&mut ws, "welcome", None, deadline).await?;
    let join = serde_json::json!({"type": "join", "ref": "join", "session": session}).to_string();
    ws.send(Message::text(join)).await?;
    expect_reply(&mut ws, "joined", Some("join"), deadline).await?;
    Ok(Client { ws, session, name })
}

/// What one client measured.
struct ClientRun {
    latency_us: Histogram<u64>,
    acked: u64,
    refused: u64,
    sent: u64,
    failure: Option<String>,
}

/// A server frame, as far as the chat loop cares.
enum Reply {
    Ack(usize),
    Refused(Option<usize>, String),
    Other,
}

/// Frames are serialized with `type` first, so the many `event` frames every member receives
/// are told apart from acks without a JSON parse.
fn classify(text: &str) -> Reply {
    let parse_ref = |frame: &serde_json::Value| {
        frame
            .get("ref")
            .and_then(|r| r.as_str())
            .and_then(|r| r.parse::<usize>().ok())
    };
    if text.starts_with(r#"{"type":"ack""#) {
        if let Ok(frame) = serde_json::from_str::<serde_json::Value>(text)
            && let Some(reference) = parse_ref(&frame)
        {
            return Reply::Ack(reference);
        }
        return Reply::Other;
    }
    if text.starts_with(r#"{"type":"error""#) {
        let reference = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|frame| parse_ref(&frame));
        return Reply::Refused(reference, text.to_owned());
    }
    Reply::Other
}

/// Sends `chats` chats with at most `window` unacknowledged, timing each from send to ack.
async fn chat_loop(
    client: &mut Client,
    chats: usize,
    window: usize,
    deadline: Instant,
) -> ClientRun {
    let mut run = ClientRun {
        latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
            .expect("static histogram bounds are valid"),
        acked: 0,
        refused: 0,
        sent: 0,
        failure: None,
    };
    let mut sent_at: Vec<Option<Instant>> = vec![None; chats];
    let mut next = 0usize;
    let mut outstanding = 0usize;
    let mut refusals_shown = 0;
    // Each turn either sends or receives at least one frame; both are bounded by `chats` and by
    // the deadline.
    while next < chats || outstanding > 0 {
        while outstanding < window && next < chats {
            let frame = format!(
                r#"{{"type":"chat","ref":"{next}","session":"{}","text":"message {next} from {}"}}"#,
                client.session, client.name
            );
            sent_at[next] = Some(Instant::now());
            if let Err(err) = client.ws.send(Message::text(frame)).await {
                run.failure = Some(format!("sending chat {next}: {err}"));
                return run;
            }
            next += 1;
            outstanding += 1;
            run.sent += 1;
        }
        let text = match next_text(&mut client.ws, deadline).await {
            Ok(text) => text,
            Err(err) => {
                run.failure = Some(format!(
                    "{err:#} ({} of {chats} acked, {outstanding} outstanding)",
                    run.acked
                ));
                return run;
            }
        };
        match classify(&text) {
            Reply::Ack(reference) => {
                if let Some(started) = sent_at.get_mut(reference).and_then(Option::take) {
                    let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    run.latency_us
                        .saturating_record(us.clamp(1, MAX_LATENCY_US));
                    run.acked += 1;
                    outstanding -= 1;
                }
            }
            Reply::Refused(reference, text) => {
                if refusals_shown < 3 {
                    eprintln!("{}: refused: {text}", client.name);
                    refusals_shown += 1;
                }
                if let Some(reference) = reference
                    && sent_at.get_mut(reference).and_then(Option::take).is_some()
                {
                    run.refused += 1;
                    outstanding -= 1;
                }
            }
            Reply::Other => {}
        }
    }
    run
}

// ---- one backend -------------------------------------------------------------------------------

struct Outcome {
    backend: Backend,
    acked: u64,
    refused: u64,
    sent: u64,
    wall: Duration,
    latency_us: Histogram<u64>,
    commits: CommitStats,
    failures: Vec<String>,
}

impl Outcome {
    fn throughput(&self) -> f64 {
        self.acked as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn run_backend(params: &Params, backend: Backend) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir().context("creating a temp dir")?;
    let mut config = conclave::ServeConfig::local("127.0.0.1:0".parse()?, dir.path().into());
    // The bench measures the commit path, not the per-connection rate limit (100 frames/s),
    // which its clients outrun.
    config.limits.rate_per_s = 1_000_000;
    config.limits.rate_burst = 1_000_000;
    // Declared before the node, so it is dropped after the node has shut down.
    let database = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let database = ScratchDatabase::create()?;
            println!("created database {}", database.name());
            config.database_url = Some(database.url());
            Some(database)
        }
    };
    let node = NodeThread::start(config)?;
    println!("node on {} ({})", node.addr, backend.label());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let result = runtime.block_on(drive_clients(params, backend, node.addr));
    drop(runtime);
    node.shutdown();
    drop(database);
    drop(dir);
    result
}

async fn drive_clients(
    params: &Params,
    backend: Backend,
    addr: SocketAddr,
) -> anyhow::Result<Outcome> {
    let deadline = Instant::now() + params.timeout;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;

    let connects = (0..params.clients).map(|i| {
        let session = format!("bench-{}-{}", backend.label(), i % params.sessions);
        connect_client(addr, i, session, deadline)
    });
    let mut clients = futures_util::future::join_all(connects)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.with_context(|| format!("client {i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!(
        "{} clients joined {} sessions; each sends {} chats, window {}",
        params.clients, params.sessions, params.chats, params.window
    );
    // Let the `member.joined` batches commit so that the baseline holds only them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = scrape(&http, addr, backend).await;

    let (chats, window) = (params.chats, params.window);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .drain(..)
        .map(|mut client| {
            tokio::spawn(async move {
                let run = chat_loop(&mut client, chats, window, deadline).await;
                (client, run)
            })
        })
        .collect();
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3)?;
    let (mut acked, mut refused, mut sent) = (0, 0, 0);
    let mut failures = Vec::new();
    let mut finished = Vec::with_capacity(tasks.len());
    for (i, task) in futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .enumerate()
    {
        let (client, run) = task.with_context(|| format!("client task {i}"))?;
        latency_us.add(&run.latency_us)?;
        acked += run.acked;
        refused += run.refused;
        sent += run.sent;
        if let Some(failure) = run.failure {
            failures.push(format!("client {i}: {failure}"));
        }
        finished.push(client);
    }
    let wall = started.elapsed();
    // Every ack follows its batch's metrics, so this scrape sees all of them.
    let after = scrape(&http, addr, backend).await;

    let closes = finished.iter_mut().map(|client| async {
        let _ = tokio::time::timeout(Duration::from_secs(2), client.ws.close(None)).await;
    });
    futures_util::future::join_all(closes).await;

    Ok(Outcome {
        backend,
        acked,
        refused,
        sent,
        wall,
        latency_us,
        commits: after.since(&before),
        failures,
    })
}

// ---- reporting ---------------------------------------------------------------------------------

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn print_outcome(params: &Params, o: &Outcome) {
    let expected = params.clients * params.chats;
    println!("--- {} ---", o.backend.label());
    println!(
        "acked {} of {expected} (sent {}, refused {}) in {:.2} s: {:.0} chats/s",
        o.acked,
        o.sent,
        o.refused,
        o.wall.as_secs_f64(),
        o.throughput()
    );
    println!(
        "send→ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  (mean {:.2})",
        o.latency_ms(0.50),
        o.latency_ms(0.90),
        o.latency_ms(0.99),
        o.latency_us.max() as f64 / 1000.0,
        o.latency_us.mean() / 1000.0
    );
    let c = &o.commits;
    println!(
        "server: {} batch commits of {} events; mean commit {} ms (p50 ≤ {} ms, p99 ≤ {} ms); \
         mean batch {} events",
        c.count,
        c.events,
        opt(c.mean_commit_ms(), 3),
        opt(c.quantile_bound_ms(0.50), 1),
        opt(c.quantile_bound_ms(0.99), 1),
        opt(c.mean_batch(), 1)
    );
    for failure in o.failures.iter().take(5) {
        println!("FAILED {failure}");
    }
    if o.failures.len() > 5 {
        println!("… and {} more failures", o.failures.len() - 5);
    }
}

fn print_table(params: &Params, outcomes: &[Outcome]) {
    println!();
    println!(
        "clients {}, sessions {}, chats/client {}, window {}, {} CPUs",
        params.clients,
        params.sessions,
        params.chats,
        params.window,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| backend | acked | chats/s | p50 ms | p90 ms | p99 ms | max ms | commits | mean commit ms | mean batch |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            o.backend.label(),
            o.acked,
            o.throughput(),
            o.latency_ms(0.50),
            o.latency_ms(0.90),
            o.latency_ms(0.99),
            o.latency_us.max() as f64 / 1000.0,
            o.commits.count,
            opt(o.commits.mean_commit_ms(), 3),
            opt(o.commits.mean_batch(), 1)
        );
    }
}

fn main() -> anyhow::Result<()> {
    let params = Params::from_env()?;
    let mut outcomes = Vec::new();
    let mut failed = false;
    for &backend in &params.backends {
        match run_backend(&params, backend) {
            Ok(outcome) => {
                print_outcome(&params, &outcome);
                failed |= !outcome.failures.is_empty();
                outcomes.push(outcome);
            }
            Err(err) => {
                eprintln!("{}: {err:#}", backend.label());
                failed = true;
            }
        }
    }
    print_table(&params, &outcomes);
    if failed {
        bail!("some runs failed; see above");
    }
    Ok(())
}
