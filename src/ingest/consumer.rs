//! The Kafka consumer. Its rebalance and statistics callbacks only signal;
//! the ingest loop does the work (drop what it holds, load offsets,
//! reposition, start a partition again).

use std::sync::Arc;

use anyhow::Context;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

use crate::configuration::KafkaSettings;
use crate::kafka_errors::{self, BrokerReports};
use crate::telemetry::{LogThrottle, Metrics};

pub type OrderConsumer = StreamConsumer<SignalingContext>;

#[derive(Debug)]
pub enum ConsumerEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
    /// Each assigned partition's high watermark, as last fetched.
    Ends(Vec<(i32, i64)>),
}

pub struct SignalingContext {
    topic: String,
    events: mpsc::UnboundedSender<ConsumerEvent>,
    metrics: Arc<Metrics>,
    logs: LogThrottle,
}

impl ClientContext for SignalingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        kafka_errors::log(&self.logs, level, fac, message);
    }

    /// librdkafka's periodic statistics carry the lag and the high watermark
    /// of each assigned partition.
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut ends = Vec::new();
        // -1 is librdkafka's "not assigned here" partition; negative figures are unknown.
        for (&id, partition) in topic.partitions.iter().filter(|(&id, _)| id >= 0) {
            if partition.consumer_lag >= 0 {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&id.to_string()])
                    .set(partition.consumer_lag);
            }
            if partition.hi_offset >= 0 {
                ends.push((id, partition.hi_offset));
            }
        }
        // The receiver lives as long as the loop; after it, nothing listens.
        let _ = self.events.send(ConsumerEvent::Ends(ends));
    }
}

impl ConsumerContext for SignalingContext {
    fn post_rebalance(
        &self,
        _consumer: &BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        let event = match rebalance {
            rdkafka::consumer::Rebalance::Assign(list) => {
                ConsumerEvent::Assigned(self.partitions(list))
            }
            rdkafka::consumer::Rebalance::Revoke(list) => {
                ConsumerEvent::Revoked(self.partitions(list))
            }
            rdkafka::consumer::Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                return;
            }
        };
        // The receiver lives as long as the loop; after it, nothing listens.
        let _ = self.events.send(event);
    }
}

/// Whether this member is out of the group: librdkafka clears the member id
/// as it sends the leave (`rd_kafka_cgrp_leave`), and has none before it
/// joins. A member with a stable name sends no leave once its close has
/// begun (KIP-345), so the close must wait for this. The rdkafka crate does
/// not expose the id.
pub fn has_left_group(consumer: &OrderConsumer) -> bool {
    let client = consumer.client().native_ptr();
    // SAFETY: `client` is the consumer's handle, alive while `consumer` is
    // borrowed; the id returned is a copy owned here, freed by librdkafka's
    // allocator as its documentation asks.
    unsafe {
        let id = rdkafka::bindings::rd_kafka_memberid(client);
        if id.is_null() {
            return true;
        }
        let empty = *id == 0;
        rdkafka::bindings::rd_kafka_mem_free(client, id.cast());
        empty
    }
}

impl SignalingContext {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

/// A client of its own for what ingest asks the broker beside consuming
/// (partition ends, topic metadata). librdkafka drops a connection whose
/// request timed out (`socket.max.fails`); on the consumer's own client that
/// connection carries the group session, so a short question timing out on a
/// slow broker would cost the instance its partitions, and on the local broker
/// the group may never hand them back.
///
/// Its failed connections are told to `reports`.
pub fn side_client(
    kafka: &KafkaSettings,
    reports: BrokerReports,
) -> anyhow::Result<BaseConsumer<BrokerReports>> {
    kafka
        .client_config()
        // Its view of a topic created after the start follows within seconds.
        .set("topic.metadata.refresh.interval.ms", METADATA_REFRESH_MS)
        .create_with_context(reports)
        .context("cannot create the Kafka client that reads partition ends")
}

/// A topic created after the start (the orders topic subscribed to before
/// it existed) is seen at the next metadata refresh: seconds, not
/// librdkafka's default five minutes.
const METADATA_REFRESH_MS: &str = "5000";

/// Joins the group on the orders topic.
pub fn subscribe(
    kafka: &KafkaSettings,
    member: Option<&str>,
    max_message_bytes: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(OrderConsumer, mpsc::UnboundedReceiver<ConsumerEvent>)> {
    let (events, receiver) = mpsc::unbounded_channel();
    let context = SignalingContext {
        topic: kafka.topic.clone(),
        events,
        metrics,
        logs: LogThrottle::default(),
    };
    let mut config = kafka.client_config();
    if let Some(name) = member {
        config.set("group.instance.id", name);
    }
    let consumer: OrderConsumer = config
        .set("group.id", &kafka.group_id)
        // Offsets live in PostgreSQL. Kafka is told them too, for lag tools:
        // librdkafka commits those the service stores once a second, rather
        // than a commit request per batch for the broker to write down.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // librdkafka's default, stated: an upstream that writes in Kafka
        // transactions gets the orders of committed ones stored, never those
        // of aborted or open ones.
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .set("topic.metadata.refresh.interval.ms", METADATA_REFRESH_MS)
        // A crashed instance's partitions move to the others after this long.
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", "2000")
        .set("statistics.interval.ms", "5000")
        // A message over our limit must still be fetched, to be dead-lettered.
        .set(
            "fetch.message.max.bytes",
            (max_message_bytes + 64 * 1024).max(1_048_576).to_string(),
        )
        .create_with_context(context)
        .context("cannot create the Kafka consumer")?;
    consumer
        .subscribe(&[&kafka.topic])
        .with_context(|| format!("KAFKA_TOPIC: cannot subscribe to {}", kafka.topic))?;
    Ok((consumer, receiver))
}
