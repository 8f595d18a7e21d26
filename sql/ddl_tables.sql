-- Tables are created, renamed, moved to another schema and dropped: each an `L` record
-- (docs/plugin.md, "Schema changes"), the rows after a rename under the new name.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE items (id int PRIMARY KEY, n int);
INSERT INTO items VALUES (1, 1);
CREATE SCHEMA sales;
ALTER TABLE items RENAME TO items_v2;
INSERT INTO items_v2 VALUES (2, 2);
ALTER TABLE items_v2 SET SCHEMA sales;
-- saiki.peek shows the same records without consuming them.
SELECT p->>'table' AS "table", p->>'ddl' AS ddl, p->'changes'->0->>'change' AS change
FROM saiki.peek('regression_slot', NULL) p WHERE p->>'action' = 'L';
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
-- Several subcommands in one statement, in one transaction with rows around it.
BEGIN;
INSERT INTO sales.items_v2 VALUES (3, 3);
ALTER TABLE sales.items_v2 ADD COLUMN qty int NOT NULL DEFAULT 0, DROP COLUMN n;
INSERT INTO sales.items_v2 (id, qty) VALUES (4, 4);
COMMIT;
DROP TABLE sales.items_v2;
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP SCHEMA sales;
