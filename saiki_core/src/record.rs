//! The change record of format-version 1 (docs/plugin.md), as consumers read it: the relay,
//! the sink and the tests. The plugin does not build these structs; it writes the same JSON
//! directly with [`crate::encode`], and the property tests check that the two agree.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Lsn;

/// Prefix of the heartbeat messages (`saiki.heartbeat()` and the source relay's heartbeats):
/// they let an idle slot advance; the relay does not produce them to Kafka.
pub const HEARTBEAT_PREFIX_C: &std::ffi::CStr = c"saiki.heartbeat";
/// [`HEARTBEAT_PREFIX_C`] as a string.
pub const HEARTBEAT_PREFIX: &str = as_str(HEARTBEAT_PREFIX_C);
/// Prefix of the DDL messages of the extension's event triggers (`saiki_pg/src/ddl.rs`):
/// the plugin turns each into an `L` record.
pub const DDL_PREFIX_C: &std::ffi::CStr = c"saiki.ddl";
/// [`DDL_PREFIX_C`] as a string.
pub const DDL_PREFIX: &str = as_str(DDL_PREFIX_C);
/// Prefix of the snapshot watermarks written around each snapshot chunk
/// (`saiki.snapshot_chunk`): the source relay reads them from the stream (docs/relay.md).
pub const SNAPSHOT_PREFIX_C: &std::ffi::CStr = c"saiki.snapshot";
/// [`SNAPSHOT_PREFIX_C`] as a string.
pub const SNAPSHOT_PREFIX: &str = as_str(SNAPSHOT_PREFIX_C);

const fn as_str(c: &'static std::ffi::CStr) -> &'static str {
    match std::str::from_utf8(c.to_bytes()) {
        Ok(s) => s,
        Err(_) => panic!("a prefix is ASCII"),
    }
}

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    #[serde(rename = "B")]
    Begin,
    #[serde(rename = "I")]
    Insert,
    #[serde(rename = "U")]
    Update,
    #[serde(rename = "D")]
    Delete,
    #[serde(rename = "T")]
    Truncate,
    #[serde(rename = "M")]
    Message,
    #[serde(rename = "C")]
    Commit,
    /// A row read by a snapshot (written by the relay, not the plugin).
    #[serde(rename = "R")]
    Read,
    /// Start of a block of a streamed, not yet committed transaction.
    #[serde(rename = "S")]
    StreamStart,
    /// End of a block of a streamed transaction.
    #[serde(rename = "E")]
    StreamStop,
    /// A streamed transaction (or, with `subxid`, one of its subtransactions) aborted:
    /// the consumer discards what it received of it.
    #[serde(rename = "A")]
    StreamAbort,
    /// A schema change of the table (DDL), in order with its rows: `ddl`, `statement`,
    /// `changes`, `renamed`, `shape` (docs/plugin.md, "Schema changes").
    #[serde(rename = "L")]
    SchemaChange,
    /// The end of a resync's snapshot of a table, in every partition of its topic (written by
    /// the source relay, not the plugin): the rows of this source that the snapshot did not
    /// read and no change since `sweep.before` touched are gone at the source (issue #14).
    #[serde(rename = "W")]
    Sweep,
}

impl Action {
    /// The one-letter code written in the `action` key.
    pub fn code(self) -> u8 {
        match self {
            Action::Begin => b'B',
            Action::Insert => b'I',
            Action::Update => b'U',
            Action::Delete => b'D',
            Action::Truncate => b'T',
            Action::Message => b'M',
            Action::Commit => b'C',
            Action::Read => b'R',
            Action::StreamStart => b'S',
            Action::StreamStop => b'E',
            Action::StreamAbort => b'A',
            Action::SchemaChange => b'L',
            Action::Sweep => b'W',
        }
    }
}

/// The `truncate` object of a `T` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncate {
    /// `[schema, table]` pairs.
    pub tables: Vec<(String, String)>,
    pub cascade: bool,
    pub restart_identity: bool,
}

/// The `sweep` object of a `W` record: the resync started at `before` (the new slot's
/// starting point), and the topic had `partitions` partitions, each of which gets the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sweep {
    pub before: Lsn,
    pub partitions: i32,
}

/// One change record. Optional keys are absent from the JSON when `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub action: Action,
    pub xid: u64,
    pub lsn: Lsn,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_lsn: Option<Lsn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_ts: Option<String>,
    /// Present (true) on every record of a transaction streamed before its commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed: Option<bool>,
    /// In a streamed transaction, the subtransaction a change (or an `A`) belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subxid: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged_toast: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<Truncate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional: Option<bool>,
    /// `L`: the command tag (`ALTER TABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddl: Option<String>,
    /// `L`: the SQL text of the statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// `L`: what the statement did to the table, a list of [`crate::ddl::Change`]. (The
    /// source relay's `C` records in Kafka carry `changes` too: messages per table.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Value>,
    /// `L`: old name → new name, for the table (`schema.table`) and columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renamed: Option<Map<String, Value>>,
    /// `L`: the table's shape after the statement (null after `DROP TABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// `W`: where the resync started and how many partitions get the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Sweep>,
    /// Added by the source relay: the configured source name (e.g. the shard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Record {
    /// The key object `{column: value}` of a change: the key columns taken from `columns`
    /// (I, U) or from `identity` (D). `None` when the record has no key columns.
    pub fn key_object(&self) -> Option<Map<String, Value>> {
        let key = self.key.as_ref()?;
        if key.is_empty() {
            return None;
        }
        let from = match self.action {
            Action::Delete => self.identity.as_ref()?,
            _ => self.columns.as_ref()?,
        };
        let mut out = Map::new();
        for k in key {
            // On an update that changes no key column, an unchanged TOASTed key is absent
            // from `columns`; the identity holds it then.
            let v = from
                .get(k)
                .or_else(|| self.identity.as_ref().and_then(|i| i.get(k)))?;
            out.insert(k.clone(), v.clone());
        }
        Some(out)
    }

    /// The logical message content as bytes: a JSON string is UTF-8, `{"base64": …}` is not.
    pub fn content_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        match self.content.as_ref()? {
            Value::String(s) => Some(s.as_bytes().to_vec()),
            Value::Object(o) => {
                let b = o.get("base64")?.as_str()?;
                base64::engine::general_purpose::STANDARD.decode(b).ok()
            }
            _ => None,
        }
    }
}
