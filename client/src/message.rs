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

/// Property carrying the delay level (stored now, acted on by the broker later).
pub const PROPERTY_DELAY: &str = "DELAY";
/// Property carrying the client's unique key ([`UNIQ_KEY`]).
pub const PROPERTY_UNIQ_KEY: &str = UNIQ_KEY;
/// Highest delay level: RocketMQ's 18 levels `1s 5s 10s 30s 1m 2m ... 1h 2h`.
pub const MAX_DELAY_LEVEL: u32 = 18;
/// Longest property name or value: the record stores each with a 16-bit length.
pub const MAX_PROPERTY_FIELD_LEN: usize = u16::MAX as usize;
/// Separator of keys in the stored KEYS field (RocketMQ's).
pub const KEY_SEPARATOR: char = ' ';
/// Property names the client sets itself; a user property may not use them.
pub const RESERVED_PROPERTIES: &[&str] = &[PROPERTY_UNIQ_KEY, PROPERTY_DELAY];

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
    /// 0: deliver now; 1..=18: RocketMQ's delay levels.
    pub delay_level: u32,
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
        let keys_len = self.keys_field().len();
        if keys_len > MAX_KEYS_LEN {
            return illegal(format!(
                "keys are {keys_len} bytes, over the limit of {MAX_KEYS_LEN}"
            ));
        }
        if self.delay_level > MAX_DELAY_LEVEL {
            return illegal(format!(
                "delay level {} is over the highest level {MAX_DELAY_LEVEL}",
                self.delay_level
            ));
        }
        let mut props = 0usize;
        for (k, v) in &self.properties {
            if k.is_empty() {
                return illegal("property names must not be empty".into());
            }
            if RESERVED_PROPERTIES.contains(&k.as_str()) {
                return illegal(format!(
                    "property {k} is reserved (set by the client; use delay_level for DELAY)"
                ));
            }
            if k.len() > MAX_PROPERTY_FIELD_LEN || v.len() > MAX_PROPERTY_FIELD_LEN {
                return illegal(format!(
                    "property {k:?} is over the limit of {MAX_PROPERTY_FIELD_LEN} bytes"
                ));
            }
            props += 4 + k.len() + v.len();
        }
        // Room for the properties the client adds (UNIQ_KEY: 32 hex digits, DELAY).
        props += 4 + PROPERTY_UNIQ_KEY.len() + 32 + 4 + PROPERTY_DELAY.len() + 2;
        if props > MAX_PROPERTIES_LEN {
            return illegal(format!(
                "properties are {props} bytes encoded, over the limit of {MAX_PROPERTIES_LEN}"
            ));
        }
        Ok(())
    }

    pub(crate) fn keys_field(&self) -> String {
        self.keys.join(&KEY_SEPARATOR.to_string())
    }

    /// The wire metadata of this message with the client's properties added.
    pub(crate) fn meta(&self, uniq_key: &str, born_timestamp: u64, sys_flag: u32) -> MessageMeta {
        let mut properties: Vec<(String, String)> = Vec::with_capacity(self.properties.len() + 2);
        properties.push((PROPERTY_UNIQ_KEY.to_owned(), uniq_key.to_owned()));
        if self.delay_level > 0 {
            properties.push((PROPERTY_DELAY.to_owned(), self.delay_level.to_string()));
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
    /// Times this message was handed back for consumption (counted locally until the retry
    /// topic arrives).
    pub reconsume_times: u32,
    pub sys_flag: u32,
    pub flag: u32,
    /// Position in the shard's CommitLog.
    pub commit_log_offset: u64,
    pub store_size: u32,
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
        }
    }

    pub fn message_queue(&self) -> MessageQueue {
        MessageQueue::new(&self.topic, &self.broker_name, self.queue_id)
    }

    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
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
}

#[cfg(test)]
mod tests {
    use orbitmq_proto::record::{self, Placement};

    use super::*;

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
        assert!(err(Message::new("T", "x").with_delay_level(19)).contains("delay"));
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
            body: b"payload".to_vec(),
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
    }
}
