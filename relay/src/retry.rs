//! Transient errors are retried, definite ones stop the daemon: the one supervising loop of
//! every daemon's sessions (`source::run`, `sink::run`), with exponential backoff.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use crate::error::RelayError;

/// What a session loop reports to the supervisor's metrics.
pub(crate) struct Supervised<'a> {
    /// Cleared whenever a session ends (`/ready` turns false until the next is set up).
    pub(crate) ready: &'a AtomicBool,
    /// Counts the sessions restarted after a transient error.
    pub(crate) restarts: &'a AtomicU64,
    /// The cap of the backoff between attempts (`reconnect_backoff_max`).
    pub(crate) backoff_max: Duration,
}

/// Runs sessions until one ends well (a shutdown it drained: `Ok`), one fails definitely (the
/// error, for the exit code), or `shutdown` turns true while waiting to retry (`Ok`). A
/// transient failure is logged and retried after a backoff that doubles from 200 ms up to
/// `backoff_max`, and starts again from 200 ms after a session that ran for a minute.
/// Each session runs in the span `span()` makes (the daemon's name, slot or group).
pub(crate) async fn supervise(
    s: Supervised<'_>,
    shutdown: &mut watch::Receiver<bool>,
    span: impl Fn() -> tracing::Span,
    mut session: impl AsyncFnMut(&mut watch::Receiver<bool>) -> Result<(), RelayError>,
) -> Result<(), RelayError> {
    let mut retry = Retry::new(s.backoff_max);
    loop {
        retry.session_started();
        let result = session(shutdown).instrument(span()).await;
        s.ready.store(false, Ordering::Relaxed);
        match result.map_err(crate::kafka::refused) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                s.restarts.fetch_add(1, Ordering::Relaxed);
                if !retry.wait(&e, shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The wait before retry number `attempt` (from 1): 200 ms doubling, capped at `max`.
fn retry_backoff(attempt: u32, max: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(100u64.saturating_mul(1 << attempt.min(16))).min(max)
}

/// The retry state of a daemon's session loop (source and sink): exponential backoff,
/// started again after a session that ran for a minute.
struct Retry {
    attempt: u32,
    max: std::time::Duration,
    started: std::time::Instant,
}

impl Retry {
    fn new(max: std::time::Duration) -> Retry {
        Retry {
            attempt: 0,
            max,
            started: std::time::Instant::now(),
        }
    }

    /// Marks the start of a session.
    fn session_started(&mut self) {
        self.started = std::time::Instant::now();
    }

    /// After a transient error: logs the attempt and waits out the backoff. Returns false if
    /// `shutdown` changed meanwhile (the daemon then stops).
    async fn wait(
        &mut self,
        error: &RelayError,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        if self.started.elapsed() > std::time::Duration::from_secs(60) {
            self.attempt = 0;
        }
        self.attempt += 1;
        let backoff = retry_backoff(self.attempt, self.max);
        tracing::warn!(%error, attempt = self.attempt, backoff_ms = backoff.as_millis() as u64, "transient error, retrying");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => true,
            _ = shutdown.changed() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transient (not a Kafka error: those read the process-wide refusal of `kafka.rs`).
    fn ods_down() -> RelayError {
        RelayError::Ods {
            target: "ods".into(),
            code: None,
            message: "connection refused".into(),
        }
    }

    #[test]
    fn the_backoff_doubles_from_200_ms_up_to_its_cap() {
        let max = Duration::from_secs(30);
        assert_eq!(retry_backoff(1, max), Duration::from_millis(200));
        assert_eq!(retry_backoff(2, max), Duration::from_millis(400));
        assert_eq!(retry_backoff(8, max), Duration::from_millis(25_600));
        assert_eq!(retry_backoff(9, max), max);
        assert_eq!(retry_backoff(u32::MAX, max), max);
    }

    #[tokio::test]
    async fn transient_failures_are_retried_and_a_definite_one_stops_the_loop() {
        let (ready, restarts) = (AtomicBool::new(true), AtomicU64::new(0));
        let (_tx, mut rx) = watch::channel(false);
        let mut attempts = 0;
        let s = Supervised {
            ready: &ready,
            restarts: &restarts,
            backoff_max: Duration::from_millis(1),
        };
        let r = supervise(s, &mut rx, tracing::Span::none, async |_| {
            attempts += 1;
            if attempts < 3 {
                Err(ods_down())
            } else {
                Err(RelayError::Config("bad".into()))
            }
        })
        .await;
        assert!(matches!(r, Err(RelayError::Config(_))));
        assert_eq!(attempts, 3);
        assert_eq!(restarts.load(Ordering::Relaxed), 2);
        assert!(!ready.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_shutdown_during_the_backoff_ends_the_loop_well() {
        let (ready, restarts) = (AtomicBool::new(true), AtomicU64::new(0));
        let (tx, mut rx) = watch::channel(false);
        let s = Supervised {
            ready: &ready,
            restarts: &restarts,
            backoff_max: Duration::from_secs(3600),
        };
        let r = supervise(s, &mut rx, tracing::Span::none, async |_| {
            let _ = tx.send(true);
            Err(ods_down())
        })
        .await;
        assert!(r.is_ok());
    }
}
