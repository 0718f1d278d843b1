//! Every bound of the protocol and the store, named once and checked at the edge.

use thiserror::Error;

/// Largest message body a producer may send (RocketMQ's `maxMessageSize`, 4 MiB).
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;
/// Longest topic name, as RocketMQ (`TOPIC_MAX_LENGTH`).
pub const MAX_TOPIC_LEN: usize = 127;
/// Longest tags string of one message.
pub const MAX_TAGS_LEN: usize = 255;
/// Longest keys string of one message (keys are space separated).
pub const MAX_KEYS_LEN: usize = 1024;
/// Encoded user properties of one message, as RocketMQ's `Short.MAX_VALUE`.
pub const MAX_PROPERTIES_LEN: usize = 32 * 1024;
/// Largest stored record: a maximal body plus the largest header and variable fields.
pub const MAX_RECORD_LEN: usize =
    MAX_MESSAGE_SIZE + MAX_PROPERTIES_LEN + MAX_KEYS_LEN + MAX_TAGS_LEN + MAX_TOPIC_LEN + 256;
/// Largest frame on the wire: a maximal batch or pull response and its header.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
/// Largest frame header (an rkyv archive).
pub const MAX_HEADER_LEN: usize = 4 * 1024 * 1024;
/// Bodies of one batch send, together (RocketMQ: 4 MiB).
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Messages of one batch send.
pub const MAX_BATCH_MESSAGES: usize = 1024;
/// Record bytes one pull response carries at most.
pub const MAX_PULL_BYTES: usize = 8 * 1024 * 1024;
/// Messages one pull returns per queue at most (RocketMQ's pull batch is 32 by default).
pub const MAX_PULL_MESSAGES: u32 = 1024;
/// Queues one pull request may cover.
pub const MAX_PULL_QUEUES: usize = 256;
/// Longest a pull may park waiting for messages (RocketMQ holds 15 s by default).
pub const MAX_PULL_SUSPEND_MS: u32 = 60_000;
/// Messages one query by key returns from one shard at most (RocketMQ's
/// `maxMsgsNumBatch` is 64).
pub const MAX_QUERY_MESSAGES: u32 = 256;
/// Record bytes one query answer carries at most.
pub const MAX_QUERY_BYTES: usize = 8 * 1024 * 1024;
/// Longest consumer group, producer group or client id.
pub const MAX_GROUP_LEN: usize = 255;
/// Most queues one topic may have on one broker.
pub const MAX_QUEUES_PER_TOPIC: u32 = 1024;
/// Longest subscription expression (tags or SQL92) of a heartbeat or a pulled queue.
pub const MAX_SUB_EXPR_LEN: usize = 4096;
/// Most topics one broker holds: every registration with the name servers carries all of
/// them, and a name server takes no more than this from one broker.
pub const MAX_TOPICS_PER_BROKER: usize = 20_000;

/// Why a topic name is refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {0} bytes, over the limit of {MAX_TOPIC_LEN}")]
    TooLong(usize),
    #[error(
        "topic {topic:?} has the character {ch:?}; allowed: letters, digits, '%', '|', '-', '_'"
    )]
    BadChar { topic: String, ch: char },
}

/// Checks a topic name as RocketMQ does: 1..=127 of letters, digits, `%`, `|`, `-`, `_`.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(topic.len()));
    }
    if let Some(ch) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '%' | '|' | '-' | '_')))
    {
        return Err(TopicError::BadChar {
            topic: topic.to_owned(),
            ch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_rocketmq_rules() {
        assert_eq!(validate_topic("Orders-2024_%RETRY%|x"), Ok(()));
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
        assert_eq!(validate_topic(&"a".repeat(127)), Ok(()));
        assert_eq!(
            validate_topic(&"a".repeat(128)),
            Err(TopicError::TooLong(128))
        );
        assert!(matches!(
            validate_topic("a.b"),
            Err(TopicError::BadChar { ch: '.', .. })
        ));
        assert!(matches!(
            validate_topic("a b"),
            Err(TopicError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(
            validate_topic("é"),
            Err(TopicError::BadChar { ch: 'é', .. })
        ));
    }
}
