//! The broker restarted, down at start, frozen, losing its data or its producers'
//! state, expiring records, or out of disk; each on a broker of the scenario's own.

use super::*;

/// A broker of the scenario's own (its storage lives as long as the first
/// value) and a test environment on it.
async fn own_broker() -> (tempfile::TempDir, Broker, TestEnv) {
    let storage = tempfile::tempdir().unwrap();
    let broker = Broker::start(storage.path().to_owned(), free_port());
    let env = TestEnv::on_broker(format!("127.0.0.1:{}", broker.port), PARTITIONS).await;
    (storage, broker, env)
}

/// [`own_broker`], and a ready service on it.
async fn on_own_broker(settings: &[(&str, &str)]) -> (tempfile::TempDir, Broker, TestEnv, Service) {
    let (storage, broker, env) = own_broker().await;
    let service = env.spawn_with(settings);
    service.wait_ready().await;
    (storage, broker, env, service)
}

#[tokio::test]
async fn broker_restarted_mid_stream() {
    let (_storage, mut broker, env, service) = on_own_broker(&[]).await;
    let mut seed = Seed::new("(d)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    broker = tokio::task::spawn_blocking(move || broker.restart(Duration::from_secs(2)))
        .await
        .unwrap();
    let delivered = stream.finish().await;
    reconcile(
        &env,
        "(d) broker restarted",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    drop(broker);
}

/// Started while its broker is down (a host booting, the broker slower to
/// come up): the service serves what PostgreSQL holds, `/readyz` names the
/// broker as one it cannot reach (not as a slow one, which a frozen broker
/// is), and once the broker is up it consumes without a restart.
#[tokio::test]
async fn started_while_the_broker_is_down() {
    let (storage, broker, env) = own_broker().await;
    let port = broker.port;
    let orders = helpers::generated_orders(73, 20);
    let first = env.spawn();
    helpers::store_orders(&env, &orders[..10]).await;
    assert!(first.terminate().success());
    drop(broker);

    let service = env.spawn();
    service
        .wait_unready("Connection refused", ("kafka_broker", "unreachable"))
        .await;
    // Whether the topic exists cannot be known meanwhile.
    let readiness: Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(readiness["checks"]["kafka_topic"], "unknown", "{readiness}");
    service
        .wait_for_log("the broker cannot be reached", Duration::from_secs(10))
        .await;
    let served = service
        .wait_for_order(&orders[0].0, Duration::from_secs(30))
        .await;
    assert_eq!(
        served,
        serde_json::from_slice::<Value>(&orders[0].1).unwrap()
    );
    let dir = storage.path().to_owned();
    let broker = tokio::task::spawn_blocking(move || Broker::start(dir, port))
        .await
        .unwrap();
    helpers::produce_orders(&env, &orders[10..]).await;
    env.wait_for_count("SELECT count(*) FROM orders", 20, Duration::from_secs(90))
        .await;
    service.wait_ready().await;
    env.assert_no_dead_letters();
    drop(broker);
}

/// The broker stopped, its storage wiped (as a container without its volume)
/// and started again empty, with the scenario's topics created again.
async fn lose_data(storage: &tempfile::TempDir, broker: Broker, env: &TestEnv) -> Broker {
    let port = broker.port;
    drop(broker);
    for entry in std::fs::read_dir(storage.path()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let broker = Broker::start(storage.path().to_owned(), port);
    env.create_topic(&env.topic, PARTITIONS).await;
    env.create_topic(&env.dlq_topic, 1).await;
    broker
}

/// The broker loses its data (its storage wiped, as a container without its
/// volume; or the topic deleted and created again) while PostgreSQL keeps the
/// positions: they are past the end of the new topic (which holds fewer
/// messages per partition than were consumed before, on every partition with
/// these orders). Its orders must not be passed over as already consumed: the
/// service says so and consumes the partitions again from their beginning.
/// Rejected messages at the positions of letters recorded before the loss
/// (the first two of one partition, by their key) are recorded too.
#[tokio::test]
async fn broker_data_lost_while_postgres_kept_the_positions() {
    let (storage, broker, env, service) = on_own_broker(&[]).await;
    let orders = helpers::generated_orders(71, 80);
    let key = Some("rejected");
    env.produce(&[(key, b"{lost-1"), (key, b"{lost-2")]).await;
    helpers::produce_orders(&env, &orders[..60]).await;
    env.wait_for_committed(62, Duration::from_secs(60)).await;
    assert!(service.terminate().success());

    let broker = lose_data(&storage, broker, &env).await;
    env.produce(&[(key, b"{not json"), (key, b"[]")]).await;
    helpers::produce_orders(&env, &orders[60..]).await;

    let service = env.spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 80, Duration::from_secs(60))
        .await;
    env.wait_for_committed(22, Duration::from_secs(30)).await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("past the end of the partition").count(),
        PARTITIONS as usize,
        "{logs}"
    );
    assert_eq!(service.metric("orders_stored_total").await, 20.0, "{logs}");
    assert_eq!(env.dead_letters(2, Duration::from_secs(10)).len(), 2);
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE source_offset < 2")
            .await,
        4
    );

    // Started again, it resumes where it stopped on the new topic: nothing
    // consumed twice, no letter sent again.
    assert!(service.terminate().success());
    let service = env.spawn();
    service.wait_ready().await;
    env.produce(&[(None, b"{again")]).await;
    env.wait_for_committed(23, Duration::from_secs(30)).await;
    assert_eq!(env.dead_letters(3, Duration::from_secs(10)).len(), 3);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 5);
    let logs = service.log_text();
    assert!(!logs.contains("past the end"), "{logs}");
    drop(broker);
}

/// The broker loses its data while the service is stopped, and the new topic
/// grows past the positions PostgreSQL keeps before the service starts
/// again: no position is past the end, so only the message before each
/// position, read again and compared with the one consumed there, tells that
/// the messages below it are others. They must be consumed from the
/// beginning, not passed over; and once that is done, a restart compares the
/// right message again and consumes nothing twice.
#[tokio::test]
async fn broker_data_lost_and_the_new_topic_grown_past_the_positions() {
    let (storage, broker, env, service) = on_own_broker(&[]).await;
    let orders = helpers::generated_orders(75, 101);
    helpers::produce_orders(&env, &orders[..20]).await;
    env.wait_for_committed(20, Duration::from_secs(60)).await;
    assert!(service.terminate().success());

    let broker = lose_data(&storage, broker, &env).await;
    helpers::produce_orders(&env, &orders[20..100]).await;
    let service = env.spawn();
    env.wait_for_count("SELECT count(*) FROM orders", 100, Duration::from_secs(60))
        .await;
    env.wait_for_committed(80, Duration::from_secs(30)).await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("is not the one consumed there").count(),
        PARTITIONS as usize,
        "{logs}"
    );
    assert_eq!(service.metric("orders_stored_total").await, 80.0, "{logs}");
    env.assert_no_dead_letters();

    assert!(service.terminate().success());
    let service = env.spawn();
    service.wait_ready().await;
    helpers::produce_orders(&env, &orders[100..]).await;
    env.wait_for_committed(81, Duration::from_secs(30)).await;
    env.wait_for_count("SELECT count(*) FROM orders", 101, Duration::from_secs(30))
        .await;
    let logs = service.log_text();
    assert!(!logs.contains("not the one consumed"), "{logs}");
    assert_eq!(service.metric("orders_stored_total").await, 1.0, "{logs}");
    assert_eq!(
        service.metric("orders_duplicates_total").await,
        0.0,
        "{logs}"
    );
    drop(broker);
}

/// How a running service's broker loses the messages below its positions.
enum Loss {
    /// Its messages and groups lost: a rebalance comes first. (A wiped
    /// storage with the topics made again gives them new ids, and this
    /// broker's answer to a fetch by an old one kills the consumer inside
    /// librdkafka, as the README says; a restart then finds the loss, which
    /// `broker_data_lost_while_postgres_kept_the_positions` tests.)
    MessagesAndGroups,
    /// Its messages deleted, its topics and group kept: no rebalance, so only
    /// the partitions' ends, read while consuming, tell. (Deleting a topic
    /// under a live group stops this broker's storage for good, so the
    /// messages are deleted in its storage while it is stopped.)
    Messages,
}

/// The broker loses its messages while the service consumes: the positions
/// it holds, in memory and in PostgreSQL, are past the new ends, and the new
/// messages arrive below them. They must not be passed over as consumed (nor
/// dropped as already seen): the service finds the ends below its positions,
/// says so, and consumes the partitions again from their beginning, with no
/// restart.
async fn messages_lost_while_consumed(loss: Loss) {
    let (_storage, broker, env, service) = on_own_broker(&[]).await;
    let orders = helpers::generated_orders(74, 80);
    helpers::produce_orders(&env, &orders[..60]).await;
    env.wait_for_committed(60, Duration::from_secs(60)).await;
    let restart = match loss {
        Loss::MessagesAndGroups => Broker::restart_losing_messages_and_groups,
        Loss::Messages => Broker::restart_losing_messages,
    };
    let broker = tokio::task::spawn_blocking(move || restart(broker))
        .await
        .unwrap();
    let key = Some("rejected");
    env.produce(&[(key, b"{after the loss")]).await;
    helpers::produce_orders(&env, &orders[60..]).await;
    env.wait_for_count("SELECT count(*) FROM orders", 80, Duration::from_secs(90))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters WHERE payload_preview = '{after the loss'",
        1,
        Duration::from_secs(30),
    )
    .await;
    env.wait_for_committed(21, Duration::from_secs(30)).await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("past the end of the partition").count(),
        PARTITIONS as usize,
        "{logs}"
    );
    assert_eq!(service.metric("orders_stored_total").await, 80.0, "{logs}");
    drop(broker);
}

#[tokio::test]
async fn broker_data_lost_while_the_service_consumes() {
    messages_lost_while_consumed(Loss::MessagesAndGroups).await;
}

#[tokio::test]
async fn broker_messages_lost_under_a_live_group_while_the_service_consumes() {
    messages_lost_while_consumed(Loss::Messages).await;
}

/// Sends a rejected message and 20 orders, waits for them to be committed,
/// makes the broker lose its producers' state with its messages and groups,
/// then sends another rejected message and 20 more orders.
async fn producer_state_lost(env: &TestEnv, broker: Broker, seed: u64) -> Broker {
    let orders = helpers::generated_orders(seed, 40);
    let key = Some("rejected");
    env.produce(&[(key, b"{before the loss")]).await;
    helpers::produce_orders(env, &orders[..20]).await;
    env.wait_for_committed(21, Duration::from_secs(60)).await;
    let broker = tokio::task::spawn_blocking(move || broker.restart_losing_all_but_the_topics())
        .await
        .unwrap();
    env.produce(&[(key, b"{after the loss")]).await;
    helpers::produce_orders(env, &orders[20..]).await;
    broker
}

/// After [`producer_state_lost`]: every order stored, and one letter and
/// one record for the rejected message sent after the loss.
async fn assert_every_message_after_the_loss_accounted_for(env: &TestEnv) {
    env.wait_for_count("SELECT count(*) FROM orders", 40, Duration::from_secs(90))
        .await;
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters WHERE payload_preview = '{after the loss'",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(env.dead_letters(1, Duration::from_secs(10)).len(), 1);
}

/// The broker loses its producers' state while the service runs. The
/// dead-letter producer's recovery moves its id to a new epoch, which this
/// broker answers `UNKNOWN_PRODUCER_ID` for good (the README's local-broker
/// section): ingest pauses at the next rejected message, then starts a new
/// dead-letter producer and resumes by itself.
#[tokio::test]
async fn broker_producer_state_lost_while_the_service_consumes() {
    let (_storage, broker, env, service) = on_own_broker(&[]).await;
    let broker = producer_state_lost(&env, broker, 76).await;
    service
        .wait_for_log(
            "starting a new dead-letter producer",
            Duration::from_secs(90),
        )
        .await;
    assert_every_message_after_the_loss_accounted_for(&env).await;
    service.wait_ready().await;
    drop((service, broker));
}

/// The same loss, and the service killed while ingest is paused on it:
/// restarted the same way, it sends that letter under a new producer id and
/// resumes.
#[tokio::test]
async fn broker_producer_state_lost_then_the_service_restarted() {
    let (_storage, broker, env) = own_broker().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let service = spawn();
    service.wait_ready().await;
    let broker = producer_state_lost(&env, broker, 75).await;
    wait_paused_by(&service, "not acknowledged").await;
    service.kill();

    let service = spawn();
    assert_every_message_after_the_loss_accounted_for(&env).await;
    drop((service, broker));
}

/// The dead-letter position stored before the broker lost its data is past
/// the end of the new dead-letter topic. A crash between a letter sent there
/// and its record must not send it again: the letters are read back from the
/// new topic's beginning, not from the old position (which would find none).
#[tokio::test]
async fn a_letter_sent_after_the_broker_lost_its_data_is_not_sent_again_after_a_crash() {
    let (storage, broker, env) = own_broker().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let spawn = || env.spawn_with(&[("HTTP_ADDR", addr.as_str())]);
    let service = spawn();
    service.wait_ready().await;
    let key = Some("rejected");
    env.produce(&[(key, b"{lost-1"), (key, b"{lost-2"), (key, b"{lost-3")])
        .await;
    env.wait_for_committed(3, Duration::from_secs(60)).await;
    assert!(service.terminate().success());
    let stale = "SELECT max(dlq_next_offset) FROM consumer_offsets";
    assert_eq!(env.count(stale).await, 3);

    let broker = lose_data(&storage, broker, &env).await;
    let role = &env.service_role;
    env.execute(&format!("REVOKE INSERT ON dead_letters FROM {role}"))
        .await;
    let service = spawn();
    service.wait_ready().await;
    env.produce(&[(key, b"{after-the-loss")]).await;
    wait_paused_by(&service, "permission denied for table dead_letters").await;
    assert_eq!(env.dead_letters(1, Duration::from_secs(10)).len(), 1);
    service.kill();

    env.execute(&format!("GRANT INSERT ON dead_letters TO {role}"))
        .await;
    let service = spawn();
    env.wait_for_count(
        "SELECT count(*) FROM dead_letters WHERE payload_preview = '{after-the-loss'",
        1,
        Duration::from_secs(60),
    )
    .await;
    let letters = env.dead_letters(1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1, "not sent again: {letters:#?}");
    let logs = service.log_text();
    assert!(
        logs.contains("dead-letter position stored in PostgreSQL is past the end"),
        "{logs}"
    );
    drop(broker);
}

/// Records the broker deleted for its retention before the group read them
/// can be neither stored nor dead-lettered. The service must not pass over
/// them in silence: on the assignment it logs the partition and the offsets
/// once, counts them, and goes on with what follows. The group stopped at
/// offset 10; offsets 0 to 29 carry a timestamp older than the topic's
/// retention and are deleted, offset 30 is recent and stays.
#[tokio::test]
async fn records_expired_before_they_were_consumed_are_reported() {
    let storage = tempfile::tempdir().unwrap();
    let port = free_port();
    let broker = Broker::start_with_storage(
        storage.path().to_owned(),
        port,
        "sqlite://tansu.db?maintenance_interval=1s",
    );
    let brokers = format!("127.0.0.1:{port}");
    let env = TestEnv::on_broker(brokers.clone(), 1).await;
    let topic = format!("{}-retained", env.topic);
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let retained = NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", "600000");
    for result in admin
        .create_topics(&[retained], &AdminOptions::new())
        .await
        .unwrap()
    {
        result.expect("topic created");
    }
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 10)",
    )
    .bind(&env.group)
    .bind(&topic)
    .execute(&env.db)
    .await
    .unwrap();
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    for (i, (uid, order)) in helpers::generated_orders(7, 31).iter().enumerate() {
        let old = i < 30;
        let record = FutureRecord::to(&topic)
            .key(uid)
            .payload(order)
            .timestamp(if old { now - 3_600_000 } else { now });
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("acknowledged");
    }
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (low, _) = consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(5))
            .unwrap();
        if low == 30 {
            break;
        }
        assert!(Instant::now() < deadline, "retention never ran: low {low}");
        pause(Duration::from_millis(500)).await;
    }

    let service = env.spawn_with(&[("KAFKA_TOPIC", topic.as_str())]);
    service.wait_ready().await;
    env.wait_for_count("SELECT count(*) FROM orders", 1, Duration::from_secs(30))
        .await;
    let metrics = service.get("/metrics").await.text().await.unwrap();
    assert_eq!(sum_of(&metrics, "orders_messages_expired_total"), 20.0);
    let logs = service.log_text();
    let reports: Vec<Value> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("messages expired"))
        })
        .collect();
    assert_eq!(reports.len(), 1, "{logs}");
    assert_eq!(
        (&reports[0]["from"], &reports[0]["to"], &reports[0]["count"]),
        (&Value::from(10), &Value::from(30), &Value::from(20)),
        "{logs}"
    );
    drop(broker);
}

/// Freezes the broker (SIGSTOP) and waits until `/readyz` names it.
async fn freeze_until_named(broker: &Broker, service: &Service) {
    broker.signal("STOP");
    service
        .wait_unready("the broker did not answer", ("kafka_broker", "slow"))
        .await;
}

/// A broker that stops answering without going away, as one wedged behind a
/// long storage call: `/readyz` names it and the service logs it once, ingest
/// waits, and once the broker answers again everything is reconciled. It is
/// thawed as soon as it is named, inside the group's session timeout: the
/// local broker does not give a member that timed out its partitions back
/// (see the README).
#[tokio::test]
async fn broker_frozen_then_thawed() {
    let (_storage, broker, env, service) = on_own_broker(&[]).await;
    let mut seed = Seed::new("(j)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    freeze_until_named(&broker, &service).await;
    broker.signal("CONT");
    let delivered = stream.finish().await;
    service.wait_ready().await;
    reconcile(
        &env,
        "(j) broker frozen",
        delivered,
        &service,
        Some(&service),
    )
    .await;
    // One line on entering and one on leaving each slow spell (a long stream
    // can make the local broker slow again on its own).
    let logs = service.log_text();
    let (slow, again) = (
        logs.matches("the broker is slow").count(),
        logs.matches("the broker answers in time again").count(),
    );
    assert!(
        again >= 1 && (again..=again + 1).contains(&slow),
        "{slow} slow, {again} recovered:\n{logs}"
    );
    assert!(slow <= 3, "logged per probe, not per spell:\n{logs}");
    drop(broker);
}

/// The broker frozen for 35 s, as a broker host that swaps: longer than a
/// producer's message would once wait (30 s for the producer, 15 s for
/// letters), inside a session timeout raised for it (the local broker does
/// not give a group whose coordinator froze past the session timeout its
/// partitions back; see the README). Producers must wait, not give up: an
/// idempotent producer whose message times out renumbers its messages under
/// a new epoch, which the local broker cannot follow (its storage task
/// panics and it fails every later request), and a message resent after a
/// timeout may be stored twice. After the thaw everything is reconciled.
#[tokio::test]
async fn broker_frozen_past_the_producers_patience() {
    let frozen = Duration::from_secs(setting("FAULT_BROKER_FREEZE_SECS", 35));
    let session = (frozen.as_millis() * 2 + 10_000).to_string();
    let (_storage, broker, env, service) =
        on_own_broker(&[("KAFKA_SESSION_TIMEOUT_MS", session.as_str())]).await;
    let mut seed = Seed::new("(l)");
    let stream = Stream::start(&env, seed.value);
    pause(seed.random_point(0.5)).await;
    broker.signal("STOP");
    pause(frozen).await;
    broker.signal("CONT");
    let delivered = stream.finish().await;
    service.wait_ready().await;
    let scenario = format!("(l) broker frozen {} s", frozen.as_secs());
    reconcile(&env, &scenario, delivered, &service, Some(&service)).await;
    // Letters in flight at the freeze wait past the commit's patience, but
    // their producer id never moves: the producer is kept, not replaced.
    let logs = service.log_text();
    assert!(
        !logs.contains("starting a new dead-letter producer"),
        "{logs}"
    );
    drop(broker);
}

/// SIGTERM while every call to the broker hangs (seeks, reads of the
/// dead-letter topic, leaving the group): the service still exits, cleanly,
/// within SHUTDOWN_TIMEOUT_MS and the bound on leaving the group.
#[tokio::test]
async fn sigterm_with_the_broker_frozen_exits_within_the_bound() {
    let (_storage, broker, _env, service) = on_own_broker(&[("SHUTDOWN_TIMEOUT_MS", "3000")]).await;
    freeze_until_named(&broker, &service).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || service.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    broker.signal("CONT");
    assert!(status.success(), "{status:?}");
    // SHUTDOWN_TIMEOUT_MS, then at most 3 s to leave the group, then exit.
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

/// SIGTERM with a batch in hand while the broker drops every connection at
/// once, as tansu does once its storage has failed: the consumer's close,
/// which has no bound of its own, never hears from the group's coordinator
/// (it held the exit for 45 s here, and once for good), and the service still
/// exits, cleanly, within the bound.
#[tokio::test]
async fn sigterm_with_every_broker_connection_dropped_exits_within_the_bound() {
    let (_storage, broker, env) = own_broker().await;
    let proxy = TcpProxy::start(format!("127.0.0.1:{}", broker.port)).await;
    let advertised = proxy.port;
    let _broker = tokio::task::spawn_blocking(move || broker.restart_advertising(advertised))
        .await
        .unwrap();
    let brokers = format!("127.0.0.1:{advertised}");
    let service = env.spawn_with(&[
        ("KAFKA_BROKERS", brokers.as_str()),
        ("SHUTDOWN_TIMEOUT_MS", "3000"),
        ("INGEST_BATCH_LINGER_MS", "60000"),
        ("INGEST_BATCH_SIZE", "100000"),
    ]);
    service.wait_ready().await;
    helpers::produce_orders(&env, &helpers::generated_orders(31, 5)).await;
    helpers::eventually(
        Duration::from_secs(60),
        || async { (service.metric("orders_messages_consumed_total").await >= 5.0).then_some(()) },
        || "never consumed".into(),
    )
    .await;
    proxy.cut();
    service
        .wait_for_log("Disconnected", Duration::from_secs(30))
        .await;
    // SHUTDOWN_TIMEOUT_MS, at most 3 s to leave the group and 10 s to close.
    tokio::task::spawn_blocking(move || service.terminate_within(Duration::from_secs(20)))
        .await
        .unwrap();
    // The batch in hand was committed: PostgreSQL was there.
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 5);
}

/// A group whose rebalance never completes is named in the log, not waited
/// on in silence. On the local broker: its leader killed, another member
/// joining (Apache Kafka would expire the leader and assign). The stack's
/// remedy, a broker restart that forgets the groups' membership, ends it.
#[tokio::test]
async fn a_rebalance_that_never_completes_is_reported_and_a_stack_restart_ends_it() {
    let timeout = [("KAFKA_SESSION_TIMEOUT_MS", "6000")];
    // A broker of its own: the stuck group stays in its storage for good.
    let (_storage, broker, env, leader) = on_own_broker(&timeout).await;
    leader.kill();
    let other = env.spawn_with(&timeout);
    other
        .wait_for_log(
            "no partition assignment since joining the group",
            Duration::from_secs(60),
        )
        .await;
    let ready = other.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["kafka_assignment"], "waiting");
    let broker = broker.restart_forgetting_groups();
    other
        .wait_for_log(
            "the group assigned partitions at last",
            Duration::from_secs(90),
        )
        .await;
    other.wait_ready().await;
    drop(broker);
}

/// The broker's disk full: it still hands out what it holds, but cannot
/// take the letters of the bad messages among them (nor, on the local broker,
/// the group's join). Nothing is dead-lettered or recorded for the fault, the
/// instance is not ready, and librdkafka's retries are not logged one line
/// each; once space is freed every message is stored or dead-lettered, once.
#[tokio::test]
async fn broker_disk_full_then_space_freed() {
    let disk = SmallDisk::mount(64 << 20, None);
    let broker = Broker::start(disk.path().to_owned(), free_port());
    let env = TestEnv::on_broker(format!("127.0.0.1:{}", broker.port), PARTITIONS).await;
    let orders = helpers::generated_orders(23, 200);
    helpers::produce_orders(&env, &orders).await;
    let bad: Vec<String> = (0..20).map(|i| format!("{{bad-{i}")).collect();
    let bad: Vec<(Option<&str>, &[u8])> = bad.iter().map(|b| (None, b.as_bytes())).collect();
    env.produce(&bad).await;
    disk.fill();

    let service = env.spawn();
    pause(env_outage()).await;
    assert_eq!(service.get("/readyz").await.status(), 503);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    let logs = service.log_text();
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for line in logs.lines().filter(|l| l.contains("\"librdkafka: ")) {
        let message = line.split("\"message\":").nth(1).unwrap_or(line);
        *lines.entry(message).or_default() += 1;
    }
    assert!(
        lines.values().all(|&n| n == 1),
        "a line logged again within the minute: {lines:#?}"
    );

    disk.resize(64 << 20);
    env.wait_for_committed(220, Duration::from_secs(90)).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 200);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 20);
    let letters = env.dead_letters(20, Duration::from_secs(10));
    let sources: HashSet<(i32, i64)> = letters.iter().map(Record::source).collect();
    assert_eq!((letters.len(), sources.len()), (20, 20), "{letters:#?}");
    drop(broker);
}
