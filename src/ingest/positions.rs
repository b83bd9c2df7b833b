//! Where each partition stands: the position PostgreSQL holds for it, loaded
//! on assignment with the letters already sent from there, the consumer
//! sought to it, and the check that the broker still holds the messages
//! below it. A partition whose broker lost them is consumed again from its
//! beginning.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::Offset;
use tokio::time::Instant;

use super::batch::Batch;
use super::commit::Stall;
use super::dead_letter::ReadBack;
use super::Ingest;
use crate::store::{PartitionOffset, StoredOffset};
use crate::telemetry::Metrics;

/// Where a partition stands: the next offset to accept, from PostgreSQL.
#[derive(Debug, Clone)]
pub(super) struct PartitionState {
    /// `None`: nothing stored yet, so the partition starts at its beginning.
    next: Option<i64>,
    /// Offsets at or past the committed ones whose letters an interrupted
    /// batch already sent; forgotten as the offsets are committed.
    pub(super) dead_lettered: HashSet<i64>,
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
pub(super) enum Cause {
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

impl Ingest {
    /// Whether a fetched message is new to this consumer: its partition is
    /// ours, positioned at the stored offset, and the message is not below it.
    /// The message before the stored offset, read again to be compared, is
    /// never new; if it is another one, the partition goes to `foreign`.
    pub(super) fn accept(&mut self, partition: i32, offset: i64, digest: [u8; 16]) -> bool {
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
    pub(super) async fn reposition(&mut self) {
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
    pub(super) async fn look_for_lost(&mut self, ends: Vec<(i32, i64)>) {
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
    pub(super) async fn confirm_lost(&mut self, partitions: Vec<i32>, cause: Cause) {
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
    pub(super) async fn start_lost_again(&mut self) {
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

    pub(super) async fn load_offsets(&mut self) -> Result<(), Stall> {
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
    pub(super) fn publish_loading(&self) {
        self.health
            .loading
            .store(!self.unloaded.is_empty(), Ordering::Relaxed);
    }

    /// The group's committed positions of `partitions`, from PostgreSQL.
    pub(super) async fn stored_offsets(
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
}

/// The positions of owned partitions that neither batch in hand holds
/// messages of, lost ones left out.
pub(super) fn idle_positions<V>(
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
pub(super) fn stored_positions(
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

/// Records that dead-letter partition `d` reaches at least `end`.
pub(super) fn raise_end(ends: &mut HashMap<i32, i64>, d: i32, end: i64) {
    let known = ends.entry(d).or_insert(end);
    *known = (*known).max(end);
}

const REPOSITION_RETRY: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::batch::Received;

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
