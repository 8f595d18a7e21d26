-- DDL between and inside transactions, all read in one decoding session: the cached facts of a
-- relation follow every change (columns, name, replica identity, types).
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE d (id int PRIMARY KEY, a text);
INSERT INTO d VALUES (1, 'x');
ALTER TABLE d ADD COLUMN b int DEFAULT 7;
INSERT INTO d VALUES (2, 'y', 8);
UPDATE d SET a = 'x2' WHERE id = 1;
ALTER TABLE d RENAME TO d2;
INSERT INTO d2 VALUES (3, 'z', 9);
ALTER TABLE d2 DROP COLUMN a;
INSERT INTO d2 VALUES (4, 10);
ALTER TABLE d2 ALTER COLUMN b TYPE bigint;
ALTER TABLE d2 REPLICA IDENTITY FULL;
UPDATE d2 SET b = 11 WHERE id = 4;
BEGIN;
ALTER TABLE d2 ADD COLUMN c text;
INSERT INTO d2 VALUES (5, 12, 'in-txn');
ALTER TABLE d2 RENAME COLUMN c TO c_renamed;
INSERT INTO d2 VALUES (6, 13, 'renamed');
COMMIT;
SELECT * FROM changes('regression_slot', 'include-types', '1', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE d2;
