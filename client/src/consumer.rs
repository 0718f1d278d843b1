//! What both consumers share: options, listener status, and where a queue starts.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::allocate::Strategy;
use crate::client::Client;
use crate::error::Result;
use crate::local_offsets::{LocalOffsets, OffsetStore};
use crate::offset::ConsumeFromWhere;
use crate::rebalance::DEFAULT_REBALANCE_INTERVAL;
use crate::route::MessageQueue;

/// RocketMQ's `pullBatchSize`: messages one pull asks for per queue.
pub const DEFAULT_PULL_BATCH_SIZE: u32 = 32;

/// Pulls a consumer keeps in flight to one broker endpoint (shard) at most: its queues there
/// are split into this many lanes by queue id ([`pull_lane`]), each pulled on its own (the
/// lite consumer's pulls, the push consumer's pull loops; RocketMQ keeps a pull per queue).
/// With one pull for all of them, the broker read a pull's records while the client waited,
/// then the client decoded them while the broker waited: `orbitmq bench consume` of 300k
/// messages went from 118k-121k msgs/s to 166k-183k with four and 255k-257k with eight (one
/// per queue of a default topic).
pub const PULL_LANES_PER_ENDPOINT: u32 = 8;

/// The lane of its endpoint a queue is pulled in: by queue id, so a queue keeps its lane
/// while others come and go.
pub fn pull_lane(mq: &MessageQueue) -> u32 {
    mq.queue_id % PULL_LANES_PER_ENDPOINT
}

/// Bytes one pull response may carry.
pub const DEFAULT_PULL_MAX_BYTES: u32 = 4 * 1024 * 1024;
/// How long the broker holds a pull with nothing to return (RocketMQ: 15 s).
pub const DEFAULT_LONG_POLL_SUSPEND: Duration = Duration::from_secs(15);
/// RocketMQ's `consumeThreadMin`: listener calls running at once.
pub const DEFAULT_CONSUME_THREADS: usize = 20;
/// RocketMQ's `consumeMessageBatchMaxSize`: messages per listener call.
pub const DEFAULT_CONSUME_BATCH_SIZE: usize = 1;
/// Delay before a message the listener asked to reconsume is handed back (locally, until
/// the retry topic exists).
pub const DEFAULT_RECONSUME_DELAY: Duration = Duration::from_secs(1);
/// RocketMQ's `suspendCurrentQueueTimeMillis`: how long an orderly listener's
/// `SuspendCurrentQueueAMoment` holds its queue before the same messages are retried.
pub const DEFAULT_SUSPEND_CURRENT_QUEUE_TIME: Duration = Duration::from_secs(1);
/// Allowed suspend times (RocketMQ: 10 ms to 30 s).
pub const SUSPEND_CURRENT_QUEUE_TIME_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(30);
/// RocketMQ's `maxReconsumeTimes`: send-backs before a message goes to the group's
/// dead-letter topic.
pub const DEFAULT_MAX_RECONSUME_TIMES: u32 = orbitmq_proto::sys::DEFAULT_MAX_RECONSUME_TIMES;
/// Largest `max_reconsume_times` a broker accepts in a send-back.
pub const MAX_RECONSUME_TIMES_LIMIT: u32 = 10_000;
/// RocketMQ's `consumeTimeout` (15 minutes): a listener call running longer counts as
/// failed and its messages are sent back.
pub const DEFAULT_CONSUME_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Shortest consume timeout allowed (RocketMQ counts it in whole minutes; tests need less).
pub const MIN_CONSUME_TIMEOUT: Duration = Duration::from_millis(100);
/// RocketMQ's `persistConsumerOffsetInterval` / `autoCommitIntervalMillis`.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(5);
/// RocketMQ's `pullThresholdForQueue`: pulled, unconsumed messages per queue before pulls
/// of that queue pause.
pub const DEFAULT_MAX_IN_FLIGHT_PER_QUEUE: usize = 1000;
/// RocketMQ's `pullThresholdSizeForQueue` (100 MiB), in body bytes.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES_PER_QUEUE: u64 = 100 * 1024 * 1024;

/// Settings of a consumer (RocketMQ's names in the comments of the defaults).
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Where a queue starts when the group has no committed offset on it.
    pub consume_from_where: ConsumeFromWhere,
    pub pull_batch_size: u32,
    pub pull_max_bytes: u32,
    /// Longest a pull parks at the broker (push consumer; the lite consumer uses its poll
    /// timeout).
    pub long_poll_suspend: Duration,
    pub consume_threads: usize,
    pub consume_batch_size: usize,
    /// Local redelivery delay of a failed message when its send-back to the broker failed
    /// (and, broadcasting, of every failed message: broadcasting sends nothing back).
    pub reconsume_delay: Duration,
    /// Push consumer, clustering: a message whose listener failed this many times more goes
    /// to the group's dead-letter topic (`%DLQ%<group>`) instead of the retry topic.
    pub max_reconsume_times: u32,
    /// Push consumer: a listener call that runs longer counts as `ReconsumeLater` (its
    /// messages are sent back; the call itself cannot be stopped and its result is ignored).
    pub consume_timeout: Duration,
    /// Orderly listener: the pause before messages it suspended are retried in place.
    pub suspend_current_queue_time: Duration,
    /// Orderly listener: a message suspended this many times more goes to the group's
    /// dead-letter topic and the queue moves on; `None` (default, as RocketMQ's orderly
    /// consumers): retried in place without limit.
    pub orderly_max_reconsume_times: Option<u32>,
    pub commit_interval: Duration,
    pub max_in_flight_per_queue: usize,
    pub max_in_flight_bytes_per_queue: u64,
    /// Lite pull consumer: commit the polled positions every `commit_interval` during
    /// `poll`, and on shutdown (RocketMQ's `autoCommit`, default on).
    pub auto_commit: bool,
    /// How the group splits a subscribed topic's queues (RocketMQ's
    /// `allocateMessageQueueStrategy`, default averagely).
    pub allocate: Strategy,
    /// Periodic rebalance (a broker's notice also triggers one at once).
    pub rebalance_interval: Duration,
    /// Clustering (default: each queue to one member) or broadcasting (every member gets
    /// every message; offsets kept in a local file).
    pub message_model: MessageModel,
    /// Broadcasting: the offsets file (default `$HOME/.orbitmq_offsets/<group>/offsets`;
    /// give each broadcasting consumer of a group on one host a file of its own).
    pub local_offset_path: Option<PathBuf>,
}

/// RocketMQ's `MessageModel`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MessageModel {
    #[default]
    Clustering,
    Broadcasting,
}

/// Directory under `$HOME` of the default broadcasting offsets files (RocketMQ:
/// `.rocketmq_offsets`).
pub const LOCAL_OFFSETS_DIR: &str = ".orbitmq_offsets";

/// Checks a new consumer's group and options, and opens where its offsets live: the broker,
/// or (broadcasting) a local file.
pub(crate) fn offset_store(group: &str, o: &ConsumerOptions) -> Result<OffsetStore> {
    crate::client::validate_group("consumer", group)?;
    o.validate()?;
    match o.message_model {
        MessageModel::Clustering => Ok(OffsetStore::Broker),
        MessageModel::Broadcasting => {
            let path = o.local_offset_path.clone().unwrap_or_else(|| {
                let home =
                    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
                home.join(LOCAL_OFFSETS_DIR).join(group).join("offsets")
            });
            Ok(OffsetStore::Local(Mutex::new(LocalOffsets::open(&path)?)))
        }
    }
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            consume_from_where: ConsumeFromWhere::default(),
            pull_batch_size: DEFAULT_PULL_BATCH_SIZE,
            pull_max_bytes: DEFAULT_PULL_MAX_BYTES,
            long_poll_suspend: DEFAULT_LONG_POLL_SUSPEND,
            consume_threads: DEFAULT_CONSUME_THREADS,
            consume_batch_size: DEFAULT_CONSUME_BATCH_SIZE,
            reconsume_delay: DEFAULT_RECONSUME_DELAY,
            max_reconsume_times: DEFAULT_MAX_RECONSUME_TIMES,
            consume_timeout: DEFAULT_CONSUME_TIMEOUT,
            suspend_current_queue_time: DEFAULT_SUSPEND_CURRENT_QUEUE_TIME,
            orderly_max_reconsume_times: None,
            commit_interval: DEFAULT_COMMIT_INTERVAL,
            max_in_flight_per_queue: DEFAULT_MAX_IN_FLIGHT_PER_QUEUE,
            max_in_flight_bytes_per_queue: DEFAULT_MAX_IN_FLIGHT_BYTES_PER_QUEUE,
            auto_commit: true,
            allocate: Strategy::Averagely,
            rebalance_interval: DEFAULT_REBALANCE_INTERVAL,
            message_model: MessageModel::Clustering,
            local_offset_path: None,
        }
    }
}

impl ConsumerOptions {
    pub fn from_where(mut self, w: ConsumeFromWhere) -> ConsumerOptions {
        self.consume_from_where = w;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        use crate::error::ClientError::InvalidArgument;
        use orbitmq_proto::limits::{MAX_PULL_BYTES, MAX_PULL_MESSAGES};
        if self.pull_batch_size == 0 || self.pull_batch_size > MAX_PULL_MESSAGES {
            return Err(InvalidArgument(format!(
                "pull batch size must be 1..={MAX_PULL_MESSAGES}"
            )));
        }
        if self.pull_max_bytes == 0 || self.pull_max_bytes as usize > MAX_PULL_BYTES {
            return Err(InvalidArgument(format!(
                "pull max bytes must be 1..={MAX_PULL_BYTES}"
            )));
        }
        if self.consume_threads == 0 || self.consume_batch_size == 0 {
            return Err(InvalidArgument(
                "consume threads and batch size must be at least 1".into(),
            ));
        }
        if self.max_in_flight_per_queue == 0
            || self.commit_interval.is_zero()
            || self.rebalance_interval.is_zero()
        {
            return Err(InvalidArgument(
                "in-flight limit, commit and rebalance intervals must be positive".into(),
            ));
        }
        if self.max_reconsume_times > MAX_RECONSUME_TIMES_LIMIT {
            return Err(InvalidArgument(format!(
                "max_reconsume_times must be at most {MAX_RECONSUME_TIMES_LIMIT}"
            )));
        }
        if self.consume_timeout < MIN_CONSUME_TIMEOUT {
            return Err(InvalidArgument(format!(
                "consume_timeout must be at least {MIN_CONSUME_TIMEOUT:?}"
            )));
        }
        if self
            .orderly_max_reconsume_times
            .is_some_and(|n| n > MAX_RECONSUME_TIMES_LIMIT)
        {
            return Err(InvalidArgument(format!(
                "orderly_max_reconsume_times must be at most {MAX_RECONSUME_TIMES_LIMIT}"
            )));
        }
        if !(SUSPEND_CURRENT_QUEUE_TIME_RANGE).contains(&self.suspend_current_queue_time) {
            return Err(InvalidArgument(format!(
                "suspend_current_queue_time must be within {SUSPEND_CURRENT_QUEUE_TIME_RANGE:?}"
            )));
        }
        Ok(())
    }
}

/// What a concurrent listener says about the messages it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeStatus {
    ConsumeSuccess,
    /// Hand the messages back later; they are never dropped.
    ReconsumeLater,
}

/// What an orderly listener says about the messages of its queue (RocketMQ's
/// `ConsumeOrderlyStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeOrderlyStatus {
    Success,
    /// Hold the queue for `suspend_current_queue_time`, then retry the same messages (their
    /// `reconsume_times` one higher); nothing after them is consumed meanwhile.
    SuspendCurrentQueueAMoment,
}

/// The first offset to consume on a queue: the group's committed offset, else the start
/// position for new groups.
pub(crate) async fn start_offset(
    client: &Client,
    store: &OffsetStore,
    group: &str,
    mq: &MessageQueue,
    from: ConsumeFromWhere,
) -> Result<(u64, bool)> {
    if let Some(o) = store.read(client, group, mq).await? {
        return Ok((o, true));
    }
    // A retry topic holds only this group's failures: read all of it (RocketMQ does too).
    let from = if mq
        .topic
        .starts_with(orbitmq_proto::sys::RETRY_GROUP_TOPIC_PREFIX)
    {
        ConsumeFromWhere::FirstOffset
    } else {
        from
    };
    let o = match from {
        ConsumeFromWhere::LastOffset => client.max_offset(mq).await?,
        ConsumeFromWhere::FirstOffset => client.min_offset(mq).await?,
        ConsumeFromWhere::Timestamp(ms) => client.search_offset(mq, ms).await?,
    };
    tracing::info!(%group, queue = %mq, offset = o, from = ?from,
        "no committed offset; starting from the configured position");
    Ok((o, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_valid_and_bounds_are_checked() {
        ConsumerOptions::default().validate().unwrap();
        let bad = [
            ConsumerOptions {
                pull_batch_size: 0,
                ..Default::default()
            },
            ConsumerOptions {
                pull_batch_size: orbitmq_proto::limits::MAX_PULL_MESSAGES + 1,
                ..Default::default()
            },
            ConsumerOptions {
                consume_threads: 0,
                ..Default::default()
            },
            ConsumerOptions {
                max_reconsume_times: MAX_RECONSUME_TIMES_LIMIT + 1,
                ..Default::default()
            },
            ConsumerOptions {
                consume_timeout: Duration::from_millis(99),
                ..Default::default()
            },
        ];
        assert_eq!(ConsumerOptions::default().max_reconsume_times, 16);
        assert_eq!(
            ConsumerOptions::default().consume_timeout,
            Duration::from_secs(900)
        );
        for o in bad {
            assert!(o.validate().is_err(), "{o:?}");
        }
        assert_eq!(
            ConsumerOptions::default()
                .from_where(ConsumeFromWhere::FirstOffset)
                .consume_from_where,
            ConsumeFromWhere::FirstOffset
        );
    }
}
