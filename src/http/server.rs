//! Serving. One listener; its accept loop hands each connection, in turn, to
//! one of `HTTP_WORKERS` threads, each running a single-threaded runtime: a
//! request is read, answered and written on one thread, with no work stealing
//! and no wake-ups across threads. One listener rather than one per worker
//! (`SO_REUSEPORT`) keeps the port exclusive: a second instance started on the
//! same address fails instead of silently sharing the traffic and the
//! instance's identity. axum::serve gives no way to bound how long a client
//! may take to send its request head, so a slow client (slowloris) could hold
//! a connection forever; the workers set that bound and drain on shutdown.
//! Clients hold at most `HTTP_MAX_CONNECTIONS` connections: beyond that the
//! accept loop waits for one to close, leaving the process's other files to
//! ingest (see `open_files`).

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::configuration::HttpSettings;
use crate::telemetry::{LogThrottle, Metrics};

/// How long open connections (live feeds included) get to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(3);

/// Accepted connections waiting for their worker; beyond this the accept loop
/// waits and the kernel's backlog holds the rest.
const HANDOVER_QUEUE: usize = 1024;

/// Connections the kernel holds for the accept loop (capped by its
/// `net.core.somaxconn`): room for a burst, and for clients waiting while
/// every connection allowed is held. The default of 128 would refuse them.
const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `addr`, as `TcpListener::bind` does but with a longer queue.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub struct Server {
    accept: tokio::task::JoinHandle<()>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts the workers and the accept loop (on the caller's runtime). They
    /// stop accepting when `shutdown` is cancelled, then drain. Each worker
    /// serves a router of its own from `make_router`, so the reference counts
    /// that every request bumps stay on its core. Clients hold at most
    /// `max_connections` connections at once.
    pub fn start(
        listener: TcpListener,
        make_router: impl Fn() -> Router,
        settings: &HttpSettings,
        max_connections: usize,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let count = match settings.workers {
            0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            n => n,
        };
        let connections = connection_builder(settings);
        let mut queues = Vec::with_capacity(count);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let (queue, incoming) = mpsc::channel(HANDOVER_QUEUE);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building an HTTP worker's runtime")?;
            let (router, connections, shutdown) =
                (make_router(), connections.clone(), shutdown.clone());
            let worker = std::thread::Builder::new()
                .name(format!("http-{index}"))
                .spawn(move || runtime.block_on(work(incoming, router, connections, shutdown)))
                .context("starting an HTTP worker thread")?;
            queues.push(queue);
            workers.push(worker);
        }
        let connections = Connections::new(max_connections, metrics);
        let accept = tokio::spawn(accept(listener, queues, connections, shutdown));
        Ok(Self { accept, workers })
    }

    /// Waits until the accept loop has stopped and every worker has drained.
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.accept.await.context("HTTP accept loop")?;
        let workers = self.workers;
        tokio::task::spawn_blocking(move || {
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("an HTTP worker panicked"))
            })
        })
        .await
        .context("waiting for the HTTP workers")?
    }
}

/// The connections clients hold, at most `max` at once.
struct Connections {
    slots: Arc<Semaphore>,
    max: usize,
    open: IntGauge,
}

/// One client's connection, counted until it closes.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Connections {
    fn new(max: usize, metrics: &Metrics) -> Self {
        let max = max.min(Semaphore::MAX_PERMITS);
        metrics
            .http_connections_limit
            .set(i64::try_from(max).unwrap_or(i64::MAX));
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open: metrics.http_connections_open.clone(),
        }
    }

    /// A slot for the next connection, once one is free.
    async fn take(&self, logs: &LogThrottle) -> Slot {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if logs.worth_logging("connections at their limit") {
                    tracing::warn!(
                        max = self.max,
                        "HTTP clients hold {} connections, the most allowed \
                         (HTTP_MAX_CONNECTIONS); new ones wait until one closes",
                        self.max
                    );
                }
                self.slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed")
            }
        };
        self.open.inc();
        Slot {
            _permit: permit,
            open: self.open.clone(),
        }
    }
}

async fn accept(
    listener: TcpListener,
    queues: Vec<mpsc::Sender<(std::net::TcpStream, Slot)>>,
    connections: Connections,
    shutdown: CancellationToken,
) {
    let logs = LogThrottle::default();
    for queue in queues.iter().cycle() {
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = connections.take(&logs) => slot,
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    if logs.worth_logging(&e.to_string()) {
                        tracing::warn!(error = %e, "accept failed; trying again every 50 ms");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Leaves this runtime's reactor; the worker registers it with its own.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand an accepted connection over");
                continue;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            sent = queue.send((stream, slot)) => if sent.is_err() {
                tracing::error!("an HTTP worker has stopped; no longer accepting");
                break;
            },
        }
    }
}

/// How every connection is served: HTTP/1.1 with the request-head timeout,
/// and HTTP/2 beside it only when allowed, as telling the two apart means
/// reading ahead on every new connection.
fn connection_builder(settings: &HttpSettings) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(settings.header_read_timeout_ms));
    if settings.allow_http2 {
        builder
    } else {
        builder.http1_only()
    }
}

/// One worker: serves the connections handed to it until shutdown, then
/// gives them the drain period to finish.
async fn work(
    mut incoming: mpsc::Receiver<(std::net::TcpStream, Slot)>,
    router: Router,
    builder: Builder<TokioExecutor>,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, slot) = tokio::select! {
            () = shutdown.cancelled() => break,
            next = incoming.recv() => match next {
                Some(next) => next,
                None => break,
            },
        };
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take over an accepted connection");
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        // No route upgrades the connection, so the plain connection serves.
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("open connections closed at the end of the drain period");
    }
}
