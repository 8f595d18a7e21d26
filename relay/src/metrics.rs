//! Metric names (Prometheus text format) and the counters behind them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub(crate) const SOURCE_LAG_BYTES: &str = "saiki_source_lag_bytes";
pub(crate) const SOURCE_CHANGES_TOTAL: &str = "saiki_source_changes_total";
pub(crate) const SOURCE_MESSAGES_PRODUCED_TOTAL: &str = "saiki_source_messages_produced_total";
pub(crate) const SOURCE_IN_FLIGHT_MESSAGES: &str = "saiki_source_in_flight_messages";
pub(crate) const SOURCE_CONFIRMED_LSN: &str = "saiki_source_confirmed_lsn";
pub(crate) const SOURCE_SERVER_WAL_END: &str = "saiki_source_server_wal_end_lsn";
pub(crate) const SOURCE_DELIVERY_ERRORS_TOTAL: &str = "saiki_source_delivery_errors_total";
pub(crate) const SOURCE_RECONNECTS_TOTAL: &str = "saiki_source_reconnects_total";
pub(crate) const SOURCE_HEARTBEATS_TOTAL: &str = "saiki_source_heartbeats_total";
pub(crate) const SOURCE_SNAPSHOT_ROWS_TOTAL: &str = "saiki_source_snapshot_rows_total";
pub(crate) const SOURCE_SNAPSHOT_TABLE_ROWS: &str = "saiki_source_snapshot_table_rows";
pub(crate) const SOURCE_SNAPSHOT_TABLE_ROWS_ESTIMATED: &str =
    "saiki_source_snapshot_table_rows_estimated";
pub(crate) const SOURCE_STREAMED_TRANSACTIONS_OPEN: &str =
    "saiki_source_streamed_transactions_open";
pub(crate) const SOURCE_STREAMED_RECORDS_TOTAL: &str = "saiki_source_streamed_records_total";
pub(crate) const SOURCE_STREAMED_COMMITS_TOTAL: &str = "saiki_source_streamed_commits_total";
pub(crate) const SOURCE_STREAMED_ABORTS_TOTAL: &str = "saiki_source_streamed_aborts_total";
pub(crate) const SOURCE_RESYNCS_TOTAL: &str = "saiki_source_resyncs_total";

pub(crate) const SINK_RECORDS_CONSUMED_TOTAL: &str = "saiki_sink_records_consumed_total";
pub(crate) const SINK_ROWS_APPLIED_TOTAL: &str = "saiki_sink_rows_applied_total";
pub(crate) const SINK_BATCHES_TOTAL: &str = "saiki_sink_batches_total";
pub(crate) const SINK_APPLY_SECONDS: &str = "saiki_sink_apply_seconds";
pub(crate) const SINK_CONSUMER_LAG_MESSAGES: &str = "saiki_sink_consumer_lag_messages";
pub(crate) const SINK_DEAD_LETTERS_TOTAL: &str = "saiki_sink_dead_letters_total";
pub(crate) const SINK_FENCED_BATCHES_TOTAL: &str = "saiki_sink_fenced_batches_total";
pub(crate) const SINK_RETRIES_TOTAL: &str = "saiki_sink_retries_total";
pub(crate) const SINK_ASSIGNED_PARTITIONS: &str = "saiki_sink_assigned_partitions";
pub(crate) const SINK_FRESHNESS_SECONDS: &str = "saiki_sink_freshness_seconds";
pub(crate) const SINK_STOPPED_TOPICS: &str = "saiki_sink_stopped_topics";
pub(crate) const SINK_STAGED_ROWS: &str = "saiki_sink_staged_rows";
pub(crate) const SINK_STREAMED_TRANSACTIONS_OPEN: &str = "saiki_sink_streamed_transactions_open";
pub(crate) const SINK_STREAMED_COMMITS_TOTAL: &str = "saiki_sink_streamed_commits_total";
pub(crate) const SINK_STREAMED_ABORTS_TOTAL: &str = "saiki_sink_streamed_aborts_total";

pub(crate) const INGEST_EVENTS_PUBLISHED_TOTAL: &str = "saiki_ingest_events_published_total";
pub(crate) const INGEST_EVENTS_REJECTED_TOTAL: &str = "saiki_ingest_events_rejected_total";
pub(crate) const INGEST_KAFKA_FAILURES_TOTAL: &str = "saiki_ingest_kafka_failures_total";
pub(crate) const INGEST_PUBLISH_SECONDS: &str = "saiki_ingest_publish_seconds";
pub(crate) const INGEST_THROTTLED_TOTAL: &str = "saiki_ingest_throttled_total";
pub(crate) const INGEST_REQUESTS_REFUSED_TOTAL: &str = "saiki_ingest_requests_refused_total";
pub(crate) const INGEST_EVENTS_IN_FLIGHT: &str = "saiki_ingest_events_in_flight";

pub(crate) const LAKE_ROWS_WRITTEN_TOTAL: &str = "saiki_lake_rows_written_total";
pub(crate) const LAKE_COMMITS_TOTAL: &str = "saiki_lake_commits_total";
pub(crate) const LAKE_DATA_FILES_TOTAL: &str = "saiki_lake_data_files_total";
pub(crate) const LAKE_DEAD_LETTERS_TOTAL: &str = "saiki_lake_dead_letters_total";
pub(crate) const LAKE_EVENTS_SKIPPED_TOTAL: &str = "saiki_lake_events_skipped_total";
pub(crate) const LAKE_RETRIES_TOTAL: &str = "saiki_lake_retries_total";
pub(crate) const LAKE_HELD_BYTES: &str = "saiki_lake_held_bytes";
pub(crate) const LAKE_CONSUMER_LAG_MESSAGES: &str = "saiki_lake_consumer_lag_messages";
pub(crate) const LAKE_LAST_COMMIT_SECONDS: &str = "saiki_lake_last_commit_timestamp_seconds";

/// Every metric name, for the reference in docs/metrics.md and the dashboard (both checked
/// against this list by the tests).
pub const ALL: &[&str] = &[
    SOURCE_LAG_BYTES,
    SOURCE_CHANGES_TOTAL,
    SOURCE_MESSAGES_PRODUCED_TOTAL,
    SOURCE_IN_FLIGHT_MESSAGES,
    SOURCE_CONFIRMED_LSN,
    SOURCE_SERVER_WAL_END,
    SOURCE_DELIVERY_ERRORS_TOTAL,
    SOURCE_RECONNECTS_TOTAL,
    SOURCE_HEARTBEATS_TOTAL,
    SOURCE_SNAPSHOT_ROWS_TOTAL,
    SOURCE_SNAPSHOT_TABLE_ROWS,
    SOURCE_SNAPSHOT_TABLE_ROWS_ESTIMATED,
    SOURCE_STREAMED_TRANSACTIONS_OPEN,
    SOURCE_STREAMED_RECORDS_TOTAL,
    SOURCE_STREAMED_COMMITS_TOTAL,
    SOURCE_STREAMED_ABORTS_TOTAL,
    SOURCE_RESYNCS_TOTAL,
    SINK_RECORDS_CONSUMED_TOTAL,
    SINK_ROWS_APPLIED_TOTAL,
    SINK_BATCHES_TOTAL,
    SINK_APPLY_SECONDS,
    SINK_CONSUMER_LAG_MESSAGES,
    SINK_DEAD_LETTERS_TOTAL,
    SINK_FENCED_BATCHES_TOTAL,
    SINK_RETRIES_TOTAL,
    SINK_ASSIGNED_PARTITIONS,
    SINK_FRESHNESS_SECONDS,
    SINK_STOPPED_TOPICS,
    SINK_STAGED_ROWS,
    SINK_STREAMED_TRANSACTIONS_OPEN,
    SINK_STREAMED_COMMITS_TOTAL,
    SINK_STREAMED_ABORTS_TOTAL,
    INGEST_EVENTS_PUBLISHED_TOTAL,
    INGEST_EVENTS_REJECTED_TOTAL,
    INGEST_KAFKA_FAILURES_TOTAL,
    INGEST_PUBLISH_SECONDS,
    INGEST_THROTTLED_TOTAL,
    INGEST_REQUESTS_REFUSED_TOTAL,
    INGEST_EVENTS_IN_FLIGHT,
    LAKE_ROWS_WRITTEN_TOTAL,
    LAKE_COMMITS_TOTAL,
    LAKE_DATA_FILES_TOTAL,
    LAKE_DEAD_LETTERS_TOTAL,
    LAKE_EVENTS_SKIPPED_TOTAL,
    LAKE_RETRIES_TOTAL,
    LAKE_HELD_BYTES,
    LAKE_CONSUMER_LAG_MESSAGES,
    LAKE_LAST_COMMIT_SECONDS,
];

/// What `/metrics` and `/ready` show: the source's or the sink's metrics.
pub trait Exporter: Send + Sync + 'static {
    fn render(&self) -> String;
    fn ready(&self) -> bool;
}

/// The source's metrics with its name as the label.
pub(crate) struct SourceExporter {
    pub(crate) source: String,
    pub(crate) metrics: std::sync::Arc<SourceMetrics>,
}

impl Exporter for SourceExporter {
    fn render(&self) -> String {
        self.metrics.render(&self.source)
    }
    fn ready(&self) -> bool {
        self.metrics.ready.load(Ordering::Relaxed)
    }
}

/// One metric with its HELP and TYPE lines, in Prometheus text format.
fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, v: u64) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {v}\n"
    ));
}

fn label(name: &str, value: &str) -> String {
    format!(
        "{{{name}=\"{}\"}}",
        value.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// Upper bounds (seconds) of the apply-latency histogram buckets.
pub(crate) const APPLY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Upper bounds (seconds) of the commit → ODS freshness histogram buckets: fine around the
/// 100 ms that issue #5 asks of p99.
pub(crate) const FRESHNESS_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram of seconds, lock-free.
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Counts per bucket of `bounds`, +Inf last (not cumulative).
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        let i = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// Appends the histogram in Prometheus text format, `label` being one `name="value"`.
    fn write(&self, out: &mut String, name: &str, help: &str, label: (&str, &str)) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_string(), f64::to_string);
            out.push_str(&format!(
                "{name}_bucket{} {cum}\n",
                label_pair(label.0, label.1, "le", &le)
            ));
        }
        let l = self::label(label.0, label.1);
        out.push_str(&format!(
            "{name}_sum{l} {}\n{name}_count{l} {cum}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        ));
    }
}

pub struct SinkMetrics {
    pub(crate) group: String,
    pub(crate) consumed: AtomicU64,
    pub(crate) rows_applied: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) fenced: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) lag: AtomicU64,
    pub(crate) assigned: AtomicU64,
    /// Topics stopped at a schema change (`saiki_sink.stopped`).
    pub(crate) stopped: AtomicU64,
    /// Rows of streamed transactions staged in the ODS, and those transactions
    /// (`saiki_sink.streams`, all instances), as last read.
    pub(crate) staged_rows: AtomicU64,
    pub(crate) streams_open: AtomicU64,
    /// Streamed transactions this instance applied at their commit, or dropped at their abort.
    pub(crate) stream_commits: AtomicU64,
    pub(crate) stream_aborts: AtomicU64,
    /// Time to apply and commit one batch.
    pub(crate) apply: Histogram,
    /// Per applied change: ODS commit time minus the source's commit time.
    pub(crate) freshness: Histogram,
    /// Consuming and applying: what /ready reports.
    pub(crate) ready: AtomicBool,
}

impl SinkMetrics {
    pub fn new(group: &str) -> Self {
        let z = || AtomicU64::new(0);
        SinkMetrics {
            group: group.to_string(),
            consumed: z(),
            rows_applied: z(),
            batches: z(),
            dead_letters: z(),
            fenced: z(),
            retries: z(),
            lag: z(),
            assigned: z(),
            stopped: z(),
            staged_rows: z(),
            streams_open: z(),
            stream_commits: z(),
            stream_aborts: z(),
            apply: Histogram::new(APPLY_BUCKETS),
            freshness: Histogram::new(FRESHNESS_BUCKETS),
            ready: AtomicBool::new(false),
        }
    }
}

impl Exporter for SinkMetrics {
    fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let l = label("group", &self.group);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            write_metric(&mut out, name, kind, help, &l, v)
        };
        metric(
            SINK_RECORDS_CONSUMED_TOTAL,
            "counter",
            "Kafka messages consumed (applied, skipped or dead-lettered).",
            g(&self.consumed),
        );
        metric(
            SINK_ROWS_APPLIED_TOTAL,
            "counter",
            "ODS rows inserted, updated or deleted.",
            g(&self.rows_applied),
        );
        metric(
            SINK_BATCHES_TOTAL,
            "counter",
            "Batches committed to the ODS with their offsets.",
            g(&self.batches),
        );
        metric(SINK_CONSUMER_LAG_MESSAGES, "gauge", "Messages in the assigned partitions not yet applied (high watermark minus stored offset).", g(&self.lag));
        metric(
            SINK_DEAD_LETTERS_TOTAL,
            "counter",
            "Messages sent to the dead-letter topic.",
            g(&self.dead_letters),
        );
        metric(
            SINK_FENCED_BATCHES_TOTAL,
            "counter",
            "Batches dropped because another sink instance had moved their offsets (rebalance).",
            g(&self.fenced),
        );
        metric(
            SINK_RETRIES_TOTAL,
            "counter",
            "Sessions that ended on a transient error (ODS, broker, a group that never settled) and started again.",
            g(&self.retries),
        );
        metric(
            SINK_ASSIGNED_PARTITIONS,
            "gauge",
            "Partitions assigned to this instance.",
            g(&self.assigned),
        );
        metric(
            SINK_STOPPED_TOPICS,
            "gauge",
            "Topics stopped at a schema change their ODS table cannot follow (saiki_sink.stopped).",
            g(&self.stopped),
        );
        metric(
            SINK_STAGED_ROWS,
            "gauge",
            "Rows of open streamed transactions staged in the ODS (saiki_sink.staged), all sink instances.",
            g(&self.staged_rows),
        );
        metric(
            SINK_STREAMED_TRANSACTIONS_OPEN,
            "gauge",
            "Streamed transactions staged in the ODS and not yet committed or aborted (saiki_sink.streams).",
            g(&self.streams_open),
        );
        metric(
            SINK_STREAMED_COMMITS_TOTAL,
            "counter",
            "Streamed transactions this instance applied at their commit, in one ODS transaction.",
            g(&self.stream_commits),
        );
        metric(
            SINK_STREAMED_ABORTS_TOTAL,
            "counter",
            "Streamed transactions this instance dropped from the staging at their abort.",
            g(&self.stream_aborts),
        );
        let l = ("group", self.group.as_str());
        self.apply.write(
            &mut out,
            SINK_APPLY_SECONDS,
            "Time to apply and commit one batch.",
            l,
        );
        self.freshness.write(
            &mut out,
            SINK_FRESHNESS_SECONDS,
            "Per applied change: ODS commit time minus the source commit time (needs source.include_timestamp).",
            l,
        );
        out
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The event API's metrics (`saiki-relay ingest`).
pub struct IngestMetrics {
    /// Events Kafka acknowledged (answered 200).
    pub(crate) published: AtomicU64,
    /// Events of refused batches (422: failed and aborted ones; 413).
    pub(crate) rejected: AtomicU64,
    /// Batches answered 503 because Kafka did not acknowledge them.
    pub(crate) kafka_failures: AtomicU64,
    /// Batches answered 429: the in-flight window was full.
    pub(crate) throttled: AtomicU64,
    /// Time from a publishing request's receipt to its answer.
    pub(crate) publish: Histogram,
    /// Publishing requests refused, by [`REFUSAL_REASONS`].
    pub(crate) refused: [AtomicU64; REFUSAL_REASONS.len()],
    /// The in-flight window (one permit per event) and its size, set when the API starts:
    /// events waiting for Kafka are the permits taken.
    pub(crate) window: std::sync::OnceLock<(std::sync::Arc<tokio::sync::Semaphore>, usize)>,
    pub(crate) ready: AtomicBool,
}

/// Why a publishing request was refused, by its status: the `reason` label of
/// `saiki_ingest_requests_refused_total` (429 is `saiki_ingest_throttled_total`, 503
/// `saiki_ingest_kafka_failures_total`).
pub(crate) const REFUSAL_REASONS: [(u16, &str); 6] = [
    (400, "malformed"),
    (401, "unauthorized"),
    (403, "forbidden"),
    (404, "unknown_event_type"),
    (413, "too_large"),
    (422, "invalid"),
];

impl IngestMetrics {
    /// Counts a publishing request answered `status`, if that is a refusal.
    pub(crate) fn answered(&self, status: u16) {
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| r.0 == status) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for IngestMetrics {
    fn default() -> Self {
        IngestMetrics {
            published: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            kafka_failures: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            publish: Histogram::new(APPLY_BUCKETS),
            refused: Default::default(),
            window: std::sync::OnceLock::new(),
            ready: AtomicBool::new(false),
        }
    }
}

impl Exporter for IngestMetrics {
    fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let l = label("relay", "ingest");
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            write_metric(&mut out, name, kind, help, &l, v)
        };
        metric(
            INGEST_EVENTS_PUBLISHED_TOTAL,
            "counter",
            "Events Kafka acknowledged (their batch was answered 200).",
            g(&self.published),
        );
        metric(
            INGEST_EVENTS_REJECTED_TOTAL,
            "counter",
            "Events of batches refused for their content (422) or size (413).",
            g(&self.rejected),
        );
        metric(
            INGEST_KAFKA_FAILURES_TOTAL,
            "counter",
            "Batches answered 503 because Kafka did not acknowledge every event in time.",
            g(&self.kafka_failures),
        );
        metric(
            INGEST_THROTTLED_TOTAL,
            "counter",
            "Batches answered 429 because ingest.max_in_flight_events events waited for Kafka.",
            g(&self.throttled),
        );
        metric(
            INGEST_EVENTS_IN_FLIGHT,
            "gauge",
            "Events handed to Kafka and not yet acknowledged (at most ingest.max_in_flight_events).",
            self.window
                .get()
                .map_or(0, |(s, size)| size.saturating_sub(s.available_permits()) as u64),
        );
        out.push_str(&format!(
            "# HELP {INGEST_REQUESTS_REFUSED_TOTAL} Publishing requests refused, by reason (status 400, 401, 403, 404, 413, 422).\n# TYPE {INGEST_REQUESTS_REFUSED_TOTAL} counter\n"
        ));
        for ((_, reason), n) in REFUSAL_REASONS.iter().zip(&self.refused) {
            out.push_str(&format!(
                "{INGEST_REQUESTS_REFUSED_TOTAL}{} {}\n",
                label_pair("relay", "ingest", "reason", reason),
                g(n)
            ));
        }
        self.publish.write(
            &mut out,
            INGEST_PUBLISH_SECONDS,
            "Time from a publishing request's receipt to its answer.",
            ("relay", "ingest"),
        );
        out
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The lake relay's metrics (`saiki-relay lake`).
#[derive(Default)]
pub struct LakeMetrics {
    /// Change-log rows committed to Iceberg tables.
    pub(crate) rows: AtomicU64,
    /// Iceberg commits (one per table per round).
    pub(crate) commits: AtomicU64,
    /// Parquet data files committed.
    pub(crate) files: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    /// Event API events read and not written (`lake.events = false`).
    pub(crate) skipped: AtomicU64,
    pub(crate) retries: AtomicU64,
    /// Messages of the assigned partitions past the group's committed offsets (librdkafka's
    /// statistics).
    pub(crate) lag: AtomicU64,
    /// Bytes of streamed transactions' records read and held until their end.
    pub(crate) held_bytes: AtomicU64,
    /// µs since the Unix epoch of the last round that committed rows.
    pub(crate) last_commit: AtomicU64,
    pub(crate) ready: AtomicBool,
}

impl Exporter for LakeMetrics {
    fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let l = label("relay", "lake");
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            write_metric(&mut out, name, kind, help, &l, v)
        };
        metric(
            LAKE_ROWS_WRITTEN_TOTAL,
            "counter",
            "Change-log rows committed to the lake's Iceberg tables.",
            g(&self.rows),
        );
        metric(
            LAKE_COMMITS_TOTAL,
            "counter",
            "Iceberg commits (one per table with rows per round).",
            g(&self.commits),
        );
        metric(
            LAKE_DATA_FILES_TOTAL,
            "counter",
            "Parquet data files committed.",
            g(&self.files),
        );
        metric(
            LAKE_DEAD_LETTERS_TOTAL,
            "counter",
            "Records the lake cannot read, sent to the dead-letter topic.",
            g(&self.dead_letters),
        );
        metric(
            LAKE_EVENTS_SKIPPED_TOTAL,
            "counter",
            "Event API events read and not written (lake.events = false).",
            g(&self.skipped),
        );
        metric(
            LAKE_RETRIES_TOTAL,
            "counter",
            "Sessions restarted after a transient failure (catalog, warehouse, Kafka).",
            g(&self.retries),
        );
        metric(
            LAKE_HELD_BYTES,
            "gauge",
            "Bytes of streamed transactions' records held in memory until their commit or abort.",
            g(&self.held_bytes),
        );
        metric(
            LAKE_CONSUMER_LAG_MESSAGES,
            "gauge",
            "Messages of the assigned partitions not yet committed to the lake (past the group's offsets).",
            g(&self.lag),
        );
        metric(
            LAKE_LAST_COMMIT_SECONDS,
            "gauge",
            "Unix time of the last round that committed rows (0: none yet).",
            g(&self.last_commit) / 1_000_000,
        );
        out
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

fn label_pair(k1: &str, v1: &str, k2: &str, v2: &str) -> String {
    let l1 = label(k1, v1);
    let l2 = label(k2, v2);
    format!("{},{}", &l1[..l1.len() - 1], &l2[1..])
}

#[derive(Default)]
pub struct SourceMetrics {
    pub(crate) changes: AtomicU64,
    pub(crate) produced: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) confirmed_lsn: AtomicU64,
    pub(crate) server_wal_end: AtomicU64,
    pub(crate) delivery_errors: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) snapshot_rows: AtomicU64,
    /// Streamed transactions (`source.stream_large`) sent and not yet committed or aborted.
    pub(crate) streamed_open: AtomicU64,
    pub(crate) streamed_records: AtomicU64,
    pub(crate) streamed_committed: AtomicU64,
    pub(crate) streamed_aborted: AtomicU64,
    /// Resyncs after the slot lost changes (a failover), and why the last one happened.
    pub(crate) resyncs: AtomicU64,
    pub(crate) resync_reason: std::sync::Mutex<Option<String>>,
    /// Per table of this relay's snapshots since it started: (rows done, rows estimated).
    pub(crate) snapshot_tables: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
    /// Streaming from the slot and producing: what /ready reports.
    pub(crate) ready: AtomicBool,
}

impl SourceMetrics {
    /// A resync after the slot lost changes: counted, and why kept for `/metrics`' readers.
    pub(crate) fn note_resync(&self, why: &str) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
        *self.resync_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }

    pub fn snapshot_progress(&self, table: &str, done: u64, estimated: u64) {
        let mut t = self
            .snapshot_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        t.insert(table.to_string(), (done, estimated));
    }

    pub fn render(&self, source: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag = g(&self.server_wal_end).saturating_sub(g(&self.confirmed_lsn));
        let l = label("source", source);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            write_metric(&mut out, name, kind, help, &l, v)
        };
        metric(
            SOURCE_LAG_BYTES,
            "gauge",
            "Bytes of WAL between the server's end and the confirmed position.",
            lag,
        );
        metric(
            SOURCE_CHANGES_TOTAL,
            "counter",
            "Change records read from the slot.",
            g(&self.changes),
        );
        metric(
            SOURCE_MESSAGES_PRODUCED_TOTAL,
            "counter",
            "Messages acknowledged by Kafka.",
            g(&self.produced),
        );
        metric(
            SOURCE_IN_FLIGHT_MESSAGES,
            "gauge",
            "Messages handed to Kafka and not yet acknowledged.",
            g(&self.in_flight),
        );
        metric(
            SOURCE_CONFIRMED_LSN,
            "gauge",
            "Last LSN confirmed to the slot, as a number.",
            g(&self.confirmed_lsn),
        );
        metric(
            SOURCE_SERVER_WAL_END,
            "gauge",
            "Server WAL end last reported on the stream, as a number.",
            g(&self.server_wal_end),
        );
        metric(
            SOURCE_DELIVERY_ERRORS_TOTAL,
            "counter",
            "Messages Kafka did not accept (the stream restarts from the slot).",
            g(&self.delivery_errors),
        );
        metric(
            SOURCE_RECONNECTS_TOTAL,
            "counter",
            "Replication sessions restarted after an error.",
            g(&self.reconnects),
        );
        metric(
            SOURCE_HEARTBEATS_TOTAL,
            "counter",
            "Heartbeat messages written to the source.",
            g(&self.heartbeats),
        );
        metric(
            SOURCE_SNAPSHOT_ROWS_TOTAL,
            "counter",
            "Snapshot rows produced as R records (chunk rows whose key did not change while the chunk was read).",
            g(&self.snapshot_rows),
        );
        metric(
            SOURCE_STREAMED_TRANSACTIONS_OPEN,
            "gauge",
            "Large transactions being streamed to Kafka before their commit (source.stream_large).",
            g(&self.streamed_open),
        );
        metric(
            SOURCE_STREAMED_RECORDS_TOTAL,
            "counter",
            "Change records of streamed transactions produced before their commit.",
            g(&self.streamed_records),
        );
        metric(
            SOURCE_STREAMED_COMMITS_TOTAL,
            "counter",
            "Streamed transactions that committed.",
            g(&self.streamed_committed),
        );
        metric(
            SOURCE_STREAMED_ABORTS_TOTAL,
            "counter",
            "Streamed transactions that aborted (their records in Kafka are void).",
            g(&self.streamed_aborted),
        );
        metric(
            SOURCE_RESYNCS_TOTAL,
            "counter",
            "Resyncs (a snapshot of every captured table) after the slot lost changes: missing after a failover, or not the one streamed from.",
            g(&self.resyncs),
        );
        let tables = self
            .snapshot_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, help, pick) in [
            (
                SOURCE_SNAPSHOT_TABLE_ROWS,
                "Rows of the table read by its snapshot so far (finished chunks).",
                0,
            ),
            (
                SOURCE_SNAPSHOT_TABLE_ROWS_ESTIMATED,
                "Rows of the table as estimated when its snapshot was asked for.",
                1,
            ),
        ] {
            if tables.is_empty() {
                continue;
            }
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for (t, (done, est)) in &tables {
                let v = if pick == 0 { done } else { est };
                out.push_str(&format!(
                    "{name}{} {v}\n",
                    label_pair("source", source, "table", t)
                ));
            }
        }
        out
    }
}
