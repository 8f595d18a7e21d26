//! A primary failover (issue #14, docs/operations.md "A primary failover"): the source relay
//! follows the promotion through a multi-host DSN and resyncs what the lost slot held.

use std::process::Command;
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
        ],
    );
    let end = ordered_rows(&mut db, "SELECT pg_current_wal_lsn()::text").unwrap()[0][0]
        .clone()
        .unwrap();
    let mut replica = standby.connect("shop");
    wait_until(Duration::from_secs(60), &source, || {
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
    signal(&source, "-CONT");

    // The new primary: the relay finds no slot there, creates it, and resyncs. (A delete
    // committed before the new slot exists is in the gap, which the resync cannot show: the
    // mark-and-sweep of issue #14 is not built yet, so the test writes after the slot.)
    let mut db = standby.connect("shop");
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
