//! The DBA functions of `CREATE EXTENSION saiki` (README, "Five-minute tour for a DBA"; docs/operations.md).
//!
//! They are plain SQL over `pg_replication_slots` and the slot functions of PostgreSQL, plus
//! one Rust function that reads `output_plugin_libraries`. Every function that takes a slot
//! name refuses unknown slots and slots of another plugin with a message that says what to do.

use pgrx::prelude::*;
use saiki_core::loading;

/// Whether PostgreSQL will load `saiki` as an output plugin (`output_plugin_libraries`).
#[pg_extern(stable, parallel_safe)]
fn plugin_allowed() -> bool {
    loading::plugin_allowed(setting().as_deref(), "saiki")
}

/// What to run so that PostgreSQL loads `saiki` as an output plugin.
#[pg_extern(stable, parallel_safe)]
fn plugin_hint() -> String {
    match setting() {
        Some(s) => format!(
            "run as a superuser: ALTER SYSTEM SET output_plugin_libraries = {}; SELECT pg_reload_conf();",
            loading::setting_with(&s, "saiki")
        ),
        None => loading::ALLOW_HINT.to_string(),
    }
}

/// Writes a non-transactional `saiki.heartbeat` message and flushes the WAL up to it, so that
/// a decoding session sees it at once (a read-only transaction's commit does not flush).
/// Returns the message's end LSN as a number; `saiki.heartbeat()` turns it into a pg_lsn.
#[pg_extern(volatile)]
fn heartbeat_raw() -> i64 {
    let now = saiki_core::time::unix_micros_now();
    let content = format!("{{\"unix_micros\":{now}}}");
    let lsn = crate::wal::log_logical_message(
        saiki_core::record::HEARTBEAT_PREFIX_C,
        content.as_bytes(),
        false,
    );
    // SAFETY: flushing the WAL up to a position just inserted.
    unsafe { pg_sys::XLogFlush(lsn) };
    lsn as i64
}

fn setting() -> Option<String> {
    // SAFETY: GetConfigOption with missing_ok returns NULL or a string owned by the GUC system.
    unsafe {
        let p = pg_sys::GetConfigOption(c"output_plugin_libraries".as_ptr(), true, false);
        if p.is_null() {
            None
        } else {
            Some(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

extension_sql!(
    r#"
-- Raises a clear error unless PostgreSQL will load the saiki output plugin.
CREATE FUNCTION saiki.require_plugin_allowed() RETURNS void LANGUAGE plpgsql STABLE AS $fn$
BEGIN
    IF NOT saiki.plugin_allowed() THEN
        RAISE EXCEPTION 'PostgreSQL will not load the saiki output plugin: it is not in output_plugin_libraries (now ''%'')',
            current_setting('output_plugin_libraries', true)
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = saiki.plugin_hint();
    END IF;
END
$fn$;

-- The slot's plugin; raises for unknown slots and slots of another plugin.
CREATE FUNCTION saiki.require_saiki_slot(slot name) RETURNS void LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    p name;
BEGIN
    SELECT s.plugin INTO p FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = require_saiki_slot.slot;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'replication slot "%" does not exist', slot
            USING ERRCODE = 'undefined_object', HINT = 'create it with SELECT * FROM saiki.create_slot(''' || slot || ''');';
    END IF;
    IF p IS DISTINCT FROM 'saiki' THEN
        RAISE EXCEPTION 'replication slot "%" uses plugin %, not saiki', slot, coalesce(p::text, '(none: a physical slot)')
            USING ERRCODE = 'wrong_object_type', HINT = 'saiki functions work on slots created with plugin saiki; use PostgreSQL''s own functions for this slot.';
    END IF;
END
$fn$;

-- Every logical slot with its lag. lag_bytes: WAL not yet confirmed by the consumer;
-- retained_bytes: WAL the slot keeps on disk.
CREATE FUNCTION saiki.slot_status() RETURNS TABLE (
    slot_name name, plugin name, database name, active boolean, active_pid integer,
    restart_lsn pg_lsn, confirmed_flush_lsn pg_lsn, lag_bytes bigint, retained_bytes bigint,
    wal_status text, safe_wal_size bigint, lag_pretty text, retained_pretty text
) LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    cur pg_lsn := CASE WHEN pg_catalog.pg_is_in_recovery() THEN pg_catalog.pg_last_wal_replay_lsn()
                       ELSE pg_catalog.pg_current_wal_lsn() END;
BEGIN
    IF NOT saiki.plugin_allowed() THEN
        RAISE WARNING 'PostgreSQL will not load the saiki output plugin: it is not in output_plugin_libraries'
            USING HINT = saiki.plugin_hint();
    END IF;
    RETURN QUERY
    SELECT s.slot_name, s.plugin, s.database, s.active, s.active_pid, s.restart_lsn, s.confirmed_flush_lsn,
           pg_catalog.pg_wal_lsn_diff(cur, s.confirmed_flush_lsn)::bigint,
           pg_catalog.pg_wal_lsn_diff(cur, s.restart_lsn)::bigint,
           s.wal_status, s.safe_wal_size,
           pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(cur, s.confirmed_flush_lsn)),
           pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(cur, s.restart_lsn))
    FROM pg_catalog.pg_replication_slots s
    WHERE s.slot_type = 'logical'
    ORDER BY s.slot_name;
END
$fn$;

CREATE VIEW saiki.slots AS SELECT * FROM saiki.slot_status();

-- Bytes of WAL between the current position and what the slot's consumer confirmed.
CREATE FUNCTION saiki.lag(slot name) RETURNS bigint LANGUAGE plpgsql STABLE AS $fn$
BEGIN
    PERFORM saiki.require_saiki_slot(slot);
    RETURN (SELECT s.lag_bytes FROM saiki.slot_status() s WHERE s.slot_name = lag.slot);
END
$fn$;

CREATE FUNCTION saiki.create_slot(slot name, temporary boolean DEFAULT false)
RETURNS TABLE (slot_name name, lsn pg_lsn) LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    PERFORM saiki.require_plugin_allowed();
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = create_slot.slot) THEN
        RAISE EXCEPTION 'replication slot "%" already exists', create_slot.slot
            USING ERRCODE = 'duplicate_object', HINT = 'pick another name, or drop the slot first with saiki.drop_slot()';
    END IF;
    RETURN QUERY SELECT r.slot_name, r.lsn
        FROM pg_catalog.pg_create_logical_replication_slot(create_slot.slot, 'saiki', create_slot.temporary) r;
END
$fn$;

CREATE FUNCTION saiki.drop_slot(slot name) RETURNS void LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    PERFORM saiki.require_saiki_slot(slot);
    PERFORM pg_catalog.pg_drop_replication_slot(slot);
END
$fn$;

-- Preview of the next changes without consuming them.
CREATE FUNCTION saiki.peek(slot name, max_changes integer, VARIADIC options text[] DEFAULT '{}')
RETURNS SETOF jsonb LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    PERFORM saiki.require_saiki_slot(slot);
    PERFORM saiki.require_plugin_allowed();
    RETURN QUERY SELECT c.data::jsonb
        FROM pg_catalog.pg_logical_slot_peek_changes(slot, NULL, max_changes, VARIADIC options) c;
END
$fn$;

-- A non-transactional logical message, flushed, so that slots on idle databases advance.
-- Superuser only by default, like pg_logical_emit_message.
CREATE FUNCTION saiki.heartbeat() RETURNS pg_lsn LANGUAGE sql VOLATILE AS $fn$
    SELECT '0/0'::pg_catalog.pg_lsn + saiki.heartbeat_raw()
$fn$;
REVOKE EXECUTE ON FUNCTION saiki.heartbeat_raw() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION saiki.heartbeat() FROM PUBLIC;

DO $do$
BEGIN
    IF NOT saiki.plugin_allowed() THEN
        RAISE WARNING 'PostgreSQL will not load the saiki output plugin yet: it is not in output_plugin_libraries'
            USING HINT = saiki.plugin_hint();
    END IF;
END
$do$;
"#,
    name = "dba_functions",
    requires = [plugin_allowed, plugin_hint, heartbeat_raw],
);
