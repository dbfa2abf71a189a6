//! REST for tasks and workers: submit, read and cancel a task, and list the connected workers.
//! The checks are the socket's own (`tasks::access`), so both doors answer alike.

use std::sync::Arc;

use actix_web::{get, post, web};

use super::rest::{ApiResult, Caller, ErrorBody, existing_session, session_id};
use crate::node::Node;
use crate::protocol::{Refusal, TaskId};
use crate::tasks::{ListWorkers, TaskRecord, TaskRequest, WorkerView, access};

fn task_id(raw: &str) -> ApiResult<TaskId> {
    TaskId::parse(raw).map_err(|e| Refusal::bad_request(e.to_string()).into())
}

/// Submits a task to the session's queue; answers with the task once it is durable.
#[utoipa::path(
    params(("id" = String, Path, description = "session id")),
    request_body = TaskRequest,
    responses(
        (status = 201, body = TaskRecord),
        (status = 400, body = ErrorBody, description = "a field is out of bounds"),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "not stored; nothing was queued")
    )
)]
#[post("/v1/sessions/{id}/tasks")]
pub async fn submit_task(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
    body: web::Json<TaskRequest>,
) -> ApiResult<actix_web::HttpResponse> {
    let id = session_id(&path)?;
    caller.check_session(&id)?;
    caller.check_write()?;
    existing_session(&node, &id).await?;
    let task = access::submit(&node, &caller, id, body.into_inner()).await?;
    Ok(actix_web::HttpResponse::Created().json(task))
}

/// One task, with its state, attempt, and output or error.
#[utoipa::path(
    params(("id" = String, Path, description = "task id")),
    responses((status = 200, body = TaskRecord), (status = 404, body = ErrorBody))
)]
#[get("/v1/tasks/{id}")]
pub async fn get_task(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
) -> ApiResult<web::Json<TaskRecord>> {
    let id = task_id(&path)?;
    Ok(web::Json(access::read(&node, &caller, &id).await?))
}

/// Cancels a task: a queued one at once, a working one by telling its worker.
#[utoipa::path(
    params(("id" = String, Path, description = "task id")),
    responses(
        (status = 200, body = TaskRecord),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the task is already done")
    )
)]
#[post("/v1/tasks/{id}/cancel")]
pub async fn cancel_task(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
) -> ApiResult<web::Json<TaskRecord>> {
    let id = task_id(&path)?;
    Ok(web::Json(access::cancel(&node, &caller, id).await?))
}

/// The workers connected to this node, with their load.
#[utoipa::path(responses((status = 200, body = [WorkerView])))]
#[get("/v1/workers")]
pub async fn list_workers(
    node: web::Data<Arc<Node>>,
    Caller(_caller): Caller,
) -> ApiResult<web::Json<Vec<WorkerView>>> {
    let workers = node.scheduler.addr().send(ListWorkers).await.map_err(|_| {
        Refusal::new(
            crate::protocol::ErrorCode::Internal,
            "the scheduler is not running",
        )
    })?;
    Ok(web::Json(workers))
}
