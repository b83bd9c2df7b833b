//! Work that touches the service's connections runs on the runtime that owns
//! them. Each HTTP worker runs a single-threaded runtime of its own (see
//! `server.rs`), and a socket is driven by the runtime that opened it: a
//! PostgreSQL connection opened by a worker would later serve ingest through a
//! thread that serves HTTP and stops first on shutdown. So every request that
//! uses the pool or Redis is handed to the main runtime, which opens and drives
//! every connection; the in-memory cache, metrics and static routes are served
//! in place.

use std::future::Future;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

use super::error::ApiError;

#[derive(Clone, Debug)]
pub struct Io(Handle);

impl Io {
    /// The runtime of the calling task: the one that owns the connections.
    pub fn current() -> Self {
        Self(Handle::current())
    }

    /// Runs `work` on the I/O runtime and waits for it. A panic in `work`
    /// carries on in the caller, as if it had run there; a caller that stops
    /// waiting (the request timed out, the client left) stops `work` too.
    pub async fn run<F>(&self, work: F) -> Result<F::Output, ApiError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match AbortOnDropHandle::new(self.0.spawn(work)).await {
            Ok(output) => Ok(output),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(ApiError::Stopping),
        }
    }
}

/// Middleware for the routes that use the pool: the rest of the request runs
/// on the I/O runtime.
pub async fn on_io(State(io): State<Io>, request: Request, next: Next) -> Response {
    match io.run(next.run(request)).await {
        Ok(response) => response,
        Err(stopping) => stopping.into_response(),
    }
}
