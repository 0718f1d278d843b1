//! Ordered consumption against real `orbitmq standalone` processes: orderly push consumers
//! lock their queues on the broker, consume each queue in offset order one call at a time,
//! retry a suspended message in place, and hand queues over through a rebalance without
//! ever going back in a queue's order.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{from_first, wait_until, Broker};
use orbitmq_client::{
    ConsumeOrderlyStatus, ConsumerOptions, Message, MessageExt, MessageQueue, Producer,
    PushConsumer,
};
use tempfile::TempDir;

/// Order ids and steps per order id (the scenario).
const ORDERS: usize = 50;
const STEPS: usize = 20;
/// Queues of the ordered topic.
const QUEUES: u32 = 8;
/// Periodic rebalance in these tests: longer than the tests, so only notices rebalance.
const SLOW_REBALANCE: Duration = Duration::from_secs(120);
/// Time a listener call takes in the rebalance test, so the third member joins mid-stream.
const WORK: Duration = Duration::from_millis(30);
/// Re-deliveries allowed through the hand-over: at most the one message in progress on each
/// queue that moves (the old owner commits what it finished before unlocking).
const MAX_DUPLICATES: usize = QUEUES as usize;

/// A broker with 2 shards and the given topics (name, queues), auto-creation off.
fn broker(topics: &[(&str, u32)]) -> (Broker, TempDir) {
    common::broker_with_topics(topics, "")
}

fn options() -> ConsumerOptions {
    let mut o = from_first();
    o.rebalance_interval = SLOW_REBALANCE;
    o.commit_interval = Duration::from_millis(500);
    o
}

fn order_body(order: usize, step: usize) -> String {
    format!("order-{order:03}-step-{step:02}")
}

fn parse_order(body: &[u8]) -> (usize, usize) {
    let s = std::str::from_utf8(body).unwrap();
    let order = s[6..9].parse().unwrap();
    let step = s[15..17].parse().unwrap();
    (order, step)
}

/// Sends `steps` of every order id, each order id to queue `order % queues` by a selector:
/// one task per order id, sending its steps one after the other (so they are stored in
/// step order), the order ids side by side (so the queues fill fast).
async fn send_steps(p: &Arc<Producer>, topic: &str, steps: std::ops::Range<usize>) {
    let mut tasks = tokio::task::JoinSet::new();
    for order in 0..ORDERS {
        let (p, topic, steps) = (p.clone(), topic.to_owned(), steps.clone());
        tasks.spawn(async move {
            for step in steps {
                let m = Message::new(&topic, order_body(order, step).into_bytes());
                p.send_with_selector(m, move |qs: &[MessageQueue], _: &Message| order % qs.len())
                    .await
                    .expect("send");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("sender task");
    }
}

/// What the orderly listeners of one test saw, across members.
#[derive(Default)]
struct Seen {
    /// (member, order id, step), in the order the listeners were called.
    calls: Vec<(usize, usize, usize)>,
    /// Queues with a listener call in progress (any member).
    busy: HashSet<MessageQueue>,
    /// Calls that found their queue busy: two calls for one queue at once.
    overlaps: usize,
}

async fn orderly_member(
    b: &Broker,
    group: &str,
    topic: &str,
    idx: usize,
    seen: &Arc<Mutex<Seen>>,
) -> PushConsumer {
    let c = PushConsumer::with_options(group, b.config(), options())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let seen = seen.clone();
    c.register_orderly_listener(move |msgs: &[MessageExt]| {
        let mq = msgs[0].message_queue();
        {
            let mut g = seen.lock().unwrap();
            if !g.busy.insert(mq.clone()) {
                g.overlaps += 1;
            }
            for m in msgs {
                let (order, step) = parse_order(&m.body);
                g.calls.push((idx, order, step));
            }
        }
        std::thread::sleep(WORK);
        seen.lock().unwrap().busy.remove(&mq);
        ConsumeOrderlyStatus::Success
    });
    c.start().await.unwrap();
    c
}

/// The scenario: 50 order ids x 20 steps, each order id on one queue; two orderly
/// members, a third joins midway. Per order id the steps seen are non-decreasing with no
/// gaps (a re-delivery repeats only the step last seen), and all 20 arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_ids_keep_their_order_through_a_rebalance() {
    let topic = "Ordered";
    let (b, _dir) = broker(&[(topic, QUEUES)]);
    let group = "g-ordered";
    let p = Arc::new(Producer::new("ordered-pg", b.config()).await.unwrap());
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let c0 = orderly_member(&b, group, topic, 0, &seen).await;
    let c1 = orderly_member(&b, group, topic, 1, &seen).await;
    wait_until("two members split the queues", || {
        c0.assignment().len() + c1.assignment().len() == QUEUES as usize
            && !c0.assignment().is_empty()
            && !c1.assignment().is_empty()
    })
    .await;
    send_steps(&p, topic, 0..STEPS / 2).await;
    // Join while the first half is being consumed.
    wait_until("some consumed", || seen.lock().unwrap().calls.len() >= 100).await;
    let c2 = orderly_member(&b, group, topic, 2, &seen).await;
    send_steps(&p, topic, STEPS / 2..STEPS).await;
    wait_until("the third member takes its share", || {
        c0.assignment().len() + c1.assignment().len() + c2.assignment().len() == QUEUES as usize
            && !c2.assignment().is_empty()
    })
    .await;
    wait_until("every step of every order consumed", || {
        let g = seen.lock().unwrap();
        let distinct: HashSet<(usize, usize)> = g.calls.iter().map(|c| (c.1, c.2)).collect();
        distinct.len() == ORDERS * STEPS
    })
    .await;
    // Late re-deliveries, if any, arrive before checking.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (calls, overlaps) = {
        let g = seen.lock().unwrap();
        (g.calls.clone(), g.overlaps)
    };
    assert_eq!(overlaps, 0, "two listener calls for one queue at once");
    let mut per_order: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut per_member: BTreeMap<usize, usize> = BTreeMap::new();
    let mut members_of: BTreeMap<usize, HashSet<usize>> = BTreeMap::new();
    for &(member, order, step) in &calls {
        per_order.entry(order).or_default().push(step);
        *per_member.entry(member).or_default() += 1;
        members_of.entry(order).or_default().insert(member);
    }
    // The hand-over happened mid-stream: some order ids were consumed partly by one member
    // and then by another.
    let handed_over = members_of.values().filter(|m| m.len() > 1).count();
    let mut dups = 0;
    for (order, steps) in &per_order {
        assert_eq!(steps[0], 0, "order {order} starts at step 0: {steps:?}");
        for w in steps.windows(2) {
            assert!(
                w[1] == w[0] || w[1] == w[0] + 1,
                "order {order}: step {} after {} (out of order or a gap): {steps:?}",
                w[1],
                w[0]
            );
            dups += usize::from(w[1] == w[0]);
        }
        assert_eq!(
            *steps.last().unwrap(),
            STEPS - 1,
            "order {order}: {steps:?}"
        );
    }
    assert_eq!(per_order.len(), ORDERS);
    eprintln!(
        "ordered: {} calls, {dups} re-deliveries, per member {per_member:?}, {handed_over} order ids handed over",
        calls.len()
    );
    assert!(handed_over > 0, "no order id changed hands mid-stream");
    assert!(dups <= MAX_DUPLICATES, "{dups} re-deliveries");
    assert!(
        per_member.get(&2).copied().unwrap_or(0) > 0,
        "the third member consumed nothing: {per_member:?}"
    );
    c0.shutdown().await.unwrap();
    c1.shutdown().await.unwrap();
    c2.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// A listener that suspends one message twice sees it three times (reconsume times 0, 1, 2,
/// each after the suspend time) and nothing after it until it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_suspended_message_is_retried_in_place_before_anything_after_it() {
    const N: usize = 10;
    const SUSPENDED: u64 = 3;
    const SUSPEND: Duration = Duration::from_millis(300);
    let topic = "OrderedSuspend";
    let (b, _dir) = broker(&[(topic, 2)]);
    let p = Producer::new("ordered-pg", b.config()).await.unwrap();
    for i in 0..N {
        let m = Message::new(topic, format!("m{i}").into_bytes());
        p.send_with_selector(m, |_: &[MessageQueue], _: &Message| 0)
            .await
            .unwrap();
    }
    let mut o = options();
    o.suspend_current_queue_time = SUSPEND;
    let c = PushConsumer::with_options("g-suspend", b.config(), o)
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    // (offset, reconsume times, when).
    let seen: Arc<Mutex<Vec<(u64, u32, Instant)>>> = Arc::default();
    let s = seen.clone();
    c.register_orderly_listener(move |msgs: &[MessageExt]| {
        let mut g = s.lock().unwrap();
        let mut status = ConsumeOrderlyStatus::Success;
        for m in msgs {
            assert_eq!(m.body.as_ref(), format!("m{}", m.queue_offset).as_bytes());
            let before = g.iter().filter(|x| x.0 == m.queue_offset).count();
            g.push((m.queue_offset, m.reconsume_times, Instant::now()));
            if m.queue_offset == SUSPENDED && before < 2 {
                status = ConsumeOrderlyStatus::SuspendCurrentQueueAMoment;
            }
        }
        status
    });
    c.start().await.unwrap();
    wait_until("all consumed", || {
        seen.lock().unwrap().iter().any(|x| x.0 == N as u64 - 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let g = seen.lock().unwrap().clone();
    let offsets: Vec<u64> = g.iter().map(|x| x.0).collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9]);
    let times: Vec<u32> = g.iter().filter(|x| x.0 == SUSPENDED).map(|x| x.1).collect();
    assert_eq!(
        times,
        vec![0, 1, 2],
        "reconsume times of the suspended message"
    );
    let when: Vec<Instant> = g.iter().filter(|x| x.0 == SUSPENDED).map(|x| x.2).collect();
    for w in when.windows(2) {
        assert!(w[1] - w[0] >= SUSPEND, "retried after {:?}", w[1] - w[0]);
    }
    let mq = c
        .assignment()
        .into_iter()
        .find(|q| q.queue_id == 0)
        .expect("queue 0 assigned");
    c.shutdown().await.unwrap();
    // The final commit covers everything.
    let probe = orbitmq_client::Client::new(b.config()).await.unwrap();
    assert_eq!(
        probe.query_consumer_offset("g-suspend", &mq).await.unwrap(),
        Some(N as u64)
    );
    probe.shutdown().await;
    p.shutdown().await;
    b.stop();
}

/// Global order: a topic with one queue and one orderly consumer gets every message in send
/// order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_queue_topic_is_consumed_in_global_send_order() {
    const N: usize = 300;
    let topic = "GlobalOrder";
    let (b, _dir) = broker(&[(topic, 1)]);
    let p = Producer::new("ordered-pg", b.config()).await.unwrap();
    let c = PushConsumer::with_options("g-global", b.config(), options())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    c.register_orderly_listener(move |msgs: &[MessageExt]| {
        let mut g = s.lock().unwrap();
        for m in msgs {
            g.push(String::from_utf8(m.body.to_vec()).unwrap());
        }
        ConsumeOrderlyStatus::Success
    });
    c.start().await.unwrap();
    for i in 0..N {
        p.send(Message::new(topic, format!("g{i:05}").into_bytes()))
            .await
            .unwrap();
    }
    wait_until("all consumed", || seen.lock().unwrap().len() >= N).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let want: Vec<String> = (0..N).map(|i| format!("g{i:05}")).collect();
    assert_eq!(*seen.lock().unwrap(), want);
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// With `orderly_max_reconsume_times`, a message the listener keeps suspending goes to the
/// group's dead-letter topic after that many retries, and the queue moves on in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_orderly_message_past_its_retries_goes_to_the_dead_letter_topic() {
    const N: u64 = 6;
    const POISON: u64 = 2;
    const RETRIES: u32 = 2;
    let topic = "OrderedDlq";
    let group = "g-ordered-dlq";
    let (b, _dir) = broker(&[(topic, 1)]);
    let p = Producer::new("ordered-pg", b.config()).await.unwrap();
    for i in 0..N {
        p.send(Message::new(topic, format!("m{i}").into_bytes()))
            .await
            .unwrap();
    }
    let mut o = options();
    o.suspend_current_queue_time = Duration::from_millis(50);
    o.orderly_max_reconsume_times = Some(RETRIES);
    let c = PushConsumer::with_options(group, b.config(), o)
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let s = seen.clone();
    c.register_orderly_listener(move |msgs: &[MessageExt]| {
        let mut g = s.lock().unwrap();
        let mut status = ConsumeOrderlyStatus::Success;
        for m in msgs {
            g.push((m.queue_offset, m.reconsume_times));
            if m.queue_offset == POISON {
                status = ConsumeOrderlyStatus::SuspendCurrentQueueAMoment;
            }
        }
        status
    });
    c.start().await.unwrap();
    wait_until("the queue moved past the poison message", || {
        seen.lock().unwrap().iter().any(|x| x.0 == N - 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let g = seen.lock().unwrap().clone();
    // Tried 1 + RETRIES times (reconsume times 0..=RETRIES), then dead-lettered.
    assert_eq!(
        g,
        vec![
            (0, 0),
            (1, 0),
            (2, 0),
            (2, 1),
            (2, 2),
            (3, 0),
            (4, 0),
            (5, 0)
        ]
    );
    // The dead-letter topic holds it.
    let dlq = orbitmq_proto::sys::dlq_topic(group);
    let probe = orbitmq_client::Client::new(b.config()).await.unwrap();
    let broker_name = c.assignment()[0].broker_name.clone();
    let mq = MessageQueue::new(&dlq, &broker_name, 0);
    let start = Instant::now();
    loop {
        if let Ok(max) = probe.max_offset(&mq).await {
            if max == 1 {
                break;
            }
        }
        assert!(
            start.elapsed() < common::CONSUME_TIMEOUT,
            "nothing in {dlq}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.shutdown().await.unwrap();
    assert_eq!(
        probe
            .query_consumer_offset(group, &MessageQueue::new(topic, &broker_name, 0))
            .await
            .unwrap(),
        Some(N)
    );
    probe.shutdown().await;
    p.shutdown().await;
    b.stop();
}

/// The broker's lock table over the wire: a queue another client holds is refused, its
/// holder renews it, an unlock frees it; any shard answers for the whole broker; requests
/// out of bounds are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_locks_are_broker_wide_and_exclusive() {
    let topic = "OrderedLocks";
    let (b, _dir) = broker(&[(topic, 4)]);
    let a = orbitmq_client::Client::new(b.config()).await.unwrap();
    let c = orbitmq_client::Client::new(b.config()).await.unwrap();
    let route = a.topic_route(topic).await.unwrap();
    let qs: Vec<MessageQueue> = route.readable().iter().map(|q| q.mq.clone()).collect();
    let (s0, s1) = (&b.shards[0], &b.shards[1]);
    let set = |v: &[MessageQueue]| v.iter().cloned().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(
        a.lock_batch(s0, "g", &qs[..2]).await.unwrap(),
        set(&qs[..2])
    );
    // Another client of the group gets only the free queues, whichever shard it asks.
    assert_eq!(c.lock_batch(s1, "g", &qs).await.unwrap(), set(&qs[2..]));
    // Another group locks independently.
    assert_eq!(
        c.lock_batch(s0, "g2", &qs[..1]).await.unwrap(),
        set(&qs[..1])
    );
    // The holder renews; unlocking frees exactly its queues.
    assert_eq!(
        a.lock_batch(s1, "g", &qs[..2]).await.unwrap(),
        set(&qs[..2])
    );
    c.unlock_batch(s0, "g", &qs[..1]).await.unwrap(); // not c's: no effect
    assert!(c.lock_batch(s0, "g", &qs[..1]).await.unwrap().is_empty());
    a.unlock_batch(s1, "g", &qs[..1]).await.unwrap();
    assert_eq!(
        c.lock_batch(s0, "g", &qs[..2]).await.unwrap(),
        set(&qs[..1])
    );
    // Bounds: no queue at all is a bad request.
    let err = a.lock_batch(s0, "g", &[]).await.unwrap_err();
    assert!(err.to_string().contains("1..="), "{err}");
    a.shutdown().await;
    c.shutdown().await;
    b.stop();
}

/// One listener call: member, queue id, start, end.
type Call = (usize, u32, Instant, Instant);

/// A listener call that outlasts a rebalance's wait keeps its queue locked until it ends, and
/// no longer: the member that takes the queue over starts on it only after that call
/// returned, and soon after (not when the broker lock would have expired, 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_call_keeps_its_queue_from_the_next_owner_until_it_ends() {
    /// Longer than the 5 s a dropped queue's call is waited for.
    const SLOW: Duration = Duration::from_secs(8);
    const PER_QUEUE: usize = 5;
    let topic = "OrderedSlow";
    let (b, _dir) = broker(&[(topic, 2)]);
    let p = Producer::new("ordered-pg", b.config()).await.unwrap();
    for q in 0..2usize {
        for i in 0..PER_QUEUE {
            let m = Message::new(topic, format!("q{q}-{i}").into_bytes());
            p.send_with_selector(m, move |_: &[MessageQueue], _: &Message| q)
                .await
                .unwrap();
        }
    }
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    // Slow calls begun.
    let slow: Arc<AtomicUsize> = Arc::default();
    let member = |idx: usize| {
        let (calls, slow, config) = (calls.clone(), slow.clone(), b.config());
        async move {
            let c = PushConsumer::with_options("g-slow", config, options())
                .await
                .unwrap();
            c.subscribe(topic, "*").await.unwrap();
            c.register_orderly_listener(move |msgs: &[MessageExt]| {
                let start = Instant::now();
                // The first member's first call on each queue is slow.
                if idx == 0 && msgs[0].queue_offset == 0 {
                    slow.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(SLOW);
                }
                calls
                    .lock()
                    .unwrap()
                    .push((idx, msgs[0].queue_id, start, Instant::now()));
                ConsumeOrderlyStatus::Success
            });
            c.start().await.unwrap();
            c
        }
    };
    let a = member(0).await;
    // Both queues are in a slow call on the first member; then the second joins.
    wait_until("the first member's slow calls on both queues", || {
        a.assignment().len() == 2 && slow.load(Ordering::SeqCst) == 2
    })
    .await;
    let b2 = member(1).await;
    wait_until("the second member consumes the queue it took", || {
        calls.lock().unwrap().iter().any(|x| x.0 == 1)
    })
    .await;
    let c = calls.lock().unwrap().clone();
    for q in 0..2u32 {
        let mut on_q: Vec<_> = c.iter().filter(|x| x.1 == q).collect();
        on_q.sort_by_key(|x| x.2);
        for w in on_q.windows(2) {
            assert!(
                w[1].2 >= w[0].3,
                "queue {q}: a call of member {} started before member {}'s call ended",
                w[1].0,
                w[0].0
            );
        }
    }
    let taken = c
        .iter()
        .find(|x| x.0 == 1)
        .expect("a call of the second member");
    let slow_end = c
        .iter()
        .find(|x| x.0 == 0 && x.1 == taken.1)
        .expect("the slow call on that queue")
        .3;
    let gap = taken.2.saturating_duration_since(slow_end);
    assert!(
        gap < Duration::from_secs(15),
        "the queue waited {gap:?} after the slow call ended: its lock was left to expire"
    );
    a.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}
