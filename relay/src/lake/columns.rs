//! From change records to Iceberg rows, pure: table names, PostgreSQL types → Iceberg types,
//! JSON values → typed cells, cells → Arrow columns. The change-log table's columns are the
//! six `_saiki_*` columns, then the source table's columns in the order they were first seen
//! (a column seen later is added at the end: Iceberg schema evolution by name).

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder, Int32Builder,
    Int64Builder, ListBuilder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema as ArrowSchema};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use iceberg::spec::{PrimitiveType, Type};

pub(crate) const ACTION: &str = "_saiki_action";
pub(crate) const SOURCE: &str = "_saiki_source";
pub(crate) const COMMIT_LSN: &str = "_saiki_commit_lsn";
pub(crate) const SEQ: &str = "_saiki_seq";
pub(crate) const COMMIT_TS: &str = "_saiki_commit_ts";
pub(crate) const UNCHANGED: &str = "_saiki_unchanged";

/// The change-log table of a source table (DESIGN.md §9).
pub(crate) fn changes_table(schema: &str, table: &str) -> String {
    if schema == "public" {
        format!("{table}_changes")
    } else {
        format!("{schema}_{table}_changes")
    }
}

/// The Iceberg type of a PostgreSQL type (`format_type` name, as in the records' `types`).
/// Exact where Iceberg has the type; text otherwise (the value as PostgreSQL prints it).
pub(crate) fn iceberg_type(pg: &str) -> PrimitiveType {
    let t = pg.trim();
    if t.ends_with("[]") {
        return PrimitiveType::String;
    }
    if t.starts_with("timestamp(") {
        return if t.ends_with(" with time zone") {
            PrimitiveType::Timestamptz
        } else {
            PrimitiveType::Timestamp
        };
    }
    let base = t.split('(').next().unwrap_or(t).trim();
    match base {
        "smallint" | "integer" => PrimitiveType::Int,
        "bigint" | "oid" => PrimitiveType::Long,
        "real" => PrimitiveType::Float,
        "double precision" => PrimitiveType::Double,
        "boolean" => PrimitiveType::Boolean,
        "date" => PrimitiveType::Date,
        "timestamp" | "timestamp without time zone" => PrimitiveType::Timestamp,
        "timestamp with time zone" => PrimitiveType::Timestamptz,
        "numeric" => match numeric_typmod(t) {
            Some((p, s)) if p <= 38 => PrimitiveType::Decimal {
                precision: p,
                scale: s,
            },
            // Without a precision (or past Iceberg's 38 digits) the exact digits stay text.
            _ => PrimitiveType::String,
        },
        _ => PrimitiveType::String,
    }
}

fn numeric_typmod(t: &str) -> Option<(u32, u32)> {
    let inner = t.strip_prefix("numeric(")?.strip_suffix(')')?;
    let mut it = inner.split(',').map(|x| x.trim().parse::<u32>());
    let p = it.next()?.ok()?;
    let s = match it.next() {
        Some(s) => s.ok()?,
        None => 0,
    };
    Some((p, s))
}

/// One typed value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Bool(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    /// Unscaled.
    Decimal(i128),
    Date(i32),
    /// µs since the Unix epoch (UTC for `timestamptz`).
    Micros(i64),
    Str(String),
}

/// An event column's PostgreSQL type (`event_table`'s short names) as the records' `types`
/// spell it, for [`iceberg_type`]: `timestamptz` and `int` are the only ones that differ;
/// `uuid`, `jsonb`, `text` and `numeric` (no precision) stay strings.
pub(crate) fn event_pg_type(pg: &str) -> &str {
    match pg {
        "timestamptz" => "timestamp with time zone",
        "int" => "integer",
        other => other,
    }
}

/// A JSON value kept as its JSON text (a string column), `null` as null.
pub(crate) fn json_cell(raw: &str) -> Cell {
    match raw.trim() {
        "null" => Cell::Null,
        json => Cell::Str(json.to_string()),
    }
}

/// A value read as its column's former type, as the wider type the column took
/// (`schema::widens`); other values stay.
pub(crate) fn widen(cell: &mut Cell, to: &PrimitiveType) {
    match (&*cell, to) {
        (Cell::Int(v), PrimitiveType::Long) => *cell = Cell::Long(i64::from(*v)),
        (Cell::Float(v), PrimitiveType::Double) => *cell = Cell::Double(f64::from(*v)),
        _ => {}
    }
}

/// Reads a record's raw JSON value as the column's type; `Err` says why it cannot be.
pub(crate) fn cell(raw: &str, ty: &PrimitiveType) -> Result<Cell, String> {
    let raw = raw.trim();
    if raw == "null" {
        return Ok(Cell::Null);
    }
    let text: std::borrow::Cow<'_, str> = if raw.starts_with('"') {
        serde_json::from_str::<String>(raw)
            .map_err(|e| format!("bad JSON string {raw}: {e}"))?
            .into()
    } else {
        raw.into()
    };
    let bad = |what: &str| format!("{raw} is not {what}");
    Ok(match ty {
        PrimitiveType::String => {
            // Numbers, booleans and JSON values keep their text as the record has it.
            Cell::Str(text.into_owned())
        }
        PrimitiveType::Boolean => Cell::Bool(text.parse().map_err(|_| bad("a boolean"))?),
        PrimitiveType::Int => Cell::Int(text.parse().map_err(|_| bad("an int4"))?),
        PrimitiveType::Long => Cell::Long(text.parse().map_err(|_| bad("an int8"))?),
        PrimitiveType::Float => Cell::Float(float(&text).ok_or_else(|| bad("a float4"))? as f32),
        PrimitiveType::Double => Cell::Double(float(&text).ok_or_else(|| bad("a float8"))?),
        PrimitiveType::Decimal { scale, .. } => {
            if text == "NaN" {
                // Iceberg's decimal has no NaN (docs/lake.md, types).
                Cell::Null
            } else {
                Cell::Decimal(unscaled(&text, *scale).ok_or_else(|| bad("a decimal"))?)
            }
        }
        PrimitiveType::Date => Cell::Date(match &*text {
            "infinity" => i32::MAX,
            "-infinity" => i32::MIN,
            d => {
                let day = NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|_| bad("a date"))?;
                (day - NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days() as i32
            }
        }),
        PrimitiveType::Timestamp | PrimitiveType::Timestamptz => Cell::Micros(match &*text {
            // PostgreSQL's own representation of the infinities.
            "infinity" => i64::MAX,
            "-infinity" => i64::MIN,
            t => micros(t, matches!(ty, PrimitiveType::Timestamptz))
                .ok_or_else(|| bad("a timestamp"))?,
        }),
        other => return Err(format!("type {other} is not written by the lake")),
    })
}

fn float(t: &str) -> Option<f64> {
    match t {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

/// "-12.340" at scale 2 → -1234; more fractional digits than the scale is an error.
fn unscaled(t: &str, scale: u32) -> Option<i128> {
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    if frac.len() > scale as usize
        || int.is_empty() && frac.is_empty()
        || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let mut s = String::with_capacity(int.len() + scale as usize);
    s.push_str(int);
    s.push_str(frac);
    for _ in frac.len()..scale as usize {
        s.push('0');
    }
    let v: i128 = if s.is_empty() { 0 } else { s.parse().ok()? };
    Some(if neg { -v } else { v })
}

/// PostgreSQL's ISO output (`2026-12-02 17:35:00.5+01`, or without the zone) → µs, UTC.
fn micros(t: &str, zoned: bool) -> Option<i64> {
    if zoned {
        DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z")
            .or_else(|_| DateTime::parse_from_rfc3339(t))
            .ok()
            .map(|d| d.timestamp_micros())
    } else {
        NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f")
            .ok()
            .map(|d| d.and_utc().timestamp_micros())
    }
}

/// The commit time of a record (RFC 3339, the plugin's `commit_ts`) → µs.
pub(crate) fn commit_micros(ts: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|d| d.timestamp_micros())
}

/// One row of a change-log table: the `_saiki_*` values and the cells by column index
/// (into the table's columns after the six `_saiki_*` ones).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) action: char,
    pub(crate) source: String,
    pub(crate) commit_lsn: i64,
    pub(crate) seq: i64,
    pub(crate) commit_ts: Option<i64>,
    pub(crate) unchanged: Option<Vec<String>>,
    pub(crate) cells: Vec<(usize, Cell)>,
}

impl Row {
    /// Bytes it holds, roughly (for the round's size).
    pub(crate) fn size(&self) -> usize {
        64 + self.source.len()
            + self
                .cells
                .iter()
                .map(|(_, c)| match c {
                    Cell::Str(s) => 24 + s.len(),
                    _ => 24,
                })
                .sum::<usize>()
    }
}

/// The six `_saiki_*` columns, in order, with their Iceberg types and whether they are
/// always set.
pub(crate) fn system_columns() -> Vec<(&'static str, Type, bool)> {
    let p = |t| Type::Primitive(t);
    vec![
        (ACTION, p(PrimitiveType::String), true),
        (SOURCE, p(PrimitiveType::String), true),
        (COMMIT_LSN, p(PrimitiveType::Long), true),
        (SEQ, p(PrimitiveType::Long), true),
        (COMMIT_TS, p(PrimitiveType::Timestamptz), false),
        (UNCHANGED, Type::List(list_of_strings()), false),
    ]
}

/// `list<string>`; the element's field id is the table schema's (`table.rs`).
fn list_of_strings() -> iceberg::spec::ListType {
    iceberg::spec::ListType::new(
        iceberg::spec::NestedField::list_element(0, Type::Primitive(PrimitiveType::String), false)
            .into(),
    )
}

/// The rows as one Arrow batch of `schema` (the table's schema as Arrow, with field ids):
/// its first six fields are the `_saiki_*` columns, field `6 + i` is column index `i` of the
/// rows' cells.
pub(crate) fn to_batch(schema: &Arc<ArrowSchema>, rows: &[Row]) -> Result<RecordBatch, String> {
    let n = rows.len();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut action = StringBuilder::with_capacity(n, n);
    let mut source = StringBuilder::new();
    let mut lsn = Int64Builder::with_capacity(n);
    let mut seq = Int64Builder::with_capacity(n);
    let mut ts = TimestampMicrosecondBuilder::with_capacity(n);
    let element = match schema.field(5).data_type() {
        DataType::List(f) => f.clone(),
        other => return Err(format!("{UNCHANGED} is {other}, not a list")),
    };
    let mut unchanged = ListBuilder::new(StringBuilder::new()).with_field(element);
    for r in rows {
        action.append_value(r.action.to_string());
        source.append_value(&r.source);
        lsn.append_value(r.commit_lsn);
        seq.append_value(r.seq);
        ts.append_option(r.commit_ts);
        match &r.unchanged {
            Some(cols) => {
                for c in cols {
                    unchanged.values().append_value(c);
                }
                unchanged.append(true);
            }
            None => unchanged.append(false),
        }
    }
    arrays.push(Arc::new(action.finish()));
    arrays.push(Arc::new(source.finish()));
    arrays.push(Arc::new(lsn.finish()));
    arrays.push(Arc::new(seq.finish()));
    arrays.push(Arc::new(
        ts.finish()
            .with_data_type(schema.field(4).data_type().clone()),
    ));
    arrays.push(Arc::new(unchanged.finish()));
    // The cells by column, once: each row's cells are few and in the record's order, so a
    // lookup per column and row would cost columns² per row.
    let ncols = schema.fields().len().saturating_sub(6);
    let mut by_col: Vec<Vec<Option<&Cell>>> = vec![vec![None; n]; ncols];
    for (ri, r) in rows.iter().enumerate() {
        for (c, v) in &r.cells {
            if *v != Cell::Null {
                if let Some(col) = by_col.get_mut(*c) {
                    col[ri] = Some(v);
                }
            }
        }
    }
    for (i, field) in schema.fields().iter().enumerate().skip(6) {
        let cells = &by_col[i - 6];
        let mismatch =
            |c: &Cell| format!("column {} ({}) got {c:?}", field.name(), field.data_type());
        macro_rules! build {
            ($builder:expr, $pat:pat => $v:expr) => {{
                let mut b = $builder;
                for cell in cells {
                    match cell {
                        None => b.append_null(),
                        Some($pat) => b.append_value($v),
                        Some(other) => return Err(mismatch(other)),
                    }
                }
                Arc::new(b.finish()) as ArrayRef
            }};
        }
        let array = match field.data_type() {
            DataType::Boolean => build!(BooleanBuilder::with_capacity(n), Cell::Bool(v) => *v),
            DataType::Int32 => build!(Int32Builder::with_capacity(n), Cell::Int(v) => *v),
            DataType::Int64 => build!(Int64Builder::with_capacity(n), Cell::Long(v) => *v),
            DataType::Float32 => build!(Float32Builder::with_capacity(n), Cell::Float(v) => *v),
            DataType::Float64 => build!(Float64Builder::with_capacity(n), Cell::Double(v) => *v),
            DataType::Date32 => build!(Date32Builder::with_capacity(n), Cell::Date(v) => *v),
            DataType::Utf8 => build!(StringBuilder::new(), Cell::Str(v) => v),
            DataType::Decimal128(p, s) => {
                let a = build!(Decimal128Builder::with_capacity(n), Cell::Decimal(v) => *v);
                let d = a
                    .as_any()
                    .downcast_ref::<arrow_array::Decimal128Array>()
                    .expect("built as decimal")
                    .clone()
                    .with_precision_and_scale(*p, *s)
                    .map_err(|e| format!("column {}: {e}", field.name()))?;
                Arc::new(d) as ArrayRef
            }
            DataType::Timestamp(_, _) => {
                let a =
                    build!(TimestampMicrosecondBuilder::with_capacity(n), Cell::Micros(v) => *v);
                let t = a
                    .as_any()
                    .downcast_ref::<arrow_array::TimestampMicrosecondArray>()
                    .expect("built as timestamp")
                    .clone()
                    .with_data_type(field.data_type().clone());
                Arc::new(t) as ArrayRef
            }
            other => {
                return Err(format!(
                    "column {}: type {other} is not written",
                    field.name()
                ))
            }
        };
        arrays.push(array);
    }
    RecordBatch::try_new(schema.clone(), arrays).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_outside_public_carry_their_schema_in_the_name() {
        assert_eq!(changes_table("public", "orders"), "orders_changes");
        assert_eq!(changes_table("billing", "orders"), "billing_orders_changes");
    }

    #[test]
    fn postgres_types_map_to_iceberg_types_exactly_where_iceberg_has_them() {
        use PrimitiveType as P;
        assert_eq!(iceberg_type("integer"), P::Int);
        assert_eq!(iceberg_type("bigint"), P::Long);
        assert_eq!(
            iceberg_type("numeric(10,2)"),
            P::Decimal {
                precision: 10,
                scale: 2
            }
        );
        assert_eq!(iceberg_type("numeric"), P::String);
        assert_eq!(iceberg_type("numeric(60,2)"), P::String);
        assert_eq!(iceberg_type("timestamp with time zone"), P::Timestamptz);
        assert_eq!(iceberg_type("timestamp(3) with time zone"), P::Timestamptz);
        assert_eq!(iceberg_type("timestamp without time zone"), P::Timestamp);
        assert_eq!(iceberg_type("jsonb"), P::String);
        assert_eq!(iceberg_type("integer[]"), P::String);
        assert_eq!(iceberg_type("character varying(20)"), P::String);
    }

    #[test]
    fn values_are_read_as_their_column_type() {
        use PrimitiveType as P;
        let dec = P::Decimal {
            precision: 10,
            scale: 2,
        };
        assert_eq!(cell("59.9", &dec), Ok(Cell::Decimal(5990)));
        assert_eq!(cell("-0.05", &dec), Ok(Cell::Decimal(-5)));
        assert_eq!(cell("\"NaN\"", &dec), Ok(Cell::Null));
        assert!(cell("1.234", &dec).is_err());
        assert_eq!(cell("42", &P::Int), Ok(Cell::Int(42)));
        assert!(cell("\"x\"", &P::Int).unwrap_err().contains("int4"));
        assert_eq!(cell("null", &P::Long), Ok(Cell::Null));
        assert_eq!(
            cell("\"2026-12-02 17:35:00.5+01\"", &P::Timestamptz),
            Ok(Cell::Micros(1_796_232_900_500_000 - 3_600_000_000))
        );
        assert_eq!(
            cell("\"2026-12-02 17:35:00+05:30\"", &P::Timestamptz),
            Ok(Cell::Micros(1_796_232_900_000_000 - 19_800_000_000))
        );
        assert_eq!(
            cell("\"2026-12-02 17:35:00\"", &P::Timestamp),
            Ok(Cell::Micros(1_796_232_900_000_000))
        );
        assert_eq!(
            cell("\"infinity\"", &P::Timestamptz),
            Ok(Cell::Micros(i64::MAX))
        );
        assert_eq!(cell("\"1970-01-02\"", &P::Date), Ok(Cell::Date(1)));
        assert_eq!(
            cell("\"NaN\"", &P::Double).map(|c| format!("{c:?}")),
            Ok("Double(NaN)".into())
        );
        assert_eq!(
            cell("{\"a\": 1}", &P::String),
            Ok(Cell::Str("{\"a\": 1}".into()))
        );
        assert_eq!(
            cell("\"tab\\t\"", &P::String),
            Ok(Cell::Str("tab\t".into()))
        );
        assert_eq!(
            commit_micros("2026-12-02T17:35:00.000001Z"),
            Some(1_796_232_900_000_001)
        );
    }
}
