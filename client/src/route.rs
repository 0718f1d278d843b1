//! Topic routes: which broker and shard endpoint owns each queue. Pure data and the cache.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orbitmq_proto::header::{BrokerRoute, RouteResponse};
use orbitmq_proto::limits::MAX_QUEUES_PER_TOPIC;

/// RocketMQ permission bit: the queue may be read.
pub const PERM_READ: u32 = 4;
/// RocketMQ permission bit: the queue may be written.
pub const PERM_WRITE: u32 = 2;
/// Brokers one route may list.
pub const MAX_ROUTE_BROKERS: usize = 64;
/// Queues one route may list (all brokers of the topic together).
pub const MAX_ROUTE_QUEUES: usize = MAX_ROUTE_BROKERS * MAX_QUEUES_PER_TOPIC as usize;

/// A queue: the unit of order and of consumption.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageQueue {
    pub topic: String,
    pub broker_name: String,
    pub queue_id: u32,
}

impl MessageQueue {
    pub fn new(
        topic: impl Into<String>,
        broker_name: impl Into<String>,
        queue_id: u32,
    ) -> MessageQueue {
        MessageQueue {
            topic: topic.into(),
            broker_name: broker_name.into(),
            queue_id,
        }
    }
}

impl fmt::Display for MessageQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.topic, self.broker_name, self.queue_id)
    }
}

/// A queue and where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueInfo {
    pub mq: MessageQueue,
    /// The shard of the broker that owns the queue.
    pub shard: u32,
    /// `host:port` of that shard's QUIC endpoint.
    pub endpoint: String,
    pub perm: u32,
}

impl QueueInfo {
    pub fn readable(&self) -> bool {
        self.perm & PERM_READ != 0
    }

    pub fn writable(&self) -> bool {
        self.perm & PERM_WRITE != 0
    }
}

/// The route of one topic, queues sorted by broker name and queue id (a stable order, so a
/// selector's index means the same queue from one send to the next).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicRoute {
    pub topic: String,
    pub queues: Vec<QueueInfo>,
    /// The brokers of the queues (cluster, addresses per broker id, shard endpoints), by name;
    /// empty from a name server that does not send them.
    pub brokers: Vec<BrokerRoute>,
}

impl TopicRoute {
    /// Checks a name server's answer: the right topic, bounded, well-formed endpoints, no
    /// queue listed twice.
    pub fn from_response(topic: &str, r: RouteResponse) -> Result<TopicRoute, String> {
        if r.topic != topic {
            return Err(format!(
                "asked for topic {topic}, got the route of {}",
                r.topic
            ));
        }
        if r.queues.len() > MAX_ROUTE_QUEUES {
            return Err(format!(
                "route lists {} queues, over the limit of {MAX_ROUTE_QUEUES}",
                r.queues.len()
            ));
        }
        let mut seen = BTreeSet::new();
        let mut queues = Vec::with_capacity(r.queues.len());
        for q in r.queues {
            if q.broker_name.is_empty() {
                return Err(format!("queue {} has no broker name", q.queue_id));
            }
            crate::remoting::split_host_port(&q.endpoint)
                .map_err(|_| format!("queue {} has a bad endpoint {:?}", q.queue_id, q.endpoint))?;
            if q.shard > u32::from(u16::MAX) {
                return Err(format!(
                    "queue {} names shard {}, over {}",
                    q.queue_id,
                    q.shard,
                    u16::MAX
                ));
            }
            if !seen.insert((q.broker_name.clone(), q.queue_id)) {
                return Err(format!(
                    "queue {} of broker {} is listed twice",
                    q.queue_id, q.broker_name
                ));
            }
            queues.push(QueueInfo {
                mq: MessageQueue::new(topic, q.broker_name, q.queue_id),
                shard: q.shard,
                endpoint: q.endpoint,
                perm: q.perm,
            });
        }
        queues.sort_by(|a, b| a.mq.cmp(&b.mq));
        if r.brokers.len() > MAX_ROUTE_BROKERS {
            return Err(format!(
                "route lists {} brokers, over the limit of {MAX_ROUTE_BROKERS}",
                r.brokers.len()
            ));
        }
        let mut brokers = r.brokers;
        brokers.sort_by(|a, b| a.broker_name.cmp(&b.broker_name));
        Ok(TopicRoute {
            topic: topic.to_owned(),
            queues,
            brokers,
        })
    }

    /// Names of the brokers that have writable queues.
    pub fn writable_brokers(&self) -> BTreeSet<&str> {
        self.queues
            .iter()
            .filter(|q| q.writable())
            .map(|q| q.mq.broker_name.as_str())
            .collect()
    }

    pub fn writable(&self) -> Vec<&QueueInfo> {
        self.queues.iter().filter(|q| q.writable()).collect()
    }

    pub fn readable(&self) -> Vec<&QueueInfo> {
        self.queues.iter().filter(|q| q.readable()).collect()
    }

    pub fn find(&self, mq: &MessageQueue) -> Option<&QueueInfo> {
        self.queues
            .binary_search_by(|q| q.mq.cmp(mq))
            .ok()
            .map(|i| &self.queues[i])
    }

    pub fn endpoints(&self) -> BTreeSet<&str> {
        self.queues.iter().map(|q| q.endpoint.as_str()).collect()
    }
}

/// What the cache knows of a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Fetched within the refresh interval and not invalidated.
    Fresh(Arc<TopicRoute>),
    /// Known but due for a refresh; usable if the name server cannot be reached.
    Stale(Arc<TopicRoute>),
    Missing,
}

struct Entry {
    route: Arc<TopicRoute>,
    fetched: Instant,
    stale: bool,
}

/// The route cache: routes by topic, each refreshed after `max_age` or when invalidated by
/// an error.
#[derive(Default)]
pub struct RouteTable {
    routes: HashMap<String, Entry>,
}

impl RouteTable {
    pub fn new() -> RouteTable {
        RouteTable::default()
    }

    pub fn get(&self, topic: &str, now: Instant, max_age: Duration) -> Lookup {
        match self.routes.get(topic) {
            None => Lookup::Missing,
            Some(e) if e.stale || now.saturating_duration_since(e.fetched) >= max_age => {
                Lookup::Stale(e.route.clone())
            }
            Some(e) => Lookup::Fresh(e.route.clone()),
        }
    }

    /// Stores a fetched route; returns whether it differs from the one it replaces.
    pub fn insert(&mut self, route: TopicRoute, now: Instant) -> bool {
        let changed = self
            .routes
            .get(&route.topic)
            .is_none_or(|e| *e.route != route);
        self.routes.insert(
            route.topic.clone(),
            Entry {
                route: Arc::new(route),
                fetched: now,
                stale: false,
            },
        );
        changed
    }

    /// Marks a topic's route for refresh on its next use.
    pub fn invalidate(&mut self, topic: &str) {
        if let Some(e) = self.routes.get_mut(topic) {
            e.stale = true;
        }
    }

    /// Marks every route that uses `endpoint` for refresh (the broker is going away).
    pub fn invalidate_endpoint(&mut self, endpoint: &str) {
        for e in self.routes.values_mut() {
            if e.route.queues.iter().any(|q| q.endpoint == endpoint) {
                e.stale = true;
            }
        }
    }

    /// Points one queue at another endpoint until the next refresh (a WRONG_SHARD redirect).
    pub fn redirect(&mut self, mq: &MessageQueue, endpoint: &str) -> bool {
        let Some(e) = self.routes.get_mut(&mq.topic) else {
            return false;
        };
        let mut route = (*e.route).clone();
        let Some(q) = route.queues.iter_mut().find(|q| q.mq == *mq) else {
            return false;
        };
        if q.endpoint == endpoint {
            return false;
        }
        q.endpoint = endpoint.to_owned();
        e.route = Arc::new(route);
        true
    }

    pub fn topics(&self) -> Vec<String> {
        self.routes.keys().cloned().collect()
    }

    /// Every endpoint of every cached route: the brokers this client uses.
    pub fn endpoints(&self) -> BTreeSet<String> {
        self.routes
            .values()
            .flat_map(|e| e.route.queues.iter().map(|q| q.endpoint.clone()))
            .collect()
    }
}

/// Picks a queue for a send: round robin from `start`, skipping queues on `avoid` (the
/// endpoint that just failed) while another endpoint has one. `None` only when `queues` is
/// empty.
pub fn select_queue(queues: &[&QueueInfo], start: usize, avoid: Option<&str>) -> Option<usize> {
    if queues.is_empty() {
        return None;
    }
    let n = queues.len();
    if let Some(avoid) = avoid {
        for k in 0..n {
            let i = start.wrapping_add(k) % n;
            if queues[i].endpoint != avoid {
                return Some(i);
            }
        }
    }
    Some(start % n)
}

/// What a retry steers away from: the broker and the endpoint that just failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Avoid {
    pub broker: String,
    pub endpoint: String,
}

/// Picks a queue for a send, round robin from `start`, in order of preference: a queue of an
/// available broker other than the one to avoid; any queue of another broker; a queue on
/// another endpoint; any queue. `available` is the latency fault tolerance's verdict on a
/// broker. `None` only when `queues` is empty.
pub fn select_send_queue(
    queues: &[&QueueInfo],
    start: usize,
    avoid: Option<&Avoid>,
    available: impl Fn(&str) -> bool,
) -> Option<usize> {
    let n = queues.len();
    if n == 0 {
        return None;
    }
    let other_broker = |q: &QueueInfo| avoid.is_none_or(|a| q.mq.broker_name != a.broker);
    let other_endpoint = |q: &QueueInfo| avoid.is_none_or(|a| q.endpoint != a.endpoint);
    let find = |ok: &dyn Fn(&QueueInfo) -> bool| {
        (0..n)
            .map(|k| start.wrapping_add(k) % n)
            .find(|&i| ok(queues[i]))
    };
    find(&|q| other_broker(q) && available(&q.mq.broker_name))
        .or_else(|| find(&other_broker))
        .or_else(|| find(&other_endpoint))
        .or(Some(start % n))
}

#[cfg(test)]
mod tests {
    use orbitmq_proto::header::QueueRoute;

    use super::*;

    fn response(topic: &str, n: u32) -> RouteResponse {
        RouteResponse {
            topic: topic.into(),
            queues: (0..n)
                .rev()
                .map(|i| QueueRoute {
                    broker_name: "b".into(),
                    queue_id: i,
                    shard: i % 2,
                    endpoint: format!("127.0.0.1:{}", 10911 + i % 2),
                    perm: PERM_READ | PERM_WRITE,
                })
                .collect(),
            brokers: Vec::new(),
        }
    }

    /// Two brokers `a` and `b`, 4 queues each, queue q on shard q % 2.
    fn two_brokers() -> TopicRoute {
        let mut r = response("T", 4);
        let mut b = response("T", 4);
        for q in &mut b.queues {
            q.broker_name = "b".into();
            q.endpoint = format!("127.0.0.2:{}", 10911 + q.shard);
        }
        for q in &mut r.queues {
            q.broker_name = "a".into();
        }
        r.queues.extend(b.queues);
        TopicRoute::from_response("T", r).unwrap()
    }

    #[test]
    fn sends_prefer_another_available_broker_on_retry() {
        let r = two_brokers();
        let w = r.writable();
        assert_eq!(r.writable_brokers().len(), 2);
        let all = |_: &str| true;
        // Round robin over both brokers.
        let picks: Vec<&str> = (0..8)
            .map(|s| {
                w[select_send_queue(&w, s, None, all).unwrap()]
                    .mq
                    .broker_name
                    .as_str()
            })
            .collect();
        assert_eq!(picks.iter().filter(|b| **b == "a").count(), 4);
        // A retry after a failure on broker a goes to b, from any start.
        let avoid = Avoid {
            broker: "a".into(),
            endpoint: "127.0.0.1:10911".into(),
        };
        for s in 0..8 {
            let i = select_send_queue(&w, s, Some(&avoid), all).unwrap();
            assert_eq!(w[i].mq.broker_name, "b");
        }
        // A broker the fault tolerance avoids is skipped while another is available...
        let not_b = |b: &str| b != "b";
        for s in 0..8 {
            let i = select_send_queue(&w, s, None, not_b).unwrap();
            assert_eq!(w[i].mq.broker_name, "a");
        }
        // ...but used when it is the only one not just failed.
        let i = select_send_queue(&w, 0, Some(&avoid), not_b).unwrap();
        assert_eq!(w[i].mq.broker_name, "b");
        // One broker: another endpoint (shard) of it.
        let one = TopicRoute::from_response("T", response("T", 4)).unwrap();
        let w1 = one.writable();
        let i = select_send_queue(
            &w1,
            0,
            Some(&Avoid {
                broker: "b".into(),
                endpoint: "127.0.0.1:10911".into(),
            }),
            all,
        )
        .unwrap();
        assert_eq!(w1[i].endpoint, "127.0.0.1:10912");
        assert_eq!(select_send_queue(&[], 0, None, all), None);
    }

    #[test]
    fn routes_are_validated_and_sorted() {
        let r = TopicRoute::from_response("T", response("T", 8)).unwrap();
        let ids: Vec<u32> = r.queues.iter().map(|q| q.mq.queue_id).collect();
        assert_eq!(ids, (0..8).collect::<Vec<_>>());
        assert_eq!(r.endpoints().len(), 2);
        assert_eq!(r.find(&MessageQueue::new("T", "b", 5)).unwrap().shard, 1);
        assert!(r.find(&MessageQueue::new("T", "b", 9)).is_none());

        assert!(TopicRoute::from_response("T", response("U", 1)).is_err());
        let mut dup = response("T", 2);
        dup.queues[1].queue_id = dup.queues[0].queue_id;
        assert!(TopicRoute::from_response("T", dup)
            .unwrap_err()
            .contains("twice"));
        let mut bad = response("T", 1);
        bad.queues[0].endpoint = "nowhere".into();
        assert!(TopicRoute::from_response("T", bad).is_err());
    }

    #[test]
    fn permissions_filter_queues() {
        let mut resp = response("T", 4);
        resp.queues[0].perm = PERM_READ; // queue 3: read only
        resp.queues[1].perm = PERM_WRITE; // queue 2: write only
        let r = TopicRoute::from_response("T", resp).unwrap();
        let w: Vec<u32> = r.writable().iter().map(|q| q.mq.queue_id).collect();
        let rd: Vec<u32> = r.readable().iter().map(|q| q.mq.queue_id).collect();
        assert_eq!(w, vec![0, 1, 2]);
        assert_eq!(rd, vec![0, 1, 3]);
    }

    #[test]
    fn cache_ages_and_invalidates() {
        let t0 = Instant::now();
        let age = Duration::from_secs(30);
        let mut t = RouteTable::new();
        assert_eq!(t.get("T", t0, age), Lookup::Missing);
        let r = TopicRoute::from_response("T", response("T", 2)).unwrap();
        assert!(t.insert(r.clone(), t0));
        assert!(!t.insert(r.clone(), t0), "same route is no change");
        assert!(matches!(
            t.get("T", t0 + Duration::from_secs(29), age),
            Lookup::Fresh(_)
        ));
        assert!(matches!(t.get("T", t0 + age, age), Lookup::Stale(_)));
        t.invalidate("T");
        assert!(matches!(t.get("T", t0, age), Lookup::Stale(_)));
        t.insert(r.clone(), t0);
        t.invalidate_endpoint("127.0.0.1:10912");
        assert!(matches!(t.get("T", t0, age), Lookup::Stale(_)));
        assert_eq!(t.endpoints().len(), 2);
        assert_eq!(t.topics(), vec!["T".to_string()]);

        let mq = MessageQueue::new("T", "b", 0);
        assert!(t.redirect(&mq, "127.0.0.1:20000"));
        assert!(!t.redirect(&mq, "127.0.0.1:20000"));
        let Lookup::Stale(r2) = t.get("T", t0, age) else {
            panic!()
        };
        assert_eq!(r2.find(&mq).unwrap().endpoint, "127.0.0.1:20000");
    }

    #[test]
    fn selection_round_robins_and_avoids_a_failed_endpoint() {
        let r = TopicRoute::from_response("T", response("T", 4)).unwrap();
        let w = r.writable();
        let picks: Vec<usize> = (0..6).map(|s| select_queue(&w, s, None).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 0, 1]);
        // Queues 0 and 2 are on shard 0 (port 10911): avoiding it skips to an odd queue.
        assert_eq!(select_queue(&w, 0, Some("127.0.0.1:10911")), Some(1));
        assert_eq!(select_queue(&w, 2, Some("127.0.0.1:10911")), Some(3));
        // When every queue is on the failed endpoint, fall back to plain round robin.
        let only: Vec<&QueueInfo> = w.iter().copied().filter(|q| q.shard == 0).collect();
        assert_eq!(select_queue(&only, 1, Some("127.0.0.1:10911")), Some(1));
        assert_eq!(select_queue(&[], 0, None), None);
        assert_eq!(select_queue(&w, usize::MAX, None), Some(usize::MAX % 4));
    }
}
