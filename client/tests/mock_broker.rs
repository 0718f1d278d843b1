//! The client against an in-process mock broker (real QUIC and TLS, orbitmq-proto frames):
//! remoting, retries, consumers, long polling and TLS setup, without the real broker.

mod mock;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mock::MockBroker;
use orbitmq_client::*;
use orbitmq_proto::codes::push;
use orbitmq_proto::limits::MAX_MESSAGE_SIZE;
use orbitmq_proto::msgid::OffsetId;

fn config(b: &MockBroker) -> ClientConfig {
    ClientConfig::new(&b.namesrv).with_tls(TlsOptions::with_ca(&b.ca))
}

fn from_first() -> ConsumerOptions {
    ConsumerOptions::default().from_where(ConsumeFromWhere::FirstOffset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_lite_pull_in_order_with_commit() {
    let b = MockBroker::start().await;
    let p = Producer::new("pg", config(&b)).await.unwrap();
    // Concurrent sends, multiplexed on one connection per shard.
    let mut sent: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("m{i}");
            let tag = if i % 2 == 0 { "Even" } else { "Odd" };
            let r = p
                .send(
                    Message::new("Orders", body.clone())
                        .with_tags(tag)
                        .with_key(format!("k{i}")),
                )
                .await
                .unwrap();
            (r, body)
        }));
    }
    for t in tasks {
        let (r, body) = t.await.unwrap();
        assert_eq!(r.queue.topic, "Orders");
        assert_eq!(r.queue.broker_name, mock::BROKER);
        assert_eq!(r.uniq_key.len(), 32);
        let id = OffsetId::decode(&r.msg_id).unwrap();
        assert_eq!(u32::from(id.shard), r.queue.queue_id % mock::SHARDS);
        sent.insert((r.queue.queue_id, r.queue_offset), body);
    }
    assert_eq!(sent.len(), 200);
    // Round robin spread them evenly over the 8 queues.
    for q in 0..mock::QUEUES {
        assert_eq!(b.queue_len("Orders", q), 25, "queue {q}");
    }

    let c = LitePullConsumer::with_options("cg", config(&b), from_first())
        .await
        .unwrap();
    c.subscribe("Orders", "*").await.unwrap();
    assert_eq!(c.assignment().len(), 8);
    let mut got: BTreeMap<u32, Vec<(u64, MessageExt)>> = BTreeMap::new();
    let mut n = 0;
    let start = Instant::now();
    while n < 200 && start.elapsed() < Duration::from_secs(10) {
        for m in c.poll(Duration::from_secs(1)).await.unwrap() {
            got.entry(m.queue_id).or_default().push((m.queue_offset, m));
            n += 1;
        }
    }
    assert_eq!(n, 200);
    for (q, msgs) in &got {
        let offsets: Vec<u64> = msgs.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (0..25).collect::<Vec<_>>(),
            "queue {q} in order, once each"
        );
        for (o, m) in msgs {
            assert_eq!(&m.body[..], sent[&(*q, *o)].as_bytes());
            assert_eq!(m.keys.len(), 1);
            assert!(m.uniq_key.is_some());
            assert!(m.store_timestamp >= m.born_timestamp);
        }
    }
    c.commit().await.unwrap();
    for q in 0..mock::QUEUES {
        assert_eq!(b.committed("cg", "Orders", q), Some(25));
    }
    // Seek back and read one queue again.
    let mq0 = MessageQueue::new("Orders", mock::BROKER, 0);
    c.seek(&mq0, 20).await.unwrap();
    assert!(c.seek(&mq0, 26).await.is_err(), "past max");
    let again = c.poll(Duration::from_secs(2)).await.unwrap();
    let offs: Vec<u64> = again.iter().map(|m| m.queue_offset).collect();
    assert_eq!(offs, vec![20, 21, 22, 23, 24]);
    c.shutdown().await.unwrap();

    // The same group resumes from its committed offsets: nothing left.
    let c2 = LitePullConsumer::new("cg", config(&b)).await.unwrap();
    c2.subscribe("Orders", "Even").await.unwrap();
    assert!(c2
        .poll(Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    c2.shutdown().await.unwrap();

    // A tag subscription: the mock broker does not filter, the client does (exactly).
    let c3 = LitePullConsumer::with_options("cg-even", config(&b), from_first())
        .await
        .unwrap();
    c3.subscribe("Orders", "Even").await.unwrap();
    let mut evens = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let got = c3.poll(Duration::from_millis(300)).await.unwrap();
        if got.is_empty() && evens == 100 {
            break;
        }
        assert!(got.iter().all(|m| m.tags == "Even"));
        evens += got.len();
    }
    assert_eq!(evens, 100);
    c3.commit().await.unwrap();
    // Filtered messages still advance the committed offset.
    assert_eq!(b.committed("cg-even", "Orders", 3), Some(25));
    c3.shutdown().await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_selector_oneway_and_callback() {
    let b = MockBroker::start().await;
    let p = Producer::new("pg", config(&b)).await.unwrap();
    let batch: Vec<Message> = (0..10)
        .map(|i| Message::new("B", format!("b{i}")))
        .collect();
    let rs = p.send_batch(batch).await.unwrap();
    assert_eq!(rs.len(), 10);
    let q = rs[0].queue.clone();
    let offs: Vec<u64> = rs.iter().map(|r| r.queue_offset).collect();
    assert_eq!(offs, (0..10).collect::<Vec<_>>());
    assert!(rs.iter().all(|r| r.queue == q));
    assert_eq!(
        rs.iter().map(|r| &r.uniq_key).collect::<HashSet<_>>().len(),
        10
    );
    assert!(p
        .send_batch(vec![Message::new("B", "x"), Message::new("C", "y")])
        .await
        .is_err());

    // Ordered: every message of order 7 goes to the same queue.
    for i in 0..5 {
        let r = p
            .send_with_selector(Message::new("Ord", format!("o{i}")), |qs, _| 7 % qs.len())
            .await
            .unwrap();
        assert_eq!(r.queue.queue_id, 7);
        assert_eq!(r.queue_offset, i);
    }
    assert!(matches!(
        p.send_with_selector(Message::new("Ord", "x"), |qs, _| qs.len())
            .await,
        Err(ClientError::InvalidArgument(_))
    ));
    let mq = MessageQueue::new("Ord", mock::BROKER, 2);
    assert_eq!(
        p.send_to_queue(Message::new("Ord", "z"), &mq)
            .await
            .unwrap()
            .queue,
        mq
    );

    p.send_oneway(Message::new("One", "fire")).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    p.send_with_callback(Message::new("Cb", "cb"), move |r| {
        let _ = tx.send(r);
    });
    let r = rx.await.unwrap().unwrap();
    assert_eq!(r.queue.topic, "Cb");
    let start = Instant::now();
    while (0..8).map(|q| b.queue_len("One", q)).sum::<usize>() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "one-way message never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.shutdown().await;
    assert!(matches!(
        p.send(Message::new("B", "x")).await,
        Err(ClientError::ShutDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_retries_and_validation() {
    let b = MockBroker::start().await;
    let p = Producer::new("pg", config(&b)).await.unwrap();

    // SYSTEM_BUSY on the first attempt: retried on another queue with the same key.
    let r = p.send(Message::new("Flaky", "f")).await.unwrap();
    let attempts = b.state.send_attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].0, attempts[1].0, "same UNIQ_KEY across retries");
    assert_eq!(attempts[0].0, r.uniq_key);
    assert_ne!(
        attempts[0].1 % 2,
        attempts[1].1 % 2,
        "retried on the other shard"
    );

    // MESSAGE_ILLEGAL from the broker is not retried.
    b.state.send_attempts.lock().unwrap().clear();
    let e = p.send(Message::new("Illegal", "x")).await.unwrap_err();
    assert_eq!(
        e,
        ClientError::MessageIllegal("mock refuses this topic".into())
    );
    assert_eq!(b.state.send_attempts.lock().unwrap().len(), 1);

    // Refused locally, before any request.
    let e = p
        .send(Message::new("T", vec![0u8; MAX_MESSAGE_SIZE + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::MessageIllegal(m) if m.contains("over the limit")),
        "{e}"
    );
    assert!(matches!(
        p.send(Message::new("bad topic", "x")).await,
        Err(ClientError::MessageIllegal(_))
    ));

    // Unknown topic at the name server.
    let e = p.send(Message::new("NoSuchTopic", "x")).await.unwrap_err();
    assert!(matches!(e, ClientError::TopicNotExist(_)), "{e}");

    // WRONG_SHARD with a redirect is followed (the `Moved` route is stale for odd queues).
    let c = p.client();
    let moved = MessageQueue::new("Moved", mock::BROKER, 3);
    assert_eq!(c.max_offset(&moved).await.unwrap(), 0);
    let r = p
        .send_to_queue(Message::new("Moved", "m"), &moved)
        .await
        .unwrap();
    assert_eq!(r.queue, moved);
    assert_eq!(OffsetId::decode(&r.msg_id).unwrap().shard, 1);
    assert_eq!(c.max_offset(&moved).await.unwrap(), 1);
    for _ in 0..8 {
        p.send(Message::new("Moved", "rr")).await.unwrap();
    }
    let mq = MessageQueue::new("Orders", mock::BROKER, 1);
    assert_eq!(c.max_offset(&mq).await.unwrap(), 0);
    assert_eq!(c.query_consumer_offset("g", &mq).await.unwrap(), None);
    c.update_consumer_offset("g", &mq, 0).await.unwrap();
    assert_eq!(c.query_consumer_offset("g", &mq).await.unwrap(), Some(0));

    // Heartbeats reach the brokers of the cached routes.
    c.heartbeat().await.unwrap();
    assert!(b.state.heartbeats.load(Ordering::Relaxed) >= 2);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_send() {
    let b = MockBroker::start().await;
    let p = Producer::new("pg", config(&b)).await.unwrap();
    let c = LitePullConsumer::new("lp", config(&b)).await.unwrap();
    c.subscribe("Wake", "*").await.unwrap();
    // LastOffset: nothing yet; the first poll parks.
    assert!(c.poll(Duration::from_millis(200)).await.unwrap().is_empty());
    let p2 = p.clone();
    let sender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        p2.send(Message::new("Wake", "now")).await.unwrap();
        t
    });
    let got = c.poll(Duration::from_secs(10)).await.unwrap();
    let woke = Instant::now();
    let sent_at = sender.await.unwrap();
    assert_eq!(got.len(), 1);
    let latency = woke.duration_since(sent_at);
    println!("long poll returned {latency:?} after the send started");
    assert!(latency < Duration::from_secs(1), "{latency:?}");
    c.shutdown().await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_reconsumes_and_commits_lowest_in_flight() {
    let b = MockBroker::start().await;
    let p = Producer::new("pg", config(&b)).await.unwrap();
    for i in 0..100 {
        p.send(
            Message::new("Push", format!("p{i}")).with_tags(if i % 10 == 0 {
                "Skip"
            } else {
                "Take"
            }),
        )
        .await
        .unwrap();
    }
    let mut opts = from_first();
    opts.reconsume_delay = Duration::from_millis(50);
    opts.consume_threads = 4;
    let c = PushConsumer::with_options("pc", config(&b), opts)
        .await
        .unwrap();
    c.subscribe("Push", "Take").await.unwrap();
    let seen: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let failed_once: Arc<Mutex<HashSet<String>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let seen = seen.clone();
        let failed_once = failed_once.clone();
        let calls = calls.clone();
        c.register_listener(move |msgs| {
            calls.fetch_add(1, Ordering::Relaxed);
            let m = &msgs[0];
            assert_eq!(m.tags, "Take");
            let body = String::from_utf8(m.body.to_vec()).unwrap();
            // Every fifth message fails its first delivery.
            if body.ends_with('5') && failed_once.lock().unwrap().insert(body.clone()) {
                assert_eq!(m.reconsume_times, 0);
                return ConsumeStatus::ReconsumeLater;
            }
            *seen.lock().unwrap().entry(body).or_default() += 1;
            ConsumeStatus::ConsumeSuccess
        });
    }
    let mut pushes = c.client().pushes();
    c.start().await.unwrap();
    let start = Instant::now();
    while seen.lock().unwrap().len() < 90 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {} consumed",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each message exactly once; the failed ones came back.
    assert!(seen.lock().unwrap().values().all(|&n| n == 1));
    assert_eq!(failed_once.lock().unwrap().len(), 10);
    assert_eq!(calls.load(Ordering::Relaxed), 100);
    // The broker pushed a notice on connect; the client surfaces it.
    let push = tokio::time::timeout(Duration::from_secs(2), pushes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(push.code, push::NOTICE);
    assert_eq!(push.message, "welcome");
    c.shutdown().await.unwrap();
    for q in 0..mock::QUEUES {
        assert_eq!(
            b.committed("pc", "Push", q),
            Some(b.queue_len("Push", q) as u64)
        );
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncommitted_messages_come_back_to_the_next_consumer() {
    let b = MockBroker::start().await;
    let p = Producer::new("pg", config(&b)).await.unwrap();
    let mq = MessageQueue::new("Hold", mock::BROKER, 0);
    for i in 0..5 {
        p.send_to_queue(Message::new("Hold", format!("h{i}")), &mq)
            .await
            .unwrap();
    }
    let c = PushConsumer::with_options("hold", config(&b), from_first())
        .await
        .unwrap();
    c.subscribe("Hold", "*").await.unwrap();
    // Offset 2 never succeeds; the others do.
    c.register_listener(|msgs| {
        if msgs[0].queue_offset == 2 {
            ConsumeStatus::ReconsumeLater
        } else {
            ConsumeStatus::ConsumeSuccess
        }
    });
    c.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.shutdown().await.unwrap();
    assert_eq!(
        b.committed("hold", "Hold", 0),
        Some(2),
        "lowest in flight, not highest seen"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verification() {
    let b = MockBroker::start().await;
    // Another broker's CA does not verify this one.
    let other = MockBroker::start().await;
    let mut cfg = ClientConfig::new(&b.namesrv).with_tls(TlsOptions::with_ca(&other.ca));
    cfg.connect_timeout = Duration::from_secs(2);
    let c = Client::new(cfg).await.unwrap();
    let e = c.topic_route("T").await.unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "{e}");
    c.shutdown().await;
    // --insecure connects anyway.
    let c = Client::new(ClientConfig::new(&b.namesrv).with_tls(TlsOptions::insecure()))
        .await
        .unwrap();
    assert_eq!(c.topic_route("T").await.unwrap().queues.len(), 8);
    c.shutdown().await;
    // By name: the certificate has localhost.
    let port = b.namesrv.rsplit_once(':').unwrap().1;
    let c = Client::new(
        ClientConfig::new(&format!("localhost:{port}")).with_tls(TlsOptions::with_ca(&b.ca)),
    )
    .await
    .unwrap();
    assert_eq!(c.topic_route("T").await.unwrap().queues.len(), 8);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_server_failover() {
    let b = MockBroker::start().await;
    // A dead first address (nothing listens there) then the real one.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let mut cfg = ClientConfig::new(&format!("{dead_addr};{}", b.namesrv))
        .with_tls(TlsOptions::with_ca(&b.ca));
    cfg.connect_timeout = Duration::from_millis(300);
    let c = Client::new(cfg).await.unwrap();
    assert_eq!(c.topic_route("T").await.unwrap().queues.len(), 8);
    // The working one is remembered.
    let t = Instant::now();
    c.refresh_route("T").await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(250));
    c.shutdown().await;
}
