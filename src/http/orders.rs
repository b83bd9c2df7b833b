use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::rejection::PathRejection;
use axum::extract::FromRequestParts;
use axum::extract::{Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::dead_letters::letters_of_order;
use super::error::ApiError;
use super::io::{on_io, Io};
use super::paging::Page;
use super::Shared;
use crate::cache::CachedOrder;
use crate::domain::OrderUid;
use crate::store::OrderFilter;

pub fn router(io: &Io) -> Router<Shared> {
    Router::new().route("/order/{order_uid}", get(order)).route(
        "/api/orders",
        get(recent).route_layer(middleware::from_fn_with_state(io.clone(), on_io)),
    )
}

/// The order as received. Orders never change, so the ETag (a hash of the
/// bytes, computed when the order was cached) is strong and caches may keep them.
async fn order(
    State(state): State<Shared>,
    path: Result<Path<String>, PathRejection>,
    IfNoneMatch(if_none_match): IfNoneMatch,
) -> Result<Response, ApiError> {
    // Percent-escapes that decode to something other than UTF-8 get the same
    // JSON answer as any other bad id, not the framework's plain text.
    let Path(raw) = path.map_err(|_| ApiError::BadRequest {
        reason: format!(
            "invalid order_uid: not valid percent-encoded UTF-8 (expected {})",
            OrderUid::RULE
        ),
        order_uid: None,
    })?;
    let uid = OrderUid::parse(&raw).map_err(|reason| ApiError::BadRequest {
        reason: format!("invalid order_uid: {reason} (expected {})", OrderUid::RULE),
        order_uid: Some(raw.chars().take(80).collect()),
    })?;
    let order = match state.cache.get_in_memory(&uid) {
        Some(order) => order,
        // The slower tiers, on the runtime that owns their connections.
        None => state.io.clone().run(look_up(state, uid)).await??,
    };
    let cache_control = HeaderValue::from_static("public, max-age=86400, immutable");
    let etag = &order.etag()[..];
    let matches = if_none_match
        .as_ref()
        .map(HeaderValue::as_bytes)
        .is_some_and(|v| {
            v.split(|b| *b == b',')
                .any(|t| t.trim_ascii() == etag || t.trim_ascii() == b"*")
        });
    // Shares the cached bytes; only checks them.
    let etag_header = HeaderValue::from_maybe_shared(order.etag().clone())
        .expect("CachedOrder's ETag is a quoted hex string");
    if matches {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag_header),
                (header::CACHE_CONTROL, cache_control),
            ],
        )
            .into_response());
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag_header),
            (header::CACHE_CONTROL, cache_control),
        ],
        order.json,
    )
        .into_response())
}

/// The request's `If-None-Match`, alone: the `HeaderMap` extractor would copy
/// every header of every request.
struct IfNoneMatch(Option<HeaderValue>);

impl<S: Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self(parts.headers.get(header::IF_NONE_MATCH).cloned()))
    }
}

/// An order not in memory: from Redis or PostgreSQL, or a 404 that says
/// why, when messages that claimed this id were dead-lettered.
async fn look_up(state: Shared, uid: OrderUid) -> Result<CachedOrder, ApiError> {
    match state.cache.get_beyond_memory(&uid).await {
        Ok(Some(order)) => Ok(order),
        Ok(None) => Err(ApiError::NotFound {
            dead_letters: letters_of_order(&state.store, &uid).await,
            order_uid: uid.to_string(),
        }),
        Err(e) => Err(ApiError::Unavailable(e)),
    }
}

/// The most recently ingested orders as summaries, newest first, narrowed by
/// exact `track_number`, `customer_id` or payment `transaction` when given.
/// `before` is the `next_cursor` of the previous page.
async fn recent(
    State(state): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let page = Page::from_params(&params, &["track_number", "customer_id", "transaction"])?;
    let filter = OrderFilter {
        track_number: params.get("track_number").cloned(),
        customer_id: params.get("customer_id").cloned(),
        transaction: params.get("transaction").cloned(),
    };
    let orders = state
        .store
        .recent_orders(&filter, page.limit, page.before)
        .await
        .map_err(ApiError::Unavailable)?;
    let next_cursor = page.next_cursor(orders.len(), orders.last().map(|o| o.ingest_seq));
    Ok(Json(
        json!({ "orders": orders, "next_cursor": next_cursor }),
    ))
}
