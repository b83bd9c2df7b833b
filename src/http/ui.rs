//! The web page: one HTML document, one script, one stylesheet, all built into
//! the binary so it works offline.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::Shared;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/", get(index))
        .route("/orders/{order_uid}", get(order_page))
        .route("/rejected", get(rejected_page))
        .route("/assets/app.js", get(script))
        .route("/assets/app.css", get(style))
}

/// The web page
#[utoipa::path(get, path = "/", responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub(super) async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX)
}

/// The web page, opened on one order (deep link)
#[utoipa::path(
    get,
    path = "/orders/{order_uid}",
    params(("order_uid" = String, Path)),
    responses((status = 200, description = "HTML", content_type = "text/html", body = String))
)]
pub(super) async fn order_page() -> impl IntoResponse {
    index().await
}

/// The web page, opened on the rejected messages (optionally ?stage=)
#[utoipa::path(get, path = "/rejected", responses((status = 200, description = "HTML", content_type = "text/html", body = String)))]
pub(super) async fn rejected_page() -> impl IntoResponse {
    index().await
}

/// The page's script
#[utoipa::path(
    get,
    path = "/assets/app.js",
    responses((status = 200, description = "JavaScript", content_type = "text/javascript", body = String))
)]
pub(super) async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

/// The page's stylesheet
#[utoipa::path(
    get,
    path = "/assets/app.css",
    responses((status = 200, description = "CSS", content_type = "text/css", body = String))
)]
pub(super) async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}
