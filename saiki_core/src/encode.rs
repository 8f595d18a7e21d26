//! Writes change records (docs/plugin.md, "Records") into a byte buffer, keys in the contract's order:
//! `action, xid, lsn, commit_lsn, commit_ts, streamed, subxid, seq, schema, table, key,
//! columns, identity, unchanged_toast, types, truncate, prefix, content, transactional,
//! origin`.
//!
//! The plugin calls [`write_head`], then the sections its record has, in this order, then
//! [`end`]. Column values are written by the caller between [`ObjectWriter::field`] calls,
//! with the value functions of [`crate::json`]. Invariant: a record written with these
//! functions in this order is one valid JSON object on one line.

use crate::json::{write_str, write_u64};
use crate::record::Action;
use crate::time::write_timestamptz;
use crate::Lsn;

/// The keys every record starts with.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub action: Action,
    pub xid: u64,
    pub lsn: Lsn,
    /// `None` inside a streamed transaction that has not committed yet.
    pub commit_lsn: Option<Lsn>,
    /// PostgreSQL `TimestampTz` microseconds.
    pub commit_ts: Option<i64>,
    pub streamed: bool,
    pub subxid: Option<u64>,
    pub seq: Option<u64>,
}

/// Starts a record: `{"action":"I","xid":…` up to and including `seq`.
pub fn write_head(buf: &mut Vec<u8>, h: &Head) {
    buf.extend_from_slice(b"{\"action\":\"");
    buf.push(h.action.code());
    buf.extend_from_slice(b"\",\"xid\":");
    write_u64(buf, h.xid);
    buf.extend_from_slice(b",\"lsn\":\"");
    h.lsn.write_to(buf);
    buf.push(b'"');
    if let Some(c) = h.commit_lsn {
        buf.extend_from_slice(b",\"commit_lsn\":\"");
        c.write_to(buf);
        buf.push(b'"');
    }
    if let Some(ts) = h.commit_ts {
        buf.extend_from_slice(b",\"commit_ts\":");
        write_timestamptz(buf, ts);
    }
    if h.streamed {
        buf.extend_from_slice(b",\"streamed\":true");
    }
    if let Some(s) = h.subxid {
        buf.extend_from_slice(b",\"subxid\":");
        write_u64(buf, s);
    }
    if let Some(s) = h.seq {
        buf.extend_from_slice(b",\"seq\":");
        write_u64(buf, s);
    }
}

/// `,"schema":…,"table":…` from names already escaped with [`crate::json::write_str`]
/// (the plugin caches them per relation).
pub fn write_table_quoted(buf: &mut Vec<u8>, schema_json: &[u8], table_json: &[u8]) {
    buf.extend_from_slice(b",\"schema\":");
    buf.extend_from_slice(schema_json);
    buf.extend_from_slice(b",\"table\":");
    buf.extend_from_slice(table_json);
}

/// `,"key":[…]` from column names already escaped as JSON strings.
pub fn write_key<'a>(buf: &mut Vec<u8>, names_json: impl IntoIterator<Item = &'a [u8]>) {
    buf.extend_from_slice(b",\"key\":[");
    let mut first = true;
    for n in names_json {
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.extend_from_slice(n);
    }
    buf.push(b']');
}

/// Writes a JSON object member by member: `{` … `}` with commas between members.
pub struct ObjectWriter {
    first: bool,
}

impl ObjectWriter {
    /// Writes `,"name":{` and returns the writer for its members.
    pub fn open_member(buf: &mut Vec<u8>, name: &str) -> ObjectWriter {
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":{");
        ObjectWriter { first: true }
    }

    /// Writes `{` for a nested object value.
    pub fn open(buf: &mut Vec<u8>) -> ObjectWriter {
        buf.push(b'{');
        ObjectWriter { first: true }
    }

    /// Writes the member name (already a JSON string, quotes included) and the colon;
    /// the caller writes the value next.
    #[inline]
    pub fn field(&mut self, buf: &mut Vec<u8>, name_json: &[u8]) {
        if !self.first {
            buf.push(b',');
        }
        self.first = false;
        buf.extend_from_slice(name_json);
        buf.push(b':');
    }

    /// Like [`ObjectWriter::field`] for a name that is not escaped yet.
    #[inline]
    pub fn field_str(&mut self, buf: &mut Vec<u8>, name: &[u8]) {
        if !self.first {
            buf.push(b',');
        }
        self.first = false;
        write_str(buf, name);
        buf.push(b':');
    }

    /// Whether no member was written yet.
    pub fn is_empty(&self) -> bool {
        self.first
    }

    pub fn close(self, buf: &mut Vec<u8>) {
        buf.push(b'}');
    }
}

/// `,"unchanged_toast":[…]` from column names already escaped as JSON strings.
pub fn write_unchanged_toast<'a>(
    buf: &mut Vec<u8>,
    names_json: impl IntoIterator<Item = &'a [u8]>,
) {
    buf.extend_from_slice(b",\"unchanged_toast\":[");
    let mut first = true;
    for n in names_json {
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.extend_from_slice(n);
    }
    buf.push(b']');
}

/// `,"truncate":{"tables":[["s","t"],…],"cascade":…,"restart_identity":…}`.
pub fn write_truncate<'a>(
    buf: &mut Vec<u8>,
    tables_json: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    cascade: bool,
    restart_identity: bool,
) {
    buf.extend_from_slice(b",\"truncate\":{\"tables\":[");
    let mut first = true;
    for (s, t) in tables_json {
        if !first {
            buf.push(b',');
        }
        first = false;
        buf.push(b'[');
        buf.extend_from_slice(s);
        buf.push(b',');
        buf.extend_from_slice(t);
        buf.push(b']');
    }
    buf.extend_from_slice(b"],\"cascade\":");
    buf.extend_from_slice(if cascade { b"true" } else { b"false" });
    buf.extend_from_slice(b",\"restart_identity\":");
    buf.extend_from_slice(if restart_identity { b"true" } else { b"false" });
    buf.push(b'}');
}

/// `,"prefix":…,"content":…,"transactional":…` of a logical message. Content that is valid
/// UTF-8 is a JSON string; anything else is `{"base64":"…"}`, so no byte is lost.
pub fn write_message(buf: &mut Vec<u8>, prefix: &[u8], content: &[u8], transactional: bool) {
    buf.extend_from_slice(b",\"prefix\":");
    write_str(buf, prefix);
    buf.extend_from_slice(b",\"content\":");
    if std::str::from_utf8(content).is_ok() {
        write_str(buf, content);
    } else {
        use base64::Engine;
        buf.extend_from_slice(b"{\"base64\":\"");
        let enc = base64::engine::general_purpose::STANDARD.encode(content);
        buf.extend_from_slice(enc.as_bytes());
        buf.extend_from_slice(b"\"}");
    }
    buf.extend_from_slice(b",\"transactional\":");
    buf.extend_from_slice(if transactional { b"true" } else { b"false" });
}

/// The fields of an `L` record after its head: `schema`, `table`, then `ddl`, `statement`,
/// `changes`, `renamed`, `shape` from the DDL message's JSON object (in that order, whatever
/// the order in the message; absent ones are left out), and returns the schema and table.
/// `None`, with nothing written, if the message is not an object naming its schema and
/// table: the plugin then writes it as a plain message.
pub fn write_schema_change(buf: &mut Vec<u8>, message: &[u8]) -> Option<(String, String)> {
    let m: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(message).ok()?;
    let name = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let (schema, table) = (name("schema")?, name("table")?);
    buf.extend_from_slice(b",\"schema\":");
    write_str(buf, schema.as_bytes());
    buf.extend_from_slice(b",\"table\":");
    write_str(buf, table.as_bytes());
    for k in ["ddl", "statement", "changes", "renamed", "shape"] {
        if let Some(v) = m.get(k) {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(k.as_bytes());
            buf.extend_from_slice(b"\":");
            // Serializing a Value to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, v);
        }
    }
    Some((schema, table))
}

/// `,"origin":"…"`.
pub fn write_origin(buf: &mut Vec<u8>, origin: &[u8]) {
    buf.extend_from_slice(b",\"origin\":");
    write_str(buf, origin);
}

/// Closes the record.
pub fn end(buf: &mut Vec<u8>) {
    buf.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{write_i64, write_str};
    use crate::record::Record;
    use crate::view::{Fields, RecordView};
    use proptest::prelude::*;

    fn quoted(s: &str) -> Vec<u8> {
        let mut b = Vec::new();
        write_str(&mut b, s.as_bytes());
        b
    }

    #[test]
    fn an_insert_record_has_the_contract_key_order() {
        let mut b = Vec::new();
        write_head(
            &mut b,
            &Head {
                action: Action::Insert,
                xid: 750,
                lsn: Lsn(0x0100_0028),
                commit_lsn: Some(Lsn(0x0100_0100)),
                commit_ts: None,
                streamed: false,
                subxid: None,
                seq: Some(1),
            },
        );
        write_table_quoted(&mut b, &quoted("public"), &quoted("orders"));
        let id = quoted("id");
        write_key(&mut b, [id.as_slice()]);
        let mut cols = ObjectWriter::open_member(&mut b, "columns");
        cols.field(&mut b, &id);
        write_i64(&mut b, 42, false);
        cols.field_str(&mut b, b"note");
        b.extend_from_slice(b"null");
        cols.close(&mut b);
        end(&mut b);
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"action":"I","xid":750,"lsn":"0/1000028","commit_lsn":"0/1000100","seq":1,"schema":"public","table":"orders","key":["id"],"columns":{"id":42,"note":null}}"#
        );
        let r: Record = serde_json::from_slice(&b).unwrap();
        assert_eq!(r.key_object().unwrap()["id"], 42);
    }

    #[test]
    fn non_utf8_message_content_is_base64_and_round_trips() {
        let mut b = Vec::new();
        write_head(
            &mut b,
            &Head {
                action: Action::Message,
                xid: 0,
                lsn: Lsn(1),
                commit_lsn: Some(Lsn(1)),
                commit_ts: None,
                streamed: false,
                subxid: None,
                seq: None,
            },
        );
        write_message(&mut b, b"p", b"\x00\xff\xfe", false);
        end(&mut b);
        let r: Record = serde_json::from_slice(&b).unwrap();
        assert_eq!(r.content_bytes().unwrap(), b"\x00\xff\xfe");
        assert_eq!(r.transactional, Some(false));
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Begin),
            Just(Action::Insert),
            Just(Action::Update),
            Just(Action::Delete),
            Just(Action::Truncate),
            Just(Action::Message),
            Just(Action::Commit),
            Just(Action::StreamStart),
            Just(Action::StreamStop),
            Just(Action::StreamAbort),
            Just(Action::SchemaChange),
        ]
    }

    #[test]
    fn a_ddl_message_becomes_an_l_record_in_the_contracts_key_order() {
        let msg = br#"{"shape":{"schema":"public","table":"items","columns":[]},"renamed":{"note":"remark"},"changes":[{"change":"rename_column","from":"note","to":"remark"}],"table":"items","schema":"public","statement":"ALTER TABLE items RENAME note TO remark","ddl":"ALTER TABLE","extra":1}"#;
        let mut buf = Vec::new();
        write_head(
            &mut buf,
            &Head {
                action: Action::SchemaChange,
                xid: 7,
                lsn: Lsn(16),
                commit_lsn: Some(Lsn(32)),
                commit_ts: None,
                streamed: false,
                subxid: None,
                seq: Some(3),
            },
        );
        assert_eq!(
            write_schema_change(&mut buf, msg),
            Some(("public".to_string(), "items".to_string()))
        );
        end(&mut buf);
        let text = String::from_utf8(buf.clone()).unwrap();
        let keys: Vec<&str> = [
            "\"schema\"",
            "\"table\"",
            "\"ddl\"",
            "\"statement\"",
            "\"changes\"",
            "\"renamed\"",
            "\"shape\"",
        ]
        .into_iter()
        .collect();
        let at: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(!text.contains("extra"), "{text}");
        let r: Record = serde_json::from_slice(&buf).unwrap();
        assert_eq!(r.action, Action::SchemaChange);
        let changes: Vec<crate::ddl::Change> = serde_json::from_value(r.changes.unwrap()).unwrap();
        assert_eq!(
            changes,
            [crate::ddl::Change::RenameColumn {
                from: "note".into(),
                to: "remark".into()
            }]
        );
        let v: RecordView<'_> = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            (v.schema.as_deref(), v.table.as_deref()),
            (Some("public"), Some("items"))
        );
        // Not an object naming its table: refused, nothing written.
        let mut b = Vec::new();
        assert!(write_schema_change(&mut b, b"[1]").is_none());
        assert!(write_schema_change(&mut b, br#"{"schema":"s"}"#).is_none());
        assert!(b.is_empty());
    }

    proptest! {
        #[test]
        fn any_written_record_parses_back_to_the_same_fields(
            a in action(), xid in any::<u32>(), lsn in any::<u64>(), commit in proptest::option::of(any::<u64>()),
            ts in proptest::option::of(-1_000_000_000_000_000i64..1_000_000_000_000_000),
            streamed in any::<bool>(), subxid in proptest::option::of(any::<u32>()), seq in proptest::option::of(1u64..1_000_000),
            schema in ".*", table in ".*", cols in prop::collection::vec((".*", proptest::option::of(any::<i64>())), 0..5),
            prefix in ".*", content in prop::collection::vec(any::<u8>(), 0..40), origin in proptest::option::of(".*"),
        ) {
            let mut b = Vec::new();
            write_head(&mut b, &Head { action: a, xid: xid as u64, lsn: Lsn(lsn), commit_lsn: commit.map(Lsn),
                commit_ts: ts, streamed, subxid: subxid.map(u64::from), seq });
            write_table_quoted(&mut b, &quoted(&schema), &quoted(&table));
            let mut o = ObjectWriter::open_member(&mut b, "columns");
            let mut expected = serde_json::Map::new();
            for (name, v) in &cols {
                o.field_str(&mut b, name.as_bytes());
                match v {
                    Some(i) => write_i64(&mut b, *i, false),
                    None => b.extend_from_slice(b"null"),
                }
                expected.insert(name.clone(), v.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null));
            }
            o.close(&mut b);
            write_message(&mut b, prefix.as_bytes(), &content, true);
            if let Some(or) = &origin { write_origin(&mut b, or.as_bytes()); }
            end(&mut b);
            prop_assert!(!b.contains(&b'\n'));
            let r: Record = serde_json::from_slice(&b).unwrap();
            prop_assert_eq!(r.action, a);
            prop_assert_eq!(r.xid, xid as u64);
            prop_assert_eq!(r.lsn, Lsn(lsn));
            prop_assert_eq!(r.commit_lsn, commit.map(Lsn));
            prop_assert_eq!(r.commit_ts.is_some(), ts.is_some());
            prop_assert_eq!(r.streamed, streamed.then_some(true));
            prop_assert_eq!(r.seq, seq);
            prop_assert_eq!(r.schema.as_deref(), Some(schema.as_str()));
            prop_assert_eq!(r.table.as_deref(), Some(table.as_str()));
            prop_assert_eq!(r.columns.clone().unwrap(), expected.clone());
            prop_assert_eq!(r.prefix.as_deref(), Some(prefix.as_str()));
            prop_assert_eq!(r.content_bytes().unwrap(), content);
            prop_assert_eq!(r.origin, origin);

            // The relays' borrowed reader sees the same fields, with the column objects raw
            // (routing) or as ordered fields (the sink).
            let v: RecordView<Fields> = RecordView::parse(&b).unwrap();
            prop_assert_eq!(v.action, a);
            prop_assert_eq!((v.xid, v.lsn, v.commit_lsn), (xid as u64, Lsn(lsn), commit.map(Lsn)));
            prop_assert_eq!(v.commit_ts.as_deref(), r.commit_ts.as_deref());
            prop_assert_eq!(v.seq, seq.map(|s| s as i64));
            prop_assert_eq!((v.streamed, v.subxid), (streamed.then_some(true), subxid.map(u64::from)));
            prop_assert_eq!(v.schema.as_deref(), Some(schema.as_str()));
            prop_assert_eq!(v.table.as_deref(), Some(table.as_str()));
            let fields = v.columns.unwrap();
            prop_assert_eq!(fields.0.len(), cols.len(), "every column, in order, duplicates too");
            for ((name, raw), (want_name, want)) in fields.0.iter().zip(&cols) {
                prop_assert_eq!(name.as_ref(), want_name.as_str());
                let value: Option<i64> = serde_json::from_str(raw.get()).unwrap();
                prop_assert_eq!(value, *want);
            }
            prop_assert_eq!(v.prefix.as_deref(), Some(prefix.as_str()));
            prop_assert_eq!(v.transactional, Some(true));
            let content_value: serde_json::Value = serde_json::from_str(v.content.unwrap().get()).unwrap();
            prop_assert_eq!(Some(content_value), r.content.clone());
            let raw: RecordView = RecordView::parse(&b).unwrap();
            let columns: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(raw.columns.unwrap().get()).unwrap();
            prop_assert_eq!(columns, expected);
        }
    }
}
