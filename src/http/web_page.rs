//! The bundled web page: the files under `static/`, embedded in release builds (and read from
//! disk in debug builds), so the binary serves the page from any working directory.

use actix_web::{HttpResponse, get, web};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "static/"]
struct Assets;

/// Serves `/` as `index.html`, and every other file by its path.
#[get("/{path:.*}")]
pub async fn asset(path: web::Path<String>) -> HttpResponse {
    let path = match path.as_str() {
        "" => "index.html",
        other => other,
    };
    match Assets::get(path) {
        Some(file) => HttpResponse::Ok()
            .content_type(file.metadata.mimetype())
            .insert_header(("Cache-Control", "no-cache"))
            .body(file.data.into_owned()),
        None => HttpResponse::NotFound().json(serde_json::json!({
            "error": {"code": "not_found", "message": format!("no such page: /{path}")}
        })),
    }
}
