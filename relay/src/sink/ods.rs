//! The ODS side of the sink (docs/sink.md, "What lands in the ODS"): bookkeeping tables, ODS tables created and grown
//! from the records' `types`, and a batch applied in **one** transaction together with the
//! consumed offsets.
//!
//! Invariants kept here:
//! - The offsets of a batch are written in the transaction that applies its rows, and only
//!   if they still hold the values the batch started from ([`Ods::write_offsets`] fences out
//!   a second sink instance still working on a partition after a rebalance). So each
//!   message's effect is committed exactly once.
//! - A row is only overwritten or deleted by a change with a greater `(commit_lsn, seq)` from
//!   the same source (the guard in every statement below).
//! - Unchanged-TOAST columns (absent from a change) keep their ODS value.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use futures::SinkExt;
use indexmap::IndexMap;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use crate::config::OnDrop;
use crate::error::RelayError;
use crate::evolve::{SchemaLog, Step};
use crate::pg::client::pg_error;
use crate::pg::quote::{ident, literal};
use crate::sink::plan::{self, ColumnKind, NetRow, Op, SchemaChange, TablePlan};
use crate::sink::statements::{
    delete_truncated, TableStatements, RAISE_WATERMARK, READ_WATERMARKS, RECORD_SWEEP,
    RECORD_TRUNCATION, SWEPT,
};
use saiki_core::Lsn;

/// Bookkeeping columns (docs/sink.md, "What lands in the ODS").
pub(crate) use crate::sink::statements::{APPLIED_COL, LSN_COL, SEQ_COL, SOURCE_COL};

/// The bookkeeping tables with rows per ODS table and source that go with the table (renamed
/// with it, dropped with it); `saiki_sink.schema_changes` is renamed too, but kept on a drop.
const PER_TABLE_BOOKKEEPING: [&str; 4] = ["watermarks", "truncations", "tombstones", "sweeps"];

/// An ODS table as the catalog has it.
#[derive(Debug, Clone)]
pub(crate) struct OdsTable {
    /// Column name → type as `format_type` prints it, in column order.
    pub(crate) columns: IndexMap<String, String>,
    pub(crate) primary_key: Vec<String>,
}

/// How applying a batch ended, short of a connection or server failure.
#[derive(Debug)]
pub enum ApplyError {
    /// Another sink instance moved these partitions' offsets: the batch is void.
    Fenced,
    /// A record's content made a statement fail: apply record by record to find it.
    Data(String),
    /// The ODS table for a record's table cannot be created from its `types` (a name or a
    /// type PostgreSQL refuses): the table's records go to the dead-letter topic from now on.
    CannotCreate(String),
    /// Connection lost, server down, or a definite server error.
    Fatal(RelayError),
    /// A plain INSERT of keys new to the ODS met one that is there (shards whose keys collide
    /// without `key_includes_source`, a source seeded twice): the transaction is void, and
    /// the batch is applied again with this table taking upserts only, as it does from now on.
    KeyTaken(String),
    /// A schema change the ODS cannot follow: the batch is void, and its topic stops until
    /// resumed (docs/sink.md, "Schema changes"); the other topics keep applying.
    Stopped(Box<Stop>),
}

/// A topic stopped at a schema change of its ODS table (a row of `saiki_sink.stopped`).
#[derive(Debug, Clone)]
pub struct Stop {
    pub(crate) topic: String,
    pub(crate) table: String,
    pub(crate) source: String,
    pub(crate) statement: String,
    /// What failed and what to do.
    pub(crate) error: String,
}

impl From<RelayError> for ApplyError {
    fn from(e: RelayError) -> Self {
        ApplyError::Fatal(e)
    }
}

/// Offsets of one partition in a batch: the stored value it started from, the next one.
#[derive(Debug, Clone)]
pub struct PartitionOffsets {
    pub topic: String,
    pub partition: i32,
    pub stored: Option<i64>,
    pub next: i64,
}

pub struct Ods {
    client: Client,
    target: String,
    schema: String,
    group: String,
    key_includes_source: bool,
    tables: HashMap<String, OdsTable>,
    /// Temp staging table per ODS table in this session, with the column list it was made for.
    stages: HashMap<String, (String, Vec<String>)>,
    /// The statements per ODS table, with the columns and key they were built for.
    statements: HashMap<String, (Vec<String>, Arc<TableStatements>)>,
    /// Tables that cannot be created, with the reason (their records are dead-lettered).
    unmaterializable: HashMap<String, String>,
    /// Tables where a plain INSERT met a key that was there: upserts only, for this session.
    upserts_only: std::collections::HashSet<String>,
    /// Tables whose staging table holds rows of this transaction (a committed streamed
    /// transaction applies a table chunk by chunk): emptied before the next use, or the
    /// statements would read the earlier chunks' rows again. `ON COMMIT DELETE ROWS` empties
    /// them only at the commit.
    filled: std::collections::HashSet<String>,
    in_transaction: bool,
}

/// Whether an error comes from the data being applied (so isolating the record helps).
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return false;
    };
    let c = code.code();
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        return false;
    }
    matches!(&c[..2], "22" | "23" | "42" | "0A" | "54" | "44")
}

impl Ods {
    /// Connects and creates the bookkeeping schema and the ODS schema if missing.
    pub async fn connect(
        dsn: &str,
        schema: &str,
        group: &str,
        key_includes_source: bool,
    ) -> Result<Ods, RelayError> {
        let (client, target) =
            crate::pg::client::connect(dsn, "the ODS", "sink.dsn", "saiki-relay sink").await?;
        let ods = Ods {
            client,
            target,
            schema: schema.to_string(),
            group: group.to_string(),
            key_includes_source,
            tables: HashMap::new(),
            stages: HashMap::new(),
            statements: HashMap::new(),
            unmaterializable: HashMap::new(),
            upserts_only: std::collections::HashSet::new(),
            filled: std::collections::HashSet::new(),
            in_transaction: false,
        };
        ods.bootstrap().await?;
        Ok(ods)
    }

    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// The connection, for the staging of streamed transactions (`sink/staging.rs`).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn err(&self, e: &tokio_postgres::Error) -> RelayError {
        pg_error(&self.target, e)
    }

    async fn bootstrap(&self) -> Result<(), RelayError> {
        // Usually everything exists: then no DDL, and no lock to wait for behind another
        // sink's (or a killed sink's lingering) transaction.
        let present: bool = self
            .client
            .query_one(
                "SELECT to_regclass('saiki_sink.offsets') IS NOT NULL
                    AND to_regclass('saiki_sink.tombstones') IS NOT NULL
                    AND to_regclass('saiki_sink.truncations') IS NOT NULL
                    AND to_regclass('saiki_sink.watermarks') IS NOT NULL
                    AND to_regclass('saiki_sink.schema_changes') IS NOT NULL
                    AND to_regclass('saiki_sink.stopped') IS NOT NULL
                    AND to_regclass('saiki_sink.staged') IS NOT NULL
                    AND to_regclass('saiki_sink.streams') IS NOT NULL
                    AND to_regclass('saiki_sink.stream_aborts') IS NOT NULL
                    AND to_regclass('saiki_sink.stream_ends') IS NOT NULL
                    AND to_regclass('saiki_sink.sweeps') IS NOT NULL
                    AND to_regnamespace($1) IS NOT NULL",
                &[&ident(&self.schema)],
            )
            .await
            .map_err(|e| self.err(&e))?
            .get(0);
        if present {
            return Ok(());
        }
        // The advisory lock keeps two sinks starting at once from racing on CREATE; the lock
        // timeout turns a long wait into a logged, retried error.
        let sql = format!(
            "BEGIN;
             SET LOCAL client_min_messages = warning;
             SET LOCAL lock_timeout = '10s';
             SELECT pg_advisory_xact_lock(hashtext('saiki_sink.ddl'));
             CREATE SCHEMA IF NOT EXISTS saiki_sink;
             CREATE TABLE IF NOT EXISTS saiki_sink.offsets (
                 \"group\" text NOT NULL,
                 topic text NOT NULL,
                 \"partition\" int NOT NULL,
                 next_offset bigint NOT NULL,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (\"group\", topic, \"partition\"));
             CREATE TABLE IF NOT EXISTS saiki_sink.tombstones (
                 ods_table text NOT NULL,
                 source text NOT NULL,
                 key text NOT NULL,
                 lsn pg_lsn NOT NULL,
                 seq int NOT NULL,
                 deleted_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (ods_table, source, key));
             COMMENT ON TABLE saiki_sink.tombstones IS 'saiki-relay sink: the last delete per row, so that a replayed older change does not bring the row back; kept for sink.tombstone_retention';
             CREATE TABLE IF NOT EXISTS saiki_sink.truncations (
                 ods_table text NOT NULL,
                 source text NOT NULL,
                 lsn pg_lsn NOT NULL,
                 seq int NOT NULL,
                 PRIMARY KEY (ods_table, source));
             CREATE TABLE IF NOT EXISTS saiki_sink.watermarks (
                 ods_table text NOT NULL,
                 source text NOT NULL,
                 lsn pg_lsn NOT NULL,
                 seq int NOT NULL,
                 PRIMARY KEY (ods_table, source));
             COMMENT ON TABLE saiki_sink.watermarks IS 'saiki-relay sink: the greatest (commit_lsn, seq) applied per table and source; only changes at or below it can be replays';
             CREATE TABLE IF NOT EXISTS saiki_sink.sweeps (
                 ods_table text NOT NULL,
                 source text NOT NULL,
                 before pg_lsn NOT NULL,
                 topic text NOT NULL,
                 partitions int NOT NULL,
                 done int[] NOT NULL,
                 swept_at timestamptz,
                 rows bigint,
                 PRIMARY KEY (ods_table, source, before, topic));
             COMMENT ON TABLE saiki_sink.sweeps IS 'saiki-relay sink: the ends of resyncs after a failover (W records) per partition; once all partitions brought theirs, the rows of the source last changed before `before` were deleted (docs/sink.md, After a failover)';
             COMMENT ON TABLE saiki_sink.truncations IS 'saiki-relay sink: the last truncate per table and source; older changes are not applied';
             CREATE TABLE IF NOT EXISTS saiki_sink.schema_changes (
                 ods_table text NOT NULL,
                 source text NOT NULL,
                 lsn pg_lsn NOT NULL,
                 seq int NOT NULL,
                 statement text NOT NULL,
                 changes jsonb NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (ods_table, source, lsn, seq));
             CREATE TABLE IF NOT EXISTS saiki_sink.stopped (
                 \"group\" text NOT NULL,
                 topic text NOT NULL,
                 ods_table text NOT NULL,
                 source text NOT NULL,
                 statement text NOT NULL,
                 error text NOT NULL,
                 stopped_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (\"group\", topic));
             COMMENT ON TABLE saiki_sink.stopped IS 'saiki-relay sink: topics stopped at a schema change their ODS table cannot follow; delete a row to resume its topic';
             COMMENT ON TABLE saiki_sink.schema_changes IS 'saiki-relay sink: the schema changes (L records) of each source the ODS followed, in the transaction that followed them';
             COMMENT ON TABLE saiki_sink.offsets IS 'saiki-relay sink: the next Kafka offset to apply per consumer group and partition, written in the transaction that applies the rows';
             {}
             CREATE SCHEMA IF NOT EXISTS {};
             COMMIT;",
            crate::sink::staging::TABLES,
            ident(&self.schema)
        );
        self.client.batch_execute(&sql).await.map_err(|e| {
            let err = self.err(&e);
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                RelayError::Config(format!(
                    "{err}: the sink's role needs CREATE on the ODS database (schemas saiki_sink and {})",
                    self.schema
                ))
            } else {
                err
            }
        })
    }

    /// The stored next offset of every partition of this group.
    pub(crate) async fn offsets(&self) -> Result<HashMap<(String, i32), i64>, RelayError> {
        let rows = self
            .client
            .query(
                "SELECT topic, \"partition\", next_offset FROM saiki_sink.offsets WHERE \"group\" = $1",
                &[&self.group],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    (r.get::<_, String>(0), r.get::<_, i32>(1)),
                    r.get::<_, i64>(2),
                )
            })
            .collect())
    }

    /// The stored next offset of one partition.
    pub(crate) async fn offset(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<Option<i64>, RelayError> {
        let row = self
            .client
            .query_opt(
                "SELECT next_offset FROM saiki_sink.offsets WHERE \"group\" = $1 AND topic = $2 AND \"partition\" = $3",
                &[&self.group, &topic, &partition],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(crate) async fn savepoint(&self) -> Result<(), RelayError> {
        self.client
            .batch_execute("SAVEPOINT saiki_record")
            .await
            .map_err(|e| self.err(&e))
    }

    pub(crate) async fn release_savepoint(&self) -> Result<(), RelayError> {
        self.client
            .batch_execute("RELEASE SAVEPOINT saiki_record")
            .await
            .map_err(|e| self.err(&e))
    }

    /// Undoes one record's statements, and forgets catalog and staging tables they may have
    /// created.
    pub(crate) async fn rollback_to_savepoint(&mut self) -> Result<(), RelayError> {
        self.tables.clear();
        self.stages.clear();
        self.client
            .batch_execute("ROLLBACK TO SAVEPOINT saiki_record")
            .await
            .map_err(|e| self.err(&e))
    }

    pub(crate) async fn begin(&mut self) -> Result<(), RelayError> {
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| self.err(&e))?;
        self.in_transaction = true;
        self.filled.clear();
        Ok(())
    }

    pub(crate) async fn commit(&mut self) -> Result<(), RelayError> {
        self.in_transaction = false;
        self.filled.clear();
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| self.err(&e))
    }

    /// Rolls back and forgets what the transaction may have changed in the catalog.
    pub(crate) async fn rollback(&mut self) {
        if self.in_transaction {
            self.in_transaction = false;
            if let Err(e) = self.client.batch_execute("ROLLBACK").await {
                debug!(error = %e, "rollback");
            }
        }
        self.tables.clear();
        self.stages.clear();
    }

    /// Writes the batch's next offsets, fenced on the values the batch started from.
    pub(crate) async fn write_offsets(&self, parts: &[PartitionOffsets]) -> Result<(), ApplyError> {
        if parts.is_empty() {
            return Ok(());
        }
        let topics: Vec<&str> = parts.iter().map(|p| p.topic.as_str()).collect();
        let ps: Vec<i32> = parts.iter().map(|p| p.partition).collect();
        let next: Vec<i64> = parts.iter().map(|p| p.next).collect();
        let stored: Vec<Option<i64>> = parts.iter().map(|p| p.stored).collect();
        let row = self
            .client
            .query_one(
                "WITH input(topic, part, next, stored) AS (
                    SELECT * FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[])),
                 upd AS (
                    UPDATE saiki_sink.offsets o SET next_offset = i.next, updated_at = now()
                    FROM input i
                    WHERE o.\"group\" = $1 AND o.topic = i.topic AND o.\"partition\" = i.part
                      AND o.next_offset = i.stored
                    RETURNING 1),
                 ins AS (
                    INSERT INTO saiki_sink.offsets (\"group\", topic, \"partition\", next_offset)
                    SELECT $1, topic, part, next FROM input WHERE stored IS NULL
                    ON CONFLICT DO NOTHING
                    RETURNING 1)
                 SELECT (SELECT count(*) FROM upd) + (SELECT count(*) FROM ins)",
                &[&self.group, &topics, &ps, &next, &stored],
            )
            .await
            .map_err(|e| self.err(&e))?;
        let n: i64 = row.get(0);
        if n as usize != parts.len() {
            return Err(ApplyError::Fenced);
        }
        Ok(())
    }

    /// Forgets tombstones older than `retention` (replays come from a relay restarting at
    /// its slot's confirmed position: minutes, not days). Returns how many.
    pub(crate) async fn gc_tombstones(
        &self,
        retention: std::time::Duration,
    ) -> Result<u64, RelayError> {
        let secs = retention.as_secs_f64();
        self.client
            .execute(
                "DELETE FROM saiki_sink.tombstones WHERE deleted_at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await
            .map_err(|e| self.err(&e))
    }

    /// Whether ODS rows are keyed by `(_saiki_source, key…)` (`sink.key_includes_source`).
    pub(crate) fn key_includes_source(&self) -> bool {
        self.key_includes_source
    }

    /// Whether a plain insert into this table met an existing key in this session (it takes
    /// upserts only since).
    pub fn takes_upserts_only(&self, table: &str) -> bool {
        self.upserts_only.contains(table)
    }

    /// The reason a table cannot be materialized, if creating it failed before.
    pub(crate) fn unmaterializable(&self, table: &str) -> Option<&str> {
        self.unmaterializable.get(table).map(String::as_str)
    }

    pub(crate) fn set_unmaterializable(&mut self, table: &str, reason: String) {
        self.unmaterializable.insert(table.to_string(), reason);
    }

    /// Applies one table's plan inside the open transaction: its truncates, then its rows
    /// through the staging table. Returns rows written.
    pub(crate) async fn apply_table(
        &mut self,
        plan: &TablePlan<'_>,
        isolated: bool,
    ) -> Result<u64, ApplyError> {
        let table = self.ensure_table(plan).await?;
        let qualified = format!("{}.{}", ident(&self.schema), ident(&plan.name));
        let mut written = 0u64;
        // A truncate of a table the ODS does not have yet has nothing to delete.
        if !table.columns.is_empty() {
            written += self.apply_truncates(plan, &qualified).await?;
        }
        if plan.rows.is_empty() {
            if !table.columns.is_empty() {
                self.raise_watermarks(plan).await?;
            }
            written += self
                .apply_sweeps(plan, &qualified, !table.columns.is_empty())
                .await?;
            return Ok(written);
        }
        self.check_key(plan, &table, &qualified)?;
        let stage = self.ensure_stage(&plan.name, &table).await?;
        if !self.filled.insert(plan.name.clone()) || isolated {
            self.client
                .batch_execute(&format!("TRUNCATE {stage}"))
                .await
                .map_err(|e| self.classify(&e))?;
        }
        let cols: Vec<&str> = plan.columns.keys().map(String::as_str).collect();
        let sql = self.statements(plan, &qualified, &stage, &cols, &table.primary_key);
        let plain = !isolated && !self.upserts_only.contains(&plan.name);
        let staged = self
            .copy_to_stage(plan, &table, &cols, &sql.copy, plain)
            .await?;

        if staged.inserts > 0 {
            written += match self.client.execute(&sql.insert, &[]).await {
                Ok(n) => n,
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    warn!(table = %qualified, error = %self.err(&e), "a row inserted at the source has a key the ODS table already holds: this table takes upserts only from now on");
                    self.upserts_only.insert(plan.name.clone());
                    return Err(ApplyError::KeyTaken(plan.name.clone()));
                }
                Err(e) => return Err(self.classify(&e)),
            };
        }
        let mut run = Vec::new();
        if staged.upserts > 0 {
            run.push(&sql.upsert);
        }
        if staged.any_absent {
            run.push(&sql.merge_absent);
        }
        if staged.deletes > 0 {
            run.push(&sql.delete);
        }
        for statement in run {
            written += self
                .client
                .execute(statement, &[])
                .await
                .map_err(|e| self.classify(&e))?;
        }
        if staged.deletes > 0 {
            self.client
                .execute(&sql.tombstones, &[])
                .await
                .map_err(|e| self.classify(&e))?;
        }
        self.raise_watermarks(plan).await?;
        written += self.apply_sweeps(plan, &qualified, true).await?;
        Ok(written)
    }

    /// The ends of resyncs in this plan (after its rows): each partition's is recorded, and the
    /// one that completes a resync deletes the rows of its source last changed before the
    /// resync started. Every row the source still has was read again by the resync (or changed
    /// since) and is newer; the others were deleted while the slot was lost. The sweep is then
    /// recorded as a truncation at that position, so no replay brings such a row back.
    async fn apply_sweeps(
        &self,
        plan: &TablePlan<'_>,
        qualified: &str,
        exists: bool,
    ) -> Result<u64, ApplyError> {
        let mut written = 0;
        for w in &plan.sweeps {
            let before = w.before.to_string();
            let complete: bool = self
                .client
                .query_one(
                    RECORD_SWEEP,
                    &[
                        &plan.name,
                        &w.source,
                        &before,
                        &w.partitions,
                        &w.partition,
                        &w.topic,
                    ],
                )
                .await
                .map_err(|e| self.classify(&e))?
                .get(0);
            if !complete {
                debug!(table = %qualified, source = %w.source, %before, partition = w.partition, "end of a resync in this partition; the sweep waits for the others");
                continue;
            }
            let n = if exists {
                self.client
                    .execute(&delete_truncated(qualified), &[&w.source, &before, &0i32])
                    .await
                    .map_err(|e| self.classify(&e))?
            } else {
                0
            };
            self.client
                .execute(RECORD_TRUNCATION, &[&plan.name, &w.source, &before, &0i32])
                .await
                .map_err(|e| self.classify(&e))?;
            self.client
                .execute(
                    SWEPT,
                    &[&plan.name, &w.source, &before, &(n as i64), &w.topic],
                )
                .await
                .map_err(|e| self.classify(&e))?;
            info!(table = %qualified, source = %w.source, %before, rows = n, "resync swept: rows deleted at the source while its slot was lost are deleted here");
            written += n;
        }
        Ok(written)
    }

    /// Each source's truncate: its rows older than the truncate go, and the truncate is
    /// recorded against replays.
    async fn apply_truncates(
        &self,
        plan: &TablePlan<'_>,
        qualified: &str,
    ) -> Result<u64, ApplyError> {
        let mut written = 0;
        let sql = delete_truncated(qualified);
        for (source, (lsn, seq, _)) in &plan.truncates {
            let lsn = lsn.to_string();
            let seq = *seq as i32;
            written += self
                .client
                .execute(&sql, &[source, &lsn, &seq])
                .await
                .map_err(|e| self.classify(&e))?;
            self.client
                .execute(RECORD_TRUNCATION, &[&plan.name, source, &lsn, &seq])
                .await
                .map_err(|e| self.classify(&e))?;
        }
        Ok(written)
    }

    /// The records' key must be the ODS table's primary key (with `_saiki_source` first when
    /// `key_includes_source`).
    fn check_key(
        &self,
        plan: &TablePlan<'_>,
        table: &OdsTable,
        qualified: &str,
    ) -> Result<(), ApplyError> {
        if plan.key.is_empty() {
            return Ok(());
        }
        let want = key_columns(plan.source_in_key, &plan.key);
        if !same_columns(&table.primary_key, &want) {
            return Err(ApplyError::Data(format!(
                "the key of {} is ({}), but ODS table {qualified} has primary key ({}): recreate the ODS table, or set sink.key_includes_source to match it",
                plan.source_table,
                want.join(", "),
                table.primary_key.join(", ")
            )));
        }
        Ok(())
    }

    /// Stops a topic (after its batch rolled back): it waits in `saiki_sink.stopped`.
    pub(crate) async fn record_stop(&self, stop: &Stop) -> Result<(), RelayError> {
        self.client
            .execute(
                "INSERT INTO saiki_sink.stopped (\"group\", topic, ods_table, source, statement, error) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (\"group\", topic) DO UPDATE SET ods_table = EXCLUDED.ods_table, source = EXCLUDED.source, statement = EXCLUDED.statement, error = EXCLUDED.error, stopped_at = now()",
                &[&self.group, &stop.topic, &stop.table, &stop.source, &stop.statement, &stop.error],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(())
    }

    /// The stopped topics of this group, with their ODS table.
    pub(crate) async fn stopped(&self) -> Result<Vec<(String, String)>, RelayError> {
        let rows = self
            .client
            .query(
                "SELECT topic, ods_table FROM saiki_sink.stopped WHERE \"group\" = $1 ORDER BY topic",
                &[&self.group],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The sources that have written these ODS tables (their watermarks): `(table, source)`.
    pub(crate) async fn sources_of(
        &self,
        tables: &[String],
    ) -> Result<Vec<(String, String)>, RelayError> {
        let rows = self
            .client
            .query(
                "SELECT ods_table, source FROM saiki_sink.watermarks WHERE ods_table = ANY($1)",
                &[&tables],
            )
            .await
            .map_err(|e| self.err(&e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The schema changes applied so far, for the planner: replayed, then settled against
    /// what the ODS tables hold (a drop or a key decision depends on the sources known when
    /// it was made; the ODS shows what was decided).
    pub(crate) async fn schema_log(&self, on_drop: OnDrop) -> Result<SchemaLog, RelayError> {
        let mut log = SchemaLog::new(on_drop);
        let rows = self
            .client
            .query(
                "SELECT ods_table, source, lsn::text, seq, changes::text FROM saiki_sink.schema_changes ORDER BY applied_at, lsn, seq",
                &[],
            )
            .await
            .map_err(|e| self.err(&e))?;
        for r in rows {
            let (table, source, lsn, seq, changes): (String, String, String, i32, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            let Ok(lsn) = lsn.parse::<Lsn>() else {
                continue;
            };
            let changes: Vec<saiki_core::ddl::Change> =
                serde_json::from_str(&changes).unwrap_or_default();
            log.record(&table, &source, (lsn, i64::from(seq)), &changes);
        }
        let tables: Vec<String> = log.tables().map(str::to_string).collect();
        for name in tables {
            let (columns, key) = match self.load_table(&name).await.map_err(|e| match e {
                ApplyError::Fatal(e) => e,
                other => RelayError::Internal(format!("reading ODS table {name}: {other:?}")),
            })? {
                Some(t) => (
                    Some(t.columns.keys().cloned().collect()),
                    t.primary_key
                        .into_iter()
                        .filter(|k| k != SOURCE_COL)
                        .collect(),
                ),
                None => (None, Vec::new()),
            };
            log.settle(&name, columns.as_ref(), &key);
        }
        Ok(log)
    }

    /// Makes the ODS table follow one `L` record of a source (docs/sink.md, "Schema
    /// changes"), inside the open transaction, once: a copy of the record from another
    /// partition finds it in `saiki_sink.schema_changes` and does nothing. A statement the
    /// ODS cannot run stops the sink with what to do, and nothing of the batch commits.
    pub(crate) async fn apply_schema_change(
        &mut self,
        sc: &SchemaChange,
    ) -> Result<(), ApplyError> {
        let (lsn, seq) = (sc.at.0.to_string(), sc.at.1 as i32);
        let done = self
            .client
            .query_opt(
                "SELECT 1 FROM saiki_sink.schema_changes WHERE ods_table = $1 AND source = $2 AND lsn = $3::text::pg_lsn AND seq = $4",
                &[&sc.table, &sc.source, &lsn, &seq],
            )
            .await
            .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
        if done.is_some() {
            return Ok(());
        }
        self.client
            .batch_execute("SELECT pg_advisory_xact_lock(hashtext('saiki_sink.ddl'))")
            .await
            .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
        let qualified = format!("{}.{}", ident(&self.schema), ident(&sc.table));
        // Read once, and again only after a statement changed it.
        let mut table = self.load_table(&sc.table).await?;
        for step in &sc.steps {
            let mut renamed_from = None;
            let sql = match (step, &table) {
                (Step::RenameTable { from, to }, None) if *to == sc.table => {
                    if self.load_table(from).await?.is_none() {
                        continue;
                    }
                    renamed_from = Some(from.clone());
                    let mut sql = format!(
                        "ALTER TABLE {}.{} RENAME TO {};",
                        ident(&self.schema),
                        ident(from),
                        ident(to)
                    );
                    for book in PER_TABLE_BOOKKEEPING.iter().chain(&["schema_changes"]) {
                        sql.push_str(&format!(
                            " UPDATE saiki_sink.{book} SET ods_table = {} WHERE ods_table = {};",
                            literal(to),
                            literal(from)
                        ));
                    }
                    sql
                }
                (Step::Create, None) => match self.create_from_shape(sc, &qualified).await? {
                    Some(sql) => sql,
                    None => continue,
                },
                (Step::AddColumn { column, type_name }, Some(t))
                    if !t.columns.contains_key(column) =>
                {
                    let ty = self.resolve_type(type_name).await?;
                    format!(
                        "ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS {} {ty}",
                        ident(column)
                    )
                }
                (Step::Backfill { column, value }, Some(t)) => {
                    let Some(ty) = t.columns.get(column) else {
                        continue;
                    };
                    format!(
                        "UPDATE {qualified} SET {c} = {v}::{ty} WHERE {src} = {s} AND ({l}, {q}) < ({lsn}::pg_lsn, {seq}) AND {c} IS NULL",
                        c = ident(column),
                        v = literal(value),
                        src = ident(SOURCE_COL),
                        s = literal(&sc.source),
                        l = ident(LSN_COL),
                        q = ident(SEQ_COL),
                        lsn = literal(&lsn),
                    )
                }
                (Step::RenameColumn { from, to }, Some(t))
                    if t.columns.contains_key(from) && !t.columns.contains_key(to) =>
                {
                    format!(
                        "ALTER TABLE {qualified} RENAME COLUMN {} TO {}",
                        ident(from),
                        ident(to)
                    )
                }
                (Step::AlterType { column, type_name }, Some(t)) => {
                    let ty = self.resolve_type(type_name).await?;
                    match t.columns.get(column) {
                        Some(have) if *have != ty => format!(
                            "ALTER TABLE {qualified} ALTER COLUMN {c} TYPE {ty} USING {c}::{ty}",
                            c = ident(column)
                        ),
                        _ => continue,
                    }
                }
                (Step::DropColumn { column }, Some(t)) if t.columns.contains_key(column) => {
                    if t.primary_key.contains(column) {
                        warn!(table = %qualified, source = %sc.source, %column, "every source dropped the column, but it is in the ODS table's primary key: kept");
                        continue;
                    }
                    format!("ALTER TABLE {qualified} DROP COLUMN {}", ident(column))
                }
                (Step::DropTable, Some(_)) => {
                    let mut sql = format!("DROP TABLE {qualified};");
                    for book in PER_TABLE_BOOKKEEPING {
                        sql.push_str(&format!(
                            " DELETE FROM saiki_sink.{book} WHERE ods_table = {};",
                            literal(&sc.table)
                        ));
                    }
                    sql
                }
                (Step::Key { columns }, Some(t)) => {
                    let want = key_columns(self.key_includes_source, columns);
                    if same_columns(&t.primary_key, &want) {
                        continue;
                    }
                    if let Some(c) = columns.iter().find(|c| !t.columns.contains_key(*c)) {
                        warn!(table = %qualified, source = %sc.source, column = %c, "every source has a new key, but the ODS table has no such column: its key is kept");
                        continue;
                    }
                    let constraint: Option<String> = self
                        .client
                        .query_opt(
                            "SELECT conname::text FROM pg_constraint WHERE conrelid = to_regclass($1) AND contype = 'p'",
                            &[&qualified],
                        )
                        .await
                        .map_err(|e| ApplyError::Fatal(self.err(&e)))?
                        .map(|r| r.get(0));
                    let cols = want.iter().map(|c| ident(c)).collect::<Vec<_>>().join(", ");
                    match constraint {
                        Some(c) => format!(
                            "ALTER TABLE {qualified} DROP CONSTRAINT {}, ADD PRIMARY KEY ({cols})",
                            ident(&c)
                        ),
                        None => format!("ALTER TABLE {qualified} ADD PRIMARY KEY ({cols})"),
                    }
                }
                (Step::Noted { what }, _) => {
                    warn!(table = %qualified, source = %sc.source, statement = %sc.statement, "{what}");
                    continue;
                }
                _ => continue,
            };
            info!(table = %qualified, source = %sc.source, %sql, "following a schema change");
            if let Err(e) = self.client.batch_execute(&sql).await {
                // A lost connection or a server going down is retried; the statement itself
                // failing stops the table's topic, not the sink.
                let transient = e
                    .code()
                    .is_none_or(|c| crate::error::server_error_is_transient(c.code()));
                if transient {
                    return Err(ApplyError::Fatal(self.err(&e)));
                }
                return Err(ApplyError::Stopped(Box::new(Stop {
                    topic: sc.topic.clone(),
                    table: sc.table.clone(),
                    source: sc.source.clone(),
                    statement: sc.statement.clone(),
                    error: format!(
                        "ODS table {qualified} cannot follow `{}` of source {} ({}): {sql}: {}. Topic {} waits; every other topic keeps applying. To go on, make the ODS table hold both shapes by hand (say, ALTER TABLE {qualified} ALTER COLUMN … TYPE text), or mark the change as followed: INSERT INTO saiki_sink.schema_changes (ods_table, source, lsn, seq, statement, changes) VALUES ({}, {}, {}, {}, '', '[]'); then resume the topic: DELETE FROM saiki_sink.stopped WHERE topic = {}",
                        sc.statement,
                        sc.source,
                        sc.source_table,
                        e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()),
                        sc.topic,
                        literal(&sc.table),
                        literal(&sc.source),
                        literal(&lsn),
                        seq,
                        literal(&sc.topic),
                    ),
                })));
            }
            for name in std::iter::once(&sc.table).chain(renamed_from.as_ref()) {
                self.tables.remove(name);
                self.stages.remove(name);
                self.statements.remove(name);
            }
            table = self.load_table(&sc.table).await?;
        }
        let changes = serde_json::to_string(&sc.changes).unwrap_or_else(|_| "[]".into());
        self.client
            .execute(
                "INSERT INTO saiki_sink.schema_changes (ods_table, source, lsn, seq, statement, changes) VALUES ($1, $2, $3::text::pg_lsn, $4, $5, $6::text::jsonb) ON CONFLICT DO NOTHING",
                &[&sc.table, &sc.source, &lsn, &seq, &sc.statement, &changes],
            )
            .await
            .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
        Ok(())
    }

    /// `CREATE TABLE` for an ODS table from a source's shape (a table created, or changed,
    /// before any of its rows came): `None` without a shape or a key to make one.
    async fn create_from_shape(
        &self,
        sc: &SchemaChange,
        qualified: &str,
    ) -> Result<Option<String>, ApplyError> {
        let Some(shape) = sc.shape.as_ref().filter(|s| !s.key.is_empty()) else {
            return Ok(None);
        };
        let mut defs = Vec::new();
        for c in &shape.columns {
            defs.push((c.name.clone(), self.resolve_type(&c.type_name).await?));
        }
        Ok(Some(create_table_sql(
            qualified,
            &defs,
            &shape.key,
            self.key_includes_source,
            &sc.source_table,
        )))
    }

    /// The table's statements for these columns, built once and cached.
    fn statements(
        &mut self,
        plan: &TablePlan<'_>,
        qualified: &str,
        stage: &str,
        cols: &[&str],
        key_cols: &[String],
    ) -> Arc<TableStatements> {
        let made_for: Vec<String> = cols
            .iter()
            .map(|c| c.to_string())
            .chain(std::iter::once(String::new()))
            .chain(key_cols.iter().cloned())
            .collect();
        if let Some((m, sql)) = self.statements.get(&plan.name) {
            if *m == made_for {
                return sql.clone();
            }
        }
        let sql = Arc::new(TableStatements::new(
            qualified, &plan.name, stage, cols, key_cols,
        ));
        self.statements
            .insert(plan.name.clone(), (made_for, sql.clone()));
        sql
    }

    /// COPYs the net rows into the staging table, encoded and sent in chunks so that the ODS
    /// parses one while the next is encoded. Only a change at or below what was applied of
    /// its source (the table's watermark) can be a replay: those rows are marked to be
    /// checked against tombstones and truncations.
    async fn copy_to_stage(
        &self,
        plan: &TablePlan<'_>,
        table: &OdsTable,
        cols: &[&str],
        copy_sql: &str,
        plain: bool,
    ) -> Result<Staged, ApplyError> {
        let marks: HashMap<String, (Lsn, i64)> = self
            .client
            .query(READ_WATERMARKS, &[&plan.name])
            .await
            .map_err(|e| self.classify(&e))?
            .iter()
            .filter_map(|r| {
                let lsn: String = r.get(1);
                Some((
                    r.get::<_, String>(0),
                    (lsn.parse().ok()?, r.get::<_, i32>(2) as i64),
                ))
            })
            .collect();
        let kinds: Vec<ColumnKind> = cols
            .iter()
            .map(|c| ColumnKind::of(table.columns.get(*c).map_or("text", String::as_str)))
            .collect();
        const CHUNK: usize = 128 << 10;
        let sink = self
            .client
            .copy_in::<_, Bytes>(copy_sql)
            .await
            .map_err(|e| self.classify(&e))?;
        futures::pin_mut!(sink);
        let mut buf = Vec::with_capacity(CHUNK + 4096);
        let mut staged = Staged::default();
        for row in plan.rows.values() {
            let check = marks
                .get(row.source.as_ref())
                .is_some_and(|m| (row.lsn, row.seq) <= *m);
            let (op, absent) = encode_row(&mut buf, row, check, plain, cols, &kinds);
            staged.any_absent |= absent;
            match op {
                StageOp::Insert => staged.inserts += 1,
                StageOp::Upsert => staged.upserts += 1,
                StageOp::Delete => staged.deletes += 1,
            }
            if buf.len() >= CHUNK {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 4096));
                sink.send(Bytes::from(full))
                    .await
                    .map_err(|e| self.classify(&e))?;
            }
        }
        if !buf.is_empty() {
            sink.send(Bytes::from(buf))
                .await
                .map_err(|e| self.classify(&e))?;
        }
        sink.finish().await.map_err(|e| self.classify(&e))?;
        Ok(staged)
    }

    /// Raises the table's watermark per source to the greatest change of the plan.
    async fn raise_watermarks(&self, plan: &TablePlan<'_>) -> Result<(), ApplyError> {
        let mut top: HashMap<&str, (Lsn, i64)> = HashMap::new();
        let changes = plan
            .rows
            .values()
            .map(|r| (r.source.as_ref(), (r.lsn, r.seq)))
            .chain(plan.truncates.iter().map(|(s, t)| (s.as_str(), (t.0, t.1))));
        for (src, at) in changes {
            let e = top.entry(src).or_insert(at);
            if at > *e {
                *e = at;
            }
        }
        for (src, (lsn, seq)) in top {
            self.client
                .execute(
                    RAISE_WATERMARK,
                    &[&plan.name, &src, &lsn.to_string(), &(seq as i32)],
                )
                .await
                .map_err(|e| self.classify(&e))?;
        }
        Ok(())
    }

    fn classify(&self, e: &tokio_postgres::Error) -> ApplyError {
        if is_data_error(e) {
            ApplyError::Data(self.err(e).to_string())
        } else {
            ApplyError::Fatal(self.err(e))
        }
    }

    /// Loads the table from the catalog, creating it or adding columns as the plan needs.
    async fn ensure_table(&mut self, plan: &TablePlan<'_>) -> Result<OdsTable, ApplyError> {
        if !self.tables.contains_key(&plan.name) {
            if let Some(t) = self.load_table(&plan.name).await? {
                self.tables.insert(plan.name.clone(), t);
            }
        }
        let missing: Vec<&plan::ColumnSeen> = match self.tables.get(&plan.name) {
            Some(t) => plan
                .columns
                .values()
                .filter(|c| !t.columns.contains_key(&c.name))
                .collect(),
            None => plan.columns.values().collect(),
        };
        if missing.is_empty() {
            if let Some(t) = self.tables.get(&plan.name) {
                return Ok(t.clone());
            }
            if plan.rows.is_empty() {
                // Only truncates for a table never seen: nothing to delete from.
                return Ok(OdsTable {
                    columns: IndexMap::new(),
                    primary_key: Vec::new(),
                });
            }
        }
        let mut defs = Vec::new();
        for c in &missing {
            let Some(t) = &c.type_name else {
                return Err(ApplyError::Data(format!(
                    "column {} of {} has no type in the record: the sink creates ODS tables from `types`; turn on source.include_types in the source relay",
                    c.name, plan.source_table
                )));
            };
            let t = self.resolve_type(t).await?;
            defs.push((c.name.clone(), t));
        }
        let qualified = format!("{}.{}", ident(&self.schema), ident(&plan.name));
        self.client
            .batch_execute("SELECT pg_advisory_xact_lock(hashtext('saiki_sink.ddl'))")
            .await
            .map_err(|e| self.classify(&e))?;
        let exists = self.load_table(&plan.name).await?.is_some();
        let sql = if !exists {
            if plan.key.is_empty() {
                // Only truncates so far: nothing to create.
                return Ok(OdsTable {
                    columns: IndexMap::new(),
                    primary_key: Vec::new(),
                });
            }
            info!(table = %qualified, "creating ODS table");
            create_table_sql(
                &qualified,
                &defs,
                &plan.key,
                plan.source_in_key,
                &plan.source_table,
            )
        } else {
            info!(table = %qualified, columns = ?defs.iter().map(|d| &d.0).collect::<Vec<_>>(), "adding ODS columns");
            defs.iter()
                .map(|(n, t)| {
                    format!(
                        "ALTER TABLE {qualified} ADD COLUMN IF NOT EXISTS {} {t};",
                        ident(n)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        if let Err(e) = self.client.batch_execute(&sql).await {
            let err = self.classify(&e);
            if let ApplyError::Data(reason) = &err {
                if !exists {
                    return Err(ApplyError::CannotCreate(format!(
                        "cannot create ODS table {qualified}: {reason}"
                    )));
                }
            }
            return Err(err);
        }
        let t = self.load_table(&plan.name).await?.ok_or_else(|| {
            ApplyError::Data(format!("ODS table {qualified} vanished after creation"))
        })?;
        self.tables.insert(plan.name.clone(), t.clone());
        Ok(t)
    }

    /// The type for an ODS column: the source's type if the ODS knows it, `text` otherwise
    /// (user-defined enums, composites and domains of the source).
    async fn resolve_type(&self, t: &str) -> Result<String, ApplyError> {
        self.client
            .batch_execute("SAVEPOINT saiki_type")
            .await
            .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
        let r = self
            .client
            .query_one("SELECT to_regtype($1) IS NOT NULL", &[&t])
            .await;
        let known = match r {
            Ok(row) => {
                self.client
                    .batch_execute("RELEASE SAVEPOINT saiki_type")
                    .await
                    .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
                row.get::<_, bool>(0)
            }
            Err(e) if e.code().is_some() => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT saiki_type")
                    .await
                    .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
                false
            }
            Err(e) => return Err(ApplyError::Fatal(self.err(&e))),
        };
        if known {
            Ok(t.to_string())
        } else {
            debug!(type_name = t, "unknown in the ODS: stored as text");
            Ok("text".to_string())
        }
    }

    async fn load_table(&self, name: &str) -> Result<Option<OdsTable>, ApplyError> {
        let qualified = format!("{}.{}", ident(&self.schema), ident(name));
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        coalesce((SELECT k.ord FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, ord)
                                  WHERE k.att = a.attnum), 0)::int
                 FROM pg_attribute a
                 LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                 ORDER BY a.attnum",
                &[&qualified],
            )
            .await
            .map_err(|e| ApplyError::Fatal(self.err(&e)))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut columns = IndexMap::new();
        let mut pk: Vec<(i32, String)> = Vec::new();
        for r in &rows {
            let name: String = r.get(0);
            let ty: String = r.get(1);
            let pos: i32 = r.get(2);
            if pos > 0 {
                pk.push((pos, name.clone()));
            }
            columns.insert(name, ty);
        }
        pk.sort();
        Ok(Some(OdsTable {
            columns,
            primary_key: pk.into_iter().map(|p| p.1).collect(),
        }))
    }

    /// A temp staging table with the ODS table's columns plus `_op` and `_absent`.
    async fn ensure_stage(&mut self, name: &str, table: &OdsTable) -> Result<String, ApplyError> {
        let cols: Vec<String> = table.columns.keys().cloned().collect();
        if let Some((stage, made_for)) = self.stages.get(name) {
            if *made_for == cols {
                return Ok(stage.clone());
            }
        }
        let stage = format!("pg_temp.{}", ident(&format!("saiki_stage_{name}")));
        let defs: Vec<String> = table
            .columns
            .iter()
            .map(|(c, t)| format!("{} {t}", ident(c)))
            .collect();
        let sql = format!(
            "DROP TABLE IF EXISTS {stage}; CREATE TEMP TABLE {stage} (_op \"char\" NOT NULL, _absent text[], _key text, _check boolean, {}) ON COMMIT DELETE ROWS",
            defs.join(", ")
        );
        self.client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.classify(&e))?;
        self.stages.insert(name.to_string(), (stage.clone(), cols));
        Ok(stage)
    }
}

/// What was copied into the staging table.
#[derive(Debug, Default)]
struct Staged {
    inserts: usize,
    upserts: usize,
    deletes: usize,
    /// Some upsert lacks a column (unchanged TOAST): the MERGE keeps those.
    any_absent: bool,
}

/// How a staged row is applied: the `_op` of the staging table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageOp {
    /// A plain INSERT: a key new to the ODS (see [`NetRow::born`]), every column present.
    Insert,
    /// An upsert guarded by `(commit_lsn, seq)`.
    Upsert,
    Delete,
}

/// `CREATE TABLE` of an ODS table: the bookkeeping columns, then `defs` (name, type), keyed
/// by `key` (after `_saiki_source` when `source_in_key`).
fn create_table_sql(
    qualified: &str,
    defs: &[(String, String)],
    key: &[String],
    source_in_key: bool,
    source_table: &str,
) -> String {
    let mut cols: Vec<String> = vec![
        format!("{} text NOT NULL", ident(SOURCE_COL)),
        format!("{} pg_lsn NOT NULL", ident(LSN_COL)),
        format!("{} int NOT NULL", ident(SEQ_COL)),
        format!("{} timestamptz NOT NULL", ident(APPLIED_COL)),
    ];
    cols.extend(defs.iter().map(|(n, t)| format!("{} {t}", ident(n))));
    let pk: Vec<String> = key_columns(source_in_key, key)
        .iter()
        .map(|k| ident(k))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {qualified} ({}, PRIMARY KEY ({}));
         COMMENT ON TABLE {qualified} IS {}",
        cols.join(", "),
        pk.join(", "),
        literal(&format!(
            "saiki-relay sink: materialized from {source_table}"
        ))
    )
}

/// An ODS table's primary key for a source key: `_saiki_source` first when `source_in_key`.
fn key_columns(source_in_key: bool, key: &[String]) -> Vec<String> {
    let source = source_in_key.then(|| SOURCE_COL.to_string());
    source.into_iter().chain(key.iter().cloned()).collect()
}

/// Whether two primary keys have the same columns, in any order.
fn same_columns(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

/// One COPY text line for a net row, and whether some batch column is absent from it.
/// `plain` allows [`StageOp::Insert`] for a born row.
fn encode_row(
    out: &mut Vec<u8>,
    row: &NetRow<'_>,
    check: bool,
    plain: bool,
    cols: &[&str],
    kinds: &[ColumnKind],
) -> (StageOp, bool) {
    let absent: Vec<&str> = if row.op == Op::Upsert {
        (0..cols.len())
            .filter(|i| !row.values.contains(*i))
            .map(|i| cols[i])
            .collect()
    } else {
        Vec::new()
    };
    let op = match row.op {
        Op::Delete => StageOp::Delete,
        Op::Upsert if plain && row.born && !check && absent.is_empty() => StageOp::Insert,
        Op::Upsert => StageOp::Upsert,
    };
    out.push(match op {
        StageOp::Insert => b'I',
        StageOp::Upsert => b'U',
        StageOp::Delete => b'D',
    });
    out.push(b'\t');
    if absent.is_empty() {
        out.extend_from_slice(b"\\N");
    } else {
        let mut lit = Vec::new();
        lit.push(b'{');
        for (i, a) in absent.iter().enumerate() {
            if i > 0 {
                lit.push(b',');
            }
            lit.push(b'"');
            for &b in a.as_bytes() {
                if b == b'"' || b == b'\\' {
                    lit.push(b'\\');
                }
                lit.push(b);
            }
            lit.push(b'"');
        }
        lit.push(b'}');
        plan::copy_escape(out, &lit);
    }
    out.push(b'\t');
    // The key's text is what tombstones are keyed by: only deletes and replays use it.
    if op == StageOp::Delete || check {
        plan::copy_escape(out, plan::key_text(&row.key).as_bytes());
    } else {
        out.extend_from_slice(b"\\N");
    }
    out.push(b'\t');
    out.push(if check { b't' } else { b'f' });
    out.push(b'\t');
    plan::copy_escape(out, row.source.as_bytes());
    out.push(b'\t');
    row.lsn.write_to(out);
    out.push(b'\t');
    let _ = write!(out, "{}", row.seq);
    for (i, kind) in kinds.iter().enumerate() {
        out.push(b'\t');
        match row.values.get(i) {
            Some(v) => plan::write_copy_value(out, v, *kind),
            None => out.extend_from_slice(b"\\N"),
        }
    }
    out.push(b'\n');
    (op, !absent.is_empty())
}
