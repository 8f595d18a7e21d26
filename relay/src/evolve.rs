//! Schema changes of the sources as a table fed by several of them follows them (DESIGN.md
//! §7, docs/sink.md "Schema changes", docs/lake.md "Schema changes"): what the sink does with
//! the `L` records in the ODS, and the lake in a change-log table. Pure: the sink's planner
//! and the lake ask [`SchemaLog`] how to read a row record, [`SchemaLog::record`] decides what
//! an `L` record does to the table, and the ODS connection (or the lake's catalog) runs those
//! [`Step`]s. The lake keeps every column (`OnDrop::Keep`: it is the history) and follows
//! renames and type changes only.
//!
//! One ODS table holds the rows of every source (shard), and the shards migrate one after the
//! other, so during a migration rows of both shapes arrive. The rules, per source and by
//! position `(commit_lsn, seq)`:
//!
//! - **Renames are table-wide.** The first source's `rename_column` (or `rename_table`)
//!   renames the ODS column (table); from then on a record that still carries the old name (a
//!   shard that has not migrated, or a row of a lagging partition) has it read as the new
//!   name, unless its own source renamed at or before the record (then the old name is a new
//!   column, or table, of its own).
//! - **A column added with a default is backfilled per source.** The source's rows written
//!   before its `add_column` read the default there (`missing`): the ODS rows of that source
//!   older than the `L` get it when the `L` is applied, and a record of that source older than
//!   the `L` that arrives later (another partition) gets it added by the planner.
//! - **A drop waits for the last source.** A column (table) leaves the ODS when every source
//!   known to write the table has dropped it, under `sink.on_drop = "drop"`; until then the
//!   shards that still have it keep writing it. Once it is gone, a record older than its
//!   source's drop (a lagging partition) does not bring it back: its value is left out.
//! - **A key change waits for the last source too.** The ODS keeps its primary key until every
//!   known source has the same new one; meanwhile rows are keyed by the ODS's key, read from
//!   their columns (an insert or update carries them all).
//!
//! Invariant: applying a source's rows and `L` records in any interleaving that keeps each
//! partition's order leaves the ODS as applying them in the source's order would. The sink
//! cuts a batch after every `L` record, so that no record after an `L` in its partition is
//! planned before the `L` is known.

use std::collections::{HashMap, HashSet};

use saiki_core::ddl::Change;
use saiki_core::Lsn;
use serde_json::value::RawValue;

use crate::config::OnDrop;

/// A position in a source's change stream.
pub(crate) type Pos = (Lsn, i64);

#[derive(Debug, Clone, Default)]
struct Rename {
    from: String,
    to: String,
    /// Each source's own rename: records of that source from there on use the new name.
    by_source: HashMap<String, Pos>,
}

impl Rename {
    /// Whether a record of `source` at `at` that says `name` means the new name.
    fn maps(&self, name: &str, source: &str, at: Pos) -> bool {
        self.from == name && self.by_source.get(source).is_none_or(|p| *p > at)
    }

    /// Takes in a source's rename; true if it is the first (the ODS renames).
    fn take(renames: &mut Vec<Rename>, from: &str, to: &str, source: &str, at: Pos) -> bool {
        match renames.iter_mut().find(|r| r.from == from && r.to == to) {
            Some(r) => {
                r.by_source.entry(source.to_string()).or_insert(at);
                false
            }
            None => {
                renames.push(Rename {
                    from: from.to_string(),
                    to: to.to_string(),
                    by_source: HashMap::from([(source.to_string(), at)]),
                });
                true
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Backfill {
    column: String,
    /// The JSON value rows before the `L` read (a string: PostgreSQL's text of the value).
    value: &'static RawValue,
    at: Pos,
}

#[derive(Debug, Clone, Default)]
struct TableLog {
    renames: Vec<Rename>,
    backfills: HashMap<String, Vec<Backfill>>,
    applied: HashSet<(String, Pos)>,
    /// The sources known to write the table: its watermarks and the batch's rows when an
    /// `L` record is taken in, and the sources of its `L` records.
    sources: HashSet<String>,
    /// Per column, the sources that dropped it and where (the source adding the name again
    /// takes its drop back).
    dropped: HashMap<String, HashMap<String, Pos>>,
    /// Columns the ODS dropped.
    gone: HashSet<String>,
    /// The sources that dropped the table, and where.
    table_dropped: HashMap<String, Pos>,
    /// The ODS dropped the table.
    table_gone: bool,
    /// Each source's key after its last key change.
    keys: HashMap<String, Vec<String>>,
    /// The ODS table's key once some source changed its key: the old key until every known
    /// source has the new one.
    ods_key: Option<Vec<String>>,
}

impl TableLog {
    /// Whether ODS column `column` is gone and a record of `source` at `at` predates its
    /// source's drop of it.
    fn dropped_for(&self, column: &str, source: &str, at: Pos) -> bool {
        self.gone.contains(column)
            && self
                .dropped
                .get(column)
                .and_then(|by| by.get(source))
                .is_some_and(|d| at < *d)
    }

    fn affects(&self) -> bool {
        !self.renames.is_empty()
            || !self.backfills.is_empty()
            || !self.gone.is_empty()
            || self.table_gone
            || self.ods_key.is_some()
    }
}

/// The `L` records the sink has applied, by ODS table: how to read later row records, and
/// what the ODS does for the next one.
#[derive(Debug, Clone, Default)]
pub(crate) struct SchemaLog {
    on_drop: OnDrop,
    tables: HashMap<String, TableLog>,
    /// ODS table renames (the last part of `schema.table`: ODS tables are named by it).
    table_renames: Vec<Rename>,
}

/// Backfill values live as long as the process: one small string per `add_column` with a
/// default, so leaking them is bounded by the number of migrations, and lets the planner hand
/// them out beside values borrowed from messages.
fn leak_json_string(s: &str) -> &'static RawValue {
    Box::leak(serde_json::value::to_raw_value(s).expect("a string serializes to JSON"))
}

/// The ODS table name of a `schema.table` (DESIGN.md §5: the table's name).
fn ods_table_name(qualified: &str) -> &str {
    qualified.rsplit_once('.').map_or(qualified, |(_, t)| t)
}

impl SchemaLog {
    pub(crate) fn new(on_drop: OnDrop) -> Self {
        SchemaLog {
            on_drop,
            ..SchemaLog::default()
        }
    }

    /// Whether this `L` record (source and position) was taken in.
    #[cfg(test)]
    pub(crate) fn applied(&self, table: &str, source: &str, at: Pos) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.applied.contains(&(source.to_string(), at)))
    }

    /// Whether `source` is known to write ODS table `table`.
    #[cfg(test)]
    pub(crate) fn knows(&self, table: &str, source: &str) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.sources.contains(source))
    }

    /// `source` writes ODS table `table` (a drop or a key change waits for it too).
    pub(crate) fn saw(&mut self, table: &str, source: &str) {
        self.tables
            .entry(table.to_string())
            .or_default()
            .sources
            .insert(source.to_string());
    }

    /// Takes in an `L` record of `source` at `at` for ODS table `table`, and says what the
    /// ODS does for it; `None` if it was taken in before (a copy from another partition).
    pub(crate) fn record(
        &mut self,
        table: &str,
        source: &str,
        at: Pos,
        changes: &[Change],
    ) -> Option<Vec<Step>> {
        let key = (source.to_string(), at);
        if self
            .tables
            .get(table)
            .is_some_and(|t| t.applied.contains(&key))
        {
            return None;
        }
        let mut steps = Vec::new();
        // The ODS table takes its new name before anything else of the record happens to it.
        for c in changes {
            if let Change::RenameTable { from, to } = c {
                let (from, to) = (ods_table_name(from), ods_table_name(to));
                if from != to && Rename::take(&mut self.table_renames, from, to, source, at) {
                    if let Some(log) = self.tables.remove(from) {
                        self.tables.entry(to.to_string()).or_insert(log);
                    }
                    steps.push(Step::RenameTable {
                        from: from.to_string(),
                        to: to.to_string(),
                    });
                }
            }
        }
        steps.push(Step::Create);
        let on_drop = self.on_drop;
        let t = self.tables.entry(table.to_string()).or_default();
        t.applied.insert(key);
        t.sources.insert(source.to_string());
        for c in changes {
            match c {
                Change::CreateTable => {
                    t.table_dropped.remove(source);
                    t.table_gone = false;
                }
                Change::AddColumn {
                    column,
                    type_name,
                    missing,
                    volatile,
                    ..
                } => {
                    if let Some(d) = t.dropped.get_mut(column) {
                        d.remove(source);
                    }
                    t.gone.remove(column);
                    steps.push(Step::AddColumn {
                        column: column.clone(),
                        type_name: type_name.clone(),
                    });
                    if let Some(m) = missing {
                        t.backfills
                            .entry(source.to_string())
                            .or_default()
                            .push(Backfill {
                                column: column.clone(),
                                value: leak_json_string(m),
                                at,
                            });
                        steps.push(Step::Backfill {
                            column: column.clone(),
                            value: m.clone(),
                        });
                    } else if *volatile {
                        steps.push(Step::Noted {
                            what: format!("column {column} was added with a volatile default: the source relay snapshots the table again, which brings the values of the rows that existed before"),
                        });
                    }
                }
                Change::RenameColumn { from, to } => {
                    if Rename::take(&mut t.renames, from, to, source, at) {
                        steps.push(Step::RenameColumn {
                            from: from.clone(),
                            to: to.clone(),
                        });
                    }
                }
                Change::AlterType { column, to, .. } => steps.push(Step::AlterType {
                    column: column.clone(),
                    type_name: to.clone(),
                }),
                Change::DropColumn { column } => {
                    let by = t.dropped.entry(column.clone()).or_default();
                    by.insert(source.to_string(), at);
                    let holders = holders(&t.sources, |s| by.contains_key(s));
                    let what = format!("column {column}");
                    if let Some(noted) = kept(on_drop, &holders, &what, source) {
                        steps.push(noted);
                    } else {
                        t.gone.insert(column.clone());
                        steps.push(Step::DropColumn {
                            column: column.clone(),
                        });
                    }
                }
                Change::DropTable => {
                    t.table_dropped.insert(source.to_string(), at);
                    let holders = holders(&t.sources, |s| t.table_dropped.contains_key(s));
                    if let Some(noted) = kept(on_drop, &holders, "the table", source) {
                        steps.push(noted);
                    } else {
                        t.table_gone = true;
                        steps.push(Step::DropTable);
                    }
                }
                Change::Key { from, to } => {
                    if t.ods_key.is_none() && !from.is_empty() {
                        t.ods_key = Some(from.clone());
                    }
                    t.keys.insert(source.to_string(), to.clone());
                    let holders = holders(&t.sources, |s| t.keys.get(s) == Some(to));
                    if to.is_empty() {
                        steps.push(Step::Noted {
                            what: format!("source {source} dropped the table's primary key: the ODS keeps its key, read from each row's columns"),
                        });
                    } else if !holders.is_empty() {
                        steps.push(Step::Noted {
                            what: format!("the key changed to ({}) at source {source}: the ODS keeps its key while {} have another", to.join(", "), holders.join(", ")),
                        });
                    } else if t.ods_key.as_ref() != Some(to) {
                        t.ods_key = Some(to.clone());
                        steps.push(Step::Key {
                            columns: to.clone(),
                        });
                    }
                }
                Change::RenameTable { .. }
                | Change::SetNotNull { .. }
                | Change::DropNotNull { .. }
                | Change::SetDefault { .. }
                | Change::DropDefault { .. }
                | Change::ReplicaIdentity { .. } => {}
            }
        }
        Some(steps)
    }

    /// After loading the log: what the ODS holds is the truth for what it dropped and its
    /// key (the sources known now may be more than when a drop was decided). `columns`:
    /// the ODS table's columns (`None`: no such table), `key`: its primary key without
    /// `_saiki_source`.
    pub(crate) fn settle(
        &mut self,
        table: &str,
        columns: Option<&HashSet<String>>,
        key: &[String],
    ) {
        let Some(t) = self.tables.get_mut(table) else {
            return;
        };
        t.table_gone = !t.table_dropped.is_empty() && columns.is_none();
        t.gone = t
            .dropped
            .iter()
            .filter(|(c, by)| !by.is_empty() && columns.is_some_and(|cols| !cols.contains(*c)))
            .map(|(c, _)| c.clone())
            .collect();
        if t.ods_key.is_some() && !key.is_empty() {
            t.ods_key = Some(key.to_vec());
        }
    }

    /// The ODS tables the log has something for.
    pub(crate) fn tables(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// The ODS table of a record of `source` at `at` for source table `name`, when a table
    /// rename applies (`None`: the name itself).
    pub(crate) fn renamed_table(&self, name: &str, source: &str, at: Pos) -> Option<&str> {
        let mut out: Option<&str> = None;
        for r in &self.table_renames {
            if r.maps(out.unwrap_or(name), source, at) {
                out = Some(&r.to);
            }
        }
        out
    }

    /// The ODS column of a record's column `name` (source `source`, position `at`), after
    /// the renames the ODS followed; `None` if the ODS dropped it and the record predates
    /// its source's drop (the value is left out rather than bringing the column back).
    pub(crate) fn column<'n>(
        &'n self,
        table: &str,
        source: &str,
        at: Pos,
        name: &'n str,
    ) -> Option<&'n str> {
        let Some(t) = self.tables.get(table) else {
            return Some(name);
        };
        let mut name = name;
        for r in &t.renames {
            if r.maps(name, source, at) {
                name = &r.to;
            }
        }
        (!t.dropped_for(name, source, at)).then_some(name)
    }

    /// Whether the table has anything that changes how its rows are read (the planner's
    /// fast path skips the rest).
    pub(crate) fn affects(&self, table: &str) -> bool {
        self.tables.get(table).is_some_and(TableLog::affects)
    }

    /// Whether ODS column `column` is gone and a record of `source` at `at` predates its
    /// source's drop of it.
    #[cfg(test)]
    pub(crate) fn column_dropped(&self, table: &str, source: &str, at: Pos, column: &str) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.dropped_for(column, source, at))
    }

    /// Whether the ODS table is gone and a record of `source` at `at` predates its source's
    /// drop of it (the record is skipped rather than bringing the table back).
    pub(crate) fn table_dropped(&self, table: &str, source: &str, at: Pos) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.table_gone && t.table_dropped.get(source).is_some_and(|d| at < *d))
    }

    /// The key rows of the table are keyed by, once some source changed its key.
    pub(crate) fn ods_key(&self, table: &str) -> Option<&[String]> {
        self.tables.get(table).and_then(|t| t.ods_key.as_deref())
    }

    /// The columns a record of `source` at `at` lacks because it predates their `add_column`,
    /// with the value the source's rows read there.
    pub(crate) fn backfills(
        &self,
        table: &str,
        source: &str,
        at: Pos,
    ) -> impl Iterator<Item = (&str, &'static RawValue)> {
        self.tables
            .get(table)
            .and_then(|t| t.backfills.get(source))
            .into_iter()
            .flatten()
            .filter(move |b| at < b.at)
            .map(|b| (b.column.as_str(), b.value))
    }
}

/// Why a column or table (`what`) that `source` dropped stays in the ODS, if it does:
/// `sink.on_drop = "keep"`, or sources that still have it (`holders`).
fn kept(on_drop: OnDrop, holders: &[String], what: &str, source: &str) -> Option<Step> {
    let why = match (on_drop, holders.is_empty()) {
        (OnDrop::Keep, _) => "(sink.on_drop = \"keep\")".to_string(),
        (OnDrop::Drop, false) => format!("while {} still have it", holders.join(", ")),
        (OnDrop::Drop, true) => return None,
    };
    Some(Step::Noted {
        what: format!("{what} was dropped at source {source}: the ODS keeps it {why}"),
    })
}

/// The known sources that do not (yet) satisfy `done`, sorted, for messages.
fn holders(sources: &HashSet<String>, done: impl Fn(&str) -> bool) -> Vec<String> {
    let mut v: Vec<String> = sources.iter().filter(|s| !done(s)).cloned().collect();
    v.sort();
    v
}

/// One thing the ODS does for an `L` record, as [`SchemaLog::record`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// The ODS table takes the source table's new name (the first source's rename).
    RenameTable { from: String, to: String },
    /// The table from the source's shape, if the ODS does not have it (`CREATE TABLE`, or a
    /// first `L` of a table without rows yet).
    Create,
    /// A column, nullable in the ODS (other sources may not have it yet), if missing.
    AddColumn { column: String, type_name: String },
    /// The source's rows older than the `L` get the value its rows read there.
    Backfill { column: String, value: String },
    /// The ODS column follows the first source's rename.
    RenameColumn { from: String, to: String },
    /// The ODS column takes the new type (`USING column::type`).
    AlterType { column: String, type_name: String },
    /// The last source that had the column dropped it.
    DropColumn { column: String },
    /// The last source that had the table dropped it.
    DropTable,
    /// Every source has this key now: the ODS primary key follows.
    Key { columns: Vec<String> },
    /// Nothing to do in the ODS now, said in the log.
    Noted { what: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(column: &str, missing: Option<&str>) -> Change {
        Change::AddColumn {
            column: column.into(),
            type_name: "numeric(10,2)".into(),
            nullable: true,
            default: missing.map(str::to_string),
            missing: missing.map(str::to_string),
            volatile: false,
        }
    }

    fn rename(from: &str, to: &str) -> Change {
        Change::RenameColumn {
            from: from.into(),
            to: to.into(),
        }
    }

    fn drop_col(column: &str) -> Change {
        Change::DropColumn {
            column: column.into(),
        }
    }

    fn pos(lsn: u64, seq: i64) -> Pos {
        (Lsn(lsn), seq)
    }

    /// A log that knows shards a and b write `items`.
    fn two_shards(on_drop: OnDrop) -> SchemaLog {
        let mut log = SchemaLog::new(on_drop);
        log.saw("items", "a");
        log.saw("items", "b");
        log
    }

    #[test]
    fn a_rename_maps_the_old_name_for_every_source_that_has_not_renamed_before_the_record() {
        let mut log = SchemaLog::default();
        let at = pos(0x100, 3);
        log.record("items", "shard1", at, &[rename("note", "remark")]);
        // shard1 before its rename (a lagging partition) and shard2 (not migrated): mapped.
        assert_eq!(
            log.column("items", "shard1", pos(0x90, 1), "note"),
            Some("remark")
        );
        assert_eq!(
            log.column("items", "shard2", pos(0x999, 1), "note"),
            Some("remark")
        );
        // shard1 after its rename: a column called note is a new one of its own.
        assert_eq!(
            log.column("items", "shard1", pos(0x100, 4), "note"),
            Some("note")
        );
        assert_eq!(log.column("items", "shard1", pos(0x100, 4), "n"), Some("n"));
        assert_eq!(log.column("other", "shard1", at, "note"), Some("note"));
        // shard2's own rename later: the ODS does nothing, and its later records keep their
        // new column names.
        let steps = log.record(
            "items",
            "shard2",
            pos(0x500, 1),
            &[rename("note", "remark")],
        );
        assert_eq!(steps, Some(vec![Step::Create]));
        assert_eq!(
            log.column("items", "shard2", pos(0x400, 1), "note"),
            Some("remark")
        );
        assert_eq!(
            log.column("items", "shard2", pos(0x600, 1), "note"),
            Some("note")
        );
    }

    #[test]
    fn records_older_than_an_added_column_get_what_their_source_read() {
        let mut log = SchemaLog::default();
        let at = pos(0x100, 2);
        log.record(
            "items",
            "shard1",
            at,
            &[add("price", Some("1.50")), add("tag", None)],
        );
        let before: Vec<(&str, &str)> = log
            .backfills("items", "shard1", pos(0x100, 1))
            .map(|(c, v)| (c, v.get()))
            .collect();
        assert_eq!(before, [("price", "\"1.50\"")]);
        assert_eq!(log.backfills("items", "shard1", pos(0x100, 3)).count(), 0);
        assert_eq!(log.backfills("items", "shard2", pos(0x1, 1)).count(), 0);
        assert!(log.affects("items") && !log.affects("other"));
    }

    #[test]
    fn an_l_record_is_taken_in_once() {
        let mut log = SchemaLog::default();
        let at = pos(0x100, 2);
        assert!(!log.applied("items", "shard1", at));
        assert!(log
            .record("items", "shard1", at, &[add("price", Some("1"))])
            .is_some());
        assert_eq!(
            log.record("items", "shard1", at, &[add("price", Some("1"))]),
            None
        );
        assert!(log.applied("items", "shard1", at));
        assert_eq!(log.backfills("items", "shard1", pos(1, 1)).count(), 1);
    }

    #[test]
    fn steps_follow_adds_renames_and_types() {
        let mut log = SchemaLog::default();
        let s = log
            .record(
                "items",
                "a",
                pos(0x10, 1),
                &[
                    add("price", Some("1.50")),
                    rename("note", "remark"),
                    Change::AlterType {
                        column: "n".into(),
                        from: "integer".into(),
                        to: "bigint".into(),
                    },
                ],
            )
            .expect("new");
        assert_eq!(
            s,
            [
                Step::Create,
                Step::AddColumn {
                    column: "price".into(),
                    type_name: "numeric(10,2)".into()
                },
                Step::Backfill {
                    column: "price".into(),
                    value: "1.50".into()
                },
                Step::RenameColumn {
                    from: "note".into(),
                    to: "remark".into()
                },
                Step::AlterType {
                    column: "n".into(),
                    type_name: "bigint".into()
                },
            ]
        );
    }

    #[test]
    fn a_column_leaves_the_ods_when_the_last_source_drops_it() {
        let mut log = two_shards(OnDrop::Drop);
        let s = log
            .record("items", "a", pos(0x100, 1), &[drop_col("old")])
            .unwrap();
        assert!(matches!(&s[1], Step::Noted { what } if what.contains("while b still have it")));
        assert!(!log.column_dropped("items", "a", pos(0x90, 1), "old"));
        let s = log
            .record("items", "b", pos(0x200, 1), &[drop_col("old")])
            .unwrap();
        assert_eq!(
            s[1],
            Step::DropColumn {
                column: "old".into()
            }
        );
        // A lagging record of a from before its drop leaves the value out; b's records after
        // the drop do not carry it; a source that never dropped it (new) brings it back.
        assert!(log.column_dropped("items", "a", pos(0x90, 1), "old"));
        assert_eq!(log.column("items", "a", pos(0x90, 1), "old"), None);
        assert!(!log.column_dropped("items", "a", pos(0x101, 1), "old"));
        assert!(!log.column_dropped("items", "c", pos(0x90, 1), "old"));
        // Added again: it is a column again.
        log.record("items", "a", pos(0x300, 1), &[add("old", None)]);
        assert!(!log.column_dropped("items", "a", pos(0x90, 1), "old"));
    }

    #[test]
    fn on_drop_keep_keeps_columns_and_tables() {
        let mut log = SchemaLog::new(OnDrop::Keep);
        log.saw("items", "a");
        let s = log
            .record("items", "a", pos(0x100, 1), &[drop_col("old")])
            .unwrap();
        assert!(matches!(&s[1], Step::Noted { what } if what.contains("sink.on_drop")));
        let s = log
            .record("items", "a", pos(0x200, 1), &[Change::DropTable])
            .unwrap();
        assert!(matches!(&s[1], Step::Noted { .. }));
        assert!(!log.table_dropped("items", "a", pos(0x90, 1)));
    }

    #[test]
    fn a_table_leaves_the_ods_when_the_last_source_drops_it() {
        let mut log = two_shards(OnDrop::Drop);
        let s = log
            .record("items", "a", pos(0x100, 1), &[Change::DropTable])
            .unwrap();
        assert!(matches!(&s[1], Step::Noted { .. }));
        assert!(!log.table_dropped("items", "a", pos(0x90, 1)));
        let s = log
            .record("items", "b", pos(0x200, 1), &[Change::DropTable])
            .unwrap();
        assert_eq!(s[1], Step::DropTable);
        assert!(log.table_dropped("items", "a", pos(0x90, 1)));
        assert!(log.table_dropped("items", "b", pos(0x1ff, 1)));
        // Created again at a: its rows are rows again.
        log.record("items", "a", pos(0x300, 1), &[Change::CreateTable]);
        assert!(!log.table_dropped("items", "b", pos(0x1ff, 1)));
    }

    #[test]
    fn a_table_rename_is_table_wide_and_maps_the_sources_that_have_not_renamed() {
        let mut log = two_shards(OnDrop::Drop);
        log.record("items", "a", pos(0x50, 1), &[rename("note", "remark")]);
        let rt = Change::RenameTable {
            from: "public.items".into(),
            to: "public.products".into(),
        };
        let s = log
            .record("products", "a", pos(0x100, 1), std::slice::from_ref(&rt))
            .unwrap();
        assert_eq!(
            s[..2],
            [
                Step::RenameTable {
                    from: "items".into(),
                    to: "products".into()
                },
                Step::Create
            ]
        );
        // What the log knew of items is products' now.
        assert_eq!(
            log.column("products", "b", pos(0x10, 1), "note"),
            Some("remark")
        );
        assert!(log.knows("products", "b"));
        assert_eq!(
            log.renamed_table("items", "b", pos(0x999, 1)),
            Some("products")
        );
        assert_eq!(
            log.renamed_table("items", "a", pos(0x99, 1)),
            Some("products")
        );
        assert_eq!(log.renamed_table("items", "a", pos(0x101, 1)), None);
        // b follows: nothing for the ODS to do; a schema move is no rename in the ODS.
        let s = log.record("products", "b", pos(0x200, 1), &[rt]).unwrap();
        assert_eq!(s, [Step::Create]);
        let moved = Change::RenameTable {
            from: "public.products".into(),
            to: "sales.products".into(),
        };
        assert_eq!(
            log.record("products", "a", pos(0x300, 1), &[moved])
                .unwrap(),
            [Step::Create]
        );
    }

    #[test]
    fn the_ods_key_follows_when_every_source_has_the_new_key() {
        let mut log = two_shards(OnDrop::Drop);
        let key = |to: &[&str]| Change::Key {
            from: vec!["id".into()],
            to: to.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(log.ods_key("items"), None);
        let s = log
            .record("items", "a", pos(0x100, 1), &[key(&["id", "n"])])
            .unwrap();
        assert!(matches!(&s[1], Step::Noted { what } if what.contains("while b have another")));
        assert_eq!(log.ods_key("items"), Some(&["id".to_string()][..]));
        let s = log
            .record("items", "b", pos(0x200, 1), &[key(&["id", "n"])])
            .unwrap();
        assert_eq!(
            s[1],
            Step::Key {
                columns: vec!["id".into(), "n".into()]
            }
        );
        assert_eq!(log.ods_key("items").map(<[String]>::len), Some(2));
    }

    #[test]
    fn settling_takes_the_ods_as_the_truth_for_drops_and_keys() {
        let mut log = two_shards(OnDrop::Drop);
        log.record("items", "a", pos(0x100, 1), &[drop_col("old")]);
        log.record("items", "b", pos(0x200, 1), &[drop_col("old")]);
        // A third source appeared since: replaying would keep the column; the ODS has not.
        log.saw("items", "c");
        let cols: HashSet<String> = ["id".to_string()].into();
        log.settle("items", Some(&cols), &["id".to_string()]);
        assert!(log.column_dropped("items", "a", pos(0x90, 1), "old"));
        log.settle(
            "items",
            Some(&(["id".to_string(), "old".to_string()].into())),
            &[],
        );
        assert!(!log.column_dropped("items", "a", pos(0x90, 1), "old"));
        assert_eq!(log.tables().collect::<Vec<_>>(), ["items"]);
    }
}
