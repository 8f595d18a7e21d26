//! Which LSN the source relay may confirm to the slot.
//!
//! **Invariant (docs/relay.md): the slot never advances past an unacknowledged change.** The
//! confirmable position is the `commit_lsn` of the newest transaction whose messages, and every
//! earlier transaction's messages, Kafka has acknowledged, and whose last record has been seen.
//! Pure: no I/O; the property tests drive it with every order of acknowledgements.
//!
//! A streamed transaction (`stream-changes`, issue #17) sends records before its commit
//! position is known: its unit waits aside, collecting its messages, and takes its place in
//! commit order at its `C` (or its top-level `A`). Until then it holds nothing else back: a
//! transaction that commits before it is confirmed without it, which is safe, because the
//! walsender sends an open transaction again, from its start, after a restart from any position
//! before its commit.

use std::collections::{HashMap, VecDeque};

use saiki_core::Lsn;

/// A unit to confirm as a whole: a transaction (all records with one `commit_lsn`, or all
/// records of one streamed transaction), or one non-transactional message.
#[derive(Debug)]
struct Unit {
    /// The position it confirms (a streamed transaction's: 0/0 until its end).
    commit_lsn: Lsn,
    /// Messages produced for it and not yet acknowledged.
    pending: u64,
    /// Its last record has been seen (`C`, or the message itself): no more messages come.
    complete: bool,
}

/// Tracks units in stream order.
#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    units: HashMap<u64, Unit>,
    /// Units in commit order (streamed transactions from their end on).
    order: VecDeque<u64>,
    /// Open streamed transactions: xid → unit.
    streams: HashMap<u64, u64>,
    next_id: u64,
    confirmable: Lsn,
    /// A delivery failed: nothing at or after the failed unit may ever be confirmed by this
    /// tracker (the relay restarts the stream from the slot instead).
    poisoned: bool,
}

/// Identifies the unit a produced message belongs to, for [`AckTracker::acked`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl AckTracker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn new_unit(&mut self, commit_lsn: Lsn) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.units.insert(
            id,
            Unit {
                commit_lsn,
                pending: 0,
                complete: false,
            },
        );
        id
    }

    /// The last unit in commit order has all its records: what comes now is another
    /// transaction's (the walsender sends a transaction's records together, and streamed
    /// blocks between transactions).
    fn complete_last(&mut self) {
        if let Some(u) = self.order.back().and_then(|id| self.units.get_mut(id)) {
            u.complete = true;
        }
    }

    /// The unit for a record with this `commit_lsn`: the open one if it has the same
    /// `commit_lsn`, a new one otherwise. Records arrive in commit order, so a new commit_lsn
    /// means the previous transaction's records are all seen.
    pub(crate) fn unit_for(&mut self, commit_lsn: Lsn) -> Ticket {
        if let Some(u) = self.order.back().and_then(|id| self.units.get(id)) {
            if u.commit_lsn == commit_lsn && !u.complete {
                return Ticket(*self.order.back().expect("just read"));
            }
        }
        self.complete_last();
        let id = self.new_unit(commit_lsn);
        self.order.push_back(id);
        Ticket(id)
    }

    /// The unit of a record of streamed transaction `xid`, before its end.
    pub(crate) fn streamed(&mut self, xid: u64) -> Ticket {
        self.complete_last();
        if let Some(id) = self.streams.get(&xid) {
            return Ticket(*id);
        }
        let id = self.new_unit(Lsn(0));
        self.streams.insert(xid, id);
        Ticket(id)
    }

    /// Streamed transaction `xid` ended at `end` (the end LSN of its commit, or its abort's
    /// LSN): its unit takes that place in commit order. Its last records (the `C` or `A`)
    /// are produced with the returned ticket, then it is [`complete`](Self::complete).
    pub(crate) fn stream_end(&mut self, xid: u64, end: Lsn) -> Ticket {
        self.complete_last();
        let id = match self.streams.remove(&xid) {
            Some(id) => id,
            None => self.new_unit(end),
        };
        if let Some(u) = self.units.get_mut(&id) {
            u.commit_lsn = end;
        }
        self.order.push_back(id);
        Ticket(id)
    }

    /// A message of the unit was handed to the producer.
    pub(crate) fn produced(&mut self, t: Ticket) {
        if let Some(u) = self.units.get_mut(&t.0) {
            u.pending += 1;
        }
    }

    /// The unit's last record has been seen.
    pub(crate) fn complete(&mut self, t: Ticket) {
        if let Some(u) = self.units.get_mut(&t.0) {
            u.complete = true;
        }
        self.advance();
    }

    /// Kafka acknowledged one message of the unit.
    pub(crate) fn acked(&mut self, t: Ticket) {
        if let Some(u) = self.units.get_mut(&t.0) {
            u.pending = u.pending.saturating_sub(1);
        }
        self.advance();
    }

    /// Kafka gave up on a message: this tracker never confirms that unit or anything after it.
    pub(crate) fn failed(&mut self, _t: Ticket) {
        self.poisoned = true;
    }

    /// No unit is open or waiting: everything received has been acknowledged.
    pub(crate) fn idle(&self) -> bool {
        self.units.is_empty() && !self.poisoned
    }

    /// With nothing in flight, a keepalive's WAL end may be confirmed: every transaction that
    /// committed before it has been received (the walsender sends records before keepalives)
    /// and acknowledged. Never moves backwards.
    pub(crate) fn idle_at(&mut self, wal_end: Lsn) {
        if self.idle() && wal_end > self.confirmable {
            self.confirmable = wal_end;
        }
    }

    /// The position the slot may be confirmed to (0/0 until something is acknowledged).
    pub(crate) fn confirmable(&self) -> Lsn {
        self.confirmable
    }

    fn advance(&mut self) {
        if self.poisoned {
            return;
        }
        while let Some(id) = self.order.front() {
            let Some(u) = self.units.get(id) else {
                self.order.pop_front();
                continue;
            };
            if u.complete && u.pending == 0 {
                if u.commit_lsn > self.confirmable {
                    self.confirmable = u.commit_lsn;
                }
                self.units.remove(id);
                self.order.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slot_is_not_confirmed_before_kafka_acks() {
        let mut t = AckTracker::new();
        let a = t.unit_for(Lsn(100));
        t.produced(a);
        t.produced(a);
        t.complete(a);
        assert_eq!(t.confirmable(), Lsn(0));
        t.acked(a);
        assert_eq!(t.confirmable(), Lsn(0), "one message still unacknowledged");
        t.acked(a);
        assert_eq!(t.confirmable(), Lsn(100));
        assert!(t.idle());
    }

    #[test]
    fn a_later_transaction_acked_first_waits_for_the_earlier_one() {
        let mut t = AckTracker::new();
        let a = t.unit_for(Lsn(100));
        t.produced(a);
        t.complete(a);
        let b = t.unit_for(Lsn(200));
        t.produced(b);
        t.complete(b);
        t.acked(b);
        assert_eq!(t.confirmable(), Lsn(0));
        t.acked(a);
        assert_eq!(t.confirmable(), Lsn(200));
    }

    #[test]
    fn an_incomplete_transaction_is_not_confirmed_even_when_acked() {
        let mut t = AckTracker::new();
        let a = t.unit_for(Lsn(100));
        t.produced(a);
        t.acked(a);
        assert_eq!(
            t.confirmable(),
            Lsn(0),
            "C not seen yet: more records may come"
        );
        assert!(!t.idle());
        t.idle_at(Lsn(500));
        assert_eq!(
            t.confirmable(),
            Lsn(0),
            "a keepalive does not confirm past open work"
        );
        t.complete(a);
        assert_eq!(t.confirmable(), Lsn(100));
        t.idle_at(Lsn(500));
        assert_eq!(t.confirmable(), Lsn(500));
    }

    #[test]
    fn a_failed_delivery_stops_all_confirmation() {
        let mut t = AckTracker::new();
        let a = t.unit_for(Lsn(100));
        t.produced(a);
        t.complete(a);
        t.failed(a);
        t.acked(a);
        let b = t.unit_for(Lsn(200));
        t.produced(b);
        t.complete(b);
        t.acked(b);
        t.idle_at(Lsn(900));
        assert_eq!(t.confirmable(), Lsn(0));
    }

    #[test]
    fn a_transaction_committed_during_a_stream_is_confirmed_without_waiting_for_it() {
        let mut t = AckTracker::new();
        let x = t.streamed(7);
        t.produced(x);
        let a = t.unit_for(Lsn(100));
        t.produced(a);
        t.complete(a);
        t.acked(a);
        assert_eq!(
            t.confirmable(),
            Lsn(100),
            "x commits later: it is sent again after a restart from 100"
        );
        assert!(!t.idle(), "x is open");
        t.idle_at(Lsn(150));
        assert_eq!(
            t.confirmable(),
            Lsn(100),
            "a keepalive does not confirm past an open stream"
        );
        // x's second block, then its commit: confirmed once all its messages are acknowledged.
        assert_eq!(t.streamed(7), x);
        t.produced(x);
        let c = t.stream_end(7, Lsn(300));
        assert_eq!(c, x);
        t.produced(c);
        t.complete(c);
        t.acked(x);
        t.acked(x);
        assert_eq!(t.confirmable(), Lsn(100), "the C is not acknowledged yet");
        t.acked(c);
        assert_eq!(t.confirmable(), Lsn(300));
        assert!(t.idle());
    }

    #[test]
    fn a_streamed_transaction_waits_for_every_transaction_that_committed_before_it() {
        let mut t = AckTracker::new();
        let x = t.streamed(7);
        t.produced(x);
        t.acked(x);
        let a = t.unit_for(Lsn(100));
        t.produced(a);
        let c = t.stream_end(7, Lsn(200));
        t.produced(c);
        t.complete(c);
        t.acked(c);
        assert_eq!(
            t.confirmable(),
            Lsn(0),
            "a (committed first) is not acknowledged"
        );
        t.acked(a);
        assert_eq!(t.confirmable(), Lsn(200));
        // An aborted stream ends at its abort: confirmed past once its A is acknowledged.
        let y = t.streamed(8);
        t.produced(y);
        let ab = t.stream_end(8, Lsn(250));
        t.produced(ab);
        t.complete(ab);
        t.acked(y);
        assert_eq!(t.confirmable(), Lsn(200));
        t.acked(ab);
        assert_eq!(t.confirmable(), Lsn(250));
    }

    /// The invariant: nothing at or past the commit of an unacknowledged message is
    /// confirmable (`outstanding`: each message's ticket and its transaction's commit).
    fn check(t: &AckTracker, outstanding: &[(Ticket, Lsn)]) {
        if let Some(m) = outstanding.iter().map(|o| o.1).min() {
            assert!(
                t.confirmable() < m,
                "confirmed {} while {} unacknowledged",
                t.confirmable(),
                m
            );
        }
    }

    proptest! {
        /// Streamed transactions interleaved with ordinary ones, acknowledgements in any order
        /// and at any time: the confirmable LSN never passes the commit of a transaction with
        /// an unacknowledged message, and ends at the last commit.
        #[test]
        fn streamed_transactions_never_let_the_confirmed_lsn_pass_an_unacknowledged_message(
            txs in prop::collection::vec((0u64..4, any::<bool>(), 0usize..4), 1..10),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..80),
        ) {
            let mut t = AckTracker::new();
            // (ticket, the commit position of its transaction)
            let mut outstanding: Vec<(Ticket, Lsn)> = Vec::new();
            let lsn = |i: usize| Lsn(100 * (i as u64 + 1));
            let mut acks = order.into_iter();
            for j in 0..txs.len() {
                // Blocks of the streamed transactions open at this point (transaction i starts
                // streaming `back` commits before its own).
                for (i, (_, streamed, back)) in txs.iter().enumerate().skip(j) {
                    if *streamed && i.saturating_sub(*back) <= j {
                        let tk = t.streamed(i as u64);
                        t.produced(tk);
                        outstanding.push((tk, lsn(i)));
                    }
                }
                let (n, streamed, _) = txs[j];
                let tk = if streamed { t.stream_end(j as u64, lsn(j)) } else { t.unit_for(lsn(j)) };
                for _ in 0..n.max(u64::from(streamed)) {
                    t.produced(tk);
                    outstanding.push((tk, lsn(j)));
                }
                t.complete(tk);
                check(&t, &outstanding);
                // Some acknowledgements arrive meanwhile.
                for idx in acks.by_ref().take(2) {
                    if outstanding.is_empty() { break; }
                    let (tk, _) = outstanding.remove(idx.index(outstanding.len()));
                    t.acked(tk);
                    check(&t, &outstanding);
                }
            }
            while let Some((tk, _)) = outstanding.pop() {
                t.acked(tk);
                check(&t, &outstanding);
            }
            prop_assert_eq!(t.confirmable(), lsn(txs.len() - 1));
            prop_assert!(t.idle());
        }


        /// Whatever the order of acknowledgements, the confirmable LSN never passes a unit with
        /// an unacknowledged message, and ends at the last unit once all are acknowledged.
        #[test]
        fn the_confirmed_lsn_never_passes_an_unacknowledged_message(
            sizes in prop::collection::vec(0u64..5, 1..12),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        ) {
            let mut t = AckTracker::new();
            let mut outstanding: Vec<(Ticket, Lsn)> = Vec::new();
            let mut lsns = Vec::new();
            for (i, n) in sizes.iter().enumerate() {
                let lsn = Lsn(100 * (i as u64 + 1));
                lsns.push(lsn);
                let tk = t.unit_for(lsn);
                for _ in 0..*n {
                    t.produced(tk);
                    outstanding.push((tk, lsn));
                }
                t.complete(tk);
            }
            check(&t, &outstanding);
            for idx in order {
                if outstanding.is_empty() { break; }
                let (tk, _) = outstanding.remove(idx.index(outstanding.len()));
                t.acked(tk);
                check(&t, &outstanding);
            }
            while let Some((tk, _)) = outstanding.pop() {
                t.acked(tk);
                check(&t, &outstanding);
            }
            prop_assert_eq!(t.confirmable(), *lsns.last().unwrap());
            prop_assert!(t.idle());
        }
    }
}
