//! The shared Redis tier. It is only ever a cache: when Redis is away, reads
//! skip it and writes are dropped (and counted), so nothing waits on it.
//! A Redis that answers but refuses a command (full under `noeviction`, an
//! ACL, a read-only replica) is not away: the tier stays up for what it
//! still does, and the refusal is told once, not once per command. One that
//! refuses even `PING` (it wants a password the URL lacks, or is still
//! loading its data) is down until it answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use crate::telemetry::Metrics;

/// Longest time a read may wait on Redis before it falls through to PostgreSQL.
const READ_TIMEOUT: Duration = Duration::from_millis(50);
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Orders waiting to be written; beyond this Redis is behind and writes are dropped.
const WRITE_QUEUE: usize = 64;

pub struct RedisTier {
    inner: Arc<Inner>,
    writes: mpsc::Sender<Vec<(Box<str>, Bytes)>>,
}

struct Inner {
    client: redis::Client,
    connection: RwLock<Option<ConnectionManager>>,
    up: AtomicBool,
    /// While down, the kind of failure last logged (Redis's error code, or
    /// `None` for the connection's); `None` while up.
    told: Mutex<Option<Option<String>>>,
    reads_refused: Refusal,
    writes_refused: Refusal,
    ttl_secs: u64,
    key_prefix: String,
    /// The key [`Inner::probe_writes`] writes, beside the orders' keys.
    probe_key: String,
    metrics: Arc<Metrics>,
}

impl RedisTier {
    /// Starts the background writer and health probe. Does not wait for Redis.
    pub fn start(
        client: redis::Client,
        ttl_secs: u64,
        key_prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        let inner = Arc::new(Inner {
            client,
            connection: RwLock::new(None),
            up: AtomicBool::new(false),
            told: Mutex::new(None),
            reads_refused: Refusal::new(
                "reads",
                "orders are served from memory and PostgreSQL meanwhile",
            ),
            writes_refused: Refusal::new(
                "writes",
                "orders are not shared through it until it accepts them",
            ),
            ttl_secs,
            key_prefix: format!("{key_prefix}order:"),
            probe_key: format!("{key_prefix}write-probe"),
            metrics,
        });
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(probe(Arc::downgrade(&inner)));
        tokio::spawn(write_loop(inner.clone(), queue));
        Self { inner, writes }
    }

    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Whether Redis answers but refuses to store orders.
    pub fn refuses_writes(&self) -> bool {
        self.inner.writes_refused.is_set()
    }

    /// The value under the order's key; `None` on a miss and whenever Redis
    /// is away. A key that holds no string (written by something else: Redis
    /// may be shared) gives an empty value, which is no order either.
    pub async fn get(&self, uid: &str) -> Option<Bytes> {
        let mut conn = self.inner.connection()?;
        let key = format!("{}{uid}", self.inner.key_prefix);
        let mut cmd = redis::cmd("GET");
        let get = cmd.arg(&key).query_async::<Option<Vec<u8>>>(&mut conn);
        match tokio::time::timeout(READ_TIMEOUT, get).await {
            Ok(Ok(value)) => {
                self.inner.reads_refused.clear();
                value.map(Bytes::from)
            }
            Ok(Err(e)) if e.code() == Some("WRONGTYPE") => Some(Bytes::new()),
            Ok(Err(e)) if answered(&e) => {
                self.inner.reads_refused.set(&e);
                None
            }
            Ok(Err(e)) => {
                self.inner.set_down(&e);
                None
            }
            Err(_) => None,
        }
    }

    /// Queues orders to be written; never waits.
    pub fn put(&self, orders: Vec<(Box<str>, Bytes)>) {
        let count = orders.len() as u64;
        if !self.is_up() || self.writes.try_send(orders).is_err() {
            self.inner.metrics.redis_writes_dropped.inc_by(count);
        }
    }
}

impl Inner {
    fn connection(&self) -> Option<ConnectionManager> {
        if !self.up.load(Ordering::Relaxed) {
            return None;
        }
        self.connection
            .read()
            .expect("lock is never poisoned")
            .clone()
    }

    /// While writes are refused, one small write per probe: the refusal ends
    /// when Redis accepts writes again, not only when the next order comes.
    /// A write that expires at once, refused like an order's (`SET` is denied
    /// when Redis is full; a `DEL` would not be).
    async fn probe_writes(&self) {
        if !self.writes_refused.is_set() {
            return;
        }
        let Some(mut conn) = self.connection() else {
            return;
        };
        let mut set = redis::cmd("SET");
        set.arg(&self.probe_key).arg("").arg("PX").arg(1);
        match set.query_async::<()>(&mut conn).await {
            Ok(()) => self.writes_refused.clear(),
            Err(e) if answered(&e) => {}
            Err(e) => self.set_down(&e),
        }
    }

    /// Logs once per change of state, never once per request.
    fn set_up(&self) {
        let mut told = crate::lock(&self.told);
        if !self.up.swap(true, Ordering::Relaxed) {
            *told = None;
            tracing::info!("redis is reachable; the shared cache tier is in use");
        }
    }

    /// Logs when the tier goes down, and again while down only when the
    /// kind of failure changes (the connection, or one of Redis's answers:
    /// NOAUTH, LOADING, ...), so the log names what keeps it down.
    fn set_down(&self, error: &redis::RedisError) {
        let mut told = crate::lock(&self.told);
        let kind = error.code().map(str::to_owned);
        let was_up = self.up.swap(false, Ordering::Relaxed);
        if was_up || told.as_ref() != Some(&kind) {
            if kind.is_some() {
                tracing::warn!(error = %error, "redis answers but refuses commands; serving from memory and PostgreSQL");
            } else {
                tracing::warn!(error = %error, "redis is unreachable; serving from memory and PostgreSQL");
            }
            *told = Some(kind);
        }
    }
}

async fn probe(inner: std::sync::Weak<Inner>) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_millis(500))
        .set_response_timeout(Duration::from_millis(500))
        .set_number_of_retries(1);
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let existing = inner
            .connection
            .read()
            .expect("lock is never poisoned")
            .clone();
        let result = match existing {
            Some(mut conn) => {
                let ping = redis::cmd("PING").query_async::<()>(&mut conn).await;
                if ping.is_err() {
                    // The manager reconnects a refused connection by itself,
                    // but keeps asking one that fell silent (its host lost)
                    // for good: the next probe starts a new one.
                    *inner.connection.write().expect("lock is never poisoned") = None;
                }
                ping
            }
            None => match inner
                .client
                .get_connection_manager_with_config(config.clone())
                .await
            {
                // A connection is in use only once it is answered: a Redis
                // that wants a password the URL lacks accepts the connection
                // and refuses every command (NOAUTH).
                Ok(mut conn) => {
                    let ping = redis::cmd("PING").query_async::<()>(&mut conn).await;
                    if ping.is_ok() {
                        *inner.connection.write().expect("lock is never poisoned") = Some(conn);
                    }
                    ping
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                inner.set_up();
                inner.probe_writes().await;
            }
            Err(e) => inner.set_down(&e),
        }
        drop(inner);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

async fn write_loop(inner: Arc<Inner>, mut queue: mpsc::Receiver<Vec<(Box<str>, Bytes)>>) {
    while let Some(orders) = queue.recv().await {
        let Some(mut conn) = inner.connection() else {
            inner
                .metrics
                .redis_writes_dropped
                .inc_by(orders.len() as u64);
            continue;
        };
        let mut pipe = redis::pipe();
        for (uid, json) in &orders {
            pipe.set_ex(
                format!("{}{uid}", inner.key_prefix),
                json.as_ref(),
                inner.ttl_secs,
            )
            .ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => inner.writes_refused.clear(),
            Err(e) => {
                inner
                    .metrics
                    .redis_writes_dropped
                    .inc_by(orders.len() as u64);
                if answered(&e) {
                    inner.writes_refused.set(&e);
                } else {
                    inner.set_down(&e);
                }
            }
        }
    }
}

/// Whether Redis itself answered with the error, rather than the connection failing.
fn answered(error: &redis::RedisError) -> bool {
    error.code().is_some()
}

/// One kind of command Redis answers but refuses, told once when it starts
/// and once when it ends.
struct Refusal {
    what: &'static str,
    meanwhile: &'static str,
    refused: AtomicBool,
}

impl Refusal {
    fn new(what: &'static str, meanwhile: &'static str) -> Self {
        Self {
            what,
            meanwhile,
            refused: AtomicBool::new(false),
        }
    }

    fn is_set(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    fn set(&self, error: &redis::RedisError) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %error, "redis refuses {}; {}", self.what, self.meanwhile);
        }
    }

    /// Reads before it writes: every Redis hit passes here.
    fn clear(&self) {
        if self.is_set() && self.refused.swap(false, Ordering::Relaxed) {
            tracing::info!("redis accepts {} again", self.what);
        }
    }
}
