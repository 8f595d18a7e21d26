-- Values by type (DESIGN.md §1 "Values"). The Rust type test covers every built-in type
-- against PostgreSQL's own output; this file shows the encodings.
SET DateStyle = ISO;
SET TimeZone = UTC;
SET IntervalStyle = postgres;
SELECT 'init' FROM pg_create_logical_replication_slot('regression_slot', 'saiki');
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN tags AS text[];
CREATE TABLE v (
  id int PRIMARY KEY, b bool, i2 int2, i8 int8, f4 float4, f8 float8, n numeric, o oid,
  j json, jb jsonb, a int[], a2 text[][], ba bytea, m mood, p pair, d posint, dt tags,
  ts timestamptz, r int4range, u uuid, c char(3), ar pair[]
);
INSERT INTO v VALUES (1, true, -32768, 9223372036854775807, 1.5, 'NaN', -0.000001, 4294967295,
  '{"a" : [1, 2,
   3], "b": "x y"}', '{"z": {"y": 1}, "a": [true, null]}', '{1,NULL,3}', '{{"a b","c\"d"},{e,NULL}}',
  '\x00ff0a', 'happy', ROW(7, 'seven'), 5, '{x,y}', '2026-11-27 05:19:58.123456+00', '[1,5)',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'ab', ARRAY[ROW(1,'x')::pair, NULL]);
INSERT INTO v (id, f4, f8, n, a, j) VALUES (2, '-Infinity', 'Infinity', 'NaN', '{}', 'null');
INSERT INTO v (id) VALUES (3);
SELECT * FROM changes('regression_slot', 'include-transaction', '0');
SELECT 'stop' FROM pg_drop_replication_slot('regression_slot');
DROP TABLE v;
DROP TYPE pair CASCADE;
DROP TYPE mood;
DROP DOMAIN posint;
DROP DOMAIN tags;
