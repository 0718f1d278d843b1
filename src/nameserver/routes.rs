//! What a name server knows: the brokers that registered and their topics (RocketMQ's
//! RouteInfoManager). Pure: no I/O, time passed in, so routes, expiry and auto-creation are
//! tested deterministically; the QUIC shell in `mod.rs` holds one behind a lock.
//!
//! Auto-creation rule: a topic no master has is routed, when at least one registered master
//! has `autoCreateTopicEnable`, to those masters with their `defaultTopicQueueNums` queues each
//! (the route the broker will create on the first send). The broker creates the topic on its
//! first send or pull and registers again at once, so the route becomes the real one. While
//! every master that has a topic has it only auto-created, the other auto-creating masters stay
//! in its route with their default queues, so an auto-created topic spreads over the cluster
//! (RocketMQ leaves it on the first broker that got a send). A topic an admin created or
//! updated is routed to exactly the masters that have it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use orbitmq_proto::header::{
    BrokerRoute, BrokerStatus, ClusterInfoResponse, QueueRoute, RegisterBrokerRequest,
    RouteResponse, TopicConfigData,
};
use orbitmq_proto::limits::{self, MAX_QUEUES_PER_TOPIC};
use thiserror::Error;

use crate::log::shape::{QueueMap, Shape, MAX_SHARDS};
use crate::nameserver::topics::{TopicConfig, PERM_READ, PERM_RW, PERM_WRITE};

/// RocketMQ's broker expiry: a broker silent this long is dropped.
pub const DEFAULT_BROKER_EXPIRY: Duration = Duration::from_secs(120);
/// RocketMQ's scan period for silent brokers.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(10);
/// Topics one registration may carry: all a broker may hold.
pub const MAX_REGISTERED_TOPICS: usize = limits::MAX_TOPICS_PER_BROKER;
/// Brokers (name + id) one name server keeps.
pub const MAX_BROKERS: usize = 4096;
/// Topic entries (a topic on a broker) one name server keeps over all its brokers: with
/// MAX_BROKERS brokers of MAX_REGISTERED_TOPICS each it would hold gigabytes.
pub const MAX_TOPIC_ROUTES: usize = 2_000_000;
/// Longest cluster or broker name (as a topic name).
pub const MAX_NAME_LEN: usize = limits::MAX_TOPIC_LEN;
/// The broker id of a master.
pub const MASTER_ID: u64 = 0;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegisterError {
    #[error("bad {what} {value:?}: {why}")]
    Bad {
        what: &'static str,
        value: String,
        why: String,
    },
    #[error("the name server already holds {MAX_BROKERS} brokers")]
    Full,
    #[error(
        "the name server would hold {total} topic entries over its brokers with this one, over \
         its limit of {max}"
    )]
    TooManyTopics { total: usize, max: usize },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("no route for topic {0}: no broker has it and none allows auto-creation (create it with `orbitmq admin topic create`)")]
    NotExist(String),
    #[error(transparent)]
    BadName(#[from] limits::TopicError),
}

/// One registered broker process (a broker name and id).
#[derive(Clone, Debug)]
struct Member {
    shard_endpoints: Vec<String>,
    shape: Shape,
    topics: BTreeMap<String, TopicConfig>,
    auto_create: bool,
    default_queues: u32,
    last_seen: Instant,
}

impl Member {
    fn addr(&self) -> &str {
        &self.shard_endpoints[0]
    }
}

#[derive(Clone, Debug)]
struct BrokerEntry {
    cluster: String,
    members: BTreeMap<u64, Member>,
}

/// A broker that was dropped or replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removed {
    pub cluster: String,
    pub broker_name: String,
    pub broker_id: u64,
    pub addr: String,
}

/// The name server's tables.
#[derive(Debug)]
pub struct RouteInfoManager {
    brokers: BTreeMap<String, BrokerEntry>,
    /// [`MAX_TOPIC_ROUTES`]; smaller in unit tests.
    max_topic_routes: usize,
}

impl Default for RouteInfoManager {
    fn default() -> Self {
        RouteInfoManager {
            brokers: BTreeMap::new(),
            max_topic_routes: MAX_TOPIC_ROUTES,
        }
    }
}

fn check_name(what: &'static str, v: &str) -> Result<(), RegisterError> {
    limits::validate_topic(v).map_err(|e| RegisterError::Bad {
        what,
        value: v.chars().take(MAX_NAME_LEN).collect(),
        why: e.to_string(),
    })
}

fn check_endpoint(v: &str) -> Result<(), RegisterError> {
    let bad = |why: &str| RegisterError::Bad {
        what: "shard endpoint",
        value: v.chars().take(MAX_NAME_LEN).collect(),
        why: why.into(),
    };
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    port.parse::<u16>().map_err(|_| bad("bad port"))?;
    if host.is_empty() || host.len() > MAX_NAME_LEN {
        return Err(bad("bad host"));
    }
    Ok(())
}

/// Checks a registration and turns it into a member.
fn member_of(r: &RegisterBrokerRequest, now: Instant) -> Result<Member, RegisterError> {
    check_name("cluster name", &r.cluster)?;
    check_name("broker name", &r.broker_name)?;
    let n = r.shard_endpoints.len();
    if n == 0 || n > MAX_SHARDS as usize {
        return Err(RegisterError::Bad {
            what: "shard count",
            value: n.to_string(),
            why: format!("expected 1..={MAX_SHARDS}"),
        });
    }
    for e in &r.shard_endpoints {
        check_endpoint(e)?;
    }
    let map = QueueMap::from_name(&r.queue_map).ok_or_else(|| RegisterError::Bad {
        what: "queue map",
        value: r.queue_map.clone(),
        why: "unknown to this name server".into(),
    })?;
    if r.topics.len() > MAX_REGISTERED_TOPICS {
        return Err(RegisterError::Bad {
            what: "topic count",
            value: r.topics.len().to_string(),
            why: format!("over the limit of {MAX_REGISTERED_TOPICS}"),
        });
    }
    let queues_ok = |q: u32| (1..=MAX_QUEUES_PER_TOPIC).contains(&q);
    let mut topics = BTreeMap::new();
    for t in &r.topics {
        check_name("topic", &t.name)?;
        if !queues_ok(t.read_queues) || !queues_ok(t.write_queues) {
            return Err(RegisterError::Bad {
                what: "queue count of topic",
                value: t.name.clone(),
                why: format!("expected 1..={MAX_QUEUES_PER_TOPIC}"),
            });
        }
        topics.insert(
            t.name.clone(),
            TopicConfig {
                name: t.name.clone(),
                read_queues: t.read_queues,
                write_queues: t.write_queues,
                perm: t.perm & PERM_RW,
                auto_created: t.auto_created,
            },
        );
    }
    if r.auto_create_topic && !queues_ok(r.default_topic_queue_nums) {
        return Err(RegisterError::Bad {
            what: "defaultTopicQueueNums",
            value: r.default_topic_queue_nums.to_string(),
            why: format!("expected 1..={MAX_QUEUES_PER_TOPIC}"),
        });
    }
    Ok(Member {
        shard_endpoints: r.shard_endpoints.clone(),
        shape: Shape {
            shards: n as u32,
            map,
        },
        topics,
        auto_create: r.auto_create_topic,
        default_queues: r.default_topic_queue_nums,
        last_seen: now,
    })
}

/// The queues of a topic on one broker, each with the shard endpoint that owns it.
pub fn queue_routes(
    broker_name: &str,
    t: &TopicConfig,
    shape: &Shape,
    endpoints: &[String],
) -> Vec<QueueRoute> {
    (0..t.queues())
        .map(|q| {
            let shard = shape.shard_of(&t.name, q);
            let mut perm = 0;
            if q < t.read_queues {
                perm |= PERM_READ & t.perm;
            }
            if q < t.write_queues {
                perm |= PERM_WRITE & t.perm;
            }
            QueueRoute {
                broker_name: broker_name.to_owned(),
                queue_id: q,
                shard,
                endpoint: endpoints.get(shard as usize).cloned().unwrap_or_default(),
                perm,
            }
        })
        .collect()
}

impl RouteInfoManager {
    pub fn new() -> RouteInfoManager {
        RouteInfoManager::default()
    }

    /// Records (or refreshes) a broker's registration; returns whether it is new here (a first
    /// registration, or one from a new address).
    pub fn register(
        &mut self,
        r: &RegisterBrokerRequest,
        now: Instant,
    ) -> Result<bool, RegisterError> {
        let m = member_of(r, now)?;
        // This broker's previous registration, which this one replaces.
        let old_topics = self
            .brokers
            .get(&r.broker_name)
            .and_then(|e| e.members.get(&r.broker_id))
            .map(|old| old.topics.len());
        if old_topics.is_none() && self.member_count() >= MAX_BROKERS {
            return Err(RegisterError::Full);
        }
        let total = self.topic_count() - old_topics.unwrap_or(0) + m.topics.len();
        if total > self.max_topic_routes {
            // A known broker that grew stays alive with the topics it had: registration is its
            // heartbeat, and expiring it would drop every route it serves.
            if let Some(old) = self
                .brokers
                .get_mut(&r.broker_name)
                .and_then(|e| e.members.get_mut(&r.broker_id))
            {
                old.last_seen = now;
            }
            return Err(RegisterError::TooManyTopics {
                total,
                max: self.max_topic_routes,
            });
        }
        let e = self
            .brokers
            .entry(r.broker_name.clone())
            .or_insert_with(|| BrokerEntry {
                cluster: r.cluster.clone(),
                members: BTreeMap::new(),
            });
        e.cluster.clone_from(&r.cluster);
        let new = e
            .members
            .get(&r.broker_id)
            .is_none_or(|old| old.shard_endpoints != m.shard_endpoints);
        e.members.insert(r.broker_id, m);
        Ok(new)
    }

    fn member_count(&self) -> usize {
        self.brokers.values().map(|b| b.members.len()).sum()
    }

    /// Topic entries over every member.
    fn topic_count(&self) -> usize {
        self.brokers
            .values()
            .flat_map(|b| b.members.values())
            .map(|m| m.topics.len())
            .sum()
    }

    /// Removes a broker that shut down cleanly, if it is still registered at `addr`.
    pub fn unregister(&mut self, broker_name: &str, broker_id: u64, addr: &str) -> bool {
        let Some(e) = self.brokers.get_mut(broker_name) else {
            return false;
        };
        if e.members.get(&broker_id).is_none_or(|m| m.addr() != addr) {
            return false;
        }
        e.members.remove(&broker_id);
        if e.members.is_empty() {
            self.brokers.remove(broker_name);
        }
        true
    }

    /// Drops every broker silent for `expiry` or longer.
    pub fn expire(&mut self, now: Instant, expiry: Duration) -> Vec<Removed> {
        let mut gone = Vec::new();
        for (name, e) in self.brokers.iter_mut() {
            e.members.retain(|id, m| {
                let keep = now.saturating_duration_since(m.last_seen) < expiry;
                if !keep {
                    gone.push(Removed {
                        cluster: e.cluster.clone(),
                        broker_name: name.clone(),
                        broker_id: *id,
                        addr: m.addr().to_owned(),
                    });
                }
                keep
            });
        }
        self.brokers.retain(|_, e| !e.members.is_empty());
        gone
    }

    /// The member that serves a broker's queues: its master, or while it has none (dead or
    /// stopped) its slave of the lowest id, read-only (as RocketMQ's clients fall back to a
    /// slave to consume). The flag says whether it is the master.
    fn serving(e: &BrokerEntry) -> Option<(&Member, bool)> {
        match e.members.get(&MASTER_ID) {
            Some(m) => Some((m, true)),
            None => e.members.values().next().map(|m| (m, false)),
        }
    }

    fn broker_route(name: &str, e: &BrokerEntry) -> BrokerRoute {
        BrokerRoute {
            cluster: e.cluster.clone(),
            broker_name: name.to_owned(),
            addrs: e
                .members
                .iter()
                .map(|(id, m)| (*id, m.addr().to_owned()))
                .collect(),
            shard_endpoints: Self::serving(e)
                .map(|(m, _)| m.shard_endpoints.clone())
                .unwrap_or_default(),
        }
    }

    /// The route of a topic: the queues of every broker that has it (served by its master,
    /// or read-only by a slave while it has no master), or the default route over the
    /// auto-creating masters when none has it.
    pub fn route(&self, topic: &str) -> Result<RouteResponse, RouteError> {
        limits::validate_topic(topic)?;
        let masters = || {
            self.brokers
                .iter()
                .filter_map(|(n, e)| e.members.get(&MASTER_ID).map(|m| (n, e, m)))
        };
        let mut queues = Vec::new();
        let mut brokers = Vec::new();
        let mut only_auto = true;
        for (name, e) in &self.brokers {
            let Some((m, master)) = Self::serving(e) else {
                continue;
            };
            if let Some(t) = m.topics.get(topic) {
                let mut qs = queue_routes(name, t, &m.shape, &m.shard_endpoints);
                if !master {
                    for q in &mut qs {
                        q.perm &= PERM_READ;
                    }
                }
                queues.extend(qs);
                brokers.push(Self::broker_route(name, e));
                only_auto &= t.auto_created;
            }
        }
        if only_auto {
            let has = |m: &Member| m.topics.contains_key(topic);
            for (name, e, m) in masters().filter(|(_, _, m)| m.auto_create && !has(m)) {
                // A group's retry or dead-letter topic has one queue wherever it is made.
                let n = if orbitmq_proto::sys::group_of(topic).is_some() {
                    orbitmq_proto::sys::RETRY_DLQ_QUEUES
                } else {
                    m.default_queues
                };
                let t = TopicConfig::new(topic, n);
                queues.extend(queue_routes(name, &t, &m.shape, &m.shard_endpoints));
                brokers.push(Self::broker_route(name, e));
            }
        }
        if brokers.is_empty() {
            return Err(RouteError::NotExist(topic.to_owned()));
        }
        Ok(RouteResponse {
            topic: topic.to_owned(),
            queues,
            brokers,
        })
    }

    /// Every cluster and its brokers.
    pub fn cluster_info(&self, now: Instant) -> ClusterInfoResponse {
        let mut clusters: BTreeMap<String, Vec<BrokerStatus>> = BTreeMap::new();
        for (name, e) in &self.brokers {
            let master = e.members.get(&MASTER_ID);
            let last = master.map_or_else(
                || e.members.values().map(|m| m.last_seen).max().unwrap_or(now),
                |m| m.last_seen,
            );
            clusters
                .entry(e.cluster.clone())
                .or_default()
                .push(BrokerStatus {
                    broker: Self::broker_route(name, e),
                    last_seen_ms: now.saturating_duration_since(last).as_millis() as u64,
                    topics: master.map_or(0, |m| m.topics.len() as u32),
                });
        }
        ClusterInfoResponse {
            clusters: clusters.into_iter().collect(),
        }
    }

    /// Topics of the masters of `cluster` (every cluster when empty), sorted.
    pub fn topics(&self, cluster: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .brokers
            .values()
            .filter(|e| cluster.is_empty() || e.cluster == cluster)
            .filter_map(|e| e.members.get(&MASTER_ID))
            .flat_map(|m| m.topics.keys().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// A registration for tests and for the broker's own side.
pub fn topic_data(t: &TopicConfig) -> TopicConfigData {
    TopicConfigData {
        name: t.name.clone(),
        read_queues: t.read_queues,
        write_queues: t.write_queues,
        perm: t.perm,
        auto_created: t.auto_created,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn reg(name: &str, base: u16, topics: &[(&str, u32)], auto: bool) -> RegisterBrokerRequest {
        RegisterBrokerRequest {
            cluster: "C".into(),
            broker_name: name.into(),
            broker_id: 0,
            shard_endpoints: vec![
                format!("127.0.0.1:{base}"),
                format!("127.0.0.1:{}", base + 1),
            ],
            queue_map: QueueMap::TopicHashPlusQueue.name().into(),
            topics: topics
                .iter()
                .map(|(t, q)| topic_data(&TopicConfig::new(t, *q)))
                .collect(),
            auto_create_topic: auto,
            default_topic_queue_nums: 4,
        }
    }

    #[test]
    fn a_route_spans_every_broker_with_the_topic() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        assert!(m
            .register(&reg("a", 10911, &[("T", 8)], false), t0)
            .unwrap());
        assert!(m
            .register(&reg("b", 20911, &[("T", 8), ("U", 2)], false), t0)
            .unwrap());
        assert!(!m
            .register(&reg("b", 20911, &[("T", 8)], false), t0)
            .unwrap());
        let r = m.route("T").unwrap();
        assert_eq!(r.queues.len(), 16);
        assert_eq!(r.brokers.len(), 2);
        let shape = Shape {
            shards: 2,
            map: QueueMap::TopicHashPlusQueue,
        };
        for q in &r.queues {
            let base = if q.broker_name == "a" { 10911 } else { 20911 };
            let shard = shape.shard_of("T", q.queue_id);
            assert_eq!(q.shard, shard);
            assert_eq!(q.endpoint, format!("127.0.0.1:{}", base + shard));
            assert_eq!(q.perm, PERM_RW);
        }
        assert_eq!(r.brokers[1].addrs, vec![(0, "127.0.0.1:20911".to_string())]);
        // The last registration replaces the topic set: U is gone.
        assert_eq!(m.route("U"), Err(RouteError::NotExist("U".into())));
        assert!(m
            .route("U")
            .unwrap_err()
            .to_string()
            .contains("no route for topic U"));
        assert!(m.route("bad topic").is_err());
    }

    #[test]
    fn topic_entries_are_bounded_over_all_brokers() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        m.max_topic_routes = 4;
        m.register(&reg("a", 10911, &[("T", 8), ("U", 8)], false), t0)
            .unwrap();
        m.register(&reg("b", 10921, &[("T", 8)], false), t0)
            .unwrap();
        let e = m
            .register(&reg("c", 10931, &[("T", 8), ("V", 8)], false), t0)
            .unwrap_err();
        assert_eq!(e, RegisterError::TooManyTopics { total: 5, max: 4 });
        assert!(m.route("V").is_err(), "nothing of c was kept");
        // A broker registering again replaces its entries: b may grow to the limit.
        m.register(&reg("b", 10921, &[("T", 8), ("V", 8)], false), t0)
            .unwrap();
        assert_eq!(m.route("V").unwrap().brokers.len(), 1);
        // Past it, b is refused but stays alive with what it had: its refused registrations
        // still count as heartbeats.
        let expiry = DEFAULT_BROKER_EXPIRY;
        let later = t0 + expiry;
        m.register(&reg("a", 10911, &[("T", 8), ("U", 8)], false), later)
            .unwrap();
        let e = m
            .register(
                &reg("b", 10921, &[("T", 8), ("V", 8), ("W", 8)], false),
                later,
            )
            .unwrap_err();
        assert_eq!(e, RegisterError::TooManyTopics { total: 5, max: 4 });
        assert!(m.expire(later + expiry / 2, expiry).is_empty());
        assert_eq!(m.route("V").unwrap().brokers.len(), 1);
        assert!(m.route("W").is_err());
    }

    #[test]
    fn read_and_write_queue_counts_set_permissions() {
        let mut t = TopicConfig::new("T", 8);
        t.write_queues = 4;
        let shape = Shape {
            shards: 2,
            map: QueueMap::TopicHashPlusQueue,
        };
        let eps = vec!["h:1".to_string(), "h:2".to_string()];
        let qs = queue_routes("b", &t, &shape, &eps);
        assert_eq!(qs.len(), 8);
        for q in &qs {
            let want = if q.queue_id < 4 { PERM_RW } else { PERM_READ };
            assert_eq!(q.perm, want);
            assert_eq!(q.endpoint, eps[q.shard as usize]);
        }
        assert_eq!(qs.iter().filter(|q| q.shard == 0).count(), 4);
    }

    #[test]
    fn silent_brokers_expire_and_unregister_needs_the_same_address() {
        let t0 = Instant::now();
        let exp = Duration::from_secs(120);
        let mut m = RouteInfoManager::new();
        m.register(&reg("a", 10911, &[("T", 8)], false), t0)
            .unwrap();
        m.register(&reg("b", 20911, &[("T", 8)], false), t0)
            .unwrap();
        let t1 = t0 + Duration::from_secs(100);
        m.register(&reg("a", 10911, &[("T", 8)], false), t1)
            .unwrap();
        assert!(m.expire(t0 + Duration::from_secs(119), exp).is_empty());
        let gone = m.expire(t0 + exp, exp);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].broker_name, "b");
        assert_eq!(m.route("T").unwrap().brokers.len(), 1);
        assert!(!m.unregister("a", 0, "127.0.0.1:999"));
        assert!(m.unregister("a", 0, "127.0.0.1:10911"));
        assert!(m.route("T").is_err());
        assert!(m.cluster_info(t1).clusters.is_empty());
    }

    #[test]
    fn unknown_topics_route_to_auto_creating_brokers() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        m.register(&reg("a", 10911, &[("T", 8)], true), t0).unwrap();
        m.register(&reg("b", 20911, &[], false), t0).unwrap();
        let r = m.route("New").unwrap();
        assert_eq!(r.brokers.len(), 1);
        assert_eq!(r.queues.len(), 4, "defaultTopicQueueNums of broker a");
        assert!(r.queues.iter().all(|q| q.broker_name == "a"));
        // Once a broker has it (from an admin), only brokers that have it are routed.
        m.register(&reg("b", 20911, &[("New", 2)], false), t0)
            .unwrap();
        let r = m.route("New").unwrap();
        assert_eq!(r.queues.len(), 2);
        assert!(r.queues.iter().all(|q| q.broker_name == "b"));
    }

    #[test]
    fn retry_and_dlq_topics_route_to_the_groups_shard() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        m.register(&reg("a", 10911, &[("%RETRY%g", 1)], true), t0)
            .unwrap();
        let shape = Shape {
            shards: 2,
            map: QueueMap::TopicHashPlusQueue,
        };
        let shard = shape.shard_of("%RETRY%g", 0);
        assert_eq!(shard, shape.shard_of("%DLQ%g", 0));
        let r = m.route("%RETRY%g").unwrap();
        assert_eq!(r.queues.len(), 1);
        assert_eq!(r.queues[0].shard, shard);
        assert_eq!(r.queues[0].endpoint, format!("127.0.0.1:{}", 10911 + shard));
        // Not made yet: the auto-creating brokers' default route has the one queue too.
        let d = m.route("%DLQ%g").unwrap();
        assert_eq!(d.queues.len(), 1);
        assert_eq!(d.queues[0].shard, shard);
    }

    #[test]
    fn auto_created_topics_spread_over_the_auto_creating_brokers() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        let mut a = reg("a", 10911, &[("Auto", 4)], true);
        a.topics[0].auto_created = true;
        m.register(&a, t0).unwrap();
        m.register(&reg("b", 20911, &[], true), t0).unwrap();
        m.register(&reg("c", 30911, &[], false), t0).unwrap();
        let r = m.route("Auto").unwrap();
        let names: BTreeSet<&str> = r.brokers.iter().map(|b| b.broker_name.as_str()).collect();
        assert_eq!(names, BTreeSet::from(["a", "b"]));
        assert_eq!(r.queues.len(), 8);
        // An admin's topic on a is routed there only.
        m.register(&reg("a", 10911, &[("Auto", 4)], true), t0)
            .unwrap();
        assert_eq!(m.route("Auto").unwrap().brokers.len(), 1);
    }

    #[test]
    fn cluster_info_and_topic_lists() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        m.register(&reg("a", 10911, &[("T", 8), ("A", 1)], false), t0)
            .unwrap();
        let mut other = reg("z", 30911, &[("Z", 1)], false);
        other.cluster = "Other".into();
        m.register(&other, t0).unwrap();
        let info = m.cluster_info(t0 + Duration::from_millis(5));
        let names: Vec<&str> = info.clusters.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, vec!["C", "Other"]);
        assert_eq!(info.clusters[0].1[0].last_seen_ms, 5);
        assert_eq!(info.clusters[0].1[0].topics, 2);
        assert_eq!(m.topics("C"), vec!["A", "T"]);
        assert_eq!(m.topics(""), vec!["A", "T", "Z"]);
        assert!(m.topics("None").is_empty());
    }

    #[test]
    fn a_broker_without_its_master_is_routed_read_only_through_its_slave() {
        let mut m = RouteInfoManager::new();
        let t0 = Instant::now();
        m.register(&reg("broker-a", 10911, &[("T", 4)], false), t0)
            .unwrap();
        let mut slave = reg("broker-a", 20911, &[("T", 4)], false);
        slave.broker_id = 1;
        m.register(&slave, t0).unwrap();
        // With its master: the master's endpoints, writable; the slave is listed by id.
        let r = m.route("T").unwrap();
        assert!(r
            .queues
            .iter()
            .all(|q| q.perm == PERM_RW && q.endpoint.starts_with("127.0.0.1:1091")));
        assert_eq!(r.brokers[0].addrs.len(), 2);
        // The master goes: the slave serves the queues, read-only.
        let master_addr = r.brokers[0].addrs[0].1.clone();
        assert!(m.unregister("broker-a", MASTER_ID, &master_addr));
        let r = m.route("T").unwrap();
        assert_eq!(r.queues.len(), 4);
        assert!(r
            .queues
            .iter()
            .all(|q| q.perm == PERM_READ && q.endpoint.starts_with("127.0.0.1:2091")));
        assert_eq!(r.brokers[0].shard_endpoints, slave.shard_endpoints);
        // The master comes back: writable again.
        m.register(&reg("broker-a", 10911, &[("T", 4)], false), t0)
            .unwrap();
        assert!(m
            .route("T")
            .unwrap()
            .queues
            .iter()
            .all(|q| q.perm == PERM_RW));
    }

    #[test]
    fn bad_registrations_are_refused() {
        let t0 = Instant::now();
        let mut m = RouteInfoManager::new();
        let mut r = reg("a", 1, &[("T", 8)], false);
        r.shard_endpoints.clear();
        assert!(m.register(&r, t0).is_err());
        let mut r = reg("a", 1, &[("T", 8)], false);
        r.shard_endpoints[1] = "nowhere".into();
        assert!(m.register(&r, t0).is_err());
        let mut r = reg("a", 1, &[("T", 0)], false);
        assert!(m.register(&r, t0).is_err());
        r = reg("a b", 1, &[], false);
        assert!(m.register(&r, t0).is_err());
        r = reg("a", 1, &[], false);
        r.queue_map = "other".into();
        assert!(m
            .register(&r, t0)
            .unwrap_err()
            .to_string()
            .contains("queue map"));
    }
}
