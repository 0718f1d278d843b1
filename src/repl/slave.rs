//! A slave shard's copier: asks its master shard for the log from its own written end
//! (HA_PULL) and appends what comes back with `Store::append_replica`, which checks every
//! record. Runs on the shard's executor, connecting out through the shard's own endpoint.

use std::net::ToSocketAddrs;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::frame::{Frame, FrameDecoder, Kind};
use orbitmq_proto::header::{
    self, HaOffsetsRequest, HaOffsetsResponse, HaPullRequest, HaPullResponse,
};
use orbitmq_proto::limits::MAX_FRAME_LEN;
use tracing::{debug, info, warn};

use super::{HA_MAX_CHUNK, HA_PULL_WAIT, OFFSETS_SYNC_PERIOD};
use crate::log::Store;
use crate::shard::broker::BrokerShared;

/// Pause after a failure before trying again.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Longest an offsets copy may hold up the log's copy.
const OFFSETS_WAIT: Duration = Duration::from_secs(2);
/// Longest pause between attempts while a failure persists.
pub const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);
/// Longest a connection to the master may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past the master's hold an answer may take before the connection is dropped.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// One slave shard's copier.
pub struct Copier {
    pub shard: u32,
    pub store: Store,
    pub endpoint: quinn::Endpoint,
    pub tls: quinn::ClientConfig,
    pub shared: Arc<BrokerShared>,
}

/// Resolves a future, or fails with `what` after `after`.
async fn within<T>(
    after: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    futures_lite::future::or(f, async {
        glommio::timer::sleep(after).await;
        Err(format!("{what}: no answer within {after:?}"))
    })
    .await
}

impl Copier {
    /// Copies until the task is cancelled, reconnecting after failures; logs each new kind
    /// of failure once, and the copy's start.
    pub async fn run(self) {
        let mut last = String::new();
        let mut pause = RETRY_PAUSE;
        loop {
            let master = self
                .shared
                .master
                .lock()
                .expect("master lock")
                .as_ref()
                .and_then(|m| m.get(self.shard as usize).cloned());
            let why = match master {
                None => {
                    // Normal at a start, until the slave sync finds the master.
                    debug!(shard = self.shard, "slave: the master is not known yet");
                    glommio::timer::sleep(RETRY_PAUSE).await;
                    continue;
                }
                Some(ep) => {
                    let answered_before = self.shared.copied_at_ms.load(Ordering::Relaxed);
                    let r = self.copy_from(&ep).await;
                    // The master answered: the failure is not the persistent kind.
                    if self.shared.copied_at_ms.load(Ordering::Relaxed) != answered_before {
                        pause = RETRY_PAUSE;
                    }
                    match r {
                        Ok(()) => continue,
                        Err(e) => format!("copying from {ep}: {e}"),
                    }
                }
            };
            // Logged when it changes (numbers aside: offsets move while the cause stays).
            let kind: String = why.chars().filter(|c| !c.is_ascii_digit()).collect();
            if kind != last {
                warn!(shard = self.shard, "slave: {why}; trying again, from every {RETRY_PAUSE:?} to every {MAX_RETRY_PAUSE:?}");
                last = kind;
            } else {
                debug!(shard = self.shard, "slave: {why}");
            }
            glommio::timer::sleep(pause).await;
            // A failure that persists (a diverged log, a fenced store) is tried less often.
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// One connection's copy; returns on the first failure.
    async fn copy_from(&self, ep: &str) -> Result<(), String> {
        let (host, _) = orbitmq_client::remoting::split_host_port(ep).map_err(|e| e.to_string())?;
        // Name lookups block: off the shard's thread.
        let name = ep.to_owned();
        let addr =
            crate::log::fsutil::off_shard(move || name.to_socket_addrs().map(|mut a| a.next()))
                .await
                .map_err(|e| format!("cannot resolve: {e}"))?
                .ok_or("cannot resolve: no address")?;
        let connecting = self
            .endpoint
            .connect_with(self.tls.clone(), addr, host)
            .map_err(|e| e.to_string())?;
        let conn = within(CONNECT_TIMEOUT, "connect", async {
            connecting.await.map_err(|e| e.to_string())
        })
        .await?;
        let r = self.copy_on(&conn).await;
        conn.close(0u32.into(), b"slave copier done");
        r
    }

    /// One request on its own stream of `conn`, and its answer (SUCCESS, or the error).
    async fn call(
        conn: &quinn::Connection,
        id: u64,
        code: u16,
        h: Bytes,
        within_time: Duration,
    ) -> Result<Frame, String> {
        let req = Frame::new(Kind::Request, code, id, h, Bytes::new());
        let resp = within(within_time, request::name(code), async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&req.to_bytes())
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            // Chunks go straight into the decoder: one copy of the (up to 4 MiB) answer.
            let mut d = FrameDecoder::new();
            while let Some(chunk) = recv
                .read_chunk(MAX_FRAME_LEN, true)
                .await
                .map_err(|e| e.to_string())?
            {
                d.push(&chunk.bytes);
                if d.buffered()
                    > d.next_len()
                        .map_err(|e| format!("the master's answer: {e}"))?
                {
                    return Err("the master's answer runs past its frame".to_string());
                }
            }
            match d.next_frame() {
                Ok(Some(f)) if f.kind == Kind::Response && f.request_id == id => Ok(f),
                Ok(_) => Err("the master's answer is not a whole response to it".to_string()),
                Err(e) => Err(format!("the master's answer: {e}")),
            }
        })
        .await?;
        if resp.code != response::SUCCESS {
            return Err(
                orbitmq_client::ClientError::from_response(resp.code, &resp.header, "").to_string(),
            );
        }
        Ok(resp)
    }

    /// Copies the master shard's committed offsets, and takes its delayed-delivery progress
    /// as pending until this log holds everything the master had written when it was read.
    async fn sync_offsets(
        &self,
        conn: &quinn::Connection,
        id: u64,
        pending: &mut Option<(String, u64)>,
    ) -> Result<(), String> {
        use crate::schedule::service::{Progress, MAX_PROGRESS_FILE_LEN};
        let h = header::encode(&HaOffsetsRequest {
            broker_name: self.shared.broker_name.clone(),
            shard: self.shard,
        });
        let resp = Self::call(conn, id, request::HA_OFFSETS, h, OFFSETS_WAIT).await?;
        self.store
            .adopt_offsets(&resp.body)
            .map_err(|e| format!("adopting the master's offsets: {e}"))?;
        let a: HaOffsetsResponse = header::decode(&resp.header)
            .map_err(|e| format!("the master's schedule progress: {e}"))?;
        if a.schedule_progress.is_empty() {
            return Ok(());
        }
        if a.schedule_progress.len() as u64 > MAX_PROGRESS_FILE_LEN {
            return Err("the master's schedule progress is too large".into());
        }
        Progress::parse(&a.schedule_progress, 0)
            .map_err(|e| format!("the master's schedule progress: {e}"))?;
        // A progress waiting for the log is kept first: replacing it with a newer one would
        // keep none while the slave trails by more than a period.
        if pending.is_none() {
            *pending = Some((a.schedule_progress, a.master_end));
        }
        Ok(())
    }

    /// Keeps a pending delayed-delivery progress in this shard's directory once this log
    /// holds what it covers (unused while a slave: the scheduler of a slave restarted as the
    /// master starts from it).
    async fn keep_schedule_progress(
        &self,
        pending: &mut Option<(String, u64)>,
        kept: &mut String,
    ) -> Result<(), String> {
        let Some((_, need)) = pending.as_ref() else {
            return Ok(());
        };
        if self.store.log_range().1 < *need {
            return Ok(());
        }
        let (text, _) = pending.take().expect("pending progress");
        if text == *kept {
            return Ok(());
        }
        let path = self
            .store
            .config()
            .dir
            .join(crate::schedule::service::PROGRESS_FILE);
        crate::log::fsutil::write_atomically_off_shard(path, text.clone().into_bytes())
            .await
            .map_err(|e| format!("keeping the master's schedule progress: {e}"))?;
        *kept = text;
        Ok(())
    }

    async fn copy_on(&self, conn: &quinn::Connection) -> Result<(), String> {
        let mut logged_start = false;
        let mut request_id = 0u64;
        // The offsets are copied first, then every OFFSETS_SYNC_PERIOD. A failure there is
        // logged and tried again next period; it holds the log's copy up OFFSETS_WAIT at most.
        let mut offsets_due = Instant::now();
        let mut offsets_error = String::new();
        let mut progress = None;
        let mut progress_kept = String::new();
        loop {
            if Instant::now() >= offsets_due {
                offsets_due = Instant::now() + OFFSETS_SYNC_PERIOD;
                request_id += 1;
                let r = self.sync_offsets(conn, request_id, &mut progress).await;
                match r {
                    Err(e) if e != offsets_error => {
                        warn!(shard = self.shard, "slave: copying the master's consumer offsets: {e}; trying again every {OFFSETS_SYNC_PERIOD:?}");
                        offsets_error = e;
                    }
                    Err(_) => {}
                    Ok(()) => offsets_error.clear(),
                }
            }
            if let Err(e) = self
                .keep_schedule_progress(&mut progress, &mut progress_kept)
                .await
            {
                warn!(shard = self.shard, "slave: {e}");
            }
            let from = self.store.log_range().1;
            let (last_at, last_size, last_store_ts) = self.store.last_record().unwrap_or_default();
            request_id += 1;
            let h = header::encode(&HaPullRequest {
                last_at,
                last_size,
                last_store_ts,
                broker_name: self.shared.broker_name.clone(),
                slave_id: self.shared.broker_id,
                shard: self.shard,
                segment_size: self.store.config().segment_size,
                from,
                max_bytes: HA_MAX_CHUNK as u32,
                wait_ms: HA_PULL_WAIT.as_millis() as u32,
            });
            let resp = Self::call(
                conn,
                request_id,
                request::HA_PULL,
                h,
                HA_PULL_WAIT + ANSWER_GRACE,
            )
            .await?;
            let a: HaPullResponse = header::decode(&resp.header).map_err(|e| e.to_string())?;
            if a.from != from {
                return Err(format!(
                    "asked for {from}, the master answered for {}",
                    a.from
                ));
            }
            self.shared
                .copied_at_ms
                .store(orbitmq_proto::now_ms(), Ordering::Relaxed);
            // Retention here removes only what the master has removed: a slave runs no
            // scheduler to say which waiting delayed messages a promotion would need.
            self.store.hold_from(a.master_start);
            if !logged_start {
                info!(
                    shard = self.shard,
                    from,
                    master_end = a.master_end,
                    "slave: copying the master's log"
                );
                logged_start = true;
            }
            if resp.body.is_empty() {
                if from < a.master_start {
                    // A new slave of a master whose retention removed its first segments
                    // copies from where the master's log starts now.
                    if self.store.log_range() == (0, 0) {
                        self.store
                            .start_at(a.master_start)
                            .await
                            .map_err(|e| e.to_string())?;
                        info!(
                            shard = self.shard,
                            from = a.master_start,
                            "slave: a new copy starts where the master's log starts"
                        );
                        continue;
                    }
                    return Err(format!(
                        "the master's log now starts at {} and this slave's ends at {from}: \
                         the records between are gone from the master (retention); empty the \
                         slave's shard directories to copy from the master's start",
                        a.master_start
                    ));
                }
                continue;
            }
            self.store
                .append_replica(from, &resp.body)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
}
