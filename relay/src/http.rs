//! `/metrics` (Prometheus text), `/health` (the process runs), `/ready` (streaming). A tiny
//! HTTP/1.0 responder: one request per connection, bounded request size.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::warn;

use crate::error::RelayError;
use crate::metrics::Exporter;

/// Binds `listen` and serves until the task is dropped.
pub(crate) async fn serve(
    listen: &str,
    metrics: Arc<dyn Exporter>,
) -> Result<tokio::task::JoinHandle<()>, RelayError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| RelayError::Config(format!("http.listen = \"{listen}\": {e}")))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                    "/health" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/ready" if metrics.ready() => ("200 OK", "text/plain", "ready\n".to_string()),
                    "/ready" => (
                        "503 Service Unavailable",
                        "text/plain",
                        "not ready\n".to_string(),
                    ),
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "try /metrics, /health or /ready\n".to_string(),
                    ),
                };
                let resp = format!("HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                if let Err(e) = sock.write_all(resp.as_bytes()).await {
                    warn!(error = %e, "http write");
                }
            });
        }
    }))
}
