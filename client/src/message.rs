//! Messages as a producer builds them and as a consumer receives them.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use orbitmq_proto::header::MessageMeta;
use orbitmq_proto::limits::{
    self, MAX_KEYS_LEN, MAX_MESSAGE_SIZE, MAX_PROPERTIES_LEN, MAX_TAGS_LEN,
};
use orbitmq_proto::msgid::{OffsetId, UNIQ_KEY};
use orbitmq_proto::record::RecordView;

use crate::error::{ClientError, Result};
use crate::route::MessageQueue;

/// Property carrying the delay level: the broker holds the message for that level's delay.
pub const PROPERTY_DELAY: &str = orbitmq_proto::sys::property::DELAY;
/// Property carrying the delivery time (ms since the epoch): the broker holds the message
/// until then.
pub const PROPERTY_TIMER_DELIVER_MS: &str = orbitmq_proto::sys::property::TIMER_DELIVER_MS;
/// Property carrying the client's unique key ([`UNIQ_KEY`]).
pub const PROPERTY_UNIQ_KEY: &str = UNIQ_KEY;
/// Highest delay level of RocketMQ's default table `1s 5s 10s 30s 1m 2m ... 1h 2h`. A broker
/// may configure others (`messageDelayLevel`); a level above its top is its top level.
pub const MAX_DELAY_LEVEL: u32 = 18;
/// Longest property name or value: the record stores each with a 16-bit length.
pub const MAX_PROPERTY_FIELD_LEN: usize = u16::MAX as usize;
/// Separator of keys in the stored KEYS field (RocketMQ's).
pub use orbitmq_proto::record::KEY_SEPARATOR;
/// Property names the client or broker sets; a user property may not use them.
pub const RESERVED_PROPERTIES: &[&str] = orbitmq_proto::sys::property::RESERVED;

/// A message to send.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// One tag (RocketMQ's TAGS), used by subscriptions to filter; empty for none.
    pub tags: String,
    /// Business keys, for lookup by key; each without spaces.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: BTreeMap<String, String>,
    pub body: Bytes,
    /// 0: deliver now; 1..: the broker's delay levels (RocketMQ's 18 by default).
    pub delay_level: u32,
    /// 0: deliver now; else the delivery time in ms since the epoch (the broker holds the
    /// message until then, up to its `timerMaxDelaySec`).
    pub deliver_at_ms: u64,
    /// The producer's flag, opaque to the broker.
    pub flag: u32,
}

impl Message {
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Message {
        Message {
            topic: topic.into(),
            body: body.into(),
            ..Message::default()
        }
    }

    pub fn with_tags(mut self, tags: impl Into<String>) -> Message {
        self.tags = tags.into();
        self
    }

    /// Adds one key.
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.keys.push(key.into());
        self
    }

    pub fn with_keys<I, S>(mut self, keys: I) -> Message
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keys.extend(keys.into_iter().map(Into::into));
        self
    }

    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.insert(name.into(), value.into());
        self
    }

    pub fn with_delay_level(mut self, level: u32) -> Message {
        self.delay_level = level;
        self
    }

    /// Delivers the message at a time (ms since the epoch) rather than at once.
    pub fn with_deliver_at(mut self, deliver_at_ms: u64) -> Message {
        self.deliver_at_ms = deliver_at_ms;
        self
    }

    pub fn with_flag(mut self, flag: u32) -> Message {
        self.flag = flag;
        self
    }

    /// Checks every rule the broker would check, so a bad message fails here with a clear
    /// error instead of a round trip.
    pub fn validate(&self) -> Result<()> {
        let illegal = |s: String| Err(ClientError::MessageIllegal(s));
        if let Err(e) = limits::validate_topic(&self.topic) {
            return illegal(format!("topic: {e}"));
        }
        if self.body.is_empty() {
            return illegal("message body is empty".into());
        }
        if self.body.len() > MAX_MESSAGE_SIZE {
            return illegal(format!(
                "message body is {} bytes, over the limit of {MAX_MESSAGE_SIZE}",
                self.body.len()
            ));
        }
        if self.tags.len() > MAX_TAGS_LEN {
            return illegal(format!(
                "tags are {} bytes, over the limit of {MAX_TAGS_LEN}",
                self.tags.len()
            ));
        }
        if self.tags.contains("||") {
            return illegal(format!(
                "tags {:?} must be one tag, without \"||\"",
                self.tags
            ));
        }
        for k in &self.keys {
            if k.is_empty() || k.contains(KEY_SEPARATOR) {
                return illegal(format!("key {k:?} must be non-empty and without spaces"));
            }
        }
        let keys_len = self.keys_field_len();
        if keys_len > MAX_KEYS_LEN {
            return illegal(format!(
                "keys are {keys_len} bytes, over the limit of {MAX_KEYS_LEN}"
            ));
        }
        if self.delay_level > 0 && self.deliver_at_ms > 0 {
            return illegal("a message has a delay level or a delivery time, not both".into());
        }
        let mut props = 0usize;
        for (k, v) in &self.properties {
            if k.is_empty() {
                return illegal("property names must not be empty".into());
            }
            if RESERVED_PROPERTIES.contains(&k.as_str()) {
                return illegal(format!(
                    "property {k} is reserved (set by the client or broker; use delay_level or deliver_at_ms for a delay)"
                ));
            }
            if k.len() > MAX_PROPERTY_FIELD_LEN || v.len() > MAX_PROPERTY_FIELD_LEN {
                return illegal(format!(
                    "property {k:?} is over the limit of {MAX_PROPERTY_FIELD_LEN} bytes"
                ));
            }
            props += 4 + k.len() + v.len();
        }
        // Room for the properties the client adds (UNIQ_KEY: 32 hex digits, DELAY or
        // TIMER_DELIVER_MS: 20 digits at most).
        props += 4 + PROPERTY_UNIQ_KEY.len() + 32 + 4 + PROPERTY_TIMER_DELIVER_MS.len() + 20;
        // And for what the broker adds on a delay or a retry.
        props += orbitmq_proto::sys::BROKER_PROPERTIES_RESERVE;
        if props > MAX_PROPERTIES_LEN {
            return illegal(format!(
                "properties are {props} bytes encoded, over the limit of {MAX_PROPERTIES_LEN}"
            ));
        }
        Ok(())
    }

    pub(crate) fn keys_field(&self) -> String {
        match self.keys.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            many => many.join(KEY_SEPARATOR.encode_utf8(&mut [0; 4])),
        }
    }

    /// The length of [`Self::keys_field`], without building it (checked on every send).
    fn keys_field_len(&self) -> usize {
        let separators = self.keys.len().saturating_sub(1) * KEY_SEPARATOR.len_utf8();
        self.keys.iter().map(String::len).sum::<usize>() + separators
    }

    /// The wire metadata of this message with the client's properties added.
    pub(crate) fn meta(&self, uniq_key: &str, born_timestamp: u64, sys_flag: u32) -> MessageMeta {
        let mut properties: Vec<(String, String)> = Vec::with_capacity(self.properties.len() + 2);
        properties.push((PROPERTY_UNIQ_KEY.to_owned(), uniq_key.to_owned()));
        if self.delay_level > 0 {
            properties.push((PROPERTY_DELAY.to_owned(), self.delay_level.to_string()));
        }
        if self.deliver_at_ms > 0 {
            properties.push((
                PROPERTY_TIMER_DELIVER_MS.to_owned(),
                self.deliver_at_ms.to_string(),
            ));
        }
        properties.extend(self.properties.iter().map(|(k, v)| (k.clone(), v.clone())));
        MessageMeta {
            flag: self.flag,
            sys_flag,
            born_timestamp,
            tags: self.tags.clone(),
            keys: self.keys_field(),
            properties,
            body_len: self.body.len() as u32,
        }
    }
}

/// A message as a consumer receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageExt {
    pub topic: String,
    pub broker_name: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    /// Offset message id: broker endpoint, shard and CommitLog offset (see `orbitmq_proto::msgid`).
    pub msg_id: String,
    /// The producer's unique key (`UNIQ_KEY`), the same across its retries.
    pub uniq_key: Option<String>,
    pub tags: String,
    pub keys: Vec<String>,
    /// All properties, the client's (UNIQ_KEY, DELAY) included.
    pub properties: BTreeMap<String, String>,
    pub body: Bytes,
    pub born_timestamp: u64,
    pub born_host: SocketAddr,
    pub store_timestamp: u64,
    /// Times this message was handed back for consumption: from the record (a message of the
    /// retry topic carries its count), plus the local redeliveries when a send-back failed.
    pub reconsume_times: u32,
    pub sys_flag: u32,
    pub flag: u32,
    /// Position in the shard's CommitLog.
    pub commit_log_offset: u64,
    pub store_size: u32,
    /// The stored record as pulled (a slice of the pull buffer, no copy): a send-back hands
    /// it to the broker as is.
    record: RawRecord,
    /// The topic the message was pulled from when `topic` shows a retry message's original
    /// topic (RocketMQ's resetRetryAndNamespace); offsets are kept on this one.
    pulled_topic: Option<String>,
}

/// A record's bytes; `Debug` shows only their length.
#[derive(Clone, PartialEq, Eq, Default)]
struct RawRecord(Bytes);

impl std::fmt::Debug for RawRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RawRecord({} bytes)", self.0.len())
    }
}

impl MessageExt {
    /// Builds a message from a validated record. `body` is the buffer `view` borrows from,
    /// so the message body is a slice of it, not a copy.
    pub(crate) fn from_record(
        view: &RecordView<'_>,
        body: &Bytes,
        broker_name: &str,
        broker_addr: SocketAddr,
        shard: u16,
    ) -> MessageExt {
        let properties: BTreeMap<String, String> = view
            .properties()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        MessageExt {
            topic: view.topic.to_owned(),
            broker_name: broker_name.to_owned(),
            queue_id: view.queue_id,
            queue_offset: view.queue_offset,
            msg_id: OffsetId::new(broker_addr, shard, view.physical_offset).encode(),
            uniq_key: properties.get(PROPERTY_UNIQ_KEY).cloned(),
            tags: view.tags.to_owned(),
            keys: view
                .keys
                .split(KEY_SEPARATOR)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
            properties,
            body: body.slice_ref(view.body),
            born_timestamp: view.born_timestamp,
            born_host: view.born_host,
            store_timestamp: view.store_timestamp,
            reconsume_times: view.reconsume_times,
            sys_flag: view.sys_flag,
            flag: view.flag,
            commit_log_offset: view.physical_offset,
            store_size: view.total_size,
            record: RawRecord(record_bytes(view, body)),
            pulled_topic: None,
        }
    }

    /// The queue the message was pulled from (for a retry message shown with its original
    /// topic: the group's retry queue, where its offset lives).
    pub fn message_queue(&self) -> MessageQueue {
        MessageQueue::new(self.queue_topic(), &self.broker_name, self.queue_id)
    }

    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
    }

    /// How long the broker held this message, in ms (a delay level or a delivery time);
    /// `None` for a message delivered at once.
    pub fn delay_applied_ms(&self) -> Option<u64> {
        self.property(orbitmq_proto::sys::property::DELAY_APPLIED_MS)
            .and_then(|v| v.parse().ok())
    }

    /// The delay level the producer asked for (0 for none).
    pub fn delay_level(&self) -> u32 {
        self.property(PROPERTY_DELAY)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The user's properties: all but those the client sets.
    pub fn user_properties(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .filter(|(k, _)| !RESERVED_PROPERTIES.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// On a retry or dead-letter message: the topic it was first sent to (`RETRY_TOPIC`).
    pub fn retry_topic(&self) -> Option<&str> {
        self.property(orbitmq_proto::sys::property::RETRY_TOPIC)
    }

    /// On a retry or dead-letter message: the message id of its first delivery
    /// (`ORIGIN_MESSAGE_ID`); else its own id.
    pub fn origin_msg_id(&self) -> &str {
        self.property(orbitmq_proto::sys::property::ORIGIN_MESSAGE_ID)
            .unwrap_or(&self.msg_id)
    }

    /// The topic of the queue the message was pulled from: `topic`, except for a retry
    /// message shown with its original topic, which lives in `%RETRY%<group>`.
    pub fn queue_topic(&self) -> &str {
        self.pulled_topic.as_deref().unwrap_or(&self.topic)
    }

    /// The stored record as pulled (what a send-back hands to the broker).
    pub fn record_bytes(&self) -> &Bytes {
        &self.record.0
    }

    /// A push consumer shows a message of its group's retry topic with its original topic,
    /// as RocketMQ's resetRetryAndNamespace; the queue stays the retry queue. Returns
    /// whether it changed the message.
    pub(crate) fn show_original_topic(&mut self, group: &str) -> bool {
        if self.pulled_topic.is_some() || self.topic != orbitmq_proto::sys::retry_topic(group) {
            return false;
        }
        let Some(original) = self.retry_topic().map(str::to_owned) else {
            return false;
        };
        self.pulled_topic = Some(std::mem::replace(&mut self.topic, original));
        true
    }
}

/// The whole record `view` was decoded from, as a slice of `buf` (its body is the last
/// field, so the record ends where the body ends).
fn record_bytes(view: &RecordView<'_>, buf: &Bytes) -> Bytes {
    let body = buf.slice_ref(view.body);
    let end = body.as_ptr() as usize - buf.as_ptr() as usize + body.len();
    match end.checked_sub(view.total_size as usize) {
        Some(start) => buf.slice(start..end),
        None => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use orbitmq_proto::record::{self, Placement};

    use super::*;

    #[test]
    fn the_keys_field_joins_keys_with_one_space_and_its_length_is_known_unbuilt() {
        for keys in [vec![], vec!["a"], vec!["k1", "k22", "k333"]] {
            let m = Message::new("T", "b").with_keys(keys.clone());
            assert_eq!(m.keys_field(), keys.join(" "));
            assert_eq!(m.keys_field_len(), m.keys_field().len());
        }
    }

    #[test]
    fn builder_and_meta() {
        let m = Message::new("T", "hello")
            .with_tags("TagA")
            .with_key("k1")
            .with_keys(["k2"])
            .with_property("p", "v")
            .with_delay_level(3);
        m.validate().unwrap();
        let meta = m.meta("KEY", 7, 0);
        assert_eq!(meta.keys, "k1 k2");
        assert_eq!(meta.body_len, 5);
        assert_eq!(meta.born_timestamp, 7);
        assert_eq!(
            meta.properties,
            vec![
                ("UNIQ_KEY".to_string(), "KEY".to_string()),
                ("DELAY".into(), "3".into()),
                ("p".into(), "v".into())
            ]
        );
        assert!(!Message::new("T", "x")
            .meta("K", 0, 0)
            .properties
            .iter()
            .any(|(k, _)| k == PROPERTY_DELAY));
    }

    #[test]
    fn validation_gives_clear_errors() {
        let err = |m: Message| match m.validate() {
            Err(ClientError::MessageIllegal(s)) => s,
            other => panic!("expected MessageIllegal, got {other:?}"),
        };
        assert!(err(Message::new("a b", "x")).contains("topic"));
        assert!(err(Message::new("T", "")).contains("empty"));
        assert!(err(Message::new("T", vec![0u8; MAX_MESSAGE_SIZE + 1])).contains("over the limit"));
        Message::new("T", vec![0u8; MAX_MESSAGE_SIZE])
            .validate()
            .unwrap();
        assert!(
            err(Message::new("T", "x").with_tags("a".repeat(MAX_TAGS_LEN + 1))).contains("tags")
        );
        assert!(err(Message::new("T", "x").with_tags("A || B")).contains("one tag"));
        assert!(err(Message::new("T", "x").with_key("a b")).contains("key"));
        Message::new("T", "x")
            .with_delay_level(19)
            .validate()
            .unwrap();
        assert!(err(Message::new("T", "x")
            .with_delay_level(1)
            .with_deliver_at(5))
        .contains("not both"));
        assert!(err(Message::new("T", "x").with_property("REAL_TOPIC", "y")).contains("reserved"));
        assert!(err(Message::new("T", "x").with_property("UNIQ_KEY", "y")).contains("reserved"));
        assert!(err(Message::new("T", "x").with_property("", "y")).contains("empty"));
        assert!(
            err(Message::new("T", "x").with_property("big", "v".repeat(MAX_PROPERTIES_LEN)))
                .contains("properties")
        );
    }

    #[test]
    fn message_ext_from_a_record_slices_the_body() {
        let m = record::Message {
            topic: "T".into(),
            queue_id: 2,
            tags: "TagA".into(),
            keys: "k1 k2".into(),
            properties: vec![
                ("UNIQ_KEY".into(), "U1".into()),
                ("DELAY".into(), "2".into()),
            ],
            body: Bytes::from_static(b"payload"),
            born_host: Some("10.0.0.9:5".parse().unwrap()),
            ..Default::default()
        };
        let mut buf = Vec::new();
        record::encode_into(
            &m,
            Placement {
                queue_offset: 5,
                physical_offset: 4096,
                store_timestamp: 9,
            },
            &mut buf,
        );
        let bytes = Bytes::from(buf);
        let view = record::decode(&bytes).unwrap();
        let addr: SocketAddr = "127.0.0.1:10912".parse().unwrap();
        let e = MessageExt::from_record(&view, &bytes, "b", addr, 1);
        assert_eq!(e.body, Bytes::from_static(b"payload"));
        assert_eq!(
            e.body.as_ptr(),
            bytes[bytes.len() - 7..].as_ptr(),
            "no copy"
        );
        assert_eq!(e.keys, vec!["k1".to_string(), "k2".into()]);
        assert_eq!(e.uniq_key.as_deref(), Some("U1"));
        assert_eq!(e.delay_level(), 2);
        assert_eq!(e.user_properties().count(), 0);
        assert_eq!(e.queue_offset, 5);
        assert_eq!(e.msg_id, OffsetId::new(addr, 1, 4096).encode());
        assert_eq!(e.message_queue(), MessageQueue::new("T", "b", 2));
        assert_eq!(&e.record_bytes()[..], &bytes[..], "the whole record");
        assert_eq!(e.origin_msg_id(), e.msg_id);
        assert_eq!(e.retry_topic(), None);
    }

    #[test]
    fn a_retry_message_shows_its_original_topic_and_keeps_its_queue() {
        let m = record::Message {
            topic: "%RETRY%g1".into(),
            properties: vec![
                ("UNIQ_KEY".into(), "U1".into()),
                ("RETRY_TOPIC".into(), "Orders".into()),
                ("ORIGIN_MESSAGE_ID".into(), "FIRST".into()),
            ],
            reconsume_times: 2,
            body: Bytes::from_static(b"x"),
            ..Default::default()
        };
        let mut buf = vec![0xAAu8; 3]; // the record need not start the buffer
        let placement = Placement {
            queue_offset: 0,
            physical_offset: 0,
            store_timestamp: 0,
        };
        record::encode_into(&m, placement, &mut buf);
        let bytes = Bytes::from(buf);
        let view = record::decode(&bytes[3..]).unwrap();
        let addr: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let mut e = MessageExt::from_record(&view, &bytes, "b", addr, 0);
        assert_eq!(&e.record_bytes()[..], &bytes[3..]);
        assert!(
            !e.show_original_topic("other"),
            "another group's retry topic"
        );
        assert!(e.show_original_topic("g1"));
        assert!(!e.show_original_topic("g1"), "once");
        assert_eq!(e.topic, "Orders");
        assert_eq!(e.queue_topic(), "%RETRY%g1");
        assert_eq!(e.message_queue(), MessageQueue::new("%RETRY%g1", "b", 0));
        assert_eq!(e.reconsume_times, 2);
        assert_eq!(e.origin_msg_id(), "FIRST");
        assert_eq!(e.retry_topic(), Some("Orders"));
    }
}
