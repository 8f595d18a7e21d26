//! The one reader of change records for consumers that must not copy them: the source relay
//! routes records by it and the sink plans them by it. Borrowed from the message bytes:
//! names and values stay slices of the input, column values stay raw JSON text (numbers keep
//! their digits), nothing is re-serialized.
//!
//! [`RecordView`] reads every key the encoder ([`crate::encode`]) writes that a consumer acts
//! on; the property test of `encode.rs` parses every written record with it and checks each
//! field. The owned [`crate::record::Record`] is for tests and tools, where copying is fine.
//!
//! The column objects (`columns`, `identity`) are read as `F`: a raw JSON object by default
//! (routing needs only the key columns), or [`Fields`], the names and raw values in order
//! (the sink needs every column).

use std::borrow::Cow;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::record::Action;
use crate::Lsn;

/// One change record, borrowed. Keys the consumer does not act on are skipped.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "'de: 'a, F: Deserialize<'de>"))]
pub struct RecordView<'a, F = &'a RawValue> {
    pub action: Action,
    pub xid: u64,
    pub lsn: Lsn,
    #[serde(default)]
    pub commit_lsn: Option<Lsn>,
    /// With `include-timestamp`: the source commit time (RFC 3339).
    #[serde(default, borrow)]
    pub commit_ts: Option<Cow<'a, str>>,
    /// A record of a streamed transaction (`stream-changes`): `true`.
    #[serde(default)]
    pub streamed: Option<bool>,
    /// The subtransaction of a streamed record, or of the `A` that aborts it.
    #[serde(default)]
    pub subxid: Option<u64>,
    #[serde(default)]
    pub seq: Option<i64>,
    #[serde(default, borrow)]
    pub schema: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub table: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub key: Option<Vec<Cow<'a, str>>>,
    #[serde(default = "none")]
    pub columns: Option<F>,
    #[serde(default = "none")]
    pub identity: Option<F>,
    #[serde(default, borrow)]
    pub unchanged_toast: Option<Vec<Cow<'a, str>>>,
    /// With `include-types`: `{column: type}`, kept raw (read as [`Types`] when needed).
    #[serde(default, borrow)]
    pub types: Option<&'a RawValue>,
    /// Added by the source relay to every value it produces.
    #[serde(default, borrow)]
    pub source: Option<Cow<'a, str>>,
    /// Added by the source relay to a streamed transaction's records: the session that sent
    /// them (µs since the Unix epoch).
    #[serde(default)]
    pub attempt: Option<u64>,
    /// A logical message's prefix.
    #[serde(default, borrow)]
    pub prefix: Option<Cow<'a, str>>,
    #[serde(default)]
    pub transactional: Option<bool>,
    /// A logical message's content (a JSON string, or `{"base64": …}`).
    #[serde(default, borrow)]
    pub content: Option<&'a RawValue>,
    #[serde(default)]
    pub truncate: Option<TruncateView>,
    /// A `W` record's resync start and partition count.
    #[serde(default)]
    pub sweep: Option<crate::record::Sweep>,
}

fn none<F>() -> Option<F> {
    None
}

impl<'a, F: Deserialize<'a>> RecordView<'a, F> {
    /// Reads one record.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The tables of a `T` record.
#[derive(Debug, Deserialize)]
pub struct TruncateView {
    /// `[schema, table]` pairs.
    pub tables: Vec<(String, String)>,
}

/// `{name: raw JSON value, …}` in the record's order.
#[derive(Debug, Default, Clone)]
pub struct Fields<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Fields<'a> {
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of column values")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Fields<'a>, M::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(8));
                while let Some((k, val)) = m.next_entry::<Cow<'a, str>, &'a RawValue>()? {
                    v.push((k, val));
                }
                Ok(Fields(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// `{column: type name}` from `include-types`, in the record's order.
#[derive(Debug, Default, Clone)]
pub struct Types<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Types<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Types<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of type names")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Types<'a>, M::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<Cow<'a, str>, Cow<'a, str>>()? {
                    v.push((k, val));
                }
                Ok(Types(v))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_column_objects_read_raw_or_as_fields_in_order() {
        let rec = br#"{"action":"U","xid":7,"lsn":"0/10","commit_lsn":"0/20","seq":2,"schema":"public","table":"t","key":["id"],"columns":{"id":1,"n":1.50,"s":"a\"b"},"identity":{"id":0},"types":{"id":"integer"},"source":"shard1"}"#;
        let raw: RecordView = RecordView::parse(rec).unwrap();
        assert_eq!(
            raw.columns.unwrap().get(),
            r#"{"id":1,"n":1.50,"s":"a\"b"}"#
        );
        let f: RecordView<Fields> = RecordView::parse(rec).unwrap();
        let cols = f.columns.unwrap();
        let names: Vec<&str> = cols.0.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(names, ["id", "n", "s"]);
        assert_eq!(cols.get("n").unwrap().get(), "1.50");
        assert_eq!(f.identity.unwrap().get("id").unwrap().get(), "0");
        assert_eq!((f.seq, f.source.as_deref()), (Some(2), Some("shard1")));
    }

    #[test]
    fn a_record_without_its_mandatory_keys_is_an_error() {
        assert!(RecordView::<&RawValue>::parse(b"{not json").is_err());
        assert!(RecordView::<&RawValue>::parse(br#"{"action":"Q","xid":1,"lsn":"0/1"}"#).is_err());
        assert!(RecordView::<&RawValue>::parse(br#"{"action":"I","lsn":"0/1"}"#).is_err());
    }
}
