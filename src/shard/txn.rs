//! Transactional messages on a shard (see `crate::txn` for the model): half messages stored
//! by SEND_MESSAGE, END_TRANSACTION, the check-back loop, and the state read back at a start.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_proto::codes::{push, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{self, CheckTransactionNotice, EndTransactionRequest};
use orbitmq_proto::limits::MAX_GROUP_LEN;
use orbitmq_proto::msgid::OffsetId;
use orbitmq_proto::now_ms;
use orbitmq_proto::record::{self, Message};
use orbitmq_proto::sys::{TRANS_GROUP, TRANS_HALF_TOPIC, TRANS_OP_TOPIC};
use tracing::{debug, info, warn};

use crate::log::{ReadStatus, Store, StoreError};
use crate::nameserver::topics::PERM_WRITE;
use crate::net::server::{error_frame, ok_frame};
use crate::shard::broker::{store_error_code, ShardHandler};
use crate::txn::{self, Due, Op, Outcome, Pending, Status, TxConfig, TxState};

/// Copies of one unique key looked at to tell whether a commit is stored already.
const COMMITTED_LOOKUP_MAX: usize = 16;
/// Check-back pushes of a shard under way at once (each holds its half message's record).
const MAX_CHECK_PUSHES_IN_FLIGHT: usize = 1_000;
/// How long one check-back push may take to be queued to its producer.
const CHECK_PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Records one read of the half or op queue returns at a start.
const REBUILD_READ_MESSAGES: usize = 1024;
/// Bytes one such read returns at most.
const REBUILD_READ_BYTES: usize = 8 << 20;

/// Reads a shard's transactions back at a start: the half queue from where every earlier
/// half message had its outcome, and the op queue from where its records start to matter.
pub async fn rebuild(store: &Store, cfg: &TxConfig) -> Result<TxState, StoreError> {
    // Within the queue's bounds: a slave promoted to master may hold its master's progress
    // for records it never copied (reading from past its end would skip the op records it
    // writes from there on).
    let start = |topic: &str| match store.queue_bounds(topic, 0) {
        // (No clamp(): it panics on bounds out of order, whatever they are.)
        Some((min, max)) => store
            .query_offset(TRANS_GROUP, topic, 0)
            .unwrap_or(0)
            .min(max)
            .max(min),
        None => 0,
    };
    let (half_from, op_from) = (start(TRANS_HALF_TOPIC), start(TRANS_OP_TOPIC));
    let mut s = TxState::starting_at(half_from, op_from);
    // Outcomes first, so a half message that ended is never taken for pending.
    read_queue(store, TRANS_OP_TOPIC, op_from, |v| match txn::parse_op(v) {
        Some((half, Op::End(outcome))) => s.ended(half, v.queue_offset, outcome),
        Some((half, Op::Checked)) => s.checked(half, v.queue_offset),
        None => {}
    })
    .await?;
    read_queue(
        store,
        TRANS_HALF_TOPIC,
        half_from,
        |v| match txn::half_info(v) {
            Ok(info) => s.prepared(
                v.queue_offset,
                Pending {
                    phys: v.physical_offset,
                    group: info.group.to_owned(),
                    next_check_ms: v.store_timestamp.saturating_add(cfg.timeout_ms),
                    checks: 0,
                    ending: false,
                    op_floor: 0,
                    copy_possible: false,
                },
            ),
            Err(e) => warn!(offset = v.queue_offset, error = %e, "skipping a damaged half message"),
        },
    )
    .await?;
    s.settle();
    if s.pending() > 0 {
        info!(
            pending = s.pending(),
            "half messages wait for their transactions' outcome"
        );
    }
    Ok(s)
}

/// Calls `f` with each record of queue 0 of an internal topic from `from` to its end; a record
/// that fails to decode is skipped.
async fn read_queue(
    store: &Store,
    topic: &str,
    from: u64,
    mut f: impl FnMut(&record::RecordView<'_>),
) -> Result<(), StoreError> {
    let mut off = from;
    loop {
        let r = store
            .read(
                topic,
                0,
                off,
                REBUILD_READ_MESSAGES,
                REBUILD_READ_BYTES,
                None,
            )
            .await?;
        if r.status != ReadStatus::Found {
            return Ok(());
        }
        for b in &r.records {
            match record::decode(b) {
                Ok(v) => f(&v),
                Err(e) => warn!(topic, error = %e, "skipping a damaged record"),
            }
        }
        off = r.next_offset;
    }
}

impl ShardHandler {
    /// Stores a sent half message in the half queue of this shard (which owns its real
    /// queue). Returns the append's result like any send.
    pub(crate) async fn append_half(
        &self,
        mut m: Message,
        group: &str,
    ) -> Result<crate::log::AppendResult, (u16, String)> {
        // A delay is applied at the commit: refuse now one the commit would refuse.
        self.divert_delayed(std::slice::from_mut(&mut m.clone()))
            .map_err(|e| (response::MESSAGE_ILLEGAL, e.to_string()))?;
        txn::to_half(&mut m, group).map_err(|e| (response::MESSAGE_ILLEGAL, e.to_string()))?;
        if self.txn.borrow().pending() >= txn::MAX_PENDING {
            return Err((
                response::SYSTEM_BUSY,
                format!(
                    "{} half messages wait for their outcome on this shard: end some first",
                    txn::MAX_PENDING
                ),
            ));
        }
        let r = self
            .store
            .append(&m)
            .await
            .map_err(|e| (store_error_code(&e), e.to_string()))?;
        let timeout = self.shared.txn.timeout_ms;
        self.txn.borrow_mut().prepared(
            r.queue_offset,
            Pending {
                phys: r.physical_offset,
                group: group.to_owned(),
                next_check_ms: r.store_timestamp.saturating_add(timeout),
                checks: 0,
                ending: false,
                op_floor: 0,
                copy_possible: false,
            },
        );
        Ok(r)
    }

    pub(crate) async fn end_transaction(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let e: EndTransactionRequest = match header::decode(&req.header) {
            Ok(e) => e,
            Err(err) => return error_frame(id, response::BAD_REQUEST, err.to_string()),
        };
        if e.producer_group.is_empty() || e.producer_group.len() > MAX_GROUP_LEN {
            return error_frame(
                id,
                response::BAD_REQUEST,
                "a producer group of 1..=255 bytes",
            );
        }
        let outcome = if e.commit {
            Outcome::Commit
        } else {
            Outcome::Rollback
        };
        let at = e.half_queue_offset;
        match self.txn.borrow().status(at) {
            Status::Pending => {}
            Status::Ended(o) if o == outcome => return ok_frame(id, Bytes::new(), Bytes::new()),
            Status::Ended(o) => {
                return error_frame(
                    id,
                    response::BAD_REQUEST,
                    format!("the transaction of half message {at} already ended: {o:?}"),
                )
            }
            Status::Ending => {
                return error_frame(
                    id,
                    response::SYSTEM_BUSY,
                    format!("the transaction of half message {at} is being ended"),
                )
            }
            Status::Old => {
                return error_frame(
                    id,
                    response::BAD_REQUEST,
                    format!(
                        "no half message waits at {at} on this shard (ended, or never sent here)"
                    ),
                )
            }
        }
        // The request must name the pending half message itself (its log offset and group),
        // not some other record that starts at a chosen offset.
        let matches = self
            .txn
            .borrow()
            .pending_at(at)
            .is_some_and(|p| p.phys == e.half_offset && p.group == e.producer_group);
        if !matches {
            return error_frame(
                id,
                response::BAD_REQUEST,
                format!(
                    "half message {at} is another one, or of another producer group, than the request names"
                ),
            );
        }
        let record = match self.store.record_by_offset(e.half_offset).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return error_frame(
                    id,
                    response::BAD_REQUEST,
                    format!("no message starts at CommitLog offset {}", e.half_offset),
                )
            }
            Err(err) => return error_frame(id, store_error_code(&err), err.to_string()),
        };
        let v = match record::decode(&record) {
            Ok(v) => v,
            Err(err) => return error_frame(id, response::SYSTEM_ERROR, err.to_string()),
        };
        let info =
            match txn::half_info(&v) {
                Ok(i) if v.queue_offset == at && i.group == e.producer_group => i,
                Ok(_) => return error_frame(
                    id,
                    response::BAD_REQUEST,
                    "the half message at that offset is another one, or of another producer group",
                ),
                Err(err) => return error_frame(id, response::BAD_REQUEST, err.to_string()),
            };
        let copy_possible = self
            .txn
            .borrow()
            .pending_at(at)
            .is_some_and(|p| p.copy_possible);
        if !self.txn.borrow_mut().begin_end(at) {
            return error_frame(id, response::SYSTEM_BUSY, "the transaction is being ended");
        }
        let mut stored = false;
        let r = async {
            if outcome == Outcome::Commit {
                let mut m = txn::committed(&v)
                    .map_err(|err| error_frame(id, response::SYSTEM_ERROR, err.to_string()))?;
                // A commit whose op record was not written (a failed append, a crash) is
                // not stored twice: its copy in the real topic names the half's offset.
                let found = copy_possible
                    && self
                        .already_committed(&m, e.half_offset, v.store_timestamp)
                        .await;
                if !found {
                    self.check_queue(id, info.real_topic, info.real_queue, PERM_WRITE)?;
                    self.divert_delayed(std::slice::from_mut(&mut m))
                        .map_err(|err| {
                            error_frame(id, response::MESSAGE_ILLEGAL, err.to_string())
                        })?;
                    self.store
                        .append(&m)
                        .await
                        .map_err(|err| error_frame(id, store_error_code(&err), err.to_string()))?;
                    stored = true;
                }
            }
            self.write_outcome(at, outcome)
                .await
                .map_err(|err| error_frame(id, store_error_code(&err), err.to_string()))
        }
        .await;
        match r {
            Ok(()) => {
                debug!(
                    half = at,
                    ?outcome,
                    from_check = e.from_check,
                    "transaction ended"
                );
                ok_frame(id, Bytes::new(), Bytes::new())
            }
            Err(f) => {
                self.txn.borrow_mut().end_failed(at, stored);
                f
            }
        }
    }

    /// Whether the committed copy of the half message at `half_offset` is stored already,
    /// found by its unique key in the key index (without the index, or without a unique key,
    /// this cannot be told, and a commit whose op record was lost may be stored twice, as
    /// RocketMQ's). A delayed commit waits in the schedule or timer topic under its key.
    async fn already_committed(&self, m: &Message, half_offset: u64, stored_ms: u64) -> bool {
        let Some((_, uniq)) = m
            .properties
            .iter()
            .find(|(k, _)| k == orbitmq_proto::msgid::UNIQ_KEY)
        else {
            return false;
        };
        use orbitmq_proto::sys::{property, SCHEDULE_TOPIC, TIMER_TOPIC};
        let has = |p: &str| m.properties.iter().any(|(k, _)| k == p);
        let waits_in = [
            Some(m.topic.as_str()),
            has(property::DELAY).then_some(SCHEDULE_TOPIC),
            has(property::TIMER_DELIVER_MS).then_some(TIMER_TOPIC),
        ];
        for topic in waits_in.into_iter().flatten() {
            let found = self
                .store
                .query_key(topic, uniq, true, stored_ms, u64::MAX, COMMITTED_LOOKUP_MAX)
                .await;
            if let Ok((records, _)) = found {
                let committed = records
                    .iter()
                    .any(|b| record::decode(b).is_ok_and(|v| v.prepared_tx_offset == half_offset));
                if committed {
                    info!(
                        half_offset,
                        "a commit was stored already: writing only its op record"
                    );
                    return true;
                }
            }
        }
        false
    }

    /// Appends the op record of an outcome and records it; the progress a restart reads
    /// from moves on.
    async fn write_outcome(
        &self,
        half_queue_offset: u64,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        let op = self
            .store
            .append(&txn::op_message(half_queue_offset, Op::End(outcome)))
            .await?;
        let (half, ops) = {
            let mut s = self.txn.borrow_mut();
            s.ended(half_queue_offset, op.queue_offset, outcome);
            (s.half_progress(), s.op_progress())
        };
        // Committed offsets are bounded per shard; the two internal ones always fit once set.
        for (topic, at) in [(TRANS_HALF_TOPIC, half), (TRANS_OP_TOPIC, ops)] {
            if let Err(e) = self.store.commit_offset(TRANS_GROUP, topic, 0, at) {
                warn!(error = %e, "transaction progress not recorded; a restart reads more");
            }
        }
        Ok(())
    }

    /// One round of checks: half messages past their timeout are checked back with a live
    /// producer of their group on this shard; those checked `transactionCheckMax` times are
    /// rolled back.
    async fn check_round(&self, cfg: &TxConfig) {
        let due = self.txn.borrow_mut().due(now_ms(), cfg);
        // The round's check-backs are recorded first, a batch append at a time, so a restart
        // (or a promoted slave) counts them towards transactionCheckMax.
        let halves: Vec<u64> = due
            .iter()
            .filter_map(|d| match d {
                Due::Check {
                    half_queue_offset, ..
                } => Some(*half_queue_offset),
                Due::Discard { .. } => None,
            })
            .collect();
        for chunk in halves.chunks(txn::CHECK_RECORDS_PER_APPEND) {
            let records: Vec<Message> = chunk
                .iter()
                .map(|h| txn::op_message(*h, Op::Checked))
                .collect();
            match self.store.append_batch(&records).await {
                Ok(r) => {
                    let mut s = self.txn.borrow_mut();
                    for (h, a) in chunk.iter().zip(&r) {
                        s.checked(*h, a.queue_offset);
                    }
                }
                // The checks go out anyway: a restart would only count fewer of them.
                Err(e) => warn!(error = %e, "check-back records not written"),
            }
        }
        for d in due {
            match d {
                Due::Discard {
                    half_queue_offset,
                    phys,
                    copy_possible,
                } => {
                    if !self.txn.borrow_mut().begin_end(half_queue_offset) {
                        continue;
                    }
                    // A commit stored before its op record was lost is not rolled back.
                    let committed = copy_possible
                        && match self.store.record_by_offset(phys).await {
                            Ok(Some(b)) => match record::decode(&b) {
                                Ok(v) => match txn::committed(&v) {
                                    Ok(m) => {
                                        self.already_committed(&m, phys, v.store_timestamp).await
                                    }
                                    Err(_) => false,
                                },
                                Err(_) => false,
                            },
                            _ => false,
                        };
                    let outcome = if committed {
                        Outcome::Commit
                    } else {
                        warn!(
                            half = half_queue_offset,
                            checks = cfg.check_max,
                            "no outcome after the last check-back: rolling the half message back"
                        );
                        Outcome::Rollback
                    };
                    if let Err(e) = self.write_outcome(half_queue_offset, outcome).await {
                        warn!(error = %e, "rollback of an unanswered half message not written");
                        self.txn.borrow_mut().end_failed(half_queue_offset, false);
                    }
                }
                Due::Check {
                    half_queue_offset,
                    phys,
                    group,
                    n,
                } => self.check_back(half_queue_offset, phys, &group, n).await,
            }
        }
    }

    async fn check_back(&self, half_queue_offset: u64, phys: u64, group: &str, n: u32) {
        let record = match self.store.record_by_offset(phys).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Gone (retention): it can never be committed.
                if self.txn.borrow_mut().begin_end(half_queue_offset) {
                    if let Err(e) = self
                        .write_outcome(half_queue_offset, Outcome::Rollback)
                        .await
                    {
                        warn!(error = %e, "rollback of a lost half message not written");
                        self.txn.borrow_mut().end_failed(half_queue_offset, false);
                    }
                }
                return;
            }
            Err(e) => {
                warn!(error = %e, half = half_queue_offset, "half message unreadable for its check-back");
                return;
            }
        };
        let producers = self
            .shared
            .clients
            .lock()
            .expect("clients lock")
            .producers(group, Instant::now());
        // Producers in turn, check by check: one that stopped answering does not get all.
        let peer = {
            let peers = self.peers.borrow();
            let live: Vec<_> = producers
                .iter()
                .filter_map(|p| peers.get(p).cloned())
                .collect();
            (!live.is_empty()).then(|| live[n as usize % live.len()].clone())
        };
        if self.check_pushes.get() >= MAX_CHECK_PUSHES_IN_FLIGHT {
            debug!(
                group,
                half = half_queue_offset,
                "check-back pushes at their bound: asking next round"
            );
            return;
        }
        let Some(peer) = peer else {
            debug!(
                group,
                half = half_queue_offset,
                check = n,
                "no producer of the group is connected to this shard for a check-back"
            );
            return;
        };
        let notice = CheckTransactionNotice {
            producer_group: group.to_owned(),
            half_offset: phys,
            half_queue_offset,
            msg_id: OffsetId::new(self.my_endpoint(), self.shard as u16, phys).encode(),
        };
        // Not awaited by the round: a producer that does not take its pushes holds up only
        // its own, for at most the timeout.
        let group = group.to_owned();
        let in_flight = self.check_pushes.clone();
        in_flight.set(in_flight.get() + 1);
        glommio::spawn_local(async move {
            let send = peer.push_with_body(
                push::CHECK_TRANSACTION_STATE,
                header::encode(&notice),
                record,
            );
            let timeout = async {
                glommio::timer::sleep(CHECK_PUSH_TIMEOUT).await;
                Err("timed out".to_owned())
            };
            if let Err(e) = futures_lite::future::or(send, timeout).await {
                debug!(group, error = %e, "check-back not sent");
            }
            in_flight.set(in_flight.get() - 1);
        })
        .detach();
    }
}

/// The shard's check-back loop, until the shard stops (the task is dropped).
pub async fn check_loop(handler: Rc<ShardHandler>) {
    let cfg = handler.shared.txn;
    loop {
        glommio::timer::sleep(cfg.check_interval.max(Duration::from_millis(1))).await;
        handler.check_round(&cfg).await;
    }
}
