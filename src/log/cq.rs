//! ConsumeQueue: per (topic, queue id), fixed 20-byte entries (CommitLog offset u64, size u32,
//! tag hash u64), so queue offset N is entry N: O(1) lookup, and tag filtering reads no body.
//!
//! Entries live in files of `entries_per_file` entries named by their first queue offset
//! (20 digits), under `consumequeue/<topic>/<queue id>/`. The newest entries are kept in
//! memory until the persist task writes them (one write per dirty file per round, off the
//! acknowledgement path); a short window stays in memory after that for tail readers.
//! A ConsumeQueue is derived data: recovery rebuilds it from the CommitLog.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Bytes of one entry.
pub const CQ_ENTRY_LEN: u64 = 20;
/// Entries kept in memory after they are persisted, for consumers reading at the tail.
pub const CQ_RECENT_ENTRIES: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CqEntry {
    pub phys: u64,
    pub size: u32,
    pub tag_hash: u64,
}

impl CqEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.phys.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.tag_hash.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> CqEntry {
        CqEntry {
            phys: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            size: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            tag_hash: u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")),
        }
    }

    pub fn end(&self) -> u64 {
        self.phys + self.size as u64
    }
}

pub fn file_name(first_offset: u64) -> String {
    format!("{first_offset:020}")
}

/// Directory of one queue's files.
pub fn queue_dir(root: &Path, topic: &str, queue_id: u32) -> PathBuf {
    root.join(topic).join(queue_id.to_string())
}

/// One queue's index: a persisted prefix in files and a tail in memory.
pub struct ConsumeQueue {
    pub topic: Rc<str>,
    pub queue_id: u32,
    pub dir: PathBuf,
    pub entries_per_file: u64,
    /// First readable queue offset (advanced by retention).
    pub min_offset: u64,
    /// Next queue offset to hand out at append time (ahead of `max_offset` while in flight).
    pub next_assign: u64,
    /// Entries below this are in files.
    pub persisted: u64,
    /// Queue offset of `mem[0]`.
    pub mem_base: u64,
    pub mem: VecDeque<CqEntry>,
    /// First queue offsets of the files on disk.
    pub files: BTreeMap<u64, ()>,
}

impl ConsumeQueue {
    pub fn new(root: &Path, topic: Rc<str>, queue_id: u32, entries_per_file: u64) -> Self {
        let dir = queue_dir(root, &topic, queue_id);
        ConsumeQueue {
            topic,
            queue_id,
            dir,
            entries_per_file,
            min_offset: 0,
            next_assign: 0,
            persisted: 0,
            mem_base: 0,
            mem: VecDeque::new(),
            files: BTreeMap::new(),
        }
    }

    /// One past the last dispatched (readable) entry.
    pub fn max_offset(&self) -> u64 {
        self.mem_base + self.mem.len() as u64
    }

    /// Appends the entry for `queue_offset`, which must be the next one.
    pub fn push(&mut self, queue_offset: u64, e: CqEntry) {
        assert_eq!(
            queue_offset,
            self.max_offset(),
            "ConsumeQueue offsets only grow by one"
        );
        self.mem.push_back(e);
        self.next_assign = self.next_assign.max(queue_offset + 1);
    }

    /// The entry at `offset` if it is in memory.
    pub fn mem_entry(&self, offset: u64) -> Option<CqEntry> {
        offset
            .checked_sub(self.mem_base)
            .and_then(|i| self.mem.get(i as usize).copied())
    }

    /// File holding `offset` and the byte position of its entry there.
    pub fn locate(&self, offset: u64) -> (u64, u64) {
        let base = offset - offset % self.entries_per_file;
        (base, (offset - base) * CQ_ENTRY_LEN)
    }

    pub fn path_of(&self, base: u64) -> PathBuf {
        self.dir.join(file_name(base))
    }

    /// Entries not yet persisted whose records end at or below `durable`, grouped by file:
    /// (file base, byte position, bytes). Persisting past the durable log would index records
    /// a power loss could take.
    pub fn unpersisted_upto(&self, durable: u64) -> (u64, Vec<(u64, u64, Vec<u8>)>) {
        let mut writes: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let mut off = self.persisted;
        while let Some(e) = self.mem_entry(off) {
            if e.end() > durable {
                break;
            }
            let (base, pos) = self.locate(off);
            match writes.last_mut() {
                Some((b, _, bytes)) if *b == base => e.encode(bytes),
                _ => {
                    let mut bytes = Vec::with_capacity(4096);
                    e.encode(&mut bytes);
                    writes.push((base, pos, bytes));
                }
            }
            off += 1;
        }
        (off, writes)
    }

    /// Records that entries below `upto` are in files, and trims the memory window.
    pub fn mark_persisted(&mut self, upto: u64) {
        // Every file the newly persisted entries went to (one round may fill several).
        let mut base = self.persisted - self.persisted % self.entries_per_file;
        while base < upto {
            self.files.insert(base, ());
            base += self.entries_per_file;
        }
        self.persisted = self.persisted.max(upto);
        let keep_from = self
            .persisted
            .saturating_sub(CQ_RECENT_ENTRIES as u64)
            .max(self.mem_base);
        while self.mem_base < keep_from {
            self.mem.pop_front();
            self.mem_base += 1;
        }
    }

    /// Dispatched offset of the first entry whose record starts at or after `phys`, among
    /// those in memory (used to drop entries past a recovery cut).
    pub fn truncate_mem_from_phys(&mut self, phys: u64) {
        while matches!(self.mem.back(), Some(e) if e.phys >= phys) {
            self.mem.pop_back();
        }
        self.next_assign = self.max_offset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cq(per_file: u64) -> ConsumeQueue {
        ConsumeQueue::new(Path::new("/x"), "T".into(), 0, per_file)
    }

    fn e(phys: u64) -> CqEntry {
        CqEntry {
            phys,
            size: 10,
            tag_hash: phys * 3,
        }
    }

    #[test]
    fn entry_round_trip() {
        let mut b = Vec::new();
        e(12345).encode(&mut b);
        assert_eq!(b.len() as u64, CQ_ENTRY_LEN);
        assert_eq!(CqEntry::decode(&b), e(12345));
    }

    #[test]
    fn offsets_map_to_files_in_constant_time() {
        let q = cq(300_000);
        assert_eq!(q.locate(0), (0, 0));
        assert_eq!(q.locate(299_999), (0, 299_999 * 20));
        assert_eq!(q.locate(300_000), (300_000, 0));
        assert_eq!(q.path_of(300_000), Path::new("/x/T/0/00000000000000300000"));
    }

    #[test]
    fn persist_stops_at_the_durable_log_and_splits_by_file() {
        let mut q = cq(4);
        for i in 0..6 {
            q.push(i, e(i * 10));
        }
        // Records end at 10, 20, ... 60: only those ending at or below 45 may persist.
        let (upto, writes) = q.unpersisted_upto(45);
        assert_eq!(upto, 4);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].0, 0);
        assert_eq!(writes[0].2.len(), 80);
        q.mark_persisted(upto);
        let (upto, writes) = q.unpersisted_upto(1000);
        assert_eq!(upto, 6);
        assert_eq!((writes[0].0, writes[0].1, writes[0].2.len()), (4, 0, 40));
    }

    #[test]
    fn persisting_records_every_file_written() {
        let mut q = cq(100);
        for i in 0..250 {
            q.push(i, e(i * 10));
        }
        let (upto, writes) = q.unpersisted_upto(u64::MAX);
        assert_eq!(writes.len(), 3);
        q.mark_persisted(upto);
        assert_eq!(
            q.files.keys().copied().collect::<Vec<_>>(),
            vec![0, 100, 200]
        );
        q.push(250, e(2500));
        q.mark_persisted(251);
        assert_eq!(q.files.len(), 3);
    }

    #[test]
    fn memory_keeps_a_recent_window_after_persisting() {
        let mut q = cq(1_000_000);
        let n = CQ_RECENT_ENTRIES as u64 + 10;
        for i in 0..n {
            q.push(i, e(i));
        }
        q.mark_persisted(n);
        assert_eq!(q.mem.len(), CQ_RECENT_ENTRIES);
        assert_eq!(q.mem_entry(n - 1), Some(e(n - 1)));
        assert_eq!(q.mem_entry(9), None);
        assert_eq!(q.max_offset(), n);
    }

    #[test]
    #[should_panic(expected = "only grow")]
    fn a_gap_is_a_bug() {
        let mut q = cq(10);
        q.push(1, e(0));
    }
}
