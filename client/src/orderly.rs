//! Orderly consumption for the push consumer (RocketMQ's `ConsumeMessageOrderlyService` and
//! the client half of `RebalanceLockManager`).
//!
//! - A queue is consumed only while this client holds its lock on the queue's broker: a new
//!   queue is locked before it is added (and its start offset read after the lock, so the
//!   previous owner's final commit is seen); held locks are renewed every
//!   [`LOCK_RENEW_INTERVAL`]; a queue whose lock was lost is neither pulled nor consumed, and
//!   starts again from the committed offset when the lock comes back.
//! - One task per queue hands the listener the queue's messages in offset order, one call at
//!   a time; `SuspendCurrentQueueAMoment` keeps the same messages at the head of the queue and
//!   retries them after `suspend_current_queue_time`, so nothing behind them is consumed first.
//! - A dropped queue (rebalance) stops consuming, waits for the call in progress, commits,
//!   and only then unlocks, so the next owner starts where this one ended; a call that
//!   outlasts [`DROP_CONSUME_WAIT`] keeps the queue locked (renewed) until it ends. Shutdown
//!   commits and unlocks every queue.
//!
//! A child module of `push`, so it works on the push consumer's state directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_proto::codes::request;
use orbitmq_proto::header::{self, LockBatchRequest, LockBatchResponse, LockQueue};

use super::{sleep_or_shutdown, ActiveGuard, Inner};
use crate::client::Client;
use crate::consumer::{start_offset, ConsumeOrderlyStatus, MessageModel};
use crate::error::{bad_header, Result};
use crate::filter::SubExpr;
use crate::message::MessageExt;
use crate::route::{MessageQueue, QueueInfo};

/// RocketMQ's `rebalanceLockInterval`: how often held queue locks are renewed (the broker
/// keeps a lock 60 s after its last renewal).
pub const LOCK_RENEW_INTERVAL: Duration = Duration::from_secs(20);
/// RocketMQ's `REBALANCE_LOCK_MAX_LIVE_TIME` on the client: a lock not renewed for this long
/// is treated as lost (half the broker's expiry, so the broker never hands the queue to
/// another member while this one still consumes it).
pub const CLIENT_LOCK_MAX_LIVE: Duration = Duration::from_secs(30);
/// How soon a queue of this consumer's share that another member still holds is asked for
/// again (that member is dropping it after a rebalance; RocketMQ waits for the next
/// rebalance, 20 s).
pub const LOCK_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often a queue task whose lock is not (yet) valid looks again.
pub const LOCK_WAIT_RECHECK: Duration = Duration::from_millis(200);
/// A send-back's delay level that sends the message straight to the dead-letter topic.
pub const DEAD_LETTER_DELAY_LEVEL: i32 = -1;
/// How long dropping a queue waits for its listener call in progress before it leaves the
/// queue draining: locked and renewed until the call ends, then unlocked.
pub const DROP_CONSUME_WAIT: Duration = Duration::from_secs(5);

/// An orderly listener: called with messages of one queue, in offset order, never twice at
/// once for one queue.
pub type OrderlyListener =
    Arc<dyn Fn(&[MessageExt]) -> ConsumeOrderlyStatus + Send + Sync + 'static>;

/// The orderly half of the push consumer's state.
#[derive(Default)]
pub(crate) struct Orderly {
    pub(crate) listener: Mutex<Option<OrderlyListener>>,
    queues: Mutex<HashMap<MessageQueue, Arc<OrderlyQueue>>>,
    /// A queue of this consumer's share was held by another member: rebalance again soon.
    retry_pending: AtomicBool,
    /// Renewals and releases one at a time, so a renewal never re-locks a queue just released.
    lock_ops: tokio::sync::Mutex<()>,
    /// Dropped queues whose listener call outlasted [`DROP_CONSUME_WAIT`]: their locks are
    /// renewed until the call ends, then released (RocketMQ keeps such a queue too), so no
    /// other member starts on the queue while this call still runs.
    draining: Mutex<Vec<(QueueInfo, Arc<OrderlyQueue>)>>,
}

struct QueueState {
    /// Pulled, not yet consumed, by offset (RocketMQ's `msgTreeMap`).
    buffer: BTreeMap<u64, MessageExt>,
    /// The offset tracker's epoch the buffer belongs to.
    epoch: u64,
    locked: bool,
    last_lock: Instant,
    /// A consume task runs (or waits) for this queue.
    task: bool,
}

struct OrderlyQueue {
    state: Mutex<QueueState>,
    /// Held across a listener call: dropping the queue waits for it.
    consume: tokio::sync::Mutex<()>,
    dropped: AtomicBool,
}

impl OrderlyQueue {
    fn new(locked: bool, epoch: u64) -> Arc<OrderlyQueue> {
        Arc::new(OrderlyQueue {
            state: Mutex::new(QueueState {
                buffer: BTreeMap::new(),
                epoch,
                locked,
                last_lock: Instant::now(),
                task: false,
            }),
            consume: tokio::sync::Mutex::new(()),
            dropped: AtomicBool::new(false),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().expect("orderly queue lock")
    }

    /// Held, and renewed recently enough to be sure the broker still counts it.
    fn lock_valid(&self) -> bool {
        let s = self.state();
        s.locked && s.last_lock.elapsed() < CLIENT_LOCK_MAX_LIVE
    }
}

impl Orderly {
    pub(crate) fn enabled(&self) -> bool {
        self.listener.lock().expect("listener lock").is_some()
    }

    fn get(&self, mq: &MessageQueue) -> Option<Arc<OrderlyQueue>> {
        self.queues.lock().expect("orderly lock").get(mq).cloned()
    }
}

/// Locking on the wire.
impl Client {
    /// LOCK_BATCH_MQ: locks (or renews) `queues` (all of the broker behind `endpoint`) for this
    /// client in `group`; returns those it holds afterwards.
    pub async fn lock_batch(
        &self,
        endpoint: &str,
        group: &str,
        queues: &[MessageQueue],
    ) -> Result<BTreeSet<MessageQueue>> {
        let f = self
            .call(
                endpoint,
                request::LOCK_BATCH_MQ,
                lock_header(self, group, queues),
                Bytes::new(),
                self.config().request_timeout,
                "",
            )
            .await?;
        let r: LockBatchResponse = header::decode(&f.header).map_err(bad_header(endpoint))?;
        let got: BTreeSet<(&str, u32)> = r
            .locked
            .iter()
            .map(|q| (q.topic.as_str(), q.queue_id))
            .collect();
        // The broker names topic and queue id; only the queues asked for count.
        Ok(queues
            .iter()
            .filter(|q| got.contains(&(q.topic.as_str(), q.queue_id)))
            .cloned()
            .collect())
    }

    /// UNLOCK_BATCH_MQ: releases this client's locks of `queues` (of the broker behind
    /// `endpoint`) in `group`.
    pub async fn unlock_batch(
        &self,
        endpoint: &str,
        group: &str,
        queues: &[MessageQueue],
    ) -> Result<()> {
        self.call(
            endpoint,
            request::UNLOCK_BATCH_MQ,
            lock_header(self, group, queues),
            Bytes::new(),
            self.config().request_timeout,
            "",
        )
        .await
        .map(drop)
    }
}

fn lock_header(c: &Client, group: &str, queues: &[MessageQueue]) -> Bytes {
    header::encode(&LockBatchRequest {
        group: group.to_owned(),
        client_id: c.client_id().to_owned(),
        queues: queues
            .iter()
            .map(|q| LockQueue {
                topic: q.topic.clone(),
                queue_id: q.queue_id,
            })
            .collect(),
    })
}

fn by_endpoint(queues: impl IntoIterator<Item = QueueInfo>) -> BTreeMap<String, Vec<MessageQueue>> {
    let mut m: BTreeMap<String, Vec<MessageQueue>> = BTreeMap::new();
    for q in queues {
        m.entry(q.endpoint).or_default().push(q.mq);
    }
    m
}

/// Clustering locks queues (one member per queue); broadcasting does not (every member
/// consumes every queue, as RocketMQ).
fn needs_locks(inner: &Inner) -> bool {
    inner.options.message_model == MessageModel::Clustering
}

/// Rebalance, new queues: locks them on their brokers and keeps those locked (their state
/// registered); the others stay out of the assignment and a rebalance is asked for soon.
pub(super) async fn lock_new(
    inner: &Arc<Inner>,
    new_queues: Vec<(QueueInfo, Arc<SubExpr>)>,
) -> Vec<(QueueInfo, Arc<SubExpr>)> {
    if new_queues.is_empty() {
        return new_queues;
    }
    let mut locked = BTreeSet::new();
    if !needs_locks(inner) {
        locked.extend(new_queues.iter().map(|(q, _)| q.mq.clone()));
    }
    // A queue whose old listener call still runs here is not taken again until it ends.
    let draining: BTreeSet<MessageQueue> = inner
        .orderly
        .draining
        .lock()
        .expect("draining lock")
        .iter()
        .map(|(q, _)| q.mq.clone())
        .collect();
    let to_lock = new_queues
        .iter()
        .filter(|(q, _)| needs_locks(inner) && !draining.contains(&q.mq))
        .map(|(q, _)| q.clone());
    for (endpoint, mqs) in by_endpoint(to_lock) {
        match inner.client.lock_batch(&endpoint, &inner.group, &mqs).await {
            Ok(l) => locked.extend(l),
            Err(e) => tracing::warn!(%endpoint, group = %inner.group, error = %e,
                "locking new queues failed"),
        }
    }
    let (mine, others): (Vec<_>, Vec<_>) = new_queues
        .into_iter()
        .partition(|(q, _)| locked.contains(&q.mq));
    if !others.is_empty() {
        tracing::info!(group = %inner.group, queues = others.len(),
            "queues still locked by another member; asking again shortly");
        inner.orderly.retry_pending.store(true, Ordering::Release);
    }
    let mut qs = inner.orderly.queues.lock().expect("orderly lock");
    for (q, _) in &mine {
        match qs.get(&q.mq) {
            // Known already (a rebalance running beside this one): keep its buffer.
            Some(oq) if !oq.dropped.load(Ordering::Acquire) => {
                let mut s = oq.state();
                s.locked = true;
                s.last_lock = Instant::now();
            }
            _ => {
                qs.insert(q.mq.clone(), OrderlyQueue::new(true, 0));
            }
        }
    }
    mine
}

/// Rebalance, queues about to be dropped: no further listener call starts on them, and the
/// call in progress (if any) finishes first, so the commit that follows covers it.
pub(super) async fn quiesce(inner: &Arc<Inner>, dropping: &[MessageQueue]) -> Vec<MessageQueue> {
    let mut quiet = Vec::new();
    for mq in dropping {
        let Some(oq) = inner.orderly.get(mq) else {
            continue;
        };
        oq.dropped.store(true, Ordering::Release);
        let waited = tokio::time::timeout(DROP_CONSUME_WAIT, oq.consume.lock())
            .await
            .map(drop);
        match waited {
            Ok(()) => quiet.push(mq.clone()),
            Err(_) => tracing::warn!(queue = %mq, wait = ?DROP_CONSUME_WAIT,
                "listener call still running on a dropped queue; it stays locked until the call ends"),
        }
    }
    quiet
}

/// Rebalance, after the dropped queues' offsets were committed: forgets them and unlocks
/// those whose listener calls had finished (`quiet`).
pub(super) async fn release(inner: &Arc<Inner>, dropped: &[QueueInfo], quiet: &[MessageQueue]) {
    let _ops = inner.orderly.lock_ops.lock().await;
    let quiet: BTreeSet<&MessageQueue> = quiet.iter().collect();
    {
        let mut qs = inner.orderly.queues.lock().expect("orderly lock");
        let mut draining = inner.orderly.draining.lock().expect("draining lock");
        for q in dropped {
            if let Some(oq) = qs.remove(&q.mq) {
                if needs_locks(inner) && !quiet.contains(&q.mq) {
                    draining.push((q.clone(), oq));
                }
            }
        }
    }
    if !needs_locks(inner) {
        return;
    }
    let unlock = dropped.iter().filter(|q| quiet.contains(&q.mq)).cloned();
    for (endpoint, mqs) in by_endpoint(unlock) {
        if let Err(e) = inner
            .client
            .unlock_batch(&endpoint, &inner.group, &mqs)
            .await
        {
            tracing::warn!(%endpoint, error = %e, "unlocking dropped queues failed; they expire");
        } else {
            tracing::info!(%endpoint, queues = mqs.len(), "dropped queues unlocked");
        }
    }
}

/// Every queue this member holds: those it pulls and those draining before their release.
fn held_queues(inner: &Inner) -> Vec<QueueInfo> {
    let qs = inner.queues.lock().expect("queues lock");
    let draining = inner.orderly.draining.lock().expect("draining lock");
    qs.values()
        .map(|q| q.info.clone())
        .chain(draining.iter().map(|(q, _)| q.clone()))
        .collect()
}

/// Shutdown, after the final commit: unlocks every held queue.
pub(super) async fn unlock_all(inner: &Arc<Inner>) {
    if !inner.orderly.enabled() {
        return;
    }
    let held = held_queues(inner);
    release(
        inner,
        &held,
        &held.iter().map(|q| q.mq.clone()).collect::<Vec<_>>(),
    )
    .await;
}

/// Whether the pull loop may pull a queue: always for a concurrent listener; for an orderly
/// one only while its lock is valid.
pub(super) fn may_pull(inner: &Inner, mq: &MessageQueue) -> bool {
    if !inner.orderly.enabled() {
        return true;
    }
    inner.orderly.get(mq).is_some_and(|oq| oq.lock_valid())
}

/// Pulled messages (one queue, in offset order, already in flight in the tracker at
/// `epoch`) join the queue's buffer; its consume task starts if none runs.
pub(super) fn deliver(inner: &Arc<Inner>, msgs: Vec<MessageExt>, epoch: u64) {
    let Some(first) = msgs.first() else { return };
    let mq = first.message_queue();
    let oq = {
        let mut qs = inner.orderly.queues.lock().expect("orderly lock");
        // Never left without a state: an unlocked one is locked (and reloaded) by the renewal.
        qs.entry(mq.clone())
            .or_insert_with(|| OrderlyQueue::new(false, epoch))
            .clone()
    };
    {
        let mut s = oq.state();
        if epoch < s.epoch {
            return; // from before a reset
        }
        if epoch > s.epoch {
            s.buffer.clear();
            s.epoch = epoch;
        }
        for m in msgs {
            s.buffer.insert(m.queue_offset, m);
        }
    }
    kick(inner, &mq, &oq);
}

/// The offset tracker of `mq` moved to a new epoch (reset or offset moved): what the buffer
/// holds is forgotten.
pub(super) fn on_reset(inner: &Inner, mq: &MessageQueue, epoch: u64) {
    if let Some(oq) = inner.orderly.get(mq) {
        let mut s = oq.state();
        s.buffer.clear();
        s.epoch = epoch;
    }
}

/// Starts the consume task of a queue unless one runs or nothing waits.
fn kick(inner: &Arc<Inner>, mq: &MessageQueue, oq: &Arc<OrderlyQueue>) {
    {
        let mut s = oq.state();
        if s.task || s.buffer.is_empty() {
            return;
        }
        s.task = true;
    }
    let guard = ActiveGuard::enter(inner);
    tokio::spawn(consume_queue(inner.clone(), mq.clone(), oq.clone(), guard));
}

/// What a listener call came to.
enum Outcome {
    Done,
    Suspend,
    /// Shutting down before the call: nothing happened.
    NotCalled,
}

/// The consume task of one queue: the head of the buffer to the listener, one call at a
/// time, until the buffer is empty (or the queue is dropped, or shutdown).
async fn consume_queue(
    inner: Arc<Inner>,
    mq: MessageQueue,
    oq: Arc<OrderlyQueue>,
    _guard: ActiveGuard,
) {
    let mut shut = inner.shut_rx.clone();
    let stop = |oq: &OrderlyQueue| oq.state().task = false;
    loop {
        if *shut.borrow() || oq.dropped.load(Ordering::Acquire) {
            return stop(&oq);
        }
        if !oq.lock_valid() {
            // Not held (lost, or not renewed lately): wait for the renewal, consume nothing.
            if sleep_or_shutdown(&mut shut, LOCK_WAIT_RECHECK).await {
                return stop(&oq);
            }
            continue;
        }
        let consuming = oq.consume.lock().await;
        if oq.dropped.load(Ordering::Acquire) {
            return stop(&oq);
        }
        let (batch, epoch) = {
            let mut s = oq.state();
            if s.buffer.is_empty() {
                s.task = false;
                return;
            }
            let batch: Vec<MessageExt> = s
                .buffer
                .values()
                .take(inner.options.consume_batch_size)
                .cloned()
                .collect();
            (batch, s.epoch)
        };
        // Still ours at this epoch (not reset or dropped meanwhile)?
        let current = {
            let qs = inner.queues.lock().expect("queues lock");
            qs.get(&mq)
                .is_some_and(|q| q.tracker.is_in_flight(epoch, batch[0].queue_offset))
        };
        if !current {
            let mut s = oq.state();
            if s.epoch == epoch {
                for m in &batch {
                    s.buffer.remove(&m.queue_offset);
                }
            }
            continue;
        }
        let outcome = call_listener(&inner, &mq, &batch).await;
        let outcome = match outcome {
            Outcome::Suspend => suspend_or_dead_letter(&inner, &oq, &batch, epoch).await,
            other => other,
        };
        match outcome {
            Outcome::NotCalled => return stop(&oq),
            Outcome::Done => {
                {
                    let mut qs = inner.queues.lock().expect("queues lock");
                    if let Some(q) = qs.get_mut(&mq) {
                        for m in &batch {
                            q.tracker.on_consumed(epoch, m.queue_offset);
                        }
                    }
                }
                {
                    let mut s = oq.state();
                    if s.epoch == epoch {
                        for m in &batch {
                            s.buffer.remove(&m.queue_offset);
                        }
                    }
                }
                inner.progress.notify_waiters();
                drop(consuming);
            }
            Outcome::Suspend => {
                // Let a rebalance drop the queue while it waits.
                drop(consuming);
                tracing::debug!(queue = %mq, offset = batch[0].queue_offset,
                    "orderly listener suspended the queue");
                if sleep_or_shutdown(&mut shut, inner.options.suspend_current_queue_time).await {
                    return stop(&oq);
                }
            }
        }
    }
}

async fn call_listener(inner: &Arc<Inner>, mq: &MessageQueue, batch: &[MessageExt]) -> Outcome {
    let mut shut = inner.shut_rx.clone();
    let permit = tokio::select! {
        p = inner.permits.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return Outcome::NotCalled,
        },
        _ = shut.wait_for(|s| *s) => return Outcome::NotCalled,
    };
    let Some(listener) = inner
        .orderly
        .listener
        .lock()
        .expect("listener lock")
        .clone()
    else {
        return Outcome::NotCalled;
    };
    let b = batch.to_vec();
    let status = tokio::task::spawn_blocking(move || listener(&b)).await;
    drop(permit);
    match status {
        Ok(ConsumeOrderlyStatus::Success) => Outcome::Done,
        Ok(ConsumeOrderlyStatus::SuspendCurrentQueueAMoment) => Outcome::Suspend,
        Err(e) => {
            tracing::error!(queue = %mq, error = %e, "orderly listener panicked; suspending the queue");
            Outcome::Suspend
        }
    }
}

/// A suspended batch: each message's reconsume count goes up, in the buffer, so the retry
/// sees it. A message already suspended `orderly_max_reconsume_times` times goes to the
/// group's dead-letter topic instead (send-back with delay level -1, RocketMQ's orderly
/// `checkReconsumeTimes`); when every message of the batch went there, the batch counts as
/// consumed and the queue moves on. A failed send-back keeps the message in place.
async fn suspend_or_dead_letter(
    inner: &Arc<Inner>,
    oq: &OrderlyQueue,
    batch: &[MessageExt],
    epoch: u64,
) -> Outcome {
    let max = inner.options.orderly_max_reconsume_times;
    let mut exhausted = Vec::new();
    let mut suspend = false;
    {
        let mut s = oq.state();
        if s.epoch != epoch {
            return Outcome::Suspend;
        }
        for m in batch {
            let Some(b) = s.buffer.get_mut(&m.queue_offset) else {
                continue;
            };
            if max.is_some_and(|max| b.reconsume_times >= max) {
                exhausted.push(b.clone());
            } else {
                b.reconsume_times += 1;
                suspend = true;
            }
        }
    }
    for m in &exhausted {
        let sent = inner
            .client
            .send_back(m, &inner.group, DEAD_LETTER_DELAY_LEVEL, max.unwrap_or(0))
            .await;
        match sent {
            Ok(r) => {
                tracing::warn!(queue = %m.message_queue(), offset = m.queue_offset,
                    times = m.reconsume_times, to = %r.topic,
                    "orderly message past orderly_max_reconsume_times sent to the dead-letter topic");
                // Done with it, whatever the rest of the batch does.
                if let Some(q) = inner
                    .queues
                    .lock()
                    .expect("queues lock")
                    .get_mut(&m.message_queue())
                {
                    q.tracker.on_consumed(epoch, m.queue_offset);
                }
                let mut s = oq.state();
                if s.epoch == epoch {
                    s.buffer.remove(&m.queue_offset);
                }
            }
            Err(e) => {
                tracing::error!(queue = %m.message_queue(), offset = m.queue_offset,
                    error = %e, "dead-lettering an orderly message failed; retrying it in place");
                if let Some(b) = oq.state().buffer.get_mut(&m.queue_offset) {
                    b.reconsume_times = b.reconsume_times.saturating_add(1);
                }
                suspend = true;
            }
        }
    }
    if suspend {
        Outcome::Suspend
    } else {
        Outcome::Done
    }
}

/// Renews held locks every [`LOCK_RENEW_INTERVAL`], and asks for a rebalance every
/// [`LOCK_RETRY_INTERVAL`] while a queue of the share is still locked by another member.
pub(super) async fn lock_task(inner: Arc<Inner>) {
    let mut shut = inner.shut_rx.clone();
    let mut last_renew = tokio::time::Instant::now();
    loop {
        if sleep_or_shutdown(&mut shut, LOCK_RETRY_INTERVAL).await {
            return;
        }
        release_drained(&inner).await;
        if inner.orderly.retry_pending.swap(false, Ordering::AcqRel) {
            inner.rebalance_now.store(true, Ordering::Release);
            inner.rebalance_wake.notify_one();
        }
        let renew_due = last_renew.elapsed() >= LOCK_RENEW_INTERVAL;
        let any_lost = inner
            .orderly
            .queues
            .lock()
            .expect("orderly lock")
            .values()
            .any(|oq| !oq.state().locked);
        if renew_due || any_lost {
            last_renew = tokio::time::Instant::now();
            renew(&inner).await;
        }
    }
}

/// Unlocks the draining queues whose listener call has ended.
async fn release_drained(inner: &Arc<Inner>) {
    let done: Vec<QueueInfo> = {
        let mut draining = inner.orderly.draining.lock().expect("draining lock");
        let (done, busy): (Vec<_>, Vec<_>) = std::mem::take(&mut *draining)
            .into_iter()
            .partition(|(_, oq)| oq.consume.try_lock().is_ok());
        *draining = busy;
        done.into_iter().map(|(q, _)| q).collect()
    };
    if done.is_empty() {
        return;
    }
    let _ops = inner.orderly.lock_ops.lock().await;
    for (endpoint, mqs) in by_endpoint(done) {
        match inner
            .client
            .unlock_batch(&endpoint, &inner.group, &mqs)
            .await
        {
            Ok(()) => tracing::info!(%endpoint, queues = mqs.len(), "drained queues unlocked"),
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, "unlocking drained queues failed; they expire")
            }
        }
    }
}

/// Locks every held queue again; a queue the broker no longer gives this client stops (its
/// state unlocked); one given back after a loss restarts from the committed offset.
async fn renew(inner: &Arc<Inner>) {
    let _ops = inner.orderly.lock_ops.lock().await;
    if !needs_locks(inner) {
        // Broadcasting: every member consumes every queue; nothing to lock, always valid.
        for oq in inner.orderly.queues.lock().expect("orderly lock").values() {
            let mut s = oq.state();
            s.locked = true;
            s.last_lock = Instant::now();
        }
        return;
    }
    let held = held_queues(inner);
    for (endpoint, mqs) in by_endpoint(held) {
        let now = Instant::now();
        let locked = match inner.client.lock_batch(&endpoint, &inner.group, &mqs).await {
            Ok(l) => l,
            Err(e) => {
                // Keep the state: a valid lock lasts CLIENT_LOCK_MAX_LIVE without renewal.
                tracing::warn!(%endpoint, error = %e, "renewing queue locks failed");
                continue;
            }
        };
        let mut regained = Vec::new();
        {
            let qs = inner.orderly.queues.lock().expect("orderly lock");
            for mq in &mqs {
                let Some(oq) = qs.get(mq) else { continue };
                if oq.dropped.load(Ordering::Acquire) {
                    continue;
                }
                let mut s = oq.state();
                if locked.contains(mq) {
                    if !s.locked {
                        regained.push(mq.clone());
                    }
                    s.locked = true;
                    s.last_lock = now;
                } else {
                    if s.locked {
                        tracing::warn!(queue = %mq, "queue lock lost; consumption paused");
                    }
                    s.locked = false;
                }
            }
        }
        for mq in regained {
            reload(inner, &mq).await;
        }
    }
}

/// A queue locked again after a loss: another member may have consumed it meanwhile, so it
/// starts over from the group's committed offset.
async fn reload(inner: &Arc<Inner>, mq: &MessageQueue) {
    let offset = match start_offset(
        &inner.client,
        &inner.offsets,
        &inner.group,
        mq,
        inner.options.consume_from_where,
    )
    .await
    {
        Ok((o, _)) => o,
        Err(e) => {
            tracing::warn!(queue = %mq, error = %e, "reading the committed offset failed");
            if let Some(oq) = inner.orderly.get(mq) {
                oq.state().locked = false; // try again at the next renewal
            }
            return;
        }
    };
    tracing::info!(queue = %mq, offset, "queue lock regained; restarting from the committed offset");
    let epoch = {
        let mut qs = inner.queues.lock().expect("queues lock");
        let Some(q) = qs.get_mut(mq) else { return };
        q.tracker.reset(offset);
        q.tracker.mark_committed(offset);
        q.tracker.epoch()
    };
    on_reset(inner, mq, epoch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_gives_up_a_lock_well_before_the_broker_does() {
        // The broker's expiry is 60 s (src/shard/locks.rs): the client stops first.
        assert!(CLIENT_LOCK_MAX_LIVE * 2 <= Duration::from_secs(60));
        assert!(LOCK_RENEW_INTERVAL < CLIENT_LOCK_MAX_LIVE);
    }

    #[test]
    fn lock_validity_follows_the_last_renewal() {
        let oq = OrderlyQueue::new(true, 0);
        assert!(oq.lock_valid());
        oq.state().last_lock = Instant::now() - CLIENT_LOCK_MAX_LIVE;
        assert!(!oq.lock_valid());
        let oq = OrderlyQueue::new(false, 0);
        assert!(!oq.lock_valid());
    }
}
