//! Pausing on a fault of the environment (database, dead-letter topic):
//! fetching stops with the batches in hand, the cause is told once, and the
//! commit is retried with a capped backoff until it succeeds.

use std::time::Duration;

use rdkafka::consumer::Consumer;
use tokio::time::Instant;

use super::commit::Stall;
use super::consumer::ConsumerEvent;
use super::Ingest;

impl Ingest {
    /// Pauses fetching and schedules a retry with capped exponential backoff.
    /// Logs once on entering the state; the cause shown follows the latest.
    pub(super) fn stall(&mut self, stall: Stall) {
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

    /// A dead-letter producer that is stuck for good (see
    /// [`super::dead_letter::DeadLetters::stuck`]) is replaced: the new one
    /// gets a new producer id. The partitions held are then taken up again
    /// as after a rebalance: the batches in hand dropped, the dead-letter
    /// topic read back (a letter that did land is not sent again), and the
    /// partitions consumed again from their stored positions.
    async fn renew_dead_letters(&mut self, cause: &str) -> Result<(), Stall> {
        let held: Vec<i32> = self
            .partitions
            .keys()
            .chain(&self.unloaded)
            .copied()
            .collect();
        tracing::warn!(
            cause,
            partitions = ?held,
            "starting a new dead-letter producer and taking the partitions up again"
        );
        self.committer
            .dead_letters
            .renew()
            .await
            .map_err(|e| Stall::DeadLetters {
                topic: self.committer.dead_letters.topic().to_owned(),
                error: format!("{e:#}"),
            })?;
        self.on_event(ConsumerEvent::Revoked(held.clone())).await;
        self.on_event(ConsumerEvent::Assigned(held)).await;
        Ok(())
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

    pub(super) async fn retry(&mut self) {
        self.retry_at = None;
        if let Err(stall) = self.load_offsets().await {
            return self.stall(stall);
        }
        // The closed batches come after those being written.
        if let Err(stall) = self.settle().await {
            return self.stall(stall);
        }
        let unanswered = self.closed.iter().any(|b| !b.in_flight.is_empty());
        if let Some(cause) = self.committer.dead_letters.stuck(unanswered) {
            if let Err(stall) = self.renew_dead_letters(&cause).await {
                return self.stall(stall);
            }
            // Tried again from the start, with the positions just loaded.
            self.retry_at.get_or_insert_with(Instant::now);
            return;
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
}
