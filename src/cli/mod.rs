//! The command line. Every setting is a flag and an environment variable; flags
//! win over the environment, which wins over the `--config` file.

mod settings;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use self::settings::SettingsArgs;
use crate::configuration::Settings;
use crate::dead_letters::DeadLettersCommand;
use crate::documents::Format;
#[cfg(feature = "producer")]
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
    #[cfg(feature = "producer")]
    Produce(Box<ProduceArgs>),
    /// Check orders from a JSON array or NDJSON file (or stdin) and print why each is invalid.
    Validate(ValidateArgs),
    /// List rejected messages recorded in PostgreSQL, or replay them to the orders topic.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
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

impl Cli {
    /// The settings from every layer, checked.
    pub fn settings(&mut self) -> anyhow::Result<Settings> {
        let mut settings = Settings::load(self.config.as_deref())?;
        std::mem::take(&mut self.settings).apply(&mut settings)?;
        settings.check()?;
        Ok(settings)
    }
}
