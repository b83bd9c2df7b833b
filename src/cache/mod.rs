//! The read path: memory, then Redis, then PostgreSQL, filling the upper tiers
//! on the way back.

mod memory;
mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use serde::Serialize;

pub use self::memory::MemoryTier;
pub use self::redis::RedisTier;
use crate::domain::OrderUid;
use crate::store::{Store, StoredDocument};
use crate::telemetry::Metrics;

/// Longest wait between two asks for a warm-up page while PostgreSQL is away.
const WARMUP_MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct OrderCache {
    memory: MemoryTier,
    redis: Option<RedisTier>,
    store: Store,
    metrics: Arc<Metrics>,
    counters: TierCounters,
    warmup: WarmupProgress,
}

/// An order ready to send: its JSON and the strong ETag of those bytes (a
/// quoted hex string of their XXH3-64), both computed once when the order enters the cache,
/// never per request.
#[derive(Debug, Clone)]
pub struct CachedOrder {
    pub json: Bytes,
    etag: Bytes,
}

impl CachedOrder {
    pub fn new(json: Bytes) -> Self {
        // A hash fixed by its specification, so the same bytes keep their
        // ETag across releases, builds and instances.
        let etag = Bytes::from(format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(&json)));
        Self { json, etag }
    }

    /// The ETag, always a quoted hex string: a valid header value.
    pub fn etag(&self) -> &Bytes {
        &self.etag
    }
}

/// The lookup counters, resolved once instead of by label on every request.
struct TierCounters {
    memory: (IntCounter, IntCounter),
    redis: (IntCounter, IntCounter),
    /// Values in Redis under an order's key that are not that order.
    redis_unusable: IntCounter,
    postgres: (IntCounter, IntCounter),
}

impl TierCounters {
    fn new(metrics: &Metrics) -> Self {
        let pair = |tier: &str| {
            (
                metrics.cache_requests.with_label_values(&[tier, "hit"]),
                metrics.cache_requests.with_label_values(&[tier, "miss"]),
            )
        };
        Self {
            memory: pair("memory"),
            redis: pair("redis"),
            redis_unusable: metrics
                .cache_requests
                .with_label_values(&["redis", "unusable"]),
            postgres: pair("postgres"),
        }
    }
}

/// Whether `json` is the order document of `uid`. Redis may be shared, and
/// a value under an order's key that anything else wrote (another program,
/// a release with another layout, a write cut short) is not served as the order.
fn is_order(json: &[u8], uid: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Claim<'a> {
        #[serde(borrow)]
        order_uid: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Claim>(json).is_ok_and(|claim| claim.order_uid == uid)
}

/// How far the start-up warm-up has got, for logs and readiness.
#[derive(Debug, Default)]
pub struct WarmupProgress {
    target: AtomicU64,
    loaded: AtomicU64,
    done: AtomicBool,
}

/// How far loading the most recent orders into memory at start has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WarmupState {
    pub target: u64,
    pub loaded: u64,
    pub done: bool,
}

impl WarmupProgress {
    pub fn state(&self) -> WarmupState {
        WarmupState {
            target: self.target.load(Ordering::Relaxed),
            loaded: self.loaded.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
        }
    }
}

impl OrderCache {
    pub fn new(
        memory: MemoryTier,
        redis: Option<RedisTier>,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            memory,
            redis,
            store,
            counters: TierCounters::new(&metrics),
            metrics,
            warmup: WarmupProgress::default(),
        }
    }

    /// The order if the in-process tier has it: no I/O, so any runtime may ask.
    pub fn get_in_memory(&self, uid: &OrderUid) -> Option<CachedOrder> {
        let order = self.memory.get(uid.as_str());
        let (hit, miss) = &self.counters.memory;
        match order {
            Some(_) => hit.inc(),
            None => miss.inc(),
        }
        order
    }

    /// The order from Redis or PostgreSQL, after [`Self::get_in_memory`]
    /// missed; `None` if no order has this id. Uses their connections, so it
    /// runs on the runtime that owns them.
    pub async fn get_beyond_memory(
        &self,
        uid: &OrderUid,
    ) -> Result<Option<CachedOrder>, sqlx::Error> {
        let uid = uid.as_str();
        let c = &self.counters;
        if let Some(redis) = &self.redis {
            match redis.get(uid).await {
                Some(json) if is_order(&json, uid) => {
                    c.redis.0.inc();
                    let order = CachedOrder::new(json);
                    self.memory.insert(uid, order.clone());
                    return Ok(Some(order));
                }
                // Replaced below by the order from PostgreSQL.
                Some(_) => c.redis_unusable.inc(),
                None => c.redis.1.inc(),
            }
        }
        let Some(document) = self.store.order_document(uid).await? else {
            c.postgres.1.inc();
            return Ok(None);
        };
        c.postgres.0.inc();
        let order = CachedOrder::new(Bytes::from(document));
        self.memory.insert(uid, order.clone());
        if let Some(redis) = &self.redis {
            redis.put(vec![(uid.into(), order.json.clone())]);
        }
        Ok(Some(order))
    }

    /// Hands freshly committed orders to the cache tiers. Never waits on Redis.
    pub fn stored(&self, orders: Vec<(Box<str>, Bytes)>) {
        for (uid, json) in &orders {
            self.memory.insert(uid, CachedOrder::new(json.clone()));
        }
        if let Some(redis) = &self.redis {
            redis.put(orders);
        }
    }

    /// Loads the `limit` most recently ingested orders into memory, newest
    /// first, stopping early when the memory budget is full. A PostgreSQL that
    /// does not answer (an instance started during an outage, or before
    /// `migrate`) holds the warm-up back, never ends it: each page is asked
    /// for again until it comes.
    pub async fn warm_up(&self, limit: u64) {
        const PAGE: u64 = 5000;
        self.warmup.target.store(limit, Ordering::Relaxed);
        let (mut loaded, mut before) = (0u64, None);
        'pages: while loaded < limit {
            let page = (limit - loaded).min(PAGE) as i64;
            let rows = self.page_before(before, page).await;
            let Some(last) = rows.last() else { break };
            before = Some(last.ingest_seq);
            for row in rows {
                let size = (row.order_uid.len() + row.document.len()) as u64;
                if !self.memory.has_room_for(size) {
                    tracing::info!(loaded, "memory cache budget reached; warm-up stops early");
                    break 'pages;
                }
                self.memory
                    .insert(&row.order_uid, CachedOrder::new(Bytes::from(row.document)));
                loaded += 1;
            }
            self.warmup.loaded.store(loaded, Ordering::Relaxed);
            self.metrics.warmup_loaded.set(loaded as i64);
            if loaded % 100_000 < PAGE {
                tracing::info!(loaded, target = limit, "warming up the memory cache");
            }
        }
        self.warmup.loaded.store(loaded, Ordering::Relaxed);
        self.metrics.warmup_loaded.set(loaded as i64);
        self.warmup.done.store(true, Ordering::Relaxed);
    }

    /// One page of the warm-up, asked for until PostgreSQL gives it, with
    /// capped backoff; the wait is logged once, and its end.
    async fn page_before(&self, before: Option<i64>, page: i64) -> Vec<StoredDocument> {
        let mut backoff = Duration::from_millis(100);
        let mut waited = false;
        loop {
            match self.store.documents_before(before, page).await {
                Ok(rows) => {
                    if waited {
                        tracing::info!("PostgreSQL answers again; warm-up goes on");
                    }
                    return rows;
                }
                Err(e) => {
                    if !waited {
                        let e = self.store.explained(e).await;
                        tracing::warn!(
                            error = %e,
                            "warm-up waits for PostgreSQL; meanwhile misses fall through to it"
                        );
                        waited = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(WARMUP_MAX_BACKOFF);
                }
            }
        }
    }

    pub fn warmup(&self) -> &WarmupProgress {
        &self.warmup
    }

    pub fn memory(&self) -> &MemoryTier {
        &self.memory
    }

    /// `None` when no Redis tier is configured.
    pub fn redis(&self) -> Option<&RedisTier> {
        self.redis.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_is_the_xxh3_of_the_bytes_and_never_changes() {
        // XXH3-64 of no bytes, from the algorithm's specification.
        let empty = CachedOrder::new(Bytes::new());
        assert_eq!(empty.etag().as_ref(), b"\"2d06800538d394c2\"");
        let a = CachedOrder::new(Bytes::from_static(b"{\"order_uid\":\"a\"}"));
        let b = CachedOrder::new(Bytes::from_static(b"{\"order_uid\":\"b\"}"));
        assert_ne!(a.etag(), b.etag());
    }
}
