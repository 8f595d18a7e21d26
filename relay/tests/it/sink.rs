//! `saiki-relay sink` against real PostgreSQL (source and ODS) and a real Kafka-protocol
//! broker (tansu), fed by `saiki-relay source`.

use std::time::Duration;

use crate::common::*;
use saiki_tests::{exec, loopback_port, Broker, PgCluster};

const ORDERS: &str = "SELECT id, article, qty, price, md5(note) FROM orders";
const ODS_ORDERS: &str = "SELECT id, article, qty, price, md5(note) FROM ods.orders";

/// Waits until `ods_sql` on the ODS returns what `src_sql` returns at the source.
fn wait_equal(
    src: &mut saiki_tests::postgres::Client,
    ods: &mut saiki_tests::postgres::Client,
    src_sql: &str,
    ods_sql: &str,
    sink: &Relay,
) {
    let want = text_rows(src, src_sql);
    wait_until(Duration::from_secs(120), sink, || {
        let got = match ods.simple_query(ods_sql) {
            Ok(_) => text_rows(ods, ods_sql),
            Err(e) => return Some(format!("{ods_sql}: {e}")),
        };
        if got == want {
            None
        } else {
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(3).collect();
            Some(format!(
                "{ods_sql}: {} rows, want {}; missing {missing:?}, extra {extra:?}",
                got.len(),
                want.len()
            ))
        }
    });
}

#[test]
fn changes_materialize_in_the_ods_with_bookkeeping_new_columns_and_resume_after_sigterm() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    exec(
        &mut db,
        &[
            "CREATE TABLE orders (id int PRIMARY KEY, article text, qty int, price numeric(10,2), note text)",
            // Stored out of line, uncompressed: an update of qty leaves note unchanged-TOAST.
            "ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL",
            "CREATE TABLE items (order_id int, line int, sku text, PRIMARY KEY (order_id, line))",
            "CREATE TABLE nokey (a int, b text)",
        ],
    );
    let sport = loopback_port();
    let _source = Relay::start(
        &pg.dir,
        &relay_config(&pg, "shop", &broker, sport, ""),
        sport,
    );
    wait_slot_active(&mut db, &_source);
    let kport = loopback_port();
    let sink_cfg = sink_config(&pg, "ods", &broker, kport, "");
    let mut sink = Relay::start_sink(&pg.dir, &sink_cfg, kport);
    exec(
        &mut db,
        &[
            "INSERT INTO orders SELECT g, 'article ' || g, g % 5, g * 1.5, repeat(md5(g::text), 300) FROM generate_series(1, 100) g",
            "INSERT INTO items SELECT g % 100 + 1, g, 'sku' || g FROM generate_series(1, 300) g",
            "UPDATE orders SET qty = qty + 1 WHERE id <= 50",
            "UPDATE orders SET note = 'short' WHERE id = 7",
            "UPDATE orders SET id = id + 1000 WHERE id = 7",
            "DELETE FROM orders WHERE id > 90",
            "TRUNCATE items",
            "INSERT INTO items VALUES (1, 1, 'after the truncate')",
            "INSERT INTO nokey VALUES (1, 'x')",
            "BEGIN; INSERT INTO orders VALUES (500, 'a', 1, 1, 'n'); UPDATE orders SET qty = 2 WHERE id = 500;
             DELETE FROM orders WHERE id = 500; INSERT INTO orders VALUES (500, 'b', 3, 3, 'm'); COMMIT",
        ],
    );
    wait_equal(&mut db, &mut ods, ORDERS, ODS_ORDERS, &sink);
    wait_equal(
        &mut db,
        &mut ods,
        "SELECT order_id, line, sku FROM items",
        "SELECT order_id, line, sku FROM ods.items",
        &sink,
    );
    // The bookkeeping of docs/sink.md, "What lands in the ODS".
    let book = text_rows(
        &mut ods,
        "SELECT DISTINCT _saiki_source, _saiki_commit_lsn IS NOT NULL, _saiki_seq > 0, _saiki_applied_at IS NOT NULL FROM ods.orders",
    );
    assert_eq!(
        book,
        vec![vec![
            Some("shard1".into()),
            Some("t".into()),
            Some("t".into()),
            Some("t".into())
        ]]
    );
    let pk = text_rows(
        &mut ods,
        "SELECT string_agg(a.attname, ',' ORDER BY k.ord)
         FROM pg_index i, unnest(i.indkey::int2[]) WITH ORDINALITY k(att, ord), pg_attribute a
         WHERE a.attrelid = i.indrelid AND a.attnum = k.att
           AND i.indrelid = 'ods.items'::regclass AND i.indisprimary",
    );
    assert_eq!(pk[0][0].as_deref(), Some("_saiki_source,order_id,line"));
    // A table without a key is not materialized; its record is a dead letter.
    wait_until(Duration::from_secs(30), &sink, || {
        let m = sink.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_sink_dead_letters_total") != Some(1.0))
            .then(|| format!("dead letters: {m}"))
    });
    let dead = consume(
        &broker.addr(),
        &["saiki.dead-letter"],
        1,
        Duration::from_secs(10),
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers["saiki.error"],
        "no replica identity: add a primary key or set REPLICA IDENTITY FULL"
    );
    assert!(dead[0].headers["saiki.origin"].starts_with("saiki.public.nokey/0/"));
    assert_eq!(dead[0].json()["table"], "nokey");
    assert!(
        text_rows(&mut ods, "SELECT to_regclass('ods.nokey') IS NULL")[0][0] == Some("t".into())
    );

    // SIGTERM: exit 0; a new sink continues at the ODS's offsets, re-reading nothing.
    let status = sink.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}\n{}", sink.log_text());
    exec(&mut db, &["UPDATE orders SET qty = 99 WHERE id = 1"]);
    let sink = Relay::start_sink(&pg.dir, &sink_cfg, kport);
    wait_equal(&mut db, &mut ods, ORDERS, ODS_ORDERS, &sink);
    let m = sink.http_get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "saiki_sink_records_consumed_total"),
        Some(1.0),
        "only the new change is read again:\n{m}"
    );
    // Its freshness (ODS commit − source commit) was observed once, and it is not negative
    // nor absurd: both clocks are this machine's.
    assert_eq!(
        metric(&m, "saiki_sink_freshness_seconds_count"),
        Some(1.0),
        "{m}"
    );
    let fresh = metric(&m, "saiki_sink_freshness_seconds_sum").unwrap();
    assert!((0.0..30.0).contains(&fresh), "freshness {fresh} s:\n{m}");
    // `saiki-relay status` reads the same from the sink's HTTP endpoint.
    let out = std::process::Command::new(BIN)
        .args([
            "status",
            "--json",
            "--relay",
            &format!("http://127.0.0.1:{}", sink.http_port),
        ])
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let r = &st["relays"][0];
    assert_eq!(r["role"], "sink", "{st}");
    assert_eq!(r["healthy"], true, "{st}");
    assert!(r["freshness_p50"].as_f64().is_some(), "{st}");
    assert!(st["slots"].is_null(), "no database asked: {st}");
    // Everything applied: the consumer lag (high watermarks − ODS offsets) comes to 0.
    wait_until(Duration::from_secs(30), &sink, || {
        let m = sink.http_get("/metrics").unwrap_or_default();
        (metric(&m, "saiki_sink_consumer_lag_messages") != Some(0.0))
            .then(|| format!("lag not 0: {m}"))
    });
    // A column added at the source appears in the ODS with its first value.
    exec(
        &mut db,
        &[
            "ALTER TABLE orders ADD COLUMN shipped date",
            "UPDATE orders SET shipped = '2026-11-26' WHERE id = 2",
        ],
    );
    wait_equal(
        &mut db,
        &mut ods,
        "SELECT id, qty, shipped FROM orders",
        "SELECT id, qty, shipped FROM ods.orders",
        &sink,
    );
    let shipped_type = text_rows(
        &mut ods,
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'ods.orders'::regclass AND attname = 'shipped'",
    );
    assert_eq!(shipped_type[0][0].as_deref(), Some("date"));
    let offsets = text_rows(
        &mut ods,
        "SELECT topic, next_offset > 0 FROM saiki_sink.offsets WHERE \"group\" = 'saiki-ods'",
    );
    assert!(
        offsets.contains(&vec![Some("saiki.public.orders".into()), Some("t".into())]),
        "{offsets:?}"
    );
    assert!(
        !offsets
            .iter()
            .any(|r| r[0].as_deref() == Some("saiki.transactions")),
        "transaction records are not the sink's: {offsets:?}"
    );
}

#[test]
fn a_poison_record_goes_to_the_dead_letter_topic_and_the_rest_keeps_flowing() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    exec(&mut db, &["CREATE TABLE t (id int PRIMARY KEY, n int)"]);
    let sport = loopback_port();
    let source = Relay::start(
        &pg.dir,
        &relay_config(&pg, "shop", &broker, sport, ""),
        sport,
    );
    wait_slot_active(&mut db, &source);
    let kport = loopback_port();
    let sink = Relay::start_sink(
        &pg.dir,
        &sink_config(&pg, "ods", &broker, kport, "batch_max_rows = 1000"),
        kport,
    );
    exec(
        &mut db,
        &["INSERT INTO t SELECT g, g FROM generate_series(1, 10) g"],
    );
    let all = "SELECT id, n FROM t";
    let ods_all = "SELECT id, n FROM ods.t";
    wait_equal(&mut db, &mut ods, all, ods_all, &sink);

    // Poison: not JSON; and a value that does not fit its column.
    let bad_json: &[u8] = b"{\"action\":\"I\", oops";
    let bad_value: &[u8] = br#"{"action":"I","xid":9,"lsn":"0/1","commit_lsn":"0/1","seq":1,"schema":"public","table":"t","key":["id"],"columns":{"id":999,"n":"not a number"},"types":{"id":"integer","n":"integer"},"source":"shard1"}"#;
    produce_raw(
        &broker.addr(),
        "saiki.public.t",
        &[
            (Some(b"{\"id\":998}"), Some(bad_json)),
            (Some(b"{\"id\":999}"), Some(bad_value)),
        ],
    );
    exec(
        &mut db,
        &["INSERT INTO t SELECT g, g FROM generate_series(11, 20) g"],
    );
    wait_equal(&mut db, &mut ods, all, ods_all, &sink);
    let dead = consume(
        &broker.addr(),
        &["saiki.dead-letter"],
        2,
        Duration::from_secs(20),
    );
    assert_eq!(dead.len(), 2, "{}", sink.log_text());
    assert_eq!(dead[0].payload.as_deref(), Some(bad_json), "unchanged");
    assert!(
        dead[0].headers["saiki.error"].starts_with("malformed record"),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[1].payload.as_deref(), Some(bad_value));
    assert!(
        dead[1].headers["saiki.error"].contains("invalid input syntax for type integer"),
        "{:?}",
        dead[1].headers
    );
    assert!(dead[1].headers["saiki.origin"].starts_with("saiki.public.t/0/"));
    let m = sink.http_get("/metrics").unwrap();
    assert_eq!(
        metric(&m, "saiki_sink_dead_letters_total"),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn every_builtin_type_arrives_in_the_ods_with_the_sources_text_output() {
    use saiki_tests::type_samples::{self, column_name, SAMPLES};
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("types");
    let mut ods = pg.create_db("ods");
    db.batch_execute(type_samples::CUSTOM_TYPES).unwrap();
    type_samples::create_table(&mut db, "every_type");
    let sport = loopback_port();
    let source = Relay::start(
        &pg.dir,
        &relay_config(&pg, "types", &broker, sport, ""),
        sport,
    );
    wait_slot_active(&mut db, &source);
    let kport = loopback_port();
    let sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, kport, ""), kport);
    let rows = type_samples::insert_rows(&mut db, "every_type");
    wait_until(Duration::from_secs(60), &sink, || {
        let n = ods
            .query_one("SELECT count(*) FROM ods.every_type", &[])
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1);
        (n != rows as i64).then(|| format!("{n} of {rows} rows in the ODS"))
    });

    // User-defined types do not exist in the ODS: they are stored as text (enums keep their
    // label; composites and their arrays the JSON the plugin wrote).
    let user_defined = ["mood", "pair", "pair[]", "posint", "tags"];
    let mut differ = Vec::new();
    for (ty, _) in SAMPLES {
        let col = column_name(ty);
        let sql = format!("SELECT id, {col} FROM every_type");
        let src = text_rows(&mut db, &sql);
        let got = text_rows(&mut ods, &sql.replace("every_type", "ods.every_type"));
        // Known differences of the record format (docs/types.md): `json` arrives as the
        // same document without its whitespace, and a JSON null document as NULL; arrays
        // lose their lower bounds.
        let src: Vec<Vec<Option<String>>> = src
            .into_iter()
            .map(|r| match (*ty, r[1].as_deref()) {
                ("json", Some("null")) => vec![r[0].clone(), None],
                ("json", Some(t)) => vec![r[0].clone(), Some(strip_json_space(t))],
                (_, Some(t)) if ty.ends_with("[]") && t.starts_with('[') => {
                    vec![r[0].clone(), t.split_once('=').map(|x| x.1.to_string())]
                }
                _ => r,
            })
            .collect();
        if src != got && !user_defined.contains(ty) {
            differ.push(format!("{ty}: source {src:?}\n      ODS    {got:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} built-in types differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
    let mut ods_type = |c: &str| {
        text_rows(
            &mut ods,
            &format!("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'ods.every_type'::regclass AND attname = '{c}'"),
        )[0][0]
            .clone()
    };
    assert_eq!(ods_type("c_mood").as_deref(), Some("text"));
    assert_eq!(ods_type("c_int8").as_deref(), Some("bigint"));
}

/// JSON text without the whitespace outside strings.
fn strip_json_space(t: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut esc) = (false, false);
    for c in t.chars() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// A backlog in the broker, and topics listed every 200 ms: the listing blocks the sink's loop
/// behind the consumer's fetch long-poll (tansu answers a connection's requests in order),
/// and librdkafka queues a statistics event each time. The loop used to fall behind the
/// statistics events and never reach the messages queued after them.
#[test]
fn a_backlog_drains_while_topics_are_listed_every_200ms() {
    const N: usize = 50_000;
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut ods = pg.create_db("ods");
    create_topic(&broker.addr(), "saiki.public.backlog", 1);
    let records: Vec<(Vec<u8>, Vec<u8>)> = (1..=N)
        .map(|id| {
            let lsn = 0x1000 + id * 0x10;
            (
                format!(r#"{{"id":{id}}}"#).into_bytes(),
                format!(r#"{{"action":"I","xid":{id},"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}","seq":1,"schema":"public","table":"backlog","key":["id"],"columns":{{"id":{id},"n":{id}}},"types":{{"id":"integer","n":"integer"}},"source":"s1"}}"#).into_bytes(),
            )
        })
        .collect();
    let raw: Vec<RawMsg<'_>> = records
        .iter()
        .map(|(k, v)| (Some(k.as_slice()), Some(v.as_slice())))
        .collect();
    produce_raw(&broker.addr(), "saiki.public.backlog", &raw);
    let kport = loopback_port();
    let config = sink_config(&pg, "ods", &broker, kport, "")
        .replace(r#"topic_refresh = "500ms""#, r#"topic_refresh = "200ms""#);
    assert!(config.contains(r#"topic_refresh = "200ms""#));
    let sink = Relay::start_sink(&pg.dir, &config, kport);
    wait_until(Duration::from_secs(120), &sink, || {
        let n: i64 = match ods.query_one("SELECT count(*) FROM ods.backlog", &[]) {
            Ok(r) => r.get(0),
            Err(e) => return Some(format!("ods.backlog: {e}")),
        };
        (n != N as i64).then(|| format!("{n} of {N} rows in the ODS"))
    });
    let sum: i64 = ods
        .query_one("SELECT sum(n)::bigint FROM ods.backlog", &[])
        .unwrap()
        .get(0);
    assert_eq!(sum, (N * (N + 1) / 2) as i64);
}

#[test]
fn a_replayed_change_never_brings_back_a_deleted_or_truncated_row() {
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut ods = pg.create_db("ods");
    create_topic(&broker.addr(), "saiki.public.r", 1);
    let kport = loopback_port();
    let sink = Relay::start_sink(&pg.dir, &sink_config(&pg, "ods", &broker, kport, ""), kport);
    let rec = |action: &str, lsn: u32, seq: u32, id: u32| -> Vec<u8> {
        let body = match action {
            "D" => format!(r#""key":["id"],"identity":{{"id":{id}}}"#),
            "T" => String::new(),
            _ => format!(
                r#""key":["id"],"columns":{{"id":{id},"v":"{lsn:X}"}},"types":{{"id":"integer","v":"text"}}"#
            ),
        };
        let sep = if body.is_empty() { "" } else { "," };
        format!(
            r#"{{"action":"{action}","xid":1,"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}","seq":{seq},"schema":"public","table":"r"{sep}{body},"source":"s1"}}"#
        )
        .into_bytes()
    };
    let first = [
        rec("I", 0x10, 1, 1),
        rec("I", 0x10, 2, 2),
        rec("D", 0x20, 1, 1),
        rec("T", 0x30, 1, 0),
        rec("I", 0x40, 1, 3),
    ];
    let send = |msgs: &[Vec<u8>]| {
        let raw: Vec<RawMsg<'_>> = msgs.iter().map(|m| (None, Some(m.as_slice()))).collect();
        produce_raw(&broker.addr(), "saiki.public.r", &raw);
    };
    let rows = |ods: &mut saiki_tests::postgres::Client| {
        text_rows(ods, "SELECT id, v FROM ods.r")
            .into_iter()
            .map(|r| r[0].clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let wait_rows = |ods: &mut saiki_tests::postgres::Client, want: &[&str], consumed: f64| {
        wait_until(Duration::from_secs(60), &sink, || {
            let m = sink.http_get("/metrics").unwrap_or_default();
            if metric(&m, "saiki_sink_records_consumed_total") != Some(consumed) {
                return Some(format!("not all consumed: {m}"));
            }
            let got = rows(ods);
            (got != want).then(|| format!("rows {got:?}, want {want:?}"))
        });
    };
    send(&first);
    wait_rows(&mut ods, &["3"], 5.0);
    // The relay restarted at an older slot position: the same changes again, in order,
    // each in a batch of its own (within a batch, the planner's fold drops them already).
    for (i, m) in first.iter().enumerate() {
        send(std::slice::from_ref(m));
        wait_rows(&mut ods, &["3"], 6.0 + i as f64);
    }
    // A later insert of a deleted key is a new row.
    send(&[rec("I", 0x50, 1, 1)]);
    wait_rows(&mut ods, &["1", "3"], 11.0);
    let v = text_rows(&mut ods, "SELECT v FROM ods.r WHERE id = 1");
    assert_eq!(v[0][0].as_deref(), Some("50"));
}

#[test]
fn two_sinks_in_one_group_share_the_partitions_and_apply_each_change_once_as_one_joins_and_leaves()
{
    let pg = PgCluster::start(&[]);
    let broker = Broker::start();
    let mut db = pg.create_db("shop");
    let mut ods = pg.create_db("ods");
    ods.batch_execute(ODS_AUDIT).unwrap();
    exec(&mut db, &["CREATE TABLE acc (id int PRIMARY KEY, v int)"]);
    let sport = loopback_port();
    let source_cfg = relay_config(&pg, "shop", &broker, sport, "").replace(
        "topic_prefix = \"saiki\"",
        "topic_prefix = \"saiki\"\npartitions = 4",
    );
    let source = Relay::start(&pg.dir, &source_cfg, sport);
    wait_slot_active(&mut db, &source);
    let (pa, pb) = (loopback_port(), loopback_port());
    // The first is a static member (`instance_id`), as docs/sink.md recommends for instances
    // that restart in place; the second a dynamic one, like an instance added for a while.
    let cfg = |port: u16, id: Option<&str>| {
        sink_config(&pg, "ods", &broker, port, "batch_max_rows = 200").replace(
            "instance_id = \"test-sink\"",
            &id.map_or(String::new(), |id| format!("instance_id = \"{id}\"")),
        )
    };
    let a = Relay::start_sink(&pg.dir, &cfg(pa, Some("sink-a")), pa);
    let worker = {
        let mut w = pg.connect("shop");
        std::thread::spawn(move || {
            let mut x: u64 = 7;
            for _ in 0..1500 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = x % 400;
                let sql = if x.is_multiple_of(7) {
                    format!("DELETE FROM acc WHERE id = {id}")
                } else {
                    format!("INSERT INTO acc VALUES ({id}, {}) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", x % 1000)
                };
                w.batch_execute(&sql).unwrap();
                std::thread::sleep(Duration::from_millis(4));
            }
        })
    };
    // A second instance joins (a rebalance), both share the partitions, the second leaves (a
    // rebalance), all while the workload runs. A sink killed and restarted is the shard and
    // single-sink tests' business. On tansu 0.6.0 a static member that is gone stays in the
    // group for good, on Kafka for `session.timeout.ms` (docs/testing.md), so the one that
    // leaves is dynamic.
    std::thread::sleep(Duration::from_secs(2));
    let mut b = Relay::start_sink(&pg.dir, &cfg(pb, None), pb);
    // The second leaves once the group has settled: librdkafka sends LeaveGroup only then.
    wait_until(Duration::from_secs(60), &b, || {
        let m = |r: &Relay, name: &str| {
            metric(&r.http_get("/metrics").unwrap_or_default(), name).unwrap_or(0.0)
        };
        let (na, nb) = (
            m(&a, "saiki_sink_assigned_partitions"),
            m(&b, "saiki_sink_assigned_partitions"),
        );
        let applied = m(&b, "saiki_sink_batches_total");
        (na < 1.0 || nb < 1.0 || na + nb != 4.0 || applied < 1.0).then(|| {
            format!("partitions not yet shared: a {na}, b {nb}; b applied {applied} batches")
        })
    });
    let status = b.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}\n{}", b.log_text());
    worker.join().unwrap();
    let end = saiki_tests::current_wal_lsn(&mut db);
    wait_confirmed(
        &mut db,
        "saiki_test",
        &end,
        Duration::from_secs(60),
        &source,
    );
    wait_equal(
        &mut db,
        &mut ods,
        "SELECT id, v FROM acc",
        "SELECT id, v FROM ods.acc",
        &a,
    );
    assert_no_change_applied_twice(&mut ods);
}
