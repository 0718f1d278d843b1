//! System topics and the message properties the broker and the client act on. Names are
//! RocketMQ's where it has the same thing, so tools and habits carry over.

use thiserror::Error;

use crate::limits::MAX_PROPERTIES_LEN;

/// Where a message sent with a delay level waits: queue `level - 1` on the shard of its target
/// queue. Not readable by consumers (it is never a topic in the topic table).
pub const SCHEDULE_TOPIC: &str = "SCHEDULE_TOPIC_XXXX";
/// Where a message with a delivery time (`TIMER_DELIVER_MS`) waits: queue 0 on the shard of its
/// target queue; the ConsumeQueue entry's tag field holds the delivery time.
pub const TIMER_TOPIC: &str = "rmq_sys_wheel_timer";
/// Half (prepared) transactional messages wait here, queue 0 of each shard (RocketMQ's name).
pub const TRANS_HALF_TOPIC: &str = "RMQ_SYS_TRANS_HALF_TOPIC";
/// Outcomes of half messages (commit or rollback), queue 0 of each shard (RocketMQ's name).
pub const TRANS_OP_TOPIC: &str = "RMQ_SYS_TRANS_OP_HALF_TOPIC";
/// The internal group whose committed offsets on the half and op queues say where a shard's
/// transaction state is read from at a restart.
pub const TRANS_GROUP: &str = "CID_RMQ_SYS_TRANS";
/// A consumer group's retry topic is this prefix and the group name.
pub const RETRY_GROUP_TOPIC_PREFIX: &str = "%RETRY%";
/// A consumer group's dead-letter topic is this prefix and the group name.
pub const DLQ_GROUP_TOPIC_PREFIX: &str = "%DLQ%";
/// Queues of a retry and of a dead-letter topic (RocketMQ: 1).
pub const RETRY_DLQ_QUEUES: u32 = 1;
/// Most times a message is retried by default before it goes to the DLQ (RocketMQ's 16).
pub const DEFAULT_MAX_RECONSUME_TIMES: u32 = 16;
/// The delay level of the first retry is this plus the reconsume times (RocketMQ: 3, 10 s).
pub const RETRY_DELAY_LEVEL_BASE: u32 = 3;

/// Encoded property bytes the broker may add to a message on its way (a delay's real topic and
/// queue, a retry's original topic and message id, the applied delay): clients keep their
/// messages this far under `MAX_PROPERTIES_LEN`, so a retry or a delay never makes a stored
/// message too large.
pub const BROKER_PROPERTIES_RESERVE: usize = 512;

/// Properties the broker and client set and read.
pub mod property {
    /// Delay level 1..=levels (RocketMQ's `DELAY`); cleared when delivered.
    pub const DELAY: &str = "DELAY";
    /// Delivery time in ms since the epoch (RocketMQ 5's `TIMER_DELIVER_MS`); cleared when
    /// delivered.
    pub const TIMER_DELIVER_MS: &str = "TIMER_DELIVER_MS";
    /// The topic and queue a waiting (delayed or timer) message is delivered to.
    pub const REAL_TOPIC: &str = "REAL_TOPIC";
    pub const REAL_QID: &str = "REAL_QID";
    /// Set on delivery: how long the message was held, in ms (the delay of its level, or the
    /// time from store to its delivery time).
    pub const DELAY_APPLIED_MS: &str = "DELAY_APPLIED_MS";
    /// On a retry or dead-letter message: the topic it was first sent to.
    pub const RETRY_TOPIC: &str = "RETRY_TOPIC";
    /// On a retry or dead-letter message: the message id of the first delivery.
    pub const ORIGIN_MESSAGE_ID: &str = "ORIGIN_MESSAGE_ID";
    /// Set by a transactional producer on a half message (RocketMQ's `TRAN_MSG`, "true").
    pub const TRAN_MSG: &str = "TRAN_MSG";
    /// On a half message: its producer group, whose producers are checked back.
    pub const PGROUP: &str = "PGROUP";
    /// Properties no user may set: the broker or client owns them.
    pub const RESERVED: &[&str] = &[
        TRAN_MSG,
        PGROUP,
        crate::msgid::UNIQ_KEY,
        DELAY,
        TIMER_DELIVER_MS,
        REAL_TOPIC,
        REAL_QID,
        DELAY_APPLIED_MS,
        RETRY_TOPIC,
        ORIGIN_MESSAGE_ID,
    ];
}

/// Properties only the broker sets: a producer sending one is refused, so a stored message's
/// origin (`RETRY_TOPIC`, `ORIGIN_MESSAGE_ID`) or hold is always the broker's word. The client
/// sets `UNIQ_KEY`, `DELAY` and `TIMER_DELIVER_MS` from its own fields, so those pass.
pub const BROKER_SET_PROPERTIES: &[&str] = &[
    property::PGROUP,
    property::REAL_TOPIC,
    property::REAL_QID,
    property::DELAY_APPLIED_MS,
    property::RETRY_TOPIC,
    property::ORIGIN_MESSAGE_ID,
];

/// Why the broker refuses a sent message's properties.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SentPropertiesError {
    #[error("property {0} is set by the broker, not by a producer")]
    BrokerSet(String),
    #[error(
        "properties are {len} bytes encoded, over the limit of {max} for a sent message (the \
         broker keeps {BROKER_PROPERTIES_RESERVE} of the {MAX_PROPERTIES_LEN} for delays and retries)"
    )]
    TooLong { len: usize, max: usize },
}

/// Checks the properties of a message as a producer sent it: none the broker sets, and room
/// left for what a delay or a retry adds ([`BROKER_PROPERTIES_RESERVE`]).
pub fn check_sent_properties(props: &[(String, String)]) -> Result<(), SentPropertiesError> {
    let max = MAX_PROPERTIES_LEN - BROKER_PROPERTIES_RESERVE;
    if let Some((k, _)) = props
        .iter()
        .find(|(k, _)| BROKER_SET_PROPERTIES.contains(&k.as_str()))
    {
        return Err(SentPropertiesError::BrokerSet(k.clone()));
    }
    let len = crate::record::properties_len(props);
    if len > max {
        return Err(SentPropertiesError::TooLong { len, max });
    }
    Ok(())
}

/// `%RETRY%<group>`.
pub fn retry_topic(group: &str) -> String {
    format!("{RETRY_GROUP_TOPIC_PREFIX}{group}")
}

/// `%DLQ%<group>`.
pub fn dlq_topic(group: &str) -> String {
    format!("{DLQ_GROUP_TOPIC_PREFIX}{group}")
}

/// The group of a retry or dead-letter topic.
pub fn group_of(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(RETRY_GROUP_TOPIC_PREFIX)
        .or_else(|| topic.strip_prefix(DLQ_GROUP_TOPIC_PREFIX))
}

/// Topics only the broker writes: a client may not send to or create them.
pub fn is_internal_topic(topic: &str) -> bool {
    topic == SCHEDULE_TOPIC
        || topic == TIMER_TOPIC
        || topic == TRANS_HALF_TOPIC
        || topic == TRANS_OP_TOPIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_covers_what_the_broker_adds() {
        use crate::limits::MAX_TOPIC_LEN;
        let entry = |k: &str, v: usize| 4 + k.len() + v;
        let added = entry(property::REAL_TOPIC, MAX_TOPIC_LEN)
            + entry(property::REAL_QID, 10)
            + entry(property::DELAY, 10)
            + entry(property::RETRY_TOPIC, MAX_TOPIC_LEN)
            + entry(property::ORIGIN_MESSAGE_ID, 32)
            + entry(property::DELAY_APPLIED_MS, 20);
        assert!(added <= BROKER_PROPERTIES_RESERVE, "{added}");
        // A half message: its real topic and queue, and its producer group.
        let half = entry(property::REAL_TOPIC, MAX_TOPIC_LEN)
            + entry(property::REAL_QID, 10)
            + entry(property::PGROUP, crate::limits::MAX_GROUP_LEN);
        assert!(half <= BROKER_PROPERTIES_RESERVE, "{half}");
    }

    #[test]
    fn sent_properties_leave_the_reserve_and_the_broker_set_ones() {
        let p = |k: &str, v: usize| (k.to_owned(), "v".repeat(v));
        let max = MAX_PROPERTIES_LEN - BROKER_PROPERTIES_RESERVE;
        let room = max - (4 + crate::msgid::UNIQ_KEY.len() + 32) - (4 + "big".len());
        let fits = [p(crate::msgid::UNIQ_KEY, 32), p("big", room)];
        assert_eq!(check_sent_properties(&fits), Ok(()));
        let over = [p(crate::msgid::UNIQ_KEY, 32), p("big", room + 1)];
        assert_eq!(
            check_sent_properties(&over),
            Err(SentPropertiesError::TooLong { len: max + 1, max })
        );
        for k in [property::DELAY, property::TIMER_DELIVER_MS] {
            assert_eq!(check_sent_properties(&[p(k, 2)]), Ok(()), "{k}");
        }
        for k in BROKER_SET_PROPERTIES {
            let e = check_sent_properties(&[p("a", 1), p(k, 3)]).unwrap_err();
            assert_eq!(e, SentPropertiesError::BrokerSet(k.to_string()));
            assert!(e.to_string().contains("set by the broker"), "{e}");
        }
        // Every broker-set property is one no user may set either.
        assert!(BROKER_SET_PROPERTIES
            .iter()
            .all(|k| property::RESERVED.contains(k)));
    }

    #[test]
    fn group_topics() {
        assert_eq!(retry_topic("g1"), "%RETRY%g1");
        assert_eq!(dlq_topic("g1"), "%DLQ%g1");
        assert_eq!(group_of("%RETRY%g1"), Some("g1"));
        assert_eq!(group_of("%DLQ%g1"), Some("g1"));
        assert_eq!(group_of("Orders"), None);
        assert!(is_internal_topic(SCHEDULE_TOPIC) && !is_internal_topic("%RETRY%g"));
        for t in [
            SCHEDULE_TOPIC,
            TIMER_TOPIC,
            &retry_topic("g"),
            &dlq_topic("g"),
        ] {
            assert_eq!(crate::limits::validate_topic(t), Ok(()));
        }
    }
}
