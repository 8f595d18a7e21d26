-- batch-bytes: records joined by newlines into fewer output messages, flushed at every commit
-- (and stream stop, and non-transactional message) and whenever the batch reaches the size.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE b (id int PRIMARY KEY);
INSERT INTO b SELECT generate_series(1, 3);
INSERT INTO b VALUES (4);
-- One message per transaction here: every line still one record.
SELECT * FROM changes('regression_slot', 'batch-bytes', '65536', 'include-transaction', 'false');
-- A small threshold splits a transaction; each message but the last reaches the threshold.
INSERT INTO b SELECT generate_series(10, 19);
SELECT length(r) >= 300 AS reached_threshold, array_length(string_to_array(r, E'\n'), 1) AS records
FROM changes('regression_slot', 'batch-bytes', '300') r;
-- A non-transactional message is flushed at once, not held for a commit.
SELECT saiki.heartbeat() IS NOT NULL AS sent;
SELECT count(*) AS messages FROM pg_logical_slot_get_changes('regression_slot', NULL, NULL, 'batch-bytes', '65536');
-- 0 means one record per message; out-of-range values are refused.
SELECT * FROM changes('regression_slot', 'batch-bytes', '-5');
SELECT * FROM changes('regression_slot', 'batch-bytes', '999999999');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE b;
