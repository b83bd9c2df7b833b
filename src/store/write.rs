//! One transaction per batch: the orders, their children and the offsets they
//! cover, written with one `COPY` per table.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use sqlx::{Postgres, Transaction};

use super::copy_rows::{Table, TABLES};
use super::{classify, ErrorClass, Store};
use crate::domain::Order;

/// A valid order with its canonical JSON and where it came from.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub order: Order,
    pub json: Bytes,
    pub partition: i32,
    pub offset: i64,
}

/// The next offset to consume on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffset {
    pub partition: i32,
    pub next_offset: i64,
    /// Where this partition's dead letters continue, if known.
    pub dlq_next_offset: Option<i64>,
    /// The digest of the message before `next_offset`, if known.
    pub last_digest: Option<[u8; 16]>,
}

/// What became of each order handed to [`BatchTx::insert_orders`], by index.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InsertOutcome {
    pub stored: Vec<usize>,
    /// Already stored with identical content: nothing to do.
    pub duplicates: Vec<usize>,
    /// Already stored with different content: never overwritten.
    pub conflicts: Vec<usize>,
}

pub struct BatchTx {
    pub(super) tx: Transaction<'static, Postgres>,
}

impl Store {
    pub async fn begin(&self) -> Result<BatchTx, sqlx::Error> {
        match self.pool().begin().await {
            Ok(tx) => Ok(BatchTx { tx }),
            Err(e) => Err(self.explained(e).await),
        }
    }

    /// Moves the stored position of `partition` back from `from` to `to`.
    /// Whether it did: not if it was moved meanwhile.
    pub async fn rewind_offset(
        &self,
        group_id: &str,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query(
            "UPDATE consumer_offsets SET next_offset = $5, last_digest = NULL, updated_at = now()
             WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
        )
        .bind(group_id)
        .bind(topic)
        .bind(partition)
        .bind(from)
        .bind(to)
        .execute(self.pool())
        .await
        .map(|done| done.rows_affected() == 1)
    }
}

impl BatchTx {
    /// Inserts the orders that are new and classifies the rest by comparing
    /// their JSON with what is stored (or with an earlier copy in the batch).
    ///
    /// The batch is first written with `COPY`, PostgreSQL's fastest path, and
    /// nothing is looked up: in the usual batch every order is new. If one of
    /// them is stored already (a redelivery, another writer) or the database
    /// refuses a row, that attempt is rolled back to a savepoint; the stored
    /// ones are then looked up and the rest written through the staging tables
    /// with `INSERT … ON CONFLICT`, so conflicts are still found.
    pub async fn insert_orders(
        &mut self,
        topic: &str,
        batch: &[Incoming],
    ) -> Result<InsertOutcome, sqlx::Error> {
        let uid = |i: usize| batch[i].order.uid().as_str();
        let mut first_by_uid: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
        let firsts: Vec<usize> = (0..batch.len())
            .filter(|&i| *first_by_uid.entry(uid(i)).or_insert(i) == i)
            .collect();

        let mut existing = HashMap::new();
        let inserted: HashSet<usize> = if firsts.is_empty() {
            HashSet::new()
        } else if self.try_copy(topic, batch, &firsts).await? {
            firsts.into_iter().collect()
        } else {
            existing = self
                .stored_documents(firsts.iter().map(|&i| uid(i)))
                .await?;
            let new: Vec<usize> = firsts
                .into_iter()
                .filter(|&i| !existing.contains_key(uid(i)))
                .collect();
            let written = self.insert_staged(topic, batch, &new).await?;
            let (fresh, raced): (Vec<usize>, Vec<usize>) =
                new.iter().partition(|&&i| written.contains(uid(i)));
            existing.extend(self.stored_documents(raced.iter().map(|&i| uid(i))).await?);
            fresh.into_iter().collect()
        };

        let mut outcome = InsertOutcome::default();
        for (i, incoming) in batch.iter().enumerate() {
            if inserted.contains(&i) {
                outcome.stored.push(i);
                continue;
            }
            let uid = uid(i);
            let stored: &[u8] = match existing.get(uid) {
                Some(document) => document.as_bytes(),
                None => &batch[first_by_uid[uid]].json,
            };
            if stored == &incoming.json[..] {
                outcome.duplicates.push(i);
            } else {
                outcome.conflicts.push(i);
            }
        }
        Ok(outcome)
    }

    /// Writes the `rows` of `batch` with `COPY` under a savepoint. `false` when
    /// the database refused a row (one stored already, or its data): the
    /// attempt is rolled back and the transaction goes on.
    async fn try_copy(
        &mut self,
        topic: &str,
        batch: &[Incoming],
        rows: &[usize],
    ) -> Result<bool, sqlx::Error> {
        sqlx::query("SAVEPOINT copy_new")
            .execute(&mut *self.tx)
            .await?;
        match self.copy_rows(topic, batch, rows, "").await {
            Ok(()) => Ok(true),
            Err(e) if matches!(classify(&e), ErrorClass::OrderData { .. }) => {
                sqlx::query("ROLLBACK TO SAVEPOINT copy_new")
                    .execute(&mut *self.tx)
                    .await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The stored document of each of `uids` that is stored.
    async fn stored_documents<'a>(
        &mut self,
        uids: impl Iterator<Item = &'a str>,
    ) -> Result<HashMap<String, String>, sqlx::Error> {
        let uids: Vec<&str> = uids.collect();
        if uids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT order_uid, document FROM orders WHERE order_uid = ANY($1)")
                .bind(&uids)
                .fetch_all(&mut *self.tx)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// `COPY` of the `rows` of `batch` into the tables named `{prefix}{table}`,
    /// sent in chunks from one reused buffer: a whole batch's rows in memory
    /// would take fresh pages from the system for every batch, which cost the
    /// service more CPU than writing the rows.
    async fn copy_rows(
        &mut self,
        topic: &str,
        batch: &[Incoming],
        rows: &[usize],
        prefix: &str,
    ) -> Result<(), sqlx::Error> {
        let mut chunk = Vec::with_capacity(COPY_CHUNK_BYTES * 2);
        for table in &TABLES {
            let statement = format!(
                "COPY {prefix}{} ({}) FROM STDIN WITH (FORMAT text)",
                table.name, table.columns
            );
            let mut copy = self.tx.copy_in_raw(&statement).await?;
            for &i in rows {
                (table.rows)(&mut chunk, topic, &batch[i]);
                if chunk.len() >= COPY_CHUNK_BYTES {
                    copy.send(chunk.as_slice()).await?;
                    chunk.clear();
                }
            }
            if !chunk.is_empty() {
                copy.send(chunk.as_slice()).await?;
                chunk.clear();
            }
            copy.finish().await?;
        }
        Ok(())
    }

    /// Writes the `rows` of `batch` whose order is not stored yet, through this
    /// session's staging tables: the same `COPY` as the fast path, then one
    /// `INSERT … SELECT` per table, skipping orders another writer stored
    /// meanwhile. Returns the uids inserted.
    async fn insert_staged(
        &mut self,
        topic: &str,
        batch: &[Incoming],
        rows: &[usize],
    ) -> Result<HashSet<String>, sqlx::Error> {
        if rows.is_empty() {
            return Ok(HashSet::new());
        }
        // Temporary tables without the real ones' constraints, emptied at each
        // commit; a row the database refuses is refused by the INSERT below.
        for Table { name, columns, .. } in &TABLES {
            sqlx::query(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS staged_{name} ON COMMIT DELETE ROWS
                 AS SELECT {columns} FROM {name} WITH NO DATA"
            ))
            .execute(&mut *self.tx)
            .await?;
        }
        self.copy_rows(topic, batch, rows, "staged_").await?;
        let [orders, children @ ..] = &TABLES;
        let (name, columns) = (orders.name, orders.columns);
        let inserted: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {name} ({columns}) SELECT {columns} FROM staged_{name}
             ON CONFLICT (order_uid) DO NOTHING RETURNING order_uid"
        ))
        .fetch_all(&mut *self.tx)
        .await?;
        for Table { name, columns, .. } in children {
            sqlx::query(&format!(
                "INSERT INTO {name} ({columns}) SELECT {columns} FROM staged_{name}
                 WHERE order_uid = ANY($1)"
            ))
            .bind(&inserted)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(inserted.into_iter().collect())
    }

    /// Records the next offset per partition; offsets only move forward.
    /// Returns the transaction's id, by which [`BatchTx::committed_of`] can
    /// tell later whether this transaction landed, should its commit go
    /// unanswered.
    pub async fn save_offsets(
        &mut self,
        group_id: &str,
        topic: &str,
        offsets: &[PartitionOffset],
    ) -> Result<i64, sqlx::Error> {
        let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
        let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
        let dlq_next: Vec<Option<i64>> = offsets.iter().map(|o| o.dlq_next_offset).collect();
        let digests: Vec<Option<Vec<u8>>> = offsets
            .iter()
            .map(|o| o.last_digest.map(|d| d.to_vec()))
            .collect();
        // GREATEST skips NULLs: an unknown dead-letter position keeps the stored one.
        // The digest goes with the position it describes (every SET reads the old row).
        sqlx::query_scalar(
            "WITH saved AS (
                INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, dlq_next_offset, last_digest)
                SELECT $1, $2, p, o, d, g
                FROM UNNEST($3::int[], $4::bigint[], $5::bigint[], $6::bytea[]) AS t(p, o, d, g)
                ON CONFLICT (group_id, topic, partition) DO UPDATE
                SET last_digest = CASE
                        WHEN EXCLUDED.next_offset > consumer_offsets.next_offset THEN EXCLUDED.last_digest
                        WHEN EXCLUDED.next_offset = consumer_offsets.next_offset
                            THEN coalesce(EXCLUDED.last_digest, consumer_offsets.last_digest)
                        ELSE consumer_offsets.last_digest
                    END,
                    next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset),
                    dlq_next_offset = GREATEST(consumer_offsets.dlq_next_offset, EXCLUDED.dlq_next_offset),
                    updated_at = now()
             )
             SELECT txid_current()",
        )
        .bind(group_id)
        .bind(topic)
        .bind(&partitions)
        .bind(&next)
        .bind(&dlq_next)
        .bind(&digests)
        .fetch_one(&mut *self.tx)
        .await
    }

    /// Which of `transactions` (ids as [`BatchTx::save_offsets`] returns
    /// them) committed. A commit whose answer was lost may have landed; once
    /// this transaction has written the same orders, any earlier one that
    /// wrote them has ended, so the answer is final.
    pub async fn committed_of(&mut self, transactions: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM UNNEST($1::bigint[]) AS t(id) WHERE txid_status(id) = 'committed'",
        )
        .bind(transactions)
        .fetch_all(&mut *self.tx)
        .await
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

/// Bytes of rows sent to `COPY` at a time.
const COPY_CHUNK_BYTES: usize = 256 * 1024;
