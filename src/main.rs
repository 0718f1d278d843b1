//! The `orbitmq` command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use orbitmq::cli;
use orbitmq::config::BrokerConfig;
use orbitmq::log::{FlushMode, Store, StoreConfig};
use orbitmq::nameserver::topics::Topics;
use orbitmq::nameserver::{NameServer, NameServerHandle};
use orbitmq::net::tls;
use orbitmq::proto::record::Message;
use orbitmq::shard::{self, NetConfig, ShardSet, ShardSetConfig};
use orbitmq::tuning::TuningProfile;

#[derive(Parser)]
#[command(
    name = "orbitmq",
    version,
    about = "A RocketMQ-style message broker, thread-per-core on io_uring"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a name server and a broker in one process: the embedded default.
    Standalone(StandaloneArgs),
    /// Send one message and print its id, queue and offset.
    Send(cli::SendArgs),
    /// Consume a topic as a group from its committed offset and print each message.
    Consume(cli::ConsumeArgs),
    /// Benchmarks: produce, consume, end-to-end latency
    #[command(subcommand)]
    Bench(orbitmq::bench::BenchCmd),
    /// Append numbered messages to one store and print each acknowledgement (crash tests).
    #[command(hide = true)]
    DebugWriter(WriterArgs),
}

#[derive(Args)]
struct StoreArgs {
    /// Data directory (`storePathRootDir`; default ./orbitmq-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// SYNC_FLUSH or ASYNC_FLUSH (`flushDiskType`; also `sync` / `async`; default async).
    #[arg(long)]
    flush: Option<FlushMode>,
    /// CommitLog segment size in bytes (`mappedFileSizeCommitLog`; default 1 GiB).
    #[arg(long)]
    segment_size: Option<u64>,
}

#[derive(Args)]
struct StandaloneArgs {
    /// A RocketMQ-style broker.conf; flags override its keys.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Number of shards (`shards`; default: one per available core).
    #[arg(long)]
    shards: Option<u32>,
    /// Cores to pin shards to, e.g. `0,2-3` (`cores`; default: the available cores).
    #[arg(long)]
    cores: Option<String>,
    /// Tuning profile: a name under tuning/profiles (dev, nvme-dedicated) or a path
    /// (`tuningProfile`).
    #[arg(long)]
    profile: Option<String>,
    /// Name server address.
    #[arg(long, default_value = "127.0.0.1:9876")]
    namesrv_listen: SocketAddr,
    /// Broker address: shard k listens on this port + k (port 0: ephemeral ports;
    /// default 127.0.0.1 and `listenPort`, 10911).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(Args)]
struct WriterArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Messages to append (0: until killed).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Concurrent appenders.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Queues of the topic `crash` the appenders spread over.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Body size in bytes.
    #[arg(long, default_value_t = 100)]
    body_size: usize,
}

/// Where `orbitmq standalone` keeps its data unless told otherwise.
const DEFAULT_DATA_DIR: &str = "./orbitmq-data";

/// The effective settings: flags over broker.conf keys over defaults.
fn store_config(a: &StoreArgs, conf: &BrokerConfig) -> (PathBuf, StoreConfig) {
    let dir = a
        .data_dir
        .clone()
        .or_else(|| conf.store_path_root_dir.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let mut c = StoreConfig::new(dir.clone(), a.flush.unwrap_or(conf.flush_disk_type));
    c.segment_size = a.segment_size.unwrap_or(conf.segment_size);
    c.flush_interval = conf.flush_interval;
    c.retention = conf.retention.clone();
    (dir, c)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Servers log what they do; client tools stay quiet unless something is wrong.
    let default_level = match cli.cmd {
        Cmd::Standalone(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ORBITMQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = match cli.cmd {
        Cmd::Bench(c) => return orbitmq::bench::run(c),
        Cmd::Standalone(a) => standalone(a),
        Cmd::DebugWriter(a) => debug_writer(a),
        Cmd::Send(a) => cli::send(a),
        Cmd::Consume(a) => cli::consume(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orbitmq: {e}");
            ExitCode::FAILURE
        }
    }
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

fn standalone(a: StandaloneArgs) -> Result<(), String> {
    let conf = match &a.config {
        Some(p) => BrokerConfig::load(p).map_err(|e| e.to_string())?,
        None => BrokerConfig::default(),
    };
    for w in &conf.warnings {
        tracing::warn!("{w}");
    }
    let profile = match a.profile.as_ref().or(conf.tuning_profile.as_ref()) {
        Some(p) => Some(TuningProfile::load(p)?),
        None => None,
    };
    // Flags over broker.conf over the profile over defaults.
    let cores_arg = a.cores.clone().or(conf.cores.clone());
    let cores = match (
        &cores_arg,
        profile.as_ref().and_then(|p| p.shard_cores.clone()),
    ) {
        (Some(s), _) => shard::parse_cores(s)?,
        (None, Some(c)) => c,
        (None, None) => shard::available_cores(),
    };
    let pin = cores_arg.is_some() || profile.as_ref().is_none_or(|p| p.pin);
    if let Some(p) = &profile {
        orbitmq::net::runtime::set_socket_buffers(
            p.udp_recv_buffer
                .unwrap_or(orbitmq::net::runtime::SOCKET_BUFFER_BYTES),
            p.udp_send_buffer
                .unwrap_or(orbitmq::net::runtime::SOCKET_BUFFER_BYTES),
        );
    }
    let shards = a
        .shards
        .or(conf.shards)
        .unwrap_or(cores.len().max(1) as u32);
    if shards == 0 {
        return Err("--shards must be at least 1".into());
    }
    let (data_dir, store) = store_config(&a.store, &conf);
    store.validate()?;
    let listen = a
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], conf.listen_port)));
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let identity = tls::load_or_create(&data_dir).map_err(|e| e.to_string())?;
    let server = tls::server_config(&identity).map_err(|e| e.to_string())?;
    let topics = Arc::new(
        Topics::load(
            &data_dir,
            conf.auto_create_topic,
            conf.default_topic_queue_nums,
        )
        .map_err(|e| e.to_string())?,
    );
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
        net: Some(NetConfig {
            listen,
            server: server.clone(),
            topics,
        }),
    })
    .map_err(|e| e.to_string())?;
    let shared = set.shared.clone().expect("networked shards");
    let ns = NameServerHandle::start(
        a.namesrv_listen,
        server,
        NameServer {
            broker_name: conf.broker_name.clone(),
            broker: shared,
        },
    );
    let ns = match ns {
        Ok(ns) => ns,
        Err(e) => {
            let _ = set.stop();
            return Err(e);
        }
    };
    let eps: Vec<String> = set.endpoints().iter().map(|e| e.to_string()).collect();
    println!(
        "ready namesrv={} broker={} shards={} ca={}",
        ns.addr,
        eps[0],
        eps.join(","),
        identity.paths.ca.display()
    );
    let _ = std::io::stdout().flush();
    let sig = wait_for_stop_signal(&sigs);
    tracing::info!(signal = sig, "stopping: flushing every shard");
    ns.stop();
    set.stop()
}

/// Appends `crash` topic messages with bodies `q<queue>-n<seq>-` padded to `body_size`,
/// printing `ack <queue> <queue offset> <seq>` once each is acknowledged.
fn debug_writer(a: WriterArgs) -> Result<(), String> {
    let (_, cfg) = store_config(&a.store, &BrokerConfig::default());
    let io_memory = shard::io_memory_per_shard(1).map_err(|e| e.to_string())?;
    let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(io_memory)
        .spawn(move || async move {
            let store = Store::open(cfg).await.map_err(|e| e.to_string())?;
            let next = Rc::new(std::cell::Cell::new(0u64));
            let mut tasks = Vec::new();
            for _ in 0..a.concurrency {
                let (store, next) = (store.clone(), next.clone());
                tasks.push(glommio::spawn_local(async move {
                    loop {
                        let seq = next.get();
                        if a.count > 0 && seq >= a.count {
                            return Ok::<(), String>(());
                        }
                        next.set(seq + 1);
                        let queue = (seq % a.queues as u64) as u32;
                        let m = Message {
                            topic: "crash".into(),
                            queue_id: queue,
                            body: writer_body(queue, seq, a.body_size),
                            ..Default::default()
                        };
                        let r = store.append(&m).await.map_err(|e| e.to_string())?;
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ack {queue} {} {seq}", r.queue_offset)
                            .map_err(|e| e.to_string())?;
                        out.flush().map_err(|e| e.to_string())?;
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
            store.close().await.map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())?;
    h.join().map_err(|e| e.to_string())?
}

/// The body the debug writer stores for a sequence number; crash tests rebuild it to compare.
pub fn writer_body(queue: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut b = format!("q{queue}-n{seq}-").into_bytes();
    b.resize(size.max(b.len()), b'.');
    b
}
