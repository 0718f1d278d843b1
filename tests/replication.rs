//! Master/slave replication with real processes: `orbitmq namesrv`, a SYNC_MASTER and a
//! SLAVE `orbitmq broker -c broker.conf` (2 shards each, TLS from `orbitmq cert`), and the
//! client crate.
//!
//! What a user relies on: a SYNC_MASTER send is acknowledged `SEND_OK` once the slave has the
//! message (`SLAVE_NOT_AVAILABLE` without a slave, `FLUSH_SLAVE_TIMEOUT` when it stops
//! answering, the message stored on the master either way, with its id); a slave takes no writes; a killed slave catches
//! up when it comes back; and when the master is gone, consumers read every stored message
//! from the slave, in order, at the master's offsets.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    body_of, free_ports, from_first, make_certs, poll_n, run_ok, start_namesrv, start_proc,
};
use orbitmq_client::{
    Client, ClientConfig, ClientError, LitePullConsumer, LocalTransactionState, Message,
    MessageExt, Producer, SendStatus, TlsOptions, TransactionListener, TransactionProducer,
};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{
    self, ErrorResponse, HaPullRequest, MessageMeta, OffsetResponse, QueueRequest, SendRequest,
};
use orbitmq_proto::msgid::OffsetId;

const TOPIC: &str = "Replicated";
/// Its queues, over both shards.
const TOPIC_QUEUES: usize = 4;
/// Gets delayed messages (level 1 = 1 s here).
const DELAYED: &str = "Later";
/// Master and slave share it; the slave registers as id 1.
const BROKER: &str = "broker-a";
/// How long a SYNC_MASTER send waits for its slave here (`syncFlushTimeout`): long enough
/// that a slave slowed by a loaded machine is not taken for a dead one, and well within the
/// client's [`SEND_TIMEOUT`].
const SLAVE_TIMEOUT_MS: u64 = 2500;
/// The clients' send timeout here.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// One test at a time: each runs three processes with timeouts of a second.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Bound of the waits for the cluster to settle by itself.
const SETTLE: Duration = Duration::from_secs(60);

/// A broker.conf for `role` with id `id` on `port`.
fn broker_conf(root: &Path, ca: &Path, name: &str, role: &str, id: u32, namesrv: &str) -> String {
    let (port, _) = free_ports(2);
    let pem = |ext: &str| ca.parent().unwrap().join(format!("{name}.{ext}"));
    let conf = format!(
        "brokerClusterName = ReplCluster\n\
         brokerName = {BROKER}\n\
         brokerId = {id}\n\
         brokerRole = {role}\n\
         syncFlushTimeout = {SLAVE_TIMEOUT_MS}\n\
         namesrvAddr = {namesrv}\n\
         listenPort = {port}\n\
         brokerIP1 = 127.0.0.1\n\
         storePathRootDir = {}\n\
         flushDiskType = ASYNC_FLUSH\n\
         mappedFileSizeCommitLog = 67108864\n\
         tlsCertFile = {}\n\
         tlsKeyFile = {}\n\
         tlsCaFile = {}\n\
         registerNameServerPeriod = 300\n\
         messageDelayLevel = 1s 2s\n\
         autoCreateTopicEnable = false\n",
        root.join(format!("{name}-data")).display(),
        pem("pem").display(),
        pem("key").display(),
        ca.display(),
    );
    // A slave's new data directory takes its master's shard count by itself.
    let conf = if role == "SLAVE" {
        conf
    } else {
        conf + "shards = 2\n"
    };
    let path = root.join(format!("{name}.conf"));
    std::fs::write(&path, conf).unwrap();
    path.display().to_string()
}

fn start_broker(root: &Path, name: &str, conf: &str) -> (std::process::Child, String) {
    let (child, line) = start_proc(
        &["broker".into(), "-c".into(), conf.into()],
        &root.join(format!("{name}.log")),
    );
    let shard0 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("broker="))
        .unwrap_or_else(|| panic!("no broker= in {line:?}"))
        .to_owned();
    (child, shard0)
}

/// A group's committed offset of a queue of [`TOPIC`] as the broker shard at `endpoint` holds
/// it (`None`: none, or no answer).
async fn committed_at(client: &Client, endpoint: &str, group: &str, queue_id: u32) -> Option<u64> {
    let h = header::encode(&QueueRequest {
        group: group.into(),
        topic: TOPIC.into(),
        queue_id,
    });
    let f = client
        .request(endpoint, request::QUERY_CONSUMER_OFFSET, h, Bytes::new())
        .await
        .ok()?;
    (f.code == response::SUCCESS)
        .then(|| header::decode::<OffsetResponse>(&f.header).ok())
        .flatten()
        .map(|r| r.offset)
}

/// Messages of delay level 1 delivered, by the schedule progress files of a data directory's
/// shards.
fn delivered_level_1(data: &Path) -> u64 {
    let mut n = 0;
    for shard in std::fs::read_dir(data).unwrap().flatten() {
        let Ok(text) = std::fs::read_to_string(shard.path().join("schedule-progress")) else {
            continue;
        };
        n += text
            .lines()
            .find_map(|l| l.strip_prefix("level 1 "))
            .map_or(0, |o| o.trim().parse::<u64>().unwrap());
    }
    n
}

fn signal(child: &std::process::Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child, not yet waited for.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

fn kill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A transaction listener that counts its runs and commits.
#[derive(Default)]
struct Runs(AtomicUsize);

impl TransactionListener for Runs {
    fn execute_local_transaction(&self, _: &Message) -> LocalTransactionState {
        self.0.fetch_add(1, Ordering::SeqCst);
        LocalTransactionState::CommitMessage
    }
    fn check_local_transaction(&self, _: &MessageExt) -> LocalTransactionState {
        LocalTransactionState::CommitMessage
    }
}

/// Sends message `i` (body [`body_of`]); a stored one goes into `stored` with its offset id.
/// Returns its status and queue id.
async fn send_to(
    p: &Producer,
    i: usize,
    stored: &mut BTreeMap<String, String>,
) -> Result<(SendStatus, u32), ClientError> {
    let r = p
        .send(Message::new(TOPIC, body_of(i)).with_key(format!("k{i}")))
        .await?;
    // Every status is of a stored message (on the master at least).
    stored.insert(body_of(i), r.msg_id);
    Ok((r.status, r.queue.queue_id))
}

/// [`send_to`]'s status.
async fn send(
    p: &Producer,
    i: usize,
    stored: &mut BTreeMap<String, String>,
) -> Result<SendStatus, ClientError> {
    Ok(send_to(p, i, stored).await?.0)
}

/// Sends until every queue of the topic (so every master shard) acknowledged one with the
/// slave's copy: each master shard has its own slave shard, which catches up on its own.
async fn until_in_sync(p: &Producer, next: &mut usize, stored: &mut BTreeMap<String, String>) {
    let start = Instant::now();
    let mut in_sync = std::collections::BTreeSet::new();
    loop {
        assert!(start.elapsed() < SETTLE, "the slave did not get in sync");
        let i = *next;
        *next += 1;
        match send_to(p, i, stored).await {
            Ok((SendStatus::SendOk, q)) => {
                in_sync.insert(q);
                if in_sync.len() == TOPIC_QUEUES {
                    return;
                }
            }
            Ok(_) => {
                in_sync.clear();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("send {i}: {e}"),
        }
    }
}

/// Waits for the name server to drop a killed master (4 s): the topic's route is then the
/// slave's, read-only.
async fn until_routed_to_slave(config: &ClientConfig) {
    let probe = Client::new(config.clone()).await.unwrap();
    let start = Instant::now();
    while !probe
        .refresh_route(TOPIC)
        .await
        .is_ok_and(|r| !r.queues.is_empty() && r.queues.iter().all(|q| !q.writable()))
    {
        assert!(
            start.elapsed() < SETTLE,
            "the topic was never routed to the slave"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    probe.shutdown().await;
}

/// A name server (brokers expire after 4 s), the SYNC_MASTER's broker.conf and topics, the
/// slave's broker.conf, and a client config for them.
struct Setup {
    dir: tempfile::TempDir,
    ns: std::process::Child,
    master_conf: String,
    slave_conf: String,
    config: ClientConfig,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ca_dir = make_certs(root, &["ns1", "master", "slave"]);
    let ca = ca_dir.join("ca.pem");
    let (ns, namesrv) = start_namesrv(
        root,
        &ca_dir,
        "ns1",
        &["--scan-interval-ms", "200", "--broker-expiry-ms", "4000"],
    );
    // The master's topic; the slave gets it from the master.
    std::fs::create_dir_all(root.join("master-data")).unwrap();
    std::fs::write(
        root.join("master-data/topics.conf"),
        format!("{TOPIC} {TOPIC_QUEUES} {TOPIC_QUEUES} 6\n{DELAYED} 1 1 6\n"),
    )
    .unwrap();
    let master_conf = broker_conf(root, &ca, "master", "SYNC_MASTER", 0, &namesrv);
    let slave_conf = broker_conf(root, &ca, "slave", "SLAVE", 1, &namesrv);
    let mut config = ClientConfig::new(&namesrv).with_tls(TlsOptions::with_ca(&ca));
    config.poll_name_server_interval = Duration::from_millis(500);
    config.retry_times_when_send_failed = 0;
    config.send_timeout = SEND_TIMEOUT;
    Setup {
        dir,
        ns,
        master_conf,
        slave_conf,
        config,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_send_ok_of_a_sync_master_killed_under_load_is_on_its_slave_even_if_the_slave_froze()
{
    let _one = SERIAL.lock().await;
    let Setup {
        dir,
        mut ns,
        master_conf,
        slave_conf,
        config,
    } = setup();
    let root = dir.path();
    let (mut master, _) = start_broker(root, "master", &master_conf);
    let (mut slave, _) = start_broker(root, "slave", &slave_conf);
    let p = Producer::new("load-pg", config.clone()).await.unwrap();
    let mut warmup = BTreeMap::new();
    let mut next = 0usize;
    until_in_sync(&p, &mut next, &mut warmup).await;
    // The slave has the master's topics (copied every 2 s once it copies the log), so it can
    // serve the topic once the master is gone.
    let topics = root.join("slave-data/topics.conf");
    let start = Instant::now();
    while !std::fs::read_to_string(&topics).is_ok_and(|t| t.contains(TOPIC)) {
        assert!(
            start.elapsed() < SETTLE,
            "the slave did not copy the topics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Four senders; the master is killed while they run.
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for t in 0..4 {
        let (p, acked, stop) = (p.clone(), acked.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let body = format!("load-{t}-{i}");
                match p.send(Message::new(TOPIC, body.clone())).await {
                    Ok(r) if r.status == SendStatus::SendOk => acked.lock().unwrap().push(body),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The slave freezes, and the master dies while sends wait for the slave: those must not
    // have been acknowledged SEND_OK.
    signal(&slave, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&mut master);
    signal(&slave, libc::SIGCONT);
    stop.store(true, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    let acked: std::collections::BTreeSet<String> = acked.lock().unwrap().drain(..).collect();
    assert!(acked.len() > 8, "only {} sends acknowledged", acked.len());

    // Every SEND_OK is on the slave (other stored messages may be there too).
    until_routed_to_slave(&config).await;
    let c = LitePullConsumer::with_options("load-cg", config.clone(), from_first())
        .await
        .unwrap();
    c.subscribe(TOPIC, "*").await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let start = Instant::now();
    while !acked.is_subset(&seen) && start.elapsed() < SETTLE {
        for m in c.poll(Duration::from_secs(1)).await.unwrap() {
            seen.insert(String::from_utf8(m.body.to_vec()).unwrap());
        }
    }
    let missing: Vec<&String> = acked.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not on the slave: {missing:?}"
    );
    c.shutdown().await.unwrap();
    p.shutdown().await;
    kill(&mut slave);
    kill(&mut ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_master_waits_for_its_slave_and_the_slave_serves_reads_when_the_master_is_gone() {
    let _one = SERIAL.lock().await;
    let Setup {
        dir,
        mut ns,
        master_conf,
        slave_conf,
        config,
    } = setup();
    let root = dir.path();
    let (mut master, master_shard0) = start_broker(root, "master", &master_conf);
    let p = Producer::new("repl-pg", config.clone()).await.unwrap();
    let mut stored = BTreeMap::new();
    let mut next = 0usize;

    // No slave yet: stored on the master, but not acknowledged as copied.
    assert_eq!(
        send(&p, next, &mut stored).await.unwrap(),
        SendStatus::SlaveNotAvailable
    );
    next += 1;
    // A transaction's half message that was not copied is rolled back, its local transaction
    // not run (as RocketMQ): consumers never see it (the reads below find only `stored`).
    let runs = Arc::new(Runs::default());
    let tp = TransactionProducer::new("repl-tx", config.clone(), runs.clone())
        .await
        .unwrap();
    let r = tp
        .send_message_in_transaction(Message::new(TOPIC, "never committed"))
        .await
        .unwrap();
    assert_eq!(r.send.status, SendStatus::SlaveNotAvailable);
    assert_eq!(r.local_state, LocalTransactionState::RollbackMessage);
    assert_eq!(
        runs.0.load(Ordering::SeqCst),
        0,
        "the local transaction did not run"
    );
    tp.shutdown().await;

    // The slave starts, finds its master through the name server and catches up.
    let (mut slave, slave_shard0) = start_broker(root, "slave", &slave_conf);
    let shape = std::fs::read_to_string(root.join("slave-data/shape.properties")).unwrap();
    assert!(shape.contains("shards=2"), "{shape}");
    until_in_sync(&p, &mut next, &mut stored).await;
    for _ in 0..200 {
        let status = send(&p, next, &mut stored).await.unwrap();
        assert_eq!(
            status,
            SendStatus::SendOk,
            "send {next} with the slave in sync"
        );
        next += 1;
    }

    // The admin tool shows each master shard's slave in sync.
    let (ns_addr, ca) = (
        config.namesrv[0].clone(),
        root.join("ca/ca.pem").display().to_string(),
    );
    let out = tokio::task::spawn_blocking(move || {
        run_ok(&[
            "admin",
            "cluster",
            "ha",
            "--namesrv",
            &ns_addr,
            "--tls-ca",
            &ca,
        ])
    })
    .await
    .unwrap();
    for shard in 0..2 {
        let line = out
            .lines()
            .find(|l| l.contains(&format!(" shard={shard} ")))
            .unwrap_or_else(|| panic!("no shard {shard} in {out}"));
        assert!(
            line.contains("slave=1") && line.contains("in_sync=true"),
            "{line}"
        );
    }

    // Only the cluster's brokers may copy the log: a client without a certificate of the
    // cluster CA gets nothing.
    let client = Client::new(config.clone()).await.unwrap();
    let pull = header::encode(&HaPullRequest {
        broker_name: BROKER.into(),
        slave_id: 7,
        shard: 0,
        segment_size: 67108864,
        ..Default::default()
    });
    let f = client
        .request(&master_shard0, request::HA_PULL, pull, Bytes::new())
        .await
        .unwrap();
    assert_eq!(f.code, response::NO_PERMISSION);
    assert!(f.body.is_empty());

    // A slave takes no writes.
    let f = client
        .request(
            &slave_shard0,
            request::SEND_MESSAGE,
            header::encode(&SendRequest {
                producer_group: "repl-pg".into(),
                topic: TOPIC.into(),
                queue_id: 0,
                messages: vec![MessageMeta {
                    body_len: 1,
                    ..Default::default()
                }],
            }),
            Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
    assert_eq!(f.code, response::SERVICE_NOT_AVAILABLE);
    let why = header::decode::<ErrorResponse>(&f.header).unwrap().message;
    assert!(why.contains("is a SLAVE"), "{why}");

    // The slave dies: the next send times out waiting for it (stored on the master).
    kill(&mut slave);
    let status = send(&p, next, &mut stored).await.unwrap();
    assert!(
        matches!(
            status,
            SendStatus::FlushSlaveTimeout | SendStatus::SlaveNotAvailable
        ),
        "with the slave killed: {status:?}"
    );
    next += 1;
    // It comes back (same data) and copies what it missed.
    let (slave_back, _) = start_broker(root, "slave-again", &slave_conf);
    let mut slave = slave_back;
    until_in_sync(&p, &mut next, &mut stored).await;
    for _ in 0..50 {
        assert_eq!(
            send(&p, next, &mut stored).await.unwrap(),
            SendStatus::SendOk
        );
        next += 1;
    }
    assert!(stored.len() > 250);

    // A group consumes everything so far from the master and commits; then more arrive.
    let done = LitePullConsumer::with_options("repl-cg", config.clone(), from_first())
        .await
        .unwrap();
    done.subscribe(TOPIC, "*").await.unwrap();
    assert_eq!(poll_n(&done, stored.len()).await.len(), stored.len());
    done.shutdown().await.unwrap();
    let mut later = BTreeMap::new();
    for _ in 0..20 {
        assert_eq!(
            send(&p, next, &mut later).await.unwrap(),
            SendStatus::SendOk
        );
        next += 1;
    }
    stored.extend(later.clone());
    // The slave copies the master's committed offsets every 5 s.
    // Delayed messages, delivered by the master's scheduler and consumed there.
    for i in 0..3 {
        p.send(Message::new(DELAYED, format!("later-{i}")).with_delay_level(1))
            .await
            .unwrap();
    }
    let later_cg = LitePullConsumer::with_options("later-cg", config.clone(), from_first())
        .await
        .unwrap();
    later_cg.subscribe(DELAYED, "*").await.unwrap();
    assert_eq!(poll_n(&later_cg, 3).await.len(), 3);
    later_cg.shutdown().await.unwrap();
    // Each slave shard copies its master shard's committed offsets and delivery progress
    // every 5 s: wait until the slave holds repl-cg's final offsets on every queue and the
    // progress of the 3 deliveries.
    let probe = Client::new(config.clone()).await.unwrap();
    let route = probe.topic_route(TOPIC).await.unwrap();
    let port = |ep: &str| ep.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let start = Instant::now();
    loop {
        let mut same = delivered_level_1(&root.join("slave-data")) == 3;
        for q in &route.queues {
            let shard = port(&q.endpoint) - port(&master_shard0);
            let on_slave = format!("127.0.0.1:{}", port(&slave_shard0) + shard);
            let theirs = committed_at(&probe, &q.endpoint, "repl-cg", q.mq.queue_id).await;
            let ours = committed_at(&probe, &on_slave, "repl-cg", q.mq.queue_id).await;
            same &= theirs.is_some() && theirs == ours;
        }
        if same {
            break;
        }
        assert!(
            start.elapsed() < SETTLE,
            "the slave did not copy the offsets and the delivery progress"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    probe.shutdown().await;

    // The master dies. The name server drops it and routes the topic to the slave,
    // read-only: every stored message is read from the slave, in order, at its offsets.
    kill(&mut master);
    until_routed_to_slave(&config).await;
    let c = LitePullConsumer::with_options("repl-all", config.clone(), from_first())
        .await
        .unwrap();
    c.subscribe(TOPIC, "*").await.unwrap();
    let got = poll_n(&c, stored.len()).await;
    assert_eq!(got.len(), stored.len(), "read from the slave");
    let mut per_queue: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for m in &got {
        let body = String::from_utf8(m.body.to_vec()).unwrap();
        let id = stored
            .get(&body)
            .unwrap_or_else(|| panic!("{body:?} was never sent"));
        // The slave's copy sits at the master's log offset.
        let (a, b) = (
            OffsetId::decode(id).unwrap(),
            OffsetId::decode(&m.msg_id).unwrap(),
        );
        assert_eq!((a.shard, a.offset), (b.shard, b.offset), "{body}");
        per_queue
            .entry(m.queue_id)
            .or_default()
            .push(m.queue_offset);
    }
    let distinct: std::collections::BTreeSet<&[u8]> = got.iter().map(|m| &m.body[..]).collect();
    assert_eq!(distinct.len(), stored.len(), "each stored message once");
    for (q, offsets) in &per_queue {
        let dense: Vec<u64> = (0..offsets.len() as u64).collect();
        assert_eq!(offsets, &dense, "queue {q} in order, from 0");
    }
    c.shutdown().await.unwrap();
    // The group that had committed on the master goes on from its offsets on the slave: only
    // the messages after its commit.
    let resumed = LitePullConsumer::with_options("repl-cg", config.clone(), from_first())
        .await
        .unwrap();
    resumed.subscribe(TOPIC, "*").await.unwrap();
    let rest = poll_n(&resumed, later.len()).await;
    let rest: std::collections::BTreeSet<String> = rest
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    assert_eq!(rest, later.keys().cloned().collect());
    assert!(resumed
        .poll(Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    resumed.shutdown().await.unwrap();
    // No writable queue while the master is gone.
    assert!(p
        .send(Message::new(TOPIC, "after the master"))
        .await
        .is_err());

    // The slave's data becomes the master (restarted as id 0): queue offsets go on.
    kill(&mut slave);
    let promoted_conf = slave_conf.replace(".conf", "-promoted.conf");
    let text = std::fs::read_to_string(&slave_conf)
        .unwrap()
        .replace("brokerId = 1", "brokerId = 0")
        .replace("brokerRole = SLAVE", "brokerRole = ASYNC_MASTER");
    std::fs::write(&promoted_conf, text).unwrap();
    let (mut promoted, _) = start_broker(root, "promoted", &promoted_conf);
    let start = Instant::now();
    let r = loop {
        match p.send(Message::new(TOPIC, "on the promoted master")).await {
            Ok(r) => break r,
            Err(e) => assert!(
                start.elapsed() < SETTLE,
                "no send to the promoted slave: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let had = per_queue.get(&r.queue.queue_id).map_or(0, Vec::len) as u64;
    assert_eq!(
        r.queue_offset, had,
        "the queue goes on where the master left it"
    );
    // Its scheduler goes on from the master's progress: the delayed messages the master
    // delivered are not delivered again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all_later = LitePullConsumer::with_options("later-all", config.clone(), from_first())
        .await
        .unwrap();
    all_later.subscribe(DELAYED, "*").await.unwrap();
    let mut seen = poll_n(&all_later, 3).await;
    seen.extend(all_later.poll(Duration::from_secs(1)).await.unwrap());
    let mut bodies: Vec<String> = seen
        .iter()
        .map(|m| String::from_utf8(m.body.to_vec()).unwrap())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["later-0", "later-1", "later-2"]);
    all_later.shutdown().await.unwrap();
    p.shutdown().await;
    kill(&mut promoted);
    kill(&mut ns);
}
