use std::process::ExitCode;

use clap::Parser;
use order_service::cli::{Cli, Command};
#[cfg(feature = "producer")]
use order_service::producer;
use order_service::{app, dead_letters, store, telemetry, validate};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let settings = match cli.settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Command::Validate(args) = &cli.command {
        return ExitCode::from(validate::run(args, &settings.validation));
    }
    let _logs = telemetry::init(settings.log.format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve => app::serve(settings).await.map(|()| true),
            Command::Migrate => {
                let role = settings.service_role()?;
                store::migrate(
                    settings.migration_options()?,
                    &role,
                    settings.connect_timeout(),
                )
                .await?;
                tracing::info!(service_role = %role, "migrations applied");
                Ok(true)
            }
            #[cfg(feature = "producer")]
            Command::Produce(args) => producer::run(*args, &settings.kafka).await,
            Command::DeadLetters(command) => dead_letters::run(command, &settings).await,
            Command::Validate(_) => unreachable!("handled before the runtime starts"),
        }
    });
    // A blocking client call still running (a seek, a read of the dead-letter
    // topic cut short by shutdown) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
