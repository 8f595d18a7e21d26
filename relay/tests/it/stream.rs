//! Large transactions streamed before their commit (`source.stream_large`, docs/relay.md and
//! docs/sink.md, "Large transactions"): Kafka has them while they run, the ODS applies them
//! whole at their commit, or never.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use saiki_tests::{exec, loopback_port, Broker, PgCluster};

/// A walsender memory small enough that the tests' transactions stream.
const WORK_MEM: &str = "logical_decoding_work_mem = '1MB'";

fn source_config(pg: &PgCluster, broker: &Broker, port: u16, partitions: u32) -> String {
    relay_config(pg, "shop", broker, port, "").replace(
        "topic_prefix = \"saiki\"",
        &format!("topic_prefix = \"saiki\"\npartitions = {partitions}"),
    )
}

/// The first value of a query's first row; `None` on an error.
fn scalar(db: &mut saiki_tests::postgres::Client, sql: &str) -> Option<String> {
    ordered_rows(db, sql)?
        .into_iter()
        .next()?
        .into_iter()
        .next()?
}

/// Rows of `ods.prices` (0 while the table does not exist).
fn ods_prices(ods: &mut saiki_tests::postgres::Client) -> i64 {
    scalar(ods, "SELECT count(*) FROM ods.prices").map_or(0, |n| n.parse().unwrap())
}

/// Waits until `name` on the relay's /metrics satisfies `ok`.
fn wait_metric(relay: &Relay, name: &str, within: Duration, ok: impl Fn(f64) -> bool) {
    wait_until(within, relay, || {
        let m = relay.http_get("/metrics").unwrap_or_default();
        match metric(&m, name) {
            Some(v) if ok(v) => None,
            v => Some(format!("{name} = {v:?}")),
        }
    });
}

/// Rows of `ods.prices` seen by another ODS session, over and over, until stopped: what an
/// analyst could have read while the sink worked.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<i64>>,
}

impl Sampler {
    fn start(pg: &PgCluster) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ods = pg.connect("ods");
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let n = ods_prices(&mut ods);
                if seen.last() != Some(&n) {
                    seen.push(n);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler")
    }
}

fn staging_is_empty(ods: &mut saiki_tests::postgres::Client) -> Option<String> {
    let n = scalar(
        ods,
        "SELECT (SELECT count(*) FROM saiki_sink.staged) + (SELECT count(*) FROM saiki_sink.streams)
              + (SELECT count(*) FROM saiki_sink.stream_ends) + (SELECT count(*) FROM saiki_sink.stream_aborts)",
    );
    (n.as_deref() != Some("0")).then(|| format!("staging rows left: {n:?}"))
}

/// Bytes the slot's walsender spilled to disk and streamed, so far.
fn slot_stats(db: &mut saiki_tests::postgres::Client) -> (u64, u64) {
    let r = ordered_rows(
        db,
        "SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = 'saiki_test'",
    )
    .expect("pg_stat_replication_slots");
    let n = |i: usize| r[0][i].as_deref().unwrap_or("0").parse().unwrap();
    (n(0), n(1))
}

fn setup(pg: &PgCluster) -> saiki_tests::postgres::Client {
    let mut db = pg.create_db("shop");
    exec(
        &mut db,
        &[
            // DDL capture: schema changes inside a streamed transaction reach the ODS too.
            "CREATE EXTENSION saiki",
            "CREATE TABLE orders (id int PRIMARY KEY, qty int, note text)",
            // Out of line, uncompressed: an update of qty leaves note unchanged-TOAST.
            "ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL",
            "CREATE TABLE prices (sku int PRIMARY KEY, price numeric(10,2), label text)",
        ],
    );
    db
}

/// The orders, once the relay streams from its slot.
const SEED: &str =
    "INSERT INTO orders SELECT g, 1, repeat(md5(g::text), 100) FROM generate_series(1, 1000) g";

const ORDERS: &str = "SELECT id, qty, md5(note) FROM orders ORDER BY id";
const ODS_ORDERS: &str = "SELECT id, qty, md5(note) FROM ods.orders ORDER BY id";
const PRICES: &str = "SELECT sku, price, label FROM prices ORDER BY sku";
const ODS_PRICES: &str = "SELECT sku, price, label FROM ods.prices ORDER BY sku";

fn wait_same(
    db: &mut saiki_tests::postgres::Client,
    ods: &mut saiki_tests::postgres::Client,
    src: &str,
    dst: &str,
    sink: &Relay,
) {
    wait_same_rows(db, ods, src, dst, sink, Duration::from_secs(240));
}

#[test]
fn a_large_transaction_is_in_kafka_while_it_runs_and_in_the_ods_at_its_commit_in_one_step() {
    let pg = PgCluster::start(&[WORK_MEM]);
    let broker = Broker::start();
    let mut db = setup(&pg);
    let mut ods = pg.create_db("ods");
    // The topics exist before the sink starts, so that it subscribes once (docs/testing.md,
    // "A rejoin that never completes").
    for t in ["saiki.public.orders", "saiki.public.prices"] {
        create_topic(&broker.addr(), t, 3);
    }
    let sport = loopback_port();
    let source = Relay::start(&pg.dir, &source_config(&pg, &broker, sport, 3), sport);
    wait_slot_active(&mut db, &source);
    exec(&mut db, &[SEED]);
    let kport = loopback_port();
    let sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, kport, ""), kport);
    wait_same(&mut db, &mut ods, ORDERS, ODS_ORDERS, &sink);

    // Rolled back: staged while it runs, then nothing of it in the ODS and the staging empty.
    let mut big = pg.connect("shop");
    big.batch_execute(
        "BEGIN; INSERT INTO prices SELECT g, g, 'rolled back' FROM generate_series(1, 30000) g",
    )
    .unwrap();
    wait_metric(
        &source,
        "saiki_source_streamed_records_total",
        Duration::from_secs(60),
        |v| v > 0.0,
    );
    wait_metric(
        &sink,
        "saiki_sink_staged_rows",
        Duration::from_secs(60),
        |v| v > 0.0,
    );
    big.batch_execute("ROLLBACK").unwrap();
    wait_metric(
        &sink,
        "saiki_sink_streamed_aborts_total",
        Duration::from_secs(120),
        |v| v == 1.0,
    );
    wait_until(Duration::from_secs(30), &sink, || {
        staging_is_empty(&mut ods)
    });
    assert_eq!(ods_prices(&mut ods), 0);

    // Committed, with savepoints rolled back (rows and a message) and released.
    let (spill0, stream0) = slot_stats(&mut db);
    // The rolled-back transaction's records, as Kafka has them.
    let rolled_back = consume(
        &broker.addr(),
        &["saiki.public.prices"],
        1,
        Duration::from_secs(20),
    );
    let r = rolled_back[0].json();
    assert_eq!(
        (&r["streamed"], &r["columns"]["label"]),
        (&serde_json::json!(true), &serde_json::json!("rolled back")),
        "{r}"
    );
    assert!(r["commit_lsn"].is_null() && r["attempt"].is_u64(), "{r}");
    let before = ordered_rows(&mut ods, ODS_ORDERS);
    big.batch_execute(
        "BEGIN;
         INSERT INTO prices SELECT g, g / 100.0, 'kept' FROM generate_series(1, 100000) g;
         UPDATE orders SET qty = qty + 1 WHERE id <= 500;
         SAVEPOINT a;
         INSERT INTO prices SELECT g, 0, 'savepoint a' FROM generate_series(200001, 230000) g;
         SELECT pg_logical_emit_message(true, 'test', 'rolled back with a');
         SAVEPOINT b;
         DELETE FROM orders WHERE id > 900;
         ROLLBACK TO a;
         DELETE FROM orders WHERE id BETWEEN 990 AND 1000;
         SAVEPOINT c;
         UPDATE prices SET price = 7, label = 'released' WHERE sku <= 10;
         RELEASE c;
         ALTER TABLE prices ADD COLUMN currency text NOT NULL DEFAULT 'EUR';
         UPDATE prices SET currency = 'USD' WHERE sku <= 100;",
    )
    .unwrap();
    // In Kafka before the commit: the sink read and staged them from there.
    wait_metric(
        &sink,
        "saiki_sink_staged_rows",
        Duration::from_secs(120),
        |v| v >= 100000.0,
    );
    // The walsender streamed it instead of spilling it to disk.
    let (spill1, stream1) = slot_stats(&mut db);
    let (spill, stream) = (spill1 - spill0, stream1 - stream0);
    assert!(
        stream > 10 << 20 && spill < stream / 20,
        "spill {spill} B, stream {stream} B"
    );
    // Nothing of it in the ODS yet.
    assert_eq!(ordered_rows(&mut ods, ODS_ORDERS), before);
    assert_eq!(ods_prices(&mut ods), 0);

    let sampler = Sampler::start(&pg);
    big.batch_execute("COMMIT").unwrap();
    // A later change of a row the transaction changed, its note unchanged-TOAST: applied
    // after the transaction, in every partition.
    exec(
        &mut db,
        &["UPDATE orders SET qty = qty + 10 WHERE id IN (3, 4, 5, 6)"],
    );
    // With the column the transaction added: the ODS followed its L record between its rows.
    let with_currency = "SELECT sku, price, label, currency FROM prices ORDER BY sku";
    wait_same(
        &mut db,
        &mut ods,
        with_currency,
        &with_currency.replace("FROM prices", "FROM ods.prices"),
        &sink,
    );
    wait_same(&mut db, &mut ods, ORDERS, ODS_ORDERS, &sink);
    let seen = sampler.finish();
    assert!(
        seen.iter().all(|n| *n == 0 || *n == 100000) && seen.contains(&100000),
        "the ODS showed part of the transaction: {seen:?}"
    );
    wait_until(Duration::from_secs(30), &sink, || {
        staging_is_empty(&mut ods)
    });
    // Each chunk of the 100,000 rows went through the staging table on its own: none read an
    // earlier chunk's rows again (a plain insert would then meet their keys).
    let log = sink.log_text();
    assert!(
        !log.contains("takes upserts only"),
        "a chunk applied an earlier chunk's rows again:\n{log}"
    );
    let m = sink.http_get("/metrics").unwrap();
    // This one, and the seed of orders (its TOASTed notes pass the 1MB too).
    assert!(
        metric(&m, "saiki_sink_streamed_commits_total").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
    let m = source.http_get("/metrics").unwrap();
    assert!(
        metric(&m, "saiki_source_streamed_commits_total").is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "saiki_source_streamed_aborts_total"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "saiki_source_streamed_transactions_open"),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn kills_of_the_relay_and_the_sink_mid_stream_leave_no_partial_transaction_and_lose_nothing() {
    let pg = PgCluster::start(&[WORK_MEM]);
    let broker = Broker::start();
    let mut db = setup(&pg);
    let mut ods = pg.create_db("ods");
    ods.batch_execute(ODS_AUDIT).unwrap();
    for t in ["saiki.public.orders", "saiki.public.prices"] {
        create_topic(&broker.addr(), t, 2);
    }
    let sport = loopback_port();
    let source_cfg = source_config(&pg, &broker, sport, 2);
    let mut source = Relay::start(&pg.dir, &source_cfg, sport);
    wait_slot_active(&mut db, &source);
    exec(&mut db, &[SEED]);
    let kport = loopback_port();
    let sink_cfg = sink_config(&pg, "ods", &broker, kport, "");
    let mut sink = Relay::start_sink(&pg.dir, &sink_cfg, kport);
    wait_same(&mut db, &mut ods, ORDERS, ODS_ORDERS, &sink);

    let mut big = pg.connect("shop");
    big.batch_execute(
        "BEGIN; INSERT INTO prices SELECT g, g, 'first' FROM generate_series(1, 40000) g;
         UPDATE orders SET qty = 5 WHERE id % 2 = 0",
    )
    .unwrap();
    wait_metric(
        &sink,
        "saiki_sink_staged_rows",
        Duration::from_secs(120),
        |v| v > 0.0,
    );
    let sampler = Sampler::start(&pg);
    // The relay dies mid-stream: its successor sends the transaction again, from its start,
    // under a new attempt.
    source.kill9();
    let source = Relay::start(&pg.dir, &source_cfg, sport);
    wait_metric(
        &source,
        "saiki_source_streamed_records_total",
        Duration::from_secs(120),
        |v| v > 0.0,
    );
    // The sink dies while it stages.
    sink.kill9();
    let sink = Relay::start_sink(&pg.dir, &sink_cfg, kport);
    big.batch_execute(
        "INSERT INTO prices SELECT g, g, 'second' FROM generate_series(40001, 60000) g;
         DELETE FROM orders WHERE id <= 10;
         COMMIT",
    )
    .unwrap();
    wait_same(&mut db, &mut ods, PRICES, ODS_PRICES, &sink);
    wait_same(&mut db, &mut ods, ORDERS, ODS_ORDERS, &sink);
    let seen = sampler.finish();
    assert!(
        seen.iter().all(|n| *n == 0 || *n == 60000) && seen.contains(&60000),
        "the ODS showed part of the transaction: {seen:?}"
    );
    wait_until(Duration::from_secs(30), &sink, || {
        staging_is_empty(&mut ods)
    });
    assert_no_change_applied_twice(&mut ods);
}
