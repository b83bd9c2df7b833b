//! The signals that stop a command the way Ctrl-C does: SIGINT, SIGTERM (a
//! `kill`, `timeout`, a service manager) and SIGHUP (its terminal closed),
//! unless it was started with SIGHUP ignored, as `nohup` starts it.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Resolves with the name of the first stop signal that arrives.
pub async fn stop_requested() -> &'static str {
    let term = listen(SignalKind::terminate());
    // Listening would undo `nohup`, which asks that a hang-up be ignored.
    let hangup = (!hangup_ignored()).then(|| listen(SignalKind::hangup()));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = received(term) => "SIGTERM",
        () = received(hangup.flatten()) => "SIGHUP",
    }
}

fn listen(kind: SignalKind) -> Option<Signal> {
    signal(kind)
        .inspect_err(
            |e| tracing::error!(error = %e, "cannot listen for signal {}", kind.as_raw_value()),
        )
        .ok()
}

async fn received(signal: Option<Signal>) {
    match signal {
        Some(mut signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Whether this process was started with SIGHUP ignored, from the kernel's
/// account of it (Linux). Where that cannot be read, it is taken as ignored,
/// so a hang-up acts as it always did there.
fn hangup_ignored() -> bool {
    const SIGHUP_BIT: u64 = 1; // Signal 1 is the lowest bit of the mask.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_none_or(|mask| mask & SIGHUP_BIT != 0)
}
