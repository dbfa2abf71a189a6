//! The `native` scenario: S sessions × C clients on `/v1/ws` sending chat (and, with `--edits`,
//! OT edits) at a fixed rate, then checking that every session's members agree.
//!
//! What it measures, and how:
//! - **ack latency**: send → the `ack` with the same `ref` (an ack means committed).
//! - **broadcast latency**: each chat's text is `{"t":<unix µs>,"c":"<client>"}`; the other
//!   members subtract `t` from their clock when the `event` frame arrives (same process, same
//!   clock: see `stats::now_us`). Edits carry `[<client>@<unix µs>]` as their inserted text and
//!   are timed the same way from the `doc` frames (`edit broadcast`).
//! - **deliveries/s**: `event` frames received by all clients during the measured phase.
//! - **convergence**: every client joins with `since: 0` (sessions are fresh per run), so all
//!   members see the whole log; each records (offset, hash of kind and data) per event. At the
//!   end every member must hold the same gap-free sequence up to the session's last acked
//!   offset. With edits, each client keeps a replica of document `load` (OT, one edit in flight,
//!   rebased locally exactly as the server does) that must equal the server's text read over
//!   REST.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::{Instant, Interval};
use tokio_tungstenite::tungstenite::Message;
use url::Url;

use super::conduct::{
    Cue, Phase, Senders, connections, outcome, run_senders, stage, tick, ticker_for,
};
use super::progress::Live;
use super::report::{Convergence, Report};
use super::stats::{Errors, Latency, fnv1a, now_us};
use super::target::Target;
use super::ws::{self, Failure, Frame, Socket};
use super::{CommonArgs, LoadError, measured_bound};
use crate::session::ot::{Component, Operation, transform};

/// The document every session's clients edit.
const DOC: &str = "load";

#[derive(Debug, Clone, Args)]
pub struct NativeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Sessions.
    #[arg(long, default_value_t = 10)]
    pub sessions: usize,
    /// Clients per session.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Messages per second per client (the server allows 100 per connection by default).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// The fraction of messages that are edits of document `load` (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub edits: f64,
    /// How long to send [default: 10s, or until --count is reached].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Messages per client; the run ends when every client has sent them and had its replies.
    #[arg(long)]
    pub count: Option<u64>,
    /// The most requests a client leaves unanswered; a send that would pass it is skipped
    /// (and counted), so a slow server cannot grow the client's memory.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Another node of the same cluster (repeatable). Client `c` of each session connects to
    /// the `c`-th of `--url` and these, in turn, so every session has clients on several nodes:
    /// whichever node owns it, the others relay, and broadcasts cross nodes.
    #[arg(long = "also-url")]
    pub also_urls: Vec<String>,
}

impl NativeArgs {
    fn validate(&self) -> Result<(), LoadError> {
        let bad = |msg: &str| Err(LoadError::InvalidArgs(msg.to_owned()));
        if self.sessions == 0 || self.clients == 0 {
            return bad("--sessions and --clients must be at least 1");
        }
        if self.sessions.saturating_mul(self.clients) > 100_000 {
            return bad("at most 100000 clients in all");
        }
        if !(self.rate > 0.0 && self.rate <= 10_000.0) {
            return bad("--rate must be above 0 and at most 10000 per second");
        }
        if !(0.0..=1.0).contains(&self.edits) {
            return bad("--edits is a fraction from 0 to 1");
        }
        if self.window == 0 || self.count == Some(0) {
            return bad("--window and --count must be at least 1");
        }
        Ok(())
    }
}

/// What the clients of one session share: the targets of the drain.
struct SessionShared {
    name: String,
    /// The highest event offset acked to any member.
    last_offset: AtomicU64,
    /// The highest version of `load` acked to any member.
    last_version: AtomicU64,
}

/// The run's settings, shared by every client.
struct Ctx {
    /// The nodes, `--url` first; client `c` of a session uses `urls[c % len]`.
    urls: Vec<Url>,
    token: Option<String>,
    timeout: Duration,
    period: Duration,
    edits: f64,
    window: usize,
    count: Option<u64>,
    live: Arc<Live>,
    /// When the measured phase began: older timestamps (a reused session) are not latencies.
    run_start_us: AtomicU64,
}

/// What one client measured and saw.
#[derive(Default)]
struct ClientResult {
    id: String,
    session: usize,
    connected: bool,
    ack: Latency,
    broadcast: Latency,
    edit_broadcast: Latency,
    errors: Errors,
    chats: u64,
    edits: u64,
    acked: u64,
    delivered: u64,
    skipped: u64,
    edit_retries: u64,
    /// Edits the server committed after others sent on the same base (rebased here too).
    edits_rebased: u64,
    /// (offset, hash of kind and data) of every event, in arrival order.
    events: Vec<(u64, u64)>,
    /// Lost the connection (or was refused) before the end.
    dropped: Option<String>,
    /// The replica of `load`: version and text hash, or why it broke.
    doc: Option<Result<(u64, u64), String>>,
}

outcome!(ClientResult);

/// A request awaiting its reply.
struct Sent {
    at: Instant,
    edit: bool,
}

/// The client's copy of document `load`: the server's snapshot at join, then every `doc` frame
/// and the client's own acked edits, rebased locally exactly as the server rebases them. At the
/// end it must equal the server's text.
struct Replica {
    version: u64,
    text: Vec<u16>,
    /// The one edit in flight.
    edit: Option<PendingEdit>,
    /// Why the replica cannot be trusted any more (a gap, an op that does not apply).
    broken: Option<String>,
}

/// An edit in flight: its op as written against the version it was sent on, and the versions
/// that arrived since (the server ordered them before it).
struct PendingEdit {
    reference: u64,
    op: Operation,
    history: Vec<Operation>,
}

impl Replica {
    fn new(version: u64, text: &str) -> Self {
        Self {
            version,
            text: text.encode_utf16().collect(),
            edit: None,
            broken: None,
        }
    }

    /// The replica from a `joined` frame's snapshot; a document never edited is version 0.
    fn from_joined(text: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Joined {
            #[serde(default)]
            docs: Vec<DocState>,
        }
        let joined: Joined = serde_json::from_str(text).ok()?;
        Some(match joined.docs.into_iter().find(|d| d.name == DOC) {
            Some(d) => Self::new(d.version, &d.text),
            None => Self::new(0, ""),
        })
    }

    fn fail(&mut self, why: String) {
        if self.broken.is_none() {
            self.broken = Some(why);
        }
    }

    fn apply(&mut self, op: &Operation, version: u64, whose: &str) -> bool {
        if self.version + 1 != version {
            self.fail(format!(
                "{whose} version {version} arrived while the replica is at {}",
                self.version
            ));
            return false;
        }
        match op.apply(&self.text) {
            Ok(text) => {
                self.text = text;
                self.version = version;
                true
            }
            Err(err) => {
                self.fail(format!("{whose} version {version} does not apply: {err}"));
                false
            }
        }
    }

    /// Another client's change, from a `doc` frame.
    fn remote(&mut self, version: u64, op: Operation) {
        if self.broken.is_none()
            && self.apply(&op, version, "a")
            && let Some(edit) = self.edit.as_mut()
        {
            edit.history.push(op);
        }
    }

    /// Starts an edit against the current version, if none is in flight; returns its base.
    fn begin(&mut self, reference: u64, op: Operation) -> Option<u64> {
        if self.edit.is_some() || self.broken.is_some() {
            return None;
        }
        self.edit = Some(PendingEdit {
            reference,
            op,
            history: Vec::new(),
        });
        Some(self.version)
    }

    /// Our edit committed as `version`: rebase it over the versions the server put before it
    /// (history first on ties, as the server does) and apply it. True if it needed rebasing.
    fn acked(&mut self, reference: u64, version: u64) -> bool {
        let Some(edit) = self.edit.take_if(|e| e.reference == reference) else {
            return false;
        };
        let rebased = !edit.history.is_empty();
        let mut op = edit.op;
        for earlier in &edit.history {
            op = transform(earlier, &op).1;
        }
        if self.broken.is_none() {
            self.apply(&op, version, "our own");
        }
        rebased
    }

    /// The server refused request `reference`; true if it was our edit (the next one goes
    /// against the latest version seen).
    fn refused(&mut self, reference: u64) -> bool {
        self.edit.take_if(|e| e.reference == reference).is_some()
    }

    fn outcome(&self) -> Result<(u64, u64), String> {
        match &self.broken {
            Some(why) => Err(why.clone()),
            None => Ok((self.version, utf16_hash(&self.text))),
        }
    }
}

struct Client {
    id: String,
    ws: Socket,
    session: Arc<SessionShared>,
    ctx: Arc<Ctx>,
    cue: Cue,
    out: ClientResult,
    pending: HashMap<u64, Sent>,
    next_ref: u64,
    replica: Option<Replica>,
}

#[derive(Deserialize)]
struct ChatData<'a> {
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct Stamp<'a> {
    t: u64,
    #[serde(borrow)]
    c: std::borrow::Cow<'a, str>,
}

#[derive(Deserialize)]
struct DocState {
    name: String,
    version: u64,
    text: String,
}

/// Finds `[client@micros]` markers in inserted text.
fn edit_markers(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.split('[').filter_map(|part| {
        let (inner, _) = part.split_once(']')?;
        let (client, t) = inner.rsplit_once('@')?;
        Some((client, t.parse().ok()?))
    })
}

fn utf16_hash(text: &[u16]) -> u64 {
    fnv1a(&[String::from_utf16_lossy(text).as_bytes()])
}

impl Client {
    fn count_done(&self) -> bool {
        self.ctx
            .count
            .is_some_and(|count| self.out.chats + self.out.edits >= count)
    }

    fn error(&mut self, failure: Failure) {
        Live::bump(&self.ctx.live.errors);
        self.out
            .errors
            .add_detail(&failure.code, || format!("{}: {}", self.id, failure.detail));
    }

    fn on_text(&mut self, text: &str) {
        let frame = match Frame::parse(text) {
            Ok(frame) => frame,
            Err(failure) => return self.error(failure),
        };
        match &*frame.frame {
            "event" => self.on_event(&frame),
            "ack" => self.on_ack(&frame),
            "doc" => self.on_doc(&frame),
            "error" => self.on_error(&frame),
            "reset" => {
                // The server replaced our history: compare only what follows.
                self.out.events.clear();
                self.error(Failure::new("reset", "the server sent reset"));
            }
            // After a reset the server sends a fresh `joined`: its snapshot is the replica.
            "joined" => self.replica = Replica::from_joined(text),
            _ => {}
        }
    }

    fn on_event(&mut self, frame: &Frame<'_>) {
        let Some(offset) = frame.offset else {
            return self.error(Failure::new("bad_frame", "event without offset"));
        };
        let kind = frame.kind.as_deref().unwrap_or("");
        let data = frame.data.map_or("", RawValue::get);
        self.out
            .events
            .push((offset, fnv1a(&[kind.as_bytes(), data.as_bytes()])));
        if self.cue.phase() == Phase::Run {
            self.out.delivered += 1;
            Live::bump(&self.ctx.live.delivered);
        }
        if kind == "chat"
            && let Ok(chat) = serde_json::from_str::<ChatData<'_>>(data)
            && let Ok(stamp) = serde_json::from_str::<Stamp<'_>>(&chat.text)
            && stamp.c != self.id
            && stamp.t >= self.ctx.run_start_us.load(Ordering::Relaxed)
        {
            self.out
                .broadcast
                .record_us(now_us().saturating_sub(stamp.t));
        }
    }

    fn on_ack(&mut self, frame: &Frame<'_>) {
        let Some(reference) = frame.ref_number() else {
            return;
        };
        let Some(sent) = self.pending.remove(&reference) else {
            return;
        };
        self.out.ack.record(sent.at.elapsed());
        self.out.acked += 1;
        Live::bump(&self.ctx.live.acked);
        if let Some(offset) = frame.offset {
            self.session
                .last_offset
                .fetch_max(offset, Ordering::Relaxed);
        }
        if sent.edit
            && let Some(version) = frame.version
        {
            self.session
                .last_version
                .fetch_max(version, Ordering::Relaxed);
            if self
                .replica
                .as_mut()
                .is_some_and(|r| r.acked(reference, version))
            {
                self.out.edits_rebased += 1;
            }
        }
    }

    fn on_doc(&mut self, frame: &Frame<'_>) {
        if frame.doc.as_deref() != Some(DOC) {
            return;
        }
        let (Some(version), Some(ops)) = (frame.version, frame.ops) else {
            return self.error(Failure::new(
                "bad_frame",
                "doc frame without version or ops",
            ));
        };
        let components: Vec<Component> = match serde_json::from_str(ops.get()) {
            Ok(c) => c,
            Err(err) => return self.error(Failure::new("bad_frame", format!("doc ops: {err}"))),
        };
        let now = now_us();
        let since = self.ctx.run_start_us.load(Ordering::Relaxed);
        for component in &components {
            if let Component::Insert(text) = component {
                for (client, t) in edit_markers(text) {
                    if client != self.id && t >= since {
                        self.out.edit_broadcast.record_us(now.saturating_sub(t));
                    }
                }
            }
        }
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        match Operation::normalize(components) {
            Ok(op) => replica.remote(version, op),
            Err(err) => replica.fail(format!("version {version}: {err}")),
        }
    }

    fn on_error(&mut self, frame: &Frame<'_>) {
        let failure = frame.failure();
        if let Some(reference) = frame.ref_number() {
            self.pending.remove(&reference);
            if self.replica.as_mut().is_some_and(|r| r.refused(reference)) {
                self.out.edit_retries += 1;
            }
        }
        self.error(failure);
    }

    /// One tick of the send rate: a chat, or (with `--edits`) an edit when none is in flight.
    async fn send_one(&mut self) -> Result<(), Failure> {
        if self.pending.len() >= self.ctx.window {
            self.out.skipped += 1;
            return Ok(());
        }
        let reference = self.next_ref;
        self.next_ref += 1;
        let t = now_us();
        let want_edit = self.ctx.edits > 0.0 && rand::random::<f64>() < self.ctx.edits;
        let marker = format!("[{}@{t}]", self.id);
        let base = match (
            &mut self.replica,
            Operation::normalize(vec![Component::Insert(marker.clone())]),
        ) {
            (Some(replica), Ok(op)) if want_edit => replica.begin(reference, op),
            _ => None,
        };
        let frame = match base {
            Some(base) => {
                self.out.edits += 1;
                json!({"type": "edit", "ref": reference.to_string(), "session": self.session.name,
                       "doc": DOC, "base": base, "ops": [{"insert": marker}]})
            }
            None => {
                self.out.chats += 1;
                let text = json!({"t": t, "c": self.id}).to_string();
                json!({"type": "chat", "ref": reference.to_string(),
                       "session": self.session.name, "text": text})
            }
        };
        let edit = base.is_some();
        self.pending.insert(
            reference,
            Sent {
                at: Instant::now(),
                edit,
            },
        );
        Live::bump(&self.ctx.live.sent);
        ws::send(&mut self.ws, frame.to_string()).await
    }

    fn drained(&self) -> bool {
        let last_seen = self.out.events.last().map_or(0, |e| e.0);
        let events_done = last_seen >= self.session.last_offset.load(Ordering::Relaxed);
        let doc_done = self.ctx.edits == 0.0
            || self.replica.as_ref().is_none_or(|r| {
                r.broken.is_some() || r.version >= self.session.last_version.load(Ordering::Relaxed)
            });
        events_done && doc_done
    }

    async fn drive(mut self) -> ClientResult {
        let mut ticker: Option<Interval> = None;
        loop {
            let phase = self.cue.phase();
            if phase == Phase::Run && ticker.is_none() {
                ticker = Some(ticker_for(self.ctx.period));
            }
            if (phase >= Phase::Stop || self.count_done()) && self.pending.is_empty() {
                self.cue.reach(stage::QUIET);
            }
            if phase == Phase::Drain && self.cue.reached(stage::QUIET) && self.drained() {
                self.cue.reach(stage::DRAINED);
            }
            if phase == Phase::Close {
                break;
            }
            let sending = phase == Phase::Run && !self.count_done();
            tokio::select! {
                _ = self.cue.changed() => {}
                message = self.ws.next() => match message {
                    Some(Ok(Message::Text(text))) => self.on_text(&text),
                    Some(Ok(Message::Close(close))) => {
                        self.out.dropped = Some(format!("closed by the server: {close:?}"));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        self.out.dropped = Some(err.to_string());
                        break;
                    }
                    None => {
                        self.out.dropped = Some("the stream ended".into());
                        break;
                    }
                },
                _ = tick(&mut ticker), if sending => {
                    if let Err(failure) = self.send_one().await {
                        self.out.dropped = Some(failure.detail.clone());
                        self.error(failure);
                        break;
                    }
                }
            }
        }
        if let Some(why) = self.out.dropped.clone() {
            self.error(Failure::new("closed", why));
        }
        for _ in 0..self.pending.len() {
            self.out.errors.add("no_reply");
        }
        ws::close(&mut self.ws).await;
        self.out.doc = self.replica.as_ref().map(Replica::outcome);
        self.out
    }
}

async fn client_task(
    ctx: Arc<Ctx>,
    session: Arc<SessionShared>,
    session_index: usize,
    client_index: usize,
    id: String,
    delay: Duration,
    mut cue: Cue,
) -> ClientResult {
    let mut out = ClientResult {
        id: id.clone(),
        session: session_index,
        ..ClientResult::default()
    };
    if !cue.ramp_sleep(delay).await {
        return out;
    }
    let joined = ws::join_session(
        &ctx.urls[client_index % ctx.urls.len()],
        ctx.token.as_deref(),
        &id,
        &session.name,
        Some(0),
        ctx.timeout,
    )
    .await;
    let (ws, joined) = match joined {
        Ok(ok) => ok,
        Err(failure) => {
            Live::bump(&ctx.live.failed);
            out.errors
                .add_detail(&failure.code, || format!("{id}: {}", failure.detail));
            out.dropped = Some(failure.detail);
            return out;
        }
    };
    out.connected = true;
    Live::bump(&ctx.live.connected);
    cue.reach(stage::READY);
    let replica = Replica::from_joined(&joined);
    Client {
        id,
        ws,
        session,
        ctx,
        cue,
        out,
        pending: HashMap::new(),
        next_ref: 1,
        replica,
    }
    .drive()
    .await
}

/// Checks one session's event logs: every member must hold the same gap-free sequence from
/// the latest first offset any member saw up to `target` (the last acked offset). Returns the
/// disagreements (empty: converged) and the number of offsets compared.
fn check_event_logs(
    session: &str,
    target: u64,
    logs: &[(&str, &[(u64, u64)])],
) -> (Vec<String>, u64) {
    let mut failures = Vec::new();
    if target == 0 || logs.is_empty() {
        return (failures, 0);
    }
    let lo = logs
        .iter()
        .map(|(_, events)| events.first().map_or(u64::MAX, |e| e.0))
        .max()
        .unwrap_or(u64::MAX);
    if lo > target {
        failures.push(format!(
            "{session}: some member saw none of the events up to offset {target}"
        ));
        return (failures, 0);
    }
    let want = target - lo + 1;
    let mut reference: Option<(&str, Vec<u64>)> = None;
    for (client, events) in logs {
        let window: Vec<&(u64, u64)> = events
            .iter()
            .filter(|(offset, _)| (lo..=target).contains(offset))
            .collect();
        let gap = window
            .iter()
            .enumerate()
            .find(|(i, (offset, _))| *offset != lo + *i as u64)
            .map(|(i, _)| lo + i as u64);
        if window.len() as u64 != want || gap.is_some() {
            let missing = gap.unwrap_or(lo + window.len() as u64);
            failures.push(format!(
                "{session}: {client} holds {} of offsets {lo}..={target}, first missing or out of order: {missing}",
                window.len()
            ));
            continue;
        }
        let hashes: Vec<u64> = window.iter().map(|e| e.1).collect();
        match &reference {
            None => reference = Some((client, hashes)),
            Some((first, expected)) => {
                if let Some(i) = (0..hashes.len()).find(|&i| hashes[i] != expected[i]) {
                    failures.push(format!(
                        "{session}: {client} and {first} saw different events at offset {}",
                        lo + i as u64
                    ));
                }
            }
        }
    }
    (failures, want)
}

pub async fn run(args: NativeArgs) -> Result<Report, LoadError> {
    args.validate()?;
    let common = &args.common;
    let raw_url = common.url.as_deref().unwrap_or("ws://127.0.0.1:8080");
    let target = Target::resolve(raw_url, common.token.clone(), common.allow_remote).await?;
    let prefix = common.prefix();
    let total = args.sessions * args.clients;
    let live = Arc::new(Live::default());
    let mut urls = vec![target.socket("/v1/ws", false)];
    for also in &args.also_urls {
        let node = Target::resolve(also, common.token.clone(), common.allow_remote).await?;
        urls.push(node.socket("/v1/ws", false));
    }
    let ctx = Arc::new(Ctx {
        urls,
        token: target.token().map(str::to_owned),
        timeout: common.timeout,
        period: Duration::from_secs_f64(1.0 / args.rate),
        edits: args.edits,
        window: args.window,
        count: args.count,
        live: live.clone(),
        run_start_us: AtomicU64::new(u64::MAX),
    });
    let shared: Vec<Arc<SessionShared>> = (0..args.sessions)
        .map(|s| {
            Arc::new(SessionShared {
                name: format!("{prefix}-{s}"),
                last_offset: AtomicU64::new(0),
                last_version: AtomicU64::new(0),
            })
        })
        .collect();

    let senders = Senders {
        common,
        live: &live,
        total,
        duration: args.duration,
        count: args.count,
        run_start_us: &ctx.run_start_us,
    };
    // Interleaved, so that a ramp fills every session at the same pace.
    let (timeline, results) = run_senders(senders, |i, delay, cue| {
        let (s, c) = (i % args.sessions, i / args.sessions);
        let session = shared[s].clone();
        tokio::spawn(client_task(
            ctx.clone(),
            session,
            s,
            c,
            format!("s{s}c{c}"),
            delay,
            cue,
        ))
    })
    .await?;

    let mut report = Report::of_run("native", ctx.urls[0].to_string(), timeline);
    if !args.also_urls.is_empty() {
        let nodes: Vec<String> = ctx.urls.iter().map(Url::to_string).collect();
        report.param("nodes", nodes.join(" "));
    }
    report.param("sessions", args.sessions);
    report.param("clients", args.clients);
    report.param("rate", args.rate);
    report.param("edits", args.edits);
    report.param("window", args.window);
    report.param(
        "ramp_up",
        humantime::format_duration(common.ramp_up).to_string(),
    );
    if let Some(count) = args.count {
        report.param("count", count);
    } else {
        let bound = measured_bound(args.duration, args.count);
        report.param("duration", humantime::format_duration(bound).to_string());
    }
    report.param("prefix", prefix);
    fill_report(&mut report, &args, &results);
    report.convergence = Some(converge(&target, &args, &shared, &results).await?);
    Ok(report)
}

fn fill_report(report: &mut Report, args: &NativeArgs, results: &[ClientResult]) {
    let (mut ack, mut broadcast, mut edit_broadcast) =
        (Latency::default(), Latency::default(), Latency::default());
    let mut sum = ClientResult::default();
    for r in results {
        ack.merge(&r.ack);
        broadcast.merge(&r.broadcast);
        edit_broadcast.merge(&r.edit_broadcast);
        report.errors.merge(&r.errors);
        sum.chats += r.chats;
        sum.edits += r.edits;
        sum.acked += r.acked;
        sum.delivered += r.delivered;
        sum.skipped += r.skipped;
        sum.edit_retries += r.edit_retries;
        sum.edits_rebased += r.edits_rebased;
    }
    report.connections = connections(results);
    report.count("sent", sum.chats + sum.edits, true);
    report.count("chats_sent", sum.chats, false);
    if args.edits > 0.0 {
        report.count("edits_sent", sum.edits, false);
        report.count("edits_rebased", sum.edits_rebased, false);
        report.count("edits_refused", sum.edit_retries, false);
    }
    report.count("acked", sum.acked, true);
    report.count("delivered", sum.delivered, true);
    report.count("skipped_window_full", sum.skipped, false);
    report.note_shortfall(args.rate, sum.skipped);
    report.latencies.push(("ack", ack.summary()));
    report.latencies.push(("broadcast", broadcast.summary()));
    if args.edits > 0.0 {
        report
            .latencies
            .push(("edit_broadcast", edit_broadcast.summary()));
    }
}

/// Compares what the members of each session saw, and with edits, their replicas with the
/// server's text.
async fn converge(
    target: &Target,
    args: &NativeArgs,
    shared: &[Arc<SessionShared>],
    results: &[ClientResult],
) -> Result<Convergence, LoadError> {
    let http = reqwest::Client::builder()
        .timeout(args.common.timeout)
        .build()?;
    let mut failures = Vec::new();
    let (mut clients, mut events) = (0usize, 0u64);
    for (s, session) in shared.iter().enumerate() {
        let members: Vec<&ClientResult> = results
            .iter()
            .filter(|r| r.session == s && r.connected)
            .collect();
        clients += members.len();
        for m in members.iter().filter(|m| m.dropped.is_some()) {
            failures.push(format!(
                "{}: {} was disconnected before the end",
                session.name, m.id
            ));
        }
        let logs: Vec<(&str, &[(u64, u64)])> = members
            .iter()
            .filter(|m| m.dropped.is_none())
            .map(|m| (m.id.as_str(), m.events.as_slice()))
            .collect();
        let (mut found, compared) = check_event_logs(
            &session.name,
            session.last_offset.load(Ordering::Relaxed),
            &logs,
        );
        failures.append(&mut found);
        events += compared;
        if args.edits > 0.0 && !members.is_empty() {
            failures.extend(check_doc(&http, target, session, &members).await);
        }
    }
    let shown = failures.len().min(10);
    let more = failures.len() - shown;
    let passed = failures.is_empty();
    failures.truncate(shown);
    if more > 0 {
        failures.push(format!("… and {more} more"));
    }
    let docs = if args.edits > 0.0 {
        ", and each document's replicas against REST"
    } else {
        ""
    };
    Ok(Convergence {
        passed,
        checked: format!(
            "{} sessions, {clients} clients: the same event sequences ({events} offsets){docs}",
            shared.len()
        ),
        failures,
    })
}

async fn check_doc(
    http: &reqwest::Client,
    target: &Target,
    session: &SessionShared,
    members: &[&ClientResult],
) -> Vec<String> {
    let url = target.http(&format!("/v1/sessions/{}/docs/{DOC}", session.name));
    let mut request = http.get(url);
    if let Some(token) = target.token() {
        request = request.bearer_auth(token);
    }
    let doc: DocState = match request.send().await.and_then(|r| r.error_for_status()) {
        Ok(response) => match response.json().await {
            Ok(doc) => doc,
            Err(err) => return vec![format!("{}: reading the document: {err}", session.name)],
        },
        Err(err) => return vec![format!("{}: reading the document: {err}", session.name)],
    };
    let expected = fnv1a(&[doc.text.as_bytes()]);
    let mut failures = Vec::new();
    for m in members.iter().filter(|m| m.dropped.is_none()) {
        match &m.doc {
            Some(Ok((version, hash))) if *version == doc.version && *hash == expected => {}
            Some(Ok((version, _))) => failures.push(format!(
                "{}: {}'s replica (version {version}) differs from the server's (version {})",
                session.name, m.id, doc.version
            )),
            Some(Err(why)) => {
                failures.push(format!("{}: {}'s replica broke: {why}", session.name, m.id))
            }
            None => failures.push(format!("{}: {} has no replica", session.name, m.id)),
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_logs_converge_from_the_latest_first_offset() {
        let a: Vec<(u64, u64)> = (1..=10).map(|o| (o, o * 7)).collect();
        let b: Vec<(u64, u64)> = (4..=12).map(|o| (o, o * 7)).collect();
        let (failures, compared) = check_event_logs("s", 10, &[("a", &a), ("b", &b)]);
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(compared, 7);
    }

    #[test]
    fn gaps_short_logs_and_different_events_fail() {
        let a: Vec<(u64, u64)> = (1..=10).map(|o| (o, o)).collect();
        let mut gap = a.clone();
        gap.remove(4);
        let short: Vec<(u64, u64)> = (1..=8).map(|o| (o, o)).collect();
        let mut other = a.clone();
        other[6].1 = 99;
        let (failures, _) = check_event_logs(
            "s",
            10,
            &[
                ("a", &a),
                ("gap", &gap),
                ("short", &short),
                ("other", &other),
            ],
        );
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(failures[0].contains("gap") && failures[0].contains(": 5"));
        assert!(failures[1].contains("short") && failures[1].contains(": 9"));
        assert!(failures[2].contains("other") && failures[2].contains("offset 7"));
    }

    #[test]
    fn nothing_acked_is_nothing_to_compare() {
        let (failures, compared) = check_event_logs("s", 0, &[("a", &[])]);
        assert!(failures.is_empty());
        assert_eq!(compared, 0);
        let (failures, _) = check_event_logs("s", 3, &[("a", &[(1, 1)]), ("b", &[])]);
        assert_eq!(failures.len(), 1);
    }

    #[test]
    fn markers_and_stamps_parse() {
        let found: Vec<_> = edit_markers("[s1c2@17][s0c0@5]junk[x]").collect();
        assert_eq!(found, vec![("s1c2", 17), ("s0c0", 5)]);
        let chat: ChatData<'_> =
            serde_json::from_str(r#"{"text":"{\"t\":12,\"c\":\"s0c1\"}"}"#).unwrap();
        let stamp: Stamp<'_> = serde_json::from_str(&chat.text).unwrap();
        assert_eq!((stamp.t, &*stamp.c), (12, "s0c1"));
    }

    #[test]
    fn replica_starts_from_the_joined_snapshot() {
        let r = Replica::from_joined(
            r#"{"type":"joined","docs":[{"name":"main","version":3,"text":"x"},{"name":"load","version":7,"text":"hé"}]}"#,
        )
        .unwrap();
        assert_eq!((r.version, r.text.len()), (7, 2));
        let empty = Replica::from_joined(r#"{"type":"joined","docs":[]}"#).unwrap();
        assert_eq!(empty.version, 0);
        assert!(Replica::from_joined("garbage").is_none());
    }

    fn ins(s: &str) -> Operation {
        Operation::normalize(vec![Component::Insert(s.into())]).unwrap()
    }

    /// Two clients insert at 0 on version 1; the server orders A's first (version 2) and
    /// rebases B's over it (version 3, history first on ties). B's replica, which receives A's
    /// doc frame and then its own ack, must read what the server holds.
    #[test]
    fn own_edit_is_rebased_over_earlier_versions() {
        let mut b = Replica::new(1, "x");
        assert_eq!(b.begin(9, ins("[B]")), Some(1));
        assert_eq!(b.begin(10, ins("[B2]")), None, "one edit in flight");
        b.remote(2, ins("[A]"));
        assert!(b.acked(9, 3), "rebased over A");
        let server = transform(&ins("[A]"), &ins("[B]"))
            .1
            .apply(
                &ins("[A]")
                    .apply(&"x".encode_utf16().collect::<Vec<_>>())
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(b.outcome(), Ok((3, utf16_hash(&server))));
        assert_eq!(String::from_utf16_lossy(&b.text), "[A][B]x");
        // A refused edit frees the slot.
        assert_eq!(b.begin(11, ins("[C]")), Some(3));
        assert!(b.refused(11));
        assert!(!b.refused(11));
    }

    #[test]
    fn a_gap_breaks_the_replica() {
        let mut r = Replica::new(0, "");
        r.remote(2, ins("a"));
        assert!(r.outcome().is_err());
        let mut r = Replica::new(0, "");
        assert_eq!(r.begin(1, ins("a")), Some(0));
        assert!(!r.acked(1, 2));
        assert!(r.outcome().unwrap_err().contains("our own version 2"));
    }
}
