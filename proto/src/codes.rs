//! Request and response codes. Numbers follow RocketMQ's where it has the same request.

/// Request codes.
pub mod request {
    pub const SEND_MESSAGE: u16 = 10;
    pub const PULL_MESSAGE: u16 = 11;
    /// Messages of a topic by key or unique key (the key index of each shard).
    pub const QUERY_MESSAGE: u16 = 12;
    /// The message at a CommitLog offset (an offset message id).
    pub const VIEW_MESSAGE_BY_ID: u16 = 33;
    pub const QUERY_CONSUMER_OFFSET: u16 = 14;
    pub const UPDATE_CONSUMER_OFFSET: u16 = 15;
    pub const SEARCH_OFFSET_BY_TIMESTAMP: u16 = 29;
    pub const GET_MAX_OFFSET: u16 = 30;
    pub const GET_MIN_OFFSET: u16 = 31;
    pub const HEART_BEAT: u16 = 34;
    pub const UPDATE_AND_CREATE_TOPIC: u16 = 17;
    pub const GET_ALL_TOPIC_CONFIG: u16 = 21;
    pub const UNREGISTER_CLIENT: u16 = 35;
    /// A consumer hands back a message it failed to consume (retry topic or DLQ).
    pub const CONSUMER_SEND_MSG_BACK: u16 = 36;
    /// A transactional producer commits or rolls back a half message.
    pub const END_TRANSACTION: u16 = 37;
    /// Orderly consumers lock and unlock the queues they process (broker-wide lock table).
    pub const LOCK_BATCH_MQ: u16 = 41;
    pub const UNLOCK_BATCH_MQ: u16 = 42;
    pub const GET_CONSUMER_LIST_BY_GROUP: u16 = 38;
    pub const PUT_KV_CONFIG: u16 = 100;
    pub const GET_KV_CONFIG: u16 = 101;
    pub const DELETE_KV_CONFIG: u16 = 102;
    pub const REGISTER_BROKER: u16 = 103;
    pub const UNREGISTER_BROKER: u16 = 104;
    pub const GET_ROUTEINFO_BY_TOPIC: u16 = 105;
    pub const GET_BROKER_CLUSTER_INFO: u16 = 106;
    /// The members of a consumer group with their subscriptions (and conflicts).
    pub const GET_CONSUMER_CONNECTION_LIST: u16 = 203;
    pub const GET_ALL_TOPIC_LIST_FROM_NAMESERVER: u16 = 206;
    pub const DELETE_TOPIC_IN_BROKER: u16 = 215;
    pub const GET_TOPICS_BY_CLUSTER: u16 = 224;
    /// Admin to broker: commit a group's new offsets and push them to its live consumers.
    pub const INVOKE_BROKER_TO_RESET_OFFSET: u16 = 222;
    /// Slave to master (any shard): the master's shape and shard endpoints ([`crate::header::HaInfoResponse`]).
    pub const HA_INFO: u16 = 350;
    /// Slave shard k to master shard k: the log from an offset, which also acknowledges
    /// everything below it (RocketMQ's HA channel, as requests).
    pub const HA_PULL: u16 = 351;
    /// Slave shard k to master shard k: every committed consumer offset of the shard (in the
    /// body, in the offsets file's format), as RocketMQ's slaves copy them.
    pub const HA_OFFSETS: u16 = 352;
    /// Admin to a master shard: its log's range and each slave's progress
    /// ([`crate::header::HaStatusResponse`]).
    pub const HA_STATUS: u16 = 353;

    pub fn name(code: u16) -> &'static str {
        match code {
            SEND_MESSAGE => "SEND_MESSAGE",
            PULL_MESSAGE => "PULL_MESSAGE",
            QUERY_MESSAGE => "QUERY_MESSAGE",
            VIEW_MESSAGE_BY_ID => "VIEW_MESSAGE_BY_ID",
            QUERY_CONSUMER_OFFSET => "QUERY_CONSUMER_OFFSET",
            UPDATE_CONSUMER_OFFSET => "UPDATE_CONSUMER_OFFSET",
            SEARCH_OFFSET_BY_TIMESTAMP => "SEARCH_OFFSET_BY_TIMESTAMP",
            GET_MAX_OFFSET => "GET_MAX_OFFSET",
            GET_MIN_OFFSET => "GET_MIN_OFFSET",
            HEART_BEAT => "HEART_BEAT",
            GET_ROUTEINFO_BY_TOPIC => "GET_ROUTEINFO_BY_TOPIC",
            UPDATE_AND_CREATE_TOPIC => "UPDATE_AND_CREATE_TOPIC",
            GET_ALL_TOPIC_CONFIG => "GET_ALL_TOPIC_CONFIG",
            UNREGISTER_CLIENT => "UNREGISTER_CLIENT",
            CONSUMER_SEND_MSG_BACK => "CONSUMER_SEND_MSG_BACK",
            END_TRANSACTION => "END_TRANSACTION",
            HA_INFO => "HA_INFO",
            HA_PULL => "HA_PULL",
            HA_OFFSETS => "HA_OFFSETS",
            HA_STATUS => "HA_STATUS",
            LOCK_BATCH_MQ => "LOCK_BATCH_MQ",
            UNLOCK_BATCH_MQ => "UNLOCK_BATCH_MQ",
            INVOKE_BROKER_TO_RESET_OFFSET => "INVOKE_BROKER_TO_RESET_OFFSET",
            GET_CONSUMER_LIST_BY_GROUP => "GET_CONSUMER_LIST_BY_GROUP",
            PUT_KV_CONFIG => "PUT_KV_CONFIG",
            GET_KV_CONFIG => "GET_KV_CONFIG",
            DELETE_KV_CONFIG => "DELETE_KV_CONFIG",
            REGISTER_BROKER => "REGISTER_BROKER",
            UNREGISTER_BROKER => "UNREGISTER_BROKER",
            GET_BROKER_CLUSTER_INFO => "GET_BROKER_CLUSTER_INFO",
            GET_CONSUMER_CONNECTION_LIST => "GET_CONSUMER_CONNECTION_LIST",
            GET_ALL_TOPIC_LIST_FROM_NAMESERVER => "GET_ALL_TOPIC_LIST_FROM_NAMESERVER",
            DELETE_TOPIC_IN_BROKER => "DELETE_TOPIC_IN_BROKER",
            GET_TOPICS_BY_CLUSTER => "GET_TOPICS_BY_CLUSTER",
            _ => "UNKNOWN",
        }
    }
}

/// Response codes.
pub mod response {
    pub const SUCCESS: u16 = 0;
    pub const SYSTEM_ERROR: u16 = 1;
    pub const SYSTEM_BUSY: u16 = 2;
    pub const REQUEST_CODE_NOT_SUPPORTED: u16 = 3;
    /// The header failed validation or does not fit the request.
    pub const BAD_REQUEST: u16 = 4;
    pub const FLUSH_DISK_TIMEOUT: u16 = 10;
    /// Stored on the master, but no slave is in sync to copy it (SYNC_MASTER).
    pub const SLAVE_NOT_AVAILABLE: u16 = 11;
    /// Stored on the master; its slave did not confirm the copy in time (SYNC_MASTER).
    pub const FLUSH_SLAVE_TIMEOUT: u16 = 12;
    pub const MESSAGE_ILLEGAL: u16 = 13;
    /// The store cannot take writes (I/O error fenced it, or the disk is full).
    pub const SERVICE_NOT_AVAILABLE: u16 = 14;
    /// The peer may not do this (replication without a certificate of the cluster CA).
    pub const NO_PERMISSION: u16 = 16;
    pub const TOPIC_NOT_EXIST: u16 = 17;
    pub const PULL_NOT_FOUND: u16 = 19;
    pub const PULL_RETRY_IMMEDIATELY: u16 = 20;
    pub const PULL_OFFSET_MOVED: u16 = 21;
    pub const QUERY_NOT_FOUND: u16 = 22;
    /// A subscription's expression is not valid, or its type is not served here.
    pub const SUBSCRIPTION_PARSE_FAILED: u16 = 23;
    /// The queue lives on another shard: the header names its endpoint.
    pub const WRONG_SHARD: u16 = 40;

    pub fn name(code: u16) -> &'static str {
        match code {
            SUCCESS => "SUCCESS",
            SYSTEM_ERROR => "SYSTEM_ERROR",
            SYSTEM_BUSY => "SYSTEM_BUSY",
            REQUEST_CODE_NOT_SUPPORTED => "REQUEST_CODE_NOT_SUPPORTED",
            BAD_REQUEST => "BAD_REQUEST",
            FLUSH_DISK_TIMEOUT => "FLUSH_DISK_TIMEOUT",
            SLAVE_NOT_AVAILABLE => "SLAVE_NOT_AVAILABLE",
            FLUSH_SLAVE_TIMEOUT => "FLUSH_SLAVE_TIMEOUT",
            MESSAGE_ILLEGAL => "MESSAGE_ILLEGAL",
            SERVICE_NOT_AVAILABLE => "SERVICE_NOT_AVAILABLE",
            NO_PERMISSION => "NO_PERMISSION",
            TOPIC_NOT_EXIST => "TOPIC_NOT_EXIST",
            PULL_NOT_FOUND => "PULL_NOT_FOUND",
            PULL_RETRY_IMMEDIATELY => "PULL_RETRY_IMMEDIATELY",
            SUBSCRIPTION_PARSE_FAILED => "SUBSCRIPTION_PARSE_FAILED",
            PULL_OFFSET_MOVED => "PULL_OFFSET_MOVED",
            QUERY_NOT_FOUND => "QUERY_NOT_FOUND",
            WRONG_SHARD => "WRONG_SHARD",
            _ => "UNKNOWN",
        }
    }
}

/// Push codes (broker to client).
pub mod push {
    /// The broker is shutting down: refresh routes.
    pub const GOING_AWAY: u16 = 1;
    /// A free-form notice (also used to prove the push channel in tests).
    pub const NOTICE: u16 = 2;
    /// A consumer group's membership changed (RocketMQ's NOTIFY_CONSUMER_IDS_CHANGED = 40):
    /// the notice's message is the group name; its members rebalance at once.
    pub const NOTIFY_CONSUMER_IDS_CHANGED: u16 = 40;
    /// A group's offsets were reset while it runs (RocketMQ's RESET_CONSUMER_CLIENT_OFFSET):
    /// the push carries a [`crate::header::ResetOffsetNotice`].
    pub const RESET_CONSUMER_CLIENT_OFFSET: u16 = 220;
    /// The broker asks a transactional producer how a half message's local transaction
    /// ended (RocketMQ's CHECK_TRANSACTION_STATE = 39): the push carries a
    /// [`crate::header::CheckTransactionNotice`] and the half message's record as its body.
    pub const CHECK_TRANSACTION_STATE: u16 = 39;
}

/// QUIC application error codes used to close a stream or connection.
pub mod quic {
    pub const FRAME_INVALID: u32 = 1;
    pub const SHUTDOWN: u32 = 2;
}
