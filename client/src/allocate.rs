//! Queue allocation strategies of a consumer group (RocketMQ's `AllocateMessageQueueStrategy`):
//! pure functions from the sorted queues and consumer ids to the share of one consumer.
//!
//! Every consumer computes its own share from the same inputs, so the inputs are sorted first
//! and the strategies are deterministic: all consumers agree without talking to each other.

use std::collections::BTreeMap;

use crate::route::MessageQueue;

/// Virtual nodes per consumer on the consistent-hash ring (RocketMQ's default is 10).
pub const DEFAULT_VIRTUAL_NODES: usize = 10;

/// How a group splits a topic's queues among its consumers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Contiguous blocks, the first consumers one larger (RocketMQ's default).
    Averagely,
    /// Round-robin: queue i goes to consumer i mod n.
    AveragelyByCircle,
    /// Consumers take queues of brokers in their own machine room (`room_of_broker` maps a
    /// broker name to its room); queues of rooms without consumers are shared by everyone.
    MachineRoom {
        consumer_rooms: BTreeMap<String, String>,
        broker_rooms: BTreeMap<String, String>,
    },
    /// A hash ring with virtual nodes: a consumer joining or leaving moves few queues.
    ConsistentHash { virtual_nodes: usize },
    /// A fixed list of queues for this consumer, whatever the group looks like.
    ByConfig(Vec<MessageQueue>),
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Averagely => "AVG",
            Strategy::AveragelyByCircle => "AVG_BY_CIRCLE",
            Strategy::MachineRoom { .. } => "MACHINE_ROOM",
            Strategy::ConsistentHash { .. } => "CONSISTENT_HASH",
            Strategy::ByConfig(_) => "CONFIG",
        }
    }

    /// The queues `me` should consume. `queues` and `consumers` need not be sorted; `me` not
    /// in `consumers` (it has not been seen by the broker yet) gets nothing.
    pub fn allocate(
        &self,
        me: &str,
        queues: &[MessageQueue],
        consumers: &[String],
    ) -> Vec<MessageQueue> {
        let mut qs = queues.to_vec();
        qs.sort();
        qs.dedup();
        let mut cs = consumers.to_vec();
        cs.sort();
        cs.dedup();
        match self {
            Strategy::ByConfig(list) => return list.clone(),
            _ if qs.is_empty() => return Vec::new(),
            _ => {}
        }
        let Some(idx) = cs.iter().position(|c| c == me) else {
            return Vec::new();
        };
        match self {
            Strategy::Averagely => averagely(&qs, idx, cs.len()),
            Strategy::AveragelyByCircle => qs
                .iter()
                .enumerate()
                .filter(|(i, _)| i % cs.len() == idx)
                .map(|(_, q)| q.clone())
                .collect(),
            Strategy::MachineRoom {
                consumer_rooms,
                broker_rooms,
            } => machine_room(me, &qs, &cs, consumer_rooms, broker_rooms),
            Strategy::ConsistentHash { virtual_nodes } => {
                consistent_hash(me, &qs, &cs, (*virtual_nodes).max(1))
            }
            Strategy::ByConfig(_) => unreachable!("handled above"),
        }
    }
}

/// Consumer `idx` of `n` gets a contiguous block; the first `len % n` blocks are one larger.
fn averagely(qs: &[MessageQueue], idx: usize, n: usize) -> Vec<MessageQueue> {
    let len = qs.len();
    let base = len / n;
    let extra = len % n;
    let size = base + usize::from(idx < extra);
    let start = idx * base + idx.min(extra);
    qs.iter().skip(start).take(size).cloned().collect()
}

fn machine_room(
    me: &str,
    qs: &[MessageQueue],
    cs: &[String],
    consumer_rooms: &BTreeMap<String, String>,
    broker_rooms: &BTreeMap<String, String>,
) -> Vec<MessageQueue> {
    let my_room = consumer_rooms.get(me);
    let room_of = |q: &MessageQueue| broker_rooms.get(&q.broker_name);
    // Rooms that have at least one consumer.
    let staffed: Vec<&String> = cs.iter().filter_map(|c| consumer_rooms.get(c)).collect();
    let mut mine = Vec::new();
    if let Some(room) = my_room {
        let local: Vec<MessageQueue> = qs
            .iter()
            .filter(|q| room_of(q) == Some(room))
            .cloned()
            .collect();
        let peers: Vec<String> = cs
            .iter()
            .filter(|c| consumer_rooms.get(*c) == Some(room))
            .cloned()
            .collect();
        let i = peers
            .iter()
            .position(|c| c == me)
            .expect("me is in my room");
        mine.extend(averagely(&local, i, peers.len()));
    }
    // Queues of rooms no consumer is in would be orphaned: share them among everyone.
    let orphans: Vec<MessageQueue> = qs
        .iter()
        .filter(|q| room_of(q).is_none_or(|r| !staffed.contains(&r)))
        .cloned()
        .collect();
    let i = cs.iter().position(|c| c == me).expect("me is a consumer");
    mine.extend(averagely(&orphans, i, cs.len()));
    mine
}

/// FNV-1a, 64 bits: stable, so every consumer builds the same ring.
fn hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalize (murmur3's mix): FNV alone clusters similar short keys on the ring.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

fn consistent_hash(
    me: &str,
    qs: &[MessageQueue],
    cs: &[String],
    vnodes: usize,
) -> Vec<MessageQueue> {
    let mut ring: BTreeMap<u64, &str> = BTreeMap::new();
    for c in cs {
        for v in 0..vnodes {
            ring.insert(hash(&format!("{c}-{v}")), c.as_str());
        }
    }
    qs.iter()
        .filter(|q| {
            let k = hash(&q.to_string());
            let owner = ring
                .range(k..)
                .next()
                .or_else(|| ring.iter().next())
                .map(|(_, c)| *c);
            owner == Some(me)
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(brokers: &[&str], per: u32) -> Vec<MessageQueue> {
        brokers
            .iter()
            .flat_map(|b| (0..per).map(move |q| MessageQueue::new("T", *b, q)))
            .collect()
    }

    fn consumers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    fn shares(s: &Strategy, qs: &[MessageQueue], cs: &[String]) -> Vec<Vec<MessageQueue>> {
        cs.iter().map(|c| s.allocate(c, qs, cs)).collect()
    }

    /// Every queue has exactly one consumer.
    fn assert_partition(qs: &[MessageQueue], shares: &[Vec<MessageQueue>]) {
        let mut all: Vec<MessageQueue> = shares.iter().flatten().cloned().collect();
        all.sort();
        let mut want = qs.to_vec();
        want.sort();
        assert_eq!(all, want);
    }

    #[test]
    fn averagely_10_queues_4_consumers_is_3_3_2_2() {
        let qs = queues(&["b"], 10);
        let cs = consumers(4);
        let s = shares(&Strategy::Averagely, &qs, &cs);
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 2, 2]);
        assert_eq!(
            s[0].iter().map(|q| q.queue_id).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(
            s[3].iter().map(|q| q.queue_id).collect::<Vec<_>>(),
            vec![8, 9]
        );
        assert_partition(&qs, &s);
    }

    #[test]
    fn more_consumers_than_queues_leaves_some_idle() {
        let qs = queues(&["b"], 2);
        let s = shares(&Strategy::Averagely, &qs, &consumers(3));
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 0]);
    }

    #[test]
    fn by_circle_is_round_robin() {
        let qs = queues(&["b"], 10);
        let s = shares(&Strategy::AveragelyByCircle, &qs, &consumers(4));
        assert_eq!(
            s[0].iter().map(|q| q.queue_id).collect::<Vec<_>>(),
            vec![0, 4, 8]
        );
        assert_eq!(
            s[3].iter().map(|q| q.queue_id).collect::<Vec<_>>(),
            vec![3, 7]
        );
        assert_partition(&qs, &s);
    }

    #[test]
    fn input_order_does_not_matter() {
        let qs = queues(&["a", "b"], 8);
        let mut rev = qs.clone();
        rev.reverse();
        let cs = consumers(3);
        let mut cs_rev = cs.clone();
        cs_rev.reverse();
        for st in [
            Strategy::Averagely,
            Strategy::AveragelyByCircle,
            Strategy::ConsistentHash { virtual_nodes: 10 },
        ] {
            let reordered: Vec<Vec<MessageQueue>> =
                cs.iter().map(|c| st.allocate(c, &rev, &cs_rev)).collect();
            assert_eq!(shares(&st, &qs, &cs), reordered, "{}", st.name());
        }
    }

    #[test]
    fn machine_room_keeps_consumers_on_their_room_and_shares_orphans() {
        let qs = queues(&["east-b", "west-b", "north-b"], 4);
        let cs = consumers(3);
        let consumer_rooms: BTreeMap<String, String> =
            [("c0", "east"), ("c1", "east"), ("c2", "west")]
                .map(|(a, b)| (a.into(), b.into()))
                .into();
        let broker_rooms: BTreeMap<String, String> =
            [("east-b", "east"), ("west-b", "west"), ("north-b", "north")]
                .map(|(a, b)| (a.into(), b.into()))
                .into();
        let st = Strategy::MachineRoom {
            consumer_rooms,
            broker_rooms,
        };
        let s = shares(&st, &qs, &cs);
        assert_partition(&qs, &s);
        assert!(s[2]
            .iter()
            .filter(|q| q.broker_name != "north-b")
            .all(|q| q.broker_name == "west-b"));
        assert_eq!(s[2].iter().filter(|q| q.broker_name == "west-b").count(), 4);
        for share in &s[0..2] {
            assert!(share.iter().all(|q| q.broker_name != "west-b"));
        }
    }

    #[test]
    fn consistent_hash_partitions_and_moves_few_queues_when_one_joins() {
        let qs = queues(&["a", "b"], 16);
        let st = Strategy::ConsistentHash {
            virtual_nodes: DEFAULT_VIRTUAL_NODES,
        };
        let before = shares(&st, &qs, &consumers(3));
        assert_partition(&qs, &before);
        let after = shares(&st, &qs, &consumers(4));
        assert_partition(&qs, &after);
        // Only queues taken by the newcomer move; nobody else swaps queues.
        for c in 0..3 {
            assert!(
                after[c].iter().all(|q| before[c].contains(q)),
                "consumer c{c} got a queue it did not have"
            );
        }
    }

    #[test]
    fn by_config_is_fixed_and_strangers_get_nothing() {
        let qs = queues(&["b"], 4);
        let fixed = vec![qs[2].clone()];
        assert_eq!(
            Strategy::ByConfig(fixed.clone()).allocate("x", &qs, &consumers(2)),
            fixed
        );
        assert!(Strategy::Averagely
            .allocate("stranger", &qs, &consumers(2))
            .is_empty());
    }
}
