//! Messages gathered between two database commits, already decided: valid
//! orders to store, and rejected messages to dead-letter.

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;
use tokio::time::Instant;

use super::dead_letter::DeadLetter;
use crate::domain::{parse_order, Limits};
use crate::store::{Incoming, PartitionOffset};

#[derive(Debug, Clone)]
pub struct Source {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
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
    /// Dead letters already acknowledged by the broker, by (partition, offset),
    /// so a retried batch does not send them again.
    pub acknowledged: HashSet<(i32, i64)>,
    pub first_at: Option<Instant>,
    messages: usize,
}

impl Batch {
    /// Decides one message and adds it.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        payload: &[u8],
        partition: i32,
        offset: i64,
        limits: &Limits,
    ) {
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
                });
            }
            Err(rejection) => self.rejected.push(DeadLetter {
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
                partition,
                offset,
                stage: rejection.stage().as_str(),
                reasons: rejection.reasons(),
            }),
        }
        self.next_offsets.insert(partition, offset + 1);
        self.first_at.get_or_insert_with(Instant::now);
        self.messages += 1;
    }

    pub fn len(&self) -> usize {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    pub fn offsets(&self) -> Vec<PartitionOffset> {
        self.next_offsets
            .iter()
            .map(|(&partition, &next_offset)| PartitionOffset {
                partition,
                next_offset,
            })
            .collect()
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
        for p in revoked {
            self.next_offsets.remove(p);
        }
        self.messages = self.valid.len() + self.rejected.len();
        if self.messages == 0 {
            self.first_at = None;
        }
    }
}

impl DeadLetter {
    /// A valid order refused later on: dead-lettered with the bytes it came with.
    pub fn refused(
        incoming: &Incoming,
        source: &Source,
        stage: &'static str,
        reason: String,
    ) -> Self {
        DeadLetter {
            key: source.key.clone(),
            payload: source.payload.clone(),
            partition: incoming.partition,
            offset: incoming.offset,
            stage,
            reasons: vec![reason],
        }
    }
}
