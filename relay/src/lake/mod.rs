//! `saiki-relay lake`: the change topics as Apache Iceberg change-log tables (DESIGN.md §9,
//! docs/lake.md). The loop reads records into a *round* (rows per table, in memory), and ends
//! the round when `commit_interval` has passed since its first row or its rows reach
//! `target_file_size`: each table with rows gets Parquet data files and one Iceberg commit
//! whose snapshot summary holds the table's marks (`ledger.rs`), then the consumer group's
//! offsets are committed. What is in a table is decided by its snapshots alone.
//!
//! Built on the Apache Iceberg Rust implementation (`iceberg`, its SQL catalog, its Parquet
//! writers, its partition splitter): nothing of the table format is written by hand here.

mod columns;
pub(crate) mod engine;
mod held;
mod ledger;
mod round;
mod schema;
mod table;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use saiki_core::record::Action;
use saiki_core::view::{Fields, RecordView};
use saiki_core::Lsn;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn};

use crate::config::{KafkaConfig, LakeConfig};
use crate::error::RelayError;
use crate::event_registry::EventCatalog;
use crate::event_table::{self, EventTable, METADATA_COLUMNS};
use crate::kafka::{Kafka, TopicFilter};
use crate::metrics::LakeMetrics;
use crate::retry::{supervise, Supervised};
use columns::{changes_table, Row};
use held::{Held, StreamKey};
use ledger::Tp;
use round::Round;
use table::Catalog;

/// The header the event API puts on every event.
const EVENT_TYPE_HEADER: &str = "saiki.event_type";
/// How often topics are listed.
const TOPIC_REFRESH: Duration = Duration::from_secs(5);
/// Dead letters produced at once at most (the lake awaits each).
const DEAD_LETTER_QUEUE_CAPACITY: usize = 1_000;

/// The lake's settings, checked.
pub(crate) struct LakeRuntime {
    pub(crate) lake: LakeConfig,
    pub(crate) kafka: KafkaConfig,
    /// The catalog database as a URL (sqlx's form).
    pub(crate) catalog_url: String,
    pub(crate) warehouse: table::Warehouse,
    /// The event API's registry (`ingest.dsn`, else the catalog's database); `None` with
    /// `lake.events = false`.
    registry_dsn: Option<String>,
    topics: TopicFilter,
    dead_letter_topic: String,
}

impl LakeRuntime {
    pub(crate) fn new(
        lake: LakeConfig,
        kafka: KafkaConfig,
        sink_dsn: Option<&str>,
        registry_dsn: Option<&str>,
    ) -> Result<Self, RelayError> {
        let dsn = lake.catalog_dsn.as_deref().or(sink_dsn).ok_or_else(|| {
            RelayError::Config(
                "lake needs a catalog database: lake.catalog_dsn (or sink.dsn)".into(),
            )
        })?;
        let catalog_url = table::catalog_url(dsn)?;
        table::check_catalog_tls(dsn)?;
        let registry_dsn = lake.events.then(|| registry_dsn.unwrap_or(dsn).to_string());
        let warehouse = table::Warehouse::from_config(&lake)?;
        for (k, v) in [
            ("lake.group", &lake.group),
            ("lake.namespace", &lake.namespace),
            ("lake.catalog_name", &lake.catalog_name),
        ] {
            if v.trim().is_empty() {
                return Err(RelayError::Config(format!("{k} must not be empty")));
            }
        }
        if lake.target_file_size < 1 << 20 {
            return Err(RelayError::Config(format!(
                "lake.target_file_size = {}: at least 1048576 (1 MiB); analytics wants 64-512 MiB",
                lake.target_file_size
            )));
        }
        if lake.snapshot_retention < Duration::from_secs(1) {
            return Err(RelayError::Config(
                "lake.snapshot_retention must be at least 1s (readers of an older snapshot need it to stay)".into(),
            ));
        }
        if lake.commit_interval < Duration::from_millis(100) {
            return Err(RelayError::Config(
                "lake.commit_interval must be at least 100ms".into(),
            ));
        }
        let dead_letter_topic = format!("{}.dead-letter", kafka.topic_prefix);
        let topics = TopicFilter::new(
            "lake.topics",
            lake.topics.as_deref(),
            &kafka,
            &dead_letter_topic,
        )?;
        Ok(LakeRuntime {
            lake,
            kafka,
            catalog_url,
            warehouse,
            registry_dsn,
            topics,
            dead_letter_topic,
        })
    }

    fn wants(&self, topic: &str) -> bool {
        self.topics.wants(topic)
    }
}

/// Runs the lake relay until `shutdown` (it commits the round in hand) or a definite error.
pub(crate) async fn run(
    rt: Arc<LakeRuntime>,
    metrics: Arc<LakeMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let supervised = Supervised {
        ready: &metrics.ready,
        restarts: &metrics.retries,
        backoff_max: rt.lake.reconnect_backoff_max,
    };
    let span = || info_span!("lake", group = %rt.lake.group);
    supervise(supervised, &mut shutdown, span, async |shutdown| {
        session(&rt, &metrics, shutdown).await
    })
    .await
}

/// Tells the loop that partitions changed hands: the round in hand is dropped (it is read
/// again from the group's offsets) and the tables' marks are loaded again.
struct LakeContext {
    rebalanced: AtomicBool,
    lag: Arc<LakeMetrics>,
}

impl ClientContext for LakeContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::client_error(&error, reason);
    }

    /// The lag from librdkafka's statistics: each assigned partition's high watermark past
    /// the group's committed offset (what is not yet in the lake for sure).
    fn stats(&self, stats: rdkafka::Statistics) {
        let mut lag = 0i64;
        for t in stats.topics.values() {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.fetch_state != "none" && part.consumer_lag > 0 {
                    lag += part.consumer_lag;
                }
            }
        }
        self.lag.lag.store(lag as u64, Ordering::Relaxed);
    }
}

impl ConsumerContext for LakeContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            // Nothing is lost: reading starts at the last offsets the group has.
            warn!(error = %e, "the group's offsets were not committed; a restart reads a little more again");
        }
    }

    fn post_rebalance(
        &self,
        _c: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Assign(tpl) => info!(partitions = tpl.count(), "partitions assigned"),
            Rebalance::Revoke(tpl) => info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
        self.rebalanced.store(true, Ordering::SeqCst);
    }
}

struct Session<'a> {
    rt: &'a LakeRuntime,
    metrics: &'a LakeMetrics,
    consumer: ClosedApart<StreamConsumer<LakeContext>>,
    catalog: Catalog,
    /// The tables met in this session, their rows of the round and the ledger.
    round: Round,
    /// Records of streamed transactions not yet ended.
    held: Held,
    round_started: Option<tokio::time::Instant>,
    subscribed: Vec<String>,
    dead_letters: Kafka,
    /// The event types' layouts, from the event API's registry.
    events: Option<EventCatalog>,
}

async fn session(
    rt: &LakeRuntime,
    metrics: &Arc<LakeMetrics>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let catalog = Catalog::open(rt).await?;
    info!(warehouse = %rt.warehouse.url(), namespace = %rt.lake.namespace, "catalog open");
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &rt.kafka.brokers)
        .set("client.id", "saiki-relay-lake")
        .set("statistics.interval.ms", "5000");
    match &rt.lake.instance_id {
        Some(id) => cc.set("group.instance.id", id),
        None => cc.set("session.timeout.ms", "10000"),
    };
    for (k, v) in &rt.kafka.properties {
        cc.set(k, v);
    }
    // The group's offsets say where reading starts; they are committed after every table of
    // a round has committed (ledger.rs).
    cc.set("group.id", &rt.lake.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer<LakeContext> = cc
        .create_with_context(LakeContext {
            rebalanced: AtomicBool::new(false),
            lag: metrics.clone(),
        })
        .map_err(|e| RelayError::KafkaConfig(format!("{e}: check [kafka.properties]")))?;
    let mut s = Session {
        rt,
        metrics: metrics.as_ref(),
        consumer: ClosedApart(Some(consumer)),
        catalog,
        round: Round::default(),
        held: Held::default(),
        round_started: None,
        subscribed: Vec::new(),
        dead_letters: Kafka::new(&rt.kafka, DEAD_LETTER_QUEUE_CAPACITY)?,
        events: rt
            .registry_dsn
            .clone()
            .map(|d| EventCatalog::new(d, "saiki-relay lake", "lake.events")),
    };
    s.refresh_topics()?;
    metrics.ready.store(true, Ordering::Relaxed);
    let mut next_refresh = tokio::time::Instant::now() + TOPIC_REFRESH;
    loop {
        let deadline = s.round_started.map(|t| t + rt.lake.commit_interval);
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    info!(rows = s.round.rows, "shutdown: committing the round in hand");
                    let grace = rt.lake.shutdown_grace;
                    match tokio::time::timeout(grace, s.end_round()).await {
                        Ok(r) => r?,
                        Err(_) => warn!(?grace, "the round did not commit within the grace period: stopped; it is read again on the next start"),
                    }
                    return Ok(());
                }
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                s.end_round().await?;
            }
            m = s.consumer.recv() => {
                match m {
                    Ok(m) => {
                        let m = m.detach();
                        s.after_rebalance();
                        s.accept(m).await?;
                        metrics.held_bytes.store(s.held.bytes() as u64, Ordering::Relaxed);
                        if s.round.bytes >= rt.lake.target_file_size {
                            s.end_round().await?;
                        }
                    }
                    Err(e) => warn!(error = %e, "consume"),
                }
            }
            _ = tokio::time::sleep_until(next_refresh) => {
                s.after_rebalance();
                s.refresh_topics()?;
                next_refresh = tokio::time::Instant::now() + TOPIC_REFRESH;
            }
        }
    }
}

impl Session<'_> {
    fn refresh_topics(&mut self) -> Result<(), RelayError> {
        let rt = self.rt;
        crate::kafka::subscribe_matching(&self.consumer, |t| rt.wants(t), &mut self.subscribed)?;
        Ok(())
    }

    /// After a rebalance nothing of the round is kept: the consumer starts the partitions
    /// again at the group's offsets, and the marks are read again from the tables.
    fn after_rebalance(&mut self) {
        if self
            .consumer
            .context()
            .rebalanced
            .swap(false, Ordering::SeqCst)
        {
            if self.round.rows > 0 {
                info!(
                    rows = self.round.rows,
                    "rebalance: the round in hand is read again"
                );
            }
            self.round.ledger.reset();
            self.held.clear();
            for t in self.round.tables.values_mut() {
                t.rows.clear();
            }
            self.round.rows = 0;
            self.round.bytes = 0;
            self.round_started = None;
        }
    }

    /// One delivered message into the round.
    async fn accept(&mut self, m: OwnedMessage) -> Result<(), RelayError> {
        let tp: Tp = (m.topic().to_string(), m.partition());
        if !self.round.ledger.take(&tp, m.offset()) {
            return Ok(());
        }
        // Every message read moves the group's offsets on at the round's end.
        self.round_started
            .get_or_insert_with(tokio::time::Instant::now);
        let Some(payload) = m.payload() else {
            return Ok(()); // a tombstone: the delete before it is the change
        };
        let origin = Origin {
            tp: tp.clone(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
        };
        if m.headers()
            .is_some_and(|h| h.iter().any(|h| h.key == EVENT_TYPE_HEADER))
        {
            return self.event(&origin, payload).await;
        }
        let rec: RecordView<'_, Fields<'_>> = match RecordView::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                return self
                    .dead_letter(&origin, payload, &format!("not a change record: {e}"))
                    .await
            }
        };
        let stream_end = matches!(rec.action, Action::Commit | Action::StreamAbort);
        if rec.streamed != Some(true) && !stream_end {
            let written = match tables_of(&rec) {
                Ok(names) => {
                    self.prepare(&names).await?;
                    self.round
                        .write(&origin.tp, &rec, payload, &names, m.offset(), None)
                }
                Err(reason) => Err(reason),
            };
            return match written {
                Ok(()) => Ok(()),
                Err(reason) => self.dead_letter(&origin, payload, &reason).await,
            };
        }
        // A streamed transaction's record, or its end copy (on a table topic every C or A is
        // one: other transactions end on the transactions topic).
        let key = match (rec.source.as_deref(), rec.attempt) {
            (Some(source), Some(attempt)) => StreamKey {
                source: source.to_string(),
                xid: rec.xid,
                attempt,
            },
            _ => {
                return self
                    .dead_letter(&origin, payload, "a streamed record without source or attempt: only saiki-relay source with stream_large produces the streamed records the lake takes")
                    .await
            }
        };
        match rec.action {
            Action::StreamAbort if rec.subxid.is_some() => {
                self.held
                    .abort_subxact(&tp, &key, rec.subxid.unwrap_or_default());
            }
            Action::StreamAbort => {
                let dropped = self.held.end(&tp, &key).len();
                debug!(xid = rec.xid, dropped, "streamed transaction aborted");
            }
            Action::Commit => {
                let Some(lsn) = rec.commit_lsn else {
                    return self
                        .dead_letter(&origin, payload, "malformed streamed commit: no commit_lsn")
                        .await;
                };
                let commit = (
                    lsn.0 as i64,
                    rec.commit_ts.as_deref().and_then(columns::commit_micros),
                );
                let records = self.held.end(&tp, &key);
                debug!(
                    xid = rec.xid,
                    rows = records.len(),
                    "streamed transaction committed"
                );
                for r in records {
                    let held_origin = Origin {
                        tp: tp.clone(),
                        offset: r.offset,
                        key: None,
                    };
                    let reason = match RecordView::<Fields<'_>>::parse(&r.payload) {
                        Ok(hr) => match tables_of(&hr) {
                            Ok(names) => {
                                self.prepare(&names).await?;
                                self.round
                                    .write(
                                        &held_origin.tp,
                                        &hr,
                                        &r.payload,
                                        &names,
                                        m.offset(),
                                        Some(commit),
                                    )
                                    .err()
                            }
                            Err(reason) => Some(reason),
                        },
                        Err(e) => Some(format!("not a change record: {e}")),
                    };
                    if let Some(reason) = reason {
                        self.dead_letter(&held_origin, &r.payload, &reason).await?;
                    }
                }
            }
            Action::Insert
            | Action::Update
            | Action::Delete
            | Action::Truncate
            | Action::SchemaChange => {
                self.held.hold(
                    &tp,
                    key,
                    rec.subxid.unwrap_or_default(),
                    m.offset(),
                    payload,
                );
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads the marks and columns of these change-log tables (`Round::prepare`).
    async fn prepare(&mut self, names: &[String]) -> Result<(), RelayError> {
        self.round
            .prepare(&self.catalog, &self.rt.lake.namespace, names)
            .await
    }

    /// An event of the event API into the round: one row of `{namespace}.ev_{type}` per
    /// event (the lake keeps every event, keyed types too: it is the history), with the
    /// properties its schema version declares and the metadata columns, typed as the ODS
    /// types them (`event_table`). `_saiki_source` is the Kafka topic and partition,
    /// `_saiki_commit_lsn` the offset, `_saiki_commit_ts` the time the API received it.
    async fn event(&mut self, origin: &Origin, payload: &[u8]) -> Result<(), RelayError> {
        let Some(events) = self.events.as_mut() else {
            self.metrics.skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let (event_type, version, body, md) = match event_table::event_parts(payload) {
            Ok(Some(parts)) => parts,
            Ok(None) => {
                return self
                    .dead_letter(
                        origin,
                        payload,
                        "not an event of the event API (no metadata.event_type)",
                    )
                    .await
            }
            Err(reason) => return self.dead_letter(origin, payload, &reason).await,
        };
        // The registry away is transient: the session starts again.
        events.learn(&event_type, version).await?;
        let layout = match events.tables().get(&(event_type.to_string(), version)) {
            Some(Ok(l)) => l.clone(),
            Some(Err(reason)) => return self.dead_letter(origin, payload, reason).await,
            None => {
                return Err(RelayError::Internal(format!(
                    "event type {event_type} v{version} was not learned"
                )))
            }
        };
        self.prepare(std::slice::from_ref(&layout.table)).await?;
        match self.write_event(origin, &layout, version, &body, &md) {
            Ok(()) => Ok(()),
            Err(reason) => self.dead_letter(origin, payload, &reason).await,
        }
    }

    /// An event's row into its table's round; `Err`: why it cannot be written.
    fn write_event(
        &mut self,
        origin: &Origin,
        layout: &EventTable,
        version: i32,
        body: &Fields<'_>,
        md: &Fields<'_>,
    ) -> Result<(), String> {
        let name = &layout.table;
        let Some(t) = self.round.tables.get_mut(name) else {
            return Err(format!("internal: {name} was not loaded (`prepare`)"));
        };
        if !self.round.ledger.admit(name, &origin.tp, origin.offset) {
            return Ok(());
        }
        let received = md
            .get("received_at")
            .and_then(|t| serde_json::from_str::<std::borrow::Cow<'_, str>>(t.get()).ok())
            .and_then(|t| saiki_core::time::parse_rfc3339_utc_micros(&t));
        let mut row = Row {
            action: 'E',
            source: format!("{}/{}", origin.tp.0, origin.tp.1),
            commit_lsn: origin.offset,
            seq: 0,
            commit_ts: received,
            unchanged: None,
            cells: Vec::new(),
        };
        let version = version.to_string();
        let properties = layout
            .properties
            .iter()
            .map(|(c, pg)| (c.as_str(), body.get(c), *pg));
        let metadata = METADATA_COLUMNS.iter().map(|(c, field, pg)| {
            let raw = if *field == "version" {
                None
            } else {
                md.get(field)
            };
            (*c, raw, *pg)
        });
        for (col, raw, pg) in properties.chain(metadata) {
            let raw = match raw {
                Some(r) => r.get(),
                None if col == "schema_version" => version.as_str(),
                None => "null",
            };
            // An event table follows no `L` record: no rename to read through.
            let no_renames = ("", (Lsn(0), 0));
            let (idx, ty, _) = t.column(col, no_renames, || Some(columns::event_pg_type(pg)));
            let cell = if pg == "jsonb" {
                // JSON stays JSON: a string keeps its quotes ("5" is not 5).
                columns::json_cell(raw)
            } else {
                columns::cell(raw, ty).map_err(|e| format!("{name}.{col}: {e}"))?
            };
            row.cells.push((idx, cell));
        }
        self.round.bytes += row.size();
        self.round.rows += 1;
        t.rows.push(row);
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        origin: &Origin,
        payload: &[u8],
        reason: &str,
    ) -> Result<(), RelayError> {
        let topic = self.rt.dead_letter_topic.clone();
        let at = format!("{}/{}/{}", origin.tp.0, origin.tp.1, origin.offset);
        warn!(origin = %at, %reason, "dead letter");
        self.dead_letters.ensure_topic(&topic).await?;
        let headers = crate::kafka::headers([
            ("saiki.error", Some(reason.as_bytes())),
            ("saiki.origin", Some(at.as_bytes())),
        ]);
        let f = self
            .dead_letters
            .send_owned(&topic, None, origin.key.as_deref(), Some(payload), headers)
            .await?;
        match f.await {
            Ok(Ok(_)) => {}
            _ => return Err(RelayError::Kafka(format!("dead letter to {topic} failed"))),
        }
        self.metrics.dead_letters.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Commits every table with rows in the round, then the group's offsets.
    async fn end_round(&mut self) -> Result<(), RelayError> {
        let metrics = self.metrics;
        let tables = self
            .round
            .commit(
                &self.catalog,
                self.rt.lake.target_file_size,
                self.rt.lake.snapshot_retention,
                |c| {
                    metrics.rows.fetch_add(c.rows as u64, Ordering::Relaxed);
                    metrics.commits.fetch_add(1, Ordering::Relaxed);
                    metrics.files.fetch_add(c.files as u64, Ordering::Relaxed);
                },
            )
            .await?;
        let held = &self.held;
        let offsets = self.round.ledger.group_offsets(|tp| held.first_offset(tp));
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, p), o) in &offsets {
                tpl.add_partition_offset(topic, *p, Offset::Offset(*o))
                    .map_err(|e| RelayError::Kafka(format!("offsets: {e}")))?;
            }
            // Asynchronous: the group's offsets only say where reading starts, and an older
            // one is always safe (the marks skip what the tables hold). A synchronous commit
            // would block the loop, and a shutdown, while the broker is away.
            self.consumer
                .commit(&tpl, CommitMode::Async)
                .map_err(|e| RelayError::Kafka(format!("committing the group's offsets: {e}")))?;
        }
        if self.round.rows > 0 {
            info!(rows = self.round.rows, tables, "round committed");
            self.metrics.last_commit.store(
                saiki_core::time::unix_micros_now() as u64,
                Ordering::Relaxed,
            );
        }
        self.round.rows = 0;
        self.round.bytes = 0;
        self.round_started = None;
        Ok(())
    }
}

/// Drops what it holds on a thread of its own. A consumer's close waits for its outstanding
/// offset commits, and while the broker is away that is forever: a session that ends (a
/// shutdown, or an error to retry) must not wait for it. The thread ends when the close does,
/// or with the process.
struct ClosedApart<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> std::ops::Deref for ClosedApart<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_ref().expect("held until dropped")
    }
}

impl<T: Send + 'static> Drop for ClosedApart<T> {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("lake-consumer-close".into())
                .spawn(move || drop(t));
        }
    }
}

/// Where a record came from (for the marks and a dead letter).
struct Origin {
    tp: Tp,
    offset: i64,
    key: Option<Vec<u8>>,
}

/// The change-log tables a record writes rows (or, `L`, a schema change) to; none for
/// transaction bounds and messages. A `W` (a resync's end) is a row of its table too.
fn tables_of(rec: &RecordView<'_, Fields<'_>>) -> Result<Vec<String>, String> {
    Ok(match rec.action {
        Action::Insert
        | Action::Update
        | Action::Delete
        | Action::Read
        | Action::SchemaChange
        | Action::Sweep => match (&rec.schema, &rec.table) {
            (Some(s), Some(t)) => vec![changes_table(s, t)],
            _ => return Err("a row change without schema or table".into()),
        },
        Action::Truncate => rec
            .truncate
            .as_ref()
            .map(|t| t.tables.iter().map(|(s, t)| changes_table(s, t)).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    })
}
