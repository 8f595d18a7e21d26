//! `saiki-relay sink`: a Kafka consumer group applying change records to the ODS, exactly
//! once (docs/sink.md, "Exactly once").
//!
//! Invariants:
//! - **Offsets live in the ODS.** A batch's rows and its partitions' next offsets commit in
//!   one ODS transaction ([`crate::sink::ods`]); Kafka's committed offsets are never used. After a
//!   crash or a rebalance, each partition resumes at the offset the ODS holds.
//! - **No offset applied twice, none skipped.** The decisions (take, skip, seek; a batch's
//!   offsets; what a commit moves on; where a fenced batch or a rebalanced partition starts
//!   again) are the pure [`offsets::Ledger`]'s, property-tested there; this loop does the I/O
//!   they call for.
//! - **One batch in flight** ([`crate::sink::batch`]): batch N+1 is read and planned while batch N
//!   is applied, and sent only after N is in.
//! - **Nothing is dropped silently.** A message that cannot be applied goes to the
//!   dead-letter topic with the reason, acknowledged by Kafka before the batch commits.
//! - **Bounded memory.** A batch holds at most `batch_max_rows` messages and
//!   `batch_max_bytes` of payload, and at most two are in hand (one in flight, one being
//!   read); librdkafka's prefetch queue is bounded by its settings.

pub(crate) mod batch;
pub(crate) mod group;
pub(crate) mod ods;
pub(crate) mod offsets;
pub(crate) mod plan;
pub(crate) mod staging;
pub(crate) mod statements;
pub(crate) mod stream;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, info_span, warn};

use crate::config::{KafkaConfig, SinkConfig};
use crate::error::RelayError;
use crate::event_registry::EventCatalog;
use crate::evolve::SchemaLog;
use crate::kafka::{Kafka, TopicFilter};
use crate::metrics::SinkMetrics;
use crate::retry::{supervise, Supervised};
use crate::sink::batch::{Applied, Applier, Done};
use crate::sink::group::GroupWatch;
use crate::sink::ods::{ApplyError, Ods};
use crate::sink::offsets::{Accept, Ledger, Tp};

/// How every change record starts (the plugin writes `action` first).
const RECORD_PREFIX: &[u8] = b"{\"action\":";
/// How every `L` record starts.
pub(crate) const SCHEMA_CHANGE_PREFIX: &[u8] = b"{\"action\":\"L\"";
/// The header the event API puts on every event (`ingest/mod.rs`).
const EVENT_TYPE_HEADER: &str = "saiki.event_type";
/// Dead letters handed to the producer at once (they are awaited before the commit).
const DEAD_LETTER_QUEUE_CAPACITY: usize = 10_000;
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
const TOMBSTONE_GC_INTERVAL: Duration = Duration::from_secs(600);
/// How often topics are listed while none matches yet.
const NO_TOPICS_REFRESH: Duration = Duration::from_millis(500);
/// How often partitions waiting for a streamed transaction's commit look whether it has been
/// applied (by this instance or another).
const HOLD_POLL: Duration = Duration::from_millis(200);

/// The sink's settings, checked.
pub(crate) struct SinkRuntime {
    pub(crate) sink: SinkConfig,
    pub(crate) kafka: KafkaConfig,
    /// The event API's registry (`ingest.dsn`, default `sink.dsn`); `None`: events are not
    /// materialized (`sink.events = false`).
    pub(crate) registry_dsn: Option<String>,
    pub(crate) topics: TopicFilter,
    pub(crate) dead_letter_topic: String,
}

impl SinkRuntime {
    pub(crate) fn new(
        sink: SinkConfig,
        kafka: KafkaConfig,
        registry_dsn: Option<&str>,
    ) -> Result<Self, RelayError> {
        if sink.schema.trim().is_empty() || sink.group.trim().is_empty() {
            return Err(RelayError::Config(
                "sink.schema and sink.group must not be empty".into(),
            ));
        }
        if sink.batch_max_rows == 0 || sink.batch_max_bytes == 0 {
            return Err(RelayError::Config(
                "sink.batch_max_rows and sink.batch_max_bytes must be at least 1".into(),
            ));
        }
        if let Some(s) = kafka.properties.get("partition.assignment.strategy") {
            if s.contains("cooperative") {
                return Err(RelayError::Config(format!(
                    "kafka.properties partition.assignment.strategy = {s:?}: the sink assigns its partitions at the offsets the ODS holds, which needs an eager strategy (range, roundrobin)"
                )));
            }
        }
        let dead_letter_topic = sink
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dead-letter", kafka.topic_prefix));
        let topics = TopicFilter::new(
            "sink.topics",
            sink.topics.as_deref(),
            &kafka,
            &dead_letter_topic,
        )?;
        let registry_dsn = sink
            .events
            .then(|| registry_dsn.unwrap_or(&sink.dsn).to_string());
        Ok(SinkRuntime {
            sink,
            kafka,
            registry_dsn,
            topics,
            dead_letter_topic,
        })
    }

    /// Whether the sink reads this topic.
    pub(crate) fn wants(&self, topic: &str) -> bool {
        self.topics.wants(topic)
    }
}

/// Runs the sink until `shutdown` turns true (then commits the batch in hand and returns
/// Ok) or a definite error. Transient errors restart the session with backoff.
pub(crate) async fn run(
    rt: Arc<SinkRuntime>,
    metrics: Arc<SinkMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let supervised = Supervised {
        ready: &metrics.ready,
        restarts: &metrics.retries,
        backoff_max: rt.sink.reconnect_backoff_max,
    };
    let span = || info_span!("sink", group = %rt.sink.group);
    supervise(supervised, &mut shutdown, span, async |shutdown| {
        session(&rt, &metrics, shutdown).await
    })
    .await
}

/// Rebalance and statistics callbacks: assign at the ODS's offsets (as last known), tell the
/// loop which partitions changed hands, and keep the consumer-lag metric.
struct SinkContext {
    positions: Mutex<HashMap<Tp, i64>>,
    /// Partitions assigned or revoked since the loop last looked: it forgets what it knew
    /// of them and reads their ODS offsets again.
    changed: Mutex<Vec<Tp>>,
    /// The group's join state, from the statistics (`sink/group.rs`).
    group: Mutex<GroupWatch>,
    metrics: Arc<SinkMetrics>,
}

impl ClientContext for SinkContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::client_error(&error, reason);
    }

    /// librdkafka's statistics (every `topic_refresh`) carry each assigned partition's high
    /// watermark, so the lag costs no broker round trip of the loop's own.
    fn stats(&self, stats: rdkafka::Statistics) {
        if let Some(cg) = &stats.cgrp {
            self.group
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(&cg.join_state, Instant::now());
        }
        let pos = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        let mut lag = 0i64;
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.hi_offset < 0 || part.fetch_state == "none" {
                    continue;
                }
                let at = pos
                    .get(&(topic.clone(), *p))
                    .copied()
                    .unwrap_or(part.lo_offset.max(0));
                lag += (part.hi_offset - at).max(0);
            }
        }
        self.metrics.lag.store(lag as u64, Ordering::Relaxed);
    }
}

impl ConsumerContext for SinkContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let list = |tpl: &TopicPartitionList| -> Vec<Tp> {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = list(tpl);
                let mut at = TopicPartitionList::new();
                {
                    let pos = self.positions.lock().unwrap_or_else(|p| p.into_inner());
                    for tp in &parts {
                        let off = pos
                            .get(tp)
                            .map_or(Offset::Beginning, |o| Offset::Offset(*o));
                        let _ = at.add_partition_offset(&tp.0, tp.1, off);
                    }
                }
                if let Err(e) = consumer.assign(&at) {
                    warn!(error = %e, "assigning at the ODS offsets failed; the first message of each partition seeks there");
                }
                info!(partitions = parts.len(), "partitions assigned");
                self.push(parts);
            }
            Rebalance::Revoke(tpl) => {
                let parts = list(tpl);
                info!(partitions = parts.len(), "partitions revoked");
                self.push(parts);
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

impl SinkContext {
    fn push(&self, parts: Vec<Tp>) {
        self.changed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(parts);
    }
    fn take(&self) -> Vec<Tp> {
        std::mem::take(&mut *self.changed.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

struct Session<'a> {
    rt: &'a SinkRuntime,
    metrics: &'a SinkMetrics,
    /// The ODS connection, here whenever no batch is in flight.
    applier: Option<Applier>,
    /// The batch being applied on its own task.
    inflight: Option<tokio::task::JoinHandle<Done>>,
    consumer: StreamConsumer<SinkContext>,
    ledger: Ledger,
    /// The batch in hand: its messages (the ledger has their offsets).
    batch: Vec<OwnedMessage>,
    batch_bytes: usize,
    batch_started: Option<tokio::time::Instant>,
    subscribed: Vec<String>,
    /// The event tables, when events are materialized.
    events: Option<EventCatalog>,
    /// Topics stopped at a schema change their ODS table cannot follow (`saiki_sink.stopped`):
    /// not subscribed until a DBA resumes them.
    stopped: Vec<String>,
    /// The schema changes followed so far (from the ODS at the start and after a rewind;
    /// taken in as soon as a batch with one is planned, which the next batch reads through).
    schema: Arc<SchemaLog>,
    /// Partitions of the batch in hand that delivered a streamed transaction's end copy.
    ends: Vec<Tp>,
    /// Partitions paused after a streamed transaction's commit copy until the transaction
    /// is applied (`sink/stream.rs`): their messages are not taken meanwhile.
    held: Vec<Tp>,
    /// A batch since the last topic refresh staged or ended a streamed transaction: the
    /// staging gauges are read again.
    streams_seen: bool,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // A session that ends (an error, or a shutdown past its grace period) stops the batch
        // in flight: the aborted task drops its connection, and the ODS rolls back an open
        // transaction. A COMMIT already sent may still land; the offsets it writes then fence
        // the next session's first batch of those partitions, which rewinds.
        if let Some(h) = &self.inflight {
            h.abort();
        }
    }
}

async fn session(
    rt: &SinkRuntime,
    metrics: &Arc<SinkMetrics>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let ods = Ods::connect(
        &rt.sink.dsn,
        &rt.sink.schema,
        &rt.sink.group,
        rt.sink.key_includes_source,
    )
    .await?;
    let positions = ods.offsets().await?;
    info!(ods = %ods.target(), partitions_known = positions.len(), "connected to the ODS");
    let ctx = SinkContext {
        positions: Mutex::new(positions),
        changed: Mutex::new(Vec::new()),
        group: Mutex::default(),
        metrics: metrics.clone(),
    };
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &rt.kafka.brokers)
        .set("client.id", "saiki-relay-sink")
        .set(
            "statistics.interval.ms",
            rt.sink.topic_refresh.as_millis().max(100).to_string(),
        );
    match &rt.sink.instance_id {
        // Static membership: a restarted instance takes its partitions back at once, as long
        // as it is back within its session (librdkafka's 45 s; KIP-345 wants it to cover a
        // restart, or the restart costs a rebalance after all).
        Some(id) => cc.set("group.instance.id", id),
        // A dynamic sink that died (kill -9) holds its partitions until the session times
        // out: 10 s instead of librdkafka's 45 s, so that the others take over quickly.
        None => cc.set("session.timeout.ms", "10000"),
    };
    for (k, v) in &rt.kafka.properties {
        cc.set(k, v);
    }
    // Offsets are the ODS's: Kafka's committed offsets are neither written nor read.
    cc.set("group.id", &rt.sink.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer<SinkContext> = cc
        .create_with_context(ctx)
        .map_err(|e| RelayError::KafkaConfig(format!("{e}: check [kafka.properties]")))?;
    let dead_letters = Kafka::new(&rt.kafka, DEAD_LETTER_QUEUE_CAPACITY)?;
    let mut s = Session {
        rt,
        metrics,
        applier: Some(Applier {
            ods,
            dead_letters: Some(dead_letters),
            dead_letter_topic: rt.dead_letter_topic.clone(),
        }),
        inflight: None,
        consumer,
        ledger: Ledger::new(),
        batch: Vec::new(),
        batch_bytes: 0,
        batch_started: None,
        subscribed: Vec::new(),
        events: rt
            .registry_dsn
            .clone()
            .map(|d| EventCatalog::new(d, "saiki-relay sink", "sink.events")),
        schema: Arc::default(),
        stopped: Vec::new(),
        ends: Vec::new(),
        held: Vec::new(),
        streams_seen: false,
    };
    s.load_stopped().await?;
    s.schema = Arc::new(s.ods().await?.schema_log(rt.sink.on_drop).await?);
    s.refresh_topics()?;
    metrics.ready.store(true, Ordering::Relaxed);
    // The next topic refresh, counted from the end of the last one: listing topics blocks
    // this loop (up to a fetch long-poll on a broker that answers in order), and the
    // consumer's queue must be drained in between. librdkafka puts a statistics event on
    // that queue every topic_refresh, and each poll of `recv` takes only one event off it: a
    // loop that refreshed back to back would fall behind the statistics and never reach the
    // messages queued after them (it did, against tansu, with topic_refresh = 200ms).
    let mut next_refresh = tokio::time::Instant::now() + s.refresh_interval();
    let mut last_gc: Option<Instant> = None;
    // A deadline, not a sleep per turn of the loop: messages of other partitions arriving
    // all the time would restart a sleep before it ends.
    let mut next_hold_poll = tokio::time::Instant::now();
    loop {
        if s.ledger.rewinding() {
            s.rewind().await?;
        }
        let linger_at = s.batch_started.map(|t| t + rt.sink.batch_linger);
        let busy = s.inflight.is_some();
        let handle = s.inflight.as_mut();
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    info!(messages = s.batch.len(), in_flight = s.inflight.is_some(), "shutdown: committing the batches in hand");
                    let grace = rt.sink.shutdown_grace;
                    let drain = async {
                        s.apply_batch().await?;
                        s.settle().await
                    };
                    match tokio::time::timeout(grace, drain).await {
                        Ok(r) => r?,
                        Err(_) => warn!(?grace, "the last batches did not commit within the grace period: stopped; what did not commit is applied on the next start"),
                    }
                    return Ok(());
                }
            }
            _ = async { tokio::time::sleep_until(linger_at.unwrap_or_else(tokio::time::Instant::now)).await }, if linger_at.is_some() => {
                s.apply_batch().await?;
            }
            // A batch in flight is collected as soon as it is done, so that its rows are
            // counted and a fenced one rewinds without waiting for the next batch.
            done = async move {
                match handle {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            }, if busy => {
                s.inflight = None;
                s.finish(done)?;
            }
            _ = tokio::time::sleep_until(next_hold_poll), if !s.held.is_empty() => {
                s.release_holds().await?;
                next_hold_poll = tokio::time::Instant::now() + HOLD_POLL;
            }
            m = s.consumer.recv() => {
                match m {
                    Ok(m) => {
                        let m = m.detach();
                        s.handle_events();
                        s.accept(m).await?;
                        // A batch ends after a schema change, so that what follows it is
                        // planned knowing it (evolve.rs).
                        let last = s.batch.last().and_then(|m| m.payload());
                        let schema_change = last.is_some_and(|p| p.starts_with(SCHEMA_CHANGE_PREFIX));
                        // A batch ends after a streamed transaction's end copy too, and is
                        // applied before anything else is read: its partition may have to
                        // wait for the transaction (sink/stream.rs).
                        let stream_end = last.is_some_and(stream::is_stream_end);
                        if schema_change || stream_end || s.batch.len() >= rt.sink.batch_max_rows || s.batch_bytes >= rt.sink.batch_max_bytes {
                            s.apply_batch().await?;
                        }
                        if stream_end {
                            s.settle().await?;
                            s.hold_after_ends().await?;
                        }
                    }
                    Err(e) => warn!(error = %e, "consume"),
                }
            }
            _ = tokio::time::sleep_until(next_refresh) => {
                s.handle_events();
                // The staging gauges, read while there may be something to show: the ODS
                // query waits for the batch in flight, which a sink without streamed
                // transactions need not do every refresh.
                if s.streams_seen || metrics.streams_open.load(Ordering::Relaxed) > 0 {
                    s.streams_seen = false;
                    let (open, rows) = {
                        let ods = s.ods().await?;
                        staging::gauges(ods.client()).await.map_err(|e| ods.err(&e))?
                    };
                    metrics.streams_open.store(open, Ordering::Relaxed);
                    metrics.staged_rows.store(rows, Ordering::Relaxed);
                }
                if !s.stopped.is_empty() {
                    // A DBA resumes a topic by deleting its row.
                    s.load_stopped().await?;
                }
                s.refresh_topics()?;
                s.watch_group()?;
                if last_gc.is_none_or(|t| t.elapsed() > TOMBSTONE_GC_INTERVAL) && s.batch.is_empty() && s.inflight.is_none() {
                    last_gc = Some(Instant::now());
                    let n = s.ods().await?.gc_tombstones(rt.sink.tombstone_retention).await?;
                    debug!(tombstones = n, "old tombstones removed");
                }
                next_refresh = tokio::time::Instant::now() + s.refresh_interval();
            }
        }
    }
}

impl Session<'_> {
    /// Time until the next topic listing: `topic_refresh`, or at most half a second while no
    /// topic matches yet (a sink started before its sources picks their topics up at once).
    fn refresh_interval(&self) -> Duration {
        if self.subscribed.is_empty() {
            self.rt.sink.topic_refresh.min(NO_TOPICS_REFRESH)
        } else {
            self.rt.sink.topic_refresh
        }
    }

    /// The ODS connection, once the batch in flight (if any) is collected.
    async fn ods(&mut self) -> Result<&mut Ods, RelayError> {
        self.settle().await?;
        match self.applier.as_mut() {
            Some(a) => Ok(&mut a.ods),
            None => Err(RelayError::Internal(
                "the ODS connection was lost with a failed apply task".into(),
            )),
        }
    }

    /// Waits for the batch in flight (if any) and takes in its outcome. Cancelled (the
    /// shutdown's grace period), it leaves the batch in flight, for `Drop` to abort.
    async fn settle(&mut self) -> Result<(), RelayError> {
        let Some(handle) = self.inflight.as_mut() else {
            return Ok(());
        };
        let done = handle.await;
        self.inflight = None;
        self.finish(done)
    }

    /// Takes in a batch back from its apply task: on commit, the partitions' stored offsets
    /// move on (also in the batch in hand, which continues from it); fenced, its partitions
    /// rewind; any other failure ends the session.
    fn finish(&mut self, done: Result<Done, tokio::task::JoinError>) -> Result<(), RelayError> {
        let done = done.map_err(|e| RelayError::Internal(format!("the apply task failed: {e}")))?;
        self.applier = Some(done.applier);
        let messages = done.batch.len();
        match done.result {
            Ok(Applied {
                written,
                dead,
                staged,
                stream_commits,
                stream_aborts,
                schema,
            }) => {
                if let Some(log) = schema {
                    // A streamed transaction held schema changes: what comes next is planned
                    // through them (its batch was the last cut before this).
                    self.schema = log;
                }
                self.ledger.committed(&done.offsets);
                let pos = &self.consumer.context().positions;
                let mut pos = pos.lock().unwrap_or_else(|p| p.into_inner());
                for o in &done.offsets {
                    pos.insert((o.topic.clone(), o.partition), o.next);
                }
                drop(pos);
                let m = self.metrics;
                m.rows_applied.fetch_add(written, Ordering::Relaxed);
                m.batches.fetch_add(1, Ordering::Relaxed);
                m.consumed.fetch_add(messages as u64, Ordering::Relaxed);
                m.dead_letters.fetch_add(dead as u64, Ordering::Relaxed);
                m.stream_commits
                    .fetch_add(stream_commits, Ordering::Relaxed);
                m.stream_aborts.fetch_add(stream_aborts, Ordering::Relaxed);
                self.streams_seen |= staged + stream_commits + stream_aborts > 0;
                m.apply.observe(done.elapsed.as_secs_f64());
                let now = saiki_core::time::unix_micros_now();
                for ts in done.batch.commit_times() {
                    m.freshness.observe((now - ts) as f64 / 1e6);
                }
                debug!(
                    messages,
                    rows = written,
                    dead_letters = dead,
                    staged,
                    ms = done.elapsed.as_millis() as u64,
                    "batch committed"
                );
                Ok(())
            }
            Err(ApplyError::Fenced) => {
                self.metrics.fenced.fetch_add(1, Ordering::Relaxed);
                warn!(messages, "another sink instance applied these partitions meanwhile (rebalance): batch dropped, partitions rewound to the ODS offsets");
                self.ledger.fenced();
                Ok(())
            }
            // The apply task isolates data errors; one escaping is a bug: stop, lose nothing.
            Err(ApplyError::Data(reason) | ApplyError::CannotCreate(reason)) => {
                Err(RelayError::Internal(format!(
                    "a data error escaped the apply task's isolation: {reason}"
                )))
            }
            Err(ApplyError::Stopped(stop)) => {
                error!(table = %stop.table, topic = %stop.topic, source = %stop.source, statement = %stop.statement, "{}", stop.error);
                Err(RelayError::TableStopped {
                    table: stop.table,
                    message: format!(
                        "topic {} stopped; the sink starts again without it",
                        stop.topic
                    ),
                })
            }
            Err(ApplyError::KeyTaken(table)) => Err(RelayError::Internal(format!(
                "a plain insert into {table} met an existing key outside of a batch retry"
            ))),
            Err(ApplyError::Fatal(e)) => Err(e),
        }
    }

    /// Cuts the batch in hand and plans it (while the batch before is still being applied),
    /// then sends it to be applied once that one is in.
    async fn apply_batch(&mut self) -> Result<(), RelayError> {
        self.batch_started = None;
        if self.batch.is_empty() {
            return Ok(());
        }
        let msgs = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let mut planned = batch::plan_with_events(
            msgs,
            self.rt.sink.key_includes_source,
            self.events.as_ref().map(EventCatalog::tables),
            Some(self.schema.clone()),
        );
        self.settle().await?;
        if self.ledger.rewinding() {
            // The batch before was fenced: this one continues from it, so it is void too.
            drop(planned);
            return self.rewind().await;
        }
        let changed: Vec<String> = planned
            .borrow_dependent()
            .planner
            .schema_changes
            .iter()
            .map(|sc| sc.table.clone())
            .collect();
        if !changed.is_empty() {
            // The log decides what the ODS does for the batch's L record, a drop or a key
            // change waiting for every source that writes the table: those of the batches
            // before (all committed now, in saiki_sink.watermarks) and of this one.
            let known = self.ods().await?.sources_of(&changed).await?;
            let log = Arc::make_mut(&mut self.schema);
            for (table, source) in &known {
                log.saw(table, source);
            }
            planned.with_dependent_mut(|_, p| {
                for sc in &mut p.planner.schema_changes {
                    if let Some(plan) = p.planner.tables.get(&sc.table) {
                        for source in plan.sources() {
                            log.saw(&sc.table, source);
                        }
                    }
                    sc.steps = log
                        .record(&sc.table, &sc.source, sc.at, &sc.changes)
                        .unwrap_or_default();
                }
            });
        }
        let offsets = self.ledger.cut();
        let Some(applier) = self.applier.take() else {
            return Err(RelayError::Internal(
                "the ODS connection was lost with a failed apply task".into(),
            ));
        };
        self.inflight = Some(applier.spawn(planned, offsets));
        Ok(())
    }

    /// After a batch was dropped: every partition in it, and in the batch in hand (which
    /// continued from it and is dropped too), continues from the ODS's offset.
    async fn rewind(&mut self) -> Result<(), RelayError> {
        let all = self.ods().await?.offsets().await?;
        // Schema changes of the dropped batches were taken in when they were planned.
        let on_drop = self.rt.sink.on_drop;
        self.schema = Arc::new(self.ods().await?.schema_log(on_drop).await?);
        self.batch.clear();
        self.batch_bytes = 0;
        self.batch_started = None;
        self.ends.clear();
        for (tp, next) in self.ledger.rewind(&all) {
            if let Err(e) = self.seek(&tp, next) {
                // Typically revoked meanwhile (the rebalance that fenced the batch). If it is
                // still ours, its next message finds it unknown and seeks again.
                debug!(error = %e, topic = %tp.0, partition = tp.1, "rewind");
                self.ledger.forget(&tp);
            }
        }
        Ok(())
    }

    /// Reads the stopped topics of this group.
    async fn load_stopped(&mut self) -> Result<(), RelayError> {
        let stopped = self.ods().await?.stopped().await?;
        for (topic, table) in &stopped {
            if !self.stopped.contains(topic) {
                warn!(%topic, %table, "stopped at a schema change of its ODS table (saiki_sink.stopped): not applied until resumed");
            }
        }
        let topics: Vec<String> = stopped.into_iter().map(|(t, _)| t).collect();
        for t in &self.stopped {
            if !topics.contains(t) {
                info!(topic = %t, "resumed");
            }
        }
        self.metrics
            .stopped
            .store(topics.len() as u64, Ordering::Relaxed);
        self.stopped = topics;
        Ok(())
    }

    /// Subscribes to the matching topics (they appear as the sources create them).
    fn refresh_topics(&mut self) -> Result<(), RelayError> {
        let (rt, stopped) = (self.rt, &self.stopped);
        let wants = |t: &str| rt.wants(t) && !stopped.iter().any(|s| s == t);
        if crate::kafka::subscribe_matching(&self.consumer, wants, &mut self.subscribed)? {
            self.consumer
                .context()
                .group
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .subscribed();
        }
        Ok(())
    }

    /// Ends the session (a transient error: the supervisor starts a new one, with a new
    /// consumer) when the group's rebalance has not completed within `rejoin_timeout`.
    fn watch_group(&self) -> Result<(), RelayError> {
        if self.subscribed.is_empty() {
            return Ok(());
        }
        let group = self
            .consumer
            .context()
            .group
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match group.stalled(Instant::now(), self.rt.sink.rejoin_timeout) {
            None => Ok(()),
            Some((for_, state)) => Err(RelayError::Kafka(format!(
                "the consumer group {} has not settled for {for_:.0?} (librdkafka join state \"{state}\"): rejoining with a new consumer; if this repeats, look at the group's other members (kafka-consumer-groups --describe) and the broker's coordinator log",
                self.rt.sink.group
            ))),
        }
    }
}

impl Session<'_> {
    fn handle_events(&mut self) {
        let changed = self.consumer.context().take();
        if changed.is_empty() {
            return;
        }
        // The ODS is read again on each partition's first message (and whether it waits
        // for a streamed transaction).
        for tp in &changed {
            self.ledger.forget(tp);
        }
        let mut resume = TopicPartitionList::new();
        for tp in self.held.iter().filter(|tp| changed.contains(tp)) {
            resume.add_partition(&tp.0, tp.1);
        }
        if resume.count() > 0 {
            // Still ours, it is held again at its first message if it must wait.
            if let Err(e) = self.consumer.resume(&resume) {
                debug!(error = %e, "resuming partitions that changed hands");
            }
            self.held.retain(|tp| !changed.contains(tp));
        }
        let n = self
            .consumer
            .assignment()
            .map(|a| a.count())
            .unwrap_or_default();
        self.metrics.assigned.store(n as u64, Ordering::Relaxed);
    }

    /// Takes a message into the batch in hand, or skips it, or seeks, as the ledger says.
    async fn accept(&mut self, m: OwnedMessage) -> Result<(), RelayError> {
        let tp: Tp = (m.topic().to_string(), m.partition());
        let offset = m.offset();
        if self.held.contains(&tp) {
            // Fetched before the pause: read again once the partition resumes.
            return Ok(());
        }
        let mut verdict = self.ledger.accept(&tp, offset);
        if verdict == Accept::Unknown {
            let ods = self.ods().await?;
            let stored = ods.offset(&tp.0, tp.1).await?;
            let waits = !staging::holding(ods.client(), std::slice::from_ref(&tp))
                .await
                .map_err(|e| ods.err(&e))?
                .is_empty();
            self.ledger.learn(tp.clone(), stored);
            if let (true, Some(at)) = (waits, stored) {
                // Newly assigned while it waits for a streamed transaction's commit.
                self.hold(tp, at)?;
                return Ok(());
            }
            verdict = self.ledger.accept(&tp, offset);
        }
        match verdict {
            Accept::Take { gap } => {
                if gap {
                    debug!(topic = %tp.0, partition = tp.1, offset, "offset gap (compaction, retention or transaction markers)");
                }
                // An event of the event API: its table's layout is read before the batch
                // that holds it is planned. A change record (it starts with its action) is
                // not one, and costs no look at the headers.
                let record = m.payload().is_some_and(|p| p.starts_with(RECORD_PREFIX));
                if let Some(catalog) = self.events.as_mut().filter(|_| !record) {
                    let is_event = m
                        .headers()
                        .is_some_and(|h| h.iter().any(|h| h.key == EVENT_TYPE_HEADER));
                    if let Some((ty, version)) = is_event
                        .then(|| m.payload().and_then(plan::event_version))
                        .flatten()
                    {
                        catalog.learn(&ty, version).await?;
                    }
                }
                self.batch_bytes +=
                    m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
                if self.batch.is_empty() {
                    self.batch_started = Some(tokio::time::Instant::now());
                }
                if m.payload().is_some_and(stream::is_stream_end) {
                    self.ends.push(tp);
                }
                self.batch.push(m);
            }
            Accept::Skip => {
                debug!(topic = %tp.0, partition = tp.1, offset, "already applied: skipped");
            }
            Accept::Seek(next) => {
                debug!(topic = %tp.0, partition = tp.1, offset, next, "seeking to the ODS offset");
                self.seek(&tp, next)?;
            }
            Accept::Unknown => {
                return Err(RelayError::Internal(format!(
                    "offset ledger: {}[{}] unknown right after its ODS offset was read",
                    tp.0, tp.1
                )))
            }
        }
        Ok(())
    }

    /// After a batch with streamed transactions' end copies committed: the partitions whose
    /// commit copy is recorded and whose transaction is not applied yet wait for it.
    async fn hold_after_ends(&mut self) -> Result<(), RelayError> {
        let ends = std::mem::take(&mut self.ends);
        if ends.is_empty() || self.ledger.rewinding() {
            return Ok(());
        }
        let waiting = {
            let ods = self.ods().await?;
            staging::holding(ods.client(), &ends)
                .await
                .map_err(|e| ods.err(&e))?
        };
        for tp in waiting {
            let next = self
                .consumer
                .context()
                .positions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&tp)
                .copied();
            if let Some(next) = next {
                self.hold(tp, next)?;
            }
        }
        Ok(())
    }

    /// Pauses a partition at `next` until its streamed transaction is applied.
    fn hold(&mut self, tp: Tp, next: i64) -> Result<(), RelayError> {
        if self.held.contains(&tp) {
            return Ok(());
        }
        info!(topic = %tp.0, partition = tp.1, next, "waiting for a streamed transaction's end copies in the other partitions");
        self.seek(&tp, next)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        self.consumer
            .pause(&tpl)
            .map_err(|e| RelayError::Kafka(format!("pause {}[{}]: {e}", tp.0, tp.1)))?;
        self.held.push(tp);
        Ok(())
    }

    /// Resumes the held partitions whose streamed transaction has been applied.
    async fn release_holds(&mut self) -> Result<(), RelayError> {
        let held = self.held.clone();
        let waiting = {
            let ods = self.ods().await?;
            staging::holding(ods.client(), &held)
                .await
                .map_err(|e| ods.err(&e))?
        };
        let mut tpl = TopicPartitionList::new();
        for tp in held.iter().filter(|tp| !waiting.contains(tp)) {
            debug!(topic = %tp.0, partition = tp.1, "streamed transaction applied: resuming");
            tpl.add_partition(&tp.0, tp.1);
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        self.consumer
            .resume(&tpl)
            .map_err(|e| RelayError::Kafka(format!("resume: {e}")))?;
        self.held.retain(|tp| waiting.contains(tp));
        Ok(())
    }

    fn seek(&self, tp: &Tp, offset: i64) -> Result<(), RelayError> {
        tokio::task::block_in_place(|| {
            self.consumer
                .seek(&tp.0, tp.1, Offset::Offset(offset), SEEK_TIMEOUT)
        })
        .map_err(|e| RelayError::Kafka(format!("seek {}[{}] to {offset}: {e}", tp.0, tp.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_reads_change_topics_only() {
        let cfg: crate::config::Config = toml::from_str("[sink]\ndsn = \"x\"\n").expect("a config");
        let rt = SinkRuntime::new(cfg.sink.unwrap(), cfg.kafka, None).unwrap();
        assert!(rt.wants("saiki.public.orders"));
        for t in [
            "saiki.dead-letter",
            "saiki.transactions",
            "saiki.messages",
            "__consumer_offsets",
            "other.public.orders",
        ] {
            assert!(!rt.wants(t), "{t}");
        }
    }
}
