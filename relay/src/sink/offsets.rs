//! Which Kafka offsets the sink applies, and from where it reads again.
//!
//! **Invariant (docs/sink.md, "Exactly once"): every offset of an assigned partition is
//! applied to the ODS once: none twice, none skipped.** The ODS holds each partition's next
//! offset, written in the transaction that applies the rows before it; Kafka's committed
//! offsets are never used. This ledger decides, for every message the consumer delivers,
//! whether it goes into the batch in hand, is skipped as already applied, or needs a seek
//! first; which offsets a batch writes when it is cut; what moves on when a batch commits;
//! and where every partition starts again when a batch is fenced by another instance or a
//! partition changes hands. Pure: no I/O. The loop (`sink/mod.rs`) reads the ODS, seeks the
//! consumer and applies batches as the ledger says; the property test below drives it with
//! every order of deliveries, commits, fences, foreign commits and rebalances against a
//! model of Kafka and the ODS.
//!
//! How it holds:
//! - A partition's messages enter a batch only in offset order from the ODS's offset: the
//!   first message seen of a partition must be that offset (or, for a partition the ODS has
//!   never seen, any offset from there: retention may have removed the start), or the
//!   consumer seeks there first.
//! - A batch names the stored offset each of its partitions starts from
//!   ([`PartitionOffsets::stored`]); the ODS commits it only if it still holds that value.
//! - One batch is in flight while the next is read. The batch in hand continues from the one
//!   in flight: when that commits, the batch in hand starts from its offsets; when it is
//!   fenced, the batch in hand is void too, and both rewind to the ODS.

use std::collections::HashMap;

use crate::sink::ods::PartitionOffsets;

/// A topic partition.
pub(crate) type Tp = (String, i32);

/// What the loop does with a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accept {
    /// The partition is new to the ledger: read its offset from the ODS, [`Ledger::learn`]
    /// it, and offer the message again.
    Unknown,
    /// Into the batch in hand. `gap`: offsets were missing before it (compaction, retention,
    /// transaction markers), worth a debug line.
    Take { gap: bool },
    /// Already applied (or already in a batch): drop it.
    Skip,
    /// The consumer is elsewhere: seek the partition to this offset and drop the message.
    Seek(i64),
}

/// What the ledger knows of one partition.
#[derive(Debug)]
struct Part {
    /// The next offset the ODS holds (None: nothing applied yet).
    stored: Option<i64>,
    /// The next offset to put in a batch.
    next: i64,
    /// Whether the consumer's position is known to be `next` (checked or sought).
    synced: bool,
}

/// A partition's span in a batch.
#[derive(Debug, Clone)]
struct Span {
    /// The stored offset the batch starts from (what the ODS must still hold).
    stored: Option<i64>,
    first: i64,
    next: i64,
}

/// The sink's offset decisions for one session (a new session starts a new ledger).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    parts: HashMap<Tp, Part>,
    /// The batch in hand (being read).
    in_hand: HashMap<Tp, Span>,
    /// The batch in flight (to rewind it if it is fenced, and to continue after it).
    in_flight: Option<HashMap<Tp, Span>>,
    /// Partitions of dropped batches, with where they began, not yet rewound.
    rewind_pending: Vec<(Tp, i64)>,
}

impl Ledger {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A partition changed hands (assigned or revoked): what was known of it is forgotten;
    /// its next message reads the ODS again.
    pub(crate) fn forget(&mut self, tp: &Tp) {
        self.parts.remove(tp);
    }

    /// The ODS's offset for a partition the ledger did not know (after [`Accept::Unknown`]).
    /// The batch in flight may still commit after the ODS was read, and the batches may hold
    /// messages of the partition from before it changed hands: reading continues after them.
    pub(crate) fn learn(&mut self, tp: Tp, stored: Option<i64>) {
        let next = [
            self.in_flight.as_ref().and_then(|f| f.get(&tp)),
            self.in_hand.get(&tp),
        ]
        .into_iter()
        .flatten()
        .map(|s| s.next)
        .fold(stored.unwrap_or(0), i64::max);
        self.parts.insert(
            tp,
            Part {
                stored,
                next,
                synced: false,
            },
        );
    }

    /// Decides on a delivered message at `offset`; [`Accept::Take`] puts it into the batch
    /// in hand.
    pub(crate) fn accept(&mut self, tp: &Tp, offset: i64) -> Accept {
        let Some(part) = self.parts.get_mut(tp) else {
            return Accept::Unknown;
        };
        let mut gap = false;
        if !part.synced {
            let fresh = part.stored.is_none()
                && !self.in_hand.contains_key(tp)
                && !self.in_flight.as_ref().is_some_and(|f| f.contains_key(tp));
            if offset == part.next || (fresh && offset >= part.next) {
                part.synced = true;
            } else {
                // The loop seeks; if the seek fails, the session ends with this ledger.
                part.synced = true;
                return Accept::Seek(part.next);
            }
        } else if offset < part.next {
            return Accept::Skip;
        } else if offset > part.next && part.stored.is_some() {
            gap = true;
        }
        part.next = offset + 1;
        let stored = part.stored;
        let span = self.in_hand.entry(tp.clone()).or_insert(Span {
            stored,
            first: offset,
            next: offset,
        });
        span.next = offset + 1;
        Accept::Take { gap }
    }

    /// Whether a dropped batch waits for [`Ledger::rewind`].
    pub(crate) fn rewinding(&self) -> bool {
        !self.rewind_pending.is_empty()
    }

    /// Cuts the batch in hand: the offsets its ODS transaction writes (each partition's
    /// stored value it starts from, and the next). Call it only with no batch in flight and
    /// nothing to rewind (the loop settles the batch before first).
    pub(crate) fn cut(&mut self) -> Vec<PartitionOffsets> {
        debug_assert!(self.in_flight.is_none() && self.rewind_pending.is_empty());
        let spans = std::mem::take(&mut self.in_hand);
        let offsets = spans
            .iter()
            .map(|(tp, s)| PartitionOffsets {
                topic: tp.0.clone(),
                partition: tp.1,
                stored: s.stored,
                next: s.next,
            })
            .collect();
        self.in_flight = Some(spans);
        offsets
    }

    /// The batch in flight committed with these offsets: the ODS now holds them, and the
    /// batch in hand (which took its stored values before) starts from them.
    pub(crate) fn committed(&mut self, offsets: &[PartitionOffsets]) {
        self.in_flight = None;
        for o in offsets {
            let tp = (o.topic.clone(), o.partition);
            if let Some(p) = self.parts.get_mut(&tp) {
                p.stored = Some(o.next);
            }
            if let Some(s) = self.in_hand.get_mut(&tp) {
                if s.stored == o.stored {
                    s.stored = Some(o.next);
                }
            }
        }
    }

    /// The batch in flight did not commit (another instance moved its offsets): it and the
    /// batch in hand are dropped, and their partitions rewind before anything else is read.
    pub(crate) fn fenced(&mut self) {
        if let Some(spans) = self.in_flight.take() {
            self.rewind_pending
                .extend(spans.into_iter().map(|(tp, s)| (tp, s.first)));
        }
    }

    /// Drops the batch in hand (the loop drops its messages) and rewinds every partition of
    /// the dropped batches to the ODS's offsets `ods` (all partitions of this group). Returns
    /// the seeks to make; a partition whose seek fails is [`Ledger::forget`]-ten (it was
    /// revoked meanwhile, or its next message seeks again).
    pub(crate) fn rewind(&mut self, ods: &HashMap<Tp, i64>) -> Vec<(Tp, i64)> {
        let mut firsts: HashMap<Tp, i64> = HashMap::new();
        let dropped = std::mem::take(&mut self.rewind_pending);
        let in_hand = std::mem::take(&mut self.in_hand);
        for (tp, first) in dropped
            .into_iter()
            .chain(in_hand.into_iter().map(|(tp, s)| (tp, s.first)))
        {
            let f = firsts.entry(tp).or_insert(first);
            *f = (*f).min(first);
        }
        let mut seeks = Vec::with_capacity(firsts.len());
        for (tp, first) in firsts {
            let stored = ods.get(&tp).copied();
            let next = stored.unwrap_or(first);
            self.parts.insert(
                tp.clone(),
                Part {
                    stored,
                    next,
                    synced: true,
                },
            );
            seeks.push((tp, next));
        }
        seeks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tp(p: i32) -> Tp {
        ("saiki.public.t".to_string(), p)
    }

    #[test]
    fn a_partition_starts_at_the_ods_offset_and_seeks_there_first() {
        let mut l = Ledger::new();
        assert_eq!(l.accept(&tp(0), 0), Accept::Unknown);
        l.learn(tp(0), Some(5));
        assert_eq!(l.accept(&tp(0), 0), Accept::Seek(5));
        assert_eq!(l.accept(&tp(0), 3), Accept::Skip, "a message still queued");
        assert_eq!(l.accept(&tp(0), 5), Accept::Take { gap: false });
        assert_eq!(l.accept(&tp(0), 7), Accept::Take { gap: true });
        let o = l.cut();
        assert_eq!((o[0].stored, o[0].next), (Some(5), 8));
    }

    #[test]
    fn a_partition_new_to_the_ods_takes_its_first_message_wherever_it_is() {
        let mut l = Ledger::new();
        l.learn(tp(0), None);
        assert_eq!(l.accept(&tp(0), 40), Accept::Take { gap: false });
        let o = l.cut();
        assert_eq!((o[0].stored, o[0].next), (None, 41));
    }

    #[test]
    fn the_batch_in_hand_continues_from_the_one_in_flight() {
        let mut l = Ledger::new();
        l.learn(tp(0), Some(0));
        l.accept(&tp(0), 0);
        let first = l.cut();
        l.accept(&tp(0), 1);
        l.committed(&first);
        let second = l.cut();
        assert_eq!((second[0].stored, second[0].next), (Some(1), 2));
    }

    #[test]
    fn a_fenced_batch_voids_the_one_in_hand_and_rewinds_to_the_ods() {
        let mut l = Ledger::new();
        l.learn(tp(0), Some(0));
        l.accept(&tp(0), 0);
        l.cut();
        l.accept(&tp(0), 1);
        l.fenced();
        assert!(l.rewinding());
        let ods = HashMap::from([(tp(0), 3)]);
        assert_eq!(l.rewind(&ods), vec![(tp(0), 3)]);
        assert!(l.in_hand.is_empty() && !l.rewinding());
        assert_eq!(l.accept(&tp(0), 3), Accept::Take { gap: false });
    }

    // ---------------------------------------------------------------- the model

    /// One Kafka partition, the consumer's position in it, and what the ODS holds of it.
    #[derive(Debug, Clone)]
    struct Partition {
        /// Offsets present in the log (gaps: compaction, markers; a start > 0: retention).
        log: Vec<i64>,
        /// The consumer's fetch position.
        position: i64,
        assigned: bool,
        /// The ODS: the stored next offset, and every offset applied (by anyone).
        stored: Option<i64>,
        applied: Vec<i64>,
    }

    impl Partition {
        fn deliver(&mut self) -> Option<i64> {
            let o = *self.log.iter().find(|&&o| o >= self.position)?;
            self.position = o + 1;
            Some(o)
        }
    }

    /// A batch's messages (partition, offset) and the offsets it writes.
    type Batch = (Vec<(i32, i64)>, Vec<PartitionOffsets>);

    /// The sink loop on the ledger, with Kafka and the ODS as plain values.
    struct World {
        parts: Vec<Partition>,
        ledger: Ledger,
        /// Offsets in the batch in hand and in flight.
        in_hand: Vec<(i32, i64)>,
        in_flight: Option<Batch>,
        /// Where rebalances assign a partition: the last offsets this instance committed
        /// (the consumer context's `positions`).
        positions: HashMap<i32, i64>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Deliver(usize),
        Cut,
        Settle,
        /// Another instance applies the next `n` messages of a partition (a zombie's or a
        /// new owner's commit) and so fences this instance's batch.
        Foreign(usize, usize),
        /// The partition is revoked and assigned again (or assigned elsewhere and back), at
        /// the offset this instance last committed, or (`Some`) anywhere: the assignment at
        /// that offset failed, or messages fetched before it are still queued. A partition
        /// the ODS has never seen starts at the log's beginning (`auto.offset.reset =
        /// earliest`, and nothing is committed to Kafka), which the ledger relies on.
        Rebalance(usize, Option<i64>),
        Revoke(usize),
        /// The consumer fetches again from `k` offsets back without being asked (a fetch
        /// retried after a broker failover): messages come twice.
        Back(usize, i64),
    }

    impl World {
        fn new(logs: Vec<Vec<i64>>) -> World {
            World {
                parts: logs
                    .into_iter()
                    .map(|log| Partition {
                        log,
                        position: 0,
                        assigned: true,
                        stored: None,
                        applied: Vec::new(),
                    })
                    .collect(),
                ledger: Ledger::new(),
                in_hand: Vec::new(),
                in_flight: None,
                positions: HashMap::new(),
            }
        }

        fn ods(&self) -> HashMap<Tp, i64> {
            self.parts
                .iter()
                .enumerate()
                .filter_map(|(i, p)| p.stored.map(|s| (tp(i as i32), s)))
                .collect()
        }

        fn step(&mut self, op: &Op) {
            if self.ledger.rewinding() && self.in_flight.is_none() {
                self.rewind();
            }
            match *op {
                Op::Deliver(i) => self.deliver(i % self.parts.len()),
                Op::Cut => self.cut(),
                Op::Settle => self.settle(),
                Op::Foreign(i, n) => {
                    let n_parts = self.parts.len();
                    let p = &mut self.parts[i % n_parts];
                    let from = p.stored.unwrap_or(0);
                    let msgs: Vec<i64> = p
                        .log
                        .iter()
                        .copied()
                        .filter(|&o| o >= from)
                        .take(n)
                        .collect();
                    if let Some(last) = msgs.last() {
                        p.stored = Some(last + 1);
                        p.applied.extend(msgs);
                    }
                }
                Op::Rebalance(i, anywhere) => {
                    let i = i % self.parts.len();
                    self.ledger.forget(&tp(i as i32));
                    let p = &mut self.parts[i];
                    p.assigned = true;
                    // Anywhere up to the log's last message: a consumer past it would wait
                    // for the next message to learn that it must seek (a liveness bound of
                    // the model, not of the ledger).
                    let last = p.log.last().copied().unwrap_or(0);
                    p.position = match anywhere {
                        Some(o) if p.stored.is_some() => o.min(last),
                        _ => self.positions.get(&(i as i32)).copied().unwrap_or(0),
                    };
                }
                Op::Back(i, k) => {
                    let n_parts = self.parts.len();
                    let p = &mut self.parts[i % n_parts];
                    p.position = (p.position - k).max(0);
                }
                Op::Revoke(i) => {
                    let i = i % self.parts.len();
                    self.ledger.forget(&tp(i as i32));
                    self.parts[i].assigned = false;
                }
            }
        }

        fn deliver(&mut self, i: usize) {
            if !self.parts[i].assigned {
                return;
            }
            let Some(offset) = self.parts[i].deliver() else {
                return;
            };
            let t = tp(i as i32);
            let mut verdict = self.ledger.accept(&t, offset);
            if verdict == Accept::Unknown {
                self.ledger.learn(t.clone(), self.parts[i].stored);
                verdict = self.ledger.accept(&t, offset);
            }
            match verdict {
                Accept::Take { .. } => self.in_hand.push((i as i32, offset)),
                Accept::Skip => {}
                Accept::Seek(to) => self.parts[i].position = to,
                Accept::Unknown => panic!("unknown right after learn"),
            }
        }

        /// The loop's apply_batch: settle the batch in flight, then cut the one in hand.
        fn cut(&mut self) {
            self.settle();
            if self.ledger.rewinding() {
                self.rewind();
                return;
            }
            if self.in_hand.is_empty() {
                return;
            }
            let offsets = self.ledger.cut();
            self.in_flight = Some((std::mem::take(&mut self.in_hand), offsets));
        }

        /// The apply task's outcome: the ODS's fenced offsets write, then the rows.
        fn settle(&mut self) {
            let Some((msgs, offsets)) = self.in_flight.take() else {
                return;
            };
            let fenced = offsets
                .iter()
                .any(|o| self.parts[o.partition as usize].stored != o.stored);
            if fenced {
                self.ledger.fenced();
                return;
            }
            for o in &offsets {
                self.parts[o.partition as usize].stored = Some(o.next);
                self.positions.insert(o.partition, o.next);
            }
            for (p, off) in msgs {
                self.parts[p as usize].applied.push(off);
            }
            self.ledger.committed(&offsets);
        }

        fn rewind(&mut self) {
            self.in_hand.clear();
            let ods = self.ods();
            for ((_, p), to) in self.ledger.rewind(&ods) {
                self.parts[p as usize].position = to;
            }
        }

        /// No offset applied twice, none skipped: the ODS holds exactly the log's offsets
        /// below its stored offset, each once.
        fn check(&self) -> Result<(), String> {
            for (i, p) in self.parts.iter().enumerate() {
                let mut applied = p.applied.clone();
                applied.sort_unstable();
                let want: Vec<i64> = p
                    .log
                    .iter()
                    .copied()
                    .filter(|&o| p.stored.is_some_and(|s| o < s))
                    .collect();
                if applied != want {
                    return Err(format!(
                        "partition {i}: applied {applied:?}, the log below {:?} is {want:?}",
                        p.stored
                    ));
                }
            }
            Ok(())
        }

        /// Everything assigned, read and committed: the ODS must reach every log's end.
        fn drain(&mut self) -> Result<(), String> {
            for i in 0..self.parts.len() {
                if !self.parts[i].assigned {
                    self.step(&Op::Rebalance(i, None));
                }
            }
            for _ in 0..1000 {
                for i in 0..self.parts.len() {
                    for _ in 0..4 {
                        self.step(&Op::Deliver(i));
                    }
                }
                self.step(&Op::Cut);
                self.step(&Op::Settle);
                let done = self.parts.iter().all(|p| match p.log.last() {
                    None => true,
                    Some(&last) => p.stored == Some(last + 1),
                });
                if done && self.in_hand.is_empty() {
                    return Ok(());
                }
            }
            Err(format!("stuck: {:?}", self.parts))
        }
    }

    fn log() -> impl Strategy<Value = Vec<i64>> {
        // Up to 30 offsets from a start of 0..3, with gaps.
        (0i64..3, prop::collection::vec(1i64..3, 0..30)).prop_map(|(start, steps)| {
            let mut o = start;
            steps
                .into_iter()
                .map(|s| {
                    let this = o;
                    o += s;
                    this
                })
                .collect()
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0usize..3).prop_map(Op::Deliver),
            2 => Just(Op::Cut),
            2 => Just(Op::Settle),
            1 => (0usize..3, 1usize..5).prop_map(|(i, n)| Op::Foreign(i, n)),
            1 => (0usize..3, prop::option::of(0i64..40)).prop_map(|(i, o)| Op::Rebalance(i, o)),
            1 => (0usize..3).prop_map(Op::Revoke),
            1 => (0usize..3, 1i64..6).prop_map(|(i, k)| Op::Back(i, k)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn over_any_order_of_deliveries_commits_fences_and_rebalances_no_offset_is_applied_twice_or_skipped(
            logs in prop::collection::vec(log(), 1..4),
            ops in prop::collection::vec(op(), 0..120),
        ) {
            let mut w = World::new(logs);
            for op in &ops {
                w.step(op);
                prop_assert_eq!(w.check(), Ok(()), "after {:?}", op);
            }
            prop_assert_eq!(w.drain(), Ok(()));
            prop_assert_eq!(w.check(), Ok(()));
        }
    }
}
