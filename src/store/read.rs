use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder};

use super::{storable, Store};

/// One line of the recent-orders list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct OrderSummary {
    #[serde(skip)]
    pub ingest_seq: i64,
    pub order_uid: String,
    pub date_created: DateTime<Utc>,
    pub customer_id: String,
    pub track_number: String,
    pub amount: i64,
    pub currency: String,
    pub item_count: i64,
}

/// Orders to list by exact match; every field set narrows the list.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    pub track_number: Option<String>,
    pub customer_id: Option<String>,
    /// The payment's transaction id.
    pub transaction: Option<String>,
}

/// An order's canonical JSON as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredDocument {
    pub ingest_seq: i64,
    pub order_uid: String,
    pub document: String,
}

impl Store {
    pub async fn order_document(&self, uid: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT document FROM orders WHERE order_uid = $1")
            .bind(uid)
            .fetch_optional(self.pool())
            .await
    }

    /// The most recently ingested orders matching `filter`, newest first,
    /// before the `before` cursor (an ingest sequence number) when given.
    pub async fn recent_orders(
        &self,
        filter: &OrderFilter,
        limit: i64,
        before: Option<i64>,
    ) -> Result<Vec<OrderSummary>, sqlx::Error> {
        // One statement per combination of filters, so each is planned over
        // the index it needs.
        let mut query = QueryBuilder::<Postgres>::new(
            "SELECT o.ingest_seq, o.order_uid, o.date_created, o.customer_id, o.track_number,
                    p.amount, p.currency::text AS currency,
                    (SELECT count(*) FROM items i WHERE i.order_uid = o.order_uid) AS item_count
             FROM orders o JOIN payments p USING (order_uid) WHERE true",
        );
        if let Some(track_number) = &filter.track_number {
            query
                .push(" AND o.track_number = ")
                .push_bind(storable(track_number));
        }
        if let Some(customer_id) = &filter.customer_id {
            query
                .push(" AND o.customer_id = ")
                .push_bind(storable(customer_id));
        }
        if let Some(transaction) = &filter.transaction {
            query
                .push(" AND p.transaction = ")
                .push_bind(storable(transaction));
        }
        if let Some(before) = before {
            query.push(" AND o.ingest_seq < ").push_bind(before);
        }
        query
            .push(" ORDER BY o.ingest_seq DESC LIMIT ")
            .push_bind(limit);
        query.build_query_as().fetch_all(self.pool()).await
    }

    /// Up to `limit` documents ingested before `before` (an ingest sequence
    /// number; `None`: the newest), newest first. Callers walk backwards page
    /// by page, so each query is a short index range scan, never a sort. A
    /// page not answered within the write timeout is given up, so that a
    /// server gone silent cannot hold the warm-up, nor its session, for good.
    pub async fn documents_before(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredDocument>, sqlx::Error> {
        let page = sqlx::query_as(
            "SELECT ingest_seq, order_uid, document FROM orders
             WHERE $1::bigint IS NULL OR ingest_seq < $1
             ORDER BY ingest_seq DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool());
        self.answered(page).await
    }

    /// The stored next offset of each of `partitions` that has one.
    pub async fn load_offsets(
        &self,
        group_id: &str,
        topic: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, StoredOffset>, sqlx::Error> {
        let query = sqlx::query_as::<_, (i32, i64, Option<i64>, Option<Vec<u8>>)>(
            "SELECT partition, next_offset, dlq_next_offset, last_digest FROM consumer_offsets
             WHERE group_id = $1 AND topic = $2 AND partition = ANY($3)",
        )
        .bind(group_id)
        .bind(topic)
        .bind(partitions);
        let rows = match query.fetch_all(self.pool()).await {
            Ok(rows) => rows,
            Err(e) => return Err(self.explained(e).await),
        };
        Ok(rows
            .into_iter()
            .map(|(p, next_offset, dlq_next_offset, last_digest)| {
                (
                    p,
                    StoredOffset {
                        next_offset,
                        dlq_next_offset,
                        last_digest: last_digest.and_then(|d| d.try_into().ok()),
                    },
                )
            })
            .collect())
    }
}

/// A partition's committed position, as [`Store::load_offsets`] returns it.
#[derive(Debug, Clone, Copy)]
pub struct StoredOffset {
    pub next_offset: i64,
    pub dlq_next_offset: Option<i64>,
    /// The digest of the message before `next_offset`, if recorded.
    pub last_digest: Option<[u8; 16]>,
}
