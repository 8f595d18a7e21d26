//! The pg_regress suite (`sql/*.sql` against `expected/*.out`, order in `sql/schedule`)
//! through real slots on a throw-away cluster, as contrib/test_decoding runs its own.

use std::path::Path;
use std::process::Command;

use saiki_tests::{PgCluster, PG_BIN};

const PG_REGRESS: &str = "/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress";

#[test]
fn regression_suite_matches_expected_output() {
    let pg = PgCluster::start(&[]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = pg.dir.join("regress");
    std::fs::create_dir_all(out.join("results")).unwrap();
    pg.connect("postgres")
        .batch_execute("CREATE DATABASE regression")
        .unwrap();
    let status = Command::new(PG_REGRESS)
        .arg("--use-existing")
        .arg(format!("--bindir={PG_BIN}"))
        .arg("--host=127.0.0.1")
        .arg(format!("--port={}", pg.port))
        .arg("--user=postgres")
        .arg("--dbname=regression")
        .arg(format!("--inputdir={}", root.display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!(
            "--schedule={}",
            root.join("sql/schedule").display()
        ))
        .env("PGTZ", "UTC")
        .env("PGDATESTYLE", "ISO, MDY")
        .status()
        .expect("run pg_regress");
    if !status.success() {
        let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
        // Keep the actual outputs for inspection next to the workspace's target dir.
        let keep = root.join("target/regress-results");
        let _ = std::fs::remove_dir_all(&keep);
        let _ = Command::new("cp")
            .arg("-r")
            .arg(out.join("results"))
            .arg(&keep)
            .status();
        panic!(
            "pg_regress failed (results copied to {}):\n{diffs}",
            keep.display()
        );
    }
}
