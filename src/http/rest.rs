//! REST handlers under `/v1`, as in PROTOCOL.md. JSON in, JSON out; errors are
//! `{"error":{"code","message"}}` with the status that matches the code.

use std::sync::Arc;

use std::future::{Ready, ready};

use actix_web::http::StatusCode;
use actix_web::http::header::AUTHORIZATION;
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, delete, get, post, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Principal;
use crate::node::Node;
use crate::protocol::DocName;
use crate::protocol::frames::DocSummary;
use crate::protocol::{ErrorCode, Refusal, SessionId, UserInfo};
use crate::session::log::{Actor, Event};
use crate::session::ot::Component;
use crate::session::{Archive, Edit, Inspect, LiveView, PostChat, ReadDoc, Reply};
use crate::store::{SessionRecord, StoreError};

/// The most events or sessions one page returns.
const MAX_PAGE: u32 = 1000;

/// A REST error: a [`Refusal`] rendered with its HTTP status.
#[derive(Debug)]
pub struct ApiError(pub Refusal);

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
struct ErrorDetail {
    code: ErrorCode,
    message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        crate::telemetry::error(self.0.code);
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: ErrorDetail {
                code: self.0.code,
                message: self.0.message.clone(),
            },
        })
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        Self(refusal)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::warn!(%err, "store error on a REST request");
        Self(Refusal::new(
            ErrorCode::StorageUnavailable,
            "the store is unavailable",
        ))
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller of a REST route, from `Authorization: Bearer <jwt>` (or anonymous,
/// where the server admits anonymous users).
pub struct Caller(pub Principal);

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let Some(node) = req.app_data::<web::Data<Arc<Node>>>() else {
            return ready(Err(Refusal::new(ErrorCode::Internal, "node missing").into()));
        };
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim());
        ready(
            node.auth
                .authenticate(token, None)
                .map(Caller)
                .map_err(|failure| failure.refusal("rest").into()),
        )
    }
}

pub(super) fn session_id(raw: &str) -> ApiResult<SessionId> {
    SessionId::parse(raw).map_err(|e| Refusal::bad_request(e.to_string()).into())
}

fn clamp_limit(limit: Option<u32>, default: u32) -> u32 {
    limit.unwrap_or(default).clamp(1, MAX_PAGE)
}

/// A session as REST shows it.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    id: String,
    title: String,
    #[schema(value_type = String, format = DateTime)]
    created_at: DateTime<Utc>,
    /// The offset of the last committed event.
    offset: u64,
    epoch: String,
    docs: Vec<DocSummary>,
    members: Vec<UserInfo>,
    /// The node that owns the session now, if it is live.
    owner: Option<String>,
}

impl SessionView {
    fn new(record: SessionRecord, live: Option<LiveView>, node: &Node) -> Self {
        let owner = live.as_ref().map(|_| node.id.clone());
        let live = live.unwrap_or_default();
        Self {
            id: record.id.to_string(),
            title: record.title,
            created_at: record.created_at,
            offset: record.offset,
            epoch: record.epoch,
            docs: live.docs,
            members: live.members,
            owner,
        }
    }
}

#[derive(Deserialize, ToSchema)]
pub struct CreateSession {
    /// The session's name; a UUIDv7 when omitted.
    id: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

/// Creates a session.
#[utoipa::path(
    request_body = CreateSession,
    responses(
        (status = 201, body = SessionView),
        (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "a session with this id exists")
    )
)]
#[post("/v1/sessions")]
pub async fn create_session(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    body: web::Json<CreateSession>,
) -> ApiResult<HttpResponse> {
    caller.check_write()?;
    let body = body.into_inner();
    let id = match body.id {
        Some(raw) => session_id(&raw)?,
        None => session_id(&uuid::Uuid::now_v7().to_string())?,
    };
    caller.check_session(&id)?;
    let title = body.title.unwrap_or_else(|| id.to_string());
    let Some(record) = node.store.create_session(&id, &title).await? else {
        return Err(Refusal::new(ErrorCode::Conflict, format!("session {id} exists")).into());
    };
    Ok(HttpResponse::Created().json(SessionView::new(record, None, &node)))
}

#[derive(Deserialize, IntoParams)]
pub struct PageQuery {
    /// Return items after this cursor (a session id).
    after: Option<String>,
    /// At most this many items (1 to 1000, default 100).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionPage {
    sessions: Vec<SessionView>,
    /// Pass as `after` for the next page; absent on the last page.
    next: Option<String>,
}

/// Lists sessions, ordered by id, a page at a time.
#[utoipa::path(params(PageQuery), responses((status = 200, body = SessionPage)))]
#[get("/v1/sessions")]
pub async fn list_sessions(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    query: web::Query<PageQuery>,
) -> ApiResult<web::Json<SessionPage>> {
    let after = query.after.as_deref().map(session_id).transpose()?;
    let limit = clamp_limit(query.limit, 100);
    let records = node.store.list_sessions(after.as_ref(), limit).await?;
    let next = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.id.to_string()))
        .flatten();
    let mut sessions = Vec::with_capacity(records.len());
    for record in records.into_iter().filter(|r| caller.scope.allows(&r.id)) {
        let live = inspect(&node, &record.id).await;
        sessions.push(SessionView::new(record, live, &node));
    }
    Ok(web::Json(SessionPage { sessions, next }))
}

async fn inspect(node: &Node, id: &SessionId) -> Option<LiveView> {
    let addr = node.registry.live(id)?;
    addr.send(Inspect).await.ok()
}

pub(super) async fn existing_session(node: &Node, id: &SessionId) -> ApiResult<SessionRecord> {
    match node.store.session(id).await? {
        Some(record) if !record.archived => Ok(record),
        _ => Err(Refusal::not_found(format!("no session {id}")).into()),
    }
}

/// One session, with its offset, documents and present members.
#[utoipa::path(
    params(("id" = String, Path, description = "session id")),
    responses((status = 200, body = SessionView), (status = 404, body = ErrorBody))
)]
#[get("/v1/sessions/{id}")]
pub async fn get_session(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
) -> ApiResult<web::Json<SessionView>> {
    let id = session_id(&path)?;
    caller.check_session(&id)?;
    let record = existing_session(&node, &id).await?;
    let live = inspect(&node, &id).await;
    Ok(web::Json(SessionView::new(record, live, &node)))
}

/// Archives a session: it disappears from listings, and its members are told.
#[utoipa::path(
    params(("id" = String, Path, description = "session id")),
    responses((status = 204), (status = 404, body = ErrorBody))
)]
#[delete("/v1/sessions/{id}")]
pub async fn delete_session(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.check_admin()?;
    let id = session_id(&path)?;
    caller.check_session(&id)?;
    if !node.store.archive_session(&id).await? {
        return Err(Refusal::not_found(format!("no session {id}")).into());
    }
    if let Some(addr) = node.registry.live(&id) {
        // Best effort: an actor that is already gone has nobody to tell.
        let _ = addr.send(Archive).await;
    }
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize, IntoParams)]
pub struct EventsQuery {
    /// Return events with offsets above this one (default 0: from the start).
    after: Option<u64>,
    /// At most this many events (1 to 1000, default 100).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct EventPage {
    events: Vec<Event>,
}

/// A session's events in offset order.
#[utoipa::path(
    params(("id" = String, Path, description = "session id"), EventsQuery),
    responses((status = 200, body = EventPage), (status = 404, body = ErrorBody))
)]
#[get("/v1/sessions/{id}/events")]
pub async fn list_events(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
    query: web::Query<EventsQuery>,
) -> ApiResult<web::Json<EventPage>> {
    let id = session_id(&path)?;
    caller.check_session(&id)?;
    existing_session(&node, &id).await?;
    let limit = clamp_limit(query.limit, 100);
    let events = node
        .store
        .events_after(&id, query.after.unwrap_or(0), limit)
        .await?;
    Ok(web::Json(EventPage { events }))
}

#[derive(Deserialize, ToSchema)]
pub struct PostMessage {
    text: String,
    /// The display name to post under (anonymous callers only; a token names its holder).
    name: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Posted {
    offset: u64,
}

/// Posts a chat message; answers once it is committed.
#[utoipa::path(
    params(("id" = String, Path, description = "session id")),
    request_body = PostMessage,
    responses(
        (status = 200, body = Posted),
        (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "not committed; nothing was appended")
    )
)]
#[post("/v1/sessions/{id}/messages")]
pub async fn post_message(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<String>,
    body: web::Json<PostMessage>,
) -> ApiResult<web::Json<Posted>> {
    let id = session_id(&path)?;
    caller.check_session(&id)?;
    caller.check_write()?;
    let body = body.into_inner();
    let mut user = crate::protocol::UserInfo::clone(&caller.user);
    if caller.anonymous
        && let Some(name) = body
            .name
            .as_deref()
            .map(str::trim)
            .filter(|n| !n.is_empty())
    {
        user.name = crate::auth::display_name(Some(name));
    }
    existing_session(&node, &id).await?;
    let committed = commit(&node, &id, |reply| PostChat {
        conn: None,
        actor: Actor {
            id: user.id,
            name: user.name,
        },
        text: body.text,
        reply,
    })
    .await?;
    let offset = committed
        .offset
        .ok_or_else(|| Refusal::new(ErrorCode::Internal, "commit carried no offset"))?;
    Ok(web::Json(Posted { offset }))
}

/// Sends a write to its session and waits until it is committed (or refused).
async fn commit<M>(
    node: &Node,
    id: &SessionId,
    build: impl FnOnce(Reply) -> M,
) -> ApiResult<crate::session::Committed>
where
    M: actix::Message<Result = ()> + Send + 'static,
    crate::session::SessionActor: actix::Handler<M>,
{
    let (reply, answer) = Reply::http();
    node.registry
        .activate(id)?
        .send(build(reply))
        .await
        .map_err(|_| Refusal::session_unavailable())?;
    Ok(answer.await.map_err(|_| Refusal::session_unavailable())??)
}

fn doc_name(raw: &str) -> ApiResult<DocName> {
    DocName::parse(raw).map_err(|e| Refusal::bad_request(e.to_string()).into())
}

/// A document's committed text and version (version 0 and empty before its first edit).
#[utoipa::path(
    params(("id" = String, Path, description = "session id"), ("doc" = String, Path, description = "document name")),
    responses((status = 200, body = DocSummary), (status = 404, body = ErrorBody))
)]
#[get("/v1/sessions/{id}/docs/{doc}")]
pub async fn get_doc(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<(String, String)>,
) -> ApiResult<web::Json<DocSummary>> {
    let (id, doc) = path.into_inner();
    let (id, doc) = (session_id(&id)?, doc_name(&doc)?);
    caller.check_session(&id)?;
    existing_session(&node, &id).await?;
    let summary = node
        .registry
        .activate(&id)?
        .send(ReadDoc { doc })
        .await
        .map_err(|_| Refusal::session_unavailable())??;
    Ok(web::Json(summary))
}

#[derive(Deserialize, ToSchema)]
pub struct EditBody {
    /// The document version the operations were written against.
    base: u64,
    /// `{"retain":n}`, `{"insert":"text"}` and `{"delete":n}`, in UTF-16 code units.
    #[schema(value_type = Vec<Object>)]
    ops: Vec<Component>,
}

#[derive(Serialize, ToSchema)]
pub struct EditResult {
    version: u64,
}

/// Applies a JSON edit (rebased if `base` is stale); answers once it is committed.
#[utoipa::path(
    params(("id" = String, Path, description = "session id"), ("doc" = String, Path, description = "document name")),
    request_body = EditBody,
    responses(
        (status = 200, body = EditResult),
        (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "resync_required: base older than the history kept"),
        (status = 503, body = ErrorBody)
    )
)]
#[post("/v1/sessions/{id}/docs/{doc}/edits")]
pub async fn post_edit(
    node: web::Data<Arc<Node>>,
    Caller(caller): Caller,
    path: web::Path<(String, String)>,
    body: web::Json<EditBody>,
) -> ApiResult<web::Json<EditResult>> {
    let (id, doc) = path.into_inner();
    let (id, doc) = (session_id(&id)?, doc_name(&doc)?);
    caller.check_session(&id)?;
    caller.check_write()?;
    existing_session(&node, &id).await?;
    let body = body.into_inner();
    let committed = commit(&node, &id, |reply| Edit {
        conn: None,
        actor: caller.user.actor(),
        doc,
        base: body.base,
        ops: body.ops,
        reply,
    })
    .await?;
    let version = committed
        .doc
        .map(|(_, version)| version)
        .ok_or_else(|| Refusal::new(ErrorCode::Internal, "commit carried no version"))?;
    Ok(web::Json(EditResult { version }))
}
