//! bench/sink's Rust half (run by bench/sink/run.py): the same generated change records
//! (1,000,000 by default: 30 % updates of earlier keys, 5 % deletes) through
//! - `apply`: the sink's apply path (planner + ODS apply, batch by batch, with offsets),
//!   the ceiling (COPY into a staging table + one INSERT … ON CONFLICT merge), and
//!   one-row-at-a-time upserts (a sample, extrapolated);
//! - `produce`: into a topic, for the end-to-end figure (and bench/lake's, `--commit-ts`);
//! - `consume`: a bare consumer that only reads them (same librdkafka as the sink);
//! - `dump`: into a file, one record per line (bench/lake's reference writer reads it);
//! - `lake`: from memory through the lake's write path (`LakeEngine`) into an Iceberg
//!   change-log table: bench/lake's engine-only figure.
//!
//! Prints one `result name=value …` line per figure.

use std::time::{Duration, Instant};

use futures::SinkExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{OwnedMessage, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use saiki_relay::{plan_batch, Applier, Done};
use saiki_relay::{Ods, PartitionOffsets};

/// One generated change: (action, id, seq, bid, abalance).
struct Change {
    action: char,
    id: i64,
    bid: i32,
    abalance: i32,
}

fn generate(n: usize) -> Vec<Change> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let mut live: Vec<i64> = Vec::new();
    let mut next = 1i64;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = rnd(100);
        let (action, id) = if r < 30 && !live.is_empty() {
            ('U', live[rnd(live.len() as u64) as usize])
        } else if r < 35 && !live.is_empty() {
            ('D', live.swap_remove(rnd(live.len() as u64) as usize))
        } else {
            live.push(next);
            next += 1;
            ('I', next - 1)
        };
        out.push(Change {
            action,
            id,
            bid: rnd(1000) as i32,
            abalance: rnd(1_000_000) as i32 - 500_000,
        });
    }
    out
}

const FILLER: &str =
    "                                                                                    ";

/// The record as the plugin and the source relay write it (include-types on), with the
/// commit time if `commit_ts` (bench/lake partitions by it; bench/sink's figures go without).
fn record(c: &Change, i: usize, commit_ts: bool) -> Vec<u8> {
    let lsn = 0x1000 + i as u64 * 0x100;
    let ts = if commit_ts {
        format!(
            r#","commit_ts":"2026-12-07T10:{:02}:{:02}.{:06}+00:00""#,
            i / 60_000_000 % 60,
            i / 1_000_000 % 60,
            i % 1_000_000
        )
    } else {
        String::new()
    };
    let head = format!(
        r#"{{"action":"{}","xid":{},"lsn":"0/{lsn:X}","commit_lsn":"0/{lsn:X}"{ts},"seq":1,"schema":"public","table":"accounts","key":["aid"]"#,
        c.action,
        1000 + i
    );
    let body = if c.action == 'D' {
        format!(r#","identity":{{"aid":{}}}"#, c.id)
    } else {
        format!(
            r#","columns":{{"aid":{},"bid":{},"abalance":{},"filler":"{FILLER}"}},"types":{{"aid":"bigint","bid":"integer","abalance":"integer","filler":"character(84)"}}"#,
            c.id, c.bid, c.abalance
        )
    };
    format!(r#"{head}{body},"source":"bench"}}"#).into_bytes()
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = arg(&args, "--rows", "1000000").parse().unwrap();
    let changes = generate(rows);
    match args.get(1).map(String::as_str) {
        Some("apply") => apply(&args, &changes).await,
        Some("produce") => produce(&args, &changes).await,
        Some("consume") => consume(&args, rows).await,
        Some("dump") => dump(&args, &changes),
        #[cfg(feature = "lake")]
        Some("lake") => lake(&args, &changes).await,
        _ => {
            eprintln!("usage: sink_bench apply|produce|consume|dump|lake [--dsn D] [--brokers B] [--rows N] [--commit-ts] [--fetch-wait-ms N] [--out FILE] [--config FILE]")
        }
    }
}

async fn client(dsn: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

/// The sink's apply path, as `saiki-relay sink` runs it: batch N+1 is planned while batch N
/// is applied on its own task (relay/src/sink/batch.rs). Returns (seconds, planning, applying).
async fn sink_round(dsn: &str, records: &[Vec<u8>], batch: usize) -> (f64, f64, f64) {
    let batches: Vec<Vec<OwnedMessage>> = records
        .chunks(batch)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    OwnedMessage::new(
                        Some(r.clone()),
                        None,
                        "saiki.public.accounts".into(),
                        Timestamp::NotAvailable,
                        0,
                        (b * batch + i) as i64,
                        None,
                    )
                })
                .collect()
        })
        .collect();
    let ods = Ods::connect(dsn, "ods", "bench", true).await.expect("ods");
    let mut applier = Some(Applier {
        ods,
        dead_letters: None,
        dead_letter_topic: "saiki.dead-letter".into(),
    });
    let mut inflight: Option<tokio::task::JoinHandle<Done>> = None;
    let started = Instant::now();
    let mut stored: Option<i64> = None;
    let mut planning = Duration::ZERO;
    let mut applying = Duration::ZERO;
    let mut collect = |done: Done| {
        if let Err(e) = done.result {
            panic!("the sink's apply path failed: {e:?}");
        }
        applying += done.elapsed;
        done.applier
    };
    for msgs in batches {
        let t = Instant::now();
        let next = msgs.last().map_or(0, |m| m.offset() + 1);
        let planned = plan_batch(msgs, true);
        planning += t.elapsed();
        if let Some(h) = inflight.take() {
            applier = Some(collect(h.await.expect("apply task")));
        }
        let offsets = vec![PartitionOffsets {
            topic: "saiki.public.accounts".into(),
            partition: 0,
            stored,
            next,
        }];
        inflight = Some(applier.take().expect("applier").spawn(planned, offsets));
        stored = Some(next);
    }
    if let Some(h) = inflight.take() {
        collect(h.await.expect("apply task"));
    }
    (
        started.elapsed().as_secs_f64(),
        planning.as_secs_f64(),
        applying.as_secs_f64(),
    )
}

/// The ceiling: the same ODS rows (the layout of docs/sink.md: bookkeeping columns, key
/// (_saiki_source, aid)) by COPY of all changes into a staging table + one merge.
async fn ceiling_round(c: &tokio_postgres::Client, text: &[u8]) -> f64 {
    c.batch_execute(
        "DROP TABLE IF EXISTS ceiling_accounts;
         CREATE TABLE ceiling_accounts (_saiki_source text NOT NULL, _saiki_commit_lsn pg_lsn NOT NULL,
             _saiki_seq int NOT NULL, _saiki_applied_at timestamptz NOT NULL, aid bigint NOT NULL,
             bid int, abalance int, filler character(84), PRIMARY KEY (_saiki_source, aid));
         DROP TABLE IF EXISTS stage, last;
         CREATE TEMP TABLE stage (op \"char\", src text, lsn pg_lsn, seq int, aid bigint, ord int,
             bid int, abalance int, filler character(84))",
    )
    .await
    .unwrap();
    let started = Instant::now();
    c.batch_execute("BEGIN").await.unwrap();
    let sink = c
        .copy_in::<_, bytes::Bytes>("COPY stage FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    for chunk in text.chunks(1 << 20) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    sink.finish().await.unwrap();
    c.batch_execute(
        "CREATE TEMP TABLE last AS SELECT DISTINCT ON (src, aid) * FROM stage ORDER BY src, aid, ord DESC;
         INSERT INTO ceiling_accounts
           SELECT src, lsn, seq, statement_timestamp(), aid, bid, abalance, filler FROM last WHERE op <> 'D'
           ON CONFLICT (_saiki_source, aid) DO UPDATE SET _saiki_commit_lsn = EXCLUDED._saiki_commit_lsn,
             _saiki_seq = EXCLUDED._saiki_seq, _saiki_applied_at = EXCLUDED._saiki_applied_at,
             bid = EXCLUDED.bid, abalance = EXCLUDED.abalance, filler = EXCLUDED.filler;
         DELETE FROM ceiling_accounts t USING last s WHERE s.op = 'D' AND t._saiki_source = s.src AND t.aid = s.aid;
         COMMIT",
    )
    .await
    .unwrap();
    started.elapsed().as_secs_f64()
}

/// Not timed: dead rows vacuumed and dirty buffers written, so that neither autovacuum nor
/// the checkpointer works on one engine's leftovers during the other's run.
async fn settle_database(c: &tokio_postgres::Client) {
    for sql in ["VACUUM", "CHECKPOINT"] {
        c.batch_execute(sql).await.unwrap();
    }
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.3}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

async fn apply(args: &[String], changes: &[Change]) {
    let dsn = arg(args, "--dsn", "host=127.0.0.1 user=postgres dbname=ods");
    let batch: usize = arg(args, "--batch", "10000").parse().unwrap();
    let rounds: usize = arg(args, "--rounds", "3").parse().unwrap();
    let records: Vec<Vec<u8>> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| record(c, i, false))
        .collect();
    let mut text = Vec::with_capacity(changes.len() * 140);
    for (i, ch) in changes.iter().enumerate() {
        let lsn = 0x1000 + i as u64 * 0x100;
        text.extend_from_slice(
            format!(
                "{}\tbench\t0/{lsn:X}\t1\t{}\t{i}\t{}\t{}\t{FILLER}\n",
                ch.action, ch.id, ch.bid, ch.abalance
            )
            .as_bytes(),
        );
    }
    let c = client(&dsn).await;

    // 1. and 2., alternately: each round starts from an empty ODS; the best round counts.
    let (mut sink_s, mut planning_s, mut applying_s, mut ceiling_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        c.batch_execute(
            "DROP SCHEMA IF EXISTS ods CASCADE; DROP SCHEMA IF EXISTS saiki_sink CASCADE;
             DROP TABLE IF EXISTS ceiling_accounts",
        )
        .await
        .unwrap();
        settle_database(&c).await;
        let (s, p, a) = sink_round(&dsn, &records, batch).await;
        sink_s.push(s);
        planning_s.push(p);
        applying_s.push(a);
        settle_database(&c).await;
        ceiling_s.push(ceiling_round(&c, &text).await);

        // The two ODS tables hold the same rows.
        let diff: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT aid, bid, abalance FROM ods.accounts EXCEPT SELECT aid, bid, abalance FROM ceiling_accounts) d",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let n: i64 = c
            .query_one("SELECT count(*) FROM ods.accounts", &[])
            .await
            .unwrap()
            .get(0);
        let m: i64 = c
            .query_one("SELECT count(*) FROM ceiling_accounts", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            diff == 0 && n == m,
            "the sink and the ceiling disagree: {diff} differ, {n} vs {m} rows"
        );
    }
    // Planning and applying of the sink's best round.
    let b = (0..sink_s.len())
        .min_by(|x, y| sink_s[*x].total_cmp(&sink_s[*y]))
        .unwrap_or(0);
    println!(
        "result engine=sink rows={} seconds={:.3} batch={batch} planning={:.3} applying={:.3} rounds={}",
        records.len(),
        sink_s[b],
        planning_s[b],
        applying_s[b],
        list(&sink_s)
    );
    println!(
        "result engine=ceiling rows={} seconds={:.3} rounds={}",
        changes.len(),
        best(&ceiling_s),
        list(&ceiling_s)
    );

    // 3. One row at a time (a sample).
    let sample = changes.len().min(50_000);
    c.batch_execute("DROP TABLE IF EXISTS single_accounts; CREATE TABLE single_accounts (aid bigint PRIMARY KEY, bid int, abalance int, filler character(84))")
        .await
        .unwrap();
    let upsert = c
        .prepare("INSERT INTO single_accounts VALUES ($1, $2, $3, $4) ON CONFLICT (aid) DO UPDATE SET bid = EXCLUDED.bid, abalance = EXCLUDED.abalance, filler = EXCLUDED.filler")
        .await
        .unwrap();
    let delete = c
        .prepare("DELETE FROM single_accounts WHERE aid = $1")
        .await
        .unwrap();
    let started = Instant::now();
    for ch in &changes[..sample] {
        if ch.action == 'D' {
            c.execute(&delete, &[&ch.id]).await.unwrap();
        } else {
            c.execute(&upsert, &[&ch.id, &ch.bid, &ch.abalance, &FILLER])
                .await
                .unwrap();
        }
    }
    let single_s = started.elapsed().as_secs_f64();
    println!("result engine=single rows={sample} seconds={single_s:.3}");
}

async fn produce(args: &[String], changes: &[Change]) {
    let brokers = arg(args, "--brokers", "127.0.0.1:9092");
    let topic = arg(args, "--topic", "saiki.public.accounts");
    let commit_ts = args.iter().any(|a| a == "--commit-ts");
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .unwrap();
    let mut pending = std::collections::VecDeque::new();
    for (i, c) in changes.iter().enumerate() {
        let key = format!("{{\"aid\":{}}}", c.id);
        let value = record(c, i, commit_ts);
        loop {
            match p.send_result(FutureRecord::to(&topic).key(&key).payload(&value)) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err(_) => {
                    if let Some(f) = pending.pop_front() {
                        f.await.unwrap().map_err(|(e, _)| e).unwrap();
                    }
                }
            }
        }
        if pending.len() > 100_000 {
            if let Some(f) = pending.pop_front() {
                f.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }
    for f in pending {
        f.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    println!("result produced={}", changes.len());
}

async fn consume(args: &[String], rows: usize) {
    let brokers = arg(args, "--brokers", "127.0.0.1:9092");
    let topic = arg(args, "--topic", "saiki.public.accounts");
    let started = Instant::now();
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "bare-consumer")
        .set("group.instance.id", "bare-consumer-1")
        .set("session.timeout.ms", "10000")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", arg(args, "--fetch-wait-ms", "500"))
        .create()
        .unwrap();
    c.subscribe(&[&topic]).unwrap();
    let mut n = 0usize;
    let mut bytes = 0usize;
    while n < rows {
        match tokio::time::timeout(Duration::from_secs(60), c.recv()).await {
            Ok(Ok(m)) => {
                n += 1;
                bytes += m.payload().map_or(0, |p| p.len());
            }
            Ok(Err(e)) => eprintln!("consume: {e}"),
            Err(_) => panic!("no message for 60 s after {n}"),
        }
    }
    let s = started.elapsed().as_secs_f64();
    println!("result engine=bare_consumer rows={n} seconds={s:.3} bytes={bytes}");
}

/// The records with their commit time, one per line, for bench/lake's reference writer.
fn dump(args: &[String], changes: &[Change]) {
    use std::io::Write;
    let out = arg(args, "--out", "records.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out).expect("--out"));
    for (i, c) in changes.iter().enumerate() {
        f.write_all(&record(c, i, true)).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    println!("result dumped={} file={out}", changes.len());
}

/// The lake's engine-only figure: the records, generated in memory before the clock starts,
/// through `LakeEngine` (the relay's own round and commit) into the change-log table of
/// `--config`'s `[lake]`; a round ends at `lake.target_file_size`, as in the relay.
#[cfg(feature = "lake")]
async fn lake(args: &[String], changes: &[Change]) {
    let config = std::fs::read_to_string(arg(args, "--config", "lake.toml")).expect("--config");
    let records: Vec<Vec<u8>> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| record(c, i, true))
        .collect();
    let mut engine = saiki_relay::LakeEngine::open(&config).await.unwrap();
    let started = Instant::now();
    let (mut files, mut commits) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        engine
            .write("saiki.public.accounts", i as i64, r)
            .await
            .unwrap();
        if engine.round_full() {
            files += engine.commit().await.unwrap();
            commits += 1;
        }
    }
    files += engine.commit().await.unwrap();
    commits += 1;
    let s = started.elapsed().as_secs_f64();
    println!(
        "result engine=lake rows={} seconds={s:.3} files={files} commits={commits}",
        records.len()
    );
}
