//! Latency fault tolerance (RocketMQ's LatencyFaultTolerance): a broker whose send failed, or
//! was slow, is avoided for a while so sends go to the others. Pure: time is passed in.
//!
//! orbitmq's isolation periods are shorter than RocketMQ's (which reach 10 minutes): a broker
//! that is back is used again within a minute, and a restarted one within
//! [`DEFAULT_FAILURE_ISOLATION`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Send latencies at or above each threshold...
pub const LATENCY_STEPS: [Duration; 7] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(550),
    Duration::from_millis(1000),
    Duration::from_millis(2000),
    Duration::from_millis(3000),
    Duration::from_millis(15000),
];
/// ...make the broker unavailable this long (same index).
pub const NOT_AVAILABLE_FOR: [Duration; 7] = [
    Duration::ZERO,
    Duration::ZERO,
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
];
/// How long a broker whose send failed (connect, timeout, busy) is avoided.
pub const DEFAULT_FAILURE_ISOLATION: Duration = Duration::from_secs(30);
/// Brokers tracked; the oldest entries go beyond it.
pub const MAX_TRACKED_BROKERS: usize = 1024;

/// How long a send of this latency makes its broker unavailable.
pub fn not_available_for(latency: Duration) -> Duration {
    LATENCY_STEPS
        .iter()
        .rposition(|step| latency >= *step)
        .map_or(Duration::ZERO, |i| NOT_AVAILABLE_FOR[i])
}

#[derive(Clone, Debug)]
struct Item {
    latency: Duration,
    available_at: Instant,
}

#[derive(Debug)]
pub struct LatencyFaultTolerance {
    failure_isolation: Duration,
    items: HashMap<String, Item>,
}

impl LatencyFaultTolerance {
    pub fn new(failure_isolation: Duration) -> LatencyFaultTolerance {
        LatencyFaultTolerance {
            failure_isolation,
            items: HashMap::new(),
        }
    }

    fn put(&mut self, broker: &str, latency: Duration, available_at: Instant) {
        if !self.items.contains_key(broker) && self.items.len() >= MAX_TRACKED_BROKERS {
            // Make room: the entry that is available again soonest matters least.
            if let Some(k) = self
                .items
                .iter()
                .min_by_key(|(_, i)| i.available_at)
                .map(|(k, _)| k.clone())
            {
                self.items.remove(&k);
            }
        }
        self.items.insert(
            broker.to_owned(),
            Item {
                latency,
                available_at,
            },
        );
    }

    /// A send to `broker` answered after `latency`.
    pub fn record_success(&mut self, broker: &str, latency: Duration, now: Instant) {
        let d = not_available_for(latency);
        if d.is_zero() {
            // Fast again: forget any past penalty.
            self.items.remove(broker);
        } else {
            self.put(broker, latency, now + d);
        }
    }

    /// A send to `broker` failed (could not connect, timed out, broker busy).
    pub fn record_failure(&mut self, broker: &str, now: Instant) {
        self.put(broker, self.failure_isolation, now + self.failure_isolation);
    }

    pub fn is_available(&self, broker: &str, now: Instant) -> bool {
        self.items.get(broker).is_none_or(|i| now >= i.available_at)
    }

    /// The last latency recorded for a broker that is being avoided.
    pub fn latency(&self, broker: &str) -> Option<Duration> {
        self.items.get(broker).map(|i| i.latency)
    }

    /// Forgets a broker (it left the route).
    pub fn remove(&mut self, broker: &str) {
        self.items.remove(broker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_steps_map_to_isolation() {
        assert_eq!(not_available_for(Duration::from_millis(10)), Duration::ZERO);
        assert_eq!(
            not_available_for(Duration::from_millis(549)),
            Duration::ZERO
        );
        assert_eq!(
            not_available_for(Duration::from_millis(550)),
            Duration::from_secs(2)
        );
        assert_eq!(
            not_available_for(Duration::from_millis(2500)),
            Duration::from_secs(10)
        );
        assert_eq!(
            not_available_for(Duration::from_secs(100)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn failed_and_slow_brokers_are_avoided_for_a_while() {
        let t0 = Instant::now();
        let mut f = LatencyFaultTolerance::new(Duration::from_secs(30));
        assert!(f.is_available("a", t0));
        f.record_failure("a", t0);
        assert!(!f.is_available("a", t0 + Duration::from_secs(29)));
        assert!(f.is_available("a", t0 + Duration::from_secs(30)));
        assert!(f.is_available("b", t0));
        f.record_success("b", Duration::from_millis(1200), t0);
        assert!(!f.is_available("b", t0 + Duration::from_secs(4)));
        assert_eq!(f.latency("b"), Some(Duration::from_millis(1200)));
        f.record_success("b", Duration::from_millis(3), t0);
        assert!(f.is_available("b", t0), "a fast answer clears the penalty");
        f.remove("a");
        assert!(f.is_available("a", t0));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut f = LatencyFaultTolerance::new(Duration::from_secs(30));
        for i in 0..MAX_TRACKED_BROKERS + 10 {
            f.record_failure(&format!("b{i}"), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(f.items.len(), MAX_TRACKED_BROKERS);
        assert!(
            f.is_available("b0", t0),
            "the soonest-available entry went first"
        );
    }
}
