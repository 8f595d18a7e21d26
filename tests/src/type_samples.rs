//! Sample values of every built-in type (and a few user-defined ones), shared by the
//! plugin's type test and the sink's.

/// The user-defined types the samples use.
pub const CUSTOM_TYPES: &str = "CREATE TYPE mood AS ENUM ('sad', 'happy', 'so \"so\"');
     CREATE TYPE pair AS (a int, b text);
     CREATE DOMAIN posint AS int CHECK (VALUE > 0);
     CREATE DOMAIN tags AS text[];";

/// (type, sample literals). Row k of the test table holds the k-th sample of every type
/// (NULL where a type has fewer samples); a last row is all NULL.
pub const SAMPLES: &[(&str, &[&str])] = &[
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
pub const NOT_STORABLE: &[(&str, &str)] = &[
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

pub fn column_name(ty: &str) -> String {
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

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Creates the custom types and `every_type (id int PRIMARY KEY, c_<type> <type>, …)`.
pub fn create_table(db: &mut postgres::Client, table: &str) {
    let cols: Vec<String> = SAMPLES
        .iter()
        .map(|(t, _)| format!("{} {t}", column_name(t)))
        .collect();
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, {})",
        cols.join(", ")
    ))
    .unwrap();
}

/// Inserts row k with the k-th sample of every type (NULL where there is none), one
/// transaction per row, and a last row of NULLs. Returns the number of rows.
pub fn insert_rows(db: &mut postgres::Client, table: &str) -> usize {
    let rows = SAMPLES.iter().map(|(_, s)| s.len()).max().unwrap_or(0) + 1;
    for r in 0..rows {
        let values: Vec<String> = SAMPLES
            .iter()
            .map(|(t, s)| match s.get(r) {
                Some(v) => format!("{}::{t}", quote_literal(v)),
                None => "NULL".to_string(),
            })
            .collect();
        db.batch_execute(&format!(
            "INSERT INTO {table} VALUES ({r}, {})",
            values.join(", ")
        ))
        .unwrap();
    }
    rows
}
