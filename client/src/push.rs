//! The push consumer: long-polling pull loops, one per lane of a shard endpoint (a lane is the
//! queues whose id is the same modulo [`crate::consumer::PULL_LANES_PER_ENDPOINT`]; one request
//! covers every assigned queue of the lane), messages handed to a concurrent listener on
//! `consume_threads` listener threads, offsets tracked per queue and committed every few seconds
//! and on shutdown.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use orbitmq_proto::limits::MAX_PULL_QUEUES;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::client::{Client, PullTarget};
use crate::config::ClientConfig;
use crate::consumer::{
    offset_store, pull_lane, start_offset, ConsumeStatus, ConsumerOptions, MessageModel,
};
use crate::error::{ClientError, Result};
use crate::filter::SubExpr;
use crate::local_offsets::OffsetStore;
use crate::message::MessageExt;
use crate::offset::OffsetTracker;
use crate::pull::PullStatus;
use crate::rebalance;
use crate::route::{MessageQueue, QueueInfo};

#[path = "orderly.rs"]
mod orderly;
pub use orderly::{
    OrderlyListener, CLIENT_LOCK_MAX_LIVE, LOCK_RENEW_INTERVAL, LOCK_RETRY_INTERVAL,
};

/// First wait after a failed pull; doubled on each failure in a row.
pub const PULL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait after failed pulls.
pub const PULL_BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How often a pull loop whose queues are all over their in-flight limits looks again (it
/// is also woken when such a queue drains to half its limits).
pub const FLOW_CONTROL_RECHECK: Duration = Duration::from_millis(100);
/// How long shutdown waits for listener calls in progress.
pub const SHUTDOWN_CONSUME_WAIT: Duration = Duration::from_secs(10);
/// After start, when the retry topic had no route yet (its first heartbeat makes it), the
/// consumer rebalances again this much later to pick it up.
pub const RETRY_ROUTE_RECHECK: Duration = Duration::from_secs(1);
/// How long shutdown waits for a pull loop to notice.
pub const SHUTDOWN_LOOP_WAIT: Duration = Duration::from_secs(2);

/// A concurrent listener: called from several threads at once with a batch of messages.
pub type Listener = Arc<dyn Fn(&[MessageExt]) -> ConsumeStatus + Send + Sync + 'static>;

struct PushQueue {
    info: QueueInfo,
    expr: Arc<SubExpr>,
    tracker: OffsetTracker,
}

struct Inner {
    client: Client,
    owns_client: bool,
    group: String,
    options: ConsumerOptions,
    subs: Mutex<BTreeMap<String, Arc<SubExpr>>>,
    listener: Mutex<Option<Listener>>,
    queues: Mutex<HashMap<MessageQueue, PushQueue>>,
    /// Pull loops by (endpoint, lane): see [`pull_lane`].
    loops: Mutex<HashMap<(String, u32), JoinHandle<()>>>,
    background: Mutex<Vec<JoinHandle<()>>>,
    /// Bounds an orderly listener's calls at once to `consume_threads` (a concurrent one has
    /// `pool`).
    permits: Arc<Semaphore>,
    /// The concurrent listener's threads, from `start`.
    pool: std::sync::OnceLock<ListenerPool>,
    /// The pool's watchdog ([`watch_calls`]): stopped after shutdown's wait for the calls.
    watchdog: Mutex<Option<JoinHandle<()>>>,
    /// Listener work alive: calls queued for or running on the listener threads (until the
    /// call returns or the watchdog takes its batch), batches being sent back or waiting to be
    /// consumed again, and the orderly path's calls.
    active: AtomicUsize,
    idle: Notify,
    /// Messages completed: a flow-controlled pull loop may go on.
    progress: Notify,
    running: AtomicBool,
    shut_tx: watch::Sender<bool>,
    shut_rx: watch::Receiver<bool>,
    /// Set (and `rebalance_wake` notified) by a broker's consumer-ids-changed notice.
    rebalance_now: Arc<AtomicBool>,
    rebalance_wake: Arc<Notify>,
    offsets: OffsetStore,
    /// Orderly listener and queue locks (see `orderly`).
    orderly: orderly::Orderly,
    /// Held by the pull loop refreshing the assignment after a route error.
    resyncing: tokio::sync::Mutex<()>,
    /// Wakes the pull loops to pull again at once (a live offset reset moved a queue).
    repull: Notify,
    /// Queues a rebalance is taking (reading their start offsets), and the live resets that
    /// came for them meanwhile: a reset applies when the queue is in place.
    taking: Mutex<HashMap<MessageQueue, Option<u64>>>,
}

/// RocketMQ's `DefaultMQPushConsumer` with a concurrent or an orderly listener.
pub struct PushConsumer {
    inner: Arc<Inner>,
}

/// Counts a consume task as alive until dropped.
struct ActiveGuard(Arc<Inner>);

impl ActiveGuard {
    /// Counts one more piece of listener work, until the guard is dropped.
    fn enter(inner: &Arc<Inner>) -> ActiveGuard {
        inner.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(inner.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl PushConsumer {
    pub async fn new(group: &str, config: ClientConfig) -> Result<PushConsumer> {
        Self::with_options(group, config, ConsumerOptions::default()).await
    }

    pub async fn with_options(
        group: &str,
        config: ClientConfig,
        options: ConsumerOptions,
    ) -> Result<PushConsumer> {
        let offsets = offset_store(group, &options)?;
        let client = Client::new(config).await?;
        Ok(Self::build(group, client, true, options, offsets))
    }

    pub fn with_client(group: &str, client: Client, options: ConsumerOptions) -> Result<Self> {
        let offsets = offset_store(group, &options)?;
        Ok(Self::build(group, client, false, options, offsets))
    }

    fn build(
        group: &str,
        client: Client,
        owns_client: bool,
        options: ConsumerOptions,
        offsets: OffsetStore,
    ) -> Self {
        let (shut_tx, shut_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(options.consume_threads));
        PushConsumer {
            inner: Arc::new(Inner {
                client,
                owns_client,
                group: group.to_owned(),
                options,
                subs: Mutex::new(BTreeMap::new()),
                listener: Mutex::new(None),
                queues: Mutex::new(HashMap::new()),
                loops: Mutex::new(HashMap::new()),
                background: Mutex::new(Vec::new()),
                permits,
                pool: std::sync::OnceLock::new(),
                watchdog: Mutex::new(None),
                resyncing: tokio::sync::Mutex::new(()),
                active: AtomicUsize::new(0),
                idle: Notify::new(),
                progress: Notify::new(),
                running: AtomicBool::new(false),
                shut_tx,
                shut_rx,
                rebalance_now: Arc::new(AtomicBool::new(false)),
                rebalance_wake: Arc::new(Notify::new()),
                offsets,
                orderly: orderly::Orderly::default(),
                repull: Notify::new(),
                taking: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn group(&self) -> &str {
        &self.inner.group
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Consumes the topic's messages that match `expr` (`*`, `TagA || TagB`) on this
    /// consumer's share of the topic's readable queues among the group's members (by the
    /// options' strategy; rebalanced every `rebalance_interval` and at a broker's notice).
    pub async fn subscribe(&self, topic: &str, expr: &str) -> Result<()> {
        self.subscribe_with(topic, SubExpr::parse(expr)?).await
    }

    /// As [`Self::subscribe`], with any selector: tags, or an SQL92 filter
    /// ([`SubExpr::sql`]).
    pub async fn subscribe_with(&self, topic: &str, expr: SubExpr) -> Result<()> {
        orbitmq_proto::limits::validate_topic(topic)
            .map_err(|e| ClientError::InvalidArgument(format!("topic: {e}")))?;
        let expr = Arc::new(expr);
        self.inner
            .client
            .set_subscription(&self.inner.group, topic, &expr);
        self.inner
            .subs
            .lock()
            .expect("subs lock")
            .insert(topic.to_owned(), expr);
        if self.inner.running.load(Ordering::Acquire) {
            sync_assignment(&self.inner).await?;
        }
        Ok(())
    }

    /// Sets the listener. Called concurrently from up to `consume_threads` threads; it may
    /// block. `ReconsumeLater` (or a panic, or a call past `consume_timeout`) sends each
    /// message back to its broker (clustering): it comes again from the group's retry topic
    /// after the broker's backoff, showing its original topic and its `reconsume_times`, and
    /// goes to `%DLQ%<group>` after `max_reconsume_times`. Broadcasting, or when the
    /// send-back fails, the messages are consumed again locally after `reconsume_delay`.
    pub fn register_listener<F>(&self, listener: F)
    where
        F: Fn(&[MessageExt]) -> ConsumeStatus + Send + Sync + 'static,
    {
        *self.inner.listener.lock().expect("listener lock") = Some(Arc::new(listener));
    }

    /// Sets an orderly listener instead (RocketMQ's `MessageListenerOrderly`): it gets the
    /// messages of one queue at a time, in offset order, never two calls for one queue at
    /// once, and only while this consumer holds the queue's lock on its broker (so a
    /// rebalance never has two members consuming one queue). `SuspendCurrentQueueAMoment`
    /// (or a panic) retries the same messages after `suspend_current_queue_time`, before
    /// anything behind them.
    pub fn register_orderly_listener<F>(&self, listener: F)
    where
        F: Fn(&[MessageExt]) -> crate::consumer::ConsumeOrderlyStatus + Send + Sync + 'static,
    {
        *self.inner.orderly.listener.lock().expect("listener lock") = Some(Arc::new(listener));
    }

    /// Resolves the subscribed queues and their start offsets and starts pulling.
    pub async fn start(&self) -> Result<()> {
        if *self.inner.shut_rx.borrow() {
            return Err(ClientError::ShutDown);
        }
        let concurrent = self.inner.listener.lock().expect("listener lock").is_some();
        if concurrent == self.inner.orderly.enabled() {
            return Err(ClientError::InvalidArgument(
                "register one listener (concurrent or orderly) before start".into(),
            ));
        }
        if self.inner.subs.lock().expect("subs lock").is_empty() {
            return Err(ClientError::InvalidArgument(
                "subscribe before start".into(),
            ));
        }
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return Err(ClientError::InvalidArgument("already started".into()));
        }
        if concurrent {
            if let Err(e) = start_listener_pool(&self.inner) {
                self.inner.running.store(false, Ordering::Release);
                return Err(e);
            }
        }
        let retry = self.subscribe_retry_topic(concurrent)?;
        self.inner.client.register_consumer(&self.inner.group);
        let notices = rebalance::watch_notices(
            self.inner.client.pushes(),
            self.inner.group.clone(),
            self.inner.rebalance_now.clone(),
            self.inner.rebalance_wake.clone(),
        );
        self.inner
            .background
            .lock()
            .expect("background lock")
            .push(notices);
        let resets = tokio::spawn(watch_resets(self.inner.clone()));
        self.inner
            .background
            .lock()
            .expect("background lock")
            .push(resets);
        if self.inner.orderly.enabled() {
            let locks = tokio::spawn(orderly::lock_task(self.inner.clone()));
            self.inner
                .background
                .lock()
                .expect("background lock")
                .push(locks);
        }
        if let Err(e) = sync_assignment(&self.inner).await {
            self.inner.running.store(false, Ordering::Release);
            return Err(e);
        }
        let bg = tokio::spawn(maintenance_task(self.inner.clone()));
        self.inner
            .background
            .lock()
            .expect("background lock")
            .push(bg);
        if let Err(e) = self.inner.client.heartbeat().await {
            tracing::warn!(group = %self.inner.group, error = %e, "first heartbeat failed");
        }
        if retry && self.retry_assignment().is_empty() {
            // That heartbeat made the retry topic: rebalance once its route is registered
            // rather than at the next periodic rebalance.
            let inner = self.inner.clone();
            let recheck = tokio::spawn(async move {
                tokio::time::sleep(RETRY_ROUTE_RECHECK).await;
                inner.rebalance_now.store(true, Ordering::Release);
                inner.rebalance_wake.notify_one();
            });
            self.inner
                .background
                .lock()
                .expect("background lock")
                .push(recheck);
        }
        tracing::info!(group = %self.inner.group, queues = self.assignment().len(),
            "push consumer started");
        Ok(())
    }

    /// Clustering with a concurrent listener: the group's retry topic (`%RETRY%<group>`) is
    /// subscribed with `*`, as RocketMQ's copySubscription, so sent-back messages come again.
    /// Returns whether it did.
    fn subscribe_retry_topic(&self, concurrent: bool) -> Result<bool> {
        if !concurrent || self.inner.options.message_model != MessageModel::Clustering {
            return Ok(false);
        }
        let retry = orbitmq_proto::sys::retry_topic(&self.inner.group);
        if let Err(e) = orbitmq_proto::limits::validate_topic(&retry) {
            tracing::warn!(group = %self.inner.group, error = %e,
                "the group name makes no valid retry topic; failed messages are retried locally");
            return Ok(false);
        }
        let expr = Arc::new(SubExpr::parse("*")?);
        self.inner
            .client
            .set_subscription(&self.inner.group, &retry, &expr);
        self.inner
            .subs
            .lock()
            .expect("subs lock")
            .entry(retry)
            .or_insert(expr);
        Ok(true)
    }

    /// The queues of the subscribed topics this consumer pulls (the group's retry queue,
    /// subscribed automatically, is pulled too but not listed: see [`Self::retry_assignment`]).
    pub fn assignment(&self) -> Vec<MessageQueue> {
        self.held_queues(false)
    }

    /// The queues of the group's retry topic (`%RETRY%<group>`) this consumer pulls.
    pub fn retry_assignment(&self) -> Vec<MessageQueue> {
        self.held_queues(true)
    }

    /// Held queues of the retry topic (`retry`) or of the others, sorted.
    fn held_queues(&self, retry: bool) -> Vec<MessageQueue> {
        let retry_topic = orbitmq_proto::sys::retry_topic(&self.inner.group);
        let mut v: Vec<MessageQueue> = self
            .inner
            .queues
            .lock()
            .expect("queues lock")
            .keys()
            .filter(|q| (q.topic == retry_topic) == retry)
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Commits now what may be committed (the lowest offset in flight of each queue).
    pub async fn commit(&self) -> Result<()> {
        commit_all(&self.inner).await
    }

    /// Stops pulling, waits (bounded) for listener calls in progress, commits offsets and
    /// closes the consumer's own client. Messages not yet consumed stay uncommitted and come
    /// again to the next consumer of the group.
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.shut_tx.send_replace(true) {
            return Ok(());
        }
        let was_running = self.inner.running.swap(false, Ordering::AcqRel);
        let loops: Vec<JoinHandle<()>> = self
            .inner
            .loops
            .lock()
            .expect("loops lock")
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in loops {
            let abort = h.abort_handle();
            if tokio::time::timeout(SHUTDOWN_LOOP_WAIT, h).await.is_err() {
                abort.abort();
            }
        }
        for h in self
            .inner
            .background
            .lock()
            .expect("background lock")
            .drain(..)
        {
            h.abort();
        }
        let waited = tokio::time::timeout(SHUTDOWN_CONSUME_WAIT, async {
            loop {
                let idle = self.inner.idle.notified();
                if self.inner.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(group = %self.inner.group,
                "listener calls still running at shutdown; their messages stay uncommitted");
        }
        // Stopped only now: a call past its timeout during the wait above was sent back.
        if let Some(w) = self.inner.watchdog.lock().expect("watchdog lock").take() {
            w.abort();
        }
        let res = if was_running {
            commit_all(&self.inner).await
        } else {
            Ok(())
        };
        // Orderly: the queues go to the next owner only after the final commit.
        orderly::unlock_all(&self.inner).await;
        // Leaving tells the brokers, which notify the other members to take the queues.
        self.inner
            .client
            .leave_consumer_group(&self.inner.group)
            .await;
        if self.inner.owns_client {
            self.inner.client.shutdown().await;
        }
        tracing::info!(group = %self.inner.group, "push consumer shut down");
        res
    }
}

impl Drop for PushConsumer {
    fn drop(&mut self) {
        // Without shutdown: stop the tasks (offsets since the last commit are not committed).
        let _ = self.inner.shut_tx.send_replace(true);
        if let Ok(mut l) = self.inner.loops.lock() {
            for (_, h) in l.drain() {
                h.abort();
            }
        }
        if let Ok(mut b) = self.inner.background.lock() {
            for h in b.drain(..) {
                h.abort();
            }
        }
        if let Some(w) = self.inner.watchdog.lock().ok().and_then(|mut w| w.take()) {
            w.abort();
        }
    }
}

/// Rebalances: brings the assignment in line with this consumer's share of the subscribed
/// topics' queues. Queues that went to other members are dropped after committing what was
/// consumed of them; new queues get their start offsets (the committed offset), moved queues
/// their new endpoint, and every lane of an endpoint a pull loop.
async fn sync_assignment(inner: &Arc<Inner>) -> Result<()> {
    let subs: Vec<(String, Arc<SubExpr>)> = inner
        .subs
        .lock()
        .expect("subs lock")
        .iter()
        .map(|(t, e)| (t.clone(), e.clone()))
        .collect();
    let mut wanted: Vec<(QueueInfo, Arc<SubExpr>)> = Vec::new();
    let own_retry = orbitmq_proto::sys::retry_topic(&inner.group);
    for (topic, expr) in &subs {
        let route = match inner.client.topic_route(topic).await {
            Ok(r) => r,
            // The retry topic is made at the group's first heartbeat: until its route is
            // known, keep what is held and look again at the next rebalance.
            Err(e) if *topic == own_retry => {
                tracing::debug!(group = %inner.group, %topic, error = %e,
                    "no route to the retry topic yet");
                let qs = inner.queues.lock().expect("queues lock");
                wanted.extend(
                    qs.values()
                        .filter(|q| q.info.mq.topic == *topic)
                        .map(|q| (q.info.clone(), q.expr.clone())),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        let share = match if inner.options.message_model == MessageModel::Broadcasting {
            // Broadcasting: every consumer takes every queue.
            Ok(route.readable().iter().map(|q| q.mq.clone()).collect())
        } else {
            rebalance::topic_share(&inner.client, &inner.group, topic, &inner.options.allocate)
                .await
        } {
            Ok(s) => s,
            Err(e) => {
                // Keep what is held: dropping on a transient error would leave queues idle.
                tracing::warn!(group = %inner.group, %topic, error = %e,
                    "rebalance failed; keeping the current queues");
                inner
                    .queues
                    .lock()
                    .expect("queues lock")
                    .keys()
                    .filter(|q| q.topic == *topic)
                    .cloned()
                    .collect()
            }
        };
        wanted.extend(
            route
                .readable()
                .into_iter()
                .filter(|q| share.contains(&q.mq))
                .map(|q| (q.clone(), expr.clone())),
        );
    }
    let wanted_set: BTreeSet<MessageQueue> = wanted.iter().map(|(q, _)| q.mq.clone()).collect();
    // Orderly: queues about to go finish their listener call before the commit below.
    let (dropping, quiet) = if inner.orderly.enabled() {
        let dropping: Vec<QueueInfo> = inner
            .queues
            .lock()
            .expect("queues lock")
            .iter()
            .filter(|(mq, _)| !wanted_set.contains(mq))
            .map(|(_, q)| q.info.clone())
            .collect();
        let mqs: Vec<MessageQueue> = dropping.iter().map(|q| q.mq.clone()).collect();
        let quiet = orderly::quiesce(inner, &mqs).await;
        (dropping, quiet)
    } else {
        (Vec::new(), Vec::new())
    };
    let mut new_queues = Vec::new();
    let mut hand_over = Vec::new();
    {
        let mut qs = inner.queues.lock().expect("queues lock");
        qs.retain(|mq, q| {
            let keep = wanted_set.contains(mq);
            if !keep {
                tracing::info!(queue = %mq, "queue no longer ours (rebalance or route); dropped");
                if let Some(o) = q.tracker.pending_commit() {
                    hand_over.push((mq.clone(), o));
                }
            }
            keep
        });
        for (info, expr) in &wanted {
            match qs.get_mut(&info.mq) {
                Some(q) => {
                    if q.info.endpoint != info.endpoint {
                        tracing::info!(queue = %info.mq, from = %q.info.endpoint,
                            to = %info.endpoint, "queue moved");
                    }
                    q.info = info.clone();
                    q.expr = expr.clone();
                }
                None => new_queues.push((info.clone(), expr.clone())),
            }
        }
    }
    // The old owner commits what it finished before the new owner reads the committed
    // offset; messages still in the listener are re-delivered to the new owner.
    for (mq, offset) in hand_over {
        if let Err(e) = inner
            .offsets
            .commit(&inner.client, &inner.group, &mq, offset)
            .await
        {
            tracing::warn!(queue = %mq, offset, error = %e, "commit of a dropped queue failed");
        }
    }
    // Orderly: unlock the dropped queues now that their offsets are committed, and lock the
    // new ones before reading their committed offsets (the previous owner's final commit).
    let new_queues = if inner.orderly.enabled() {
        orderly::release(inner, &dropping, &quiet).await;
        orderly::lock_new(inner, new_queues).await
    } else {
        new_queues
    };
    let added = !new_queues.is_empty();
    inner
        .taking
        .lock()
        .expect("taking lock")
        .extend(new_queues.iter().map(|(q, _)| (q.mq.clone(), None)));
    for (info, expr) in new_queues {
        let (offset, committed) = start_offset(
            &inner.client,
            &inner.offsets,
            &inner.group,
            &info.mq,
            inner.options.consume_from_where,
        )
        .await?;
        // A live reset that came while the queue was being taken wins over what was read.
        // Both locks at once: a notice sees the queue either taking or in place.
        let mut qs = inner.queues.lock().expect("queues lock");
        let reset = inner
            .taking
            .lock()
            .expect("taking lock")
            .remove(&info.mq)
            .flatten();
        let tracker = match reset {
            Some(o) => OffsetTracker::from_committed(o),
            None if committed => OffsetTracker::from_committed(offset),
            None => OffsetTracker::new(offset),
        };
        qs.entry(info.mq.clone()).or_insert(PushQueue {
            info,
            expr,
            tracker,
        });
    }
    if added {
        // A pull parked on an endpoint covers the queues it had when it started: make it
        // start again with the new ones instead of after its long poll.
        inner.repull.notify_waiters();
    }
    ensure_loops(inner);
    Ok(())
}

/// Starts a pull loop for every lane of an endpoint with assigned queues that has none.
fn ensure_loops(inner: &Arc<Inner>) {
    if !inner.running.load(Ordering::Acquire) || *inner.shut_rx.borrow() {
        return;
    }
    let lanes: BTreeSet<(String, u32)> = inner
        .queues
        .lock()
        .expect("queues lock")
        .values()
        .map(|q| (q.info.endpoint.clone(), pull_lane(&q.info.mq)))
        .collect();
    let mut loops = inner.loops.lock().expect("loops lock");
    loops.retain(|_, h| !h.is_finished());
    for (ep, lane) in lanes {
        if let Entry::Vacant(v) = loops.entry((ep, lane)) {
            let ep = v.key().0.clone();
            tracing::debug!(endpoint = %ep, lane, "starting pull loop");
            v.insert(tokio::spawn(pull_loop(inner.clone(), ep, lane)));
        }
    }
}

async fn sleep_or_shutdown(shut: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shut.wait_for(|s| *s) => true,
    }
}

/// Takes an empty lane's loop out of the loops, unless a queue came to the lane meanwhile
/// (then the loop goes on). Checked under the loops lock, so a rebalance adding a queue either
/// sees this loop and leaves it, or finds it gone and starts another.
fn leave_lane(inner: &Arc<Inner>, endpoint: &str, lane: u32) -> bool {
    let mut loops = inner.loops.lock().expect("loops lock");
    let empty = !inner
        .queues
        .lock()
        .expect("queues lock")
        .values()
        .any(|q| q.info.endpoint == endpoint && pull_lane(&q.info.mq) == lane);
    if empty {
        loops.remove(&(endpoint.to_owned(), lane));
    }
    empty
}

/// [`sync_assignment`] for a pull loop that met a route error: when another loop is already
/// at it (a failover fails every lane's pull at once), waits for that one instead.
async fn resync(inner: &Arc<Inner>) -> Result<()> {
    match inner.resyncing.try_lock() {
        Ok(_g) => sync_assignment(inner).await,
        Err(_) => {
            drop(inner.resyncing.lock().await);
            Ok(())
        }
    }
}

/// Pulls the queues of one lane of an endpoint, as long as it has any.
async fn pull_loop(inner: Arc<Inner>, endpoint: String, lane: u32) {
    let mut shut = inner.shut_rx.clone();
    let mut backoff = PULL_BACKOFF_MIN;
    loop {
        if *shut.borrow() {
            return;
        }
        // The queues of this lane that are under their in-flight limits.
        let progress = inner.progress.notified();
        let (targets, epochs, assigned) = {
            let qs = inner.queues.lock().expect("queues lock");
            let mut targets = Vec::new();
            let mut epochs = HashMap::new();
            let mut assigned = false;
            for q in qs
                .values()
                .filter(|q| q.info.endpoint == endpoint && pull_lane(&q.info.mq) == lane)
            {
                assigned = true;
                if targets.len() >= MAX_PULL_QUEUES
                    || !orderly::may_pull(&inner, &q.info.mq)
                    || q.tracker.in_flight_count() >= inner.options.max_in_flight_per_queue
                    || q.tracker.in_flight_bytes() >= inner.options.max_in_flight_bytes_per_queue
                {
                    continue;
                }
                epochs.insert(q.info.mq.clone(), q.tracker.epoch());
                targets.push(PullTarget {
                    queue: q.info.clone(),
                    offset: q.tracker.next_pull_offset(),
                    max_msgs: inner.options.pull_batch_size,
                    expr: q.expr.clone(),
                });
            }
            (targets, epochs, assigned)
        };
        if !assigned && leave_lane(&inner, &endpoint, lane) {
            tracing::debug!(%endpoint, lane, "no queue left in this lane; pull loop ends");
            return;
        }
        if targets.is_empty() {
            tokio::select! {
                _ = inner.repull.notified() => {}
                _ = progress => {}
                _ = tokio::time::sleep(FLOW_CONTROL_RECHECK) => {}
                _ = shut.wait_for(|s| *s) => return,
            }
            continue;
        }
        let pulled = tokio::select! {
            // A live reset moved a queue: pull again from the new offsets.
            _ = inner.repull.notified() => continue,
            r = inner.client.pull(
                &endpoint,
                &inner.group,
                &targets,
                inner.options.pull_max_bytes,
                inner.options.long_poll_suspend,
            ) => r,
            _ = shut.wait_for(|s| *s) => return,
        };
        let results = match pulled {
            Ok(r) => {
                backoff = PULL_BACKOFF_MIN;
                r
            }
            Err(e) => {
                tracing::warn!(%endpoint, group = %inner.group, error = %e, "pull failed");
                if e.invalidates_route() || matches!(e, ClientError::WrongShard { .. }) {
                    if let Err(e) = resync(&inner).await {
                        tracing::warn!(group = %inner.group, error = %e, "route refresh failed");
                    }
                }
                if sleep_or_shutdown(&mut shut, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(PULL_BACKOFF_MAX);
                continue;
            }
        };
        let mut reroute = false;
        let mut deliveries: Vec<(Vec<MessageExt>, u64)> = Vec::new();
        {
            let mut qs = inner.queues.lock().expect("queues lock");
            for r in results {
                let Some(q) = qs.get_mut(&r.mq) else { continue };
                let Some(&epoch) = epochs.get(&r.mq) else {
                    continue;
                };
                if q.tracker.epoch() != epoch {
                    continue;
                }
                match r.status {
                    PullStatus::Found | PullStatus::NoNewMessages
                        if r.next_offset >= r.pulled_from =>
                    {
                        let offsets: Vec<(u64, u32)> = r
                            .messages
                            .iter()
                            .map(|m| (m.queue_offset, m.body.len() as u32))
                            .collect();
                        if q.tracker
                            .on_pulled(epoch, r.pulled_from, &offsets, r.next_offset)
                            && !r.messages.is_empty()
                        {
                            deliveries.push((r.messages, epoch));
                        }
                    }
                    PullStatus::OffsetMoved => {
                        tracing::warn!(queue = %r.mq, from = r.pulled_from, to = r.next_offset,
                            "offset moved by the broker");
                        q.tracker.reset(r.next_offset);
                        orderly::on_reset(&inner, &r.mq, q.tracker.epoch());
                    }
                    PullStatus::WrongShard | PullStatus::TopicNotExist => reroute = true,
                    PullStatus::Other(code) => {
                        tracing::warn!(queue = %r.mq, code, reason = %r.reason,
                            "pull of a queue failed");
                    }
                    _ => {}
                }
            }
        }
        for (msgs, epoch) in deliveries {
            if inner.orderly.enabled() {
                orderly::deliver(&inner, msgs, epoch);
                continue;
            }
            for batch in msgs.chunks(inner.options.consume_batch_size) {
                spawn_consume(&inner, batch.to_vec(), epoch);
            }
        }
        if reroute {
            if let Err(e) = resync(&inner).await {
                tracing::warn!(group = %inner.group, error = %e, "route refresh failed");
            }
            if sleep_or_shutdown(&mut shut, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(PULL_BACKOFF_MAX);
        }
    }
}

/// A queue whose messages in flight (pulled, not yet consumed) are at half its limits or over
/// them: its pull loop may be waiting for it to drain. Half, so a loop wakes to pull a batch
/// worth, not again for every message consumed.
fn flow_held(o: &ConsumerOptions, t: &OffsetTracker) -> bool {
    t.in_flight_count() >= o.max_in_flight_per_queue.div_ceil(2)
        || t.in_flight_bytes() >= o.max_in_flight_bytes_per_queue.div_ceil(2)
}

/// A batch (all of one queue) for the listener threads.
struct Call {
    batch: Vec<MessageExt>,
    epoch: u64,
}

/// A listener call under way, watched for `consume_timeout`.
struct Running {
    started: Instant,
    mq: MessageQueue,
    epoch: u64,
    batch: Arc<Vec<MessageExt>>,
    /// Set once, by the call's return or by the watchdog, whichever comes first: the other
    /// leaves the batch alone.
    settled: AtomicBool,
}

/// The listener threads of a concurrent listener: `consume_threads` threads taking calls from
/// one backlog, so a thread goes from call to call without parking while calls wait. (A task
/// and a blocking-pool call per message made about 30k msgs/s with a no-op listener: each call
/// woke a thread and then a runtime worker.)
struct ListenerPool {
    tx: crossbeam_channel::Sender<Call>,
    /// Calls under way, for the watchdog.
    running: Mutex<Vec<Arc<Running>>>,
    runtime: tokio::runtime::Handle,
}

/// How often the watchdog looks for listener calls past `consume_timeout`.
pub const CALL_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Starts the listener threads (at the first `start`, in the runtime; a start that failed
/// later on keeps them for the next). They hold the consumer weakly and end when it is dropped
/// (its sender with it).
fn start_listener_pool(inner: &Arc<Inner>) -> Result<()> {
    if inner.pool.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = crossbeam_channel::unbounded::<Call>();
    for i in 0..inner.options.consume_threads {
        let rx = rx.clone();
        let weak = Arc::downgrade(inner);
        std::thread::Builder::new()
            .name(format!("consume-{i}"))
            .spawn(move || {
                while let Ok(call) = rx.recv() {
                    // The listener's panics are caught inside; this keeps the thread for
                    // the next call should anything else in a call panic.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_call(&weak, call)
                    }));
                }
            })
            .map_err(|e| ClientError::InvalidArgument(format!("listener thread: {e}")))?;
    }
    let pool = ListenerPool {
        tx,
        running: Mutex::new(Vec::new()),
        runtime: tokio::runtime::Handle::current(),
    };
    if inner.pool.set(pool).is_err() {
        return Err(ClientError::InvalidArgument("already started".into()));
    }
    let watchdog = tokio::spawn(watch_calls(inner.clone()));
    *inner.watchdog.lock().expect("watchdog lock") = Some(watchdog);
    Ok(())
}

/// Hands a batch (all of one queue) to the listener threads.
fn spawn_consume(inner: &Arc<Inner>, batch: Vec<MessageExt>, epoch: u64) {
    let Some(pool) = inner.pool.get() else {
        debug_assert!(false, "a concurrent consumer delivers only once started");
        return;
    };
    inner.active.fetch_add(1, Ordering::AcqRel);
    if pool.tx.send(Call { batch, epoch }).is_err() {
        // No thread left (the consumer is going away): the batch stays uncommitted.
        drop(ActiveGuard(inner.clone()));
    }
}

/// Hands a batch to the listener threads after `delay` (a local redelivery).
fn consume_later(inner: &Arc<Inner>, batch: Vec<MessageExt>, epoch: u64, delay: Duration) {
    let guard = ActiveGuard::enter(inner);
    let inner = inner.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let mut shut = inner.shut_rx.clone();
        if sleep_or_shutdown(&mut shut, delay).await {
            return; // still in flight, so uncommitted: the next consumer gets it
        }
        spawn_consume(&inner, batch, epoch);
    });
}

/// One listener call, on a listener thread. The consumer is not held during the call, so a
/// call that never returns keeps neither it nor its client alive.
fn run_call(weak: &Weak<Inner>, call: Call) {
    let Some(inner) = weak.upgrade() else { return };
    // The call's count in `active` is given back by whichever settles it (below, or the
    // watchdog), or here if it never runs.
    if *inner.shut_rx.borrow() {
        // Still in flight, so uncommitted: the next consumer gets it.
        drop(ActiveGuard(inner));
        return;
    }
    let listener = inner.listener.lock().expect("listener lock").clone();
    let (Some(listener), Some(pool)) = (listener, inner.pool.get()) else {
        drop(ActiveGuard(inner));
        return;
    };
    let mut batch = call.batch;
    for m in &mut batch {
        // A retry message shows its original topic; `message_queue` stays the retry queue.
        m.show_original_topic(&inner.group);
    }
    let mq = batch[0].message_queue();
    let run = Arc::new(Running {
        started: Instant::now(),
        mq: mq.clone(),
        epoch: call.epoch,
        batch: Arc::new(batch),
        settled: AtomicBool::new(false),
    });
    pool.running.lock().expect("running lock").push(run.clone());
    drop(inner);
    let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener(&run.batch)))
        .unwrap_or_else(|_| {
            tracing::error!(queue = %mq, "listener panicked; reconsuming later");
            ConsumeStatus::ReconsumeLater
        });
    let Some(inner) = weak.upgrade() else { return };
    let Some(pool) = inner.pool.get() else { return };
    pool.running
        .lock()
        .expect("running lock")
        .retain(|r| !Arc::ptr_eq(r, &run));
    if run.settled.swap(true, Ordering::AcqRel) {
        return; // past its timeout: the watchdog sent it back and gave its count back
    }
    let _settled = ActiveGuard(inner.clone());
    match status {
        ConsumeStatus::ConsumeSuccess => {
            let mut qs = inner.queues.lock().expect("queues lock");
            let mut drained = false;
            if let Some(q) = qs.get_mut(&mq) {
                let held = flow_held(&inner.options, &q.tracker);
                for m in run.batch.iter() {
                    q.tracker.on_consumed(call.epoch, m.queue_offset);
                }
                drained = held && !flow_held(&inner.options, &q.tracker);
            }
            drop(qs);
            // Only a queue that was held back and has drained wakes the pull loops: a wake
            // per message woke every lane's loop for every message.
            if drained {
                inner.progress.notify_waiters();
            }
        }
        ConsumeStatus::ReconsumeLater => {
            spawn_reconsume(&inner, pool, mq, call.epoch, (*run.batch).clone());
        }
    }
}

/// Sends back, as failed, the batches of listener calls past `consume_timeout` (the calls go
/// on holding their threads; what they return is ignored).
async fn watch_calls(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(CALL_WATCH_INTERVAL);
    loop {
        tick.tick().await;
        let Some(pool) = inner.pool.get() else { return };
        let late: Vec<Arc<Running>> = pool
            .running
            .lock()
            .expect("running lock")
            .iter()
            .filter(|r| r.started.elapsed() >= inner.options.consume_timeout)
            .filter(|r| !r.settled.swap(true, Ordering::AcqRel))
            .cloned()
            .collect();
        for r in late {
            tracing::warn!(queue = %r.mq, offset = r.batch[0].queue_offset,
                timeout = ?inner.options.consume_timeout,
                "listener call ran past the consume timeout; reconsuming later");
            spawn_reconsume(&inner, pool, r.mq.clone(), r.epoch, (*r.batch).clone());
            // The call's count: its batch is settled, whenever the call returns.
            drop(ActiveGuard(inner.clone()));
        }
    }
}

/// A batch the listener failed (or a call past its timeout, or a panic): sent back to its
/// broker (clustering), else consumed again here after `reconsume_delay`. Counted alive from
/// this call, so shutdown waits for it.
fn spawn_reconsume(
    inner: &Arc<Inner>,
    pool: &ListenerPool,
    mq: MessageQueue,
    epoch: u64,
    batch: Vec<MessageExt>,
) {
    let guard = ActiveGuard::enter(inner);
    pool.runtime
        .spawn(reconsume(inner.clone(), mq, epoch, batch, guard));
}

async fn reconsume(
    inner: Arc<Inner>,
    mq: MessageQueue,
    epoch: u64,
    batch: Vec<MessageExt>,
    _guard: ActiveGuard,
) {
    let still_ours = {
        let qs = inner.queues.lock().expect("queues lock");
        qs.get(&mq)
            .is_some_and(|q| q.tracker.is_in_flight(epoch, batch[0].queue_offset))
    };
    if !still_ours {
        return; // the queue was reset or dropped meanwhile
    }
    let mut again = if inner.options.message_model == MessageModel::Clustering {
        send_back_batch(&inner, &mq, epoch, batch).await
    } else {
        // RocketMQ drops them; orbitmq keeps its local redelivery.
        tracing::warn!(queue = %mq, offset = batch[0].queue_offset,
            "broadcasting sends nothing back; consuming the messages again locally");
        batch
    };
    if again.is_empty() {
        return;
    }
    for m in &mut again {
        m.reconsume_times += 1;
    }
    tracing::debug!(queue = %mq, offset = again[0].queue_offset,
        times = again[0].reconsume_times, "message will be consumed again");
    consume_later(&inner, again, epoch, inner.options.reconsume_delay);
}

/// Sends each failed message back to its broker (delay level 0: the broker's backoff, or the
/// DLQ past `max_reconsume_times`); a message sent back counts as consumed. Returns those
/// whose send-back failed, to be consumed again locally.
async fn send_back_batch(
    inner: &Arc<Inner>,
    mq: &MessageQueue,
    epoch: u64,
    batch: Vec<MessageExt>,
) -> Vec<MessageExt> {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for m in batch {
        match inner
            .client
            .send_back(&m, &inner.group, 0, inner.options.max_reconsume_times)
            .await
        {
            Ok(r) => {
                tracing::debug!(queue = %mq, offset = m.queue_offset, to = %r.topic,
                    delay_level = r.delay_level, reconsume_times = r.reconsume_times,
                    "message sent back");
                done.push(m.queue_offset);
            }
            Err(e) => {
                tracing::warn!(queue = %mq, offset = m.queue_offset, error = %e,
                    "send-back failed; consuming the message again locally");
                failed.push(m);
            }
        }
    }
    if !done.is_empty() {
        if let Some(q) = inner.queues.lock().expect("queues lock").get_mut(mq) {
            for o in done {
                q.tracker.on_consumed(epoch, o);
            }
        }
        inner.progress.notify_waiters();
    }
    failed
}

async fn commit_all(inner: &Arc<Inner>) -> Result<()> {
    let todo: Vec<(MessageQueue, u64)> = inner
        .queues
        .lock()
        .expect("queues lock")
        .iter()
        .filter_map(|(mq, q)| q.tracker.pending_commit().map(|o| (mq.clone(), o)))
        .collect();
    let mut first_err = None;
    for (mq, offset) in todo {
        match inner
            .offsets
            .commit(&inner.client, &inner.group, &mq, offset)
            .await
        {
            Ok(()) => {
                if let Some(q) = inner.queues.lock().expect("queues lock").get_mut(&mq) {
                    q.tracker.mark_committed(offset);
                }
                tracing::trace!(queue = %mq, offset, "offset committed");
            }
            Err(e) => {
                tracing::warn!(queue = %mq, offset, error = %e, "offset commit failed");
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Commits every `commit_interval`; rebalances (following route changes too) every
/// `rebalance_interval` and at once when a broker says the group's members changed.
async fn maintenance_task(inner: Arc<Inner>) {
    let commit_every = inner.options.commit_interval;
    let rebalance_every = inner.options.rebalance_interval;
    let mut shut = inner.shut_rx.clone();
    let mut last_commit = tokio::time::Instant::now();
    let mut last_rebalance = tokio::time::Instant::now();
    loop {
        let next_commit = last_commit + commit_every;
        let next_rebalance = last_rebalance + rebalance_every;
        tokio::select! {
            _ = tokio::time::sleep_until(next_commit.min(next_rebalance)) => {}
            _ = inner.rebalance_wake.notified() => {}
            _ = shut.wait_for(|s| *s) => return,
        }
        if last_commit.elapsed() >= commit_every {
            last_commit = tokio::time::Instant::now();
            let _ = commit_all(&inner).await;
        }
        let notified = inner.rebalance_now.swap(false, Ordering::AcqRel);
        if notified || last_rebalance.elapsed() >= rebalance_every {
            last_rebalance = tokio::time::Instant::now();
            if let Err(e) = sync_assignment(&inner).await {
                tracing::warn!(group = %inner.group, error = %e, "rebalance failed");
            }
        }
    }
}

// ----- live offset reset (RESET_CONSUMER_CLIENT_OFFSET) -----

/// Applies the brokers' live offset resets for this consumer's group as they come.
async fn watch_resets(inner: Arc<Inner>) {
    let mut rx = inner.client.pushes();
    loop {
        let push = match rx.recv().await {
            Ok(p) => p,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(group = %inner.group, missed = n, "push observer lagged");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if push.code != orbitmq_proto::codes::push::RESET_CONSUMER_CLIENT_OFFSET {
            continue;
        }
        let Some(notice) = push.reset.filter(|n| n.group == inner.group) else {
            continue;
        };
        apply_reset(&inner, &notice);
    }
}

/// Moves each held queue the notice names to its new offset: what is in flight for it is
/// dropped (completions of it are ignored: a new tracker epoch), the next pull starts there,
/// and commits go on from it.
fn apply_reset(inner: &Arc<Inner>, notice: &orbitmq_proto::header::ResetOffsetNotice) {
    let mut moved = Vec::new();
    {
        let mut qs = inner.queues.lock().expect("queues lock");
        for o in &notice.offsets {
            let mq = MessageQueue::new(&notice.topic, &notice.broker_name, o.queue_id);
            let Some(q) = qs.get_mut(&mq) else {
                // Being taken by a rebalance right now: it applies once the queue is in place.
                if let Some(r) = inner.taking.lock().expect("taking lock").get_mut(&mq) {
                    *r = Some(o.offset);
                }
                continue;
            };
            q.tracker.reset(o.offset);
            // The broker committed it: the next commit is due once consumption moves on
            // (without this, reaching the old committed offset again would commit nothing).
            q.tracker.mark_committed(o.offset);
            orderly::on_reset(inner, &mq, q.tracker.epoch());
            moved.push((mq, o.offset));
        }
    }
    for (mq, offset) in &moved {
        tracing::info!(group = %inner.group, queue = %mq, offset, "offset reset by the broker");
    }
    if !moved.is_empty() {
        inner.repull.notify_waiters();
    }
}
