//! One transaction per batch: the orders, their children and the offsets they
//! cover, written with one multi-row statement per table.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
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
    tx: Transaction<'static, Postgres>,
}

impl Store {
    pub async fn begin(&self) -> Result<BatchTx, sqlx::Error> {
        Ok(BatchTx {
            tx: self.pool().begin().await?,
        })
    }
}

impl BatchTx {
    /// Inserts the orders that are new and classifies the rest by comparing
    /// their JSON with what is stored (or with an earlier copy in the batch).
    ///
    /// The orders not found stored are written with `COPY`, PostgreSQL's
    /// fastest path; if one of them was stored by another writer meanwhile (or
    /// the database refuses a row), that attempt is rolled back to a savepoint
    /// and the batch takes the conflict-aware `INSERT … ON CONFLICT` path.
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

        let mut existing = self
            .stored_documents(firsts.iter().map(|&i| uid(i)))
            .await?;
        let new: Vec<usize> = firsts
            .iter()
            .copied()
            .filter(|&i| !existing.contains_key(uid(i)))
            .collect();
        let inserted = if new.is_empty() {
            HashMap::new()
        } else {
            self.insert_new(topic, batch, &new, &mut existing).await?
        };

        let mut outcome = InsertOutcome::default();
        for (i, incoming) in batch.iter().enumerate() {
            let uid = uid(i);
            if inserted.get(uid) == Some(&i) {
                outcome.stored.push(i);
                continue;
            }
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

    /// Writes the `new` orders of `batch` with `COPY`, or, when that is refused
    /// (another writer stored one of them meanwhile, or the database refuses a
    /// row), rolls it back and writes them with `INSERT … ON CONFLICT`; the ones
    /// found stored then join `existing`. Returns the uids inserted, each with
    /// its index in `batch`.
    async fn insert_new<'b>(
        &mut self,
        topic: &str,
        batch: &'b [Incoming],
        new: &[usize],
        existing: &mut HashMap<String, String>,
    ) -> Result<HashMap<&'b str, usize>, sqlx::Error> {
        let uid = |i: usize| batch[i].order.uid().as_str();
        sqlx::query("SAVEPOINT copy_new")
            .execute(&mut *self.tx)
            .await?;
        match self.copy_orders(topic, batch, new).await {
            Ok(()) => return Ok(new.iter().map(|&i| (uid(i), i)).collect()),
            Err(e) if matches!(classify(&e), ErrorClass::OrderData { .. }) => {}
            Err(e) => return Err(e),
        }
        sqlx::query("ROLLBACK TO SAVEPOINT copy_new")
            .execute(&mut *self.tx)
            .await?;
        let inserted = self.insert_order_rows(topic, batch, new).await?;
        let (fresh, raced): (Vec<usize>, Vec<usize>) =
            new.iter().partition(|&&i| inserted.contains_key(uid(i)));
        self.insert_children(batch, &fresh).await?;
        existing.extend(self.stored_documents(raced.iter().map(|&i| uid(i))).await?);
        Ok(fresh.iter().map(|&i| (uid(i), i)).collect())
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

    /// Writes the `rows` of `batch` and their children with one `COPY` per table.
    async fn copy_orders(
        &mut self,
        topic: &str,
        batch: &[Incoming],
        rows: &[usize],
    ) -> Result<(), sqlx::Error> {
        let mut tables = CopyTables::default();
        for &i in rows {
            tables.push(topic, &batch[i]);
        }
        for (statement, data) in tables.statements() {
            let mut copy = self.tx.copy_in_raw(statement).await?;
            copy.send(data.into_bytes()).await?;
            copy.finish().await?;
        }
        Ok(())
    }

    /// Returns the uids inserted, each with its index in `batch`.
    async fn insert_order_rows(
        &mut self,
        topic: &str,
        batch: &[Incoming],
        rows: &[usize],
    ) -> Result<HashMap<String, usize>, sqlx::Error> {
        let mut c = OrderColumns::with_capacity(rows.len());
        for &i in rows {
            c.push(&batch[i]);
        }
        let inserted: Vec<(String,)> = sqlx::query_as(
            "INSERT INTO orders (order_uid, track_number, entry, locale, internal_signature, customer_id,
                 delivery_service, shardkey, sm_id, date_created, oof_shard, document,
                 source_topic, source_partition, source_offset)
             SELECT uid, track, entry, locale, sig, customer, service, shardkey, sm_id, created, oof, doc,
                 $13, part, off
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                 $8::text[], $9::bigint[], $10::timestamptz[], $11::text[], $12::text[], $14::int[], $15::bigint[])
                 AS u(uid, track, entry, locale, sig, customer, service, shardkey, sm_id, created, oof, doc, part, off)
             ON CONFLICT (order_uid) DO NOTHING
             RETURNING order_uid",
        )
        .bind(&c.uid)
        .bind(&c.track_number)
        .bind(&c.entry)
        .bind(&c.locale)
        .bind(&c.internal_signature)
        .bind(&c.customer_id)
        .bind(&c.delivery_service)
        .bind(&c.shardkey)
        .bind(&c.sm_id)
        .bind(&c.date_created)
        .bind(&c.oof_shard)
        .bind(&c.document)
        .bind(topic)
        .bind(&c.partition)
        .bind(&c.offset)
        .fetch_all(&mut *self.tx)
        .await?;
        let index: HashMap<&str, usize> = rows
            .iter()
            .map(|&i| (batch[i].order.uid().as_str(), i))
            .collect();
        Ok(inserted
            .into_iter()
            .map(|(uid,)| {
                let i = index[uid.as_str()];
                (uid, i)
            })
            .collect())
    }

    async fn insert_children(
        &mut self,
        batch: &[Incoming],
        rows: &[usize],
    ) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut d = DeliveryColumns::default();
        let mut p = PaymentColumns::default();
        let mut it = ItemColumns::default();
        for &i in rows {
            let doc = batch[i].order.document();
            d.push(doc);
            p.push(doc);
            it.push(doc);
        }
        sqlx::query(
            "INSERT INTO deliveries (order_uid, name, phone, zip, city, address, region, email)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::text[], $8::text[])",
        )
        .bind(&d.uid)
        .bind(&d.name)
        .bind(&d.phone)
        .bind(&d.zip)
        .bind(&d.city)
        .bind(&d.address)
        .bind(&d.region)
        .bind(&d.email)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "INSERT INTO payments (order_uid, transaction, request_id, currency, provider, amount, payment_dt,
                 bank, delivery_cost, goods_total, custom_fee)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                 $7::bigint[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[])",
        )
        .bind(&p.uid)
        .bind(&p.transaction)
        .bind(&p.request_id)
        .bind(&p.currency)
        .bind(&p.provider)
        .bind(&p.amount)
        .bind(&p.payment_dt)
        .bind(&p.bank)
        .bind(&p.delivery_cost)
        .bind(&p.goods_total)
        .bind(&p.custom_fee)
        .execute(&mut *self.tx)
        .await?;
        sqlx::query(
            "INSERT INTO items (order_uid, position, chrt_id, track_number, price, rid, name, sale, size,
                 total_price, nm_id, brand, status)
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::text[], $5::bigint[], $6::text[],
                 $7::text[], $8::smallint[], $9::text[], $10::bigint[], $11::bigint[], $12::text[], $13::int[])",
        )
        .bind(&it.uid)
        .bind(&it.position)
        .bind(&it.chrt_id)
        .bind(&it.track_number)
        .bind(&it.price)
        .bind(&it.rid)
        .bind(&it.name)
        .bind(&it.sale)
        .bind(&it.size)
        .bind(&it.total_price)
        .bind(&it.nm_id)
        .bind(&it.brand)
        .bind(&it.status)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Records the next offset per partition; offsets only move forward.
    pub async fn save_offsets(
        &mut self,
        group_id: &str,
        topic: &str,
        offsets: &[PartitionOffset],
    ) -> Result<(), sqlx::Error> {
        if offsets.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
        let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
        let dlq_next: Vec<Option<i64>> = offsets.iter().map(|o| o.dlq_next_offset).collect();
        // GREATEST skips NULLs: an unknown dead-letter position keeps the stored one.
        sqlx::query(
            "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset, dlq_next_offset)
             SELECT $1, $2, p, o, d FROM UNNEST($3::int[], $4::bigint[], $5::bigint[]) AS t(p, o, d)
             ON CONFLICT (group_id, topic, partition) DO UPDATE
             SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset),
                 dlq_next_offset = GREATEST(consumer_offsets.dlq_next_offset, EXCLUDED.dlq_next_offset),
                 updated_at = now()",
        )
        .bind(group_id)
        .bind(topic)
        .bind(&partitions)
        .bind(&next)
        .bind(&dlq_next)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

/// The rows of the four tables in PostgreSQL's CSV format, every text field
/// quoted (so an empty string stays empty, never NULL).
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

    /// Parents first: the children's foreign keys are checked row by row.
    fn statements(self) -> [(&'static str, String); 4] {
        [
            (
                "COPY orders (order_uid, track_number, entry, locale, internal_signature, customer_id,
                     delivery_service, shardkey, sm_id, date_created, oof_shard, document,
                     source_topic, source_partition, source_offset) FROM STDIN WITH (FORMAT csv)",
                self.orders,
            ),
            (
                "COPY deliveries (order_uid, name, phone, zip, city, address, region, email)
                 FROM STDIN WITH (FORMAT csv)",
                self.deliveries,
            ),
            (
                "COPY payments (order_uid, transaction, request_id, currency, provider, amount,
                     payment_dt, bank, delivery_cost, goods_total, custom_fee) FROM STDIN WITH (FORMAT csv)",
                self.payments,
            ),
            (
                "COPY items (order_uid, position, chrt_id, track_number, price, rid, name, sale, size,
                     total_price, nm_id, brand, status) FROM STDIN WITH (FORMAT csv)",
                self.items,
            ),
        ]
    }
}

fn text_field(row: &mut String, text: &str) {
    separate(row);
    row.push('"');
    for (i, part) in text.split('"').enumerate() {
        if i > 0 {
            row.push_str("\"\"");
        }
        row.push_str(part);
    }
    row.push('"');
}

fn number_field(row: &mut String, number: i64) {
    use std::fmt::Write;
    separate(row);
    let _ = write!(row, "{number}");
}

fn separate(row: &mut String) {
    if !row.is_empty() && !row.ends_with('\n') {
        row.push(',');
    }
}

fn end_row(row: &mut String) {
    row.push('\n');
}

#[derive(Default)]
struct OrderColumns {
    uid: Vec<String>,
    track_number: Vec<String>,
    entry: Vec<String>,
    locale: Vec<String>,
    internal_signature: Vec<String>,
    customer_id: Vec<String>,
    delivery_service: Vec<String>,
    shardkey: Vec<String>,
    sm_id: Vec<i64>,
    date_created: Vec<DateTime<Utc>>,
    oof_shard: Vec<String>,
    document: Vec<String>,
    partition: Vec<i32>,
    offset: Vec<i64>,
}

impl OrderColumns {
    fn with_capacity(n: usize) -> Self {
        Self {
            uid: Vec::with_capacity(n),
            document: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    fn push(&mut self, incoming: &Incoming) {
        let o = incoming.order.document();
        self.uid.push(o.order_uid.to_string());
        self.track_number.push(o.track_number.clone());
        self.entry.push(o.entry.clone());
        self.locale.push(o.locale.clone());
        self.internal_signature.push(o.internal_signature.clone());
        self.customer_id.push(o.customer_id.clone());
        self.delivery_service.push(o.delivery_service.clone());
        self.shardkey.push(o.shardkey.clone());
        self.sm_id.push(o.sm_id);
        self.date_created
            .push(o.date_created.at().with_timezone(&Utc));
        self.oof_shard.push(o.oof_shard.clone());
        // Canonical JSON is built by serde_json and is always UTF-8.
        self.document
            .push(String::from_utf8_lossy(&incoming.json).into_owned());
        self.partition.push(incoming.partition);
        self.offset.push(incoming.offset);
    }
}

#[derive(Default)]
struct DeliveryColumns {
    uid: Vec<String>,
    name: Vec<String>,
    phone: Vec<String>,
    zip: Vec<String>,
    city: Vec<String>,
    address: Vec<String>,
    region: Vec<String>,
    email: Vec<String>,
}

impl DeliveryColumns {
    fn push(&mut self, o: &crate::domain::OrderDocument) {
        let d = &o.delivery;
        self.uid.push(o.order_uid.to_string());
        self.name.push(d.name.clone());
        self.phone.push(d.phone.clone());
        self.zip.push(d.zip.clone());
        self.city.push(d.city.clone());
        self.address.push(d.address.clone());
        self.region.push(d.region.clone());
        self.email.push(d.email.clone());
    }
}

#[derive(Default)]
struct PaymentColumns {
    uid: Vec<String>,
    transaction: Vec<String>,
    request_id: Vec<String>,
    currency: Vec<String>,
    provider: Vec<String>,
    amount: Vec<i64>,
    payment_dt: Vec<i64>,
    bank: Vec<String>,
    delivery_cost: Vec<i64>,
    goods_total: Vec<i64>,
    custom_fee: Vec<i64>,
}

impl PaymentColumns {
    fn push(&mut self, o: &crate::domain::OrderDocument) {
        let p = &o.payment;
        self.uid.push(o.order_uid.to_string());
        self.transaction.push(p.transaction.clone());
        self.request_id.push(p.request_id.clone());
        self.currency.push(p.currency.clone());
        self.provider.push(p.provider.clone());
        self.amount.push(p.amount);
        self.payment_dt.push(p.payment_dt);
        self.bank.push(p.bank.clone());
        self.delivery_cost.push(p.delivery_cost);
        self.goods_total.push(p.goods_total);
        self.custom_fee.push(p.custom_fee);
    }
}

#[derive(Default)]
struct ItemColumns {
    uid: Vec<String>,
    position: Vec<i32>,
    chrt_id: Vec<i64>,
    track_number: Vec<String>,
    price: Vec<i64>,
    rid: Vec<String>,
    name: Vec<String>,
    sale: Vec<i16>,
    size: Vec<String>,
    total_price: Vec<i64>,
    nm_id: Vec<i64>,
    brand: Vec<String>,
    status: Vec<i32>,
}

impl ItemColumns {
    fn push(&mut self, o: &crate::domain::OrderDocument) {
        for (position, item) in o.items.iter().enumerate() {
            self.uid.push(o.order_uid.to_string());
            // Bounded by the item limit and the rules (sale 0..=100, status 0..=999).
            self.position.push(position as i32);
            self.chrt_id.push(item.chrt_id);
            self.track_number.push(item.track_number.clone());
            self.price.push(item.price);
            self.rid.push(item.rid.clone());
            self.name.push(item.name.clone());
            self.sale.push(item.sale as i16);
            self.size.push(item.size.clone());
            self.total_price.push(item.total_price);
            self.nm_id.push(item.nm_id);
            self.brand.push(item.brand.clone());
            self.status.push(item.status as i32);
        }
    }
}
