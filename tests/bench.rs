//! `orbitmq bench` as a user runs it: against its embedded broker, and against a standalone
//! broker killed with SIGKILL mid-run (the bench must still report and exit non-zero).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use orbitmq_client::{Client, ClientConfig, MessageQueue, TlsOptions};

const BIN: &str = env!("CARGO_BIN_EXE_orbitmq");
/// How long a broker may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of a bench run in these tests (a hang fails instead of blocking CI).
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages the broker must have stored before it is killed.
const STORED_BEFORE_KILL: u64 = 2000;
/// CommitLog segment size for tests: small files, fast start.
const TEST_SEGMENT_SIZE: &str = "67108864";
const TOPIC: &str = "BenchCrash";

/// Kills the child if a test fails before it is done with it.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Broker {
    child: Reap,
    namesrv: String,
    ca: PathBuf,
}

fn start_broker(data_dir: &Path) -> Broker {
    let log = data_dir.with_extension("log");
    let stderr = std::fs::File::create(&log).expect("broker log");
    let mut child = Command::new(BIN)
        .arg("standalone")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--namesrv-listen", "127.0.0.1:0"])
        .args(["--shards", "2", "--flush", "async"])
        .args(["--segment-size", TEST_SEGMENT_SIZE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("start orbitmq standalone");
    let stdout = child.stdout.take().expect("stdout");
    let child = Reap(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.starts_with("ready ") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_else(|_| {
        panic!(
            "no ready line in {READY_TIMEOUT:?}; broker log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let field = |name: &str| -> String {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
            .to_owned()
    };
    Broker {
        namesrv: field("namesrv"),
        ca: PathBuf::from(field("ca")),
        child,
    }
}

/// Waits for a child up to `timeout`; kills it and fails the test if it does not exit.
fn wait_bounded(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("orbitmq bench did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `bench` with stdout captured; returns its status, stdout and stderr.
fn spawn_bench(args: &[&str]) -> Child {
    Command::new(BIN)
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start orbitmq bench")
}

/// Reads a child's pipes on threads (so neither fills up), returning them once it exited.
fn collect(mut child: Child, timeout: Duration) -> (ExitStatus, String, String) {
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_bounded(&mut child, timeout);
    (status, o.join().unwrap(), e.join().unwrap())
}

fn last_json(stdout: &str, stderr: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!("bench printed nothing on stdout; stderr:\n{stderr}");
    });
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last:?}\nstderr:\n{stderr}"))
}

#[test]
fn bench_produce_against_the_embedded_broker() {
    let child = spawn_bench(&[
        "produce",
        "--messages",
        "2000",
        "--size",
        "128",
        "--batch",
        "16",
        "--json",
    ]);
    let (status, stdout, stderr) = collect(child, BENCH_TIMEOUT);
    let v = last_json(&stdout, &stderr);
    assert!(
        status.success(),
        "exit {status}; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(v["messages"], 2000, "{v}");
    assert_eq!(v["bytes"], 2000 * 128, "{v}");
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    assert!(v["msgs_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    for k in [
        "seconds",
        "mb_per_sec",
        "p50_us",
        "p99_us",
        "p999_us",
        "max_us",
    ] {
        assert!(v[k].is_number(), "{k} in {v}");
    }
    assert!(
        stdout.contains("latency     per request (batch of 16)"),
        "{stdout}"
    );
}

#[test]
fn bench_producers_with_requests_in_flight_send_exactly_the_requested_messages() {
    // 2,003 is no multiple of the batch: the last request of some lane is short.
    let child = spawn_bench(&[
        "produce",
        "--messages",
        "2003",
        "--size",
        "100",
        "--batch",
        "16",
        "--producers",
        "2",
        "--inflight",
        "3",
        "--json",
    ]);
    let (status, stdout, stderr) = collect(child, BENCH_TIMEOUT);
    let v = last_json(&stdout, &stderr);
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    assert_eq!(v["messages"], 2003, "{v}");
    assert_eq!(v["bytes"], 2003 * 100, "{v}");
    assert_eq!(v["samples"], 2003_u64.div_ceil(16), "{v}");
    assert_eq!(v["settings"]["inflight"], "3", "{v}");
    assert_eq!(v["errors"], serde_json::json!({}), "{v}");

    let (status, _, stderr) = collect(
        spawn_bench(&["produce", "--inflight", "0", "--messages", "10"]),
        BENCH_TIMEOUT,
    );
    assert!(!status.success());
    assert!(stderr.contains("--inflight must be 1..=1024"), "{stderr}");
}

/// `bench consume` reads back exactly what it sent first, with lite pull consumers and with
/// push consumers.
#[test]
fn bench_consume_reads_back_every_message_with_either_consumer() {
    for (push, kind) in [(false, "lite pull"), (true, "push")] {
        let mut args = vec!["consume", "--messages", "3000", "--size", "100", "--json"];
        if push {
            args.push("--push");
        }
        let (status, stdout, stderr) = collect(spawn_bench(&args), BENCH_TIMEOUT);
        let v = last_json(&stdout, &stderr);
        assert!(status.success(), "exit {status}; stderr:\n{stderr}");
        assert_eq!(v["kind"], "consume", "{v}");
        assert_eq!(v["messages"], 3000, "{v}");
        assert_eq!(v["bytes"], 3000 * 100, "{v}");
        assert_eq!(v["errors"], serde_json::json!({}), "{v}");
        assert_eq!(v["stopped"], serde_json::Value::Null, "{v}");
        assert_eq!(v["settings"]["consumer"], kind, "{v}");
    }
}

/// Sum of the max offsets of the topic's queues: messages the broker stored.
fn stored(rt: &tokio::runtime::Runtime, config: ClientConfig) -> u64 {
    rt.block_on(async move {
        let client = Client::new(config).await.expect("client");
        let route = client.topic_route(TOPIC).await.expect("route");
        let mut n = 0;
        for q in &route.queues {
            let mq = MessageQueue::new(TOPIC, &q.mq.broker_name, q.mq.queue_id);
            n += client.max_offset(&mq).await.expect("max offset");
        }
        client.shutdown().await;
        n
    })
}

#[test]
fn bench_reports_and_fails_when_the_broker_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut broker = start_broker(&data);
    let config = ClientConfig::new(&broker.namesrv).with_tls(TlsOptions::with_ca(&broker.ca));
    let requested: u64 = 100_000_000;
    let ca = broker.ca.to_str().unwrap().to_owned();
    let child = spawn_bench(&[
        "produce",
        "--namesrv",
        &broker.namesrv,
        "--tls-ca",
        &ca,
        "--topic",
        TOPIC,
        "--messages",
        &requested.to_string(),
        "--size",
        "128",
        "--batch",
        "16",
        "--producers",
        "2",
        "--json",
    ]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Kill only once the run is well under way.
    let start = Instant::now();
    loop {
        let n = stored(&rt, config.clone());
        if n >= STORED_BEFORE_KILL {
            break;
        }
        assert!(
            start.elapsed() < BENCH_TIMEOUT,
            "only {n} messages stored in {BENCH_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    broker.child.0.kill().expect("SIGKILL the broker");
    broker.child.0.wait().unwrap();
    let (status, stdout, stderr) = collect(child, BENCH_TIMEOUT);
    assert!(!status.success(), "bench must fail; stdout:\n{stdout}");
    let v = last_json(&stdout, &stderr);
    eprintln!("bench report after the kill: {v}");
    let acked = v["messages"].as_u64().unwrap();
    assert!(acked < requested, "{v}");
    let errors = v["errors"].as_object().expect("errors object");
    assert!(!errors.is_empty(), "errors counted: {v}");
    assert!(errors.values().all(|c| c.as_u64().unwrap() > 0), "{v}");
    assert!(v["stopped"].is_string(), "a reason to stop: {v}");
    assert!(stdout.contains("errors      "), "{stdout}");
    // Every acknowledged message survived the kill (async flush: acknowledged after the
    // write completed), so the restarted broker holds at least that many.
    let broker = start_broker(&data);
    let config = ClientConfig::new(&broker.namesrv).with_tls(TlsOptions::with_ca(&broker.ca));
    let after = stored(&rt, config);
    assert!(
        after >= acked,
        "bench reported {acked} acknowledged, the broker holds {after}"
    );
    drop(broker);
}
