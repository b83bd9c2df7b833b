//! A closed batch's way into PostgreSQL: its letters sent, its transaction
//! run while the next batch is gathered (two at a time, committed in order),
//! then what follows a commit: positions raised, orders counted, cached and
//! announced, Kafka told.

use std::collections::{HashSet, VecDeque};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};

use super::batch::Batch;
use super::commit::{Attempt, Predecessor, Stall};
use super::positions::{idle_positions, raise_end, stored_positions};
use super::Ingest;
use crate::store::{InsertOutcome, PartitionOffset};

impl Ingest {
    /// Closes the batch being gathered and starts its commit.
    pub(super) async fn flush(&mut self) {
        self.closed.push_back(std::mem::take(&mut self.batch));
        self.start_commit(std::time::Instant::now()).await;
    }

    /// Sends the oldest closed batch's letters, then hands it to a task that
    /// writes it while the next batch is gathered, behind the write in
    /// flight if there is one. The batch stays in `closed` until the task
    /// holds it, so a step cut short by shutdown leaves it in place. It waits
    /// there while a write holds one of its orders.
    pub(super) async fn start_commit(&mut self, started: std::time::Instant) {
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
    pub(super) async fn written(
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
    pub(super) async fn settle(&mut self) -> Result<(), Stall> {
        while !self.writing.is_empty() {
            let joined = writing_ends(&mut self.writing).await;
            self.written(joined).await?;
        }
        Ok(())
    }

    /// Commits the closed batches in order, one at a time, and waits for
    /// each; on success they are gone and their orders are counted, cached
    /// and announced. On failure the batch stays, with what was learnt.
    /// Nothing is being written meanwhile ([`Ingest::settle`] comes first).
    pub(super) async fn commit_closed(&mut self) -> Result<(), Stall> {
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

    /// Tells Kafka too, for lag tools: librdkafka commits the offsets stored
    /// here once a second. PostgreSQL stays the source of truth.
    fn commit_to_kafka(&self, batch: &Batch) {
        let mut list = TopicPartitionList::new();
        for (partition, next) in batch.next_offsets() {
            list.add_partition_offset(&self.settings.kafka.topic, partition, Offset::Offset(next))
                .ok();
        }
        if let Err(e) = self.consumer.store_offsets(&list) {
            tracing::debug!(error = %e, "cannot store offsets for kafka; PostgreSQL holds them");
        }
    }
}

/// A batch back from its write, with what the write came to.
type Written = (Batch, Result<Attempt, Stall>);

/// How many batches may be written at once: with a pool of 4 sessions or
/// more, the next full batch starts its transaction while the one before it
/// ends its own. A smaller pool keeps its sessions for one write and the
/// HTTP reads, rather than have a second write wait for a session.
pub(super) fn writes_in_flight(max_connections: u32) -> usize {
    if max_connections >= 4 {
        2
    } else {
        1
    }
}

/// The task writing a closed batch, and when its commit started.
pub(super) struct Writing {
    task: JoinHandle<Written>,
    started: std::time::Instant,
    /// Its orders, by [`Batch::order_hashes`]: a batch holding one of them
    /// is not written beside it.
    orders: HashSet<u64>,
    /// The partitions whose positions it stores.
    pub(super) positions: HashSet<i32>,
    /// Whether it committed, for the write started behind it.
    committed: Option<Predecessor>,
}

/// The end of the oldest write in `writing`; never, if there is none.
pub(super) async fn writing_ends(writing: &mut VecDeque<Writing>) -> Result<Written, JoinError> {
    match writing.front_mut() {
        Some(writing) => (&mut writing.task).await,
        None => std::future::pending().await,
    }
}

/// A panic in a write is a defect: it ends ingest as it would have there.
fn joined_or_panic(joined: Result<Written, JoinError>) -> Written {
    joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
