//! Work that touches the service's connections runs on the runtime that owns
//! them. Each HTTP worker runs a single-threaded runtime of its own (see
//! `server.rs`), and a socket is driven by the runtime that opened it: a
//! PostgreSQL connection opened by a worker would later serve ingest through a
//! thread that serves HTTP and stops first on shutdown. So every request that
//! uses the pool or Redis is handed to the main runtime, which opens and drives
//! every connection; the in-memory cache, metrics and static routes are served
//! in place. That hand-over is also the only place a request waits, so the
//! request timeout is kept here: an answer from memory never arms a timer.

use std::future::Future;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

use super::error::ApiError;

#[derive(Clone, Debug)]
pub struct Io {
    runtime: Handle,
    /// How long a request may wait for its work (HTTP_REQUEST_TIMEOUT_MS).
    timeout: Duration,
}

impl Io {
    /// The runtime of the calling task: the one that owns the connections.
    pub fn current(timeout: Duration) -> Self {
        Self {
            runtime: Handle::current(),
            timeout,
        }
    }

    /// Runs `work` on the I/O runtime and waits for it, at most the request
    /// timeout. A panic in `work` carries on in the caller, as if it had run
    /// there; a caller that stops waiting (the timeout, the client left)
    /// stops `work` too.
    pub async fn run<F>(&self, work: F) -> Result<F::Output, ApiError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let work = AbortOnDropHandle::new(self.runtime.spawn(work));
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(_)) => Err(ApiError::Stopping),
            Err(_) => Err(ApiError::TimedOut(self.timeout)),
        }
    }
}

/// Middleware for the routes that use the pool: the rest of the request runs
/// on the I/O runtime.
pub async fn on_io(State(io): State<Io>, request: Request, next: Next) -> Response {
    match io.run(next.run(request)).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}
