//! Whether a new schema version of an event type keeps its compatibility rule. Pure.
//!
//! No maintained Rust crate decides whether one JSON Schema accepts everything another does
//! (that is a containment check, undecidable in general); this is a conservative structural
//! check over the keywords event schemas use, written for the event API:
//!
//! - `forward`: every event valid under the old version is valid under the new one, so
//!   producers that still send the old shape keep working. Allowed: adding optional
//!   properties, dropping `required` entries, widening a `type` (`integer` → `number`, adding
//!   a type), adding `enum` values, removing a constraint. Refused, with the pointer: a new
//!   required property, a narrowed or changed type, `additionalProperties: false` where
//!   there was none, a removed property under `additionalProperties: false`, removed `enum`
//!   values, a new or changed constraint (`minimum`, `maxLength`, `pattern`, `format`, …).
//! - `full`: forward in both directions (only changes that neither narrow nor widen: in
//!   practice, adding optional properties and changing descriptions).
//! - `none`: any valid schema.

use serde_json::Value;

/// An event type's rule for new schema versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Compatibility {
    None,
    Forward,
    Full,
}

impl Compatibility {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Compatibility::None => "none",
            Compatibility::Forward => "forward",
            Compatibility::Full => "full",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(Compatibility::None),
            "forward" => Some(Compatibility::Forward),
            "full" => Some(Compatibility::Full),
            _ => None,
        }
    }

    /// What breaks the rule from `old` to `new`: one line per problem, with a JSON pointer
    /// into the schema; empty when the new version is allowed.
    pub(crate) fn breaks(self, old: &Value, new: &Value) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            Compatibility::None => {}
            Compatibility::Forward => accepts_all(old, new, "", &mut out),
            Compatibility::Full => {
                accepts_all(old, new, "", &mut out);
                let mut back = Vec::new();
                accepts_all(new, old, "", &mut back);
                out.extend(back.into_iter().map(|b| {
                    format!("{b} (read backwards: the old version must accept every new event)")
                }));
            }
        }
        out
    }
}

/// Keywords that constrain a value; a new or changed one may refuse old events.
const CONSTRAINTS: &[&str] = &[
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "const",
    "not",
    "oneOf",
    "anyOf",
    "allOf",
    "$ref",
];

fn types(s: &Value) -> Option<Vec<String>> {
    match s.get("type")? {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
        ),
        _ => None,
    }
}

fn strings(s: &Value, key: &str) -> Vec<String> {
    s.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Pushes to `out` why `new` may refuse an instance that `old` accepts (at `path`).
fn accepts_all(old: &Value, new: &Value, path: &str, out: &mut Vec<String>) {
    let at = |p: &str| {
        if p.is_empty() {
            "/".to_string()
        } else {
            p.to_string()
        }
    };
    if new == &Value::Bool(true) || new.as_object().is_some_and(|m| m.is_empty()) {
        return;
    }
    if old == new {
        return;
    }
    if new == &Value::Bool(false) {
        out.push(format!("{}: the new schema refuses everything", at(path)));
        return;
    }
    match (types(old), types(new)) {
        (_, None) => {}
        (None, Some(n)) => out.push(format!(
            "{}: a type ({}) where there was none",
            at(path),
            n.join(", ")
        )),
        (Some(o), Some(n)) => {
            for t in &o {
                let kept = n.contains(t) || (t == "integer" && n.iter().any(|x| x == "number"));
                if !kept {
                    out.push(format!(
                        "{}: type {t} is no longer accepted (now {})",
                        at(path),
                        n.join(", ")
                    ));
                }
            }
        }
    }
    for k in CONSTRAINTS {
        if let Some(nv) = new.get(*k) {
            if old.get(*k) != Some(nv) {
                out.push(format!(
                    "{}: a new or changed constraint {k} = {nv}",
                    at(path)
                ));
            }
        }
    }
    if let Some(ne) = new.get("enum").and_then(Value::as_array) {
        match old.get("enum").and_then(Value::as_array) {
            None => out.push(format!("{}: an enum where there was none", at(path))),
            Some(oe) => {
                for v in oe {
                    if !ne.contains(v) {
                        out.push(format!("{}: enum value {v} removed", at(path)));
                    }
                }
            }
        }
    }
    let old_required = strings(old, "required");
    for r in strings(new, "required") {
        if !old_required.contains(&r) {
            out.push(format!("{path}/{r}: newly required"));
        }
    }
    let closed = |s: &Value| s.get("additionalProperties") == Some(&Value::Bool(false));
    if closed(new) && !closed(old) {
        out.push(format!(
            "{}: additionalProperties: false where other properties were allowed",
            at(path)
        ));
    }
    let empty = serde_json::Map::new();
    let old_props = old
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let new_props = new
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for (name, o) in old_props {
        let p = format!("{path}/{name}");
        match new_props.get(name) {
            Some(n) => accepts_all(o, n, &p, out),
            None if closed(new) => {
                out.push(format!("{p}: removed, and other properties are refused"))
            }
            None => {}
        }
    }
    if let (Some(o), Some(n)) = (old.get("items"), new.get("items")) {
        accepts_all(o, n, &format!("{path}/items"), out);
    } else if let (None, Some(n)) = (old.get("items"), new.get("items")) {
        accepts_all(&Value::Bool(true), n, &format!("{path}/items"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v1() -> Value {
        json!({"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"}, "qty": {"type": "integer"}, "state": {"enum": ["new", "packed"]}}})
    }

    #[test]
    fn forward_allows_optional_properties_and_widening() {
        let mut v2 = v1();
        v2["properties"]["note"] = json!({"type": "string"});
        v2["properties"]["qty"] = json!({"type": "number"});
        v2["properties"]["state"] = json!({"enum": ["new", "packed", "sent"]});
        assert_eq!(
            Compatibility::Forward.breaks(&v1(), &v2),
            Vec::<String>::new()
        );
        // Widening is one direction only.
        let full = Compatibility::Full.breaks(&v1(), &v2);
        assert!(full.iter().any(|b| b.contains("/qty")), "{full:?}");
    }

    #[test]
    fn forward_refuses_what_old_events_would_fail() {
        let mut v2 = v1();
        v2["required"] = json!(["id", "qty"]);
        v2["properties"]["id"] = json!({"type": "integer"});
        v2["properties"]["state"] = json!({"enum": ["new"]});
        v2["properties"]["qty"]["minimum"] = json!(1);
        v2["additionalProperties"] = json!(false);
        let b = Compatibility::Forward.breaks(&v1(), &v2);
        for want in [
            "/qty: newly required",
            "/id: type string",
            "/state: enum value \"packed\"",
            "/qty: a new or changed constraint minimum",
            "/: additionalProperties",
        ] {
            assert!(b.iter().any(|x| x.starts_with(want)), "{want} in {b:?}");
        }
        assert_eq!(Compatibility::None.breaks(&v1(), &v2), Vec::<String>::new());
    }

    #[test]
    fn full_allows_adding_an_optional_property() {
        let mut v2 = v1();
        v2["properties"]["note"] = json!({"type": "string"});
        assert_eq!(Compatibility::Full.breaks(&v1(), &v2), Vec::<String>::new());
    }
}
