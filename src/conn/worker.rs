//! `WorkerConn`: one actor per worker-agent socket on `/v1/workers`.
//!
//! It speaks the worker protocol of PROTOCOL.md, parsed into typed commands at the edge, and owns
//! the socket, its outbound queue and its heartbeat clock. What the worker may hold (leases,
//! capacity) is the scheduler's to track: this actor forwards reports and relays `assign` and
//! `cancel` frames. A worker that misses three heartbeats is closed, and losing the socket loses
//! its leases at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::socket::{CloseCode, ProtocolError, Received};
use actix::prelude::*;

use super::guard::{FrameGuard, Inbound, Verdict, classify};
use super::keepalive::{self, Beat};
use super::outbound::{Outbound, Pushed};
use crate::auth::Principal;
use crate::node::Node;
use crate::protocol::worker::{MAX_CAPACITY, WorkerCommand, WorkerFrame, parse_worker_request};
use crate::protocol::{ErrorCode, LeaseId, Refusal, Role, TaskId, TaskKind, WorkerId};
use crate::session::FrameClass;
use crate::tasks::{
    DrainWorker, RegisterWorker, Report, TaskReport, ToWorker, WorkerGone, WorkerHeartbeat,
    raw_json,
};
use crate::telemetry;

/// The most capabilities one worker may declare.
const MAX_CAPABILITIES: usize = 64;

/// Heartbeats a worker may miss before it is considered gone.
const MISSED_HEARTBEATS: u32 = 3;

/// The actor behind one worker socket.
pub struct WorkerConn {
    id: WorkerId,
    node: Arc<Node>,
    outbound: Outbound,
    /// Who the worker is, once it has said `hello`.
    principal: Option<Principal>,
    guard: FrameGuard,
    last_heartbeat: Instant,
}

impl WorkerConn {
    pub fn new(node: Arc<Node>, outbound: Outbound) -> Self {
        let limits = &node.limits;
        let guard = FrameGuard::new(
            limits.max_frame_bytes,
            limits.worker_rate_per_s,
            limits.worker_rate_per_s.saturating_mul(2),
            limits.rate_abuse_strikes,
        );
        Self {
            id: WorkerId::generate(),
            node,
            outbound,
            principal: None,
            guard,
            last_heartbeat: Instant::now(),
        }
    }

    fn heartbeat_every(&self) -> Duration {
        Duration::from_secs(self.node.limits.worker_heartbeat_s.max(1))
    }

    fn send(&mut self, frame: &WorkerFrame, ctx: &mut Context<Self>) {
        self.push(frame.encode(), ctx);
    }

    /// Queues an encoded frame; a worker that does not read its frames is dropped.
    fn push(&mut self, frame: bytestring::ByteString, ctx: &mut Context<Self>) {
        match self.outbound.push_text(frame, FrameClass::Ordered) {
            Pushed::Queued | Pushed::Shed => {}
            Pushed::SlowConsumer => {
                telemetry::slow_consumer("worker");
                self.outbound.drop_slow_consumer();
                ctx.stop();
            }
            Pushed::Closed => ctx.stop(),
        }
    }

    fn refuse(&mut self, reference: Option<String>, refusal: &Refusal, ctx: &mut Context<Self>) {
        telemetry::error(refusal.code);
        self.send(&WorkerFrame::error(reference, None, refusal), ctx);
    }

    fn close_with(&mut self, code: CloseCode, refusal: &Refusal, ctx: &mut Context<Self>) {
        self.refuse(None, refusal, ctx);
        self.outbound.close(code, &refusal.message);
        ctx.stop();
    }

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        telemetry::message_in();
        match self.guard.check(text) {
            Verdict::Admit => {}
            Verdict::Refuse(refusal, reference) => return self.refuse(reference, &refusal, ctx),
            Verdict::Close(code, refusal) => return self.close_with(code, &refusal, ctx),
        }
        let request = match parse_worker_request(text) {
            Ok(request) => request,
            Err(failure) => return self.refuse(failure.reference, &failure.refusal, ctx),
        };
        let reference = request.reference;
        let scheduler = self.node.scheduler.addr();
        match (self.principal.is_some(), request.command) {
            (
                false,
                WorkerCommand::Hello {
                    token,
                    name,
                    capabilities,
                    capacity,
                },
            ) => self.on_hello(token, name, capabilities, capacity, reference, ctx),
            (false, _) => {
                let refusal =
                    Refusal::new(ErrorCode::Unauthorized, "send hello before anything else");
                self.refuse(reference, &refusal, ctx);
            }
            (true, WorkerCommand::Hello { .. }) => {
                self.refuse(
                    reference,
                    &Refusal::bad_request("hello was already received"),
                    ctx,
                );
            }
            (true, WorkerCommand::Heartbeat) => {
                self.last_heartbeat = Instant::now();
                scheduler.do_send(WorkerHeartbeat {
                    id: self.id.clone(),
                });
            }
            (true, WorkerCommand::Ping) => self.send(&WorkerFrame::Pong, ctx),
            (true, WorkerCommand::Drain) => {
                scheduler.do_send(DrainWorker {
                    id: self.id.clone(),
                });
                if reference.is_some() {
                    self.send(
                        &WorkerFrame::Ack {
                            reference,
                            task: None,
                        },
                        ctx,
                    );
                }
            }
            (true, WorkerCommand::Progress { task, lease, data }) => self.report(
                reference,
                task,
                lease,
                TaskReport::Progress(raw_json(&data)),
            ),
            (
                true,
                WorkerCommand::Complete {
                    task,
                    lease,
                    output,
                },
            ) => self.report(
                reference,
                task,
                lease,
                TaskReport::Complete(raw_json(&output)),
            ),
            (
                true,
                WorkerCommand::Fail {
                    task,
                    lease,
                    error,
                    retryable,
                },
            ) => self.report(
                reference,
                task,
                lease,
                TaskReport::Fail { error, retryable },
            ),
        }
    }

    fn report(&self, reference: Option<String>, task: TaskId, lease: LeaseId, report: TaskReport) {
        self.node.scheduler.addr().do_send(Report {
            worker: self.id.clone(),
            reference,
            task,
            lease,
            report,
        });
    }

    fn on_hello(
        &mut self,
        token: Option<String>,
        name: Option<String>,
        capabilities: Vec<TaskKind>,
        capacity: i64,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let principal = match self
            .node
            .auth
            .authenticate(token.as_deref(), name.as_deref())
        {
            Ok(principal) => principal,
            Err(failure) => return self.refuse(reference, &failure.refusal("worker"), ctx),
        };
        // Anonymous workers are admitted exactly where anonymous users are: on loopback.
        if !principal.anonymous && !matches!(principal.user.role, Role::Agent | Role::Admin) {
            telemetry::auth_failure("worker", "role");
            let refusal = Refusal::new(
                ErrorCode::Forbidden,
                "only the agent and admin roles may connect as workers",
            );
            return self.refuse(reference, &refusal, ctx);
        }
        if !(1..=MAX_CAPACITY).contains(&capacity) {
            let refusal = Refusal::bad_request(format!(
                "capacity must be between 1 and {MAX_CAPACITY}, not {capacity}"
            ));
            return self.refuse(reference, &refusal, ctx);
        }
        if capabilities.is_empty() || capabilities.len() > MAX_CAPABILITIES {
            let refusal = Refusal::bad_request(format!(
                "declare between 1 and {MAX_CAPABILITIES} capabilities"
            ));
            return self.refuse(reference, &refusal, ctx);
        }
        if let Some(until) = principal.time_left() {
            ctx.run_later(until, |act, ctx| {
                if act.principal.as_ref().is_some_and(Principal::expired) {
                    telemetry::auth_failure("worker", "expired");
                    let refusal = Refusal::new(ErrorCode::Unauthorized, "your token expired");
                    act.close_with(CloseCode::Other(4401), &refusal, ctx);
                }
            });
        }
        let welcome = WorkerFrame::Welcome {
            worker: self.id.clone(),
            heartbeat_s: self.heartbeat_every().as_secs(),
            node: self.node.id.clone(),
        };
        self.send(&welcome, ctx);
        self.last_heartbeat = Instant::now();
        self.node.scheduler.addr().do_send(RegisterWorker {
            id: self.id.clone(),
            name: principal.user.name.clone(),
            user: principal.user.id.clone(),
            capabilities,
            capacity: u32::try_from(capacity).unwrap_or(1),
            outbox: ctx.address().recipient(),
        });
        self.principal = Some(principal);
        let every = self.heartbeat_every();
        ctx.run_interval(every, move |act, ctx| {
            if act.last_heartbeat.elapsed() > every * MISSED_HEARTBEATS {
                tracing::info!(worker = %act.id, "worker missed its heartbeats; dropping it");
                let refusal = Refusal::new(
                    ErrorCode::BadRequest,
                    format!(
                        "no heartbeat for {MISSED_HEARTBEATS} × {}s",
                        every.as_secs()
                    ),
                );
                act.close_with(CloseCode::Away, &refusal, ctx);
            }
        });
    }
}

impl Actor for WorkerConn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        telemetry::connection_opened("worker");
        keepalive::watch(ctx.address().downgrade().recipient(), &self.node);
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
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        telemetry::connection_closed("worker");
        if self.principal.is_some() {
            self.node.scheduler.addr().do_send(WorkerGone {
                id: self.id.clone(),
            });
        }
    }
}

/// Workers keep their own heartbeat (see `welcome`); from the keepalive they only take the
/// node's goodbye.
impl Handler<Beat> for WorkerConn {
    type Result = ();

    fn handle(&mut self, beat: Beat, ctx: &mut Context<Self>) {
        if beat == Beat::NodeStopping {
            self.outbound.close(CloseCode::Away, keepalive::STOPPING);
            ctx.stop();
        }
    }
}

impl Handler<ToWorker> for WorkerConn {
    type Result = ();

    fn handle(&mut self, msg: ToWorker, ctx: &mut Context<Self>) {
        self.push(msg.frame, ctx);
        if msg.then_close {
            // Its scheduler is gone for good, so there is nothing to report to: stop without
            // a `WorkerGone`, and let the worker reconnect elsewhere.
            self.principal = None;
            self.outbound
                .close(CloseCode::Error, "this node stopped scheduling");
            ctx.stop();
        }
    }
}

impl StreamHandler<Result<Received, ProtocolError>> for WorkerConn {
    fn handle(&mut self, item: Result<Received, ProtocolError>, ctx: &mut Context<Self>) {
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
