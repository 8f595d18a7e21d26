//! PostgreSQL 15.20 loads only the output plugins listed in `output_plugin_libraries`
//! (docs/plugin.md). Without `saiki` there, the extension says so and says what to run; after
//! the DBA runs it, slots work.

use saiki_tests::{supports_output_plugin_libraries, PgCluster};

#[test]
fn a_server_without_saiki_in_output_plugin_libraries_gets_told_what_to_run() {
    if !supports_output_plugin_libraries() {
        // Older minor releases load every plugin; nothing to refuse. The rig installs 15.20.
        panic!("this PostgreSQL has no output_plugin_libraries: install postgresql-15 >= 15.20 (scripts/setup.sh)");
    }
    let pg = PgCluster::start(&["output_plugin_libraries = 'pgoutput, test_decoding'"]);
    pg.connect("postgres")
        .batch_execute("CREATE DATABASE shop")
        .unwrap();

    // CREATE EXTENSION warns, with the statement to run.
    let out = pg
        .client_cmd("psql")
        .args(["-X", "-d", "shop", "-c", "CREATE EXTENSION saiki"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "CREATE EXTENSION saiki: {stderr}");
    assert!(
        stderr.contains("WARNING") && stderr.contains("output_plugin_libraries"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "ALTER SYSTEM SET output_plugin_libraries = 'pgoutput', 'test_decoding', 'saiki'"
        ),
        "{stderr}"
    );

    let mut db = pg.connect("shop");
    let allowed: bool = db
        .query_one("SELECT saiki.plugin_allowed()", &[])
        .unwrap()
        .get(0);
    assert!(!allowed);
    // create_slot refuses with SQLSTATE 55000 and the hint.
    let err = db
        .query("SELECT * FROM saiki.create_slot('s')", &[])
        .unwrap_err();
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "55000");
    assert!(
        db_err
            .hint()
            .unwrap_or("")
            .contains("ALTER SYSTEM SET output_plugin_libraries"),
        "{db_err:?}"
    );
    // PostgreSQL's own refusal, for the record.
    let err = db
        .query(
            "SELECT pg_create_logical_replication_slot('s', 'saiki')",
            &[],
        )
        .unwrap_err();
    let msg = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(msg.contains("may not be used as an output plugin"), "{msg}");

    // The DBA runs the hint; now it works.
    // Exactly the statement of the hint (one literal per library).
    db.batch_execute(
        "ALTER SYSTEM SET output_plugin_libraries = 'pgoutput', 'test_decoding', 'saiki'",
    )
    .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let mut tries = 0;
    loop {
        let mut fresh = pg.connect("shop");
        if fresh
            .query_one("SELECT saiki.plugin_allowed()", &[])
            .unwrap()
            .get::<_, bool>(0)
        {
            break;
        }
        tries += 1;
        assert!(tries < 50, "reload did not take effect");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut db = pg.connect("shop");
    saiki_tests::exec(
        &mut db,
        &[
            "SELECT * FROM saiki.create_slot('s')",
            "CREATE TABLE t (id int PRIMARY KEY)",
            "INSERT INTO t VALUES (1)",
        ],
    );
    let n: i64 = db
        .query_one("SELECT count(*) FROM saiki.peek('s', NULL)", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        n, 6,
        "B, L, C of the CREATE TABLE (DDL capture), then B, I, C"
    );
    // pgoutput still loads: the hint did not lock out existing subscribers.
    db.batch_execute("SELECT pg_create_logical_replication_slot('p', 'pgoutput')")
        .unwrap();
}
