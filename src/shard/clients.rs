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
/// Clients whose connections are counted; past it, clients leave only by expiry.
pub const MAX_TRACKED_CONNECTION_CLIENTS: usize = 100_000;

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

    /// Removes a client everywhere; returns the groups it was in.
    fn remove_client(&mut self, client: &str) -> Vec<String> {
        let mut left = Vec::new();
        for (name, g) in self.by_group.iter_mut() {
            if g.remove(client).is_some() {
                left.push(name.clone());
            }
        }
        self.by_group.retain(|_, g| !g.is_empty());
        left
    }

    /// Drops silent clients; returns how many went and the groups that lost members.
    fn expire(&mut self, now: Instant, expiry: Duration) -> (usize, Vec<String>) {
        let mut n = 0;
        let mut changed = Vec::new();
        for (name, g) in self.by_group.iter_mut() {
            let before = g.len();
            g.retain(|_, seen| now.saturating_duration_since(*seen) < expiry);
            if g.len() != before {
                n += before - g.len();
                changed.push(name.clone());
            }
        }
        self.by_group.retain(|_, g| !g.is_empty());
        (n, changed)
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

/// A subscription: topic and tag expression.
/// A subscription: topic, expression type (`orbitmq_proto::sql::EXPR_TYPE_*`), expression.
pub type Sub = (String, u8, String);

/// Producers and consumers per group.
#[derive(Debug)]
pub struct ClientRegistry {
    expiry: Duration,
    consumers: Groups,
    producers: Groups,
    /// Subscriptions per group and consumer (sorted), from heartbeat bodies.
    subs: BTreeMap<String, BTreeMap<String, Vec<Sub>>>,
    /// Open connections each client has heartbeat on (any shard): when the last closes, the
    /// client is gone (RocketMQ drops a client when its channel closes).
    connections: BTreeMap<String, u32>,
}

/// Describes the disagreements among the members of one group: one line per distinct
/// subscription set naming the members that hold it, or nothing when all agree. Members
/// whose subscriptions are unknown (older clients) are left out.
pub fn subscription_conflicts(members: &[(String, Vec<Sub>)]) -> Vec<String> {
    let mut by_set: BTreeMap<Vec<&Sub>, Vec<&str>> = BTreeMap::new();
    for (client, subs) in members {
        // The group's retry topic is the client's own business (a push consumer subscribes
        // it, a lite pull consumer does not): it is no conflict.
        let subs: Vec<&Sub> = subs
            .iter()
            .filter(|(t, _, _)| !t.starts_with(orbitmq_proto::sys::RETRY_GROUP_TOPIC_PREFIX))
            .collect();
        if !subs.is_empty() {
            by_set.entry(subs).or_default().push(client);
        }
    }
    if by_set.len() < 2 {
        return Vec::new();
    }
    by_set
        .into_iter()
        .map(|(subs, clients)| {
            let subs: Vec<String> = subs
                .iter()
                .map(|(t, ty, e)| format!("{t}({})", orbitmq_proto::sql::display(*ty, e)))
                .collect();
            format!("{} subscribe to {}", clients.join(", "), subs.join(", "))
        })
        .collect()
}

impl ClientRegistry {
    pub fn new(expiry: Duration) -> ClientRegistry {
        ClientRegistry {
            expiry,
            consumers: Groups::default(),
            producers: Groups::default(),
            subs: BTreeMap::new(),
            connections: BTreeMap::new(),
        }
    }

    /// A client heartbeat on a connection it had not used before.
    pub fn connection_opened(&mut self, client_id: &str) {
        if self.connections.contains_key(client_id)
            || self.connections.len() < MAX_TRACKED_CONNECTION_CLIENTS
        {
            *self.connections.entry(client_id.to_owned()).or_default() += 1;
        }
    }

    /// A connection a client had heartbeat on closed: when it was its last, the client is
    /// unregistered. Returns the consumer groups that lost it.
    pub fn connection_closed(&mut self, client_id: &str) -> Vec<String> {
        let Some(n) = self.connections.get_mut(client_id) else {
            return Vec::new();
        };
        *n -= 1;
        if *n > 0 {
            return Vec::new();
        }
        self.connections.remove(client_id);
        self.unregister(client_id)
    }

    /// Records what a consumer subscribed to in a group it is a member of (ignored
    /// otherwise, so the map stays bounded by the membership).
    pub fn set_subscriptions(&mut self, client_id: &str, group: &str, mut subs: Vec<Sub>) {
        let member = self
            .consumers
            .by_group
            .get(group)
            .is_some_and(|g| g.contains_key(client_id));
        if !member {
            return;
        }
        subs.sort();
        subs.dedup();
        self.subs
            .entry(group.to_owned())
            .or_default()
            .insert(client_id.to_owned(), subs);
    }

    /// The live consumers of a group with their subscriptions (empty when unknown).
    pub fn members(&self, group: &str, now: Instant) -> Vec<(String, Vec<Sub>)> {
        let subs = self.subs.get(group);
        self.consumers(group, now)
            .into_iter()
            .map(|c| {
                let s = subs.and_then(|m| m.get(&c)).cloned().unwrap_or_default();
                (c, s)
            })
            .collect()
    }

    /// Forgets subscriptions of clients no longer in their group.
    fn prune_subs(&mut self) {
        let consumers = &self.consumers.by_group;
        self.subs.retain(|g, m| {
            m.retain(|c, _| consumers.get(g).is_some_and(|cs| cs.contains_key(c)));
            !m.is_empty()
        });
    }

    /// Records a heartbeat; returns the consumer groups whose membership changed (this
    /// client joined them, or silent members expired from them), sorted.
    pub fn heartbeat(
        &mut self,
        client_id: &str,
        producer_groups: &[String],
        consumer_groups: &[String],
        now: Instant,
    ) -> Vec<String> {
        let mut changed = self.expire_consumers(now);
        self.producers.expire(now, self.expiry);
        for g in consumer_groups {
            let new = !self
                .consumers
                .live(g, now, self.expiry)
                .iter()
                .any(|c| c == client_id);
            if self.consumers.touch(g, client_id, now) && new {
                changed.push(g.clone());
            }
        }
        for g in producer_groups {
            self.producers.touch(g, client_id, now);
        }
        changed.sort();
        changed.dedup();
        changed
    }

    /// A client that shut down cleanly; returns the consumer groups it left.
    pub fn unregister(&mut self, client_id: &str) -> Vec<String> {
        self.producers.remove_client(client_id);
        let left = self.consumers.remove_client(client_id);
        self.prune_subs();
        left
    }

    /// Drops consumers silent for the expiry; returns the groups that lost members.
    pub fn expire_consumers(&mut self, now: Instant) -> Vec<String> {
        let changed = self.consumers.expire(now, self.expiry).1;
        if !changed.is_empty() {
            self.prune_subs();
        }
        changed
    }

    /// Drops clients silent for the expiry; returns how many entries went.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.consumers.expire(now, self.expiry).0 + self.producers.expire(now, self.expiry).0
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
    use orbitmq_proto::sql::{EXPR_TYPE_SQL92, EXPR_TYPE_TAG};

    #[test]
    fn consumers_per_group_expire_when_silent() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(120);
        let mut r = ClientRegistry::new(exp);
        let g = |s: &str| vec![s.to_string()];
        assert_eq!(r.heartbeat("c2", &[], &g("G"), t0), g("G"));
        assert_eq!(r.heartbeat("c1", &g("P"), &g("G"), t0), g("G"));
        assert!(
            r.heartbeat("c1", &g("P"), &g("G"), t0).is_empty(),
            "already a member"
        );
        assert_eq!(r.consumers("G", t0), vec!["c1", "c2"]);
        assert_eq!(r.producers("P", t0), vec!["c1"]);
        assert!(r.consumers("Other", t0).is_empty());
        let t1 = t0 + Duration::from_secs(100);
        r.heartbeat("c1", &[], &g("G"), t1);
        assert_eq!(r.consumers("G", t0 + exp), vec!["c1"], "c2 is silent");
        assert_eq!(r.expire(t0 + exp), 2, "c2 in G and c1 in P");
        assert!(r.producers("P", t0 + exp).is_empty());
        assert_eq!(r.unregister("c1"), g("G"));
        assert!(r.consumers("G", t1).is_empty());
        assert!(r.unregister("c1").is_empty(), "nothing left to leave");
    }

    #[test]
    fn members_with_different_subscriptions_are_named() {
        let t0 = Instant::now();
        let mut r = ClientRegistry::new(Duration::from_secs(120));
        let g = |s: &str| vec![s.to_string()];
        let sub = |t: &str, e: &str| vec![(t.to_string(), EXPR_TYPE_TAG, e.to_string())];
        for c in ["c1", "c2", "c3"] {
            r.heartbeat(c, &[], &g("G"), t0);
        }
        r.set_subscriptions("c1", "G", sub("T", "*"));
        r.set_subscriptions("c2", "G", sub("T", "*"));
        r.set_subscriptions("nobody", "G", sub("X", "*"));
        let m = r.members("G", t0);
        assert_eq!(m.len(), 3);
        assert!(m[2].1.is_empty(), "c3's subscriptions are unknown");
        assert!(
            subscription_conflicts(&m).is_empty(),
            "the known ones agree"
        );
        r.set_subscriptions("c3", "G", sub("T", "TagA"));
        let c = subscription_conflicts(&r.members("G", t0));
        assert_eq!(
            c,
            vec!["c1, c2 subscribe to T(*)", "c3 subscribe to T(TagA)"]
        );
        // The same text as SQL92 is another subscription.
        r.set_subscriptions("c3", "G", vec![("T".into(), EXPR_TYPE_SQL92, "*".into())]);
        let c = subscription_conflicts(&r.members("G", t0));
        assert_eq!(
            c,
            vec!["c1, c2 subscribe to T(*)", "c3 subscribe to T(SQL92 *)"]
        );
        r.unregister("c3");
        assert!(subscription_conflicts(&r.members("G", t0)).is_empty());
        assert!(!r.subs["G"].contains_key("c3"), "pruned");
        // A push consumer also subscribes the group's retry topic; that is no conflict.
        let mut with_retry = sub("T", "*");
        with_retry.push(("%RETRY%G".into(), EXPR_TYPE_TAG, "*".into()));
        r.set_subscriptions("c2", "G", with_retry);
        assert!(subscription_conflicts(&r.members("G", t0)).is_empty());
    }

    #[test]
    fn a_client_leaves_when_its_last_connection_closes() {
        let t0 = Instant::now();
        let mut r = ClientRegistry::new(Duration::from_secs(120));
        let g = |s: &str| vec![s.to_string()];
        r.heartbeat("c1", &[], &g("G"), t0);
        r.heartbeat("c2", &[], &g("G"), t0);
        // c1 heartbeats on two connections (two shards).
        r.connection_opened("c1");
        r.connection_opened("c1");
        r.connection_opened("c2");
        assert!(r.connection_closed("c1").is_empty(), "one left");
        assert_eq!(r.consumers("G", t0), vec!["c1", "c2"]);
        assert_eq!(r.connection_closed("c1"), vec!["G".to_string()]);
        assert_eq!(r.consumers("G", t0), vec!["c2"]);
        assert!(r.connection_closed("c1").is_empty(), "not counted any more");
        assert!(r.connection_closed("nobody").is_empty());
    }

    #[test]
    fn expiry_seen_at_a_heartbeat_reports_the_group() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(120);
        let mut r = ClientRegistry::new(exp);
        let g = |s: &str| vec![s.to_string()];
        r.heartbeat("c1", &[], &g("G"), t0);
        r.heartbeat("c2", &[], &g("G"), t0 + Duration::from_secs(60));
        // c1 is silent past the expiry: c2's heartbeat reports G changed.
        assert_eq!(r.heartbeat("c2", &[], &g("G"), t0 + exp), g("G"));
        assert_eq!(r.consumers("G", t0 + exp), vec!["c2"]);
    }
}
