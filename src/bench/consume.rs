//! `bench consume`, and the consumers e2e uses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use orbitmq_client::{
    ClientConfig, ConsumeFromWhere, ConsumeStatus, ConsumerOptions, LitePullConsumer, MessageExt,
    MessageQueue, PushConsumer,
};
use orbitmq_proto::limits::MAX_PULL_MESSAGES;
use tokio::time::Instant;

use super::produce::{self, stamp_of};
use super::{
    error_code, now_us, BenchError, ConsumeArgs, FromWhere, Live, Progress, Report,
    MAX_CONSECUTIVE_FAILURES, PREFILL_BATCH, PREFILL_PRODUCERS, SHUTDOWN_TIMEOUT,
};

/// `bench consume`'s default group.
pub const DEFAULT_GROUP: &str = "bench-consumer";
/// How often a push run looks at the count its listeners keep.
pub const PUSH_CHECK_INTERVAL: Duration = Duration::from_millis(5);

/// Messages one pull asks for per queue: more than the client's default (32) so a pull
/// of a shard's queues carries a few hundred KiB, fewer round trips per message.
pub const DEFAULT_BENCH_PULL_BATCH: u32 = 256;
/// How long one poll waits for messages.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(500);
/// The run ends when no consumer received anything for this long: the topic holds fewer
/// messages than asked for, or the cluster is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How each received message is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// One latency sample per poll that returned messages: how long the poll took.
    PerPoll,
    /// One sample per message: receive time minus its send time (stamp in the body, else
    /// its born timestamp).
    EndToEnd,
}

/// What a set of consumers is to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub topic: String,
    pub group: String,
    pub messages: u64,
    pub consumers: u32,
    pub from: FromWhere,
    pub pull_batch: u32,
    pub measure: Measure,
    pub deadline: Instant,
}

impl Plan {
    /// Where a queue starts when the group has no committed offset.
    fn consume_from(&self) -> ConsumeFromWhere {
        match self.from {
            FromWhere::First => ConsumeFromWhere::FirstOffset,
            FromWhere::Last => ConsumeFromWhere::LastOffset,
        }
    }

    /// Why a run stops early at `now`, `idle` after its last message with `got` received:
    /// the deadline, or [`IDLE_TIMEOUT`] without a message.
    fn time_up(&self, now: Instant, idle: Duration, got: u64) -> Option<String> {
        if now >= self.deadline {
            return Some("the run reached its --deadline".into());
        }
        (idle >= IDLE_TIMEOUT).then(|| {
            format!(
                "no message for {IDLE_TIMEOUT:?}: {got} of {} received",
                self.messages
            )
        })
    }

    pub fn check(&self) -> Result<(), BenchError> {
        if self.consumers == 0 {
            return Err(BenchError::Invalid("--consumers must be at least 1".into()));
        }
        if self.pull_batch == 0 || self.pull_batch > MAX_PULL_MESSAGES {
            return Err(BenchError::Invalid(format!(
                "--pull-batch must be 1..={MAX_PULL_MESSAGES}"
            )));
        }
        Ok(())
    }
}

/// Consumers with their queues assigned and their start positions resolved.
pub struct Ready {
    consumers: Vec<LitePullConsumer>,
    pub queues: usize,
}

/// Makes the consumers and splits the topic's readable queues among them (queue i to
/// consumer i mod C); a first short poll resolves where each queue starts.
pub async fn prepare(plan: &Plan, config: ClientConfig) -> Result<Ready, BenchError> {
    plan.check()?;
    let options = ConsumerOptions {
        consume_from_where: plan.consume_from(),
        pull_batch_size: plan.pull_batch,
        // Runs must repeat: the bench never moves the group's committed offsets.
        auto_commit: false,
        ..ConsumerOptions::default()
    };
    let mut consumers = Vec::with_capacity(plan.consumers as usize);
    for _ in 0..plan.consumers {
        consumers.push(
            LitePullConsumer::with_options(&plan.group, config.clone(), options.clone()).await?,
        );
    }
    let route = consumers[0].client().topic_route(&plan.topic).await?;
    let queues: Vec<MessageQueue> = route.readable().iter().map(|q| q.mq.clone()).collect();
    if queues.is_empty() {
        return Err(BenchError::Invalid(format!(
            "topic {} has no readable queue",
            plan.topic
        )));
    }
    let n = queues.len();
    for (i, c) in consumers.iter().enumerate() {
        let mine: Vec<MessageQueue> = queues
            .iter()
            .enumerate()
            .filter(|(j, _)| j % consumers.len() == i)
            .map(|(_, q)| q.clone())
            .collect();
        c.assign(mine).await?;
    }
    Ok(Ready {
        consumers,
        queues: n,
    })
}

/// Resolves every consumer's start positions (before e2e's producers start). Messages a
/// poll returns meanwhile are counted, not lost.
pub async fn resolve(ready: &Ready, plan: &Plan, live: &Live) -> Result<(), BenchError> {
    for c in &ready.consumers {
        let msgs = c.poll(Duration::from_millis(1)).await?;
        record(plan.measure, live, &msgs, Duration::ZERO);
    }
    Ok(())
}

fn record(measure: Measure, live: &Live, msgs: &[MessageExt], took: Duration) {
    if msgs.is_empty() {
        return;
    }
    let bytes: u64 = msgs.iter().map(|m| m.body.len() as u64).sum();
    let mut s = live.stats();
    match measure {
        Measure::PerPoll => s.record_ok(msgs.len() as u64, bytes, took),
        Measure::EndToEnd => {
            s.record_messages(msgs.len() as u64, bytes);
            let now = now_us();
            for m in msgs {
                let sent = stamp_of(&m.body).unwrap_or(m.born_timestamp * 1000);
                s.record_latency_us(now.saturating_sub(sent));
            }
        }
    }
}

/// Polls until `plan.messages` are received in all, the deadline, or [`IDLE_TIMEOUT`]
/// without a message. `idle_ok` says when idling is the normal end (e2e: every message
/// the producers got acknowledged has arrived). Returns the time from the call to the
/// last message.
pub async fn run_consumers<F>(
    ready: Ready,
    plan: &Plan,
    live: Arc<Live>,
    all_arrived: F,
) -> Duration
where
    F: Fn(u64) -> bool + Send + Sync + 'static,
{
    let start = Instant::now();
    let received = Arc::new(AtomicU64::new(live.stats().messages));
    // Milliseconds since `start` of the last message any consumer got.
    let last_ms = Arc::new(AtomicU64::new(0));
    let all_arrived = Arc::new(all_arrived);
    let mut tasks = Vec::new();
    for (i, c) in ready.consumers.into_iter().enumerate() {
        let (live, received, last_ms, all_arrived) = (
            live.clone(),
            received.clone(),
            last_ms.clone(),
            all_arrived.clone(),
        );
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let mut failures = 0u32;
            let mut finished = start;
            loop {
                let got = received.load(Ordering::Acquire);
                if got >= plan.messages || live.is_done() {
                    break;
                }
                if all_arrived(got) {
                    break;
                }
                let now = Instant::now();
                let idle = (now - start).saturating_sub(Duration::from_millis(
                    last_ms.load(Ordering::Acquire),
                ));
                if let Some(why) = plan.time_up(now, idle, got) {
                    live.stop(why);
                    break;
                }
                let t0 = Instant::now();
                match c.poll(POLL_TIMEOUT).await {
                    Ok(msgs) if !msgs.is_empty() => {
                        finished = Instant::now();
                        failures = 0;
                        record(plan.measure, &live, &msgs, finished - t0);
                        received.fetch_add(msgs.len() as u64, Ordering::AcqRel);
                        last_ms.fetch_max(
                            (finished - start).as_millis() as u64,
                            Ordering::AcqRel,
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let code = error_code(&e);
                        tracing::warn!(consumer = i, error = %e, "poll failed");
                        live.stats().record_error(code, 0);
                        failures += 1;
                        if failures >= MAX_CONSECUTIVE_FAILURES {
                            live.stop(format!(
                                "consumer {i} stopped after {MAX_CONSECUTIVE_FAILURES} failed polls in a row (last: {code})"
                            ));
                            break;
                        }
                        tokio::time::sleep(POLL_TIMEOUT).await;
                    }
                }
            }
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, c.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(consumer = i, "consumer shutdown timed out");
            }
            finished
        }));
    }
    let mut end = start;
    for t in tasks {
        match t.await {
            Ok(f) => end = end.max(f),
            Err(e) => live.stop(format!("a consumer task failed: {e}")),
        }
    }
    end - start
}

/// Push consumers of the plan's topic whose listeners count what they get, until
/// `plan.messages` arrived, the deadline, or [`IDLE_TIMEOUT`] without a message. Returns the
/// time from their start to the last message.
async fn run_push(
    plan: &Plan,
    config: ClientConfig,
    live: Arc<Live>,
) -> Result<Duration, BenchError> {
    let options = ConsumerOptions {
        consume_from_where: plan.consume_from(),
        pull_batch_size: plan.pull_batch,
        ..ConsumerOptions::default()
    };
    let received = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::with_capacity(plan.consumers as usize);
    for _ in 0..plan.consumers {
        let c = PushConsumer::with_options(&plan.group, config.clone(), options.clone()).await?;
        c.subscribe(&plan.topic, "*").await?;
        let (live, received) = (live.clone(), received.clone());
        c.register_listener(move |msgs| {
            let bytes = msgs.iter().map(|m| m.body.len() as u64).sum();
            live.stats().record_messages(msgs.len() as u64, bytes);
            received.fetch_add(msgs.len() as u64, Ordering::AcqRel);
            ConsumeStatus::ConsumeSuccess
        });
        consumers.push(c);
    }
    let start = Instant::now();
    for c in &consumers {
        c.start().await?;
    }
    let (mut seen, mut last) = (0, start);
    loop {
        tokio::time::sleep(PUSH_CHECK_INTERVAL).await;
        let got = received.load(Ordering::Acquire);
        let now = Instant::now();
        if got != seen {
            (seen, last) = (got, now);
        }
        if got >= plan.messages || live.is_done() {
            break;
        }
        if let Some(why) = plan.time_up(now, now - last, got) {
            live.stop(why);
            break;
        }
    }
    for c in consumers {
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, c.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("push consumer shutdown timed out");
        }
    }
    Ok(last - start)
}

/// `orbitmq bench consume`. On an embedded broker (`prefill`) it first sends the messages
/// it will read.
pub async fn run(
    a: ConsumeArgs,
    config: ClientConfig,
    deadline: Instant,
    prefill: bool,
) -> Result<Report, BenchError> {
    let group = if a.push && a.group == DEFAULT_GROUP {
        format!("bench-push-{}", now_us())
    } else {
        a.group.clone()
    };
    let plan = Plan {
        topic: a.common.topic.clone(),
        group,
        messages: a.messages,
        consumers: a.consumers,
        from: a.from,
        pull_batch: a.pull_batch,
        measure: Measure::PerPoll,
        deadline,
    };
    plan.check()?;
    if prefill {
        let p = produce::Plan {
            topic: plan.topic.clone(),
            topics: 1,
            size: a.size,
            messages: a.messages,
            producers: PREFILL_PRODUCERS,
            inflight: super::DEFAULT_INFLIGHT,
            batch: PREFILL_BATCH
                .min((orbitmq_proto::limits::MAX_BATCH_BYTES / a.size.max(1)).max(1) as u32),
            queues: None,
            tag: None,
            rate: None,
            stamp: false,
            deadline,
        };
        eprintln!(
            "orbitmq bench: sending {} messages of {} bytes to read them back",
            p.messages, p.size
        );
        let live = Live::new();
        let progress = Progress::start("prefill", live.clone());
        produce::run_producers(&p, config.clone(), live.clone()).await?;
        drop(progress);
        let s = live.stats();
        if s.messages < p.messages {
            return Err(BenchError::Invalid(format!(
                "prefill sent only {} of {} messages (errors: {:?})",
                s.messages, p.messages, s.errors
            )));
        }
    }
    let live = Live::new();
    let (elapsed, queues, latency_of) = if a.push {
        let progress = Progress::start("consume", live.clone());
        let elapsed = run_push(&plan, config, live.clone()).await?;
        drop(progress);
        (elapsed, "all".to_string(), "not measured (push listener)")
    } else {
        let ready = prepare(&plan, config).await?;
        let queues = ready.queues;
        let progress = Progress::start("consume", live.clone());
        let elapsed = run_consumers(ready, &plan, live.clone(), |_| false).await;
        drop(progress);
        (
            elapsed,
            queues.to_string(),
            "per poll that returned messages",
        )
    };
    let stats = live.stats().clone();
    let mut r = Report::new("consume", plan.messages, &stats, elapsed);
    r.latency_of = latency_of.into();
    r.stopped = live.stopped();
    r.settings = vec![
        ("topic", plan.topic.clone()),
        ("group", plan.group.clone()),
        ("consumer", if a.push { "push" } else { "lite pull" }.into()),
        ("consumers", plan.consumers.to_string()),
        ("queues", queues),
        ("pull_batch", plan.pull_batch.to_string()),
        (
            "from",
            match plan.from {
                FromWhere::First => "first".into(),
                FromWhere::Last => "last".into(),
            },
        ),
    ];
    Ok(r)
}
