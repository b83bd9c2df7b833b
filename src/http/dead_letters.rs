//! Dead letters as data: why a message was not stored, findable by the id it
//! claimed, its key, its stage or its time. Payloads are served as JSON
//! strings, never as a document a browser would render.

use std::collections::HashMap;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::io::{on_io, Io};
use super::paging::{bad, Page};
use super::Shared;
use crate::domain::{OrderUid, StageName, LETTER_STAGES};
use crate::store::{Cursor, LetterFilter, LetterRecord, LetterSummary, Store};

/// Letters shown with an order's 404.
const LETTERS_WITH_NOT_FOUND: i64 = 5;

pub fn router(io: &Io) -> Router<Shared> {
    Router::new()
        .route("/api/dead-letters", get(list))
        .route("/api/dead-letters/{topic}/{partition}/{offset}", get(one))
        .route_layer(middleware::from_fn_with_state(io.clone(), on_io))
}

/// A page of letters: the newest first, and a cursor to the next page.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = DeadLetterPage)]
pub struct LetterPage {
    dead_letters: Vec<LetterSummary>,
    /// The `before` of the next page; none on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// A letter with the first bytes of its payload.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = DeadLetterDetail)]
pub struct LetterDetail {
    #[serde(flatten)]
    letter: LetterSummary,
    /// The first DEAD_LETTER_PREVIEW_BYTES of the payload; bytes that are
    /// not UTF-8 are replaced.
    payload_preview: String,
    payload_preview_bytes: usize,
    /// Whether the preview is the whole payload.
    payload_complete: bool,
    /// Whether the preview is valid UTF-8 as it was sent.
    payload_utf8: bool,
}

/// Rejected messages recorded in PostgreSQL, newest first
///
/// Only those matching every filter given.
#[utoipa::path(
    get,
    path = "/api/dead-letters",
    params(
        ("order_uid" = Option<String>, Query,
            description = "The id the message claimed, valid or not (or its key, when the payload names none)"),
        ("key" = Option<String>, Query, description = "The message's key, exactly"),
        ("stage" = Option<StageName>, Query),
        ("since" = Option<DateTime<Utc>>, Query, description = "Recorded at or after this time"),
        Page,
    ),
    responses(
        (status = 200, description = "A page of letters", body = LetterPage),
        (status = 400, description = "A parameter is invalid or unknown", body = ErrorBody),
        (status = 503, description = "PostgreSQL is unavailable", body = ErrorBody),
        (status = 504, description = "Storage did not answer within HTTP_REQUEST_TIMEOUT_MS", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<Shared>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<LetterPage>, ApiError> {
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
    Ok(Json(LetterPage {
        dead_letters: letters.iter().map(LetterRecord::summary).collect(),
        next_cursor,
    }))
}

/// The letter of the message at this source position
///
/// With its reasons and the first bytes of its payload, as a JSON string.
#[utoipa::path(
    get,
    path = "/api/dead-letters/{topic}/{partition}/{offset}",
    params(
        ("topic" = String, Path),
        ("partition" = i32, Path),
        ("offset" = i64, Path),
    ),
    responses(
        (status = 200, description = "The letter", body = LetterDetail),
        (status = 400, description = "Partition or offset is not a whole number, or the path not UTF-8", body = ErrorBody),
        (status = 404, description = "No letter at this position", body = ErrorBody),
        (status = 503, description = "PostgreSQL is unavailable", body = ErrorBody),
        (status = 504, description = "Storage did not answer within HTTP_REQUEST_TIMEOUT_MS", body = ErrorBody),
    )
)]
pub(super) async fn one(
    State(state): State<Shared>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Json<LetterDetail>, ApiError> {
    // Percent-escapes that decode to something other than UTF-8 get a JSON
    // answer, as any other bad position, not the framework's plain text.
    let Path((topic, partition, offset)) =
        path.map_err(|_| bad("the path is not valid percent-encoded UTF-8".into()))?;
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
    let preview = &letter.payload_preview;
    Ok(Json(LetterDetail {
        letter: letter.summary(),
        payload_preview: String::from_utf8_lossy(preview).into_owned(),
        payload_preview_bytes: preview.len(),
        payload_complete: letter.holds_whole_payload(),
        payload_utf8: std::str::from_utf8(preview).is_ok(),
    }))
}

/// The letters of messages that claimed `uid`, newest first, for its 404. A
/// failure to read them leaves the 404 plain rather than failing it.
pub async fn letters_of_order(store: &Store, uid: &OrderUid) -> Vec<LetterSummary> {
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
