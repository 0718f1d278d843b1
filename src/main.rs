//! The `orbitmq` command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use clap::{Args, Parser, Subcommand};
use orbitmq::cli;
use orbitmq::config::BrokerConfig;
use orbitmq::log::{FlushMode, Store, StoreConfig};
use orbitmq::node;
use orbitmq::proto::record::Message;
use orbitmq::shard;

/// mimalloc instead of glibc's malloc: the broker and the client allocate and free many
/// short-lived buffers per request across threads, where glibc's arenas cost about 15% of the CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Start a name server (stateless; brokers register with it, clients ask it for routes).
    Namesrv(node::NamesrvArgs),
    /// Start a broker from a RocketMQ-style broker.conf, registered with its name servers.
    Broker(node::BrokerArgs),
    /// Administration: topics (create, update, delete, list, route) and clusters.
    #[command(subcommand)]
    Admin(orbitmq::admin::AdminCmd),
    /// TLS for a cluster: make a CA, issue node certificates.
    #[command(subcommand)]
    Cert(orbitmq::admin::CertCmd),
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
    /// Number of shards (`shards`; default: the data directory's, else one per core of
    /// `--cores` or the profile, else one per available core but one, at least 1).
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

/// The effective settings: flags over broker.conf keys over defaults.
fn store_config(a: &StoreArgs, conf: &BrokerConfig) -> (PathBuf, StoreConfig) {
    node::store_config_over(a.data_dir.clone(), a.flush, a.segment_size, conf)
}

/// Turns transparent huge pages off for this process (and its children) before it allocates
/// much. mimalloc asks for huge pages on its arenas, and quinn's receive buffer (64 MiB an
/// endpoint, of which each of its 32 slots uses its first 64 KiB) and other sparse buffers then
/// fault in and zero 2 MiB for every 64 KiB they touch: on this VM that was 14-18% of the
/// broker's `perf` samples in a 1M-message run, and a fault stalls the shard's thread while it
/// zeroes. Measured without it: the same CPU per message and p99 about half (README).
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        // Kernels before 3.15 lack it: the process runs as before, with huge pages.
        eprintln!(
            "orbitmq: could not turn transparent huge pages off: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    // Servers log what they do; client tools stay quiet unless something is wrong.
    let default_level = match cli.cmd {
        Cmd::Standalone(_) | Cmd::Namesrv(_) | Cmd::Broker(_) => "info",
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
        Cmd::Namesrv(a) => node::run_namesrv(a),
        Cmd::Broker(a) => node::run_broker(a),
        Cmd::Admin(c) => orbitmq::admin::admin(c),
        Cmd::Cert(c) => orbitmq::admin::cert(c),
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

fn standalone(a: StandaloneArgs) -> Result<(), String> {
    let args = node::BrokerArgs {
        config: a.config,
        namesrv: None,
        data_dir: a.store.data_dir,
        flush: a.store.flush,
        segment_size: a.store.segment_size,
        shards: a.shards,
        cores: a.cores,
        profile: a.profile,
        listen: a.listen,
        insecure: false,
    };
    node::run_standalone(args, a.namesrv_listen)
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
                            // A key per message, so crash tests can look each up.
                            keys: format!("seq-{seq}"),
                            body: writer_body(queue, seq, a.body_size).into(),
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
