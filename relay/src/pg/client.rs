//! A tokio-postgres client on the relay's DSN parsing and TLS (libpq's `sslmode`): the sink's
//! ODS connection and the ingest relay's registry connection.

use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

use crate::error::RelayError;
use crate::pg::dsn::Dsn;

/// Connects to `dsn` (`what` names it in logs, the configuration key `key` in errors) as
/// `application` unless the DSN names one. Returns the client and a description of the server for logs and errors
/// (`host:port/dbname`); the connection runs on a task of its own.
pub(crate) async fn connect(
    dsn: &str,
    what: &str,
    key: &str,
    application: &str,
) -> Result<(Client, String), RelayError> {
    let dsn = Dsn::parse(dsn).map_err(|e| RelayError::Config(format!("{key}: {e}")))?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&dsn.host)
        .port(dsn.port)
        .user(&dsn.user)
        .dbname(&dsn.dbname)
        // TLS is negotiated by crate::pg::tls before tokio-postgres sees the stream.
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .application_name(if dsn.application_name == "saiki-relay" {
            application
        } else {
            &dsn.application_name
        });
    if let Some(pw) = &dsn.password {
        config.password(pw);
    }
    let target = describe(&config);
    info!(%target, "connecting to {what}");
    let stream = crate::pg::tls::connect(&dsn.host, dsn.port, &dsn.tls, &target)
        .await
        .map_err(|e| match e {
            // A certificate refused or TLS refused: definite, like a wrong password.
            RelayError::Tls { target, message } => RelayError::Ods {
                target,
                code: Some("28000".into()),
                message: format!("TLS: {message}"),
            },
            RelayError::Connect { target, source } => RelayError::Ods {
                target,
                code: None,
                message: format!("cannot connect: {source}"),
            },
            other => other,
        })?;
    let tls = stream.is_tls();
    let (client, conn) = config
        .connect_raw(stream, NoTls)
        .await
        .map_err(|e| pg_error(&target, &e))?;
    info!(%target, tls, "connected to {what}");
    let (t2, what) = (target.clone(), what.to_string());
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            warn!(target = %t2, error = %e, "connection to {what} ended");
        }
    });
    Ok((client, target))
}

/// A server or connection error, classified.
pub(crate) fn pg_error(target: &str, e: &tokio_postgres::Error) -> RelayError {
    let code = e.code().map(|c| c.code().to_string());
    let message = match e.as_db_error() {
        Some(db) => {
            let mut m = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                m.push_str(&format!(" DETAIL: {d}"));
            }
            if let Some(h) = db.hint() {
                m.push_str(&format!(" HINT: {h}"));
            }
            m
        }
        None => e.to_string(),
    };
    RelayError::Ods {
        target: target.to_string(),
        code,
        message,
    }
}

fn describe(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        c.get_dbname().unwrap_or(c.get_user().unwrap_or("postgres"))
    )
}
