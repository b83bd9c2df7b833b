use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::helpers::{
    admin, free_port, redis_url, sample_with_uid, unique_suffix, TestEnv, MIGRATE_PATIENCE,
};

/// The service role reads and writes its tables and nothing else: no DDL, no
/// DELETE or TRUNCATE, no other schema, not the migration history.
#[tokio::test]
async fn the_service_role_has_least_privilege() {
    let env = TestEnv::new().await;
    sqlx::query("CREATE SCHEMA private")
        .execute(&env.db)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE private.secrets (v text)")
        .execute(&env.db)
        .await
        .unwrap();
    let mut service = PgConnectOptions::from_str(&env.service_url)
        .unwrap()
        .connect()
        .await
        .unwrap();

    for allowed in [
        "SELECT count(*) FROM orders",
        "SELECT count(*) FROM items",
        "SELECT count(*) FROM consumer_offsets",
        "SELECT count(*) FROM dead_letters",
    ] {
        sqlx::query(allowed)
            .execute(&mut service)
            .await
            .unwrap_or_else(|e| panic!("{allowed}: {e}"));
    }
    for denied in [
        "DROP TABLE orders",
        "ALTER TABLE orders ADD COLUMN x int",
        "TRUNCATE orders",
        "DELETE FROM orders",
        "UPDATE orders SET entry = 'x'",
        "DELETE FROM dead_letters",
        "UPDATE dead_letters SET stage = 'x'",
        "CREATE TABLE public.extra (v int)",
        "CREATE INDEX extra_idx ON orders (entry)",
        "SELECT * FROM private.secrets",
        "SELECT * FROM _sqlx_migrations",
        "DROP SCHEMA public CASCADE",
    ] {
        let error = sqlx::query(denied)
            .execute(&mut service)
            .await
            .expect_err(denied);
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        // 42501: insufficient privilege; 42P01 would mean the name is hidden, also a refusal.
        assert!(
            matches!(code.as_deref(), Some("42501") | Some("42P01")),
            "{denied}: {error}"
        );
    }
}

/// A service role that can still create in `public` (as on PostgreSQL before
/// 15, where the owner role's REVOKE is only a warning) fails `migrate`,
/// naming the fix, instead of passing with the promise broken.
#[tokio::test]
async fn migrate_refuses_a_service_role_that_can_create_in_public() {
    let env = TestEnv::new().await;
    env.execute(&format!(
        "GRANT CREATE ON SCHEMA public TO {}",
        env.service_role
    ))
    .await;
    let error = env.try_migrate().await.expect_err("migrate must refuse");
    let error = format!("{error:#}");
    assert!(
        error.contains("can create objects in schema public")
            && error.contains("REVOKE CREATE ON SCHEMA public"),
        "{error}"
    );
}

/// A database in an encoding other than UTF-8 would refuse valid orders
/// whose text it cannot hold, one by one, as if they were bad: `migrate`
/// refuses it, naming its encoding and the fix, and creates nothing.
#[tokio::test]
async fn migrate_refuses_a_database_that_cannot_hold_utf8() {
    let name = format!("test_latin1_{}", unique_suffix());
    let mut admin_session = admin().connect().await.unwrap();
    sqlx::query(&format!(
        "CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    ))
    .execute(&mut admin_session)
    .await
    .unwrap();
    let result =
        order_service::store::migrate(admin().database(&name), "order_service", MIGRATE_PATIENCE)
            .await;
    let tables: i64 = {
        let mut session = admin().database(&name).connect().await.unwrap();
        let tables =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                .fetch_one(&mut session)
                .await
                .unwrap();
        session.close().await.unwrap();
        tables
    };
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(&mut admin_session)
        .await
        .unwrap();
    let error = format!("{:#}", result.expect_err("migrate must refuse"));
    assert!(
        error.contains("uses the encoding LATIN1") && error.contains("ENCODING 'UTF8'"),
        "{error}"
    );
    assert_eq!(tables, 0, "nothing is created");
}

/// The commands that open a session of their own say why PostgreSQL gave
/// them none, a refused connection or an unknown role, not only that none
/// came within `DATABASE_CONNECT_TIMEOUT_MS`.
#[test]
fn commands_say_why_postgresql_gave_them_no_session() {
    let server = admin();
    let unknown_role = format!(
        "postgres://no_such_role@{}:{}/postgres",
        server.get_host(),
        server.get_port()
    );
    let closed = format!("postgres://order_owner@127.0.0.1:{}/orders", free_port());
    for (args, variable) in [
        (&["migrate"][..], "MIGRATION_DATABASE_URL"),
        (&["dead-letters", "list"], "DATABASE_URL"),
    ] {
        for (url, cause) in [
            (&closed, "Connection refused"),
            (&unknown_role, "\"no_such_role\""),
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
                .args(args)
                .env_clear()
                .env(variable, url)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} with {url}: {stderr}");
            assert!(
                stderr.contains(&format!("{variable}: cannot")) && stderr.contains(cause),
                "{args:?} with {url}: {stderr}"
            );
        }
    }
}

/// A hardened database where PUBLIC may not create temporary tables:
/// `migrate` grants that to the service role, whose write path stages rows in
/// its session's temporary tables when another writer got there first.
#[tokio::test]
async fn migrate_grants_the_temporary_tables_the_write_path_stages_in() {
    let env = TestEnv::new().await;
    env.execute(&format!(
        "REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC",
        env.name
    ))
    .await;
    let can_stage = || async {
        env.count(&format!(
            "SELECT has_database_privilege('{}', current_database(), 'TEMPORARY')::int::bigint",
            env.service_role
        ))
        .await
    };
    assert_eq!(can_stage().await, 0);
    env.try_migrate().await.expect("migrate");
    assert_eq!(can_stage().await, 1);
}

/// Passwords reach neither the logs, nor /metrics, nor an error body.
#[tokio::test]
async fn passwords_never_appear_in_output() {
    let env = TestEnv::new().await;
    // The service role's password is the test's; a Redis URL with a password that
    // Redis rejects shows how a failure is logged.
    let db_password = url::Url::parse(&env.service_url)
        .unwrap()
        .password()
        .unwrap()
        .to_owned();
    let redis = url::Url::parse(&redis_url()).unwrap();
    let redis_with_password = format!(
        "redis://:hunter2-redis-secret@{}:{}/",
        redis.host_str().unwrap(),
        redis.port().unwrap_or(6379)
    );
    let service = env.spawn_with(&[("REDIS_URL", &redis_with_password)]);
    service.wait_ready().await;
    let order = sample_with_uid("secret-check").to_string();
    env.produce(&[(Some("secret-check"), order.as_bytes())])
        .await;
    service
        .wait_for_order("secret-check", Duration::from_secs(30))
        .await;
    let mut seen = service.get("/metrics").await.text().await.unwrap();
    seen += &service.get("/readyz").await.text().await.unwrap();
    seen += &service.get("/order/bad!id").await.text().await.unwrap();
    seen += &service.log_text();
    assert!(
        seen.contains("***"),
        "URLs are logged with the password masked"
    );
    for secret in [db_password.as_str(), "hunter2-redis-secret"] {
        assert!(!seen.contains(secret), "{secret} leaked:\n{seen}");
    }

    // A configuration error names the setting, not the password.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["migrate"])
        .env_clear()
        .env("DATABASE_URL", "postgres://u:hunter3-pw@host:notaport/db")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr.trim(),
        "error: DATABASE_URL: not a valid PostgreSQL URL"
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["serve", "--help"])
        .env("DATABASE_URL", "postgres://u:hunter4-pw@h/db")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("DATABASE_URL") && !help.contains("hunter4-pw"),
        "{help}"
    );
}

/// A client that never finishes its request head is cut off, and the service
/// keeps answering others meanwhile.
#[tokio::test]
async fn slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let env = TestEnv::new().await;
    let service = env.spawn_with(&[("HTTP_HEADER_READ_TIMEOUT_MS", "500")]);
    service.wait_ready().await;
    let mut slow = tokio::net::TcpStream::connect(&service.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_eq!(service.get("/healthz").await.status(), 200);
    let mut buffer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buffer)).await;
    assert!(
        closed.is_ok(),
        "the slow connection was still open after 5 s"
    );
    assert!(
        !String::from_utf8_lossy(&buffer).contains("200 OK"),
        "{buffer:?}"
    );
}
