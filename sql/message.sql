-- Logical messages: transactional ones inside their transaction, non-transactional ones at
-- once with their own LSN as commit_lsn; non-UTF-8 content as base64.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
SELECT 'msg' FROM pg_logical_emit_message(false, 'app', 'hello');
BEGIN;
SELECT 'msg' FROM pg_logical_emit_message(true, 'app', 'in "txn"');
SELECT 'msg' FROM pg_logical_emit_message(true, 'bin', '\x00ff80'::bytea);
COMMIT;
SELECT 'msg' FROM saiki.heartbeat();
SELECT regexp_replace(r, '"unix_micros\\":[0-9]+', '"unix_micros\\":NOW') FROM changes('regression_slot') r;
-- Prefix filters (transactional messages: their commit flushes the WAL).
SELECT 'msg' FROM pg_logical_emit_message(true, 'app', 'a');
SELECT 'msg' FROM pg_logical_emit_message(true, 'other', 'b');
SELECT * FROM changes('regression_slot', 'add-msg-prefixes', 'other', 'include-transaction', '0');
SELECT 'msg' FROM pg_logical_emit_message(true, 'app', 'a');
SELECT 'msg' FROM pg_logical_emit_message(true, 'other', 'b');
SELECT * FROM changes('regression_slot', 'filter-msg-prefixes', 'other', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
