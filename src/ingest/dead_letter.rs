//! Rejected messages go to the dead-letter topic with their original key and
//! bytes, and headers that say why and where they came from.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use sync_wrapper::SyncWrapper;
use tokio::sync::OnceCell;

use crate::configuration::KafkaSettings;
use crate::kafka_errors::BrokerReports;
use crate::lock;

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
    /// Size of a key left out of a letter the topic refused whole as too large.
    pub const KEY_OMITTED: &str = "dlq-key-omitted-bytes";
    /// On a replayed message and on its letter if it is rejected again: the
    /// letter it was replayed from, as `topic/partition/offset`.
    pub const REPLAY_OF: &str = "dlq-replay-of";
}

/// The letter a consumed message was replayed from: its `dlq-replay-of`
/// header, when that names a position (`topic/partition/offset`).
pub fn replay_of<M: Message>(message: &M) -> Option<&str> {
    let value = message
        .headers()?
        .iter()
        .find(|h| h.key == header::REPLAY_OF)?
        .value?;
    let value = std::str::from_utf8(value).ok()?;
    let mut parts = value.rsplitn(3, '/');
    let well_formed = parts.next().is_some_and(|o| o.parse::<u64>().is_ok())
        && parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
        && parts.next().is_some_and(|t| (1..=249).contains(&t.len()));
    well_formed.then_some(value)
}

/// A message that will not be stored, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Set when the original is too large to copy: its size in bytes.
    pub omitted_bytes: Option<usize>,
    /// [`digest`] of the original's bytes, copied or not.
    pub digest: [u8; 16],
    pub partition: i32,
    pub offset: i64,
    /// `too_large`, `parse`, `validate`, `conflict` or `store`.
    pub stage: &'static str,
    pub reasons: Vec<String>,
    /// The id the message claims, valid or not, when one can be read.
    pub order_uid: Option<String>,
    /// The letter this message was replayed from.
    pub replay_of: Option<String>,
    /// Sent without the original's payload, and without a key longer than
    /// [`SLIM_KEY_BYTES`], because the dead-letter topic refused it whole as
    /// too large (its limit may be below the orders topic's). The original
    /// stays at its source offset, and the record in PostgreSQL keeps its
    /// first bytes as for any letter.
    pub slim: bool,
}

/// What tells two messages at one source position apart in the record: a
/// topic created again numbers its messages from 0 again.
pub fn digest(payload: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(payload).to_be_bytes()
}

/// The longest key a slim letter keeps.
pub const SLIM_KEY_BYTES: usize = 4096;

/// Letters of one source partition all go to one dead-letter partition, in
/// order. After a crash between a letter's acknowledgement and the commit of
/// its batch, [`DeadLetters::already_sent`] reads them back, so replaying the
/// batch sends none twice.
pub struct DeadLetters {
    /// Taken out for each use: [`DeadLetters::renew`] puts a new one in.
    sender: Mutex<Sender>,
    /// What the producer is made from, for its renewal.
    producer_config: ClientConfig,
    broker_reports: BrokerReports,
    /// The brokers and how to reach them, for the reader of letters sent.
    client: ClientConfig,
    topic: String,
    source_topic: String,
    partitions: OnceCell<i32>,
}

/// The producer, and what its statistics say of its producer id.
#[derive(Clone)]
struct Sender {
    producer: FutureProducer<LetterReports>,
    id: Arc<Mutex<ProducerId>>,
}

/// The producer id and epoch the statistics last gave, and when they last
/// moved.
#[derive(Default)]
struct ProducerId {
    current: Option<(i64, i64)>,
    moved_at: Option<Instant>,
}

/// How recent a move of the producer id must be to count as still moving
/// (the statistics come every second).
const RECENT_MOVE: Duration = Duration::from_secs(10);

impl DeadLetters {
    /// The producer tells `broker_reports` why the brokers turn it away or
    /// cannot be reached, if they do.
    pub fn new(
        kafka: &KafkaSettings,
        max_message_bytes: usize,
        broker_reports: BrokerReports,
    ) -> anyhow::Result<Self> {
        let client = kafka.client_config();
        let mut producer_config = client.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("compression.type", "lz4")
            // Room for the largest message we accept plus its headers.
            .set(
                "message.max.bytes",
                (max_message_bytes + 64 * 1024).max(1_000_000).to_string(),
            )
            // A letter never expires in the client. An idempotent producer whose
            // message times out bumps its epoch (some brokers cannot follow) and
            // the timed-out copy may still land, so a resend could double it.
            // The commit waits on the same delivery instead, however long.
            .set("message.timeout.ms", "0")
            // The statistics tell whether the producer id moved to a new epoch.
            .set("statistics.interval.ms", "1000");
        let sender = sender(&producer_config, &broker_reports)?;
        Ok(Self {
            sender: Mutex::new(sender),
            producer_config,
            broker_reports,
            client,
            topic: kafka.dlq_topic.clone(),
            source_topic: kafka.topic.clone(),
            partitions: OnceCell::new(),
        })
    }

    fn producer(&self) -> FutureProducer<LetterReports> {
        lock(&self.sender).producer.clone()
    }

    /// Why the producer will not deliver its letters however long it is
    /// waited for, if so:
    /// - it failed for good (librdkafka's fatal error, raised when an
    ///   idempotent producer cannot keep its guarantees);
    /// - its letters are `unanswered` while it keeps moving its id to new
    ///   epochs. Its recovery from a broker that answers
    ///   `UNKNOWN_PRODUCER_ID` (one that lost its producers' state) is such a
    ///   move; a broker that knows producer ids only from their first
    ///   `InitProducerId` (tansu) answers every try of the new epoch the
    ///   same, and the producer moves again, about ten times a second.
    pub fn stuck(&self, unanswered: bool) -> Option<String> {
        let sender = lock(&self.sender).clone();
        if let Some((_, reason)) = sender.producer.client().fatal_error() {
            return Some(format!(
                "the dead-letter producer failed for good: {reason}"
            ));
        }
        let moved_at = lock(&sender.id).moved_at;
        let moving = moved_at.is_some_and(|at| at.elapsed() < RECENT_MOVE);
        (unanswered && moving).then(|| {
            "dead letters unanswered while their producer keeps moving to new epochs".to_owned()
        })
    }

    /// Replaces the producer with a new one, which gets a new producer id.
    /// The old one's letters are dropped unanswered: letters it sent may
    /// still have landed, so the caller reads the topic back before any is
    /// sent again.
    pub async fn renew(&self) -> anyhow::Result<()> {
        let sender = sender(&self.producer_config, &self.broker_reports)?;
        let old = std::mem::replace(&mut *lock(&self.sender), sender);
        // Dropping the last handle purges its queue and waits up to 500 ms.
        tokio::task::spawn_blocking(move || drop(old)).await?;
        Ok(())
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The dead-letter partition that holds `source_partition`'s letters.
    async fn partition_for(&self, source_partition: i32) -> Result<i32, SendError> {
        let count = self
            .partitions
            .get_or_try_init(|| async {
                let (producer, topic) = (self.producer(), self.topic.clone());
                blocking(move || {
                    let metadata = producer
                        .client()
                        .fetch_metadata(Some(&topic), Duration::from_secs(5))?;
                    match metadata.topics().first().map(|t| t.partitions().len()) {
                        Some(n) if n > 0 => Ok(n as i32),
                        _ => Err(SendError::NoTopic(topic)),
                    }
                })
                .await?
            })
            .await?;
        Ok(source_partition % count)
    }

    /// The dead-letter partition of `source_partition`, once the topic's
    /// partition count is known (after the first send or read-back).
    pub fn partition_of(&self, source_partition: i32) -> Option<i32> {
        self.partitions.get().map(|count| source_partition % count)
    }

    /// For each request, the source offsets from its `from_offset` on that
    /// already have a letter. Each dead-letter partition is read once, from
    /// the earliest stored position of the source partitions it holds, to its
    /// end; so the time taken follows the letters sent since those positions,
    /// not the size of the topic.
    pub async fn already_sent(
        &self,
        requests: &[ReadBack],
    ) -> anyhow::Result<HashMap<i32, AlreadySent>> {
        let mut by_partition: HashMap<i32, Vec<ReadBack>> = HashMap::new();
        for request in requests {
            let partition = self.partition_for(request.source_partition).await?;
            by_partition.entry(partition).or_default().push(*request);
        }
        let (client, topic, source_topic) = (
            self.client.clone(),
            self.topic.clone(),
            self.source_topic.clone(),
        );
        blocking(move || read_back(client, &topic, &source_topic, &by_partition)).await?
    }

    /// Hands `letter` to the producer; its acknowledgement arrives through
    /// `in_flight`. Fails only if the letter was not handed over.
    pub async fn enqueue(
        &self,
        letter: &DeadLetter,
        in_flight: &mut InFlight,
    ) -> Result<(), SendError> {
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
        let omitted = letter
            .omitted_bytes
            .or(letter.slim.then_some(letter.payload.len()))
            .map(|n| n.to_string());
        if let Some(omitted) = &omitted {
            headers = headers.insert(header_value(header::PAYLOAD_OMITTED, omitted));
        }
        let key = letter.key.as_deref();
        let key_omitted = key
            .filter(|k| letter.slim && k.len() > SLIM_KEY_BYTES)
            .map(|k| k.len().to_string());
        if let Some(omitted) = &key_omitted {
            headers = headers.insert(header_value(header::KEY_OMITTED, omitted));
        }
        if let Some(replay_of) = &letter.replay_of {
            headers = headers.insert(header_value(header::REPLAY_OF, replay_of));
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
        let payload: &[u8] = if letter.slim { &[] } else { &letter.payload };
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
            .partition(dlq_partition)
            .payload(payload)
            .headers(headers);
        if let (Some(key), None) = (key, &key_omitted) {
            record = record.key(key);
        }
        let delivery = self
            .producer()
            .send_result(record)
            .map_err(|(e, _)| SendError::Kafka(e))?;
        let key = (letter.partition, letter.offset);
        in_flight.keys.insert(key);
        in_flight.deliveries.get_mut().push(
            async move {
                let result = match delivery.await {
                    Ok(Ok(delivery)) => Ok(delivery.offset),
                    Ok(Err((e, _))) => Err(SendError::Kafka(e)),
                    Err(_) => Err(SendError::Dropped),
                };
                (key, result)
            }
            .boxed(),
        );
        Ok(())
    }
}

fn sender(config: &ClientConfig, broker_reports: &BrokerReports) -> anyhow::Result<Sender> {
    let id = Arc::<Mutex<ProducerId>>::default();
    let context = LetterReports {
        broker_reports: broker_reports.clone(),
        id: id.clone(),
    };
    let producer = config
        .create_with_context(context)
        .context("cannot create the dead-letter producer")?;
    Ok(Sender { producer, id })
}

/// The dead-letter producer's context: the brokers' reports, and its
/// producer id from its statistics.
struct LetterReports {
    broker_reports: BrokerReports,
    id: Arc<Mutex<ProducerId>>,
}

impl ClientContext for LetterReports {
    fn error(&self, error: KafkaError, reason: &str) {
        self.broker_reports.error(error, reason);
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.broker_reports.log(level, fac, message);
    }

    fn stats(&self, statistics: Statistics) {
        // An id of -1 is none yet.
        let Some(eos) = statistics.eos.filter(|eos| eos.producer_id >= 0) else {
            return;
        };
        let mut id = lock(&self.id);
        let now = Some((eos.producer_id, eos.producer_epoch));
        if id.current.is_some_and(|before| Some(before) != now) {
            id.moved_at = Some(Instant::now());
        }
        id.current = now;
    }
}

/// The answer to one letter: its (source partition, source offset) and its
/// offset in the dead-letter topic, or why the broker refused it.
pub type Acknowledgement = ((i32, i64), Result<i64, SendError>);

/// Letters handed to the producer and not yet answered. None is sent again
/// while it is here: waiting longer is always safe, a second copy is not.
#[derive(Default)]
pub struct InFlight {
    keys: HashSet<(i32, i64)>,
    /// Only ever reached through `&mut`; the wrapper makes the batch that
    /// holds it `Sync`, so its write can run in a task of its own.
    deliveries: SyncWrapper<FuturesUnordered<BoxFuture<'static, Acknowledgement>>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("letters", &self.keys.len())
            .finish()
    }
}

impl InFlight {
    pub fn contains(&self, letter: &DeadLetter) -> bool {
        self.keys.contains(&(letter.partition, letter.offset))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Stops expecting the letters of `revoked` partitions; their answers are
    /// dropped when they come.
    pub fn forget(&mut self, revoked: &[i32]) {
        self.keys.retain(|(p, _)| !revoked.contains(p));
    }

    /// The next answer for a letter still expected; none once all are in.
    /// Cancel-safe: an answer is either returned or still waiting.
    pub async fn next(&mut self) -> Option<Acknowledgement> {
        while !self.keys.is_empty() {
            let (key, result) = self.deliveries.get_mut().next().await?;
            if self.keys.remove(&key) {
                return Some((key, result));
            }
        }
        None
    }
}

/// Where to look for one source partition's letters.
#[derive(Debug, Clone, Copy)]
pub struct ReadBack {
    pub source_partition: i32,
    /// Letters of offsets below this are committed; only later ones count.
    pub from_offset: i64,
    /// The stored dead-letter position, if any; none means from the start.
    pub dlq_offset: Option<i64>,
}

/// What the read-back found for one source partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlreadySent {
    /// Source offsets that already have a letter.
    pub offsets: HashSet<i64>,
    /// Where the read started in the dead-letter partition.
    pub from: i64,
    /// The dead-letter partition's end when it was read.
    pub end: i64,
}

/// Reads each dead-letter partition once, from the earliest position of its
/// source partitions to its end. Gives up only when the broker sends nothing
/// for a while, never because the read is long.
fn read_back(
    mut client: ClientConfig,
    topic: &str,
    source_topic: &str,
    by_partition: &HashMap<i32, Vec<ReadBack>>,
) -> anyhow::Result<HashMap<i32, AlreadySent>> {
    let reader: BaseConsumer = client
        .set("group.id", "order-service-dlq-reader")
        .set("enable.auto.commit", "false")
        // The end as the broker sees it, which may lie past the last record.
        .set("enable.partition.eof", "true")
        .create()
        .context("creating the dead-letter reader")?;
    let mut found = HashMap::new();
    let mut list = TopicPartitionList::new();
    // Per dead-letter partition being read: its end.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for (&partition, requests) in by_partition {
        let (low, high) = reader
            .fetch_watermarks(topic, partition, Duration::from_secs(5))
            .context("reading the dead-letter topic's watermarks")?;
        // Past the end, the position is not this topic's: it was created
        // again, or the broker lost its data. Its letters are all new.
        let stale = |r: &&ReadBack| r.dlq_offset > Some(high);
        let from_of = |r: &ReadBack| {
            if stale(&r) {
                low
            } else {
                r.dlq_offset.unwrap_or(low).max(low)
            }
        };
        if let Some(stale) = requests.iter().find(stale) {
            tracing::warn!(
                dlq_partition = partition,
                stored = stale.dlq_offset,
                end = high,
                "the dead-letter position stored in PostgreSQL is past the end of the \
                 dead-letter partition: the topic was created again or the broker lost its \
                 data; its letters are read back from its beginning"
            );
        }
        for r in requests {
            found.insert(
                r.source_partition,
                AlreadySent {
                    from: from_of(r),
                    end: high,
                    ..AlreadySent::default()
                },
            );
        }
        let start = requests.iter().map(from_of).min().unwrap_or(high);
        if start < high {
            list.add_partition_offset(topic, partition, Offset::Offset(start))?;
            ends.insert(partition, high);
        }
    }
    if ends.is_empty() {
        return Ok(found);
    }
    reader.assign(&list)?;
    let mut last_seen = Instant::now();
    while !ends.is_empty() {
        anyhow::ensure!(
            last_seen.elapsed() < READ_BACK_SILENCE,
            "the broker sent nothing for {READ_BACK_SILENCE:?} while reading the dead-letter topic back"
        );
        let Some(message) = reader.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            Err(KafkaError::PartitionEOF(partition)) => {
                ends.remove(&partition);
                continue;
            }
            Err(e) => return Err(e).context("reading the dead-letter topic"),
        };
        last_seen = Instant::now();
        if ends
            .get(&message.partition())
            .is_some_and(|&end| message.offset() + 1 >= end)
        {
            ends.remove(&message.partition());
        }
        let header = |name: &str| {
            message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| std::str::from_utf8(h.value?).ok())
                    .map(str::to_owned)
            })
        };
        if header(header::SOURCE_TOPIC).as_deref() != Some(source_topic) {
            continue;
        }
        let source = header(header::SOURCE_PARTITION).and_then(|p| p.parse::<i32>().ok());
        let offset = header(header::SOURCE_OFFSET).and_then(|o| o.parse::<i64>().ok());
        let (Some(source), Some(offset)) = (source, offset) else {
            continue;
        };
        let wanted = by_partition
            .get(&message.partition())
            .and_then(|rs| rs.iter().find(|r| r.source_partition == source))
            .is_some_and(|r| offset >= r.from_offset);
        if let (true, Some(sent)) = (wanted, found.get_mut(&source)) {
            sent.offsets.insert(offset);
        }
    }
    Ok(found)
}

/// How long the read-back waits for the broker's next letter before it
/// gives up (and ingest retries it as a fault of its environment).
const READ_BACK_SILENCE: Duration = Duration::from_secs(30);

/// Why a letter could not be sent, or the topic not read.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("the producer dropped the letter before an answer")]
    Dropped,
    #[error("background task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl SendError {
    /// Whether the letter was refused for its size, by the client's own
    /// limit or by the broker's for the topic.
    pub fn too_large(&self) -> bool {
        matches!(
            self,
            SendError::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge
            ))
        )
    }
}

/// Runs blocking client calls off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SendError> {
    Ok(tokio::task::spawn_blocking(work).await?)
}

fn header_value<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::bindings::{rd_kafka_resp_err_t, rd_kafka_test_fatal_error};

    use super::*;

    /// A producer that failed for good is told apart and replaced by a sound one.
    #[tokio::test]
    async fn a_producer_failed_for_good_is_replaced() {
        let letters = DeadLetters::new(
            &KafkaSettings::default(),
            1_000_000,
            BrokerReports::default(),
        )
        .unwrap();
        assert_eq!(letters.stuck(true), None);
        let producer = letters.producer();
        // SAFETY: the client is alive (held by `producer`), the reason a C string.
        let raised = unsafe {
            rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                c"sequence lost".as_ptr(),
            )
        };
        assert_eq!(raised, rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
        drop(producer);
        let cause = letters.stuck(false).unwrap();
        assert!(
            cause.starts_with("the dead-letter producer failed for good")
                && cause.contains("sequence lost"),
            "{cause}"
        );
        letters.renew().await.unwrap();
        assert_eq!(letters.stuck(true), None);
    }
}
