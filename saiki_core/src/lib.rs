//! Saiki's pure core, shared by the output plugin (`saiki_pg`), the relay and the tests.
//!
//! Nothing here links PostgreSQL: the record model ([`record`]) and its borrowed reader
//! ([`view`]), the logical-message prefixes of the contract, the plugin's option parser
//! ([`options`]), the JSON encoder the plugin writes records with ([`json`], [`encode`]),
//! LSNs ([`lsn`]) and timestamps ([`time`]). Everything is unit- and property-tested without a
//! server; `saiki_pg` is a thin shell that feeds these functions with values read from the WAL.

pub mod ddl;
pub mod encode;
pub mod error;
pub mod json;
pub mod loading;
pub mod lsn;
pub mod options;
pub mod record;
pub mod time;
pub mod view;

pub use error::Error;
pub use lsn::Lsn;
