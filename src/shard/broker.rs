//! The requests a shard serves: send, pull (with long polling), consumer offsets, queue
//! offsets, heartbeats and the consumer list per group, topic admin. Each shard answers only
//! for the queues it owns and redirects the rest; heartbeats and admin requests are the
//! broker's, whichever shard gets them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use orbitmq_proto::codes::{push, request, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{
    self, ConsumerConnectionResponse, ConsumerListResponse, ConsumerMember, CreateTopicRequest,
    GroupRequest, HeartbeatRequest, HeartbeatSubscriptions, OffsetResponse, PullQueueResult,
    PullRequest, PullResponse, QueueRequest, QueueValueRequest, SendRequest, SendResponse,
    SendResult, SubscriptionData, TopicConfigsResponse, TopicRequest,
};
use orbitmq_proto::limits::{
    MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_GROUP_LEN, MAX_PULL_BYTES, MAX_PULL_MESSAGES,
    MAX_PULL_QUEUES, MAX_PULL_SUSPEND_MS,
};
use orbitmq_proto::msgid::OffsetId;
use orbitmq_proto::record::{self, Message};
use orbitmq_proto::sql::{SqlFilter, EXPR_TYPE_SQL92, EXPR_TYPE_TAG};
use orbitmq_proto::sys;
use tracing::debug;

use crate::log::shape::Shape;
use crate::log::{ReadResult, ReadStatus, Store, StoreError};
use crate::nameserver::routes::topic_data;
use crate::nameserver::topics::{TopicConfig, TopicView, Topics, PERM_READ, PERM_WRITE};
use crate::net::server::{
    error_frame, error_frame_redirect, ok_frame, Handler, HandlerFuture, Peer,
};
use crate::shard::clients::{subscription_conflicts, ClientRegistry};

/// What every shard of a broker shares (read-only after start, or behind its own sync).
pub struct BrokerShared {
    pub shape: Shape,
    /// The broker's data directory (each shard's store is in `shard-<k>` under it).
    pub data_dir: std::path::PathBuf,
    pub topics: Arc<Topics>,
    /// Endpoint of each shard as clients reach it, known once every shard has bound its port.
    pub endpoints: OnceLock<Vec<SocketAddr>>,
    /// Producers and consumers per group, from their heartbeats (every shard gets some).
    pub clients: Mutex<ClientRegistry>,
    /// Orderly consumers' queue locks, broker-wide (any shard answers LOCK_BATCH_MQ).
    pub locks: Mutex<crate::shard::locks::LockTable>,
    /// Delay levels and the timer limit (`messageDelayLevel`, `timerMaxDelaySec`).
    pub schedule: crate::schedule::ScheduleConfig,
    /// `transactionCheckInterval`, `transactionTimeOut`, `transactionCheckMax`.
    pub txn: crate::txn::TxConfig,
    /// `brokerName`, `brokerId`, `brokerRole` and the replication settings.
    pub broker_name: String,
    pub broker_id: u64,
    pub role: crate::config::BrokerRole,
    pub ha: crate::repl::HaConfig,
    /// Replication only for peers with a certificate of the cluster CA (`tlsCaFile` is set).
    pub ha_needs_cert: bool,
    /// `enablePropertyFilter`: SQL92 subscriptions are served.
    pub property_filter: bool,
    /// A slave's master: its shard endpoints, once found (see `crate::repl::sync`).
    pub master: Mutex<Option<Vec<String>>>,
    /// When a slave's copier last had an answer from its master's log (ms since the epoch):
    /// the topic table follows the master only while its log is being copied.
    pub copied_at_ms: std::sync::atomic::AtomicU64,
}

/// Groups one heartbeat may name.
pub const MAX_HEARTBEAT_GROUPS: usize = 1024;
/// Subscriptions one heartbeat may carry per consumer group.
pub const MAX_SUBSCRIPTIONS_PER_GROUP: usize = 1024;
pub use orbitmq_proto::limits::MAX_SUB_EXPR_LEN;
/// Queues whose directories one blocking job makes when a topic is created.
const PREPARE_QUEUES_PER_JOB: usize = 64;

/// One shard's request handler.
pub struct ShardHandler {
    pub shard: u32,
    pub store: Store,
    /// This shard's transactions (half messages waiting for their outcome).
    pub txn: RefCell<crate::txn::TxState>,
    /// Check-back pushes under way.
    pub check_pushes: Rc<std::cell::Cell<usize>>,
    /// A master's slaves: how far each has copied this shard's log.
    pub replicas: RefCell<crate::repl::ReplicaTracker>,
    /// Notified when a slave acknowledges (SYNC_MASTER sends wait on it).
    pub replica_acked: crate::sync::Event,
    pub shared: Arc<BrokerShared>,
    pub view: RefCell<TopicView>,
    /// The connection each client last heartbeat on at this shard, to push it notices
    /// (consumer ids changed). Per shard: a `Peer` belongs to this shard's endpoint.
    pub peers: RefCell<HashMap<String, Peer>>,
    /// The clients that heartbeat on each open connection of this shard (by the
    /// connection's stable id), so its close can tell the registry.
    pub conn_clients: RefCell<HashMap<usize, std::collections::HashSet<String>>>,
}

/// Client ids counted per connection; more heartbeat on one connection leave by expiry only.
pub const MAX_CLIENTS_PER_CONNECTION: usize = 64;

/// Client connections a shard remembers for pushes; heartbeats past it are not remembered
/// (those clients still rebalance on their periodic timer).
pub const MAX_PUSH_PEERS: usize = 100_000;

/// Parsed tag expression: `None` for `*`, else the accepted tag hashes.
pub fn tag_hashes(expr: &str) -> Option<Vec<u64>> {
    let expr = expr.trim();
    if expr.is_empty() || expr == "*" {
        return None;
    }
    Some(
        expr.split("||")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(record::tag_hash)
            .collect(),
    )
}

pub(crate) fn store_error_code(e: &StoreError) -> u16 {
    match e {
        StoreError::BadMessage(_) | StoreError::BadBatch(_) => response::MESSAGE_ILLEGAL,
        StoreError::Fenced(_)
        | StoreError::DiskFull(_)
        | StoreError::Closed
        | StoreError::IndexDisabled => response::SERVICE_NOT_AVAILABLE,
        _ => response::SYSTEM_ERROR,
    }
}

impl ShardHandler {
    pub(crate) fn endpoint_of(&self, shard: u32) -> String {
        self.shared
            .endpoints
            .get()
            .and_then(|e| e.get(shard as usize))
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    pub(crate) fn my_endpoint(&self) -> SocketAddr {
        self.shared
            .endpoints
            .get()
            .and_then(|e| e.get(self.shard as usize).copied())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Checks the topic and queue, and that this shard owns the queue. Err: the response.
    pub(crate) fn check_queue(
        &self,
        id: u64,
        topic: &str,
        queue_id: u32,
        perm: u32,
    ) -> Result<(), Frame> {
        // Messages waiting for their time live there: no client reads or writes them (and a
        // pull must not auto-create them as a topic).
        if orbitmq_proto::sys::is_internal_topic(topic) {
            return Err(error_frame(
                id,
                response::MESSAGE_ILLEGAL,
                format!("topic {topic} is internal to the broker; send with a delay level or delivery time instead"),
            ));
        }
        let t = match self.view.borrow_mut().get(&self.shared.topics, topic) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(error_frame(
                    id,
                    response::TOPIC_NOT_EXIST,
                    format!("topic {topic} does not exist (auto-creation is off)"),
                ))
            }
            Err(
                e @ (crate::nameserver::topics::TopicError::Full(_)
                | crate::nameserver::topics::TopicError::TooMany(_)),
            ) => {
                return Err(error_frame(
                    id,
                    response::TOPIC_NOT_EXIST,
                    format!("topic {topic} does not exist and cannot be created: {e}"),
                ))
            }
            Err(e) => return Err(error_frame(id, response::MESSAGE_ILLEGAL, e.to_string())),
        };
        if t.perm & perm == 0 {
            return Err(error_frame(
                id,
                response::SYSTEM_ERROR,
                format!("topic {topic} forbids this operation"),
            ));
        }
        let n = if perm == PERM_WRITE {
            t.write_queues
        } else {
            t.read_queues
        };
        if queue_id >= n {
            return Err(error_frame(
                id,
                response::MESSAGE_ILLEGAL,
                format!("queue {queue_id} of topic {topic} does not exist (it has {n})"),
            ));
        }
        let owner = self.shared.shape.shard_of(topic, queue_id);
        if owner != self.shard {
            return Err(error_frame_redirect(
                id,
                response::WRONG_SHARD,
                format!("queue {queue_id} of {topic} is served by shard {owner}"),
                self.endpoint_of(owner),
            ));
        }
        Ok(())
    }

    async fn send(&self, req: Frame, peer: &Peer) -> Frame {
        let id = req.request_id;
        let h: SendRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if h.messages.is_empty() || h.messages.len() > MAX_BATCH_MESSAGES {
            return error_frame(
                id,
                response::MESSAGE_ILLEGAL,
                format!(
                    "a send carries 1..={MAX_BATCH_MESSAGES} messages, not {}",
                    h.messages.len()
                ),
            );
        }
        if h.producer_group.len() > MAX_GROUP_LEN {
            return error_frame(
                id,
                response::MESSAGE_ILLEGAL,
                "producer group name too long",
            );
        }
        let total: u64 = h.messages.iter().map(|m| m.body_len as u64).sum();
        if total != req.body.len() as u64 {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "bodies say {total} bytes, the frame carries {}",
                    req.body.len()
                ),
            );
        }
        if h.messages.len() > 1 && total as usize > MAX_BATCH_BYTES {
            return error_frame(
                id,
                response::MESSAGE_ILLEGAL,
                format!("batch of {total} bytes is over the limit of {MAX_BATCH_BYTES}"),
            );
        }
        // Before the topic check, which may auto-create the topic.
        for m in &h.messages {
            if let Err(e) = sys::check_sent_properties(&m.properties) {
                return error_frame(id, response::MESSAGE_ILLEGAL, e.to_string());
            }
        }
        if let Some(f) = self.refuse_on_slave(id) {
            return f;
        }
        if let Err(f) = self.check_queue(id, &h.topic, h.queue_id, PERM_WRITE) {
            return f;
        }
        let mut at = 0usize;
        let mut msgs: Vec<Message> = h
            .messages
            .into_iter()
            .map(|m| {
                let body = req.body.slice(at..at + m.body_len as usize);
                at += m.body_len as usize;
                Message {
                    topic: h.topic.clone(),
                    queue_id: h.queue_id,
                    flag: m.flag,
                    sys_flag: m.sys_flag,
                    born_timestamp: m.born_timestamp,
                    born_host: Some(peer.remote),
                    reconsume_times: 0,
                    prepared_tx_offset: 0,
                    tags: m.tags,
                    keys: m.keys,
                    properties: m.properties,
                    body,
                }
            })
            .collect();
        if msgs.iter().any(|m| crate::txn::is_half(&m.properties)) {
            return self
                .send_half(id, msgs, &h.producer_group, h.queue_id)
                .await;
        }
        match self.divert_delayed(&mut msgs) {
            // A batch is one append to one queue: all or nothing (RocketMQ refuses delays in
            // batches too).
            Ok(true) if msgs.len() > 1 => {
                return error_frame(
                    id,
                    response::MESSAGE_ILLEGAL,
                    "a batch cannot carry delay levels or delivery times: send those one by one",
                )
            }
            Ok(_) => {}
            Err(e) => return error_frame(id, response::MESSAGE_ILLEGAL, e.to_string()),
        }
        match self.store.append_batch(&msgs).await {
            Ok(results) => {
                // Every id of this response shares its broker/port/shard half: encode that
                // once and only the CommitLog offset per message (one allocation each).
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                const OFFSET_HEX_DIGITS: usize = 16;
                let prefix = OffsetId::new(self.my_endpoint(), self.shard as u16, 0).encode();
                let prefix = &prefix[..prefix.len() - OFFSET_HEX_DIGITS];
                let msg_id = |offset: u64| {
                    let mut id = String::with_capacity(prefix.len() + OFFSET_HEX_DIGITS);
                    id.push_str(prefix);
                    for i in (0..OFFSET_HEX_DIGITS).rev() {
                        id.push(HEX[((offset >> (4 * i)) & 0xF) as usize] as char);
                    }
                    id
                };
                let resp = SendResponse {
                    queue_id: h.queue_id,
                    results: results
                        .iter()
                        .map(|r| {
                            let id = msg_id(r.physical_offset);
                            debug_assert_eq!(
                                id,
                                OffsetId::new(
                                    self.my_endpoint(),
                                    self.shard as u16,
                                    r.physical_offset
                                )
                                .encode()
                            );
                            SendResult {
                                msg_id: id,
                                queue_offset: r.queue_offset,
                            }
                        })
                        .collect(),
                };
                let last = results.last().expect("one result per message");
                self.answer_stored(id, &resp, last.physical_offset + u64::from(last.size))
                    .await
            }
            Err(e) => error_frame(id, store_error_code(&e), e.to_string()),
        }
    }

    /// A half message of a transaction: stored in this shard's half queue, not delayed (a
    /// delay applies when it is committed). A batch cannot be transactional (as RocketMQ).
    async fn send_half(
        &self,
        id: u64,
        mut msgs: Vec<Message>,
        group: &str,
        queue_id: u32,
    ) -> Frame {
        if msgs.len() != 1 {
            return error_frame(
                id,
                response::MESSAGE_ILLEGAL,
                "a batch cannot be transactional: send half messages one by one",
            );
        }
        let m = msgs.pop().expect("one message");
        match self.append_half(m, group).await {
            Ok(r) => {
                let resp = SendResponse {
                    queue_id,
                    results: vec![SendResult {
                        msg_id: OffsetId::new(
                            self.my_endpoint(),
                            self.shard as u16,
                            r.physical_offset,
                        )
                        .encode(),
                        queue_offset: r.queue_offset,
                    }],
                };
                self.answer_stored(id, &resp, r.physical_offset + u64::from(r.size))
                    .await
            }
            Err((code, why)) => error_frame(id, code, why),
        }
    }

    async fn pull(&self, req: Frame) -> Frame {
        let id = req.request_id;
        let h: PullRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if h.queues.is_empty() || h.queues.len() > MAX_PULL_QUEUES {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!("a pull covers 1..={MAX_PULL_QUEUES} queues"),
            );
        }
        let max_bytes = (h.max_bytes as usize).clamp(1, MAX_PULL_BYTES);
        let deadline =
            Instant::now() + Duration::from_millis(h.suspend_ms.min(MAX_PULL_SUSPEND_MS) as u64);
        struct Q {
            topic: String,
            queue_id: u32,
            offset: u64,
            max_msgs: usize,
            tags: Option<Vec<u64>>,
            sql: Option<SqlFilter>,
            result: Option<PullQueueResult>,
        }
        if let Some(q) = h
            .queues
            .iter()
            .find(|q| q.sub_expr.len() > MAX_SUB_EXPR_LEN)
        {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "subscription expression of {} bytes for {} is over the limit of {MAX_SUB_EXPR_LEN}",
                    q.sub_expr.len(),
                    q.topic
                ),
            );
        }
        let mut seen = HashSet::with_capacity(h.queues.len());
        if let Some(q) = h
            .queues
            .iter()
            .find(|q| !seen.insert((q.topic.as_str(), q.queue_id)))
        {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!("queue {} {} named twice in one pull", q.topic, q.queue_id),
            );
        }
        let mut qs: Vec<Q> = Vec::with_capacity(h.queues.len());
        for q in h.queues {
            let (sql, refused) = match q.expr_type {
                EXPR_TYPE_TAG => (None, None),
                EXPR_TYPE_SQL92 if !self.shared.property_filter => (
                    None,
                    Some(
                        "this broker does not filter by SQL92 (enablePropertyFilter = false)"
                            .to_string(),
                    ),
                ),
                EXPR_TYPE_SQL92 => match SqlFilter::parse(&q.sub_expr) {
                    Ok(f) => (Some(f), None),
                    Err(e) => (None, Some(e.to_string())),
                },
                other => {
                    return error_frame(
                        id,
                        response::BAD_REQUEST,
                        format!("unknown expression type {other} for {}", q.topic),
                    )
                }
            };
            let refusal = |status: u16, reason: String, redirect: String| PullQueueResult {
                topic: q.topic.clone(),
                queue_id: q.queue_id,
                status,
                next_offset: q.offset,
                min_offset: 0,
                max_offset: 0,
                count: 0,
                bytes: 0,
                redirect,
                reason,
            };
            // A refused queue answers for itself: the pull's other queues are served.
            let result = if let Some(reason) = refused {
                Some(refusal(
                    response::SUBSCRIPTION_PARSE_FAILED,
                    reason,
                    String::new(),
                ))
            } else if let Err(f) = self.check_queue(id, &q.topic, q.queue_id, PERM_READ) {
                let (message, redirect) = header::decode::<header::ErrorResponse>(&f.header)
                    .map(|e| (e.message, e.redirect))
                    .unwrap_or_default();
                Some(refusal(f.code, message, redirect))
            } else {
                None
            };
            qs.push(Q {
                tags: if sql.is_some() {
                    None
                } else {
                    tag_hashes(&q.sub_expr)
                },
                sql,
                max_msgs: q.max_msgs.clamp(1, MAX_PULL_MESSAGES) as usize,
                topic: q.topic,
                queue_id: q.queue_id,
                offset: q.offset,
                result,
            });
        }
        loop {
            // Take the wake-up before looking, so an append in between is not missed.
            let dispatched = self.store.dispatched();
            let mut body = BytesMut::new();
            let mut found = false;
            let mut more = false;
            let mut budget = max_bytes;
            for q in qs.iter_mut().filter(|q| {
                q.result
                    .as_ref()
                    .is_none_or(|r| r.status == response::PULL_NOT_FOUND)
            }) {
                // The answer is full: the queues after are not read (nothing new for them
                // this time, from the same offset). A read returns its first record whatever
                // the budget, so the body stays under the budget plus one record.
                let read = if budget == 0 {
                    let (min_offset, max_offset) = self
                        .store
                        .queue_bounds(&q.topic, q.queue_id)
                        .unwrap_or((0, 0));
                    Ok(ReadResult {
                        status: ReadStatus::NoNewMessage,
                        records: Vec::new(),
                        next_offset: q.offset,
                        min_offset,
                        max_offset,
                    })
                } else {
                    self.store
                        .read(
                            &q.topic,
                            q.queue_id,
                            q.offset,
                            q.max_msgs,
                            budget,
                            q.tags.as_deref(),
                        )
                        .await
                };
                let mut r = match read {
                    Ok(r) => r,
                    Err(e) => return error_frame(id, store_error_code(&e), e.to_string()),
                };
                // An SQL92 filter reads the records' properties: those that do not match are
                // passed over as a tag miss is (the offset moves on past them).
                if let (Some(f), ReadStatus::Found) = (&q.sql, r.status) {
                    r.records
                        .retain(|b| record::decode(b).is_ok_and(|v| f.matches_record(&v)));
                    if r.records.is_empty() {
                        r.status = ReadStatus::NoNewMessage;
                    }
                }
                let status = match r.status {
                    ReadStatus::Found => response::SUCCESS,
                    ReadStatus::NoNewMessage => response::PULL_NOT_FOUND,
                    // An empty queue: offset 0 waits for the first message, others move to 0.
                    ReadStatus::NoSuchQueue if q.offset == 0 => response::PULL_NOT_FOUND,
                    ReadStatus::NoSuchQueue
                    | ReadStatus::OffsetTooSmall
                    | ReadStatus::OffsetOverflow => response::PULL_OFFSET_MOVED,
                };
                // A tag miss still moves the offset on: keep it, and park again from there.
                if status == response::PULL_NOT_FOUND {
                    q.offset = r.next_offset.max(q.offset);
                }
                let bytes: usize = r.records.iter().map(|b| b.len()).sum();
                for b in &r.records {
                    body.extend_from_slice(b);
                }
                budget = budget.saturating_sub(bytes);
                found |= status != response::PULL_NOT_FOUND;
                q.result = Some(PullQueueResult {
                    topic: q.topic.clone(),
                    queue_id: q.queue_id,
                    status,
                    next_offset: r.next_offset,
                    min_offset: r.min_offset,
                    max_offset: r.max_offset,
                    count: r.records.len() as u32,
                    bytes: bytes as u32,
                    redirect: String::new(),
                    reason: String::new(),
                });
                // A read that skipped only filtered-out entries has more to look at now.
                more |= status == response::PULL_NOT_FOUND && r.next_offset < r.max_offset;
            }
            let errors = qs.iter().any(|q| {
                q.result.as_ref().is_some_and(|r| {
                    r.status != response::PULL_NOT_FOUND && r.status != response::SUCCESS
                })
            });
            let now = Instant::now();
            if found || errors || now >= deadline {
                let resp = PullResponse {
                    queues: qs
                        .into_iter()
                        .map(|q| {
                            let mut r = q.result.expect("every queue was looked at");
                            if r.status == response::PULL_NOT_FOUND {
                                r.next_offset = q.offset;
                            }
                            r
                        })
                        .collect(),
                };
                return ok_frame(id, header::encode(&resp), body.freeze());
            }
            if !more {
                // Park until an append is dispatched or the remaining timeout runs out.
                let remaining = deadline - now;
                futures_lite::future::or(dispatched, glommio::timer::sleep(remaining)).await;
            } else {
                // Reading on past filtered-out records (an SQL92 filter reads each one): let
                // the shard's other work run in between.
                glommio::yield_if_needed().await;
            }
            for q in qs.iter_mut() {
                if q.result
                    .as_ref()
                    .is_some_and(|r| r.status == response::PULL_NOT_FOUND)
                {
                    q.result = None;
                }
            }
        }
    }

    fn queue_request(&self, req: &Frame) -> Result<QueueRequest, Frame> {
        header::decode::<QueueRequest>(&req.header)
            .map_err(|e| error_frame(req.request_id, response::BAD_REQUEST, e.to_string()))
    }

    fn queue_value_request(&self, req: &Frame) -> Result<QueueValueRequest, Frame> {
        header::decode::<QueueValueRequest>(&req.header)
            .map_err(|e| error_frame(req.request_id, response::BAD_REQUEST, e.to_string()))
    }

    fn offset_frame(id: u64, offset: u64) -> Frame {
        ok_frame(id, header::encode(&OffsetResponse { offset }), Bytes::new())
    }

    async fn dispatch(&self, req: Frame, peer: &Peer) -> Frame {
        let id = req.request_id;
        match req.code {
            request::SEND_MESSAGE => self.send(req, peer).await,
            request::PULL_MESSAGE => self.pull(req).await,
            request::QUERY_MESSAGE => self.query_message(&req).await,
            request::VIEW_MESSAGE_BY_ID => self.view_message(&req).await,
            request::QUERY_CONSUMER_OFFSET => {
                let h = match self.queue_request(&req) {
                    Ok(h) => h,
                    Err(f) => return f,
                };
                if let Err(f) = self.check_queue(id, &h.topic, h.queue_id, PERM_READ) {
                    return f;
                }
                match self.store.query_offset(&h.group, &h.topic, h.queue_id) {
                    Some(o) => Self::offset_frame(id, o),
                    None => error_frame(id, response::QUERY_NOT_FOUND, "no committed offset"),
                }
            }
            request::UPDATE_CONSUMER_OFFSET => {
                let h = match self.queue_value_request(&req) {
                    Ok(h) => h,
                    Err(f) => return f,
                };
                if let Err(f) = self.check_queue(id, &h.topic, h.queue_id, PERM_READ) {
                    return f;
                }
                match self
                    .store
                    .commit_offset(&h.group, &h.topic, h.queue_id, h.value)
                {
                    Ok(()) => Self::offset_frame(id, h.value),
                    Err(e) => error_frame(id, response::BAD_REQUEST, e.to_string()),
                }
            }
            request::GET_MIN_OFFSET | request::GET_MAX_OFFSET => {
                let h = match self.queue_request(&req) {
                    Ok(h) => h,
                    Err(f) => return f,
                };
                if let Err(f) = self.check_queue(id, &h.topic, h.queue_id, PERM_READ) {
                    return f;
                }
                let (min, max) = self
                    .store
                    .queue_bounds(&h.topic, h.queue_id)
                    .unwrap_or((0, 0));
                Self::offset_frame(
                    id,
                    if req.code == request::GET_MIN_OFFSET {
                        min
                    } else {
                        max
                    },
                )
            }
            request::SEARCH_OFFSET_BY_TIMESTAMP => {
                let h = match self.queue_value_request(&req) {
                    Ok(h) => h,
                    Err(f) => return f,
                };
                if let Err(f) = self.check_queue(id, &h.topic, h.queue_id, PERM_READ) {
                    return f;
                }
                match self
                    .store
                    .offset_by_time(&h.topic, h.queue_id, h.value)
                    .await
                {
                    Ok(o) => Self::offset_frame(id, o),
                    Err(e) => error_frame(id, store_error_code(&e), e.to_string()),
                }
            }
            request::HEART_BEAT | request::UNREGISTER_CLIENT => self.heartbeat(&req, peer),
            request::CONSUMER_SEND_MSG_BACK
            | request::END_TRANSACTION
            | request::UPDATE_AND_CREATE_TOPIC
            | request::DELETE_TOPIC_IN_BROKER
            | request::LOCK_BATCH_MQ
                if self.shared.role == crate::config::BrokerRole::Slave =>
            {
                self.refuse_on_slave(id).expect("a slave refuses")
            }
            request::CONSUMER_SEND_MSG_BACK => self.send_back(&req).await,
            request::END_TRANSACTION => self.end_transaction(&req).await,
            request::HA_INFO => self.ha_info(id),
            request::HA_STATUS => self.ha_status(id),
            request::HA_PULL | request::HA_OFFSETS if !self.may_replicate(peer) => error_frame(
                id,
                response::NO_PERMISSION,
                "replication is served to the cluster's brokers only: the slave needs tlsCertFile and tlsKeyFile with a certificate of the cluster CA (orbitmq cert issue)",
            ),
            request::HA_PULL => self.ha_pull(&req).await,
            request::HA_OFFSETS => self.ha_offsets(&req).await,
            request::LOCK_BATCH_MQ => self.lock_batch(&req, false),
            request::UNLOCK_BATCH_MQ => self.lock_batch(&req, true),
            request::INVOKE_BROKER_TO_RESET_OFFSET => self.reset_offset(&req),
            request::GET_CONSUMER_CONNECTION_LIST => {
                let h: GroupRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
                };
                let members = self
                    .shared
                    .clients
                    .lock()
                    .expect("clients lock")
                    .members(&h.group, Instant::now());
                let conflicts = subscription_conflicts(&members);
                let members = members
                    .into_iter()
                    .map(|(client_id, subs)| ConsumerMember {
                        client_id,
                        subscriptions: subs
                            .into_iter()
                            .map(|(topic, expr_type, expr)| SubscriptionData {
                                topic,
                                expr,
                                expr_type,
                            })
                            .collect(),
                    })
                    .collect();
                ok_frame(
                    id,
                    header::encode(&ConsumerConnectionResponse { members, conflicts }),
                    Bytes::new(),
                )
            }
            request::GET_CONSUMER_LIST_BY_GROUP => {
                let h: GroupRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
                };
                let client_ids = self
                    .shared
                    .clients
                    .lock()
                    .expect("clients lock")
                    .consumers(&h.group, Instant::now());
                ok_frame(
                    id,
                    header::encode(&ConsumerListResponse { client_ids }),
                    Bytes::new(),
                )
            }
            request::UPDATE_AND_CREATE_TOPIC => {
                let h: CreateTopicRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
                };
                if sys::is_internal_topic(&h.topic) {
                    return error_frame(
                        id,
                        response::MESSAGE_ILLEGAL,
                        format!(
                            "topic {} is internal to the broker and cannot be created",
                            h.topic
                        ),
                    );
                }
                match self.shared.topics.create_or_update(
                    &h.topic,
                    h.read_queues,
                    h.write_queues,
                    h.perm,
                ) {
                    Ok(t) => {
                        self.prepare_queue_files(&t).await;
                        tracing::info!(topic = %t.name, read = t.read_queues, write = t.write_queues,
                            perm = t.perm, remote = %peer.remote, "topic created or updated");
                        ok_frame(
                            id,
                            header::encode(&TopicConfigsResponse {
                                topics: vec![topic_data(&t)],
                            }),
                            Bytes::new(),
                        )
                    }
                    Err(e) => error_frame(id, response::MESSAGE_ILLEGAL, e.to_string()),
                }
            }
            request::DELETE_TOPIC_IN_BROKER => {
                let h: TopicRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
                };
                match self.shared.topics.delete(&h.topic) {
                    Ok(true) => {
                        tracing::info!(topic = %h.topic, remote = %peer.remote, "topic deleted");
                        ok_frame(id, Bytes::new(), Bytes::new())
                    }
                    Ok(false) => error_frame(
                        id,
                        response::TOPIC_NOT_EXIST,
                        format!("topic {} does not exist on this broker", h.topic),
                    ),
                    Err(e) => error_frame(id, response::SYSTEM_ERROR, e.to_string()),
                }
            }
            request::GET_ALL_TOPIC_CONFIG => {
                let topics = self
                    .shared
                    .topics
                    .snapshot()
                    .values()
                    .map(topic_data)
                    .collect();
                ok_frame(
                    id,
                    header::encode(&TopicConfigsResponse { topics }),
                    Bytes::new(),
                )
            }
            other => error_frame(
                id,
                response::REQUEST_CODE_NOT_SUPPORTED,
                format!("request code {other} is not supported by a broker"),
            ),
        }
    }
}

impl ShardHandler {
    /// Makes the ConsumeQueue directories and first files of a created topic's new queues in
    /// their shards' stores, off this shard's thread, so that the first sends do not wait for
    /// inode creation. A failure is only logged: the stores make what is missing when they
    /// first persist the queue, and report errors there.
    async fn prepare_queue_files(&self, t: &TopicConfig) {
        let queues: Vec<(std::path::PathBuf, u32)> = (0..t.read_queues.max(t.write_queues))
            .map(|q| {
                let owner = self.shared.shape.shard_of(&t.name, q);
                (crate::shard::shard_dir(&self.shared.data_dir, owner), q)
            })
            .collect();
        let mut made = 0;
        // In parts, so that a topic of many queues does not hold a blocking thread (the
        // shard's checkpoint and offsets writes wait for one) for long.
        for part in queues.chunks(PREPARE_QUEUES_PER_JOB) {
            let (topic, part) = (t.name.clone(), part.to_vec());
            made += crate::log::fsutil::off_shard(move || {
                let mut made = 0;
                for (dir, q) in part {
                    match crate::log::prepare_queue_files(&dir, &topic, q) {
                        Ok(new) => made += usize::from(new),
                        Err(e) => tracing::warn!(%topic, queue = q, error = %e,
                            "cannot make the queue's ConsumeQueue directory now; its first persist will"),
                    }
                }
                made
            })
            .await;
        }
        debug!(topic = %t.name, made, "queue directories prepared");
    }

    /// HEART_BEAT records the client in its groups; UNREGISTER_CLIENT removes it.
    fn heartbeat(&self, req: &Frame, peer: &Peer) -> Frame {
        let id = req.request_id;
        let h: HeartbeatRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        let groups = h.producer_groups.iter().chain(&h.consumer_groups);
        if h.client_id.is_empty()
            || h.client_id.len() > MAX_GROUP_LEN
            || h.producer_groups.len() + h.consumer_groups.len() > MAX_HEARTBEAT_GROUPS
            || groups
                .clone()
                .any(|g| g.is_empty() || g.len() > MAX_GROUP_LEN)
        {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "a heartbeat names a client id and at most {MAX_HEARTBEAT_GROUPS} groups of 1..={MAX_GROUP_LEN} bytes"
                ),
            );
        }
        // The body (optional) carries the consumers' subscriptions.
        let subs: HeartbeatSubscriptions = if req.body.is_empty() {
            HeartbeatSubscriptions::default()
        } else {
            match header::decode(&req.body) {
                Ok(s) => s,
                Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
            }
        };
        if subs.groups.len() > MAX_HEARTBEAT_GROUPS
            || subs.groups.iter().any(|g| {
                g.subscriptions.len() > MAX_SUBSCRIPTIONS_PER_GROUP
                    || g.subscriptions.iter().any(|s| {
                        s.topic.len() > MAX_GROUP_LEN
                            || s.expr.len() > MAX_SUB_EXPR_LEN
                            || !matches!(s.expr_type, EXPR_TYPE_TAG | EXPR_TYPE_SQL92)
                    })
            })
        {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "a heartbeat carries at most {MAX_SUBSCRIPTIONS_PER_GROUP} subscriptions a group, expressions of at most {MAX_SUB_EXPR_LEN} bytes, of type tags (0) or SQL92 (1)"
                ),
            );
        }
        if req.code == request::HEART_BEAT {
            // The retry topic of each consumer group that subscribes to something, so its
            // members can subscribe to it (a bare group name makes no topic).
            let subscribing: Vec<String> = subs
                .groups
                .iter()
                .filter(|g| !g.subscriptions.is_empty() && h.consumer_groups.contains(&g.group))
                .map(|g| g.group.clone())
                .collect();
            // A slave's topics are its master's.
            if self.shared.role != crate::config::BrokerRole::Slave {
                self.ensure_retry_topics(&subscribing);
            }
        }
        let now = Instant::now();
        let (changed, members) = {
            let mut clients = self.shared.clients.lock().expect("clients lock");
            let changed = if req.code == request::UNREGISTER_CLIENT {
                debug!(client = h.client_id, remote = %peer.remote, "client unregistered");
                clients.unregister(&h.client_id)
            } else {
                let c =
                    clients.heartbeat(&h.client_id, &h.producer_groups, &h.consumer_groups, now);
                for g in subs.groups {
                    let list = g
                        .subscriptions
                        .into_iter()
                        .map(|s| (s.topic, s.expr_type, s.expr))
                        .collect();
                    clients.set_subscriptions(&h.client_id, &g.group, list);
                }
                c
            };
            let members: Vec<(String, Vec<String>)> = changed
                .iter()
                .map(|g| (g.clone(), clients.consumers(g, now)))
                .collect();
            (changed, members)
        };
        if req.code == request::HEART_BEAT {
            let mut conns = self.conn_clients.borrow_mut();
            let on_conn = conns.entry(peer.conn.stable_id()).or_default();
            if !on_conn.contains(&h.client_id) && on_conn.len() < MAX_CLIENTS_PER_CONNECTION {
                on_conn.insert(h.client_id.clone());
                self.shared
                    .clients
                    .lock()
                    .expect("clients lock")
                    .connection_opened(&h.client_id);
            }
        }
        {
            let mut peers = self.peers.borrow_mut();
            if req.code == request::UNREGISTER_CLIENT {
                peers.remove(&h.client_id);
            } else if peers.len() < MAX_PUSH_PEERS || peers.contains_key(&h.client_id) {
                peers.insert(h.client_id.clone(), peer.clone());
            }
        }
        if !changed.is_empty() {
            tracing::info!(client = h.client_id, groups = ?changed, remote = %peer.remote,
                unregister = req.code == request::UNREGISTER_CLIENT, "consumer group membership changed");
            self.notify_consumer_ids_changed(members);
        }
        ok_frame(id, Bytes::new(), Bytes::new())
    }

    /// Pushes NOTIFY_CONSUMER_IDS_CHANGED (the group name) to each member of the changed
    /// groups that heartbeat on this shard, so they rebalance at once instead of at their
    /// next periodic rebalance. Best effort: a member not reached rebalances on its timer.
    fn notify_consumer_ids_changed(&self, members: Vec<(String, Vec<String>)>) {
        let peers = self.peers.borrow();
        for (group, ids) in members {
            for id in ids {
                let Some(p) = peers.get(&id).cloned() else {
                    continue;
                };
                let group = group.clone();
                glommio::spawn_local(async move {
                    if let Err(e) = p.push(push::NOTIFY_CONSUMER_IDS_CHANGED, &group).await {
                        debug!(client = id, error = %e, "consumer ids changed notice not sent");
                    }
                })
                .detach();
            }
        }
    }
}

impl ShardHandler {
    /// Sends delayed messages (delay level or delivery time) to wait in the schedule or
    /// timer topic of this shard; the others are left as they are. True if any was.
    pub(crate) fn divert_delayed(
        &self,
        msgs: &mut [Message],
    ) -> Result<bool, crate::schedule::ScheduleError> {
        let now = orbitmq_proto::now_ms();
        let mut any = false;
        for m in msgs.iter_mut() {
            any |= crate::schedule::divert(m, &self.shared.schedule, now)?
                != crate::schedule::Diverted::No;
        }
        Ok(any)
    }
}

impl Handler for ShardHandler {
    fn handle(self: Rc<Self>, req: Frame, peer: &Peer) -> HandlerFuture {
        let peer = peer.clone();
        Box::pin(async move { self.dispatch(req, &peer).await })
    }

    /// A client whose last connection to this broker closed (a killed process, once QUIC's
    /// idle timeout passes) leaves its groups now rather than at `channelExpiredTimeout`.
    fn connection_closed(self: Rc<Self>, peer: &Peer) {
        let id = peer.conn.stable_id();
        let Some(clients) = self.conn_clients.borrow_mut().remove(&id) else {
            return;
        };
        self.peers
            .borrow_mut()
            .retain(|_, p| p.conn.stable_id() != id);
        let now = Instant::now();
        let (changed, members) = {
            let mut reg = self.shared.clients.lock().expect("clients lock");
            let mut changed = std::collections::BTreeSet::new();
            for c in &clients {
                changed.extend(reg.connection_closed(c));
            }
            let members: Vec<(String, Vec<String>)> = changed
                .iter()
                .map(|g| (g.clone(), reg.consumers(g, now)))
                .collect();
            (changed, members)
        };
        if !changed.is_empty() {
            tracing::info!(clients = ?clients, groups = ?changed, remote = %peer.remote,
                "clients left with their last connection");
            self.notify_consumer_ids_changed(members);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_expressions() {
        assert_eq!(tag_hashes("*"), None);
        assert_eq!(tag_hashes(""), None);
        assert_eq!(tag_hashes("A"), Some(vec![record::tag_hash("A")]));
        assert_eq!(
            tag_hashes(" A || B "),
            Some(vec![record::tag_hash("A"), record::tag_hash("B")])
        );
    }
}
