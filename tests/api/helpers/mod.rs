//! Each test gets its own database, topics and consumer group, and runs the
//! real `order-service` binary against the real PostgreSQL, Redis and broker.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::distr::{Alphanumeric, SampleString};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub use self::proxy::TcpProxy;
pub use self::service::{signal, Service};

mod proxy;
mod service;

pub const SAMPLE: &str = include_str!("../../../src/domain/sample_order.json");
/// How long `migrate` waits for its session when tests run it: many tests
/// open databases at once.
pub const MIGRATE_PATIENCE: Duration = Duration::from_secs(30);

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn brokers() -> String {
    var("TEST_KAFKA_BROKERS", "127.0.0.1:19092")
}

/// The value `check` gives, asked for every 100 ms; fails with `why()` if
/// none comes `within`.
pub async fn eventually<T, F>(
    within: Duration,
    mut check: impl FnMut() -> F,
    why: impl Fn() -> String,
) -> T
where
    F: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{}", why());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Blocks until something listens on 127.0.0.1:`port` (a server the test
/// started), failing with `why` after `within`.
pub fn wait_listening(port: u16, within: Duration, why: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ten random lower-case letters and digits that name a test's own objects.
pub fn unique_suffix() -> String {
    Alphanumeric
        .sample_string(&mut rand::rng(), 10)
        .to_lowercase()
}

/// The suite's PostgreSQL server, as the owner role.
pub fn admin() -> PgConnectOptions {
    PgConnectOptions::from_str(&var(
        "TEST_DATABASE_URL",
        "postgres://order_owner:order_owner_local@127.0.0.1:5432/postgres",
    ))
    .expect("TEST_DATABASE_URL is a PostgreSQL URL")
}

pub fn redis_url() -> String {
    var("TEST_REDIS_URL", "redis://127.0.0.1:6379/")
}

/// A database, an orders topic, a dead-letter topic and a group of its own.
pub struct TestEnv {
    pub name: String,
    /// The broker this test's topics live on.
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub group: String,
    owner: PgConnectOptions,
    /// The least-privileged role the service connects as.
    pub service_role: String,
    pub service_url: String,
    /// Connected as the owner role, for assertions.
    pub db: PgPool,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_partitions(4).await
    }

    pub async fn with_partitions(partitions: i32) -> Self {
        Self::on_broker(brokers(), partitions).await
    }

    pub async fn on_broker(brokers: String, partitions: i32) -> Self {
        let env = Self::unmigrated_on(admin(), brokers, partitions).await;
        env.migrate().await;
        env
    }

    /// On another PostgreSQL server, reached as `admin` (the owner role).
    pub async fn on_postgres(admin: PgConnectOptions) -> Self {
        let env = Self::unmigrated_on(admin, brokers(), 4).await;
        env.migrate().await;
        env
    }

    /// A database with no tables yet, as before `order-service migrate`.
    pub async fn unmigrated() -> Self {
        Self::unmigrated_on(admin(), brokers(), 4).await
    }

    /// The service URL of this database for another role, after `migrate`
    /// granted that role the service's access.
    pub async fn service_url_as(&self, role: &str, password: &str) -> String {
        order_service::store::migrate(self.owner.clone(), role, MIGRATE_PATIENCE)
            .await
            .expect("access granted");
        let mut url = url::Url::parse(&self.service_url).unwrap();
        url.set_username(role).unwrap();
        url.set_password(Some(password)).unwrap();
        url.to_string()
    }

    /// Applies the migrations, as `order-service migrate` does.
    pub async fn migrate(&self) {
        self.try_migrate().await.expect("migrations apply");
    }

    pub async fn try_migrate(&self) -> anyhow::Result<()> {
        order_service::store::migrate(self.owner.clone(), &self.service_role, MIGRATE_PATIENCE)
            .await
    }

    async fn unmigrated_on(admin: PgConnectOptions, brokers: String, partitions: i32) -> Self {
        let suffix = unique_suffix();
        let name = format!("test_{suffix}");
        let mut conn = admin.connect().await.expect("connect as the owner role");
        // Before PostgreSQL 15 the stack names a template whose schema `public` is
        // the owner role's, as 15 makes it for every new database.
        let template = var("TEST_DATABASE_TEMPLATE", "template1");
        sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let owner = admin.clone().database(&name);
        let role = var("TEST_SERVICE_ROLE", "order_service");
        let service_url = format!(
            "postgres://{role}:{}@{}:{}/{name}",
            var("TEST_SERVICE_PASSWORD", "order_service_local"),
            admin.get_host(),
            admin.get_port()
        );
        let db = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(owner.clone())
            .await
            .unwrap();
        let env = Self {
            topic: format!("orders-{suffix}"),
            dlq_topic: format!("orders-{suffix}.dlq"),
            group: format!("group-{suffix}"),
            name,
            brokers,
            owner,
            service_role: role,
            service_url,
            db,
        };
        env.create_topics(partitions).await;
        env
    }

    async fn create_topics(&self, partitions: i32) {
        self.create_topic(&self.topic, partitions).await;
        self.create_topic(&self.dlq_topic, 1).await;
    }

    /// Creates a topic on this test's broker.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .unwrap();
        let topics = [NewTopic::new(name, partitions, TopicReplication::Fixed(1))];
        for result in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .unwrap()
        {
            result.expect("topic created");
        }
    }

    /// Settings for a service instance of this test, as environment variables.
    pub fn service_env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_URL", self.service_url.clone()),
            ("KAFKA_BROKERS", self.brokers.clone()),
            ("KAFKA_TOPIC", self.topic.clone()),
            ("KAFKA_DLQ_TOPIC", self.dlq_topic.clone()),
            ("KAFKA_GROUP_ID", self.group.clone()),
            ("HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "info".to_owned()),
            // Keys a test writes to the shared Redis expire soon after it,
            // under a prefix of its own, apart from the demo's.
            ("REDIS_TTL_SECS", "300".to_owned()),
            ("REDIS_KEY_PREFIX", format!("{}:", self.name)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    pub fn spawn(&self) -> Service {
        Service::spawn(self.service_env())
    }

    pub fn spawn_with(&self, extra: &[(&str, &str)]) -> Service {
        let mut env = self.service_env();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        Service::spawn(env)
    }

    pub async fn produce(&self, messages: &[(Option<&str>, &[u8])]) {
        self.produce_with(&[], messages).await;
    }

    /// Produces with producer settings of the test's own (a compression codec).
    pub async fn produce_with(&self, config: &[(&str, &str)], messages: &[(Option<&str>, &[u8])]) {
        let producer = self.producer(config);
        let sends = messages.iter().map(|(key, payload)| {
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic).payload(*payload);
            if let Some(key) = key {
                record = record.key(*key);
            }
            producer.send(record, Duration::from_secs(10))
        });
        for result in futures::future::join_all(sends).await {
            result.expect("message delivered");
        }
    }

    /// Produces a tombstone: a message with a key and no value at all (not
    /// an empty one), as compacted topics use to delete a key.
    pub async fn produce_tombstone(&self, key: &str) {
        let record = FutureRecord::<str, [u8]>::to(&self.topic).key(key);
        self.producer(&[])
            .send(record, Duration::from_secs(10))
            .await
            .expect("tombstone delivered");
    }

    fn producer(&self, config: &[(&str, &str)]) -> FutureProducer {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Room for the hostile 10 MB messages.
            .set("message.max.bytes", (16 << 20).to_string());
        for (key, value) in config {
            client.set(*key, *value);
        }
        client.create().unwrap()
    }

    /// Runs `sql` as the owner role, on a session that is writable whatever
    /// the database's defaults.
    pub async fn execute(&self, sql: &str) {
        let mut conn = self.db.acquire().await.unwrap();
        sqlx::query("SET default_transaction_read_only = off")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(sql)
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// New sessions of this database start read-only (or not), as on a
    /// server that became a replica.
    pub async fn set_read_only(&self, read_only: bool) {
        let value = if read_only { "on" } else { "off" };
        self.execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = {value}",
            self.name
        ))
        .await;
    }

    /// Ends every session the service role has open on this database, as a
    /// failover does; a role may end its own sessions.
    pub async fn end_service_sessions(&self) {
        end_other_sessions(&mut self.service_session().await).await;
    }

    /// A session as the service role.
    pub async fn service_session(&self) -> sqlx::PgConnection {
        PgConnectOptions::from_str(&self.service_url)
            .unwrap()
            .connect()
            .await
            .expect("connect as the service role")
    }
}

/// Ends the other sessions of the connected role on its database.
pub async fn end_other_sessions(conn: &mut sqlx::PgConnection) {
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE usename = current_user AND datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(conn)
    .await
    .unwrap();
}

impl TestEnv {
    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }

    /// Waits until the group's stored positions add up to `messages`.
    pub async fn wait_for_committed(&self, messages: i64, within: Duration) {
        let committed = "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets";
        self.wait_for_count(committed, messages, within).await;
    }

    /// Waits until `sql` returns `expected`, and fails with the last value if it never does.
    pub async fn wait_for_count(&self, sql: &str, expected: i64, within: Duration) {
        let last = Mutex::new(0);
        eventually(
            within,
            || async {
                let n = self.count(sql).await;
                *last.lock().unwrap() = n;
                (n == expected).then_some(())
            },
            || format!("{sql}: {}, expected {expected}", last.lock().unwrap()),
        )
        .await;
    }

    /// Reads the dead-letter topic until `expected` letters arrived (or the time is up).
    pub fn dead_letters(&self, expected: usize, within: Duration) -> Vec<Record> {
        let consumer = self.reader(&self.dlq_topic, 1, false);
        let mut letters = Vec::new();
        let deadline = Instant::now() + within;
        while letters.len() < expected && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                letters.push(Record::from(&m));
            }
        }
        // Anything beyond `expected` shows up too, so an exact count can be asserted.
        while let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
            letters.push(Record::from(&m));
        }
        letters
    }

    /// Every message of `topic` up to its partitions' current ends.
    pub fn read_topic(&self, topic: &str, partitions: i32) -> Vec<Record> {
        let consumer = self.reader(topic, partitions, true);
        let mut remaining: HashMap<i32, i64> = (0..partitions)
            .map(|p| {
                // The local broker answers slowly while it works through a
                // consumer's backlog (its fetch scans the whole backlog), so
                // it gets minutes, not seconds.
                let deadline = Instant::now() + Duration::from_secs(180);
                let high = loop {
                    match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                        Ok((_, high)) => break high,
                        Err(e) => assert!(
                            Instant::now() < deadline,
                            "{topic}/{p}: no watermarks from the broker in 3 minutes: {e}"
                        ),
                    }
                };
                (p, high)
            })
            .filter(|&(_, high)| high > 0)
            .collect();
        let mut records = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !remaining.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{topic}: never read to the end; {} read, partition ends not reached: \
                 {remaining:?}, positions: {:?}",
                records.len(),
                consumer.position().map(|p| p.to_topic_map())
            );
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let record = Record::from(&m);
                    if remaining.get(&record.partition) == Some(&(record.offset + 1)) {
                        remaining.remove(&record.partition);
                    }
                    records.push(record);
                }
                // The end as the broker sees it, which may lie past the last
                // offset a record holds.
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    remaining.remove(&p);
                }
                _ => {}
            }
        }
        records
    }

    pub fn assert_no_dead_letters(&self) {
        let letters = self.read_topic(&self.dlq_topic, 1);
        assert!(letters.is_empty(), "{letters:#?}");
    }

    /// The offsets the group has committed on the broker, added up over
    /// the orders topic's `partitions` (0 for a partition with none).
    pub async fn committed_on_broker(&self, partitions: i32) -> i64 {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(&self.topic, p);
        }
        tokio::task::spawn_blocking(move || {
            let committed = consumer
                .committed_offsets(list, Duration::from_secs(10))
                .unwrap();
            committed
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(n) => n,
                    _ => 0,
                })
                .sum()
        })
        .await
        .unwrap()
    }

    fn reader(&self, topic: &str, partitions: i32, report_ends: bool) -> BaseConsumer {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("{}-reader", self.group))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", report_ends.to_string())
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).unwrap();
        consumer
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let (owner, name) = (self.owner.clone(), self.name.clone());
        let service_url = self.service_url.clone();
        // Drop runs outside any runtime, so cleanup gets a small one of its own.
        // Topics stay: the suite's broker and its storage are removed after the
        // run (see scripts/stack test).
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Bounded: a server a failed test left frozen must not hold up
            // the suite (a server of the test's own is removed after this).
            let drop = drop_database(owner, &name, &service_url);
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), drop).await });
        });
        let _ = cleanup.join();
    }
}

/// Drops a test's database. `WITH (FORCE)` ends its sessions, but the owner
/// may end only its own: a session of the service role still open (a killed
/// instance's that its backend has not noticed yet, or one a proxy of the
/// test still relays) makes the drop fail, so the service role ends its own
/// sessions and the drop is tried again.
async fn drop_database(owner: PgConnectOptions, name: &str, service_url: &str) {
    let Ok(mut conn) = owner.database("postgres").connect().await else {
        return;
    };
    let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let service = PgConnectOptions::from_str(service_url).map(|o| o.database("postgres"));
    for _ in 0..5 {
        if sqlx::query(&drop).execute(&mut conn).await.is_ok() {
            return;
        }
        if let Ok(options) = &service {
            if let Ok(mut session) = options.connect().await {
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND usename = current_user",
                )
                .bind(name)
                .execute(&mut session)
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A message read back from a topic.
#[derive(Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, Vec<String>>,
}

impl Record {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map_or("", String::as_str)
    }

    /// A letter's source partition and offset, from its headers.
    pub fn source(&self) -> (i32, i64) {
        let partition = self.header("dlq-source-partition");
        let offset = self.header("dlq-source-offset");
        match (partition.parse(), offset.parse()) {
            (Ok(partition), Ok(offset)) => (partition, offset),
            _ => panic!("not a letter's source position: {partition:?}/{offset:?}"),
        }
    }

    pub fn reasons(&self) -> &[String] {
        self.headers.get("dlq-reason").map_or(&[], Vec::as_slice)
    }
}

impl From<&rdkafka::message::BorrowedMessage<'_>> for Record {
    fn from(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
                headers
                    .entry(header.key.to_owned())
                    .or_default()
                    .push(value);
            }
        }
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }
}

/// The sample order with another id (and matching transaction).
pub fn sample_with_uid(uid: &str) -> serde_json::Value {
    let mut order: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    order["order_uid"] = uid.into();
    order["payment"]["transaction"] = uid.into();
    order
}

impl TestEnv {
    /// Holds `table` locked, so every statement on it waits, until the
    /// transaction ends.
    pub async fn lock_table(&self, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut lock = self.db.begin().await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *lock)
            .await
            .unwrap();
        lock
    }

    /// Waits until `n` sessions of this test's database wait on a lock:
    /// statements in flight.
    pub async fn wait_for_lock_waiters(&self, n: i64) {
        let waiting = || async {
            let waiters: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&self.db)
            .await
            .unwrap();
            (waiters >= n).then_some(())
        };
        eventually(Duration::from_secs(30), waiting, || {
            format!("fewer than {n} sessions waited on the lock")
        })
        .await;
    }

    pub fn postgres_addr(&self) -> String {
        format!("{}:{}", self.owner.get_host(), self.owner.get_port())
    }
}

/// `n` valid generated orders, as (uid, bytes).
pub fn generated_orders(seed: u64, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut generator = order_service::producer::Generator::new(seed, 5);
    (0..n)
        .map(|_| {
            let order = generator.valid();
            (
                order["order_uid"].as_str().unwrap().to_owned(),
                order.to_string().into_bytes(),
            )
        })
        .collect()
}

/// Produces `orders` (the first in this test's database) and waits until a
/// running service has stored them all.
pub async fn store_orders(env: &TestEnv, orders: &[(String, Vec<u8>)]) {
    produce_orders(env, orders).await;
    env.wait_for_count(
        "SELECT count(*) FROM orders",
        orders.len() as i64,
        Duration::from_secs(30),
    )
    .await;
}

impl TestEnv {
    /// `n` generated orders stored by an instance that has stopped since,
    /// as (uid, bytes): what a restarted instance finds in PostgreSQL.
    pub async fn stored_beforehand(&self, seed: u64, n: usize) -> Vec<(String, Vec<u8>)> {
        let orders = generated_orders(seed, n);
        let loader = self.spawn();
        store_orders(self, &orders).await;
        assert!(loader.terminate().success());
        orders
    }
}

pub async fn produce_orders(env: &TestEnv, orders: &[(String, Vec<u8>)]) {
    let messages: Vec<(Option<&str>, &[u8])> = orders
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    for chunk in messages.chunks(5000) {
        env.produce(chunk).await;
    }
}
