//! The read path: memory, then Redis, then PostgreSQL, filling the upper tiers
//! on the way back.

mod memory;
mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use serde::Serialize;

pub use self::memory::MemoryTier;
pub use self::redis::RedisTier;
use crate::domain::OrderUid;
use crate::store::Store;
use crate::telemetry::Metrics;

pub struct OrderCache {
    memory: MemoryTier,
    redis: Option<RedisTier>,
    store: Store,
    metrics: Arc<Metrics>,
    warmup: WarmupProgress,
}

/// How far the start-up warm-up has got, for logs and readiness.
#[derive(Debug, Default)]
pub struct WarmupProgress {
    target: AtomicU64,
    loaded: AtomicU64,
    done: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
            metrics,
            warmup: WarmupProgress::default(),
        }
    }

    /// The order's JSON from the fastest tier that has it; `None` if no order has this id.
    pub async fn get(&self, uid: &OrderUid) -> Result<Option<Bytes>, sqlx::Error> {
        let uid = uid.as_str();
        if let Some(json) = self.memory.get(uid) {
            self.count("memory", "hit");
            return Ok(Some(json));
        }
        self.count("memory", "miss");
        if let Some(redis) = &self.redis {
            if let Some(json) = redis.get(uid).await {
                self.count("redis", "hit");
                self.memory.insert(uid, json.clone());
                return Ok(Some(json));
            }
            self.count("redis", "miss");
        }
        let Some(document) = self.store.order_document(uid).await? else {
            self.count("postgres", "miss");
            return Ok(None);
        };
        self.count("postgres", "hit");
        let json = Bytes::from(document);
        self.memory.insert(uid, json.clone());
        if let Some(redis) = &self.redis {
            redis.put(vec![(uid.into(), json.clone())]);
        }
        Ok(Some(json))
    }

    /// Hands freshly committed orders to the cache tiers. Never waits on Redis.
    pub fn stored(&self, orders: Vec<(Box<str>, Bytes)>) {
        for (uid, json) in &orders {
            self.memory.insert(uid, json.clone());
        }
        if let Some(redis) = &self.redis {
            redis.put(orders);
        }
    }

    /// Loads the `limit` most recently ingested orders into memory, newest first,
    /// stopping early when the memory budget is full.
    pub async fn warm_up(&self, limit: u64) -> Result<(), sqlx::Error> {
        self.warmup.target.store(limit, Ordering::Relaxed);
        let mut rows = self
            .store
            .recent_documents(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut loaded = 0u64;
        while let Some(row) = rows.try_next().await? {
            let size = (row.order_uid.len() + row.document.len()) as u64;
            if !self.memory.has_room_for(size) {
                tracing::info!(loaded, "memory cache budget reached; warm-up stops early");
                break;
            }
            self.memory
                .insert(&row.order_uid, Bytes::from(row.document));
            loaded += 1;
            if loaded % 10_000 == 0 {
                self.warmup.loaded.store(loaded, Ordering::Relaxed);
                self.metrics.warmup_loaded.set(loaded as i64);
                tracing::info!(loaded, target = limit, "warming up the memory cache");
            }
        }
        self.warmup.loaded.store(loaded, Ordering::Relaxed);
        self.metrics.warmup_loaded.set(loaded as i64);
        self.warmup.done.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn warmup(&self) -> &WarmupProgress {
        &self.warmup
    }

    pub fn memory(&self) -> &MemoryTier {
        &self.memory
    }

    /// `None` when no Redis tier is configured.
    pub fn redis_up(&self) -> Option<bool> {
        self.redis.as_ref().map(RedisTier::is_up)
    }

    fn count(&self, tier: &str, result: &str) {
        self.metrics
            .cache_requests
            .with_label_values(&[tier, result])
            .inc();
    }
}
