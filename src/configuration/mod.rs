//! Settings, layered: defaults < TOML file (`--config`) < environment < flags.
//! The environment and flags are read by clap (see `cli`); this module owns the
//! defaults, the file and the checks. The one other variable read is RUST_LOG
//! (the log level, read by `telemetry`).

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::PgConnectOptions;

pub use self::kafka::{KafkaSettings, SaslMechanism, SecurityProtocol};
use crate::domain::Limits;

mod kafka;

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// The service role: reads and writes the service's tables, nothing more.
    pub url: SecretString,
    /// The owner role, used only by `migrate`.
    pub migration_url: SecretString,
    /// The role `migrate` grants table access to; by default the user of `url`.
    pub service_role: Option<String>,
    pub max_connections: u32,
    pub connect_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://order_service@127.0.0.1:5432/orders".into(),
            migration_url: "postgres://order_owner@127.0.0.1:5432/orders".into(),
            service_role: None,
            max_connections: 8,
            connect_timeout_ms: 3000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// A batch is written when it holds this many messages...
    pub batch_size: usize,
    /// ...or this many bytes of messages (so that large orders cannot make a
    /// batch too large for memory)...
    pub batch_max_bytes: usize,
    /// ...or when its first message has waited this long.
    pub batch_linger_ms: u64,
    /// Longest wait between retries while PostgreSQL is down.
    pub max_backoff_ms: u64,
    /// Longest wait for PostgreSQL to finish a batch's write (or to give the
    /// stored positions): a server gone without closing its sessions never
    /// answers, and nothing else would tell.
    pub write_timeout_ms: u64,
    /// How long SIGTERM may take to finish the batch in hand and leave the group.
    pub shutdown_timeout_ms: u64,
    /// How many of a dead letter's first bytes its record in PostgreSQL keeps
    /// (the whole original stays on the dead-letter topic).
    pub dead_letter_preview_bytes: usize,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            batch_size: 5000,
            batch_max_bytes: 16 * 1024 * 1024,
            batch_linger_ms: 5,
            max_backoff_ms: 5000,
            write_timeout_ms: 30_000,
            shutdown_timeout_ms: 10_000,
            dead_letter_preview_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// Unset: no Redis tier.
    pub url: Option<SecretString>,
    pub ttl_secs: u64,
    /// Prefix of every key, so several deployments can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: None,
            ttl_secs: 7 * 24 * 3600,
            key_prefix: "order-service:".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    pub request_timeout_ms: u64,
    /// How long a client may take to send its request head (slow-client guard).
    pub header_read_timeout_ms: u64,
    pub max_concurrency: usize,
    /// Serving threads; 0 means one per core.
    pub workers: usize,
    /// HTTP/2 (prior knowledge) beside HTTP/1.1; off, connections skip the
    /// protocol sniffing.
    pub allow_http2: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            request_timeout_ms: 5000,
            header_read_timeout_ms: 10_000,
            max_concurrency: 4096,
            workers: 0,
            allow_http2: false,
        }
    }
}

impl HttpSettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Budget of the in-process cache, in bytes of order JSON plus key.
    pub max_bytes: u64,
    /// How many of the most recently ingested orders are loaded at start.
    pub warmup_orders: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            warmup_orders: 100_000,
        }
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    #[serde(deserialize_with = "case_blind")]
    pub format: LogFormat,
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
        pg_options("DATABASE_URL", &self.database.url)?;
        pg_options("MIGRATION_DATABASE_URL", &self.database.migration_url)?;
        if let Some(url) = &self.redis.url {
            redis::Client::open(url.expose_secret())
                .map_err(|e| anyhow::anyhow!("REDIS_URL: not a Redis URL ({e})"))?;
        }
        positive("INGEST_BATCH_SIZE", self.ingest.batch_size as u64)?;
        positive("INGEST_BATCH_MAX_BYTES", self.ingest.batch_max_bytes as u64)?;
        positive(
            "DATABASE_MAX_CONNECTIONS",
            u64::from(self.database.max_connections),
        )?;
        positive("HTTP_MAX_CONCURRENCY", self.http.max_concurrency as u64)?;
        positive("INGEST_WRITE_TIMEOUT_MS", self.ingest.write_timeout_ms)?;
        positive(
            "MAX_MESSAGE_BYTES",
            self.validation.max_message_bytes as u64,
        )?;
        positive("MAX_ITEMS", self.validation.max_items as u64)?;
        positive("MAX_STRING_CHARS", self.validation.max_string_chars as u64)?;
        // Kafka's brokers accept 6 s to 30 min by default; heartbeats go every 2 s.
        anyhow::ensure!(
            (6_000..=1_800_000).contains(&self.kafka.session_timeout_ms),
            "KAFKA_SESSION_TIMEOUT_MS: must be between 6000 and 1800000"
        );
        self.kafka.check_security()?;
        for (name, value) in [
            ("KAFKA_BROKERS", &self.kafka.brokers),
            ("KAFKA_TOPIC", &self.kafka.topic),
            ("KAFKA_DLQ_TOPIC", &self.kafka.dlq_topic),
            ("KAFKA_GROUP_ID", &self.kafka.group_id),
        ] {
            anyhow::ensure!(!value.trim().is_empty(), "{name}: must not be empty");
        }
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
        Ok(pg_options("DATABASE_URL", &self.database.url)?.extra_float_digits(None))
    }

    pub fn migration_options(&self) -> anyhow::Result<PgConnectOptions> {
        pg_options("MIGRATION_DATABASE_URL", &self.database.migration_url)
    }

    /// The role `migrate` grants access to.
    pub fn service_role(&self) -> anyhow::Result<String> {
        match &self.database.service_role {
            Some(role) => Ok(role.clone()),
            None => Ok(self.service_options()?.get_username().to_owned()),
        }
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

fn pg_options(name: &str, url: &SecretString) -> anyhow::Result<PgConnectOptions> {
    let url = url.expose_secret();
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        anyhow::bail!("{name}: must be a postgres:// URL");
    }
    // The parse error may quote the URL, password included, so it is not shown.
    PgConnectOptions::from_str(url)
        .map_err(|_| anyhow::anyhow!("{name}: not a valid PostgreSQL URL"))
}

fn positive(name: &str, value: u64) -> anyhow::Result<()> {
    anyhow::ensure!(value > 0, "{name}: must be greater than 0");
    Ok(())
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
