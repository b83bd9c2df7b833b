//! The live list of orders as they are stored, as Server-Sent Events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde_json::json;
use tokio::sync::broadcast;

use super::AppState;
use crate::domain::Order;

/// Summaries held for slow listeners; one that falls further behind skips ahead.
const BACKLOG: usize = 1024;

#[derive(Clone)]
pub struct Feed {
    sender: broadcast::Sender<Arc<str>>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Feed {
    /// Announces a newly stored order; costs nothing when nobody listens.
    pub fn publish(&self, order: &Order) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        let o = order.document();
        let summary = json!({
            "order_uid": o.order_uid,
            "date_created": o.date_created,
            "customer_id": o.customer_id,
            "amount": o.payment.amount,
            "currency": o.payment.currency,
            "item_count": o.items.len(),
        });
        let _ = self.sender.send(summary.to_string().into());
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/api/orders/stream", get(stream))
}

async fn stream(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.feed.sender.subscribe();
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
