-- saiki 0.1.0 -> 0.2.0: DDL capture (event triggers, saiki.ddl_shapes, saiki.ddl_capture()),
-- as saiki_pg/src/ddl.rs creates it in a new install. tests/tests/it/upgrade.rs checks that an
-- updated 0.1.0 has exactly the objects of a new install.
\echo Use "ALTER EXTENSION saiki UPDATE" to load this file. \quit

/* <begin connected objects> */
-- saiki_pg/src/ddl.rs:17
-- saiki::ddl::ddl_diff
CREATE  FUNCTION "ddl_diff"(
	"old" json, /* Option < Json > */
	"new" json /* Json */
) RETURNS json /* Json */
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ddl_diff_wrapper';
/* </end connected objects> */

/* <begin connected objects> */
-- saiki_pg/src/ddl.rs:30
-- requires:
--   ddl_diff


-- The last shape of every captured table, by oid: what the next DDL statement is compared
-- with. Changes to it are never decoded (the plugin leaves schema saiki out).
CREATE TABLE saiki.ddl_shapes (
    relid       oid         PRIMARY KEY,
    shape       json        NOT NULL,
    captured_at timestamptz NOT NULL DEFAULT now()
);

-- A table's shape now: columns by attnum (name, type, nullability, default, and the value
-- existing rows read after ADD COLUMN ... DEFAULT), primary key, replica identity.
-- Values in `missing` are written in one format whatever the session's settings.
CREATE FUNCTION saiki.ddl_shape(rel oid) RETURNS json
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD'
    SET timezone = 'UTC' SET intervalstyle = 'iso_8601' SET extra_float_digits = 3 AS $fn$
SELECT json_build_object(
    'schema', n.nspname::text,
    'table', c.relname::text,
    'columns', coalesce((
        SELECT json_agg(json_build_object(
                   'attnum', a.attnum,
                   'name', a.attname::text,
                   'type', format_type(a.atttypid, a.atttypmod),
                   'nullable', NOT a.attnotnull,
                   'default', pg_get_expr(d.adbin, d.adrelid),
                   'missing', CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END)
               ORDER BY a.attnum)
        FROM pg_attribute a
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'::json),
    'key', coalesce((
        SELECT json_agg(a.attname::text ORDER BY k.ord)
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(att, ord)
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.att
        WHERE i.indrelid = c.oid AND i.indisprimary), '[]'::json),
    'replica_identity', c.relreplident::text)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = rel
$fn$;

-- The tables whose DDL is captured: ordinary and partitioned, WAL-logged, outside the
-- system schemas and saiki.
CREATE FUNCTION saiki.ddl_captured(rel oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
SELECT EXISTS (
    SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'saiki', 'pg_toast')
      AND n.nspname NOT LIKE 'pg\_temp\_%' AND n.nspname NOT LIKE 'pg\_toast\_temp\_%')
$fn$;

-- Every captured table's shape now, as the baseline for the next DDL.
CREATE FUNCTION saiki.ddl_baseline() RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
    DELETE FROM saiki.ddl_shapes;
    WITH t AS (
        INSERT INTO saiki.ddl_shapes (relid, shape)
        SELECT c.oid, saiki.ddl_shape(c.oid) FROM pg_class c WHERE saiki.ddl_captured(c.oid)
        RETURNING 1)
    SELECT count(*) FROM t;
$fn$;

CREATE FUNCTION saiki.on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    r record;
    before json;
    after json;
    d json;
BEGIN
    FOR r IN
        SELECT DISTINCT ON (c.objid) c.objid, c.command_tag
        FROM pg_event_trigger_ddl_commands() c
        WHERE c.classid = 'pg_class'::regclass AND NOT c.in_extension AND saiki.ddl_captured(c.objid)
        ORDER BY c.objid, c.command_tag LIKE 'CREATE%' DESC
    LOOP
        BEGIN
            SELECT s.shape INTO before FROM saiki.ddl_shapes s WHERE s.relid = r.objid;
            after := saiki.ddl_shape(r.objid);
            d := saiki.ddl_diff(before, after);
            INSERT INTO saiki.ddl_shapes AS s (relid, shape) VALUES (r.objid, after)
                ON CONFLICT (relid) DO UPDATE SET shape = EXCLUDED.shape, captured_at = now();
            IF json_array_length(d -> 'changes') > 0 THEN
                PERFORM pg_logical_emit_message(true, 'saiki.ddl', json_build_object(
                    'ddl', r.command_tag,
                    'statement', current_query(),
                    'schema', after ->> 'schema',
                    'table', after ->> 'table',
                    'changes', d -> 'changes',
                    'renamed', d -> 'renamed',
                    'shape', after)::text);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'saiki: the schema change of table % was not captured: %', r.objid::regclass, SQLERRM
                USING HINT = 'Consumers of the change stream (the ODS) will not follow it: tell the Saiki operators (docs/plugin.md, "Schema changes").';
        END;
    END LOOP;
END
$fn$;

CREATE FUNCTION saiki.on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    r record;
    before json;
BEGIN
    FOR r IN
        SELECT o.objid, o.schema_name, o.object_name
        FROM pg_event_trigger_dropped_objects() o
        WHERE o.classid = 'pg_class'::regclass AND o.objsubid = 0 AND o.object_type = 'table'
    LOOP
        BEGIN
            DELETE FROM saiki.ddl_shapes s WHERE s.relid = r.objid RETURNING s.shape INTO before;
            IF before IS NOT NULL THEN
                PERFORM pg_logical_emit_message(true, 'saiki.ddl', json_build_object(
                    'ddl', tg_tag,
                    'statement', current_query(),
                    'schema', r.schema_name,
                    'table', r.object_name,
                    'changes', json_build_array(json_build_object('change', 'drop_table')),
                    'renamed', '{}'::json,
                    'shape', NULL)::text);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'saiki: the drop of table %.% was not captured: %', r.schema_name, r.object_name, SQLERRM
                USING HINT = 'Consumers of the change stream (the ODS) will not follow it: tell the Saiki operators (docs/plugin.md, "Schema changes").';
        END;
    END LOOP;
END
$fn$;

CREATE EVENT TRIGGER saiki_ddl_command_end ON ddl_command_end EXECUTE FUNCTION saiki.on_ddl_command_end();
CREATE EVENT TRIGGER saiki_sql_drop ON sql_drop EXECUTE FUNCTION saiki.on_sql_drop();
SELECT saiki.ddl_baseline();

-- Whether DDL is captured.
CREATE FUNCTION saiki.ddl_capture() RETURNS boolean
LANGUAGE sql STABLE AS $fn$
    SELECT evtenabled <> 'D' FROM pg_catalog.pg_event_trigger WHERE evtname = 'saiki_ddl_command_end'
$fn$;

-- Pauses (false) or resumes (true) DDL capture; returns the new state. DDL while paused is
-- not sent, and the consumers do not follow it; resuming takes every table's shape as it is
-- then as the baseline.
CREATE FUNCTION saiki.ddl_capture(enabled boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    IF enabled THEN
        PERFORM saiki.ddl_baseline();
        ALTER EVENT TRIGGER saiki_ddl_command_end ENABLE;
        ALTER EVENT TRIGGER saiki_sql_drop ENABLE;
    ELSE
        ALTER EVENT TRIGGER saiki_ddl_command_end DISABLE;
        ALTER EVENT TRIGGER saiki_sql_drop DISABLE;
    END IF;
    RETURN saiki.ddl_capture();
END
$fn$;
/* </end connected objects> */
