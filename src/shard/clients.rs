//! The clients a broker has heard from (RocketMQ's ConsumerManager / ProducerManager): client
//! ids per group with the time of their last heartbeat. Pure: time is passed in. The consumer
//! list per group is what rebalancing reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// RocketMQ's `channelExpiredTimeout`: a client silent this long is dropped.
pub const DEFAULT_CLIENT_EXPIRY: Duration = Duration::from_secs(120);
/// Groups a broker tracks; heartbeats naming more new groups are ignored past it.
pub const MAX_TRACKED_GROUPS: usize = 100_000;
/// Clients tracked per group.
pub const MAX_CLIENTS_PER_GROUP: usize = 10_000;

#[derive(Default, Debug)]
struct Groups {
    by_group: BTreeMap<String, BTreeMap<String, Instant>>,
}

impl Groups {
    fn touch(&mut self, group: &str, client: &str, now: Instant) -> bool {
        if !self.by_group.contains_key(group) && self.by_group.len() >= MAX_TRACKED_GROUPS {
            return false;
        }
        let g = self.by_group.entry(group.to_owned()).or_default();
        if !g.contains_key(client) && g.len() >= MAX_CLIENTS_PER_GROUP {
            return false;
        }
        g.insert(client.to_owned(), now);
        true
    }

    fn remove_client(&mut self, client: &str) {
        for g in self.by_group.values_mut() {
            g.remove(client);
        }
        self.by_group.retain(|_, g| !g.is_empty());
    }

    fn expire(&mut self, now: Instant, expiry: Duration) -> usize {
        let mut n = 0;
        for g in self.by_group.values_mut() {
            let before = g.len();
            g.retain(|_, seen| now.saturating_duration_since(*seen) < expiry);
            n += before - g.len();
        }
        self.by_group.retain(|_, g| !g.is_empty());
        n
    }

    fn live(&self, group: &str, now: Instant, expiry: Duration) -> Vec<String> {
        self.by_group
            .get(group)
            .map(|g| {
                g.iter()
                    .filter(|(_, seen)| now.saturating_duration_since(**seen) < expiry)
                    .map(|(c, _)| c.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Producers and consumers per group.
#[derive(Debug)]
pub struct ClientRegistry {
    expiry: Duration,
    consumers: Groups,
    producers: Groups,
}

impl ClientRegistry {
    pub fn new(expiry: Duration) -> ClientRegistry {
        ClientRegistry {
            expiry,
            consumers: Groups::default(),
            producers: Groups::default(),
        }
    }

    /// Records a heartbeat; returns whether a consumer group gained a member.
    pub fn heartbeat(
        &mut self,
        client_id: &str,
        producer_groups: &[String],
        consumer_groups: &[String],
        now: Instant,
    ) -> bool {
        self.expire(now);
        let mut joined = false;
        for g in consumer_groups {
            let new = !self
                .consumers
                .live(g, now, self.expiry)
                .iter()
                .any(|c| c == client_id);
            joined |= self.consumers.touch(g, client_id, now) && new;
        }
        for g in producer_groups {
            self.producers.touch(g, client_id, now);
        }
        joined
    }

    /// A client that shut down cleanly.
    pub fn unregister(&mut self, client_id: &str) {
        self.consumers.remove_client(client_id);
        self.producers.remove_client(client_id);
    }

    /// Drops clients silent for the expiry; returns how many entries went.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.consumers.expire(now, self.expiry) + self.producers.expire(now, self.expiry)
    }

    /// The live consumers of a group, sorted by client id.
    pub fn consumers(&self, group: &str, now: Instant) -> Vec<String> {
        self.consumers.live(group, now, self.expiry)
    }

    pub fn producers(&self, group: &str, now: Instant) -> Vec<String> {
        self.producers.live(group, now, self.expiry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_per_group_expire_when_silent() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(120);
        let mut r = ClientRegistry::new(exp);
        let g = |s: &str| vec![s.to_string()];
        assert!(r.heartbeat("c2", &[], &g("G"), t0));
        assert!(r.heartbeat("c1", &g("P"), &g("G"), t0));
        assert!(!r.heartbeat("c1", &g("P"), &g("G"), t0), "already a member");
        assert_eq!(r.consumers("G", t0), vec!["c1", "c2"]);
        assert_eq!(r.producers("P", t0), vec!["c1"]);
        assert!(r.consumers("Other", t0).is_empty());
        let t1 = t0 + Duration::from_secs(100);
        r.heartbeat("c1", &[], &g("G"), t1);
        assert_eq!(r.consumers("G", t0 + exp), vec!["c1"], "c2 is silent");
        assert_eq!(r.expire(t0 + exp), 2, "c2 in G and c1 in P");
        assert!(r.producers("P", t0 + exp).is_empty());
        r.unregister("c1");
        assert!(r.consumers("G", t1).is_empty());
    }
}
