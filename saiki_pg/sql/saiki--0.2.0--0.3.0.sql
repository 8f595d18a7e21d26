-- saiki 0.2.0 -> 0.3.0: what a primary failover needs (issue #14): saiki.slot_origins, where
-- each relay's slot was created, and saiki.snapshots.sweep_before, the start of a resync whose
-- end deletes the rows lost in the gap; as saiki_pg/src/snapshot.rs creates them in a new
-- install. tests/tests/it/upgrade.rs checks that an updated 0.2.0 (and 0.1.0) has exactly the
-- objects and columns of a new install.
\echo Use "ALTER EXTENSION saiki UPDATE" to load this file. \quit

-- A resync's snapshot (issue #14): at its end the sink deletes the ODS rows of this
-- source and table that the snapshot did not read and that no change since this
-- position touched (they were deleted while the slot was lost). NULL: a plain snapshot.
ALTER TABLE saiki.snapshots ADD COLUMN sweep_before pg_lsn;

-- Asks the relay of slot `slot` to snapshot `tbl` (again, if it was done): harmless while the
-- table is written, since the sink never lets a snapshot row overwrite a newer change. Asked
-- again before a resync's snapshot of it is done, the table keeps that resync's sweep.
CREATE OR REPLACE FUNCTION saiki.request_snapshot(slot name, tbl regclass) RETURNS void
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
