//! Frame headers: rkyv archives, always validated (bytecheck) when they come off the network.

use bytes::Bytes;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use thiserror::Error;

/// ALPN of the orbitmq protocol, version 2 (pulls and heartbeats name their expression type).
pub const ALPN: &[u8] = b"orbitmq/2";

#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("invalid frame header: {0}")]
pub struct HeaderError(pub String);

/// Serializes a header.
pub fn encode<T>(h: &T) -> Bytes
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    Bytes::from(
        rkyv::to_bytes::<rancor::Error>(h)
            .expect("serializing into memory cannot fail")
            .into_vec(),
    )
}

/// Validates and deserializes a header from untrusted bytes. The bytes are copied into an
/// aligned buffer first: rkyv checks alignment, and frame headers sit at any offset.
pub fn decode<T>(b: &[u8]) -> Result<T, HeaderError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + Deserialize<T, rkyv::rancor::Strategy<rkyv::de::Pool, rancor::Error>>,
{
    let mut aligned = AlignedVec::<16>::with_capacity(b.len());
    aligned.extend_from_slice(b);
    rkyv::from_bytes::<T, rancor::Error>(&aligned).map_err(|e| HeaderError(e.to_string()))
}

/// One message of a send: everything but the body, which follows in the frame body.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct MessageMeta {
    pub flag: u32,
    pub sys_flag: u32,
    pub born_timestamp: u64,
    pub tags: String,
    pub keys: String,
    pub properties: Vec<(String, String)>,
    pub body_len: u32,
}

/// SEND_MESSAGE: one message or a batch to one queue; bodies concatenated in the frame body.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SendRequest {
    pub producer_group: String,
    pub topic: String,
    pub queue_id: u32,
    pub messages: Vec<MessageMeta>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SendResult {
    /// Offset message id (see [`crate::msgid`]).
    pub msg_id: String,
    pub queue_offset: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SendResponse {
    pub queue_id: u32,
    pub results: Vec<SendResult>,
}

/// One queue of a pull.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PullQueue {
    pub topic: String,
    pub queue_id: u32,
    pub offset: u64,
    pub max_msgs: u32,
    /// Tag expression (`*`, `TagA`, `TagA || TagB`) or SQL92 filter, by `expr_type`.
    pub sub_expr: String,
    /// `sql::EXPR_TYPE_TAG` or `sql::EXPR_TYPE_SQL92`.
    pub expr_type: u8,
}

/// PULL_MESSAGE: one or more queues of one shard; parks up to `suspend_ms` when none has
/// messages, and returns as soon as one has.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PullRequest {
    pub group: String,
    pub queues: Vec<PullQueue>,
    pub max_bytes: u32,
    pub suspend_ms: u32,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PullQueueResult {
    pub topic: String,
    pub queue_id: u32,
    /// A response code: SUCCESS (records follow), PULL_NOT_FOUND, PULL_OFFSET_MOVED,
    /// WRONG_SHARD, TOPIC_NOT_EXIST.
    pub status: u16,
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
    /// Records of this queue in the body, and their bytes, in request order.
    pub count: u32,
    pub bytes: u32,
    /// For WRONG_SHARD: the endpoint of the shard that owns the queue.
    pub redirect: String,
    /// Why, for a status other than SUCCESS and PULL_NOT_FOUND (may be empty).
    pub reason: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PullResponse {
    pub queues: Vec<PullQueueResult>,
}

/// QUERY_CONSUMER_OFFSET, GET_MIN_OFFSET, GET_MAX_OFFSET (group empty for the last two).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueRequest {
    pub group: String,
    pub topic: String,
    pub queue_id: u32,
}

/// UPDATE_CONSUMER_OFFSET, SEARCH_OFFSET_BY_TIMESTAMP (`value` is the offset or the time).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueValueRequest {
    pub group: String,
    pub topic: String,
    pub queue_id: u32,
    pub value: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct OffsetResponse {
    pub offset: u64,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub client_id: String,
    pub producer_groups: Vec<String>,
    pub consumer_groups: Vec<String>,
}

/// One subscription of a consumer: a topic and its tag expression.
#[derive(
    Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default,
)]
pub struct SubscriptionData {
    pub topic: String,
    pub expr: String,
    /// `sql::EXPR_TYPE_TAG` or `sql::EXPR_TYPE_SQL92`.
    pub expr_type: u8,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupSubscriptions {
    pub group: String,
    pub subscriptions: Vec<SubscriptionData>,
}

/// The body of a HEART_BEAT (the header stays [`HeartbeatRequest`], unchanged): the
/// subscriptions of each consumer group of the client. An empty body (older clients, or
/// no subscriptions) records none.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HeartbeatSubscriptions {
    pub groups: Vec<GroupSubscriptions>,
}

/// One live member of a consumer group and what it subscribed to.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConsumerMember {
    pub client_id: String,
    pub subscriptions: Vec<SubscriptionData>,
}

/// GET_CONSUMER_CONNECTION_LIST (request: [`GroupRequest`]): the members, sorted, and the
/// subscription conflicts the broker sees (empty when all members agree).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConsumerConnectionResponse {
    pub members: Vec<ConsumerMember>,
    pub conflicts: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RouteRequest {
    pub topic: String,
}

/// Where one queue lives: its broker and the shard endpoint that owns it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueRoute {
    pub broker_name: String,
    pub queue_id: u32,
    pub shard: u32,
    /// `host:port` of the owning shard's QUIC endpoint.
    pub endpoint: String,
    /// RocketMQ permissions: 2 write, 4 read.
    pub perm: u32,
}

/// One broker (all its ids) of a route or of the cluster info.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct BrokerRoute {
    pub cluster: String,
    pub broker_name: String,
    /// Broker id (0 = master) -> `host:port` of that broker's shard 0 endpoint.
    pub addrs: Vec<(u64, String)>,
    /// `host:port` of every shard endpoint of the master, by shard index.
    pub shard_endpoints: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RouteResponse {
    pub topic: String,
    pub queues: Vec<QueueRoute>,
    /// The brokers the queues are on (empty from servers that predate clusters).
    pub brokers: Vec<BrokerRoute>,
}

/// A topic's config as a broker holds it (RocketMQ's TopicConfig).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TopicConfigData {
    pub name: String,
    pub read_queues: u32,
    pub write_queues: u32,
    /// RocketMQ permissions: 2 write, 4 read.
    pub perm: u32,
    /// Created by a first send (autoCreateTopicEnable), not by an admin.
    pub auto_created: bool,
}

/// REGISTER_BROKER: a broker tells a name server who it is, where its shards listen and
/// which topics it has. Sent on start, every `registerNameServerPeriod`, and at once after a
/// topic change.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RegisterBrokerRequest {
    pub cluster: String,
    pub broker_name: String,
    pub broker_id: u64,
    /// `host:port` of every shard endpoint, by shard index (shard 0 is the broker address).
    pub shard_endpoints: Vec<String>,
    /// How queues map to shards (the data directory's `queue_map`).
    pub queue_map: String,
    pub topics: Vec<TopicConfigData>,
    /// `autoCreateTopicEnable`: the name server may route unknown topics to this broker.
    pub auto_create_topic: bool,
    /// `defaultTopicQueueNums`: queues of an auto-created topic.
    pub default_topic_queue_nums: u32,
}

/// UNREGISTER_BROKER: a broker shutting down cleanly.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct UnregisterBrokerRequest {
    pub cluster: String,
    pub broker_name: String,
    pub broker_id: u64,
    /// The shard 0 endpoint it registered with (a stale unregister must not remove a newer
    /// registration of the same broker at another address).
    pub addr: String,
}

/// One broker of GET_BROKER_CLUSTER_INFO.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct BrokerStatus {
    pub broker: BrokerRoute,
    /// Milliseconds since the master's last registration.
    pub last_seen_ms: u64,
    pub topics: u32,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClusterInfoResponse {
    /// Cluster name -> its brokers.
    pub clusters: Vec<(String, Vec<BrokerStatus>)>,
}

/// GET_TOPICS_BY_CLUSTER (and GET_ALL_TOPIC_LIST_FROM_NAMESERVER with an empty cluster).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClusterRequest {
    pub cluster: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TopicListResponse {
    pub topics: Vec<String>,
}

/// PUT_KV_CONFIG, GET_KV_CONFIG, DELETE_KV_CONFIG (`value` only for a put).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct KvConfigRequest {
    pub namespace: String,
    pub key: String,
    pub value: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct KvConfigResponse {
    pub value: String,
}

/// UPDATE_AND_CREATE_TOPIC to a broker. A queue count of 0 keeps the current one (or takes
/// `defaultTopicQueueNums` for a new topic); a perm of 0 keeps the current one (or 6).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct CreateTopicRequest {
    pub topic: String,
    pub read_queues: u32,
    pub write_queues: u32,
    pub perm: u32,
}

/// DELETE_TOPIC_IN_BROKER.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TopicRequest {
    pub topic: String,
}

/// The answer to UPDATE_AND_CREATE_TOPIC (the stored config) and GET_ALL_TOPIC_CONFIG.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TopicConfigsResponse {
    pub topics: Vec<TopicConfigData>,
}

/// HA_INFO's answer: what a slave must match (name, shards, queue map, segment size) and
/// where each master shard serves HA_PULL.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaInfoResponse {
    pub broker_name: String,
    pub shards: u32,
    pub queue_map: String,
    pub segment_size: u64,
    pub shard_endpoints: Vec<String>,
}

/// HA_PULL: the master's log from `from`, which is the slave's written end (so it also
/// acknowledges every byte below it). The master waits up to `wait_ms` for new bytes.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaPullRequest {
    pub broker_name: String,
    pub slave_id: u64,
    pub shard: u32,
    pub segment_size: u64,
    pub from: u64,
    pub max_bytes: u32,
    pub wait_ms: u32,
    /// The slave's last record (log offset, size, store time; size 0: none known): the master
    /// answers only if its own log has the same record there, so a slave never continues a
    /// log that is not the one it copied.
    pub last_at: u64,
    pub last_size: u32,
    pub last_store_ts: u64,
}

/// One slave as a master shard sees it.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaSlaveStatus {
    pub slave_id: u64,
    /// Everything below this log offset is on the slave.
    pub acked: u64,
    /// Since its last pull, in ms.
    pub silent_ms: u64,
    /// Whether a SYNC_MASTER send would wait for it (heard from lately, close behind).
    pub in_sync: bool,
}

/// HA_STATUS's answer: a master shard's log range and its slaves.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaStatusResponse {
    pub shard: u32,
    pub master_start: u64,
    pub master_end: u64,
    pub slaves: Vec<HaSlaveStatus>,
}

/// HA_OFFSETS: the committed offsets of master shard `shard`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaOffsetsRequest {
    pub broker_name: String,
    pub shard: u32,
}

/// HA_OFFSETS' answer header (the offsets are the body): the shard's delayed-delivery
/// progress as last persisted (the schedule progress file's text; empty if none), so a slave
/// restarted as the master does not deliver again what the master delivered.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaOffsetsResponse {
    pub schedule_progress: String,
    /// The master's written end after the progress was read: the progress covers no
    /// delivery past it, and a slave keeps it once its own log reaches it.
    pub master_end: u64,
}

/// HA_PULL's answer; the body holds whole records from `from` (and, at a segment's end, the
/// 8-byte header of the blank record that closes it).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct HaPullResponse {
    pub from: u64,
    /// The master's written end and first log offset when it answered.
    pub master_end: u64,
    pub master_start: u64,
}

/// QUERY_MESSAGE: messages of `topic` whose keys include `key` (or whose unique key is
/// `key`, with `unique_key`), stored from `begin_ms` to `end_ms`, at most `max_num`.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct QueryMessageRequest {
    pub topic: String,
    pub key: String,
    pub unique_key: bool,
    pub max_num: u32,
    pub begin_ms: u64,
    pub end_ms: u64,
}

/// QUERY_MESSAGE's answer: `count` records, in log order, in the body. `truncated`: the
/// shard reached a bound of its search (links followed, bytes read), so there may be more.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct QueryMessageResponse {
    pub count: u32,
    pub truncated: bool,
}

/// VIEW_MESSAGE_BY_ID: the record at this CommitLog offset of the shard asked (the body of
/// the answer).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ViewMessageRequest {
    pub offset: u64,
}

/// END_TRANSACTION: the outcome of a half message's local transaction, sent to the shard that
/// stored it. `half_offset` is its CommitLog offset (its message id's), `half_queue_offset` its
/// offset in the half queue (the send's queue offset).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct EndTransactionRequest {
    pub producer_group: String,
    pub half_offset: u64,
    pub half_queue_offset: u64,
    /// True: commit; false: roll back.
    pub commit: bool,
    /// Sent in answer to a CHECK_TRANSACTION_STATE.
    pub from_check: bool,
}

/// CHECK_TRANSACTION_STATE's header; the push body is the half message's record.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckTransactionNotice {
    pub producer_group: String,
    pub half_offset: u64,
    pub half_queue_offset: u64,
    /// The half message's offset message id.
    pub msg_id: String,
}

/// GET_CONSUMER_LIST_BY_GROUP (and UNREGISTER_CLIENT's group list is in the heartbeat form).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupRequest {
    pub group: String,
}

#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ConsumerListResponse {
    /// Client ids of the group's live consumers, sorted.
    pub client_ids: Vec<String>,
}

/// Any non-success response that carries no other header.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    pub message: String,
    /// For WRONG_SHARD: the endpoint that owns the queue.
    pub redirect: String,
}

/// A push from the broker.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub message: String,
}

/// CONSUMER_SEND_MSG_BACK: a consumer hands back a message its listener failed. The frame
/// body is the stored record as the pull returned it (validated again by the broker). Sent to
/// the shard that owns queue 0 of the group's retry topic on the broker the message came from.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SendBackRequest {
    pub group: String,
    /// The message id of the failed delivery (kept as ORIGIN_MESSAGE_ID the first time).
    pub msg_id: String,
    /// 0: the broker picks `RETRY_DELAY_LEVEL_BASE + reconsume times`; > 0: that level;
    /// < 0: straight to the dead-letter topic.
    pub delay_level: i32,
    /// The group's maxReconsumeTimes: past it the message goes to the dead-letter topic.
    pub max_reconsume_times: u32,
}

/// Where a handed-back message went.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct SendBackResponse {
    /// `%RETRY%<group>` or `%DLQ%<group>`.
    pub topic: String,
    pub queue_id: u32,
    pub msg_id: String,
    /// The delay level it waits for (0 for the DLQ).
    pub delay_level: u32,
    pub reconsume_times: u32,
}

/// One queue of a lock request.
#[derive(
    Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
pub struct LockQueue {
    pub topic: String,
    pub queue_id: u32,
}

/// LOCK_BATCH_MQ and UNLOCK_BATCH_MQ: an orderly consumer locks (or releases) queues of this
/// broker for its group.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct LockBatchRequest {
    pub group: String,
    pub client_id: String,
    pub queues: Vec<LockQueue>,
}

/// The queues the requester holds after a LOCK_BATCH_MQ (its own locks renewed included).
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct LockBatchResponse {
    pub locked: Vec<LockQueue>,
}

/// A queue and an offset.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct QueueOffset {
    pub queue_id: u32,
    pub offset: u64,
}

/// INVOKE_BROKER_TO_RESET_OFFSET: commit these offsets of a group's topic (queues the receiving
/// shard owns) and push them to the group's live consumers.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ResetOffsetRequest {
    pub group: String,
    pub topic: String,
    /// The broker's name as routes give it (shards do not know it): echoed in the notice so
    /// consumers match the queues exactly.
    pub broker_name: String,
    pub offsets: Vec<QueueOffset>,
}

/// The RESET_CONSUMER_CLIENT_OFFSET push: the consumer moves these queues of `broker_name` to
/// the given offsets (dropping what it has in flight for them) before its next commit.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ResetOffsetNotice {
    pub group: String,
    pub topic: String,
    pub broker_name: String,
    pub offsets: Vec<QueueOffset>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_from_unaligned_bytes() {
        let h = SendRequest {
            producer_group: "pg".into(),
            topic: "T".into(),
            queue_id: 3,
            messages: vec![MessageMeta {
                tags: "A".into(),
                properties: vec![("k".into(), "v".into())],
                body_len: 5,
                ..Default::default()
            }],
        };
        let b = encode(&h);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&b);
        assert_eq!(decode::<SendRequest>(&shifted[1..]), Ok(h));
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        let h = encode(&RouteRequest {
            topic: "abc".into(),
        });
        for i in 0..h.len() {
            for bit in [1u8, 0x80] {
                let mut bad = h.to_vec();
                bad[i] ^= bit;
                // Any outcome but a panic or UB is acceptable; most flips must fail.
                let _ = decode::<RouteRequest>(&bad);
            }
        }
        assert!(decode::<SendRequest>(&[0xff; 7]).is_err());
        assert!(decode::<RouteRequest>(&[]).is_err());
        let long = encode(&RouteRequest {
            topic: "x".repeat(100),
        });
        assert!(decode::<RouteRequest>(&long[..long.len() / 2]).is_err());
    }
}
