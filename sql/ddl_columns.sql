-- A table's columns change: each ALTER becomes an `L` record in order with the rows
-- (docs/plugin.md, "Schema changes"): add (with and without a default), rename, drop,
-- type, NOT NULL and DEFAULT.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
SELECT saiki.ddl_capture();
CREATE TABLE items (id int PRIMARY KEY, n int, note text);
INSERT INTO items VALUES (1, 1, 'a');
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
ALTER TABLE items ADD COLUMN price numeric(10,2) DEFAULT 1.50;
ALTER TABLE items ADD COLUMN tag text;
-- A constant (or stable) default is evaluated once: existing rows read one value, in
-- `missing`. A volatile default (nextval) rewrites the table with a value per row, which the
-- record does not carry.
CREATE SEQUENCE item_seq;
ALTER TABLE items ADD COLUMN created timestamptz DEFAULT '2026-01-01 00:00:00+00';
ALTER TABLE items ADD COLUMN serial_no bigint DEFAULT nextval('item_seq');
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
ALTER TABLE items RENAME COLUMN note TO remark;
ALTER TABLE items DROP COLUMN remark;
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
ALTER TABLE items ALTER COLUMN n TYPE bigint;
ALTER TABLE items ALTER COLUMN price TYPE text USING price::text;
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
UPDATE items SET tag = 'x';
ALTER TABLE items ALTER COLUMN tag SET NOT NULL;
ALTER TABLE items ALTER COLUMN tag DROP NOT NULL;
ALTER TABLE items ALTER COLUMN tag SET DEFAULT 'new';
ALTER TABLE items ALTER COLUMN tag DROP DEFAULT;
INSERT INTO items (id, n) VALUES (2, 2);
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE items;
DROP SEQUENCE item_seq;
