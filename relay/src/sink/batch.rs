//! A batch on its way into the ODS: planned on the consumer's task, applied on its own.
//!
//! The sink pipelines one batch deep: while [`Applier::spawn`] applies batch N (the ODS does
//! the work, the relay waits), the consumer's task reads batch N+1 and plans it (parsing and
//! netting are the relay's CPU work). On two cores this hides the planning behind the ODS.
//!
//! Invariants kept here:
//! - **One batch in flight.** An [`Applier`] owns the ODS connection; it is moved into the
//!   task that applies a batch and handed back in [`Done`]. Nothing else can write the ODS
//!   meanwhile, so batches commit in the order they were cut.
//! - **A batch is all or nothing.** [`Applier::apply`] commits the rows, the dead letters'
//!   acknowledgements and the offsets together, or rolls back and says why.
//! - **A batch continues from the one before.** Each batch's offsets name the stored values
//!   they start from ([`PartitionOffsets::stored`]), moved on to batch N's when N commits. If
//!   N does not commit, the sink drops N+1 as well and rewinds both (`sink.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message, OwnedMessage};
use tracing::{debug, info, warn, Instrument};

use crate::error::RelayError;
use crate::evolve::SchemaLog;
use crate::kafka::Kafka;
use crate::sink::ods::{ApplyError, Ods, PartitionOffsets};
use crate::sink::plan::{EventTables, Msg, Outcome, Planner};
use crate::sink::staging::{self, Ended};
use crate::sink::stream::StreamKey;

/// A batch's plan: the messages, and what they do to each ODS table.
pub(crate) struct Planned<'a> {
    pub(crate) msgs: Vec<Msg<'a>>,
    pub(crate) planner: Planner<'a>,
    /// Messages that cannot be applied, with the reason (for the dead-letter topic).
    pub(crate) dead: Vec<(usize, String)>,
}

self_cell::self_cell!(
    /// A batch's messages together with the plan that borrows them, so that the two travel
    /// to the apply task as one value.
    pub struct PlannedBatch {
        owner: Vec<OwnedMessage>,
        #[covariant]
        dependent: Planned,
    }
);

impl PlannedBatch {
    pub(crate) fn messages(&self) -> &[OwnedMessage] {
        self.borrow_owner()
    }
    pub(crate) fn len(&self) -> usize {
        self.borrow_owner().len()
    }
    /// Source commit times (µs since the Unix epoch) of the planned changes.
    pub(crate) fn commit_times(&self) -> &[i64] {
        &self.borrow_dependent().planner.commit_times
    }
}

/// Parses and nets a batch (the relay's CPU share of applying it), without event tables.
pub fn plan(messages: Vec<OwnedMessage>, key_includes_source: bool) -> PlannedBatch {
    plan_with_events(messages, key_includes_source, None, None)
}

/// Parses and nets a batch; events are materialized into the `events` tables (`None`:
/// skipped).
pub(crate) fn plan_with_events(
    messages: Vec<OwnedMessage>,
    key_includes_source: bool,
    events: Option<Arc<EventTables>>,
    schema: Option<Arc<SchemaLog>>,
) -> PlannedBatch {
    plan_through(messages, || {
        Planner::new(key_includes_source, events).with_schema(schema)
    })
}

/// Plans `messages` with the planner `make` gives (empty: it borrows nothing yet, and a
/// planner is covariant in what it borrows).
fn plan_through(
    messages: Vec<OwnedMessage>,
    make: impl FnOnce() -> Planner<'static>,
) -> PlannedBatch {
    PlannedBatch::new(messages, |owned| {
        let msgs: Vec<Msg<'_>> = owned.iter().map(msg_of).collect();
        let mut planner = make();
        let mut dead = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if let Outcome::DeadLetter(reason) = planner.add(i, m) {
                dead.push((i, reason));
            }
        }
        Planned {
            msgs,
            planner,
            dead,
        }
    })
}

pub(crate) fn msg_of(m: &OwnedMessage) -> Msg<'_> {
    Msg {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
    }
}

/// What a committed batch did.
#[derive(Debug)]
pub struct Applied {
    pub written: u64,
    pub dead: usize,
    /// Streamed transactions: rows staged, transactions applied at their commit, dropped at
    /// their abort.
    pub staged: u64,
    pub stream_commits: u64,
    pub stream_aborts: u64,
    /// The schema changes followed, when a streamed transaction applied here held one: the
    /// sink plans what comes next through it.
    pub(crate) schema: Option<Arc<SchemaLog>>,
}

/// Rows of a committed streamed transaction read from the staging and applied at once.
const STAGED_CHUNK_ROWS: i64 = 10_000;

/// What the batch's streamed records did.
#[derive(Debug, Default)]
struct StreamsDone {
    written: u64,
    staged: u64,
    commits: u64,
    aborts: u64,
    /// The schema log after the `L` records of the transactions applied, if any.
    schema: Option<Arc<SchemaLog>>,
}

/// Plans the staged records of a streamed transaction that committed at `commit_lsn`.
fn plan_committed(
    messages: Vec<OwnedMessage>,
    key_includes_source: bool,
    schema: Option<Arc<SchemaLog>>,
    commit_lsn: saiki_core::Lsn,
    commit_ts: Option<&str>,
) -> PlannedBatch {
    plan_through(messages, || {
        Planner::new(key_includes_source, None)
            .with_schema(schema)
            .committed_at(commit_lsn, commit_ts)
    })
}

/// A batch back from its apply task.
pub struct Done {
    pub applier: Applier,
    pub batch: PlannedBatch,
    pub offsets: Vec<PartitionOffsets>,
    pub result: Result<Applied, ApplyError>,
    /// Time spent applying (not waiting to be collected).
    pub elapsed: Duration,
}

/// The ODS connection and the dead-letter producer: what applying a batch needs.
pub struct Applier {
    pub ods: Ods,
    /// None where no dead letter can arise or be sent (the benchmark); a batch with one
    /// then fails.
    pub dead_letters: Option<Kafka>,
    pub dead_letter_topic: String,
}

impl Applier {
    /// Applies the batch on a task of its own; the applier comes back in [`Done`].
    pub fn spawn(
        mut self,
        batch: PlannedBatch,
        offsets: Vec<PartitionOffsets>,
    ) -> tokio::task::JoinHandle<Done> {
        let apply = async move {
            let started = Instant::now();
            let result = self.apply(&batch, &offsets).await;
            Done {
                applier: self,
                batch,
                offsets,
                result,
                elapsed: started.elapsed(),
            }
        };
        // In the sink's span, so that its log lines name the group.
        tokio::spawn(apply.instrument(tracing::Span::current()))
    }

    /// Applies, dead-letters and commits; on any error the transaction is rolled back.
    pub async fn apply(
        &mut self,
        batch: &PlannedBatch,
        offsets: &[PartitionOffsets],
    ) -> Result<Applied, ApplyError> {
        let result = self.try_apply(batch, offsets).await;
        if result.is_err() {
            self.ods.rollback().await;
        }
        if let Err(ApplyError::Stopped(stop)) = &result {
            // Nothing of the batch committed; the topic waits from now on.
            self.ods.record_stop(stop).await?;
        }
        result
    }

    async fn try_apply(
        &mut self,
        batch: &PlannedBatch,
        offsets: &[PartitionOffsets],
    ) -> Result<Applied, ApplyError> {
        let kis = self.ods.key_includes_source();
        let planned = batch.borrow_dependent();
        let msgs = &planned.msgs;
        let mut dead = planned.dead.clone();
        // Tables the ODS cannot hold: their records go to the dead-letter topic.
        let mut plans = Vec::new();
        for plan in planned.planner.tables.values() {
            match self.ods.unmaterializable(&plan.name) {
                Some(reason) => dead.extend(
                    plan.message_indexes()
                        .into_iter()
                        .map(|i| (i, reason.to_string())),
                ),
                None => plans.push(plan),
            }
        }

        let mut written;
        let mut isolate = None;
        // Staged records of streamed transactions that cannot be applied at their commit.
        let mut staged_dead: Vec<(OwnedMessage, String)> = Vec::new();
        let mut streams = StreamsDone::default();
        // Runs again only after a KeyTaken, which turns its table to upserts: at most once
        // per table.
        'batch: loop {
            self.ods.begin().await?;
            self.ods.write_offsets(offsets).await?;
            written = 0u64;
            for plan in &plans {
                match self.ods.apply_table(plan, false).await {
                    Ok(n) => written += n,
                    Err(ApplyError::Data(reason) | ApplyError::CannotCreate(reason)) => {
                        isolate = Some(reason);
                        break 'batch;
                    }
                    Err(ApplyError::KeyTaken(table)) => {
                        info!(%table, messages = msgs.len(), "applying the batch again with upserts for this table");
                        self.ods.rollback().await;
                        continue 'batch;
                    }
                    Err(e) => return Err(e),
                }
            }
            if isolate.is_none() {
                staged_dead.clear();
                match self.apply_streams(planned, &mut staged_dead).await {
                    Ok(done) => {
                        written += done.written;
                        streams = done;
                    }
                    Err(ApplyError::KeyTaken(table)) => {
                        info!(%table, messages = msgs.len(), "applying the batch again with upserts for this table");
                        self.ods.rollback().await;
                        continue 'batch;
                    }
                    Err(e) => return Err(e),
                }
            }
            break;
        }
        if isolate.is_none() {
            // After the rows (the batch ends with its L record): the ODS follows the change.
            for sc in &planned.planner.schema_changes {
                self.ods.apply_schema_change(sc).await?;
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
                let mut one = Planner::new(kis, planned.planner.events())
                    .with_schema(planned.planner.schema());
                // The batch's L record (its last message) is applied after the loop, with
                // the steps decided when the batch was cut.
                // A streamed record is staged by apply_streams, after this loop.
                if one.add(i, m) != Outcome::Planned
                    || !one.schema_changes.is_empty()
                    || !one.streams.is_empty()
                {
                    continue;
                }
                written += self.apply_isolated(&one, i, &mut dead).await?;
            }
            staged_dead.clear();
            streams = self.apply_streams(planned, &mut staged_dead).await?;
            written += streams.written;
            for sc in &planned.planner.schema_changes {
                self.ods.apply_schema_change(sc).await?;
            }
        }
        let all = batch.messages();
        let letters: Vec<(&OwnedMessage, &str)> = dead
            .iter()
            .map(|(i, r)| (&all[*i], r.as_str()))
            .chain(staged_dead.iter().map(|(m, r)| (m, r.as_str())))
            .collect();
        self.send_dead_letters(&letters).await?;
        self.ods.commit().await?;
        Ok(Applied {
            written,
            dead: letters.len(),
            staged: streams.staged,
            stream_commits: streams.commits,
            stream_aborts: streams.aborts,
            schema: streams.schema,
        })
    }

    /// The batch's streamed records (`sink/stream.rs`): stages them, drops rolled-back
    /// subtransactions, records the end copies, and applies each transaction whose last copy
    /// this is (dropping it, for an abort). Inside the batch's transaction.
    async fn apply_streams(
        &mut self,
        planned: &Planned<'_>,
        staged_dead: &mut Vec<(OwnedMessage, String)>,
    ) -> Result<StreamsDone, ApplyError> {
        let ops = &planned.planner.streams;
        let mut done = StreamsDone::default();
        if ops.is_empty() {
            return Ok(done);
        }
        let fatal = |ods: &Ods, e: tokio_postgres::Error| ApplyError::Fatal(ods.err(&e));
        done.staged = staging::stage(self.ods.client(), ops, &planned.msgs)
            .await
            .map_err(|e| fatal(&self.ods, e))?;
        staging::abort_subxacts(self.ods.client(), ops)
            .await
            .map_err(|e| fatal(&self.ods, e))?;
        for end in ops.ends_in_lock_order() {
            let ended = staging::end(self.ods.client(), end)
                .await
                .map_err(|e| fatal(&self.ods, e))?;
            if ended != Ended::Complete {
                debug!(source = %end.key.source, xid = end.key.xid, ?ended, "streamed transaction end copy");
                continue;
            }
            match &end.commit {
                Some((lsn, ts)) => {
                    let started = Instant::now();
                    let schema = done.schema.clone().or_else(|| planned.planner.schema());
                    let (n, rows, followed) = self
                        .apply_committed(&end.key, *lsn, ts.as_deref(), schema, staged_dead)
                        .await?;
                    if followed.is_some() {
                        done.schema = followed;
                    }
                    done.written += n;
                    done.commits += 1;
                    info!(source = %end.key.source, xid = end.key.xid, commit_lsn = %lsn, rows, written = n, ms = started.elapsed().as_millis() as u64, "streamed transaction applied at its commit");
                }
                None => {
                    done.aborts += 1;
                    info!(source = %end.key.source, xid = end.key.xid, "streamed transaction aborted: its staged rows are dropped");
                }
            }
            staging::finish(self.ods.client(), &end.key)
                .await
                .map_err(|e| fatal(&self.ods, e))?;
        }
        Ok(done)
    }

    /// Applies a committed streamed transaction's staged records in chunks of
    /// [`STAGED_CHUNK_ROWS`] (memory stays flat for any size), each under a savepoint: a chunk
    /// a statement fails on is applied record by record, and what fails goes to the
    /// dead-letter topic. A chunk ends after an `L` record, which the ODS follows before the
    /// rows after it are planned, as a batch does. Returns rows written, records read, and the
    /// schema log after the transaction's `L` records (if it had any).
    async fn apply_committed(
        &mut self,
        key: &StreamKey,
        commit_lsn: saiki_core::Lsn,
        commit_ts: Option<&str>,
        mut schema: Option<Arc<SchemaLog>>,
        staged_dead: &mut Vec<(OwnedMessage, String)>,
    ) -> Result<(u64, u64, Option<Arc<SchemaLog>>), ApplyError> {
        let kis = self.ods.key_includes_source();
        let (mut after, mut written, mut read) = (0i64, 0u64, 0u64);
        let mut followed = None;
        loop {
            let mut rows = staging::chunk(self.ods.client(), key, after, STAGED_CHUNK_ROWS)
                .await
                .map_err(|e| ApplyError::Fatal(self.ods.err(&e)))?;
            if let Some(l) = rows.iter().position(|(_, m)| {
                m.payload()
                    .is_some_and(|p| p.starts_with(crate::sink::SCHEMA_CHANGE_PREFIX))
            }) {
                rows.truncate(l + 1);
            }
            let Some((last, _)) = rows.last() else {
                break;
            };
            after = *last;
            read += rows.len() as u64;
            let msgs: Vec<OwnedMessage> = rows.into_iter().map(|(_, m)| m).collect();
            let chunk = plan_committed(msgs, kis, schema.clone(), commit_lsn, commit_ts);
            let p = chunk.borrow_dependent();
            let owned = chunk.messages();
            let mut dead: Vec<(usize, String)> = p.dead.clone();
            self.ods.savepoint().await?;
            let mut failed = false;
            for plan in p.planner.tables.values() {
                if let Some(reason) = self.ods.unmaterializable(&plan.name) {
                    let reason = reason.to_string();
                    dead.extend(
                        plan.message_indexes()
                            .into_iter()
                            .map(|i| (i, reason.clone())),
                    );
                    continue;
                }
                match self.ods.apply_table(plan, false).await {
                    Ok(n) => written += n,
                    Err(ApplyError::Data(_) | ApplyError::CannotCreate(_)) => {
                        failed = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if failed {
                self.ods.rollback_to_savepoint().await?;
                let already: std::collections::HashSet<usize> = dead.iter().map(|d| d.0).collect();
                for (i, m) in p.msgs.iter().enumerate() {
                    if already.contains(&i) {
                        continue;
                    }
                    let mut one = Planner::new(kis, None)
                        .with_schema(schema.clone())
                        .committed_at(commit_lsn, commit_ts);
                    if one.add(i, m) != Outcome::Planned {
                        continue;
                    }
                    written += self.apply_isolated(&one, i, &mut dead).await?;
                }
            } else {
                self.ods.release_savepoint().await?;
            }
            // The chunk's L record (its last): decided and followed as the sink does for a
            // batch's, through a log of this apply's own, handed back to the sink.
            for sc in &p.planner.schema_changes {
                let mut log: SchemaLog = schema.as_deref().cloned().unwrap_or_default();
                for (table, source) in self.ods.sources_of(std::slice::from_ref(&sc.table)).await? {
                    log.saw(&table, &source);
                }
                if let Some(plan) = p.planner.tables.get(&sc.table) {
                    for source in plan.sources() {
                        log.saw(&sc.table, source);
                    }
                }
                let mut sc = sc.clone();
                sc.steps = log
                    .record(&sc.table, &sc.source, sc.at, &sc.changes)
                    .unwrap_or_default();
                self.ods.apply_schema_change(&sc).await?;
                schema = Some(Arc::new(log));
                followed = schema.clone();
            }
            staged_dead.extend(dead.into_iter().map(|(i, r)| (owned[i].clone(), r)));
        }
        Ok((written, read, followed))
    }

    /// Applies one record's plan under a savepoint; a statement that fails on its data
    /// dead-letters it (`dead`, batch index `i`).
    async fn apply_isolated(
        &mut self,
        one: &Planner<'_>,
        i: usize,
        dead: &mut Vec<(usize, String)>,
    ) -> Result<u64, ApplyError> {
        let mut written = 0;
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
                    dead.push((i, reason));
                }
                Err(ApplyError::CannotCreate(reason)) => {
                    self.ods.rollback_to_savepoint().await?;
                    self.ods.set_unmaterializable(&plan.name, reason.clone());
                    dead.push((i, reason));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }

    /// Produces the dead letters and waits for Kafka's acknowledgement of each.
    async fn send_dead_letters(
        &mut self,
        dead: &[(&OwnedMessage, &str)],
    ) -> Result<(), RelayError> {
        if dead.is_empty() {
            return Ok(());
        }
        let topic = self.dead_letter_topic.clone();
        let Some(producer) = self.dead_letters.as_mut() else {
            return Err(RelayError::Record(format!(
                "{} records cannot be applied and there is no dead-letter producer: {}",
                dead.len(),
                dead[0].1
            )));
        };
        producer.ensure_topic(&topic).await?;
        let mut pending = Vec::with_capacity(dead.len());
        for (m, reason) in dead {
            let origin = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
            warn!(%origin, %reason, "dead letter");
            // The original headers, but an earlier dead letter's reason and origin.
            let kept = m
                .headers()
                .into_iter()
                .flat_map(|h| h.iter())
                .filter(|h| h.key != "saiki.error" && h.key != "saiki.origin");
            let headers = crate::kafka::headers(kept.map(|h| (h.key, h.value)).chain([
                ("saiki.error", Some(reason.as_bytes())),
                ("saiki.origin", Some(origin.as_bytes())),
            ]));
            pending.push(
                producer
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
}
