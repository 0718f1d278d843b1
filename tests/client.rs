//! The client crate against real `orbitmq standalone` processes over QUIC and TLS: sends of
//! every kind, consumers, tag filtering, offsets, WRONG_SHARD, TLS, name server failover,
//! retries, pushes, and malformed traffic.
//!
//! Most tests share one broker ([`shared`]): it is started by the first test that needs it
//! and killed when the test process exits. Each test uses topics of its own. Auto-creation is
//! off on it and its topics are declared in `topics.conf`, so an unknown topic really is
//! unknown. The test that stalls, stops and moves a broker starts brokers of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{free_ports, from_first, poll_n, wait_until, Broker, BrokerSpec};
use orbitmq::shard::broker::MAX_SUB_EXPR_LEN;
use orbitmq_client::{
    Client, ClientConfig, ClientError, ConsumeStatus, LitePullConsumer, Message, MessageExt,
    MessageQueue, Producer, PullStatus, PullTarget, PushConsumer, SendResult, SubExpr, TlsOptions,
};
use orbitmq_proto::codes::{push, quic, request, response};
use orbitmq_proto::frame::{Frame, FrameDecoder, Kind, FRAME_PREFIX_LEN, FRAME_VERSION};
use orbitmq_proto::header::{
    self, ErrorResponse, HeartbeatRequest, MessageMeta, PullQueue, PullRequest, PullResponse,
    QueueRequest, SendRequest,
};
use orbitmq_proto::limits::{
    MAX_FRAME_LEN, MAX_MESSAGE_SIZE, MAX_PROPERTIES_LEN, MAX_PULL_BYTES, MAX_RECORD_LEN,
};
use orbitmq_proto::msgid::{OffsetId, UNIQ_KEY};
use orbitmq_proto::record::tag_hash;
use orbitmq_proto::sys;
use tempfile::TempDir;

// ----- the shared broker -----

/// The topics of the shared broker, 8 queues each. Auto-creation is off: any other topic
/// does not exist.
const TOPICS: &[&str] = &[
    "Spread",
    "Tags",
    "Batch",
    "Ordered",
    "OneWay",
    "Callback",
    "Errors",
    "Shards",
    "PushAll",
    "Tls",
    "Failover",
    "Edge",
    "Big",
    "Budget",
    "PushThreads",
];
const QUEUES: u32 = 8;

/// Two tags with the same 64-bit FNV-1a hash (`orbitmq_proto::record::tag_hash`), found by a
/// parallel collision search. The broker filters by tag hash, so a subscription to one gets
/// the other too; only the client's exact check tells them apart.
const TAG_A: &str = "TagwDL6dEGhN-E";
const TAG_A_TWIN: &str = "TagUbFiEmzT5ZD";

struct Shared {
    broker: Broker,
    // Dropped after the broker: its data directory.
    _dir: TempDir,
}

static SHARED: Mutex<Option<Arc<Shared>>> = Mutex::new(None);

/// Stops the shared broker when the test process exits (the test harness exits with
/// `std::process::exit`, which runs `atexit` handlers but no destructors of statics).
extern "C" fn stop_shared_broker() {
    if let Ok(mut g) = SHARED.try_lock() {
        drop(g.take());
    }
}

/// The broker the tests share, started on first use.
fn shared() -> Arc<Shared> {
    let mut g = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(s) = &*g {
        return s.clone();
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut topics = String::new();
    for t in TOPICS {
        topics.push_str(&format!("{t} {QUEUES} {QUEUES} 6\n"));
    }
    std::fs::write(data.join("topics.conf"), topics).unwrap();
    let conf = dir.path().join("broker.conf");
    std::fs::write(&conf, "autoCreateTopicEnable=false\n").unwrap();
    let broker = BrokerSpec::new(&data, "async").conf(&conf).start();
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(stop_shared_broker) };
    let s = Arc::new(Shared { broker, _dir: dir });
    *g = Some(s.clone());
    s
}

// ----- helpers -----

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Reads every message of `topic` from the first offset as a new group, expecting `want`;
/// checks nothing more arrives.
async fn read_topic(b: &Broker, group: &str, topic: &str, want: usize) -> Vec<MessageExt> {
    let c = LitePullConsumer::with_options(group, b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let got = poll_n(&c, want).await;
    assert_eq!(got.len(), want, "messages of {topic}");
    let more = c.poll(Duration::from_millis(300)).await.unwrap();
    assert!(more.is_empty(), "more messages in {topic} than {want}");
    c.shutdown().await.unwrap();
    got
}

/// The messages of one queue, in order (read by assignment).
async fn read_queue(b: &Broker, mq: &MessageQueue, want: usize) -> Vec<MessageExt> {
    let mut opts = from_first();
    opts.auto_commit = false;
    let c = LitePullConsumer::with_options("reader", b.config(), opts)
        .await
        .unwrap();
    c.assign(vec![mq.clone()]).await.unwrap();
    let got = poll_n(&c, want).await;
    assert_eq!(got.len(), want, "messages of {mq}");
    c.shutdown().await.unwrap();
    got
}

fn bodies(msgs: &[MessageExt]) -> Vec<String> {
    msgs.iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect()
}

fn error_of(f: &Frame) -> ErrorResponse {
    header::decode::<ErrorResponse>(&f.header).expect("an ErrorResponse header")
}

/// The endpoint of the other shard of a two-shard broker.
fn other_shard(b: &Broker, endpoint: &str) -> String {
    assert_eq!(b.shards.len(), 2);
    let i = b.shards.iter().position(|s| s == endpoint).unwrap();
    b.shards[1 - i].clone()
}

// ----- tests on the shared broker -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_sends_and_lite_pull_with_commit_seek_and_resume() {
    const N: usize = 200;
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("spread-pg", b.config()).await.unwrap();
    let route = p.client().topic_route("Spread").await.unwrap();
    assert_eq!(route.queues.len(), QUEUES as usize);
    // Concurrent sends, multiplexed on one connection per shard.
    let mut tasks = Vec::new();
    for i in 0..N {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("m{i}");
            let tag = if i % 2 == 0 { "Even" } else { "Odd" };
            let r = p
                .send(
                    Message::new("Spread", body.clone())
                        .with_tags(tag)
                        .with_key(format!("k{i}")),
                )
                .await
                .unwrap();
            (r, i)
        }));
    }
    let mut sent: BTreeMap<(u32, u64), (usize, SendResult)> = BTreeMap::new();
    for t in tasks {
        let (r, i) = t.await.unwrap();
        assert_eq!(r.queue.topic, "Spread");
        assert_eq!(r.uniq_key.len(), 32);
        let q = route.find(&r.queue).expect("a queue of the route");
        let id = OffsetId::decode(&r.msg_id).unwrap();
        assert_eq!(
            u32::from(id.shard),
            q.shard,
            "the msg id names the owner shard"
        );
        assert!(q.endpoint.ends_with(&format!(":{}", id.port)));
        assert!(sent
            .insert((r.queue.queue_id, r.queue_offset), (i, r))
            .is_none());
    }
    // Round robin spread them evenly over the 8 queues.
    let c = p.client();
    for q in &route.queues {
        assert_eq!(c.max_offset(&q.mq).await.unwrap(), 25, "{}", q.mq);
    }

    let lite = LitePullConsumer::with_options("spread-lite", b.config(), from_first())
        .await
        .unwrap();
    lite.subscribe("Spread", "*").await.unwrap();
    assert_eq!(lite.assignment().len(), QUEUES as usize);
    let got = poll_n(&lite, N).await;
    assert_eq!(got.len(), N);
    let mut per_queue: BTreeMap<u32, Vec<&MessageExt>> = BTreeMap::new();
    for m in &got {
        per_queue.entry(m.queue_id).or_default().push(m);
    }
    for (q, msgs) in &per_queue {
        let offsets: Vec<u64> = msgs.iter().map(|m| m.queue_offset).collect();
        assert_eq!(offsets, (0..25).collect::<Vec<_>>(), "queue {q}: in order");
        for m in msgs {
            let (i, r) = &sent[&(*q, m.queue_offset)];
            assert_eq!(m.body, Bytes::from(format!("m{i}")));
            assert_eq!(m.keys, vec![format!("k{i}")]);
            assert_eq!(m.tags, if i % 2 == 0 { "Even" } else { "Odd" });
            assert_eq!(m.uniq_key.as_ref(), Some(&r.uniq_key));
            assert_eq!(m.msg_id, r.msg_id);
            assert!(m.store_timestamp >= m.born_timestamp);
        }
    }
    lite.commit().await.unwrap();
    for q in &route.queues {
        assert_eq!(lite.committed(&q.mq).await.unwrap(), Some(25));
    }
    // Seek back and read one queue again; past the end is refused.
    let mq0 = route.queues[0].mq.clone();
    lite.seek(&mq0, 20).await.unwrap();
    let e = lite.seek(&mq0, 26).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let again = poll_n(&lite, 5).await;
    let offs: Vec<(u32, u64)> = again.iter().map(|m| (m.queue_id, m.queue_offset)).collect();
    assert_eq!(
        offs,
        (20..25).map(|o| (mq0.queue_id, o)).collect::<Vec<_>>()
    );
    lite.shutdown().await.unwrap();

    // The same group resumes from its committed offsets: nothing left.
    let resumed = LitePullConsumer::new("spread-lite", b.config())
        .await
        .unwrap();
    resumed.subscribe("Spread", "*").await.unwrap();
    assert!(resumed
        .poll(Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    resumed.shutdown().await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_subscriptions_get_exactly_their_tag_and_offsets_pass_the_others() {
    const N: usize = 90;
    assert_eq!(tag_hash(TAG_A), tag_hash(TAG_A_TWIN), "the twins collide");
    assert_ne!(tag_hash(TAG_A), tag_hash("TagB"));
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("tags-pg", b.config()).await.unwrap();
    let tags = [TAG_A, TAG_A_TWIN, "TagB"];
    let mut want_a = BTreeSet::new();
    for i in 0..N {
        let r = p
            .send(Message::new("Tags", format!("t{i}")).with_tags(tags[i % 3]))
            .await
            .unwrap();
        if i % 3 == 0 {
            want_a.insert((r.queue.queue_id, r.queue_offset, format!("t{i}")));
        }
    }
    let route = p.client().topic_route("Tags").await.unwrap();

    // The broker filters by hash: a pull for TAG_A returns the twins too, and the client's
    // exact check drops them (`filtered`) while `next_offset` still passes them.
    let c = p.client();
    let expr = Arc::new(SubExpr::parse(TAG_A).unwrap());
    let (mut filtered, mut passed) = (0, 0);
    for q in &route.queues {
        let max = c.max_offset(&q.mq).await.unwrap();
        let mut offset = 0;
        for _ in 0..max {
            if offset == max {
                break;
            }
            let target = PullTarget {
                queue: q.clone(),
                offset,
                max_msgs: 64,
                expr: expr.clone(),
            };
            let r = c
                .pull(&q.endpoint, "tags-raw", &[target], 1 << 20, Duration::ZERO)
                .await
                .unwrap();
            assert!(r[0].messages.iter().all(|m| m.tags == TAG_A));
            assert!(r[0].next_offset > offset, "{}: no progress", q.mq);
            filtered += r[0].filtered;
            passed += r[0].messages.len();
            offset = r[0].next_offset;
        }
        assert_eq!(offset, max, "{}: the pulls passed every other tag", q.mq);
    }
    assert_eq!(passed, N / 3);
    assert_eq!(
        filtered as usize,
        N / 3,
        "every twin came back and was dropped"
    );

    // A lite pull consumer of TAG_A gets exactly the TAG_A messages, and commits past the rest.
    let lite = LitePullConsumer::with_options("tags-lite", b.config(), from_first())
        .await
        .unwrap();
    lite.subscribe("Tags", TAG_A).await.unwrap();
    let got = poll_n(&lite, N / 3).await;
    assert!(lite
        .poll(Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    let got_a: BTreeSet<(u32, u64, String)> = got
        .iter()
        .map(|m| {
            assert_eq!(m.tags, TAG_A);
            (
                m.queue_id,
                m.queue_offset,
                String::from_utf8(m.body.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(got.len(), N / 3);
    assert_eq!(got_a, want_a);
    lite.commit().await.unwrap();
    for q in &route.queues {
        assert_eq!(
            lite.committed(&q.mq).await.unwrap(),
            Some(c.max_offset(&q.mq).await.unwrap()),
            "{}: the committed offset passed the other tags",
            q.mq
        );
    }
    lite.shutdown().await.unwrap();

    // "TagB || TagA" gets both (and still not the twins).
    let both = LitePullConsumer::with_options("tags-both", b.config(), from_first())
        .await
        .unwrap();
    both.subscribe("Tags", &format!("TagB || {TAG_A}"))
        .await
        .unwrap();
    let got = poll_n(&both, 2 * N / 3).await;
    assert_eq!(got.len(), 2 * N / 3);
    assert!(got.iter().all(|m| m.tags == TAG_A || m.tags == "TagB"));
    both.shutdown().await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_selector_oneway_and_callback_sends_store_exactly_what_was_sent() {
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("kinds-pg", b.config()).await.unwrap();

    // A batch: one queue, consecutive offsets, a key each; stored in order.
    let batch: Vec<Message> = (0..10)
        .map(|i| Message::new("Batch", format!("b{i}")).with_key(format!("bk{i}")))
        .collect();
    let rs = p.send_batch(batch).await.unwrap();
    assert_eq!(rs.len(), 10);
    let mq = rs[0].queue.clone();
    assert!(rs.iter().all(|r| r.queue == mq));
    let offs: Vec<u64> = rs.iter().map(|r| r.queue_offset).collect();
    assert_eq!(offs, (0..10).collect::<Vec<_>>());
    assert_eq!(
        rs.iter().map(|r| &r.uniq_key).collect::<HashSet<_>>().len(),
        10
    );
    let got = read_queue(b, &mq, 10).await;
    assert_eq!(
        bodies(&got),
        (0..10).map(|i| format!("b{i}")).collect::<Vec<_>>()
    );
    for (m, r) in got.iter().zip(&rs) {
        assert_eq!(m.queue_offset, r.queue_offset);
        assert_eq!(m.uniq_key.as_ref(), Some(&r.uniq_key));
        assert_eq!(m.msg_id, r.msg_id);
    }
    assert_eq!(got[3].keys, vec!["bk3".to_string()]);
    // A batch goes to one topic.
    let e = p
        .send_batch(vec![
            Message::new("Batch", "x"),
            Message::new("Ordered", "y"),
        ])
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::MessageIllegal(_)), "{e}");

    // Ordered: every message the selector maps to index 7 goes to queue 7, in order.
    for i in 0..5 {
        let r = p
            .send_with_selector(Message::new("Ordered", format!("o{i}")), |qs, _| {
                7 % qs.len()
            })
            .await
            .unwrap();
        assert_eq!(r.queue.queue_id, 7);
        assert_eq!(r.queue_offset, i);
    }
    let e = p
        .send_with_selector(Message::new("Ordered", "x"), |qs, _| qs.len())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let q2 = MessageQueue::new("Ordered", mq.broker_name.clone(), 2);
    let r = p
        .send_to_queue(Message::new("Ordered", "z"), &q2)
        .await
        .unwrap();
    assert_eq!((r.queue, r.queue_offset), (q2.clone(), 0));
    let q7 = MessageQueue::new("Ordered", mq.broker_name.clone(), 7);
    assert_eq!(
        bodies(&read_queue(b, &q7, 5).await),
        vec!["o0", "o1", "o2", "o3", "o4"]
    );
    assert_eq!(bodies(&read_queue(b, &q2, 1).await), vec!["z"]);

    // One-way: returns once queued; the message is stored all the same.
    p.send_oneway(Message::new("OneWay", "fire").with_tags("Once"))
        .await
        .unwrap();
    let got = read_topic(b, "oneway-reader", "OneWay", 1).await;
    assert_eq!(bodies(&got), vec!["fire"]);
    assert_eq!(got[0].tags, "Once");

    // Callback: called with the result of the stored message.
    let (tx, rx) = tokio::sync::oneshot::channel();
    p.send_with_callback(Message::new("Callback", "cb"), move |r| {
        let _ = tx.send(r);
    });
    let r = rx.await.unwrap().unwrap();
    assert_eq!(r.queue.topic, "Callback");
    let got = read_topic(b, "callback-reader", "Callback", 1).await;
    assert_eq!(bodies(&got), vec!["cb"]);
    assert_eq!(got[0].uniq_key.as_ref(), Some(&r.uniq_key));
    assert_eq!(
        (got[0].queue_id, got[0].queue_offset),
        (r.queue.queue_id, r.queue_offset)
    );

    p.shutdown().await;
    assert!(matches!(
        p.send(Message::new("Batch", "x")).await,
        Err(ClientError::ShutDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_unknown_topics_offsets_and_heartbeats() {
    let s = shared();
    let b = &s.broker;
    let e = Producer::new("bad group", b.config()).await.err().unwrap();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let p = Producer::new("errors-pg", b.config()).await.unwrap();

    // Refused locally, before any request.
    let e = p
        .send(Message::new("Errors", vec![0u8; MAX_MESSAGE_SIZE + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::MessageIllegal(m) if m.contains("over the limit")),
        "{e}"
    );
    for bad in [
        Message::new("bad topic", "x"),
        Message::new("Errors", Bytes::new()),
        Message::new("Errors", "x").with_tags("A||B"),
    ] {
        let e = p.send(bad).await.unwrap_err();
        assert!(matches!(e, ClientError::MessageIllegal(_)), "{e}");
    }

    // A topic the broker does not have (auto-creation is off).
    let e = p.send(Message::new("NoSuchTopic", "x")).await.unwrap_err();
    assert!(matches!(e, ClientError::TopicNotExist(_)), "{e}");
    let c = p.client();
    let e = c.topic_route("NoSuchTopic").await.unwrap_err();
    assert!(matches!(e, ClientError::TopicNotExist(_)), "{e}");
    let lite = LitePullConsumer::new("errors-lite", b.config())
        .await
        .unwrap();
    let e = lite.subscribe("NoSuchTopic", "*").await.unwrap_err();
    assert!(matches!(e, ClientError::TopicNotExist(_)), "{e}");
    lite.shutdown().await.unwrap();

    // Queue offsets and consumer offsets.
    let route = c.topic_route("Errors").await.unwrap();
    let mq = route.queues[1].mq.clone();
    assert_eq!(c.min_offset(&mq).await.unwrap(), 0);
    assert_eq!(c.max_offset(&mq).await.unwrap(), 0);
    assert_eq!(
        c.query_consumer_offset("errors-g", &mq).await.unwrap(),
        None
    );
    let before = now_ms();
    for i in 0..3 {
        p.send_to_queue(Message::new("Errors", format!("e{i}")), &mq)
            .await
            .unwrap();
    }
    assert_eq!(c.max_offset(&mq).await.unwrap(), 3);
    assert_eq!(c.search_offset(&mq, before).await.unwrap(), 0);
    c.update_consumer_offset("errors-g", &mq, 2).await.unwrap();
    assert_eq!(
        c.query_consumer_offset("errors-g", &mq).await.unwrap(),
        Some(2)
    );
    // Another group's offset is its own.
    assert_eq!(
        c.query_consumer_offset("errors-h", &mq).await.unwrap(),
        None
    );

    // Heartbeats reach every broker endpoint of the cached routes.
    c.heartbeat().await.unwrap();
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shard_answers_name_the_owner() {
    let s = shared();
    let b = &s.broker;
    let c = Client::new(b.config()).await.unwrap();
    let route = c.topic_route("Shards").await.unwrap();
    let q = &route.queues[3];
    let wrong = other_shard(b, &q.endpoint);
    let mine = route
        .queues
        .iter()
        .find(|o| o.endpoint == wrong)
        .expect("a queue of the other shard");

    // A send to the shard that does not own the queue: WRONG_SHARD naming the owner, and
    // nothing stored.
    let h = header::encode(&SendRequest {
        producer_group: "shards-pg".into(),
        topic: "Shards".into(),
        queue_id: q.mq.queue_id,
        messages: vec![MessageMeta {
            body_len: 1,
            properties: vec![(UNIQ_KEY.into(), "0".repeat(32))],
            ..Default::default()
        }],
    });
    let f = c
        .request(&wrong, request::SEND_MESSAGE, h, Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert_eq!(f.code, response::WRONG_SHARD);
    assert_eq!(error_of(&f).redirect, q.endpoint);
    assert_eq!(
        ClientError::from_response(f.code, &f.header, "Shards"),
        ClientError::WrongShard {
            message: error_of(&f).message,
            redirect: q.endpoint.clone()
        }
    );
    assert_eq!(c.max_offset(&q.mq).await.unwrap(), 0);

    // Offset requests too.
    let h = header::encode(&QueueRequest {
        group: String::new(),
        topic: "Shards".into(),
        queue_id: q.mq.queue_id,
    });
    let f = c
        .request(&wrong, request::GET_MAX_OFFSET, h, Bytes::new())
        .await
        .unwrap();
    assert_eq!(f.code, response::WRONG_SHARD);
    assert_eq!(error_of(&f).redirect, q.endpoint);

    // A pull of two queues from the wrong shard of one: that one is WRONG_SHARD with the
    // redirect in its result, the other is served.
    let pq = |queue_id| PullQueue {
        topic: "Shards".into(),
        queue_id,
        offset: 0,
        max_msgs: 32,
        sub_expr: "*".into(),
        expr_type: orbitmq_proto::sql::EXPR_TYPE_TAG,
    };
    let h = header::encode(&PullRequest {
        group: "shards-g".into(),
        queues: vec![pq(q.mq.queue_id), pq(mine.mq.queue_id)],
        max_bytes: 1 << 20,
        suspend_ms: 0,
    });
    let f = c
        .request(&wrong, request::PULL_MESSAGE, h, Bytes::new())
        .await
        .unwrap();
    assert_eq!(f.code, response::SUCCESS);
    let r: PullResponse = header::decode(&f.header).unwrap();
    assert_eq!(r.queues.len(), 2);
    assert_eq!(r.queues[0].queue_id, q.mq.queue_id);
    assert_eq!(r.queues[0].status, response::WRONG_SHARD);
    assert_eq!(r.queues[0].redirect, q.endpoint);
    assert_eq!(r.queues[1].queue_id, mine.mq.queue_id);
    assert_eq!(r.queues[1].status, response::PULL_NOT_FOUND);
    assert_eq!(r.queues[1].redirect, "");

    // The client's pull reports it per queue.
    let target = PullTarget {
        queue: q.clone(),
        offset: 0,
        max_msgs: 32,
        expr: Arc::new(SubExpr::All),
    };
    let r = c
        .pull(&wrong, "shards-g", &[target], 1 << 20, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(r[0].status, PullStatus::WrongShard);
    c.shutdown().await;
}

/// A concurrent listener is called from `consume_threads` threads at once, no more, and every
/// message gets one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_calls_its_listener_from_consume_threads_at_once() {
    const N: usize = 24;
    const THREADS: usize = 3;
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("push-threads-pg", b.config()).await.unwrap();
    for i in 0..N {
        p.send(Message::new("PushThreads", format!("t{i}")))
            .await
            .unwrap();
    }
    let mut opts = from_first();
    opts.consume_threads = THREADS;
    let c = PushConsumer::with_options("push-threads", b.config(), opts)
        .await
        .unwrap();
    c.subscribe("PushThreads", "*").await.unwrap();
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    {
        let (now, most, seen) = (now.clone(), most.clone(), seen.clone());
        c.register_listener(move |msgs| {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(n, Ordering::SeqCst);
            // Long enough that the other threads' calls overlap this one.
            std::thread::sleep(Duration::from_millis(200));
            for m in msgs {
                let body = String::from_utf8(m.body.to_vec()).unwrap();
                *seen.lock().unwrap().entry(body).or_default() += 1;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            ConsumeStatus::ConsumeSuccess
        });
    }
    c.start().await.unwrap();
    wait_until("every message consumed", || seen.lock().unwrap().len() == N).await;
    c.shutdown().await.unwrap();
    assert_eq!(most.load(Ordering::SeqCst), THREADS);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_redelivers_reconsume_later_and_commits_everything() {
    const N: usize = 100;
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("push-pg", b.config()).await.unwrap();
    // Every tenth is the hash twin of the subscribed tag: the broker sends it, the client
    // must drop it.
    for i in 0..N {
        let tag = if i % 10 == 0 { TAG_A_TWIN } else { TAG_A };
        p.send(Message::new("PushAll", format!("p{i}")).with_tags(tag))
            .await
            .unwrap();
    }
    let mut opts = from_first();
    opts.reconsume_delay = Duration::from_millis(50);
    opts.consume_threads = 4;
    let c = PushConsumer::with_options("push-all", b.config(), opts)
        .await
        .unwrap();
    c.subscribe("PushAll", TAG_A).await.unwrap();
    let seen: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let failed_once: Arc<Mutex<HashSet<String>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let (seen, failed_once, calls) = (seen.clone(), failed_once.clone(), calls.clone());
        c.register_listener(move |msgs| {
            calls.fetch_add(1, Ordering::Relaxed);
            let m = &msgs[0];
            assert_eq!(m.tags, TAG_A);
            let body = String::from_utf8(m.body.to_vec()).unwrap();
            // Every message whose number ends in 5 fails its first delivery.
            if body.ends_with('5') && failed_once.lock().unwrap().insert(body.clone()) {
                assert_eq!(m.reconsume_times, 0);
                return ConsumeStatus::ReconsumeLater;
            }
            assert_eq!(m.reconsume_times, u32::from(body.ends_with('5')));
            *seen.lock().unwrap().entry(body).or_default() += 1;
            ConsumeStatus::ConsumeSuccess
        });
    }
    c.start().await.unwrap();
    wait_until("90 messages consumed", || seen.lock().unwrap().len() == 90).await;
    c.shutdown().await.unwrap();
    // Each once; the failed ones came back; the twins never reached the listener.
    let seen = seen.lock().unwrap().clone();
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    assert!(seen
        .keys()
        .all(|b| b[1..].parse::<usize>().unwrap() % 10 != 0));
    assert_eq!(failed_once.lock().unwrap().len(), 10);
    assert_eq!(calls.load(Ordering::Relaxed), 100);
    // Shutdown committed everything, past the twins too.
    let client = Client::new(b.config()).await.unwrap();
    for q in &client.topic_route("PushAll").await.unwrap().queues {
        assert_eq!(
            client
                .query_consumer_offset("push-all", &q.mq)
                .await
                .unwrap(),
            Some(client.max_offset(&q.mq).await.unwrap()),
            "{}",
            q.mq
        );
    }
    client.shutdown().await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_needs_the_right_ca_unless_insecure() {
    let s = shared();
    let b = &s.broker;
    let dir = tempfile::tempdir().unwrap();
    // A CA that did not sign the broker's certificate.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let mut cfg = ClientConfig::new(&b.namesrv).with_tls(TlsOptions::with_ca(&other_ca));
    cfg.connect_timeout = Duration::from_secs(10);
    let c = Client::new(cfg).await.unwrap();
    let e = c.topic_route("Tls").await.unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "{e}");
    c.shutdown().await;
    // A CA file that is not there.
    let cfg =
        ClientConfig::new(&b.namesrv).with_tls(TlsOptions::with_ca(dir.path().join("none.pem")));
    let e = Client::new(cfg).await.unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "{e}");

    // --insecure connects anyway, to the name server and to the shards.
    let cfg = ClientConfig::new(&b.namesrv).with_tls(TlsOptions::insecure());
    let p = Producer::new("tls-pg", cfg).await.unwrap();
    assert_eq!(
        p.client().topic_route("Tls").await.unwrap().queues.len(),
        QUEUES as usize
    );
    for i in 0..2 {
        p.send(Message::new("Tls", format!("insecure-{i}")))
            .await
            .unwrap();
    }
    p.shutdown().await;
    // By name: the certificate has localhost.
    let port = b.namesrv.rsplit_once(':').unwrap().1;
    let c = Client::new(
        ClientConfig::new(&format!("localhost:{port}")).with_tls(TlsOptions::with_ca(&b.ca)),
    )
    .await
    .unwrap();
    assert_eq!(
        c.topic_route("Tls").await.unwrap().queues.len(),
        QUEUES as usize
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_server_failover_skips_a_dead_address_and_remembers_the_live_one() {
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    let s = shared();
    let b = &s.broker;
    // A dead first address: a socket that takes packets and never answers (a hung host).
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    dead.set_nonblocking(true).unwrap();
    let mut cfg = ClientConfig::new(&format!("{};{}", dead.local_addr().unwrap(), b.namesrv))
        .with_tls(TlsOptions::with_ca(&b.ca));
    cfg.connect_timeout = CONNECT_TIMEOUT;
    let p = Producer::new("failover-pg", cfg).await.unwrap();
    let r = p.send(Message::new("Failover", "via the second")).await;
    assert_eq!(r.unwrap().queue.topic, "Failover");
    let mut buf = [0u8; 2048];
    assert!(
        dead.recv_from(&mut buf).is_ok(),
        "the dead address was tried first"
    );
    // The live one is remembered: a refresh goes straight to it (a try of the dead one
    // would take the connect timeout).
    let t = Instant::now();
    p.client().refresh_route("Failover").await.unwrap();
    assert!(t.elapsed() < CONNECT_TIMEOUT, "{:?}", t.elapsed());
    p.shutdown().await;
    let got = read_topic(b, "failover-reader", "Failover", 1).await;
    assert_eq!(bodies(&got), vec!["via the second"]);
}

// ----- malformed traffic -----

/// A QUIC connection of its own to one endpoint, for raw streams.
struct RawConn {
    ep: quinn::Endpoint,
    conn: quinn::Connection,
}

/// How the broker ended a raw exchange.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Response(u16),
    /// It reset its side of the stream with this code.
    Reset(u64),
    /// It finished the stream without a response.
    Finished,
}

impl RawConn {
    async fn connect(ca: &Path, endpoint: &str) -> RawConn {
        let tls = orbitmq_client::tls::rustls_config(&TlsOptions::with_ca(ca)).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = ep
            .connect(endpoint.parse().unwrap(), "127.0.0.1")
            .unwrap()
            .await
            .unwrap();
        RawConn { ep, conn }
    }

    /// Writes `bytes` on a new request stream (then finishes it if `fin`) and reads until
    /// the broker answers a frame or ends the stream; it must not hang.
    async fn exchange(&self, bytes: &[u8], fin: bool) -> Outcome {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        // The broker may stop reading as soon as it sees the garbage.
        let _ = send.write_all(bytes).await;
        if fin {
            let _ = send.finish();
        }
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            let mut dec = FrameDecoder::new();
            loop {
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(c)) => {
                        dec.push(&c.bytes);
                        if let Some(f) = dec.next_frame().expect("the broker's frames are valid") {
                            return Outcome::Response(f.code);
                        }
                    }
                    Ok(None) => return Outcome::Finished,
                    Err(quinn::ReadError::Reset(code)) => return Outcome::Reset(code.into()),
                    Err(e) => panic!("stream failed: {e}"),
                }
            }
        })
        .await
        .expect("the broker neither answered nor ended the stream");
        println!("{} raw bytes (fin {fin}): {outcome:?}", bytes.len());
        outcome
    }

    async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.ep.wait_idle().await;
    }
}

fn frame_bytes(kind: Kind, code: u16, header: Bytes, body: Bytes) -> Vec<u8> {
    Frame::new(kind, code, 1, header, body).to_bytes().to_vec()
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_traffic_gets_errors_and_the_broker_keeps_serving() {
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("edge-pg", b.config()).await.unwrap();
    p.send(Message::new("Edge", "before")).await.unwrap();

    // Refused by the client before it is sent.
    let e = p
        .send(Message::new("Edge", vec![7u8; MAX_MESSAGE_SIZE + 1]))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::MessageIllegal(_)), "{e}");

    // Requests that are frames, but bad ones, on the producer's own connection.
    let client = p.client();
    let route = client.topic_route("Edge").await.unwrap();
    let q = &route.queues[0];
    // The same oversized message sent raw, past the client's check.
    let big = Bytes::from(vec![7u8; MAX_MESSAGE_SIZE + 1]);
    let h = header::encode(&SendRequest {
        producer_group: "edge-pg".into(),
        topic: "Edge".into(),
        queue_id: q.mq.queue_id,
        messages: vec![MessageMeta {
            body_len: big.len() as u32,
            properties: vec![(UNIQ_KEY.into(), "0".repeat(32))],
            ..Default::default()
        }],
    });
    let f = client
        .request(&q.endpoint, request::SEND_MESSAGE, h, big)
        .await
        .unwrap();
    assert_eq!(f.code, response::MESSAGE_ILLEGAL);
    let e = ClientError::from_response(f.code, &f.header, "Edge");
    assert!(matches!(e, ClientError::MessageIllegal(_)), "{e}");
    // Properties the client would refuse, sent raw: one the broker sets (a forged retry
    // origin), and properties that leave no room for what a delay or retry adds.
    let raw_send = |properties: Vec<(String, String)>| {
        header::encode(&SendRequest {
            producer_group: "edge-pg".into(),
            topic: "Edge".into(),
            queue_id: q.mq.queue_id,
            messages: vec![MessageMeta {
                body_len: 1,
                properties,
                ..Default::default()
            }],
        })
    };
    let uniq = || (UNIQ_KEY.to_owned(), "0".repeat(32));
    for (props, why) in [
        (
            vec![uniq(), (sys::property::RETRY_TOPIC.into(), "Orders".into())],
            "property RETRY_TOPIC is set by the broker",
        ),
        (
            vec![uniq(), ("big".into(), "v".repeat(MAX_PROPERTIES_LEN - 100))],
            "for delays and retries",
        ),
    ] {
        let f = client
            .request(
                &q.endpoint,
                request::SEND_MESSAGE,
                raw_send(props),
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        assert_eq!(f.code, response::MESSAGE_ILLEGAL, "{why}");
        let e = ClientError::from_response(f.code, &f.header, "Edge").to_string();
        assert!(e.contains(why), "{e}");
    }
    // Headers of random bytes, for every kind of request.
    for (i, code) in [
        request::SEND_MESSAGE,
        request::PULL_MESSAGE,
        request::GET_MAX_OFFSET,
        request::UPDATE_CONSUMER_OFFSET,
        request::HEART_BEAT,
    ]
    .into_iter()
    .enumerate()
    {
        let f = client
            .request(
                &q.endpoint,
                code,
                Bytes::from(noise(64 + i * 40, 0x5eed + i as u64)),
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        assert_eq!(f.code, response::BAD_REQUEST, "{}", request::name(code));
    }
    let f = client
        .request(
            &b.namesrv,
            request::GET_ROUTEINFO_BY_TOPIC,
            Bytes::from(noise(100, 7)),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(f.code, response::BAD_REQUEST, "name server");
    // Unknown request codes, at a shard and at the name server.
    for endpoint in [&q.endpoint, &b.namesrv] {
        let f = client
            .request(endpoint, 9999, Bytes::new(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(f.code, response::REQUEST_CODE_NOT_SUPPORTED, "{endpoint}");
    }
    // The same connection still sends.
    p.send(Message::new("Edge", "after")).await.unwrap();

    // Streams that break the framing, each on its own stream of one raw connection: the
    // broker resets that stream (FRAME_INVALID) and the connection lives on.
    let raw = RawConn::connect(&b.ca, &q.endpoint).await;
    let heartbeat = || {
        frame_bytes(
            Kind::Request,
            request::HEART_BEAT,
            header::encode(&HeartbeatRequest {
                client_id: "raw".into(),
                producer_groups: vec![],
                consumer_groups: vec![],
            }),
            Bytes::new(),
        )
    };
    let mut bad_version = heartbeat();
    bad_version[4] = 99;
    let mut bad_kind = heartbeat();
    bad_kind[5] = 9;
    let mut header_past_frame = heartbeat();
    header_past_frame[16..20].copy_from_slice(&1000u32.to_le_bytes());
    let too_short = 3u32.to_le_bytes().to_vec();
    let invalid: Vec<(&str, Vec<u8>)> = vec![
        ("text", b"GET / HTTP/1.1\r\nHost: orbitmq\r\n\r\n".to_vec()),
        ("random bytes", noise(4096, 42)),
        ("length u32::MAX", u32::MAX.to_le_bytes().to_vec()),
        (
            "length over the limit",
            (MAX_FRAME_LEN as u32 + 1).to_le_bytes().to_vec(),
        ),
        ("length under the prefix", too_short),
        ("bad version", bad_version),
        ("bad kind", bad_kind),
        ("header past the frame", header_past_frame),
        (
            "a response from a client",
            frame_bytes(Kind::Response, 0, Bytes::new(), Bytes::new()),
        ),
        (
            "a push from a client",
            frame_bytes(Kind::Push, push::NOTICE, Bytes::new(), Bytes::new()),
        ),
    ];
    for (what, bytes) in &invalid {
        assert_eq!(
            raw.exchange(bytes, false).await,
            Outcome::Reset(quic::FRAME_INVALID.into()),
            "{what}"
        );
    }
    // A frame cut short by the end of the stream: no request, so no response.
    let mut cut = heartbeat();
    cut.truncate(FRAME_PREFIX_LEN + 2);
    assert_eq!(raw.exchange(&cut, true).await, Outcome::Finished);
    // A valid request after a valid one on the same stream, and on the same connection.
    let mut two = heartbeat();
    two.extend(heartbeat());
    assert_eq!(
        raw.exchange(&two, true).await,
        Outcome::Response(response::SUCCESS)
    );
    raw.close().await;

    // A new client is served, and so is this one; the refused message was not stored.
    let p2 = Producer::new("edge-pg2", b.config()).await.unwrap();
    p2.send(Message::new("Edge", "other client")).await.unwrap();
    p.send(Message::new("Edge", "still")).await.unwrap();
    let got = read_topic(b, "edge-reader", "Edge", 4).await;
    let got: HashSet<String> = bodies(&got).into_iter().collect();
    let want: HashSet<String> = ["before", "after", "other client", "still"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    p2.shutdown().await;
    p.shutdown().await;
}

// ----- brokers of their own: stalled, stopped, moved -----

/// Sends until every shard endpoint of `topic` has a connection (round robin).
async fn touch_every_queue(p: &Producer, topic: &str) {
    let n = p.client().topic_route(topic).await.unwrap().queues.len();
    for i in 0..n {
        p.send(Message::new(topic, format!("warm-{i}")))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stopped_and_moved_brokers_retry_push_going_away_and_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (port, ns_port) = free_ports(3);
    let namesrv = format!("127.0.0.1:{ns_port}");
    let broker = Broker::start_on(&data, "async", &format!("127.0.0.1:{port}"), &namesrv);

    // 1. A stalled broker (SIGSTOP): the producer's request reaches it but is never answered;
    // the connection times out, and the send is retried on another queue of the route with
    // the same unique key, and succeeds once the broker continues.
    let mut cfg = broker.config();
    cfg.idle_timeout = Duration::from_secs(1);
    cfg.keep_alive_interval = Duration::from_millis(200);
    cfg.connect_timeout = Duration::from_secs(20);
    cfg.request_timeout = Duration::from_secs(20);
    cfg.send_timeout = Duration::from_secs(30);
    let p = Producer::new("stall-pg", cfg).await.unwrap();
    touch_every_queue(&p, "Stall").await;
    broker.signal(libc::SIGSTOP);
    let pid = broker.pid();
    let resume = std::thread::spawn(move || {
        // Well past the idle timeout, so the client must give up on the first attempt.
        std::thread::sleep(Duration::from_secs(3));
        // SAFETY: plain kill(2) on the broker, still our unreaped child.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    let t = Instant::now();
    let r = p.send(Message::new("Stall", "stalled")).await.unwrap();
    println!("send across the stall took {:?}", t.elapsed());
    resume.join().unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "it waited for the broker"
    );
    // What the broker stored of it: the retry, and (if the broker took the stalled attempt
    // off its socket before the dead connection's timer) the first attempt too. Every copy
    // has the same unique key and each is on a queue of its own.
    let got: Vec<MessageExt> = drain_topic(&broker, "stall-reader", "Stall", QUEUES as usize + 1)
        .await
        .into_iter()
        .filter(|m| m.body == Bytes::from_static(b"stalled"))
        .collect();
    println!("the stalled send was stored {} times", got.len());
    assert!(!got.is_empty() && got.len() <= 3);
    assert!(got.iter().all(|m| m.uniq_key.as_ref() == Some(&r.uniq_key)));
    let queues: HashSet<u32> = got.iter().map(|m| m.queue_id).collect();
    assert_eq!(queues.len(), got.len(), "each attempt on another queue");
    assert!(got
        .iter()
        .any(|m| (m.queue_id, m.queue_offset) == (r.queue.queue_id, r.queue_offset)));

    // 2. A broker that stops (SIGTERM) pushes GOING_AWAY on every connection.
    touch_every_queue(&p, "Stall").await;
    let mut pushes = p.client().pushes();
    // A client that knows routes but has connected to no shard yet (for part 3).
    let mut stale_cfg = broker.config();
    stale_cfg.connect_timeout = Duration::from_secs(1);
    stale_cfg.send_timeout = Duration::from_secs(20);
    let stale = Client::new(stale_cfg).await.unwrap();
    let moved_route = stale.topic_route("Moved").await.unwrap();
    stale.topic_route("Stale").await.unwrap();
    let old_shards = broker.shards.clone();
    broker.stop();
    let old_set: BTreeSet<String> = old_shards.iter().cloned().collect();
    let mut going_away = BTreeSet::new();
    while !going_away.is_superset(&old_set) {
        let push = tokio::time::timeout(Duration::from_secs(10), pushes.recv())
            .await
            .expect("GOING_AWAY from both shards")
            .unwrap();
        println!("push: {push:?}");
        if push.code == push::GOING_AWAY {
            going_away.insert(push.endpoint);
        }
    }
    p.shutdown().await;

    // 3. The broker comes back on the next ports (same data, same name server address):
    // shard 0 where shard 1 was, shard 1 on a new port. The routes `stale` cached are now
    // wrong for every queue: shard 0's old endpoint is dead, shard 1's is the new shard 0.
    let broker = Broker::start_on(&data, "async", &format!("127.0.0.1:{}", port + 1), &namesrv);
    assert_eq!(broker.shards[0], old_shards[1]);
    // A send to a queue of shard 1 reaches the new shard 0, which answers WRONG_SHARD naming
    // shard 1's new endpoint; the producer follows it.
    let q = moved_route
        .queues
        .iter()
        .find(|q| q.shard == 1)
        .expect("a queue of shard 1");
    assert_eq!(q.endpoint, old_shards[1]);
    let sp = Producer::with_client("moved-pg", stale.clone()).unwrap();
    let r = sp
        .send_to_queue(Message::new("Moved", "redirected"), &q.mq)
        .await
        .unwrap();
    assert_eq!(r.queue, q.mq);
    let id = OffsetId::decode(&r.msg_id).unwrap();
    assert_eq!(id.shard, 1);
    assert!(broker.shards[1].ends_with(&format!(":{}", id.port)));
    assert_eq!(
        stale.queue_info(&q.mq).await.unwrap().endpoint,
        broker.shards[1],
        "the redirect is remembered"
    );
    // Any queue of `Stale` fails first (a dead endpoint or the wrong shard); the send is
    // retried on another queue and stored once, with the key it returned.
    let r = sp.send(Message::new("Stale", "retried")).await.unwrap();
    let got = read_topic(&broker, "stale-reader", "Stale", 1).await;
    assert_eq!(bodies(&got), vec!["retried"]);
    assert_eq!(got[0].uniq_key.as_ref(), Some(&r.uniq_key));
    assert_eq!(
        (got[0].queue_id, got[0].queue_offset),
        (r.queue.queue_id, r.queue_offset)
    );
    assert_eq!(
        stale.topic_route("Stale").await.unwrap().endpoints(),
        broker.shards.iter().map(String::as_str).collect(),
        "the route was fetched again"
    );
    sp.shutdown().await;
    stale.shutdown().await;
    broker.stop();
}

/// Every message of `topic`, at least `at_least`: polls until one poll finds nothing.
async fn drain_topic(b: &Broker, group: &str, topic: &str, at_least: usize) -> Vec<MessageExt> {
    let c = LitePullConsumer::with_options(group, b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let mut got = poll_n(&c, at_least).await;
    assert!(got.len() >= at_least, "messages of {topic}");
    loop {
        let more = c.poll(Duration::from_millis(500)).await.unwrap();
        if more.is_empty() {
            break;
        }
        got.extend(more);
    }
    c.shutdown().await.unwrap();
    got
}

/// A pull of queues that each hold a maximal message answers within the frame limit: once
/// the answer holds its bytes, the queues after are not read this time (PULL_NOT_FOUND from
/// the same offset) and come in the next pull. Before, every queue added its first record
/// whatever the budget, and four 4 MiB records made an answer the client refused, closing
/// its connection, forever. A queue named twice and an overlong tag expression are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_of_queues_of_maximal_messages_stay_under_the_frame_limit() {
    let s = shared();
    let b = &s.broker;
    let p = Producer::new("big-pg", b.config()).await.unwrap();
    let client = p.client();
    let route = client.topic_route("Big").await.unwrap();
    // One maximal message in every queue, of a byte of its own.
    let fill = |queue_id: u32| queue_id as u8 + 1;
    for q in &route.queues {
        let body = vec![fill(q.mq.queue_id); MAX_MESSAGE_SIZE];
        p.send_to_queue(Message::new("Big", body), &q.mq)
            .await
            .unwrap();
    }
    // Every queue of one shard in one raw pull.
    let ep = route.queues[0].endpoint.clone();
    let mine: Vec<u32> = route
        .queues
        .iter()
        .filter(|q| q.endpoint == ep)
        .map(|q| q.mq.queue_id)
        .collect();
    assert!(mine.len() >= 4, "queues of one shard: {mine:?}");
    let pq = |queue_id: u32, sub_expr: &str| PullQueue {
        topic: "Big".into(),
        queue_id,
        offset: 0,
        max_msgs: 32,
        sub_expr: sub_expr.into(),
        expr_type: orbitmq_proto::sql::EXPR_TYPE_TAG,
    };
    let pull = |queues: Vec<PullQueue>| {
        header::encode(&PullRequest {
            group: "big-g".into(),
            queues,
            max_bytes: MAX_PULL_BYTES as u32,
            suspend_ms: 0,
        })
    };
    let all: Vec<PullQueue> = mine.iter().map(|&q| pq(q, "*")).collect();
    let f = client
        .request(&ep, request::PULL_MESSAGE, pull(all), Bytes::new())
        .await
        .unwrap();
    assert_eq!(f.code, response::SUCCESS);
    assert!(
        f.body.len() <= MAX_PULL_BYTES + MAX_RECORD_LEN,
        "a pull answer of {} bytes",
        f.body.len()
    );
    let r: PullResponse = header::decode(&f.header).unwrap();
    assert_eq!(r.queues.len(), mine.len());
    // 8 MiB: the first queue's record, then the next queue's first record over the budget.
    let statuses: Vec<u16> = r.queues.iter().map(|q| q.status).collect();
    let mut want = vec![response::SUCCESS; 2];
    want.resize(mine.len(), response::PULL_NOT_FOUND);
    assert_eq!(statuses, want);
    let mut at = 0;
    for q in &r.queues[..2] {
        assert_eq!((q.count, q.next_offset), (1, 1));
        let rec = &f.body[at..at + q.bytes as usize];
        at += q.bytes as usize;
        let m = orbitmq_proto::record::decode(rec).unwrap();
        assert_eq!(m.queue_id, q.queue_id);
        assert_eq!(m.body.len(), MAX_MESSAGE_SIZE);
        assert!(m.body.iter().all(|&x| x == fill(q.queue_id)));
    }
    assert_eq!(at, f.body.len());
    for q in &r.queues[2..] {
        assert_eq!((q.count, q.next_offset, q.max_offset), (0, 0, 1), "{q:?}");
    }

    // Refused: a queue named twice, a tag expression over the bound.
    let twice = vec![pq(mine[0], "*"), pq(mine[1], "*"), pq(mine[0], "*")];
    let long = vec![pq(mine[0], &"a".repeat(MAX_SUB_EXPR_LEN + 1))];
    for (queues, what) in [(twice, "named twice"), (long, "over the limit")] {
        let f = client
            .request(&ep, request::PULL_MESSAGE, pull(queues), Bytes::new())
            .await
            .unwrap();
        assert_eq!(f.code, response::BAD_REQUEST);
        let e = error_of(&f);
        assert!(e.message.contains(what), "{}", e.message);
    }

    // A consumer gets every one, whole.
    let c = LitePullConsumer::with_options("big-g", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe("Big", "*").await.unwrap();
    let got = poll_n(&c, route.queues.len()).await;
    let queues: BTreeSet<u32> = got.iter().map(|m| m.queue_id).collect();
    assert_eq!(queues.len(), route.queues.len());
    for m in &got {
        assert_eq!(m.body.len(), MAX_MESSAGE_SIZE);
        assert!(m.body.iter().all(|&x| x == fill(m.queue_id)));
    }
    c.shutdown().await.unwrap();
    p.shutdown().await;
}

/// A connection that opens many streams and sends most of a maximal frame on each, never the
/// rest, cannot make the broker hold more than its inbound budget: the broker stops reading
/// and QUIC's flow control stops the writer, where before every byte was read and kept. Other
/// connections are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cannot_make_the_broker_hold_unbounded_request_bytes() {
    const STREAMS: usize = 12;
    const PER_STREAM: usize = 15 << 20;
    const CHUNK: usize = 64 << 10;
    /// The broker's budget (two whole frames of 16 MiB reserved), the unread bytes QUIC lets
    /// each other stream send (1.25 MB a stream by default) and the writer's own send buffer,
    /// with room to spare.
    const MOST_WRITTEN: usize = 100 << 20;
    let s = shared();
    let b = &s.broker;
    let raw = RawConn::connect(&b.ca, &b.shards[0]).await;
    let written = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let (mut send, recv) = raw.conn.open_bi().await.unwrap();
        let w = written.clone();
        // A maximal frame's prefix (no header); the rest never comes in full.
        let mut prefix = [0u8; FRAME_PREFIX_LEN];
        prefix[0..4].copy_from_slice(&(MAX_FRAME_LEN as u32 - 4).to_le_bytes());
        prefix[4] = FRAME_VERSION;
        prefix[5] = Kind::Request as u8;
        prefix[6..8].copy_from_slice(&request::SEND_MESSAGE.to_le_bytes());
        prefix[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        streams.push(tokio::spawn(async move {
            send.write_all(&prefix).await.unwrap();
            let chunk = vec![0u8; CHUNK];
            for _ in 0..PER_STREAM / CHUNK {
                if send.write_all(&chunk).await.is_err() {
                    break;
                }
                w.fetch_add(CHUNK, Ordering::Relaxed);
            }
            // Kept open, never finished: the frames stay incomplete.
            (send, recv)
        }));
    }
    // Until the writers have made no progress for two seconds.
    let (mut last, mut still) = (0, 0);
    while still < 8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = written.load(Ordering::Relaxed);
        (still, last) = if now == last {
            (still + 1, last)
        } else {
            (0, now)
        };
    }
    println!("{last} of {} bytes written", STREAMS * PER_STREAM);
    assert!(
        (16 << 20..MOST_WRITTEN).contains(&last),
        "{last} bytes of {} went in",
        STREAMS * PER_STREAM
    );
    let p = Producer::new("budget-pg", b.config()).await.unwrap();
    p.send(Message::new("Budget", "during the flood"))
        .await
        .unwrap();
    for t in streams {
        t.abort();
    }
    raw.close().await;
    p.send(Message::new("Budget", "after the flood"))
        .await
        .unwrap();
    let got = read_topic(b, "budget-cg", "Budget", 2).await;
    let bodies: BTreeSet<&[u8]> = got.iter().map(|m| &m.body[..]).collect();
    assert_eq!(
        bodies,
        BTreeSet::from([&b"during the flood"[..], &b"after the flood"[..]])
    );
}
