//! Storage engine tests: real files with O_DIRECT under a glommio executor.

use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};
use orbitmq::log::{FlushMode, ReadStatus, Store, StoreConfig};
use orbitmq::proto::record::{self, Message};

/// Small segments so tests roll over several of them.
const TEST_SEGMENT: u64 = 64 * 1024;

fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 * 1024)
        .spawn(f)
        .expect("glommio executor")
        .join()
        .expect("executor ran");
}

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
        tags: if i % 2 == 0 {
            "even".into()
        } else {
            "odd".into()
        },
        keys: format!("k{i}"),
        properties: vec![("UNIQ_KEY".into(), format!("u{i}"))],
        body: format!("body-{i}-").repeat(1 + i % 37).into_bytes(),
        ..Default::default()
    }
}

async fn read_all(store: &Store, topic: &str, queue: u32) -> Vec<Message> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let r = store
            .read(topic, queue, off, 32, 1 << 20, None)
            .await
            .unwrap();
        if r.status != ReadStatus::Found {
            break;
        }
        for b in &r.records {
            let v = record::decode(b).unwrap();
            assert_eq!(
                v.queue_offset,
                out.len() as u64,
                "queue offsets are dense and in order"
            );
            out.push(v.to_message());
        }
        off = r.next_offset;
    }
    out
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
