use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::migrate::MigrateError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Executor;

/// The longest a migration's statement waits for a lock before the migration
/// is rolled back and tried again. A statement waiting for a table's lock
/// (behind a long transaction, say) holds up every later read and write of
/// that table, the service's included, for as long as it waits; this bounds
/// that hold-up.
const LOCK_WAIT: &str = "2s";

/// How long `migrate` keeps trying while its locks are taken.
const LOCK_PATIENCE: Duration = Duration::from_secs(120);

/// Applies the migrations as the owner role, then grants `service_role` exactly
/// what the service needs: read and insert orders and dead letters, read and
/// write offsets. No DDL, no DELETE, no TRUNCATE.
///
/// `connect_timeout`: the longest wait for the session, after which the
/// error says why it was refused, if it was. A lock taken by another session
/// is waited for in tries of [`LOCK_WAIT`], for up to [`LOCK_PATIENCE`].
pub async fn migrate(
    owner: PgConnectOptions,
    service_role: &str,
    connect_timeout: Duration,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connect_timeout)
        .after_connect(|session, _| {
            Box::pin(async move {
                session
                    .execute(format!("SET lock_timeout = '{LOCK_WAIT}'").as_str())
                    .await
                    .map(drop)
            })
        })
        .connect_lazy_with(owner);
    if let Err(e) = pool.acquire().await {
        return Err(super::explained(&pool, e).await)
            .context("MIGRATION_DATABASE_URL: cannot connect");
    }
    require_utf8(&pool).await?;
    apply_migrations(&pool).await?;

    let role = quote_ident(service_role);
    let grants = [
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!(
            "GRANT SELECT, INSERT ON orders, deliveries, payments, items, dead_letters TO {role}"
        ),
        format!("GRANT SELECT, INSERT, UPDATE ON consumer_offsets TO {role}"),
    ];
    for grant in grants {
        sqlx::query(&grant)
            .execute(&pool)
            .await
            .with_context(|| format!("granting access to role {service_role}"))?;
    }
    // Before PostgreSQL 15 `public` belongs to the superuser and the REVOKE
    // above is only a warning; the promise is checked, not assumed.
    let can_create: bool =
        sqlx::query_scalar("SELECT has_schema_privilege($1, 'public', 'CREATE')")
            .bind(service_role)
            .fetch_one(&pool)
            .await
            .context("checking the service role's privileges")?;
    // The write path stages rows in temporary tables when another writer
    // stored some of a batch's orders first (PUBLIC may create them by default).
    let mut can_stage = has_temporary(&pool, service_role).await?;
    if !can_stage {
        let grant = format!(
            "GRANT TEMPORARY ON DATABASE {} TO {role}",
            current_database(&pool).await?
        );
        can_stage = sqlx::query(&grant).execute(&pool).await.is_ok()
            && has_temporary(&pool, service_role).await?;
    }
    pool.close().await;
    if !can_stage {
        anyhow::bail!(
            "the service role {service_role} cannot create temporary tables in this database, \
             which ingest needs when another writer stored some of a batch's orders first; as \
             the database's owner run: GRANT TEMPORARY ON DATABASE <database> TO {role}"
        );
    }
    if can_create {
        anyhow::bail!(
            "the service role {service_role} can create objects in schema public, so it is not \
             least-privilege (on PostgreSQL before 15 the schema belongs to the superuser and \
             the owner role cannot revoke it; a superuser service role can always). As a \
             superuser run: REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}; and use a \
             service role that is not a superuser"
        );
    }
    Ok(())
}

/// Applies the migrations, trying again while a lock they need is held by
/// another session: each try waits at most [`LOCK_WAIT`] per statement, so the
/// sessions queued behind it go on in between.
async fn apply_migrations(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tries = 0;
    loop {
        let error = match sqlx::migrate!("./migrations").run(pool).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        tries += 1;
        if !waited_for_a_lock(&error) {
            return Err(error).context("applying migrations");
        }
        let holders = open_transactions(pool).await;
        if started.elapsed() >= LOCK_PATIENCE {
            return Err(error).context(format!(
                "applying migrations: a lock they need stayed taken for {} s ({tries} tries); \
                 open transactions in this database: {holders}",
                LOCK_PATIENCE.as_secs()
            ));
        }
        tracing::warn!(
            tries,
            open_transactions = %holders,
            "a migration waited {LOCK_WAIT} for a lock held by another session; rolled back, \
             trying again in a second"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn waited_for_a_lock(error: &MigrateError) -> bool {
    let database = match error {
        MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => e.as_database_error(),
        _ => None,
    };
    // lock_not_available: lock_timeout expired.
    database.and_then(|e| e.code()).as_deref() == Some("55P03")
}

/// The database's oldest open transactions but ours, the likely holders of
/// the lock waited for, as a line for the log.
async fn open_transactions(pool: &sqlx::PgPool) -> String {
    let holders: Result<Vec<String>, _> = sqlx::query_scalar(
        "SELECT format('pid %s (role %s, application ''%s'', %s, open %s s)', pid, usename,
                       application_name, state, round(extract(epoch FROM now() - xact_start)))
         FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND xact_start IS NOT NULL
         ORDER BY xact_start LIMIT 3",
    )
    .fetch_all(pool)
    .await;
    match holders {
        Ok(holders) if holders.is_empty() => "none now".into(),
        Ok(holders) => holders.join("; "),
        Err(e) => format!("cannot be listed ({e})"),
    }
}

/// Orders are UTF-8 text in any script. A database in another encoding would
/// refuse valid orders one by one, as if their data were at fault, so it is
/// refused here instead, with the fix.
async fn require_utf8(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
        .fetch_one(pool)
        .await
        .context("reading the database's encoding")?;
    if encoding != "UTF8" {
        anyhow::bail!(
            "the database {} uses the encoding {encoding}, which cannot hold every order's \
             text; create it with UTF-8: CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE template0",
            current_database(pool).await?
        );
    }
    Ok(())
}

async fn has_temporary(pool: &sqlx::PgPool, role: &str) -> anyhow::Result<bool> {
    sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'TEMPORARY')")
        .bind(role)
        .fetch_one(pool)
        .await
        .context("checking the service role's privileges")
}

async fn current_database(pool: &sqlx::PgPool) -> anyhow::Result<String> {
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(pool)
        .await
        .context("reading the database's name")?;
    Ok(quote_ident(&name))
}

/// A role name as a quoted SQL identifier; identifiers cannot be bound as parameters.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(super::quote_ident("order_service"), "\"order_service\"");
        assert_eq!(super::quote_ident("a\"; DROP"), "\"a\"\"; DROP\"");
    }
}
