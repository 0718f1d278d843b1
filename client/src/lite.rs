//! The lite pull consumer: the application polls; the consumer keeps one long-polling pull in
//! flight per shard endpoint (covering all assigned queues of that shard), tracks positions,
//! and commits them to the broker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::client::{Client, PullTarget};
use crate::config::ClientConfig;
use crate::consumer::{offset_store, pull_lane, start_offset, ConsumerOptions, MessageModel};
use crate::error::{ClientError, Result};
use crate::filter::SubExpr;
use crate::local_offsets::OffsetStore;
use crate::message::MessageExt;
use crate::pull::{PullStatus, QueuePullResult};
use crate::rebalance;
use crate::route::{MessageQueue, QueueInfo};
use orbitmq_proto::limits::MAX_PULL_QUEUES;

/// Wait before pulling again from an endpoint whose last pull failed.
pub const LITE_PULL_ERROR_BACKOFF: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    None,
    Subscribe,
    Assign,
}

struct LiteQueue {
    expr: Arc<SubExpr>,
    /// Next offset to pull (and to commit: everything before it was returned by `poll`).
    position: Option<u64>,
    committed: Option<u64>,
}

struct State {
    mode: Mode,
    subs: BTreeMap<String, Arc<SubExpr>>,
    queues: BTreeMap<MessageQueue, LiteQueue>,
    /// Pulls in flight, by `endpoint#lane.chunk`, with the queues each covers.
    inflight: HashMap<String, (AbortHandle, Vec<MessageQueue>)>,
    /// Pulls (`endpoint#lane.chunk`) that failed, and when to try them again.
    backoff: HashMap<String, Instant>,
    last_commit: Instant,
    /// When the subscribed topics were last rebalanced (`None`: never).
    last_rebalance: Option<Instant>,
}

struct PullDone {
    /// `endpoint#chunk`.
    key: String,
    result: Result<Vec<QueuePullResult>>,
}

struct Inner {
    client: Client,
    owns_client: bool,
    group: String,
    options: ConsumerOptions,
    state: Mutex<State>,
    done_tx: mpsc::UnboundedSender<PullDone>,
    done_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<PullDone>>,
    shut: AtomicBool,
    /// Set by a broker's consumer-ids-changed notice: rebalance at the next poll.
    rebalance_now: Arc<AtomicBool>,
    notices: Mutex<Option<JoinHandle<()>>>,
    /// Applies live offset resets (RESET_CONSUMER_CLIENT_OFFSET) for the group.
    resets: Mutex<Option<JoinHandle<()>>>,
    offsets: OffsetStore,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.notices.lock().ok().and_then(|mut t| t.take()) {
            t.abort();
        }
        if let Some(t) = self.resets.lock().ok().and_then(|mut t| t.take()) {
            t.abort();
        }
        if let Ok(s) = self.state.lock() {
            for (h, _) in s.inflight.values() {
                h.abort();
            }
        }
    }
}

/// Splits one endpoint's queues into the pulls to keep in flight there: one per lane
/// ([`pull_lane`]), in pulls of at most [`MAX_PULL_QUEUES`] queues. Keyed
/// `endpoint#lane.chunk`.
fn pull_groups(endpoint: &str, targets: Vec<PullTarget>) -> Vec<(String, Vec<PullTarget>)> {
    let mut lanes: BTreeMap<u32, Vec<PullTarget>> = BTreeMap::new();
    for t in targets {
        lanes.entry(pull_lane(&t.queue.mq)).or_default().push(t);
    }
    let mut out = Vec::new();
    for (lane, queues) in lanes {
        for (c, chunk) in queues.chunks(MAX_PULL_QUEUES).enumerate() {
            out.push((format!("{endpoint}#{lane}.{c}"), chunk.to_vec()));
        }
    }
    out
}

/// RocketMQ's `DefaultLitePullConsumer`: subscribe or assign, then `poll`.
pub struct LitePullConsumer {
    inner: Arc<Inner>,
}

impl LitePullConsumer {
    pub async fn new(group: &str, config: ClientConfig) -> Result<LitePullConsumer> {
        Self::with_options(group, config, ConsumerOptions::default()).await
    }

    pub async fn with_options(
        group: &str,
        config: ClientConfig,
        options: ConsumerOptions,
    ) -> Result<LitePullConsumer> {
        let offsets = offset_store(group, &options)?;
        let client = Client::new(config).await?;
        Ok(Self::build(group, client, true, options, offsets))
    }

    /// A consumer sharing a client with others.
    pub fn with_client(
        group: &str,
        client: Client,
        options: ConsumerOptions,
    ) -> Result<LitePullConsumer> {
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
        client.register_consumer(group);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        LitePullConsumer {
            inner: Arc::new(Inner {
                client,
                owns_client,
                group: group.to_owned(),
                options,
                state: Mutex::new(State {
                    mode: Mode::None,
                    subs: BTreeMap::new(),
                    queues: BTreeMap::new(),
                    inflight: HashMap::new(),
                    backoff: HashMap::new(),
                    last_commit: Instant::now(),
                    last_rebalance: None,
                }),
                done_tx,
                done_rx: tokio::sync::Mutex::new(done_rx),
                shut: AtomicBool::new(false),
                rebalance_now: Arc::new(AtomicBool::new(false)),
                notices: Mutex::new(None),
                resets: Mutex::new(None),
                offsets,
            }),
        }
    }

    pub fn group(&self) -> &str {
        &self.inner.group
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("lite state lock")
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.shut.load(Ordering::Acquire) {
            Err(ClientError::ShutDown)
        } else {
            Ok(())
        }
    }

    /// Consumes `topic`'s messages that match `expr` (`*`, `TagA || TagB`): this consumer's
    /// share of the readable queues among the group's members, by the options' strategy,
    /// rebalanced every `rebalance_interval` and at a broker's notice (checked in `poll`).
    pub async fn subscribe(&self, topic: &str, expr: &str) -> Result<()> {
        self.subscribe_with(topic, SubExpr::parse(expr)?).await
    }

    /// As [`Self::subscribe`], with any selector: tags, or an SQL92 filter
    /// ([`SubExpr::sql`]).
    pub async fn subscribe_with(&self, topic: &str, expr: SubExpr) -> Result<()> {
        self.check_open()?;
        let expr = Arc::new(expr);
        orbitmq_proto::limits::validate_topic(topic)
            .map_err(|e| ClientError::InvalidArgument(format!("topic: {e}")))?;
        {
            let mut s = self.state();
            if s.mode == Mode::Assign {
                return Err(ClientError::InvalidArgument(
                    "subscribe and assign are mutually exclusive".into(),
                ));
            }
            s.mode = Mode::Subscribe;
            self.inner
                .client
                .set_subscription(&self.inner.group, topic, &expr);
            s.subs.insert(topic.to_owned(), expr);
            s.last_rebalance = None;
        }
        self.watch_resets();
        {
            let mut n = self.inner.notices.lock().expect("notices lock");
            if n.is_none() {
                *n = Some(rebalance::watch_notices(
                    self.inner.client.pushes(),
                    self.inner.group.clone(),
                    self.inner.rebalance_now.clone(),
                    Arc::new(tokio::sync::Notify::new()),
                ));
            }
        }
        // The brokers of the route must know this member before anyone computes shares.
        self.inner.client.topic_route(topic).await?;
        self.inner.client.register_consumer(&self.inner.group);
        if let Err(e) = self.inner.client.heartbeat().await {
            tracing::warn!(group = %self.inner.group, error = %e, "heartbeat at subscribe failed");
        }
        self.sync_subscriptions().await
    }

    /// Stops consuming a topic.
    pub fn unsubscribe(&self, topic: &str) {
        self.inner
            .client
            .remove_subscription(&self.inner.group, topic);
        let mut s = self.state();
        s.subs.remove(topic);
        s.queues.retain(|mq, _| mq.topic != topic);
    }

    /// Consumes exactly these queues (all messages), replacing any earlier assignment.
    pub async fn assign(&self, queues: Vec<MessageQueue>) -> Result<()> {
        self.check_open()?;
        for mq in &queues {
            self.inner.client.queue_info(mq).await?;
        }
        let mut s = self.state();
        if s.mode == Mode::Subscribe {
            return Err(ClientError::InvalidArgument(
                "subscribe and assign are mutually exclusive".into(),
            ));
        }
        s.mode = Mode::Assign;
        drop(s);
        self.watch_resets();
        let mut s = self.state();
        let all = Arc::new(SubExpr::All);
        let mut next = BTreeMap::new();
        for mq in queues {
            let q = s.queues.remove(&mq).unwrap_or(LiteQueue {
                expr: all.clone(),
                position: None,
                committed: None,
            });
            next.insert(mq, q);
        }
        s.queues = next;
        Ok(())
    }

    /// The queues this consumer reads.
    pub fn assignment(&self) -> Vec<MessageQueue> {
        self.state().queues.keys().cloned().collect()
    }

    /// Rebalances the subscribed topics when due (interval, notice, new subscription): drops
    /// the queues that went to other members, committing their positions first, and adds the
    /// new share's queues, which start at the group's committed offsets.
    async fn sync_subscriptions(&self) -> Result<()> {
        let (subs, first) = {
            let s = self.state();
            if s.mode != Mode::Subscribe {
                return Ok(());
            }
            let notified = self.inner.rebalance_now.swap(false, Ordering::AcqRel);
            let due = s
                .last_rebalance
                .is_none_or(|t| t.elapsed() >= self.inner.options.rebalance_interval);
            if !notified && !due {
                return Ok(());
            }
            let subs: Vec<(String, Arc<SubExpr>)> =
                s.subs.iter().map(|(t, e)| (t.clone(), e.clone())).collect();
            (subs, s.last_rebalance.is_none())
        };
        self.state().last_rebalance = Some(Instant::now());
        for (topic, expr) in subs {
            let share = match self.share(&topic).await {
                Ok(s) => s,
                Err(e) if first => return Err(e),
                Err(e) => {
                    tracing::warn!(group = %self.inner.group, %topic, error = %e,
                        "rebalance failed; keeping the current queues");
                    continue;
                }
            };
            let dropped: Vec<(MessageQueue, Option<u64>, Option<u64>)> = {
                let mut s = self.state();
                if !s.subs.contains_key(&topic) {
                    continue;
                }
                let held: BTreeSet<MessageQueue> = s
                    .queues
                    .keys()
                    .filter(|q| q.topic == topic)
                    .cloned()
                    .collect();
                let plan = rebalance::plan(&held, &share);
                let mut dropped = Vec::new();
                for mq in plan.drop {
                    if let Some(q) = s.queues.remove(&mq) {
                        dropped.push((mq, q.position, q.committed));
                    }
                }
                for mq in plan.add {
                    s.queues.insert(
                        mq,
                        LiteQueue {
                            expr: expr.clone(),
                            position: None,
                            committed: None,
                        },
                    );
                }
                for (mq, q) in s.queues.iter_mut() {
                    if mq.topic == topic {
                        q.expr = expr.clone();
                    }
                }
                if !dropped.is_empty() || !held.is_empty() || !share.is_empty() {
                    tracing::info!(group = %self.inner.group, %topic, held = held.len(),
                        now = share.len(), dropped = dropped.len(), "rebalanced");
                }
                dropped
            };
            // Hand-over: commit what this consumer returned before the new owner reads the
            // committed offset (a new owner that reads first re-delivers: at-least-once).
            if self.inner.options.auto_commit {
                for (mq, position, committed) in dropped {
                    let Some(p) = position.filter(|p| Some(*p) != committed) else {
                        continue;
                    };
                    if let Err(e) = self
                        .inner
                        .offsets
                        .commit(&self.inner.client, &self.inner.group, &mq, p)
                        .await
                    {
                        tracing::warn!(queue = %mq, offset = p, error = %e,
                            "commit of a dropped queue failed");
                    }
                }
            }
        }
        Ok(())
    }

    /// This consumer's queues of a topic: its clustering share, or (broadcasting) all.
    async fn share(&self, topic: &str) -> Result<BTreeSet<MessageQueue>> {
        if self.inner.options.message_model == MessageModel::Broadcasting {
            let route = self.inner.client.topic_route(topic).await?;
            return Ok(route.readable().iter().map(|q| q.mq.clone()).collect());
        }
        rebalance::topic_share(
            &self.inner.client,
            &self.inner.group,
            topic,
            &self.inner.options.allocate,
        )
        .await
    }

    /// Gives every queue without a position its start offset.
    async fn resolve_positions(&self) -> Result<()> {
        let missing: Vec<MessageQueue> = self
            .state()
            .queues
            .iter()
            .filter(|(_, q)| q.position.is_none())
            .map(|(mq, _)| mq.clone())
            .collect();
        for mq in missing {
            let (offset, committed) = start_offset(
                &self.inner.client,
                &self.inner.offsets,
                &self.inner.group,
                &mq,
                self.inner.options.consume_from_where,
            )
            .await?;
            if let Some(q) = self.state().queues.get_mut(&mq) {
                if q.position.is_none() {
                    q.position = Some(offset);
                    q.committed = committed.then_some(offset);
                }
            }
        }
        Ok(())
    }

    /// Starts the pulls of every endpoint with assigned queues ([`pull_groups`]) that are
    /// not in flight, leaving out queues that another pull in flight covers.
    async fn launch_pulls(&self, deadline: Instant) -> Result<()> {
        let wanted: Vec<(MessageQueue, Arc<SubExpr>, u64)> = {
            let s = self.state();
            s.queues
                .iter()
                .filter_map(|(mq, q)| q.position.map(|p| (mq.clone(), q.expr.clone(), p)))
                .collect()
        };
        let mut by_endpoint: BTreeMap<String, Vec<PullTarget>> = BTreeMap::new();
        for (mq, expr, offset) in wanted {
            let info: QueueInfo = match self.inner.client.queue_info(&mq).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(queue = %mq, error = %e, "no route for an assigned queue");
                    continue;
                }
            };
            by_endpoint
                .entry(info.endpoint.clone())
                .or_default()
                .push(PullTarget {
                    queue: info,
                    offset,
                    max_msgs: self.inner.options.pull_batch_size,
                    expr,
                });
        }
        let now = Instant::now();
        let suspend = deadline.saturating_duration_since(now);
        let mut s = self.state();
        // A queue is in one pull at a time, even if it moved to another chunk of its lane.
        let busy: BTreeSet<MessageQueue> = s
            .inflight
            .values()
            .flat_map(|(_, qs)| qs.iter().cloned())
            .collect();
        for (endpoint, targets) in by_endpoint {
            for (key, pull) in pull_groups(&endpoint, targets) {
                if s.inflight.contains_key(&key) || s.backoff.get(&key).is_some_and(|t| *t > now) {
                    continue;
                }
                let pull: Vec<PullTarget> = pull
                    .into_iter()
                    .filter(|t| !busy.contains(&t.queue.mq))
                    .collect();
                if pull.is_empty() {
                    continue;
                }
                let queues = pull.iter().map(|t| t.queue.mq.clone()).collect();
                let client = self.inner.client.clone();
                let group = self.inner.group.clone();
                let tx = self.inner.done_tx.clone();
                let ep = endpoint.clone();
                let max_bytes = self.inner.options.pull_max_bytes;
                let k = key.clone();
                let h = tokio::spawn(async move {
                    let result = client.pull(&ep, &group, &pull, max_bytes, suspend).await;
                    let _ = tx.send(PullDone { key: k, result });
                });
                s.inflight.insert(key, (h.abort_handle(), queues));
            }
        }
        Ok(())
    }

    /// Applies one finished pull; returns its messages (in queue order).
    fn apply(&self, done: PullDone) -> Result<Vec<MessageExt>> {
        let mut s = self.state();
        s.inflight.remove(&done.key);
        let results = match done.result {
            Ok(r) => r,
            Err(e) => {
                s.backoff
                    .insert(done.key.clone(), Instant::now() + LITE_PULL_ERROR_BACKOFF);
                let transient = matches!(
                    e,
                    ClientError::Timeout { .. }
                        | ClientError::Connect { .. }
                        | ClientError::ConnectionLost { .. }
                        | ClientError::SystemBusy(_)
                        | ClientError::ServiceUnavailable(_)
                        | ClientError::WrongShard { .. }
                        | ClientError::NameServerUnavailable { .. }
                );
                if transient {
                    tracing::warn!(pull = %done.key, error = %e, "pull failed; will retry");
                    return Ok(Vec::new());
                }
                return Err(e);
            }
        };
        s.backoff.remove(&done.key);
        let mut out = Vec::new();
        let mut failed = false;
        for r in results {
            let Some(q) = s.queues.get_mut(&r.mq) else {
                continue; // unassigned meanwhile
            };
            if q.position != Some(r.pulled_from) {
                continue; // seeked meanwhile: a stale result
            }
            match r.status {
                PullStatus::Found => {
                    q.position = Some(r.next_offset);
                    out.extend(r.messages);
                }
                PullStatus::NoNewMessages if r.next_offset >= r.pulled_from => {
                    q.position = Some(r.next_offset);
                }
                PullStatus::OffsetMoved => {
                    tracing::warn!(queue = %r.mq, from = r.pulled_from, to = r.next_offset,
                        "offset moved by the broker");
                    q.position = Some(r.next_offset);
                }
                PullStatus::NoNewMessages | PullStatus::RetryImmediately => {}
                PullStatus::WrongShard | PullStatus::TopicNotExist | PullStatus::Other(_) => {
                    // The broker answers at once while a queue is wrong: do not spin.
                    tracing::warn!(queue = %r.mq, status = ?r.status, reason = %r.reason,
                        "pull of a queue failed");
                    failed = true;
                }
            }
        }
        if failed {
            s.backoff
                .insert(done.key.clone(), Instant::now() + LITE_PULL_ERROR_BACKOFF);
        }
        Ok(out)
    }

    /// Waits up to `timeout` for messages of the assigned queues and returns those that
    /// arrived (possibly none). Messages of one queue come in queue order.
    pub async fn poll(&self, timeout: Duration) -> Result<Vec<MessageExt>> {
        self.check_open()?;
        let deadline = Instant::now() + timeout;
        self.sync_subscriptions().await?;
        self.resolve_positions().await?;
        let mut rx = self.inner.done_rx.lock().await;
        let mut out = Vec::new();
        loop {
            self.launch_pulls(deadline).await?;
            let wake = {
                let now = Instant::now();
                let s = self.state();
                // Wake for the first failed pull that may go again, or at the deadline.
                s.backoff
                    .values()
                    .filter(|t| **t > now)
                    .min()
                    .map_or(deadline, |b| (*b).min(deadline))
            };
            match tokio::time::timeout_at(wake, rx.recv()).await {
                Ok(Some(done)) => {
                    // Take whatever else already finished, then return what we have. A
                    // failed pull does not drop the others' messages: their positions have
                    // moved past them, so they are returned (the error comes again with the
                    // next try of that pull).
                    let mut failed = None;
                    let mut next = Some(done);
                    while let Some(done) = next.take().or_else(|| rx.try_recv().ok()) {
                        match self.apply(done) {
                            Ok(m) => out.extend(m),
                            Err(e) => {
                                failed.get_or_insert(e);
                            }
                        }
                    }
                    if let Some(e) = failed {
                        if out.is_empty() {
                            return Err(e);
                        }
                        tracing::warn!(group = %self.inner.group, error = %e,
                            "a pull failed; returning the other pulls' messages");
                    }
                    if !out.is_empty() {
                        break;
                    }
                }
                Ok(None) => return Err(ClientError::ShutDown),
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        drop(rx);
        if self.inner.options.auto_commit {
            let due = self.state().last_commit.elapsed() >= self.inner.options.commit_interval;
            if due {
                if let Err(e) = self.commit().await {
                    tracing::warn!(group = %self.inner.group, error = %e, "auto commit failed");
                }
            }
        }
        Ok(out)
    }

    /// Commits the position of every queue (the offset after the last message `poll`
    /// returned) to the broker.
    pub async fn commit(&self) -> Result<()> {
        let todo: Vec<(MessageQueue, u64)> = {
            let mut s = self.state();
            s.last_commit = Instant::now();
            s.queues
                .iter()
                .filter_map(|(mq, q)| match q.position {
                    Some(p) if q.committed != Some(p) => Some((mq.clone(), p)),
                    _ => None,
                })
                .collect()
        };
        let mut first_err = None;
        for (mq, offset) in todo {
            match self
                .inner
                .offsets
                .commit(&self.inner.client, &self.inner.group, &mq, offset)
                .await
            {
                Ok(()) => {
                    if let Some(q) = self.state().queues.get_mut(&mq) {
                        q.committed = Some(offset);
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %mq, offset, error = %e, "commit failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Moves a queue's position: the next `poll` returns messages from `offset` on. The
    /// offset must be within the queue's [min, max] offsets.
    pub async fn seek(&self, mq: &MessageQueue, offset: u64) -> Result<()> {
        self.check_open()?;
        if !self.state().queues.contains_key(mq) {
            return Err(ClientError::InvalidArgument(format!(
                "queue {mq} is not assigned to this consumer"
            )));
        }
        let min = self.inner.client.min_offset(mq).await?;
        let max = self.inner.client.max_offset(mq).await?;
        if offset < min || offset > max {
            return Err(ClientError::InvalidArgument(format!(
                "offset {offset} of queue {mq} is outside [{min}, {max}]"
            )));
        }
        if let Some(q) = self.state().queues.get_mut(mq) {
            q.position = Some(offset);
        }
        Ok(())
    }

    /// Starts applying the brokers' live offset resets of this group (once).
    fn watch_resets(&self) {
        let mut r = self.inner.resets.lock().expect("resets lock");
        if r.is_some() {
            return;
        }
        let mut rx = self.inner.client.pushes();
        // Weak: the task must not keep the consumer alive (its Drop aborts the task).
        let weak = Arc::downgrade(&self.inner);
        *r = Some(tokio::spawn(async move {
            loop {
                let push = match rx.recv().await {
                    Ok(p) => p,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if push.code != orbitmq_proto::codes::push::RESET_CONSUMER_CLIENT_OFFSET {
                    continue;
                }
                let Some(inner) = weak.upgrade() else { return };
                if let Some(n) = push.reset.filter(|n| n.group == inner.group) {
                    apply_reset(&inner, &n);
                }
            }
        }));
    }

    /// The next offset `poll` will return for a queue (`None` before the first poll).
    pub fn position(&self, mq: &MessageQueue) -> Option<u64> {
        self.state().queues.get(mq).and_then(|q| q.position)
    }

    /// The offset committed for this group on a queue (the broker's; broadcasting: this
    /// consumer's offsets file).
    pub async fn committed(&self, mq: &MessageQueue) -> Result<Option<u64>> {
        self.inner
            .offsets
            .read(&self.inner.client, &self.inner.group, mq)
            .await
    }

    /// Stops pulling, commits (with `auto_commit`) and closes the consumer's own client.
    pub async fn shutdown(&self) -> Result<()> {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        {
            let mut s = self.state();
            for (_, (h, _)) in s.inflight.drain() {
                h.abort();
            }
        }
        let res = if self.inner.options.auto_commit {
            self.commit().await
        } else {
            Ok(())
        };
        if let Some(t) = self.inner.notices.lock().expect("notices lock").take() {
            t.abort();
        }
        if let Some(t) = self.inner.resets.lock().expect("resets lock").take() {
            t.abort();
        }
        // Leaving tells the brokers, which notify the other members to take the queues.
        self.inner
            .client
            .leave_consumer_group(&self.inner.group)
            .await;
        if self.inner.owns_client {
            self.inner.client.shutdown().await;
        }
        res
    }
}

/// A live offset reset: each held queue the notice names moves to its new offset. A pull in
/// flight for it is ignored when it lands (it no longer starts at the position), and the
/// next commit writes the new offset (never the old position).
fn apply_reset(inner: &Inner, notice: &orbitmq_proto::header::ResetOffsetNotice) {
    let mut s = inner.state.lock().expect("lite state lock");
    for o in &notice.offsets {
        let mq = MessageQueue::new(&notice.topic, &notice.broker_name, o.queue_id);
        if let Some(q) = s.queues.get_mut(&mq) {
            q.position = Some(o.offset);
            // The broker has it; committing it again is harmless and repairs a commit of the
            // old position that crossed the reset.
            q.committed = None;
            tracing::info!(group = %inner.group, queue = %mq, offset = o.offset,
                "offset reset by the broker");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::PULL_LANES_PER_ENDPOINT;

    fn targets(n: u32) -> Vec<PullTarget> {
        let all = Arc::new(SubExpr::parse("*").unwrap());
        (0..n)
            .map(|q| PullTarget {
                queue: QueueInfo {
                    mq: MessageQueue {
                        topic: "T".into(),
                        broker_name: "b".into(),
                        queue_id: q,
                    },
                    shard: 0,
                    endpoint: "127.0.0.1:10911".into(),
                    perm: 6,
                },
                offset: u64::from(q) * 10,
                max_msgs: 32,
                expr: all.clone(),
            })
            .collect()
    }

    fn ids(pulls: &[(String, Vec<PullTarget>)]) -> Vec<(String, Vec<u32>)> {
        pulls
            .iter()
            .map(|(k, p)| (k.clone(), p.iter().map(|t| t.queue.mq.queue_id).collect()))
            .collect()
    }

    #[test]
    fn few_queues_get_a_pull_each() {
        let pulls = ids(&pull_groups("e", targets(3)));
        assert_eq!(
            pulls,
            vec![
                ("e#0.0".to_string(), vec![0]),
                ("e#1.0".to_string(), vec![1]),
                ("e#2.0".to_string(), vec![2]),
            ]
        );
    }

    #[test]
    fn many_queues_are_dealt_into_lanes_by_queue_id() {
        let n = PULL_LANES_PER_ENDPOINT * 2 + 1;
        let pulls = ids(&pull_groups("e", targets(n)));
        assert_eq!(pulls.len(), PULL_LANES_PER_ENDPOINT as usize);
        let step = PULL_LANES_PER_ENDPOINT;
        assert_eq!(pulls[0], ("e#0.0".to_string(), vec![0, step, 2 * step]));
        assert_eq!(pulls[1], ("e#1.0".to_string(), vec![1, step + 1]));
        // Every queue is in exactly one pull, with its own offset.
        let mut all: Vec<u32> = pulls.iter().flat_map(|(_, q)| q.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn a_group_over_the_queue_bound_is_split_into_chunks() {
        let n = (PULL_LANES_PER_ENDPOINT as usize * (MAX_PULL_QUEUES + 1)) as u32;
        let pulls = pull_groups("e", targets(n));
        assert_eq!(pulls.len(), 2 * PULL_LANES_PER_ENDPOINT as usize);
        assert!(pulls.iter().all(|(_, p)| p.len() <= MAX_PULL_QUEUES));
        assert_eq!(pulls[0].0, "e#0.0");
        assert_eq!(pulls[1].0, "e#0.1");
        assert_eq!(pulls[1].1.len(), 1);
        assert!(pulls
            .iter()
            .flat_map(|(_, p)| p)
            .all(|t| t.offset == u64::from(t.queue.mq.queue_id) * 10));
    }
}
