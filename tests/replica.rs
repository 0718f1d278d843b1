//! A slave's store copying a master's log (`Store::read_log` on the master, `append_replica`
//! on the slave), against real files: a byte copy across segment rolls and a restart, the
//! same queues, offsets and key lookups, and copies that do not continue the log refused with
//! nothing written.

use std::path::Path;
use std::time::{Duration, SystemTime};

use orbitmq::log::config::IndexConfig;
use orbitmq::log::retention::RetentionPolicy;
use orbitmq::log::{FlushMode, Store, StoreConfig, StoreError};
use orbitmq::proto::record::{self, Message};

mod store_support;
use store_support::{read_all, read_from, run};

const SEGMENT: u64 = 64 * 1024;
const TOPICS: [&str; 2] = ["Orders", "Audit"];
const QUEUES: u32 = 3;

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir, FlushMode::Async);
    c.segment_size = SEGMENT;
    c.cq_entries_per_file = 50;
    c.flush_interval = Duration::from_millis(20);
    c.cq_flush_interval = Duration::from_millis(20);
    c.index = Some(IndexConfig {
        hash_slots: 64,
        max_entries: 1000,
    });
    c
}

fn msg(i: usize) -> Message {
    Message {
        topic: TOPICS[i % 2].into(),
        queue_id: (i % QUEUES as usize) as u32,
        tags: format!("t{}", i % 4),
        keys: format!("k{i}"),
        body: format!("body-{i}-").repeat(1 + i % 60).into_bytes().into(),
        ..Default::default()
    }
}

/// Appends messages `range` to the master: singles, and every tenth a batch of three.
async fn produce(master: &Store, range: std::ops::Range<usize>) {
    let mut i = range.start;
    while i < range.end {
        if i.is_multiple_of(10) && i + 3 <= range.end {
            let batch: Vec<Message> = (0..3)
                .map(|_| Message {
                    queue_id: 0,
                    topic: TOPICS[0].into(),
                    ..msg(i)
                })
                .collect();
            master.append_batch(&batch).await.unwrap();
            i += 3;
        } else {
            master.append(&msg(i)).await.unwrap();
            i += 1;
        }
    }
}

/// Copies the master's log into the slave until the slave reaches the master's end, in
/// chunks of at most `max` bytes; returns the number of chunks.
async fn copy(master: &Store, slave: &Store, max: usize) -> usize {
    let mut chunks = 0;
    loop {
        let from = slave.log_range().1;
        let chunk = master.read_log(from, max).await.unwrap();
        if chunk.is_empty() {
            assert_eq!(
                from,
                master.log_range().1,
                "stopped before the master's end"
            );
            return chunks;
        }
        let end = slave.append_replica(from, &chunk).await.unwrap();
        assert!(end > from);
        chunks += 1;
    }
}

/// Every segment file of both stores, byte for byte, up to the master's written end.
fn same_log(master_dir: &Path, slave_dir: &Path, end: u64) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d.join("commitlog"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let segs = names(master_dir);
    assert!(segs.len() >= 3, "the test rolls segments: {segs:?}");
    for name in &segs {
        let base: u64 = name.parse().unwrap();
        if base >= end {
            continue;
        }
        let len = (end - base).min(SEGMENT) as usize;
        let m = std::fs::read(master_dir.join("commitlog").join(name)).unwrap();
        let s = std::fs::read(slave_dir.join("commitlog").join(name))
            .unwrap_or_else(|e| panic!("slave segment {name}: {e}"));
        assert!(m[..len] == s[..len], "segment {name} differs");
    }
}

async fn same_queues(master: &Store, slave: &Store) {
    assert_eq!(master.queues(), slave.queues());
    for t in TOPICS {
        for q in 0..QUEUES {
            let (m, s) = (read_all(master, t, q).await, read_all(slave, t, q).await);
            assert!(!m.is_empty());
            assert_eq!(m, s, "{t}:{q}");
        }
    }
}

#[test]
fn a_slave_copies_the_log_byte_for_byte_across_rolls_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (md, sd) = (dir.path().join("m"), dir.path().join("s"));
    run(move || async move {
        let master = Store::open(cfg(&md)).await.unwrap();
        let slave = Store::open(cfg(&sd)).await.unwrap();
        produce(&master, 0..1000).await;
        // Small chunks: many copies, several of them a single record larger than asked for.
        let chunks = copy(&master, &slave, 300).await;
        assert!(chunks > 100, "{chunks} chunks");
        same_queues(&master, &slave).await;
        let end = master.log_range().1;
        assert!(end > 3 * SEGMENT);
        assert_eq!(slave.log_range().1, end);

        // A key lookup on the slave finds the master's record, at the master's offset.
        let (m, _) = master
            .query_key(TOPICS[1], "k7", false, 0, u64::MAX, 8)
            .await
            .unwrap();
        let (s, _) = slave
            .query_key(TOPICS[1], "k7", false, 0, u64::MAX, 8)
            .await
            .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m, s);

        // The slave restarts and goes on from its end; large chunks this time.
        slave.close().await.unwrap();
        let slave = Store::open(cfg(&sd)).await.unwrap();
        assert_eq!(slave.log_range().1, end);
        produce(&master, 1000..1300).await;
        copy(&master, &slave, 1 << 20).await;
        same_queues(&master, &slave).await;
        let end = master.log_range().1;
        master.close().await.unwrap();
        slave.close().await.unwrap();
        same_log(&md, &sd, end);

        // Appends to the slave's own copy go on at the same offsets as the master's.
        let slave = Store::open(cfg(&sd)).await.unwrap();
        let r = slave.append(&msg(1300)).await.unwrap();
        assert_eq!(r.physical_offset, end);
        slave.close().await.unwrap();
    });
}

#[test]
fn copies_that_do_not_continue_the_log_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (md, sd) = (dir.path().join("m"), dir.path().join("s"));
    run(move || async move {
        let master = Store::open(cfg(&md)).await.unwrap();
        let slave = Store::open(cfg(&sd)).await.unwrap();
        produce(&master, 0..40).await;
        let first = master.read_log(0, 1 << 20).await.unwrap();
        let one = match record::peek(&first).unwrap() {
            record::Peek::Record(n) => n as usize,
            other => panic!("{other:?}"),
        };
        let refused = |r: Result<u64, StoreError>, what: &str| match r {
            Err(StoreError::Replica(why)) => why,
            other => panic!("{what}: {other:?}"),
        };
        // Not at the slave's end.
        let why = refused(
            slave.append_replica(one as u64, &first[one..]).await,
            "past the end",
        );
        assert!(why.contains("ends at 0"), "{why}");
        // A damaged byte fails the record's CRC.
        let mut bad = first.to_vec();
        bad[one / 2] ^= 0xFF;
        refused(slave.append_replica(0, &bad).await, "damaged");
        // A cut record.
        refused(slave.append_replica(0, &first[..one - 1]).await, "cut");
        // A blank record that does not close the segment.
        let mut blank = vec![0u8; 8];
        record::encode_blank(&mut blank, 8);
        refused(slave.append_replica(0, &blank).await, "blank");
        // A blank record longer than any run of records that closes a segment early: with
        // segments larger than one write, a segment-long blank at its start is refused.
        let big_dir = sd.with_file_name("big");
        let mut big_cfg = cfg(&big_dir);
        big_cfg.segment_size = 64 << 20;
        let big = Store::open(big_cfg).await.unwrap();
        let mut huge = vec![0u8; 8];
        record::encode_blank(&mut huge, 64 << 20);
        let why = refused(big.append_replica(0, &huge).await, "huge blank");
        assert!(why.contains("does not close the segment"), "{why}");
        assert_eq!(big.log_range().1, 0);
        big.close().await.unwrap();
        // A topic that is not a topic name (it would name directories).
        let mut bad_topic = Vec::new();
        record::encode_into(
            &Message {
                topic: "../escape".into(),
                body: bytes::Bytes::from_static(b"x"),
                ..Default::default()
            },
            record::Placement {
                queue_offset: 0,
                physical_offset: 0,
                store_timestamp: 1,
            },
            &mut bad_topic,
        );
        let why = refused(slave.append_replica(0, &bad_topic).await, "bad topic");
        assert!(why.contains("topic"), "{why}");
        assert_eq!(slave.log_range().1, 0, "nothing was written");
        assert!(slave.queues().is_empty());

        // A good record then a damaged one: refused, and the good one is still written.
        let n2 = match record::peek(&first[one..]).unwrap() {
            record::Peek::Record(n) => n as usize,
            other => panic!("{other:?}"),
        };
        let mut half_bad = first[..one + n2].to_vec();
        half_bad[one + n2 / 2] ^= 0xFF;
        refused(slave.append_replica(0, &half_bad).await, "half damaged");
        for _ in 0..100 {
            if slave.log_range().1 == one as u64 {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            slave.log_range().1,
            one as u64,
            "the good record is written"
        );

        // A record whose queue offset skips ahead of its queue's end.
        let second = master.read_log(one as u64, 1 << 20).await.unwrap();
        let v = record::decode(&first[..one]).unwrap();
        let skip = Message {
            topic: v.topic.into(),
            queue_id: v.queue_id,
            body: bytes::Bytes::from_static(b"x"),
            ..Default::default()
        };
        let mut forged = Vec::new();
        record::encode_into(
            &skip,
            record::Placement {
                queue_offset: v.queue_offset + 2,
                physical_offset: one as u64,
                store_timestamp: v.store_timestamp,
            },
            &mut forged,
        );
        let why = refused(slave.append_replica(one as u64, &forged).await, "queue gap");
        assert!(why.contains("does not follow"), "{why}");
        // The real continuation is still taken.
        slave.append_replica(one as u64, &second).await.unwrap();
        copy(&master, &slave, 1 << 20).await;
        same_queues(&master, &slave).await;
        master.close().await.unwrap();
        slave.close().await.unwrap();
    });
}

#[test]
fn a_slave_shows_its_last_record_and_a_master_tells_whether_it_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let (md, sd, od) = (
        dir.path().join("m"),
        dir.path().join("s"),
        dir.path().join("o"),
    );
    run(move || async move {
        let master = Store::open(cfg(&md)).await.unwrap();
        let slave = Store::open(cfg(&sd)).await.unwrap();
        // Another master whose log has other records at the same offsets.
        let other = Store::open(cfg(&od)).await.unwrap();
        assert_eq!(slave.last_record(), None);
        produce(&master, 0..300).await;
        produce(&other, 1..301).await;
        copy(&master, &slave, 1 << 20).await;
        let (at, size, ts) = slave.last_record().unwrap();
        assert_eq!(master.last_record(), Some((at, size, ts)));
        assert!(master.has_record(at, size, ts).await.unwrap());
        assert!(!other.has_record(at, size, ts).await.unwrap(), "diverged");
        assert!(!master.has_record(at, size, ts + 1).await.unwrap());
        // Known again after a restart (recovery finds it).
        slave.close().await.unwrap();
        let slave = Store::open(cfg(&sd)).await.unwrap();
        assert_eq!(slave.last_record(), Some((at, size, ts)));
        for s in [master, slave, other] {
            s.close().await.unwrap();
        }
    });
}

#[test]
fn a_new_slave_starts_where_its_masters_log_starts_once_retention_removed_the_first_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (md, sd) = (dir.path().join("m"), dir.path().join("s"));
    run(move || async move {
        let mut mc = cfg(&md);
        mc.retention = RetentionPolicy {
            delete_when_hours: vec![4],
            file_reserved_hours: 1,
            ..RetentionPolicy::default()
        };
        let master = Store::open(mc).await.unwrap();
        produce(&master, 0..1000).await;
        // The first two segments are old: retention removes them.
        let old = SystemTime::now() - Duration::from_secs(2 * 3600);
        for base in [0, SEGMENT] {
            std::fs::OpenOptions::new()
                .write(true)
                .open(md.join("commitlog").join(format!("{base:020}")))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let deleted = master
            .run_retention(orbitmq::proto::now_ms(), 4, 0.1)
            .await
            .unwrap();
        assert_eq!(deleted, vec![0, SEGMENT]);
        let (start, _) = master.log_range();
        assert_eq!(start, 2 * SEGMENT);

        let slave = Store::open(cfg(&sd)).await.unwrap();
        match master.start_at(start).await {
            Err(StoreError::Replica(why)) => assert!(why.contains("holds records"), "{why}"),
            other => panic!("a store with records started over: {other:?}"),
        }
        slave.start_at(start).await.unwrap();
        assert_eq!(slave.log_range(), (start, start));
        copy(&master, &slave, 1 << 20).await;
        // Queues start where the master's do now, past 0, with the same messages.
        let queues = master.queues();
        assert!(queues.iter().all(|(_, _, min, _)| *min > 0), "{queues:?}");
        assert_eq!(slave.queues(), queues);
        async fn same_from_min(master: &Store, slave: &Store, queues: &[(String, u32, u64, u64)]) {
            for (t, q, min, _) in queues {
                let (m, s) = (
                    read_from(master, t, *q, *min).await,
                    read_from(slave, t, *q, *min).await,
                );
                assert!(!m.is_empty());
                assert_eq!(m, s, "{t}:{q}");
            }
        }
        same_from_min(&master, &slave, &queues).await;
        // After a restart the queues still start at their first real entry.
        slave.close().await.unwrap();
        let slave = Store::open(cfg(&sd)).await.unwrap();
        assert_eq!(slave.queues(), queues);
        same_from_min(&master, &slave, &queues).await;
        master.close().await.unwrap();
        slave.close().await.unwrap();
    });
}
