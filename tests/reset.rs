//! Live offset resets against real `orbitmq standalone` processes: `orbitmq admin consumer
//! reset` on a running group makes the broker commit the new offsets and push them to the
//! group's consumers, which drop what they hold of those queues and consume from there; their
//! next commits carry on from the reset, never back to the old offsets.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{body_of, from_first, wait_until, Broker, BrokerSpec};
use orbitmq_client::{
    Client, ConsumeStatus, ConsumerOptions, LitePullConsumer, Message, MessageExt, Producer,
    PushConsumer,
};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_orbitmq");
const QUEUES: u32 = 4;
/// Stragglers (re-deliveries that should not happen) get this long to show up.
const SETTLE: Duration = Duration::from_secs(1);

fn broker(topic: &str) -> (Broker, TempDir) {
    common::broker_with_topics(&[(topic, QUEUES)], "")
}

fn options() -> ConsumerOptions {
    let mut o = from_first();
    o.commit_interval = Duration::from_millis(300);
    o
}

/// `orbitmq admin consumer reset` as a user runs it; returns its output.
fn admin_reset(b: &Broker, group: &str, topic: &str, to: &str) -> String {
    let out = Command::new(BIN)
        .args(["admin", "consumer", "reset", "--namesrv", &b.namesrv])
        .arg("--tls-ca")
        .arg(&b.ca)
        .args(["--group", group, "--topic", topic, "--to", to])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "admin consumer reset failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn send(p: &Producer, topic: &str, range: std::ops::Range<usize>) {
    for i in range {
        p.send(Message::new(topic, body_of(i).into_bytes()))
            .await
            .expect("send");
    }
}

/// The group's committed offsets of the topic, summed over its queues.
async fn committed_total(c: &Client, group: &str, topic: &str) -> u64 {
    let route = c.topic_route(topic).await.unwrap();
    let mut total = 0;
    for q in route.readable() {
        total += c
            .query_consumer_offset(group, &q.mq)
            .await
            .unwrap()
            .unwrap_or(0);
    }
    total
}

async fn wait_committed(c: &Client, group: &str, topic: &str, want: u64) {
    let start = std::time::Instant::now();
    loop {
        let got = committed_total(c, group, topic).await;
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < common::CONSUME_TIMEOUT,
            "committed offsets of {group} sum to {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Seen = Arc<Mutex<Vec<MessageExt>>>;

async fn push_consumer(b: &Broker, group: &str, topic: &str, seen: &Seen) -> PushConsumer {
    let c = PushConsumer::with_options(group, b.config(), options())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let s = seen.clone();
    c.register_listener(move |msgs| {
        s.lock().unwrap().extend(msgs.iter().cloned());
        ConsumeStatus::ConsumeSuccess
    });
    c.start().await.unwrap();
    c
}

fn bodies(msgs: &[MessageExt]) -> Vec<String> {
    let mut v: Vec<String> = msgs
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    v.sort();
    v
}

/// A running push consumer consumed N messages; a live reset to earliest makes it consume all
/// N again, and the group's committed offsets end at N (its commits did not undo the reset,
/// nor go back to the stale offsets).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_reset_to_earliest_replays_everything_and_commits_move_on() {
    const N: usize = 100;
    let topic = "ResetEarliest";
    let group = "g-reset-earliest";
    let (b, _dir) = broker(topic);
    let p = Producer::new("reset-pg", b.config()).await.unwrap();
    let probe = Client::new(b.config()).await.unwrap();
    let seen: Seen = Arc::default();
    let c = push_consumer(&b, group, topic, &seen).await;
    send(&p, topic, 0..N).await;
    wait_until("first round consumed", || seen.lock().unwrap().len() >= N).await;
    wait_committed(&probe, group, topic, N as u64).await;

    let out = admin_reset(&b, group, topic, "earliest");
    assert_eq!(
        out.matches("consumer_offset=0").count(),
        QUEUES as usize,
        "{out}"
    );
    wait_until("second round consumed", || {
        seen.lock().unwrap().len() >= 2 * N
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let all = seen.lock().unwrap().clone();
    assert_eq!(all.len(), 2 * N, "exactly one replay");
    let want: Vec<String> = {
        let mut v: Vec<String> = (0..N).map(body_of).collect();
        v.sort();
        v
    };
    assert_eq!(bodies(&all[..N]), want, "first round");
    assert_eq!(bodies(&all[N..]), want, "the replay is every message once");
    wait_committed(&probe, group, topic, N as u64).await;
    // Committed offsets stay at N (a stale commit would move them back).
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(committed_total(&probe, group, topic).await, N as u64);

    c.shutdown().await.unwrap();
    assert_eq!(committed_total(&probe, group, topic).await, N as u64);
    probe.shutdown().await;
    p.shutdown().await;
    b.stop();
}

/// A live reset to a timestamp re-delivers exactly the messages stored at or after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_reset_by_timestamp_replays_exactly_what_was_stored_after_it() {
    const BEFORE: usize = 60;
    const AFTER: usize = 40;
    let topic = "ResetTime";
    let group = "g-reset-time";
    let (b, _dir) = broker(topic);
    let p = Producer::new("reset-pg", b.config()).await.unwrap();
    let seen: Seen = Arc::default();
    let c = push_consumer(&b, group, topic, &seen).await;
    send(&p, topic, 0..BEFORE).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&p, topic, BEFORE..BEFORE + AFTER).await;
    let n = BEFORE + AFTER;
    wait_until("first round consumed", || seen.lock().unwrap().len() >= n).await;
    // The clock split the sends as intended (same host).
    for m in seen.lock().unwrap().iter() {
        let i: usize = std::str::from_utf8(&m.body).unwrap()[8..14]
            .parse()
            .unwrap();
        assert_eq!(
            m.store_timestamp >= t,
            i >= BEFORE,
            "message {i} stored at {}",
            m.store_timestamp
        );
    }

    admin_reset(&b, group, topic, &t.to_string());
    wait_until("replay consumed", || {
        seen.lock().unwrap().len() >= n + AFTER
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    let all = seen.lock().unwrap().clone();
    let want: Vec<String> = {
        let mut v: Vec<String> = (BEFORE..n).map(body_of).collect();
        v.sort();
        v
    };
    assert_eq!(
        bodies(&all[n..]),
        want,
        "the replay is exactly the later messages"
    );
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// The lite pull consumer applies a live reset too: its next polls return the messages
/// again, and its commits carry on from the reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lite_pull_consumer_follows_a_live_reset() {
    const N: usize = 50;
    let topic = "ResetLite";
    let group = "g-reset-lite";
    let (b, _dir) = broker(topic);
    let p = Producer::new("reset-pg", b.config()).await.unwrap();
    let probe = Client::new(b.config()).await.unwrap();
    let c = LitePullConsumer::with_options(group, b.config(), options())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    send(&p, topic, 0..N).await;
    let first = common::poll_n(&c, N).await;
    assert_eq!(first.len(), N);
    c.commit().await.unwrap();
    wait_committed(&probe, group, topic, N as u64).await;

    admin_reset(&b, group, topic, "earliest");
    // The notice arrives on its own; poll until everything came again.
    let again = common::poll_n(&c, N).await;
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for b in bodies(&again) {
        *count.entry(b).or_default() += 1;
    }
    assert_eq!(count.len(), N, "every message again");
    assert!(count.values().all(|&k| k == 1), "once each: {count:?}");
    c.commit().await.unwrap();
    assert_eq!(committed_total(&probe, group, topic).await, N as u64);
    c.shutdown().await.unwrap();
    probe.shutdown().await;
    p.shutdown().await;
    b.stop();
}

/// An orderly consumer applies a live reset in order: after consuming N messages of a
/// one-queue topic, a reset to earliest makes it consume the N again, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orderly_consumer_replays_in_order_after_a_live_reset() {
    const N: usize = 30;
    let topic = "ResetOrderly";
    let group = "g-reset-orderly";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("topics.conf"), format!("{topic} 1 1 6\n")).unwrap();
    let b = BrokerSpec::new(&data, "async").start();
    let p = Producer::new("reset-pg", b.config()).await.unwrap();
    let probe = Client::new(b.config()).await.unwrap();
    let c = PushConsumer::with_options(group, b.config(), options())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s = seen.clone();
    c.register_orderly_listener(move |msgs: &[MessageExt]| {
        s.lock()
            .unwrap()
            .extend(msgs.iter().map(|m| m.queue_offset));
        orbitmq_client::ConsumeOrderlyStatus::Success
    });
    c.start().await.unwrap();
    send(&p, topic, 0..N).await;
    wait_until("first round", || seen.lock().unwrap().len() >= N).await;
    wait_committed(&probe, group, topic, N as u64).await;
    admin_reset(&b, group, topic, "earliest");
    wait_until("replay", || seen.lock().unwrap().len() >= 2 * N).await;
    tokio::time::sleep(SETTLE).await;
    let once: Vec<u64> = (0..N as u64).collect();
    let want: Vec<u64> = once.iter().chain(&once).copied().collect();
    assert_eq!(*seen.lock().unwrap(), want);
    wait_committed(&probe, group, topic, N as u64).await;
    c.shutdown().await.unwrap();
    probe.shutdown().await;
    p.shutdown().await;
    b.stop();
}

/// INVOKE_BROKER_TO_RESET_OFFSET checks everything before it commits anything: queues of
/// another shard are redirected, offsets outside the queue refused, and a refused reset
/// leaves the committed offsets as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_request_is_checked_whole_before_anything_is_committed() {
    let topic = "ResetChecks";
    let group = "g-reset-checks";
    let (b, _dir) = broker(topic);
    let p = Producer::new("reset-pg", b.config()).await.unwrap();
    send(&p, topic, 0..20).await;
    let c = Client::new(b.config()).await.unwrap();
    let route = c.topic_route(topic).await.unwrap();
    let queues = route.readable();
    let on = |ep: &str| -> Vec<u32> {
        queues
            .iter()
            .filter(|q| q.endpoint == ep)
            .map(|q| q.mq.queue_id)
            .collect()
    };
    let (ep0, ep1) = (&b.shards[0], &b.shards[1]);
    let (mine, theirs) = (on(ep0), on(ep1));
    assert!(
        !mine.is_empty() && !theirs.is_empty(),
        "queues on both shards"
    );
    let broker = queues[0].mq.broker_name.clone();
    // A queue of the other shard: redirected, nothing committed.
    let both = [(mine[0], 0), (theirs[0], 0)];
    match c.reset_offset(ep0, group, topic, &broker, &both).await {
        Err(orbitmq_client::ClientError::WrongShard { redirect, .. }) => {
            assert_eq!(&redirect, ep1)
        }
        other => panic!("expected WRONG_SHARD, got {other:?}"),
    }
    // An offset past the queue's end: refused.
    let q0 = queues.iter().find(|q| q.mq.queue_id == mine[0]).unwrap();
    let max0 = c.max_offset(&q0.mq).await.unwrap();
    let err = c
        .reset_offset(ep0, group, topic, &broker, &[(mine[0], max0 + 1)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    for q in &queues {
        assert_eq!(c.query_consumer_offset(group, &q.mq).await.unwrap(), None);
    }
    // A good one commits.
    c.reset_offset(ep0, group, topic, &broker, &[(mine[0], max0)])
        .await
        .unwrap();
    assert_eq!(
        c.query_consumer_offset(group, &q0.mq).await.unwrap(),
        Some(max0)
    );
    c.shutdown().await;
    p.shutdown().await;
    b.stop();
}
