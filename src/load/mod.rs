//! `conclave load SCENARIO`: the load generator, built into the binary.
//!
//! Each scenario drives many real sockets against a node (or, for `yjs`, any y-websocket server)
//! and prints one report: throughput, hdrhistogram percentiles, errors by code, and for the
//! scenarios where it means something, whether the clients converged.
//!
//! | scenario | what it drives |
//! |---|---|
//! | `native` | S sessions × C clients on `/v1/ws`: chat (and optionally OT edits) at a fixed rate |
//! | `yjs` | S documents × C clients speaking y-websocket (or Hocuspocus's framing), each holding a `yrs` document |
//! | `tasks` | W workers on `/v1/workers` completing `load.noop` tasks submitted over `/v1/ws` |
//! | `idle` | N idle sockets (native, or Yjs rooms on any Yjs server), to measure the server's resident memory per socket |
//!
//! Every scenario shares one timeline ([`conduct`]): connections open evenly over `--ramp-up`,
//! then the measured phase runs for `--duration` (or until `--count` is reached, or Ctrl-C),
//! then clients stop sending, wait for their replies, drain the last broadcasts and close.
//! Every wait is bounded (`--timeout`, `--drain`), so a run always ends by itself. Targets off
//! loopback are refused unless `--allow-remote` is given ([`target`]).

pub mod conduct;
pub mod cpu;
pub mod framing;
pub mod idle;
pub mod native;
pub mod progress;
pub mod report;
pub mod stats;
pub mod target;
pub mod tasks;
pub mod ws;
pub mod yjs;

use std::time::Duration;

use clap::{Args, Subcommand};

use conduct::StopReason;
pub use report::Report;

/// `conclave load`'s arguments: one scenario and its options.
#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Chat (and OT edits) over /v1/ws: S sessions × C clients; ack and broadcast latency,
    /// deliveries/s, convergence of every session's event sequence and document.
    Native(native::NativeArgs),
    /// y-websocket clients with yrs documents on any y-websocket (or, with `--framing
    /// hocuspocus`, Hocuspocus) URL; broadcast latency, deliveries/s, convergence of every
    /// document's text.
    Yjs(yjs::YjsArgs),
    /// Workers on /v1/workers completing no-op tasks submitted over /v1/ws; tasks/s and
    /// submit→completed latency.
    Tasks(tasks::TasksArgs),
    /// N idle sockets held open (native, or Yjs rooms with `--protocol yjs`); the server's
    /// resident memory per socket.
    Idle(idle::IdleArgs),
}

impl Scenario {
    fn common(&self) -> &CommonArgs {
        match self {
            Self::Native(a) => &a.common,
            Self::Yjs(a) => &a.common,
            Self::Tasks(a) => &a.common,
            Self::Idle(a) => &a.common,
        }
    }
}

/// The options every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The server. Default: ws://127.0.0.1:8080 (yjs: ws://127.0.0.1:8080/v1/yjs).
    #[arg(long)]
    pub url: Option<String>,
    /// A JWT, sent in `hello` on /v1/ws and /v1/workers, as `?token=` on Yjs sockets, and as a
    /// bearer token on REST.
    #[arg(long, env = "CONCLAVE_LOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Allow a target that does not resolve to loopback only. Never point this at a server
    /// you do not own.
    #[arg(long)]
    pub allow_remote: bool,
    /// Open the connections evenly over this time before the measured phase starts.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub ramp_up: Duration,
    /// Print one JSON object on stdout instead of the table (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// The longest wait for a connection, a handshake or a reply.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// The longest wait, after sending stops, for outstanding replies and the last broadcasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Session name prefix. Default: `load-<random>`, fresh sessions for each run.
    #[arg(long)]
    pub prefix: Option<String>,
    /// The server's process id, on this machine: the report gives its CPU use over the
    /// measured phase beside the load generator's, and `idle` reads its resident memory from
    /// /proc/PID/status.
    #[arg(long)]
    pub pid: Option<u32>,
}

impl CommonArgs {
    /// The session prefix: given, or fresh per run so that runs never replay each other.
    pub fn prefix(&self) -> String {
        self.prefix.clone().unwrap_or_else(|| {
            let id = uuid::Uuid::now_v7().simple().to_string();
            format!("load-{}", &id[id.len() - 8..])
        })
    }
}

/// When the measured phase ends: after `--duration`, or once every client has sent `--count`.
/// With only `--count`, [`DEFAULT_COUNT_CAP`] still bounds the run.
pub fn measured_bound(duration: Option<Duration>, count: Option<u64>) -> Duration {
    match (duration, count) {
        (Some(duration), _) => duration,
        (None, Some(_)) => DEFAULT_COUNT_CAP,
        (None, None) => DEFAULT_DURATION,
    }
}

/// The measured phase when neither `--duration` nor `--count` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The longest a `--count` run may take when no `--duration` is given.
pub const DEFAULT_COUNT_CAP: Duration = Duration::from_secs(300);

/// Everything that stops a load run before it can report. Per-connection failures are not
/// here: they are counted in the report by code.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid --url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "refusing to send load to {host} ({addr}): it is not a loopback address; \
         pass --allow-remote only for a server you own"
    )]
    RemoteTarget {
        host: String,
        addr: std::net::IpAddr,
    },
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("invalid option: {0}")]
    InvalidArgs(String),
    #[error("no connection could be opened ({attempted} tried); first failure: {first}")]
    NothingConnected { attempted: usize, first: String },
    #[error(
        "no worker could connect to {url} ({attempted} tried); first failure: {first} \
         (does this server have the worker socket?)"
    )]
    NoWorkers {
        url: String,
        attempted: usize,
        first: String,
    },
    #[error("building the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the run finished but did not converge (see the report)")]
    NotConverged,
    #[error(
        "the target ended {dropped} of the {opened} connections {after_s:.1} s into the \
         measured phase, and the run could not go on (see the report)"
    )]
    TargetDropped {
        dropped: u64,
        opened: u64,
        after_s: f64,
    },
}

/// Runs one scenario to its end and prints its report. A run that did not converge, or whose
/// target ended every connection, prints its report and then returns [`LoadError::NotConverged`]
/// or [`LoadError::TargetDropped`], so scripts see a failing exit status.
pub fn run(args: LoadArgs) -> Result<(), LoadError> {
    if let Some(pid) = args.scenario.common().pid
        && !cpu::readable(pid)
    {
        return Err(LoadError::InvalidArgs(format!(
            "--pid {pid}: cannot read /proc/{pid}/stat; give the pid of the server, on this machine"
        )));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(LoadError::Runtime)?;
    let json = args.scenario.common().json;
    let mut report = runtime.block_on(async move {
        match args.scenario {
            Scenario::Native(a) => native::run(a).await,
            Scenario::Yjs(a) => yjs::run(a).await,
            Scenario::Tasks(a) => tasks::run(a).await,
            Scenario::Idle(a) => idle::run(a).await,
        }
    })?;
    if report.errors.counts.contains_key("rate_limited") {
        report.notes.push(
            "the server rate-limited this run: what it measured is the limit, not the server; \
             to measure the server, start it with a higher --rate-per-s and --rate-burst"
                .into(),
        );
    }
    // Client tasks still closing their sockets must not hold the process.
    runtime.shutdown_timeout(Duration::from_secs(2));
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render());
    }
    if report.stopped_by == StopReason::Dropped {
        return Err(LoadError::TargetDropped {
            dropped: report.connections.dropped,
            opened: report.connections.opened,
            after_s: report.elapsed.as_secs_f64(),
        });
    }
    match report.convergence {
        Some(ref c) if !c.passed => Err(LoadError::NotConverged),
        _ => Ok(()),
    }
}
