//! `SessionActor`: the single owner of one live session's members, presence, subscribers and
//! event log tail.
//!
//! Every change to a session passes through this actor's mailbox, so the actor alone decides the
//! order of events. Writes wait in a batch and are committed together (group commit): a batch is
//! flushed when it reaches `commit_batch` writes or `commit_window` after its first write, and
//! only one batch is in flight at a time; the node's `GroupCommit` writes it in one transaction
//! with whatever other sessions are flushing. Offsets are given at flush time, counting on from the
//! last committed offset, so a batch that fails to commit leaves no gap: its requests get
//! `storage_unavailable` and the next batch reuses the same offsets. Acks and broadcasts go out
//! only after the commit, so no client ever sees a change a crash could take back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;

use super::document::Document;
use super::fanout::YjsFanout;
use super::log::{self, ChatData, Event, EventKind, MemberData, NewEvent};
use super::messages::{
    AppendEvent, Archive, Committed, ConnId, Deliver, DeliverBinary, Disconnect, Drain, Edit,
    FrameClass, Inspect, Join, Leave, LiveView, PostChat, REPLAY_BUDGET_FACTOR, ReadDoc, Reply,
    SetPresence, YjsAttach, YjsAwareness, YjsAwarenessQuery, YjsSyncStep1, YjsUpdate,
};
use super::messages::{LeasesRenewed, Reattach};
use super::ot::Operation;
use super::registry::SessionRegistry;
use super::relay::Relay;
use super::remote::RemoteClients;
use crate::cluster::{Channel, RelayFrame, Subscription, ToOwner, decode, decode_to_owner};
use crate::protocol::frames::{DocSummary, PresenceEntry, ServerFrame};
use crate::protocol::yjs;
use crate::protocol::{DocName, ErrorCode, Refusal, SessionId, UserInfo};
use crate::store::{
    DocUpdate, Fence, Ownership, SessionBatch, SessionRecord, StoreError, StoredDoc,
};
use crate::telemetry;

/// The most event data the in-memory tail keeps, whatever its count.
const TAIL_BYTES: usize = 1 << 20;

/// Events fetched from the store per page when replaying beyond the in-memory tail.
const REPLAY_PAGE: u32 = 1000;

/// A write accepted but not yet committed: an event for the log, a document change, or both
/// absent (a no-op edit, acked once everything before it is committed).
struct PendingWrite {
    event: Option<NewEvent>,
    doc: Option<PendingDocChange>,
    reply: Option<Reply>,
}

/// A document edit applied in memory, waiting for its batch.
struct PendingDocChange {
    doc: DocName,
    /// The version the client is acked with.
    version: u64,
    /// The applied operation; `None` for a no-op or a Yjs update outside `content`.
    op: Option<Operation>,
    /// Whether an update was applied in memory (and so must be marked committed).
    update_committed: bool,
    /// The yrs update to store; taken when the batch is flushed.
    update: Option<DocUpdate>,
    /// The Yjs update for the document's Yjs clients once this change commits (see
    /// `fanout`).
    yjs_update: Option<YjsBroadcast>,
    actor: log::Actor,
    /// The connection that sent it, which gets an ack instead of the `doc` frame.
    origin: Option<ConnId>,
}

/// A Yjs update to send a document's Yjs clients, and the one connection that wrote all of
/// it (`None` for several), which is not sent its own keys back.
struct YjsBroadcast {
    update: Vec<u8>,
    author: Option<ConnId>,
}

/// One subscribed connection.
struct Subscriber {
    /// Shared with the user's [`Member`] entry: an idle member costs one copy of it.
    user: Arc<UserInfo>,
    outbox: Recipient<Deliver>,
    /// While a replay from the store is in flight, live frames wait here so that the client
    /// still sees every event once and in order.
    catching_up: Option<Vec<Deliver>>,
}

impl Subscriber {
    fn send(&mut self, deliver: Deliver) {
        match &mut self.catching_up {
            Some(buffer) => buffer.push(deliver),
            None => self.outbox.do_send(deliver),
        }
    }
}

/// A Yjs connection attached to one document.
struct YjsSubscriber {
    user: Arc<UserInfo>,
    doc: DocName,
    outbox: Recipient<DeliverBinary>,
    /// Its sync step 1, waiting for the document to have nothing uncommitted.
    awaiting_sync: Option<yrs::StateVector>,
    /// The awareness client ids it announced, removed when it goes.
    awareness_clients: Vec<yrs::block::ClientID>,
}

/// A user present in the session, with how many of their connections have joined.
struct Member {
    user: Arc<UserInfo>,
    conns: usize,
}

/// The actor that owns one session on this node.
pub struct SessionActor {
    id: SessionId,
    generation: u64,
    registry: Arc<SessionRegistry>,
    /// Set once the session has loaded from the store.
    loaded: bool,
    epoch: String,
    /// The offset of the last committed event.
    committed: u64,
    /// The newest committed events, for replay without a store round trip.
    tail: VecDeque<Event>,
    /// The bytes of event data in `tail`.
    tail_bytes: usize,
    /// The session's documents, by name.
    docs: BTreeMap<DocName, Document>,
    subscribers: HashMap<ConnId, Subscriber>,
    yjs_subscribers: HashMap<ConnId, YjsSubscriber>,
    /// Members in the order they joined.
    members: Vec<Member>,
    presence: HashMap<ConnId, Box<RawValue>>,
    /// Connections whose presence changed since the last broadcast, in order of change.
    presence_dirty: Vec<ConnId>,
    presence_timer: Option<SpawnHandle>,
    last_presence_broadcast: Option<Instant>,
    /// Writes not yet committed, oldest first. A deque: each flush takes its batch off the
    /// front of what can be a long backlog, which shifted the rest of a `Vec` every time.
    pending: VecDeque<PendingWrite>,
    flush_timer: Option<SpawnHandle>,
    flushing: bool,
    drain_waiters: Vec<oneshot::Sender<()>>,
    /// Document updates accepted into a batch, and those committed (or refused) since.
    doc_writes_accepted: u64,
    doc_writes_settled: u64,
    /// Joins that arrived while document updates were uncommitted, with the count they wait
    /// for: their snapshot must include every edit accepted before them, or a client that
    /// reconnects would not see its own last edit and send it again.
    deferred_joins: Vec<(u64, Join)>,
    last_activity: Instant,
    /// Set when the actor stops on purpose; an actor dropped without it crashed.
    retiring: bool,
    /// This node's lease on the session: the fence of every write. `None` until loaded, and
    /// again once deposed.
    fence: Option<Fence>,
    /// When the lease was taken: a renewal reported from before it says nothing about it.
    fenced_at: Instant,
    /// Why the session is not served here, when another node owns it.
    elsewhere: Option<Refusal>,
    /// Set when another node owns the session and this actor relays its clients there.
    relay: Option<Relay>,
    /// As the owner: the subscribers connected through other nodes' relays.
    remote: RemoteClients,
    /// Yjs updates accepted and not applied yet, in arrival order.
    yjs_backlog: Vec<QueuedYjsUpdate>,
    /// The earliest the next backlog applies (see [`YJS_PACING`]).
    yjs_not_before: Option<Instant>,
}

/// After a Yjs backlog whose documents took `t` to apply, the next waits until `YJS_PACING × t`
/// has passed. Applying walks the document's text once per group, however many updates the group
/// holds; without a pause, a large document under steady typing is walked for nearly every
/// update and the walks fill the arbiter's thread. Pausing three times as long as the walk
/// keeps walks to a quarter of the thread and lets the groups grow, at a delay of a few walks:
/// microseconds for a small document.
const YJS_PACING: u32 = 3;

/// A Yjs client's update, accepted and waiting to be applied with the others that arrive
/// with it (see [`ApplyYjsBacklog`]).
struct QueuedYjsUpdate {
    doc: DocName,
    actor: log::Actor,
    conn: ConnId,
    data: Vec<u8>,
}

/// Applies the Yjs updates queued since the last time. Sent to itself by the first update of a
/// backlog, so it runs once the mailbox's queued messages are handled: under load one turn
/// collects many updates, and each document applies its share in one transaction.
#[derive(Message)]
#[rtype(result = "()")]
struct ApplyYjsBacklog;

/// A command from another node, on the session's in channel (as its owner).
struct FromOtherNode(bytes::Bytes);

/// A frame from the session's owner on another node, on its out channel (as a relay).
struct FromOwner(bytes::Bytes);

impl SessionActor {
    pub(super) fn new(id: SessionId, generation: u64, registry: Arc<SessionRegistry>) -> Self {
        let remote = RemoteClients::new(id.clone(), registry.deps().bus.clone());
        Self {
            id,
            generation,
            registry,
            loaded: false,
            epoch: String::new(),
            committed: 0,
            tail: VecDeque::new(),
            tail_bytes: 0,
            docs: BTreeMap::new(),
            subscribers: HashMap::new(),
            yjs_subscribers: HashMap::new(),
            members: Vec::new(),
            presence: HashMap::new(),
            presence_dirty: Vec::new(),
            presence_timer: None,
            last_presence_broadcast: None,
            pending: VecDeque::new(),
            flush_timer: None,
            flushing: false,
            drain_waiters: Vec::new(),
            doc_writes_accepted: 0,
            doc_writes_settled: 0,
            deferred_joins: Vec::new(),
            last_activity: Instant::now(),
            retiring: false,
            fence: None,
            fenced_at: Instant::now(),
            elsewhere: None,
            relay: None,
            remote,
            yjs_backlog: Vec::new(),
            yjs_not_before: None,
        }
    }

    /// The refusal for a request to a session that is not loaded here.
    fn unserved(&self) -> Refusal {
        self.elsewhere.clone().unwrap_or_else(|| {
            Refusal::not_found(format!(
                "session {} does not exist or was archived",
                self.id
            ))
        })
    }

    /// Another node took the session over (its lease has a newer epoch): stop serving it at
    /// once, without writing. Nothing pending is acked; every client is told and loses the
    /// membership, and Yjs sockets are closed so they resync by state vector elsewhere.
    fn deposed(&mut self, ctx: &mut Context<Self>) {
        if self.fence.take().is_none() {
            return;
        }
        tracing::warn!(session = %self.id, "session lease taken over by another node; no longer serving it");
        telemetry::session_deposed();
        let refusal = Refusal::new(
            ErrorCode::Conflict,
            format!(
                "session {} moved to another node; reconnect and join again",
                self.id
            ),
        );
        for reply in self.pending.drain(..).filter_map(|w| w.reply) {
            reply.refuse(refusal.clone());
        }
        let error = ServerFrame::error(None, &refusal).encode();
        for subscriber in self.subscribers.values_mut() {
            subscriber.send(Deliver {
                ends_membership: Some(self.id.clone()),
                ..Deliver::ordered(error.clone())
            });
        }
        for subscriber in self.yjs_subscribers.values() {
            subscriber.outbox.do_send(DeliverBinary {
                frame: bytes::Bytes::new(),
                then_close: true,
            });
        }
        self.retire(ctx);
    }

    fn limits(&self) -> &crate::config::Limits {
        &self.registry.deps().limits
    }

    /// Leaves the registry and stops. Messages still queued fail at their senders, who report
    /// the session as unavailable; nothing was applied for them.
    fn retire(&mut self, ctx: &mut Context<Self>) {
        self.retiring = true;
        self.registry.retire(&self.id, self.generation);
        if let Some(fence) = self.fence.take() {
            let (store, session) = (self.registry.deps().store.clone(), self.id.clone());
            actix::spawn(async move {
                if let Err(err) = store.release_session(&session, &fence).await {
                    tracing::debug!(%session, %err, "lease not released; it expires by itself");
                }
            });
        }
        ctx.stop();
    }

    /// As the owner, takes the commands other nodes send this session over the bus.
    fn listen_to_other_nodes(&mut self, ctx: &mut Context<Self>) {
        let bus = self.registry.deps().bus.clone();
        if bus.kind() == "local" {
            return;
        }
        let channel = Channel::SessionIn(self.id.clone());
        async move { bus.subscribe(&channel).await }
            .into_actor(self)
            .map(|subscribed, act, ctx| match subscribed {
                Ok(commands) => {
                    ctx.add_stream(futures_util::StreamExt::map(commands.into_stream(), FromOtherNode));
                }
                Err(err) => {
                    tracing::warn!(session = %act.id, %err, "not listening to other nodes; their events for this session are not logged")
                }
            })
            .spawn(ctx);
    }

    fn on_loaded(
        &mut self,
        ctx: &mut Context<Self>,
        fence: Fence,
        record: SessionRecord,
        tail: Vec<Event>,
        docs: BTreeMap<DocName, Document>,
    ) {
        self.remote.owned_under(fence.epoch);
        self.fence = Some(fence);
        self.fenced_at = Instant::now();
        self.epoch = record.epoch;
        self.listen_to_other_nodes(ctx);
        if self.registry.deps().bus.kind() != "local" {
            let every = self.limits().owner_lease_ttl() / 3;
            ctx.run_interval(every, |act, ctx| act.forget_silent_relays(ctx));
        }
        self.committed = record.offset;
        self.tail_bytes = tail.iter().map(|e| e.data.get().len()).sum();
        self.tail = tail.into();
        self.docs = docs;
        self.loaded = true;
    }

    // ---- the write path -------------------------------------------------------------------

    /// Accepts a write into the current batch and arranges for the batch to be flushed.
    fn enqueue(&mut self, event: NewEvent, reply: Option<Reply>, ctx: &mut Context<Self>) {
        self.enqueue_write(
            PendingWrite {
                event: Some(event),
                doc: None,
                reply,
            },
            ctx,
        );
    }

    fn enqueue_write(&mut self, write: PendingWrite, ctx: &mut Context<Self>) {
        if write.doc.as_ref().is_some_and(|d| d.update.is_some()) {
            self.doc_writes_accepted += 1;
        }
        self.pending.push_back(write);
        self.last_activity = Instant::now();
        if self.flushing {
            // The batch in flight flushes this one as soon as it completes.
            return;
        }
        if self.pending.len() >= self.limits().commit_batch {
            self.flush(ctx);
        } else if self.flush_timer.is_none() {
            let window = self.limits().commit_window();
            self.flush_timer = Some(ctx.run_later(window, |act, ctx| {
                act.flush_timer = None;
                act.flush(ctx);
            }));
        }
    }

    /// Commits the pending batch in one transaction. Only one batch is ever in flight.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing || self.pending.is_empty() {
            return;
        }
        let Some(fence) = self.fence.clone() else {
            return;
        };
        if let Some(timer) = self.flush_timer.take() {
            ctx.cancel_future(timer);
        }
        let take = self.pending.len().min(self.limits().commit_batch);
        let mut batch: Vec<PendingWrite> = self.pending.drain(..take).collect();
        let mut events = Vec::new();
        let mut updates = Vec::new();
        for write in &mut batch {
            if let Some(event) = write.event.take() {
                let offset = self.committed + 1 + events.len() as u64;
                events.push(event.at_offset(offset));
            }
            if let Some(update) = write.doc.as_mut().and_then(|d| d.update.take()) {
                updates.push(update);
            }
        }
        self.flushing = true;
        let deps = self.registry.deps();
        let commits = deps.commits.clone();
        let backend = deps.store.backend();
        let had_updates = !updates.is_empty();
        let started = Instant::now();
        let group = SessionBatch {
            session: self.id.clone(),
            fence,
            events,
            updates,
        };
        ctx.spawn(
            async move { commits.commit(group).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    telemetry::commit_latency(backend, started.elapsed(), batch.len());
                    act.flushing = false;
                    match result {
                        Ok(committed) => act.on_commit(committed.events, batch, ctx),
                        Err(err) => act.on_commit_failed(err, batch, had_updates, ctx),
                    }
                    if act.pending.is_empty() {
                        act.wake_drain_waiters();
                    } else {
                        act.flush(ctx);
                    }
                }),
        );
    }

    /// Acks and broadcasts a committed batch, in the order it was accepted.
    fn on_commit(&mut self, events: Vec<Event>, batch: Vec<PendingWrite>, ctx: &mut Context<Self>) {
        let mut events = events.into_iter();
        let mut yjs_out = YjsFanout::default();
        for write in batch {
            if let Some(change) = write.doc {
                self.on_doc_committed(change, write.reply, &mut yjs_out);
                continue;
            }
            let Some(event) = events.next() else { continue };
            self.committed = event.offset;
            if let Some(reply) = write.reply {
                reply.ok(Committed::offset(event.offset));
            }
            let frame = ServerFrame::Event {
                session: &self.id,
                event: &event,
            }
            .encode();
            self.broadcast(Deliver::ordered(frame));
            self.tail_bytes += event.data.get().len();
            self.tail.push_back(event);
            // Bounded in count and in bytes: a few huge events must not pin megabytes per
            // session. Older events replay from the store.
            while self.tail.len() > self.limits().event_tail || self.tail_bytes > TAIL_BYTES {
                match self.tail.pop_front() {
                    Some(old) => self.tail_bytes -= old.data.get().len(),
                    None => break,
                }
            }
        }
        for out in yjs_out.frames() {
            for (conn, subscriber) in &self.yjs_subscribers {
                if subscriber.doc == out.doc && out.skip.as_ref() != Some(conn) {
                    subscriber.outbox.do_send(DeliverBinary {
                        then_close: false,
                        frame: out.frame.clone(),
                    });
                }
            }
        }
        self.answer_yjs_syncs();
        self.run_deferred_joins(ctx);
        let every = self.limits().doc_compact_every;
        self.compact_docs(|d| d.compaction_due(every), ctx);
    }

    /// Completes the joins whose awaited document updates have all committed or been refused.
    fn run_deferred_joins(&mut self, ctx: &mut Context<Self>) {
        let settled = self.doc_writes_settled;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.deferred_joins)
            .into_iter()
            .partition(|(target, _)| *target <= settled);
        self.deferred_joins = waiting;
        for (_, join) in ready {
            self.complete_join(join, ctx);
        }
    }

    /// Marks a document change committed, acks it and sends native subscribers its `doc`
    /// frame; its Yjs update joins `yjs_out`, which goes out merged once the batch is done.
    fn on_doc_committed(
        &mut self,
        mut change: PendingDocChange,
        reply: Option<Reply>,
        yjs_out: &mut YjsFanout,
    ) {
        if change.update_committed {
            self.doc_writes_settled += 1;
            if let Some(document) = self.docs.get_mut(&change.doc) {
                document.committed(change.version, change.op.as_ref());
            }
        }
        if let Some(YjsBroadcast { update, author }) = change.yjs_update.take() {
            yjs_out.push(&change.doc, author, update);
        }
        if let Some(reply) = reply {
            reply.ok(Committed::doc(change.doc.clone(), change.version));
        }
        let Some(op) = change.op else { return };
        let frame = ServerFrame::Doc {
            session: &self.id,
            doc: &change.doc,
            version: change.version,
            ops: &op,
            actor: &change.actor,
        }
        .encode();
        let deliver = Deliver::ordered(frame);
        for (conn, subscriber) in &mut self.subscribers {
            if change.origin.as_ref() != Some(conn) {
                subscriber.send(deliver.clone());
            }
        }
        telemetry::messages_out(self.subscribers.len());
    }

    /// A batch failed: nothing in it is acked and no offset is used. Document edits were already
    /// applied in memory and cannot be unapplied, so the documents are reloaded from the store,
    /// every later write (which may build on them) is refused too, and subscribers get a `reset`
    /// with a fresh snapshot.
    fn on_commit_failed(
        &mut self,
        err: StoreError,
        batch: Vec<PendingWrite>,
        had_updates: bool,
        ctx: &mut Context<Self>,
    ) {
        tracing::warn!(session = %self.id, %err, count = batch.len(), "commit failed; nothing acked");
        if matches!(err, StoreError::Deposed) {
            for write in batch.into_iter().rev() {
                self.pending.push_front(write);
            }
            return self.deposed(ctx);
        }
        let mut refused: Vec<PendingWrite> = batch;
        if had_updates {
            refused.extend(self.pending.drain(..));
        }
        for reply in refused.into_iter().filter_map(|w| w.reply) {
            reply.refuse(Refusal::storage_unavailable());
        }
        if had_updates {
            // Everything accepted so far is either committed or refused now.
            self.doc_writes_settled = self.doc_writes_accepted;
            self.reload_docs(ctx);
        }
    }

    fn reload_docs(&mut self, ctx: &mut Context<Self>) {
        let store = self.registry.deps().store.clone();
        let session = self.id.clone();
        ctx.wait(
            async move { store.load_docs(&session).await }
                .into_actor(self)
                .map(|result, act, ctx| match load_documents(result) {
                    Ok(docs) => {
                        act.docs = docs;
                        act.resync_subscribers();
                        act.run_deferred_joins(ctx);
                    }
                    Err(err) => {
                        tracing::error!(session = %act.id, %err, "documents failed to reload; stopping the session");
                        let frame = ServerFrame::Reset { session: &act.id }.encode();
                        act.broadcast(Deliver::ordered(frame));
                        act.retire(ctx);
                    }
                }),
        );
    }

    /// Sends every subscriber a `reset` and a fresh snapshot (a `joined` without `ref`).
    fn resync_subscribers(&mut self) {
        let reset = ServerFrame::Reset { session: &self.id }.encode();
        let joined = self.joined_frame(None);
        self.broadcast(Deliver::ordered(reset));
        self.broadcast(Deliver::ordered(joined));
    }

    fn joined_frame(&mut self, reference: Option<&str>) -> bytestring::ByteString {
        let members = self.member_list();
        let presence = self.presence_list();
        let docs = self.doc_list();
        ServerFrame::Joined {
            reference,
            session: &self.id,
            offset: self.committed,
            epoch: &self.epoch,
            members: &members,
            presence: &presence,
            docs: &docs,
        }
        .encode()
    }

    /// Answers every waiting Yjs sync step 1 whose document has nothing uncommitted.
    fn answer_yjs_syncs(&mut self) {
        for subscriber in self.yjs_subscribers.values_mut() {
            let Some(document) = self.docs.get(&subscriber.doc) else {
                continue;
            };
            if !document.is_settled() {
                continue;
            }
            if let Some(sv) = subscriber.awaiting_sync.take() {
                subscriber.outbox.do_send(DeliverBinary {
                    then_close: false,
                    frame: yjs::sync_step2(document.diff(&sv)),
                });
            }
        }
    }

    fn relay_awareness(&self, doc: &DocName, except: Option<&ConnId>, frame: bytes::Bytes) {
        for (conn, subscriber) in &self.yjs_subscribers {
            if &subscriber.doc == doc && except != Some(conn) {
                subscriber.outbox.do_send(DeliverBinary {
                    then_close: false,
                    frame: frame.clone(),
                });
            }
        }
    }

    /// Removes a Yjs connection, and its awareness states for the others.
    fn remove_yjs(&mut self, conn: &ConnId) -> bool {
        let Some(subscriber) = self.yjs_subscribers.remove(conn) else {
            return false;
        };
        if let Some(document) = self.docs.get_mut(&subscriber.doc)
            && !subscriber.awareness_clients.is_empty()
        {
            for client in &subscriber.awareness_clients {
                document.remove_awareness(*client);
            }
            if let Ok(update) = document
                .awareness()
                .update_with_clients(subscriber.awareness_clients.iter().copied())
            {
                self.relay_awareness(&subscriber.doc, None, yjs::awareness(update));
            }
        }
        self.last_activity = Instant::now();
        true
    }

    fn doc_list(&self) -> Vec<DocSummary> {
        self.docs.values().map(Document::summary).collect()
    }

    /// Compacts every document `due` picks (and that has anything to compact).
    fn compact_docs(&mut self, due: impl Fn(&Document) -> bool, ctx: &mut Context<Self>) {
        let due: Vec<_> = self
            .docs
            .values_mut()
            .filter(|d| due(d))
            .filter_map(|d| d.begin_compaction().map(|s| (d.name().clone(), s)))
            .collect();
        let Some(fence) = self.fence.clone() else {
            return;
        };
        for (name, snapshot) in due {
            let store = self.registry.deps().store.clone();
            let (session, fence) = (self.id.clone(), fence.clone());
            ctx.spawn(
                async move {
                    let result = store.compact_doc(&session, &fence, &name, &snapshot).await;
                    (name, snapshot.upto_seq, result)
                }
                .into_actor(self)
                .map(|(name, upto_seq, result), act, ctx| {
                    let stored = match result {
                        Ok(()) => Some(upto_seq),
                        Err(StoreError::Deposed) => return act.deposed(ctx),
                        Err(err) => {
                            tracing::warn!(session = %act.id, doc = %name, %err, "compaction failed; the update log stays");
                            None
                        }
                    };
                    if let Some(document) = act.docs.get_mut(&name) {
                        document.end_compaction(stored);
                    }
                }),
            );
        }
    }

    fn wake_drain_waiters(&mut self) {
        for waiter in self.drain_waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    fn broadcast(&mut self, deliver: Deliver) {
        for subscriber in self.subscribers.values_mut() {
            subscriber.send(deliver.clone());
        }
        telemetry::messages_out(self.subscribers.len());
    }

    // ---- membership -------------------------------------------------------------------------

    fn member_list(&self) -> Vec<UserInfo> {
        self.members
            .iter()
            .map(|m| UserInfo::clone(&m.user))
            .collect()
    }

    /// Counts a joining connection; a user's first connection is logged as `member.joined`.
    fn add_member_conn(&mut self, user: &Arc<UserInfo>, ctx: &mut Context<Self>) {
        if let Some(member) = self.members.iter_mut().find(|m| m.user.id == user.id) {
            member.conns += 1;
            return;
        }
        self.members.push(Member {
            user: Arc::clone(user),
            conns: 1,
        });
        let event = NewEvent::new(EventKind::MemberJoined, user.actor(), &MemberData { user });
        self.enqueue(event, None, ctx);
    }

    /// Removes a connection: its presence goes, and a user's last connection is logged as
    /// `member.left`. Returns whether it was subscribed.
    fn remove_conn(&mut self, conn: &ConnId, ctx: &mut Context<Self>) -> bool {
        let Some(subscriber) = self.subscribers.remove(conn) else {
            return false;
        };
        self.presence_dirty.retain(|c| c != conn);
        if self.presence.remove(conn).is_some() {
            let frame = ServerFrame::Presence {
                session: &self.id,
                conn,
                user: None,
                state: None,
                gone: true,
            }
            .encode();
            self.broadcast(Deliver::new(frame, FrameClass::Presence));
        }
        let user = subscriber.user;
        if let Some(index) = self.members.iter().position(|m| m.user.id == user.id) {
            self.members[index].conns -= 1;
            if self.members[index].conns == 0 {
                self.members.remove(index);
                let event = NewEvent::new(
                    EventKind::MemberLeft,
                    user.actor(),
                    &MemberData { user: &user },
                );
                self.enqueue(event, None, ctx);
            }
        }
        self.last_activity = Instant::now();
        true
    }

    // ---- replay -----------------------------------------------------------------------------

    /// Sends the events after `since` to a subscriber that just joined at offset `upto`.
    fn replay(&mut self, conn: &ConnId, since: u64, ctx: &mut Context<Self>) {
        let upto = self.committed;
        if since >= upto {
            return;
        }
        let tail_covers = self
            .tail
            .front()
            .is_some_and(|first| first.offset <= since + 1);
        if tail_covers {
            let frames = self.event_frames(self.tail.iter().filter(|e| e.offset > since));
            let frames = self.within_replay_budget(frames);
            if let Some(subscriber) = self.subscribers.get_mut(conn) {
                for deliver in frames {
                    subscriber.send(deliver);
                }
            }
            return;
        }
        // Older than the tail: read the gap from the store while live frames wait in a buffer.
        if let Some(subscriber) = self.subscribers.get_mut(conn) {
            subscriber.catching_up = Some(Vec::new());
        }
        let store = self.registry.deps().store.clone();
        let session = self.id.clone();
        let conn = conn.clone();
        ctx.spawn(
            async move {
                let mut events = Vec::new();
                let mut after = since;
                while after < upto {
                    let page = store.events_after(&session, after, REPLAY_PAGE).await?;
                    let Some(last) = page.last() else { break };
                    after = last.offset;
                    events.extend(page.into_iter().filter(|e| e.offset <= upto));
                }
                Ok::<_, StoreError>(events)
            }
            .into_actor(self)
            .map(move |result, act, _ctx| act.finish_replay(&conn, result)),
        );
    }

    fn event_frames<'e>(
        &self,
        events: impl Iterator<Item = &'e Event>,
    ) -> Vec<bytestring::ByteString> {
        events
            .map(|event| {
                ServerFrame::Event {
                    session: &self.id,
                    event,
                }
                .encode()
            })
            .collect()
    }

    /// The replay frames to send, or a single `reset` if they exceed the replay budget: a
    /// client that fell that far behind reloads from its snapshot (and REST) instead.
    fn within_replay_budget(&self, frames: Vec<bytestring::ByteString>) -> Vec<Deliver> {
        let budget = self
            .registry
            .deps()
            .limits
            .outbound_queue_bytes
            .saturating_mul(REPLAY_BUDGET_FACTOR);
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        if bytes > budget {
            tracing::info!(session = %self.id, bytes, budget, "replay exceeds its budget; sending reset");
            let reset = ServerFrame::Reset { session: &self.id }.encode();
            return vec![Deliver::ordered(reset)];
        }
        frames
            .into_iter()
            .map(|frame| Deliver::new(frame, FrameClass::Replay))
            .collect()
    }

    fn finish_replay(&mut self, conn: &ConnId, result: Result<Vec<Event>, StoreError>) {
        let Some(buffered) = self
            .subscribers
            .get_mut(conn)
            .map(|s| s.catching_up.take().unwrap_or_default())
        else {
            return;
        };
        let frames = match result {
            Ok(events) => {
                let frames = self.event_frames(events.iter());
                self.within_replay_budget(frames)
            }
            Err(err) => {
                // The client cannot get the exact gap now, so it is told to rely on its snapshot
                // rather than silently missing events.
                tracing::warn!(session = %self.id, %err, "replay from store failed; sending reset");
                vec![Deliver::ordered(
                    ServerFrame::Reset { session: &self.id }.encode(),
                )]
            }
        };
        if let Some(subscriber) = self.subscribers.get(conn) {
            for deliver in frames.into_iter().chain(buffered) {
                subscriber.outbox.do_send(deliver);
            }
        }
    }

    // ---- presence ---------------------------------------------------------------------------

    /// Broadcasts the latest state of every connection whose presence changed, at most once per
    /// `presence_interval`.
    fn schedule_presence(&mut self, ctx: &mut Context<Self>) {
        if self.presence_timer.is_some() {
            return;
        }
        let interval = self.limits().presence_interval();
        let wait = self
            .last_presence_broadcast
            .map(|last| interval.saturating_sub(last.elapsed()))
            .unwrap_or(Duration::ZERO);
        self.presence_timer = Some(ctx.run_later(wait, |act, _ctx| {
            act.presence_timer = None;
            act.broadcast_presence();
        }));
    }

    fn broadcast_presence(&mut self) {
        self.last_presence_broadcast = Some(Instant::now());
        let dirty = std::mem::take(&mut self.presence_dirty);
        for conn in dirty {
            let (Some(state), Some(subscriber)) =
                (self.presence.get(&conn), self.subscribers.get(&conn))
            else {
                continue;
            };
            let frame = ServerFrame::Presence {
                session: &self.id,
                conn: &conn,
                user: Some(&*subscriber.user),
                state: Some(state),
                gone: false,
            }
            .encode();
            self.broadcast(Deliver::new(frame, FrameClass::Presence));
        }
    }

    fn presence_list(&self) -> Vec<PresenceEntry> {
        self.presence
            .iter()
            .filter_map(|(conn, state)| {
                self.subscribers.get(conn).map(|s| PresenceEntry {
                    conn: conn.to_string(),
                    user: UserInfo::clone(&s.user),
                    state: state.clone(),
                })
            })
            .collect()
    }

    /// Passivates once the session has had no subscribers and no writes for the idle timeout.
    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        let idle = self.subscribers.is_empty()
            && self.relay.as_ref().is_none_or(Relay::is_idle)
            && self.yjs_subscribers.is_empty()
            && self.pending.is_empty()
            && !self.flushing
            && self.last_activity.elapsed() >= self.limits().idle_timeout();
        if idle {
            tracing::debug!(session = %self.id, "passivating idle session");
            self.retire(ctx);
        }
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    /// Loads the session before serving anything: `wait` holds the mailbox until the load is
    /// done. A failed load retires the actor without writing anything, so a store hiccup never
    /// turns into an empty session overwriting real state; the next request starts a new load.
    fn started(&mut self, ctx: &mut Context<Self>) {
        let store = self.registry.deps().store.clone();
        let session = self.id.clone();
        let node = self.registry.deps().node.clone();
        let ttl = self.limits().owner_lease_ttl();
        let tail_len = self.limits().event_tail as u64;
        let bus = self.registry.deps().bus.clone();
        ctx.wait(
            async move {
                // The lease first: only the owner may load, since only it may write.
                let fence = match store.acquire_session(&session, &node, ttl).await? {
                    Ownership::Acquired(fence) => fence,
                    Ownership::HeldBy { node, until } => {
                        // With a Redis bus this node relays the session's clients to the
                        // owner; it listens before any client's command can be forwarded.
                        let out = match bus.kind() {
                            "local" => None,
                            _ => bus.subscribe(&Channel::SessionOut(session)).await.ok(),
                        };
                        return Ok(Err((node, until, out)));
                    }
                };
                let record = store.open_session(&session).await?;
                let from = record.offset.saturating_sub(tail_len);
                let tail = store
                    .events_after(&session, from, u32::try_from(tail_len).unwrap_or(u32::MAX))
                    .await?;
                let docs = store.load_docs(&session).await;
                Ok::<_, StoreError>(Ok((fence, record, tail, docs)))
            }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok(Err((owner, until, out))) => {
                    // Answer what is queued with where the session is, then make way for a
                    // later activation to ask again, unless this node relays the session.
                    act.elsewhere = Some(Refusal::new(
                        ErrorCode::Conflict,
                        format!(
                            "session {} is served by node {owner} (its lease runs until {}); \
                             connect to that node",
                            act.id,
                            until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        ),
                    ));
                    match out {
                        Some(out) => act.become_relay(owner, out, ctx),
                        None => {
                            ctx.run_later(Duration::from_millis(100), |act, ctx| act.retire(ctx));
                        }
                    }
                }
                Ok(Ok((_, record, ..))) if record.archived => {
                    // Stays unloaded: every request gets not_found until the idle check
                    // retires the actor.
                    tracing::debug!(session = %act.id, "refusing to serve an archived session");
                }
                Ok(Ok((fence, record, tail, docs))) => match load_documents(docs) {
                    Ok(docs) => act.on_loaded(ctx, fence, record, tail, docs),
                    Err(err) => {
                        tracing::error!(session = %act.id, %err, "documents failed to load; not serving the session");
                        act.retire(ctx);
                    }
                },
                Err(err) => {
                    tracing::warn!(session = %act.id, %err, "session failed to load; not serving it");
                    act.retire(ctx);
                }
            }),
        );
        let idle = self.limits().idle_timeout();
        let check_every = (idle / 4).max(Duration::from_millis(100));
        ctx.run_interval(check_every, |act, ctx| act.check_idle(ctx));
        // Compaction by time: whatever has accumulated since the last snapshot.
        ctx.run_interval(self.limits().doc_compact_interval(), |act, ctx| {
            act.compact_docs(|_| true, ctx);
        });
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Covers every way out, a panic included, so the registry never points at a dead actor.
        self.registry.retire(&self.id, self.generation);
        for write in self.pending.drain(..) {
            if let Some(reply) = write.reply {
                reply.refuse(Refusal::session_unavailable());
            }
        }
        self.wake_drain_waiters();
    }
}

impl Handler<Join> for SessionActor {
    type Result = Result<(), Refusal>;

    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(relay) = &mut self.relay {
            relay.join(msg);
            return Ok(());
        }
        if !self.loaded {
            return Err(self.unserved());
        }
        let max = self.limits().max_members;
        let is_member = self.members.iter().any(|m| m.user.id == msg.user.id);
        if !is_member && self.members.len() >= max {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("session {} is full: {max} members are present", self.id),
            ));
        }
        if self.doc_writes_settled < self.doc_writes_accepted {
            self.deferred_joins.push((self.doc_writes_accepted, msg));
        } else {
            self.complete_join(msg, ctx);
        }
        Ok(())
    }
}

impl SessionActor {
    /// Subscribes a connection and sends it `joined`, then any replay.
    fn complete_join(&mut self, msg: Join, ctx: &mut Context<Self>) {
        if self.subscribers.contains_key(&msg.conn) {
            // A repeated join answers with a fresh snapshot; membership counts stay right.
            self.remove_conn(&msg.conn, ctx);
        }
        let user = msg.user;
        self.subscribers.insert(
            msg.conn.clone(),
            Subscriber {
                user: Arc::clone(&user),
                outbox: msg.outbox.clone(),
                catching_up: None,
            },
        );
        self.add_member_conn(&user, ctx);
        self.last_activity = Instant::now();

        let joined = self.joined_frame(msg.reference.as_deref());
        msg.outbox.do_send(Deliver::ordered(joined));

        if let Some(since) = msg.since {
            let other_history = msg.epoch.as_deref().is_some_and(|e| e != self.epoch);
            if other_history || since > self.committed {
                let reset = ServerFrame::Reset { session: &self.id }.encode();
                msg.outbox.do_send(Deliver::ordered(reset));
            } else {
                self.replay(&msg.conn, since, ctx);
            }
        }
    }
}

impl Handler<Leave> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        if self.relay.is_some() {
            let conn = msg.conn;
            return self.relay_write(Some(conn.clone()), msg.reply, |relay, reference| {
                relay.leave(conn, reference);
            });
        }
        if self.remove_conn(&msg.conn, ctx) {
            msg.reply.ok(Committed::default());
        } else {
            msg.reply.refuse(not_joined(&self.id));
        }
    }
}

impl Handler<Disconnect> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        if let Some(relay) = &mut self.relay {
            return relay.disconnect(msg.conn);
        }
        self.deferred_joins
            .retain(|(_, join)| join.conn != msg.conn);
        if !self.remove_yjs(&msg.conn) {
            self.remove_conn(&msg.conn, ctx);
        }
    }
}

impl Handler<PostChat> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: PostChat, ctx: &mut Context<Self>) {
        if self.relay.is_some() {
            let (actor, text) = (msg.actor, msg.text);
            return self.relay_write(msg.conn.clone(), msg.reply, |relay, reference| {
                if let Some(conn) = msg.conn {
                    relay.forward(&ToOwner::Chat {
                        conn,
                        actor,
                        text,
                        reference,
                    });
                }
            });
        }
        if let Err(refusal) = self.check_writer(msg.conn.as_ref()) {
            return msg.reply.refuse(refusal);
        }
        if msg.text.is_empty() {
            return msg
                .reply
                .refuse(Refusal::bad_request("chat text must not be empty"));
        }
        let event = NewEvent::new(EventKind::Chat, msg.actor, &ChatData { text: &msg.text });
        self.enqueue(event, Some(msg.reply), ctx);
    }
}

impl Handler<AppendEvent> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: AppendEvent, ctx: &mut Context<Self>) {
        if self.loaded {
            return self.enqueue(msg.event, None, ctx);
        }
        if self.elsewhere.is_none() {
            tracing::warn!(session = %self.id, kind = msg.event.kind.as_str(), "event not logged: the session is not served");
            return;
        }
        // Another node owns the session: the event goes to it over the bus.
        let bus = self.registry.deps().bus.clone();
        let channel = Channel::SessionIn(self.id.clone());
        let command = ToOwner::AppendEvent { event: msg.event }.encode();
        actix::spawn(async move {
            if let Err(err) = bus.publish(&channel, command).await {
                tracing::warn!(%err, "event not forwarded to its session's owner");
            }
        });
    }
}

impl Handler<SetPresence> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: SetPresence, ctx: &mut Context<Self>) {
        if let Some(relay) = &self.relay
            && relay.has_client(&msg.conn)
        {
            return relay.forward(&ToOwner::Presence {
                conn: msg.conn,
                state: msg.state,
            });
        }
        if !self.subscribers.contains_key(&msg.conn) {
            let refusal = not_joined(&self.id);
            msg.outbox.do_send(Deliver::ordered(
                ServerFrame::error(None, &refusal).encode(),
            ));
            return;
        }
        self.presence.insert(msg.conn.clone(), msg.state);
        if !self.presence_dirty.contains(&msg.conn) {
            self.presence_dirty.push(msg.conn);
        }
        self.schedule_presence(ctx);
    }
}

impl Handler<Inspect> for SessionActor {
    type Result = MessageResult<Inspect>;

    fn handle(&mut self, _: Inspect, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(LiveView {
            members: self.member_list(),
            docs: self.doc_list(),
        })
    }
}

impl Handler<Drain> for SessionActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
        self.apply_yjs_backlog(ctx);
        self.flush(ctx);
        if !self.flushing && self.pending.is_empty() {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Archive> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Archive, ctx: &mut Context<Self>) {
        let frame = ServerFrame::Archived { session: &self.id }.encode();
        self.broadcast(Deliver {
            ends_membership: Some(self.id.clone()),
            ..Deliver::ordered(frame)
        });
        self.subscribers.clear();
        self.flush(ctx);
        self.retire(ctx);
    }
}

impl Handler<Edit> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Edit, ctx: &mut Context<Self>) {
        if self.relay.is_some() {
            let Edit {
                conn,
                actor,
                doc,
                base,
                ops,
                reply,
            } = msg;
            return self.relay_write(conn.clone(), reply, |relay, reference| {
                if let Some(conn) = conn {
                    relay.forward(&ToOwner::Edit {
                        conn,
                        actor,
                        doc,
                        base,
                        ops,
                        reference,
                    });
                }
            });
        }
        if let Err(refusal) = self.check_writer(msg.conn.as_ref()) {
            return msg.reply.refuse(refusal);
        }
        let document = self
            .docs
            .entry(msg.doc.clone())
            .or_insert_with(|| Document::new(msg.doc.clone()));
        let max_units = self.registry.deps().limits.max_doc_units;
        let applied = match document.edit(msg.base, msg.ops, max_units) {
            Ok(applied) => applied,
            Err(refusal) => return msg.reply.refuse(refusal),
        };
        let version = applied.as_ref().map_or(document.version(), |a| a.version);
        let change = match applied {
            Some(applied) => PendingDocChange {
                doc: msg.doc,
                version,
                op: Some(applied.op),
                update_committed: true,
                yjs_update: Some(YjsBroadcast {
                    update: applied.update.data.clone(),
                    author: msg.conn.clone(),
                }),
                update: Some(applied.update),
                actor: msg.actor,
                origin: msg.conn,
            },
            None => PendingDocChange {
                doc: msg.doc,
                version,
                op: None,
                update_committed: false,
                yjs_update: None,
                update: None,
                actor: msg.actor,
                origin: msg.conn,
            },
        };
        self.enqueue_write(
            PendingWrite {
                event: None,
                doc: Some(change),
                reply: Some(msg.reply),
            },
            ctx,
        );
    }
}

impl Handler<YjsAttach> for SessionActor {
    type Result = Result<(), Refusal>;

    fn handle(&mut self, msg: YjsAttach, _ctx: &mut Context<Self>) -> Self::Result {
        if let Some(relay) = &mut self.relay {
            relay.attach_yjs(msg);
            return Ok(());
        }
        if !self.loaded {
            return Err(self.unserved());
        }
        let document = self
            .docs
            .entry(msg.doc.clone())
            .or_insert_with(|| Document::new(msg.doc.clone()));
        msg.outbox.do_send(DeliverBinary {
            then_close: false,
            frame: yjs::sync_step1(document.state_vector()),
        });
        if let Ok(states) = document.awareness().update()
            && !states.clients.is_empty()
        {
            msg.outbox.do_send(DeliverBinary {
                then_close: false,
                frame: yjs::awareness(states),
            });
        }
        self.yjs_subscribers.insert(
            msg.conn,
            YjsSubscriber {
                user: msg.user,
                doc: msg.doc,
                outbox: msg.outbox,
                awaiting_sync: None,
                awareness_clients: Vec::new(),
            },
        );
        self.last_activity = Instant::now();
        Ok(())
    }
}

impl Handler<YjsSyncStep1> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: YjsSyncStep1, _ctx: &mut Context<Self>) {
        if let Some(relay) = &self.relay {
            return relay.forward(&ToOwner::YjsSyncStep1 {
                conn: msg.conn,
                state_vector: msg.state_vector.encode_v1(),
            });
        }
        if let Some(subscriber) = self.yjs_subscribers.get_mut(&msg.conn) {
            subscriber.awaiting_sync = Some(msg.state_vector);
        }
        self.answer_yjs_syncs();
    }
}

impl Handler<YjsUpdate> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: YjsUpdate, ctx: &mut Context<Self>) {
        if let Some(relay) = &self.relay {
            return relay.forward(&ToOwner::YjsUpdate {
                conn: msg.conn,
                data: msg.data,
            });
        }
        let Some(subscriber) = self.yjs_subscribers.get(&msg.conn) else {
            return;
        };
        if !subscriber.user.role.may_write() {
            subscriber.outbox.do_send(DeliverBinary {
                then_close: false,
                frame: yjs::permission_denied(),
            });
            return;
        }
        if self.yjs_backlog.is_empty() {
            match self
                .yjs_not_before
                .map(|t| t.saturating_duration_since(Instant::now()))
            {
                Some(wait) if !wait.is_zero() => {
                    ctx.notify_later(ApplyYjsBacklog, wait);
                }
                _ => ctx.notify(ApplyYjsBacklog),
            }
        }
        self.yjs_backlog.push(QueuedYjsUpdate {
            doc: subscriber.doc.clone(),
            actor: subscriber.user.actor(),
            conn: msg.conn,
            data: msg.data,
        });
    }
}

impl Handler<ApplyYjsBacklog> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: ApplyYjsBacklog, ctx: &mut Context<Self>) {
        self.apply_yjs_backlog(ctx);
    }
}

impl SessionActor {
    /// Applies the queued Yjs updates and queues their writes, in arrival order per document.
    /// With no JSON subscriber, each document's consecutive share is one group (one version,
    /// one walk of the text: `Document::apply_yjs_updates`). A JSON subscriber gets a `doc`
    /// frame per change, naming its author, so then each update is a group of its own.
    fn apply_yjs_backlog(&mut self, ctx: &mut Context<Self>) {
        if self.yjs_backlog.is_empty() {
            return;
        }
        let mut applying = Duration::ZERO;
        let backlog = std::mem::take(&mut self.yjs_backlog);
        let grouped = self.subscribers.is_empty();
        let max_units = self.registry.deps().limits.max_doc_units;
        let mut rest = backlog.into_iter().peekable();
        while let Some(first) = rest.next() {
            let doc = first.doc.clone();
            let mut group = vec![first];
            while grouped && rest.peek().is_some_and(|next| next.doc == doc) {
                group.extend(rest.next());
            }
            let Some(document) = self.docs.get_mut(&doc) else {
                continue;
            };
            let (authors, data): (Vec<_>, Vec<_>) = group
                .into_iter()
                .map(|q| ((q.actor, q.conn), q.data))
                .unzip();
            let started = Instant::now();
            let group = document.apply_yjs_updates(data, max_units);
            applying += started.elapsed();
            let mut writers = Vec::with_capacity(group.results.len());
            for ((actor, conn), result) in authors.into_iter().zip(group.results) {
                match result {
                    Ok(()) => writers.push((actor, conn)),
                    Err(refusal) => {
                        telemetry::error(refusal.code);
                        tracing::debug!(session = %self.id, doc = %doc, "{}", refusal.message);
                    }
                }
            }
            let mut writers = writers.into_iter();
            let (Some(applied), Some((actor, conn))) = (group.applied, writers.next()) else {
                continue;
            };
            // The change is attributed to the first writer; the one connection that wrote
            // all of it is not sent it back.
            let one_author = writers
                .all(|(_, other)| other == conn)
                .then(|| conn.clone());
            self.enqueue_write(
                PendingWrite {
                    event: None,
                    doc: Some(PendingDocChange {
                        doc: doc.clone(),
                        version: applied.version,
                        op: applied.op,
                        update_committed: true,
                        yjs_update: Some(YjsBroadcast {
                            update: applied.update.data.clone(),
                            author: one_author,
                        }),
                        update: Some(applied.update),
                        actor,
                        origin: Some(conn),
                    }),
                    reply: None,
                },
                ctx,
            );
        }
        self.yjs_not_before = Some(Instant::now() + applying * YJS_PACING);
    }
}

impl Handler<YjsAwareness> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: YjsAwareness, _ctx: &mut Context<Self>) {
        if let Some(relay) = &self.relay {
            return relay.forward(&ToOwner::YjsAwareness {
                conn: msg.conn,
                update: msg.update.encode_v1(),
            });
        }
        let Some(subscriber) = self.yjs_subscribers.get_mut(&msg.conn) else {
            return;
        };
        for client in msg.update.clients.keys() {
            if !subscriber.awareness_clients.contains(client) {
                subscriber.awareness_clients.push(*client);
            }
        }
        let doc = subscriber.doc.clone();
        if let Some(document) = self.docs.get_mut(&doc)
            && let Err(err) = document.apply_awareness(msg.update.clone())
        {
            tracing::debug!(session = %self.id, %err, "awareness update refused");
            return;
        }
        self.relay_awareness(&doc, Some(&msg.conn), yjs::awareness(msg.update));
    }
}

impl Handler<YjsAwarenessQuery> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: YjsAwarenessQuery, _ctx: &mut Context<Self>) {
        if let Some(relay) = &self.relay {
            return relay.forward(&ToOwner::YjsAwarenessQuery { conn: msg.conn });
        }
        let Some(subscriber) = self.yjs_subscribers.get(&msg.conn) else {
            return;
        };
        if let Some(document) = self.docs.get(&subscriber.doc)
            && let Ok(states) = document.awareness().update()
        {
            subscriber.outbox.do_send(DeliverBinary {
                then_close: false,
                frame: yjs::awareness(states),
            });
        }
    }
}

impl Handler<ReadDoc> for SessionActor {
    type Result = Result<DocSummary, Refusal>;

    fn handle(&mut self, msg: ReadDoc, _ctx: &mut Context<Self>) -> Self::Result {
        if !self.loaded {
            return Err(self.unserved());
        }
        Ok(self.docs.get(&msg.doc).map_or_else(
            || DocSummary {
                name: msg.doc.to_string(),
                version: 0,
                text: String::new(),
            },
            Document::summary,
        ))
    }
}

/// Rebuilds every stored document; one that fails fails the whole load.
fn load_documents(
    stored: Result<Vec<StoredDoc>, StoreError>,
) -> Result<BTreeMap<DocName, Document>, String> {
    let stored = stored.map_err(|e| e.to_string())?;
    stored
        .into_iter()
        .map(|doc| {
            let name = doc.name.clone();
            Document::load(doc)
                .map(|d| (name, d))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// The supervision hook: an actor dropped without retiring crashed (a panic unwinds through
/// here too), so its connections are handed to a restarted successor.
impl Drop for SessionActor {
    fn drop(&mut self) {
        if self.retiring {
            return;
        }
        let survivors = Reattach {
            conns: self
                .subscribers
                .drain()
                .map(|(conn, s)| (conn, s.user, s.outbox))
                .collect(),
            yjs: self
                .yjs_subscribers
                .drain()
                .map(|(conn, s)| (conn, s.user, s.doc, s.outbox))
                .collect(),
        };
        self.registry
            .restart_crashed(self.id.clone(), self.generation, survivors);
    }
}

/// A command from another node, for this session's owner.
impl StreamHandler<FromOtherNode> for SessionActor {
    fn handle(&mut self, FromOtherNode(payload): FromOtherNode, ctx: &mut Context<Self>) {
        if let Some(command) = decode_to_owner(&payload) {
            self.on_command_from_other_node(command, ctx);
        }
    }

    /// The bus subscription ends only with the actor; nothing to do.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl StreamHandler<FromOwner> for SessionActor {
    fn handle(&mut self, FromOwner(payload): FromOwner, _ctx: &mut Context<Self>) {
        if let (Some(relay), Some(frame)) = (&mut self.relay, decode::<RelayFrame>(&payload)) {
            relay.deliver(frame);
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

// ---- the cluster: relaying to another node's session, and serving other nodes' clients ------

impl SessionActor {
    /// Another node owns the session: this actor relays its clients there ([`Relay`]).
    fn become_relay(&mut self, owner: String, out: Subscription, ctx: &mut Context<Self>) {
        let deps = self.registry.deps();
        tracing::debug!(session = %self.id, %owner, "relaying the session's clients to its owner");
        self.relay = Some(Relay::new(
            self.id.clone(),
            deps.node.clone(),
            owner,
            deps.bus.clone(),
        ));
        ctx.add_stream(futures_util::StreamExt::map(out.into_stream(), FromOwner));
        let every = self.limits().owner_lease_ttl() / 3;
        ctx.run_interval(every, |act, ctx| act.relay_tick(ctx));
    }

    /// A relay's heartbeat ([`Relay::tick`]), and its check that the owner still holds the
    /// lease. When another node holds it, or nobody does, the relay sends its clients back to
    /// join again, wherever the session now lives, and stops.
    fn relay_tick(&mut self, ctx: &mut Context<Self>) {
        let Some(relay) = &mut self.relay else {
            return;
        };
        relay.tick();
        let owner = relay.owner().to_owned();
        let deps = self.registry.deps();
        let (store, session, node) = (deps.store.clone(), self.id.clone(), deps.node.clone());
        let ttl = self.limits().owner_lease_ttl();
        async move { store.acquire_session(&session, &node, ttl).await }
            .into_actor(self)
            .map(move |probe, act, ctx| {
                let why = match probe {
                    Ok(Ownership::HeldBy { node, .. }) if node == owner => return,
                    Ok(Ownership::HeldBy { node, .. }) => {
                        format!("it moved from node {owner} to node {node}")
                    }
                    Ok(Ownership::Acquired(fence)) => {
                        // Taken only to learn that the owner is gone: the first client to join
                        // again takes it for real, and loads the session.
                        let store = act.registry.deps().store.clone();
                        let session = act.id.clone();
                        actix::spawn(async move {
                            let _ = store.release_session(&session, &fence).await;
                        });
                        format!("its owner, node {owner}, is gone")
                    }
                    Err(err) => {
                        tracing::debug!(session = %act.id, %err, "relay could not check the owner's lease");
                        return;
                    }
                };
                if let Some(relay) = &mut act.relay {
                    relay.end_all(&why);
                }
                act.retire(ctx);
            })
            .spawn(ctx);
    }

    /// In relay mode: a socket client's request goes to the owner with its `ref` (`forward`),
    /// and the owner's answer comes back on the out channel. A REST request is refused with
    /// where the session lives: REST is served by the owner.
    fn relay_write(
        &mut self,
        conn: Option<ConnId>,
        reply: Reply,
        forward: impl FnOnce(&mut Relay, Option<String>),
    ) {
        match (conn, reply.into_reference()) {
            (Some(_), Ok(reference)) => {
                if let Some(relay) = &mut self.relay {
                    forward(relay, reference);
                }
            }
            (_, Err(reply)) => reply.refuse(self.unserved()),
            (None, Ok(_)) => {}
        }
    }

    /// As the owner: a command from another node. A relay's client is served like a local one,
    /// its frames going to its [`RemoteClients`] outbox.
    fn on_command_from_other_node(&mut self, command: ToOwner, ctx: &mut Context<Self>) {
        if self.fence.is_none() {
            tracing::warn!(session = %self.id, "a command for a session this node no longer owns was dropped");
            return;
        }
        match command {
            ToOwner::AppendEvent { event } => self.enqueue(event, None, ctx),
            ToOwner::Join {
                node,
                conn,
                user,
                reference,
                since,
                epoch,
            } => {
                let outbox = self.remote.outbox(Some(&node), &conn);
                let join = Join {
                    conn: conn.clone(),
                    user: Arc::new(user),
                    outbox: outbox.clone(),
                    reference: reference.clone(),
                    since,
                    epoch,
                };
                if let Err(refusal) = Handler::<Join>::handle(self, join, ctx) {
                    let error = ServerFrame::error(reference.as_deref(), &refusal).encode();
                    outbox.do_send(Deliver {
                        ends_membership: Some(self.id.clone()),
                        ..Deliver::ordered(error)
                    });
                    self.remote.forget(&conn);
                }
            }
            ToOwner::Chat {
                conn,
                actor,
                text,
                reference,
            } => {
                let reply = self.remote.reply(&conn, reference);
                let chat = PostChat {
                    conn: Some(conn),
                    actor,
                    text,
                    reply,
                };
                Handler::<PostChat>::handle(self, chat, ctx);
            }
            ToOwner::Edit {
                conn,
                actor,
                doc,
                base,
                ops,
                reference,
            } => {
                let reply = self.remote.reply(&conn, reference);
                let edit = Edit {
                    conn: Some(conn),
                    actor,
                    doc,
                    base,
                    ops,
                    reply,
                };
                Handler::<Edit>::handle(self, edit, ctx);
            }
            ToOwner::Presence { conn, state } => {
                let outbox = self.remote.outbox(None, &conn);
                Handler::<SetPresence>::handle(
                    self,
                    SetPresence {
                        conn,
                        state,
                        outbox,
                    },
                    ctx,
                );
            }
            ToOwner::Leave { conn, reference } => {
                let reply = self.remote.reply(&conn, reference);
                self.remote.forget(&conn);
                Handler::<Leave>::handle(self, Leave { conn, reply }, ctx);
            }
            ToOwner::Disconnect { conn } => self.drop_remote(conn, ctx),
            ToOwner::Keepalive { node, conns } => {
                for conn in self.remote.keepalive(&node, &conns) {
                    self.drop_remote(conn, ctx);
                }
            }
            ToOwner::YjsAttach {
                node,
                conn,
                user,
                doc,
            } => {
                let outbox = self.remote.binary_outbox(Some(&node), &conn);
                let attach = YjsAttach {
                    conn: conn.clone(),
                    user: Arc::new(user),
                    doc,
                    outbox: outbox.clone(),
                };
                if Handler::<YjsAttach>::handle(self, attach, ctx).is_err() {
                    outbox.do_send(DeliverBinary {
                        frame: bytes::Bytes::new(),
                        then_close: true,
                    });
                    self.remote.forget(&conn);
                }
            }
            ToOwner::YjsSyncStep1 { conn, state_vector } => {
                match yrs::StateVector::decode_v1(&state_vector) {
                    Ok(state_vector) => {
                        let step = YjsSyncStep1 { conn, state_vector };
                        Handler::<YjsSyncStep1>::handle(self, step, ctx);
                    }
                    Err(err) => tracing::warn!(%err, "a relayed state vector did not decode"),
                }
            }
            ToOwner::YjsUpdate { conn, data } => {
                Handler::<YjsUpdate>::handle(self, YjsUpdate { conn, data }, ctx);
            }
            ToOwner::YjsAwareness { conn, update } => {
                match yrs::sync::awareness::AwarenessUpdate::decode_v1(&update) {
                    Ok(update) => {
                        let update = YjsAwareness { conn, update };
                        Handler::<YjsAwareness>::handle(self, update, ctx);
                    }
                    Err(err) => tracing::warn!(%err, "a relayed awareness update did not decode"),
                }
            }
            ToOwner::YjsAwarenessQuery { conn } => {
                Handler::<YjsAwarenessQuery>::handle(self, YjsAwarenessQuery { conn }, ctx);
            }
        }
    }

    /// A remote client is gone (its socket closed, or its relay's node is silent).
    fn drop_remote(&mut self, conn: ConnId, ctx: &mut Context<Self>) {
        self.remote.forget(&conn);
        Handler::<Disconnect>::handle(self, Disconnect { conn }, ctx);
    }

    /// As the owner, every third of the lease TTL: forgets the clients of relays whose node has
    /// not been heard from for a whole TTL (it crashed, or lost the bus).
    fn forget_silent_relays(&mut self, ctx: &mut Context<Self>) {
        for conn in self.remote.silent(self.limits().owner_lease_ttl()) {
            tracing::info!(session = %self.id, %conn, "forgetting a client whose relay is silent");
            self.drop_remote(conn, ctx);
        }
    }
}

impl Handler<LeasesRenewed> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: LeasesRenewed, ctx: &mut Context<Self>) {
        let Some(fence) = &self.fence else {
            return;
        };
        if msg.as_of > self.fenced_at && msg.held.get(&self.id) != Some(&fence.epoch) {
            self.deposed(ctx);
        }
    }
}

impl Handler<Reattach> for SessionActor {
    type Result = ();

    /// Takes over the connections of a crashed predecessor: each gets a `reset` and a fresh
    /// snapshot, so no client keeps a state the server no longer has.
    fn handle(&mut self, msg: Reattach, ctx: &mut Context<Self>) {
        if !self.loaded {
            let refusal = Refusal::session_unavailable();
            let error = ServerFrame::error(None, &refusal).encode();
            for (_, _, outbox) in msg.conns {
                outbox.do_send(Deliver {
                    ends_membership: Some(self.id.clone()),
                    ..Deliver::ordered(error.clone())
                });
            }
            return;
        }
        let reset = ServerFrame::Reset { session: &self.id }.encode();
        for (conn, user, outbox) in msg.conns {
            if !self.members.iter().any(|m| m.user.id == user.id) {
                // Present before the crash: no new member.joined event.
                self.members.push(Member {
                    user: Arc::clone(&user),
                    conns: 0,
                });
            }
            if let Some(member) = self.members.iter_mut().find(|m| m.user.id == user.id) {
                member.conns += 1;
            }
            self.subscribers.insert(
                conn,
                Subscriber {
                    user,
                    outbox: outbox.clone(),
                    catching_up: None,
                },
            );
            outbox.do_send(Deliver::ordered(reset.clone()));
        }
        let joined = self.joined_frame(None);
        for subscriber in self.subscribers.values() {
            subscriber.outbox.do_send(Deliver::ordered(joined.clone()));
        }
        for (conn, user, doc, outbox) in msg.yjs {
            let document = self
                .docs
                .entry(doc.clone())
                .or_insert_with(|| Document::new(doc.clone()));
            // The client resends what the server lost when it answers this sync step 1.
            outbox.do_send(DeliverBinary {
                then_close: false,
                frame: yjs::sync_step1(document.state_vector()),
            });
            self.yjs_subscribers.insert(
                conn,
                YjsSubscriber {
                    user,
                    doc,
                    outbox,
                    awaiting_sync: None,
                    awareness_clients: Vec::new(),
                },
            );
        }
        self.last_activity = Instant::now();
        let _ = ctx;
    }
}

#[cfg(feature = "fault-injection")]
impl Handler<super::messages::InjectPanic> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: super::messages::InjectPanic, _ctx: &mut Context<Self>) {
        panic!("injected panic in session {}", self.id);
    }
}

impl SessionActor {
    /// A write needs a loaded session and, from a socket, a connection that joined it.
    fn check_writer(&self, conn: Option<&ConnId>) -> Result<(), Refusal> {
        if !self.loaded {
            return Err(self.unserved());
        }
        match conn {
            Some(conn) if !self.subscribers.contains_key(conn) => Err(not_joined(&self.id)),
            _ => Ok(()),
        }
    }
}

fn not_joined(session: &SessionId) -> Refusal {
    Refusal::new(
        ErrorCode::BadRequest,
        format!("join session {session} before sending to it"),
    )
}
