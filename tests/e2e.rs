//! End to end: `orbitmq standalone` as a real child process on free ports, and the
//! orbitmq-client crate over real QUIC and TLS.
//!
//! The tests run one at a time (CI has 2 cores, and the latency check wants a quiet box);
//! each starts its own broker with 64 MiB CommitLog segments so it is ready in about a
//! second. The broker's stderr goes to `broker-N.log` in the test's temporary directory
//! and is printed when a broker fails to start.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{body_of, free_ports, from_first, poll_n, Broker, CONSUME_TIMEOUT};
use orbitmq_client::{
    ConsumeStatus, LitePullConsumer, Message, MessageQueue, Producer, PushConsumer,
};

/// What the producer was told: (queue, offset) -> (message number, msg id, unique key).
type Sent = BTreeMap<(u32, u64), (usize, String, String)>;

/// One test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_exactly_once_in_queue_order() {
    const TOTAL: usize = 10_000;
    const SENDERS: usize = 64;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("data"), "sync");

    // A sync-flush send waits for the disk: a generous budget, so a stall of this VM's disk
    // (late completions of 100-200 ms are common) is not taken for a lost send.
    let mut config = broker.config();
    config.send_timeout = Duration::from_secs(15);
    let p = Producer::new("e2e-pg", config).await.unwrap();
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..SENDERS {
        let (p, sent) = (p.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            for i in (k..TOTAL).step_by(SENDERS) {
                let m = Message::new("E2E", body_of(i))
                    .with_tags(format!("T{}", i % 3))
                    .with_key(format!("key-{i}"));
                let r = p.send(m).await.unwrap_or_else(|e| panic!("send {i}: {e}"));
                let prev = sent.lock().unwrap().insert(
                    (r.queue.queue_id, r.queue_offset),
                    (i, r.msg_id, r.uniq_key),
                );
                assert!(
                    prev.is_none(),
                    "two sends got queue {} offset {}",
                    r.queue.queue_id,
                    r.queue_offset
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sent = Arc::try_unwrap(sent).unwrap().into_inner().unwrap();
    println!("sent {TOTAL} messages with sync flush in {:?}", t.elapsed());
    assert_eq!(sent.len(), TOTAL);
    let mut per_queue: BTreeMap<u32, u64> = BTreeMap::new();
    for (q, _) in sent.keys() {
        *per_queue.entry(*q).or_default() += 1;
    }
    assert_eq!(
        per_queue.len(),
        8,
        "round robin over the 8 queues: {per_queue:?}"
    );

    // Lite pull: every message once, in queue order, with the exact body and the ids the
    // producer was given.
    let mut opts = from_first();
    opts.pull_batch_size = 256;
    let c = LitePullConsumer::with_options("e2e-lite", broker.config(), opts)
        .await
        .unwrap();
    c.subscribe("E2E", "*").await.unwrap();
    let t = Instant::now();
    let got = poll_n(&c, TOTAL).await;
    println!(
        "lite pull consumed {} messages in {:?}",
        got.len(),
        t.elapsed()
    );
    assert_eq!(got.len(), TOTAL);
    let mut next: HashMap<u32, u64> = HashMap::new();
    for m in &got {
        let expect = next.entry(m.queue_id).or_insert(0);
        assert_eq!(
            m.queue_offset, *expect,
            "queue {} out of order or duplicated",
            m.queue_id
        );
        *expect += 1;
        let (i, msg_id, uniq) = &sent[&(m.queue_id, m.queue_offset)];
        assert_eq!(m.body, Bytes::from(body_of(*i)));
        assert_eq!(
            &m.msg_id, msg_id,
            "offset message id agrees between send and pull"
        );
        assert_eq!(m.uniq_key.as_ref(), Some(uniq));
        assert_eq!(m.tags, format!("T{}", i % 3));
        assert_eq!(m.keys, vec![format!("key-{i}")]);
    }
    for (q, n) in &per_queue {
        assert_eq!(next[q], *n);
    }
    c.commit().await.unwrap();
    for (q, n) in &per_queue {
        let mq = MessageQueue::new("E2E", got[0].broker_name.clone(), *q);
        assert_eq!(c.committed(&mq).await.unwrap(), Some(*n));
    }
    c.shutdown().await.unwrap();

    // Push consumer, another group: every message exactly once.
    let counts: Arc<Mutex<HashMap<(u32, u64), u32>>> = Arc::default();
    let mut opts = from_first();
    opts.pull_batch_size = 256;
    let pc = PushConsumer::with_options("e2e-push", broker.config(), opts)
        .await
        .unwrap();
    pc.subscribe("E2E", "*").await.unwrap();
    {
        let counts = counts.clone();
        pc.register_listener(move |msgs| {
            let mut c = counts.lock().unwrap();
            for m in msgs {
                *c.entry((m.queue_id, m.queue_offset)).or_default() += 1;
            }
            ConsumeStatus::ConsumeSuccess
        });
    }
    let t = Instant::now();
    pc.start().await.unwrap();
    while counts.lock().unwrap().len() < TOTAL && t.elapsed() < CONSUME_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "push consumer consumed {} messages in {:?}",
        counts.lock().unwrap().len(),
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    pc.shutdown().await.unwrap();
    let counts = std::mem::take(&mut *counts.lock().unwrap());
    assert_eq!(counts.len(), TOTAL);
    assert!(
        counts.values().all(|&n| n == 1),
        "a message was delivered twice"
    );
    let client = orbitmq_client::Client::new(broker.config()).await.unwrap();
    for (q, n) in &per_queue {
        let mq = MessageQueue::new("E2E", got[0].broker_name.clone(), *q);
        assert_eq!(
            client.query_consumer_offset("e2e-push", &mq).await.unwrap(),
            Some(*n)
        );
    }
    client.shutdown().await;
    p.shutdown().await;
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_soon_after_a_send() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("data"), "async");
    let p = Producer::new("e2e-pg", broker.config()).await.unwrap();
    // The topic exists (and the route is cached) before the consumer parks.
    p.send(Message::new("Wake", "first")).await.unwrap();
    let c = LitePullConsumer::new("e2e-wake", broker.config())
        .await
        .unwrap();
    c.subscribe("Wake", "*").await.unwrap();
    // From the last offset: nothing to read, so the pulls park at the broker.
    assert!(c.poll(Duration::from_millis(300)).await.unwrap().is_empty());
    let mut latencies = Vec::new();
    for round in 0..3 {
        let p2 = p.clone();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let start = Instant::now();
            p2.send(Message::new("Wake", format!("wake-{round}")))
                .await
                .unwrap();
            (start, Instant::now())
        });
        let got = c.poll(Duration::from_secs(10)).await.unwrap();
        let returned = Instant::now();
        let (send_start, send_acked) = sender.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, Bytes::from(format!("wake-{round}")));
        let after_start = returned.duration_since(send_start);
        println!(
            "long poll round {round}: returned {after_start:?} after the send started \
             (the send itself took {:?})",
            send_acked.duration_since(send_start)
        );
        // Past the send's acknowledgement (the send's own time, slow on a loaded machine,
        // is not the long poll's).
        latencies.push(returned.saturating_duration_since(send_acked));
    }
    // Async flush, so the time is the long poll's, not the disk's (with sync flush the pull
    // wakes after the durable write, right when the send is acknowledged). The goal is 50 ms;
    // the bound is generous so a busy CI box does not flake.
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(1)),
        "{latencies:?}"
    );
    c.shutdown().await.unwrap();
    p.shutdown().await;
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_messages_and_committed_offsets() {
    const N: usize = 300;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Broker::start(&data, "async");
    let p = Producer::new("e2e-pg", broker.config()).await.unwrap();
    let mut bodies: HashMap<(u32, u64), String> = HashMap::new();
    for i in 0..N {
        let r = p
            .send(
                Message::new("Durable", body_of(i))
                    .with_tags("Keep")
                    .with_key(format!("k{i}")),
            )
            .await
            .unwrap();
        bodies.insert((r.queue.queue_id, r.queue_offset), body_of(i));
    }
    p.shutdown().await;
    // Group "all" reads and commits everything; group "part" reads some and commits.
    let all = LitePullConsumer::with_options("e2e-all", broker.config(), from_first())
        .await
        .unwrap();
    all.subscribe("Durable", "*").await.unwrap();
    assert_eq!(poll_n(&all, N).await.len(), N);
    all.shutdown().await.unwrap(); // auto commit on shutdown
    let mut opts = from_first();
    opts.pull_batch_size = 10;
    let part = LitePullConsumer::with_options("e2e-part", broker.config(), opts.clone())
        .await
        .unwrap();
    part.subscribe("Durable", "*").await.unwrap();
    let first = poll_n(&part, 50).await;
    assert!(first.len() >= 50 && first.len() < N, "{}", first.len());
    part.commit().await.unwrap();
    part.shutdown().await.unwrap();
    broker.stop();

    let broker = Broker::start(&data, "async");
    // The messages are all there, bodies intact.
    let fresh = LitePullConsumer::with_options("e2e-fresh", broker.config(), from_first())
        .await
        .unwrap();
    fresh.subscribe("Durable", "*").await.unwrap();
    let again = poll_n(&fresh, N).await;
    assert_eq!(again.len(), N);
    for m in &again {
        assert_eq!(
            m.body,
            Bytes::from(bodies[&(m.queue_id, m.queue_offset)].clone())
        );
        assert_eq!(m.tags, "Keep");
    }
    fresh.shutdown().await.unwrap();
    // "part" resumes where it committed: exactly the rest.
    let part = LitePullConsumer::with_options("e2e-part", broker.config(), opts)
        .await
        .unwrap();
    part.subscribe("Durable", "*").await.unwrap();
    let rest = poll_n(&part, N - first.len()).await;
    let seen: HashSet<(u32, u64)> = first
        .iter()
        .chain(rest.iter())
        .map(|m| (m.queue_id, m.queue_offset))
        .collect();
    assert_eq!(first.len() + rest.len(), N, "no message twice");
    assert_eq!(seen.len(), N, "every message once");
    assert!(part
        .poll(Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    part.shutdown().await.unwrap();
    // "all" has nothing left.
    let all = LitePullConsumer::new("e2e-all", broker.config())
        .await
        .unwrap();
    all.subscribe("Durable", "*").await.unwrap();
    assert!(all
        .poll(Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    all.shutdown().await.unwrap();
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_across_a_broker_restart() {
    const N: usize = 100;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (port, ns_port) = free_ports(2);
    let listen = format!("127.0.0.1:{port}");
    let namesrv = format!("127.0.0.1:{ns_port}");
    let broker = Broker::start_on(&data, "async", &listen, &namesrv);
    let p = Producer::new("e2e-pg", broker.config()).await.unwrap();
    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let pc = PushConsumer::with_options("e2e-reconnect", broker.config(), from_first())
        .await
        .unwrap();
    p.send(Message::new("Again", body_of(0))).await.unwrap();
    pc.subscribe("Again", "*").await.unwrap();
    {
        let counts = counts.clone();
        pc.register_listener(move |msgs| {
            let mut c = counts.lock().unwrap();
            for m in msgs {
                *c.entry(String::from_utf8_lossy(&m.body).into_owned())
                    .or_default() += 1;
            }
            ConsumeStatus::ConsumeSuccess
        });
    }
    pc.start().await.unwrap();
    for i in 1..N {
        p.send(Message::new("Again", body_of(i))).await.unwrap();
    }
    let wait_for = |n: usize| {
        let counts = counts.clone();
        async move {
            let t = Instant::now();
            while counts.lock().unwrap().len() < n && t.elapsed() < CONSUME_TIMEOUT {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            counts.lock().unwrap().len()
        }
    };
    assert_eq!(wait_for(N).await, N);
    let ca = broker.ca.clone();
    broker.stop();
    let broker = Broker::start_on(&data, "async", &listen, &namesrv);
    assert_eq!(broker.ca, ca);
    // The same producer and consumer carry on: connections are made again.
    let t = Instant::now();
    for i in N..2 * N {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match p.send(Message::new("Again", body_of(i))).await {
                Ok(_) => break,
                Err(e) if attempt < 5 => println!("send {i} after restart: {e}; again"),
                Err(e) => panic!("send {i} after restart: {e}"),
            }
        }
    }
    println!("sent {N} more after the restart in {:?}", t.elapsed());
    assert_eq!(wait_for(2 * N).await, 2 * N);
    println!("consumed them {:?} after the restart", t.elapsed());
    pc.shutdown().await.unwrap();
    assert!(counts.lock().unwrap().values().all(|&n| n == 1));
    p.shutdown().await;
    broker.stop();
}
