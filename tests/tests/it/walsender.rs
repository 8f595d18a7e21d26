//! Decoding over the walsender (`pg_recvlogical -P saiki`), the path the relay uses:
//! a 1,000,000-row transaction arrives as 1,000,000 `I` records while the walsender's memory
//! stays flat, and commit_lsn/LSN bookkeeping is consistent.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use saiki_core::record::{Action, Record};
use saiki_tests::{current_wal_lsn, exec, recvlogical, PgCluster};

/// Resident set size of a process in KiB, from /proc.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_million_row_transaction_streams_with_flat_walsender_memory() {
    const ROWS: i64 = 1_000_000;
    // Default logical_decoding_work_mem (64MB): the reorder buffer spills to disk beyond it;
    // the plugin itself must add nothing per change.
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("big");
    db.batch_execute("CREATE TABLE big (id int8 PRIMARY KEY, article text, qty int, price numeric(12,2), meta jsonb)")
        .unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('big_slot', 'saiki')")
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO big SELECT g, 'article-' || g, (g % 7)::int, g * 0.01, jsonb_build_object('g', g)
         FROM generate_series(1, {ROWS}) g"
    ))
    .unwrap();
    let end_lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);

    let mut child = pg
        .client_cmd("pg_recvlogical")
        .args([
            "-d",
            "big",
            "-S",
            "big_slot",
            "--start",
            "--no-loop",
            "-f",
            "-",
        ])
        .args(["--endpos", &end_lsn, "-o", "include-transaction=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pg_recvlogical");

    // Find the walsender serving the slot and sample its RSS while records flow.
    let started = Instant::now();
    let mut pid = None;
    let mut samples: Vec<(u64, u64)> = Vec::new(); // (records read, rss KiB)
    let mut counts = std::collections::HashMap::new();
    let mut last_commit_lsn = None;
    let mut seq_ok = true;
    let mut expect_seq = 1;
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut n: u64 = 0;
    for line in reader.lines() {
        let line = line.unwrap();
        if line.is_empty() {
            continue;
        }
        let rec: Record = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        *counts.entry(rec.action).or_insert(0u64) += 1;
        if rec.action == Action::Insert {
            seq_ok &= rec.seq == Some(expect_seq);
            expect_seq += 1;
            if last_commit_lsn.is_none() {
                last_commit_lsn = rec.commit_lsn;
            }
            assert_eq!(
                rec.commit_lsn, last_commit_lsn,
                "every change carries its commit's end LSN"
            );
        }
        if rec.action == Action::Commit {
            assert_eq!(
                rec.commit_lsn, last_commit_lsn,
                "C confirms the same LSN as its changes"
            );
        }
        n += 1;
        if pid.is_none() {
            let mut c = pg.connect("postgres");
            pid = c
                .query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'big_slot'",
                    &[],
                )
                .unwrap()
                .and_then(|r| r.get::<_, Option<i32>>(0));
        }
        if n.is_multiple_of(50_000) {
            if let Some(rss) = pid.and_then(rss_kib) {
                samples.push((n, rss));
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "decoding took more than 10 minutes"
        );
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "pg_recvlogical failed: {status}");

    assert_eq!(
        counts.get(&Action::Insert).copied(),
        Some(ROWS as u64),
        "{counts:?}"
    );
    assert_eq!(counts.get(&Action::Begin).copied(), Some(1));
    assert_eq!(counts.get(&Action::Commit).copied(), Some(1));
    assert!(seq_ok, "seq runs 1..=n inside the transaction");

    // Flat memory: after the first quarter (caches warm), RSS grows by less than 16 MiB while
    // the remaining ~750,000 records stream through. Holding the records would take >300 MiB.
    assert!(samples.len() >= 10, "too few RSS samples: {samples:?}");
    let warm = samples[samples.len() / 4].1;
    let peak = samples.iter().map(|s| s.1).max().unwrap();
    println!("walsender RSS samples (records, KiB): {samples:?}");
    println!("walsender RSS after warm-up {warm} KiB, peak {peak} KiB");
    assert!(
        peak < warm + 16 * 1024,
        "walsender RSS grew from {warm} KiB to {peak} KiB while streaming: {samples:?}"
    );
}

#[test]
fn lsns_and_commit_lsns_are_consistent_across_transactions() {
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("lsn");
    exec(
        &mut db,
        &[
            "CREATE TABLE t (id int PRIMARY KEY, v text)",
            "SELECT pg_create_logical_replication_slot('s', 'saiki')",
            "INSERT INTO t VALUES (1, 'a')",
            "BEGIN; INSERT INTO t VALUES (2, 'b'); UPDATE t SET v = 'c' WHERE id = 1; COMMIT;",
            "DELETE FROM t",
        ],
    );
    let lines = saiki_tests::get_changes(&mut db, "s", &[]);
    let recs = saiki_tests::parse_records(&lines);
    // pg_logical_slot_get_changes' own lsn column for C is the commit record's start; the
    // plugin's commit_lsn is its end, what a consumer confirms. Each transaction's commit_lsn
    // is past all of its changes and increases from one transaction to the next.
    let mut prev_commit = saiki_core::Lsn(0);
    let mut current = None;
    for r in &recs {
        match r.action {
            Action::Begin => current = r.commit_lsn,
            Action::Commit => {
                assert_eq!(r.commit_lsn, current);
                let c = r.commit_lsn.unwrap();
                assert!(c > r.lsn && c > prev_commit, "{r:?}");
                prev_commit = c;
            }
            _ => {
                assert_eq!(r.commit_lsn, current, "{r:?}");
                assert!(r.lsn < r.commit_lsn.unwrap());
            }
        }
    }
    assert_eq!(
        recs.iter().filter(|r| r.action == Action::Commit).count(),
        3
    );
    // The confirmed position after consuming is the last commit_lsn.
    let confirmed: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(confirmed.parse::<saiki_core::Lsn>().unwrap() >= prev_commit);
}

#[test]
fn bad_options_over_the_walsender_fail_with_the_option_named() {
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("opts");
    db.batch_execute("SELECT pg_create_logical_replication_slot('s', 'saiki')")
        .unwrap();
    let out = pg
        .client_cmd("pg_recvlogical")
        .args([
            "-d",
            "opts",
            "-S",
            "s",
            "--start",
            "--no-loop",
            "-f",
            "-",
            "-o",
            "include-types=maybe",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("include-types") && err.contains("maybe"),
        "{err}"
    );
    // The server keeps running: the same slot decodes fine afterwards.
    db.batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);")
        .unwrap();
    let recs = saiki_tests::get_changes(&mut db, "s", &[]);
    assert_eq!(recs.len(), 3, "{recs:?}");
}

#[test]
fn pg_recvlogical_creates_a_saiki_slot_and_streams_large_transactions_over_the_walsender() {
    let pg = PgCluster::start(&["logical_decoding_work_mem = '64kB'"]);
    let mut db = pg.create_db("rl");
    let create = pg
        .client_cmd("pg_recvlogical")
        .args(["-d", "rl", "-S", "rl_slot", "-P", "saiki", "--create-slot"])
        .output()
        .unwrap();
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    exec(
        &mut db,
        &[
            "CREATE TABLE t (id int PRIMARY KEY, pad text)",
            "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g",
        ],
    );
    let end = current_wal_lsn(&mut db);
    let lines = recvlogical(&pg, "rl", "rl_slot", &end, &["stream-changes=1"]);
    let recs = saiki_tests::parse_records(&lines);
    let count = |a: Action| recs.iter().filter(|r| r.action == a).count();
    assert_eq!(count(Action::Insert), 5000);
    assert!(
        count(Action::StreamStart) > 1,
        "the transaction was streamed in blocks"
    );
    assert_eq!(count(Action::StreamStart), count(Action::StreamStop));
    assert_eq!(count(Action::Commit), 1);
    let commit = recs.iter().find(|r| r.action == Action::Commit).unwrap();
    assert!(commit.commit_lsn.is_some() && commit.streamed == Some(true));
    assert!(recs
        .iter()
        .filter(|r| r.action == Action::Insert)
        .all(|r| r.streamed == Some(true) && r.commit_lsn.is_none()));
    // The stream's last record is the commit: everything before it belongs to it.
    assert_eq!(recs.last().unwrap().action, Action::Commit);
}

#[test]
fn batched_output_over_the_walsender_carries_exactly_the_same_records() {
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("batch");
    exec(
        &mut db,
        &[
            "CREATE TABLE t (id int PRIMARY KEY, v text)",
            "SELECT pg_create_logical_replication_slot('one', 'saiki')",
            "SELECT pg_create_logical_replication_slot('many', 'saiki')",
            "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g",
            "UPDATE t SET v = v || '!' WHERE id % 3 = 0",
            "DELETE FROM t WHERE id % 5 = 0",
        ],
    );
    let end = current_wal_lsn(&mut db);
    let read = |slot: &str, opts: &[&str]| recvlogical(&pg, "batch", slot, &end, opts);
    let one = read("one", &[]);
    let many = read("many", &["batch-bytes=8192"]);
    assert_eq!(
        one.len(),
        3000 + 1000 + 600 + 6,
        "3 transactions: B and C each"
    );
    assert_eq!(one, many, "batching changes the framing, never the records");
}
