//! Faults of the environment that leave PostgreSQL up: grants, schema, read-only,
//! connections, disk, migrations not yet applied, password changed. Ingest pauses,
//! names the cause once, and resumes with nothing lost or dead-lettered.

use super::*;

/// One fault of the environment during the stream: `begin` it at a random
/// moment, wait until `/readyz` names `cause`, let it last, `end` it, then
/// reconcile. Not one valid order may be dead-lettered for it.
async fn environment_fault(
    env: &TestEnv,
    service: &Service,
    label: &str,
    cause: &str,
    begin: impl std::future::Future<Output = ()>,
    end: impl std::future::Future<Output = ()>,
) {
    let mut seed = Seed::new(label);
    let stream = Stream::start(env, seed.value);
    pause(seed.random_point(0.4)).await;
    begin.await;
    wait_paused_by(service, cause).await;
    pause(env_outage()).await;
    end.await;
    let delivered = stream.finish().await;
    let scenario = format!("{label} {} s", env_outage().as_secs());
    reconcile(env, &scenario, delivered, service, Some(service)).await;
    assert_each_pause_told_once(service, cause).await;
}

/// (u) Clients opening more connections than the service may hold (live
/// feeds, as from many open pages; those past the feeds' share are refused)
/// under an open-files limit the service cannot raise, while its PostgreSQL
/// sessions are ended: ingest opens new ones and goes on storing, the
/// connections past the limit wait, and no file runs out.
#[tokio::test]
async fn clients_hold_every_connection_while_postgres_sessions_end() {
    const LIMIT: u64 = 256;
    let env = TestEnv::new().await;
    let service = Service::spawn_with_open_files(env.service_env(), LIMIT, LIMIT);
    service.wait_ready().await;
    let allowed = service.metric("http_connections_limit").await;
    assert_eq!(
        allowed,
        (LIMIT / 2) as f64,
        "half of a small limit is the clients'"
    );
    let scenario = "(u) clients hold every connection";
    let mut seed = Seed::new(scenario);
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.3)).await;

    let mut feeds = Vec::new();
    for _ in 0..LIMIT + 50 {
        feeds.push(service.hold_feed().await);
    }
    service
        .wait_for_log("the most allowed", Duration::from_secs(30))
        .await;
    env.end_service_sessions().await;
    let stored = || env.count("SELECT count(*) FROM orders");
    let before = stored().await;
    helpers::eventually(
        Duration::from_secs(30),
        || async { (stored().await >= before + 50).then_some(()) },
        || "ingest stopped storing while clients held every connection".into(),
    )
    .await;
    drop(feeds);

    let delivered = stream.finish().await;
    reconcile(&env, scenario, delivered, &service, Some(&service)).await;
    let logs = service.log_text();
    assert!(
        !logs.contains("Too many open files"),
        "files ran out:\n{logs}"
    );
    assert_eq!(
        logs.matches("the most allowed").count(),
        1,
        "the limit is told once a minute:\n{logs}"
    );
}

/// A DBA's permission slip: INSERT on the order tables revoked from the
/// service role mid-stream, then granted back.
#[tokio::test]
async fn insert_revoked_then_granted() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let (tables, role) = ("orders, deliveries, payments, items", &env.service_role);
    let revoke = format!("REVOKE INSERT ON {tables} FROM {role}");
    let grant = format!("GRANT INSERT ON {tables} TO {role}");
    environment_fault(
        &env,
        &service,
        "(f) INSERT revoked",
        "permission denied for table",
        env.execute(&revoke),
        env.execute(&grant),
    )
    .await;
}

/// A table the service writes gone mid-stream (renamed, as by a migration
/// that swaps tables; SQLSTATE 42P01), then back under its name. The sibling
/// of (h), where the tables are missing from the start.
#[tokio::test]
async fn orders_table_renamed_then_restored() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    environment_fault(
        &env,
        &service,
        "(q) orders table renamed",
        "does not exist",
        env.execute("ALTER TABLE orders RENAME TO orders_renamed"),
        env.execute("ALTER TABLE orders_renamed RENAME TO orders"),
    )
    .await;
}

/// (v) A column added mid-stream that every new row must fill, as a DBA
/// readies the tables for a future writer (NOT NULL with a default to fill
/// the rows there, the default then dropped; SQLSTATE 23502), then dropped.
/// A data error for every order, yet no order is at fault: the sample order
/// is refused too, so ingest pauses instead of dead-lettering valid orders.
#[tokio::test]
async fn a_column_every_row_must_fill_added_then_dropped() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    environment_fault(
        &env,
        &service,
        "(v) a column every row must fill added",
        "refuses the sample order too",
        async {
            env.execute("ALTER TABLE items ADD COLUMN size_code text NOT NULL DEFAULT 'M'")
                .await;
            env.execute("ALTER TABLE items ALTER COLUMN size_code DROP DEFAULT")
                .await;
        },
        env.execute("ALTER TABLE items DROP COLUMN size_code"),
    )
    .await;
}

/// A failover to a read-only server and back: the database turns read-only
/// for new sessions, the service's sessions are cut, then it turns writable.
#[tokio::test]
async fn database_read_only_then_writable() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let begin = async {
        env.set_read_only(true).await;
        env.end_service_sessions().await;
    };
    environment_fault(
        &env,
        &service,
        "(g) database read-only",
        "read-only transaction",
        begin,
        env.set_read_only(false),
    )
    .await;
}

/// The database refuses new sessions (its connection limit reached, SQLSTATE
/// 53300) and the service's sessions are ended: every reconnection is refused
/// until the limit is lifted.
#[tokio::test]
async fn connections_refused_then_allowed() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let limit = |n: i32| format!("ALTER DATABASE {} CONNECTION LIMIT {n}", env.name);
    let begin = async {
        // Opened first: the limit refuses new sessions, not this one.
        let mut own = env.service_session().await;
        env.execute(&limit(0)).await;
        crate::helpers::end_other_sessions(&mut own).await;
    };
    environment_fault(
        &env,
        &service,
        "(m) connections refused",
        "too many connections",
        begin,
        env.execute(&limit(-1)),
    )
    .await;
}

/// The disk under the orders table fills up mid-stream (PostgreSQL refuses
/// the next page with SQLSTATE 53100), then space is freed. A full disk is
/// the environment's fault: ingest pauses naming it, not one order is
/// dead-lettered for it, and it resumes by itself. (The write-ahead log stays
/// on the server's own disk: a full log stops the server, which
/// `postgres_crashed_and_restarted` covers.)
#[tokio::test]
async fn disk_full_then_space_freed() {
    let server = PostgresServer::start().await;
    let disk = server
        .tablespace_on_small_disk("small_disk", 64 << 20)
        .await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let mut superuser = sqlx::ConnectOptions::connect(&server.superuser(&env.name))
        .await
        .unwrap();
    sqlx::query("ALTER TABLE orders SET TABLESPACE small_disk")
        .execute(&mut superuser)
        .await
        .unwrap();
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "1000")]);
    service.wait_ready().await;
    environment_fault(
        &env,
        &service,
        "(o) disk full",
        "No space left on device",
        async { disk.fill() },
        async { disk.resize(64 << 20) },
    )
    .await;
}

/// `serve` started before `migrate`: it waits, naming the missing table,
/// and takes the whole stream in once the tables exist.
#[tokio::test]
async fn served_before_migrations() {
    let env = TestEnv::unmigrated().await;
    let service = env.spawn();
    let mut seed = Seed::new("(h)");
    let stream = Stream::start(&env, seed.value);
    wait_paused_by(&service, "does not exist").await;
    // Its partitions' positions are unread: readiness says so.
    service
        .wait_unready("stored positions", ("kafka_assignment", "loading"))
        .await;
    pause(seed.random_point(0.5)).await;
    env.migrate().await;
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(h) serve before migrate",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    assert_each_pause_told_once(&service, "does not exist").await;
}

/// The service role's password changed and its sessions ended (as when a
/// secret is rotated before the service has the new one), then changed back.
/// Uses a role of the tests' own, whose host connections always check the
/// password (scripts/stack sets it up).
#[tokio::test]
async fn password_changed_then_restored() {
    let role = std::env::var("TEST_ROTATING_ROLE").unwrap_or("order_service_rotating".into());
    let password =
        std::env::var("TEST_ROTATING_PASSWORD").unwrap_or("order_service_rotating_local".into());
    let env = TestEnv::new().await;
    let url = env.service_url_as(&role, &password).await;
    let service = env.spawn_with(&[("DATABASE_URL", url.as_str())]);
    service.wait_ready().await;
    // A role may change its own password; this session outlives the change.
    let own = tokio::sync::Mutex::new(
        sqlx::ConnectOptions::connect(
            &<sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url).unwrap(),
        )
        .await
        .expect("connect as the rotating role"),
    );
    let set_password = |p: String| {
        let own = &own;
        async move {
            let mut own = own.lock().await;
            sqlx::query(&format!("ALTER ROLE CURRENT_USER PASSWORD '{p}'"))
                .execute(&mut *own)
                .await
                .unwrap();
        }
    };
    let begin = async {
        set_password("rotated-elsewhere".into()).await;
        crate::helpers::end_other_sessions(&mut *own.lock().await).await;
    };
    environment_fault(
        &env,
        &service,
        "(i) password changed",
        "password authentication failed",
        begin,
        set_password(password.clone()),
    )
    .await;
}
