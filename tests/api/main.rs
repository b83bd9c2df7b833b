//! End-to-end tests: the real binary, PostgreSQL, Redis and broker. They
//! send generated orders, so they need the `producer` feature (a default).
#![cfg(feature = "producer")]

mod broker;
mod browser;
mod cache;
mod dead_letters;
mod faults;
mod helpers;
mod hostile;
mod http;
mod ingest;
mod observability;
mod pooler;
mod postgres_server;
mod producer;
mod schema;
mod security;
mod skeleton;
mod store;
mod transport_security;
mod validate;
mod writes_in_flight;
