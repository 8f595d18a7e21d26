//! Saiki's relay: one binary, `saiki-relay`, whose daemons move change records between
//! PostgreSQL, Kafka and the ODS. The tree is the architecture (ARCHITECTURE.md):
//!
//! - [`source`]: slot → Kafka. The session loop, the ack discipline (`source/ack.rs`), the
//!   routing of records to topics and keys, and the incremental snapshots.
//! - [`sink`]: Kafka → ODS, exactly once. The consumer loop, the offset ledger
//!   (`sink/offsets.rs`), the pure planner (`sink/plan.rs`), batches in flight and the ODS
//!   statements.
//! - [`ingest`]: the HTTP event API: event types with JSON Schemas, batches of events
//!   validated and produced to Kafka, bearer tokens.
//! - `lake` (feature `lake`, on by default): Kafka → Apache Iceberg change-log tables, exactly
//!   once (the table marks of `lake/ledger.rs`), on the `iceberg` crate's SQL catalog and
//!   Parquet writers.
//! - [`pg`]: the PostgreSQL client pieces both sides share: the replication wire codec,
//!   connections, TLS with libpq's `sslmode`, DSN parsing, SQL quoting.
//! - Beside them, shared by every daemon: [`config`], [`error`] and [`retry`] (transient
//!   errors retried, definite ones stop), [`kafka`], [`metrics`], [`http`], [`status`],
//!   [`cli`].
//!
//! Modules are crate-private. What the integration tests, the examples and the benchmarks
//! drive directly is re-exported below, and nothing else.

pub mod cli;
pub(crate) mod config;
pub(crate) mod error;
pub(crate) mod event_registry;
pub(crate) mod event_table;
pub(crate) mod evolve;
pub(crate) mod http;
pub(crate) mod ingest;
pub(crate) mod kafka;
#[cfg(feature = "lake")]
pub(crate) mod lake;
pub(crate) mod metrics;
pub(crate) mod pg;
pub(crate) mod retry;
pub(crate) mod sink;
pub(crate) mod source;
pub(crate) mod status;

/// The sink's apply path, driven by `tests/it/apply.rs` and `examples/sink_bench.rs` without
/// a broker: a batch planned from messages, applied by an [`Applier`] on its own task.
pub use sink::batch::{plan as plan_batch, Applier, Done};
pub use sink::ods::{ApplyError, Ods, PartitionOffsets};

/// The lake's write path without Kafka, driven by `examples/sink_bench.rs` (bench/lake's
/// engine-only figure).
#[cfg(feature = "lake")]
pub use lake::engine::LakeEngine;

/// The metrics, checked against the docs and the dashboard by `tests/it/docs.rs`.
pub use metrics::{
    Exporter, IngestMetrics, LakeMetrics, SinkMetrics, SourceMetrics, ALL as METRIC_NAMES,
};
