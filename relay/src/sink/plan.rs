//! The sink's apply planner (docs/sink.md, "The apply path"). Pure: no I/O, no PostgreSQL.
//!
//! A batch of Kafka messages becomes, per ODS table, a set of **net changes**: one per row
//! (source and key), folded in consumption order, so that the database applies each row once
//! per batch. The fold keeps the ODS's ordering guard: within one source, a change only
//! replaces what an earlier change `(commit_lsn, seq)` wrote; duplicates and older replays
//! are dropped. Unchanged-TOAST columns are carried over from an earlier change of the batch,
//! or marked *absent*, which the merge turns into "keep the ODS value".
//!
//! Invariant: applying the plan of a batch has the same effect on the ODS as applying the
//! batch's records one by one with the guard ([`Planner`] is checked against that model by a
//! property test).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use indexmap::IndexMap;
use saiki_core::record::Action;
use saiki_core::view::{Fields, RecordView, Types};
use saiki_core::Lsn;
use serde_json::value::RawValue;

pub(crate) use crate::event_table::EventTables;
use crate::event_table::{event_parts, METADATA_COLUMNS};
use crate::evolve::SchemaLog;
use crate::sink::stream::{StreamOps, Taken};

/// The dead-letter reason for records of tables without a key (docs/sink.md, "Dead letters").
pub(crate) const NO_IDENTITY: &str =
    "no replica identity: add a primary key or set REPLICA IDENTITY FULL";

/// One consumed Kafka message, borrowed for the time of planning.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Msg<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: Option<&'a [u8]>,
}

/// JSON `null`, for the columns an event leaves out.
fn json_null() -> &'static RawValue {
    static NULL: OnceLock<Box<RawValue>> = OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string("null".into()).expect("null is JSON"))
}

/// The event type and schema version in an event's `metadata`, if it is an event.
pub(crate) fn event_version(payload: &[u8]) -> Option<(String, i32)> {
    let (ty, version, _, _) = event_parts(payload).ok()??;
    Some((ty.into_owned(), version))
}

/// The sink's view of a change record: the core's reader with the column objects as
/// [`Fields`], borrowed from the message.
pub(crate) type SinkRecord<'a> = RecordView<'a, Fields<'a>>;

/// A net change to one ODS row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Insert or update: provided columns are written, absent ones kept.
    Upsert,
    Delete,
}

/// Column values of a row by column index; a missing index is an absent column.
#[derive(Debug, Clone, Default)]
pub(crate) struct Values<'a>(Vec<Option<&'a RawValue>>);

impl<'a> Values<'a> {
    pub(crate) fn get(&self, i: usize) -> Option<&'a RawValue> {
        self.0.get(i).copied().flatten()
    }
    pub(crate) fn contains(&self, i: usize) -> bool {
        self.get(i).is_some()
    }
    pub(crate) fn insert(&mut self, i: usize, v: &'a RawValue) {
        if self.0.len() <= i {
            self.0.resize(i + 1, None);
        }
        self.0[i] = Some(v);
    }
    pub(crate) fn remove(&mut self, i: usize) {
        if let Some(x) = self.0.get_mut(i) {
            *x = None;
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct NetRow<'a> {
    pub(crate) op: Op,
    pub(crate) source: Cow<'a, str>,
    pub(crate) lsn: Lsn,
    pub(crate) seq: i64,
    /// Key values, in [`TablePlan::key`] order.
    pub(crate) key: Vec<&'a RawValue>,
    /// Column index (in [`TablePlan::columns`]) → value; key columns included. Columns not
    /// here are *absent*: an update keeps the ODS value, an insert leaves them null.
    pub(crate) values: Values<'a>,
    /// Indexes of the batch messages folded into this row.
    pub(crate) msgs: Vec<usize>,
    /// The first change of this key in the batch was an insert at the source: the key had
    /// no row there before, so (replays aside, which the watermark catches) none in the ODS.
    pub(crate) born: bool,
}

/// A column seen in the batch, with the type its records gave (if they carried `types`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnSeen {
    pub(crate) name: String,
    pub(crate) type_name: Option<String>,
}

/// Everything a batch does to one ODS table.
#[derive(Debug, Clone)]
pub(crate) struct TablePlan<'a> {
    /// The ODS table name (the source table's name, docs/sink.md).
    pub(crate) name: String,
    /// `schema.table` at the source, for messages.
    pub(crate) source_table: String,
    /// The source key's column names.
    pub(crate) key: Vec<String>,
    /// Whether ODS rows are keyed by `(_saiki_source, key…)`: `sink.key_includes_source` for
    /// change tables, never for event tables (their `_saiki_source` is a Kafka partition).
    pub(crate) source_in_key: bool,
    pub(crate) columns: IndexMap<String, ColumnSeen>,
    pub(crate) rows: IndexMap<(String, String), NetRow<'a>>,
    /// Per source: delete the rows written before `(lsn, seq)`.
    pub(crate) truncates: IndexMap<String, (Lsn, i64, Vec<usize>)>,
    /// The ends of resyncs (`W` records) in this batch, applied after the rows.
    pub(crate) sweeps: Vec<SweepMark>,
}

/// One partition's `W` record: the resync of `source` that started at `before` reached the
/// end of the table in this partition. Once all `partitions` have brought theirs, the rows of
/// that source last changed before `before` are gone at the source (docs/sink.md, "After a
/// failover").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SweepMark {
    pub(crate) source: String,
    pub(crate) before: Lsn,
    pub(crate) partitions: i32,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) msg: usize,
}

impl<'a> TablePlan<'a> {
    fn new(name: &str, source_table: String, key: Vec<String>, source_in_key: bool) -> Self {
        TablePlan {
            name: name.to_string(),
            source_table,
            key,
            source_in_key,
            columns: IndexMap::new(),
            rows: IndexMap::new(),
            truncates: IndexMap::new(),
            sweeps: Vec::new(),
        }
    }

    /// The index of a column whose type is known (an event table's).
    fn typed_column(&mut self, name: &str, type_name: &str) -> usize {
        if let Some(i) = self.columns.get_index_of(name) {
            return i;
        }
        self.columns
            .insert_full(
                name.to_string(),
                ColumnSeen {
                    name: name.to_string(),
                    type_name: Some(type_name.to_string()),
                },
            )
            .0
    }

    fn column(&mut self, name: &str, types: Option<&RawValue>) -> usize {
        self.column_as(name, name, types)
    }

    /// The index of ODS column `name`, typed by the record's `types` entry for `source_name`
    /// (its name at the source, before a rename the ODS followed).
    fn column_as(&mut self, name: &str, source_name: &str, types: Option<&RawValue>) -> usize {
        if let Some(i) = self.columns.get_index_of(name) {
            if self.columns[i].type_name.is_none() {
                self.columns[i].type_name = type_of(types, source_name);
            }
            return i;
        }
        let (i, _) = self.columns.insert_full(
            name.to_string(),
            ColumnSeen {
                name: name.to_string(),
                type_name: type_of(types, source_name),
            },
        );
        i
    }

    /// The sources of the plan's rows and truncates, each once.
    pub(crate) fn sources(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let rows = self.rows.values().map(|r| r.source.as_ref());
        let sweeps = self.sweeps.iter().map(|w| w.source.as_str());
        for s in rows
            .chain(self.truncates.keys().map(String::as_str))
            .chain(sweeps)
        {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// Messages whose changes this plan applies (for dead-lettering a failed table).
    pub(crate) fn message_indexes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .rows
            .values()
            .flat_map(|r| r.msgs.iter().copied())
            .chain(self.truncates.values().flat_map(|t| t.2.iter().copied()))
            .chain(self.sweeps.iter().map(|w| w.msg))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

fn type_of(types: Option<&RawValue>, name: &str) -> Option<String> {
    let types: Types<'_> = serde_json::from_str(types?.get()).ok()?;
    types
        .0
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.to_string())
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing to apply: a tombstone, a transaction or message record, an older duplicate.
    Skipped,
    /// Folded into the plan.
    Planned,
    /// Cannot be applied: goes to the dead-letter topic with this reason.
    DeadLetter(String),
}

/// Folds a batch of messages into per-table net changes.
pub(crate) struct Planner<'a> {
    key_includes_source: bool,
    /// The event tables known to the sink; `None`: events are not materialized.
    events: Option<Arc<EventTables>>,
    pub(crate) tables: IndexMap<String, TablePlan<'a>>,
    /// Source commit times (µs since the Unix epoch) of the planned changes that carry one.
    pub(crate) commit_times: Vec<i64>,
    /// The schema changes the sink applied, for reading rows of renamed and added columns.
    schema: Option<Arc<SchemaLog>>,
    /// The batch's `L` records, applied after its rows (the sink cuts a batch after one).
    pub(crate) schema_changes: Vec<SchemaChange>,
    /// Records of streamed transactions: staged, not planned (`sink/stream.rs`).
    pub(crate) streams: StreamOps,
    /// Planning a streamed transaction's staged records at its commit: the commit's
    /// position, and its time (µs since the Unix epoch).
    committed: Option<(Lsn, Option<i64>)>,
}

/// An `L` record of a batch.
#[derive(Debug, Clone)]
pub(crate) struct SchemaChange {
    /// The topic it came from (which stops if the ODS cannot follow it).
    pub(crate) topic: String,
    /// The ODS table (the source table's name, as for rows).
    pub(crate) table: String,
    pub(crate) source_table: String,
    pub(crate) source: String,
    pub(crate) at: (Lsn, i64),
    pub(crate) statement: String,
    pub(crate) changes: Vec<saiki_core::ddl::Change>,
    pub(crate) shape: Option<saiki_core::ddl::Shape>,
    /// What the ODS does for it, decided by the sink's [`SchemaLog`] when the batch is cut
    /// (empty for a copy already taken in).
    pub(crate) steps: Vec<crate::evolve::Step>,
}

impl<'a> Planner<'a> {
    pub(crate) fn new(key_includes_source: bool, events: Option<Arc<EventTables>>) -> Self {
        Planner {
            key_includes_source,
            events,
            tables: IndexMap::new(),
            commit_times: Vec::new(),
            schema: None,
            schema_changes: Vec::new(),
            streams: StreamOps::default(),
            committed: None,
        }
    }

    /// Plans the staged records of a streamed transaction that committed at `commit_lsn`
    /// (their own records carry none).
    pub(crate) fn committed_at(mut self, commit_lsn: Lsn, commit_ts: Option<&str>) -> Self {
        self.committed = Some((
            commit_lsn,
            commit_ts.and_then(saiki_core::time::parse_rfc3339_utc_micros),
        ));
        self
    }

    /// Reads rows through the schema changes applied so far.
    pub(crate) fn with_schema(mut self, schema: Option<Arc<SchemaLog>>) -> Self {
        self.schema = schema;
        self
    }

    pub(crate) fn schema(&self) -> Option<Arc<SchemaLog>> {
        self.schema.clone()
    }

    /// The event tables this planner materializes events into.
    pub(crate) fn events(&self) -> Option<Arc<EventTables>> {
        self.events.clone()
    }

    /// Adds the message at batch index `idx`.
    pub(crate) fn add(&mut self, idx: usize, msg: &Msg<'a>) -> Outcome {
        let Some(payload) = msg.payload else {
            return Outcome::Skipped; // a tombstone after a delete
        };
        let rec: SinkRecord<'a> = match serde_json::from_slice(payload) {
            Ok(r) => r,
            // The event API's events share the prefix of the change topics (and, for a source
            // schema named `events`, a topic).
            Err(e) => {
                return match event_parts(payload) {
                    Ok(Some(parts)) => self.event(idx, msg, parts),
                    Ok(None) => Outcome::DeadLetter(format!("malformed record: {e}")),
                    Err(reason) => Outcome::DeadLetter(reason),
                }
            }
        };
        if rec.streamed == Some(true) && self.committed.is_none() {
            return match self.streams.add(idx, msg.topic, msg.partition, payload) {
                Taken::Kept => Outcome::Planned,
                Taken::Nothing => Outcome::Skipped,
                Taken::Refused(reason) => Outcome::DeadLetter(reason),
            };
        }
        match rec.action {
            Action::Insert
            | Action::Update
            | Action::Delete
            | Action::Read
            | Action::Truncate
            | Action::Sweep => {}
            Action::SchemaChange => {
                return match self.schema_change(msg.topic, payload, &rec) {
                    Ok(()) => Outcome::Planned,
                    Err(reason) => Outcome::DeadLetter(reason),
                }
            }
            // B, C, M and stream markers carry nothing to materialize.
            _ => return Outcome::Skipped,
        }
        let ts = match self.committed {
            Some((_, ts)) => ts,
            None => rec
                .commit_ts
                .as_deref()
                .and_then(saiki_core::time::parse_rfc3339_utc_micros),
        };
        match self.change(idx, msg, rec) {
            Ok(o) => {
                if let (Outcome::Planned, Some(ts)) = (&o, ts) {
                    self.commit_times.push(ts);
                }
                o
            }
            Err(reason) => Outcome::DeadLetter(reason),
        }
    }

    fn change(
        &mut self,
        idx: usize,
        msg: &Msg<'a>,
        rec: SinkRecord<'a>,
    ) -> Result<Outcome, String> {
        let missing = |what: &str| format!("malformed record: no {what}");
        let source = rec.source.clone().ok_or_else(|| missing("source"))?;
        let schema = rec.schema.as_deref().ok_or_else(|| missing("schema"))?;
        let table = rec.table.as_deref().ok_or_else(|| missing("table"))?;
        let lsn = rec
            .commit_lsn
            .or(self.committed.map(|c| c.0))
            .ok_or_else(|| missing("commit_lsn"))?;
        let seq = rec.seq.ok_or_else(|| missing("seq"))?;
        let source_table = || format!("{schema}.{table}");
        // Borrowed, not cloned: this runs for every row.
        let log = self.schema.as_deref();
        let at = (lsn, seq);
        // The ODS table after the renames the ODS followed.
        let renamed = log
            .and_then(|l| l.renamed_table(table, &source, at))
            .map(str::to_string);
        let table: &str = renamed.as_deref().unwrap_or(table);
        if log.is_some_and(|l| l.table_dropped(table, &source, at)) {
            // Older than its source's DROP TABLE, which the ODS followed.
            return Ok(Outcome::Skipped);
        }
        let by_source = self.key_includes_source;
        let plan_index = |tables: &mut IndexMap<String, TablePlan<'a>>,
                          key: &dyn Fn() -> Vec<String>| {
            match tables.get_index_of(table) {
                Some(i) => i,
                None => {
                    tables
                        .insert_full(
                            table.to_string(),
                            TablePlan::new(table, source_table(), key(), by_source),
                        )
                        .0
                }
            }
        };

        if rec.action == Action::Truncate {
            let i = plan_index(&mut self.tables, &Vec::new);
            let plan = &mut self.tables[i];
            // Changes of this source written before the truncate are gone with it.
            plan.rows
                .retain(|_, r| !(r.source == source && (r.lsn, r.seq) < (lsn, seq)));
            let e = plan
                .truncates
                .entry(source.to_string())
                .or_insert((lsn, seq, Vec::new()));
            if (lsn, seq) > (e.0, e.1) {
                e.0 = lsn;
                e.1 = seq;
            }
            e.2.push(idx);
            return Ok(Outcome::Planned);
        }
        if rec.action == Action::Sweep {
            let sweep = rec.sweep.ok_or_else(|| missing("sweep"))?;
            if sweep.partitions < 1 {
                return Err("malformed record: sweep.partitions must be at least 1".into());
            }
            let i = plan_index(&mut self.tables, &Vec::new);
            self.tables[i].sweeps.push(SweepMark {
                source: source.to_string(),
                before: sweep.before,
                partitions: sweep.partitions,
                topic: msg.topic.to_string(),
                partition: msg.partition,
                msg: idx,
            });
            return Ok(Outcome::Planned);
        }

        let own_key = rec.key.as_ref().ok_or_else(|| missing("key"))?;
        // While sources change their key, rows are keyed by the ODS table's key (evolve.rs).
        let key_names: Vec<&str> = match log.and_then(|l| l.ods_key(table)) {
            Some(k) => k.iter().map(String::as_str).collect(),
            None => own_key.iter().map(|k| k.as_ref()).collect(),
        };
        let key_names = &key_names;
        if key_names.is_empty() {
            return Err(NO_IDENTITY.to_string());
        }
        let ods_name = |n: &str| -> String {
            ods_column(log, table, &source, at, n)
                .unwrap_or(n)
                .to_string()
        };
        let owned = || key_names.iter().map(|k| ods_name(k)).collect::<Vec<_>>();
        let i = plan_index(&mut self.tables, &owned);
        let plan = &mut self.tables[i];
        if plan.key.is_empty() {
            plan.key = owned();
        } else if plan.key.len() != key_names.len()
            || plan
                .key
                .iter()
                .zip(key_names)
                .any(|(a, b)| a.as_str() != *b)
        {
            return Err(format!(
                "key columns of {} changed within a batch from ({}) to ({}): the ODS table keeps its primary key; recreate it if the source key changed",
                source_table(),
                plan.key.join(", "),
                owned().join(", ")
            ));
        }

        let key_of = |f: &Fields<'a>| -> Result<Vec<&'a RawValue>, String> {
            key_names
                .iter()
                .map(|k| match f.get(k) {
                    Some(v) if v.get() == "null" => Err(format!(
                        "key column {k} of {} is null: the ODS cannot key the row",
                        source_table()
                    )),
                    Some(v) => Ok(v),
                    None if own_key.iter().any(|o| o == k) => {
                        Err(format!("malformed record: key column {k} has no value"))
                    }
                    // A delete keyed by its source's new key, while the ODS keeps the old one.
                    None => Err(format!(
                        "a change of {} identifies its row by ({}), but the ODS table is keyed by ({}) until every source has the new key: set REPLICA IDENTITY FULL on the table at the sources during such a migration",
                        source_table(),
                        own_key.join(", "),
                        key_names.join(", ")
                    )),
                })
                .collect()
        };

        // An update that changes the key arrives twice: keyed by the old key (in the old
        // key's partition, where it deletes the old row in order) and by the new key.
        let (op, key, fields) = match rec.action {
            Action::Delete => {
                let id = rec.identity.as_ref().ok_or_else(|| missing("identity"))?;
                (Op::Delete, key_of(id)?, None)
            }
            _ => {
                let cols = rec.columns.as_ref().ok_or_else(|| missing("columns"))?;
                let new_key = key_of(cols)?;
                let old_key = match (&rec.identity, rec.action) {
                    (Some(id), Action::Update) => key_of(id).ok(),
                    _ => None,
                };
                match old_key {
                    Some(old) if !same_values(&old, &new_key) => {
                        let msg_key = msg.key.map(parse_key);
                        if msg_key.as_ref().is_some_and(|k| k == &key_text(&old)) {
                            (Op::Delete, old, None)
                        } else {
                            if msg.key.is_none() {
                                // Not split by the relay: do both here.
                                self.fold(
                                    idx,
                                    table,
                                    source.clone(),
                                    lsn,
                                    seq,
                                    Op::Delete,
                                    old,
                                    None,
                                    &rec,
                                );
                            }
                            (Op::Upsert, new_key, Some(cols))
                        }
                    }
                    _ => (Op::Upsert, new_key, Some(cols)),
                }
            }
        };
        Ok(self.fold(idx, table, source, lsn, seq, op, key, fields, &rec))
    }

    /// Keeps an `L` record for the apply step (after the batch's rows).
    fn schema_change(
        &mut self,
        topic: &str,
        payload: &[u8],
        rec: &SinkRecord<'a>,
    ) -> Result<(), String> {
        let l: saiki_core::ddl::SchemaChangeFields = serde_json::from_slice(payload)
            .map_err(|e| format!("malformed schema change record: {e}"))?;
        let missing = |what: &str| format!("malformed schema change record: no {what}");
        let schema = rec.schema.as_deref().ok_or_else(|| missing("schema"))?;
        let table = rec.table.as_deref().ok_or_else(|| missing("table"))?;
        let source = rec.source.as_deref().ok_or_else(|| missing("source"))?;
        let at = (
            rec.commit_lsn
                .or(self.committed.map(|c| c.0))
                .ok_or_else(|| missing("commit_lsn"))?,
            rec.seq.ok_or_else(|| missing("seq"))?,
        );
        // A source that has not renamed the table yet changes the renamed ODS table.
        let ods_table = self
            .schema
            .as_deref()
            .and_then(|log| log.renamed_table(table, source, at))
            .unwrap_or(table)
            .to_string();
        self.schema_changes.push(SchemaChange {
            topic: topic.to_string(),
            table: ods_table,
            source_table: format!("{schema}.{table}"),
            source: source.to_string(),
            at,
            statement: l.statement,
            changes: l.changes,
            shape: l.shape,
            steps: Vec::new(),
        });
        Ok(())
    }

    /// Plans an event of the event API as a row of its event table: its properties and
    /// metadata as columns, keyed by `eid` or the declared key; the later event of a key
    /// replaces the earlier. Its `_saiki_source` is the Kafka partition it came from and its
    /// position the offset, so that the ordering guard keeps Kafka's order of a key (whose
    /// events share a partition: the event API requires the partition key within the key).
    fn event(
        &mut self,
        idx: usize,
        msg: &Msg<'a>,
        (event_type, version, body, md): (Cow<'a, str>, i32, Fields<'a>, Fields<'a>),
    ) -> Outcome {
        let Some(events) = &self.events else {
            return Outcome::Skipped; // sink.events = false
        };
        let layout = match events.get(&(event_type.to_string(), version)) {
            Some(Ok(l)) => l.clone(),
            Some(Err(reason)) => return Outcome::DeadLetter(reason.clone()),
            None => {
                return Outcome::DeadLetter(format!(
                    "event type {event_type} has no schema version {version} in the event API's registry (ingest.dsn): register it, or set sink.events = false"
                ))
            }
        };
        let plan = match self.tables.get_index_of(&layout.table) {
            Some(i) => &mut self.tables[i],
            None => {
                let plan = TablePlan::new(
                    &layout.table,
                    format!("event type {}", layout.event_type),
                    layout.key.clone(),
                    false,
                );
                let i = self.tables.insert_full(layout.table.clone(), plan).0;
                &mut self.tables[i]
            }
        };
        let mut values = Values(Vec::with_capacity(
            layout.properties.len() + METADATA_COLUMNS.len(),
        ));
        for (name, ty) in &layout.properties {
            let i = plan.typed_column(name, ty);
            values.insert(i, body.get(name).unwrap_or_else(|| json_null()));
        }
        for (column, field, ty) in METADATA_COLUMNS {
            let i = plan.typed_column(column, ty);
            values.insert(i, md.get(field).unwrap_or_else(|| json_null()));
        }
        let mut key = Vec::with_capacity(layout.key.len());
        for k in &layout.key {
            let v = plan
                .columns
                .get_index_of(k)
                .and_then(|i| values.get(i))
                .filter(|v| v.get() != "null");
            match v {
                Some(v) => key.push(v),
                None => {
                    return Outcome::DeadLetter(format!(
                        "event of type {event_type} has no value for its key column {k}"
                    ))
                }
            }
        }
        let source = Cow::Owned(format!("{}/{}", msg.topic, msg.partition));
        let (lsn, seq) = (Lsn(msg.offset.max(0) as u64), 0);
        let row_key = (String::new(), key_text(&key));
        if let Some(p) = plan.rows.get(&row_key) {
            if p.source == source && (lsn, seq) <= (p.lsn, p.seq) {
                return Outcome::Skipped;
            }
        }
        let mut row = NetRow {
            op: Op::Upsert,
            source,
            lsn,
            seq,
            key,
            values,
            msgs: vec![idx],
            born: true,
        };
        if let Some(earlier) = plan.rows.get_mut(&row_key) {
            row.born = earlier.born;
            row.msgs = std::mem::take(&mut earlier.msgs);
            row.msgs.push(idx);
            *earlier = row;
        } else {
            plan.rows.insert(row_key, row);
        }
        if let Some(ts) = md
            .get("received_at")
            .and_then(|t| serde_json::from_str::<Cow<'_, str>>(t.get()).ok())
            .and_then(|t| saiki_core::time::parse_rfc3339_utc_micros(&t))
        {
            self.commit_times.push(ts);
        }
        Outcome::Planned
    }

    #[allow(clippy::too_many_arguments)]
    fn fold(
        &mut self,
        idx: usize,
        table: &str,
        source: Cow<'a, str>,
        lsn: Lsn,
        seq: i64,
        op: Op,
        key: Vec<&'a RawValue>,
        fields: Option<&Fields<'a>>,
        rec: &SinkRecord<'a>,
    ) -> Outcome {
        let Some(plan) = self.tables.get_mut(table) else {
            return Outcome::Skipped;
        };
        let by_source = plan.source_in_key;
        if let Some((tl, ts, _)) = plan.truncates.get(source.as_ref()) {
            if (lsn, seq) < (*tl, *ts) {
                return Outcome::Skipped; // truncated later in this batch
            }
        }
        let types = rec.types;
        let keys = std::mem::take(&mut plan.key);
        let key_idx: Vec<usize> = keys.iter().map(|k| plan.column(k, types)).collect();
        plan.key = keys;
        let row_key = (
            if by_source {
                source.to_string()
            } else {
                String::new()
            },
            key_text(&key),
        );
        let prev = plan.rows.get(&row_key);
        if let Some(p) = prev {
            if p.source == source && (lsn, seq) <= (p.lsn, p.seq) {
                return Outcome::Skipped; // a duplicate or an older replay
            }
        }
        let mut values = Values(Vec::with_capacity(plan.columns.len().max(key.len())));
        for (i, v) in key_idx.iter().zip(&key) {
            values.insert(*i, v);
        }
        let log = self.schema.as_deref().filter(|l| l.affects(table));
        if let Some(f) = fields {
            for (name, v) in &f.0 {
                let Some(column) = ods_column(log, table, &source, (lsn, seq), name) else {
                    continue; // older than its source's drop of the column, which the ODS followed
                };
                let i = plan.column_as(column, name, types);
                values.insert(i, v);
            }
            if let Some(l) = log {
                // A record older than its source's ADD COLUMN reads the default there.
                for (column, v) in l.backfills(table, &source, (lsn, seq)) {
                    let i = plan.column(column, None);
                    if !values.contains(i) {
                        values.insert(i, v);
                    }
                }
            }
            for name in rec.unchanged_toast.iter().flatten() {
                let Some(column) = ods_column(log, table, &source, (lsn, seq), name) else {
                    continue;
                };
                let i = plan.column_as(column, name, types);
                values.remove(i);
                // An unchanged value is the old row's: from the identity (REPLICA IDENTITY
                // FULL logs the old row in full), or from an earlier change of this batch.
                if let Some(v) = rec.identity.as_ref().and_then(|f| f.get(name)) {
                    values.insert(i, v);
                } else if let Some(p) = plan.rows.get(&row_key) {
                    if p.op == Op::Upsert {
                        if let Some(v) = p.values.get(i) {
                            values.insert(i, v);
                        }
                    }
                }
            }
        }
        let mut row = NetRow {
            op,
            source,
            lsn,
            seq,
            key,
            values,
            msgs: Vec::new(),
            born: rec.action == Action::Insert,
        };
        match plan.rows.get_mut(&row_key) {
            Some(earlier) => {
                // The new change replaces the row in place; the message list grows.
                row.born = earlier.born;
                row.msgs = std::mem::take(&mut earlier.msgs);
                row.msgs.push(idx);
                *earlier = row;
            }
            None => {
                row.msgs.push(idx);
                plan.rows.insert(row_key, row);
            }
        }
        Outcome::Planned
    }
}

/// The ODS column of a record's column `name`, borrowed: after the renames the ODS followed,
/// `None` if the ODS dropped it and the record predates its source's drop
/// ([`SchemaLog::column`]); the name itself without a log.
fn ods_column<'n>(
    log: Option<&'n SchemaLog>,
    table: &str,
    source: &str,
    at: (Lsn, i64),
    name: &'n str,
) -> Option<&'n str> {
    match log {
        Some(l) => l.column(table, source, at, name),
        None => Some(name),
    }
}

fn same_values(a: &[&RawValue], b: &[&RawValue]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.get() == y.get())
}

/// A row's identity inside a table: the raw key values, one per line (raw JSON never
/// contains a bare newline).
pub(crate) fn key_text(vals: &[&RawValue]) -> String {
    let mut s = String::new();
    for (i, v) in vals.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(v.get());
    }
    s
}

/// The key text of a Kafka message key `{"col": value, …}` as the relay writes it.
fn parse_key(k: &[u8]) -> String {
    match serde_json::from_slice::<Fields<'_>>(k) {
        Ok(f) => key_text(&f.0.iter().map(|(_, v)| *v).collect::<Vec<_>>()),
        Err(_) => String::new(),
    }
}

// ---------------------------------------------------------------------------------------
// Values: JSON (docs/types.md) → PostgreSQL text input, escaped for COPY text.

/// How a column's values are written, from its ODS type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnKind {
    /// Strings unescaped; numbers, booleans, objects as their JSON text.
    Scalar,
    /// json / jsonb: the JSON text itself.
    Json,
    /// An array type: JSON arrays become `{…}` literals. `json_elements` for json[]/jsonb[]
    /// (elements stay JSON text); `delimiter` is `;` for box[], `,` otherwise.
    Array { json_elements: bool, delimiter: u8 },
}

impl ColumnKind {
    /// From a type name as `format_type` prints it.
    pub(crate) fn of(type_name: &str) -> ColumnKind {
        let t = type_name.trim();
        if let Some(base) = t.strip_suffix("[]") {
            let base = base.trim_end_matches("[]");
            return ColumnKind::Array {
                json_elements: base == "json" || base == "jsonb",
                delimiter: if base == "box" { b';' } else { b',' },
            };
        }
        if t == "json" || t == "jsonb" {
            ColumnKind::Json
        } else {
            ColumnKind::Scalar
        }
    }
}

/// Appends `v` as a COPY text field for a column of `kind`.
pub(crate) fn write_copy_value(out: &mut Vec<u8>, v: &RawValue, kind: ColumnKind) {
    let raw = v.get();
    if raw == "null" {
        out.extend_from_slice(b"\\N");
        return;
    }
    match kind {
        ColumnKind::Json => copy_escape(out, raw.as_bytes()),
        ColumnKind::Array {
            json_elements,
            delimiter,
        } if raw.starts_with('[') => {
            let mut lit = Vec::with_capacity(raw.len() + 2);
            array_literal(&mut lit, v, json_elements, delimiter);
            copy_escape(out, &lit);
        }
        _ => {
            if raw.starts_with('"') {
                match serde_json::from_str::<Cow<'_, str>>(raw) {
                    Ok(s) => copy_escape(out, s.as_bytes()),
                    Err(_) => copy_escape(out, raw.as_bytes()),
                }
            } else {
                copy_escape(out, raw.as_bytes());
            }
        }
    }
}

/// A PostgreSQL array literal from a JSON array, elements kept as raw text (numbers keep
/// their digits). Nested arrays are dimensions.
fn array_literal(out: &mut Vec<u8>, v: &RawValue, json_elements: bool, delim: u8) {
    let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(v.get()) else {
        out.extend_from_slice(v.get().as_bytes());
        return;
    };
    out.push(b'{');
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            out.push(delim);
        }
        let raw = it.get();
        match raw.as_bytes().first() {
            _ if raw == "null" => out.extend_from_slice(b"NULL"),
            Some(b'[') => array_literal(out, it, json_elements, delim),
            _ if json_elements => quote_element(out, raw.as_bytes()),
            Some(b'"') => match serde_json::from_str::<Cow<'_, str>>(raw) {
                Ok(s) => quote_element(out, s.as_bytes()),
                Err(_) => quote_element(out, raw.as_bytes()),
            },
            Some(b'{') => quote_element(out, raw.as_bytes()),
            _ => out.extend_from_slice(raw.as_bytes()),
        }
    }
    out.push(b'}');
}

fn quote_element(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// COPY text escaping: backslash, newline, carriage return, tab.
pub(crate) fn copy_escape(out: &mut Vec<u8>, s: &[u8]) {
    for &b in s {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str) -> Vec<u8> {
        json.as_bytes().to_vec()
    }

    /// An insert or update record of table t (id, v); inserts carry `types`.
    fn row_change(action: &str, src: &str, lsn: u64, seq: i64, id: i64, v: &str) -> Vec<u8> {
        let types = if action == "I" {
            r#","types":{"id":"integer","v":"text"}"#
        } else {
            ""
        };
        rec(&format!(
            r#"{{"action":"{action}","xid":1,"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}","seq":{seq},"schema":"public","table":"t","key":["id"],"columns":{{"id":{id},"v":{v}}}{types},"source":"{src}"}}"#
        ))
    }

    fn ins(src: &str, lsn: u64, seq: i64, id: i64, v: &str) -> Vec<u8> {
        row_change("I", src, lsn, seq, id, v)
    }

    fn del(src: &str, lsn: u64, seq: i64, id: i64) -> Vec<u8> {
        rec(&format!(
            r#"{{"action":"D","xid":1,"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}","seq":{seq},"schema":"public","table":"t","key":["id"],"identity":{{"id":{id}}},"source":"{src}"}}"#
        ))
    }

    fn plan_of<'a>(msgs: &'a [Vec<u8>], by_source: bool) -> (Planner<'a>, Vec<Outcome>) {
        plan_in(Planner::new(by_source, None), "saiki.public.t", msgs)
    }

    /// Adds `msgs` (partition 0, offsets 0, 1, …) of `topic` to `p`.
    fn plan_in<'a>(
        mut p: Planner<'a>,
        topic: &'static str,
        msgs: &'a [Vec<u8>],
    ) -> (Planner<'a>, Vec<Outcome>) {
        let outs = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                p.add(
                    i,
                    &Msg {
                        topic,
                        partition: 0,
                        offset: i as i64,
                        key: None,
                        payload: Some(m),
                    },
                )
            })
            .collect();
        (p, outs)
    }

    fn value_of(p: &Planner<'_>, src: &str, id: i64, col: &str) -> Option<String> {
        let t = &p.tables["t"];
        let row = &t.rows[&(src.to_string(), id.to_string())];
        let i = t.columns.get_index_of(col)?;
        row.values.get(i).map(|v| v.get().to_string())
    }

    #[test]
    fn later_changes_of_a_row_fold_into_one() {
        let msgs = vec![
            ins("a", 0x10, 1, 1, "\"x\""),
            ins("a", 0x20, 1, 1, "\"y\""),
            ins("a", 0x20, 2, 2, "\"z\""),
        ];
        let (p, outs) = plan_of(&msgs, true);
        assert!(outs.iter().all(|o| *o == Outcome::Planned));
        let t = &p.tables["t"];
        assert_eq!(t.rows.len(), 2);
        assert_eq!(value_of(&p, "a", 1, "v").as_deref(), Some("\"y\""));
        assert_eq!(t.rows[&("a".to_string(), "1".to_string())].msgs, vec![0, 1]);
        assert_eq!(t.columns["v"].type_name.as_deref(), Some("text"));
    }

    fn upd(src: &str, lsn: u64, seq: i64, id: i64, v: &str) -> Vec<u8> {
        row_change("U", src, lsn, seq, id, v)
    }

    #[test]
    fn a_row_is_born_in_the_batch_only_if_its_first_change_there_is_an_insert() {
        let msgs = vec![
            ins("a", 0x10, 1, 1, "\"x\""),
            upd("a", 0x20, 1, 1, "\"y\""),
            upd("a", 0x20, 2, 2, "\"z\""),
            ins("a", 0x20, 3, 2, "\"w\""),
            ins("a", 0x30, 1, 3, "\"v\""),
            del("a", 0x30, 2, 3),
            ins("a", 0x30, 3, 3, "\"u\""),
        ];
        let (p, _) = plan_of(&msgs, true);
        let born = |id: i64| p.tables["t"].rows[&("a".to_string(), id.to_string())].born;
        assert!(born(1), "inserted, then updated: still new to the ODS");
        assert!(
            !born(2),
            "updated first: the row was there before the batch"
        );
        assert!(born(3), "inserted, deleted, inserted again");
    }

    #[test]
    fn duplicates_and_older_replays_are_dropped() {
        let msgs = vec![
            ins("a", 0x20, 1, 1, "\"new\""),
            ins("a", 0x10, 1, 1, "\"old\""),
            ins("a", 0x20, 1, 1, "\"new\""),
        ];
        let (p, outs) = plan_of(&msgs, true);
        assert_eq!(outs[1], Outcome::Skipped);
        assert_eq!(outs[2], Outcome::Skipped);
        assert_eq!(value_of(&p, "a", 1, "v").as_deref(), Some("\"new\""));
    }

    #[test]
    fn shards_with_colliding_keys_stay_apart_when_the_key_includes_the_source() {
        let msgs = vec![ins("a", 0x10, 1, 1, "\"a\""), ins("b", 0x10, 1, 1, "\"b\"")];
        let (p, _) = plan_of(&msgs, true);
        assert_eq!(p.tables["t"].rows.len(), 2);
        let (p, _) = plan_of(&msgs, false);
        assert_eq!(
            p.tables["t"].rows.len(),
            1,
            "one ODS row: the later source wins"
        );
    }

    #[test]
    fn a_delete_after_an_insert_is_a_delete() {
        let msgs = vec![ins("a", 0x10, 1, 1, "\"x\""), del("a", 0x20, 1, 1)];
        let (p, _) = plan_of(&msgs, true);
        let row = &p.tables["t"].rows[&("a".to_string(), "1".to_string())];
        assert_eq!(row.op, Op::Delete);
    }

    #[test]
    fn a_truncate_drops_earlier_changes_of_its_source_only() {
        let t = rec(
            r#"{"action":"T","xid":1,"lsn":"0/30","commit_lsn":"0/30","seq":1,"schema":"public","table":"t","truncate":{"tables":[["public","t"]],"cascade":false,"restart_identity":false},"source":"a"}"#,
        );
        let msgs = vec![
            ins("a", 0x10, 1, 1, "\"x\""),
            ins("b", 0x10, 1, 1, "\"x\""),
            ins("a", 0x40, 1, 2, "\"after\""),
            t,
            ins("a", 0x20, 1, 3, "\"late partition\""),
        ];
        let (p, outs) = plan_of(&msgs, true);
        assert_eq!(outs[4], Outcome::Skipped, "written before the truncate");
        let tp = &p.tables["t"];
        let keys: Vec<_> = tp.rows.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                ("b".to_string(), "1".to_string()),
                ("a".to_string(), "2".to_string())
            ]
        );
        assert_eq!(tp.truncates["a"].0, Lsn(0x30));
    }

    #[test]
    fn the_end_of_a_resync_is_planned_after_the_rows_and_a_malformed_one_is_a_dead_letter() {
        let w = rec(
            r#"{"action":"W","xid":1,"lsn":"0/50","commit_lsn":"0/50","seq":2,"schema":"public","table":"t","sweep":{"before":"0/30","partitions":2},"source":"a"}"#,
        );
        let bad = rec(
            r#"{"action":"W","xid":1,"lsn":"0/50","commit_lsn":"0/50","seq":2,"schema":"public","table":"t","sweep":{"before":"0/30","partitions":0},"source":"a"}"#,
        );
        let none = rec(
            r#"{"action":"W","xid":1,"lsn":"0/50","commit_lsn":"0/50","seq":2,"schema":"public","table":"t","source":"a"}"#,
        );
        let msgs = vec![ins("a", 0x50, 1, 1, "\"x\""), w, bad, none];
        let (p, outs) = plan_of(&msgs, true);
        assert_eq!(outs[1], Outcome::Planned);
        assert!(
            matches!(&outs[2], Outcome::DeadLetter(r) if r.contains("partitions")),
            "{:?}",
            outs[2]
        );
        assert!(
            matches!(&outs[3], Outcome::DeadLetter(r) if r.contains("no sweep")),
            "{:?}",
            outs[3]
        );
        let tp = &p.tables["t"];
        assert_eq!(
            tp.rows.len(),
            1,
            "the row stays: the sweep is the ODS's to apply"
        );
        assert_eq!(tp.sweeps.len(), 1);
        assert_eq!(tp.sweeps[0].before, Lsn(0x30));
        assert_eq!(tp.sweeps[0].partitions, 2);
        assert_eq!(tp.sources(), vec!["a"]);
        assert_eq!(tp.message_indexes(), vec![0, 1]);
    }

    #[test]
    fn unchanged_toast_is_carried_over_or_left_absent() {
        let upd = rec(
            r#"{"action":"U","xid":1,"lsn":"0/20","commit_lsn":"0/20","seq":1,"schema":"public","table":"t","key":["id"],"columns":{"id":1},"unchanged_toast":["v"],"source":"a"}"#,
        );
        let alone = [upd.clone()];
        let (p, _) = plan_of(&alone, true);
        assert_eq!(
            value_of(&p, "a", 1, "v"),
            None,
            "absent: the ODS keeps its value"
        );
        let both = [ins("a", 0x10, 1, 1, "\"big\""), upd];
        let (p, _) = plan_of(&both, true);
        assert_eq!(value_of(&p, "a", 1, "v").as_deref(), Some("\"big\""));
        let full = rec(
            r#"{"action":"U","xid":1,"lsn":"0/20","commit_lsn":"0/20","seq":1,"schema":"public","table":"t","key":["id"],"columns":{"id":1},"identity":{"id":1,"v":"old row"},"unchanged_toast":["v"],"source":"a"}"#,
        );
        let full = [full];
        let (p, _) = plan_of(&full, true);
        assert_eq!(value_of(&p, "a", 1, "v").as_deref(), Some("\"old row\""));
    }

    #[test]
    fn a_key_change_deletes_the_old_row_in_the_old_keys_partition() {
        let upd = rec(
            r#"{"action":"U","xid":1,"lsn":"0/20","commit_lsn":"0/20","seq":1,"schema":"public","table":"t","key":["id"],"columns":{"id":2,"v":"x"},"identity":{"id":1},"source":"a"}"#,
        );
        let mut p = Planner::new(true, None);
        let old = Msg {
            topic: "saiki.public.t",
            partition: 0,
            offset: 0,
            key: Some(br#"{"id":1}"#),
            payload: Some(&upd),
        };
        let new = Msg {
            key: Some(br#"{"id":2}"#),
            ..old
        };
        p.add(0, &old);
        p.add(1, &new);
        let t = &p.tables["t"];
        assert_eq!(t.rows[&("a".into(), "1".into())].op, Op::Delete);
        assert_eq!(t.rows[&("a".into(), "2".into())].op, Op::Upsert);
        // Without a message key (not split by the relay), one record does both.
        let (p, _) = plan_of(std::slice::from_ref(&upd), true);
        assert_eq!(p.tables["t"].rows.len(), 2);
    }

    #[test]
    fn unappliable_records_get_a_reason() {
        let nokey = rec(
            r#"{"action":"I","xid":1,"lsn":"0/10","commit_lsn":"0/10","seq":1,"schema":"public","table":"t","key":[],"columns":{"v":1},"source":"a"}"#,
        );
        let nullkey = ins("a", 0x10, 1, 0, "1");
        let nullkey = String::from_utf8(nullkey)
            .unwrap()
            .replace("\"id\":0", "\"id\":null")
            .into_bytes();
        let (_, outs) = plan_of(
            &[
                b"{not json".to_vec(),
                nokey,
                nullkey,
                rec(r#"{"action":"B","xid":1,"lsn":"0/1"}"#),
            ],
            true,
        );
        assert!(matches!(&outs[0], Outcome::DeadLetter(r) if r.starts_with("malformed record")));
        assert_eq!(outs[1], Outcome::DeadLetter(NO_IDENTITY.to_string()));
        assert!(matches!(&outs[2], Outcome::DeadLetter(r) if r.contains("is null")));
        assert_eq!(outs[3], Outcome::Skipped);
    }

    /// Plans event messages (all from partition 0, offsets 0, 1, …) against known layouts.
    fn plan_events<'a>(
        msgs: &'a [Vec<u8>],
        events: Option<EventTables>,
    ) -> (Planner<'a>, Vec<Outcome>) {
        plan_in(
            Planner::new(true, events.map(Arc::new)),
            "saiki.events.parcel.packed",
            msgs,
        )
    }

    fn layouts() -> EventTables {
        let schema = serde_json::json!({"required": ["parcel_id"], "properties": {
            "parcel_id": {"type": "string"}, "items": {"type": "integer"}}});
        let mut t = EventTables::new();
        for (name, key) in [
            ("parcel.packed", None),
            ("stock.level", Some(vec!["/parcel_id".to_string()])),
        ] {
            let l = crate::event_table::layout(name, &schema, key.as_deref()).unwrap();
            t.insert((name.to_string(), 1), Ok(Arc::new(l)));
        }
        t.insert(
            ("bad.one".into(), 1),
            Err("cannot be an ODS table: because".into()),
        );
        t
    }

    fn event(ty: &str, eid: &str, parcel: &str, items: i64) -> Vec<u8> {
        rec(&format!(
            r#"{{"parcel_id":"{parcel}","items":{items},"metadata":{{"eid":"{eid}","event_type":"{ty}","version":"1","received_at":"2026-12-01T08:00:00.000000Z"}}}}"#
        ))
    }

    #[test]
    fn events_are_skipped_when_the_sink_does_not_materialize_them() {
        let msgs = [event("parcel.packed", "e1", "P1", 1)];
        let (p, outs) = plan_events(&msgs, None);
        assert_eq!(outs, [Outcome::Skipped]);
        assert!(p.tables.is_empty());
    }

    #[test]
    fn events_become_rows_of_their_table_once_per_eid() {
        let msgs = [
            event("parcel.packed", "e1", "P1", 1),
            event("parcel.packed", "e2", "P2", 2),
            event("parcel.packed", "e1", "P1", 1), // a copy: the same row
        ];
        let (p, outs) = plan_events(&msgs, Some(layouts()));
        assert_eq!(outs, [Outcome::Planned, Outcome::Planned, Outcome::Planned]);
        let t = &p.tables["ev_parcel_packed"];
        assert_eq!(t.key, ["eid"]);
        assert!(!t.source_in_key);
        assert_eq!(t.rows.len(), 2);
        let cols: Vec<(&str, Option<&str>)> = t
            .columns
            .values()
            .map(|c| (c.name.as_str(), c.type_name.as_deref()))
            .collect();
        assert_eq!(
            cols,
            [
                ("parcel_id", Some("text")),
                ("items", Some("numeric")),
                ("eid", Some("uuid")),
                ("occurred_at", Some("timestamptz")),
                ("received_at", Some("timestamptz")),
                ("flow_id", Some("text")),
                ("schema_version", Some("int")),
            ]
        );
        let row = &t.rows[&(String::new(), "\"e1\"".to_string())];
        assert_eq!(
            (row.source.as_ref(), row.lsn, row.msgs.clone()),
            ("saiki.events.parcel.packed/0", Lsn(2), vec![0, 2])
        );
        // Absent metadata is null, not absent: the row is the event, whole.
        assert_eq!(row.values.get(3).map(RawValue::get), Some("null"));
        assert_eq!(p.commit_times.len(), 3);
    }

    #[test]
    fn events_with_a_declared_key_keep_the_latest_per_key() {
        let msgs = [
            event("stock.level", "e1", "A", 1),
            event("stock.level", "e2", "B", 2),
            event("stock.level", "e3", "A", 3),
        ];
        let (p, _) = plan_events(&msgs, Some(layouts()));
        let t = &p.tables["ev_stock_level"];
        assert_eq!(t.key, ["parcel_id"]);
        let a = &t.rows[&(String::new(), "\"A\"".to_string())];
        assert_eq!(a.values.get(1).map(RawValue::get), Some("3"));
        assert_eq!(t.rows.len(), 2);
    }

    #[test]
    fn events_the_sink_cannot_place_are_dead_lettered_with_the_reason() {
        let msgs = [
            event("nope", "e1", "P1", 1),
            event("bad.one", "e1", "P1", 1),
            rec(r#"{"parcel_id":"P1","metadata":{"eid":"e","event_type":"parcel.packed"}}"#),
            rec(r#"{"items":1,"metadata":{"eid":"e","event_type":"stock.level","version":"1"}}"#),
            rec(r#"{"parcel_id":"P1","metadata":{"eid":"e"}}"#),
            rec(r#"{"action":"X","metadata":{"event_type":"t"}}"#),
        ];
        let (_, outs) = plan_events(&msgs, Some(layouts()));
        let reasons: Vec<String> = outs
            .iter()
            .map(|o| match o {
                Outcome::DeadLetter(r) => r.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert!(
            reasons[0].contains("has no schema version 1"),
            "{}",
            reasons[0]
        );
        assert!(reasons[1].contains("because"), "{}", reasons[1]);
        assert!(reasons[2].contains("metadata.version"), "{}", reasons[2]);
        assert!(
            reasons[3].contains("no value for its key column parcel_id"),
            "{}",
            reasons[3]
        );
        assert!(reasons[4].starts_with("malformed record"), "{}", reasons[4]);
        assert!(reasons[5].starts_with("malformed record"), "{}", reasons[5]);
    }

    fn copy_of(raw: &str, kind: ColumnKind) -> String {
        let v: &RawValue = serde_json::from_str(raw).unwrap();
        let mut out = Vec::new();
        write_copy_value(&mut out, v, kind);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn values_become_copy_text() {
        use ColumnKind::*;
        assert_eq!(copy_of("null", Scalar), "\\N");
        assert_eq!(copy_of("12.50", Scalar), "12.50");
        assert_eq!(copy_of("\"a\\tb\\n\\\\\"", Scalar), "a\\tb\\n\\\\");
        assert_eq!(copy_of("\"NaN\"", Scalar), "NaN");
        assert_eq!(copy_of("{\"a\": [1, \"x\"]}", Json), "{\"a\": [1, \"x\"]}");
        assert_eq!(copy_of("\"\\\\x0aff\"", Scalar), "\\\\x0aff");
        let arr = Array {
            json_elements: false,
            delimiter: b',',
        };
        assert_eq!(copy_of("[[1,2],[3,null]]", arr), "{{1,2},{3,NULL}}");
        assert_eq!(
            copy_of("[1.50,\"NaN\"]", arr),
            "{1.50,\"NaN\"}",
            "digits kept"
        );
        assert_eq!(
            copy_of("[\"a\\\"b\",\"c,d\"]", arr),
            "{\"a\\\\\"b\",\"c,d\"}"
        );
        let jarr = Array {
            json_elements: true,
            delimiter: b',',
        };
        assert_eq!(
            copy_of("[{\"a\":1},\"s\"]", jarr),
            "{\"{\\\\\"a\\\\\":1}\",\"\\\\\"s\\\\\"\"}"
        );
        assert_eq!(
            ColumnKind::of("box[]"),
            Array {
                json_elements: false,
                delimiter: b';'
            }
        );
        assert_eq!(ColumnKind::of("jsonb"), Json);
        assert_eq!(ColumnKind::of("character varying(20)"), Scalar);
    }

    mod model {
        //! The fold against the plain model: apply records one at a time with the guard.
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        enum Ch {
            Ins(i64, i64),
            Del(i64),
            Trunc,
        }

        fn change() -> impl Strategy<Value = Ch> {
            prop_oneof![
                6 => (0..5i64, 0..100i64).prop_map(|(k, v)| Ch::Ins(k, v)),
                2 => (0..5i64).prop_map(Ch::Del),
                1 => Just(Ch::Trunc),
            ]
        }

        type Ods = BTreeMap<i64, (i64, u64, i64)>; // key → (value, lsn, seq)

        fn apply_one(ods: &mut Ods, ch: &Ch, lsn: u64, seq: i64) {
            match ch {
                Ch::Ins(k, v) => match ods.get(k) {
                    Some(&(_, l, s)) if (l, s) >= (lsn, seq) => {}
                    _ => {
                        ods.insert(*k, (*v, lsn, seq));
                    }
                },
                Ch::Del(k) => {
                    if let Some(&(_, l, s)) = ods.get(k) {
                        if (l, s) < (lsn, seq) {
                            ods.remove(k);
                        }
                    }
                }
                Ch::Trunc => ods.retain(|_, (_, l, s)| (*l, *s) >= (lsn, seq)),
            }
        }

        fn encode(ch: &Ch, lsn: u64, seq: i64) -> Vec<u8> {
            match ch {
                Ch::Ins(k, v) => ins("a", lsn, seq, *k, &v.to_string()),
                Ch::Del(k) => del("a", lsn, seq, *k),
                Ch::Trunc => rec(&format!(
                    r#"{{"action":"T","xid":1,"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}","seq":{seq},"schema":"public","table":"t","source":"a"}}"#
                )),
            }
        }

        fn apply_plan(ods: &mut Ods, p: &Planner<'_>) {
            let Some(t) = p.tables.get("t") else { return };
            if let Some((l, s, _)) = t.truncates.get("a") {
                ods.retain(|_, (_, ol, os)| (*ol, *os) >= (l.0, *s));
            }
            let vi = t.columns.get_index_of("v");
            for row in t.rows.values() {
                let k: i64 = row.key[0].get().parse().unwrap();
                let guard_ok = match ods.get(&k) {
                    Some(&(_, l, s)) => (l, s) < (row.lsn.0, row.seq),
                    None => true,
                };
                match row.op {
                    Op::Delete if guard_ok => {
                        ods.remove(&k);
                    }
                    Op::Upsert if guard_ok => {
                        let v: i64 = row.values.get(vi.unwrap()).unwrap().get().parse().unwrap();
                        ods.insert(k, (v, row.lsn.0, row.seq));
                    }
                    _ => {}
                }
            }
        }

        proptest! {
            /// A stream of transactions, replayed from an earlier point (as after a relay
            /// crash), cut into batches anywhere: the planned batches leave the ODS exactly as
            /// applying each record alone does.
            #[test]
            fn planned_batches_equal_one_by_one_application(
                txs in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..12),
                replay_from in 0usize..12,
                cuts in prop::collection::vec(1usize..8, 1..6),
            ) {
                let mut stream = Vec::new();
                for (t, chs) in txs.iter().enumerate() {
                    for (s, ch) in chs.iter().enumerate() {
                        stream.push((ch.clone(), 0x10 * (t as u64 + 1), s as i64 + 1));
                    }
                }
                let start = replay_from.min(stream.len());
                let mut replayed = stream.clone();
                replayed.extend(stream[start..].iter().cloned());

                let mut model = Ods::new();
                for (ch, l, s) in &replayed {
                    apply_one(&mut model, ch, *l, *s);
                }

                let encoded: Vec<Vec<u8>> = replayed.iter().map(|(c, l, s)| encode(c, *l, *s)).collect();
                let mut ods = Ods::new();
                let mut i = 0;
                let mut cut = cuts.iter().cycle();
                while i < encoded.len() {
                    let n = (*cut.next().unwrap()).min(encoded.len() - i);
                    let (p, _) = plan_of(&encoded[i..i + n], true);
                    apply_plan(&mut ods, &p);
                    i += n;
                }
                let strip = |m: &Ods| m.iter().map(|(k, (v, _, _))| (*k, *v)).collect::<Vec<_>>();
                prop_assert_eq!(strip(&ods), strip(&model));
            }
        }
    }
}
