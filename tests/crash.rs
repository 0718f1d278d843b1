//! Crash tests against the real binary: a writer child process killed with SIGKILL
//! mid-stream must not lose an acknowledged append; a data directory refuses another shape.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use orbitmq::log::{FlushMode, Store, StoreConfig};
use orbitmq::proto::record::Message;

mod store_support;
use store_support::{read_bodies_from, run};

const BIN: &str = env!("CARGO_BIN_EXE_orbitmq");
/// Small segments so the writer rolls over several before it is killed.
const SEGMENT: u64 = 64 * 1024;
const QUEUES: u32 = 4;
const CONCURRENCY: u32 = 32;
/// The debug writer's default body size.
const BODY_SIZE: usize = 100;
/// Acknowledgements seen before the kill: ~200-byte records, so about six segments.
const ACKS_BEFORE_KILL: usize = 2000;
const TOPIC: &str = "crash";

/// The debug writer's body for a sequence number (a copy of `writer_body` in main.rs).
fn writer_body(queue: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut b = format!("q{queue}-n{seq}-").into_bytes();
    b.resize(size.max(b.len()), b'.');
    b
}

/// Kills the child if a test fails before it does.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One acknowledged append: queue, queue offset, writer sequence number.
type Ack = (u32, u64, u64);

fn parse_ack(line: &str) -> Option<Ack> {
    let mut w = line.strip_prefix("ack ")?.split(' ');
    let ack = (
        w.next()?.parse().ok()?,
        w.next()?.parse().ok()?,
        w.next()?.parse().ok()?,
    );
    w.next().is_none().then_some(ack)
}

/// Runs the writer until it has acknowledged `ACKS_BEFORE_KILL` appends, SIGKILLs it, and
/// returns every acknowledgement it printed.
fn write_and_kill(dir: &Path, flush: &str) -> Vec<Ack> {
    let stderr = std::fs::File::create(dir.join("writer.stderr")).unwrap();
    let child = Command::new(BIN)
        .args(["debug-writer", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--flush", flush, "--segment-size", &SEGMENT.to_string()])
        .args(["--concurrency", &CONCURRENCY.to_string()])
        .args(["--queues", &QUEUES.to_string()])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start the debug writer");
    let mut child = Reap(child);
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut acks = Vec::new();
    let mut line = String::new();
    while acks.len() < ACKS_BEFORE_KILL {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let log = std::fs::read_to_string(dir.join("writer.stderr")).unwrap_or_default();
            panic!("the writer stopped after {} acks:\n{log}", acks.len());
        }
        acks.push(parse_ack(line.trim_end()).unwrap_or_else(|| panic!("bad line {line:?}")));
    }
    child.0.kill().unwrap(); // SIGKILL, mid-stream
                             // What it printed before dying was acknowledged too; a torn last line was not printed.
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    for l in rest.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        acks.push(parse_ack(l.trim_end()).unwrap_or_else(|| panic!("bad line {l:?}")));
    }
    let status = child.0.wait().unwrap();
    assert!(!status.success(), "the writer was killed: {status}");
    acks
}

fn store_cfg(dir: &Path, flush: FlushMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir, flush);
    c.segment_size = SEGMENT;
    c
}

fn crash_keeps_acknowledged(flush: &str, mode: FlushMode) {
    let tmp = tempfile::tempdir().unwrap();
    let acks = write_and_kill(tmp.path(), flush);
    let data: PathBuf = tmp.path().join("data");
    let segments = std::fs::read_dir(data.join("commitlog")).unwrap().count();
    assert!(segments >= 4, "the writer rolled over several segments");

    run(move || async move {
        let store = Store::open(store_cfg(&data, mode)).await.unwrap();
        let mut queues = BTreeMap::new();
        for q in 0..QUEUES {
            let bodies = read_bodies_from(&store, TOPIC, q, 0).await;
            assert_eq!(store.queue_bounds(TOPIC, q), Some((0, bodies.len() as u64)));
            queues.insert(q, bodies);
        }
        for &(q, off, seq) in &acks {
            let bodies = &queues[&q];
            assert!(
                (off as usize) < bodies.len(),
                "acknowledged queue {q} offset {off} (seq {seq}) is lost: the queue has {}",
                bodies.len()
            );
            assert!(
                bodies[off as usize] == writer_body(q, seq, BODY_SIZE),
                "queue {q} offset {off}: not the body of seq {seq}"
            );
        }

        // Each acknowledged message is found by its key (the writer's `seq-<seq>`), once.
        for &(q, _, seq) in acks.iter().step_by(7).chain(acks.last()) {
            let found = store
                .query_key(TOPIC, &format!("seq-{seq}"), false, 0, u64::MAX, 8)
                .await
                .unwrap()
                .0;
            assert_eq!(found.len(), 1, "seq {seq} by its key");
            let v = orbitmq::proto::record::decode(&found[0]).unwrap();
            assert!(
                v.body == writer_body(q, seq, BODY_SIZE),
                "seq {seq} by its key"
            );
        }

        // Appends continue after recovery, at each queue's next offset.
        for q in 0..QUEUES {
            let had = queues[&q].len() as u64;
            for i in 0..5u64 {
                let m = Message {
                    topic: TOPIC.into(),
                    queue_id: q,
                    body: format!("after-{q}-{i}").into_bytes().into(),
                    ..Default::default()
                };
                assert_eq!(store.append(&m).await.unwrap().queue_offset, had + i);
                queues.get_mut(&q).unwrap().push(m.body.to_vec());
            }
        }
        for q in 0..QUEUES {
            assert!(
                read_bodies_from(&store, TOPIC, q, 0).await == queues[&q],
                "queue {q}"
            );
        }
        store.close().await.unwrap();
        let store = Store::open(store_cfg(&data, mode)).await.unwrap();
        for q in 0..QUEUES {
            assert!(
                read_bodies_from(&store, TOPIC, q, 0).await == queues[&q],
                "queue {q} reopened"
            );
        }
        store.close().await.unwrap();
    });
}

#[test]
fn sync_flush_keeps_every_acknowledged_append_across_sigkill() {
    crash_keeps_acknowledged("sync", FlushMode::Sync);
}

#[test]
fn async_flush_keeps_every_acknowledged_append_across_sigkill() {
    crash_keeps_acknowledged("async", FlushMode::Async);
}

// ---------------------------------------------------------------- shape

fn standalone(data: &Path, shards: u32) -> Command {
    let mut c = Command::new(BIN);
    c.args(["standalone", "--data-dir"])
        .arg(data)
        .args(["--shards", &shards.to_string()])
        .args(["--segment-size", &SEGMENT.to_string()])
        // Ephemeral ports: the defaults may be taken on a shared machine.
        .args(["--listen", "127.0.0.1:0", "--namesrv-listen", "127.0.0.1:0"]);
    c
}

#[test]
fn a_data_directory_refuses_another_shard_count() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let child = standalone(&data, 2)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start standalone");
    let mut child = Reap(child);
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "first line {line:?}");
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) }, 0);
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "standalone stops cleanly on SIGTERM: {status}"
    );

    let out = standalone(&data, 3).output().unwrap();
    assert!(!out.status.success(), "another shard count is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("2 shards") && err.contains("but 3"),
        "the error names both counts: {err}"
    );
    assert!(
        !data.join("shard-2").exists(),
        "nothing was created for a third shard"
    );
}
