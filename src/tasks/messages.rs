//! The typed messages the [`Scheduler`](super::Scheduler) takes from worker connections and
//! from the handlers that submit and cancel tasks, and the one it sends to worker connections.

use actix::{Message, Recipient};
use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;

use super::model::{TaskRecord, TaskSpec};
use crate::protocol::{LeaseId, Refusal, SessionId, TaskId, TaskKind, WorkerId};
use crate::session::log::Actor;

/// One encoded frame for a worker connection to write.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ToWorker {
    pub frame: ByteString,
    /// Close the socket after this frame: the node can no longer schedule for this worker.
    pub then_close: bool,
}

/// A worker said `hello`: it may now be assigned up to `capacity` tasks of `capabilities`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterWorker {
    pub id: WorkerId,
    pub name: String,
    /// The principal's user id (the token's `sub`).
    pub user: String,
    pub capabilities: Vec<TaskKind>,
    pub capacity: u32,
    pub outbox: Recipient<ToWorker>,
}

/// A worker's socket closed, or it stopped heartbeating: its leases are lost at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerGone {
    pub id: WorkerId,
}

/// A worker's `heartbeat`: every lease it holds is renewed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WorkerHeartbeat {
    pub id: WorkerId,
}

/// A worker's `drain`: no new assignments; the current ones finish.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DrainWorker {
    pub id: WorkerId,
}

/// What a worker reports about a task it holds.
#[derive(Debug)]
pub enum TaskReport {
    Progress(Box<RawValue>),
    Complete(Box<RawValue>),
    Fail { error: String, retryable: bool },
}

/// A worker's `progress`, `complete` or `fail`, fenced by `lease`. The answer goes to the
/// worker's outbox: `ack` when the request had a `ref`, `error` `conflict` when the lease is
/// stale or unknown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Report {
    pub worker: WorkerId,
    pub reference: Option<String>,
    pub task: TaskId,
    pub lease: LeaseId,
    pub report: TaskReport,
}

/// A new task for `session`, answered once it is durable.
#[derive(Message)]
#[rtype(result = "Result<TaskRecord, Refusal>")]
pub struct SubmitTask {
    pub session: SessionId,
    pub spec: TaskSpec,
    pub actor: Actor,
    /// Only this worker may take it.
    pub target: Option<WorkerId>,
    /// Told when the task ends (completed, failed or canceled).
    pub watcher: Option<Recipient<TaskFinished>>,
}

/// A watched task ended.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct TaskFinished {
    pub task: TaskId,
    pub state: super::model::TaskState,
    pub output: Option<serde_json::Value>,
    pub error: Option<String>,
}

/// Asks to be told when `task` ends; if it already has, the answer comes at once. A council
/// that resumed after a restart watches its tasks again this way.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchTask {
    pub task: TaskId,
    pub watcher: Recipient<TaskFinished>,
}

/// Up to `count` connected, non-draining workers with `capability`, least loaded first (ties
/// broken at random): a council's members.
#[derive(Message)]
#[rtype(result = "Vec<WorkerId>")]
pub struct PickWorkers {
    pub capability: TaskKind,
    pub count: usize,
}

/// Cancels a task: a queued one at once; a working one is taken from its worker, which is sent
/// `cancel`. The caller has checked the principal may touch the task's session.
#[derive(Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct CancelTask {
    pub task: TaskId,
    pub actor: Actor,
}

/// The connected workers of this node, for `GET /v1/workers`.
#[derive(Message)]
#[rtype(result = "Vec<WorkerView>")]
pub struct ListWorkers;

/// A connected worker and its load.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerView {
    #[schema(value_type = String)]
    pub id: WorkerId,
    pub name: String,
    pub user: String,
    #[schema(value_type = Vec<String>)]
    pub capabilities: Vec<TaskKind>,
    pub capacity: u32,
    /// Tasks it holds now.
    pub load: u32,
    pub draining: bool,
    pub node: String,
    #[serde(serialize_with = "crate::session::log::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub connected_at: DateTime<Utc>,
}
