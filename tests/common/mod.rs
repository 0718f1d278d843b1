//! What the tests that run `orbitmq standalone` as a child process share: starting a broker
//! on free ports and reading its ready line, stopping it, and the small client helpers.
//!
//! A broker is always killed: [`Broker`]'s `Drop` kills it if the test did not stop it, and
//! every broker is started with `PR_SET_PDEATHSIG` from a thread that lives as long as the
//! test process, so a test binary that is killed (or aborts) takes its brokers with it.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use orbitmq_client::{
    ClientConfig, ConsumeFromWhere, ConsumerOptions, LitePullConsumer, MessageExt, TlsOptions,
};

/// How long a broker may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a broker may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// CommitLog segment size for tests: small files, fast start.
pub const TEST_SEGMENT_SIZE: &str = "67108864";
/// Bound of the consuming loops.
pub const CONSUME_TIMEOUT: Duration = Duration::from_secs(120);

static BROKER_SEQ: AtomicUsize = AtomicUsize::new(0);

/// How to start a broker; [`BrokerSpec::start`] does it.
pub struct BrokerSpec<'a> {
    pub data_dir: &'a Path,
    /// `sync` or `async`.
    pub flush: &'a str,
    /// Shard k listens on this port + k.
    pub listen: String,
    pub namesrv: String,
    /// More arguments (`-c broker.conf`).
    pub extra: Vec<OsString>,
}

impl<'a> BrokerSpec<'a> {
    /// A broker with 2 shards on ephemeral ports.
    pub fn new(data_dir: &'a Path, flush: &'a str) -> BrokerSpec<'a> {
        BrokerSpec {
            data_dir,
            flush,
            listen: "127.0.0.1:0".into(),
            namesrv: "127.0.0.1:0".into(),
            extra: Vec::new(),
        }
    }

    pub fn on(mut self, listen: &str, namesrv: &str) -> Self {
        self.listen = listen.into();
        self.namesrv = namesrv.into();
        self
    }

    /// Reads this RocketMQ-style broker.conf (`-c`).
    pub fn conf(mut self, path: &Path) -> Self {
        self.extra.push("-c".into());
        self.extra.push(path.into());
        self
    }

    /// Starts `orbitmq standalone` and waits for its ready line. Its stderr goes to
    /// `broker-N.log` beside the data directory and is printed if it fails to start.
    pub fn start(self) -> Broker {
        let log = self
            .data_dir
            .parent()
            .expect("data dir has a parent")
            .join(format!(
                "broker-{}.log",
                BROKER_SEQ.fetch_add(1, Ordering::Relaxed)
            ));
        let stderr = std::fs::File::create(&log).expect("broker log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orbitmq"));
        cmd.arg("standalone")
            .arg("--data-dir")
            .arg(self.data_dir)
            .args(["--listen", &self.listen, "--namesrv-listen", &self.namesrv])
            .args([
                "--shards",
                "2",
                "--flush",
                self.flush,
                "--segment-size",
                TEST_SEGMENT_SIZE,
            ])
            .args(&self.extra)
            .stderr(Stdio::from(stderr));
        let (child, line) = spawn_ready(cmd, &log, "orbitmq standalone");
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
                .to_owned()
        };
        Broker {
            namesrv: field("namesrv"),
            shards: field("shards").split(',').map(str::to_owned).collect(),
            ca: PathBuf::from(field("ca")),
            log,
            child,
        }
    }
}

/// A running `orbitmq standalone`.
pub struct Broker {
    child: Child,
    /// `host:port` of the name server.
    pub namesrv: String,
    /// `host:port` of each shard's endpoint, shard 0 first.
    pub shards: Vec<String>,
    pub ca: PathBuf,
    /// Its stderr.
    pub log: PathBuf,
}

impl Broker {
    /// A broker with 2 shards on ephemeral ports.
    pub fn start(data_dir: &Path, flush: &str) -> Broker {
        BrokerSpec::new(data_dir, flush).start()
    }

    /// A broker whose shards listen on `listen` (shard k on its port + k) and whose name
    /// server listens on `namesrv`.
    pub fn start_on(data_dir: &Path, flush: &str, listen: &str, namesrv: &str) -> Broker {
        BrokerSpec::new(data_dir, flush).on(listen, namesrv).start()
    }

    pub fn config(&self) -> ClientConfig {
        ClientConfig::new(&self.namesrv).with_tls(TlsOptions::with_ca(&self.ca))
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Sends a signal to the broker process.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child's pid (not yet waited for: it cannot have
        // been reused).
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// SIGTERM and wait: the broker flushes and exits cleanly.
    pub fn stop(mut self) {
        // A stopped (SIGSTOP) broker cannot handle SIGTERM until it continues.
        self.signal(libc::SIGCONT);
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            match self.child.try_wait().expect("wait") {
                Some(status) => {
                    assert!(
                        status.success(),
                        "broker exited with {status}; its log:\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                    return;
                }
                None if start.elapsed() > STOP_TIMEOUT => {
                    let _ = self.child.kill();
                    panic!("broker did not stop within {STOP_TIMEOUT:?} of SIGTERM");
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// How much of a broker's log a failed test prints (the log goes with the test's tempdir).
pub const LOG_TAIL_BYTES: usize = 64 * 1024;

impl Drop for Broker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A failing test unwinds through here: show what the broker said.
        if std::thread::panicking() {
            let log = std::fs::read(&self.log).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(LOG_TAIL_BYTES)..];
            eprintln!(
                "--- tail of broker log {} ---\n{}--- end of broker log ---",
                self.log.display(),
                String::from_utf8_lossy(tail)
            );
        }
    }
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` so that it is killed when this test process ends, however it ends.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, and the test
/// harness runs each test on a thread of its own; so children are forked by one thread that
/// lives as long as the process.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl: nobody would kill this child.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the test process is gone"));
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                // Never ends: the sender lives in a static.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((cmd, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner replies")
}

/// Where test ports are picked: below the kernel's ephemeral range (32768-60999 by default),
/// so a client socket bound to port 0 (every QUIC client, the brokers' own) cannot take a
/// port between its release here and the broker's bind.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port of [`TEST_PORTS`] picked at random (the clock and a counter), with the `count - 1`
/// after it, all free now.
fn free_run(count: u16) -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    for _ in 0..1000 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            ^ std::process::id().rotate_left(16)
            ^ NEXT
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .wrapping_mul(2_654_435_761);
        let span = u32::from(TEST_PORTS.end - TEST_PORTS.start - count);
        let p = TEST_PORTS.start + (seed.wrapping_mul(2_654_435_761) % span) as u16;
        let held: Vec<_> = (0..count)
            .map_while(|k| std::net::UdpSocket::bind(("127.0.0.1", p + k)).ok())
            .collect();
        if held.len() == count as usize {
            return p;
        }
    }
    panic!("no {count} consecutive free ports in {TEST_PORTS:?}");
}

/// `count` consecutive free UDP ports on 127.0.0.1 (shard k listens on the first + k), and
/// another free port for the name server. The ports are released before the broker binds
/// them; they lie outside the ephemeral range, so only another test's pick could race.
pub fn free_ports(count: u16) -> (u16, u16) {
    let p = free_run(count);
    loop {
        let n = free_run(1);
        if !(p..p + count).contains(&n) {
            return (p, n);
        }
    }
}

pub fn from_first() -> ConsumerOptions {
    ConsumerOptions::default().from_where(ConsumeFromWhere::FirstOffset)
}

pub fn body_of(i: usize) -> String {
    // ~100 bytes, unique, checkable.
    format!("message-{i:06}-{}", "x".repeat(86))
}

/// Polls until `want` messages arrived (or the bound passes); returns them.
pub async fn poll_n(c: &LitePullConsumer, want: usize) -> Vec<MessageExt> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(want);
    while out.len() < want && start.elapsed() < CONSUME_TIMEOUT {
        out.extend(c.poll(Duration::from_secs(1)).await.expect("poll"));
    }
    out
}

/// Waits (bounded by [`CONSUME_TIMEOUT`]) until `cond` holds; panics with `what` if not.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < CONSUME_TIMEOUT,
            "{what}: not within {CONSUME_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A broker (2 shards, async flush) whose topic table holds `topics` (name, queue count),
/// with auto-creation off and `extra_conf` lines added to its broker.conf.
pub fn broker_with_topics(topics: &[(&str, u32)], extra_conf: &str) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let conf: String = topics
        .iter()
        .map(|(t, n)| format!("{t} {n} {n} 6\n"))
        .collect();
    std::fs::write(data.join("topics.conf"), conf).unwrap();
    let bconf = dir.path().join("broker.conf");
    std::fs::write(
        &bconf,
        format!("autoCreateTopicEnable = false\n{extra_conf}"),
    )
    .unwrap();
    let b = BrokerSpec::new(&data, "async").conf(&bconf).start();
    (b, dir)
}

/// Starts `orbitmq args` (killed with this test process) and waits for its `ready` line.
pub fn start_proc(args: &[String], log: &Path) -> (Child, String) {
    let stderr = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orbitmq"));
    cmd.args(args).stderr(Stdio::from(stderr));
    spawn_ready(cmd, log, &format!("orbitmq {args:?}"))
}

/// Spawns `cmd` (tied to this test process, info logs, stdout piped) and waits for its
/// `ready ...` line; kills it and prints its log `log` if none comes in [`READY_TIMEOUT`].
fn spawn_ready(mut cmd: Command, log: &Path, what: &str) -> (Child, String) {
    cmd.env("ORBITMQ_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = spawn_tied(cmd).unwrap_or_else(|e| panic!("start {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.starts_with("ready ") {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) => (child, line),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} printed no ready line in {READY_TIMEOUT:?}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orbitmq"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run orbitmq")
}

pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "orbitmq {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A cluster CA under `root/ca` and a certificate per node name, as `orbitmq cert init|issue`
/// make them; returns the CA's directory (`ca.pem`, `<node>.pem`, `<node>.key`).
pub fn make_certs(root: &Path, nodes: &[&str]) -> PathBuf {
    let dir = root.join("ca");
    let d = dir.display().to_string();
    run_ok(&["cert", "init", "--dir", &d]);
    for n in nodes {
        run_ok(&["cert", "issue", "--ca", &d, "--name", n]);
    }
    dir
}

/// Starts `orbitmq namesrv` as node `name` (its certificate from [`make_certs`]) on a free
/// port with `extra` arguments; returns the child and its address.
pub fn start_namesrv(root: &Path, ca_dir: &Path, name: &str, extra: &[&str]) -> (Child, String) {
    let (_, port) = free_ports(1);
    let addr = format!("127.0.0.1:{port}");
    let pem = |ext: &str| ca_dir.join(format!("{name}.{ext}")).display().to_string();
    let mut args: Vec<String> = vec![
        "namesrv".into(),
        "--listen".into(),
        addr.clone(),
        "--data-dir".into(),
        root.join(name).display().to_string(),
        "--tls-cert".into(),
        pem("pem"),
        "--tls-key".into(),
        pem("key"),
        "--tls-ca".into(),
        ca_dir.join("ca.pem").display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let (child, _) = start_proc(&args, &root.join(format!("{name}.log")));
    (child, addr)
}
