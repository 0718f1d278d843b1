//! What hashing a message's index keys costs on the send path: SipHash-1-3 under the index's
//! secret key (what the key index uses) against the unkeyed CRC32C it replaced, for a typical
//! message's keys (one business key and a 32-character unique key).
//!
//! `cargo bench --bench keyhash`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orbitmq::log::indexfile::HashKey;

const TOPIC: &str = "BenchTopic";
const KEYS: [&str; 2] = ["order-20261126-000042", "7F0000010A2B18B4AAC2334F12340000"];

fn keyhash(c: &mut Criterion) {
    let mut g = c.benchmark_group("index key hash, 2 keys a message");
    g.throughput(Throughput::Elements(1));
    let key = HashKey::random().expect("a random key");
    g.bench_function("siphash13 keyed", |b| {
        b.iter(|| {
            let t = key.topic(std::hint::black_box(TOPIC));
            KEYS.iter().fold(0u32, |a, k| a ^ t.key(k))
        })
    });
    g.bench_function("crc32c unkeyed (before)", |b| {
        b.iter(|| {
            let t =
                crc32c::crc32c_append(crc32c::crc32c(std::hint::black_box(TOPIC).as_bytes()), b"#");
            KEYS.iter()
                .fold(0u32, |a, k| a ^ crc32c::crc32c_append(t, k.as_bytes()))
        })
    });
    g.finish();
}

criterion_group!(benches, keyhash);
criterion_main!(benches);
