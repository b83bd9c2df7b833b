//! The live list of orders as they are stored, as Server-Sent Events.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use tokio::sync::broadcast;

use super::Shared;

pub fn router() -> Router<Shared> {
    Router::new().route("/api/orders/stream", get(stream))
}

/// Orders as they are stored, as Server-Sent Events
///
/// Each event is named `order`; its data is an OrderSummary.
#[utoipa::path(
    get,
    path = "/api/orders/stream",
    responses((status = 200, description = "An event stream", content_type = "text/event-stream", body = String))
)]
pub(super) async fn stream(
    State(state): State<Shared>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.feed.subscribe();
    let events = futures::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(summary) => {
                    return Some((
                        Ok(Event::default().event("order").data(&*summary)),
                        receiver,
                    ))
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
