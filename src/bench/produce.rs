//! `bench produce`, and the producers the other benches use.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use orbitmq_client::{
    Client, ClientConfig, ClientError, Message, MessageQueue, Producer, SendStatus,
};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, ClusterInfoResponse, CreateTopicRequest};
use orbitmq_proto::limits::{MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_MESSAGE_SIZE};
use tokio::time::Instant;

use super::{
    error_code, now_us, BenchError, Claims, Live, ProduceArgs, Progress, Report,
    MAX_CONSECUTIVE_FAILURES, PRODUCER_GROUP, REQUEST_GRACE, SHUTDOWN_TIMEOUT,
};

/// Marks a body that starts with its send time (e2e), so a foreign message is not misread.
pub const STAMP_MAGIC: &[u8; 4] = b"OMQB";
/// Magic and a little-endian µs timestamp.
pub const STAMP_LEN: usize = 4 + 8;
/// Most requests one producer may keep in flight (`--inflight`).
pub const MAX_INFLIGHT: u32 = 1024;
/// Most topics one run may spread over (`--topics`): half of what a broker holds, so a run
/// leaves room for the cluster's own topics.
pub const MAX_BENCH_TOPICS: u32 = orbitmq_proto::limits::MAX_TOPICS_PER_BROKER as u32 / 2;
/// Topic creations (and route look-ups) in flight at once before a `--topics` run.
const SETUP_CONCURRENCY: usize = 64;
/// How long a route look-up waits for the name servers to learn a topic just created (the
/// broker registers at once after a topic change; this is one default registration period).
const CREATED_ROUTE_WAIT: Duration = Duration::from_secs(30);
/// Pause between look-ups of a created topic the name servers do not know yet.
const CREATED_ROUTE_RETRY: Duration = Duration::from_millis(200);

/// What a set of producers is to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub topic: String,
    /// 1: `topic` alone; N > 1: topics `<topic>-<i>`, i < N, created before the clock starts.
    pub topics: u32,
    pub size: usize,
    pub messages: u64,
    pub producers: u32,
    /// Requests each producer keeps in flight (its async sends), like Kafka's
    /// `max.in.flight.requests.per.connection` or RocketMQ's async send.
    pub inflight: u32,
    pub batch: u32,
    pub queues: Option<u32>,
    pub tag: Option<String>,
    /// Total msgs/s; `None`: as fast as possible.
    pub rate: Option<u64>,
    /// Start each body with [`STAMP_MAGIC`] and the send time (e2e latency).
    pub stamp: bool,
    pub deadline: Instant,
}

impl Plan {
    pub fn check(&self) -> Result<(), BenchError> {
        let bad = |s: String| Err(BenchError::Invalid(s));
        if self.size == 0 || self.size > MAX_MESSAGE_SIZE {
            return bad(format!("--size must be 1..={MAX_MESSAGE_SIZE}"));
        }
        if self.batch == 0 || self.batch as usize > MAX_BATCH_MESSAGES {
            return bad(format!("--batch must be 1..={MAX_BATCH_MESSAGES}"));
        }
        if self.batch as usize * self.size > MAX_BATCH_BYTES {
            return bad(format!(
                "--batch x --size must be at most {MAX_BATCH_BYTES} bytes per request"
            ));
        }
        if self.producers == 0 {
            return bad("--producers must be at least 1".into());
        }
        if self.inflight == 0 || self.inflight > MAX_INFLIGHT {
            return bad(format!("--inflight must be 1..={MAX_INFLIGHT}"));
        }
        if self.queues == Some(0) || self.rate == Some(0) {
            return bad("--queues and --rate must be at least 1".into());
        }
        if self.topics == 0 || self.topics > MAX_BENCH_TOPICS {
            return bad(format!("--topics must be 1..={MAX_BENCH_TOPICS}"));
        }
        Ok(())
    }

    /// The topics the run sends to.
    pub fn topic_names(&self) -> Vec<String> {
        if self.topics <= 1 {
            vec![self.topic.clone()]
        } else {
            (0..self.topics)
                .map(|i| format!("{}-{i}", self.topic))
                .collect()
        }
    }

    /// "per request (batch of B)" or "per request (single sends)".
    pub fn latency_of(&self) -> String {
        if self.batch > 1 {
            format!("per request (batch of {})", self.batch)
        } else {
            "per request (single sends)".into()
        }
    }
}

/// What the producers did.
pub struct Outcome {
    /// From the first send to the end of the last producer's sends.
    pub elapsed: Duration,
    pub queues: usize,
}

/// A body of `size` bytes: a printable pattern.
fn body(size: usize) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// `template` with the magic and the current time in front (when it has room).
fn stamped(template: &Bytes) -> Bytes {
    if template.len() < STAMP_LEN {
        return template.clone();
    }
    let mut b = BytesMut::with_capacity(template.len());
    b.put_slice(STAMP_MAGIC);
    b.put_u64_le(now_us());
    b.put_slice(&template[STAMP_LEN..]);
    b.freeze()
}

/// The send time in µs a body starts with, if it was stamped by a bench.
pub fn stamp_of(body: &[u8]) -> Option<u64> {
    if body.len() >= STAMP_LEN && &body[..4] == STAMP_MAGIC {
        Some(u64::from_le_bytes(body[4..12].try_into().ok()?))
    } else {
        None
    }
}

/// Makes the producers, looks up the queues, then sends `plan.messages` in all; every
/// result goes to `live`. `started` is told when the first send is about to go (e2e).
pub async fn run_producers(
    plan: &Plan,
    config: ClientConfig,
    live: Arc<Live>,
) -> Result<Outcome, BenchError> {
    plan.check()?;
    let mut producers = Vec::with_capacity(plan.producers as usize);
    for _ in 0..plan.producers {
        producers.push(Producer::new(PRODUCER_GROUP, config.clone()).await?);
    }
    let topics = plan.topic_names();
    if topics.len() > 1 {
        create_topics(producers[0].client(), &topics).await?;
    }
    // Queues sorted by broker and id: "the first Q" is the same set on every run.
    let routes = lookup_routes(producers[0].client(), &topics).await?;
    let mut queues: Vec<MessageQueue> = Vec::new();
    for (topic, route) in topics.iter().zip(&routes) {
        let mut qs: Vec<MessageQueue> = route.writable().iter().map(|q| q.mq.clone()).collect();
        if qs.is_empty() {
            return Err(BenchError::Invalid(format!(
                "topic {topic} has no writable queue"
            )));
        }
        if let Some(q) = plan.queues {
            if q as usize > qs.len() {
                return Err(BenchError::Invalid(format!(
                    "--queues {q}: topic {topic} has {} writable queues",
                    qs.len()
                )));
            }
            qs.truncate(q as usize);
        }
        queues.extend(qs);
    }
    // The others look the routes up now, so the clock starts with every producer ready.
    for p in &producers[1..] {
        lookup_routes(p.client(), &topics).await?;
    }
    let queues = Arc::new(queues);
    let claims = Arc::new(Claims::new(plan.messages));
    let template = body(plan.size);
    let lanes_total = producers.len() * plan.inflight as usize;
    // Each lane's share of the rate: the interval between its requests.
    let interval = plan
        .rate
        .map(|r| Duration::from_secs_f64(f64::from(plan.batch) * lanes_total as f64 / r as f64));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(producers.len());
    for (i, producer) in producers.into_iter().enumerate() {
        let producer = Arc::new(producer);
        let lanes: Vec<Worker> = (0..plan.inflight as usize)
            .map(|j| {
                let lane = i * plan.inflight as usize + j;
                Worker {
                    index: i,
                    // Lanes start spread over the queues (and topics), not on neighbours.
                    first_queue: lane * queues.len() / lanes_total,
                    producer: producer.clone(),
                    queues: queues.clone(),
                    claims: claims.clone(),
                    live: live.clone(),
                    plan: plan.clone(),
                    template: template.clone(),
                    interval,
                    request_timeout: config.send_timeout + REQUEST_GRACE,
                }
            })
            .collect();
        tasks.push(tokio::spawn(run_producer(producer, lanes)));
    }
    let mut end = start;
    for t in tasks {
        match t.await {
            Ok(finished) => end = end.max(finished),
            Err(e) => live.stop(format!("a producer task failed: {e}")),
        }
    }
    Ok(Outcome {
        elapsed: end - start,
        queues: queues.len(),
    })
}

/// Creates `topics` (broker default queues and permissions) on every master broker the name
/// servers know, so the run measures sends and not auto-creation.
async fn create_topics(client: &Client, topics: &[String]) -> Result<(), BenchError> {
    let f = client
        .call_name_server(request::GET_BROKER_CLUSTER_INFO, Bytes::new(), "")
        .await?;
    let info: ClusterInfoResponse =
        header::decode(&f.header).map_err(|e| BenchError::Invalid(format!("cluster info: {e}")))?;
    let masters: Vec<String> = info
        .clusters
        .into_iter()
        .flat_map(|(_, brokers)| brokers)
        .filter_map(|b| {
            b.broker
                .addrs
                .into_iter()
                .find(|(id, _)| *id == 0)
                .map(|(_, a)| a)
        })
        .collect();
    if masters.is_empty() {
        return Err(BenchError::Invalid(
            "the name servers know no master broker to create the topics on".into(),
        ));
    }
    let create = |topic: String, addr: String| {
        let client = client.clone();
        async move {
            let h = header::encode(&CreateTopicRequest {
                topic,
                read_queues: 0,
                write_queues: 0,
                perm: 0,
            });
            let f = client
                .request(&addr, request::UPDATE_AND_CREATE_TOPIC, h, Bytes::new())
                .await?;
            if f.code != response::SUCCESS {
                return Err(ClientError::from_response(f.code, &f.header, ""));
            }
            Ok(())
        }
    };
    let jobs: Vec<(String, String)> = topics
        .iter()
        .flat_map(|t| masters.iter().map(move |m| (t.clone(), m.clone())))
        .collect();
    for chunk in jobs.chunks(SETUP_CONCURRENCY) {
        let mut set = tokio::task::JoinSet::new();
        for (t, m) in chunk {
            set.spawn(create(t.clone(), m.clone()));
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| BenchError::Invalid(format!("topic creation task: {e}")))??;
        }
    }
    eprintln!(
        "orbitmq bench: created {} topics on {} broker(s)",
        topics.len(),
        masters.len()
    );
    Ok(())
}

/// The routes of `topics`, in order (looked up concurrently, cached by the client).
async fn lookup_routes(
    client: &Client,
    topics: &[String],
) -> Result<Vec<Arc<orbitmq_client::TopicRoute>>, BenchError> {
    let mut routes = Vec::with_capacity(topics.len());
    for chunk in topics.chunks(SETUP_CONCURRENCY) {
        let mut set = tokio::task::JoinSet::new();
        for (i, t) in chunk.iter().enumerate() {
            let (client, t) = (client.clone(), t.clone());
            set.spawn(async move {
                let until = Instant::now() + CREATED_ROUTE_WAIT;
                loop {
                    match client.topic_route(&t).await {
                        Err(ClientError::TopicNotExist(_)) if Instant::now() < until => {
                            tokio::time::sleep(CREATED_ROUTE_RETRY).await
                        }
                        r => return (i, r),
                    }
                }
            });
        }
        let mut got: Vec<Option<Arc<orbitmq_client::TopicRoute>>> = vec![None; chunk.len()];
        while let Some(r) = set.join_next().await {
            let (i, route) =
                r.map_err(|e| BenchError::Invalid(format!("route look-up task: {e}")))?;
            got[i] = Some(route?);
        }
        routes.extend(got.into_iter().flatten());
    }
    Ok(routes)
}

/// One producer: its lanes (requests in flight) run concurrently; then it shuts down.
/// Returns when its last send ended.
async fn run_producer(producer: Arc<Producer>, lanes: Vec<Worker>) -> Instant {
    let index = lanes.first().map_or(0, |w| w.index);
    let mut set = tokio::task::JoinSet::new();
    for w in lanes {
        set.spawn(w.run());
    }
    let mut finished = Instant::now();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(f) => finished = finished.max(f),
            Err(e) => tracing::warn!(producer = index, error = %e, "a producer lane failed"),
        }
    }
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, producer.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(producer = index, "producer shutdown timed out");
    }
    finished
}

/// One request stream of a producer.
struct Worker {
    index: usize,
    first_queue: usize,
    producer: Arc<Producer>,
    queues: Arc<Vec<MessageQueue>>,
    claims: Arc<Claims>,
    live: Arc<Live>,
    plan: Plan,
    template: Bytes,
    interval: Option<Duration>,
    request_timeout: Duration,
}

impl Worker {
    /// Sends until no claim is left, the deadline passes or the cluster keeps failing;
    /// returns when its last send ended.
    async fn run(self) -> Instant {
        let plan = &self.plan;
        let mut failures = 0u32;
        // Producers start on different queues so they do not move in lockstep.
        let mut next_queue = self.first_queue;
        let mut next_send = Instant::now();
        let mut finished = Instant::now();
        loop {
            if self.live.is_done() {
                break;
            }
            if Instant::now() >= plan.deadline {
                self.live.stop("the run reached its --deadline".into());
                break;
            }
            if let Some(iv) = self.interval {
                tokio::time::sleep_until(next_send).await;
                let now = Instant::now();
                next_send += iv;
                // Behind by more than one request: do not burst to catch up.
                if next_send + iv < now {
                    next_send = now;
                }
            }
            let n = self.claims.take(u64::from(plan.batch));
            if n == 0 {
                break;
            }
            let mq = &self.queues[next_queue % self.queues.len()];
            next_queue = next_queue.wrapping_add(1);
            let body = if plan.stamp {
                stamped(&self.template)
            } else {
                self.template.clone()
            };
            let mut msg = Message::new(mq.topic.clone(), body);
            if let Some(t) = &plan.tag {
                msg = msg.with_tags(t.clone());
            }
            let t0 = Instant::now();
            let res = if plan.batch == 1 {
                tokio::time::timeout(self.request_timeout, self.producer.send_to_queue(msg, mq))
                    .await
                    .map(|r| r.map(|s| s.status))
            } else {
                let msgs = vec![msg; n as usize];
                tokio::time::timeout(
                    self.request_timeout,
                    self.producer.send_batch_to_queue(msgs, mq),
                )
                .await
                .map(|r| r.map(|s| s.first().map(|s| s.status).unwrap_or_default()))
            };
            finished = Instant::now();
            let code = match res {
                Ok(Ok(status)) => {
                    let mut stats = self.live.stats();
                    stats.record_ok(n, n * plan.size as u64, finished - t0);
                    // Stored, but not copied as a SYNC_MASTER promises: listed by status.
                    if status != SendStatus::SendOk {
                        stats.record_status(status.name());
                    }
                    failures = 0;
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::debug!(producer = self.index, queue = %mq, error = %e, "send failed");
                    error_code(&e)
                }
                Err(_) => "Timeout",
            };
            self.live.stats().record_error(code, n);
            failures += 1;
            if failures >= MAX_CONSECUTIVE_FAILURES {
                self.live.stop(format!(
                    "producer {} stopped after {MAX_CONSECUTIVE_FAILURES} failed requests in a row (last: {code})",
                    self.index
                ));
                break;
            }
        }
        finished
    }
}

/// `orbitmq bench produce`.
pub async fn run(
    a: ProduceArgs,
    config: ClientConfig,
    deadline: Instant,
) -> Result<Report, BenchError> {
    let plan = Plan {
        topic: a.common.topic.clone(),
        topics: a.topics,
        size: a.size,
        messages: a.messages,
        producers: a.producers,
        inflight: a.inflight,
        batch: a.batch,
        queues: a.queues,
        tag: a.tag.clone(),
        rate: a.rate,
        stamp: false,
        deadline,
    };
    plan.check()?;
    let live = super::Live::new();
    let progress = Progress::start("produce", live.clone());
    let outcome = run_producers(&plan, config, live.clone()).await?;
    drop(progress);
    let stats = live.stats().clone();
    let mut r = Report::new("produce", plan.messages, &stats, outcome.elapsed);
    r.latency_of = plan.latency_of();
    r.stopped = live.stopped();
    r.settings = vec![
        ("topic", plan.topic.clone()),
        ("topics", plan.topics.to_string()),
        ("size", plan.size.to_string()),
        ("producers", plan.producers.to_string()),
        ("inflight", plan.inflight.to_string()),
        ("batch", plan.batch.to_string()),
        ("queues", outcome.queues.to_string()),
        (
            "rate",
            plan.rate.map_or("max".to_string(), |r| r.to_string()),
        ),
    ];
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_foreign_bodies_have_none() {
        let t = body(64);
        assert_eq!(t.len(), 64);
        let before = now_us();
        let s = stamped(&t);
        assert_eq!(s.len(), 64);
        let at = stamp_of(&s).expect("stamped");
        assert!(at >= before && at <= now_us());
        assert_eq!(&s[STAMP_LEN..], &t[STAMP_LEN..]);
        assert_eq!(stamp_of(&t), None);
        assert_eq!(stamp_of(&stamped(&body(8))), None, "too small to stamp");
    }

    /// A valid plan: one topic, 10 messages of 1 KiB in batches of 64, one producer.
    fn plan() -> Plan {
        Plan {
            topic: "T".into(),
            topics: 1,
            size: 1024,
            messages: 10,
            producers: 1,
            inflight: 1,
            batch: 64,
            queues: None,
            tag: None,
            rate: None,
            stamp: false,
            deadline: Instant::now(),
        }
    }

    #[test]
    fn plans_are_checked() {
        let p = plan();
        assert!(p.check().is_ok());
        assert_eq!(p.latency_of(), "per request (batch of 64)");
        assert!(Plan {
            batch: 0,
            ..p.clone()
        }
        .check()
        .is_err());
        assert!(Plan {
            size: 0,
            ..p.clone()
        }
        .check()
        .is_err());
        assert!(Plan {
            size: MAX_MESSAGE_SIZE,
            batch: 2,
            ..p.clone()
        }
        .check()
        .is_err());
        assert!(Plan {
            queues: Some(0),
            ..p.clone()
        }
        .check()
        .is_err());
        assert!(Plan {
            topics: 0,
            ..p.clone()
        }
        .check()
        .is_err());
    }

    #[test]
    fn many_topics_are_named_after_the_topic() {
        let p = Plan {
            topics: 3,
            ..plan()
        };
        assert_eq!(p.topic_names(), vec!["T-0", "T-1", "T-2"]);
        assert_eq!(Plan { topics: 1, ..p }.topic_names(), vec!["T"]);
    }
}
