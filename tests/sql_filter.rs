//! SQL92 message filters (RocketMQ's `MessageSelector.bySql`) against a real broker process:
//! a consumer gets exactly the messages whose properties match, in queue order; bad filters
//! get a clear error from the client and from the broker; `enablePropertyFilter = false`
//! refuses them; `orbitmq send --prop` and `orbitmq consume --sql` do the same from a terminal.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{from_first, poll_n, run, run_ok, Broker, BrokerSpec};
use orbitmq_client::{
    Client, ClientError, LitePullConsumer, Message, Producer, PullStatus, PullTarget, QueueInfo,
    SubExpr,
};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{self, ErrorResponse, PullQueue, PullRequest, PullResponse};
use orbitmq_proto::sql::EXPR_TYPE_SQL92;

const TOPIC: &str = "Filtered";
const SENT: usize = 60;
/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(1500);

/// Message `i`: property `n` = i (none for every tenth), `color` red / green / blue, tag T0
/// or T1.
fn message(i: usize) -> Message {
    let colors = ["red", "green", "blue"];
    let mut m = Message::new(TOPIC, format!("m-{i}"))
        .with_tags(format!("T{}", i % 2))
        .with_property("color", colors[i % 3]);
    if i % 10 != 9 {
        m = m.with_property("n", i.to_string());
    }
    m
}

const FILTER: &str = "n BETWEEN 10 AND 40 AND color IN ('red', 'blue') AND TAGS = 'T0'";

/// What [`FILTER`] selects of message `i`, written out in Rust.
fn selected(i: usize) -> bool {
    i % 10 != 9 && (10..=40).contains(&i) && i % 3 != 1 && i.is_multiple_of(2)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A PULL_MESSAGE of queue `q` from offset 0 with this expression, sent as is.
async fn raw_pull(client: &Client, q: &QueueInfo, expr: &str, expr_type: u8) -> Frame {
    let h = header::encode(&PullRequest {
        group: "sql-raw".into(),
        queues: vec![PullQueue {
            topic: TOPIC.into(),
            queue_id: q.mq.queue_id,
            offset: 0,
            max_msgs: 1024,
            sub_expr: expr.into(),
            expr_type,
        }],
        max_bytes: 1 << 20,
        suspend_ms: 0,
    });
    client
        .request(&q.endpoint, request::PULL_MESSAGE, h, Bytes::new())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sql92_subscription_gets_exactly_the_matching_messages_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(&dir.path().join("data"), "async");
    let p = Producer::new("sql-pg", b.config()).await.unwrap();
    for i in 0..SENT {
        p.send(message(i)).await.unwrap();
    }
    p.shutdown().await;
    let want: Vec<String> = (0..SENT)
        .filter(|i| selected(*i))
        .map(|i| format!("m-{i}"))
        .collect();
    assert!(want.len() > 3 && want.len() < SENT / 4, "{want:?}");

    let c = LitePullConsumer::with_options("sql-cg", b.config(), from_first())
        .await
        .unwrap();
    c.subscribe_with(TOPIC, SubExpr::sql(FILTER).unwrap())
        .await
        .unwrap();
    let mut got = poll_n(&c, want.len()).await;
    got.extend(c.poll(QUIET).await.unwrap());
    let mut per_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for m in &got {
        per_queue
            .entry(m.queue_id)
            .or_default()
            .push(m.queue_offset);
    }
    for (q, offsets) in &per_queue {
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "queue {q}: {offsets:?}"
        );
    }
    let mut bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    bodies.sort_by_key(|b| b[2..].parse::<usize>().unwrap());
    assert_eq!(bodies, want, "exactly the matching messages, once");
    c.shutdown().await.unwrap();

    // A bad filter: the client refuses it with the parser's reason.
    let e = SubExpr::sql("n BETWEEN 'a' AND 3").unwrap_err();
    assert!(
        matches!(&e, ClientError::InvalidArgument(m) if m.contains("expected a number")),
        "{e}"
    );
    // So does the broker, to a client that sends one anyway, and to an unknown type.
    let client = Client::new(b.config()).await.unwrap();
    let route = client.topic_route(TOPIC).await.unwrap();
    let q = &route.queues[0];
    // A filter that does not parse: that queue answers SUBSCRIPTION_PARSE_FAILED with the
    // reason (the pull's other queues would be served).
    let f = raw_pull(&client, q, "n >", EXPR_TYPE_SQL92).await;
    assert_eq!(f.code, response::SUCCESS);
    let r = &header::decode::<PullResponse>(&f.header).unwrap().queues[0];
    assert_eq!(r.status, response::SUBSCRIPTION_PARSE_FAILED);
    assert!(
        r.reason.contains("expected a property or a constant"),
        "{}",
        r.reason
    );
    // An unknown expression type is a malformed request.
    let f = raw_pull(&client, q, "*", 7).await;
    assert_eq!(f.code, response::BAD_REQUEST);
    let message = header::decode::<ErrorResponse>(&f.header).unwrap().message;
    assert!(message.contains("unknown expression type 7"), "{message}");
    // The broker filters (the client checks again, so only the raw answer shows it): of all
    // queues, one record matches.
    let mut returned = 0;
    for q in &route.queues {
        let f = raw_pull(&client, q, "n = 10", EXPR_TYPE_SQL92).await;
        assert_eq!(f.code, response::SUCCESS);
        let r = header::decode::<PullResponse>(&f.header).unwrap();
        returned += r.queues[0].count;
    }
    assert_eq!(returned, 1, "the broker sent only the matching record");
    client.shutdown().await;

    // From a terminal: properties on the way in, a filter on the way out.
    let ns = b.namesrv.clone();
    let ca = b.ca.display().to_string();
    let cli = |cmd: &'static str, rest: &[&'static str]| -> Vec<String> {
        let mut args: Vec<String> = [
            cmd,
            "--namesrv",
            &ns,
            "--tls-ca",
            &ca,
            "--topic",
            "CliFiltered",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(rest.iter().map(|a| a.to_string()));
        args
    };
    for (body, prop) in [("cli-low", "price=5"), ("cli-high", "price=500")] {
        run_ok(&strs(&cli("send", &["--body", body, "--prop", prop])));
    }
    let consume = |sql: &'static str, secs: &'static str| {
        cli(
            "consume",
            &["--group", "sql-cli", "--sql", sql, "--timeout-secs", secs],
        )
    };
    let out = run_ok(&strs(&consume("price > 100", "3")));
    let bodies: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split(" body=").nth(1))
        .collect();
    assert_eq!(bodies, ["cli-high"], "{out}");
    let bad = run(&strs(&consume("price >", "1")));
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("SQL92 filter"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_with_enable_property_filter_false_refuses_sql92() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("broker.conf");
    std::fs::write(&conf, "enablePropertyFilter = false\n").unwrap();
    let b = BrokerSpec::new(&dir.path().join("data"), "async")
        .conf(&conf)
        .start();
    let client = Client::new(b.config()).await.unwrap();
    let p = Producer::new("sql-pg", b.config()).await.unwrap();
    p.send(message(1)).await.unwrap();
    // Two queues of one shard, each with a message: one pulled with SQL92, one with tags,
    // in one pull.
    let route = client.topic_route(TOPIC).await.unwrap();
    let (a, c) = route
        .queues
        .iter()
        .flat_map(|a| route.queues.iter().map(move |c| (a, c)))
        .find(|(a, c)| a.endpoint == c.endpoint && a.mq != c.mq)
        .expect("two queues of one shard");
    for q in [a, c] {
        p.send_to_queue(message(2), &q.mq).await.unwrap();
    }
    p.shutdown().await;
    let target = |q: &QueueInfo, expr: SubExpr| PullTarget {
        queue: q.clone(),
        offset: 0,
        max_msgs: 32,
        expr: Arc::new(expr),
    };
    let got = client
        .pull(
            &a.endpoint,
            "sql-off",
            &[
                target(a, SubExpr::sql("n > 0").unwrap()),
                target(c, SubExpr::parse("*").unwrap()),
            ],
            1 << 20,
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert_eq!(
        got[0].status,
        PullStatus::Other(response::SUBSCRIPTION_PARSE_FAILED)
    );
    assert!(
        got[0].reason.contains("enablePropertyFilter = false"),
        "{}",
        got[0].reason
    );
    // The refused queue does not hold back the other.
    assert_eq!(got[1].status, PullStatus::Found);
    assert!(!got[1].messages.is_empty());
    client.shutdown().await;
    b.stop();
}
