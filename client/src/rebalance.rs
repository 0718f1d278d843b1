//! Clustering rebalance (RocketMQ's `RebalanceImpl`): a consumer takes its share of a topic's
//! readable queues among the group's live consumers, by the group's allocation strategy.
//! The share and the hand-over plan are pure; fetching the inputs is the thin async part.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Fetches the topic's readable queues (route) and the group's consumer ids (from the first
/// broker endpoint of the route, sorted, so every member asks the same broker) and returns
/// this client's share. A client the broker has not heard from yet heartbeats first.
pub(crate) async fn topic_share(
    client: &Client,
    group: &str,
    topic: &str,
    strategy: &Strategy,
) -> Result<BTreeSet<MessageQueue>> {
    let route = client.topic_route(topic).await?;
    let queues: Vec<MessageQueue> = route.readable().iter().map(|q| q.mq.clone()).collect();
    let Some(endpoint) = route.endpoints().into_iter().next().map(str::to_owned) else {
        return Ok(BTreeSet::new());
    };
    let me = client.client_id().to_owned();
    let mut ids = client.consumer_ids(&endpoint, group).await?;
    if !ids.contains(&me) {
        client.heartbeat().await?;
        ids = client.consumer_ids(&endpoint, group).await?;
    }
    warn_on_conflicts(client, &endpoint, group).await;
    let mine = share(strategy, &me, &queues, &ids);
    tracing::debug!(%group, %topic, consumers = ids.len(), queues = queues.len(),
        mine = mine.len(), strategy = strategy.name(), "rebalanced");
    Ok(mine)
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
