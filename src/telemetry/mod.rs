//! Logs and metrics.

mod log_throttle;
mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

pub use log_throttle::LogThrottle;
pub use metrics::Metrics;

use crate::configuration::LogFormat;

/// Installs the global subscriber: text on a terminal, JSON otherwise (unless
/// chosen). The level comes from RUST_LOG, `info` by default.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
}
