//! The server processes: `orbitmq namesrv`, `orbitmq broker -c broker.conf`, and the wiring
//! `orbitmq standalone` shares with the broker (a broker plus an in-process name server that
//! the broker registers with directly).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use orbitmq_client::TlsOptions;

use crate::config::{BrokerConfig, BrokerRole};
use crate::log::{shape, FlushMode, StoreConfig};
use crate::nameserver::kv::KvConfig;
use crate::nameserver::registrar::{Registrar, RegistrarConfig};
use crate::nameserver::topics::Topics;
use crate::nameserver::{NameServerHandle, NameServerState, NameServerTimings};
use crate::net::tls;
use crate::shard::{self, NetConfig, ShardSet, ShardSetConfig};
use crate::tuning::TuningProfile;

/// Where `orbitmq standalone` and `orbitmq broker` keep their data unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "./orbitmq-data";
/// Where `orbitmq namesrv` keeps its TLS files and KV config unless told otherwise.
pub const DEFAULT_NAMESRV_DIR: &str = "./orbitmq-namesrv";
/// Shortest scan interval and broker expiry a name server accepts (short ones are for tests).
pub const MIN_SCAN_INTERVAL_MS: u64 = 10;
pub const MIN_BROKER_EXPIRY_MS: u64 = 100;

#[derive(Args, Debug, Clone)]
pub struct NamesrvArgs {
    /// Address to listen on (RocketMQ's name server port is 9876).
    #[arg(long, default_value = "127.0.0.1:9876")]
    pub listen: SocketAddr,
    /// TLS files (when no --tls-cert is given) and the KV config.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// This node's certificate chain (PEM), e.g. from `orbitmq cert issue`.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA that clients verify this node with.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// How often silent brokers are looked for, in ms (RocketMQ: 10 s).
    #[arg(long, default_value_t = 10_000)]
    pub scan_interval_ms: u64,
    /// A broker silent this long is dropped from the routes, in ms (RocketMQ: 120 s).
    #[arg(long, default_value_t = 120_000)]
    pub broker_expiry_ms: u64,
}

#[derive(Args, Debug, Clone, Default)]
pub struct BrokerArgs {
    /// A RocketMQ-style broker.conf; flags override its keys.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Name server address(es), `;`-separated (`namesrvAddr`).
    #[arg(long)]
    pub namesrv: Option<String>,
    /// Data directory (`storePathRootDir`; default ./orbitmq-data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// SYNC_FLUSH or ASYNC_FLUSH (`flushDiskType`; also `sync` / `async`; default async).
    #[arg(long)]
    pub flush: Option<FlushMode>,
    /// CommitLog segment size in bytes (`mappedFileSizeCommitLog`; default 1 GiB).
    #[arg(long)]
    pub segment_size: Option<u64>,
    /// Number of shards (`shards`; default: the data directory's, else one per core of
    /// `--cores` or the profile, else one per available core but one, at least 1).
    #[arg(long)]
    pub shards: Option<u32>,
    /// Cores to pin shards to, e.g. `0,2-3` (`cores`; default: the available cores).
    #[arg(long)]
    pub cores: Option<String>,
    /// Tuning profile: a name under tuning/profiles or a path (`tuningProfile`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Broker address: shard k listens on this port + k (port 0: ephemeral ports; default
    /// 0.0.0.0 and `listenPort`, advertised as `brokerIP1`).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Do not verify the name servers' certificates (they are not verified either when no
    /// `tlsCaFile` is set).
    #[arg(long)]
    pub insecure: bool,
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts), to wait for them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a zeroed, initialized set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_stop_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait reads the set and writes the signal number.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn print_ready(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// The address this host uses to reach `target` (no packet is sent).
fn local_ip_towards(target: &str) -> Option<IpAddr> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(target).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

/// The address advertised for shards bound at `listen`: `listen`'s own unless unspecified,
/// then `brokerIP1`, then the address towards the first name server, then loopback.
pub fn advertise_ip(listen: SocketAddr, broker_ip1: Option<IpAddr>, namesrv: &[String]) -> IpAddr {
    if !listen.ip().is_unspecified() {
        return listen.ip();
    }
    broker_ip1
        .or_else(|| namesrv.first().and_then(|n| local_ip_towards(n)))
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn parse_namesrv(s: &str) -> Vec<String> {
    orbitmq_client::config::parse_namesrv(s)
}

fn store_config(a: &BrokerArgs, conf: &BrokerConfig) -> (PathBuf, StoreConfig) {
    store_config_over(a.data_dir.clone(), a.flush, a.segment_size, conf)
}

/// The effective store settings and data directory: these flags over broker.conf's keys over
/// the defaults.
pub fn store_config_over(
    data_dir: Option<PathBuf>,
    flush: Option<FlushMode>,
    segment_size: Option<u64>,
    conf: &BrokerConfig,
) -> (PathBuf, StoreConfig) {
    let dir = data_dir
        .or_else(|| conf.store_path_root_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let mut c = StoreConfig::new(dir.clone(), flush.unwrap_or(conf.flush_disk_type));
    c.segment_size = segment_size.unwrap_or(conf.segment_size);
    c.flush_interval = conf.flush_interval;
    c.retention = conf.retention.clone();
    c.index = conf.index;
    (dir, c)
}

/// `orbitmq namesrv`: serves until SIGINT / SIGTERM.
pub fn run_namesrv(a: NamesrvArgs) -> Result<(), String> {
    if a.scan_interval_ms < MIN_SCAN_INTERVAL_MS || a.broker_expiry_ms < MIN_BROKER_EXPIRY_MS {
        return Err(format!(
            "--scan-interval-ms must be at least {MIN_SCAN_INTERVAL_MS} and --broker-expiry-ms at least {MIN_BROKER_EXPIRY_MS}"
        ));
    }
    let dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_NAMESRV_DIR));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let identity = identity(
        &dir,
        a.tls_cert.as_deref(),
        a.tls_key.as_deref(),
        a.tls_ca.as_deref(),
    )?;
    let server = tls::server_config(&identity).map_err(|e| e.to_string())?;
    let kv = KvConfig::load(&dir).map_err(|e| e.to_string())?;
    let sigs = block_stop_signals();
    let ns = NameServerHandle::start(
        a.listen,
        server,
        NameServerState::new(kv),
        NameServerTimings {
            broker_expiry: Duration::from_millis(a.broker_expiry_ms),
            scan_interval: Duration::from_millis(a.scan_interval_ms),
        },
    )?;
    print_ready(&format!(
        "ready namesrv={} ca={}",
        ns.addr,
        identity.paths.ca.display()
    ));
    let sig = wait_for_stop_signal(&sigs);
    tracing::info!(signal = sig, "name server stopping");
    ns.stop();
    Ok(())
}

/// The TLS identity: given files, or a self-made CA and certificate under `dir`.
fn identity(
    dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
) -> Result<tls::ServerIdentity, String> {
    match (cert, key, ca) {
        (Some(c), Some(k), Some(ca)) => tls::load_identity(c, k, ca).map_err(|e| e.to_string()),
        (Some(_), _, _) => Err("a TLS certificate needs its key and the CA file too".into()),
        _ => tls::load_or_create(dir).map_err(|e| e.to_string()),
    }
}

/// `orbitmq broker`: shards serving and registered with every name server.
pub fn run_broker(a: BrokerArgs) -> Result<(), String> {
    serve_broker(a, None)
}

/// `orbitmq standalone`: a broker and a name server (on `namesrv_listen`) in one process.
pub fn run_standalone(a: BrokerArgs, namesrv_listen: SocketAddr) -> Result<(), String> {
    serve_broker(a, Some(namesrv_listen))
}

fn serve_broker(a: BrokerArgs, standalone: Option<SocketAddr>) -> Result<(), String> {
    let conf = match &a.config {
        Some(p) => BrokerConfig::load(p).map_err(|e| e.to_string())?,
        None => BrokerConfig::default(),
    };
    for w in &conf.warnings {
        tracing::warn!("{w}");
    }
    let namesrv = match &a.namesrv {
        Some(s) => parse_namesrv(s),
        None => conf.namesrv_addr.clone(),
    };
    if standalone.is_none() && namesrv.is_empty() {
        return Err(
            "no name server to register with: set namesrvAddr in broker.conf or pass --namesrv"
                .into(),
        );
    }
    let profile = match a.profile.as_ref().or(conf.tuning_profile.as_ref()) {
        Some(p) => Some(TuningProfile::load(p)?),
        None => None,
    };
    // Flags over broker.conf over the profile over defaults.
    let cores_arg = a.cores.clone().or(conf.cores.clone());
    let listed = match &cores_arg {
        Some(s) => Some(shard::parse_cores(s)?),
        None => profile.as_ref().and_then(|p| p.shard_cores.clone()),
    };
    // Listed cores get a shard each; of the available ones, one is left to the kernel.
    let (cores, default_shards) = match listed {
        Some(c) => {
            let n = c.len();
            (c, n)
        }
        None => {
            let c = shard::available_cores();
            let n = shard::default_shards(c.len());
            (c, n)
        }
    };
    let pin = cores_arg.is_some() || profile.as_ref().is_none_or(|p| p.pin);
    let (data_dir, store) = store_config(&a, &conf);
    let slave = conf.broker_role == BrokerRole::Slave;
    let segment_size = store.segment_size;
    // Name servers and a slave's master are verified with the cluster CA; without one there is
    // nothing to verify them with, so that traffic goes unverified and says so.
    let verify_ca = conf.tls_ca_file.clone();
    let insecure = a.insecure || verify_ca.is_none();
    let slave_sync_cfg = |shards: u32, queue_map: String| crate::repl::sync::SlaveSyncConfig {
        broker_name: conf.broker_name.clone(),
        shards,
        queue_map,
        segment_size,
        master_address: conf.ha.master_address.clone(),
        namesrv: namesrv.clone(),
        tls: TlsOptions {
            ca: verify_ca.clone(),
            insecure,
        },
    };
    // Unless told, a data directory keeps the shard count it was made with; a slave's new
    // one takes its master's.
    let shards = match a.shards.or(conf.shards) {
        Some(n) => n,
        None => match shape::read(&data_dir).map_err(|e| e.to_string())? {
            Some(recorded) => recorded.shards,
            None if slave => {
                match crate::repl::sync::master_shards(&slave_sync_cfg(0, String::new())) {
                    Ok(n) => {
                        tracing::info!(shards = n, "a new slave takes its master's shard count");
                        n
                    }
                    Err(e) => {
                        return Err(format!(
                            "a new slave takes its master's shard count, but the master could not be asked ({e}): start the master first, or set shards"
                        ))
                    }
                }
            }
            None => default_shards.max(1) as u32,
        },
    };
    if shards == 0 {
        return Err("--shards must be at least 1".into());
    }
    store.validate()?;
    // Standalone stays on loopback by default; a cluster broker listens on every interface.
    let default_ip = if standalone.is_some() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let listen = a
        .listen
        .unwrap_or_else(|| SocketAddr::new(default_ip, conf.listen_port));
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let identity = identity(
        &data_dir,
        conf.tls_cert_file.as_deref(),
        conf.tls_key_file.as_deref(),
        conf.tls_ca_file.as_deref(),
    )?;
    // Slaves prove they are the cluster's brokers with a certificate of the cluster CA.
    let client_ca = conf
        .tls_ca_file
        .clone()
        .unwrap_or(identity.paths.ca.clone());
    let server = tls::server_config_for(&identity, &client_ca).map_err(|e| e.to_string())?;
    if slave && standalone.is_some() {
        return Err("standalone runs a master: start a slave with `orbitmq broker -c broker.conf` (brokerRole = SLAVE)".into());
    }
    // A slave's topics are its master's (copied by the slave sync), never made by a send.
    let topics = Arc::new(
        Topics::load(
            &data_dir,
            conf.auto_create_topic && !slave,
            conf.default_topic_queue_nums,
        )
        .map_err(|e| e.to_string())?,
    );
    let mut net = NetConfig::new(listen, server.clone(), topics.clone());
    net.advertise = Some(advertise_ip(listen, conf.broker_ip1, &namesrv));
    net.client_expiry = conf.client_expiry;
    net.txn = conf.txn;
    net.broker_name = conf.broker_name.clone();
    net.broker_id = conf.broker_id;
    net.role = conf.broker_role;
    net.ha = conf.ha.clone();
    // With a cluster CA, replication is served only to peers with its certificate.
    net.ha_needs_cert = conf.tls_ca_file.is_some();
    net.property_filter = conf.property_filter;
    if slave {
        net.master_tls = Some(
            match (&verify_ca, insecure) {
                // Its own certificate of the cluster CA shows the master it is a broker.
                (Some(ca), false) if conf.tls_cert_file.is_some() => {
                    tls::client_config_as(&identity, ca)
                }
                (Some(ca), false) => tls::client_config(ca),
                _ => tls::insecure_client_config(),
            }
            .map_err(|e| e.to_string())?,
        );
    }
    let sigs = block_stop_signals();
    let set = ShardSet::start(ShardSetConfig {
        data_dir: data_dir.clone(),
        shards,
        cores: if pin && shards as usize <= cores.len() {
            cores
        } else {
            Vec::new()
        },
        store,
        net: Some(net),
        schedule: conf.schedule.clone(),
    })
    .map_err(|e| e.to_string())?;
    let eps: Vec<String> = set.endpoints().iter().map(|e| e.to_string()).collect();
    let ns = match standalone {
        Some(addr) => {
            let kv = KvConfig::load(&data_dir).map_err(|e| e.to_string());
            let ns = kv.and_then(|kv| {
                NameServerHandle::start(
                    addr,
                    server,
                    NameServerState::new(kv),
                    NameServerTimings::default(),
                )
            });
            match ns {
                Ok(ns) => Some(ns),
                Err(e) => {
                    let _ = set.stop();
                    return Err(e);
                }
            }
        }
        None => None,
    };
    if insecure && (!namesrv.is_empty() || slave) {
        tracing::warn!(
            "the name servers' (and a slave's master's) certificates are not verified (set tlsCaFile to the cluster CA to verify them)"
        );
    }
    let slave_sync = if slave {
        let shared = set
            .shared
            .clone()
            .expect("a broker's shards serve the network");
        let cfg = slave_sync_cfg(shards, set.shape.map.name().to_owned());
        match crate::repl::sync::SlaveSync::start(cfg, shared, topics.clone()) {
            Ok(s) => Some(s),
            Err(e) => {
                let _ = set.stop();
                return Err(e);
            }
        }
    } else {
        None
    };
    let reg = RegistrarConfig {
        cluster: conf.cluster_name.clone(),
        broker_name: conf.broker_name.clone(),
        broker_id: conf.broker_id,
        shard_endpoints: eps.clone(),
        queue_map: set.shape.map.name().to_owned(),
        auto_create: conf.auto_create_topic && !slave,
        default_queues: conf.default_topic_queue_nums,
        namesrv,
        tls: TlsOptions {
            ca: verify_ca,
            insecure,
        },
        period: conf.register_period,
    };
    let registrar = match Registrar::start(reg, topics, ns.as_ref().map(|n| n.state.clone())) {
        Ok(r) => r,
        Err(e) => {
            if let Some(s) = slave_sync {
                s.stop();
            }
            if let Some(ns) = ns {
                ns.stop();
            }
            let _ = set.stop();
            return Err(e);
        }
    };
    let ca = identity.paths.ca.display();
    match &ns {
        Some(ns) => print_ready(&format!(
            "ready namesrv={} broker={} shards={} ca={ca}",
            ns.addr,
            eps[0],
            eps.join(",")
        )),
        None => print_ready(&format!(
            "ready broker={} shards={} ca={ca}",
            eps[0],
            eps.join(",")
        )),
    }
    let sig = wait_for_stop_signal(&sigs);
    tracing::info!(
        signal = sig,
        "stopping: unregistering, then flushing every shard"
    );
    registrar.stop();
    if let Some(s) = slave_sync {
        s.stop();
    }
    if let Some(ns) = ns {
        ns.stop();
    }
    set.stop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_address() {
        let any: SocketAddr = "0.0.0.0:10911".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let ip1: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(advertise_ip(lo, Some(ip1), &[]), lo.ip());
        assert_eq!(advertise_ip(any, Some(ip1), &[]), ip1);
        assert!(advertise_ip(any, None, &["127.0.0.1:9876".into()]).is_loopback());
        assert!(advertise_ip(any, None, &[]).is_loopback());
    }
}
