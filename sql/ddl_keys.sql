-- A table's primary key and replica identity change: `key` and `replica_identity` records
-- (docs/plugin.md, "Schema changes"), and the rows after them keyed by the new key.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL);
CREATE TABLE tags (id int, v text);
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
-- Dropped, then another key; added to a table that had none.
ALTER TABLE items DROP CONSTRAINT items_pkey;
ALTER TABLE items ADD PRIMARY KEY (id, n);
INSERT INTO items VALUES (1, 1);
ALTER TABLE tags ADD PRIMARY KEY (id);
INSERT INTO tags VALUES (1, 'a');
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
-- Changed in one statement.
ALTER TABLE tags DROP CONSTRAINT tags_pkey, ADD PRIMARY KEY (id, v);
ALTER TABLE items REPLICA IDENTITY FULL;
DELETE FROM items WHERE id = 1;
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE items, tags;
