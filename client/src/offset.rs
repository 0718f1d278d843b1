//! Offset tracking for one queue of a push consumer: which messages were pulled and are not
//! yet consumed, where the next pull starts, and which offset may be committed.
//!
//! The committed offset is the next offset to consume after a restart: the lowest offset
//! still in flight (so a message being consumed, or waiting to be consumed again, is never
//! skipped), or the next pull offset when nothing is in flight. Never the highest seen.

use std::collections::BTreeMap;

/// Where a consumer group with no committed offset starts on a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsumeFromWhere {
    /// The queue's max offset: only messages sent from now on (RocketMQ's default).
    #[default]
    LastOffset,
    /// The queue's min offset: everything still stored.
    FirstOffset,
    /// The first message stored at or after this time (ms since the epoch).
    Timestamp(u64),
}

/// The in-flight messages and offsets of one queue.
#[derive(Clone, Debug)]
pub struct OffsetTracker {
    /// Pulled, not yet consumed: queue offset -> body bytes.
    in_flight: BTreeMap<u64, u32>,
    in_flight_bytes: u64,
    /// Where the next pull starts.
    next_pull: u64,
    /// The offset last committed to the broker.
    committed: Option<u64>,
    /// Bumped by [`OffsetTracker::reset`]: completions from before a reset are ignored.
    epoch: u64,
}

impl OffsetTracker {
    pub fn new(start: u64) -> OffsetTracker {
        OffsetTracker {
            in_flight: BTreeMap::new(),
            in_flight_bytes: 0,
            next_pull: start,
            committed: None,
            epoch: 0,
        }
    }

    /// Starts from an offset the broker already has committed for the group.
    pub fn from_committed(offset: u64) -> OffsetTracker {
        let mut t = OffsetTracker::new(offset);
        t.committed = Some(offset);
        t
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn next_pull_offset(&self) -> u64 {
        self.next_pull
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight.len()
    }

    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Records a pull: `msgs` (queue offset, body bytes) are handed to the listener and
    /// `next_offset` is where the next pull starts. Offsets the client filtered out (tag
    /// mismatch) are simply not listed: they are skipped, never in flight. Returns false
    /// (and changes nothing) when the result belongs to an older epoch or does not start
    /// where the last pull ended (a stale or duplicated response).
    pub fn on_pulled(
        &mut self,
        epoch: u64,
        pulled_from: u64,
        msgs: &[(u64, u32)],
        next_offset: u64,
    ) -> bool {
        if epoch != self.epoch || pulled_from != self.next_pull || next_offset < self.next_pull {
            return false;
        }
        for &(off, bytes) in msgs {
            debug_assert!(
                off >= pulled_from && off < next_offset,
                "pulled offset out of range"
            );
            if off < pulled_from || off >= next_offset {
                continue;
            }
            if self.in_flight.insert(off, bytes).is_none() {
                self.in_flight_bytes += u64::from(bytes);
            }
        }
        self.next_pull = next_offset;
        true
    }

    /// A message was consumed (or will never be again). Returns whether it was in flight.
    pub fn on_consumed(&mut self, epoch: u64, offset: u64) -> bool {
        if epoch != self.epoch {
            return false;
        }
        match self.in_flight.remove(&offset) {
            Some(bytes) => {
                self.in_flight_bytes -= u64::from(bytes);
                true
            }
            None => false,
        }
    }

    /// Whether `offset` is still waiting to be consumed in this epoch.
    pub fn is_in_flight(&self, epoch: u64, offset: u64) -> bool {
        epoch == self.epoch && self.in_flight.contains_key(&offset)
    }

    /// The offset to commit: the lowest in flight, else the next pull offset.
    pub fn commit_offset(&self) -> u64 {
        self.in_flight
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_pull)
    }

    /// The offset to commit if it differs from the last committed one.
    pub fn pending_commit(&self) -> Option<u64> {
        let c = self.commit_offset();
        (self.committed != Some(c)).then_some(c)
    }

    pub fn mark_committed(&mut self, offset: u64) {
        self.committed = Some(offset);
    }

    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// Moves the queue to `offset` (a seek, or the broker's PULL_OFFSET_MOVED): everything in
    /// flight is forgotten and completions of it will be ignored.
    pub fn reset(&mut self, offset: u64) {
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.next_pull = offset;
        self.epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_the_lowest_offset_in_flight() {
        let mut t = OffsetTracker::new(10);
        assert_eq!(t.commit_offset(), 10);
        assert_eq!(t.pending_commit(), Some(10));
        assert!(t.on_pulled(0, 10, &[(10, 1), (11, 1), (12, 1), (13, 1)], 14));
        assert_eq!(t.next_pull_offset(), 14);
        assert_eq!(t.in_flight_count(), 4);
        // Consumed out of order: the commit offset waits for 10.
        assert!(t.on_consumed(0, 12));
        assert!(t.on_consumed(0, 11));
        assert_eq!(t.commit_offset(), 10);
        assert!(t.on_consumed(0, 10));
        assert_eq!(t.commit_offset(), 13);
        assert!(t.on_consumed(0, 13));
        assert_eq!(t.commit_offset(), 14);
        assert!(!t.on_consumed(0, 13), "twice is a no-op");
        assert_eq!(t.in_flight_bytes(), 0);
    }

    #[test]
    fn commit_never_passes_a_message_waiting_for_reconsumption() {
        let mut t = OffsetTracker::from_committed(0);
        assert_eq!(t.pending_commit(), None);
        t.on_pulled(0, 0, &[(0, 5), (1, 5), (2, 5)], 3);
        // 1 asked to be reconsumed later: it stays in flight while 0 and 2 complete, and
        // further pulls go on.
        t.on_consumed(0, 0);
        t.on_consumed(0, 2);
        assert!(t.on_pulled(0, 3, &[(3, 5)], 4));
        t.on_consumed(0, 3);
        assert_eq!(t.commit_offset(), 1);
        assert_eq!(t.pending_commit(), Some(1));
        t.mark_committed(1);
        assert_eq!(t.pending_commit(), None);
        assert!(t.is_in_flight(0, 1));
        t.on_consumed(0, 1);
        assert_eq!(t.commit_offset(), 4);
    }

    #[test]
    fn filtered_offsets_are_skipped_not_held() {
        let mut t = OffsetTracker::new(0);
        // 0..5 pulled, only 1 and 3 matched the tag: 0, 2, 4 are never in flight.
        t.on_pulled(0, 0, &[(1, 1), (3, 1)], 5);
        assert_eq!(t.commit_offset(), 1);
        t.on_consumed(0, 1);
        t.on_consumed(0, 3);
        assert_eq!(t.commit_offset(), 5);
        // A pull where nothing matched still advances.
        t.on_pulled(0, 5, &[], 9);
        assert_eq!(t.commit_offset(), 9);
    }

    #[test]
    fn stale_results_and_completions_are_ignored() {
        let mut t = OffsetTracker::new(0);
        t.on_pulled(0, 0, &[(0, 1), (1, 1)], 2);
        // A duplicated response for offset 0 does not rewind or double count.
        assert!(!t.on_pulled(0, 0, &[(0, 1), (1, 1)], 2));
        assert_eq!(t.in_flight_count(), 2);
        // Seek: old completions no longer count.
        t.reset(100);
        assert_eq!(t.epoch(), 1);
        assert_eq!(t.commit_offset(), 100);
        assert!(!t.on_consumed(0, 0));
        assert!(!t.on_pulled(0, 100, &[(100, 1)], 101), "old epoch");
        assert!(t.on_pulled(1, 100, &[(100, 1)], 101));
        assert_eq!(t.commit_offset(), 100);
        // Seeking backwards is allowed and commits the earlier offset.
        t.reset(50);
        assert_eq!(t.pending_commit(), Some(50));
    }
}
