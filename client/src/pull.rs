//! Pull responses: per-queue results and their records, checked and turned into messages.

use std::collections::HashSet;
use std::net::SocketAddr;

use bytes::Bytes;
use orbitmq_proto::codes::response;
use orbitmq_proto::header::PullResponse;
use orbitmq_proto::limits::MAX_PULL_MESSAGES;
use orbitmq_proto::record;

use crate::client::PullTarget;
use crate::message::MessageExt;
use crate::route::MessageQueue;

/// What a pull found on one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullStatus {
    /// Records follow (possibly none after the client's exact-tag check).
    Found,
    /// Nothing new after the long poll.
    NoNewMessages,
    /// The requested offset is out of range: continue from `next_offset`.
    OffsetMoved,
    /// Try again right away.
    RetryImmediately,
    /// The queue is on another shard: the route must be refreshed.
    WrongShard,
    TopicNotExist,
    /// Another response code.
    Other(u16),
}

impl PullStatus {
    pub fn from_code(code: u16) -> PullStatus {
        match code {
            response::SUCCESS => PullStatus::Found,
            response::PULL_NOT_FOUND => PullStatus::NoNewMessages,
            response::PULL_OFFSET_MOVED => PullStatus::OffsetMoved,
            response::PULL_RETRY_IMMEDIATELY => PullStatus::RetryImmediately,
            response::WRONG_SHARD => PullStatus::WrongShard,
            response::TOPIC_NOT_EXIST => PullStatus::TopicNotExist,
            other => PullStatus::Other(other),
        }
    }

    pub(crate) fn invalidates_route(self) -> bool {
        matches!(self, PullStatus::WrongShard | PullStatus::TopicNotExist)
    }
}

/// The result of one queue of a pull.
#[derive(Clone, Debug)]
pub struct QueuePullResult {
    pub mq: MessageQueue,
    pub status: PullStatus,
    /// The offset the pull asked for.
    pub pulled_from: u64,
    /// Where the next pull of this queue starts.
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    /// The messages that matched the subscription, in queue order.
    pub messages: Vec<MessageExt>,
    /// The broker's reason for a failed status (may be empty).
    pub reason: String,
    /// Records the broker returned that the exact-tag check dropped.
    pub filtered: u32,
}

/// Splits a pull response body among its queues and validates every record. `body` is the
/// frame body; message bodies are slices of it. `broker` is the shard endpoint's address,
/// used in offset message ids.
pub(crate) fn decode_pull_response(
    header: PullResponse,
    body: &Bytes,
    targets: &[PullTarget],
    broker: SocketAddr,
) -> Result<Vec<QueuePullResult>, String> {
    let mut seen = HashSet::new();
    let mut pos = 0usize;
    let mut out = Vec::with_capacity(header.queues.len());
    for q in header.queues {
        let t = targets
            .iter()
            .find(|t| t.queue.mq.topic == q.topic && t.queue.mq.queue_id == q.queue_id)
            .ok_or_else(|| {
                format!(
                    "result for queue {}#{} that was not asked for",
                    q.topic, q.queue_id
                )
            })?;
        if !seen.insert((q.topic.clone(), q.queue_id)) {
            return Err(format!("queue {}#{} answered twice", q.topic, q.queue_id));
        }
        let status = PullStatus::from_code(q.status);
        let end = pos
            .checked_add(q.bytes as usize)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| {
                format!(
                    "queue {}#{} claims {} bytes; the body has {} left",
                    q.topic,
                    q.queue_id,
                    q.bytes,
                    body.len() - pos
                )
            })?;
        if status != PullStatus::Found && (q.count != 0 || q.bytes != 0) {
            return Err(format!(
                "queue {}#{} has status {} and records",
                q.topic,
                q.queue_id,
                response::name(q.status)
            ));
        }
        let shard = u16::try_from(t.queue.shard).map_err(|_| "shard over u16".to_string())?;
        let chunk = body.slice(pos..end);
        // `count` comes off the network: bound the allocation, the records prove the rest.
        let mut messages = Vec::with_capacity((q.count as usize).min(MAX_PULL_MESSAGES as usize));
        let mut filtered = 0u32;
        let mut at = 0usize;
        let mut last_offset: Option<u64> = None;
        for i in 0..q.count {
            let view = record::decode(&chunk[at..])
                .map_err(|e| format!("queue {}#{} record {i}: {e}", q.topic, q.queue_id))?;
            if view.topic != q.topic || view.queue_id != q.queue_id {
                return Err(format!(
                    "queue {}#{} record {i} belongs to {}#{}",
                    q.topic, q.queue_id, view.topic, view.queue_id
                ));
            }
            let off = view.queue_offset;
            if off < t.offset || off >= q.next_offset || last_offset.is_some_and(|l| off <= l) {
                return Err(format!(
                    "queue {}#{} record {i} has offset {off}, outside [{}, {}) or out of order",
                    q.topic, q.queue_id, t.offset, q.next_offset
                ));
            }
            last_offset = Some(off);
            if t.expr.matches_record(&view) {
                messages.push(MessageExt::from_record(
                    &view,
                    &chunk,
                    &t.queue.mq.broker_name,
                    broker,
                    shard,
                ));
            } else {
                filtered += 1;
            }
            at += view.total_size as usize;
        }
        if at != chunk.len() {
            return Err(format!(
                "queue {}#{}: {} records use {at} of {} bytes",
                q.topic,
                q.queue_id,
                q.count,
                chunk.len()
            ));
        }
        pos = end;
        if status == PullStatus::Found && q.next_offset < t.offset {
            return Err(format!(
                "queue {}#{}: next offset {} is before the pulled offset {}",
                q.topic, q.queue_id, q.next_offset, t.offset
            ));
        }
        out.push(QueuePullResult {
            mq: t.queue.mq.clone(),
            status,
            pulled_from: t.offset,
            next_offset: q.next_offset,
            min_offset: q.min_offset,
            max_offset: q.max_offset,
            messages,
            filtered,
            reason: q.reason,
        });
    }
    if pos != body.len() {
        return Err(format!(
            "{} bytes of the body belong to no queue",
            body.len() - pos
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use orbitmq_proto::header::PullQueueResult;
    use orbitmq_proto::record::{Message, Placement};

    use super::*;
    use crate::filter::SubExpr;
    use crate::route::QueueInfo;

    fn target(q: u32, offset: u64, expr: &str) -> PullTarget {
        PullTarget {
            queue: QueueInfo {
                mq: MessageQueue::new("T", "b", q),
                shard: q % 2,
                endpoint: "127.0.0.1:1".into(),
                perm: 6,
            },
            offset,
            max_msgs: 32,
            expr: Arc::new(SubExpr::parse(expr).unwrap()),
        }
    }

    fn rec(q: u32, off: u64, tags: &str, body: &str, out: &mut Vec<u8>) -> u32 {
        let m = Message {
            topic: "T".into(),
            queue_id: q,
            tags: tags.into(),
            body: body.as_bytes().to_vec().into(),
            ..Default::default()
        };
        record::encode_into(
            &m,
            Placement {
                queue_offset: off,
                physical_offset: off * 1000,
                store_timestamp: 1,
            },
            out,
        ) as u32
    }

    fn result(q: u32, status: u16, next: u64, count: u32, bytes: u32) -> PullQueueResult {
        PullQueueResult {
            topic: "T".into(),
            queue_id: q,
            status,
            next_offset: next,
            min_offset: 0,
            max_offset: next,
            count,
            bytes,
            redirect: String::new(),
            reason: String::new(),
        }
    }

    const ADDR: &str = "127.0.0.1:10911";

    #[test]
    fn splits_queues_and_rechecks_tags() {
        let mut body = Vec::new();
        let a = rec(0, 5, "A", "q0-5", &mut body) + rec(0, 6, "B", "q0-6", &mut body);
        let b = rec(1, 9, "A", "q1-9", &mut body);
        let body = Bytes::from(body);
        let header = PullResponse {
            queues: vec![
                result(0, response::SUCCESS, 7, 2, a),
                result(2, response::PULL_NOT_FOUND, 3, 0, 0),
                result(1, response::SUCCESS, 10, 1, b),
            ],
        };
        let targets = [target(0, 5, "A"), target(1, 9, "*"), target(2, 3, "*")];
        let r = decode_pull_response(header, &body, &targets, ADDR.parse().unwrap()).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].messages.len(), 1, "tag B is a hash collision to drop");
        assert_eq!(r[0].filtered, 1);
        assert_eq!(r[0].messages[0].body, Bytes::from_static(b"q0-5"));
        assert_eq!(r[0].next_offset, 7, "the filtered record is still passed");
        assert_eq!(r[1].status, PullStatus::NoNewMessages);
        assert_eq!(r[2].messages[0].body, Bytes::from_static(b"q1-9"));
        assert_eq!(r[2].messages[0].queue_offset, 9);
    }

    #[test]
    fn refuses_inconsistent_responses() {
        let mut raw = Vec::new();
        let n = rec(0, 5, "A", "x", &mut raw);
        let body = Bytes::from(raw.clone());
        let addr: SocketAddr = ADDR.parse().unwrap();
        let t = [target(0, 5, "*")];
        let run = |h: Vec<PullQueueResult>, body: &Bytes| {
            decode_pull_response(PullResponse { queues: h }, body, &t, addr)
        };
        // Byte counts that do not add up.
        assert!(run(vec![result(0, 0, 6, 1, n + 1)], &body).is_err());
        assert!(run(vec![result(0, 0, 6, 1, n - 1)], &body).is_err());
        assert!(
            run(vec![result(0, 0, 6, 0, 0)], &body).is_err(),
            "leftover body"
        );
        // A queue that was not asked for, or answered twice.
        assert!(run(vec![result(3, 0, 6, 1, n)], &body).is_err());
        assert!(run(vec![result(0, 0, 6, 1, n), result(0, 19, 6, 0, 0)], &body).is_err());
        // Offsets outside the asked range.
        assert!(run(vec![result(0, 0, 5, 1, n)], &body).is_err());
        let early = [target(0, 6, "*")];
        assert!(decode_pull_response(
            PullResponse {
                queues: vec![result(0, 0, 7, 1, n)]
            },
            &body,
            &early,
            addr
        )
        .is_err());
        // A hostile record count does not allocate; it fails on the missing records.
        assert!(run(vec![result(0, 0, 6, u32::MAX, n)], &body).is_err());
        // A corrupted record.
        let mut bad = raw.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(run(vec![result(0, 0, 6, 1, n)], &Bytes::from(bad))
            .unwrap_err()
            .contains("crc"));
        // Records under a non-success status.
        assert!(run(vec![result(0, response::PULL_NOT_FOUND, 6, 1, n)], &body).is_err());
        // And the good one.
        assert!(run(vec![result(0, 0, 6, 1, n)], &body).is_ok());
    }
}
