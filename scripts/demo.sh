#!/usr/bin/env bash
# The main job on local defaults (README's first command), as far as Saiki is built today:
# a source PostgreSQL with the saiki extension and a slot, a small order workload, and the
# change stream read live over the walsender (pg_recvlogical -P saiki), with changes/s and
# slot lag printed every two seconds. The Kafka relay and the ODS sink join this demo when
# they land (issues #3 and #4); until then the stream goes to a JSON-lines file.
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
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

SAIKI_SKIP_TANSU=1 bash scripts/setup.sh
echo "[demo] building and installing the saiki extension (release)"
(cd saiki_pg && cargo pgrx install --release --pg-config "$PG_BIN/pg_config" >/dev/null)

DIR=/tmp/saiki-demo
PORT=${SAIKI_DEMO_PORT:-54329}
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
CONF
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w start >/dev/null
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=shop

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then
    echo
    echo "[demo] left running. Connect with: psql 'host=127.0.0.1 port=$PORT user=postgres dbname=shop'"
    echo "[demo] try: SELECT * FROM saiki.slot_status();  SELECT * FROM saiki.peek('saiki_demo', 5);"
    echo "[demo] stop with: runuser -u postgres -- $PG_BIN/pg_ctl -D $DIR/data stop"
  else
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    echo "[demo] stopped; nothing left running"
  fi
}
trap cleanup EXIT
trap 'exit 0' INT TERM

"$PG_BIN/psql" -X -q -d postgres -c "CREATE DATABASE shop"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 <<'SQL'
CREATE EXTENSION saiki;
CREATE TABLE articles (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, created timestamptz NOT NULL DEFAULT now(),
                     status text NOT NULL DEFAULT 'new');
CREATE TABLE order_items (order_id bigint NOT NULL REFERENCES orders, article_id int NOT NULL REFERENCES articles,
                          qty int NOT NULL, PRIMARY KEY (order_id, article_id));
INSERT INTO articles SELECT g, 'article ' || g, 10 + g % 90 FROM generate_series(1, 100) g;
SELECT slot_name FROM saiki.create_slot('saiki_demo') \gset
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

"$PG_BIN/pg_recvlogical" -d shop -S saiki_demo --start -f "$DIR/changes.jsonl" -F 1 -s 1 -o include-timestamp=1 &
PIDS+=($!)
DURATION=$([ "$SECONDS_TO_RUN" -gt 0 ] && echo "$SECONDS_TO_RUN" || echo 86400)
"$PG_BIN/pgbench" -n -c 2 -R "$RATE" -T "$DURATION" -f "$DIR/order.sql" >"$DIR/pgbench.log" 2>&1 &
PIDS+=($!)

echo "[demo] source: postgres://postgres@127.0.0.1:$PORT/shop, slot saiki_demo, workload $RATE orders/s"
echo "[demo] change stream: $DIR/changes.jsonl (one JSON record per line); Ctrl-C stops"
printf '%8s %12s %12s %12s %s\n' "time" "records" "records/s" "lag bytes" "last change"
start=$(date +%s); prev=0
while :; do
  sleep 2
  now=$(date +%s); el=$((now - start))
  n=$(wc -l < "$DIR/changes.jsonl" 2>/dev/null || echo 0)
  lag=$("$PG_BIN/psql" -X -t -A -c "SELECT saiki.lag('saiki_demo')" 2>/dev/null || echo "?")
  last=$(tail -n 20 "$DIR/changes.jsonl" 2>/dev/null | grep -o '"action":"[IUD]".*"table":"[a-z_]*"' | tail -1 \
         | sed -E 's/"action":"([IUD])".*"table":"([a-z_]*)"/\1 \2/' || true)
  printf '%7ss %12s %12s %12s %s\n' "$el" "$n" "$(( (n - prev) / 2 ))" "$lag" "$last"
  prev=$n
  if [ "$SECONDS_TO_RUN" -gt 0 ] && [ "$el" -ge "$SECONDS_TO_RUN" ]; then break; fi
done
