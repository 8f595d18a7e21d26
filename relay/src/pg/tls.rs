//! TLS to PostgreSQL, with libpq's `sslmode` semantics, for both of the relay's connection
//! kinds: the source's own protocol client ([`crate::pg`]) and the sink's tokio-postgres
//! connection (handed an already negotiated stream). rustls with the ring provider: no system
//! library at run time.
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable`, `allow` | never | — |
//! | `prefer` (default) | if the server offers it | not verified, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `require` | always | same as `prefer` |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and the host name |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt` as in libpq; `sslcert` / `sslkey` give a
//! client certificate. `allow` never tries TLS (libpq would retry with TLS after a refusal).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::error::RelayError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(crate) fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(format!(
                "sslmode '{s}' is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }

    /// The mode as libpq (and sqlx) spell it: `parse`'s inverse.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection asks the server for TLS.
    pub(crate) fn tries_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }

    /// Whether a server without TLS is refused.
    pub(crate) fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

/// The TLS part of a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    pub(crate) mode: SslMode,
    pub(crate) rootcert: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            mode: SslMode::Prefer,
            rootcert: None,
            cert: None,
            key: None,
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// The one crypto provider of the relay's TLS (also the event API's listener).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file; `what` (the setting) names it in errors.
pub(crate) fn read_pem_certs(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1); `what` names it in errors.
pub(crate) fn read_pem_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl TlsOptions {
    fn check(&self) -> (Check, Option<PathBuf>) {
        let default_root =
            || std::env::var_os("HOME").map(|h| Path::new(&h).join(".postgresql/root.crt"));
        match self.mode {
            SslMode::VerifyFull => (
                Check::ChainAndName,
                self.rootcert.clone().or_else(default_root),
            ),
            SslMode::VerifyCa => (Check::Chain, self.rootcert.clone().or_else(default_root)),
            _ if self.rootcert.is_some() => (Check::Chain, self.rootcert.clone()),
            _ => (Check::Nothing, None),
        }
    }

    /// The rustls configuration these options ask for. Files are read here, so a missing or
    /// unreadable one is a configuration error before any connection.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>, RelayError> {
        let cfg_err = |m: String| RelayError::Config(format!("TLS: {m}"));
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err(e.to_string()))?;
        let (check, root) = self.check();
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Nothing => Arc::new(AcceptAnyCertificate(provider.clone())),
            Check::Chain | Check::ChainAndName => {
                let root = root.ok_or_else(|| {
                    cfg_err("sslmode=verify-ca/verify-full needs sslrootcert=FILE (the CA certificate, PEM)".into())
                })?;
                let mut store = RootCertStore::empty();
                for c in read_pem_certs(&root, "sslrootcert").map_err(cfg_err)? {
                    store
                        .add(c)
                        .map_err(|e| cfg_err(format!("sslrootcert {}: {e}", root.display())))?;
                }
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                        .build()
                        .map_err(|e| cfg_err(e.to_string()))?;
                if check == Check::ChainAndName {
                    webpki
                } else {
                    Arc::new(ChainOnly(webpki))
                }
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_pem_certs(cert, "sslcert").map_err(cfg_err)?;
                let key = read_pem_key(key, "sslkey").map_err(cfg_err)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| cfg_err(format!("sslcert/sslkey: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(cfg_err("sslcert and sslkey go together".into())),
        };
        Ok(Arc::new(config))
    }
}

/// `require` / `prefer` without a root certificate: encrypted, server not authenticated
/// (libpq's behaviour). The handshake signature is still checked.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root certificate; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A connection to PostgreSQL, in the clear or in TLS.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Opens a TCP connection to `host:port` and negotiates TLS as `opts` say. `target` names the
/// server in errors. A server that refuses TLS when it is required, or a certificate that fails
/// verification, is a definite error; network failures are transient.
pub(crate) async fn connect(
    host: &str,
    port: u16,
    opts: &TlsOptions,
    target: &str,
) -> Result<Stream, RelayError> {
    let io = |source: std::io::Error| RelayError::Connect {
        target: target.to_string(),
        source,
    };
    let mut tcp = TcpStream::connect((host, port)).await.map_err(io)?;
    tcp.set_nodelay(true).ok();
    if !opts.mode.tries_tls() {
        return Ok(Stream::Plain(tcp));
    }
    let config = opts.client_config()?;
    tcp.write_all(&SSL_REQUEST).await.map_err(io)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io)?;
    match answer[0] {
        b'S' => {}
        b'N' if opts.mode.requires_tls() => {
            return Err(RelayError::Tls {
                target: target.to_string(),
                message: "the server does not accept TLS connections (ssl = off); turn ssl on, or use sslmode=prefer or disable".into(),
            })
        }
        b'N' => return Ok(Stream::Plain(tcp)),
        other => {
            return Err(RelayError::Tls {
                target: target.to_string(),
                message: format!("unexpected answer {other:#04x} to the TLS request"),
            })
        }
    }
    let name = ServerName::try_from(host.to_string()).map_err(|e| RelayError::Tls {
        target: target.to_string(),
        message: format!("host '{host}' is not a valid TLS server name: {e}"),
    })?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            // rustls reports a certificate it refused as InvalidData with its error inside.
            let refused = e
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
            if refused {
                RelayError::Tls {
                    target: target.to_string(),
                    message: format!(
                        "{e}: check sslrootcert and the server's certificate (sslmode={:?})",
                        opts.mode
                    ),
                }
            } else {
                io(e)
            }
        })?;
    Ok(Stream::Tls(Box::new(tls)))
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_parse_as_libpq_spells_them() {
        assert_eq!(SslMode::parse("verify-full"), Ok(SslMode::VerifyFull));
        assert!(SslMode::parse("verify_full").is_err());
        assert!(!SslMode::Allow.tries_tls());
        assert!(SslMode::Prefer.tries_tls() && !SslMode::Prefer.requires_tls());
        assert!(SslMode::Require.requires_tls());
    }

    #[test]
    fn verification_follows_libpq() {
        let o = |mode, root: Option<&str>| TlsOptions {
            mode,
            rootcert: root.map(PathBuf::from),
            ..Default::default()
        };
        assert_eq!(o(SslMode::Require, None).check().0, Check::Nothing);
        // A root certificate given to require makes it verify-ca, as in libpq.
        assert_eq!(o(SslMode::Require, Some("/ca.pem")).check().0, Check::Chain);
        assert_eq!(
            o(SslMode::VerifyCa, Some("/ca.pem")).check().0,
            Check::Chain
        );
        assert_eq!(
            o(SslMode::VerifyFull, Some("/ca.pem")).check().0,
            Check::ChainAndName
        );
    }

    #[test]
    fn a_missing_root_certificate_is_a_configuration_error() {
        let o = TlsOptions {
            mode: SslMode::VerifyFull,
            rootcert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        match o.client_config() {
            Err(RelayError::Config(m)) => assert!(m.contains("/nonexistent/ca.pem"), "{m}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        let half = TlsOptions {
            cert: Some("/c.pem".into()),
            ..Default::default()
        };
        assert!(matches!(half.client_config(), Err(RelayError::Config(_))));
    }
}
