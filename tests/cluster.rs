//! Clusters with real processes: `orbitmq namesrv` and `orbitmq broker -c broker.conf`
//! children on local ports, TLS from `orbitmq cert init|issue`, the orbitmq-client crate and
//! the `orbitmq send` / `orbitmq admin` tools.
//!
//! Periods are shortened through their settings (`registerNameServerPeriod`,
//! `--broker-expiry-ms`, the client's route refresh) so each test runs in seconds. The tests run
//! one at a time; every child's stderr goes to `<name>.log` in the test's temporary directory
//! and is printed when a child fails to start.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_client::{
    Client, ClientConfig, ConsumeFromWhere, ConsumerOptions, LitePullConsumer, Message, Producer,
    TlsOptions,
};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, ClusterInfoResponse, ConsumerListResponse, GroupRequest};
use orbitmq_proto::msgid::OffsetId;

use common::{run, run_ok, start_proc};

/// How long a child may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of waits for a condition the cluster reaches by itself.
const SETTLE: Duration = Duration::from_secs(20);
/// Registration period of the fast-cluster brokers.
const REGISTER_PERIOD: Duration = Duration::from_millis(500);
/// Broker expiry of the fast-cluster name servers.
const BROKER_EXPIRY: Duration = Duration::from_secs(3);
const CLUSTER: &str = "TestCluster";
const TOPIC: &str = "Cluster";

/// One test at a time (2 brokers of 2 shards and 2 name servers each).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A child process that printed its `ready ...` line.
struct Proc {
    child: Child,
    line: String,
    args: Vec<String>,
    log: PathBuf,
}

impl Proc {
    fn start(args: &[String], log: &Path) -> Proc {
        let (child, line) = start_proc(args, log);
        Proc {
            child,
            line,
            args: args.to_vec(),
            log: log.to_owned(),
        }
    }

    fn field(&self, name: &str) -> String {
        self.line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name}= in {:?}", self.line))
            .to_owned()
    }

    /// kill -9.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            match self.child.try_wait().expect("wait") {
                Some(status) => {
                    assert!(status.success(), "{:?} exited with {status}", self.args);
                    return;
                }
                None if start.elapsed() > STOP_TIMEOUT => {
                    let _ = self.child.kill();
                    panic!("{:?} did not stop within {STOP_TIMEOUT:?}", self.args);
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The same command again (same ports, same data).
    fn restart(&self) -> Proc {
        let log = self.log.with_extension("restarted.log");
        Proc::start(&self.args, &log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Queue `q` of [`TOPIC`] on `broker` has its first ConsumeQueue file in shard `shard`'s store
/// and in no other (made when the topic was created or its queues added).
fn assert_first_cq_file_on(root: &Path, broker: &str, q: u32, shard: u32) {
    for k in 0..2 {
        let first = root
            .join(format!("{broker}-data/shard-{k}/consumequeue/{TOPIC}/{q}"))
            .join(format!("{:020}", 0));
        assert_eq!(first.is_file(), k == shard, "{broker} queue {q}: {first:?}");
    }
}

/// A free UDP port `p` with `p + 1` free too (a broker's two shards).
fn free_port_pair() -> u16 {
    common::free_ports(2).0
}

/// Two free UDP ports for two name servers (picked together: never the same one).
fn free_port_two() -> (u16, u16) {
    common::free_ports(1)
}

/// A cluster CA and a certificate per node name, as `orbitmq cert` makes them.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new(root: &Path, nodes: &[&str]) -> Certs {
        let dir = root.join("ca");
        let d = dir.to_str().unwrap();
        let out = run_ok(&["cert", "init", "--dir", d]);
        assert!(out.contains("ca="), "{out}");
        for n in nodes {
            let out = run_ok(&["cert", "issue", "--ca", d, "--name", n]);
            assert!(out.contains("tlsCertFile"), "{out}");
        }
        Certs { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn cert(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.pem"))
    }

    fn key(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{node}.key"))
    }
}

fn start_namesrv(
    root: &Path,
    certs: &Certs,
    name: &str,
    port: u16,
    expiry: Option<Duration>,
) -> Proc {
    let mut args: Vec<String> = vec![
        "namesrv".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--data-dir".into(),
        root.join(name).display().to_string(),
        "--tls-cert".into(),
        certs.cert(name).display().to_string(),
        "--tls-key".into(),
        certs.key(name).display().to_string(),
        "--tls-ca".into(),
        certs.ca().display().to_string(),
    ];
    if let Some(e) = expiry {
        args.extend([
            "--scan-interval-ms".into(),
            "200".into(),
            "--broker-expiry-ms".into(),
            e.as_millis().to_string(),
        ]);
    }
    let p = Proc::start(&args, &root.join(format!("{name}.log")));
    assert_eq!(p.field("namesrv"), format!("127.0.0.1:{port}"));
    assert_eq!(PathBuf::from(p.field("ca")), certs.ca());
    p
}

/// Writes a RocketMQ-style broker.conf and starts `orbitmq broker -c` on it.
fn start_broker(
    root: &Path,
    certs: &Certs,
    name: &str,
    port: u16,
    namesrv: &str,
    fast: bool,
) -> Proc {
    let mut conf = format!(
        "# broker.conf of {name}\n\
         brokerClusterName = {CLUSTER}\n\
         brokerName = {name}\n\
         brokerId = 0\n\
         namesrvAddr = {namesrv}\n\
         listenPort = {port}\n\
         brokerIP1 = 127.0.0.1\n\
         storePathRootDir = {}\n\
         deleteWhen = 04\n\
         fileReservedTime = 48\n\
         brokerRole = ASYNC_MASTER\n\
         flushDiskType = ASYNC_FLUSH\n\
         mappedFileSizeCommitLog = 67108864\n\
         shards = 2\n\
         tlsCertFile = {}\n\
         tlsKeyFile = {}\n\
         tlsCaFile = {}\n",
        root.join(format!("{name}-data")).display(),
        certs.cert(name).display(),
        certs.key(name).display(),
        certs.ca().display(),
    );
    if fast {
        conf.push_str(&format!(
            "registerNameServerPeriod = {}\nchannelExpiredTimeout = 3000\nautoCreateTopicEnable = false\n",
            REGISTER_PERIOD.as_millis()
        ));
    }
    let path = root.join(format!("{name}.conf"));
    std::fs::write(&path, conf).unwrap();
    let args: Vec<String> = vec!["broker".into(), "-c".into(), path.display().to_string()];
    let p = Proc::start(&args, &root.join(format!("{name}.log")));
    assert_eq!(p.field("broker"), format!("127.0.0.1:{port}"));
    assert_eq!(
        p.field("shards"),
        format!("127.0.0.1:{port},127.0.0.1:{}", port + 1)
    );
    p
}

/// Polls `f` until it returns `Some` or `SETTLE` passes.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < SETTLE, "{what}: not within {SETTLE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Broker names a name server knows, asking it alone.
async fn brokers_known(c: &Client, namesrv: &str) -> Option<BTreeSet<String>> {
    let f = c
        .request(
            namesrv,
            request::GET_BROKER_CLUSTER_INFO,
            Bytes::new(),
            Bytes::new(),
        )
        .await
        .ok()?;
    if f.code != response::SUCCESS {
        return None;
    }
    let info: ClusterInfoResponse = header::decode(&f.header).ok()?;
    Some(
        info.clusters
            .into_iter()
            .flat_map(|(_, b)| b)
            .map(|s| s.broker.broker_name)
            .collect(),
    )
}

/// What the producer was told: broker -> (queue, offset) -> body.
type Acked = BTreeMap<(String, u32, u64), String>;

struct SendLog {
    /// (started, finished, broker on success).
    outcomes: Vec<(Instant, Instant, Option<String>)>,
    acked: Acked,
}

fn fast_config(namesrv: &str, ca: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(namesrv).with_tls(TlsOptions::with_ca(ca));
    c.poll_name_server_interval = Duration::from_secs(1);
    c.heartbeat_interval = Duration::from_secs(1);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_fail_over_and_name_servers_are_stateless() {
    const SENDERS: usize = 8;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let certs = Certs::new(root, &["ns1", "ns2", "broker-a", "broker-b"]);
    let (p1, p2) = free_port_two();
    let ns_list = format!("127.0.0.1:{p1};127.0.0.1:{p2}");
    let mut ns1 = start_namesrv(root, &certs, "ns1", p1, Some(BROKER_EXPIRY));
    let _ns2 = start_namesrv(root, &certs, "ns2", p2, Some(BROKER_EXPIRY));
    let (pa, pb) = (free_port_pair(), free_port_pair());
    let mut a = start_broker(root, &certs, "broker-a", pa, &ns_list, true);
    let mut b = start_broker(root, &certs, "broker-b", pb, &ns_list, true);
    let ca = certs.ca();
    let ca_s = ca.to_str().unwrap();

    // `orbitmq admin <cmd...> --namesrv .. --tls-ca .. <more...>`.
    let admin = |cmd: &[&'static str], more: &[&'static str]| {
        let mut args = vec!["admin"];
        args.extend_from_slice(cmd);
        args.extend_from_slice(&["--namesrv", &ns_list, "--tls-ca", ca_s]);
        args.extend_from_slice(more);
        args
    };
    // `admin topic create|update` on every broker of the cluster.
    let topic_cmd = |verb, topic, queues: &[&'static str]| {
        let mut more = vec!["--cluster", CLUSTER, "--topic", topic];
        more.extend_from_slice(queues);
        admin(&["topic", verb], &more)
    };
    // One topic of 8 queues on each broker.
    let out = run_ok(&topic_cmd(
        "create",
        TOPIC,
        &["--read-queues", "8", "--write-queues", "8"],
    ));
    assert_eq!(
        out.lines().filter(|l| l.contains("topic=Cluster")).count(),
        2,
        "{out}"
    );
    let out = run_ok(&admin(&["topic", "route"], &["--topic", TOPIC]));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("queue ")).count(),
        16,
        "{out}"
    );
    // Each queue's ConsumeQueue directory and first file are made at creation, in the store
    // of the shard the route names for it, and in no other.
    for line in out.lines().filter(|l| l.starts_with("queue ")) {
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line}"))
                .to_owned()
        };
        let (broker, q) = (field("broker="), field("id=").parse().unwrap());
        assert_first_cq_file_on(root, &broker, q, field("shard=").parse().unwrap());
    }
    // The broker's internal topics cannot be created.
    let out = run(&topic_cmd("create", "SCHEDULE_TOPIC_XXXX", &[]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("internal to the broker and cannot be created"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_ok(&admin(&["topic", "list"], &["--cluster", CLUSTER]));
    assert_eq!(out.trim(), TOPIC);
    let out = run_ok(&admin(&["cluster", "list"], &[]));
    assert_eq!(out.lines().count(), 2, "{out}");
    // An unknown topic is a clear error (no broker auto-creates here).
    let out = run(&admin(&["topic", "route"], &["--topic", "Nope"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route for topic Nope"));

    let client = Client::new(fast_config(&ns_list, &ca)).await.unwrap();
    let route = client.topic_route(TOPIC).await.unwrap();
    assert_eq!(route.queues.len(), 16);
    assert_eq!(route.brokers.len(), 2);
    assert_eq!(route.brokers[0].shard_endpoints.len(), 2);

    // Senders run all along and log every outcome.
    let producer = Producer::with_client("cluster-pg", client.clone()).unwrap();
    let log = Arc::new(Mutex::new(SendLog {
        outcomes: Vec::new(),
        acked: Acked::new(),
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for k in 0..SENDERS {
        let (p, log, stop) = (producer.clone(), log.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = format!("s{k}-{i}");
                i += 1;
                let t0 = Instant::now();
                let r = p.send(Message::new(TOPIC, body.clone())).await;
                let done = Instant::now();
                let broker = r.as_ref().ok().map(|r| r.queue.broker_name.clone());
                {
                    let mut l = log.lock().unwrap();
                    if let Ok(r) = r {
                        l.acked.insert(
                            (r.queue.broker_name, r.queue.queue_id, r.queue_offset),
                            body,
                        );
                    }
                    l.outcomes.push((t0, done, broker));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let l = log.lock().unwrap();
        let per: BTreeSet<&str> = l.acked.keys().map(|k| k.0.as_str()).collect();
        assert_eq!(per.len(), 2, "sends spread over both brokers");
        assert!(
            l.outcomes.iter().all(|o| o.2.is_some()),
            "no failure before the kill"
        );
    }

    // kill -9 broker b: sends go on on broker a.
    b.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    {
        let l = log.lock().unwrap();
        let after: Vec<_> = l.outcomes.iter().filter(|o| o.0 >= killed).collect();
        let late: Vec<_> = after
            .iter()
            .filter(|o| o.0 >= killed + Duration::from_secs(5))
            .collect();
        assert!(!late.is_empty());
        assert!(
            late.iter().all(|o| o.2.as_deref() == Some("broker-a")),
            "every send started 5 s after the kill succeeds on broker a"
        );
        let first_ok = after
            .iter()
            .filter(|o| o.2.is_some())
            .map(|o| o.1)
            .min()
            .expect("sends succeed after the kill");
        assert!(first_ok < killed + Duration::from_secs(5));
    }
    // The name servers drop the silent broker after the expiry.
    eventually("broker-b evicted", || async {
        let r = client.refresh_route(TOPIC).await.ok()?;
        (r.brokers.len() == 1 && r.queues.len() == 8).then_some(())
    })
    .await;

    // Restart b: it registers again and its acknowledged messages are all there.
    let b2 = b.restart();
    eventually("broker-b back in the route", || async {
        let r = client.refresh_route(TOPIC).await.ok()?;
        (r.brokers.len() == 2).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = std::mem::take(&mut log.lock().unwrap().acked);
    let consumer = LitePullConsumer::with_options(
        "cluster-verify",
        fast_config(&ns_list, &ca),
        ConsumerOptions::default().from_where(ConsumeFromWhere::FirstOffset),
    )
    .await
    .unwrap();
    consumer.subscribe(TOPIC, "*").await.unwrap();
    let mut seen: Acked = Acked::new();
    let start = Instant::now();
    while !acked.keys().all(|k| seen.contains_key(k)) && start.elapsed() < SETTLE * 3 {
        for m in consumer.poll(Duration::from_millis(500)).await.unwrap() {
            seen.insert(
                (m.broker_name.clone(), m.queue_id, m.queue_offset),
                String::from_utf8_lossy(&m.body).into_owned(),
            );
        }
    }
    for (k, body) in &acked {
        assert_eq!(seen.get(k), Some(body), "acknowledged send {k:?} lost");
    }
    assert!(acked.keys().any(|k| k.0 == "broker-b"));

    // The broker keeps the consumer list per group from the heartbeats.
    let lookup = header::encode(&GroupRequest {
        group: "cluster-verify".into(),
    });
    let a_addr = a.field("broker");
    let ids = eventually("consumer listed", || async {
        let f = client
            .request(
                &a_addr,
                request::GET_CONSUMER_LIST_BY_GROUP,
                lookup.clone(),
                Bytes::new(),
            )
            .await
            .ok()?;
        let l: ConsumerListResponse = header::decode(&f.header).ok()?;
        (!l.client_ids.is_empty()).then_some(l.client_ids)
    })
    .await;
    assert_eq!(ids, vec![consumer.client().client_id().to_string()]);

    // Raising the queue count live: producers and consumers pick the new queues up.
    run_ok(&topic_cmd(
        "update",
        TOPIC,
        &["--read-queues", "12", "--write-queues", "12"],
    ));
    let r = client.refresh_route(TOPIC).await.unwrap();
    assert_eq!(r.queues.len(), 24, "the route reflects it at once");
    for qi in r.queues.iter().filter(|qi| qi.mq.queue_id >= 8) {
        assert_first_cq_file_on(root, &qi.mq.broker_name, qi.mq.queue_id, qi.shard);
    }
    let high = eventually("a send to a new queue", || async {
        let r = producer.send(Message::new(TOPIC, "high")).await.ok()?;
        (r.queue.queue_id >= 8).then_some(r)
    })
    .await;
    let got = eventually("the consumer reads a new queue", || async {
        let ms = consumer.poll(Duration::from_millis(200)).await.ok()?;
        ms.into_iter()
            .find(|m| m.queue_id == high.queue.queue_id && m.broker_name == high.queue.broker_name)
    })
    .await;
    assert_eq!(&got.body[..], b"high");

    // A name server dies: routes still resolve through the other.
    ns1.kill();
    let fresh = Client::new(fast_config(&ns_list, &ca)).await.unwrap();
    assert_eq!(fresh.topic_route(TOPIC).await.unwrap().queues.len(), 24);
    producer
        .send(Message::new(TOPIC, "after ns1 died"))
        .await
        .unwrap();
    // Restarted, it knows every broker again within one registration period.
    let ns1b = ns1.restart();
    let back = Instant::now();
    let ns1_addr = ns1b.field("namesrv");
    eventually("ns1 relearns both brokers", || async {
        let known = brokers_known(&fresh, &ns1_addr).await?;
        (known.len() == 2).then_some(())
    })
    .await;
    // One period, plus a connect attempt that may have started before it listened (1 s to
    // time out) and room for a loaded machine: far below the 30 s of RocketMQ's default period
    // these brokers do not use.
    assert!(
        back.elapsed() < REGISTER_PERIOD + Duration::from_secs(6),
        "relearned in {:?}",
        back.elapsed()
    );

    // A clean shutdown unregisters at once (well before the expiry).
    a.stop();
    let stopped = Instant::now();
    eventually("broker-a unregistered", || async {
        let known = brokers_known(&fresh, &ns1_addr).await?;
        (!known.contains("broker-a")).then_some(())
    })
    .await;
    assert!(stopped.elapsed() < BROKER_EXPIRY);

    // Its commit to the stopped broker a fails; nothing to check there.
    let _ = consumer.shutdown().await;
    producer.shutdown().await;
    client.shutdown().await;
    fresh.shutdown().await;
    drop(b2);
}

/// The check from the issue: two name servers and two brokers from broker.conf files with
/// RocketMQ's default periods and auto-creation; `orbitmq send --namesrv "A;B"` processes spread over both
/// brokers, and after kill -9 of one, at least 18 of the next 20 succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_processes_spread_and_survive_a_killed_broker() {
    const SENDS: usize = 20;
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let certs = Certs::new(root, &["ns1", "ns2", "broker-a", "broker-b"]);
    let (p1, p2) = free_port_two();
    let ns_list = format!("127.0.0.1:{p1};127.0.0.1:{p2}");
    let _ns1 = start_namesrv(root, &certs, "ns1", p1, None);
    let _ns2 = start_namesrv(root, &certs, "ns2", p2, None);
    let (pa, pb) = (free_port_pair(), free_port_pair());
    let _a = start_broker(root, &certs, "broker-a", pa, &ns_list, false);
    let mut b = start_broker(root, &certs, "broker-b", pb, &ns_list, false);
    let ca = certs.ca();
    let ca_s = ca.to_str().unwrap();
    // No admin step: the topic is auto-created (autoCreateTopicEnable is on by default) and
    // spreads over both brokers.
    let broker_of = |out: &str| -> u16 {
        let id = out
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("msgId="))
            .unwrap_or_else(|| panic!("no msgId in {out:?}"));
        let port = OffsetId::decode(id).unwrap().port;
        if port == pa || port == pa + 1 {
            pa
        } else {
            assert!(port == pb || port == pb + 1, "{out}");
            pb
        }
    };
    let send = |i: usize| {
        run(&[
            "send",
            "--namesrv",
            &ns_list,
            "--tls-ca",
            ca_s,
            "--topic",
            "Orders",
            "--body",
            &format!("m{i}"),
        ])
    };
    let mut used = BTreeSet::new();
    for i in 0..SENDS {
        let out = send(i);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        used.insert(broker_of(&String::from_utf8_lossy(&out.stdout)));
    }
    assert_eq!(used.len(), 2, "sends spread over both brokers");

    b.kill();
    let mut ok = 0;
    for i in 0..SENDS {
        let t = Instant::now();
        let out = send(SENDS + i);
        if out.status.success() {
            ok += 1;
            assert_eq!(broker_of(&String::from_utf8_lossy(&out.stdout)), pa);
        } else {
            eprintln!(
                "send {i} failed after {:?}: {}",
                t.elapsed(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(ok >= 18, "{ok} of {SENDS} sends succeeded after the kill");
}
