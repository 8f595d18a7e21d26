//! How an event type of the event API becomes an ODS table (docs/ingest.md, "In the ODS").
//! Pure: no I/O. Shared by the event API, which refuses event types the ODS could not hold,
//! by the sink, which materializes their events, and by the lake, which keeps them as rows of
//! Iceberg tables.
//!
//! An event type `parcel.packed` becomes `{ods_schema}.ev_parcel_packed`: one column per
//! top-level property of its JSON Schema (types in [`column_type`]), then the metadata
//! columns ([`METADATA_COLUMNS`]). Without a declared `key`, the table is append-only, keyed
//! by `eid`, so that an event delivered twice is one row; with a key (top-level, required
//! properties), each key holds its latest event.
//!
//! Invariant: a layout's columns never collide: properties are refused when they take a
//! metadata column's name or the sink's `_saiki_` prefix, and every declared key column is a
//! property the schema requires.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use saiki_core::view::Fields;
use serde_json::Value;

/// The layouts of the event types met so far, by type and schema version; `Err`: why its
/// events go to the dead-letter topic.
pub(crate) type EventTables = HashMap<(String, i32), Result<Arc<EventTable>, String>>;

/// The metadata columns of every event table: column, field of `metadata`, PostgreSQL type.
pub(crate) const METADATA_COLUMNS: [(&str, &str, &str); 5] = [
    ("eid", "eid", "uuid"),
    ("occurred_at", "occurred_at", "timestamptz"),
    ("received_at", "received_at", "timestamptz"),
    ("flow_id", "flow_id", "text"),
    ("schema_version", "version", "int"),
];

/// The prefix of the sink's own columns (`_saiki_source`, …), which properties cannot take.
const RESERVED_PREFIX: &str = "_saiki_";

/// PostgreSQL's identifier limit (NAMEDATALEN - 1): longer names are silently truncated.
const MAX_IDENTIFIER: usize = 63;
/// The longest event type name whose table name (`ev_` and the name) fits.
pub(crate) const MAX_NAME: usize = MAX_IDENTIFIER - 3;

/// The ODS table of an event type: `ev_` and the name in lower case, with `.` and `-` as `_`.
pub(crate) fn table_name(event_type: &str) -> Result<String, String> {
    let mut t = String::with_capacity(event_type.len() + 3);
    t.push_str("ev_");
    for c in event_type.chars() {
        t.push(match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        });
    }
    if t.len() > MAX_IDENTIFIER {
        return Err(format!(
            "the ODS table name {t} would be longer than PostgreSQL's {MAX_IDENTIFIER} bytes: choose an event type name of at most {MAX_NAME} characters"
        ));
    }
    Ok(t)
}

/// An event type's ODS table at one schema version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventTable {
    pub(crate) event_type: String,
    pub(crate) table: String,
    /// Key column names: the declared key, or `eid`.
    pub(crate) key: Vec<String>,
    /// Property columns (name and PostgreSQL type) in the schema's order.
    pub(crate) properties: Vec<(String, &'static str)>,
}

/// The single property a key pointer names (`/parcel_id` → `parcel_id`), or why it cannot
/// be a key column.
fn key_property(pointer: &str) -> Result<String, String> {
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "key {pointer:?} is not a JSON pointer (\"/field\")"
        ));
    };
    if rest.contains('/') {
        return Err(format!(
            "key {pointer:?} points into a nested object: a key must be a top-level property"
        ));
    }
    Ok(rest.replace("~1", "/").replace("~0", "~"))
}

/// The layout of an event type's table at a schema version, or why the ODS cannot hold it.
pub(crate) fn layout(
    event_type: &str,
    schema: &Value,
    key: Option<&[String]>,
) -> Result<EventTable, String> {
    let table = table_name(event_type)?;
    let properties = schema.get("properties").and_then(Value::as_object);
    let mut cols = Vec::new();
    for (name, prop) in properties.into_iter().flatten() {
        if METADATA_COLUMNS.iter().any(|m| m.0 == name) || name.starts_with(RESERVED_PREFIX) {
            return Err(format!(
                "property {name:?} takes the name of a column the ODS table {table} keeps for itself (the metadata columns {}, and names starting with {RESERVED_PREFIX}): rename the property",
                METADATA_COLUMNS.map(|m| m.0).join(", ")
            ));
        }
        if name == "metadata" {
            continue; // the envelope's, checked by the event API
        }
        if name.is_empty() || name.len() > MAX_IDENTIFIER {
            return Err(format!(
                "property {name:?} cannot be a column name (1 to {MAX_IDENTIFIER} bytes)"
            ));
        }
        cols.push((name.clone(), column_type(prop)));
    }
    let key = match key {
        None | Some([]) => vec!["eid".to_string()],
        Some(pointers) => {
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let mut names = Vec::new();
            for p in pointers {
                let name = key_property(p)?;
                let Some((_, ty)) = cols.iter().find(|c| c.0 == name) else {
                    return Err(format!(
                        "key {p:?} is not a property of the schema: a key must be a declared top-level property"
                    ));
                };
                if *ty == "jsonb" {
                    return Err(format!(
                        "key {p:?} is an object, an array or of several types: a key must be a string, a number or a boolean"
                    ));
                }
                if !required.contains(&name.as_str()) {
                    return Err(format!(
                        "key {p:?} is not in the schema's `required`: a key column cannot be null"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!("key {p:?} is given twice"));
                }
                names.push(name);
            }
            names
        }
    };
    Ok(EventTable {
        event_type: event_type.to_string(),
        table,
        key,
        properties: cols,
    })
}

/// An event's top-level fields, its metadata fields, its type and schema version; `None` if
/// the payload is not an event; `Err` if it is one without a readable type or version.
#[allow(clippy::type_complexity)]
pub(crate) fn event_parts(
    payload: &[u8],
) -> Result<Option<(Cow<'_, str>, i32, Fields<'_>, Fields<'_>)>, String> {
    let Ok(body) = serde_json::from_slice::<Fields<'_>>(payload) else {
        return Ok(None);
    };
    if body.get("action").is_some() {
        return Ok(None);
    }
    let Some(md) = body
        .get("metadata")
        .and_then(|m| serde_json::from_str::<Fields<'_>>(m.get()).ok())
    else {
        return Ok(None);
    };
    let Some(ty) = md
        .get("event_type")
        .and_then(|t| serde_json::from_str::<Cow<'_, str>>(t.get()).ok())
    else {
        return Ok(None);
    };
    let version = md.get("version").and_then(|v| {
        serde_json::from_str::<Cow<'_, str>>(v.get())
            .ok()
            .and_then(|s| s.parse().ok())
            .or_else(|| serde_json::from_str::<i32>(v.get()).ok())
    });
    let Some(version) = version else {
        return Err(format!(
            "malformed event of type {ty}: metadata.version is not a schema version"
        ));
    };
    Ok(Some((ty, version, body, md)))
}

/// The PostgreSQL type of a property from its schema: `string` → `text` (`date-time` →
/// `timestamptz`, `date` → `date`, `uuid` → `uuid`), `integer` and `number` → `numeric` (so
/// that widening one to the other in a later version keeps the column), `boolean` →
/// `boolean`, anything else (objects, arrays, several types, no type) → `jsonb`. `null`
/// among the types only makes the column nullable, as every column is.
pub(crate) fn column_type(prop: &Value) -> &'static str {
    let types: Vec<&str> = match prop.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect(),
        _ => {
            // An `enum` of strings only is text; anything else untyped stays JSON.
            let strings = prop
                .get("enum")
                .and_then(Value::as_array)
                .is_some_and(|e| !e.is_empty() && e.iter().all(Value::is_string));
            return if strings { "text" } else { "jsonb" };
        }
    };
    match types.as_slice() {
        ["string"] => match prop.get("format").and_then(Value::as_str) {
            Some("date-time") => "timestamptz",
            Some("date") => "date",
            Some("uuid") => "uuid",
            _ => "text",
        },
        ["integer" | "number"] | ["integer", "number"] | ["number", "integer"] => "numeric",
        ["boolean"] => "boolean",
        _ => "jsonb",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_event_type_name_becomes_a_lower_case_table_name() {
        assert_eq!(table_name("parcel.packed").unwrap(), "ev_parcel_packed");
        assert_eq!(
            table_name("Order-Created.v2").unwrap(),
            "ev_order_created_v2"
        );
        assert!(table_name(&"x".repeat(60)).is_ok());
        let e = table_name(&"x".repeat(61)).unwrap_err();
        assert!(e.contains("at most 60 characters"), "{e}");
    }

    #[test]
    fn property_types_map_to_postgresql_types() {
        let cases = [
            (json!({"type": "string"}), "text"),
            (
                json!({"type": "string", "format": "date-time"}),
                "timestamptz",
            ),
            (
                json!({"type": ["string", "null"], "format": "uuid"}),
                "uuid",
            ),
            (json!({"type": "string", "format": "date"}), "date"),
            (json!({"type": "integer"}), "numeric"),
            (json!({"type": ["integer", "number"]}), "numeric"),
            (json!({"type": "number"}), "numeric"),
            (json!({"type": "boolean"}), "boolean"),
            (json!({"type": "object"}), "jsonb"),
            (
                json!({"type": "array", "items": {"type": "string"}}),
                "jsonb",
            ),
            (json!({"type": ["string", "integer"]}), "jsonb"),
            (json!({"enum": ["a", "b"]}), "text"),
            (json!({"enum": ["a", 1]}), "jsonb"),
            (json!({}), "jsonb"),
            (json!(true), "jsonb"),
        ];
        for (schema, want) in cases {
            assert_eq!(column_type(&schema), want, "{schema}");
        }
    }

    fn schema() -> Value {
        json!({"type": "object", "required": ["parcel_id", "n"],
               "properties": {"parcel_id": {"type": "string"}, "n": {"type": "integer"},
                              "items": {"type": "array"}, "note": {"type": "string"}}})
    }

    #[test]
    fn without_a_key_the_table_is_append_only_by_eid() {
        let t = layout("parcel.packed", &schema(), None).unwrap();
        assert_eq!(t.table, "ev_parcel_packed");
        assert_eq!(t.key, ["eid"]);
        let cols: Vec<(&str, &str)> = t.properties.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        assert_eq!(
            cols,
            [
                ("parcel_id", "text"),
                ("n", "numeric"),
                ("items", "jsonb"),
                ("note", "text")
            ]
        );
    }

    #[test]
    fn a_declared_key_must_be_required_scalar_top_level_properties() {
        let ok = layout("p", &schema(), Some(&["/parcel_id".into(), "/n".into()])).unwrap();
        assert_eq!(ok.key, ["parcel_id", "n"]);
        for (key, says) in [
            ("/note", "required"),
            ("/items", "a key must be a string"),
            ("/missing", "not a property"),
            ("/a/b", "nested"),
            ("parcel_id", "not a JSON pointer"),
        ] {
            let e = layout("p", &schema(), Some(&[key.to_string()])).unwrap_err();
            assert!(e.contains(says), "{key}: {e}");
        }
        let e = layout("p", &schema(), Some(&["/n".into(), "/n".into()])).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn properties_cannot_take_the_tables_own_column_names() {
        for name in ["eid", "occurred_at", "schema_version", "_saiki_source"] {
            let s = json!({"properties": {name: {"type": "string"}}});
            let e = layout("p", &s, None).unwrap_err();
            assert!(e.contains("rename the property"), "{name}: {e}");
        }
        let s = json!({"properties": {"metadata": {"type": "object"}, "a": {}}});
        assert_eq!(layout("p", &s, None).unwrap().properties.len(), 1);
    }
}
