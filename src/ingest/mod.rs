//! Kafka to PostgreSQL. Every message ends stored, already stored, or
//! dead-lettered with its reason. The offsets consumed are written in the same
//! transaction as the orders, and PostgreSQL, not Kafka, decides where each
//! partition resumes. When the environment fails (database, dead-letter topic)
//! ingest pauses with the batch in hand and retries; nothing is dead-lettered
//! for it.
//!
//! A batch's transaction runs in a task of its own while the next batch is
//! gathered. A full batch may start its transaction while the one before it
//! is still written (two on two sessions, so PostgreSQL writes on two cores),
//! but it stores its offsets and commits only after that one has committed:
//! batches commit in order, and when one is not committed, the one behind it
//! is rolled back and written again after it. Two batches that hold the same
//! order never overlap (one would wait for the other's row). A batch's
//! letters are sent and acknowledged before it is handed over, so a
//! partition revoked while it is written finds them when its new owner reads
//! the dead-letter topic back, and its orders, if consumed again, are
//! absorbed as duplicates.
//!
//! A message's way: `consumer` fetches it, `positions` accepts it if it is new
//! to its partition, `batch` decides it (valid order or letter), `writes`
//! hands closed batches to `commit` (letters, then the transaction) and does
//! what follows; `dead_letter` sends and reads back letters, `pause` holds
//! ingest while the environment fails, `group` follows the consumer group
//! (assignments, leaving, `orphans`), and `broker_probe` times the broker.

mod batch;
mod broker_probe;
mod commit;
mod consumer;
pub mod dead_letter;
mod group;
mod orphans;
mod pause;
mod positions;
mod writes;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use self::batch::{Batch, Received};
use self::commit::Committer;
use self::consumer::{ConsumerEvent, OrderConsumer};
use self::dead_letter::{replay_of, DeadLetters};
use self::group::ORPHAN_CHECK;
use self::orphans::Orphans;
use self::positions::{Cause, PartitionState};
use self::writes::{writes_in_flight, writing_ends, Writing};
use crate::cache::OrderCache;
use crate::configuration::Settings;
use crate::events::{Feed, IngestHealth};
use crate::kafka_errors::BrokerReports;
use crate::store::Store;
use crate::telemetry::{LogThrottle, Metrics};

pub struct Ingest {
    consumer: Arc<OrderConsumer>,
    /// Partition ends and metadata; never the group's connection (see `side_client`).
    side: Arc<BaseConsumer<BrokerReports>>,
    /// Why the brokers turn the service away or cannot be reached, if they do.
    broker_reports: BrokerReports,
    events: mpsc::UnboundedReceiver<ConsumerEvent>,
    committer: Arc<Committer>,
    cache: Arc<OrderCache>,
    metrics: Arc<Metrics>,
    health: Arc<IngestHealth>,
    feed: Feed,
    settings: Settings,
    partitions: HashMap<i32, PartitionState>,
    /// Per dead-letter partition, the end this instance knows: past every
    /// letter it read back or had acknowledged.
    dlq_ends: HashMap<i32, i64>,
    /// Assigned partitions whose offsets could not be read yet.
    unloaded: Vec<i32>,
    /// Partitions whose broker lost the messages below their position, with
    /// the partition's earliest offset and end and how it was found: each
    /// starts again from its beginning once nothing of it waits to be committed.
    lost: HashMap<i32, ((i64, i64), Cause)>,
    /// Partitions whose message before the stored position is not the one
    /// consumed there, found by `accept`.
    foreign: Vec<i32>,
    /// The batch being gathered.
    batch: Batch,
    /// Closed batches not committed yet, oldest first: letters being sent,
    /// or waiting for the environment, or for the write ahead of them. They
    /// come after those in `writing`, and before the batch being gathered.
    closed: VecDeque<Batch>,
    /// The closed batches whose transactions run while the next one is
    /// gathered, oldest first; at most `writes_in_flight`.
    writing: VecDeque<Writing>,
    /// See [`writes_in_flight`].
    writes_in_flight: usize,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// Since when ingest is paused, and when the paused time was last counted.
    stalled_since: Option<(Instant, Instant)>,
    /// The causes told in the log during the current pause.
    stall_causes: HashSet<String>,
    /// When to try again to seek partitions that could not be positioned yet.
    reposition_at: Option<Instant>,
    orphans: Orphans,
    /// When to look for orphaned partitions next.
    orphans_at: Instant,
    /// Since when this instance has waited for its first assignment, and
    /// whether that wait was reported.
    unassigned_since: Option<(Instant, bool)>,
}

impl Ingest {
    /// `member`: the static member name to join the group with, if any.
    pub fn new(
        settings: &Settings,
        member: Option<&str>,
        store: Store,
        cache: Arc<OrderCache>,
        metrics: Arc<Metrics>,
        health: Arc<IngestHealth>,
        feed: Feed,
    ) -> anyhow::Result<Self> {
        let (consumer, events) = consumer::subscribe(
            &settings.kafka,
            member,
            settings.validation.max_message_bytes,
            metrics.clone(),
        )?;
        let broker_reports = BrokerReports::default();
        let dead_letters = DeadLetters::new(
            &settings.kafka,
            settings.validation.max_message_bytes,
            broker_reports.clone(),
        )?;
        Ok(Self {
            side: Arc::new(consumer::side_client(
                &settings.kafka,
                broker_reports.clone(),
            )?),
            broker_reports,
            consumer: Arc::new(consumer),
            events,
            committer: Arc::new(Committer {
                store,
                dead_letters,
                topic: settings.kafka.topic.clone(),
                group_id: settings.kafka.group_id.clone(),
                preview_bytes: settings.ingest.dead_letter_preview_bytes,
            }),
            cache,
            metrics,
            health,
            feed,
            settings: settings.clone(),
            partitions: HashMap::new(),
            dlq_ends: HashMap::new(),
            unloaded: Vec::new(),
            lost: HashMap::new(),
            foreign: Vec::new(),
            batch: Batch::default(),
            closed: VecDeque::new(),
            writing: VecDeque::new(),
            writes_in_flight: writes_in_flight(settings.database.max_connections),
            backoff: Duration::ZERO,
            retry_at: None,
            stalled_since: None,
            stall_causes: HashSet::new(),
            reposition_at: None,
            orphans: Orphans::default(),
            orphans_at: Instant::now() + ORPHAN_CHECK,
            unassigned_since: Some((Instant::now(), false)),
        })
    }

    /// Consumes until `shutdown`, then commits the batches in hand (within the
    /// shutdown bound) and leaves the group. Every step that can wait on the
    /// database or the broker gives way to `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let linger = self.settings.batch_linger();
        // A local handle, so a fetched message (which borrows the consumer) can
        // live while the loop updates its own state.
        let consumer = self.consumer.clone();
        let stop = &shutdown;
        // The probe ends with this loop, however it ends.
        let probe = shutdown.child_token();
        let _probe_guard = probe.clone().drop_guard();
        tokio::spawn(broker_probe::watch(
            self.side.clone(),
            self.broker_reports.clone(),
            self.settings.kafka.topic.clone(),
            self.health.clone(),
            self.metrics.clone(),
            probe,
        ));
        let consumer_errors = LogThrottle::default();
        loop {
            let ingest = &self.settings.ingest;
            // A partial batch is closed when nothing is ahead of it; a full
            // one, when fewer than writes_in_flight are written.
            let idle = self.closed.is_empty() && self.writing.is_empty();
            let room = self.closed.is_empty() && self.writing.len() < self.writes_in_flight;
            let full = self
                .batch
                .is_full(ingest.batch_size, ingest.batch_max_bytes);
            if full && room {
                if !until(stop, self.flush()).await {
                    break;
                }
                continue;
            }
            let flush_at = self.batch.first_at.map(|t| t + linger);
            let finished = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(event) = self.events.recv() => until(stop, self.on_event(event)).await,
                () = sleep_until(self.retry_at.unwrap_or_else(far_future)), if self.retry_at.is_some() => {
                    until(stop, self.retry()).await
                }
                () = sleep_until(self.reposition_at.unwrap_or_else(far_future)), if self.reposition_at.is_some() => {
                    until(stop, self.reposition()).await
                }
                () = sleep_until(flush_at.unwrap_or_else(far_future)), if flush_at.is_some() && idle => {
                    until(stop, self.flush()).await
                }
                () = sleep_until(self.orphans_at) => until(stop, self.look_for_orphans()).await,
                // Taken in hand at once: shutdown must not drop the batch it returns.
                joined = writing_ends(&mut self.writing), if !self.writing.is_empty() => match self.written(joined).await {
                    Ok(started) => until(stop, async {
                        self.start_commit(started).await;
                        self.start_lost_again().await;
                    }).await,
                    Err(stall) => {
                        self.stall(stall);
                        true
                    }
                },
                message = consumer.recv(), if !full || room => match message {
                    Ok(message) => {
                        // Rebalance signals raised while polling come first, so a
                        // message is never judged against a stale assignment.
                        let mut finished = true;
                        while let Ok(event) = self.events.try_recv() {
                            finished &= until(stop, self.on_event(event)).await;
                        }
                        let (partition, offset) = (message.partition(), message.offset());
                        let payload = message.payload().unwrap_or_default();
                        let digest = dead_letter::digest(payload);
                        if self.accept(partition, offset, digest) {
                            self.metrics.messages_consumed.inc();
                            let received = Received {
                                key: message.key(),
                                payload,
                                partition,
                                offset,
                                broker_time: message.timestamp().to_millis(),
                                replay_of: replay_of(&message),
                                digest,
                            };
                            // Closed at the top of the loop once full.
                            self.batch.push(received, &self.settings.validation);
                        }
                        if !self.foreign.is_empty() {
                            let foreign = std::mem::take(&mut self.foreign);
                            finished &= until(stop, self.confirm_lost(foreign, Cause::OtherMessage)).await;
                        }
                        finished
                    }
                    Err(e) => {
                        let error = e.to_string();
                        if consumer_errors.worth_logging(&error) {
                            tracing::warn!(error, "kafka consumer error");
                        }
                        true
                    }
                },
            };
            if !finished {
                break;
            }
        }
        // Ingest must hold the consumer's last handle: see `close_within`.
        drop(consumer);
        self.shut_down().await
    }

    async fn shut_down(mut self) -> anyhow::Result<()> {
        let bound = Duration::from_millis(self.settings.ingest.shutdown_timeout_ms);
        let finish = async {
            if let Err(stall) = self.settle().await {
                tracing::warn!(cause = %stall, "a batch being written was not committed; trying once more");
            }
            // The batch in hand comes after the closed ones; committing it alone
            // would move the offsets past messages never stored.
            if !self.closed.is_empty() {
                if let Err(stall) = self.commit_closed().await {
                    tracing::warn!(cause = %stall, "the closed batch could not be committed; it will be consumed again");
                    return;
                }
            }
            if !self.batch.is_empty() {
                self.closed.push_back(std::mem::take(&mut self.batch));
                if let Err(stall) = self.commit_closed().await {
                    tracing::warn!(cause = %stall, "the batch in hand could not be committed; it will be consumed again");
                }
            }
        };
        if tokio::time::timeout(bound, finish).await.is_err() {
            tracing::warn!(
                ?bound,
                "shutdown bound reached; uncommitted messages will be consumed again"
            );
        }
        self.leave_group().await;
        let closing = Instant::now();
        close_within(self, CLOSE_TIMEOUT).await;
        tracing::info!(
            close_ms = closing.elapsed().as_millis() as u64,
            "ingest stopped"
        );
        Ok(())
    }
}

/// Drops `ingest`, and with it the Kafka clients, off the async threads and
/// for at most `bound`: the consumer's close waits for the group's
/// coordinator with no bound of its own, so a broker that drops every
/// connection (one whose storage has failed) would hold the exit for good.
async fn close_within(ingest: Ingest, bound: Duration) {
    let closed = tokio::task::spawn_blocking(move || drop(ingest));
    if tokio::time::timeout(bound, closed).await.is_err() {
        tracing::warn!(
            ?bound,
            "the Kafka consumer did not close in time; exiting without it"
        );
    }
}

/// Runs `step` unless `shutdown` comes first; false when it did. A step cut
/// short leaves its batch in place, so shutdown still commits it in order.
async fn until(shutdown: &CancellationToken, step: impl Future<Output = ()>) -> bool {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => false,
        () = step => true,
    }
}

/// Longest wait for the Kafka clients to close on shutdown, after leaving.
/// The close waits for the group to answer this member's leave, which a
/// busy broker may take seconds to do; cut short, the member would keep its
/// partitions from the others until the session timeout.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}
