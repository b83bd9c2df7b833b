use std::collections::HashMap;
use std::time::{Duration, Instant};

use order_service::producer::{Generator, InvalidKind};

use crate::helpers::{
    eventually, generated_orders, produce_orders, sample_with_uid, store_orders, Service, TcpProxy,
    TestEnv,
};

const COUNT_ORDERS: &str = "SELECT count(*) FROM orders";

/// An order the database itself refuses (a constraint a DBA added): its
/// batch is written order by order to find it, it alone is dead-lettered at
/// the `store` stage with the database's reason, and the rest are stored.
#[tokio::test]
async fn an_order_the_database_refuses_is_dead_lettered_alone() {
    let env = TestEnv::new().await;
    env.execute("ALTER TABLE deliveries ADD CONSTRAINT no_refused CHECK (name <> 'Refused')")
        .await;
    let service = env.spawn_with(&[("INGEST_BATCH_LINGER_MS", "200")]);
    service.wait_ready().await;
    let mut orders = generated_orders(68, 10);
    let mut refused: serde_json::Value = serde_json::from_slice(&orders[4].1).unwrap();
    refused["delivery"]["name"] = "Refused".into();
    orders[4].1 = refused.to_string().into_bytes();
    produce_orders(&env, &orders).await;

    let letters = env.dead_letters(1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].header("dlq-stage"), "store");
    assert!(
        letters[0].header("dlq-reason").contains("23514"),
        "{letters:#?}"
    );
    assert_eq!(letters[0].key.as_deref(), Some(orders[4].0.as_str()));
    env.wait_for_committed(10, Duration::from_secs(30)).await;
    assert_eq!(env.count(COUNT_ORDERS).await, 9);
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM orders WHERE order_uid = '{}'",
            orders[4].0
        ))
        .await,
        0
    );
}

/// Tables no order fits any more, as a DBA's change can leave them: a column
/// narrowed (SQLSTATE 22001), then a constraint the sample order breaks
/// (23514). The sample is refused too, so the environment is at fault:
/// ingest pauses naming it and dead-letters nothing; once mended, every order
/// is stored.
#[tokio::test]
async fn tables_that_refuse_every_order_pause_ingest_and_dead_letter_nothing() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let faults = [
        (
            "ALTER TABLE orders ALTER COLUMN track_number TYPE varchar(4)",
            "ALTER TABLE orders ALTER COLUMN track_number TYPE text",
            "(22001)",
        ),
        (
            "ALTER TABLE payments ADD CONSTRAINT rubles_only CHECK (currency = 'RUB') NOT VALID",
            "ALTER TABLE payments DROP CONSTRAINT rubles_only",
            "(23514)",
        ),
    ];
    let orders = generated_orders(69, 20);
    for (round, (break_, mend, code)) in faults.into_iter().enumerate() {
        env.execute(break_).await;
        produce_orders(&env, &orders[round * 10..][..10]).await;
        let cause = "refuses the sample order too";
        service.wait_unready(cause, ("ingest", "paused")).await;
        assert!(
            service.log_text().contains(code),
            "the database's reason is given: {}",
            service.log_text()
        );
        env.execute(mend).await;
        let stored = 10 * (round as i64 + 1);
        env.wait_for_count(COUNT_ORDERS, stored, Duration::from_secs(30))
            .await;
        env.wait_for_committed(stored, Duration::from_secs(30))
            .await;
    }
    env.assert_no_dead_letters();
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

/// Producers compress as they like: batches in each codec are read and
/// stored like plain ones. (snappy is left out: the local broker resets the
/// connection of any fetch that meets a snappy batch; see the README.)
#[tokio::test]
async fn batches_in_every_compression_codec_are_read() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let orders = generated_orders(66, 100);
    let codecs = ["none", "gzip", "lz4", "zstd"];
    for (codec, chunk) in codecs.iter().zip(orders.chunks(25)) {
        let messages: Vec<(Option<&str>, &[u8])> = chunk
            .iter()
            .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
            .collect();
        env.produce_with(
            &[("compression.type", codec), ("linger.ms", "50")],
            &messages,
        )
        .await;
    }
    env.wait_for_count(COUNT_ORDERS, 100, Duration::from_secs(30))
        .await;
    env.wait_for_committed(100, Duration::from_secs(30)).await;
    env.assert_no_dead_letters();
}

/// A tombstone (a key with no value at all, as compacted topics carry) is
/// not an order: it is dead-lettered as empty with its key, its position is
/// committed, and the orders around it are stored.
#[tokio::test]
async fn a_tombstone_is_dead_lettered_as_empty() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let orders = generated_orders(70, 2);
    produce_orders(&env, &orders[..1]).await;
    env.produce_tombstone("deleted-key").await;
    produce_orders(&env, &orders[1..]).await;

    let letters = env.dead_letters(1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1, "{}", service.log_text());
    let letter = &letters[0];
    assert_eq!(letter.header("dlq-stage"), "parse");
    assert_eq!(letter.reasons(), ["message is empty"]);
    assert_eq!(letter.key.as_deref(), Some("deleted-key"));
    assert!(letter.payload.is_empty());
    env.wait_for_count(COUNT_ORDERS, 2, Duration::from_secs(30))
        .await;
    env.wait_for_committed(3, Duration::from_secs(30)).await;
    let (key, payload_bytes): (Vec<u8>, i64) =
        sqlx::query_as("SELECT message_key, payload_bytes FROM dead_letters")
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!((key.as_slice(), payload_bytes), (&b"deleted-key"[..], 0));
    assert_eq!(service.metric("ingest_consumer_paused").await, 0.0);
}

/// Every kind of message at once: each ends stored, absorbed as a duplicate,
/// or in the dead-letter topic with its reason and origin.
#[tokio::test]
async fn every_message_is_stored_absorbed_or_dead_lettered() {
    let env = TestEnv::new().await;
    let service = env.spawn_with(&[("MAX_MESSAGE_BYTES", "8192")]);
    service.wait_ready().await;

    let valid = generated_orders(11, 20);
    let mut generator = Generator::new(12, 5);
    let invalid: Vec<(InvalidKind, Vec<u8>)> = InvalidKind::ALL
        .iter()
        .map(|&kind| (kind, generator.invalid(kind).to_string().into_bytes()))
        .collect();
    let malformed: Vec<(&[u8], &str)> = vec![
        (b"", "message is empty"),
        (
            b"\xc3\x28 not utf-8",
            "not valid UTF-8 (first bad byte at 0)",
        ),
        (
            b"hello, world",
            "not JSON: expected value at line 1 column 1",
        ),
        (
            b"{\"order_uid\": \"abc\"",
            "truncated JSON: input ends at line 1 column 19",
        ),
        (b"[1, 2, 3]", "expected a JSON object, found an array"),
    ];
    let too_large = vec![b' '; 9000];
    let mut conflicting = serde_json::from_slice::<serde_json::Value>(&valid[0].1).unwrap();
    conflicting["customer_id"] = "someone-else".into();
    let conflicting = conflicting.to_string().into_bytes();

    produce_orders(&env, &valid).await;
    env.wait_for_count(COUNT_ORDERS, 20, Duration::from_secs(30))
        .await;
    let mut rest: Vec<(Option<&str>, &[u8])> = Vec::new();
    for (uid, bytes) in &valid[..3] {
        rest.push((Some(uid), bytes));
    }
    for (_, bytes) in &invalid {
        rest.push((Some("invalid-key"), bytes));
    }
    for (bytes, _) in &malformed {
        rest.push((None, bytes));
    }
    rest.push((Some("big"), &too_large));
    rest.push((Some(valid[0].0.as_str()), &conflicting));
    env.produce(&rest).await;

    let letters = env.dead_letters(22, Duration::from_secs(30));
    assert_eq!(letters.len(), 22, "{letters:#?}");
    assert_eq!(env.count(COUNT_ORDERS).await, 20);
    assert_eq!(env.count("SELECT count(*) FROM deliveries").await, 20);
    assert_eq!(env.count("SELECT count(*) FROM payments").await, 20);

    let by_stage = letters
        .iter()
        .fold(HashMap::new(), |mut m: HashMap<&str, usize>, l| {
            *m.entry(l.header("dlq-stage")).or_default() += 1;
            m
        });
    assert_eq!(
        by_stage,
        HashMap::from([
            ("validate", 15),
            ("parse", 5),
            ("too_large", 1),
            ("conflict", 1)
        ])
    );
    for letter in &letters {
        assert_eq!(letter.header("dlq-source-topic"), env.topic);
        assert!(letter.header("dlq-source-partition").parse::<i32>().is_ok());
        assert!(letter.header("dlq-source-offset").parse::<i64>().is_ok());
        assert!(chrono::DateTime::parse_from_rfc3339(letter.header("dlq-time")).is_ok());
        assert!(!letter.reasons().is_empty());
    }
    for (kind, bytes) in &invalid {
        let letter = letters
            .iter()
            .find(|l| &l.payload == bytes)
            .expect("dead letter with the original bytes");
        assert_eq!(letter.key.as_deref(), Some("invalid-key"));
        assert_eq!(letter.reasons().len(), 1);
        assert!(
            letter.reasons()[0].starts_with(&format!("{}: ", kind.field())),
            "{kind:?}: {:?}",
            letter.reasons()
        );
    }
    for (bytes, reason) in &malformed {
        let letter = letters
            .iter()
            .find(|l| l.payload == *bytes && l.header("dlq-stage") == "parse")
            .expect("malformed dead letter");
        assert_eq!(letter.reasons(), [reason.to_string()]);
        assert_eq!(letter.key, None);
    }
    let big = letters
        .iter()
        .find(|l| l.header("dlq-stage") == "too_large")
        .unwrap();
    assert_eq!(big.reasons(), ["message is 9000 bytes, the limit is 8192"]);
    assert!(big.payload.is_empty(), "the original stays at its offset");
    assert_eq!(big.header("dlq-payload-omitted-bytes"), "9000");
    let conflict = letters
        .iter()
        .find(|l| l.header("dlq-stage") == "conflict")
        .unwrap();
    assert_eq!(
        conflict.payload, conflicting,
        "the original bytes, not a re-serialization"
    );
    assert_eq!(conflict.key.as_deref(), Some(valid[0].0.as_str()));
    assert_eq!(
        conflict.reasons(),
        ["conflict: order_uid already stored with different content"]
    );

    // The stored order was not overwritten by the conflicting one.
    let served = service
        .wait_for_order(&valid[0].0, Duration::from_secs(5))
        .await;
    assert_eq!(
        served,
        serde_json::from_slice::<serde_json::Value>(&valid[0].1).unwrap()
    );

    assert_eq!(service.metric("orders_stored_total").await, 20.0);
    assert_eq!(service.metric("orders_duplicates_total").await, 3.0);
    assert_eq!(
        service.metric("orders_messages_consumed_total").await,
        20.0 + 3.0 + 15.0 + 5.0 + 1.0 + 1.0
    );
    assert_eq!(
        service
            .metric("orders_dead_letters_total{stage=\"validate\"}")
            .await,
        15.0
    );
}

/// Offsets live in PostgreSQL: when the stored offsets are wound back, the
/// whole topic is delivered again and nothing is stored twice.
#[tokio::test]
async fn redelivered_orders_are_absorbed_as_duplicates() {
    let env = TestEnv::new().await;
    env.stored_beforehand(21, 50).await;

    sqlx::query("UPDATE consumer_offsets SET next_offset = 0")
        .execute(&env.db)
        .await
        .unwrap();
    let service = env.spawn();
    service.wait_ready().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while service.metric("orders_duplicates_total").await < 50.0 {
        assert!(
            Instant::now() < deadline,
            "redelivery not absorbed:\n{}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(service.metric("orders_duplicates_total").await, 50.0);
    assert_eq!(service.metric("orders_stored_total").await, 0.0);
    assert_eq!(env.count(COUNT_ORDERS).await, 50);
    assert_eq!(
        env.count("SELECT sum(next_offset)::bigint FROM consumer_offsets")
            .await,
        50
    );
    env.assert_no_dead_letters();
}

/// The broker hears the offsets of stored orders too (librdkafka commits
/// them once a second), so lag tools read the group's progress there;
/// PostgreSQL stays the source of truth.
#[tokio::test]
async fn the_group_commits_what_is_stored_on_the_broker() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    store_orders(&env, &generated_orders(31, 200)).await;
    env.wait_for_committed(200, Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(15),
        || async { (env.committed_on_broker(4).await == 200).then_some(()) },
        || {
            format!(
                "the broker never held the 200 offsets:\n{}",
                service.log_text()
            )
        },
    )
    .await;
}

/// Two instances share the partitions; one joins mid-stream, then the first
/// leaves. Every order is stored exactly once and either instance serves any.
#[tokio::test]
async fn two_consumers_share_a_group_through_rebalances() {
    let env = TestEnv::new().await;
    let orders = generated_orders(41, 1200);
    let first = env.spawn();
    first.wait_ready().await;
    produce_orders(&env, &orders[..400]).await;
    let second = env.spawn();
    produce_orders(&env, &orders[400..800]).await;
    second.wait_ready().await;
    env.wait_for_count(COUNT_ORDERS, 800, Duration::from_secs(60))
        .await;
    let first_member = member_name(&first);
    assert!(first.terminate().success());
    produce_orders(&env, &orders[800..]).await;
    env.wait_for_count(COUNT_ORDERS, 1200, Duration::from_secs(60))
        .await;

    assert!(
        second.log_text().contains("partitions assigned"),
        "the second instance never got partitions"
    );
    // Two instances on one host join under different default member names.
    let second_member = member_name(&second);
    assert!(
        first_member.is_some() && second_member.is_some() && first_member != second_member,
        "{first_member:?} {second_member:?}"
    );
    // Their names take the port, and these listen on any free one: a restart
    // would not find its name again, so each says what to set.
    let logs = second.log_text();
    assert!(
        logs.contains("set KAFKA_GROUP_INSTANCE_ID to keep one"),
        "{logs}"
    );
    // The survivor serves orders it did not ingest.
    for (uid, bytes) in orders.iter().step_by(97) {
        let served = second.wait_for_order(uid, Duration::from_secs(5)).await;
        assert_eq!(
            served,
            serde_json::from_slice::<serde_json::Value>(bytes).unwrap()
        );
    }
    assert_eq!(
        env.count("SELECT sum(next_offset)::bigint FROM consumer_offsets")
            .await,
        1200
    );
    env.assert_no_dead_letters();
}

/// PostgreSQL goes away mid-stream: ingest pauses, reports not ready, and
/// resumes by itself when it returns, with exact counts.
#[tokio::test]
async fn a_database_outage_pauses_ingest_and_loses_nothing() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[
            ("INGEST_MAX_BACKOFF_MS", "500"),
            ("CACHE_WARMUP_ORDERS", "0"),
        ])
        .await;
    service.wait_ready().await;
    let orders = generated_orders(51, 400);
    produce_orders(&env, &orders[..200]).await;
    env.wait_for_count(COUNT_ORDERS, 200, Duration::from_secs(30))
        .await;

    proxy.cut();
    produce_orders(&env, &orders[200..]).await;
    // The readiness probe of PostgreSQL can see the outage before ingest
    // tries to commit the new messages and pauses: wait for both.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = service.get("/readyz").await;
        if ready.status() == 503 {
            let body: serde_json::Value = ready.json().await.unwrap();
            if body["checks"]["ingest"] == "paused" {
                assert_eq!(body["checks"]["postgres"], "down");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never reported paused:\n{}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.count(COUNT_ORDERS).await,
        200,
        "nothing is written while the database is away"
    );
    assert_eq!(service.metric("ingest_consumer_paused").await, 1.0);

    proxy.restore();
    env.wait_for_count(COUNT_ORDERS, 400, Duration::from_secs(30))
        .await;
    service.wait_ready().await;
    assert_eq!(
        env.count("SELECT sum(next_offset)::bigint FROM consumer_offsets")
            .await,
        400
    );
    assert_eq!(service.metric("ingest_consumer_paused").await, 0.0);
    let logs = service.log_text();
    assert_eq!(
        logs.matches("ingest paused").count(),
        1,
        "logged once per state change:\n{logs}"
    );
    env.assert_no_dead_letters();
}

/// The dead-letter topic missing (not created yet, or a wrong name): ingest
/// cannot set a rejected message aside, so it pauses and `/readyz` names the
/// topic; nothing is stored past it or sent anywhere else. Once the topic
/// exists, ingest resumes by itself and every message is accounted for.
#[tokio::test]
async fn a_missing_dead_letter_topic_pauses_ingest_until_it_exists() {
    let env = TestEnv::new().await;
    let late = format!("{}.late", env.dlq_topic);
    let service = env.spawn_with(&[
        ("KAFKA_DLQ_TOPIC", late.as_str()),
        ("INGEST_MAX_BACKOFF_MS", "500"),
    ]);
    let orders = generated_orders(61, 100);
    produce_orders(&env, &orders).await;
    env.produce(&[(None, b"not an order".as_slice())]).await;
    let cause = format!("dead-letter topic {late}: ");
    service.wait_unready(&cause, ("ingest", "paused")).await;
    assert_eq!(env.count(COUNT_ORDERS).await, 0);

    env.create_topic(&late, 1).await;
    env.wait_for_count(COUNT_ORDERS, 100, Duration::from_secs(60))
        .await;
    env.wait_for_committed(101, Duration::from_secs(30)).await;
    service.wait_ready().await;
    let letters = env.read_topic(&late, 1);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].payload, b"not an order");
    assert!(letters[0].headers.contains_key("dlq-reason"), "{letters:?}");
    env.assert_no_dead_letters();
    assert_eq!(service.metric("ingest_consumer_paused").await, 0.0);
}

/// The orders topic missing when the service starts (created after it, as
/// by a deployment that starts everything at once): `/readyz` and the log
/// name the topic, and once it exists it is consumed without a restart.
#[tokio::test]
async fn an_orders_topic_created_after_the_start_is_named_then_consumed() {
    let mut env = TestEnv::new().await;
    env.topic = format!("{}.late", env.topic);
    let service = env.spawn();
    let cause = format!("topic {} does not exist", env.topic);
    service
        .wait_unready(&cause, ("kafka_topic", "missing"))
        .await;
    env.create_topic(&env.topic, 4).await;
    let orders = generated_orders(62, 50);
    produce_orders(&env, &orders).await;
    // Seconds with the metadata refresh set; librdkafka's default would take five minutes.
    env.wait_for_count(COUNT_ORDERS, 50, Duration::from_secs(60))
        .await;
    service.wait_ready().await;
    let logs = service.log_text();
    assert_eq!(
        logs.matches("the orders topic does not exist").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("the orders topic exists now"), "{logs}");
    assert!(
        !logs.contains("no partition assignment since joining"),
        "{logs}"
    );
}

/// A lock held on the orders table (a DBA's `LOCK TABLE`, a long `ALTER
/// TABLE`): the batch's write gives up at its lock timeout instead of hanging
/// without a word, ingest pauses and `/readyz` names the wait; once the lock
/// is gone it resumes by itself, and nothing is dead-lettered.
#[tokio::test]
async fn a_locked_table_pauses_ingest_until_the_lock_is_gone() {
    let env = TestEnv::new().await;
    let service = env.spawn_with(&[("INGEST_MAX_BACKOFF_MS", "500")]);
    service.wait_ready().await;
    let lock = env.lock_table("orders").await;
    let orders = generated_orders(63, 100);
    produce_orders(&env, &orders).await;
    service
        .wait_unready("lock timeout", ("ingest", "paused"))
        .await;
    lock.rollback().await.unwrap();
    env.wait_for_count(COUNT_ORDERS, 100, Duration::from_secs(30))
        .await;
    env.wait_for_committed(100, Duration::from_secs(30)).await;
    service.wait_ready().await;
    let logs = service.log_text();
    assert_eq!(logs.matches("ingest paused").count(), 1, "{logs}");
    assert!(logs.contains("ingest resumed"), "{logs}");
    env.assert_no_dead_letters();
}

/// PostgreSQL gone without a word (its host lost, a network that drops
/// packets): sessions get no answer and no error, ever. A write waits
/// INGEST_WRITE_TIMEOUT_MS, then ingest pauses naming it and retries on new
/// sessions; once the database answers again everything is stored, with
/// nothing dead-lettered.
#[tokio::test]
async fn a_database_that_stops_answering_pauses_ingest_and_loses_nothing() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[
            ("INGEST_WRITE_TIMEOUT_MS", "2000"),
            ("INGEST_MAX_BACKOFF_MS", "500"),
            // One session, so the write is the one that meets the silence (no
            // readiness probe takes it first); the abandoned one must not keep
            // its place either, or nothing could go on.
            ("DATABASE_MAX_CONNECTIONS", "1"),
        ])
        .await;
    service.wait_ready().await;
    let orders = generated_orders(64, 200);
    produce_orders(&env, &orders[..100]).await;
    env.wait_for_count(COUNT_ORDERS, 100, Duration::from_secs(30))
        .await;
    // The next write meets the silence, not the release of the last one: the
    // pool pings a session given back (sqlx, without a bound after our own
    // bounded ping), and a silence falling between the two would hold the
    // pool's one place for as long as this proxy holds the connection.
    service.wait_pool_idle().await;

    proxy.silence();
    produce_orders(&env, &orders[100..]).await;
    service
        .wait_for_log("no answer within 2000 ms", Duration::from_secs(30))
        .await;
    service.wait_unready("database", ("ingest", "paused")).await;
    proxy.restore();
    env.wait_for_count(COUNT_ORDERS, 200, Duration::from_secs(30))
        .await;
    env.wait_for_committed(200, Duration::from_secs(30)).await;
    service.wait_ready().await;
    assert!(service.log_text().contains("ingest resumed"));
    env.assert_no_dead_letters();
}

/// A batch's write abandoned in the middle of its statement (it waited on a
/// lock when PostgreSQL fell silent): its session does not keep its place in
/// the pool for as long as the server stays silent, so with a pool of one
/// ingest resumes once the database answers again, storing everything once.
#[tokio::test]
async fn a_write_abandoned_mid_statement_gives_its_session_back() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[
            // Below the lock timeout (5 s), above the test's reaction to the wait.
            ("INGEST_WRITE_TIMEOUT_MS", "3000"),
            ("INGEST_MAX_BACKOFF_MS", "500"),
            ("DATABASE_MAX_CONNECTIONS", "1"),
        ])
        .await;
    service.wait_ready().await;
    let lock = env.lock_table("orders").await;
    let orders = generated_orders(67, 100);
    produce_orders(&env, &orders).await;
    env.wait_for_lock_waiters(1).await;
    proxy.silence();
    lock.rollback().await.unwrap();
    service
        .wait_for_log("no answer within 3000 ms", Duration::from_secs(30))
        .await;

    proxy.restore();
    env.wait_for_count(COUNT_ORDERS, 100, Duration::from_secs(30))
        .await;
    env.wait_for_committed(100, Duration::from_secs(30)).await;
    service.wait_ready().await;
    assert_eq!(service.metric("orders_stored_total").await, 100.0);
    env.assert_no_dead_letters();
}

/// The answer to a batch's COMMIT is lost (the connection drops once the
/// server has it): the commit landed, unseen. Ingest pauses, writes the batch
/// again and finds its orders stored by that very transaction: each counts as
/// stored once, a real re-send in the batch as a duplicate, and the letter is
/// neither sent nor recorded twice.
#[tokio::test]
async fn a_commit_whose_answer_is_lost_counts_each_order_once() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[("INGEST_MAX_BACKOFF_MS", "500")])
        .await;
    service.wait_ready().await;
    proxy.lose_next_commit_answer();
    let orders = generated_orders(65, 100);
    let mut messages: Vec<(Option<&str>, &[u8])> = orders
        .iter()
        .map(|(uid, bytes)| (Some(uid.as_str()), bytes.as_slice()))
        .collect();
    messages.push((Some(orders[0].0.as_str()), orders[0].1.as_slice()));
    messages.push((None, b"{not json"));
    env.produce(&messages).await;
    // The positions are stored with the lost commit: only the retry tells.
    service
        .wait_for_log("ingest resumed", Duration::from_secs(30))
        .await;
    env.wait_for_committed(102, Duration::from_secs(30)).await;

    assert_eq!(proxy.commits_caught(), 1);
    let logs = service.log_text();
    assert!(logs.contains("ingest paused"), "{logs}");
    assert_eq!(env.count(COUNT_ORDERS).await, 100);
    assert_eq!(service.metric("orders_stored_total").await, 100.0, "{logs}");
    assert_eq!(
        service.metric("orders_duplicates_total").await,
        1.0,
        "{logs}"
    );
    assert_eq!(
        service
            .metric("orders_dead_letters_total{stage=\"parse\"}")
            .await,
        1.0,
        "{logs}"
    );
    assert_eq!(env.dead_letters(1, Duration::from_secs(10)).len(), 1);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 1);
}

/// A batch's COMMIT lost on its way (a network partition): the server keeps
/// that transaction open, with the locks on its orders, and ingest gets no
/// answer. Ingest gives up on it after INGEST_WRITE_TIMEOUT_MS and so does the
/// server (the service's sessions end a transaction left idle that long), so
/// the retry is not held for good behind the abandoned transaction's locks.
#[tokio::test]
async fn a_commit_lost_on_its_way_does_not_hold_ingest_behind_its_locks() {
    let env = TestEnv::new().await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[
            ("INGEST_WRITE_TIMEOUT_MS", "3000"),
            ("INGEST_MAX_BACKOFF_MS", "500"),
        ])
        .await;
    service.wait_ready().await;
    proxy.withhold_next_commit();
    let orders = generated_orders(66, 100);
    produce_orders(&env, &orders).await;
    env.wait_for_committed(100, Duration::from_secs(60)).await;

    assert_eq!(proxy.commits_caught(), 1);
    let logs = service.log_text();
    assert!(logs.contains("no answer within 3000 ms"), "{logs}");
    assert_eq!(env.count(COUNT_ORDERS).await, 100);
    assert_eq!(service.metric("orders_stored_total").await, 100.0, "{logs}");
    assert_eq!(
        service.metric("orders_duplicates_total").await,
        0.0,
        "{logs}"
    );
    env.assert_no_dead_letters();
}

/// A service that has consumed one order and holds it in a batch that only a
/// stop writes (its linger is a minute).
async fn holding_one_unwritten_order(env: &TestEnv, uid: &str) -> Service {
    let service = env.spawn_with(&[
        ("INGEST_BATCH_LINGER_MS", "60000"),
        ("INGEST_BATCH_SIZE", "100000"),
    ]);
    service.wait_ready().await;
    let order = sample_with_uid(uid).to_string();
    env.produce(&[(Some(uid), order.as_bytes())]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while service.metric("orders_messages_consumed_total").await < 1.0 {
        assert!(Instant::now() < deadline, "message never consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.count(COUNT_ORDERS).await, 0);
    service
}

/// SIGTERM: the batch in hand is committed, the group is left, exit 0 promptly.
#[tokio::test]
async fn sigterm_commits_and_exits_cleanly() {
    let env = TestEnv::new().await;
    let service = holding_one_unwritten_order(&env, "graceful-1").await;
    service.terminate_within(Duration::from_secs(10));
    assert_eq!(env.count(COUNT_ORDERS).await, 1);
}

/// A hang-up (the terminal `serve` runs in closed) stops it as SIGTERM does,
/// the batch in hand committed; started under `nohup`, it keeps running.
#[tokio::test]
async fn a_hang_up_stops_gracefully_unless_started_under_nohup() {
    let env = TestEnv::new().await;
    let service = holding_one_unwritten_order(&env, "hang-up-1").await;
    let logs = service.logs.clone();
    let status = service.stop_with("HUP");
    assert!(status.success(), "{status:?}");
    assert_eq!(env.count(COUNT_ORDERS).await, 1);
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.contains("SIGHUP received; stopping"), "{logs}");

    let kept = Service::spawn_under_nohup(env.service_env());
    kept.wait_ready().await;
    kept.signal("HUP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(kept.get("/healthz").await.status(), 200);
    assert!(
        !kept.log_text().contains("received; stopping"),
        "{}",
        kept.log_text()
    );
    assert!(kept.terminate().success());
}

/// A batch is written once its messages reach INGEST_BATCH_MAX_BYTES, however
/// few they are and however long its linger: large orders cannot pile up.
#[tokio::test]
async fn a_batch_is_written_when_its_bytes_reach_the_bound() {
    let env = TestEnv::new().await;
    let orders = generated_orders(31, 40);
    produce_orders(&env, &orders).await;
    let service = env.spawn_with(&[
        ("INGEST_BATCH_LINGER_MS", "60000"),
        ("INGEST_BATCH_SIZE", "100000"),
        // Every message reaches it: one message per batch.
        ("INGEST_BATCH_MAX_BYTES", "1"),
    ]);
    env.wait_for_count(COUNT_ORDERS, 40, Duration::from_secs(30))
        .await;
    // Counted just after its commit.
    let deadline = Instant::now() + Duration::from_secs(5);
    while service.metric("ingest_batch_messages_count").await < 40.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(service.metric("ingest_batch_messages_count").await, 40.0);
    assert_eq!(service.metric("ingest_batch_messages_sum").await, 40.0);
}

/// A crash after dead letters were acknowledged but before their batch was
/// committed: the restarted instance finds them in the dead-letter topic and
/// does not send them again.
#[tokio::test]
async fn dead_letters_of_an_interrupted_batch_are_not_sent_twice() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::start(env.postgres_addr()).await;
    let via_proxy = env.service_url_via(&proxy);
    // One static member name for both runs: the local broker never expires a
    // killed member, so only a restart under its name gets the partitions back.
    // All six in one batch, however the broker splits its fetches: a batch
    // that cannot be committed holds back the next one and its letters.
    let settings = [
        ("DATABASE_URL", via_proxy.as_str()),
        ("KAFKA_GROUP_INSTANCE_ID", "only"),
        ("INGEST_BATCH_SIZE", "6"),
        ("INGEST_BATCH_LINGER_MS", "60000"),
    ];
    let service = env.spawn_with(&settings);
    service.wait_ready().await;
    proxy.cut();
    let broken: Vec<Vec<u8>> = (0..6)
        .map(|i| format!("not an order #{i}").into_bytes())
        .collect();
    let messages: Vec<(Option<&str>, &[u8])> =
        broken.iter().map(|b| (None, b.as_slice())).collect();
    env.produce(&messages).await;
    // Sent while PostgreSQL is away; the batch cannot be committed.
    assert_eq!(env.dead_letters(6, Duration::from_secs(30)).len(), 6);
    service.kill();

    proxy.restore();
    let restarted = env.spawn_with(&settings);
    env.wait_for_committed(6, Duration::from_secs(30)).await;
    let letters = env.dead_letters(6, Duration::from_secs(5));
    assert_eq!(letters.len(), 6, "{letters:?}");
    let logs = restarted.log_text();
    assert!(logs.contains("will not be sent again"), "{logs}");
    // A name given is kept whatever the port: nothing to warn of.
    assert!(!logs.contains("KAFKA_GROUP_INSTANCE_ID"), "{logs}");
}

/// Reads the dead-letter topic to its end: it must hold nothing.
/// SIGTERM while ingest is paused by its environment (here a revoked
/// grant): the process exits 0 within the shutdown bound, dead-letters
/// nothing, and a restart stores every order once the grant is back.
#[tokio::test]
async fn sigterm_while_paused_exits_within_the_bound() {
    let env = TestEnv::new().await;
    let addr = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let settings = [
        ("HTTP_ADDR", addr.as_str()),
        ("SHUTDOWN_TIMEOUT_MS", "3000"),
    ];
    let service = env.spawn_with(&settings);
    service.wait_ready().await;
    env.execute(&format!(
        "REVOKE INSERT ON orders FROM {}",
        env.service_role
    ))
    .await;
    let orders = generated_orders(61, 50);
    produce_orders(&env, &orders).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while service.metric("ingest_consumer_paused").await != 1.0 {
        assert!(Instant::now() < deadline, "{}", service.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(
        ready["problems"][0],
        "ingest paused: database: permission denied for table orders (42501)"
    );

    // The bound, plus the time to leave the group and exit.
    service.terminate_within(Duration::from_secs(6));

    env.execute(&format!("GRANT INSERT ON orders TO {}", env.service_role))
        .await;
    let restarted = env.spawn_with(&settings);
    env.wait_for_count(COUNT_ORDERS, 50, Duration::from_secs(30))
        .await;
    restarted.wait_ready().await;
    env.assert_no_dead_letters();
}

/// A member killed for good keeps its partitions on the local broker (on
/// Apache Kafka, for the session timeout): an instance that holds no
/// partition names the ones whose messages nobody consumes, in `/readyz`
/// and in one log line.
#[tokio::test]
async fn an_instance_holding_nothing_names_partitions_nobody_consumes() {
    let env = TestEnv::with_partitions(1).await;
    let first = env.spawn();
    first.wait_ready().await;
    let second = env.spawn();
    second.wait_ready().await;
    // Kill the one that holds the partition, once the group has settled.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (holder, second) = loop {
        match (holds_partition_0(&first), holds_partition_0(&second)) {
            (Some(true), Some(false)) => break (first, second),
            (Some(false), Some(true)) => break (second, first),
            _ => {}
        }
        assert!(Instant::now() < deadline, "the group never settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    holder.kill();
    produce_orders(&env, &generated_orders(81, 10)).await;
    // The default session timeout (45 s), then a check every few seconds.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = second.get("/readyz").await;
        let body: serde_json::Value = r.json().await.unwrap();
        let named = body["problems"].as_array().unwrap().iter().any(|p| {
            p.as_str()
                .unwrap()
                .starts_with("kafka: partitions [0] have messages")
        });
        if named {
            break;
        }
        assert!(Instant::now() < deadline, "{body}\n{}", second.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = second.log_text();
    assert_eq!(
        logs.matches("partitions have messages that no live member consumes")
            .count(),
        1,
        "{logs}"
    );
}

/// Whether the instance's latest assignment, as it logged it, holds
/// partition 0; `None` before any.
fn holds_partition_0(service: &crate::helpers::Service) -> Option<bool> {
    let logs = service.logs.lock().unwrap();
    logs.iter().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        match v["message"].as_str()? {
            "partitions assigned" => Some(v["partitions"] == "[0]"),
            "partitions revoked" => Some(false),
            _ => None,
        }
    })
}

/// Every owned partition stores a dead-letter position that keeps up with
/// the topic, busy or idle, so a restart reads back only what came after
/// the last commit, however many letters the topic holds.
#[tokio::test]
async fn dead_letter_positions_keep_up_on_every_partition() {
    let env = TestEnv::new().await;
    let service = env.spawn();
    service.wait_ready().await;
    let broken: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("not an order #{i}").into_bytes())
        .collect();
    // One key: every broken message lands on one partition; the others idle.
    let messages: Vec<(Option<&str>, &[u8])> = broken
        .iter()
        .map(|b| (Some("same-key"), b.as_slice()))
        .collect();
    env.produce(&messages).await;
    let orders = generated_orders(91, 20);
    store_orders(&env, &orders).await;
    let letters = env.read_topic(&env.dlq_topic, 1).len() as i64;
    assert_eq!(letters, 40);
    env.wait_for_count(
        "SELECT count(*) FILTER (WHERE dlq_next_offset = 40) FROM consumer_offsets",
        4,
        Duration::from_secs(30),
    )
    .await;
}

/// The group member name the instance logged at start.
fn member_name(service: &crate::helpers::Service) -> Option<String> {
    service.logs.lock().unwrap().iter().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v["member"].as_str().map(str::to_owned)
    })
}
