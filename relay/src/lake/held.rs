//! `Held`: the records of streamed transactions (`source.stream_large`) the lake has read and
//! not yet written, because their transaction has not ended. Pure.
//!
//! Invariants:
//! - **A streamed transaction's rows are written at its end copy, whole, or never.** A
//!   partition's held records of a transaction become rows when that partition delivers the
//!   transaction's `C` (its copy of the end), in offset order, and are dropped at its `A`.
//!   The rows take the `C`'s offset for the table marks (`ledger.rs`): whether they are in a
//!   table is decided once, at the end copy, like any row at its own offset.
//! - **Nothing held is lost to a restart.** The consumer group's offset of a partition never
//!   passes its first held record (`first_offset`), so a new session reads it again.
//! - **A newer attempt supersedes an older one** (a source relay that restarted mid-stream sends
//!   the transaction again under a new `attempt`): the older attempt's records are dropped
//!   and its later records ignored.

use std::collections::HashMap;

use super::ledger::Tp;

/// One sending of one streamed transaction: source, xid, the source relay's attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct StreamKey {
    pub(crate) source: String,
    pub(crate) xid: u64,
    pub(crate) attempt: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeldRecord {
    pub(crate) key: StreamKey,
    pub(crate) subxid: u64,
    pub(crate) offset: i64,
    pub(crate) payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub(crate) struct Held {
    parts: HashMap<Tp, Vec<HeldRecord>>,
    /// The newest attempt seen per (source, xid).
    newest: HashMap<(String, u64), u64>,
    bytes: usize,
}

impl Held {
    /// Whether the key is superseded by a newer attempt; a newer one than known drops the
    /// records of the older.
    fn current(&mut self, key: &StreamKey) -> bool {
        let n = self
            .newest
            .entry((key.source.clone(), key.xid))
            .or_insert(key.attempt);
        if key.attempt < *n {
            return false;
        }
        if key.attempt > *n {
            *n = key.attempt;
            let mut freed = 0;
            for recs in self.parts.values_mut() {
                recs.retain(|r| {
                    let old = r.key.source == key.source
                        && r.key.xid == key.xid
                        && r.key.attempt < key.attempt;
                    if old {
                        freed += r.payload.len();
                    }
                    !old
                });
            }
            self.bytes -= freed;
        }
        true
    }

    /// A streamed change record.
    pub(crate) fn hold(
        &mut self,
        tp: &Tp,
        key: StreamKey,
        subxid: u64,
        offset: i64,
        payload: &[u8],
    ) {
        if !self.current(&key) {
            return;
        }
        self.bytes += payload.len();
        self.parts.entry(tp.clone()).or_default().push(HeldRecord {
            key,
            subxid,
            offset,
            payload: payload.to_vec(),
        });
    }

    /// A subtransaction rolled back: its records in this partition go.
    pub(crate) fn abort_subxact(&mut self, tp: &Tp, key: &StreamKey, subxid: u64) {
        self.drop_where(tp, |r| r.key == *key && r.subxid == subxid);
    }

    /// The transaction's end copy in this partition: its held records there, in offset order,
    /// removed (a commit writes them, an abort drops them).
    pub(crate) fn end(&mut self, tp: &Tp, key: &StreamKey) -> Vec<HeldRecord> {
        if !self.current(key) {
            return Vec::new();
        }
        let Some(recs) = self.parts.get_mut(tp) else {
            return Vec::new();
        };
        let (mine, rest): (Vec<_>, Vec<_>) = recs.drain(..).partition(|r| r.key == *key);
        *recs = rest;
        self.bytes -= mine.iter().map(|r| r.payload.len()).sum::<usize>();
        mine
    }

    fn drop_where(&mut self, tp: &Tp, f: impl Fn(&HeldRecord) -> bool) {
        if let Some(recs) = self.parts.get_mut(tp) {
            let mut freed = 0;
            recs.retain(|r| {
                let gone = f(r);
                if gone {
                    freed += r.payload.len();
                }
                !gone
            });
            self.bytes -= freed;
        }
    }

    /// The offset of the partition's first held record: where a new session must start.
    pub(crate) fn first_offset(&self, tp: &Tp) -> Option<i64> {
        self.parts
            .get(tp)
            .and_then(|r| r.iter().map(|r| r.offset).min())
    }

    /// Payload bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// A rebalance: everything is read again.
    pub(crate) fn clear(&mut self) {
        *self = Held::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(attempt: u64) -> StreamKey {
        StreamKey {
            source: "s".into(),
            xid: 7,
            attempt,
        }
    }

    #[test]
    fn a_commit_copy_releases_its_partitions_records_in_order_and_only_those() {
        let (p0, p1) = (("t".to_string(), 0), ("t".to_string(), 1));
        let mut h = Held::default();
        h.hold(&p0, key(1), 0, 10, b"a");
        h.hold(&p1, key(1), 0, 4, b"b");
        h.hold(&p0, key(1), 9, 11, b"c");
        h.hold(&p0, key(1), 0, 12, b"d");
        assert_eq!(h.first_offset(&p0), Some(10));
        h.abort_subxact(&p0, &key(1), 9);
        let got: Vec<i64> = h.end(&p0, &key(1)).iter().map(|r| r.offset).collect();
        assert_eq!(got, [10, 12]);
        assert_eq!(h.first_offset(&p0), None);
        assert_eq!(h.first_offset(&p1), Some(4));
        assert_eq!(h.bytes(), 1);
    }

    #[test]
    fn a_newer_attempt_drops_the_older_and_the_older_is_ignored_after() {
        let p = ("t".to_string(), 0);
        let mut h = Held::default();
        h.hold(&p, key(1), 0, 1, b"old");
        h.hold(&p, key(2), 0, 2, b"new");
        h.hold(&p, key(1), 0, 3, b"late old");
        assert!(h.end(&p, &key(1)).is_empty());
        let got: Vec<i64> = h.end(&p, &key(2)).iter().map(|r| r.offset).collect();
        assert_eq!(got, [2]);
        assert_eq!(h.bytes(), 0);
    }
}
