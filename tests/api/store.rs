//! The write path against PostgreSQL: what a batch stores, what it finds
//! already stored, and what happens when another writer or the database
//! itself gets in the way.

use std::str::FromStr;
use std::time::Duration;

use order_service::configuration::Settings;
use order_service::domain::{parse_order, Limits};
use order_service::ingest::dead_letter::digest;
use order_service::store::{classify, ErrorClass, Incoming, InsertOutcome, NewLetter, Store};
use sqlx::postgres::PgConnectOptions;

use crate::helpers::{sample_with_uid, TestEnv};

fn store(env: &TestEnv) -> Store {
    Store::connect_lazy(
        PgConnectOptions::from_str(&env.service_url).unwrap(),
        2,
        Duration::from_secs(5),
        Settings::default().write_timeout(),
    )
}

fn incoming(order: &serde_json::Value, offset: i64) -> Incoming {
    let order = parse_order(order.to_string().as_bytes(), &Limits::default())
        .unwrap_or_else(|e| panic!("the test's order must be valid: {e:?}"));
    Incoming {
        json: order.to_json().into(),
        order,
        partition: 0,
        offset,
    }
}

async fn write(store: &Store, batch: &[Incoming]) -> Result<InsertOutcome, sqlx::Error> {
    let mut tx = store.begin().await?;
    let outcome = tx.insert_orders("orders", batch).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Text that needs quoting in every format PostgreSQL reads rows in.
fn awkward(uid: &str) -> serde_json::Value {
    let mut order = sample_with_uid(uid);
    order["delivery"]["name"] = r#"Anna "Nan" O'Neil, \N"#.into();
    order["delivery"]["address"] = r"C:\path\to\door, 3\t".into();
    order["items"][0]["name"] = "Größe ½ — \"XL\", ,,".into();
    order["internal_signature"] = "".into();
    order
}

#[tokio::test]
async fn a_batch_stores_new_orders_exactly_and_sorts_out_the_rest() {
    let env = TestEnv::new().await;
    let store = store(&env);
    let stored_same = sample_with_uid("storedsame01");
    let stored_other = sample_with_uid("storedother1");
    write(
        &store,
        &[incoming(&stored_same, 0), incoming(&stored_other, 1)],
    )
    .await
    .unwrap();

    let mut changed = stored_other.clone();
    changed["customer_id"] = "someone-else".into();
    let awkward = awkward("awkwardtext1");
    let batch = [
        incoming(&sample_with_uid("newone000001"), 2),
        incoming(&stored_same, 3),
        incoming(&changed, 4),
        incoming(&awkward, 5),
        incoming(&sample_with_uid("newone000001"), 6),
    ];
    let outcome = write(&store, &batch).await.unwrap();
    assert_eq!(
        outcome,
        InsertOutcome {
            stored: vec![0, 3],
            duplicates: vec![1, 4],
            conflicts: vec![2],
        }
    );

    // Every text comes back byte for byte, and no empty text became NULL.
    let (document, name, address, signature): (String, String, String, String) = sqlx::query_as(
        "SELECT o.document, d.name, d.address, o.internal_signature
         FROM orders o JOIN deliveries d USING (order_uid) WHERE order_uid = 'awkwardtext1'",
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(document.as_bytes(), &batch[3].json[..]);
    assert_eq!(name, awkward["delivery"]["name"]);
    assert_eq!(address, awkward["delivery"]["address"]);
    assert_eq!(signature, "");
    let item: String = sqlx::query_scalar(
        "SELECT name FROM items WHERE order_uid = 'awkwardtext1' AND position = 0",
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(item, awkward["items"][0]["name"]);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM payments WHERE order_uid IN ('newone000001', 'awkwardtext1')"
        )
        .await,
        2
    );
    // The conflicting copy did not overwrite what was stored.
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE order_uid = 'storedother1' AND customer_id = 'someone-else'")
            .await,
        0
    );
}

/// Another writer (an instance that took over the partition) stores one of the
/// batch's orders after the batch looked for it and before it is written: the
/// batch's fast write fails on that row, and the order is still classified
/// (duplicate or conflict) while the rest is stored.
#[tokio::test]
async fn an_order_stored_meanwhile_by_another_writer_is_classified_and_the_rest_stored() {
    let env = TestEnv::new().await;
    let store = store(&env);
    let raced = sample_with_uid("racedorder01");
    let mut raced_other = sample_with_uid("racedorder02");
    let batch = [
        incoming(&sample_with_uid("calmorder001"), 0),
        incoming(&raced, 1),
        incoming(&raced_other, 2),
    ];
    raced_other["customer_id"] = "someone-else".into();

    // The other writer holds both rows uncommitted, so the batch cannot see
    // them when it looks, and its write waits on them.
    let other = Store::connect_lazy(
        PgConnectOptions::from_str(&env.service_url).unwrap(),
        1,
        Duration::from_secs(5),
        Settings::default().write_timeout(),
    );
    let mut other_tx = other.begin().await.unwrap();
    other_tx
        .insert_orders(
            "orders",
            &[incoming(&raced, 10), incoming(&raced_other, 11)],
        )
        .await
        .unwrap();
    let writing = tokio::spawn(async move { write(&store, &batch).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writing.is_finished(),
        "the batch waits on the other writer's rows"
    );
    other_tx.commit().await.unwrap();

    let outcome = writing.await.unwrap().unwrap();
    assert_eq!(
        outcome,
        InsertOutcome {
            stored: vec![0],
            duplicates: vec![1],
            conflicts: vec![2],
        }
    );
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 3);
    assert_eq!(env.count("SELECT count(*) FROM deliveries").await, 3);
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE customer_id = 'someone-else'")
            .await,
        1
    );
}

/// A row the database itself refuses is the order's data: the error says so,
/// whichever write path met it, and nothing of the batch is kept.
#[tokio::test]
async fn a_row_the_database_refuses_is_the_orders_fault() {
    let env = TestEnv::new().await;
    env.execute("ALTER TABLE deliveries ADD CONSTRAINT no_refused CHECK (name <> 'Refused')")
        .await;
    let store = store(&env);
    let mut refused = sample_with_uid("refused00001");
    refused["delivery"]["name"] = "Refused".into();
    let error = write(
        &store,
        &[
            incoming(&sample_with_uid("fine00000001"), 0),
            incoming(&refused, 1),
        ],
    )
    .await
    .expect_err("the database refuses the row");
    assert!(
        matches!(classify(&error), ErrorClass::OrderData { .. }),
        "{error}"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);

    let outcome = write(&store, &[incoming(&sample_with_uid("fine00000001"), 0)])
        .await
        .unwrap();
    assert_eq!(outcome.stored, vec![0]);
}

/// A letter is recorded once per message, however many consumer groups read
/// it; a new message at the position of a recorded one (the topic was created
/// again and numbers from 0 again) gets a record of its own, and the position
/// names the newest.
#[tokio::test]
async fn each_message_at_a_position_is_recorded_once() {
    fn letter<'a>(payload: &'a [u8], digest: &'a [u8], reasons: &'a [String]) -> NewLetter<'a> {
        NewLetter {
            partition: 0,
            offset: 5,
            key: None,
            order_uid: None,
            stage: "parse",
            reasons,
            payload_bytes: payload.len(),
            preview: payload,
            digest,
            replay_of: None,
        }
    }
    let env = TestEnv::new().await;
    let store = store(&env);
    let reasons = ["not JSON".to_owned()];
    let (before, after) = (digest(b"{before"), digest(b"{after"));
    for letter in [
        letter(b"{before", &before, &reasons),
        // Another group reads the same message.
        letter(b"{before", &before, &reasons),
        // The topic created again: another message at the same position.
        letter(b"{after", &after, &reasons),
    ] {
        let mut tx = store.begin().await.unwrap();
        tx.record_dead_letters("orders", &[letter]).await.unwrap();
        tx.commit().await.unwrap();
    }
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE source_offset = 5")
            .await,
        2
    );
    let newest = store.dead_letter("orders", 0, 5).await.unwrap().unwrap();
    assert_eq!(newest.payload_preview, b"{after");
}

/// A migration that needs a table's lock while a long transaction holds it
/// waits for it at most 2 s at a time: between its tries the reads and writes
/// queued behind it go on (the service's among them), and it is applied once
/// the transaction ends.
#[tokio::test]
async fn a_migration_waiting_for_a_lock_never_holds_the_table_up_for_long() {
    let env = TestEnv::unmigrated().await;
    let mut earlier = sqlx::migrate!("./migrations");
    let last = earlier.migrations.len() - 1;
    earlier.migrations = earlier.migrations[..last].to_vec().into();
    earlier
        .run(&env.db)
        .await
        .expect("every migration but the last");
    const APPLIED: &str = "SELECT count(*) FROM information_schema.columns
         WHERE table_name = 'consumer_offsets' AND column_name = 'last_digest'";
    assert_eq!(env.count(APPLIED).await, 0, "the last migration adds it");
    // The last migration alters consumer_offsets, which this transaction has read.
    let mut holder = env.db.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM consumer_offsets")
        .execute(&mut *holder)
        .await
        .unwrap();

    let reads_meanwhile = async {
        let mut reader = env.db.acquire().await.unwrap();
        sqlx::query("SET statement_timeout = '10s'")
            .execute(&mut *reader)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..5 {
            sqlx::query("SELECT count(*) FROM consumer_offsets")
                .execute(&mut *reader)
                .await
                .expect("a read behind the waiting migration is never held past 10 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let applied: i64 = sqlx::query_scalar(APPLIED)
            .fetch_one(&mut *reader)
            .await
            .unwrap();
        assert_eq!(applied, 0, "applied while its lock was held");
        holder.commit().await.unwrap();
    };
    let (migrated, ()) = tokio::join!(env.try_migrate(), reads_meanwhile);
    migrated.expect("migrate, once the lock is free");
    assert_eq!(env.count(APPLIED).await, 1);
}
