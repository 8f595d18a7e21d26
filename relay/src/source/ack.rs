//! Which LSN the source relay may confirm to the slot.
//!
//! **Invariant (docs/relay.md): the slot never advances past an unacknowledged change.** The
//! confirmable position is the `commit_lsn` of the newest transaction whose messages, and every
//! earlier transaction's messages, Kafka has acknowledged, and whose last record has been seen.
//! Pure: no I/O; the property tests drive it with every order of acknowledgements.

use std::collections::VecDeque;

use saiki_core::Lsn;

/// A unit to confirm as a whole: a transaction (all records with one `commit_lsn`), or one
/// non-transactional message.
#[derive(Debug)]
struct Unit {
    id: u64,
    commit_lsn: Lsn,
    /// Messages produced for it and not yet acknowledged.
    pending: u64,
    /// Its last record has been seen (`C`, or the message itself): no more messages come.
    complete: bool,
}

/// Tracks units in stream order.
#[derive(Debug, Default)]
pub(crate) struct AckTracker {
    units: VecDeque<Unit>,
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

    /// The unit for a record with this `commit_lsn`: the open one if it has the same
    /// `commit_lsn`, a new one otherwise. Records arrive in commit order, so a new commit_lsn
    /// means the previous transaction's records are all seen.
    pub(crate) fn unit_for(&mut self, commit_lsn: Lsn) -> Ticket {
        if let Some(last) = self.units.back_mut() {
            if last.commit_lsn == commit_lsn && !last.complete {
                return Ticket(last.id);
            }
            last.complete = true;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.units.push_back(Unit {
            id,
            commit_lsn,
            pending: 0,
            complete: false,
        });
        Ticket(id)
    }

    /// A message of the unit was handed to the producer.
    pub(crate) fn produced(&mut self, t: Ticket) {
        if let Some(u) = self.find(t) {
            u.pending += 1;
        }
    }

    /// The unit's last record has been seen.
    pub(crate) fn complete(&mut self, t: Ticket) {
        if let Some(u) = self.find(t) {
            u.complete = true;
        }
        self.advance();
    }

    /// Kafka acknowledged one message of the unit.
    pub(crate) fn acked(&mut self, t: Ticket) {
        if let Some(u) = self.find(t) {
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

    fn find(&mut self, t: Ticket) -> Option<&mut Unit> {
        // Tickets are issued in increasing order and units leave from the front.
        let first = self.units.front()?.id;
        let idx = t.0.checked_sub(first)? as usize;
        self.units.get_mut(idx)
    }

    fn advance(&mut self) {
        if self.poisoned {
            return;
        }
        while let Some(u) = self.units.front() {
            if u.complete && u.pending == 0 {
                if u.commit_lsn > self.confirmable {
                    self.confirmable = u.commit_lsn;
                }
                self.units.pop_front();
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

    proptest! {
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
            let check = |t: &AckTracker, outstanding: &Vec<(Ticket, Lsn)>| {
                let min_unacked = outstanding.iter().map(|o| o.1).min();
                if let Some(m) = min_unacked {
                    assert!(t.confirmable() < m, "confirmed {} while {} unacknowledged", t.confirmable(), m);
                }
            };
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
