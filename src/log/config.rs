//! Settings of one shard's store, with RocketMQ's names and defaults where RocketMQ has them.

use std::path::PathBuf;
use std::time::Duration;

use super::retention::RetentionPolicy;

/// RocketMQ's `mappedFileSizeCommitLog`: 1 GiB segments.
pub const DEFAULT_SEGMENT_SIZE: u64 = 1 << 30;
/// The smallest segment accepted. A record or batch must fit one segment (with room for the
/// blank record), so small segments also lower the largest message a store takes.
pub const MIN_SEGMENT_SIZE: u64 = 64 * 1024;
/// O_DIRECT alignment used for every CommitLog write (the block size of ext4/xfs and NVMe).
pub const IO_ALIGN: u64 = 4096;
/// RocketMQ's `flushIntervalCommitLog`: fdatasync period under ASYNC_FLUSH.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// How often ConsumeQueue entries and the checkpoint are persisted (RocketMQ: 1 s).
pub const DEFAULT_CQ_FLUSH_INTERVAL: Duration = Duration::from_millis(1000);
/// RocketMQ's `mappedFileSizeConsumeQueue` / 20: entries per ConsumeQueue file.
pub const DEFAULT_CQ_ENTRIES_PER_FILE: u64 = 300_000;
/// ConsumeQueue files a store keeps open unless its shard set says otherwise.
pub const DEFAULT_MAX_OPEN_CQ_FILES: usize = 4096;
/// Memory for recently written log kept for consumers that keep up (charged by buffer: a
/// batch's buffer is sized for the largest recent batch, so it may hold fewer log bytes).
pub const DEFAULT_TAIL_CACHE_BYTES: usize = 64 << 20;
/// Most bytes gathered into one group-commit write. Larger batches amortize the write (and
/// its wait for durability under SYNC_FLUSH) better; this bounds a shard's staging memory.
pub const MAX_WRITE_BYTES: usize = 8 << 20;

/// How an append becomes durable before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushMode {
    /// Acknowledge after the O_DIRECT write, made with O_DSYNC (durable when it completes, as
    /// a write followed by fdatasync): survives power loss.
    Sync,
    /// Acknowledge after the O_DIRECT write completes; fdatasync every flush interval:
    /// survives a crash of the broker, a power loss can take the last interval.
    Async,
}

impl std::str::FromStr for FlushMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "SYNC_FLUSH" | "SYNC" => Ok(FlushMode::Sync),
            "ASYNC_FLUSH" | "ASYNC" => Ok(FlushMode::Async),
            _ => Err(format!(
                "unknown flush mode {s:?}: expected SYNC_FLUSH or ASYNC_FLUSH (sync|async)"
            )),
        }
    }
}

/// Settings of one shard's store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The shard's own directory (`<data-dir>/shard-<k>`).
    pub dir: PathBuf,
    pub segment_size: u64,
    pub flush: FlushMode,
    pub flush_interval: Duration,
    pub cq_flush_interval: Duration,
    pub cq_entries_per_file: u64,
    pub tail_cache_bytes: usize,
    /// Write zeros over a new segment before use, so later writes overwrite allocated blocks
    /// (a durable write then has no extent metadata to commit: measured ~1.5x faster here).
    /// Costs one extra write of each segment, so it is on by default only under SYNC_FLUSH.
    pub prewrite_segments: bool,
    pub retention: RetentionPolicy,
    /// ConsumeQueue files kept open between persist rounds (file descriptors; a shard set
    /// sizes it from `ulimit -n`).
    pub max_open_cq_files: usize,
    /// The key index (`messageIndexEnable`, on by default); `None`: no index, no queries by key.
    pub index: Option<IndexConfig>,
}

/// Shape of the key index's files (RocketMQ's `maxHashSlotNum`, `maxIndexNum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexConfig {
    pub hash_slots: u32,
    pub max_entries: u32,
}

impl Default for IndexConfig {
    fn default() -> IndexConfig {
        IndexConfig {
            hash_slots: super::indexfile::DEFAULT_MAX_HASH_SLOTS,
            max_entries: super::indexfile::DEFAULT_MAX_INDEX_NUM,
        }
    }
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>, flush: FlushMode) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            flush,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            cq_flush_interval: DEFAULT_CQ_FLUSH_INTERVAL,
            cq_entries_per_file: DEFAULT_CQ_ENTRIES_PER_FILE,
            tail_cache_bytes: DEFAULT_TAIL_CACHE_BYTES,
            prewrite_segments: flush == FlushMode::Sync,
            retention: RetentionPolicy::default(),
            max_open_cq_files: DEFAULT_MAX_OPEN_CQ_FILES,
            index: Some(IndexConfig::default()),
        }
    }

    /// Checks the bounds that would otherwise surface as odd failures deep in the log.
    pub fn validate(&self) -> Result<(), String> {
        if self.segment_size < MIN_SEGMENT_SIZE || !self.segment_size.is_multiple_of(IO_ALIGN) {
            return Err(format!(
                "segment size {} must be a multiple of {IO_ALIGN} and at least {MIN_SEGMENT_SIZE}",
                self.segment_size
            ));
        }
        if self.cq_entries_per_file == 0 {
            return Err("ConsumeQueue entries per file must be positive".into());
        }
        if let Some(ix) = &self.index {
            use super::indexfile::{MAX_HASH_SLOTS, MAX_INDEX_NUM};
            if !(1..=MAX_HASH_SLOTS).contains(&ix.hash_slots) {
                return Err(format!(
                    "maxHashSlotNum {} must be 1..={MAX_HASH_SLOTS}",
                    ix.hash_slots
                ));
            }
            if !(1..=MAX_INDEX_NUM).contains(&ix.max_entries) {
                return Err(format!(
                    "maxIndexNum {} must be 1..={MAX_INDEX_NUM}",
                    ix.max_entries
                ));
            }
            // Every new file allocates its slots: more slots than entries is memory for
            // nothing, each time a small file rolls.
            if ix.hash_slots > ix.max_entries {
                return Err(format!(
                    "maxHashSlotNum {} must not exceed maxIndexNum {}",
                    ix.hash_slots, ix.max_entries
                ));
            }
        }
        Ok(())
    }
}
