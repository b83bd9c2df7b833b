//! PostgreSQL: the durable record of orders and of the offsets they came from.

mod copy_rows;
mod dead_letters;
mod migrate;
mod read;
mod write;

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor};

pub use dead_letters::{Cursor, LetterFilter, LetterRecord, LetterSummary, NewLetter};
pub use migrate::migrate;
pub use read::{OrderFilter, OrderSummary, StoredDocument, StoredOffset};
pub use write::{BatchTx, Incoming, InsertOutcome, PartitionOffset};

/// `work`'s result, or an error if PostgreSQL has not answered within
/// `patience`: its server may be gone without closing the session (a host
/// lost, a network that drops packets), which no other error would ever tell.
async fn answered<T, E: From<sqlx::Error>>(
    patience: Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let silent = || {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} ms", patience.as_millis()),
        ))
    };
    tokio::time::timeout(patience, work)
        .await
        .unwrap_or_else(|_| Err(silent().into()))
}

/// `error`, or for `pool`'s bare "no connection within the timeout", why a
/// new session is refused, if it is (see [`Store::explained`]).
async fn explained(pool: &PgPool, error: sqlx::Error) -> sqlx::Error {
    if !matches!(error, sqlx::Error::PoolTimedOut) {
        return error;
    }
    let patience = pool.options().get_acquire_timeout();
    let options = pool.connect_options();
    match tokio::time::timeout(patience, PgConnection::connect_with(&options)).await {
        Ok(Err(refused)) => refused,
        // A session opens: the pool's own were all busy.
        Ok(Ok(session)) => {
            session.close().await.ok();
            error
        }
        Err(_) => error,
    }
}

/// The service's handle on PostgreSQL, connected as the service role.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    recycled: Arc<Recycled>,
    /// How long a statement may go unanswered before it is abandoned.
    write_timeout: Duration,
}

/// Bounds every statement of a session, set once when it opens (a pooler in
/// session mode passes it on; PgBouncer refuses startup `options`). A
/// statement waits at most 5 s for a lock (a DBA's `LOCK TABLE`, a long
/// `ALTER TABLE`): a batch then fails, and ingest pauses naming the wait and
/// retries, instead of hanging unseen; a search an HTTP client gave up on
/// lets its session go back to the pool, which ingest shares. What the client
/// abandons after `write_timeout` (no answer: a host lost, a network
/// partition), the server abandons too: a statement running that long, or a
/// transaction left idle that long, is ended, so an abandoned transaction
/// cannot keep its locks, which every retry would wait on. Notices (a staging
/// table that exists already) are not worth a log line.
fn session_limits(write_timeout: Duration) -> Arc<str> {
    let ms = write_timeout.as_millis();
    format!(
        "SET lock_timeout = '5s'; SET statement_timeout = {ms}; \
         SET idle_in_transaction_session_timeout = {ms}; SET client_min_messages = warning"
    )
    .into()
}

/// Sessions opened before this moment are closed instead of reused: a
/// session can carry the conditions of its start (read-only after a failover,
/// a role's old settings), which a retry must not inherit.
#[derive(Default)]
struct Recycled {
    at: Mutex<Option<Instant>>,
}

impl Recycled {
    /// Every session open now is closed when next taken from the pool.
    fn all_open_now(&self) {
        *crate::lock(&self.at) = Some(Instant::now());
    }

    fn keeps(&self, age: Duration) -> bool {
        let at = *crate::lock(&self.at);
        at.is_none_or(|at| {
            Instant::now()
                .checked_sub(age)
                .is_some_and(|opened| opened > at)
        })
    }
}

impl Store {
    /// Connects lazily, so the service starts (and reports not-ready) while
    /// PostgreSQL is still down. `write_timeout`: how long a batch's
    /// transaction may run or idle before the server ends it.
    pub fn connect_lazy(
        options: PgConnectOptions,
        max_connections: u32,
        timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        Self::with_options(
            PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(timeout),
            options.application_name("order-service"),
            write_timeout,
        )
    }

    /// A pool built from `pool` options, with session recycling.
    pub fn with_options(
        pool: PgPoolOptions,
        options: PgConnectOptions,
        write_timeout: Duration,
    ) -> Self {
        let recycled = Arc::new(Recycled::default());
        let keeps = recycled.clone();
        let session = session_limits(write_timeout);
        let patience = pool.get_acquire_timeout();
        let pool = pool
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                let session = session.clone();
                Box::pin(async move {
                    conn.execute(&*session).await?;
                    Ok(())
                })
            })
            // An idle session whose server fell silent for good (its host
            // lost, a failover that kept the address) would be pinged by the
            // pool for the whole wait, one such session per wait, so a pool
            // of eight took 24 s to recover: one that does not answer within
            // a third of the wait is closed, and so is every session opened
            // before it (they most likely went with it), leaving the rest of
            // the wait to open a new one.
            .before_acquire(move |conn, meta| {
                let recycled = keeps.clone();
                Box::pin(async move {
                    if !recycled.keeps(meta.age) {
                        return Ok(false);
                    }
                    let answer = answered(patience / 3, conn.ping()).await;
                    if let Err(e) = &answer {
                        tracing::warn!(error = %e, "a pooled PostgreSQL session failed its ping; it and every session opened before it are closed");
                        recycled.all_open_now();
                    }
                    Ok(answer.is_ok())
                })
            })
            // A session given back in the middle of a statement (a write or a
            // read abandoned for want of an answer) is then pinged by the pool
            // with no bound, holding its place for as long as the server stays
            // silent: unanswered as long as a session may take to open
            // (DATABASE_CONNECT_TIMEOUT_MS), it is closed instead, so the pool
            // opens a new one as soon as the server answers again. A healthy
            // server answers at once, or once the abandoned statement ends.
            .after_release(move |conn, _| {
                Box::pin(async move { answered(patience, conn.ping()).await.map(|()| true) })
            })
            .connect_lazy_with(options);
        Self {
            pool,
            recycled,
            write_timeout,
        }
    }

    /// `work`'s result, or an error if PostgreSQL has not answered within
    /// the write timeout (`INGEST_WRITE_TIMEOUT_MS`).
    pub async fn answered<T, E: From<sqlx::Error>>(
        &self,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        answered(self.write_timeout, work).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `error`, or for the pool's bare "no connection within the timeout",
    /// why a new session is refused, if it is: the pool retries a refusal it
    /// deems passing (too many connections, the server starting up) until its
    /// timeout and then says only that, while the operator needs the reason.
    pub async fn explained(&self, error: sqlx::Error) -> sqlx::Error {
        explained(&self.pool, error).await
    }

    /// Whether PostgreSQL answers and lets the service read the orders it
    /// serves (the table is there and readable; no row is read).
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1 FROM orders LIMIT 0")
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// Every session open now is closed when next taken from the pool.
    pub fn recycle_sessions(&self) {
        self.recycled.all_open_now();
    }
}

/// `text` as PostgreSQL can hold it: NUL, which no text or jsonb value may
/// contain (a claimed id, a field name in a reason, a replay header, all read
/// from a message; a filter in a query string), becomes U+FFFD, as it is
/// recorded, so a search finds what was recorded. Nothing else is changed.
fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// What a PostgreSQL error says about the order being written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// The order's own data is refused (SQLSTATE class 22, data exception; 23,
    /// integrity violation; or 54, a limit of the server's such as the size of
    /// an index entry): writing it again will fail again. Ingest tells by
    /// writing each order of a refused batch alone.
    OrderData { reason: String },
    /// The environment is at fault (connection, authentication, permissions,
    /// missing tables, read-only database, resources, operator intervention,
    /// anything unknown): the same write may succeed once it is mended.
    Environment { cause: String },
}

/// The server's message with its SQLSTATE, said once (sqlx's own `Display`
/// of the error repeats the message as its source).
pub fn described(db: &dyn sqlx::error::DatabaseError) -> String {
    format!("{} ({})", db.message(), db.code().unwrap_or_default())
}

/// One classification for every PostgreSQL error ingest meets. Only errors
/// that belong to one order's data may refuse it; everything else pauses.
pub fn classify(error: &sqlx::Error) -> ErrorClass {
    if let sqlx::Error::Database(db) = error {
        let code = db.code().unwrap_or_default();
        if ["22", "23", "54"]
            .iter()
            .any(|class| code.starts_with(class))
        {
            return ErrorClass::OrderData {
                reason: format!("store: database refused the order ({code})"),
            };
        }
        return ErrorClass::Environment {
            cause: format!("database: {}", described(db.as_ref())),
        };
    }
    let cause = match error {
        sqlx::Error::PoolTimedOut => "database: no connection within the timeout".to_owned(),
        other => format!("database: {other}"),
    };
    ErrorClass::Environment { cause }
}
