//! The `yjs` scenario: S documents × C clients speaking the y-websocket protocol, each holding a
//! `yrs` document, against any y-websocket server.
//!
//! Each client connects to `{url}/{room}` with room `<session>/<doc>`, exactly as y-websocket's
//! `WebsocketProvider(url, room, doc)` does, so the same run works against Conclave
//! (`ws://HOST/v1/yjs`) and a stock y-websocket server (`ws://HOST:1234`). Framing (varint
//! message type 0 sync with step 1 / step 2 / update, 1 awareness) is `crate::protocol::yjs`,
//! which is `yrs::sync`'s encoding. With `--framing hocuspocus` every message is addressed to
//! the room as Hocuspocus 4 expects, after an auth message ([`framing`](super::framing)).
//!
//! Each send inserts a marker `<client:unix µs>` into the `Y.Text` named `content` and sends the
//! update. Every marker from another client that a received update carries is one delivery,
//! timed from the stamp it carries (same process, same clock: `stats::now_us`). Where it goes is
//! `--typing`:
//! - `runs` (the default): each client types on at the end of its own run of text, as people
//!   write their own paragraphs. Its markers follow each other, so yrs keeps a client's run as
//!   one item and a document holds about one item per client.
//! - `interleaved`: each client appends at the very end of the shared text, after whatever came
//!   last, so every marker is an item of its own: the worst case for a CRDT's item count, and
//!   for any server that walks the text per update.
//!
//! Either way a marker goes in whole after a marker or at the start, so no insert splits one.
//! yrs has no fast way to the end of a text: an insert at an offset walks the text from its
//! start, one step per item, so a client that appended with `Text::push` spent most of its time
//! walking (78% of the load generator's samples with interleaved typing at R = 100, where every
//! marker is an item). So neither typing walks:
//! - A `runs` client writes into a document of its own markers only (appending there finds the
//!   end at once) and applies the same update to its copy of the shared document.
//! - An `interleaved` client writes the update itself ([`append_after`]): one string item whose
//!   origin is whatever came last, as this client saw it: the newest marker (by stamp) of
//!   another client that an update brought since its own last send, or else its own last
//!   marker. Concurrent appends after the same item are ordered by the CRDT as any are. Every
//!   client's Yjs client id is the run's base plus its index, so a marker names the item that
//!   holds it. The report's `adjacent_from_other_clients_pct` (markers next to one of another
//!   client in the final text) shows the typing did interleave: near 100 here, near 0 for
//!   `runs`.
//!
//! A receiver finds the markers in the update's bytes, where Yjs's v1 encoding keeps inserted
//! strings as plain UTF-8, rather than by observing its text: a text observer's delta walks the
//! whole text for every update applied, and in a run of thousands of inserts that walk was most
//! of the load generator's time, more than any server's (README, "Where the Yjs time goes").
//! A marker that arrives twice (in a sync step 2 and an update) counts once: each client's stamps
//! strictly increase, and a sender's updates reach a receiver in order. The document is still
//! applied, and at the end every client of a document must hold every marker sent to it and the
//! same text.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use tokio::time::{Instant, Interval};
use tokio_tungstenite::tungstenite::Message;
use url::Url;
use yrs::block::{BLOCK_ITEM_STRING_REF_NUMBER, HAS_ORIGIN};
use yrs::encoding::write::Write as _;
use yrs::sync::SyncMessage;
use yrs::updates::decoder::Decode as _;
use yrs::updates::encoder::{Encoder as _, EncoderV1};
use yrs::{ClientID, Doc, GetString as _, ID, OffsetKind, Options, ReadTxn as _};
use yrs::{Text as _, TextRef, Transact as _, Update};

use super::conduct::{
    Cue, Phase, Senders, connections, outcome, run_senders, stage, tick, ticker_for,
};
use super::framing::{Codec, Framing, Incoming};
use super::progress::Live;
use super::report::{Convergence, Report};
use super::stats::{Errors, Latency, fnv1a, now_us};
use super::target::Target;
use super::ws::{self, Failure, Socket};
use super::{CommonArgs, LoadError, measured_bound};

#[derive(Debug, Clone, Args)]
pub struct YjsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Documents: rooms `<prefix>-<i>/<doc>`.
    #[arg(long, default_value_t = 10)]
    pub sessions: usize,
    /// Clients per document.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Updates per second per client.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// The document part of each room name.
    #[arg(long, default_value = "load")]
    pub doc: String,
    /// How long to send [default: 10s, or until --count is reached].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Updates per client.
    #[arg(long)]
    pub count: Option<u64>,
    /// The server's envelope: y-websocket (Conclave, the y-websocket server) or hocuspocus
    /// (Hocuspocus 4, whose messages carry the document name).
    #[arg(long, value_enum, default_value_t = Framing::YWebsocket)]
    pub framing: Framing,
    /// Where each client inserts: at the end of its own run of text, or at the end of the
    /// shared text (every marker then an item of its own).
    #[arg(long, value_enum, default_value_t = Typing::Runs)]
    pub typing: Typing,
}

/// Where a client inserts its markers (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Typing {
    /// At the end of the client's own run of text.
    Runs,
    /// At the end of the shared text.
    Interleaved,
}

impl YjsArgs {
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
        if self.count == Some(0) {
            return bad("--count must be at least 1");
        }
        if self.doc.is_empty() || self.doc.contains(['/', '?', '#']) {
            return bad("--doc must be a plain name");
        }
        Ok(())
    }
}

/// What the clients of one document share.
struct DocShared {
    room: String,
    /// Markers sent by all its clients: the drain's target.
    sent: AtomicU64,
}

struct Ctx {
    target: Target,
    framing: Framing,
    typing: Typing,
    /// Client `i`'s Yjs client id is this plus `i`: random per run, and far below 2^53.
    client_ids: u64,
    /// Documents, and clients per document.
    documents: usize,
    clients: usize,
    timeout: Duration,
    period: Duration,
    count: Option<u64>,
    live: Arc<Live>,
    run_start_us: AtomicU64,
}

#[derive(Default)]
struct ClientResult {
    index: u32,
    doc: usize,
    connected: bool,
    broadcast: Latency,
    errors: Errors,
    sent: u64,
    /// Other clients' markers seen (any phase after the run began).
    seen: u64,
    /// … of which during the measured phase.
    delivered: u64,
    updates_received: u64,
    dropped: Option<String>,
    /// Hash and UTF-8 length of the final text.
    text: Option<(u64, usize)>,
    /// In the final text: adjacent markers, and those of them by different clients.
    adjacency: (u64, u64),
}

/// `(pairs of adjacent markers, pairs whose clients differ)` in `text`.
fn adjacency(text: &str) -> (u64, u64) {
    let clients: Vec<u32> = markers(text.as_bytes()).map(|(client, _)| client).collect();
    let pairs = clients.windows(2);
    let mixed = pairs.clone().filter(|pair| pair[0] != pair[1]).count();
    (pairs.len() as u64, mixed as u64)
}

outcome!(ClientResult);

/// Finds `<client:micros>` markers in inserted text, or in an encoded update, which holds its
/// strings as UTF-8. Anything that does not read as a marker is skipped.
pub fn markers(bytes: &[u8]) -> impl Iterator<Item = (u32, u64)> + '_ {
    /// Decimal digits whose value fits a `T`.
    fn number<T: TryFrom<u64>>(digits: &[u8]) -> Option<T> {
        if digits.is_empty() {
            return None;
        }
        let mut n = 0u64;
        for digit in digits {
            if !digit.is_ascii_digit() {
                return None;
            }
            n = n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
        }
        T::try_from(n).ok()
    }
    bytes.split(|b| *b == b'<').skip(1).filter_map(|part| {
        let end = part.iter().position(|b| *b == b'>')?;
        let inner = &part[..end];
        let colon = inner.iter().position(|b| *b == b':')?;
        Some((number(&inner[..colon])?, number(&inner[colon + 1..])?))
    })
}

/// An update the client could not decode or apply.
fn bad_update(err: impl std::fmt::Display) -> Failure {
    Failure::new("bad_update", err.to_string())
}

/// Where run client `i` sits: document `i % documents`, as that document's `i / documents`th
/// client. Clients are spread over the documents in turn, so a ramp-up fills them evenly.
fn seat(client: usize, documents: usize) -> (usize, usize) {
    let documents = documents.max(1);
    (client % documents, client / documents)
}

/// The newest stamp seen from each client of one document, so a marker that arrives twice
/// counts once. Indexed by client: it is looked up for every marker received, hundreds of
/// thousands a second, where a hashed map's lookups were ~4% of the load generator's time.
struct Ledger {
    /// For [`seat`].
    documents: usize,
    doc: usize,
    newest: Vec<u64>,
}

impl Ledger {
    /// A ledger for document `doc` of `documents`, with `clients` clients each.
    fn new(doc: usize, documents: usize, clients: usize) -> Self {
        Self {
            documents,
            doc,
            newest: vec![0; clients],
        }
    }

    /// Whether `(client, t)` is new: later than every stamp seen from `client` before. A
    /// marker naming no client of the document is never new.
    fn fresh(&mut self, client: u32, t: u64) -> bool {
        let (doc, slot) = seat(client as usize, self.documents);
        if doc != self.doc {
            return false;
        }
        match self.newest.get_mut(slot) {
            Some(newest) if t > *newest => {
                *newest = t;
                true
            }
            _ => false,
        }
    }
}

/// A client's document as Yjs client `client_id`, with offsets in UTF-16 units as y-websocket's
/// JavaScript clients count.
fn client_doc(client_id: u64) -> (Doc, TextRef) {
    let doc = Doc::with_options(Options {
        client_id: ClientID::new(client_id),
        offset_kind: OffsetKind::Utf16,
        ..Options::default()
    });
    let text = doc.get_or_insert_text("content");
    (doc, text)
}

/// A Yjs v1 update of one item: `text` (ASCII, so its UTF-16 length is its length in bytes)
/// inserted right after the item `origin`, by `client` at `clock`. It is what yrs encodes for
/// an insert at the end of a text whose last item is `origin`, without the walk to find it
/// (the module docs; a unit test compares the two).
pub fn append_after(client: ClientID, clock: u32, origin: ID, text: &str) -> Vec<u8> {
    let mut encoder = EncoderV1::new();
    encoder.write_var(1u32); // clients with items
    encoder.write_var(1u32); // items of this client
    encoder.write_client(client);
    encoder.write_var(clock);
    // An origin and no right origin: the parent is the origin's.
    encoder.write_info(HAS_ORIGIN | BLOCK_ITEM_STRING_REF_NUMBER);
    encoder.write_left_id(&origin);
    encoder.write_string(text);
    encoder.write_var(0u32); // no deletions
    encoder.to_vec()
}

/// The most markers a client late on its ticks sends in one write
/// ([`Client::send_due_markers`]): enough to catch up in a few writes after a stall, few
/// enough that one client does not hold its thread for long.
const MARKERS_PER_WRITE: usize = 16;

struct Client {
    index: u32,
    ws: Socket,
    codec: Codec,
    doc: Doc,
    text: TextRef,
    /// With `--typing runs`: the document of this client's own markers, where it writes.
    run: Option<(Doc, TextRef)>,
    /// With `--typing interleaved`: the item it appends after (module docs); `None` until it
    /// has one.
    tail: Option<ID>,
    ledger: Ledger,
    /// The stamp of this client's last marker: the next is later, even within one µs.
    last_stamp: u64,
    shared: Arc<DocShared>,
    ctx: Arc<Ctx>,
    cue: Cue,
    out: ClientResult,
    synced: bool,
}

impl Client {
    fn error(&mut self, failure: Failure) {
        Live::bump(&self.ctx.live.errors);
        self.out.errors.add_detail(&failure.code, || {
            format!("client {}: {}", self.index, failure.detail)
        });
    }

    /// Accounts for the markers an update from the server brings, then applies it. With
    /// interleaved typing, the item of the update's newest marker from another client becomes
    /// the tail.
    fn apply(&mut self, data: &[u8]) {
        let newest = self.count_markers(data);
        let update = match Update::decode_v1(data) {
            Ok(update) => update,
            Err(err) => return self.error(bad_update(err)),
        };
        // The sender's last item in this update holds its newest marker. (Not the update's
        // `state_vector`, which counts only a client's blocks from clock 0.)
        let tail = newest
            .filter(|_| self.ctx.typing == Typing::Interleaved)
            .and_then(|sender| {
                let client = ClientID::new(self.ctx.client_ids + u64::from(sender));
                let inserted = update.insertions(true);
                let (_, ranges) = inserted.iter().find(|(c, _)| **c == client)?;
                let end = ranges.iter().map(|range| range.end).max()?;
                Some(ID::new(client, end.checked_sub(1)?))
            });
        let applied = self.doc.transact_mut().apply_update(update);
        if let Err(err) = applied {
            return self.error(bad_update(err));
        }
        // Only an item the document holds can be appended after (one whose update is still
        // waiting for an earlier one is not in it yet).
        if let Some(tail) = tail
            && self.doc.transact().state_vector().get(&tail.client) > tail.clock
        {
            self.tail = Some(tail);
        }
    }

    /// Counts the markers in `data` from other clients, new ones once; returns the client of
    /// the newest of them.
    fn count_markers(&mut self, data: &[u8]) -> Option<u32> {
        let now = now_us();
        let since = self.ctx.run_start_us.load(Ordering::Relaxed);
        let running = self.cue.phase() == Phase::Run;
        let mut newest: Option<(u64, u32)> = None;
        for (client, t) in markers(data) {
            if client == self.index {
                continue;
            }
            if newest.is_none_or(|(latest, _)| t > latest) {
                newest = Some((t, client));
            }
            if t < since || !self.ledger.fresh(client, t) {
                continue;
            }
            self.out.broadcast.record_us(now.saturating_sub(t));
            self.out.seen += 1;
            if running {
                self.out.delivered += 1;
                Live::bump(&self.ctx.live.delivered);
            }
        }
        newest.map(|(_, client)| client)
    }

    /// Handles one binary frame; returns the frames to answer with, or why the server ended
    /// this client (a Hocuspocus close).
    fn on_frame(&mut self, frame: &[u8]) -> Result<Vec<Bytes>, Failure> {
        let mut replies = Vec::new();
        for message in self.codec.decode(frame) {
            match message {
                Ok(Incoming::Sync(SyncMessage::SyncStep1(sv))) => {
                    let diff = self.doc.transact().encode_state_as_update_v1(&sv);
                    replies.push(self.codec.sync(SyncMessage::SyncStep2(diff)));
                }
                Ok(Incoming::Sync(SyncMessage::SyncStep2(data))) => {
                    self.apply(&data);
                    self.synced = true;
                }
                Ok(Incoming::Sync(SyncMessage::Update(data))) => {
                    self.out.updates_received += 1;
                    self.apply(&data);
                }
                Ok(Incoming::Denied(reason)) => {
                    self.error(Failure::new("permission_denied", reason));
                }
                Ok(Incoming::TokenRequest) => {
                    replies.extend(self.codec.hello(self.ctx.target.token()));
                }
                Ok(Incoming::Closed(reason)) => {
                    return Err(Failure::new(
                        "closed",
                        format!("the server closed the document: {reason}"),
                    ));
                }
                Ok(Incoming::Authenticated | Incoming::Other) => {}
                Err(err) => self.error(Failure::new("bad_frame", err.0)),
            }
        }
        Ok(replies)
    }

    async fn send(&mut self, frame: Bytes) -> Result<(), Failure> {
        self.ws
            .send(Message::Binary(frame))
            .await
            .map_err(|err| Failure::new("send", err.to_string()))
    }

    /// Reads until the server answered our sync step 1, or `deadline`. Hocuspocus gets the
    /// auth message first; it holds the sync step 1 until the token is accepted.
    async fn sync(&mut self, deadline: Instant) -> Result<(), Failure> {
        if let Some(hello) = self.codec.hello(self.ctx.target.token()) {
            self.send(hello).await?;
        }
        let step1 = self
            .codec
            .sync(SyncMessage::SyncStep1(self.doc.transact().state_vector()));
        self.send(step1).await?;
        while !self.synced {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(Failure::new("timeout", "no sync step 2 in time")),
                Ok(Some(Ok(Message::Binary(frame)))) => {
                    for reply in self.on_frame(&frame)? {
                        self.send(reply).await?;
                    }
                }
                Ok(Some(Ok(Message::Close(close)))) => {
                    return Err(Failure::new(
                        "closed",
                        format!("closed while syncing: {close:?}"),
                    ));
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(err))) => return Err(Failure::new("closed", err.to_string())),
                Ok(None) => return Err(Failure::new("closed", "the stream ended while syncing")),
            }
        }
        Ok(())
    }

    fn count_done(&self) -> bool {
        self.ctx.count.is_some_and(|count| self.out.sent >= count)
    }

    /// Applies an update this client made elsewhere (its run document, or by hand) to its copy
    /// of the shared document.
    fn apply_own(&self, update: &[u8]) -> Result<(), Failure> {
        let decoded = Update::decode_v1(update).map_err(bad_update)?;
        self.doc
            .transact_mut()
            .apply_update(decoded)
            .map_err(bad_update)
    }

    /// Interleaved typing: appends `marker` after the tail (module docs), or with yrs's own
    /// walk to the end while there is no tail yet. The marker becomes the tail.
    fn append(&mut self, marker: &str) -> Result<Vec<u8>, Failure> {
        let own = self.doc.client_id();
        let clock = self.doc.transact().state_vector().get(&own);
        let update = match self.tail {
            Some(origin) => {
                let update = append_after(own, clock, origin, marker);
                self.apply_own(&update)?;
                update
            }
            None => {
                let mut txn = self.doc.transact_mut();
                self.text.push(&mut txn, marker);
                txn.encode_update_v1()
            }
        };
        let len = u32::try_from(marker.len()).map_err(bad_update)?;
        if self.doc.transact().state_vector().get(&own) != clock + len {
            return Err(bad_update(
                "an append did not join the client's own document",
            ));
        }
        self.tail = Some(ID::new(own, clock + len - 1));
        Ok(update)
    }

    /// Sends the marker of the tick that fired, and one for every further tick already due (a
    /// client running late), up to [`MARKERS_PER_WRITE`], in one write. Each is still a
    /// y-websocket message of its own, stamped when it is made; only the system call is
    /// shared. A generator that made one `send` per marker spent a third of its time in them at
    /// R = 1,000, falling behind the rate it was asked for just when it most needed to keep up.
    async fn send_due_markers(&mut self, ticker: &mut Option<Interval>) -> Result<(), Failure> {
        let mut written = 0;
        loop {
            let frame = self.marker()?;
            self.ws
                .feed(Message::Binary(frame))
                .await
                .map_err(|err| Failure::new("send", err.to_string()))?;
            written += 1;
            if written == MARKERS_PER_WRITE
                || self.count_done()
                || tick(ticker).now_or_never().is_none()
            {
                break;
            }
        }
        self.ws
            .flush()
            .await
            .map_err(|err| Failure::new("send", err.to_string()))
    }

    /// Makes the next marker's update, applies it to this client's copy and counts it sent;
    /// returns its frame.
    fn marker(&mut self) -> Result<Bytes, Failure> {
        self.last_stamp = now_us().max(self.last_stamp + 1);
        let marker = format!("<{}:{}>", self.index, self.last_stamp);
        let update = match &self.run {
            Some((run, run_text)) => {
                let update = {
                    let mut txn = run.transact_mut();
                    run_text.push(&mut txn, &marker);
                    txn.encode_update_v1()
                };
                self.apply_own(&update)?;
                update
            }
            None => self.append(&marker)?,
        };
        self.out.sent += 1;
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        Live::bump(&self.ctx.live.sent);
        Ok(self.codec.sync(SyncMessage::Update(update)))
    }

    fn drained(&self) -> bool {
        self.out.sent + self.out.seen >= self.shared.sent.load(Ordering::Relaxed)
    }

    async fn drive(mut self) -> ClientResult {
        let mut ticker: Option<Interval> = None;
        loop {
            let phase = self.cue.phase();
            if phase == Phase::Run && ticker.is_none() {
                ticker = Some(ticker_for(self.ctx.period));
            }
            // y-websocket has no acks: a client is quiet as soon as it stops sending.
            if phase >= Phase::Stop || self.count_done() {
                self.cue.reach(stage::QUIET);
            }
            if phase == Phase::Drain && self.drained() {
                self.cue.reach(stage::DRAINED);
            }
            if phase == Phase::Close {
                break;
            }
            let sending = phase == Phase::Run && !self.count_done();
            tokio::select! {
                _ = self.cue.changed() => {}
                message = self.ws.next() => match message {
                    Some(Ok(Message::Binary(frame))) => match self.on_frame(&frame) {
                        Ok(replies) => {
                            for reply in replies {
                                if let Err(failure) = self.send(reply).await {
                                    self.out.dropped = Some(failure.detail);
                                    break;
                                }
                            }
                        }
                        Err(failure) => self.out.dropped = Some(failure.detail),
                    },
                    Some(Ok(Message::Close(close))) => {
                        self.out.dropped = Some(format!("closed by the server: {close:?}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => self.out.dropped = Some(err.to_string()),
                    None => self.out.dropped = Some("the stream ended".into()),
                },
                _ = tick(&mut ticker), if sending => {
                    if let Err(failure) = self.send_due_markers(&mut ticker).await {
                        self.out.dropped = Some(failure.detail);
                    }
                }
            }
            if self.out.dropped.is_some() {
                break;
            }
        }
        if let Some(why) = self.out.dropped.clone() {
            self.error(Failure::new("closed", why));
        }
        ws::close(&mut self.ws).await;
        let text = self.text.get_string(&self.doc.transact());
        self.out.text = Some((fnv1a(&[text.as_bytes()]), text.len()));
        self.out.adjacency = adjacency(&text);
        self.out
    }
}

async fn client_task(
    ctx: Arc<Ctx>,
    shared: Arc<DocShared>,
    doc: usize,
    index: u32,
    delay: Duration,
    mut cue: Cue,
) -> ClientResult {
    let mut out = ClientResult {
        index,
        doc,
        ..ClientResult::default()
    };
    if !cue.ramp_sleep(delay).await {
        return out;
    }
    let fail = |out: &mut ClientResult, failure: Failure| {
        Live::bump(&ctx.live.failed);
        out.errors.add_detail(&failure.code, || {
            format!("client {index}: {}", failure.detail)
        });
        out.dropped = Some(failure.detail);
    };
    let url: Url = ctx.target.socket(&shared.room, true);
    let ws = match ws::connect(&url, ctx.timeout).await {
        Ok(ws) => ws,
        Err(failure) => {
            fail(&mut out, failure);
            return out;
        }
    };
    // The run document writes as this client; the shared copy only writes with interleaved
    // typing, never both.
    let client_id = ctx.client_ids + u64::from(index);
    let (doc, text) = client_doc(client_id);
    let mut client = Client {
        index,
        ws,
        codec: Codec::new(ctx.framing, shared.room.clone()),
        doc,
        text,
        run: (ctx.typing == Typing::Runs).then(|| client_doc(client_id)),
        tail: None,
        ledger: Ledger::new(out.doc, ctx.documents, ctx.clients),
        last_stamp: 0,
        shared,
        ctx: ctx.clone(),
        cue,
        out,
        synced: false,
    };
    if let Err(failure) = client.sync(Instant::now() + ctx.timeout).await {
        ws::close(&mut client.ws).await;
        let mut out = std::mem::take(&mut client.out);
        fail(&mut out, failure);
        return out;
    }
    client.out.connected = true;
    Live::bump(&ctx.live.connected);
    client.cue.reach(stage::READY);
    client.drive().await
}

pub async fn run(args: YjsArgs) -> Result<Report, LoadError> {
    args.validate()?;
    let common = &args.common;
    let raw_url = common
        .url
        .as_deref()
        .unwrap_or("ws://127.0.0.1:8080/v1/yjs");
    let target = Target::resolve(raw_url, common.token.clone(), common.allow_remote).await?;
    let prefix = common.prefix();
    let total = args.sessions * args.clients;
    let live = Arc::new(Live::default());
    let ctx = Arc::new(Ctx {
        target: target.clone(),
        framing: args.framing,
        typing: args.typing,
        client_ids: rand::random_range(1..1u64 << 40),
        documents: args.sessions,
        clients: args.clients,
        timeout: common.timeout,
        period: Duration::from_secs_f64(1.0 / args.rate),
        count: args.count,
        live: live.clone(),
        run_start_us: AtomicU64::new(u64::MAX),
    });
    let shared: Vec<Arc<DocShared>> = (0..args.sessions)
        .map(|s| {
            Arc::new(DocShared {
                room: format!("{prefix}-{s}/{}", args.doc),
                sent: AtomicU64::new(0),
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
    let (timeline, results) = run_senders(senders, |i, delay, cue| {
        let (s, _) = seat(i, args.sessions);
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        tokio::spawn(client_task(
            ctx.clone(),
            shared[s].clone(),
            s,
            index,
            delay,
            cue,
        ))
    })
    .await?;

    let rooms = format!(
        "{}/{prefix}-<i>/{}",
        target.url().as_str().trim_end_matches('/'),
        args.doc
    );
    let mut report = Report::of_run("yjs", rooms, timeline);
    report.param("documents", args.sessions);
    report.param("clients", args.clients);
    report.param("rate", args.rate);
    if args.framing == Framing::Hocuspocus {
        report.param("framing", "hocuspocus");
    }
    report.param(
        "typing",
        match args.typing {
            Typing::Runs => "runs",
            Typing::Interleaved => "interleaved",
        },
    );
    report.param(
        "ramp_up",
        humantime::format_duration(common.ramp_up).to_string(),
    );
    match args.count {
        Some(count) => report.param("count", count),
        None => report.param(
            "duration",
            humantime::format_duration(measured_bound(args.duration, None)).to_string(),
        ),
    }

    let mut broadcast = Latency::default();
    let (mut sent, mut delivered, mut updates) = (0, 0, 0);
    for r in &results {
        broadcast.merge(&r.broadcast);
        report.errors.merge(&r.errors);
        sent += r.sent;
        delivered += r.delivered;
        updates += r.updates_received;
    }
    report.connections = connections(&results);
    report.count("sent", sent, true);
    report.count("delivered", delivered, true);
    report.count("update_frames_received", updates, false);
    let (pairs, mixed) = results
        .iter()
        .fold((0, 0), |(p, m), r| (p + r.adjacency.0, m + r.adjacency.1));
    report.count(
        "adjacent_from_other_clients_pct",
        (100 * mixed).checked_div(pairs).unwrap_or(0),
        false,
    );
    report.note_shortfall(args.rate, 0);
    report.latencies.push(("broadcast", broadcast.summary()));
    report.convergence = Some(converge(&shared, &results));
    Ok(report)
}

/// Every connected client of a document must have seen every marker sent to it and hold the
/// same text.
fn converge(shared: &[Arc<DocShared>], results: &[ClientResult]) -> Convergence {
    let mut failures = Vec::new();
    // Said first, so that truncating the list never hides them.
    let mut hints = Vec::new();
    let mut clients = 0;
    for (d, doc) in shared.iter().enumerate() {
        let sent = doc.sent.load(Ordering::Relaxed);
        let members: Vec<&ClientResult> = results
            .iter()
            .filter(|r| r.doc == d && r.connected)
            .collect();
        clients += members.len();
        let live = members.iter().filter(|m| m.dropped.is_none()).count();
        let short = members
            .iter()
            .filter(|m| m.dropped.is_none() && m.sent + m.seen < sent)
            .count();
        if live > 1 && short == live {
            hints.push(format!(
                "{}: every client misses updates that another sent, so the server did not pass \
                 them all on before the drain ended: it was slow (raise --drain), or it refused \
                 them. The y-websocket protocol has no refusal message, so a refused update \
                 (for a Conclave node, one past --max-doc-units) only shows here and in the \
                 server's log and error counters.",
                doc.room
            ));
        }
        let mut first: Option<(u32, (u64, usize))> = None;
        for m in members {
            if let Some(why) = &m.dropped {
                failures.push(format!(
                    "{}: client {} was disconnected: {why}",
                    doc.room, m.index
                ));
                continue;
            }
            if m.sent + m.seen < sent {
                failures.push(format!(
                    "{}: client {} holds {} of the {sent} updates sent",
                    doc.room,
                    m.index,
                    m.sent + m.seen
                ));
            }
            let Some(text) = m.text else { continue };
            match first {
                None => first = Some((m.index, text)),
                Some((other, expected)) if expected != text => failures.push(format!(
                    "{}: client {}'s text ({} bytes) differs from client {other}'s ({} bytes)",
                    doc.room, m.index, text.1, expected.1
                )),
                Some(_) => {}
            }
        }
    }
    let passed = failures.is_empty();
    hints.truncate(3);
    failures.splice(0..0, hints);
    let more = failures.len().saturating_sub(10);
    failures.truncate(10);
    if more > 0 {
        failures.push(format!("… and {more} more"));
    }
    Convergence {
        passed,
        checked: format!(
            "{} documents, {clients} clients: every update received, equal texts",
            shared.len()
        ),
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::yjs as frames;
    use yrs::StateVector;
    use yrs::sync::Message as YMessage;

    fn doc(room: &str, sent: u64) -> Arc<DocShared> {
        Arc::new(DocShared {
            room: room.into(),
            sent: AtomicU64::new(sent),
        })
    }

    fn holding(doc: usize, index: u32, sent: u64, seen: u64) -> ClientResult {
        ClientResult {
            index,
            doc,
            connected: true,
            sent,
            seen,
            text: Some((7, 10)),
            ..ClientResult::default()
        }
    }

    /// When every client of a document is short, the report says what can cause it (a server
    /// that refused updates without a word, or a drain too short); one short client is its own
    /// failure and gets no such hint.
    #[test]
    fn a_document_every_client_is_short_of_gets_a_hint() {
        let shared = [doc("a", 30), doc("b", 30)];
        let results = [
            // Document a: each client sent 10 and saw 15 of the other 20.
            holding(0, 0, 10, 15),
            holding(0, 1, 10, 15),
            holding(0, 2, 10, 15),
            // Document b: only client 4 is short.
            holding(1, 3, 10, 20),
            holding(1, 4, 10, 19),
            holding(1, 5, 10, 20),
        ];
        let convergence = converge(&shared, &results);
        assert!(!convergence.passed);
        let hints: Vec<&String> = convergence
            .failures
            .iter()
            .filter(|f| f.contains("every client misses"))
            .collect();
        assert_eq!(hints.len(), 1, "{:?}", convergence.failures);
        assert!(hints[0].starts_with("a: "), "{hints:?}");
        assert_eq!(convergence.failures[0], *hints[0], "the hint comes first");
        assert!(
            convergence
                .failures
                .iter()
                .any(|f| f == "b: client 4 holds 29 of the 30 updates sent"),
            "{:?}",
            convergence.failures
        );
    }

    #[test]
    fn markers_parse_from_merged_inserts() {
        let found: Vec<_> = markers(b"3:9><3:17><12:5>junk<x:1><4:><+5:1><6:2").collect();
        assert_eq!(found, vec![(3, 17), (12, 5)]);
        // Numbers too large for their type are not markers.
        let found: Vec<_> =
            markers(b"<4294967296:1><1:99999999999999999999><4294967295:18446744073709551615>")
                .collect();
        assert_eq!(found, vec![(u32::MAX, u64::MAX)]);
    }

    /// The frames are y-websocket's: varint message type 0 (sync), varint sync type
    /// (0 step 1, 1 step 2, 2 update), then a varint-length-prefixed payload.
    #[test]
    fn framing_is_y_websocket() {
        assert_eq!(
            &frames::sync_step1(StateVector::default())[..],
            &[0, 0, 1, 0]
        );
        assert_eq!(&frames::sync_step2(vec![9, 8])[..], &[0, 1, 2, 9, 8]);
        assert_eq!(&frames::update(vec![7])[..], &[0, 2, 1, 7]);
        // A payload of 200 bytes: its length is the two-byte varint 0xC8 0x01.
        let long = frames::update(vec![1; 200]);
        assert_eq!(&long[..4], &[0, 2, 0xC8, 0x01]);
        assert_eq!(long.len(), 204);
        // Awareness is message type 1, its payload length-prefixed: these are the bytes
        // y-protocols writes for client 7 at clock 1 with state "{}".
        let decoded = frames::decode(&[1, 6, 1, 7, 1, 2, b'{', b'}']);
        match decoded.as_slice() {
            [Ok(YMessage::Awareness(update))] => {
                let entry = &update.clients[&yrs::block::ClientID::new(7)];
                assert_eq!((update.clients.len(), &*entry.json), (1, "{}"));
            }
            other => panic!("{other:?}"),
        }
        // An unknown sync message type is an error, not a panic.
        assert!(frames::decode(&[0, 9, 1]).iter().any(Result::is_err));
    }

    /// With `--typing runs` a client writes in a document of its own markers and applies the
    /// same update to its shared copy: every copy converges, and each client's markers stay one
    /// run, however the clients interleave.
    #[test]
    fn runs_stay_together_and_converge() {
        let shared: Vec<(Doc, TextRef)> = (0..3).map(|c| client_doc(100 + c)).collect();
        let runs: Vec<(Doc, TextRef)> = (0..3).map(client_doc).collect();
        for round in 0..4 {
            for (c, (run, run_text)) in runs.iter().enumerate() {
                let update = {
                    let mut txn = run.transact_mut();
                    run_text.push(&mut txn, &format!("<{c}:{round}>"));
                    txn.encode_update_v1()
                };
                for (doc, _) in &shared {
                    doc.transact_mut()
                        .apply_update(Update::decode_v1(&update).unwrap())
                        .unwrap();
                }
            }
        }
        let texts: Vec<String> = shared
            .iter()
            .map(|(doc, text)| text.get_string(&doc.transact()))
            .collect();
        assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
        for c in 0..3 {
            let run: String = (0..4).map(|round| format!("<{c}:{round}>")).collect();
            assert!(texts[0].contains(&run), "{} lacks {run}", texts[0]);
        }
    }

    /// The hand-made append is byte for byte what yrs encodes when it walks to the end.
    #[test]
    fn an_append_after_the_tail_is_what_yrs_encodes_for_a_push() {
        let (a, a_text) = client_doc(7);
        let (b, b_text) = client_doc(9);
        let first = {
            let mut txn = a.transact_mut();
            a_text.push(&mut txn, "<0:1>");
            txn.encode_update_v1()
        };
        b.transact_mut()
            .apply_update(Update::decode_v1(&first).unwrap())
            .unwrap();
        let walked = {
            let mut txn = b.transact_mut();
            b_text.push(&mut txn, "<1:2>");
            txn.encode_update_v1()
        };
        let tail = ID::new(ClientID::new(7), 4);
        assert_eq!(append_after(ClientID::new(9), 0, tail, "<1:2>"), walked);
    }

    /// Clients that append after the newest marker they know, with updates crossing, converge
    /// on one text that holds every marker once, the clients' markers interleaved.
    #[test]
    fn interleaved_appends_converge() {
        let docs: Vec<(Doc, TextRef)> = (0..3).map(|c| client_doc(50 + c)).collect();
        let mut tails: Vec<Option<ID>> = vec![None; 3];
        for round in 0..20u32 {
            // Everyone appends before anyone hears of the others: maximal concurrency.
            let updates: Vec<Vec<u8>> = docs
                .iter()
                .enumerate()
                .map(|(c, (doc, text))| {
                    let marker = format!("<{c}:{round}>");
                    let own = doc.client_id();
                    let clock = doc.transact().state_vector().get(&own);
                    let update = match tails[c] {
                        Some(tail) => append_after(own, clock, tail, &marker),
                        None => {
                            let mut txn = doc.transact_mut();
                            text.push(&mut txn, &marker);
                            txn.encode_update_v1()
                        }
                    };
                    tails[c] = Some(ID::new(own, clock + marker.len() as u32 - 1));
                    update
                })
                .collect();
            for (c, (doc, _)) in docs.iter().enumerate() {
                for (sender, update) in updates.iter().enumerate() {
                    if sender != c || round > 0 {
                        let decoded = Update::decode_v1(update).unwrap();
                        // Applying one's own update again changes nothing.
                        doc.transact_mut().apply_update(decoded).unwrap();
                    }
                }
                // The newest marker heard is the last sender's.
                let last = ClientID::new(50 + 2);
                let upper = doc.transact().state_vector().get(&last);
                tails[c] = Some(ID::new(last, upper - 1));
            }
        }
        let texts: Vec<String> = docs
            .iter()
            .map(|(doc, text)| text.get_string(&doc.transact()))
            .collect();
        assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
        let found: Vec<(u32, u64)> = markers(texts[0].as_bytes()).collect();
        assert_eq!(found.len(), 60, "{}", texts[0]);
        let switches = found.windows(2).filter(|w| w[0].0 != w[1].0).count();
        assert!(
            switches >= 20,
            "the clients' markers are not interleaved: {}",
            texts[0]
        );
    }

    /// Markers are found in encoded updates as a server sends them: one client's own update, a
    /// merge of several, and a whole-document sync step 2 that repeats what came before, which
    /// the ledger counts once.
    #[test]
    fn markers_are_found_in_updates_and_counted_once() {
        let (a, a_text) = client_doc(1);
        let (b, b_text) = client_doc(2);
        let append = |doc: &Doc, text: &TextRef, s: &str| {
            let mut txn = doc.transact_mut();
            text.push(&mut txn, s);
            txn.encode_update_v1()
        };
        let a1 = append(&a, &a_text, "<0:100>");
        let a2 = append(&a, &a_text, "<0:150>");
        let b1 = append(&b, &b_text, "<1:200>");
        let merged = yrs::merge_updates_v1([&a1[..], &a2[..], &b1[..]]).unwrap();
        let mut found: Vec<_> = markers(&merged).collect();
        found.sort_unstable();
        assert_eq!(found, vec![(0, 100), (0, 150), (1, 200)]);

        let mut ledger = Ledger::new(0, 1, 2);
        let mut fresh = |update: &[u8]| -> Vec<(u32, u64)> {
            markers(update)
                .filter(|(client, t)| ledger.fresh(*client, *t))
                .collect()
        };
        assert_eq!(fresh(&a1), vec![(0, 100)]);
        let whole = a
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        assert_eq!(fresh(&whole), vec![(0, 150)]);
        assert_eq!(fresh(&a2), vec![]);
        assert_eq!(fresh(&b1), vec![(1, 200)]);
        assert!(!ledger.fresh(2, 300), "client 2 is not of this document");

        // With three documents, clients 1, 4 and 7 write to document 1.
        let mut ledger = Ledger::new(1, 3, 3);
        for client in [1, 4, 7] {
            assert!(ledger.fresh(client, 10), "client {client}");
            assert!(!ledger.fresh(client, 10), "client {client} twice");
        }
        for client in [0, 2, 3, 5, 10] {
            assert!(
                !ledger.fresh(client, 10),
                "client {client} is not of document 1"
            );
        }
    }
}
