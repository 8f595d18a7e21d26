//! `saiki-relay source`: streams a replication slot into Kafka (DESIGN.md §3, §4).
//!
//! Invariants kept here (with [`AckTracker`] holding the first):
//! 1. The slot is confirmed only to [`AckTracker::confirmable`]: never past a change Kafka has
//!    not acknowledged. On any error nothing more is confirmed; the next session restarts at
//!    the slot's confirmed position (at-least-once: duplicates, never gaps).
//! 2. Bounded memory: at most `max_in_flight` messages wait for Kafka; past that the relay
//!    stops reading the stream (TCP backpressure to the walsender) but keeps sending status
//!    updates, so `wal_sender_timeout` never fires.
//! 3. Per-row order: the key (identity columns) picks the partition; the producer is
//!    idempotent, so retries do not reorder.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use saiki_core::encode::ObjectWriter;
use saiki_core::json::{write_str, write_u64};
use saiki_core::record::Action;
use saiki_core::Lsn;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::ack::{AckTracker, Ticket};
use crate::config::{KafkaConfig, SourceConfig};
use crate::dsn::Dsn;
use crate::error::{RelayError, Retry};
use crate::kafka::{Kafka, Outgoing};
use crate::metrics::SourceMetrics;
use crate::pg::{PgConn, ReplicationStream};
use crate::route::{self, RecordView, TopicTemplate};
use crate::wire::{self, Backend, Replication};

/// Prefix of the heartbeat messages the relay writes; they are not produced to Kafka.
pub const HEARTBEAT_PREFIX: &str = "saiki.heartbeat";
/// Settings of the replication session, so values print the same whatever the server's
/// defaults: ISO dates in UTC, round-trip floats.
pub const SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=3";

type Delivery = futures::future::BoxFuture<'static, (Ticket, Result<(), String>)>;

/// Everything `run` needs, checked once.
pub struct SourceRuntime {
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub dsn: Dsn,
    pub slot: String,
}

impl SourceRuntime {
    pub fn new(source: SourceConfig, kafka: KafkaConfig) -> Result<Self, RelayError> {
        let dsn =
            Dsn::parse(&source.dsn).map_err(|e| RelayError::Config(format!("source.dsn: {e}")))?;
        if source.name.trim().is_empty() {
            return Err(RelayError::Config(
                "source.name is empty: name the source (e.g. the shard)".into(),
            ));
        }
        if source.snapshot != "never" {
            return Err(RelayError::Config(format!(
                "source.snapshot = \"{}\": initial snapshots are not in this build yet (issue #6); set snapshot = \"never\"",
                source.snapshot
            )));
        }
        if source.max_in_flight == 0 {
            return Err(RelayError::Config(
                "source.max_in_flight must be at least 1".into(),
            ));
        }
        if source.status_interval.is_zero() || source.status_interval > Duration::from_secs(30) {
            return Err(RelayError::Config("source.status_interval must be between 1ms and 30s (wal_sender_timeout is 60s by default)".into()));
        }
        let slot = source.slot.clone().unwrap_or_else(|| {
            format!(
                "saiki_{}",
                source
                    .name
                    .to_ascii_lowercase()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            )
        });
        Ok(SourceRuntime {
            source,
            kafka,
            dsn,
            slot,
        })
    }

    /// The START_REPLICATION command with the plugin options the relay relies on.
    pub fn start_command(&self) -> String {
        let mut opts = vec![
            ("include-transaction", "true".to_string()),
            ("include-types", self.source.include_types.to_string()),
            (
                "include-timestamp",
                self.source.include_timestamp.to_string(),
            ),
            ("skip-empty-xacts", "true".to_string()),
            ("batch-bytes", self.source.batch_bytes.to_string()),
        ];
        if !self.source.tables.is_empty() {
            opts.push(("add-tables", self.source.tables.join(",")));
        }
        let opts: Vec<String> = opts
            .iter()
            .map(|(k, v)| format!("{} {}", wire::quote_ident(k), wire::quote_literal(v)))
            .collect();
        format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 ({})",
            wire::quote_ident(&self.slot),
            opts.join(", ")
        )
    }
}

/// Runs the source until `shutdown` turns true (then drains, confirms and returns Ok) or a
/// definite error. Transient errors restart the session with exponential backoff.
pub async fn run(
    rt: Arc<SourceRuntime>,
    metrics: Arc<SourceMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut kafka = Kafka::new(&rt.kafka, rt.source.max_in_flight)?;
    let mut retry = Retry::new(rt.source.reconnect_backoff_max);
    loop {
        let span = info_span!("source", name = %rt.source.name, slot = %rt.slot);
        retry.session_started();
        let result = session(&rt, &metrics, &mut kafka, &mut shutdown)
            .instrument(span)
            .await;
        metrics.ready.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                if !retry.wait(&e, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Checks the slot, creating it with plugin saiki if it is missing (never dropping one).
async fn ensure_slot(conn: &mut PgConn, rt: &SourceRuntime) -> Result<(), RelayError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT plugin, database FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            wire::quote_literal(&rt.slot)
        ))
        .await?;
    if let Some(row) = rows.first() {
        let plugin = row
            .first()
            .cloned()
            .flatten()
            .unwrap_or_else(|| "(none: a physical slot)".into());
        if plugin != "saiki" {
            return Err(RelayError::WrongPlugin {
                slot: rt.slot.clone(),
                plugin,
            });
        }
        let db = row.get(1).cloned().flatten().unwrap_or_default();
        if db != rt.dsn.dbname {
            return Err(RelayError::WrongDatabase {
                slot: rt.slot.clone(),
                expected: rt.dsn.dbname.clone(),
                actual: db,
            });
        }
        return Ok(());
    }
    info!(slot = %rt.slot, "creating replication slot with plugin saiki");
    let created = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL saiki NOEXPORT_SNAPSHOT",
            wire::quote_ident(&rt.slot)
        ))
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(RelayError::Server { target, mut error }) => {
            if error
                .message
                .contains("may not be used as an output plugin")
            {
                error.hint = Some(saiki_core::loading::ALLOW_HINT.to_string());
            }
            Err(RelayError::Server { target, error })
        }
        Err(e) => Err(e),
    }
}

struct Session<'a> {
    rt: &'a SourceRuntime,
    metrics: &'a SourceMetrics,
    kafka: &'a mut Kafka,
    topics: TopicTemplate,
    source_json: Vec<u8>,
    tx_key: Vec<u8>,
    tracker: AckTracker,
    deliveries: FuturesUnordered<Delivery>,
    /// Changes per table of the open transaction, for its C record.
    counts: BTreeMap<String, u64>,
}

async fn session(
    rt: &SourceRuntime,
    metrics: &SourceMetrics,
    kafka: &mut Kafka,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut conn = PgConn::connect(&rt.dsn, true, SESSION_OPTIONS).await?;
    ensure_slot(&mut conn, rt).await?;
    let tls = conn.is_tls();
    let mut stream = conn.start_replication(&rt.start_command()).await?;
    info!(dsn = %rt.dsn, tls, "streaming from the slot");
    metrics.ready.store(true, Ordering::Relaxed);

    let mut source_json = Vec::new();
    write_str(&mut source_json, rt.source.name.as_bytes());
    let mut tx_key = b"{\"source\":".to_vec();
    tx_key.extend_from_slice(&source_json);
    tx_key.push(b'}');
    let mut s = Session {
        rt,
        metrics,
        kafka,
        topics: TopicTemplate::new(
            &rt.kafka.topic_template,
            &rt.kafka.topic_prefix,
            &rt.source.name,
        ),
        source_json,
        tx_key,
        tracker: AckTracker::new(),
        deliveries: FuturesUnordered::new(),
        counts: BTreeMap::new(),
    };

    let mut status = tokio::time::interval(rt.source.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hb_every = if rt.source.heartbeat_interval.is_zero() {
        Duration::from_secs(3600 * 24 * 365)
    } else {
        rt.source.heartbeat_interval
    };
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + hb_every, hb_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hb_conn: Option<PgConn> = None;
    let mut confirmed_sent = Lsn(0);

    loop {
        let can_read = s.deliveries.len() < rt.source.max_in_flight;
        tokio::select! {
            r = stream.read.read_buf(&mut stream.rbuf), if can_read => {
                let n = r.map_err(|e| stream.io(e))?;
                if n == 0 {
                    return Err(stream.io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the replication connection")));
                }
                let reply = s.process_buffer(&mut stream).await?;
                if reply {
                    send_status(&mut stream, &s, &mut confirmed_sent, true).await?;
                }
            }
            Some((ticket, result)) = s.deliveries.next() => {
                s.delivered(ticket, result)?;
            }
            _ = status.tick() => {
                send_status(&mut stream, &s, &mut confirmed_sent, false).await?;
            }
            _ = heartbeat.tick() => {
                send_heartbeat(rt, metrics, &mut hb_conn).await;
            }
            _ = shutdown.changed() => {
                return s.drain(&mut stream, &mut confirmed_sent).await;
            }
        }
    }
}

async fn send_status(
    stream: &mut ReplicationStream,
    s: &Session<'_>,
    sent: &mut Lsn,
    reply_requested: bool,
) -> Result<(), RelayError> {
    let lsn = s.tracker.confirmable();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    wire::standby_status_update(&mut stream.wbuf, lsn, lsn, lsn, now, false);
    stream.flush().await?;
    if lsn != *sent {
        debug!(confirmed = %lsn, reply_requested, "confirmed");
        *sent = lsn;
    }
    s.metrics.confirmed_lsn.store(lsn.0, Ordering::Relaxed);
    Ok(())
}

/// Writes a heartbeat on a side connection (reconnecting as needed). A failure is logged and
/// retried at the next tick: the heartbeat only keeps an idle slot moving.
async fn send_heartbeat(rt: &SourceRuntime, metrics: &SourceMetrics, conn: &mut Option<PgConn>) {
    if conn.is_none() {
        match PgConn::connect(&rt.dsn, false, "").await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                warn!(error = %e, "heartbeat connection failed");
                return;
            }
        }
    }
    if let Some(c) = conn.as_mut() {
        let sql = format!(
            "SELECT pg_catalog.pg_logical_emit_message(false, {}, now()::text)",
            wire::quote_literal(HEARTBEAT_PREFIX)
        );
        match c.simple_query(&sql).await {
            Ok(_) => {
                metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(error = %e, "heartbeat failed");
                *conn = None;
            }
        }
    }
}

impl Session<'_> {
    /// Handles every complete message in the read buffer. Returns whether the server asked for
    /// an immediate status reply.
    async fn process_buffer(&mut self, stream: &mut ReplicationStream) -> Result<bool, RelayError> {
        let mut reply = false;
        while let Some(msg) = wire::parse_backend(&mut stream.rbuf)? {
            match msg {
                Backend::CopyData(body) => match wire::parse_replication(body)? {
                    Replication::XLogData { wal_end, data, .. } => {
                        self.metrics
                            .server_wal_end
                            .fetch_max(wal_end.0, Ordering::Relaxed);
                        let mut rest = data;
                        while !rest.is_empty() {
                            let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                            let line = rest.slice(..end);
                            rest.advance((end + 1).min(rest.len()));
                            if !line.is_empty() {
                                self.record(&line).await?;
                            }
                        }
                    }
                    Replication::Keepalive {
                        wal_end,
                        reply_requested,
                    } => {
                        self.metrics
                            .server_wal_end
                            .fetch_max(wal_end.0, Ordering::Relaxed);
                        // Everything before a keepalive was sent before it: with nothing in
                        // flight, its WAL end holds no unacknowledged change.
                        self.tracker.idle_at(wal_end);
                        reply |= reply_requested;
                    }
                },
                Backend::Error(e) => {
                    return Err(RelayError::Server {
                        target: stream.target.clone(),
                        error: Box::new(e),
                    })
                }
                Backend::CopyDone => {
                    return Err(stream.io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "server ended the replication stream",
                    )))
                }
                _ => {}
            }
        }
        Ok(reply)
    }

    async fn record(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        let view = RecordView::parse(bytes).map_err(|e| RelayError::Record(e.to_string()))?;
        let commit_lsn = view
            .commit_lsn
            .ok_or_else(|| RelayError::Record(format!("record without commit_lsn at {}: streamed transactions are not enabled by the relay", view.lsn)))?;
        let ticket = self.tracker.unit_for(commit_lsn);
        // Built only when they are sent: four strings per message on the hot path.
        let all_headers;
        let headers: &[(&'static str, String)] = if self.rt.kafka.headers {
            all_headers = route::headers(&self.rt.source.name, &view);
            &all_headers
        } else {
            &[]
        };
        match view.action {
            Action::Begin => {
                self.counts.clear();
                let topic = self.topics.transactions_topic();
                let value = route::value_with_source(bytes, &self.source_json);
                self.produce_by_source(ticket, &topic, &value, headers)
                    .await?;
            }
            Action::Commit => {
                let topic = self.topics.transactions_topic();
                let mut members = Vec::new();
                let mut obj = ObjectWriter::open_member(&mut members, "changes");
                for (t, n) in &self.counts {
                    obj.field_str(&mut members, t.as_bytes());
                    write_u64(&mut members, *n);
                }
                obj.close(&mut members);
                let value = route::value_with_members(bytes, &members, &self.source_json);
                self.produce_by_source(ticket, &topic, &value, headers)
                    .await?;
                self.tracker.complete(ticket);
            }
            Action::Insert | Action::Update | Action::Delete | Action::Truncate => {
                let (schema, table) = (
                    view.schema.as_deref().unwrap_or(""),
                    view.table.as_deref().unwrap_or(""),
                );
                let topic = self.topics.table_topic(schema, table);
                let partitions = self.kafka.ensure_topic(&topic).await?;
                *self.counts.entry(format!("{schema}.{table}")).or_default() += 1;
                self.metrics.changes.fetch_add(1, Ordering::Relaxed);
                let value = route::value_with_source(bytes, &self.source_json);
                if view.action == Action::Truncate {
                    // A truncate concerns every row: every partition gets it, in order.
                    for p in 0..partitions {
                        self.produce(ticket, &topic, Some(p), None, Some(&value), headers)
                            .await?;
                    }
                } else {
                    let key = view.key_json();
                    let key = key.as_ref().map(|k| k.as_bytes());
                    self.produce(ticket, &topic, None, key, Some(&value), headers)
                        .await?;
                    if let Some(old) = view.old_key_json() {
                        // The key changed: the old key's partition gets the update too.
                        self.produce(
                            ticket,
                            &topic,
                            None,
                            Some(old.as_bytes()),
                            Some(&value),
                            headers,
                        )
                        .await?;
                    }
                    if view.action == Action::Delete && self.rt.source.tombstones && key.is_some() {
                        self.produce(ticket, &topic, None, key, None, headers)
                            .await?;
                    }
                }
            }
            Action::Message => {
                if view.prefix.as_deref() != Some(HEARTBEAT_PREFIX) {
                    let topic = self.topics.messages_topic();
                    let value = route::value_with_source(bytes, &self.source_json);
                    self.produce_by_source(ticket, &topic, &value, headers)
                        .await?;
                }
                if view.transactional != Some(true) {
                    self.tracker.complete(ticket);
                }
            }
            other => {
                return Err(RelayError::Record(format!(
                    "unexpected {other:?} record at {}",
                    view.lsn
                )));
            }
        }
        Ok(())
    }

    /// Produces a record keyed by source (`{"source": name}`): B, C and messages, so that one
    /// source's transaction records stay in order in one partition.
    async fn produce_by_source(
        &mut self,
        ticket: Ticket,
        topic: &str,
        value: &[u8],
        headers: &[(&'static str, String)],
    ) -> Result<(), RelayError> {
        self.kafka.ensure_topic(topic).await?;
        let key = self.tx_key.clone();
        self.produce(ticket, topic, None, Some(&key), Some(value), headers)
            .await
    }

    async fn produce(
        &mut self,
        ticket: Ticket,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&'static str, String)],
    ) -> Result<(), RelayError> {
        // The caller has made sure the topic exists (ensure_topic).
        let fut = self
            .kafka
            .send(&Outgoing {
                topic,
                partition,
                key,
                payload,
                headers,
            })
            .await?;
        self.tracker.produced(ticket);
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        self.deliveries.push(
            async move {
                let r = match fut.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("the producer dropped the message".to_string()),
                };
                (ticket, r)
            }
            .boxed(),
        );
        Ok(())
    }

    fn delivered(&mut self, ticket: Ticket, result: Result<(), String>) -> Result<(), RelayError> {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.metrics.produced.fetch_add(1, Ordering::Relaxed);
                self.tracker.acked(ticket);
                Ok(())
            }
            Err(e) => {
                self.metrics.delivery_errors.fetch_add(1, Ordering::Relaxed);
                self.tracker.failed(ticket);
                Err(RelayError::Kafka(format!(
                    "delivery failed: {e}; restarting from the slot's confirmed position"
                )))
            }
        }
    }

    /// SIGTERM: stop reading, wait for in-flight messages (up to the grace period), confirm
    /// what Kafka acknowledged, end the stream.
    async fn drain(
        mut self,
        stream: &mut ReplicationStream,
        sent: &mut Lsn,
    ) -> Result<(), RelayError> {
        info!(in_flight = self.deliveries.len(), "draining before exit");
        let deadline = tokio::time::Instant::now() + self.rt.source.shutdown_grace;
        while !self.deliveries.is_empty() {
            tokio::select! {
                Some((t, r)) = self.deliveries.next() => {
                    if let Err(e) = self.delivered(t, r) {
                        warn!(error = %e, "delivery failed while draining; not confirming past it");
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(in_flight = self.deliveries.len(), "shutdown grace period over with messages in flight; they will be sent again after restart");
                    break;
                }
            }
        }
        send_status(stream, &self, sent, false).await?;
        wire::copy_done(&mut stream.wbuf);
        stream.flush().await.ok();
        info!(confirmed = %self.tracker.confirmable(), "drained and confirmed");
        Ok(())
    }
}
