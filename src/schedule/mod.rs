//! Delayed and timed delivery, RocketMQ's way: a message sent with a delay level waits in the
//! schedule topic (queue `level - 1`), one with a delivery time waits in the timer topic, both
//! on the shard of its target queue; a per-shard service moves due messages to their real
//! topic and queue. The retry topic's backoff rides on the same delay levels.
//!
//! This module is the pure part: the level table, the rewrite of a message on its way in
//! ([`divert`]) and on its way out ([`deliverable`]), and the timing wheel ([`wheel`]). The
//! service that reads and appends is [`service`].

pub mod service;
pub mod wheel;

use orbitmq_proto::record::{Message, RecordView};
use orbitmq_proto::sys::{property, SCHEDULE_TOPIC, TIMER_TOPIC};
use thiserror::Error;

/// RocketMQ's default `messageDelayLevel`.
pub const DEFAULT_DELAY_LEVELS: &str = "1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h";
/// Most delay levels a broker may configure (a level is a schedule queue).
pub const MAX_DELAY_LEVELS: usize = 64;
/// Longest single delay level.
pub const MAX_LEVEL_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;
/// RocketMQ 5's default `timerMaxDelaySec`: 3 days.
pub const DEFAULT_TIMER_MAX_DELAY_SEC: u64 = 3 * 24 * 3600;
/// Largest `timerMaxDelaySec` accepted (the wheel has one slot per second of it).
pub const MAX_TIMER_MAX_DELAY_SEC: u64 = 30 * 24 * 3600;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("invalid messageDelayLevel: {0}")]
    Levels(String),
    #[error("property {name} = {value:?} is not a whole number")]
    BadProperty { name: &'static str, value: String },
    #[error("a message carries either a delay level or a delivery time, not both")]
    Both,
    #[error("delivery time is {delay_ms} ms away, over timerMaxDelaySec ({max_ms} ms)")]
    TooFar { delay_ms: u64, max_ms: u64 },
    #[error("topic {0} is internal to the broker")]
    Internal(String),
    #[error("a waiting message lacks its {0} property")]
    Missing(&'static str),
}

/// The broker's schedule settings (`messageDelayLevel`, `timerMaxDelaySec`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Delay of level `i + 1`, in ms.
    pub levels_ms: Vec<u64>,
    pub timer_max_delay_ms: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            levels_ms: parse_levels(DEFAULT_DELAY_LEVELS).expect("the default levels parse"),
            timer_max_delay_ms: DEFAULT_TIMER_MAX_DELAY_SEC * 1000,
        }
    }
}

/// Parses `messageDelayLevel`: space-separated durations with a unit `ms`, `s`, `m`, `h`
/// or `d` (RocketMQ's units, plus `ms` for tests and tight backoffs).
pub fn parse_levels(s: &str) -> Result<Vec<u64>, ScheduleError> {
    let bad = |why: String| ScheduleError::Levels(why);
    let mut out = Vec::new();
    for item in s.split_whitespace() {
        let split = item
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| bad(format!("{item:?} has no unit (ms, s, m, h, d)")))?;
        let (n, unit) = item.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| bad(format!("{item:?} does not start with a number")))?;
        let scale = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(bad(format!(
                    "{item:?}: unknown unit {unit:?} (ms, s, m, h, d)"
                )))
            }
        };
        let ms = n
            .checked_mul(scale)
            .filter(|ms| (1..=MAX_LEVEL_DELAY_MS).contains(ms))
            .ok_or_else(|| bad(format!("{item:?} must be from 1 ms to 30 days")))?;
        out.push(ms);
    }
    if out.is_empty() || out.len() > MAX_DELAY_LEVELS {
        return Err(bad(format!("expected 1..={MAX_DELAY_LEVELS} levels")));
    }
    Ok(out)
}

impl ScheduleConfig {
    /// Number of levels (the highest level).
    pub fn levels(&self) -> u32 {
        self.levels_ms.len() as u32
    }

    /// Delay of a level 1..=levels (clamped into range).
    pub fn delay_ms(&self, level: u32) -> u64 {
        self.levels_ms[self.clamp(level) as usize - 1]
    }

    /// A level out of range is the top level, as RocketMQ does (0 stays 0: no delay).
    pub fn clamp(&self, level: u32) -> u32 {
        level.min(self.levels())
    }
}

/// What [`divert`] did to a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diverted {
    /// Not delayed: stored in its own topic.
    No,
    /// Waits in the schedule topic for this level.
    Level(u32),
    /// Waits in the timer topic until this time (ms since the epoch).
    Timer(u64),
}

fn num_property(msg: &Message, name: &'static str) -> Result<Option<u64>, ScheduleError> {
    match msg.properties.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| ScheduleError::BadProperty {
                name,
                value: v.clone(),
            }),
    }
}

fn remove_property(msg: &mut Message, name: &str) {
    msg.properties.retain(|(k, _)| k != name);
}

fn set_property(msg: &mut Message, name: &str, value: String) {
    remove_property(msg, name);
    msg.properties.push((name.to_owned(), value));
}

/// Rewrites a message sent with a delay level (`DELAY`) or a delivery time
/// (`TIMER_DELIVER_MS`) so that it waits: its real topic and queue go into properties and it
/// is stored in the schedule or timer topic. A level above the top is the top level; level 0
/// and a delivery time already past are delivered at once (the property is dropped).
pub fn divert(
    msg: &mut Message,
    cfg: &ScheduleConfig,
    now_ms: u64,
) -> Result<Diverted, ScheduleError> {
    if orbitmq_proto::sys::is_internal_topic(&msg.topic) {
        return Err(ScheduleError::Internal(msg.topic.clone()));
    }
    let level = num_property(msg, property::DELAY)?;
    let at = num_property(msg, property::TIMER_DELIVER_MS)?;
    let (topic, queue_id, what) = match (level, at) {
        (Some(_), Some(_)) => return Err(ScheduleError::Both),
        (None, None) => return Ok(Diverted::No),
        (Some(0), None) => {
            remove_property(msg, property::DELAY);
            return Ok(Diverted::No);
        }
        (Some(l), None) => {
            let l = cfg.clamp(l.min(u32::MAX as u64) as u32);
            set_property(msg, property::DELAY, l.to_string());
            (SCHEDULE_TOPIC, l - 1, Diverted::Level(l))
        }
        (None, Some(at)) if at <= now_ms => {
            remove_property(msg, property::TIMER_DELIVER_MS);
            return Ok(Diverted::No);
        }
        (None, Some(at)) => {
            let delay_ms = at - now_ms;
            if delay_ms > cfg.timer_max_delay_ms {
                return Err(ScheduleError::TooFar {
                    delay_ms,
                    max_ms: cfg.timer_max_delay_ms,
                });
            }
            (TIMER_TOPIC, 0, Diverted::Timer(at))
        }
    };
    let real_topic = std::mem::take(&mut msg.topic);
    set_property(msg, property::REAL_TOPIC, real_topic);
    set_property(msg, property::REAL_QID, msg.queue_id.to_string());
    msg.topic = topic.to_owned();
    msg.queue_id = queue_id;
    Ok(what)
}

/// The message a waiting record becomes when it is due: its real topic and queue, the same
/// keys, tags, unique key, body and other properties; the delay properties replaced by
/// `DELAY_APPLIED_MS`.
pub fn deliverable(rec: &RecordView<'_>, applied_ms: u64) -> Result<Message, ScheduleError> {
    let mut m = rec.to_message();
    let real_topic = rec
        .property(property::REAL_TOPIC)
        .ok_or(ScheduleError::Missing(property::REAL_TOPIC))?;
    let qid =
        num_property(&m, property::REAL_QID)?.ok_or(ScheduleError::Missing(property::REAL_QID))?;
    m.topic = real_topic.to_owned();
    m.queue_id = qid.min(u32::MAX as u64) as u32;
    for p in [
        property::REAL_TOPIC,
        property::REAL_QID,
        property::DELAY,
        property::TIMER_DELIVER_MS,
    ] {
        remove_property(&mut m, p);
    }
    set_property(&mut m, property::DELAY_APPLIED_MS, applied_ms.to_string());
    Ok(m)
}

/// The ConsumeQueue tag field of a stored record: the tag hash, except in the timer topic,
/// where it is the delivery time (so the wheel is rebuilt from the queue without reading
/// bodies). `deliver_ms` looks up the property; it is called only for the timer topic, so
/// the append path does not scan every message's properties.
pub fn cq_tag<'a>(topic: &str, tags: &str, deliver_ms: impl FnOnce() -> Option<&'a str>) -> u64 {
    if topic == TIMER_TOPIC {
        if let Some(at) = deliver_ms().and_then(|v| v.trim().parse().ok()) {
            return at;
        }
    }
    orbitmq_proto::record::tag_hash(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(props: &[(&str, &str)]) -> Message {
        Message {
            topic: "Orders".into(),
            queue_id: 5,
            tags: "T".into(),
            keys: "k1".into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: b"hello".to_vec().into(),
            ..Message::default()
        }
    }

    #[test]
    fn levels_parse_with_units() {
        assert_eq!(
            parse_levels("1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h")
                .unwrap()
                .len(),
            18
        );
        assert_eq!(
            parse_levels("100ms 2s 1m 1h 1d").unwrap(),
            vec![100, 2000, 60_000, 3_600_000, 86_400_000]
        );
        for bad in ["", "5", "5x", "s", "0s", "99d", "-1s"] {
            assert!(parse_levels(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn a_delay_level_waits_in_the_schedule_topic_and_comes_back_whole() {
        let cfg = ScheduleConfig::default();
        let mut m = msg(&[("UNIQ_KEY", "U1"), ("DELAY", "3"), ("a", "b")]);
        assert_eq!(divert(&mut m, &cfg, 1000), Ok(Diverted::Level(3)));
        assert_eq!((m.topic.as_str(), m.queue_id), (SCHEDULE_TOPIC, 2));
        let mut out = Vec::new();
        let at = orbitmq_proto::record::Placement {
            queue_offset: 0,
            physical_offset: 0,
            store_timestamp: 1000,
        };
        orbitmq_proto::record::encode_into(&m, at, &mut out);
        let rec = orbitmq_proto::record::decode(&out).unwrap();
        let back = deliverable(&rec, 10_000).unwrap();
        assert_eq!((back.topic.as_str(), back.queue_id), ("Orders", 5));
        assert_eq!((back.tags.as_str(), back.keys.as_str()), ("T", "k1"));
        assert_eq!(back.body, &b"hello"[..]);
        assert_eq!(
            back.properties,
            vec![
                ("UNIQ_KEY".to_string(), "U1".to_string()),
                ("a".to_string(), "b".to_string()),
                ("DELAY_APPLIED_MS".to_string(), "10000".to_string()),
            ]
        );
    }

    #[test]
    fn out_of_range_levels_clamp_and_zero_is_no_delay() {
        let cfg = ScheduleConfig::default();
        let mut m = msg(&[("DELAY", "99")]);
        assert_eq!(divert(&mut m, &cfg, 0), Ok(Diverted::Level(18)));
        assert_eq!(m.queue_id, 17);
        let mut m = msg(&[("DELAY", "0")]);
        assert_eq!(divert(&mut m, &cfg, 0), Ok(Diverted::No));
        assert_eq!((m.topic.as_str(), m.properties.len()), ("Orders", 0));
        let mut m = msg(&[("DELAY", "x")]);
        assert!(matches!(
            divert(&mut m, &cfg, 0),
            Err(ScheduleError::BadProperty { .. })
        ));
    }

    #[test]
    fn delivery_times() {
        let cfg = ScheduleConfig::default();
        let mut m = msg(&[("TIMER_DELIVER_MS", "5000")]);
        assert_eq!(divert(&mut m, &cfg, 1000), Ok(Diverted::Timer(5000)));
        assert_eq!((m.topic.as_str(), m.queue_id), (TIMER_TOPIC, 0));
        let mut past = msg(&[("TIMER_DELIVER_MS", "5000")]);
        assert_eq!(divert(&mut past, &cfg, 5000), Ok(Diverted::No));
        assert!(past.properties.is_empty());
        let far = (DEFAULT_TIMER_MAX_DELAY_SEC * 1000 + 2).to_string();
        let mut m = msg(&[("TIMER_DELIVER_MS", &far)]);
        assert!(matches!(
            divert(&mut m, &cfg, 1),
            Err(ScheduleError::TooFar { .. })
        ));
        let mut m = msg(&[("TIMER_DELIVER_MS", "5000"), ("DELAY", "1")]);
        assert_eq!(divert(&mut m, &cfg, 0), Err(ScheduleError::Both));
        let mut m = msg(&[]);
        m.topic = SCHEDULE_TOPIC.into();
        assert!(matches!(
            divert(&mut m, &cfg, 0),
            Err(ScheduleError::Internal(_))
        ));
        assert_eq!(cq_tag(TIMER_TOPIC, "T", || Some("77")), 77);
        assert_eq!(
            cq_tag("Orders", "T", || panic!(
                "looked up outside the timer topic"
            )),
            orbitmq_proto::record::tag_hash("T")
        );
    }
}
