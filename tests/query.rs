//! Message queries against a real `orbitmq standalone` process (2 shards) over QUIC: by key,
//! by unique key and by message id, through the client and `orbitmq admin message`, before
//! and after a restart; and the errors bad queries get.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use bytes::Bytes;
use common::{broker_with_topics, Broker, BrokerSpec};
use orbitmq_client::{Client, ClientError, Message, MessageExt, Producer, SendResult};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, ErrorResponse, QueryMessageRequest, ViewMessageRequest};
use orbitmq_proto::msgid::OffsetId;

const BIN: &str = env!("CARGO_BIN_EXE_orbitmq");
const TOPIC: &str = "Orders";
const OTHER: &str = "Other";
const N: usize = 120;

fn body(topic: &str, i: usize) -> String {
    format!("{topic}-message-{i}")
}

/// Sends `N` messages to `Orders` (keys `order-<i mod 10>` and `k<i>`) and `N / 4` to
/// `Other` (the same keys): returns the send results of `Orders` by index.
async fn send_all(b: &Broker) -> Vec<SendResult> {
    let p = Producer::new("query-pg", b.config()).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..N {
        let m = Message::new(TOPIC, body(TOPIC, i))
            .with_keys([format!("order-{}", i % 10), format!("k{i}")])
            .with_tags("TagQ");
        sent.push(p.send(m).await.unwrap());
    }
    for i in 0..N / 4 {
        let m = Message::new(OTHER, body(OTHER, i)).with_keys([format!("order-{}", i % 10)]);
        p.send(m).await.unwrap();
    }
    p.shutdown().await;
    sent
}

fn indexes(topic: &str, ms: &[MessageExt]) -> Vec<usize> {
    let mut v: Vec<usize> = ms
        .iter()
        .map(|m| {
            assert_eq!(m.topic, topic);
            let b = String::from_utf8(m.body.to_vec()).unwrap();
            b.strip_prefix(&format!("{topic}-message-"))
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    v.sort_unstable();
    v
}

/// Every message of Orders with key order-3, from both shards (returned).
async fn all_of_order_3(c: &Client) -> Vec<MessageExt> {
    let found = c
        .query_messages(TOPIC, "order-3", 0, u64::MAX, 64)
        .await
        .unwrap();
    assert_eq!(
        indexes(TOPIC, &found),
        (0..N).filter(|i| i % 10 == 3).collect::<Vec<_>>(),
        "every message of Orders with the key, from both shards"
    );
    found
}

async fn check_queries(c: &Client, sent: &[SendResult]) {
    let found = all_of_order_3(c).await;
    assert!(
        found
            .windows(2)
            .all(|w| w[0].store_timestamp <= w[1].store_timestamp),
        "in store time order"
    );
    for m in &found {
        assert!(m.keys.contains(&"order-3".to_string()));
        assert_eq!(m.tags, "TagQ");
    }
    let other = c
        .query_messages(OTHER, "order-3", 0, u64::MAX, 64)
        .await
        .unwrap();
    assert_eq!(indexes(OTHER, &other), vec![3, 13, 23]);
    assert!(c
        .query_messages(TOPIC, "order-none", 0, u64::MAX, 64)
        .await
        .unwrap()
        .is_empty());

    for i in [0, 7, N - 1] {
        let s = &sent[i];
        let by_key = c
            .query_messages(TOPIC, &format!("k{i}"), 0, u64::MAX, 64)
            .await
            .unwrap();
        assert_eq!(indexes(TOPIC, &by_key), vec![i]);
        let by_uniq = c.query_by_unique_key(TOPIC, &s.uniq_key).await.unwrap();
        assert_eq!(indexes(TOPIC, &by_uniq), vec![i]);
        let m = c
            .view_message(&s.msg_id)
            .await
            .unwrap()
            .expect("found by its id");
        assert_eq!(m.body, Bytes::from(body(TOPIC, i)));
        assert_eq!(m.msg_id, s.msg_id);
        assert_eq!(m.uniq_key.as_deref(), Some(s.uniq_key.as_str()));
        assert_eq!(
            (m.queue_id, m.queue_offset),
            (s.queue.queue_id, s.queue_offset)
        );
        assert_eq!(m.broker_name, s.queue.broker_name);
        // An id one byte into the record names no message.
        let mut id = OffsetId::decode(&s.msg_id).unwrap();
        id.offset += 1;
        assert!(c.view_message(&id.encode()).await.unwrap().is_none());
    }
    // The newest `max` of each shard.
    let few = c
        .query_messages(TOPIC, "order-3", 0, u64::MAX, 2)
        .await
        .unwrap();
    assert!(few.len() <= 4 && few.len() >= 2, "{}", few.len());
    // A time range past every message: nothing.
    let later = found.last().unwrap().store_timestamp + 1;
    assert!(c
        .query_messages(TOPIC, "order-3", later, u64::MAX, 64)
        .await
        .unwrap()
        .is_empty());
}

fn error_of(f: &orbitmq_proto::frame::Frame) -> String {
    header::decode::<ErrorResponse>(&f.header).unwrap().message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_found_by_key_unique_key_and_id_before_and_after_a_restart() {
    let (b, dir) = broker_with_topics(&[(TOPIC, 8), (OTHER, 4)], "");
    let sent = send_all(&b).await;
    let c = Client::new(b.config()).await.unwrap();
    check_queries(&c, &sent).await;

    // Bad input gets a clear error.
    match c.view_message("not-an-id").await {
        Err(ClientError::InvalidArgument(_)) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    match c.query_messages("NoSuchTopic", "k1", 0, u64::MAX, 8).await {
        Err(ClientError::TopicNotExist(_)) => {}
        other => panic!("expected TopicNotExist, got {other:?}"),
    }
    let shard = b.shards[0].as_str();
    let ask = |q: QueryMessageRequest| {
        let c = c.clone();
        async move {
            c.request(
                shard,
                request::QUERY_MESSAGE,
                header::encode(&q),
                Bytes::new(),
            )
            .await
            .unwrap()
        }
    };
    let good = QueryMessageRequest {
        topic: TOPIC.into(),
        key: "order-1".into(),
        unique_key: false,
        max_num: 8,
        begin_ms: 0,
        end_ms: u64::MAX,
    };
    let f = ask(good.clone()).await;
    assert_eq!(f.code, response::SUCCESS);
    for (q, code, says) in [
        (
            QueryMessageRequest {
                key: "a b".into(),
                ..good.clone()
            },
            response::BAD_REQUEST,
            "space",
        ),
        (
            QueryMessageRequest {
                max_num: 0,
                ..good.clone()
            },
            response::BAD_REQUEST,
            "max_num",
        ),
        (
            QueryMessageRequest {
                begin_ms: 5,
                end_ms: 4,
                ..good.clone()
            },
            response::BAD_REQUEST,
            "ends",
        ),
        (
            QueryMessageRequest {
                topic: "NoSuchTopic".into(),
                ..good.clone()
            },
            response::TOPIC_NOT_EXIST,
            "NoSuchTopic",
        ),
    ] {
        let f = ask(q).await;
        assert_eq!(f.code, code, "{}", error_of(&f));
        assert!(error_of(&f).contains(says), "{}", error_of(&f));
    }
    let f = c
        .request(
            shard,
            request::QUERY_MESSAGE,
            Bytes::from_static(b"junk"),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(f.code, response::BAD_REQUEST);
    let f = c
        .request(
            shard,
            request::VIEW_MESSAGE_BY_ID,
            header::encode(&ViewMessageRequest { offset: u64::MAX }),
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(f.code, response::QUERY_NOT_FOUND, "{}", error_of(&f));

    // The admin tool prints what the client finds.
    let admin = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["admin", "message"])
            .args(args)
            .args(["--namesrv", &b.namesrv, "--tls-ca"])
            .arg(&b.ca)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (ok, out, err) = admin(&["key", "--topic", TOPIC, "--key", "order-5"]);
    assert!(ok, "{err}");
    assert!(out.ends_with("found=12\n"), "{out}");
    assert_eq!(out.matches("keys=order-5,k").count(), 12, "{out}");
    let (ok, out, err) = admin(&["id", "--id", &sent[9].msg_id]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("msg_id={} ", sent[9].msg_id)),
        "{out}"
    );
    assert!(out.contains(&format!("body={}\n", body(TOPIC, 9))), "{out}");
    let (ok, out, err) = admin(&["unique", "--topic", TOPIC, "--id", &sent[4].uniq_key]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("body={}\n", body(TOPIC, 4))), "{out}");
    assert!(out.ends_with("found=1\n"), "{out}");
    let mut gone = OffsetId::decode(&sent[9].msg_id).unwrap();
    gone.offset += 3;
    let (ok, _, err) = admin(&["id", "--id", &gone.encode()]);
    assert!(!ok);
    assert!(err.contains("no message has the id"), "{err}");
    c.shutdown().await;

    // After a restart the index is read back from its files.
    let data = dir.path().join("data");
    let conf = dir.path().join("broker.conf");
    b.stop();
    let b = BrokerSpec::new(&data, "async").conf(&conf).start();
    let c = Client::new(b.config()).await.unwrap();
    let by_shard: BTreeMap<u16, usize> = sent.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(OffsetId::decode(&s.msg_id).unwrap().shard)
            .or_default() += 1;
        m
    });
    assert_eq!(by_shard.len(), 2, "messages on both shards: {by_shard:?}");
    // Ports are new after the restart: ids name the old ones, so look up by key only.
    all_of_order_3(&c).await;
    for i in [0, 7, N - 1] {
        let by_uniq = c
            .query_by_unique_key(TOPIC, &sent[i].uniq_key)
            .await
            .unwrap();
        assert_eq!(indexes(TOPIC, &by_uniq), vec![i]);
        let again = c.view_message(&by_uniq[0].msg_id).await.unwrap().unwrap();
        assert_eq!(again.body, Bytes::from(body(TOPIC, i)));
    }
    c.shutdown().await;
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_the_index_says_so() {
    let (b, _dir) = broker_with_topics(&[(TOPIC, 2)], "messageIndexEnable = false\n");
    let p = Producer::new("query-pg", b.config()).await.unwrap();
    let s = p
        .send(Message::new(TOPIC, "x").with_key("k"))
        .await
        .unwrap();
    p.shutdown().await;
    let c = Client::new(b.config()).await.unwrap();
    match c.query_messages(TOPIC, "k", 0, u64::MAX, 8).await {
        Err(ClientError::ServiceUnavailable(why)) => {
            assert!(why.contains("messageIndexEnable"), "{why}")
        }
        other => panic!("expected ServiceUnavailable, got {other:?}"),
    }
    // A lookup by id needs no index.
    let m = c.view_message(&s.msg_id).await.unwrap().unwrap();
    assert_eq!(m.body, Bytes::from_static(b"x"));
    c.shutdown().await;
    b.stop();
}
