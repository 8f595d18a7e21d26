-- UPDATE and DELETE under each replica identity: key and identity as DESIGN.md §1 says.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE t_default (id int PRIMARY KEY, v text);
CREATE TABLE t_index (id int NOT NULL, code text NOT NULL, v text, PRIMARY KEY (id));
CREATE UNIQUE INDEX t_index_code ON t_index (code);
ALTER TABLE t_index REPLICA IDENTITY USING INDEX t_index_code;
CREATE TABLE t_full (id int PRIMARY KEY, v text);
ALTER TABLE t_full REPLICA IDENTITY FULL;
CREATE TABLE t_full_nopk (a int, b text);
ALTER TABLE t_full_nopk REPLICA IDENTITY FULL;
CREATE TABLE t_nothing (id int PRIMARY KEY, v text);
ALTER TABLE t_nothing REPLICA IDENTITY NOTHING;
CREATE TABLE t_nopk (a int, b text);
INSERT INTO t_default VALUES (1, 'a');
INSERT INTO t_index VALUES (1, 'c1', 'a');
INSERT INTO t_full VALUES (1, 'a');
INSERT INTO t_full_nopk VALUES (1, 'a');
INSERT INTO t_nothing VALUES (1, 'a');
INSERT INTO t_nopk VALUES (1, 'a');
SELECT count(*) FROM changes('regression_slot');
-- DEFAULT: no old tuple unless the key changes.
UPDATE t_default SET v = 'b' WHERE id = 1;
UPDATE t_default SET id = 2 WHERE id = 1;
DELETE FROM t_default WHERE id = 2;
SELECT * FROM changes('regression_slot');
-- USING INDEX: the index's columns are the key.
UPDATE t_index SET v = 'b';
UPDATE t_index SET code = 'c2';
DELETE FROM t_index;
SELECT * FROM changes('regression_slot');
-- FULL: the whole old row; the key is the primary key, or every column without one.
UPDATE t_full SET v = 'b';
DELETE FROM t_full;
UPDATE t_full_nopk SET b = 'b';
DELETE FROM t_full_nopk;
SELECT * FROM changes('regression_slot');
-- NOTHING, and DEFAULT without a primary key: still emitted, without identity.
UPDATE t_nothing SET v = 'b';
DELETE FROM t_nothing;
UPDATE t_nopk SET b = 'b';
DELETE FROM t_nopk;
SELECT * FROM changes('regression_slot');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE t_default, t_index, t_full, t_full_nopk, t_nothing, t_nopk;
