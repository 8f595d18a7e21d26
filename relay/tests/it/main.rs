//! The relay's integration tests, one binary (linked once: librdkafka, tokio-postgres and
//! the test rig are large), one module per behaviour area. They run against real PostgreSQL
//! 15 clusters and the tansu broker (docs/testing.md).

mod apply;
mod common;
mod ddl;
mod docs;
mod failover;
mod faults;
mod ingest;
mod lake;
mod shards;
mod sink;
mod snapshot;
mod source;
mod stream;
mod tls;
