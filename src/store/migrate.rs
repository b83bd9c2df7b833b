use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Applies the migrations as the owner role, then grants `service_role` exactly
/// what the service needs: read and insert orders, read and write offsets. No
/// DDL, no DELETE, no TRUNCATE.
pub async fn migrate(owner: PgConnectOptions, service_role: &str) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(owner)
        .await
        .context("MIGRATION_DATABASE_URL: cannot connect")?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .context("applying migrations")?;

    let role = quote_ident(service_role);
    let grants = [
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT SELECT, INSERT ON orders, deliveries, payments, items TO {role}"),
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
    pool.close().await;
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
