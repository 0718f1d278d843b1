//! One shard's store: the I/O shell around the CommitLog staging, the ConsumeQueues, the tail
//! cache and consumer offsets. Runs inside one glommio executor; nothing here is shared across
//! threads. State sits in one `RefCell` that is never borrowed across an `.await`.
//!
//! Tasks of a store:
//! - the committer takes staged batches one at a time, writes each with one O_DIRECT write,
//!   then dispatches its ConsumeQueue entries and acknowledges its appends. One write is in
//!   flight at a time, so the acknowledged (written) offset is always a contiguous watermark.
//!   Under SYNC_FLUSH segments are open with O_DSYNC: a write completes once durable, as if an
//!   fdatasync had followed it.
//! - the flusher (ASYNC_FLUSH) fdatasyncs written segments every flush interval.
//! - the persister writes ConsumeQueue entries below the synced offset and the checkpoint.
//! - segment preparation creates the next segment ahead of need.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use glommio::io::{BufferedFile, DmaFile, OpenOptions};
use orbitmq_proto::record::{self, Message, Placement, BLANK_RECORD_MIN_LEN};
use tracing::{debug, error, info, warn};

use super::commitlog::{align_down, align_up, Batch, DispatchEntry, Need, Staging};
use super::config::{FlushMode, StoreConfig, IO_ALIGN, MAX_WRITE_BYTES};
use super::cq::{self, ConsumeQueue, CqEntry, CQ_ENTRY_LEN};
use super::error::{gio, Result, StoreError};
use super::fsutil;
use super::indexfile::{self, HashKey, KeyIndex, OpenIndex, Walk};
use super::offsets::ConsumerOffsets;
use super::recovery::{self, Checkpoint, Scanned, Stop};
use super::retention::{self, SegmentInfo};
use crate::sync::{Event, Gate, Signal};

/// After a failed segment preparation (e.g. a full disk), appends needing the segment fail
/// at once for this long before preparation is tried again.
const PREPARE_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Bytes read per I/O when scanning the log at recovery: at least one maximal record.
const RECOVERY_READ_BYTES: usize = MAX_WRITE_BYTES + IO_ALIGN as usize;
/// Zeros written per I/O when pre-writing a segment.
const PREWRITE_CHUNK: usize = 1 << 20;
/// Pre-writing the next segment pauses this many times each chunk's write time while the
/// active segment is less than [`PREWRITE_PACED_FILL_PERCENT`] full: at full speed the zeros took the
/// disk from the group commits (sync writes p50 6.3 ms against 1.3 ms while it ran).
const PREWRITE_PACE: u32 = 2;
/// Past this fill of the active segment (in percent) the next one is pre-written at full
/// speed, so that appends do not wait for it.
const PREWRITE_PACED_FILL_PERCENT: u64 = 50;
/// Batches up to this size are copied into a buffer of their size for the tail cache when
/// their own is over twice as large; larger ones are cached in their buffer.
const CACHE_COPY_MAX_BYTES: usize = 64 * 1024;
/// Bytes read at once when a reader misses the tail cache: the records after the one asked
/// for (other queues' interleaved with its own) are likely the next ones asked for.
const READ_AHEAD_BYTES: u64 = 256 * 1024;
/// How often retention runs (RocketMQ's `cleanResourceInterval`, 10 s).
const RETENTION_INTERVAL: Duration = Duration::from_secs(10);
/// Consumer offsets are persisted this often (RocketMQ: 5 s).
const OFFSETS_PERSIST_INTERVAL: Duration = Duration::from_secs(5);
/// Most records one read returns.
pub const MAX_READ_MESSAGES: usize = 1024;

const COMMITLOG_DIR: &str = "commitlog";
const CQ_DIR: &str = "consumequeue";
const INDEX_DIR: &str = "index";
const CHECKPOINT_FILE: &str = "checkpoint";
const OFFSETS_FILE: &str = "consumer-offsets";

/// Where an appended message was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    pub physical_offset: u64,
    pub queue_offset: u64,
    pub store_timestamp: u64,
    pub size: u32,
}

/// How a read by queue offset went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadStatus {
    Found,
    /// Nothing at or after the offset yet (a long poll parks on this).
    NoNewMessage,
    /// The offset is below the queue's minimum (retention removed it): start at `min_offset`.
    OffsetTooSmall,
    /// The offset is past the queue's end: start at `max_offset`.
    OffsetOverflow,
    /// The queue has never had a message on this shard.
    NoSuchQueue,
}

#[derive(Clone, Debug)]
pub struct ReadResult {
    pub status: ReadStatus,
    /// Whole stored records, CRC-checked, in queue order.
    pub records: Vec<Bytes>,
    /// Where the next read of this queue should start.
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub next_offset: u64,
    pub written_offset: u64,
    pub synced_offset: u64,
    pub min_offset: u64,
    pub segments: usize,
    pub queues: usize,
}

impl State {
    /// Whether appends may be placed: not after an I/O error fenced the log, nor once
    /// closing.
    fn writable(&self) -> Result<()> {
        if let Some(f) = &self.fenced {
            return Err(StoreError::Fenced(f.clone()));
        }
        if self.closing {
            return Err(StoreError::Closed);
        }
        Ok(())
    }
}

/// Recently written log bytes, by their first log offset, for readers at the tail.
struct TailCache {
    /// Log bytes by first offset, with the memory each holds (its buffer's capacity).
    chunks: BTreeMap<u64, (Bytes, usize)>,
    bytes: usize,
    cap: usize,
}

impl TailCache {
    /// Caches `b` (log bytes from `at`), charged `held` bytes: the memory it keeps alive.
    fn insert(&mut self, at: u64, b: Bytes, held: usize) {
        if self.cap == 0 || b.is_empty() {
            return;
        }
        self.bytes += held;
        self.chunks.insert(at, (b, held));
        while self.bytes > self.cap {
            match self.chunks.pop_first() {
                Some((_, (_, old))) => self.bytes -= old,
                None => break,
            }
        }
    }

    fn get(&self, phys: u64, size: u32) -> Option<Bytes> {
        let (start, (b, _)) = self.chunks.range(..=phys).next_back()?;
        let from = usize::try_from(phys - start).ok()?;
        let to = from.checked_add(size as usize)?;
        (to <= b.len()).then(|| b.slice(from..to))
    }

    /// Cached bytes from `phys` on, at most `max` (more only if the first chunk is larger),
    /// over consecutive chunks; `None` unless a chunk holds `phys`.
    fn tail_from(&self, phys: u64, max: usize) -> Option<Bytes> {
        let (start, (b, _)) = self.chunks.range(..=phys).next_back()?;
        let from = usize::try_from(phys - start).ok()?;
        if from >= b.len() {
            return None;
        }
        let first = b.slice(from..);
        let mut end = phys + first.len() as u64;
        let mut more = Vec::new();
        let mut len = first.len();
        for (at, (c, _)) in self.chunks.range(end..) {
            if *at != end || len + c.len() > max {
                break;
            }
            more.push(c.clone());
            len += c.len();
            end += c.len() as u64;
        }
        if more.is_empty() {
            return Some(first);
        }
        let mut out = bytes::BytesMut::with_capacity(len);
        out.extend_from_slice(&first);
        for c in more {
            out.extend_from_slice(&c);
        }
        Some(out.freeze())
    }

    fn drop_below(&mut self, phys: u64) {
        while let Some((&start, (b, held))) = self.chunks.first_key_value() {
            if start + b.len() as u64 > phys {
                break;
            }
            self.bytes -= held;
            self.chunks.pop_first();
        }
    }
}

struct State {
    staging: Staging,
    segments: BTreeMap<u64, Rc<DmaFile>>,
    preparing: Option<Rc<Signal<()>>>,
    /// When and why the last segment preparation failed (`DiskFull` on a full disk).
    prepare_failed: Option<(Instant, StoreError)>,
    /// All log bytes below this are written: acknowledged under ASYNC_FLUSH.
    written: u64,
    /// All log bytes below this are durable (O_DSYNC writes under SYNC_FLUSH, the flusher's
    /// fdatasync under ASYNC_FLUSH).
    synced: u64,
    /// Segments written since their last fdatasync.
    dirty: BTreeSet<u64>,
    fenced: Option<String>,
    closing: bool,
    topics: HashMap<Rc<str>, BTreeMap<u32, ConsumeQueue>>,
    cache: TailCache,
    last_store_ts: u64,
    offsets: ConsumerOffsets,
    /// The last record in the written log (log offset, size, store time), when known: a
    /// slave shows it to its master, which checks that its own log has the same record there.
    last_record: Option<(u64, u32, u64)>,
    /// The key index; `None` when `messageIndexEnable` is off.
    index: Option<KeyIndex>,
}

/// See [`Store::background_work`].
struct BackgroundWork(Rc<Inner>);

impl Drop for BackgroundWork {
    fn drop(&mut self) {
        let n = &self.0.background;
        n.set(n.get() - 1);
        self.0.background_done.notify();
    }
}

struct Inner {
    cfg: StoreConfig,
    st: RefCell<State>,
    /// Something was staged, or the store is closing.
    staged: Event,
    /// A batch finished or a segment was prepared: appenders waiting for room look again.
    room: Event,
    /// New ConsumeQueue entries are readable (long polls wake on this).
    dispatched: Event,
    committer_done: Rc<Signal<()>>,
    /// The outcome of close(), for every caller.
    closed: Rc<Signal<Result<()>>>,
    stop: Cell<bool>,
    /// Background work under way (a flush round, a persist, retention, a segment being
    /// prepared): close() waits for it, so nothing of this store runs once it returns.
    background: Cell<usize>,
    background_done: Event,
    /// One fdatasync round at a time, so close() waits for the flusher's round.
    flushing: Gate,
    /// One ConsumeQueue persist and checkpoint at a time.
    persisting: Gate,
    /// One write of the consumer offsets at a time.
    saving_offsets: Gate,
    /// The checkpoint as this process last wrote it.
    last_checkpoint: RefCell<Option<Vec<u8>>>,
    /// close() wrote the final checkpoint: no later persist may overwrite it.
    sealed: Cell<bool>,
    /// Retention keeps the segments from this log offset on (messages waiting in the
    /// schedule and timer topics); `u64::MAX`: no hold.
    hold_from: Cell<u64>,
    /// ConsumeQueue files kept open between persist rounds (opening and closing thousands of
    /// them every second cost a fifth of a busy shard's CPU), with the round each was last
    /// written in.
    cq_open: RefCell<HashMap<PathBuf, (BufferedFile, u64)>>,
    persist_round: Cell<u64>,
    /// ConsumeQueue entries were written (to the page cache) since the file system was last
    /// synced: a checkpoint must not vouch for them before it is.
    cq_unsynced: Cell<bool>,
    /// The open key index files, by first log offset, kept open until sealed.
    index_files: RefCell<HashMap<u64, BufferedFile>>,
    /// One query by key at a time.
    querying: Gate,
}

/// A shard's store. Cheap to clone; all clones share one state on one thread.
#[derive(Clone)]
pub struct Store {
    inner: Rc<Inner>,
}

use orbitmq_proto::now_ms;

/// The hour of day in the host's time zone (`deleteWhen` is a local hour, as RocketMQ's).
fn local_hour() -> u8 {
    let t = (now_ms() / 1000) as libc::time_t;
    // SAFETY: localtime_r reads `t` and writes the zeroed struct we own.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        tm.tm_hour as u8
    }
}

/// Used share of the file system holding `dir`.
fn disk_used_ratio(dir: &Path) -> Option<f64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads the NUL-terminated path and writes the zeroed struct we own.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        st
    };
    let total = st.f_blocks as f64;
    (total > 0.0).then(|| 1.0 - st.f_bavail as f64 / total)
}

fn segment_name(base: u64) -> String {
    format!("{base:020}")
}

fn parse_name(name: &str) -> Option<u64> {
    (name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |e| StoreError::io(context, e)
}

/// Lists `dir`'s files named by 20-digit offsets, ascending.
fn list_numbered(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(format!("listing {}", dir.display()), e)),
    };
    for ent in rd {
        let ent = ent.map_err(io_err(format!("listing {}", dir.display())))?;
        if let Some(n) = ent.file_name().to_str().and_then(parse_name) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fsutil::sync_dir(dir).map_err(io_err(format!("syncing directory {}", dir.display())))
}

/// Makes a new queue's ConsumeQueue directory and its first, empty, file in the store at
/// `shard_dir`, so that the first persist round after the queue's first sends finds them: on
/// an ext4 that has freed many inodes lately, making one takes milliseconds of CPU (its
/// free-inode search skips recently deleted ones), 17% of a 1,000-topic run's broker time
/// when made then. Returns whether the directory was new; an existing one is left as it is
/// (its files say where the queue starts). A queue whose entries start above 0 without a
/// directory (deleted from outside after retention removed its early log) would get an empty
/// file 0 before its real first file: the next start then takes the files for a hole and
/// rebuilds the queue from the log, losing nothing.
pub fn prepare_queue_files(shard_dir: &Path, topic: &str, queue_id: u32) -> std::io::Result<bool> {
    let dir = cq::queue_dir(&shard_dir.join(CQ_DIR), topic, queue_id);
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(cq::file_name(0)))?;
    Ok(true)
}

/// Opens (creating) a ConsumeQueue file for writing. Its directory is made only when the open
/// finds none (a queue's first persist, unless its topic's creation made it): mkdir can take
/// milliseconds on a busy ext4, so it runs off the shard's thread.
async fn open_cq_file(dir: &Path, path: &Path) -> Result<BufferedFile> {
    let open = || async {
        OpenOptions::new()
            .write(true)
            .create(true)
            .buffered_open(path)
            .await
            .map_err(std::io::Error::from)
    };
    let failed = |e| StoreError::io(format!("opening {}", path.display()), e);
    match open().await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let d = dir.to_path_buf();
            fsutil::off_shard(move || std::fs::create_dir_all(&d))
                .await
                .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
            open().await.map_err(failed)
        }
        r => r.map_err(failed),
    }
}

/// [`sync_dir`] off the shard's thread (see [`fsutil::off_shard`]).
async fn sync_dir_off_shard(dir: PathBuf) -> Result<()> {
    fsutil::off_shard(move || sync_dir(&dir)).await
}

/// Every record below the returned log offset is in the persisted ConsumeQueues: the
/// durable offset, or the first record of an entry not persisted yet if lower.
fn index_floor(st: &State, durable: u64) -> u64 {
    st.topics
        .values()
        .flat_map(|qs| qs.values())
        .filter_map(|q| q.mem_entry(q.persisted).map(|e| e.phys))
        .min()
        .unwrap_or(durable)
        .min(durable)
}

/// A failed segment preparation as appends see it: `DiskFull` when the disk (or a quota) is
/// full, the error itself otherwise (an EIO is not a full disk).
fn disk_full_or(e: StoreError) -> StoreError {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    match &e {
        StoreError::Io { source, .. }
            if matches!(source.kind(), StorageFull | QuotaExceeded)
                || matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
        {
            StoreError::DiskFull(e.to_string())
        }
        _ => e,
    }
}

/// Reads the ConsumeQueue entry at byte `pos` of the file `path`.
async fn read_entry_at(path: &Path, pos: u64) -> Result<CqEntry> {
    let f = BufferedFile::open(path)
        .await
        .map_err(|e| gio("opening a ConsumeQueue file", e))?;
    let r = f.read_at(pos, CQ_ENTRY_LEN as usize).await;
    let _ = f.close().await;
    let r = r.map_err(|e| gio("reading a ConsumeQueue file", e))?;
    if r.len() < CQ_ENTRY_LEN as usize {
        return Err(StoreError::io(
            format!("reading {} at {pos}", path.display()),
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        ));
    }
    Ok(CqEntry::decode(&r))
}

/// Reads `cq`'s entry at queue offset `offset` from the file `path` that holds it.
async fn read_file_entry(path: &Path, cq: &ConsumeQueue, offset: u64) -> Result<CqEntry> {
    read_entry_at(path, cq.locate(offset).1).await
}

/// Whether pre-writing segment `base` may pause between chunks when the next append goes at
/// log offset `next`: while the segment before it is less than [`PREWRITE_PACED_FILL_PERCENT`]
/// full (a segment further ahead counts as the emptiest), never once appends need it.
fn prewrite_paced(next: u64, base: u64, seg_size: u64) -> bool {
    let Some(room) = base.checked_sub(next).filter(|r| *r > 0) else {
        return false;
    };
    let filled = seg_size.saturating_sub(room);
    filled.saturating_mul(100) < seg_size.saturating_mul(PREWRITE_PACED_FILL_PERCENT)
}

/// How a CommitLog write ended: the error text fences the log.
type WriteResult = std::result::Result<(), String>;

/// Writes zeros over `[from, to)` of `file` (aligned offsets), a chunk per I/O. While `pace()`
/// says there is time, each chunk is followed by a pause of [`PREWRITE_PACE`] times its write.
/// Gives up (`Ok(false)`) once `stop()` says so.
async fn write_zeros(
    file: &DmaFile,
    from: u64,
    to: u64,
    pace: impl Fn() -> bool,
    stop: impl Fn() -> bool,
) -> glommio::Result<bool, ()> {
    let mut at = from;
    while at < to {
        if stop() {
            return Ok(false);
        }
        let n = ((to - at) as usize).min(PREWRITE_CHUNK);
        let mut buf = file.alloc_dma_buffer(n);
        buf.as_bytes_mut().fill(0);
        let started = Instant::now();
        file.write_at(buf, at).await?;
        at += n as u64;
        if pace() {
            glommio::timer::sleep(started.elapsed() * PREWRITE_PACE).await;
        }
    }
    Ok(true)
}

/// How a recovery scan ended.
struct ScanEnd {
    /// Where the log ends: the next record goes here.
    cut: u64,
    /// The scan ended at zeros (or past the last segment), not at damage.
    at_zeros: bool,
}

impl Store {
    fn log_dir(&self) -> PathBuf {
        self.inner.cfg.dir.join(COMMITLOG_DIR)
    }

    fn cq_root(&self) -> PathBuf {
        self.inner.cfg.dir.join(CQ_DIR)
    }

    fn index_dir(&self) -> PathBuf {
        self.inner.cfg.dir.join(INDEX_DIR)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// Opens (recovering) or creates the store in `cfg.dir` and starts its tasks.
    /// Must run inside a glommio executor.
    pub async fn open(cfg: StoreConfig) -> Result<Store> {
        cfg.validate().map_err(StoreError::Config)?;
        let log_dir = cfg.dir.join(COMMITLOG_DIR);
        let cq_root = cfg.dir.join(CQ_DIR);
        let index_dir = cfg.index.map(|_| cfg.dir.join(INDEX_DIR));
        for d in [&cfg.dir, &log_dir, &cq_root].into_iter().chain(&index_dir) {
            std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        let segments: Vec<PathBuf> = list_numbered(&log_dir)?
            .into_iter()
            .map(|b| log_dir.join(segment_name(b)))
            .collect();
        crate::dma::probe_device(&cfg.dir, &segments)
            .await
            .map_err(io_err(format!(
                "probing the device of {}",
                cfg.dir.display()
            )))?;
        let offsets = ConsumerOffsets::load(&cfg.dir.join(OFFSETS_FILE))
            .map_err(|e| StoreError::Config(format!("consumer offsets: {e}")))?;
        let cache = TailCache {
            chunks: BTreeMap::new(),
            bytes: 0,
            cap: cfg.tail_cache_bytes,
        };
        let seg_size = cfg.segment_size;
        let store = Store {
            inner: Rc::new(Inner {
                st: RefCell::new(State {
                    staging: Staging::new(seg_size, 0, Vec::new(), 0),
                    segments: BTreeMap::new(),
                    preparing: None,
                    prepare_failed: None,
                    written: 0,
                    synced: 0,
                    dirty: BTreeSet::new(),
                    fenced: None,
                    closing: false,
                    topics: HashMap::new(),
                    cache,
                    last_store_ts: 0,
                    last_record: None,
                    offsets,
                    index: match cfg.index {
                        Some(c) => Some(KeyIndex::new(
                            HashKey::random().map_err(|e| {
                                StoreError::io("making the key index's hash key", e)
                            })?,
                            c.hash_slots,
                            c.max_entries,
                        )),
                        None => None,
                    },
                }),
                cfg,
                staged: Event::default(),
                room: Event::default(),
                dispatched: Event::default(),
                committer_done: Signal::new(),
                closed: Signal::new(),
                stop: Cell::new(false),
                background: Cell::new(0),
                background_done: Event::default(),
                flushing: Gate::default(),
                persisting: Gate::default(),
                saving_offsets: Gate::default(),
                last_checkpoint: RefCell::new(None),
                sealed: Cell::new(false),
                hold_from: Cell::new(u64::MAX),
                cq_open: RefCell::new(HashMap::new()),
                persist_round: Cell::new(0),
                cq_unsynced: Cell::new(false),
                index_files: RefCell::new(HashMap::new()),
                querying: Gate::default(),
            }),
        };
        store.recover().await?;
        store.spawn_tasks();
        Ok(store)
    }

    // ---------------------------------------------------------------- recovery

    async fn recover(&self) -> Result<()> {
        let cfg = &self.inner.cfg;
        let seg_size = cfg.segment_size;
        let log_dir = self.log_dir();
        let mut bases = list_numbered(&log_dir)?;
        if let Some(bad) = bases.iter().find(|b| *b % seg_size != 0) {
            return Err(StoreError::Config(format!(
                "segment {} is not a multiple of the segment size {seg_size}: was the data \
                 directory created with another mappedFileSizeCommitLog?",
                segment_name(*bad)
            )));
        }
        // A segment prepared here holds zeros only: nothing to zero after the cut.
        let mut prepared_now = None;
        if bases.is_empty() {
            self.prepare_segment(0, false).await?;
            bases.push(0);
            prepared_now = Some(0);
        }
        for b in &bases {
            let f = self.open_segment(*b).await?;
            // Segments are made at full size and never resized: another length means the
            // directory was made with another segment size, and offsets would map to the
            // wrong files (appends past the file's end would grow it silently).
            let len = f
                .file_size()
                .await
                .map_err(|e| gio("reading a segment's size", e))?;
            if len != seg_size {
                return Err(StoreError::Config(format!(
                    "segment {} is {len} bytes, not the segment size {seg_size}: was the data \
                     directory created with another mappedFileSizeCommitLog?",
                    segment_name(*b)
                )));
            }
            self.inner.st.borrow_mut().segments.insert(*b, f);
        }
        let log_min = bases[0];
        let last_base = *bases.last().expect("one segment");

        // ConsumeQueues as persisted, and where the rescan must start.
        let checkpoint = std::fs::read(cfg.dir.join(CHECKPOINT_FILE))
            .ok()
            .and_then(|b| Checkpoint::decode(&b));
        let mut scan_from = checkpoint.as_ref().map_or(log_min, |c| c.scan_from);
        let loaded = self.load_consume_queues().await?;
        if let Some(c) = &checkpoint {
            for (topic, qid, count) in &c.queues {
                let have = loaded.get(&(topic.clone(), *qid));
                let point = match have {
                    Some((n, _)) if n >= count => continue,
                    Some((_, Some(end))) => *end,
                    _ => log_min,
                };
                warn!(
                    topic,
                    queue = qid,
                    "ConsumeQueue shorter than its checkpoint: rebuilding"
                );
                scan_from = scan_from.min(point);
            }
        }
        // The key index is derived data too: the rescan starts no later than what it covers.
        if let Some(covered) = self.load_key_index(log_min).await? {
            scan_from = scan_from.min(covered);
        }
        let scan_from = scan_from.clamp(log_min, last_base + seg_size);
        // Re-check the whole segment holding the last indexed byte: the checkpoint says what
        // is indexed, not that those bytes are still whole, and a damaged or torn last record
        // must be cut rather than served as corrupt. Its records also restore the store clock.
        let mut scan_from = bases
            .iter()
            .rev()
            .copied()
            .find(|b| *b < scan_from)
            .unwrap_or(log_min)
            .min(scan_from);

        // Scan the log from there, re-dispatching idempotently by queue offset.
        let end = loop {
            match self.scan_log(&bases, scan_from).await? {
                Ok(r) => break r,
                Err(gap_at) if scan_from > log_min => {
                    warn!(gap_at, "ConsumeQueue gap found: rescanning the whole log");
                    scan_from = log_min;
                }
                Err(gap_at) => {
                    return Err(StoreError::Config(format!(
                        "ConsumeQueue offsets have a gap at log offset {gap_at} that the log cannot fill"
                    )))
                }
            }
        };
        let cut = end.cut;
        self.truncate_consume_queues(cut).await?;
        self.cut_key_index(cut).await?;

        // Make the cut the end: drop later segments, zero stale bytes after it.
        let active = cut - cut % seg_size;
        for b in bases.iter().filter(|b| **b > active) {
            warn!(segment = %segment_name(*b), "removing segment past the recovered end");
            let f = self.inner.st.borrow_mut().segments.remove(b);
            if let Some(f) = f {
                let _ = f.close_rc().await;
            }
            std::fs::remove_file(log_dir.join(segment_name(*b)))
                .map_err(io_err(format!("removing segment {b}")))?;
        }
        // A removed segment that came back after a power loss would put its stale records
        // back past the end that appends continue from.
        if bases.iter().any(|b| *b > active) {
            sync_dir(&log_dir)?;
        }
        if !self.inner.st.borrow().segments.contains_key(&active) {
            self.prepare_segment(active, false).await?;
            let f = self.open_segment(active).await?;
            self.inner.st.borrow_mut().segments.insert(active, f);
            prepared_now = Some(active);
        }
        // Records past the checkpoint may come from writes of a process that died before its
        // fdatasync (ASYNC_FLUSH): sync the rescanned segments before the recovered end counts
        // as synced, so no ConsumeQueue entry is persisted past the durable log.
        let rescanned: Vec<Rc<DmaFile>> = {
            let st = self.inner.st.borrow();
            let first = scan_from - scan_from % seg_size;
            st.segments
                .range(first..=active)
                .map(|(_, f)| f.clone())
                .collect()
        };
        for f in rescanned {
            f.fdatasync()
                .await
                .map_err(|e| gio("syncing the CommitLog at recovery", e))?;
        }
        let fresh = prepared_now == Some(active);
        // After a clean close nothing was ever written past the end; after a crash, records
        // of unsynced writes (or stale ones) may lie anywhere past the cut in this segment,
        // valid at their own positions, and must not reappear once appends reach them.
        let clean = end.at_zeros && checkpoint.as_ref().and_then(|c| c.clean_end) == Some(cut);
        let tail = self.zero_after(cut, !clean && !fresh).await?;
        if log_min > 0 {
            // Entries kept in ConsumeQueue files may point below the log's first segment.
            self.advance_queue_minimums(log_min).await?;
        }

        {
            let mut st = self.inner.st.borrow_mut();
            st.staging = Staging::new(seg_size, cut, tail, active);
            st.written = cut;
            st.synced = cut;
            let bounds: HashMap<(String, u32), (u64, u64)> = st
                .topics
                .iter()
                .flat_map(|(t, qs)| {
                    qs.values()
                        .map(move |q| ((t.to_string(), q.queue_id), (q.min_offset, q.max_offset())))
                })
                .collect();
            st.offsets
                .clamp(|t, q| bounds.get(&(t.to_owned(), q)).copied());
        }
        // Persist the rebuilt ConsumeQueues before serving, so the next open starts from here.
        // They are derived data: on a full disk, serve from memory and rebuild next time.
        if let Err(e) = self.persist_consume_queues().await {
            warn!(error = %e, "ConsumeQueues not persisted; the next start rebuilds them from the log");
            // The old checkpoint's clean end would tell the next recovery that nothing lies
            // past it, but appends go past it from now on: without that checkpoint the next
            // start rescans the whole log and zeroes after its cut.
            if checkpoint.as_ref().is_some_and(|c| c.clean_end.is_some()) {
                let p = cfg.dir.join(CHECKPOINT_FILE);
                fsutil::off_shard(move || {
                    std::fs::remove_file(&p)?;
                    fsutil::sync_dir(fsutil::parent_or_cwd(&p))
                })
                .await
                .map_err(io_err(format!(
                    "removing the stale checkpoint of {}",
                    cfg.dir.display()
                )))?;
            }
        }
        info!(dir = %cfg.dir.display(), next_offset = cut, "store recovered");
        Ok(())
    }

    /// Loads every ConsumeQueue's persisted prefix: returns (entries, end of last record).
    async fn load_consume_queues(&self) -> Result<HashMap<(String, u32), (u64, Option<u64>)>> {
        let root = self.cq_root();
        let per_file = self.inner.cfg.cq_entries_per_file;
        let mut out = HashMap::new();
        let rd = std::fs::read_dir(&root).map_err(io_err(format!("listing {}", root.display())))?;
        for t in rd {
            let t = t.map_err(io_err("listing consumequeue".into()))?;
            let Some(topic) = t.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if orbitmq_proto::limits::validate_topic(&topic).is_err() {
                continue;
            }
            let topic: Rc<str> = topic.into();
            for q in std::fs::read_dir(t.path()).map_err(io_err("listing consumequeue".into()))? {
                let q = q.map_err(io_err("listing consumequeue".into()))?;
                let Some(qid) = q.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let mut cq = ConsumeQueue::new(&root, topic.clone(), qid, per_file);
                let files = list_numbered(&cq.dir)?;
                // Keep the contiguous run of files from the first (retention deletes a prefix);
                // files after a hole or a short file would index past lost entries: they go,
                // and the rescan from the end of the run rebuilds them from the log.
                let mut end: Option<u64> = None;
                let mut first = None;
                let mut last_len = 0;
                for (i, base) in files.iter().enumerate() {
                    let contiguous =
                        base.is_multiple_of(per_file) && end.is_none_or(|e| e == *base);
                    if !contiguous {
                        warn!(%topic, queue = qid, file = %segment_name(*base),
                            "ConsumeQueue files are not contiguous: rebuilding from the log");
                        for b in &files[i..] {
                            let p = cq.path_of(*b);
                            std::fs::remove_file(&p)
                                .map_err(io_err(format!("removing {}", p.display())))?;
                        }
                        break;
                    }
                    let p = cq.path_of(*base);
                    let len = std::fs::metadata(&p)
                        .map_err(io_err(format!("stat {}", p.display())))?
                        .len();
                    end = Some(base + (len / CQ_ENTRY_LEN).min(per_file));
                    last_len = len;
                    first.get_or_insert(*base);
                    cq.files.insert(*base, ());
                }
                let mut count = end.unwrap_or(0);
                let min = first.unwrap_or(0);
                let mut last_end = None;
                if let Some((&last_base, _)) = cq.files.last_key_value() {
                    // Entries a power loss left as zeros (the file grew, its data did not
                    // reach the disk) end the persisted prefix: no record has size 0.
                    let valid = |e: &CqEntry| e.size > 0;
                    let p = cq.path_of(last_base);
                    if count > last_base && !valid(&read_file_entry(&p, &cq, count - 1).await?) {
                        let (mut lo, mut hi) = (last_base, count - 1);
                        while lo < hi {
                            let mid = lo + (hi - lo) / 2;
                            if valid(&read_file_entry(&p, &cq, mid).await?) {
                                lo = mid + 1;
                            } else {
                                hi = mid;
                            }
                        }
                        warn!(%topic, queue = qid, from = lo, "zeroed ConsumeQueue entries cut");
                        count = lo;
                    }
                    // Cut a partial last entry (and anything past the kept prefix).
                    let want = (count - last_base) * CQ_ENTRY_LEN;
                    // Most files are whole (a truncate is a journaled metadata write each).
                    if last_len != want {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&p)
                            .and_then(|f| f.set_len(want))
                            .map_err(io_err(format!("truncating {}", p.display())))?;
                    }
                    if count > min {
                        let (base, _) = cq.locate(count - 1);
                        last_end = Some(
                            read_file_entry(&cq.path_of(base), &cq, count - 1)
                                .await?
                                .end(),
                        );
                    }
                }
                cq.min_offset = min;
                cq.persisted = count;
                cq.mem_base = count;
                cq.next_assign = count;
                out.insert((topic.to_string(), qid), (count, last_end));
                self.inner
                    .st
                    .borrow_mut()
                    .topics
                    .entry(topic.clone())
                    .or_default()
                    .insert(qid, cq);
            }
        }
        Ok(out)
    }

    /// Scans from `from` to the end of the log. Ok(where and how it ended), or Err(log
    /// offset) when a record's queue offset is past its ConsumeQueue's end (a gap).
    async fn scan_log(
        &self,
        bases: &[u64],
        from: u64,
    ) -> Result<std::result::Result<ScanEnd, u64>> {
        let seg_size = self.inner.cfg.segment_size;
        let mut pos = from;
        let mut found = Vec::new();
        loop {
            let base = pos - pos % seg_size;
            if !bases.contains(&base) {
                // Past the last segment (or a missing one): nothing follows.
                return Ok(Ok(ScanEnd {
                    cut: pos,
                    at_zeros: true,
                }));
            }
            let file = self.inner.st.borrow().segments[&base].clone();
            let seg_end = base + seg_size;
            let read_at = align_down(pos - base);
            let r = file
                .read_at_aligned(read_at, RECOVERY_READ_BYTES)
                .await
                .map_err(|e| gio("reading CommitLog at recovery", e))?;
            let skip = (pos - base - read_at) as usize;
            let eof = read_at + (r.len() as u64) >= seg_size || r.len() < RECOVERY_READ_BYTES;
            found.clear();
            let (next, stop) = recovery::scan(
                &r[skip.min(r.len())..],
                pos,
                seg_end,
                eof,
                self.index_key().as_ref(),
                &mut found,
            );
            for s in found.drain(..) {
                if let Err(at) = self.redispatch(s) {
                    return Ok(Err(at));
                }
            }
            match stop {
                Stop::NeedMore => pos = next,
                Stop::SegmentEnd => pos = seg_end,
                Stop::Empty => {
                    return Ok(Ok(ScanEnd {
                        cut: next,
                        at_zeros: true,
                    }))
                }
                Stop::Invalid(why) => {
                    warn!(
                        offset = next,
                        why, "cutting the CommitLog at a torn or invalid record"
                    );
                    return Ok(Ok(ScanEnd {
                        cut: next,
                        at_zeros: false,
                    }));
                }
            }
        }
    }

    fn redispatch(&self, s: Scanned) -> std::result::Result<(), u64> {
        let mut st = self.inner.st.borrow_mut();
        st.last_store_ts = st.last_store_ts.max(s.store_timestamp);
        if st.last_record.is_none_or(|(at, _, _)| at < s.phys) {
            st.last_record = Some((s.phys, s.size, s.store_timestamp));
        }
        if let Some(ix) = st.index.as_mut() {
            ix.add_record(&s.key_hashes, s.size, s.phys, s.store_timestamp);
        }
        let root = self.cq_root();
        let per_file = self.inner.cfg.cq_entries_per_file;
        let topic: Rc<str> = match st.topics.get_key_value(s.topic.as_str()) {
            Some((k, _)) => k.clone(),
            None => s.topic.as_str().into(),
        };
        let cq = st
            .topics
            .entry(topic.clone())
            .or_default()
            .entry(s.queue_id)
            .or_insert_with(|| ConsumeQueue::new(&root, topic, s.queue_id, per_file));
        let max = cq.max_offset();
        if s.queue_offset < max {
            return Ok(()); // already indexed
        }
        if s.queue_offset > max {
            if max == 0 && cq.mem.is_empty() && cq.persisted == 0 {
                // A queue whose early entries retention removed: it starts here.
                cq.min_offset = s.queue_offset;
                cq.persisted = s.queue_offset;
                cq.mem_base = s.queue_offset;
            } else {
                return Err(s.phys);
            }
        }
        cq.push(
            s.queue_offset,
            CqEntry {
                phys: s.phys,
                size: s.size,
                tag_hash: s.tag_hash,
            },
        );
        Ok(())
    }

    /// Drops ConsumeQueue entries that point at or past the log's cut, from memory and from
    /// the files. A queue's entries are in log order, so a binary search finds the first.
    async fn truncate_consume_queues(&self, cut: u64) -> Result<()> {
        let queues: Vec<(Rc<str>, u32, u64, u64)> = {
            let mut st = self.inner.st.borrow_mut();
            st.topics
                .iter_mut()
                .flat_map(|(t, qs)| {
                    qs.values_mut().map(move |cq| {
                        // Scanned entries are below the cut; this only guards the invariant.
                        cq.truncate_mem_from_phys(cut);
                        (t.clone(), cq.queue_id, cq.min_offset, cq.persisted)
                    })
                })
                .collect()
        };
        for (t, q, min, persisted) in queues {
            let dir = cq::queue_dir(&self.cq_root(), &t, q);
            let per_file = self.inner.cfg.cq_entries_per_file;
            let locate = |off: u64| {
                let base = off - off % per_file;
                (
                    dir.join(cq::file_name(base)),
                    base,
                    (off - base) * CQ_ENTRY_LEN,
                )
            };
            let (mut lo, mut hi) = (min, persisted);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let (p, _, pos) = locate(mid);
                if read_entry_at(&p, pos).await?.phys < cut {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            if lo == persisted {
                continue;
            }
            warn!(topic = %t, queue = q, from = lo, to = persisted,
                "dropping ConsumeQueue entries past the recovered end of the log");
            // The file holding `lo` keeps its entries before it; later files go, so the
            // last file on disk always ends at the queue's persisted end.
            let (path, file_base, pos) = locate(lo);
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(pos))
                .map_err(io_err(format!("truncating {}", path.display())))?;
            for b in list_numbered(&dir)?.into_iter().filter(|b| *b > file_base) {
                let p = dir.join(cq::file_name(b));
                std::fs::remove_file(&p).map_err(io_err(format!("removing {}", p.display())))?;
            }
            let mut st = self.inner.st.borrow_mut();
            let cq = st
                .topics
                .get_mut(&t)
                .and_then(|m| m.get_mut(&q))
                .expect("queue");
            cq.files.retain(|b, _| *b <= file_base);
            cq.persisted = lo;
            cq.mem.clear();
            cq.mem_base = lo;
            cq.next_assign = lo;
        }
        Ok(())
    }

    /// Returns the partial block before `cut` (the next write carries it) and, when
    /// `zero_rest`, zeroes the segment after `cut`.
    async fn zero_after(&self, cut: u64, zero_rest: bool) -> Result<Vec<u8>> {
        let seg_size = self.inner.cfg.segment_size;
        let base = cut - cut % seg_size;
        let file = self.inner.st.borrow().segments[&base].clone();
        let pos = cut - base;
        let start = align_down(pos);
        let keep = (pos - start) as usize;
        let tail = if keep > 0 {
            let r = file
                .read_at_aligned(start, IO_ALIGN as usize)
                .await
                .map_err(|e| gio("reading the CommitLog tail", e))?;
            r[..keep].to_vec()
        } else {
            Vec::new()
        };
        if !zero_rest {
            return Ok(tail);
        }
        if keep > 0 {
            let mut buf = file.alloc_dma_buffer(IO_ALIGN as usize);
            buf.as_bytes_mut().fill(0);
            buf.as_bytes_mut()[..keep].copy_from_slice(&tail);
            file.write_at(buf, start)
                .await
                .map_err(|e| gio("zeroing the CommitLog after the recovered end", e))?;
        }
        let from = align_up(pos);
        if from < seg_size {
            // Punching the rest out and allocating it again is metadata-only (unwritten
            // extents read as zeros), where writing zeros costs up to a segment of I/O per
            // shard. Writing is the fallback for file systems without hole punching.
            let punched = match file.deallocate(from, seg_size - from).await {
                Ok(()) => file.pre_allocate(seg_size, false).await,
                Err(e) => Err(e),
            };
            if let Err(e) = punched {
                debug!(error = %e, "cannot punch the CommitLog tail: writing zeros");
                // Recovery zeroing is never given up: the log must end in zeros.
                write_zeros(&file, from, seg_size, || false, || false)
                    .await
                    .map_err(|e| gio("zeroing the CommitLog after the recovered end", e))?;
            }
        }
        file.fdatasync()
            .await
            .map_err(|e| gio("syncing the CommitLog", e))?;
        Ok(tail)
    }

    // ---------------------------------------------------------------- segments

    /// Opens segment `base` for appends. Under SYNC_FLUSH with O_DSYNC: a write completes
    /// once durable (with the extent metadata it needs), so a group commit is one I/O, not a
    /// write and then an fdatasync (measured here: 1.0-1.3x the msgs/s, p99 a quarter lower).
    async fn open_segment(&self, base: u64) -> Result<Rc<DmaFile>> {
        let p = self.log_dir().join(segment_name(base));
        let dsync = match self.inner.cfg.flush {
            FlushMode::Sync => libc::O_DSYNC,
            FlushMode::Async => 0,
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(dsync)
            .dma_open(&p)
            .await
            .map_err(|e| gio(&format!("opening segment {}", p.display()), e))?;
        Ok(Rc::new(f))
    }

    /// Creates segment `base` at full size (pre-written with zeros if `prewrite`), syncs it
    /// and its directory: an append is never acknowledged into a segment a crash could lose.
    /// Segments made while opening are not pre-written, so a start never waits for 1 GiB of
    /// zeros; those prepared ahead in the background are.
    async fn prepare_segment(&self, base: u64, prewrite: bool) -> Result<()> {
        let cfg = &self.inner.cfg;
        let dir = self.log_dir();
        let p = dir.join(segment_name(base));
        let tmp = dir.join(format!("{}.prepare", segment_name(base)));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&tmp)
            .await
            .map_err(|e| gio("creating a segment", e))?;
        let r: Result<()> = async {
            f.pre_allocate(cfg.segment_size, false)
                .await
                .map_err(|e| gio("allocating a segment", e))?;
            if prewrite {
                let me = self.clone();
                let seg_size = cfg.segment_size;
                // The segment before `base` is the active one while `base` is prepared ahead.
                let paced = move || {
                    prewrite_paced(me.inner.st.borrow().staging.next_offset(), base, seg_size)
                };
                let stop = || self.inner.stop.get();
                let whole = write_zeros(&f, 0, cfg.segment_size, paced, stop)
                    .await
                    .map_err(|e| gio("pre-writing a segment", e))?;
                if !whole {
                    return Err(StoreError::Closed);
                }
            }
            f.fdatasync()
                .await
                .map_err(|e| gio("syncing a new segment", e))?;
            Ok(())
        }
        .await;
        let _ = f.close().await;
        if let Err(e) = r {
            // Up to a segment of allocated blocks to free: off the shard's thread too.
            let _ = fsutil::off_shard(move || std::fs::remove_file(tmp)).await;
            return Err(e);
        }
        let named = p.clone();
        fsutil::off_shard(move || std::fs::rename(&tmp, &named))
            .await
            .map_err(io_err(format!("renaming {}", p.display())))?;
        sync_dir_off_shard(dir).await?;
        debug!(segment = %segment_name(base), "segment prepared");
        Ok(())
    }

    /// Starts preparing `base` in the background unless that is under way.
    fn start_prepare(&self, base: u64) {
        let signal = {
            let mut st = self.inner.st.borrow_mut();
            if st.preparing.is_some() || st.segments.contains_key(&base) {
                return;
            }
            let s = Signal::new();
            st.preparing = Some(s.clone());
            st.prepare_failed = None;
            s
        };
        let me = self.clone();
        let work = self.background_work();
        glommio::spawn_local(async move {
            let r = match &work {
                // Closing: appends are over, so no segment is needed.
                None => Err(StoreError::Closed),
                Some(_) => {
                    me.prepare_segment(base, me.inner.cfg.prewrite_segments)
                        .await
                }
            };
            let r = match r {
                Ok(()) => me.open_segment(base).await,
                Err(e) => Err(e),
            };
            {
                let mut st = me.inner.st.borrow_mut();
                st.preparing = None;
                match r {
                    Ok(f) => {
                        st.segments.insert(base, f);
                        st.staging.segment_prepared(base);
                    }
                    Err(StoreError::Closed) => {}
                    Err(e) => {
                        error!(error = %e, "cannot prepare the next CommitLog segment");
                        st.prepare_failed = Some((Instant::now(), disk_full_or(e)));
                    }
                }
            }
            signal.set(());
            me.inner.room.notify();
        })
        .detach();
    }

    // ---------------------------------------------------------------- append

    /// Appends one message; resolves when it is durable per the flush mode.
    pub async fn append(&self, msg: &Message) -> Result<AppendResult> {
        let mut r = self.append_batch(std::slice::from_ref(msg)).await?;
        Ok(r.pop().expect("one result"))
    }

    /// Appends messages of one topic and queue contiguously (a batch send); resolves when all
    /// are durable per the flush mode.
    pub async fn append_batch(&self, msgs: &[Message]) -> Result<Vec<AppendResult>> {
        let Some(first) = msgs.first() else {
            return Ok(Vec::new());
        };
        let mut lens = Vec::with_capacity(msgs.len());
        for m in msgs {
            if m.topic != first.topic || m.queue_id != first.queue_id {
                return Err(StoreError::BadBatch(
                    "all messages of a batch must have one topic and queue".into(),
                ));
            }
            lens.push(record::encoded_len(m)?);
        }
        let total: usize = lens.iter().sum();
        let (done, results) = loop {
            let wait = {
                let mut st = self.inner.st.borrow_mut();
                st.writable()?;
                let max = st.staging.max_reservation();
                if total > max {
                    return Err(StoreError::BadBatch(format!(
                        "{total} bytes do not fit one write of this store (at most {max})"
                    )));
                }
                let listener = self.inner.room.listen();
                match self.place(&mut st, msgs, &lens, total) {
                    Ok(r) => break r,
                    Err(need) => self.wait_for(st, need, listener)?,
                }
            };
            wait.await;
        };
        self.inner.staged.notify();
        self.prepare_ahead();
        done.wait().await?;
        Ok(results)
    }

    /// What an append that could not be placed waits for (`listener`, taken before trying):
    /// room in the staging, or the next segment, whose preparation starts now (unless the
    /// last one failed moments ago: then the append fails at once).
    fn wait_for(
        &self,
        st: std::cell::RefMut<'_, State>,
        need: Need,
        listener: crate::sync::SignalWait<()>,
    ) -> Result<crate::sync::SignalWait<()>> {
        if let Need::Segment(base) = need {
            if let Some((at, err)) = &st.prepare_failed {
                if at.elapsed() < PREPARE_RETRY_BACKOFF {
                    return Err(err.clone());
                }
            }
            drop(st);
            self.start_prepare(base);
        }
        Ok(listener)
    }

    /// Prepares the segment after the active one early, so a roll never waits for it.
    fn prepare_ahead(&self) {
        let next = {
            let st = self.inner.st.borrow();
            let next = st.staging.active_segment() + self.inner.cfg.segment_size;
            (st.staging.prepared_upto() < next
                && st.preparing.is_none()
                && st.prepare_failed.is_none())
            .then_some(next)
        };
        if let Some(next) = next {
            self.start_prepare(next);
        }
    }

    /// Places the records in the active batch, assigning offsets and store time, with no
    /// await in between so the batch's order is the offsets' order.
    fn place(
        &self,
        st: &mut State,
        msgs: &[Message],
        lens: &[usize],
        total: usize,
    ) -> std::result::Result<(super::commitlog::BatchDone, Vec<AppendResult>), Need> {
        let ts = now_ms().max(st.last_store_ts);
        let first = &msgs[0];
        let root = self.cq_root();
        let per_file = self.inner.cfg.cq_entries_per_file;
        let State {
            staging,
            topics,
            index,
            ..
        } = st;
        let batch: &mut Batch = staging.reserve(total)?;
        let topic_hash = index.as_ref().map(|ix| ix.key.topic(&first.topic));
        let topic: Rc<str> = match topics.get_key_value(first.topic.as_str()) {
            Some((k, _)) => k.clone(),
            None => first.topic.as_str().into(),
        };
        let cq = topics
            .entry(topic.clone())
            .or_default()
            .entry(first.queue_id)
            .or_insert_with(|| ConsumeQueue::new(&root, topic.clone(), first.queue_id, per_file));
        let mut results = Vec::with_capacity(msgs.len());
        for (m, len) in msgs.iter().zip(lens) {
            let at = Placement {
                queue_offset: cq.next_assign,
                physical_offset: batch.log_end(),
                store_timestamp: ts,
            };
            let n = record::encode_into(m, at, &mut batch.buf);
            assert_eq!(n, *len, "encoded length matches the reservation");
            cq.next_assign += 1;
            let mut keys = 0;
            if let Some(t) = &topic_hash {
                let uniq = m
                    .properties
                    .iter()
                    .find(|(k, _)| k == orbitmq_proto::msgid::UNIQ_KEY)
                    .map(|(_, v)| v.as_str());
                indexfile::indexed_keys(&m.keys, uniq, |k| {
                    batch.key_hashes.push(t.key(k));
                    keys += 1;
                });
            }
            batch.dispatch.push(DispatchEntry {
                topic: topic.clone(),
                queue_id: m.queue_id,
                queue_offset: at.queue_offset,
                physical_offset: at.physical_offset,
                size: n as u32,
                tag_hash: crate::schedule::cq_tag(&m.topic, &m.tags, || {
                    m.properties
                        .iter()
                        .find(|(k, _)| k == orbitmq_proto::sys::property::TIMER_DELIVER_MS)
                        .map(|(_, v)| v.as_str())
                }),
                store_timestamp: ts,
                keys,
            });
            results.push(AppendResult {
                physical_offset: at.physical_offset,
                queue_offset: at.queue_offset,
                store_timestamp: ts,
                size: n as u32,
            });
        }
        let done = batch.done.clone();
        st.last_store_ts = ts;
        Ok((done, results))
    }

    // ---------------------------------------------------------------- replication

    /// A slave's append: `data` holds whole records exactly as the master stored them from
    /// log offset `at`, which must be this log's end, and may end with the header of the
    /// blank record that closes the segment. Each record is checked (CRC, its own offset, the
    /// next offset of its queue) and dispatched as if appended here; a segment closes where
    /// the master's did. Resolves with the new end once written per the flush mode.
    pub async fn append_replica(&self, at: u64, data: &[u8]) -> Result<u64> {
        let staged = self.stage_replica(at, data).await;
        // Once per chunk, and after a refusal too: the records placed before it must be
        // written (each notify wakes the committer and allocates its next signal).
        self.inner.staged.notify();
        self.prepare_ahead();
        if let Some(done) = staged? {
            done.wait().await?;
        }
        Ok(self.inner.st.borrow().written)
    }

    /// Places the records of a copied chunk; returns the completion of the last one placed.
    async fn stage_replica(
        &self,
        at: u64,
        data: &[u8],
    ) -> Result<Option<super::commitlog::BatchDone>> {
        let seg_size = self.inner.cfg.segment_size;
        let index = self.index_key();
        let mut pos = 0usize;
        let mut last_done = None;
        while pos < data.len() {
            let here = at + pos as u64;
            let bad = |why: String| StoreError::Replica(format!("at log offset {here}: {why}"));
            let item = match record::peek(&data[pos..]) {
                Ok(record::Peek::Record(n)) if pos + n as usize <= data.len() => {
                    let v = record::decode(&data[pos..pos + n as usize])
                        .map_err(|e| bad(e.to_string()))?;
                    if v.physical_offset != here {
                        return Err(bad(format!(
                            "the record says it is at {}",
                            v.physical_offset
                        )));
                    }
                    // Its topic names ConsumeQueue directories.
                    orbitmq_proto::limits::validate_topic(v.topic)
                        .map_err(|e| bad(format!("topic {:?}: {e}", v.topic)))?;
                    Some(recovery::scanned(&v, here, n, index.as_ref()))
                }
                Ok(record::Peek::Blank(n)) if pos + BLANK_RECORD_MIN_LEN == data.len() => {
                    // A segment closes early only by less than one run of records.
                    let most =
                        self.inner.st.borrow().staging.max_reservation() + BLANK_RECORD_MIN_LEN;
                    if n as usize > most || here % seg_size + u64::from(n) != seg_size {
                        return Err(bad(format!(
                            "a blank record of {n} bytes does not close the segment (segment \
                             size {seg_size}: is mappedFileSizeCommitLog the master's?)"
                        )));
                    }
                    None
                }
                Ok(p) => return Err(bad(format!("not a whole record: {p:?}"))),
                Err(e) => return Err(bad(e.to_string())),
            };
            let done = loop {
                let wait = {
                    let mut st = self.inner.st.borrow_mut();
                    st.writable()?;
                    let next = st.staging.next_offset();
                    if next != here {
                        return Err(bad(format!("this log ends at {next}")));
                    }
                    let listener = self.inner.room.listen();
                    let room = st.staging.segment_room();
                    if let Some(s) = item
                        .as_ref()
                        .filter(|s| u64::from(s.size) + BLANK_RECORD_MIN_LEN as u64 > room)
                    {
                        return Err(bad(format!(
                            "a record of {} bytes does not fit the {room} left in the segment \
                             (is mappedFileSizeCommitLog the master's?)",
                            s.size
                        )));
                    }
                    if let Some(s) = &item {
                        let next_in_queue = st
                            .topics
                            .get(s.topic.as_str())
                            .and_then(|m| m.get(&s.queue_id))
                            .map(|cq| (cq.next_assign, cq.max_offset()));
                        // A queue new here may start past 0 (the master's retention removed
                        // its first entries before this slave started copying).
                        if let Some((assign, _)) = next_in_queue.filter(|(a, m)| *a != 0 || *m != 0)
                        {
                            if s.queue_offset != assign {
                                return Err(bad(format!(
                                    "{}:{} offset {} does not follow the queue's end {assign}",
                                    s.topic, s.queue_id, s.queue_offset
                                )));
                            }
                        }
                    }
                    let placed = match &item {
                        Some(s) => {
                            self.place_replica(&mut st, s, &data[pos..pos + s.size as usize])
                        }
                        None => st.staging.close_segment(),
                    };
                    match placed {
                        Ok(done) => break done,
                        Err(need) => self.wait_for(st, need, listener)?,
                    }
                };
                // What is placed so far must go out for room to come back.
                self.inner.staged.notify();
                self.prepare_ahead();
                wait.await;
            };
            last_done = Some(done);
            pos += match &item {
                Some(s) => s.size as usize,
                None => BLANK_RECORD_MIN_LEN,
            };
        }
        Ok(last_done)
    }

    /// Places one copied record (`bytes`, described by `s`) in the active batch.
    fn place_replica(
        &self,
        st: &mut State,
        s: &Scanned,
        bytes: &[u8],
    ) -> std::result::Result<super::commitlog::BatchDone, Need> {
        let root = self.cq_root();
        let per_file = self.inner.cfg.cq_entries_per_file;
        let State {
            staging, topics, ..
        } = st;
        let topic: Rc<str> = match topics.get_key_value(s.topic.as_str()) {
            Some((k, _)) => k.clone(),
            None => s.topic.as_str().into(),
        };
        let cq = topics
            .entry(topic.clone())
            .or_default()
            .entry(s.queue_id)
            .or_insert_with(|| ConsumeQueue::new(&root, topic.clone(), s.queue_id, per_file));
        let batch = staging.reserve(bytes.len())?;
        if cq.next_assign == 0 && cq.max_offset() == 0 && s.queue_offset > 0 {
            cq.min_offset = s.queue_offset;
            cq.persisted = s.queue_offset;
            cq.mem_base = s.queue_offset;
        }
        batch.buf.extend_from_slice(bytes);
        batch.key_hashes.extend_from_slice(&s.key_hashes);
        batch.dispatch.push(DispatchEntry {
            topic,
            queue_id: s.queue_id,
            queue_offset: s.queue_offset,
            physical_offset: s.phys,
            size: s.size,
            tag_hash: s.tag_hash,
            store_timestamp: s.store_timestamp,
            keys: s.key_hashes.len() as u32,
        });
        cq.next_assign = s.queue_offset + 1;
        let done = batch.done.clone();
        st.last_store_ts = st.last_store_ts.max(s.store_timestamp);
        Ok(done)
    }

    /// Makes an empty store start at log offset `base` (a segment boundary) instead of 0: a
    /// new slave whose master's retention has removed the master's first segments copies from
    /// where the master's log starts. Refused unless nothing was ever stored here.
    pub async fn start_at(&self, base: u64) -> Result<()> {
        let seg_size = self.inner.cfg.segment_size;
        let refuse = |why: &str| {
            Err(StoreError::Replica(format!(
                "cannot start at {base}: {why}"
            )))
        };
        if !base.is_multiple_of(seg_size) {
            return refuse("not a segment boundary (is mappedFileSizeCommitLog the master's?)");
        }
        {
            let st = self.inner.st.borrow();
            let empty = st.written == 0
                && st.staging.next_offset() == 0
                && st.topics.is_empty()
                && st.segments.keys().all(|b| *b < seg_size * 2)
                && st
                    .index
                    .as_ref()
                    .is_none_or(|ix| ix.open.is_empty() && ix.sealed.is_empty());
            if !empty {
                return refuse("this store holds records");
            }
            if st.preparing.is_some() || st.closing || st.fenced.is_some() {
                return refuse("the store is busy; try again");
            }
        }
        self.prepare_segment(base, false).await?;
        let file = self.open_segment(base).await?;
        let old: Vec<(u64, Rc<DmaFile>)> = {
            let mut st = self.inner.st.borrow_mut();
            let old = std::mem::take(&mut st.segments).into_iter().collect();
            st.segments.insert(base, file);
            st.staging = Staging::new(seg_size, base, Vec::new(), base);
            st.written = base;
            st.synced = base;
            st.dirty.clear();
            st.last_record = None;
            if let Some(ix) = st.index.as_mut() {
                ix.indexed_upto = base;
                ix.covered = base;
            }
            old
        };
        for (b, f) in old {
            let _ = f.close_rc().await;
            let p = self.log_dir().join(segment_name(b));
            fsutil::off_shard(move || std::fs::remove_file(p))
                .await
                .map_err(io_err(format!("removing segment {b}")))?;
        }
        // Empty index files and the checkpoint of the empty log would describe offsets from 0.
        let index_dir = self.index_dir();
        let checkpoint = self.inner.cfg.dir.join(CHECKPOINT_FILE);
        let log_dir = self.log_dir();
        fsutil::off_shard(move || {
            if let Ok(rd) = std::fs::read_dir(&index_dir) {
                for e in rd.flatten() {
                    std::fs::remove_file(e.path())?;
                }
            }
            match std::fs::remove_file(&checkpoint) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            fsutil::sync_dir(&log_dir)?;
            fsutil::sync_dir(fsutil::parent_or_cwd(&checkpoint))
        })
        .await
        .map_err(io_err(format!(
            "starting {} at {base}",
            self.inner.cfg.dir.display()
        )))?;
        info!(dir = %self.inner.cfg.dir.display(), base, "empty store starts at a later log offset");
        Ok(())
    }

    /// The last record in the written log: (log offset, size, store time), if known.
    pub fn last_record(&self) -> Option<(u64, u32, u64)> {
        let st = self.inner.st.borrow();
        st.last_record
            .filter(|(at, size, _)| at + u64::from(*size) <= st.written)
    }

    /// Whether the record at log offset `at` has this size and store time (a slave's last
    /// record, checked against this log).
    pub async fn has_record(&self, at: u64, size: u32, store_ts: u64) -> Result<bool> {
        Ok(match self.record_by_offset(at).await? {
            Some(b) => record::decode(&b)
                .is_ok_and(|v| v.total_size == size && v.store_timestamp == store_ts),
            None => false,
        })
    }

    /// The log's first offset and its written end: the range a slave may copy.
    pub fn log_range(&self) -> (u64, u64) {
        let st = self.inner.st.borrow();
        (st.segments.keys().next().copied().unwrap_or(0), st.written)
    }

    /// What a slave copies next from `from` (a record boundary in the written log): whole
    /// records of one segment, at most `max` bytes unless the first record is larger, then
    /// the 8-byte header of the blank record that closes the segment if it follows. Empty at
    /// the written end.
    pub async fn read_log(&self, from: u64, max: usize) -> Result<Bytes> {
        let seg_size = self.inner.cfg.segment_size;
        let base = from - from % seg_size;
        let (cached, file, end) = {
            let st = self.inner.st.borrow();
            let end = st.written.min(base + seg_size);
            if from >= end {
                return Ok(Bytes::new());
            }
            (
                st.cache.tail_from(from, max),
                st.segments.get(&base).cloned(),
                end,
            )
        };
        let read = |len: u64| {
            let file = file.clone();
            async move {
                let f = file.ok_or_else(|| {
                    StoreError::io(
                        format!("reading log offset {from}"),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    )
                })?;
                let r = f
                    .read_at(from - base, len as usize)
                    .await
                    .map_err(|e| gio("reading the CommitLog", e))?;
                Ok::<_, StoreError>(Bytes::copy_from_slice(&r))
            }
        };
        let want = (end - from).min(max as u64);
        let buf = match cached {
            Some(b) => b.slice(..b.len().min(want as usize)),
            None => read(want).await?,
        };
        let mut n = 0usize;
        loop {
            match record::peek(&buf[n..]) {
                Ok(record::Peek::Record(len)) if n + len as usize <= buf.len() => n += len as usize,
                Ok(record::Peek::Record(len)) if n == 0 && from + u64::from(len) <= end => {
                    // One record larger than `max` (or than the cached chunk): all of it.
                    return read(u64::from(len)).await;
                }
                Ok(record::Peek::Blank(_)) => {
                    n += BLANK_RECORD_MIN_LEN;
                    break;
                }
                _ => break,
            }
        }
        if n == 0 {
            return Err(StoreError::Corrupt {
                offset: from,
                source: record::DecodeError::Truncated {
                    need: BLANK_RECORD_MIN_LEN,
                    have: buf.len(),
                },
            });
        }
        Ok(buf.slice(..n))
    }

    // ---------------------------------------------------------------- tasks

    /// Marks background work under way until the guard drops; `None` once the store is
    /// closing, so no new work starts.
    fn background_work(&self) -> Option<BackgroundWork> {
        if self.inner.stop.get() {
            return None;
        }
        let n = &self.inner.background;
        n.set(n.get() + 1);
        Some(BackgroundWork(self.inner.clone()))
    }

    /// Waits until no background work is under way.
    async fn background_finished(&self) {
        loop {
            let done = self.inner.background_done.listen();
            if self.inner.background.get() == 0 {
                return;
            }
            done.await;
        }
    }

    fn spawn_tasks(&self) {
        let me = self.clone();
        glommio::spawn_local(async move { me.committer().await }).detach();
        if self.inner.cfg.flush == FlushMode::Async {
            let me = self.clone();
            glommio::spawn_local(async move {
                loop {
                    glommio::timer::sleep(me.inner.cfg.flush_interval).await;
                    let Some(_work) = me.background_work() else {
                        break;
                    };
                    me.flush_dirty().await;
                }
            })
            .detach();
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let mut last_offsets = Instant::now();
            loop {
                glommio::timer::sleep(me.inner.cfg.cq_flush_interval).await;
                let Some(_work) = me.background_work() else {
                    break;
                };
                if let Err(e) = me.persist_consume_queues().await {
                    error!(error = %e, "persisting ConsumeQueues failed");
                }
                if last_offsets.elapsed() >= OFFSETS_PERSIST_INTERVAL {
                    last_offsets = Instant::now();
                    if let Err(e) = me.persist_offsets().await {
                        error!(error = %e, "persisting consumer offsets failed");
                    }
                }
            }
        })
        .detach();
        let me = self.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(RETENTION_INTERVAL).await;
                let Some(_work) = me.background_work() else {
                    break;
                };
                let ratio = disk_used_ratio(&me.inner.cfg.dir).unwrap_or(0.0);
                if let Err(e) = me.run_retention(now_ms(), local_hour(), ratio).await {
                    error!(error = %e, "retention failed");
                }
            }
        })
        .detach();
    }

    /// Writes staged batches in log order, one write at a time (consecutive batches share
    /// their boundary block, so two writes in flight could land out of order), and completes
    /// each when its write does: under SYNC_FLUSH segments are open with O_DSYNC, so that is
    /// when it is durable.
    async fn committer(&self) {
        loop {
            let listener = self.inner.staged.listen();
            let next = {
                let mut st = self.inner.st.borrow_mut();
                match st.staging.take_batch() {
                    Some(b) => {
                        let f = st.segments.get(&b.seg_base).cloned();
                        Some((b, f))
                    }
                    None if st.closing => break,
                    None => None,
                }
            };
            let Some((batch, file)) = next else {
                listener.await;
                continue;
            };
            let result = match &file {
                Some(f) => self.write_batch(f, &batch).await,
                None => Err(format!("segment {} is missing", batch.seg_base)),
            };
            self.batch_done(batch, result);
        }
        self.inner.committer_done.set(());
    }

    /// One O_DIRECT write of the batch.
    async fn write_batch(&self, file: &DmaFile, b: &Batch) -> WriteResult {
        let len = align_up(b.buf.len() as u64) as usize;
        let mut dma = file.alloc_dma_buffer(len);
        let dst = dma.as_bytes_mut();
        dst[..b.buf.len()].copy_from_slice(&b.buf);
        dst[b.buf.len()..].fill(0);
        match file.write_at(dma, b.file_pos).await {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(format!("short write: {n} of {len} bytes")),
            Err(e) => Err(std::io::Error::from(e).to_string()),
        }
    }

    fn batch_done(&self, mut batch: Batch, result: WriteResult) {
        let mut st = self.inner.st.borrow_mut();
        // The log may have been fenced (the flusher's fdatasync failed) while this write was
        // in flight: its appends are unacknowledged, so they fail too, whatever it returned.
        let result = match (result, &st.fenced) {
            (Ok(()), Some(why)) => Err(why.clone()),
            (r, _) => r,
        };
        if let Err(why) = result {
            if st.fenced.is_none() {
                error!(
                    why,
                    segment = batch.seg_base,
                    "CommitLog write failed: fencing the log"
                );
            }
            let err = StoreError::Fenced(why.clone());
            st.fenced = Some(why);
            batch.done.set(Err(err.clone()));
            st.staging.fail_all(&err);
            drop(st);
            self.inner.room.notify();
            return;
        }
        let end = batch.log_end();
        debug_assert!(end >= st.written, "the written offset only grows");
        st.written = end;
        if self.inner.cfg.flush == FlushMode::Sync {
            st.synced = end;
        } else {
            st.dirty.insert(batch.seg_base);
        }
        if let Some(ix) = st.index.as_mut() {
            ix.prefetch(&batch.key_hashes);
            let mut at = 0;
            for d in &batch.dispatch {
                let n = d.keys as usize;
                ix.add_record(
                    &batch.key_hashes[at..at + n],
                    d.size,
                    d.physical_offset,
                    d.store_timestamp,
                );
                at += n;
            }
        }
        if let Some(d) = batch.dispatch.last() {
            st.last_record = Some((d.physical_offset, d.size, d.store_timestamp));
        }
        for d in batch.dispatch.drain(..) {
            let cq = st
                .topics
                .get_mut(&d.topic)
                .and_then(|m| m.get_mut(&d.queue_id))
                .expect("queue created at placement");
            cq.push(
                d.queue_offset,
                CqEntry {
                    phys: d.physical_offset,
                    size: d.size,
                    tag_hash: d.tag_hash,
                },
            );
        }
        let start = batch.log_start();
        let mut buf = std::mem::take(&mut batch.buf);
        buf.truncate(buf.len() - batch.blank_len);
        // A large batch is cached in its own buffer, charged its capacity (shrinking copied
        // it, on every batch under load); a small one in a buffer at its size, so light load
        // (a 1 KiB batch in a 64 KiB buffer) does not fill the cache with empty room.
        let (bytes, held) = if buf.len() <= CACHE_COPY_MAX_BYTES && buf.capacity() > 2 * buf.len() {
            let b = Bytes::copy_from_slice(&buf[batch.carried..]);
            let held = b.len();
            (b, held)
        } else {
            let held = buf.capacity();
            (Bytes::from(buf).slice(batch.carried..), held)
        };
        st.cache.insert(start, bytes, held);
        drop(st);
        batch.done.set(Ok(()));
        self.inner.room.notify();
        self.inner.dispatched.notify();
    }

    /// fdatasync every segment written since its last sync (ASYNC_FLUSH).
    async fn flush_dirty(&self) {
        let _round = self.inner.flushing.enter().await;
        let (segs, upto) = {
            let mut st = self.inner.st.borrow_mut();
            if st.fenced.is_some() || st.dirty.is_empty() {
                return;
            }
            let segs: Vec<Rc<DmaFile>> = std::mem::take(&mut st.dirty)
                .into_iter()
                .filter_map(|b| st.segments.get(&b).cloned())
                .collect();
            (segs, st.written)
        };
        for f in segs {
            if let Err(e) = f.fdatasync().await {
                let why = format!("fdatasync: {}", std::io::Error::from(e));
                error!(why, "CommitLog fdatasync failed: fencing the log");
                let mut st = self.inner.st.borrow_mut();
                let err = StoreError::Fenced(why.clone());
                st.fenced = Some(why);
                st.staging.fail_all(&err);
                drop(st);
                self.inner.room.notify();
                return;
            }
        }
        let mut st = self.inner.st.borrow_mut();
        st.synced = st.synced.max(upto);
    }

    /// Writes ConsumeQueue entries of records below the synced offset, then the checkpoint.
    pub async fn persist_consume_queues(&self) -> Result<()> {
        self.persist_index(false).await
    }

    /// Persists the ConsumeQueues and the checkpoint; `closing` marks a clean end when
    /// everything written is synced and indexed.
    async fn persist_index(&self, closing: bool) -> Result<()> {
        let _one = self.inner.persisting.enter().await;
        if self.inner.sealed.get() {
            return Ok(());
        }
        let (durable, work) = {
            let st = self.inner.st.borrow();
            let durable = st.synced;
            let mut work = Vec::new();
            for (t, qs) in &st.topics {
                for (q, cq) in qs {
                    let (upto, writes) = cq.unpersisted_upto(durable);
                    if !writes.is_empty() {
                        let paths: Vec<_> = writes
                            .into_iter()
                            .map(|(base, pos, bytes)| (cq.path_of(base), pos, bytes))
                            .collect();
                        work.push((t.clone(), *q, cq.dir.clone(), upto, paths));
                    }
                }
            }
            (durable, work)
        };
        let round = self.inner.persist_round.get() + 1;
        self.inner.persist_round.set(round);
        if !work.is_empty() {
            self.inner.cq_unsynced.set(true);
        }
        for (t, q, dir, upto, writes) in work {
            for (path, pos, bytes) in writes {
                let cached = self.inner.cq_open.borrow_mut().remove(&path);
                let f = match cached {
                    Some((f, _)) => f,
                    None => open_cq_file(&dir, &path).await?,
                };
                let n = bytes.len();
                let r = f.write_at(bytes, pos).await;
                if matches!(r, Ok(w) if w == n) {
                    self.keep_cq_file(path.clone(), f, round).await;
                } else {
                    let _ = f.close().await;
                }
                match r {
                    Ok(w) if w == n => {}
                    Ok(w) => {
                        return Err(StoreError::io(
                            format!("writing {}", path.display()),
                            std::io::Error::other(format!("short write {w} of {n}")),
                        ))
                    }
                    Err(e) => return Err(gio("writing a ConsumeQueue file", e)),
                }
            }
            let mut st = self.inner.st.borrow_mut();
            if let Some(cq) = st.topics.get_mut(&t).and_then(|m| m.get_mut(&q)) {
                cq.mark_persisted(upto);
            }
        }
        // Every record below `durable` is now in the persisted ConsumeQueues.
        self.persist_key_index(durable).await;
        let cp = {
            let st = self.inner.st.borrow();
            let mut queues: Vec<(String, u32, u64)> = st
                .topics
                .iter()
                .flat_map(|(t, qs)| {
                    qs.values()
                        .map(move |q| (t.to_string(), q.queue_id, q.persisted))
                })
                .collect();
            queues.sort();
            let scan_from =
                index_floor(&st, durable).min(st.index.as_ref().map_or(u64::MAX, |ix| ix.covered));
            let clean = closing
                && scan_from == durable
                && durable == st.written
                && st.staging.is_empty()
                && st.fenced.is_none();
            Checkpoint {
                scan_from,
                clean_end: clean.then_some(durable),
                queues,
            }
        };
        let cp_path = self.inner.cfg.dir.join(CHECKPOINT_FILE);
        let bytes = cp.encode();
        // Unchanged since this process last wrote it (an idle shard): no rewrite every round.
        if !closing && self.inner.last_checkpoint.borrow().as_ref() == Some(&bytes) {
            return Ok(());
        }
        // The ConsumeQueue entries are buffered writes, and the checkpoint vouches for them:
        // make them durable first, or a power loss could leave zeros where the checkpoint
        // says entries are. One syncfs covers every file of the round (an fdatasync per file
        // would be a device flush per queue, thousands a round with many topics).
        if self.inner.cq_unsynced.get() {
            let dir = self.inner.cfg.dir.clone();
            fsutil::off_shard(move || fsutil::sync_filesystem(&dir))
                .await
                .map_err(io_err(format!(
                    "syncing the file system of {}",
                    self.inner.cfg.dir.display()
                )))?;
            self.inner.cq_unsynced.set(false);
        }
        // Two fsyncs: off the shard's thread, so sends and pulls go on meanwhile.
        let written = fsutil::write_atomically_off_shard(cp_path.clone(), bytes)
            .await
            .map_err(io_err(format!("writing {}", cp_path.display())))?;
        *self.inner.last_checkpoint.borrow_mut() = Some(written);
        if closing {
            self.inner.sealed.set(true);
        }
        Ok(())
    }

    /// Keeps a ConsumeQueue file open for the next rounds; past `max_open_cq_files` the
    /// quarter least recently written are closed.
    async fn keep_cq_file(&self, path: PathBuf, f: BufferedFile, round: u64) {
        let evicted: Vec<BufferedFile> = {
            let mut open = self.inner.cq_open.borrow_mut();
            open.insert(path, (f, round));
            let max = self.inner.cfg.max_open_cq_files.max(1);
            if open.len() <= max {
                return;
            }
            let mut by_age: Vec<(u64, PathBuf)> =
                open.iter().map(|(p, (_, r))| (*r, p.clone())).collect();
            by_age.sort_unstable();
            by_age
                .into_iter()
                .take(max.div_ceil(4))
                .filter_map(|(_, p)| open.remove(&p).map(|(f, _)| f))
                .collect()
        };
        for f in evicted {
            let _ = f.close().await;
        }
    }

    /// Closes the ConsumeQueue files kept open (at close, and for files about to be deleted).
    async fn close_cq_files(&self, which: impl Fn(&Path) -> bool) {
        let files: Vec<BufferedFile> = {
            let mut open = self.inner.cq_open.borrow_mut();
            let paths: Vec<PathBuf> = open.keys().filter(|p| which(p)).cloned().collect();
            paths
                .iter()
                .filter_map(|p| open.remove(p).map(|(f, _)| f))
                .collect()
        };
        for f in files {
            let _ = f.close().await;
        }
    }

    /// Writes the consumer offsets when they changed, off the shard's thread; one write at a
    /// time, so an older snapshot never lands after a newer one.
    async fn persist_offsets(&self) -> Result<()> {
        let _one = self.inner.saving_offsets.enter().await;
        let Some(bytes) = self.inner.st.borrow_mut().offsets.take_changes() else {
            return Ok(());
        };
        let p = self.inner.cfg.dir.join(OFFSETS_FILE);
        match fsutil::write_atomically_off_shard(p.clone(), bytes).await {
            Ok(_) => {
                debug!(path = %p.display(), "saved consumer offsets");
                Ok(())
            }
            Err(e) => {
                self.inner.st.borrow_mut().offsets.mark_dirty();
                Err(StoreError::io(format!("writing {}", p.display()), e))
            }
        }
    }

    // ---------------------------------------------------------------- reads

    /// Reads up to `max_msgs` records (and about `max_bytes`, at least one record) of a queue
    /// from `offset`, skipping records whose tag hash is not in `tags` (when given).
    pub async fn read(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        max_msgs: usize,
        max_bytes: usize,
        tags: Option<&[u64]>,
    ) -> Result<ReadResult> {
        let max_msgs = max_msgs.clamp(1, MAX_READ_MESSAGES);
        let (min, max) = match self.queue_bounds(topic, queue_id) {
            Some(b) => b,
            None => {
                return Ok(ReadResult {
                    status: ReadStatus::NoSuchQueue,
                    records: Vec::new(),
                    next_offset: 0,
                    min_offset: 0,
                    max_offset: 0,
                })
            }
        };
        let empty = |status, next| ReadResult {
            status,
            records: Vec::new(),
            next_offset: next,
            min_offset: min,
            max_offset: max,
        };
        if offset < min {
            return Ok(empty(ReadStatus::OffsetTooSmall, min));
        }
        if offset > max {
            return Ok(empty(ReadStatus::OffsetOverflow, max));
        }
        if offset == max {
            return Ok(empty(ReadStatus::NoNewMessage, max));
        }
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut off = offset;
        let end = max.min(offset + (max_msgs as u64) * 8);
        let mut window = None;
        while off < end && records.len() < max_msgs {
            let entries = self
                .entries(topic, queue_id, off, (end - off) as usize)
                .await?;
            if entries.is_empty() {
                break;
            }
            for e in entries {
                if records.len() >= max_msgs || (bytes > 0 && bytes + e.size as usize > max_bytes) {
                    return Ok(ReadResult {
                        status: ReadStatus::Found,
                        records,
                        next_offset: off,
                        min_offset: min,
                        max_offset: max,
                    });
                }
                off += 1;
                if let Some(want) = tags {
                    if !want.contains(&e.tag_hash) {
                        continue;
                    }
                }
                let r = self.record_in(e.phys, e.size, &mut window).await?;
                bytes += r.len();
                records.push(r);
            }
        }
        let status = if records.is_empty() {
            ReadStatus::NoNewMessage
        } else {
            ReadStatus::Found
        };
        Ok(ReadResult {
            status,
            records,
            next_offset: off,
            min_offset: min,
            max_offset: max,
        })
    }

    /// (min, max) offsets of a queue; `None` if it has never had a message here.
    pub fn queue_bounds(&self, topic: &str, queue_id: u32) -> Option<(u64, u64)> {
        let st = self.inner.st.borrow();
        let cq = st.topics.get(topic)?.get(&queue_id)?;
        Some((cq.min_offset, cq.max_offset()))
    }

    /// Up to `n` ConsumeQueue entries of a queue from `offset` (fewer at a file boundary or
    /// the queue's end; none below its minimum).
    pub async fn queue_entries(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        n: usize,
    ) -> Result<Vec<CqEntry>> {
        match self.queue_bounds(topic, queue_id) {
            Some((min, max)) if offset >= min && offset < max => {
                self.entries(topic, queue_id, offset, n.min((max - offset) as usize))
                    .await
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Up to `n` ConsumeQueue entries from `offset` (fewer at a file boundary).
    async fn entries(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        n: usize,
    ) -> Result<Vec<CqEntry>> {
        let (path, pos, count) = {
            let st = self.inner.st.borrow();
            let Some(cq) = st.topics.get(topic).and_then(|m| m.get(&queue_id)) else {
                return Ok(Vec::new());
            };
            let n = (n as u64).min(cq.max_offset().saturating_sub(offset));
            if offset >= cq.mem_base {
                return Ok((offset..offset + n)
                    .filter_map(|o| cq.mem_entry(o))
                    .collect());
            }
            let (base, pos) = cq.locate(offset);
            let in_file = (base + cq.entries_per_file - offset)
                .min(cq.mem_base - offset)
                .min(n);
            (cq.path_of(base), pos, in_file)
        };
        let f = BufferedFile::open(&path)
            .await
            .map_err(|e| gio("opening a ConsumeQueue file", e))?;
        let r = f.read_at(pos, (count * CQ_ENTRY_LEN) as usize).await;
        let _ = f.close().await;
        let r = r.map_err(|e| gio("reading a ConsumeQueue file", e))?;
        Ok(r.chunks_exact(CQ_ENTRY_LEN as usize)
            .map(CqEntry::decode)
            .collect())
    }

    /// The CRC-checked record at `phys`: from the tail cache, else read from its segment.
    async fn record_at(&self, phys: u64, size: u32) -> Result<Bytes> {
        self.record_in(phys, size, &mut None).await
    }

    /// [`Self::record_at`] for a reader going forward: a record not in the tail cache is read
    /// with up to [`READ_AHEAD_BYTES`] after it into `window`, so the next records of the same
    /// queue (interleaved with other queues' in the log) come from memory, not one DMA read
    /// each.
    async fn record_in(
        &self,
        phys: u64,
        size: u32,
        window: &mut Option<(u64, Bytes)>,
    ) -> Result<Bytes> {
        self.record_reading(phys, size, READ_AHEAD_BYTES, window)
            .await
    }

    /// [`Self::record_in`] reading `ahead` bytes at least (0: the record's own bytes).
    async fn record_reading(
        &self,
        phys: u64,
        size: u32,
        ahead: u64,
        window: &mut Option<(u64, Bytes)>,
    ) -> Result<Bytes> {
        if let Some((start, w)) = window.as_ref() {
            if phys >= *start && phys + size as u64 <= *start + w.len() as u64 {
                let at = (phys - start) as usize;
                return Self::checked(w.slice(at..at + size as usize), phys);
            }
        }
        let (cached, file, base, written) = {
            let st = self.inner.st.borrow();
            let base = phys - phys % self.inner.cfg.segment_size;
            (
                st.cache.get(phys, size),
                st.segments.get(&base).cloned(),
                base,
                st.written,
            )
        };
        if let Some(b) = cached {
            return Self::checked(b, phys);
        }
        let f = file.ok_or_else(|| {
            StoreError::io(
                format!("reading log offset {phys}"),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        // Never past the segment or the published written offset.
        let end = (phys + (size as u64).max(ahead))
            .min(base + self.inner.cfg.segment_size)
            .min(written.max(phys + size as u64));
        let r = f
            .read_at(phys - base, (end - phys) as usize)
            .await
            .map_err(|e| gio("reading the CommitLog", e))?;
        let w = Bytes::copy_from_slice(&r);
        if w.len() < size as usize {
            return Err(StoreError::Corrupt {
                offset: phys,
                source: record::DecodeError::Truncated {
                    need: size as usize,
                    have: w.len(),
                },
            });
        }
        let b = w.slice(..size as usize);
        *window = Some((phys, w));
        Self::checked(b, phys)
    }

    /// Serves only whole records that pass their CRC and sit at their own offset.
    fn checked(b: Bytes, phys: u64) -> Result<Bytes> {
        match record::decode(&b) {
            Ok(v) if v.physical_offset == phys => Ok(b),
            Ok(_) => Err(StoreError::Corrupt {
                offset: phys,
                source: record::DecodeError::BadMagic(0),
            }),
            Err(e) => Err(StoreError::Corrupt {
                offset: phys,
                source: e,
            }),
        }
    }

    /// The store timestamp of the record at a queue offset.
    async fn store_time_at(&self, topic: &str, queue_id: u32, offset: u64) -> Result<u64> {
        let e = self.entries(topic, queue_id, offset, 1).await?;
        let e = e.first().ok_or_else(|| {
            StoreError::io(
                format!("ConsumeQueue entry {offset} of {topic}:{queue_id}"),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        })?;
        let b = self.record_at(e.phys, e.size).await?;
        Ok(record::decode(&b).map(|v| v.store_timestamp).unwrap_or(0))
    }

    /// The first queue offset whose record was stored at or after `ts_ms` (max offset if
    /// none): where a replay from a point in time starts. Binary search: store timestamps
    /// are monotone per shard.
    pub async fn offset_by_time(&self, topic: &str, queue_id: u32, ts_ms: u64) -> Result<u64> {
        let Some((mut lo, mut hi)) = self.queue_bounds(topic, queue_id) else {
            return Ok(0);
        };
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.store_time_at(topic, queue_id, mid).await? < ts_ms {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Waits for new ConsumeQueue entries (any queue of this shard). Take it before checking.
    pub fn dispatched(&self) -> crate::sync::SignalWait<()> {
        self.inner.dispatched.listen()
    }

    // ---------------------------------------------------------------- offsets

    pub fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> Result<()> {
        let mut st = self.inner.st.borrow_mut();
        st.offsets
            .commit(group, topic, queue_id, offset)
            .map_err(|e| StoreError::BadBatch(e.to_string()))
    }

    /// Commits several queues' offsets of one group and topic: all or none.
    pub fn commit_offsets(&self, group: &str, topic: &str, offsets: &[(u32, u64)]) -> Result<()> {
        let mut st = self.inner.st.borrow_mut();
        st.offsets
            .commit_all(group, topic, offsets)
            .map_err(|e| StoreError::BadBatch(e.to_string()))
    }

    /// Every committed offset, in the offsets file's format (what a slave copies).
    pub fn offsets_snapshot(&self) -> Vec<u8> {
        self.inner.st.borrow().offsets.encode()
    }

    /// Takes a master's offsets (bytes from [`Self::offsets_snapshot`]), keeping offsets only
    /// this store has; saved with the next offsets round.
    pub fn adopt_offsets(&self, bytes: &[u8]) -> Result<()> {
        let theirs = ConsumerOffsets::decode(Path::new("the master's offsets"), bytes)
            .map_err(|e| StoreError::Replica(e.to_string()))?;
        self.inner
            .st
            .borrow_mut()
            .offsets
            .merge(theirs)
            .map_err(|e| StoreError::Replica(e.to_string()))
    }

    pub fn query_offset(&self, group: &str, topic: &str, queue_id: u32) -> Option<u64> {
        self.inner.st.borrow().offsets.query(group, topic, queue_id)
    }

    // ---------------------------------------------------------------- retention

    /// Deletes expired segments (see [`retention::plan`]) and advances ConsumeQueue minimums.
    pub async fn run_retention(
        &self,
        now_ms: u64,
        local_hour: u8,
        disk_used_ratio: f64,
    ) -> Result<Vec<u64>> {
        let seg_size = self.inner.cfg.segment_size;
        let infos: Vec<SegmentInfo> = {
            let st = self.inner.st.borrow();
            let active = st.staging.active_segment();
            st.segments
                .keys()
                .filter(|b| **b <= active)
                .map(|b| {
                    let p = self.log_dir().join(segment_name(*b));
                    let mtime = std::fs::metadata(&p)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(now_ms, |d| d.as_millis() as u64);
                    SegmentInfo {
                        base: *b,
                        len: seg_size,
                        last_modified_ms: mtime,
                    }
                })
                .collect()
        };
        let victims = retention::plan(
            &infos,
            now_ms,
            local_hour,
            disk_used_ratio,
            &self.inner.cfg.retention,
        );
        // Never delete what the ConsumeQueues have not persisted: recovery rescans from there
        // and would find a gap. Persisting first lets everything synced go.
        self.persist_consume_queues().await?;
        let scan_floor = {
            let st = self.inner.st.borrow();
            index_floor(&st, st.synced)
        };
        // Messages still waiting for their delivery time are kept, unless the disk is so
        // full that RocketMQ would clean by force.
        let hold = self.inner.hold_from.get();
        let forced = disk_used_ratio >= self.inner.cfg.retention.disk_force_clean_ratio;
        let floor = if forced {
            scan_floor
        } else {
            scan_floor.min(hold)
        };
        let victims: Vec<u64> = victims
            .into_iter()
            .filter(|b| b + seg_size <= floor)
            .collect();
        if forced && victims.last().is_some_and(|b| b + seg_size > hold) {
            warn!(hold, "disk nearly full: retention deletes segments holding messages that wait for a delay or timer");
        }
        for b in &victims {
            let f = self.inner.st.borrow_mut().segments.remove(b);
            if let Some(f) = f {
                let _ = f.close_rc().await;
            }
            let path = self.log_dir().join(segment_name(*b));
            fsutil::off_shard(move || std::fs::remove_file(path))
                .await
                .map_err(io_err(format!("deleting segment {b}")))?;
            info!(segment = %segment_name(*b), "retention deleted a CommitLog segment");
        }
        if !victims.is_empty() {
            sync_dir_off_shard(self.log_dir()).await?;
        }
        if let Some(last) = victims.last() {
            let new_min = last + seg_size;
            self.advance_queue_minimums(new_min).await?;
            self.inner.st.borrow_mut().cache.drop_below(new_min);
            self.prune_key_index(new_min).await?;
        }
        Ok(victims)
    }

    /// Keeps the CommitLog from `log_offset` on through retention (`u64::MAX`: no hold): the
    /// scheduler holds what still waits to be delivered.
    pub fn hold_from(&self, log_offset: u64) {
        self.inner.hold_from.set(log_offset);
    }

    /// Moves each queue's minimum to its first entry at or after log offset `log_min`, and
    /// deletes ConsumeQueue files wholly below it.
    async fn advance_queue_minimums(&self, log_min: u64) -> Result<()> {
        let queues: Vec<(Rc<str>, u32, u64, u64)> = {
            let st = self.inner.st.borrow();
            st.topics
                .iter()
                .flat_map(|(t, qs)| {
                    qs.values()
                        .map(move |q| (t.clone(), q.queue_id, q.min_offset, q.max_offset()))
                })
                .collect()
        };
        for (t, q, min, max) in queues {
            // Closing: the next start advances the minimums from the first segment anyway.
            if self.inner.stop.get() {
                break;
            }
            // Entries are in log order within a queue: binary search the first kept one.
            let (mut lo, mut hi) = (min, max);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                let e = self.entries(&t, q, mid, 1).await?;
                if e.first().is_some_and(|e| e.phys < log_min) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            let gone = {
                let mut st = self.inner.st.borrow_mut();
                let Some(cq) = st.topics.get_mut(&t).and_then(|m| m.get_mut(&q)) else {
                    continue;
                };
                cq.min_offset = lo;
                let files: Vec<(u64, u64)> =
                    cq.files.keys().map(|b| (*b, cq.entries_per_file)).collect();
                let mut gone = Vec::new();
                for base in retention::cq_files_to_delete(&files, lo) {
                    cq.files.remove(&base);
                    gone.push(cq.path_of(base));
                }
                gone
            };
            if !gone.is_empty() {
                self.close_cq_files(|p| gone.iter().any(|g| g == p)).await;
                fsutil::off_shard(move || {
                    for p in gone {
                        let _ = std::fs::remove_file(p);
                    }
                })
                .await;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- state

    pub fn stats(&self) -> StoreStats {
        let st = self.inner.st.borrow();
        StoreStats {
            next_offset: st.staging.next_offset(),
            written_offset: st.written,
            synced_offset: st.synced,
            min_offset: st.segments.keys().next().copied().unwrap_or(0),
            segments: st.segments.len(),
            queues: st.topics.values().map(|q| q.len()).sum(),
        }
    }

    /// Lists the queues this store has, with their bounds.
    pub fn queues(&self) -> Vec<(String, u32, u64, u64)> {
        let st = self.inner.st.borrow();
        let mut v: Vec<_> = st
            .topics
            .iter()
            .flat_map(|(t, qs)| {
                qs.values()
                    .map(move |q| (t.to_string(), q.queue_id, q.min_offset, q.max_offset()))
            })
            .collect();
        v.sort();
        v
    }

    /// Writes everything staged, syncs the log, persists ConsumeQueues, checkpoint and
    /// offsets, and stops the store's tasks.
    pub async fn close(&self) -> Result<()> {
        let first = !std::mem::replace(&mut self.inner.st.borrow_mut().closing, true);
        if !first {
            // Another caller is closing it: its outcome is this one's too.
            return self.inner.closed.wait().await;
        }
        let r = self.close_once().await;
        self.inner.closed.set(r.clone());
        r
    }

    async fn close_once(&self) -> Result<()> {
        self.inner.staged.notify();
        self.inner.committer_done.wait().await;
        self.inner.stop.set(true);
        // Background work under way ends first: after close() returns nothing of this store
        // touches its files (a persist of its own must not land after the final one).
        self.background_finished().await;
        self.flush_dirty().await;
        let fenced = self.inner.st.borrow().fenced.clone();
        // The log is synced; ConsumeQueues are derived from it, so failing to persist them
        // (a full disk) costs only a rebuild at the next start. A fenced log is not known to
        // be synced: its index is not persisted past what was, and recovery decides.
        if fenced.is_none() {
            if let Err(e) = self.persist_index(true).await {
                warn!(error = %e, "ConsumeQueues not persisted at close; the next start rebuilds them");
            }
        }
        let offsets = self.persist_offsets().await;
        self.close_cq_files(|_| true).await;
        let index_files: Vec<BufferedFile> =
            std::mem::take(&mut *self.inner.index_files.borrow_mut())
                .into_values()
                .collect();
        for f in index_files {
            let _ = f.close().await;
        }
        // Close the segments even when fenced, so the files are not held open after close.
        let segs: Vec<Rc<DmaFile>> = std::mem::take(&mut self.inner.st.borrow_mut().segments)
            .into_values()
            .collect();
        for f in segs {
            let _ = f.close_rc().await;
        }
        if let Some(f) = fenced {
            return Err(StoreError::Fenced(f));
        }
        offsets?;
        info!(dir = %self.inner.cfg.dir.display(), "store closed");
        Ok(())
    }
}

// ---------------------------------------------------------------- key index

/// What one step of persisting the key index does (the open files change while it awaits).
enum IndexStep {
    /// Write entries `first..` of a file, then its header.
    Write {
        first_phys: u64,
        pos: u64,
        bytes: Vec<u8>,
        n: u32,
        header: Vec<u8>,
        covered: u64,
    },
    /// Write a full file's slots, sync them, then its sealed header, synced too (a later
    /// file's header must never be durable before an earlier file's seal).
    Seal {
        first_phys: u64,
        slots_bytes: Vec<u8>,
        header: Vec<u8>,
        sealed: indexfile::Sealed,
    },
    /// Only the header: the log moved on with no new keys, and the next start need not
    /// rescan what it covers.
    Header {
        first_phys: u64,
        header: Vec<u8>,
        covered: u64,
    },
}

/// Writes `bytes` at `pos` of a key index file and syncs it, with std I/O (recovery, before
/// the store serves).
fn index_rewrite(path: &Path, pos: u64, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, pos)?;
    f.sync_data()
}

impl Store {
    /// The key the shard's index hashes keys with (`None` without an index).
    fn index_key(&self) -> Option<HashKey> {
        self.inner.st.borrow().index.as_ref().map(|ix| ix.key)
    }

    /// Loads the key index files at recovery: sealed ones by their headers, open ones with
    /// their entries (their slots are rebuilt). A damaged file and the files after it are
    /// removed (derived data: the rescan rebuilds them). Returns the log offset the files
    /// cover (the rescan starts no later), `None` without an index.
    async fn load_key_index(&self, log_min: u64) -> Result<Option<u64>> {
        let Some(cfg) = self.inner.cfg.index else {
            return Ok(None);
        };
        let dir = self.index_dir();
        let names = list_numbered(&dir)?;
        // The files' hash key, taken from the first; a new one for an index with no files.
        let fresh = self.index_key().expect("an index");
        let mut key = None;
        let mut ix = KeyIndex::new(fresh, cfg.hash_slots, cfg.max_entries);
        let mut covered = 0;
        let mut doomed = Vec::new();
        for (i, first) in names.iter().enumerate() {
            let path = dir.join(indexfile::file_name(*first));
            // A file hashed under another key than the first one's is damaged too.
            let header = indexfile::read_header(&path)
                .map_err(io_err(format!("reading {}", path.display())))?
                .filter(|h| {
                    h.first_phys == *first
                        && h.first_phys >= covered
                        && key.is_none_or(|k| h.key == k)
                });
            // Files are sealed in order, each synced before the next is written: a sealed
            // file after an unsealed one means the earlier state was lost (a power loss);
            // from the unsealed one on, all are rebuilt.
            let out_of_order = header.is_some_and(|h| h.sealed) && !ix.open.is_empty();
            let Some(h) = header.filter(|_| !out_of_order) else {
                warn!(file = %path.display(), "damaged key index file: rebuilding it and later ones from the log");
                let from = if out_of_order {
                    let f = ix.open.front().expect("an open file").first_phys;
                    covered = f;
                    ix.open.clear();
                    names.iter().position(|n| *n == f).expect("listed")
                } else {
                    i
                };
                doomed.extend_from_slice(&names[from..]);
                break;
            };
            key = Some(h.key);
            if h.sealed {
                ix.sealed.push(indexfile::Sealed {
                    first_phys: h.first_phys,
                    covered: h.covered,
                    begin_ts: h.begin_ts,
                    end_ts: h.end_ts,
                });
                covered = h.covered;
                continue;
            }
            let l = indexfile::load_open(&path, &h, h.covered)
                .map_err(io_err(format!("reading {}", path.display())))?;
            let mut f = l.file;
            // A torn tail: the last whole record's keys may be partly there, so it is
            // offered again by the rescan (a key entered twice is found once).
            covered = if l.damaged {
                warn!(file = %path.display(), kept = f.count, "key index file cut at a damaged entry");
                l.last_phys.unwrap_or(h.first_phys)
            } else {
                h.covered
            };
            f.disk_covered = h.covered;
            ix.open.push_back(f);
        }
        if !doomed.is_empty() {
            for first in &doomed {
                let p = dir.join(indexfile::file_name(*first));
                std::fs::remove_file(&p).map_err(io_err(format!("removing {}", p.display())))?;
            }
            sync_dir(&dir)?;
        }
        ix.covered = covered;
        ix.indexed_upto = covered;
        ix.key = if ix.sealed.is_empty() && ix.open.is_empty() {
            fresh
        } else {
            key.expect("a file was kept")
        };
        let gone = ix.prune_below(log_min);
        self.inner.st.borrow_mut().index = Some(ix);
        self.delete_index_files(gone).await?;
        Ok(Some(covered))
    }

    /// After the recovery scan cut the log at `cut`: records from `cut` on are gone, so the
    /// index must not point at them. The files cover only synced log, so this happens only
    /// when synced log was lost: files from the cut on are removed, and the file holding the
    /// cut is reloaded without its entries past it, its header rewritten at once (a crash
    /// before the next persist must not bring the old entries back).
    async fn cut_key_index(&self, cut: u64) -> Result<()> {
        let (over, gone) = {
            let mut st = self.inner.st.borrow_mut();
            let Some(ix) = st.index.as_mut() else {
                return Ok(());
            };
            let over = ix.covered > cut;
            let mut gone = Vec::new();
            if over {
                warn!(
                    cut,
                    covered = ix.covered,
                    "the key index runs past the recovered end of the log: cutting it"
                );
                while ix.open.back().is_some_and(|f| f.first_phys >= cut) {
                    gone.extend(ix.open.pop_back().map(|f| f.first_phys));
                }
                if ix.open.is_empty() {
                    while ix.sealed.last().is_some_and(|s| s.first_phys >= cut) {
                        gone.extend(ix.sealed.pop().map(|s| s.first_phys));
                    }
                }
            }
            (over, gone)
        };
        self.delete_index_files(gone).await?;
        if over {
            let last = {
                let mut st = self.inner.st.borrow_mut();
                let ix = st.index.as_mut().expect("index");
                match ix.open.pop_back() {
                    Some(f) => Some(f.first_phys),
                    None => ix.sealed.pop().map(|s| s.first_phys),
                }
            };
            if let Some(first) = last {
                let path = self.index_dir().join(indexfile::file_name(first));
                let reload = || -> std::io::Result<Option<OpenIndex>> {
                    let Some(h) = indexfile::read_header(&path)? else {
                        return Ok(None);
                    };
                    let mut f = indexfile::load_open(&path, &h, cut)?.file;
                    f.disk_covered = cut;
                    index_rewrite(&path, 0, &f.header(cut, false).encode())?;
                    Ok(Some(f))
                };
                let f = reload().map_err(io_err(format!("cutting {}", path.display())))?;
                let mut st = self.inner.st.borrow_mut();
                let ix = st.index.as_mut().expect("index");
                ix.open.push_back(
                    f.unwrap_or_else(|| OpenIndex::new(first, ix.key, ix.slots, ix.max_entries)),
                );
            }
        }
        let mut st = self.inner.st.borrow_mut();
        let ix = st.index.as_mut().expect("index");
        ix.covered = ix.covered.min(cut);
        ix.indexed_upto = cut;
        Ok(())
    }

    async fn delete_index_files(&self, firsts: Vec<u64>) -> Result<()> {
        if firsts.is_empty() {
            return Ok(());
        }
        let dir = self.index_dir();
        for first in &firsts {
            let f = self.inner.index_files.borrow_mut().remove(first);
            if let Some(f) = f {
                let _ = f.close().await;
            }
        }
        let d = dir.clone();
        fsutil::off_shard(move || {
            for first in firsts {
                match std::fs::remove_file(d.join(indexfile::file_name(first))) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            fsutil::sync_dir(&d)
        })
        .await
        .map_err(io_err(format!(
            "deleting key index files in {}",
            dir.display()
        )))
    }

    /// Retention: index files whose records were all deleted go too.
    async fn prune_key_index(&self, log_min: u64) -> Result<()> {
        let gone = match self.inner.st.borrow_mut().index.as_mut() {
            Some(ix) => ix.prune_below(log_min),
            None => return Ok(()),
        };
        if !gone.is_empty() {
            info!(files = gone.len(), "retention deleted key index files");
        }
        self.delete_index_files(gone).await
    }

    /// Writes the key index entries of records below `durable`, and seals full files; then
    /// every record below `durable` is in the files (the checkpoint may vouch for it). The
    /// index is derived data: a failure (a full disk) is logged, the checkpoint stays at
    /// what the files cover, and the ConsumeQueues, the checkpoint and retention go on.
    async fn persist_key_index(&self, durable: u64) {
        if let Err(e) = self.persist_key_index_steps(durable).await {
            warn!(error = %e, "key index not persisted; the next start rebuilds it from the log");
        }
    }

    async fn persist_key_index_steps(&self, durable: u64) -> Result<()> {
        {
            let mut st = self.inner.st.borrow_mut();
            let Some(ix) = st.index.as_mut() else {
                return Ok(());
            };
            // Keys or not, the next start should rescan only past `durable`: an empty file
            // carries that in its header.
            if ix.open.is_empty() && durable > ix.covered {
                ix.open
                    .push_back(OpenIndex::new(durable, ix.key, ix.slots, ix.max_entries));
            }
        }
        loop {
            let step = {
                let st = self.inner.st.borrow();
                let ix = st.index.as_ref().expect("index");
                let len = ix.open.len();
                let mut step = None;
                for (i, f) in ix.open.iter().enumerate() {
                    let next_first = ix.open.get(i + 1).map(|n| n.first_phys);
                    let covered = durable.min(next_first.unwrap_or(u64::MAX));
                    if let Some((first, bytes, n)) = f.unpersisted_below(durable) {
                        let mut h = f.header(covered, false);
                        h.count += n;
                        step = Some(IndexStep::Write {
                            first_phys: f.first_phys,
                            pos: indexfile::entry_pos(f.slot_count(), first),
                            bytes,
                            n,
                            header: h.encode(),
                            covered,
                        });
                        break;
                    }
                    if (i + 1 < len || f.is_full()) && f.all_persisted() {
                        step = Some(IndexStep::Seal {
                            first_phys: f.first_phys,
                            slots_bytes: f.slot_bytes(),
                            header: f.header(covered, true).encode(),
                            sealed: indexfile::Sealed {
                                first_phys: f.first_phys,
                                covered,
                                begin_ts: f.begin_ts,
                                end_ts: f.end_ts,
                            },
                        });
                        break;
                    }
                    if i + 1 == len && f.disk_covered < covered {
                        step = Some(IndexStep::Header {
                            first_phys: f.first_phys,
                            header: f.header(covered, false).encode(),
                            covered,
                        });
                    }
                }
                step
            };
            let Some(step) = step else {
                break;
            };
            self.inner.cq_unsynced.set(true);
            match step {
                IndexStep::Write {
                    first_phys,
                    pos,
                    bytes,
                    n,
                    header,
                    covered,
                } => {
                    let f = self.index_file(first_phys).await?;
                    let r = match index_write(&f, bytes, pos).await {
                        Ok(()) => index_write(&f, header, 0).await,
                        Err(e) => Err(e),
                    };
                    self.inner.index_files.borrow_mut().insert(first_phys, f);
                    r?;
                    let mut st = self.inner.st.borrow_mut();
                    let ix = st.index.as_mut().expect("index");
                    if let Some(o) = ix.open.iter_mut().find(|o| o.first_phys == first_phys) {
                        o.mark_persisted(n);
                        o.disk_covered = covered;
                    }
                }
                IndexStep::Header {
                    first_phys,
                    header,
                    covered,
                } => {
                    let f = self.index_file(first_phys).await?;
                    let r = index_write(&f, header, 0).await;
                    self.inner.index_files.borrow_mut().insert(first_phys, f);
                    r?;
                    let mut st = self.inner.st.borrow_mut();
                    let ix = st.index.as_mut().expect("index");
                    if let Some(o) = ix.open.iter_mut().find(|o| o.first_phys == first_phys) {
                        o.disk_covered = covered;
                    }
                }
                IndexStep::Seal {
                    first_phys,
                    slots_bytes,
                    header,
                    sealed,
                } => {
                    let f = self.index_file(first_phys).await?;
                    let r = async {
                        let sync = |e| gio("syncing a key index file", e);
                        index_write(&f, slots_bytes, indexfile::HEADER_LEN).await?;
                        // The slots are durable before the header says they are there.
                        f.fdatasync().await.map_err(sync)?;
                        index_write(&f, header, 0).await?;
                        f.fdatasync().await.map_err(sync)
                    }
                    .await;
                    let _ = f.close().await;
                    r?;
                    let mut st = self.inner.st.borrow_mut();
                    let ix = st.index.as_mut().expect("index");
                    ix.open.retain(|o| o.first_phys != first_phys);
                    ix.sealed.push(sealed);
                    debug!(first_phys, "sealed a key index file");
                }
            }
        }
        if let Some(ix) = self.inner.st.borrow_mut().index.as_mut() {
            ix.covered = ix.covered.max(durable);
        }
        Ok(())
    }

    /// The open key index file starting at `first_phys`, opened (made) on first use.
    async fn index_file(&self, first_phys: u64) -> Result<BufferedFile> {
        if let Some(f) = self.inner.index_files.borrow_mut().remove(&first_phys) {
            return Ok(f);
        }
        let path = self.index_dir().join(indexfile::file_name(first_phys));
        open_cq_file(&self.index_dir(), &path).await
    }

    /// Messages of `topic` whose keys (or, with `unique`, whose unique key) include `key`,
    /// stored between `begin_ms` and `end_ms`: the newest `max` (and about
    /// [`indexfile::MAX_QUERY_BYTES`]), in log order, and whether the answer may be
    /// incomplete (the query reached its bounds). Each record is read back and compared, so
    /// a hash shared with another key returns nothing wrong. One query runs at a time per
    /// shard, and every candidate read counts against [`indexfile::MAX_QUERY_READ_BYTES`]:
    /// keys made to collide can slow their own queries, not the shard.
    pub async fn query_key(
        &self,
        topic: &str,
        key: &str,
        unique: bool,
        begin_ms: u64,
        end_ms: u64,
        max: usize,
    ) -> Result<(Vec<Bytes>, bool)> {
        let max = max.clamp(1, indexfile::MAX_QUERY_RESULTS);
        let _one = self.inner.querying.enter().await;
        let (mut walk, files) = {
            let st = self.inner.st.borrow();
            let Some(ix) = st.index.as_ref() else {
                return Err(StoreError::IndexDisabled);
            };
            let mut walk = Walk::new(ix.key.key_hash(topic, key), begin_ms, end_ms);
            let files = ix.plan_query(&mut walk, &self.index_dir());
            (walk, files)
        };
        if !files.is_empty() && !walk.done() {
            walk = fsutil::off_shard(move || {
                indexfile::walk_files(&files, &mut walk);
                walk
            })
            .await;
        }
        let mut truncated = walk.truncated;
        let mut found = walk.found;
        found.sort_unstable();
        found.dedup_by_key(|(phys, _)| *phys);
        // The newest `max` matches, returned oldest first.
        let mut out = Vec::new();
        let (mut bytes, mut read) = (0, 0);
        for (phys, size) in found.into_iter().rev() {
            if out.len() >= max {
                break;
            }
            read += size as usize;
            if read > indexfile::MAX_QUERY_READ_BYTES
                || bytes + size as usize > indexfile::MAX_QUERY_BYTES
            {
                truncated = true;
                break;
            }
            // Deleted by retention since, or damaged: not served.
            let b = match self.record_exact(phys, size).await {
                Ok(b) => b,
                Err(e) => {
                    debug!(phys, error = %e, "a key index entry's record cannot be read");
                    continue;
                }
            };
            let Ok(v) = record::decode(&b) else { continue };
            if record::matches_key_query(&v, topic, key, unique, begin_ms..=end_ms) {
                bytes += b.len();
                out.push(b);
            }
        }
        out.reverse();
        Ok((out, truncated))
    }

    /// The CRC-checked record at `phys`, reading exactly its bytes (no read-ahead: a query's
    /// records are scattered).
    async fn record_exact(&self, phys: u64, size: u32) -> Result<Bytes> {
        self.record_reading(phys, size, 0, &mut None).await
    }

    /// The record that starts at log offset `phys` (an offset message id's position);
    /// `None` when no whole record starts there (never written, deleted, or not a record's
    /// start).
    pub async fn record_by_offset(&self, phys: u64) -> Result<Option<Bytes>> {
        let seg_size = self.inner.cfg.segment_size;
        let (file, written, cached_len) = {
            let st = self.inner.st.borrow();
            if phys >= st.written {
                return Ok(None);
            }
            let base = phys - phys % seg_size;
            (
                st.segments.get(&base).cloned(),
                st.written,
                st.cache.get(phys, 4),
            )
        };
        let Some(file) = file else {
            return Ok(None);
        };
        let len_bytes = match cached_len {
            Some(b) => b.to_vec(),
            None => file
                .read_at(phys % seg_size, 4)
                .await
                .map_err(|e| gio("reading the CommitLog", e))?
                .to_vec(),
        };
        let Ok(len) = <[u8; 4]>::try_from(len_bytes.as_slice()) else {
            return Ok(None);
        };
        let size = u32::from_le_bytes(len);
        let seg_end = phys - phys % seg_size + seg_size;
        let fits = (size as u64) >= 4
            && (size as usize) <= orbitmq_proto::limits::MAX_RECORD_LEN
            && phys + size as u64 <= written.min(seg_end);
        if !fits {
            return Ok(None);
        }
        match self.record_exact(phys, size).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

async fn index_write(f: &BufferedFile, bytes: Vec<u8>, pos: u64) -> Result<()> {
    let n = bytes.len();
    match f.write_at(bytes, pos).await {
        Ok(w) if w == n => Ok(()),
        Ok(w) => Err(StoreError::io(
            "writing a key index file",
            std::io::Error::other(format!("short write {w} of {n}")),
        )),
        Err(e) => Err(gio("writing a key index file", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_segment_is_pre_written_gently_only_while_the_active_one_is_under_half_full() {
        const SEG: u64 = 1 << 30;
        // Segment 2 prepared while segment 1 takes the appends.
        let base = 2 * SEG;
        assert!(prewrite_paced(SEG, base, SEG), "active segment empty");
        assert!(
            prewrite_paced(SEG + SEG / 2 - 1, base, SEG),
            "just under half full"
        );
        assert!(!prewrite_paced(SEG + SEG / 2, base, SEG), "half full");
        assert!(!prewrite_paced(base - 1, base, SEG), "about to need it");
        assert!(!prewrite_paced(base, base, SEG), "appends wait for it");
        assert!(!prewrite_paced(base + 4096, base, SEG));
        assert!(prewrite_paced(0, base, SEG), "a segment further ahead");
    }
}
