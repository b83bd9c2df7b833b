//! Two batches written at once: the second stores its orders beside the
//! first but commits only after it, is rolled back when the first is not
//! committed, and is not written beside a batch that holds one of its orders.
//! A transaction of the test's own holds an order's row, so the first batch
//! waits on it for as long as the test needs.

use std::time::Duration;

use order_service::configuration::Settings;
use order_service::domain::{parse_order, Limits};
use order_service::store::{BatchTx, Incoming, Store};

use crate::helpers::{admin, eventually, generated_orders, produce_orders, TestEnv};

/// Whole batches of 20 only: the backlog of 40 makes two.
const SETTINGS: [(&str, &str); 2] = [
    ("INGEST_BATCH_SIZE", "20"),
    ("INGEST_BATCH_LINGER_MS", "60000"),
];

/// Inserts `order` in a transaction left open, as the owner role: a batch
/// holding the same id waits for it to end.
async fn hold(env: &TestEnv, order: &[u8]) -> BatchTx {
    let order = parse_order(order, &Limits::default()).unwrap();
    let store = Store::connect_lazy(
        admin().database(&env.name),
        1,
        Duration::from_secs(5),
        Settings::default().write_timeout(),
    );
    let mut tx = store.begin().await.unwrap();
    let held = Incoming {
        json: order.to_json().into(),
        order,
        partition: 0,
        offset: 0,
    };
    tx.insert_orders("held", &[held]).await.unwrap();
    tx
}

/// The service's sessions: (waiting for a lock, in a transaction but idle).
/// Asked as the service role: another role does not see their state.
async fn service_sessions(env: &TestEnv) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), \
                count(*) FILTER (WHERE state = 'idle in transaction') \
         FROM pg_stat_activity WHERE datname = current_database() \
         AND usename = current_user AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut env.service_session().await)
    .await
    .unwrap()
}

/// The first batch waits on a held order while the second is written behind
/// it: nothing is committed, not even the second batch's offsets. The held
/// order then lands with other content, so the first batch refuses its copy
/// as a conflict; the second, rolled back, is written again after it.
#[tokio::test]
async fn a_batch_behind_one_not_committed_waits_then_is_written_again() {
    let env = TestEnv::with_partitions(1).await;
    let orders = generated_orders(91, 40);
    produce_orders(&env, &orders).await;
    let mut held: serde_json::Value = serde_json::from_slice(&orders[5].1).unwrap();
    held["entry"] = "HELD".into();
    let tx = hold(&env, held.to_string().as_bytes()).await;
    let service = env.spawn_with(&SETTINGS);

    eventually(
        Duration::from_secs(30),
        || async { (service_sessions(&env).await == (1, 1)).then_some(()) },
        || "the first batch never waited while the second was written".into(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.count("SELECT count(*) FROM consumer_offsets").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);

    tx.commit().await.unwrap();
    env.wait_for_committed(40, Duration::from_secs(30)).await;
    let letters = env.dead_letters(1, Duration::from_secs(10));
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].header("dlq-stage"), "conflict");
    assert_eq!(letters[0].key.as_deref(), Some(orders[5].0.as_str()));
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 40);
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE entry = 'HELD'")
            .await,
        1
    );
    assert_eq!(service.metric("orders_stored_total").await, 39.0);
    assert_eq!(service.metric("orders_duplicates_total").await, 0.0);
}

/// The same order in both batches (a producer's repeat): the second batch is
/// not written beside the first, whose copy of it comes later than the
/// order the first waits on, so the two never wait on each other. Once the
/// held order lands (the same as the first batch's copy), both commit at
/// once and both repeats are absorbed.
#[tokio::test]
async fn batches_sharing_an_order_are_written_one_after_the_other() {
    let env = TestEnv::with_partitions(1).await;
    let mut orders = generated_orders(92, 40);
    orders[20] = orders[19].clone();
    produce_orders(&env, &orders).await;
    let tx = hold(&env, &orders[0].1).await;
    let service = env.spawn_with(&SETTINGS);

    eventually(
        Duration::from_secs(30),
        || async { (service_sessions(&env).await.0 == 1).then_some(()) },
        || "the first batch never waited on the held order".into(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(service_sessions(&env).await, (1, 0));

    tx.commit().await.unwrap();
    env.wait_for_committed(40, Duration::from_secs(10)).await;
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 39);
    assert_eq!(service.metric("orders_stored_total").await, 38.0);
    assert_eq!(service.metric("orders_duplicates_total").await, 2.0);
    let log = service.log_text();
    assert!(!log.contains("ingest paused"), "{log}");
    env.assert_no_dead_letters();
}
