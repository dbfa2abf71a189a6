//! `ClientConn`: one actor per user socket on `/v1/ws`.
//!
//! It runs on the HTTP worker's arbiter, where actix-ws's `!Send` message stream must be consumed,
//! and owns the socket, the outbound queue and the set of sessions it joined. Frames are parsed
//! into typed commands here, at the edge; sessions only ever see valid requests. A malformed
//! frame gets an `error` and the socket stays open.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::socket::{CloseCode, ProtocolError, Received};
use actix::WeakAddr;
use actix::prelude::*;
use bytestring::ByteString;

use super::guard::{FrameGuard, Inbound, Verdict, classify};
use super::keepalive::{self, Beat};
use super::outbound::{Outbound, Pushed};
use crate::auth::Principal;
use crate::node::Node;
use crate::protocol::frames::ServerFrame;
use crate::protocol::{Command, ErrorCode, Refusal, SessionId, parse_request};
use crate::session::{
    ConnId, Deliver, Disconnect, Edit, FrameClass, Join, Leave, PostChat, Reply, SessionActor,
    SetPresence, Unanswered,
};
use crate::telemetry;

/// Requests a connection may have waiting for their sessions before it stops reading.
const MAX_UNANSWERED: usize = 16;

/// What an `ack` to a task or council request names.
enum Answer {
    Task(crate::protocol::TaskId),
    Council(crate::protocol::CouncilId),
}

/// The sessions a connection joined, with the actor serving each when it joined. A list, not a
/// map: most connections join one session, and a map's smallest table costs an idle socket
/// several times one entry (`max_sessions_per_conn` bounds the scans). Weak addresses: a
/// strong one allocates its own sender state, and the registry's address is preferred anyway.
#[derive(Default)]
struct JoinedSessions(Vec<(SessionId, WeakAddr<SessionActor>)>);

impl JoinedSessions {
    fn get(&self, session: &SessionId) -> Option<&WeakAddr<SessionActor>> {
        self.0
            .iter()
            .find(|(s, _)| s == session)
            .map(|(_, addr)| addr)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn insert(&mut self, session: SessionId, addr: WeakAddr<SessionActor>) {
        match self.0.iter_mut().find(|(s, _)| *s == session) {
            Some((_, known)) => *known = addr,
            None => {
                // Grown one at a time: a Vec's first growth makes room for four.
                self.0.reserve_exact(1);
                self.0.push((session, addr));
            }
        }
    }

    fn remove(&mut self, session: &SessionId) {
        self.0.retain(|(s, _)| s != session);
    }

    fn sessions(&self) -> impl Iterator<Item = &SessionId> {
        self.0.iter().map(|(s, _)| s)
    }
}

/// The actor behind one user socket.
pub struct ClientConn {
    id: ConnId,
    node: Arc<Node>,
    outbound: Outbound,
    /// Who the client is, once it has said `hello`.
    principal: Option<Principal>,
    /// Sessions joined, or being joined, with the actor that serves each.
    joined: JoinedSessions,
    last_heard: Instant,
    guard: FrameGuard,
    unanswered: Arc<Unanswered>,
}

impl ClientConn {
    pub fn new(node: Arc<Node>, outbound: Outbound) -> Self {
        let limits = &node.limits;
        let guard = FrameGuard::new(
            limits.max_frame_bytes,
            limits.rate_per_s,
            limits.rate_burst,
            limits.rate_abuse_strikes,
        );
        Self {
            guard,
            unanswered: Arc::default(),
            id: uuid::Uuid::now_v7().to_string().into(),
            node,
            outbound,
            principal: None,
            joined: JoinedSessions::default(),
            last_heard: Instant::now(),
        }
    }

    fn send_frame(&mut self, frame: ByteString, class: FrameClass, ctx: &mut Context<Self>) {
        match self.outbound.push_text(frame, class) {
            Pushed::Queued | Pushed::Shed => {}
            Pushed::SlowConsumer => {
                tracing::info!(conn = %self.id, queued = self.outbound.queued_bytes(), "slow consumer dropped");
                telemetry::slow_consumer("user");
                self.outbound.drop_slow_consumer();
                ctx.stop();
            }
            Pushed::Closed => ctx.stop(),
        }
    }

    fn refuse(&mut self, reference: Option<&str>, refusal: &Refusal, ctx: &mut Context<Self>) {
        telemetry::error(refusal.code);
        let frame = ServerFrame::error(reference, refusal).encode();
        self.send_frame(frame, FrameClass::Ordered, ctx);
    }

    /// Sends a last error and closes the socket with `code`.
    fn close_with(&mut self, code: CloseCode, refusal: &Refusal, ctx: &mut Context<Self>) {
        self.refuse(None, refusal, ctx);
        self.outbound.close(code, &refusal.message);
        ctx.stop();
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        telemetry::message_in();
        match self.guard.check(text) {
            Verdict::Admit => {}
            Verdict::Refuse(refusal, reference) => {
                return self.refuse(reference.as_deref(), &refusal, ctx);
            }
            Verdict::Close(code, refusal) => return self.close_with(code, &refusal, ctx),
        }
        let request = match parse_request(text) {
            Ok(request) => request,
            Err(failure) => {
                return self.refuse(failure.reference.as_deref(), &failure.refusal, ctx);
            }
        };
        let reference = request.reference;
        let (principal, command) = match (&self.principal, request.command) {
            (None, Command::Hello { token, name }) => return self.on_hello(token, name, ctx),
            (None, _) => {
                let refusal =
                    Refusal::new(ErrorCode::Unauthorized, "send hello before anything else");
                return self.refuse(reference.as_deref(), &refusal, ctx);
            }
            (Some(_), Command::Hello { .. }) => {
                let refusal = Refusal::bad_request("hello was already received");
                return self.refuse(reference.as_deref(), &refusal, ctx);
            }
            (Some(principal), command) => (principal.clone(), command),
        };
        match command {
            Command::Hello { .. } => {}
            Command::Ping => self.send_frame(ServerFrame::Pong.encode(), FrameClass::Ordered, ctx),
            Command::Join {
                session,
                since,
                epoch,
            } => self.join(principal, session, since, epoch, reference, ctx),
            Command::Leave { session } => match self.route(&session) {
                Ok(addr) => {
                    self.joined.remove(&session);
                    let msg = Leave {
                        conn: self.id.clone(),
                        reply: self.reply(reference.clone(), ctx),
                    };
                    self.forward(addr, msg, reference, ctx);
                }
                Err(refusal) => self.refuse(reference.as_deref(), &refusal, ctx),
            },
            Command::Chat { session, text } => {
                let addr = match self.write_route(&principal, &session) {
                    Ok(addr) => addr,
                    Err(refusal) => return self.refuse(reference.as_deref(), &refusal, ctx),
                };
                let msg = PostChat {
                    conn: Some(self.id.clone()),
                    actor: principal.user.actor(),
                    text,
                    reply: self.reply(reference.clone(), ctx),
                };
                self.forward(addr, msg, reference, ctx);
            }
            Command::Edit {
                session,
                doc,
                base,
                ops,
            } => {
                let addr = match self.write_route(&principal, &session) {
                    Ok(addr) => addr,
                    Err(refusal) => return self.refuse(reference.as_deref(), &refusal, ctx),
                };
                let msg = Edit {
                    conn: Some(self.id.clone()),
                    actor: principal.user.actor(),
                    doc,
                    base,
                    ops,
                    reply: self.reply(reference.clone(), ctx),
                };
                self.forward(addr, msg, reference, ctx);
            }
            Command::TaskSubmit { session, task } => {
                let node = self.node.clone();
                let submit = async move {
                    crate::tasks::access::submit(&node, &principal, session, task)
                        .await
                        .map(|task| Answer::Task(task.id))
                };
                self.answer(submit, reference, ctx);
            }
            Command::TaskCancel { task } => {
                let node = self.node.clone();
                let cancel = async move {
                    crate::tasks::access::cancel(&node, &principal, task)
                        .await
                        .map(|task| Answer::Task(task.id))
                };
                self.answer(cancel, reference, ctx);
            }
            Command::CouncilOpen { session, council } => {
                let node = self.node.clone();
                let open = async move {
                    crate::council::access::open(&node, &principal, session, council)
                        .await
                        .map(Answer::Council)
                };
                self.answer(open, reference, ctx);
            }
            Command::CouncilBallot {
                council,
                phase,
                ballot,
            } => {
                let node = self.node.clone();
                let cast = async move {
                    crate::council::access::ballot(&node, &principal, &council, phase, ballot)
                        .await
                        .map(|()| Answer::Council(council))
                };
                self.answer(cast, reference, ctx);
            }
            Command::Presence { session, state } => {
                let addr = match self.route(&session) {
                    Ok(addr) => addr,
                    Err(refusal) => return self.refuse(reference.as_deref(), &refusal, ctx),
                };
                let state = match serde_json::value::to_raw_value(&state) {
                    Ok(state) => state,
                    Err(err) => {
                        let refusal = Refusal::bad_request(format!("presence state: {err}"));
                        return self.refuse(reference.as_deref(), &refusal, ctx);
                    }
                };
                addr.do_send(SetPresence {
                    conn: self.id.clone(),
                    state,
                    outbox: ctx.address().recipient(),
                });
            }
        }
    }

    /// Answers a task or council request with `ack` carrying the id it concerns, or the
    /// refusal, once `request` resolves.
    fn answer(
        &mut self,
        request: impl Future<Output = Result<Answer, Refusal>> + 'static,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let pending = self.unanswered.track();
        request
            .into_actor(self)
            .map(move |answer, act, ctx| {
                drop(pending);
                match answer {
                    Ok(answer) => {
                        let (task, council) = match &answer {
                            Answer::Task(task) => (Some(task), None),
                            Answer::Council(council) => (None, Some(council)),
                        };
                        let frame = ServerFrame::Ack {
                            reference: reference.as_deref(),
                            offset: None,
                            doc: None,
                            version: None,
                            task,
                            council,
                        };
                        act.send_frame(frame.encode(), FrameClass::Ordered, ctx);
                    }
                    Err(refusal) => act.refuse(reference.as_deref(), &refusal, ctx),
                }
            })
            .spawn(ctx);
    }

    fn on_hello(&mut self, token: Option<String>, name: Option<String>, ctx: &mut Context<Self>) {
        let principal = match self
            .node
            .auth
            .authenticate(token.as_deref(), name.as_deref())
        {
            Ok(principal) => principal,
            Err(failure) => return self.refuse(None, &failure.refusal("ws"), ctx),
        };
        let frame = ServerFrame::Welcome {
            conn: &self.id,
            user: &principal.user,
            node: &self.node.id,
            protocol: 1,
        }
        .encode();
        if let Some(until) = principal.time_left() {
            // The token's end ends the connection: checked again when the timer fires.
            ctx.run_later(until, |act, ctx| {
                if act.principal.as_ref().is_some_and(Principal::expired) {
                    crate::telemetry::auth_failure("ws", "expired");
                    let refusal = Refusal::new(ErrorCode::Unauthorized, "your token expired");
                    act.close_with(CloseCode::Other(4401), &refusal, ctx);
                }
            });
        }
        self.principal = Some(principal);
        self.send_frame(frame, FrameClass::Ordered, ctx);
    }

    fn join(
        &mut self,
        principal: Principal,
        session: SessionId,
        since: Option<u64>,
        epoch: Option<String>,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        if let Err(refusal) = principal.check_session(&session) {
            return self.refuse(reference.as_deref(), &refusal, ctx);
        }
        let max = self.node.limits.max_sessions_per_conn;
        if self.joined.get(&session).is_none() && self.joined.len() >= max {
            let refusal = Refusal::new(
                ErrorCode::TooLarge,
                format!("a connection may join at most {max} sessions; leave one first"),
            );
            return self.refuse(reference.as_deref(), &refusal, ctx);
        }
        let may_create =
            principal.user.role.may_write() || self.node.registry.live(&session).is_some();
        if !may_create {
            // Joining creates a session only for those who may write; others may join only
            // one that exists.
            let store = self.node.store.clone();
            let id = session.clone();
            async move { store.session(&id).await }
                .into_actor(self)
                .map(move |found, act, ctx| match found {
                    Ok(Some(record)) if !record.archived => {
                        act.activate_and_join(principal, session, since, epoch, reference, ctx)
                    }
                    Ok(_) => {
                        let refusal = Refusal::not_found(format!("no session {session}"));
                        act.refuse(reference.as_deref(), &refusal, ctx);
                    }
                    Err(err) => {
                        tracing::warn!(%err, "store unavailable while joining");
                        act.refuse(reference.as_deref(), &Refusal::storage_unavailable(), ctx);
                    }
                })
                .spawn(ctx);
            return;
        }
        self.activate_and_join(principal, session, since, epoch, reference, ctx);
    }

    fn activate_and_join(
        &mut self,
        principal: Principal,
        session: SessionId,
        since: Option<u64>,
        epoch: Option<String>,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let addr = match self.node.registry.activate(&session) {
            Ok(addr) => addr,
            Err(refusal) => return self.refuse(reference.as_deref(), &refusal, ctx),
        };
        // Recorded before the session answers, so that a chat sent right after `joined` always
        // finds its route; a refused join removes it again.
        self.joined.insert(session.clone(), addr.downgrade());
        let msg = Join {
            conn: self.id.clone(),
            user: principal.user,
            outbox: ctx.address().recipient(),
            reference: reference.clone(),
            since,
            epoch,
        };
        addr.send(msg)
            .into_actor(self)
            .map(move |result, act, ctx| {
                let refusal = match result {
                    Ok(Ok(())) => return,
                    Ok(Err(refusal)) => refusal,
                    Err(_) => Refusal::session_unavailable(),
                };
                act.joined.remove(&session);
                act.refuse(reference.as_deref(), &refusal, ctx);
            })
            .spawn(ctx);
    }

    /// Sends a request to its session; if the session is gone, the client hears so.
    fn forward<M>(
        &mut self,
        addr: Addr<SessionActor>,
        msg: M,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) where
        M: Message<Result = ()> + Send + 'static,
        SessionActor: Handler<M>,
    {
        addr.send(msg)
            .into_actor(self)
            .map(move |result, act, ctx| {
                if result.is_err() {
                    act.refuse(reference.as_deref(), &Refusal::session_unavailable(), ctx);
                }
            })
            .spawn(ctx);
    }

    /// The actor serving a joined session. The registry's current one wins over the address
    /// remembered at join time: after a crash the supervisor restarts the session under a new
    /// address, and the connection follows it without rejoining.
    fn route(&self, session: &SessionId) -> Result<Addr<SessionActor>, Refusal> {
        let remembered = self
            .joined
            .get(session)
            .ok_or_else(|| not_joined(session))?;
        self.node
            .registry
            .live(session)
            .or_else(|| remembered.upgrade())
            .ok_or_else(Refusal::session_unavailable)
    }

    /// The session actor for a write: the caller's role must allow writing, and the session
    /// must be joined.
    fn write_route(
        &self,
        principal: &Principal,
        session: &SessionId,
    ) -> Result<Addr<SessionActor>, Refusal> {
        principal.check_write()?;
        self.route(session)
    }

    fn reply(&self, reference: Option<String>, ctx: &mut Context<Self>) -> Reply {
        let pending = self.unanswered.track();
        if self.unanswered.count() >= MAX_UNANSWERED {
            // Stop reading this socket until half the backlog is answered: `wait` holds every
            // other event of this actor, the socket stream included.
            let unanswered = Arc::clone(&self.unanswered);
            ctx.wait(actix::fut::wrap_future(
                unanswered.wait_below(MAX_UNANSWERED / 2),
            ));
        }
        Reply::Conn {
            outbox: ctx.address().recipient(),
            reference,
            pending,
        }
    }
}

impl Actor for ClientConn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        telemetry::connection_opened("user");
        let hello_timeout = Duration::from_secs(self.node.limits.hello_timeout_s);
        ctx.run_later(hello_timeout, move |act, ctx| {
            if act.principal.is_none() {
                let refusal = Refusal::new(
                    ErrorCode::Unauthorized,
                    format!("no hello within {}s", hello_timeout.as_secs()),
                );
                act.close_with(CloseCode::Policy, &refusal, ctx);
            }
        });
        keepalive::watch(ctx.address().downgrade().recipient(), &self.node);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        telemetry::connection_closed("user");
        for session in self.joined.sessions() {
            let Ok(addr) = self.route(session) else {
                continue;
            };
            addr.do_send(Disconnect {
                conn: self.id.clone(),
            });
        }
    }
}

impl Handler<Beat> for ClientConn {
    type Result = ();

    fn handle(&mut self, beat: Beat, ctx: &mut Context<Self>) {
        let timeout = Duration::from_secs(self.node.limits.socket_timeout_s);
        let reason = match beat {
            Beat::Due if keepalive::ping_if_alive(&self.outbound, self.last_heard, timeout) => {
                return;
            }
            Beat::Due => {
                tracing::debug!(conn = %self.id, "socket timed out");
                keepalive::SILENT
            }
            Beat::NodeStopping => keepalive::STOPPING,
        };
        self.outbound.close(CloseCode::Away, reason);
        ctx.stop();
    }
}

impl Handler<Deliver> for ClientConn {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        if let Some(session) = &msg.ends_membership {
            self.joined.remove(session);
        }
        self.send_frame(msg.frame, msg.class, ctx);
    }
}

impl StreamHandler<Result<Received, ProtocolError>> for ClientConn {
    fn handle(&mut self, item: Result<Received, ProtocolError>, ctx: &mut Context<Self>) {
        self.last_heard = Instant::now();
        match classify(item) {
            Inbound::Text(text) => self.on_text(&text, ctx),
            Inbound::Refuse(refusal) => self.refuse(None, &refusal, ctx),
            Inbound::Ignore => {}
            Inbound::Closed => {
                self.outbound.close(CloseCode::Normal, "bye");
                ctx.stop();
            }
            Inbound::Fatal(code, refusal) => self.close_with(code, &refusal, ctx),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

fn not_joined(session: &SessionId) -> Refusal {
    Refusal::bad_request(format!("join session {session} before sending to it"))
}
