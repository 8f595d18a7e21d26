//! `ALTER EXTENSION saiki UPDATE` from every earlier version ends with exactly the objects of
//! a new install (saiki_pg/sql/saiki--OLD--NEW.sql), and DDL capture works on the tables that
//! were there before the update.

use std::process::Command;

use saiki_tests::{exec, get_changes, PgCluster, PG_BIN};

/// The extension's objects and the definitions of its functions, comparable across databases.
fn objects(db: &mut saiki_tests::postgres::Client) -> Vec<String> {
    db.query(
        "SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
                || coalesce(' = ' || md5(pg_get_functiondef(p.oid)), '')
         FROM pg_depend d
         JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'saiki'
         LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
         ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .chain(
        // The columns of its tables, in order: an added column is part of the update.
        db.query(
            "SELECT a.attrelid::regclass::text || '.' || a.attname || ' '
                    || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnum
             FROM pg_attribute a
             JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = a.attrelid
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'saiki'
             WHERE d.deptype = 'e' AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0)),
    )
    .chain(
        // The definitions of its views.
        db.query(
            "SELECT c.oid::regclass::text || ' = ' || md5(pg_get_viewdef(c.oid))
             FROM pg_class c
             JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
             JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'saiki'
             WHERE d.deptype = 'e' AND c.relkind = 'v'
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0)),
    )
    .collect()
}

#[test]
fn an_earlier_version_updates_to_exactly_what_a_new_install_has() {
    // PostgreSQL reads extension scripts from its share directory; cargo pgrx install copies
    // the update scripts, and the rig adds the full scripts of earlier versions it tests.
    let share = Command::new(format!("{PG_BIN}/pg_config"))
        .arg("--sharedir")
        .output()
        .expect("pg_config");
    let ext =
        std::path::PathBuf::from(String::from_utf8_lossy(&share.stdout).trim()).join("extension");
    let sql = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../saiki_pg/sql");
    for v in ["0.1.0", "0.2.0"] {
        let f = format!("saiki--{v}.sql");
        std::fs::copy(sql.join(&f), ext.join(&f))
            .unwrap_or_else(|e| panic!("install {f} (the tests run as root): {e}"));
    }

    let pg = PgCluster::start(&[]);
    let mut old = pg.create_db("old");
    exec(
        &mut old,
        &[
            "CREATE EXTENSION saiki VERSION '0.1.0'",
            "CREATE TABLE items (id int PRIMARY KEY, note text)",
        ],
    );
    exec(&mut old, &["ALTER EXTENSION saiki UPDATE"]);
    // 0.2.0 with a snapshot requested: the update keeps its row.
    let mut mid = pg.create_db("mid");
    exec(
        &mut mid,
        &[
            "CREATE EXTENSION saiki VERSION '0.2.0'",
            "CREATE TABLE items (id int PRIMARY KEY)",
            "SELECT saiki.request_snapshot('s', 'items')",
            "ALTER EXTENSION saiki UPDATE",
        ],
    );
    let kept = mid
        .query_one(
            "SELECT table_name || ' ' || state || ' ' || (sweep_before IS NULL) FROM saiki.snapshots",
            &[],
        )
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(kept, "public.items requested true");
    let mut new = pg.create_db("new");
    exec(&mut new, &["CREATE EXTENSION saiki"]);
    let version = |db: &mut saiki_tests::postgres::Client| -> String {
        db.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'saiki'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(version(&mut old), version(&mut new));
    assert_eq!(version(&mut mid), version(&mut new));
    let (o, m, n) = (objects(&mut old), objects(&mut mid), objects(&mut new));
    for object in [
        "event trigger saiki_ddl_command_end",
        "table saiki.slot_origins",
        "saiki.snapshots.sweep_before pg_lsn",
    ] {
        assert!(n.iter().any(|x| x.contains(object)), "{object}: {n:#?}");
    }
    assert_eq!(o, n, "an install updated from 0.1.0 differs from a new one");
    assert_eq!(m, n, "an install updated from 0.2.0 differs from a new one");

    // The update took the tables already there as the baseline: a rename is a rename.
    exec(
        &mut old,
        &[
            "SELECT pg_create_logical_replication_slot('s', 'saiki')",
            "ALTER TABLE items RENAME COLUMN note TO remark",
        ],
    );
    let changes = get_changes(&mut old, "s", &["include-transaction", "0"]);
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        changes[0]
            .contains(r#""changes":[{"change":"rename_column","from":"note","to":"remark"}]"#),
        "{}",
        changes[0]
    );
    exec(&mut old, &["SELECT pg_drop_replication_slot('s')"]);
}
