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

    // The sink applies the rows around the schema changes and dead-letters nothing; the ODS
    // table followed the rename, with the rows written before it.
    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text, count(*) FILTER (WHERE note = 'none')::text FROM ods.items_v2",
        vec![vec![Some("61".into()), Some("30".into())]],
    );
    assert_eq!(
        text_rows(&mut ods, "SELECT to_regclass('ods.items')::text"),
        vec![vec![None]]
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

/// Source databases `shop1`..`shop{n}` on `pg`, each with the extension and `schema`, and a
/// source relay each (source `shard{i}`, slot `saiki_shard{i}`), once every slot is active.
pub(crate) fn start_shards(
    pg: &PgCluster,
    broker: &Broker,
    n: usize,
    schema: &[&str],
) -> (Vec<saiki_tests::postgres::Client>, Vec<Relay>) {
    let mut dbs = Vec::new();
    let mut relays = Vec::new();
    for i in 1..=n {
        let mut db = pg.create_db(&format!("shop{i}"));
        exec(&mut db, &["CREATE EXTENSION saiki"]);
        exec(&mut db, schema);
        let port = loopback_port();
        let cfg = relay_config(pg, &format!("shop{i}"), broker, port, "")
            .replace("name = \"shard1\"", &format!("name = \"shard{i}\""))
            .replace(
                "slot = \"saiki_test\"",
                &format!("slot = \"saiki_shard{i}\""),
            );
        relays.push(Relay::start(&pg.dir, &cfg, port));
        dbs.push(db);
    }
    for (i, db) in dbs.iter_mut().enumerate() {
        let slot = format!("saiki_shard{}", i + 1);
        wait_until(Duration::from_secs(60), &relays[i], || {
            let active = text_rows(
                db,
                &format!(
                    "SELECT active::text FROM pg_replication_slots WHERE slot_name = '{slot}'"
                ),
            );
            (active != vec![vec![Some("true".to_string())]]).then(|| format!("slot: {active:?}"))
        });
    }
    (dbs, relays)
}

#[test]
fn the_ods_follows_a_migration_rolled_out_shard_by_shard_with_writes_in_between() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut ods = pg.create_db("ods");
    let (mut dbs, _relays) = start_shards(
        &pg,
        &broker,
        2,
        &[
            "CREATE TABLE items (id int PRIMARY KEY, n int, note text)",
            "CREATE SEQUENCE items_seq",
        ],
    );
    for db in dbs.iter_mut() {
        exec(
            db,
            &["INSERT INTO items SELECT g, g, 'note ' || g FROM generate_series(1, 10) g"],
        );
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

/// The migration of the eight-shard run: each step with the write that follows it (`""`:
/// none), applied to every shard in turn.
const MIGRATION: &[(&str, &str)] = &[
    (
        "ALTER TABLE items ADD COLUMN price numeric(10,2) DEFAULT 1.50",
        "INSERT INTO items (id, n, note, price) VALUES (101, 101, 'after add', 2.00)",
    ),
    (
        "ALTER TABLE items RENAME COLUMN note TO remark",
        "INSERT INTO items (id, n, remark) VALUES (102, 102, 'after rename'); UPDATE items SET remark = 'renamed' WHERE id = 1",
    ),
    (
        "ALTER TABLE items ALTER COLUMN n TYPE bigint",
        "INSERT INTO items (id, n) VALUES (103, 3000000000)",
    ),
    (
        "ALTER TABLE items ALTER COLUMN price TYPE text USING price::text",
        "INSERT INTO items (id, n, price) VALUES (104, 104, 'cheap')",
    ),
    (
        "ALTER TABLE items ALTER COLUMN n SET NOT NULL",
        "INSERT INTO items (id, n) VALUES (105, 105)",
    ),
    (
        "ALTER TABLE items ALTER COLUMN remark SET DEFAULT 'by default'",
        "INSERT INTO items (id, n) VALUES (106, 106)",
    ),
    (
        "ALTER TABLE items ADD COLUMN added_at timestamptz DEFAULT now()",
        "INSERT INTO items (id, n) VALUES (107, 107)",
    ),
    (
        "ALTER TABLE items REPLICA IDENTITY FULL",
        "DELETE FROM items WHERE id = 101",
    ),
    (
        "ALTER TABLE items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (id, n)",
        "INSERT INTO items (id, n) VALUES (109, 109); DELETE FROM items WHERE id = 102",
    ),
    (
        "ALTER TABLE items ALTER COLUMN remark DROP DEFAULT",
        "INSERT INTO items (id, n) VALUES (110, 110)",
    ),
    (
        "ALTER TABLE items DROP COLUMN remark",
        "INSERT INTO items (id, n) VALUES (111, 111)",
    ),
    (
        "ALTER TABLE items ALTER COLUMN w DROP NOT NULL",
        "INSERT INTO items (id, n, w) VALUES (112, 112, NULL)",
    ),
    (
        "CREATE TABLE tags (id int, v text); ALTER TABLE tags ADD PRIMARY KEY (id)",
        "INSERT INTO tags VALUES (1, 'a'), (2, 'b')",
    ),
    (
        "ALTER TABLE tags RENAME TO labels",
        "INSERT INTO labels VALUES (3, 'c'); UPDATE labels SET v = 'A' WHERE id = 1",
    ),
    (
        "CREATE SCHEMA IF NOT EXISTS archive; ALTER TABLE labels SET SCHEMA archive",
        "INSERT INTO archive.labels VALUES (4, 'd')",
    ),
    (
        "CREATE TABLE scratch (id int PRIMARY KEY, v text)",
        "INSERT INTO scratch VALUES (1, 'x')",
    ),
    ("DROP TABLE scratch", ""),
    // A volatile default, and no write after it (the idle case).
    (
        "ALTER TABLE items ADD COLUMN serial_no bigint DEFAULT nextval('items_seq')",
        "",
    ),
];

/// Inserts, updates and deletes on `items` until `stop`, in the columns no step changes.
fn migration_workload(
    mut db: saiki_tests::postgres::Client,
    shard: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut rng = shard.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut live: Vec<i64> = Vec::new();
    let mut txs = 0;
    let mut id = 1000;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        id += 1;
        let mut sql = format!("BEGIN; INSERT INTO items (id, n, w) VALUES ({id}, {id}, 1);");
        if !live.is_empty() {
            let upd = live[(next() % live.len() as u64) as usize];
            sql.push_str(&format!("UPDATE items SET w = w + 1 WHERE id = {upd};"));
            if next() % 4 == 0 {
                let del = live.swap_remove((next() % live.len() as u64) as usize);
                sql.push_str(&format!("DELETE FROM items WHERE id = {del};"));
            }
        }
        live.push(id);
        sql.push_str("COMMIT");
        db.batch_execute(&sql)
            .unwrap_or_else(|e| panic!("shard{shard} workload: {sql}: {e}"));
        txs += 1;
        // A steady trickle per shard: the suite runs its other tests beside this one.
        std::thread::sleep(Duration::from_millis(100));
    }
    txs
}

#[test]
fn eight_shards_migrate_in_eighteen_steps_under_a_workload_and_the_ods_stays_their_union() {
    const SHARDS: usize = 8;
    let pg = PgCluster::start(&["max_connections = 60"]);
    let broker = Broker::start();
    let mut ods = pg.create_db("ods");
    let (mut dbs, _relays) = start_shards(
        &pg,
        &broker,
        SHARDS,
        &[
            "CREATE TABLE items (id int PRIMARY KEY, n int, note text, w int NOT NULL DEFAULT 0)",
            "CREATE SEQUENCE items_seq",
            "INSERT INTO items (id, n, note) SELECT g, g, 'note ' || g FROM generate_series(1, 10) g",
        ],
    );
    for db in dbs.iter_mut() {
        // The seed rows, once the slot is there.
        exec(db, &["UPDATE items SET w = 1"]);
    }
    let sport = loopback_port();
    let sink_cfg = sink_config(&pg, "ods", &broker, sport, "batch_max_rows = 200");
    let mut sink = Relay::start_sink(&pg.dir, &sink_cfg, sport);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (1..=SHARDS)
        .map(|i| {
            let db = pg.connect(&format!("shop{i}"));
            let stop = stop.clone();
            std::thread::spawn(move || migration_workload(db, i as u64, stop))
        })
        .collect();

    // Shard by shard: shard i runs step r - i in round r, so that at any time the shards are
    // spread over eight steps, and rows of up to eight shapes arrive together.
    let rounds = MIGRATION.len() + SHARDS - 1;
    for round in 0..rounds {
        for (i, db) in dbs.iter_mut().enumerate() {
            let Some((ddl, write)) = round.checked_sub(i).and_then(|s| MIGRATION.get(s)) else {
                continue;
            };
            db.batch_execute(ddl)
                .unwrap_or_else(|e| panic!("shard{}: {ddl}: {e}", i + 1));
            if !write.is_empty() {
                // The shard's ids: 1000 and up are the workload's; these stay below.
                db.batch_execute(write)
                    .unwrap_or_else(|e| panic!("shard{}: {write}: {e}", i + 1));
            }
        }
        if round == rounds / 2 {
            // The sink dies mid-migration and comes back.
            sink.kill9();
            sink = Relay::start_sink(&pg.dir, &sink_cfg, sport);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let txs: usize = workers
        .into_iter()
        .map(|w| w.join().expect("workload"))
        .sum();
    eprintln!("workload: {txs} transactions during the migration");
    assert!(txs > 100, "the workload ran: {txs} transactions");

    // Each ODS table equals the union of the shards, every column and value.
    let checks = [
        (
            "items",
            "items",
            "id::text, n::text, price, w::text, added_at::text, serial_no::text",
        ),
        ("labels", "archive.labels", "id::text, v"),
    ];
    for (ods_table, source_table, cols) in checks {
        let mut want = Vec::new();
        for (i, db) in dbs.iter_mut().enumerate() {
            want.extend(text_rows(
                db,
                &format!("SELECT 'shard{}', {cols} FROM {source_table}", i + 1),
            ));
        }
        want.sort();
        let sql = format!("SELECT _saiki_source, {cols} FROM ods.{ods_table}");
        wait_until(Duration::from_secs(240), &sink, || {
            let mut got = match try_rows(&mut ods, &sql) {
                Ok(got) => got,
                Err(e) => return Some(e),
            };
            got.sort();
            if got == want {
                return None;
            }
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(3).collect();
            Some(format!(
                "ods.{ods_table}: {} rows, the shards {}; missing {missing:?}, extra {extra:?}",
                got.len(),
                want.len()
            ))
        });
    }
    // The same column names and compatible types; the dropped column and tables are gone.
    let columns = |t: &str| {
        format!("SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_schema = 'ods' AND table_name = '{t}' AND column_name NOT LIKE '\\_saiki%'")
    };
    assert_eq!(
        text_rows(&mut ods, &columns("items"))[0][0].as_deref(),
        Some("id integer, n bigint, w integer, price text, added_at timestamp with time zone, serial_no bigint")
    );
    assert_eq!(
        text_rows(&mut ods, &columns("labels"))[0][0].as_deref(),
        Some("id integer, v text")
    );
    wait_until(Duration::from_secs(60), &sink, || {
        let t = text_rows(
            &mut ods,
            "SELECT string_agg(tablename, ', ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'ods'",
        );
        (t != vec![vec![Some("items, labels".to_string())]]).then(|| format!("ODS tables: {t:?}"))
    });
    let key = text_rows(
        &mut ods,
        "SELECT string_agg(a.attname, ', ' ORDER BY k.ord) FROM pg_index i, unnest(i.indkey::int2[]) WITH ORDINALITY k(att, ord), pg_attribute a WHERE i.indrelid = 'ods.items'::regclass AND i.indisprimary AND a.attrelid = i.indrelid AND a.attnum = k.att",
    );
    assert_eq!(key[0][0].as_deref(), Some("_saiki_source, id, n"));
    // Nothing went to the dead-letter topic, through the sink's kill.
    let dead = consume(
        &broker.addr(),
        &["saiki.dead-letter"],
        1,
        Duration::from_secs(3),
    );
    assert!(
        dead.is_empty(),
        "dead letters: {:?}",
        dead.iter().map(|m| m.json()).collect::<Vec<_>>()
    );
}

#[test]
fn a_schema_change_the_ods_cannot_follow_stops_its_topic_until_resumed_and_the_rest_keeps_applying()
{
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut ods = pg.create_db("ods");
    let (mut dbs, _relays) = start_shards(
        &pg,
        &broker,
        2,
        &[
            "CREATE TABLE items (id int PRIMARY KEY, v text)",
            "CREATE TABLE other (id int PRIMARY KEY)",
        ],
    );
    exec(&mut dbs[0], &["INSERT INTO items VALUES (1, '3')"]);
    exec(&mut dbs[1], &["INSERT INTO items VALUES (1, 'abc')"]);
    let sport = loopback_port();
    let sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, sport, ""), sport);
    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text FROM ods.items",
        vec![vec![Some("2".into())]],
    );

    // Shard 1 turns v into an integer; the ODS cannot, with shard 2's 'abc' in it.
    exec(
        &mut dbs[0],
        &[
            "ALTER TABLE items ALTER COLUMN v TYPE int USING v::int",
            "INSERT INTO items VALUES (2, 5)",
        ],
    );
    for db in dbs.iter_mut() {
        exec(db, &["INSERT INTO other VALUES (1), (2)"]);
    }
    let stopped_sql = "SELECT topic, ods_table, source, statement, error FROM saiki_sink.stopped";
    wait_until(Duration::from_secs(60), &sink, || {
        let r = try_rows(&mut ods, stopped_sql).unwrap_or_default();
        r.is_empty().then(|| "no stopped topic yet".to_string())
    });
    let stop = text_rows(&mut ods, stopped_sql);
    assert_eq!(stop.len(), 1, "{stop:?}");
    let field = |i: usize| stop[0][i].clone().unwrap_or_default();
    assert_eq!(
        (field(0).as_str(), field(1).as_str(), field(2).as_str()),
        ("saiki.public.items", "items", "shard1")
    );
    assert!(field(3).contains("ALTER COLUMN v TYPE int"), "{stop:?}");
    let error = field(4);
    assert!(
        error.contains(r#"ODS table "ods"."items" cannot follow"#)
            && error.contains("invalid input syntax"),
        "{error}"
    );
    // The other table keeps applying, from both shards; items waits.
    wait_rows(
        &mut ods,
        &sink,
        "SELECT count(*)::text FROM ods.other",
        vec![vec![Some("4".into())]],
    );
    assert_eq!(
        text_rows(&mut ods, "SELECT count(*)::text FROM ods.items")[0][0].as_deref(),
        Some("2")
    );
    let m = sink.http_get("/metrics").unwrap_or_default();
    assert_eq!(metric(&m, "saiki_sink_stopped_topics"), Some(1.0), "{m}");
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--relay",
            &format!("http://127.0.0.1:{}", sink.http_port),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 topic(s) stopped at a schema change"),
        "{text}"
    );

    // The DBA's way on, as the error says: mark the change as followed (the ODS column stays
    // text, which holds both shards' values), then resume the topic.
    let mark = &error[error
        .find("INSERT INTO saiki_sink.schema_changes")
        .expect("the fix")..];
    let mark = &mark[..=mark.find(';').unwrap()];
    let resume = &error[error
        .find("DELETE FROM saiki_sink.stopped")
        .expect("the resume")..];
    ods.batch_execute(mark).unwrap();
    ods.batch_execute(resume).unwrap();
    wait_rows(
        &mut ods,
        &sink,
        "SELECT _saiki_source, id::text, v FROM ods.items ORDER BY 1, 2",
        vec![
            vec![Some("shard1".into()), Some("1".into()), Some("3".into())],
            vec![Some("shard1".into()), Some("2".into()), Some("5".into())],
            vec![Some("shard2".into()), Some("1".into()), Some("abc".into())],
        ],
    );
    wait_until(Duration::from_secs(30), &sink, || {
        let m = sink.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_sink_stopped_topics") != Some(0.0))
            .then(|| format!("still stopped: {m}"))
    });
    let m = sink.http_get("/metrics").unwrap_or_default();
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(0.0),
        "{m}"
    );
}
