//! Rejected messages go to the dead-letter topic with their original key and
//! bytes, and headers that say why and where they came from.

use std::time::Duration;

use anyhow::Context;
use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// Most `dlq-reason` headers on one dead letter; an order with a thousand bad
/// items gets the first ones and a count of the rest.
const MAX_REASON_HEADERS: usize = 100;

/// Header names: the contract with whoever reads the dead-letter topic.
pub mod header {
    pub const STAGE: &str = "dlq-stage";
    pub const REASON: &str = "dlq-reason";
    pub const SOURCE_TOPIC: &str = "dlq-source-topic";
    pub const SOURCE_PARTITION: &str = "dlq-source-partition";
    pub const SOURCE_OFFSET: &str = "dlq-source-offset";
    pub const TIME: &str = "dlq-time";
}

/// A message that will not be stored, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub partition: i32,
    pub offset: i64,
    /// `too_large`, `parse`, `validate`, `conflict` or `store`.
    pub stage: &'static str,
    pub reasons: Vec<String>,
}

pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
}

impl DeadLetters {
    pub fn new(
        brokers: &str,
        topic: &str,
        source_topic: &str,
        max_message_bytes: usize,
    ) -> anyhow::Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            // Room for the largest message we accept plus its headers.
            .set(
                "message.max.bytes",
                (max_message_bytes + 64 * 1024).max(1_000_000).to_string(),
            )
            .set("message.timeout.ms", "15000")
            .create()
            .context("KAFKA_BROKERS: cannot create the dead-letter producer")?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
            source_topic: source_topic.to_owned(),
        })
    }

    /// Sends every letter and waits for the broker's acknowledgement of each.
    /// Returns, per letter, whether it was acknowledged.
    pub async fn send_all(&self, letters: &[&DeadLetter]) -> Vec<Result<(), String>> {
        let sends = letters.iter().map(|letter| self.send(letter));
        join_all(sends).await
    }

    async fn send(&self, letter: &DeadLetter) -> Result<(), String> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut headers = OwnedHeaders::new()
            .insert(header_value(header::STAGE, letter.stage))
            .insert(header_value(header::SOURCE_TOPIC, &self.source_topic))
            .insert(header_value(header::SOURCE_PARTITION, &partition))
            .insert(header_value(header::SOURCE_OFFSET, &offset))
            .insert(header_value(header::TIME, &time));
        for reason in letter.reasons.iter().take(MAX_REASON_HEADERS) {
            headers = headers.insert(header_value(header::REASON, reason));
        }
        let more;
        if letter.reasons.len() > MAX_REASON_HEADERS {
            more = format!(
                "… and {} more problems",
                letter.reasons.len() - MAX_REASON_HEADERS
            );
            headers = headers.insert(header_value(header::REASON, &more));
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
            .payload(&letter.payload[..])
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(&key[..]);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(drop)
            .map_err(|(e, _)| e.to_string())
    }
}

fn header_value<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
