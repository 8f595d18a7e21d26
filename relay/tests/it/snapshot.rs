//! Incremental snapshots (issue #6) against real PostgreSQL and tansu: rows that existed before
//! the slot reach the ODS, chunk by chunk between watermarks, while a workload writes the same
//! tables; kill -9 resumes from the last finished chunk; no transaction stays open across the
//! snapshot; a re-snapshot of a table being written is harmless.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use saiki_tests::{exec, loopback_port, Broker, PgCluster};

const CHUNK: usize = 5000;
const TABLES: [(&str, &str); 3] = [
    (
        "a",
        "id::text || '|' || coalesce(v, '') || '|' || coalesce(n::text, '')",
    ),
    ("b", "k || '|' || coalesce(v::text, '')"),
    (
        "c",
        "x::text || '|' || y::text || '|' || coalesce(payload, '')",
    ),
];

fn checksum(db: &mut saiki_tests::postgres::Client, table: &str, expr: &str) -> (i64, i64) {
    let r = db
        .query(
            &format!("SELECT count(*), coalesce(sum(hashtext({expr}))::bigint, 0) FROM {table}"),
            &[],
        )
        .unwrap_or_else(|e| panic!("{table}: {e}"));
    (r[0].get(0), r[0].get(1))
}

fn ods_checksum(
    ods: &mut saiki_tests::postgres::Client,
    table: &str,
    expr: &str,
) -> Option<(i64, i64)> {
    ods.query(
        &format!("SELECT count(*), coalesce(sum(hashtext({expr}))::bigint, 0) FROM ods.{table}"),
        &[],
    )
    .ok()
    .map(|r| (r[0].get(0), r[0].get(1)))
}

/// Inserts, updates and deletes on the three tables until `stop`, one transaction each.
fn workload(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut db = saiki_tests::postgres::Client::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=shop"),
            saiki_tests::postgres::NoTls,
        )
        .unwrap();
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let k = (n * 7919) % 300_000 + 1;
            let sql = match n % 6 {
                0 => format!(
                    "INSERT INTO a VALUES ({}, 'new', 1) ON CONFLICT (id) DO NOTHING",
                    300_000 + n
                ),
                1 => format!("UPDATE a SET v = 'upd {n}', n = n + 1 WHERE id = {k}"),
                2 => format!("DELETE FROM a WHERE id = {}", k + 13),
                3 => format!("UPDATE b SET v = v + 1 WHERE k = 'k{}'", k % 150_000),
                4 => format!(
                    "INSERT INTO c VALUES ({}, 1, 'w') ON CONFLICT DO NOTHING",
                    1_000_000 + n
                ),
                _ => format!("DELETE FROM c WHERE x = {} AND y = 1", k % 50_000),
            };
            db.batch_execute(&sql).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        n
    })
}

fn snapshot_states(db: &mut saiki_tests::postgres::Client) -> Vec<(String, String, i64)> {
    db.query(
        "SELECT table_name, state, chunks_done FROM saiki.snapshots ORDER BY table_name",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn chunks_done(db: &mut saiki_tests::postgres::Client) -> i64 {
    snapshot_states(db).iter().map(|s| s.2).sum()
}

/// Rows read in chunks, over every run of the relay (its debug log, appended across restarts).
fn rows_read(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("snapshot chunk produced"))
        .filter_map(|l| l.split("read=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|n| n.parse::<usize>().ok())
        .sum()
}

fn wait_ods_equal(
    db: &mut saiki_tests::postgres::Client,
    ods: &mut saiki_tests::postgres::Client,
    relay: &Relay,
    within: Duration,
) {
    wait_until(within, relay, || {
        for (t, expr) in TABLES {
            let want = checksum(db, t, expr);
            let got = ods_checksum(ods, t, expr);
            if got != Some(want) {
                return Some(format!("{t}: source {want:?}, ODS {got:?}"));
            }
        }
        None
    });
}

#[test]
fn an_initial_snapshot_under_writes_and_relay_kills_leaves_the_ods_equal_to_the_source() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    // The ODS on a cluster of its own, so the source's WAL is only the source's.
    let ods_pg = PgCluster::start(&[]);
    let mut ods = ods_pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE a (id int PRIMARY KEY, v text, n int)",
            "CREATE TABLE b (k text PRIMARY KEY, v int)",
            "CREATE TABLE c (x int, y int, payload text, PRIMARY KEY (x, y))",
            "CREATE TABLE nokey (v int)",
            "INSERT INTO a SELECT g, 'row ' || g, g FROM generate_series(1, 300000) g",
            "INSERT INTO b SELECT 'k' || g, g FROM generate_series(1, 150000) g",
            "INSERT INTO c SELECT g, 1, repeat('p', g % 50) FROM generate_series(1, 50000) g",
            "INSERT INTO nokey VALUES (1)",
        ],
    );
    let port = loopback_port();
    let cfg = relay_config(
        &pg,
        "shop",
        &broker,
        port,
        &format!("snapshot = \"initial\"\nsnapshot_chunk_rows = {CHUNK}"),
    )
    .replace("[kafka]\n", "[kafka]\nheaders = false\n");
    let mut relay = Relay::start(&pg.dir, &cfg, port);
    let sport = loopback_port();
    let sink = Relay::start_sink(
        &pg.dir,
        &sink_config(&ods_pg, "ods", &broker, sport, ""),
        sport,
    );
    wait_slot_active(&mut db, &relay);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(pg.port, stop.clone());

    // Three kill -9 during the snapshot, each after some chunks more are done.
    let total_chunks = (300_000 + 150_000 + 50_000) / CHUNK as i64;
    let mut max_retained = 0i64;
    let mut long_xacts = 0i64;
    for k in 1..=3 {
        let target = total_chunks * k / 4;
        let deadline = Instant::now() + Duration::from_secs(240);
        while chunks_done(&mut db) < target {
            assert!(
                Instant::now() < deadline,
                "snapshot stalled at {:?}:\n{}",
                snapshot_states(&mut db),
                relay.log_text()
            );
            let r: i64 = db
                .query_one(
                    "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint FROM pg_replication_slots WHERE slot_name = 'saiki_test'",
                    &[],
                )
                .unwrap()
                .get(0);
            max_retained = max_retained.max(r);
            long_xacts += db
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND xact_start < now() - interval '10 seconds' AND datname = 'shop'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0);
            std::thread::sleep(Duration::from_millis(200));
        }
        relay.kill9();
        let before = chunks_done(&mut db);
        relay = Relay::start(&pg.dir, &cfg, port);
        // Progress survives the crash: never below what was recorded.
        assert!(chunks_done(&mut db) >= before);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let st = snapshot_states(&mut db);
        let pending: Vec<_> = st
            .iter()
            .filter(|s| s.1 == "requested" || s.1 == "running")
            .collect();
        if pending.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot not done: {st:?}\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(
        writes > 100,
        "the workload ran during the snapshot ({writes} writes)"
    );

    // Every table of the source, row for row, in the ODS.
    wait_ods_equal(&mut db, &mut ods, &sink, Duration::from_secs(180));

    // The keyless table failed with a reason that says what to do; the others are done.
    let st: Vec<(String, String, Option<String>)> = db
        .query(
            "SELECT table_name, state, error FROM saiki.snapshots ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    for (t, state, error) in &st {
        if t == "public.nokey" {
            assert_eq!(state, "failed");
            assert!(
                error.as_deref().unwrap_or("").contains("add a primary key"),
                "{error:?}"
            );
        } else {
            assert_eq!(state, "done", "{t}");
        }
    }
    // Finished chunks are not read again: beyond the rows of the recorded chunks, at most
    // one chunk per kill was read twice.
    let rows_done: i64 = db
        .query_one("SELECT sum(rows_done)::bigint FROM saiki.snapshots", &[])
        .unwrap()
        .get(0);
    let read = rows_read(&relay.log_text());
    assert!(
        read as i64 <= rows_done + 3 * CHUNK as i64,
        "{read} rows read for {rows_done} recorded: chunks were read again"
    );
    assert!(read as i64 >= rows_done, "{read} < {rows_done}");
    // No transaction was held open across the snapshot, and the slot kept advancing.
    assert_eq!(
        long_xacts, 0,
        "a transaction stayed open for more than 10 s"
    );
    assert!(
        max_retained < 64 << 20,
        "the slot retained {max_retained} bytes of WAL during the snapshot"
    );
}

#[test]
fn a_resnapshot_of_a_table_being_written_leaves_the_ods_equal() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    // The ODS on a cluster of its own, so the source's WAL is only the source's.
    let ods_pg = PgCluster::start(&[]);
    let mut ods = ods_pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE a (id int PRIMARY KEY, v text, n int)",
            "CREATE TABLE b (k text PRIMARY KEY, v int)",
            "CREATE TABLE c (x int, y int, payload text, PRIMARY KEY (x, y))",
        ],
    );
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "snapshot_chunk_rows = 1000")
        .replace("[kafka]\n", "[kafka]\nheaders = false\n");
    let relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    // The three topics exist before the sink starts, so that it subscribes once: tansu 0.6.0
    // at times never completes the group's rejoin after a subscription grows under load
    // (seen twice in CI, the sink left with no partitions; docs/testing.md).
    exec(
        &mut db,
        &[
            "INSERT INTO a VALUES (0, 'first', 0)",
            "INSERT INTO b VALUES ('k0', 0)",
            "INSERT INTO c VALUES (0, 0, 'first')",
        ],
    );
    let topics = ["saiki.public.a", "saiki.public.b", "saiki.public.c"];
    wait_until(Duration::from_secs(60), &relay, || {
        let found = consume(&broker.addr(), &topics, 3, Duration::from_secs(5));
        (found.len() < 3).then(|| format!("{} of the 3 first rows in Kafka", found.len()))
    });
    let sport = loopback_port();
    let sink = Relay::start_sink(
        &pg.dir,
        &sink_config(&ods_pg, "ods", &broker, sport, ""),
        sport,
    );
    // Streamed rows first (no snapshot configured: snapshot = "never").
    exec(
        &mut db,
        &[
            "INSERT INTO a SELECT g, 'row ' || g, g FROM generate_series(1, 100000) g",
            "INSERT INTO b SELECT 'k' || g, g FROM generate_series(1, 40000) g",
            "INSERT INTO c SELECT g, 1, 'p' FROM generate_series(1, 10000) g",
        ],
    );
    // 150,000 rows through the pipeline (500,000 took 70 s alone on one machine, 170 s on
    // another, and past 360 s there with the whole suite beside it on two cores).
    wait_ods_equal(&mut db, &mut ods, &sink, Duration::from_secs(360));
    // Rows the ODS lost by hand come back with the re-snapshot; the writes go on meanwhile.
    exec(&mut ods, &["DELETE FROM ods.b WHERE v % 10 = 0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(pg.port, stop.clone());
    exec(
        &mut db,
        &["SELECT saiki.request_snapshot('saiki_test', 'b')"],
    );
    wait_until(Duration::from_secs(180), &relay, || {
        let st = snapshot_states(&mut db);
        (st.first().map(|s| s.1.as_str()) != Some("done")).then(|| format!("{st:?}"))
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    wait_ods_equal(&mut db, &mut ods, &sink, Duration::from_secs(120));
    // Progress per table in /metrics and in the log.
    let m = relay.http_get("/metrics").unwrap_or_default();
    let line = m
        .lines()
        .find(|l| {
            l.starts_with("saiki_source_snapshot_table_rows{") && l.contains("table=\"public.b\"")
        })
        .unwrap_or_else(|| panic!("no progress series:\n{m}"));
    assert!(line.ends_with(" 40001"), "{line}");
    assert!(
        relay.log_text().contains("snapshot progress")
            && relay.log_text().contains("percent=\"100.0\""),
        "{}",
        relay.log_text()
    );
    // The status shows it.
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--dsn",
            &format!("host=127.0.0.1 port={} user=postgres dbname=shop", pg.port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("public.b") && l.contains("done") && l.contains("100.0 %")),
        "{text}"
    );
}

#[test]
fn rows_changed_while_their_chunk_is_read_keep_the_streamed_value() {
    let pg = PgCluster::start(&[]);
    let ods_pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = ods_pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE hot (id int PRIMARY KEY, v int NOT NULL)",
            "INSERT INTO hot SELECT g, 0 FROM generate_series(1, 200000) g",
        ],
    );
    // One chunk of the whole table: reading it takes long enough for many updates to commit
    // between its watermarks, some after the chunk's own snapshot.
    let port = loopback_port();
    let cfg = relay_config(
        &pg,
        "shop",
        &broker,
        port,
        "snapshot = \"initial\"\nsnapshot_chunk_rows = 200000",
    )
    .replace("[kafka]\n", "[kafka]\nheaders = false\n");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let stop = stop.clone();
            let port = pg.port;
            std::thread::spawn(move || {
                let mut c = saiki_tests::postgres::Client::connect(
                    &format!("host=127.0.0.1 port={port} user=postgres dbname=shop"),
                    saiki_tests::postgres::NoTls,
                )
                .unwrap();
                let mut n: u64 = w;
                while !stop.load(Ordering::Relaxed) {
                    n += 2;
                    let id = (n * 104_729) % 200_000 + 1;
                    c.batch_execute(&format!("UPDATE hot SET v = v + 1 WHERE id = {id}"))
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();
    let relay = Relay::start(&pg.dir, &cfg, port);
    let sport = loopback_port();
    let sink = Relay::start_sink(
        &pg.dir,
        &sink_config(&ods_pg, "ods", &broker, sport, ""),
        sport,
    );
    // A chunk of 200,000 rows under two writers: past 180 s with the whole suite beside it
    // on two cores.
    wait_until(Duration::from_secs(360), &relay, || {
        let st = db
            .query("SELECT state FROM saiki.snapshots", &[])
            .map(|r| r.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
            .unwrap_or_default();
        (st != ["done"]).then(|| format!("{st:?}"))
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    wait_until(Duration::from_secs(180), &sink, || {
        let want = checksum(&mut db, "hot", "id::text || '|' || v::text");
        let got = ods_checksum(&mut ods, "hot", "id::text || '|' || v::text");
        (got != Some(want)).then(|| format!("source {want:?}, ODS {got:?}"))
    });
    // The window did drop rows: updates landed between the watermarks.
    let changed: usize = relay
        .log_text()
        .lines()
        .filter(|l| l.contains("snapshot chunk produced"))
        .filter_map(|l| l.split("changed_in_window=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    assert!(
        changed > 0,
        "no change fell inside the chunk's window:\n{}",
        relay.log_text()
    );
}
