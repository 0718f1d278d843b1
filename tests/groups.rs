//! Consumer groups against real `orbitmq standalone` processes: clustering rebalance among the
//! members of a group (push and lite pull consumers, two allocation strategies), through a
//! member joining and one shutting down, and the check with three `orbitmq consume`
//! processes.
//!
//! Delivery is at-least-once: every message must arrive; duplicates (around a hand-over) are
//! counted and must stay under a bound.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{body_of, from_first, spawn_tied, wait_until, Broker, CONSUME_TIMEOUT};
use orbitmq_client::{
    Client, ConsumeStatus, ConsumerOptions, LitePullConsumer, Message, MessageModel, MessageQueue,
    Producer, PushConsumer, Strategy,
};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_orbitmq");
const QUEUES: u32 = 8;
/// Messages sent in each phase of the join/leave scenario.
const PER_PHASE: usize = 400;
/// Messages per send batch (one batch goes to one queue).
const SEND_BATCH: usize = 20;
/// How long the members may take to split the queues after a change. Rebalance notices make
/// it fast; the periodic rebalance is set longer than this so that only notices can pass.
const SPLIT_WITHIN: Duration = Duration::from_secs(15);
/// Periodic rebalance in these tests (longer than `SPLIT_WITHIN`).
const SLOW_REBALANCE: Duration = Duration::from_secs(60);
/// Duplicates allowed through two hand-overs: at most what was pulled but not committed on
/// the queues that moved (pull batches of 32 on 8 queues, twice), far above what happens.
const MAX_DUPLICATES: usize = 2 * 8 * 32;

/// A broker with 2 shards and the given topics (8 queues each), auto-creation off.
fn broker(topics: &[&str]) -> (Broker, TempDir) {
    let topics: Vec<(&str, u32)> = topics.iter().map(|t| (*t, QUEUES)).collect();
    common::broker_with_topics(&topics, "")
}

async fn send_range(p: &Producer, topic: &str, range: std::ops::Range<usize>) {
    let all: Vec<usize> = range.collect();
    for chunk in all.chunks(SEND_BATCH) {
        let msgs = chunk
            .iter()
            .map(|i| Message::new(topic, body_of(*i).into_bytes()))
            .collect();
        p.send_batch(msgs).await.expect("send");
    }
}

fn options(strategy: Strategy) -> ConsumerOptions {
    let mut o = from_first();
    o.allocate = strategy;
    o.rebalance_interval = SLOW_REBALANCE;
    o.commit_interval = Duration::from_millis(500);
    o
}

/// Whether the assignments are disjoint and cover all `QUEUES` queues. A member may hold
/// none: consistent hashing over random client ids can leave one without a queue.
fn is_partition(assignments: &[Vec<MessageQueue>]) -> bool {
    let mut all: Vec<&MessageQueue> = assignments.iter().flatten().collect();
    let n = all.len();
    all.sort();
    all.dedup();
    n == all.len() && n == QUEUES as usize
}

/// Received bodies, by consumer index.
type Seen = Arc<Mutex<Vec<(usize, String)>>>;

/// Checks every body 0..n arrived; returns (duplicates, messages per consumer).
fn check_all_arrived(seen: &Seen, n: usize) -> (usize, BTreeMap<usize, usize>) {
    let seen = seen.lock().unwrap();
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_consumer: BTreeMap<usize, usize> = BTreeMap::new();
    for (c, b) in seen.iter() {
        *count.entry(b.as_str()).or_default() += 1;
        *per_consumer.entry(*c).or_default() += 1;
    }
    for i in 0..n {
        assert!(count.contains_key(body_of(i).as_str()), "message {i} lost");
    }
    assert_eq!(count.len(), n, "unexpected messages");
    (seen.len() - n, per_consumer)
}

async fn push_member(
    b: &Broker,
    group: &str,
    topic: &str,
    idx: usize,
    s: Strategy,
    seen: &Seen,
) -> PushConsumer {
    let c = PushConsumer::with_options(group, b.config(), options(s))
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let seen = seen.clone();
    c.register_listener(move |msgs| {
        let mut g = seen.lock().unwrap();
        for m in msgs {
            g.push((idx, String::from_utf8(m.body.to_vec()).unwrap()));
        }
        ConsumeStatus::ConsumeSuccess
    });
    c.start().await.unwrap();
    c
}

async fn wait_split(what: &str, members: impl Fn() -> Vec<Vec<MessageQueue>>) {
    let start = Instant::now();
    while !is_partition(&members()) {
        assert!(
            start.elapsed() < SPLIT_WITHIN,
            "{what}: the members did not split the {QUEUES} queues within {SPLIT_WITHIN:?}: {:?}",
            members()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Push consumers: two members, a third joins, the first leaves; sends go on throughout.
async fn push_group_through_join_and_leave(strategy: Strategy, topic: &str) {
    let (b, _dir) = broker(&[topic]);
    let group = format!("g-{topic}");
    let p = Producer::new("groups-pg", b.config()).await.unwrap();
    let seen: Seen = Arc::default();
    let c0 = push_member(&b, &group, topic, 0, strategy.clone(), &seen).await;
    let c1 = push_member(&b, &group, topic, 1, strategy.clone(), &seen).await;
    wait_split("two members", || vec![c0.assignment(), c1.assignment()]).await;
    send_range(&p, topic, 0..PER_PHASE).await;

    let c2 = push_member(&b, &group, topic, 2, strategy.clone(), &seen).await;
    wait_split("a third joined", || {
        vec![c0.assignment(), c1.assignment(), c2.assignment()]
    })
    .await;
    send_range(&p, topic, PER_PHASE..2 * PER_PHASE).await;

    c0.shutdown().await.unwrap();
    wait_split("the first left", || vec![c1.assignment(), c2.assignment()]).await;
    send_range(&p, topic, 2 * PER_PHASE..3 * PER_PHASE).await;

    let n = 3 * PER_PHASE;
    wait_until("every message consumed", || {
        let g = seen.lock().unwrap();
        g.iter().map(|(_, b)| b).collect::<BTreeSet<_>>().len() == n
    })
    .await;
    // Let late duplicates, if any, arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (dups, per) = check_all_arrived(&seen, n);
    eprintln!(
        "{}: {n} messages, {dups} duplicates, per consumer {per:?}",
        strategy.name()
    );
    assert!(dups <= MAX_DUPLICATES, "{dups} duplicates");
    assert_eq!(per.len(), 3, "every member consumed some: {per:?}");
    c1.shutdown().await.unwrap();
    c2.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_consumers_split_queues_averagely_through_join_and_leave() {
    push_group_through_join_and_leave(Strategy::Averagely, "GroupAvg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_consumers_split_queues_by_circle_through_join_and_leave() {
    push_group_through_join_and_leave(Strategy::AveragelyByCircle, "GroupCircle").await;
}

/// Lite pull consumers (`subscribe`) polling in tasks: three members with consistent hashing,
/// one leaves; every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lite_consumers_split_queues_and_take_over_from_a_leaver() {
    let topic = "GroupLite";
    let (b, _dir) = broker(&[topic]);
    let p = Producer::new("groups-pg", b.config()).await.unwrap();
    let seen: Seen = Arc::default();
    let strategy = Strategy::ConsistentHash { virtual_nodes: 10 };
    let mut members = Vec::new();
    for _ in 0..3 {
        let c = LitePullConsumer::with_options("g-lite", b.config(), options(strategy.clone()))
            .await
            .unwrap();
        c.subscribe(topic, "*").await.unwrap();
        members.push(Arc::new(c));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (idx, c) in members.iter().enumerate() {
        let (c, seen, stop) = (c.clone(), seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let got = c.poll(Duration::from_millis(200)).await.unwrap();
                let mut g = seen.lock().unwrap();
                for m in got {
                    g.push((idx, String::from_utf8(m.body.to_vec()).unwrap()));
                }
            }
        }));
    }
    let assignments = |ms: &[Arc<LitePullConsumer>]| ms.iter().map(|c| c.assignment()).collect();
    wait_split("three lite members", || assignments(&members)).await;
    send_range(&p, topic, 0..PER_PHASE).await;
    wait_until("first phase consumed", || {
        seen.lock().unwrap().len() >= PER_PHASE
    })
    .await;

    // Member 0 leaves: its poll task ends first, then it commits and unregisters.
    let leaver = members.remove(0);
    let t0 = tasks.remove(0);
    t0.abort();
    let _ = t0.await;
    leaver.shutdown().await.unwrap();
    wait_split("member 0 left", || assignments(&members)).await;
    send_range(&p, topic, PER_PHASE..2 * PER_PHASE).await;

    let n = 2 * PER_PHASE;
    wait_until("every message consumed", || {
        let g = seen.lock().unwrap();
        g.iter().map(|(_, b)| b).collect::<BTreeSet<_>>().len() == n
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    for t in tasks {
        t.await.unwrap();
    }
    let (dups, per) = check_all_arrived(&seen, n);
    eprintln!(
        "lite {}: {n} messages, {dups} duplicates, per consumer {per:?}",
        strategy.name()
    );
    assert!(dups <= MAX_DUPLICATES, "{dups} duplicates");
    for c in members {
        c.shutdown().await.unwrap();
    }
    p.shutdown().await;
    b.stop();
}

/// The check: 2,000 messages, three `orbitmq consume` processes of one group started
/// together: every message consumed, by at least two of them; duplicates counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consume_processes_share_two_thousand_messages() {
    const N: usize = 2000;
    let topic = "GroupCli";
    let (b, _dir) = broker(&[topic]);
    let children: Vec<_> = (0..3)
        .map(|_| {
            let mut cmd = Command::new(BIN);
            cmd.args(["consume", "--namesrv", &b.namesrv, "--tls-ca"])
                .arg(&b.ca)
                .args(["--topic", topic, "--group", "g-cli", "--timeout-secs", "10"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            spawn_tied(cmd).expect("spawn orbitmq consume")
        })
        .collect();
    // Each child's pipes are read at once (wait_with_output on a thread of its own): a child
    // blocked on a full stdout pipe would stall and then take it for idleness.
    let readers: Vec<_> = children
        .into_iter()
        .map(|c| std::thread::spawn(move || c.wait_with_output().expect("wait")))
        .collect();
    // The messages come once all three are in the group: sent before, the first process to
    // start could drain them all before the others join.
    let client = Client::new(b.config()).await.unwrap();
    let start = Instant::now();
    while client
        .consumer_ids(&b.shards[0], "g-cli")
        .await
        .map_or(0, |ids| ids.len())
        < 3
    {
        assert!(start.elapsed() < CONSUME_TIMEOUT, "the three never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.shutdown().await;
    let p = Producer::new("groups-pg", b.config()).await.unwrap();
    send_range(&p, topic, 0..N).await;
    p.shutdown().await;
    let outputs: Vec<String> = tokio::task::spawn_blocking(move || {
        readers
            .into_iter()
            .map(|r| {
                let out = r.join().expect("reader thread");
                assert!(
                    out.status.success(),
                    "orbitmq consume failed: {}",
                    out.status
                );
                String::from_utf8(out.stdout).unwrap()
            })
            .collect()
    })
    .await
    .unwrap();
    let seen: Seen = Arc::default();
    for (idx, out) in outputs.iter().enumerate() {
        let mut g = seen.lock().unwrap();
        for line in out.lines() {
            let body = line.split(" body=").nth(1).expect("a body").to_owned();
            g.push((idx, body));
        }
    }
    let (dups, per) = check_all_arrived(&seen, N);
    eprintln!("orbitmq consume x3: {N} messages, {dups} duplicates, per process {per:?}");
    assert!(
        per.len() >= 2,
        "consumed by fewer than two processes: {per:?}"
    );
    assert!(dups <= MAX_DUPLICATES, "{dups} duplicates");

    // `admin consumer progress`: all committed, then a lag of what is sent after.
    let progress = || {
        let out = Command::new(BIN)
            .args(["admin", "consumer", "progress", "--namesrv", &b.namesrv])
            .arg("--tls-ca")
            .arg(&b.ca)
            .args(["--group", "g-cli", "--topic", topic])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = progress();
    assert_eq!(text.matches(" lag=").count(), QUEUES as usize, "{text}");
    assert!(text.contains("total_lag=0"), "{text}");
    let p = Producer::new("groups-pg", b.config()).await.unwrap();
    send_range(&p, topic, N..N + 10).await;
    p.shutdown().await;
    let text = progress();
    assert!(text.contains("total_lag=10"), "{text}");

    // A reset of the stopped group to the earliest offsets: everything is lag again.
    let out = Command::new(BIN)
        .args(["admin", "consumer", "reset", "--namesrv", &b.namesrv])
        .arg("--tls-ca")
        .arg(&b.ca)
        .args(["--group", "g-cli", "--topic", topic, "--to", "earliest"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = progress();
    assert!(text.contains(&format!("total_lag={}", N + 10)), "{text}");
    b.stop();
}

/// Broadcasting: each of three members gets every message; offsets live in each member's
/// file, so a member restarted on its file resumes where it was (not from the first offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broadcasting_members_each_get_every_message_and_resume_from_their_file() {
    const N: usize = 300;
    const MORE: usize = 50;
    let topic = "GroupBroadcast";
    let (b, dir) = broker(&[topic]);
    let p = Producer::new("groups-pg", b.config()).await.unwrap();
    let path = |i: usize| dir.path().join(format!("member-{i}")).join("offsets");
    let broadcast = |i: usize| {
        let mut o = options(Strategy::Averagely);
        o.message_model = MessageModel::Broadcasting;
        o.local_offset_path = Some(path(i));
        o
    };
    let seen: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..3 {
        let c = PushConsumer::with_options("g-bcast", b.config(), broadcast(i))
            .await
            .unwrap();
        c.subscribe(topic, "*").await.unwrap();
        let seen = seen.clone();
        c.register_listener(move |msgs| {
            let mut g = seen.lock().unwrap();
            for m in msgs {
                g.push((i, String::from_utf8(m.body.to_vec()).unwrap()));
            }
            ConsumeStatus::ConsumeSuccess
        });
        c.start().await.unwrap();
        assert_eq!(
            c.assignment().len(),
            QUEUES as usize,
            "a member takes every queue"
        );
        members.push(c);
    }
    send_range(&p, topic, 0..N).await;
    wait_until("each member got every message", || {
        let g = seen.lock().unwrap();
        (0..3).all(|i| {
            g.iter()
                .filter(|(c, _)| *c == i)
                .map(|(_, b)| b)
                .collect::<BTreeSet<_>>()
                .len()
                == N
        })
    })
    .await;
    for c in &members {
        c.shutdown().await.unwrap();
    }
    assert!(path(0).exists(), "member 0 wrote its offsets file");

    // Member 0 comes back on its file (as a lite consumer): only the new messages arrive.
    send_range(&p, topic, N..N + MORE).await;
    let c = LitePullConsumer::with_options("g-bcast", b.config(), broadcast(0))
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let got = common::poll_n(&c, MORE).await;
    let more = c.poll(Duration::from_millis(500)).await.unwrap();
    let bodies: BTreeSet<String> = got
        .iter()
        .chain(&more)
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    let want: BTreeSet<String> = (N..N + MORE).map(body_of).collect();
    assert_eq!(bodies, want, "resumed from the file: only the new messages");
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// Subscription consistency: members of one group subscribing with different tags are named
/// by the broker (GET_CONSUMER_CONNECTION_LIST) and by `orbitmq admin consumer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_different_subscriptions_are_reported() {
    let topic = "GroupMixed";
    let (b, _dir) = broker(&[topic]);
    let a = LitePullConsumer::with_options("g-mixed", b.config(), from_first())
        .await
        .unwrap();
    a.subscribe(topic, "*").await.unwrap();
    let c = LitePullConsumer::with_options("g-mixed", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(topic, "TagA").await.unwrap();
    let r = a
        .client()
        .consumer_connections(&b.shards[0], "g-mixed")
        .await
        .unwrap();
    assert_eq!(r.members.len(), 2, "{r:?}");
    assert_eq!(r.conflicts.len(), 2, "{r:?}");
    let ids = [a.client().client_id(), c.client().client_id()];
    assert!(r
        .conflicts
        .iter()
        .any(|x| x.contains(ids[0]) && x.contains("(*)")));
    assert!(r
        .conflicts
        .iter()
        .any(|x| x.contains(ids[1]) && x.contains("(TagA)")));

    let out = Command::new(BIN)
        .args(["admin", "consumer", "--namesrv", &b.namesrv, "--tls-ca"])
        .arg(&b.ca)
        .args(["--group", "g-mixed"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("CONFLICT").count(), 2, "{text}");
    assert!(text.contains(&format!("member={}", ids[1])), "{text}");

    // Once the two agree, the conflict is gone.
    c.shutdown().await.unwrap();
    let r = a
        .client()
        .consumer_connections(&b.shards[0], "g-mixed")
        .await
        .unwrap();
    assert_eq!(r.members.len(), 1);
    assert!(r.conflicts.is_empty(), "{r:?}");
    a.shutdown().await.unwrap();
    b.stop();
}

/// A consumer process killed with SIGKILL sends no unregister: the broker drops it when its
/// last connection closes (QUIC's idle timeout, 30 s), not at `channelExpiredTimeout`
/// (120 s here, the default), and the other members are told at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_leaves_its_group_when_its_connections_close() {
    /// Well under the 120 s expiry, above the 30 s idle timeout plus a keep-alive.
    const LEAVE_BOUND: Duration = Duration::from_secs(75);
    let topic = "GroupKilled";
    let (b, _dir) = broker(&[topic]);
    let watcher = LitePullConsumer::with_options("g-killed", b.config(), from_first())
        .await
        .unwrap();
    watcher.subscribe(topic, "*").await.unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["consume", "--namesrv", &b.namesrv, "--tls-ca"])
        .arg(&b.ca)
        .args([
            "--topic",
            topic,
            "--group",
            "g-killed",
            "--timeout-secs",
            "600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_tied(cmd).expect("spawn orbitmq consume");
    let members = || async {
        watcher
            .client()
            .consumer_connections(&b.shards[0], "g-killed")
            .await
            .map(|r| r.members.len())
            .unwrap_or(0)
    };
    let start = Instant::now();
    while members().await < 2 {
        assert!(
            start.elapsed() < LEAVE_BOUND,
            "the consume process never joined"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    while members().await > 1 {
        assert!(
            killed.elapsed() < LEAVE_BOUND,
            "the killed member was still listed after {LEAVE_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The survivor takes every queue at its next rebalance.
    let start = Instant::now();
    while watcher.assignment().len() < QUEUES as usize {
        assert!(start.elapsed() < LEAVE_BOUND, "{:?}", watcher.assignment());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("killed member left after {:?}", killed.elapsed());
    watcher.shutdown().await.unwrap();
    b.stop();
}
