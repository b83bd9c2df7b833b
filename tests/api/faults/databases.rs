//! PostgreSQL away, crashed or frozen, and Redis stopped, while the stream runs.

use super::*;

#[tokio::test]
async fn postgres_away_for_30_seconds() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[("INGEST_MAX_BACKOFF_MS", "1000")])
        .await;
    service.wait_ready().await;
    let mut seed = Seed::new("(b)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    proxy.cut();
    pause(Duration::from_secs(setting("FAULT_PG_OUTAGE_SECS", 30))).await;
    proxy.restore();
    let delivered = stream.finish().await;
    let scenario = format!(
        "(b) PostgreSQL away {} s",
        setting("FAULT_PG_OUTAGE_SECS", 30)
    );
    reconcile(&env, &scenario, delivered, &service, Some(&service)).await;
}

/// PostgreSQL crashes (stopped without a checkpoint, sessions cut, commits
/// in flight unanswered) and starts again, recovering from its log: a server
/// of the test's own, the service connected to it directly.
#[tokio::test]
async fn postgres_crashed_and_restarted() {
    let server = PostgresServer::start().await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "1000")]);
    service.wait_ready().await;
    let mut seed = Seed::new("(n)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    server.crash();
    wait_paused_by(&service, "database").await;
    pause(env_outage()).await;
    server.start_again();
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(n) PostgreSQL crashed, restarted",
        delivered,
        &service,
        Some(&service),
    )
    .await;
}

/// Freezes the server (SIGSTOP) until ingest pauses on it, then for the
/// outage, then thaws it.
async fn frozen_until_ingest_pauses(server: &PostgresServer, service: &Service) {
    server.signal("STOP");
    service
        .wait_for_log("ingest paused", Duration::from_secs(90))
        .await;
    pause(env_outage()).await;
    server.signal("CONT");
}

/// PostgreSQL frozen, then crashed, while a backlog is written two batches at
/// a time (of 100). Frozen once the first batch is stored, with nearly all of
/// the backlog still to write: both writes in flight are held until the
/// write timeout gives them up. Crashed as soon as ingest resumes, while it
/// writes the rest: both transactions in flight are cut, and the commit
/// ahead may have landed unanswered. Either way the batch behind must neither
/// be lost nor have moved the offsets past the one ahead. A server of the
/// test's own.
#[tokio::test]
async fn postgres_frozen_then_crashed_while_a_backlog_is_written_two_batches_at_a_time() {
    let server = PostgresServer::start().await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let seed = Seed::new("(s)");
    let delivered = Stream::start(&env, seed.value).finish().await;
    let service = env.spawn_with(&[
        ("INGEST_BATCH_SIZE", "100"),
        ("INGEST_MAX_BACKOFF_MS", "1000"),
    ]);
    stored_at_least(&env, 1).await;
    frozen_until_ingest_pauses(&server, &service).await;
    service
        .wait_for_log("ingest resumed", Duration::from_secs(90))
        .await;
    server.crash();
    // The crash must cut writes in flight, or the scenario tests less than it
    // says: ingest pauses again.
    helpers::eventually(
        env_outage(),
        || async { (service.log_text().matches("ingest paused").count() >= 2).then_some(()) },
        || format!("the crash cut no write: {}", service.log_text()),
    )
    .await;
    pause(env_outage()).await;
    server.start_again();
    let scenario =
        "(s) PostgreSQL frozen, then crashed, while a backlog is written two batches at a time";
    reconcile(&env, scenario, delivered, &service, Some(&service)).await;
}

/// PostgreSQL frozen (SIGSTOP to the server and its sessions: a paused VM, a
/// host swapping): nothing answers, nothing is closed, until it is thawed. A
/// write in flight is abandoned at the write timeout (30 s by default), and a
/// commit sent before the freeze may land only at the thaw, unseen: the retry
/// must find it. A server of the test's own.
#[tokio::test]
async fn postgres_frozen_then_thawed() {
    let server = PostgresServer::start().await;
    let env = TestEnv::on_postgres(server.admin()).await;
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "1000")]);
    service.wait_ready().await;
    let mut seed = Seed::new("(p)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    frozen_until_ingest_pauses(&server, &service).await;
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(p) PostgreSQL frozen, thawed",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    assert_each_pause_told_once(&service, "").await;
}

#[tokio::test]
async fn redis_stopped_and_started() {
    let env = TestEnv::new().await;
    let (proxy, redis_url) = TcpProxy::to_redis().await;
    let service = env.spawn_with(&[("REDIS_URL", &redis_url)]);
    service.wait_ready().await;
    let mut seed = Seed::new("(c)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.4)).await;
    proxy.cut();
    pause(stream_duration() / 3).await;
    proxy.restore();
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(c) Redis stopped, started",
        delivered,
        &service,
        Some(&service),
    )
    .await;
}
