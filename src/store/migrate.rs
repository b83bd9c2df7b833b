use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Applies the migrations as the owner role, then grants `service_role` exactly
/// what the service needs: read and insert orders and dead letters, read and
/// write offsets. No DDL, no DELETE, no TRUNCATE.
///
/// `connect_timeout`: the longest wait for the session, after which the
/// error says why it was refused, if it was.
pub async fn migrate(
    owner: PgConnectOptions,
    service_role: &str,
    connect_timeout: Duration,
) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connect_timeout)
        .connect_lazy_with(owner);
    if let Err(e) = pool.acquire().await {
        return Err(super::explained(&pool, e).await)
            .context("MIGRATION_DATABASE_URL: cannot connect");
    }
    require_utf8(&pool).await?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .context("applying migrations")?;

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
