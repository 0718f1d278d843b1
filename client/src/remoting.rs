//! Remoting: one QUIC connection per endpoint, one bidirectional stream per connection, and
//! every request multiplexed on it by request id.
//!
//! A connection runs three tasks: a writer that drains a bounded queue of outbound frames and
//! writes prefix, header and body as separate chunks (bodies are never copied), a reader that
//! splits the stream into frames and completes the waiting request by id, and an acceptor for
//! the unidirectional streams the broker opens to push notices. When any of them fails, every
//! waiting request fails with [`ClientError::ConnectionLost`] and the next request to that
//! endpoint connects again.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use orbitmq_proto::codes::{push as push_code, quic as quic_code};
use orbitmq_proto::frame::{Frame, FrameDecoder, Kind};
use orbitmq_proto::header::{self, CheckTransactionNotice, Notice, ResetOffsetNotice};
use orbitmq_proto::limits::{MAX_GROUP_LEN, MAX_QUEUES_PER_TOPIC, MAX_TOPIC_LEN};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};

/// Bytes of frames queued for writing on one connection; senders wait beyond this.
pub const OUTBOUND_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Frames queued for writing on one connection.
pub const OUTBOUND_FRAMES_MAX: usize = 4096;
/// Frames the writer gathers into one write.
pub const WRITE_BATCH_FRAMES_MAX: usize = 64;
/// Largest chunk the reader asks quinn for at once.
pub const READ_CHUNK_MAX: usize = 256 * 1024;
/// Pushes kept for slow observers of `Client::pushes` before the oldest are dropped (a
/// broker shard sends up to 1,000 transaction check-backs a round).
pub const PUSH_CHANNEL_CAPACITY: usize = 4096;
/// Unidirectional streams the broker may have open to us at once (push notices).
pub const PUSH_STREAMS_MAX: u32 = 16;
/// How long closing waits for the peer to acknowledge.
pub const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// A notice the broker pushed on a unidirectional stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    /// The endpoint (`host:port`) of the connection it came on.
    pub endpoint: String,
    /// A code of `orbitmq_proto::codes::push`.
    pub code: u16,
    /// The notice's text (RESET_CONSUMER_CLIENT_OFFSET: the group).
    pub message: String,
    /// RESET_CONSUMER_CLIENT_OFFSET: the group's new offsets (that push's header is a
    /// `ResetOffsetNotice` rather than a `Notice`).
    pub reset: Option<ResetOffsetNotice>,
    /// CHECK_TRANSACTION_STATE: which half message, and its record (the push's body).
    pub check: Option<(CheckTransactionNotice, Bytes)>,
}

/// Splits `host:port` (IPv6 hosts in brackets) and checks the port.
pub fn split_host_port(endpoint: &str) -> Result<(&str, u16)> {
    let bad = || ClientError::InvalidArgument(format!("address {endpoint:?} is not host:port"));
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['[', ']']) {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok((host, port))
}

/// Resolves an endpoint to a socket address (IP literals without a lookup).
pub async fn resolve(endpoint: &str) -> Result<SocketAddr> {
    let (host, port) = split_host_port(endpoint)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut addrs =
        tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ClientError::Connect {
                endpoint: endpoint.to_owned(),
                reason: format!("cannot resolve host: {e}"),
            })?;
    addrs.next().ok_or_else(|| ClientError::Connect {
        endpoint: endpoint.to_owned(),
        reason: "host resolves to no address".into(),
    })
}

/// One connection and its single request stream.
pub(crate) struct Connection {
    endpoint: String,
    addr: SocketAddr,
    conn: quinn::Connection,
    next_id: AtomicU64,
    shared: Arc<Shared>,
    out: mpsc::Sender<Outbound>,
    out_bytes: Arc<Semaphore>,
}

/// Why connections end when the client shuts down (not worth a warning).
const CLIENT_SHUTDOWN: &str = "client shutdown";

/// State the connection's tasks share with it.
struct Shared {
    endpoint: String,
    /// Waiting requests; `None` once the connection has failed (with the reason beside it).
    pending: Mutex<Pending>,
    dead: AtomicBool,
}

struct Pending {
    waiting: HashMap<u64, oneshot::Sender<Result<Frame>>>,
    failed: Option<String>,
}

struct Outbound {
    frame: Frame,
    _permit: OwnedSemaphorePermit,
}

impl Shared {
    fn fail(&self, reason: String) {
        let waiting = {
            let mut p = self.pending.lock().expect("pending lock");
            if p.failed.is_some() {
                return;
            }
            p.failed = Some(reason.clone());
            std::mem::take(&mut p.waiting)
        };
        self.dead.store(true, Ordering::Release);
        if !waiting.is_empty() && reason != CLIENT_SHUTDOWN {
            tracing::warn!(endpoint = %self.endpoint, %reason, requests = waiting.len(),
                "connection failed with requests in flight");
        } else {
            tracing::debug!(endpoint = %self.endpoint, %reason, "connection closed");
        }
        for (_, tx) in waiting {
            let _ = tx.send(Err(ClientError::ConnectionLost {
                endpoint: self.endpoint.clone(),
                reason: reason.clone(),
            }));
        }
    }

    fn complete(&self, frame: Frame) {
        let tx = self
            .pending
            .lock()
            .expect("pending lock")
            .waiting
            .remove(&frame.request_id);
        match tx {
            Some(tx) => {
                let _ = tx.send(Ok(frame));
            }
            // The request timed out or was dropped (a cancelled long poll): nothing waits.
            None => tracing::debug!(endpoint = %self.endpoint, id = frame.request_id,
                "response for a request nobody waits for"),
        }
    }
}

/// Removes a request from the waiting map when its caller stops waiting (timeout, drop).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.waiting.remove(&self.id);
        }
    }
}

impl Connection {
    /// The resolved address of the peer.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn is_alive(&self) -> bool {
        !self.shared.dead.load(Ordering::Acquire) && self.conn.close_reason().is_none()
    }

    fn lost(&self, reason: impl Into<String>) -> ClientError {
        ClientError::ConnectionLost {
            endpoint: self.endpoint.clone(),
            reason: reason.into(),
        }
    }

    async fn enqueue(&self, frame: Frame) -> Result<()> {
        let n = frame.encoded_len().min(OUTBOUND_BYTES_MAX) as u32;
        let permit = self
            .out_bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| self.lost("connection closed"))?;
        self.out
            .send(Outbound {
                frame,
                _permit: permit,
            })
            .await
            .map_err(|_| self.lost("connection closed"))
    }

    /// Sends a request and waits for its response, whatever its code, up to `timeout`.
    pub(crate) async fn request(
        &self,
        code: u16,
        header: Bytes,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Frame> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.shared.pending.lock().expect("pending lock");
            if let Some(reason) = &p.failed {
                return Err(self.lost(reason.clone()));
            }
            p.waiting.insert(id, tx);
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        let timed_out = || ClientError::Timeout {
            what: format!(
                "{} to {}",
                orbitmq_proto::codes::request::name(code),
                self.endpoint
            ),
            after: timeout,
        };
        let frame = Frame::new(Kind::Request, code, id, header, body);
        tokio::time::timeout_at(deadline, self.enqueue(frame))
            .await
            .map_err(|_| timed_out())??;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.lost("connection closed")),
            Err(_) => Err(timed_out()),
        }
    }

    /// Queues a request without waiting for its response (the protocol has no one-way flag:
    /// the broker answers, and the answer is dropped because nobody waits for its id).
    pub(crate) async fn send_oneway(&self, code: u16, header: Bytes, body: Bytes) -> Result<()> {
        if let Some(reason) = &self.shared.pending.lock().expect("pending lock").failed {
            return Err(self.lost(reason.clone()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.enqueue(Frame::new(Kind::Request, code, id, header, body))
            .await
    }

    fn close(&self, reason: &str) {
        self.conn
            .close(quic_code::SHUTDOWN.into(), reason.as_bytes());
        self.shared.fail(reason.to_owned());
    }
}

async fn writer_task(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Outbound>,
) {
    let mut batch: Vec<Outbound> = Vec::with_capacity(WRITE_BATCH_FRAMES_MAX);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(WRITE_BATCH_FRAMES_MAX * 3);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < WRITE_BATCH_FRAMES_MAX {
            match rx.try_recv() {
                Ok(o) => batch.push(o),
                Err(_) => break,
            }
        }
        for o in &batch {
            chunks.push(Bytes::copy_from_slice(&o.frame.prefix()));
            if !o.frame.header.is_empty() {
                chunks.push(o.frame.header.clone());
            }
            if !o.frame.body.is_empty() {
                chunks.push(o.frame.body.clone());
            }
        }
        let res = send.write_all_chunks(&mut chunks).await;
        chunks.clear();
        batch.clear();
        if let Err(e) = res {
            shared.fail(format!("write failed: {e}"));
            conn.close(quic_code::SHUTDOWN.into(), b"write failed");
            return;
        }
    }
    // Every sender is gone: the connection is being dropped.
    let _ = send.finish();
}

async fn reader_task(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    pushes: broadcast::Sender<Push>,
) {
    let mut dec = FrameDecoder::new();
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK_MAX, true).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                shared.fail("the broker finished the request stream".into());
                return;
            }
            Err(e) => {
                shared.fail(format!("read failed: {e}"));
                return;
            }
        };
        dec.push(&chunk.bytes);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => match f.kind {
                    Kind::Response => shared.complete(f),
                    Kind::Push => dispatch_push(&shared.endpoint, f, &pushes),
                    Kind::Request => {
                        tracing::warn!(endpoint = %shared.endpoint, code = f.code,
                            "ignoring a request frame from the broker on the request stream");
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    let reason = format!("invalid frame from the broker: {e}");
                    tracing::error!(endpoint = %shared.endpoint, %reason);
                    conn.close(quic_code::FRAME_INVALID.into(), b"invalid frame");
                    shared.fail(reason);
                    return;
                }
            }
        }
    }
}

/// Decodes a RESET_CONSUMER_CLIENT_OFFSET header and checks its bounds.
fn decode_reset(h: &[u8]) -> std::result::Result<ResetOffsetNotice, String> {
    let n = header::decode::<ResetOffsetNotice>(h).map_err(|e| e.to_string())?;
    if n.group.is_empty() || n.group.len() > MAX_GROUP_LEN || n.topic.len() > MAX_TOPIC_LEN {
        return Err("reset notice with a bad group or topic".into());
    }
    if n.offsets.len() > MAX_QUEUES_PER_TOPIC as usize {
        return Err(format!(
            "reset notice names {} queues, over {MAX_QUEUES_PER_TOPIC}",
            n.offsets.len()
        ));
    }
    Ok(n)
}

fn dispatch_push(endpoint: &str, f: Frame, pushes: &broadcast::Sender<Push>) {
    if f.code == push_code::CHECK_TRANSACTION_STATE {
        match header::decode::<CheckTransactionNotice>(&f.header) {
            Ok(n) if !n.producer_group.is_empty() && n.producer_group.len() <= MAX_GROUP_LEN => {
                let _ = pushes.send(Push {
                    endpoint: endpoint.to_owned(),
                    code: f.code,
                    message: n.producer_group.clone(),
                    reset: None,
                    check: Some((n, f.body)),
                });
            }
            _ => tracing::warn!(%endpoint, "transaction check with an invalid header"),
        }
        return;
    }
    let decoded = if f.code == push_code::RESET_CONSUMER_CLIENT_OFFSET {
        decode_reset(&f.header).map(|n| (n.group.clone(), Some(n)))
    } else {
        header::decode::<Notice>(&f.header)
            .map(|n| (n.message, None))
            .map_err(|e| e.to_string())
    };
    let (message, reset) = match decoded {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%endpoint, code = f.code, error = %e, "push with an invalid header");
            return;
        }
    };
    match f.code {
        push_code::GOING_AWAY => {
            tracing::info!(%endpoint, %message, "broker is going away")
        }
        _ => tracing::info!(%endpoint, code = f.code, %message, "push from broker"),
    }
    let _ = pushes.send(Push {
        endpoint: endpoint.to_owned(),
        code: f.code,
        message,
        reset,
        check: None,
    });
}

async fn push_acceptor_task(
    endpoint: String,
    conn: quinn::Connection,
    pushes: broadcast::Sender<Push>,
) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let endpoint = endpoint.clone();
        let pushes = pushes.clone();
        tokio::spawn(async move {
            let mut dec = FrameDecoder::new();
            loop {
                match recv.read_chunk(READ_CHUNK_MAX, true).await {
                    Ok(Some(c)) => dec.push(&c.bytes),
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%endpoint, error = %e, "push stream ended");
                        return;
                    }
                }
                loop {
                    match dec.next_frame() {
                        Ok(Some(f)) if f.kind == Kind::Push => dispatch_push(&endpoint, f, &pushes),
                        Ok(Some(f)) => tracing::warn!(%endpoint, kind = ?f.kind,
                            "ignoring a non-push frame on a push stream"),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(%endpoint, error = %e, "invalid frame on a push stream");
                            let _ = recv.stop(quic_code::FRAME_INVALID.into());
                            return;
                        }
                    }
                }
            }
        });
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Connection>>>>;

/// The connection pool of one client: a QUIC endpoint per address family, a connection per
/// broker or name server endpoint, reconnecting on the next request after a failure.
pub(crate) struct Remoting {
    quic: quinn::ClientConfig,
    connect_timeout: Duration,
    v4: Mutex<Option<quinn::Endpoint>>,
    v6: Mutex<Option<quinn::Endpoint>>,
    slots: Mutex<HashMap<String, Slot>>,
    pushes: broadcast::Sender<Push>,
    closed: AtomicBool,
}

impl Remoting {
    pub(crate) fn new(config: &ClientConfig) -> Result<Remoting> {
        let tls = crate::tls::rustls_config(&config.tls)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let mut quic = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
            .map_err(|e| ClientError::InvalidArgument(format!("idle timeout: {e}")))?;
        transport
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(config.keep_alive_interval))
            // The broker never opens request streams to a client; pushes come unidirectional.
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(PUSH_STREAMS_MAX.into())
            .mtu_discovery_config(Some(crate::quic::mtu_discovery()))
            .ack_frequency_config(Some(crate::quic::ack_frequency()));
        quic.transport_config(Arc::new(transport));
        let (pushes, _) = broadcast::channel(PUSH_CHANNEL_CAPACITY);
        Ok(Remoting {
            quic,
            connect_timeout: config.connect_timeout,
            v4: Mutex::new(None),
            v6: Mutex::new(None),
            slots: Mutex::new(HashMap::new()),
            pushes,
            closed: AtomicBool::new(false),
        })
    }

    pub(crate) fn pushes(&self) -> broadcast::Receiver<Push> {
        self.pushes.subscribe()
    }

    fn quic_endpoint(&self, ipv6: bool) -> Result<quinn::Endpoint> {
        let (slot, bind) = if ipv6 {
            (
                &self.v6,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            )
        } else {
            (
                &self.v4,
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            )
        };
        let mut g = slot.lock().expect("endpoint lock");
        if let Some(e) = &*g {
            return Ok(e.clone());
        }
        let open_error = |e: std::io::Error| ClientError::Connect {
            endpoint: bind.to_string(),
            reason: format!("cannot open a UDP socket: {e}"),
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(open_error)?;
        let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(open_error)?;
        crate::quic::size_socket_buffers(
            &state,
            &socket,
            crate::quic::SOCKET_BUFFER_BYTES,
            crate::quic::SOCKET_BUFFER_BYTES,
        );
        let runtime = quinn::default_runtime()
            .ok_or_else(|| open_error(std::io::Error::other("no async runtime")))?;
        let socket: Arc<dyn quinn::AsyncUdpSocket> = Arc::new(crate::quic::SegmentedSocket(
            runtime.wrap_udp_socket(socket).map_err(open_error)?,
        ));
        let e = quinn::Endpoint::new_with_abstract_socket(
            crate::quic::endpoint_config(),
            None,
            socket,
            runtime,
        )
        .map_err(open_error)?;
        *g = Some(e.clone());
        Ok(e)
    }

    /// The live connection to `endpoint`, connecting if there is none.
    pub(crate) async fn connection(&self, endpoint: &str) -> Result<Arc<Connection>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ClientError::ShutDown);
        }
        let slot = self
            .slots
            .lock()
            .expect("slots lock")
            .entry(endpoint.to_owned())
            .or_default()
            .clone();
        let mut g = slot.lock().await;
        if let Some(c) = &*g {
            if c.is_alive() {
                return Ok(c.clone());
            }
            tracing::info!(%endpoint, "reconnecting");
        }
        let c = Arc::new(self.connect(endpoint).await?);
        *g = Some(c.clone());
        Ok(c)
    }

    async fn connect(&self, endpoint: &str) -> Result<Connection> {
        let connect_err = |reason: String| ClientError::Connect {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let (host, _) = split_host_port(endpoint)?;
        let addr = resolve(endpoint).await?;
        let quic = self.quic_endpoint(addr.is_ipv6())?;
        let connecting = quic
            .connect_with(self.quic.clone(), addr, host)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| connect_err(format!("no handshake within {:?}", self.connect_timeout)))?
            .map_err(|e| match e {
                quinn::ConnectionError::TransportError(t)
                    if t.code.to_string().contains("crypto")
                        || t.reason.contains("certificate") =>
                {
                    ClientError::Tls(format!("handshake with {endpoint} failed: {t}"))
                }
                other => connect_err(other.to_string()),
            })?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| connect_err(format!("cannot open the request stream: {e}")))?;
        tracing::debug!(%endpoint, %addr, "connected");
        let shared = Arc::new(Shared {
            endpoint: endpoint.to_owned(),
            pending: Mutex::new(Pending {
                waiting: HashMap::new(),
                failed: None,
            }),
            dead: AtomicBool::new(false),
        });
        let (out, rx) = mpsc::channel(OUTBOUND_FRAMES_MAX);
        tokio::spawn(writer_task(shared.clone(), conn.clone(), send, rx));
        tokio::spawn(reader_task(
            shared.clone(),
            conn.clone(),
            recv,
            self.pushes.clone(),
        ));
        tokio::spawn(push_acceptor_task(
            endpoint.to_owned(),
            conn.clone(),
            self.pushes.clone(),
        ));
        Ok(Connection {
            endpoint: endpoint.to_owned(),
            addr,
            conn,
            next_id: AtomicU64::new(1),
            shared,
            out,
            out_bytes: Arc::new(Semaphore::new(OUTBOUND_BYTES_MAX)),
        })
    }

    /// Closes every connection and the endpoints.
    pub(crate) async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .expect("slots lock")
            .drain()
            .map(|(_, s)| s)
            .collect();
        for slot in slots {
            if let Some(c) = slot.lock().await.take() {
                c.close(CLIENT_SHUTDOWN);
            }
        }
        let eps: Vec<quinn::Endpoint> = [&self.v4, &self.v6]
            .iter()
            .filter_map(|s| s.lock().expect("endpoint lock").take())
            .collect();
        for e in eps {
            e.close(quic_code::SHUTDOWN.into(), b"client shutdown");
            let _ = tokio::time::timeout(CLOSE_WAIT, e.wait_idle()).await;
        }
    }
}

impl Drop for Remoting {
    fn drop(&mut self) {
        for s in [&self.v4, &self.v6] {
            if let Ok(mut g) = s.lock() {
                if let Some(e) = g.take() {
                    e.close(quic_code::SHUTDOWN.into(), b"client dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_parsing() {
        assert_eq!(
            split_host_port("127.0.0.1:9876").unwrap(),
            ("127.0.0.1", 9876)
        );
        assert_eq!(split_host_port("[::1]:10911").unwrap(), ("::1", 10911));
        assert_eq!(split_host_port("localhost:1").unwrap(), ("localhost", 1));
        assert!(split_host_port("localhost").is_err());
        assert!(split_host_port(":1").is_err());
        assert!(split_host_port("h:70000").is_err());
        assert!(split_host_port("[::1:1").is_err());
    }

    #[tokio::test]
    async fn ip_literals_resolve_without_lookup() {
        assert_eq!(
            resolve("[::1]:5").await.unwrap(),
            "[::1]:5".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve("10.0.0.1:5").await.unwrap(),
            "10.0.0.1:5".parse::<SocketAddr>().unwrap()
        );
    }
}
