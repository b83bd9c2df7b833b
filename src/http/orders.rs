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
use serde::Serialize;
use utoipa::ToSchema;

use super::dead_letters::letters_of_order;
use super::error::{ApiError, ErrorBody, NotFoundBody};
use super::io::{on_io, Io};
use super::paging::Page;
use super::Shared;
use crate::cache::CachedOrder;
use crate::domain::{OrderDocument, OrderUid};
use crate::store::{OrderFilter, OrderSummary};

pub fn router(io: &Io) -> Router<Shared> {
    Router::new().route("/order/{order_uid}", get(order)).route(
        "/api/orders",
        get(recent).route_layer(middleware::from_fn_with_state(io.clone(), on_io)),
    )
}

/// One order, exactly as received
///
/// Orders never change, so the ETag (a hash of the bytes, computed when the
/// order was cached) is strong and caches may keep them. HEAD answers the
/// same without the body.
#[utoipa::path(
    method(get, head),
    path = "/order/{order_uid}",
    params(
        ("order_uid" = OrderUid, Path),
        ("If-None-Match" = Option<String>, Header, description = "ETags the client holds"),
    ),
    responses(
        (status = 200, description = "The order", body = OrderDocument,
            headers(("ETag" = String, description = "Strong validator of the exact bytes"))),
        (status = 304, description = "Not modified: the ETag in If-None-Match matches"),
        (status = 400, description = "The id breaks the order id rule; no store was consulted", body = ErrorBody),
        (status = 404, description = "No order has this id; dead_letters lists the letters of messages that claimed it, if any", body = NotFoundBody),
        (status = 503, description = "The order is not cached and PostgreSQL is unavailable", body = ErrorBody),
        (status = 504, description = "Storage did not answer within HTTP_REQUEST_TIMEOUT_MS", body = ErrorBody),
    )
)]
pub(super) async fn order(
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
pub(super) struct IfNoneMatch(Option<HeaderValue>);

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

/// A page of order summaries: the newest first, and a cursor to the next page.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderPage {
    orders: Vec<OrderSummary>,
    /// The `before` of the next page; none on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// The most recently ingested orders, newest first
///
/// Only those matching every filter given.
#[utoipa::path(
    get,
    path = "/api/orders",
    params(
        ("track_number" = Option<String>, Query, description = "Only orders with exactly this track number"),
        ("customer_id" = Option<String>, Query, description = "Only orders of exactly this customer"),
        ("transaction" = Option<String>, Query, description = "Only orders whose payment has exactly this transaction id"),
        Page,
    ),
    responses(
        (status = 200, description = "A page of summaries", body = OrderPage),
        (status = 400, description = "A parameter is invalid or unknown", body = ErrorBody),
        (status = 503, description = "PostgreSQL is unavailable", body = ErrorBody),
        (status = 504, description = "Storage did not answer within HTTP_REQUEST_TIMEOUT_MS", body = ErrorBody),
    )
)]
pub(super) async fn recent(
    State(state): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<OrderPage>, ApiError> {
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
    Ok(Json(OrderPage {
        orders,
        next_cursor,
    }))
}
