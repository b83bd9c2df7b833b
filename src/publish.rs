//! Sending to the orders topic, shared by `produce` and `dead-letters replay`:
//! the producer client and the wait for its deliveries.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::producer::{FutureProducer, Producer};

use crate::configuration::KafkaSettings;
use crate::kafka_errors::BrokerReports;

/// A producer whose context hears why the brokers turn it away, if they do.
pub type OrderProducer = FutureProducer<BrokerReports>;

/// How long a new producer waits for a first answer before it starts
/// sending anyway (to brokers that are away, whom it then waits for).
const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(10);

/// The largest message sent. Brokers have their own limit (Apache Kafka's
/// default is about 1 MB); what they refuse is counted as failed.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A producer for the orders topic: idempotent, acknowledged by every
/// replica. Brokers that are away are waited for, however long; brokers that
/// turn it away (a failed sign-in, an untrusted certificate) fail it at once,
/// with their reason, rather than leave it waiting for good.
pub async fn order_producer(kafka: &KafkaSettings) -> anyhow::Result<OrderProducer> {
    let broker_reports = BrokerReports::default();
    let producer: OrderProducer = kafka
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
        .create_with_context(broker_reports.clone())
        .context("cannot create the Kafka producer")?;
    let started = Instant::now();
    while started.elapsed() < FIRST_ANSWER_WAIT {
        let client = producer.clone();
        let asked = tokio::task::spawn_blocking(move || {
            // All topics: asking for one may create it on some brokers.
            client.client().fetch_metadata(None, Duration::from_secs(1))
        });
        if matches!(asked.await, Ok(Ok(_))) {
            break;
        }
        if let Some(reason) = broker_reports.refusal() {
            anyhow::bail!("the broker refuses this client: {reason}");
        }
    }
    Ok(producer)
}

/// Waits for every delivery in flight, handing each answer to `settle`,
/// until `interrupt` (a stop signal) ends the wait; returns how many were left.
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
