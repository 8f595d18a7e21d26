//! Every built-in type through the `saiki` plugin: each decoded value parses as JSON and
//! matches what PostgreSQL itself prints for it; the same rows through wal2json
//! (format-version 2) are compared and the differences reported.

use std::collections::BTreeMap;

use saiki_tests::{get_changes, PgCluster};
use serde_json::value::RawValue;
use serde_json::Value;

/// (type, sample literals). Row k of the test table holds the k-th sample of every type
/// (NULL where a type has fewer samples); a last row is all NULL.
const SAMPLES: &[(&str, &[&str])] = &[
    ("bool", &["true", "false"]),
    ("bytea", &[r"\x", r"\x00ff5c220a"]),
    ("\"char\"", &["a", "\\"]),
    ("name", &["name with \"quotes\""]),
    ("int8", &["9223372036854775807", "-9223372036854775808", "0"]),
    ("int2", &["-32768", "32767"]),
    ("int2vector", &["1 2 3"]),
    ("int4", &["-2147483648", "2147483647"]),
    ("regproc", &["now"]),
    ("text", &["", "quote \" backslash \\ newline\n tab\t żółw 🐢 ctrl \u{1} del \u{7f}", "{\"not\": \"json\"}"]),
    ("oid", &["4294967295", "0"]),
    ("tid", &["(0,1)"]),
    ("xid", &["42"]),
    ("cid", &["7"]),
    ("oidvector", &["1 2"]),
    ("json", &["{\"a\" : [1, 2.50, \"x\\u0000\"],\n \"b\" : null, \"a\": 2}", "  [1,  2]  ", "\"s\"", "null"]),
    ("xml", &["<a b=\"c\">d &amp; e</a>"]),
    ("xid8", &["18446744073709551615"]),
    ("point", &["(1.5,2)"]),
    ("lseg", &["[(0,0),(1,1)]"]),
    ("path", &["((0,0),(1,1),(2,0))"]),
    ("box", &["(1,1),(0,0)"]),
    ("polygon", &["((0,0),(1,1),(1,0))"]),
    ("line", &["{1,-1,0}"]),
    ("float4", &["NaN", "Infinity", "-Infinity", "1.17549435e-38", "3.4028235e+38", "-0", "0.1"]),
    ("float8", &["NaN", "Infinity", "-Infinity", "1e-307", "1.7976931348623157e+308", "0.1", "-0", "1e+20"]),
    ("circle", &["<(0,0),1>"]),
    ("money", &["$1,000.00", "-$0.01"]),
    ("macaddr", &["08:00:2b:01:02:03"]),
    ("inet", &["192.168.0.1/24", "::1"]),
    ("cidr", &["10.0.0.0/8"]),
    ("macaddr8", &["08:00:2b:01:02:03:04:05"]),
    ("aclitem", &["postgres=arwdDxt/postgres"]),
    ("bpchar(5)", &["ab"]),
    ("varchar(10)", &["x'y"]),
    ("date", &["2026-11-27", "infinity", "4713-01-01 BC"]),
    ("time", &["23:59:59.999999"]),
    ("timestamp", &["2026-11-27 05:19:58.123456", "-infinity"]),
    ("timestamptz", &["2026-11-27 05:19:58.123456+00", "infinity", "1999-12-31 23:59:59.999999+00"]),
    ("interval", &["1 year 2 mons -3 days 04:05:06.789"]),
    ("timetz", &["12:00:00+05:30"]),
    ("bit(3)", &["101"]),
    ("varbit", &["1010101"]),
    ("numeric", &["NaN", "Infinity", "-Infinity", "123456789012345678901234567890.123456789012345678901234567890",
        "-0.000000000000000000001", "0", "1e-50", "100"]),
    ("refcursor", &["cur"]),
    ("regprocedure", &["now()"]),
    ("regoper", &["||/"]),
    ("regoperator", &["+(integer,integer)"]),
    ("regclass", &["pg_class"]),
    ("regcollation", &["\"C\""]),
    ("regtype", &["integer"]),
    ("regrole", &["postgres"]),
    ("regnamespace", &["pg_catalog"]),
    ("uuid", &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("pg_lsn", &["16/B374D848"]),
    ("tsvector", &["a fat:2 cat"]),
    ("tsquery", &["fat & rat"]),
    ("regconfig", &["english"]),
    ("regdictionary", &["simple"]),
    ("jsonb", &["{\"big\": 123456789012345678901234567890, \"s\": \"\\u00e9\\n\", \"n\": null, \"f\": 1.50}", "[]"]),
    ("jsonpath", &["$.a[*] ? (@ > 1)"]),
    ("txid_snapshot", &["10:20:10,14,15"]),
    ("pg_snapshot", &["10:20:10,14,15"]),
    ("int4range", &["[1,5)", "empty"]),
    ("numrange", &["(1.5,2.5]"]),
    ("tsrange", &["[2026-01-01,2026-02-01)"]),
    ("tstzrange", &["[2026-01-01 00:00+00,infinity)"]),
    ("daterange", &["[2026-01-01,2026-02-01)"]),
    ("int8range", &["(,)"]),
    ("int4multirange", &["{[1,3), [5,7)}", "{}"]),
    ("nummultirange", &["{[1.5,2)}"]),
    ("tsmultirange", &["{[2026-01-01,2026-01-02)}"]),
    ("tstzmultirange", &["{[2026-01-01 00:00+00,2026-01-02 00:00+00)}"]),
    ("datemultirange", &["{[2026-01-01,2026-01-05)}"]),
    ("int8multirange", &["{[1,2)}"]),
    // Arrays, composite, domain, enum: the structured encodings.
    ("int4[]", &["{1,NULL,-3}", "{}", "[0:1]={7,8}"]),
    ("text[]", &["{{\"a b\",\"c\\\"d\"},{e,NULL}}", "{\"\"}"]),
    ("numeric[]", &["{1.50,NaN,-Infinity}"]),
    ("float8[]", &["{0.1,Infinity}"]),
    ("bool[]", &["{t,f,NULL}"]),
    ("timestamptz[]", &["{\"2026-11-27 05:19:58+00\",infinity}"]),
    ("jsonb[]", &["{\"{\\\"a\\\": 1}\",null}"]),
    ("bytea[]", &["{\"\\\\x00ff\"}"]),
    ("int8[][][]", &["{{{1,2},{3,4}},{{5,6},{7,8}}}"]),
    ("mood", &["happy", "so \"so\""]),
    ("pair", &["(7,seven)", "(,\"with \"\"quote\"\"\")"]),
    ("pair[]", &["{\"(1,x)\",NULL}"]),
    ("posint", &["5"]),
    ("tags", &["{x,y}"]),
];

/// Built-in types that cannot be stored from SQL input, with the reason.
const NOT_STORABLE: &[(&str, &str)] = &[
    (
        "pg_node_tree",
        "input is refused: only the server writes it",
    ),
    ("pg_ndistinct", "input is refused: only ANALYZE writes it"),
    (
        "pg_dependencies",
        "input is refused: only ANALYZE writes it",
    ),
    ("pg_mcv_list", "input is refused: only ANALYZE writes it"),
    ("pg_brin_bloom_summary", "input is refused: BRIN internal"),
    (
        "pg_brin_minmax_multi_summary",
        "input is refused: BRIN internal",
    ),
    ("gtsvector", "input is refused: GiST internal"),
];

fn column_name(ty: &str) -> String {
    let mut s = String::from("c_");
    for ch in ty.chars() {
        if ch.is_ascii_alphanumeric() {
            s.push(ch);
        } else if ch == '[' {
            s.push_str("_arr");
        }
    }
    s
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

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
    db.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy', 'so \"so\"');
         CREATE TYPE pair AS (a int, b text);
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE DOMAIN tags AS text[];",
    )
    .unwrap();

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

    let cols: Vec<String> = SAMPLES
        .iter()
        .map(|(t, _)| format!("{} {t}", column_name(t)))
        .collect();
    db.batch_execute(&format!(
        "CREATE TABLE every_type (id int PRIMARY KEY, {})",
        cols.join(", ")
    ))
    .unwrap();
    db.batch_execute(
        "SELECT pg_create_logical_replication_slot('s_saiki', 'saiki');
         SELECT pg_create_logical_replication_slot('s_wal2json', 'wal2json');",
    )
    .unwrap();
    let rows = SAMPLES.iter().map(|(_, s)| s.len()).max().unwrap() + 1;
    for r in 0..rows {
        let values: Vec<String> = SAMPLES
            .iter()
            .map(|(t, s)| match s.get(r) {
                Some(v) => format!("{}::{t}", quote_literal(v)),
                None => "NULL".to_string(),
            })
            .collect();
        db.batch_execute(&format!(
            "INSERT INTO every_type VALUES ({r}, {})",
            values.join(", ")
        ))
        .unwrap();
    }

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
