//! Topic configs of a broker (RocketMQ's TopicConfig): queue counts and permissions, persisted
//! in `<data-dir>/topics.conf`, shared by the shards of one process.
//!
//! Writes are rare (topic creation); reads are on every send. Shards keep their own copy and
//! refresh it when the table's epoch moves, so the hot path reads one atomic, never a lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use orbitmq_proto::limits::{self, MAX_QUEUES_PER_TOPIC, MAX_TOPICS_PER_BROKER};
use orbitmq_proto::sys::RETRY_DLQ_QUEUES;
use thiserror::Error;

/// RocketMQ's `defaultTopicQueueNums`.
pub const DEFAULT_TOPIC_QUEUE_NUMS: u32 = 8;
/// Permission bits, as RocketMQ.
pub const PERM_READ: u32 = 4;
pub const PERM_WRITE: u32 = 2;
pub const PERM_RW: u32 = PERM_READ | PERM_WRITE;
/// Retry and dead-letter topics a broker makes for consumer groups at most: heartbeats name
/// groups, and a name is no reason to fill the table, so a quarter of it stays for topics an
/// admin or a first send creates.
pub const MAX_TOPICS_FOR_GROUP_TOPICS: usize = MAX_TOPICS_PER_BROKER / 4 * 3;
// A broker never holds more topics than its registration may carry.
const _: () = assert!(MAX_TOPICS_PER_BROKER <= crate::nameserver::routes::MAX_REGISTERED_TOPICS);
const TOPICS_FILE: &str = "topics.conf";
const TOPICS_HEADER: &str =
    "# orbitmq topics: name read_queues write_queues perm [auto (created by a first send)]";
/// The fifth word of an auto-created topic's line.
const AUTO_MARK: &str = "auto";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    pub name: String,
    pub read_queues: u32,
    pub write_queues: u32,
    pub perm: u32,
    /// Made by a first send (autoCreateTopicEnable) rather than by an admin: the name server
    /// then spreads it over every auto-creating broker (see `routes`).
    pub auto_created: bool,
}

impl TopicConfig {
    pub fn new(name: &str, queues: u32) -> TopicConfig {
        TopicConfig {
            name: name.to_owned(),
            read_queues: queues,
            write_queues: queues,
            perm: PERM_RW,
            auto_created: false,
        }
    }

    /// Queues that exist (the larger of the read and write counts).
    pub fn queues(&self) -> u32 {
        self.read_queues.max(self.write_queues)
    }
}

#[derive(Debug, Error)]
pub enum TopicError {
    #[error(transparent)]
    Name(#[from] limits::TopicError),
    #[error("queue count {0} is out of range 1..={MAX_QUEUES_PER_TOPIC}")]
    QueueCount(u32),
    #[error("{path}:{line}: {why}")]
    Parse {
        path: String,
        line: usize,
        why: String,
    },
    #[error("the broker has {0} retry and dead-letter topics, its limit: no more are made")]
    TooMany(usize),
    #[error("the broker holds {0} topics, its limit: delete unused topics or create this one on another broker")]
    Full(usize),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The topic table of one broker process.
pub struct Topics {
    path: PathBuf,
    table: Mutex<BTreeMap<String, TopicConfig>>,
    epoch: AtomicU64,
    /// Woken on every change, so the broker registers with the name servers at once.
    changed: tokio::sync::Notify,
    pub auto_create: bool,
    pub default_queues: u32,
    /// [`MAX_TOPICS_PER_BROKER`] and [`MAX_TOPICS_FOR_GROUP_TOPICS`]; smaller in unit tests.
    limits: TableLimits,
}

#[derive(Clone, Copy, Debug)]
struct TableLimits {
    all: usize,
    group_topics: usize,
}

impl TableLimits {
    const BROKER: TableLimits = TableLimits {
        all: MAX_TOPICS_PER_BROKER,
        group_topics: MAX_TOPICS_FOR_GROUP_TOPICS,
    };
}

impl Topics {
    /// Loads `<data_dir>/topics.conf` (missing: empty).
    pub fn load(
        data_dir: &Path,
        auto_create: bool,
        default_queues: u32,
    ) -> Result<Topics, TopicError> {
        let path = data_dir.join(TOPICS_FILE);
        let mut table = BTreeMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    let line = line.trim();
                    if line.is_empty() || line.starts_with('#') {
                        continue;
                    }
                    let bad = |why: &str| TopicError::Parse {
                        path: path.display().to_string(),
                        line: i + 1,
                        why: why.to_owned(),
                    };
                    let w: Vec<&str> = line.split_whitespace().collect();
                    let auto = w.len() == 5 && w[4] == AUTO_MARK;
                    if w.len() != 4 && !auto {
                        return Err(bad("expected: name read_queues write_queues perm [auto]"));
                    }
                    let num = |s: &str| s.parse::<u32>().map_err(|_| bad("not a number"));
                    let t = TopicConfig {
                        name: w[0].to_owned(),
                        read_queues: num(w[1])?,
                        write_queues: num(w[2])?,
                        perm: num(w[3])?,
                        auto_created: auto,
                    };
                    limits::validate_topic(&t.name).map_err(|e| bad(&e.to_string()))?;
                    table.insert(t.name.clone(), t);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(TopicError::Io {
                    path: path.display().to_string(),
                    source: e,
                })
            }
        }
        Ok(Topics {
            path,
            table: Mutex::new(table),
            epoch: AtomicU64::new(1),
            changed: tokio::sync::Notify::new(),
            auto_create,
            default_queues,
            limits: TableLimits::BROKER,
        })
    }

    /// Refuses a new topic when the table is full (updates of existing ones always pass).
    fn room_for(
        &self,
        table: &BTreeMap<String, TopicConfig>,
        name: &str,
    ) -> Result<(), TopicError> {
        if table.len() >= self.limits.all && !table.contains_key(name) {
            return Err(TopicError::Full(self.limits.all));
        }
        Ok(())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> BTreeMap<String, TopicConfig> {
        self.table.lock().expect("topic table lock").clone()
    }

    pub fn get(&self, name: &str) -> Option<TopicConfig> {
        self.table
            .lock()
            .expect("topic table lock")
            .get(name)
            .cloned()
    }

    /// Waits for the next change of the table (a change before the call also counts once).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// Creates or updates a topic and persists the table.
    pub fn upsert(&self, t: TopicConfig) -> Result<TopicConfig, TopicError> {
        limits::validate_topic(&t.name)?;
        for n in [t.read_queues, t.write_queues] {
            if n == 0 || n > MAX_QUEUES_PER_TOPIC {
                return Err(TopicError::QueueCount(n));
            }
        }
        let mut table = self.table.lock().expect("topic table lock");
        self.room_for(&table, &t.name)?;
        table.insert(t.name.clone(), t.clone());
        self.persist(&table)?;
        self.bump();
        Ok(t)
    }

    /// Makes the table exactly `topics` (a slave following its master's); persists and
    /// reports a change only when there is one. Invalid entries are refused, all or nothing.
    pub fn replace_all(&self, topics: Vec<TopicConfig>) -> Result<bool, TopicError> {
        if topics.len() > self.limits.all {
            return Err(TopicError::Full(self.limits.all));
        }
        let mut next = BTreeMap::new();
        for t in topics {
            limits::validate_topic(&t.name)?;
            for n in [t.read_queues, t.write_queues] {
                if n == 0 || n > MAX_QUEUES_PER_TOPIC {
                    return Err(TopicError::QueueCount(n));
                }
            }
            next.insert(t.name.clone(), t);
        }
        let mut table = self.table.lock().expect("topic table lock");
        if *table == next {
            return Ok(false);
        }
        self.persist(&next)?;
        *table = next;
        self.bump();
        Ok(true)
    }

    /// An admin create or update: a count or perm of 0 keeps the current value (or, for a new
    /// topic, takes `defaultTopicQueueNums` and read-write).
    pub fn create_or_update(
        &self,
        name: &str,
        read_queues: u32,
        write_queues: u32,
        perm: u32,
    ) -> Result<TopicConfig, TopicError> {
        let base = self
            .get(name)
            .unwrap_or_else(|| TopicConfig::new(name, self.default_queues));
        let pick = |v: u32, old: u32| if v == 0 { old } else { v };
        self.upsert(TopicConfig {
            name: name.to_owned(),
            read_queues: pick(read_queues, base.read_queues),
            write_queues: pick(write_queues, base.write_queues),
            perm: pick(perm & PERM_RW, base.perm),
            auto_created: false,
        })
    }

    /// Deletes a topic from the table; returns whether it existed. Its stored messages stay
    /// until retention removes them.
    pub fn delete(&self, name: &str) -> Result<bool, TopicError> {
        let mut table = self.table.lock().expect("topic table lock");
        if table.remove(name).is_none() {
            return Ok(false);
        }
        self.persist(&table)?;
        self.bump();
        Ok(true)
    }

    /// The topic's config, creating it with the default queue count when auto-creation is on
    /// (a group's retry or dead-letter topic with its one queue, as [`Topics::ensure_group_topic`]).
    pub fn get_or_auto_create(&self, name: &str) -> Result<Option<TopicConfig>, TopicError> {
        if let Some(t) = self.get(name) {
            return Ok(Some(t));
        }
        if !self.auto_create {
            return Ok(None);
        }
        if orbitmq_proto::sys::group_of(name).is_some() {
            return self.ensure_group_topic(name).map(Some);
        }
        limits::validate_topic(name)?;
        let mut table = self.table.lock().expect("topic table lock");
        if let Some(t) = table.get(name) {
            return Ok(Some(t.clone()));
        }
        self.room_for(&table, name)?;
        let mut t = TopicConfig::new(name, self.default_queues);
        t.auto_created = true;
        table.insert(name.to_owned(), t.clone());
        self.persist(&table)?;
        self.bump();
        tracing::info!(
            topic = name,
            queues = self.default_queues,
            "topic auto-created"
        );
        Ok(Some(t))
    }

    /// A consumer group's retry (`%RETRY%<group>`) or dead-letter (`%DLQ%<group>`) topic:
    /// created read-write with [`RETRY_DLQ_QUEUES`] queue if the broker lacks it (whatever
    /// `autoCreateTopicEnable` says: RocketMQ makes them for every consumer group), as an admin
    /// topic so the name server routes it to exactly the brokers that have it. A change wakes
    /// the registrar, so the route reaches the name servers at once.
    pub fn ensure_group_topic(&self, name: &str) -> Result<TopicConfig, TopicError> {
        if let Some(t) = self.get(name) {
            return Ok(t);
        }
        limits::validate_topic(name)?;
        let mut table = self.table.lock().expect("topic table lock");
        if let Some(t) = table.get(name) {
            return Ok(t.clone());
        }
        // Counted apart: other topics never use up the group topics' share.
        let groups = table
            .keys()
            .filter(|t| orbitmq_proto::sys::group_of(t).is_some())
            .count();
        if groups >= self.limits.group_topics {
            return Err(TopicError::TooMany(self.limits.group_topics));
        }
        self.room_for(&table, name)?;
        let t = TopicConfig::new(name, RETRY_DLQ_QUEUES);
        table.insert(name.to_owned(), t.clone());
        self.persist(&table)?;
        self.bump();
        tracing::info!(topic = name, "retry or dead-letter topic created");
        Ok(t)
    }

    fn persist(&self, table: &BTreeMap<String, TopicConfig>) -> Result<(), TopicError> {
        let mut s = format!("{TOPICS_HEADER}\n");
        for t in table.values() {
            let mark = if t.auto_created { " auto" } else { "" };
            s.push_str(&format!(
                "{} {} {} {}{mark}\n",
                t.name, t.read_queues, t.write_queues, t.perm
            ));
        }
        crate::log::fsutil::write_atomically(&self.path, s.as_bytes()).map_err(|e| TopicError::Io {
            path: self.path.display().to_string(),
            source: e,
        })
    }
}

/// A shard's cached view of the topic table.
pub struct TopicView {
    epoch: u64,
    table: BTreeMap<String, TopicConfig>,
}

impl TopicView {
    pub fn new(topics: &Topics) -> TopicView {
        TopicView {
            epoch: topics.epoch(),
            table: topics.snapshot(),
        }
    }

    /// The topic's config, from the cache while the table is unchanged.
    pub fn get(&mut self, topics: &Topics, name: &str) -> Result<Option<TopicConfig>, TopicError> {
        let epoch = topics.epoch();
        if epoch != self.epoch {
            self.table = topics.snapshot();
            self.epoch = epoch;
        }
        if let Some(t) = self.table.get(name) {
            return Ok(Some(t.clone()));
        }
        let t = topics.get_or_auto_create(name)?;
        if let Some(t) = &t {
            self.table.insert(name.to_owned(), t.clone());
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_persist_and_auto_create() {
        let d = tempfile::tempdir().unwrap();
        let t = Topics::load(d.path(), true, 8).unwrap();
        let c = t.get_or_auto_create("Orders").unwrap().unwrap();
        assert_eq!((c.read_queues, c.write_queues, c.perm), (8, 8, PERM_RW));
        assert!(c.auto_created);
        t.upsert(TopicConfig::new("Big", 16)).unwrap();
        assert!(t.upsert(TopicConfig::new("Zero", 0)).is_err());
        assert!(t.get_or_auto_create("bad topic").is_err());
        let t2 = Topics::load(d.path(), false, 8).unwrap();
        assert_eq!(t2.get("Big").unwrap().queues(), 16);
        assert_eq!(t2.get("Orders"), Some(c));
        assert_eq!(t2.get_or_auto_create("Nope").unwrap(), None);
        assert!(!t2.create_or_update("Orders", 0, 0, 0).unwrap().auto_created);
        let u = t2.create_or_update("Big", 0, 32, 0).unwrap();
        assert_eq!((u.read_queues, u.write_queues, u.perm), (16, 32, PERM_RW));
        let n = t2.create_or_update("New", 0, 0, PERM_READ).unwrap();
        assert_eq!((n.read_queues, n.write_queues, n.perm), (8, 8, PERM_READ));
        assert!(t2.delete("Big").unwrap());
        assert!(!t2.delete("Big").unwrap());
        assert_eq!(Topics::load(d.path(), false, 8).unwrap().get("Big"), None);
    }

    #[test]
    fn views_refresh_when_the_epoch_moves() {
        let d = tempfile::tempdir().unwrap();
        let t = Topics::load(d.path(), false, 8).unwrap();
        let mut v = TopicView::new(&t);
        assert_eq!(v.get(&t, "A").unwrap(), None);
        t.upsert(TopicConfig::new("A", 4)).unwrap();
        assert_eq!(v.get(&t, "A").unwrap().unwrap().queues(), 4);
    }

    #[test]
    fn group_topics_have_one_queue_and_are_made_once() {
        let d = tempfile::tempdir().unwrap();
        let t = Topics::load(d.path(), false, 8).unwrap();
        let epoch = t.epoch();
        let r = t.ensure_group_topic("%RETRY%g1").unwrap();
        assert_eq!((r.read_queues, r.write_queues, r.perm), (1, 1, PERM_RW));
        assert!(!r.auto_created);
        assert_eq!(
            t.epoch(),
            epoch + 1,
            "a creation bumps the epoch (registration)"
        );
        assert_eq!(t.ensure_group_topic("%RETRY%g1").unwrap(), r);
        assert_eq!(t.epoch(), epoch + 1, "an existing topic is not touched");
        assert!(t.ensure_group_topic("%RETRY%bad group").is_err());
        // Auto-creation gives a group topic its one queue, not defaultTopicQueueNums.
        let a = Topics::load(d.path(), true, 8).unwrap();
        assert_eq!(a.get("%RETRY%g1"), Some(r), "persisted");
        let dlq = a.get_or_auto_create("%DLQ%g2").unwrap().unwrap();
        assert_eq!((dlq.queues(), dlq.auto_created), (1, false));
        assert_eq!(a.get_or_auto_create("Orders").unwrap().unwrap().queues(), 8);
    }

    #[test]
    fn a_full_table_refuses_new_topics_but_updates_existing_ones() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Topics::load(d.path(), true, 8).unwrap();
        t.limits = TableLimits {
            all: 4,
            group_topics: 2,
        };
        t.upsert(TopicConfig::new("A", 4)).unwrap();
        t.get_or_auto_create("B").unwrap().unwrap();
        // Group topics are counted apart: other topics never use up their share.
        t.ensure_group_topic("%RETRY%g1").unwrap();
        t.ensure_group_topic("%DLQ%g1").unwrap();
        // And they stop at their share.
        let e = t.ensure_group_topic("%RETRY%g2").unwrap_err();
        assert!(matches!(e, TopicError::TooMany(2)), "{e}");
        assert_eq!(t.ensure_group_topic("%RETRY%g1").unwrap().queues(), 1);
        // The table is full: no new topic of any kind, updates of existing ones pass.
        for e in [
            t.upsert(TopicConfig::new("D", 4)).unwrap_err(),
            t.get_or_auto_create("D").unwrap_err(),
            t.create_or_update("D", 0, 0, 0).unwrap_err(),
        ] {
            assert!(matches!(e, TopicError::Full(4)), "{e}");
            assert!(e.to_string().contains("holds 4 topics"), "{e}");
        }
        assert_eq!(t.create_or_update("A", 0, 6, 0).unwrap().write_queues, 6);
        assert_eq!(t.get_or_auto_create("B").unwrap().unwrap().queues(), 8);
        assert!(t.delete("A").unwrap());
        t.upsert(TopicConfig::new("D", 4)).unwrap();
        let names: Vec<String> = Topics::load(d.path(), true, 8)
            .unwrap()
            .snapshot()
            .into_keys()
            .collect();
        assert_eq!(names, ["%DLQ%g1", "%RETRY%g1", "B", "D"]);
    }

    #[test]
    fn a_malformed_line_names_its_line() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(TOPICS_FILE), "A 1 1 6\nB x 1 6\n").unwrap();
        let e = Topics::load(d.path(), true, 8).err().unwrap().to_string();
        assert!(e.contains(":2:"), "{e}");
    }
}
