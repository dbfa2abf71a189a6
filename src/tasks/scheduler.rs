//! The `Scheduler`: one actor per node that matches queued tasks to the free capacity of the
//! node's workers, and makes every task transition durable before anyone hears of it.
//!
//! - **Claims.** Workers with free slots are grouped by their capability set; one claim per
//!   group asks the store for at most that many tasks, so no worker is ever handed more than its
//!   capacity and nothing is prefetched. One claim is in flight at a time, and its slots are
//!   reserved meanwhile. A group whose last claim came up short is not asked again until the
//!   queue may have changed (a submission, a retry coming due, or the sweep's tick).
//! - **Writes.** Submissions, fenced transitions and lease renewals are group-committed: one
//!   batch in flight, the next one gathering behind it. A transition's effects (the reply, the
//!   session-log event, the `cancel` to a worker, the freed slot) happen only after its commit.
//! - **Leases.** Each assignment carries a fresh lease, the fencing token every report must
//!   match. Heartbeats renew a worker's leases in the store; a worker that goes away loses them
//!   at once. A sweep (every second by default) retries tasks whose lease lapsed or whose
//!   deadline passed, whichever node assigned them.
//! - **Wake-ups.** A node that queues tasks says so on the bus (`Channel::Tasks`), so every
//!   node's scheduler claims at once instead of at its next sweep.
//! - **Retries** back off exponentially with jitter until `max_attempts`, then fail for good,
//!   keeping the last error.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::handle::SchedulerHandle;
use super::messages::{
    CancelTask, DrainWorker, ListWorkers, PickWorkers, RegisterWorker, Report, SubmitTask,
    TaskFinished, TaskReport, ToWorker, WatchTask, WorkerGone, WorkerHeartbeat, WorkerView,
};
use super::model::{
    Claim, ClaimedTask, Expect, NewTask, Outcome, Renewal, Settled, Settlement, TaskRecord,
    TaskState, TaskWrites,
};
use crate::cluster::{Channel, SharedBus};
use crate::protocol::worker::{Assignment, WorkerFrame};
use crate::protocol::{ErrorCode, LeaseId, Refusal, SessionId, TaskId, TaskKind, WorkerId};
use crate::session::log::{Actor as LogActor, EventKind, NewEvent, TaskEventData};
use crate::session::{AppendEvent, SessionRegistry};
use crate::store::{SharedStore, StoreError};
use crate::telemetry;

/// Expired leases retried per sweep.
const SWEEP_BATCH: u32 = 500;

/// The scheduler's settings.
#[derive(Clone)]
pub struct SchedulerConfig {
    pub node: String,
    /// Workers heartbeat this often; a lease lapses after three missed heartbeats.
    pub heartbeat: Duration,
    /// The first retry's backoff; it doubles per attempt, up to `retry_max`, with jitter.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// The largest task output accepted, in bytes of JSON.
    pub max_output_bytes: usize,
    /// How often expired leases and deadlines are swept, and the queue looked at again.
    pub sweep_every: Duration,
    /// Where wake-ups go to, and come from, the other nodes.
    pub bus: SharedBus,
}

impl SchedulerConfig {
    fn lease_ttl(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.heartbeat * 3).unwrap_or(chrono::Duration::seconds(15))
    }

    /// Exponential backoff with "equal jitter": half the delay is fixed, half random, so
    /// retries of tasks that failed together spread out but none retries at once.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1 << attempt.saturating_sub(1).min(20))
            .min(self.retry_max);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// A connected worker, as the scheduler tracks it.
struct WorkerSlot {
    name: String,
    user: String,
    capabilities: Vec<TaskKind>,
    capacity: u32,
    /// Tasks assigned and not yet settled.
    load: u32,
    /// Slots promised to the claim in flight.
    reserved: u32,
    draining: bool,
    outbox: Recipient<ToWorker>,
    connected_at: DateTime<Utc>,
}

impl WorkerSlot {
    fn free(&self) -> u32 {
        if self.draining {
            0
        } else {
            self.capacity.saturating_sub(self.load + self.reserved)
        }
    }

    fn send(&self, frame: &WorkerFrame) {
        self.outbox.do_send(ToWorker {
            frame: frame.encode(),
            then_close: false,
        });
    }
}

/// A task this node assigned, until it settles.
struct Holding {
    worker: WorkerId,
    lease: LeaseId,
    session: SessionId,
    kind: TaskKind,
    attempt: u32,
    max_attempts: u32,
}

/// Who is waiting on a settlement, and what its event should say.
enum SettleCause {
    /// The holder's own `complete` or `fail`: it hears `ack` or `error`.
    Report {
        worker: WorkerId,
        reference: Option<String>,
        /// Set when the output was refused for size: the worker hears this instead of `ack`.
        refusal: Option<Refusal>,
    },
    /// The worker went away, or its lease or deadline passed: the holder (if still here) is
    /// sent `cancel`.
    Lapsed { worker: Option<WorkerId> },
    /// A claim no worker could take any more.
    Released,
    Cancel {
        reply: oneshot::Sender<Result<(), Refusal>>,
        actor: LogActor,
    },
}

/// What happens once a batch commits.
enum AfterWrite {
    Inserted {
        task: NewTask,
        actor: LogActor,
        reply: oneshot::Sender<Result<TaskRecord, Refusal>>,
    },
    Settled(SettleCause),
}

/// The node's scheduler. Its state is private; everything reaches it as a message.
pub struct Scheduler {
    store: SharedStore,
    registry: Arc<SessionRegistry>,
    config: SchedulerConfig,
    workers: HashMap<WorkerId, WorkerSlot>,
    held: HashMap<TaskId, Holding>,
    /// Writes gathering for the next batch, and what to do after each.
    pending: TaskWrites,
    pending_after: Vec<AfterWrite>,
    writing: bool,
    claiming: bool,
    /// Bumped whenever queued tasks may have appeared.
    queue_generation: u64,
    /// Per capability set, the generation at which its last claim came up short.
    dry: HashMap<Vec<TaskKind>, u64>,
    sweeping: bool,
    /// Rotates the first group offered a claim, so no capability set starves another.
    group_cursor: usize,
    /// Submissions waiting for their session to be opened, by session.
    opening: HashMap<SessionId, Vec<PendingSubmit>>,
    /// Who to tell when a task ends.
    watchers: HashMap<TaskId, Recipient<TaskFinished>>,
    /// The supervisor to hand the workers to if this actor crashes.
    handle: Weak<SchedulerHandle>,
}

/// A submission and where its answer goes.
type PendingSubmit = (
    NewTask,
    LogActor,
    oneshot::Sender<Result<TaskRecord, Refusal>>,
);

impl Scheduler {
    pub(super) fn new(
        store: SharedStore,
        registry: Arc<SessionRegistry>,
        config: SchedulerConfig,
        handle: Weak<SchedulerHandle>,
    ) -> Self {
        Self {
            store,
            registry,
            config,
            workers: HashMap::new(),
            held: HashMap::new(),
            pending: TaskWrites::default(),
            pending_after: Vec::new(),
            writing: false,
            claiming: false,
            queue_generation: 1,
            dry: HashMap::new(),
            sweeping: false,
            group_cursor: 0,
            opening: HashMap::new(),
            watchers: HashMap::new(),
            handle,
        }
    }

    fn scheduler_actor(&self) -> LogActor {
        LogActor {
            id: format!("scheduler:{}", self.config.node),
            name: "scheduler".to_owned(),
        }
    }

    fn worker_actor(&self, id: &WorkerId) -> LogActor {
        LogActor {
            id: id.to_string(),
            name: self
                .workers
                .get(id)
                .map_or_else(|| "worker".to_owned(), |w| w.name.clone()),
        }
    }

    /// Appends a `task.*` event to the session's log. The transition is already durable in the
    /// task's row; the event is how subscribers hear of it.
    fn log(&self, session: &SessionId, kind: EventKind, actor: LogActor, data: &TaskEventData<'_>) {
        match self.registry.activate(session) {
            Ok(addr) => addr.do_send(AppendEvent {
                event: NewEvent::new(kind, actor, data),
            }),
            Err(refusal) => {
                tracing::warn!(%session, %refusal, "task event not logged: session unavailable")
            }
        }
    }

    /// Tells the other nodes' schedulers that tasks were queued.
    fn wake_other_nodes(&self) {
        let bus = self.config.bus.clone();
        if bus.kind() == "local" {
            return;
        }
        let node = bytes::Bytes::from(self.config.node.clone());
        actix::spawn(async move {
            if let Err(err) = bus.publish(&Channel::Tasks, node).await {
                tracing::debug!(%err, "task wake-up not sent; other nodes find the tasks at their sweep");
            }
        });
    }

    fn queue_changed(&mut self, ctx: &mut Context<Self>) {
        self.queue_generation += 1;
        self.try_claim(ctx);
    }

    // ---- writes ----

    fn push_settlement(
        &mut self,
        settlement: Settlement,
        cause: SettleCause,
        ctx: &mut Context<Self>,
    ) {
        self.pending.settlements.push(settlement);
        self.pending_after.push(AfterWrite::Settled(cause));
        self.flush(ctx);
    }

    /// Commits the gathered writes as one batch; only one batch is in flight.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.is_empty() {
            return;
        }
        self.writing = true;
        let writes = std::mem::take(&mut self.pending);
        let after = std::mem::take(&mut self.pending_after);
        let store = self.store.clone();
        async move {
            let result = store.write_tasks(&writes).await;
            (writes, after, result)
        }
        .into_actor(self)
        .map(|(writes, after, result), act, ctx| {
            act.writing = false;
            act.on_written(writes, after, result, ctx);
            act.flush(ctx);
        })
        .spawn(ctx);
    }

    fn on_written(
        &mut self,
        writes: TaskWrites,
        after: Vec<AfterWrite>,
        result: Result<Vec<Option<Settled>>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let settled = match result {
            Ok(settled) => settled,
            Err(err) => {
                tracing::warn!(%err, "task writes failed; refusing them");
                telemetry::task_write_failed();
                for after in after {
                    self.refuse_after(after, Refusal::storage_unavailable());
                }
                return;
            }
        };
        let mut settlements = writes.settlements.into_iter().zip(settled);
        let mut inserted_any = false;
        for after in after {
            match after {
                AfterWrite::Inserted { task, actor, reply } => {
                    inserted_any = true;
                    telemetry::task_transition(TaskState::Submitted.as_str());
                    self.log(
                        &task.session,
                        EventKind::TaskSubmitted,
                        actor,
                        &TaskEventData::new(&task.id, &task.spec.kind, 0, None),
                    );
                    let _ = reply.send(Ok(submitted_record(task)));
                }
                AfterWrite::Settled(cause) => {
                    let Some((settlement, outcome)) = settlements.next() else {
                        tracing::error!("task batch answered fewer settlements than it held");
                        continue;
                    };
                    self.on_settled(settlement, outcome, cause, ctx);
                }
            }
        }
        if inserted_any {
            self.queue_changed(ctx);
            self.wake_other_nodes();
        } else {
            self.try_claim(ctx);
        }
    }

    fn refuse_after(&mut self, after: AfterWrite, refusal: Refusal) {
        match after {
            AfterWrite::Inserted { reply, .. } => {
                let _ = reply.send(Err(refusal));
            }
            AfterWrite::Settled(SettleCause::Report {
                worker, reference, ..
            }) => {
                if let Some(slot) = self.workers.get(&worker) {
                    slot.send(&WorkerFrame::error(reference, None, &refusal));
                }
            }
            AfterWrite::Settled(SettleCause::Cancel { reply, .. }) => {
                let _ = reply.send(Err(refusal));
            }
            // Lapsed leases are found again by the next sweep; a released claim's lease lapses
            // and is retried the same way.
            AfterWrite::Settled(SettleCause::Lapsed { .. } | SettleCause::Released) => {}
        }
    }

    fn on_settled(
        &mut self,
        settlement: Settlement,
        settled: Option<Settled>,
        cause: SettleCause,
        ctx: &mut Context<Self>,
    ) {
        // The store is the judge of the fence; whatever it said, this node's memory of the
        // holding the settlement named is now out of date. A holding under a newer lease (the
        // task was retried and assigned again meanwhile) is not this settlement's to touch.
        let names_holding =
            self.held
                .get(&settlement.task)
                .is_some_and(|h| match &settlement.expect {
                    Expect::Lease(lease) => &h.lease == lease,
                    Expect::Open => true,
                });
        let holding = if names_holding {
            self.held.remove(&settlement.task)
        } else {
            None
        };
        if let Some(holding) = &holding
            && let Some(worker) = self.workers.get_mut(&holding.worker)
        {
            worker.load = worker.load.saturating_sub(1);
        }
        let Some(settled) = settled else {
            let refusal = Refusal::new(
                ErrorCode::Conflict,
                format!(
                    "task {} is not held under that lease any more, or is already done",
                    settlement.task
                ),
            );
            match cause {
                SettleCause::Report {
                    worker, reference, ..
                } => {
                    if let Some(slot) = self.workers.get(&worker) {
                        slot.send(&WorkerFrame::error(
                            reference,
                            Some(settlement.task.clone()),
                            &refusal,
                        ));
                    }
                }
                SettleCause::Cancel { reply, .. } => {
                    let refusal = Refusal::new(
                        ErrorCode::Conflict,
                        format!("task {} is already done", settlement.task),
                    );
                    let _ = reply.send(Err(refusal));
                }
                SettleCause::Lapsed { .. } | SettleCause::Released => {}
            }
            return;
        };
        let state = settlement.outcome.state();
        if !matches!(cause, SettleCause::Released) {
            telemetry::task_transition(match settlement.outcome {
                Outcome::Retry { .. } => "retrying",
                _ => state.as_str(),
            });
        }
        // A holder that did not itself end the task is told to stop working on it.
        let notify_holder = match &cause {
            SettleCause::Report { .. } | SettleCause::Released => None,
            SettleCause::Lapsed { worker } => worker.clone(),
            SettleCause::Cancel { .. } => holding.as_ref().map(|h| h.worker.clone()),
        };
        if let Some(worker) = notify_holder.and_then(|w| self.workers.get(&w)) {
            worker.send(&WorkerFrame::Cancel {
                task: settlement.task.clone(),
            });
        }
        let worker = holding.as_ref().map(|h| h.worker.clone());
        let actor = match &cause {
            SettleCause::Report { worker, .. } => self.worker_actor(worker),
            SettleCause::Cancel { actor, .. } => actor.clone(),
            SettleCause::Lapsed { .. } | SettleCause::Released => self.scheduler_actor(),
        };
        let mut data = TaskEventData::new(
            &settlement.task,
            &settled.kind,
            settled.attempt,
            worker.as_ref(),
        );
        let kind = match &settlement.outcome {
            Outcome::Completed { output } => {
                data.output = Some(output);
                Some(EventKind::TaskCompleted)
            }
            Outcome::Failed { error } => {
                data.error = Some(error);
                Some(EventKind::TaskFailed)
            }
            Outcome::Retry { error, not_before } => {
                data.error = Some(error);
                data.not_before = Some(not_before.to_rfc3339_opts(SecondsFormat::Millis, true));
                let wait = (*not_before - Utc::now()).to_std().unwrap_or_default();
                ctx.run_later(wait, |act, ctx| act.queue_changed(ctx));
                Some(EventKind::TaskRetrying)
            }
            Outcome::Canceled => Some(EventKind::TaskCanceled),
            Outcome::Release => None,
        };
        if let Some(kind) = kind {
            self.log(&settled.session, kind, actor, &data);
        }
        if state.is_terminal()
            && let Some(watcher) = self.watchers.remove(&settlement.task)
        {
            let (output, error) = match &settlement.outcome {
                Outcome::Completed { output } => (serde_json::from_str(output.get()).ok(), None),
                Outcome::Failed { error } => (None, Some(error.clone())),
                _ => (None, None),
            };
            watcher.do_send(TaskFinished {
                task: settlement.task.clone(),
                state,
                output,
                error,
            });
        }
        match cause {
            SettleCause::Report {
                worker,
                reference,
                refusal,
            } => {
                if let Some(slot) = self.workers.get(&worker) {
                    match refusal {
                        Some(refusal) => slot.send(&WorkerFrame::error(
                            reference,
                            Some(settlement.task.clone()),
                            &refusal,
                        )),
                        None if reference.is_some() => slot.send(&WorkerFrame::Ack {
                            reference,
                            task: Some(settlement.task.clone()),
                        }),
                        None => {}
                    }
                }
            }
            SettleCause::Cancel { reply, .. } => {
                let _ = reply.send(Ok(()));
            }
            SettleCause::Lapsed { .. } | SettleCause::Released => {}
        }
        if matches!(settlement.outcome, Outcome::Release) {
            self.queue_changed(ctx);
        }
    }

    /// Retries a task whose holder lost it, or fails it for good once its attempts are spent.
    fn lapse(
        &mut self,
        task: TaskId,
        lease: LeaseId,
        attempt: u32,
        max_attempts: u32,
        error: String,
        ctx: &mut Context<Self>,
    ) {
        let worker = self
            .held
            .get(&task)
            .filter(|h| h.lease == lease)
            .map(|h| h.worker.clone());
        let outcome = self.retry_or_fail(attempt, max_attempts, error);
        self.push_settlement(
            Settlement {
                task,
                expect: Expect::Lease(lease),
                outcome,
            },
            SettleCause::Lapsed { worker },
            ctx,
        );
    }

    fn retry_or_fail(&self, attempt: u32, max_attempts: u32, error: String) -> Outcome {
        if attempt >= max_attempts {
            Outcome::Failed {
                error: format!("{error} (attempt {attempt} of {max_attempts})"),
            }
        } else {
            let wait = chrono::Duration::from_std(self.config.backoff(attempt)).unwrap_or_default();
            Outcome::Retry {
                error,
                not_before: Utc::now() + wait,
            }
        }
    }

    /// Checks that a session that is not live exists and is not archived (creating it, as
    /// joining does for writers) before its task is queued. Submissions for a session being
    /// opened wait for that one open, so a flood costs one store round trip, not one each.
    fn open_then_insert(
        &mut self,
        task: NewTask,
        actor: LogActor,
        reply: oneshot::Sender<Result<TaskRecord, Refusal>>,
        ctx: &mut Context<Self>,
    ) {
        let session = task.session.clone();
        let waiting = self.opening.entry(session.clone()).or_default();
        waiting.push((task, actor, reply));
        if waiting.len() > 1 {
            return;
        }
        let store = self.store.clone();
        async move {
            store
                .open_session(&session)
                .await
                .map(|record| (session, record))
        }
        .into_actor(self)
        .map(|opened, act, ctx| {
            let (session, refusal) = match opened {
                Ok((session, record)) if record.archived => {
                    let refusal = Refusal::not_found(format!("session {session} was archived"));
                    (session, Some(refusal))
                }
                Ok((session, _)) => {
                    // Live from now on, so later submissions skip the store.
                    let _ = act.registry.activate(&session);
                    (session, None)
                }
                Err(err) => {
                    tracing::warn!(%err, "store unavailable while submitting a task");
                    // Which session failed is not known here; refuse every waiting one.
                    for (_, waiting) in act.opening.drain() {
                        for (_, _, reply) in waiting {
                            let _ = reply.send(Err(Refusal::storage_unavailable()));
                        }
                    }
                    return;
                }
            };
            for (task, actor, reply) in act.opening.remove(&session).unwrap_or_default() {
                match &refusal {
                    Some(refusal) => {
                        let _ = reply.send(Err(refusal.clone()));
                    }
                    None => act.enqueue_insert(task, actor, reply, ctx),
                }
            }
        })
        .spawn(ctx);
    }

    fn enqueue_insert(
        &mut self,
        task: NewTask,
        actor: LogActor,
        reply: oneshot::Sender<Result<TaskRecord, Refusal>>,
        ctx: &mut Context<Self>,
    ) {
        self.pending.inserts.push(task.clone());
        self.pending_after
            .push(AfterWrite::Inserted { task, actor, reply });
        self.flush(ctx);
    }

    // ---- claims ----

    /// Offers the free slots of one capability group to the queue.
    fn try_claim(&mut self, ctx: &mut Context<Self>) {
        if self.claiming {
            return;
        }
        let mut groups: BTreeMap<Vec<TaskKind>, Vec<(WorkerId, u32)>> = BTreeMap::new();
        for (id, worker) in &self.workers {
            let free = worker.free();
            if free > 0 && self.dry.get(&worker.capabilities) != Some(&self.queue_generation) {
                groups
                    .entry(worker.capabilities.clone())
                    .or_default()
                    .push((id.clone(), free));
            }
        }
        if groups.is_empty() {
            return;
        }
        self.group_cursor = self.group_cursor.wrapping_add(1);
        let pick = self.group_cursor % groups.len();
        let Some((kinds, mut members)) = groups.into_iter().nth(pick) else {
            return;
        };
        // Interleave the group's workers, so a short claim spreads over them.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let mut slots = Vec::new();
        let mut round = 0;
        while members.iter().any(|(_, free)| *free > round) {
            for (id, free) in &members {
                if *free > round {
                    slots.push(id.clone());
                }
            }
            round += 1;
        }
        for id in &slots {
            if let Some(worker) = self.workers.get_mut(id) {
                worker.reserved += 1;
            }
        }
        self.claiming = true;
        let generation = self.queue_generation;
        let claim = Claim {
            kinds: kinds.clone(),
            now: Utc::now(),
            lease_ttl_ms: self.config.lease_ttl().num_milliseconds(),
        };
        let store = self.store.clone();
        async move {
            let result = store.claim_tasks(&claim, &slots).await;
            (slots, result)
        }
        .into_actor(self)
        .map(move |(slots, result), act, ctx| {
            act.claiming = false;
            for id in &slots {
                if let Some(worker) = act.workers.get_mut(id) {
                    worker.reserved = worker.reserved.saturating_sub(1);
                }
            }
            let claimed = match result {
                Ok(claimed) => claimed,
                Err(err) => {
                    tracing::warn!(%err, "claim failed; the sweep will try again");
                    act.dry.insert(kinds, generation);
                    return;
                }
            };
            if claimed.len() < slots.len() {
                act.dry.insert(kinds, generation);
            }
            for (slot, task) in claimed {
                match slots.get(slot) {
                    Some(worker) => act.assign(worker.clone(), task, ctx),
                    None => act.release(task, ctx),
                }
            }
            act.try_claim(ctx);
        })
        .spawn(ctx);
    }

    /// Hands a claimed task to its worker, or releases it if the worker went away meanwhile.
    fn assign(&mut self, worker_id: WorkerId, task: ClaimedTask, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get_mut(&worker_id).filter(|w| !w.draining) else {
            return self.release(task, ctx);
        };
        worker.load += 1;
        let frame = WorkerFrame::Assign {
            task: Assignment {
                id: task.id.clone(),
                lease: task.lease.clone(),
                kind: task.kind.clone(),
                input: serde_json::from_str(task.input.get()).unwrap_or(serde_json::Value::Null),
                session: task.session.clone(),
                attempt: task.attempt,
                deadline: task.deadline.to_rfc3339_opts(SecondsFormat::Millis, true),
            },
        };
        worker.send(&frame);
        telemetry::task_transition(TaskState::Working.as_str());
        self.log(
            &task.session,
            EventKind::TaskWorking,
            self.worker_actor(&worker_id),
            &TaskEventData::new(&task.id, &task.kind, task.attempt, Some(&worker_id)),
        );
        self.held.insert(
            task.id,
            Holding {
                worker: worker_id,
                lease: task.lease,
                session: task.session,
                kind: task.kind,
                attempt: task.attempt,
                max_attempts: task.max_attempts,
            },
        );
    }

    fn release(&mut self, task: ClaimedTask, ctx: &mut Context<Self>) {
        self.push_settlement(
            Settlement {
                task: task.id,
                expect: Expect::Lease(task.lease),
                outcome: Outcome::Release,
            },
            SettleCause::Released,
            ctx,
        );
    }

    // ---- the sweep ----

    fn sweep(&mut self, ctx: &mut Context<Self>) {
        self.queue_changed(ctx);
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let store = self.store.clone();
        async move { store.expired_leases(Utc::now(), SWEEP_BATCH).await }
            .into_actor(self)
            .map(|result, act, ctx| {
                act.sweeping = false;
                let expired = match result {
                    Ok(expired) => expired,
                    Err(err) => {
                        tracing::warn!(%err, "lease sweep failed");
                        return;
                    }
                };
                for lease in expired {
                    let error = if lease.timed_out {
                        "timed out: the task ran past its timeout_s".to_owned()
                    } else {
                        "lease expired: its worker stopped heartbeating".to_owned()
                    };
                    tracing::info!(task = %lease.task, %error, "retrying a lapsed task");
                    act.lapse(
                        lease.task,
                        lease.lease,
                        lease.attempt,
                        lease.max_attempts,
                        error,
                        ctx,
                    );
                }
            })
            .spawn(ctx);
    }
}

fn submitted_record(task: NewTask) -> TaskRecord {
    TaskRecord {
        id: task.id,
        kind: task.spec.kind,
        state: TaskState::Submitted,
        attempt: 0,
        session: task.session,
        input: task.spec.input,
        output: None,
        error: None,
        priority: task.spec.priority,
        max_attempts: task.spec.max_attempts,
        timeout_s: task.spec.timeout_s,
        worker: None,
        submitted_by: task.submitted_by,
        created_at: task.at,
        updated_at: task.at,
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.config.sweep_every, |act, ctx| act.sweep(ctx));
        if self.config.bus.kind() != "local" {
            let bus = self.config.bus.clone();
            async move { bus.subscribe(&Channel::Tasks).await }
                .into_actor(self)
                .map(|subscribed, act, ctx| match subscribed {
                    Ok(wakeups) => {
                        ctx.add_stream(wakeups.into_stream());
                    }
                    Err(err) => {
                        tracing::warn!(%err, node = %act.config.node, "no task wake-ups from other nodes; the sweep still finds their tasks");
                    }
                })
                .spawn(ctx);
        }
    }
}

/// What a crashed scheduler leaves its successor: the connected workers, the leases it handed
/// them, and who is watching which task.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Adopt {
    workers: Vec<(WorkerId, WorkerSlot)>,
    held: Vec<(TaskId, Holding)>,
    watchers: Vec<(TaskId, Recipient<TaskFinished>)>,
}

impl Adopt {
    /// Tells every worker that the node has stopped scheduling, and closes its socket: it
    /// reconnects to a node that schedules (its leases lapse and are retried there).
    pub(super) fn abandon(self, refusal: &Refusal) {
        let frame = WorkerFrame::error(None, None, refusal).encode();
        telemetry::workers_connected(-i32::try_from(self.workers.len()).unwrap_or(i32::MAX));
        for (_, worker) in self.workers {
            worker.outbox.do_send(ToWorker {
                frame: frame.clone(),
                then_close: true,
            });
        }
    }
}

/// The supervision hook: a scheduler is only ever dropped by a crash (a panic unwinds through
/// here) or by its arbiter stopping at shutdown. Its workers stay connected and are handed to a
/// successor rebuilt from the store, the queue's checkpoint.
impl Drop for Scheduler {
    fn drop(&mut self) {
        let Some(handle) = self.handle.upgrade() else {
            return;
        };
        let survivors = Adopt {
            workers: self.workers.drain().collect(),
            held: self.held.drain().collect(),
            watchers: self.watchers.drain().collect(),
        };
        handle.restart_crashed(survivors);
    }
}

impl Handler<Adopt> for Scheduler {
    type Result = ();

    /// Takes over a crashed predecessor's workers. Every lease it handed out is retried (the
    /// holder is sent `cancel` first, so its slot is free before anything new is assigned):
    /// reports in the predecessor's unwritten batch died with it, so none of those leases can be
    /// trusted to settle. Delivery stays at least once.
    fn handle(&mut self, msg: Adopt, ctx: &mut Context<Self>) {
        for (id, mut worker) in msg.workers {
            worker.load = 0;
            worker.reserved = 0;
            self.workers.insert(id, worker);
        }
        self.watchers.extend(msg.watchers);
        for (task, holding) in msg.held {
            if let Some(worker) = self.workers.get_mut(&holding.worker) {
                worker.load += 1;
            }
            let (lease, attempt, max_attempts) =
                (holding.lease.clone(), holding.attempt, holding.max_attempts);
            self.held.insert(task.clone(), holding);
            self.lapse(
                task,
                lease,
                attempt,
                max_attempts,
                "the scheduler restarted while the task was running".to_owned(),
                ctx,
            );
        }
        self.queue_changed(ctx);
    }
}

/// Makes the scheduler panic, to test its supervision. Only in `fault-injection` builds.
#[cfg(feature = "fault-injection")]
#[derive(Message)]
#[rtype(result = "()")]
pub struct InjectSchedulerPanic;

#[cfg(feature = "fault-injection")]
impl Handler<InjectSchedulerPanic> for Scheduler {
    type Result = ();

    fn handle(&mut self, _: InjectSchedulerPanic, _ctx: &mut Context<Self>) {
        panic!(
            "injected panic in the scheduler of node {}",
            self.config.node
        );
    }
}

/// A wake-up from the bus: some node queued tasks (this one's own are skipped).
impl StreamHandler<bytes::Bytes> for Scheduler {
    fn handle(&mut self, from: bytes::Bytes, ctx: &mut Context<Self>) {
        if from.as_ref() != self.config.node.as_bytes() {
            self.queue_changed(ctx);
        }
    }

    /// The wake-ups stream never ends on its own; if it does, the sweep carries on alone.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl Handler<RegisterWorker> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: RegisterWorker, ctx: &mut Context<Self>) {
        let mut capabilities = msg.capabilities;
        capabilities.sort();
        capabilities.dedup();
        telemetry::workers_connected(1);
        self.workers.insert(
            msg.id,
            WorkerSlot {
                name: msg.name,
                user: msg.user,
                capabilities,
                capacity: msg.capacity,
                load: 0,
                reserved: 0,
                draining: false,
                outbox: msg.outbox,
                connected_at: Utc::now(),
            },
        );
        self.try_claim(ctx);
    }
}

impl Handler<WorkerGone> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: WorkerGone, ctx: &mut Context<Self>) {
        if self.workers.remove(&msg.id).is_none() {
            return;
        }
        telemetry::workers_connected(-1);
        let lost: Vec<(TaskId, LeaseId, u32, u32)> = self
            .held
            .iter()
            .filter(|(_, h)| h.worker == msg.id)
            .map(|(id, h)| (id.clone(), h.lease.clone(), h.attempt, h.max_attempts))
            .collect();
        for (task, lease, attempt, max_attempts) in lost {
            self.lapse(
                task,
                lease,
                attempt,
                max_attempts,
                "its worker disconnected".to_owned(),
                ctx,
            );
        }
    }
}

impl Handler<WorkerHeartbeat> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: WorkerHeartbeat, ctx: &mut Context<Self>) {
        let Some(worker) = self.workers.get(&msg.id) else {
            return;
        };
        if worker.load == 0 {
            return;
        }
        let expires = Utc::now() + self.config.lease_ttl();
        match self
            .pending
            .renewals
            .iter_mut()
            .find(|r| r.worker == msg.id)
        {
            Some(renewal) => renewal.expires = expires,
            None => self.pending.renewals.push(Renewal {
                worker: msg.id,
                expires,
            }),
        }
        self.flush(ctx);
    }
}

impl Handler<DrainWorker> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: DrainWorker, _ctx: &mut Context<Self>) {
        if let Some(worker) = self.workers.get_mut(&msg.id) {
            worker.draining = true;
        }
    }
}

impl Handler<Report> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: Report, ctx: &mut Context<Self>) {
        let current = self
            .held
            .get(&msg.task)
            .filter(|h| h.lease == msg.lease && h.worker == msg.worker);
        let Some(holding) = current else {
            if let Some(worker) = self.workers.get(&msg.worker) {
                let refusal = Refusal::new(
                    ErrorCode::Conflict,
                    format!(
                        "lease {} of task {} is stale or unknown",
                        msg.lease, msg.task
                    ),
                );
                worker.send(&WorkerFrame::error(msg.reference, Some(msg.task), &refusal));
            }
            return;
        };
        let (attempt, max_attempts, session, kind) = (
            holding.attempt,
            holding.max_attempts,
            holding.session.clone(),
            holding.kind.clone(),
        );
        let cause = |refusal| SettleCause::Report {
            worker: msg.worker.clone(),
            reference: msg.reference.clone(),
            refusal,
        };
        let (outcome, refusal) = match msg.report {
            TaskReport::Progress(data) => {
                self.log(
                    &session,
                    EventKind::TaskProgress,
                    self.worker_actor(&msg.worker),
                    &TaskEventData {
                        progress: Some(&data),
                        ..TaskEventData::new(&msg.task, &kind, attempt, Some(&msg.worker))
                    },
                );
                if let Some(worker) = self.workers.get(&msg.worker)
                    && msg.reference.is_some()
                {
                    worker.send(&WorkerFrame::Ack {
                        reference: msg.reference,
                        task: Some(msg.task),
                    });
                }
                return;
            }
            TaskReport::Complete(output) if output.get().len() > self.config.max_output_bytes => {
                let error = format!(
                    "output of {} bytes exceeds the limit of {} bytes",
                    output.get().len(),
                    self.config.max_output_bytes
                );
                let refusal = Refusal::new(ErrorCode::TooLarge, error.clone());
                (Outcome::Failed { error }, Some(refusal))
            }
            TaskReport::Complete(output) => (Outcome::Completed { output }, None),
            TaskReport::Fail {
                error,
                retryable: true,
            } => (self.retry_or_fail(attempt, max_attempts, error), None),
            TaskReport::Fail {
                error,
                retryable: false,
            } => (Outcome::Failed { error }, None),
        };
        let settlement = Settlement {
            task: msg.task.clone(),
            expect: Expect::Lease(msg.lease.clone()),
            outcome,
        };
        self.push_settlement(settlement, cause(refusal), ctx);
    }
}

impl Handler<SubmitTask> for Scheduler {
    type Result = ResponseFuture<Result<TaskRecord, Refusal>>;

    fn handle(&mut self, msg: SubmitTask, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        let task = NewTask {
            id: TaskId::generate(),
            session: msg.session,
            spec: msg.spec,
            submitted_by: msg.actor.id.clone(),
            at: Utc::now(),
            target: msg.target,
        };
        if let Some(watcher) = msg.watcher {
            self.watchers.insert(task.id.clone(), watcher);
        }
        if self.registry.live(&task.session).is_some() {
            // A live session is not archived: no need to ask the store.
            self.enqueue_insert(task, msg.actor, reply, ctx);
        } else {
            self.open_then_insert(task, msg.actor, reply, ctx);
        }
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(Refusal::new(ErrorCode::Internal, "the scheduler stopped")))
        })
    }
}

impl Handler<CancelTask> for Scheduler {
    type Result = ResponseFuture<Result<(), Refusal>>;

    fn handle(&mut self, msg: CancelTask, ctx: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.push_settlement(
            Settlement {
                task: msg.task,
                expect: Expect::Open,
                outcome: Outcome::Canceled,
            },
            SettleCause::Cancel {
                reply,
                actor: msg.actor,
            },
            ctx,
        );
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err(Refusal::new(ErrorCode::Internal, "the scheduler stopped")))
        })
    }
}

impl Handler<WatchTask> for Scheduler {
    type Result = ();

    fn handle(&mut self, msg: WatchTask, ctx: &mut Context<Self>) {
        self.watchers.insert(msg.task.clone(), msg.watcher);
        // It may have ended already (while its watcher was down): check the store.
        let store = self.store.clone();
        let task = msg.task;
        async move { store.task(&task).await.map(|record| (task, record)) }
            .into_actor(self)
            .map(|found, act, _ctx| {
                let Ok((task, Some(record))) = found else {
                    return;
                };
                if record.state.is_terminal()
                    && let Some(watcher) = act.watchers.remove(&task)
                {
                    watcher.do_send(TaskFinished {
                        task,
                        state: record.state,
                        output: record
                            .output
                            .and_then(|o| serde_json::from_str(o.get()).ok()),
                        error: record.error,
                    });
                }
            })
            .spawn(ctx);
    }
}

impl Handler<PickWorkers> for Scheduler {
    type Result = MessageResult<PickWorkers>;

    fn handle(&mut self, msg: PickWorkers, _ctx: &mut Context<Self>) -> Self::Result {
        let mut capable: Vec<(u32, u64, WorkerId)> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.draining && w.capabilities.contains(&msg.capability))
            .map(|(id, w)| (w.load, rand::random::<u64>(), id.clone()))
            .collect();
        capable.sort();
        MessageResult(
            capable
                .into_iter()
                .take(msg.count)
                .map(|(_, _, id)| id)
                .collect(),
        )
    }
}

impl Handler<ListWorkers> for Scheduler {
    type Result = MessageResult<ListWorkers>;

    fn handle(&mut self, _: ListWorkers, _ctx: &mut Context<Self>) -> Self::Result {
        let mut workers: Vec<WorkerView> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                name: w.name.clone(),
                user: w.user.clone(),
                capabilities: w.capabilities.clone(),
                capacity: w.capacity,
                load: w.load,
                draining: w.draining,
                node: self.config.node.clone(),
                connected_at: w.connected_at,
            })
            .collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        MessageResult(workers)
    }
}

/// Decodes opaque JSON a worker sent into the raw form the store and log keep.
pub fn raw_json(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
}
