//! Frames: how requests, responses and pushes travel on a QUIC stream.
//!
//! Layout, version 1, little-endian:
//!
//! | offset | size | field                                                   |
//! |-------:|-----:|---------------------------------------------------------|
//! |      0 |    4 | frame length: bytes after this field                    |
//! |      4 |    1 | version ([`FRAME_VERSION`])                             |
//! |      5 |    1 | kind: request, response or push ([`Kind`])              |
//! |      6 |    2 | code: a request code, or a response code                |
//! |      8 |    8 | request id, echoed by the response (0 for pushes)       |
//! |     16 |    4 | header length                                           |
//! |     20 |    n | header: an rkyv archive, validated on receipt           |
//! |   20+n |    m | body: raw bytes (message bodies, stored records)        |
//!
//! Many requests fly at once on one stream; responses carry the request id and may come back
//! in any order, so a parked long poll never holds up a send.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

use crate::limits::{MAX_FRAME_LEN, MAX_HEADER_LEN};

pub const FRAME_VERSION: u8 = 1;
/// Bytes of the fixed frame prefix, the length field included.
pub const FRAME_PREFIX_LEN: usize = 20;
/// Bytes counted by the length field that are not header or body.
const FIXED_AFTER_LEN: usize = FRAME_PREFIX_LEN - 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request = 0,
    Response = 1,
    /// Sent by the broker on its own initiative (notices to a client).
    Push = 2,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            0 => Some(Kind::Request),
            1 => Some(Kind::Response),
            2 => Some(Kind::Push),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub code: u16,
    pub request_id: u64,
    pub header: Bytes,
    pub body: Bytes,
}

/// Why bytes on a stream are not a valid frame. Fatal for the stream, not the connection.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    #[error("frame of {0} bytes is shorter than its fixed part")]
    TooShort(usize),
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("header of {len} bytes does not fit the frame (or is over {MAX_HEADER_LEN})")]
    Header { len: usize },
}

impl Frame {
    pub fn new(kind: Kind, code: u16, request_id: u64, header: Bytes, body: Bytes) -> Frame {
        Frame {
            kind,
            code,
            request_id,
            header,
            body,
        }
    }

    /// Encoded size of the whole frame.
    pub fn encoded_len(&self) -> usize {
        FRAME_PREFIX_LEN + self.header.len() + self.body.len()
    }

    /// The fixed prefix; header and body follow as they are (no copy of the body).
    pub fn prefix(&self) -> [u8; FRAME_PREFIX_LEN] {
        let len = (self.encoded_len() - 4) as u32;
        let mut p = [0u8; FRAME_PREFIX_LEN];
        p[0..4].copy_from_slice(&len.to_le_bytes());
        p[4] = FRAME_VERSION;
        p[5] = self.kind as u8;
        p[6..8].copy_from_slice(&self.code.to_le_bytes());
        p[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        p[16..20].copy_from_slice(&(self.header.len() as u32).to_le_bytes());
        p
    }

    /// The frame as one contiguous buffer (tests and small frames).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        b.extend_from_slice(&self.prefix());
        b.extend_from_slice(&self.header);
        b.extend_from_slice(&self.body);
        b.freeze()
    }
}

/// Incremental frame parser over a byte stream; bounds are checked before anything is buffered
/// beyond the fixed prefix, so a hostile length never makes us allocate.
#[derive(Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes the next frame needs in all: the prefix's length until the prefix is in, then
    /// the whole frame's. A reader that never pushes past this keeps each frame in a buffer of
    /// its own, so a small frame held long never keeps a large one's memory alive.
    pub fn next_len(&self) -> Result<usize, FrameError> {
        Ok(self
            .prefix()?
            .map_or(FRAME_PREFIX_LEN, |(total, _, _)| total))
    }

    /// The next frame's encoded length, kind and header length, once its prefix is in.
    fn prefix(&self) -> Result<Option<(usize, Kind, usize)>, FrameError> {
        if self.buf.len() < FRAME_PREFIX_LEN {
            // Even a partial length can be judged early.
            if self.buf.len() >= 4 {
                check_len(u32::from_le_bytes(self.buf[0..4].try_into().expect("4")) as usize)?;
            }
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[0..4].try_into().expect("4")) as usize;
        check_len(len)?;
        let version = self.buf[4];
        if version != FRAME_VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = Kind::from_u8(self.buf[5]).ok_or(FrameError::Kind(self.buf[5]))?;
        let header_len = u32::from_le_bytes(self.buf[16..20].try_into().expect("4")) as usize;
        if header_len > MAX_HEADER_LEN || header_len > len - FIXED_AFTER_LEN {
            return Err(FrameError::Header { len: header_len });
        }
        Ok(Some((4 + len, kind, header_len)))
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some((total, kind, header_len)) = self.prefix()? else {
            return Ok(None);
        };
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut f = self.buf.split_to(total);
        let code = u16::from_le_bytes(f[6..8].try_into().expect("2"));
        let request_id = u64::from_le_bytes(f[8..16].try_into().expect("8"));
        f.advance(FRAME_PREFIX_LEN);
        let header = f.split_to(header_len).freeze();
        Ok(Some(Frame {
            kind,
            code,
            request_id,
            header,
            body: f.freeze(),
        }))
    }
}

fn check_len(len: usize) -> Result<(), FrameError> {
    if len > MAX_FRAME_LEN {
        Err(FrameError::TooLarge(len))
    } else if len < FIXED_AFTER_LEN {
        Err(FrameError::TooShort(len))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(body: &[u8]) -> Frame {
        Frame::new(
            Kind::Request,
            10,
            42,
            Bytes::from_static(b"hdr"),
            Bytes::copy_from_slice(body),
        )
    }

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let frames = [f(b"one"), f(b""), f(&[7u8; 5000])];
        let mut wire = Vec::new();
        for fr in &frames {
            wire.extend_from_slice(&fr.to_bytes());
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in wire {
            d.push(&[b]);
            while let Some(fr) = d.next_frame().unwrap() {
                got.push(fr);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn next_len_is_the_prefix_then_the_whole_frame() {
        let fr = f(&[9u8; 1000]);
        let wire = fr.to_bytes();
        let mut d = FrameDecoder::new();
        assert_eq!(d.next_len().unwrap(), FRAME_PREFIX_LEN);
        d.push(&wire[..FRAME_PREFIX_LEN - 1]);
        assert_eq!(d.next_len().unwrap(), FRAME_PREFIX_LEN);
        d.push(&wire[FRAME_PREFIX_LEN - 1..FRAME_PREFIX_LEN]);
        assert_eq!(d.next_len().unwrap(), fr.encoded_len());
        assert!(d.next_frame().unwrap().is_none());
        d.push(&wire[FRAME_PREFIX_LEN..]);
        assert_eq!(d.next_frame().unwrap().unwrap().body, fr.body);
        assert_eq!((d.buffered(), d.next_len().unwrap()), (0, FRAME_PREFIX_LEN));
        let mut bad = wire.to_vec();
        bad[4] = 99;
        d.push(&bad[..FRAME_PREFIX_LEN]);
        assert_eq!(d.next_len(), Err(FrameError::Version(99)));
    }

    #[test]
    fn hostile_lengths_are_refused_before_buffering() {
        let mut d = FrameDecoder::new();
        d.push(&u32::MAX.to_le_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(u32::MAX as usize)));
        let mut d = FrameDecoder::new();
        d.push(&3u32.to_le_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooShort(3)));
    }

    #[test]
    fn bad_version_kind_and_header_length_are_errors() {
        let good = f(b"x").to_bytes();
        let mut bad = good.to_vec();
        bad[4] = 9;
        let mut d = FrameDecoder::new();
        d.push(&bad);
        assert_eq!(d.next_frame(), Err(FrameError::Version(9)));

        let mut bad = good.to_vec();
        bad[5] = 7;
        let mut d = FrameDecoder::new();
        d.push(&bad);
        assert_eq!(d.next_frame(), Err(FrameError::Kind(7)));

        let mut bad = good.to_vec();
        bad[16..20].copy_from_slice(&1000u32.to_le_bytes());
        let mut d = FrameDecoder::new();
        d.push(&bad);
        assert_eq!(d.next_frame(), Err(FrameError::Header { len: 1000 }));
    }
}
