//! `Ledger`: the one place that decides which delivered change goes into which Iceberg table,
//! so that every change is in its table exactly once though the lake relay dies anywhere.
//!
//! **Invariant.** A table's *mark* for a partition is the offset after the last message of
//! that partition committed to the table; it is stored with every commit in the Iceberg
//! snapshot's summary (`saiki.offsets`), so the table itself says what it holds. A message for
//! table T at offset o of partition p is written iff `o >= mark(T, p)` and o is not already in
//! the round in hand. Reading starts at the consumer group's offset, which is committed only
//! after every table of a round has committed: at or before the oldest change not yet in its
//! table. So a restart anywhere (between two tables' commits, between the tables and the group)
//! reads again from a point that misses nothing, and the marks skip what is already in.
//!
//! Why the group at all: Iceberg has no commit across tables, and a table a round had not yet
//! created holds no mark to resume from (docs/deviations.md).

use std::collections::HashMap;

/// A topic partition.
pub(crate) type Tp = (String, i32);

/// Marks of one table: partition → the offset after its last committed message.
pub(crate) type Marks = HashMap<Tp, i64>;

/// The snapshot-summary key of the marks.
pub(crate) const SUMMARY_KEY: &str = "saiki.offsets";

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Per table (its full name), the marks of its current snapshot.
    committed: HashMap<String, Marks>,
    /// Per partition, the offset after the last message taken in this round.
    next: HashMap<Tp, i64>,
    /// Per table, the marks its rows in this round move on.
    round: HashMap<String, Marks>,
}

impl Ledger {
    /// A table's marks as its current snapshot has them (the table was loaded or committed).
    pub(crate) fn load(&mut self, table: &str, marks: Marks) {
        self.committed.insert(table.to_string(), marks);
    }

    /// Whether the table's marks are known (loaded since the last reset).
    pub(crate) fn knows(&self, table: &str) -> bool {
        self.committed.contains_key(table)
    }

    /// A delivered message: false if this round has taken it already (the consumer delivered
    /// it again), true once, when it is new to the round.
    pub(crate) fn take(&mut self, tp: &Tp, offset: i64) -> bool {
        match self.next.get_mut(tp) {
            Some(n) if offset < *n => false,
            Some(n) => {
                *n = offset + 1;
                true
            }
            None => {
                self.next.insert(tp.clone(), offset + 1);
                true
            }
        }
    }

    /// Whether a taken message for `table` goes into it (it is past the table's mark); if so
    /// the round's marks of the table move past it.
    pub(crate) fn admit(&mut self, table: &str, tp: &Tp, offset: i64) -> bool {
        let mark = self
            .committed
            .get(table)
            .and_then(|m| m.get(tp))
            .copied()
            .unwrap_or(i64::MIN);
        if offset < mark {
            return false;
        }
        self.round
            .entry(table.to_string())
            .or_default()
            .insert(tp.clone(), offset + 1);
        true
    }

    /// The marks to store with the table's commit of this round: its committed marks moved on
    /// by the round's.
    pub(crate) fn marks_after(&self, table: &str) -> Marks {
        let mut m = self.committed.get(table).cloned().unwrap_or_default();
        if let Some(r) = self.round.get(table) {
            for (tp, o) in r {
                m.insert(tp.clone(), *o);
            }
        }
        m
    }

    /// The table committed this round's rows with `marks_after(table)`.
    pub(crate) fn committed(&mut self, table: &str) {
        let m = self.marks_after(table);
        self.round.remove(table);
        self.committed.insert(table.to_string(), m);
    }

    /// The offsets the consumer group may commit once every table of the round has
    /// committed: the next offset of every partition the round read, but never past a
    /// record still held (`held`: a streamed transaction's first record not yet written).
    pub(crate) fn group_offsets(&self, held: impl Fn(&Tp) -> Option<i64>) -> Vec<(Tp, i64)> {
        let mut v: Vec<_> = self
            .next
            .iter()
            .map(|(tp, o)| (tp.clone(), held(tp).map_or(*o, |h| h.min(*o))))
            .collect();
        v.sort();
        v
    }

    /// Tables with rows in the round.
    pub(crate) fn round_tables(&self) -> impl Iterator<Item = &str> {
        self.round.keys().map(String::as_str)
    }

    /// A rebalance or a failed round: everything not committed is read again, and the marks
    /// are loaded again (another relay may have moved them).
    pub(crate) fn reset(&mut self) {
        *self = Ledger::default();
    }
}

/// The marks as the snapshot summary stores them: `{"topic/partition": offset, …}`.
pub(crate) fn encode_marks(m: &Marks) -> String {
    let mut sorted: Vec<_> = m.iter().collect();
    sorted.sort();
    let obj: serde_json::Map<String, serde_json::Value> = sorted
        .into_iter()
        .map(|((t, p), o)| (format!("{t}/{p}"), (*o).into()))
        .collect();
    serde_json::Value::Object(obj).to_string()
}

/// Reads `encode_marks`'s text; a summary written by something else is an error naming it.
pub(crate) fn decode_marks(s: &str) -> Result<Marks, String> {
    let obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(s).map_err(|e| format!("{SUMMARY_KEY} = {s:?}: {e}"))?;
    let mut m = Marks::new();
    for (k, v) in obj {
        let (t, p) = k
            .rsplit_once('/')
            .and_then(|(t, p)| Some((t, p.parse::<i32>().ok()?)))
            .ok_or_else(|| format!("{SUMMARY_KEY}: {k:?} is not topic/partition"))?;
        let o = v
            .as_i64()
            .ok_or_else(|| format!("{SUMMARY_KEY}: {k:?} has no offset"))?;
        m.insert((t.to_string(), p), o);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn marks_survive_the_snapshot_summary() {
        let mut m = Marks::new();
        m.insert(("saiki.public.orders".into(), 0), 42);
        m.insert(("saiki.public.orders".into(), 3), 7);
        assert_eq!(decode_marks(&encode_marks(&m)).unwrap(), m);
        assert!(decode_marks("{\"x\": 1}")
            .unwrap_err()
            .contains("topic/partition"));
        assert!(decode_marks("nope").is_err());
    }

    #[test]
    fn a_message_delivered_twice_in_a_round_is_taken_once() {
        let mut l = Ledger::default();
        let tp = ("t".to_string(), 0);
        assert!(l.take(&tp, 5));
        assert!(!l.take(&tp, 5));
        assert!(!l.take(&tp, 3));
        assert!(l.take(&tp, 6));
    }

    /// A partition's messages, each for one of three tables, read by a relay that dies at
    /// random points: before any commit, between two tables' commits, or after the tables and
    /// before the group's. Every message ends in its table exactly once.
    fn run(msgs: &[u8], crashes: &[(usize, u8)], round_len: usize) -> HashMap<String, Vec<i64>> {
        let tp = ("t".to_string(), 0);
        let tables = ["a", "b", "c"];
        // What is durable: each table's rows and marks, and the group's offset.
        let mut stored: HashMap<String, (Vec<i64>, Marks)> = HashMap::new();
        let mut group = 0i64;
        let mut crashes = crashes.to_vec();
        crashes.sort();
        let mut budget = 50;
        'life: loop {
            budget -= 1;
            assert!(budget > 0, "no progress");
            let mut l = Ledger::default();
            for t in tables {
                l.load(t, stored.get(t).map(|s| s.1.clone()).unwrap_or_default());
            }
            let mut pending: HashMap<String, Vec<i64>> = HashMap::new();
            let mut o = group;
            loop {
                let end = (o + round_len as i64).min(msgs.len() as i64);
                while o < end {
                    assert!(l.take(&tp, o));
                    let t = tables[msgs[o as usize] as usize % 3];
                    if l.admit(t, &tp, o) {
                        pending.entry(t.to_string()).or_default().push(o);
                    }
                    o += 1;
                }
                // The round commits table by table, then the group; a crash may cut it.
                let mut names: Vec<String> = l.round_tables().map(str::to_string).collect();
                names.sort();
                let cut = crashes
                    .first()
                    .filter(|(at, _)| (*at as i64) < end)
                    .map(|(_, k)| *k as usize % (names.len() + 2));
                for (i, t) in names.iter().enumerate() {
                    if cut == Some(i) {
                        crashes.remove(0);
                        continue 'life;
                    }
                    let e = stored.entry(t.clone()).or_default();
                    e.0.extend(pending.remove(t).unwrap_or_default());
                    e.1 = l.marks_after(t);
                    l.committed(t);
                }
                if cut == Some(names.len()) {
                    crashes.remove(0);
                    continue 'life;
                }
                if cut.is_some() {
                    crashes.remove(0);
                }
                if let Some((_, g)) = l.group_offsets(|_| None).into_iter().next() {
                    group = g;
                }
                if end as usize >= msgs.len() {
                    break 'life;
                }
            }
        }
        stored.into_iter().map(|(t, (rows, _))| (t, rows)).collect()
    }

    proptest! {
        #[test]
        fn every_change_is_in_its_table_once_whatever_the_crashes(
            msgs in proptest::collection::vec(0u8..3, 0..60),
            crashes in proptest::collection::vec((0usize..60, any::<u8>()), 0..6),
            round_len in 1usize..10,
        ) {
            let got = run(&msgs, &crashes, round_len);
            for (i, t) in ["a", "b", "c"].iter().enumerate() {
                let want: Vec<i64> = msgs
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m as usize % 3 == i)
                    .map(|(o, _)| o as i64)
                    .collect();
                let have = got.get(*t).cloned().unwrap_or_default();
                prop_assert_eq!(have, want, "table {}", t);
            }
        }
    }
}
