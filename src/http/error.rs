use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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
        /// Letters of messages that claimed this id, as the API shows them.
        dead_letters: Vec<serde_json::Value>,
    },
    #[error("no dead letter at that position")]
    NoDeadLetter,
    #[error("storage unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The runtime that owns the connections is shutting down.
    #[error("the service is stopping")]
    Stopping,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest { reason, order_uid } => {
                let mut body = json!({ "error": reason });
                if let Some(uid) = order_uid {
                    body["order_uid"] = json!(uid);
                }
                (StatusCode::BAD_REQUEST, body)
            }
            ApiError::NotFound {
                order_uid,
                dead_letters,
            } => {
                let mut body = json!({ "error": "order not found", "order_uid": order_uid });
                if !dead_letters.is_empty() {
                    body["dead_letters"] = json!(dead_letters);
                }
                (StatusCode::NOT_FOUND, body)
            }
            ApiError::NoDeadLetter => (
                StatusCode::NOT_FOUND,
                json!({ "error": "no dead letter at that position" }),
            ),
            ApiError::Unavailable(e) => {
                let cause = format!("{:#}", anyhow::Error::new(e));
                tracing::error!(error = cause, "storage error while serving a request");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "storage unavailable, try again shortly" }),
                )
            }
            ApiError::Stopping => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "the service is stopping" }),
            ),
        };
        (status, Json(body)).into_response()
    }
}
