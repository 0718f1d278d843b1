//! `orbitmq admin ...` (topics and clusters, as RocketMQ's mqadmin updateTopic, deleteTopic,
//! topicList, topicRoute, clusterList) and `orbitmq cert ...` (the cluster CA).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use orbitmq_client::{Client, ClientError};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{
    self, ClusterInfoResponse, ClusterRequest, CreateTopicRequest, HaStatusResponse, RouteRequest,
    RouteResponse, TopicConfigsResponse, TopicListResponse, TopicRequest,
};

use crate::cli::ClientArgs;
use crate::net::tls;

/// How long a topic change waits for every name server to have the broker's new registration.
const REGISTRATION_WAIT: Duration = Duration::from_secs(10);
/// How often that wait asks.
const REGISTRATION_POLL: Duration = Duration::from_millis(100);

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Topics: create, update, delete, list, route.
    #[command(subcommand)]
    Topic(TopicCmd),
    /// Clusters and their brokers as the name servers know them.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// A consumer group's members on each broker, their subscriptions, and any conflict
    /// among them (RocketMQ's consumerConnection).
    Consumer(ConsumerArgs),
    /// A consumer group's dead letters (`%DLQ%<group>`): list them, or resend them to their
    /// original topic.
    #[command(subcommand)]
    Dlq(crate::dlq::DlqCmd),
    /// Find messages by key, by unique key, or by message id.
    #[command(subcommand)]
    Message(crate::msgquery::MessageCmd),
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ConsumerArgs {
    #[command(subcommand)]
    pub cmd: Option<ConsumerCmd>,
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long, required = true)]
    pub group: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ConsumerCmd {
    /// Per queue: broker (max) offset, the group's committed offset, and the lag.
    Progress(ProgressArgs),
    /// Sets the group's committed offsets of a topic to earliest, latest or the first
    /// message at or after a time (replay), stopped or live: each broker shard commits the
    /// offsets of its queues and pushes them to the group's running consumers, which drop
    /// what they have in flight and go on from there (their next commit does not undo it).
    Reset(ResetArgs),
}

#[derive(Args, Debug)]
pub struct ResetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub group: String,
    #[arg(long)]
    pub topic: String,
    /// `earliest`, `latest`, or a timestamp in milliseconds.
    #[arg(long)]
    pub to: String,
}

#[derive(Args, Debug)]
pub struct ProgressArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub group: String,
    /// The topic (default: the topics the group's live members subscribe to).
    #[arg(long)]
    pub topic: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Every cluster, broker, address and shard endpoint (RocketMQ's clusterList).
    List(ClientArgs),
    /// Replication: per master shard, its log's range and each slave's progress (how far
    /// behind, when last heard from, whether in sync), as RocketMQ's haStatus.
    Ha(ClientArgs),
}

/// Which brokers a topic change goes to.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Brokers {
    /// Every master of this cluster (from the name servers).
    #[arg(long)]
    pub cluster: Option<String>,
    /// One broker, by its address (`host:port` of its first shard).
    #[arg(long)]
    pub broker: Option<String>,
}

#[derive(Args, Debug)]
pub struct TopicChange {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub brokers: Brokers,
    #[arg(long)]
    pub topic: String,
    /// Read queues (default: the current count, or `defaultTopicQueueNums` for a new topic).
    #[arg(long)]
    pub read_queues: Option<u32>,
    /// Write queues (default: the current count, or `defaultTopicQueueNums` for a new topic).
    #[arg(long)]
    pub write_queues: Option<u32>,
    /// Permissions: 6 read-write, 4 read only, 2 write only.
    #[arg(long)]
    pub perm: Option<u32>,
}

#[derive(Args, Debug)]
pub struct TopicDelete {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub brokers: Brokers,
    #[arg(long)]
    pub topic: String,
}

#[derive(Args, Debug)]
pub struct TopicList {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only this cluster's topics.
    #[arg(long, conflicts_with = "broker")]
    pub cluster: Option<String>,
    /// Ask this broker for its topic configs instead of the name servers for names.
    #[arg(long)]
    pub broker: Option<String>,
}

#[derive(Args, Debug)]
pub struct TopicRoute {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub topic: String,
}

#[derive(Subcommand, Debug)]
pub enum TopicCmd {
    /// Create a topic (or update it if it exists) on a cluster or one broker.
    Create(TopicChange),
    /// Update a topic's queue counts or permissions (raising them works live).
    Update(TopicChange),
    /// Delete a topic from a cluster or one broker (its messages age out with retention).
    Delete(TopicDelete),
    /// List topics.
    List(TopicList),
    /// Show a topic's route: brokers, queues, shard endpoints, permissions.
    Route(TopicRoute),
}

#[derive(Subcommand, Debug)]
pub enum CertCmd {
    /// Make a cluster CA: DIR/ca.pem (for clients and nodes) and DIR/ca.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node certificate signed by the cluster CA, for NAME (host name or IP),
    /// localhost and 127.0.0.1: OUT/NAME.pem and OUT/NAME.key.
    Issue {
        /// The CA folder made by `cert init`.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        name: String,
        /// Output folder (default: the CA folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// More names or IPs the node is reached by (repeatable).
        #[arg(long)]
        san: Vec<String>,
    },
}

pub fn cert(c: CertCmd) -> Result<(), String> {
    match c {
        CertCmd::Init { dir } => {
            let f = tls::init_ca(&dir).map_err(|e| e.to_string())?;
            println!("ca={} key={}", f.cert.display(), f.key.display());
        }
        CertCmd::Issue { ca, name, out, san } => {
            let out = out.unwrap_or_else(|| ca.clone());
            let f = tls::issue(&ca, &name, &san, &out).map_err(|e| e.to_string())?;
            println!(
                "cert={} key={}\n# broker.conf: tlsCertFile = {}\n#              tlsKeyFile = {}\n#              tlsCaFile = {}",
                f.cert.display(),
                f.key.display(),
                f.cert.display(),
                f.key.display(),
                ca.join(tls::CA_FILE).display()
            );
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))
}

/// Decodes a response header, naming what it is in the error.
macro_rules! decode {
    ($f:expr, $t:ty, $what:expr) => {
        header::decode::<$t>(&$f.header).map_err(|e| format!("{}: {e}", $what))
    };
}

/// A request to one endpoint that must succeed.
async fn call(
    c: &Client,
    endpoint: &str,
    code: u16,
    h: Bytes,
) -> Result<orbitmq_proto::frame::Frame, String> {
    let f = c
        .request(endpoint, code, h, Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    if f.code != response::SUCCESS {
        return Err(ClientError::from_response(f.code, &f.header, "").to_string());
    }
    Ok(f)
}

async fn cluster_info(c: &Client) -> Result<ClusterInfoResponse, String> {
    let f = c
        .call_name_server(request::GET_BROKER_CLUSTER_INFO, Bytes::new(), "")
        .await
        .map_err(|e| e.to_string())?;
    decode!(f, ClusterInfoResponse, "cluster info")
}

/// The (broker name, address) pairs a change goes to.
async fn targets(c: &Client, b: &Brokers) -> Result<Vec<(String, String)>, String> {
    if let Some(addr) = &b.broker {
        // Name it from the name servers when they know it.
        let name = cluster_info(c)
            .await
            .ok()
            .and_then(|info| {
                info.clusters
                    .into_iter()
                    .flat_map(|(_, bs)| bs)
                    .find(|s| s.broker.addrs.iter().any(|(_, a)| a == addr))
                    .map(|s| s.broker.broker_name)
            })
            .unwrap_or_else(|| addr.clone());
        return Ok(vec![(name, addr.clone())]);
    }
    let cluster = b.cluster.as_deref().unwrap_or_default();
    let info = cluster_info(c).await?;
    let out: Vec<(String, String)> = info
        .clusters
        .into_iter()
        .filter(|(n, _)| n == cluster)
        .flat_map(|(_, bs)| bs)
        .filter_map(|s| {
            let master = s.broker.addrs.iter().find(|(id, _)| *id == 0)?.1.clone();
            Some((s.broker.broker_name, master))
        })
        .collect();
    if out.is_empty() {
        return Err(format!(
            "the name servers know no master broker of cluster {cluster:?}"
        ));
    }
    Ok(out)
}

/// Waits until every reachable name server has a registration of each target newer than
/// `since` (the broker registers at once after a topic change).
async fn wait_registered(c: &Client, targets: &[(String, String)], since: Instant) {
    let deadline = Instant::now() + REGISTRATION_WAIT;
    for ns in &c.config().namesrv {
        loop {
            let fresh = match c
                .request(
                    ns,
                    request::GET_BROKER_CLUSTER_INFO,
                    Bytes::new(),
                    Bytes::new(),
                )
                .await
            {
                Ok(f) if f.code == response::SUCCESS => {
                    match decode!(f, ClusterInfoResponse, "cluster info") {
                        Ok(info) => {
                            let age = since.elapsed().as_millis() as u64;
                            let known: Vec<_> =
                                info.clusters.into_iter().flat_map(|(_, b)| b).collect();
                            targets.iter().all(|(_, addr)| {
                                known.iter().any(|s| {
                                    s.broker.addrs.iter().any(|(_, a)| a == addr)
                                        && s.last_seen_ms < age
                                })
                            })
                        }
                        Err(_) => false,
                    }
                }
                Ok(_) | Err(_) => {
                    eprintln!("note: name server {ns} did not answer; it learns the change at the broker's next registration");
                    break;
                }
            };
            if fresh {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!("note: name server {ns} has not seen the change yet; it will within one registration period");
                break;
            }
            tokio::time::sleep(REGISTRATION_POLL).await;
        }
    }
}

async fn topic_change(a: TopicChange) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let targets = targets(&c, &a.brokers).await?;
        let h = header::encode(&CreateTopicRequest {
            topic: a.topic.clone(),
            read_queues: a.read_queues.unwrap_or(0),
            write_queues: a.write_queues.unwrap_or(0),
            perm: a.perm.unwrap_or(0),
        });
        let since = Instant::now();
        for (name, addr) in &targets {
            let f = call(&c, addr, request::UPDATE_AND_CREATE_TOPIC, h.clone())
                .await
                .map_err(|e| format!("broker {name} ({addr}): {e}"))?;
            let t = decode!(f, TopicConfigsResponse, "topic config")?;
            for t in t.topics {
                println!(
                    "broker={name} addr={addr} topic={} read_queues={} write_queues={} perm={}",
                    t.name, t.read_queues, t.write_queues, t.perm
                );
            }
        }
        wait_registered(&c, &targets, since).await;
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

async fn topic_delete(a: TopicDelete) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let targets = targets(&c, &a.brokers).await?;
        let h = header::encode(&TopicRequest {
            topic: a.topic.clone(),
        });
        let since = Instant::now();
        for (name, addr) in &targets {
            call(&c, addr, request::DELETE_TOPIC_IN_BROKER, h.clone())
                .await
                .map_err(|e| format!("broker {name} ({addr}): {e}"))?;
            println!("broker={name} addr={addr} topic={} deleted", a.topic);
        }
        wait_registered(&c, &targets, since).await;
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

async fn topic_list(a: TopicList) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        if let Some(addr) = &a.broker {
            let f = call(&c, addr, request::GET_ALL_TOPIC_CONFIG, Bytes::new()).await?;
            let t = decode!(f, TopicConfigsResponse, "topic configs")?;
            for t in t.topics {
                println!(
                    "{} read_queues={} write_queues={} perm={}",
                    t.name, t.read_queues, t.write_queues, t.perm
                );
            }
            return Ok(());
        }
        let f = match &a.cluster {
            Some(cl) => {
                c.call_name_server(
                    request::GET_TOPICS_BY_CLUSTER,
                    header::encode(&ClusterRequest {
                        cluster: cl.clone(),
                    }),
                    "",
                )
                .await
            }
            None => {
                c.call_name_server(
                    request::GET_ALL_TOPIC_LIST_FROM_NAMESERVER,
                    Bytes::new(),
                    "",
                )
                .await
            }
        }
        .map_err(|e| e.to_string())?;
        let l = decode!(f, TopicListResponse, "topic list")?;
        for t in l.topics {
            println!("{t}");
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

fn perm_name(p: u32) -> &'static str {
    match p & 6 {
        6 => "RW",
        4 => "R",
        2 => "W",
        _ => "-",
    }
}

async fn topic_route(a: TopicRoute) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let f = c
            .call_name_server(
                request::GET_ROUTEINFO_BY_TOPIC,
                header::encode(&RouteRequest {
                    topic: a.topic.clone(),
                }),
                &a.topic,
            )
            .await
            .map_err(|e| e.to_string())?;
        let r = decode!(f, RouteResponse, "route")?;
        for b in &r.brokers {
            let addrs: Vec<String> = b.addrs.iter().map(|(id, a)| format!("{id}={a}")).collect();
            println!(
                "broker={} cluster={} addrs={} shards={}",
                b.broker_name,
                b.cluster,
                addrs.join(","),
                b.shard_endpoints.join(",")
            );
        }
        for q in &r.queues {
            println!(
                "queue broker={} id={} shard={} endpoint={} perm={}",
                q.broker_name,
                q.queue_id,
                q.shard,
                q.endpoint,
                perm_name(q.perm)
            );
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

async fn cluster_list(a: ClientArgs) -> Result<(), String> {
    let c = Client::new(a.config()).await.map_err(|e| e.to_string())?;
    let r = async {
        let info = cluster_info(&c).await?;
        for (cluster, brokers) in info.clusters {
            for s in brokers {
                for (id, addr) in &s.broker.addrs {
                    println!(
                        "cluster={cluster} broker={} id={id} addr={addr} shards={} topics={} last_seen_ms={}",
                        s.broker.broker_name,
                        s.broker.shard_endpoints.join(","),
                        s.topics,
                        s.last_seen_ms
                    );
                }
            }
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

/// Asks every shard of every master the name servers know for its replication status.
async fn cluster_ha(a: ClientArgs) -> Result<(), String> {
    let c = Client::new(a.config()).await.map_err(|e| e.to_string())?;
    let r = async {
        let info = cluster_info(&c).await?;
        for (cluster, brokers) in info.clusters {
            for s in brokers {
                if !s.broker.addrs.iter().any(|(id, _)| *id == 0) {
                    println!(
                        "cluster={cluster} broker={} master=none",
                        s.broker.broker_name
                    );
                    continue;
                }
                for ep in &s.broker.shard_endpoints {
                    let f = call(&c, ep, request::HA_STATUS, Bytes::new())
                        .await
                        .map_err(|e| format!("{ep}: {e}"))?;
                    let h = decode!(f, HaStatusResponse, "replication status")?;
                    let head = format!(
                        "cluster={cluster} broker={} shard={} master_start={} master_end={}",
                        s.broker.broker_name, h.shard, h.master_start, h.master_end
                    );
                    if h.slaves.is_empty() {
                        println!("{head} slaves=none");
                    }
                    for sl in h.slaves {
                        println!(
                            "{head} slave={} acked={} behind={} silent_ms={} in_sync={}",
                            sl.slave_id,
                            sl.acked,
                            h.master_end.saturating_sub(sl.acked),
                            sl.silent_ms,
                            sl.in_sync
                        );
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

/// Commits, for every readable queue of the topic, the offset `--to` names.
async fn consumer_reset(a: ResetArgs) -> Result<(), String> {
    let ts = match a.to.as_str() {
        "earliest" | "latest" => None,
        t => Some(t.parse::<u64>().map_err(|_| {
            format!("--to {t:?}: expected earliest, latest or a timestamp in milliseconds")
        })?),
    };
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let route = c.topic_route(&a.topic).await.map_err(|e| e.to_string())?;
        // The new offsets, by the shard endpoint (and broker) that owns the queues.
        let mut by_shard: std::collections::BTreeMap<(String, String), Vec<(u32, u64)>> =
            Default::default();
        for q in route.readable() {
            let o = match (a.to.as_str(), ts) {
                ("earliest", _) => c.min_offset(&q.mq).await,
                (_, Some(ms)) => c.search_offset(&q.mq, ms).await,
                _ => c.max_offset(&q.mq).await,
            }
            .map_err(|e| e.to_string())?;
            by_shard
                .entry((q.endpoint.clone(), q.mq.broker_name.clone()))
                .or_default()
                .push((q.mq.queue_id, o));
        }
        // Each shard commits its queues' offsets and pushes them to the live consumers.
        for ((endpoint, broker), offsets) in by_shard {
            c.reset_offset(&endpoint, &a.group, &a.topic, &broker, &offsets)
                .await
                .map_err(|e| format!("broker {broker} ({endpoint}): {e}"))?;
            for (queue, o) in offsets {
                println!(
                    "topic={} broker={broker} queue={queue} consumer_offset={o}",
                    a.topic
                );
            }
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

/// Prints per queue the broker offset, the group's committed offset and the lag.
async fn consumer_progress(a: ProgressArgs) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let topics: std::collections::BTreeSet<String> = match &a.topic {
            Some(t) => [t.clone()].into(),
            None => {
                let info = cluster_info(&c).await?;
                let mut topics = std::collections::BTreeSet::new();
                for (_, brokers) in info.clusters {
                    for s in brokers {
                        let Some((_, addr)) = s.broker.addrs.iter().find(|(id, _)| *id == 0)
                        else {
                            continue;
                        };
                        let r = c
                            .consumer_connections(addr, &a.group)
                            .await
                            .map_err(|e| format!("broker {}: {e}", s.broker.broker_name))?;
                        for m in r.members {
                            topics.extend(m.subscriptions.into_iter().map(|s| s.topic));
                        }
                    }
                }
                if topics.is_empty() {
                    return Err(format!(
                        "group {} has no live members with subscriptions: name the topic with --topic",
                        a.group
                    ));
                }
                topics
            }
        };
        let mut total = 0u64;
        for topic in topics {
            let route = c.topic_route(&topic).await.map_err(|e| e.to_string())?;
            for q in route.readable() {
                let max = c.max_offset(&q.mq).await.map_err(|e| e.to_string())?;
                let committed = c
                    .query_consumer_offset(&a.group, &q.mq)
                    .await
                    .map_err(|e| e.to_string())?;
                let lag = max.saturating_sub(committed.unwrap_or(0));
                total += lag;
                println!(
                    "topic={topic} broker={} queue={} broker_offset={max} consumer_offset={} lag={lag}",
                    q.mq.broker_name,
                    q.mq.queue_id,
                    committed.map_or("-".to_string(), |o| o.to_string()),
                );
            }
        }
        println!("group={} total_lag={total}", a.group);
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

/// Prints each master broker's view of a group: members with subscriptions, then conflicts.
async fn consumer_show(a: ConsumerArgs) -> Result<(), String> {
    let group = a.group.unwrap_or_default();
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let info = cluster_info(&c).await?;
        let mut conflicts = 0;
        for (cluster, brokers) in info.clusters {
            for s in brokers {
                let Some((_, addr)) = s.broker.addrs.iter().find(|(id, _)| *id == 0) else {
                    continue;
                };
                let r = c
                    .consumer_connections(addr, &group)
                    .await
                    .map_err(|e| format!("broker {}: {e}", s.broker.broker_name))?;
                for m in &r.members {
                    let subs: Vec<String> = m
                        .subscriptions
                        .iter()
                        .map(|s| {
                            format!(
                                "{}({})",
                                s.topic,
                                orbitmq_proto::sql::display(s.expr_type, &s.expr)
                            )
                        })
                        .collect();
                    println!(
                        "cluster={cluster} broker={} group={} member={} subscriptions={}",
                        s.broker.broker_name,
                        group,
                        m.client_id,
                        if subs.is_empty() {
                            "unknown".to_string()
                        } else {
                            subs.join(",")
                        }
                    );
                }
                for x in &r.conflicts {
                    conflicts += 1;
                    println!(
                        "cluster={cluster} broker={} group={} CONFLICT: {x}",
                        s.broker.broker_name, group
                    );
                }
            }
        }
        if conflicts == 0 {
            println!("group={} subscriptions consistent", group);
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

pub fn admin(cmd: AdminCmd) -> Result<(), String> {
    runtime()?.block_on(async move {
        match cmd {
            AdminCmd::Topic(TopicCmd::Create(a)) | AdminCmd::Topic(TopicCmd::Update(a)) => {
                topic_change(a).await
            }
            AdminCmd::Topic(TopicCmd::Delete(a)) => topic_delete(a).await,
            AdminCmd::Topic(TopicCmd::List(a)) => topic_list(a).await,
            AdminCmd::Topic(TopicCmd::Route(a)) => topic_route(a).await,
            AdminCmd::Cluster(ClusterCmd::List(a)) => cluster_list(a).await,
            AdminCmd::Cluster(ClusterCmd::Ha(a)) => cluster_ha(a).await,
            AdminCmd::Consumer(ConsumerArgs {
                cmd: Some(ConsumerCmd::Progress(p)),
                ..
            }) => consumer_progress(p).await,
            AdminCmd::Consumer(ConsumerArgs {
                cmd: Some(ConsumerCmd::Reset(r)),
                ..
            }) => consumer_reset(r).await,
            AdminCmd::Consumer(a) => consumer_show(a).await,
            AdminCmd::Dlq(c) => crate::dlq::run(c).await,
            AdminCmd::Message(c) => crate::msgquery::run(c).await,
        }
    })
}
