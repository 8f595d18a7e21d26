//! `saiki-relay sink`: a Kafka consumer group applying change records to the ODS, exactly
//! once (DESIGN.md §4 invariant 3, §5).
//!
//! Invariants:
//! - **Offsets live in the ODS.** A batch's rows and its partitions' next offsets commit in
//!   one ODS transaction ([`crate::ods`]); Kafka's committed offsets are never used. After a
//!   crash or a rebalance, each partition resumes at the offset the ODS holds.
//! - **No message is skipped.** A partition's messages enter a batch only in offset order
//!   from the ODS's offset: the first message seen of a partition must be that offset, or the
//!   consumer seeks there first. A batch that is not committed (fenced by another instance,
//!   or failed) rewinds its partitions to where it began.
//! - **Nothing is dropped silently.** A message that cannot be applied goes to the
//!   dead-letter topic with the reason, acknowledged by Kafka before the batch commits.
//! - **Bounded memory.** A batch holds at most `batch_max_rows` messages and
//!   `batch_max_bytes` of payload; librdkafka's prefetch queue is bounded by its settings.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use regex::Regex;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::apply::{Msg, Outcome, Planner};
use crate::config::{KafkaConfig, SinkConfig};
use crate::error::{RelayError, Retry};
use crate::kafka::Kafka;
use crate::metrics::SinkMetrics;
use crate::ods::{ApplyError, Ods, PartitionOffsets};

/// Dead letters handed to the producer at once (they are awaited before the commit).
const DEAD_LETTER_QUEUE_CAPACITY: usize = 10_000;
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
const TOMBSTONE_GC_INTERVAL: Duration = Duration::from_secs(600);

/// The sink's settings, checked.
pub struct SinkRuntime {
    pub sink: SinkConfig,
    pub kafka: KafkaConfig,
    pub topics: Regex,
    pub dead_letter_topic: String,
    /// Topics that match the pattern but carry nothing to materialize (or would loop).
    pub excluded: Vec<String>,
}

impl SinkRuntime {
    pub fn new(sink: SinkConfig, kafka: KafkaConfig) -> Result<Self, RelayError> {
        let pattern = sink
            .topics
            .clone()
            .unwrap_or_else(|| format!("^{}\\.", regex::escape(&kafka.topic_prefix)));
        let topics = Regex::new(&pattern)
            .map_err(|e| RelayError::Config(format!("sink.topics = {pattern:?}: {e}")))?;
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
        let excluded = vec![
            dead_letter_topic.clone(),
            format!("{}.transactions", kafka.topic_prefix),
            format!("{}.messages", kafka.topic_prefix),
        ];
        Ok(SinkRuntime {
            sink,
            kafka,
            topics,
            dead_letter_topic,
            excluded,
        })
    }

    /// Whether the sink reads this topic.
    pub fn wants(&self, topic: &str) -> bool {
        self.topics.is_match(topic)
            && !self.excluded.iter().any(|t| t == topic)
            && !topic.starts_with("__")
    }
}

/// Runs the sink until `shutdown` turns true (then commits the batch in hand and returns
/// Ok) or a definite error. Transient errors restart the session with backoff.
pub async fn run(
    rt: Arc<SinkRuntime>,
    metrics: Arc<SinkMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut retry = Retry::new(rt.sink.reconnect_backoff_max);
    loop {
        let span = info_span!("sink", group = %rt.sink.group);
        retry.session_started();
        let result = session(&rt, &metrics, &mut shutdown).instrument(span).await;
        metrics.ready.store(false, Ordering::Relaxed);
        match result.map_err(crate::kafka::refused) {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() => {
                metrics.retries.fetch_add(1, Ordering::Relaxed);
                if !retry.wait(&e, &mut shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

type Tp = (String, i32);

/// Rebalance and statistics callbacks: assign at the ODS's offsets (as last known), tell the
/// loop which partitions changed hands, and keep the consumer-lag metric.
struct SinkContext {
    positions: Mutex<HashMap<Tp, i64>>,
    /// Partitions assigned or revoked since the loop last looked: it forgets what it knew
    /// of them and reads their ODS offsets again.
    changed: Mutex<Vec<Tp>>,
    metrics: Arc<SinkMetrics>,
}

impl ClientContext for SinkContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::kafka::client_error(&error, reason);
    }

    /// librdkafka's statistics (every `topic_refresh`) carry each assigned partition's high
    /// watermark, so the lag costs no broker round trip of the loop's own.
    fn stats(&self, stats: rdkafka::Statistics) {
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

/// What the loop knows of one partition.
struct Part {
    /// The next offset the ODS holds (None: nothing applied yet).
    stored: Option<i64>,
    /// The next offset to put in a batch.
    next: i64,
    /// Whether the consumer's position is known to be `next` (checked or sought).
    synced: bool,
}

/// A partition's span in the batch in hand.
struct BatchPart {
    stored: Option<i64>,
    first: i64,
    next: i64,
}

struct Session<'a> {
    rt: &'a SinkRuntime,
    metrics: &'a SinkMetrics,
    ods: Ods,
    consumer: StreamConsumer<SinkContext>,
    dead_letters: Kafka,
    parts: HashMap<Tp, Part>,
    batch: Vec<OwnedMessage>,
    batch_bytes: usize,
    batch_parts: HashMap<Tp, BatchPart>,
    batch_started: Option<tokio::time::Instant>,
    subscribed: Vec<String>,
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
        metrics: metrics.clone(),
    };
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &rt.kafka.brokers)
        .set("client.id", "saiki-relay-sink")
        // A sink that died (kill -9) holds its partitions until the session times out:
        // 10 s instead of librdkafka's 45 s, so that its restart takes over quickly.
        .set("session.timeout.ms", "10000")
        .set(
            "statistics.interval.ms",
            rt.sink.topic_refresh.as_millis().max(100).to_string(),
        );
    for (k, v) in &rt.kafka.properties {
        cc.set(k, v);
    }
    // Offsets are the ODS's: Kafka's committed offsets are neither written nor read.
    if let Some(id) = &rt.sink.instance_id {
        // Static membership: a restarted instance takes its partitions back at once.
        cc.set("group.instance.id", id);
    }
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
        ods,
        consumer,
        dead_letters,
        parts: HashMap::new(),
        batch: Vec::new(),
        batch_bytes: 0,
        batch_parts: HashMap::new(),
        batch_started: None,
        subscribed: Vec::new(),
    };
    s.refresh_topics()?;
    metrics.ready.store(true, Ordering::Relaxed);
    let mut tick = tokio::time::interval(rt.sink.topic_refresh);
    let mut last_gc: Option<Instant> = None;
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let linger_at = s.batch_started.map(|t| t + rt.sink.batch_linger);
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    info!(messages = s.batch.len(), "shutdown: committing the batch in hand");
                    let grace = rt.sink.shutdown_grace;
                    match tokio::time::timeout(grace, s.apply_batch()).await {
                        Ok(r) => r?,
                        Err(_) => warn!(?grace, "the last batch did not commit within the grace period; it is applied on the next start"),
                    }
                    return Ok(());
                }
            }
            _ = async { tokio::time::sleep_until(linger_at.unwrap_or_else(tokio::time::Instant::now)).await }, if linger_at.is_some() => {
                s.apply_batch().await?;
            }
            m = s.consumer.recv() => {
                match m {
                    Ok(m) => {
                        let m = m.detach();
                        s.handle_events();
                        s.accept(m).await?;
                        if s.batch.len() >= rt.sink.batch_max_rows || s.batch_bytes >= rt.sink.batch_max_bytes {
                            s.apply_batch().await?;
                        }
                    }
                    Err(e) => warn!(error = %e, "consume"),
                }
            }
            _ = tick.tick() => {
                s.handle_events();
                s.refresh_topics()?;
                if last_gc.is_none_or(|t| t.elapsed() > TOMBSTONE_GC_INTERVAL) && s.batch.is_empty() {
                    last_gc = Some(Instant::now());
                    let n = s.ods.gc_tombstones(rt.sink.tombstone_retention).await?;
                    debug!(tombstones = n, "old tombstones removed");
                }
            }
        }
    }
}

impl Session<'_> {
    fn handle_events(&mut self) {
        let changed = self.consumer.context().take();
        if changed.is_empty() {
            return;
        }
        // The ODS is read again on each partition's first message.
        for tp in changed {
            self.parts.remove(&tp);
        }
        let n = self
            .consumer
            .assignment()
            .map(|a| a.count())
            .unwrap_or_default();
        self.metrics.assigned.store(n as u64, Ordering::Relaxed);
    }

    /// Takes a message into the batch, in offset order from the ODS's offset.
    async fn accept(&mut self, m: OwnedMessage) -> Result<(), RelayError> {
        let tp: Tp = (m.topic().to_string(), m.partition());
        let offset = m.offset();
        if !self.parts.contains_key(&tp) {
            let stored = self.ods.offset(&tp.0, tp.1).await?;
            let next = self
                .batch_parts
                .get(&tp)
                .map_or(stored.unwrap_or(0), |b| b.next.max(stored.unwrap_or(0)));
            self.parts.insert(
                tp.clone(),
                Part {
                    stored,
                    next,
                    synced: false,
                },
            );
        }
        let Some(part) = self.parts.get_mut(&tp) else {
            return Ok(());
        };
        if !part.synced {
            let fresh = part.stored.is_none() && !self.batch_parts.contains_key(&tp);
            if offset == part.next || (fresh && offset >= part.next) {
                part.synced = true;
            } else {
                let next = part.next;
                debug!(topic = %tp.0, partition = tp.1, offset, next, "seeking to the ODS offset");
                self.seek(&tp, next)?;
                if let Some(p) = self.parts.get_mut(&tp) {
                    p.synced = true;
                }
                return Ok(());
            }
        } else if offset < part.next {
            debug!(topic = %tp.0, partition = tp.1, offset, next = part.next, "already applied: skipped");
            return Ok(());
        } else if offset > part.next && part.stored.is_some() {
            debug!(topic = %tp.0, partition = tp.1, offset, next = part.next, "offset gap (compaction, retention or transaction markers)");
        }
        part.next = offset + 1;
        let stored = part.stored;
        let bp = self.batch_parts.entry(tp).or_insert(BatchPart {
            stored,
            first: offset,
            next: offset + 1,
        });
        bp.next = offset + 1;
        self.batch_bytes += m.payload().map_or(0, <[u8]>::len) + m.key().map_or(0, <[u8]>::len);
        if self.batch.is_empty() {
            self.batch_started = Some(tokio::time::Instant::now());
        }
        self.batch.push(m);
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

/// What a committed batch did.
struct Applied {
    written: u64,
    dead: usize,
    /// Source commit times of the applied changes (µs since the Unix epoch).
    commit_times: Vec<i64>,
}

impl Session<'_> {
    /// Applies and commits the batch in hand (if any).
    async fn apply_batch(&mut self) -> Result<(), RelayError> {
        if self.batch.is_empty() {
            self.batch_started = None;
            return Ok(());
        }
        let started = Instant::now();
        let offsets: Vec<PartitionOffsets> = self
            .batch_parts
            .iter()
            .map(|(tp, b)| PartitionOffsets {
                topic: tp.0.clone(),
                partition: tp.1,
                stored: b.stored,
                next: b.next,
            })
            .collect();
        let result = self.try_apply(&offsets).await;
        match result {
            Ok(Applied {
                written,
                dead,
                commit_times,
            }) => {
                let pos = &self.consumer.context().positions;
                let mut pos = pos.lock().unwrap_or_else(|p| p.into_inner());
                for o in &offsets {
                    let tp = (o.topic.clone(), o.partition);
                    if let Some(p) = self.parts.get_mut(&tp) {
                        p.stored = Some(o.next);
                    }
                    pos.insert(tp, o.next);
                }
                drop(pos);
                let m = self.metrics;
                m.rows_applied.fetch_add(written, Ordering::Relaxed);
                m.batches.fetch_add(1, Ordering::Relaxed);
                m.consumed
                    .fetch_add(self.batch.len() as u64, Ordering::Relaxed);
                m.dead_letters.fetch_add(dead as u64, Ordering::Relaxed);
                m.apply.observe(started.elapsed().as_secs_f64());
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                for ts in commit_times {
                    m.freshness.observe((now - ts) as f64 / 1e6);
                }
                debug!(
                    messages = self.batch.len(),
                    rows = written,
                    dead_letters = dead,
                    ms = started.elapsed().as_millis() as u64,
                    "batch committed"
                );
                self.clear_batch();
                Ok(())
            }
            Err(ApplyError::Fenced) => {
                self.ods.rollback().await;
                self.metrics.fenced.fetch_add(1, Ordering::Relaxed);
                warn!(messages = self.batch.len(), "another sink instance applied these partitions meanwhile (rebalance): batch dropped, partitions rewound to the ODS offsets");
                self.rewind().await
            }
            Err(ApplyError::Data(reason)) => {
                // try_apply isolates data errors; one escaping is a bug: stop, lose nothing.
                self.ods.rollback().await;
                Err(RelayError::Record(reason))
            }
            Err(ApplyError::Fatal(e)) => {
                self.ods.rollback().await;
                Err(e)
            }
        }
    }

    fn clear_batch(&mut self) {
        self.batch.clear();
        self.batch_parts.clear();
        self.batch_bytes = 0;
        self.batch_started = None;
    }

    /// After a batch was dropped: every partition in it continues from the ODS's offset.
    async fn rewind(&mut self) -> Result<(), RelayError> {
        let all = self.ods.offsets().await?;
        let bparts: Vec<(Tp, i64)> = self
            .batch_parts
            .iter()
            .map(|(tp, b)| (tp.clone(), b.first))
            .collect();
        self.clear_batch();
        for (tp, first) in bparts {
            let stored = all.get(&tp).copied();
            let next = stored.unwrap_or(first);
            if let Err(e) = self.seek(&tp, next) {
                // Typically revoked meanwhile (the rebalance that fenced the batch). If it is
                // still ours, its next message finds it unknown and seeks again.
                debug!(error = %e, topic = %tp.0, partition = tp.1, "rewind");
                self.parts.remove(&tp);
                continue;
            }
            self.parts.insert(
                tp,
                Part {
                    stored,
                    next,
                    synced: true,
                },
            );
        }
        Ok(())
    }

    /// Plans, applies, dead-letters and commits.
    async fn try_apply(&mut self, offsets: &[PartitionOffsets]) -> Result<Applied, ApplyError> {
        let kis = self.rt.sink.key_includes_source;
        let msgs: Vec<Msg<'_>> = self.batch.iter().map(msg_of).collect();
        let mut planner = Planner::new(kis);
        let mut dead: Vec<(usize, String)> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if let Outcome::DeadLetter(reason) = planner.add(i, m) {
                dead.push((i, reason));
            }
        }
        let blocked: Vec<String> = planner
            .tables
            .keys()
            .filter(|t| self.ods.unmaterializable(t).is_some())
            .cloned()
            .collect();
        for t in blocked {
            if let Some(plan) = planner.tables.shift_remove(&t) {
                let reason = self
                    .ods
                    .unmaterializable(&t)
                    .unwrap_or_default()
                    .to_string();
                dead.extend(
                    plan.message_indexes()
                        .into_iter()
                        .map(|i| (i, reason.clone())),
                );
            }
        }

        self.ods.begin().await?;
        self.ods.write_offsets(offsets).await?;
        let mut written = 0u64;
        let mut isolate = None;
        for plan in planner.tables.values() {
            match self.ods.apply_table(plan, false).await {
                Ok(n) => written += n,
                Err(ApplyError::Data(reason)) => {
                    isolate = Some(reason);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(reason) = isolate {
            // A record's content failed a statement: apply one record at a time, each in
            // a savepoint, and dead-letter those that fail.
            info!(messages = msgs.len(), %reason, "a statement failed on the data: applying this batch record by record");
            self.ods.rollback().await;
            self.ods.begin().await?;
            self.ods.write_offsets(offsets).await?;
            written = 0;
            let already: std::collections::HashSet<usize> = dead.iter().map(|d| d.0).collect();
            for (i, m) in msgs.iter().enumerate() {
                if already.contains(&i) {
                    continue;
                }
                let mut one = Planner::new(kis);
                if one.add(i, m) != Outcome::Planned {
                    continue;
                }
                for plan in one.tables.values() {
                    if let Some(r) = self.ods.unmaterializable(&plan.name) {
                        dead.push((i, r.to_string()));
                        continue;
                    }
                    self.ods.savepoint().await?;
                    match self.ods.apply_table(plan, true).await {
                        Ok(n) => {
                            self.ods.release_savepoint().await?;
                            written += n;
                        }
                        Err(ApplyError::Data(reason)) => {
                            self.ods.rollback_to_savepoint().await?;
                            if reason.starts_with("cannot create ODS table") {
                                self.ods.set_unmaterializable(&plan.name, reason.clone());
                            }
                            dead.push((i, reason));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let commit_times = std::mem::take(&mut planner.commit_times);
        drop(planner);
        drop(msgs);
        self.send_dead_letters(&dead).await?;
        self.ods.commit().await?;
        Ok(Applied {
            written,
            dead: dead.len(),
            commit_times,
        })
    }

    /// Produces the dead letters and waits for Kafka's acknowledgement of each.
    async fn send_dead_letters(&mut self, dead: &[(usize, String)]) -> Result<(), RelayError> {
        if dead.is_empty() {
            return Ok(());
        }
        let topic = self.rt.dead_letter_topic.clone();
        self.dead_letters.ensure_topic(&topic).await?;
        let mut pending = Vec::with_capacity(dead.len());
        for (i, reason) in dead {
            let m = &self.batch[*i];
            let origin = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
            warn!(%origin, %reason, "dead letter");
            let mut headers = OwnedHeaders::new();
            if let Some(h) = m.headers() {
                for x in h.iter() {
                    if x.key != "saiki.error" && x.key != "saiki.origin" {
                        headers = headers.insert(Header {
                            key: x.key,
                            value: x.value,
                        });
                    }
                }
            }
            headers = headers
                .insert(Header {
                    key: "saiki.error",
                    value: Some(reason.as_bytes()),
                })
                .insert(Header {
                    key: "saiki.origin",
                    value: Some(origin.as_bytes()),
                });
            pending.push(
                self.dead_letters
                    .send_owned(&topic, None, m.key(), m.payload(), headers)
                    .await?,
            );
        }
        for f in pending {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(RelayError::Kafka(format!("dead letter to {topic}: {e}")))
                }
                Err(_) => {
                    return Err(RelayError::Kafka(format!(
                        "dead letter to {topic}: the producer went away"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Subscribes to the matching topics (they appear as the sources create them).
    fn refresh_topics(&mut self) -> Result<(), RelayError> {
        let md = match tokio::task::block_in_place(|| {
            self.consumer.fetch_metadata(None, METADATA_TIMEOUT)
        }) {
            Ok(md) => md,
            Err(e) => {
                // The broker refusing the relay's credentials or certificate is definite;
                // anything else is retried at the next refresh.
                let e = crate::kafka::refused(RelayError::Kafka(format!("listing topics: {e}")));
                if !e.is_transient() {
                    return Err(e);
                }
                warn!(error = %e, "listing topics");
                return Ok(());
            }
        };
        let mut names: Vec<String> = md
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|t| self.rt.wants(t))
            .collect();
        names.sort();
        if names != self.subscribed {
            if names.is_empty() {
                self.consumer.unsubscribe();
            } else {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                self.consumer
                    .subscribe(&refs)
                    .map_err(|e| RelayError::Kafka(format!("subscribe: {e}")))?;
            }
            info!(topics = names.len(), "subscribed: {}", names.join(", "));
            self.subscribed = names;
        }
        Ok(())
    }
}

fn msg_of(m: &OwnedMessage) -> Msg<'_> {
    Msg {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
    }
}
