//! The record of dead letters: written in a batch's transaction, with the
//! offsets that move past them; read by the API, the page and replay.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder};
use utoipa::ToSchema;

use super::{storable, BatchTx, Store};
use crate::domain::StageName;

/// One letter as the batch records it.
#[derive(Debug, Clone, Copy)]
pub struct NewLetter<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub order_uid: Option<&'a str>,
    pub stage: &'a str,
    pub reasons: &'a [String],
    /// The size of the whole original.
    pub payload_bytes: usize,
    /// Its first bytes, as many as the record keeps.
    pub preview: &'a [u8],
    /// A digest of the whole original, which tells it from another message
    /// at the same position of a topic created again.
    pub digest: &'a [u8],
    pub replay_of: Option<&'a str>,
}

/// A recorded letter.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LetterRecord {
    pub id: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub message_key: Option<Vec<u8>>,
    pub order_uid: Option<String>,
    pub stage: String,
    pub reasons: Json<Vec<String>>,
    pub payload_bytes: i64,
    pub payload_preview: Vec<u8>,
    pub replay_of: Option<String>,
    pub dead_lettered_at: DateTime<Utc>,
}

impl LetterRecord {
    /// Whether the record holds the original whole, so it can be sent again.
    pub fn holds_whole_payload(&self) -> bool {
        usize::try_from(self.payload_bytes).is_ok_and(|n| n == self.payload_preview.len())
    }

    /// The letter as the API and `dead-letters list` show it, without its payload.
    pub fn summary(&self) -> LetterSummary {
        LetterSummary {
            source: LetterSource {
                topic: self.source_topic.clone(),
                partition: self.source_partition,
                offset: self.source_offset,
            },
            key: self
                .message_key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            order_uid: self.order_uid.clone(),
            stage: self.stage.clone(),
            reasons: self.reasons.0.clone(),
            at: self.dead_lettered_at,
            payload_bytes: self.payload_bytes,
            replay_of: self.replay_of.clone(),
            href: self.href(),
        }
    }

    /// The letter's address in the HTTP API; the topic is percent-encoded.
    pub fn href(&self) -> String {
        let mut url = url::Url::parse("http://x/api/dead-letters/").expect("a valid base");
        url.path_segments_mut()
            .expect("a base with a path")
            .pop_if_empty()
            .push(&self.source_topic)
            .push(&self.source_partition.to_string())
            .push(&self.source_offset.to_string());
        url.path().to_owned()
    }

    /// `topic/partition/offset`: how replay headers name a letter.
    pub fn position(&self) -> String {
        format!(
            "{}/{}/{}",
            self.source_topic, self.source_partition, self.source_offset
        )
    }
}

/// A letter as the API and `dead-letters list` show it, without its payload.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = DeadLetter)]
pub struct LetterSummary {
    pub source: LetterSource,
    /// The message's key; bytes that are not UTF-8 are replaced.
    #[schema(required = true)]
    pub key: Option<String>,
    /// The id the message claimed, valid or not.
    #[schema(required = true)]
    pub order_uid: Option<String>,
    #[schema(value_type = StageName)]
    pub stage: String,
    /// Why the message was turned away, one reason per broken rule.
    pub reasons: Vec<String>,
    /// When the letter was recorded.
    pub at: DateTime<Utc>,
    /// The size of the whole original message.
    pub payload_bytes: i64,
    /// `topic/partition/offset` of the letter this message was replayed from.
    #[schema(required = true)]
    pub replay_of: Option<String>,
    /// This letter in the HTTP API.
    pub href: String,
}

/// Where the message was on the orders topic.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LetterSource {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Which letters to list; every field set narrows the list.
#[derive(Debug, Clone, Default)]
pub struct LetterFilter {
    pub source_topic: Option<String>,
    pub order_uid: Option<String>,
    pub key: Option<Vec<u8>>,
    pub stage: Option<String>,
    pub since: Option<DateTime<Utc>>,
    /// Letters of messages that were themselves replayed are left out.
    pub originals_only: bool,
}

/// Where a page starts: newest first below `Before`, oldest first above `After`.
#[derive(Debug, Clone, Copy)]
pub enum Cursor {
    Before(Option<i64>),
    After(i64),
}

impl BatchTx {
    /// Records the batch's letters. A letter another consumer group already
    /// recorded (same source position, same digest) is kept as it is; a new
    /// message at the position of a recorded one gets a record of its own.
    pub async fn record_dead_letters(
        &mut self,
        topic: &str,
        letters: &[NewLetter<'_>],
    ) -> Result<(), sqlx::Error> {
        if letters.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = letters.iter().map(|l| l.partition).collect();
        let offsets: Vec<i64> = letters.iter().map(|l| l.offset).collect();
        let keys: Vec<Option<&[u8]>> = letters.iter().map(|l| l.key).collect();
        let uids: Vec<Option<Cow<str>>> =
            letters.iter().map(|l| l.order_uid.map(storable)).collect();
        let stages: Vec<&str> = letters.iter().map(|l| l.stage).collect();
        let reasons: Vec<Json<Vec<Cow<str>>>> = letters
            .iter()
            .map(|l| Json(l.reasons.iter().map(|r| storable(r)).collect()))
            .collect();
        let sizes: Vec<i64> = letters
            .iter()
            .map(|l| i64::try_from(l.payload_bytes).unwrap_or(i64::MAX))
            .collect();
        let previews: Vec<&[u8]> = letters.iter().map(|l| l.preview).collect();
        let replays: Vec<Option<Cow<str>>> =
            letters.iter().map(|l| l.replay_of.map(storable)).collect();
        let digests: Vec<&[u8]> = letters.iter().map(|l| l.digest).collect();
        sqlx::query(
            "INSERT INTO dead_letters (source_topic, source_partition, source_offset, message_key,
                 order_uid, stage, reasons, payload_bytes, payload_preview, replay_of,
                 payload_digest)
             SELECT $1, p, o, k, u, s, r, b, v, x, d
             FROM UNNEST($2::int[], $3::bigint[], $4::bytea[], $5::text[], $6::text[],
                         $7::jsonb[], $8::bigint[], $9::bytea[], $10::text[], $11::bytea[])
                  AS t(p, o, k, u, s, r, b, v, x, d)
             ON CONFLICT (source_topic, source_partition, source_offset, payload_digest)
             DO NOTHING",
        )
        .bind(topic)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&keys)
        .bind(&uids)
        .bind(&stages)
        .bind(&reasons)
        .bind(&sizes)
        .bind(&previews)
        .bind(&replays)
        .bind(&digests)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }
}

impl Store {
    /// Up to `limit` letters matching `filter`, from `cursor`.
    pub async fn dead_letters(
        &self,
        filter: &LetterFilter,
        cursor: Cursor,
        limit: i64,
    ) -> Result<Vec<LetterRecord>, sqlx::Error> {
        // One statement per combination of filters, so each gets its own plan
        // over the index it needs.
        let mut query = QueryBuilder::<Postgres>::new("SELECT * FROM dead_letters WHERE true");
        if let Some(topic) = &filter.source_topic {
            query.push(" AND source_topic = ").push_bind(topic);
        }
        if let Some(uid) = &filter.order_uid {
            query.push(" AND order_uid = ").push_bind(storable(uid));
        }
        if let Some(key) = &filter.key {
            // Through the index on the key's md5 (a key may be too long for one on itself).
            query
                .push(" AND md5(message_key) = md5(")
                .push_bind(key)
                .push(") AND message_key = ")
                .push_bind(key);
        }
        if let Some(stage) = &filter.stage {
            query.push(" AND stage = ").push_bind(stage);
        }
        if let Some(since) = filter.since {
            query.push(" AND dead_lettered_at >= ").push_bind(since);
        }
        if filter.originals_only {
            query.push(" AND replay_of IS NULL");
        }
        match cursor {
            Cursor::Before(before) => {
                if let Some(before) = before {
                    query.push(" AND id < ").push_bind(before);
                }
                query.push(" ORDER BY id DESC");
            }
            Cursor::After(after) => {
                query
                    .push(" AND id > ")
                    .push_bind(after)
                    .push(" ORDER BY id");
            }
        }
        query.push(" LIMIT ").push_bind(limit);
        query.build_query_as().fetch_all(self.pool()).await
    }

    /// The letter of the message at `topic/partition/offset`: the newest, if
    /// the topic was created again and its position taken by a new message.
    pub async fn dead_letter(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<LetterRecord>, sqlx::Error> {
        sqlx::query_as(
            "SELECT * FROM dead_letters
             WHERE source_topic = $1 AND source_partition = $2 AND source_offset = $3
             ORDER BY id DESC LIMIT 1",
        )
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .fetch_optional(self.pool())
        .await
    }
}
