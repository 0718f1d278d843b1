//! QUIC throughput on loopback through the glommio quinn runtime: one connection, one stream,
//! 1 KiB messages written 64 at a time. Two layouts: client and server endpoints in one glommio
//! executor (one core does both sides), and the server on a second executor (as a shard).
//!
//! `cargo bench --bench quic -- --warm-up-time 1 --measurement-time 5`; criterion reports
//! elements/s = messages/s.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use orbitmq::net::{runtime, tls};

/// Bytes per message.
const MESSAGE_BYTES: usize = 1024;
/// Messages per `write_all`.
const MESSAGES_PER_WRITE: usize = 64;
/// Registered io_uring memory for the bench executor (fits an 8 MiB RLIMIT_MEMLOCK).
const IO_MEMORY: usize = 1 << 20;
/// Bytes of the batch-size header that starts each measured batch.
const HEADER_BYTES: usize = 8;

/// The client half of a connection kept open across criterion's batches.
struct Link {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    client: quinn::Endpoint,
}

impl Link {
    /// Closes the connection and lets the close reach the server (its sink then returns).
    async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.client.wait_idle().await;
    }
}

/// Server: for each batch, reads the announced byte count, then acknowledges with one byte,
/// so a batch's time covers delivery, not just queueing on the sender.
async fn sink(server: quinn::Endpoint) {
    let Some(incoming) = server.accept().await else {
        return;
    };
    let Ok(conn) = incoming.await else { return };
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let mut buf = vec![0u8; MESSAGE_BYTES * MESSAGES_PER_WRITE];
    loop {
        let mut header = [0u8; HEADER_BYTES];
        if recv.read_exact(&mut header).await.is_err() {
            return;
        }
        let mut left = u64::from_le_bytes(header) as usize;
        while left > 0 {
            let n = left.min(buf.len());
            if recv.read_exact(&mut buf[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        if send.write_all(&[1]).await.is_err() {
            return;
        }
    }
}

/// A server endpoint on the current executor, its sink task spawned.
fn serve(identity: &tls::ServerIdentity) -> SocketAddr {
    let server = runtime::server_endpoint(loopback(), tls::server_config(identity).unwrap())
        .expect("server endpoint");
    let addr = server.local_addr().unwrap();
    glommio::spawn_local(sink(server)).detach();
    addr
}

async fn connect(addr: SocketAddr, ca: &Path) -> Link {
    let client = runtime::client_endpoint(loopback()).expect("client endpoint");
    let conn = client
        .connect_with(tls::client_config(ca).unwrap(), addr, "localhost")
        .unwrap()
        .await
        .expect("handshake");
    let (send, recv) = conn.open_bi().await.unwrap();
    Link {
        send,
        recv,
        conn,
        client,
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Sends `writes` writes of 64 messages and waits for the server's acknowledgement.
async fn batch(link: &mut Link, chunk: &[u8], writes: u64) -> Duration {
    let start = Instant::now();
    let total = chunk.len() as u64 * writes;
    link.send.write_all(&total.to_le_bytes()).await.unwrap();
    for _ in 0..writes {
        link.send.write_all(chunk).await.unwrap();
    }
    let mut ack = [0u8; 1];
    link.recv.read_exact(&mut ack).await.unwrap();
    start.elapsed()
}

fn executor() -> LocalExecutor {
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(IO_MEMORY)
        .make()
        .expect("glommio executor")
}

fn measure(c: &mut Criterion, name: &str, ex: &LocalExecutor, link: &mut Link) {
    let chunk: Vec<u8> = (0..MESSAGE_BYTES * MESSAGES_PER_WRITE)
        .map(|i| (i % 251) as u8)
        .collect();
    let mut group = c.benchmark_group("quic");
    group.throughput(Throughput::Elements(MESSAGES_PER_WRITE as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|writes| ex.run(batch(link, &chunk, writes)))
    });
    group.finish();
}

/// The asked-for layout: client and server endpoints in one executor, so one core does both
/// sides' crypto and copies.
fn one_executor(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let identity = tls::load_or_create(dir.path()).expect("TLS files");
    let ex = executor();
    let mut link = ex.run(async {
        let addr = serve(&identity);
        connect(addr, &identity.paths.ca).await
    });
    measure(c, "1KiB_x64_one_executor", &ex, &mut link);
    ex.run(link.close());
}

/// The broker's layout: the server on its own executor (a shard), the client on another.
fn two_executors(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let identity = tls::load_or_create(dir.path()).expect("TLS files");
    let ca = identity.paths.ca.clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(IO_MEMORY)
        .spawn(move || async move {
            let server =
                runtime::server_endpoint(loopback(), tls::server_config(&identity).unwrap())
                    .expect("server endpoint");
            addr_tx.send(server.local_addr().unwrap()).unwrap();
            // Returns when the client closes the connection.
            sink(server).await;
        })
        .expect("server executor");
    let addr = addr_rx.recv().unwrap();
    let ex = executor();
    let mut link = ex.run(connect(addr, &ca));
    measure(c, "1KiB_x64_two_executors", &ex, &mut link);
    ex.run(link.close());
    server.join().expect("server executor ends");
}

criterion_group!(benches, one_executor, two_executors);
criterion_main!(benches);
