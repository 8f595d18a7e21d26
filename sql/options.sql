-- Bad options are errors with SQLSTATE 22023 that name the option; nothing is consumed.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
\set VERBOSITY default
SELECT * FROM changes('regression_slot', 'include-typos', '1');
SELECT * FROM changes('regression_slot', 'include-types', 'maybe');
SELECT * FROM changes('regression_slot', 'format-version', '2');
SELECT * FROM changes('regression_slot', 'actions', 'insert,upsert');
SELECT * FROM changes('regression_slot', 'numbers-as-strings', 'some');
SELECT * FROM changes('regression_slot', 'add-tables', 'orders');
DO $$
BEGIN
  PERFORM * FROM pg_logical_slot_get_changes('regression_slot', NULL, NULL, 'bogus', '1');
EXCEPTION WHEN invalid_parameter_value THEN
  RAISE NOTICE 'SQLSTATE %', SQLSTATE;
END $$;
-- Accepted spellings: wal2json's include-xids/include-lsn, booleans as PostgreSQL spells them.
SELECT * FROM changes('regression_slot', 'include-xids', '0', 'include-lsn', 'off', 'include-types', 'yes',
  'format-version', '1', 'skip-empty-xacts', 'on', 'numbers-as-strings', 'int8', 'stream-changes', 'false');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
