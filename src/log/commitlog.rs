//! The CommitLog's staging area: where appends are placed and gathered into group-commit
//! writes. Pure bookkeeping, no I/O: the store's committer task takes [`Batch`]es from here
//! and writes them.
//!
//! # The write scheme
//!
//! Records are appended into the *active* batch, a byte buffer that mirrors the segment file
//! from an aligned position (`file_pos`). When the committer takes a batch, the batch is
//! written with one O_DIRECT write covering `[file_pos, align_up(end))`, the unused end of its
//! last block zero-filled. The next batch starts at the aligned-down end of the previous one
//! and *carries* a copy of that partial last block, so the block is rewritten, grown, by the
//! next write. A batch is never modified after it is taken: the in-flight write owns its own
//! DMA copy, and appends go to the next batch.
//!
//! Sector atomicity relied on: a device writes each 512-byte sector either wholly or not at all
//! (no garbage). The rewritten block's carried prefix is byte-identical in the old and the new
//! version, so whatever mix of old and new sectors a crash leaves, the acknowledged prefix is
//! intact; a torn new suffix fails its CRC and recovery cuts it.
//!
//! Readers never look at the file length: they stop at the store's published written offset.
//!
//! A record never spans two segments: when one does not fit (leaving room for a blank record),
//! the rest of the segment is filled with a blank record and the record goes to the next
//! segment, which must already be prepared (created, allocated, directory synced).

use std::collections::VecDeque;
use std::rc::Rc;

use orbitmq_proto::record::{self, BLANK_RECORD_MIN_LEN};

use super::config::{IO_ALIGN, MAX_WRITE_BYTES};
use super::error::StoreError;
use crate::sync::Signal;

/// Batches that may wait, sealed, for the committer before appenders are held back.
/// Bounds a shard's staging memory to about (1 + this) x [`MAX_WRITE_BYTES`].
pub const MAX_SEALED_BATCHES: usize = 2;

pub type BatchDone = Rc<Signal<Result<(), StoreError>>>;

/// What the dispatcher needs to index one appended record in its ConsumeQueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DispatchEntry {
    pub topic: Rc<str>,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub physical_offset: u64,
    pub size: u32,
    pub tag_hash: u64,
    pub store_timestamp: u64,
    /// How many of the batch's `key_hashes` (the next ones, in order) are this record's.
    pub keys: u32,
}

/// Records gathered for one write into one segment.
pub struct Batch {
    pub seg_base: u64,
    /// Aligned position in the segment file of `buf[0]`.
    pub file_pos: u64,
    /// Leading bytes of `buf` that were written by earlier batches (the partial block).
    pub carried: usize,
    pub buf: Vec<u8>,
    /// The batch ends with the blank record that closes its segment.
    pub ends_segment: bool,
    /// Bytes of that blank record (0 if none): written, but not worth caching.
    pub blank_len: usize,
    pub done: BatchDone,
    pub dispatch: Vec<DispatchEntry>,
    /// Hashes of the records' indexed keys, in record order (see `DispatchEntry::keys`).
    pub key_hashes: Vec<u32>,
}

impl Batch {
    /// A batch whose buffer has room for `capacity` bytes, so that filling it does not
    /// reallocate (and copy) as it grows.
    fn new(seg_base: u64, file_pos: u64, carried: Vec<u8>, capacity: usize) -> Batch {
        debug_assert_eq!(file_pos % IO_ALIGN, 0);
        let carried_len = carried.len();
        let mut buf = carried;
        buf.reserve(capacity.saturating_sub(carried_len));
        Batch {
            seg_base,
            file_pos,
            carried: carried_len,
            buf,
            ends_segment: false,
            blank_len: 0,
            done: Signal::new(),
            dispatch: Vec::new(),
            key_hashes: Vec::new(),
        }
    }

    /// Log offset of the first byte this batch adds.
    pub fn log_start(&self) -> u64 {
        self.seg_base + self.file_pos + self.carried as u64
    }

    /// Log offset just past the last byte this batch adds.
    pub fn log_end(&self) -> u64 {
        self.seg_base + self.file_pos + self.buf.len() as u64
    }

    pub fn has_new_bytes(&self) -> bool {
        self.buf.len() > self.carried
    }

    /// The partial last block, which the next batch carries and rewrites.
    fn tail_block(&self) -> (u64, Vec<u8>) {
        let aligned = align_down(self.buf.len() as u64);
        (
            self.file_pos + aligned,
            self.buf[aligned as usize..].to_vec(),
        )
    }
}

/// Why an append cannot be placed right now.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    /// The sealed batches are at their bound: wait for the committer.
    Space,
    /// The record goes to the segment starting here, which is not prepared yet.
    Segment(u64),
}

/// Where appends go next, and the batches waiting to be written.
pub struct Staging {
    seg_size: u64,
    active: Batch,
    sealed: VecDeque<Batch>,
    /// Segments with base <= this are prepared and may be written.
    prepared_upto: u64,
    /// The largest recent batch, decaying a little each batch: batches alternate between
    /// one and several requests' worth, and sizing each by the last one grew (and copied)
    /// the buffer of every larger one.
    recent_len: usize,
}

/// Smallest buffer a batch starts with.
const MIN_BATCH_CAPACITY: usize = 64 * 1024;

/// The buffer to give the next batch when recent ones were up to `recent` bytes: a quarter
/// more rarely needs to grow. The tail cache keeps the buffer as it is, charged by capacity.
fn next_capacity(recent: usize) -> usize {
    (recent + recent / 4).clamp(MIN_BATCH_CAPACITY, MAX_WRITE_BYTES)
}

/// How fast the recent maximum forgets: 1/64 a batch, halved in about 44 batches (some
/// milliseconds under load), so a burst does not leave large buffers behind for long.
const RECENT_DECAY_DIVISOR: usize = 64;

/// `recent` after a batch of `len` bytes: a new maximum at once, then a little less a batch.
fn decayed_max(recent: usize, len: usize) -> usize {
    len.max(recent - recent / RECENT_DECAY_DIVISOR)
}

pub fn align_down(v: u64) -> u64 {
    v & !(IO_ALIGN - 1)
}

pub fn align_up(v: u64) -> u64 {
    (v + IO_ALIGN - 1) & !(IO_ALIGN - 1)
}

impl Staging {
    /// Starts appending at log offset `next`; `tail` holds the bytes of `next`'s block
    /// before `next` (as read back from the file), `next - align_down(next)` of them.
    pub fn new(seg_size: u64, next: u64, tail: Vec<u8>, prepared_upto: u64) -> Staging {
        let seg_base = next - next % seg_size;
        let pos = next - seg_base;
        assert_eq!(
            tail.len() as u64,
            pos - align_down(pos),
            "carried block length"
        );
        Staging {
            seg_size,
            active: Batch::new(seg_base, align_down(pos), tail, MIN_BATCH_CAPACITY),
            sealed: VecDeque::new(),
            prepared_upto,
            recent_len: 0,
        }
    }

    /// Log offset where the next record goes.
    pub fn next_offset(&self) -> u64 {
        self.active.log_end()
    }

    pub fn active_segment(&self) -> u64 {
        self.active.seg_base
    }

    pub fn segment_prepared(&mut self, base: u64) {
        self.prepared_upto = self.prepared_upto.max(base);
    }

    pub fn prepared_upto(&self) -> u64 {
        self.prepared_upto
    }

    /// Largest run of records (one record, or one batch send) a segment can take. Leaves room
    /// in one write for a carried partial block and the padding that may precede the run.
    pub fn max_reservation(&self) -> usize {
        (self.seg_size as usize - BLANK_RECORD_MIN_LEN)
            .min(MAX_WRITE_BYTES - IO_ALIGN as usize - BLANK_RECORD_MIN_LEN)
    }

    /// Makes room for `len` contiguous bytes in one segment and returns the active batch,
    /// whose `buf` the caller then extends by exactly `len` bytes, without awaiting.
    pub fn reserve(&mut self, len: usize) -> Result<&mut Batch, Need> {
        assert!(len <= self.max_reservation(), "reservation over the bound");
        let pos = self.active.file_pos + self.active.buf.len() as u64;
        if pos + len as u64 + BLANK_RECORD_MIN_LEN as u64 > self.seg_size {
            self.roll()?;
        } else if self.active.buf.len() + len > MAX_WRITE_BYTES {
            if self.sealed.len() >= MAX_SEALED_BATCHES {
                return Err(Need::Space);
            }
            self.seal_active();
        }
        Ok(&mut self.active)
    }

    /// Closes the active segment with a blank record over its remainder and moves to the
    /// next one, as an append that does not fit does: a slave closes its segments where its
    /// master did. Returns the completion of the batch that closes it.
    pub fn close_segment(&mut self) -> Result<BatchDone, Need> {
        self.roll()?;
        Ok(self
            .sealed
            .back()
            .expect("the closed segment's batch")
            .done
            .clone())
    }

    fn roll(&mut self) -> Result<(), Need> {
        let pos = self.active.file_pos + self.active.buf.len() as u64;
        let next_base = self.active.seg_base + self.seg_size;
        if next_base > self.prepared_upto {
            return Err(Need::Segment(next_base));
        }
        // Close the segment with a blank record over its whole remainder. The padding is
        // shorter than the run that did not fit, but with the active batch it may exceed
        // one write: then the active batch is sealed first and the padding starts the next.
        let pad = (self.seg_size - pos) as usize;
        let split = self.active.has_new_bytes() && self.active.buf.len() + pad > MAX_WRITE_BYTES;
        if self.sealed.len() + usize::from(split) >= MAX_SEALED_BATCHES {
            return Err(Need::Space);
        }
        if split {
            self.seal_active();
        }
        let start = self.active.buf.len();
        // Sized by the records, not the padding that closes the segment.
        let room = self.room_after(start);
        self.active.buf.resize(start + pad, 0);
        record::encode_blank(&mut self.active.buf[start..], pad as u32);
        self.active.ends_segment = true;
        self.active.blank_len = pad;
        let fresh = Batch::new(next_base, 0, Vec::new(), room);
        let full = std::mem::replace(&mut self.active, fresh);
        self.sealed.push_back(full);
        Ok(())
    }

    /// Bytes left in the active segment before its closing blank record must start.
    pub fn segment_room(&self) -> u64 {
        let pos = self.active.file_pos + self.active.buf.len() as u64;
        self.seg_size - pos
    }

    /// The capacity of the batch after one of `len` bytes.
    fn room_after(&mut self, len: usize) -> usize {
        self.recent_len = decayed_max(self.recent_len, len);
        next_capacity(self.recent_len)
    }

    /// Seals the active batch mid-segment; the next batch carries its partial block.
    fn seal_active(&mut self) {
        let (file_pos, tail) = self.active.tail_block();
        let room = self.room_after(self.active.buf.len());
        let fresh = Batch::new(self.active.seg_base, file_pos, tail, room);
        let full = std::mem::replace(&mut self.active, fresh);
        self.sealed.push_back(full);
    }

    /// The next batch to write, oldest first; `None` when nothing new is staged.
    pub fn take_batch(&mut self) -> Option<Batch> {
        if let Some(b) = self.sealed.pop_front() {
            return Some(b);
        }
        if self.active.has_new_bytes() {
            self.seal_active();
            return self.sealed.pop_front();
        }
        None
    }

    /// Fails every staged append (the log is fenced) and leaves nothing staged.
    pub fn fail_all(&mut self, err: &StoreError) {
        for b in self.sealed.drain(..) {
            b.done.set(Err(err.clone()));
        }
        self.active.done.set(Err(err.clone()));
        self.active.dispatch.clear();
        self.active.key_hashes.clear();
        self.active.done = Signal::new();
        self.active.buf.truncate(self.active.carried);
    }

    pub fn is_empty(&self) -> bool {
        self.sealed.is_empty() && !self.active.has_new_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut Staging, len: usize, fill: u8) -> Result<u64, Need> {
        let b = s.reserve(len)?;
        let at = b.log_end();
        b.buf.extend(std::iter::repeat_n(fill, len));
        Ok(at)
    }

    #[test]
    fn batches_of_alternating_sizes_start_with_room_for_the_largest_recent_one() {
        let mut s = Staging::new(1 << 30, 0, Vec::new(), 0);
        // One, three, then one and two requests' worth: the buffer is sized for three.
        for (i, len) in [75_000, 225_000, 75_000, 150_000, 75_000]
            .into_iter()
            .enumerate()
        {
            put(&mut s, len, i as u8).unwrap();
            let b = s.take_batch().unwrap();
            assert_eq!(b.buf.len() - b.carried, len);
        }
        assert!(s.active.buf.capacity() >= 225_000 + 4096);
        // Then smaller batches let it shrink back, 1/64 a batch.
        for _ in 0..400 {
            put(&mut s, 10_000, 9).unwrap();
            s.take_batch().unwrap();
        }
        assert!(s.active.buf.capacity() < 2 * MIN_BATCH_CAPACITY);
    }

    #[test]
    fn batches_carry_the_partial_block() {
        let mut s = Staging::new(1 << 20, 0, Vec::new(), 0);
        assert_eq!(put(&mut s, 5000, 1), Ok(0));
        let b1 = s.take_batch().unwrap();
        assert_eq!((b1.file_pos, b1.carried, b1.log_end()), (0, 0, 5000));
        assert_eq!(put(&mut s, 100, 2), Ok(5000));
        let b2 = s.take_batch().unwrap();
        // Starts at the block holding 5000 and carries its first 904 bytes, identical.
        assert_eq!((b2.file_pos, b2.carried), (4096, 904));
        assert_eq!(&b2.buf[..904], &b1.buf[4096..5000]);
        assert_eq!(b2.log_start(), 5000);
        assert!(s.take_batch().is_none());
    }

    #[test]
    fn a_record_that_does_not_fit_pads_and_needs_the_next_segment() {
        let seg = 64 * 1024;
        let mut s = Staging::new(seg, 0, Vec::new(), 0);
        put(&mut s, 60_000, 1).unwrap();
        assert_eq!(put(&mut s, 6_000, 2), Err(Need::Segment(seg)));
        s.segment_prepared(seg);
        assert_eq!(put(&mut s, 6_000, 2), Ok(seg));
        let b1 = s.take_batch().unwrap();
        assert!(b1.ends_segment);
        assert_eq!(b1.blank_len, (seg - 60_000) as usize);
        assert_eq!(b1.log_end(), seg);
        assert_eq!(
            record::peek(&b1.buf[60_000..]),
            Ok(record::Peek::Blank((seg - 60_000) as u32))
        );
        let b2 = s.take_batch().unwrap();
        assert_eq!((b2.seg_base, b2.file_pos, b2.carried), (seg, 0, 0));
    }

    #[test]
    fn a_record_may_end_exactly_at_the_blank_minimum() {
        let seg = 64 * 1024;
        let mut s = Staging::new(seg, 0, Vec::new(), 0);
        put(&mut s, (seg as usize) - BLANK_RECORD_MIN_LEN, 1).unwrap();
        assert_eq!(put(&mut s, 1, 2), Err(Need::Segment(seg)));
    }

    #[test]
    fn padding_never_makes_a_write_larger_than_the_bound() {
        let seg = 64 << 20;
        let mb = 1 << 20;
        let mut s = Staging::new(seg, seg - 12 * mb, Vec::new(), seg);
        put(&mut s, 7 * mb as usize, 1).unwrap();
        // 6 MiB do not fit the last 5 MiB: 5 MiB of padding, too much for the 7 MiB batch.
        assert_eq!(put(&mut s, 6 * mb as usize, 2), Ok(seg));
        let mut ends = Vec::new();
        while let Some(b) = s.take_batch() {
            assert!(b.buf.len() <= MAX_WRITE_BYTES, "{} bytes", b.buf.len());
            ends.push((b.log_end(), b.ends_segment));
        }
        assert_eq!(
            ends,
            vec![(seg - 5 * mb, false), (seg, true), (seg + 6 * mb, false)]
        );
    }

    #[test]
    fn sealed_batches_are_bounded() {
        let mut s = Staging::new(1 << 30, 0, Vec::new(), 0);
        let big = MAX_WRITE_BYTES / 2 + 1;
        put(&mut s, big, 1).unwrap();
        put(&mut s, big, 1).unwrap(); // seals #1
        put(&mut s, big, 1).unwrap(); // seals #2
        assert_eq!(put(&mut s, big, 1), Err(Need::Space));
        let first = s.take_batch().unwrap();
        assert_eq!(first.log_start(), 0);
        assert!(put(&mut s, big, 1).is_ok());
    }

    #[test]
    fn fail_all_fails_every_waiter_and_stages_nothing() {
        let mut s = Staging::new(1 << 20, 0, Vec::new(), 0);
        put(&mut s, 100, 1).unwrap();
        let done = s.reserve(1).unwrap().done.clone();
        s.fail_all(&StoreError::Fenced("EIO".into()));
        assert!(matches!(done.get(), Some(Err(StoreError::Fenced(_)))));
        assert!(s.is_empty());
        assert_eq!(s.next_offset(), 0);
    }

    #[test]
    fn reopening_mid_block_carries_the_read_back_tail() {
        let s = Staging::new(1 << 20, 4096 + 10, vec![7u8; 10], 0);
        assert_eq!(s.next_offset(), 4106);
    }
}
