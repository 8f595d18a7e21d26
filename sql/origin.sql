-- Replication origins: include-origin names the origin on B, changes and C; filter-origins
-- leaves out changes that came from the listed origins (or from any origin, with *).
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE o (id int PRIMARY KEY);
SELECT 'created' FROM pg_replication_origin_create('upstream');
INSERT INTO o VALUES (1);
SELECT 'setup' FROM pg_replication_origin_session_setup('upstream');
INSERT INTO o VALUES (2);
SELECT 'reset' FROM pg_replication_origin_session_reset();
SELECT * FROM changes('regression_slot', 'include-origin', '1');
-- filter-origins by name: the local change stays.
INSERT INTO o VALUES (3);
SELECT 'setup' FROM pg_replication_origin_session_setup('upstream');
INSERT INTO o VALUES (4);
SELECT 'reset' FROM pg_replication_origin_session_reset();
SELECT * FROM changes('regression_slot', 'filter-origins', 'upstream', 'include-transaction', '0');
-- filter-origins '*': every change with an origin goes.
SELECT 'setup' FROM pg_replication_origin_session_setup('upstream');
INSERT INTO o VALUES (5);
SELECT 'reset' FROM pg_replication_origin_session_reset();
INSERT INTO o VALUES (6);
SELECT * FROM changes('regression_slot', 'filter-origins', '*', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
SELECT 'dropped' FROM pg_replication_origin_drop('upstream');
DROP TABLE o;
