//! A `quinn::Runtime` that drives quinn inside one glommio `LocalExecutor` (one per shard).
//!
//! - Tasks quinn spawns (endpoint and connection drivers) run on the shard's executor
//!   (`glommio::spawn_local`), timers are glommio timers.
//! - The UDP socket goes through `quinn_udp::UdpSocketState`, so GSO/GRO and ECN stay on.
//!   Readiness comes from glommio's own io_uring: a `MSG_PEEK` receive on a dup of the socket's
//!   fd completes when a datagram is queued; then quinn-udp reads the queue without blocking.
//!   No reactor thread and no cross-thread wake-ups (measured at a third of the throughput).
//!
//! # The shard contract
//!
//! quinn's traits require `Send`/`Sync` because its stock runtimes move tasks between threads.
//! glommio's timers and sockets are `!Send` (they hold `Rc`s into the executor's reactor). This
//! runtime declares them `Send`/`Sync` on the promise that **every quinn object made on a shard
//! stays on that shard's thread**: the `Endpoint`, its `Connection`s and streams are created,
//! used and dropped there. Hand data to other shards as owned messages, never quinn handles.
//! Debug builds assert the thread on every use; all builds leak, rather than touch, a glommio
//! object dropped on a foreign thread (and log an error), since that is the case Rust's types
//! cannot rule out here (for example the last `Connection` clone dropped elsewhere).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

/// Default SO_RCVBUF/SO_SNDBUF of every endpoint socket: the client's (this VM's
/// `net.core.rmem_max`). Bigger flow-control windows without bigger socket buffers lost packets.
pub use orbitmq_client::quic::SOCKET_BUFFER_BYTES;

/// Socket buffer sizes of endpoints made from now on in this process (a tuning profile's
/// `udp_recv_buffer` / `udp_send_buffer`), set once at start.
static RECV_BUFFER: AtomicUsize = AtomicUsize::new(SOCKET_BUFFER_BYTES);
static SEND_BUFFER: AtomicUsize = AtomicUsize::new(SOCKET_BUFFER_BYTES);

/// Sets the UDP socket buffer sizes for endpoints made after this call.
pub fn set_socket_buffers(recv: usize, send: usize) {
    RECV_BUFFER.store(recv, Ordering::Relaxed);
    SEND_BUFFER.store(send, Ordering::Relaxed);
}

/// Bytes a readiness peek copies: it only waits for a datagram, quinn-udp reads it.
const PEEK_BYTES: usize = 1;

/// Failed readiness peeks tolerated in one `poll_recv` before the error goes to quinn (which
/// then stops the endpoint): a persistent failure must not spin the shard.
const MAX_PEEK_ERRORS_PER_POLL: usize = 4;

/// How long a connection waits before retrying a send that found the socket buffer full.
/// glommio exposes no write-readiness for a raw fd, and quinn retries a `Ready` poller at once,
/// so a short timer lets the executor run (and the kernel drain the buffer) in between.
const SEND_BLOCKED_BACKOFF: Duration = Duration::from_micros(200);

/// A value that stays on the shard thread that created it.
///
/// `Send`/`Sync` are declared so quinn accepts it; see the module docs for the contract.
struct ShardLocal<T> {
    value: ManuallyDrop<T>,
    owner: ThreadId,
}

// SAFETY: by the shard contract (module docs) the value is only created, used and dropped on
// `owner`; `get`/`get_mut` assert it in debug builds and `Drop` never touches the value
// elsewhere.
unsafe impl<T> Send for ShardLocal<T> {}
// SAFETY: as above; shared references are only dereferenced on `owner`.
unsafe impl<T> Sync for ShardLocal<T> {}

impl<T> ShardLocal<T> {
    fn new(value: T) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            owner: thread::current().id(),
        }
    }

    fn on_owner(&self) -> bool {
        thread::current().id() == self.owner
    }

    fn get(&self) -> &T {
        debug_assert!(self.on_owner(), "glommio object used off its shard thread");
        &self.value
    }

    fn get_mut(&mut self) -> &mut T {
        debug_assert!(self.on_owner(), "glommio object used off its shard thread");
        &mut self.value
    }
}

impl<T> Drop for ShardLocal<T> {
    fn drop(&mut self) {
        if self.on_owner() {
            // SAFETY: dropped exactly once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.value) }
        } else {
            tracing::error!(
                owner = ?self.owner,
                "a quinn object of a glommio shard was dropped on another thread: leaked"
            );
        }
    }
}

impl<T> fmt::Debug for ShardLocal<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardLocal")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// quinn runtime for one glommio executor. Make one per shard, on the shard's thread.
#[derive(Debug)]
pub struct GlommioRuntime {
    owner: ThreadId,
}

impl GlommioRuntime {
    /// The runtime of the current glommio executor.
    ///
    /// # Panics
    /// Outside a glommio executor.
    pub fn new() -> Arc<Self> {
        // Panics with glommio's own message outside an executor, before anything is built.
        let _ = glommio::executor().id();
        Arc::new(Self {
            owner: thread::current().id(),
        })
    }
}

impl Runtime for GlommioRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(GlommioTimer::at(at))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        debug_assert_eq!(thread::current().id(), self.owner, "spawn off the shard");
        glommio::spawn_local(future).detach();
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        if thread::current().id() != self.owner {
            return Err(io::Error::other(
                "a glommio quinn endpoint must be created on its shard's thread",
            ));
        }
        Ok(Arc::new(GlommioUdpSocket::new(socket)?))
    }
}

/// Binds a UDP socket on `addr` and makes a quinn endpoint driven by the current glommio
/// executor; with `server` it accepts connections, and it can always connect out.
///
/// # Panics
/// Outside a glommio executor.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    quinn::Endpoint::new(
        orbitmq_client::quic::endpoint_config(),
        server,
        socket,
        GlommioRuntime::new(),
    )
}

/// [`endpoint`] that accepts connections with `server`.
pub fn server_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> io::Result<quinn::Endpoint> {
    endpoint(addr, Some(server))
}

/// [`endpoint`] that only connects out (give each connection its `quinn::ClientConfig`, or set
/// a default with `Endpoint::set_default_client_config`).
pub fn client_endpoint(addr: SocketAddr) -> io::Result<quinn::Endpoint> {
    endpoint(addr, None)
}

/// A glommio timer that quinn can hold.
#[derive(Debug)]
struct GlommioTimer(ShardLocal<glommio::timer::Timer>);

impl GlommioTimer {
    fn at(at: Instant) -> Self {
        Self::after(at.saturating_duration_since(Instant::now()))
    }

    fn after(delay: Duration) -> Self {
        Self(ShardLocal::new(glommio::timer::Timer::new(delay)))
    }
}

impl AsyncTimer for GlommioTimer {
    fn reset(self: Pin<&mut Self>, at: Instant) {
        let delay = at.saturating_duration_since(Instant::now());
        self.get_mut().0.get_mut().reset(delay);
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Pin::new(self.get_mut().0.get_mut()).poll(cx).map(drop)
    }
}

type PeekFuture = Pin<Box<dyn Future<Output = io::Result<()>>>>;

/// The shard-local half of a socket: io_uring readiness and the send back-off flag.
struct Readiness {
    /// The pending `MSG_PEEK` receive, kept across polls so its io_uring request stays armed.
    peek: RefCell<Option<PeekFuture>>,
    /// glommio view of a dup of the socket's fd, used only to wait for readability.
    socket: Rc<glommio::net::UdpSocket>,
    /// Set when a send found the socket buffer full; pollers then back off once.
    send_blocked: Cell<bool>,
}

impl Readiness {
    fn peek_future(&self) -> PeekFuture {
        let socket = self.socket.clone();
        Box::pin(async move {
            let mut byte = [0u8; PEEK_BYTES];
            // `peek` fails with ENOTCONN on an unconnected socket; `peek_from` does not.
            socket
                .peek_from(&mut byte)
                .await
                .map(drop)
                .map_err(io::Error::from)
        })
    }
}

/// A UDP socket for quinn: quinn-udp for the datagrams, glommio's io_uring for readiness.
#[derive(Debug)]
pub struct GlommioUdpSocket {
    io: std::net::UdpSocket,
    state: UdpSocketState,
    local: ShardLocal<Readiness>,
}

impl GlommioUdpSocket {
    /// Wraps `socket` for the current glommio executor: sets the socket buffers to
    /// [`SOCKET_BUFFER_BYTES`], enables GRO/ECN through quinn-udp and makes it non-blocking.
    ///
    /// # Panics
    /// Outside a glommio executor.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        let (want_recv, want_send) = (
            RECV_BUFFER.load(Ordering::Relaxed),
            SEND_BUFFER.load(Ordering::Relaxed),
        );
        let (recv, send) =
            orbitmq_client::quic::size_socket_buffers(&state, &socket, want_recv, want_send);
        if recv < want_recv || send < want_send {
            tracing::warn!(
                recv,
                send,
                want_recv,
                want_send,
                "UDP socket buffers are smaller than wanted: raise net.core.rmem_max/wmem_max"
            );
        }
        let dup = socket.try_clone()?;
        // SAFETY: `into_raw_fd` hands over sole ownership of a valid, open fd.
        let peek_socket = unsafe { glommio::net::UdpSocket::from_raw_fd(dup.into_raw_fd()) };
        Ok(Self {
            io: socket,
            state,
            local: ShardLocal::new(Readiness {
                peek: RefCell::new(None),
                socket: Rc::new(peek_socket),
                send_blocked: Cell::new(false),
            }),
        })
    }
}

impl AsyncUdpSocket for GlommioUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(GlommioUdpPoller {
            socket: self,
            backoff: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let res = orbitmq_client::quic::send_segmented(transmit, |t| {
            self.state.send((&self.io).into(), t)
        });
        if matches!(&res, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.local.get().send_blocked.set(true);
        }
        res
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let readiness = self.local.get();
        let mut peek = readiness.peek.borrow_mut();
        let mut peek_errors = 0;
        loop {
            if let Some(pending) = peek.as_mut() {
                let res = ready!(pending.as_mut().poll(cx));
                *peek = None;
                if let Err(e) = res {
                    peek_errors += 1;
                    tracing::debug!(error = %e, "UDP readiness peek failed");
                    if peek_errors >= MAX_PEEK_ERRORS_PER_POLL {
                        return Poll::Ready(Err(e));
                    }
                }
            }
            match self.state.recv((&self.io).into(), bufs, meta) {
                // Queue empty: arm (and poll, above) a peek that completes on the next datagram.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    *peek = Some(readiness.peek_future());
                }
                res => return Poll::Ready(res),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Write readiness for one connection. Ready, except for one short back-off after a send found
/// the socket buffer full; it never stays pending (a pending poller means nothing is sent).
#[derive(Debug)]
struct GlommioUdpPoller {
    socket: Arc<GlommioUdpSocket>,
    backoff: Option<GlommioTimer>,
}

impl UdpPoller for GlommioUdpPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let blocked = &this.socket.local.get().send_blocked;
        let timer = match this.backoff.as_mut() {
            Some(timer) => timer,
            None if blocked.get() => this
                .backoff
                .insert(GlommioTimer::after(SEND_BLOCKED_BACKOFF)),
            None => return Poll::Ready(Ok(())),
        };
        ready!(AsyncTimer::poll(Pin::new(timer), cx));
        this.backoff = None;
        blocked.set(false);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tls;
    use glommio::{LocalExecutorBuilder, Placement};

    /// Messages carried in each direction.
    const MESSAGES: usize = 2_000;
    /// Bytes per message.
    const MESSAGE_BYTES: usize = 1024;
    /// Registered io_uring memory per test executor: tests run in parallel under an 8 MiB
    /// RLIMIT_MEMLOCK.
    const TEST_IO_MEMORY: usize = 512 << 10;
    /// Hang guard only (a failing test must end), not a timing assertion.
    const TEST_DEADLINE: Duration = Duration::from_secs(60);
    const CLIENT_SEED: u8 = 0x11;
    const SERVER_SEED: u8 = 0xA7;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Message `i` of a direction: its index, then a pattern that differs per message and side.
    fn message(seed: u8, i: usize) -> Vec<u8> {
        let mut m: Vec<u8> = (0..MESSAGE_BYTES)
            .map(|j| (j as u8).wrapping_mul(31) ^ seed ^ (i as u8))
            .collect();
        m[..8].copy_from_slice(&(i as u64).to_le_bytes());
        m
    }

    /// Runs `body` in a fresh glommio executor on its own thread, with a hang guard.
    fn in_executor<F, Fut>(body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(TEST_IO_MEMORY)
            .spawn(move || async move {
                glommio::timer::timeout(TEST_DEADLINE, async move {
                    body().await;
                    Ok(())
                })
                .await
                .expect("test did not finish before its hang guard");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    async fn send_all(mut send: quinn::SendStream, seed: u8) {
        for i in 0..MESSAGES {
            send.write_all(&message(seed, i)).await.unwrap();
        }
        send.finish().unwrap();
        // Resolves once the peer has all the data: closing earlier could lose its tail.
        assert_eq!(send.stopped().await.unwrap(), None);
    }

    async fn receive_all(mut recv: quinn::RecvStream, seed: u8) {
        let mut buf = vec![0u8; MESSAGE_BYTES];
        for i in 0..MESSAGES {
            recv.read_exact(&mut buf).await.unwrap();
            assert!(buf == message(seed, i), "message {i} differs");
        }
        assert_eq!(
            recv.read(&mut buf).await.unwrap(),
            None,
            "data after the end"
        );
    }

    #[test]
    fn tls_handshake_and_bidirectional_stream() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_owned();
        in_executor(move || async move {
            let identity = tls::load_or_create(&data_dir).unwrap();
            let server =
                endpoint(loopback(), Some(tls::server_config(&identity).unwrap())).unwrap();
            let server_addr = server.local_addr().unwrap();
            let client = endpoint(loopback(), None).unwrap();
            let client_config = tls::client_config(&identity.paths.ca).unwrap();

            let server_side = glommio::spawn_local(async move {
                let conn = server.accept().await.unwrap().await.unwrap();
                let (send, recv) = conn.accept_bi().await.unwrap();
                let writer = glommio::spawn_local(send_all(send, SERVER_SEED));
                receive_all(recv, CLIENT_SEED).await;
                writer.await;
                // The client closes once it has everything.
                conn.closed().await;
                server.wait_idle().await;
            });

            let conn = client
                .connect_with(client_config, server_addr, "localhost")
                .unwrap()
                .await
                .unwrap();
            let alpn = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            assert_eq!(alpn.as_deref(), Some(tls::ALPN));
            let (send, recv) = conn.open_bi().await.unwrap();
            let writer = glommio::spawn_local(send_all(send, CLIENT_SEED));
            receive_all(recv, SERVER_SEED).await;
            writer.await;
            conn.close(0u32.into(), b"done");
            server_side.await;
            client.wait_idle().await;
        });
    }

    #[test]
    fn a_client_with_another_ca_fails_the_handshake() {
        let server_dir = tempfile::tempdir().unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let (server_data, other_data) = (server_dir.path().to_owned(), other_dir.path().to_owned());
        in_executor(move || async move {
            let identity = tls::load_or_create(&server_data).unwrap();
            let other = tls::load_or_create(&other_data).unwrap();
            let server =
                endpoint(loopback(), Some(tls::server_config(&identity).unwrap())).unwrap();
            let server_addr = server.local_addr().unwrap();
            let client = endpoint(loopback(), None).unwrap();
            let wrong = tls::client_config(&other.paths.ca).unwrap();

            let server_side = glommio::spawn_local(async move {
                let incoming = server.accept().await.unwrap();
                assert!(
                    incoming.await.is_err(),
                    "server accepted a rejected handshake"
                );
            });

            let err = client
                .connect_with(wrong, server_addr, "localhost")
                .unwrap()
                .await
                .unwrap_err();
            let quinn::ConnectionError::TransportError(e) = &err else {
                panic!("expected a TLS transport error, got {err}");
            };
            let unknown_ca = rustls::AlertDescription::UnknownCA;
            assert_eq!(e.code, quinn::TransportErrorCode::crypto(unknown_ca.into()));
            assert!(e.reason.contains("invalid peer certificate"), "{err}");
            server_side.await;
            client.wait_idle().await;
        });
    }

    #[test]
    fn the_insecure_client_connects_without_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_owned();
        in_executor(move || async move {
            let identity = tls::load_or_create(&data_dir).unwrap();
            let server =
                endpoint(loopback(), Some(tls::server_config(&identity).unwrap())).unwrap();
            let server_addr = server.local_addr().unwrap();
            let client = endpoint(loopback(), None).unwrap();
            let server_side = glommio::spawn_local(async move {
                let conn = server.accept().await.unwrap().await.unwrap();
                conn.closed().await;
            });
            let conn = client
                .connect_with(
                    tls::insecure_client_config().unwrap(),
                    server_addr,
                    "any-name",
                )
                .unwrap()
                .await
                .unwrap();
            conn.close(0u32.into(), b"done");
            server_side.await;
            client.wait_idle().await;
        });
    }

    /// Polls once, reporting whether the poller was ready (pending leaves a wake-up armed).
    async fn ready_now(poller: &mut Pin<Box<dyn UdpPoller>>) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(poller.as_mut().poll_writable(cx).is_ready())).await
    }

    #[test]
    fn a_full_send_buffer_backs_off_once_then_is_writable() {
        in_executor(|| async {
            let socket = std::net::UdpSocket::bind(loopback()).unwrap();
            let socket = Arc::new(GlommioUdpSocket::new(socket).unwrap());
            let mut poller = socket.clone().create_io_poller();
            assert!(ready_now(&mut poller).await);
            // As after a send that returned WouldBlock.
            socket.local.get().send_blocked.set(true);
            assert!(!ready_now(&mut poller).await);
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                .await
                .unwrap();
            assert!(!socket.local.get().send_blocked.get());
            assert!(ready_now(&mut poller).await);
        });
    }

    #[test]
    fn a_socket_is_not_wrapped_off_the_shard_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        in_executor(move || async move {
            tx.send(GlommioRuntime::new()).unwrap();
        });
        let runtime = rx.recv().unwrap();
        let socket = std::net::UdpSocket::bind(loopback()).unwrap();
        assert!(runtime.wrap_udp_socket(socket).is_err());
    }
}
