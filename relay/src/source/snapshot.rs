//! Incremental snapshots (issue #6), after the watermark algorithm of Netflix's DBLog: the
//! relay reads a table in key-ordered chunks between two watermark messages it writes into
//! the WAL, and drops every chunk row whose key changed between them, so that the streamed
//! change wins. No transaction stays open across chunks; the stream keeps flowing.
//!
//! One chunk, in stream order:
//!
//! ```text
//! low watermark (commit)  ── changes of other transactions ──  high watermark (commit)
//!        │ the chunk is read here, somewhere between the two │
//! ```
//!
//! A change to the table committed between the watermarks may or may not be in the chunk:
//! its key is dropped from the chunk and the streamed change stands. Every other chunk row
//! equals the row at the high watermark, so the relay produces it there as an `R` record
//! with the high watermark's `commit_lsn`: a later change has a greater `(commit_lsn, seq)`
//! and wins at the sink, an earlier one loses.
//!
//! Invariants:
//! - The `R` records of a chunk belong to the high watermark's transaction for the
//!   [`crate::source::ack::AckTracker`]: the slot is not confirmed past it before Kafka has them all.
//! - Progress (`saiki.snapshots.after_key`) is written only after the slot could be confirmed
//!   past the high watermark: a crash repeats at most the last chunk, never skips one.
//!
//! The window logic and the record building are pure ([`Window`], [`r_record`]); reading a
//! chunk and writing progress use a side connection ([`read_chunk`], [`record_progress`]).

use std::collections::HashSet;

use serde::Deserialize;

use saiki_core::Lsn;

use crate::error::RelayError;
use crate::pg::quote::literal as quote_literal;
use crate::pg::PgConn;

/// A watermark message's content: `{"id":"…","mark":"low"|"high","table":"schema.table"}`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub(crate) struct Watermark {
    pub(crate) id: String,
    pub(crate) mark: Mark,
    pub(crate) table: String,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mark {
    Low,
    High,
}

impl Watermark {
    pub(crate) fn content(id: &str, mark: Mark, table: &str) -> String {
        serde_json::json!({
            "id": id,
            "mark": match mark { Mark::Low => "low", Mark::High => "high" },
            "table": table,
        })
        .to_string()
    }
}

/// One row of a chunk: its key's text output (for the next chunk's `after`) and the record
/// body from `saiki.snapshot_chunk`.
#[derive(Debug, Clone)]
pub(crate) struct ChunkRow {
    pub(crate) key_text: Vec<Option<String>>,
    pub(crate) body: String,
}

/// A chunk read between its watermarks.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) table: String,
    pub(crate) rows: Vec<ChunkRow>,
    /// Fewer rows than asked: the table is done after this chunk.
    pub(crate) last: bool,
    /// A resync's snapshot: after its last chunk, a `W` record in every partition of the
    /// table's topic (see [`w_record`]).
    pub(crate) sweep_before: Option<Lsn>,
}

/// The chunk window of one watermark pair: what changed between the low and the high
/// watermark.
#[derive(Debug)]
pub(crate) struct Window {
    pub(crate) table: String,
    pub(crate) low_seen: bool,
    /// Keys (as Kafka key JSON) changed inside the window.
    pub(crate) changed: HashSet<String>,
    /// The table was truncated inside the window: no chunk row stands.
    pub(crate) truncated: bool,
    /// A streamed transaction that changed the table committed inside the window: its keys
    /// were not observed one by one (they came before its commit), so the chunk is read
    /// again instead of produced.
    pub(crate) void: bool,
}

impl Window {
    pub(crate) fn new(table: String) -> Window {
        Window {
            table,
            low_seen: false,
            changed: HashSet::new(),
            truncated: false,
            void: false,
        }
    }

    /// A change of `table` seen in the stream, with its key and, for a key-changing update,
    /// its old key. Only changes between the watermarks count.
    pub(crate) fn observe(&mut self, table: &str, key: Option<&str>, old_key: Option<&str>) {
        if !self.low_seen || table != self.table {
            return;
        }
        for k in [key, old_key].into_iter().flatten() {
            self.changed.insert(k.to_string());
        }
    }

    pub(crate) fn observe_truncate(&mut self, tables: &[String]) {
        if self.low_seen && tables.contains(&self.table) {
            self.truncated = true;
        }
    }

    /// A streamed transaction that changed `tables` committed.
    pub(crate) fn observe_streamed_commit(&mut self, tables: &[&str]) {
        if self.low_seen && tables.contains(&self.table.as_str()) {
            self.void = true;
        }
    }

    /// Whether a chunk row with this key stands at the high watermark.
    pub(crate) fn keeps(&self, key: &str) -> bool {
        !self.truncated && !self.changed.contains(key)
    }
}

/// An `R` record: `{"action":"R","xid":…,"lsn":…,"commit_lsn":…,"seq":…,` then the body's
/// members (`schema`, `table`, `key`, `columns`, `types`), in the key order of docs/plugin.md, "Records".
pub(crate) fn r_record(body: &str, xid: u64, lsn: &str, commit_lsn: &str, seq: u64) -> Vec<u8> {
    let members = body.strip_prefix('{').unwrap_or(body);
    format!(
        "{{\"action\":\"R\",\"xid\":{xid},\"lsn\":\"{lsn}\",\"commit_lsn\":\"{commit_lsn}\",\"seq\":{seq},{members}"
    )
    .into_bytes()
}

/// A `W` record: the end of a resync's snapshot of `schema.table`, which started at `before`;
/// the topic has `partitions` partitions and each gets it. It follows the last chunk's `R`
/// records at the high watermark's position (`seq` after theirs). The sink deletes the rows
/// of this source last changed before `before` once every partition has brought it
/// (docs/sink.md, "After a failover").
pub(crate) fn w_record(
    xid: u64,
    lsn: &str,
    commit_lsn: &str,
    seq: u64,
    (schema, table): (&str, &str),
    before: Lsn,
    partitions: i32,
) -> Vec<u8> {
    serde_json::json!({
        "action": "W",
        "xid": xid,
        "lsn": lsn,
        "commit_lsn": commit_lsn,
        "seq": seq,
        "schema": schema,
        "table": table,
        "sweep": {"before": before.to_string(), "partitions": partitions},
    })
    .to_string()
    .into_bytes()
}

/// Asks for a snapshot of `table` (any text `regclass` accepts) by the relay of `slot`.
pub(crate) async fn request(conn: &mut PgConn, slot: &str, table: &str) -> Result<(), RelayError> {
    conn.simple_query(&request_sql(slot, table)).await?;
    Ok(())
}

/// The statement of [`request`].
pub(crate) fn request_sql(slot: &str, table: &str) -> String {
    format!(
        "SELECT saiki.request_snapshot({}, {}::regclass)",
        quote_literal(slot),
        quote_literal(table)
    )
}

/// As [`request_sql`], but a table dropped meanwhile is skipped rather than an error (the
/// tables a resync asks for were listed a moment before).
pub(crate) fn request_if_there_sql(slot: &str, table: &str) -> String {
    format!(
        "SELECT saiki.request_snapshot({}, r) FROM to_regclass({}) r WHERE r IS NOT NULL",
        quote_literal(slot),
        quote_literal(table)
    )
}

/// Makes the snapshots of `slot` requested in the current transaction a resync's that sweeps
/// the rows last changed before `before` (extension 0.3.0).
pub(crate) fn sweep_sql(slot: &str, before: Lsn) -> String {
    format!(
        "UPDATE saiki.snapshots SET sweep_before = {}::pg_lsn WHERE slot_name = {} AND requested_at = now()",
        quote_literal(&before.to_string()),
        quote_literal(slot)
    )
}

/// The next table to snapshot for `slot`: the table, where to continue, and, for a resync,
/// where it started.
pub(crate) struct NextTable {
    pub(crate) table: String,
    pub(crate) after: Option<Vec<Option<String>>>,
    pub(crate) sweep_before: Option<Lsn>,
}

/// The next table to snapshot for `slot`. (`sweep_before` is read through `to_jsonb`, so that
/// an extension older than 0.3.0, which has no such column, reads as no sweep.)
pub(crate) async fn next_table(
    conn: &mut PgConn,
    slot: &str,
) -> Result<Option<NextTable>, RelayError> {
    let rows = conn
        .simple_query(&format!(
            "SELECT table_name, after_key::text, to_jsonb(s) ->> 'sweep_before' FROM saiki.snapshots s WHERE slot_name = {} AND state IN ('requested', 'running') ORDER BY requested_at, table_name LIMIT 1",
            quote_literal(slot)
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    Ok(Some(NextTable {
        table: row.first().cloned().flatten().unwrap_or_default(),
        after: row.get(1).cloned().flatten().map(|a| parse_text_array(&a)),
        sweep_before: row.get(2).cloned().flatten().and_then(|l| l.parse().ok()),
    }))
}

/// Reads one chunk of `table` after `after`, between a low and a high watermark with `id`.
/// A table that cannot be read (dropped, no key, no privilege) is marked failed with the
/// reason and `Ok(None)` returned: the stream goes on.
pub(crate) async fn read_chunk(
    conn: &mut PgConn,
    slot: &str,
    id: &str,
    next: &NextTable,
    max_rows: usize,
) -> Result<Option<Chunk>, RelayError> {
    let (table, after) = (next.table.as_str(), next.after.as_deref());
    let emit = |mark| {
        format!(
            "SELECT saiki.snapshot_watermark({})",
            quote_literal(&Watermark::content(id, mark, table))
        )
    };
    conn.simple_query(&format!(
        "UPDATE saiki.snapshots SET state = 'running', started_at = coalesce(started_at, now()) WHERE slot_name = {} AND table_name = {} AND state = 'requested'",
        quote_literal(slot),
        quote_literal(table)
    ))
    .await?;
    conn.simple_query(&emit(Mark::Low)).await?;
    let after_sql = match after {
        Some(a) => format!("{}::text[]", quote_literal(&text_array(a))),
        None => "NULL".into(),
    };
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let read = conn
        .simple_query(&format!(
            "SELECT key_text::text, record FROM saiki.snapshot_chunk(format('%I.%I', {}, {})::regclass, {after_sql}, {max_rows})",
            quote_literal(schema),
            quote_literal(name)
        ))
        .await;
    // The high watermark closes the window even when the read failed.
    conn.simple_query(&emit(Mark::High)).await?;
    let rows = match read {
        Ok(rows) => rows,
        Err(RelayError::Server { error, .. }) => {
            let reason = format!(
                "{}{}",
                error.message,
                error
                    .hint
                    .as_deref()
                    .map(|h| format!(" HINT: {h}"))
                    .unwrap_or_default()
            );
            tracing::error!(table, %reason, "snapshot of this table failed; the stream goes on");
            conn.simple_query(&format!(
                "UPDATE saiki.snapshots SET state = 'failed', error = {}, finished_at = now() WHERE slot_name = {} AND table_name = {}",
                quote_literal(&reason),
                quote_literal(slot),
                quote_literal(table)
            ))
            .await?;
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let rows: Vec<ChunkRow> = rows
        .into_iter()
        .map(|r| ChunkRow {
            key_text: r
                .first()
                .cloned()
                .flatten()
                .map(|k| parse_text_array(&k))
                .unwrap_or_default(),
            body: r.get(1).cloned().flatten().unwrap_or_default(),
        })
        .collect();
    Ok(Some(Chunk {
        table: table.to_string(),
        last: rows.len() < max_rows,
        rows,
        sweep_before: next.sweep_before,
    }))
}

/// Records a finished chunk: its last key, and the table done after its last chunk. Returns
/// the table's rows done and estimated so far.
pub(crate) async fn record_progress(
    conn: &mut PgConn,
    slot: &str,
    table: &str,
    last_key: Option<&[Option<String>]>,
    rows: usize,
    done: bool,
) -> Result<(u64, u64), RelayError> {
    let after = match last_key {
        Some(k) => format!("{}::text[]", quote_literal(&text_array(k))),
        None => "after_key".into(),
    };
    let r = conn.simple_query(&format!(
        "UPDATE saiki.snapshots SET after_key = {after}, chunks_done = chunks_done + 1, rows_done = rows_done + {rows}, state = {}, finished_at = {} WHERE slot_name = {} AND table_name = {} AND state = 'running' RETURNING rows_done, coalesce(rows_estimated, 0)",
        if done { "'done'" } else { "'running'" },
        if done { "now()" } else { "NULL" },
        quote_literal(slot),
        quote_literal(table)
    ))
    .await?;
    let num = |i: usize| {
        r.first()
            .and_then(|row| row.get(i).cloned().flatten())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((num(0), num(1)))
}

/// A PostgreSQL text[] literal of `values` (`{"a","b\"c"}`); NULL elements as NULL.
pub(crate) fn text_array(values: &[Option<String>]) -> String {
    let items: Vec<String> = values
        .iter()
        .map(|v| match v {
            Some(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            None => "NULL".into(),
        })
        .collect();
    format!("{{{}}}", items.join(","))
}

/// Parses the text output of a one-dimensional text[] (`{a,"b c",NULL}`).
pub(crate) fn parse_text_array(s: &str) -> Vec<Option<String>> {
    let inner = s
        .trim()
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or("");
    let mut out = Vec::new();
    if inner.is_empty() {
        return out;
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            quoted = true;
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            item.push(n);
                        }
                    }
                    '"' => break,
                    c => item.push(c),
                }
            }
        }
        while let Some(&c) = chars.peek() {
            if c == ',' {
                break;
            }
            item.push(c);
            chars.next();
        }
        out.push(if !quoted && item == "NULL" {
            None
        } else {
            Some(item)
        });
        if chars.next().is_none() {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_between_the_watermarks_drop_chunk_rows() {
        let mut w = Window::new("public.t".into());
        w.observe("public.t", Some(r#"{"id":1}"#), None); // before the low watermark
        w.low_seen = true;
        w.observe("public.t", Some(r#"{"id":2}"#), Some(r#"{"id":3}"#));
        w.observe("public.other", Some(r#"{"id":4}"#), None);
        assert!(w.keeps(r#"{"id":1}"#));
        assert!(!w.keeps(r#"{"id":2}"#) && !w.keeps(r#"{"id":3}"#));
        assert!(w.keeps(r#"{"id":4}"#));
        w.observe_truncate(&["public.t".into()]);
        assert!(
            !w.keeps(r#"{"id":1}"#),
            "a truncate inside the window drops every row"
        );
    }

    #[test]
    fn a_streamed_transaction_committing_inside_the_window_voids_the_chunk() {
        let mut w = Window::new("public.t".into());
        w.observe_streamed_commit(&["public.t"]); // committed before the low watermark
        assert!(!w.void);
        w.low_seen = true;
        w.observe_streamed_commit(&["public.other"]);
        assert!(
            !w.void,
            "another table's transaction leaves the chunk alone"
        );
        w.observe_streamed_commit(&["public.other", "public.t"]);
        assert!(w.void);
    }

    #[test]
    fn an_r_record_carries_the_high_watermarks_position_in_designs_key_order() {
        let body = r#"{"schema":"public","table":"t","key":["id"],"columns":{"id":1}}"#;
        let r = r_record(body, 7, "0/10", "0/20", 3);
        let v: serde_json::Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["action"], "R");
        assert_eq!(v["commit_lsn"], "0/20");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["columns"]["id"], 1);
        let text = String::from_utf8(r).unwrap();
        assert!(
            text.starts_with(
                r#"{"action":"R","xid":7,"lsn":"0/10","commit_lsn":"0/20","seq":3,"schema""#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_w_record_reads_back_as_a_sweep_of_its_table() {
        let w = w_record(7, "0/10", "0/20", 4, ("public", "orders"), Lsn(0x3000), 3);
        let r: saiki_core::record::Record = serde_json::from_slice(&w).unwrap();
        assert_eq!(r.action, saiki_core::record::Action::Sweep);
        assert_eq!(r.commit_lsn, Some(Lsn(0x20)));
        assert_eq!(r.seq, Some(4));
        assert_eq!(r.table.as_deref(), Some("orders"));
        assert_eq!(
            r.sweep,
            Some(saiki_core::record::Sweep {
                before: Lsn(0x3000),
                partitions: 3
            })
        );
    }

    #[test]
    fn watermarks_round_trip() {
        let c = Watermark::content("ab", Mark::High, "public.t");
        let w: Watermark = serde_json::from_str(&c).unwrap();
        assert_eq!(
            w,
            Watermark {
                id: "ab".into(),
                mark: Mark::High,
                table: "public.t".into()
            }
        );
    }

    #[test]
    fn text_arrays_round_trip_through_their_text_form() {
        for v in [
            vec![Some("1".to_string())],
            vec![
                Some("a b".into()),
                Some("c,\"d\"\\".into()),
                Some("NULL".into()),
            ],
            vec![Some("".into()), None],
        ] {
            assert_eq!(parse_text_array(&text_array(&v)), v, "{}", text_array(&v));
        }
        // PostgreSQL's own output: bare words, quotes where needed.
        assert_eq!(
            parse_text_array(r#"{x,10,"a b",NULL}"#),
            vec![
                Some("x".into()),
                Some("10".into()),
                Some("a b".into()),
                None
            ]
        );
        assert!(parse_text_array("{}").is_empty());
    }
}
