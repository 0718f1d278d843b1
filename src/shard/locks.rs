//! Queue locks for orderly consumers (RocketMQ's `RebalanceLockManager`): per consumer group,
//! each (topic, queue) of this broker is held by at most one client, so that during a
//! rebalance two members never consume one queue at once. A lock is renewed by its holder's
//! next LOCK_BATCH_MQ and expires [`LOCK_EXPIRY`] after the last one; UNLOCK_BATCH_MQ
//! releases it. Broker-wide (any shard answers): the table is pure, time is passed in, and it
//! lives in [`crate::shard::broker::BrokerShared`] behind a mutex.
//!
//! This file also holds the two request handlers that use broker-wide state from any shard:
//! LOCK_BATCH_MQ / UNLOCK_BATCH_MQ, and INVOKE_BROKER_TO_RESET_OFFSET (the live offset reset,
//! answered by the shard that owns the queues, which pushes RESET_CONSUMER_CLIENT_OFFSET to the
//! group's consumers it knows).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_proto::codes::{push, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{
    self, LockBatchRequest, LockBatchResponse, LockQueue, ResetOffsetNotice, ResetOffsetRequest,
};
use orbitmq_proto::limits::{validate_topic, MAX_GROUP_LEN, MAX_QUEUES_PER_TOPIC};
use thiserror::Error;
use tracing::{debug, info};

use crate::nameserver::topics::PERM_READ;
use crate::net::server::{error_frame, error_frame_redirect, ok_frame};
use crate::shard::broker::ShardHandler;

/// RocketMQ's `REBALANCE_LOCK_MAX_LIVE_TIME` on the broker: a lock not renewed for this long
/// is free for another member (clients renew every 20 s).
pub const LOCK_EXPIRY: Duration = Duration::from_secs(60);
/// Queues one LOCK_BATCH_MQ / UNLOCK_BATCH_MQ may name (a consumer locks its queues of one
/// shard endpoint at once; a topic has at most `MAX_QUEUES_PER_TOPIC` per broker).
pub const MAX_LOCK_BATCH_QUEUES: usize = 4 * MAX_QUEUES_PER_TOPIC as usize;
/// Locks the table holds at most (all groups); past it, new locks are refused until expired
/// ones are purged. Bounds the memory a misbehaving client can take.
pub const MAX_LOCKS: usize = 1_000_000;
/// Queues one INVOKE_BROKER_TO_RESET_OFFSET may name (one topic's queues of one broker).
pub const MAX_RESET_QUEUES: usize = MAX_QUEUES_PER_TOPIC as usize;

/// Why a lock request is refused as a whole.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LockError {
    #[error("group must be 1..={MAX_GROUP_LEN} bytes")]
    Group,
    #[error("client id must be 1..={MAX_GROUP_LEN} bytes")]
    ClientId,
    #[error("a lock request names 1..={MAX_LOCK_BATCH_QUEUES} queues, not {0}")]
    QueueCount(usize),
    #[error("queue {queue_id} of topic {topic:?}: {why}")]
    Queue {
        topic: String,
        queue_id: u32,
        why: String,
    },
}

/// Checks a LOCK_BATCH_MQ / UNLOCK_BATCH_MQ header; returns its queues without duplicates.
pub fn validate_lock_request(r: &LockBatchRequest) -> Result<Vec<LockQueue>, LockError> {
    if r.group.is_empty() || r.group.len() > MAX_GROUP_LEN {
        return Err(LockError::Group);
    }
    if r.client_id.is_empty() || r.client_id.len() > MAX_GROUP_LEN {
        return Err(LockError::ClientId);
    }
    if r.queues.is_empty() || r.queues.len() > MAX_LOCK_BATCH_QUEUES {
        return Err(LockError::QueueCount(r.queues.len()));
    }
    for q in &r.queues {
        let bad = |why: String| LockError::Queue {
            topic: q.topic.clone(),
            queue_id: q.queue_id,
            why,
        };
        validate_topic(&q.topic).map_err(|e| bad(e.to_string()))?;
        if q.queue_id >= MAX_QUEUES_PER_TOPIC {
            return Err(bad(format!("queue ids are below {MAX_QUEUES_PER_TOPIC}")));
        }
    }
    let set: BTreeSet<LockQueue> = r.queues.iter().cloned().collect();
    Ok(set.into_iter().collect())
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Holder {
    client_id: String,
    renewed: Instant,
}

/// The lock table of one broker.
#[derive(Debug)]
pub struct LockTable {
    expiry: Duration,
    /// group -> queue -> holder.
    groups: HashMap<String, HashMap<LockQueue, Holder>>,
    len: usize,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable::new(LOCK_EXPIRY)
    }
}

impl LockTable {
    pub fn new(expiry: Duration) -> LockTable {
        LockTable {
            expiry,
            groups: HashMap::new(),
            len: 0,
        }
    }

    fn expired(&self, h: &Holder, now: Instant) -> bool {
        now.saturating_duration_since(h.renewed) >= self.expiry
    }

    /// Locks (or renews) each queue for `client_id` of `group` where it is free, expired, or
    /// already this client's. Returns the queues the client holds afterwards, in request order.
    pub fn lock(
        &mut self,
        group: &str,
        client_id: &str,
        queues: &[LockQueue],
        now: Instant,
    ) -> Vec<LockQueue> {
        if self.len >= MAX_LOCKS {
            self.purge(now);
        }
        let expiry = self.expiry;
        let mut added = 0usize;
        let room = MAX_LOCKS.saturating_sub(self.len);
        let g = self.groups.entry(group.to_owned()).or_default();
        let mut locked = Vec::with_capacity(queues.len());
        for q in queues {
            match g.get_mut(q) {
                Some(h)
                    if h.client_id == client_id
                        || now.saturating_duration_since(h.renewed) >= expiry =>
                {
                    if h.client_id != client_id {
                        info!(%group, queue = ?q, from = %h.client_id, to = %client_id,
                            "expired queue lock taken over");
                        h.client_id = client_id.to_owned();
                    }
                    h.renewed = now;
                    locked.push(q.clone());
                }
                Some(_) => {}
                None if added < room => {
                    g.insert(
                        q.clone(),
                        Holder {
                            client_id: client_id.to_owned(),
                            renewed: now,
                        },
                    );
                    added += 1;
                    locked.push(q.clone());
                }
                None => {}
            }
        }
        if g.is_empty() {
            self.groups.remove(group);
        }
        self.len += added;
        locked
    }

    /// Releases the queues `client_id` holds among `queues`; another client's locks stay.
    /// Returns how many were released.
    pub fn unlock(&mut self, group: &str, client_id: &str, queues: &[LockQueue]) -> usize {
        let Some(g) = self.groups.get_mut(group) else {
            return 0;
        };
        let mut n = 0;
        for q in queues {
            if g.get(q).is_some_and(|h| h.client_id == client_id) {
                g.remove(q);
                n += 1;
            }
        }
        if g.is_empty() {
            self.groups.remove(group);
        }
        self.len -= n;
        n
    }

    /// The live holder of a queue.
    pub fn holder(&self, group: &str, q: &LockQueue, now: Instant) -> Option<&str> {
        self.groups
            .get(group)?
            .get(q)
            .filter(|h| !self.expired(h, now))
            .map(|h| h.client_id.as_str())
    }

    /// Drops expired locks.
    pub fn purge(&mut self, now: Instant) {
        let expiry = self.expiry;
        let mut n = 0;
        self.groups.retain(|_, g| {
            let before = g.len();
            g.retain(|_, h| now.saturating_duration_since(h.renewed) < expiry);
            n += before - g.len();
            !g.is_empty()
        });
        self.len -= n;
    }

    /// Locks in the table, expired ones included until purged.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Checks an INVOKE_BROKER_TO_RESET_OFFSET header (shape only; the queues are checked
/// against the topic table by the handler).
pub fn validate_reset_request(r: &ResetOffsetRequest) -> Result<(), String> {
    if r.group.is_empty() || r.group.len() > MAX_GROUP_LEN {
        return Err(format!("group must be 1..={MAX_GROUP_LEN} bytes"));
    }
    validate_topic(&r.topic).map_err(|e| e.to_string())?;
    if r.broker_name.len() > MAX_GROUP_LEN {
        return Err(format!("broker name must be at most {MAX_GROUP_LEN} bytes"));
    }
    if r.offsets.is_empty() || r.offsets.len() > MAX_RESET_QUEUES {
        return Err(format!(
            "a reset names 1..={MAX_RESET_QUEUES} queues, not {}",
            r.offsets.len()
        ));
    }
    let ids: BTreeSet<u32> = r.offsets.iter().map(|o| o.queue_id).collect();
    if ids.len() != r.offsets.len() {
        return Err("a reset names a queue twice".into());
    }
    Ok(())
}

impl ShardHandler {
    /// LOCK_BATCH_MQ (lock or renew; the response lists what the client holds) and
    /// UNLOCK_BATCH_MQ (release). Any shard answers: the table is the broker's.
    pub(crate) fn lock_batch(&self, req: &Frame, unlock: bool) -> Frame {
        let id = req.request_id;
        let h: LockBatchRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        let queues = match validate_lock_request(&h) {
            Ok(q) => q,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        let now = Instant::now();
        let mut table = self.shared.locks.lock().expect("locks lock");
        if unlock {
            let n = table.unlock(&h.group, &h.client_id, &queues);
            debug!(group = %h.group, client = %h.client_id, released = n, "queues unlocked");
            return ok_frame(id, Bytes::new(), Bytes::new());
        }
        let locked = table.lock(&h.group, &h.client_id, &queues, now);
        drop(table);
        debug!(group = %h.group, client = %h.client_id, asked = queues.len(),
            locked = locked.len(), "queues locked");
        ok_frame(
            id,
            header::encode(&LockBatchResponse { locked }),
            Bytes::new(),
        )
    }

    /// Whether the topic exists (no auto-creation: a reset names stored queues), is readable,
    /// has the queue, and this shard owns it.
    fn owns_readable_queue(&self, topic: &str, queue_id: u32) -> Result<(), (u16, String)> {
        let Some(t) = self.shared.topics.get(topic) else {
            return Err((
                response::TOPIC_NOT_EXIST,
                format!("topic {topic} does not exist on this broker"),
            ));
        };
        if t.perm & PERM_READ == 0 || queue_id >= t.read_queues {
            return Err((
                response::BAD_REQUEST,
                format!(
                    "queue {queue_id} of topic {topic} is not readable (it has {} read queues)",
                    t.read_queues
                ),
            ));
        }
        let owner = self.shared.shape.shard_of(topic, queue_id);
        if owner != self.shard {
            return Err((
                response::WRONG_SHARD,
                format!("queue {queue_id} of {topic} is served by shard {owner}"),
            ));
        }
        Ok(())
    }

    /// INVOKE_BROKER_TO_RESET_OFFSET: commits the group's new offsets of queues this shard
    /// owns, then pushes RESET_CONSUMER_CLIENT_OFFSET to the group's live consumers that
    /// heartbeat on this shard (every consumer of the topic does: clients heartbeat each
    /// endpoint of their routes, and this shard owns queues of the topic).
    pub(crate) fn reset_offset(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let h: ResetOffsetRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if let Err(why) = validate_reset_request(&h) {
            return error_frame(id, response::BAD_REQUEST, why);
        }
        // Check every queue before committing any: a reset applies whole or not at all.
        for o in &h.offsets {
            if let Err((code, why)) = self.owns_readable_queue(&h.topic, o.queue_id) {
                // A queue of another shard: name its endpoint, as every request does.
                let owner = self.shared.shape.shard_of(&h.topic, o.queue_id);
                let redirect = self
                    .shared
                    .endpoints
                    .get()
                    .and_then(|e| e.get(owner as usize))
                    .filter(|_| code == response::WRONG_SHARD)
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                return error_frame_redirect(id, code, why, redirect);
            }
            let (min, max) = self
                .store
                .queue_bounds(&h.topic, o.queue_id)
                .unwrap_or((0, 0));
            if o.offset < min || o.offset > max {
                return error_frame(
                    id,
                    response::BAD_REQUEST,
                    format!(
                        "offset {} of queue {} of {} is outside [{min}, {max}]",
                        o.offset, o.queue_id, h.topic
                    ),
                );
            }
        }
        let offsets: Vec<(u32, u64)> = h.offsets.iter().map(|o| (o.queue_id, o.offset)).collect();
        if let Err(e) = self.store.commit_offsets(&h.group, &h.topic, &offsets) {
            return error_frame(id, response::BAD_REQUEST, e.to_string());
        }
        let consumers = self
            .shared
            .clients
            .lock()
            .expect("clients lock")
            .consumers(&h.group, Instant::now());
        let notice = header::encode(&ResetOffsetNotice {
            group: h.group.clone(),
            topic: h.topic.clone(),
            broker_name: h.broker_name.clone(),
            offsets: h.offsets.clone(),
        });
        let peers = self.peers.borrow();
        let mut pushed = 0;
        for client in consumers {
            let Some(p) = peers.get(&client).cloned() else {
                continue;
            };
            pushed += 1;
            let notice = notice.clone();
            glommio::spawn_local(async move {
                if let Err(e) = p
                    .push_header(push::RESET_CONSUMER_CLIENT_OFFSET, notice)
                    .await
                {
                    debug!(%client, error = %e, "reset offset notice not sent");
                }
            })
            .detach();
        }
        info!(group = %h.group, topic = %h.topic, queues = h.offsets.len(), pushed,
            "consumer offsets reset");
        ok_frame(id, Bytes::new(), Bytes::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(topic: &str, id: u32) -> LockQueue {
        LockQueue {
            topic: topic.into(),
            queue_id: id,
        }
    }

    #[test]
    fn a_held_queue_is_refused_to_another_client_until_it_expires() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        let both = [q("T", 0), q("T", 1)];
        assert_eq!(t.lock("g", "a", &both[..1], t0), vec![q("T", 0)]);
        // b gets only the free queue.
        assert_eq!(t.lock("g", "b", &both, t0), vec![q("T", 1)]);
        assert_eq!(t.holder("g", &q("T", 0), t0), Some("a"));
        assert_eq!(t.holder("g", &q("T", 1), t0), Some("b"));
        // Just before expiry a still holds it.
        let almost = t0 + LOCK_EXPIRY - Duration::from_millis(1);
        assert!(t.lock("g", "b", &both[..1], almost).is_empty());
        // At expiry b takes it over.
        let later = t0 + LOCK_EXPIRY;
        assert_eq!(t.lock("g", "b", &both[..1], later), vec![q("T", 0)]);
        assert_eq!(t.holder("g", &q("T", 0), later), Some("b"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn renewal_by_the_holder_extends_the_lock() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        t.lock("g", "a", &[q("T", 0)], t0);
        let t1 = t0 + Duration::from_secs(50);
        assert_eq!(t.lock("g", "a", &[q("T", 0)], t1), vec![q("T", 0)]);
        // 60 s after the first lock but 10 s after the renewal: still a's.
        let t2 = t0 + LOCK_EXPIRY;
        assert!(t.lock("g", "b", &[q("T", 0)], t2).is_empty());
        assert_eq!(t.holder("g", &q("T", 0), t2), Some("a"));
        assert_eq!(t.holder("g", &q("T", 0), t1 + LOCK_EXPIRY), None);
    }

    #[test]
    fn unlock_releases_only_the_holders_queues() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        t.lock("g", "a", &[q("T", 0), q("T", 1)], t0);
        assert_eq!(t.unlock("g", "b", &[q("T", 0)]), 0, "not b's to release");
        assert_eq!(t.holder("g", &q("T", 0), t0), Some("a"));
        assert_eq!(t.unlock("g", "a", &[q("T", 0), q("T", 7)]), 1);
        assert_eq!(
            t.lock("g", "b", &[q("T", 0), q("T", 1)], t0),
            vec![q("T", 0)]
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.unlock("g", "a", &[q("T", 1)]), 1);
        assert_eq!(t.unlock("g", "b", &[q("T", 0)]), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn groups_and_topics_lock_independently() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        assert_eq!(t.lock("g1", "a", &[q("T", 0)], t0), vec![q("T", 0)]);
        assert_eq!(t.lock("g2", "b", &[q("T", 0)], t0), vec![q("T", 0)]);
        assert_eq!(t.lock("g1", "b", &[q("U", 0)], t0), vec![q("U", 0)]);
        assert!(t.lock("g1", "b", &[q("T", 0)], t0).is_empty());
    }

    #[test]
    fn purge_drops_only_expired_locks() {
        let mut t = LockTable::default();
        let t0 = Instant::now();
        t.lock("g", "a", &[q("T", 0)], t0);
        t.lock("g", "a", &[q("T", 1)], t0 + Duration::from_secs(30));
        t.purge(t0 + LOCK_EXPIRY);
        assert_eq!(t.len(), 1);
        assert_eq!(t.holder("g", &q("T", 1), t0 + LOCK_EXPIRY), Some("a"));
        t.purge(t0 + Duration::from_secs(30) + LOCK_EXPIRY);
        assert!(t.is_empty());
    }

    #[test]
    fn lock_requests_are_validated() {
        let ok = LockBatchRequest {
            group: "g".into(),
            client_id: "c".into(),
            queues: vec![q("T", 1), q("T", 0), q("T", 1)],
        };
        assert_eq!(validate_lock_request(&ok), Ok(vec![q("T", 0), q("T", 1)]));
        let bad = |f: &dyn Fn(&mut LockBatchRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            validate_lock_request(&r).unwrap_err()
        };
        assert_eq!(bad(&|r| r.group.clear()), LockError::Group);
        assert_eq!(
            bad(&|r| r.group = "g".repeat(MAX_GROUP_LEN + 1)),
            LockError::Group
        );
        assert_eq!(bad(&|r| r.client_id.clear()), LockError::ClientId);
        assert_eq!(bad(&|r| r.queues.clear()), LockError::QueueCount(0));
        assert_eq!(
            bad(&|r| r.queues = vec![q("T", 0); MAX_LOCK_BATCH_QUEUES + 1]),
            LockError::QueueCount(MAX_LOCK_BATCH_QUEUES + 1)
        );
        assert!(matches!(
            bad(&|r| r.queues[0].topic = "a b".into()),
            LockError::Queue { .. }
        ));
        assert!(matches!(
            bad(&|r| r.queues[0].queue_id = MAX_QUEUES_PER_TOPIC),
            LockError::Queue { .. }
        ));
    }

    #[test]
    fn reset_requests_are_validated() {
        use orbitmq_proto::header::QueueOffset;
        let ok = ResetOffsetRequest {
            group: "g".into(),
            topic: "T".into(),
            broker_name: "b".into(),
            offsets: vec![
                QueueOffset {
                    queue_id: 0,
                    offset: 5,
                },
                QueueOffset {
                    queue_id: 1,
                    offset: 0,
                },
            ],
        };
        assert_eq!(validate_reset_request(&ok), Ok(()));
        let mut r = ok.clone();
        r.offsets[1].queue_id = 0;
        assert!(validate_reset_request(&r).is_err());
        let mut r = ok.clone();
        r.offsets.clear();
        assert!(validate_reset_request(&r).is_err());
        let mut r = ok.clone();
        r.group.clear();
        assert!(validate_reset_request(&r).is_err());
        let mut r = ok;
        r.topic = "a.b".into();
        assert!(validate_reset_request(&r).is_err());
    }
}
