//! Rejected messages go to the dead-letter topic with their original key and
//! bytes, and headers that say why and where they came from.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::join_all;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::OnceCell;

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
    /// Size of an original left out of the letter; it stays at its source offset.
    pub const PAYLOAD_OMITTED: &str = "dlq-payload-omitted-bytes";
}

/// A message that will not be stored, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Set when the original is too large to copy: its size in bytes.
    pub omitted_bytes: Option<usize>,
    pub partition: i32,
    pub offset: i64,
    /// `too_large`, `parse`, `validate`, `conflict` or `store`.
    pub stage: &'static str,
    pub reasons: Vec<String>,
}

/// Letters of one source partition all go to one dead-letter partition, in
/// order. After a crash between a letter's acknowledgement and the commit of
/// its batch, [`DeadLetters::already_sent`] reads them back, so replaying the
/// batch sends none twice.
pub struct DeadLetters {
    producer: FutureProducer,
    brokers: String,
    topic: String,
    source_topic: String,
    partitions: OnceCell<i32>,
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
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            source_topic: source_topic.to_owned(),
            partitions: OnceCell::new(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The dead-letter partition that holds `source_partition`'s letters.
    async fn partition_for(&self, source_partition: i32) -> Result<i32, String> {
        let count = self
            .partitions
            .get_or_try_init(|| async {
                let (producer, topic) = (self.producer.clone(), self.topic.clone());
                blocking(move || {
                    let metadata = producer
                        .client()
                        .fetch_metadata(Some(&topic), Duration::from_secs(5))
                        .map_err(|e| e.to_string())?;
                    match metadata.topics().first().map(|t| t.partitions().len()) {
                        Some(n) if n > 0 => Ok(n as i32),
                        _ => Err(format!("topic {topic} does not exist")),
                    }
                })
                .await
                .and_then(|count| count)
            })
            .await?;
        Ok(source_partition % count)
    }

    /// Sends every letter and waits for the broker's acknowledgement of each.
    /// Returns, per letter, its offset in the dead-letter topic or why it failed.
    pub async fn send_all(&self, letters: &[&DeadLetter]) -> Vec<Result<i64, String>> {
        let sends = letters.iter().map(|letter| self.send(letter));
        join_all(sends).await
    }

    /// The source offsets from `from_offset` on of `source_partition` that
    /// already have a letter, reading letters from `dlq_offset` (or the start).
    pub async fn already_sent(
        &self,
        source_partition: i32,
        from_offset: i64,
        dlq_offset: Option<i64>,
    ) -> anyhow::Result<(HashSet<i64>, i64)> {
        let partition = self
            .partition_for(source_partition)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let (brokers, topic, source_topic) = (
            self.brokers.clone(),
            self.topic.clone(),
            self.source_topic.clone(),
        );
        blocking(move || {
            let reader: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", "order-service-dlq-reader")
                .set("enable.auto.commit", "false")
                .create()
                .context("creating the dead-letter reader")?;
            let (low, high) = reader
                .fetch_watermarks(&topic, partition, Duration::from_secs(5))
                .context("reading the dead-letter topic's watermarks")?;
            let start = dlq_offset.unwrap_or(low).max(low);
            let mut found = HashSet::new();
            if start >= high {
                return Ok((found, high));
            }
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(&topic, partition, Offset::Offset(start))?;
            reader.assign(&list)?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut next = start;
            while next < high {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "reading the dead-letter topic from {start} to {high} took too long"
                );
                let Some(message) = reader.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let message = message.context("reading the dead-letter topic")?;
                next = message.offset() + 1;
                let header = |name: &str| {
                    message.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == name)
                            .and_then(|h| std::str::from_utf8(h.value?).ok())
                            .map(str::to_owned)
                    })
                };
                let same_source = header(header::SOURCE_TOPIC).as_deref()
                    == Some(source_topic.as_str())
                    && header(header::SOURCE_PARTITION) == Some(source_partition.to_string());
                let offset = header(header::SOURCE_OFFSET).and_then(|o| o.parse::<i64>().ok());
                if let (true, Some(offset)) = (same_source, offset) {
                    if offset >= from_offset {
                        found.insert(offset);
                    }
                }
            }
            Ok((found, high))
        })
        .await
        .map_err(anyhow::Error::msg)?
    }

    async fn send(&self, letter: &DeadLetter) -> Result<i64, String> {
        let dlq_partition = self.partition_for(letter.partition).await?;
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut headers = OwnedHeaders::new()
            .insert(header_value(header::STAGE, letter.stage))
            .insert(header_value(header::SOURCE_TOPIC, &self.source_topic))
            .insert(header_value(header::SOURCE_PARTITION, &partition))
            .insert(header_value(header::SOURCE_OFFSET, &offset))
            .insert(header_value(header::TIME, &time));
        let omitted = letter.omitted_bytes.map(|n| n.to_string());
        if let Some(omitted) = &omitted {
            headers = headers.insert(header_value(header::PAYLOAD_OMITTED, omitted));
        }
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
            .partition(dlq_partition)
            .payload(&letter.payload[..])
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(&key[..]);
        }
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|delivery| delivery.offset)
            .map_err(|(e, _)| e.to_string())
    }
}

/// Runs blocking client calls off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("background task failed: {e}"))
}

fn header_value<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
