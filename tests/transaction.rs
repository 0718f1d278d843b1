//! Transactional messages against real `orbitmq standalone` processes (2 shards) over QUIC:
//! commit, rollback, check-back after an unknown outcome, roll back after the last check,
//! a crash with transactions open, and the errors bad END_TRANSACTION requests get.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{broker_with_topics, free_ports, from_first, poll_n, BrokerSpec};
use orbitmq_client::{
    Client, LitePullConsumer, LocalTransactionState, Message, MessageExt, TransactionListener,
    TransactionProducer,
};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, EndTransactionRequest, ErrorResponse};
use orbitmq_proto::msgid::OffsetId;
use orbitmq_proto::record::sys_flag;

const TOPIC: &str = "Pay";
/// Checks every 200 ms, of half messages 1.5 s old (longer than a loaded machine takes to
/// deliver an outcome), at most 3 times.
const TX_CONF: &str =
    "transactionCheckInterval = 200\ntransactionTimeOut = 1500\ntransactionCheckMax = 3\n";

use LocalTransactionState::{CommitMessage, RollbackMessage, Unknown};

/// Answers by body: what the local transaction says, and what a check says.
#[derive(Default)]
struct Ledger {
    answers: Mutex<HashMap<String, (LocalTransactionState, LocalTransactionState)>>,
    checks: Mutex<HashMap<String, u32>>,
}

impl Ledger {
    fn set(&self, body: &str, exec: LocalTransactionState, check: LocalTransactionState) {
        self.answers
            .lock()
            .unwrap()
            .insert(body.to_owned(), (exec, check));
    }
    fn checks(&self, body: &str) -> u32 {
        self.checks.lock().unwrap().get(body).copied().unwrap_or(0)
    }
}

impl TransactionListener for Ledger {
    fn execute_local_transaction(&self, msg: &Message) -> LocalTransactionState {
        let body = String::from_utf8(msg.body.to_vec()).unwrap();
        if body.starts_with("slow-") {
            std::thread::sleep(Duration::from_secs(1));
        }
        self.answers.lock().unwrap()[&body].0
    }
    fn check_local_transaction(&self, msg: &MessageExt) -> LocalTransactionState {
        assert_eq!(msg.topic, TOPIC, "a check shows the real topic");
        let body = String::from_utf8(msg.body.to_vec()).unwrap();
        *self.checks.lock().unwrap().entry(body.clone()).or_default() += 1;
        self.answers.lock().unwrap()[&body].1
    }
}

fn bodies(ms: &[MessageExt]) -> Vec<String> {
    let mut v: Vec<String> = ms
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    v.sort();
    v
}

/// A transactional producer of group `tx-pg` answering from `ledger`, and a consumer of the
/// topic from its first message.
async fn producer_and_consumer(
    b: &common::Broker,
    ledger: &Arc<Ledger>,
) -> (TransactionProducer, LitePullConsumer) {
    let p = TransactionProducer::new("tx-pg", b.config(), ledger.clone())
        .await
        .unwrap();
    let c = LitePullConsumer::with_options("tx-cg", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(TOPIC, "*").await.unwrap();
    (p, c)
}

/// Everything the topic holds now (waits up to `quiet` for more).
async fn visible(c: &LitePullConsumer, want: usize, quiet: Duration) -> Vec<MessageExt> {
    let mut got = poll_n(c, want).await;
    got.extend(c.poll(quiet).await.unwrap());
    got
}

/// An END_TRANSACTION sent by hand; the answer whatever its code.
async fn end_request(
    client: &Client,
    endpoint: &str,
    group: &str,
    half_offset: u64,
    half_queue_offset: u64,
    commit: bool,
) -> orbitmq_proto::frame::Frame {
    let h = header::encode(&EndTransactionRequest {
        producer_group: group.to_owned(),
        half_offset,
        half_queue_offset,
        commit,
        from_check: false,
    });
    client
        .request(endpoint, request::END_TRANSACTION, h, Bytes::new())
        .await
        .unwrap()
}

fn error_of(f: &orbitmq_proto::frame::Frame) -> String {
    header::decode::<ErrorResponse>(&f.header).unwrap().message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_rollback_and_check_back_decide_what_consumers_see() {
    let (b, _dir) = broker_with_topics(&[(TOPIC, 4)], TX_CONF);
    let ledger = Arc::new(Ledger::default());
    let (p, c) = producer_and_consumer(&b, &ledger).await;

    ledger.set("commit-1", CommitMessage, Unknown);
    ledger.set("rollback-1", RollbackMessage, Unknown);
    ledger.set("late-commit", Unknown, CommitMessage);
    ledger.set("late-rollback", Unknown, RollbackMessage);
    ledger.set("never-known", Unknown, Unknown);
    let mut sent = HashMap::new();
    for body in [
        "commit-1",
        "rollback-1",
        "late-commit",
        "late-rollback",
        "never-known",
    ] {
        let m = Message::new(TOPIC, body)
            .with_tags("TagT")
            .with_key(format!("key-{body}"));
        let r = p.send_message_in_transaction(m).await.unwrap();
        assert_eq!(r.local_state, ledger.answers.lock().unwrap()[body].0);
        sent.insert(body, r.send);
    }
    // The committed one at once; the late commit after its check-back; nothing else.
    let got = visible(&c, 2, Duration::from_secs(3)).await;
    assert_eq!(bodies(&got), ["commit-1", "late-commit"]);
    for m in &got {
        assert_eq!(m.topic, TOPIC);
        assert_eq!(m.tags, "TagT");
        let body = String::from_utf8(m.body.to_vec()).unwrap();
        assert_eq!(m.keys, [format!("key-{body}")]);
        assert_eq!(
            m.uniq_key.as_deref(),
            Some(sent[body.as_str()].uniq_key.as_str())
        );
        assert_eq!(
            m.sys_flag & sys_flag::TRANSACTION_MASK,
            sys_flag::TRANSACTION_COMMIT
        );
        assert_eq!(
            m.queue_id,
            sent[body.as_str()].queue.queue_id,
            "its own queue"
        );
    }
    assert_eq!(
        ledger.checks("commit-1"),
        0,
        "an outcome delivered is not checked"
    );
    assert!(ledger.checks("late-commit") >= 1);
    assert!(ledger.checks("late-rollback") >= 1);
    // Never known: checked transactionCheckMax (3) times, then rolled back for good.
    let start = std::time::Instant::now();
    while ledger.checks("never-known") < 3 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ledger.checks("never-known"), 3);
    assert!(c.poll(Duration::from_millis(500)).await.unwrap().is_empty());

    // END_TRANSACTION again: the same outcome is accepted and changes nothing; another
    // outcome, another group, or an offset that is not a half message is refused.
    let client = Client::new(b.config()).await.unwrap();
    let s = &sent["commit-1"];
    let route = client.topic_route(TOPIC).await.unwrap();
    let endpoint = route.find(&s.queue).unwrap().endpoint.clone();
    let end = |commit: bool, group: &'static str, half_offset: u64, half_queue_offset: u64| {
        end_request(
            &client,
            &endpoint,
            group,
            half_offset,
            half_queue_offset,
            commit,
        )
    };
    let half = OffsetId::decode(&s.msg_id).unwrap().offset;
    let f = end(true, "tx-pg", half, s.queue_offset).await;
    assert_eq!(f.code, response::SUCCESS, "{}", error_of(&f));
    let f = end(false, "tx-pg", half, s.queue_offset).await;
    assert_eq!(f.code, response::BAD_REQUEST);
    assert!(error_of(&f).contains("already ended"), "{}", error_of(&f));
    // The one never known was rolled back after its last check: a late commit is refused.
    let nk = &sent["never-known"];
    let nk_endpoint = route.find(&nk.queue).unwrap().endpoint.clone();
    let nk_half = OffsetId::decode(&nk.msg_id).unwrap().offset;
    let f = end_request(
        &client,
        &nk_endpoint,
        "tx-pg",
        nk_half,
        nk.queue_offset,
        true,
    )
    .await;
    assert_eq!(f.code, response::BAD_REQUEST);
    assert!(error_of(&f).contains("Rollback"), "{}", error_of(&f));
    // A pending one (sent by hand below) with a wrong group or offset.
    ledger.set("held", Unknown, Unknown);
    let held = p
        .send_message_in_transaction(Message::new(TOPIC, "held"))
        .await
        .unwrap()
        .send;
    let held_endpoint = route.find(&held.queue).unwrap().endpoint.clone();
    let held_half = OffsetId::decode(&held.msg_id).unwrap().offset;
    let end_held = |commit: bool, group: &'static str, half_offset: u64| {
        end_request(
            &client,
            &held_endpoint,
            group,
            half_offset,
            held.queue_offset,
            commit,
        )
    };
    let f = end_held(true, "other-pg", held_half).await;
    assert_eq!(f.code, response::BAD_REQUEST);
    assert!(
        error_of(&f).contains("another producer group"),
        "{}",
        error_of(&f)
    );
    let f = end_held(true, "tx-pg", held_half + 1).await;
    assert_eq!(f.code, response::BAD_REQUEST, "{}", error_of(&f));
    // Another valid record (another half message) named for this one: refused, so a
    // commit can only store the half message the producer sent.
    for other in ["commit-1", "late-commit", "never-known"] {
        let o = &sent[other];
        let f = end_held(true, "tx-pg", OffsetId::decode(&o.msg_id).unwrap().offset).await;
        assert_eq!(f.code, response::BAD_REQUEST, "{}", error_of(&f));
    }
    let f = client
        .request(
            &held_endpoint,
            request::END_TRANSACTION,
            Bytes::from_static(b"junk"),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(f.code, response::BAD_REQUEST);
    // Committed by hand (as a producer that lost its listener would): visible once.
    let f = end_held(true, "tx-pg", held_half).await;
    assert_eq!(f.code, response::SUCCESS, "{}", error_of(&f));
    let got = visible(&c, 1, Duration::from_secs(2)).await;
    assert_eq!(bodies(&got), ["held"]);
    let f = end_held(true, "tx-pg", held_half).await;
    assert_eq!(f.code, response::SUCCESS, "the same outcome again");
    assert!(
        c.poll(Duration::from_millis(500)).await.unwrap().is_empty(),
        "not twice"
    );

    client.shutdown().await;
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// A broker (sync flush, the topic made, `conf` besides `autoCreateTopicEnable = false`) that
/// can be killed and started again on the same data, ports and name server.
struct Restartable {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    conf: std::path::PathBuf,
    listen: String,
    namesrv: String,
}

impl Restartable {
    fn new(conf: &str) -> Restartable {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("topics.conf"), format!("{TOPIC} 4 4 6\n")).unwrap();
        let path = dir.path().join("broker.conf");
        std::fs::write(&path, format!("autoCreateTopicEnable = false\n{conf}")).unwrap();
        let (port, ns) = free_ports(2);
        Restartable {
            data,
            conf: path,
            listen: format!("127.0.0.1:{port}"),
            namesrv: format!("127.0.0.1:{ns}"),
            _dir: dir,
        }
    }

    fn start(&self) -> common::Broker {
        BrokerSpec::new(&self.data, "sync")
            .conf(&self.conf)
            .on(&self.listen, &self.namesrv)
            .start()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_is_checked_back_after_a_crash() {
    // Checks only after the restart: the timeout outlasts the first run.
    let r = Restartable::new(
        "transactionCheckInterval = 200\ntransactionTimeOut = 2000\ntransactionCheckMax = 1000\n",
    );
    let b = r.start();
    let ledger = Arc::new(Ledger::default());
    ledger.set("open-1", Unknown, CommitMessage);
    ledger.set("open-2", Unknown, RollbackMessage);
    ledger.set("done", CommitMessage, Unknown);
    let p = TransactionProducer::new("tx-pg", b.config(), ledger.clone())
        .await
        .unwrap();
    for body in ["open-1", "done", "open-2"] {
        p.send_message_in_transaction(Message::new(TOPIC, body))
            .await
            .unwrap();
    }
    p.shutdown().await;
    // Killed (SIGKILL: the drop), not stopped: sync flush made every acknowledged half
    // message and outcome durable; nothing else is flushed or recorded at the end.
    drop(b);

    let b = r.start();
    let p = TransactionProducer::new("tx-pg", b.config(), ledger.clone())
        .await
        .unwrap();
    // The new producer is known to the broker once it sends (as RocketMQ's: its heartbeats go
    // to the brokers of the topics it sends to).
    ledger.set("after-restart", CommitMessage, Unknown);
    p.send_message_in_transaction(Message::new(TOPIC, "after-restart"))
        .await
        .unwrap();
    let c = LitePullConsumer::with_options("tx-cg", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(TOPIC, "*").await.unwrap();
    let got = visible(&c, 3, Duration::from_secs(4)).await;
    assert_eq!(
        bodies(&got),
        ["after-restart", "done", "open-1"],
        "each once"
    );
    // Checked after the restart (again each 200 ms until its END arrives, which on a loaded
    // machine may take more than one round).
    assert!(ledger.checks("open-1") >= 1);
    assert!(ledger.checks("open-2") >= 1);
    assert_eq!(ledger.checks("done"), 0, "its outcome survived the restart");
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// Check-backs count across a restart (each is an op record, as RocketMQ counts
/// TRANSACTION_CHECK_TIMES): a half message never answered is rolled back after
/// `transactionCheckMax` checks in all, not that many again after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_count_across_a_restart() {
    const CHECK_MAX: u32 = 4;
    // Checks a second apart, so the producer after the restart is connected for most of them.
    let r = Restartable::new(&format!(
        "transactionCheckInterval = 1000\ntransactionTimeOut = 500\n\
         transactionCheckMax = {CHECK_MAX}\n"
    ));
    let start = || r.start();
    let b = start();
    let ledger = Arc::new(Ledger::default());
    for body in ["before", "after", "after-restart"] {
        ledger.set(body, CommitMessage, Unknown);
    }
    ledger.set("unsure", Unknown, Unknown);
    let p = TransactionProducer::new("tx-count", b.config(), ledger.clone())
        .await
        .unwrap();
    // Transactions that end around it move the op queue's progress past 0 (the restart reads
    // the op queue from the progress).
    let mut unsure = None;
    for body in ["before", "unsure", "after"] {
        let r = p
            .send_message_in_transaction(Message::new(TOPIC, body))
            .await
            .unwrap();
        if body == "unsure" {
            unsure = Some(r.send);
        }
    }
    let unsure = unsure.unwrap();
    let t = std::time::Instant::now();
    while ledger.checks("unsure") < 2 {
        assert!(t.elapsed() < Duration::from_secs(30), "never checked twice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.shutdown().await;
    drop(b); // SIGKILL
    let before = ledger.checks("unsure");

    let b = start();
    let p = TransactionProducer::new("tx-count", b.config(), ledger.clone())
        .await
        .unwrap();
    // Known to the broker once it sends (its heartbeats go to the topic's brokers).
    p.send_message_in_transaction(Message::new(TOPIC, "after-restart"))
        .await
        .unwrap();
    // Past the last check and its rollback: every check would have come by then.
    tokio::time::sleep(Duration::from_millis(1000 * u64::from(CHECK_MAX) + 1500)).await;
    let total = ledger.checks("unsure");
    assert!(
        total <= CHECK_MAX,
        "{total} checks in all ({before} before the crash): at most transactionCheckMax"
    );
    let c = LitePullConsumer::with_options("tx-count-cg", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe(TOPIC, "*").await.unwrap();
    let got = visible(&c, 3, Duration::from_secs(1)).await;
    assert_eq!(bodies(&got), ["after", "after-restart", "before"]);
    assert_eq!(
        ledger.checks("unsure"),
        total,
        "no check after its rollback"
    );
    // It was rolled back: a commit now is refused.
    let client = Client::new(b.config()).await.unwrap();
    let route = client.topic_route(TOPIC).await.unwrap();
    let f = end_request(
        &client,
        &route.find(&unsure.queue).unwrap().endpoint,
        "tx-count",
        OffsetId::decode(&unsure.msg_id).unwrap().offset,
        unsure.queue_offset,
        true,
    )
    .await;
    assert_eq!(f.code, response::BAD_REQUEST);
    assert!(error_of(&f).contains("Rollback"), "{}", error_of(&f));
    client.shutdown().await;
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}

/// Sends `n` raw half messages (one byte each) with `properties` besides `TRAN_MSG` in one
/// request, as a client that does not use `TransactionProducer` might.
async fn raw_half_send(
    client: &Client,
    endpoint: &str,
    properties: &[(&str, &str)],
    n: usize,
) -> orbitmq_proto::frame::Frame {
    use orbitmq_proto::header::{MessageMeta, SendRequest};
    let mut props = vec![("TRAN_MSG".to_owned(), "true".to_owned())];
    props.extend(
        properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let meta = MessageMeta {
        properties: props,
        body_len: 1,
        ..Default::default()
    };
    let h = header::encode(&SendRequest {
        producer_group: "tx-pg".into(),
        topic: TOPIC.into(),
        queue_id: 0,
        messages: vec![meta; n],
    });
    client
        .request(
            endpoint,
            request::SEND_MESSAGE,
            h,
            Bytes::from(vec![b'a'; n]),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactional_batch_is_refused() {
    let (b, _dir) = broker_with_topics(&[(TOPIC, 1)], "");
    let client = Client::new(b.config()).await.unwrap();
    let route = client.topic_route(TOPIC).await.unwrap();
    let endpoint = route.queues[0].endpoint.clone();
    let f = raw_half_send(&client, &endpoint, &[], 2).await;
    assert_eq!(f.code, response::MESSAGE_ILLEGAL);
    assert!(error_of(&f).contains("batch"), "{}", error_of(&f));
    // A half message may not name the broker's own properties either.
    let f = raw_half_send(&client, &endpoint, &[("PGROUP", "someone-else")], 1).await;
    assert_eq!(f.code, response::MESSAGE_ILLEGAL, "{}", error_of(&f));
    // A delay its commit would refuse is refused when the half message is sent.
    let f = raw_half_send(&client, &endpoint, &[("DELAY", "soon")], 1).await;
    assert_eq!(f.code, response::MESSAGE_ILLEGAL, "{}", error_of(&f));
    assert!(error_of(&f).contains("DELAY"), "{}", error_of(&f));
    // The same request without the bad property is a half message like any other.
    let f = raw_half_send(&client, &endpoint, &[], 1).await;
    assert_eq!(f.code, response::SUCCESS, "{}", error_of(&f));
    client.shutdown().await;
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_applies_from_the_commit() {
    let conf = format!("{TX_CONF}messageDelayLevel = 2s\n");
    let (b, _dir) = broker_with_topics(&[(TOPIC, 2)], &conf);
    let ledger = Arc::new(Ledger::default());
    ledger.set("slow-later", CommitMessage, Unknown);
    let (p, c) = producer_and_consumer(&b, &ledger).await;
    let sent = std::time::Instant::now();
    // The local transaction takes 1 s; the 2 s delay runs from its commit.
    p.send_message_in_transaction(Message::new(TOPIC, "slow-later").with_delay_level(1))
        .await
        .unwrap();
    let got = poll_n(&c, 1).await;
    assert_eq!(bodies(&got), ["slow-later"]);
    assert!(
        sent.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(got[0].delay_applied_ms(), Some(2000));
    c.shutdown().await.unwrap();
    p.shutdown().await;
    b.stop();
}
