//! `orbitmq bench`: produce, consume and end-to-end latency benchmarks over the client
//! crate, against any cluster through its name server, or against an embedded standalone
//! broker started in a temporary directory when no `--namesrv` is given.
//!
//! Every run ends with a report (and with `--json`, one JSON object on the last line of
//! stdout), also when the cluster fails mid-run: requests are bounded by the client's send
//! timeout, a producer stops after [`MAX_CONSECUTIVE_FAILURES`] failures in a row, and the
//! whole run stops at `--deadline`.

mod consume;
mod e2e;
mod embedded;
mod produce;
pub mod report;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use orbitmq_client::{ClientConfig, ClientError, TlsOptions};
use orbitmq_proto::codes::response;
use thiserror::Error;
use tokio::time::Instant;

pub use embedded::EmbeddedBroker;
pub use report::{Report, Stats};

/// `--messages` when not given.
pub const DEFAULT_MESSAGES: u64 = 1_000_000;
/// `--topic` when not given.
pub const DEFAULT_TOPIC: &str = "BenchTopic";
/// `--size` when not given: 1 KiB bodies, as the baseline.
pub const DEFAULT_SIZE: usize = 1024;
/// `--batch` when not given: the baseline's 64 messages per request (1: single sends).
pub const DEFAULT_BATCH: u32 = 64;
/// `--producers` when not given.
pub const DEFAULT_PRODUCERS: u32 = 4;
/// `--inflight` when not given: each producer waits for a request's answer before the next
/// (RocketMQ's synchronous send). More in flight raised msgs/s here by 10-25% and p99 by 5-10x.
pub const DEFAULT_INFLIGHT: u32 = 1;
/// Most threads `--threads` may ask for.
pub const MAX_BENCH_THREADS: usize = 256;
/// `--deadline` when not given, in seconds: the whole run stops then, whatever is left.
pub const DEFAULT_DEADLINE_SECS: u64 = 600;
/// A producer (or consumer) stops after this many failed requests in a row: the cluster
/// is gone, and each failure already waited up to the send timeout.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;
/// Added to the client's send timeout to bound one request from the outside (the client
/// bounds it already; this catches a connect or route lookup that would not).
pub const REQUEST_GRACE: Duration = Duration::from_secs(2);
/// How long a producer's or consumer's shutdown may take (closing connections to a dead
/// broker must not hold the report back).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the live progress line is redrawn.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Producer group of the bench producers.
pub const PRODUCER_GROUP: &str = "bench-producer";
/// Messages per request and producers of the prefill a consume bench does on an embedded
/// broker (which starts empty).
const PREFILL_BATCH: u32 = 64;
const PREFILL_PRODUCERS: u32 = 4;

/// Benchmarks: produce, consume, end-to-end latency.
#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Send messages as fast as possible (or at --rate): msgs/s, MB/s, latency per request.
    Produce(ProduceArgs),
    /// Read messages of a topic from its first offset with lite pull consumers.
    Consume(ConsumeArgs),
    /// Produce and consume together: latency from the born timestamp to receipt.
    E2e(E2eArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FlushArg {
    Sync,
    Async,
}

impl FlushArg {
    fn as_arg(self) -> &'static str {
        match self {
            FlushArg::Sync => "sync",
            FlushArg::Async => "async",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FromWhere {
    /// The queue's min offset: everything still stored.
    First,
    /// The queue's max offset: only messages sent from now on.
    Last,
}

/// What every bench takes.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Name server address(es) `host:port[;host:port]`. None: start an embedded standalone
    /// broker in a temporary directory and bench that.
    #[arg(long)]
    pub namesrv: Option<String>,
    /// Topic (auto-created by the broker when it allows it).
    #[arg(long, default_value = DEFAULT_TOPIC)]
    pub topic: String,
    /// CA certificate (PEM) to verify the broker with (default: ORBITMQ_TLS_CA, else
    /// ./orbitmq-data/tls/ca.pem if it exists).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Do not verify the broker's certificate (the connection is still encrypted).
    #[arg(long)]
    pub insecure: bool,
    /// Also print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Embedded broker only: flush mode.
    #[arg(long, value_enum)]
    pub flush: Option<FlushArg>,
    /// Embedded broker only: number of shards (default: one per core but one, at least 1).
    #[arg(long)]
    pub shards: Option<u32>,
    /// Stop the whole run after this many seconds, whatever is left.
    #[arg(long, default_value_t = DEFAULT_DEADLINE_SECS)]
    pub deadline: u64,
    /// Threads the bench's clients run on (default: one per core). Beside a broker on a small
    /// host, fewer leave it more CPU.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl CommonArgs {
    /// `--threads`, or its default for this host.
    pub fn threads(&self) -> Result<usize, BenchError> {
        match self.threads {
            Some(n) if n == 0 || n > MAX_BENCH_THREADS => Err(BenchError::Invalid(format!(
                "--threads must be 1..={MAX_BENCH_THREADS}"
            ))),
            Some(n) => Ok(n),
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct ProduceArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Body size in bytes.
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    pub size: usize,
    /// Messages to send in all.
    #[arg(long, default_value_t = DEFAULT_MESSAGES)]
    pub messages: u64,
    /// Producers, each a Producer with its own client and connections, on its own task.
    #[arg(long, default_value_t = DEFAULT_PRODUCERS)]
    pub producers: u32,
    /// Requests each producer keeps in flight (its async sends; 1: one send at a time).
    #[arg(long, default_value_t = DEFAULT_INFLIGHT)]
    pub inflight: u32,
    /// Messages per request, all to one queue (1: single sends).
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: u32,
    /// Use only the first Q writable queues of the topic (default: all).
    #[arg(long)]
    pub queues: Option<u32>,
    /// Spread the sends over N topics named `<topic>-<i>` (i < N), created before the clock
    /// starts with the brokers' default queues (1: `--topic` alone).
    #[arg(long, default_value_t = 1)]
    pub topics: u32,
    /// Tag of every message.
    #[arg(long)]
    pub tag: Option<String>,
    /// Total send rate in msgs/s (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
}

#[derive(Args, Clone, Debug)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Consumer group (lite pull consumers commit nothing, so runs repeat; push consumers
    /// commit, so with this default each `--push` run takes a group of its own).
    #[arg(long, default_value = consume::DEFAULT_GROUP)]
    pub group: String,
    /// Messages to receive in all.
    #[arg(long, default_value_t = DEFAULT_MESSAGES)]
    pub messages: u64,
    /// Consumers, each with its own client; the queues are split among them.
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// Push consumers (a concurrent listener that counts what it gets, one message a call as
    /// RocketMQ's default) instead of lite pull consumers.
    #[arg(long)]
    pub push: bool,
    /// Where a queue starts when the group has no committed offset.
    #[arg(long, value_enum, default_value_t = FromWhere::First)]
    pub from: FromWhere,
    /// Messages one pull asks for per queue.
    #[arg(long, default_value_t = consume::DEFAULT_BENCH_PULL_BATCH)]
    pub pull_batch: u32,
    /// Embedded broker only: body size of the messages sent first to have something to read.
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    pub size: usize,
}

#[derive(Args, Clone, Debug)]
pub struct E2eArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Consumer group (starts at the queues' max offsets; nothing is committed).
    #[arg(long, default_value = "bench-e2e")]
    pub group: String,
    /// Body size in bytes.
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    pub size: usize,
    /// Messages to send and receive.
    #[arg(long, default_value_t = DEFAULT_MESSAGES)]
    pub messages: u64,
    /// Total send rate in msgs/s, e.g. half the peak produce rate (default: as fast as
    /// possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Producers, each with its own client, sharing the rate.
    #[arg(long, default_value_t = DEFAULT_PRODUCERS)]
    pub producers: u32,
    /// Lite pull consumers; the queues are split among them.
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// Messages per request (1: single sends).
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    pub batch: u32,
    /// Use only the first Q writable queues of the topic (default: all).
    #[arg(long)]
    pub queues: Option<u32>,
    /// Messages one pull asks for per queue.
    #[arg(long, default_value_t = consume::DEFAULT_BENCH_PULL_BATCH)]
    pub pull_batch: u32,
}

impl BenchCmd {
    fn common(&self) -> &CommonArgs {
        match self {
            BenchCmd::Produce(a) => &a.common,
            BenchCmd::Consume(a) => &a.common,
            BenchCmd::E2e(a) => &a.common,
        }
    }
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("embedded broker: {0}")]
    Embedded(String),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(std::io::Error),
}

/// The entry point of `orbitmq bench`: runs one bench on its own tokio runtime and prints
/// its report. Exit status 0 only if every requested message went through without error.
pub fn run(cmd: BenchCmd) -> ExitCode {
    let json = cmd.common().json;
    match run_cmd(cmd) {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(report.to_text().as_bytes());
            if json {
                let _ = writeln!(out, "{}", report.to_json());
            }
            let _ = out.flush();
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("orbitmq bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_cmd(cmd: BenchCmd) -> Result<Report, BenchError> {
    let common = cmd.common().clone();
    let threads = common.threads()?;
    // Started before the runtime and dropped after it: killed and removed in every case.
    let embedded = match &common.namesrv {
        Some(_) => {
            if common.flush.is_some() || common.shards.is_some() {
                tracing::warn!("--flush and --shards apply to the embedded broker only; ignored");
            }
            None
        }
        None => {
            let b = EmbeddedBroker::start(common.flush.map(FlushArg::as_arg), common.shards)?;
            eprintln!(
                "orbitmq bench: started an embedded broker (namesrv {}); pass --namesrv to bench a cluster",
                b.namesrv
            );
            Some(b)
        }
    };
    let config = client_config(&common, embedded.as_ref());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    let deadline = Instant::now() + Duration::from_secs(common.deadline);
    let prefill = embedded.is_some();
    let res = rt.block_on(async move {
        match cmd {
            BenchCmd::Produce(a) => produce::run(a, config, deadline).await,
            BenchCmd::Consume(a) => consume::run(a, config, deadline, prefill).await,
            BenchCmd::E2e(a) => e2e::run(a, config, deadline).await,
        }
    });
    let res = res.map(|mut r| {
        r.settings.push(("threads", threads.to_string()));
        r
    });
    // Tasks stuck on a dead broker must not hold the exit back.
    rt.shutdown_timeout(SHUTDOWN_TIMEOUT);
    drop(embedded);
    res
}

fn client_config(common: &CommonArgs, embedded: Option<&EmbeddedBroker>) -> ClientConfig {
    match embedded {
        Some(b) => ClientConfig::new(&b.namesrv).with_tls(TlsOptions::with_ca(&b.ca)),
        None => {
            ClientConfig::new(common.namesrv.as_deref().unwrap_or_default()).with_tls(TlsOptions {
                ca: common.tls_ca.clone(),
                insecure: common.insecure,
            })
        }
    }
}

/// The name an error is counted under: the broker's response code name where the error
/// comes from a response code, else the client error's variant name.
pub fn error_code(e: &ClientError) -> &'static str {
    match e {
        ClientError::TopicNotExist(_) => response::name(response::TOPIC_NOT_EXIST),
        ClientError::MessageIllegal(_) => response::name(response::MESSAGE_ILLEGAL),
        ClientError::ServiceUnavailable(_) => response::name(response::SERVICE_NOT_AVAILABLE),
        ClientError::SystemBusy(_) => response::name(response::SYSTEM_BUSY),
        ClientError::FlushDiskTimeout(_) => response::name(response::FLUSH_DISK_TIMEOUT),
        ClientError::SlaveNotAvailable(_) => response::name(response::SLAVE_NOT_AVAILABLE),
        ClientError::FlushSlaveTimeout(_) => response::name(response::FLUSH_SLAVE_TIMEOUT),
        ClientError::WrongShard { .. } => response::name(response::WRONG_SHARD),
        ClientError::Broker { name, .. } => name,
        ClientError::InvalidArgument(_) => "InvalidArgument",
        ClientError::Timeout { .. } => "Timeout",
        ClientError::Connect { .. } => "Connect",
        ClientError::ConnectionLost { .. } => "ConnectionLost",
        ClientError::Tls(_) => "Tls",
        ClientError::Protocol { .. } => "Protocol",
        ClientError::NoQueue { .. } => "NoQueue",
        ClientError::NameServerUnavailable { .. } => "NameServerUnavailable",
        ClientError::ShutDown => "ShutDown",
    }
}

/// Wall-clock microseconds since the epoch (the clock of born timestamps).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The statistics of a run as it goes, shared by its tasks, and why it stopped early.
pub struct Live {
    pub stats: Mutex<Stats>,
    stopped: Mutex<Option<String>>,
    /// Set when the run should end (target reached, deadline, a fatal error).
    pub done: AtomicBool,
}

impl Live {
    pub fn new() -> Arc<Live> {
        Arc::new(Live {
            stats: Mutex::new(Stats::new()),
            stopped: Mutex::new(None),
            done: AtomicBool::new(false),
        })
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().expect("bench stats lock")
    }

    /// Records why the run stopped early (the first reason wins).
    pub fn stop(&self, reason: String) {
        let mut s = self.stopped.lock().expect("bench stop lock");
        if s.is_none() {
            tracing::warn!("{reason}");
            *s = Some(reason);
        }
    }

    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().expect("bench stop lock").clone()
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// Redraws the progress line on stderr while the run goes, if stderr is a terminal.
/// Dropping the guard stops it and clears the line.
pub struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(kind: &'static str, live: Arc<Live>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { task: None };
        }
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
            tick.tick().await;
            let (mut msgs, mut bytes, mut at) = (0u64, 0u64, Instant::now());
            loop {
                tick.tick().await;
                let (m, b, p99) = {
                    let s = live.stats();
                    (s.messages, s.bytes, s.percentile_us(99.0))
                };
                let now = Instant::now();
                let line = report::progress_line(
                    kind,
                    m,
                    m.saturating_sub(msgs),
                    b.saturating_sub(bytes),
                    now - at,
                    p99,
                );
                (msgs, bytes, at) = (m, b, now);
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{line}");
                let _ = err.flush();
            }
        });
        Progress { task: Some(task) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// Splits `messages` into claims of at most `batch`: each producer takes its next request's
/// share until none is left, so exactly `messages` are sent whatever the producers' speeds.
pub struct Claims {
    left: std::sync::atomic::AtomicU64,
}

impl Claims {
    pub fn new(messages: u64) -> Claims {
        Claims {
            left: std::sync::atomic::AtomicU64::new(messages),
        }
    }

    /// Up to `batch` messages, 0 when none are left.
    pub fn take(&self, batch: u64) -> u64 {
        match self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                (l > 0).then(|| l - l.min(batch))
            }) {
            Ok(l) => l.min(batch),
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_thread_counts_are_refused() {
        let args = |threads| CommonArgs {
            namesrv: None,
            topic: DEFAULT_TOPIC.into(),
            tls_ca: None,
            insecure: false,
            json: false,
            flush: None,
            shards: None,
            deadline: DEFAULT_DEADLINE_SECS,
            threads,
        };
        assert_eq!(args(Some(3)).threads().unwrap(), 3);
        assert!(args(None).threads().unwrap() >= 1, "one per core");
        for bad in [0, MAX_BENCH_THREADS + 1] {
            let e = args(Some(bad)).threads().unwrap_err().to_string();
            assert_eq!(e, format!("--threads must be 1..={MAX_BENCH_THREADS}"));
        }
    }

    #[test]
    fn claims_hand_out_exactly_the_messages() {
        let c = Claims::new(100);
        let mut got = Vec::new();
        loop {
            let n = c.take(32);
            if n == 0 {
                break;
            }
            got.push(n);
        }
        assert_eq!(got, vec![32, 32, 32, 4]);
        assert_eq!(c.take(32), 0);
    }

    #[test]
    fn errors_are_named_by_response_code_or_variant() {
        assert_eq!(
            error_code(&ClientError::SystemBusy(String::new())),
            "SYSTEM_BUSY"
        );
        assert_eq!(
            error_code(&ClientError::Broker {
                code: 1,
                name: "SYSTEM_ERROR",
                message: String::new()
            }),
            "SYSTEM_ERROR"
        );
        assert_eq!(
            error_code(&ClientError::Timeout {
                what: "send".into(),
                after: Duration::from_secs(3)
            }),
            "Timeout"
        );
        assert_eq!(
            error_code(&ClientError::ConnectionLost {
                endpoint: "a".into(),
                reason: "b".into()
            }),
            "ConnectionLost"
        );
    }

    #[test]
    fn arguments_parse_with_their_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: BenchCmd,
        }
        let c = Cli::parse_from(["b", "produce", "--size", "128", "--batch", "16", "--json"]);
        let BenchCmd::Produce(a) = c.cmd else {
            panic!("produce")
        };
        assert_eq!((a.size, a.batch, a.messages), (128, 16, DEFAULT_MESSAGES));
        assert_eq!(a.producers, DEFAULT_PRODUCERS);
        assert!(a.common.json && a.common.namesrv.is_none());
        assert_eq!(a.common.topic, DEFAULT_TOPIC);
        let c = Cli::parse_from([
            "b",
            "consume",
            "--namesrv",
            "127.0.0.1:9876",
            "--group",
            "g",
            "--flush",
            "sync",
        ]);
        let BenchCmd::Consume(a) = c.cmd else {
            panic!("consume")
        };
        assert_eq!(a.common.flush, Some(FlushArg::Sync));
        assert_eq!(a.from, FromWhere::First);
        let c = Cli::parse_from(["b", "e2e", "--rate", "1000"]);
        let BenchCmd::E2e(a) = c.cmd else {
            panic!("e2e")
        };
        assert_eq!(a.rate, Some(1000));
        assert_eq!((a.batch, a.size), (DEFAULT_BATCH, DEFAULT_SIZE));
    }
}
