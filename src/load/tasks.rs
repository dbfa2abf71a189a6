//! The `tasks` scenario: W workers on `/v1/workers` completing no-op tasks that a few submitter
//! connections submit over `/v1/ws`, end to end through the server's queue and scheduler.
//!
//! Workers speak the worker protocol of PROTOCOL.md: `hello` with capability `load.noop` and
//! `--capacity`, `welcome` (with `heartbeat_s`), then every `assign` is answered at once with
//! `complete` (output `{}`, the same lease), and a `heartbeat` goes out every `heartbeat_s`.
//!
//! Submitters join the session first, then send `task.submit` pipelined with at most `--window`
//! of their tasks unfinished. A task counts as done when the submitter sees the
//! `task.completed` event for it in the session log (not when a worker sends `complete`): that
//! is the moment a person watching the session would see it. The server sends a submitter its
//! `ack` (carrying the task id) before any later event of the session, so the id is always known
//! by the time its events arrive.
//!
//! A submitter that is answered `rate_limited` backs off: it holds for 50 ms (doubling while
//! refusals go on, to 1 s), then probes with one submit at a time until one is acked. Sending
//! on into the limit would get it closed for abuse (1008) and the run would measure nothing;
//! the report then says that what it measured is the limit.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use super::conduct::{
    Conductor, Cue, Phase, Plan, close_limit, collect, connections, first_failure, gather, outcome,
    ramp_delay, ramp_limit, stage,
};
use super::progress::{Live, Progress, Track};
use super::report::Report;
use super::stats::{Errors, Latency};
use super::target::Target;
use super::ws::{self, Failure, Frame, Socket};
use super::{CommonArgs, DEFAULT_COUNT_CAP, LoadError};

/// The task kind the workers declare and the submitters ask for.
const KIND: &str = "load.noop";

#[derive(Debug, Clone, Args)]
pub struct TasksArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Worker connections.
    #[arg(long, default_value_t = 20)]
    pub workers: usize,
    /// Tasks each worker may hold at once.
    #[arg(long, default_value_t = 4)]
    pub capacity: u32,
    /// Tasks to submit in all.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Submitter connections sharing the tasks.
    #[arg(long, default_value_t = 4)]
    pub submitters: usize,
    /// Tasks a submitter leaves unfinished at most.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// The session the tasks report to.
    #[arg(long, default_value = "load-tasks")]
    pub session: String,
    /// The longest the measured phase may take.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
}

impl TasksArgs {
    fn validate(&self) -> Result<(), LoadError> {
        let bad = |msg: &str| Err(LoadError::InvalidArgs(msg.to_owned()));
        if self.workers == 0 || self.submitters == 0 || self.capacity == 0 || self.window == 0 {
            return bad("--workers, --submitters, --capacity and --window must be at least 1");
        }
        if self.workers + self.submitters > 100_000 {
            return bad("at most 100000 connections in all");
        }
        if self.count == 0 {
            return bad("--count must be at least 1");
        }
        Ok(())
    }
}

struct Ctx {
    user_url: Url,
    worker_url: Url,
    token: Option<String>,
    session: String,
    timeout: Duration,
    window: usize,
    capacity: u32,
    live: Arc<Live>,
    workers_connected: AtomicU64,
    run_start_us: AtomicU64,
}

/// What one connection measured (a worker or a submitter).
#[derive(Default)]
struct ConnResult {
    worker: bool,
    connected: bool,
    errors: Errors,
    dropped: Option<String>,
    // Submitters.
    submitted: u64,
    acked: u64,
    completed: u64,
    failed: u64,
    unfinished: u64,
    ack: Latency,
    done: Latency,
    // Workers.
    assigned: u64,
    canceled: u64,
    heartbeats: u64,
}

outcome!(ConnResult);

#[derive(Deserialize)]
struct Assignment<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    lease: Cow<'a, str>,
}

#[derive(Deserialize)]
struct TaskEvent<'a> {
    #[serde(borrow)]
    task: Cow<'a, str>,
}

fn record(out: &mut ConnResult, live: &Live, failure: Failure) {
    Live::bump(&live.errors);
    out.errors.add_detail(&failure.code, || failure.detail);
}

/// A failure that ends the connection: recorded, and named as why it dropped.
fn record_drop(out: &mut ConnResult, live: &Live, failure: Failure) {
    out.dropped = Some(failure.detail.clone());
    record(out, live, failure);
}

/// Reads the next frame or phase change; `None` when the socket is gone (recorded).
async fn next_text(ws: &mut Socket, cue: &mut Cue, out: &mut ConnResult) -> Option<Option<String>> {
    tokio::select! {
        _ = cue.changed() => Some(None),
        message = ws.next() => match message {
            Some(Ok(Message::Text(text))) => Some(Some(text.as_str().to_owned())),
            Some(Ok(Message::Close(close))) => {
                out.dropped = Some(format!("closed by the server: {close:?}"));
                None
            }
            Some(Ok(_)) => Some(None),
            Some(Err(err)) => {
                out.dropped = Some(err.to_string());
                None
            }
            None => {
                out.dropped = Some("the stream ended".into());
                None
            }
        },
    }
}

/// Sleeps until `until`, or for ever without one.
async fn sleep_until_some(until: Option<Instant>) {
    match until {
        Some(until) => tokio::time::sleep_until(until).await,
        None => std::future::pending().await,
    }
}

async fn worker_task(ctx: Arc<Ctx>, index: usize, delay: Duration, mut cue: Cue) -> ConnResult {
    let mut out = ConnResult {
        worker: true,
        ..ConnResult::default()
    };
    if !cue.ramp_sleep(delay).await {
        return out;
    }
    let connected = async {
        let mut ws = ws::connect(&ctx.worker_url, ctx.timeout).await?;
        let mut hello = serde_json::Map::new();
        hello.insert("name".into(), format!("load-worker-{index}").into());
        hello.insert("capabilities".into(), json!([KIND]));
        hello.insert("capacity".into(), ctx.capacity.into());
        let welcome = ws::hello(&mut ws, hello, ctx.token.as_deref(), ctx.timeout).await?;
        let every = Frame::parse(&welcome)?.heartbeat_s.unwrap_or(5).max(1);
        Ok::<_, Failure>((ws, Duration::from_secs(every)))
    }
    .await;
    let (mut ws, every) = match connected {
        Ok(ok) => ok,
        Err(failure) => {
            Live::bump(&ctx.live.failed);
            record_drop(&mut out, &ctx.live, failure);
            return out;
        }
    };
    out.connected = true;
    Live::bump(&ctx.live.connected);
    ctx.workers_connected.fetch_add(1, Ordering::Relaxed);
    cue.reach(stage::READY);
    // Workers have nothing to wait for: the submitters decide when the run is quiet.
    cue.reach(stage::DRAINED);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        if cue.phase() == Phase::Close {
            break;
        }
        let text = tokio::select! {
            _ = heartbeat.tick() => {
                out.heartbeats += 1;
                if let Err(failure) = ws::send(&mut ws, r#"{"type":"heartbeat"}"#.into()).await {
                    record_drop(&mut out, &ctx.live, failure);
                    break;
                }
                continue;
            }
            next = next_text(&mut ws, &mut cue, &mut out) => match next {
                Some(Some(text)) => text,
                Some(None) => continue,
                None => break,
            },
        };
        let frame = match Frame::parse(&text) {
            Ok(frame) => frame,
            Err(failure) => {
                record(&mut out, &ctx.live, failure);
                continue;
            }
        };
        match &*frame.frame {
            "assign" => {
                let Some(Ok(task)) = frame
                    .task
                    .map(|raw| serde_json::from_str::<Assignment<'_>>(raw.get()))
                else {
                    record(
                        &mut out,
                        &ctx.live,
                        Failure::new("bad_frame", "assign without task id and lease"),
                    );
                    continue;
                };
                out.assigned += 1;
                let complete = json!({"type": "complete", "task": task.id, "lease": task.lease,
                                      "output": {}});
                if let Err(failure) = ws::send(&mut ws, complete.to_string()).await {
                    record_drop(&mut out, &ctx.live, failure);
                    break;
                }
            }
            "cancel" => out.canceled += 1,
            "error" => record(&mut out, &ctx.live, frame.failure()),
            _ => {}
        }
    }
    if let Some(why) = out.dropped.clone()
        && cue.phase() < Phase::Close
    {
        record(&mut out, &ctx.live, Failure::new("closed", why));
    }
    // Stop taking work, then go.
    let _ = ws::send(&mut ws, r#"{"type":"drain"}"#.into()).await;
    ws::close(&mut ws).await;
    out
}

/// A submitter's bookkeeping: requests awaiting their ack, and tasks awaiting completion.
struct Submitter {
    ws: Socket,
    ctx: Arc<Ctx>,
    cue: Cue,
    out: ConnResult,
    quota: u64,
    next_ref: u64,
    /// ref → when it was sent.
    unacked: HashMap<u64, Instant>,
    /// task id → when it was submitted.
    unfinished: HashMap<String, Instant>,
    /// After a `rate_limited`, no submit until then: a submitter that kept sending into the
    /// limit would be closed for abuse (1008) and measure nothing.
    held_until: Option<Instant>,
    /// The next hold: doubled by each `rate_limited` in a row, reset by an ack.
    backoff: Duration,
    /// Since a `rate_limited` and until an ack: one submit in flight at a time, so a full
    /// window is not refused at once after each hold.
    probing: bool,
}

/// The first hold after a `rate_limited`, and the longest.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

impl Submitter {
    fn outstanding(&self) -> usize {
        self.unacked.len() + self.unfinished.len()
    }

    /// Whether a `rate_limited` keeps the submitter from sending now: it is holding, or
    /// probing with a submit in flight.
    fn held(&self) -> bool {
        self.held_until.is_some_and(|until| Instant::now() < until)
            || (self.probing && !self.unacked.is_empty())
    }

    async fn submit(&mut self) -> Result<(), Failure> {
        let reference = self.next_ref;
        self.next_ref += 1;
        let frame = json!({"type": "task.submit", "ref": reference.to_string(),
                           "session": self.ctx.session, "kind": KIND, "input": {},
                           "priority": 0, "max_attempts": 3, "timeout_s": 60});
        self.unacked.insert(reference, Instant::now());
        self.out.submitted += 1;
        Live::bump(&self.ctx.live.sent);
        ws::send(&mut self.ws, frame.to_string()).await
    }

    fn on_text(&mut self, text: &str) {
        let frame = match Frame::parse(text) {
            Ok(frame) => frame,
            Err(failure) => return record(&mut self.out, &self.ctx.live, failure),
        };
        match &*frame.frame {
            "ack" => {
                let Some(sent) = frame.ref_number().and_then(|r| self.unacked.remove(&r)) else {
                    return;
                };
                self.out.ack.record(sent.elapsed());
                self.out.acked += 1;
                self.backoff = BACKOFF.0;
                self.probing = false;
                Live::bump(&self.ctx.live.acked);
                match frame
                    .task
                    .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
                {
                    Some(task) => {
                        self.unfinished.insert(task, sent);
                    }
                    None => record(
                        &mut self.out,
                        &self.ctx.live,
                        Failure::new("bad_frame", "task.submit ack without a task id"),
                    ),
                }
            }
            "error" => {
                if let Some(r) = frame.ref_number() {
                    self.unacked.remove(&r);
                }
                if frame.code.as_deref() == Some("rate_limited") {
                    self.probing = true;
                    self.held_until = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF.1);
                }
                record(&mut self.out, &self.ctx.live, frame.failure());
            }
            "event" => {
                let kind = frame.kind.as_deref().unwrap_or("");
                let finished = matches!(kind, "task.completed" | "task.failed" | "task.canceled");
                if !finished {
                    return;
                }
                let Some(Ok(event)) = frame
                    .data
                    .map(|raw| serde_json::from_str::<TaskEvent<'_>>(raw.get()))
                else {
                    return;
                };
                // Other submitters' tasks are theirs to time.
                let Some(submitted) = self.unfinished.remove(&*event.task) else {
                    return;
                };
                if kind == "task.completed" {
                    self.out.done.record(submitted.elapsed());
                    self.out.completed += 1;
                    Live::bump(&self.ctx.live.completed);
                } else {
                    self.out.failed += 1;
                    record(
                        &mut self.out,
                        &self.ctx.live,
                        Failure::new(kind, format!("task {}", event.task)),
                    );
                }
            }
            _ => {}
        }
    }

    async fn drive(mut self) -> ConnResult {
        loop {
            let phase = self.cue.phase();
            let all_sent = self.out.submitted >= self.quota;
            if (all_sent || phase >= Phase::Stop) && self.outstanding() == 0 {
                self.cue.reach(stage::QUIET);
                self.cue.reach(stage::DRAINED);
            }
            if phase == Phase::Close {
                break;
            }
            while self.cue.phase() == Phase::Run
                && self.out.submitted < self.quota
                && self.outstanding() < self.ctx.window
                && !self.held()
            {
                if let Err(failure) = self.submit().await {
                    record_drop(&mut self.out, &self.ctx.live, failure);
                    break;
                }
            }
            if self.out.dropped.is_some() {
                break;
            }
            let hold = self.held_until.filter(|until| Instant::now() < *until);
            let next = tokio::select! {
                next = next_text(&mut self.ws, &mut self.cue, &mut self.out) => next,
                () = sleep_until_some(hold) => Some(None),
            };
            match next {
                Some(Some(text)) => self.on_text(&text),
                Some(None) => {}
                None => {
                    let why = self.out.dropped.clone().unwrap_or_default();
                    record(&mut self.out, &self.ctx.live, Failure::new("closed", why));
                    break;
                }
            }
        }
        self.out.unfinished = self.outstanding() as u64;
        ws::close(&mut self.ws).await;
        self.out
    }
}

async fn submitter_task(
    ctx: Arc<Ctx>,
    index: usize,
    quota: u64,
    delay: Duration,
    mut cue: Cue,
) -> ConnResult {
    let mut out = ConnResult::default();
    if !cue.ramp_sleep(delay).await {
        return out;
    }
    let name = format!("load-submitter-{index}");
    let joined = ws::join_session(
        &ctx.user_url,
        ctx.token.as_deref(),
        &name,
        &ctx.session,
        None,
        ctx.timeout,
    )
    .await;
    let ws = match joined {
        Ok((ws, _)) => ws,
        Err(failure) => {
            Live::bump(&ctx.live.failed);
            record_drop(&mut out, &ctx.live, failure);
            return out;
        }
    };
    out.connected = true;
    Live::bump(&ctx.live.connected);
    cue.reach(stage::READY);
    Submitter {
        ws,
        ctx,
        cue,
        out,
        quota,
        next_ref: 1,
        unacked: HashMap::new(),
        unfinished: HashMap::new(),
        held_until: None,
        backoff: BACKOFF.0,
        probing: false,
    }
    .drive()
    .await
}

/// Splits `count` tasks over `submitters` as evenly as possible.
fn quotas(count: u64, submitters: usize) -> Vec<u64> {
    let n = submitters as u64;
    (0..n)
        .map(|i| count / n + u64::from(i < count % n))
        .collect()
}

pub async fn run(args: TasksArgs) -> Result<Report, LoadError> {
    args.validate()?;
    let common = &args.common;
    let raw_url = common.url.as_deref().unwrap_or("ws://127.0.0.1:8080");
    let target = Target::resolve(raw_url, common.token.clone(), common.allow_remote).await?;
    let live = Arc::new(Live::default());
    let ctx = Arc::new(Ctx {
        user_url: target.socket("/v1/ws", false),
        worker_url: target.socket("/v1/workers", false),
        token: target.token().map(str::to_owned),
        session: args.session.clone(),
        timeout: common.timeout,
        window: args.window,
        capacity: args.capacity,
        live: live.clone(),
        workers_connected: AtomicU64::new(0),
        run_start_us: AtomicU64::new(u64::MAX),
    });
    let (s, w) = (args.submitters, args.workers);
    let total = s + w;
    let mut conductor = Conductor::new(total);
    let progress = Progress::start(common.json, live.clone());
    progress.stage("connect", total as u64, Track::Connections);
    let quotas = quotas(args.count, s);
    // Workers first in the ramp, so that capacity is there when tasks arrive.
    let mut handles = Vec::with_capacity(total);
    for i in 0..w {
        let delay = ramp_delay(i, total, common.ramp_up);
        handles.push(tokio::spawn(worker_task(
            ctx.clone(),
            i,
            delay,
            conductor.cue(s + i),
        )));
    }
    for (i, quota) in quotas.iter().enumerate() {
        let delay = ramp_delay(w + i, total, common.ramp_up);
        handles.push(tokio::spawn(submitter_task(
            ctx.clone(),
            i,
            *quota,
            delay,
            conductor.cue(i),
        )));
    }
    let ready = conductor.ramp(ramp_limit(common)).await;
    if ctx.workers_connected.load(Ordering::Relaxed) == 0 {
        conductor.set(Phase::Close);
        let results = collect(handles, common.timeout).await;
        progress.finish();
        let workers: Vec<ConnResult> = results.into_iter().filter(|r| r.worker).collect();
        return Err(LoadError::NoWorkers {
            url: ctx.worker_url.to_string(),
            attempted: w,
            first: first_failure(&workers),
        });
    }
    let bound = args.duration.unwrap_or(DEFAULT_COUNT_CAP);
    let timeline = conductor
        .run(
            Plan {
                progress: &progress,
                live: &live,
                bound,
                done: Some(0..s),
                // Submitters are clients 0..s, workers s..s+w (see their cues above).
                essential: vec![0..s, s..total],
                run_track: Some((args.count, Track::Completed)),
                quiet: 0..s,
                drain: common.drain,
                drain_phase: false,
                run_start_us: &ctx.run_start_us,
                server_pid: common.pid,
            },
            ready,
        )
        .await;
    let results = gather(handles, close_limit(common), progress).await?;

    let mut report = Report::of_run("tasks", ctx.user_url.to_string(), timeline);
    report.param("workers", w);
    report.param("capacity", args.capacity);
    report.param("count", args.count);
    report.param("submitters", s);
    report.param("window", args.window);
    report.param("session", args.session.clone());
    report.param("workers_url", ctx.worker_url.to_string());

    let (mut ack, mut done) = (Latency::default(), Latency::default());
    let mut sum = ConnResult::default();
    for r in &results {
        ack.merge(&r.ack);
        done.merge(&r.done);
        report.errors.merge(&r.errors);
        sum.submitted += r.submitted;
        sum.acked += r.acked;
        sum.completed += r.completed;
        sum.failed += r.failed;
        sum.unfinished += r.unfinished;
        sum.assigned += r.assigned;
        sum.canceled += r.canceled;
        sum.heartbeats += r.heartbeats;
    }
    report.connections = connections(&results);
    report.count("submitted", sum.submitted, true);
    report.count("acked", sum.acked, false);
    report.count("completed", sum.completed, true);
    report.count("failed_or_canceled", sum.failed, false);
    report.count("unfinished_at_end", sum.unfinished, false);
    report.count("assigned_to_workers", sum.assigned, true);
    report.count("canceled_at_workers", sum.canceled, false);
    report.count("worker_heartbeats", sum.heartbeats, false);
    report.latencies.push(("submit_to_ack", ack.summary()));
    report
        .latencies
        .push(("submit_to_completed", done.summary()));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_split_evenly() {
        assert_eq!(quotas(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(quotas(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(quotas(8, 1), vec![8]);
        assert_eq!(quotas(1001, 4).iter().sum::<u64>(), 1001);
    }

    #[test]
    fn worker_frames_parse() {
        let assign = Frame::parse(
            r#"{"type":"assign","task":{"id":"t1","lease":"l1","kind":"load.noop","input":{},"session":"s","attempt":1,"deadline":"d"}}"#,
        )
        .unwrap();
        let task: Assignment<'_> = serde_json::from_str(assign.task.unwrap().get()).unwrap();
        assert_eq!((&*task.id, &*task.lease), ("t1", "l1"));
        let welcome = Frame::parse(r#"{"type":"welcome","worker":"w","heartbeat_s":5}"#).unwrap();
        assert_eq!(welcome.heartbeat_s, Some(5));
        let event = Frame::parse(
            r#"{"type":"event","session":"s","offset":3,"kind":"task.completed","data":{"task":"t1","kind":"load.noop","state":"completed","attempt":1,"output":{}}}"#,
        )
        .unwrap();
        let data: TaskEvent<'_> = serde_json::from_str(event.data.unwrap().get()).unwrap();
        assert_eq!(&*data.task, "t1");
    }

    /// A stand-in for the server's task path, as PROTOCOL.md describes it: user sockets get
    /// `ack` with a task id, workers get `assign` up to their capacity, and a `complete` becomes
    /// a `task.completed` event for every member of the session.
    mod mock {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};

        use futures_util::{SinkExt as _, StreamExt as _};
        use serde_json::{Value, json};
        use tokio::net::{TcpListener, TcpStream};
        use tokio::sync::{Mutex, broadcast, mpsc};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

        type Queue = Arc<Mutex<mpsc::UnboundedReceiver<String>>>;

        pub async fn serve(listener: TcpListener) {
            let (queue_tx, queue_rx) = mpsc::unbounded_channel::<String>();
            let queue: Queue = Arc::new(Mutex::new(queue_rx));
            let (events, _) = broadcast::channel::<String>(65_536);
            let ids = Arc::new(AtomicU64::new(0));
            while let Ok((stream, _)) = listener.accept().await {
                let (queue_tx, queue, events, ids) =
                    (queue_tx.clone(), queue.clone(), events.clone(), ids.clone());
                tokio::spawn(async move {
                    let _ = connection(stream, queue_tx, queue, events, ids).await;
                });
            }
        }

        async fn connection(
            stream: TcpStream,
            queue_tx: mpsc::UnboundedSender<String>,
            queue: Queue,
            events: broadcast::Sender<String>,
            ids: Arc<AtomicU64>,
        ) -> Option<()> {
            let mut path = String::new();
            // The signature is tungstenite's `Callback`, large error type and all.
            #[allow(clippy::result_large_err)]
            let callback = |req: &Request, resp: Response| {
                path = req.uri().path().to_owned();
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(stream, callback)
                .await
                .ok()?;
            let read = |m: Message| serde_json::from_str::<Value>(m.to_text().ok()?).ok();
            let send = |v: Value| Message::text(v.to_string());
            let hello = read(ws.next().await?.ok()?)?;
            if path == "/v1/workers" {
                let capacity = hello["capacity"].as_u64()?;
                ws.send(send(json!({"type":"welcome","worker":"w","heartbeat_s":1})))
                    .await
                    .ok()?;
                let mut held = 0;
                loop {
                    tokio::select! {
                        id = async { queue.lock().await.recv().await }, if held < capacity => {
                            held += 1;
                            let task = json!({"id": id?, "lease": "l", "kind": "load.noop",
                                              "input": {}, "session": "load-tasks", "attempt": 1});
                            ws.send(send(json!({"type": "assign", "task": task}))).await.ok()?;
                        }
                        frame = ws.next() => {
                            let frame = read(frame?.ok()?)?;
                            if frame["type"] == "complete" && frame["lease"] == "l" {
                                held -= 1;
                                let data = json!({"task": frame["task"], "kind": "load.noop",
                                                  "state": "completed", "attempt": 1, "output": {}});
                                let _ = events.send(json!({"type": "event", "session": "load-tasks",
                                    "kind": "task.completed", "data": data}).to_string());
                            }
                        }
                    }
                }
            }
            ws.send(send(json!({"type":"welcome","conn":"c"})))
                .await
                .ok()?;
            let join = read(ws.next().await?.ok()?)?;
            let mut subscription = events.subscribe();
            ws.send(send(
                json!({"type":"joined","ref":join["ref"],"session":join["session"],
                                "offset":0,"epoch":"e","members":[],"presence":[],"docs":[]}),
            ))
            .await
            .ok()?;
            loop {
                tokio::select! {
                    event = subscription.recv() => ws.send(Message::text(event.ok()?)).await.ok()?,
                    frame = ws.next() => {
                        let frame = read(frame?.ok()?)?;
                        if frame["type"] == "task.submit" {
                            let id = format!("t{}", ids.fetch_add(1, Ordering::Relaxed));
                            ws.send(send(json!({"type":"ack","ref":frame["ref"],"task":id}))).await.ok()?;
                            queue_tx.send(id).ok()?;
                        }
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn completes_every_task_against_a_mock_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(mock::serve(listener));
        let common = CommonArgs {
            url: Some(format!("ws://{addr}")),
            token: None,
            allow_remote: false,
            ramp_up: Duration::ZERO,
            json: true,
            timeout: Duration::from_secs(5),
            drain: Duration::from_secs(5),
            prefix: None,
            pid: None,
        };
        let args = TasksArgs {
            common,
            workers: 3,
            capacity: 2,
            count: 200,
            submitters: 2,
            window: 16,
            session: "load-tasks".into(),
            duration: Some(Duration::from_secs(30)),
        };
        let report = run(args).await.unwrap();
        server.abort();
        let json = report.to_json();
        assert_eq!(json["stopped_by"], "count", "{json}");
        assert_eq!(json["counts"]["completed"], 200, "{json}");
        assert_eq!(json["counts"]["assigned_to_workers"], 200, "{json}");
        assert_eq!(json["counts"]["unfinished_at_end"], 0, "{json}");
        assert_eq!(
            json["latency_ms"]["submit_to_completed"]["count"], 200,
            "{json}"
        );
        assert_eq!(json["errors"], json!({}), "{json}");
        assert_eq!(json["connections"]["opened"], 5, "{json}");
    }
}
