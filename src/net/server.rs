//! The server side of the protocol on one glommio executor: connections, streams, frames.
//!
//! Stream layout (see the protocol doc in the README):
//! - a client opens bidirectional streams and sends request frames on them; many requests fly
//!   at once on one stream, each handled in its own task, and each response is written back on
//!   the same stream with the request's id as soon as it is ready — so a pull parked in a long
//!   poll never holds up a send behind it;
//! - the broker opens unidirectional streams to push frames to a client (notices, and later
//!   rebalance and transaction check-backs);
//! - bytes of responses queued for a connection are bounded; a handler waits for room.
//!
//! A frame that breaks the framing rules closes its stream with [`quic::FRAME_INVALID`]; a request
//! with an unknown code or an invalid header gets an error response. Either way the connection
//! and the shard live on.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use glommio::sync::Semaphore;
use orbitmq_proto::codes::{push, quic, response};
use orbitmq_proto::frame::{Frame, FrameDecoder, Kind};
use orbitmq_proto::header::{self, ErrorResponse, Notice};
use orbitmq_proto::limits::MAX_FRAME_LEN;
use tracing::{debug, warn};

use crate::sync::Event;

/// Response bytes queued for one connection before handlers wait (at least one max frame).
pub const MAX_OUTBOUND_BYTES_PER_CONN: usize = 2 * MAX_FRAME_LEN;
/// Request bytes one connection may make us hold, across its streams: frames being read and
/// frames being handled (at least one max frame). A stream reserves a frame's whole length once
/// its prefix is in, so a stream holding bytes can always finish its frame; past the bound the
/// connection's streams stop being read, and QUIC's flow control stops the peer.
pub const MAX_INBOUND_BYTES_PER_CONN: usize = 2 * MAX_FRAME_LEN;
/// Connections one endpoint (a shard or a name server) serves at once; more are refused
/// before their handshake, so a flood of clients cannot multiply the per-connection bounds.
pub const MAX_CONNECTIONS: usize = 4096;
/// Refused connections per warning logged (the first is always logged).
const REFUSALS_PER_WARNING: u64 = 1024;
/// Bytes read from a stream at a time.
const READ_CHUNK: usize = 256 * 1024;
const _: () = assert!(MAX_INBOUND_BYTES_PER_CONN >= MAX_FRAME_LEN);
/// Requests in progress on one stream before the reader stops reading (back-pressure).
pub const MAX_INFLIGHT_PER_STREAM: usize = 4096;
/// Longest a shutting-down endpoint waits for its clients to acknowledge GOING_AWAY.
pub const GOING_AWAY_WAIT: Duration = Duration::from_millis(500);

/// What a request handler sees of its connection.
#[derive(Clone)]
pub struct Peer {
    pub conn: quinn::Connection,
    pub remote: SocketAddr,
}

impl Peer {
    /// Pushes a frame to the client on a new unidirectional stream. It returns once the frame
    /// is queued, not sent: the connection must stay open until the client has it (see
    /// [`Peer::push_acknowledged`]).
    pub async fn push(&self, code: u16, message: &str) -> Result<(), String> {
        self.push_stream(code, message).await.map(drop)
    }

    /// Pushes a frame and waits until the client has acknowledged all of it.
    pub async fn push_acknowledged(&self, code: u16, message: &str) -> Result<(), String> {
        let s = self.push_stream(code, message).await?;
        match s.stopped().await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(code) => Err(format!("the client stopped the push stream ({code})")),
        }
    }

    /// Pushes a frame whose header is given as encoded (a push code with a header of its own,
    /// e.g. RESET_CONSUMER_CLIENT_OFFSET with a `ResetOffsetNotice`); queued, not yet sent.
    pub async fn push_header(&self, code: u16, header: Bytes) -> Result<(), String> {
        self.push_frame(code, header).await.map(drop)
    }

    /// Pushes a frame with a header and a body (CHECK_TRANSACTION_STATE: the half message);
    /// queued, not yet sent.
    pub async fn push_with_body(
        &self,
        code: u16,
        header: Bytes,
        body: Bytes,
    ) -> Result<(), String> {
        self.push_frame_with(code, header, body).await.map(drop)
    }

    async fn push_stream(&self, code: u16, message: &str) -> Result<quinn::SendStream, String> {
        let h = header::encode(&Notice {
            message: message.to_owned(),
        });
        self.push_frame(code, h).await
    }

    async fn push_frame(&self, code: u16, h: Bytes) -> Result<quinn::SendStream, String> {
        self.push_frame_with(code, h, Bytes::new()).await
    }

    async fn push_frame_with(
        &self,
        code: u16,
        h: Bytes,
        body: Bytes,
    ) -> Result<quinn::SendStream, String> {
        let f = Frame::new(Kind::Push, code, 0, h, body);
        let mut s = self.conn.open_uni().await.map_err(|e| e.to_string())?;
        s.write_all(&f.to_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        Ok(s)
    }
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Frame>>>;

/// Turns a request into its response (same request id).
pub trait Handler: 'static {
    fn handle(self: Rc<Self>, req: Frame, peer: &Peer) -> HandlerFuture;

    /// The connection ended (closed by either side, or timed out).
    fn connection_closed(self: Rc<Self>, _peer: &Peer) {}
}

/// A response carrying only an error message.
pub fn error_frame(req_id: u64, code: u16, message: impl Into<String>) -> Frame {
    error_frame_redirect(req_id, code, message, String::new())
}

pub fn error_frame_redirect(
    req_id: u64,
    code: u16,
    message: impl Into<String>,
    redirect: String,
) -> Frame {
    let h = header::encode(&ErrorResponse {
        message: message.into(),
        redirect,
    });
    Frame::new(Kind::Response, code, req_id, h, Bytes::new())
}

/// An answer the peer could not take (over [`MAX_FRAME_LEN`]) becomes an error answer: the
/// peer would drop its connection over it, and it could never fit the connection's outbound
/// bound ([`MAX_OUTBOUND_BYTES_PER_CONN`]), so its task would wait forever.
pub fn within_frame_limit(resp: Frame) -> Frame {
    let len = resp.encoded_len();
    if len <= MAX_FRAME_LEN {
        return resp;
    }
    warn!(
        code = resp.code,
        len, "an answer over the frame limit was replaced by an error"
    );
    error_frame(
        resp.request_id,
        response::SYSTEM_ERROR,
        format!("the answer would be {len} bytes, over the frame limit of {MAX_FRAME_LEN}"),
    )
}

pub fn ok_frame(req_id: u64, header: Bytes, body: Bytes) -> Frame {
    Frame::new(Kind::Response, response::SUCCESS, req_id, header, body)
}

/// Live connections of one endpoint, to push notices to all of them.
#[derive(Default)]
pub struct Connections {
    live: RefCell<Vec<quinn::Connection>>,
}

impl Connections {
    /// Tells every client the server is going away (they refresh routes) and closes them.
    ///
    /// The connections are closed once their clients have acknowledged the push, or after
    /// [`GOING_AWAY_WAIT`]: a close discards stream data not yet delivered, so closing right
    /// after queueing the push would lose it.
    pub async fn going_away(&self, why: &str) {
        let conns: Vec<_> = self.live.borrow_mut().drain(..).collect();
        let pushes: Vec<_> = conns
            .iter()
            .map(|c| {
                let p = Peer {
                    remote: c.remote_address(),
                    conn: c.clone(),
                };
                let why = why.to_owned();
                glommio::spawn_local(async move {
                    if let Err(e) = p.push_acknowledged(push::GOING_AWAY, &why).await {
                        debug!(remote = %p.remote, error = %e, "GOING_AWAY not acknowledged");
                    }
                })
            })
            .collect();
        let all = async {
            for p in pushes {
                p.await;
            }
        };
        futures_lite::future::or(all, glommio::timer::sleep(GOING_AWAY_WAIT)).await;
        for c in conns {
            c.close(quic::SHUTDOWN.into(), b"shutdown");
        }
    }
}

/// Accepts connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, handler: Rc<dyn Handler>, conns: Rc<Connections>) {
    let mut refused = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        // Counted as open once accepted here, before the handshake: a burst cannot pass the
        // check together.
        if endpoint.open_connections() >= MAX_CONNECTIONS {
            refused += 1;
            if refused % REFUSALS_PER_WARNING == 1 {
                warn!(remote = %incoming.remote_address(), limit = MAX_CONNECTIONS, refused,
                    "connection refused: too many connections");
            }
            incoming.refuse();
            continue;
        }
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "connection not accepted");
                continue;
            }
        };
        let (handler, conns) = (handler.clone(), conns.clone());
        glommio::spawn_local(async move {
            let conn = match connecting.await {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "handshake failed");
                    return;
                }
            };
            conns
                .live
                .borrow_mut()
                .retain(|c| c.close_reason().is_none());
            conns.live.borrow_mut().push(conn.clone());
            serve_connection(conn, handler).await;
        })
        .detach();
    }
}

async fn serve_connection(conn: quinn::Connection, handler: Rc<dyn Handler>) {
    let peer = Peer {
        remote: conn.remote_address(),
        conn: conn.clone(),
    };
    let outbound = Rc::new(Semaphore::new(MAX_OUTBOUND_BYTES_PER_CONN as u64));
    let inbound = Rc::new(Semaphore::new(MAX_INBOUND_BYTES_PER_CONN as u64));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(remote = %peer.remote, error = %e, "connection ended");
                // Wakes streams and handlers waiting for room, so they end and free theirs.
                inbound.close();
                outbound.close();
                handler.connection_closed(&peer);
                return;
            }
        };
        let (handler, peer) = (handler.clone(), peer.clone());
        let budget = Budget {
            outbound: outbound.clone(),
            inbound: inbound.clone(),
        };
        glommio::spawn_local(serve_stream(send, recv, handler, peer, budget)).detach();
    }
}

/// Frames waiting to be written on one stream, in completion order.
struct Outbox {
    queue: RefCell<VecDeque<Frame>>,
    ready: Event,
    closed: Cell<bool>,
    inflight: Cell<usize>,
    room: Event,
}

/// The bytes a connection's streams share: requests held ([`MAX_INBOUND_BYTES_PER_CONN`]) and
/// responses queued ([`MAX_OUTBOUND_BYTES_PER_CONN`]).
struct Budget {
    inbound: Rc<Semaphore>,
    outbound: Rc<Semaphore>,
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Rc<dyn Handler>,
    peer: Peer,
    Budget { inbound, outbound }: Budget,
) {
    let outbox = Rc::new(Outbox {
        queue: RefCell::new(VecDeque::new()),
        ready: Event::default(),
        closed: Cell::new(false),
        inflight: Cell::new(0),
        room: Event::default(),
    });
    // Writer: drains the outbox in order of completion.
    let writer = {
        let (outbox, outbound) = (outbox.clone(), outbound.clone());
        glommio::spawn_local(async move {
            loop {
                let listener = outbox.ready.listen();
                let next = outbox.queue.borrow_mut().pop_front();
                match next {
                    Some(f) => {
                        let n = f.encoded_len();
                        let mut parts = [Bytes::copy_from_slice(&f.prefix()), f.header, f.body];
                        let r = send.write_all_chunks(&mut parts).await;
                        outbound.signal(n as u64);
                        if r.is_err() {
                            outbox.closed.set(true);
                            return send;
                        }
                    }
                    None if outbox.closed.get() && outbox.inflight.get() == 0 => return send,
                    None => listener.await,
                }
            }
        })
    };

    let mut decoder = FrameDecoder::new();
    // Inbound permits this stream holds: its next frame's length (or its prefix's), reserved
    // before reading it.
    let mut held = 0u64;
    let mut failure = None;
    loop {
        while outbox.inflight.get() >= MAX_INFLIGHT_PER_STREAM {
            outbox.room.listen().await;
        }
        let next = match decoder.next_len() {
            Ok(n) => n,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        };
        if held < next as u64 {
            // A closed semaphore: the connection is gone.
            if inbound.acquire(next as u64 - held).await.is_err() {
                break;
            }
            held = next as u64;
        }
        // Never past this frame: each frame gets a buffer of its own (see `next_len`).
        let want = (next - decoder.buffered()).min(READ_CHUNK);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => break,
            Err(e) => {
                debug!(remote = %peer.remote, error = %e, "stream read ended");
                break;
            }
        }
        let frame = match decoder.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                failure = Some(e.to_string());
                break;
            }
        };
        if frame.kind != Kind::Request {
            failure = Some(format!("a client sent a {:?} frame", frame.kind));
            break;
        }
        outbox.inflight.set(outbox.inflight.get() + 1);
        // The frame's permits go with it to its handler.
        let taken = std::mem::take(&mut held);
        let (handler, peer, outbox, outbound, inbound) = (
            handler.clone(),
            peer.clone(),
            outbox.clone(),
            outbound.clone(),
            inbound.clone(),
        );
        glommio::spawn_local(async move {
            let resp = within_frame_limit(handler.handle(frame, &peer).await);
            inbound.signal(taken);
            let n = resp.encoded_len() as u64;
            // Bound what waits for the network; a closed semaphore means the connection is
            // gone.
            if outbound.acquire(n).await.is_ok() {
                outbox.queue.borrow_mut().push_back(resp);
            }
            outbox.inflight.set(outbox.inflight.get() - 1);
            outbox.ready.notify();
            outbox.room.notify();
        })
        .detach();
    }
    inbound.signal(held);
    drop(decoder);
    if let Some(why) = &failure {
        warn!(remote = %peer.remote, why, "closing a stream after an invalid frame");
        let _ = recv.stop(quic::FRAME_INVALID.into());
    }
    outbox.closed.set(true);
    outbox.ready.notify();
    let mut send = writer.await;
    if failure.is_some() {
        let _ = send.reset(quic::FRAME_INVALID.into());
    } else {
        let _ = send.finish();
    }
}
