//! The service itself killed (`kill -9`, SIGTERM) mid-stream, under a backlog, while
//! joining or between its dead letters and their record; frozen past the session
//! timeout; or one of three instances killed.

use super::*;

#[tokio::test]
async fn kill_9_at_random_points() {
    let env = TestEnv::new().await;
    let mut seed = Seed::new("(a)");
    let stream = Stream::start(&env, seed.value);
    // Restarted with the same command and no other settings, as a
    // supervisor (or a person) would: the same address, hence the same
    // default member name, so the partitions come straight back.
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let mut service = spawn();
    let kills = setting("FAULT_KILLS", 3);
    for _ in 0..kills {
        pause(seed.random_point(0.3)).await;
        service.kill();
        service = spawn();
    }
    let delivered = stream.finish().await;
    service.wait_ready().await;
    let scenario = format!("(a) kill -9 {kills} times, restarted");
    reconcile(&env, &scenario, delivered, &service, None).await;
}

/// Shares of the valid orders of `delivered` (about nine in ten messages),
/// the first `of` of `of + 1` equal steps, at which to strike.
fn shares(delivered: &Delivered, of: u64) -> impl Iterator<Item = i64> {
    let valid = delivered.total as i64 * 8 / 10;
    let of = of as i64;
    (1..=of).map(move |k| valid * k / (of + 1))
}

/// The whole stream first, then the service started on that backlog with
/// batches of 100, so that nearly every batch starts its transaction behind
/// another, two at a time; stopped by `stop` each time it has stored another
/// share of it, and started again with the same command. A batch stopped
/// behind one not yet committed must not have moved the offsets past it.
async fn stopped_while_a_backlog_is_written_two_batches_at_a_time(
    label: &str,
    how: &str,
    stop: fn(Service),
) {
    let env = TestEnv::new().await;
    let seed = Seed::new(label);
    let delivered = Stream::start(&env, seed.value).finish().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let settings = [("HTTP_ADDR", addr.as_str()), ("INGEST_BATCH_SIZE", "100")];
    let mut service = env.spawn_with(&settings);
    let stops = setting("FAULT_KILLS", 3);
    for share in shares(&delivered, stops) {
        stored_at_least(&env, share).await;
        tokio::task::spawn_blocking(move || stop(service))
            .await
            .unwrap();
        service = env.spawn_with(&settings);
    }
    service.wait_ready().await;
    let scenario =
        format!("{label} {how} {stops} times while a backlog is written two batches at a time");
    reconcile(&env, &scenario, delivered, &service, None).await;
}

#[tokio::test]
async fn kill_9_while_a_backlog_is_written_two_batches_at_a_time() {
    stopped_while_a_backlog_is_written_two_batches_at_a_time("(r)", "kill -9", Service::kill).await;
}

/// The graceful stop: both writes in flight finish (or are given up) in
/// order within the shutdown bound, and the process exits 0.
#[tokio::test]
async fn sigterm_while_a_backlog_is_written_two_batches_at_a_time() {
    // SHUTDOWN_TIMEOUT_MS (10 s by default), then leaving the group.
    stopped_while_a_backlog_is_written_two_batches_at_a_time("(t)", "SIGTERM", |service| {
        service.terminate_within(Duration::from_secs(15))
    })
    .await;
}

/// Stopped (SIGTERM) at several points of its start, while its group may
/// still be forming, then started again the same way: it gets its partitions
/// and consumes. (A leader that left a forming group would leave it without
/// a leader on the local broker, for good; librdkafka finishes a join and
/// sync in flight before it leaves, and this holds it to that.)
#[tokio::test]
async fn stopped_while_joining_then_started_again_consumes() {
    let env = TestEnv::with_partitions(1).await;
    let addr = format!("127.0.0.1:{}", free_port());
    let settings = [("HTTP_ADDR", addr.as_str())];
    for after_ms in [1_500, 3_000, 4_500, 6_000, 7_500] {
        let service = env.spawn_with(&settings);
        pause(Duration::from_millis(after_ms)).await;
        let status = tokio::task::spawn_blocking(move || service.terminate())
            .await
            .unwrap();
        assert!(status.success(), "stopped after {after_ms} ms: {status:?}");
    }
    let service = env.spawn_with(&settings);
    helpers::produce_orders(&env, &helpers::generated_orders(93, 5)).await;
    env.wait_for_count("SELECT count(*) FROM orders", 5, Duration::from_secs(60))
        .await;
    service.wait_ready().await;
}

/// A laptop asleep, a VM paused, a process stopped in a debugger: the
/// service freezes for longer than the group's session timeout, with its
/// default settings, and then goes on. The group took its partitions away
/// meanwhile; it must get them back and reconcile exactly.
#[tokio::test]
async fn service_frozen_past_the_session_timeout() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let mut seed = Seed::new("(k)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    service.signal("STOP");
    pause(Duration::from_secs(setting("FAULT_FREEZE_SECS", 55))).await;
    service.signal("CONT");
    let delivered = stream.finish().await;
    let scenario = format!("(k) service frozen {} s", setting("FAULT_FREEZE_SECS", 55));
    // No counter check: the group took the partitions away mid-batch, so the
    // instance consumes some messages twice (once per assignment) by design.
    reconcile(&env, &scenario, delivered, &service, None).await;
}

#[tokio::test]
async fn three_instances_one_killed() {
    let env = TestEnv::new().await;
    let instance = |name: &str| env.spawn_with(&[("KAFKA_GROUP_INSTANCE_ID", name)]);
    let first = instance("first");
    let second = instance("second");
    first.wait_ready().await;
    let mut seed = Seed::new("(e)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.3)).await;
    let third = instance("third");
    third.wait_ready().await;
    pause(seed.random_point(0.3)).await;
    // The last to join is killed: the local broker keeps a dead group leader
    // as leader, so a group whose leader dies never finishes its next
    // rebalance there (Apache Kafka elects a new one). It also waits for a
    // killed static member to come back, so its supervisor restarts it under
    // its name, as in (a).
    third.kill();
    let _restarted = instance("third");
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(e) 2 then 3 instances, one killed",
        delivered,
        &second,
        None,
    )
    .await;
    drop(first);
}

/// The dead-letter record refused (its grant revoked) after the letters are
/// acknowledged, then a crash: the letters are on the topic and nothing is
/// committed. The instance restarted the same way, with the grant back,
/// records each letter exactly once and sends none again.
#[tokio::test]
async fn crash_between_the_letters_and_their_record() {
    let env = TestEnv::new().await;
    let role = &env.service_role;
    env.execute(&format!("REVOKE INSERT ON dead_letters FROM {role}"))
        .await;
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let service = spawn();
    service.wait_ready().await;
    let valid: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| {
            let uid = format!("crash-valid-{i}");
            (uid.clone(), sample_with_uid(&uid).to_string().into_bytes())
        })
        .collect();
    let mut messages: Vec<(Option<&str>, &[u8])> = valid
        .iter()
        .map(|(uid, bytes)| (Some(uid.as_str()), bytes.as_slice()))
        .collect();
    messages.extend([
        (Some("crash-bad-0"), &b"not json"[..]),
        (Some("crash-bad-1"), &br#"{"order_uid":"crash-bad-1""#[..]),
        (Some("crash-bad-2"), &b"[]"[..]),
    ]);
    env.produce(&messages).await;
    wait_paused_by(&service, "permission denied for table dead_letters").await;
    // The batch that paused sent its letters; a later one may wait in hand.
    let sent = env.dead_letters(3, Duration::from_secs(5)).len();
    assert!((1..=3).contains(&sent), "{sent} letters before the crash");
    // (A batch without letters may have been committed meanwhile.)
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);

    service.kill();
    env.execute(&format!("GRANT INSERT ON dead_letters TO {role}"))
        .await;
    let service = spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 2, Duration::from_secs(60))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters",
        3,
        Duration::from_secs(30),
    )
    .await;
    service.wait_ready().await;
    let letters = env.dead_letters(3, Duration::from_secs(10));
    assert_eq!(letters.len(), 3, "no letter sent twice: {letters:#?}");
    let mut on_topic: Vec<(i32, i64)> = letters.iter().map(Record::source).collect();
    let mut recorded: Vec<(i32, i64)> =
        sqlx::query_as("SELECT source_partition, source_offset FROM dead_letters ORDER BY 1, 2")
            .fetch_all(&env.db)
            .await
            .unwrap();
    on_topic.sort_unstable();
    recorded.sort_unstable();
    assert_eq!(recorded, on_topic, "one record per letter");
}
