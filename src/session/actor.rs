//! `SessionActor`: the single owner of one live session's members, presence, subscribers and
//! event log tail.
//!
//! Every change to a session passes through this actor's mailbox, so the actor alone decides the
//! order of events. Writes wait in a batch and are committed together (group commit): a batch is
//! flushed when it reaches `commit_batch` writes or `commit_window` after its first write, and
//! only one batch is in flight at a time. Offsets are given at flush time, counting on from the
//! last committed offset, so a batch that fails to commit leaves no gap: its requests get
//! `storage_unavailable` and the next batch reuses the same offsets. Acks and broadcasts go out
//! only after the commit, so no client ever sees a change a crash could take back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::log::{ChatData, Event, EventKind, MemberData, NewEvent};
use super::messages::{
    Archive, Committed, ConnId, Deliver, Disconnect, Drain, FrameClass, Inspect, Join, Leave,
    LiveView, PostChat, Reply, SetPresence,
};
use super::registry::SessionRegistry;
use crate::protocol::frames::{PresenceEntry, ServerFrame};
use crate::protocol::{ErrorCode, Refusal, SessionId, UserInfo};
use crate::store::{SessionRecord, StoreError};
use crate::telemetry;

/// Events fetched from the store per page when replaying beyond the in-memory tail.
const REPLAY_PAGE: u32 = 1000;

/// A write accepted but not yet committed.
struct PendingWrite {
    event: NewEvent,
    reply: Option<Reply>,
}

/// One subscribed connection.
struct Subscriber {
    user: UserInfo,
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

/// A user present in the session, with how many of their connections have joined.
struct Member {
    user: UserInfo,
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
    subscribers: HashMap<ConnId, Subscriber>,
    /// Members in the order they joined.
    members: Vec<Member>,
    presence: HashMap<ConnId, Box<RawValue>>,
    /// Connections whose presence changed since the last broadcast, in order of change.
    presence_dirty: Vec<ConnId>,
    presence_timer: Option<SpawnHandle>,
    last_presence_broadcast: Option<Instant>,
    pending: Vec<PendingWrite>,
    flush_timer: Option<SpawnHandle>,
    flushing: bool,
    drain_waiters: Vec<oneshot::Sender<()>>,
    last_activity: Instant,
}

impl SessionActor {
    pub(super) fn new(id: SessionId, generation: u64, registry: Arc<SessionRegistry>) -> Self {
        Self {
            id,
            generation,
            registry,
            loaded: false,
            epoch: String::new(),
            committed: 0,
            tail: VecDeque::new(),
            subscribers: HashMap::new(),
            members: Vec::new(),
            presence: HashMap::new(),
            presence_dirty: Vec::new(),
            presence_timer: None,
            last_presence_broadcast: None,
            pending: Vec::new(),
            flush_timer: None,
            flushing: false,
            drain_waiters: Vec::new(),
            last_activity: Instant::now(),
        }
    }

    fn limits(&self) -> &crate::config::Limits {
        &self.registry.deps().limits
    }

    /// Leaves the registry and stops. Messages still queued fail at their senders, who report
    /// the session as unavailable; nothing was applied for them.
    fn retire(&mut self, ctx: &mut Context<Self>) {
        self.registry.retire(&self.id, self.generation);
        ctx.stop();
    }

    fn on_loaded(&mut self, record: SessionRecord, tail: Vec<Event>) {
        self.epoch = record.epoch;
        self.committed = record.offset;
        self.tail = tail.into();
        self.loaded = true;
    }

    // ---- the write path -------------------------------------------------------------------

    /// Accepts a write into the current batch and arranges for the batch to be flushed.
    fn enqueue(&mut self, event: NewEvent, reply: Option<Reply>, ctx: &mut Context<Self>) {
        self.pending.push(PendingWrite { event, reply });
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
        if let Some(timer) = self.flush_timer.take() {
            ctx.cancel_future(timer);
        }
        let take = self.pending.len().min(self.limits().commit_batch);
        let batch: Vec<PendingWrite> = self.pending.drain(..take).collect();
        let mut replies = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for (i, write) in batch.into_iter().enumerate() {
            events.push(write.event.at_offset(self.committed + 1 + i as u64));
            replies.push(write.reply);
        }
        self.flushing = true;
        let store = self.registry.deps().store.clone();
        let session = self.id.clone();
        let started = Instant::now();
        let backend = store.backend();
        ctx.spawn(
            async move {
                let result = store.append_events(&session, &events).await;
                (result, events)
            }
            .into_actor(self)
            .map(move |(result, events), act, ctx| {
                telemetry::commit_latency(backend, started.elapsed(), events.len());
                act.flushing = false;
                act.on_commit(result, events, replies);
                if act.pending.is_empty() {
                    act.wake_drain_waiters();
                } else {
                    act.flush(ctx);
                }
            }),
        );
    }

    fn on_commit(
        &mut self,
        result: Result<(), StoreError>,
        events: Vec<Event>,
        replies: Vec<Option<Reply>>,
    ) {
        if let Err(err) = result {
            tracing::warn!(session = %self.id, %err, count = events.len(), "commit failed; nothing acked");
            for reply in replies.into_iter().flatten() {
                reply.refuse(Refusal::storage_unavailable());
            }
            return;
        }
        for (event, reply) in events.into_iter().zip(replies) {
            self.committed = event.offset;
            if let Some(reply) = reply {
                reply.ok(Committed {
                    offset: Some(event.offset),
                });
            }
            let frame = ServerFrame::Event {
                session: &self.id,
                event: &event,
            }
            .encode();
            self.broadcast(Deliver::ordered(frame));
            self.tail.push_back(event);
            if self.tail.len() > self.limits().event_tail {
                self.tail.pop_front();
            }
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
        self.members.iter().map(|m| m.user.clone()).collect()
    }

    /// Counts a joining connection; a user's first connection is logged as `member.joined`.
    fn add_member_conn(&mut self, user: &UserInfo, ctx: &mut Context<Self>) {
        if let Some(member) = self.members.iter_mut().find(|m| m.user.id == user.id) {
            member.conns += 1;
            return;
        }
        self.members.push(Member {
            user: user.clone(),
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
            self.broadcast(Deliver {
                frame,
                class: FrameClass::Presence,
            });
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
            let frames: Vec<_> = self
                .tail
                .iter()
                .filter(|e| e.offset > since)
                .map(|event| {
                    ServerFrame::Event {
                        session: &self.id,
                        event,
                    }
                    .encode()
                })
                .collect();
            if let Some(subscriber) = self.subscribers.get_mut(conn) {
                for frame in frames {
                    subscriber.send(Deliver::ordered(frame));
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

    fn finish_replay(&mut self, conn: &ConnId, result: Result<Vec<Event>, StoreError>) {
        let Some(subscriber) = self.subscribers.get_mut(conn) else {
            return;
        };
        let buffered = subscriber.catching_up.take().unwrap_or_default();
        match result {
            Ok(events) => {
                for event in &events {
                    let frame = ServerFrame::Event {
                        session: &self.id,
                        event,
                    }
                    .encode();
                    subscriber.outbox.do_send(Deliver::ordered(frame));
                }
            }
            Err(err) => {
                // The client cannot get the exact gap now, so it is told to rely on its snapshot
                // rather than silently missing events.
                tracing::warn!(session = %self.id, %err, "replay from store failed; sending reset");
                let frame = ServerFrame::Reset { session: &self.id }.encode();
                subscriber.outbox.do_send(Deliver::ordered(frame));
            }
        }
        for deliver in buffered {
            subscriber.outbox.do_send(deliver);
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
                user: Some(&subscriber.user),
                state: Some(state),
                gone: false,
            }
            .encode();
            self.broadcast(Deliver {
                frame,
                class: FrameClass::Presence,
            });
        }
    }

    fn presence_list(&self) -> Vec<PresenceEntry> {
        self.presence
            .iter()
            .filter_map(|(conn, state)| {
                self.subscribers.get(conn).map(|s| PresenceEntry {
                    conn: conn.to_string(),
                    user: s.user.clone(),
                    state: state.clone(),
                })
            })
            .collect()
    }

    /// Passivates once the session has had no subscribers and no writes for the idle timeout.
    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        let idle = self.subscribers.is_empty()
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
        let tail_len = self.limits().event_tail as u64;
        ctx.wait(
            async move {
                let record = store.open_session(&session).await?;
                let from = record.offset.saturating_sub(tail_len);
                let tail = store
                    .events_after(&session, from, u32::try_from(tail_len).unwrap_or(u32::MAX))
                    .await?;
                Ok::<_, StoreError>((record, tail))
            }
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok((record, _)) if record.archived => {
                    // Stays unloaded: every request gets not_found until the idle check
                    // retires the actor.
                    tracing::debug!(session = %act.id, "refusing to serve an archived session");
                }
                Ok((record, tail)) => act.on_loaded(record, tail),
                Err(err) => {
                    tracing::warn!(session = %act.id, %err, "session failed to load; not serving it");
                    act.retire(ctx);
                }
            }),
        );
        let idle = self.limits().idle_timeout();
        let check_every = (idle / 4).max(Duration::from_millis(100));
        ctx.run_interval(check_every, |act, ctx| act.check_idle(ctx));
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
        if !self.loaded {
            return Err(Refusal::not_found(format!(
                "session {} does not exist or was archived",
                self.id
            )));
        }
        if self.subscribers.contains_key(&msg.conn) {
            // A repeated join answers with a fresh snapshot; membership counts stay right.
            self.remove_conn(&msg.conn, ctx);
        }
        self.subscribers.insert(
            msg.conn.clone(),
            Subscriber {
                user: msg.user.clone(),
                outbox: msg.outbox.clone(),
                catching_up: None,
            },
        );
        self.add_member_conn(&msg.user, ctx);
        self.last_activity = Instant::now();

        let members = self.member_list();
        let presence = self.presence_list();
        let joined = ServerFrame::Joined {
            reference: msg.reference.as_deref(),
            session: &self.id,
            offset: self.committed,
            epoch: &self.epoch,
            members: &members,
            presence: &presence,
            docs: &[],
        }
        .encode();
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
        Ok(())
    }
}

impl Handler<Leave> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        if self.remove_conn(&msg.conn, ctx) {
            msg.reply.ok(Committed { offset: None });
        } else {
            msg.reply.refuse(not_joined(&self.id));
        }
    }
}

impl Handler<Disconnect> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        self.remove_conn(&msg.conn, ctx);
    }
}

impl Handler<PostChat> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: PostChat, ctx: &mut Context<Self>) {
        if !self.loaded {
            return msg.reply.refuse(Refusal::not_found(format!(
                "session {} does not exist",
                self.id
            )));
        }
        if let Some(conn) = &msg.conn
            && !self.subscribers.contains_key(conn)
        {
            return msg.reply.refuse(not_joined(&self.id));
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

impl Handler<SetPresence> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: SetPresence, ctx: &mut Context<Self>) {
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
            docs: Vec::new(),
        })
    }
}

impl Handler<Drain> for SessionActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Context<Self>) -> Self::Result {
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
        self.broadcast(Deliver::ordered(frame));
        self.subscribers.clear();
        self.flush(ctx);
        self.retire(ctx);
    }
}

fn not_joined(session: &SessionId) -> Refusal {
    Refusal::new(
        ErrorCode::BadRequest,
        format!("join session {session} before sending to it"),
    )
}
