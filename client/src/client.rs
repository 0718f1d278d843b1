//! The client instance (RocketMQ's `MQClientInstance`): connections, the route cache, name
//! server failover, heartbeats, and the requests producers and consumers share.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use orbitmq_proto::codes::{push as push_code, request, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{
    self, ConsumerConnectionResponse, ConsumerListResponse, GroupRequest, GroupSubscriptions,
    HeartbeatRequest, HeartbeatSubscriptions, OffsetResponse, PullQueue, PullRequest, PullResponse,
    QueueRequest, QueueValueRequest, RouteRequest, RouteResponse, SubscriptionData,
};
use orbitmq_proto::header::{SendBackRequest, SendBackResponse};
use orbitmq_proto::limits::{MAX_GROUP_LEN, MAX_PULL_BYTES, MAX_PULL_QUEUES, MAX_PULL_SUSPEND_MS};
use orbitmq_proto::msgid::OffsetId;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::error::{bad_header, ClientError, Result};
use crate::filter::SubExpr;
use crate::message::MessageExt;
use crate::pull::{decode_pull_response, QueuePullResult};
use crate::remoting::{Connection, Push, Remoting};
use crate::route::{Lookup, MessageQueue, QueueInfo, RouteTable, TopicRoute};

/// Added to a pull's suspend time to make its request timeout (the broker answers at the
/// end of the suspend; this covers the network and a busy broker).
pub const PULL_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// Attempts of an offset request when the queue moved or the connection broke.
pub const QUEUE_REQUEST_ATTEMPTS: u32 = 2;
/// A cached route is used without asking the name server for this many refresh intervals:
/// the periodic refresh renews it in the background, so sends never wait for a name server
/// (a route an error invalidated is fetched at once).
pub const ROUTE_MAX_AGE_INTERVALS: u32 = 3;

static INSTANCE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// One queue of a pull request.
#[derive(Clone, Debug)]
pub struct PullTarget {
    pub queue: QueueInfo,
    pub offset: u64,
    pub max_msgs: u32,
    pub expr: Arc<SubExpr>,
}

#[derive(Default)]
struct Groups {
    producers: BTreeSet<String>,
    consumers: BTreeSet<String>,
    /// Consumer group -> topic -> tag expression, sent with heartbeats.
    /// Per group, per topic: the expression and its type.
    subscriptions: BTreeMap<String, BTreeMap<String, (String, u8)>>,
}

struct Inner {
    config: ClientConfig,
    client_id: String,
    local_ip: IpAddr,
    remoting: Remoting,
    routes: Mutex<RouteTable>,
    /// One lock per topic so concurrent callers of a stale route fetch it once.
    route_fetch: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    namesrv_cursor: AtomicUsize,
    groups: Mutex<Groups>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// A handle to a client instance; cheap to clone. Producers and consumers each make one, or
/// share one through their `with_client` constructors.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("client_id", &self.inner.client_id)
            .field("namesrv", &self.inner.config.namesrv)
            .finish()
    }
}

/// The address this host would use to reach `target` (no packet is sent).
fn local_ip_towards(target: &str) -> IpAddr {
    let probe = || -> Option<IpAddr> {
        let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
        sock.connect(target).ok()?;
        Some(sock.local_addr().ok()?.ip())
    };
    probe().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

pub(crate) fn validate_group(kind: &str, group: &str) -> Result<()> {
    if group.is_empty() || group.len() > MAX_GROUP_LEN {
        return Err(ClientError::InvalidArgument(format!(
            "{kind} group must be 1..={MAX_GROUP_LEN} bytes, got {}",
            group.len()
        )));
    }
    if let Some(ch) = group
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '%' | '|' | '-' | '_')))
    {
        return Err(ClientError::InvalidArgument(format!(
            "{kind} group {group:?} has the character {ch:?}; allowed: letters, digits, '%', '|', '-', '_'"
        )));
    }
    Ok(())
}

use orbitmq_proto::now_ms;

impl Client {
    /// Creates a client: checks the configuration and TLS settings and starts the route
    /// refresh and heartbeat tasks. Connections are made on first use. Needs a tokio runtime.
    pub async fn new(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let remoting = Remoting::new(&config)?;
        let local_ip = local_ip_towards(&config.namesrv[0]);
        let client_id = if config.client_id.is_empty() {
            format!(
                "{local_ip}@{}@{}",
                std::process::id(),
                INSTANCE_COUNTER.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            config.client_id.clone()
        };
        let client = Client {
            inner: Arc::new(Inner {
                config,
                client_id,
                local_ip,
                remoting,
                routes: Mutex::new(RouteTable::new()),
                route_fetch: Mutex::new(HashMap::new()),
                namesrv_cursor: AtomicUsize::new(0),
                groups: Mutex::new(Groups::default()),
                tasks: Mutex::new(Vec::new()),
                shut: AtomicBool::new(false),
            }),
        };
        client.start_tasks();
        tracing::debug!(client_id = %client.inner.client_id, "client started");
        Ok(client)
    }

    fn start_tasks(&self) {
        let weak = Arc::downgrade(&self.inner);
        let routes = tokio::spawn(route_refresh_task(
            weak.clone(),
            self.inner.config.poll_name_server_interval,
        ));
        let heartbeats = tokio::spawn(heartbeat_task(
            weak.clone(),
            self.inner.config.heartbeat_interval,
        ));
        let pushes = tokio::spawn(push_watch_task(weak, self.inner.remoting.pushes()));
        self.inner
            .tasks
            .lock()
            .expect("tasks lock")
            .extend([routes, heartbeats, pushes]);
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    pub fn client_id(&self) -> &str {
        &self.inner.client_id
    }

    /// The address of this host, used in unique keys.
    pub fn local_ip(&self) -> IpAddr {
        self.inner.local_ip
    }

    /// Notices the brokers push (all connections of this client).
    pub fn pushes(&self) -> broadcast::Receiver<Push> {
        self.inner.remoting.pushes()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.shut.load(Ordering::Acquire) {
            Err(ClientError::ShutDown)
        } else {
            Ok(())
        }
    }

    pub(crate) fn register_producer(&self, group: &str) {
        self.inner
            .groups
            .lock()
            .expect("groups lock")
            .producers
            .insert(group.to_owned());
    }

    pub(crate) fn unregister_producer(&self, group: &str) {
        self.inner
            .groups
            .lock()
            .expect("groups lock")
            .producers
            .remove(group);
    }

    pub(crate) fn register_consumer(&self, group: &str) {
        self.inner
            .groups
            .lock()
            .expect("groups lock")
            .consumers
            .insert(group.to_owned());
    }

    pub(crate) fn unregister_consumer(&self, group: &str) {
        let mut g = self.inner.groups.lock().expect("groups lock");
        g.consumers.remove(group);
        g.subscriptions.remove(group);
    }

    /// Records a subscription of a consumer group: heartbeats tell the brokers, which check
    /// that the members of a group agree.
    pub(crate) fn set_subscription(&self, group: &str, topic: &str, expr: &SubExpr) {
        self.inner
            .groups
            .lock()
            .expect("groups lock")
            .subscriptions
            .entry(group.to_owned())
            .or_default()
            .insert(topic.to_owned(), (expr.to_string(), expr.expr_type()));
    }

    pub(crate) fn remove_subscription(&self, group: &str, topic: &str) {
        if let Some(m) = self
            .inner
            .groups
            .lock()
            .expect("groups lock")
            .subscriptions
            .get_mut(group)
        {
            m.remove(topic);
        }
    }

    /// The members of a consumer group with their subscriptions, and the conflicts among
    /// them, as one broker endpoint sees them.
    pub async fn consumer_connections(
        &self,
        endpoint: &str,
        group: &str,
    ) -> Result<ConsumerConnectionResponse> {
        let f = self
            .group_call(endpoint, request::GET_CONSUMER_CONNECTION_LIST, group)
            .await?;
        header::decode(&f.header).map_err(bad_header(endpoint))
    }

    pub(crate) async fn connection(&self, endpoint: &str) -> Result<Arc<Connection>> {
        self.check_open()?;
        self.inner.remoting.connection(endpoint).await
    }

    /// Sends a request to an endpoint; returns the response frame if its code is SUCCESS,
    /// else the mapped error.
    pub(crate) async fn call(
        &self,
        endpoint: &str,
        code: u16,
        header: Bytes,
        body: Bytes,
        timeout: Duration,
        topic: &str,
    ) -> Result<Frame> {
        let conn = self.connection(endpoint).await?;
        let f = conn.request(code, header, body, timeout).await?;
        // A send a SYNC_MASTER stored without its slave's copy is answered with its results
        // and a status code: not an error (retrying would store it twice).
        let stored =
            code == request::SEND_MESSAGE && crate::producer::SendStatus::of_code(f.code).is_some();
        if f.code == response::SUCCESS || stored {
            Ok(f)
        } else {
            Err(ClientError::from_response(f.code, &f.header, topic))
        }
    }

    /// Sends any request to an endpoint and returns the response frame whatever its code
    /// (admin tools and protocol tests; producers and consumers never need it).
    pub async fn request(
        &self,
        endpoint: &str,
        code: u16,
        header: Bytes,
        body: Bytes,
    ) -> Result<Frame> {
        let conn = self.connection(endpoint).await?;
        conn.request(code, header, body, self.inner.config.request_timeout)
            .await
    }

    /// Like [`Client::call`] but returns the response whatever its code.
    async fn call_raw(
        &self,
        endpoint: &str,
        code: u16,
        header: Bytes,
        timeout: Duration,
    ) -> Result<Frame> {
        let conn = self.connection(endpoint).await?;
        conn.request(code, header, Bytes::new(), timeout).await
    }

    // ----- name server -----

    /// Sends a request to the name servers with failover (the first that answers, the next
    /// when one cannot be reached); returns the response if it is SUCCESS, else its error.
    pub async fn call_name_server(&self, code: u16, header: Bytes, topic: &str) -> Result<Frame> {
        self.call_namesrv(code, header, topic).await
    }

    /// Sends a request to the name servers, starting with the one that answered last and
    /// moving on to the next when one cannot be reached.
    async fn call_namesrv(&self, code: u16, header: Bytes, topic: &str) -> Result<Frame> {
        let addrs = &self.inner.config.namesrv;
        let start = self.inner.namesrv_cursor.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..addrs.len() {
            let i = (start + k) % addrs.len();
            let addr = &addrs[i];
            let res = self
                .call(
                    addr,
                    code,
                    header.clone(),
                    Bytes::new(),
                    self.inner.config.request_timeout,
                    topic,
                )
                .await;
            match res {
                Err(
                    e @ (ClientError::Connect { .. }
                    | ClientError::ConnectionLost { .. }
                    | ClientError::Timeout { .. }
                    | ClientError::Tls(_)
                    | ClientError::Protocol { .. }
                    | ClientError::SystemBusy(_)),
                ) => {
                    tracing::warn!(namesrv = %addr, error = %e, "name server failed, trying the next");
                    last = Some(e);
                }
                other => {
                    if i != start {
                        self.inner.namesrv_cursor.store(i, Ordering::Relaxed);
                    }
                    return other;
                }
            }
        }
        let last = last.map(|e| e.to_string()).unwrap_or_default();
        // Keep the TLS error as it is: it tells the user what to fix.
        if last.starts_with("TLS") && addrs.len() == 1 {
            return Err(ClientError::Tls(
                last.trim_start_matches("TLS: ").to_owned(),
            ));
        }
        Err(ClientError::NameServerUnavailable {
            addrs: addrs.join(";"),
            last,
        })
    }

    async fn fetch_route(&self, topic: &str) -> Result<TopicRoute> {
        let header = header::encode(&RouteRequest {
            topic: topic.to_owned(),
        });
        let f = self
            .call_namesrv(request::GET_ROUTEINFO_BY_TOPIC, header, topic)
            .await?;
        let r: RouteResponse = header::decode(&f.header).map_err(|e| ClientError::Protocol {
            endpoint: "name server".into(),
            reason: e.to_string(),
        })?;
        TopicRoute::from_response(topic, r).map_err(|reason| ClientError::Protocol {
            endpoint: "name server".into(),
            reason,
        })
    }

    /// The route of a topic: from the cache when fresh, else from the name server (and, if
    /// that fails, the stale cached route when there is one).
    pub async fn topic_route(&self, topic: &str) -> Result<Arc<TopicRoute>> {
        self.check_open()?;
        let max_age = self.inner.config.poll_name_server_interval * ROUTE_MAX_AGE_INTERVALS;
        if let Lookup::Fresh(r) = self.lookup(topic, max_age) {
            return Ok(r);
        }
        let lock = self.route_fetch_lock(topic);
        let _g = lock.lock().await;
        let stale = match self.lookup(topic, max_age) {
            Lookup::Fresh(r) => return Ok(r),
            Lookup::Stale(r) => Some(r),
            Lookup::Missing => None,
        };
        match self.fetch_route(topic).await {
            Ok(route) => Ok(self.store_route(route)),
            Err(e) => match stale {
                Some(r) if !matches!(e, ClientError::TopicNotExist(_)) => {
                    tracing::warn!(%topic, error = %e, "route refresh failed; using the cached route");
                    Ok(r)
                }
                _ => Err(e),
            },
        }
    }

    /// The lock that makes one fetch of `topic`'s route at a time (the others wait for it).
    fn route_fetch_lock(&self, topic: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .route_fetch
            .lock()
            .expect("route_fetch lock")
            .entry(topic.to_owned())
            .or_default()
            .clone()
    }

    /// Fetches a topic's route from the name server now.
    pub async fn refresh_route(&self, topic: &str) -> Result<Arc<TopicRoute>> {
        self.invalidate_route(topic);
        self.topic_route(topic).await
    }

    /// The periodic refresh: fetches a route and replaces the cached one on success, leaving
    /// the cached one in use meanwhile (and on failure).
    async fn renew_route(&self, topic: &str) -> Result<()> {
        let lock = self.route_fetch_lock(topic);
        let _g = lock.lock().await;
        let route = self.fetch_route(topic).await?;
        self.store_route(route);
        Ok(())
    }

    fn lookup(&self, topic: &str, max_age: Duration) -> Lookup {
        self.inner.routes.lock().expect("routes lock").get(
            topic,
            std::time::Instant::now(),
            max_age,
        )
    }

    fn store_route(&self, route: TopicRoute) -> Arc<TopicRoute> {
        let topic = route.topic.clone();
        let mut t = self.inner.routes.lock().expect("routes lock");
        if t.insert(route, std::time::Instant::now()) {
            tracing::debug!(%topic, "route updated");
        }
        match t.get(&topic, std::time::Instant::now(), Duration::MAX) {
            Lookup::Fresh(r) | Lookup::Stale(r) => r,
            Lookup::Missing => unreachable!("route was just inserted"),
        }
    }

    /// Marks a topic's route for refresh on its next use.
    pub fn invalidate_route(&self, topic: &str) {
        self.inner
            .routes
            .lock()
            .expect("routes lock")
            .invalidate(topic);
    }

    /// Follows a WRONG_SHARD redirect for one queue until the next route refresh.
    pub(crate) fn redirect_queue(&self, mq: &MessageQueue, endpoint: &str) {
        if crate::remoting::split_host_port(endpoint).is_ok()
            && self
                .inner
                .routes
                .lock()
                .expect("routes lock")
                .redirect(mq, endpoint)
        {
            tracing::info!(queue = %mq, %endpoint, "queue redirected to another shard");
        }
    }

    /// The current info of a queue (route fetched if needed).
    pub async fn queue_info(&self, mq: &MessageQueue) -> Result<QueueInfo> {
        let route = self.topic_route(&mq.topic).await?;
        route
            .find(mq)
            .cloned()
            .ok_or_else(|| ClientError::InvalidArgument(format!("queue {mq} is not in the route")))
    }

    // ----- broker requests -----

    async fn queue_request(
        &self,
        code: u16,
        group: &str,
        mq: &MessageQueue,
        value: Option<u64>,
    ) -> Result<Frame> {
        let header = match value {
            None => header::encode(&QueueRequest {
                group: group.to_owned(),
                topic: mq.topic.clone(),
                queue_id: mq.queue_id,
            }),
            Some(value) => header::encode(&QueueValueRequest {
                group: group.to_owned(),
                topic: mq.topic.clone(),
                queue_id: mq.queue_id,
                value,
            }),
        };
        let mut attempt = 1;
        loop {
            let qi = self.queue_info(mq).await?;
            let res = self
                .call_raw(
                    &qi.endpoint,
                    code,
                    header.clone(),
                    self.inner.config.request_timeout,
                )
                .await;
            let err = match &res {
                Ok(f) if f.code == response::WRONG_SHARD => {
                    ClientError::from_response(f.code, &f.header, &mq.topic)
                }
                Err(e) => e.clone(),
                Ok(_) => return res,
            };
            if let ClientError::WrongShard { redirect, .. } = &err {
                self.redirect_queue(mq, redirect);
            }
            if err.invalidates_route() {
                self.invalidate_route(&mq.topic);
            }
            // Moved queues and broken connections get one more try on the new route.
            let again = matches!(
                err,
                ClientError::WrongShard { .. } | ClientError::ConnectionLost { .. }
            );
            if !again || attempt >= QUEUE_REQUEST_ATTEMPTS {
                return res;
            }
            attempt += 1;
        }
    }

    fn offset_of(&self, f: &Frame, what: &str) -> Result<u64> {
        header::decode::<OffsetResponse>(&f.header)
            .map(|r| r.offset)
            .map_err(|e| ClientError::Protocol {
                endpoint: what.to_owned(),
                reason: e.to_string(),
            })
    }

    async fn offset_request(
        &self,
        code: u16,
        group: &str,
        mq: &MessageQueue,
        value: Option<u64>,
    ) -> Result<u64> {
        let f = self.queue_request(code, group, mq, value).await?;
        if f.code != response::SUCCESS {
            return Err(ClientError::from_response(f.code, &f.header, &mq.topic));
        }
        self.offset_of(&f, request::name(code))
    }

    /// The smallest offset still stored in a queue.
    pub async fn min_offset(&self, mq: &MessageQueue) -> Result<u64> {
        self.offset_request(request::GET_MIN_OFFSET, "", mq, None)
            .await
    }

    /// The offset the next message of a queue will get.
    pub async fn max_offset(&self, mq: &MessageQueue) -> Result<u64> {
        self.offset_request(request::GET_MAX_OFFSET, "", mq, None)
            .await
    }

    /// The offset of the first message stored at or after `timestamp_ms`.
    pub async fn search_offset(&self, mq: &MessageQueue, timestamp_ms: u64) -> Result<u64> {
        self.offset_request(
            request::SEARCH_OFFSET_BY_TIMESTAMP,
            "",
            mq,
            Some(timestamp_ms),
        )
        .await
    }

    /// The offset a group committed on a queue; `None` if it never committed one.
    pub async fn query_consumer_offset(
        &self,
        group: &str,
        mq: &MessageQueue,
    ) -> Result<Option<u64>> {
        let f = self
            .queue_request(request::QUERY_CONSUMER_OFFSET, group, mq, None)
            .await?;
        match f.code {
            response::SUCCESS => self.offset_of(&f, "QUERY_CONSUMER_OFFSET").map(Some),
            response::QUERY_NOT_FOUND => Ok(None),
            code => Err(ClientError::from_response(code, &f.header, &mq.topic)),
        }
    }

    /// Commits a group's offset (the next offset to consume) on a queue.
    pub async fn update_consumer_offset(
        &self,
        group: &str,
        mq: &MessageQueue,
        offset: u64,
    ) -> Result<()> {
        let f = self
            .queue_request(request::UPDATE_CONSUMER_OFFSET, group, mq, Some(offset))
            .await?;
        if f.code != response::SUCCESS {
            return Err(ClientError::from_response(f.code, &f.header, &mq.topic));
        }
        Ok(())
    }

    /// Pulls from several queues of one shard endpoint in one request. The broker answers
    /// as soon as one queue has messages, or after `suspend` with PULL_NOT_FOUND.
    /// Records are re-checked against each queue's expression (exact tags) and filtered
    /// ones dropped; `next_offset` still moves past them.
    pub async fn pull(
        &self,
        endpoint: &str,
        group: &str,
        targets: &[PullTarget],
        max_bytes: u32,
        suspend: Duration,
    ) -> Result<Vec<QueuePullResult>> {
        if targets.is_empty() || targets.len() > MAX_PULL_QUEUES {
            return Err(ClientError::InvalidArgument(format!(
                "a pull covers 1..={MAX_PULL_QUEUES} queues, got {}",
                targets.len()
            )));
        }
        let suspend_ms = suspend.as_millis().min(u128::from(MAX_PULL_SUSPEND_MS)) as u32;
        let header = header::encode(&PullRequest {
            group: group.to_owned(),
            queues: targets
                .iter()
                .map(|t| PullQueue {
                    topic: t.queue.mq.topic.clone(),
                    queue_id: t.queue.mq.queue_id,
                    offset: t.offset,
                    max_msgs: t.max_msgs,
                    sub_expr: t.expr.to_string(),
                    expr_type: t.expr.expr_type(),
                })
                .collect(),
            max_bytes: max_bytes.min(MAX_PULL_BYTES as u32),
            suspend_ms,
        });
        let timeout = Duration::from_millis(u64::from(suspend_ms)) + PULL_TIMEOUT_MARGIN;
        let conn = self.connection(endpoint).await?;
        let f = conn
            .request(request::PULL_MESSAGE, header, Bytes::new(), timeout)
            .await?;
        if f.code != response::SUCCESS {
            let topic = &targets[0].queue.mq.topic;
            let e = ClientError::from_response(f.code, &f.header, topic);
            if let ClientError::WrongShard { redirect, .. } = &e {
                if targets.len() == 1 {
                    self.redirect_queue(&targets[0].queue.mq, redirect);
                }
            }
            if e.invalidates_route() {
                for t in targets {
                    self.invalidate_route(&t.queue.mq.topic);
                }
            }
            return Err(e);
        }
        let header: PullResponse = header::decode(&f.header).map_err(bad_header(endpoint))?;
        let results =
            decode_pull_response(header, &f.body, targets, conn.addr()).map_err(|reason| {
                ClientError::Protocol {
                    endpoint: endpoint.to_owned(),
                    reason,
                }
            })?;
        for r in &results {
            if r.status.invalidates_route() {
                self.invalidate_route(&r.mq.topic);
            }
        }
        Ok(results)
    }

    /// Sends a heartbeat to every broker endpoint of the cached routes.
    pub async fn heartbeat(&self) -> Result<()> {
        self.to_brokers(request::HEART_BEAT).await
    }

    /// Tells every broker of the cached routes that this client left (UNREGISTER_CLIENT), so
    /// its groups rebalance now rather than after the client expiry.
    pub async fn unregister(&self) -> Result<()> {
        self.to_brokers(request::UNREGISTER_CLIENT).await
    }

    /// A consumer of `group` stopped: the brokers forget this client (its groups rebalance),
    /// then hear its remaining groups again if it has any.
    pub(crate) async fn leave_consumer_group(&self, group: &str) {
        self.unregister_consumer(group);
        if let Err(e) = self.unregister().await {
            tracing::debug!(%group, error = %e, "unregister failed");
        }
        let remaining = {
            let g = self.inner.groups.lock().expect("groups lock");
            !g.consumers.is_empty() || !g.producers.is_empty()
        };
        if remaining {
            let _ = self.heartbeat().await;
        }
    }

    /// Asks `endpoint` about `group` (a request whose header is a [`GroupRequest`]).
    async fn group_call(&self, endpoint: &str, code: u16, group: &str) -> Result<Frame> {
        let h = header::encode(&GroupRequest {
            group: group.to_owned(),
        });
        let timeout = self.inner.config.request_timeout;
        self.call(endpoint, code, h, Bytes::new(), timeout, "")
            .await
    }

    /// The live consumer ids of a group as one broker endpoint knows them, sorted.
    pub async fn consumer_ids(&self, endpoint: &str, group: &str) -> Result<Vec<String>> {
        let f = self
            .group_call(endpoint, request::GET_CONSUMER_LIST_BY_GROUP, group)
            .await?;
        let r: ConsumerListResponse = header::decode(&f.header).map_err(bad_header(endpoint))?;
        Ok(r.client_ids)
    }

    async fn to_brokers(&self, code: u16) -> Result<()> {
        self.check_open()?;
        let endpoints = self.inner.routes.lock().expect("routes lock").endpoints();
        let (header, body) = {
            let g = self.inner.groups.lock().expect("groups lock");
            let header = header::encode(&HeartbeatRequest {
                client_id: self.inner.client_id.clone(),
                producer_groups: g.producers.iter().cloned().collect(),
                consumer_groups: g.consumers.iter().cloned().collect(),
            });
            let groups: Vec<GroupSubscriptions> = g
                .subscriptions
                .iter()
                .filter(|(group, subs)| g.consumers.contains(*group) && !subs.is_empty())
                .map(|(group, subs)| GroupSubscriptions {
                    group: group.clone(),
                    subscriptions: subs
                        .iter()
                        .map(|(topic, (expr, expr_type))| SubscriptionData {
                            topic: topic.clone(),
                            expr: expr.clone(),
                            expr_type: *expr_type,
                        })
                        .collect(),
                })
                .collect();
            // Unregistering needs no body; without subscriptions the body stays empty.
            let body = if groups.is_empty() || code != request::HEART_BEAT {
                Bytes::new()
            } else {
                header::encode(&HeartbeatSubscriptions { groups })
            };
            (header, body)
        };
        let mut first_err = None;
        for ep in endpoints {
            let res = self
                .call(
                    &ep,
                    code,
                    header.clone(),
                    body.clone(),
                    self.inner.config.request_timeout,
                    "",
                )
                .await;
            if let Err(e) = res {
                tracing::debug!(endpoint = %ep, error = %e, "heartbeat failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Stops the background tasks and closes every connection.
    pub async fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.inner.tasks.lock().expect("tasks lock"));
        for t in tasks {
            t.abort();
        }
        self.inner.remoting.close().await;
        tracing::debug!(client_id = %self.inner.client_id, "client shut down");
    }

    pub(crate) fn now_ms() -> u64 {
        now_ms()
    }
}

/// Attempts of a send-back: the endpoint the route (or the message id) names, then the
/// shards a WRONG_SHARD redirect names.
pub const SEND_BACK_ATTEMPTS: u32 = 3;

/// Retry and dead letters (CONSUMER_SEND_MSG_BACK).
impl Client {
    /// Hands a message `group` failed to consume back to the broker it came from, which
    /// stores it in `%RETRY%<group>` to come again after a delay level (0: the broker's
    /// backoff, `3 + reconsume times`; > 0: that level), or in `%DLQ%<group>` once its
    /// reconsume times pass `max_reconsume_times` (or for a negative level). Goes to the shard
    /// that owns queue 0 of the retry topic on the message's broker, following WRONG_SHARD.
    pub async fn send_back(
        &self,
        msg: &MessageExt,
        group: &str,
        delay_level: i32,
        max_reconsume_times: u32,
    ) -> Result<SendBackResponse> {
        validate_group("consumer", group)?;
        let record = msg.record_bytes().clone();
        if record.is_empty() {
            return Err(ClientError::InvalidArgument(
                "a send-back needs a message as pulled (it has no stored record)".into(),
            ));
        }
        let retry = orbitmq_proto::sys::retry_topic(group);
        let mq = MessageQueue::new(&retry, &msg.broker_name, 0);
        let mut endpoint = match self.queue_info(&mq).await {
            Ok(q) => q.endpoint,
            // Not routed yet (the topic is made at the group's first heartbeat): the shard the
            // message came from knows the owner and redirects.
            Err(e) => match OffsetId::decode(&msg.msg_id) {
                Some(id) => {
                    let [a, b, c, d] = id.ip;
                    tracing::debug!(queue = %mq, error = %e,
                        "no route to the retry queue yet; asking the message's shard");
                    format!("{a}.{b}.{c}.{d}:{}", id.port)
                }
                None => return Err(e),
            },
        };
        let header = header::encode(&SendBackRequest {
            group: group.to_owned(),
            msg_id: msg.msg_id.clone(),
            delay_level,
            max_reconsume_times,
        });
        let mut attempt = 1;
        loop {
            let res = self
                .call(
                    &endpoint,
                    request::CONSUMER_SEND_MSG_BACK,
                    header.clone(),
                    record.clone(),
                    self.inner.config.request_timeout,
                    &retry,
                )
                .await;
            match res {
                Ok(f) => {
                    return header::decode(&f.header).map_err(|e| ClientError::Protocol {
                        endpoint,
                        reason: format!("send-back response: {e}"),
                    })
                }
                Err(ClientError::WrongShard { redirect, .. })
                    if !redirect.is_empty() && attempt < SEND_BACK_ATTEMPTS =>
                {
                    self.redirect_queue(&mq, &redirect);
                    tracing::debug!(queue = %mq, from = %endpoint, to = %redirect,
                        "send-back redirected");
                    endpoint = redirect;
                    attempt += 1;
                }
                Err(e) => {
                    if e.invalidates_route() {
                        self.invalidate_route(&retry);
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// The live offset reset (admin side).
impl Client {
    /// INVOKE_BROKER_TO_RESET_OFFSET: asks the shard at `endpoint` (the owner of these queues
    /// of `topic` on broker `broker_name`) to commit `offsets` (queue id, offset) for `group`
    /// and push them to the group's live consumers, which move there before their next commit.
    pub async fn reset_offset(
        &self,
        endpoint: &str,
        group: &str,
        topic: &str,
        broker_name: &str,
        offsets: &[(u32, u64)],
    ) -> Result<()> {
        let h = header::encode(&orbitmq_proto::header::ResetOffsetRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            broker_name: broker_name.to_owned(),
            offsets: offsets
                .iter()
                .map(|&(queue_id, offset)| orbitmq_proto::header::QueueOffset { queue_id, offset })
                .collect(),
        });
        self.call(
            endpoint,
            request::INVOKE_BROKER_TO_RESET_OFFSET,
            h,
            Bytes::new(),
            self.inner.config.request_timeout,
            topic,
        )
        .await
        .map(drop)
    }
}

async fn route_refresh_task(weak: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let client = Client { inner };
        let topics = client.inner.routes.lock().expect("routes lock").topics();
        for topic in topics {
            if let Err(e) = client.renew_route(&topic).await {
                tracing::warn!(%topic, error = %e, "periodic route refresh failed");
            }
        }
    }
}

async fn heartbeat_task(weak: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let client = Client { inner };
        if let Err(e) = client.heartbeat().await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

async fn push_watch_task(weak: Weak<Inner>, mut rx: broadcast::Receiver<Push>) {
    loop {
        let push = match rx.recv().await {
            Ok(p) => p,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "push observer lagged");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(inner) = weak.upgrade() else { return };
        if push.code == push_code::GOING_AWAY {
            inner
                .routes
                .lock()
                .expect("routes lock")
                .invalidate_endpoint(&push.endpoint);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_follow_topic_rules() {
        assert!(validate_group("producer", "pg-1_%A").is_ok());
        assert!(validate_group("producer", "").is_err());
        assert!(validate_group("consumer", "a b").is_err());
        assert!(validate_group("consumer", &"g".repeat(MAX_GROUP_LEN + 1)).is_err());
    }

    #[test]
    fn local_ip_falls_back_to_loopback() {
        assert_eq!(
            local_ip_towards("not an address"),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert!(local_ip_towards("127.0.0.1:9876").is_loopback());
    }
}
