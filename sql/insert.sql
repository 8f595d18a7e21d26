-- INSERT: one record per row, between B and C, keys in the contract's order.
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TABLE orders (id int PRIMARY KEY, article text, qty int2, price numeric(10,2), paid bool, note text);
INSERT INTO orders VALUES (1, 'shoe', 2, 59.90, true, NULL);
BEGIN;
INSERT INTO orders VALUES (2, 'sock "wool"', 6, 4.50, false, E'line1\nline2\\');
INSERT INTO orders VALUES (3, 'żółw', 1, 0, true, '');
COMMIT;
SELECT * FROM changes('regression_slot');
-- An empty transaction (no captured change) leaves no B/C by default...
BEGIN; SELECT txid_current() IS NOT NULL AS got_xid; COMMIT;
SELECT * FROM changes('regression_slot');
-- ... and include-transaction off drops B/C entirely.
INSERT INTO orders VALUES (4, 'boot', 1, 120, true, NULL);
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
-- include-timestamp and include-types.
INSERT INTO orders VALUES (5, 'hat', 1, 15, false, NULL);
SELECT * FROM changes('regression_slot', 'include-timestamp', '1', 'include-types', '1');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE orders;
