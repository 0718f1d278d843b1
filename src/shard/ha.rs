//! The master's side of replication on one shard: HA_INFO (what a slave must match, and where
//! each shard is), HA_PULL (the log from a slave's end, which acknowledges what it has), and
//! the wait of a SYNC_MASTER send for its slave. See `crate::repl`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_proto::codes::response;
use orbitmq_proto::frame::{Frame, Kind};
use orbitmq_proto::header::{
    self, HaInfoResponse, HaOffsetsRequest, HaOffsetsResponse, HaPullRequest, HaPullResponse,
    HaSlaveStatus, HaStatusResponse, SendResponse,
};

use super::broker::{store_error_code, ShardHandler};
use crate::config::BrokerRole;
use crate::net::server::{error_frame, ok_frame, Peer};
use crate::repl::{self, HA_MAX_CHUNK, HA_PULL_WAIT};

impl ShardHandler {
    /// Refuses what a slave must not do (it takes no writes: its log is its master's copy).
    pub(crate) fn refuse_on_slave(&self, id: u64) -> Option<Frame> {
        (self.shared.role == BrokerRole::Slave).then(|| {
            error_frame(
                id,
                response::SERVICE_NOT_AVAILABLE,
                format!(
                    "broker {} is a SLAVE (id {}): it takes no writes (nor queue locks); use its master",
                    self.shared.broker_name, self.shared.broker_id
                ),
            )
        })
    }

    /// Whether `peer` may pull this shard's log and offsets: with a cluster CA, only a peer
    /// whose certificate it signed (the TLS handshake checked it).
    pub(crate) fn may_replicate(&self, peer: &Peer) -> bool {
        !self.shared.ha_needs_cert || peer.conn.peer_identity().is_some()
    }

    pub(crate) fn ha_status(&self, id: u64) -> Frame {
        let (master_start, master_end) = self.store.log_range();
        let slaves = self
            .replicas
            .borrow()
            .slaves(Instant::now(), master_end, self.shared.ha.max_gap)
            .into_iter()
            .map(|(slave_id, acked, silent, in_sync)| HaSlaveStatus {
                slave_id,
                acked,
                silent_ms: silent.as_millis() as u64,
                in_sync,
            })
            .collect();
        let h = header::encode(&HaStatusResponse {
            shard: self.shard,
            master_start,
            master_end,
            slaves,
        });
        ok_frame(id, h, Bytes::new())
    }

    pub(crate) fn ha_info(&self, id: u64) -> Frame {
        let shards = self.shared.shape.shards;
        let info = HaInfoResponse {
            broker_name: self.shared.broker_name.clone(),
            shards,
            queue_map: self.shared.shape.map.name().to_owned(),
            segment_size: self.store.config().segment_size,
            shard_endpoints: (0..shards).map(|k| self.endpoint_of(k)).collect(),
        };
        ok_frame(id, header::encode(&info), Bytes::new())
    }

    pub(crate) async fn ha_pull(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let h: HaPullRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if let Some(f) = self.refuse_on_slave(id) {
            return f;
        }
        let segment_size = self.store.config().segment_size;
        let mismatch = if h.broker_name != self.shared.broker_name {
            Some(format!(
                "this is broker {}, not {}",
                self.shared.broker_name, h.broker_name
            ))
        } else if h.shard != self.shard {
            Some(format!(
                "this is shard {}, not {}: each slave shard copies its own",
                self.shard, h.shard
            ))
        } else if h.segment_size != segment_size {
            Some(format!(
                "the master's mappedFileSizeCommitLog is {segment_size}, the slave's {}",
                h.segment_size
            ))
        } else if h.slave_id == crate::nameserver::routes::MASTER_ID {
            Some("a slave's brokerId is 1 or more".into())
        } else {
            None
        };
        if let Some(why) = mismatch {
            return error_frame(id, response::BAD_REQUEST, why);
        }
        let (start, end) = self.store.log_range();
        if h.from > end {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "the slave's log ends at {} past the master's end {end}: it holds records \
                     the master lost, maybe acknowledged to producers: keep its shard-{} \
                     directory (restart it as the master) if they matter, else empty it to \
                     copy afresh",
                    h.from, self.shard
                ),
            );
        }
        if h.last_size > 0 && h.last_at >= start && h.last_at < h.from {
            match self
                .store
                .has_record(h.last_at, h.last_size, h.last_store_ts)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    return error_frame(
                        id,
                        response::BAD_REQUEST,
                        format!(
                            "the slave's last record at log offset {} is not the master's: \
                             their logs diverged (the master lost records it had written, or \
                             the slave copied another master); its records past the \
                             divergence may have been acknowledged to producers: keep its \
                             shard-{} directory (restart it as the master) if they matter, \
                             else empty it to copy afresh",
                            h.last_at, self.shard
                        ),
                    )
                }
                Err(e) => return error_frame(id, store_error_code(&e), e.to_string()),
            }
        }
        let now = Instant::now();
        if !self.replicas.borrow_mut().report(h.slave_id, h.from, now) {
            return error_frame(
                id,
                response::SYSTEM_BUSY,
                format!("this shard already serves {} slaves", repl::MAX_SLAVES),
            );
        }
        self.replica_acked.notify();
        let answer = |body: Bytes| {
            let (start, end) = self.store.log_range();
            ok_frame(
                id,
                header::encode(&HaPullResponse {
                    from: h.from,
                    master_end: end,
                    master_start: start,
                }),
                body,
            )
        };
        if h.from < start {
            // Retention removed what the slave needs next: it reports that to its operator.
            return answer(Bytes::new());
        }
        // At least a record's header, so a record larger than asked comes whole.
        let max = (h.max_bytes as usize).clamp(orbitmq_proto::record::MIN_RECORD_LEN, HA_MAX_CHUNK);
        let deadline = now + Duration::from_millis(h.wait_ms.into()).min(HA_PULL_WAIT);
        loop {
            // Take the wake-up before looking, so an append in between is not missed.
            let dispatched = self.store.dispatched();
            match self.store.read_log(h.from, max).await {
                Ok(b) if !b.is_empty() => return answer(b),
                Ok(_) => {}
                Err(e) => return error_frame(id, store_error_code(&e), e.to_string()),
            }
            let now = Instant::now();
            if now >= deadline {
                return answer(Bytes::new());
            }
            futures_lite::future::or(dispatched, glommio::timer::sleep(deadline - now)).await;
        }
    }

    pub(crate) async fn ha_offsets(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let h: HaOffsetsRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if let Some(f) = self.refuse_on_slave(id) {
            return f;
        }
        if h.broker_name != self.shared.broker_name || h.shard != self.shard {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "this is shard {} of broker {}, not shard {} of {}",
                    self.shard, self.shared.broker_name, h.shard, h.broker_name
                ),
            );
        }
        let body = self.store.offsets_snapshot();
        if body.len() > repl::MAX_OFFSETS_BYTES {
            return error_frame(
                id,
                response::SYSTEM_ERROR,
                format!(
                    "the shard's committed offsets take {} bytes, over the {} a slave copies",
                    body.len(),
                    repl::MAX_OFFSETS_BYTES
                ),
            );
        }
        let path = self
            .store
            .config()
            .dir
            .join(crate::schedule::service::PROGRESS_FILE);
        let progress =
            crate::log::fsutil::off_shard(move || match std::fs::read_to_string(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                r => r,
            })
            .await
            .unwrap_or_default();
        // Taken after the read: the progress covers no delivery past the log's end now (it is
        // written once its deliveries are synced).
        let master_end = self.store.log_range().1;
        // Anything else is not a progress file this broker wrote: the slave gets none.
        let progress = if progress.len() as u64 <= crate::schedule::service::MAX_PROGRESS_FILE_LEN {
            progress
        } else {
            String::new()
        };
        let h = header::encode(&HaOffsetsResponse {
            schedule_progress: progress,
            master_end,
        });
        ok_frame(id, h, Bytes::from(body))
    }

    /// The answer to a send stored with records ending at log offset `end`: its results, with
    /// SUCCESS or the status [`Self::wait_for_slave`] gives.
    pub(crate) async fn answer_stored(&self, id: u64, resp: &SendResponse, end: u64) -> Frame {
        let code = self.wait_for_slave(end).await;
        Frame::new(Kind::Response, code, id, header::encode(resp), Bytes::new())
    }

    /// A SYNC_MASTER send whose records end at log offset `end` waits for a slave in sync to
    /// have them. Returns the answer's code: SUCCESS, or (the records stored on the master
    /// either way, the answer still carrying their results) SLAVE_NOT_AVAILABLE when no slave
    /// is in sync and FLUSH_SLAVE_TIMEOUT when it did not confirm in time.
    async fn wait_for_slave(&self, end: u64) -> u16 {
        if self.shared.role != BrokerRole::SyncMaster {
            return response::SUCCESS;
        }
        let start = Instant::now();
        let deadline = start + self.shared.ha.slave_timeout;
        let master_end = self.store.log_range().1;
        let in_sync = self
            .replicas
            .borrow()
            .in_sync(start, master_end, self.shared.ha.max_gap);
        if in_sync.is_none() {
            return response::SLAVE_NOT_AVAILABLE;
        }
        loop {
            let acked = self.replica_acked.listen();
            if self.replicas.borrow().acked().is_some_and(|a| a >= end) {
                return response::SUCCESS;
            }
            let now = Instant::now();
            if now >= deadline {
                return response::FLUSH_SLAVE_TIMEOUT;
            }
            futures_lite::future::or(acked, glommio::timer::sleep(deadline - now)).await;
        }
    }
}
