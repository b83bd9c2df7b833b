//! order-service: takes orders off Kafka, keeps them in PostgreSQL and serves
//! them over HTTP from a tiered cache.

pub mod app;
pub mod cache;
pub mod cli;
pub mod configuration;
pub mod dead_letters;
pub mod documents;
pub mod domain;
pub mod events;
pub mod http;
pub mod ingest;
pub mod kafka_errors;
pub mod open_files;
#[cfg(feature = "producer")]
pub mod producer;
pub mod publish;
pub mod signals;
pub mod store;
pub mod telemetry;
pub mod validate;

/// The value behind `mutex`. Every writer of the service's mutexes leaves a
/// whole value (each write is one assignment), so a lock poisoned by a writer
/// that panicked is still read.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
