//! Failure behaviour of `saiki-relay source` (issue #3): no committed change is ever missing
//! from Kafka, whatever is killed or restarted, and definite errors stop with their exit code.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use saiki_core::Lsn;
use saiki_tests::{current_wal_lsn, exec, loopback_port, Broker, PgCluster};

/// A small deterministic PRNG (xorshift), seeded per test, for kill timings and batch sizes.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Inserts `total` rows into `events` in transactions of 1..=50 rows until done or `stop`;
/// reconnects through source restarts. Returns nothing: the table is the truth afterwards.
fn workload(
    dsn: String,
    total: i64,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let mut next = 1i64;
        let mut client: Option<postgres::Client> = None;
        let deadline = Instant::now() + Duration::from_secs(240);
        while next <= total && !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            if client.is_none() {
                client = postgres::Client::connect(&dsn, postgres::NoTls).ok();
                if client.is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let n = 1 + rng.next(50) as i64;
            let hi = (next + n - 1).min(total);
            let sql = format!("INSERT INTO events SELECT g, md5(g::text) FROM generate_series({next}, {hi}) g ON CONFLICT DO NOTHING");
            match client.as_mut().unwrap().batch_execute(&sql) {
                Ok(()) => next = hi + 1,
                Err(_) => client = None, // retried: ON CONFLICT keeps it idempotent
            }
            std::thread::sleep(Duration::from_millis(rng.next(4)));
        }
    })
}

use saiki_tests::postgres;

fn ids_in_kafka(broker: &Broker, at_least: usize) -> (BTreeSet<i64>, usize) {
    let msgs = consume(
        &broker.addr(),
        &["saiki.public.events"],
        at_least,
        Duration::from_secs(3),
    );
    let n = msgs.len();
    let ids = msgs
        .iter()
        .filter_map(|m| m.json()["columns"]["id"].as_i64())
        .collect();
    (ids, n)
}

fn table_ids(db: &mut postgres::Client) -> BTreeSet<i64> {
    db.query("SELECT id FROM events", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn setup(pg: &PgCluster) -> postgres::Client {
    let mut db = pg.create_db("shop");
    exec(
        &mut db,
        &[
            "CREATE TABLE events (id bigint PRIMARY KEY, payload text)",
            // An audit slot: after the run it tells each row's commit LSN.
            "SELECT pg_create_logical_replication_slot('audit', 'saiki')",
        ],
    );
    db
}

fn confirmed(db: &mut postgres::Client) -> Lsn {
    let s: String = db
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'saiki_test'", &[])
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

#[test]
fn killing_the_relay_nine_ways_loses_no_committed_change() {
    const ROWS: i64 = 20_000;
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = setup(&pg);
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "");
    let mut relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(pg.dsn("shop"), ROWS, stop.clone(), 0x5eed_1234);
    let mut rng = Rng(0xdead_beef);
    let mut checkpoints = Vec::new();
    for kill in 0..6 {
        std::thread::sleep(Duration::from_millis(700 + rng.next(1500)));
        relay.kill9();
        // Nothing confirms while the relay is dead: the slot's position now is what the relay
        // confirmed before dying. Everything committed up to it must already be in Kafka.
        let c = confirmed(&mut db);
        let (ids, _) = ids_in_kafka(&broker, usize::MAX);
        checkpoints.push((kill, c, ids));
        relay = Relay::start(&pg.dir, &cfg, port);
    }
    w.join().unwrap();
    let end = current_wal_lsn(&mut db);
    wait_confirmed(
        &mut db,
        "saiki_test",
        &end,
        Duration::from_secs(180),
        &relay,
    );

    let truth = table_ids(&mut db);
    assert_eq!(truth.len() as i64, ROWS, "the workload finished");
    let (ids, n) = ids_in_kafka(&broker, usize::MAX);
    let missing: Vec<&i64> = truth.difference(&ids).take(10).collect();
    assert!(
        missing.is_empty(),
        "committed rows missing from Kafka: {missing:?}"
    );
    println!(
        "{} rows, {} messages in Kafka ({} duplicates after 6 kill -9)",
        truth.len(),
        n,
        n - ids.len()
    );

    // The confirmed LSN never passed an unacknowledged change: at each kill, every row whose
    // commit_lsn is at or below the slot's position was already in Kafka.
    let audit = saiki_tests::get_changes(&mut db, "audit", &["include-transaction", "0"]);
    let mut commit_of: HashMap<i64, Lsn> = HashMap::new();
    for r in saiki_tests::parse_records(&audit) {
        if let Some(id) = r.columns.as_ref().and_then(|c| c["id"].as_i64()) {
            commit_of.insert(id, r.commit_lsn.unwrap());
        }
    }
    for (kill, c, ids) in &checkpoints {
        let owed: Vec<i64> = commit_of
            .iter()
            .filter(|(_, l)| *l <= c)
            .map(|(id, _)| *id)
            .collect();
        let absent: Vec<&i64> = owed.iter().filter(|id| !ids.contains(id)).take(5).collect();
        assert!(
            absent.is_empty(),
            "kill {kill}: slot confirmed {c} but rows {absent:?} were not in Kafka"
        );
    }
    assert!(
        checkpoints.iter().any(|(_, c, _)| c.0 > 0),
        "the relay confirmed something between kills"
    );
}

#[test]
fn a_broker_restart_and_a_source_restart_mid_stream_lose_nothing() {
    const ROWS: i64 = 15_000;
    let pg = PgCluster::start(&[]);
    let mut broker = Broker::start();
    let mut db = setup(&pg);
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "");
    let relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(pg.dsn("shop"), ROWS, stop.clone(), 42);
    std::thread::sleep(Duration::from_secs(2));
    // The broker goes away for 4 seconds, with data on disk.
    broker.stop();
    std::thread::sleep(Duration::from_secs(4));
    broker.restart();
    std::thread::sleep(Duration::from_secs(2));
    // The source database restarts.
    pg.restart();
    w.join().unwrap();
    let mut db = pg.connect("shop");
    let end = current_wal_lsn(&mut db);
    wait_confirmed(
        &mut db,
        "saiki_test",
        &end,
        Duration::from_secs(240),
        &relay,
    );
    let truth = table_ids(&mut db);
    assert_eq!(truth.len() as i64, ROWS);
    let (ids, _) = ids_in_kafka(&broker, usize::MAX);
    let missing: Vec<&i64> = truth.difference(&ids).take(10).collect();
    assert!(
        missing.is_empty(),
        "rows missing after broker and source restarts: {missing:?}\n{}",
        relay.log_text()
    );
    assert!(
        relay.log_text().contains("transient error, retrying"),
        "the restarts were noticed and retried"
    );
    let metrics = relay.http_get("/metrics").unwrap();
    assert!(metrics.contains("saiki_source_reconnects_total{source=\"shard1\"}"));
}

fn run_to_exit(
    config: &str,
    dir: &std::path::Path,
    within: Duration,
) -> (std::process::ExitStatus, String) {
    let port = loopback_port();
    let mut r = Relay::start(dir, config, port);
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = r.child.try_wait().unwrap() {
            return (s, r.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "relay did not stop on a definite error:\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn definite_errors_stop_with_a_clear_message_and_their_exit_code() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let port = loopback_port();

    // A slot of another plugin.
    exec(
        &mut db,
        &["SELECT pg_create_logical_replication_slot('saiki_test', 'test_decoding')"],
    );
    let (status, log) = run_to_exit(
        &relay_config(&pg, "shop", &broker, port, ""),
        &pg.dir,
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(
        log.contains("uses plugin test_decoding, not saiki"),
        "{log}"
    );
    exec(&mut db, &["SELECT pg_drop_replication_slot('saiki_test')"]);

    // Bad configuration: a typo in a key.
    let bad = relay_config(&pg, "shop", &broker, port, "heartbeat_intervall = \"1s\"");
    let (status, log) = run_to_exit(&bad, &pg.dir, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("heartbeat_intervall"), "{log}");

    // Password authentication: SCRAM works with the right password, fails clearly with a wrong one.
    exec(
        &mut db,
        &[
            "SET password_encryption = 'scram-sha-256'",
            "CREATE ROLE saiki LOGIN REPLICATION PASSWORD 's3cret'",
            "GRANT CREATE ON DATABASE shop TO saiki",
        ],
    );
    let hba = pg.data_dir().join("pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost replication postgres 127.0.0.1/32 trust\n\
         host all saiki 127.0.0.1/32 scram-sha-256\nhost replication saiki 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    exec(&mut db, &["SELECT pg_reload_conf()"]);
    std::thread::sleep(Duration::from_millis(300));
    let with_user = |pw: &str| {
        relay_config(&pg, "shop", &broker, port, "").replace(
            "user=postgres dbname=shop",
            &format!("user=saiki password={pw} dbname=shop"),
        )
    };
    let (status, log) = run_to_exit(&with_user("wrong"), &pg.dir, Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("password authentication failed"), "{log}");
    assert!(
        !log.contains("wrong"),
        "the password is never logged: {log}"
    );
    let mut ok = Relay::start(&pg.dir, &with_user("s3cret"), port);
    wait_slot_active(&mut db, &ok);
    assert!(ok.terminate(Duration::from_secs(30)).success());
    assert!(
        !ok.log_text().contains("s3cret"),
        "the password is never logged"
    );

    // An unreachable server is transient: retried with backoff until SIGTERM, then exit 0.
    let dead = relay_config(&pg, "shop", &broker, port, "").replace(
        &format!("port={}", pg.port),
        &format!("port={}", loopback_port()),
    );
    let mut r = Relay::start(&pg.dir, &dead, port);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "still retrying:\n{}",
        r.log_text()
    );
    let log = r.log_text();
    assert!(
        log.contains("transient error, retrying") && log.contains("attempt=2"),
        "{log}"
    );
    assert!(r.terminate(Duration::from_secs(10)).success());
}

#[test]
fn an_idle_database_keeps_its_slot_lag_under_one_wal_segment() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    exec(&mut db, &["CREATE TABLE quiet (id int PRIMARY KEY)"]);
    let mut busy = pg.create_db("busy");
    let port = loopback_port();
    let relay = Relay::start(&pg.dir, &relay_config(&pg, "shop", &broker, port, ""), port);
    wait_slot_active(&mut db, &relay);
    // 64 MiB of WAL from another database; nothing happens in shop.
    exec(&mut busy, &["CREATE TABLE churn (id int, pad text)"]);
    for _ in 0..8 {
        exec(
            &mut busy,
            &["INSERT INTO churn SELECT g, repeat('x', 500) FROM generate_series(1, 14000) g"],
        );
    }
    let generated: i64 = busy
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(generated > 64 << 20);
    // Heartbeats every second let the idle slot follow.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag: i64 = db
            .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'saiki_test'", &[])
            .unwrap()
            .get(0);
        if lag < 16 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle slot lag stayed at {lag} bytes:\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And the heartbeats are written (every second here).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = relay.http_get("/metrics").unwrap();
        let beats: u64 = metrics
            .lines()
            .find(|l| l.starts_with("saiki_source_heartbeats_total"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if beats >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeats written:\n{metrics}\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
