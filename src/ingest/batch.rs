//! Messages gathered between two database commits, already decided: valid
//! orders to store, and rejected messages to dead-letter.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use bytes::Bytes;
use tokio::time::Instant;

use super::dead_letter::{digest, DeadLetter, InFlight};
use crate::domain::{claimed_uid, parse_order, Limits, OrderUid, Stage};
use crate::store::Incoming;

/// A message as the consumer hands it over.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub partition: i32,
    pub offset: i64,
    /// The broker's timestamp, in Unix milliseconds, where known.
    pub broker_time: Option<i64>,
    /// The letter it was replayed from, if it is a replay.
    pub replay_of: Option<&'a str>,
    /// [`digest`] of the payload.
    pub digest: [u8; 16],
}

#[derive(Debug, Clone)]
pub struct Source {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub replay_of: Option<String>,
}

/// A valid order turned away later, by its index in [`Batch::valid`].
#[derive(Debug)]
pub struct Refusal {
    pub index: usize,
    /// `conflict` or `store`.
    pub stage: &'static str,
    pub reason: String,
}

/// A transaction of the batch sent to commit, and the orders it stored; kept
/// until the batch is done, so it only outlives an unanswered commit.
#[derive(Debug)]
pub struct UnansweredCommit {
    pub id: i64,
    pub stored: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Batch {
    pub valid: Vec<Incoming>,
    /// The key and bytes each valid order arrived with, by the same index, so a
    /// later refusal (conflict, store) dead-letters exactly what was received.
    pub valid_sources: Vec<Source>,
    pub rejected: Vec<DeadLetter>,
    /// The next offset to consume per partition once this batch is committed.
    next_offsets: BTreeMap<i32, i64>,
    /// Per partition, the digest of its last message here.
    last_digests: HashMap<i32, [u8; 16]>,
    /// Dead letters already acknowledged by the broker, by (partition, offset),
    /// so a retried batch does not send them again.
    pub acknowledged: HashSet<(i32, i64)>,
    /// Letters handed to the producer and not answered yet; a retry waits for
    /// these instead of sending them again.
    pub in_flight: InFlight,
    /// Per source partition, the dead-letter offset after its last letter here.
    dlq_next: BTreeMap<i32, i64>,
    /// This batch's earlier transactions whose commit went unanswered
    /// (connection lost, no answer in time): one may have landed, and the
    /// orders it stored are this batch's, not duplicates.
    pub unanswered_commits: Vec<UnansweredCommit>,
    pub first_at: Option<Instant>,
    /// The broker's timestamp of each message, in Unix milliseconds, where known.
    pub broker_times: Vec<i64>,
    messages: usize,
    /// The messages' payload bytes.
    bytes: usize,
}

impl Batch {
    /// Decides one message and adds it.
    pub fn push(&mut self, message: Received<'_>, limits: &Limits) {
        let Received {
            key,
            payload,
            partition,
            offset,
            broker_time,
            replay_of,
            digest,
        } = message;
        match parse_order(payload, limits) {
            Ok(order) => {
                let json = Bytes::from(order.to_json());
                self.valid.push(Incoming {
                    order,
                    json,
                    partition,
                    offset,
                });
                self.valid_sources.push(Source {
                    key: key.map(<[u8]>::to_vec),
                    payload: payload.to_vec(),
                    replay_of: replay_of.map(str::to_owned),
                });
            }
            Err(rejection) => {
                // Too large for us is likely too large for the dead-letter topic
                // too: the letter says where the original is instead of copying it.
                let too_large = rejection.stage() == Stage::TooLarge;
                self.rejected.push(DeadLetter {
                    key: key.map(<[u8]>::to_vec),
                    payload: if too_large {
                        Vec::new()
                    } else {
                        payload.to_vec()
                    },
                    omitted_bytes: too_large.then_some(payload.len()),
                    digest,
                    partition,
                    offset,
                    stage: rejection.stage().as_str(),
                    reasons: rejection.reasons(),
                    // Producers key orders by their id: the key stands in when
                    // the payload names none.
                    order_uid: claimed_uid(payload).or_else(|| {
                        key.and_then(|k| std::str::from_utf8(k).ok())
                            .and_then(|k| OrderUid::parse(k).ok())
                            .map(|uid| uid.as_str().to_owned())
                    }),
                    replay_of: replay_of.map(str::to_owned),
                    slim: false,
                });
            }
        }
        self.next_offsets.insert(partition, offset + 1);
        self.last_digests.insert(partition, digest);
        self.broker_times.extend(broker_time);
        self.first_at.get_or_insert_with(Instant::now);
        self.messages += 1;
        self.bytes += payload.len();
    }

    pub fn len(&self) -> usize {
        self.messages
    }

    /// Whether the batch should be written now rather than grow: it holds
    /// `max_messages` messages or `max_bytes` bytes of them.
    pub fn is_full(&self, max_messages: usize, max_bytes: usize) -> bool {
        self.messages >= max_messages || self.bytes >= max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Its orders' ids, hashed: enough to tell that two batches hold no
    /// order in common (a rare collision only makes them look as if they did).
    pub fn order_hashes(&self) -> HashSet<u64> {
        self.valid
            .iter()
            .map(|m| {
                let mut hasher = DefaultHasher::new();
                m.order.uid().as_str().hash(&mut hasher);
                hasher.finish()
            })
            .collect()
    }

    /// Per partition, the next offset to read once this batch is committed.
    pub fn next_offsets(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.next_offsets.iter().map(|(&p, &next)| (p, next))
    }

    /// The digest of `partition`'s last message here.
    pub fn last_digest(&self, partition: i32) -> Option<[u8; 16]> {
        self.last_digests.get(&partition).copied()
    }

    /// Per source partition, the dead-letter offset after its last letter
    /// acknowledged for this batch.
    pub fn dlq_ends(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.dlq_next.iter().map(|(&p, &next)| (p, next))
    }

    /// A letter for `partition` was acknowledged at `dlq_offset`.
    pub fn dead_lettered_at(&mut self, partition: i32, dlq_offset: i64) {
        // A broker that recognises a resent letter as one it already holds
        // acknowledges it without an offset.
        if dlq_offset < 0 {
            return;
        }
        let next = self.dlq_next.entry(partition).or_insert(0);
        *next = (*next).max(dlq_offset + 1);
    }

    /// Moves refused orders from the valid ones to the rejected ones, with
    /// the key and bytes they arrived with.
    pub fn refuse(&mut self, mut refused: Vec<Refusal>) {
        refused.sort_by_key(|r| std::cmp::Reverse(r.index));
        for Refusal {
            index,
            stage,
            reason,
        } in refused
        {
            let incoming = self.valid.remove(index);
            let source = self.valid_sources.remove(index);
            self.rejected.push(DeadLetter {
                key: source.key,
                digest: digest(&source.payload),
                payload: source.payload,
                omitted_bytes: None,
                partition: incoming.partition,
                offset: incoming.offset,
                stage,
                reasons: vec![reason],
                order_uid: Some(incoming.order.uid().to_string()),
                replay_of: source.replay_of,
                slim: false,
            });
        }
    }

    /// Forgets everything from partitions this consumer no longer owns; their
    /// new owner starts from the offsets stored in PostgreSQL.
    pub fn drop_partitions(&mut self, revoked: &[i32]) {
        let keep: Vec<bool> = self
            .valid
            .iter()
            .map(|m| !revoked.contains(&m.partition))
            .collect();
        let mut flags = keep.iter();
        self.valid_sources
            .retain(|_| *flags.next().unwrap_or(&true));
        self.valid.retain(|m| !revoked.contains(&m.partition));
        self.rejected.retain(|m| !revoked.contains(&m.partition));
        self.acknowledged.retain(|(p, _)| !revoked.contains(p));
        self.in_flight.forget(revoked);
        for p in revoked {
            self.next_offsets.remove(p);
            self.last_digests.remove(p);
            self.dlq_next.remove(p);
        }
        self.messages = self.valid.len() + self.rejected.len();
        if self.messages == 0 {
            self.first_at = None;
        }
    }
}
