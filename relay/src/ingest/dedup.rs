//! The event ids Kafka acknowledged recently, so that a retried batch is not produced twice.
//! Pure: the clock is an argument.
//!
//! A client that got no answer (a timeout, a 503, a crash) sends the batch again with the same
//! `metadata.eid` values; events whose eid is here are answered 200 without being produced
//! again. The window is bounded in time (`ingest.dedup_window`) and in count
//! (`ingest.dedup_capacity`, oldest first out), and it is per relay process: a retry that
//! reaches another ingest relay, or comes after a restart, is produced again, and consumers
//! tell the copies by `eid` (docs/ingest.md).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// An event type and an event id.
type Key = (String, String);

pub(crate) struct Recent {
    window: Duration,
    capacity: usize,
    seen: HashMap<Key, Instant>,
    /// Insertion order, for expiry: (key, when it was inserted).
    order: VecDeque<(Key, Instant)>,
}

impl Recent {
    pub(crate) fn new(window: Duration, capacity: usize) -> Recent {
        Recent {
            window,
            capacity,
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, at)) = self.order.front() {
            let too_old = now.duration_since(*at) > self.window;
            if !too_old && self.order.len() <= self.capacity {
                break;
            }
            // A key inserted again later keeps its newer entry.
            if self.seen.get(key) == Some(at) {
                self.seen.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// Whether Kafka acknowledged this event of this type within the window.
    pub(crate) fn contains(&mut self, event_type: &str, eid: &str, now: Instant) -> bool {
        self.expire(now);
        self.seen
            .contains_key(&(event_type.to_string(), eid.to_string()))
    }

    /// Kafka acknowledged this event.
    pub(crate) fn insert(&mut self, event_type: &str, eid: &str, now: Instant) {
        let key = (event_type.to_string(), eid.to_string());
        self.seen.insert(key.clone(), now);
        self.order.push_back((key, now));
        self.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_acknowledged_eid_is_known_for_the_window_and_per_event_type() {
        let t0 = Instant::now();
        let mut r = Recent::new(Duration::from_secs(60), 100);
        r.insert("a", "e1", t0);
        assert!(r.contains("a", "e1", t0 + Duration::from_secs(59)));
        assert!(!r.contains("b", "e1", t0), "another event type");
        assert!(
            !r.contains("a", "e1", t0 + Duration::from_secs(61)),
            "past the window"
        );
        assert!(r.seen.is_empty() && r.order.is_empty());
    }

    #[test]
    fn the_oldest_eids_leave_first_beyond_the_capacity() {
        let t0 = Instant::now();
        let mut r = Recent::new(Duration::from_secs(60), 2);
        r.insert("a", "e1", t0);
        r.insert("a", "e2", t0);
        r.insert("a", "e3", t0);
        assert!(!r.contains("a", "e1", t0));
        assert!(r.contains("a", "e2", t0) && r.contains("a", "e3", t0));
        // Inserted again, an eid keeps its newer time.
        r.insert("a", "e2", t0 + Duration::from_secs(30));
        assert!(r.contains("a", "e2", t0 + Duration::from_secs(80)));
        assert!(!r.contains("a", "e3", t0 + Duration::from_secs(80)));
    }
}
