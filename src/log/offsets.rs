//! Consumer offsets the broker keeps per (group, topic, queue id), saved as a small text file
//! with a CRC so a torn or corrupted file is refused instead of silently rewinding consumers.
//!
//! File format (`v1`):
//! ```text
//! orbitmq-offsets v1
//! <group>\t<topic>\t<queue>\t<offset>      one line per entry, sorted
//! crc <crc32c of all preceding bytes, 8 lowercase hex digits>
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// First line of an offsets file; the version changes with the format.
pub const OFFSETS_HEADER: &str = "orbitmq-offsets v1";
/// Largest offsets file `load` reads (about 4 million entries), so a wrong path cannot make
/// the broker read an arbitrary file into memory.
pub const MAX_OFFSETS_FILE_LEN: u64 = 256 * 1024 * 1024;
/// Longest consumer group name, as RocketMQ (`CHARACTER_MAX_LENGTH`).
pub const MAX_GROUP_LEN: usize = 255;
/// Committed offsets (group, topic, queue) one shard keeps: any client may commit for any
/// group name, and every entry is rewritten on each save.
pub const MAX_COMMITTED_OFFSETS: usize = 200_000;
/// Longest line of the file: group, topic, queue id and offset, tab-separated.
const MAX_LINE_LEN: usize =
    MAX_GROUP_LEN + 1 + orbitmq_proto::limits::MAX_TOPIC_LEN + 1 + 10 + 1 + 20 + 1;
// A full set of offsets must load again after a restart.
const _: () = assert!(((MAX_COMMITTED_OFFSETS + 2) * MAX_LINE_LEN) as u64 <= MAX_OFFSETS_FILE_LEN);
/// Prefix of the last line, followed by the CRC in hex.
const CRC_PREFIX: &str = "crc ";
/// Hex digits of a CRC32C.
const CRC_HEX_LEN: usize = 8;

/// Why offsets could not be loaded or committed.
#[derive(Debug, Error)]
pub enum OffsetsError {
    #[error("offsets file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("offsets file {path} is {len} bytes, over the limit of {MAX_OFFSETS_FILE_LEN}")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("offsets file {path} is truncated: its last line is not a complete `crc` line")]
    Truncated { path: PathBuf },
    #[error(
        "offsets file {path} is corrupt: crc {computed:08x} of its contents does not match \
         the recorded {recorded:08x}"
    )]
    CrcMismatch {
        path: PathBuf,
        recorded: u32,
        computed: u32,
    },
    #[error("offsets file {path} is corrupt at line {line}: {reason}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error(
        "the shard holds {0} committed offsets, its limit: a new group, topic or queue gets \
         none (delete unused groups' offsets or spread the groups over brokers)"
    )]
    Full(usize),
    #[error("{kind} name {name:?} is refused: {reason}")]
    InvalidName {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },
}

/// Committed consumer offsets of one shard.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConsumerOffsets {
    /// Sorted by (group, topic, queue), which is also the file's line order.
    entries: BTreeMap<(String, String, u32), u64>,
    /// Changed since the last save or load.
    dirty: bool,
}

impl ConsumerOffsets {
    /// An empty set of offsets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads offsets from `path`. A missing file is an empty set (a new broker); a corrupt,
    /// truncated or oversized file is an error, never a silent reset of consumers.
    pub fn load(path: &Path) -> Result<Self, OffsetsError> {
        let io_err = |source| OffsetsError::Io {
            path: path.to_owned(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(e) => return Err(io_err(e)),
        };
        let len = file.metadata().map_err(io_err)?.len();
        if len > MAX_OFFSETS_FILE_LEN {
            return Err(OffsetsError::TooLarge {
                path: path.to_owned(),
                len,
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        // `take` keeps the bound even if the file grows after the metadata call.
        file.take(MAX_OFFSETS_FILE_LEN)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        let offsets = Self::decode(path, &bytes)?;
        tracing::debug!(path = %path.display(), entries = offsets.entries.len(), "loaded consumer offsets");
        Ok(offsets)
    }

    /// Records `offset` as the next offset `group` consumes from `topic`'s queue `queue`.
    /// Offsets may move backwards (an offset reset replays messages).
    pub fn commit(
        &mut self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<(), OffsetsError> {
        self.commit_all(group, topic, &[(queue, offset)])
    }

    /// Records several queues' offsets of one group and topic: all of them or, when the names
    /// are refused or the new ones would pass [`MAX_COMMITTED_OFFSETS`], none.
    pub fn commit_all(
        &mut self,
        group: &str,
        topic: &str,
        offsets: &[(u32, u64)],
    ) -> Result<(), OffsetsError> {
        validate_name("group", group, MAX_GROUP_LEN)?;
        // Topics are validated at the edge; this keeps the file parseable whatever happens there.
        validate_name("topic", topic, orbitmq_proto::limits::MAX_TOPIC_LEN)?;
        if self.entries.len() + offsets.len() > MAX_COMMITTED_OFFSETS {
            let new: BTreeSet<u32> = offsets
                .iter()
                .map(|&(q, _)| q)
                .filter(|&q| self.query(group, topic, q).is_none())
                .collect();
            if self.entries.len() + new.len() > MAX_COMMITTED_OFFSETS {
                return Err(OffsetsError::Full(MAX_COMMITTED_OFFSETS));
            }
        }
        for &(queue, offset) in offsets {
            let old = self
                .entries
                .insert((group.to_owned(), topic.to_owned(), queue), offset);
            // Re-committing the same offset (every pull does) must not force a save.
            self.dirty |= old != Some(offset);
        }
        Ok(())
    }

    /// The committed offset of `group` on `topic`'s queue `queue`, if any.
    pub fn query(&self, group: &str, topic: &str, queue: u32) -> Option<u64> {
        // A tuple key needs owned strings to look up; this is per request, not per message.
        self.entries
            .get(&(group.to_owned(), topic.to_owned(), queue))
            .copied()
    }

    /// Clamps every offset into `[min, max]` of its queue, as `bounds(topic, queue)` reports
    /// them. Used after recovery: a queue whose tail was cut, or whose head was deleted by
    /// retention, must not leave consumers pointing outside it. Queues without bounds (not on
    /// this shard, or no longer existing) are left as they are.
    pub fn clamp(&mut self, bounds: impl Fn(&str, u32) -> Option<(u64, u64)>) {
        for ((group, topic, queue), offset) in self.entries.iter_mut() {
            let Some((min, max)) = bounds(topic, *queue) else {
                continue;
            };
            assert!(
                min <= max,
                "queue {topic}:{queue} has min offset {min} above max {max}"
            );
            let clamped = (*offset).clamp(min, max);
            if clamped != *offset {
                tracing::warn!(
                    group = %group, topic = %topic, queue, from = *offset, to = clamped,
                    "consumer offset outside its queue; clamped"
                );
                *offset = clamped;
                self.dirty = true;
            }
        }
    }

    /// Whether offsets changed since the last `load` or [`Self::take_changes`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Number of stored offsets.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no offset is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every offset as `(group, topic, queue, offset)`, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, u32, u64)> {
        self.entries
            .iter()
            .map(|((g, t, q), o)| (g.as_str(), t.as_str(), *q, *o))
    }

    /// The file's bytes (see the module docs for the format).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::with_capacity(OFFSETS_HEADER.len() + 1 + self.entries.len() * 64);
        out.push_str(OFFSETS_HEADER);
        out.push('\n');
        for ((g, t, q), o) in &self.entries {
            let _ = writeln!(out, "{g}\t{t}\t{q}\t{o}");
        }
        let crc = crc32c::crc32c(out.as_bytes());
        let _ = writeln!(out, "{CRC_PREFIX}{crc:08x}");
        out.into_bytes()
    }

    /// The file's bytes when anything changed since the last call, clearing the dirty flag;
    /// a caller whose write then fails calls [`Self::mark_dirty`].
    pub fn take_changes(&mut self) -> Option<Vec<u8>> {
        std::mem::take(&mut self.dirty).then(|| self.encode())
    }

    /// Marks the offsets as changed (their last write failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Takes every entry of `other` (a slave adopting its master's offsets), keeping entries
    /// only this set has. Refused whole when the new entries would pass
    /// [`MAX_COMMITTED_OFFSETS`].
    pub fn merge(&mut self, other: ConsumerOffsets) -> Result<(), OffsetsError> {
        let new = other
            .entries
            .keys()
            .filter(|k| !self.entries.contains_key(*k))
            .count();
        if self.entries.len() + new > MAX_COMMITTED_OFFSETS {
            return Err(OffsetsError::Full(MAX_COMMITTED_OFFSETS));
        }
        for (k, o) in other.entries {
            let old = self.entries.insert(k, o);
            self.dirty |= old != Some(o);
        }
        Ok(())
    }

    /// Parses bytes in the file's format (from the file at `path`, or sent by a master).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Self, OffsetsError> {
        if bytes.len() as u64 > MAX_OFFSETS_FILE_LEN {
            return Err(OffsetsError::TooLarge {
                path: path.to_owned(),
                len: bytes.len() as u64,
            });
        }
        let here = || path.to_owned();
        // The crc line comes last and ends with '\n'; anything else is a cut write.
        let body_end = bytes
            .strip_suffix(b"\n")
            .and_then(|b| b.iter().rposition(|&c| c == b'\n').map(|i| i + 1))
            .ok_or_else(|| OffsetsError::Truncated { path: here() })?;
        let (body, crc_line) = bytes.split_at(body_end);
        let crc_line = &crc_line[..crc_line.len() - 1];
        let recorded = crc_line
            .strip_prefix(CRC_PREFIX.as_bytes())
            .filter(|hex| hex.len() == CRC_HEX_LEN)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u32::from_str_radix(hex, 16).ok())
            .ok_or_else(|| OffsetsError::Truncated { path: here() })?;
        let computed = crc32c::crc32c(body);
        if computed != recorded {
            return Err(OffsetsError::CrcMismatch {
                path: here(),
                recorded,
                computed,
            });
        }

        let corrupt = |line: usize, reason: String| OffsetsError::Corrupt {
            path: here(),
            line,
            reason,
        };
        let text = std::str::from_utf8(body).map_err(|e| {
            let line = body[..e.valid_up_to()]
                .iter()
                .filter(|&&c| c == b'\n')
                .count()
                + 1;
            corrupt(line, "not UTF-8".to_owned())
        })?;
        let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
        match lines.next() {
            Some((_, OFFSETS_HEADER)) => {}
            Some((n, other)) => {
                return Err(corrupt(
                    n,
                    format!("header {other:?}, expected {OFFSETS_HEADER:?}"),
                ))
            }
            None => return Err(corrupt(1, "missing header".to_owned())),
        }
        let mut entries = BTreeMap::new();
        for (n, line) in lines {
            let fields: Vec<&str> = line.split('\t').collect();
            let [group, topic, queue, offset] = fields[..] else {
                return Err(corrupt(
                    n,
                    format!("{} tab-separated fields, expected 4", fields.len()),
                ));
            };
            let queue: u32 = queue
                .parse()
                .map_err(|_| corrupt(n, format!("queue id {queue:?} is not a number")))?;
            let offset: u64 = offset
                .parse()
                .map_err(|_| corrupt(n, format!("offset {offset:?} is not a number")))?;
            if group.is_empty() || topic.is_empty() {
                return Err(corrupt(n, "empty group or topic".to_owned()));
            }
            let key = (group.to_owned(), topic.to_owned(), queue);
            if entries.insert(key, offset).is_some() {
                return Err(corrupt(
                    n,
                    format!("second entry for {group} {topic} {queue}"),
                ));
            }
        }
        Ok(Self {
            entries,
            dirty: false,
        })
    }
}

/// Refuses names that would break the line format.
fn validate_name(kind: &'static str, name: &str, max_len: usize) -> Result<(), OffsetsError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > max_len {
        "too long"
    } else if name.contains(['\t', '\n', '\r']) {
        "contains a tab or line break"
    } else {
        return Ok(());
    };
    Err(OffsetsError::InvalidName {
        kind,
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// What the store's persist does, on this thread: the bytes, written atomically.
    fn save(o: &mut ConsumerOffsets, path: &Path) -> io::Result<()> {
        let bytes = o.take_changes().unwrap_or_else(|| o.encode());
        super::super::fsutil::write_atomically(path, &bytes)
    }

    fn sample() -> ConsumerOffsets {
        let mut o = ConsumerOffsets::new();
        o.commit("g2", "TopicB", 0, 7).unwrap();
        o.commit("g1", "TopicA", 3, 300).unwrap();
        o.commit("g1", "TopicA", 1, 100).unwrap();
        o.commit("g1", "%RETRY%g1", 0, 5).unwrap();
        o
    }

    #[test]
    fn commit_and_query() {
        let mut o = sample();
        assert_eq!(o.query("g1", "TopicA", 1), Some(100));
        assert_eq!(o.query("g1", "TopicA", 2), None);
        assert_eq!(o.query("g3", "TopicA", 1), None);
        o.commit("g1", "TopicA", 1, 50).unwrap();
        assert_eq!(o.query("g1", "TopicA", 1), Some(50));
        assert_eq!(o.len(), 4);
    }

    #[test]
    fn a_full_set_refuses_new_keys_keeps_updating_old_ones_and_loads_again() {
        let mut o = ConsumerOffsets::new();
        for i in 0..MAX_COMMITTED_OFFSETS {
            o.commit(&format!("g{}", i / 1024), "T", (i % 1024) as u32, i as u64)
                .unwrap();
        }
        for (g, t, q) in [("g0", "U", 0), ("new", "T", 0), ("g0", "T", 1024)] {
            let e = o.commit(g, t, q, 1).unwrap_err();
            assert!(
                matches!(e, OffsetsError::Full(MAX_COMMITTED_OFFSETS)),
                "{e}"
            );
            assert_eq!(o.query(g, t, q), None);
        }
        o.commit("g0", "T", 5, 77).unwrap();
        assert_eq!(o.query("g0", "T", 5), Some(77));
        // Several at once: all or none.
        let e = o.commit_all("g0", "T", &[(6, 1), (1024, 1)]).unwrap_err();
        assert!(matches!(e, OffsetsError::Full(_)), "{e}");
        assert_eq!(o.query("g0", "T", 6), Some(6));
        o.commit_all("g0", "T", &[(6, 1), (7, 2)]).unwrap();
        assert_eq!(
            (o.query("g0", "T", 6), o.query("g0", "T", 7)),
            (Some(1), Some(2))
        );
        assert_eq!(o.len(), MAX_COMMITTED_OFFSETS);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumerOffset");
        save(&mut o, &path).unwrap();
        assert_eq!(ConsumerOffsets::load(&path).unwrap(), o);
    }

    #[test]
    fn dirty_tracks_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        let mut o = ConsumerOffsets::new();
        assert!(!o.is_dirty());
        o.commit("g", "t", 0, 1).unwrap();
        assert!(o.is_dirty());
        save(&mut o, &path).unwrap();
        assert!(!o.is_dirty());
        o.commit("g", "t", 0, 1).unwrap();
        assert!(!o.is_dirty(), "same offset again is no change");
        o.commit("g", "t", 0, 2).unwrap();
        assert!(o.is_dirty());
    }

    #[test]
    fn changes_are_taken_once_and_given_back_after_a_failed_write() {
        let mut o = ConsumerOffsets::new();
        assert_eq!(o.take_changes(), None, "nothing changed yet");
        o.commit("g", "t", 3, 42).unwrap();
        let bytes = o.take_changes().expect("a commit is a change");
        assert_eq!(bytes, o.encode());
        let back = ConsumerOffsets::decode(Path::new("x"), &bytes).unwrap();
        assert_eq!(back.query("g", "t", 3), Some(42));
        assert_eq!(o.take_changes(), None, "taken: clean until the next change");
        o.mark_dirty();
        assert_eq!(
            o.take_changes(),
            Some(bytes),
            "a failed write is retried whole"
        );
    }

    #[test]
    fn rejects_names_that_break_the_format() {
        let mut o = ConsumerOffsets::new();
        for bad in ["", "a\tb", "a\nb", "a\rb"] {
            let err = o.commit(bad, "t", 0, 1).unwrap_err();
            assert!(
                matches!(err, OffsetsError::InvalidName { kind: "group", .. }),
                "{err}"
            );
        }
        assert!(o.commit(&"g".repeat(MAX_GROUP_LEN), "t", 0, 1).is_ok());
        assert!(o.commit(&"g".repeat(MAX_GROUP_LEN + 1), "t", 0, 1).is_err());
        let err = o.commit("g", "t\tx", 0, 1).unwrap_err();
        assert!(
            matches!(err, OffsetsError::InvalidName { kind: "topic", .. }),
            "{err}"
        );
        assert_eq!(o.len(), 1, "only the valid commit is stored");
    }

    #[test]
    fn encode_is_sorted_with_crc() {
        let text = String::from_utf8(sample().encode()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..5],
            [
                "orbitmq-offsets v1",
                "g1\t%RETRY%g1\t0\t5",
                "g1\tTopicA\t1\t100",
                "g1\tTopicA\t3\t300",
                "g2\tTopicB\t0\t7",
            ]
        );
        let body_len = text.len() - lines[5].len() - 1;
        let crc = crc32c::crc32c(&text.as_bytes()[..body_len]);
        assert_eq!(lines[5], format!("crc {crc:08x}"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumerOffset");
        let mut o = sample();
        save(&mut o, &path).unwrap();
        assert!(!dir.path().join("consumerOffset.tmp").exists());
        let loaded = ConsumerOffsets::load(&path).unwrap();
        assert_eq!(loaded, o);
        assert!(!loaded.is_dirty());
        let all: Vec<_> = loaded.iter().collect();
        assert_eq!(all[0], ("g1", "%RETRY%g1", 0, 5));
        assert_eq!(all.len(), 4);
        // An empty set round-trips too, and a second save replaces the first.
        let mut empty = ConsumerOffsets::new();
        save(&mut empty, &path).unwrap();
        assert!(ConsumerOffsets::load(&path).unwrap().is_empty());
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let o = ConsumerOffsets::load(&dir.path().join("nope")).unwrap();
        assert!(o.is_empty());
        assert!(!o.is_dirty());
    }

    #[test]
    fn flipped_byte_is_caught_by_crc() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        save(&mut sample(), &path).unwrap();
        let good = fs::read(&path).unwrap();
        // Flip every body byte in turn: each flip must be refused.
        let body_len = good.len() - (CRC_PREFIX.len() + CRC_HEX_LEN + 1);
        for i in 0..body_len {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            let err = ConsumerOffsets::load(&path).unwrap_err();
            assert!(
                matches!(
                    err,
                    OffsetsError::CrcMismatch { .. } | OffsetsError::Truncated { .. }
                ),
                "byte {i}: {err}"
            );
        }
        // Digit '1' <-> '0' in an offset: a plausible value, still refused.
        let text = String::from_utf8(good.clone()).unwrap();
        let i = text.find("\t100\n").unwrap() + 1;
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(matches!(err, OffsetsError::CrcMismatch { .. }), "{err}");
        assert!(err.to_string().contains("offsets"), "{err}");
        // A flip in the crc itself is refused as well.
        let mut bad = good.clone();
        let last_digit = bad.len() - 2;
        bad[last_digit] ^= 0x01;
        fs::write(&path, &bad).unwrap();
        assert!(ConsumerOffsets::load(&path).is_err());
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        save(&mut sample(), &path).unwrap();
        let good = fs::read(&path).unwrap();
        for cut in 0..good.len() {
            fs::write(&path, &good[..cut]).unwrap();
            assert!(ConsumerOffsets::load(&path).is_err(), "cut at {cut}");
        }
        fs::write(&path, &good[..good.len() - 1]).unwrap();
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(matches!(err, OffsetsError::Truncated { .. }), "{err}");
    }

    #[test]
    fn corrupt_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        // A valid crc over a bad body: the parser must name the bad line.
        let write_body = |body: &str| {
            let crc = crc32c::crc32c(body.as_bytes());
            fs::write(&path, format!("{body}crc {crc:08x}\n")).unwrap();
        };
        write_body("orbitmq-offsets v1\ng\tt\t0\t1\ng\tt\tx\t2\n");
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(
            matches!(err, OffsetsError::Corrupt { line: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("line 3"), "{err}");
        write_body("orbitmq-offsets v1\ng\tt\t0\n");
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(
            matches!(err, OffsetsError::Corrupt { line: 2, .. }),
            "{err}"
        );
        write_body("orbitmq-offsets v2\n");
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(
            matches!(err, OffsetsError::Corrupt { line: 1, .. }),
            "{err}"
        );
        write_body("orbitmq-offsets v1\ng\tt\t0\t1\ng\tt\t0\t2\n");
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(
            matches!(err, OffsetsError::Corrupt { line: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn clamp_into_queue_bounds() {
        let mut o = ConsumerOffsets::new();
        o.commit("g", "A", 0, 500).unwrap(); // past a cut tail
        o.commit("g", "A", 1, 2).unwrap(); // below a deleted head
        o.commit("g", "A", 2, 50).unwrap(); // inside
        o.commit("g", "Gone", 0, 9).unwrap(); // no bounds: left alone
        let dir = tempfile::tempdir().unwrap();
        save(&mut o, &dir.path().join("offsets")).unwrap();
        o.clamp(|topic, queue| match (topic, queue) {
            ("A", 0) => Some((0, 120)),
            ("A", 1) => Some((10, 20)),
            ("A", 2) => Some((0, 100)),
            _ => None,
        });
        assert!(o.is_dirty());
        assert_eq!(o.query("g", "A", 0), Some(120));
        assert_eq!(o.query("g", "A", 1), Some(10));
        assert_eq!(o.query("g", "A", 2), Some(50));
        assert_eq!(o.query("g", "Gone", 0), Some(9));
        save(&mut o, &dir.path().join("offsets")).unwrap();
        o.clamp(|_, _| Some((0, 1_000)));
        assert!(
            !o.is_dirty(),
            "clamp that changes nothing leaves the set clean"
        );
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        let f = File::create(&path).unwrap();
        f.set_len(MAX_OFFSETS_FILE_LEN + 1).unwrap();
        let err = ConsumerOffsets::load(&path).unwrap_err();
        assert!(matches!(err, OffsetsError::TooLarge { .. }), "{err}");
    }
}
