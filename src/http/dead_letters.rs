//! Dead letters as data: why a message was not stored, findable by the id it
//! claimed, its key, its stage or its time. Payloads are served as JSON
//! strings, never as a document a browser would render.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::error::ApiError;
use super::io::{on_io, Io};
use super::paging::{bad, Page};
use super::Shared;
use crate::domain::{OrderUid, LETTER_STAGES};
use crate::store::{Cursor, LetterFilter, LetterRecord, Store};

/// Letters shown with an order's 404.
const LETTERS_WITH_NOT_FOUND: i64 = 5;

pub fn router(io: &Io) -> Router<Shared> {
    Router::new()
        .route("/api/dead-letters", get(list))
        .route("/api/dead-letters/{topic}/{partition}/{offset}", get(one))
        .route_layer(middleware::from_fn_with_state(io.clone(), on_io))
}

/// Newest first; `before` is the `next_cursor` of the previous page.
async fn list(
    State(state): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_params(&params, &["order_uid", "key", "stage", "since"])?;
    let stage = match params.get("stage") {
        Some(stage) if !LETTER_STAGES.contains(&stage.as_str()) => {
            return Err(bad(format!(
                "stage must be one of {}",
                LETTER_STAGES.join(", ")
            )));
        }
        stage => stage.cloned(),
    };
    let since = match params.get("since") {
        None => None,
        Some(v) => Some(
            DateTime::parse_from_rfc3339(v)
                .map_err(|_| {
                    bad("since must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z".into())
                })?
                .with_timezone(&Utc),
        ),
    };
    let filter = LetterFilter {
        order_uid: params.get("order_uid").cloned(),
        key: params.get("key").map(|k| k.as_bytes().to_vec()),
        stage,
        since,
        ..LetterFilter::default()
    };
    let letters = state
        .store
        .dead_letters(&filter, Cursor::Before(page.before), page.limit)
        .await
        .map_err(ApiError::Unavailable)?;
    let next_cursor = page.next_cursor(letters.len(), letters.last().map(|l| l.id));
    let letters: Vec<Value> = letters.iter().map(LetterRecord::summary).collect();
    Ok(Json(
        json!({ "dead_letters": letters, "next_cursor": next_cursor }),
    ))
}

/// One letter with its reasons and the first bytes of its payload.
async fn one(
    State(state): State<Shared>,
    Path((topic, partition, offset)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let (Ok(partition), Ok(offset)) = (partition.parse::<i32>(), offset.parse::<i64>()) else {
        return Err(bad(
            "a dead letter is named /api/dead-letters/{topic}/{partition}/{offset}, with whole numbers"
                .into(),
        ));
    };
    let letter = state
        .store
        .dead_letter(&topic, partition, offset)
        .await
        .map_err(ApiError::Unavailable)?
        .ok_or(ApiError::NoDeadLetter)?;
    let mut body = letter.summary();
    let preview = &letter.payload_preview;
    body["payload_preview"] = json!(String::from_utf8_lossy(preview));
    body["payload_preview_bytes"] = json!(preview.len());
    body["payload_complete"] = json!(letter.holds_whole_payload());
    body["payload_utf8"] = json!(std::str::from_utf8(preview).is_ok());
    Ok(Json(body))
}

/// The letters of messages that claimed `uid`, newest first, for its 404. A
/// failure to read them leaves the 404 plain rather than failing it.
pub async fn letters_of_order(store: &Store, uid: &OrderUid) -> Vec<Value> {
    let filter = LetterFilter {
        order_uid: Some(uid.to_string()),
        ..LetterFilter::default()
    };
    match store
        .dead_letters(&filter, Cursor::Before(None), LETTERS_WITH_NOT_FOUND)
        .await
    {
        Ok(letters) => letters.iter().map(LetterRecord::summary).collect(),
        Err(e) => {
            tracing::warn!(error = %e, order_uid = %uid, "cannot read dead letters for a 404");
            Vec::new()
        }
    }
}
