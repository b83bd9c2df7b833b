//! Every setting, declared once: its environment variable and flag, its key
//! in the `--config` file, its help and whether it is secret. Clap's
//! arguments, `--help` (with defaults from [`Settings::default`]) and the
//! layering over the file are derived from [`SETTINGS`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Arg, ArgMatches, Args, FromArgMatches, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::configuration::{LogFormat, SaslMechanism, SecurityProtocol, Settings};

/// One setting of the service, declared once: its environment variable (the
/// flag is the same name in lower case with dashes), where it goes in
/// [`Settings`] (which is also its key in the `--config` file), its help, and
/// whether its value is secret. Defaults live in [`Settings::default`] and are
/// shown in `--help` from there.
pub struct Setting {
    pub env: &'static str,
    /// `section.field`: the field of [`Settings`] and the TOML key.
    pub key: &'static str,
    heading: &'static str,
    value_name: &'static str,
    help: &'static str,
    secret: bool,
    /// What `--help` says when the default is unset.
    unset: Option<&'static str>,
    /// The values allowed, if they are a fixed set (from the field's type).
    choices: fn(&Settings) -> Vec<PossibleValue>,
    set: fn(&mut Settings, &str) -> Result<(), String>,
    default: fn(&Settings) -> Option<String>,
}

impl Setting {
    pub fn flag(&self) -> String {
        self.id().replace('_', "-")
    }

    /// The argument's id in clap: a subcommand's own argument of the same
    /// name (`produce --max-items`) takes its place there.
    fn id(&self) -> String {
        self.env.to_lowercase()
    }

    /// The help line, ending with the default taken from [`Settings::default`].
    pub fn help(&self, defaults: &Settings) -> String {
        match ((self.default)(defaults), self.unset) {
            (Some(default), _) => format!("{} [default: {default}]", self.help),
            (None, Some(unset)) => format!("{} [default: {unset}]", self.help),
            (None, None) => self.help.to_owned(),
        }
    }

    fn arg(&self, defaults: &Settings) -> Arg {
        let arg = Arg::new(self.id())
            .long(self.flag())
            .env(self.env)
            .global(true)
            .hide_env_values(self.secret)
            .help_heading(self.heading)
            .value_name(self.value_name)
            .help(self.help(defaults));
        let choices = (self.choices)(defaults);
        if choices.is_empty() {
            arg
        } else {
            arg.value_parser(PossibleValuesParser::new(choices))
                .ignore_case(true)
        }
    }

    fn apply(&self, settings: &mut Settings, value: &str) -> anyhow::Result<()> {
        (self.set)(settings, value).map_err(|e| {
            if self.secret {
                anyhow::anyhow!("{}: invalid value ({e})", self.env)
            } else {
                anyhow::anyhow!("{}: invalid value '{value}' ({e})", self.env)
            }
        })
    }
}

/// How a setting's type reads a flag or environment value and shows its default.
trait FlagValue: Sized {
    fn read(value: &str) -> Result<Self, String>;
    fn show(&self) -> Option<String>;
    /// The values allowed, if they are a fixed set.
    fn choices() -> Vec<PossibleValue> {
        Vec::new()
    }
}

macro_rules! flag_value_from_str {
    ($($t:ty),*) => {$(
        impl FlagValue for $t {
            fn read(value: &str) -> Result<Self, String> {
                value.parse().map_err(|e| format!("{e}"))
            }
            fn show(&self) -> Option<String> {
                Some(self.to_string())
            }
        }
    )*};
}
flag_value_from_str!(u32, u64, usize, String, SocketAddr);

impl FlagValue for SecretString {
    fn read(value: &str) -> Result<Self, String> {
        Ok(value.into())
    }
    /// Only ever called on the built-in defaults, which hold no password.
    fn show(&self) -> Option<String> {
        Some(self.expose_secret().to_owned())
    }
}

/// An optional name: given, even empty, it is set.
impl FlagValue for Option<String> {
    fn read(value: &str) -> Result<Self, String> {
        Ok(Some(value.to_owned()))
    }
    fn show(&self) -> Option<String> {
        self.clone()
    }
}

/// An optional URL: empty means unset, like an absent one.
impl FlagValue for Option<SecretString> {
    fn read(value: &str) -> Result<Self, String> {
        Ok((!value.is_empty()).then(|| value.into()))
    }
    fn show(&self) -> Option<String> {
        None
    }
}

/// A file: empty means unset, like an absent one.
impl FlagValue for Option<PathBuf> {
    fn read(value: &str) -> Result<Self, String> {
        Ok((!value.is_empty()).then(|| value.into()))
    }
    fn show(&self) -> Option<String> {
        None
    }
}

impl FlagValue for bool {
    fn read(value: &str) -> Result<Self, String> {
        value
            .to_ascii_lowercase()
            .parse()
            .map_err(|e| format!("{e}"))
    }
    fn show(&self) -> Option<String> {
        Some(self.to_string())
    }
    fn choices() -> Vec<PossibleValue> {
        vec![PossibleValue::new("true"), PossibleValue::new("false")]
    }
}

/// A value of a fixed set, by its name in any case.
macro_rules! flag_value_enum {
    ($($t:ty),*) => {$(
        impl FlagValue for $t {
            fn read(value: &str) -> Result<Self, String> {
                <Self as ValueEnum>::from_str(value, true)
            }
            fn show(&self) -> Option<String> {
                self.to_possible_value().map(|v| v.get_name().to_owned())
            }
            fn choices() -> Vec<PossibleValue> {
                Self::value_variants()
                    .iter()
                    .filter_map(ValueEnum::to_possible_value)
                    .collect()
            }
        }
    )*};
}
flag_value_enum!(LogFormat, SecurityProtocol, SaslMechanism);

fn choices_of<T: FlagValue>(_: &T) -> Vec<PossibleValue> {
    T::choices()
}

/// A [`Setting`] for the field at `section.field`.
macro_rules! setting {
    ($env:literal, $section:ident . $field:ident, $heading:literal, $value_name:literal, $help:literal $(, $opt:ident = $val:expr)* $(,)?) => {
        Setting {
            env: $env,
            key: concat!(stringify!($section), ".", stringify!($field)),
            heading: $heading,
            value_name: $value_name,
            help: $help,
            set: |s, v| {
                s.$section.$field = FlagValue::read(v)?;
                Ok(())
            },
            default: |s| FlagValue::show(&s.$section.$field),
            choices: |s| choices_of(&s.$section.$field),
            ..Setting { $($opt: $val,)* ..Setting::NONE }
        }
    };
}

impl Setting {
    /// The fields a [`setting!`] may leave out.
    const NONE: Setting = Setting {
        env: "",
        key: "",
        heading: "",
        value_name: "",
        help: "",
        secret: false,
        unset: None,
        choices: |_| Vec::new(),
        set: |_, _| Ok(()),
        default: |_| None,
    };
}

/// Every setting, in the order `--help` and the README show them.
#[rustfmt::skip]
pub const SETTINGS: &[Setting] = &[
    setting!("DATABASE_URL", database.url, "Database", "URL",
        "PostgreSQL URL of the service role", secret = true),
    setting!("MIGRATION_DATABASE_URL", database.migration_url, "Database", "URL",
        "PostgreSQL URL of the owner role, used by `migrate`", secret = true),
    setting!("DATABASE_SERVICE_ROLE", database.service_role, "Database", "ROLE",
        "Role that `migrate` grants read and write access to", unset = Some("the user in DATABASE_URL")),
    setting!("DATABASE_MAX_CONNECTIONS", database.max_connections, "Database", "N",
        "Connections in the service's pool"),
    setting!("KAFKA_BROKERS", kafka.brokers, "Kafka", "LIST",
        "Kafka bootstrap servers, comma-separated host:port"),
    setting!("KAFKA_TOPIC", kafka.topic, "Kafka", "TOPIC", "Topic the orders arrive on"),
    setting!("KAFKA_DLQ_TOPIC", kafka.dlq_topic, "Kafka", "TOPIC",
        "Topic rejected messages go to, with the reasons in headers"),
    setting!("KAFKA_GROUP_ID", kafka.group_id, "Kafka", "GROUP",
        "Consumer group; instances in one group share the partitions"),
    setting!("KAFKA_GROUP_INSTANCE_ID", kafka.group_instance_id, "Kafka", "NAME",
        "Stable member name of this instance in the group (static membership), e.g. the pod name"),
    setting!("KAFKA_SESSION_TIMEOUT_MS", kafka.session_timeout_ms, "Kafka", "MS",
        "How long the group waits for a silent member before moving its partitions, in ms"),
    setting!("KAFKA_SECURITY_PROTOCOL", kafka.security_protocol, "Kafka", "PROTOCOL",
        "How connections to the brokers are made: TLS (ssl), SASL sign-in (sasl_plaintext), or both (sasl_ssl)"),
    setting!("KAFKA_SASL_MECHANISM", kafka.sasl_mechanism, "Kafka", "MECHANISM",
        "How the SASL user name and password sign in"),
    setting!("KAFKA_SASL_USERNAME", kafka.sasl_username, "Kafka", "USER",
        "SASL user name, with sasl_plaintext or sasl_ssl"),
    setting!("KAFKA_SASL_PASSWORD", kafka.sasl_password, "Kafka", "PASSWORD",
        "SASL password, with sasl_plaintext or sasl_ssl", secret = true),
    setting!("KAFKA_SSL_CA_LOCATION", kafka.ssl_ca_location, "Kafka", "FILE",
        "PEM file of the authorities the brokers' certificates are checked against, with ssl or sasl_ssl", unset = Some("the system's")),
    setting!("KAFKA_SSL_CERTIFICATE_LOCATION", kafka.ssl_certificate_location, "Kafka", "FILE",
        "PEM file of this client's certificate, for brokers that ask for one (with KAFKA_SSL_KEY_LOCATION)"),
    setting!("KAFKA_SSL_KEY_LOCATION", kafka.ssl_key_location, "Kafka", "FILE",
        "PEM file of this client's private key"),
    setting!("KAFKA_SSL_KEY_PASSWORD", kafka.ssl_key_password, "Kafka", "PASSWORD",
        "Passphrase of the private key, if it is encrypted", secret = true),
    setting!("INGEST_BATCH_SIZE", ingest.batch_size, "Ingest", "N",
        "Messages per database transaction, at most"),
    setting!("INGEST_BATCH_MAX_BYTES", ingest.batch_max_bytes, "Ingest", "BYTES",
        "Bytes of messages per database transaction, at most (a batch is written at either limit)"),
    setting!("INGEST_BATCH_LINGER_MS", ingest.batch_linger_ms, "Ingest", "MS",
        "Longest wait before a partial batch is written, in ms"),
    setting!("INGEST_MAX_BACKOFF_MS", ingest.max_backoff_ms, "Ingest", "MS",
        "Longest pause between retries while PostgreSQL is unreachable, in ms"),
    setting!("INGEST_WRITE_TIMEOUT_MS", ingest.write_timeout_ms, "Ingest", "MS",
        "Longest wait for PostgreSQL to finish a batch's write, in ms; then ingest pauses and retries on new sessions. The server ends a batch's statements and its idle transaction after the same time"),
    setting!("SHUTDOWN_TIMEOUT_MS", ingest.shutdown_timeout_ms, "Ingest", "MS",
        "Time allowed on SIGTERM/SIGINT to finish the batch in hand and leave the group, in ms"),
    setting!("DEAD_LETTER_PREVIEW_BYTES", ingest.dead_letter_preview_bytes, "Ingest", "BYTES",
        "First bytes of each rejected message kept in PostgreSQL with its reasons (0: none)"),
    setting!("MAX_MESSAGE_BYTES", validation.max_message_bytes, "Validation", "BYTES",
        "Messages larger than this are dead-lettered unread, in bytes"),
    setting!("MAX_ITEMS", validation.max_items, "Validation", "N", "Most items in one order"),
    setting!("MAX_STRING_CHARS", validation.max_string_chars, "Validation", "N",
        "Longest text field, in characters"),
    setting!("REDIS_URL", redis.url, "Cache", "URL",
        "Redis URL of the shared cache tier; unset means no Redis tier", secret = true),
    setting!("REDIS_TTL_SECS", redis.ttl_secs, "Cache", "SECS", "How long orders stay in Redis, in seconds"),
    setting!("REDIS_KEY_PREFIX", redis.key_prefix, "Cache", "PREFIX",
        "Prefix of every Redis key, so deployments can share one Redis"),
    setting!("CACHE_MAX_BYTES", cache.max_bytes, "Cache", "BYTES",
        "Memory budget of the in-process cache, in bytes"),
    setting!("CACHE_WARMUP_ORDERS", cache.warmup_orders, "Cache", "N",
        "Most recent orders loaded into the in-process cache at start"),
    setting!("HTTP_ADDR", http.addr, "HTTP", "HOST:PORT", "Address the HTTP server listens on"),
    setting!("HTTP_REQUEST_TIMEOUT_MS", http.request_timeout_ms, "HTTP", "MS",
        "Longest wait of one request for PostgreSQL or Redis, in ms; then it answers 408"),
    setting!("HTTP_HEADER_READ_TIMEOUT_MS", http.header_read_timeout_ms, "HTTP", "MS",
        "Time a client may take to send its request head, in ms; slower ones are cut off"),
    setting!("HTTP_MAX_CONCURRENCY", http.max_concurrency, "HTTP", "N",
        "Requests handled at once; more wait"),
    setting!("HTTP_WORKERS", http.workers, "HTTP", "N",
        "Threads serving HTTP, each with its own single-threaded runtime (0: one per core)"),
    setting!("HTTP_ALLOW_HTTP2", http.allow_http2, "HTTP", "BOOL",
        "Also serve HTTP/2 without TLS (prior knowledge); false serves HTTP/1.1 only, without reading ahead to tell the two apart"),
    setting!("LOG_FORMAT", log.format, "Logging", "FORMAT",
        "Log format; the level is set with RUST_LOG (e.g. info, order_service=debug)"),
];

/// The settings given as flags or in the environment, by [`SETTINGS`] entry.
/// Nothing given: the file or the default stands.
#[derive(Debug, Default)]
pub struct SettingsArgs {
    given: Vec<(usize, String)>,
}

impl Args for SettingsArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let defaults = Settings::default();
        cmd.args(SETTINGS.iter().map(|s| s.arg(&defaults)))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for SettingsArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = SETTINGS
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, matches.try_get_one::<String>(&s.id()).ok()??.clone())))
            .collect();
        Ok(Self { given })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl SettingsArgs {
    /// Lays the given flags and environment values over `settings`.
    pub fn apply(self, settings: &mut Settings) -> anyhow::Result<()> {
        for (i, value) in &self.given {
            SETTINGS[*i].apply(settings, value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::Write;

    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn shown(settings: &Settings) -> Vec<Option<String>> {
        SETTINGS.iter().map(|s| (s.default)(settings)).collect()
    }

    /// Clap's own checks of every subcommand (unique ids and flags, among others).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn names_are_unique() {
        let envs: HashSet<_> = SETTINGS.iter().map(|s| s.env).collect();
        let keys: HashSet<_> = SETTINGS.iter().map(|s| s.key).collect();
        assert_eq!(envs.len(), SETTINGS.len());
        assert_eq!(keys.len(), SETTINGS.len());
    }

    /// Each setting's key is where the file sets it: a file giving every
    /// default under its key loads to the defaults.
    #[test]
    fn every_key_is_read_from_the_config_file() {
        let defaults = Settings::default();
        let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
        for s in SETTINGS {
            let Some(value) = (s.default)(&defaults) else {
                continue;
            };
            let (section, field) = s.key.split_once('.').unwrap();
            // Numbers and booleans bare, the rest as TOML strings.
            let bare = value.parse::<i64>().is_ok() || value.parse::<bool>().is_ok();
            let value = if bare { value } else { format!("{value:?}") };
            *sections.entry(section).or_default() += &format!("{field} = {value}\n");
        }
        let text: String = sections
            .iter()
            .map(|(section, fields)| format!("[{section}]\n{fields}"))
            .collect();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        let loaded = Settings::load(Some(file.path())).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(shown(&loaded), shown(&defaults));
    }

    /// A default shown in `--help`, given back as a flag, is read as itself.
    #[test]
    fn every_default_reads_back() {
        let defaults = Settings::default();
        let mut settings = Settings::default();
        for s in SETTINGS {
            if let Some(value) = (s.default)(&defaults) {
                s.apply(&mut settings, &value).unwrap();
            }
        }
        assert_eq!(shown(&settings), shown(&defaults));
    }

    #[test]
    fn flags_lay_over_the_file() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"[ingest]\nbatch_size = 7\n[kafka]\ntopic = \"from-file\"\n[redis]\nurl = \"redis://127.0.0.1/\"\n")
            .unwrap();
        let path = file.path().to_str().unwrap();
        let args = [
            "order-service",
            "--config",
            path,
            "--kafka-topic",
            "from-flag",
            "--redis-url",
            "",
            "validate",
        ];
        let settings = Cli::try_parse_from(args).unwrap().settings().unwrap();
        assert_eq!(settings.kafka.topic, "from-flag");
        assert_eq!(settings.ingest.batch_size, 7);
        // An empty Redis URL turns the tier off, like an unset one.
        assert!(settings.redis.url.is_none());
    }

    /// Kafka's names in either case, as Java clients' properties write them
    /// (`SASL_SSL`) or librdkafka's (`sasl_ssl`), in flags and in the file.
    #[test]
    fn fixed_choices_are_read_in_any_case() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"scram-sha-256\"\nsasl_username = \"svc\"\nsasl_password = \"pw\"\n")
            .unwrap();
        let path = file.path().to_str().unwrap();
        let settings = Cli::try_parse_from(["order-service", "--config", path, "validate"])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(settings.kafka.security_protocol, SecurityProtocol::SaslSsl);
        assert_eq!(settings.kafka.sasl_mechanism, SaslMechanism::ScramSha256);
        let args = [
            "order-service",
            "--kafka-security-protocol",
            "Ssl",
            "--log-format",
            "JSON",
        ];
        let settings = Cli::try_parse_from(args.into_iter().chain(["validate"]))
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(settings.kafka.security_protocol, SecurityProtocol::Ssl);
        assert_eq!(settings.log.format, LogFormat::Json);
        let refused = Cli::try_parse_from([
            "order-service",
            "--kafka-security-protocol",
            "tls",
            "validate",
        ]);
        assert!(refused.is_err());
    }

    #[test]
    fn a_bad_value_names_the_setting() {
        let error = Cli::try_parse_from(["order-service", "--max-items", "many", "validate"])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "MAX_ITEMS: invalid value 'many' (invalid digit found in string)"
        );
        let error = Cli::try_parse_from(["order-service", "--http-addr", "nowhere", "validate"])
            .unwrap()
            .settings()
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("HTTP_ADDR: invalid value 'nowhere'"),
            "{error}"
        );
    }
}
