//! The relay's one error type. Every error is either **transient** (the relay retries with
//! backoff and logs each attempt: a server down, a connection lost, a slot busy, a broker
//! unreachable) or **definite** (the relay stops with a message that says what to do and a
//! non-zero exit code: bad config, wrong password, missing permission, wal_level, a slot of
//! another plugin). Nothing is confirmed to the slot on any error path, so none loses data.

use crate::pg::wire::{ProtocolError, ServerError};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot reach {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {target} lost: {source}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("PostgreSQL {target}: {error}")]
    Server {
        target: String,
        error: Box<ServerError>,
    },
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("replication slot \"{slot}\" uses plugin {plugin}, not saiki: give saiki-relay its own slot (source.slot), or drop that slot if it is unused")]
    WrongPlugin { slot: String, plugin: String },
    #[error("replication slot \"{slot}\" belongs to database {actual}, not {expected}: use another slot name (source.slot)")]
    WrongDatabase {
        slot: String,
        expected: String,
        actual: String,
    },
    #[error("authentication: {0}")]
    Auth(String),
    #[error("TLS to {target}: {message}")]
    Tls { target: String, message: String },
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("Kafka configuration: {0}")]
    KafkaConfig(String),
    #[error("change record: {0}")]
    Record(String),
    /// A broken invariant or a failed task inside the relay: a bug, not the data's fault.
    #[error("internal error (a bug in saiki-relay: please report it with the log): {0}")]
    Internal(String),
    /// An ODS table stopped at a schema change it cannot follow (its topic waits in
    /// `saiki_sink.stopped`); the session starts again without that topic.
    #[error("ODS table {table} stopped: {message}")]
    TableStopped { table: String, message: String },
    /// The lake's Iceberg catalog or warehouse (`lake/`).
    #[error("lake: {message}")]
    Lake { message: String, transient: bool },
    #[error("ODS {target}: {message}")]
    Ods {
        target: String,
        /// SQLSTATE; `None` for connection-level failures.
        code: Option<String>,
        message: String,
    },
}

impl RelayError {
    /// Whether retrying (with backoff) can succeed without anyone changing anything.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            RelayError::Connect { .. }
            | RelayError::Io { .. }
            | RelayError::Protocol(_)
            | RelayError::Kafka(_)
            | RelayError::TableStopped { .. } => true,
            RelayError::Server { error, .. } => server_error_is_transient(&error.code),
            RelayError::Lake { transient, .. } => *transient,
            RelayError::Ods { code: None, .. } => true,
            RelayError::Ods { code: Some(c), .. } => server_error_is_transient(c),
            // A record the relay cannot read means the plugin and the relay disagree on the
            // format: retrying reads the same record again.
            _ => false,
        }
    }

    /// The process exit code for a definite error: 2 configuration, 3 source database,
    /// 4 Kafka, 5 data, 6 ODS database or lake, 7 internal.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            RelayError::Config(_) => 2,
            RelayError::Kafka(_) | RelayError::KafkaConfig(_) => 4,
            RelayError::Record(_) => 5,
            RelayError::Ods { .. } | RelayError::TableStopped { .. } | RelayError::Lake { .. } => 6,
            RelayError::Internal(_) => 7,
            _ => 3,
        }
    }
}

/// SQLSTATE classes and codes worth retrying: connection problems, shutdowns, resources,
/// a slot in use by another process, serialization conflicts.
pub(crate) fn server_error_is_transient(code: &str) -> bool {
    // 55006 object_in_use: the slot is active in another process (an old relay still
    // holding it after a crash, until its walsender notices). 55P03 lock_not_available: a
    // lock timeout, e.g. behind a killed sink's transaction that its backend has not yet
    // noticed is gone.
    matches!(
        code.get(..2),
        Some("08") | Some("53") | Some("57") | Some("40") | Some("58")
    ) || code == "55006"
        || code == "55P03"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> RelayError {
        RelayError::Server {
            target: "t".into(),
            error: Box::new(ServerError {
                code: code.into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn transient_and_definite_errors_are_told_apart() {
        assert!(server("57P01").is_transient(), "admin shutdown");
        assert!(server("55006").is_transient(), "slot active elsewhere");
        assert!(server("53300").is_transient(), "too many connections");
        assert!(!server("28P01").is_transient(), "wrong password");
        assert!(!server("42501").is_transient(), "permission");
        assert!(!server("55000").is_transient(), "wal_level");
        assert!(!RelayError::Config("x".into()).is_transient());
        assert!(!RelayError::WrongPlugin {
            slot: "s".into(),
            plugin: "p".into()
        }
        .is_transient());
        assert_eq!(RelayError::Config("x".into()).exit_code(), 2);
        assert_eq!(server("28P01").exit_code(), 3);
        let bug = RelayError::Internal("a join error".into());
        assert!(!bug.is_transient());
        assert_eq!(bug.exit_code(), 7);
    }
}
