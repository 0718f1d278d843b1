//! Transactional messages, as RocketMQ's: a producer sends a half message, runs its local
//! transaction, then commits or rolls it back (END_TRANSACTION). Until then the message waits,
//! invisible to consumers, in `RMQ_SYS_TRANS_HALF_TOPIC` (queue 0 of the shard that owns its
//! real queue). Each outcome is an op record in `RMQ_SYS_TRANS_OP_HALF_TOPIC` (queue 0 of the
//! same shard; body: the half message's queue offset; tag `c` or `r`), and so is each check-back
//! (tag `k`), so the count survives a restart and reaches a slave. A half message with no
//! outcome `transactionTimeOut` after it was stored is checked back with a producer of its group
//! (CHECK_TRANSACTION_STATE), every `transactionCheckInterval`, and rolled back after
//! `transactionCheckMax` checks.
//!
//! This module is pure: the rewrites of a message in and out of the half topic, the op record,
//! and the state of a shard's transactions ([`TxState`]). `src/shard/txn.rs` does the I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use orbitmq_proto::record::{sys_flag, Message, RecordView};
use orbitmq_proto::sys::{self, property, TRANS_HALF_TOPIC, TRANS_OP_TOPIC};
use thiserror::Error;

/// RocketMQ's `transactionCheckInterval` (ms; 4.x's default is 60 s).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// RocketMQ's `transactionTimeOut`: a half message younger than this is not checked back.
pub const DEFAULT_TIMEOUT_MS: u64 = 6_000;
/// RocketMQ's `transactionCheckMax`: checks before a half message is rolled back.
pub const DEFAULT_CHECK_MAX: u32 = 15;
/// Bounds of the settings.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_CHECK_MAX: u32 = 1000;
/// Most half messages checked back in one round of a shard (the rest wait for the next): a
/// client takes pushes into a channel of 4,096.
pub const MAX_CHECKS_PER_ROUND: usize = 1_000;
/// Check-back op records appended at a time (about 130 bytes each: a batch stays far below
/// the smallest CommitLog segment a batch must fit in).
pub const CHECK_RECORDS_PER_APPEND: usize = 64;
/// Most half messages rolled back in one round of a shard after their last check.
pub const MAX_DISCARDS_PER_ROUND: usize = 10_000;
/// Most half messages a shard keeps waiting for their outcome; past it a new one is refused
/// (SYSTEM_BUSY) until some end or are rolled back.
pub const MAX_PENDING: usize = 1_000_000;
/// Outcomes remembered for a repeated END_TRANSACTION (a check-back's answer crossing the
/// producer's own): the newest ones, by half queue offset.
pub const MAX_REMEMBERED_OUTCOMES: usize = 65_536;
/// Op record tags: the outcome, or a check-back (counted, as RocketMQ counts
/// `TRANSACTION_CHECK_TIMES`, towards `transactionCheckMax`).
pub const TAG_COMMIT: &str = "c";
pub const TAG_ROLLBACK: &str = "r";
pub const TAG_CHECKED: &str = "k";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxConfig {
    pub check_interval: Duration,
    pub timeout_ms: u64,
    pub check_max: u32,
}

impl Default for TxConfig {
    fn default() -> TxConfig {
        TxConfig {
            check_interval: DEFAULT_CHECK_INTERVAL,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            check_max: DEFAULT_CHECK_MAX,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Commit,
    Rollback,
}

impl Outcome {
    pub fn tag(self) -> &'static str {
        match self {
            Outcome::Commit => TAG_COMMIT,
            Outcome::Rollback => TAG_ROLLBACK,
        }
    }
}

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TxError {
    #[error("a transactional message needs a producer group")]
    NoGroup,
    #[error("a transactional message cannot go to the broker's internal topic {0}")]
    Internal(String),
    #[error("the record is not a half message ({0})")]
    NotHalf(&'static str),
}

/// Whether a sent message is a half message (the client's `TRAN_MSG` property).
pub fn is_half(props: &[(String, String)]) -> bool {
    props
        .iter()
        .any(|(k, v)| k == property::TRAN_MSG && v == "true")
}

fn set_property(msg: &mut Message, name: &str, value: String) {
    msg.properties.retain(|(k, _)| k != name);
    msg.properties.push((name.to_owned(), value));
}

/// Rewrites a sent half message to wait in the half topic: its real topic and queue and its
/// producer group go into properties.
pub fn to_half(msg: &mut Message, group: &str) -> Result<(), TxError> {
    if group.is_empty() {
        return Err(TxError::NoGroup);
    }
    if sys::is_internal_topic(&msg.topic) {
        return Err(TxError::Internal(msg.topic.clone()));
    }
    let real = std::mem::replace(&mut msg.topic, TRANS_HALF_TOPIC.to_owned());
    set_property(msg, property::REAL_TOPIC, real);
    set_property(msg, property::REAL_QID, msg.queue_id.to_string());
    set_property(msg, property::PGROUP, group.to_owned());
    msg.queue_id = 0;
    msg.sys_flag = (msg.sys_flag & !sys_flag::TRANSACTION_MASK) | sys_flag::TRANSACTION_PREPARED;
    Ok(())
}

/// What a stored half message says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HalfInfo<'a> {
    pub group: &'a str,
    pub real_topic: &'a str,
    pub real_queue: u32,
}

pub fn half_info<'a>(rec: &RecordView<'a>) -> Result<HalfInfo<'a>, TxError> {
    if rec.topic != TRANS_HALF_TOPIC {
        return Err(TxError::NotHalf("not in the half topic"));
    }
    Ok(HalfInfo {
        group: rec
            .property(property::PGROUP)
            .ok_or(TxError::NotHalf("no producer group"))?,
        real_topic: rec
            .property(property::REAL_TOPIC)
            .ok_or(TxError::NotHalf("no real topic"))?,
        real_queue: rec
            .property(property::REAL_QID)
            .and_then(|q| q.parse().ok())
            .ok_or(TxError::NotHalf("no real queue"))?,
    })
}

/// The message a committed half message becomes: its real topic and queue, its keys, tags,
/// unique key, body and user properties; marked committed, with the half's log offset.
pub fn committed(rec: &RecordView<'_>) -> Result<Message, TxError> {
    let info = half_info(rec)?;
    let mut m = rec.to_message();
    m.topic = info.real_topic.to_owned();
    m.queue_id = info.real_queue;
    // TRAN_MSG goes too (as RocketMQ's commit clears it): the stored message is no half.
    m.properties.retain(|(k, _)| {
        k != property::REAL_TOPIC
            && k != property::REAL_QID
            && k != property::PGROUP
            && k != property::TRAN_MSG
    });
    m.sys_flag = (m.sys_flag & !sys_flag::TRANSACTION_MASK) | sys_flag::TRANSACTION_COMMIT;
    m.prepared_tx_offset = rec.physical_offset;
    Ok(m)
}

/// What an op record says of a half message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    End(Outcome),
    Checked,
}

impl Op {
    fn tag(self) -> &'static str {
        match self {
            Op::End(o) => o.tag(),
            Op::Checked => TAG_CHECKED,
        }
    }
}

/// The op record of an outcome or a check-back.
pub fn op_message(half_queue_offset: u64, op: Op) -> Message {
    Message {
        topic: TRANS_OP_TOPIC.to_owned(),
        queue_id: 0,
        tags: op.tag().to_owned(),
        body: half_queue_offset.to_string().into_bytes().into(),
        ..Default::default()
    }
}

/// What an op record holds; `None` for a record that is not one.
pub fn parse_op(rec: &RecordView<'_>) -> Option<(u64, Op)> {
    let op = match rec.tags {
        TAG_COMMIT => Op::End(Outcome::Commit),
        TAG_ROLLBACK => Op::End(Outcome::Rollback),
        TAG_CHECKED => Op::Checked,
        _ => return None,
    };
    let off = std::str::from_utf8(rec.body).ok()?.parse().ok()?;
    Some((off, op))
}

/// A half message waiting for its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub phys: u64,
    pub group: String,
    /// Checked back at or after this time (ms).
    pub next_check_ms: u64,
    pub checks: u32,
    /// An END_TRANSACTION for it is being carried out.
    pub ending: bool,
    /// Set by [`TxState::prepared`]: no op record of this or a later half message lies below
    /// this op queue offset (a restart reads the op queue from the lowest pending one's).
    pub op_floor: u64,
    /// A committed copy of it may be stored already: it was found at a restart (a crash may
    /// have come between a commit's two appends), or a commit stored it and then failed to
    /// write the op record. Only then does an outcome look for the copy first.
    pub copy_possible: bool,
}

/// Where a half message stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    /// Its outcome is being written now.
    Ending,
    Ended(Outcome),
    /// Not known here: ended long ago (or never a half message of this shard).
    Old,
}

/// What a check round does with a half message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Due {
    /// Ask a producer of `group` (this is check number `n`).
    Check {
        half_queue_offset: u64,
        phys: u64,
        group: String,
        n: u32,
    },
    /// Checked `transactionCheckMax` times without an answer: roll it back (unless a
    /// committed copy is found, when `copy_possible`).
    Discard {
        half_queue_offset: u64,
        phys: u64,
        copy_possible: bool,
    },
}

/// A shard's transactions: the half messages without an outcome, the outcomes of those above
/// the progress, and where a restart must read the half and op queues from.
#[derive(Debug, Default)]
pub struct TxState {
    pending: BTreeMap<u64, Pending>,
    ended: BTreeMap<u64, Outcome>,
    next_half: u64,
    next_op: u64,
    /// A restart is reading the queues: every outcome read is kept until [`Self::settle`]
    /// (none may be forgotten before its half message is read).
    rebuilding: bool,
    /// Where the restart read the op queue from: the op floor of the half messages it finds
    /// pending (op records of later half messages that ended may lie anywhere after it).
    rebuild_op_floor: u64,
    /// Check-backs a restart read, by half queue offset, until their half message is read.
    rebuild_checks: BTreeMap<u64, u32>,
}

impl TxState {
    /// A half message stored at `half_queue_offset` (sent now, or found at a restart).
    pub fn prepared(&mut self, half_queue_offset: u64, mut p: Pending) {
        self.next_half = self.next_half.max(half_queue_offset + 1);
        // Live, the op record of this or any later half message is written after this call,
        // so at or past every op recorded so far; at a restart, past where the reads began.
        p.op_floor = if self.rebuilding {
            self.rebuild_op_floor
        } else {
            self.next_op
        };
        p.copy_possible |= self.rebuilding;
        if let Some(n) = self.rebuild_checks.remove(&half_queue_offset) {
            p.checks = p.checks.max(n);
        }
        if !self.ended.contains_key(&half_queue_offset) {
            self.pending.insert(half_queue_offset, p);
        }
    }

    /// An op record at `op_queue_offset` ended the half message at `half_queue_offset`.
    pub fn ended(&mut self, half_queue_offset: u64, op_queue_offset: u64, outcome: Outcome) {
        self.next_op = self.next_op.max(op_queue_offset + 1);
        self.pending.remove(&half_queue_offset);
        self.ended.entry(half_queue_offset).or_insert(outcome);
        self.prune();
    }

    /// An op record at `op_queue_offset` says the half message at `half_queue_offset` was
    /// checked back once more (live, [`Self::due`] counted it already).
    pub fn checked(&mut self, half_queue_offset: u64, op_queue_offset: u64) {
        self.next_op = self.next_op.max(op_queue_offset + 1);
        if self.rebuilding {
            *self.rebuild_checks.entry(half_queue_offset).or_default() += 1;
        }
    }

    pub fn status(&self, half_queue_offset: u64) -> Status {
        if let Some(p) = self.pending.get(&half_queue_offset) {
            return if p.ending {
                Status::Ending
            } else {
                Status::Pending
            };
        }
        match self.ended.get(&half_queue_offset) {
            Some(o) => Status::Ended(*o),
            None => Status::Old,
        }
    }

    /// Marks a pending half message as being ended; false if it is not pending (or is being
    /// ended by another request).
    pub fn begin_end(&mut self, half_queue_offset: u64) -> bool {
        match self.pending.get_mut(&half_queue_offset) {
            Some(p) if !p.ending => {
                p.ending = true;
                true
            }
            _ => false,
        }
    }

    /// The outcome could not be written: the half message waits again (`copy_stored`: its
    /// committed copy was stored before the failure).
    pub fn end_failed(&mut self, half_queue_offset: u64, copy_stored: bool) {
        if let Some(p) = self.pending.get_mut(&half_queue_offset) {
            p.ending = false;
            p.copy_possible |= copy_stored;
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The pending half message at a queue offset (its log offset and group).
    pub fn pending_at(&self, half_queue_offset: u64) -> Option<&Pending> {
        self.pending.get(&half_queue_offset)
    }

    /// The half messages due at `now_ms`, at most [`MAX_CHECKS_PER_ROUND`]; each checked
    /// one is due again a check interval later.
    pub fn due(&mut self, now_ms: u64, cfg: &TxConfig) -> Vec<Due> {
        let mut out = Vec::new();
        let (mut checks, mut discards) = (0, 0);
        for (off, p) in self.pending.iter_mut() {
            if checks >= MAX_CHECKS_PER_ROUND && discards >= MAX_DISCARDS_PER_ROUND {
                break;
            }
            if p.ending || p.next_check_ms > now_ms {
                continue;
            }
            if p.checks >= cfg.check_max {
                if discards < MAX_DISCARDS_PER_ROUND {
                    discards += 1;
                    out.push(Due::Discard {
                        half_queue_offset: *off,
                        phys: p.phys,
                        copy_possible: p.copy_possible,
                    });
                }
                continue;
            }
            if checks >= MAX_CHECKS_PER_ROUND {
                continue;
            }
            checks += 1;
            p.checks += 1;
            p.next_check_ms = now_ms.saturating_add(cfg.check_interval.as_millis() as u64);
            out.push(Due::Check {
                half_queue_offset: *off,
                phys: p.phys,
                group: p.group.clone(),
                n: p.checks,
            });
        }
        out
    }

    /// Every half message below this queue offset has its outcome: a restart reads the half
    /// queue from here.
    pub fn half_progress(&self) -> u64 {
        self.pending
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_half)
    }

    /// Op records below this op queue offset are of half messages below the half progress:
    /// a restart reads the op queue from here. The lowest pending half message's floor, so
    /// nothing per ended transaction is kept for it.
    pub fn op_progress(&self) -> u64 {
        self.pending
            .values()
            .next()
            .map_or(self.next_op, |p| p.op_floor)
    }

    /// Forgets the oldest outcomes past [`MAX_REMEMBERED_OUTCOMES`] (never while a restart
    /// reads: every outcome read must be known when its half message is read).
    fn prune(&mut self) {
        if !self.rebuilding {
            while self.ended.len() > MAX_REMEMBERED_OUTCOMES {
                self.ended.pop_first();
            }
        }
    }

    /// Where the restart reads start: the queues' offsets at the last start or checkpoint.
    pub fn starting_at(half: u64, op: u64) -> TxState {
        TxState {
            next_half: half,
            next_op: op,
            rebuilding: true,
            rebuild_op_floor: op,
            ..TxState::default()
        }
    }

    /// After a restart's reads: the remembered outcomes are capped again.
    pub fn settle(&mut self) {
        self.rebuilding = false;
        // Counts of half messages that had ended (or lie below the progress).
        self.rebuild_checks.clear();
        self.prune();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orbitmq_proto::record::{self, Placement};

    fn pending(phys: u64, at: u64) -> Pending {
        Pending {
            phys,
            group: "pg".into(),
            next_check_ms: at,
            checks: 0,
            ending: false,
            op_floor: 0,
            copy_possible: false,
        }
    }

    fn stored(m: &Message, phys: u64) -> Vec<u8> {
        let mut b = Vec::new();
        record::encode_into(
            m,
            Placement {
                queue_offset: 7,
                physical_offset: phys,
                store_timestamp: 1,
            },
            &mut b,
        );
        b
    }

    #[test]
    fn a_half_message_goes_back_to_its_queue_as_it_was_sent() {
        let sent = Message {
            topic: "Orders".into(),
            queue_id: 3,
            tags: "TagA".into(),
            keys: "k1".into(),
            properties: vec![
                ("UNIQ_KEY".into(), "U1".into()),
                (property::TRAN_MSG.into(), "true".into()),
                ("user".into(), "v".into()),
            ],
            body: "hello".into(),
            born_host: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        };
        assert!(is_half(&sent.properties));
        let mut half = sent.clone();
        to_half(&mut half, "pg").unwrap();
        assert_eq!((half.topic.as_str(), half.queue_id), (TRANS_HALF_TOPIC, 0));
        assert_eq!(half.sys_flag, sys_flag::TRANSACTION_PREPARED);
        let b = stored(&half, 4096);
        let v = record::decode(&b).unwrap();
        let info = half_info(&v).unwrap();
        assert_eq!(
            (info.group, info.real_topic, info.real_queue),
            ("pg", "Orders", 3)
        );
        let c = committed(&v).unwrap();
        assert_eq!((c.topic.as_str(), c.queue_id), ("Orders", 3));
        assert_eq!((c.tags.as_str(), c.keys.as_str()), ("TagA", "k1"));
        let mut want = sent.properties.clone();
        want.retain(|(k, _)| k != property::TRAN_MSG);
        assert_eq!(c.properties, want, "the sent properties, not TRAN_MSG");
        assert_eq!(c.body, sent.body);
        assert_eq!(c.sys_flag, sys_flag::TRANSACTION_COMMIT);
        assert_eq!(c.prepared_tx_offset, 4096);
        // Not a half message: refused.
        let plain = stored(&sent, 0);
        assert!(committed(&record::decode(&plain).unwrap()).is_err());
        assert_eq!(to_half(&mut sent.clone(), ""), Err(TxError::NoGroup));
        let mut internal = sent.clone();
        internal.topic = TRANS_OP_TOPIC.into();
        assert!(to_half(&mut internal, "pg").is_err());
    }

    #[test]
    fn op_records_round_trip() {
        for o in [
            Op::End(Outcome::Commit),
            Op::End(Outcome::Rollback),
            Op::Checked,
        ] {
            let m = op_message(42, o);
            let b = stored(&m, 0);
            assert_eq!(parse_op(&record::decode(&b).unwrap()), Some((42, o)));
        }
        let mut m = op_message(42, Op::End(Outcome::Commit));
        m.body = "x".into();
        assert_eq!(parse_op(&record::decode(&stored(&m, 0)).unwrap()), None);
    }

    #[test]
    fn outcomes_end_pending_half_messages_and_move_the_progress() {
        let mut s = TxState::starting_at(0, 0);
        s.settle(); // live from here
        for off in 0..4 {
            s.prepared(off, pending(off * 100, 1000));
        }
        assert_eq!(s.half_progress(), 0);
        assert!(s.begin_end(1));
        assert!(!s.begin_end(1), "one END at a time");
        assert_eq!(s.status(1), Status::Ending);
        s.ended(1, 0, Outcome::Commit);
        assert_eq!(s.status(1), Status::Ended(Outcome::Commit));
        assert_eq!(s.half_progress(), 0, "0 still waits");
        assert_eq!(s.op_progress(), 0, "op 0 is of a half above the progress");
        s.ended(0, 1, Outcome::Rollback);
        assert_eq!(s.half_progress(), 2);
        assert_eq!(
            s.status(1),
            Status::Ended(Outcome::Commit),
            "remembered past the progress"
        );
        assert_eq!(s.op_progress(), 0, "half 2 was sent before ops 0 and 1");
        // A half message sent after ops 0 and 1: their records are of earlier ones.
        s.prepared(4, pending(400, 1000));
        assert!(s.begin_end(2));
        s.end_failed(2, false);
        assert_eq!(s.status(2), Status::Pending);
        assert!(
            !s.pending_at(2).unwrap().copy_possible,
            "sent here, nothing stored"
        );
        assert!(s.begin_end(2));
        s.end_failed(2, true);
        assert!(
            s.pending_at(2).unwrap().copy_possible,
            "stored before the op failed"
        );
        s.ended(3, 2, Outcome::Commit);
        s.ended(2, 3, Outcome::Commit);
        assert_eq!((s.half_progress(), s.op_progress()), (4, 2));
        s.ended(4, 4, Outcome::Rollback);
        assert_eq!((s.half_progress(), s.op_progress(), s.pending()), (5, 5, 0));
    }

    #[test]
    fn due_half_messages_are_checked_then_discarded() {
        let cfg = TxConfig {
            check_interval: Duration::from_millis(50),
            timeout_ms: 100,
            check_max: 2,
        };
        let mut s = TxState::starting_at(0, 0);
        s.settle(); // live: sent here
        s.prepared(0, pending(0, 100));
        s.prepared(1, pending(10, 500));
        assert!(s.due(99, &cfg).is_empty(), "younger than the timeout");
        let d = s.due(100, &cfg);
        assert!(matches!(
            &d[..],
            [Due::Check {
                half_queue_offset: 0,
                n: 1,
                ..
            }]
        ));
        assert!(
            s.due(149, &cfg).is_empty(),
            "checked: due again an interval later"
        );
        assert!(matches!(&s.due(150, &cfg)[..], [Due::Check { n: 2, .. }]));
        assert_eq!(
            s.due(200, &cfg),
            vec![Due::Discard {
                phys: 0,
                copy_possible: false,
                half_queue_offset: 0
            }]
        );
        assert!(s.begin_end(0), "a discard is ended like a rollback");
        s.ended(0, 0, Outcome::Rollback);
        assert!(matches!(
            &s.due(500, &cfg)[..],
            [Due::Check {
                half_queue_offset: 1,
                ..
            }]
        ));
    }

    #[test]
    fn a_restart_reads_halves_and_ops_from_the_progress() {
        // Ops first (as a restart reads them): for 6 (at op 10) and for 3 (below the
        // progress); then halves 5..8 after the progress.
        let mut s = TxState::starting_at(5, 10);
        s.ended(6, 10, Outcome::Commit);
        s.ended(3, 11, Outcome::Commit);
        for off in 5..8 {
            s.prepared(off, pending(off, 0));
        }
        s.settle();
        assert_eq!(s.status(6), Status::Ended(Outcome::Commit));
        assert_eq!(s.status(5), Status::Pending);
        assert!(
            s.pending_at(5).unwrap().copy_possible,
            "found at a restart: a crash may have stored its copy"
        );
        assert_eq!(
            s.status(3),
            Status::Ended(Outcome::Commit),
            "an old op is an outcome too"
        );
        assert_eq!(s.status(2), Status::Old);
        assert_eq!((s.half_progress(), s.op_progress()), (5, 10));
        // Check-backs read before their half message count for it, once it is read; those
        // of half messages that ended are dropped.
        let mut s = TxState::starting_at(0, 0);
        for (op, half) in [(0, 1), (1, 1), (2, 2), (3, 3)] {
            s.checked(half, op);
        }
        s.ended(2, 4, Outcome::Rollback);
        for h in 1..=2 {
            s.prepared(h, pending(h, 0));
        }
        s.settle();
        assert_eq!(s.pending_at(1).unwrap().checks, 2);
        assert_eq!(s.status(2), Status::Ended(Outcome::Rollback));
        assert!(
            s.rebuild_checks.is_empty(),
            "nothing kept after the rebuild"
        );
        let cfg = TxConfig {
            check_max: 3,
            ..TxConfig::default()
        };
        let due = s.due(u64::MAX, &cfg);
        assert!(
            matches!(due[..], [Due::Check { n: 3, .. }]),
            "the third and last check: {due:?}"
        );
        // Live, a check-back record moves only the op progress (due() counted it).
        s.checked(1, 9);
        assert_eq!(s.pending_at(1).unwrap().checks, 3);
        // More outcomes than are remembered live: while rebuilding, none is forgotten, so
        // no ended half message is taken for pending.
        let mut s = TxState::starting_at(0, 0);
        let n = MAX_REMEMBERED_OUTCOMES as u64 + 10;
        for h in 1..=n {
            s.ended(h, h, Outcome::Commit);
        }
        for h in 0..=n {
            s.prepared(h, pending(h, 0));
        }
        s.settle();
        assert_eq!(s.pending(), 1, "only half 0 waits");
        assert_eq!(s.status(1), Status::Old, "capped again after the rebuild");
        assert_eq!(s.half_progress(), 0);
    }
}
