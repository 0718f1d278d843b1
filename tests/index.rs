//! Key index tests: queries by key and unique key, and lookups by offset, against real files
//! under a glommio executor, across file rolls, restarts, a crash, damage and retention.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::os::unix::fs::FileExt;

use orbitmq::log::config::IndexConfig;
use orbitmq::log::indexfile::{read_header, HashKey, HASH_KEY_LEN};
use orbitmq::log::retention::RetentionPolicy;
use orbitmq::log::{AppendResult, FlushMode, Store, StoreConfig, StoreError};
use orbitmq::proto::record::{self, Message};

mod store_support;
use store_support::run;

const SEGMENT: u64 = 64 * 1024;
const TOPIC: &str = "Orders";
const OTHER: &str = "Other";
/// Small files, so a few hundred messages roll over several of them.
const SLOTS: u32 = 16;
const ENTRIES: u32 = 100;

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir, FlushMode::Async);
    c.segment_size = SEGMENT;
    c.cq_entries_per_file = 100;
    c.flush_interval = Duration::from_millis(20);
    c.cq_flush_interval = Duration::from_millis(20);
    c.index = Some(IndexConfig {
        hash_slots: SLOTS,
        max_entries: ENTRIES,
    });
    c
}

/// Message `i`: keys `k<i>` and `order-<i mod 10>`, unique key `u<i>`.
fn msg(topic: &str, i: usize) -> Message {
    Message {
        topic: topic.into(),
        queue_id: (i % 3) as u32,
        keys: format!("k{i} order-{}", i % 10),
        properties: vec![("UNIQ_KEY".into(), format!("u{i}"))],
        body: format!("{topic}-body-{i}-")
            .repeat(1 + i % 13)
            .into_bytes()
            .into(),
        ..Default::default()
    }
}

async fn append(store: &Store, topic: &str, range: std::ops::Range<usize>) -> Vec<AppendResult> {
    let mut out = Vec::new();
    for i in range {
        out.push(store.append(&msg(topic, i)).await.unwrap());
    }
    out
}

async fn query(store: &Store, topic: &str, key: &str, unique: bool) -> Vec<(String, Vec<u8>)> {
    let got = store
        .query_key(topic, key, unique, 0, u64::MAX, 256)
        .await
        .unwrap()
        .0;
    got.iter()
        .map(|b| {
            let v = record::decode(b).unwrap();
            (v.topic.to_owned(), v.body.to_vec())
        })
        .collect()
}

fn bodies(topic: &str, ids: impl IntoIterator<Item = usize>) -> Vec<(String, Vec<u8>)> {
    ids.into_iter()
        .map(|i| (topic.to_owned(), msg(topic, i).body.to_vec()))
        .collect()
}

/// What every test expects of messages `0..n` of both topics.
async fn check_queries(store: &Store, n: usize) {
    for k in [0, 3, 9] {
        assert_eq!(
            query(store, TOPIC, &format!("order-{k}"), false).await,
            bodies(TOPIC, (0..n).filter(|i| i % 10 == k)),
            "every message with key order-{k}, in log order"
        );
    }
    for i in [0, 1, n / 2, n - 1] {
        assert_eq!(
            query(store, TOPIC, &format!("k{i}"), false).await,
            bodies(TOPIC, [i])
        );
        assert_eq!(
            query(store, OTHER, &format!("k{i}"), false).await,
            bodies(OTHER, [i]),
            "the same key in another topic is another message"
        );
        assert_eq!(
            query(store, TOPIC, &format!("u{i}"), true).await,
            bodies(TOPIC, [i]),
            "by unique key"
        );
        assert!(
            query(store, TOPIC, &format!("u{i}"), false)
                .await
                .is_empty(),
            "a unique key is not a key"
        );
    }
    assert!(query(store, TOPIC, "k-none", false).await.is_empty());
    assert!(query(store, "NoSuchTopic", "k1", false).await.is_empty());
}

fn index_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn keys_are_found_across_index_files_restarts_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p = path.clone();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        append(&store, TOPIC, 0..200).await;
        append(&store, OTHER, 0..200).await;
        // Found from memory before anything is persisted, and from the files after.
        check_queries(&store, 200).await;
        glommio::timer::sleep(Duration::from_millis(200)).await;
        check_queries(&store, 200).await;
        store.close().await.unwrap();
        // 3 keys a message, 100 entries a file.
        assert!(index_files(&p).len() >= 10, "{:?}", index_files(&p));

        // Nothing more is persisted in this run: what follows is only in the log when the
        // store is dropped without a close, as a crashed process leaves it.
        let mut c = cfg(&p);
        c.cq_flush_interval = Duration::from_secs(3600);
        let store = Store::open(c).await.unwrap();
        check_queries(&store, 200).await;
        append(&store, TOPIC, 200..300).await;
        append(&store, OTHER, 200..300).await;
        check_queries(&store, 300).await;
    });
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        check_queries(&store, 300).await;
        // Appends go on, and are found.
        append(&store, TOPIC, 300..310).await;
        append(&store, OTHER, 300..310).await;
        check_queries(&store, 310).await;
        store.close().await.unwrap();
    });
}

#[test]
fn a_time_range_and_a_maximum_bound_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        let first = append(&store, TOPIC, 0..100).await;
        glommio::timer::sleep(Duration::from_millis(20)).await;
        let second = append(&store, TOPIC, 100..200).await;
        let from = second[0].store_timestamp;
        assert!(from > first.last().unwrap().store_timestamp);
        let got = store
            .query_key(TOPIC, "order-4", false, from, u64::MAX, 256)
            .await
            .unwrap()
            .0;
        let want: Vec<Vec<u8>> = (100..200)
            .filter(|i| i % 10 == 4)
            .map(|i| msg(TOPIC, i).body.to_vec())
            .collect();
        let got: Vec<Vec<u8>> = got
            .iter()
            .map(|b| record::decode(b).unwrap().body.to_vec())
            .collect();
        assert_eq!(got, want, "only messages stored from `from` on");
        let until = first.last().unwrap().store_timestamp;
        let got = store
            .query_key(TOPIC, "order-4", false, 0, until, 256)
            .await
            .unwrap()
            .0;
        assert_eq!(got.len(), 10, "only messages stored up to `until`");
        let (got, truncated) = store
            .query_key(TOPIC, "order-4", false, 0, u64::MAX, 3)
            .await
            .unwrap();
        assert!(!truncated, "a maximum is not a truncation");
        let got: Vec<Vec<u8>> = got
            .iter()
            .map(|b| record::decode(b).unwrap().body.to_vec())
            .collect();
        let newest: Vec<Vec<u8>> = [174, 184, 194]
            .iter()
            .map(|i| msg(TOPIC, *i).body.to_vec())
            .collect();
        assert_eq!(got, newest, "the newest 3, oldest first");
        store.close().await.unwrap();
    });
}

#[test]
fn damaged_or_missing_index_files_are_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p = path.clone();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        append(&store, TOPIC, 0..150).await;
        append(&store, OTHER, 0..150).await;
        store.close().await.unwrap();
    });
    // A flipped header byte in the middle file: it and the later ones are rebuilt.
    let files = index_files(&path);
    let mid = &files[files.len() / 2];
    let mut b = std::fs::read(mid).unwrap();
    b[20] ^= 0xff;
    std::fs::write(mid, b).unwrap();
    // The last (open) file loses its last entries, as a torn write.
    let last = files.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 30)
        .unwrap();
    let p = path.clone();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        check_queries(&store, 150).await;
        store.close().await.unwrap();
    });
    // Every file gone (a data directory from before the index): rebuilt from the log.
    std::fs::remove_dir_all(path.join("index")).unwrap();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        check_queries(&store, 150).await;
        store.close().await.unwrap();
        assert!(!index_files(&path).is_empty());
    });
}

/// The hash key of each index file of a data directory, oldest file first.
fn file_keys(path: &Path) -> Vec<HashKey> {
    index_files(path)
        .iter()
        .map(|f| read_header(f).unwrap().expect("a valid header").key)
        .collect()
}

/// Keys are hashed under a secret random key per index, kept in every file's header: a
/// restart keeps it; a file under another key, or a file of the first (unkeyed) format, is
/// rebuilt from the log under the index's key.
#[test]
fn an_index_keeps_one_random_hash_key_in_all_its_files() {
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let path = dir.path().to_path_buf();
    let (p, o) = (path.clone(), other.path().to_path_buf());
    run(move || async move {
        for d in [&p, &o] {
            let store = Store::open(cfg(d)).await.unwrap();
            append(&store, TOPIC, 0..150).await;
            append(&store, OTHER, 0..150).await;
            store.close().await.unwrap();
        }
    });
    let keys = file_keys(&path);
    assert!(keys.len() >= 3, "{} files", keys.len());
    assert!(keys.iter().all(|k| *k == keys[0]), "one key per index");
    assert_ne!(file_keys(other.path())[0], keys[0], "random per index");
    // A restart keeps it.
    assert_eq!(reopened_key(&path), keys[0]);

    // The middle file rewritten under another key (a valid header): rebuilt under the first's.
    let files = index_files(&path);
    let mid = &files[files.len() / 2];
    let mut h = read_header(mid).unwrap().unwrap();
    h.key = HashKey([9; HASH_KEY_LEN]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(mid)
        .unwrap()
        .write_all_at(&h.encode(), 0)
        .unwrap();
    assert_eq!(reopened_key(&path), keys[0]);

    // The first file in the first format (magic "OIDX", CRC32C hashes): all are rebuilt, under
    // a new key.
    let first = &index_files(&path)[0];
    let mut b = std::fs::read(first).unwrap();
    b[..4].copy_from_slice(&0x5844_494F_u32.to_le_bytes());
    std::fs::write(first, b).unwrap();
    assert_ne!(reopened_key(&path), keys[0]);
}

/// Reopens the store of [`an_index_keeps_one_random_hash_key_in_all_its_files`], checks its
/// queries, and returns the one hash key its files then share.
fn reopened_key(path: &Path) -> HashKey {
    let p = path.to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        check_queries(&store, 150).await;
        store.close().await.unwrap();
    });
    let keys = file_keys(path);
    assert!(keys.len() >= 3, "{} files", keys.len());
    assert!(keys.iter().all(|k| *k == keys[0]), "one key per index");
    keys[0]
}

#[test]
fn retention_deletes_index_files_whose_messages_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let mut c = cfg(&path);
        c.retention = RetentionPolicy {
            delete_when_hours: vec![4],
            file_reserved_hours: 1,
            ..RetentionPolicy::default()
        };
        let store = Store::open(c.clone()).await.unwrap();
        let written = append(&store, TOPIC, 0..900).await;
        assert!(written.last().unwrap().physical_offset > 3 * SEGMENT);
        let before = index_files(&path).len();
        let old = SystemTime::now() - Duration::from_secs(2 * 3600);
        for base in [0, SEGMENT] {
            let seg = path.join("commitlog").join(format!("{base:020}"));
            std::fs::OpenOptions::new()
                .write(true)
                .open(seg)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let now = orbitmq::proto::now_ms();
        let deleted = store.run_retention(now, 4, 0.1).await.unwrap();
        assert_eq!(deleted, vec![0, SEGMENT]);
        let after = index_files(&path).len();
        assert!(
            after < before,
            "index files of deleted segments go: {before} -> {after}"
        );
        let kept = written
            .iter()
            .position(|r| r.physical_offset >= 2 * SEGMENT)
            .unwrap();
        for i in [0, kept - 1] {
            assert!(query(&store, TOPIC, &format!("k{i}"), false)
                .await
                .is_empty());
        }
        for i in [kept, 899] {
            assert_eq!(
                query(&store, TOPIC, &format!("k{i}"), false).await,
                bodies(TOPIC, [i])
            );
        }
        store.close().await.unwrap();
        let store = Store::open(c).await.unwrap();
        assert_eq!(
            query(&store, TOPIC, &format!("k{kept}"), false).await,
            bodies(TOPIC, [kept])
        );
        store.close().await.unwrap();
    });
}

#[test]
fn a_record_is_found_by_its_offset_and_nothing_else_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        let written = append(&store, TOPIC, 0..400).await;
        for (i, r) in written.iter().enumerate().step_by(37) {
            let b = store.record_by_offset(r.physical_offset).await.unwrap();
            let b = b.expect("a record starts there");
            let v = record::decode(&b).unwrap();
            assert_eq!(v.body, &msg(TOPIC, i).body[..]);
            assert_eq!(v.physical_offset, r.physical_offset);
            // Inside a record, past the end: nothing.
            for off in [r.physical_offset + 1, r.physical_offset + 4] {
                assert_eq!(store.record_by_offset(off).await.unwrap(), None, "{off}");
            }
        }
        let end = store.stats().next_offset;
        assert_eq!(store.record_by_offset(end).await.unwrap(), None);
        assert_eq!(store.record_by_offset(u64::MAX - 1).await.unwrap(), None);
        // The blank record closing a full segment is not a message.
        let rolled = written
            .windows(2)
            .find(|w| w[1].physical_offset % SEGMENT == 0)
            .expect("a segment was closed");
        let blank = rolled[0].physical_offset + rolled[0].size as u64;
        assert_eq!(store.record_by_offset(blank).await.unwrap(), None);
        store.close().await.unwrap();
    });
}

#[test]
fn without_the_index_a_query_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let mut c = cfg(&path);
        c.index = None;
        let store = Store::open(c).await.unwrap();
        append(&store, TOPIC, 0..10).await;
        match store.query_key(TOPIC, "k1", false, 0, u64::MAX, 10).await {
            Err(StoreError::IndexDisabled) => {}
            other => panic!("expected IndexDisabled, got {other:?}"),
        }
        assert!(!path.join("index").exists());
        store.close().await.unwrap();
    });
}

#[test]
fn offsets_at_the_top_of_the_range_find_nothing_on_a_young_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        append(&store, TOPIC, 0..1).await;
        for off in (u64::MAX - 4..=u64::MAX).chain([1, 2, 3]) {
            assert_eq!(store.record_by_offset(off).await.unwrap(), None, "{off}");
        }
        assert!(store.record_by_offset(0).await.unwrap().is_some());
        store.close().await.unwrap();
    });
}

/// The unsealed (newest) file as the header of its first bytes says.
fn last_header(path: &Path) -> (PathBuf, orbitmq::log::indexfile::Header) {
    let last = index_files(path).pop().unwrap();
    let h = orbitmq::log::indexfile::read_header(&last)
        .unwrap()
        .unwrap();
    (last, h)
}

#[test]
fn a_torn_tail_of_the_newest_file_is_cut_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p = path.clone();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        append(&store, TOPIC, 0..130).await;
        append(&store, OTHER, 0..130).await;
        store.close().await.unwrap();
    });
    let (last, h) = last_header(&path);
    assert!(!h.sealed && h.count >= 6, "{h:?}");
    // Its last 5 entries zeroed, as writes that never reached the disk.
    let f = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    let at = h.entry_pos(h.count - 4);
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0u8; 5 * 28], at).unwrap();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        check_queries(&store, 130).await;
        store.close().await.unwrap();
    });
}

#[test]
fn an_index_past_a_cut_log_forgets_what_the_log_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p = path.clone();
    let last = std::sync::Arc::new(std::sync::Mutex::new(None));
    let l = last.clone();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        append(&store, OTHER, 0..150).await;
        let r = append(&store, TOPIC, 0..150).await;
        store.close().await.unwrap();
        *l.lock().unwrap() = Some(*r.last().unwrap());
    });
    // The last record damaged after it was indexed: recovery cuts the log before it.
    let r: AppendResult = last.lock().unwrap().unwrap();
    let seg = path.join("commitlog").join(format!(
        "{:020}",
        r.physical_offset - r.physical_offset % SEGMENT
    ));
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"XX", r.physical_offset % SEGMENT + 40)
        .unwrap();
    let p = path.clone();
    run(move || async move {
        let store = Store::open(cfg(&p)).await.unwrap();
        assert_eq!(
            store.stats().next_offset,
            r.physical_offset,
            "the log is cut"
        );
        // The index file on disk says so at once: a crash now must not bring back entries
        // of the lost record.
        let (_, h) = last_header(&p);
        assert!(h.covered <= r.physical_offset, "{h:?}");
        assert!(query(&store, TOPIC, "k149", false).await.is_empty());
        assert!(query(&store, TOPIC, "u149", true).await.is_empty());
        check_queries(&store, 149).await;
        // A new message takes the lost one's place, and a crash follows.
        let mut m = msg(TOPIC, 149);
        m.keys = "k149".into();
        m.properties = vec![("UNIQ_KEY".into(), "u-again".into())];
        m.body = "again".into();
        store.append(&m).await.unwrap();
        assert_eq!(query(&store, TOPIC, "k149", false).await.len(), 1);
    });
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        let got = query(&store, TOPIC, "k149", false).await;
        assert_eq!(got, vec![(TOPIC.to_owned(), b"again".to_vec())]);
        check_queries(&store, 149).await;
        store.close().await.unwrap();
    });
}

#[test]
fn a_clean_close_without_keys_leaves_an_index_covering_the_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        for i in 0..300 {
            let m = Message {
                topic: TOPIC.into(),
                body: format!("no key {i}").into_bytes().into(),
                ..Default::default()
            };
            store.append(&m).await.unwrap();
        }
        let end = store.stats().next_offset;
        store.close().await.unwrap();
        // The next start rescans nothing the index already covers.
        let (_, h) = last_header(&path);
        assert_eq!((h.count, h.covered), (0, end));
    });
}

#[test]
fn a_committed_half_message_is_found_by_its_unique_key_with_the_half_offset() {
    // What a commit looks for before it stores a half message's copy (src/shard/txn.rs).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let store = Store::open(cfg(&path)).await.unwrap();
        let mut half = msg(TOPIC, 7);
        orbitmq::txn::to_half(&mut half, "pg").unwrap();
        let h = store.append(&half).await.unwrap();
        let b = store
            .record_by_offset(h.physical_offset)
            .await
            .unwrap()
            .unwrap();
        let committed = orbitmq::txn::committed(&record::decode(&b).unwrap()).unwrap();
        store.append(&committed).await.unwrap();
        let (found, _) = store
            .query_key(TOPIC, "u7", true, h.store_timestamp, u64::MAX, 16)
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        let v = record::decode(&found[0]).unwrap();
        assert_eq!(v.prepared_tx_offset, h.physical_offset);
        assert_eq!(v.body, &msg(TOPIC, 7).body[..]);
        store.close().await.unwrap();
    });
}
