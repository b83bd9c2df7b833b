//! The settings on the command line: each [`Setting`] is a flag and an
//! environment variable of every subcommand, with its help and default.

use clap::builder::PossibleValuesParser;
use clap::{Arg, ArgMatches, Args, FromArgMatches};

use crate::configuration::{Setting, Settings};

/// The argument's id in clap: a subcommand's own argument of the same name
/// (`produce --max-items`) takes its place there.
fn id(setting: &Setting) -> String {
    setting.env.to_lowercase()
}

fn arg(setting: &Setting, defaults: &Settings) -> Arg {
    let arg = Arg::new(id(setting))
        .long(setting.flag())
        .env(setting.env)
        .global(true)
        .hide_env_values(setting.secret)
        .help_heading(setting.heading)
        .value_name(setting.value_name)
        .help(setting.help(defaults));
    let choices = (setting.choices)(defaults);
    if choices.is_empty() {
        arg
    } else {
        arg.value_parser(PossibleValuesParser::new(choices))
            .ignore_case(true)
    }
}

/// The settings given as flags or in the environment. Nothing given: the
/// file or the default stands.
#[derive(Debug, Default)]
pub struct SettingsArgs {
    given: Vec<(&'static Setting, String)>,
}

impl Args for SettingsArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let defaults = Settings::default();
        cmd.args(Setting::all().map(|s| arg(s, &defaults)))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for SettingsArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = Setting::all()
            .filter_map(|s| Some((s, matches.try_get_one::<String>(&id(s)).ok()??.clone())))
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
        for (setting, value) in &self.given {
            setting.apply(settings, value)?;
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
    use crate::configuration::{LogFormat, SaslMechanism, SecurityProtocol};
    use clap::Parser;

    fn shown(settings: &Settings) -> Vec<Option<String>> {
        Setting::all().map(|s| s.shown(settings)).collect()
    }

    /// Clap's own checks of every subcommand (unique ids and flags, among others).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn names_are_unique() {
        let envs: HashSet<_> = Setting::all().map(|s| s.env).collect();
        let keys: HashSet<_> = Setting::all().map(|s| s.key).collect();
        assert_eq!(envs.len(), Setting::all().count());
        assert_eq!(keys.len(), Setting::all().count());
    }

    /// Each setting's key is where the file sets it: a file giving every
    /// default under its key loads to the defaults.
    #[test]
    fn every_key_is_read_from_the_config_file() {
        let defaults = Settings::default();
        let mut sections: std::collections::BTreeMap<&str, String> = Default::default();
        for s in Setting::all() {
            let Some(value) = s.shown(&defaults) else {
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
        for s in Setting::all() {
            if let Some(value) = s.shown(&defaults) {
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

    /// The check declared with a setting is made, and its error names it.
    #[test]
    fn declared_checks_name_the_setting() {
        let refused = |flag: &str, value: &str| {
            let args = ["order-service", flag, value, "validate"];
            Cli::try_parse_from(args)
                .unwrap()
                .settings()
                .unwrap_err()
                .to_string()
        };
        for (flag, value, error) in [
            (
                "--ingest-batch-size",
                "0",
                "INGEST_BATCH_SIZE: must be greater than 0",
            ),
            (
                "--database-connect-timeout-ms",
                "0",
                "DATABASE_CONNECT_TIMEOUT_MS: must be greater than 0",
            ),
            ("--max-items", "0", "MAX_ITEMS: must be greater than 0"),
            ("--kafka-topic", " ", "KAFKA_TOPIC: must not be empty"),
            (
                "--kafka-session-timeout-ms",
                "5999",
                "KAFKA_SESSION_TIMEOUT_MS: must be between 6000 and 1800000",
            ),
            (
                "--migration-database-url",
                "mysql://h/db",
                "MIGRATION_DATABASE_URL: must be a postgres:// URL",
            ),
        ] {
            assert_eq!(refused(flag, value), error);
        }
        let error = refused("--redis-url", "http://cache:6379");
        assert!(error.starts_with("REDIS_URL: not a Redis URL"), "{error}");
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
