//! `YjsConn`: one actor per y-websocket socket at `/v1/yjs/{session}/{doc}`.
//!
//! It speaks the binary y-websocket protocol for one document: frames are decoded here, at the
//! edge, into typed messages for the session actor, which owns the document and answers with
//! ready-encoded frames. The caller was authenticated from `?token=` before the upgrade.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::socket::{CloseCode, ProtocolError, Received};
use actix::prelude::*;
use yrs::sync::{Message, SyncMessage};

use super::keepalive::{self, Beat};
use super::outbound::{Outbound, Pushed};
use crate::auth::Principal;
use crate::node::Node;
use crate::protocol::{DocName, Refusal, SessionId, yjs};
use crate::session::{
    ConnId, DeliverBinary, Disconnect, FrameClass, SessionActor, YjsAttach, YjsAwareness,
    YjsAwarenessQuery, YjsSyncStep1, YjsUpdate,
};
use crate::telemetry;

pub struct YjsConn {
    id: ConnId,
    node: Arc<Node>,
    outbound: Outbound,
    principal: Principal,
    session: SessionId,
    doc: DocName,
    /// The session actor, once attached.
    addr: Option<Addr<SessionActor>>,
    last_heard: Instant,
}

impl YjsConn {
    pub fn new(
        node: Arc<Node>,
        outbound: Outbound,
        principal: Principal,
        session: SessionId,
        doc: DocName,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string().into(),
            node,
            outbound,
            principal,
            session,
            doc,
            addr: None,
            last_heard: Instant::now(),
        }
    }

    fn close(&mut self, code: CloseCode, reason: &str, ctx: &mut Context<Self>) {
        self.outbound.close(code, reason);
        ctx.stop();
    }

    fn attach(&mut self, addr: Addr<SessionActor>, ctx: &mut Context<Self>) {
        self.addr = Some(addr.clone());
        let msg = YjsAttach {
            conn: self.id.clone(),
            user: self.principal.user.clone(),
            doc: self.doc.clone(),
            outbox: ctx.address().recipient(),
        };
        addr.send(msg)
            .into_actor(self)
            .map(|result, act, ctx| {
                let refusal = match result {
                    Ok(Ok(())) => return,
                    Ok(Err(refusal)) => refusal,
                    Err(_) => Refusal::session_unavailable(),
                };
                act.addr = None;
                act.close(CloseCode::Policy, &refusal.message, ctx);
            })
            .spawn(ctx);
    }

    /// The actor serving the document now: after a crash the supervisor restarts the session
    /// under a new address and re-attaches this connection to it.
    fn route(&self) -> Option<Addr<SessionActor>> {
        let remembered = self.addr.as_ref()?;
        Some(
            self.node
                .registry
                .live(&self.session)
                .unwrap_or_else(|| remembered.clone()),
        )
    }

    fn on_frame(&mut self, frame: &[u8], ctx: &mut Context<Self>) {
        telemetry::message_in();
        let Some(addr) = self.route() else {
            return;
        };
        for message in yjs::decode(frame) {
            let conn = self.id.clone();
            match message {
                Ok(Message::Sync(SyncMessage::SyncStep1(state_vector))) => {
                    addr.do_send(YjsSyncStep1 { conn, state_vector });
                }
                Ok(Message::Sync(SyncMessage::SyncStep2(data) | SyncMessage::Update(data))) => {
                    addr.do_send(YjsUpdate { conn, data });
                }
                Ok(Message::Awareness(update)) => addr.do_send(YjsAwareness { conn, update }),
                Ok(Message::AwarenessQuery) => addr.do_send(YjsAwarenessQuery { conn }),
                Ok(Message::Auth(_) | Message::Custom(..)) => {}
                Err(err) => {
                    tracing::debug!(conn = %self.id, %err, "malformed y-websocket frame");
                    telemetry::error(crate::protocol::ErrorCode::BadRequest);
                    return self.close(CloseCode::Invalid, "malformed y-websocket frame", ctx);
                }
            }
        }
    }
}

impl Actor for YjsConn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        telemetry::connection_opened("yjs");
        if let Err(refusal) = self.principal.check_session(&self.session) {
            return self.close(CloseCode::Policy, &refusal.message, ctx);
        }
        let registry = self.node.registry.clone();
        if self.principal.user.role.may_write() || registry.live(&self.session).is_some() {
            match registry.activate(&self.session) {
                Ok(addr) => self.attach(addr, ctx),
                Err(refusal) => return self.close(CloseCode::Again, &refusal.message, ctx),
            }
        } else {
            // Only writers create sessions by connecting; others need one that exists.
            let store = self.node.store.clone();
            let session = self.session.clone();
            async move { store.session(&session).await }
                .into_actor(self)
                .map(move |found, act, ctx| match found {
                    Ok(Some(record)) if !record.archived => match registry.activate(&act.session) {
                        Ok(addr) => act.attach(addr, ctx),
                        Err(refusal) => act.close(CloseCode::Again, &refusal.message, ctx),
                    },
                    Ok(_) => act.close(CloseCode::Policy, "no such session", ctx),
                    Err(_) => act.close(CloseCode::Again, "store unavailable", ctx),
                })
                .spawn(ctx);
        }
        if let Some(until) = self.principal.time_left() {
            ctx.run_later(until, |act, ctx| {
                if act.principal.expired() {
                    telemetry::auth_failure("yjs", "expired");
                    act.close(CloseCode::Other(4401), "token expired", ctx);
                }
            });
        }
        keepalive::watch(ctx.address().downgrade().recipient(), &self.node);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        telemetry::connection_closed("yjs");
        if let Some(addr) = self.route() {
            addr.do_send(Disconnect {
                conn: self.id.clone(),
            });
        }
    }
}

impl Handler<Beat> for YjsConn {
    type Result = ();

    fn handle(&mut self, beat: Beat, ctx: &mut Context<Self>) {
        let timeout = Duration::from_secs(self.node.limits.socket_timeout_s);
        match beat {
            Beat::Due if keepalive::ping_if_alive(&self.outbound, self.last_heard, timeout) => {}
            Beat::Due => self.close(CloseCode::Away, keepalive::SILENT, ctx),
            Beat::NodeStopping => self.close(CloseCode::Away, keepalive::STOPPING, ctx),
        }
    }
}

impl Handler<DeliverBinary> for YjsConn {
    type Result = ();

    fn handle(&mut self, msg: DeliverBinary, ctx: &mut Context<Self>) {
        if msg.frame.is_empty() && msg.then_close {
            return self.close(CloseCode::Restart, "the session moved to another node", ctx);
        }
        match self.outbound.push_binary(msg.frame, FrameClass::Ordered) {
            Pushed::Queued | Pushed::Shed => {}
            Pushed::SlowConsumer => {
                // It resyncs by state vector when it reconnects.
                telemetry::slow_consumer("yjs");
                self.outbound.drop_slow_consumer();
                ctx.stop();
            }
            Pushed::Closed => ctx.stop(),
        }
    }
}

impl StreamHandler<Result<Received, ProtocolError>> for YjsConn {
    fn handle(&mut self, item: Result<Received, ProtocolError>, ctx: &mut Context<Self>) {
        self.last_heard = Instant::now();
        match item {
            Ok(Received::Binary(frame)) => {
                if frame.len() > self.node.limits.max_frame_bytes {
                    return self.close(CloseCode::Size, "frame too large", ctx);
                }
                self.on_frame(&frame, ctx);
            }
            Ok(Received::Text(_)) => {
                self.close(CloseCode::Unsupported, "y-websocket frames are binary", ctx)
            }
            Ok(Received::Ping(_) | Received::Pong(_)) => {}
            Ok(Received::Close(_)) => self.close(CloseCode::Normal, "bye", ctx),
            Err(ProtocolError::Overflow) => self.close(CloseCode::Size, "frame too large", ctx),
            Err(err) => {
                tracing::debug!(conn = %self.id, %err, "websocket protocol error");
                self.close(CloseCode::Protocol, "websocket protocol error", ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
