//! `saiki-relay source` against real PostgreSQL and a real Kafka-protocol broker (tansu).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::*;
use saiki_core::record::{Action, Record};
use saiki_tests::{current_wal_lsn, exec, loopback_port, Broker, PgCluster};

#[test]
fn all_changes_arrive_in_their_topics_keyed_in_order_with_headers() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    exec(
        &mut db,
        &[
            "CREATE TABLE orders (id int PRIMARY KEY, article text, qty int, price numeric(10,2))",
            "CREATE TABLE items (order_id int, line int, sku text, PRIMARY KEY (order_id, line))",
        ],
    );
    let port = loopback_port();
    let mut relay = Relay::start(&pg.dir, &relay_config(&pg, "shop", &broker, port, ""), port);
    // The relay creates the slot; wait for it before writing, so nothing predates it.
    wait_slot_active(&mut db, &relay);
    exec(
        &mut db,
        &[
            "INSERT INTO orders SELECT g, 'article ' || g, g % 5, g * 1.5 FROM generate_series(1, 100) g",
            "INSERT INTO items SELECT g % 100 + 1, g, 'sku' || g FROM generate_series(1, 300) g",
            "UPDATE orders SET qty = qty + 1 WHERE id <= 50",
            "UPDATE orders SET qty = qty + 1 WHERE id <= 10",
            "DELETE FROM orders WHERE id > 90",
            "SELECT pg_logical_emit_message(true, 'app.event', 'hello')",
            "TRUNCATE items",
            // One big transaction: 200,000 rows.
            "INSERT INTO orders SELECT g, 'bulk', 1, 1 FROM generate_series(1000, 200999) g",
        ],
    );
    let end = current_wal_lsn(&mut db);
    wait_confirmed(
        &mut db,
        "saiki_test",
        &end,
        Duration::from_secs(300),
        &relay,
    );

    let metrics = relay.http_get("/metrics").expect("metrics endpoint");
    assert!(
        metrics.contains("saiki_source_lag_bytes{source=\"shard1\"}"),
        "{metrics}"
    );
    assert!(relay
        .http_get("/ready")
        .unwrap()
        .starts_with("HTTP/1.0 200"));

    let orders = consume(
        &broker.addr(),
        &["saiki.public.orders"],
        100 + 60 + 10 + 200_000,
        Duration::from_secs(20),
    );
    assert_eq!(
        orders.len(),
        100 + 60 + 10 + 200_000,
        "every orders change exactly once"
    );
    // Keyed by the primary key; per key, changes in order (seq within lsn order).
    let mut last: HashMap<Vec<u8>, (saiki_core::Lsn, u64)> = HashMap::new();
    for m in &orders {
        let rec: Record =
            serde_json::from_slice(m.payload.as_deref().unwrap()).expect("a change record");
        assert_eq!(rec.source.as_deref(), Some("shard1"));
        let key = m.key.clone().expect("keyed");
        let k: serde_json::Value = serde_json::from_slice(&key).unwrap();
        assert!(k.get("id").is_some(), "{k}");
        let pos = (rec.commit_lsn.unwrap(), rec.seq.unwrap());
        if let Some(prev) = last.insert(key, pos) {
            assert!(prev < pos, "per-key order broken: {prev:?} then {pos:?}");
        }
        assert_eq!(
            m.headers.get("saiki.source").map(String::as_str),
            Some("shard1")
        );
        assert_eq!(
            m.headers.get("saiki.commit_lsn"),
            Some(&rec.commit_lsn.unwrap().to_string())
        );
        assert_eq!(m.headers.get("saiki.lsn"), Some(&rec.lsn.to_string()));
        assert_eq!(m.headers.get("saiki.xid"), Some(&rec.xid.to_string()));
    }
    let deletes = orders.iter().filter(|m| m.json()["action"] == "D").count();
    assert_eq!(deletes, 10);

    let items = consume(
        &broker.addr(),
        &["saiki.public.items"],
        301,
        Duration::from_secs(10),
    );
    assert_eq!(items.len(), 301, "300 inserts and one truncate");
    let truncate = items.last().unwrap().json();
    assert_eq!(truncate["action"], "T");
    let k: serde_json::Value = serde_json::from_slice(items[0].key.as_deref().unwrap()).unwrap();
    assert_eq!(k, serde_json::json!({"order_id": 2, "line": 1}));

    let tx = consume(
        &broker.addr(),
        &["saiki.transactions"],
        1000,
        Duration::from_secs(5),
    );
    let commits: Vec<serde_json::Value> = tx
        .iter()
        .map(|m| m.json())
        .filter(|v| v["action"] == "C")
        .collect();
    let begins = tx.iter().filter(|m| m.json()["action"] == "B").count();
    assert_eq!(begins, commits.len());
    assert!(
        commits
            .iter()
            .any(|c| c["changes"]["public.orders"] == 200_000),
        "per-table counts on C"
    );
    let messages = consume(
        &broker.addr(),
        &["saiki.messages"],
        1,
        Duration::from_secs(5),
    );
    assert_eq!(
        messages.len(),
        1,
        "app messages are produced; heartbeats are not"
    );
    assert_eq!(messages[0].json()["prefix"], "app.event");

    // Records decode with the shared types; every action is one the plugin documents.
    let actions: HashSet<Action> = orders
        .iter()
        .map(|m| {
            serde_json::from_slice::<Record>(m.payload.as_deref().unwrap())
                .unwrap()
                .action
        })
        .collect();
    assert_eq!(
        actions,
        HashSet::from([Action::Insert, Action::Update, Action::Delete])
    );

    let status = relay.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "SIGTERM exits 0: {status:?}\n{}",
        relay.log_text()
    );
    assert!(relay.log_text().contains("drained and confirmed"));
}

#[test]
fn headers_can_be_switched_off_without_changing_keys_or_values() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    exec(&mut db, &["CREATE TABLE t (id int PRIMARY KEY, v text)"]);
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "").replace(
        "topic_prefix = \"saiki\"",
        "topic_prefix = \"saiki\"\nheaders = false",
    );
    let relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    exec(
        &mut db,
        &["INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')"],
    );
    let end = current_wal_lsn(&mut db);
    wait_confirmed(&mut db, "saiki_test", &end, Duration::from_secs(60), &relay);
    let msgs = consume(
        &broker.addr(),
        &["saiki.public.t"],
        3,
        Duration::from_secs(10),
    );
    assert_eq!(msgs.len(), 3);
    for m in &msgs {
        assert!(m.headers.is_empty(), "{:?}", m.headers);
        assert!(m.key.is_some());
        assert_eq!(m.json()["source"], "shard1");
    }
}

/// `saiki-relay status --json` for the test slot's database and the relay at `http_port`.
fn status_json(pg: &PgCluster, http_port: u16) -> serde_json::Value {
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--json",
            "--dsn",
            &format!("host=127.0.0.1 port={} user=postgres dbname=shop", pg.port),
            "--relay",
            &format!("http://127.0.0.1:{http_port}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

/// The exit code of `saiki-relay status --check` (the container health check) for a relay.
fn status_check(http_port: u16) -> Option<i32> {
    std::process::Command::new(BIN)
        .args([
            "status",
            "--check",
            "--relay",
            &format!("127.0.0.1:{http_port}"),
        ])
        .output()
        .unwrap()
        .status
        .code()
}

fn test_slot(status: &serde_json::Value) -> &serde_json::Value {
    status["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slot"] == "saiki_test")
        .expect("saiki_test in the status")
}

fn slot_lag(status: &serde_json::Value) -> i64 {
    test_slot(status)["lag_bytes"].as_i64().expect("lag_bytes")
}

#[test]
fn status_shows_the_slot_lag_growing_while_the_relay_is_stopped_and_shrinking_after() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE t (id int PRIMARY KEY, pad text)",
        ],
    );
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "");
    let mut relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    assert!(relay.terminate(Duration::from_secs(30)).success());
    exec(
        &mut db,
        &["INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"],
    );
    let stopped = status_json(&pg, port);
    let lag_stopped = slot_lag(&stopped);
    assert!(
        lag_stopped > 1_000_000,
        "lag grows while the relay is stopped: {stopped}"
    );
    let slot = test_slot(&stopped);
    assert_eq!(slot["active"], false);
    assert_eq!(slot["plugin"], "saiki");
    // The stopped relay is reported down, with a hint, not as an error of the command.
    let relay_down = &stopped["relays"][0];
    assert_eq!(relay_down["healthy"], false, "{stopped}");
    assert!(
        relay_down["error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{stopped}"
    );

    // The table form, for a terminal.
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--dsn",
            &format!("host=127.0.0.1 port={} user=postgres dbname=shop", pg.port),
            "--relay",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().next().unwrap().starts_with("slot") && table.contains("saiki_test"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("127.0.0.1:") && l.contains("DOWN")),
        "{table}"
    );
    assert_eq!(
        status_check(port),
        Some(1),
        "--check fails on a stopped relay"
    );

    let relay = Relay::start(&pg.dir, &cfg, port);
    let end = current_wal_lsn(&mut db);
    wait_confirmed(
        &mut db,
        "saiki_test",
        &end,
        Duration::from_secs(120),
        &relay,
    );
    let after = status_json(&pg, port);
    let lag_after = slot_lag(&after);
    assert!(
        lag_after < lag_stopped / 10,
        "lag shrinks once the relay runs: {lag_stopped} then {lag_after}"
    );
    // The running relay: healthy, streaming, named, with its own view of the lag.
    let r = &after["relays"][0];
    assert_eq!(r["healthy"], true, "{after}");
    assert_eq!(r["ready"], true, "{after}");
    assert_eq!(r["role"], "source", "{after}");
    assert_eq!(r["name"], "shard1", "{after}");
    assert!(r["changes_total"].as_u64().unwrap() >= 20_000, "{after}");
    assert!(r["lag_bytes"].is_u64(), "{after}");
    assert_eq!(
        status_check(port),
        Some(0),
        "--check passes on a ready relay"
    );
}
