//! `Round`: the rows a lake relay collected since its last commit, by change-log table, and
//! the `Ledger` that admits them. A record becomes rows here (`write`), and a round ends with
//! one Iceberg commit per table (`commit`); the session around it holds only the I/O of
//! Kafka (and bench/lake's engine-only figure drives it without Kafka, `LakeEngine`).

use std::collections::HashMap;

use saiki_core::ddl::SchemaChangeFields;
use saiki_core::record::Action;
use saiki_core::view::{Fields, RecordView, Types};
use saiki_core::Lsn;
use std::time::Duration;
use tracing::{debug, info_span};

use super::columns::{self, Row};
use super::ledger::{Ledger, Tp};
use super::table::{Catalog, ChangeTable};
use crate::error::RelayError;

#[derive(Default)]
pub(crate) struct Round {
    /// Tables met in this session, by their change-log table name.
    pub(crate) tables: HashMap<String, ChangeTable>,
    pub(crate) ledger: Ledger,
    /// Rows in the round, and their size (a round ends at `target_file_size`).
    pub(crate) rows: usize,
    pub(crate) bytes: usize,
}

/// One table's commit at a round's end.
pub(crate) struct Committed {
    pub(crate) rows: usize,
    pub(crate) files: usize,
}

impl Round {
    /// Reads the marks and columns of these change-log tables from the catalog, the first
    /// time the session meets them. A table met before keeps the columns it learned.
    pub(crate) async fn prepare(
        &mut self,
        catalog: &Catalog,
        namespace: &str,
        names: &[String],
    ) -> Result<(), RelayError> {
        for name in names {
            if self.ledger.knows(name) {
                continue;
            }
            let (t, marks, followed) = match catalog.load(name).await? {
                Some((t, marks, followed)) => (Some(t), marks, followed),
                None => (None, Default::default(), Vec::new()),
            };
            self.ledger.load(name, marks);
            match self.tables.get_mut(name) {
                // A table met before (a rebalance dropped its rows) keeps the columns it
                // learned, and follows the schema changes another relay committed meanwhile
                // (the partitions it takes over may be past their `L` records).
                Some(known) => known.follow(followed),
                None => {
                    let t = t.unwrap_or_else(|| ChangeTable::new(namespace, name));
                    self.tables.insert(name.clone(), t);
                }
            }
        }
        Ok(())
    }

    /// A record's rows into the round, admitted at `at` (its own offset, or its streamed
    /// transaction's end copy's), with the commit position and time of `commit` if given;
    /// an `L` record (`payload`) into its table's schema. `Err`: why it cannot be written (a
    /// dead letter).
    pub(crate) fn write(
        &mut self,
        tp: &Tp,
        rec: &RecordView<'_, Fields<'_>>,
        payload: &[u8],
        names: &[String],
        at: i64,
        commit: Option<(i64, Option<i64>)>,
    ) -> Result<(), String> {
        let types: Types<'_> = match rec.types.map(|t| serde_json::from_str(t.get())) {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(format!("types: {e}")),
            None => Types::default(),
        };
        let (commit_lsn, commit_ts) = commit.unwrap_or_else(|| {
            (
                rec.commit_lsn.unwrap_or(rec.lsn).0 as i64,
                rec.commit_ts.as_deref().and_then(columns::commit_micros),
            )
        });
        let source = rec.source.as_deref().unwrap_or("");
        let pos = (Lsn(commit_lsn as u64), rec.seq.unwrap_or(0));
        if rec.action == Action::SchemaChange {
            let l: SchemaChangeFields = serde_json::from_slice(payload)
                .map_err(|e| format!("malformed schema change record: {e}"))?;
            if rec.source.is_none() || rec.seq.is_none() {
                return Err("a schema change record without source or seq: only saiki-relay source produces the L records the lake follows".into());
            }
            for name in names {
                let Some(t) = self.tables.get_mut(name) else {
                    return Err(format!("internal: {name} was not loaded (`prepare`)"));
                };
                if self.ledger.admit(name, tp, at)
                    && t.schema_change(source, pos, l.changes.clone())
                {
                    debug!(table = %name, statement = %l.statement, "schema change taken");
                }
            }
            return Ok(());
        }
        for name in names {
            let Some(t) = self.tables.get_mut(name) else {
                return Err(format!("internal: {name} was not loaded (`prepare`)"));
            };
            if !self.ledger.admit(name, tp, at) {
                continue;
            }
            let values = match rec.action {
                Action::Delete => rec.identity.as_ref(),
                Action::Truncate | Action::Sweep => None,
                _ => rec.columns.as_ref(),
            };
            // A resync's end, at the position where the resync started (seq -1: before any
            // change there): the source's rows older than it and not read again by the
            // resync were deleted while the slot was lost, as if truncated there.
            let (commit_lsn, seq) = match (rec.action, &rec.sweep) {
                (Action::Sweep, Some(w)) => (w.before.0 as i64, -1),
                (Action::Sweep, None) => return Err("a W record without sweep".into()),
                _ => (commit_lsn, rec.seq.unwrap_or(0)),
            };
            let mut row = Row {
                action: rec.action.code() as char,
                source: rec.source.as_deref().unwrap_or("").to_string(),
                commit_lsn,
                seq,
                commit_ts,
                unchanged: rec
                    .unchanged_toast
                    .as_ref()
                    .map(|u| u.iter().map(|c| c.to_string()).collect()),
                cells: Vec::new(),
            };
            if let Some(values) = values {
                for (col, raw) in &values.0 {
                    let pg = || types.0.iter().find(|(c, _)| c == col).map(|(_, t)| &**t);
                    let (idx, ty, json) = t.column(col, (source, pos), pg);
                    let cell = if json {
                        // JSON stays JSON: a document that is a string keeps its quotes.
                        columns::json_cell(raw.get())
                    } else {
                        columns::cell(raw.get(), ty).map_err(|e| format!("{name}.{col}: {e}"))?
                    };
                    row.cells.push((idx, cell));
                }
            }
            self.bytes += row.size();
            self.rows += 1;
            t.rows.push(row);
        }
        Ok(())
    }

    /// Commits every table with rows in the round (and the schema of a table whose `L`
    /// record came without rows), one Iceberg commit each, with its marks; `committed` is
    /// told of each as it lands (a later table's failure does not undo it). Returns how many
    /// tables the round had.
    pub(crate) async fn commit(
        &mut self,
        catalog: &Catalog,
        target_file_size: usize,
        retention: Duration,
        mut committed: impl FnMut(Committed),
    ) -> Result<usize, RelayError> {
        let names: Vec<String> = self.ledger.round_tables().map(str::to_string).collect();
        for name in &names {
            let Some(t) = self.tables.get_mut(name) else {
                continue;
            };
            if t.rows.is_empty() {
                // A round with a schema change of the table but no rows: the change is
                // committed now, since the group's offsets move past its record.
                if t.has_schema_work() {
                    catalog.follow_schema(t).await?;
                }
                continue;
            }
            let rows = t.rows.len();
            let span = info_span!("commit", table = %name);
            let _e = span.enter();
            let started = std::time::Instant::now();
            let files = catalog
                .commit(t, &mut self.ledger, target_file_size, retention)
                .await?;
            t.rows.clear();
            committed(Committed { rows, files });
            debug!(
                rows,
                files,
                ms = started.elapsed().as_millis() as u64,
                "committed"
            );
        }
        Ok(names.len())
    }
}
