-- add-tables / filter-tables with wildcards and escapes; actions; numbers-as-strings.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id int8 PRIMARY KEY, total numeric, f float8);
CREATE TABLE shop.order_items (id int PRIMARY KEY);
CREATE TABLE shop.secret (id int PRIMARY KEY);
CREATE TABLE public."odd.name" (id int PRIMARY KEY);
INSERT INTO shop.orders VALUES (9007199254740993, 12345678901234567890.123, 1.5);
INSERT INTO shop.order_items VALUES (1);
INSERT INTO shop.secret VALUES (1);
INSERT INTO public."odd.name" VALUES (1);
SELECT * FROM pg_logical_slot_peek_changes('regression_slot', NULL, NULL) LIMIT 0;
SELECT * FROM changes('regression_slot', 'add-tables', 'shop.order*', 'filter-tables', 'shop.order_items',
  'numbers-as-strings', 'numeric', 'include-transaction', 'false');
-- An escaped dot matches a literal dot in a name.
INSERT INTO public."odd.name" VALUES (2);
INSERT INTO shop.secret VALUES (2);
SELECT * FROM changes('regression_slot', 'add-tables', 'public.odd\.name', 'include-transaction', 'false');
-- actions: only deletes.
INSERT INTO shop.secret VALUES (3);
DELETE FROM shop.secret WHERE id = 3;
SELECT * FROM changes('regression_slot', 'actions', 'delete', 'include-transaction', 'false');
-- numbers-as-strings all.
INSERT INTO shop.orders VALUES (1, 'NaN', '-Infinity');
SELECT * FROM changes('regression_slot', 'numbers-as-strings', 'all', 'include-transaction', 'false');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP SCHEMA shop CASCADE;
DROP TABLE public."odd.name";
