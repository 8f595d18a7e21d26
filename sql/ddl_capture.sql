-- What DDL capture leaves out, and the DBA's switch (docs/plugin.md, "Schema changes"):
-- other objects, temporary and unlogged tables, statements that change nothing a consumer
-- sees; the plugin's filters; a pause; a message that only looks like a schema change.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE items (id int PRIMARY KEY, qty int);
SELECT count(*) FROM changes('regression_slot', 'include-transaction', '0');
CREATE INDEX ON items (qty);
CREATE TEMP TABLE scratch (a int);
CREATE UNLOGGED TABLE fast (a int);
COMMENT ON TABLE items IS 'items';
GRANT SELECT ON items TO PUBLIC;
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
-- Filters apply: a table left out by filter-tables, and `actions` without ddl.
CREATE TABLE skipped (id int PRIMARY KEY);
CREATE TABLE kept (id int PRIMARY KEY);
ALTER TABLE skipped ADD COLUMN a int;
ALTER TABLE kept ADD COLUMN a int;
SELECT * FROM changes('regression_slot', 'include-transaction', '0', 'filter-tables', 'public.skipped');
ALTER TABLE kept ADD COLUMN b int;
INSERT INTO kept VALUES (1, 1, 1);
SELECT * FROM changes('regression_slot', 'include-transaction', '0', 'actions', 'insert');
-- Paused, nothing is captured; resumed, the shape of then is the baseline.
SELECT saiki.ddl_capture(false);
ALTER TABLE kept RENAME COLUMN a TO a_paused;
SELECT saiki.ddl_capture(true);
ALTER TABLE kept RENAME COLUMN b TO b_resumed;
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
-- A message that only looks like one is written as a plain message.
SELECT 'msg' FROM pg_logical_emit_message(true, 'saiki.ddl', 'not json');
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE items, skipped, kept, fast;
