//! `saiki-relay source`: streams a replication slot into Kafka (docs/relay.md).
//!
//! Invariants kept here (with [`AckTracker`] holding the first):
//! 1. The slot is confirmed only to [`AckTracker::confirmable`]: never past a change Kafka has
//!    not acknowledged. On any error nothing more is confirmed; the next session restarts at
//!    the slot's confirmed position (at-least-once: duplicates, never gaps).
//! 2. Bounded memory: at most `max_in_flight` messages wait for Kafka; past that the relay
//!    stops reading the stream (TCP backpressure to the walsender) but keeps sending status
//!    updates, so `wal_sender_timeout` never fires.
//! 3. Per-row order: the key (identity columns) picks the partition; the producer is
//!    idempotent, so retries do not reorder.

pub(crate) mod ack;
pub(crate) mod route;
pub(crate) mod snapshot;
pub(crate) mod snapshot_driver;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use saiki_core::encode::ObjectWriter;
use saiki_core::json::{write_str, write_u64};
use saiki_core::record::{Action, HEARTBEAT_PREFIX, SNAPSHOT_PREFIX};
use saiki_core::Lsn;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, error, info, info_span, warn};

use crate::config::{KafkaConfig, SnapshotMode, SourceConfig};
use crate::error::RelayError;
use crate::kafka::{Kafka, Outgoing};
use crate::metrics::SourceMetrics;
use crate::pg::dsn::Dsn;
use crate::pg::wire::{self, Backend, Replication};
use crate::pg::{quote, PgConn, ReplicationStream};
use crate::retry::{supervise, Supervised};
use crate::source::ack::{AckTracker, Ticket};
use crate::source::route::{Keys, RecordView, TopicTemplate};
use crate::source::snapshot_driver::{ReadyChunk, SnapshotDriver};

/// Settings of the replication session, so values print the same whatever the server's
/// defaults: ISO dates in UTC, round-trip floats.
pub(crate) const SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c timezone=UTC -c intervalstyle=postgres -c extra_float_digits=3";

type Delivery = futures::future::BoxFuture<'static, (Ticket, Result<(), String>)>;

/// How often the relay looks for requested snapshots while none runs.
const SNAPSHOT_POLL: Duration = Duration::from_secs(1);

/// Everything `run` needs, checked once.
pub(crate) struct SourceRuntime {
    pub(crate) source: SourceConfig,
    pub(crate) kafka: KafkaConfig,
    pub(crate) dsn: Dsn,
    pub(crate) slot: String,
}

impl SourceRuntime {
    pub(crate) fn new(source: SourceConfig, kafka: KafkaConfig) -> Result<Self, RelayError> {
        let dsn =
            Dsn::parse(&source.dsn).map_err(|e| RelayError::Config(format!("source.dsn: {e}")))?;
        if source.name.trim().is_empty() {
            return Err(RelayError::Config(
                "source.name is empty: name the source (e.g. the shard)".into(),
            ));
        }
        if source.snapshot_chunk_rows == 0 {
            return Err(RelayError::Config(
                "source.snapshot_chunk_rows must be at least 1".into(),
            ));
        }
        if source.max_in_flight == 0 {
            return Err(RelayError::Config(
                "source.max_in_flight must be at least 1".into(),
            ));
        }
        if source.status_interval.is_zero() || source.status_interval > Duration::from_secs(30) {
            return Err(RelayError::Config("source.status_interval must be between 1ms and 30s (wal_sender_timeout is 60s by default)".into()));
        }
        let slot = source.slot.clone().unwrap_or_else(|| {
            format!(
                "saiki_{}",
                source
                    .name
                    .to_ascii_lowercase()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            )
        });
        Ok(SourceRuntime {
            source,
            kafka,
            dsn,
            slot,
        })
    }

    /// The START_REPLICATION command with the plugin options the relay relies on.
    pub(crate) fn start_command(&self) -> String {
        let mut opts = vec![
            ("include-transaction", "true".to_string()),
            ("include-types", self.source.include_types.to_string()),
            (
                "include-timestamp",
                self.source.include_timestamp.to_string(),
            ),
            ("skip-empty-xacts", "true".to_string()),
            ("batch-bytes", self.source.batch_bytes.to_string()),
            ("stream-changes", self.source.stream_large.to_string()),
            // The extension's own tables (snapshot progress) are bookkeeping, not data.
            ("filter-tables", "saiki.*".to_string()),
        ];
        if !self.source.tables.is_empty() {
            opts.push(("add-tables", self.source.tables.join(",")));
        }
        let opts: Vec<String> = opts
            .iter()
            .map(|(k, v)| format!("{} {}", quote::ident(k), quote::literal(v)))
            .collect();
        format!(
            "START_REPLICATION SLOT {} LOGICAL 0/0 ({})",
            quote::ident(&self.slot),
            opts.join(", ")
        )
    }
}

/// Runs the source until `shutdown` turns true (then drains, confirms and returns Ok) or a
/// definite error. Transient errors restart the session with exponential backoff.
pub(crate) async fn run(
    rt: Arc<SourceRuntime>,
    metrics: Arc<SourceMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let kafka = Kafka::new(&rt.kafka, rt.source.max_in_flight)?;
    let supervised = Supervised {
        ready: &metrics.ready,
        restarts: &metrics.reconnects,
        backoff_max: rt.source.reconnect_backoff_max,
    };
    let span = || info_span!("source", name = %rt.source.name, slot = %rt.slot);
    let memory = std::sync::Mutex::new(SlotMemory::default());
    supervise(supervised, &mut shutdown, span, async |shutdown| {
        session(&rt, &metrics, &kafka, &memory, shutdown).await
    })
    .await
}

/// What earlier sessions of this process saw of the slot: the server (system identifier,
/// timeline) they streamed from, if any did.
#[derive(Debug, Default)]
struct SlotMemory {
    system: Option<Server>,
}

/// A server as `IDENTIFY_SYSTEM` names it: (system identifier, timeline).
pub(crate) type Server = (String, String);

/// Why the slot no longer holds every change since the position it was confirmed at, and
/// whether a sweep may follow the resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) why: String,
    /// Where the new slot starts: the ODS rows of this source last changed before it that the
    /// resync does not read again were deleted in the gap (issue #14). `None` when the server
    /// is another one: its positions do not compare with the ODS's.
    pub(crate) sweep_before: Option<Lsn>,
}

/// Why the slot no longer holds every change since the position it was confirmed at
/// (issue #14): it was missing (a failover to a standby, which PostgreSQL 15 gives no logical
/// slots, or a DBA dropped it), or it is another server's, or someone created it anew after
/// this process last confirmed. `before` is the server earlier sessions of this process
/// streamed from; `origin` the server `saiki.slot_origins` says the slot was created on (a
/// standby has that row from its primary, so a relay started after the promotion knows too).
/// `None`: the slot continues where it was left, or nothing says otherwise (a first start).
pub(crate) fn slot_gap(
    before: Option<&Server>,
    origin: Option<&Server>,
    now: &Server,
    created: bool,
    slot_confirmed: Lsn,
    last_confirmed: Lsn,
) -> Option<Gap> {
    let known = before.or(origin)?;
    if known.0 != now.0 {
        // A slot on another system that exists is not ours to judge; one we had to create is.
        return (before.is_some() || created).then(|| Gap {
            why: format!(
                "the server is another one (system identifier {}, was {}): its slot is not the one this relay streamed from",
                now.0, known.0
            ),
            sweep_before: None,
        });
    }
    let timeline = if known.1 != now.1 {
        format!(" (timeline {} now, was {}: a promotion)", now.1, known.1)
    } else {
        String::new()
    };
    if created {
        return Some(Gap {
            why: format!("the slot was missing and has been created anew{timeline}"),
            sweep_before: Some(slot_confirmed),
        });
    }
    if before.is_some() && last_confirmed.0 > 0 && slot_confirmed > last_confirmed {
        return Some(Gap {
            why: format!(
                "the slot starts at {slot_confirmed}, past {last_confirmed}, where this relay confirmed it last{timeline}: it is not the slot this relay streamed from"
            ),
            sweep_before: Some(slot_confirmed),
        });
    }
    None
}

/// The slot's row of `saiki.slot_origins`: the server it was created on. `None` without the
/// row, or without the table (no extension, or one older than 0.3.0).
async fn slot_origin(conn: &mut PgConn, slot: &str) -> Option<Server> {
    let rows = conn
        .simple_query(&format!(
            "SELECT system_identifier, timeline::text FROM saiki.slot_origins WHERE slot_name = {}",
            quote::literal(slot)
        ))
        .await;
    match rows {
        Ok(rows) => rows.first().map(|r| {
            let col = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            (col(0), col(1))
        }),
        Err(RelayError::Server { error, .. }) if error.code == "42501" => {
            warn!(error = %error.message, "the relay's role may not read saiki.slot_origins: a relay started after a failover cannot tell the gap; GRANT SELECT, INSERT, UPDATE ON saiki.slot_origins TO it (docs/operations.md, Security)");
            None
        }
        Err(e) => {
            debug!(error = %e, "no saiki.slot_origins (the extension is missing or older than 0.3.0): a relay started after a failover cannot tell the gap");
            None
        }
    }
}

/// Records the server the slot is on (and, for a slot just created, where it starts) in
/// `saiki.slot_origins`. Logged, never fatal: without it only a restart after a failover
/// misses the gap.
async fn record_origin(conn: &mut PgConn, slot: &str, now: &Server, what: Origin<'_>) {
    if let Err(e) = conn.simple_query(&origin_sql(slot, now, what)).await {
        debug!(error = %e, "could not record the slot's origin in saiki.slot_origins");
    }
}

/// What a row of `saiki.slot_origins` records besides the server.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// The slot is on this server (it was there before, or survived a promotion).
    Seen,
    /// The slot was just created, starting here.
    Created(Lsn),
    /// A resync was asked for in the same transaction: when, why, and where its sweep
    /// starts (`saiki.resyncs` shows it); the slot is created next.
    Resync(&'a Gap),
}

/// The statement that records the slot's origin (see [`record_origin`], [`Origin`]).
fn origin_sql(slot: &str, now: &Server, what: Origin<'_>) -> String {
    let lsn = |l: Option<Lsn>| match l {
        Some(l) => format!("{}::pg_lsn", quote::literal(&l.to_string())),
        None => "NULL".into(),
    };
    let (columns, values, set) = match what {
        Origin::Seen => ("", String::new(), ""),
        Origin::Created(start) => (
            ", created_lsn",
            format!(", {}", lsn(Some(start))),
            ", created_lsn = excluded.created_lsn",
        ),
        Origin::Resync(gap) => (
            ", created_lsn, resync_at, resync_reason, resync_before",
            format!(
                ", NULL, now(), {}, {}",
                quote::literal(&gap.why),
                lsn(gap.sweep_before)
            ),
            ", created_lsn = NULL, resync_at = now(), resync_reason = excluded.resync_reason, \
             resync_before = excluded.resync_before",
        ),
    };
    format!(
        "INSERT INTO saiki.slot_origins AS o (slot_name, system_identifier, timeline{columns}) \
         VALUES ({}, {}, {}{values}) ON CONFLICT (slot_name) DO UPDATE \
         SET system_identifier = excluded.system_identifier, timeline = excluded.timeline, \
             recorded_at = now(){set}",
        quote::literal(slot),
        quote::literal(&now.0),
        now.1.parse::<i64>().unwrap_or(0),
    )
}

/// Checks the slot: `Some(confirmed position)` if it exists (with plugin saiki, in the
/// relay's database), `None` if it is missing.
async fn find_slot(conn: &mut PgConn, rt: &SourceRuntime) -> Result<Option<Lsn>, RelayError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT plugin, database, confirmed_flush_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            quote::literal(&rt.slot)
        ))
        .await?;
    if let Some(row) = rows.first() {
        let plugin = row
            .first()
            .cloned()
            .flatten()
            .unwrap_or_else(|| "(none: a physical slot)".into());
        if plugin != "saiki" {
            return Err(RelayError::WrongPlugin {
                slot: rt.slot.clone(),
                plugin,
            });
        }
        let db = row.get(1).cloned().flatten().unwrap_or_default();
        if db != rt.dsn.dbname {
            return Err(RelayError::WrongDatabase {
                slot: rt.slot.clone(),
                expected: rt.dsn.dbname.clone(),
                actual: db,
            });
        }
        let confirmed = row
            .get(2)
            .cloned()
            .flatten()
            .and_then(|l| l.parse().ok())
            .unwrap_or(Lsn(0));
        return Ok(Some(confirmed));
    }
    Ok(None)
}

/// Creates the slot with plugin saiki; returns its starting point.
async fn create_slot(conn: &mut PgConn, rt: &SourceRuntime) -> Result<Lsn, RelayError> {
    info!(slot = %rt.slot, "creating replication slot with plugin saiki");
    let created = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL saiki NOEXPORT_SNAPSHOT",
            quote::ident(&rt.slot)
        ))
        .await;
    match created {
        // Its position: the first column of CREATE_REPLICATION_SLOT's row is the slot name,
        // the second the consistent point.
        Ok(rows) => Ok(rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|l| l.parse().ok())
            .unwrap_or(Lsn(0))),
        Err(RelayError::Server { target, mut error }) => {
            if error
                .message
                .contains("may not be used as an output plugin")
            {
                error.hint = Some(saiki_core::loading::ALLOW_HINT.to_string());
            }
            Err(RelayError::Server { target, error })
        }
        Err(e) => Err(e),
    }
}

/// `IDENTIFY_SYSTEM` on the replication connection: the server (system identifier, timeline)
/// and its WAL flush position.
async fn identify_system(conn: &mut PgConn) -> Result<(Server, Lsn), RelayError> {
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
    let row = rows.first().ok_or_else(|| {
        RelayError::Protocol(crate::pg::wire::ProtocolError(
            "IDENTIFY_SYSTEM returned no row".into(),
        ))
    })?;
    let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    Ok(((col(0), col(1)), col(2).parse().unwrap_or(Lsn(0))))
}

/// The slot lost changes (`gap`): a snapshot of every captured table brings the ODS back to
/// the tables as they are (docs/operations.md, "A primary failover"), and, with extension
/// 0.3.0, each ends with a sweep of the rows deleted in the gap. The requests and the slot's
/// new origin are written in one transaction; an error is the session's (it is retried, and
/// the slot is not created before the resync is asked for). Without the extension, the relay
/// streams on and says what a DBA must do.
async fn resync(
    conn: &mut PgConn,
    rt: &SourceRuntime,
    metrics: &SourceMetrics,
    gap: &Gap,
    now: &Server,
) -> Result<(), RelayError> {
    let why = &gap.why;
    let present = conn
        .simple_query(
            "SELECT to_regclass('saiki.snapshots') IS NOT NULL, to_regclass('saiki.slot_origins') IS NOT NULL",
        )
        .await?;
    let flag = |i: usize| {
        present
            .first()
            .and_then(|r| r.get(i).cloned().flatten())
            .as_deref()
            == Some("t")
    };
    let (extension, current) = (flag(0), flag(1));
    if !extension {
        // Nothing to ask: streaming on is all this relay can do.
        metrics.note_resync(why);
        error!(reason = %why, "resync needed, and the source database has no saiki extension: changes between the last confirmed position and now may be missing; CREATE EXTENSION saiki there, then run saiki-relay snapshot --table for every captured table");
        return Ok(());
    }
    let tables = captured_tables(conn, rt).await?;
    let mut sql: Vec<String> = tables
        .iter()
        .map(|t| snapshot::request_if_there_sql(&rt.slot, t))
        .collect();
    if let Some(before) = gap.sweep_before.filter(|_| current) {
        sql.push(snapshot::sweep_sql(&rt.slot, before));
    }
    if current {
        sql.push(origin_sql(&rt.slot, now, Origin::Resync(gap)));
    }
    // One simple query: one transaction.
    match conn.simple_query(&sql.join("; ")).await {
        Err(RelayError::Server { error, .. }) if current && error.code == "42501" => {
            // A role granted what 0.2.0 needed, not saiki.slot_origins: resync without
            // recording it (a relay restarted after a failover would not know the gap).
            warn!(error = %error.message, "the relay's role may not write saiki.slot_origins: GRANT SELECT, INSERT, UPDATE ON saiki.slot_origins TO it (docs/operations.md, Security)");
            sql.pop();
            conn.simple_query(&sql.join("; ")).await?;
        }
        r => {
            r?;
        }
    }
    metrics.note_resync(why);
    let sweep = match (gap.sweep_before, current) {
        (Some(lsn), true) => format!("; at each table's end the sink deletes the rows of this source last changed before {lsn} that the snapshot did not read (deleted in the gap)"),
        (Some(_), false) => "; rows deleted in the gap stay in the ODS: the extension is older than 0.3.0 (ALTER EXTENSION saiki UPDATE)".into(),
        (None, _) => "; rows deleted in the gap stay in the ODS: positions on another server do not compare with the ODS's".into(),
    };
    warn!(reason = %why, tables = tables.len(), "resync: changes between the last confirmed position and now may be missing from Kafka; a snapshot of every captured table was requested (progress: saiki-relay status){sweep}");
    Ok(())
}

/// `snapshot = "initial"`: on a new slot (or a slot that never had a snapshot, e.g. when a
/// crash came between creating the slot and asking), asks for a snapshot of every captured
/// table.
async fn request_initial_snapshots(
    conn: &mut PgConn,
    rt: &SourceRuntime,
    created: bool,
) -> Result<(), RelayError> {
    let has_ext = !conn
        .simple_query("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'saiki'")
        .await?
        .is_empty();
    if !has_ext {
        return Err(RelayError::Config(format!(
            "source.snapshot = \"initial\" needs the saiki extension in database {}: run CREATE EXTENSION saiki there (or set snapshot = \"never\")",
            rt.dsn.dbname
        )));
    }
    if !created
        && !conn
            .simple_query(&format!(
                "SELECT 1 FROM saiki.snapshots WHERE slot_name = {} LIMIT 1",
                quote::literal(&rt.slot)
            ))
            .await?
            .is_empty()
    {
        return Ok(());
    }
    let n = request_snapshots(conn, rt).await?;
    info!(tables = n, "initial snapshot requested (progress: saiki-relay status, or SELECT * FROM saiki.snapshot_progress)");
    Ok(())
}

/// Asks for a snapshot of every table the relay captures; returns how many.
/// Asks for a snapshot of every captured table. Returns how many.
async fn request_snapshots(conn: &mut PgConn, rt: &SourceRuntime) -> Result<usize, RelayError> {
    let tables = captured_tables(conn, rt).await?;
    for t in &tables {
        snapshot::request(conn, &rt.slot, t).await?;
    }
    Ok(tables.len())
}

/// The tables `source.tables` captures, as quoted `schema.table`.
async fn captured_tables(conn: &mut PgConn, rt: &SourceRuntime) -> Result<Vec<String>, RelayError> {
    let patterns = (!rt.source.tables.is_empty()).then(|| rt.source.tables.join(","));
    let opts =
        saiki_core::options::Options::parse(patterns.as_deref().map(|p| ("add-tables", Some(p))))
            .map_err(|e| RelayError::Config(format!("source.tables: {e}")))?;
    let rows = conn
        .simple_query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'saiki') \
             AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2",
        )
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let (schema, table) = (r.first().cloned().flatten()?, r.get(1).cloned().flatten()?);
            opts.table_included(&schema, &table)
                .then(|| format!("{}.{}", quote::ident(&schema), quote::ident(&table)))
        })
        .collect())
}

struct Session<'a> {
    rt: &'a SourceRuntime,
    metrics: &'a SourceMetrics,
    kafka: &'a Kafka,
    topics: TopicTemplate,
    source_json: Vec<u8>,
    tx_key: Vec<u8>,
    tracker: AckTracker,
    deliveries: FuturesUnordered<Delivery>,
    /// Changes per table of the open transaction, for its C record.
    counts: BTreeMap<String, u64>,
    snapshots: SnapshotDriver,
    /// Streamed transactions that have not ended yet, by xid.
    streams: HashMap<u64, OpenStream>,
    /// This session's replay of the stream: put on every record of a streamed transaction
    /// (`"attempt"`), so that a consumer tells a transaction streamed again after a restart
    /// from its first, unfinished sending (the session's start in µs since the Unix epoch;
    /// sessions of one slot never overlap), as the member it is: `,"attempt":N`.
    attempt: Vec<u8>,
}

/// A streamed transaction while it runs: what its commit or abort must reach.
#[derive(Debug, Default)]
struct OpenStream {
    /// Changes per table, for its C record.
    counts: BTreeMap<String, u64>,
    /// The table topics that got its records, with their partition counts: every partition
    /// of each gets its C or A, and the C lists them (`"partitions"`), so that a consumer
    /// knows when it has seen the end in all of them.
    topics: BTreeMap<String, i32>,
}

async fn session(
    rt: &SourceRuntime,
    metrics: &SourceMetrics,
    kafka: &Kafka,
    memory: &std::sync::Mutex<SlotMemory>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), RelayError> {
    let mut conn = PgConn::connect(&rt.dsn, true, SESSION_OPTIONS).await?;
    let (system, flushed) = identify_system(&mut conn).await?;
    let origin = slot_origin(&mut conn, &rt.slot).await;
    let slot = find_slot(&mut conn, rt).await?;
    let created = slot.is_none();
    let before = memory
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .system
        .clone();
    let last_confirmed = Lsn(metrics.confirmed_lsn.load(Ordering::Relaxed));
    // A missing slot will start at or after the position flushed now: the rows last changed
    // before it that a resync does not read again are gone.
    let gap = slot_gap(
        before.as_ref(),
        origin.as_ref(),
        &system,
        created,
        slot.unwrap_or(flushed),
        last_confirmed,
    );
    // The resync is asked for, with the slot's origin recorded, in one transaction and before
    // the slot is created: a relay killed in between finds the slot missing again (and asks
    // again), or finds it with the resync under way; never the slot without the resync.
    // A resync that could not be asked for (with the extension there) fails the session
    // before the slot is created: the next one finds the slot missing and asks again.
    if let Some(gap) = &gap {
        resync(&mut conn, rt, metrics, gap, &system).await?;
    } else if !created && origin.as_ref() != Some(&system) {
        // A slot that was there before this relay recorded it, or that survived a promotion.
        record_origin(&mut conn, &rt.slot, &system, Origin::Seen).await;
    }
    let start = match slot {
        Some(confirmed) => confirmed,
        None => {
            let start = create_slot(&mut conn, rt).await?;
            record_origin(&mut conn, &rt.slot, &system, Origin::Created(start)).await;
            start
        }
    };
    if gap.is_some() || created {
        // What this process knows from now on: this server, and a slot that starts here (so
        // that a session failing before it streams does not take the slot for a stranger).
        memory.lock().unwrap_or_else(|p| p.into_inner()).system = Some(system.clone());
        metrics.confirmed_lsn.store(start.0, Ordering::Relaxed);
    }
    if gap.is_none() && rt.source.snapshot == SnapshotMode::Initial {
        request_initial_snapshots(&mut conn, rt, created).await?;
    }
    let tls = conn.is_tls();
    let mut stream = conn.start_replication(&rt.start_command()).await?;
    info!(dsn = %rt.dsn, tls, system = %system.0, timeline = %system.1, "streaming from the slot");
    memory.lock().unwrap_or_else(|p| p.into_inner()).system = Some(system);
    metrics.ready.store(true, Ordering::Relaxed);

    let mut source_json = Vec::new();
    write_str(&mut source_json, rt.source.name.as_bytes());
    let mut tx_key = b"{\"source\":".to_vec();
    tx_key.extend_from_slice(&source_json);
    tx_key.push(b'}');
    let mut s = Session {
        rt,
        metrics,
        kafka,
        topics: TopicTemplate::new(
            &rt.kafka.topic_template,
            &rt.kafka.topic_prefix,
            &rt.source.name,
        ),
        source_json,
        tx_key,
        tracker: AckTracker::new(),
        deliveries: FuturesUnordered::new(),
        counts: BTreeMap::new(),
        streams: HashMap::new(),
        attempt: {
            let mut m = b",\"attempt\":".to_vec();
            write_u64(&mut m, saiki_core::time::unix_micros_now().max(0) as u64);
            m
        },
        snapshots: SnapshotDriver::new(
            rt.dsn.clone(),
            rt.slot.clone(),
            rt.source.snapshot_chunk_rows,
        ),
    };
    let mut snap_tick = tokio::time::interval(SNAPSHOT_POLL);
    snap_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut status = tokio::time::interval(rt.source.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hb_every = if rt.source.heartbeat_interval.is_zero() {
        Duration::from_secs(3600 * 24 * 365)
    } else {
        rt.source.heartbeat_interval
    };
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + hb_every, hb_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hb_conn: Option<PgConn> = None;
    let mut confirmed_sent = Lsn(0);

    loop {
        let can_read = s.deliveries.len() < rt.source.max_in_flight;
        tokio::select! {
            r = stream.read.read_buf(&mut stream.rbuf), if can_read => {
                let n = r.map_err(|e| stream.io(e))?;
                if n == 0 {
                    return Err(stream.io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the replication connection")));
                }
                let reply = s.process_buffer(&mut stream).await?;
                if reply {
                    send_status(&mut stream, &s, &mut confirmed_sent, true).await?;
                }
                s.snapshot_step_if_confirmable().await;
            }
            Some((ticket, result)) = s.deliveries.next() => {
                s.delivered(ticket, result)?;
                // The next chunk at once, not at the next poll.
                s.snapshot_step_if_confirmable().await;
            }
            _ = status.tick() => {
                send_status(&mut stream, &s, &mut confirmed_sent, false).await?;
            }
            _ = heartbeat.tick() => {
                send_heartbeat(rt, metrics, &mut hb_conn).await;
            }
            _ = snap_tick.tick() => {
                s.snapshots.step(s.tracker.confirmable(), s.metrics).await;
            }
            _ = s.snapshots.joined() => {}
            _ = shutdown.changed() => {
                return s.drain(&mut stream, &mut confirmed_sent).await;
            }
        }
    }
}

async fn send_status(
    stream: &mut ReplicationStream,
    s: &Session<'_>,
    sent: &mut Lsn,
    reply_requested: bool,
) -> Result<(), RelayError> {
    let lsn = s.tracker.confirmable();
    let now = saiki_core::time::unix_micros_now();
    wire::standby_status_update(&mut stream.wbuf, lsn, lsn, lsn, now, false);
    stream.flush().await?;
    if lsn != *sent {
        debug!(confirmed = %lsn, reply_requested, "confirmed");
        *sent = lsn;
    }
    s.metrics.confirmed_lsn.store(lsn.0, Ordering::Relaxed);
    Ok(())
}

/// Writes a heartbeat on a side connection (reconnecting as needed). A failure is logged and
/// retried at the next tick: the heartbeat only keeps an idle slot moving.
async fn send_heartbeat(rt: &SourceRuntime, metrics: &SourceMetrics, conn: &mut Option<PgConn>) {
    if conn.is_none() {
        match PgConn::connect(&rt.dsn, false, "").await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                warn!(error = %e, "heartbeat connection failed");
                return;
            }
        }
    }
    if let Some(c) = conn.as_mut() {
        let sql = format!(
            "SELECT pg_catalog.pg_logical_emit_message(false, {}, now()::text)",
            quote::literal(HEARTBEAT_PREFIX)
        );
        match c.simple_query(&sql).await {
            Ok(_) => {
                metrics.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(error = %e, "heartbeat failed");
                *conn = None;
            }
        }
    }
}

impl Session<'_> {
    /// Handles every complete message in the read buffer. Returns whether the server asked for
    /// an immediate status reply.
    async fn process_buffer(&mut self, stream: &mut ReplicationStream) -> Result<bool, RelayError> {
        let mut reply = false;
        while let Some(msg) = wire::parse_backend(&mut stream.rbuf)? {
            match msg {
                Backend::CopyData(body) => match wire::parse_replication(body)? {
                    Replication::XLogData { wal_end, data, .. } => {
                        self.metrics
                            .server_wal_end
                            .fetch_max(wal_end.0, Ordering::Relaxed);
                        let mut rest = data;
                        while !rest.is_empty() {
                            let end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
                            let line = rest.slice(..end);
                            rest.advance((end + 1).min(rest.len()));
                            if !line.is_empty() {
                                self.record(&line).await?;
                            }
                        }
                    }
                    Replication::Keepalive {
                        wal_end,
                        reply_requested,
                    } => {
                        self.metrics
                            .server_wal_end
                            .fetch_max(wal_end.0, Ordering::Relaxed);
                        // Everything before a keepalive was sent before it: with nothing in
                        // flight, its WAL end holds no unacknowledged change.
                        self.tracker.idle_at(wal_end);
                        reply |= reply_requested;
                    }
                },
                Backend::Error(e) => {
                    return Err(RelayError::Server {
                        target: stream.target.clone(),
                        error: Box::new(e),
                    })
                }
                Backend::CopyDone => {
                    return Err(stream.io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "server ended the replication stream",
                    )))
                }
                _ => {}
            }
        }
        Ok(reply)
    }

    async fn record(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        let view = route::parse(bytes).map_err(|e| RelayError::Record(e.to_string()))?;
        // A record of a streamed transaction: its xid.
        let stream = (view.streamed == Some(true)).then_some(view.xid);
        if let Some(xid) = stream {
            return self.streamed(bytes, &view, xid).await;
        }
        let commit_lsn = view.commit_lsn.ok_or_else(|| {
            RelayError::Record(format!(
                "{:?} record without commit_lsn at {}, outside of a streamed transaction",
                view.action, view.lsn
            ))
        })?;
        let ticket = self.tracker.unit_for(commit_lsn);
        self.change(bytes, &view, ticket, None).await
    }

    /// A record of streamed transaction `xid` (docs/relay.md, "Large transactions"): its
    /// changes go where a committed one's would, marked `streamed` and with this session's
    /// `attempt`; `S` and `E` go to the transactions topic; its `C` or `A` goes there and to
    /// every partition of every table topic that got its records.
    async fn streamed(
        &mut self,
        bytes: &[u8],
        view: &RecordView<'_>,
        xid: u64,
    ) -> Result<(), RelayError> {
        match view.action {
            Action::StreamStart | Action::StreamStop => {
                let ticket = self.tracker.streamed(xid);
                if let std::collections::hash_map::Entry::Vacant(e) = self.streams.entry(xid) {
                    e.insert(OpenStream::default());
                    self.metrics.streamed_open.fetch_add(1, Ordering::Relaxed);
                }
                let value = self.value(bytes, true);
                let all_headers = self.headers(view);
                let headers = all_headers.as_ref().map_or(&[][..], |h| &h[..]);
                let topic = self.topics.transactions_topic();
                self.produce_by_source(ticket, &topic, &value, headers)
                    .await
            }
            Action::StreamAbort if view.subxid.is_some() => {
                // A subtransaction rolled back: its records are dropped by the consumer,
                // which must see this in every partition that may hold them.
                let ticket = self.tracker.streamed(xid);
                let topics = self
                    .streams
                    .get(&xid)
                    .map(|s| s.topics.clone())
                    .unwrap_or_default();
                let value = self.value(bytes, true);
                self.stream_marker(ticket, &topics, &value, view).await
            }
            Action::StreamAbort | Action::Commit => {
                let end = match view.action {
                    Action::Commit => view.commit_lsn.ok_or_else(|| {
                        RelayError::Record(format!(
                            "the commit of streamed transaction {xid} at {} has no commit_lsn",
                            view.lsn
                        ))
                    })?,
                    _ => view.lsn,
                };
                let ticket = self.tracker.stream_end(xid, end);
                let open = match self.streams.remove(&xid) {
                    Some(open) => {
                        self.metrics.streamed_open.fetch_sub(1, Ordering::Relaxed);
                        open
                    }
                    None => OpenStream::default(),
                };
                let mut members = self.attempt.clone();
                if view.action == Action::Commit {
                    write_counts(&mut members, "changes", &open.counts);
                }
                write_counts(&mut members, "partitions", &open.topics);
                if view.action == Action::Commit {
                    // A chunk read while it committed may hold rows from before it: read
                    // again (its changes were not observed one by one).
                    let tables: Vec<&str> = open.counts.keys().map(String::as_str).collect();
                    self.snapshots.observe_streamed_commit(&tables);
                    self.metrics
                        .streamed_committed
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    self.metrics
                        .streamed_aborted
                        .fetch_add(1, Ordering::Relaxed);
                }
                let value = route::value_with_members(bytes, &members, &self.source_json);
                self.stream_marker(ticket, &open.topics, &value, view)
                    .await?;
                self.tracker.complete(ticket);
                Ok(())
            }
            Action::Begin => Err(RelayError::Record(format!(
                "a streamed B record at {}: the plugin begins a streamed transaction with S",
                view.lsn
            ))),
            _ => {
                let ticket = self.tracker.streamed(xid);
                self.metrics
                    .streamed_records
                    .fetch_add(1, Ordering::Relaxed);
                self.change(bytes, view, ticket, Some(xid)).await
            }
        }
    }

    /// A streamed transaction's `A` or `C` (`value`): to the transactions topic and to every
    /// partition of the table topics its records went to.
    async fn stream_marker(
        &mut self,
        ticket: Ticket,
        topics: &BTreeMap<String, i32>,
        value: &[u8],
        view: &RecordView<'_>,
    ) -> Result<(), RelayError> {
        let all_headers = self.headers(view);
        let headers = all_headers.as_ref().map_or(&[][..], |h| &h[..]);
        let topic = self.topics.transactions_topic();
        self.produce_by_source(ticket, &topic, value, headers)
            .await?;
        for (topic, partitions) in topics {
            self.produce_to_all(ticket, topic, *partitions, value, headers)
                .await?;
        }
        Ok(())
    }

    /// The Kafka value of a record: the record, `"attempt"` for a streamed one, `"source"`.
    fn value(&self, bytes: &[u8], streamed: bool) -> Vec<u8> {
        let members: &[u8] = if streamed { &self.attempt } else { &[] };
        route::value_with_members(bytes, members, &self.source_json)
    }

    /// A change (or B, C, M of a committed transaction), produced with `ticket`. `stream`:
    /// the xid of its streamed transaction.
    async fn change(
        &mut self,
        bytes: &[u8],
        view: &RecordView<'_>,
        ticket: Ticket,
        stream: Option<u64>,
    ) -> Result<(), RelayError> {
        let all_headers = self.headers(view);
        let headers = all_headers.as_ref().map_or(&[][..], |h| &h[..]);
        match view.action {
            Action::Begin => {
                self.counts.clear();
                let topic = self.topics.transactions_topic();
                let value = route::value_with_source(bytes, &self.source_json);
                self.produce_by_source(ticket, &topic, &value, headers)
                    .await?;
            }
            Action::Commit => {
                let topic = self.topics.transactions_topic();
                let mut members = Vec::new();
                write_counts(&mut members, "changes", &self.counts);
                let value = route::value_with_members(bytes, &members, &self.source_json);
                self.produce_by_source(ticket, &topic, &value, headers)
                    .await?;
                self.tracker.complete(ticket);
            }
            Action::Insert | Action::Update | Action::Delete | Action::Truncate => {
                let (schema, table) = (
                    view.schema.as_deref().unwrap_or(""),
                    view.table.as_deref().unwrap_or(""),
                );
                let topic = self.topics.table_topic(schema, table);
                let partitions = self.kafka.ensure_topic(&topic).await?;
                let qualified = format!("{schema}.{table}");
                // The keys, once: for the snapshot window and for the messages.
                let (key, old_key) = match view.action {
                    Action::Truncate => (None, None),
                    _ => (view.key_json(), view.old_key_json()),
                };
                if stream.is_none() {
                    // A streamed change is observed at its commit (`streamed`).
                    self.snapshots.observe(
                        &qualified,
                        key.as_deref(),
                        old_key.as_deref(),
                        view.truncate.as_ref().map(|t| t.tables.as_slice()),
                    );
                }
                self.count(stream, Some(qualified), &topic, partitions);
                self.metrics.changes.fetch_add(1, Ordering::Relaxed);
                let value = self.value(bytes, stream.is_some());
                if view.action == Action::Truncate {
                    // A truncate concerns every row: every partition gets it, in order.
                    self.produce_to_all(ticket, &topic, partitions, &value, headers)
                        .await?;
                } else {
                    let key = key.as_ref().map(|k| k.as_bytes());
                    self.produce(ticket, &topic, None, key, Some(&value), headers)
                        .await?;
                    if let Some(old) = old_key {
                        // The key changed: the old key's partition gets the update too.
                        self.produce(
                            ticket,
                            &topic,
                            None,
                            Some(old.as_bytes()),
                            Some(&value),
                            headers,
                        )
                        .await?;
                    }
                    // Not for a streamed delete: compaction would drop the key's last value
                    // before the transaction commits, or though it aborts.
                    if view.action == Action::Delete
                        && self.rt.source.tombstones
                        && key.is_some()
                        && stream.is_none()
                    {
                        self.produce(ticket, &topic, None, key, None, headers)
                            .await?;
                    }
                }
            }
            Action::SchemaChange => {
                // Every partition of the table's topic gets it, in order with its rows (as a
                // truncate); after a rename, the old topic's partitions too, so that its
                // consumers learn where the table went.
                let (schema, table) = (
                    view.schema.as_deref().unwrap_or(""),
                    view.table.as_deref().unwrap_or(""),
                );
                let l: saiki_core::ddl::SchemaChangeFields =
                    serde_json::from_slice(bytes).unwrap_or_default();
                let mut topics = vec![self.topics.table_topic(schema, table)];
                if let Some(old) = l.renamed_from() {
                    let (s, t) = old.split_once('.').unwrap_or(("", old));
                    let old_topic = self.topics.table_topic(s, t);
                    if !topics.contains(&old_topic) {
                        topics.push(old_topic);
                    }
                }
                self.metrics.changes.fetch_add(1, Ordering::Relaxed);
                if l.needs_snapshot() {
                    // A volatile default gave every existing row its own value: a snapshot of
                    // the table brings them (as R records, after this L).
                    let (dsn, slot) = (self.rt.dsn.clone(), self.rt.slot.clone());
                    let qualified = format!("{schema}.{table}");
                    tokio::spawn(async move {
                        let asked = async {
                            let mut conn = crate::pg::PgConn::connect(&dsn, false, "").await?;
                            snapshot::request(&mut conn, &slot, &qualified).await
                        };
                        match asked.await {
                            Ok(()) => {
                                info!(table = %qualified, "a column was added with a volatile default: snapshot of the table requested")
                            }
                            Err(e) => {
                                warn!(table = %qualified, error = %e, "a column was added with a volatile default, and the snapshot that brings its values could not be requested: run saiki-relay snapshot --table {qualified}")
                            }
                        }
                    });
                }
                let value = self.value(bytes, stream.is_some());
                let mut qualified = Some(format!("{schema}.{table}"));
                for topic in topics {
                    let partitions = self.kafka.ensure_topic(&topic).await?;
                    // Counted once, under the table's new name.
                    self.count(stream, qualified.take(), &topic, partitions);
                    self.produce_to_all(ticket, &topic, partitions, &value, headers)
                        .await?;
                }
            }
            Action::Message if view.prefix.as_deref() == Some(SNAPSHOT_PREFIX) => {
                let content = view
                    .content
                    .and_then(|c| serde_json::from_str::<String>(c.get()).ok());
                if let Some(ready) = self.snapshots.watermark(content.as_deref()).await {
                    self.produce_chunk(ready, view, ticket).await?;
                }
                if view.transactional != Some(true) {
                    self.tracker.complete(ticket);
                }
            }
            Action::Message => {
                if view.prefix.as_deref() != Some(HEARTBEAT_PREFIX) {
                    let topic = self.topics.messages_topic();
                    let value = self.value(bytes, stream.is_some());
                    self.produce_by_source(ticket, &topic, &value, headers)
                        .await?;
                }
                if view.transactional != Some(true) {
                    self.tracker.complete(ticket);
                }
            }
            other => {
                return Err(RelayError::Record(format!(
                    "unexpected {other:?} record at {}",
                    view.lsn
                )));
            }
        }
        Ok(())
    }

    /// Counts a change of `qualified` (if given) for its transaction's C record, and, in a
    /// streamed transaction, the topic its end must reach.
    fn count(
        &mut self,
        stream: Option<u64>,
        qualified: Option<String>,
        topic: &str,
        partitions: i32,
    ) {
        match stream {
            None => {
                if let Some(q) = qualified {
                    *self.counts.entry(q).or_default() += 1;
                }
            }
            Some(xid) => {
                let open = self.streams.entry(xid).or_default();
                if !open.topics.contains_key(topic) {
                    // Looked up first: a String per change only for a new topic.
                    open.topics.insert(topic.to_string(), partitions);
                }
                if let Some(q) = qualified {
                    *open.counts.entry(q).or_default() += 1;
                }
            }
        }
    }

    /// The headers of a record's messages, unless `kafka.headers` is off: built only when
    /// they are sent (four strings per message on the hot path).
    fn headers(&self, view: &RecordView<'_>) -> Option<[(&'static str, String); 4]> {
        self.rt
            .kafka
            .headers
            .then(|| route::headers(&self.rt.source.name, view))
    }

    /// Snapshot work as soon as the chunk produced last is acknowledged.
    async fn snapshot_step_if_confirmable(&mut self) {
        let confirmable = self.tracker.confirmable();
        if self.snapshots.chunk_confirmable(confirmable) {
            self.snapshots.step(confirmable, self.metrics).await;
        }
    }

    /// Produces a chunk read between its watermarks at the high one (`view`), as `R`
    /// records of the watermark's transaction: the rows whose key the window keeps.
    async fn produce_chunk(
        &mut self,
        ReadyChunk { chunk, window }: ReadyChunk,
        view: &RecordView<'_>,
        ticket: Ticket,
    ) -> Result<(), RelayError> {
        let commit_lsn = view.commit_lsn.unwrap_or(view.lsn);
        let (schema, table) = chunk.table.split_once('.').unwrap_or(("", &chunk.table));
        let topic = self.topics.table_topic(schema, table);
        self.kafka.ensure_topic(&topic).await?;
        let (mut seq, mut kept) = (0u64, 0usize);
        for row in &chunk.rows {
            seq += 1;
            let rec = snapshot::r_record(
                &row.body,
                view.xid,
                &view.lsn.to_string(),
                &commit_lsn.to_string(),
                seq,
            );
            let r = route::parse(&rec).map_err(|e| RelayError::Record(e.to_string()))?;
            let key = r.key_json();
            if !key.as_deref().is_some_and(|k| window.keeps(k)) {
                continue;
            }
            let all_headers = self.headers(&r);
            let headers = all_headers.as_ref().map_or(&[][..], |h| &h[..]);
            let value = route::value_with_source(&rec, &self.source_json);
            self.produce(
                ticket,
                &topic,
                None,
                key.as_ref().map(|k| k.as_bytes()),
                Some(&value),
                headers,
            )
            .await?;
            kept += 1;
        }
        if let Some(before) = chunk.sweep_before.filter(|_| chunk.last) {
            // The resync's end of this table: every partition learns it, after its rows.
            let partitions = self.kafka.ensure_topic(&topic).await?;
            let rec = snapshot::w_record(
                view.xid,
                &view.lsn.to_string(),
                &commit_lsn.to_string(),
                seq + 1,
                (schema, table),
                before,
                partitions,
            );
            let value = route::value_with_source(&rec, &self.source_json);
            let headers = self.headers(view);
            let headers = headers.as_ref().map_or(&[][..], |h| &h[..]);
            self.produce_to_all(ticket, &topic, partitions, &value, headers)
                .await?;
            info!(table = %chunk.table, %before, partitions, "resync of the table done: the sink sweeps the rows deleted in the gap");
        }
        self.metrics
            .snapshot_rows
            .fetch_add(kept as u64, Ordering::Relaxed);
        debug!(table = %chunk.table, read = chunk.rows.len(), kept, changed_in_window = window.changed.len(), "snapshot chunk produced");
        self.snapshots.produced(&chunk, commit_lsn);
        Ok(())
    }

    /// Produces a record keyed by source (`{"source": name}`): B, C and messages, so that one
    /// source's transaction records stay in order in one partition.
    async fn produce_by_source(
        &mut self,
        ticket: Ticket,
        topic: &str,
        value: &[u8],
        headers: &[(&'static str, String)],
    ) -> Result<(), RelayError> {
        self.kafka.ensure_topic(topic).await?;
        let key = self.tx_key.clone();
        self.produce(ticket, topic, None, Some(&key), Some(value), headers)
            .await
    }

    /// A record that concerns every row of a table (`T`, `L`): one unkeyed message in each of
    /// the topic's partitions, in order with that partition's rows.
    async fn produce_to_all(
        &mut self,
        ticket: Ticket,
        topic: &str,
        partitions: i32,
        value: &[u8],
        headers: &[(&'static str, String)],
    ) -> Result<(), RelayError> {
        for p in 0..partitions {
            self.produce(ticket, topic, Some(p), None, Some(value), headers)
                .await?;
        }
        Ok(())
    }

    async fn produce(
        &mut self,
        ticket: Ticket,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&'static str, String)],
    ) -> Result<(), RelayError> {
        // The caller has made sure the topic exists (ensure_topic).
        let fut = self
            .kafka
            .send(&Outgoing {
                topic,
                partition,
                key,
                payload,
                headers,
            })
            .await?;
        self.tracker.produced(ticket);
        self.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        self.deliveries.push(
            async move {
                let r = match fut.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e.to_string()),
                    Err(_) => Err("the producer dropped the message".to_string()),
                };
                (ticket, r)
            }
            .boxed(),
        );
        Ok(())
    }

    fn delivered(&mut self, ticket: Ticket, result: Result<(), String>) -> Result<(), RelayError> {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.metrics.produced.fetch_add(1, Ordering::Relaxed);
                self.tracker.acked(ticket);
                Ok(())
            }
            Err(e) => {
                self.metrics.delivery_errors.fetch_add(1, Ordering::Relaxed);
                self.tracker.failed(ticket);
                Err(RelayError::Kafka(format!(
                    "delivery failed: {e}; restarting from the slot's confirmed position"
                )))
            }
        }
    }

    /// SIGTERM: stop reading, wait for in-flight messages (up to the grace period), confirm
    /// what Kafka acknowledged, end the stream.
    async fn drain(
        mut self,
        stream: &mut ReplicationStream,
        sent: &mut Lsn,
    ) -> Result<(), RelayError> {
        info!(in_flight = self.deliveries.len(), "draining before exit");
        let deadline = tokio::time::Instant::now() + self.rt.source.shutdown_grace;
        while !self.deliveries.is_empty() {
            tokio::select! {
                Some((t, r)) = self.deliveries.next() => {
                    if let Err(e) = self.delivered(t, r) {
                        warn!(error = %e, "delivery failed while draining; not confirming past it");
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    warn!(in_flight = self.deliveries.len(), "shutdown grace period over with messages in flight; they will be sent again after restart");
                    break;
                }
            }
        }
        send_status(stream, &self, sent, false).await?;
        wire::copy_done(&mut stream.wbuf);
        stream.flush().await.ok();
        info!(confirmed = %self.tracker.confirmable(), "drained and confirmed");
        Ok(())
    }
}

/// Appends `,"name":{"key":n,…}` (a C record's per-table `changes`, a streamed end's
/// `partitions`).
fn write_counts<N: Copy + TryInto<u64>>(
    out: &mut Vec<u8>,
    name: &str,
    counts: &BTreeMap<String, N>,
) {
    let mut obj = ObjectWriter::open_member(out, name);
    for (k, n) in counts {
        obj.field_str(out, k.as_bytes());
        write_u64(out, (*n).try_into().unwrap_or(0));
    }
    obj.close(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(id: &str, tl: &str) -> (String, String) {
        (id.into(), tl.into())
    }

    #[test]
    fn a_slot_that_lost_changes_is_told_from_one_that_continues() {
        let a1 = sys("7300", "1");
        let a2 = sys("7300", "2");
        // A first start, or a restart at the position confirmed: nothing lost.
        assert_eq!(slot_gap(None, None, &a1, true, Lsn(50), Lsn(0)), None);
        assert_eq!(
            slot_gap(Some(&a1), Some(&a1), &a1, false, Lsn(100), Lsn(100)),
            None
        );
        // A slot that lags what was confirmed (a synced failover slot) replays: no gap.
        assert_eq!(
            slot_gap(Some(&a1), Some(&a1), &a2, false, Lsn(90), Lsn(100)),
            None
        );
        // Missing after a promotion: the resync sweeps what the new slot never saw.
        let gap = slot_gap(Some(&a1), None, &a2, true, Lsn(500), Lsn(100)).unwrap();
        assert!(
            gap.why.contains("missing") && gap.why.contains("timeline 2"),
            "{gap:?}"
        );
        assert_eq!(gap.sweep_before, Some(Lsn(500)));
        // Created anew by someone past the confirmed position.
        let gap = slot_gap(Some(&a1), Some(&a1), &a1, false, Lsn(500), Lsn(100)).unwrap();
        assert!(gap.why.contains("past 0/64"), "{gap:?}");
        // Another server altogether: resync, but its positions do not compare: no sweep.
        let gap = slot_gap(Some(&a1), None, &sys("9999", "1"), false, Lsn(1), Lsn(100)).unwrap();
        assert!(gap.why.contains("another one"), "{gap:?}");
        assert_eq!(gap.sweep_before, None);
    }

    #[test]
    fn a_relay_started_after_the_promotion_knows_the_gap_from_the_slots_recorded_origin() {
        let a1 = sys("7300", "1");
        let a2 = sys("7300", "2");
        // No earlier session in this process; saiki.slot_origins (replicated to the standby)
        // says the slot was on timeline 1, and it is missing now.
        let gap = slot_gap(None, Some(&a1), &a2, true, Lsn(900), Lsn(0)).unwrap();
        assert!(gap.why.contains("was 1: a promotion"), "{gap:?}");
        assert_eq!(gap.sweep_before, Some(Lsn(900)));
        // A dropped slot created anew on the same server: resync too.
        assert!(slot_gap(None, Some(&a1), &a1, true, Lsn(900), Lsn(0)).is_some());
        // The slot survived (failover slots): streaming on, whatever the timeline.
        assert_eq!(
            slot_gap(None, Some(&a1), &a2, false, Lsn(900), Lsn(0)),
            None
        );
        // A database restored elsewhere (its rows came along): only a slot we had to create
        // resyncs, without a sweep.
        let b = sys("8800", "1");
        assert_eq!(slot_gap(None, Some(&a1), &b, false, Lsn(9), Lsn(0)), None);
        assert_eq!(
            slot_gap(None, Some(&a1), &b, true, Lsn(9), Lsn(0)).map(|g| g.sweep_before),
            Some(None)
        );
    }
}
