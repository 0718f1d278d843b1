//! Shards: one glommio executor per core, each owning its queues and its own store.
//!
//! A shard's store lives in `<data-dir>/shard-<k>`. The shard count and the queue -> shard map
//! are recorded in the data directory when it is created ([`crate::log::shape`]); a restart with
//! another count is refused.

pub mod broker;
pub mod clients;
pub mod ha;
pub mod locks;
pub mod query;
pub mod sendback;
pub mod txn;

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement, PoolPlacement};
use thiserror::Error;
use tracing::{error, info};

use crate::log::shape::{self, Shape};
use crate::log::{Store, StoreConfig};
use crate::nameserver::topics::{TopicView, Topics};
use crate::net::server::Connections;
use broker::BrokerShared;

/// glommio refuses to start below this locked-memory limit.
pub const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;
/// glommio's registered I/O memory per shard is at most this share of the locked-memory
/// limit: it needs that memory for its three rings, and more falls back to the heap anyway.
pub const MEMLOCK_SHARE_PER_SHARD: u64 = 3;
/// Upper bound of a shard's registered I/O memory.
pub const MAX_IO_MEMORY: u64 = 8 << 20;
/// Longest a shard waits at shutdown for its connections to close cleanly.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// How often a shard checks for the stop request.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How long the shards may take to stop (close their stores) before the process gives up on
/// those still running: a stuck shard must not turn a failed start or a shutdown into a hang.
/// Whatever they had acknowledged is written already; recovery treats the rest as a crash.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// Threads of a shard's blocking pool (fsyncs, renames, unlinks; see `fsutil::off_shard`),
/// unpinned: glommio's default is one, pinned to the shard's own core, so a slow unlink would
/// hold up the checkpoint behind it and compete with the shard for its core.
const BLOCKING_THREADS_PER_SHARD: usize = 2;

#[derive(Debug, Error)]
pub enum ShardError {
    #[error("locked-memory limit is {have} KiB, glommio needs at least {need} KiB: run `ulimit -l {suggest}` (or LimitMEMLOCK={suggest}K in a systemd unit) before starting orbitmq", have = .0 / 1024, need = MIN_MEMLOCK_BYTES / 1024, suggest = 65536)]
    MemLock(u64),
    #[error(transparent)]
    Shape(#[from] shape::ShapeError),
    #[error("shard {shard} could not start: {why} (io_uring needs Linux 5.8+ and must not be disabled by kernel.io_uring_disabled or a seccomp profile)")]
    Start { shard: u32, why: String },
    #[error("shard {shard}: {why}")]
    Store { shard: u32, why: String },
}

/// A soft limit as getrlimit gave it (`u64::MAX` when unlimited or unknown).
fn soft_limit(rc: libc::c_int, r: &libc::rlimit) -> u64 {
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_cur
    }
}

/// The locked-memory limit in bytes (RLIMIT_MEMLOCK, soft).
pub fn memlock_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    soft_limit(rc, &r)
}

/// Raises the soft open-files limit to the hard one (1,024 soft is a common default, far
/// below what a broker with thousands of queues wants) and returns the soft limit then.
pub fn raise_nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write only the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    if rc == 0 && r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = r.rlim_cur,
                to = r.rlim_max,
                "raised the open-files limit"
            );
            r = raised;
        }
    }
    soft_limit(rc, &r)
}

/// File descriptors left for everything but ConsumeQueue files (sockets, segments, the
/// blocking pool's files, the name server's): this many, or a quarter of a lower limit.
const FD_RESERVE: u64 = 1024;
/// Fewest ConsumeQueue files a shard keeps open, however low `ulimit -n` is.
const MIN_OPEN_CQ_FILES_PER_SHARD: usize = 64;
/// Most ConsumeQueue files a shard keeps open, however high `ulimit -n` is.
const MAX_OPEN_CQ_FILES_PER_SHARD: usize = 1 << 16;

/// ConsumeQueue files each shard keeps open between persist rounds: half of what the
/// descriptor limit `nofile` leaves after the reserve, split over the shards. Every queue
/// written in a round is persisted in that round, so when a shard's queues outnumber its open
/// files the least recently written are closed before they are written again: with 8,000
/// queues and 4,096 open files (the bound before) each round opened and closed every file.
pub fn open_cq_files_per_shard(shards: u32, nofile: u64) -> usize {
    let reserve = FD_RESERVE.min(nofile / 4);
    let per_shard = nofile.saturating_sub(reserve) / 2 / u64::from(shards.max(1));
    (per_shard.min(MAX_OPEN_CQ_FILES_PER_SHARD as u64) as usize).max(MIN_OPEN_CQ_FILES_PER_SHARD)
}

/// Registered I/O memory per shard that fits the locked-memory limit.
pub fn io_memory_per_shard(shards: u32) -> Result<usize, ShardError> {
    let limit = memlock_limit();
    if limit < MIN_MEMLOCK_BYTES {
        return Err(ShardError::MemLock(limit));
    }
    let share = limit / (MEMLOCK_SHARE_PER_SHARD * shards as u64);
    Ok(share.min(MAX_IO_MEMORY) as usize)
}

/// Shards when neither flags, broker.conf nor a profile say: one per available core but one,
/// which is left to the kernel (UDP, io_uring workers, softirqs) and to clients on the same
/// host. On this 2-core VM one shard carried 30% more than two with the bench on the box.
pub fn default_shards(available_cores: usize) -> usize {
    available_cores.saturating_sub(1).max(1)
}

/// The online CPUs this process may run on.
pub fn available_cores() -> Vec<usize> {
    // SAFETY: CPU_* macros work on the zeroed set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

/// Parses a core list such as `0,2-3`.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid core list {s:?}: expected numbers and ranges like 0,2-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(format!("invalid core list {s:?}: no cores"));
    }
    Ok(out)
}

/// The network side of a broker's shards.
#[derive(Clone)]
pub struct NetConfig {
    /// Shard k listens on this port + k (port 0: ephemeral ports).
    pub listen: SocketAddr,
    /// The address clients reach the shards at when `listen` is the unspecified address
    /// (`brokerIP1`); it goes into routes, redirects and message ids.
    pub advertise: Option<IpAddr>,
    pub server: quinn::ServerConfig,
    pub topics: Arc<Topics>,
    /// Clients silent this long are dropped from the group lists.
    pub client_expiry: Duration,
    /// Transaction check-back settings.
    pub txn: crate::txn::TxConfig,
    pub broker_name: String,
    pub broker_id: u64,
    pub role: crate::config::BrokerRole,
    pub ha: crate::repl::HaConfig,
    /// How a slave's shards verify their master (TLS), presenting their certificate.
    pub master_tls: Option<quinn::ClientConfig>,
    /// Replication (HA_PULL, HA_OFFSETS) only for peers with a certificate of the cluster CA.
    pub ha_needs_cert: bool,
    /// `enablePropertyFilter`.
    pub property_filter: bool,
}

impl NetConfig {
    pub fn new(listen: SocketAddr, server: quinn::ServerConfig, topics: Arc<Topics>) -> Self {
        NetConfig {
            listen,
            advertise: None,
            server,
            topics,
            client_expiry: clients::DEFAULT_CLIENT_EXPIRY,
            txn: crate::txn::TxConfig::default(),
            broker_name: crate::config::DEFAULT_BROKER_NAME.into(),
            broker_id: crate::nameserver::routes::MASTER_ID,
            role: crate::config::BrokerRole::AsyncMaster,
            ha: crate::repl::HaConfig::default(),
            master_tls: None,
            ha_needs_cert: false,
            property_filter: true,
        }
    }
}

/// The address clients use for an endpoint bound at `bound`.
pub fn advertised(bound: SocketAddr, advertise: Option<IpAddr>) -> SocketAddr {
    match advertise {
        Some(ip) if bound.ip().is_unspecified() => SocketAddr::new(ip, bound.port()),
        _ => bound,
    }
}

/// How to start the shards of one broker.
#[derive(Clone)]
pub struct ShardSetConfig {
    pub data_dir: PathBuf,
    pub shards: u32,
    /// Core of each shard (pinned); empty: not pinned.
    pub cores: Vec<usize>,
    /// Store settings; `dir` is replaced by each shard's directory.
    pub store: StoreConfig,
    /// `None`: storage only (tests and tools).
    pub net: Option<NetConfig>,
    /// Delay levels and timers (the scheduler runs only with networking).
    pub schedule: crate::schedule::ScheduleConfig,
}

/// Running shards; dropping it does not stop them: call [`ShardSet::stop`].
pub struct ShardSet {
    pub shape: Shape,
    /// Set when the shards serve the network.
    pub shared: Option<Arc<BrokerShared>>,
    stop: Arc<AtomicBool>,
    handles: Vec<ExecutorJoinHandle<Result<(), String>>>,
}

pub fn shard_dir(data_dir: &Path, shard: u32) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}

/// Waits for the stop flag, checking it every [`STOP_POLL`].
async fn until_stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(STOP_POLL).await;
    }
}

/// A shard that cannot start: reports why (the start waits for every shard's report), closes
/// its store, and returns the reason.
async fn failed_start(
    k: u32,
    ready: &mpsc::Sender<(u32, Result<Option<SocketAddr>, String>)>,
    store: &Store,
    why: String,
) -> Result<(), String> {
    let _ = ready.send((k, Err(why.clone())));
    let _ = store.close().await;
    Err(why)
}

/// One shard's life: open the store, bind its endpoint, serve until stopped, close.
async fn run_shard(
    k: u32,
    store_cfg: StoreConfig,
    net: Option<(NetConfig, Arc<BrokerShared>)>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<(u32, Result<Option<SocketAddr>, String>)>,
) -> Result<(), String> {
    let store = match Store::open(store_cfg).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send((k, Err(e.to_string())));
            return Err(e.to_string());
        }
    };
    let Some((net, shared)) = net else {
        let _ = ready.send((k, Ok(None)));
        until_stopped(&stop).await;
        return store.close().await.map_err(|e| e.to_string());
    };
    let port = if net.listen.port() == 0 {
        0
    } else {
        net.listen.port() + k as u16
    };
    let addr = SocketAddr::new(net.listen.ip(), port);
    let listening = crate::net::runtime::server_endpoint(addr, net.server.clone())
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
        .and_then(|ep| {
            ep.local_addr()
                .map(|a| (ep, a))
                .map_err(|e| format!("no local address for {addr}: {e}"))
        });
    let (endpoint, bound) = match listening {
        Ok(l) => l,
        Err(why) => return failed_start(k, &ready, &store, why).await,
    };
    // A slave writes nothing of its own: no delayed deliveries, no transaction check-backs;
    // its log is the master's copy.
    let slave = net.role == crate::config::BrokerRole::Slave;
    let scheduler = if slave {
        None
    } else {
        match crate::schedule::service::Scheduler::start(store.clone(), shared.schedule.clone())
            .await
        {
            Ok(s) => Some(s),
            Err(why) => return failed_start(k, &ready, &store, format!("scheduler: {why}")).await,
        }
    };
    let txn = if slave {
        crate::txn::TxState::default()
    } else {
        match txn::rebuild(&store, &shared.txn).await {
            Ok(t) => t,
            Err(e) => {
                if let Some(s) = scheduler {
                    let _ = s.stop().await;
                }
                return failed_start(k, &ready, &store, format!("transactions: {e}")).await;
            }
        }
    };
    let _ = ready.send((k, Ok(Some(bound))));
    let handler = Rc::new(broker::ShardHandler {
        shard: k,
        store: store.clone(),
        txn: RefCell::new(txn),
        check_pushes: Rc::default(),
        replicas: RefCell::default(),
        replica_acked: crate::sync::Event::default(),
        view: RefCell::new(TopicView::new(&shared.topics)),
        peers: RefCell::new(std::collections::HashMap::new()),
        conn_clients: RefCell::new(std::collections::HashMap::new()),
        shared: shared.clone(),
    });
    let conns = Rc::new(Connections::default());
    let background = if slave {
        let copier = crate::repl::slave::Copier {
            shard: k,
            store: store.clone(),
            endpoint: endpoint.clone(),
            tls: net
                .master_tls
                .clone()
                .expect("a slave has its master's TLS settings"),
            shared,
        };
        glommio::spawn_local(copier.run())
    } else {
        glommio::spawn_local(txn::check_loop(handler.clone()))
    };
    let server = glommio::spawn_local(crate::net::server::serve(
        endpoint.clone(),
        handler,
        conns.clone(),
    ));
    until_stopped(&stop).await;
    let mut background = Some(background);
    if slave {
        // Before the endpoint it connects out through closes under it.
        if let Some(b) = background.take() {
            b.cancel().await;
        }
    }
    conns.going_away("broker shutting down").await;
    endpoint.close(orbitmq_proto::codes::quic::SHUTDOWN.into(), b"shutdown");
    // Let the CONNECTION_CLOSE frames go out, within bounds.
    futures_lite::future::or(endpoint.wait_idle(), glommio::timer::sleep(SHUTDOWN_GRACE)).await;
    server.await;
    // Check-backs and the copier end before the store closes (what they write would fail).
    if let Some(b) = background {
        b.cancel().await;
    }
    let progress = match scheduler {
        Some(s) => Some(s.stop().await),
        None => None,
    };
    store.close().await.map_err(|e| e.to_string())?;
    // Closed: every delivery is synced, so the final progress may say so.
    match progress {
        Some(p) => p
            .persist()
            .map_err(|e| format!("persisting scheduler progress: {e}")),
        None => Ok(()),
    }
}

impl ShardSet {
    /// Starts one executor per shard, opens (recovering) each store, binds each shard's
    /// endpoint, and returns once all are serving.
    pub fn start(cfg: ShardSetConfig) -> Result<ShardSet, ShardError> {
        let io_memory = io_memory_per_shard(cfg.shards)?;
        let open_cq_files = open_cq_files_per_shard(cfg.shards, raise_nofile_limit());
        let shape = shape::open_or_create(&cfg.data_dir, cfg.shards)?;
        let shared = cfg.net.as_ref().map(|n| {
            Arc::new(BrokerShared {
                shape,
                data_dir: cfg.data_dir.clone(),
                topics: n.topics.clone(),
                endpoints: OnceLock::new(),
                schedule: cfg.schedule.clone(),
                txn: n.txn,
                broker_name: n.broker_name.clone(),
                broker_id: n.broker_id,
                role: n.role,
                ha: n.ha.clone(),
                ha_needs_cert: n.ha_needs_cert,
                property_filter: n.property_filter,
                master: Mutex::new(None),
                copied_at_ms: std::sync::atomic::AtomicU64::new(0),
                clients: Mutex::new(clients::ClientRegistry::new(n.client_expiry)),
                locks: Mutex::new(locks::LockTable::default()),
            })
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::new();
        for k in 0..cfg.shards {
            let placement = match cfg.cores.get(k as usize % cfg.cores.len().max(1)) {
                Some(c) if !cfg.cores.is_empty() => Placement::Fixed(*c),
                _ => Placement::Unbound,
            };
            let mut store_cfg = cfg.store.clone();
            store_cfg.dir = shard_dir(&cfg.data_dir, k);
            store_cfg.max_open_cq_files = open_cq_files;
            let net = cfg.net.clone().zip(shared.clone());
            let (stop, ready) = (stop.clone(), ready_tx.clone());
            let h = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{k}"))
                .io_memory(io_memory)
                .blocking_thread_pool_placement(PoolPlacement::Unbound(BLOCKING_THREADS_PER_SHARD))
                .spawn(move || run_shard(k, store_cfg, net, stop, ready))
                .map_err(|e| ShardError::Start {
                    shard: k,
                    why: e.to_string(),
                })?;
            handles.push(h);
        }
        drop(ready_tx);
        let mut set = ShardSet {
            shape,
            shared,
            stop,
            handles,
        };
        let mut endpoints = vec![None; cfg.shards as usize];
        for _ in 0..cfg.shards {
            match ready_rx.recv() {
                Ok((k, Ok(addr))) => endpoints[k as usize] = addr,
                Ok((shard, Err(why))) => {
                    // Logged now: stopping the other shards comes first and could take long.
                    error!(shard, error = %why, "a shard failed to start: stopping the others");
                    set.stop_and_join();
                    return Err(ShardError::Store { shard, why });
                }
                Err(_) => {
                    // A shard thread died before reporting: glommio failed to start it.
                    let why = set
                        .stop_and_join()
                        .unwrap_or_else(|| "executor exited".into());
                    return Err(ShardError::Start { shard: 0, why });
                }
            }
        }
        if let Some(shared) = &set.shared {
            let advertise = cfg.net.as_ref().and_then(|n| n.advertise);
            let eps: Vec<SocketAddr> = endpoints
                .into_iter()
                .map(|e| advertised(e.expect("every shard bound"), advertise))
                .collect();
            let _ = shared.endpoints.set(eps);
        }
        info!(shards = cfg.shards, "shards serving");
        Ok(set)
    }

    /// Endpoint of each shard as clients reach it (empty without networking).
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.shared
            .as_ref()
            .and_then(|s| s.endpoints.get().cloned())
            .unwrap_or_default()
    }

    fn stop_and_join(&mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.handles.len();
        let (tx, rx) = mpsc::channel();
        for (k, h) in self.handles.drain(..).enumerate() {
            let tx = tx.clone();
            // Joined on threads of their own, so a stuck one is waited for only until the
            // deadline.
            std::thread::spawn(move || {
                let r = match h.join() {
                    Ok(r) => r,
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send((k, r));
            });
        }
        drop(tx);
        let deadline = std::time::Instant::now() + STOP_DEADLINE;
        let mut first = None;
        for done in 0..n {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok((_, Ok(()))) => {}
                Ok((shard, Err(r))) => {
                    error!(shard, error = %r, "shard stopped with an error");
                    first.get_or_insert(r);
                }
                Err(_) => {
                    let r = format!(
                        "{} of {n} shards did not stop within {STOP_DEADLINE:?}",
                        n - done
                    );
                    error!("{r}");
                    first.get_or_insert(r);
                    break;
                }
            }
        }
        first
    }

    /// Stops every shard after closing its store (everything staged is written and synced).
    pub fn stop(mut self) -> Result<(), String> {
        match self.stop_and_join() {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_consume_queue_files_share_half_the_descriptor_limit() {
        // This VM's 20,000: one shard keeps 9,488 open, enough for 1,000 topics x 8 queues.
        assert_eq!(open_cq_files_per_shard(1, 20_000), 9_488);
        assert_eq!(open_cq_files_per_shard(4, 20_000), 2_372);
        // A low limit still leaves a few; an unlimited one is bounded.
        // 1,024 (a common soft limit): a quarter is reserved, the rest shared.
        assert_eq!(open_cq_files_per_shard(1, 1_024), 384);
        assert_eq!(
            open_cq_files_per_shard(8, 1_024),
            MIN_OPEN_CQ_FILES_PER_SHARD
        );
        assert_eq!(
            open_cq_files_per_shard(1, u64::MAX),
            MAX_OPEN_CQ_FILES_PER_SHARD
        );
        assert_eq!(
            open_cq_files_per_shard(0, 20_000),
            9_488,
            "no shards counts as one"
        );
    }

    #[test]
    fn unspecified_listen_addresses_are_advertised_as_given() {
        let any: SocketAddr = "0.0.0.0:10911".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(advertised(any, Some(ip)), SocketAddr::new(ip, 10911));
        assert_eq!(advertised(lo, Some(ip)), lo);
        assert_eq!(advertised(any, None), any);
    }

    #[test]
    fn core_lists() {
        assert_eq!(parse_cores("0,2-3"), Ok(vec![0, 2, 3]));
        assert_eq!(parse_cores(" 1 "), Ok(vec![1]));
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("x").is_err());
        assert!(parse_cores("").is_err());
    }
}
