//! The broker a bench starts when it is given no `--namesrv`: this executable's
//! `standalone` in a temporary directory, on ephemeral ports, killed and removed at the end.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::BenchError;

/// How long the embedded broker may take to print its ready line (it preallocates its
/// first CommitLog segments).
pub const EMBEDDED_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Name of the broker's log (its stderr) inside the temporary directory.
const LOG_NAME: &str = "broker.log";
/// Last bytes of that log shown when the broker fails to start.
const LOG_TAIL_BYTES: usize = 4096;

/// A running embedded broker; dropping it kills the process and removes its directory.
pub struct EmbeddedBroker {
    child: Child,
    dir: PathBuf,
    pub namesrv: String,
    pub ca: PathBuf,
}

impl EmbeddedBroker {
    /// Starts `standalone` with `flush` (`sync` / `async`, the broker's default when `None`)
    /// and `shards` (the broker's default when `None`), and waits for its ready line.
    pub fn start(flush: Option<&str>, shards: Option<u32>) -> Result<EmbeddedBroker, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::Embedded(format!("cannot find this executable: {e}")))?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("orbitmq-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| BenchError::Embedded(format!("cannot create {}: {e}", dir.display())))?;
        let data = dir.join("data");
        let log_path = dir.join(LOG_NAME);
        let log = std::fs::File::create(&log_path).map_err(|e| {
            BenchError::Embedded(format!("cannot create {}: {e}", log_path.display()))
        })?;
        let mut cmd = Command::new(exe);
        cmd.arg("standalone").arg("--data-dir").arg(&data).args([
            "--listen",
            "127.0.0.1:0",
            "--namesrv-listen",
            "127.0.0.1:0",
        ]);
        if let Some(f) = flush {
            cmd.args(["--flush", f]);
        }
        if let Some(s) = shards {
            cmd.args(["--shards", &s.to_string()]);
        }
        let spawned = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(BenchError::Embedded(format!(
                    "cannot start the broker: {e}"
                )));
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the ready line, then drains stdout so the broker never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("ready ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let mut broker = EmbeddedBroker {
            child,
            dir,
            namesrv: String::new(),
            ca: PathBuf::new(),
        };
        let line = match rx.recv_timeout(EMBEDDED_READY_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let status = broker.child.try_wait().ok().flatten();
                return Err(BenchError::Embedded(format!(
                    "the embedded broker printed no ready line in {EMBEDDED_READY_TIMEOUT:?} \
                     ({}); its log ends with:\n{}",
                    status.map_or("still running".to_string(), |s| s.to_string()),
                    broker.log_tail()
                )));
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .map(str::to_owned)
        };
        match (field("namesrv"), field("ca")) {
            (Some(n), Some(c)) => {
                broker.namesrv = n;
                broker.ca = PathBuf::from(c);
            }
            _ => {
                return Err(BenchError::Embedded(format!(
                    "unexpected ready line from the broker: {line:?}"
                )))
            }
        }
        tracing::info!(namesrv = %broker.namesrv, dir = %broker.dir.display(),
            "embedded broker ready");
        Ok(broker)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read(self.dir.join(LOG_NAME)).unwrap_or_default();
        let from = log.len().saturating_sub(LOG_TAIL_BYTES);
        String::from_utf8_lossy(&log[from..]).into_owned()
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        // Its data is thrown away: no need for a clean SIGTERM shutdown.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the embedded broker's directory");
        }
    }
}
