//! The commit of one batch, in two steps: its dead letters sent and
//! acknowledged, then its orders written in one transaction with the offsets
//! they cover (repeated while orders are refused).
//! Only an order's own data may refuse it; any other failure is a [`Stall`]
//! and the whole batch is kept for a retry. No transaction is open while the
//! broker is waited on.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

use super::batch::{Batch, Refusal, UnansweredCommit};
use super::dead_letter::{DeadLetter, DeadLetters, SendError};
use super::positions::PartitionState;
use crate::domain::{parse_order, Limits, SAMPLE_ORDER};
use crate::store::{
    classify, described, ErrorClass, Incoming, InsertOutcome, NewLetter, PartitionOffset, Store,
};

/// Why a batch cannot be committed now: the environment, never the orders.
/// Ingest pauses, reports the cause and retries until it succeeds. The text
/// is what an operator reads in `/readyz` and the log, e.g.
/// `database: permission denied for table orders (42501)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stall {
    #[error("{0}")]
    Database(String),
    #[error("dead-letter topic {topic}: {error}")]
    DeadLetters { topic: String, error: String },
}

impl From<sqlx::Error> for Stall {
    fn from(error: sqlx::Error) -> Self {
        Self::database(&error)
    }
}

impl Stall {
    pub fn database(error: &sqlx::Error) -> Self {
        match classify(error) {
            ErrorClass::Environment { cause } => Self::Database(cause),
            // A data error outside an order's own insert (offsets, commit) is
            // not the order's fault either.
            ErrorClass::OrderData { .. } => Self::Database(format!("database: {error}")),
        }
    }
}

/// What one write attempt came to.
pub enum Attempt {
    Committed(InsertOutcome),
    /// These orders are refused (their data, or a conflict): they are
    /// dead-lettered first, then the rest is written again.
    Refused(Vec<Refusal>),
    /// The batch written before it was not committed, so it was rolled back
    /// before its offsets: it is written again after that one.
    Behind,
}

/// Whether the batch before this one committed; its write sends it at its end.
pub type Predecessor = oneshot::Receiver<bool>;

pub struct Committer {
    pub store: Store,
    pub dead_letters: DeadLetters,
    pub topic: String,
    pub group_id: String,
    /// How many of a letter's first bytes its record in PostgreSQL keeps.
    pub preview_bytes: usize,
}

impl Committer {
    /// Writes `batch` in one transaction with the positions it moves to,
    /// once its letters are acknowledged ([`Committer::send_letters`]): the
    /// orders, the letters' records, the offsets. No broker call is awaited
    /// here, so this can run while the next batch is gathered. An attempt
    /// PostgreSQL does not answer within the write timeout is abandoned (and
    /// rolled back with its session): the batch is retried like any other
    /// fault's, and a commit that did land meanwhile is found then: its orders
    /// count as stored, once. The bound is per transaction, so a refused
    /// batch's search for the orders at fault (one transaction each) is not
    /// cut short by it.
    ///
    /// Written while the batch before it is (`after`), it stores its orders
    /// beside that one's and waits for its commit before storing its own
    /// offsets: positions never pass a batch that is not stored.
    pub async fn write(
        &self,
        batch: &mut Batch,
        offsets: &[PartitionOffset],
        after: Option<Predecessor>,
    ) -> Result<Attempt, Stall> {
        match self
            .store
            .answered(self.attempt(batch, offsets, after))
            .await?
        {
            Ok(attempt) => Ok(attempt),
            Err(data_error) => self.isolate(batch, &data_error).await,
        }
    }

    /// The batch's transaction; the error of the order data it was refused
    /// for, if it was.
    async fn attempt(
        &self,
        batch: &mut Batch,
        offsets: &[PartitionOffset],
        after: Option<Predecessor>,
    ) -> Result<Result<Attempt, sqlx::Error>, Stall> {
        let mut tx = self.store.begin().await?;
        let mut outcome = match tx.insert_orders(&self.topic, &batch.valid).await {
            Ok(outcome) => outcome,
            Err(e) => {
                drop(tx);
                return match classify(&e) {
                    ErrorClass::Environment { cause } => Err(Stall::Database(cause)),
                    ErrorClass::OrderData { .. } => Ok(Err(e)),
                };
            }
        };
        if !outcome.conflicts.is_empty() {
            // Rolled back: the conflicts' letters must be acknowledged before
            // the offsets move past them, and no transaction waits on the broker.
            drop(tx);
            let conflicts = outcome.conflicts.iter().map(|&index| Refusal {
                index,
                stage: "conflict",
                reason: "conflict: order_uid already stored with different content".to_owned(),
            });
            return Ok(Ok(Attempt::Refused(conflicts.collect())));
        }
        if !batch.unanswered_commits.is_empty() {
            let ids: Vec<i64> = batch.unanswered_commits.iter().map(|c| c.id).collect();
            let landed = tx.committed_of(&ids).await?;
            let mut ours: HashSet<&str> = batch
                .unanswered_commits
                .iter()
                .filter(|c| landed.contains(&c.id))
                .flat_map(|c| c.stored.iter().map(String::as_str))
                .collect();
            // The first copy of an order in the batch is the one that stored it.
            outcome.duplicates.retain(|&i| {
                let stored_here = ours.remove(batch.valid[i].order.uid().as_str());
                if stored_here {
                    outcome.stored.push(i);
                }
                !stored_here
            });
        }
        let letters: Vec<NewLetter> = batch
            .rejected
            .iter()
            .map(|l| NewLetter {
                partition: l.partition,
                offset: l.offset,
                key: l.key.as_deref(),
                order_uid: l.order_uid.as_deref(),
                stage: l.stage,
                reasons: &l.reasons,
                payload_bytes: l.omitted_bytes.unwrap_or(l.payload.len()),
                preview: &l.payload[..l.payload.len().min(self.preview_bytes)],
                digest: &l.digest,
                replay_of: l.replay_of.as_deref(),
            })
            .collect();
        tx.record_dead_letters(&self.topic, &letters).await?;
        // Not before: the batch before it holds the offsets' rows until it ends.
        if let Some(after) = after {
            if !after.await.unwrap_or(false) {
                return Ok(Ok(Attempt::Behind));
            }
        }
        let id = tx
            .save_offsets(&self.group_id, &self.topic, offsets)
            .await?;
        // Kept until the batch is done: if the answer to COMMIT is lost, only
        // this id tells whether it landed.
        let stored = outcome.stored.iter();
        batch.unanswered_commits.push(UnansweredCommit {
            id,
            stored: stored
                .map(|&i| batch.valid[i].order.uid().as_str().to_owned())
                .collect(),
        });
        tx.commit().await?;
        Ok(Ok(Attempt::Committed(outcome)))
    }

    /// PostgreSQL refused the batch for a data error: writing each order alone
    /// (rolled back) finds the ones at fault, once a known-good order is
    /// accepted ([`Committer::control`]). Any other error on the way stalls.
    async fn isolate(&self, batch: &Batch, cause: &sqlx::Error) -> Result<Attempt, Stall> {
        self.control().await?;
        tracing::warn!(error = %cause, "batch refused by PostgreSQL; writing its orders one by one");
        let mut refused = Vec::new();
        for (index, incoming) in batch.valid.iter().enumerate() {
            let alone = async {
                let mut tx = self.store.begin().await?;
                tx.insert_orders(&self.topic, std::slice::from_ref(incoming))
                    .await
                    .map(drop)
            };
            // No answer in time is an environment fault, like any error classified so.
            let Err(e) = self.store.answered(alone).await else {
                continue;
            };
            match classify(&e) {
                ErrorClass::Environment { cause } => return Err(Stall::Database(cause)),
                ErrorClass::OrderData { reason } => {
                    tracing::warn!(topic = %self.topic, partition = incoming.partition, offset = incoming.offset, order_uid = %incoming.order.uid(), %reason, "order refused by PostgreSQL");
                    refused.push(Refusal {
                        index,
                        stage: "store",
                        reason,
                    });
                }
            }
        }
        if refused.is_empty() {
            // Each order alone is accepted: the refusal was not about one order.
            return Err(Stall::Database(format!("database: {cause}")));
        }
        Ok(Attempt::Refused(refused))
    }

    /// Writes the sample order alone, under an id of its own, and rolls it
    /// back. Refused too, it shows that the tables are not as `migrate` made
    /// them (a column added NOT NULL without a default, a column narrowed, a
    /// constraint the sample breaks): the environment is at fault, and no
    /// order is dead-lettered for it.
    async fn control(&self) -> Result<(), Stall> {
        let control = control_order();
        let write = async {
            let mut tx = self.store.begin().await?;
            tx.insert_orders(&self.topic, std::slice::from_ref(&control))
                .await
                .map(drop)
        };
        let Err(e) = self.store.answered(write).await else {
            return Ok(());
        };
        Err(match classify(&e) {
            ErrorClass::Environment { cause } => Stall::Database(cause),
            ErrorClass::OrderData { .. } => Stall::Database(format!(
                "database: refuses the sample order too, so its tables are not as migrate \
                 made them: {}",
                e.as_database_error().map_or(e.to_string(), described)
            )),
        })
    }

    /// Sends the batch's letters not yet acknowledged and waits for the broker,
    /// at most [`ACK_PATIENCE`] per attempt. Letters still unanswered then stay
    /// in flight: the retry waits for them, it never sends them again.
    pub async fn send_letters(
        &self,
        batch: &mut Batch,
        partitions: &HashMap<i32, PartitionState>,
    ) -> Result<(), Stall> {
        let stall = |error: String| Stall::DeadLetters {
            topic: self.dead_letters.topic().to_owned(),
            error,
        };
        let already_sent = |l: &DeadLetter| {
            partitions
                .get(&l.partition)
                .is_some_and(|s| s.dead_lettered.contains(&l.offset))
        };
        let mut failure = None;
        for i in 0..batch.rejected.len() {
            let letter = &batch.rejected[i];
            let done = batch
                .acknowledged
                .contains(&(letter.partition, letter.offset))
                || already_sent(letter)
                || batch.in_flight.contains(letter);
            if done {
                continue;
            }
            let mut sent = self
                .dead_letters
                .enqueue(letter, &mut batch.in_flight)
                .await;
            if sent
                .as_ref()
                .is_err_and(|e| slimmed(&self.topic, &mut batch.rejected[i], e))
            {
                let letter = &batch.rejected[i];
                sent = self
                    .dead_letters
                    .enqueue(letter, &mut batch.in_flight)
                    .await;
            }
            if let Err(e) = sent {
                failure = Some(e.to_string());
                break;
            }
        }
        let deadline = Instant::now() + ACK_PATIENCE;
        // Built per call: `drop_partitions` removes letters in place between calls.
        let by_origin: HashMap<(i32, i64), usize> = batch
            .rejected
            .iter()
            .enumerate()
            .map(|(i, l)| ((l.partition, l.offset), i))
            .collect();
        while !batch.in_flight.is_empty() {
            let Ok(answer) = timeout_at(deadline, batch.in_flight.next()).await else {
                failure.get_or_insert_with(|| {
                    format!(
                        "{} letter(s) not acknowledged within {ACK_PATIENCE:?}; still waiting for them",
                        batch.in_flight.len()
                    )
                });
                break;
            };
            let Some(((partition, offset), result)) = answer else {
                break;
            };
            match result {
                Ok(dlq_offset) => {
                    if let Some(&i) = by_origin.get(&(partition, offset)) {
                        log_dead_lettered(&self.topic, &batch.rejected[i]);
                    }
                    batch.dead_lettered_at(partition, dlq_offset);
                    batch.acknowledged.insert((partition, offset));
                }
                // Refused by the broker, so not written: the retry sends it
                // again, slim if it was refused for its size.
                Err(e) => {
                    if let Some(&i) = by_origin.get(&(partition, offset)) {
                        slimmed(&self.topic, &mut batch.rejected[i], &e);
                    }
                    failure = Some(e.to_string());
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(error) => Err(stall(error)),
        }
    }
}

/// How long one commit attempt waits for its letters' acknowledgements before
/// ingest reports a stall; the letters stay in flight and the wait goes on.
const ACK_PATIENCE: Duration = Duration::from_secs(15);

/// Whether `letter`, refused with `error`, is now to be sent without its
/// payload (see [`DeadLetter::slim`]): refused for its size, and not slim yet.
fn slimmed(topic: &str, letter: &mut DeadLetter, error: &SendError) -> bool {
    if letter.slim || !error.too_large() {
        return false;
    }
    tracing::warn!(
        topic,
        partition = letter.partition,
        offset = letter.offset,
        payload_bytes = letter.payload.len(),
        key_bytes = letter.key.as_ref().map_or(0, Vec::len),
        "the dead-letter topic refuses this letter whole as too large; it is sent without the \
         original, which stays at its source offset"
    );
    letter.slim = true;
    true
}

fn log_dead_lettered(topic: &str, letter: &DeadLetter) {
    tracing::info!(
        topic,
        partition = letter.partition,
        offset = letter.offset,
        // Producers key orders by order_uid; the key is all that is known of a rejected one.
        order_uid = letter.key.as_deref().map(String::from_utf8_lossy).as_deref().unwrap_or(""),
        stage = letter.stage,
        reasons = %letter.reasons.join("; "),
        "message dead-lettered"
    );
}

/// The sample order under an id of its own, which no order is stored under
/// (this write is never committed; were a producer to use the id, the write
/// would find it stored and prove nothing, as before the control).
fn control_order() -> Incoming {
    let sample = SAMPLE_ORDER.replace("b563feb7b2b84b6test", "order-service-control");
    let order = parse_order(sample.as_bytes(), &Limits::default())
        .expect("the sample order is valid under the default limits");
    Incoming {
        json: order.to_json().into(),
        order,
        partition: -1,
        offset: -1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_order_is_the_sample_under_its_own_id() {
        let control = control_order();
        assert_eq!(control.order.uid().as_str(), "order-service-control");
        let sample = parse_order(SAMPLE_ORDER.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(
            String::from_utf8(control.json.to_vec()).unwrap(),
            String::from_utf8(sample.to_json().to_vec())
                .unwrap()
                .replace("b563feb7b2b84b6test", "order-service-control")
        );
    }
}
