//! `saiki.snapshot_chunk`: one key-ordered chunk of a table, encoded exactly as the plugin
//! encodes an insert's columns, for the relay's incremental snapshot (issue #6). The relay
//! wraps each row into an `R` record (docs/plugin.md) between two watermark messages.
//!
//! Keyset pagination: the rows whose key is greater than `after` (the text output of the
//! previous chunk's last key), in key order, at most `max_rows`. No transaction is held
//! between chunks, so a snapshot never holds back the xmin horizon or the WAL for long.

use pgrx::prelude::*;
use pgrx::PgRelation;
use saiki_core::options::{NumbersAsStrings, Options};
use std::ffi::{CStr, CString};

use crate::relation::{self, RelInfo};
use crate::value::{tuple_desc_attr, TypeCache};

/// One chunk of `rel` for a snapshot: per row, the key's text output (to pass back as `after`
/// for the next chunk) and the record body
/// `{"schema":…,"table":…,"key":[…],"columns":{…},"types":{…}}` (`types` when
/// `include_types`). The caller needs SELECT on the table. Tables without a primary key or
/// replica identity index cannot be read in key order: an error says what to do.
#[pg_extern(volatile)]
fn snapshot_chunk(
    rel: PgRelation,
    after: default!(Option<Vec<Option<String>>>, "NULL"),
    max_rows: default!(i32, 10000),
    include_types: default!(bool, true),
) -> TableIterator<'static, (name!(key_text, Vec<Option<String>>), name!(record, String))> {
    if max_rows < 1 {
        error!("saiki.snapshot_chunk: max_rows must be at least 1, not {max_rows}");
    }
    // SAFETY: the function runs in a backend with catalog access; the relation is opened
    // (and locked) before use and closed after; SPI is connected and finished around the
    // query; every pointer read comes from PostgreSQL for the duration of this call.
    let rows = unsafe { read_chunk(rel.oid(), after, max_rows, include_types) };
    TableIterator::new(rows)
}

unsafe fn read_chunk(
    relid: pg_sys::Oid,
    after: Option<Vec<Option<String>>>,
    max_rows: i32,
    include_types: bool,
) -> Vec<(Vec<Option<String>>, String)> {
    let opts = Options {
        include_types,
        ..Options::default()
    };
    // SAFETY: see snapshot_chunk. relation_open raises an ERROR for a missing relation.
    unsafe {
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let qualified = format!(
            "{}.{}",
            quote(&name(pg_sys::get_namespace_name(
                (*(*rel).rd_rel).relnamespace
            ))),
            quote(&name((*(*rel).rd_rel).relname.data.as_ptr()))
        );
        let kind = (*(*rel).rd_rel).relkind as u8;
        if kind != pg_sys::RELKIND_RELATION {
            pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            error!("saiki.snapshot_chunk: {qualified} is not a plain table (partitioned tables are snapshotted through their partitions)");
        }
        let mut types = TypeCache::new(pg_sys::CurrentMemoryContext, NumbersAsStrings::None);
        let info = relation::build(rel, &opts, &mut types);
        let key_atts: Vec<_> = info
            .key
            .iter()
            .map(|&p| tuple_desc_attr((*rel).rd_att, info.columns[p].index))
            .collect();
        let key_types: Vec<(pg_sys::Oid, i32)> = key_atts
            .iter()
            .map(|&att| ((*att).atttypid, (*att).atttypmod))
            .collect();
        let key_names: Vec<String> = key_atts
            .iter()
            .map(|&att| quote(&name((*att).attname.data.as_ptr())))
            .collect();
        pg_sys::relation_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        if info.key.is_empty() {
            error!(
                "saiki.snapshot_chunk: {qualified} has no primary key or replica identity index, so it cannot be read in key order: add a primary key, or set REPLICA IDENTITY USING INDEX on a unique index"
            );
        }
        let after = after.filter(|a| !a.is_empty());
        let mut sql = format!("SELECT * FROM ONLY {qualified}");
        if let Some(a) = &after {
            if a.len() != key_types.len() || a.iter().any(Option::is_none) {
                error!(
                    "saiki.snapshot_chunk: after has {} values, the key of {qualified} has {} columns ({}), none null",
                    a.len(),
                    key_types.len(),
                    key_names.join(", ")
                );
            }
            let params: Vec<String> = key_types
                .iter()
                .enumerate()
                .map(|(i, (t, m))| {
                    let tname = CStr::from_ptr(pg_sys::format_type_with_typemod(*t, *m))
                        .to_string_lossy()
                        .into_owned();
                    format!("${}::{tname}", i + 1)
                })
                .collect();
            sql.push_str(&format!(
                " WHERE ({}) > ({})",
                key_names.join(", "),
                params.join(", ")
            ));
        }
        sql.push_str(&format!(
            " ORDER BY {} LIMIT {max_rows}",
            key_names.join(", ")
        ));
        spi_chunk(&sql, after.as_deref(), &info, &mut types, &key_types)
    }
}

/// Runs the chunk query and encodes its rows.
unsafe fn spi_chunk(
    sql: &str,
    after: Option<&[Option<String>]>,
    info: &RelInfo,
    types: &mut TypeCache,
    key_types: &[(pg_sys::Oid, i32)],
) -> Vec<(Vec<Option<String>>, String)> {
    let Ok(csql) = CString::new(sql) else {
        error!("saiki.snapshot_chunk: a name holds a NUL byte");
    };
    let args: Vec<CString> = after
        .unwrap_or_default()
        .iter()
        .map(|v| CString::new(v.clone().unwrap_or_default()).unwrap_or_default())
        .collect();
    let mut out = Vec::new();
    // SAFETY: SPI_connect/SPI_finish bracket every SPI call; the tuple table and its
    // descriptor are valid until SPI_finish; everything kept is copied into Rust values.
    unsafe {
        pg_sys::SPI_connect();
        let mut argtypes: Vec<pg_sys::Oid> = vec![pg_sys::TEXTOID; args.len()];
        let mut values: Vec<pg_sys::Datum> = args
            .iter()
            .map(|a| pg_sys::Datum::from(pg_sys::cstring_to_text(a.as_ptr())))
            .collect();
        let nulls: Vec<std::ffi::c_char> = vec![b' ' as std::ffi::c_char; args.len()];
        let rc = pg_sys::SPI_execute_with_args(
            csql.as_ptr(),
            args.len() as i32,
            argtypes.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            true,
            0,
        );
        if rc != pg_sys::SPI_OK_SELECT as i32 {
            pg_sys::SPI_finish();
            error!("saiki.snapshot_chunk: the chunk query failed ({rc}): {sql}");
        }
        let tt = pg_sys::SPI_tuptable;
        let desc = (*tt).tupdesc;
        let natts = (*desc).natts.max(0) as usize;
        if natts != info.columns.len() {
            pg_sys::SPI_finish();
            error!("saiki.snapshot_chunk: the table changed while it was read; try again");
        }
        let outputs: Vec<pg_sys::Oid> = key_types
            .iter()
            .map(|(t, _)| {
                let mut f = pg_sys::InvalidOid;
                let mut varlena = false;
                pg_sys::getTypeOutputInfo(*t, &mut f, &mut varlena);
                f
            })
            .collect();
        let mut vals = vec![pg_sys::Datum::from(0usize); natts];
        let mut isnull = vec![true; natts];
        let mut buf = Vec::with_capacity(1024);
        for i in 0..pg_sys::SPI_processed as usize {
            let tuple = *(*tt).vals.add(i);
            pg_sys::heap_deform_tuple(tuple, desc, vals.as_mut_ptr(), isnull.as_mut_ptr());
            // SELECT * lists the non-dropped columns in table order: position p of the
            // result is column p of the relation's facts.
            let key_text: Vec<Option<String>> = info
                .key
                .iter()
                .zip(&outputs)
                .map(|(&p, f)| {
                    (!isnull[p]).then(|| {
                        CStr::from_ptr(pg_sys::OidOutputFunctionCall(*f, vals[p]))
                            .to_string_lossy()
                            .into_owned()
                    })
                })
                .collect();
            buf.clear();
            buf.extend_from_slice(b"{\"schema\":");
            buf.extend_from_slice(&info.schema_json);
            buf.extend_from_slice(b",\"table\":");
            buf.extend_from_slice(&info.table_json);
            buf.extend_from_slice(b",\"key\":[");
            for (n, &p) in info.key.iter().enumerate() {
                if n > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(&info.columns[p].name_json);
            }
            buf.extend_from_slice(b"],\"columns\":{");
            for (p, col) in info.columns.iter().enumerate() {
                if p > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(&col.name_json);
                buf.push(b':');
                if isnull[p] {
                    buf.extend_from_slice(b"null");
                } else {
                    let mut d = vals[p];
                    if col.varlena {
                        // A table read may return on-disk TOAST pointers; the encoder takes
                        // none (value.rs), so fetch the value here, where that is allowed.
                        d = pg_sys::Datum::from(pg_sys::pg_detoast_datum(d.cast_mut_ptr()));
                    }
                    types.write(&mut buf, &col.enc, d);
                }
            }
            buf.push(b'}');
            buf.extend_from_slice(&info.types_json);
            buf.push(b'}');
            out.push((key_text, String::from_utf8_lossy(&buf).into_owned()));
        }
        pg_sys::SPI_finish();
    }
    out
}

/// An identifier quoted for SQL, as quote_ident does.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A NUL-terminated name PostgreSQL owns, as a Rust string.
///
/// # Safety
/// `p` points at a NUL-terminated string.
unsafe fn name(p: *const std::ffi::c_char) -> String {
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Writes a transactional `saiki.snapshot` message: a watermark around a snapshot chunk. It
/// reaches the stream at its transaction's commit, in commit order with the changes; the
/// relay reads a chunk between a low and a high watermark (issue #6, after DBLog).
#[pg_extern(volatile)]
fn snapshot_watermark(content: &str) -> i64 {
    crate::wal::log_logical_message(
        saiki_core::record::SNAPSHOT_PREFIX_C,
        content.as_bytes(),
        true,
    ) as i64
}

extension_sql!(
    r#"
-- Snapshots of the relays' slots: one row per slot and table. A DBA asks for one with
-- saiki.request_snapshot(); the relay of that slot takes requested tables one chunk at a
-- time and records its progress here after Kafka has every row of a chunk, so that a
-- restarted relay continues from its last finished chunk.
CREATE TABLE saiki.snapshots (
    slot_name     name        NOT NULL,
    table_name    text        NOT NULL,   -- schema.table, unquoted
    state         text        NOT NULL DEFAULT 'requested'
                  CHECK (state IN ('requested', 'running', 'done', 'failed')),
    after_key     text[],                 -- text output of the last finished chunk's last key
    chunks_done   bigint      NOT NULL DEFAULT 0,
    rows_done     bigint      NOT NULL DEFAULT 0,
    rows_estimated bigint,
    error         text,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    -- A resync's snapshot (issue #14): at its end the sink deletes the ODS rows of this
    -- source and table that the snapshot did not read and that no change since this
    -- position touched (they were deleted while the slot was lost). NULL: a plain snapshot.
    sweep_before  pg_lsn,
    PRIMARY KEY (slot_name, table_name)
);
SELECT pg_catalog.pg_extension_config_dump('saiki.snapshots', '');

-- Asks the relay of slot `slot` to snapshot `tbl` (again, if it was done): harmless while the
-- table is written, since the sink never lets a snapshot row overwrite a newer change. Asked
-- again before a resync's snapshot of it is done, the table keeps that resync's sweep.
CREATE FUNCTION saiki.request_snapshot(slot name, tbl regclass) RETURNS void
LANGUAGE sql VOLATILE AS $fn$
    INSERT INTO saiki.snapshots AS s (slot_name, table_name, rows_estimated)
    SELECT slot, n.nspname || '.' || c.relname, greatest(c.reltuples, 0)::bigint
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = tbl
    ON CONFLICT (slot_name, table_name) DO UPDATE
    SET state = 'requested', after_key = NULL, chunks_done = 0, rows_done = 0, error = NULL,
        rows_estimated = excluded.rows_estimated, requested_at = now(),
        started_at = NULL, finished_at = NULL,
        -- A resync's sweep still to come stays with the table (issue #14).
        sweep_before = CASE WHEN s.state <> 'done' THEN s.sweep_before END;
$fn$;

-- Progress of every snapshot, for DBAs and `saiki-relay status`.
CREATE VIEW saiki.snapshot_progress AS
SELECT slot_name, table_name, state, rows_done, rows_estimated,
       CASE WHEN state = 'done' THEN 100.0
            WHEN rows_estimated > 0 THEN round(least(100.0, 100.0 * rows_done / rows_estimated), 1)
       END AS percent,
       chunks_done, error, requested_at, started_at, finished_at
FROM saiki.snapshots ORDER BY slot_name, table_name;

-- Where each relay's slot was created: the server (system identifier, timeline) and the
-- slot's starting point, written by the relay. A standby has these rows from its primary, so
-- a relay that finds its slot missing after a promotion knows that it streamed from it
-- before, and that the changes between its last confirmed position and the new slot were
-- never decoded: it resyncs (docs/operations.md, "A primary failover"), and records here
-- when, why, and from which position its sweep deletes. Delete a slot's row to have a
-- deliberately dropped slot created anew without a resync.
CREATE TABLE saiki.slot_origins (
    slot_name         name        PRIMARY KEY,
    system_identifier text        NOT NULL,
    timeline          int         NOT NULL,
    created_lsn       pg_lsn,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    resync_at         timestamptz,
    resync_reason     text,
    resync_before     pg_lsn
);
SELECT pg_catalog.pg_extension_config_dump('saiki.slot_origins', '');

-- The last resync of each slot, for DBAs and `saiki-relay status`: why, and how far its
-- snapshots are (the tables requested with it and not asked for again since).
CREATE VIEW saiki.resyncs AS
SELECT o.slot_name, o.resync_at, o.resync_reason, o.resync_before,
       CASE WHEN count(*) FILTER (WHERE s.state IN ('requested', 'running')) > 0
            THEN 'running' ELSE 'done' END AS state,
       count(s.table_name) AS tables,
       count(*) FILTER (WHERE s.state = 'done') AS tables_done,
       count(*) FILTER (WHERE s.state = 'failed') AS tables_failed
FROM saiki.slot_origins o
LEFT JOIN saiki.snapshots s ON s.slot_name = o.slot_name AND s.requested_at = o.resync_at
WHERE o.resync_at IS NOT NULL
GROUP BY o.slot_name, o.resync_at, o.resync_reason, o.resync_before
ORDER BY o.slot_name;

-- Watermarks are the relay's: a role that could write them could confuse a running snapshot.
REVOKE EXECUTE ON FUNCTION saiki.snapshot_watermark(text) FROM PUBLIC;
"#,
    name = "snapshot_objects",
    requires = ["dba_functions", snapshot_watermark],
);
