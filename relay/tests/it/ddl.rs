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
    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text FROM ods.items",
        vec![vec![Some("60".into())]],
    );
    let m = sink.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
}

/// Rows of `items` from one source database, as text, for comparing with the ODS.
fn source_rows(db: &mut saiki_tests::postgres::Client, cols: &str) -> Vec<Vec<Option<String>>> {
    text_rows(db, &format!("SELECT {cols} FROM items ORDER BY id"))
}

#[test]
fn the_ods_follows_a_migration_rolled_out_shard_by_shard_with_writes_in_between() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut ods = pg.create_db("ods");
    let mut dbs = Vec::new();
    let mut relays = Vec::new();
    for i in 1..=2 {
        let mut db = pg.create_db(&format!("shop{i}"));
        exec(
            &mut db,
            &[
                "CREATE EXTENSION saiki",
                "CREATE TABLE items (id int PRIMARY KEY, n int, note text)",
                "CREATE SEQUENCE items_seq",
            ],
        );
        let port = loopback_port();
        let cfg = relay_config(&pg, &format!("shop{i}"), &broker, port, "")
            .replace("name = \"shard1\"", &format!("name = \"shard{i}\""))
            .replace(
                "slot = \"saiki_test\"",
                &format!("slot = \"saiki_shard{i}\""),
            );
        let relay = Relay::start(&pg.dir, &cfg, port);
        wait_until(Duration::from_secs(60), &relay, || {
            let active = text_rows(
                &mut db,
                &format!("SELECT active::text FROM pg_replication_slots WHERE slot_name = 'saiki_shard{i}'"),
            );
            (active != vec![vec![Some("true".to_string())]]).then(|| format!("slot: {active:?}"))
        });
        exec(
            &mut db,
            &["INSERT INTO items SELECT g, g, 'note ' || g FROM generate_series(1, 10) g"],
        );
        dbs.push(db);
        relays.push(relay);
    }
    let sport = loopback_port();
    let mut sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, sport, ""), sport);

    // The migration, one step after the other, with a write after each; shard 2 follows
    // shard 1 a step behind, so rows of both shapes arrive together.
    let steps: [(&str, &str); 5] = [
        (
            "ALTER TABLE items ADD COLUMN price numeric(10,2) DEFAULT 1.50",
            "INSERT INTO items (id, n, note, price) VALUES (11, 11, 'after add', 2.00)",
        ),
        (
            "ALTER TABLE items RENAME COLUMN note TO remark",
            "INSERT INTO items (id, n, remark) VALUES (12, 12, 'after rename'); UPDATE items SET remark = 'renamed' WHERE id = 1",
        ),
        (
            "ALTER TABLE items ALTER COLUMN n TYPE bigint",
            "INSERT INTO items (id, n) VALUES (13, 3000000000)",
        ),
        (
            "ALTER TABLE items ALTER COLUMN price TYPE text USING price::text",
            "INSERT INTO items (id, n, price) VALUES (14, 14, 'cheap')",
        ),
        // The idle case: no write after it.
        ("ALTER TABLE items ADD COLUMN qty int NOT NULL DEFAULT 0", ""),
    ];
    let old_shape_write = [
        "INSERT INTO items (id, n, note) VALUES (21, 21, 'old shape')",
        "UPDATE items SET note = 'old shape update' WHERE id = 2",
        "INSERT INTO items (id, n, note) VALUES (22, 22, 'old shape 2')",
        "UPDATE items SET n = n + 100 WHERE id = 3",
        "",
    ];
    for (i, (ddl, write)) in steps.iter().enumerate() {
        exec(&mut dbs[0], &[ddl]);
        if !write.is_empty() {
            exec(&mut dbs[0], &[write]);
        }
        // Shard 2, still one step behind: writes of its current shape.
        if i > 0 {
            let (ddl2, write2) = steps[i - 1];
            exec(&mut dbs[1], &[ddl2]);
            if !write2.is_empty() {
                exec(
                    &mut dbs[1],
                    &[&write2.replace("(1", "(3").replace("= 1", "= 5")],
                );
            }
        }
        if !old_shape_write[i].is_empty() && i == 0 {
            exec(&mut dbs[1], &[old_shape_write[i]]);
        }
        if i == 2 {
            // The sink dies mid-migration and comes back.
            sink.kill9();
            sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, sport, ""), sport);
        }
    }
    let (ddl2, _) = steps[4];
    exec(&mut dbs[1], &[ddl2]);
    // A volatile default: every existing row got its own value at the source, which a new
    // snapshot of the table (requested by the source relay) brings.
    for db in dbs.iter_mut() {
        exec(
            db,
            &["ALTER TABLE items ADD COLUMN serial_no bigint DEFAULT nextval('items_seq')"],
        );
    }
    // A table created on a shard and never written.
    exec(
        &mut dbs[0],
        &["CREATE TABLE later (id int PRIMARY KEY, v text)"],
    );

    // The ODS equals the union of the shards, row for row and value for value.
    let cols = "id::text, n::text, remark, price::text, qty::text, serial_no::text";
    let want: Vec<Vec<Vec<Option<String>>>> =
        dbs.iter_mut().map(|db| source_rows(db, cols)).collect();
    wait_until(Duration::from_secs(120), &sink, || {
        for (i, want) in want.iter().enumerate() {
            let got = try_rows(
                &mut ods,
                &format!(
                    "SELECT {cols} FROM ods.items WHERE _saiki_source = 'shard{}' ORDER BY id",
                    i + 1
                ),
            );
            match got {
                Ok(got) if got == *want => {}
                other => return Some(format!("shard{}: ODS {other:?}\nsource {want:?}", i + 1)),
            }
        }
        None
    });
    let types = text_rows(
        &mut ods,
        "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_schema = 'ods' AND table_name = 'items' AND column_name NOT LIKE '\\_saiki%'",
    );
    assert_eq!(
        types[0][0].as_deref(),
        Some("id integer, n bigint, remark text, price text, qty integer, serial_no bigint")
    );
    wait_until(Duration::from_secs(30), &sink, || {
        let t = text_rows(
            &mut ods,
            "SELECT count(*)::text FROM pg_tables WHERE schemaname = 'ods' AND tablename = 'later'",
        );
        (t != vec![vec![Some("1".to_string())]]).then(|| "ods.later is missing".to_string())
    });
    let m = sink.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
    let followed = text_rows(
        &mut ods,
        "SELECT count(*)::text FROM saiki_sink.schema_changes WHERE ods_table = 'items'",
    );
    assert_eq!(
        followed[0][0].as_deref(),
        Some("12"),
        "six steps on two shards"
    );
}
