//! Clustering rebalance (RocketMQ's `RebalanceImpl`): a consumer takes its share of a topic's
//! readable queues among the group's live consumers, by the group's allocation strategy.
//! The share and the hand-over plan are pure; fetching the inputs is the thin async part.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orbitmq_proto::codes::push as push_code;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::allocate::Strategy;
use crate::client::Client;
use crate::error::Result;
use crate::remoting::Push;
use crate::route::MessageQueue;

/// RocketMQ's `rebalance interval`: how often a consumer recomputes its share even without a
/// notice from a broker (covers lost notices, expired members and queue counts raised live).
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(20);

/// How a change of assignment is carried out: queues to drop (commit, then forget) and
/// queues to start (at the committed offset).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub drop: Vec<MessageQueue>,
    pub add: Vec<MessageQueue>,
}

/// The difference between what a consumer holds of a topic and its new share.
pub fn plan(held: &BTreeSet<MessageQueue>, share: &BTreeSet<MessageQueue>) -> Plan {
    Plan {
        drop: held.difference(share).cloned().collect(),
        add: share.difference(held).cloned().collect(),
    }
}

/// The share of `me` of `queues` among `consumers` (both sorted inside the strategy).
pub fn share(
    strategy: &Strategy,
    me: &str,
    queues: &[MessageQueue],
    consumers: &[String],
) -> BTreeSet<MessageQueue> {
    strategy
        .allocate(me, queues, consumers)
        .into_iter()
        .collect()
}

/// The queues of the route (`now`) that were added to the topic live: readable now, not in
/// the route this consumer saw at its previous rebalance (`None` at its first). Such a queue
/// has only messages sent since it was created, so the group must start it at its first
/// offset whatever its `consume_from_where` says (RocketMQ's broker answers offset 0 for a
/// group without an offset on a young queue, to the same end): starting at its last offset
/// would skip what producers sent to it before its owner took it. All of the route's new
/// queues count, not only this consumer's share: a raise can reach the route half-way (one
/// broker's queues first), so a queue may enter the route at one rebalance and this
/// consumer's share at a later one, when it is no longer new.
pub fn added_live(
    previous: Option<&BTreeSet<MessageQueue>>,
    now: &BTreeSet<MessageQueue>,
) -> Vec<MessageQueue> {
    match previous {
        None => Vec::new(),
        Some(prev) => now.difference(prev).cloned().collect(),
    }
}

/// Readable queues of each topic's route at the last rebalance, by (client id, group, topic).
type SeenRoutes = BTreeMap<(String, String, String), BTreeSet<MessageQueue>>;

/// What [`added_live`] compares against: one small entry per consumer client, group and
/// topic this process has rebalanced (kept after the consumer shuts down).
static SEEN_ROUTES: Mutex<SeenRoutes> = Mutex::new(BTreeMap::new());

/// Commits the first offset of a queue added live for the group, unless the group already
/// has an offset there, so that the new owner (this consumer, next) starts at it.
async fn start_added_queue(client: &Client, group: &str, mq: &MessageQueue) -> Result<()> {
    if client.query_consumer_offset(group, mq).await?.is_some() {
        return Ok(());
    }
    let first = client.min_offset(mq).await?;
    client.update_consumer_offset(group, mq, first).await?;
    tracing::info!(%group, queue = %mq, offset = first,
        "queue added to the topic live: the group starts it at its first offset");
    Ok(())
}

/// Fetches the topic's readable queues (route) and the group's consumer ids (from the first
/// broker endpoint of the route, sorted, so every member asks the same broker, or the next
/// one when it does not answer) and returns this client's share. A client the broker has not
/// heard from yet heartbeats first. Queues added to the topic since the previous rebalance
/// ([`added_live`]) get the group's offset set to their first offset when it has none.
pub(crate) async fn topic_share(
    client: &Client,
    group: &str,
    topic: &str,
    strategy: &Strategy,
) -> Result<BTreeSet<MessageQueue>> {
    let route = client.topic_route(topic).await?;
    let queues: Vec<MessageQueue> = route.readable().iter().map(|q| q.mq.clone()).collect();
    let endpoints: Vec<String> = route.endpoints().into_iter().map(str::to_owned).collect();
    if endpoints.is_empty() {
        return Ok(BTreeSet::new());
    }
    let me = client.client_id().to_owned();
    // The first endpoint that answers: every member asks in the same order, so they agree
    // while it is up, and a dead broker (still routed until the name servers drop it) does
    // not stop the group from rebalancing.
    let mut asked = None;
    let mut first_err = None;
    for endpoint in &endpoints {
        match group_members(client, endpoint, group, &me).await {
            Ok(ids) => {
                asked = Some((endpoint, ids));
                break;
            }
            Err(e) => {
                tracing::debug!(%group, %endpoint, error = %e,
                    "no consumer list from this endpoint; asking the next");
                first_err.get_or_insert(e);
            }
        }
    }
    let Some((endpoint, ids)) = asked else {
        return Err(first_err.expect("at least one endpoint was asked"));
    };
    warn_on_conflicts(client, endpoint, group).await;
    let mine = share(strategy, &me, &queues, &ids);
    let key = (me, group.to_owned(), topic.to_owned());
    let readable: BTreeSet<MessageQueue> = queues.iter().cloned().collect();
    let added = added_live(
        SEEN_ROUTES.lock().expect("seen routes lock").get(&key),
        &readable,
    );
    for mq in &added {
        // On failure the route is not recorded: the next rebalance tries again (the caller
        // keeps its current queues meanwhile).
        start_added_queue(client, group, mq).await?;
    }
    SEEN_ROUTES
        .lock()
        .expect("seen routes lock")
        .insert(key, readable);
    tracing::debug!(%group, %topic, consumers = ids.len(), queues = queues.len(),
        mine = mine.len(), added = added.len(), strategy = strategy.name(), "rebalanced");
    Ok(mine)
}

/// The group's consumer ids as `endpoint` knows them. A client missing from the list (the
/// broker has not heard from it yet) heartbeats first; a heartbeat failing on another broker
/// does not matter here.
async fn group_members(
    client: &Client,
    endpoint: &str,
    group: &str,
    me: &str,
) -> Result<Vec<String>> {
    let ids = client.consumer_ids(endpoint, group).await?;
    if ids.iter().any(|id| id == me) {
        return Ok(ids);
    }
    if let Err(e) = client.heartbeat().await {
        tracing::debug!(%group, error = %e, "heartbeat before rebalancing failed somewhere");
    }
    client.consumer_ids(endpoint, group).await
}

/// Logs a warning naming the members when the broker sees members of the group subscribe
/// differently (queues may then go unconsumed: RocketMQ's subscription-consistency trap).
async fn warn_on_conflicts(client: &Client, endpoint: &str, group: &str) {
    match client.consumer_connections(endpoint, group).await {
        Ok(r) if !r.conflicts.is_empty() => {
            tracing::warn!(%group, conflicts = %r.conflicts.join("; "),
                "members of the consumer group subscribe differently: some queues may go unconsumed");
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(%group, error = %e, "no subscription check"),
    }
}

/// Sets `flag` whenever a broker pushes NOTIFY_CONSUMER_IDS_CHANGED for `group`.
pub(crate) fn watch_notices(
    mut rx: broadcast::Receiver<Push>,
    group: String,
    flag: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(p) if p.code == push_code::NOTIFY_CONSUMER_IDS_CHANGED && p.message == group => {
                    tracing::debug!(%group, from = %p.endpoint, "consumer ids changed");
                    flag.store(true, Ordering::Release);
                    wake.notify_one();
                }
                Ok(_) => {}
                // Missed notices: rebalance anyway, to be safe.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    flag.store(true, Ordering::Release);
                    wake.notify_one();
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qs(n: u32) -> Vec<MessageQueue> {
        (0..n).map(|i| MessageQueue::new("T", "b", i)).collect()
    }

    #[test]
    fn shares_of_all_members_cover_every_queue_once() {
        let queues = qs(8);
        let ids: Vec<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        for strategy in [
            Strategy::Averagely,
            Strategy::AveragelyByCircle,
            Strategy::ConsistentHash { virtual_nodes: 10 },
        ] {
            let mut all = Vec::new();
            for me in &ids {
                all.extend(share(&strategy, me, &queues, &ids));
            }
            all.sort();
            assert_eq!(all, queues, "{}", strategy.name());
        }
        assert_eq!(share(&Strategy::Averagely, "a", &queues, &ids).len(), 3);
        assert!(share(&Strategy::Averagely, "unknown", &queues, &ids).is_empty());
    }

    #[test]
    fn queues_added_live_are_those_of_the_route_missing_from_the_previous_one() {
        let mq = |broker: &str, id: u32| MessageQueue::new("T", broker, id);
        let route = |a: u32, b: u32| -> BTreeSet<MessageQueue> {
            (0..a)
                .map(|i| mq("a", i))
                .chain((0..b).map(|i| mq("b", i)))
                .collect()
        };
        // The first rebalance of a consumer: nothing counts as added.
        assert!(added_live(None, &route(8, 8)).is_empty());
        // A raise from 4 to 8 queues seen half-way: broker a's new queues come first. With
        // two members, "a" takes a0..a5 of the 12 and the other a6, a7, b0..b3; a6 and a7
        // are new now, whoever's share they are in, and no longer new when "a" takes them
        // once b's queues come too.
        let ids = vec!["a".to_string(), "b".to_string()];
        let half: Vec<MessageQueue> = route(8, 4).into_iter().collect();
        assert_eq!(share(&Strategy::Averagely, "a", &half, &ids).len(), 6);
        let added = added_live(Some(&route(4, 4)), &route(8, 4));
        assert_eq!(added, (4..8).map(|i| mq("a", i)).collect::<Vec<_>>());
        let added = added_live(Some(&route(8, 4)), &route(8, 8));
        assert_eq!(added, (4..8).map(|i| mq("b", i)).collect::<Vec<_>>());
        assert!(added_live(Some(&route(8, 8)), &route(8, 8)).is_empty());
    }

    #[test]
    fn plan_drops_what_left_and_adds_what_came() {
        let q = qs(4);
        let held: BTreeSet<_> = q[0..3].iter().cloned().collect();
        let next: BTreeSet<_> = q[2..4].iter().cloned().collect();
        let p = plan(&held, &next);
        assert_eq!(p.drop, q[0..2].to_vec());
        assert_eq!(p.add, vec![q[3].clone()]);
        assert_eq!(plan(&next, &next), Plan::default());
    }
}
