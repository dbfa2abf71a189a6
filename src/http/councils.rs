//! REST for councils: open one in a session, and read one with its ballots and decision. The
//! checks are the socket's own (`council::access`).

use std::sync::Arc;

use actix_web::{HttpResponse, get, post, web};

use super::rest::{ApiResult, Caller, ErrorBody, existing_session, session_id};
use crate::council::{CouncilRequest, CouncilView, access};
use crate::node::Node;
use crate::protocol::{CouncilId, Refusal};

/// Opens a council; answers with it once its state is durable.
#[utoipa::path(
    params(("id" = String, Path, description = "session id")),
    request_body = CouncilRequest,
    responses(
        (status = 201, body = CouncilView),
        (status = 400, body = ErrorBody, description = "unknown strategy, quorum above the members, bad rounds or timeout"),
        (status = 404, body = ErrorBody)
    )
)]
#[post("/v1/sessions/{id}/councils")]
pub async fn open_council(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
    body: web::Json<CouncilRequest>,
) -> ApiResult<HttpResponse> {
    let id = session_id(&path)?;
    caller.check_session(&id)?;
    caller.check_write()?;
    existing_session(&node, &id).await?;
    let council = access::open(&node, &caller, id, body.into_inner()).await?;
    Ok(HttpResponse::Created().json(access::read(&node, &caller, &council).await?))
}

/// A council: its state, phase, members, every ballot, and its decision once made.
#[utoipa::path(
    params(("id" = String, Path, description = "council id")),
    responses((status = 200, body = CouncilView), (status = 404, body = ErrorBody))
)]
#[get("/v1/councils/{id}")]
pub async fn get_council(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
) -> ApiResult<web::Json<CouncilView>> {
    let id = CouncilId::parse(&path).map_err(|e| Refusal::bad_request(e.to_string()))?;
    Ok(web::Json(access::read(&node, &caller, &id).await?))
}
