//! What the event API does to a batch of events before Kafka sees it. Pure: no I/O.
//!
//! A batch is all or nothing: every event is checked (its own fields against the event
//! type's JSON Schema, its `metadata` against the API's rules, its partition key present),
//! and only a batch without a single failure is enriched and produced. The report of a
//! refused batch names every failing event by index, with a JSON pointer and a reason, and
//! marks the others `aborted`, as Nakadi's publishing API does.

use serde_json::{Map, Value};

/// One failure of one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Failure {
    /// JSON pointer into the event (`""` for the event itself).
    pub(crate) pointer: String,
    pub(crate) reason: String,
}

/// The report item of one event of a refused batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ReportItem {
    pub(crate) index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) eid: Option<String>,
    /// `failed` (this event) or `aborted` (another event of the batch failed).
    pub(crate) publishing_status: &'static str,
    pub(crate) step: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) errors: Vec<Failure>,
}

/// The report of a refused batch, one item per event (empty when every event passed).
pub(crate) fn report(events: &[Value], failures: Vec<Vec<Failure>>) -> Vec<ReportItem> {
    if failures.iter().all(Vec::is_empty) {
        return Vec::new();
    }
    events
        .iter()
        .zip(failures)
        .enumerate()
        .map(|(index, (event, errors))| ReportItem {
            index,
            eid: event
                .pointer("/metadata/eid")
                .and_then(Value::as_str)
                .map(str::to_string),
            publishing_status: if errors.is_empty() {
                "aborted"
            } else {
                "failed"
            },
            step: "validating",
            detail: errors
                .iter()
                .map(|f| {
                    if f.pointer.is_empty() {
                        f.reason.clone()
                    } else {
                        format!("{}: {}", f.pointer, f.reason)
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
            errors,
        })
        .collect()
}

/// RFC 3339 `date-time`, as JSON Schema's format checks it.
static DATE_TIME: std::sync::LazyLock<jsonschema::Validator> = std::sync::LazyLock::new(|| {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&serde_json::json!({"type": "string", "format": "date-time"}))
        .expect("a valid schema")
});

/// The checks of the API's own: the event is an object; `metadata`, if given, is an object
/// whose `eid` is a UUID and whose `occurred_at` is an RFC 3339 time; every partition-key
/// field is present. The event type's schema is checked by the caller.
pub(crate) fn check_envelope(event: &Value, partition_key: &[String]) -> Vec<Failure> {
    let mut out = Vec::new();
    let Some(obj) = event.as_object() else {
        out.push(Failure {
            pointer: String::new(),
            reason: "an event is a JSON object".into(),
        });
        return out;
    };
    match obj.get("metadata") {
        None => {}
        Some(Value::Object(m)) => {
            if let Some(eid) = m.get("eid") {
                if eid
                    .as_str()
                    .is_none_or(|s| uuid::Uuid::parse_str(s).is_err())
                {
                    out.push(Failure {
                        pointer: "/metadata/eid".into(),
                        reason: "must be a UUID (or left out: the API assigns one)".into(),
                    });
                }
            }
            if let Some(t) = m.get("occurred_at") {
                if !DATE_TIME.is_valid(t) {
                    out.push(Failure {
                        pointer: "/metadata/occurred_at".into(),
                        reason: "must be an RFC 3339 time such as 2026-12-01T08:00:00Z (or left out: the time of receipt)".into(),
                    });
                }
            }
        }
        Some(_) => out.push(Failure {
            pointer: "/metadata".into(),
            reason: "must be an object".into(),
        }),
    }
    for p in partition_key {
        if event.pointer(p).is_none() {
            out.push(Failure {
                pointer: p.clone(),
                reason: "the partition key field is missing".into(),
            });
        }
    }
    out
}

/// The event without its `metadata`: what the event type's schema describes. Copied only
/// when there is a `metadata` to leave out.
pub(crate) fn body(event: &Value) -> std::borrow::Cow<'_, Value> {
    match event {
        Value::Object(m) if m.contains_key("metadata") => {
            let mut m = m.clone();
            m.remove("metadata");
            std::borrow::Cow::Owned(Value::Object(m))
        }
        other => std::borrow::Cow::Borrowed(other),
    }
}

/// What the API adds to every event of a request.
pub(crate) struct Stamp<'a> {
    pub(crate) event_type: &'a str,
    pub(crate) schema_version: i32,
    /// RFC 3339, the time the request was received.
    pub(crate) received_at: &'a str,
    pub(crate) flow_id: &'a str,
}

/// Fills the event's `metadata`: `eid` (a new UUID unless given), `occurred_at` (the time of
/// receipt unless given), `received_at`, `event_type`, `version` (the schema version it was
/// validated against) and `flow_id`. Returns the eid.
pub(crate) fn enrich(event: &mut Value, stamp: &Stamp<'_>) -> String {
    let Value::Object(obj) = event else {
        unreachable!("checked by check_envelope");
    };
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(m) = meta else {
        unreachable!("checked by check_envelope");
    };
    let eid = match m.get("eid").and_then(Value::as_str) {
        Some(e) => e.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    m.insert("eid".into(), Value::String(eid.clone()));
    m.entry("occurred_at")
        .or_insert_with(|| Value::String(stamp.received_at.to_string()));
    m.insert(
        "received_at".into(),
        Value::String(stamp.received_at.to_string()),
    );
    m.insert(
        "event_type".into(),
        Value::String(stamp.event_type.to_string()),
    );
    m.insert(
        "version".into(),
        Value::String(stamp.schema_version.to_string()),
    );
    m.insert("flow_id".into(), Value::String(stamp.flow_id.to_string()));
    eid
}

/// The Kafka key of an event: its partition-key values as a JSON array (`["A-17"]`), or
/// `None` without a partition key (the producer spreads such events).
pub(crate) fn key(event: &Value, partition_key: &[String]) -> Option<String> {
    if partition_key.is_empty() {
        return None;
    }
    let values: Vec<&Value> = partition_key
        .iter()
        .map(|p| event.pointer(p).unwrap_or(&Value::Null))
        .collect();
    serde_json::to_string(&values).ok()
}

/// A name for an event type: letters, digits, `_`, `-`, `.`; 1 to 60 characters (it
/// becomes part of a Kafka topic name and of an ODS table name, `ev_{name}`).
pub(crate) fn valid_name(name: &str) -> bool {
    (1..=crate::event_table::MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_envelope_checks_name_the_field_at_fault() {
        let pk = vec!["/order_id".to_string()];
        assert!(check_envelope(&json!({"order_id": 1}), &pk).is_empty());
        let f = check_envelope(
            &json!({"metadata": {"eid": "x", "occurred_at": "yesterday"}}),
            &pk,
        );
        let pointers: Vec<&str> = f.iter().map(|f| f.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            ["/metadata/eid", "/metadata/occurred_at", "/order_id"]
        );
        assert_eq!(check_envelope(&json!([1]), &pk)[0].pointer, "");
        assert_eq!(
            check_envelope(&json!({"metadata": 1, "order_id": 1}), &pk)[0].pointer,
            "/metadata"
        );
    }

    #[test]
    fn a_refused_batch_reports_every_event() {
        let events = vec![json!({"a": 1}), json!({"metadata": {"eid": "e"}})];
        assert!(report(&events, vec![vec![], vec![]]).is_empty());
        let r = report(
            &events,
            vec![
                vec![],
                vec![Failure {
                    pointer: "/a".into(),
                    reason: "missing".into(),
                }],
            ],
        );
        assert_eq!(r[0].publishing_status, "aborted");
        assert_eq!(
            (r[1].publishing_status, r[1].eid.as_deref()),
            ("failed", Some("e"))
        );
        assert_eq!(r[1].detail, "/a: missing");
    }

    #[test]
    fn enrichment_keeps_given_ids_and_times_and_adds_the_rest() {
        let stamp = Stamp {
            event_type: "parcel.packed",
            schema_version: 2,
            received_at: "2026-12-01T08:00:00.000000Z",
            flow_id: "f-1",
        };
        let mut e = json!({"id": 1, "metadata": {"eid": "8e4ed6a2-5c3b-4a0e-9d5c-4c1f6c2a7b10", "occurred_at": "2026-11-30T23:59:59Z"}});
        assert_eq!(
            enrich(&mut e, &stamp),
            "8e4ed6a2-5c3b-4a0e-9d5c-4c1f6c2a7b10"
        );
        assert_eq!(e["metadata"]["occurred_at"], "2026-11-30T23:59:59Z");
        assert_eq!(e["metadata"]["received_at"], "2026-12-01T08:00:00.000000Z");
        assert_eq!(e["metadata"]["version"], "2");
        let mut e = json!({"id": 1});
        let eid = enrich(&mut e, &stamp);
        assert!(uuid::Uuid::parse_str(&eid).is_ok());
        assert_eq!(e["metadata"]["occurred_at"], "2026-12-01T08:00:00.000000Z");
        assert_eq!(e["metadata"]["event_type"], "parcel.packed");
        assert_eq!(e["metadata"]["flow_id"], "f-1");
    }

    #[test]
    fn the_key_is_the_partition_key_values_and_the_body_leaves_metadata_out() {
        let e = json!({"order": {"id": "A-17"}, "n": 2, "metadata": {"eid": "x"}});
        assert_eq!(
            key(&e, &["/order/id".into(), "/n".into()]).as_deref(),
            Some(r#"["A-17",2]"#)
        );
        assert_eq!(key(&e, &[]), None);
        assert_eq!(*body(&e), json!({"order": {"id": "A-17"}, "n": 2}));
        assert!(matches!(
            body(&json!({"n": 1})),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(valid_name("parcel.packed_v2-x"));
        assert!(!valid_name("a/b") && !valid_name("") && !valid_name(&"x".repeat(61)));
    }
}
