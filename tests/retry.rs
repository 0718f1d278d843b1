//! Retry topics and dead letters against real `orbitmq standalone` processes (2 shards,
//! short delay levels, auto-creation off so the retry topic comes from the group's
//! heartbeat): a failing push listener's message comes back from `%RETRY%<group>` with
//! growing delays, then lands in `%DLQ%<group>`, where `orbitmq admin dlq` lists and resends
//! it; CONSUMER_SEND_MSG_BACK on the wrong shard is redirected, and a malformed one refused.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{from_first, wait_until, Broker};
use orbitmq::log::shape::{QueueMap, Shape};
use orbitmq_client::{
    Client, ClientError, ConsumeStatus, ConsumerOptions, LitePullConsumer, Message, MessageExt,
    Producer, PushConsumer,
};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{self, SendBackRequest, SendBackResponse, TopicConfigsResponse};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_orbitmq");
/// Delay of level L is L x 100 ms.
const LEVELS: &str = "100ms 200ms 300ms 400ms 500ms 600ms 700ms 800ms";
const LEVEL_MS: u64 = 100;
const SHARDS: u32 = 2;
/// The small maximum of these tests: 1 + 3 deliveries, then the DLQ.
const MAX_RECONSUME: u32 = 3;
/// After the last expected delivery, how long nothing more may come.
const QUIET: Duration = Duration::from_secs(3);
/// Slack a measured gap may lose to clock reads on both sides (the delay is a lower bound).
const GAP_SLACK: Duration = Duration::from_millis(20);

/// A broker with 2 shards, the given topics (4 queues each), short delay levels and
/// auto-creation off.
fn broker(topics: &[&str]) -> (Broker, TempDir) {
    let topics: Vec<(&str, u32)> = topics.iter().map(|t| (*t, 4)).collect();
    common::broker_with_topics(&topics, &format!("messageDelayLevel = {LEVELS}\n"))
}

fn admin(b: &Broker, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("admin")
        .args(args)
        .args(["--namesrv", &b.namesrv])
        .arg("--tls-ca")
        .arg(&b.ca)
        .output()
        .unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// One listener call as the test saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    msg: MessageExt,
}

fn options() -> ConsumerOptions {
    let mut o = from_first();
    o.max_reconsume_times = MAX_RECONSUME;
    o.commit_interval = Duration::from_millis(200);
    o
}

async fn push(b: &Broker, group: &str, topic: &str, o: ConsumerOptions) -> PushConsumer {
    let c = PushConsumer::with_options(group, b.config(), o)
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    c
}

/// A listener that records every call and fails while `fail(reconsume_times)` says so.
fn recording(
    c: &PushConsumer,
    fail: impl Fn(u32) -> bool + Send + Sync + 'static,
) -> Arc<Mutex<Vec<Seen>>> {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s = seen.clone();
    c.register_listener(move |msgs| {
        let mut g = s.lock().unwrap();
        let mut failed = false;
        for m in msgs {
            g.push(Seen {
                at: Instant::now(),
                msg: m.clone(),
            });
            failed |= fail(m.reconsume_times);
        }
        if failed {
            ConsumeStatus::ReconsumeLater
        } else {
            ConsumeStatus::ConsumeSuccess
        }
    });
    seen
}

/// The scenario: a listener that always fails sees the message 1 + max times, with
/// reconsume times 0, 1, 2, ... and gaps of at least levels 3, 4, 5, ...; then it is in the
/// DLQ (`admin dlq list`), and `admin dlq resend --all` delivers it again to its topic: a
/// new group sees it once, with the same unique key and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_always_failing_message_retries_with_backoff_then_goes_to_the_dlq_and_resends() {
    let topic = "RetryAlways";
    let group = "g-always";
    let (b, _dir) = broker(&[topic]);
    let c = push(&b, group, topic, options()).await;
    let seen = recording(&c, |_| true);
    c.start().await.unwrap();
    wait_until("the retry queue", || !c.retry_assignment().is_empty()).await;

    let p = Producer::new("retry-pg", b.config()).await.unwrap();
    let sent = p
        .send(
            Message::new(topic, "poison")
                .with_tags("TagA")
                .with_key("order-1")
                .with_property("color", "red"),
        )
        .await
        .unwrap();

    let want = 1 + MAX_RECONSUME as usize;
    wait_until("every delivery", || seen.lock().unwrap().len() >= want).await;
    tokio::time::sleep(QUIET).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), want, "1 + max deliveries, no more: {seen:#?}");
    for (i, s) in seen.iter().enumerate() {
        let m = &s.msg;
        assert_eq!(m.reconsume_times, i as u32, "delivery {i}");
        assert_eq!(m.topic, topic, "delivery {i} shows the original topic");
        assert_eq!(m.uniq_key.as_deref(), Some(sent.uniq_key.as_str()));
        assert_eq!(&m.body[..], b"poison");
        assert_eq!(
            (m.tags.as_str(), m.keys.clone()),
            ("TagA", vec!["order-1".to_string()])
        );
        assert_eq!(m.property("color"), Some("red"));
        if i == 0 {
            assert_eq!(m.msg_id, sent.msg_id);
            assert_eq!(m.retry_topic(), None);
        } else {
            // From the retry queue, with the first delivery's id and topic recorded.
            assert_eq!(m.message_queue().topic, format!("%RETRY%{group}"));
            assert_eq!(m.queue_topic(), format!("%RETRY%{group}"));
            assert_eq!(m.retry_topic(), Some(topic));
            assert_eq!(m.origin_msg_id(), sent.msg_id);
            assert_ne!(m.msg_id, sent.msg_id);
            let level = 3 + (i as u64 - 1);
            let gap = s.at - seen[i - 1].at;
            assert!(
                gap + GAP_SLACK >= Duration::from_millis(level * LEVEL_MS),
                "delivery {i} came {gap:?} after the previous one, before level {level}'s delay"
            );
        }
    }

    // Now a dead letter.
    let dlq = wait_for_letters(&b, group, 1).await;
    let line = dlq.lines().next().unwrap();
    for part in [
        format!("origin_msg_id={}", sent.msg_id),
        format!("topic={topic}"),
        format!("uniq_key={}", sent.uniq_key),
        "keys=order-1".to_string(),
        "tags=TagA".to_string(),
        format!("reconsume_times={}", MAX_RECONSUME + 1),
        "body_size=6".to_string(),
    ] {
        assert!(line.contains(&part), "{part} missing in {line:?}");
    }
    assert!(
        dlq.contains(&format!("group={group} dead_letters=1")),
        "{dlq}"
    );
    c.shutdown().await.unwrap();

    // A new group, at the topic's end, then the resend.
    let mut o = options();
    o.consume_from_where = orbitmq_client::ConsumeFromWhere::LastOffset;
    let c2 = push(&b, "g-after", topic, o).await;
    let seen2 = recording(&c2, |_| false);
    c2.start().await.unwrap();
    assert!(!c2.assignment().is_empty());
    let out = stdout(&admin(&b, &["dlq", "resend", "--group", group, "--all"]));
    assert!(
        out.contains(&format!("topic={topic} uniq_key={}", sent.uniq_key)),
        "{out}"
    );
    assert!(out.contains(&format!("group={group} resent=1")), "{out}");
    wait_until("the resent message", || !seen2.lock().unwrap().is_empty()).await;
    tokio::time::sleep(QUIET).await;
    let seen2 = seen2.lock().unwrap().clone();
    assert_eq!(seen2.len(), 1, "{seen2:#?}");
    let m = &seen2[0].msg;
    assert_eq!(m.topic, topic);
    assert_eq!(m.uniq_key.as_deref(), Some(sent.uniq_key.as_str()));
    assert_eq!(&m.body[..], b"poison");
    assert_eq!(
        (m.tags.as_str(), m.keys.clone()),
        ("TagA", vec!["order-1".to_string()])
    );
    assert_eq!(m.property("color"), Some("red"));
    assert_eq!(m.reconsume_times, 0);
    assert_eq!(m.retry_topic(), None, "retry and DLQ properties dropped");
    c2.shutdown().await.unwrap();

    // An unknown id is an error.
    let o = admin(&b, &["dlq", "resend", "--group", group, "--msg-id", "NOPE"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no dead letter of group g-always") && err.contains("NOPE"),
        "{err}"
    );
    p.shutdown().await;
    b.stop();
}

/// Polls `admin dlq list` until it shows `n` dead letters; returns its output.
async fn wait_for_letters(b: &Broker, group: &str, n: usize) -> String {
    let start = Instant::now();
    loop {
        let out = stdout(&admin(b, &["dlq", "list", "--group", group]));
        if out.contains(&format!("dead_letters={n}")) {
            return out;
        }
        assert!(
            start.elapsed() < common::CONSUME_TIMEOUT,
            "no {n} dead letters: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A listener that fails once sees the message exactly twice: the retry after level 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_that_fails_once_comes_exactly_twice() {
    let topic = "RetryOnce";
    let group = "g-once";
    let (b, _dir) = broker(&[topic]);
    let c = push(&b, group, topic, options()).await;
    let seen = recording(&c, |times| times == 0);
    c.start().await.unwrap();
    // The retry queue is taken (after the heartbeat made it), so the gap below is the delay.
    wait_until("the retry queue", || !c.retry_assignment().is_empty()).await;
    let p = Producer::new("retry-pg", b.config()).await.unwrap();
    let sent = p.send(Message::new(topic, "once")).await.unwrap();
    wait_until("two deliveries", || seen.lock().unwrap().len() >= 2).await;
    tokio::time::sleep(QUIET).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(
        seen.iter()
            .map(|s| s.msg.reconsume_times)
            .collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(seen
        .iter()
        .all(|s| s.msg.topic == topic && &s.msg.body[..] == b"once"));
    assert_eq!(seen[1].msg.origin_msg_id(), sent.msg_id);
    assert!(seen[1].at - seen[0].at + GAP_SLACK >= Duration::from_millis(3 * LEVEL_MS));
    // Both offsets were committed: the original topic's and the retry queue's.
    c.shutdown().await.unwrap();
    let out = stdout(&admin(
        &b,
        &["consumer", "progress", "--group", group, "--topic", topic],
    ));
    assert!(out.contains("total_lag=0"), "{out}");
    let out = stdout(&admin(
        &b,
        &[
            "consumer",
            "progress",
            "--group",
            group,
            "--topic",
            &format!("%RETRY%{group}"),
        ],
    ));
    assert!(
        out.contains("broker_offset=1 consumer_offset=1 lag=0"),
        "{out}"
    );
    assert!(stdout(&admin(&b, &["dlq", "list", "--group", group])).contains("dead_letters=0"));
    p.shutdown().await;
    b.stop();
}

/// One message of `topic`, as a consumer pulled it.
async fn pulled(b: &Broker, topic: &str) -> MessageExt {
    let p = Producer::new("retry-pg", b.config()).await.unwrap();
    p.send(Message::new(topic, "back").with_key("k"))
        .await
        .unwrap();
    p.shutdown().await;
    let c = LitePullConsumer::with_options("g-puller", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let m = common::poll_n(&c, 1).await.remove(0);
    c.shutdown().await.unwrap();
    m
}

fn shard_of(topic: &str, queue: u32) -> usize {
    Shape {
        shards: SHARDS,
        map: QueueMap::TopicHashPlusQueue,
    }
    .shard_of(topic, queue) as usize
}

/// The first group name whose retry queue lives on `shard`.
fn group_on(prefix: &str, shard: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|g| shard_of(&format!("%RETRY%{g}"), 0) == shard)
        .unwrap()
}

fn send_back_header(group: &str, m: &MessageExt) -> Bytes {
    header::encode(&SendBackRequest {
        group: group.into(),
        msg_id: m.msg_id.clone(),
        delay_level: 0,
        max_reconsume_times: 16,
    })
}

/// A CONSUMER_SEND_MSG_BACK of `m` for `group`, sent as is to `endpoint` (no redirect).
async fn raw_send_back(c: &Client, endpoint: &str, group: &str, m: &MessageExt) -> Frame {
    c.request(
        endpoint,
        request::CONSUMER_SEND_MSG_BACK,
        send_back_header(group, m),
        m.record_bytes().clone(),
    )
    .await
    .unwrap()
}

async fn broker_topics(c: &Client, endpoint: &str) -> BTreeSet<String> {
    let f = c
        .request(
            endpoint,
            request::GET_ALL_TOPIC_CONFIG,
            Bytes::new(),
            Bytes::new(),
        )
        .await
        .unwrap();
    header::decode::<TopicConfigsResponse>(&f.header)
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// CONSUMER_SEND_MSG_BACK on the shard that does not own the retry queue gets WRONG_SHARD
/// with the owner's endpoint; the owner stores it; `Client::send_back` follows the redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_back_to_the_wrong_shard_is_redirected() {
    let topic = "RetryRedirect";
    let (b, _dir) = broker(&[topic]);
    let m = pulled(&b, topic).await;
    let c = Client::new(b.config()).await.unwrap();

    let group = group_on("g-raw", 1);
    let f = raw_send_back(&c, &b.shards[0], &group, &m).await;
    assert_eq!(f.code, response::WRONG_SHARD);
    match ClientError::from_response(f.code, &f.header, "") {
        ClientError::WrongShard { redirect, .. } => assert_eq!(redirect, b.shards[1]),
        other => panic!("{other:?}"),
    }
    let f = raw_send_back(&c, &b.shards[1], &group, &m).await;
    assert_eq!(f.code, response::SUCCESS);
    let r: SendBackResponse = header::decode(&f.header).unwrap();
    assert_eq!(
        (
            r.topic.as_str(),
            r.queue_id,
            r.delay_level,
            r.reconsume_times
        ),
        (format!("%RETRY%{group}").as_str(), 0, 3, 1)
    );

    // The client: no route to this group's retry topic yet (auto-creation is off), so it
    // asks the shard the message came from, which is not the owner, and follows.
    let from = m.message_queue();
    let msg_shard = shard_of(&from.topic, from.queue_id);
    let group = group_on("g-client", 1 - msg_shard);
    let r = c.send_back(&m, &group, 0, 16).await.unwrap();
    assert_eq!(
        (r.topic, r.delay_level, r.reconsume_times),
        (format!("%RETRY%{group}"), 3, 1)
    );
    // Past the maximum: the DLQ, on the same shard.
    let r = c.send_back(&m, &group, 0, 0).await.unwrap();
    assert_eq!((r.topic, r.delay_level), (format!("%DLQ%{group}"), 0));
    let topics = broker_topics(&c, &b.shards[0]).await;
    assert!(topics.contains(&format!("%DLQ%{group}")), "{topics:?}");
    let out = stdout(&admin(&b, &["dlq", "list", "--group", &group]));
    assert!(
        out.contains("dead_letters=1") && out.contains(&format!("topic={topic}")),
        "{out}"
    );
    c.shutdown().await;
    b.stop();
}

/// `dlq resend --all` sends each unique key back once, as its newest letter (the DLQ read in
/// two passes, so no body is held), and the original topic gets each message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resend_all_sends_the_newest_letter_of_each_unique_key_once() {
    let topic = "RetryMany";
    let group = "g-many";
    let (b, _dir) = broker(&[topic]);
    let p = Producer::new("retry-pg", b.config()).await.unwrap();
    for i in 0..3 {
        p.send(Message::new(topic, format!("letter-{i}")))
            .await
            .unwrap();
    }
    p.shutdown().await;
    let read_all = |group: &'static str, n: usize| {
        let config = b.config();
        async move {
            let lc = LitePullConsumer::with_options(group, config, from_first())
                .await
                .unwrap();
            lc.subscribe(topic, "*").await.unwrap();
            let ms = common::poll_n(&lc, n).await;
            lc.shutdown().await.unwrap();
            ms
        }
    };
    let ms = read_all("g-many-first", 3).await;
    let first = ms.iter().find(|m| &m.body[..] == b"letter-0").unwrap();
    let uniq0 = first.uniq_key.clone().unwrap();
    // Straight to the DLQ (no retries left): every message, and letter-0 once more.
    let c = Client::new(b.config()).await.unwrap();
    for m in ms.iter().chain([first]) {
        let r = c.send_back(m, group, 0, 0).await.unwrap();
        assert_eq!(r.topic, format!("%DLQ%{group}"));
    }
    c.shutdown().await;
    let list = wait_for_letters(&b, group, 4).await;
    let newest0 = list
        .lines()
        .rfind(|l| l.contains(&format!("uniq_key={uniq0}")))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("msg_id=")))
        .expect("letter-0 listed")
        .to_owned();

    let out = stdout(&admin(&b, &["dlq", "resend", "--group", group, "--all"]));
    assert!(
        out.contains(&format!("group={group} resent=3 failed=0")),
        "{out}"
    );
    let resent0: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(&format!("uniq_key={uniq0}")))
        .collect();
    assert_eq!(resent0.len(), 1, "{out}");
    assert!(
        resent0[0].starts_with(&format!("resent msg_id={newest0} ")),
        "{out}"
    );
    let mut bodies: Vec<String> = read_all("g-many-after", 6)
        .await
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(
        bodies,
        ["letter-0", "letter-0", "letter-1", "letter-1", "letter-2", "letter-2"]
    );
    b.stop();
}

/// A send-back whose body is not a valid record (garbage, a flipped CRC byte, a record with
/// trailing bytes) or whose header is out of bounds is refused with BAD_REQUEST and a clear
/// message, and changes nothing: not even the retry topic is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_send_back_is_refused_and_changes_nothing() {
    let topic = "RetryBad";
    let (b, _dir) = broker(&[topic]);
    let m = pulled(&b, topic).await;
    let c = Client::new(b.config()).await.unwrap();
    let group = group_on("g-bad", 0);
    let before = broker_topics(&c, &b.shards[0]).await;

    let mut bad_crc = m.record_bytes().to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xFF;
    let mut trailing = m.record_bytes().to_vec();
    trailing.extend_from_slice(b"xx");
    let cases: Vec<(Bytes, Bytes, &str)> = vec![
        (
            send_back_header(&group, &m),
            Bytes::from_static(b"garbage garbage garbage"),
            "not a stored record",
        ),
        (
            send_back_header(&group, &m),
            Bytes::from(bad_crc),
            "crc mismatch",
        ),
        (
            send_back_header(&group, &m),
            Bytes::from(trailing),
            "2 more bytes",
        ),
        (
            header::encode(&SendBackRequest {
                group: group.clone(),
                msg_id: "not-an-id".into(),
                delay_level: 0,
                max_reconsume_times: 16,
            }),
            m.record_bytes().clone(),
            "not an offset message id",
        ),
        (
            header::encode(&SendBackRequest {
                group: group.clone(),
                msg_id: m.msg_id.clone(),
                delay_level: 1000,
                max_reconsume_times: 16,
            }),
            m.record_bytes().clone(),
            "delay level 1000",
        ),
        (
            header::encode(&SendBackRequest {
                group: "bad group".into(),
                msg_id: m.msg_id.clone(),
                delay_level: 0,
                max_reconsume_times: 16,
            }),
            m.record_bytes().clone(),
            "consumer group",
        ),
        (
            Bytes::from_static(b"\x01\x02"),
            m.record_bytes().clone(),
            "",
        ),
    ];
    for (h, body, want) in cases {
        let f = c
            .request(&b.shards[0], request::CONSUMER_SEND_MSG_BACK, h, body)
            .await
            .unwrap();
        assert_eq!(f.code, response::BAD_REQUEST, "{want}");
        let e = ClientError::from_response(f.code, &f.header, "").to_string();
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    assert_eq!(broker_topics(&c, &b.shards[0]).await, before);
    assert!(!before.contains(&format!("%RETRY%{group}")));
    // The connection and the shard live on: a good send-back still works.
    let r = c.send_back(&m, &group, 0, 16).await.unwrap();
    assert_eq!(r.topic, format!("%RETRY%{group}"));
    c.shutdown().await;
    b.stop();
}

/// A listener call past `consume_timeout`, and one that panics, count as failures: each
/// message is sent back and comes again from the retry topic, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_or_panicking_listener_call_is_a_failure() {
    let topic = "RetrySlow";
    let group = "g-slow";
    let (b, _dir) = broker(&[topic]);
    let mut o = options();
    // Long enough that a quick call delayed by a loaded machine is not taken for a slow one.
    o.consume_timeout = Duration::from_millis(2000);
    let c = push(&b, group, topic, o).await;
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let s = seen.clone();
    c.register_listener(move |msgs| {
        let m = &msgs[0];
        let body = String::from_utf8(m.body.to_vec()).unwrap();
        s.lock().unwrap().push((body.clone(), m.reconsume_times));
        if m.reconsume_times == 0 {
            if body == "panic" {
                panic!("listener fails on purpose");
            }
            // Past the timeout: its success is not counted.
            std::thread::sleep(Duration::from_millis(5000));
        }
        ConsumeStatus::ConsumeSuccess
    });
    c.start().await.unwrap();
    let p = Producer::new("retry-pg", b.config()).await.unwrap();
    p.send(Message::new(topic, "slow")).await.unwrap();
    p.send(Message::new(topic, "panic")).await.unwrap();
    wait_until("four calls", || seen.lock().unwrap().len() >= 4).await;
    tokio::time::sleep(QUIET).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(
        got,
        [
            ("panic".to_string(), 0),
            ("panic".to_string(), 1),
            ("slow".to_string(), 0),
            ("slow".to_string(), 1)
        ]
    );
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}
