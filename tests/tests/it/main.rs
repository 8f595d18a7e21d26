//! The extension's integration tests, one binary, one module per behaviour area: the
//! pg_regress suite, every built-in type, the walsender, loading, and the demo. Each starts
//! throw-away PostgreSQL 15 clusters through the rig of `src/lib.rs` (docs/testing.md).

mod demo;
mod loading;
mod regress;
mod types;
mod upgrade;
mod walsender;
