//! Helpers shared by the storage tests (`store.rs`, `crash.rs`): a glommio executor to run
//! a test in, and reading a whole queue back.

// Each test crate that includes this module uses a part of it.
#![allow(dead_code)]

use glommio::{LocalExecutorBuilder, Placement};
use orbitmq::log::{ReadStatus, Store};
use orbitmq::proto::record::{self, Message};

/// Runs `f` on a new glommio executor and waits for it (a panic inside fails the test).
pub fn run<F, Fut>(f: F)
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

/// Every message of a queue from offset 0 up to the first read that finds nothing,
/// checking queue offsets are dense and in order.
pub async fn read_all(store: &Store, topic: &str, queue: u32) -> Vec<Message> {
    read_from(store, topic, queue, 0).await
}

/// As [`read_all`], from queue offset `from`.
pub async fn read_from(store: &Store, topic: &str, queue: u32, from: u64) -> Vec<Message> {
    let mut out = Vec::new();
    let mut off = from;
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
                from + out.len() as u64,
                "{topic}:{queue}: queue offsets are dense and in order"
            );
            out.push(v.to_message());
        }
        off = r.next_offset;
    }
    out
}

/// Bodies of a queue from `from` to its end, checking offsets are dense from `from`.
pub async fn read_bodies_from(store: &Store, topic: &str, queue: u32, from: u64) -> Vec<Vec<u8>> {
    let out = read_from(store, topic, queue, from).await;
    let end = store.queue_bounds(topic, queue).map_or(from, |b| b.1);
    assert_eq!(
        from + out.len() as u64,
        end,
        "{topic}:{queue}: read to its end"
    );
    out.into_iter().map(|m| m.body.to_vec()).collect()
}
