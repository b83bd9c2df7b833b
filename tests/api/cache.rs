//! The tiers behind `GET /order/{uid}`: memory, Redis and PostgreSQL, the
//! warm-up from PostgreSQL, and Redis away, full, read-only or refusing writes.

use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};

use crate::helpers::{generated_orders, redis_url, store_orders, Service, TcpProxy, TestEnv};
use crate::http::{assert_serves, counter};

fn prefix() -> String {
    format!("test-{}:", Alphanumeric.sample_string(&mut rand::rng(), 10))
}

/// Memory, then Redis, then PostgreSQL: each tier answers when the ones above
/// it cannot, and fills them on the way back.
#[tokio::test]
async fn reads_fall_through_the_tiers() {
    let env = TestEnv::new().await;
    let key_prefix = prefix();
    let redis = [
        ("REDIS_URL", redis_url()),
        ("REDIS_KEY_PREFIX", key_prefix.clone()),
    ];
    let orders = generated_orders(71, 30);
    // A memory budget of a few orders: most are evicted from memory but stay in Redis.
    let small: Vec<(&str, &str)> = redis
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([("CACHE_MAX_BYTES", "20000"), ("CACHE_WARMUP_ORDERS", "0")])
        .collect();
    let service = env.spawn_with(&small);
    service.wait_ready().await;
    wait_redis_up(&service).await;
    store_orders(&env, &orders).await;
    wait_in_redis(&key_prefix, orders.len()).await;

    // Some orders were evicted from memory; Redis answers for them and
    // memory is filled on the way back. The memory tier's admission (its
    // budget, this small, is split among shards) may still turn a large order
    // away, so at least one of them must come from memory the next time.
    let (mut from_redis, mut refilled) = (0, 0);
    for (uid, bytes) in &orders {
        let redis_hits = counter(&service, "redis", "hit").await;
        assert_serves(&service, uid, bytes).await;
        if counter(&service, "redis", "hit").await == redis_hits {
            continue;
        }
        from_redis += 1;
        let memory_hits = counter(&service, "memory", "hit").await;
        assert_eq!(service.get(&format!("/order/{uid}")).await.status(), 200);
        if counter(&service, "memory", "hit").await == memory_hits + 1.0 {
            refilled += 1;
        }
    }
    assert!(
        from_redis > 0,
        "an order evicted from memory is served by Redis"
    );
    assert!(
        refilled > 0,
        "filled L1 on the way back ({from_redis} from Redis)"
    );
    assert_eq!(counter(&service, "postgres", "hit").await, 0.0);
    assert!(service.terminate().success());

    // Both caches cold (a new Redis prefix, no warm-up): PostgreSQL answers.
    let cold = env.spawn_with(&[
        ("REDIS_URL", &redis_url()),
        ("REDIS_KEY_PREFIX", &prefix()),
        ("CACHE_WARMUP_ORDERS", "0"),
    ]);
    cold.wait_ready().await;
    wait_redis_up(&cold).await;
    assert_serves(&cold, &orders[1].0, &orders[1].1).await;
    assert_eq!(counter(&cold, "memory", "miss").await, 1.0);
    assert_eq!(counter(&cold, "redis", "miss").await, 1.0);
    assert_eq!(counter(&cold, "postgres", "hit").await, 1.0);
    let missing = cold.get("/order/not-anywhere").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(counter(&cold, "postgres", "miss").await, 1.0);
}

/// Redis may be shared: what it holds under an order's key and is not that
/// order (a value cut short, another order, a key of another type) is never
/// served. PostgreSQL answers, the key is put right, and Redis stays up.
#[tokio::test]
async fn what_redis_holds_under_an_order_key_is_checked_before_it_is_served() {
    let env = TestEnv::new().await;
    let orders = env.stored_beforehand(91, 3).await;

    let key_prefix = prefix();
    let key = |uid: &str| format!("{key_prefix}order:{uid}");
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (cut_short, anothers) = (&orders[0].1[..20], &orders[2].1);
    for (uid, value) in [
        (&orders[0].0, cut_short),
        (&orders[1].0, anothers.as_slice()),
    ] {
        redis::cmd("SET")
            .arg(key(uid))
            .arg(value)
            .arg("EX")
            .arg(300)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    let hash = key(&orders[2].0);
    redis::cmd("HSET")
        .arg(&hash)
        .arg("field")
        .arg("value")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    redis::cmd("EXPIRE")
        .arg(&hash)
        .arg(300)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();

    let service = env.spawn_with(&[
        ("REDIS_URL", &redis_url()),
        ("REDIS_KEY_PREFIX", &key_prefix),
        ("CACHE_WARMUP_ORDERS", "0"),
    ]);
    service.wait_ready().await;
    wait_redis_up(&service).await;
    for (uid, bytes) in &orders {
        assert_serves(&service, uid, bytes).await;
    }
    assert_eq!(counter(&service, "redis", "unusable").await, 3.0);
    assert_eq!(counter(&service, "redis", "hit").await, 0.0);
    assert_eq!(counter(&service, "postgres", "hit").await, 3.0);
    let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "up", "{ready}");

    // Each key now holds its order (written behind the answer).
    for (uid, bytes) in &orders {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let held: Option<Vec<u8>> = redis::cmd("GET")
                .arg(key(uid))
                .query_async(&mut conn)
                .await
                .unwrap_or(None);
            let held = held.and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok());
            if held == Some(serde_json::from_slice(bytes).unwrap()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{uid}: {held:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// After a restart, the most recent orders are served from memory at once.
#[tokio::test]
async fn warm_up_loads_the_most_recent_orders() {
    let env = TestEnv::new().await;
    env.stored_beforehand(81, 40).await;

    let service = env.spawn_with(&[("CACHE_WARMUP_ORDERS", "25")]);
    service.wait_ready().await;
    let ready = service.readiness_after_warmup().await;
    assert_eq!(
        ready["warmup"],
        serde_json::json!({"target": 25, "loaded": 25, "done": true})
    );
    assert_eq!(service.metric("cache_warmup_loaded_orders").await, 25.0);
    assert_eq!(service.metric("cache_entries").await, 25.0);
    let recent: Vec<String> =
        sqlx::query_scalar("SELECT order_uid FROM orders ORDER BY ingest_seq DESC LIMIT 25")
            .fetch_all(&env.db)
            .await
            .unwrap();
    for uid in &recent {
        assert_eq!(service.get(&format!("/order/{uid}")).await.status(), 200);
    }
    assert_eq!(counter(&service, "memory", "hit").await, 25.0);
    assert_eq!(counter(&service, "postgres", "hit").await, 0.0);
}

/// An instance started while PostgreSQL is away warms its cache once it
/// comes back: the warm-up waits for it, and says so once.
#[tokio::test]
async fn warm_up_waits_for_postgres_away_at_the_start() {
    let env = TestEnv::new().await;
    env.stored_beforehand(82, 30).await;

    let proxy = TcpProxy::start(env.postgres_addr()).await;
    proxy.cut();
    let service = env.spawn_with(&[("DATABASE_URL", &env.service_url_via(&proxy))]);
    service
        .wait_for_log("warm-up waits for PostgreSQL", Duration::from_secs(30))
        .await;
    let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["warmup"]["done"], false, "{ready}");
    // A read that needs PostgreSQL meanwhile says it is away, and when to ask again.
    let search = service.get("/api/orders?customer_id=nobody").await;
    assert_eq!(search.status(), 503);
    assert_eq!(search.headers()["retry-after"], "1");

    proxy.restore();
    let ready = service.readiness_after_warmup().await;
    assert_eq!(
        ready["warmup"],
        serde_json::json!({"target": 100000, "loaded": 30, "done": true})
    );
    assert_eq!(service.metric("cache_entries").await, 30.0);
    let logs = service.log_text();
    assert_eq!(
        logs.matches("warm-up waits for PostgreSQL").count(),
        1,
        "{logs}"
    );
    assert!(logs.contains("warm-up goes on"), "{logs}");
}

/// SELECT on the orders table revoked from the service role (a DBA's slip):
/// PostgreSQL answers but will not hand over the orders it holds. The
/// instance is unready and says why, a miss answers 503, and the warm-up
/// waits; all of it ends once the grant is back, without a restart.
#[tokio::test]
async fn orders_the_database_will_not_hand_over_make_the_instance_unready() {
    let env = TestEnv::new().await;
    let orders = env.stored_beforehand(83, 5).await;
    let role = &env.service_role;
    env.execute(&format!("REVOKE SELECT ON orders FROM {role}"))
        .await;

    let service = env.spawn();
    service
        .wait_unready("permission denied for table orders", ("postgres", "down"))
        .await;
    let miss = service.get(&format!("/order/{}", orders[0].0)).await;
    assert_eq!(miss.status(), 503);
    assert_eq!(miss.headers()["retry-after"], "1");
    // The log says why, once per line, with the SQLSTATE (the line may
    // follow the readiness that already tells it).
    let cause = "database: permission denied for table orders (42501)";
    service.wait_for_log(cause, Duration::from_secs(10)).await;
    let logs = service.log_text();
    assert!(!logs.contains("orders: permission denied"), "{logs}");

    env.execute(&format!("GRANT SELECT ON orders TO {role}"))
        .await;
    service.wait_ready().await;
    let ready = service.readiness_after_warmup().await;
    assert_eq!(ready["warmup"]["loaded"], 5, "{ready}");
    for (uid, bytes) in &orders {
        assert_serves(&service, uid, bytes).await;
    }
}

/// PostgreSQL falls silent while a warm-up page is on its way (the query
/// waited on a lock): the page is given up at INGEST_WRITE_TIMEOUT_MS and
/// asked for again, so the warm-up finishes once the database answers.
#[tokio::test]
async fn warm_up_goes_on_after_the_database_fell_silent_mid_page() {
    let env = TestEnv::new().await;
    env.stored_beforehand(83, 30).await;

    let lock = env.lock_table("orders").await;
    let (proxy, service) = env
        .spawn_behind_proxy(&[("INGEST_WRITE_TIMEOUT_MS", "2000")])
        .await;
    env.wait_for_lock_waiters(1).await;
    proxy.silence();
    lock.rollback().await.unwrap();
    service
        .wait_for_log("warm-up waits for PostgreSQL", Duration::from_secs(30))
        .await;

    proxy.restore();
    let ready = service.readiness_after_warmup().await;
    assert_eq!(
        ready["warmup"],
        serde_json::json!({"target": 100000, "loaded": 30, "done": true})
    );
    assert_eq!(service.metric("cache_entries").await, 30.0);
}

/// Redis going away fails no request; readiness shows it; it comes back by itself.
#[tokio::test]
async fn redis_outage_fails_no_request() {
    redis_away_fails_no_request(TcpProxy::cut).await;
}

/// The same with a Redis that falls silent (connections open, nothing
/// answers, as when its host is lost): requests still answer at once, and
/// the tier comes back on new connections, not the silent ones.
#[tokio::test]
async fn redis_falling_silent_fails_no_request() {
    redis_away_fails_no_request(TcpProxy::silence).await;
}

async fn redis_away_fails_no_request(away: fn(&TcpProxy)) {
    let env = TestEnv::new().await;
    let (proxy, redis_url) = TcpProxy::to_redis().await;
    let service = env.spawn_with(&[
        ("REDIS_URL", &redis_url),
        ("REDIS_KEY_PREFIX", &prefix()),
        ("CACHE_MAX_BYTES", "4000"),
    ]);
    service.wait_ready().await;
    wait_redis_up(&service).await;
    let orders = generated_orders(91, 10);
    store_orders(&env, &orders).await;

    away(&proxy);
    for (uid, bytes) in &orders {
        assert_serves(&service, uid, bytes).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
        if ready["checks"]["redis"] == "down" {
            assert_eq!(
                ready["status"], "ready",
                "Redis never makes the service unready"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Redis outage never reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.restore();
    wait_redis_up(&service).await;
    let logs = service.log_text();
    assert_eq!(logs.matches("redis is unreachable").count(), 1, "{logs}");
}

async fn wait_redis_up(service: &Service) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
        if ready["checks"]["redis"] == "up" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Redis never up: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis writes are asynchronous: waits until `n` orders are under `prefix`.
async fn wait_in_redis(prefix: &str, n: usize) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}order:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if keys.len() == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} orders in Redis",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis of the test's own, so that what it is made to refuse touches no
/// other test.
struct OwnRedis {
    server: std::process::Child,
    url: String,
    /// The test's own connection, opened once for every command it sends.
    conn: redis::aio::MultiplexedConnection,
}

impl OwnRedis {
    async fn start() -> Self {
        use std::os::unix::process::CommandExt;
        let port = crate::helpers::free_port();
        let server = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/stack installs it)");
        crate::helpers::wait_listening(port, Duration::from_secs(10), || {
            "the test's Redis never listened".into()
        });
        let url = format!("redis://127.0.0.1:{port}/");
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self { server, url, conn }
    }

    async fn run(&self, command: &[&str]) {
        redis::cmd(command[0])
            .arg(&command[1..])
            .query_async::<redis::Value>(&mut self.conn.clone())
            .await
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    }

    async fn holds(&self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<bool>(&mut self.conn.clone())
            .await
            .unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Redis full under `noeviction`: it answers, reads and refuses every write.
#[tokio::test]
async fn a_full_redis_is_used_for_reads_and_its_refusal_told_once() {
    redis_refusing_writes(
        &[
            &["CONFIG", "SET", "maxmemory-policy", "noeviction"],
            &["CONFIG", "SET", "maxmemory", "1"],
        ],
        &[&["CONFIG", "SET", "maxmemory", "0"]],
    )
    .await;
}

/// An ACL that takes writes from the service's user.
#[tokio::test]
async fn a_redis_acl_without_writes_is_used_for_reads_and_told_once() {
    redis_refusing_writes(
        &[&["ACL", "SETUSER", "default", "-@write"]],
        &[&["ACL", "SETUSER", "default", "+@all"]],
    )
    .await;
}

/// A read-only replica, as after a failover that left the URL on it.
#[tokio::test]
async fn a_read_only_redis_replica_is_used_for_reads_and_told_once() {
    let nowhere = crate::helpers::free_port().to_string();
    redis_refusing_writes(
        &[&["REPLICAOF", "127.0.0.1", &nowhere]],
        &[&["REPLICAOF", "NO", "ONE"]],
    )
    .await;
}

/// A Redis that comes to want a password the service does not have (set,
/// and the service's connections ended, as when a secret is rotated): it
/// accepts a connection and refuses every command with NOAUTH. The tier is
/// down and told once, not once per probe; no order fails; it is in use again
/// once the password is gone.
#[tokio::test]
async fn a_redis_that_wants_a_password_is_down_until_it_lets_the_service_in() {
    let env = TestEnv::new().await;
    let redis = OwnRedis::start().await;
    let service = env.spawn_with(&[("REDIS_URL", &redis.url), ("REDIS_KEY_PREFIX", &prefix())]);
    service.wait_ready().await;
    wait_redis_up(&service).await;
    redis
        .run(&["ACL", "SETUSER", "default", "resetpass", ">rotated"])
        .await;
    redis
        .run(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;

    crate::helpers::eventually(
        Duration::from_secs(10),
        || async {
            let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
            (ready["checks"]["redis"] == "down" && ready["status"] == "ready").then_some(())
        },
        || format!("NOAUTH not told:\n{}", service.log_text()),
    )
    .await;
    // Several probes' worth: a tier that flaps would come up and go down again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "down", "{ready}");
    let orders = generated_orders(94, 3);
    crate::helpers::produce_orders(&env, &orders).await;
    env.wait_for_count("SELECT count(*) FROM orders", 3, Duration::from_secs(30))
        .await;
    for (uid, bytes) in &orders {
        assert_serves(&service, uid, bytes).await;
    }
    // Told once what keeps it down, however many probes meet it.
    let logs = service.log_text();
    let refused = "redis answers but refuses commands";
    assert_eq!(logs.matches(refused).count(), 1, "{logs}");
    assert_eq!(logs.matches("NOAUTH").count(), 1, "{logs}");
    assert_eq!(logs.matches("redis is reachable").count(), 1, "{logs}");

    redis.run(&["ACL", "SETUSER", "default", "nopass"]).await;
    wait_redis_up(&service).await;
    let logs = service.log_text();
    assert_eq!(logs.matches(refused).count(), 1, "{logs}");
    assert_eq!(logs.matches("redis is reachable").count(), 2, "{logs}");
}

/// A Redis that answers but refuses writes is not away: no order fails, the
/// tier stays in use, `/readyz` says `refuses_writes`, dropped writes are
/// counted, the log tells it once however many writes are refused, and once
/// more when writes are accepted again.
async fn redis_refusing_writes(refuse: &[&[&str]], accept: &[&[&str]]) {
    let env = TestEnv::new().await;
    let redis = OwnRedis::start().await;
    let key_prefix = prefix();
    let service = env.spawn_with(&[("REDIS_URL", &redis.url), ("REDIS_KEY_PREFIX", &key_prefix)]);
    service.wait_ready().await;
    wait_redis_up(&service).await;
    for command in refuse {
        redis.run(command).await;
    }

    let orders = generated_orders(93, 12);
    for (round, stored) in orders[..9].chunks(3).enumerate() {
        crate::helpers::produce_orders(&env, stored).await;
        env.wait_for_count(
            "SELECT count(*) FROM orders",
            3 * (round as i64 + 1),
            Duration::from_secs(30),
        )
        .await;
        crate::helpers::eventually(
            Duration::from_secs(10),
            || async {
                let dropped = service.metric("cache_redis_writes_dropped_total").await;
                (dropped >= 3.0 * (round as f64 + 1.0)).then_some(())
            },
            || "the refused writes were not counted".into(),
        )
        .await;
    }
    let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "refuses_writes", "{ready}");
    assert_eq!(ready["status"], "ready", "{ready}");
    for (uid, bytes) in &orders[..9] {
        assert_serves(&service, uid, bytes).await;
        assert!(!redis.holds(&format!("{key_prefix}order:{uid}")).await);
    }

    for command in accept {
        redis.run(command).await;
    }
    // Told without waiting for the next order to be written.
    crate::helpers::eventually(
        Duration::from_secs(10),
        || async {
            let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
            (ready["checks"]["redis"] == "up").then_some(())
        },
        || format!("writes accepted, but not told:\n{}", service.log_text()),
    )
    .await;
    crate::helpers::produce_orders(&env, &orders[9..]).await;
    for (uid, _) in &orders[9..] {
        let key = format!("{key_prefix}order:{uid}");
        crate::helpers::eventually(
            Duration::from_secs(10),
            || async { redis.holds(&key).await.then_some(()) },
            || format!("{key} never written:\n{}", service.log_text()),
        )
        .await;
    }
    let ready: serde_json::Value = service.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "up", "{ready}");
    let logs = service.log_text();
    assert_eq!(logs.matches("redis refuses writes").count(), 1, "{logs}");
    assert_eq!(
        logs.matches("redis accepts writes again").count(),
        1,
        "{logs}"
    );
    assert!(!logs.contains("redis is unreachable"), "{logs}");
    assert!(!logs.contains("redis refuses reads"), "{logs}");
}
