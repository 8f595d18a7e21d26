//! The README's first command, headless: `scripts/demo.sh --seconds N` streams changes through
//! the source relay into Kafka and the sink into the ODS, pushes events through the event API,
//! writes the changes into Iceberg tables (read back by PyIceberg), and leaves nothing running.

use std::process::Command;

#[test]
fn the_demo_streams_changes_into_the_ods_and_leaves_nothing_running() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        // 40 s: room for the sink's rebalances as the topics appear one by one (tansu takes
        // seconds for each), for the migration the demo runs at 4 s, and for its batch job
        // (6 s in, committed about 4 s later) to reach the ODS.
        .args(["--seconds", "40"])
        .env("SAIKI_DEMO_PORT", saiki_tests::loopback_port().to_string())
        .env(
            "SAIKI_DEMO_KAFKA_PORT",
            saiki_tests::loopback_port().to_string(),
        )
        .env(
            "SAIKI_DEMO_HTTP_PORT",
            saiki_tests::loopback_port().to_string(),
        )
        .env(
            "SAIKI_DEMO_SINK_HTTP_PORT",
            saiki_tests::loopback_port().to_string(),
        )
        .env(
            "SAIKI_DEMO_INGEST_PORT",
            saiki_tests::loopback_port().to_string(),
        )
        .env(
            "SAIKI_DEMO_INGEST_HTTP_PORT",
            saiki_tests::loopback_port().to_string(),
        )
        .env(
            "SAIKI_DEMO_LAKE_HTTP_PORT",
            saiki_tests::loopback_port().to_string(),
        )
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    // The last status line: time, changes, changes/s, Kafka acknowledged, slot lag, ODS
    // orders, freshness, events published through the event API, events in the ODS.
    let last = stdout
        .lines()
        .rev()
        .find(|l| {
            l.trim_start()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        })
        .unwrap_or_else(|| panic!("no status lines:\n{stdout}"));
    let cols: Vec<&str> = last.split_whitespace().collect();
    let changes: u64 = cols[1].parse().unwrap_or(0);
    let acked: u64 = cols[3].parse().unwrap_or(0);
    let ods_orders: u64 = cols[5].parse().unwrap_or(0);
    let events: u64 = cols.get(7).and_then(|c| c.parse().ok()).unwrap_or(0);
    let ods_events: u64 = cols.get(8).and_then(|c| c.parse().ok()).unwrap_or(0);
    assert!(
        events > 10,
        "events reached Kafka through the event API: {last}\n{stdout}"
    );
    assert!(
        ods_events > 5,
        "events reached the ODS table ev_parcel_packed: {last}\n{stdout}"
    );
    assert!(
        changes > 100 && acked > 100,
        "changes reached Kafka: {last}"
    );
    assert!(ods_orders > 10, "orders reached the ODS: {last}\n{stdout}");
    assert!(stdout.contains("nothing left running"), "{stdout}");
    // The batch job was streamed to Kafka while it ran, and reached the ODS whole (that it
    // does so in one ODS transaction is relay/tests/it/stream.rs's to show).
    let batch = stdout
        .lines()
        .find(|l| l.starts_with("[demo] batch job: "))
        .unwrap_or_else(|| panic!("no batch job line:\n{stdout}"));
    let streamed: u64 = batch["[demo] batch job: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(streamed >= 20000, "{batch}");
    assert!(
        batch.contains("ODS price_history: 20000 rows (of 20000), applied at its commit"),
        "{batch}\n{stdout}"
    );
    // The migrations mid-run reached the ODS (a column added, then renamed), the rows from
    // before them included.
    assert!(
        stdout.contains("migration at the source: ALTER TABLE orders ADD COLUMN")
            && stdout.contains("migration at the source: ALTER TABLE orders RENAME COLUMN")
            && stdout.contains("ODS orders without the migrated column's value: 0 "),
        "{stdout}"
    );
    // The lake: every row of the batch job in its Iceberg change-log table, and orders, as
    // PyIceberg reads them.
    // (The lost slot's resync may have added the table's rows again, as R.)
    assert!(
        stdout.lines().any(|l| l
            .starts_with("[demo] lake (PyIceberg): saiki.price_history_changes ")
            && l.contains("(I: 20000")),
        "{stdout}"
    );
    let lake_orders = stdout
        .lines()
        .find_map(|l| l.strip_prefix("[demo] lake (PyIceberg): saiki.orders_changes "))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(lake_orders > 10, "orders in the lake:\n{stdout}");
    // docs/lake.md's current-state query, run by DuckDB on the orders' change log.
    let current = stdout
        .lines()
        .find_map(|l| l.strip_prefix("[demo] lake (DuckDB): "))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        current > 10,
        "the orders' current state in DuckDB:\n{stdout}"
    );
    // The lake followed the migration's rename: one column under the new name.
    let lake_cols: Vec<&str> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("[demo] lake: saiki.orders_changes columns "))
        .and_then(|l| l.split(" (").next())
        .unwrap_or_else(|| panic!("no lake columns line:\n{stdout}"))
        .split(", ")
        .collect();
    assert!(
        lake_cols.contains(&"sales_channel") && !lake_cols.contains(&"channel"),
        "{lake_cols:?}\n{stdout}"
    );
    // The lost slot's W rows in the lake (whether the lake has them by the demo's end depends
    // on its commit_interval; relay/tests/it/lake.rs checks that they leave those orders out).
    assert!(
        stdout.contains("[demo] lake (DuckDB): orders deleted while the slot was gone still in the current state: "),
        "{stdout}"
    );
    // The lost slot: the relay resynced every table, and the five orders deleted while no
    // slot was there left the ODS through the sink's sweep.
    assert!(
        stdout.contains("[demo] lost slot: relay stopped, slot dropped, orders "),
        "{stdout}"
    );
    let lost = stdout
        .lines()
        .find(|l| l.starts_with("[demo] lost slot: resync "))
        .unwrap_or_else(|| panic!("no resync line:\n{stdout}"));
    assert!(
        lost.contains("resync done, 4/4 tables")
            && lost.contains("the sink swept 5 orders")
            && lost.ends_with("still in the ODS: 0"),
        "{lost}\n{stdout}"
    );
    let left = Command::new("pgrep")
        .args(["-f", "saiki-demo"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "processes left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
