//! This instance in its consumer group: partitions assigned and revoked, the
//! group left on shutdown, and partitions that no live member consumes
//! while this one holds none.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::TopicPartitionList;
use tokio::time::Instant;

use super::consumer::{self, ConsumerEvent};
use super::orphans::Progress;
use super::Ingest;

impl Ingest {
    /// Leaves the group, so the partitions move to the other members at once.
    /// A member with a stable name leaves only when it unsubscribes, its
    /// revocation is served by polling, and the leave is sent before its
    /// close begins; closing alone keeps its place for its return (so a
    /// crash-restart resumes at once).
    pub(super) async fn leave_group(&mut self) {
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

    pub(super) async fn on_event(&mut self, event: ConsumerEvent) {
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

    /// An instance that holds no partition looks at the group's progress and
    /// names, in `/readyz` and in one log line, the partitions whose messages
    /// have waited with no commit for longer than the session timeout.
    pub(super) async fn look_for_orphans(&mut self) {
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
}

/// Longest wait for the group to take back this member's partitions on shutdown.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often shutdown looks whether the leave has been sent.
const LEAVE_CHECK: Duration = Duration::from_millis(10);

/// How often an instance that holds no partition looks for orphaned ones.
pub(super) const ORPHAN_CHECK: Duration = Duration::from_secs(5);
