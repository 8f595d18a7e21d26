//! Streamed transactions in the sink (docs/sink.md, "Large transactions"). Pure: what the
//! records of a batch ask the ODS to do; `ods.rs` does it.
//!
//! A transaction the source relay streams before its commit (`source.stream_large`) reaches
//! the table topics record by record, marked `streamed`, without a `commit_lsn`. The sink
//! never applies such a record when it reads it:
//! - it is **staged**: a row of `saiki_sink.staged`, keyed by source, xid, the relay's
//!   `attempt` and `seq`, in the transaction that moves the partition's offset on (so a
//!   replay of the partition stages nothing twice);
//! - an `A` with a `subxid` drops that subtransaction's staged rows, and keeps its later
//!   copies from being staged;
//! - a `C` (or top-level `A`) reaches every partition of every topic that got records of the
//!   transaction, and lists them (`partitions`). Each copy is an **end**, recorded in
//!   `saiki_sink.stream_ends`. The copy that completes the list (whichever sink instance
//!   reads it) applies the staged rows at the commit's `commit_lsn`, in chunks, inside its
//!   batch's ODS transaction, and deletes them; an abort only deletes them.
//!
//! Invariants:
//! - **A streamed transaction is applied whole, once, at its commit.** No row of it is in the
//!   ODS before the ODS transaction that holds its last end copy commits, and all are after.
//! - **A partition that delivered a commit's end copy waits** (the sink pauses it at the
//!   offset after the copy) until the transaction is applied, so that no later change of a
//!   row the transaction also changed is applied before it: the ordering guard alone would
//!   keep the later value but could not fill its unchanged TOAST columns.
//! - **A newer attempt supersedes an older one.** A relay that restarts mid-stream sends
//!   the whole transaction again under a new `attempt` (its session start, µs since the Unix
//!   epoch): the first end copy of the newer attempt drops what the older one staged, and
//!   copies of the older attempt read after that are dropped.

use std::borrow::Cow;
use std::collections::BTreeMap;

use saiki_core::record::Action;
use saiki_core::Lsn;
use serde::Deserialize;

/// The fields of a streamed record the sink acts on (the columns are read when it is
/// applied, as any change's).
#[derive(Debug, Deserialize)]
struct StreamHead<'a> {
    action: Action,
    xid: u64,
    #[serde(default)]
    subxid: Option<u64>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default)]
    attempt: Option<u64>,
    #[serde(default)]
    commit_lsn: Option<Lsn>,
    #[serde(default, borrow)]
    commit_ts: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    source: Option<Cow<'a, str>>,
    #[serde(default)]
    partitions: Option<BTreeMap<String, u32>>,
}

/// One sending of one streamed transaction: source, xid, the relay's attempt.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct StreamKey {
    pub(crate) source: String,
    pub(crate) xid: i64,
    pub(crate) attempt: i64,
}

/// A record of an open streamed transaction, to stage.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    /// Its index in the batch.
    pub(crate) idx: usize,
    pub(crate) key: StreamKey,
    pub(crate) seq: i64,
    /// Its subtransaction, 0 for the top level.
    pub(crate) subxid: i64,
}

/// A copy of a streamed transaction's `C` or top-level `A` in one partition.
#[derive(Debug, Clone)]
pub(crate) struct End {
    pub(crate) key: StreamKey,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// The commit's position and time (µs since the Unix epoch); `None` for an abort.
    pub(crate) commit: Option<(Lsn, Option<String>)>,
    /// Copies in all: the partitions listed.
    pub(crate) copies: i64,
}

/// What a batch's streamed records ask of the ODS, in this order: stage, drop rolled-back
/// subtransactions, record the ends (sorted by [`StreamKey`], so that two instances take
/// the transactions' locks in one order).
#[derive(Debug, Default)]
pub(crate) struct StreamOps {
    pub(crate) staged: Vec<Staged>,
    pub(crate) subxact_aborts: Vec<(StreamKey, i64)>,
    pub(crate) ends: Vec<End>,
}

/// What became of a streamed record in the planner.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Staged, or an end or abort to record.
    Kept,
    /// `S`, `E`: nothing to do.
    Nothing,
    /// Cannot be staged: the dead-letter reason.
    Refused(String),
}

impl StreamOps {
    pub(crate) fn is_empty(&self) -> bool {
        self.staged.is_empty() && self.subxact_aborts.is_empty() && self.ends.is_empty()
    }

    /// Takes the streamed record at batch index `idx` (from `topic`/`partition`).
    pub(crate) fn add(&mut self, idx: usize, topic: &str, partition: i32, payload: &[u8]) -> Taken {
        let h: StreamHead<'_> = match serde_json::from_slice(payload) {
            Ok(h) => h,
            Err(e) => return Taken::Refused(format!("malformed streamed record: {e}")),
        };
        let (Some(source), Some(attempt)) = (h.source.as_deref(), h.attempt) else {
            return Taken::Refused(
                "a streamed record without source or attempt: only saiki-relay source with stream_large produces the streamed records the sink applies"
                    .into(),
            );
        };
        let key = StreamKey {
            source: source.to_string(),
            xid: h.xid as i64,
            attempt: attempt as i64,
        };
        match h.action {
            Action::StreamStart | Action::StreamStop | Action::Begin | Action::Message => {
                Taken::Nothing
            }
            Action::StreamAbort if h.subxid.is_some() => {
                self.subxact_aborts
                    .push((key, h.subxid.unwrap_or_default() as i64));
                Taken::Kept
            }
            Action::StreamAbort | Action::Commit => {
                let commit = match (h.action, h.commit_lsn) {
                    (Action::Commit, Some(lsn)) => Some((lsn, h.commit_ts.map(Cow::into_owned))),
                    (Action::Commit, None) => {
                        return Taken::Refused("malformed streamed commit: no commit_lsn".into())
                    }
                    _ => None,
                };
                let Some(partitions) = h.partitions else {
                    return Taken::Refused(
                        "a streamed transaction's end without partitions: produced by a relay that does not list where its records went"
                            .into(),
                    );
                };
                self.ends.push(End {
                    key,
                    topic: topic.to_string(),
                    partition,
                    commit,
                    copies: partitions.values().map(|n| i64::from(*n)).sum(),
                });
                Taken::Kept
            }
            _ => match h.seq {
                Some(seq) => {
                    self.staged.push(Staged {
                        idx,
                        key,
                        seq,
                        subxid: h.subxid.unwrap_or_default() as i64,
                    });
                    Taken::Kept
                }
                None => Taken::Refused("malformed streamed record: no seq".into()),
            },
        }
    }

    /// The ends in the order their locks are taken.
    pub(crate) fn ends_in_lock_order(&self) -> Vec<&End> {
        let mut ends: Vec<&End> = self.ends.iter().collect();
        ends.sort_by(|a, b| a.key.cmp(&b.key));
        ends
    }
}

/// Whether a payload is an end copy or subtransaction abort of a streamed transaction: on a
/// table topic, any `C` or `A` (the transactions of other records end on the transactions
/// topic). The sink ends its batch after one.
pub(crate) fn is_stream_end(payload: &[u8]) -> bool {
    payload.starts_with(b"{\"action\":\"C\"") || payload.starts_with(b"{\"action\":\"A\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    const REC: &str = r#"{"action":"I","xid":7,"lsn":"0/10","streamed":true,"subxid":9,"seq":3,"schema":"public","table":"t","key":["id"],"columns":{"id":1},"attempt":5,"source":"a"}"#;

    #[test]
    fn streamed_changes_are_staged_under_their_source_xid_and_attempt() {
        let mut ops = StreamOps::default();
        assert_eq!(ops.add(0, "saiki.public.t", 0, REC.as_bytes()), Taken::Kept);
        let s = &ops.staged[0];
        assert_eq!(
            (s.key.clone(), s.seq, s.subxid),
            (
                StreamKey {
                    source: "a".into(),
                    xid: 7,
                    attempt: 5
                },
                3,
                9
            )
        );
    }

    #[test]
    fn a_commit_copy_counts_every_listed_partition() {
        let mut ops = StreamOps::default();
        let c = r#"{"action":"C","xid":7,"lsn":"0/90","commit_lsn":"0/A0","commit_ts":"2026-12-02T10:00:00Z","streamed":true,"attempt":5,"changes":{"public.t":2},"partitions":{"saiki.public.t":3,"saiki.public.u":2},"source":"a"}"#;
        assert_eq!(ops.add(4, "saiki.public.u", 1, c.as_bytes()), Taken::Kept);
        let e = ops.ends[0].clone();
        assert_eq!(
            (e.copies, e.partition, e.topic.as_str()),
            (5, 1, "saiki.public.u")
        );
        assert_eq!(e.commit.as_ref().map(|c| c.0), Some(Lsn(0xA0)));
        let a = r#"{"action":"A","xid":7,"lsn":"0/90","streamed":true,"subxid":9,"attempt":5,"source":"a"}"#;
        assert_eq!(ops.add(5, "saiki.public.u", 1, a.as_bytes()), Taken::Kept);
        assert_eq!(ops.subxact_aborts, vec![(e.key.clone(), 9)]);
        assert!(is_stream_end(c.as_bytes()) && is_stream_end(a.as_bytes()));
        assert!(!is_stream_end(REC.as_bytes()));
    }

    #[test]
    fn streamed_records_the_sink_cannot_place_are_refused_with_a_reason() {
        let mut ops = StreamOps::default();
        let no_attempt = REC.replace(r#""attempt":5,"#, "");
        assert!(
            matches!(ops.add(0, "t", 0, no_attempt.as_bytes()), Taken::Refused(r) if r.contains("attempt"))
        );
        let end = r#"{"action":"C","xid":7,"lsn":"0/90","commit_lsn":"0/A0","streamed":true,"attempt":5,"source":"a"}"#;
        assert!(
            matches!(ops.add(0, "t", 0, end.as_bytes()), Taken::Refused(r) if r.contains("partitions"))
        );
        let start =
            r#"{"action":"S","xid":7,"lsn":"0/90","streamed":true,"attempt":5,"source":"a"}"#;
        assert_eq!(ops.add(0, "t", 0, start.as_bytes()), Taken::Nothing);
        assert!(ops.is_empty());
    }

    #[test]
    fn ends_are_locked_in_one_order() {
        let mut ops = StreamOps::default();
        for (xid, src) in [(9, "b"), (3, "b"), (7, "a")] {
            let c = format!(
                r#"{{"action":"A","xid":{xid},"lsn":"0/90","streamed":true,"attempt":1,"partitions":{{"t":1}},"source":"{src}"}}"#
            );
            assert_eq!(ops.add(0, "t", 0, c.as_bytes()), Taken::Kept);
        }
        let order: Vec<(String, i64)> = ops
            .ends_in_lock_order()
            .iter()
            .map(|e| (e.key.source.clone(), e.key.xid))
            .collect();
        assert_eq!(
            order,
            vec![("a".into(), 7), ("b".into(), 3), ("b".into(), 9)]
        );
    }
}
