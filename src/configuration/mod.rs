//! Settings, layered: defaults < TOML file (`--config`) < environment < flags.
//! The environment and flags are read by clap (see `cli`); this module owns the
//! defaults, the file and the checks. The one other variable read is RUST_LOG
//! (the log level, read by `telemetry`).

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

pub use self::kafka::{KafkaSettings, SaslMechanism, SecurityProtocol};
pub use self::setting::Setting;
use self::setting::{positive, section};
use crate::domain::Limits;

mod kafka;
pub(crate) mod setting;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub ingest: IngestSettings,
    pub redis: RedisSettings,
    pub http: HttpSettings,
    pub cache: CacheSettings,
    pub validation: Limits,
    pub log: LogSettings,
}

impl Setting {
    /// Every setting, in the order `--help` and the README show them.
    pub fn all() -> impl Iterator<Item = &'static Setting> {
        [
            DatabaseSettings::SETTINGS,
            KafkaSettings::SETTINGS,
            IngestSettings::SETTINGS,
            Limits::SETTINGS,
            RedisSettings::SETTINGS,
            CacheSettings::SETTINGS,
            HttpSettings::SETTINGS,
            LogSettings::SETTINGS,
        ]
        .into_iter()
        .flatten()
    }
}

section! {
    pub struct DatabaseSettings in database, heading "Database" {
        /// PostgreSQL URL of the service role, which reads and writes the
        /// service's tables and nothing more
        url: SecretString = "postgres://order_service@127.0.0.1:5432/orders".into()
            => DATABASE_URL "URL" if postgres_url, secret = true;
        /// PostgreSQL URL of the owner role, used only by `migrate`
        migration_url: SecretString = "postgres://order_owner@127.0.0.1:5432/orders".into()
            => MIGRATION_DATABASE_URL "URL" if postgres_url, secret = true;
        /// Role that `migrate` grants read and write access to
        service_role: Option<String> = None
            => DATABASE_SERVICE_ROLE "ROLE", unset = Some("the user in DATABASE_URL");
        /// Connections in the service's pool
        max_connections: u32 = 8 => DATABASE_MAX_CONNECTIONS "N" if positive;
        /// Longest wait for a PostgreSQL session, from the pool or newly opened,
        /// in ms; a session given back to the pool in the middle of a statement
        /// that does not answer within it is closed
        connect_timeout_ms: u64 = 3000 => DATABASE_CONNECT_TIMEOUT_MS "MS" if positive;
    }
}

section! {
    pub struct IngestSettings in ingest, heading "Ingest" {
        /// Messages per database transaction, at most
        batch_size: usize = 5000 => INGEST_BATCH_SIZE "N" if positive;
        /// Bytes of messages per database transaction, at most (a batch is
        /// written at either limit, so large orders cannot make one too large
        /// for memory)
        batch_max_bytes: usize = 16 * 1024 * 1024 => INGEST_BATCH_MAX_BYTES "BYTES" if positive;
        /// Longest wait before a partial batch is written, in ms
        batch_linger_ms: u64 = 5 => INGEST_BATCH_LINGER_MS "MS";
        /// Longest pause between retries while PostgreSQL is unreachable, in ms
        max_backoff_ms: u64 = 5000 => INGEST_MAX_BACKOFF_MS "MS";
        /// Longest wait for PostgreSQL to finish a batch's write, in ms; then
        /// ingest pauses and retries on new sessions. The server ends a
        /// batch's statements and its idle transaction after the same time;
        /// a warm-up page or a `dead-letters` page unanswered as long is
        /// given up too
        write_timeout_ms: u64 = 30_000 => INGEST_WRITE_TIMEOUT_MS "MS" if positive;
        /// Time allowed on SIGTERM/SIGINT to finish the batch in hand and
        /// leave the group, in ms
        shutdown_timeout_ms: u64 = 10_000 => SHUTDOWN_TIMEOUT_MS "MS";
        /// First bytes of each rejected message kept in PostgreSQL with its
        /// reasons (0: none); the whole message stays on the dead-letter topic
        dead_letter_preview_bytes: usize = 64 * 1024 => DEAD_LETTER_PREVIEW_BYTES "BYTES";
    }
}

section! {
    impl Limits in validation, heading "Validation" {
        /// Messages larger than this are dead-lettered unread, in bytes
        max_message_bytes => MAX_MESSAGE_BYTES "BYTES" if positive;
        /// Most items in one order
        max_items => MAX_ITEMS "N" if positive;
        /// Longest text field, in characters
        max_string_chars => MAX_STRING_CHARS "N" if positive;
    }
}

section! {
    pub struct RedisSettings in redis, heading "Cache" {
        /// Redis URL of the shared cache tier; unset means no Redis tier
        url: Option<SecretString> = None => REDIS_URL "URL" if redis_url, secret = true;
        /// How long orders stay in Redis, in seconds
        ttl_secs: u64 = 7 * 24 * 3600 => REDIS_TTL_SECS "SECS";
        /// Prefix of every Redis key, so deployments can share one Redis
        key_prefix: String = "order-service:".into() => REDIS_KEY_PREFIX "PREFIX";
    }
}

section! {
    pub struct CacheSettings in cache, heading "Cache" {
        /// Memory budget of the in-process cache, in bytes
        max_bytes: u64 = 256 * 1024 * 1024 => CACHE_MAX_BYTES "BYTES";
        /// Most recent orders loaded into the in-process cache at start
        warmup_orders: u64 = 100_000 => CACHE_WARMUP_ORDERS "N";
    }
}

section! {
    pub struct HttpSettings in http, heading "HTTP" {
        /// Address the HTTP server listens on
        addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)) => HTTP_ADDR "HOST:PORT";
        /// Longest wait of one request for PostgreSQL or Redis, in ms; then it
        /// answers 504
        request_timeout_ms: u64 = 5000 => HTTP_REQUEST_TIMEOUT_MS "MS";
        /// Time a client may take to send its request head, in ms; slower ones
        /// are cut off
        header_read_timeout_ms: u64 = 10_000 => HTTP_HEADER_READ_TIMEOUT_MS "MS";
        /// Requests handled at once; more wait
        max_concurrency: usize = 4096 => HTTP_MAX_CONCURRENCY "N" if positive;
        /// Connections clients may hold open at once (live feeds included);
        /// more wait in the listen queue. 0: the open-files limit less the
        /// files the service keeps for its own sessions and clients (256 and
        /// DATABASE_MAX_CONNECTIONS, at most half), and at most 16384
        max_connections: usize = 0 => HTTP_MAX_CONNECTIONS "N";
        /// Threads serving HTTP, each with its own single-threaded runtime (0:
        /// one per core)
        workers: usize = 0 => HTTP_WORKERS "N";
        /// Also serve HTTP/2 without TLS (prior knowledge); false serves
        /// HTTP/1.1 only, without reading ahead to tell the two apart
        allow_http2: bool = false => HTTP_ALLOW_HTTP2 "BOOL";
    }
}

impl HttpSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

section! {
    pub struct LogSettings in log, heading "Logging" {
        /// Log format; the level is set with RUST_LOG (e.g. info,
        /// order_service=debug)
        #[serde(deserialize_with = "case_blind")]
        format: LogFormat = LogFormat::Auto => LOG_FORMAT "FORMAT";
    }
}

/// A value of a fixed set, read by its name in any case (`sasl_ssl`, `SASL_SSL`).
fn case_blind<'de, D: serde::Deserializer<'de>, T: clap::ValueEnum>(
    deserializer: D,
) -> Result<T, D::Error> {
    let name = String::deserialize(deserializer)?;
    T::from_str(&name, true).map_err(serde::de::Error::custom)
}

impl Settings {
    /// Defaults, overlaid by the TOML file when one is given.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = file else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config: cannot read {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let message = e.message().trim_end().replace('\n', " ");
            let where_ = e
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            anyhow::anyhow!("--config {}{where_}: {message}", path.display())
        })
    }

    /// The checks serde cannot make: URLs that must parse, numbers that must be positive.
    pub fn check(&self) -> anyhow::Result<()> {
        for setting in Setting::all() {
            setting.check(self)?;
        }
        self.kafka.check_security()?;
        anyhow::ensure!(
            self.kafka.topic != self.kafka.dlq_topic,
            "KAFKA_DLQ_TOPIC: must differ from KAFKA_TOPIC ({})",
            self.kafka.topic
        );
        Ok(())
    }

    /// The service's sessions. sqlx's `extra_float_digits` startup parameter
    /// is left out (no column here is a float): a connection pooler such as
    /// PgBouncer refuses startup parameters it does not know.
    pub fn service_options(&self) -> anyhow::Result<PgConnectOptions> {
        let options = pg_options(&self.database.url).map_err(|e| anyhow!("DATABASE_URL: {e}"))?;
        Ok(options.extra_float_digits(None))
    }

    pub fn migration_options(&self) -> anyhow::Result<PgConnectOptions> {
        pg_options(&self.database.migration_url).map_err(|e| anyhow!("MIGRATION_DATABASE_URL: {e}"))
    }

    /// The role `migrate` grants access to.
    pub fn service_role(&self) -> anyhow::Result<String> {
        match &self.database.service_role {
            Some(role) => Ok(role.clone()),
            None => Ok(self.service_options()?.get_username().to_owned()),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.database.connect_timeout_ms)
    }

    pub fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.kafka.session_timeout_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.ingest.write_timeout_ms)
    }

    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.ingest.batch_linger_ms)
    }
}

fn pg_options(url: &SecretString) -> Result<PgConnectOptions, String> {
    let url = url.expose_secret();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("must be a postgres:// URL".into());
    }
    // The parse error may quote the URL, password included, so it is not shown.
    PgConnectOptions::from_str(url).map_err(|_| "not a valid PostgreSQL URL".into())
}

fn postgres_url(url: &SecretString) -> Result<(), String> {
    pg_options(url).map(drop)
}

fn redis_url(url: &Option<SecretString>) -> Result<(), String> {
    match url {
        Some(url) => redis::Client::open(url.expose_secret())
            .map(drop)
            .map_err(|e| format!("not a Redis URL ({e})")),
        None => Ok(()),
    }
}

/// A URL with its password replaced, for logs.
pub fn redacted(url: &SecretString) -> String {
    match url::Url::parse(url.expose_secret()) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn file_overrides_defaults() {
        let f = file("[kafka]\ntopic = \"incoming\"\n[ingest]\nbatch_size = 10\n");
        let settings = Settings::load(Some(f.path())).unwrap();
        assert_eq!(settings.kafka.topic, "incoming");
        assert_eq!(settings.kafka.dlq_topic, "orders.dlq");
        assert_eq!(settings.ingest.batch_size, 10);
    }

    #[test]
    fn unknown_key_is_named() {
        let f = file("[kafka]\ntopik = \"x\"\n");
        let err = Settings::load(Some(f.path())).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("unknown field `topik`"),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let f = file("[ingest]\nbatch_size = \"many\"\n");
        let err = Settings::load(Some(f.path())).unwrap_err().to_string();
        assert!(
            err.contains("line 2") && err.contains("invalid type"),
            "{err}"
        );
    }

    #[test]
    fn bad_urls_are_named_without_the_password() {
        let mut settings = Settings::default();
        settings.database.url = "mysql://u:hunter2@h/db".into();
        let err = settings.check().unwrap_err().to_string();
        assert_eq!(err, "DATABASE_URL: must be a postgres:// URL");
        settings.database.url = "postgres://u:hunter2@h:notaport/db".into();
        let err = settings.check().unwrap_err().to_string();
        assert_eq!(err, "DATABASE_URL: not a valid PostgreSQL URL");
    }

    #[test]
    fn redaction_hides_passwords() {
        let url: SecretString = "postgres://svc:hunter2@db:5432/orders".into();
        assert_eq!(redacted(&url), "postgres://svc:***@db:5432/orders");
        assert!(!format!("{url:?}").contains("hunter2"));
    }

    #[test]
    fn service_role_defaults_to_the_url_user() {
        let settings = Settings::default();
        assert_eq!(settings.service_role().unwrap(), "order_service");
    }
}
