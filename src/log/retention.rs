//! Retention planning with RocketMQ's semantics (`deleteWhen`, `fileReservedTime`,
//! `diskMaxUsedSpaceRatio`), as pure functions: the caller lists segments, measures the disk
//! and the clock, and deletes what the plan returns.

use thiserror::Error;

/// Hours in a day: `deleteWhen` hours are `0..HOURS_PER_DAY`.
pub const HOURS_PER_DAY: u8 = 24;
/// Most not-yet-expired segments one plan deletes under disk pressure (RocketMQ's
/// `DELETE_FILES_BATCH_MAX`), so one run frees space without wiping the log; the next run
/// re-measures the disk and continues if still needed.
pub const MAX_FORCED_DELETES_PER_RUN: usize = 10;
/// RocketMQ's default `deleteWhen`: 04 in the morning.
pub const DEFAULT_DELETE_WHEN_HOUR: u8 = 4;
/// RocketMQ's code default for `fileReservedTime` (its sample conf says 48).
pub const DEFAULT_FILE_RESERVED_HOURS: u64 = 72;
/// RocketMQ's default `diskMaxUsedSpaceRatio` (75%): expired segments go at any hour.
pub const DEFAULT_DISK_MAX_USED_RATIO: f64 = 0.75;
/// RocketMQ's `diskSpaceCleanForciblyRatio` (85%): past it, unexpired segments go too.
pub const DEFAULT_DISK_FORCE_CLEAN_RATIO: f64 = 0.85;
/// Milliseconds in an hour, to compare `fileReservedTime` with file times.
const MS_PER_HOUR: u64 = 60 * 60 * 1000;

/// Why a `deleteWhen` value is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RetentionError {
    #[error("deleteWhen is empty; expected hours of the day such as \"04\" or \"04;16\"")]
    Empty,
    #[error(
        "deleteWhen {input:?}: {part:?} is not an hour; expected hours 00..23 separated by ';'"
    )]
    NotAnHour { input: String, part: String },
    #[error("deleteWhen {input:?}: hour {part:?} is out of range 00..23")]
    HourOutOfRange { input: String, part: String },
}

/// Parses RocketMQ's `deleteWhen`: one hour of the day ("04") or several separated by ';'
/// ("04;16"). Returns the hours sorted, without duplicates.
pub fn parse_delete_when(s: &str) -> Result<Vec<u8>, RetentionError> {
    if s.trim().is_empty() {
        return Err(RetentionError::Empty);
    }
    let mut hours = Vec::new();
    for raw in s.split(';') {
        let part = raw.trim();
        // Digits only: "+4" or "4h" would be accepted by a bare parse and hide a typo.
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RetentionError::NotAnHour {
                input: s.to_owned(),
                part: part.to_owned(),
            });
        }
        let hour = part
            .parse::<u8>()
            .ok()
            .filter(|h| *h < HOURS_PER_DAY)
            .ok_or_else(|| RetentionError::HourOutOfRange {
                input: s.to_owned(),
                part: part.to_owned(),
            })?;
        hours.push(hour);
    }
    hours.sort_unstable();
    hours.dedup();
    Ok(hours)
}

/// When and how much of the CommitLog to delete.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionPolicy {
    /// Local hours of the day at which expired segments are deleted (`deleteWhen`).
    pub delete_when_hours: Vec<u8>,
    /// Age after its last write at which a segment expires (`fileReservedTime`).
    pub file_reserved_hours: u64,
    /// Disk usage at which deletion of expired segments runs at any hour
    /// (`diskMaxUsedSpaceRatio`, 0..1).
    pub disk_max_used_ratio: f64,
    /// Disk usage at which the oldest segments are deleted even before they expire
    /// (`diskSpaceCleanForciblyRatio`, 0..1).
    pub disk_force_clean_ratio: f64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            delete_when_hours: vec![DEFAULT_DELETE_WHEN_HOUR],
            file_reserved_hours: DEFAULT_FILE_RESERVED_HOURS,
            disk_max_used_ratio: DEFAULT_DISK_MAX_USED_RATIO,
            disk_force_clean_ratio: DEFAULT_DISK_FORCE_CLEAN_RATIO,
        }
    }
}

/// One CommitLog segment as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// CommitLog offset of the segment's first byte (its file name).
    pub base: u64,
    /// Bytes in the segment file.
    pub len: u64,
    /// Time of the segment's last write, ms since the Unix epoch.
    pub last_modified_ms: u64,
}

/// Returns the bases of the segments to delete now, oldest first.
///
/// `segments` are sorted by base and the last one is the active segment; `local_hour` is the
/// local hour of day (0..23) of `now_ms`; `disk_used_ratio` is the measured usage (0..1) of the
/// disk holding the segments.
pub fn plan(
    segments: &[SegmentInfo],
    now_ms: u64,
    local_hour: u8,
    disk_used_ratio: f64,
    policy: &RetentionPolicy,
) -> Vec<u64> {
    debug_assert!(local_hour < HOURS_PER_DAY, "local hour {local_hour}");
    debug_assert!(
        segments.windows(2).all(|w| w[0].base < w[1].base),
        "segments must be sorted by base"
    );
    // The active segment takes appends, so it is never a candidate.
    let Some((_active, candidates)) = segments.split_last() else {
        return Vec::new();
    };
    let reserved_ms = policy.file_reserved_hours.saturating_mul(MS_PER_HOUR);
    let expired = |s: &SegmentInfo| now_ms >= s.last_modified_ms.saturating_add(reserved_ms);

    // RocketMQ deletes at the deleteWhen hour so the I/O of deletion lands off-peak.
    let time_to_delete = policy.delete_when_hours.contains(&local_hour);
    // Under disk pressure waiting for the hour could fill the disk, so the hour is ignored.
    let disk_pressure = disk_used_ratio >= policy.disk_max_used_ratio;
    if !time_to_delete && !disk_pressure {
        return Vec::new();
    }

    // Only a prefix is deleted: a hole would break the log's contiguous offset range.
    let deletes: Vec<u64> = candidates
        .iter()
        .take_while(|s| expired(s))
        .map(|s| s.base)
        .collect();
    let force = disk_used_ratio
        >= policy
            .disk_force_clean_ratio
            .max(policy.disk_max_used_ratio);
    if !deletes.is_empty() || !force {
        // Expired data goes first; the caller re-measures the disk before anything younger goes.
        return deletes;
    }

    // Past the forcible ratio with nothing expired: RocketMQ's forced clean of the oldest
    // segments, bounded so one run cannot wipe the log.
    let forced: Vec<u64> = candidates
        .iter()
        .take(MAX_FORCED_DELETES_PER_RUN)
        .map(|s| s.base)
        .collect();
    if !forced.is_empty() {
        tracing::warn!(
            disk_used_ratio,
            force_ratio = policy.disk_force_clean_ratio,
            segments = forced.len(),
            first_base = forced[0],
            "disk over its usage ratio: deleting unexpired CommitLog segments"
        );
    }
    forced
}

/// Returns the first queue offsets of the ConsumeQueue files whose every entry is below
/// `new_min_queue_offset`, oldest first.
///
/// `files` are `(first queue offset in the file, entries in the file)`, sorted by first offset;
/// the last file is the one being written.
pub fn cq_files_to_delete(files: &[(u64, u64)], new_min_queue_offset: u64) -> Vec<u64> {
    debug_assert!(
        files.windows(2).all(|w| w[0].0 < w[1].0),
        "ConsumeQueue files must be sorted by first offset"
    );
    // The last file takes new entries and holds the queue's max offset, so it always stays.
    let Some((_last, candidates)) = files.split_last() else {
        return Vec::new();
    };
    // Prefix only, as for the CommitLog: the queue's offsets stay contiguous.
    candidates
        .iter()
        .take_while(|(first, entries)| first.saturating_add(*entries) <= new_min_queue_offset)
        .map(|(first, _)| *first)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT_LEN: u64 = 1 << 30;
    const NOW_MS: u64 = 1_000 * MS_PER_HOUR;

    /// A segment with index `i` last written `age_hours` before `NOW_MS`.
    fn seg(i: u64, age_hours: u64) -> SegmentInfo {
        SegmentInfo {
            base: i * SEGMENT_LEN,
            len: SEGMENT_LEN,
            last_modified_ms: NOW_MS - age_hours * MS_PER_HOUR,
        }
    }

    fn bases(idx: &[u64]) -> Vec<u64> {
        idx.iter().map(|i| i * SEGMENT_LEN).collect()
    }

    #[test]
    fn parses_delete_when() {
        assert_eq!(parse_delete_when("04"), Ok(vec![4]));
        assert_eq!(parse_delete_when("4"), Ok(vec![4]));
        assert_eq!(parse_delete_when("16;04"), Ok(vec![4, 16]));
        assert_eq!(parse_delete_when(" 00 ; 23 ;23"), Ok(vec![0, 23]));
    }

    #[test]
    fn rejects_bad_delete_when() {
        assert_eq!(parse_delete_when(""), Err(RetentionError::Empty));
        assert_eq!(parse_delete_when("  "), Err(RetentionError::Empty));
        let err = parse_delete_when("04;24").unwrap_err();
        assert!(matches!(&err, RetentionError::HourOutOfRange { part, .. } if part == "24"));
        assert!(err.to_string().contains("\"24\""), "{err}");
        let err = parse_delete_when("04;4h").unwrap_err();
        assert!(matches!(&err, RetentionError::NotAnHour { part, .. } if part == "4h"));
        assert!(err.to_string().contains("\"4h\""), "{err}");
        assert!(matches!(
            parse_delete_when("04;;16"),
            Err(RetentionError::NotAnHour { .. })
        ));
        assert!(matches!(
            parse_delete_when("-1"),
            Err(RetentionError::NotAnHour { .. })
        ));
        assert!(matches!(
            parse_delete_when("999999999999"),
            Err(RetentionError::HourOutOfRange { .. })
        ));
    }

    #[test]
    fn default_policy_is_rocketmqs() {
        let p = RetentionPolicy::default();
        assert_eq!(p.delete_when_hours, vec![4]);
        assert_eq!(p.file_reserved_hours, 72);
        assert_eq!(p.disk_max_used_ratio, 0.75);
    }

    #[test]
    fn deletes_only_expired_at_delete_hour() {
        let p = RetentionPolicy::default();
        let segs = [seg(0, 100), seg(1, 73), seg(2, 72), seg(3, 71), seg(4, 0)];
        // Exactly 72 h old counts as expired, as RocketMQ's `now >= lastModified + reserved`.
        assert_eq!(plan(&segs, NOW_MS, 4, 0.1, &p), bases(&[0, 1, 2]));
    }

    #[test]
    fn nothing_at_other_hours_with_low_disk_usage() {
        let p = RetentionPolicy::default();
        let segs = [seg(0, 100), seg(1, 90), seg(2, 0)];
        for hour in (0..HOURS_PER_DAY).filter(|h| *h != 4) {
            assert!(plan(&segs, NOW_MS, hour, 0.5, &p).is_empty(), "hour {hour}");
        }
    }

    #[test]
    fn several_delete_hours() {
        let p = RetentionPolicy {
            delete_when_hours: parse_delete_when("04;16").unwrap(),
            ..RetentionPolicy::default()
        };
        let segs = [seg(0, 100), seg(1, 0)];
        assert_eq!(plan(&segs, NOW_MS, 16, 0.0, &p), bases(&[0]));
        assert!(plan(&segs, NOW_MS, 15, 0.0, &p).is_empty());
    }

    #[test]
    fn unexpired_segment_stops_deletion() {
        let p = RetentionPolicy::default();
        // Segment 1 was rewritten recently (e.g. touched by a tool): 2 must wait behind it.
        let segs = [seg(0, 100), seg(1, 10), seg(2, 90), seg(3, 0)];
        assert_eq!(plan(&segs, NOW_MS, 4, 0.1, &p), bases(&[0]));
        let segs = [seg(0, 10), seg(1, 100), seg(2, 0)];
        assert!(plan(&segs, NOW_MS, 4, 0.1, &p).is_empty());
    }

    #[test]
    fn active_segment_is_never_deleted() {
        let p = RetentionPolicy::default();
        let segs = [seg(0, 200), seg(1, 100)];
        assert_eq!(plan(&segs, NOW_MS, 4, 0.1, &p), bases(&[0]));
        assert!(plan(&[seg(0, 200)], NOW_MS, 4, 0.99, &p).is_empty());
        assert!(plan(&[], NOW_MS, 4, 0.99, &p).is_empty());
    }

    #[test]
    fn disk_pressure_deletes_expired_at_any_hour() {
        let p = RetentionPolicy::default();
        let segs = [seg(0, 100), seg(1, 80), seg(2, 5), seg(3, 0)];
        assert_eq!(plan(&segs, NOW_MS, 13, 0.75, &p), bases(&[0, 1]));
        assert!(plan(&segs, NOW_MS, 13, 0.74, &p).is_empty());
    }

    #[test]
    fn forced_deletion_when_still_over_ratio() {
        let p = RetentionPolicy::default();
        let mut segs: Vec<SegmentInfo> = (0..15).map(|i| seg(i, 1)).collect();
        segs.push(seg(15, 0));
        // Over the used ratio but under the forcible one: nothing unexpired goes.
        assert!(plan(&segs, NOW_MS, 13, 0.8, &p).is_empty());
        let planned = plan(&segs, NOW_MS, 13, 0.9, &p);
        assert_eq!(
            planned,
            bases(&(0..MAX_FORCED_DELETES_PER_RUN as u64).collect::<Vec<_>>())
        );
        // Fewer segments than the bound: all but the active one.
        let segs = [seg(0, 1), seg(1, 1), seg(2, 0)];
        assert_eq!(plan(&segs, NOW_MS, 13, 0.9, &p), bases(&[0, 1]));
        // Nothing is forced without disk pressure, even at the delete hour.
        assert!(plan(&segs, NOW_MS, 4, 0.5, &p).is_empty());
    }

    #[test]
    fn huge_reserved_time_does_not_overflow() {
        let p = RetentionPolicy {
            file_reserved_hours: u64::MAX,
            ..RetentionPolicy::default()
        };
        let segs = [seg(0, 100), seg(1, 0)];
        assert!(plan(&segs, NOW_MS, 4, 0.1, &p).is_empty());
    }

    #[test]
    fn cq_files_below_new_min() {
        let files = [(0, 100), (100, 100), (200, 100), (300, 7)];
        assert!(cq_files_to_delete(&files, 0).is_empty());
        assert!(cq_files_to_delete(&files, 99).is_empty());
        assert_eq!(cq_files_to_delete(&files, 100), vec![0]);
        assert_eq!(cq_files_to_delete(&files, 250), vec![0, 100]);
        // The last file stays even when the minimum is past all of it.
        assert_eq!(cq_files_to_delete(&files, 10_000), vec![0, 100, 200]);
        assert!(cq_files_to_delete(&[(0, 100)], 10_000).is_empty());
        assert!(cq_files_to_delete(&[], 10).is_empty());
    }
}
