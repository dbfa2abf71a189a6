//! The HTTP surface: the socket upgrades, REST under `/v1`, health, metrics, the OpenAPI document
//! with its reference page, and the bundled web page.

mod councils;
mod rest;
mod tasks;
pub mod upgrade;
mod web_page;

use std::sync::Arc;

use actix_web::{HttpResponse, get, web};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::node::Node;
use crate::protocol::Refusal;

/// The OpenAPI document of the REST surface.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Conclave",
        description = "Real-time collaboration for people and AI agents. \
        The sockets (/v1/ws, /v1/yjs, /v1/workers) are described in PROTOCOL.md."
    ),
    paths(
        rest::create_session,
        rest::list_sessions,
        rest::get_session,
        rest::delete_session,
        rest::list_events,
        rest::post_message,
        rest::get_doc,
        rest::post_edit,
        tasks::submit_task,
        tasks::get_task,
        tasks::cancel_task,
        tasks::list_workers,
        councils::open_council,
        councils::get_council,
        healthz,
        readyz,
    )
)]
pub struct ApiDoc;

/// Registers every route on an actix-web app.
pub fn configure(node: Arc<Node>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let json = web::JsonConfig::default()
            .limit(node.limits.max_frame_bytes)
            .error_handler(|err, _req| {
                let refusal = crate::protocol::Refusal::bad_request(err.to_string());
                rest::ApiError(refusal).into()
            });
        let query = web::QueryConfig::default().error_handler(|err, _req| {
            let refusal = crate::protocol::Refusal::bad_request(err.to_string());
            rest::ApiError(refusal).into()
        });
        cfg.app_data(web::Data::new(node))
            .app_data(json)
            .app_data(query)
            .service(rest::create_session)
            .service(rest::list_sessions)
            .service(rest::get_session)
            .service(rest::delete_session)
            .service(rest::list_events)
            .service(rest::post_message)
            .service(rest::get_doc)
            .service(rest::post_edit)
            .service(tasks::submit_task)
            .service(tasks::get_task)
            .service(tasks::cancel_task)
            .service(tasks::list_workers)
            .service(councils::open_council)
            .service(councils::get_council)
            .service(healthz)
            .service(readyz)
            .service(metrics)
            .route("/v1/ws", web::to(websocket_expected))
            .route("/v1/yjs/{session}/{doc}", web::to(websocket_expected))
            .service(web::redirect("/docs", "/docs/"));
        #[cfg(feature = "fault-injection")]
        cfg.route(
            "/v1/faults/sessions/{id}/panic",
            web::post().to(inject_session_panic),
        )
        .route(
            "/v1/faults/councils/{id}/panic",
            web::post().to(inject_council_panic),
        )
        .route(
            "/v1/faults/scheduler/panic",
            web::post().to(inject_scheduler_panic),
        );
        cfg.service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", ApiDoc::openapi()))
            .service(web_page::asset);
    }
}

/// A request to a WebSocket endpoint that is not an upgrade (upgrades never reach the app; see
/// [`upgrade`]).
async fn websocket_expected() -> actix_web::Result<HttpResponse> {
    Err(rest::ApiError(Refusal::bad_request(
        "this is a WebSocket endpoint: open it with a GET and `Upgrade: websocket`",
    ))
    .into())
}

/// Makes a live session's actor panic, to test supervision. Only in `fault-injection` builds,
/// which release builds never are.
#[cfg(feature = "fault-injection")]
async fn inject_session_panic(
    path: web::Path<String>,
    node: web::Data<Arc<Node>>,
) -> actix_web::Result<HttpResponse> {
    let id = crate::protocol::SessionId::parse(&path)
        .map_err(|e| rest::ApiError(Refusal::bad_request(e.to_string())))?;
    let addr = node
        .registry
        .live(&id)
        .ok_or_else(|| rest::ApiError(Refusal::not_found(format!("session {id} is not live"))))?;
    addr.do_send(crate::session::InjectPanic);
    Ok(HttpResponse::Accepted().finish())
}

/// Makes an open council's actor panic. Only in `fault-injection` builds.
#[cfg(feature = "fault-injection")]
async fn inject_council_panic(
    path: web::Path<String>,
    node: web::Data<Arc<Node>>,
) -> actix_web::Result<HttpResponse> {
    let id = crate::protocol::CouncilId::parse(&path)
        .map_err(|e| rest::ApiError(Refusal::bad_request(e.to_string())))?;
    let (_, addr) = node
        .councils
        .live(&id)
        .ok_or_else(|| rest::ApiError(Refusal::not_found(format!("council {id} is not open"))))?;
    addr.do_send(crate::council::InjectCouncilPanic);
    Ok(HttpResponse::Accepted().finish())
}

/// Makes the node's scheduler panic. Only in `fault-injection` builds.
#[cfg(feature = "fault-injection")]
async fn inject_scheduler_panic(node: web::Data<Arc<Node>>) -> HttpResponse {
    node.scheduler
        .addr()
        .do_send(crate::tasks::InjectSchedulerPanic);
    HttpResponse::Accepted().finish()
}

/// Liveness: the process serves HTTP.
#[utoipa::path(responses((status = 200, description = "alive")))]
#[get("/healthz")]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the store answers.
#[utoipa::path(responses((status = 200, description = "ready"), (status = 503, description = "the store is unreachable")))]
#[get("/readyz")]
async fn readyz(node: web::Data<Arc<Node>>) -> HttpResponse {
    match node.store.ping().await {
        // A node whose scheduler was given up still serves sessions, but must not be sent
        // workers: it is not ready.
        Ok(()) if !node.scheduler.is_running() => {
            HttpResponse::ServiceUnavailable().json(serde_json::json!({
                "status": "unavailable", "store": node.store.backend(), "node": node.id,
                "error": "the scheduler failed repeatedly and was stopped",
            }))
        }
        // A node whose bus is down still serves the sessions it owns: ready, but degraded.
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({
            "status": "ready", "store": node.store.backend(), "node": node.id,
            "bus": node.bus.kind(),
            "bus_state": if node.bus.is_up() { "up" } else { "degraded" },
        })),
        Err(err) => HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "status": "unavailable", "store": node.store.backend(), "error": err.to_string(),
        })),
    }
}

/// Prometheus text exposition.
#[get("/metrics")]
async fn metrics() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::telemetry::render())
}
