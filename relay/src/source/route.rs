//! Where a change record goes in Kafka (docs/relay.md, "What it does"): topic, key, value, headers. Pure.
//!
//! The record is parsed only as far as routing needs (top-level keys; column values stay raw
//! JSON text, so numbers keep their digits); the value is the record's own bytes with
//! `"source"` added before the closing brace, never re-serialized.

use std::borrow::Cow;
use std::collections::HashMap;

use saiki_core::encode::ObjectWriter;
use saiki_core::record::Action;
use serde_json::value::RawValue;

/// The routing view of one record: the core's reader, column objects kept raw.
pub(crate) type RecordView<'a> = saiki_core::view::RecordView<'a, &'a RawValue>;

/// Why a record could not be routed: the plugin wrote something this relay does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable change record ({reason}): {excerpt}")]
pub(crate) struct RouteError {
    pub(crate) reason: String,
    pub(crate) excerpt: String,
}

/// Reads a record to route it.
pub(crate) fn parse(bytes: &[u8]) -> Result<RecordView<'_>, RouteError> {
    RecordView::parse(bytes).map_err(|e| RouteError {
        reason: e.to_string(),
        excerpt: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
    })
}

/// The Kafka keys of a record.
pub(crate) trait Keys {
    /// The Kafka key: `{"col": value, …}` of the key columns, from the new row (I, U) or the
    /// old key (D). `None` for records without a key (no replica identity, T, M, B, C).
    fn key_json(&self) -> Option<String>;
    /// For an update that changed the key: the old key, which differs from
    /// [`Keys::key_json`]. The relay sends such an update under both keys, so that the old
    /// key's partition (where its earlier changes are, in order) also learns that the old
    /// row is gone.
    fn old_key_json(&self) -> Option<String>;
}

impl<'a> Keys for RecordView<'a> {
    /// The Kafka key: `{"col": value, …}` of the key columns, from the new row (I, U) or the
    /// old key (D). `None` for records without a key (no replica identity, T, M, B, C).
    fn key_json(&self) -> Option<String> {
        match self.action {
            Action::Delete => key_from(self, self.identity, None),
            _ => key_from(self, self.columns, self.identity),
        }
    }

    fn old_key_json(&self) -> Option<String> {
        if self.action != Action::Update {
            return None;
        }
        let old = key_from(self, self.identity, None)?;
        (Some(&old) != self.key_json().as_ref()).then_some(old)
    }
}

/// `{"col": value, …}` of the record's key columns, each from `primary` or else `fallback`.
fn key_from<'a>(
    rec: &RecordView<'a>,
    primary: Option<&'a RawValue>,
    fallback: Option<&'a RawValue>,
) -> Option<String> {
    let names = rec.key.as_ref()?;
    if names.is_empty() {
        return None;
    }
    let object = |raw: Option<&'a RawValue>| -> Option<HashMap<Cow<'a, str>, &'a RawValue>> {
        raw.and_then(|r| serde_json::from_str(r.get()).ok())
    };
    let primary = object(primary);
    let fallback = object(fallback);
    let mut out = Vec::with_capacity(64);
    let mut obj = ObjectWriter::open(&mut out);
    for name in names {
        let v = primary
            .as_ref()
            .and_then(|m| m.get(name.as_ref()))
            .or_else(|| fallback.as_ref().and_then(|m| m.get(name.as_ref())))?;
        obj.field_str(&mut out, name.as_bytes());
        out.extend_from_slice(v.get().as_bytes());
    }
    obj.close(&mut out);
    String::from_utf8(out).ok()
}

/// The message value: the record with `"source":"<name>"` added at the end.
pub(crate) fn value_with_source(record: &[u8], source_json: &[u8]) -> Vec<u8> {
    value_with_members(record, &[], source_json)
}

/// The record with extra members (`,"k":v…`, already JSON) and then `"source"` added.
pub(crate) fn value_with_members(record: &[u8], members: &[u8], source_json: &[u8]) -> Vec<u8> {
    let body = record.strip_suffix(b"}").unwrap_or(record);
    let mut v = Vec::with_capacity(record.len() + members.len() + source_json.len() + 12);
    v.extend_from_slice(body);
    v.extend_from_slice(members);
    v.extend_from_slice(b",\"source\":");
    v.extend_from_slice(source_json);
    v.push(b'}');
    v
}

/// Topic names from a template with `{prefix}`, `{source}`, `{schema}`, `{table}`.
#[derive(Debug, Clone)]
pub(crate) struct TopicTemplate {
    template: String,
    prefix: String,
    source: String,
    transactions: std::sync::Arc<str>,
    messages: std::sync::Arc<str>,
}

impl TopicTemplate {
    pub(crate) fn new(template: &str, prefix: &str, source: &str) -> Self {
        TopicTemplate {
            template: template.to_string(),
            prefix: prefix.to_string(),
            source: source.to_string(),
            transactions: sanitize_topic(&format!("{prefix}.transactions")).into(),
            messages: sanitize_topic(&format!("{prefix}.messages")).into(),
        }
    }

    /// The topic of a table's changes. Characters Kafka does not allow in topic names
    /// (anything but `[A-Za-z0-9._-]`) become `_`.
    pub(crate) fn table_topic(&self, schema: &str, table: &str) -> String {
        let t = self
            .template
            .replace("{prefix}", &self.prefix)
            .replace("{source}", &self.source)
            .replace("{schema}", schema)
            .replace("{table}", table);
        sanitize_topic(&t)
    }

    /// `{prefix}.transactions`: B and C records.
    pub(crate) fn transactions_topic(&self) -> std::sync::Arc<str> {
        self.transactions.clone()
    }

    /// `{prefix}.messages`: logical messages other than heartbeats.
    pub(crate) fn messages_topic(&self) -> std::sync::Arc<str> {
        self.messages.clone()
    }
}

pub(crate) fn sanitize_topic(t: &str) -> String {
    t.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The headers of every message (docs/relay.md, "What it does").
pub(crate) fn headers(source: &str, rec: &RecordView<'_>) -> [(&'static str, String); 4] {
    [
        ("saiki.source", source.to_string()),
        ("saiki.lsn", rec.lsn.to_string()),
        (
            "saiki.commit_lsn",
            rec.commit_lsn.map(|l| l.to_string()).unwrap_or_default(),
        ),
        ("saiki.xid", rec.xid.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_new_row_or_the_old_key() {
        let ins = br#"{"action":"I","xid":1,"lsn":"0/1","commit_lsn":"0/2","seq":1,"schema":"public","table":"orders","key":["id","region"],"columns":{"region":"eu","id":42,"total":1.50}}"#;
        let v = parse(ins).unwrap();
        assert_eq!(v.key_json().unwrap(), r#"{"id":42,"region":"eu"}"#);
        let del = br#"{"action":"D","xid":1,"lsn":"0/1","commit_lsn":"0/2","seq":1,"schema":"public","table":"orders","key":["id"],"identity":{"id":7}}"#;
        assert_eq!(parse(del).unwrap().key_json().unwrap(), r#"{"id":7}"#);
        let moved = br#"{"action":"U","xid":1,"lsn":"0/1","commit_lsn":"0/2","seq":1,"schema":"public","table":"t","key":["id"],"columns":{"id":2,"v":1},"identity":{"id":1}}"#;
        let v = parse(moved).unwrap();
        assert_eq!(v.key_json().unwrap(), r#"{"id":2}"#);
        assert_eq!(v.old_key_json().unwrap(), r#"{"id":1}"#);
        let same = br#"{"action":"U","xid":1,"lsn":"0/1","commit_lsn":"0/2","seq":1,"schema":"public","table":"t","key":["id"],"columns":{"id":1,"v":1},"identity":{"id":1,"v":0}}"#;
        assert_eq!(parse(same).unwrap().old_key_json(), None);
        let nokey = br#"{"action":"U","xid":1,"lsn":"0/1","commit_lsn":"0/2","seq":1,"schema":"public","table":"t","key":[],"columns":{"a":1}}"#;
        assert_eq!(parse(nokey).unwrap().key_json(), None);
    }

    #[test]
    fn an_unchanged_toasted_key_is_taken_from_the_identity() {
        let upd = br#"{"action":"U","xid":1,"lsn":"0/1","commit_lsn":"0/2","seq":1,"schema":"s","table":"t","key":["k"],"columns":{"v":1},"identity":{"k":"long"},"unchanged_toast":["k"]}"#;
        assert_eq!(parse(upd).unwrap().key_json().unwrap(), r#"{"k":"long"}"#);
    }

    #[test]
    fn the_value_is_the_record_with_its_source() {
        let v = value_with_source(br#"{"action":"B","xid":1}"#, br#""shard1""#);
        assert_eq!(v, br#"{"action":"B","xid":1,"source":"shard1"}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(parsed["source"], "shard1");
    }

    #[test]
    fn topics_follow_the_template_and_kafka_naming_rules() {
        let t = TopicTemplate::new("{prefix}.{schema}.{table}", "saiki", "shard1");
        assert_eq!(t.table_topic("public", "orders"), "saiki.public.orders");
        assert_eq!(
            t.table_topic("public", "odd name/ü"),
            "saiki.public.odd_name__"
        );
        assert_eq!(&*t.transactions_topic(), "saiki.transactions");
        let t = TopicTemplate::new("{source}-{table}", "p", "s1");
        assert_eq!(t.table_topic("x", "y"), "s1-y");
    }

    #[test]
    fn garbage_is_a_route_error_not_a_panic() {
        assert!(parse(b"{not json").is_err());
        assert!(parse(br#"{"action":"Q","xid":1,"lsn":"0/1"}"#).is_err());
    }
}
