//! The consumer group watch: notices a rebalance that never completes.
//!
//! Invariant: the sink's session ends (and rejoins with a new consumer) only when the group
//! has been unsettled, without a break, for longer than `sink.rejoin_timeout` while the
//! sink is subscribed. A group that settles, even on an empty assignment (another member
//! holds every partition), is never restarted; a new subscription starts the clock again.
//!
//! librdkafka reports its side of the group in the statistics (`cgrp.join_state`, every
//! `topic_refresh`): `steady` once the group has synced and the assignment is in place. A
//! broker that never completes the group's rejoin leaves it elsewhere (`wait-join`,
//! `wait-sync`) for good, with the partitions revoked and the sink idle and silent. tansu
//! 0.6.0 did (docs/testing.md, "A rejoin that never completes"); on Kafka a rebalance is
//! bounded by the members' `max.poll.interval.ms`, whose default is the timeout's.

use std::time::{Duration, Instant};

/// librdkafka's join state of a group whose assignment is in place.
const STEADY: &str = "steady";

/// Since when, and in which join state, the group has been unsettled.
#[derive(Debug, Default)]
pub(crate) struct GroupWatch {
    unsettled: Option<(Instant, String)>,
}

impl GroupWatch {
    /// A statistics report of the group's join state.
    pub(crate) fn observe(&mut self, join_state: &str, now: Instant) {
        if join_state == STEADY {
            self.unsettled = None;
        } else {
            match &mut self.unsettled {
                Some((_, state)) => join_state.clone_into(state),
                None => self.unsettled = Some((now, join_state.to_string())),
            }
        }
    }

    /// The subscription changed: the rebalance it starts gets the whole timeout.
    pub(crate) fn subscribed(&mut self) {
        self.unsettled = None;
    }

    /// How long the group has been unsettled and its join state, once past `timeout`.
    pub(crate) fn stalled(&self, now: Instant, timeout: Duration) -> Option<(Duration, &str)> {
        let (since, state) = self.unsettled.as_ref()?;
        let for_ = now.saturating_duration_since(*since);
        (for_ > timeout).then_some((for_, state.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn a_group_unsettled_past_the_timeout_is_stalled_and_names_its_state() {
        let t0 = Instant::now();
        let mut w = GroupWatch::default();
        w.observe("wait-join", t0);
        w.observe("wait-sync", t0 + Duration::from_secs(30));
        assert_eq!(w.stalled(t0 + Duration::from_secs(59), T), None);
        let (for_, state) = w.stalled(t0 + Duration::from_secs(61), T).unwrap();
        assert_eq!(for_, Duration::from_secs(61));
        assert_eq!(state, "wait-sync");
    }

    #[test]
    fn a_group_that_settles_in_between_starts_the_clock_again() {
        let t0 = Instant::now();
        let mut w = GroupWatch::default();
        w.observe("wait-join", t0);
        w.observe("steady", t0 + Duration::from_secs(50));
        w.observe("wait-join", t0 + Duration::from_secs(55));
        assert_eq!(w.stalled(t0 + Duration::from_secs(100), T), None);
        assert!(w.stalled(t0 + Duration::from_secs(116), T).is_some());
    }

    #[test]
    fn a_new_subscription_gets_the_whole_timeout() {
        let t0 = Instant::now();
        let mut w = GroupWatch::default();
        // Unsubscribed, librdkafka's group stays in `init`.
        w.observe("init", t0);
        w.subscribed();
        w.observe("wait-join", t0 + Duration::from_secs(600));
        assert_eq!(w.stalled(t0 + Duration::from_secs(630), T), None);
    }

    #[test]
    fn a_steady_group_is_never_stalled() {
        let t0 = Instant::now();
        let mut w = GroupWatch::default();
        w.observe("steady", t0);
        assert_eq!(w.stalled(t0 + Duration::from_secs(3600), T), None);
    }
}
