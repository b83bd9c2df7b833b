//! Sending to the orders topic, shared by `produce` and `dead-letters replay`:
//! the producer client and the wait for its deliveries.

use std::future::Future;

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::producer::FutureProducer;

use crate::configuration::KafkaSettings;

/// The largest message sent. Brokers have their own limit (Apache Kafka's
/// default is about 1 MB); what they refuse is counted as failed.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A producer for the orders topic: idempotent, acknowledged by every replica.
pub fn order_producer(kafka: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        // Never expire a message in the client: an idempotent producer
        // whose message times out bumps its epoch, which some brokers
        // cannot follow. A slow broker is waited for; Ctrl-C stops.
        .set("message.timeout.ms", "0")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("queue.buffering.max.messages", "100000")
        .create()
        .context("cannot create the Kafka producer")
}

/// Waits for every delivery in flight, handing each answer to `settle`,
/// until `interrupt` (a Ctrl-C) ends the wait; returns how many were left.
pub async fn drain<F: Future>(
    in_flight: &mut FuturesUnordered<F>,
    interrupt: impl Future,
    mut settle: impl FnMut(F::Output),
) -> usize {
    tokio::pin!(interrupt);
    while !in_flight.is_empty() {
        tokio::select! {
            Some(result) = in_flight.next() => settle(result),
            _ = &mut interrupt => return in_flight.len(),
        }
    }
    0
}
