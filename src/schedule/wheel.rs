//! The timer index of one shard: a timing wheel of one-second slots over the timer topic's
//! ConsumeQueue. A pending timer costs 16 bytes here (its queue offset and delivery time; the
//! message stays in the log) and a tick touches only the slots whose time has come, so a
//! million pending timers take about 16 MB and no scan.
//!
//! Progress is a pair that survives a crash ([`Watermark`]): every timer below queue offset
//! `low` is delivered, and so is every timer due at or before `fired_ms`. Recovery re-reads the
//! ConsumeQueue from `low` and re-arms the entries due after `fired_ms`. Pure: no I/O.

use std::collections::{HashMap, VecDeque};

/// Width of a slot.
pub const SLOT_MS: u64 = 1000;
/// Slots beyond the longest delay, so a timer added late in a slot still lands ahead.
const SPARE_SLOTS: u64 = 2;
/// Bits per word of the pending-offset set.
const WORD_BITS: u64 = 64;

/// One armed timer: where it is in the timer queue and when it is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerRef {
    pub deliver_ms: u64,
    pub cq_offset: u64,
}

/// What a shard persists of its timers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watermark {
    /// Every timer at a queue offset below this is delivered.
    pub low: u64,
    /// Every timer below `scanned` due at or before this time (ms) is delivered.
    pub fired_ms: u64,
    /// Queue offsets from here on had not reached the wheel: all of them are pending (a
    /// timer appended just before a crash may be due before `fired_ms`).
    pub scanned: u64,
}

/// Queue offsets of the timers not yet delivered, as a bit set from a moving base.
#[derive(Debug, Default)]
struct PendingSet {
    /// Offset of bit 0 of `words[0]`; a multiple of [`WORD_BITS`].
    base: u64,
    words: VecDeque<u64>,
    /// Everything below this is known: pending bits or delivered.
    end: u64,
}

impl PendingSet {
    fn insert(&mut self, off: u64) {
        if self.words.is_empty() && off >= self.end {
            self.base = off - off % WORD_BITS;
        }
        if off < self.base {
            // Only possible when recovery re-arms below a trimmed base: grow to the front.
            let new_base = off - off % WORD_BITS;
            for _ in 0..(self.base - new_base) / WORD_BITS {
                self.words.push_front(0);
            }
            self.base = new_base;
        }
        let idx = ((off - self.base) / WORD_BITS) as usize;
        while self.words.len() <= idx {
            self.words.push_back(0);
        }
        self.words[idx] |= 1 << ((off - self.base) % WORD_BITS);
        self.end = self.end.max(off + 1);
    }

    fn remove(&mut self, off: u64) {
        if off < self.base {
            return;
        }
        let idx = ((off - self.base) / WORD_BITS) as usize;
        if let Some(w) = self.words.get_mut(idx) {
            *w &= !(1 << ((off - self.base) % WORD_BITS));
        }
        while self.words.front() == Some(&0) {
            self.words.pop_front();
            self.base += WORD_BITS;
        }
    }

    /// The lowest pending offset, or `end` when none is pending.
    fn low(&self) -> u64 {
        match self.words.front() {
            Some(w) => self.base + w.trailing_zeros() as u64,
            None => self.end,
        }
    }
}

/// The wheel.
#[derive(Debug)]
pub struct TimingWheel {
    slots: Vec<Vec<TimerRef>>,
    /// Absolute slot (`time / SLOT_MS`) that fires next; every earlier slot has fired.
    cursor: u64,
    /// Every timer due at or before this time has been handed out (the last `now` of
    /// [`TimingWheel::due`]).
    fired_upto: u64,
    /// Timers whose slot had already fired when they were added, due at once.
    late: Vec<TimerRef>,
    /// Timers handed out by [`TimingWheel::due`] and not yet [`TimingWheel::delivered`],
    /// by queue offset.
    in_flight: HashMap<u64, TimerRef>,
    pending: PendingSet,
    len: usize,
}

impl TimingWheel {
    /// A wheel for delays up to `max_delay_ms`, starting at `now_ms`, whose timers below
    /// `start_offset` are all delivered.
    pub fn new(max_delay_ms: u64, now_ms: u64, start_offset: u64) -> TimingWheel {
        let n = max_delay_ms.div_ceil(SLOT_MS) + SPARE_SLOTS;
        TimingWheel {
            slots: (0..n).map(|_| Vec::new()).collect(),
            cursor: now_ms / SLOT_MS,
            fired_upto: now_ms.saturating_sub(1),
            late: Vec::new(),
            in_flight: HashMap::new(),
            pending: PendingSet {
                base: start_offset - start_offset % WORD_BITS,
                words: VecDeque::new(),
                end: start_offset,
            },
            len: 0,
        }
    }

    /// Timers armed and not yet delivered (handed-out ones included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Arms a timer. One due beyond the wheel's span is clamped to its last slot (the
    /// broker refuses such delays on the way in; this only guards a changed setting).
    pub fn add(&mut self, t: TimerRef) {
        self.pending.insert(t.cq_offset);
        self.len += 1;
        let slot = t.deliver_ms / SLOT_MS;
        if slot < self.cursor || t.deliver_ms <= self.fired_upto {
            self.late.push(t);
            return;
        }
        let n = self.slots.len() as u64;
        let slot = slot.min(self.cursor + n - 1);
        self.slots[(slot % n) as usize].push(t);
    }

    /// Takes the timers due at `now_ms`, by delivery time then queue offset, at most `max`
    /// (the rest stay due for the next call). They count as in flight until
    /// [`TimingWheel::delivered`].
    pub fn due(&mut self, now_ms: u64, max: usize) -> Vec<TimerRef> {
        let mut out = std::mem::take(&mut self.late);
        let n = self.slots.len() as u64;
        let now_slot = now_ms / SLOT_MS;
        // Slots wholly in the past fire; never walk more than one turn, nor gather much more
        // than asked for.
        let last_full = now_slot.min(self.cursor + n);
        let mut early = Vec::new();
        while self.cursor < last_full && out.len() < max {
            for t in self.slots[(self.cursor % n) as usize].drain(..) {
                // Only a timer clamped into the wheel's span (a lowered timerMaxDelaySec)
                // can sit in a slot before its time: it goes back in.
                if t.deliver_ms <= now_ms {
                    out.push(t);
                } else {
                    early.push(t);
                }
            }
            self.cursor += 1;
        }
        if self.cursor == now_slot && out.len() < max {
            let slot = &mut self.slots[(now_slot % n) as usize];
            let (ready, wait): (Vec<_>, Vec<_>) =
                slot.drain(..).partition(|t| t.deliver_ms <= now_ms);
            *slot = wait;
            out.extend(ready);
        }
        let fired = if self.cursor >= now_slot {
            now_ms
        } else {
            // Stopped early: only the slots before the cursor have fired.
            (self.cursor * SLOT_MS).saturating_sub(1)
        };
        self.fired_upto = self.fired_upto.max(fired);
        out.sort_unstable();
        if out.len() > max {
            self.late.extend(out.drain(max..));
        }
        for t in early {
            self.len -= 1;
            self.add(t);
        }
        for t in &out {
            self.in_flight.insert(t.cq_offset, *t);
        }
        out
    }

    /// Marks timers as delivered durably: they leave the watermark's reckoning.
    pub fn delivered(&mut self, done: &[TimerRef]) {
        for t in done {
            if self.in_flight.remove(&t.cq_offset).is_some() {
                self.pending.remove(t.cq_offset);
                self.len -= 1;
            }
        }
    }

    /// Hands in-flight timers back (their delivery failed): they are due again at once.
    pub fn retry(&mut self, failed: &[TimerRef]) {
        for t in failed {
            if let Some(t) = self.in_flight.remove(&t.cq_offset) {
                self.late.push(t);
            }
        }
    }

    /// What may be persisted now: nothing pending lies below `low`, and nothing pending is
    /// due at or before `fired_ms`.
    pub fn watermark(&self) -> Watermark {
        let undelivered = self.late.iter().chain(self.in_flight.values());
        let fired_ms = undelivered
            .map(|t| t.deliver_ms.saturating_sub(1))
            .fold(self.fired_upto, u64::min);
        Watermark {
            low: self.pending.low(),
            fired_ms,
            scanned: self.pending.end,
        }
    }

    /// Queue offset after the last timer the wheel has seen.
    pub fn scanned(&self) -> u64 {
        self.pending.end
    }

    /// Rebuilds the wheel from the persisted watermark and the timer queue's entries from
    /// `wm.low` (queue offset, delivery time), in queue order.
    pub fn recover(
        max_delay_ms: u64,
        now_ms: u64,
        wm: Watermark,
        entries: impl IntoIterator<Item = (u64, u64)>,
    ) -> TimingWheel {
        // Timers due between the watermark and now are due at once (added as late).
        let mut w = TimingWheel::new(max_delay_ms, now_ms, wm.low);
        w.fired_upto = wm.fired_ms.min(w.fired_upto);
        w.rearm(wm, entries);
        w
    }

    /// Recovery, a part at a time: re-arms those of the timer queue's entries (queue offset,
    /// delivery time, in queue order) that the watermark does not count as delivered.
    pub fn rearm(&mut self, wm: Watermark, entries: impl IntoIterator<Item = (u64, u64)>) {
        for (cq_offset, deliver_ms) in entries {
            self.pending.end = self.pending.end.max(cq_offset + 1);
            if cq_offset >= wm.low && (cq_offset >= wm.scanned || deliver_ms > wm.fired_ms) {
                self.add(TimerRef {
                    deliver_ms,
                    cq_offset,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    fn t(deliver_ms: u64, cq_offset: u64) -> TimerRef {
        TimerRef {
            deliver_ms,
            cq_offset,
        }
    }

    #[test]
    fn timers_fire_in_time_order_and_not_before_due() {
        let mut w = TimingWheel::new(DAY, 10_000, 0);
        w.add(t(12_500, 0));
        w.add(t(11_200, 1));
        w.add(t(11_700, 2));
        w.add(t(10_000 + DAY, 3));
        assert!(w.due(11_100, usize::MAX).is_empty());
        assert_eq!(w.due(11_500, usize::MAX), vec![t(11_200, 1)]);
        assert_eq!(w.due(13_000, usize::MAX), vec![t(11_700, 2), t(12_500, 0)]);
        assert!(w.due(10_000 + DAY - 1, usize::MAX).is_empty());
        assert_eq!(w.due(10_000 + DAY, usize::MAX), vec![t(10_000 + DAY, 3)]);
        assert_eq!(w.len(), 4, "handed out, not yet delivered");
    }

    #[test]
    fn a_timer_added_after_its_time_fired_is_due_at_once_and_holds_the_watermark() {
        let mut w = TimingWheel::new(DAY, 10_000, 0);
        assert!(w.due(20_500, usize::MAX).is_empty());
        w.add(t(15_000, 0));
        // Same slot as the last tick, but its time has passed.
        w.add(t(20_400, 1));
        assert_eq!(w.watermark().fired_ms, 14_999);
        assert_eq!(w.due(20_501, usize::MAX), vec![t(15_000, 0), t(20_400, 1)]);
    }

    #[test]
    fn the_watermark_never_passes_an_undelivered_timer() {
        let mut w = TimingWheel::new(DAY, 0, 0);
        for i in 0..10 {
            w.add(t(1000 * (i + 1), i));
        }
        let due = w.due(5_500, usize::MAX);
        assert_eq!(due.len(), 5);
        // Delivered out of order: 0..2 and 4; 3 fails.
        w.delivered(&due[..3]);
        w.delivered(&due[4..]);
        w.retry(&due[3..4]);
        let wm = w.watermark();
        assert_eq!((wm.low, wm.fired_ms, wm.scanned), (3, 3_999, 10));
        let again = w.due(5_600, usize::MAX);
        assert_eq!(again, vec![t(4000, 3)]);
        w.delivered(&again);
        assert_eq!(
            w.watermark(),
            Watermark {
                low: 5,
                fired_ms: 5_600,
                scanned: 10
            }
        );
        assert_eq!(w.len(), 5);
    }

    #[test]
    fn recovery_rearms_exactly_the_undelivered() {
        let mut w = TimingWheel::new(DAY, 0, 0);
        // Offsets in arrival order, delivery times not.
        let times = [9_000, 2_000, 5_000, 1_000, 7_000];
        for (i, d) in times.iter().enumerate() {
            w.add(t(*d, i as u64));
        }
        let due = w.due(5_000, usize::MAX);
        assert_eq!(due, vec![t(1_000, 3), t(2_000, 1), t(5_000, 2)]);
        w.delivered(&due);
        let wm = w.watermark();
        assert_eq!(
            wm,
            Watermark {
                low: 0,
                fired_ms: 5_000,
                scanned: 5
            }
        );
        // 1, 2 and 3 were delivered: recovery re-arms only 0 and 4.
        let entries = times.iter().enumerate().map(|(i, d)| (i as u64, *d));
        let mut r = TimingWheel::recover(DAY, 60_000, wm, entries);
        let all = r.due(60_000, usize::MAX);
        assert_eq!(all, vec![t(7_000, 4), t(9_000, 0)]);
        r.delivered(&all);
        assert_eq!(r.watermark().low, 5);
        assert!(r.is_empty());
    }

    #[test]
    fn recovery_rearms_timers_the_wheel_had_not_seen_even_if_due_long_ago() {
        let wm = Watermark {
            low: 2,
            fired_ms: 50_000,
            scanned: 3,
        };
        // Offset 1 is below low (delivered); 2 was seen and fired; 3 was appended late, due
        // before fired_ms, never seen: it must come back.
        let entries = [(1, 1_000), (2, 40_000), (3, 45_000), (4, 70_000)];
        let mut r = TimingWheel::recover(DAY, 80_000, wm, entries);
        assert_eq!(r.due(80_000, usize::MAX), vec![t(45_000, 3), t(70_000, 4)]);
        // A fresh shard (nothing persisted) starts at the current time, not at 0.
        let mut fresh = TimingWheel::recover(DAY, 1_800_000_000_000, Watermark::default(), []);
        fresh.add(t(1_800_000_000_500, 0));
        assert!(fresh.due(1_800_000_000_400, usize::MAX).is_empty());
        assert_eq!(
            fresh.due(1_800_000_000_500, usize::MAX),
            vec![t(1_800_000_000_500, 0)]
        );
    }

    #[test]
    fn due_hands_out_at_most_max_and_keeps_the_rest_due() {
        let mut w = TimingWheel::new(DAY, 0, 0);
        for i in 0..10 {
            w.add(t(1000 + i, i));
        }
        let first = w.due(5_000, 4);
        assert_eq!(first, (0..4).map(|i| t(1000 + i, i)).collect::<Vec<_>>());
        assert_eq!(w.watermark().fired_ms, 999, "handed out is not delivered");
        w.delivered(&first);
        assert_eq!(w.watermark().fired_ms, 1003, "the rest are not fired yet");
        let rest = w.due(5_000, 100);
        assert_eq!(rest, (4..10).map(|i| t(1000 + i, i)).collect::<Vec<_>>());
    }

    #[test]
    fn a_timer_beyond_a_shortened_span_waits_for_its_time() {
        // Armed under a 3-day span, recovered under a 60 s one.
        let wm = Watermark::default();
        let mut w = TimingWheel::recover(60_000, 0, wm, [(0, 2 * DAY)]);
        for now in (0..=3 * 60_000).step_by(500) {
            assert!(w.due(now, usize::MAX).is_empty(), "fired early at {now}");
        }
        assert_eq!(w.len(), 1);
        assert_eq!(w.due(2 * DAY, usize::MAX), vec![t(2 * DAY, 0)]);
    }

    #[test]
    fn a_million_timers_are_compact() {
        let mut w = TimingWheel::new(3 * DAY, 0, 0);
        for i in 0..1_000_000u64 {
            w.add(t((i * 7919) % (3 * DAY), i));
        }
        assert_eq!(w.len(), 1_000_000);
        let slots_bytes: usize = w.slots.iter().map(|s| s.capacity() * 16 + 24).sum();
        assert!(
            slots_bytes < 40 << 20,
            "{slots_bytes} bytes for a million timers"
        );
        let first = w.due(10_000, usize::MAX);
        assert!(first.iter().all(|x| x.deliver_ms <= 10_000));
        let expect = (0..1_000_000u64)
            .filter(|i| (i * 7919) % (3 * DAY) <= 10_000)
            .count();
        assert_eq!(first.len(), expect);
    }
}
