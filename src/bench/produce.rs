//! `bench produce`, and the producers the other benches use.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use orbitmq_client::{ClientConfig, Message, MessageQueue, Producer};
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

/// What a set of producers is to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub topic: String,
    pub size: usize,
    pub messages: u64,
    pub producers: u32,
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
        if self.queues == Some(0) || self.rate == Some(0) {
            return bad("--queues and --rate must be at least 1".into());
        }
        Ok(())
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
    // Queues sorted by broker and id: "the first Q" is the same set on every run.
    let route = producers[0].client().topic_route(&plan.topic).await?;
    let mut queues: Vec<MessageQueue> = route.writable().iter().map(|q| q.mq.clone()).collect();
    if queues.is_empty() {
        return Err(BenchError::Invalid(format!(
            "topic {} has no writable queue",
            plan.topic
        )));
    }
    if let Some(q) = plan.queues {
        if q as usize > queues.len() {
            return Err(BenchError::Invalid(format!(
                "--queues {q}: topic {} has {} writable queues",
                plan.topic,
                queues.len()
            )));
        }
        queues.truncate(q as usize);
    }
    // The others look the route up now, so the clock starts with every producer ready.
    for p in &producers[1..] {
        p.client().topic_route(&plan.topic).await?;
    }
    let queues = Arc::new(queues);
    let claims = Arc::new(Claims::new(plan.messages));
    let template = body(plan.size);
    // Each producer's share of the rate: the interval between its requests.
    let interval = plan.rate.map(|r| {
        Duration::from_secs_f64(f64::from(plan.batch) * f64::from(plan.producers) / r as f64)
    });
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(producers.len());
    for (i, producer) in producers.into_iter().enumerate() {
        let w = Worker {
            index: i,
            producer,
            queues: queues.clone(),
            claims: claims.clone(),
            live: live.clone(),
            plan: plan.clone(),
            template: template.clone(),
            interval,
            request_timeout: config.send_timeout + REQUEST_GRACE,
        };
        tasks.push(tokio::spawn(w.run()));
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

struct Worker {
    index: usize,
    producer: Producer,
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
        let mut next_queue = self.index;
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
            let mut msg = Message::new(plan.topic.clone(), body);
            if let Some(t) = &plan.tag {
                msg = msg.with_tags(t.clone());
            }
            let t0 = Instant::now();
            let res = if plan.batch == 1 {
                tokio::time::timeout(self.request_timeout, self.producer.send_to_queue(msg, mq))
                    .await
                    .map(|r| r.map(|_| ()))
            } else {
                let msgs = vec![msg; n as usize];
                tokio::time::timeout(
                    self.request_timeout,
                    self.producer.send_batch_to_queue(msgs, mq),
                )
                .await
                .map(|r| r.map(|_| ()))
            };
            finished = Instant::now();
            let code = match res {
                Ok(Ok(())) => {
                    self.live
                        .stats()
                        .record_ok(n, n * plan.size as u64, finished - t0);
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
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.producer.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(producer = self.index, "producer shutdown timed out");
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
        size: a.size,
        messages: a.messages,
        producers: a.producers,
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
        ("size", plan.size.to_string()),
        ("producers", plan.producers.to_string()),
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

    #[test]
    fn plans_are_checked() {
        let p = Plan {
            topic: "T".into(),
            size: 1024,
            messages: 10,
            producers: 1,
            batch: 64,
            queues: None,
            tag: None,
            rate: None,
            stamp: false,
            deadline: Instant::now(),
        };
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
    }
}
