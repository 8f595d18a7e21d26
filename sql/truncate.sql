-- TRUNCATE: one T record per captured table, each naming every table of the statement.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE parent (id serial PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
CREATE TABLE other (id int PRIMARY KEY);
TRUNCATE other;
TRUNCATE parent, child RESTART IDENTITY;
TRUNCATE parent CASCADE;
SELECT * FROM changes('regression_slot');
-- Filtered tables drop out of the list; the actions option can drop truncates.
TRUNCATE parent, other CASCADE;
SELECT * FROM changes('regression_slot', 'filter-tables', 'public.child');
TRUNCATE other;
SELECT * FROM changes('regression_slot', 'actions', 'insert,update,delete');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE child, parent, other;
