//! `saiki-relay lake` against PostgreSQL, the broker and a local warehouse folder, read back
//! by a reader that is not ours: PyIceberg (PyPI), through the SQL catalog in PostgreSQL.

use std::process::Command;
use std::time::{Duration, Instant};

use saiki_tests::{exec, loopback_port, Broker, PgCluster};

use crate::common::*;

/// The Python with PyIceberg that scripts/setup.sh installs.
fn python() -> String {
    std::env::var("SAIKI_PYICEBERG_PYTHON").unwrap_or_else(|_| "/opt/saiki-py/bin/python".into())
}

/// Reads a change-log table with PyIceberg and prints what the test checks: its rows, the
/// (commit_lsn, seq, action) pairs seen twice, the table rebuilt from its changes, the types.
const READ: &str = r#"
import json, sys
from pyiceberg.catalog.sql import SqlCatalog
uri, name, key = sys.argv[1], sys.argv[2], sys.argv[3]
props = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
cat = SqlCatalog("saiki", uri=uri, **props)
try:
    t = cat.load_table(name)
except Exception as e:
    print(json.dumps({"rows": -1, "error": str(e)})); sys.exit(0)
changes = t.scan().to_arrow()
rows = changes.to_pylist()
seen, dup = set(), 0
for r in rows:
    k = (r["_saiki_source"], r["_saiki_commit_lsn"], r["_saiki_seq"], r["_saiki_action"])
    dup += k in seen and r["_saiki_action"] != "W"  # a resync's end: one W row per partition
    seen.add(k)
state = {}
for r in sorted(rows, key=lambda r: (r["_saiki_commit_lsn"], r["_saiki_seq"])):
    a = r["_saiki_action"]
    if a in ("T", "W"):  # a truncate, or a resync's end (docs/lake.md)
        state.clear()
    elif a == "D":
        state.pop(r[key], None)
    else:
        state[r[key]] = r
cols = [f.name for f in t.schema().fields if not f.name.startswith("_saiki_")]
out = [[None if r[c] is None else str(r[c]) for c in cols] for _, r in sorted(state.items())]
types = {f.name: str(f.field_type) for f in t.schema().fields}
import duckdb
if key == "id":  # the documented query is written for tables keyed by id
    current = duckdb.sql(sys.argv[5]).arrow().read_all().to_pylist()
    duck = sorted([[None if r[c] is None else str(r[c]) for c in cols] for r in current], key=lambda r: int(r[0]))
else:
    duck = out
actions = {}
for r in rows:
    actions[r["_saiki_action"]] = actions.get(r["_saiki_action"], 0) + 1
print(json.dumps({"rows": len(rows), "dup": dup, "actions": actions, "state": out, "duck": duck, "types": types,
                  "spec": str(t.spec()), "files": len(list(t.scan().plan_files())),
                  "location": t.location(), "snapshots": len(t.snapshots())}))
"#;

/// The current state of a table from its change log, as docs/lake.md gives it for DuckDB
/// (`changes`: the change-log table as Arrow; `id`: the key). The tests check that it equals
/// the table rebuilt change by change, and so the source.
pub(crate) const CURRENT_STATE: &str = "\
WITH cut AS (SELECT _saiki_source, max((_saiki_commit_lsn, _saiki_seq)) AS at
             FROM changes WHERE _saiki_action IN ('T', 'W') GROUP BY ALL),
latest AS (SELECT c.*, row_number() OVER (PARTITION BY c._saiki_source, c.id
                                          ORDER BY c._saiki_commit_lsn DESC, c._saiki_seq DESC) AS n
           FROM changes c LEFT JOIN cut USING (_saiki_source)
           WHERE c._saiki_action NOT IN ('T', 'W') AND (cut.at IS NULL OR (c._saiki_commit_lsn, c._saiki_seq) > cut.at))
SELECT * EXCLUDE (n) FROM latest WHERE n = 1 AND _saiki_action <> 'D'";

/// `props`: the catalog's properties as JSON (PyIceberg's FileIO keys, `s3.endpoint`, ...).
fn read_table_with(catalog_uri: &str, table: &str, key: &str, props: &str) -> serde_json::Value {
    let out = Command::new(python())
        .args(["-c", READ, catalog_uri, table, key, props, CURRENT_STATE])
        .output()
        .expect("PyIceberg's Python (scripts/setup.sh installs it in /opt/saiki-py)");
    assert!(
        out.status.success(),
        "PyIceberg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the reader's JSON")
}

/// `warehouse`: the `lake.warehouse` line and its companions.
pub(crate) fn lake_config(
    pg: &PgCluster,
    broker: &Broker,
    warehouse: &str,
    group: &str,
    port: u16,
) -> String {
    format!(
        r#"[lake]
{warehouse}
group = "{group}"
catalog_dsn = "host=127.0.0.1 port={} user=postgres dbname=ods"
instance_id = "test-lake"
commit_interval = "1s"
reconnect_backoff_max = "1s"

[kafka]
brokers = "{}"
topic_prefix = "saiki"

[http]
listen = "127.0.0.1:{port}"
"#,
        pg.port,
        broker.addr()
    )
}

fn start_lake(pg: &PgCluster, broker: &Broker, warehouse: &str) -> Relay {
    start_lake_in(pg, broker, warehouse, "saiki-lake")
}

fn start_lake_in(pg: &PgCluster, broker: &Broker, warehouse: &str, group: &str) -> Relay {
    let port = loopback_port();
    Relay::start_lake(
        &pg.dir,
        &lake_config(
            pg,
            broker,
            &format!("warehouse = \"{warehouse}\""),
            group,
            port,
        ),
        port,
    )
}

/// Waits until the change-log table has `rows` rows, and returns what the reader saw.
fn wait_rows_in(uri: &str, table: &str, key: &str, rows: i64, lake: &Relay) -> serde_json::Value {
    wait_rows_with(uri, table, key, "{}", rows, lake)
}

fn wait_rows_with(
    uri: &str,
    table: &str,
    key: &str,
    props: &str,
    rows: i64,
    lake: &Relay,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let got = read_table_with(uri, table, key, props);
        if got["rows"].as_i64() == Some(rows) {
            // docs/lake.md's current-state query sees what replaying the changes builds.
            assert_eq!(
                got["duck"], got["state"],
                "{table}: DuckDB's current state against the replayed one"
            );
            return got;
        }
        assert!(
            got["rows"].as_i64() < Some(rows),
            "{table}: more rows than changes: {}",
            got["actions"]
        );
        assert!(
            Instant::now() < deadline,
            "{table}: {got} rows, want {rows}; lake log:\n{}",
            lake.log_text()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The source relay of database `shop` with its slot active, and the warehouse folder.
fn start_source(
    pg: &PgCluster,
    db: &mut saiki_tests::postgres::Client,
    broker: &Broker,
    extra: &str,
) -> (Relay, String) {
    let port = loopback_port();
    let source = Relay::start(
        &pg.dir,
        &relay_config(pg, "shop", broker, port, extra),
        port,
    );
    wait_slot_active(db, &source);
    let warehouse = pg.dir.join("lake").to_str().unwrap().to_string();
    (source, warehouse)
}

/// Waits until the lake relay has joined its group and committed a round.
fn wait_first_commit(lake: &Relay) {
    wait_until(Duration::from_secs(120), lake, || {
        let m = lake.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_lake_commits_total").unwrap_or(0.0) < 1.0)
            .then(|| format!("no commit yet: {m}"))
    });
}

#[test]
fn every_change_lands_in_its_iceberg_table_once_though_the_lake_relay_is_killed_twice_and_its_group_offsets_are_lost(
) {
    let pg = PgCluster::start(&[]);
    let mut broker = Broker::start();
    let mut db = pg.create_db("shop");
    let _ods = pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE TABLE orders (id int PRIMARY KEY, article text, qty int, price numeric(10,2),
                                  placed timestamptz NOT NULL DEFAULT '2026-12-02 10:00:00+00', tags jsonb)",
            "CREATE SCHEMA billing",
            "CREATE TABLE billing.items (id int PRIMARY KEY, sku text)",
        ],
    );
    for t in ["saiki.public.orders", "saiki.billing.items"] {
        create_topic(&broker.addr(), t, 1);
    }
    let (_source, warehouse) = start_source(&pg, &mut db, &broker, "stream_large = false");
    let warehouse = warehouse.as_str();
    let mut lake = start_lake(&pg, &broker, warehouse);
    exec(
        &mut db,
        &[
            // Some documents are a JSON string: the lake keeps them JSON, quotes and all.
            "INSERT INTO orders (id, article, qty, price, tags) SELECT g, 'article ' || g, g % 5, g * 1.5, CASE WHEN g % 10 = 0 THEN '\"vip\"' ELSE '{\"a\": 1}' END::jsonb FROM generate_series(1, 200) g",
            "INSERT INTO billing.items SELECT g, 'sku' || g FROM generate_series(1, 30) g",
        ],
    );
    // The first kill: after a commit.
    wait_first_commit(&lake);
    lake.kill9();
    exec(
        &mut db,
        &[
            "UPDATE orders SET qty = qty + 1 WHERE id <= 50",
            "DELETE FROM orders WHERE id > 180",
            "TRUNCATE billing.items",
        ],
    );
    lake = start_lake(&pg, &broker, warehouse);
    // The second kill: a round in hand, likely before its commit.
    std::thread::sleep(Duration::from_millis(1500));
    lake.kill9();
    exec(
        &mut db,
        &[
            "INSERT INTO billing.items SELECT g, 'again' || g FROM generate_series(1, 5) g",
            "UPDATE orders SET price = price * 2, placed = '2026-12-03 23:30:00+01' WHERE id BETWEEN 100 AND 150",
        ],
    );
    // A poison record between them: a dead letter, and the rest keeps flowing.
    produce_raw(
        &broker.addr(),
        "saiki.public.orders",
        &[(
            Some(b"{\"id\":1}".as_slice()),
            Some(b"{not json".as_slice()),
        )],
    );
    // The third start is in a new consumer group, as after the group's offsets expired: it
    // reads every topic from its start, and the tables' marks skip what they hold.
    lake = start_lake_in(&pg, &broker, warehouse, "saiki-lake-renamed");

    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    // 200 inserts, 50 updates, 20 deletes, 51 updates.
    let orders = wait_rows_in(&uri, "saiki.orders_changes", "id", 321, &lake);
    assert_eq!(orders["dup"], 0, "a change twice: {orders}");
    let want = text_rows(
        &mut db,
        "SELECT id::text, article, qty::text, price::text,
                to_char(placed AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00:00',
                replace(tags::text, ' ', '')  -- the plugin writes JSON compact
         FROM orders",
    );
    let mut have: Vec<Vec<Option<String>>> =
        serde_json::from_value(orders["state"].clone()).unwrap();
    have.sort(); // as text_rows sorts
    assert_eq!(have, want, "the orders rebuilt from the change log");
    assert_eq!(orders["types"]["price"], "decimal(10, 2)");
    assert_eq!(orders["types"]["placed"], "timestamptz");
    assert_eq!(orders["types"]["qty"], "int");
    assert_eq!(orders["types"]["_saiki_commit_ts"], "timestamptz");
    assert!(
        orders["spec"].as_str().unwrap().contains("day"),
        "partitioned by day: {orders}"
    );
    // 30 inserts, the truncate, 5 inserts: the schema is in the table's name.
    let items = wait_rows_in(&uri, "saiki.billing_items_changes", "id", 36, &lake);
    assert_eq!(items["dup"], 0, "a change twice: {items}");
    assert_eq!(
        items["state"].as_array().unwrap().len(),
        5,
        "the truncate emptied the items: {items}"
    );
    let m = lake.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_lake_dead_letters_total"),
        Some(1.0),
        "{m}"
    );
    let dead = consume(
        &broker.addr(),
        &["saiki.dead-letter"],
        1,
        Duration::from_secs(10),
    );
    assert_eq!(dead.len(), 1);
    assert!(dead[0].headers["saiki.error"].starts_with("not a change record"));
    assert!(dead[0].headers["saiki.origin"].starts_with("saiki.public.orders/0/"));
    assert_eq!(dead[0].payload.as_deref(), Some(b"{not json".as_slice()));
    // SIGTERM commits what is in hand and exits 0, even with the broker gone (librdkafka's
    // close would wait for the group's offset commit forever).
    broker.stop();
    assert!(
        lake.terminate(Duration::from_secs(40)).success(),
        "{}",
        lake.log_text()
    );
}

#[test]
fn a_warehouse_the_relay_cannot_write_is_a_definite_error_that_names_it() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let _ods = pg.create_db("ods");
    // A file where the folder should be: no user, root included, can make a folder in it.
    let blocker = pg.dir.join("not-a-folder");
    std::fs::write(&blocker, b"x").unwrap();
    let warehouse = blocker.join("lake");
    let mut lake = start_lake(&pg, &broker, warehouse.to_str().unwrap());
    let status = lake.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(6),
        "exit code 6 (lake): {}",
        lake.log_text()
    );
    assert!(
        lake.log_text().contains("cannot be written"),
        "{}",
        lake.log_text()
    );
}

#[test]
fn a_streamed_transaction_lands_whole_at_its_commit_though_the_lake_relay_dies_while_holding_it() {
    // Transactions past 64kB reach Kafka while they run (source.stream_large, the default).
    let pg = PgCluster::start(&["logical_decoding_work_mem = '64kB'"]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let _ods = pg.create_db("ods");
    exec(
        &mut db,
        &["CREATE TABLE prices (id int PRIMARY KEY, price numeric(10,2), note text)"],
    );
    create_topic(&broker.addr(), "saiki.public.prices", 1);
    let (_source, warehouse) = start_source(&pg, &mut db, &broker, "");
    let warehouse = warehouse.as_str();
    let mut lake = start_lake(&pg, &broker, warehouse);
    exec(
        &mut db,
        &[
            // Aborted: none of it may land.
            "BEGIN; INSERT INTO prices SELECT g, g, repeat('x', 50) FROM generate_series(100001, 103000) g; ROLLBACK",
            "INSERT INTO prices VALUES (0, 0, 'small, committed before')",
        ],
    );
    // The lake has joined its group and committed the rows before.
    wait_first_commit(&lake);
    // A batch job that streams, waits, rolls a savepoint back, and commits.
    let mut job = pg.connect("shop");
    let batch = std::thread::spawn(move || {
        job.batch_execute(
            "BEGIN;
             INSERT INTO prices SELECT g, g * 1.5, repeat('y', 50) FROM generate_series(1, 3000) g;
             SAVEPOINT s;
             INSERT INTO prices SELECT g, 1, 'rolled back' FROM generate_series(5001, 6000) g;
             ROLLBACK TO s;
             SELECT pg_sleep(8);
             UPDATE prices SET price = price * 2 WHERE id <= 1000;
             COMMIT",
        )
        .unwrap();
    });
    // The lake holds the streamed records while the job sleeps (8 s): it dies with them.
    wait_until(Duration::from_secs(60), &lake, || {
        let m = lake.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_lake_held_bytes").unwrap_or(0.0) < 10_000.0)
            .then(|| format!("nothing held yet: {m}"))
    });
    // Rounds end every second meanwhile, and commit the group's offsets: never past what
    // is held.
    std::thread::sleep(Duration::from_millis(2500));
    lake.kill9();
    batch.join().unwrap();
    exec(
        &mut db,
        &["INSERT INTO prices VALUES (-1, 0, 'small, committed after')"],
    );
    lake = start_lake(&pg, &broker, warehouse);
    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    // 1 + 3000 inserts and 1001 updates (id 0 too) of the job + 1.
    let prices = wait_rows_in(&uri, "saiki.prices_changes", "id", 4003, &lake);
    assert_eq!(prices["dup"], 0, "a change twice: {prices}");
    let want = text_rows(&mut db, "SELECT id::text, price::text, note FROM prices");
    let mut have: Vec<Vec<Option<String>>> =
        serde_json::from_value(prices["state"].clone()).unwrap();
    have.sort();
    assert_eq!(have, want, "the prices rebuilt from the change log");
    let m = lake.http_get("/metrics").unwrap_or_default();
    assert_eq!(metric(&m, "saiki_lake_held_bytes"), Some(0.0));
    assert_eq!(metric(&m, "saiki_lake_dead_letters_total"), Some(0.0));
}

/// moto's S3 server (PyPI; scripts/setup.sh installs it in /opt/saiki-py), on 127.0.0.1,
/// its objects in memory: stopped (and emptied) when dropped.
struct S3Store {
    child: std::process::Child,
    endpoint: String,
}

impl S3Store {
    fn start(port: u16, dir: &std::path::Path) -> S3Store {
        let log = std::fs::File::create(dir.join(format!("moto-{port}.log"))).unwrap();
        let bin = std::path::Path::new(&python()).with_file_name("moto_server");
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} (scripts/setup.sh installs it): {e}", bin.display()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server does not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Store {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Runs `script` with `c`, a boto3 S3 client of the store (a client that is not ours),
    /// and `bucket`; returns what it printed.
    fn boto3(&self, script: &str, bucket: &str) -> String {
        let client = "import boto3, sys\nc = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='saiki', aws_secret_access_key='secret', region_name='us-east-1')\nbucket = sys.argv[2]\n";
        let out = Command::new(python())
            .args(["-c", &format!("{client}{script}"), &self.endpoint, bucket])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn create_bucket(&self, bucket: &str) {
        self.boto3("c.create_bucket(Bucket=bucket)", bucket);
    }

    /// The keys of the bucket's objects.
    fn keys(&self, bucket: &str) -> Vec<String> {
        self.boto3(
            "for p in c.get_paginator('list_objects_v2').paginate(Bucket=bucket):\n    for o in p.get('Contents', []): print(o['Key'])",
            bucket,
        )
        .lines()
        .map(String::from)
        .collect()
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_s3_warehouse_holds_every_change_once_though_the_store_was_away_then_bucketless_and_the_relay_was_killed(
) {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let _ods = pg.create_db("ods");
    exec(
        &mut db,
        &["CREATE TABLE orders (id int PRIMARY KEY, article text, price numeric(10,2))"],
    );
    create_topic(&broker.addr(), "saiki.public.orders", 1);
    let (_source, _) = start_source(&pg, &mut db, &broker, "");
    let s3_port = loopback_port();
    let endpoint = format!("http://127.0.0.1:{s3_port}");
    let warehouse = format!(
        "warehouse = \"s3://lake/warehouse\"\ns3_endpoint = \"{endpoint}\"\ns3_access_key_id = \"saiki\"\ns3_secret_access_key = \"secret\"\nsnapshot_retention = \"1s\""
    );
    let start = |group: &str| {
        let port = loopback_port();
        Relay::start_lake(
            &pg.dir,
            &lake_config(&pg, &broker, &warehouse, group, port),
            port,
        )
    };
    exec(
        &mut db,
        &["INSERT INTO orders SELECT g, 'article ' || g, g * 1.25 FROM generate_series(1, 100) g"],
    );
    // The store is away: transient, the relay retries with backoff and stays up.
    let mut lake = start("saiki-lake");
    wait_until(Duration::from_secs(60), &lake, || {
        let m = lake.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_lake_retries_total").unwrap_or(0.0) < 2.0)
            .then(|| format!("no retries yet: {m}"))
    });
    assert!(
        lake.log_text().contains("does not answer"),
        "{}",
        lake.log_text()
    );
    // The store answers, but has no such bucket: definite, exit 6, naming what to do.
    let store = S3Store::start(s3_port, &pg.dir);
    let status = lake.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(6), "{}", lake.log_text());
    assert!(
        lake.log_text()
            .contains("s3://lake/warehouse cannot be written (no such bucket"),
        "{}",
        lake.log_text()
    );
    store.create_bucket("lake");
    lake = start("saiki-lake");
    wait_first_commit(&lake);
    lake.kill9();
    exec(
        &mut db,
        &[
            "UPDATE orders SET price = price + 1 WHERE id <= 30",
            "DELETE FROM orders WHERE id > 90",
            "INSERT INTO orders VALUES (1000, 'late', 9.99)",
        ],
    );
    lake = start("saiki-lake");
    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    // PyIceberg reads the files from the store through pyarrow's S3 client.
    let props = serde_json::json!({
        "s3.endpoint": endpoint, "s3.access-key-id": "saiki",
        "s3.secret-access-key": "secret", "s3.region": "us-east-1",
    })
    .to_string();
    // 100 inserts, 30 updates, 10 deletes, 1 insert.
    wait_rows_with(&uri, "saiki.orders_changes", "id", &props, 141, &lake);
    // A third commit more than snapshot_retention (1s) after the second: the first snapshot,
    // replaced by the second that long ago, expires; the second, replaced just now, stays.
    std::thread::sleep(Duration::from_secs(3));
    exec(
        &mut db,
        &["INSERT INTO orders VALUES (1001, 'later', 1.00)"],
    );
    // And 1 insert more.
    let orders = wait_rows_with(&uri, "saiki.orders_changes", "id", &props, 142, &lake);
    assert_eq!(orders["dup"], 0, "a change twice: {orders}");
    assert_eq!(
        orders["location"],
        "s3://lake/warehouse/saiki/orders_changes"
    );
    let want = text_rows(&mut db, "SELECT id::text, article, price::text FROM orders");
    let mut have: Vec<Vec<Option<String>>> =
        serde_json::from_value(orders["state"].clone()).unwrap();
    have.sort();
    assert_eq!(have, want, "the orders rebuilt from the change log");
    let keys = store.keys("lake");
    assert!(
        keys.iter().any(|k| k.ends_with(".parquet"))
            && keys.iter().any(|k| k.ends_with(".metadata.json"))
            && keys
                .iter()
                .all(|k| k.starts_with("warehouse/saiki/orders_changes/")),
        "the table's files, and only those, in the bucket: {keys:?}"
    );
    // Housekeeping: the snapshots past lake.snapshot_retention expire, and their manifest
    // lists leave the bucket, while every change stays (above).
    wait_until(Duration::from_secs(60), &lake, || {
        (!lake
            .log_text()
            .contains("snapshots past lake.snapshot_retention expired"))
        .then(|| "no snapshot expired yet".to_string())
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = read_table_with(&uri, "saiki.orders_changes", "id", &props);
        let snapshots = now["snapshots"].as_u64().unwrap();
        let keys = store.keys("lake");
        let lists = keys
            .iter()
            .filter(|k| k.contains("/metadata/snap-"))
            .count() as u64;
        // The snapshot current until the last commit stays (a reader may be on it).
        if snapshots == 2 && lists == snapshots {
            assert_eq!(now["rows"], 142, "{now}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{snapshots} snapshots, {lists} manifest lists: {keys:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(lake.terminate(Duration::from_secs(40)).success());
}

#[test]
fn the_current_state_query_in_the_docs_is_the_one_the_tests_run() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/lake.md"),
    )
    .unwrap();
    assert!(
        doc.contains(CURRENT_STATE),
        "docs/lake.md must give CURRENT_STATE word for word"
    );
}

#[test]
fn every_event_of_the_event_api_is_one_row_of_its_lake_table_though_the_lake_relay_is_killed() {
    use crate::ingest::{body, curl, ingest_config, parcel_type, wait_api, ADMIN};
    use serde_json::json;
    let pg = PgCluster::start(&[]);
    let _registry = pg.create_db("registry");
    let _ods = pg.create_db("ods");
    let broker = Broker::start();
    let (api, http) = (loopback_port(), loopback_port());
    let ingest = Relay::start_ingest(&pg.dir, &ingest_config(&pg, &broker, api, http, ""), http);
    wait_api(api, &ingest);
    let created = curl(
        api,
        "POST",
        "/event-types",
        Some(ADMIN),
        Some(&body(&parcel_type())),
        &[],
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let token = curl(
        api,
        "POST",
        "/tokens",
        Some(ADMIN),
        Some(&body(&json!({"scopes": ["write:parcel.packed"]}))),
        &[],
    );
    assert_eq!(token.status, 201, "{}", token.body);
    let writer = token.json()["token"].as_str().unwrap().to_string();
    // Batches of 20 events over HTTP; every third without its optional `items`.
    let post = |batch: usize| {
        let events: Vec<_> = (batch * 20 + 1..=batch * 20 + 20)
            .map(|i| {
                let mut e = json!({"parcel_id": format!("P{i}"), "warehouse": "BER"});
                if i % 3 != 0 {
                    e["items"] = json!(i % 7 + 1);
                }
                e
            })
            .collect();
        let a = curl(
            api,
            "POST",
            "/event-types/parcel.packed/events",
            Some(&writer),
            Some(&body(&json!(events))),
            &[],
        );
        assert_eq!(a.status, 200, "{}", a.body);
    };
    post(0);
    post(1);
    let warehouse = pg.dir.join("lake");
    let port = loopback_port();
    // The registry is the event API's database (ingest.dsn), not the catalog's.
    let config = format!(
        "{}\n[ingest]\ndsn = \"host=127.0.0.1 port={} user=postgres dbname=registry\"\n",
        lake_config(
            &pg,
            &broker,
            &format!("warehouse = \"{}\"", warehouse.display()),
            "saiki-lake",
            port
        ),
        pg.port
    );
    let mut lake = Relay::start_lake(&pg.dir, &config, port);
    wait_first_commit(&lake);
    lake.kill9();
    post(2);
    post(3);
    post(4);
    lake = Relay::start_lake(&pg.dir, &config, port);
    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    let events = wait_rows_in(&uri, "saiki.ev_parcel_packed", "eid", 100, &lake);
    assert_eq!(events["dup"], 0, "an event twice: {events}");
    assert_eq!(events["actions"], json!({"E": 100}), "{events}");
    let types = &events["types"];
    assert_eq!(
        (
            &types["parcel_id"],
            &types["received_at"],
            &types["schema_version"],
            &types["items"]
        ),
        (
            &json!("string"),
            &json!("timestamptz"),
            &json!("int"),
            &json!("string")
        ),
        "numbers of JSON Schema stay exact, as strings: {events}"
    );
    // Every parcel once, with its items where it had them (columns: the properties, then
    // eid, occurred_at, received_at, flow_id, schema_version).
    let rows: Vec<Vec<Option<String>>> = serde_json::from_value(events["state"].clone()).unwrap();
    let mut parcels: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|r| (r[0].clone().unwrap(), r[2].clone()))
        .collect();
    parcels.sort();
    let mut want: Vec<(String, Option<String>)> = (1..=100)
        .map(|i| {
            (
                format!("P{i}"),
                (i % 3 != 0).then(|| (i % 7 + 1).to_string()),
            )
        })
        .collect();
    want.sort();
    assert_eq!(parcels, want);
    assert!(
        rows.iter().all(|r| r[7].as_deref() == Some("1")),
        "schema_version 1: {rows:?}"
    );
}

/// Reads `items_changes` of two shards with PyIceberg: its rows, each shard's current state
/// (replayed by key), the current schema's fields and the first schema's field ids.
const READ_SHARDS: &str = r#"
import json, sys
from pyiceberg.catalog.sql import SqlCatalog
cat = SqlCatalog("saiki", uri=sys.argv[1])
try:
    t = cat.load_table(sys.argv[2])
except Exception as e:
    print(json.dumps({"rows": -1, "error": str(e)})); sys.exit(0)
rows = t.scan().to_arrow().to_pylist()
state = {}
for r in sorted(rows, key=lambda r: (r["_saiki_source"], r["_saiki_commit_lsn"], r["_saiki_seq"])):
    k = (r["_saiki_source"], r["id"])
    if r["_saiki_action"] == "D":
        state.pop(k, None)
    else:
        state[k] = r
cols = [f.name for f in t.schema().fields if not f.name.startswith("_saiki_")]
# Sorted as text, as the test's rows of the source are.
out = {s: sorted([None if r[c] is None else str(r[c]) for c in cols] for (src, _), r in state.items() if src == s)
       for s in ("shard1", "shard2")}
fields = {f.name: [f.field_id, str(f.field_type)] for f in t.schema().fields}
schemas = t.schemas()
first = {f.name: f.field_id for f in schemas[min(schemas)].fields}
print(json.dumps({"rows": len(rows), "cols": cols, "state": out, "fields": fields, "first": first}))
"#;

#[test]
fn a_migration_rolled_out_shard_by_shard_renames_and_widens_the_change_log_columns_and_keeps_their_history(
) {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let _ods = pg.create_db("ods");
    let (mut dbs, _relays) = crate::ddl::start_shards(
        &pg,
        &broker,
        2,
        &["CREATE TABLE items (id int PRIMARY KEY, n int, note text)"],
    );
    for db in dbs.iter_mut() {
        exec(
            db,
            &["INSERT INTO items SELECT g, g, 'note ' || g FROM generate_series(1, 10) g"],
        );
    }
    let warehouse = pg.dir.join("lake").to_str().unwrap().to_string();
    let mut lake = start_lake(&pg, &broker, &warehouse);
    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    let read = || {
        let out = Command::new(python())
            .args(["-c", READ_SHARDS, &uri, "saiki.items_changes"])
            .output()
            .expect("PyIceberg's Python");
        assert!(
            out.status.success(),
            "PyIceberg: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("the reader's JSON")
    };
    let wait_rows = |lake: &Relay, rows: i64| {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let got = read();
            if got["rows"].as_i64() == Some(rows) {
                return got;
            }
            assert!(
                Instant::now() < deadline && got["rows"].as_i64() < Some(rows),
                "{got}: want {rows} rows; lake log:\n{}",
                lake.log_text()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    };
    wait_rows(&lake, 20);

    // Shard 1 renames a column; shard 2, not migrated yet, writes the old name.
    exec(
        &mut dbs[0],
        &[
            "ALTER TABLE items RENAME COLUMN note TO remark",
            "INSERT INTO items (id, n, remark) VALUES (12, 12, 'after rename')",
            "UPDATE items SET remark = 'renamed' WHERE id = 1",
        ],
    );
    exec(
        &mut dbs[1],
        &[
            "INSERT INTO items (id, n, note) VALUES (21, 21, 'old shape')",
            "UPDATE items SET note = 'old shape update' WHERE id = 2",
        ],
    );
    wait_rows(&lake, 24);
    // A restarted relay knows the rename from the table alone (its property).
    lake.kill9();
    lake = start_lake(&pg, &broker, &warehouse);
    exec(
        &mut dbs[1],
        &["INSERT INTO items (id, n, note) VALUES (23, 23, 'old shape, after the restart')"],
    );
    exec(
        &mut dbs[0],
        &[
            "ALTER TABLE items ALTER COLUMN n TYPE bigint",
            "INSERT INTO items (id, n, remark) VALUES (13, 3000000000, 'big')",
        ],
    );
    exec(
        &mut dbs[1],
        &[
            "ALTER TABLE items RENAME COLUMN note TO remark",
            "INSERT INTO items (id, n, remark) VALUES (22, 22, 'after rename')",
            "ALTER TABLE items ALTER COLUMN n TYPE bigint",
            "UPDATE items SET n = 4000000000 WHERE id = 3",
        ],
    );
    exec(
        &mut dbs[0],
        &[
            "ALTER TABLE items ADD COLUMN price numeric(10,2)",
            "INSERT INTO items (id, n, remark, price) VALUES (14, 14, 'priced', 2.50)",
        ],
    );
    let got = wait_rows(&lake, 29);

    // One column for the note, under its new name, with the field id it always had: the
    // rows written before the rename read their values there.
    assert_eq!(
        got["cols"],
        serde_json::json!(["id", "n", "remark", "price"]),
        "{got}"
    );
    assert_eq!(got["fields"]["remark"][0], got["first"]["note"], "{got}");
    assert_eq!(
        got["fields"]["n"],
        serde_json::json!([got["first"]["n"], "long"]),
        "{got}"
    );
    assert_eq!(got["fields"]["price"][1], "decimal(10, 2)", "{got}");
    // Each shard's current state in the lake is the shard's table.
    for (i, db) in dbs.iter_mut().enumerate() {
        let price = if i == 0 { "price::text" } else { "NULL::text" };
        let want = text_rows(
            db,
            &format!("SELECT id::text, n::text, remark, {price} FROM items"),
        );
        assert_eq!(
            got["state"][format!("shard{}", i + 1)],
            serde_json::to_value(&want).unwrap(),
            "shard{}",
            i + 1
        );
    }
    let m = lake.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_lake_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
}

/// A lake relay of group `saiki-lake` with an instance id of its own.
fn start_lake_member(pg: &PgCluster, broker: &Broker, warehouse: &str, member: &str) -> Relay {
    let port = loopback_port();
    let cfg = lake_config(
        pg,
        broker,
        &format!("warehouse = \"{warehouse}\""),
        "saiki-lake",
        port,
    )
    .replace(
        "instance_id = \"test-lake\"",
        &format!("instance_id = \"test-lake-{member}\""),
    );
    Relay::start_lake(&pg.dir, &cfg, port)
}

#[test]
fn two_lake_relays_of_one_group_share_a_table_and_its_schema_changes_without_a_change_lost_or_twice(
) {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let _ods = pg.create_db("ods");
    exec(
        &mut db,
        &[
            // The extension's event trigger sends the schema changes (L records).
            "CREATE EXTENSION saiki",
            "CREATE TABLE orders (id int PRIMARY KEY, article text, qty int)",
        ],
    );
    // Four partitions: the group splits them between the two relays, and each commits its
    // own to the one table (the optimistic commit retried with the other's marks merged).
    create_topic(&broker.addr(), "saiki.public.orders", 4);
    let (_source, warehouse) = start_source(&pg, &mut db, &broker, "stream_large = false");
    let mut a = start_lake_member(&pg, &broker, &warehouse, "a");
    let b = start_lake_member(&pg, &broker, &warehouse, "b");
    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    // Each statement's row count is the number of changes it makes.
    let mut changes = 0i64;
    let mut run = |db: &mut saiki_tests::postgres::Client, sql: &str| {
        let n = text_rows(
            db,
            &format!("WITH c AS ({sql} RETURNING 1) SELECT count(*)::text FROM c"),
        );
        changes += n[0][0].as_deref().unwrap().parse::<i64>().unwrap();
    };
    for round in 0..6 {
        let base = round * 200;
        run(
            &mut db,
            &format!(
                "INSERT INTO orders SELECT g, 'article ' || g, g % 7 FROM generate_series({}, {}) g",
                base + 1,
                base + 200
            ),
        );
        run(
            &mut db,
            &format!("UPDATE orders SET qty = qty + 1 WHERE id % 5 = {round}"),
        );
        run(
            &mut db,
            &format!("DELETE FROM orders WHERE id % 50 = {round}"),
        );
        match round {
            // Both relays meet the schema change in their partitions (an L record reaches
            // every partition) and commit it: one wins, the other finds it done.
            1 => {
                exec(
                    &mut db,
                    &[
                        "ALTER TABLE orders RENAME COLUMN article TO item",
                        "ALTER TABLE orders ADD COLUMN price numeric(10,2)",
                    ],
                );
                run(
                    &mut db,
                    "UPDATE orders SET price = id * 0.5 WHERE id % 3 = 0",
                );
            }
            // One relay dies with a round in hand; the other takes its partitions over, and
            // the restarted one gets some back.
            3 => {
                wait_first_commit(&a);
                a.kill9();
                std::thread::sleep(Duration::from_secs(3));
                a = start_lake_member(&pg, &broker, &warehouse, "a");
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let got = wait_rows_in(&uri, "saiki.orders_changes", "id", changes, &b);
    assert_eq!(got["dup"], 0, "a change twice: {got}");
    let mut have: Vec<Vec<Option<String>>> = serde_json::from_value(got["state"].clone()).unwrap();
    have.sort();
    assert_eq!(
        have,
        text_rows(
            &mut db,
            "SELECT id::text, item, qty::text, price::text FROM orders"
        ),
        "the orders rebuilt from the change log: {}; relay a:\n{}\nrelay b:\n{}",
        got["types"],
        a.log_text(),
        b.log_text()
    );
    assert_eq!(got["types"]["item"], "string", "one renamed column: {got}");
    assert!(got["types"].get("article").is_none(), "{got}");
    // Both relays wrote (relay a before its kill): the table was shared.
    wait_first_commit(&b);
    for relay in [&a, &b] {
        let m = relay.http_get("/metrics").unwrap_or_default();
        assert_eq!(
            metric(&m, "saiki_lake_dead_letters_total"),
            Some(0.0),
            "{m}"
        );
    }
}

#[test]
fn rows_deleted_while_the_slot_was_lost_leave_the_current_state_through_the_resyncs_w_rows() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let _ods = pg.create_db("ods");
    exec(
        &mut db,
        &[
            // saiki.slot_origins tells the restarted relay that its slot was lost.
            "CREATE EXTENSION saiki",
            "CREATE TABLE orders (id int PRIMARY KEY, article text, qty int)",
        ],
    );
    create_topic(&broker.addr(), "saiki.public.orders", 3);
    let (mut source, warehouse) = start_source(&pg, &mut db, &broker, "stream_large = false");
    let lake = start_lake(&pg, &broker, &warehouse);
    exec(
        &mut db,
        &["INSERT INTO orders SELECT g, 'article ' || g, g % 5 FROM generate_series(1, 120) g"],
    );
    let uri = format!("postgresql+psycopg2://postgres@127.0.0.1:{}/ods", pg.port);
    wait_rows_in(&uri, "saiki.orders_changes", "id", 120, &lake);

    // The slot is lost (as in a failover), and rows are deleted and changed meanwhile.
    assert!(source.terminate(Duration::from_secs(30)).success());
    wait_until(Duration::from_secs(30), &lake, || {
        let r = text_rows(
            &mut db,
            "SELECT count(*)::text FROM pg_replication_slots WHERE slot_name = 'saiki_test' AND NOT active",
        );
        (r != vec![vec![Some("1".to_string())]]).then(|| format!("slot still active: {r:?}"))
    });
    exec(
        &mut db,
        &[
            "SELECT pg_drop_replication_slot('saiki_test')",
            "DELETE FROM orders WHERE id % 10 = 0",
            "UPDATE orders SET qty = qty + 100 WHERE id % 10 = 1",
            "INSERT INTO orders VALUES (500, 'in the gap', 1)",
        ],
    );
    let port = loopback_port();
    let _source = Relay::start(
        &pg.dir,
        &relay_config(&pg, "shop", &broker, port, "stream_large = false"),
        port,
    );
    let want = text_rows(&mut db, "SELECT id::text, article, qty::text FROM orders");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let got = read_table_with(&uri, "saiki.orders_changes", "id", "{}");
        let mut have: Vec<Vec<Option<String>>> =
            serde_json::from_value(got["state"].clone()).unwrap_or_default();
        have.sort();
        // The resync's W row in each of the three partitions, then the state is the source's:
        // the 12 rows deleted with no slot are gone, though no D row says so.
        if got["actions"]["W"] == 3 && have == want {
            assert_eq!(got["duck"], got["state"], "docs/lake.md's query: {got}");
            assert_eq!(got["dup"], 0, "{got}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {have:?}; lake log:\n{}",
            got["actions"],
            lake.log_text()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}
