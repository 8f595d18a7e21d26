-- The DBA functions of CREATE EXTENSION saiki (DESIGN.md §2).
SELECT saiki.plugin_allowed();
SELECT slot_name FROM saiki.create_slot('dba_slot');
SELECT * FROM saiki.create_slot('dba_slot');
SELECT slot_name, plugin, database, active, lag_bytes >= 0 AS lag_known, retained_bytes >= 0 AS retained_known,
       wal_status
FROM saiki.slot_status() WHERE slot_name = 'dba_slot';
SELECT count(*) FROM saiki.slots WHERE slot_name = 'dba_slot';
CREATE TABLE dba_t (id int PRIMARY KEY);
INSERT INTO dba_t VALUES (1), (2);
SELECT saiki.lag('dba_slot') > 0 AS has_lag;
-- peek does not consume.
SELECT p->>'action' AS action, p->'columns' AS columns FROM saiki.peek('dba_slot', NULL) p;
SELECT count(*) FROM saiki.peek('dba_slot', NULL, 'include-transaction', '0');
SELECT count(*) FROM pg_logical_slot_get_changes('dba_slot', NULL, NULL);
SELECT saiki.lag('dba_slot') < 1000 AS caught_up;
SELECT saiki.heartbeat() IS NOT NULL AS heartbeat_sent;
SELECT p->>'prefix' AS prefix, p->>'transactional' AS transactional FROM saiki.peek('dba_slot', NULL) p;
-- Unknown slots and slots of other plugins get clear errors.
SELECT saiki.lag('no_such_slot');
SELECT 'init' FROM pg_create_logical_replication_slot('td_slot', 'test_decoding');
SELECT saiki.lag('td_slot');
SELECT saiki.drop_slot('td_slot');
SELECT * FROM saiki.peek('td_slot', 1);
SELECT 'stop' FROM pg_drop_replication_slot('td_slot');
SELECT saiki.drop_slot('dba_slot');
SELECT count(*) FROM saiki.slot_status() WHERE slot_name = 'dba_slot';
DROP TABLE dba_t;
