//! The live list of orders as they are stored, as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{broadcast, Semaphore};

use super::error::ErrorBody;
use super::Shared;

/// How many live feeds may be open at once: all the connections clients may
/// hold but a quarter of them, at most 256. A feed keeps its connection for as
/// long as its page stays open, so without a share of their own, open pages
/// could take every connection and leave lookups, probes and scrapes waiting
/// in the listen queue.
#[derive(Clone)]
pub struct FeedSlots {
    free: Arc<Semaphore>,
    limit: usize,
}

impl FeedSlots {
    pub fn for_connections(connections: usize) -> Self {
        let limit = (connections - (connections / 4).min(256)).min(Semaphore::MAX_PERMITS);
        Self {
            free: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The most feeds open at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Feeds open now.
    pub fn open(&self) -> usize {
        self.limit - self.free.available_permits()
    }
}

pub fn router() -> Router<Shared> {
    Router::new().route("/api/orders/stream", get(stream))
}

/// Orders as they are stored, as Server-Sent Events
///
/// Each event is named `order`; its data is an OrderSummary. While as many
/// feeds are open as the service allows, it answers 503 and closes the
/// connection.
#[utoipa::path(
    get,
    path = "/api/orders/stream",
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 503, description = "As many feeds are open as allowed; try again later", body = ErrorBody),
    )
)]
pub(super) async fn stream(State(state): State<Shared>) -> Response {
    let Ok(slot) = state.feeds.free.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "30"), (header::CONNECTION, "close")],
            Json(ErrorBody {
                error: "as many live feeds are open as allowed; try again later".into(),
                order_uid: None,
            }),
        )
            .into_response();
    };
    // The slot lives as long as the stream, which ends when the client goes.
    let receiver = state.feed.subscribe();
    let events = futures::stream::unfold((receiver, slot), |(mut receiver, slot)| async move {
        loop {
            match receiver.recv().await {
                Ok(summary) => {
                    let event = Event::default().event("order").data(&*summary);
                    return Some((Ok::<_, Infallible>(event), (receiver, slot)));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_leave_a_quarter_of_the_connections_at_most_256() {
        let feeds = |connections| {
            let slots = FeedSlots::for_connections(connections);
            assert_eq!(slots.free.available_permits(), slots.limit());
            slots.limit()
        };
        assert_eq!(feeds(1), 1);
        assert_eq!(feeds(8), 6);
        assert_eq!(feeds(128), 96);
        assert_eq!(feeds(16_384), 16_128);
    }
}
