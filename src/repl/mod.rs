//! Master/slave replication (RocketMQ's HA), shard by shard: slave shard k copies master shard
//! k's CommitLog byte for byte, so log offsets, message ids and queue offsets are the same on
//! both, and the slave builds its own ConsumeQueues and key index from the copy.
//!
//! - The slave asks the master (`HA_PULL`) for the log from its own written end. That offset
//!   also acknowledges every byte below it. The master answers with whole records, waiting up
//!   to [`HA_PULL_WAIT`] for new ones (an empty answer doubles as a heartbeat).
//! - `SYNC_MASTER`: a send is answered once a slave in sync has acknowledged its records:
//!   `SLAVE_NOT_AVAILABLE` when no slave is in sync (none heard from within
//!   [`SLAVE_SILENT_AFTER`], or more than `haMaxGapNotInSync` behind), `FLUSH_SLAVE_TIMEOUT`
//!   after `syncFlushTimeout`. Either way the message is stored on the master.
//! - A slave takes no writes; it serves pulls, offsets and queries. Its topics follow the
//!   master's, and it copies the master's committed consumer offsets every
//!   [`OFFSETS_SYNC_PERIOD`] (offsets committed to the slave itself while its master is gone
//!   are kept until the master's next copy overwrites them).
//!
//! Pure parts here; the master's requests in `shard/ha.rs`, the slave's copier in `slave.rs`,
//! and master discovery with the topic sync in `sync.rs`.

pub mod slave;
pub mod sync;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// RocketMQ's `haMaxGapNotInSync`: a slave further behind than this is not in sync.
pub const DEFAULT_MAX_GAP: u64 = 256 * 1024 * 1024;
/// `syncFlushTimeout`: how long a SYNC_MASTER send waits for its slave. RocketMQ's 5 s would
/// outlast the client's 3 s send timeout, which would then report a stored message as timed
/// out instead of FLUSH_SLAVE_TIMEOUT.
pub const DEFAULT_SLAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest `syncFlushTimeout` accepted (short ones are for tests).
pub const MIN_SLAVE_TIMEOUT_MS: u64 = 100;
/// How long a master holds a slave's pull for new bytes before answering it empty.
pub const HA_PULL_WAIT: Duration = Duration::from_secs(1);
/// A slave not heard from for this long is not in sync (it pulls at least every
/// [`HA_PULL_WAIT`] while connected; RocketMQ's housekeeping allows 20 s).
pub const SLAVE_SILENT_AFTER: Duration = Duration::from_secs(5);
/// Most bytes one pull answer carries (a record larger than this comes whole).
pub const HA_MAX_CHUNK: usize = 4 * 1024 * 1024;
/// Largest set of committed offsets a slave copies at once (in the offsets file's format;
/// within a frame).
pub const MAX_OFFSETS_BYTES: usize = 12 * 1024 * 1024;
const _: () = assert!(MAX_OFFSETS_BYTES < orbitmq_proto::limits::MAX_FRAME_LEN);
/// How often a slave copies its master's consumer offsets (RocketMQ: every 10 s).
pub const OFFSETS_SYNC_PERIOD: Duration = Duration::from_secs(5);
/// Slaves one master shard keeps track of.
pub const MAX_SLAVES: usize = 16;

/// Replication settings from broker.conf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaConfig {
    /// `haMasterAddress`: a slave's master (its shard 0 endpoint); otherwise the name servers
    /// say where the master of `brokerName` is.
    pub master_address: Option<String>,
    /// `haMaxGapNotInSync` in bytes.
    pub max_gap: u64,
    /// `syncFlushTimeout`.
    pub slave_timeout: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            master_address: None,
            max_gap: DEFAULT_MAX_GAP,
            slave_timeout: DEFAULT_SLAVE_TIMEOUT,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct SlaveProgress {
    acked: u64,
    seen: Instant,
}

/// What a master shard knows of its slaves' progress.
#[derive(Debug, Default)]
pub struct ReplicaTracker {
    slaves: BTreeMap<u64, SlaveProgress>,
}

impl ReplicaTracker {
    /// Slave `id` has everything below `acked`. False (nothing recorded) when a new slave
    /// would be one more than [`MAX_SLAVES`] heard from recently.
    pub fn report(&mut self, id: u64, acked: u64, now: Instant) -> bool {
        if !self.slaves.contains_key(&id) && self.slaves.len() >= MAX_SLAVES {
            self.slaves
                .retain(|_, s| now.saturating_duration_since(s.seen) < SLAVE_SILENT_AFTER);
            if self.slaves.len() >= MAX_SLAVES {
                return false;
            }
        }
        self.slaves.insert(id, SlaveProgress { acked, seen: now });
        true
    }

    /// The furthest offset a slave in sync has acknowledged: heard from within
    /// [`SLAVE_SILENT_AFTER`] and no more than `max_gap` behind `master_end`. `None`: no
    /// slave is in sync.
    pub fn in_sync(&self, now: Instant, master_end: u64, max_gap: u64) -> Option<u64> {
        self.slaves
            .values()
            .filter(|s| now.saturating_duration_since(s.seen) < SLAVE_SILENT_AFTER)
            .filter(|s| master_end.saturating_sub(s.acked) <= max_gap)
            .map(|s| s.acked)
            .max()
    }

    /// The furthest offset any slave has acknowledged. A SYNC_MASTER send that found a slave
    /// in sync waits for this to pass its records (as RocketMQ, in-sync is decided once, when
    /// the send starts to wait).
    pub fn acked(&self) -> Option<u64> {
        self.slaves.values().map(|s| s.acked).max()
    }

    /// Each slave: its id, acknowledged offset, how long ago it was heard from, and whether
    /// it is in sync (as [`Self::in_sync`] counts it).
    pub fn slaves(
        &self,
        now: Instant,
        master_end: u64,
        max_gap: u64,
    ) -> Vec<(u64, u64, Duration, bool)> {
        self.slaves
            .iter()
            .map(|(id, s)| {
                let silent = now.saturating_duration_since(s.seen);
                let in_sync =
                    silent < SLAVE_SILENT_AFTER && master_end.saturating_sub(s.acked) <= max_gap;
                (*id, s.acked, silent, in_sync)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slave_is_in_sync_while_heard_from_and_close_behind() {
        let t0 = Instant::now();
        let mut t = ReplicaTracker::default();
        assert_eq!(t.in_sync(t0, 100, 1000), None, "no slave yet");
        assert!(t.report(1, 50, t0));
        assert_eq!(t.in_sync(t0, 100, 1000), Some(50));
        assert_eq!(t.in_sync(t0, 2000, 1000), None, "too far behind");
        // The furthest of two slaves counts.
        assert!(t.report(2, 90, t0));
        assert_eq!(t.in_sync(t0, 100, 1000), Some(90));
        // Silent slaves drop out.
        let later = t0 + SLAVE_SILENT_AFTER;
        assert_eq!(t.in_sync(later, 100, 1000), None);
        assert!(t.report(1, 100, later));
        assert_eq!(t.in_sync(later, 100, 1000), Some(100));
    }

    #[test]
    fn slaves_tracked_are_bounded_but_silent_ones_make_room() {
        let t0 = Instant::now();
        let mut t = ReplicaTracker::default();
        for id in 1..=MAX_SLAVES as u64 {
            assert!(t.report(id, 0, t0));
        }
        assert!(!t.report(99, 0, t0), "one too many");
        assert!(t.report(1, 5, t0), "a known slave still reports");
        assert!(t.report(99, 0, t0 + SLAVE_SILENT_AFTER));
        assert_eq!(
            t.slaves(t0 + SLAVE_SILENT_AFTER, 0, 1),
            vec![(99, 0, Duration::ZERO, true)]
        );
    }

    #[test]
    fn the_furthest_acknowledgement_counts_whoever_sent_it() {
        let t0 = Instant::now();
        let mut t = ReplicaTracker::default();
        assert_eq!(t.acked(), None);
        t.report(1, 10, t0);
        t.report(2, 30, t0);
        t.report(1, 20, t0);
        assert_eq!(t.acked(), Some(30));
    }
}
