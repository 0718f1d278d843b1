//! Storage engine tests: real files with O_DIRECT under a glommio executor.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use orbitmq::log::recovery::Checkpoint;
use orbitmq::log::retention::RetentionPolicy;
use orbitmq::log::{
    prepare_queue_files, AppendResult, FlushMode, ReadStatus, Store, StoreConfig, StoreError,
};
use orbitmq::proto::limits;
use orbitmq::proto::record::{self, EncodeError, Message};

mod store_support;
use store_support::{read_all, read_bodies_from, run};

/// Small segments so tests roll over several of them.
const TEST_SEGMENT: u64 = 64 * 1024;

fn cfg(dir: &std::path::Path, flush: FlushMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir, flush);
    c.segment_size = TEST_SEGMENT;
    c.cq_entries_per_file = 100;
    c.flush_interval = Duration::from_millis(20);
    c.cq_flush_interval = Duration::from_millis(20);
    c
}

fn msg(topic: &str, queue: u32, i: usize) -> Message {
    Message {
        topic: topic.into(),
        queue_id: queue,
        tags: if i.is_multiple_of(2) {
            "even".into()
        } else {
            "odd".into()
        },
        keys: format!("k{i}"),
        properties: vec![("UNIQ_KEY".into(), format!("u{i}"))],
        body: format!("body-{i}-").repeat(1 + i % 37).into_bytes().into(),
        ..Default::default()
    }
}

fn append_read_back(flush: FlushMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, flush)).await.unwrap();
        let n = 600;
        let mut expect = Vec::new();
        for i in 0..n {
            let m = msg("Orders", (i % 3) as u32, i);
            let r = store.append(&m).await.unwrap();
            assert_eq!(r.queue_offset, (i / 3) as u64);
            expect.push(m);
        }
        assert!(store.stats().segments > 3, "rolled over several segments");
        for q in 0..3u32 {
            let got = read_all(&store, "Orders", q).await;
            let want: Vec<_> = expect.iter().filter(|m| m.queue_id == q).cloned().collect();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.body, w.body);
                assert_eq!(g.keys, w.keys);
            }
        }
        store.close().await.unwrap();
        // Reopen: everything is still there, from disk.
        let store = Store::open(cfg(&path, flush)).await.unwrap();
        for q in 0..3u32 {
            let got = read_all(&store, "Orders", q).await;
            assert_eq!(got.len(), 200);
        }
        store.close().await.unwrap();
    });
}

#[test]
fn append_then_read_back_async() {
    append_read_back(FlushMode::Async);
}

#[test]
fn append_then_read_back_sync() {
    append_read_back(FlushMode::Sync);
}

// ---------------------------------------------------------------- helpers for damage tests

/// The segment file holding log offset `phys`, and `phys`'s position in it.
fn seg_file(dir: &Path, phys: u64) -> (PathBuf, u64) {
    let base = phys - phys % TEST_SEGMENT;
    (
        dir.join("commitlog").join(format!("{base:020}")),
        phys - base,
    )
}

/// Overwrites `bytes` at `pos` of `path` with plain buffered I/O (the store is closed).
fn write_at(path: &Path, pos: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, pos).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, pos: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, pos).unwrap();
    b
}

fn cq_dir(dir: &Path, topic: &str, queue: u32) -> PathBuf {
    dir.join("consumequeue").join(topic).join(queue.to_string())
}

fn cq_file(dir: &Path, topic: &str, queue: u32, first: u64) -> PathBuf {
    cq_dir(dir, topic, queue).join(format!("{first:020}"))
}

/// Appends messages `range` of `msg(topic, i % queues, i)` one after the other, returning
/// them with their results.
async fn append_serial(
    store: &Store,
    topic: &str,
    queues: u32,
    range: std::ops::Range<usize>,
) -> Vec<(Message, AppendResult)> {
    let mut out = Vec::new();
    for i in range {
        let m = msg(topic, (i % queues as usize) as u32, i);
        let r = store.append(&m).await.unwrap();
        out.push((m, r));
    }
    out
}

/// As [`append_serial`], but all at once, so they share group commits (sync tests stay
/// fast). Offsets follow placement, not `i`: compare by the returned results.
async fn append_range(
    store: &Store,
    topic: &str,
    queues: u32,
    range: std::ops::Range<usize>,
) -> Vec<(Message, AppendResult)> {
    let tasks: Vec<_> = range
        .map(|i| {
            let store = store.clone();
            let m = msg(topic, (i % queues as usize) as u32, i);
            glommio::spawn_local(async move {
                let r = store.append(&m).await.unwrap();
                (m, r)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// The written record with the highest log offset, and the one before it.
fn last_two(written: &[(Message, AppendResult)]) -> (AppendResult, AppendResult) {
    let mut rs: Vec<AppendResult> = written.iter().map(|(_, r)| *r).collect();
    rs.sort_by_key(|r| r.physical_offset);
    (rs[rs.len() - 1], rs[rs.len() - 2])
}

/// Checks `more`, appended after `before`, took the next queue offsets of each queue.
fn assert_next_offsets(before: &[(Message, AppendResult)], more: &[(Message, AppendResult)]) {
    let queues: BTreeSet<u32> = more.iter().map(|(m, _)| m.queue_id).collect();
    for q in queues {
        let had = before.iter().filter(|(m, _)| m.queue_id == q).count() as u64;
        let mut got: Vec<u64> = more
            .iter()
            .filter(|(m, _)| m.queue_id == q)
            .map(|(_, r)| r.queue_offset)
            .collect();
        got.sort();
        let want: Vec<u64> = (had..had + got.len() as u64).collect();
        assert_eq!(got, want, "queue {q}: next queue offsets");
    }
}

fn first_phys(rs: &[(Message, AppendResult)]) -> u64 {
    rs.iter().map(|(_, r)| r.physical_offset).min().unwrap()
}

/// Bodies of `queue`'s messages among `written`, in queue-offset order.
fn bodies_of(written: &[(Message, AppendResult)], queue: u32) -> Vec<Vec<u8>> {
    let mut v: Vec<_> = written
        .iter()
        .filter(|(m, _)| m.queue_id == queue)
        .map(|(m, r)| (r.queue_offset, m.body.clone()))
        .collect();
    v.sort();
    v.into_iter().map(|(_, b)| b.to_vec()).collect()
}

async fn read_bodies(store: &Store, topic: &str, queue: u32) -> Vec<Vec<u8>> {
    read_all(store, topic, queue)
        .await
        .into_iter()
        .map(|m| m.body.to_vec())
        .collect()
}

/// Asserts every queue of `written` reads back exactly (bodies, order, dense offsets from 0).
async fn assert_queues(
    store: &Store,
    topic: &str,
    queues: u32,
    written: &[(Message, AppendResult)],
) {
    for q in 0..queues {
        let want = bodies_of(written, q);
        let got = read_bodies(store, topic, q).await;
        assert_eq!(got.len(), want.len(), "queue {q}: message count");
        assert!(got == want, "queue {q}: bodies differ");
        assert_eq!(
            store.queue_bounds(topic, q),
            Some((0, want.len() as u64)),
            "queue {q}: bounds"
        );
    }
}

/// Reopens the store at `path` after a damage: it holds exactly `written`; appends of
/// `more` continue with the next queue offsets (the first at log offset `next`, when given,
/// where the log must end); and all of it reads back again after one more reopen.
async fn reopen_and_continue(
    path: &Path,
    flush: FlushMode,
    (topic, queues): (&str, u32),
    mut written: Vec<(Message, AppendResult)>,
    more: std::ops::Range<usize>,
    next: Option<u64>,
) {
    let store = Store::open(cfg(path, flush)).await.unwrap();
    assert_queues(&store, topic, queues, &written).await;
    if let Some(next) = next {
        assert_eq!(store.stats().next_offset, next, "the log ends at the cut");
    }
    let more = append_range(&store, topic, queues, more).await;
    if let Some(next) = next {
        assert_eq!(
            first_phys(&more),
            next,
            "appends continue right after the cut"
        );
    }
    assert_next_offsets(&written, &more);
    written.extend(more);
    assert_queues(&store, topic, queues, &written).await;
    store.close().await.unwrap();
    // And once more from disk: the cut and the new records are stable.
    let store = Store::open(cfg(path, flush)).await.unwrap();
    assert_queues(&store, topic, queues, &written).await;
    store.close().await.unwrap();
}

// ---------------------------------------------------------------- torn and zeroed tails

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flip bytes inside the last record: its CRC fails.
    FlipLast,
    /// Zero the last record's bytes, as a write that never reached the disk.
    ZeroLast,
    /// Garbage after the last record, as a torn write of records never acknowledged.
    GarbageAfter,
    /// A valid record of an earlier position copied after the last record: its CRC passes
    /// but its stored physical offset is not its position.
    StaleCopy,
}

const TAIL_TOPIC: &str = "Tail";
const TAIL_QUEUES: u32 = 2;
const TAIL_MESSAGES: usize = 600;

fn damaged_tail(damage: Damage) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let (mut written, last_base) = write_tail(&path).await;
        assert!(last_base >= 2 * TEST_SEGMENT, "several segments");

        let (last, prev) = last_two(&written);
        let (seg, pos) = seg_file(&path, last.physical_offset);
        let end_pos = pos + last.size as u64;
        let lost = match damage {
            Damage::FlipLast => {
                let mid = pos + last.size as u64 / 2;
                let b = read_at(&seg, mid, 4);
                write_at(&seg, mid, &b.iter().map(|x| x ^ 0x5a).collect::<Vec<_>>());
                true
            }
            Damage::ZeroLast => {
                write_at(&seg, pos, &vec![0u8; last.size as usize]);
                true
            }
            Damage::GarbageAfter => {
                write_at(&seg, end_pos, &[0xab; 300]);
                false
            }
            Damage::StaleCopy => {
                // The record before the last: as valid as ever, but for another position.
                let (pseg, ppos) = seg_file(&path, prev.physical_offset);
                let stale = read_at(&pseg, ppos, prev.size as usize);
                assert!(
                    end_pos + stale.len() as u64 + 8 <= TEST_SEGMENT,
                    "the stale copy fits the segment"
                );
                write_at(&seg, end_pos, &stale);
                false
            }
        };
        if lost {
            written.retain(|(_, r)| r.physical_offset != last.physical_offset);
        }

        let expect_next = if lost {
            last.physical_offset
        } else {
            last.physical_offset + last.size as u64
        };
        let more = TAIL_MESSAGES..TAIL_MESSAGES + 20;
        let tail = (TAIL_TOPIC, TAIL_QUEUES);
        reopen_and_continue(
            &path,
            FlushMode::Sync,
            tail,
            written,
            more,
            Some(expect_next),
        )
        .await;
    });
}

#[test]
fn flipped_last_record_is_cut() {
    damaged_tail(Damage::FlipLast);
}

#[test]
fn zeroed_last_record_is_cut() {
    damaged_tail(Damage::ZeroLast);
}

#[test]
fn garbage_after_the_last_record_is_cut() {
    damaged_tail(Damage::GarbageAfter);
}

#[test]
fn stale_record_after_the_end_is_not_accepted() {
    damaged_tail(Damage::StaleCopy);
}

/// Writes the tail tests' messages to a new store at `path` and closes it; returns them
/// and the base of the segment holding the last one.
async fn write_tail(path: &Path) -> (Vec<(Message, AppendResult)>, u64) {
    let store = Store::open(cfg(path, FlushMode::Sync)).await.unwrap();
    let written = append_range(&store, TAIL_TOPIC, TAIL_QUEUES, 0..TAIL_MESSAGES).await;
    store.close().await.unwrap();
    let p = last_two(&written).0.physical_offset;
    (written, p - p % TEST_SEGMENT)
}

/// Damage in the first record of the last segment: the cut falls exactly on a segment
/// boundary and appends continue at the start of that segment.
#[test]
fn cut_exactly_at_a_segment_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let (mut written, last_base) = write_tail(&path).await;
        assert!(last_base > 0);
        assert!(written.iter().any(|(_, r)| r.physical_offset == last_base));
        let (seg, _) = seg_file(&path, last_base);
        write_at(&seg, 20, &[0xff; 8]);
        written.retain(|(_, r)| r.physical_offset < last_base);

        let n = written.len();
        let tail = (TAIL_TOPIC, TAIL_QUEUES);
        reopen_and_continue(
            &path,
            FlushMode::Sync,
            tail,
            written,
            n..n + 10,
            Some(last_base),
        )
        .await;
    });
}

/// A log whose last segment ends with its blank record (the next segment is gone): appends
/// continue in a new segment after it.
#[test]
fn log_ending_with_a_blank_record_continues_in_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let (mut written, last_base) = write_tail(&path).await;
        // The last segment goes, and the one prepared ahead of need if there is one: close()
        // stops a preparation still pre-writing, so whether it exists depends on timing.
        let mut base = last_base;
        while seg_file(&path, base).0.exists() {
            std::fs::remove_file(seg_file(&path, base).0).unwrap();
            base += TEST_SEGMENT;
        }
        assert!(base > last_base, "the last segment was there to remove");
        written.retain(|(_, r)| r.physical_offset < last_base);

        let n = written.len();
        let tail = (TAIL_TOPIC, TAIL_QUEUES);
        reopen_and_continue(
            &path,
            FlushMode::Sync,
            tail,
            written,
            n..n + 10,
            Some(last_base),
        )
        .await;
    });
}

/// A cut that removes ConsumeQueue entries across a file boundary (the last file emptied,
/// the one before shortened) leaves the queue dense and correct across two reopens.
#[test]
fn cut_across_a_consume_queue_file_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        // One queue, 101 entries: files 0 (100 entries) and 100 (1 entry).
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        let mut written = append_range(&store, "Edge", 1, 0..101).await;
        store.close().await.unwrap();
        assert!(cq_file(&path, "Edge", 0, 100).exists());
        // Damage entry 99's record: entries 99 and 100 go.
        let (_, r99) = *written.iter().find(|(_, r)| r.queue_offset == 99).unwrap();
        let (seg, pos) = seg_file(&path, r99.physical_offset);
        write_at(&seg, pos + 30, &[0xee; 4]);
        written.retain(|(_, r)| r.queue_offset < 99);
        // Reopened twice before appending: the first open's cut is stable on disk.
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        assert_queues(&store, "Edge", 1, &written).await;
        store.close().await.unwrap();
        reopen_and_continue(&path, FlushMode::Sync, ("Edge", 1), written, 200..205, None).await;
    });
}

// ---------------------------------------------------------------- ConsumeQueue rebuild

const CQ_TOPIC: &str = "Rebuild";
const CQ_QUEUES: u32 = 3;
/// 200 entries per queue: two ConsumeQueue files of 100 each.
const CQ_MESSAGES: usize = 600;

fn rebuilt_after(damage: impl FnOnce(&Path) + Send + 'static) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Async)).await.unwrap();
        let written = append_range(&store, CQ_TOPIC, CQ_QUEUES, 0..CQ_MESSAGES).await;
        store.close().await.unwrap();
        assert!(cq_file(&path, CQ_TOPIC, 1, 100).exists());
        damage(&path);
        let more = CQ_MESSAGES..CQ_MESSAGES + 6;
        let queues = (CQ_TOPIC, CQ_QUEUES);
        reopen_and_continue(&path, FlushMode::Async, queues, written, more, None).await;
    });
}

fn set_len(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn consume_queue_rebuilt_after_its_directory_is_deleted() {
    rebuilt_after(|p| std::fs::remove_dir_all(cq_dir(p, CQ_TOPIC, 1)).unwrap());
}

#[test]
fn consume_queue_rebuilt_after_every_directory_is_deleted() {
    rebuilt_after(|p| std::fs::remove_dir_all(p.join("consumequeue")).unwrap());
}

#[test]
fn consume_queue_rebuilt_after_a_partial_entry() {
    rebuilt_after(|p| set_len(&cq_file(p, CQ_TOPIC, 1, 100), 100 * 20 - 7));
}

#[test]
fn consume_queue_rebuilt_after_losing_entries_of_its_last_file() {
    rebuilt_after(|p| set_len(&cq_file(p, CQ_TOPIC, 2, 100), 10 * 20));
}

#[test]
fn consume_queue_rebuilt_after_losing_entries_of_an_earlier_file() {
    rebuilt_after(|p| set_len(&cq_file(p, CQ_TOPIC, 0, 0), 30 * 20 + 3));
}

#[test]
fn consume_queue_rebuilt_without_a_checkpoint() {
    rebuilt_after(|p| {
        std::fs::remove_file(p.join("checkpoint")).unwrap();
        set_len(&cq_file(p, CQ_TOPIC, 0, 100), 0);
    });
}

/// A topic's queue files made when it is created (before the store opens, as a restarting
/// broker finds them, and while it runs): the store takes them as empty queues, appends fill
/// them across file boundaries, and all of it reads back after reopening. Preparing a queue
/// again leaves its files alone.
#[test]
fn prepared_queue_files_are_empty_queues_until_written() {
    const TOPIC: &str = "Made";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    assert!(prepare_queue_files(&path, TOPIC, 0).unwrap(), "a new queue");
    assert_eq!(
        std::fs::metadata(cq_file(&path, TOPIC, 0, 0))
            .unwrap()
            .len(),
        0
    );
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Async)).await.unwrap();
        assert_eq!(store.queue_bounds(TOPIC, 0), Some((0, 0)), "an empty queue");
        assert!(prepare_queue_files(&path, TOPIC, 1).unwrap());
        let written = append_range(&store, TOPIC, 2, 0..300).await;
        assert_queues(&store, TOPIC, 2, &written).await;
        store.close().await.unwrap();
        let full = 100 * 20;
        assert_eq!(
            std::fs::metadata(cq_file(&path, TOPIC, 0, 0))
                .unwrap()
                .len(),
            full
        );
        assert!(
            !prepare_queue_files(&path, TOPIC, 0).unwrap(),
            "an existing queue"
        );
        assert_eq!(
            std::fs::metadata(cq_file(&path, TOPIC, 0, 0))
                .unwrap()
                .len(),
            full
        );
        reopen_and_continue(&path, FlushMode::Async, (TOPIC, 2), written, 300..400, None).await;
    });
}

// ---------------------------------------------------------------- retention

fn retention_cfg(path: &Path, reserved_hours: u64) -> StoreConfig {
    let mut c = cfg(path, FlushMode::Sync);
    c.retention = RetentionPolicy {
        delete_when_hours: vec![RETENTION_HOUR],
        file_reserved_hours: reserved_hours,
        ..RetentionPolicy::default()
    };
    c
}

const RETENTION_HOUR: u8 = 4;
const RET_TOPIC: &str = "Ret";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn retention_deletes_only_expired_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        // Segments last written 3 hours ago are expired under a 2-hour reservation.
        let store = Store::open(retention_cfg(&path, 2)).await.unwrap();
        let written = append_range(&store, RET_TOPIC, 3, 0..900).await;
        // Segments holding records (one more may be prepared ahead of need).
        let segs = last_two(&written).0.physical_offset / TEST_SEGMENT + 1;
        assert!(segs >= 4, "{segs} segments");
        let old = SystemTime::now() - Duration::from_secs(3 * 3600);
        for base in [0, TEST_SEGMENT] {
            set_mtime(&seg_file(&path, base).0, old);
        }
        // Not at the deleteWhen hour and no disk pressure: nothing.
        assert!(store
            .run_retention(now_ms(), RETENTION_HOUR + 1, 0.1)
            .await
            .unwrap()
            .is_empty());
        let deleted = store
            .run_retention(now_ms(), RETENTION_HOUR, 0.1)
            .await
            .unwrap();
        assert_eq!(deleted, vec![0, TEST_SEGMENT]);
        assert_eq!(store.stats().min_offset, 2 * TEST_SEGMENT);
        assert!(!seg_file(&path, 0).0.exists());
        assert!(!seg_file(&path, TEST_SEGMENT).0.exists());
        for base in (2..segs).map(|i| i * TEST_SEGMENT) {
            assert!(seg_file(&path, base).0.exists(), "segment {base} is kept");
        }
        check_after_retention(&store, &written, 2 * TEST_SEGMENT).await;
        store.close().await.unwrap();
        // After a restart: same minimums, same messages.
        let store = Store::open(retention_cfg(&path, 2)).await.unwrap();
        check_after_retention(&store, &written, 2 * TEST_SEGMENT).await;
        let more = append_range(&store, RET_TOPIC, 3, 900..906).await;
        assert_next_offsets(&written, &more);
        store.close().await.unwrap();
    });
}

/// Every queue's minimum is its first message at or after `log_min`; reads below it say so,
/// reads from it return the right messages.
async fn check_after_retention(store: &Store, written: &[(Message, AppendResult)], log_min: u64) {
    for q in 0..3u32 {
        let all = bodies_of(written, q);
        let first_kept = written
            .iter()
            .filter(|(m, r)| m.queue_id == q && r.physical_offset >= log_min)
            .map(|(_, r)| r.queue_offset)
            .min()
            .unwrap();
        let (min, max) = store.queue_bounds(RET_TOPIC, q).unwrap();
        assert_eq!(
            (min, max),
            (first_kept, all.len() as u64),
            "queue {q} bounds"
        );
        let r = store
            .read(RET_TOPIC, q, 0, 16, 1 << 20, None)
            .await
            .unwrap();
        assert_eq!(r.status, ReadStatus::OffsetTooSmall);
        assert_eq!(r.next_offset, min);
        assert!(r.records.is_empty());
        let got = read_bodies_from(store, RET_TOPIC, q, min).await;
        assert!(
            got == all[min as usize..],
            "queue {q}: messages from the minimum"
        );
    }
}

/// A store that keeps nothing past its active segment, filled with 900 messages over 3
/// queues: the store, what was written, and the active segment's base.
async fn store_with_expired_segments(path: &Path) -> (Store, Vec<(Message, AppendResult)>, u64) {
    let store = Store::open(retention_cfg(path, 0)).await.unwrap();
    let written = append_range(&store, RET_TOPIC, 3, 0..900).await;
    let active = {
        let p = last_two(&written).0.physical_offset;
        p - p % TEST_SEGMENT
    };
    (store, written, active)
}

#[test]
fn retention_with_zero_reserved_hours_keeps_the_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let (store, written, active) = store_with_expired_segments(&path).await;
        // Rebuilt ConsumeQueues (all files written in one round) are cleaned up as well.
        store.close().await.unwrap();
        std::fs::remove_dir_all(path.join("consumequeue")).unwrap();
        let store = Store::open(retention_cfg(&path, 0)).await.unwrap();
        let deleted = store
            .run_retention(now_ms(), RETENTION_HOUR, 0.1)
            .await
            .unwrap();
        let want: Vec<u64> = (0..active / TEST_SEGMENT)
            .map(|i| i * TEST_SEGMENT)
            .collect();
        assert_eq!(deleted, want, "everything before the active segment");
        assert!(seg_file(&path, active).0.exists());
        check_after_retention(&store, &written, active).await;
        for q in 0..3 {
            // Files wholly below the new minimum go; the last one always stays.
            let (min, _) = store.queue_bounds(RET_TOPIC, q).unwrap();
            assert!(min >= 200, "queue {q} min {min}");
            assert!(!cq_file(&path, RET_TOPIC, q, 0).exists());
            assert!(!cq_file(&path, RET_TOPIC, q, 100).exists());
            assert!(cq_file(&path, RET_TOPIC, q, 200).exists());
        }
        // Appends still work and are readable.
        let more = append_serial(&store, RET_TOPIC, 3, 900..903).await;
        assert_next_offsets(&written, &more);
        let got = read_bodies_from(&store, RET_TOPIC, 0, 300).await;
        assert_eq!(got, vec![more[0].0.body.clone()]);
        store.close().await.unwrap();
    });
}

#[test]
fn retention_keeps_segments_the_scheduler_holds_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let (store, _, active) = store_with_expired_segments(&path).await;
        assert!(active >= 3 * TEST_SEGMENT, "{active}");
        // Something in segment 1 still waits for its delivery time.
        store.hold_from(TEST_SEGMENT + 10);
        let deleted = store
            .run_retention(now_ms(), RETENTION_HOUR, 0.1)
            .await
            .unwrap();
        assert_eq!(deleted, vec![0], "only the segment wholly below the hold");
        assert!(seg_file(&path, TEST_SEGMENT).0.exists());
        // A disk past diskSpaceCleanForciblyRatio is cleaned regardless.
        let deleted = store
            .run_retention(now_ms(), RETENTION_HOUR, 0.95)
            .await
            .unwrap();
        assert!(deleted.contains(&TEST_SEGMENT), "{deleted:?}");
        store.close().await.unwrap();
    });
}

#[test]
fn retention_with_nothing_expired_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(retention_cfg(&path, 72)).await.unwrap();
        let written = append_range(&store, RET_TOPIC, 3, 0..600).await;
        let segs = last_two(&written).0.physical_offset / TEST_SEGMENT + 1;
        assert!(store
            .run_retention(now_ms(), RETENTION_HOUR, 0.1)
            .await
            .unwrap()
            .is_empty());
        for base in (0..segs).map(|i| i * TEST_SEGMENT) {
            assert!(seg_file(&path, base).0.exists(), "segment {base} is kept");
        }
        assert_queues(&store, RET_TOPIC, 3, &written).await;
        store.close().await.unwrap();
    });
}

// ---------------------------------------------------------------- offset by time

#[test]
fn offset_by_time_finds_the_first_message_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Async)).await.unwrap();
        append_range(&store, "Time", 1, 0..300).await;
        glommio::timer::sleep(Duration::from_millis(5)).await;
        let t = now_ms();
        let second = append_range(&store, "Time", 1, 300..310).await;
        assert!(second
            .iter()
            .all(|(_, r)| r.queue_offset >= 300 && r.store_timestamp >= t));
        assert_eq!(store.offset_by_time("Time", 0, t).await.unwrap(), 300);
        assert_eq!(store.offset_by_time("Time", 0, 0).await.unwrap(), 0);
        assert_eq!(
            store.offset_by_time("Time", 0, u64::MAX).await.unwrap(),
            310
        );
        assert_eq!(store.offset_by_time("Nope", 0, t).await.unwrap(), 0);
        store.close().await.unwrap();
        // The same from disk (the tail cache is empty after a restart).
        let store = Store::open(cfg(&path, FlushMode::Async)).await.unwrap();
        assert_eq!(store.offset_by_time("Time", 0, t).await.unwrap(), 300);
        store.close().await.unwrap();
    });
}

// ---------------------------------------------------------------- tag filtering

#[test]
fn tag_filter_returns_only_matching_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Async)).await.unwrap();
        let written = append_serial(&store, "Tags", 1, 0..51).await;
        let even = [record::tag_hash("even")];
        let mut off = 0;
        let mut got = Vec::new();
        loop {
            let r = store
                .read("Tags", 0, off, 5, 1 << 20, Some(&even))
                .await
                .unwrap();
            assert!(r.next_offset > off || r.status != ReadStatus::Found);
            for b in &r.records {
                let v = record::decode(b).unwrap();
                assert_eq!(v.tags, "even");
                assert!(v.queue_offset >= off && v.queue_offset < r.next_offset);
                got.push((v.queue_offset, v.body.to_vec()));
            }
            if r.status != ReadStatus::Found {
                break;
            }
            off = r.next_offset;
        }
        let want: Vec<_> = written
            .iter()
            .filter(|(m, _)| m.tags == "even")
            .map(|(m, r)| (r.queue_offset, m.body.to_vec()))
            .collect();
        assert_eq!(got.len(), 26);
        assert!(got == want);
        // A read whose records are all filtered out still moves past them.
        let none = [record::tag_hash("none")];
        let r = store
            .read("Tags", 0, 10, 2, 1 << 20, Some(&none))
            .await
            .unwrap();
        assert!(r.records.is_empty());
        assert!(r.next_offset > 10, "next offset {}", r.next_offset);
        // The last message is odd: an even filter from it reaches the end.
        let r = store
            .read("Tags", 0, 49, 5, 1 << 20, Some(&even))
            .await
            .unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(r.next_offset, 51);
        store.close().await.unwrap();
    });
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        append_range(&store, "Good", 1, 0..3).await;
        let before = store.stats();

        let mut big = msg("Good", 0, 0);
        big.body = vec![7u8; limits::MAX_MESSAGE_SIZE + 1].into();
        let e = store.append(&big).await.unwrap_err();
        assert!(
            matches!(e, StoreError::BadMessage(EncodeError::BodyTooLarge { .. })),
            "{e}"
        );

        let e = store.append(&msg("bad topic!", 0, 0)).await.unwrap_err();
        assert!(
            matches!(e, StoreError::BadMessage(EncodeError::Topic(_))),
            "{e}"
        );
        let e = store.append(&msg("", 0, 0)).await.unwrap_err();
        assert!(
            matches!(e, StoreError::BadMessage(EncodeError::Topic(_))),
            "{e}"
        );

        let e = store
            .append_batch(&[msg("Good", 0, 1), msg("Good", 1, 2)])
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::BadBatch(_)), "{e}");
        let e = store
            .append_batch(&[msg("Good", 0, 1), msg("Other", 0, 2)])
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::BadBatch(_)), "{e}");

        // More than one segment can take in one write.
        let batch: Vec<Message> = (0..10)
            .map(|i| {
                let mut m = msg("Good", 0, i);
                m.body = vec![b'x'; 10 * 1024].into();
                m
            })
            .collect();
        let e = store.append_batch(&batch).await.unwrap_err();
        assert!(matches!(e, StoreError::BadBatch(_)), "{e}");

        assert_eq!(store.stats(), before, "nothing was written");
        assert_eq!(store.queue_bounds("Good", 0), Some((0, 3)));
        assert_eq!(store.queue_bounds("Good", 1), None);
        assert_eq!(store.queue_bounds("Other", 0), None);
        // The store still takes good appends.
        let r = store.append(&msg("Good", 0, 3)).await.unwrap();
        assert_eq!(r.queue_offset, 3);
        store.close().await.unwrap();
    });
}

#[test]
fn a_batch_is_stored_contiguously_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        let batch: Vec<Message> = (0..20).map(|i| msg("Batch", 2, i)).collect();
        let rs = store.append_batch(&batch).await.unwrap();
        for (i, r) in rs.iter().enumerate() {
            assert_eq!(r.queue_offset, i as u64);
            if i > 0 {
                assert_eq!(
                    r.physical_offset,
                    rs[i - 1].physical_offset + rs[i - 1].size as u64
                );
            }
        }
        let got = read_bodies(&store, "Batch", 2).await;
        assert!(got == batch.iter().map(|m| m.body.clone()).collect::<Vec<_>>());
        store.close().await.unwrap();
    });
}

// ---------------------------------------------------------------- consumer offsets

#[test]
fn consumer_offsets_survive_a_restart_and_are_clamped_after_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        let written = append_serial(&store, "Offs", 1, 0..10).await;
        store.commit_offset("g1", "Offs", 0, 7).unwrap();
        store.commit_offset("g2", "Offs", 0, 10).unwrap();
        assert!(store.commit_offset("", "Offs", 0, 1).is_err());
        store.close().await.unwrap();

        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        assert_eq!(store.query_offset("g1", "Offs", 0), Some(7));
        assert_eq!(store.query_offset("g2", "Offs", 0), Some(10));
        assert_eq!(store.query_offset("g3", "Offs", 0), None);
        store.close().await.unwrap();

        // The last record is torn: g2's offset past the new end is clamped to it.
        let (_, last) = written[9];
        let (seg, pos) = seg_file(&path, last.physical_offset);
        write_at(&seg, pos + 40, &[0x11; 4]);
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        assert_eq!(store.queue_bounds("Offs", 0), Some((0, 9)));
        assert_eq!(store.query_offset("g1", "Offs", 0), Some(7));
        assert_eq!(store.query_offset("g2", "Offs", 0), Some(9));
        store.close().await.unwrap();
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        assert_eq!(store.query_offset("g2", "Offs", 0), Some(9));
        store.close().await.unwrap();
    });
}

#[test]
fn consume_queue_zeroed_entries_are_cut() {
    // A power loss can leave a grown file whose new entries never reached the disk.
    rebuilt_after(|p| write_at(&cq_file(p, CQ_TOPIC, 1, 100), 90 * 20, &[0u8; 10 * 20]));
}

/// Records of the old life past a cut, valid at their own positions, must not come back
/// once new appends reach them: after a crash the rest of the segment is zeroed, not only
/// the reach of one write.
#[test]
fn records_past_a_crash_cut_never_come_back() {
    const BIG_SEGMENT: u64 = 16 << 20;
    const BEFORE: usize = 2600;
    const CUT_AT: usize = 250;
    const AGAIN: usize = 2100;
    fn fixed(i: usize) -> Message {
        Message {
            topic: "Stale".into(),
            queue_id: 0,
            tags: "t".into(),
            keys: format!("k{i:06}"),
            body: format!("{i:06}").repeat(664).into_bytes().into(),
            ..Default::default()
        }
    }
    async fn append_fixed(store: &Store, range: std::ops::Range<usize>) -> Vec<AppendResult> {
        let tasks: Vec<_> = range
            .map(|i| {
                let store = store.clone();
                glommio::spawn_local(async move { store.append(&fixed(i)).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        out
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let big = |p: &Path| {
            let mut c = cfg(p, FlushMode::Async);
            c.segment_size = BIG_SEGMENT;
            c
        };
        let store = Store::open(big(&path)).await.unwrap();
        let old = append_fixed(&store, 0..BEFORE).await;
        // Block-sized records: a write ending at one leaves the next old record whole.
        assert!(old.iter().all(|r| r.size == 4096), "size {}", old[0].size);
        store.close().await.unwrap();
        let r = old
            .iter()
            .find(|r| r.queue_offset == CUT_AT as u64)
            .unwrap();
        let seg = path.join("commitlog").join(format!("{:020}", 0));
        // A lost write in the middle, then a crash (no clean checkpoint).
        write_at(&seg, r.physical_offset, &vec![0u8; r.size as usize]);
        std::fs::remove_file(path.join("checkpoint")).unwrap();

        let store = Store::open(big(&path)).await.unwrap();
        assert_eq!(store.queue_bounds("Stale", 0), Some((0, CUT_AT as u64)));
        // New records land exactly where the old ones were.
        let new = append_fixed(&store, BEFORE..BEFORE + AGAIN).await;
        assert!(new.iter().all(|r| r.size == 4096));
        store.close().await.unwrap();
        std::fs::remove_file(path.join("checkpoint")).unwrap();

        let store = Store::open(big(&path)).await.unwrap();
        let want = (CUT_AT + AGAIN) as u64;
        assert_eq!(store.queue_bounds("Stale", 0), Some((0, want)));
        let got = read_all(&store, "Stale", 0).await;
        assert_eq!(got.len() as u64, want);
        assert_eq!(got[CUT_AT].body, fixed(BEFORE).body);
        store.close().await.unwrap();
    });
}

/// A small file system of our own (root can mount one; CI runs as root): a tmpfs to fill, or
/// an ext4 image on a loop device to shut down.
struct SmallFs {
    dir: tempfile::TempDir,
}

/// Size of the file system the full-disk test fills: a handful of test segments.
const SMALL_FS_BYTES: u64 = 8 * TEST_SEGMENT;
/// Plain unmounts tried, this far apart, before a busy file system is detached lazily.
const UMOUNT_ATTEMPTS: u32 = 50;
const UMOUNT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Size of the ext4 image: room for the journal and a few test segments.
const EXT4_IMAGE_BYTES: u64 = 64 << 20;

impl SmallFs {
    fn mount() -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let size = format!("size={SMALL_FS_BYTES}");
        mount(&["-t", "tmpfs", "-o", &size, "tmpfs"], dir.path()).then_some(SmallFs { dir })
    }

    /// Mounts the ext4 `image`, made first if `mkfs`, on a new directory.
    fn mount_ext4(image: &Path, mkfs: bool) -> Option<SmallFs> {
        if mkfs {
            std::fs::File::create(image)
                .and_then(|f| f.set_len(EXT4_IMAGE_BYTES))
                .ok()?;
            let made = std::process::Command::new("mkfs.ext4")
                .arg("-q")
                .arg(image)
                .status();
            if !made.is_ok_and(|s| s.success()) {
                return None;
            }
        }
        let dir = tempfile::tempdir().ok()?;
        let image = image.to_str()?;
        mount(&["-t", "ext4", "-o", "loop", image], dir.path()).then_some(SmallFs { dir })
    }
}

fn mount(args: &[&str], on: &Path) -> bool {
    std::process::Command::new("mount")
        .args(args)
        .arg(on)
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            std::process::Command::new("umount")
                .args(lazy.then_some("-l"))
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success())
        };
        // A file still open keeps it busy. A store's close waits for its work, but another
        // process (a scan, a backup) may hold a file for a moment: wait a little. A failing
        // test may keep one open for good: then detach it anyway, so no mount outlives the
        // test. (Mounting the image again over a lazily detached file system that is still
        // alive reads garbage.)
        let busy = (0..UMOUNT_ATTEMPTS).all(|_| {
            if umount(false) {
                return false;
            }
            std::thread::sleep(UMOUNT_RETRY);
            true
        });
        if busy {
            eprintln!(
                "umount {}: busy, detaching lazily",
                self.dir.path().display()
            );
            umount(true);
        }
    }
}

#[test]
fn a_full_disk_fails_appends_clearly_and_keeps_what_was_written() {
    let Some(fs) = SmallFs::mount() else {
        eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let path = fs.dir.path().join("store");
    run(move || async move {
        let mut c = cfg(&path, FlushMode::Sync);
        c.prewrite_segments = false;
        let store = Store::open(c.clone()).await.unwrap();
        let mut ok = Vec::new();
        let mut err = None;
        for i in 0..10_000 {
            let m = msg("Full", 0, i);
            match store.append(&m).await {
                Ok(r) => ok.push((m, r)),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let err = err.expect("the disk fills up");
        assert!(matches!(err, StoreError::DiskFull(_)), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        assert!(ok.len() > 100, "several segments were filled first");
        // Appends keep failing clearly, and nothing already written is harmed.
        assert!(matches!(
            store.append(&msg("Full", 0, 0)).await,
            Err(StoreError::DiskFull(_))
        ));
        let bodies = read_bodies(&store, "Full", 0).await;
        assert_eq!(bodies.len(), ok.len());
        for ((m, _), b) in ok.iter().zip(&bodies) {
            assert_eq!(&m.body, b);
        }
        store.close().await.unwrap();
        let store = Store::open(c).await.unwrap();
        assert_eq!(read_bodies(&store, "Full", 0).await.len(), ok.len());
        store.close().await.unwrap();
    });
}

/// Shuts the file system holding `dir` down (`FS_IOC_SHUTDOWN`): from then on every write and
/// fdatasync on it fails with EIO, as on a failing device. `flush_log`: commit the journal
/// first (an I/O error without a power loss) or not (the device went away).
fn shut_down_fs(dir: &Path, flush_log: bool) {
    use std::os::fd::AsRawFd;
    /// `_IOR('X', 125, __u32)`.
    const FS_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d;
    const FS_GOING_FLAGS_LOGFLUSH: u32 = 1;
    const FS_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
    let flags = if flush_log {
        FS_GOING_FLAGS_LOGFLUSH
    } else {
        FS_GOING_FLAGS_NOLOGFLUSH
    };
    let d = std::fs::File::open(dir).unwrap();
    // SAFETY: the ioctl reads one u32 that lives across the call, on a descriptor we own.
    let r = unsafe { libc::ioctl(d.as_raw_fd(), FS_IOC_SHUTDOWN, &flags) };
    assert_eq!(r, 0, "FS_IOC_SHUTDOWN: {}", std::io::Error::last_os_error());
}

/// A real I/O error (the ext4 file system under the store is shut down) fences the log:
/// the append that hit it and every later one fail with `Fenced`, close reports it, and
/// after a restart every acknowledged record is there.
fn io_error_fences(flush: FlushMode) {
    let images = tempfile::tempdir().unwrap();
    let image = images.path().join("fs.img");
    let Some(fs) = SmallFs::mount_ext4(&image, true) else {
        eprintln!("SKIPPED: mounting an ext4 image on a loop device needs root (CI runs as root)");
        return;
    };
    let path = fs.dir.path().join("store");
    let c = cfg(&path, flush);
    // Under ASYNC_FLUSH only what was synced survives a lost journal: commit it (the error
    // is an I/O error, not a power loss). SYNC_FLUSH promises more: lose the journal.
    let flush_log = flush == FlushMode::Async;
    let (tx, rx) = std::sync::mpsc::channel();
    let (c1, fs_dir) = (c.clone(), path.clone());
    run(move || async move {
        let store = Store::open(c1).await.unwrap();
        let ok = append_serial(&store, "Fence", 1, 0..50).await;
        shut_down_fs(&fs_dir, flush_log);
        let err = store.append(&msg("Fence", 0, 50)).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced(_)), "{err}");
        assert!(err.to_string().contains("fenced"), "{err}");
        for i in 51..55 {
            let e = store.append(&msg("Fence", 0, i)).await.unwrap_err();
            assert!(matches!(e, StoreError::Fenced(_)), "{e}");
        }
        let e = store.close().await.unwrap_err();
        assert!(matches!(e, StoreError::Fenced(_)), "{e}");
        tx.send(ok).unwrap();
    });
    let ok = rx.recv().unwrap();
    drop(fs);
    let fs = SmallFs::mount_ext4(&image, false).expect("the image mounts again");
    let c = StoreConfig {
        dir: fs.dir.path().join("store"),
        ..c
    };
    run(move || async move {
        let store = Store::open(c).await.unwrap();
        let bodies = read_bodies(&store, "Fence", 0).await;
        assert_eq!(
            bodies,
            bodies_of(&ok, 0),
            "every acknowledged record, nothing else"
        );
        store.close().await.unwrap();
    });
}

#[test]
fn an_io_error_fences_the_log_sync() {
    io_error_fences(FlushMode::Sync);
}

#[test]
fn an_io_error_fences_the_log_async() {
    io_error_fences(FlushMode::Async);
}

/// A segment preparation that fails for another reason than a full disk (here the file it
/// creates is taken by a directory) fails appends with that error, not "disk full".
#[test]
fn a_failed_segment_preparation_is_not_called_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let blocker = path
        .join("commitlog")
        .join(format!("{TEST_SEGMENT:020}.prepare"));
    std::fs::create_dir_all(&blocker).unwrap();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Sync)).await.unwrap();
        let mut err = None;
        for i in 0..10_000 {
            if let Err(e) = store.append(&msg("Prep", 0, i)).await {
                err = Some(e);
                break;
            }
        }
        let err = err.expect("the next segment cannot be prepared");
        assert!(!matches!(err, StoreError::DiskFull(_)), "{err}");
        assert!(err.to_string().contains("segment"), "{err}");
        assert_eq!(store.stats().next_offset, store.stats().written_offset);
        store.close().await.unwrap();
    });
}

/// Opens `path` with segments of `segment_size` and returns the error text.
async fn open_error(path: &Path, segment_size: u64) -> String {
    let mut c = cfg(path, FlushMode::Sync);
    c.segment_size = segment_size;
    match Store::open(c).await {
        Ok(_) => panic!("a store with segments of {segment_size} bytes opened"),
        Err(e) => {
            assert!(matches!(e, StoreError::Config(_)), "{e:?}");
            e.to_string()
        }
    }
}

#[test]
fn a_data_directory_made_with_another_segment_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (two, one) = (dir.path().join("two"), dir.path().join("one"));
    run(move || async move {
        // Records over two segments: segment 1 does not start on a multiple of twice the size.
        let store = Store::open(cfg(&two, FlushMode::Sync)).await.unwrap();
        let written = append_range(&store, "Seg", 1, 0..500).await;
        let log_end = written.iter().map(|(_, r)| r.physical_offset).max();
        assert!(log_end > Some(TEST_SEGMENT), "{log_end:?}");
        store.close().await.unwrap();
        let e = open_error(&two, 2 * TEST_SEGMENT).await;
        assert!(e.contains("not a multiple of the segment size"), "{e}");

        // Made with twice the size: every segment starts on a multiple of the smaller one,
        // and their length tells.
        let mut big = cfg(&one, FlushMode::Sync);
        big.segment_size = 2 * TEST_SEGMENT;
        let store = Store::open(big.clone()).await.unwrap();
        let written = append_range(&store, "Seg", 1, 0..20).await;
        store.close().await.unwrap();
        let e = open_error(&one, TEST_SEGMENT).await;
        let want = format!(
            "is {} bytes, not the segment size {TEST_SEGMENT}",
            2 * TEST_SEGMENT
        );
        assert!(e.contains(&want), "{e}");
        // Nothing was changed: with the size it was made with, every record is there.
        let store = Store::open(big).await.unwrap();
        assert_eq!(read_bodies(&store, "Seg", 0).await, bodies_of(&written, 0));
        store.close().await.unwrap();
    });
}

/// The open flags of this process's descriptors on `file` (from /proc/self/fdinfo).
fn open_flags_of(file: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    for ent in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(ent.path()).ok().as_deref() != Some(file) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            ent.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        if let Some(f) = info.lines().find_map(|l| l.strip_prefix("flags:")) {
            out.push(i32::from_str_radix(f.trim(), 8).unwrap());
        }
    }
    out
}

/// Whether `p` is on a tmpfs (where glommio opens files without O_DIRECT: it has no device).
fn on_tmpfs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs reads the NUL-terminated path and writes the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    }
}

/// What SYNC_FLUSH's acknowledgement rests on: its segments are written with O_DSYNC (each
/// write durable when it completes), and every segment with O_DIRECT (no page cache between
/// an acknowledgement and the device) unless the directory is on a tmpfs.
#[test]
fn segments_are_written_with_o_direct_and_under_sync_flush_o_dsync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        for (flush, sub) in [(FlushMode::Sync, "sync"), (FlushMode::Async, "async")] {
            let store = Store::open(cfg(&path.join(sub), flush)).await.unwrap();
            let r = store.append(&msg("Flags", 0, 1)).await.unwrap();
            let (seg, _) = seg_file(&path.join(sub), r.physical_offset);
            let seg = seg.canonicalize().unwrap();
            let flags = open_flags_of(&seg);
            assert!(!flags.is_empty(), "{} is not open", seg.display());
            let direct = !on_tmpfs(&seg);
            for f in flags {
                assert_eq!(f & libc::O_DIRECT != 0, direct, "{sub}: flags {f:o}");
                assert_eq!(
                    f & libc::O_DSYNC != 0,
                    flush == FlushMode::Sync,
                    "{sub}: {f:o}"
                );
            }
            store.close().await.unwrap();
        }
    });
}

/// An idle shard does not rewrite its checkpoint every persist round (two fsyncs and a rename
/// each, for nothing); new appends are checkpointed again.
#[test]
fn an_idle_store_leaves_its_checkpoint_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path, FlushMode::Async)).await.unwrap();
        let cp = path.join("checkpoint");
        // Each write of the checkpoint is a new file renamed over the old: a new mtime.
        let written = || std::fs::metadata(&cp).unwrap().modified().unwrap();
        store.append(&msg("Idle", 0, 0)).await.unwrap();
        let settled = |store: &Store| {
            let s = store.stats();
            s.synced_offset == s.next_offset
        };
        while !settled(&store) {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // The round that checkpoints the append may be slow (it syncs the file system first),
        // so wait for the checkpoint to count it; then every round is idle.
        let counts = |n: u64| {
            std::fs::read(&cp)
                .ok()
                .and_then(|b| Checkpoint::decode(&b))
                .is_some_and(|c| c.queues.contains(&("Idle".to_string(), 0, n)))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !counts(1) {
            assert!(
                std::time::Instant::now() < deadline,
                "the append was never checkpointed"
            );
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        // A write already under way when it was read may still land: the mtime must then
        // stay put for ten rounds, within the deadline.
        let mut first = written();
        loop {
            glommio::timer::sleep(Duration::from_millis(200)).await;
            let now = written();
            if now == first {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "idle rounds keep rewriting the checkpoint"
            );
            first = now;
        }
        store.append(&msg("Idle", 0, 1)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !counts(2) {
            assert!(
                std::time::Instant::now() < deadline,
                "a new append was never checkpointed"
            );
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        store.close().await.unwrap();
    });
}

/// Files of this process open under `dir` (the blocking pool's threads share the table).
fn open_files_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Once close() returns nothing of the store touches its files: the next segment being
/// pre-written in the background (256 MiB of zeros, paced) stops and is removed, so the data
/// directory can be unmounted or handed to another process at once.
#[test]
fn close_ends_background_work_so_no_file_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    // As /proc names open files.
    let path = std::fs::canonicalize(dir.path()).unwrap().join("store");
    run(move || async move {
        let mut c = cfg(&path, FlushMode::Sync);
        // Pre-writing the next segment takes a second or more here (paced 1 MiB writes).
        c.segment_size = 256 << 20;
        c.prewrite_segments = true;
        let store = Store::open(c.clone()).await.unwrap();
        // The first append starts preparing the next segment.
        let ok = append_serial(&store, "Close", 1, 0..10).await;
        let preparing = |p: &Path| p.extension().is_some_and(|e| e == "prepare");
        let open = open_files_under(&path);
        assert!(
            open.iter().any(|p| preparing(p)),
            "no pre-write under way: {open:?}"
        );
        // Two callers: each returns once the store is closed.
        let closing = || async {
            let r = store.close().await;
            (r, open_files_under(&path))
        };
        let (a, b) = futures_lite::future::zip(closing(), closing()).await;
        for (r, open) in [a, b] {
            r.unwrap();
            assert!(open.is_empty(), "open after close: {open:?}");
        }
        let left: Vec<PathBuf> = std::fs::read_dir(path.join("commitlog"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| preparing(p))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let store = Store::open(c).await.unwrap();
        assert_eq!(read_bodies(&store, "Close", 0).await, bodies_of(&ok, 0));
        store.close().await.unwrap();
    });
}
