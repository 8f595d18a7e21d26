//! Metric names (Prometheus text format) and the counters behind them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const SOURCE_LAG_BYTES: &str = "saiki_source_lag_bytes";
pub const SOURCE_CHANGES_TOTAL: &str = "saiki_source_changes_total";
pub const SOURCE_MESSAGES_PRODUCED_TOTAL: &str = "saiki_source_messages_produced_total";
pub const SOURCE_IN_FLIGHT_MESSAGES: &str = "saiki_source_in_flight_messages";
pub const SOURCE_CONFIRMED_LSN: &str = "saiki_source_confirmed_lsn";
pub const SOURCE_SERVER_WAL_END: &str = "saiki_source_server_wal_end_lsn";
pub const SOURCE_DELIVERY_ERRORS_TOTAL: &str = "saiki_source_delivery_errors_total";
pub const SOURCE_RECONNECTS_TOTAL: &str = "saiki_source_reconnects_total";
pub const SOURCE_HEARTBEATS_TOTAL: &str = "saiki_source_heartbeats_total";

#[derive(Default)]
pub struct SourceMetrics {
    pub changes: AtomicU64,
    pub produced: AtomicU64,
    pub in_flight: AtomicU64,
    pub confirmed_lsn: AtomicU64,
    pub server_wal_end: AtomicU64,
    pub delivery_errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Streaming from the slot and producing: what /ready reports.
    pub ready: AtomicBool,
}

impl SourceMetrics {
    pub fn render(&self, source: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let lag = g(&self.server_wal_end).saturating_sub(g(&self.confirmed_lsn));
        let l = format!(
            "{{source=\"{}\"}}",
            source.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{l} {v}\n"
            ));
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
        out
    }
}
