//! Every built-in type through the `saiki` plugin: each decoded value parses as JSON and
//! matches what PostgreSQL itself prints for it; the same rows through wal2json
//! (format-version 2) are compared and the differences reported.

use std::collections::BTreeMap;

use saiki_tests::type_samples::{column_name, CUSTOM_TYPES, NOT_STORABLE, SAMPLES};
use saiki_tests::{get_changes, PgCluster};
use serde_json::value::RawValue;
use serde_json::Value;

fn base_type_name(ty: &str) -> &str {
    ty.split('(').next().unwrap().trim_matches('"')
}

/// Compares one decoded value with PostgreSQL's text output of it. Returns why not, if not.
fn matches_text(ty: &str, raw: &str, pg_text: Option<&str>) -> Result<(), String> {
    let v: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON ({e}): {raw}"))?;
    let Some(text) = pg_text else {
        return if v.is_null() {
            Ok(())
        } else {
            Err(format!("expected null, got {raw}"))
        };
    };
    let base = base_type_name(ty);
    match &v {
        // Embedded JSON: a JSON null document looks like SQL NULL (documented in docs/types.md).
        Value::Null if matches!(base, "json" | "jsonb") && text == "null" => Ok(()),
        Value::Null => Err(format!("null for non-NULL {text:?}")),
        Value::Bool(b) => (text == if *b { "t" } else { "f" })
            .then_some(())
            .ok_or_else(|| format!("{raw} vs {text}")),
        Value::Number(_) => (raw == text)
            .then_some(())
            .ok_or_else(|| format!("number {raw} vs PostgreSQL's {text}")),
        Value::String(s) => {
            if matches!(base, "json" | "jsonb") {
                // A JSON string document, e.g. json '"s"'.
                let pg: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                return (pg == v)
                    .then_some(())
                    .ok_or_else(|| format!("{raw} vs {text}"));
            }
            (s == text)
                .then_some(())
                .ok_or_else(|| format!("string {s:?} vs PostgreSQL's {text:?}"))
        }
        Value::Array(_) | Value::Object(_) if matches!(base, "json" | "jsonb") => {
            let pg: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            (pg == v)
                .then_some(())
                .ok_or_else(|| format!("{raw} vs {text}"))
        }
        _ => Err(format!("structured value {raw} for scalar type {ty}")),
    }
}

/// The leaves of a (nested) JSON array as raw JSON text, with their depth, so that numbers
/// keep their digits exactly.
fn flatten(raw: &str, depth: usize, out: &mut Vec<(String, usize)>) {
    if raw.trim_start().starts_with('[') {
        let items: Vec<Box<RawValue>> = serde_json::from_str(raw).unwrap();
        items.iter().for_each(|i| flatten(i.get(), depth + 1, out));
    } else {
        out.push((raw.to_string(), depth));
    }
}

#[test]
fn every_builtin_type_decodes_to_json_that_matches_postgres_output() {
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("types");
    db.batch_execute(CUSTOM_TYPES).unwrap();

    // Every storable built-in type is covered (or listed as not storable, with the reason).
    let builtin: Vec<String> = db
        .query(
            "SELECT typname::text FROM pg_type WHERE typnamespace = 'pg_catalog'::regnamespace
             AND typtype IN ('b', 'r', 'm') AND typelem = 0 AND typname NOT LIKE '\\_%' AND typisdefined
             AND typinput <> 'shell_in'::regproc",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let covered: Vec<String> = SAMPLES
        .iter()
        .map(|(t, _)| base_type_name(t).to_string())
        .chain([
            "bpchar".into(),
            "varchar".into(),
            "bit".into(),
            "char".into(),
        ])
        .collect();
    let missing: Vec<&String> = builtin
        .iter()
        .filter(|t| !covered.contains(t) && !NOT_STORABLE.iter().any(|(n, _)| n == t))
        .filter(|t| {
            !matches!(
                t.as_str(),
                "unknown" | "pg_ddl_command" | "cstring" | "void"
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "built-in types without samples: {missing:?}"
    );

    saiki_tests::type_samples::create_table(&mut db, "every_type");
    db.batch_execute(
        "SELECT pg_create_logical_replication_slot('s_saiki', 'saiki');
         SELECT pg_create_logical_replication_slot('s_wal2json', 'wal2json');",
    )
    .unwrap();
    let rows = saiki_tests::type_samples::insert_rows(&mut db, "every_type");

    // PostgreSQL's own text output of every value (simple protocol = output functions).
    let mut pg_text: BTreeMap<(i32, String), Option<String>> = BTreeMap::new();
    for msg in db
        .simple_query("SELECT * FROM every_type ORDER BY id")
        .unwrap()
    {
        if let postgres::SimpleQueryMessage::Row(row) = msg {
            let id: i32 = row.get(0).unwrap().parse().unwrap();
            for (i, c) in row.columns().iter().enumerate().skip(1) {
                pg_text.insert((id, c.name().to_string()), row.get(i).map(str::to_string));
            }
        }
    }

    let lines = get_changes(&mut db, "s_saiki", &["include-transaction", "0"]);
    assert_eq!(lines.len(), rows, "one I record per row");
    let mut failures = Vec::new();
    let mut ours: BTreeMap<(i32, String), Value> = BTreeMap::new();
    for line in &lines {
        let rec: serde_json::Map<String, Value> =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let raw_cols: BTreeMap<String, Box<RawValue>> = {
            let v: BTreeMap<String, Box<RawValue>> = serde_json::from_str(line).unwrap();
            serde_json::from_str(v["columns"].get()).unwrap()
        };
        let id = rec["columns"]["id"].as_i64().unwrap() as i32;
        for (ty, _) in SAMPLES {
            let col = column_name(ty);
            let raw = raw_cols
                .get(&col)
                .unwrap_or_else(|| panic!("column {col} missing in {line}"));
            let text = pg_text[&(id, col.clone())].as_deref();
            let value: Value = serde_json::from_str(raw.get()).unwrap();
            ours.insert((id, col.clone()), value.clone());
            let result = if *ty == "pair[]" || *ty == "pair" {
                check_composite(&mut db, &col, id, &value)
            } else if ty.ends_with("[]") || *ty == "tags" {
                check_array(&mut db, &col, id, raw.get())
            } else {
                matches_text(ty, raw.get(), text)
            };
            if let Err(e) = result {
                failures.push(format!("{ty} row {id}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "values that differ from PostgreSQL's output:\n{}",
        failures.join("\n")
    );

    // wal2json on the same rows: report where it differs from saiki and why.
    let w2j = get_changes(
        &mut db,
        "s_wal2json",
        &["format-version", "2", "include-transaction", "0"],
    );
    assert_eq!(w2j.len(), rows, "wal2json decoded every row");
    let mut report = String::from("| type | sample | saiki | wal2json |\n|---|---|---|---|\n");
    let mut differing = 0;
    for line in &w2j {
        let rec: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("wal2json output not JSON ({e}): {line}"));
        let cols = rec["columns"].as_array().unwrap();
        let id = cols.iter().find(|c| c["name"] == "id").unwrap()["value"]
            .as_i64()
            .unwrap() as i32;
        for c in cols {
            let name = c["name"].as_str().unwrap();
            if name == "id" {
                continue;
            }
            let theirs = &c["value"];
            let mine = &ours[&(id, name.to_string())];
            if mine != theirs {
                differing += 1;
                let ty = c["type"].as_str().unwrap_or("?");
                report.push_str(&format!("| {ty} | row {id} | `{mine}` | `{theirs}` |\n"));
            }
        }
    }
    println!("saiki vs wal2json format-version 2: {differing} differing values\n{report}");
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/types-vs-wal2json.md");
    let _ = std::fs::write(out, &report);
}

fn check_array(
    db: &mut postgres::Client,
    col: &str,
    id: i32,
    raw_value: &str,
) -> Result<(), String> {
    let value: Value = serde_json::from_str(raw_value).map_err(|e| e.to_string())?;
    let q = format!(
        "SELECT array_ndims({col}), (SELECT json_agg(e::text) FROM unnest({col}) e)::text, {col} IS NULL
         FROM every_type WHERE id = $1"
    );
    let row = db
        .query_one(q.as_str(), &[&id])
        .map_err(|e| e.to_string())?;
    let is_null: bool = row.get(2);
    if is_null {
        return value
            .is_null()
            .then_some(())
            .ok_or_else(|| format!("expected null, got {raw_value}"));
    }
    let ndims: Option<i32> = row.get(0);
    let texts: Vec<Option<String>> = row
        .get::<_, Option<String>>(1)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or_default();
    let mut leaves = Vec::new();
    flatten(raw_value, 0, &mut leaves);
    if texts.is_empty() {
        return (value == Value::Array(vec![]))
            .then_some(())
            .ok_or_else(|| format!("empty array as {raw_value}"));
    }
    if leaves.len() != texts.len() {
        return Err(format!(
            "{} elements, PostgreSQL has {}",
            leaves.len(),
            texts.len()
        ));
    }
    for ((raw, depth), text) in leaves.iter().zip(&texts) {
        if Some(*depth as i32) != ndims {
            return Err(format!(
                "element at depth {depth}, array has {ndims:?} dimensions"
            ));
        }
        let leaf: Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        let ok = match (&leaf, text) {
            (Value::Null, None) => true,
            (Value::Object(_), Some(t)) | (Value::Array(_), Some(t)) => {
                serde_json::from_str::<Value>(t)
                    .map(|p| p == leaf)
                    .unwrap_or(false)
            }
            (Value::Number(_), Some(t)) => raw == t,
            (Value::String(s), Some(t)) => s == t,
            (Value::Bool(b), Some(t)) => {
                t == if *b { "true" } else { "false" } || t == if *b { "t" } else { "f" }
            }
            _ => false,
        };
        if !ok {
            return Err(format!("element {raw} vs PostgreSQL's {text:?}"));
        }
    }
    Ok(())
}

fn check_composite(
    db: &mut postgres::Client,
    col: &str,
    id: i32,
    value: &Value,
) -> Result<(), String> {
    let q = format!("SELECT to_jsonb({col})::text FROM every_type WHERE id = $1");
    let row = db
        .query_one(q.as_str(), &[&id])
        .map_err(|e| e.to_string())?;
    let pg: Value = row
        .get::<_, Option<String>>(0)
        .map(|s| serde_json::from_str(&s).unwrap())
        .unwrap_or(Value::Null);
    (pg == *value)
        .then_some(())
        .ok_or_else(|| format!("{value} vs PostgreSQL's {pg}"))
}

/// The parts of a record a snapshot row shares with an insert.
#[derive(serde::Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    schema: &'a RawValue,
    #[serde(borrow)]
    table: &'a RawValue,
    #[serde(borrow)]
    key: &'a RawValue,
    #[serde(borrow)]
    columns: &'a RawValue,
    #[serde(borrow)]
    types: &'a RawValue,
}

#[test]
fn a_snapshot_chunk_encodes_every_type_byte_for_byte_as_the_plugin_encodes_an_insert() {
    let pg = PgCluster::start(&[]);
    let mut db = pg.create_db("types");
    db.batch_execute(CUSTOM_TYPES).unwrap();
    db.batch_execute("CREATE EXTENSION saiki").unwrap();
    saiki_tests::type_samples::create_table(&mut db, "every_type");
    db.batch_execute("SELECT pg_create_logical_replication_slot('s_saiki', 'saiki')")
        .unwrap();
    let rows = saiki_tests::type_samples::insert_rows(&mut db, "every_type");
    let inserts = get_changes(
        &mut db,
        "s_saiki",
        &["include-transaction", "0", "include-types", "1"],
    );
    assert_eq!(inserts.len(), rows);
    // Two chunks, to go through the keyset condition too.
    let half = (rows / 2) as i32;
    let mut snap: Vec<(Vec<Option<String>>, String)> = db
        .query(
            "SELECT key_text, record FROM saiki.snapshot_chunk('every_type', NULL, $1)",
            &[&half],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let last = snap.last().unwrap().0.clone();
    snap.extend(
        db.query(
            "SELECT key_text, record FROM saiki.snapshot_chunk('every_type', $1, 1000)",
            &[&last],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, Vec<Option<String>>>(0), r.get::<_, String>(1))),
    );
    assert_eq!(snap.len(), rows, "both chunks together are the table");
    for (i, (insert, (key_text, record))) in inserts.iter().zip(&snap).enumerate() {
        assert_eq!(key_text, &vec![Some(i.to_string())], "chunks in key order");
        let a: Body = serde_json::from_str(insert).unwrap();
        let b: Body = serde_json::from_str(record)
            .unwrap_or_else(|e| panic!("snapshot record is not JSON ({e}): {record}"));
        for (what, x, y) in [
            ("schema", a.schema, b.schema),
            ("table", a.table, b.table),
            ("key", a.key, b.key),
            ("columns", a.columns, b.columns),
            ("types", a.types, b.types),
        ] {
            assert_eq!(x.get(), y.get(), "row {i}: {what} differs");
        }
    }
}
