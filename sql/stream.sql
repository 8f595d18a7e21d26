-- stream-changes: a transaction beyond logical_decoding_work_mem is streamed before its
-- commit in S..E blocks; its records carry "streamed": true and no commit_lsn; C commits it.
-- A rolled-back subtransaction is announced by A with its subxid.
SET logical_decoding_work_mem = '64kB';
CREATE TABLE big (id int PRIMARY KEY, pad text);
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
BEGIN;
INSERT INTO big SELECT g, repeat('p', 100) FROM generate_series(1, 1000) g;
SAVEPOINT s1;
INSERT INTO big SELECT g, repeat('q', 100) FROM generate_series(1001, 2000) g;
ROLLBACK TO SAVEPOINT s1;
INSERT INTO big VALUES (5000, 'last');
COMMIT;
CREATE TEMP TABLE streamed AS SELECT r FROM changes('regression_slot', 'stream-changes', '1') r;
-- Every record is marked streamed; only C carries commit_lsn.
SELECT bool_and(r LIKE '%"streamed":true%') AS all_streamed,
       count(*) FILTER (WHERE r LIKE '%"commit_lsn"%') AS with_commit_lsn,
       count(*) FILTER (WHERE r LIKE '{"action":"C"%') AS commits
FROM streamed;
-- Blocks: as many S as E, more than one (the transaction did not fit in 64kB).
SELECT count(*) FILTER (WHERE r LIKE '{"action":"S"%') = count(*) FILTER (WHERE r LIKE '{"action":"E"%') AS balanced,
       count(*) FILTER (WHERE r LIKE '{"action":"S"%') > 1 AS several_blocks
FROM streamed;
-- The 1000 top-level inserts arrive without subxid; the rolled-back subtransaction's streamed
-- inserts carry its subxid, and one A with that subxid tells the consumer to discard them.
-- (The insert after ROLLBACK TO runs in the savepoint's new subtransaction: its own subxid.)
SELECT count(*) FILTER (WHERE r LIKE '{"action":"I"%' AND r NOT LIKE '%"subxid"%') AS top_level_inserts,
       count(*) FILTER (WHERE r LIKE '{"action":"I"%' AND r LIKE '%"subxid"%') > 0 AS aborted_inserts_streamed,
       count(*) FILTER (WHERE r LIKE '{"action":"A"%' AND r LIKE '%"subxid"%') AS subxact_aborts
FROM streamed;
-- seq runs 1..n over the transaction's changes, across blocks.
SELECT min((r::jsonb->>'seq')::int) AS first_seq,
       max((r::jsonb->>'seq')::int) = count(*) AS seq_dense
FROM streamed WHERE r LIKE '{"action":"I"%';
-- A transactional message inside a rolled-back savepoint, streamed: it carries the savepoint's
-- subxid, so that the A of that subxid discards it with the rows (issue #17).
-- (Rows just under the TOAST threshold, so that they are not compressed and fill 64kB.)
CREATE TABLE st (data text);
BEGIN;
SAVEPOINT s1;
SELECT 'msg' FROM pg_logical_emit_message(true, 'test', 'rolled back');
INSERT INTO st SELECT repeat('a', 2000) || g FROM generate_series(1, 35) g;
ROLLBACK TO SAVEPOINT s1;
SELECT 'msg' FROM pg_logical_emit_message(true, 'test', 'kept');
INSERT INTO st VALUES ('kept');
COMMIT;
CREATE TEMP TABLE streamed_msgs AS SELECT r::jsonb AS j FROM changes('regression_slot', 'stream-changes', '1') r;
SELECT j->>'content' AS message, j ? 'subxid' AS has_subxid,
       coalesce((j->>'subxid') IN (SELECT a->>'subxid' FROM streamed_msgs x(a) WHERE a->>'action' = 'A'), false) AS discarded_by_an_abort
FROM streamed_msgs WHERE j->>'action' = 'M' ORDER BY (j->>'seq')::int;
-- Without the option, the same work is one ordinary transaction.
BEGIN;
INSERT INTO big SELECT g, repeat('p', 100) FROM generate_series(10001, 11000) g;
COMMIT;
SELECT left(r, 12) AS action, count(*), bool_or(r LIKE '%streamed%') AS any_streamed
FROM changes('regression_slot') r GROUP BY 1 ORDER BY 1;
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE big, st;
