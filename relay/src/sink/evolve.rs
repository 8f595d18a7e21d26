//! Schema changes in the ODS (DESIGN.md §7, docs/sink.md "Schema changes"): what the sink
//! does with the `L` records of its sources. Pure: the planner asks [`SchemaLog`] how to read
//! a row record, and the ODS connection runs the [`Step`]s of an `L` record.
//!
//! One ODS table holds the rows of every source (shard), and the shards migrate one after the
//! other, so during a migration rows of both shapes arrive. The rules, per source and by
//! position `(commit_lsn, seq)`:
//!
//! - **Renames are table-wide.** The first source's `rename_column` renames the ODS column;
//!   from then on a record that still carries the old name (a shard that has not migrated,
//!   or a row of a lagging partition) has it read as the new name, unless its own source
//!   renamed at or before the record (then the old name is a new column of its own).
//! - **A column added with a default is backfilled per source.** The source's rows written
//!   before its `add_column` read the default there (`missing`): the ODS rows of that source
//!   older than the `L` get it when the `L` is applied, and a record of that source older than
//!   the `L` that arrives later (another partition) gets it added by the planner.
//!
//! Invariant: applying a source's rows and `L` records in any interleaving that keeps each
//! partition's order leaves the ODS as applying them in the source's order would. The sink
//! cuts a batch after every `L` record, so that no record after an `L` in its partition is
//! planned before the `L` is known.

use std::collections::HashMap;

use saiki_core::ddl::Change;
use saiki_core::Lsn;
use serde_json::value::RawValue;

/// A position in a source's change stream.
pub(crate) type Pos = (Lsn, i64);

#[derive(Debug, Clone, Default)]
struct Rename {
    from: String,
    to: String,
    /// Each source's own rename: records of that source from there on use the new name.
    by_source: HashMap<String, Pos>,
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
    applied: std::collections::HashSet<(String, Pos)>,
}

/// The `L` records the sink has applied, by ODS table: how to read later row records.
#[derive(Debug, Clone, Default)]
pub(crate) struct SchemaLog {
    tables: HashMap<String, TableLog>,
}

/// Backfill values live as long as the process: one small string per `add_column` with a
/// default, so leaking them is bounded by the number of migrations, and lets the planner hand
/// them out beside values borrowed from messages.
fn leak_json_string(s: &str) -> &'static RawValue {
    Box::leak(serde_json::value::to_raw_value(s).expect("a string serializes to JSON"))
}

impl SchemaLog {
    /// Whether this `L` record (source and position) was taken in.
    #[cfg(test)]
    pub(crate) fn applied(&self, table: &str, source: &str, at: Pos) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.applied.contains(&(source.to_string(), at)))
    }

    /// Takes in an `L` record of `source` at `at` for ODS table `table`.
    pub(crate) fn record(&mut self, table: &str, source: &str, at: Pos, changes: &[Change]) {
        let t = self.tables.entry(table.to_string()).or_default();
        if !t.applied.insert((source.to_string(), at)) {
            return;
        }
        for c in changes {
            match c {
                Change::RenameColumn { from, to } => {
                    match t
                        .renames
                        .iter_mut()
                        .find(|r| r.from == *from && r.to == *to)
                    {
                        Some(r) => {
                            r.by_source.entry(source.to_string()).or_insert(at);
                        }
                        None => t.renames.push(Rename {
                            from: from.clone(),
                            to: to.clone(),
                            by_source: HashMap::from([(source.to_string(), at)]),
                        }),
                    }
                }
                Change::AddColumn {
                    column,
                    missing: Some(m),
                    ..
                } => t
                    .backfills
                    .entry(source.to_string())
                    .or_default()
                    .push(Backfill {
                        column: column.clone(),
                        value: leak_json_string(m),
                        at,
                    }),
                _ => {}
            }
        }
    }

    /// The ODS name of a record's column `name` (source `source`, position `at`).
    pub(crate) fn column<'n>(
        &'n self,
        table: &str,
        source: &str,
        at: Pos,
        name: &'n str,
    ) -> &'n str {
        let Some(t) = self.tables.get(table) else {
            return name;
        };
        let mut name = name;
        for r in &t.renames {
            let own = r.by_source.get(source).is_some_and(|p| *p <= at);
            if r.from == name && !own {
                name = &r.to;
            }
        }
        name
    }

    /// Whether the table has any rename or backfill (the planner's fast path skips the rest).
    pub(crate) fn affects(&self, table: &str) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| !t.renames.is_empty() || !t.backfills.is_empty())
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

/// One thing the ODS does for an `L` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
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
    /// Recorded, not followed yet (drops are kept, as `sink.on_drop = "keep"` would; table
    /// renames and key changes come in a later slice): logged.
    Noted { what: String },
}

/// The steps for one `L` record's changes, in order.
pub(crate) fn steps(changes: &[Change]) -> Vec<Step> {
    let mut out = vec![Step::Create];
    for c in changes {
        match c {
            Change::CreateTable => {}
            Change::AddColumn {
                column,
                type_name,
                missing,
                volatile,
                ..
            } => {
                out.push(Step::AddColumn {
                    column: column.clone(),
                    type_name: type_name.clone(),
                });
                if let Some(m) = missing {
                    out.push(Step::Backfill {
                        column: column.clone(),
                        value: m.clone(),
                    });
                } else if *volatile {
                    out.push(Step::Noted {
                        what: format!("column {column} was added with a volatile default: the source relay snapshots the table again, which brings the values of the rows that existed before"),
                    });
                }
            }
            Change::RenameColumn { from, to } => out.push(Step::RenameColumn {
                from: from.clone(),
                to: to.clone(),
            }),
            Change::AlterType { column, to, .. } => out.push(Step::AlterType {
                column: column.clone(),
                type_name: to.clone(),
            }),
            Change::DropColumn { column } => out.push(Step::Noted {
                what: format!("column {column} was dropped at the source: the ODS keeps it"),
            }),
            Change::DropTable => out.push(Step::Noted {
                what: "the table was dropped at the source: the ODS keeps it".into(),
            }),
            Change::RenameTable { from, to } => out.push(Step::Noted {
                what: format!("the table was renamed from {from} to {to} at the source: its rows go to a new ODS table from here on"),
            }),
            Change::Key { from, to } => out.push(Step::Noted {
                what: format!("the key changed from ({}) to ({}) at the source: the ODS table keeps its primary key", from.join(", "), to.join(", ")),
            }),
            Change::SetNotNull { .. }
            | Change::DropNotNull { .. }
            | Change::SetDefault { .. }
            | Change::DropDefault { .. }
            | Change::ReplicaIdentity { .. } => {}
        }
    }
    out
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

    #[test]
    fn a_rename_maps_the_old_name_for_every_source_that_has_not_renamed_before_the_record() {
        let mut log = SchemaLog::default();
        let at = (Lsn(0x100), 3);
        log.record("items", "shard1", at, &[rename("note", "remark")]);
        // shard1 before its rename (a lagging partition) and shard2 (not migrated): mapped.
        assert_eq!(
            log.column("items", "shard1", (Lsn(0x90), 1), "note"),
            "remark"
        );
        assert_eq!(
            log.column("items", "shard2", (Lsn(0x999), 1), "note"),
            "remark"
        );
        // shard1 after its rename: a column called note is a new one of its own.
        assert_eq!(
            log.column("items", "shard1", (Lsn(0x100), 4), "note"),
            "note"
        );
        assert_eq!(log.column("items", "shard1", (Lsn(0x100), 4), "n"), "n");
        assert_eq!(log.column("other", "shard1", at, "note"), "note");
        // shard2's own rename later: its later records keep their new column names.
        log.record(
            "items",
            "shard2",
            (Lsn(0x500), 1),
            &[rename("note", "remark")],
        );
        assert_eq!(
            log.column("items", "shard2", (Lsn(0x400), 1), "note"),
            "remark"
        );
        assert_eq!(
            log.column("items", "shard2", (Lsn(0x600), 1), "note"),
            "note"
        );
    }

    #[test]
    fn records_older_than_an_added_column_get_what_their_source_read() {
        let mut log = SchemaLog::default();
        let at = (Lsn(0x100), 2);
        log.record(
            "items",
            "shard1",
            at,
            &[add("price", Some("1.50")), add("tag", None)],
        );
        let before: Vec<(&str, &str)> = log
            .backfills("items", "shard1", (Lsn(0x100), 1))
            .map(|(c, v)| (c, v.get()))
            .collect();
        assert_eq!(before, [("price", "\"1.50\"")]);
        assert_eq!(log.backfills("items", "shard1", (Lsn(0x100), 3)).count(), 0);
        assert_eq!(log.backfills("items", "shard2", (Lsn(0x1), 1)).count(), 0);
        assert!(log.affects("items") && !log.affects("other"));
    }

    #[test]
    fn an_l_record_is_taken_in_once() {
        let mut log = SchemaLog::default();
        let at = (Lsn(0x100), 2);
        assert!(!log.applied("items", "shard1", at));
        log.record("items", "shard1", at, &[add("price", Some("1"))]);
        log.record("items", "shard1", at, &[add("price", Some("1"))]);
        assert!(log.applied("items", "shard1", at));
        assert_eq!(log.backfills("items", "shard1", (Lsn(1), 1)).count(), 1);
    }

    #[test]
    fn steps_follow_adds_renames_and_types_and_note_the_rest() {
        let s = steps(&[
            add("price", Some("1.50")),
            rename("note", "remark"),
            Change::AlterType {
                column: "n".into(),
                from: "integer".into(),
                to: "bigint".into(),
            },
            Change::DropColumn {
                column: "old".into(),
            },
        ]);
        assert_eq!(s[0], Step::Create);
        assert_eq!(
            s[1..4],
            [
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
            ]
        );
        assert!(matches!(&s[4], Step::AlterType { type_name, .. } if type_name == "bigint"));
        assert!(matches!(&s[5], Step::Noted { what } if what.contains("keeps it")));
    }
}
