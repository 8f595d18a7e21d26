//! The eight-shard run (issue #4): eight source databases with the same schema and colliding
//! keys, a source relay each, one broker, one sink, one ODS; the sink killed with -9 at
//! random moments inside its ODS transactions, a source relay killed and restarted. The ODS
//! must end equal to the union of the shards, with no change applied twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use saiki_tests::{current_wal_lsn, exec, loopback_port, Broker, PgCluster};

const SHARDS: usize = 8;
const TXS_PER_SHARD: usize = 400;
const SINK_KILLS: usize = 6;

const SCHEMA: &[&str] = &[
    "CREATE TABLE articles (id int PRIMARY KEY, name text NOT NULL, category text NOT NULL, price numeric(10,2))",
    "CREATE TABLE orders (id bigint PRIMARY KEY, customer text, created_at timestamptz NOT NULL, status text)",
    "CREATE TABLE order_items (order_id bigint, line int, article_id int, quantity int, PRIMARY KEY (order_id, line))",
];

/// The same catalog on every shard (ids collide across shards on purpose).
fn articles_sql(price_factor: u32) -> String {
    let rows: Vec<String> = (1..=20)
        .map(|i| {
            let cat = if i <= 8 { "shoes" } else { "shirts" };
            format!(
                "({i}, '{cat} model {i}', '{cat}', {}.{:02})",
                10 + i * price_factor,
                i % 100
            )
        })
        .collect();
    format!("INSERT INTO articles VALUES {}", rows.join(", "))
}

/// xorshift: a deterministic workload per shard.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn workload(mut db: saiki_tests::postgres::Client, shard: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((shard as u64 + 1) * 7919));
    let mut next_id: i64 = 1;
    let mut live: Vec<i64> = Vec::new();
    for tx in 0..TXS_PER_SHARD {
        let sql = if tx == TXS_PER_SHARD / 2 {
            // New prices: the catalog truncated and reloaded in one transaction.
            format!("BEGIN; TRUNCATE articles; {}; COMMIT", articles_sql(2))
        } else {
            match rng.next(10) {
                0..=5 => {
                    let id = next_id;
                    next_id += 1;
                    live.push(id);
                    let day = if rng.next(2) == 0 { "1 day" } else { "0 days" };
                    let mut s = format!(
                        "BEGIN; INSERT INTO orders VALUES ({id}, 'customer {}', date_trunc('day', now()) - interval '{day}' + interval '{} minutes', 'new');",
                        rng.next(50),
                        rng.next(1440)
                    );
                    for line in 1..=(1 + rng.next(3)) {
                        s.push_str(&format!(
                            "INSERT INTO order_items VALUES ({id}, {line}, {}, {});",
                            1 + rng.next(20),
                            1 + rng.next(4)
                        ));
                    }
                    s.push_str("COMMIT");
                    s
                }
                6..=7 if !live.is_empty() => {
                    let id = live[rng.next(live.len() as u64) as usize];
                    format!(
                        "BEGIN; UPDATE orders SET status = 'paid' WHERE id = {id}; UPDATE order_items SET quantity = quantity + 1 WHERE order_id = {id} AND line = 1; COMMIT"
                    )
                }
                8 if !live.is_empty() => {
                    let id = live.swap_remove(rng.next(live.len() as u64) as usize);
                    format!("BEGIN; DELETE FROM order_items WHERE order_id = {id}; DELETE FROM orders WHERE id = {id}; COMMIT")
                }
                _ => "UPDATE articles SET price = price + 1 WHERE id = 3".to_string(),
            }
        };
        db.batch_execute(&sql)
            .unwrap_or_else(|e| panic!("shard {shard}: {sql}: {e}"));
    }
}

fn source_config(pg: &PgCluster, shard: usize, broker: &Broker, http: u16) -> String {
    format!(
        r#"[source]
name = "shard{shard}"
dsn = "host=127.0.0.1 port={} user=postgres dbname=shop"
slot = "saiki_test"
heartbeat_interval = "1s"
status_interval = "200ms"
reconnect_backoff_max = "1s"

[kafka]
brokers = "{}"
topic_prefix = "saiki"

[http]
listen = "127.0.0.1:{http}"
"#,
        pg.port,
        broker.addr()
    )
}

/// Waits until the sink's backend is inside a transaction (a batch in flight), at most 5 s.
fn wait_mid_batch(ods: &mut saiki_tests::postgres::Client) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let n: i64 = ods
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'saiki-relay sink' AND xact_start IS NOT NULL",
                &[],
            )
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

#[test]
fn eight_shards_materialize_exactly_once_through_sink_and_relay_crashes() {
    let broker = Broker::start();
    let ods_pg = PgCluster::start(&["shared_buffers = 64MB"]);
    let mut ods = ods_pg.create_db("ods");
    ods.batch_execute(ODS_AUDIT).unwrap();
    let shards: Vec<PgCluster> = (0..SHARDS)
        .map(|_| PgCluster::start(&["shared_buffers = 16MB", "max_connections = 20"]))
        .collect();
    let mut relays = Vec::new();
    for (i, pg) in shards.iter().enumerate() {
        let mut db = pg.create_db("shop");
        exec(&mut db, SCHEMA);
        let port = loopback_port();
        let relay = Relay::start(&pg.dir, &source_config(pg, i + 1, &broker, port), port);
        wait_slot_active(&mut db, &relay);
        exec(&mut db, &[&articles_sql(1)]);
        relays.push(relay);
    }
    let sink_port = loopback_port();
    let sink_cfg = sink_config(&ods_pg, "ods", &broker, sink_port, "batch_max_rows = 300");
    let mut sink = Relay::start_sink(&ods_pg.dir, &sink_cfg, sink_port);

    let workers: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(i, pg)| {
            let db = pg.connect("shop");
            std::thread::spawn(move || workload(db, i + 1))
        })
        .collect();

    // Faults while the workload runs: the sink killed inside its batches, a relay killed.
    let mut rng = Rng(42);
    let mut mid_batch = 0;
    for k in 0..SINK_KILLS {
        // Once the sink has its partitions (and a backlog from its downtime), kill it
        // inside a batch's ODS transaction.
        wait_until(Duration::from_secs(60), &sink, || {
            let m = sink.http_get("/metrics").unwrap_or_default();
            (metric(&m, "saiki_sink_assigned_partitions").unwrap_or(0.0) < 1.0)
                .then(|| "the sink has no partitions".to_string())
        });
        std::thread::sleep(Duration::from_millis(rng.next(400)));
        if wait_mid_batch(&mut ods) {
            mid_batch += 1;
        }
        sink.kill9();
        if k == 2 {
            relays[2].kill9();
            std::thread::sleep(Duration::from_millis(300));
            let cfg = std::fs::read_to_string(&relays[2].config).unwrap();
            let port = relays[2].http_port;
            relays[2] = Relay::start(&shards[2].dir, &cfg, port);
        }
        sink = Relay::start_sink(&ods_pg.dir, &sink_cfg, sink_port);
    }
    for w in workers {
        w.join().expect("workload");
    }
    eprintln!("{mid_batch} of {SINK_KILLS} kills landed inside an ODS transaction");
    assert!(mid_batch >= 1, "no kill landed inside an ODS transaction");

    // Every shard's slot confirmed to its end: everything is in Kafka.
    for (i, pg) in shards.iter().enumerate() {
        let mut db = pg.connect("shop");
        let end = current_wal_lsn(&mut db);
        wait_confirmed(
            &mut db,
            "saiki_test",
            &end,
            Duration::from_secs(120),
            &relays[i],
        );
    }

    // The ODS equals the union of the shards, table by table.
    let tables = [
        ("articles", "id, name, category, price"),
        ("orders", "id, customer, created_at, status"),
        ("order_items", "order_id, line, article_id, quantity"),
    ];
    for (t, cols) in tables {
        let mut want = Vec::new();
        for (i, pg) in shards.iter().enumerate() {
            let mut db = pg.connect("shop");
            want.extend(text_rows(
                &mut db,
                &format!("SELECT 'shard{}', {cols} FROM {t}", i + 1),
            ));
        }
        want.sort();
        let ods_sql = format!("SELECT _saiki_source, {cols} FROM ods.{t}");
        wait_until(Duration::from_secs(180), &sink, || {
            let got = match ods.simple_query(&ods_sql) {
                Ok(_) => text_rows(&mut ods, &ods_sql),
                Err(e) => return Some(e.to_string()),
            };
            if got == want {
                return None;
            }
            let missing: Vec<_> = want.iter().filter(|r| !got.contains(r)).take(3).collect();
            let extra: Vec<_> = got.iter().filter(|r| !want.contains(r)).take(3).collect();
            Some(format!(
                "ods.{t}: {} rows, the shards {}; missing {missing:?}, extra {extra:?}",
                got.len(),
                want.len()
            ))
        });
    }

    // "How many pairs of shoes did we sell yesterday?": one ODS query = the shards summed.
    let question = "SELECT a.name, sum(oi.quantity)::bigint FROM order_items oi
        JOIN orders o ON o.id = oi.order_id {o_src}
        JOIN articles a ON a.id = oi.article_id {a_src}
        WHERE a.category = 'shoes' AND o.created_at >= current_date - 1 AND o.created_at < current_date
        GROUP BY a.name";
    let mut summed: BTreeMap<String, i64> = BTreeMap::new();
    for pg in &shards {
        let mut db = pg.connect("shop");
        let q = question.replace("{o_src}", "").replace("{a_src}", "");
        for r in db.query(q.as_str(), &[]).unwrap() {
            *summed.entry(r.get(0)).or_default() += r.get::<_, i64>(1);
        }
    }
    let q = question
        .replace("order_items oi", "ods.order_items oi")
        .replace("JOIN orders o", "JOIN ods.orders o")
        .replace("JOIN articles a", "JOIN ods.articles a")
        .replace("{o_src}", "AND o._saiki_source = oi._saiki_source")
        .replace("{a_src}", "AND a._saiki_source = oi._saiki_source");
    let ods_answer: BTreeMap<String, i64> = ods
        .query(q.as_str(), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!summed.is_empty(), "the workload sold shoes yesterday");
    assert_eq!(ods_answer, summed);

    // No change was applied twice: each (table, source, commit_lsn, seq) wrote once.
    assert_no_change_applied_twice(&mut ods);
}
