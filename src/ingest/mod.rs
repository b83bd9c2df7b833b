//! Kafka to PostgreSQL. Every message ends stored, already stored, or
//! dead-lettered with its reason. The offsets consumed are written in the same
//! transaction as the orders, and PostgreSQL, not Kafka, decides where each
//! partition resumes.

mod batch;
mod consumer;
pub mod dead_letter;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use self::batch::Batch;
use self::consumer::{OrderConsumer, Rebalance};
use self::dead_letter::{DeadLetter, DeadLetters};
use crate::cache::OrderCache;
use crate::configuration::Settings;
use crate::http::Feed;
use crate::store::{is_transient, Store};
use crate::telemetry::Metrics;

/// What readiness needs to know about ingest.
#[derive(Debug, Default)]
pub struct IngestHealth {
    /// The consumer has joined its group and received an assignment (possibly empty).
    pub assigned: AtomicBool,
    /// Fetching is paused until PostgreSQL (or the dead-letter topic) is back.
    pub paused: AtomicBool,
}

/// Where a partition stands: the next offset to accept, from PostgreSQL.
#[derive(Debug, Clone)]
struct PartitionState {
    /// `None`: nothing stored yet, so the partition starts at its beginning.
    next: Option<i64>,
    /// Offsets from `next` on whose letters an interrupted batch already sent.
    dead_lettered: HashSet<i64>,
    /// Where this partition's next letter lands at the earliest.
    dlq_floor: i64,
    /// Whether the consumer was moved to `next`; until then its messages are dropped.
    positioned: bool,
}

pub struct Ingest {
    consumer: Arc<OrderConsumer>,
    events: mpsc::UnboundedReceiver<Rebalance>,
    dead_letters: DeadLetters,
    store: Store,
    cache: Arc<OrderCache>,
    metrics: Arc<Metrics>,
    health: Arc<IngestHealth>,
    feed: Feed,
    settings: Settings,
    partitions: HashMap<i32, PartitionState>,
    /// Assigned partitions whose offsets could not be read yet.
    unloaded: Vec<i32>,
    batch: Batch,
    /// A closed batch waiting for PostgreSQL or the dead-letter topic.
    stalled: Option<Batch>,
    backoff: Duration,
    retry_at: Option<Instant>,
    /// When to try again to seek partitions that could not be positioned yet.
    reposition_at: Option<Instant>,
}

impl Ingest {
    pub fn new(
        settings: &Settings,
        store: Store,
        cache: Arc<OrderCache>,
        metrics: Arc<Metrics>,
        health: Arc<IngestHealth>,
        feed: Feed,
    ) -> anyhow::Result<Self> {
        let (consumer, events) = consumer::subscribe(
            &settings.kafka,
            settings.validation.max_message_bytes,
            metrics.clone(),
        )?;
        let dead_letters = DeadLetters::new(
            &settings.kafka.brokers,
            &settings.kafka.dlq_topic,
            &settings.kafka.topic,
            settings.validation.max_message_bytes,
        )?;
        Ok(Self {
            consumer: Arc::new(consumer),
            events,
            dead_letters,
            store,
            cache,
            metrics,
            health,
            feed,
            settings: settings.clone(),
            partitions: HashMap::new(),
            unloaded: Vec::new(),
            batch: Batch::default(),
            stalled: None,
            backoff: Duration::ZERO,
            retry_at: None,
            reposition_at: None,
        })
    }

    /// Consumes until `shutdown`, then commits the batch in hand (within the
    /// shutdown bound) and leaves the group.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let linger = self.settings.batch_linger();
        // A local handle, so a fetched message (which borrows the consumer) can
        // live while the loop updates its own state.
        let consumer = self.consumer.clone();
        loop {
            let flush_at = self.batch.first_at.map(|t| t + linger);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(event) = self.events.recv() => self.on_rebalance(event).await,
                () = sleep_until(self.retry_at.unwrap_or_else(far_future)), if self.retry_at.is_some() => {
                    self.retry().await;
                }
                () = sleep_until(self.reposition_at.unwrap_or_else(far_future)), if self.reposition_at.is_some() => {
                    self.reposition();
                }
                () = sleep_until(flush_at.unwrap_or_else(far_future)), if flush_at.is_some() && self.stalled.is_none() => {
                    self.flush_current().await;
                }
                message = consumer.recv() => match message {
                    Ok(message) => {
                        // Rebalance signals raised while polling come first, so a
                        // message is never judged against a stale assignment.
                        while let Ok(event) = self.events.try_recv() {
                            self.on_rebalance(event).await;
                        }
                        let (partition, offset) = (message.partition(), message.offset());
                        if self.accept(partition, offset) {
                            self.metrics.messages_consumed.inc();
                            self.batch.push(
                                message.key(),
                                message.payload().unwrap_or_default(),
                                partition,
                                offset,
                                &self.settings.validation,
                            );
                            if self.batch.len() >= self.settings.ingest.batch_size && self.stalled.is_none() {
                                self.flush_current().await;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
                },
            }
        }
        self.shut_down().await
    }

    async fn shut_down(mut self) -> anyhow::Result<()> {
        let bound = Duration::from_millis(self.settings.ingest.shutdown_timeout_ms);
        let finish = async {
            // The batch in hand comes after the stalled one; committing it alone
            // would move the offsets past messages never stored.
            if let Some(stalled) = self.stalled.take() {
                if self.commit_batch(stalled).await.is_err() {
                    tracing::warn!(
                        "the stalled batch could not be committed; it will be consumed again"
                    );
                    return;
                }
            }
            if !self.batch.is_empty() {
                let batch = std::mem::take(&mut self.batch);
                if self.commit_batch(batch).await.is_err() {
                    tracing::warn!(
                        "the batch in hand could not be committed; it will be consumed again"
                    );
                }
            }
        };
        if tokio::time::timeout(bound, finish).await.is_err() {
            tracing::warn!(
                ?bound,
                "shutdown bound reached; uncommitted messages will be consumed again"
            );
        }
        self.consumer.unsubscribe();
        tracing::info!("ingest stopped");
        Ok(())
    }

    /// Whether a fetched message is new to this consumer: its partition is
    /// ours, positioned at the stored offset, and the message is not below it.
    fn accept(&mut self, partition: i32, offset: i64) -> bool {
        match self.partitions.get_mut(&partition) {
            Some(state) if state.positioned && state.next.is_none_or(|next| offset >= next) => {
                state.next = Some(offset + 1);
                true
            }
            _ => false,
        }
    }

    /// Seeks every newly assigned partition to the offset stored in PostgreSQL
    /// (or its beginning if none is). A seek right after an assignment can fail
    /// until the fetcher has started; those are retried shortly.
    fn reposition(&mut self) {
        let mut pending = false;
        for (&partition, state) in self.partitions.iter_mut().filter(|(_, s)| !s.positioned) {
            let target = state.next.map_or(Offset::Beginning, Offset::Offset);
            match self.consumer.seek(
                &self.settings.kafka.topic,
                partition,
                target,
                Duration::from_secs(1),
            ) {
                Ok(()) => {
                    tracing::debug!(
                        partition,
                        ?target,
                        "positioned at the offset stored in PostgreSQL"
                    );
                    state.positioned = true;
                }
                Err(e) => {
                    tracing::debug!(partition, error = %e, "seek not possible yet; retrying");
                    pending = true;
                }
            }
        }
        self.reposition_at = pending.then(|| Instant::now() + REPOSITION_RETRY);
    }

    async fn on_rebalance(&mut self, event: Rebalance) {
        match event {
            Rebalance::Revoked(revoked) => {
                tracing::info!(partitions = ?revoked, "partitions revoked");
                for p in &revoked {
                    self.partitions.remove(p);
                    self.metrics
                        .consumer_lag
                        .remove_label_values(&[&p.to_string()])
                        .ok();
                }
                self.unloaded.retain(|p| !revoked.contains(p));
                self.batch.drop_partitions(&revoked);
                if let Some(stalled) = &mut self.stalled {
                    stalled.drop_partitions(&revoked);
                }
            }
            Rebalance::Assigned(assigned) => {
                tracing::info!(partitions = ?assigned, "partitions assigned");
                self.health.assigned.store(true, Ordering::Relaxed);
                self.unloaded.extend(assigned);
                if let Err(e) = self.load_offsets().await {
                    self.stall(e);
                }
            }
        }
    }

    async fn load_offsets(&mut self) -> anyhow::Result<()> {
        if self.unloaded.is_empty() {
            return Ok(());
        }
        let stored = self
            .store
            .load_offsets(
                &self.settings.kafka.group_id,
                &self.settings.kafka.topic,
                &self.unloaded,
            )
            .await
            .context("reading stored offsets")?;
        let scans = self.unloaded.iter().map(|&p| {
            let stored = stored.get(&p);
            let from = stored.map_or(0, |s| s.next_offset);
            let dlq_offset = stored.and_then(|s| s.dlq_next_offset);
            self.dead_letters.already_sent(p, from, dlq_offset)
        });
        let scanned = futures::future::try_join_all(scans)
            .await
            .context("reading back the dead-letter topic")?;
        for (p, (dead_lettered, dlq_floor)) in self.unloaded.drain(..).zip(scanned) {
            if !dead_lettered.is_empty() {
                tracing::info!(
                    partition = p,
                    count = dead_lettered.len(),
                    "letters of an interrupted batch are already in the dead-letter topic; they will not be sent again"
                );
            }
            self.partitions.insert(
                p,
                PartitionState {
                    next: stored.get(&p).map(|s| s.next_offset),
                    dead_lettered,
                    dlq_floor,
                    positioned: false,
                },
            );
        }
        self.reposition();
        Ok(())
    }

    async fn flush_current(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        if let Err(e) = self.commit_batch_or_hold(batch).await {
            self.stall(e);
        }
    }

    async fn commit_batch_or_hold(&mut self, batch: Batch) -> Result<(), anyhow::Error> {
        match self.commit_batch(batch).await {
            Ok(()) => Ok(()),
            Err((batch, e)) => {
                self.stalled = Some(batch);
                Err(e)
            }
        }
    }

    /// Pauses fetching and schedules a retry with capped exponential backoff.
    fn stall(&mut self, error: anyhow::Error) {
        let max = Duration::from_millis(self.settings.ingest.max_backoff_ms);
        self.backoff = (self.backoff * 2).clamp(
            Duration::from_millis(100),
            max.max(Duration::from_millis(100)),
        );
        self.retry_at = Some(Instant::now() + self.backoff);
        if !self.health.paused.swap(true, Ordering::Relaxed) {
            tracing::error!(
                error = format!("{error:#}"),
                "ingest paused; retrying until it succeeds"
            );
            self.metrics.consumer_paused.set(1);
            if let Ok(assignment) = self.consumer.assignment() {
                self.consumer.pause(&assignment).ok();
            }
        }
    }

    async fn retry(&mut self) {
        self.retry_at = None;
        if let Err(e) = self.load_offsets().await {
            return self.stall(e);
        }
        if let Some(batch) = self.stalled.take() {
            if let Err(e) = self.commit_batch_or_hold(batch).await {
                return self.stall(e);
            }
        }
        self.backoff = Duration::ZERO;
        if self.health.paused.swap(false, Ordering::Relaxed) {
            tracing::info!("ingest resumed");
            self.metrics.consumer_paused.set(0);
            if let Ok(assignment) = self.consumer.assignment() {
                self.consumer.resume(&assignment).ok();
            }
        }
    }

    /// Writes a batch in one transaction with the offsets it covers. On failure
    /// the batch comes back, with the dead letters already acknowledged marked.
    async fn commit_batch(&mut self, mut batch: Batch) -> Result<(), (Batch, anyhow::Error)> {
        if batch.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        match self.try_commit(&mut batch, true).await {
            Ok(stored) => {
                self.metrics.batch_size.observe(batch.len() as f64);
                self.metrics
                    .batch_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.cache.stored(stored);
                self.commit_to_kafka(&batch);
                Ok(())
            }
            Err(e) => Err((batch, e)),
        }
    }

    /// Returns the newly stored orders for the cache.
    async fn try_commit(
        &mut self,
        batch: &mut Batch,
        isolate_refusals: bool,
    ) -> Result<Vec<(Box<str>, bytes::Bytes)>, anyhow::Error> {
        let rejected: Vec<DeadLetter> = batch.rejected.clone();
        self.send_dead_letters(batch, &rejected).await?;

        let topic = self.settings.kafka.topic.clone();
        let db = |e: sqlx::Error| {
            let transient = is_transient(&e);
            (anyhow::Error::new(e), transient)
        };
        let attempt = async {
            let mut tx = self.store.begin().await.map_err(db)?;
            let outcome = tx.insert_orders(&topic, &batch.valid).await.map_err(db)?;
            Ok::<_, (anyhow::Error, bool)>((tx, outcome))
        };
        let (mut tx, outcome) = match attempt.await {
            Ok(ok) => ok,
            Err((e, true)) => {
                return Err(e.context("writing orders to PostgreSQL"));
            }
            Err((e, false)) if isolate_refusals => return self.commit_one_by_one(batch, e).await,
            Err((e, false)) => return Err(e.context("writing orders to PostgreSQL")),
        };
        let conflicts: Vec<DeadLetter> = outcome
            .conflicts
            .iter()
            .map(|&i| {
                DeadLetter::refused(
                    &batch.valid[i],
                    &batch.valid_sources[i],
                    "conflict",
                    "conflict: order_uid already stored with different content".into(),
                )
            })
            .collect();
        self.send_dead_letters(batch, &conflicts).await?;
        let saved = async {
            let dlq_floor = |p: i32| self.partitions.get(&p).map(|s| s.dlq_floor);
            tx.save_offsets(
                &self.settings.kafka.group_id,
                &topic,
                &batch.offsets(dlq_floor),
            )
            .await?;
            tx.commit().await
        };
        if let Err(e) = saved.await {
            return Err(anyhow::Error::new(e).context("committing the batch"));
        }
        self.metrics
            .orders_stored
            .inc_by(outcome.stored.len() as u64);
        self.metrics
            .duplicates
            .inc_by(outcome.duplicates.len() as u64);
        for letter in batch.rejected.iter().chain(&conflicts) {
            self.metrics
                .dead_letters
                .with_label_values(&[letter.stage])
                .inc();
        }
        for &i in &outcome.duplicates {
            let m = &batch.valid[i];
            tracing::debug!(topic = %self.settings.kafka.topic, partition = m.partition, offset = m.offset, order_uid = %m.order.uid(), "duplicate order skipped");
        }
        Ok(outcome
            .stored
            .iter()
            .map(|&i| {
                let m = &batch.valid[i];
                self.feed.publish(&m.order);
                (Box::from(m.order.uid().as_str()), m.json.clone())
            })
            .collect())
    }

    /// A batch PostgreSQL refuses for a reason retrying cannot fix: find the
    /// order(s) at fault by writing one at a time; those are dead-lettered.
    async fn commit_one_by_one(
        &mut self,
        batch: &mut Batch,
        cause: anyhow::Error,
    ) -> Result<Vec<(Box<str>, bytes::Bytes)>, anyhow::Error> {
        tracing::warn!(
            error = format!("{cause:#}"),
            "batch refused by PostgreSQL; writing its orders one by one"
        );
        // Try each order alone (rolled back); refusals are marked, the rest kept.
        let mut refused = Vec::new();
        for i in 0..batch.valid.len() {
            let single = std::slice::from_ref(&batch.valid[i]);
            let result = async {
                let mut tx = self.store.begin().await?;
                tx.insert_orders(&self.settings.kafka.topic, single).await?;
                drop(tx);
                Ok::<_, sqlx::Error>(())
            }
            .await;
            match result {
                Ok(()) => {}
                Err(e) if is_transient(&e) => {
                    return Err(anyhow::Error::new(e).context("writing orders to PostgreSQL"));
                }
                Err(e) => {
                    let reason = match &e {
                        sqlx::Error::Database(db) => format!(
                            "store: database refused the order ({})",
                            db.code().as_deref().unwrap_or("unknown code")
                        ),
                        _ => "store: database refused the order".to_owned(),
                    };
                    let incoming = &batch.valid[i];
                    tracing::warn!(topic = %self.settings.kafka.topic, partition = incoming.partition, offset = incoming.offset, order_uid = %incoming.order.uid(), %reason, "order refused by PostgreSQL");
                    refused.push((
                        i,
                        DeadLetter::refused(incoming, &batch.valid_sources[i], "store", reason),
                    ));
                }
            }
        }
        for (i, letter) in refused.into_iter().rev() {
            batch.valid.remove(i);
            batch.valid_sources.remove(i);
            batch.rejected.push(letter);
        }
        Box::pin(self.try_commit(batch, false)).await
    }

    /// Sends the letters not yet acknowledged and waits for the broker.
    async fn send_dead_letters(
        &self,
        batch: &mut Batch,
        letters: &[DeadLetter],
    ) -> Result<(), anyhow::Error> {
        let already_sent = |l: &DeadLetter| {
            self.partitions
                .get(&l.partition)
                .is_some_and(|s| s.dead_lettered.contains(&l.offset))
        };
        let pending: Vec<&DeadLetter> = letters
            .iter()
            .filter(|l| !batch.acknowledged.contains(&(l.partition, l.offset)) && !already_sent(l))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let results = self.dead_letters.send_all(&pending).await;
        let mut failure = None;
        for (letter, result) in pending.iter().zip(results) {
            match result {
                Ok(dlq_offset) => {
                    batch.dead_lettered_at(letter.partition, dlq_offset);
                    tracing::info!(
                        topic = %self.settings.kafka.topic,
                        partition = letter.partition,
                        offset = letter.offset,
                        // Producers key orders by order_uid; the key is all that is known of a rejected one.
                        order_uid = letter.key.as_deref().map(String::from_utf8_lossy).as_deref().unwrap_or(""),
                        stage = letter.stage,
                        reasons = %letter.reasons.join("; "),
                        "message dead-lettered"
                    );
                    batch.acknowledged.insert((letter.partition, letter.offset));
                }
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            None => Ok(()),
            Some(e) => Err(anyhow::anyhow!(
                "the dead-letter topic {} cannot be written: {e}",
                self.settings.kafka.dlq_topic
            )),
        }
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

const REPOSITION_RETRY: Duration = Duration::from_millis(50);

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}
