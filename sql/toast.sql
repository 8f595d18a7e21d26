-- TOAST: a stored value the update did not change is not in the WAL. It is listed in
-- unchanged_toast and absent from columns, never null.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE docs (id int PRIMARY KEY, title text, body text, meta jsonb);
ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
INSERT INTO docs VALUES (1, 't', repeat('x', 10000), '{"k": 1}');
SELECT length(r) > 10000 AS full_body_in_insert FROM changes('regression_slot') r WHERE r LIKE '{"action":"I"%';
UPDATE docs SET title = 'u' WHERE id = 1;
SELECT * FROM changes('regression_slot');
-- Changing the toasted value sends it whole.
UPDATE docs SET body = repeat('y', 10000) WHERE id = 1;
SELECT position('unchanged_toast' IN r) = 0 AS no_unchanged, length(r) > 10000 AS full_body
FROM changes('regression_slot') r WHERE r LIKE '{"action":"U"%';
-- FULL identity: the old row is complete (PostgreSQL flattens it), the new row still omits
-- the unchanged value.
ALTER TABLE docs REPLICA IDENTITY FULL;
UPDATE docs SET title = 'v' WHERE id = 1;
SELECT regexp_replace(r, '(yyyyyyyyyy)+', 'y...', 'g') FROM changes('regression_slot') r;
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE docs;
