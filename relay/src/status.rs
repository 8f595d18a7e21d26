//! `saiki-relay status`: the operator's view. The slots of a source database (from
//! `saiki.slot_status()`, or `pg_replication_slots` without the extension) and the health and
//! lag of running relays (their `/health`, `/ready` and `/metrics`), as a table for a terminal
//! or as JSON for scripts.
//!
//! Reading and summarizing a relay's metrics is pure ([`RelayStatus::from_metrics`]); the
//! fetching is a bounded HTTP/1.0 GET.

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::RelayError;
use crate::metrics::*;

/// How long one HTTP request to a relay may take before it counts as unreachable.
pub(crate) const RELAY_TIMEOUT: Duration = Duration::from_secs(3);

/// One logical replication slot.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SlotStatus {
    pub(crate) slot: String,
    pub(crate) plugin: Option<String>,
    pub(crate) database: Option<String>,
    pub(crate) active: bool,
    pub(crate) pid: Option<i64>,
    pub(crate) confirmed_lsn: Option<String>,
    pub(crate) lag_bytes: Option<i64>,
    pub(crate) retained_bytes: Option<i64>,
    pub(crate) wal_status: Option<String>,
    pub(crate) lag: Option<String>,
}

/// One table's snapshot (`saiki.snapshot_progress`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SnapshotStatus {
    pub(crate) slot: String,
    pub(crate) table: String,
    pub(crate) state: String,
    pub(crate) rows_done: Option<i64>,
    pub(crate) rows_estimated: Option<i64>,
    pub(crate) percent: Option<f64>,
    pub(crate) error: Option<String>,
}

/// A slot's last resync after it lost changes (`saiki.resyncs`, issue #14).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ResyncStatus {
    pub(crate) slot: String,
    pub(crate) at: Option<String>,
    pub(crate) reason: Option<String>,
    /// Where its sweep starts (rows last changed before it and not read again go).
    pub(crate) before: Option<String>,
    pub(crate) state: String,
    pub(crate) tables: Option<i64>,
    pub(crate) tables_done: Option<i64>,
    pub(crate) tables_failed: Option<i64>,
}

/// What the database at a status DSN says: its slots, snapshots and resyncs.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DatabaseStatus {
    pub(crate) slots: Vec<SlotStatus>,
    pub(crate) snapshots: Vec<SnapshotStatus>,
    pub(crate) resyncs: Vec<ResyncStatus>,
}

/// What one relay reports about itself.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct RelayStatus {
    pub(crate) url: String,
    /// `/health` answered 200.
    pub(crate) healthy: bool,
    /// `/ready` answered 200: streaming (source) or consuming and applying (sink).
    pub(crate) ready: bool,
    /// "source", "sink", "ingest" or "lake", from the metric names it exports.
    pub(crate) role: Option<String>,
    /// The source's name or the sink's consumer group.
    pub(crate) name: Option<String>,
    /// Source: WAL bytes between the server's end and the confirmed position.
    pub(crate) lag_bytes: Option<u64>,
    /// Source: messages handed to Kafka and not yet acknowledged.
    pub(crate) in_flight: Option<u64>,
    /// Source: change records read; sink: ODS rows written; ingest: events published.
    pub(crate) changes_total: Option<u64>,
    /// Sink: messages not yet applied.
    pub(crate) lag_messages: Option<u64>,
    /// Sink: commit → ODS freshness quantiles (seconds), from the histogram's buckets.
    pub(crate) freshness_p50: Option<f64>,
    pub(crate) freshness_p99: Option<f64>,
    /// Source: delivery errors; sink: dead letters; ingest: batches Kafka did not
    /// acknowledge.
    pub(crate) errors_total: Option<u64>,
    /// Sink: topics stopped at a schema change their ODS table cannot follow.
    pub(crate) stopped_topics: Option<u64>,
    /// Source: large transactions being streamed before their commit; sink: streamed
    /// transactions staged in the ODS, not yet ended.
    pub(crate) streamed_open: Option<u64>,
    /// Sink: their staged rows.
    pub(crate) staged_rows: Option<u64>,
    /// Lake: Unix time of the last round that committed rows (0: none yet).
    pub(crate) last_commit: Option<u64>,
    /// Source: resyncs after the slot lost changes.
    pub(crate) resyncs: Option<u64>,
    /// Why the relay could not be read.
    pub(crate) error: Option<String>,
}

/// One sample of Prometheus text: name, labels as written, value.
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
}

/// The value of a label in `{a="x",b="y"}` (no escapes in the names Saiki writes).
fn label_value<'t>(labels: &'t str, key: &str) -> Option<&'t str> {
    let pat = format!("{key}=\"");
    let start = labels.find(&pat)? + pat.len();
    let end = labels[start..].find('"')?;
    Some(&labels[start..start + end])
}

/// The `q` quantile of a histogram from its cumulative buckets `(le, count)`, interpolated
/// linearly within the bucket as Prometheus' `histogram_quantile` does. `None` when empty;
/// the highest finite bound when the quantile falls in `+Inf`.
pub(crate) fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = count - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

impl RelayStatus {
    /// Summarizes a relay's `/metrics` text.
    pub(crate) fn from_metrics(url: &str, text: &str) -> RelayStatus {
        let mut s = RelayStatus {
            url: url.to_string(),
            ..Default::default()
        };
        let mut fresh: Vec<(f64, f64)> = Vec::new();
        let freshness_bucket = format!("{SINK_FRESHNESS_SECONDS}_bucket");
        for (name, labels, v) in samples(text) {
            let n = Some(v as u64);
            if name.starts_with("saiki_source_") {
                s.role = Some("source".into());
                s.name = label_value(labels, "source").map(str::to_string);
            } else if name.starts_with("saiki_sink_") {
                s.role = Some("sink".into());
                s.name = label_value(labels, "group").map(str::to_string);
            } else if name.starts_with("saiki_ingest_") {
                s.role = Some("ingest".into());
            } else if name.starts_with("saiki_lake_") {
                s.role = Some("lake".into());
            }
            match name {
                SOURCE_LAG_BYTES => s.lag_bytes = n,
                SOURCE_IN_FLIGHT_MESSAGES => s.in_flight = n,
                SOURCE_CHANGES_TOTAL
                | SINK_ROWS_APPLIED_TOTAL
                | INGEST_EVENTS_PUBLISHED_TOTAL
                | LAKE_ROWS_WRITTEN_TOTAL => s.changes_total = n,
                SOURCE_DELIVERY_ERRORS_TOTAL
                | SINK_DEAD_LETTERS_TOTAL
                | INGEST_KAFKA_FAILURES_TOTAL
                | LAKE_DEAD_LETTERS_TOTAL => s.errors_total = n,
                SINK_CONSUMER_LAG_MESSAGES | LAKE_CONSUMER_LAG_MESSAGES => s.lag_messages = n,
                LAKE_LAST_COMMIT_SECONDS => s.last_commit = n,
                SINK_STOPPED_TOPICS => s.stopped_topics = n,
                SOURCE_STREAMED_TRANSACTIONS_OPEN | SINK_STREAMED_TRANSACTIONS_OPEN => {
                    s.streamed_open = n
                }
                SINK_STAGED_ROWS => s.staged_rows = n,
                SOURCE_RESYNCS_TOTAL => s.resyncs = n,
                _ if name == freshness_bucket => {
                    let le = label_value(labels, "le").and_then(|le| match le {
                        "+Inf" => Some(f64::INFINITY),
                        x => x.parse().ok(),
                    });
                    if let Some(le) = le {
                        fresh.push((le, v));
                    }
                }
                _ => {}
            }
        }
        fresh.sort_by(|a, b| a.0.total_cmp(&b.0));
        s.freshness_p50 = histogram_quantile(0.5, &fresh);
        s.freshness_p99 = histogram_quantile(0.99, &fresh);
        s
    }

    /// Reads `/health`, `/ready` and `/metrics` of the relay at `url`
    /// (`http://host:port` or `host:port`). Never fails: an unreachable relay is a status.
    pub(crate) async fn fetch(url: &str) -> RelayStatus {
        let addr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let health = get(&addr, "/health").await;
        let mut s = match get(&addr, "/metrics").await {
            Ok((200, body)) => RelayStatus::from_metrics(url, &body),
            Ok((code, _)) => RelayStatus {
                url: url.to_string(),
                error: Some(format!("/metrics answered {code}")),
                ..Default::default()
            },
            Err(e) => RelayStatus {
                url: url.to_string(),
                error: Some(e),
                ..Default::default()
            },
        };
        s.healthy = matches!(health, Ok((200, _)));
        s.ready = matches!(get(&addr, "/ready").await, Ok((200, _)));
        s
    }
}

/// One bounded HTTP/1.0 GET: (status code, body).
async fn get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let work = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
            format!("unreachable ({e}): is the relay running, with http.listen = \"{addr}\"?")
        })?;
        sock.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        sock.take(16 << 20)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{path}: not an HTTP answer"))?;
        Ok((code, body.to_string()))
    };
    tokio::time::timeout(RELAY_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("{path}: no answer within {RELAY_TIMEOUT:?}")))
}

/// The slots of the database at `dsn`, and its snapshots and resyncs (with the extension;
/// resyncs with 0.3.0).
pub(crate) async fn slots(dsn: &str) -> Result<DatabaseStatus, RelayError> {
    let d = crate::pg::dsn::Dsn::parse(dsn).map_err(|e| RelayError::Config(format!("dsn: {e}")))?;
    let mut conn = crate::pg::PgConn::connect(&d, false, "").await?;
    let has_ext = !conn
        .simple_query("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'saiki'")
        .await?
        .is_empty();
    let sql = if has_ext {
        "SELECT slot_name, plugin, database, active, active_pid, confirmed_flush_lsn, lag_bytes, retained_bytes, wal_status, lag_pretty FROM saiki.slot_status()"
    } else {
        "SELECT slot_name, plugin, database, active, active_pid, confirmed_flush_lsn, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name"
    };
    let rows = conn.simple_query(sql).await?;
    let snapshots = if has_ext {
        conn.simple_query("SELECT slot_name, table_name, state, rows_done, rows_estimated, percent, error FROM saiki.snapshot_progress")
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let text = |i: usize| r.get(i).cloned().flatten();
                SnapshotStatus {
                    slot: text(0).unwrap_or_default(),
                    table: text(1).unwrap_or_default(),
                    state: text(2).unwrap_or_default(),
                    rows_done: text(3).and_then(|v| v.parse().ok()),
                    rows_estimated: text(4).and_then(|v| v.parse().ok()),
                    percent: text(5).and_then(|v| v.parse().ok()),
                    error: text(6),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let resyncs = if has_ext {
        conn.simple_query("SELECT slot_name, resync_at::text, resync_reason, resync_before::text, state, tables, tables_done, tables_failed FROM saiki.resyncs")
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let text = |i: usize| r.get(i).cloned().flatten();
                let int = |i: usize| text(i).and_then(|v| v.parse().ok());
                ResyncStatus {
                    slot: text(0).unwrap_or_default(),
                    at: text(1),
                    reason: text(2),
                    before: text(3),
                    state: text(4).unwrap_or_default(),
                    tables: int(5),
                    tables_done: int(6),
                    tables_failed: int(7),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let slots = rows
        .into_iter()
        .map(|r| {
            let text = |i: usize| r.get(i).cloned().flatten();
            let int = |i: usize| text(i).and_then(|v| v.parse().ok());
            SlotStatus {
                slot: text(0).unwrap_or_default(),
                plugin: text(1),
                database: text(2),
                active: text(3).as_deref() == Some("t"),
                pid: int(4),
                confirmed_lsn: text(5),
                lag_bytes: int(6),
                retained_bytes: int(7),
                wal_status: text(8),
                lag: text(9),
            }
        })
        .collect();
    Ok(DatabaseStatus {
        slots,
        snapshots,
        resyncs,
    })
}

/// Columns padded to their widest cell, two spaces apart.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = head
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        format!("{}\n", l.trim_end())
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn millis(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{:.0} ms", s * 1000.0))
}

/// The terminal form: the slot table (when a database was asked), its snapshots, then the
/// relay table.
pub(crate) fn render(db: Option<&DatabaseStatus>, relays: &[RelayStatus]) -> String {
    let mut out = String::new();
    let (slots, snapshots, resyncs) = match db {
        Some(d) => (Some(&d.slots[..]), &d.snapshots[..], &d.resyncs[..]),
        None => (None, &[][..], &[][..]),
    };
    if let Some(slots) = slots {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let rows: Vec<Vec<String>> = slots
            .iter()
            .map(|s| {
                vec![
                    s.slot.clone(),
                    opt(&s.plugin),
                    opt(&s.database),
                    if s.active { "yes" } else { "no" }.into(),
                    s.pid.map_or(String::new(), |p| p.to_string()),
                    opt(&s.confirmed_lsn),
                    s.lag_bytes.map_or(String::new(), |b| b.to_string()),
                    s.retained_bytes.map_or(String::new(), |b| b.to_string()),
                    opt(&s.wal_status),
                    opt(&s.lag),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "slot",
                "plugin",
                "database",
                "active",
                "pid",
                "confirmed_lsn",
                "lag_bytes",
                "retained_bytes",
                "wal_status",
                "lag",
            ],
            &rows,
        ));
        if slots.is_empty() {
            out.push_str("(no logical replication slots)\n");
        }
    }
    if !snapshots.is_empty() {
        out.push('\n');
        let num = |v: Option<i64>| v.map_or(String::new(), |n| n.to_string());
        let rows: Vec<Vec<String>> = snapshots
            .iter()
            .map(|s| {
                vec![
                    s.slot.clone(),
                    s.table.clone(),
                    s.state.clone(),
                    num(s.rows_done),
                    num(s.rows_estimated),
                    s.percent.map_or(String::new(), |p| format!("{p:.1} %")),
                    s.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "snapshot of slot",
                "table",
                "state",
                "rows",
                "estimated",
                "done",
                "error",
            ],
            &rows,
        ));
    }
    if !resyncs.is_empty() {
        out.push('\n');
        let num = |v: Option<i64>| v.map_or(String::new(), |n| n.to_string());
        let rows: Vec<Vec<String>> = resyncs
            .iter()
            .map(|r| {
                vec![
                    r.slot.clone(),
                    r.state.clone(),
                    format!(
                        "{}/{}{}",
                        num(r.tables_done),
                        num(r.tables),
                        match r.tables_failed.filter(|n| *n > 0) {
                            Some(n) => format!(" ({n} failed)"),
                            None => String::new(),
                        }
                    ),
                    r.before.clone().unwrap_or_else(|| "-".into()),
                    r.at.clone().unwrap_or_default(),
                    r.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "resync of slot",
                "state",
                "tables",
                "sweeps before",
                "since",
                "why",
            ],
            &rows,
        ));
    }
    if !relays.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        let rows: Vec<Vec<String>> = relays
            .iter()
            .map(|r| {
                let health = match (&r.error, r.healthy, r.ready) {
                    (Some(_), _, _) | (None, false, _) => "DOWN",
                    (None, true, true) => "ready",
                    (None, true, false) => "starting",
                };
                let lag = match (r.lag_bytes, r.lag_messages) {
                    (Some(b), _) => bytes(b),
                    (None, Some(m)) => format!("{m} msgs"),
                    _ => "-".into(),
                };
                vec![
                    r.url.clone(),
                    r.role.clone().unwrap_or("-".into()),
                    r.name.clone().unwrap_or("-".into()),
                    health.into(),
                    lag,
                    r.changes_total.map_or("-".into(), |n| n.to_string()),
                    r.in_flight.map_or("-".into(), |n| n.to_string()),
                    millis(r.freshness_p50),
                    millis(r.freshness_p99),
                    r.errors_total.map_or("-".into(), |n| n.to_string()),
                    note(r),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "relay",
                "role",
                "name",
                "state",
                "lag",
                "changes",
                "in_flight",
                "fresh_p50",
                "fresh_p99",
                "errors",
                "note",
            ],
            &rows,
        ));
    }
    out
}

/// The note of a relay's row: why it could not be read, stopped topics, streamed
/// transactions in flight.
fn note(r: &RelayStatus) -> String {
    if let Some(e) = &r.error {
        return e.clone();
    }
    let mut notes = Vec::new();
    if let Some(n) = r.stopped_topics.filter(|n| *n > 0) {
        notes.push(format!(
            "{n} topic(s) stopped at a schema change: see saiki_sink.stopped"
        ));
    }
    if let Some(n) = r.resyncs.filter(|n| *n > 0) {
        notes.push(format!(
            "{n} resync(s): the slot lost changes (a failover?); snapshots of every table requested, see the relay's log"
        ));
    }
    match r.last_commit {
        Some(0) => notes.push("no commit to the lake yet".into()),
        Some(t) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            notes.push(format!("last lake commit {}s ago", now.saturating_sub(t)));
        }
        None => {}
    }
    match (r.streamed_open.filter(|n| *n > 0), r.staged_rows) {
        (Some(n), Some(rows)) => notes.push(format!(
            "{n} streamed transaction(s) staged, {rows} rows, applied at their commit: see saiki_sink.streams"
        )),
        (Some(n), None) => notes.push(format!(
            "{n} large transaction(s) streaming before their commit"
        )),
        _ => {}
    }
    notes.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let b = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(histogram_quantile(0.5, &b), Some(0.1));
        let p75 = histogram_quantile(0.75, &b).unwrap();
        assert!((p75 - 0.15).abs() < 1e-9, "{p75}");
        assert_eq!(
            histogram_quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
        // Everything above the last finite bound: that bound.
        assert_eq!(
            histogram_quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 5.0)]),
            Some(1.0)
        );
    }

    #[test]
    fn a_sinks_metrics_summarize_to_its_group_lag_and_freshness() {
        let m = SinkMetrics::new("saiki-ods");
        m.lag.store(7, std::sync::atomic::Ordering::Relaxed);
        m.stopped.store(1, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..99 {
            m.freshness.observe(0.04);
        }
        m.freshness.observe(2.0);
        use crate::metrics::Exporter;
        let s = RelayStatus::from_metrics("http://x", &m.render());
        assert_eq!(s.role.as_deref(), Some("sink"));
        assert_eq!(s.name.as_deref(), Some("saiki-ods"));
        assert_eq!(s.lag_messages, Some(7));
        assert_eq!(s.stopped_topics, Some(1));
        m.streams_open
            .store(2, std::sync::atomic::Ordering::Relaxed);
        m.staged_rows
            .store(5000, std::sync::atomic::Ordering::Relaxed);
        let s2 = RelayStatus::from_metrics("http://x", &m.render());
        assert_eq!((s2.streamed_open, s2.staged_rows), (Some(2), Some(5000)));
        assert!(
            note(&s2).contains("2 streamed transaction(s) staged, 5000 rows"),
            "{}",
            note(&s2)
        );
        let p50 = s.freshness_p50.unwrap();
        assert!((0.025..=0.05).contains(&p50), "{p50}");
        assert!(s.freshness_p99.unwrap() <= 0.05);
    }

    #[test]
    fn a_sources_metrics_summarize_to_its_name_and_wal_lag() {
        let m = SourceMetrics::default();
        m.server_wal_end
            .store(5000, std::sync::atomic::Ordering::Relaxed);
        m.confirmed_lsn
            .store(1000, std::sync::atomic::Ordering::Relaxed);
        let s = RelayStatus::from_metrics("http://x", &m.render("shard1"));
        assert_eq!(s.role.as_deref(), Some("source"));
        assert_eq!(s.name.as_deref(), Some("shard1"));
        assert_eq!(s.lag_bytes, Some(4000));
        assert_eq!(s.freshness_p50, None);
        let text = render(None, &[s]);
        assert!(text.starts_with("relay"), "{text}");
        assert!(text.contains("3.9 kB"), "{text}");
    }

    #[test]
    fn an_ingest_relays_metrics_summarize_to_events_published() {
        let m = IngestMetrics::default();
        m.published.store(42, std::sync::atomic::Ordering::Relaxed);
        m.kafka_failures
            .store(1, std::sync::atomic::Ordering::Relaxed);
        let s = RelayStatus::from_metrics("http://x", &m.render());
        assert_eq!(s.role.as_deref(), Some("ingest"));
        assert_eq!((s.changes_total, s.errors_total), (Some(42), Some(1)));
        assert!(render(None, &[s]).contains("ingest"));
    }

    #[test]
    fn a_lake_relays_metrics_summarize_to_rows_lag_and_its_last_commit() {
        let m = LakeMetrics::default();
        let o = std::sync::atomic::Ordering::Relaxed;
        m.rows.store(1000, o);
        m.lag.store(7, o);
        let s = RelayStatus::from_metrics("http://x", &m.render());
        assert_eq!(s.role.as_deref(), Some("lake"));
        assert_eq!((s.changes_total, s.lag_messages), (Some(1000), Some(7)));
        assert!(render(None, &[s]).contains("no commit to the lake yet"));
        m.last_commit
            .store(saiki_core::time::unix_micros_now() as u64 - 3_000_000, o);
        let s = RelayStatus::from_metrics("http://x", &m.render());
        assert!(render(None, &[s]).contains("last lake commit 3s ago"));
    }

    #[test]
    fn a_resync_shows_with_its_progress_its_sweep_and_why() {
        let db = DatabaseStatus {
            resyncs: vec![ResyncStatus {
                slot: "saiki_shard1".into(),
                at: Some("2026-12-07 20:00:00+00".into()),
                reason: Some("the slot was missing and has been created anew".into()),
                before: Some("0/3000000".into()),
                state: "running".into(),
                tables: Some(3),
                tables_done: Some(1),
                tables_failed: Some(1),
            }],
            ..Default::default()
        };
        let text = render(Some(&db), &[]);
        assert!(text.contains("resync of slot"), "{text}");
        assert!(
            text.contains("saiki_shard1")
                && text.contains("running")
                && text.contains("1/3 (1 failed)")
                && text.contains("0/3000000")
                && text.contains("created anew"),
            "{text}"
        );
    }
}
