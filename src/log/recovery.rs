//! Recovery logic, pure: scanning log bytes for whole records, and the checkpoint format.
//! The store's open path feeds it file contents.

use orbitmq_proto::record::{self, DecodeError, Peek};

use super::indexfile;

/// One record found by a scan, with what its ConsumeQueue entry needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scanned {
    pub phys: u64,
    pub size: u32,
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub tag_hash: u64,
    pub store_timestamp: u64,
    /// Hashes of its indexed keys (see `indexfile`).
    pub key_hashes: Vec<u32>,
}

/// What dispatching the record `v`, of `n` bytes at log offset `pos`, needs; its keys hashed
/// under `index`'s key when the shard keeps a key index.
pub fn scanned(
    v: &record::RecordView<'_>,
    pos: u64,
    n: u32,
    index: Option<&indexfile::HashKey>,
) -> Scanned {
    Scanned {
        phys: pos,
        size: n,
        topic: v.topic.to_owned(),
        queue_id: v.queue_id,
        queue_offset: v.queue_offset,
        tag_hash: crate::schedule::cq_tag(v.topic, v.tags, || {
            v.property(orbitmq_proto::sys::property::TIMER_DELIVER_MS)
        }),
        store_timestamp: v.store_timestamp,
        key_hashes: {
            let mut h = Vec::new();
            if let Some(key) = index {
                let t = key.topic(v.topic);
                let uniq = v.property(orbitmq_proto::msgid::UNIQ_KEY);
                indexfile::indexed_keys(v.keys, uniq, |k| h.push(t.key(k)));
            }
            h
        },
    }
}

/// Why a scan of a buffer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The buffer ends inside a record: read more from `next`.
    NeedMore,
    /// A blank record closes the segment: continue at the next segment.
    SegmentEnd,
    /// Zeros: the log ends here.
    Empty,
    /// Not a whole, valid record at its own position: the log is cut here.
    Invalid(String),
}

/// Scans `buf`, which holds log bytes from log offset `buf_pos` and is known to reach the end
/// of its segment (`seg_end`) or to stop before it. Returns where scanning stopped and why.
///
/// A record counts only if its CRC passes *and* its stored physical offset equals its
/// position: pre-written or reused space can hold stale records whose CRC still passes.
pub fn scan(
    buf: &[u8],
    buf_pos: u64,
    seg_end: u64,
    buf_reaches_eof: bool,
    index: Option<&indexfile::HashKey>,
    out: &mut Vec<Scanned>,
) -> (u64, Stop) {
    let mut at = 0usize;
    loop {
        let pos = buf_pos + at as u64;
        if pos == seg_end {
            // A segment always ends with a blank record; running into its end is damage.
            return (
                pos,
                Stop::Invalid("segment ends without its blank record".into()),
            );
        }
        let rest = &buf[at..];
        let peeked = match record::peek(rest) {
            Ok(p) => p,
            Err(DecodeError::Truncated { .. }) if !buf_reaches_eof => return (pos, Stop::NeedMore),
            Err(e) => return (pos, Stop::Invalid(e.to_string())),
        };
        match peeked {
            Peek::Empty => return (pos, Stop::Empty),
            Peek::Blank(n) => {
                return if pos + n as u64 == seg_end {
                    (seg_end, Stop::SegmentEnd)
                } else {
                    (
                        pos,
                        Stop::Invalid(format!(
                            "blank record of {n} bytes does not end the segment"
                        )),
                    )
                };
            }
            Peek::Record(n) => {
                if pos + n as u64 > seg_end {
                    return (pos, Stop::Invalid("record runs past its segment".into()));
                }
                if rest.len() < n as usize {
                    return if buf_reaches_eof {
                        (
                            pos,
                            Stop::Invalid("record cut short by the end of the file".into()),
                        )
                    } else {
                        (pos, Stop::NeedMore)
                    };
                }
                let v = match record::decode(rest) {
                    Ok(v) => v,
                    Err(e) => return (pos, Stop::Invalid(e.to_string())),
                };
                if v.physical_offset != pos {
                    return (
                        pos,
                        Stop::Invalid(format!(
                            "stale record: stored offset {} at position {pos}",
                            v.physical_offset
                        )),
                    );
                }
                out.push(scanned(&v, pos, n, index));
                at += n as usize;
            }
        }
    }
}

/// What the store persisted about its ConsumeQueues, so recovery knows where to rescan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every record below this log offset is in the persisted ConsumeQueues.
    pub scan_from: u64,
    /// Written only by a clean close: the log ends here and nothing after it was ever
    /// written in this segment, so recovery need not zero the rest of the segment.
    pub clean_end: Option<u64>,
    /// Persisted entry count per queue, to spot a ConsumeQueue deleted or truncated since.
    pub queues: Vec<(String, u32, u64)>,
}

const CHECKPOINT_HEADER: &str = "orbitmq-checkpoint v1";

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!("{CHECKPOINT_HEADER}\nscan_from {}\n", self.scan_from);
        if let Some(end) = self.clean_end {
            s.push_str(&format!("clean_end {end}\n"));
        }
        for (t, q, n) in &self.queues {
            s.push_str(&format!("queue {t} {q} {n}\n"));
        }
        let crc = crc32c::crc32c(s.as_bytes());
        s.push_str(&format!("crc {crc:08x}\n"));
        s.into_bytes()
    }

    /// `None` for anything but a whole, valid checkpoint: recovery then rescans everything.
    pub fn decode(b: &[u8]) -> Option<Checkpoint> {
        let s = std::str::from_utf8(b).ok()?;
        let body_end = s.trim_end_matches('\n').rfind('\n')? + 1;
        let (body, last) = s.split_at(body_end);
        let crc = u32::from_str_radix(last.trim().strip_prefix("crc ")?, 16).ok()?;
        if crc != crc32c::crc32c(body.as_bytes()) {
            return None;
        }
        let mut lines = body.lines();
        if lines.next()? != CHECKPOINT_HEADER {
            return None;
        }
        let scan_from = lines.next()?.strip_prefix("scan_from ")?.parse().ok()?;
        let mut lines = lines.peekable();
        let clean_end = match lines.peek().and_then(|l| l.strip_prefix("clean_end ")) {
            Some(v) => {
                let end = v.parse().ok()?;
                lines.next();
                Some(end)
            }
            None => None,
        };
        let mut queues = Vec::new();
        for l in lines {
            let mut w = l.strip_prefix("queue ")?.split(' ');
            let t = w.next()?.to_owned();
            let q = w.next()?.parse().ok()?;
            let n = w.next()?.parse().ok()?;
            queues.push((t, q, n));
        }
        Some(Checkpoint {
            scan_from,
            clean_end,
            queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orbitmq_proto::record::{encode_blank, encode_into, Message, Placement};

    fn rec(phys: u64, qoff: u64, body: &[u8]) -> Vec<u8> {
        let m = Message {
            topic: "T".into(),
            queue_id: 1,
            tags: "A".into(),
            body: body.to_vec().into(),
            ..Default::default()
        };
        let mut v = Vec::new();
        encode_into(
            &m,
            Placement {
                queue_offset: qoff,
                physical_offset: phys,
                store_timestamp: 5,
            },
            &mut v,
        );
        v
    }

    const K: indexfile::HashKey = indexfile::HashKey([1; indexfile::HASH_KEY_LEN]);

    fn log_of(n: usize, seg_end: usize) -> (Vec<u8>, Vec<u64>) {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(buf.len() as u64);
            let r = rec(buf.len() as u64, i as u64, b"body");
            buf.extend(r);
        }
        buf.resize(seg_end, 0);
        (buf, starts)
    }

    #[test]
    fn finds_every_record_and_stops_at_zeros() {
        let (buf, starts) = log_of(5, 4096);
        let mut out = Vec::new();
        let (at, stop) = scan(&buf, 0, 4096, true, Some(&K), &mut out);
        assert_eq!(stop, Stop::Empty);
        assert_eq!(out.len(), 5);
        assert_eq!(out.iter().map(|s| s.phys).collect::<Vec<_>>(), starts);
        assert_eq!(at, out[4].phys + out[4].size as u64);
        assert_eq!(out[3].queue_offset, 3);
    }

    #[test]
    fn a_torn_record_is_cut() {
        let (mut buf, starts) = log_of(5, 4096);
        buf[starts[3] as usize + 40] ^= 1;
        let mut out = Vec::new();
        let (at, stop) = scan(&buf, 0, 4096, true, Some(&K), &mut out);
        assert!(matches!(stop, Stop::Invalid(_)));
        assert_eq!(at, starts[3]);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn a_stale_record_with_a_good_crc_is_cut() {
        let (mut buf, starts) = log_of(2, 4096);
        // A record that was written for another position (an older life of this space).
        let stale = rec(999_999, 0, b"body");
        let at = (starts[1] as usize) + rec(0, 0, b"body").len();
        buf[at..at + stale.len()].copy_from_slice(&stale);
        let mut out = Vec::new();
        let (cut, stop) = scan(&buf, 0, 4096, true, Some(&K), &mut out);
        assert!(matches!(stop, Stop::Invalid(ref s) if s.contains("stale")));
        assert_eq!((cut, out.len()), (at as u64, 2));
    }

    #[test]
    fn a_blank_record_ends_the_segment() {
        let (mut buf, _) = log_of(1, 4096);
        let end = rec(0, 0, b"body").len();
        encode_blank(&mut buf[end..], (4096 - end) as u32);
        let mut out = Vec::new();
        assert_eq!(
            scan(&buf, 0, 4096, true, Some(&K), &mut out),
            (4096, Stop::SegmentEnd)
        );
    }

    #[test]
    fn a_partial_buffer_asks_for_more() {
        let (buf, starts) = log_of(3, 8192);
        let mut out = Vec::new();
        let cut_inside = starts[2] as usize + 10;
        let (at, stop) = scan(&buf[..cut_inside], 0, 8192, false, Some(&K), &mut out);
        assert_eq!((at, stop), (starts[2], Stop::NeedMore));
        // The same short bytes at the end of the file are a torn tail.
        let (_, stop) = scan(&buf[..cut_inside], 0, 8192, true, Some(&K), &mut out);
        assert!(matches!(stop, Stop::Invalid(_)));
    }

    #[test]
    fn checkpoint_round_trip_and_damage() {
        let c = Checkpoint {
            scan_from: 123,
            clean_end: None,
            queues: vec![("T".into(), 0, 5), ("%RETRY%g".into(), 7, 0)],
        };
        let clean = Checkpoint {
            clean_end: Some(456),
            ..c.clone()
        };
        assert_eq!(Checkpoint::decode(&clean.encode()), Some(clean));
        let b = c.encode();
        assert_eq!(Checkpoint::decode(&b), Some(c));
        let mut bad = b.clone();
        bad[25] ^= 1;
        assert_eq!(Checkpoint::decode(&bad), None);
        assert_eq!(Checkpoint::decode(&b[..b.len() - 3]), None);
        assert_eq!(Checkpoint::decode(b""), None);
    }
}
