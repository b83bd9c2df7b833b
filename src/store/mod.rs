//! PostgreSQL: the durable record of orders and of the offsets they came from.

mod migrate;
mod read;
mod write;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

pub use migrate::migrate;
pub use read::{OrderSummary, StoredDocument, StoredOffset};
pub use write::{BatchTx, Incoming, InsertOutcome, PartitionOffset};

/// The service's handle on PostgreSQL, connected as the service role.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects lazily, so the service starts (and reports not-ready) while
    /// PostgreSQL is still down.
    pub fn connect_lazy(
        options: PgConnectOptions,
        max_connections: u32,
        timeout: Duration,
    ) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            .connect_lazy_with(options.application_name("order-service"));
        Self { pool }
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(drop)
    }
}

/// Errors that retrying can fix: the database or the network is away.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 40: transaction rollback (serialization,
            // deadlock); 53: insufficient resources; 57P: operator intervention
            // (shutdown, restart).
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || code.starts_with("57P")
        }),
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
