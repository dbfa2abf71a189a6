//! The checks and calls every door shares to submit, read and cancel tasks, so the socket and
//! REST answer the same request the same way.

use crate::auth::Principal;
use crate::node::Node;
use crate::protocol::{Refusal, SessionId, TaskId};
use crate::tasks::{CancelTask, SubmitTask, TaskRecord, TaskRequest};

fn scheduler_gone(_: actix::MailboxError) -> Refusal {
    Refusal::new(
        crate::protocol::ErrorCode::Internal,
        "the scheduler is not running",
    )
}

/// Submits a task for `session` on behalf of `principal`, once durable.
pub async fn submit(
    node: &Node,
    principal: &Principal,
    session: SessionId,
    request: TaskRequest,
) -> Result<TaskRecord, Refusal> {
    principal.check_write()?;
    principal.check_session(&session)?;
    let spec = request.validate()?;
    node.scheduler
        .addr()
        .send(SubmitTask {
            session,
            spec,
            actor: principal.user.actor(),
            target: None,
            watcher: None,
        })
        .await
        .map_err(scheduler_gone)?
}

/// Reads a task the principal may see. A task outside the principal's sessions is `forbidden`.
pub async fn read(
    node: &Node,
    principal: &Principal,
    task: &TaskId,
) -> Result<TaskRecord, Refusal> {
    let record = node
        .store
        .task(task)
        .await
        .map_err(|err| {
            tracing::warn!(%err, "store unavailable while reading a task");
            Refusal::storage_unavailable()
        })?
        .ok_or_else(|| Refusal::not_found(format!("no task {task}")))?;
    principal.check_session(&record.session)?;
    Ok(record)
}

/// Cancels a task the principal may write to, and returns it as it now stands.
pub async fn cancel(
    node: &Node,
    principal: &Principal,
    task: TaskId,
) -> Result<TaskRecord, Refusal> {
    principal.check_write()?;
    read(node, principal, &task).await?;
    node.scheduler
        .addr()
        .send(CancelTask {
            task: task.clone(),
            actor: principal.user.actor(),
        })
        .await
        .map_err(scheduler_gone)??;
    read(node, principal, &task).await
}
