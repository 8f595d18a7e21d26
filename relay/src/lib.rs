//! Saiki's relay as a library, so that the binary and the tests share it.
//!
//! - [`source`]: slot → Kafka, with the ack discipline of [`ack`].
//! - [`wire`], [`pg`], [`tls`]: the replication protocol client (pure codec, async
//!   connection, TLS with libpq's sslmode).
//! - [`route`]: topics, keys, values, headers.
//! - [`sink`]: Kafka → ODS, with the pure planner [`apply`] and the ODS side [`ods`].
//! - [`config`], [`dsn`], [`error`], [`metrics`], [`http`], [`status`]: operations.

pub mod ack;
pub mod apply;
pub mod batch;
pub mod config;
pub mod dsn;
pub mod error;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod ods;
pub mod pg;
pub mod route;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod status;
pub mod tls;
pub mod wire;
