//! Saiki's PostgreSQL extension. Its shared library `saiki.so` is two things:
//!
//! - the logical decoding output plugin `saiki` ([`plugin`]), loaded by the walsender by
//!   library name, with or without `CREATE EXTENSION`;
//! - the DBA functions of `CREATE EXTENSION saiki` in schema `saiki` ([`dba`]), the chunk
//!   reader of the relay's snapshots ([`snapshot`]), and the event triggers that capture DDL
//!   ([`ddl`]).
//!
//! The record format, options and JSON encoding live in `saiki_core`, which does not link
//! PostgreSQL; this crate is the unsafe shell that feeds it from the WAL.

mod dba;
mod ddl;
mod plugin;
mod relation;
mod snapshot;
mod value;
mod wal;

::pgrx::pg_module_magic!(name, version);

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
