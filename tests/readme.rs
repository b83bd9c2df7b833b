//! The README's configuration table against the command line it documents:
//! every setting with its environment variable, flag and default, no more and
//! no fewer, so neither can drift from the other.

use std::collections::BTreeMap;

use clap::CommandFactory;
use order_service::cli::Cli;

/// `ENV -> (flag, default)` from the README's table; the default only when it
/// is one literal in backticks.
fn readme_settings() -> BTreeMap<String, (String, Option<String>)> {
    let readme = include_str!("../README.md");
    let table = readme
        .split("| Environment | Flag | Default | Meaning |")
        .nth(1)
        .expect("the configuration table");
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let literal = |cell: &str| {
                let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
                (!inner.contains('`')).then(|| inner.to_owned())
            };
            (
                literal(cells[1]).expect("an environment variable"),
                (cells[2].trim_matches('`').to_owned(), literal(cells[3])),
            )
        })
        .collect()
}

/// `ENV -> (flag, help)` from clap.
fn cli_settings() -> BTreeMap<String, (String, String)> {
    Cli::command()
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy().into_owned();
            let flag = format!("--{}", arg.get_long()?);
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            Some((env, (flag, help)))
        })
        .collect()
}

#[test]
fn every_setting_is_in_the_readme_with_its_flag() {
    let readme = readme_settings();
    let cli = cli_settings();
    assert!(cli.len() > 20, "settings not found: {cli:?}");
    for (env, (flag, _)) in &cli {
        let Some((documented, _)) = readme.get(env) else {
            panic!("{env} ({flag}) is missing from the README's configuration table");
        };
        assert_eq!(documented, flag, "{env}");
    }
    for env in readme.keys() {
        // RUST_LOG is read by the log filter, not by clap.
        assert!(
            cli.contains_key(env) || env == "RUST_LOG",
            "the README documents {env}, which no flag reads"
        );
    }
}

#[test]
fn literal_defaults_match_the_help() {
    let cli = cli_settings();
    for (env, (_, default)) in readme_settings() {
        let (Some(default), Some((_, help))) = (default, cli.get(&env)) else {
            continue;
        };
        assert!(
            help.contains(&format!("[default: {default}]")),
            "{env}: the README says {default}, --help says {help:?}"
        );
    }
}
