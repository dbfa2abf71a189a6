//! `conclave worker`: turns any program into a worker, by running it once for each task the
//! server assigns on the worker socket (`/v1/workers`, PROTOCOL.md "Worker socket").
//!
//! The contract with the program:
//! - It runs as `sh -c CMD`, so `--exec` may hold pipes, redirections and `$VARS`. Quoting is
//!   the shell's, which is what a user writing a command line expects; splitting the string
//!   ourselves would give a second, subtly different quoting language.
//! - The task input arrives as JSON on stdin, which is then closed. `CONCLAVE_TASK_ID`,
//!   `CONCLAVE_TASK_KIND`, `CONCLAVE_TASK_ATTEMPT` and `CONCLAVE_SESSION` are set.
//! - Stdout is the output: JSON if it parses as JSON once trimmed, else `{"text": stdout}`.
//!   At most [`MAX_OUTPUT_BYTES`] are kept, the server's default frame limit; past that the
//!   program is stopped and the task fails, rather than sending a frame the server refuses.
//! - Each stderr line becomes a `progress` frame `{"line": …}`, at most
//!   [`PROGRESS_LINES_PER_SECOND`] a second per task. Lines over that are dropped, and the next
//!   line sent says how many with `"dropped": n`.
//! - Exit 0 completes the task; any other exit fails it as retryable, naming the exit status and
//!   the last stderr line. A command that cannot be started fails it for good.
//!
//! The shape: [`run`] owns reconnection and the shutdown signal. Within one connection, a
//! `Connection` is the only writer to the socket: assignments, cancels, heartbeats, results and
//! their retries all pass through its one `select!` loop, so nothing locks the socket and no frame
//! about a task can overtake that task's result. Each assignment runs as one tokio task that owns
//! the program's process group; dropping it (cancel, `conflict`, a lost connection) kills the
//! whole group, whatever `sh -c` started.
//!
//! Unix only: the process group is what lets a cancel reach a pipeline's every process, and what
//! keeps a Ctrl-C at the terminal (sent to the foreground group) from killing running tasks
//! instead of draining the worker.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, error, info, warn};

use crate::protocol::ErrorCode;
use crate::protocol::ids::{LeaseId, TaskId, TaskKind, WorkerId};
use crate::protocol::worker::{
    Assignment, MAX_CAPACITY, WorkerCommand, WorkerFrame, WorkerRequest,
};

/// The most stdout kept from one run, and the largest result frame sent: the server's default
/// `max_frame_bytes`, so a result it would refuse as `too_large` fails here, with a clearer error.
pub const MAX_OUTPUT_BYTES: usize = 1 << 20;
/// Progress lines sent per task per second; a chatty program cannot flood the session.
pub const PROGRESS_LINES_PER_SECOND: u32 = 20;
/// The longest stderr line sent whole; longer ones are cut and end in `…`.
const MAX_LINE_BYTES: usize = 4096;
/// Reconnection waits from this, doubling up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A result refused with `storage_unavailable` is sent this many times in all, waiting
/// [`RESULT_RETRY_BASE`] doubling between sends; after that the lease expires and the server
/// retries the task, which is the at-least-once fallback anyway.
const RESULT_ATTEMPTS: u32 = 5;
const RESULT_RETRY_BASE: Duration = Duration::from_millis(500);
/// Added to a task's deadline before its program is stopped here, so that clock skew between
/// this machine and the server never stops a program that the server still waits for.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);
/// How long a drain waits for a task whose deadline cannot be read.
const DRAIN_FALLBACK: Duration = Duration::from_secs(60);
/// How long a drain waits for the `ack`s of its last results once no program runs.
const ACK_WAIT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Task events queued for the socket; a full queue slows the programs' stderr, not memory.
const EVENT_QUEUE: usize = 256;

/// `conclave worker`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// The server: `ws://host:port` (or `http://`), or the full `ws://host:port/v1/workers`.
    #[arg(long, env = "CONCLAVE_WORKER_URL")]
    pub url: String,
    /// The worker's token, where the server asks for one.
    #[arg(long, env = "CONCLAVE_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A task kind this worker takes; repeat it for more.
    #[arg(long = "capability", required = true, value_parser = TaskKind::parse)]
    pub capabilities: Vec<TaskKind>,
    /// How many tasks may run at once.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_CAPACITY))]
    pub capacity: u32,
    /// The name the server shows for this worker.
    #[arg(long)]
    pub name: Option<String>,
    /// The program, run per task as `sh -c CMD`: the input as JSON on stdin, stdout the output.
    #[arg(long)]
    pub exec: String,
}

/// Why the worker stopped, or why one connection ended. [`run`] reconnects after any of these
/// except the ones [`WorkerError::is_fatal`] names, which no retry can mend.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid --url {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot connect: {0}")]
    Connect(#[source] tungstenite::Error),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the server refused this worker ({}): {message}", .code.as_str())]
    Refused { code: ErrorCode, message: String },
    #[error("no welcome within {0:?}")]
    WelcomeTimeout(Duration),
    #[error("the socket failed: {0}")]
    Socket(#[from] tungstenite::Error),
    #[error("the server closed the connection{0}")]
    Closed(String),
    #[error("a frame failed to serialize: {0}")]
    Encode(#[from] serde_json::Error),
}

impl WorkerError {
    /// A bad URL, or a server that turned this worker away for who it is (its token, its
    /// `hello`, or no worker socket at that address): retrying would only repeat the refusal.
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::BadUrl { .. } => true,
            Self::Refused { code, .. } => matches!(
                code,
                ErrorCode::Unauthorized | ErrorCode::Forbidden | ErrorCode::BadRequest
            ),
            Self::Connect(tungstenite::Error::Http(response)) => {
                let status = response.status();
                status.is_client_error()
                    && status != tungstenite::http::StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// Why one task failed. Its `Display` is the `error` the server records;
/// [`TaskFailure::retryable`] says whether another attempt could go differently.
#[derive(Debug, thiserror::Error)]
enum TaskFailure {
    #[error("cannot start `sh -c`: {0}")]
    Spawn(io::Error),
    #[error("the program failed ({status}){}", stderr_tail(.last_line))]
    Exited {
        status: ExitStatus,
        last_line: Option<String>,
    },
    #[error("waiting for the program failed: {0}")]
    Wait(io::Error),
    #[error("reading the program's stdout failed: {0}")]
    ReadStdout(io::Error),
    #[error("stdout passed the {MAX_OUTPUT_BYTES}-byte limit; the program was stopped")]
    OutputTooLarge,
    #[error("the output encodes to {0} bytes, over the {MAX_OUTPUT_BYTES}-byte frame limit")]
    FrameTooLarge(usize),
    #[error("the task's deadline passed; the program was stopped")]
    Deadline,
    #[error("the worker is already running its capacity of {0} tasks")]
    AtCapacity(usize),
    #[error("the worker is draining")]
    Draining,
}

impl TaskFailure {
    /// A program that crashed or timed out may do better next time, or on another worker; one
    /// that cannot start, or whose output is too large, will fail the same way again.
    fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Exited { .. }
                | Self::Wait(_)
                | Self::ReadStdout(_)
                | Self::Deadline
                | Self::AtCapacity(_)
                | Self::Draining
        )
    }
}

fn stderr_tail(last_line: &Option<String>) -> String {
    match last_line {
        Some(line) => format!(": {line}"),
        None => String::new(),
    }
}

/// Runs the worker until `shutdown` resolves (then drains, and returns `Ok`) or a fatal error.
/// A lost connection is retried with backoff, forever: a worker outliving a server restart is
/// the point of running one.
pub async fn run<F>(args: WorkerArgs, shutdown: F) -> Result<(), WorkerError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let config = Config::new(args)?;
    // A watch, not the future itself, because both the backoff sleep and the connection wait
    // on it, and a drain that began must stay begun.
    let (stop_tx, mut stop) = watch::channel(false);
    let signal = tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let result = reconnect_loop(&config, &mut stop).await;
    signal.abort();
    result
}

async fn reconnect_loop(
    config: &Config,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let mut backoff = Backoff::new();
    loop {
        let err = match connect_and_serve(config, &mut backoff, stop).await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_fatal() => return Err(err),
            Err(err) => err,
        };
        if *stop.borrow() {
            info!(error = %err, "connection ended while stopping");
            return Ok(());
        }
        let delay = backoff.next_delay();
        warn!(error = %err, retry_in = ?delay, url = %config.url, "not connected to the server");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(stop) => return Ok(()),
        }
    }
}

/// Resolves once shutdown was asked for (or its sender is gone, which means the same).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// One connection's life: connect, `hello`, `welcome`, then serve until drained (`Ok`) or lost.
/// Stopping before the `welcome` returns `Ok` at once: no task can be running yet.
async fn connect_and_serve(
    config: &Config,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let (sink, stream, worker, heartbeat_s) = tokio::select! {
        opened = open(config) => opened?,
        () = stopped(stop) => return Ok(()),
    };
    backoff.reset();
    info!(%worker, heartbeat_s, url = %config.url, "connected");
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let mut connection = Connection {
        config,
        sink,
        running: HashMap::new(),
        unacked: HashMap::new(),
        next_ref: 0,
        tasks: JoinSet::new(),
        retries: FuturesUnordered::new(),
        events: events_tx,
        drain_until: None,
    };
    let heartbeat = Duration::from_secs(heartbeat_s.clamp(1, 3600));
    let result = connection.serve(stream, events_rx, heartbeat, stop).await;
    if result.is_err() && !connection.running.is_empty() {
        warn!(
            tasks = connection.running.len(),
            "stopping the running tasks: their leases went with the connection, and the server \
             retries them"
        );
    }
    result
}

/// Connects, says `hello`, and waits for `welcome`.
async fn open(
    config: &Config,
) -> Result<
    (
        SplitSink<Socket, Message>,
        SplitStream<Socket>,
        WorkerId,
        u64,
    ),
    WorkerError,
> {
    let (socket, _) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async(config.url.as_str()),
    )
    .await
    .map_err(|_| WorkerError::ConnectTimeout(CONNECT_TIMEOUT))?
    .map_err(WorkerError::Connect)?;
    let (mut sink, mut stream) = socket.split();
    // Not logged: it carries the token.
    sink.send(Message::text(encode(&config.hello())?)).await?;
    let welcome = async {
        while let Some(message) = stream.next().await {
            let text = match message? {
                Message::Text(text) => text,
                Message::Close(frame) => return Err(WorkerError::Closed(close_reason(frame))),
                _ => continue,
            };
            debug!(frame = preview(&text), "received");
            match serde_json::from_str::<WorkerFrame>(&text) {
                Ok(WorkerFrame::Welcome {
                    worker,
                    heartbeat_s,
                    ..
                }) => return Ok((worker, heartbeat_s)),
                Ok(WorkerFrame::Error { code, message, .. }) => {
                    return Err(WorkerError::Refused { code, message });
                }
                _ => warn!(
                    frame = preview(&text),
                    "ignoring a frame before the welcome"
                ),
            }
        }
        Err(WorkerError::Closed(String::new()))
    };
    let (worker, heartbeat_s) = tokio::time::timeout(WELCOME_TIMEOUT, welcome)
        .await
        .map_err(|_| WorkerError::WelcomeTimeout(WELCOME_TIMEOUT))??;
    Ok((sink, stream, worker, heartbeat_s))
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The flags, checked once.
struct Config {
    url: String,
    command: Arc<str>,
    capacity: usize,
    args: WorkerArgs,
}

impl Config {
    fn new(args: WorkerArgs) -> Result<Self, WorkerError> {
        Ok(Self {
            url: worker_socket_url(&args.url)?,
            command: Arc::from(args.exec.as_str()),
            capacity: args.capacity as usize,
            args,
        })
    }

    fn hello(&self) -> WorkerRequest {
        WorkerRequest {
            reference: None,
            command: WorkerCommand::Hello {
                token: self.args.token.clone(),
                name: self.args.name.clone(),
                capabilities: self.args.capabilities.clone(),
                capacity: i64::from(self.args.capacity),
            },
        }
    }
}

/// The worker socket's URL from `--url`: a server base (`ws://host:port`, optionally under a
/// path prefix, or `http://`) gets `/v1/workers` appended; a URL already ending in it is kept.
pub fn worker_socket_url(raw: &str) -> Result<String, WorkerError> {
    let bad = |reason| WorkerError::BadUrl {
        url: raw.to_owned(),
        reason,
    };
    let trimmed = raw.trim();
    let rest = if let Some(rest) = trimmed.strip_prefix("ws://") {
        rest
    } else if let Some(rest) = trimmed.strip_prefix("http://") {
        rest
    } else if trimmed.starts_with("wss://") || trimmed.starts_with("https://") {
        return Err(bad(
            "TLS is not built into the worker; use ws:// (behind a TLS-terminating proxy if need be)",
        ));
    } else {
        return Err(bad("it must start with ws:// (or http://)"));
    };
    if rest.contains(['?', '#']) {
        return Err(bad(
            "no query string or fragment: the token goes in --token",
        ));
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let path = path.trim_end_matches('/');
    let path = if path == "v1/workers" || path.ends_with("/v1/workers") {
        path.to_owned()
    } else if path.is_empty() {
        "v1/workers".to_owned()
    } else {
        format!("{path}/v1/workers")
    };
    Ok(format!("ws://{host}/{path}"))
}

/// What a task's tokio task tells its connection. Each carries the lease it ran under, so that
/// an event from a run that was replaced or dropped is recognised and ignored.
enum TaskEvent {
    Progress {
        task: TaskId,
        lease: LeaseId,
        data: Value,
    },
    Finished {
        task: TaskId,
        lease: LeaseId,
        outcome: Result<Value, TaskFailure>,
        elapsed: Duration,
    },
}

/// A task whose program runs now.
struct Running {
    lease: LeaseId,
    abort: AbortHandle,
    deadline: Option<Instant>,
}

/// A `complete` or `fail` sent with a `ref` and not yet acknowledged, kept whole so that a
/// `storage_unavailable` refusal can send the very same frame again.
struct Unacked {
    task: TaskId,
    text: String,
    attempts: u32,
}

/// One connection: the socket's only writer, and the owner of every task assigned on it.
struct Connection<'a> {
    config: &'a Config,
    sink: SplitSink<Socket, Message>,
    running: HashMap<TaskId, Running>,
    unacked: HashMap<String, Unacked>,
    next_ref: u64,
    /// Dropping the set aborts every task in it, which kills their process groups: that is how
    /// a lost connection stops its programs.
    tasks: JoinSet<()>,
    /// Each resolves to the `ref` of a result to send again.
    retries: FuturesUnordered<BoxFuture<'static, String>>,
    events: mpsc::Sender<TaskEvent>,
    /// Set once draining: when the drain gives up on the running tasks.
    drain_until: Option<Instant>,
}

impl Connection<'_> {
    async fn serve(
        &mut self,
        mut stream: SplitStream<Socket>,
        mut events: mpsc::Receiver<TaskEvent>,
        heartbeat: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), WorkerError> {
        let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if let Some(until) = self.drain_until
                && self.running.is_empty()
            {
                if self.unacked.is_empty() {
                    info!("drained");
                    return self.close(&mut stream, "drained").await;
                }
                // Only acks are awaited now: not for as long as a program's deadline.
                self.drain_until = Some(until.min(Instant::now() + ACK_WAIT));
            }
            let drain_until = self.drain_until;
            tokio::select! {
                message = stream.next() => match message {
                    Some(Ok(message)) => self.on_message(message).await?,
                    Some(Err(err)) => return Err(err.into()),
                    None => return Err(WorkerError::Closed(String::new())),
                },
                Some(event) = events.recv() => self.on_event(event).await?,
                _ = beat.tick() => self.send(None, WorkerCommand::Heartbeat).await?,
                Some(reference) = self.retries.next(), if !self.retries.is_empty() => {
                    self.resend(reference).await?;
                }
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(err) = joined
                        && err.is_panic()
                    {
                        error!(%err, "a task runner panicked");
                    }
                }
                () = stopped(stop), if drain_until.is_none() => self.start_drain().await?,
                () = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)),
                    if drain_until.is_some() =>
                {
                    warn!(
                        tasks = self.running.len(),
                        unacked = self.unacked.len(),
                        "the drain timed out; stopping what is left"
                    );
                    return self.close(&mut stream, "drain timed out").await;
                }
            }
        }
    }

    async fn on_message(&mut self, message: Message) -> Result<(), WorkerError> {
        let text = match message {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(WorkerError::Closed(close_reason(frame))),
            // tungstenite answers pings itself; binary frames are no part of this protocol.
            _ => return Ok(()),
        };
        debug!(frame = preview(&text), "received");
        match serde_json::from_str::<WorkerFrame>(&text) {
            Ok(WorkerFrame::Assign { task }) => self.on_assign(task).await?,
            Ok(WorkerFrame::Cancel { task }) => match self.running.remove(&task) {
                Some(running) => {
                    running.abort.abort();
                    info!(%task, "task canceled: program stopped");
                }
                None => debug!(%task, "cancel for a task not running here"),
            },
            Ok(WorkerFrame::Ack { reference, .. }) => {
                if let Some(reference) = reference {
                    self.unacked.remove(&reference);
                }
            }
            Ok(WorkerFrame::Error {
                reference,
                code,
                message,
                task,
            }) => self.on_error(reference, code, &message, task),
            Ok(WorkerFrame::Welcome { .. } | WorkerFrame::Pong) => {}
            // A newer server may send more: not understanding a frame is no reason to drop
            // the connection and every task on it.
            Err(err) => warn!(%err, frame = preview(&text), "ignoring a frame not understood"),
        }
        Ok(())
    }

    /// Starts the task, unless the worker is draining or full: the server should never assign
    /// then, but if it does, a retryable `fail` hands the task straight back.
    async fn on_assign(&mut self, task: Assignment) -> Result<(), WorkerError> {
        let refusal = if self.drain_until.is_some() {
            Some(TaskFailure::Draining)
        } else if self.running.len() >= self.config.capacity && !self.running.contains_key(&task.id)
        {
            Some(TaskFailure::AtCapacity(self.config.capacity))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            warn!(task = %task.id, reason = %refusal, "assignment refused");
            return self.send_result(task.id, task.lease, Err(refusal)).await;
        }
        let deadline = local_deadline(&task);
        let (id, lease) = (task.id.clone(), task.lease.clone());
        info!(task = %id, kind = %task.kind, attempt = task.attempt, "task started");
        let abort = self.tasks.spawn(run_task(
            self.config.command.clone(),
            task,
            deadline,
            self.events.clone(),
        ));
        let running = Running {
            lease,
            abort,
            deadline,
        };
        if let Some(earlier) = self.running.insert(id.clone(), running) {
            // Assigned again under a new lease: the earlier run's results would be refused.
            earlier.abort.abort();
            info!(task = %id, "task reassigned: the earlier run was stopped");
        }
        Ok(())
    }

    fn on_error(
        &mut self,
        reference: Option<String>,
        code: ErrorCode,
        message: &str,
        task: Option<TaskId>,
    ) {
        let result = reference
            .as_deref()
            .and_then(|reference| self.unacked.remove_entry(reference));
        let task = task.or_else(|| result.as_ref().map(|(_, unacked)| unacked.task.clone()));
        warn!(code = code.as_str(), message, task = ?task, "the server refused a frame");
        if let Some((reference, unacked)) = result {
            if code == ErrorCode::StorageUnavailable && unacked.attempts < RESULT_ATTEMPTS {
                let delay = RESULT_RETRY_BASE * 2u32.pow(unacked.attempts - 1);
                let again = reference.clone();
                self.retries
                    .push(tokio::time::sleep(delay).map(move |()| again).boxed());
                self.unacked.insert(reference, unacked);
            } else {
                warn!(task = %unacked.task, "result given up: the server retries the task");
            }
        }
        // The lease is gone: the server will take nothing more from this run.
        if code == ErrorCode::Conflict
            && let Some(task) = task
            && let Some(running) = self.running.remove(&task)
        {
            running.abort.abort();
            info!(%task, "lease lost: program stopped");
        }
    }

    async fn on_event(&mut self, event: TaskEvent) -> Result<(), WorkerError> {
        match event {
            TaskEvent::Progress { task, lease, data } => {
                if self.holds(&task, &lease) {
                    let command = WorkerCommand::Progress { task, lease, data };
                    self.send(None, command).await?;
                }
            }
            TaskEvent::Finished {
                task,
                lease,
                outcome,
                elapsed,
            } => {
                if !self.holds(&task, &lease) {
                    return Ok(());
                }
                self.running.remove(&task);
                match &outcome {
                    Ok(_) => info!(%task, ?elapsed, "task completed"),
                    Err(failure) => info!(
                        %task, ?elapsed, error = %failure, retryable = failure.retryable(),
                        "task failed"
                    ),
                }
                self.send_result(task, lease, outcome).await?;
            }
        }
        Ok(())
    }

    /// Whether `task` still runs here under `lease`.
    fn holds(&self, task: &TaskId, lease: &LeaseId) -> bool {
        self.running
            .get(task)
            .is_some_and(|running| running.lease == *lease)
    }

    /// Sends `complete` or `fail` with a fresh `ref`, and keeps it until the `ack`.
    async fn send_result(
        &mut self,
        task: TaskId,
        lease: LeaseId,
        outcome: Result<Value, TaskFailure>,
    ) -> Result<(), WorkerError> {
        self.next_ref += 1;
        let reference = format!("r{}", self.next_ref);
        let request = |command| WorkerRequest {
            reference: Some(reference.clone()),
            command,
        };
        let fail = |failure: TaskFailure| WorkerCommand::Fail {
            task: task.clone(),
            lease: lease.clone(),
            error: failure.to_string(),
            retryable: failure.retryable(),
        };
        let mut text = encode(&request(match outcome {
            Ok(output) => WorkerCommand::Complete {
                task: task.clone(),
                lease: lease.clone(),
                output,
            },
            Err(failure) => fail(failure),
        }))?;
        if text.len() > MAX_OUTPUT_BYTES {
            text = encode(&request(fail(TaskFailure::FrameTooLarge(text.len()))))?;
        }
        self.send_text(text.clone()).await?;
        self.unacked.insert(
            reference,
            Unacked {
                task,
                text,
                attempts: 1,
            },
        );
        Ok(())
    }

    async fn resend(&mut self, reference: String) -> Result<(), WorkerError> {
        let Some(unacked) = self.unacked.get_mut(&reference) else {
            return Ok(());
        };
        unacked.attempts += 1;
        info!(task = %unacked.task, attempt = unacked.attempts, "sending the result again");
        let text = unacked.text.clone();
        self.send_text(text).await
    }

    /// Says `drain` and sets how long to wait: until the latest deadline of the running tasks,
    /// after which the server has given up on them anyway.
    async fn start_drain(&mut self) -> Result<(), WorkerError> {
        let now = Instant::now();
        let latest = self
            .running
            .values()
            .map(|running| running.deadline.unwrap_or(now + DRAIN_FALLBACK))
            .max()
            .unwrap_or(now);
        let until = latest.max(now + ACK_WAIT);
        self.drain_until = Some(until);
        info!(
            tasks = self.running.len(),
            wait_at_most = ?until.duration_since(now),
            "draining: taking no new tasks"
        );
        self.send(None, WorkerCommand::Drain).await
    }

    /// Stops what still runs, and closes the socket with the full handshake, within
    /// [`CLOSE_TIMEOUT`]: reading up to the server's own close means no unread frame is left
    /// behind, which would make the kernel reset the connection instead of closing it.
    async fn close(
        &mut self,
        stream: &mut SplitStream<Socket>,
        reason: &'static str,
    ) -> Result<(), WorkerError> {
        self.tasks.shutdown().await;
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: reason.into(),
        };
        let handshake = async {
            self.sink.send(Message::Close(Some(frame))).await?;
            while let Some(message) = stream.next().await {
                if let Message::Close(_) = message? {
                    break;
                }
            }
            Ok::<_, tungstenite::Error>(())
        };
        match tokio::time::timeout(CLOSE_TIMEOUT, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(%err, "closing the socket failed"),
            Err(_) => debug!("the server did not answer the close in time"),
        }
        Ok(())
    }

    async fn send(
        &mut self,
        reference: Option<String>,
        command: WorkerCommand,
    ) -> Result<(), WorkerError> {
        let text = encode(&WorkerRequest { reference, command })?;
        self.send_text(text).await
    }

    async fn send_text(&mut self, text: String) -> Result<(), WorkerError> {
        debug!(frame = preview(&text), "sent");
        self.sink.send(Message::text(text)).await?;
        Ok(())
    }
}

fn encode(request: &WorkerRequest) -> Result<String, WorkerError> {
    Ok(serde_json::to_string(request)?)
}

/// At most the first 200 bytes of a frame, for logs: outputs can be a megabyte.
fn preview(text: &str) -> &str {
    &text[..text.floor_char_boundary(200)]
}

fn close_reason(frame: Option<CloseFrame>) -> String {
    frame.map_or_else(String::new, |frame| {
        format!(": {} {}", u16::from(frame.code), frame.reason)
    })
}

/// The moment, on this machine's clock, past which a task's program is stopped: the server's
/// deadline plus [`DEADLINE_GRACE`]. Without it, a stuck program would hold a slot of capacity
/// that the server, having timed the task out, believes is free.
fn local_deadline(task: &Assignment) -> Option<Instant> {
    match chrono::DateTime::parse_from_rfc3339(&task.deadline) {
        Ok(deadline) => {
            let left = (deadline.to_utc() - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            Some(Instant::now() + left + DEADLINE_GRACE)
        }
        Err(err) => {
            warn!(task = %task.id, deadline = task.deadline, %err, "unreadable deadline: none kept");
            None
        }
    }
}

async fn run_task(
    command: Arc<str>,
    task: Assignment,
    deadline: Option<Instant>,
    events: mpsc::Sender<TaskEvent>,
) {
    let started = Instant::now();
    let outcome = execute(&command, &task, deadline, &events).await;
    // A closed queue means the connection is gone, and this task with it.
    let _ = events
        .send(TaskEvent::Finished {
            task: task.id,
            lease: task.lease,
            outcome,
            elapsed: started.elapsed(),
        })
        .await;
}

/// Runs the program once: feeds stdin, forwards stderr, collects stdout, all at once so that no
/// pipe can fill and stall the program, and all bounded by the task's deadline.
async fn execute(
    command: &str,
    task: &Assignment,
    deadline: Option<Instant>,
    events: &mpsc::Sender<TaskEvent>,
) -> Result<Value, TaskFailure> {
    let mut child = spawn(command, task).map_err(TaskFailure::Spawn)?;
    let group = ProcessGroup::of(&child);
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(TaskFailure::Spawn(io::Error::other("no stdio pipes")));
    };
    let work = async {
        tokio::join!(
            feed_stdin(stdin, task.input.to_string()),
            read_stdout(stdout, &group),
            forward_stderr(stderr, task, events),
            async {
                let status = child.wait().await;
                // Whatever the program left behind in its group ends with it, and so closes
                // the pipes this function still reads.
                group.kill();
                status
            },
        )
    };
    let ((), stdout, last_line, status) = match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, work)
            .await
            .map_err(|_| TaskFailure::Deadline)?,
        None => work.await,
    };
    let status = status.map_err(TaskFailure::Wait)?;
    let stdout = stdout?;
    if !status.success() {
        return Err(TaskFailure::Exited { status, last_line });
    }
    Ok(interpret_output(&stdout))
}

fn spawn(command: &str, task: &Assignment) -> io::Result<Child> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("CONCLAVE_TASK_ID", task.id.as_str())
        .env("CONCLAVE_TASK_KIND", task.kind.as_str())
        .env("CONCLAVE_TASK_ATTEMPT", task.attempt.to_string())
        .env("CONCLAVE_SESSION", task.session.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// The program's process group (it leads its own, from `process_group(0)`). It is killed once:
/// on the program's exit, on runaway output, or when the task is dropped, whichever comes
/// first. Killing it once only matters because after that its id may be reused.
struct ProcessGroup(AtomicI32);

impl ProcessGroup {
    fn of(child: &Child) -> Self {
        let pgid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .unwrap_or(0);
        Self(AtomicI32::new(pgid))
    }

    fn kill(&self) {
        let pgid = self.0.swap(0, Ordering::Relaxed);
        // 0 and 1 would address this process's own group and every process: never those.
        if pgid > 1 {
            // SAFETY: kill(2) touches no memory of ours; a negative pid names a process group.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn feed_stdin(mut stdin: ChildStdin, input: String) {
    // A program may exit without reading its input: the broken pipe is its choice, not an error.
    if let Err(err) = stdin.write_all(input.as_bytes()).await {
        debug!(%err, "the program did not read all of its input");
    }
    // Dropping stdin here closes it: the program sees the end of its input.
}

/// Reads stdout up to [`MAX_OUTPUT_BYTES`]; one byte more and the program is stopped.
async fn read_stdout(stdout: ChildStdout, group: &ProcessGroup) -> Result<Vec<u8>, TaskFailure> {
    let mut kept = Vec::new();
    stdout
        .take(MAX_OUTPUT_BYTES as u64 + 1)
        .read_to_end(&mut kept)
        .await
        .map_err(TaskFailure::ReadStdout)?;
    if kept.len() > MAX_OUTPUT_BYTES {
        group.kill();
        return Err(TaskFailure::OutputTooLarge);
    }
    Ok(kept)
}

/// Sends each stderr line as progress, within the rate limit, and returns the last non-blank
/// line for the error of a failed run.
async fn forward_stderr(
    mut stderr: ChildStderr,
    task: &Assignment,
    events: &mpsc::Sender<TaskEvent>,
) -> Option<String> {
    let mut splitter = LineSplitter::default();
    let mut gate = ProgressGate::new(Instant::now());
    let mut last_line = None;
    let mut lines = Vec::new();
    let mut chunk = vec![0; 8192];
    loop {
        let read = stderr.read(&mut chunk).await;
        let done = match read {
            Ok(0) => true,
            Ok(n) => {
                splitter.push(&chunk[..n], &mut lines);
                false
            }
            Err(err) => {
                debug!(%err, "reading stderr failed");
                true
            }
        };
        if done {
            lines.extend(std::mem::take(&mut splitter).finish());
        }
        for line in lines.drain(..) {
            if !line.trim().is_empty() {
                last_line = Some(line.clone());
            }
            if let Some(dropped) = gate.admit(Instant::now()) {
                let data = progress_data(line, dropped);
                // A closed queue means the connection is gone, and this task with it.
                let _ = events
                    .send(TaskEvent::Progress {
                        task: task.id.clone(),
                        lease: task.lease.clone(),
                        data,
                    })
                    .await;
            }
        }
        if done {
            break;
        }
    }
    if gate.total_dropped > 0 {
        info!(task = %task.id, dropped = gate.total_dropped, "stderr lines over the rate limit were not sent");
    }
    last_line
}

/// A `progress` frame's data: the line, and how many lines were dropped just before it.
fn progress_data(line: String, dropped: u64) -> Value {
    if dropped == 0 {
        json!({ "line": line })
    } else {
        json!({ "line": line, "dropped": dropped })
    }
}

/// The output of a run that succeeded: its stdout as JSON when it is JSON (trimmed), else as
/// `{"text": stdout}`. Bytes that are not UTF-8 become U+FFFD: JSON has no other way to carry
/// them, and a program returning binary should encode it itself.
fn interpret_output(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(value) => value,
        Err(_) => json!({ "text": text }),
    }
}

/// Cuts a byte stream into lines, holding at most [`MAX_LINE_BYTES`] of any one: a program that
/// never writes a newline cannot make the worker buffer without end.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
    cut: bool,
}

impl LineSplitter {
    fn push(&mut self, mut chunk: &[u8], lines: &mut Vec<String>) {
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            self.append(&chunk[..end]);
            lines.push(self.take());
            chunk = &chunk[end + 1..];
        }
        self.append(chunk);
    }

    /// The last line, if the stream did not end with a newline.
    fn finish(mut self) -> Option<String> {
        (!self.partial.is_empty() || self.cut).then(|| self.take())
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = MAX_LINE_BYTES.saturating_sub(self.partial.len());
        if bytes.len() > room {
            self.cut = true;
        }
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn take(&mut self) -> String {
        let mut bytes = std::mem::take(&mut self.partial);
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let mut line = String::from_utf8_lossy(&bytes).into_owned();
        if std::mem::take(&mut self.cut) {
            line.push('…');
        }
        line
    }
}

/// At most [`PROGRESS_LINES_PER_SECOND`] lines in each one-second window.
struct ProgressGate {
    window: Instant,
    sent: u32,
    /// Dropped since the last line let through.
    dropped: u64,
    total_dropped: u64,
}

impl ProgressGate {
    fn new(now: Instant) -> Self {
        Self {
            window: now,
            sent: 0,
            dropped: 0,
            total_dropped: 0,
        }
    }

    /// `Some(lines dropped just before this one)` if this line may be sent, else `None`.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.sent = 0;
        }
        if self.sent < PROGRESS_LINES_PER_SECOND {
            self.sent += 1;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            self.total_dropped += 1;
            None
        }
    }
}

/// Reconnection delays: exponential, with jitter so that the workers cut off by one server
/// restart do not all come back in the same instant.
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { step: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.step = BACKOFF_MIN;
    }

    /// Somewhere between half the current step and all of it; the step then doubles.
    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(BACKOFF_MAX);
        step.mul_f64(rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ids::SessionId;
    use crate::protocol::worker::parse_worker_request;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    #[test]
    fn stdout_is_json_when_it_parses_and_text_otherwise() {
        assert_eq!(interpret_output(b"{\"n\": 2}\n"), json!({"n": 2}));
        assert_eq!(interpret_output(b"  [1, 2]  \n\n"), json!([1, 2]));
        assert_eq!(interpret_output(b"42"), json!(42));
        assert_eq!(interpret_output(b"done\n"), json!({"text": "done\n"}));
        assert_eq!(
            interpret_output(b"{\"n\": 2} extra"),
            json!({"text": "{\"n\": 2} extra"})
        );
        assert_eq!(interpret_output(b""), json!({"text": ""}));
        assert_eq!(interpret_output(b"a\xffb"), json!({"text": "a\u{fffd}b"}));
    }

    #[test]
    fn the_flags_parse_and_are_checked() {
        use clap::{CommandFactory as _, Parser as _};
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            worker: WorkerArgs,
        }
        Cli::command().debug_assert();
        let parse = |extra: &[&str]| {
            let base = ["worker", "--url", "ws://h:1", "--exec", "cat"];
            Cli::try_parse_from(base.iter().chain(extra)).map(|cli| cli.worker)
        };
        let args = parse(&[
            "--capability",
            "a",
            "--capability",
            "b.c",
            "--capacity",
            "4",
        ])
        .unwrap();
        assert_eq!(args.capabilities.len(), 2);
        assert_eq!(args.capacity, 4);
        assert!(
            parse(&["--capacity", "4"]).is_err(),
            "a capability is required"
        );
        assert!(parse(&["--capability", "a", "--capacity", "0"]).is_err());
        assert!(parse(&["--capability", "a", "--capacity", "1025"]).is_err());
        assert!(parse(&["--capability", "no spaces", "--capacity", "1"]).is_err());
    }

    #[test]
    fn the_url_is_the_base_or_the_socket_itself() {
        let ok = |raw: &str| worker_socket_url(raw).unwrap();
        assert_eq!(ok("ws://127.0.0.1:8080"), "ws://127.0.0.1:8080/v1/workers");
        assert_eq!(
            ok(" ws://127.0.0.1:8080/ "),
            "ws://127.0.0.1:8080/v1/workers"
        );
        assert_eq!(ok("ws://h:1/v1/workers"), "ws://h:1/v1/workers");
        assert_eq!(ok("ws://h:1/v1/workers/"), "ws://h:1/v1/workers");
        assert_eq!(ok("http://h:1"), "ws://h:1/v1/workers");
        assert_eq!(ok("ws://h/conclave"), "ws://h/conclave/v1/workers");
        assert_eq!(
            ok("ws://h/conclave/v1/workers"),
            "ws://h/conclave/v1/workers"
        );
        for bad in [
            "wss://h",
            "https://h",
            "h:8080",
            "ws://",
            "ws:///v1/workers",
            "ws://h/?token=x",
        ] {
            let err = worker_socket_url(bad).unwrap_err();
            assert!(
                matches!(err, WorkerError::BadUrl { .. }) && err.is_fatal(),
                "{bad}"
            );
        }
    }

    #[test]
    fn stderr_is_cut_into_bounded_lines() {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        splitter.push(b"one\ntw", &mut lines);
        splitter.push(b"o\r\n\nthr", &mut lines);
        assert_eq!(lines, ["one", "two", ""]);
        assert_eq!(splitter.finish().as_deref(), Some("thr"));

        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        let long = vec![b'x'; MAX_LINE_BYTES * 3];
        splitter.push(&long, &mut lines);
        splitter.push(b"x\nnext\n", &mut lines);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES + '…'.len_utf8());
        assert!(lines[0].ends_with('…'));
        assert_eq!(lines[1], "next");
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn progress_is_rate_limited_and_counts_what_it_drops() {
        let start = Instant::now();
        let mut gate = ProgressGate::new(start);
        for _ in 0..PROGRESS_LINES_PER_SECOND {
            assert_eq!(gate.admit(start), Some(0));
        }
        assert_eq!(gate.admit(start + Duration::from_millis(500)), None);
        assert_eq!(gate.admit(start + Duration::from_millis(900)), None);
        let next_window = start + Duration::from_secs(1);
        assert_eq!(gate.admit(next_window), Some(2));
        assert_eq!(gate.admit(next_window), Some(0));
        assert_eq!(gate.total_dropped, 2);
        assert_eq!(progress_data("a".into(), 0), json!({"line": "a"}));
        assert_eq!(
            progress_data("a".into(), 2),
            json!({"line": "a", "dropped": 2})
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new();
        let mut step = BACKOFF_MIN;
        for _ in 0..12 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for step {step:?}"
            );
            step = (step * 2).min(BACKOFF_MAX);
        }
        assert_eq!(backoff.step, BACKOFF_MAX);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn failures_say_whether_to_retry() {
        use std::os::unix::process::ExitStatusExt as _;
        let exited = TaskFailure::Exited {
            status: ExitStatus::from_raw(3 << 8),
            last_line: Some("disk on fire".into()),
        };
        assert!(exited.retryable());
        assert_eq!(
            exited.to_string(),
            "the program failed (exit status: 3): disk on fire"
        );
        assert!(!TaskFailure::Spawn(io::Error::other("x")).retryable());
        assert!(!TaskFailure::OutputTooLarge.retryable());
        assert!(TaskFailure::AtCapacity(1).retryable());
    }

    // ---- end to end, against a fake server speaking the worker protocol ----

    const WAIT: Duration = Duration::from_secs(10);

    /// Answers every kind the tests assign; `$!` is the backgrounded sleep's pid, so the test
    /// can check that a cancel kills the whole group and not just `sh`.
    const SCRIPT: &str = r#"case "$CONCLAVE_TASK_KIND" in
        echo) echo "step $CONCLAVE_TASK_ID $CONCLAVE_TASK_ATTEMPT $CONCLAVE_SESSION" >&2; cat ;;
        fail) echo "warming up" >&2; echo "disk on fire" >&2; exit 3 ;;
        sleep) sleep 30 & echo "pid $!" >&2; wait ;;
        slow) echo working >&2; sleep 0.3; echo done ;;
    esac"#;

    fn args(url: String, capacity: u32) -> WorkerArgs {
        WorkerArgs {
            url,
            token: Some("secret".into()),
            capabilities: ["echo", "fail", "sleep", "slow"]
                .into_iter()
                .map(|kind| TaskKind::parse(kind).unwrap())
                .collect(),
            capacity,
            name: Some("box-1".into()),
            exec: SCRIPT.into(),
        }
    }

    /// Starts the worker against a fresh listener; dropping the sender starts its drain too.
    async fn start_worker(
        capacity: u32,
    ) -> (
        TcpListener,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), WorkerError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("ws://{}", listener.local_addr().unwrap());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let worker = tokio::spawn(run(args(base, capacity), async move {
            let _ = stop_rx.await;
        }));
        (listener, stop_tx, worker)
    }

    /// The server's side of one worker connection.
    struct Peer {
        ws: WebSocketStream<TcpStream>,
    }

    impl Peer {
        async fn accept(listener: &TcpListener) -> Self {
            let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
                .await
                .expect("the worker connects")
                .unwrap();
            let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            Self { ws }
        }

        /// Reads `hello`, checks it, and welcomes the worker.
        async fn welcome(&mut self, capacity: i64) {
            let hello = self.recv().await;
            let WorkerCommand::Hello {
                token,
                name,
                capabilities,
                capacity: declared,
            } = hello.command
            else {
                panic!("expected hello, got {hello:?}");
            };
            assert_eq!(token.as_deref(), Some("secret"));
            assert_eq!(name.as_deref(), Some("box-1"));
            assert_eq!(capabilities.len(), 4);
            assert_eq!(declared, capacity);
            self.send(WorkerFrame::Welcome {
                worker: WorkerId::parse("w1").unwrap(),
                heartbeat_s: 1,
                node: String::new(),
            })
            .await;
        }

        async fn send(&mut self, frame: WorkerFrame) {
            self.ws
                .send(Message::text(frame.encode().to_string()))
                .await
                .unwrap();
        }

        /// A heartbeat, the next frame within 3 s (the welcome said every 1 s).
        async fn heartbeat(&mut self) {
            let message = tokio::time::timeout(Duration::from_secs(3), self.ws.next())
                .await
                .expect("a heartbeat within 3 s")
                .expect("the socket is open")
                .unwrap();
            let request = parse_worker_request(message.to_text().unwrap()).unwrap();
            assert!(
                matches!(request.command, WorkerCommand::Heartbeat),
                "{request:?}"
            );
        }

        /// The next frame other than a heartbeat, within [`WAIT`] in all: heartbeats arriving
        /// every second must not keep a missing frame waited for forever.
        async fn recv(&mut self) -> WorkerRequest {
            let deadline = Instant::now() + WAIT;
            loop {
                let message = tokio::time::timeout_at(deadline, self.ws.next())
                    .await
                    .expect("a frame in time")
                    .expect("the socket is open")
                    .unwrap();
                let Message::Text(text) = message else {
                    panic!("expected a text frame, got {message:?}");
                };
                let request = parse_worker_request(&text).expect("a valid worker frame");
                if !matches!(request.command, WorkerCommand::Heartbeat) {
                    return request;
                }
            }
        }

        /// The worker closes the socket, with nothing but heartbeats before. Reading on past its
        /// close is what sends ours back, completing the handshake it waits for.
        async fn expect_close(&mut self) {
            let deadline = Instant::now() + WAIT;
            let mut closed = false;
            loop {
                match tokio::time::timeout_at(deadline, self.ws.next())
                    .await
                    .expect("the close in time")
                {
                    None => {
                        assert!(closed, "the socket ended without a close frame");
                        return;
                    }
                    Some(Ok(Message::Close(_))) => closed = true,
                    Some(Ok(Message::Text(text))) => {
                        let request = parse_worker_request(&text).unwrap();
                        assert!(
                            matches!(request.command, WorkerCommand::Heartbeat),
                            "expected the close, got {request:?}"
                        );
                    }
                    other => panic!("expected the close, got {other:?}"),
                }
            }
        }

        /// A progress line for `task`.
        async fn progress(&mut self, task: &str) -> String {
            let request = self.recv().await;
            match request.command {
                WorkerCommand::Progress { task: id, data, .. } if id.as_str() == task => {
                    data["line"].as_str().expect("a line").to_owned()
                }
                other => panic!("expected progress for {task}, got {other:?}"),
            }
        }

        /// The pid a `sleep` task reports, checked alive.
        async fn sleeper(&mut self, task: &str) -> u32 {
            let line = self.progress(task).await;
            let pid = line
                .strip_prefix("pid ")
                .and_then(|pid| pid.parse().ok())
                .unwrap_or_else(|| panic!("expected `pid N`, got {line:?}"));
            assert!(!is_dead(pid), "the sleep should be running");
            pid
        }

        async fn ack(&mut self, request: &WorkerRequest) {
            self.send(WorkerFrame::Ack {
                reference: request.reference.clone(),
                task: None,
            })
            .await;
        }
    }

    fn assign(id: &str, kind: &str, input: Value) -> WorkerFrame {
        WorkerFrame::Assign {
            task: Assignment {
                id: TaskId::parse(id).unwrap(),
                lease: LeaseId::parse(&format!("lease-{id}")).unwrap(),
                kind: TaskKind::parse(kind).unwrap(),
                input,
                session: SessionId::parse("s1").unwrap(),
                attempt: 1,
                deadline: (chrono::Utc::now() + chrono::TimeDelta::seconds(60)).to_rfc3339(),
            },
        }
    }

    /// Dead or a zombie: a killed grandchild is reparented, and may wait to be reaped.
    fn is_dead(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with(['Z', 'X']))
        })
    }

    async fn wait_dead(pid: u32) {
        let started = Instant::now();
        while !is_dead(pid) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "process {pid} outlived its task"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn runs_tasks_against_a_fake_server() {
        let (listener, stop, worker) = start_worker(1).await;
        let mut peer = Peer::accept(&listener).await;
        peer.welcome(1).await;

        // Heartbeats come by themselves, every heartbeat_s.
        peer.heartbeat().await;

        // Echo: stderr is progress, stdout (JSON) the output; a storage_unavailable is retried
        // with the same frame, same `ref`.
        peer.send(assign("t1", "echo", json!({"n": 2}))).await;
        assert_eq!(peer.progress("t1").await, "step t1 1 s1");
        let complete = peer.recv().await;
        let WorkerCommand::Complete {
            task,
            lease,
            output,
        } = &complete.command
        else {
            panic!("expected complete, got {complete:?}");
        };
        assert_eq!((task.as_str(), lease.as_str()), ("t1", "lease-t1"));
        assert_eq!(*output, json!({"n": 2}));
        let reference = complete.reference.clone().expect("a ref on results");
        peer.send(WorkerFrame::Error {
            reference: Some(reference.clone()),
            code: ErrorCode::StorageUnavailable,
            message: "store down".into(),
            task: Some(TaskId::parse("t1").unwrap()),
        })
        .await;
        let again = peer.recv().await;
        assert_eq!(again.reference.as_deref(), Some(reference.as_str()));
        assert!(
            matches!(&again.command, WorkerCommand::Complete { output, .. } if *output == json!({"n": 2}))
        );
        peer.ack(&again).await;

        // A non-zero exit fails, retryable, with the status and the last stderr line.
        peer.send(assign("t2", "fail", json!({}))).await;
        assert_eq!(peer.progress("t2").await, "warming up");
        assert_eq!(peer.progress("t2").await, "disk on fire");
        let fail = peer.recv().await;
        match &fail.command {
            WorkerCommand::Fail {
                task,
                error,
                retryable,
                ..
            } => {
                assert_eq!(task.as_str(), "t2");
                assert!(*retryable);
                assert!(
                    error.contains("exit status: 3") && error.ends_with("disk on fire"),
                    "{error}"
                );
            }
            other => panic!("expected fail, got {other:?}"),
        }
        peer.ack(&fail).await;

        // Capacity 1: a second assignment while one runs goes straight back.
        peer.send(assign("t3", "sleep", json!({}))).await;
        let sleeper = peer.sleeper("t3").await;
        peer.send(assign("t4", "slow", json!({}))).await;
        let refused = peer.recv().await;
        assert!(
            matches!(&refused.command, WorkerCommand::Fail { task, retryable: true, error, .. }
                if task.as_str() == "t4" && error.contains("capacity")),
            "{refused:?}"
        );
        peer.ack(&refused).await;

        // Cancel kills the program's whole group, quickly.
        peer.send(WorkerFrame::Cancel {
            task: TaskId::parse("t3").unwrap(),
        })
        .await;
        wait_dead(sleeper).await;

        // So does a `conflict`: the lease is gone.
        peer.send(assign("t5", "sleep", json!({}))).await;
        let sleeper = peer.sleeper("t5").await;
        peer.send(WorkerFrame::Error {
            reference: None,
            code: ErrorCode::Conflict,
            message: "stale lease".into(),
            task: Some(TaskId::parse("t5").unwrap()),
        })
        .await;
        wait_dead(sleeper).await;

        // Shutdown: `drain` (nothing more about t3 or t5 before it), the running task finishes
        // and is reported (text output), then the socket closes and the worker returns Ok.
        peer.send(assign("t6", "slow", json!({}))).await;
        assert_eq!(peer.progress("t6").await, "working");
        drop(stop);
        let drain = peer.recv().await;
        assert!(
            matches!(drain.command, WorkerCommand::Drain),
            "expected drain, got {drain:?}"
        );
        let done = peer.recv().await;
        assert!(
            matches!(&done.command, WorkerCommand::Complete { task, output, .. }
                if task.as_str() == "t6" && *output == json!({"text": "done\n"})),
            "{done:?}"
        );
        peer.ack(&done).await;
        peer.expect_close().await;
        let result = tokio::time::timeout(WAIT, worker)
            .await
            .expect("the worker exits");
        assert!(matches!(result, Ok(Ok(()))), "{result:?}");
    }

    #[tokio::test]
    async fn reconnects_and_stops_the_old_connections_programs() {
        let (listener, stop, worker) = start_worker(1).await;
        let mut peer = Peer::accept(&listener).await;
        peer.welcome(1).await;
        peer.send(assign("t1", "sleep", json!({}))).await;
        let sleeper = peer.sleeper("t1").await;
        drop(peer);

        let mut peer = Peer::accept(&listener).await;
        wait_dead(sleeper).await;
        peer.welcome(1).await;
        // Stopping before the welcome is read ends the worker at once, with no drain: wait
        // for a heartbeat, the proof that it was read, to test the drain.
        peer.heartbeat().await;
        drop(stop);
        let drain = peer.recv().await;
        assert!(matches!(drain.command, WorkerCommand::Drain), "{drain:?}");
        peer.expect_close().await;
        let result = tokio::time::timeout(WAIT, worker)
            .await
            .expect("the worker exits");
        assert!(matches!(result, Ok(Ok(()))), "{result:?}");
    }

    #[tokio::test]
    async fn a_refused_hello_is_fatal() {
        let (listener, _stop, worker) = start_worker(1).await;
        let mut peer = Peer::accept(&listener).await;
        assert!(matches!(
            peer.recv().await.command,
            WorkerCommand::Hello { .. }
        ));
        peer.send(WorkerFrame::Error {
            reference: None,
            code: ErrorCode::Unauthorized,
            message: "bad token".into(),
            task: None,
        })
        .await;
        let result = tokio::time::timeout(WAIT, worker)
            .await
            .expect("the worker exits");
        assert!(
            matches!(
                result,
                Ok(Err(WorkerError::Refused {
                    code: ErrorCode::Unauthorized,
                    ..
                }))
            ),
            "{result:?}"
        );
    }
}
