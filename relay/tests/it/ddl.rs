//! Schema changes (issue #13) through the relays: the extension's `L` records reach every
//! partition of their table's topic, in order with that partition's rows, and after a rename
//! the old topic's partitions too; the sink keeps applying around them.

use std::time::Duration;

use crate::common::*;
use saiki_tests::{current_wal_lsn, exec, loopback_port, Broker, PgCluster};

#[test]
fn schema_changes_reach_every_partition_in_order_with_the_rows_and_the_sink_keeps_applying() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE EXTENSION saiki",
            "CREATE TABLE items (id int PRIMARY KEY, n int)",
        ],
    );
    let port = loopback_port();
    let cfg = relay_config(&pg, "shop", &broker, port, "").replace(
        "topic_prefix = \"saiki\"",
        "topic_prefix = \"saiki\"\npartitions = 3",
    );
    let relay = Relay::start(&pg.dir, &cfg, port);
    wait_slot_active(&mut db, &relay);
    let sport = loopback_port();
    let sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, sport, ""), sport);
    exec(
        &mut db,
        &[
            "INSERT INTO items SELECT g, g FROM generate_series(1, 30) g",
            "ALTER TABLE items ADD COLUMN note text DEFAULT 'none'",
            "INSERT INTO items SELECT g, g, 'x' FROM generate_series(31, 60) g",
            "ALTER TABLE items RENAME TO items_v2",
            "INSERT INTO items_v2 VALUES (61, 61, 'y')",
        ],
    );
    let end = current_wal_lsn(&mut db);
    wait_confirmed(
        &mut db,
        "saiki_test",
        &end,
        Duration::from_secs(120),
        &relay,
    );

    // The old topic: 60 rows over 3 partitions, and in each partition the ADD COLUMN after
    // the rows written before it and before those written after it, then the rename.
    let msgs = consume(
        &broker.addr(),
        &["saiki.public.items"],
        60 + 3 * 2,
        Duration::from_secs(5),
    );
    assert_eq!(
        msgs.len(),
        66,
        "{:?}",
        msgs.iter().map(|m| m.json()).collect::<Vec<_>>()
    );
    for p in 0..3 {
        let part: Vec<serde_json::Value> = msgs
            .iter()
            .filter(|m| m.partition == p)
            .map(|m| m.json())
            .collect();
        let at = |change: &str| {
            part.iter()
                .position(|r| r["action"] == "L" && r["changes"][0]["change"] == change)
                .unwrap_or_else(|| panic!("no {change} in partition {p}: {part:?}"))
        };
        let (add, rename) = (at("add_column"), at("rename_table"));
        assert!(add < rename);
        let l = &part[add];
        assert_eq!(l["ddl"], "ALTER TABLE");
        assert_eq!(l["changes"][0]["missing"], "none");
        assert_eq!(l["source"], "shard1");
        assert!(
            l.get("commit_lsn").is_some() && l.get("seq").is_some(),
            "{l}"
        );
        for (i, r) in part.iter().enumerate().filter(|(_, r)| r["action"] == "I") {
            let id = r["columns"]["id"].as_i64().unwrap();
            assert_eq!(id <= 30, i < add, "row {id} at {i}, ADD COLUMN at {add}");
        }
        assert_eq!(part[rename]["renamed"]["public.items"], "public.items_v2");
        assert_eq!(part[rename]["table"], "items_v2");
    }
    // The new topic: the rename in every partition, then the row.
    let new = consume(
        &broker.addr(),
        &["saiki.public.items_v2"],
        4,
        Duration::from_secs(5),
    );
    assert_eq!(new.iter().filter(|m| m.json()["action"] == "L").count(), 3);
    assert_eq!(new.iter().filter(|m| m.json()["action"] == "I").count(), 1);

    // The sink applies the rows around the schema changes and dead-letters nothing.
    wait_until(Duration::from_secs(60), &sink, || {
        // Missing until the sink creates it: an error, not yet a result.
        let n = ods
            .query("SELECT count(*)::text FROM ods.items", &[])
            .ok()
            .and_then(|r| r.first().map(|r| r.get::<_, String>(0)));
        (n.as_deref() != Some("60")).then(|| format!("ods.items has {n:?} rows"))
    });
    let m = sink.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
}
