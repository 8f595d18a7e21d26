//! An async PostgreSQL connection on the wire codec of [`crate::pg::wire`]: startup, password /
//! MD5 / SCRAM-SHA-256 authentication (the SCRAM math from `postgres-protocol`), simple
//! queries, and the switch into the replication stream. Used twice by the source relay: a
//! `replication=database` connection for the slot, and a plain one for heartbeats.

pub(crate) mod client;
pub(crate) mod dsn;
pub(crate) mod quote;
pub(crate) mod tls;
pub(crate) mod wire;

use bytes::BytesMut;
use postgres_protocol::authentication::{md5_hash, sasl};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::error::RelayError;
use crate::pg::dsn::Dsn;
use crate::pg::tls::Stream;
use crate::pg::wire::{Auth, Backend};

pub(crate) struct PgConn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    target: String,
}

/// Rows of a simple query, as text.
pub(crate) type Rows = Vec<Vec<Option<String>>>;

impl PgConn {
    /// Connects and authenticates to the first of the DSN's hosts that answers (and, with
    /// `target_session_attrs=read-write`, is not in recovery), as libpq does. `replication`
    /// adds `replication=database`; `options` is the startup `options` parameter
    /// (`-c name=value …`). Fails with the last host's error.
    pub(crate) async fn connect(
        dsn: &Dsn,
        replication: bool,
        options: &str,
    ) -> Result<PgConn, RelayError> {
        let mut last = None;
        for (host, port) in &dsn.hosts {
            let attempt = async {
                let mut c = PgConn::connect_one(dsn, host, *port, replication, options).await?;
                if dsn.read_write && dsn.hosts.len() > 1 {
                    let rows = c
                        .simple_query("SELECT pg_catalog.pg_is_in_recovery()")
                        .await?;
                    if rows
                        .first()
                        .and_then(|r| r.first())
                        .cloned()
                        .flatten()
                        .as_deref()
                        == Some("t")
                    {
                        return Err(RelayError::Connect {
                            target: c.target.clone(),
                            source: std::io::Error::other(
                                "the server is in recovery (a standby), and target_session_attrs asks for read-write",
                            ),
                        });
                    }
                }
                Ok(c)
            };
            match attempt.await {
                Ok(c) => return Ok(c),
                // A refused login or certificate is the same on every host: definite.
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::debug!(host, port, error = %e, "trying the next host");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| RelayError::Config("the DSN names no host".into())))
    }

    async fn connect_one(
        dsn: &Dsn,
        host: &str,
        port: u16,
        replication: bool,
        options: &str,
    ) -> Result<PgConn, RelayError> {
        let pw = if dsn.password.is_some() { ":***" } else { "" };
        let target = format!("postgres://{}{pw}@{host}:{port}/{}", dsn.user, dsn.dbname);
        let stream = crate::pg::tls::connect(host, port, &dsn.tls, &target).await?;
        let mut c = PgConn {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            target,
        };
        let mut params = vec![
            ("user", dsn.user.as_str()),
            ("database", dsn.dbname.as_str()),
            ("application_name", dsn.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        if !options.is_empty() {
            params.push(("options", options));
        }
        wire::startup(&mut c.wbuf, &params);
        c.flush().await?;
        c.authenticate(dsn).await?;
        loop {
            match c.read().await? {
                Backend::ReadyForQuery => return Ok(c),
                Backend::Error(e) => return Err(c.server(e)),
                _ => {}
            }
        }
    }

    async fn authenticate(&mut self, dsn: &Dsn) -> Result<(), RelayError> {
        let target = self.target.clone();
        let password = || {
            dsn.password.clone().ok_or_else(|| {
                RelayError::Auth(format!(
                    "{target} asks for a password and none is configured: put it in the DSN or PGPASSWORD"
                ))
            })
        };
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match self.read().await? {
                Backend::Authentication(Auth::Ok) => return Ok(()),
                Backend::Authentication(Auth::Cleartext) => {
                    let pw = password()?;
                    wire::password(&mut self.wbuf, pw.as_bytes());
                    self.flush().await?;
                }
                Backend::Authentication(Auth::Md5 { salt }) => {
                    let pw = password()?;
                    let hash = md5_hash(dsn.user.as_bytes(), pw.as_bytes(), salt);
                    wire::password(&mut self.wbuf, hash.as_bytes());
                    self.flush().await?;
                }
                Backend::Authentication(Auth::Sasl { mechanisms }) => {
                    if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                        return Err(RelayError::Auth(format!(
                            "server offers only {mechanisms:?}; saiki-relay speaks SCRAM-SHA-256"
                        )));
                    }
                    let pw = password()?;
                    let s =
                        sasl::ScramSha256::new(pw.as_bytes(), sasl::ChannelBinding::unsupported());
                    wire::sasl_initial_response(&mut self.wbuf, sasl::SCRAM_SHA_256, s.message());
                    scram = Some(s);
                    self.flush().await?;
                }
                Backend::Authentication(Auth::SaslContinue(data)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| RelayError::Auth("SASL continue without a start".into()))?;
                    s.update(&data)
                        .map_err(|e| RelayError::Auth(format!("SCRAM: {e}")))?;
                    wire::sasl_response(&mut self.wbuf, s.message());
                    self.flush().await?;
                }
                Backend::Authentication(Auth::SaslFinal(data)) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| RelayError::Auth("SASL final without a start".into()))?;
                    s.finish(&data)
                        .map_err(|e| RelayError::Auth(format!("SCRAM server signature: {e}")))?;
                }
                Backend::Authentication(Auth::Unsupported(code)) => {
                    return Err(RelayError::Auth(format!("authentication method {code} is not supported (use scram-sha-256, md5, password or trust)")));
                }
                Backend::Error(e) => return Err(self.server(e)),
                _ => {}
            }
        }
    }

    fn server(&self, error: wire::ServerError) -> RelayError {
        RelayError::Server {
            target: self.target.clone(),
            error: Box::new(error),
        }
    }

    fn io(&self, source: std::io::Error) -> RelayError {
        RelayError::Io {
            target: self.target.clone(),
            source,
        }
    }

    async fn flush(&mut self) -> Result<(), RelayError> {
        let mut r = self.stream.write_all(&self.wbuf).await;
        if r.is_ok() {
            r = self.stream.flush().await; // TLS buffers records until flushed
        }
        self.wbuf.clear();
        r.map_err(|e| self.io(e))
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    async fn read(&mut self) -> Result<Backend, RelayError> {
        loop {
            if let Some(m) = wire::parse_backend(&mut self.rbuf)? {
                return Ok(m);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    /// Runs a simple query and returns its rows (of the last statement) as text.
    pub(crate) async fn simple_query(&mut self, sql: &str) -> Result<Rows, RelayError> {
        wire::query(&mut self.wbuf, sql);
        self.flush().await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            match self.read().await? {
                Backend::DataRow(r) => rows.push(r),
                Backend::RowDescription(_) => rows.clear(),
                Backend::Error(e) => err = Some(e),
                Backend::ReadyForQuery => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(self.server(e)),
            None => Ok(rows),
        }
    }

    /// Sends START_REPLICATION and waits for the server to switch to the copy stream.
    /// Returns the halves to read and write the stream with, and bytes already read.
    pub(crate) async fn start_replication(
        mut self,
        command: &str,
    ) -> Result<ReplicationStream, RelayError> {
        wire::query(&mut self.wbuf, command);
        self.flush().await?;
        loop {
            match self.read().await? {
                Backend::CopyBothResponse => break,
                Backend::Error(e) => {
                    // Drain to ReadyForQuery is not needed: the connection is dropped.
                    return Err(self.server(e));
                }
                _ => {}
            }
        }
        let (r, w) = tokio::io::split(self.stream);
        Ok(ReplicationStream {
            read: r,
            write: w,
            rbuf: self.rbuf,
            wbuf: self.wbuf,
            target: self.target,
        })
    }
}

/// The copy-both stream after START_REPLICATION: read and write sides used concurrently.
pub(crate) struct ReplicationStream {
    pub(crate) read: ReadHalf<Stream>,
    pub(crate) write: WriteHalf<Stream>,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    pub(crate) target: String,
}

impl ReplicationStream {
    pub(crate) fn io(&self, source: std::io::Error) -> RelayError {
        RelayError::Io {
            target: self.target.clone(),
            source,
        }
    }

    /// Writes what `wbuf` holds.
    pub(crate) async fn flush(&mut self) -> Result<(), RelayError> {
        let mut r = self.write.write_all(&self.wbuf).await;
        if r.is_ok() {
            r = self.write.flush().await; // TLS buffers records until flushed
        }
        self.wbuf.clear();
        r.map_err(|e| RelayError::Io {
            target: self.target.clone(),
            source: e,
        })
    }
}
