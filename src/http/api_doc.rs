//! The OpenAPI document, generated from the handlers' annotations and the
//! types their answers are made of, so it follows them.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use utoipa::OpenApi;

use super::{dead_letters, feed, health, orders, ui, Shared};

#[derive(OpenApi)]
#[openapi(
    info(
        description = "Orders taken off Kafka, kept in PostgreSQL and served from a tiered cache. \
        Orders are immutable: responses carry a strong ETag."
    ),
    paths(
        orders::order,
        orders::recent,
        dead_letters::list,
        dead_letters::one,
        feed::stream,
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
        ui::index,
        ui::order_page,
        ui::rejected_page,
        ui::script,
        ui::style,
    )
)]
struct ApiDoc;

/// Built once, on the first request.
static DOCUMENT: LazyLock<Bytes> = LazyLock::new(|| {
    Bytes::from(
        ApiDoc::openapi()
            .to_json()
            .expect("the document serializes"),
    )
});

pub fn router() -> Router<Shared> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// This document
#[utoipa::path(
    get,
    path = "/openapi.json",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.clone(),
    )
}
