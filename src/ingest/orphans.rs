//! Partitions that no live member consumes. A member that is gone keeps its
//! partitions for the session timeout on any broker, and for good on some
//! (the local one, until a member of its name returns), so an instance that
//! holds none watches the group's progress and names the partitions that wait.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// One partition's progress: the group's committed position and the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub partition: i32,
    pub committed: i64,
    pub end: i64,
}

/// Since when each partition has had messages waiting at the same position.
#[derive(Debug, Default)]
pub struct Orphans {
    waiting: HashMap<i32, (i64, Instant)>,
}

impl Orphans {
    /// The partitions whose waiting messages have not moved for longer than
    /// `after`, given the progress seen `now`.
    pub fn update(&mut self, progress: &[Progress], now: Instant, after: Duration) -> Vec<i32> {
        let mut orphaned = Vec::new();
        let mut waiting = HashMap::new();
        for p in progress.iter().filter(|p| p.end > p.committed) {
            let since = match self.waiting.get(&p.partition) {
                Some(&(committed, since)) if committed == p.committed => since,
                _ => now,
            };
            if now.duration_since(since) > after {
                orphaned.push(p.partition);
            }
            waiting.insert(p.partition, (p.committed, since));
        }
        self.waiting = waiting;
        orphaned.sort_unstable();
        orphaned
    }

    pub fn clear(&mut self) {
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(10);

    fn progress(partition: i32, committed: i64, end: i64) -> Progress {
        Progress {
            partition,
            committed,
            end,
        }
    }

    #[test]
    fn a_partition_is_orphaned_once_its_waiting_messages_stand_still_past_the_timeout() {
        let mut orphans = Orphans::default();
        let start = Instant::now();
        let seen = [progress(0, 5, 9), progress(1, 3, 3)];
        assert!(orphans.update(&seen, start, AFTER).is_empty());
        assert!(orphans.update(&seen, start + AFTER, AFTER).is_empty());
        let late = start + AFTER + Duration::from_secs(1);
        assert_eq!(orphans.update(&seen, late, AFTER), vec![0]);
    }

    #[test]
    fn progress_or_an_empty_backlog_resets_the_clock() {
        let mut orphans = Orphans::default();
        let start = Instant::now();
        orphans.update(&[progress(0, 5, 9)], start, AFTER);
        let later = start + Duration::from_secs(8);
        // Committed moved: the clock starts again.
        orphans.update(&[progress(0, 7, 12)], later, AFTER);
        assert!(orphans
            .update(
                &[progress(0, 7, 12)],
                start + Duration::from_secs(15),
                AFTER
            )
            .is_empty());
        // Nothing waits: nothing is orphaned, however long it stands still.
        let mut idle = Orphans::default();
        idle.update(&[progress(2, 4, 4)], start, AFTER);
        assert!(idle
            .update(&[progress(2, 4, 4)], start + 3 * AFTER, AFTER)
            .is_empty());
    }
}
