//! Logs and metrics.

mod log_throttle;
mod metrics;

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{fmt, EnvFilter};

pub use log_throttle::LogThrottle;
pub use metrics::Metrics;

use crate::configuration::LogFormat;

/// Log lines written by a thread of their own, so that a reader of stderr
/// that stops reading (a stalled journal or pipe) never stops ingest or HTTP:
/// past this many lines waiting, lines are dropped and counted instead.
const LINES_WAITING: usize = 16 * 1024;

/// Lines dropped because stderr was not read, since the start.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber: text on a terminal, JSON otherwise (unless
/// chosen). The level comes from RUST_LOG, `info` by default. The lines still
/// waiting are written when the returned guard is dropped, for at most a
/// second.
#[must_use = "dropping the guard stops the writing of log lines"]
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LINES_WAITING)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let builder = fmt().with_env_filter(filter).with_writer(writer);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
    guard
}

/// Log lines dropped so far because stderr was not read fast enough.
pub fn log_lines_dropped() -> u64 {
    DROPPED
        .get()
        .map_or(0, |counter| counter.dropped_lines() as u64)
}

/// Says, once stderr is read again, how many lines were lost while it was not.
/// The count is the total since the start: while stderr is still not read,
/// this line is dropped too, and the next one says it.
pub async fn report_dropped_lines() {
    let mut told = log_lines_dropped();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let dropped = log_lines_dropped();
        if dropped > told {
            tracing::warn!(
                since_start = dropped,
                "log lines dropped: stderr was not read fast enough, and ingest and HTTP \
                 do not wait for it"
            );
            told = dropped;
        }
    }
}
