-- Schema changes are captured by the extension's event triggers and decoded in order with
-- the rows as `L` records (docs/plugin.md, "Schema changes"): one statement per DDL kind.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
SELECT saiki.ddl_capture();
CREATE TABLE items (id int PRIMARY KEY, n int, note text);
INSERT INTO items VALUES (1, 1, 'a');
ALTER TABLE items ADD COLUMN price numeric(10,2) DEFAULT 1.50;
ALTER TABLE items ADD COLUMN tag text;
-- now() is evaluated once: existing rows read one value, in `missing`. A volatile default
-- (nextval) rewrites the table with a value per row, which the record does not carry.
CREATE SEQUENCE item_seq;
ALTER TABLE items ADD COLUMN created timestamptz DEFAULT '2026-01-01 00:00:00+00';
ALTER TABLE items ADD COLUMN serial_no bigint DEFAULT nextval('item_seq');
ALTER TABLE items RENAME COLUMN note TO remark;
ALTER TABLE items DROP COLUMN remark;
ALTER TABLE items ALTER COLUMN n TYPE bigint;
ALTER TABLE items ALTER COLUMN price TYPE text USING price::text;
UPDATE items SET tag = 'x';
ALTER TABLE items ALTER COLUMN tag SET NOT NULL;
ALTER TABLE items ALTER COLUMN tag DROP NOT NULL;
ALTER TABLE items ALTER COLUMN tag SET DEFAULT 'new';
ALTER TABLE items ALTER COLUMN tag DROP DEFAULT;
INSERT INTO items (id, n) VALUES (2, 2);
ALTER TABLE items DROP CONSTRAINT items_pkey;
ALTER TABLE items ADD PRIMARY KEY (id, n);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE SCHEMA sales;
ALTER TABLE items RENAME TO items_v2;
ALTER TABLE items_v2 SET SCHEMA sales;
-- Several subcommands in one statement, in one transaction with rows around it.
BEGIN;
INSERT INTO sales.items_v2 (id, n) VALUES (3, 3);
ALTER TABLE sales.items_v2 ADD COLUMN qty int NOT NULL DEFAULT 0, DROP COLUMN created;
INSERT INTO sales.items_v2 (id, n, qty) VALUES (4, 4, 4);
COMMIT;
-- What the extension does not capture: other objects, temporary and unlogged tables, and a
-- statement that changes nothing a consumer sees.
CREATE INDEX ON sales.items_v2 (qty);
CREATE TEMP TABLE scratch (a int);
CREATE UNLOGGED TABLE fast (a int);
COMMENT ON TABLE sales.items_v2 IS 'items';
DROP TABLE sales.items_v2;
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
DROP TABLE skipped, kept, fast;
DROP SCHEMA sales;
DROP SEQUENCE item_seq;
