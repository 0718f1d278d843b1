//! Where a consumer keeps its offsets: on the broker (clustering: shared by the group) or in
//! a local file (broadcasting: each consumer has its own progress, as RocketMQ's
//! `LocalFileOffsetStore`). The file format is pure and tested: one `topic broker queue
//! offset` line per queue, written whole to a temporary file and renamed over the old one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::client::Client;
use crate::error::{ClientError, Result};
use crate::route::MessageQueue;

/// Queues one offsets file may hold; a longer file is refused as corrupt.
pub const MAX_LOCAL_OFFSET_QUEUES: usize = 1_000_000;

/// Offsets by queue, as one file holds them.
pub fn encode(offsets: &BTreeMap<MessageQueue, u64>) -> String {
    let mut s = String::new();
    for (mq, o) in offsets {
        s.push_str(&format!(
            "{} {} {} {o}\n",
            mq.topic, mq.broker_name, mq.queue_id
        ));
    }
    s
}

/// Parses a file written by [`encode`]; any malformed line is an error (never a guess).
pub fn decode(text: &str) -> std::result::Result<BTreeMap<MessageQueue, u64>, String> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let parsed = match f.as_slice() {
            [t, b, q, o] if !t.is_empty() && !b.is_empty() => q
                .parse::<u32>()
                .ok()
                .zip(o.parse::<u64>().ok())
                .map(|(q, o)| (MessageQueue::new(*t, *b, q), o)),
            _ => None,
        };
        let Some((mq, o)) = parsed else {
            return Err(format!(
                "line {}: expected `topic broker queue offset`",
                n + 1
            ));
        };
        if out.len() >= MAX_LOCAL_OFFSET_QUEUES {
            return Err(format!("more than {MAX_LOCAL_OFFSET_QUEUES} queues"));
        }
        out.insert(mq, o);
    }
    Ok(out)
}

/// The offsets of a broadcasting consumer, kept in `path`.
#[derive(Debug)]
pub struct LocalOffsets {
    path: PathBuf,
    offsets: BTreeMap<MessageQueue, u64>,
}

impl LocalOffsets {
    /// Loads `path` (a missing file is an empty store; a corrupt one is an error).
    pub fn open(path: &Path) -> Result<LocalOffsets> {
        let offsets = match std::fs::read_to_string(path) {
            Ok(t) => decode(&t).map_err(|e| {
                ClientError::InvalidArgument(format!("offsets file {}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(ClientError::InvalidArgument(format!(
                    "offsets file {}: {e}",
                    path.display()
                )))
            }
        };
        Ok(LocalOffsets {
            path: path.to_owned(),
            offsets,
        })
    }

    pub fn get(&self, mq: &MessageQueue) -> Option<u64> {
        self.offsets.get(mq).copied()
    }

    /// Records an offset and rewrites the file (temporary file, then rename).
    pub fn set(&mut self, mq: &MessageQueue, offset: u64) -> Result<()> {
        self.offsets.insert(mq.clone(), offset);
        let io = |e: std::io::Error| {
            ClientError::InvalidArgument(format!("offsets file {}: {e}", self.path.display()))
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, encode(&self.offsets)).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

/// The offsets of a consumer: the broker's (clustering) or a local file (broadcasting).
pub(crate) enum OffsetStore {
    Broker,
    Local(Mutex<LocalOffsets>),
}

impl OffsetStore {
    pub(crate) async fn read(
        &self,
        client: &Client,
        group: &str,
        mq: &MessageQueue,
    ) -> Result<Option<u64>> {
        match self {
            OffsetStore::Broker => client.query_consumer_offset(group, mq).await,
            OffsetStore::Local(l) => Ok(l.lock().expect("offsets lock").get(mq)),
        }
    }

    pub(crate) async fn commit(
        &self,
        client: &Client,
        group: &str,
        mq: &MessageQueue,
        offset: u64,
    ) -> Result<()> {
        match self {
            OffsetStore::Broker => client.update_consumer_offset(group, mq, offset).await,
            OffsetStore::Local(l) => l.lock().expect("offsets lock").set(mq, offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_through_the_file() {
        let dir = std::env::temp_dir().join(format!("orbitmq-offsets-{}", std::process::id()));
        let path = dir.join("g").join("offsets");
        let mq = MessageQueue::new("T", "broker-a", 3);
        let mut l = LocalOffsets::open(&path).unwrap();
        assert_eq!(l.get(&mq), None);
        l.set(&mq, 42).unwrap();
        l.set(&MessageQueue::new("T", "broker-b", 0), 7).unwrap();
        let again = LocalOffsets::open(&path).unwrap();
        assert_eq!(again.get(&mq), Some(42));
        assert_eq!(again.offsets.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_errors() {
        assert!(decode("T b 1 2\n\n").is_ok());
        for bad in ["T b x 2", "T b 1", "T b 1 2 3", " b 1 2", "T b 1 -2"] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
