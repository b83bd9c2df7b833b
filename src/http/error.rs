use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::{self, LetterSummary};

/// Errors a handler returns. The log gets the cause; the client gets a clean
/// status and message, never SQL or internal detail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{reason}")]
    BadRequest {
        reason: String,
        order_uid: Option<String>,
    },
    #[error("order not found")]
    NotFound {
        order_uid: String,
        /// Letters of messages that claimed this id.
        dead_letters: Vec<LetterSummary>,
    },
    #[error("no dead letter at that position")]
    NoDeadLetter,
    #[error("storage unavailable, try again shortly")]
    Unavailable(#[source] sqlx::Error),
    /// The storage did not answer within the request timeout.
    #[error("storage did not answer within {} ms, try again shortly", .0.as_millis())]
    TimedOut(std::time::Duration),
    /// The runtime that owns the connections is shutting down.
    #[error("the service is stopping")]
    Stopping,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What went wrong, in words.
    pub error: String,
    /// The id asked for, when the error is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_uid: Option<String>,
}

/// The body of a 404 for an order: the letters of messages that claimed its
/// id, if any, say why it is not stored.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = NotFound)]
pub struct NotFoundBody {
    pub error: String,
    pub order_uid: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dead_letters: Vec<LetterSummary>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } | ApiError::NoDeadLetter => StatusCode::NOT_FOUND,
            // Not 408, which blames the client's pace (and which clients may
            // resend at once, to a database already behind).
            ApiError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        };
        let error = self.to_string();
        match self {
            ApiError::NotFound {
                order_uid,
                dead_letters,
            } => {
                let body = NotFoundBody {
                    error,
                    order_uid,
                    dead_letters,
                };
                (status, Json(body)).into_response()
            }
            other => {
                let order_uid = match other {
                    ApiError::BadRequest { order_uid, .. } => order_uid,
                    ApiError::Unavailable(e) => {
                        let cause = match &e {
                            sqlx::Error::Database(db) => {
                                format!("database: {}", store::described(db.as_ref()))
                            }
                            _ => format!("{:#}", anyhow::Error::new(e)),
                        };
                        tracing::error!(error = cause, "storage error while serving a request");
                        None
                    }
                    _ => None,
                };
                let mut response = (status, Json(ErrorBody { error, order_uid })).into_response();
                // The storage is what failed: a client may try again, shortly.
                if status.is_server_error() {
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                response
            }
        }
    }
}
