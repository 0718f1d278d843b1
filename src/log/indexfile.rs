//! IndexFile: a message's keys and unique key to its CommitLog offset, for queries by key
//! (RocketMQ's IndexFile, with a layout of our own). Pure logic and the file format; the
//! store (store.rs) does the I/O around it, and [`walk_file`] is the one blocking reader.
//!
//! A shard's index is a series of files in `shard-<k>/index/`, each named by the 20-digit
//! CommitLog offset of its first entry:
//!
//! ```text
//! header (80 bytes) | hash slots (slots x 4) | entries (max_entries x 28)
//! header: magic u32, flags u32 (bit 0: sealed), slots u32, max_entries u32, count u32,
//!         reserved u32, first_phys u64, covered u64, begin_ts u64, end_ts u64,
//!         hash key [u8; 16], crc32c u32 (of the 72 bytes before it), reserved u32
//! slot:   the number (1-based) of the newest entry whose key hash falls in the slot, 0: none;
//!         a hash's slot is `hash * slots >> 32`
//! entry:  key hash u32, record size u32, CommitLog offset u64, store time (ms) u64,
//!         previous entry of the same slot u32 (0: none)
//! ```
//!
//! Key hashes are SipHash-1-3 of `topic#key` under the shard's random hash key, which every
//! file of the shard carries: a client cannot pick keys that share a slot with a key it wants
//! to slow down, as it could with an unkeyed hash. (Files of the first format, hashed with
//! CRC32C, fail the magic and are rebuilt from the log.)
//!
//! All little-endian. `covered`: every record below this log offset has its keys in this file
//! or an earlier one. Entries are appended in log order, so a slot's chain runs from the
//! newest to the oldest entry and a walk stops once entries are older than a query's range.
//! The open (newest) file keeps its slots in memory and writes only entries and the header as
//! it goes; its slots are written once, when it is full and sealed. Recovery rebuilds an open
//! file's slots from its entries.

use std::hash::Hasher;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Marks an index file ("OIX2"; the first format, "OIDX", had no hash key).
pub const INDEX_MAGIC: u32 = 0x3258_494F;
pub const HEADER_LEN: u64 = 80;
/// Where the header's CRC sits: it covers the bytes before it.
const HEADER_CRC_AT: usize = 72;
pub const SLOT_LEN: u64 = 4;
pub const ENTRY_LEN: u64 = 28;
/// Header flag: the file is full and its slots are written.
const FLAG_SEALED: u32 = 1;
/// RocketMQ's `maxHashSlotNum` is 5,000,000 and `maxIndexNum` 20,000,000 (420 MB a file,
/// mapped). Ours keep the open file's slots in memory (4 bytes each), so files are smaller.
pub const DEFAULT_MAX_HASH_SLOTS: u32 = 1_000_000;
pub const DEFAULT_MAX_INDEX_NUM: u32 = 4_000_000;
/// Bounds of the two settings: a file stays under 4 GiB and its slots under 64 MiB.
pub const MAX_HASH_SLOTS: u32 = 16 << 20;
pub const MAX_INDEX_NUM: u32 = 100_000_000;
pub use orbitmq_proto::record::KEY_SEPARATOR;
/// Most results a query returns from one shard.
pub const MAX_QUERY_RESULTS: usize = orbitmq_proto::limits::MAX_QUERY_MESSAGES as usize;
/// Most record bytes a query answer carries (under the 16 MiB frame limit).
pub const MAX_QUERY_BYTES: usize = orbitmq_proto::limits::MAX_QUERY_BYTES;
/// Most entries with the key's hash a query gathers before reading records: a hash shared
/// with other keys is rare (32 bits), so this leaves room past `MAX_QUERY_RESULTS`.
pub const MAX_QUERY_CANDIDATES: usize = 4 * MAX_QUERY_RESULTS;
/// Most chain links one query follows in all: other keys in the same slot cannot make a
/// query run for long (each link read from a file is a read of 28 bytes).
pub const MAX_QUERY_HOPS: usize = 100_000;
/// Most log bytes one query reads to check its candidates (matching or not).
pub const MAX_QUERY_READ_BYTES: usize = 2 * MAX_QUERY_BYTES;
/// Most keys of one record that are indexed (besides its unique key): a record's keys field
/// (up to 1 KiB) could otherwise name hundreds, each an entry to write.
pub const MAX_INDEXED_KEYS: usize = 32;
/// Entries read at a time when an open file is loaded at recovery.
const LOAD_CHUNK_ENTRIES: usize = 32 * 1024;

/// The secret key a shard's index hashes keys under (SipHash-1-3's 128 bits), random for
/// each new index and kept in each of its files' headers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKey(pub [u8; HASH_KEY_LEN]);

pub const HASH_KEY_LEN: usize = 16;

impl std::fmt::Debug for HashKey {
    /// A secret: not in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

impl HashKey {
    /// A new random key from the kernel's generator (getrandom(2) fails only where the
    /// system call is not allowed, or before the kernel's generator is seeded).
    pub fn random() -> std::io::Result<HashKey> {
        let mut k = [0u8; HASH_KEY_LEN];
        let mut got = 0;
        while got < k.len() {
            // SAFETY: writes at most the rest of `k`, which outlives the call.
            let n = unsafe { libc::getrandom(k[got..].as_mut_ptr().cast(), k.len() - got, 0) };
            if n > 0 {
                got += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(HashKey(k))
    }

    /// The hash a key is indexed under: its topic and the key, as RocketMQ's `topic#key`.
    pub fn key_hash(&self, topic: &str, key: &str) -> u32 {
        self.topic(topic).key(key)
    }

    /// The topic's part of [`Self::key_hash`], computed once for all keys of a batch.
    pub fn topic(&self, topic: &str) -> TopicHasher {
        let (k0, k1) = self.0.split_at(8);
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let mut h = siphasher::sip::SipHasher13::new_with_keys(word(k0), word(k1));
        h.write(topic.as_bytes());
        // Topic names have no '#': `topic#key` is unambiguous.
        h.write(b"#");
        TopicHasher(h)
    }
}

/// A hasher that has taken a topic (see [`HashKey::topic`]).
#[derive(Clone)]
pub struct TopicHasher(siphasher::sip::SipHasher13);

impl TopicHasher {
    pub fn key(&self, key: &str) -> u32 {
        let mut h = self.0;
        h.write(key.as_bytes());
        let x = h.finish();
        (x ^ (x >> 32)) as u32
    }
}

/// Calls `f` with each key of a record that is indexed: its distinct keys (the first
/// [`MAX_INDEXED_KEYS`]), and its unique key. No allocation: this runs for every message.
pub fn indexed_keys<'a>(keys: &'a str, uniq_key: Option<&'a str>, mut f: impl FnMut(&'a str)) {
    let mut seen: [&str; MAX_INDEXED_KEYS] = [""; MAX_INDEXED_KEYS];
    let mut n = 0;
    for k in keys.split(KEY_SEPARATOR).filter(|k| !k.is_empty()) {
        if n == MAX_INDEXED_KEYS {
            break;
        }
        if !seen[..n].contains(&k) {
            seen[n] = k;
            n += 1;
            f(k);
        }
    }
    if let Some(u) = uniq_key.filter(|u| !u.is_empty() && !seen[..n].contains(u)) {
        f(u);
    }
}

/// The slot of a hash among `slots` (a multiply and a shift: no division per message).
pub fn slot_of(hash: u32, slots: u32) -> usize {
    ((u64::from(hash) * u64::from(slots)) >> 32) as usize
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hash: u32,
    pub size: u32,
    pub phys: u64,
    pub ts: u64,
    pub prev: u32,
}

impl Entry {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.phys.to_le_bytes());
        out.extend_from_slice(&self.ts.to_le_bytes());
        out.extend_from_slice(&self.prev.to_le_bytes());
    }

    /// `b` is exactly [`ENTRY_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Entry {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Entry {
            hash: u32_at(0),
            size: u32_at(4),
            phys: u64_at(8),
            ts: u64_at(16),
            prev: u32_at(24),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub sealed: bool,
    pub slots: u32,
    pub max_entries: u32,
    pub count: u32,
    pub first_phys: u64,
    pub covered: u64,
    pub begin_ts: u64,
    pub end_ts: u64,
    pub key: HashKey,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN as usize);
        b.extend_from_slice(&INDEX_MAGIC.to_le_bytes());
        b.extend_from_slice(&u32::from(self.sealed).to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&self.max_entries.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for v in [self.first_phys, self.covered, self.begin_ts, self.end_ts] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.key.0);
        debug_assert_eq!(b.len(), HEADER_CRC_AT);
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        debug_assert_eq!(b.len() as u64, HEADER_LEN);
        b
    }

    /// A header that passes its magic, CRC and bounds; `None` otherwise.
    pub fn decode(b: &[u8]) -> Option<Header> {
        if (b.len() as u64) < HEADER_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != INDEX_MAGIC || u32_at(HEADER_CRC_AT) != crc32c::crc32c(&b[..HEADER_CRC_AT])
        {
            return None;
        }
        let h = Header {
            sealed: u32_at(4) & FLAG_SEALED != 0,
            slots: u32_at(8),
            max_entries: u32_at(12),
            count: u32_at(16),
            first_phys: u64_at(24),
            covered: u64_at(32),
            begin_ts: u64_at(40),
            end_ts: u64_at(48),
            key: HashKey(b[56..HEADER_CRC_AT].try_into().expect("16 bytes")),
        };
        let sane = (1..=MAX_HASH_SLOTS).contains(&h.slots)
            && (1..=MAX_INDEX_NUM).contains(&h.max_entries)
            && h.count <= h.max_entries
            && h.covered >= h.first_phys;
        sane.then_some(h)
    }

    pub fn slot_pos(&self, hash: u32) -> u64 {
        HEADER_LEN + slot_of(hash, self.slots) as u64 * SLOT_LEN
    }

    /// Where entry `n` (1-based) sits in the file.
    pub fn entry_pos(&self, n: u32) -> u64 {
        entry_pos(self.slots, n)
    }
}

pub fn entry_pos(slots: u32, n: u32) -> u64 {
    debug_assert!(n >= 1);
    HEADER_LEN + u64::from(slots) * SLOT_LEN + u64::from(n - 1) * ENTRY_LEN
}

pub fn file_name(first_phys: u64) -> String {
    format!("{first_phys:020}")
}

/// The newest index file: slots in memory, entries not yet written kept in memory.
#[derive(Debug)]
pub struct OpenIndex {
    pub first_phys: u64,
    /// The key its entries' hashes were made with (the shard's).
    pub key: HashKey,
    pub max_entries: u32,
    slots: Vec<u32>,
    /// Entries in the file and in memory.
    pub count: u32,
    /// Entries 1..=persisted are written to the file.
    pub persisted: u32,
    /// Entries persisted+1..=count.
    pending: Vec<Entry>,
    pub begin_ts: u64,
    pub end_ts: u64,
    /// `covered` as the file's header on disk says.
    pub disk_covered: u64,
}

impl OpenIndex {
    pub fn new(first_phys: u64, key: HashKey, slots: u32, max_entries: u32) -> OpenIndex {
        OpenIndex {
            first_phys,
            key,
            max_entries,
            slots: vec![0; slots as usize],
            count: 0,
            persisted: 0,
            pending: Vec::new(),
            begin_ts: 0,
            end_ts: 0,
            disk_covered: 0,
        }
    }

    /// Takes back an entry read from the file (entries in order, all persisted).
    fn push_loaded(&mut self, e: &Entry) {
        self.count += 1;
        self.persisted = self.count;
        let slot = slot_of(e.hash, self.slot_count());
        self.slots[slot] = self.count;
        if self.count == 1 {
            self.begin_ts = e.ts;
        }
        self.end_ts = self.end_ts.max(e.ts);
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_full(&self) -> bool {
        self.count >= self.max_entries
    }

    pub fn add(&mut self, hash: u32, size: u32, phys: u64, ts: u64) {
        assert!(
            !self.is_full(),
            "an index file takes no entry past its maximum"
        );
        let slot = slot_of(hash, self.slot_count());
        let prev = self.slots[slot];
        self.count += 1;
        self.slots[slot] = self.count;
        if self.count == 1 {
            self.begin_ts = ts;
        }
        self.end_ts = self.end_ts.max(ts);
        self.pending.push(Entry {
            hash,
            size,
            phys,
            ts,
            prev,
        });
    }

    /// The newest entry of `hash`'s slot (0: none).
    pub fn head(&self, hash: u32) -> u32 {
        self.slots[slot_of(hash, self.slot_count())]
    }

    /// Entry `n` if it is still in memory.
    pub fn pending_entry(&self, n: u32) -> Option<Entry> {
        n.checked_sub(self.persisted + 1)
            .and_then(|i| self.pending.get(i as usize))
            .copied()
    }

    /// The entries to write for records below log offset `durable`: (first entry's number,
    /// their bytes, how many). Entries are in log order, so they are a prefix of the pending.
    pub fn unpersisted_below(&self, durable: u64) -> Option<(u32, Vec<u8>, u32)> {
        let n = self.pending.partition_point(|e| e.phys < durable);
        if n == 0 {
            return None;
        }
        let mut bytes = Vec::with_capacity(n * ENTRY_LEN as usize);
        for e in &self.pending[..n] {
            e.encode_into(&mut bytes);
        }
        Some((self.persisted + 1, bytes, n as u32))
    }

    pub fn mark_persisted(&mut self, n: u32) {
        let n = n.min(self.pending.len() as u32);
        self.pending.drain(..n as usize);
        self.persisted += n;
    }

    pub fn all_persisted(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn header(&self, covered: u64, sealed: bool) -> Header {
        Header {
            sealed,
            slots: self.slot_count(),
            max_entries: self.max_entries,
            count: self.persisted,
            first_phys: self.first_phys,
            covered,
            begin_ts: self.begin_ts,
            end_ts: self.end_ts,
            key: self.key,
        }
    }

    /// The slot table as written when the file is sealed.
    pub fn slot_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.slots.len() * SLOT_LEN as usize);
        for s in &self.slots {
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }
}

/// A sealed file: on disk only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub first_phys: u64,
    pub covered: u64,
    pub begin_ts: u64,
    pub end_ts: u64,
}

/// A shard's key index as its store holds it: sealed files, and the open ones (all but the
/// last are full and wait for their entries to be written before they are sealed).
#[derive(Debug)]
pub struct KeyIndex {
    /// What every file of the index hashes keys with.
    pub key: HashKey,
    pub slots: u32,
    pub max_entries: u32,
    pub sealed: Vec<Sealed>,
    pub open: std::collections::VecDeque<OpenIndex>,
    /// Records below this log offset were offered to the index (a rescan skips them).
    pub indexed_upto: u64,
    /// Records below this log offset have their entries written to the files (the checkpoint
    /// never vouches past it).
    pub covered: u64,
}

impl KeyIndex {
    pub fn new(key: HashKey, slots: u32, max_entries: u32) -> KeyIndex {
        KeyIndex {
            key,
            slots,
            max_entries,
            sealed: Vec::new(),
            open: std::collections::VecDeque::new(),
            indexed_upto: 0,
            covered: 0,
        }
    }

    /// Adds the keys of the record at `phys`, once: a record below what was offered already
    /// (a rescan) is skipped. A record's keys stay in one file; past `max_entries` keys of
    /// one record (over the file's size) the rest are not indexed.
    pub fn add_record(&mut self, hashes: &[u32], size: u32, phys: u64, ts: u64) {
        if phys < self.indexed_upto {
            return;
        }
        self.indexed_upto = phys + u64::from(size);
        if hashes.is_empty() {
            return;
        }
        let n = hashes.len().min(self.max_entries as usize);
        let roll = self
            .open
            .back()
            .is_none_or(|f| f.count as usize + n > f.max_entries as usize);
        if roll {
            self.open
                .push_back(OpenIndex::new(phys, self.key, self.slots, self.max_entries));
        }
        let f = self.open.back_mut().expect("an open file");
        for h in &hashes[..n] {
            f.add(*h, size, phys, ts);
        }
    }

    /// Touches the slots `hashes` will update, all before any update: the loads are
    /// independent, so their cache misses overlap instead of costing one each in turn (the
    /// slot table is megabytes, and a miss per key was 5% of a busy shard's CPU).
    pub fn prefetch(&self, hashes: &[u32]) {
        if let Some(f) = self.open.back() {
            let n = f.slot_count();
            let mut x = 0u32;
            for h in hashes {
                x ^= f.slots[slot_of(*h, n)];
            }
            std::hint::black_box(x);
        }
    }

    /// Walks the entries held in memory, newest file first, and returns the file parts the
    /// walk must read on the blocking pool (open files from where memory ended, then the
    /// sealed files in the time range, newest first).
    pub fn plan_query(&self, walk: &mut Walk, dir: &Path) -> Vec<FileWalk> {
        let mut files = Vec::new();
        for f in self.open.iter().rev() {
            if walk.done() {
                return files;
            }
            if f.count == 0 || f.begin_ts > walk.end_ms || f.end_ts < walk.begin_ms {
                continue;
            }
            let at = walk.follow(f.head(walk.hash), |n| {
                Ok::<_, std::convert::Infallible>(f.pending_entry(n))
            });
            if let Ok(Some(n)) = at {
                files.push(FileWalk {
                    path: dir.join(file_name(f.first_phys)),
                    from: Some((n, f.slot_count())),
                });
            }
        }
        files.extend(
            self.sealed
                .iter()
                .rev()
                .filter(|s| s.begin_ts <= walk.end_ms && s.end_ts >= walk.begin_ms)
                .map(|s| FileWalk {
                    path: dir.join(file_name(s.first_phys)),
                    from: None,
                }),
        );
        files
    }

    /// Sealed files whose records all lie below `log_min` (deleted by retention): removed
    /// from the index, returned for deletion.
    pub fn prune_below(&mut self, log_min: u64) -> Vec<u64> {
        let n = self.sealed.partition_point(|s| s.covered <= log_min);
        self.sealed.drain(..n).map(|s| s.first_phys).collect()
    }
}

/// Checks entries read back from a file, in order: offsets never go back, each points to an
/// earlier entry, none is zeroed. A torn or zeroed tail fails it.
struct Validator {
    last: u64,
    n: u32,
}

impl Validator {
    fn ok(&mut self, e: &Entry) -> bool {
        let n = self.n + 1;
        if e.size == 0 || e.phys < self.last || e.prev >= n {
            return false;
        }
        self.last = e.phys;
        self.n = n;
        true
    }
}

/// An open file loaded at recovery: rebuilt from its entries below `end`, read in chunks.
pub struct Loaded {
    pub file: OpenIndex,
    /// An entry failed its check, or the file is shorter than its header says.
    pub damaged: bool,
    /// Offset of the last entry kept.
    pub last_phys: Option<u64>,
}

/// Loads an unsealed file's entries below log offset `end` (its covered end, or the log's
/// recovered end), stopping at the first damaged one.
pub fn load_open(path: &Path, h: &Header, end: u64) -> std::io::Result<Loaded> {
    let file = std::fs::File::open(path)?;
    let mut ix = OpenIndex::new(h.first_phys, h.key, h.slots, h.max_entries);
    let mut check = Validator {
        last: h.first_phys,
        n: 0,
    };
    let mut buf = vec![0u8; LOAD_CHUNK_ENTRIES * ENTRY_LEN as usize];
    let mut next = 1u32;
    let mut last_phys = None;
    while next <= h.count {
        let want = ((h.count - next + 1) as usize).min(LOAD_CHUNK_ENTRIES);
        let got = read_at_most(
            &file,
            &mut buf[..want * ENTRY_LEN as usize],
            h.entry_pos(next),
        )?;
        let whole = got / ENTRY_LEN as usize;
        for b in buf[..whole * ENTRY_LEN as usize].chunks_exact(ENTRY_LEN as usize) {
            let e = Entry::decode(b);
            if e.phys >= end {
                return Ok(Loaded {
                    file: ix,
                    damaged: false,
                    last_phys,
                });
            }
            if !check.ok(&e) {
                return Ok(Loaded {
                    file: ix,
                    damaged: true,
                    last_phys,
                });
            }
            ix.push_loaded(&e);
            last_phys = Some(e.phys);
        }
        if whole < want {
            return Ok(Loaded {
                file: ix,
                damaged: true,
                last_phys,
            });
        }
        next += want as u32;
    }
    Ok(Loaded {
        file: ix,
        damaged: false,
        last_phys,
    })
}

/// A query's walk over slot chains: gathers (offset, size) of entries with the key's hash and
/// a store time in range, newest first, within the query's bounds.
#[derive(Debug)]
pub struct Walk {
    pub hash: u32,
    pub begin_ms: u64,
    pub end_ms: u64,
    pub hops_left: usize,
    pub found: Vec<(u64, u32)>,
    /// The walk reached its bounds with links left to follow: the answer may be incomplete.
    pub truncated: bool,
}

impl Walk {
    pub fn new(hash: u32, begin_ms: u64, end_ms: u64) -> Walk {
        Walk {
            hash,
            begin_ms,
            end_ms,
            hops_left: MAX_QUERY_HOPS,
            found: Vec::new(),
            truncated: false,
        }
    }

    pub fn done(&self) -> bool {
        self.hops_left == 0 || self.found.len() >= MAX_QUERY_CANDIDATES
    }

    /// Follows a chain from entry `n`. `entry(n)` gives the entry, or `None` when it is not
    /// at hand: the walk then returns `Some(n)` so the caller can go on where it is (the
    /// file). `None`: the chain ended, or the walk reached its bounds or older entries.
    pub fn follow<E>(
        &mut self,
        mut n: u32,
        mut entry: impl FnMut(u32) -> Result<Option<Entry>, E>,
    ) -> Result<Option<u32>, E> {
        while n > 0 && !self.done() {
            let Some(e) = entry(n)? else {
                return Ok(Some(n));
            };
            self.hops_left -= 1;
            if e.ts < self.begin_ms {
                return Ok(None); // the rest of the chain is older still
            }
            if e.hash == self.hash && e.ts <= self.end_ms {
                self.found.push((e.phys, e.size));
            }
            // Links only go back: a damaged file cannot make the walk loop.
            if e.prev >= n {
                return Ok(None);
            }
            n = e.prev;
        }
        self.truncated |= n > 0;
        Ok(None)
    }
}

/// One file a query reads on the blocking pool: an open file from entry `from` (where its
/// in-memory part ended; with its slot count, as its header may be rewritten meanwhile), or a
/// sealed file from the slot of the walk's hash.
#[derive(Clone, Debug)]
pub struct FileWalk {
    pub path: std::path::PathBuf,
    pub from: Option<(u32, u32)>,
}

/// Walks the chains of `files` in order, reading with `pread` (the page cache serves most
/// reads). A file that is gone (retention) or damaged ends its part of the walk.
pub fn walk_files(files: &[FileWalk], walk: &mut Walk) {
    for f in files {
        if walk.done() {
            return;
        }
        let _ = walk_file(&f.path, f.from, walk);
    }
}

fn walk_file(path: &Path, from: Option<(u32, u32)>, walk: &mut Walk) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let (start, slots, bound) = match from {
        Some((n, slots)) => (n, slots, n),
        None => {
            let mut hb = vec![0u8; HEADER_LEN as usize];
            (&file).read_exact(&mut hb)?;
            let Some(h) = Header::decode(&hb).filter(|h| h.sealed) else {
                return Ok(());
            };
            let mut s = [0u8; SLOT_LEN as usize];
            file.read_exact_at(&mut s, h.slot_pos(walk.hash))?;
            (u32::from_le_bytes(s), h.slots, h.count)
        }
    };
    let mut eb = [0u8; ENTRY_LEN as usize];
    walk.follow(start, |n| {
        if n > bound {
            return Ok(None);
        }
        file.read_exact_at(&mut eb, entry_pos(slots, n))?;
        Ok::<_, std::io::Error>(Some(Entry::decode(&eb)))
    })?;
    Ok(())
}

/// Reads up to `buf.len()` bytes at `pos`; fewer at the end of the file.
fn read_at_most(file: &std::fs::File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], pos + got as u64)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Reads a file's header; `None` when it is missing, short or fails its check.
pub fn read_header(path: &Path) -> std::io::Result<Option<Header>> {
    let file = std::fs::File::open(path)?;
    let mut hb = vec![0u8; HEADER_LEN as usize];
    let got = read_at_most(&file, &mut hb, 0)?;
    Ok(Header::decode(&hb[..got]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const K: HashKey = HashKey([7; HASH_KEY_LEN]);

    fn key_hash(topic: &str, key: &str) -> u32 {
        K.key_hash(topic, key)
    }

    fn walk_memory(ix: &OpenIndex, w: &mut Walk) -> Option<u32> {
        let start = ix.head(w.hash);
        w.follow(start, |n| Ok::<_, ()>(ix.pending_entry(n)))
            .unwrap()
    }

    #[test]
    fn a_chain_finds_every_entry_of_a_key_newest_first() {
        let mut ix = OpenIndex::new(0, K, 4, 100);
        let (a, b) = (key_hash("T", "a"), key_hash("T", "b"));
        for i in 0..10u64 {
            ix.add(if i % 3 == 0 { a } else { b }, 10, i * 10, 1000 + i);
        }
        let mut w = Walk::new(a, 0, u64::MAX);
        assert_eq!(walk_memory(&ix, &mut w), None);
        assert_eq!(
            w.found,
            vec![(90, 10), (60, 10), (30, 10), (0, 10)],
            "every entry of key a, newest first"
        );
        // A time range stops the walk at older entries and skips newer ones.
        let mut w = Walk::new(a, 1003, 1006);
        walk_memory(&ix, &mut w);
        assert_eq!(w.found, vec![(60, 10), (30, 10)]);
    }

    #[test]
    fn keys_of_a_record_are_its_distinct_keys_and_unique_key() {
        let keys = |k: &'static str, u: Option<&'static str>| {
            let mut v = Vec::new();
            indexed_keys(k, u, |x| v.push(x));
            v
        };
        assert_eq!(
            keys("order-1  order-2", Some("U1")),
            ["order-1", "order-2", "U1"]
        );
        assert!(keys("", None).is_empty());
        assert_eq!(keys("a a b a", Some("a")), ["a", "b"], "each key once");
        let many: String = (0..100).map(|i| format!("k{i} ")).collect();
        let many: &'static str = Box::leak(many.into_boxed_str());
        assert_eq!(keys(many, Some("U")).len(), MAX_INDEXED_KEYS + 1);
        assert_ne!(
            key_hash("T", "a"),
            key_hash("U", "a"),
            "the topic is part of the key"
        );
        assert_ne!(
            key_hash("Ta", "b"),
            key_hash("T", "ab"),
            "the separator keeps them apart"
        );
        // Keyed: another key hashes differently, so hashes cannot be predicted without it.
        let other = HashKey([8; HASH_KEY_LEN]);
        assert_ne!(other.key_hash("T", "a"), key_hash("T", "a"));
        assert_ne!(HashKey::random().unwrap(), HashKey::random().unwrap());
        assert_eq!(
            format!("{other:?}"),
            "HashKey(..)",
            "the secret stays out of logs"
        );
        for slots in [1, 7, 1 << 20] {
            for h in [0, 1, u32::MAX / 2, u32::MAX] {
                assert!(slot_of(h, slots) < slots as usize);
            }
        }
    }

    #[test]
    fn persisted_entries_leave_memory_and_the_walk_asks_for_them() {
        let mut ix = OpenIndex::new(100, K, 8, 100);
        let h = key_hash("T", "k");
        for i in 0..5u64 {
            ix.add(h, 7, 100 + i * 7, 5);
        }
        let (first, bytes, n) = ix.unpersisted_below(100 + 3 * 7).unwrap();
        assert_eq!((first, n, bytes.len()), (1, 3, 3 * ENTRY_LEN as usize));
        ix.mark_persisted(n);
        assert_eq!(ix.persisted, 3);
        let mut w = Walk::new(h, 0, u64::MAX);
        assert_eq!(walk_memory(&ix, &mut w), Some(3), "entry 3 is in the file");
        assert_eq!(w.found, vec![(128, 7), (121, 7)]);
        assert_eq!(ix.unpersisted_below(0), None);
    }

    #[test]
    fn a_header_round_trips_and_damage_is_refused() {
        let h = Header {
            sealed: true,
            slots: 16,
            max_entries: 64,
            count: 9,
            first_phys: 4096,
            covered: 9000,
            begin_ts: 1,
            end_ts: 2,
            key: HashKey([3; HASH_KEY_LEN]),
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Some(h));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert_eq!(Header::decode(&bad), None, "CRC");
        assert_eq!(Header::decode(&b[..40]), None, "short");
        let over = Header { count: 65, ..h }.encode();
        assert_eq!(Header::decode(&over), None, "count past the maximum");
    }

    fn write_file(dir: &Path, ix: &OpenIndex, covered: u64) -> std::path::PathBuf {
        let path = dir.join(file_name(ix.first_phys));
        let f = std::fs::File::create(&path).unwrap();
        let (first, bytes, _) = ix.unpersisted_below(u64::MAX).unwrap();
        f.write_all_at(&bytes, entry_pos(ix.slot_count(), first))
            .unwrap();
        let mut h = ix.header(covered, false);
        h.count = ix.count;
        f.write_all_at(&h.encode(), 0).unwrap();
        path
    }

    #[test]
    fn a_loaded_file_has_the_slots_built_by_adding() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = OpenIndex::new(0, K, 5, 50);
        for i in 0..30u64 {
            ix.add(key_hash("T", &format!("k{}", i % 7)), 1, i, i);
        }
        let path = write_file(dir.path(), &ix, 30);
        let h = read_header(&path).unwrap().unwrap();
        let l = load_open(&path, &h, 30).unwrap();
        assert!(!l.damaged);
        assert_eq!(l.file.slot_bytes(), ix.slot_bytes());
        let f = &l.file;
        assert_eq!(
            (f.count, f.persisted, f.begin_ts, f.end_ts),
            (30, 30, 0, 29)
        );
        assert_eq!(l.last_phys, Some(29));
        // Below a lower end: the entries from it on are left out.
        let l = load_open(&path, &h, 10).unwrap();
        assert_eq!((l.file.count, l.damaged, l.last_phys), (10, false, Some(9)));
    }

    #[test]
    fn a_damaged_tail_of_entries_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut ix = OpenIndex::new(10, K, 4, 50);
        for i in 0..6u64 {
            ix.add(key_hash("T", "k"), 5, 10 + i * 5, 0);
        }
        let path = write_file(dir.path(), &ix, 40);
        let h = read_header(&path).unwrap().unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Entry 5 zeroed, as a write that never reached the disk.
        f.write_all_at(&[0u8; ENTRY_LEN as usize], entry_pos(4, 5))
            .unwrap();
        let l = load_open(&path, &h, 40).unwrap();
        assert_eq!((l.file.count, l.damaged, l.last_phys), (4, true, Some(25)));
        // Entry 3 going back in the log.
        let mut bad = Entry {
            hash: 1,
            size: 5,
            phys: 0,
            ts: 0,
            prev: 0,
        };
        let mut b = Vec::new();
        bad.encode_into(&mut b);
        f.write_all_at(&b, entry_pos(4, 3)).unwrap();
        let l = load_open(&path, &h, 40).unwrap();
        assert_eq!((l.file.count, l.damaged), (2, true));
        // Entry 2 linking forward.
        bad.phys = 15;
        bad.prev = 2;
        let mut b = Vec::new();
        bad.encode_into(&mut b);
        f.write_all_at(&b, entry_pos(4, 2)).unwrap();
        let l = load_open(&path, &h, 40).unwrap();
        assert_eq!((l.file.count, l.damaged), (1, true));
        // A file shorter than its header says.
        f.set_len(entry_pos(4, 2) + 3).unwrap();
        let l = load_open(&path, &h, 40).unwrap();
        assert_eq!((l.file.count, l.damaged), (1, true));
    }

    #[test]
    fn a_record_is_indexed_once_and_its_keys_stay_in_one_file() {
        let mut ix = KeyIndex::new(K, 4, 5);
        ix.add_record(&[1, 2], 10, 0, 1);
        ix.add_record(&[1, 2], 10, 0, 1);
        assert_eq!(
            ix.open.back().unwrap().count,
            2,
            "a rescan adds nothing twice"
        );
        ix.add_record(&[], 10, 10, 1);
        assert_eq!(ix.indexed_upto, 20, "a record without keys is offered too");
        ix.add_record(&[3, 4], 10, 20, 1);
        ix.add_record(&[5, 6], 10, 30, 2);
        assert_eq!(
            ix.open.len(),
            2,
            "the second record's keys do not fit the first file"
        );
        assert_eq!(ix.open[0].count, 4);
        assert_eq!(ix.open[1].first_phys, 30);
        ix.add_record(&[7; 9], 10, 40, 2);
        assert_eq!(ix.open.len(), 3);
        assert_eq!(
            ix.open[2].count, 5,
            "keys past a file's size are not indexed"
        );

        let mut w = Walk::new(5, 0, u64::MAX);
        let files = ix.plan_query(&mut w, Path::new("/ix"));
        assert_eq!(w.found, vec![(30, 10)]);
        assert!(files.is_empty(), "everything was in memory");
        ix.sealed.push(Sealed {
            first_phys: 0,
            covered: 30,
            begin_ts: 1,
            end_ts: 1,
        });
        ix.open.pop_front();
        assert!(
            ix.plan_query(&mut Walk::new(1, 2, u64::MAX), Path::new("/ix"))
                .is_empty(),
            "a sealed file out of the time range is not read"
        );
        let files = ix.plan_query(&mut Walk::new(1, 0, u64::MAX), Path::new("/ix"));
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, Path::new("/ix/00000000000000000000"));
        assert_eq!(ix.prune_below(29), Vec::<u64>::new());
        assert_eq!(ix.prune_below(30), vec![0]);
    }

    #[test]
    fn a_walk_stops_at_its_bounds() {
        let mut ix = OpenIndex::new(0, K, 1, 10_000);
        let h = key_hash("T", "k");
        for i in 0..5_000u64 {
            ix.add(h, 1, i, 0);
        }
        let mut w = Walk::new(h, 0, u64::MAX);
        walk_memory(&ix, &mut w);
        assert_eq!(w.found.len(), MAX_QUERY_CANDIDATES);
        assert!(w.truncated, "links were left");
        let mut w = Walk::new(h ^ 1, 0, u64::MAX);
        w.hops_left = 100;
        walk_memory(&ix, &mut w);
        assert!(w.found.is_empty());
        assert_eq!(w.hops_left, 0, "other keys in the slot cost hops");
        assert!(w.truncated);
        let mut w = Walk::new(h, 0, u64::MAX);
        w.hops_left = 5_000;
        walk_memory(&OpenIndex::new(0, K, 1, 10), &mut w);
        assert!(!w.truncated, "an empty chain is complete");
    }
}
