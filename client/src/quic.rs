//! QUIC transport settings shared by clients and brokers: datagram sizes and socket buffers.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Largest UDP payload sent or accepted (the QUIC `max_udp_payload_size` transport parameter
/// and the bound of path MTU discovery). Over loopback (MTU 65,536) or jumbo frames a packet
/// of this size carries 30 messages of 1 KiB, so per-packet costs (encryption calls, ACKs,
/// syscalls) fall by as much: 1 KiB produce went from 85k to 145k msgs/s here, with the same
/// figure at 65,507. Above about 48 KiB, a connection to one shard stopped passing data in
/// tests/schedule.rs (not understood yet), so the bound stays at 32 KiB.
pub const MAX_UDP_PAYLOAD: u16 = 32_768;

/// Most bytes one `sendmsg` may carry, GSO batches included: 65,535 bytes of IPv4 datagram
/// minus the IP and UDP headers.
pub const MAX_SEND_BYTES: usize = 65_507;

/// Default SO_RCVBUF/SO_SNDBUF of every endpoint socket: large datagrams (loopback, jumbo
/// frames) need room for a window's worth of them, or the kernel drops them and QUIC backs off.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The endpoint configuration: accepts datagrams up to [`MAX_UDP_PAYLOAD`] (quinn sizes its
/// receive buffers by it).
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    // MAX_UDP_PAYLOAD is above quinn's minimum of 1,200: this cannot fail.
    c.max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("MAX_UDP_PAYLOAD is a valid max_udp_payload_size");
    c
}

/// Ack-eliciting packets a peer may receive before it must send an ACK (QUIC ACK frequency
/// extension); [`ACK_MAX_DELAY`] bounds how late an ACK is.
pub const ACK_ELICITING_THRESHOLD: u32 = 7;
/// Longest a peer may hold back an ACK under [`ack_frequency`].
pub const ACK_MAX_DELAY: std::time::Duration = std::time::Duration::from_millis(2);

/// Path MTU discovery up to [`MAX_UDP_PAYLOAD`]: on a 1,500-byte path the probes above it are
/// lost (or refused locally) and discovery settles there.
pub fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut m = quinn::MtuDiscoveryConfig::default();
    m.upper_bound(MAX_UDP_PAYLOAD);
    m
}

/// Asks the peer to acknowledge every [`ACK_ELICITING_THRESHOLD`]+1 ack-eliciting packets
/// instead of every other one: with large datagrams each ACK is a whole sendmsg (and a wakeup)
/// on the peer, and replies to requests carry ACKs anyway. Within [`ACK_MAX_DELAY`] at the
/// latest, so a sender whose congestion window holds fewer packets (a new connection's slow
/// start, after a loss) does not wait the default 25 ms for each ACK.
pub fn ack_frequency() -> quinn::AckFrequencyConfig {
    let mut a = quinn::AckFrequencyConfig::default();
    a.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into())
        .max_ack_delay(Some(ACK_MAX_DELAY));
    a
}

/// Sets SO_RCVBUF/SO_SNDBUF of `socket` and returns the sizes granted: the kernel caps them at
/// `net.core.rmem_max`/`wmem_max` silently, so a shortfall shows only in what is read back.
/// Failures are logged, not fatal: the endpoint still works with smaller buffers.
pub fn size_socket_buffers(
    state: &UdpSocketState,
    socket: &UdpSocket,
    want_recv: usize,
    want_send: usize,
) -> (usize, usize) {
    if let Err(e) = state.set_recv_buffer_size(socket.into(), want_recv) {
        tracing::debug!(error = %e, "cannot set SO_RCVBUF");
    }
    if let Err(e) = state.set_send_buffer_size(socket.into(), want_send) {
        tracing::debug!(error = %e, "cannot set SO_SNDBUF");
    }
    // Linux reports twice the granted size (it counts its own overhead).
    (
        state.recv_buffer_size(socket.into()).unwrap_or(0) / 2,
        state.send_buffer_size(socket.into()).unwrap_or(0) / 2,
    )
}

/// Sends `transmit` in as many `sendmsg` calls as Linux's UDP segmentation offload needs: one
/// GSO send carries at most [`MAX_SEND_BYTES`] in all, and quinn batches up to 10 datagrams of
/// the path MTU, so with large datagrams a batch is split at datagram boundaries.
/// A WouldBlock after some parts went out is returned as is: quinn then retries the whole batch
/// and the peer drops the duplicated packets, which is cheaper than losing the rest.
pub fn send_segmented(
    transmit: &Transmit,
    mut send: impl FnMut(&Transmit) -> io::Result<()>,
) -> io::Result<()> {
    let Some(segment) = transmit.segment_size.filter(|&s| s > 0) else {
        return send(transmit);
    };
    if transmit.contents.len() <= MAX_SEND_BYTES {
        return send(transmit);
    }
    let per_send = (MAX_SEND_BYTES / segment).max(1) * segment;
    for part in transmit.contents.chunks(per_send) {
        send(&Transmit {
            contents: part,
            segment_size: (part.len() > segment).then_some(segment),
            ..transmit.clone()
        })?;
    }
    Ok(())
}

/// A quinn socket whose sends go through [`send_segmented`]: quinn's own sockets pass a batch
/// of large datagrams to the kernel whole, which refuses it (EMSGSIZE) and the batch is lost.
#[derive(Debug)]
pub struct SegmentedSocket(pub Arc<dyn AsyncUdpSocket>);

impl AsyncUdpSocket for SegmentedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        send_segmented(transmit, |t| self.0.try_send(t))
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transmit(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: "127.0.0.1:1".parse().unwrap(),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    fn sends(contents: &[u8], segment_size: Option<usize>) -> Vec<(usize, Option<usize>)> {
        let mut seen = Vec::new();
        send_segmented(&transmit(contents, segment_size), |t| {
            seen.push((t.contents.len(), t.segment_size));
            Ok(())
        })
        .unwrap();
        seen
    }

    #[test]
    fn small_batches_go_whole() {
        let buf = vec![0u8; 10 * 1452];
        assert_eq!(sends(&buf, Some(1452)), vec![(10 * 1452, Some(1452))]);
        assert_eq!(sends(&buf[..700], None), vec![(700, None)]);
    }

    #[test]
    fn large_datagrams_split_at_datagram_boundaries() {
        // Three 30,000-byte datagrams and a 5,000-byte tail: two fit in one GSO send.
        let buf = vec![0u8; 3 * 30_000 + 5_000];
        assert_eq!(
            sends(&buf, Some(30_000)),
            vec![(60_000, Some(30_000)), (35_000, Some(30_000))]
        );
        // Datagrams of the largest size go one per send, without a segment size.
        let buf = vec![0u8; 2 * 65_507];
        assert_eq!(
            sends(&buf, Some(65_507)),
            vec![(65_507, None), (65_507, None)]
        );
    }

    #[test]
    fn a_blocked_part_stops_the_batch() {
        let buf = vec![0u8; 3 * 40_000];
        let mut calls = 0;
        let err = send_segmented(&transmit(&buf, Some(40_000)), |_| {
            calls += 1;
            if calls == 2 {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(calls, 2);
    }
}
