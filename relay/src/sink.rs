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
//!   or failed) rewinds its partitions to where it began. So does the batch read after it
//!   (its offsets were taken before that one committed): the sink drops it too.
//! - **One batch in flight** ([`crate::batch`]): batch N+1 is read and planned while batch N
//!   is applied, and sent only after N is in.
//! - **Nothing is dropped silently.** A message that cannot be applied goes to the
//!   dead-letter topic with the reason, acknowledged by Kafka before the batch commits.
//! - **Bounded memory.** A batch holds at most `batch_max_rows` messages and
//!   `batch_max_bytes` of payload, and at most two are in hand (one in flight, one being
//!   read); librdkafka's prefetch queue is bounded by its settings.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use regex::Regex;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::batch::{self, Applied, Applier, Done};
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
/// How often topics are listed while none matches yet.
const NO_TOPICS_REFRESH: Duration = Duration::from_millis(500);

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

/// The batch being applied on its own task.
struct Inflight {
    handle: tokio::task::JoinHandle<Done>,
    /// Where each of its partitions began (to rewind them if it does not commit).
    firsts: Vec<(Tp, i64)>,
}

struct Session<'a> {
    rt: &'a SinkRuntime,
    metrics: &'a SinkMetrics,
    /// The ODS connection, here whenever no batch is in flight.
    applier: Option<Applier>,
    inflight: Option<Inflight>,
    /// Partitions (and where their dropped batch began) to rewind to the ODS offsets.
    rewind_pending: Vec<(Tp, i64)>,
    consumer: StreamConsumer<SinkContext>,
    parts: HashMap<Tp, Part>,
    batch: Vec<OwnedMessage>,
    batch_bytes: usize,
    batch_parts: HashMap<Tp, BatchPart>,
    batch_started: Option<tokio::time::Instant>,
    subscribed: Vec<String>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        // A session that ends (an error, or a shutdown past its grace period) stops the batch
        // in flight: the aborted task drops its connection, and the ODS rolls back an open
        // transaction. A COMMIT already sent may still land; the offsets it writes then fence
        // the next session's first batch of those partitions, which rewinds.
        if let Some(i) = &self.inflight {
            i.handle.abort();
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
        applier: Some(Applier {
            ods,
            dead_letters: Some(dead_letters),
            dead_letter_topic: rt.dead_letter_topic.clone(),
        }),
        inflight: None,
        rewind_pending: Vec::new(),
        consumer,
        parts: HashMap::new(),
        batch: Vec::new(),
        batch_bytes: 0,
        batch_parts: HashMap::new(),
        batch_started: None,
        subscribed: Vec::new(),
    };
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
    loop {
        if !s.rewind_pending.is_empty() {
            s.rewind().await?;
        }
        let linger_at = s.batch_started.map(|t| t + rt.sink.batch_linger);
        let busy = s.inflight.is_some();
        let handle = s.inflight.as_mut().map(|i| &mut i.handle);
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
                let firsts = s.inflight.take().map(|i| i.firsts).unwrap_or_default();
                s.finish(firsts, done)?;
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
            _ = tokio::time::sleep_until(next_refresh) => {
                s.handle_events();
                s.refresh_topics()?;
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
            None => Err(RelayError::Record(
                "the ODS connection was lost with a failed apply task".into(),
            )),
        }
    }

    /// Waits for the batch in flight (if any) and takes in its outcome. Cancelled (the
    /// shutdown's grace period), it leaves the batch in flight, for `Drop` to abort.
    async fn settle(&mut self) -> Result<(), RelayError> {
        let Some(i) = self.inflight.as_mut() else {
            return Ok(());
        };
        let done = (&mut i.handle).await;
        let firsts = self.inflight.take().map(|i| i.firsts).unwrap_or_default();
        self.finish(firsts, done)
    }

    /// Takes in a batch back from its apply task: on commit, the partitions' stored offsets
    /// move on (also in the batch in hand, which continues from it); fenced, its partitions
    /// rewind; any other failure ends the session.
    fn finish(
        &mut self,
        firsts: Vec<(Tp, i64)>,
        done: Result<Done, tokio::task::JoinError>,
    ) -> Result<(), RelayError> {
        let done = done.map_err(|e| RelayError::Record(format!("the apply task failed: {e}")))?;
        self.applier = Some(done.applier);
        let messages = done.batch.len();
        match done.result {
            Ok(Applied { written, dead }) => {
                let pos = &self.consumer.context().positions;
                let mut pos = pos.lock().unwrap_or_else(|p| p.into_inner());
                for o in &done.offsets {
                    let tp = (o.topic.clone(), o.partition);
                    if let Some(p) = self.parts.get_mut(&tp) {
                        p.stored = Some(o.next);
                    }
                    // The batch in hand took this stored value before this one committed.
                    if let Some(b) = self.batch_parts.get_mut(&tp) {
                        if b.stored == o.stored {
                            b.stored = Some(o.next);
                        }
                    }
                    pos.insert(tp, o.next);
                }
                drop(pos);
                let m = self.metrics;
                m.rows_applied.fetch_add(written, Ordering::Relaxed);
                m.batches.fetch_add(1, Ordering::Relaxed);
                m.consumed.fetch_add(messages as u64, Ordering::Relaxed);
                m.dead_letters.fetch_add(dead as u64, Ordering::Relaxed);
                m.apply.observe(done.elapsed.as_secs_f64());
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                for ts in done.batch.commit_times() {
                    m.freshness.observe((now - ts) as f64 / 1e6);
                }
                debug!(
                    messages,
                    rows = written,
                    dead_letters = dead,
                    ms = done.elapsed.as_millis() as u64,
                    "batch committed"
                );
                Ok(())
            }
            Err(ApplyError::Fenced) => {
                self.metrics.fenced.fetch_add(1, Ordering::Relaxed);
                warn!(messages, "another sink instance applied these partitions meanwhile (rebalance): batch dropped, partitions rewound to the ODS offsets");
                self.rewind_pending.extend(firsts);
                Ok(())
            }
            // The apply task isolates data errors; one escaping is a bug: stop, lose nothing.
            Err(ApplyError::Data(reason)) => Err(RelayError::Record(reason)),
            Err(ApplyError::KeyTaken(table)) => Err(RelayError::Record(format!(
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
        let planned = batch::plan(msgs, self.rt.sink.key_includes_source);
        self.settle().await?;
        if !self.rewind_pending.is_empty() {
            // The batch before was fenced: this one continues from it, so it is void too.
            drop(planned);
            return self.rewind().await;
        }
        let parts = std::mem::take(&mut self.batch_parts);
        let offsets: Vec<PartitionOffsets> = parts
            .iter()
            .map(|(tp, b)| PartitionOffsets {
                topic: tp.0.clone(),
                partition: tp.1,
                stored: b.stored,
                next: b.next,
            })
            .collect();
        let firsts = parts.into_iter().map(|(tp, b)| (tp, b.first)).collect();
        let Some(applier) = self.applier.take() else {
            return Err(RelayError::Record(
                "the ODS connection was lost with a failed apply task".into(),
            ));
        };
        self.inflight = Some(Inflight {
            handle: applier.spawn(planned, offsets),
            firsts,
        });
        Ok(())
    }

    fn clear_batch(&mut self) {
        self.batch.clear();
        self.batch_parts.clear();
        self.batch_bytes = 0;
        self.batch_started = None;
    }

    /// After a batch was dropped: every partition in it, and in the batch in hand (which
    /// continued from it), continues from the ODS's offset.
    async fn rewind(&mut self) -> Result<(), RelayError> {
        let all = self.ods().await?.offsets().await?;
        let mut firsts: HashMap<Tp, i64> = HashMap::new();
        let dropped = std::mem::take(&mut self.rewind_pending);
        let in_hand = self.batch_parts.iter().map(|(tp, b)| (tp.clone(), b.first));
        for (tp, first) in dropped.into_iter().chain(in_hand) {
            let f = firsts.entry(tp).or_insert(first);
            *f = (*f).min(first);
        }
        self.clear_batch();
        for (tp, first) in firsts {
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
            let stored = self.ods().await?.offset(&tp.0, tp.1).await?;
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
