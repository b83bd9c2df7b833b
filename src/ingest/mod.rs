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

mod batch;
mod broker_probe;
mod commit;
mod consumer;
pub mod dead_letter;
mod orphans;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use self::batch::{Batch, Received};
use self::commit::{Attempt, Committer, Predecessor, Stall};
use self::consumer::{ConsumerEvent, OrderConsumer};
use self::dead_letter::{replay_of, DeadLetters, ReadBack};
use self::orphans::{Orphans, Progress};
use crate::cache::OrderCache;
use crate::configuration::Settings;
use crate::events::{Feed, IngestHealth};
use crate::kafka_errors::BrokerReports;
use crate::store::{InsertOutcome, PartitionOffset, Store, StoredOffset};
use crate::telemetry::{LogThrottle, Metrics};

/// Where a partition stands: the next offset to accept, from PostgreSQL.
#[derive(Debug, Clone)]
struct PartitionState {
    /// `None`: nothing stored yet, so the partition starts at its beginning.
    next: Option<i64>,
    /// Offsets at or past the committed ones whose letters an interrupted
    /// batch already sent; forgotten as the offsets are committed.
    dead_lettered: HashSet<i64>,
    /// Where the read-back of the dead-letter topic started for this
    /// partition: its stored position while any letter it found is pending.
    dlq_from: i64,
    /// Whether the consumer was moved to `next`; until then its messages are dropped.
    positioned: bool,
    /// The digest of the message before `next`, as consumed.
    last_digest: Option<[u8; 16]>,
    /// Set when positioned one before `next`: the digest the message there
    /// must have, compared before anything is accepted.
    check: Option<[u8; 16]>,
}

/// How a partition was found to hold other messages than those consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Its end is below the stored position.
    PastTheEnd,
    /// The message before the stored position is another one.
    OtherMessage,
}

impl PartitionState {
    /// Whether its position is past `end`, the end of the partition on the
    /// broker: the broker lost messages consumed here.
    fn past(&self, end: i64) -> bool {
        self.next.is_some_and(|next| next > end)
    }

    /// The dead-letter position to store once the offsets below `next` are
    /// committed, `end` being the end known of its dead-letter partition. A
    /// restart reads back from there, so it must not pass a letter whose
    /// message is not committed yet.
    fn dlq_position(&self, next: i64, end: i64) -> i64 {
        if self.dead_lettered.iter().any(|&offset| offset >= next) {
            self.dlq_from
        } else {
            end.max(self.dlq_from)
        }
    }
}

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

    /// Leaves the group, so the partitions move to the other members at once.
    /// A member with a stable name leaves only when it unsubscribes, its
    /// revocation is served by polling, and the leave is sent before its
    /// close begins; closing alone keeps its place for its return (so a
    /// crash-restart resumes at once).
    async fn leave_group(&mut self) {
        self.consumer.unsubscribe();
        let consumer = self.consumer.clone();
        let left = async {
            loop {
                tokio::select! {
                    event = self.events.recv() => match event {
                        Some(ConsumerEvent::Revoked(_)) | None => break,
                        Some(_) => {}
                    },
                    _ = consumer.recv() => {}
                }
            }
            // The leave goes out once the revoked partitions have stopped.
            loop {
                let member = Arc::clone(&consumer);
                let left = tokio::task::spawn_blocking(move || consumer::has_left_group(&member));
                if left.await.unwrap_or(true) {
                    return;
                }
                tokio::time::sleep(LEAVE_CHECK).await;
            }
        };
        if tokio::time::timeout(LEAVE_TIMEOUT, left).await.is_err() {
            tracing::warn!("the group did not confirm the leave in time");
        }
    }

    /// Whether a fetched message is new to this consumer: its partition is
    /// ours, positioned at the stored offset, and the message is not below it.
    /// The message before the stored offset, read again to be compared, is
    /// never new; if it is another one, the partition goes to `foreign`.
    fn accept(&mut self, partition: i32, offset: i64, digest: [u8; 16]) -> bool {
        let Some(state) = self.partitions.get_mut(&partition) else {
            return false;
        };
        if !state.positioned {
            return false;
        }
        let next = state.next.unwrap_or(0);
        if let Some(expected) = state.check {
            if offset == next - 1 {
                if digest == expected {
                    state.check = None;
                } else {
                    // Kept: positioned again, it is compared again.
                    state.positioned = false;
                    self.foreign.push(partition);
                }
                return false;
            }
            // Past it: that message is gone (retention, compaction), and
            // nothing is left to compare.
            if offset >= next {
                state.check = None;
            }
        }
        if offset < next {
            return false;
        }
        state.next = Some(offset + 1);
        state.last_digest = Some(digest);
        true
    }

    /// Seeks every newly assigned partition to the offset stored in PostgreSQL
    /// (or its beginning if none is). A seek right after an assignment can fail
    /// until the fetcher has started; those are retried shortly. Seeks block,
    /// so they run off the async threads.
    async fn reposition(&mut self) {
        // A partition whose last message consumed has a digest starts one
        // before its position, to compare that message (see `accept`).
        let targets: Vec<(i32, Option<i64>, Offset)> = self
            .partitions
            .iter()
            .filter(|(p, s)| !s.positioned && !self.lost.contains_key(p))
            .map(|(&p, s)| {
                let seek = match s.next {
                    None => Offset::Beginning,
                    Some(next) if next > 0 && s.check.is_some() => Offset::Offset(next - 1),
                    Some(next) => Offset::Offset(next),
                };
                (p, s.next, seek)
            })
            .collect();
        let (consumer, topic) = (self.consumer.clone(), self.settings.kafka.topic.clone());
        let seeks = tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .map(|(partition, next, target)| {
                    let seek = consumer.seek(&topic, partition, target, Duration::from_secs(1));
                    (partition, next, target, seek)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let sought: Vec<i32> = seeks
            .iter()
            .filter(|(_, next, _, seek)| next.is_some() && seek.is_ok())
            .map(|&(p, ..)| p)
            .collect();
        let marks = self.watermarks(sought).await;
        let mut pending = false;
        for (partition, next, target, seek) in seeks {
            let marks = marks.get(&partition).copied();
            match (seek, self.partitions.get_mut(&partition)) {
                (Ok(()), Some(state)) => match marks {
                    Some(marks) if state.past(marks.1) => {
                        self.lost.insert(partition, (marks, Cause::PastTheEnd));
                    }
                    _ => {
                        tracing::debug!(
                            partition,
                            ?target,
                            "positioned at the offset stored in PostgreSQL"
                        );
                        state.positioned = true;
                        if let (Some(next), Some((earliest, _))) = (next, marks) {
                            report_expired(&self.metrics, partition, next, earliest);
                        }
                    }
                },
                // Revoked meanwhile: nothing to do.
                (_, None) => {}
                (Err(e), Some(_)) => {
                    tracing::debug!(partition, error = %e, "seek not possible yet; retrying");
                    pending = true;
                }
            }
        }
        self.start_lost_again().await;
        // A panicked seek task leaves partitions unpositioned: try again too.
        pending |= self
            .partitions
            .iter()
            .any(|(p, s)| !s.positioned && !self.lost.contains_key(p));
        self.reposition_at = pending.then(|| Instant::now() + REPOSITION_RETRY);
    }

    /// The messages below the position of `partition` stored in PostgreSQL
    /// (`stored`) are not the ones consumed before (see [`Cause`]): the topic
    /// was created again, or the broker lost its data. They must not be taken
    /// for consumed: the stored position moves back to the partition's
    /// earliest offset (only offsets that move forward are ever saved
    /// otherwise), and the partition is consumed again from there. Whether
    /// PostgreSQL took the change; until it does, the partition stays
    /// unpositioned and this is retried.
    async fn start_again(
        &mut self,
        partition: i32,
        stored: Option<i64>,
        (earliest, end): (i64, i64),
        cause: Cause,
    ) -> bool {
        let kafka = &self.settings.kafka;
        if let Some(next) = stored {
            let rewind = self.committer.store.rewind_offset(
                &kafka.group_id,
                &kafka.topic,
                partition,
                next,
                earliest,
            );
            match self.committer.store.answered(rewind).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(partition, "the stored position moved meanwhile; read again");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(
                        partition,
                        error = %e,
                        "the stored position belongs to messages the broker no longer has and could not be moved back yet"
                    );
                    return false;
                }
            }
        }
        match cause {
            Cause::PastTheEnd => tracing::error!(
                partition,
                stored,
                end,
                from = earliest,
                "the position stored in PostgreSQL is past the end of the partition: the \
                 topic was created again or the broker lost its data; its messages are \
                 consumed again from its beginning"
            ),
            Cause::OtherMessage => tracing::error!(
                partition,
                stored,
                end,
                from = earliest,
                "the message before the position stored in PostgreSQL is not the one consumed \
                 there: the topic was created again or the broker lost its data, and it grew \
                 past that position; its messages are consumed again from its beginning"
            ),
        }
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.next = Some(earliest);
            state.last_digest = None;
            state.check = None;
        }
        true
    }

    /// A partition consumed up to a position past its end, as last fetched,
    /// lost its messages on the broker while this instance consumed it (the
    /// topic was deleted and created again, or the broker's storage was
    /// lost): its new messages arrive below that position, and would be
    /// passed over as consumed (or, on a broker that resets the position,
    /// dropped as already seen). The broker confirms the end.
    async fn look_for_lost(&mut self, ends: Vec<(i32, i64)>) {
        let past_the_end: Vec<i32> = ends
            .into_iter()
            .filter(|&(p, end)| {
                !self.lost.contains_key(&p)
                    && self
                        .partitions
                        .get(&p)
                        .is_some_and(|s| s.positioned && s.past(end))
            })
            .map(|(p, _)| p)
            .collect();
        self.confirm_lost(past_the_end, Cause::PastTheEnd).await;
    }

    /// Confirms with the broker that `partitions` lost their messages (for
    /// `PastTheEnd`, that their end is below their position); those take
    /// nothing more until they start again (see `start_lost_again`).
    async fn confirm_lost(&mut self, partitions: Vec<i32>, cause: Cause) {
        if partitions.is_empty() {
            return self.start_lost_again().await;
        }
        let marks = self.watermarks(partitions).await;
        for (p, marks) in marks {
            let Some(state) = self.partitions.get_mut(&p) else {
                continue;
            };
            if cause == Cause::OtherMessage || state.past(marks.1) {
                state.positioned = false;
                self.lost.insert(p, (marks, cause));
            }
        }
        // Another message found, but the broker did not answer: seek and compare again.
        if self
            .partitions
            .iter()
            .any(|(p, s)| !s.positioned && !self.lost.contains_key(p))
        {
            self.reposition_at
                .get_or_insert_with(|| Instant::now() + REPOSITION_RETRY);
        }
        // A loss found before may still wait for PostgreSQL.
        self.start_lost_again().await;
    }

    /// The earliest offset and end of each of `partitions` that the broker
    /// told; a partition it did not answer for is left out. Asked off the
    /// async threads: the calls block.
    async fn watermarks(&self, partitions: Vec<i32>) -> HashMap<i32, (i64, i64)> {
        if partitions.is_empty() {
            return HashMap::new();
        }
        let (side, topic) = (self.side.clone(), self.settings.kafka.topic.clone());
        tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .filter_map(|p| {
                    let marks = side.fetch_watermarks(&topic, p, Duration::from_secs(1));
                    marks.ok().map(|marks| (p, marks))
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Moves the stored position of each lost partition back to its
    /// beginning and consumes it again from there, once no write in hand can
    /// store its position as it was before the loss (see
    /// [`Self::holds_old_position`]); the position PostgreSQL then holds is the
    /// one moved back.
    async fn start_lost_again(&mut self) {
        let ready: Vec<i32> = self
            .lost
            .keys()
            .copied()
            .filter(|&p| !self.holds_old_position(p))
            .collect();
        if ready.is_empty() {
            return;
        }
        let Ok(stored) = self.stored_offsets(&ready).await else {
            // Tried again after the next commit, or at the next statistics.
            return;
        };
        for p in ready {
            let Some(&(marks, cause)) = self.lost.get(&p) else {
                continue;
            };
            let next = stored.get(&p).map(|s| s.next_offset);
            if self.start_again(p, next, marks, cause).await {
                self.lost.remove(&p);
                self.reposition_at = Some(Instant::now());
            }
        }
    }

    /// Whether a batch in hand may still store the position `partition` had
    /// before its loss: one holding its messages, or a write whose positions
    /// include it. Batches closed after the loss leave it out (see
    /// [`Self::positions`]); those before it commit first, in order.
    fn holds_old_position(&self, partition: i32) -> bool {
        let holds = |batch: &Batch| batch.next_offsets().any(|(p, _)| p == partition);
        holds(&self.batch)
            || self.closed.iter().any(holds)
            || self
                .writing
                .iter()
                .any(|w| w.positions.contains(&partition))
    }

    async fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Revoked(revoked) => {
                tracing::info!(partitions = ?revoked, "partitions revoked");
                for p in &revoked {
                    self.partitions.remove(p);
                    self.lost.remove(p);
                    self.metrics
                        .consumer_lag
                        .remove_label_values(&[&p.to_string()])
                        .ok();
                }
                self.unloaded.retain(|p| !revoked.contains(p));
                self.publish_loading();
                self.batch.drop_partitions(&revoked);
                for closed in &mut self.closed {
                    closed.drop_partitions(&revoked);
                }
            }
            ConsumerEvent::Ends(ends) => self.look_for_lost(ends).await,
            ConsumerEvent::Assigned(assigned) => {
                tracing::info!(partitions = ?assigned, "partitions assigned");
                if let Some((since, true)) = self.unassigned_since {
                    tracing::info!(
                        waited_s = since.elapsed().as_secs(),
                        "the group assigned partitions at last"
                    );
                }
                self.unassigned_since = None;
                self.follow_pause(&assigned);
                self.unloaded.extend(assigned);
                // Loading first: readiness never sees the assignment before it.
                self.publish_loading();
                self.health.assigned.store(true, Ordering::Release);
                if let Err(stall) = self.load_offsets().await {
                    self.stall(stall);
                }
            }
        }
    }

    /// librdkafka keeps a partition's pause through a revoke and a new
    /// assignment: a partition paused during a stall that a rebalance took
    /// away and gave back would stay paused after the stall, for good. So each
    /// assigned partition is paused or resumed to match ingest's state.
    fn follow_pause(&self, partitions: &[i32]) {
        let mut list = TopicPartitionList::new();
        for &p in partitions {
            list.add_partition(&self.settings.kafka.topic, p);
        }
        let stalled = self.health.stalled().is_some();
        let set = if stalled {
            self.consumer.pause(&list)
        } else {
            self.consumer.resume(&list)
        };
        if let Err(e) = set {
            tracing::warn!(error = %e, stalled, partitions = ?partitions, "cannot set the pause of assigned partitions");
        }
    }

    async fn load_offsets(&mut self) -> Result<(), Stall> {
        if self.unloaded.is_empty() {
            return Ok(());
        }
        let stored = self.stored_offsets(&self.unloaded).await?;
        let requests: Vec<ReadBack> = self
            .unloaded
            .iter()
            .map(|&p| ReadBack {
                source_partition: p,
                from_offset: stored.get(&p).map_or(0, |s| s.next_offset),
                dlq_offset: stored.get(&p).and_then(|s| s.dlq_next_offset),
            })
            .collect();
        let dead_letters = &self.committer.dead_letters;
        let mut found =
            dead_letters
                .already_sent(&requests)
                .await
                .map_err(|e| Stall::DeadLetters {
                    topic: dead_letters.topic().to_owned(),
                    error: format!("reading it back: {e:#}"),
                })?;
        for p in self.unloaded.drain(..) {
            let sent = found.remove(&p).unwrap_or_default();
            if !sent.offsets.is_empty() {
                tracing::info!(
                    partition = p,
                    count = sent.offsets.len(),
                    "letters of an interrupted batch are already in the dead-letter topic; they will not be sent again"
                );
            }
            if let Some(d) = dead_letters.partition_of(p) {
                raise_end(&mut self.dlq_ends, d, sent.end);
            }
            self.partitions.insert(
                p,
                PartitionState {
                    next: stored.get(&p).map(|s| s.next_offset),
                    dead_lettered: sent.offsets,
                    dlq_from: sent.from,
                    positioned: false,
                    last_digest: stored.get(&p).and_then(|s| s.last_digest),
                    check: stored.get(&p).and_then(|s| s.last_digest),
                },
            );
        }
        self.publish_loading();
        self.reposition().await;
        Ok(())
    }

    /// Readiness waits for every assigned partition's stored position.
    fn publish_loading(&self) {
        self.health
            .loading
            .store(!self.unloaded.is_empty(), Ordering::Relaxed);
    }

    /// An instance that holds no partition looks at the group's progress and
    /// names, in `/readyz` and in one log line, the partitions whose messages
    /// have waited with no commit for longer than the session timeout.
    async fn look_for_orphans(&mut self) {
        self.orphans_at = Instant::now() + ORPHAN_CHECK;
        self.report_unassigned();
        let holds_none = self.partitions.is_empty() && self.unloaded.is_empty();
        if !holds_none || !self.health.assigned.load(Ordering::Relaxed) {
            self.orphans.clear();
            self.report_orphans(Vec::new());
            return;
        }
        let progress = match self.progress().await {
            Ok(progress) => progress,
            Err(e) => {
                tracing::debug!(error = format!("{e:#}"), "cannot read the group's progress");
                return;
            }
        };
        let orphaned =
            self.orphans
                .update(&progress, Instant::now(), self.settings.session_timeout());
        self.report_orphans(orphaned);
    }

    /// An instance that joined its group and has had no assignment for three
    /// session timeouts says so once: the group's rebalance is not completing
    /// (on the local broker, after its leader was killed).
    fn report_unassigned(&mut self) {
        let patience = 3 * self.settings.session_timeout();
        let missing_topic = self.health.missing_topic().is_some();
        if let Some((since, reported @ false)) = &mut self.unassigned_since {
            // Nothing to assign yet: that is named on its own, and the wait
            // for the group starts once the topic exists.
            if missing_topic {
                *since = Instant::now();
                return;
            }
            if since.elapsed() >= patience {
                *reported = true;
                tracing::warn!(
                    group = %self.settings.kafka.group_id,
                    waited_s = since.elapsed().as_secs(),
                    "no partition assignment since joining the group: its rebalance does not \
                     complete; /readyz stays 503 until it does (on the local broker, a group whose \
                     leader was killed never completes one)"
                );
            }
        }
    }

    fn report_orphans(&self, orphaned: Vec<i32>) {
        let none = orphaned.is_empty();
        if self.health.set_orphaned(orphaned.clone()) && !none {
            tracing::warn!(
                partitions = ?orphaned,
                "partitions have messages that no live member consumes, and this instance holds none: \
                 a member that is gone still holds them (start it again with its settings, \
                 or restart the broker)"
            );
        }
    }

    /// Each partition's committed position (PostgreSQL) and end (the broker).
    async fn progress(&self) -> anyhow::Result<Vec<Progress>> {
        let (consumer, topic) = (self.side.clone(), self.settings.kafka.topic.clone());
        let ends = tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(2);
            let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            partitions
                .into_iter()
                .map(|p| {
                    let (low, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
                    Ok((p, low, high))
                })
                .collect::<Result<Vec<_>, rdkafka::error::KafkaError>>()
        })
        .await??;
        let partitions: Vec<i32> = ends.iter().map(|&(p, _, _)| p).collect();
        let stored = self.stored_offsets(&partitions).await?;
        Ok(ends
            .into_iter()
            .map(|(partition, low, end)| Progress {
                partition,
                committed: stored
                    .get(&partition)
                    .map_or(low, |s| s.next_offset.max(low)),
                end,
            })
            .collect())
    }

    /// The group's committed positions of `partitions`, from PostgreSQL.
    async fn stored_offsets(
        &self,
        partitions: &[i32],
    ) -> Result<HashMap<i32, StoredOffset>, sqlx::Error> {
        let load = self.committer.store.load_offsets(
            &self.settings.kafka.group_id,
            &self.settings.kafka.topic,
            partitions,
        );
        self.committer.store.answered(load).await
    }

    /// Closes the batch being gathered and starts its commit.
    async fn flush(&mut self) {
        self.closed.push_back(std::mem::take(&mut self.batch));
        self.start_commit(std::time::Instant::now()).await;
    }

    /// Sends the oldest closed batch's letters, then hands it to a task that
    /// writes it while the next batch is gathered, behind the write in
    /// flight if there is one. The batch stays in `closed` until the task
    /// holds it, so a step cut short by shutdown leaves it in place. It waits
    /// there while a write holds one of its orders.
    async fn start_commit(&mut self, started: std::time::Instant) {
        if self.writing.len() >= self.writes_in_flight {
            return;
        }
        let Some(batch) = self.closed.front_mut() else {
            return;
        };
        if batch.is_empty() {
            self.closed.pop_front();
            return;
        }
        // Compared only with a write beside it: none when one is written at a time.
        let orders = if self.writes_in_flight > 1 {
            batch.order_hashes()
        } else {
            HashSet::new()
        };
        if self.writing.iter().any(|w| !w.orders.is_disjoint(&orders)) {
            return;
        }
        if let Err(stall) = self.committer.send_letters(batch, &self.partitions).await {
            return self.stall(stall);
        }
        let Some(mut batch) = self.closed.pop_front() else {
            return;
        };
        let offsets = self.positions(&batch);
        let positions = offsets.iter().map(|o| o.partition).collect();
        let after = self.writing.back_mut().and_then(|w| w.committed.take());
        let (committed, successor) = oneshot::channel();
        let committer = self.committer.clone();
        let task = tokio::spawn(async move {
            let attempt = committer.write(&mut batch, &offsets, after).await;
            let _ = committed.send(matches!(attempt, Ok(Attempt::Committed(_))));
            (batch, attempt)
        });
        self.writing.push_back(Writing {
            task,
            started,
            orders,
            positions,
            committed: Some(successor),
        });
    }

    /// The oldest write has ended: its batch is committed, or back in
    /// `closed`, with its refused orders to be dead-lettered first (then
    /// committed again from the instant returned), or stalled. A batch not
    /// committed takes the writes behind it back to `closed` too, after it
    /// (they roll back without it).
    async fn written(
        &mut self,
        joined: Result<Written, JoinError>,
    ) -> Result<std::time::Instant, Stall> {
        let started = self
            .writing
            .pop_front()
            .map_or_else(std::time::Instant::now, |w| w.started);
        let (mut batch, attempt) = joined_or_panic(joined);
        let result = match attempt {
            Ok(Attempt::Committed(outcome)) => {
                self.finish(batch, &outcome, started);
                return Ok(started);
            }
            Ok(Attempt::Refused(refused)) => {
                batch.refuse(refused);
                Ok(started)
            }
            Ok(Attempt::Behind) => Ok(started),
            Err(stall) => Err(stall),
        };
        let mut back = vec![batch];
        while let Some(behind) = self.writing.pop_front() {
            let (mut later, attempt) = joined_or_panic(behind.task.await);
            match attempt {
                Ok(Attempt::Committed(outcome)) => {
                    // Not reached: a write behind commits only after this one did.
                    self.finish(later, &outcome, behind.started);
                    continue;
                }
                Ok(Attempt::Refused(refused)) => later.refuse(refused),
                Ok(Attempt::Behind) | Err(_) => {}
            }
            back.push(later);
        }
        for mut batch in back.into_iter().rev() {
            // Partitions revoked while it was written are no longer this
            // instance's: their new owner resumes from PostgreSQL's positions.
            let revoked: Vec<i32> = batch
                .next_offsets()
                .map(|(p, _)| p)
                .filter(|p| !self.partitions.contains_key(p))
                .collect();
            batch.drop_partitions(&revoked);
            self.closed.push_front(batch);
        }
        result
    }

    /// Waits for every write in flight, in order, and takes what each came to.
    async fn settle(&mut self) -> Result<(), Stall> {
        while !self.writing.is_empty() {
            let joined = writing_ends(&mut self.writing).await;
            self.written(joined).await?;
        }
        Ok(())
    }

    /// Pauses fetching and schedules a retry with capped exponential backoff.
    /// Logs once on entering the state; the cause shown follows the latest.
    fn stall(&mut self, stall: Stall) {
        let max = Duration::from_millis(self.settings.ingest.max_backoff_ms);
        self.backoff = (self.backoff * 2).clamp(
            Duration::from_millis(100),
            max.max(Duration::from_millis(100)),
        );
        self.retry_at = Some(Instant::now() + self.backoff);
        self.count_stalled_time();
        if let Stall::Database(_) = stall {
            // The retry must not reuse a session opened under the fault.
            self.committer.store.recycle_sessions();
        }
        let cause = stall.to_string();
        if self.health.stalled().is_none() {
            tracing::error!(cause, "ingest paused; retrying until it succeeds");
            self.metrics.consumer_paused.set(1);
            let now = Instant::now();
            self.stalled_since = Some((now, now));
            self.stall_causes.clear();
            if let Ok(assignment) = self.consumer.assignment() {
                self.consumer.pause(&assignment).ok();
            }
        } else if !self.stall_causes.contains(&cause) {
            // One fault often shows as another on retry (sessions ended, then
            // a refused password): each new cause is told once per spell.
            tracing::error!(cause, "ingest still paused; the cause changed");
        }
        self.stall_causes.insert(cause.clone());
        self.health.set_stalled(Some(cause));
    }

    /// Adds the time paused since it was last counted to the metric.
    fn count_stalled_time(&mut self) {
        if let Some((_, counted)) = &mut self.stalled_since {
            let now = Instant::now();
            self.metrics
                .ingest_stalled_seconds
                .inc_by((now - *counted).as_secs_f64());
            *counted = now;
        }
    }

    async fn retry(&mut self) {
        self.retry_at = None;
        if let Err(stall) = self.load_offsets().await {
            return self.stall(stall);
        }
        // The closed batches come after those being written.
        if let Err(stall) = self.settle().await {
            return self.stall(stall);
        }
        if !self.closed.is_empty() {
            if let Err(stall) = self.commit_closed().await {
                return self.stall(stall);
            }
        }
        self.backoff = Duration::ZERO;
        self.count_stalled_time();
        if let Some((since, _)) = self.stalled_since.take() {
            tracing::info!(
                paused_ms = since.elapsed().as_millis() as u64,
                "ingest resumed"
            );
            self.health.set_stalled(None);
            self.metrics.consumer_paused.set(0);
            if let Ok(assignment) = self.consumer.assignment() {
                self.consumer.resume(&assignment).ok();
            }
        }
    }

    /// Commits the closed batches in order, one at a time, and waits for
    /// each; on success they are gone and their orders are counted, cached
    /// and announced. On failure the batch stays, with what was learnt.
    /// Nothing is being written meanwhile ([`Ingest::settle`] comes first).
    async fn commit_closed(&mut self) -> Result<(), Stall> {
        let mut started = std::time::Instant::now();
        while let Some(batch) = self.closed.front_mut() {
            if batch.is_empty() {
                self.closed.pop_front();
                continue;
            }
            self.committer.send_letters(batch, &self.partitions).await?;
            let offsets = self
                .closed
                .front()
                .map(|batch| self.positions(batch))
                .unwrap_or_default();
            let Some(batch) = self.closed.front_mut() else {
                return Ok(());
            };
            match self.committer.write(batch, &offsets, None).await? {
                Attempt::Committed(outcome) => {
                    let batch = self.closed.pop_front().unwrap_or_default();
                    self.finish(batch, &outcome, started);
                    started = std::time::Instant::now();
                }
                Attempt::Refused(refused) => batch.refuse(refused),
                // Only a write behind another one is told that.
                Attempt::Behind => {}
            }
        }
        Ok(())
    }

    /// The positions `closing` stores with its orders: its partitions', and
    /// those of owned partitions with nothing gathered, so that every
    /// dead-letter position keeps up with the topic. A lost partition's
    /// position is left to its rewind.
    fn positions(&self, closing: &Batch) -> Vec<PartitionOffset> {
        let idle = idle_positions(&self.partitions, [&self.batch, closing], &self.lost);
        stored_positions(closing, &idle, &self.partitions, &self.dlq_ends, |p| {
            self.committer.dead_letters.partition_of(p)
        })
    }

    /// What follows a commit: positions raised, letters forgotten, metrics,
    /// the orders cached and announced, Kafka told.
    fn finish(&mut self, batch: Batch, outcome: &InsertOutcome, started: std::time::Instant) {
        for (source, end) in batch.dlq_ends() {
            if let Some(d) = self.committer.dead_letters.partition_of(source) {
                raise_end(&mut self.dlq_ends, d, end);
            }
        }
        for (p, next) in batch.next_offsets() {
            if let Some(state) = self.partitions.get_mut(&p) {
                state.dead_lettered.retain(|&offset| offset >= next);
            }
        }
        self.metrics.batch_size.observe(batch.len() as f64);
        self.metrics
            .batch_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        let committed_at = std::time::Instant::now();
        self.committed(&batch, outcome);
        self.metrics
            .commit_to_visible_seconds
            .observe(committed_at.elapsed().as_secs_f64());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for &t in &batch.broker_times {
            self.metrics
                .broker_to_commit_seconds
                .observe((now_ms - t).max(0) as f64 / 1000.0);
        }
        self.commit_to_kafka(&batch);
    }

    /// Counts, caches and announces what a committed batch stored.
    fn committed(&self, batch: &Batch, outcome: &InsertOutcome) {
        self.metrics
            .orders_stored
            .inc_by(outcome.stored.len() as u64);
        self.metrics
            .duplicates
            .inc_by(outcome.duplicates.len() as u64);
        for letter in &batch.rejected {
            self.metrics
                .dead_letters
                .with_label_values(&[letter.stage])
                .inc();
        }
        let replays = |indexes: &[usize]| {
            indexes
                .iter()
                .filter(|&&i| batch.valid_sources[i].replay_of.is_some())
                .count() as u64
        };
        let letters = batch.rejected.iter().filter(|l| l.replay_of.is_some());
        for (outcome, count) in [
            ("stored", replays(&outcome.stored)),
            ("duplicate", replays(&outcome.duplicates)),
            ("dead_lettered", letters.count() as u64),
        ] {
            self.metrics
                .replays
                .with_label_values(&[outcome])
                .inc_by(count);
        }
        for &i in &outcome.duplicates {
            let m = &batch.valid[i];
            tracing::debug!(topic = %self.settings.kafka.topic, partition = m.partition, offset = m.offset, order_uid = %m.order.uid(), "duplicate order skipped");
        }
        let stored = outcome
            .stored
            .iter()
            .map(|&i| {
                let m = &batch.valid[i];
                self.feed.publish(&m.order);
                (Box::from(m.order.uid().as_str()), m.json.clone())
            })
            .collect();
        self.cache.stored(stored);
    }

    /// Tells Kafka too, for lag tools. PostgreSQL stays the source of truth.
    fn commit_to_kafka(&self, batch: &Batch) {
        let mut list = TopicPartitionList::new();
        for (partition, next) in batch.next_offsets() {
            list.add_partition_offset(&self.settings.kafka.topic, partition, Offset::Offset(next))
                .ok();
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "kafka offset commit failed; PostgreSQL holds the offsets");
        }
    }
}

/// The positions of owned partitions that neither batch in hand holds
/// messages of, lost ones left out.
fn idle_positions<V>(
    partitions: &HashMap<i32, PartitionState>,
    in_hand: [&Batch; 2],
    lost: &HashMap<i32, V>,
) -> Vec<(i32, i64)> {
    let busy: HashSet<i32> = in_hand
        .iter()
        .flat_map(|batch| batch.next_offsets().map(|(p, _)| p))
        .collect();
    partitions
        .iter()
        .filter(|(p, _)| !busy.contains(p) && !lost.contains_key(p))
        .map(|(&p, state)| (p, state.next.unwrap_or(0)))
        .collect()
}

/// The positions a batch stores: for its partitions and the idle ones
/// (`(partition, committed next offset)`), the next offset and the
/// dead-letter position (see [`PartitionState::dlq_position`]).
fn stored_positions(
    batch: &Batch,
    idle: &[(i32, i64)],
    partitions: &HashMap<i32, PartitionState>,
    dlq_ends: &HashMap<i32, i64>,
    partition_of: impl Fn(i32) -> Option<i32>,
) -> Vec<PartitionOffset> {
    let mut ends = dlq_ends.clone();
    for (source, end) in batch.dlq_ends() {
        if let Some(d) = partition_of(source) {
            raise_end(&mut ends, d, end);
        }
    }
    let in_batch = batch
        .next_offsets()
        .map(|(p, next)| (p, next, batch.last_digest(p)));
    let idle = idle.iter().map(|&(p, next)| {
        let digest = partitions.get(&p).and_then(|state| state.last_digest);
        (p, next, digest)
    });
    in_batch
        .chain(idle)
        .map(|(partition, next_offset, last_digest)| PartitionOffset {
            partition,
            next_offset,
            dlq_next_offset: partitions.get(&partition).map(|state| {
                let end = partition_of(partition).and_then(|d| ends.get(&d).copied());
                state.dlq_position(next_offset, end.unwrap_or(state.dlq_from))
            }),
            last_digest,
        })
        .collect()
}

/// Records that dead-letter partition `d` reaches at least `end`.
/// The broker deleted records of `partition` (retention) from `next`, where
/// this group stopped, to `earliest`, before they were consumed: they can
/// be neither stored nor dead-lettered, so it is said loudly, once per
/// assignment, and counted.
fn report_expired(metrics: &Metrics, partition: i32, next: i64, earliest: i64) {
    if earliest <= next {
        return;
    }
    let count = earliest - next;
    metrics.messages_expired.inc_by(count.unsigned_abs());
    tracing::error!(
        partition,
        from = next,
        to = earliest,
        count,
        "messages expired on the broker before they were consumed (its retention is shorter \
         than this group was away); they are gone from the topic and cannot be stored"
    );
}

fn raise_end(ends: &mut HashMap<i32, i64>, d: i32, end: i64) {
    let known = ends.entry(d).or_insert(end);
    *known = (*known).max(end);
}

/// A batch back from its write, with what the write came to.
type Written = (Batch, Result<Attempt, Stall>);

/// How many batches may be written at once: with a pool of 4 sessions or
/// more, the next full batch starts its transaction while the one before it
/// ends its own. A smaller pool keeps its sessions for one write and the
/// HTTP reads, rather than have a second write wait for a session.
fn writes_in_flight(max_connections: u32) -> usize {
    if max_connections >= 4 {
        2
    } else {
        1
    }
}

/// The task writing a closed batch, and when its commit started.
struct Writing {
    task: JoinHandle<Written>,
    started: std::time::Instant,
    /// Its orders, by [`Batch::order_hashes`]: a batch holding one of them
    /// is not written beside it.
    orders: HashSet<u64>,
    /// The partitions whose positions it stores.
    positions: HashSet<i32>,
    /// Whether it committed, for the write started behind it.
    committed: Option<Predecessor>,
}

/// The end of the oldest write in `writing`; never, if there is none.
async fn writing_ends(writing: &mut VecDeque<Writing>) -> Result<Written, JoinError> {
    match writing.front_mut() {
        Some(writing) => (&mut writing.task).await,
        None => std::future::pending().await,
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

/// A panic in a write is a defect: it ends ingest as it would have there.
fn joined_or_panic(joined: Result<Written, JoinError>) -> Written {
    joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
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

const REPOSITION_RETRY: Duration = Duration::from_millis(50);

/// Longest wait for the group to take back this member's partitions on shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often shutdown looks whether the leave has been sent.
const LEAVE_CHECK: Duration = Duration::from_millis(10);

/// Longest wait for the Kafka clients to close on shutdown, after leaving.
/// The close waits for the group to answer this member's leave, which a
/// busy broker may take seconds to do; cut short, the member would keep its
/// partitions from the others until the session timeout.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an instance that holds no partition looks for orphaned ones.
const ORPHAN_CHECK: Duration = Duration::from_secs(5);

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dead_lettered: &[i64], dlq_from: i64) -> PartitionState {
        PartitionState {
            next: Some(0),
            dead_lettered: dead_lettered.iter().copied().collect(),
            dlq_from,
            positioned: true,
            last_digest: Some([1; 16]),
            check: None,
        }
    }

    #[test]
    fn a_position_waits_for_the_letters_still_pending_then_keeps_up() {
        // Letters of offsets 7 and 9 were read back from position 40.
        let s = state(&[7, 9], 40);
        assert_eq!(s.dlq_position(8, 100), 40, "offset 9's letter is pending");
        assert_eq!(s.dlq_position(10, 100), 100, "all committed: up to the end");
        assert_eq!(state(&[], 40).dlq_position(0, 100), 100);
        assert_eq!(state(&[], 40).dlq_position(0, 30), 40, "never backwards");
    }

    fn message(partition: i32, offset: i64) -> Received<'static> {
        Received {
            key: None,
            payload: b"not json",
            partition,
            offset,
            broker_time: None,
            replay_of: None,
            digest: [2; 16],
        }
    }

    #[test]
    fn idle_positions_leave_out_batches_in_hand_and_lost_partitions() {
        let limits = crate::domain::Limits::default();
        let (mut gathering, mut closing) = (Batch::default(), Batch::default());
        gathering.push(message(0, 5), &limits);
        closing.push(message(1, 7), &limits);
        let partitions: HashMap<i32, PartitionState> = (0..4).map(|p| (p, state(&[], 0))).collect();
        let lost = HashMap::from([(2, ())]);
        let idle = idle_positions(&partitions, [&gathering, &closing], &lost);
        assert_eq!(idle, vec![(3, 0)]);
    }

    #[test]
    fn every_owned_partition_stores_a_position_that_follows_the_topic() {
        let mut batch = Batch::default();
        let limits = crate::domain::Limits::default();
        batch.push(message(0, 5), &limits);
        batch.dead_lettered_at(0, 120);
        let partitions = HashMap::from([(0, state(&[], 10)), (1, state(&[], 10))]);
        let ends = HashMap::from([(0, 110)]);
        // One dead-letter partition for both sources; partition 1 is idle.
        let stored = stored_positions(&batch, &[(1, 33)], &partitions, &ends, |_| Some(0));
        assert_eq!(
            stored,
            vec![
                PartitionOffset {
                    partition: 0,
                    next_offset: 6,
                    dlq_next_offset: Some(121),
                    last_digest: Some([2; 16]),
                },
                PartitionOffset {
                    partition: 1,
                    next_offset: 33,
                    dlq_next_offset: Some(121),
                    last_digest: Some([1; 16]),
                },
            ]
        );
    }
}
