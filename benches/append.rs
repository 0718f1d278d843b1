//! Append throughput of one shard's store, 1 KiB records, on real O_DIRECT files:
//! ASYNC_FLUSH, and SYNC_FLUSH with 1, 16 and 256 concurrent appenders.
//!
//! `cargo bench --bench append` (the data goes to a temporary directory under $TMPDIR, which
//! must be on a file system with O_DIRECT, such as ext4 or xfs).

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutorBuilder, Placement};
use orbitmq::log::{FlushMode, Store, StoreConfig};
use orbitmq::proto::record::Message;

/// Body size of every record.
const BODY: usize = 1024;
/// Segment size: large enough that rolls are rare, small enough for a quick preparation.
const SEGMENT: u64 = 256 << 20;
/// Queues the appenders spread over.
const QUEUES: u32 = 8;

/// Runs `iters` appends with `appenders` concurrent tasks on a fresh store; returns the time.
fn run(flush: FlushMode, appenders: u64, iters: u64) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_path_buf();
    let h = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(1 << 20)
        .spawn(move || async move {
            let mut cfg = StoreConfig::new(&path, flush);
            cfg.segment_size = SEGMENT;
            let store = Store::open(cfg).await.expect("open store");
            let per_task = iters.div_ceil(appenders);
            let body = Bytes::from(vec![b'x'; BODY]);
            let start = Instant::now();
            let mut tasks = Vec::new();
            for t in 0..appenders {
                let (store, body) = (store.clone(), body.clone());
                tasks.push(glommio::spawn_local(async move {
                    for i in 0..per_task {
                        let m = Message {
                            topic: "bench".into(),
                            queue_id: ((t + i) % QUEUES as u64) as u32,
                            body: body.clone(),
                            ..Default::default()
                        };
                        store.append(&m).await.expect("append");
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            // Scale to the iterations asked for (the tasks may have done a few more).
            let took = start
                .elapsed()
                .mul_f64(iters as f64 / (per_task * appenders) as f64);
            store.close().await.expect("close");
            took
        })
        .expect("executor");
    let took = h.join().expect("join");
    drop(dir);
    took
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append_1KiB");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(1));
    for (flush, appenders) in [
        (FlushMode::Async, 256),
        (FlushMode::Sync, 1),
        (FlushMode::Sync, 16),
        (FlushMode::Sync, 256),
    ] {
        let id = BenchmarkId::new(format!("{flush:?}"), format!("{appenders}_appenders"));
        g.bench_with_input(id, &appenders, |b, &n| {
            b.iter_custom(|iters| run(flush, n, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
