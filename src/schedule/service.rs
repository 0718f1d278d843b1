//! The scheduler of one shard (the I/O shell around [`super`]'s pure parts): one task per
//! delay level that moves due messages of its schedule queue to their real queue, one task
//! that feeds the timing wheel from the timer queue and delivers what it fires, and a
//! persister that writes their progress once the deliveries it covers are synced.
//!
//! A restart resumes from the persisted progress: nothing waiting is lost, and a message is
//! delivered twice only if its delivery was appended but not yet covered by the progress
//! file when the process died.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::timer::sleep;
use orbitmq_proto::record::{self, Message};
use orbitmq_proto::sys::{SCHEDULE_TOPIC, TIMER_TOPIC};
use tracing::{error, info, warn};

use super::wheel::{TimerRef, TimingWheel, Watermark};
use super::{deliverable, ScheduleConfig};
use crate::log::fsutil::{write_atomically, write_atomically_off_shard};
use crate::log::{ReadStatus, Store};
use crate::sync::Event;

/// The progress file in the shard's directory.
pub const PROGRESS_FILE: &str = "schedule-progress";
const PROGRESS_HEADER: &str = "orbitmq-schedule v1";
/// Largest progress file read back.
pub const MAX_PROGRESS_FILE_LEN: u64 = 64 * 1024;
/// Records a level task reads per look at its queue.
const LEVEL_BATCH: usize = 64;
/// Bytes a level task reads per look (at least one record).
const READ_BYTES: usize = 1 << 20;
/// ConsumeQueue entries the timer task reads per step while learning new timers.
const TIMER_SCAN_BATCH: usize = 4096;
/// How often the wheel fires (a timer is delivered within this of its time, plus the append).
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Longest a level task sleeps before looking at its queue again.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often a level task looks at its empty queue (the lateness this adds is at most this).
const EMPTY_POLL: Duration = Duration::from_millis(100);
/// Wait after a failed read or delivery before trying again.
const RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// How often progress is persisted.
const PERSIST_INTERVAL: Duration = Duration::from_secs(1);
/// How often the persister looks whether the log is synced far enough.
const SYNC_POLL: Duration = Duration::from_millis(10);
/// Longest the persister waits for a sync before skipping a round (a fenced store never syncs).
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// Timers delivered per tick at most (a backlog after downtime goes out over several ticks,
/// leaving the shard to its other work in between).
const DUE_PER_TICK: usize = 4096;
/// Messages (and bytes) one delivery append carries at most.
const DELIVERY_BATCH: usize = 256;
const DELIVERY_BATCH_BYTES: usize = 1 << 20;

/// What is persisted: the next schedule-queue offset per level, and the timer watermark.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Offset of the next undelivered message of level `i + 1`.
    pub levels: Vec<u64>,
    pub timer: Watermark,
}

impl Progress {
    /// Whether a recovery from `self` would differ from one from `last`. The timer's
    /// `fired_ms` counts only while a timer below `scanned` waits (`low < scanned`); with none,
    /// recovery re-arms every timer from `low`, whatever it says. So an idle shard does not
    /// rewrite (two fsyncs and a rename) its progress every second because the clock moved.
    pub fn differs_for_recovery(&self, last: &Progress) -> bool {
        let (now, then) = (self.timer, last.timer);
        self.levels != last.levels
            || (now.low, now.scanned) != (then.low, then.scanned)
            || (now.low < now.scanned && now.fired_ms != then.fired_ms)
    }

    pub fn encode(&self) -> String {
        let mut s = format!("{PROGRESS_HEADER}\n");
        for (i, o) in self.levels.iter().enumerate() {
            s.push_str(&format!("level {} {o}\n", i + 1));
        }
        let t = self.timer;
        s.push_str(&format!("timer {} {} {}\n", t.low, t.fired_ms, t.scanned));
        s
    }

    /// Parses a progress file; `levels` is the configured level count (levels beyond it are
    /// ignored: their queues are no longer served; missing ones start at 0).
    pub fn parse(text: &str, levels: usize) -> Result<Progress, String> {
        let mut lines = text.lines();
        if lines.next() != Some(PROGRESS_HEADER) {
            return Err(format!("missing header {PROGRESS_HEADER:?}"));
        }
        let mut p = Progress {
            levels: vec![0; levels],
            timer: Watermark::default(),
        };
        for (n, line) in lines.enumerate() {
            let bad = || format!("line {}: {line:?}", n + 2);
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            match f.as_slice() {
                [] => {}
                ["level", l, o] => {
                    let l = num(l)? as usize;
                    if l == 0 {
                        return Err(bad());
                    }
                    if let Some(slot) = p.levels.get_mut(l - 1) {
                        *slot = num(o)?;
                    }
                }
                ["timer", low, fired, scanned] => {
                    p.timer = Watermark {
                        low: num(low)?,
                        fired_ms: num(fired)?,
                        scanned: num(scanned)?,
                    }
                }
                _ => return Err(bad()),
            }
        }
        Ok(p)
    }
}

use orbitmq_proto::now_ms;

struct State {
    store: Store,
    cfg: ScheduleConfig,
    levels: RefCell<Vec<u64>>,
    wheel: RefCell<TimingWheel>,
    stopping: Cell<bool>,
    stop: Event,
    /// Log offset after the last delivery appended: progress covering it waits for a sync.
    appended_end: Cell<u64>,
}

impl State {
    /// Sleeps `d`, or less if the scheduler is stopping. False when stopping.
    async fn pause(&self, d: Duration) -> bool {
        if self.stopping.get() {
            return false;
        }
        let stop = self.stop.listen();
        future::or(async { sleep(d).await }, stop).await;
        !self.stopping.get()
    }

    fn snapshot(&self) -> (Progress, u64) {
        (
            Progress {
                levels: self.levels.borrow().clone(),
                timer: self.wheel.borrow().watermark(),
            },
            self.appended_end.get(),
        )
    }

    /// Appends due messages to their real queues in order, a run of one queue per append.
    /// Returns how many of `msgs` were stored (a prefix) and the first error.
    async fn deliver(&self, msgs: &[Message]) -> (usize, Option<String>) {
        let mut done = 0;
        while done < msgs.len() {
            let first = &msgs[done];
            let mut end = done + 1;
            let mut bytes = first.body.len();
            while end < msgs.len()
                && end - done < DELIVERY_BATCH
                && msgs[end].topic == first.topic
                && msgs[end].queue_id == first.queue_id
                && bytes + msgs[end].body.len() <= DELIVERY_BATCH_BYTES
            {
                bytes += msgs[end].body.len();
                end += 1;
            }
            match self.store.append_batch(&msgs[done..end]).await {
                Ok(r) => {
                    if let Some(last) = r.last() {
                        let e = last.physical_offset + last.size as u64;
                        self.appended_end.set(self.appended_end.get().max(e));
                    }
                    done = end;
                }
                Err(e) => return (done, Some(e.to_string())),
            }
        }
        (done, None)
    }
}

/// A running scheduler; [`Scheduler::stop`] ends it and persists its progress.
pub struct Scheduler {
    state: Rc<State>,
    path: PathBuf,
    tasks: Vec<glommio::task::JoinHandle<()>>,
}

/// Loads the progress file of a shard (a missing file: nothing delivered yet).
pub fn load_progress(dir: &Path, levels: usize) -> Result<Progress, String> {
    let path = dir.join(PROGRESS_FILE);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Progress {
                levels: vec![0; levels],
                timer: Watermark::default(),
            })
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if meta.len() > MAX_PROGRESS_FILE_LEN {
        return Err(format!(
            "{}: {} bytes is too large",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Progress::parse(&text, levels).map_err(|e| format!("{}: {e}", path.display()))
}

impl Scheduler {
    /// Recovers the progress and the timing wheel of the shard's store, then starts the
    /// level tasks, the timer task and the persister.
    pub async fn start(store: Store, cfg: ScheduleConfig) -> Result<Scheduler, String> {
        let dir = store.config().dir.clone();
        // Schedule queues beyond the configured levels (the table was shortened) still hold
        // messages: they are served with the top level's delay rather than stranded.
        let stored_levels = store
            .queues()
            .iter()
            .filter(|(t, ..)| t == SCHEDULE_TOPIC)
            .map(|(_, q, ..)| *q as usize + 1)
            .max()
            .unwrap_or(0);
        let levels_n = stored_levels.max(cfg.levels_ms.len());
        if stored_levels > cfg.levels_ms.len() {
            warn!(stored_levels, configured = cfg.levels_ms.len(),
                "schedule queues beyond messageDelayLevel hold messages: delivering them after the top level's delay");
        }
        let progress = load_progress(&dir, levels_n)?;
        // Offsets beyond a queue's end (a log cut at recovery) start again at its end.
        let levels: Vec<u64> = progress
            .levels
            .iter()
            .enumerate()
            .map(
                |(i, o)| match store.queue_bounds(SCHEDULE_TOPIC, i as u32) {
                    Some((min, max)) => (*o).clamp(min, max),
                    None => 0,
                },
            )
            .collect();
        let started = Instant::now();
        let mut wm = progress.timer;
        let (tmin, tmax) = store.queue_bounds(TIMER_TOPIC, 0).unwrap_or((0, 0));
        wm.low = wm.low.clamp(tmin, tmax);
        // Streamed into the wheel a batch at a time: only the pending timers stay in memory.
        let mut wheel = TimingWheel::recover(cfg.timer_max_delay_ms, now_ms(), wm, []);
        let mut at = wm.low;
        while at < tmax {
            let batch = store
                .queue_entries(TIMER_TOPIC, 0, at, TIMER_SCAN_BATCH)
                .await
                .map_err(|e| format!("reading the timer queue: {e}"))?;
            if batch.is_empty() {
                break;
            }
            let first = at;
            at += batch.len() as u64;
            wheel.rearm(
                wm,
                batch
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (first + i as u64, e.tag_hash)),
            );
            glommio::yield_if_needed().await;
        }
        if !wheel.is_empty() || levels.iter().any(|o| *o > 0) {
            info!(
                timers = wheel.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "scheduler recovered"
            );
        }
        let state = Rc::new(State {
            store,
            levels: RefCell::new(levels),
            wheel: RefCell::new(wheel),
            stopping: Cell::new(false),
            stop: Event::default(),
            appended_end: Cell::new(0),
            cfg,
        });
        let path = dir.join(PROGRESS_FILE);
        let mut tasks = Vec::new();
        for level in 1..=levels_n as u32 {
            tasks.push(glommio::spawn_local(level_task(state.clone(), level)).detach());
        }
        tasks.push(glommio::spawn_local(timer_task(state.clone(), at)).detach());
        tasks.push(glommio::spawn_local(persister(state.clone(), path.clone())).detach());
        Ok(Scheduler { state, path, tasks })
    }

    /// Stops the tasks (a delivery in progress finishes first). Returns the progress to
    /// persist once the store is closed (everything appended is synced then).
    pub async fn stop(self) -> PendingProgress {
        self.state.stopping.set(true);
        self.state.stop.notify();
        for t in self.tasks {
            t.await;
        }
        PendingProgress {
            progress: self.state.snapshot().0,
            path: self.path,
        }
    }
}

/// Progress to write after the store has synced and closed.
pub struct PendingProgress {
    progress: Progress,
    path: PathBuf,
}

impl PendingProgress {
    pub fn persist(self) -> std::io::Result<()> {
        write_atomically(&self.path, self.progress.encode().as_bytes())
    }
}

/// Moves due messages of one level's schedule queue to their real queues, in order.
async fn level_task(st: Rc<State>, level: u32) {
    let queue = level - 1;
    let delay_ms = st.cfg.delay_ms(level);
    loop {
        if st.stopping.get() {
            return;
        }
        let offset = st.levels.borrow()[queue as usize];
        let r = match st
            .store
            .read(SCHEDULE_TOPIC, queue, offset, LEVEL_BATCH, READ_BYTES, None)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(level, error = %e, "reading a schedule queue failed; retrying");
                if !st.pause(RETRY_BACKOFF).await {
                    return;
                }
                continue;
            }
        };
        match r.status {
            ReadStatus::Found => {}
            ReadStatus::NoNewMessage | ReadStatus::NoSuchQueue => {
                // Look again shortly: a message arriving now is due a whole delay later, and
                // waking on every append of a busy shard would cost more than this poll.
                if !st.pause(EMPTY_POLL).await {
                    return;
                }
                continue;
            }
            ReadStatus::OffsetTooSmall | ReadStatus::OffsetOverflow => {
                error!(level, offset, next = r.next_offset,
                    "schedule queue offset out of range (retention removed waiting messages?); moving on");
                st.levels.borrow_mut()[queue as usize] = r.next_offset;
                continue;
            }
        }
        let now = now_ms();
        let mut msgs = Vec::new();
        // Record index after each message in `msgs`: the offset moves past a delivered one.
        let mut ends = Vec::new();
        let mut next_due = None;
        let mut skipped_to = None;
        for (i, rec) in r.records.iter().enumerate() {
            let v = match record::decode(rec) {
                Ok(v) => v,
                Err(e) => {
                    error!(level, offset = offset + i as u64, error = %e, "unreadable waiting message skipped");
                    skipped_to = Some(i + 1);
                    continue;
                }
            };
            let due = v.store_timestamp.saturating_add(delay_ms);
            if due > now {
                next_due = Some(due);
                break;
            }
            match deliverable(&v, delay_ms) {
                Ok(m) => {
                    msgs.push(m);
                    ends.push(i + 1);
                }
                Err(e) => {
                    error!(level, offset = offset + i as u64, error = %e, "waiting message cannot be delivered; skipped");
                    skipped_to = Some(i + 1);
                }
            }
        }
        let (n, err) = st.deliver(&msgs).await;
        // Move past what was stored, and past skipped records up to the first failure.
        let mut moved = if n > 0 { ends[n - 1] } else { 0 };
        if err.is_none() {
            moved = moved.max(skipped_to.unwrap_or(0));
        }
        st.levels.borrow_mut()[queue as usize] = offset + moved as u64;
        if let Some(e) = err {
            warn!(level, error = %e, "delivering delayed messages failed; retrying");
            if !st.pause(RETRY_BACKOFF).await {
                return;
            }
            continue;
        }
        if let Some(due) = next_due {
            let wait = Duration::from_millis(due.saturating_sub(now_ms())).min(IDLE_WAIT);
            if !st.pause(wait).await {
                return;
            }
        }
    }
}

/// Feeds the wheel with timers appended from `scan` on, and delivers what it fires.
async fn timer_task(st: Rc<State>, mut scan: u64) {
    loop {
        if st.stopping.get() {
            return;
        }
        // Learn the timers appended since the last tick.
        loop {
            if let Some((min, _)) = st.store.queue_bounds(TIMER_TOPIC, 0) {
                scan = scan.max(min);
            }
            let batch = match st
                .store
                .queue_entries(TIMER_TOPIC, 0, scan, TIMER_SCAN_BATCH)
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "reading the timer queue failed; retrying");
                    break;
                }
            };
            if batch.is_empty() {
                break;
            }
            let mut w = st.wheel.borrow_mut();
            for e in batch {
                w.add(TimerRef {
                    deliver_ms: e.tag_hash,
                    cq_offset: scan,
                });
                scan += 1;
            }
        }
        let due = st.wheel.borrow_mut().due(now_ms(), DUE_PER_TICK);
        for chunk in due.chunks(DELIVERY_BATCH) {
            let mut msgs = Vec::with_capacity(chunk.len());
            let mut refs = Vec::with_capacity(chunk.len());
            let mut lost = Vec::new();
            let mut failed = Vec::new();
            for t in chunk {
                match read_timer(&st.store, t).await {
                    Ok(Some(m)) => {
                        msgs.push(m);
                        refs.push(*t);
                    }
                    Ok(None) => lost.push(*t),
                    Err(e) => {
                        warn!(offset = t.cq_offset, error = %e, "reading a timer message failed; retrying");
                        failed.push(*t);
                    }
                }
            }
            let (n, err) = st.deliver(&msgs).await;
            let mut w = st.wheel.borrow_mut();
            w.delivered(&refs[..n]);
            w.delivered(&lost);
            w.retry(&refs[n..]);
            w.retry(&failed);
            if let Some(e) = err {
                warn!(error = %e, "delivering timer messages failed; retrying");
            }
        }
        if !st.pause(TIMER_TICK).await {
            return;
        }
    }
}

/// The message a fired timer delivers; `None` when it can no longer be delivered (removed
/// by retention, or malformed), which is logged.
async fn read_timer(store: &Store, t: &TimerRef) -> Result<Option<Message>, String> {
    let r = store
        .read(TIMER_TOPIC, 0, t.cq_offset, 1, READ_BYTES, None)
        .await
        .map_err(|e| e.to_string())?;
    let Some(rec) = r.records.first().filter(|_| r.status == ReadStatus::Found) else {
        error!(offset = t.cq_offset, status = ?r.status, "timer message is gone (retention?); not delivered");
        return Ok(None);
    };
    let v = match record::decode(rec) {
        Ok(v) => v,
        Err(e) => {
            // Retrying cannot help and would pin the watermark: skip it, loudly.
            error!(offset = t.cq_offset, error = %e, "timer message is unreadable; skipped");
            return Ok(None);
        }
    };
    match deliverable(&v, t.deliver_ms.saturating_sub(v.store_timestamp)) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            error!(offset = t.cq_offset, error = %e, "timer message cannot be delivered; skipped");
            Ok(None)
        }
    }
}

/// Persists the progress every [`PERSIST_INTERVAL`], once the log is synced past every
/// delivery the progress covers (else a power loss could lose a delivery it says is done).
async fn persister(st: Rc<State>, path: PathBuf) {
    let mut last = None;
    while st.pause(PERSIST_INTERVAL).await {
        let (p, need) = st.snapshot();
        if last.as_ref().is_some_and(|l| !p.differs_for_recovery(l)) {
            continue;
        }
        let waited = Instant::now();
        while st.store.stats().synced_offset < need {
            if waited.elapsed() > SYNC_WAIT || !st.pause(SYNC_POLL).await {
                break;
            }
        }
        if st.store.stats().synced_offset < need {
            continue;
        }
        let bytes = p.encode().into_bytes();
        if let Err(e) = write_atomically_off_shard(path.clone(), bytes).await {
            warn!(path = %path.display(), error = %e, "persisting scheduler progress failed");
            continue;
        }
        // Retention keeps what the persisted progress still calls waiting (not the newer
        // in-memory progress: its deliveries could be lost to a crash with the originals).
        hold_waiting(&st.store, &p).await;
        last = Some(p);
    }
}

/// Tells retention to keep the log from the oldest message still waiting (the next of each
/// level, the lowest pending timer), so a delay longer than `fileReservedTime` loses nothing.
async fn hold_waiting(store: &Store, p: &Progress) {
    let mut hold = u64::MAX;
    let waiting = p
        .levels
        .iter()
        .enumerate()
        .map(|(i, o)| (SCHEDULE_TOPIC, i as u32, *o))
        .chain(std::iter::once((TIMER_TOPIC, 0, p.timer.low)));
    for (topic, queue, offset) in waiting {
        match store.queue_entries(topic, queue, offset, 1).await {
            Ok(e) => {
                if let Some(e) = e.first() {
                    hold = hold.min(e.phys);
                }
            }
            // Unknown: keep the previous hold rather than release it.
            Err(_) => return,
        }
    }
    store.hold_from(hold);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_timer_watermark_is_not_rewritten_as_the_clock_moves() {
        let at = |low, fired_ms, scanned| Progress {
            levels: vec![4, 0],
            timer: Watermark {
                low,
                fired_ms,
                scanned,
            },
        };
        // Nothing waits below `scanned`: fired_ms is not read by a recovery.
        assert!(!at(10, 2_000, 10).differs_for_recovery(&at(10, 1_000, 10)));
        // ... as recovering from either shows: the same timers come back, due alike.
        let entries = [(10, 1_500), (11, 5_000)];
        let due = |fired_ms| {
            let wm = at(10, fired_ms, 10).timer;
            let mut w = TimingWheel::recover(60_000, 3_000, wm, entries);
            (w.len(), w.due(10_000, 16))
        };
        assert_eq!(due(1_000), due(2_000));
        assert_eq!(due(1_000).0, 2);
        // A timer waits: fired_ms decides what comes back, so it is persisted.
        assert!(at(8, 2_000, 10).differs_for_recovery(&at(8, 1_000, 10)));
        // New timers seen, one delivered, or a level moved on: persisted.
        assert!(at(10, 1_000, 12).differs_for_recovery(&at(10, 1_000, 10)));
        assert!(at(11, 1_000, 12).differs_for_recovery(&at(10, 1_000, 12)));
        let mut moved = at(10, 1_000, 10);
        moved.levels[1] = 1;
        assert!(moved.differs_for_recovery(&at(10, 1_000, 10)));
    }

    #[test]
    fn progress_round_trips_and_rejects_garbage() {
        let p = Progress {
            levels: vec![3, 0, 7],
            timer: Watermark {
                low: 5,
                fired_ms: 1_700_000_000_000,
                scanned: 9,
            },
        };
        assert_eq!(Progress::parse(&p.encode(), 3), Ok(p.clone()));
        // Fewer levels configured now: the extra is ignored; more: they start at 0.
        assert_eq!(Progress::parse(&p.encode(), 2).unwrap().levels, vec![3, 0]);
        assert_eq!(
            Progress::parse(&p.encode(), 4).unwrap().levels,
            vec![3, 0, 7, 0]
        );
        assert!(Progress::parse("level 1 2\n", 3).is_err());
        assert!(Progress::parse("orbitmq-schedule v1\nlevel 0 2\n", 3).is_err());
        assert!(Progress::parse("orbitmq-schedule v1\nlevel 1 x\n", 3).is_err());
        assert!(Progress::parse("orbitmq-schedule v1\ntimer 1 2\n", 3).is_err());
    }
}
