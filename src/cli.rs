//! The command line. Every setting is a flag and an environment variable; flags
//! win over the environment, which wins over the `--config` file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::configuration::{LogFormat, Settings};
use crate::documents::Format;
use crate::producer::ProduceArgs;

#[derive(Debug, Parser)]
#[command(
    name = "order-service",
    version,
    about = "Takes orders off Kafka, keeps them in PostgreSQL and serves them over HTTP",
    long_about = "Takes orders off Kafka, keeps them in PostgreSQL and serves them over HTTP.\n\n\
        Settings come from, lowest first: built-in defaults, the TOML file given by --config, \
        the environment, then flags. Values of secret settings are never printed."
)]
pub struct Cli {
    /// TOML file with settings; its sections mirror the headings below
    /// ([database], [kafka], [ingest], [redis], [http], [cache], [validation], [log]).
    #[arg(long, global = true, env = "ORDER_SERVICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: SettingsArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume orders from Kafka into PostgreSQL and serve them over HTTP.
    Serve,
    /// Apply database migrations as the owner role and grant the service role its access.
    Migrate,
    /// Send generated (or file) orders to the orders topic, for demos, tests and benchmarks.
    Produce(Box<ProduceArgs>),
    /// Check orders from a JSON array or NDJSON file (or stdin) and print why each is invalid.
    Validate(ValidateArgs),
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// File of orders; `-` or nothing reads stdin.
    #[arg(value_name = "FILE|-")]
    pub input: Option<PathBuf>,
    /// How the documents are laid out [default: ndjson for a .ndjson or .jsonl
    /// file, array when the input starts with `[`, concatenated when its first
    /// document spans lines, otherwise ndjson]
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Print one JSON object per document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Every setting as a flag. `None` means "not given": the file or default stands.
#[derive(Debug, Default, Args)]
pub struct SettingsArgs {
    /// PostgreSQL URL of the service role [default: postgres://order_service@127.0.0.1:5432/orders]
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        help_heading = "Database",
        value_name = "URL"
    )]
    pub database_url: Option<String>,
    /// PostgreSQL URL of the owner role, used by `migrate` [default: postgres://order_owner@127.0.0.1:5432/orders]
    #[arg(
        long,
        global = true,
        env = "MIGRATION_DATABASE_URL",
        hide_env_values = true,
        help_heading = "Database",
        value_name = "URL"
    )]
    pub migration_database_url: Option<String>,
    /// Role that `migrate` grants read and write access to [default: the user in DATABASE_URL]
    #[arg(
        long,
        global = true,
        env = "DATABASE_SERVICE_ROLE",
        help_heading = "Database",
        value_name = "ROLE"
    )]
    pub database_service_role: Option<String>,
    /// Connections in the service's pool [default: 8]
    #[arg(
        long,
        global = true,
        env = "DATABASE_MAX_CONNECTIONS",
        help_heading = "Database",
        value_name = "N"
    )]
    pub database_max_connections: Option<u32>,

    /// Kafka bootstrap servers, comma-separated host:port [default: 127.0.0.1:9092]
    #[arg(
        long,
        global = true,
        env = "KAFKA_BROKERS",
        help_heading = "Kafka",
        value_name = "LIST"
    )]
    pub kafka_brokers: Option<String>,
    /// Topic the orders arrive on [default: orders]
    #[arg(
        long,
        global = true,
        env = "KAFKA_TOPIC",
        help_heading = "Kafka",
        value_name = "TOPIC"
    )]
    pub kafka_topic: Option<String>,
    /// Topic rejected messages go to, with the reasons in headers [default: orders.dlq]
    #[arg(
        long,
        global = true,
        env = "KAFKA_DLQ_TOPIC",
        help_heading = "Kafka",
        value_name = "TOPIC"
    )]
    pub kafka_dlq_topic: Option<String>,
    /// Consumer group; instances in one group share the partitions [default: order-service]
    #[arg(
        long,
        global = true,
        env = "KAFKA_GROUP_ID",
        help_heading = "Kafka",
        value_name = "GROUP"
    )]
    pub kafka_group_id: Option<String>,
    /// Stable member name of this instance in the group (static membership), e.g. the pod name
    #[arg(
        long,
        global = true,
        env = "KAFKA_GROUP_INSTANCE_ID",
        help_heading = "Kafka",
        value_name = "NAME"
    )]
    pub kafka_group_instance_id: Option<String>,
    /// How long the group waits for a silent member before moving its partitions, in ms [default: 10000]
    #[arg(
        long,
        global = true,
        env = "KAFKA_SESSION_TIMEOUT_MS",
        help_heading = "Kafka",
        value_name = "MS"
    )]
    pub kafka_session_timeout_ms: Option<u64>,

    /// Messages per database transaction, at most [default: 2000]
    #[arg(
        long,
        global = true,
        env = "INGEST_BATCH_SIZE",
        help_heading = "Ingest",
        value_name = "N"
    )]
    pub ingest_batch_size: Option<usize>,
    /// Longest wait before a partial batch is written, in ms [default: 20]
    #[arg(
        long,
        global = true,
        env = "INGEST_BATCH_LINGER_MS",
        help_heading = "Ingest",
        value_name = "MS"
    )]
    pub ingest_batch_linger_ms: Option<u64>,
    /// Longest pause between retries while PostgreSQL is unreachable, in ms [default: 5000]
    #[arg(
        long,
        global = true,
        env = "INGEST_MAX_BACKOFF_MS",
        help_heading = "Ingest",
        value_name = "MS"
    )]
    pub ingest_max_backoff_ms: Option<u64>,
    /// Time allowed on SIGTERM/SIGINT to finish the batch in hand and leave the group, in ms [default: 10000]
    #[arg(
        long,
        global = true,
        env = "SHUTDOWN_TIMEOUT_MS",
        help_heading = "Ingest",
        value_name = "MS"
    )]
    pub shutdown_timeout_ms: Option<u64>,

    /// Messages larger than this are dead-lettered unread, in bytes [default: 1048576]
    #[arg(
        long,
        global = true,
        env = "MAX_MESSAGE_BYTES",
        help_heading = "Validation",
        value_name = "BYTES"
    )]
    pub max_message_bytes: Option<usize>,
    /// Most items in one order [default: 1000]
    #[arg(
        long,
        global = true,
        env = "MAX_ITEMS",
        help_heading = "Validation",
        value_name = "N"
    )]
    pub max_items: Option<usize>,
    /// Longest text field, in characters [default: 1024]
    #[arg(
        long,
        global = true,
        env = "MAX_STRING_CHARS",
        help_heading = "Validation",
        value_name = "N"
    )]
    pub max_string_chars: Option<usize>,

    /// Redis URL of the shared cache tier; unset means no Redis tier
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        hide_env_values = true,
        help_heading = "Cache",
        value_name = "URL"
    )]
    pub redis_url: Option<String>,
    /// How long orders stay in Redis, in seconds [default: 604800]
    #[arg(
        long,
        global = true,
        env = "REDIS_TTL_SECS",
        help_heading = "Cache",
        value_name = "SECS"
    )]
    pub redis_ttl_secs: Option<u64>,
    /// Prefix of every Redis key, so deployments can share one Redis [default: order-service:]
    #[arg(
        long,
        global = true,
        env = "REDIS_KEY_PREFIX",
        help_heading = "Cache",
        value_name = "PREFIX"
    )]
    pub redis_key_prefix: Option<String>,
    /// Memory budget of the in-process cache, in bytes [default: 268435456]
    #[arg(
        long,
        global = true,
        env = "CACHE_MAX_BYTES",
        help_heading = "Cache",
        value_name = "BYTES"
    )]
    pub cache_max_bytes: Option<u64>,
    /// Most recent orders loaded into the in-process cache at start [default: 100000]
    #[arg(
        long,
        global = true,
        env = "CACHE_WARMUP_ORDERS",
        help_heading = "Cache",
        value_name = "N"
    )]
    pub cache_warmup_orders: Option<u64>,

    /// Address the HTTP server listens on [default: 127.0.0.1:8080]
    #[arg(
        long,
        global = true,
        env = "HTTP_ADDR",
        help_heading = "HTTP",
        value_name = "HOST:PORT"
    )]
    pub http_addr: Option<std::net::SocketAddr>,
    /// Time allowed for one request, in ms [default: 5000]
    #[arg(
        long,
        global = true,
        env = "HTTP_REQUEST_TIMEOUT_MS",
        help_heading = "HTTP",
        value_name = "MS"
    )]
    pub http_request_timeout_ms: Option<u64>,
    /// Time a client may take to send its request head, in ms; slower ones are cut off [default: 10000]
    #[arg(
        long,
        global = true,
        env = "HTTP_HEADER_READ_TIMEOUT_MS",
        help_heading = "HTTP",
        value_name = "MS"
    )]
    pub http_header_read_timeout_ms: Option<u64>,
    /// Requests handled at once; more wait [default: 4096]
    #[arg(
        long,
        global = true,
        env = "HTTP_MAX_CONCURRENCY",
        help_heading = "HTTP",
        value_name = "N"
    )]
    pub http_max_concurrency: Option<usize>,

    /// Log format; the level is set with RUST_LOG (e.g. info, order_service=debug) [default: auto]
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        help_heading = "Logging",
        value_name = "FORMAT"
    )]
    pub log_format: Option<LogFormat>,
}

impl SettingsArgs {
    /// Lays the given flags and environment values over `settings`.
    pub fn apply(self, s: &mut Settings) {
        fn set<T>(target: &mut T, value: Option<T>) {
            if let Some(value) = value {
                *target = value;
            }
        }
        set(&mut s.database.url, self.database_url.map(Into::into));
        set(
            &mut s.database.migration_url,
            self.migration_database_url.map(Into::into),
        );
        set(
            &mut s.database.service_role,
            self.database_service_role.map(Some),
        );
        set(
            &mut s.database.max_connections,
            self.database_max_connections,
        );
        set(&mut s.kafka.brokers, self.kafka_brokers);
        set(&mut s.kafka.topic, self.kafka_topic);
        set(&mut s.kafka.dlq_topic, self.kafka_dlq_topic);
        set(&mut s.kafka.group_id, self.kafka_group_id);
        set(
            &mut s.kafka.group_instance_id,
            self.kafka_group_instance_id.map(Some),
        );
        set(
            &mut s.kafka.session_timeout_ms,
            self.kafka_session_timeout_ms,
        );
        set(&mut s.ingest.batch_size, self.ingest_batch_size);
        set(&mut s.ingest.batch_linger_ms, self.ingest_batch_linger_ms);
        set(&mut s.ingest.max_backoff_ms, self.ingest_max_backoff_ms);
        set(&mut s.ingest.shutdown_timeout_ms, self.shutdown_timeout_ms);
        set(&mut s.validation.max_message_bytes, self.max_message_bytes);
        set(&mut s.validation.max_items, self.max_items);
        set(&mut s.validation.max_string_chars, self.max_string_chars);
        // An empty REDIS_URL means no Redis tier, like an unset one.
        set(
            &mut s.redis.url,
            self.redis_url
                .map(|url| (!url.is_empty()).then(|| url.into())),
        );
        set(&mut s.redis.ttl_secs, self.redis_ttl_secs);
        set(&mut s.redis.key_prefix, self.redis_key_prefix);
        set(&mut s.cache.max_bytes, self.cache_max_bytes);
        set(&mut s.cache.warmup_orders, self.cache_warmup_orders);
        set(&mut s.http.addr, self.http_addr);
        set(&mut s.http.request_timeout_ms, self.http_request_timeout_ms);
        set(
            &mut s.http.header_read_timeout_ms,
            self.http_header_read_timeout_ms,
        );
        set(&mut s.http.max_concurrency, self.http_max_concurrency);
        set(&mut s.log.format, self.log_format);
    }
}

impl Cli {
    /// The settings from every layer, checked.
    pub fn settings(&mut self) -> anyhow::Result<Settings> {
        let mut settings = Settings::load(self.config.as_deref())?;
        std::mem::take(&mut self.settings).apply(&mut settings);
        settings.check()?;
        Ok(settings)
    }
}
