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
    pool.close().await;
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
