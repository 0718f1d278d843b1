//! Message ids.
//!
//! - Offset id (broker-assigned): 32 hex digits of 16 bytes: broker IPv4 (4; IPv6 hosts use the
//!   first 4 bytes of a hash, see below), port (2), shard (2), CommitLog offset (8), big-endian so
//!   ids sort by position. It names where the record is, so it can be looked up later.
//!   Layout: `IIIIIIII PPPP SSSS OOOOOOOOOOOOOOOO`.
//! - Unique key (`UNIQ_KEY`, client-generated): 32 hex digits: client IPv4 (4), process id (4),
//!   start time hash (4), counter (4). The same across a producer's retries, so consumers can
//!   deduplicate.

use std::net::{IpAddr, SocketAddr};

/// The property carrying the client's unique key.
pub const UNIQ_KEY: &str = "UNIQ_KEY";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetId {
    pub ip: [u8; 4],
    pub port: u16,
    pub shard: u16,
    pub offset: u64,
}

fn ip4(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.octets(),
            None => crc32c::crc32c(&v6.octets()).to_be_bytes(),
        },
    }
}

impl OffsetId {
    pub fn new(broker: SocketAddr, shard: u16, offset: u64) -> OffsetId {
        OffsetId {
            ip: ip4(broker.ip()),
            port: broker.port(),
            shard,
            offset,
        }
    }

    pub fn encode(&self) -> String {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.ip);
        b[4..6].copy_from_slice(&self.port.to_be_bytes());
        b[6..8].copy_from_slice(&self.shard.to_be_bytes());
        b[8..16].copy_from_slice(&self.offset.to_be_bytes());
        hex(&b)
    }

    pub fn decode(s: &str) -> Option<OffsetId> {
        let b = unhex::<16>(s)?;
        Some(OffsetId {
            ip: b[0..4].try_into().ok()?,
            port: u16::from_be_bytes(b[4..6].try_into().ok()?),
            shard: u16::from_be_bytes(b[6..8].try_into().ok()?),
            offset: u64::from_be_bytes(b[8..16].try_into().ok()?),
        })
    }
}

/// Generates unique keys for one producer process.
pub struct UniqKeyGen {
    prefix: [u8; 12],
    counter: u32,
}

impl UniqKeyGen {
    pub fn new(client_ip: IpAddr) -> UniqKeyGen {
        let mut prefix = [0u8; 12];
        prefix[0..4].copy_from_slice(&ip4(client_ip));
        prefix[4..8].copy_from_slice(&std::process::id().to_be_bytes());
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        prefix[8..12].copy_from_slice(&crc32c::crc32c(&t.to_le_bytes()).to_be_bytes());
        UniqKeyGen { prefix, counter: 0 }
    }

    pub fn next_key(&mut self) -> String {
        self.counter = self.counter.wrapping_add(1);
        let mut b = [0u8; 16];
        b[0..12].copy_from_slice(&self.prefix);
        b[12..16].copy_from_slice(&self.counter.to_be_bytes());
        hex(&b)
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789ABCDEF";
    // Bytes first, one UTF-8 check at the end: pushing chars one by one was a visible share
    // of a producer's CPU (one id per message).
    let mut s = Vec::with_capacity(b.len() * 2);
    for x in b {
        s.extend_from_slice(&[D[(x >> 4) as usize], D[(x & 15) as usize]]);
    }
    String::from_utf8(s).expect("hex digits are ASCII")
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, ch) in s.as_bytes().chunks(2).enumerate() {
        let v = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        out[i] = (v(ch[0])? << 4) | v(ch[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_ids_round_trip_and_sort_by_offset() {
        let a = OffsetId::new("10.0.0.1:10911".parse().unwrap(), 1, 4096);
        let s = a.encode();
        assert_eq!(s, "0A0000012A9F00010000000000001000");
        assert_eq!(OffsetId::decode(&s), Some(a));
        let b = OffsetId::new("10.0.0.1:10911".parse().unwrap(), 1, 5000);
        assert!(b.encode() > s);
        assert_eq!(OffsetId::decode("zz"), None);
        assert_eq!(OffsetId::decode(&"G".repeat(32)), None);
    }

    #[test]
    fn unique_keys_differ() {
        let mut g = UniqKeyGen::new("127.0.0.1".parse().unwrap());
        let (a, b) = (g.next_key(), g.next_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(&a[..24], &b[..24]);
    }
}
