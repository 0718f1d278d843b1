//! Delayed and timed delivery against real `orbitmq standalone` processes: a delayed message
//! is invisible until due and arrives once shortly after; a level above the top is the top
//! level; pending delayed and timer messages survive a clean restart and a SIGKILL and are
//! delivered exactly once; bad delays are refused with a clear error.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{from_first, poll_n, Broker, BrokerSpec};
use orbitmq_client::{ClientError, LitePullConsumer, Message, MessageExt, Producer};

/// Brokers of this file run one at a time (2 shared cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The delay levels of these tests: level 1 = 1 s, level 2 = 2 s, level 3 = 4 s.
const LEVELS: &str = "1s 2s 4s";
/// "Within one second of it", as the issue puts it: the slack we allow past the due time on
/// this shared machine (the scheduler ticks every 100 ms).
const LATE_BOUND_MS: u64 = 1000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn conf(dir: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("broker.conf");
    std::fs::write(&p, format!("messageDelayLevel = {LEVELS}\n{extra}")).unwrap();
    p
}

fn start(dir: &Path, flush: &str) -> Broker {
    BrokerSpec::new(&dir.join("data"), flush)
        .conf(&conf(dir, "timerMaxDelaySec = 600\n"))
        .start()
}

async fn consumer(broker: &Broker, group: &str, topic: &str) -> LitePullConsumer {
    let c = LitePullConsumer::with_options(group, broker.config(), from_first())
        .await
        .unwrap();
    c.subscribe(topic, "*").await.unwrap();
    c
}

/// Everything that arrives within `d`.
async fn drain(c: &LitePullConsumer, d: Duration) -> Vec<MessageExt> {
    let end = std::time::Instant::now() + d;
    let mut out = Vec::new();
    while std::time::Instant::now() < end {
        out.extend(c.poll(Duration::from_millis(200)).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_invisible_until_due_then_arrives_once() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "async");
    let p = Producer::new("sched-pg", broker.config()).await.unwrap();
    let sent_at = now_ms();
    let r = p
        .send(
            Message::new("Delayed", "level-one")
                .with_tags("T1")
                .with_key("order-1")
                .with_property("color", "blue")
                .with_delay_level(1),
        )
        .await
        .unwrap();
    // The broker counts the delay from when it stored the message: before this.
    let acked_at = now_ms();
    let c = consumer(&broker, "sched-g1", "Delayed").await;
    // On a loaded machine this first poll can outlast the delay: then what it returned is
    // the delivery itself (its store timestamp is checked below), not to be dropped.
    let early = c.poll(Duration::from_millis(600)).await.unwrap();
    assert!(
        early.is_empty() || now_ms() >= sent_at + 1000,
        "visible before its delay: {early:?}"
    );
    let got = if early.is_empty() {
        poll_n(&c, 1).await
    } else {
        early
    };
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.topic, "Delayed");
    assert_eq!(&m.body[..], b"level-one");
    assert_eq!(m.tags, "T1");
    assert_eq!(m.keys, vec!["order-1".to_string()]);
    assert_eq!(m.properties.get("color").map(String::as_str), Some("blue"));
    assert_eq!(m.uniq_key.as_deref(), Some(r.uniq_key.as_str()));
    assert_eq!(m.delay_applied_ms(), Some(1000));
    assert!(!m.properties.contains_key("DELAY"), "{:?}", m.properties);
    assert!(
        !m.properties.contains_key("REAL_TOPIC"),
        "{:?}",
        m.properties
    );
    // Stored in its real topic no earlier than due, and within the bound after.
    let due = m.born_timestamp + 1000;
    assert!(
        m.store_timestamp >= due && m.store_timestamp <= acked_at + 1000 + LATE_BOUND_MS,
        "delivered at {} for a due time of {due} (the send acknowledged at {acked_at})",
        m.store_timestamp
    );
    // Once.
    assert!(drain(&c, Duration::from_millis(1500)).await.is_empty());

    // A level above the top is the top level (4 s here).
    p.send(Message::new("Delayed", "too-high").with_delay_level(99))
        .await
        .unwrap();
    let got = poll_n(&c, 1).await;
    assert_eq!(&got[0].body[..], b"too-high");
    assert_eq!(got[0].delay_applied_ms(), Some(4000));
    assert!(got[0].store_timestamp >= got[0].born_timestamp + 4000);
    c.shutdown().await.unwrap();
    p.shutdown().await;
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_message_arrives_within_a_second_of_its_time() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "sync");
    let p = Producer::new("sched-pg", broker.config()).await.unwrap();
    let base = now_ms();
    // Sent out of time order: they arrive in time order.
    let ats = [base + 2500, base + 1500, base + 2000];
    for (i, at) in ats.iter().enumerate() {
        p.send(Message::new("Timed", format!("timer-{i}")).with_deliver_at(*at))
            .await
            .unwrap();
    }
    let c = consumer(&broker, "sched-g2", "Timed").await;
    let mut got = poll_n(&c, 3).await;
    // Different queues: the stored (delivery) time gives the order.
    got.sort_by_key(|m| m.store_timestamp);
    let bodies: Vec<&[u8]> = got.iter().map(|m| &m.body[..]).collect();
    assert_eq!(bodies, vec![&b"timer-1"[..], b"timer-2", b"timer-0"]);
    for m in &got {
        let i: usize = std::str::from_utf8(&m.body[6..]).unwrap().parse().unwrap();
        assert!(
            m.store_timestamp >= ats[i] && m.store_timestamp <= ats[i] + LATE_BOUND_MS,
            "timer-{i} delivered at {} for {}",
            m.store_timestamp,
            ats[i]
        );
        assert!(!m.properties.contains_key("TIMER_DELIVER_MS"));
    }
    assert!(drain(&c, Duration::from_millis(1000)).await.is_empty());
    c.shutdown().await.unwrap();
    p.shutdown().await;
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_delays_are_refused_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path(), "async");
    let p = Producer::new("sched-pg", broker.config()).await.unwrap();
    p.send(Message::new("Refused", "first")).await.unwrap();
    // timerMaxDelaySec = 600 in this broker's conf.
    let e = p
        .send(Message::new("Refused", "far").with_deliver_at(now_ms() + 3_600_000))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::MessageIllegal(_)) && e.to_string().contains("timerMaxDelaySec"),
        "{e}"
    );
    let e = p
        .send(Message::new("SCHEDULE_TOPIC_XXXX", "sneaky"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("internal"), "{e}");
    // A batch is all or nothing in one queue: delays in it are refused, nothing is stored.
    let e = p
        .send_batch(vec![
            Message::new("Refused", "batch-plain"),
            Message::new("Refused", "batch-delayed").with_delay_level(1),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::MessageIllegal(_)) && e.to_string().contains("batch"),
        "{e}"
    );
    // The waiting messages cannot be read early through the internal topic.
    p.send(Message::new("Refused", "waiting").with_delay_level(3))
        .await
        .unwrap();
    let peek = LitePullConsumer::with_options("sched-peek", broker.config(), from_first())
        .await
        .unwrap();
    let refused = match peek.subscribe("SCHEDULE_TOPIC_XXXX", "*").await {
        Err(e) => e,
        Ok(()) => peek
            .poll(Duration::from_millis(1000))
            .await
            .map(|m| panic!("read the schedule topic: {m:?}"))
            .unwrap_err(),
    };
    assert!(refused.to_string().contains("internal"), "{refused}");
    peek.shutdown().await.unwrap();
    // A time in the past is delivered at once.
    let c = consumer(&broker, "sched-g3", "Refused").await;
    p.send(Message::new("Refused", "past").with_deliver_at(now_ms() - 10_000))
        .await
        .unwrap();
    let got = poll_n(&c, 2).await;
    let past = got.iter().find(|m| &m.body[..] == b"past").expect("past");
    assert_eq!(past.delay_applied_ms(), None);
    assert!(got.iter().any(|m| &m.body[..] == b"first"));
    // Nothing of the refused batch was stored, and the waiting one is not here before its
    // time (a slow machine may have taken the 4 s to get here).
    for m in drain(&c, Duration::from_millis(500)).await {
        assert_eq!(&m.body[..], b"waiting", "{m:?}");
        assert!(m.store_timestamp >= m.born_timestamp + 4000, "{m:?}");
    }
    c.shutdown().await.unwrap();
    p.shutdown().await;
    broker.stop();
}

/// Sends `n` delayed (level 3, 4 s) and `n` timer (5 s) messages; returns body -> UNIQ_KEY.
async fn send_pending(p: &Producer, topic: &str, n: usize) -> HashMap<String, String> {
    let mut sent = HashMap::new();
    let at = now_ms() + 5000;
    for i in 0..n {
        let body = format!("delayed-{i}");
        let r = p
            .send(Message::new(topic, body.clone()).with_delay_level(3))
            .await
            .unwrap();
        sent.insert(body, r.uniq_key);
        let body = format!("timer-{i}");
        let r = p
            .send(Message::new(topic, body.clone()).with_deliver_at(at))
            .await
            .unwrap();
        sent.insert(body, r.uniq_key);
    }
    sent
}

fn assert_exactly_once(got: &[MessageExt], sent: &HashMap<String, String>) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in got {
        let body = String::from_utf8(m.body.to_vec()).unwrap();
        assert_eq!(
            m.uniq_key.as_ref(),
            sent.get(&body),
            "unexpected message {body}"
        );
        *seen.entry(body).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let missing: Vec<_> = sent.keys().filter(|b| !seen.contains_key(*b)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}

async fn restart_case(kill: bool) {
    const N: usize = 25;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let topic = "Pending";
    let broker = start(dir.path(), "sync");
    let p = Producer::new("sched-pg", broker.config()).await.unwrap();
    // A first batch is due and delivered before the restart: it must not come again.
    let early_at = now_ms() + 300;
    let mut early = HashMap::new();
    for i in 0..5 {
        let body = format!("early-{i}");
        let r = p
            .send(Message::new(topic, body.clone()).with_deliver_at(early_at))
            .await
            .unwrap();
        early.insert(body, r.uniq_key);
        let body = format!("early-level-{i}");
        let r = p
            .send(Message::new(topic, body.clone()).with_delay_level(1))
            .await
            .unwrap();
        early.insert(body, r.uniq_key);
    }
    let c = consumer(&broker, "sched-restart", topic).await;
    let first = poll_n(&c, early.len()).await;
    assert_exactly_once(&first, &early);
    c.shutdown().await.unwrap();
    // Let the scheduler persist its progress past the early batch (it does so every second;
    // a crash before that re-delivers the batch, which RocketMQ allows, but this test wants
    // the steady state).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let pending = send_pending(&p, topic, N).await;
    p.shutdown().await;
    if kill {
        broker.signal(libc::SIGKILL);
        drop(broker);
    } else {
        broker.stop();
    }
    let broker = start(dir.path(), "sync");
    // A new group reads the topic from the start: every message, the early ones delivered
    // before the restart and the pending ones after it, is in it exactly once. (The first
    // group's committed offset may itself be lost to a SIGKILL within the 5 s offset flush,
    // as in RocketMQ; that is not what this test is about.)
    let c = consumer(&broker, "sched-after-restart", topic).await;
    let mut want = pending.clone();
    want.extend(early);
    let got = poll_n(&c, want.len()).await;
    let mut all = got.clone();
    all.extend(drain(&c, Duration::from_millis(2000)).await);
    assert_exactly_once(&all, &want);
    c.shutdown().await.unwrap();
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_delayed_and_timer_messages_survive_a_restart_exactly_once() {
    restart_case(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_delayed_and_timer_messages_survive_a_sigkill_exactly_once() {
    restart_case(true).await;
}
