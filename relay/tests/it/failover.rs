//! A primary failover (issue #14, docs/operations.md "A primary failover"): the source relay
//! follows the promotion through a multi-host DSN and resyncs what the lost slot held.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use saiki_tests::{exec, loopback_port, Broker, PgCluster};

const ORDERS: &str = "SELECT id, qty FROM orders ORDER BY id";
const ODS_ORDERS: &str = "SELECT id, qty FROM ods.orders ORDER BY id";

fn wait_same(
    src: &mut saiki_tests::postgres::Client,
    ods: &mut saiki_tests::postgres::Client,
    relay: &Relay,
) {
    wait_same_rows(
        src,
        ods,
        ORDERS,
        ODS_ORDERS,
        relay,
        Duration::from_secs(180),
    );
}

fn signal(relay: &Relay, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &relay.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

/// A service writing all along, through the multi-host DSN: a transaction every few
/// milliseconds (an insert, an update of an older row, a delete of its own insert of five
/// steps before), reconnecting whenever its server goes away, until `stop`. Returns the
/// transactions it saw committed.
fn workload(dsn: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let (mut committed, mut i) = (0u64, 10_000u64);
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut c) =
                saiki_tests::postgres::Client::connect(&dsn, saiki_tests::postgres::NoTls)
            else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let sql = format!(
                    "INSERT INTO orders VALUES ({i}, 1); UPDATE orders SET qty = qty + 1 WHERE id = {}; DELETE FROM orders WHERE id = {}",
                    i * 13 % 3000 + 1,
                    i - 5
                );
                if c.batch_execute(&sql).is_err() {
                    break;
                }
                committed += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        committed
    })
}

/// The failover: once the standby has replayed what `db`'s primary has written so far (the
/// gap's changes must survive the promotion), the primary stops with `-m immediate` and the
/// standby is promoted. Returns a connection to the new primary.
fn fail_over(
    mut db: saiki_tests::postgres::Client,
    primary: &PgCluster,
    standby: &PgCluster,
    relay: &Relay,
) -> saiki_tests::postgres::Client {
    let end = ordered_rows(&mut db, "SELECT pg_current_wal_lsn()::text").unwrap()[0][0]
        .clone()
        .unwrap();
    let mut replica = standby.connect("shop");
    wait_until(Duration::from_secs(60), relay, || {
        let r = ordered_rows(
            &mut replica,
            &format!("SELECT pg_last_wal_replay_lsn() >= '{end}'::pg_lsn"),
        );
        (r.as_ref().and_then(|r| r[0][0].as_deref()) != Some("t"))
            .then(|| format!("standby behind {end}: {r:?}"))
    });
    drop(db);
    primary.stop_immediately();
    standby.promote();
    standby.connect("shop")
}

/// `saiki-relay status --dsn` of a database, as text.
fn status_of(dsn: &str) -> String {
    let out = Command::new(BIN)
        .args(["status", "--dsn", dsn])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_relay_follows_a_promotion_through_a_multi_host_dsn_and_resyncs_what_the_lost_slot_held() {
    let primary = PgCluster::start(&["wal_keep_size = '256MB'"]);
    let ods_cluster = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = primary.create_db("shop");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL)",
        ],
    );
    let standby = primary.start_standby();
    let mut ods = ods_cluster.create_db("ods");

    // The relay names both servers; it takes the one that is not in recovery.
    let sport = loopback_port();
    let one = format!(
        "host=127.0.0.1 port={} user=postgres dbname=shop",
        primary.port
    );
    let both = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=shop target_session_attrs=read-write",
        standby.port, primary.port
    );
    let cfg = relay_config(&primary, "shop", &broker, sport, "").replace(&one, &both);
    assert!(cfg.contains(&both), "{cfg}");
    let source = Relay::start(&primary.dir, &cfg, sport);
    wait_slot_active(&mut db, &source);
    // The topic exists before the sink subscribes: a subscription that grows mid-test is
    // where tansu 0.6.0 leaves a group unsettled (docs/testing.md).
    create_topic(&broker.addr(), "saiki.public.orders", 1);
    let kport = loopback_port();
    let sink = Relay::start_sink(
        &ods_cluster.dir,
        &sink_config(&ods_cluster, "ods", &broker, kport, ""),
        kport,
    );
    exec(
        &mut db,
        &["INSERT INTO orders SELECT g, 1 FROM generate_series(1, 100) g"],
    );
    wait_same(&mut db, &mut ods, &sink);

    // The gap: the relay stalls; the primary commits changes that reach the standby and
    // never the slot, then dies.
    signal(&source, "-STOP");
    exec(
        &mut db,
        &[
            "UPDATE orders SET qty = 2 WHERE id <= 50",
            "INSERT INTO orders SELECT g, 7 FROM generate_series(101, 150) g",
            // Deleted in the gap: no snapshot shows them; the sweep removes them.
            "DELETE FROM orders WHERE id BETWEEN 81 AND 90",
            "DELETE FROM orders WHERE id IN (120, 121)",
        ],
    );
    let mut db = fail_over(db, &primary, &standby, &source);
    signal(&source, "-CONT");

    // The new primary: the relay finds no slot there, creates it, and resyncs. A delete
    // committed now may come before the new slot or after it: either way it is gone.
    exec(&mut db, &["DELETE FROM orders WHERE id = 95"]);
    wait_slot_active(&mut db, &source);
    exec(
        &mut db,
        &[
            "INSERT INTO orders SELECT g, 9 FROM generate_series(151, 200) g",
            "UPDATE orders SET qty = 3 WHERE id = 60",
            "DELETE FROM orders WHERE id = 70",
        ],
    );
    wait_same(&mut db, &mut ods, &sink);
    wait_until(Duration::from_secs(60), &sink, || {
        let r = text_rows(
            &mut ods,
            "SELECT count(*) FROM saiki_sink.sweeps WHERE swept_at IS NOT NULL",
        );
        (r[0][0].as_deref() != Some("1")).then(|| format!("not swept yet: {r:?}"))
    });
    // The sweep ran once, when the one partition brought the end of the resync. (How many
    // rows it deleted depends on timing: the stopped relay's socket still takes in what the
    // primary sends, so most of the gap reaches Kafka once it runs again; the delete after
    // the promotion comes before or after the new slot. The next test kills the relay.)
    let sweeps = text_rows(
        &mut ods,
        "SELECT ods_table, source, done::text, swept_at IS NOT NULL FROM saiki_sink.sweeps",
    );
    let want = |s: &str| Some(s.to_string());
    assert_eq!(
        sweeps,
        vec![vec![want("orders"), want("shard1"), want("{0}"), want("t")]],
        "{}",
        sink.log_text()
    );
    let m = source.http_get("/metrics").unwrap_or_default();
    assert_eq!(metric(&m, "saiki_source_resyncs_total"), Some(1.0), "{m}");
    let log = source.log_text();
    assert!(
        log.contains("resync") && log.contains("the slot was missing"),
        "{log}"
    );
    // `saiki-relay status` says so.
    let out = Command::new(BIN)
        .args([
            "status",
            "--relay",
            &format!("http://127.0.0.1:{}", source.http_port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 resync(s)"), "{text}");
}

/// A service writes all along; the primary is stopped with `-m immediate` in the middle of
/// it. The relay is killed in the gap and started only after the promotion (it knows the gap
/// from `saiki.slot_origins`, which the standby has from the primary), killed again while it
/// resyncs, and the sink is killed as the first partitions bring the end of the resync: the
/// ODS still ends equal to the new primary, rows deleted in the gap and after it included.
#[test]
fn a_relay_killed_in_the_gap_and_during_the_resync_and_a_sink_killed_during_the_sweep_still_converge(
) {
    let primary = PgCluster::start(&["wal_keep_size = '256MB'"]);
    let ods_cluster = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = primary.create_db("shop");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE orders (id int PRIMARY KEY, qty int NOT NULL)",
            "INSERT INTO orders SELECT g, 1 FROM generate_series(1, 3000) g",
        ],
    );
    let standby = primary.start_standby();
    let mut ods = ods_cluster.create_db("ods");
    // Three partitions: the sweep waits until every one has brought the end of the resync.
    create_topic(&broker.addr(), "saiki.public.orders", 3);

    let sport = loopback_port();
    let one = format!(
        "host=127.0.0.1 port={} user=postgres dbname=shop",
        primary.port
    );
    let both = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=shop target_session_attrs=read-write",
        primary.port, standby.port
    );
    let cfg = relay_config(
        &primary,
        "shop",
        &broker,
        sport,
        "snapshot = \"initial\"\nsnapshot_chunk_rows = 100",
    )
    .replace(&one, &both);
    let mut source = Relay::start(&primary.dir, &cfg, sport);
    wait_slot_active(&mut db, &source);
    let kport = loopback_port();
    let scfg = sink_config(&ods_cluster, "ods", &broker, kport, "");
    let mut sink = Relay::start_sink(&ods_cluster.dir, &scfg, kport);
    wait_same(&mut db, &mut ods, &sink);
    // The slot's origin is recorded, and the standby has it.
    let origin = text_rows(
        &mut db,
        "SELECT timeline::text, created_lsn IS NOT NULL FROM saiki.slot_origins WHERE slot_name = 'saiki_test'",
    );
    assert_eq!(
        origin,
        vec![vec![Some("1".into()), Some("t".into())]],
        "{}",
        source.log_text()
    );

    // The service starts writing, and goes on through all that follows.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(both.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));

    // The gap, with the relay dead.
    source.kill9();
    exec(
        &mut db,
        &[
            "UPDATE orders SET qty = 2 WHERE id % 7 = 0",
            "INSERT INTO orders SELECT g, 7 FROM generate_series(3001, 3100) g",
            "DELETE FROM orders WHERE id BETWEEN 500 AND 540",
            "DELETE FROM orders WHERE id % 97 = 0",
        ],
    );
    let mut db = fail_over(db, &primary, &standby, &sink);

    // A new relay process: nothing in memory, only the recorded origin tells the gap.
    exec(
        &mut db,
        &["DELETE FROM orders WHERE id BETWEEN 2000 AND 2010"],
    );
    source = Relay::start(&standby.dir, &cfg, sport);
    wait_slot_active(&mut db, &source);
    exec(
        &mut db,
        &[
            "UPDATE orders SET qty = 3 WHERE id BETWEEN 100 AND 120",
            "DELETE FROM orders WHERE id BETWEEN 2500 AND 2520",
        ],
    );
    // Killed while it resyncs: the next process goes on from the last chunk recorded.
    wait_until(Duration::from_secs(120), &source, || {
        let r = text_rows(
            &mut db,
            "SELECT state, chunks_done FROM saiki.snapshots WHERE slot_name = 'saiki_test'",
        );
        let ok = r.first().is_some_and(|row| {
            row[0].as_deref() == Some("running")
                && row[1].as_deref().and_then(|c| c.parse::<i64>().ok()) >= Some(3)
        });
        (!ok).then(|| format!("resync not under way: {r:?}"))
    });
    let log = source.log_text();
    assert!(
        log.contains("resync") && log.contains("the slot was missing and has been created anew (timeline 2 now, was 1: a promotion)"),
        "{log}"
    );
    // `saiki-relay status` on the database shows the resync under way, and why.
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=shop",
        standby.port
    );
    let text = status_of(&dsn);
    assert!(
        text.contains("resync of slot")
            && text.contains("running")
            && text.contains("0/1")
            && text.contains("timeline 2 now, was 1: a promotion"),
        "{text}"
    );
    source.kill9();
    exec(&mut db, &["DELETE FROM orders WHERE id = 2900"]);
    source = Relay::start(&standby.dir, &cfg, sport);
    // The sink is killed as soon as a partition has brought the end of the resync.
    wait_until(Duration::from_secs(180), &sink, || {
        let r = text_rows(&mut ods, "SELECT count(*) FROM saiki_sink.sweeps");
        (r[0][0].as_deref() == Some("0")).then(|| "no end of the resync yet".to_string())
    });
    sink.kill9();
    exec(
        &mut db,
        &[
            "INSERT INTO orders SELECT g, 9 FROM generate_series(3101, 3150) g",
            "DELETE FROM orders WHERE id = 3101",
        ],
    );
    sink = Relay::start_sink(&ods_cluster.dir, &scfg, kport);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let committed = writer.join().expect("the workload");
    assert!(
        committed > 100,
        "the service wrote {committed} transactions"
    );
    wait_same(&mut db, &mut ods, &sink);
    // The sweep deleted the rows deleted while no slot was there: ids 500 to 540, the 30
    // multiples of 97 up to 3000 (3007, inserted and deleted in the gap, never reached the
    // ODS), ids 2000 to 2010, deleted on the new primary before its slot, and what the
    // service deleted in the gap of its rows the ODS had.
    let sweeps = text_rows(
        &mut ods,
        "SELECT done::text, swept_at IS NOT NULL, rows FROM saiki_sink.sweeps",
    );
    assert_eq!(sweeps.len(), 1, "{sweeps:?}");
    assert_eq!(sweeps[0][0].as_deref(), Some("{0,1,2}"), "{sweeps:?}");
    assert_eq!(sweeps[0][1].as_deref(), Some("t"), "{sweeps:?}");
    let swept: usize = sweeps[0][2].as_deref().unwrap().parse().unwrap();
    assert!(swept >= 41 + 30 + 11, "{sweeps:?}\n{}", sink.log_text());
    // It says the resync is done (and, since the relay restarted, it comes from the database,
    // not from the relay that asked for it).
    let text = status_of(&dsn);
    assert!(
        text.lines()
            .any(|l| l.starts_with("saiki_test") && l.contains("done") && l.contains("1/1")),
        "{text}"
    );
    // The relay that finished the resync drains and exits cleanly.
    assert!(source.terminate(Duration::from_secs(30)).success());
}
