//! CONSUMER_SEND_MSG_BACK: a consumer hands back a message its listener failed. The broker
//! stores it again in the group's retry topic (`%RETRY%<group>`, queue 0) to wait for a delay
//! level (3 + reconsume times by default, RocketMQ's backoff), or, past the group's
//! maxReconsumeTimes, in its dead-letter topic (`%DLQ%<group>`, queue 0) for good.
//!
//! The pure part ([`build`]) turns the pulled record into the message to store; the handler
//! validates the request, places it on the right shard and appends. Both group topics hash
//! the group name (see `QueueMap::shard_of`), so the shard that owns `%RETRY%<group>` queue 0
//! also stores the group's dead letters.

use bytes::Bytes;
use orbitmq_proto::codes::response;
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{self, SendBackRequest, SendBackResponse};
use orbitmq_proto::limits::{self, MAX_GROUP_LEN};
use orbitmq_proto::msgid::OffsetId;
use orbitmq_proto::record::{self, Message, RecordView};
use orbitmq_proto::sys::{self, property, RETRY_DELAY_LEVEL_BASE};
use thiserror::Error;

use crate::nameserver::topics::PERM_WRITE;
use crate::net::server::{error_frame, ok_frame};
use crate::schedule::{self, Diverted, MAX_DELAY_LEVELS};
use crate::shard::broker::ShardHandler;

/// Highest delay level a send-back may ask for (a level above the broker's top level is its
/// top level, as RocketMQ clamps; past this the request is malformed).
pub const MAX_SEND_BACK_DELAY_LEVEL: i32 = MAX_DELAY_LEVELS as i32;
/// Largest maxReconsumeTimes a consumer may give (RocketMQ's default is 16; orderly
/// consumers' "unlimited" is sent as this).
pub const MAX_RECONSUME_TIMES_LIMIT: u32 = 10_000;
/// Longest message id accepted (an offset id is 32 hex digits).
pub const MAX_MSG_ID_LEN: usize = 64;

/// Properties of a previous hold that must not travel with the handed-back message: the
/// send-back sets its own delay, and a stale delivery time or real topic would misplace it.
const STALE_PROPERTIES: &[&str] = &[
    property::DELAY,
    property::TIMER_DELIVER_MS,
    property::REAL_TOPIC,
    property::REAL_QID,
    property::DELAY_APPLIED_MS,
];

/// Why a send-back is refused before anything is stored.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SendBackError {
    #[error("consumer group must be 1..={MAX_GROUP_LEN} bytes and make valid topic names: {0}")]
    Group(String),
    #[error("msg_id {0:?} is not an offset message id")]
    MsgId(String),
    #[error(
        "msg_id {msg_id} names CommitLog offset {id_offset}, the record is at {record_offset}"
    )]
    MsgIdMismatch {
        msg_id: String,
        id_offset: u64,
        record_offset: u64,
    },
    #[error("delay level {0} is over the highest level {MAX_SEND_BACK_DELAY_LEVEL}")]
    DelayLevel(i32),
    #[error("max_reconsume_times {0} is over the limit of {MAX_RECONSUME_TIMES_LIMIT}")]
    MaxReconsumeTimes(u32),
    #[error("the body is not a stored record: {0}")]
    Record(#[from] record::DecodeError),
    #[error("the body holds a {record} byte record and {extra} more bytes")]
    TrailingBytes { record: u32, extra: usize },
    #[error("a record of the broker's internal topic {0} cannot be sent back")]
    InternalTopic(String),
}

/// Checks every header field of a send-back.
pub fn validate(h: &SendBackRequest) -> Result<(), SendBackError> {
    if h.group.is_empty()
        || h.group.len() > MAX_GROUP_LEN
        || limits::validate_topic(&sys::retry_topic(&h.group)).is_err()
        || limits::validate_topic(&sys::dlq_topic(&h.group)).is_err()
    {
        return Err(SendBackError::Group(h.group.clone()));
    }
    if h.msg_id.is_empty()
        || h.msg_id.len() > MAX_MSG_ID_LEN
        || OffsetId::decode(&h.msg_id).is_none()
    {
        return Err(SendBackError::MsgId(h.msg_id.clone()));
    }
    if h.delay_level > MAX_SEND_BACK_DELAY_LEVEL {
        return Err(SendBackError::DelayLevel(h.delay_level));
    }
    if h.max_reconsume_times > MAX_RECONSUME_TIMES_LIMIT {
        return Err(SendBackError::MaxReconsumeTimes(h.max_reconsume_times));
    }
    Ok(())
}

/// Decodes the request body: exactly one whole, valid record (CRC and every field checked),
/// whose position matches the message id the consumer names.
pub fn decode_body<'a>(body: &'a [u8], msg_id: &str) -> Result<RecordView<'a>, SendBackError> {
    let rec = record::decode(body)?;
    if rec.total_size as usize != body.len() {
        return Err(SendBackError::TrailingBytes {
            record: rec.total_size,
            extra: body.len() - rec.total_size as usize,
        });
    }
    if sys::is_internal_topic(rec.topic) {
        return Err(SendBackError::InternalTopic(rec.topic.to_owned()));
    }
    let id = OffsetId::decode(msg_id).ok_or_else(|| SendBackError::MsgId(msg_id.to_owned()))?;
    if id.offset != rec.physical_offset {
        return Err(SendBackError::MsgIdMismatch {
            msg_id: msg_id.to_owned(),
            id_offset: id.offset,
            record_offset: rec.physical_offset,
        });
    }
    Ok(rec)
}

/// Where a handed-back message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// `%RETRY%<group>` queue 0, after this delay level (before clamping to the broker's top).
    Retry { level: u32 },
    /// `%DLQ%<group>` queue 0, at once.
    DeadLetter,
}

/// The message to store for a send-back of `rec` (pulled by `group`, delivered as `msg_id`):
/// reconsume times one higher; the original topic (`RETRY_TOPIC`) and first message id
/// (`ORIGIN_MESSAGE_ID`) recorded the first time and kept afterwards; keys, tags, unique
/// key, body, born time and host and the other properties kept. Delay level 0 is
/// `RETRY_DELAY_LEVEL_BASE + reconsume times`; a negative level, or reconsume times past
/// `max_reconsume_times`, is a dead letter (no delay).
pub fn build(
    rec: &RecordView<'_>,
    group: &str,
    msg_id: &str,
    delay_level: i32,
    max_reconsume_times: u32,
) -> (Message, Destination) {
    let mut m = rec.to_message();
    m.reconsume_times = rec.reconsume_times.saturating_add(1);
    m.prepared_tx_offset = 0;
    m.properties
        .retain(|(k, _)| !STALE_PROPERTIES.contains(&k.as_str()));
    if rec.property(property::RETRY_TOPIC).is_none() {
        m.properties
            .push((property::RETRY_TOPIC.to_owned(), rec.topic.to_owned()));
    }
    if rec.property(property::ORIGIN_MESSAGE_ID).is_none() {
        m.properties
            .push((property::ORIGIN_MESSAGE_ID.to_owned(), msg_id.to_owned()));
    }
    m.queue_id = 0;
    if delay_level < 0 || m.reconsume_times > max_reconsume_times {
        m.topic = sys::dlq_topic(group);
        return (m, Destination::DeadLetter);
    }
    let level = if delay_level == 0 {
        RETRY_DELAY_LEVEL_BASE.saturating_add(rec.reconsume_times)
    } else {
        delay_level as u32
    };
    m.topic = sys::retry_topic(group);
    m.properties
        .push((property::DELAY.to_owned(), level.to_string()));
    (m, Destination::Retry { level })
}

use orbitmq_proto::now_ms;

impl ShardHandler {
    /// Creates the retry topic of each consumer group a heartbeat names (RocketMQ does this
    /// at the heartbeat too). A new topic wakes the registrar, so its route reaches the name
    /// servers at once. A group that makes no valid topic name gets none (logged).
    pub(crate) fn ensure_retry_topics(&self, groups: &[String]) {
        for g in groups {
            let topic = sys::retry_topic(g);
            if let Err(e) = self.shared.topics.ensure_group_topic(&topic) {
                tracing::warn!(group = %g, error = %e, "no retry topic for this consumer group");
            }
        }
    }

    /// CONSUMER_SEND_MSG_BACK. Everything is validated before anything changes; the request
    /// must come to the shard that owns queue 0 of the group's retry topic (else WRONG_SHARD
    /// with that shard's endpoint).
    pub(crate) async fn send_back(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let h: SendBackRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if let Err(e) = validate(&h) {
            return error_frame(id, response::BAD_REQUEST, format!("send-back: {e}"));
        }
        let rec = match decode_body(&req.body, &h.msg_id) {
            Ok(r) => r,
            Err(e) => return error_frame(id, response::BAD_REQUEST, format!("send-back: {e}")),
        };
        let retry = sys::retry_topic(&h.group);
        // RocketMQ makes the retry topic on a send-back too (a consumer that never
        // heartbeat this broker, or a topic deleted by an admin).
        if let Err(e) = self.shared.topics.ensure_group_topic(&retry) {
            return error_frame(id, response::SYSTEM_ERROR, e.to_string());
        }
        if let Err(f) = self.check_queue(id, &retry, 0, PERM_WRITE) {
            return f;
        }
        let (mut msg, dest) = build(
            &rec,
            &h.group,
            &h.msg_id,
            h.delay_level,
            h.max_reconsume_times,
        );
        let level = match dest {
            Destination::DeadLetter => {
                if let Err(e) = self.shared.topics.ensure_group_topic(&msg.topic) {
                    return error_frame(id, response::SYSTEM_ERROR, e.to_string());
                }
                // Same group, same shard (QueueMap::shard_of hashes the group name).
                debug_assert_eq!(self.shared.shape.shard_of(&msg.topic, 0), self.shard);
                tracing::warn!(group = %h.group, msg_id = %h.msg_id,
                    reconsume_times = msg.reconsume_times, topic = %rec.topic,
                    "message moved to the dead-letter queue");
                0
            }
            Destination::Retry { .. } => {
                match schedule::divert(&mut msg, &self.shared.schedule, now_ms()) {
                    Ok(Diverted::Level(l)) => l,
                    Ok(other) => {
                        // Only level 0 is not diverted, and a retry never asks for it.
                        tracing::error!(?other, "a retry message was not delayed");
                        0
                    }
                    Err(e) => return error_frame(id, response::MESSAGE_ILLEGAL, e.to_string()),
                }
            }
        };
        let reconsume_times = msg.reconsume_times;
        let topic = match dest {
            Destination::DeadLetter => msg.topic.clone(),
            Destination::Retry { .. } => retry,
        };
        match self.store.append(&msg).await {
            Ok(r) => {
                let resp = SendBackResponse {
                    topic,
                    queue_id: 0,
                    msg_id: OffsetId::new(self.my_endpoint(), self.shard as u16, r.physical_offset)
                        .encode(),
                    delay_level: level,
                    reconsume_times,
                };
                ok_frame(id, header::encode(&resp), Bytes::new())
            }
            Err(e) => error_frame(
                id,
                crate::shard::broker::store_error_code(&e),
                e.to_string(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use orbitmq_proto::record::Placement;

    use super::*;

    fn stored(m: &Message, physical_offset: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        record::encode_into(
            m,
            Placement {
                queue_offset: 7,
                physical_offset,
                store_timestamp: 1_000,
            },
            &mut buf,
        );
        buf
    }

    fn original() -> Message {
        Message {
            topic: "Orders".into(),
            queue_id: 5,
            flag: 3,
            born_timestamp: 42,
            born_host: Some("10.0.0.9:5555".parse().unwrap()),
            tags: "TagA".into(),
            keys: "k1 k2".into(),
            properties: vec![
                ("UNIQ_KEY".into(), "U1".into()),
                ("color".into(), "red".into()),
            ],
            body: b"payload".to_vec().into(),
            ..Message::default()
        }
    }

    fn prop<'a>(m: &'a Message, k: &str) -> Option<&'a str> {
        m.properties
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    fn id(offset: u64) -> String {
        OffsetId::new("127.0.0.1:10911".parse().unwrap(), 1, offset).encode()
    }

    #[test]
    fn first_send_back_goes_to_the_retry_topic_at_level_3() {
        let buf = stored(&original(), 4096);
        let rec = decode_body(&buf, &id(4096)).unwrap();
        let (m, dest) = build(&rec, "g1", &id(4096), 0, 16);
        assert_eq!(dest, Destination::Retry { level: 3 });
        assert_eq!((m.topic.as_str(), m.queue_id), ("%RETRY%g1", 0));
        assert_eq!(m.reconsume_times, 1);
        assert_eq!((m.tags.as_str(), m.keys.as_str()), ("TagA", "k1 k2"));
        assert_eq!(m.body, &b"payload"[..]);
        assert_eq!((m.born_timestamp, m.flag), (42, 3));
        assert_eq!(m.born_host, Some("10.0.0.9:5555".parse().unwrap()));
        assert_eq!(
            m.properties,
            vec![
                ("UNIQ_KEY".to_string(), "U1".to_string()),
                ("color".into(), "red".into()),
                ("RETRY_TOPIC".into(), "Orders".into()),
                ("ORIGIN_MESSAGE_ID".into(), id(4096)),
                ("DELAY".into(), "3".into()),
            ]
        );
    }

    #[test]
    fn a_retried_message_keeps_its_origin_and_backs_off_further() {
        // As the scheduler delivers it to the retry topic: reconsume 2, the hold recorded.
        let mut r = original();
        r.topic = "%RETRY%g1".into();
        r.queue_id = 0;
        r.reconsume_times = 2;
        r.properties.extend([
            ("RETRY_TOPIC".to_string(), "Orders".to_string()),
            ("ORIGIN_MESSAGE_ID".into(), "FIRST".into()),
            ("DELAY_APPLIED_MS".into(), "400".into()),
        ]);
        let buf = stored(&r, 8192);
        let rec = decode_body(&buf, &id(8192)).unwrap();
        let (m, dest) = build(&rec, "g1", &id(8192), 0, 16);
        assert_eq!(dest, Destination::Retry { level: 5 }, "3 + 2");
        assert_eq!(m.reconsume_times, 3);
        assert_eq!(prop(&m, "RETRY_TOPIC"), Some("Orders"));
        assert_eq!(prop(&m, "ORIGIN_MESSAGE_ID"), Some("FIRST"));
        assert_eq!(
            prop(&m, "DELAY_APPLIED_MS"),
            None,
            "a stale hold is dropped"
        );
        assert_eq!(prop(&m, "DELAY"), Some("5"));
        assert_eq!(prop(&m, "UNIQ_KEY"), Some("U1"));
        // A level the consumer asks for is taken as given.
        let (m, dest) = build(&rec, "g1", &id(8192), 7, 16);
        assert_eq!(dest, Destination::Retry { level: 7 });
        assert_eq!(prop(&m, "DELAY"), Some("7"));
    }

    #[test]
    fn past_the_maximum_or_a_negative_level_is_a_dead_letter() {
        let mut r = original();
        r.reconsume_times = 2;
        let buf = stored(&r, 0);
        let rec = decode_body(&buf, &id(0)).unwrap();
        // 2 + 1 = 3 > 2: dead.
        let (m, dest) = build(&rec, "g1", &id(0), 0, 2);
        assert_eq!(dest, Destination::DeadLetter);
        assert_eq!(
            (m.topic.as_str(), m.queue_id, m.reconsume_times),
            ("%DLQ%g1", 0, 3)
        );
        assert_eq!(prop(&m, "DELAY"), None);
        assert_eq!(prop(&m, "RETRY_TOPIC"), Some("Orders"));
        assert_eq!(prop(&m, "ORIGIN_MESSAGE_ID"), Some(id(0).as_str()));
        // 3 <= 3: one more retry.
        assert_eq!(
            build(&rec, "g1", &id(0), 0, 3).1,
            Destination::Retry { level: 5 }
        );
        // A negative level goes straight to the DLQ.
        assert_eq!(build(&rec, "g1", &id(0), -1, 16).1, Destination::DeadLetter);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let ok = SendBackRequest {
            group: "g1".into(),
            msg_id: id(0),
            delay_level: 0,
            max_reconsume_times: 16,
        };
        assert_eq!(validate(&ok), Ok(()));
        let bad = |f: fn(&mut SendBackRequest)| {
            let mut h = ok.clone();
            f(&mut h);
            validate(&h).unwrap_err()
        };
        assert!(matches!(bad(|h| h.group.clear()), SendBackError::Group(_)));
        assert!(matches!(
            bad(|h| h.group = "a b".into()),
            SendBackError::Group(_)
        ));
        assert!(matches!(
            bad(|h| h.group = "g".repeat(MAX_GROUP_LEN)),
            SendBackError::Group(_)
        ));
        assert!(matches!(
            bad(|h| h.msg_id = "xyz".into()),
            SendBackError::MsgId(_)
        ));
        assert!(matches!(
            bad(|h| h.delay_level = 65),
            SendBackError::DelayLevel(65)
        ));
        assert!(matches!(
            bad(|h| h.max_reconsume_times = MAX_RECONSUME_TIMES_LIMIT + 1),
            SendBackError::MaxReconsumeTimes(_)
        ));

        let mut buf = stored(&original(), 4096);
        assert!(matches!(
            decode_body(b"garbage", &id(4096)),
            Err(SendBackError::Record(_))
        ));
        assert!(matches!(
            decode_body(&buf, &id(4097)),
            Err(SendBackError::MsgIdMismatch { .. })
        ));
        let mut longer = buf.clone();
        longer.push(0);
        assert!(matches!(
            decode_body(&longer, &id(4096)),
            Err(SendBackError::TrailingBytes { extra: 1, .. })
        ));
        let last = buf.len() - 1;
        buf[last] ^= 0xFF;
        let e = decode_body(&buf, &id(4096)).unwrap_err();
        assert!(
            matches!(e, SendBackError::Record(record::DecodeError::Crc { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("crc mismatch"), "{e}");
        let mut internal = original();
        internal.topic = sys::SCHEDULE_TOPIC.into();
        assert!(matches!(
            decode_body(&stored(&internal, 0), &id(0)),
            Err(SendBackError::InternalTopic(_))
        ));
    }
}
