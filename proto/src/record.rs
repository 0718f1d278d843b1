//! The stored record: the CommitLog's on-disk layout, which is also what a pull returns.
//!
//! The broker writes records into its CommitLog and serves the same bytes to consumers, so
//! the codec lives here, shared by broker and client. Encoding and decoding are pure.
//!
//! Layout, version 1, all integers little-endian (x86-64 and aarch64 hosts read them natively):
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! |      0 |    4 | total size of the record, this field included      |
//! |      4 |    4 | magic: [`RECORD_MAGIC_V1`] or [`BLANK_MAGIC`]       |
//! |      8 |    4 | crc32c of bytes `[12, total size)`                 |
//! |     12 |    4 | queue id                                           |
//! |     16 |    4 | flag (the producer's, opaque to the broker)        |
//! |     20 |    8 | queue offset                                       |
//! |     28 |    8 | physical offset (position in the shard's log)      |
//! |     36 |    4 | sys flag ([`sys_flag`])                            |
//! |     40 |    8 | born timestamp, ms since the epoch                 |
//! |     48 |   16 | born host address (IPv4 mapped into IPv6)          |
//! |     64 |    2 | born host port                                     |
//! |     66 |    8 | store timestamp, ms since the epoch                |
//! |     74 |    4 | reconsume times                                    |
//! |     78 |    8 | prepared transaction offset                        |
//! |     86 |  1+n | topic                                              |
//! |        |  2+n | tags                                               |
//! |        |  2+n | keys (space separated, as RocketMQ's KEYS)         |
//! |        |  4+n | properties: repeated (2+n key, 2+n value)          |
//! |        |  4+n | body                                               |
//!
//! A blank record ([`BLANK_MAGIC`]) pads the end of a segment: only its size and magic are
//! meaningful, and it says "the next record is at the start of the next segment".

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};

use bytes::Bytes;
use thiserror::Error;

use crate::limits;

/// Magic of a version-1 message record.
pub const RECORD_MAGIC_V1: u32 = 0x0B17_D0C1;
/// Magic of the padding record at the end of a segment.
pub const BLANK_MAGIC: u32 = 0xB1A7_0000;
/// Bytes before the variable part of a record.
pub const FIXED_HEADER_LEN: usize = 86;
/// The smallest possible record: the fixed header and the empty variable fields.
pub const MIN_RECORD_LEN: usize = FIXED_HEADER_LEN + 1 + 2 + 2 + 4 + 4;
/// A blank (padding) record needs only its size and magic.
pub const BLANK_RECORD_MIN_LEN: usize = 8;

const OFF_TOTAL: usize = 0;
const OFF_MAGIC: usize = 4;
const OFF_CRC: usize = 8;
const OFF_QUEUE_ID: usize = 12;
const OFF_FLAG: usize = 16;
const OFF_QUEUE_OFFSET: usize = 20;
const OFF_PHYS_OFFSET: usize = 28;
const OFF_SYS_FLAG: usize = 36;
const OFF_BORN_TS: usize = 40;
const OFF_BORN_ADDR: usize = 48;
const OFF_BORN_PORT: usize = 64;
const OFF_STORE_TS: usize = 66;
const OFF_RECONSUME: usize = 74;
const OFF_PREPARED_TX: usize = 78;
/// The CRC covers everything after itself.
const CRC_START: usize = 12;

/// System flags carried by every record.
/// Separator of keys in a record's keys field (RocketMQ's).
pub const KEY_SEPARATOR: char = ' ';

/// Whether a record answers a query by key (QUERY_MESSAGE): of `topic`, stored within `time`,
/// with `key` among its keys, or as its unique key when `unique`. The broker filters what its
/// index finds with it, and the client checks each answer with it.
pub fn matches_key_query(
    v: &RecordView<'_>,
    topic: &str,
    key: &str,
    unique: bool,
    time: std::ops::RangeInclusive<u64>,
) -> bool {
    v.topic == topic
        && time.contains(&v.store_timestamp)
        && if unique {
            v.property(crate::msgid::UNIQ_KEY) == Some(key)
        } else {
            v.keys.split(KEY_SEPARATOR).any(|k| k == key)
        }
}

pub mod sys_flag {
    /// The body is compressed (reserved: the client compresses, the broker stores as is).
    pub const COMPRESSED: u32 = 0x1;
    /// Part of a batch send.
    pub const BATCH: u32 = 0x10;
    /// Transaction state, two bits: none, prepared (half), commit, rollback.
    pub const TRANSACTION_MASK: u32 = 0x3 << 2;
    pub const TRANSACTION_NOT_TYPE: u32 = 0;
    pub const TRANSACTION_PREPARED: u32 = 0x1 << 2;
    pub const TRANSACTION_COMMIT: u32 = 0x2 << 2;
    pub const TRANSACTION_ROLLBACK: u32 = 0x3 << 2;
}

/// What a producer supplies for one message; the broker adds the offsets and store time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub queue_id: u32,
    pub flag: u32,
    pub sys_flag: u32,
    pub born_timestamp: u64,
    pub born_host: Option<SocketAddr>,
    pub reconsume_times: u32,
    pub prepared_tx_offset: u64,
    pub tags: String,
    pub keys: String,
    /// User properties, in the producer's order.
    pub properties: Vec<(String, String)>,
    pub body: Bytes,
}

/// Offsets and time the store assigns when it appends a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub queue_offset: u64,
    pub physical_offset: u64,
    pub store_timestamp: u64,
}

/// Errors of a message that cannot be encoded: the producer's input is wrong.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("topic is invalid: {0}")]
    Topic(#[from] limits::TopicError),
    #[error("{field} is {len} bytes, over the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("message body is {len} bytes, over the limit of {max}")]
    BodyTooLarge { len: usize, max: usize },
    #[error("property names must not be empty")]
    EmptyPropertyName,
}

/// Why bytes are not a whole, valid record.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unknown magic {0:#010x}")]
    BadMagic(u32),
    #[error("record size {0} is out of bounds")]
    BadSize(u32),
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("field {0} runs past the record")]
    FieldOverrun(&'static str),
    #[error("field {0} is not valid UTF-8")]
    Utf8(&'static str),
}

/// The encoded size of a message, validating every bound on the way.
pub fn encoded_len(msg: &Message) -> Result<usize, EncodeError> {
    limits::validate_topic(&msg.topic)?;
    check_len("tags", msg.tags.len(), limits::MAX_TAGS_LEN)?;
    check_len("keys", msg.keys.len(), limits::MAX_KEYS_LEN)?;
    if msg.body.len() > limits::MAX_MESSAGE_SIZE {
        return Err(EncodeError::BodyTooLarge {
            len: msg.body.len(),
            max: limits::MAX_MESSAGE_SIZE,
        });
    }
    let mut props = 0usize;
    for (k, v) in &msg.properties {
        if k.is_empty() {
            return Err(EncodeError::EmptyPropertyName);
        }
        check_len("property name", k.len(), u16::MAX as usize)?;
        check_len("property value", v.len(), u16::MAX as usize)?;
        props += 4 + k.len() + v.len();
    }
    check_len("properties", props, limits::MAX_PROPERTIES_LEN)?;
    Ok(FIXED_HEADER_LEN
        + 1
        + msg.topic.len()
        + 2
        + msg.tags.len()
        + 2
        + msg.keys.len()
        + 4
        + props
        + 4
        + msg.body.len())
}

fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), EncodeError> {
    if len > max {
        Err(EncodeError::FieldTooLong { field, len, max })
    } else {
        Ok(())
    }
}

/// Encoded bytes of `props`: each name and value with its u16 length.
pub fn properties_len(props: &[(String, String)]) -> usize {
    props.iter().map(|(k, v)| 4 + k.len() + v.len()).sum()
}

/// Appends the record for `msg` placed at `at` to `out`; returns its length.
/// Call [`encoded_len`] first: this function trusts that the message is within bounds.
pub fn encode_into(msg: &Message, at: Placement, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FIXED_HEADER_LEN]);
    out.push(msg.topic.len() as u8);
    out.extend_from_slice(msg.topic.as_bytes());
    put_str16(out, &msg.tags);
    put_str16(out, &msg.keys);
    let props_len = properties_len(&msg.properties);
    out.extend_from_slice(&(props_len as u32).to_le_bytes());
    for (k, v) in &msg.properties {
        put_str16(out, k);
        put_str16(out, v);
    }
    out.extend_from_slice(&(msg.body.len() as u32).to_le_bytes());
    out.extend_from_slice(&msg.body);
    let total = out.len() - start;

    let h = &mut out[start..];
    put_u32(h, OFF_TOTAL, total as u32);
    put_u32(h, OFF_MAGIC, RECORD_MAGIC_V1);
    put_u32(h, OFF_QUEUE_ID, msg.queue_id);
    put_u32(h, OFF_FLAG, msg.flag);
    put_u64(h, OFF_QUEUE_OFFSET, at.queue_offset);
    put_u64(h, OFF_PHYS_OFFSET, at.physical_offset);
    put_u32(h, OFF_SYS_FLAG, msg.sys_flag);
    put_u64(h, OFF_BORN_TS, msg.born_timestamp);
    let (ip, port) = match msg.born_host {
        Some(SocketAddr::V4(a)) => (a.ip().to_ipv6_mapped(), a.port()),
        Some(SocketAddr::V6(a)) => (*a.ip(), a.port()),
        None => (Ipv6Addr::UNSPECIFIED, 0),
    };
    h[OFF_BORN_ADDR..OFF_BORN_ADDR + 16].copy_from_slice(&ip.octets());
    h[OFF_BORN_PORT..OFF_BORN_PORT + 2].copy_from_slice(&port.to_le_bytes());
    put_u64(h, OFF_STORE_TS, at.store_timestamp);
    put_u32(h, OFF_RECONSUME, msg.reconsume_times);
    put_u64(h, OFF_PREPARED_TX, msg.prepared_tx_offset);
    let crc = crc32c::crc32c(&h[CRC_START..total]);
    put_u32(h, OFF_CRC, crc);
    total
}

/// Writes a blank record of `len` bytes (at least [`BLANK_RECORD_MIN_LEN`]) at the start of `out`.
/// Only its size and magic are written; the rest is left as the caller has it (zeros).
pub fn encode_blank(out: &mut [u8], len: u32) {
    assert!(
        len as usize >= BLANK_RECORD_MIN_LEN,
        "blank record too short"
    );
    put_u32(out, OFF_TOTAL, len);
    put_u32(out, OFF_MAGIC, BLANK_MAGIC);
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// What the first bytes of a log position hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek {
    /// A record of this many bytes starts here (not yet checked).
    Record(u32),
    /// Padding of this many bytes: the segment ends here.
    Blank(u32),
    /// Zeros: nothing was ever written here.
    Empty,
}

/// Reads the size and magic at the start of `buf` without checking the rest.
pub fn peek(buf: &[u8]) -> Result<Peek, DecodeError> {
    if buf.len() < BLANK_RECORD_MIN_LEN {
        return Err(DecodeError::Truncated {
            need: BLANK_RECORD_MIN_LEN,
            have: buf.len(),
        });
    }
    let total = get_u32(buf, OFF_TOTAL);
    let magic = get_u32(buf, OFF_MAGIC);
    match magic {
        RECORD_MAGIC_V1 => {
            if (total as usize) < MIN_RECORD_LEN || total as usize > limits::MAX_RECORD_LEN {
                Err(DecodeError::BadSize(total))
            } else {
                Ok(Peek::Record(total))
            }
        }
        BLANK_MAGIC if total as usize >= BLANK_RECORD_MIN_LEN => Ok(Peek::Blank(total)),
        BLANK_MAGIC => Err(DecodeError::BadSize(total)),
        0 if total == 0 => Ok(Peek::Empty),
        other => Err(DecodeError::BadMagic(other)),
    }
}

/// A decoded record borrowing from the bytes it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub total_size: u32,
    pub queue_id: u32,
    pub flag: u32,
    pub queue_offset: u64,
    pub physical_offset: u64,
    pub sys_flag: u32,
    pub born_timestamp: u64,
    pub born_host: SocketAddr,
    pub store_timestamp: u64,
    pub reconsume_times: u32,
    pub prepared_tx_offset: u64,
    pub topic: &'a str,
    pub tags: &'a str,
    pub keys: &'a str,
    properties: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// The user properties in stored order (validated when the record was decoded).
    pub fn properties(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let mut rest = self.properties;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let (k, r) = split_str16(rest).ok()?;
            let (v, r) = split_str16(r).ok()?;
            rest = r;
            Some((k, v))
        })
    }

    /// The value of one property.
    pub fn property(&self, name: &str) -> Option<&'a str> {
        self.properties().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// Back to an owned message (the offsets and store time are in the view).
    pub fn to_message(&self) -> Message {
        Message {
            topic: self.topic.to_owned(),
            queue_id: self.queue_id,
            flag: self.flag,
            sys_flag: self.sys_flag,
            born_timestamp: self.born_timestamp,
            born_host: Some(self.born_host),
            reconsume_times: self.reconsume_times,
            prepared_tx_offset: self.prepared_tx_offset,
            tags: self.tags.to_owned(),
            keys: self.keys.to_owned(),
            properties: self
                .properties()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            body: Bytes::copy_from_slice(self.body),
        }
    }
}

fn split_str16(b: &[u8]) -> Result<(&str, &[u8]), DecodeError> {
    if b.len() < 2 {
        return Err(DecodeError::FieldOverrun("properties"));
    }
    let n = get_u16(b, 0) as usize;
    let s = b
        .get(2..2 + n)
        .ok_or(DecodeError::FieldOverrun("properties"))?;
    let s = std::str::from_utf8(s).map_err(|_| DecodeError::Utf8("properties"))?;
    Ok((s, &b[2 + n..]))
}

/// Decodes and fully validates (size, magic, CRC, field bounds, UTF-8) the record at the start
/// of `buf`. Never trust a record that did not come through here.
pub fn decode(buf: &[u8]) -> Result<RecordView<'_>, DecodeError> {
    let total = match peek(buf)? {
        Peek::Record(n) => n as usize,
        Peek::Blank(_) | Peek::Empty => return Err(DecodeError::BadMagic(get_u32(buf, 4))),
    };
    if buf.len() < total {
        return Err(DecodeError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    let r = &buf[..total];
    let stored = get_u32(r, OFF_CRC);
    let computed = crc32c::crc32c(&r[CRC_START..]);
    if stored != computed {
        return Err(DecodeError::Crc { stored, computed });
    }
    let mut pos = FIXED_HEADER_LEN;
    let topic_len = r[pos] as usize;
    pos += 1;
    let topic = take_str(r, &mut pos, topic_len, "topic")?;
    let n = take_len(r, &mut pos, 2, "tags")?;
    let tags = take_str(r, &mut pos, n, "tags")?;
    let n = take_len(r, &mut pos, 2, "keys")?;
    let keys = take_str(r, &mut pos, n, "keys")?;
    let n = take_len(r, &mut pos, 4, "properties")?;
    let properties = take(r, &mut pos, n, "properties")?;
    // Validate the property encoding once, so the iterator never stops early.
    let mut rest = properties;
    while !rest.is_empty() {
        let (_, r1) = split_str16(rest)?;
        let (_, r2) = split_str16(r1)?;
        rest = r2;
    }
    let n = take_len(r, &mut pos, 4, "body")?;
    let body = take(r, &mut pos, n, "body")?;
    if pos != total {
        return Err(DecodeError::FieldOverrun("record end"));
    }
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&r[OFF_BORN_ADDR..OFF_BORN_ADDR + 16]);
    let ip = Ipv6Addr::from(addr);
    let port = get_u16(r, OFF_BORN_PORT);
    let born_host = match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::from((v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    };
    Ok(RecordView {
        total_size: total as u32,
        queue_id: get_u32(r, OFF_QUEUE_ID),
        flag: get_u32(r, OFF_FLAG),
        queue_offset: get_u64(r, OFF_QUEUE_OFFSET),
        physical_offset: get_u64(r, OFF_PHYS_OFFSET),
        sys_flag: get_u32(r, OFF_SYS_FLAG),
        born_timestamp: get_u64(r, OFF_BORN_TS),
        born_host,
        store_timestamp: get_u64(r, OFF_STORE_TS),
        reconsume_times: get_u32(r, OFF_RECONSUME),
        prepared_tx_offset: get_u64(r, OFF_PREPARED_TX),
        topic,
        tags,
        keys,
        properties,
        body,
    })
}

fn take_len(
    r: &[u8],
    pos: &mut usize,
    width: usize,
    field: &'static str,
) -> Result<usize, DecodeError> {
    let b = take(r, pos, width, field)?;
    Ok(match width {
        2 => u16::from_le_bytes([b[0], b[1]]) as usize,
        _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
    })
}

fn take<'a>(
    r: &'a [u8],
    pos: &mut usize,
    n: usize,
    field: &'static str,
) -> Result<&'a [u8], DecodeError> {
    let end = pos.checked_add(n).ok_or(DecodeError::FieldOverrun(field))?;
    let s = r.get(*pos..end).ok_or(DecodeError::FieldOverrun(field))?;
    *pos = end;
    Ok(s)
}

fn take_str<'a>(
    r: &'a [u8],
    pos: &mut usize,
    n: usize,
    field: &'static str,
) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(take(r, pos, n, field)?).map_err(|_| DecodeError::Utf8(field))
}

/// The tag hash kept in the ConsumeQueue: lets the broker filter by tag without reading bodies.
/// FNV-1a, 64 bits: stable across versions and hosts (the client re-checks the exact string).
pub fn tag_hash(tags: &str) -> u64 {
    if tags.is_empty() {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tags.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Message {
        Message {
            topic: "Orders_1".into(),
            queue_id: 3,
            flag: 7,
            sys_flag: sys_flag::TRANSACTION_PREPARED,
            born_timestamp: 1_700_000_000_123,
            born_host: Some("10.1.2.3:4567".parse().unwrap()),
            reconsume_times: 2,
            prepared_tx_offset: 99,
            tags: "TagA".into(),
            keys: "order-1 order-2".into(),
            properties: vec![
                ("UNIQ_KEY".into(), "abc".into()),
                ("x".into(), String::new()),
            ],
            body: Bytes::from_static(b"hello world"),
        }
    }

    const AT: Placement = Placement {
        queue_offset: 42,
        physical_offset: 4096,
        store_timestamp: 1_700_000_000_999,
    };

    #[test]
    fn round_trip_keeps_every_field() {
        let m = sample();
        let mut out = vec![0xEE; 5]; // encoding appends after existing bytes
        let n = encode_into(&m, AT, &mut out);
        assert_eq!(n, encoded_len(&m).unwrap());
        let v = decode(&out[5..]).unwrap();
        assert_eq!(v.total_size as usize, n);
        assert_eq!(v.queue_offset, 42);
        assert_eq!(v.physical_offset, 4096);
        assert_eq!(v.store_timestamp, AT.store_timestamp);
        assert_eq!(v.property("UNIQ_KEY"), Some("abc"));
        assert_eq!(v.property("x"), Some(""));
        assert_eq!(v.to_message(), m);
    }

    #[test]
    fn ipv6_and_missing_host_round_trip() {
        let mut m = sample();
        m.born_host = Some("[2001:db8::1]:9".parse().unwrap());
        let mut out = Vec::new();
        encode_into(&m, AT, &mut out);
        assert_eq!(decode(&out).unwrap().born_host, m.born_host.unwrap());
        m.born_host = None;
        out.clear();
        encode_into(&m, AT, &mut out);
        assert_eq!(decode(&out).unwrap().born_host.port(), 0);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut out = Vec::new();
        let n = encode_into(&sample(), AT, &mut out);
        for i in 0..n {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn truncated_record_is_an_error() {
        let mut out = Vec::new();
        let n = encode_into(&sample(), AT, &mut out);
        assert_eq!(
            decode(&out[..n - 1]),
            Err(DecodeError::Truncated {
                need: n,
                have: n - 1
            })
        );
    }

    #[test]
    fn peek_tells_blank_empty_and_records() {
        let mut b = vec![0u8; 64];
        assert_eq!(peek(&b), Ok(Peek::Empty));
        encode_blank(&mut b, 64);
        assert_eq!(peek(&b), Ok(Peek::Blank(64)));
        assert!(decode(&b).is_err());
        b[4..8].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        assert_eq!(peek(&b), Err(DecodeError::BadMagic(0x1234_5678)));
    }

    #[test]
    fn bounds_are_enforced_with_clear_errors() {
        let mut m = sample();
        m.body = vec![0; limits::MAX_MESSAGE_SIZE + 1].into();
        assert!(matches!(
            encoded_len(&m),
            Err(EncodeError::BodyTooLarge { .. })
        ));
        let mut m = sample();
        m.topic = "bad topic".into();
        assert!(matches!(encoded_len(&m), Err(EncodeError::Topic(_))));
        let mut m = sample();
        m.properties.push((String::new(), "v".into()));
        assert_eq!(encoded_len(&m), Err(EncodeError::EmptyPropertyName));
    }

    #[test]
    fn tag_hash_is_stable() {
        assert_eq!(tag_hash(""), 0);
        assert_eq!(tag_hash("TagA"), tag_hash("TagA"));
        assert_ne!(tag_hash("TagA"), tag_hash("TagB"));
        // Pinned: the hash is stored on disk, so it must never change.
        assert_eq!(tag_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
