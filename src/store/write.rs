//! One transaction per batch: the orders, their children and the offsets they
//! cover, written with one `COPY` per table.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chrono::Utc;
use sqlx::{Postgres, Transaction};

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

    /// Moves the stored position of `partition` back from `from` to `to`,
    /// unless another instance has moved it meanwhile.
    pub async fn rewind_offset(
        &self,
        group_id: &str,
        topic: &str,
        partition: i32,
        from: i64,
        to: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE consumer_offsets SET next_offset = $5, updated_at = now()
             WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
        )
        .bind(group_id)
        .bind(topic)
        .bind(partition)
        .bind(from)
        .bind(to)
        .execute(self.pool())
        .await
        .map(drop)
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

    /// `COPY` of the `rows` of `batch` into the tables named `{prefix}{table}`.
    async fn copy_rows(
        &mut self,
        topic: &str,
        batch: &[Incoming],
        rows: &[usize],
        prefix: &str,
    ) -> Result<(), sqlx::Error> {
        let mut tables = CopyTables::default();
        for &i in rows {
            tables.push(topic, &batch[i]);
        }
        for ((table, columns), data) in TABLES.into_iter().zip(tables.into_rows()) {
            let statement =
                format!("COPY {prefix}{table} ({columns}) FROM STDIN WITH (FORMAT text)");
            let mut copy = self.tx.copy_in_raw(&statement).await?;
            copy.send(data.into_bytes()).await?;
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
        for (table, columns) in TABLES {
            sqlx::query(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS staged_{table} ON COMMIT DELETE ROWS
                 AS SELECT {columns} FROM {table} WITH NO DATA"
            ))
            .execute(&mut *self.tx)
            .await?;
        }
        self.copy_rows(topic, batch, rows, "staged_").await?;
        let [(orders, order_columns), children @ ..] = TABLES;
        let inserted: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {orders} ({order_columns}) SELECT {order_columns} FROM staged_{orders}
             ON CONFLICT (order_uid) DO NOTHING RETURNING order_uid"
        ))
        .fetch_all(&mut *self.tx)
        .await?;
        for (table, columns) in children {
            sqlx::query(&format!(
                "INSERT INTO {table} ({columns}) SELECT {columns} FROM staged_{table}
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
        // GREATEST skips NULLs: an unknown dead-letter position keeps the stored one.
        sqlx::query_scalar(
            "WITH saved AS (
                INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, dlq_next_offset)
                SELECT $1, $2, p, o, d FROM UNNEST($3::int[], $4::bigint[], $5::bigint[]) AS t(p, o, d)
                ON CONFLICT (group_id, topic, partition) DO UPDATE
                SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset),
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

/// The rows of the four tables in `COPY`'s text format (an empty field is an
/// empty string there; NULL would be `\N`, which escaping keeps out).
#[derive(Default)]
struct CopyTables {
    orders: String,
    deliveries: String,
    payments: String,
    items: String,
}

impl CopyTables {
    fn push(&mut self, topic: &str, incoming: &Incoming) {
        let o = incoming.order.document();
        let uid = o.order_uid.as_str();
        let created = o.date_created.at().with_timezone(&Utc).to_rfc3339();
        // Canonical JSON is built by serde_json and is always UTF-8.
        let document = String::from_utf8_lossy(&incoming.json);
        let row = &mut self.orders;
        for text in [
            uid,
            &o.track_number,
            &o.entry,
            &o.locale,
            &o.internal_signature,
            &o.customer_id,
            &o.delivery_service,
            &o.shardkey,
        ] {
            text_field(row, text);
        }
        number_field(row, o.sm_id);
        for text in [created.as_str(), &o.oof_shard, &document, topic] {
            text_field(row, text);
        }
        number_field(row, incoming.partition.into());
        number_field(row, incoming.offset);
        end_row(row);

        let (d, row) = (&o.delivery, &mut self.deliveries);
        for text in [
            uid, &d.name, &d.phone, &d.zip, &d.city, &d.address, &d.region, &d.email,
        ] {
            text_field(row, text);
        }
        end_row(row);

        let (p, row) = (&o.payment, &mut self.payments);
        for text in [uid, &p.transaction, &p.request_id, &p.currency, &p.provider] {
            text_field(row, text);
        }
        number_field(row, p.amount);
        number_field(row, p.payment_dt);
        text_field(row, &p.bank);
        for number in [p.delivery_cost, p.goods_total, p.custom_fee] {
            number_field(row, number);
        }
        end_row(row);

        let row = &mut self.items;
        for (position, item) in o.items.iter().enumerate() {
            text_field(row, uid);
            number_field(row, position as i64);
            number_field(row, item.chrt_id);
            text_field(row, &item.track_number);
            number_field(row, item.price);
            text_field(row, &item.rid);
            text_field(row, &item.name);
            number_field(row, item.sale);
            text_field(row, &item.size);
            number_field(row, item.total_price);
            number_field(row, item.nm_id);
            text_field(row, &item.brand);
            number_field(row, item.status);
            end_row(row);
        }
    }

    /// The rows of each table, in the order of [`TABLES`].
    fn into_rows(self) -> [String; 4] {
        [self.orders, self.deliveries, self.payments, self.items]
    }
}

/// The tables a batch writes, parents first (the children's foreign keys are
/// checked row by row), with the columns in the order [`CopyTables`] writes them.
const TABLES: [(&str, &str); 4] = [
    (
        "orders",
        "order_uid, track_number, entry, locale, internal_signature, customer_id, \
         delivery_service, shardkey, sm_id, date_created, oof_shard, document, \
         source_topic, source_partition, source_offset",
    ),
    (
        "deliveries",
        "order_uid, name, phone, zip, city, address, region, email",
    ),
    (
        "payments",
        "order_uid, transaction, request_id, currency, provider, amount, payment_dt, bank, \
         delivery_cost, goods_total, custom_fee",
    ),
    (
        "items",
        "order_uid, position, chrt_id, track_number, price, rid, name, sale, size, \
         total_price, nm_id, brand, status",
    ),
];

/// A field in `COPY`'s text format: only a backslash, a tab, a line feed or a
/// carriage return needs escaping. Validation leaves no control character in
/// an order's text, and canonical JSON escapes them, so most fields, the
/// document included, are copied as they are after one scan.
fn text_field(row: &mut String, text: &str) {
    if text
        .bytes()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        for c in text.chars() {
            match c {
                '\\' => row.push_str("\\\\"),
                '\t' => row.push_str("\\t"),
                '\n' => row.push_str("\\n"),
                '\r' => row.push_str("\\r"),
                c => row.push(c),
            }
        }
    } else {
        row.push_str(text);
    }
    row.push('\t');
}

fn number_field(row: &mut String, number: i64) {
    use std::fmt::Write;
    let _ = write!(row, "{number}\t");
}

/// Each field ends with a tab; the row's last one ends with a line feed.
fn end_row(row: &mut String) {
    row.pop();
    row.push('\n');
}
