//! `bench e2e`: producers (at `--rate`) and consumers together; the latency of each message
//! is its receive time minus its send time, both on this host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use orbitmq_client::ClientConfig;
use tokio::time::Instant;

use super::consume::{self, Measure};
use super::produce;
use super::{BenchError, E2eArgs, FromWhere, Live, Progress, Report};

/// `orbitmq bench e2e`.
pub async fn run(
    a: E2eArgs,
    config: ClientConfig,
    deadline: Instant,
) -> Result<Report, BenchError> {
    let pplan = produce::Plan {
        topic: a.common.topic.clone(),
        topics: 1,
        size: a.size,
        messages: a.messages,
        producers: a.producers,
        inflight: 1,
        batch: a.batch,
        queues: a.queues,
        tag: None,
        rate: a.rate,
        stamp: true,
        deadline,
    };
    pplan.check()?;
    let cplan = consume::Plan {
        topic: a.common.topic.clone(),
        group: a.group.clone(),
        messages: a.messages,
        consumers: a.consumers,
        // Only what this run sends.
        from: FromWhere::Last,
        pull_batch: a.pull_batch,
        measure: Measure::EndToEnd,
        deadline,
    };
    cplan.check()?;
    let received = Live::new();
    let sent = Live::new();
    // Consumers first, positioned at the queues' ends, so no message of this run is missed.
    let ready = consume::prepare(&cplan, config.clone()).await?;
    consume::resolve(&ready, &cplan, &received).await?;
    let queues = ready.queues;
    let progress = Progress::start("e2e", received.clone());
    let producers_done = Arc::new(AtomicBool::new(false));
    let consumers = {
        let (received, sent, done, cplan) = (
            received.clone(),
            sent.clone(),
            producers_done.clone(),
            cplan.clone(),
        );
        tokio::spawn(async move {
            // Once the producers are done, the consumers stop when all they got
            // acknowledged has arrived (a message that failed to send never will).
            let all_arrived =
                move |got: u64| done.load(Ordering::Acquire) && got >= sent.stats().messages;
            consume::run_consumers(ready, &cplan, received, all_arrived).await
        })
    };
    let produced = produce::run_producers(&pplan, config, sent.clone()).await;
    producers_done.store(true, Ordering::Release);
    if produced.is_err() {
        received.finish();
    }
    let elapsed = match consumers.await {
        Ok(e) => e,
        Err(e) => {
            return Err(BenchError::Invalid(format!(
                "the consumer task failed: {e}"
            )))
        }
    };
    drop(progress);
    let outcome = produced?;
    let mut stats = received.stats().clone();
    let sent_stats = sent.stats().clone();
    // Errors of both sides; the send latencies stay out of the end-to-end histogram.
    for (k, v) in &sent_stats.errors {
        *stats.errors.entry(k.clone()).or_insert(0) += v;
    }
    stats.failed_messages += sent_stats.failed_messages;
    let mut r = Report::new("e2e", pplan.messages, &stats, elapsed);
    r.latency_of = "per message, receive time - send time (µs stamp in the body)".into();
    r.stopped = sent.stopped().or_else(|| received.stopped());
    r.extra = vec![
        ("sent", sent_stats.messages),
        ("send_p99_us", sent_stats.percentile_us(99.0)),
    ];
    r.settings = vec![
        ("topic", pplan.topic.clone()),
        ("size", pplan.size.to_string()),
        ("producers", pplan.producers.to_string()),
        ("consumers", cplan.consumers.to_string()),
        ("batch", pplan.batch.to_string()),
        ("queues", outcome.queues.to_string()),
        ("read_queues", queues.to_string()),
        (
            "rate",
            pplan.rate.map_or("max".to_string(), |r| r.to_string()),
        ),
    ];
    Ok(r)
}
