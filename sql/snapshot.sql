-- saiki.snapshot_chunk: a table read in key-ordered chunks (keyset pagination), each row
-- encoded as the plugin encodes an insert's columns, for the relay's snapshots (issue #6).
-- The relay's session settings (its walsender's too): ISO dates in UTC.
SET datestyle = 'ISO'; SET timezone = 'UTC';
CREATE TABLE snap (id int PRIMARY KEY, name text, price numeric(10,2), tags text[],
                   doc jsonb, raw bytea, at timestamptz, f float8);
INSERT INTO snap SELECT g, 'item ' || g, g * 1.5, ARRAY['a', 'b"c'], '{"k": [1, 2.50]}',
                        '\x00ff', '2026-11-27 10:00:00+00', 'NaN'
FROM generate_series(1, 5) g;
SELECT * FROM saiki.snapshot_chunk('snap', NULL, 2);
SELECT * FROM saiki.snapshot_chunk('snap', ARRAY['2'], 2);
SELECT * FROM saiki.snapshot_chunk('snap', ARRAY['4'], 2);
-- After the last key: nothing, the table is done.
SELECT count(*) FROM saiki.snapshot_chunk('snap', ARRAY['5'], 2);

-- A composite key, in the key's order (text by the column's collation), without types.
CREATE TABLE snap2 (a text, b int, v text, PRIMARY KEY (a, b));
INSERT INTO snap2 VALUES ('x', 2, 'x2'), ('x', 1, 'x1'), ('y', 1, 'y1'), ('x', 10, 'x10');
SELECT key_text FROM saiki.snapshot_chunk('snap2', NULL, 10);
SELECT record FROM saiki.snapshot_chunk('snap2', ARRAY['x', '2'], 10, false);

-- A replica identity index stands in for a missing primary key.
CREATE TABLE snap_ri (code text NOT NULL, v int);
CREATE UNIQUE INDEX snap_ri_code ON snap_ri (code);
ALTER TABLE snap_ri REPLICA IDENTITY USING INDEX snap_ri_code;
INSERT INTO snap_ri VALUES ('b', 2), ('a', 1);
SELECT * FROM saiki.snapshot_chunk('snap_ri', NULL, 10, false);

-- TOASTed values are read in full (the plugin never sees them in a decoded insert's place).
CREATE TABLE snap_toast (id int PRIMARY KEY, big text);
ALTER TABLE snap_toast ALTER big SET STORAGE EXTERNAL;
INSERT INTO snap_toast VALUES (1, repeat('x', 10000));
SELECT length(record) FROM saiki.snapshot_chunk('snap_toast', NULL, 10, false);

-- Dropped columns are left out, as in the plugin's records.
ALTER TABLE snap DROP COLUMN tags;
SELECT record FROM saiki.snapshot_chunk('snap', NULL, 1);

-- Errors say what to do.
CREATE TABLE snap_nokey (v int);
SELECT * FROM saiki.snapshot_chunk('snap_nokey');
SELECT * FROM saiki.snapshot_chunk('snap', ARRAY['1', '2']);
SELECT * FROM saiki.snapshot_chunk('snap', NULL, 0);
CREATE VIEW snap_view AS SELECT 1 AS x;
SELECT * FROM saiki.snapshot_chunk('snap_view');
SELECT * FROM saiki.snapshot_chunk('no_such_table');

RESET datestyle; RESET timezone;
DROP VIEW snap_view;
DROP TABLE snap, snap2, snap_ri, snap_toast, snap_nokey;
