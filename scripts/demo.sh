#!/usr/bin/env bash
# The main job on local defaults (README's first command): a source PostgreSQL with the saiki
# extension, a Kafka-protocol broker (tansu), an ODS database, `saiki-relay source` streaming a
# small order workload from the slot into Kafka and `saiki-relay sink` materializing it into
# the ODS, and `saiki-relay ingest` taking "parcel packed" events that a warehouse service
# pushes over HTTP. Every two seconds: changes/s, messages Kafka acknowledged, slot lag, rows
# in the ODS, commit -> ODS freshness, events Kafka acknowledged from the event API, and
# those events in the ODS table ods.ev_parcel_packed, and the change rows `saiki-relay lake`
# committed to Apache Iceberg change-log tables (read back with PyIceberg at the end). Four
# seconds in, a migration adds a column with a default at the source; the ODS follows it, the
# rows from before included. Fourteen seconds in, the slot is lost (as a failover loses it)
# while orders are deleted; the relay resyncs and the sink sweeps the deleted orders.
#
#   scripts/demo.sh                 run until Ctrl-C, then stop everything it started
#   scripts/demo.sh --seconds 30    run for 30 seconds (headless)
#   scripts/demo.sh --keep          leave the database up for exploring; prints how to connect
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_BIN=/usr/lib/postgresql/15/bin
SECONDS_TO_RUN=0
KEEP=0
RATE=200
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_TO_RUN="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --rate) RATE="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh
echo "[demo] building and installing the saiki extension and saiki-relay (release)"
# SAIKI_EXTENSION_INSTALLED=1: scripts/test.sh installed this checkout's extension already.
if [ "${SAIKI_EXTENSION_INSTALLED:-0}" != 1 ]; then
  (cd saiki_pg && cargo pgrx install --release --pg-config "$PG_BIN/pg_config" >/dev/null)
fi
cargo build --release -q -p saiki-relay
RELAY=$PWD/target/release/saiki-relay

DIR=/tmp/saiki-demo
PORT=${SAIKI_DEMO_PORT:-54329}
KAFKA_PORT=${SAIKI_DEMO_KAFKA_PORT:-19092}
HTTP_PORT=${SAIKI_DEMO_HTTP_PORT:-19187}
SINK_HTTP_PORT=${SAIKI_DEMO_SINK_HTTP_PORT:-19188}
INGEST_PORT=${SAIKI_DEMO_INGEST_PORT:-18080}
INGEST_HTTP_PORT=${SAIKI_DEMO_INGEST_HTTP_PORT:-19189}
LAKE_HTTP_PORT=${SAIKI_DEMO_LAKE_HTTP_PORT:-19190}
ADMIN_TOKEN=demo-admin-token-0123456789
if [ -f "$DIR/data/postmaster.pid" ]; then
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
fi
rm -rf "$DIR"; mkdir -p "$DIR"; chown postgres:postgres "$DIR"
runuser -u postgres -- "$PG_BIN/initdb" -D "$DIR/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
cat >> "$DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
wal_level = logical
# PostgreSQL 15.20 loads only the output plugins listed here (one entry per library).
output_plugin_libraries = 'pgoutput, test_decoding, saiki'
# Small, so that the demo's batch job (20,000 rows in one transaction) is streamed to Kafka
# while it runs (source.stream_large); the default is 64MB.
logical_decoding_work_mem = '1MB'
CONF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w start >/dev/null
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=shop

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${TANSU_PID:-}" ] && kill "$TANSU_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then
    echo
    echo "[demo] left running (the database; relays and broker stopped)."
    echo "[demo] source: psql 'host=127.0.0.1 port=$PORT user=postgres dbname=shop'"
    echo "[demo]   try: SELECT * FROM saiki.slot_status();  SELECT * FROM saiki.peek('saiki_demo', 5);"
    echo "[demo]   or:  $RELAY status --dsn 'host=127.0.0.1 port=$PORT user=postgres dbname=shop'"
    echo "[demo] ODS:    psql 'host=127.0.0.1 port=$PORT user=postgres dbname=ods'"
    echo "[demo]   event types: SELECT name, owning_team FROM saiki_ingest.event_types;"
    echo "[demo]   events: SELECT warehouse, count(*), sum(items) FROM ods.ev_parcel_packed GROUP BY 1;"
    echo "[demo]   try: SELECT status, count(*) FROM ods.orders GROUP BY 1;  SELECT * FROM saiki_sink.offsets;"
    echo "[demo] lake: /opt/saiki-py/bin/python -c \"from pyiceberg.catalog.sql import SqlCatalog; print(SqlCatalog('saiki', uri='postgresql+psycopg2://postgres@127.0.0.1:$PORT/ods').load_table('saiki.orders_changes').scan().to_pandas())\""
    echo "[demo] stop with: runuser -u postgres -- $PG_BIN/pg_ctl -D $DIR/data stop"
  else
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    echo "[demo] stopped; nothing left running"
  fi
}
trap cleanup EXIT
trap 'exit 0' INT TERM

"$PG_BIN/psql" -X -q -d postgres -c "CREATE DATABASE shop" -c "CREATE DATABASE ods"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION saiki;
CREATE TABLE articles (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, created timestamptz NOT NULL DEFAULT now(),
                     status text NOT NULL DEFAULT 'new');
CREATE TABLE order_items (order_id bigint NOT NULL REFERENCES orders, article_id int NOT NULL REFERENCES articles,
                          qty int NOT NULL, PRIMARY KEY (order_id, article_id));
INSERT INTO articles SELECT g, 'article ' || g, 10 + g % 90 FROM generate_series(1, 100) g;
CREATE TABLE price_history (article_id int NOT NULL REFERENCES articles, day date NOT NULL,
                            price numeric(10,2) NOT NULL, PRIMARY KEY (article_id, day));
SQL
cat > "$DIR/order.sql" <<'SQL'
\set customer random(1, 10000)
\set article random(1, 100)
BEGIN;
INSERT INTO orders (customer) VALUES (:customer) RETURNING id \gset
INSERT INTO order_items VALUES (:id, :article, 1 + :customer % 3);
UPDATE orders SET status = 'paid' WHERE id = :id;
COMMIT;
SQL

mkdir -p "$DIR/broker"
(cd "$DIR/broker" && exec "$HOME/.cargo/bin/tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
   --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine sqlite://log.db >broker.log 2>&1) &
TANSU_PID=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$KAFKA_PORT) 2>/dev/null && break; sleep 0.1; done
# tansu 0.6.0 lacks an index its fetch needs once messages carry headers (docs/testing.md).
python3 -c "
import sqlite3, time
for _ in range(300):
    try:
        c = sqlite3.connect('$DIR/broker/log.db', timeout=30)
        c.execute('create index if not exists saiki_header_topition_offset on header (topition, offset_id)'); c.commit(); break
    except sqlite3.OperationalError: time.sleep(0.1)
"
cat > "$DIR/relay.toml" <<TOML
[source]
name = "demo"
dsn = "host=127.0.0.1 port=$PORT user=postgres dbname=shop"
slot = "saiki_demo"
snapshot = "initial"
[kafka]
brokers = "127.0.0.1:$KAFKA_PORT"
[http]
listen = "127.0.0.1:$HTTP_PORT"
TOML
cat > "$DIR/sink.toml" <<TOML
[sink]
dsn = "host=127.0.0.1 port=$PORT user=postgres dbname=ods"
instance_id = "demo-sink"
[kafka]
brokers = "127.0.0.1:$KAFKA_PORT"
[kafka.properties]
# tansu holds a fetch for the whole fetch.wait.max.ms (Kafka answers when data arrives).
"fetch.wait.max.ms" = "20"
[http]
listen = "127.0.0.1:$SINK_HTTP_PORT"
TOML
cat > "$DIR/ingest.toml" <<TOML
[ingest]
dsn = "host=127.0.0.1 port=$PORT user=postgres dbname=ods"
admin_token = "$ADMIN_TOKEN"
listen = "127.0.0.1:$INGEST_PORT"
[kafka]
brokers = "127.0.0.1:$KAFKA_PORT"
[http]
listen = "127.0.0.1:$INGEST_HTTP_PORT"
TOML
cat > "$DIR/lake.toml" <<TOML
[lake]
warehouse = "file://$DIR/lake"
catalog_dsn = "host=127.0.0.1 port=$PORT user=postgres dbname=ods"
instance_id = "demo-lake"
commit_interval = "5s"
[kafka]
brokers = "127.0.0.1:$KAFKA_PORT"
[kafka.properties]
"fetch.wait.max.ms" = "20"
[http]
listen = "127.0.0.1:$LAKE_HTTP_PORT"
TOML
"$RELAY" --config "$DIR/relay.toml" source >/dev/null 2>"$DIR/relay.log" &
SOURCE_PID=$!
PIDS+=($!)
"$RELAY" --config "$DIR/sink.toml" sink >/dev/null 2>"$DIR/sink.log" &
PIDS+=($!)
"$RELAY" --config "$DIR/ingest.toml" ingest >/dev/null 2>"$DIR/ingest.log" &
PIDS+=($!)
"$RELAY" --config "$DIR/lake.toml" lake >/dev/null 2>"$DIR/lake.log" &
PIDS+=($!)
# The warehouse service: registers its event type, gets a token that may publish it, and
# pushes a batch of "parcel packed" events five times a second.
API="http://127.0.0.1:$INGEST_PORT"
for _ in $(seq 100); do
  curl -sf -o /dev/null -H "Authorization: Bearer $ADMIN_TOKEN" "$API/event-types" && break; sleep 0.1
done
curl -sf -o /dev/null -X POST "$API/event-types" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'Content-Type: application/json' --data-binary @- <<'JSON'
{"name": "parcel.packed", "owning_team": "warehouse", "partition_key": ["/parcel_id"],
 "schema": {"type": "object", "required": ["parcel_id", "warehouse", "items"],
            "properties": {"parcel_id": {"type": "string"}, "warehouse": {"enum": ["BER", "HAM", "MUC"]},
                           "items": {"type": "integer", "minimum": 1}}}}
JSON
WAREHOUSE_TOKEN=$(curl -sf -X POST "$API/tokens" -H "Authorization: Bearer $ADMIN_TOKEN" \
  --data-binary '{"scopes": ["write:parcel.packed"]}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
(
  i=0
  while :; do
    i=$((i + 1))
    curl -s -o /dev/null -X POST "$API/event-types/parcel.packed/events" \
      -H "Authorization: Bearer $WAREHOUSE_TOKEN" -H 'Content-Type: application/json' \
      --data-binary "[{\"parcel_id\": \"P-$i-a\", \"warehouse\": \"BER\", \"items\": $((1 + i % 3))},
                      {\"parcel_id\": \"P-$i-b\", \"warehouse\": \"HAM\", \"items\": 1}]" || true
    sleep 0.2
  done
) &
PIDS+=($!)
DURATION=$([ "$SECONDS_TO_RUN" -gt 0 ] && echo "$SECONDS_TO_RUN" || echo 86400)
"$PG_BIN/pgbench" -n -c 2 -R "$RATE" -T "$DURATION" -f "$DIR/order.sql" >"$DIR/pgbench.log" 2>&1 &
PIDS+=($!)

echo "[demo] source: postgres://postgres@127.0.0.1:$PORT/shop, slot saiki_demo, workload $RATE orders/s"
echo "[demo] Kafka: 127.0.0.1:$KAFKA_PORT, topics saiki.public.orders, saiki.public.order_items, saiki.transactions"
echo "[demo] relays: source http://127.0.0.1:$HTTP_PORT/metrics (log $DIR/relay.log), sink http://127.0.0.1:$SINK_HTTP_PORT/metrics (log $DIR/sink.log)"
echo "[demo] event API: $API (admin token $ADMIN_TOKEN, log $DIR/ingest.log), events in saiki.events.parcel.packed"
echo "[demo] lake: Iceberg tables in $DIR/lake, SQL catalog \"saiki\" in the ODS database (log $DIR/lake.log)"
echo "[demo] ODS: postgres://postgres@127.0.0.1:$PORT/ods, schema ods; Ctrl-C stops everything"
printf '%7s %10s %10s %12s %10s %12s %12s %10s %11s %10s %10s %10s\n' "time" "changes" "changes/s" "kafka acked" "slot lag" "ODS orders" "fresh p50" "events" "ODS events" "streamed" "ODS prices" "lake rows"
metric() { curl -s "http://127.0.0.1:$1/metrics" 2>/dev/null | awk -v m="$2" '$1 ~ "^"m"\\{" {print $2}'; }
metric0() { local v; v=$(metric "$1" "$2"); echo "${v:-0}"; }
start=$(date +%s); prev=0; migrated=0; batch=0; lost=0; gone=""
# The source relay's counters up to its restart (the lost slot below), so the columns go on.
base_n=0; base_acked=0; base_streamed=0
while :; do
  sleep 2
  now=$(date +%s); el=$((now - start))
  if [ "$migrated" = 0 ] && [ "$el" -ge 4 ]; then
    # A service team migrates while everything runs: the ODS follows, rows from before included.
    "$PG_BIN/psql" -X -q -c "ALTER TABLE orders ADD COLUMN channel text NOT NULL DEFAULT 'web'"
    echo "[demo] migration at the source: ALTER TABLE orders ADD COLUMN channel text NOT NULL DEFAULT 'web'"
    migrated=1
  elif [ "$migrated" = 1 ] && [ "$el" -ge 8 ]; then
    # The next deploy renames it: the ODS column is renamed, not duplicated.
    "$PG_BIN/psql" -X -q -c "ALTER TABLE orders RENAME COLUMN channel TO sales_channel"
    echo "[demo] migration at the source: ALTER TABLE orders RENAME COLUMN channel TO sales_channel"
    migrated=2
  fi
  if [ "$batch" = 0 ] && [ "$el" -ge 6 ]; then
    # A batch job: one transaction of 20,000 rows that stays open 3 s after its inserts.
    # Kafka gets its rows while it runs; the ODS gets them at its commit, all in one step.
    "$PG_BIN/psql" -X -q -o /dev/null -c "BEGIN" \
      -c "INSERT INTO price_history SELECT a, date '2025-01-01' + d, 5 + (a * d) % 95 FROM generate_series(1, 100) a, generate_series(0, 199) d" \
      -c "SELECT pg_sleep(3)" -c "COMMIT" >"$DIR/batch.log" 2>&1 &
    PIDS+=($!)
    echo "[demo] batch job at the source: 20000 price_history rows in one transaction, committed 3 s later"
    batch=1
  fi
  if [ "$lost" = 0 ] && [ "$el" -ge 14 ]; then
    # The slot is lost, as a failover to a standby loses it: the relay is stopped, a DBA drops
    # its slot, and orders are deleted meanwhile. The restarted relay finds the slot gone
    # (saiki.slot_origins says it had one), resyncs every table, and the sink sweeps the rows
    # the resync no longer finds (docs/operations.md, "A primary failover").
    base_n=$((base_n + $(metric0 "$HTTP_PORT" saiki_source_changes_total)))
    base_acked=$((base_acked + $(metric0 "$HTTP_PORT" saiki_source_messages_produced_total)))
    base_streamed=$((base_streamed + $(metric0 "$HTTP_PORT" saiki_source_streamed_records_total)))
    kill -TERM "$SOURCE_PID" 2>/dev/null || true
    wait "$SOURCE_PID" 2>/dev/null || true
    for _ in $(seq 50); do
      "$PG_BIN/psql" -X -q -o /dev/null -c "SELECT saiki.drop_slot('saiki_demo')" 2>/dev/null && break
      sleep 0.2
    done
    gone=$("$PG_BIN/psql" -X -q -t -A \
      -c "DELETE FROM order_items WHERE order_id IN (SELECT id FROM orders ORDER BY id LIMIT 5)" \
      -c "DELETE FROM orders WHERE id IN (SELECT id FROM orders ORDER BY id LIMIT 5) RETURNING id" | paste -sd, -)
    "$RELAY" --config "$DIR/relay.toml" source >/dev/null 2>>"$DIR/relay.log" &
    SOURCE_PID=$!
    PIDS+=($!)
    echo "[demo] lost slot: relay stopped, slot dropped, orders $gone deleted meanwhile; the relay restarts and resyncs"
    lost=1
  fi
  n=$((base_n + $(metric0 "$HTTP_PORT" saiki_source_changes_total)))
  acked=$((base_acked + $(metric0 "$HTTP_PORT" saiki_source_messages_produced_total)))
  lag=$("$PG_BIN/psql" -X -t -A -c "SELECT saiki.lag('saiki_demo')" 2>/dev/null || echo "?")
  # Rows in the ODS, and commit -> ODS time of the orders applied in the last two seconds
  # (an order's created time is its transaction's start, a moment before its commit).
  rows=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT count(*) FROM ods.orders" 2>/dev/null || echo 0)
  fresh=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT coalesce(round(1000 * extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY _saiki_applied_at - created)))::text || 'ms', '-') FROM ods.orders WHERE _saiki_applied_at > now() - interval '2 s'" 2>/dev/null || echo "-")
  events=$(metric "$INGEST_HTTP_PORT" saiki_ingest_events_published_total)
  ods_events=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT count(*) FROM ods.ev_parcel_packed" 2>/dev/null || echo 0)
  streamed=$((base_streamed + $(metric0 "$HTTP_PORT" saiki_source_streamed_records_total)))
  prices=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT count(*) FROM ods.price_history" 2>/dev/null || echo 0)
  lake=$(metric "$LAKE_HTTP_PORT" saiki_lake_rows_written_total)
  printf '%6ss %10s %10s %12s %10s %12s %12s %10s %11s %10s %10s %10s\n' "$el" "$n" "$(( (n - prev) / 2 ))" "${acked:-?}" "$lag" "${rows:-0}" "${fresh:--}" "${events:-0}" "${ods_events:-0}" "${streamed:-0}" "${prices:-0}" "${lake:-0}"
  prev=$n
  if [ "$SECONDS_TO_RUN" -gt 0 ] && [ "$el" -ge "$SECONDS_TO_RUN" ]; then
    col=$([ "$migrated" = 2 ] && echo sales_channel || echo channel)
    missing=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT count(*) FROM ods.orders WHERE $col IS DISTINCT FROM 'web'" 2>/dev/null || echo "?")
    echo "[demo] ODS orders without the migrated column's value: $missing (of ${rows:-0})"
    # The lake, read by a reader that is not ours: PyIceberg through the SQL catalog.
    # DuckDB then runs docs/lake.md's current-state query on the orders' change log.
    /opt/saiki-py/bin/python - "postgresql+psycopg2://postgres@127.0.0.1:$PORT/ods" "$PWD/docs/lake.md" "${gone:-}" <<'PY' || echo "[demo] lake: PyIceberg could not read the tables"
import sys
from pyiceberg.catalog.sql import SqlCatalog
cat = SqlCatalog("saiki", uri=sys.argv[1])
for name in ("orders_changes", "price_history_changes"):
    try:
        t = cat.load_table("saiki." + name).scan(selected_fields=("_saiki_action",)).to_arrow()
        acts = t.column("_saiki_action").value_counts().to_pylist()
        by = ", ".join(f"{a['values']}: {a['counts']}" for a in sorted(acts, key=lambda a: a["values"]))
        print(f"[demo] lake (PyIceberg): saiki.{name} {t.num_rows} change rows ({by})")
    except Exception as e:
        print(f"[demo] lake (PyIceberg): saiki.{name}: {e}")
try:
    import duckdb
    doc = open(sys.argv[2]).read()
    start = doc.index("```sql\n", doc.index("### The current state")) + len("```sql\n")
    query = doc[start:doc.index("```", start)]
    changes = cat.load_table("saiki.orders_changes").scan().to_arrow()
    n = duckdb.sql(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
    print(f"[demo] lake (DuckDB): {n} orders in the current state of saiki.orders_changes (docs/lake.md's query)")
    cols = [f.name for f in cat.load_table("saiki.orders_changes").schema().fields if not f.name.startswith("_saiki_")]
    print(f"[demo] lake: saiki.orders_changes columns {', '.join(cols)} (the migration's rename followed: one column, its history kept)")
    if sys.argv[3]:
        # The lost slot's resync ends with a W row per partition: docs/lake.md's query leaves
        # out the orders deleted while no slot was there, as the sink's sweep does in the ODS.
        left = duckdb.sql(f"SELECT count(*) FROM ({query}) WHERE id IN ({sys.argv[3]})").fetchall()[0][0]
        print(f"[demo] lake (DuckDB): orders deleted while the slot was gone still in the current state: {left}")
except Exception as e:
    print(f"[demo] lake (DuckDB): {e}")
PY
    echo "[demo] batch job: ${streamed:-0} rows sent to Kafka as a streamed transaction, most before its commit; ODS price_history: ${prices:-0} rows (of 20000), applied at its commit"
    if [ "$lost" = 1 ]; then
      resync=$("$PG_BIN/psql" -X -t -A -c "SELECT state || ', ' || tables_done || '/' || tables || ' tables' FROM saiki.resyncs WHERE slot_name = 'saiki_demo'" 2>/dev/null || echo "?")
      swept=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT coalesce(sum(rows), 0) FROM saiki_sink.sweeps WHERE ods_table = 'orders'" 2>/dev/null || echo "?")
      left=$("$PG_BIN/psql" -X -t -A -d ods -c "SELECT count(*) FROM ods.orders WHERE id IN (${gone:-0})" 2>/dev/null || echo "?")
      echo "[demo] lost slot: resync ${resync:-not recorded}; the sink swept ${swept} orders; orders deleted while the slot was gone still in the ODS: ${left}"
    fi
    break
  fi
done
