//! Consumer groups over a real cluster: one `orbitmq namesrv` and two `orbitmq broker`
//! processes (2 shards each, TLS from `orbitmq cert`), shared by the tests of this file (each
//! test has its own topics, groups and client ids), and the client crate.
//!
//! - Clustering with each allocation strategy: 3 push consumers of one group over 2 brokers x
//!   8 queues while a producer sends throughout; a member joins midway, and one member, a
//!   child process (this test binary re-run as [`child_consumer`]), is killed with SIGKILL
//!   (no shutdown, no commit, no unregister: the brokers expire it). Every message sent is
//!   consumed; duplicates are counted, reported, bounded, and must lie on queues that changed
//!   hands.
//! - Broadcasting: each of 3 members gets every message exactly once.
//! - Tags: a `TagA || TagB` subscriber gets exactly the matching messages.
//! - Replay: `orbitmq admin consumer reset --to <timestamp>` of a stopped group re-delivers
//!   exactly the messages stored after the timestamp.
//! - A topic's queue count raised live (`orbitmq admin topic update`) is picked up at the next
//!   rebalance: messages sent to the new queues are consumed.
//! - A killed broker (on a cluster of its own) does not stop the group from rebalancing.
//! - Queues taken on an endpoint whose pull is parked in a long poll are pulled at once.
//!
//! Periods are shortened through settings (brokers: `registerNameServerPeriod = 500`,
//! `channelExpiredTimeout = 5000`, five heartbeats, so a member slowed by a loaded machine is
//! not dropped; clients: route refresh and heartbeat every second,
//! rebalance every second, commits every 500 ms), and every wait is a condition with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{body_of, free_ports, make_certs, run_ok, spawn_tied, start_namesrv, start_proc};
use orbitmq_client::{
    Client, ClientConfig, ConsumeFromWhere, ConsumeStatus, ConsumerOptions, Message, MessageModel,
    MessageQueue, Producer, PushConsumer, Strategy, TlsOptions,
};
use tempfile::TempDir;

const CLUSTER: &str = "GroupsCluster";
const BROKERS: [&str; 2] = ["broker-a", "broker-b"];
/// Queues of a topic on each broker.
const QUEUES: u32 = 8;
/// Bound of the waits for the members to take their expected shares (a killed member
/// expires after 5 s; rebalances run every second).
const SPLIT_WITHIN: Duration = Duration::from_secs(30);
/// Bound of the waits for messages to be consumed.
const CONSUME_WITHIN: Duration = Duration::from_secs(60);
const REBALANCE: Duration = Duration::from_secs(1);
const COMMIT: Duration = Duration::from_millis(500);
/// The sender's pace: `SEND_BATCH` messages (one batch, one queue) every `SEND_PACE`.
const SEND_BATCH: usize = 10;
const SEND_PACE: Duration = Duration::from_millis(40);
/// Messages consumed between two membership changes of the strategy scenario.
const PER_PHASE: usize = 150;
/// Duplicates allowed through a scenario: what was pulled or consumed but not committed on
/// the queues that moved, at most a pull batch (32) per queue for each of the two hand-overs,
/// over 16 queues. Far above what happens; the real count is printed.
const MAX_DUPLICATES: usize = 2 * 16 * 32;
/// The environment variable that turns [`child_consumer`] into a consumer process.
const CHILD_ENV: &str = "ORBITMQ_GROUPS_CLUSTER_CHILD";
/// A child consumer exits by itself after this long (the test kills it well before).
const CHILD_MAX_LIFE: Duration = Duration::from_secs(170);

// ------------------------------------------------------------------------------ the cluster

/// The name server and the two brokers, started once for the whole file.
struct Cluster {
    _dir: TempDir,
    namesrv: String,
    ca: PathBuf,
    _procs: Mutex<Vec<Child>>,
}

static THE_CLUSTER: OnceLock<Cluster> = OnceLock::new();

fn cluster() -> &'static Cluster {
    THE_CLUSTER.get_or_init(|| {
        // SAFETY: registers a plain `extern "C" fn` to run at exit.
        unsafe { libc::atexit(stop_the_cluster) };
        Cluster::start()
    })
}

/// The shared cluster is a static, never dropped: at exit its processes are killed and its
/// directory removed, or every run of this file would leave ~500 MB in the temporary directory.
extern "C" fn stop_the_cluster() {
    if let Some(c) = THE_CLUSTER.get() {
        c.stop_procs();
        let _ = std::fs::remove_dir_all(c._dir.path());
    }
}

impl Cluster {
    fn start() -> Cluster {
        let started = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let ca_dir = make_certs(root, &["ns1", "broker-a", "broker-b"]);
        let ca = ca_dir.join("ca.pem");
        let pem = |n: &str, ext: &str| ca_dir.join(format!("{n}.{ext}")).display().to_string();
        let (c, namesrv) = start_namesrv(root, &ca_dir, "ns1", &[]);
        let mut procs = vec![c];
        for name in BROKERS {
            let (port, _) = free_ports(2);
            let conf = format!(
                "brokerClusterName = {CLUSTER}\n\
                 brokerName = {name}\n\
                 brokerId = 0\n\
                 namesrvAddr = {namesrv}\n\
                 listenPort = {port}\n\
                 brokerIP1 = 127.0.0.1\n\
                 storePathRootDir = {}\n\
                 flushDiskType = ASYNC_FLUSH\n\
                 mappedFileSizeCommitLog = 67108864\n\
                 shards = 2\n\
                 tlsCertFile = {}\n\
                 tlsKeyFile = {}\n\
                 tlsCaFile = {}\n\
                 registerNameServerPeriod = 500\n\
                 channelExpiredTimeout = 5000\n\
                 autoCreateTopicEnable = false\n",
                root.join(format!("{name}-data")).display(),
                pem(name, "pem"),
                pem(name, "key"),
                ca.display(),
            );
            let path = root.join(format!("{name}.conf"));
            std::fs::write(&path, conf).unwrap();
            let (c, line) = start_proc(
                &["broker".into(), "-c".into(), path.display().to_string()],
                &root.join(format!("{name}.log")),
            );
            assert!(line.contains(&format!("broker=127.0.0.1:{port}")), "{line}");
            procs.push(c);
        }
        eprintln!(
            "cluster: namesrv {namesrv}, brokers {BROKERS:?}, up in {:?}",
            started.elapsed()
        );
        Cluster {
            _dir: dir,
            namesrv,
            ca,
            _procs: Mutex::new(procs),
        }
    }

    /// SIGKILL to a broker (it does not unregister: the name server keeps routing to it).
    fn kill(&self, broker: &str) {
        let i = 1 + BROKERS.iter().position(|b| *b == broker).expect("a broker");
        let mut procs = self._procs.lock().unwrap();
        let _ = procs[i].kill();
        let _ = procs[i].wait();
    }

    /// `orbitmq admin ...` against this cluster; returns its stdout.
    async fn admin(&self, args: &[&str]) -> String {
        let mut all: Vec<String> = vec!["admin".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend([
            "--namesrv".into(),
            self.namesrv.clone(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]);
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = all.iter().map(String::as_str).collect();
            run_ok(&a)
        })
        .await
        .unwrap()
    }

    /// Creates (or updates) a topic with `queues` read and write queues on both brokers.
    async fn topic(&self, verb: &str, topic: &str, queues: u32) {
        self.topic_rw(verb, topic, queues, queues).await;
    }

    /// Creates (or updates) a topic with `read` read queues and `write` write queues on both
    /// brokers.
    async fn topic_rw(&self, verb: &str, topic: &str, read: u32, write: u32) {
        let (r, w) = (read.to_string(), write.to_string());
        let out = self
            .admin(&[
                "topic",
                verb,
                "--cluster",
                CLUSTER,
                "--topic",
                topic,
                "--read-queues",
                &r,
                "--write-queues",
                &w,
            ])
            .await;
        let want = format!("read_queues={read} write_queues={write} ");
        assert_eq!(
            out.lines()
                .filter(|l| l.contains(&format!("topic={topic} ")) && l.contains(&want))
                .count(),
            2,
            "{out}"
        );
    }

    /// A producer spreading its sends evenly over both brokers (round robin, no latency
    /// fault tolerance, which could leave a slow broker's queues, and their consumer, idle).
    async fn producer(&self, group: &str) -> Producer {
        let mut config = self.config("");
        config.send_latency_fault_enable = false;
        Producer::new(group, config).await.unwrap()
    }

    /// A client configuration with short periods (and a fixed client id when given).
    fn config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new(&self.namesrv).with_tls(TlsOptions::with_ca(&self.ca));
        c.poll_name_server_interval = Duration::from_secs(1);
        c.heartbeat_interval = Duration::from_secs(1);
        c.client_id = client_id.to_owned();
        c
    }
}

impl Cluster {
    fn stop_procs(&self) {
        if let Ok(mut procs) = self._procs.lock() {
            for p in procs.iter_mut() {
                let _ = p.kill();
                let _ = p.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_procs();
    }
}

// ------------------------------------------------------------------------- strategies

/// The allocation strategies, each scenario with its own topic, group and client ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Averagely,
    Circle,
    MachineRoom,
    Hash,
    Config,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Averagely,
        Kind::Circle,
        Kind::MachineRoom,
        Kind::Hash,
        Kind::Config,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Averagely => "avg",
            Kind::Circle => "circle",
            Kind::MachineRoom => "room",
            Kind::Hash => "hash",
            Kind::Config => "config",
        }
    }

    fn parse(s: &str) -> Kind {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .unwrap_or_else(|| panic!("no strategy {s:?}"))
    }

    fn topic(self) -> String {
        format!("GcStrategy_{}", self.name())
    }

    fn group(self) -> String {
        format!("gc-strategy-{}", self.name())
    }

    /// The client id of member `role` (one process per id: a restarted member gets `suffix`).
    fn client_id(self, role: usize, suffix: &str) -> String {
        format!("gc-{}-c{role}{suffix}", self.name())
    }

    /// Member `role`'s strategy. Machine rooms: brokers a and b in rooms east and west,
    /// members 0 and 2 in east, member 1 in west. By config: 6, 6 and 4 fixed queues.
    fn strategy(self, role: usize) -> Strategy {
        match self {
            Kind::Averagely => Strategy::Averagely,
            Kind::Circle => Strategy::AveragelyByCircle,
            Kind::Hash => Strategy::ConsistentHash { virtual_nodes: 10 },
            Kind::MachineRoom => {
                let rooms = ["east", "west", "east"];
                let mut consumer_rooms = BTreeMap::new();
                for (r, room) in rooms.iter().enumerate() {
                    for suffix in ["", "r"] {
                        consumer_rooms.insert(self.client_id(r, suffix), room.to_string());
                    }
                }
                Strategy::MachineRoom {
                    consumer_rooms,
                    broker_rooms: [("broker-a", "east"), ("broker-b", "west")]
                        .map(|(a, b)| (a.to_owned(), b.to_owned()))
                        .into(),
                }
            }
            Kind::Config => {
                let all = queues(&self.topic(), QUEUES);
                let range = [0..6, 6..12, 12..16][role].clone();
                Strategy::ByConfig(all[range].to_vec())
            }
        }
    }
}

/// The queues of `topic` on both brokers, `per_broker` each, sorted.
fn queues(topic: &str, per_broker: u32) -> Vec<MessageQueue> {
    BROKERS
        .iter()
        .flat_map(|b| (0..per_broker).map(move |q| MessageQueue::new(topic, *b, q)))
        .collect()
}

/// The queues of `topic` among `qs` (consumers also hold their group's retry topic).
fn of_topic(qs: Vec<MessageQueue>, topic: &str) -> Vec<MessageQueue> {
    qs.into_iter().filter(|q| q.topic == topic).collect()
}

fn parse_mq(s: &str) -> MessageQueue {
    let (rest, q) = s.rsplit_once('#').expect("topic@broker#queue");
    let (topic, broker) = rest.split_once('@').expect("topic@broker#queue");
    MessageQueue::new(topic, broker, q.parse().expect("queue id"))
}

// ---------------------------------------------------------------------------- deliveries

/// One message handed to a listener.
#[derive(Clone, Debug)]
struct Delivery {
    /// Which consumer instance got it.
    consumer: usize,
    body: String,
    queue: MessageQueue,
    tags: String,
    store_timestamp: u64,
}

type Seen = Arc<Mutex<Vec<Delivery>>>;

/// Asserts every acknowledged message (index, queue) was delivered, naming the lost ones and
/// their queues; returns the bodies sent and the bodies delivered.
fn assert_none_lost(
    label: &str,
    sent: &[(usize, MessageQueue)],
    got: &[Delivery],
) -> (BTreeSet<String>, BTreeSet<String>) {
    let want: BTreeSet<String> = sent.iter().map(|(i, _)| body_of(*i)).collect();
    let bodies: BTreeSet<String> = got.iter().map(|d| d.body.clone()).collect();
    let lost: Vec<(usize, &MessageQueue)> = sent
        .iter()
        .filter(|(i, _)| !bodies.contains(&body_of(*i)))
        .map(|(i, q)| (*i, q))
        .collect();
    let lost_queues: BTreeSet<&MessageQueue> = lost.iter().map(|(_, q)| *q).collect();
    assert!(
        lost.is_empty(),
        "{label}: {} messages lost, on queues {lost_queues:?}, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    (want, bodies)
}

fn unique(seen: &Seen) -> usize {
    let g = seen.lock().unwrap();
    g.iter().map(|d| &d.body).collect::<BTreeSet<_>>().len()
}

/// Waits (bounded by `within`) until `cond` holds; returns whether it did.
async fn settle(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= within {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Waits (bounded by `within`) until `cond` holds; panics with `what()` if not.
async fn wait_for(what: impl Fn() -> String, within: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "not within {within:?}: {}",
            what()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn options(strategy: Strategy) -> ConsumerOptions {
    let mut o = ConsumerOptions::default().from_where(ConsumeFromWhere::FirstOffset);
    o.allocate = strategy;
    o.rebalance_interval = REBALANCE;
    o.commit_interval = COMMIT;
    o
}

/// An in-process push consumer recording what its listener gets as `consumer`.
async fn push_member(
    config: ClientConfig,
    group: &str,
    topic: &str,
    expr: &str,
    options: ConsumerOptions,
    consumer: usize,
    seen: &Seen,
) -> PushConsumer {
    let c = PushConsumer::with_options(group, config, options)
        .await
        .unwrap();
    c.subscribe(topic, expr).await.unwrap();
    let seen = seen.clone();
    c.register_listener(move |msgs| {
        let mut g = seen.lock().unwrap();
        for m in msgs {
            g.push(Delivery {
                consumer,
                body: String::from_utf8(m.body.to_vec()).unwrap(),
                queue: m.message_queue(),
                tags: m.tags.clone(),
                store_timestamp: m.store_timestamp,
            });
        }
        ConsumeStatus::ConsumeSuccess
    });
    c.start().await.unwrap();
    c
}

// ------------------------------------------------------------------------------ the sender

/// A producer sending numbered messages (`body_of(i)`) in batches until stopped; what was
/// acknowledged (number, queue) is visible as it goes.
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<(usize, MessageQueue)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sender {
    fn start(p: Arc<Producer>, topic: String) -> Sender {
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<Mutex<Vec<(usize, MessageQueue)>>> = Arc::default();
        let (s, log) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SEND_PACE);
            let mut next = 0;
            while !s.load(Ordering::Acquire) {
                tick.tick().await;
                let msgs = (next..next + SEND_BATCH)
                    .map(|i| Message::new(&topic, body_of(i).into_bytes()))
                    .collect();
                let r = p.send_batch(msgs).await.expect("send");
                assert_eq!(r.len(), SEND_BATCH);
                let mut log = log.lock().unwrap();
                for (k, r) in r.into_iter().enumerate() {
                    log.push((next + k, r.queue));
                }
                next += SEND_BATCH;
            }
        });
        Sender { stop, sent, task }
    }

    fn acked(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// The queues sent to so far.
    fn queues(&self) -> BTreeSet<MessageQueue> {
        let g = self.sent.lock().unwrap();
        g.iter().map(|(_, q)| q.clone()).collect()
    }

    async fn stop(self) -> Vec<(usize, MessageQueue)> {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("sender");
        let sent = self.sent.lock().unwrap().clone();
        sent
    }
}

// ------------------------------------------------------------------------ child consumers

/// A push consumer in a child process (this test binary running [`child_consumer`]): what it
/// consumes and its assignment come over its stdout.
struct ChildConsumer {
    child: Child,
    assignment: Arc<Mutex<Option<Vec<MessageQueue>>>>,
}

impl ChildConsumer {
    fn start(kind: Kind, role: usize, client_id: &str, consumer: usize, seen: &Seen) -> Self {
        let c = cluster();
        let spec = [
            c.namesrv.clone(),
            c.ca.display().to_string(),
            kind.name().to_owned(),
            role.to_string(),
            client_id.to_owned(),
        ]
        .join("|");
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "--exact",
            "child_consumer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        let mut child = spawn_tied(cmd).expect("start a child consumer");
        let stdout = child.stdout.take().expect("stdout");
        let assignment: Arc<Mutex<Option<Vec<MessageQueue>>>> = Arc::default();
        let (a, seen) = (assignment.clone(), seen.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                // libtest prints `test child_consumer ... ` without a newline first.
                let line = match (line.find("gcassign "), line.find("gcmsg ")) {
                    (Some(i), _) | (None, Some(i)) => &line[i..],
                    (None, None) => continue,
                };
                if let Some(rest) = line.strip_prefix("gcassign ") {
                    let qs = rest
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(parse_mq)
                        .collect();
                    *a.lock().unwrap() = Some(qs);
                } else if let Some(rest) = line.strip_prefix("gcmsg ") {
                    let mut f = rest.splitn(3, ' ');
                    let (q, ts, body) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
                    seen.lock().unwrap().push(Delivery {
                        consumer,
                        body: body.to_owned(),
                        queue: parse_mq(q),
                        tags: String::new(),
                        store_timestamp: ts.parse().unwrap(),
                    });
                }
            }
        });
        ChildConsumer { child, assignment }
    }

    fn assignment(&self) -> Option<Vec<MessageQueue>> {
        self.assignment.lock().unwrap().clone()
    }

    /// SIGKILL: no commit, no unregister.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildConsumer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test by itself: with `ORBITMQ_GROUPS_CLUSTER_CHILD` set (by [`ChildConsumer`]), runs
/// a push consumer of a strategy scenario and prints `gcassign <queues>` whenever its
/// assignment changes and `gcmsg <queue> <store ts> <body>` for each message consumed,
/// until it is killed.
#[test]
fn child_consumer() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split('|').collect();
    let [namesrv, ca, kind, role, client_id] = f[..] else {
        panic!("bad spec {spec:?}")
    };
    let kind = Kind::parse(kind);
    let role: usize = role.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut config = ClientConfig::new(namesrv).with_tls(TlsOptions::with_ca(ca));
        config.poll_name_server_interval = Duration::from_secs(1);
        config.heartbeat_interval = Duration::from_secs(1);
        config.client_id = client_id.to_owned();
        let c = PushConsumer::with_options(&kind.group(), config, options(kind.strategy(role)))
            .await
            .unwrap();
        c.subscribe(&kind.topic(), "*").await.unwrap();
        c.register_listener(|msgs| {
            let mut out = std::io::stdout().lock();
            for m in msgs {
                writeln!(
                    out,
                    "gcmsg {} {} {}",
                    m.message_queue(),
                    m.store_timestamp,
                    String::from_utf8_lossy(&m.body)
                )
                .unwrap();
            }
            out.flush().unwrap();
            ConsumeStatus::ConsumeSuccess
        });
        c.start().await.unwrap();
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < CHILD_MAX_LIFE {
            let a = of_topic(c.assignment(), &kind.topic());
            if last.as_ref() != Some(&a) {
                let s: Vec<String> = a.iter().map(|q| q.to_string()).collect();
                let mut out = std::io::stdout().lock();
                writeln!(out, "gcassign {}", s.join(",")).unwrap();
                out.flush().unwrap();
                last = Some(a);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.shutdown().await.unwrap();
    });
}

// ------------------------------------------------------------------ strategy scenarios

/// A member of a scenario: an in-process consumer or a child process.
enum Handle {
    Local(PushConsumer),
    Child(ChildConsumer),
}

struct Member {
    /// The topic of the scenario (members also hold their group's retry topic).
    topic: String,
    /// Instance number (deliveries are recorded under it).
    inst: usize,
    /// Which member of the strategy it is (by config: which fixed list).
    role: usize,
    id: String,
    handle: Handle,
}

impl Member {
    fn assignment(&self) -> Option<Vec<MessageQueue>> {
        match &self.handle {
            Handle::Local(c) => Some(of_topic(c.assignment(), &self.topic)),
            Handle::Child(c) => c.assignment(),
        }
    }
}

/// What each live member should hold: its strategy applied to the live ids.
fn expected(kind: Kind, members: &[Member]) -> BTreeMap<usize, Vec<MessageQueue>> {
    let qs = queues(&kind.topic(), QUEUES);
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    members
        .iter()
        .map(|m| {
            let mut share = kind.strategy(m.role).allocate(&m.id, &qs, &ids);
            share.sort();
            (m.inst, share)
        })
        .collect()
}

fn actual(members: &[Member]) -> BTreeMap<usize, Option<Vec<MessageQueue>>> {
    members.iter().map(|m| (m.inst, m.assignment())).collect()
}

/// Waits until every member holds its expected share; returns the shares (by instance).
async fn wait_shares(
    kind: Kind,
    phase: &str,
    members: &[Member],
) -> BTreeMap<usize, Vec<MessageQueue>> {
    let want = expected(kind, members);
    let started = Instant::now();
    wait_for(
        || {
            format!(
                "{}: {phase}: members hold {:?}, want {want:?}",
                kind.name(),
                actual(members)
            )
        },
        SPLIT_WITHIN,
        || {
            actual(members)
                .into_iter()
                .all(|(i, a)| a.as_ref() == want.get(&i))
        },
    )
    .await;
    eprintln!(
        "{}: {phase}: shares {:?} after {:?}",
        kind.name(),
        want.iter().map(|(i, s)| (*i, s.len())).collect::<Vec<_>>(),
        started.elapsed()
    );
    want
}

/// Queues whose owner differs between two share maps (a queue owned by nobody counts as
/// owner `None`).
fn moved(
    before: &BTreeMap<usize, Vec<MessageQueue>>,
    after: &BTreeMap<usize, Vec<MessageQueue>>,
) -> BTreeSet<MessageQueue> {
    let owner = |m: &BTreeMap<usize, Vec<MessageQueue>>| -> BTreeMap<MessageQueue, usize> {
        m.iter()
            .flat_map(|(i, qs)| qs.iter().map(move |q| (q.clone(), *i)))
            .collect()
    };
    let (b, a) = (owner(before), owner(after));
    let all: BTreeSet<&MessageQueue> = b.keys().chain(a.keys()).collect();
    all.into_iter()
        .filter(|q| b.get(*q) != a.get(*q))
        .cloned()
        .collect()
}

/// 3 push consumers of one group over 2 brokers x 8 queues with the strategy `kind`, a
/// producer sending throughout: members 0 (in process) and 1 (a child process) start, member
/// 2 (in process) joins midway, member 1 is killed with SIGKILL (by config, whose fixed
/// lists do not move, it is restarted as another process with the same list).
async fn strategy_scenario(kind: Kind) {
    let started = Instant::now();
    let c = cluster();
    let topic = kind.topic();
    let group = kind.group();
    c.topic("create", &topic, QUEUES).await;
    let seen: Seen = Arc::default();
    let local = |role: usize, inst: usize| {
        let (id, seen) = (kind.client_id(role, ""), seen.clone());
        let (topic, group) = (topic.clone(), group.clone());
        async move {
            let h = push_member(
                c.config(&id),
                &group,
                &topic,
                "*",
                options(kind.strategy(role)),
                inst,
                &seen,
            )
            .await;
            Member {
                topic,
                inst,
                role,
                id,
                handle: Handle::Local(h),
            }
        }
    };
    let child = |role: usize, inst: usize, suffix: &str| {
        let id = kind.client_id(role, suffix);
        Member {
            topic: topic.clone(),
            inst,
            role,
            handle: Handle::Child(ChildConsumer::start(kind, role, &id, inst, &seen)),
            id,
        }
    };

    let mut members = vec![local(0, 0).await, child(1, 1, "")];
    let mut shares = vec![wait_shares(kind, "members 0 and 1", &members).await];

    let p = Arc::new(c.producer("gc-strategy-p").await);
    let sender = Sender::start(p.clone(), topic.clone());
    let progress = |n: usize| {
        let seen = seen.clone();
        async move {
            let before = unique(&seen);
            wait_for(
                || format!("{}: {n} more messages consumed", kind.name()),
                CONSUME_WITHIN,
                || unique(&seen) >= before + n,
            )
            .await;
        }
    };
    progress(PER_PHASE).await;

    members.push(local(2, 2).await);
    shares.push(wait_shares(kind, "member 2 joined", &members).await);
    progress(PER_PHASE).await;

    let pos = members.iter().position(|m| m.inst == 1).unwrap();
    let mut killed = members.remove(pos);
    if let Handle::Child(ch) = &mut killed.handle {
        ch.kill();
    }
    let consumed_at_kill = unique(&seen);
    if kind == Kind::Config {
        members.push(child(1, 3, "r"));
    }
    shares.push(wait_shares(kind, "member 1 killed", &members).await);
    let acked_then = sender.acked();
    wait_for(
        || format!("{}: sends after the kill", kind.name()),
        CONSUME_WITHIN,
        || sender.acked() >= acked_then + PER_PHASE,
    )
    .await;
    let sent = sender.stop().await;
    p.shutdown().await;
    let n = sent.len();
    // Bounded; a shortfall is reported below with the lost messages.
    settle(CONSUME_WITHIN, || unique(&seen) >= n).await;
    // Stop every member (listener calls finish) before counting.
    for m in members {
        match m.handle {
            Handle::Local(h) => h.shutdown().await.unwrap(),
            Handle::Child(mut ch) => ch.kill(),
        }
    }

    let got = seen.lock().unwrap().clone();
    let (want, bodies) = assert_none_lost(kind.name(), &sent, &got);
    let strangers: Vec<&String> = bodies.difference(&want).take(10).collect();
    assert!(
        strangers.is_empty(),
        "{}: unexpected {strangers:?}",
        kind.name()
    );
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_consumer: BTreeMap<usize, usize> = BTreeMap::new();
    for d in &got {
        *count.entry(&d.body).or_default() += 1;
        *per_consumer.entry(d.consumer).or_default() += 1;
    }
    let dups = got.len() - n;
    let moved_queues: BTreeSet<MessageQueue> = shares
        .windows(2)
        .flat_map(|w| moved(&w[0], &w[1]))
        .collect();
    let dup_queues: BTreeSet<MessageQueue> = got
        .iter()
        .filter(|d| count[d.body.as_str()] > 1)
        .map(|d| d.queue.clone())
        .collect();
    // Extra deliveries by the change that moved their queue: the join, the kill, or both.
    let (at_join, at_kill) = (moved(&shares[0], &shares[1]), moved(&shares[1], &shares[2]));
    let mut by_change: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_seen = BTreeSet::new();
    for d in &got {
        if !first_seen.insert(d.body.as_str()) {
            let change = match (at_join.contains(&d.queue), at_kill.contains(&d.queue)) {
                (true, true) => "join+kill",
                (true, false) => "join",
                (false, true) => "kill",
                (false, false) => "none",
            };
            *by_change.entry(change).or_default() += 1;
        }
    }
    eprintln!(
        "{}: {n} messages sent and consumed, {dups} duplicates {by_change:?} (on {} queues; {} \
         queues moved), per consumer {per_consumer:?}, {consumed_at_kill} consumed before the \
         kill, in {:?}",
        kind.name(),
        dup_queues.len(),
        moved_queues.len(),
        started.elapsed()
    );
    assert!(dups <= MAX_DUPLICATES, "{}: {dups} duplicates", kind.name());
    assert!(
        dup_queues.is_subset(&moved_queues),
        "{}: duplicates on queues that never changed hands: {:?}",
        kind.name(),
        dup_queues.difference(&moved_queues).collect::<Vec<_>>()
    );
    for inst in [0, 1, 2] {
        assert!(
            per_consumer.get(&inst).is_some_and(|n| *n > 0),
            "{}: consumer {inst} consumed nothing: {per_consumer:?}",
            kind.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clustering_averagely_through_join_and_kill() {
    strategy_scenario(Kind::Averagely).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clustering_averagely_by_circle_through_join_and_kill() {
    strategy_scenario(Kind::Circle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clustering_by_machine_room_through_join_and_kill() {
    strategy_scenario(Kind::MachineRoom).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clustering_consistent_hash_through_join_and_kill() {
    strategy_scenario(Kind::Hash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clustering_by_config_through_join_and_kill_and_restart() {
    strategy_scenario(Kind::Config).await;
}

// ------------------------------------------------------------------------- the others

/// Sends `body_of(i)` for `range` in batches of `SEND_BATCH` (a batch goes to one queue).
async fn send_range(p: &Producer, topic: &str, range: std::ops::Range<usize>) {
    let all: Vec<usize> = range.collect();
    for chunk in all.chunks(SEND_BATCH) {
        let msgs = chunk
            .iter()
            .map(|i| Message::new(topic, body_of(*i).into_bytes()))
            .collect();
        p.send_batch(msgs).await.expect("send");
    }
}

/// Waits until the group's committed offset is the max offset on every queue of `qs`.
async fn wait_no_lag(client: &Client, group: &str, qs: &[MessageQueue]) {
    let start = Instant::now();
    loop {
        let mut lagging = Vec::new();
        for q in qs {
            let max = client.max_offset(q).await.unwrap();
            let committed = client.query_consumer_offset(group, q).await.unwrap();
            if committed != Some(max) {
                lagging.push(format!("{q}: {committed:?} of {max}"));
            }
        }
        if lagging.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < CONSUME_WITHIN,
            "{group}: offsets not committed to the end: {lagging:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Broadcasting over 2 brokers: each of 3 members gets every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broadcasting_over_two_brokers_each_member_gets_every_message_once() {
    const N: usize = 400;
    let c = cluster();
    let topic = "GcBroadcast";
    c.topic("create", topic, QUEUES).await;
    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..3 {
        let mut o = options(Strategy::Averagely);
        o.message_model = MessageModel::Broadcasting;
        o.local_offset_path = Some(dir.path().join(format!("m{i}")).join("offsets"));
        let m = push_member(c.config(""), "gc-bcast", topic, "*", o, i, &seen).await;
        assert_eq!(
            of_topic(m.assignment(), topic),
            queues(topic, QUEUES),
            "member {i} takes every queue"
        );
        members.push(m);
    }
    let p = c.producer("gc-bcast-p").await;
    send_range(&p, topic, 0..N).await;
    p.shutdown().await;
    let per_member = |seen: &Seen| -> Vec<usize> {
        let g = seen.lock().unwrap();
        (0..3)
            .map(|i| {
                g.iter()
                    .filter(|d| d.consumer == i)
                    .map(|d| &d.body)
                    .collect::<BTreeSet<_>>()
                    .len()
            })
            .collect()
    };
    wait_for(
        || format!("broadcast: each member gets {N}: {:?}", per_member(&seen)),
        CONSUME_WITHIN,
        || per_member(&seen).iter().all(|n| *n == N),
    )
    .await;
    for m in &members {
        m.shutdown().await.unwrap();
    }
    let got = seen.lock().unwrap().clone();
    let want: BTreeSet<String> = (0..N).map(body_of).collect();
    for i in 0..3 {
        let mine: Vec<&String> = got
            .iter()
            .filter(|d| d.consumer == i)
            .map(|d| &d.body)
            .collect();
        let set: BTreeSet<String> = mine.iter().map(|s| s.to_string()).collect();
        assert_eq!(set, want, "member {i}: every message");
        assert_eq!(mine.len(), N, "member {i}: each message exactly once");
        let brokers: BTreeSet<&str> = got
            .iter()
            .filter(|d| d.consumer == i)
            .map(|d| d.queue.broker_name.as_str())
            .collect();
        assert_eq!(brokers.len(), 2, "member {i} read both brokers");
    }
    eprintln!("broadcast: 3 members x {N} messages, no duplicate");
}

/// Tags over 2 brokers: `TagA || TagB` members get exactly the messages tagged TagA or TagB
/// (not TagC, an empty tag, TagAB or taga), each once; their offsets still reach the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_subscribers_over_two_brokers_get_exactly_the_matching_messages() {
    const N: usize = 600;
    const TAGS: [&str; 6] = ["TagA", "TagB", "TagC", "", "TagAB", "taga"];
    let c = cluster();
    let topic = "GcTags";
    let group = "gc-tags";
    c.topic("create", topic, QUEUES).await;
    let seen: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..2 {
        let o = options(Strategy::Averagely);
        members.push(push_member(c.config(""), group, topic, "TagA || TagB", o, i, &seen).await);
    }
    let qs = queues(topic, QUEUES);
    wait_for(
        || "tags: the two members split the queues".into(),
        SPLIT_WITHIN,
        || {
            let mut all: Vec<MessageQueue> = members
                .iter()
                .flat_map(|m| of_topic(m.assignment(), topic))
                .collect();
            all.sort();
            all == qs
        },
    )
    .await;
    let p = c.producer("gc-tags-p").await;
    let mut want = BTreeSet::new();
    let all: Vec<usize> = (0..N).collect();
    for chunk in all.chunks(SEND_BATCH) {
        let msgs = chunk
            .iter()
            .map(|i| {
                let tag = TAGS[i % TAGS.len()];
                if tag == "TagA" || tag == "TagB" {
                    want.insert(body_of(*i));
                }
                let m = Message::new(topic, body_of(*i).into_bytes());
                if tag.is_empty() {
                    m
                } else {
                    m.with_tags(tag)
                }
            })
            .collect();
        p.send_batch(msgs).await.expect("send");
    }
    p.shutdown().await;
    wait_for(
        || format!("tags: {} matching messages consumed", want.len()),
        CONSUME_WITHIN,
        || unique(&seen) >= want.len(),
    )
    .await;
    // The members went past every message, matching or not.
    wait_no_lag(members[0].client(), group, &qs).await;
    for m in &members {
        m.shutdown().await.unwrap();
    }
    let got = seen.lock().unwrap().clone();
    let bodies: BTreeSet<String> = got.iter().map(|d| d.body.clone()).collect();
    assert_eq!(bodies, want, "tags: exactly the matching messages");
    assert!(
        got.iter().all(|d| d.tags == "TagA" || d.tags == "TagB"),
        "tags: a message with another tag arrived"
    );
    assert_eq!(got.len(), want.len(), "tags: each matching message once");
    let per: BTreeSet<usize> = got.iter().map(|d| d.consumer).collect();
    assert_eq!(per.len(), 2, "tags: both members consumed");
    eprintln!(
        "tags: {} of {N} messages matched and arrived once",
        want.len()
    );
}

/// Replay: a group consumes batch A then batch B, is stopped, reset (`orbitmq admin
/// consumer reset --to T`) to a timestamp T taken between the batches, and restarted: it
/// gets exactly batch B again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_by_timestamp_redelivers_exactly_the_messages_after_it() {
    const A: usize = 200;
    const B: usize = 200;
    let c = cluster();
    let topic = "GcReplay";
    let group = "gc-replay";
    c.topic("create", topic, QUEUES).await;
    let qs = queues(topic, QUEUES);
    let p = c.producer("gc-replay-p").await;
    send_range(&p, topic, 0..A).await;
    // A timestamp after every store time of batch A, before every one of batch B.
    let acked = now_ms();
    wait_for(
        || "the clock moves".into(),
        Duration::from_secs(5),
        || now_ms() > acked,
    )
    .await;
    let ts = now_ms();
    send_range(&p, topic, A..A + B).await;
    p.shutdown().await;

    let first: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..2 {
        let o = options(Strategy::Averagely);
        members.push(push_member(c.config(""), group, topic, "*", o, i, &first).await);
    }
    wait_for(
        || format!("replay: first pass consumes {}", A + B),
        CONSUME_WITHIN,
        || unique(&first) >= A + B,
    )
    .await;
    wait_no_lag(members[0].client(), group, &qs).await;
    for m in &members {
        m.shutdown().await.unwrap();
    }
    // The premise: batch A was stored before `ts`, batch B at or after it.
    let batch_b: BTreeSet<String> = (A..A + B).map(body_of).collect();
    for d in first.lock().unwrap().iter() {
        assert_eq!(
            d.store_timestamp >= ts,
            batch_b.contains(&d.body),
            "replay: {} stored at {}, reset time {ts}",
            d.body,
            d.store_timestamp
        );
    }

    let out = c
        .admin(&[
            "consumer",
            "reset",
            "--group",
            group,
            "--topic",
            topic,
            "--to",
            &ts.to_string(),
        ])
        .await;
    assert_eq!(out.lines().count(), qs.len(), "{out}");

    let again: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..2 {
        let o = options(Strategy::Averagely);
        members.push(push_member(c.config(""), group, topic, "*", o, i, &again).await);
    }
    wait_for(
        || format!("replay: {B} messages again (have {})", unique(&again)),
        CONSUME_WITHIN,
        || unique(&again) >= B,
    )
    .await;
    wait_no_lag(members[0].client(), group, &qs).await;
    for m in &members {
        m.shutdown().await.unwrap();
    }
    let got = again.lock().unwrap().clone();
    let bodies: BTreeSet<String> = got.iter().map(|d| d.body.clone()).collect();
    assert_eq!(
        bodies, batch_b,
        "replay: exactly the messages after the timestamp"
    );
    let dups = got.len() - B;
    eprintln!(
        "replay: {B} of {} messages re-delivered, {dups} duplicates",
        A + B
    );
    assert!(dups <= MAX_DUPLICATES, "replay: {dups} duplicates");
}

/// A topic's queue count raised live (`orbitmq admin topic update`, 4 -> 8 queues on each
/// broker) while a producer sends: the members take the new queues at their next rebalance
/// and every message, those sent to the new queues too, is consumed. The write queues are
/// raised first and the read queues once the producer has sent to every new queue, so the
/// new queues surely hold messages the members have not seen when they take them (members
/// of a group started at the last offset must start a queue added live at its first offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_raised_live_are_picked_up_at_the_next_rebalance() {
    const BEFORE: u32 = 4;
    let c = cluster();
    let topic = "GcRaise";
    let group = "gc-raise";
    c.topic("create", topic, BEFORE).await;
    let seen: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..2 {
        // RocketMQ's default start: the last offset (the group is new).
        let mut o = options(Strategy::Averagely);
        o.consume_from_where = ConsumeFromWhere::LastOffset;
        members.push(push_member(c.config(""), group, topic, "*", o, i, &seen).await);
    }
    let covers = |members: &[PushConsumer], n: u32| {
        let mut all: Vec<MessageQueue> = members
            .iter()
            .flat_map(|m| of_topic(m.assignment(), topic))
            .collect();
        all.sort();
        all == queues(topic, n)
    };
    wait_for(
        || "raise: the members split the 8 queues".into(),
        SPLIT_WITHIN,
        || covers(&members, BEFORE),
    )
    .await;
    let p = Arc::new(c.producer("gc-raise-p").await);
    let sender = Sender::start(p.clone(), topic.to_owned());
    wait_for(
        || "raise: consumption under way".into(),
        CONSUME_WITHIN,
        || unique(&seen) >= 100,
    )
    .await;

    // Write queues first: the producer fills the new queues, which nobody reads yet.
    c.topic_rw("update", topic, BEFORE, QUEUES).await;
    let new_queues: BTreeSet<MessageQueue> = queues(topic, QUEUES)
        .into_iter()
        .filter(|q| q.queue_id >= BEFORE)
        .collect();
    wait_for(
        || {
            format!(
                "raise: the producer sends to every new queue: {:?}",
                sender.queues()
            )
        },
        SPLIT_WITHIN,
        || new_queues.is_subset(&sender.queues()),
    )
    .await;
    let waiting = sender.acked();
    assert!(covers(&members, BEFORE), "raise: write-only queues taken");

    // Then read queues: the members take the new queues, from their first message.
    c.topic_rw("update", topic, QUEUES, QUEUES).await;
    let raised = Instant::now();
    wait_for(
        || {
            format!(
                "raise: the members split the 16 queues: {:?}",
                members
                    .iter()
                    .map(|m| of_topic(m.assignment(), topic))
                    .collect::<Vec<_>>()
            )
        },
        SPLIT_WITHIN,
        || covers(&members, QUEUES),
    )
    .await;
    eprintln!(
        "raise: members hold 16 queues {:?} after the read queues were raised",
        raised.elapsed()
    );
    wait_for(
        || "raise: sends after the update".into(),
        CONSUME_WITHIN,
        || sender.acked() >= waiting + 2 * new_queues.len() * SEND_BATCH,
    )
    .await;
    let sent = sender.stop().await;
    p.shutdown().await;
    let n = sent.len();
    // Bounded; a shortfall is reported below with the lost messages.
    settle(CONSUME_WITHIN, || unique(&seen) >= n).await;
    for m in &members {
        m.shutdown().await.unwrap();
    }
    let got = seen.lock().unwrap().clone();
    let (want, bodies) = assert_none_lost("raise", &sent, &got);
    assert_eq!(bodies, want, "raise: every message sent, none else");
    let on_new = got.iter().filter(|d| d.queue.queue_id >= BEFORE).count();
    let dups = got.len() - n;
    eprintln!(
        "raise: {n} messages ({on_new} on the new queues, sent before the members could read \
         them: {}) consumed, {dups} duplicates",
        sent[..waiting]
            .iter()
            .filter(|(_, q)| q.queue_id >= BEFORE)
            .count()
    );
    assert!(dups <= MAX_DUPLICATES, "raise: {dups} duplicates");
}

/// A broker killed (still routed: the name server drops it only after its expiry, 120 s)
/// must not stop the group from rebalancing: the members ask the next broker for the group's
/// consumer list. Here the broker every member asks first dies, a member leaves, and the
/// survivor takes the leaver's queues of the live broker and consumes what is sent there.
/// Runs on a cluster of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_broker_does_not_stop_the_group_rebalancing() {
    const PER_QUEUE: usize = 10;
    let c = Cluster::start();
    let topic = "GcDeadBroker";
    let group = "gc-dead";
    c.topic("create", topic, 4).await;
    let seen: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..2 {
        let o = options(Strategy::Averagely);
        let id = format!("gc-dead-c{i}");
        members.push(push_member(c.config(&id), group, topic, "*", o, i, &seen).await);
    }
    let held = |m: &PushConsumer| of_topic(m.assignment(), topic);
    wait_for(
        || "dead broker: the members split the 8 queues".into(),
        SPLIT_WITHIN,
        || {
            let mut all: Vec<MessageQueue> = members.iter().flat_map(held).collect();
            all.sort();
            all == queues(topic, 4)
        },
    )
    .await;
    // The broker of the endpoint every member asks first.
    let route = members[0].client().topic_route(topic).await.unwrap();
    let first = route.endpoints().into_iter().next().unwrap().to_owned();
    let dead = route
        .queues
        .iter()
        .find(|q| q.endpoint == first)
        .unwrap()
        .mq
        .broker_name
        .clone();
    let live: Vec<MessageQueue> = queues(topic, 4)
        .into_iter()
        .filter(|q| q.broker_name != dead)
        .collect();
    c.kill(&dead);
    let leaver = members.pop().unwrap();
    // Its commits to the dead broker fail; its unregister reaches the live one.
    let _ = leaver.shutdown().await;
    let survivor = &members[0];
    let left = Instant::now();
    wait_for(
        || {
            format!(
                "dead broker: the survivor takes every queue of the live broker: holds {:?}",
                held(survivor)
            )
        },
        SPLIT_WITHIN,
        || live.iter().all(|q| held(survivor).contains(q)),
    )
    .await;
    eprintln!(
        "dead broker: {dead} killed; the survivor holds the live broker's queues {:?} after \
         the leaver left",
        left.elapsed()
    );
    let p = c.producer("gc-dead-p").await;
    let mut want = BTreeSet::new();
    let before = seen.lock().unwrap().len();
    for (k, q) in live.iter().enumerate() {
        for j in 0..PER_QUEUE {
            let i = 100_000 + k * PER_QUEUE + j;
            p.send_to_queue(Message::new(topic, body_of(i).into_bytes()), q)
                .await
                .unwrap();
            want.insert(body_of(i));
        }
    }
    p.shutdown().await;
    let arrived = |seen: &Seen| -> BTreeSet<String> {
        let g = seen.lock().unwrap();
        g[before..]
            .iter()
            .filter(|d| want.contains(&d.body))
            .map(|d| d.body.clone())
            .collect()
    };
    settle(CONSUME_WITHIN, || arrived(&seen).len() == want.len()).await;
    assert_eq!(
        arrived(&seen),
        want,
        "dead broker: the live broker's messages"
    );
    let _ = members.pop().unwrap().shutdown().await;
}

/// Queues taken at a rebalance on an endpoint whose pull loop is parked in a long poll must
/// be pulled at once, not when the long poll ends (10-15 s, `long_poll_suspend`, before
/// `sync_assignment` woke the parked pull).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queues_added_to_a_parked_endpoint_are_pulled_at_once() {
    const PROMPT: Duration = Duration::from_secs(5);
    let c = cluster();
    let topic = "GcParked";
    let group = "gc-parked";
    c.topic("create", topic, 4).await;
    let seen: Seen = Arc::default();
    let mut members = Vec::new();
    for i in 0..2 {
        let o = options(Strategy::Averagely);
        members.push(push_member(c.config(""), group, topic, "*", o, i, &seen).await);
    }
    let held = |members: &[PushConsumer]| -> usize {
        members
            .iter()
            .map(|m| of_topic(m.assignment(), topic).len())
            .sum()
    };
    wait_for(
        || "parked: 8 queues held".into(),
        SPLIT_WITHIN,
        || held(&members) == 8,
    )
    .await;
    c.topic("update", topic, QUEUES).await;
    wait_for(
        || "parked: 16 queues held".into(),
        SPLIT_WITHIN,
        || held(&members) == 16,
    )
    .await;
    let p = c.producer("gc-parked-p").await;
    let new_queues: Vec<MessageQueue> = queues(topic, QUEUES)
        .into_iter()
        .filter(|q| q.queue_id >= 4)
        .collect();
    let sent = Instant::now();
    for (k, q) in new_queues.iter().enumerate() {
        p.send_to_queue(Message::new(topic, body_of(k).into_bytes()), q)
            .await
            .unwrap();
    }
    p.shutdown().await;
    settle(CONSUME_WITHIN, || unique(&seen) >= new_queues.len()).await;
    let took = sent.elapsed();
    for m in &members {
        m.shutdown().await.unwrap();
    }
    eprintln!(
        "parked: {} messages on the new queues consumed in {took:?}",
        unique(&seen)
    );
    assert_eq!(unique(&seen), new_queues.len());
    assert!(took < PROMPT, "parked: new queues pulled after {took:?}");
}
