//! An in-process mock of the orbitmq name server and a two-shard broker over real QUIC and
//! TLS, speaking orbitmq-proto. It exists to test the client without the real broker; the
//! end-to-end tests against `orbitmq standalone` live in the workspace's tests/e2e.rs.
//!
//! Behaviour: 8 queues per topic, queue q on shard q % 2; no tag filtering at the broker
//! (so the client's exact-tag check is always exercised); topic `NoSuchTopic` does not
//! exist; topic `Illegal` is refused with MESSAGE_ILLEGAL; topic `Flaky` fails the first
//! attempt of every message with SYSTEM_BUSY; topic `Moved` has a stale route naming shard 0
//! for every queue (the odd ones answer WRONG_SHARD with a redirect). Every connection gets a NOTICE push.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use orbitmq_proto::codes::{push, request, response};
use orbitmq_proto::frame::{Frame, FrameDecoder, Kind};
use orbitmq_proto::header::{self, *};
use orbitmq_proto::limits::MAX_MESSAGE_SIZE;
use orbitmq_proto::msgid::{OffsetId, UNIQ_KEY};
use orbitmq_proto::record::{self, Placement};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, Notify};

pub const QUEUES: u32 = 8;
pub const SHARDS: u32 = 2;
pub const BROKER: &str = "mock";

type Handler = Arc<dyn Fn(Frame) -> Pin<Box<dyn Future<Output = Frame> + Send>> + Send + Sync>;

#[derive(Default)]
pub struct State {
    queues: Mutex<HashMap<(String, u32), Vec<Bytes>>>,
    offsets: Mutex<HashMap<(String, String, u32), u64>>,
    phys: [AtomicU64; SHARDS as usize],
    appended: Notify,
    flaky_failed: Mutex<HashSet<String>>,
    /// (uniq key, queue id) of every send attempt, in order.
    pub send_attempts: Mutex<Vec<(String, u32)>>,
    pub heartbeats: AtomicUsize,
    pub pulls: AtomicUsize,
    shards: Mutex<Vec<SocketAddr>>,
}

pub struct MockBroker {
    pub namesrv: String,
    pub shards: Vec<String>,
    pub ca: PathBuf,
    pub state: Arc<State>,
    _dir: tempfile::TempDir,
    endpoints: Vec<quinn::Endpoint>,
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        for e in &self.endpoints {
            e.close(0u32.into(), b"mock stopped");
        }
    }
}

fn error(req: &Frame, code: u16, message: &str, redirect: &str) -> Frame {
    Frame::new(
        Kind::Response,
        code,
        req.request_id,
        header::encode(&ErrorResponse {
            message: message.into(),
            redirect: redirect.into(),
        }),
        Bytes::new(),
    )
}

fn ok(req: &Frame, header: Bytes, body: Bytes) -> Frame {
    Frame::new(
        Kind::Response,
        response::SUCCESS,
        req.request_id,
        header,
        body,
    )
}

fn server_config() -> (quinn::ServerConfig, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("cert");
    let pem = ck.cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .with_no_client_auth()
    .with_single_cert(vec![CertificateDer::from(ck.cert.der().to_vec())], key)
    .expect("server cert");
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
    (quinn::ServerConfig::with_crypto(Arc::new(crypto)), pem)
}

impl MockBroker {
    pub async fn start() -> MockBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, pem) = server_config();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pem).expect("write ca");
        let state = Arc::new(State::default());
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let ns = quinn::Endpoint::server(cfg.clone(), any).expect("namesrv endpoint");
        let mut shard_eps = Vec::new();
        for _ in 0..SHARDS {
            shard_eps.push(quinn::Endpoint::server(cfg.clone(), any).expect("shard endpoint"));
        }
        let shard_addrs: Vec<SocketAddr> =
            shard_eps.iter().map(|e| e.local_addr().unwrap()).collect();
        *state.shards.lock().unwrap() = shard_addrs.clone();
        let shards: Vec<String> = shard_addrs.iter().map(|a| a.to_string()).collect();

        let st = state.clone();
        let sh = shards.clone();
        let ns_handler: Handler = Arc::new(move |f| {
            let st = st.clone();
            let sh = sh.clone();
            Box::pin(async move { namesrv(&st, &sh, f) })
        });
        tokio::spawn(serve(ns.clone(), ns_handler));
        for (i, ep) in shard_eps.iter().enumerate() {
            let st = state.clone();
            let sh = shards.clone();
            let h: Handler = Arc::new(move |f| {
                let st = st.clone();
                let sh = sh.clone();
                Box::pin(async move { shard(st, &sh, i as u32, f).await })
            });
            tokio::spawn(serve(ep.clone(), h));
        }
        let mut endpoints = vec![ns.clone()];
        endpoints.extend(shard_eps);
        MockBroker {
            namesrv: ns.local_addr().unwrap().to_string(),
            shards,
            ca,
            state,
            _dir: dir,
            endpoints,
        }
    }

    /// Messages stored in a queue.
    pub fn queue_len(&self, topic: &str, q: u32) -> usize {
        self.state
            .queues
            .lock()
            .unwrap()
            .get(&(topic.to_owned(), q))
            .map_or(0, Vec::len)
    }

    pub fn committed(&self, group: &str, topic: &str, q: u32) -> Option<u64> {
        self.state
            .offsets
            .lock()
            .unwrap()
            .get(&(group.to_owned(), topic.to_owned(), q))
            .copied()
    }
}

async fn serve(ep: quinn::Endpoint, handler: Handler) {
    while let Some(incoming) = ep.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            // Prove the push channel: one notice per connection.
            if let Ok(mut uni) = conn.open_uni().await {
                let f = Frame::new(
                    Kind::Push,
                    push::NOTICE,
                    0,
                    header::encode(&Notice {
                        message: "welcome".into(),
                    }),
                    Bytes::new(),
                );
                let _ = uni.write_all(&f.to_bytes()).await;
                let _ = uni.finish();
            }
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
                    tokio::spawn(async move {
                        while let Some(f) = rx.recv().await {
                            if send.write_all(&f.to_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut dec = FrameDecoder::new();
                    while let Ok(Some(chunk)) = recv.read_chunk(64 * 1024, true).await {
                        dec.push(&chunk.bytes);
                        while let Ok(Some(f)) = dec.next_frame() {
                            let handler = handler.clone();
                            let tx = tx.clone();
                            tokio::spawn(async move {
                                let _ = tx.send(handler(f).await);
                            });
                        }
                    }
                });
            }
        });
    }
}

fn namesrv(_st: &State, shards: &[String], f: Frame) -> Frame {
    if f.code != request::GET_ROUTEINFO_BY_TOPIC {
        return error(&f, response::REQUEST_CODE_NOT_SUPPORTED, "namesrv", "");
    }
    let Ok(req) = header::decode::<RouteRequest>(&f.header) else {
        return error(&f, response::BAD_REQUEST, "bad header", "");
    };
    if req.topic == "NoSuchTopic" {
        return error(&f, response::TOPIC_NOT_EXIST, "no route", "");
    }
    let queues = (0..QUEUES)
        .map(|q| QueueRoute {
            broker_name: BROKER.into(),
            queue_id: q,
            shard: q % SHARDS,
            // `Moved`: a stale route that names shard 0 for every queue.
            endpoint: if req.topic == "Moved" {
                shards[0].clone()
            } else {
                shards[(q % SHARDS) as usize].clone()
            },
            perm: 6,
        })
        .collect();
    ok(
        &f,
        header::encode(&RouteResponse {
            topic: req.topic,
            queues,
        }),
        Bytes::new(),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn shard(st: Arc<State>, shards: &[String], me: u32, f: Frame) -> Frame {
    let wrong = |q: u32| q % SHARDS != me;
    match f.code {
        request::SEND_MESSAGE => {
            let Ok(req) = header::decode::<SendRequest>(&f.header) else {
                return error(&f, response::BAD_REQUEST, "bad header", "");
            };
            if wrong(req.queue_id) {
                let owner = &shards[(req.queue_id % SHARDS) as usize];
                return error(&f, response::WRONG_SHARD, "not mine", owner);
            }
            for m in &req.messages {
                let key = m
                    .properties
                    .iter()
                    .find(|(k, _)| k == UNIQ_KEY)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                st.send_attempts.lock().unwrap().push((key, req.queue_id));
            }
            if req.topic == "Illegal" {
                return error(&f, response::MESSAGE_ILLEGAL, "mock refuses this topic", "");
            }
            if req.topic == "Flaky" {
                let key = req.messages[0]
                    .properties
                    .iter()
                    .find(|(k, _)| k == UNIQ_KEY)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                if st.flaky_failed.lock().unwrap().insert(key) {
                    return error(&f, response::SYSTEM_BUSY, "try elsewhere", "");
                }
            }
            let total: usize = req.messages.iter().map(|m| m.body_len as usize).sum();
            if total != f.body.len() {
                return error(&f, response::BAD_REQUEST, "body lengths", "");
            }
            if req
                .messages
                .iter()
                .any(|m| m.body_len as usize > MAX_MESSAGE_SIZE)
            {
                return error(&f, response::MESSAGE_ILLEGAL, "body too large", "");
            }
            let addr = st.shards.lock().unwrap()[me as usize];
            let mut results = Vec::new();
            let mut at = 0usize;
            {
                let mut qs = st.queues.lock().unwrap();
                let q = qs.entry((req.topic.clone(), req.queue_id)).or_default();
                for m in &req.messages {
                    let body = &f.body[at..at + m.body_len as usize];
                    at += m.body_len as usize;
                    let msg = record::Message {
                        topic: req.topic.clone(),
                        queue_id: req.queue_id,
                        flag: m.flag,
                        sys_flag: m.sys_flag,
                        born_timestamp: m.born_timestamp,
                        born_host: None,
                        reconsume_times: 0,
                        prepared_tx_offset: 0,
                        tags: m.tags.clone(),
                        keys: m.keys.clone(),
                        properties: m.properties.clone(),
                        body: body.to_vec(),
                    };
                    let len = record::encoded_len(&msg).unwrap() as u64;
                    let phys = st.phys[me as usize].fetch_add(len, Ordering::SeqCst);
                    let mut out = Vec::new();
                    record::encode_into(
                        &msg,
                        Placement {
                            queue_offset: q.len() as u64,
                            physical_offset: phys,
                            store_timestamp: now_ms(),
                        },
                        &mut out,
                    );
                    results.push(header::SendResult {
                        msg_id: OffsetId::new(addr, me as u16, phys).encode(),
                        queue_offset: q.len() as u64,
                    });
                    q.push(Bytes::from(out));
                }
            }
            st.appended.notify_waiters();
            ok(
                &f,
                header::encode(&SendResponse {
                    queue_id: req.queue_id,
                    results,
                }),
                Bytes::new(),
            )
        }
        request::PULL_MESSAGE => {
            st.pulls.fetch_add(1, Ordering::Relaxed);
            let Ok(req) = header::decode::<PullRequest>(&f.header) else {
                return error(&f, response::BAD_REQUEST, "bad header", "");
            };
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(u64::from(req.suspend_ms));
            loop {
                let appended = st.appended.notified();
                let (results, body, found) = pull_once(&st, me, &req);
                if found || tokio::time::Instant::now() >= deadline {
                    return ok(&f, header::encode(&PullResponse { queues: results }), body);
                }
                let _ = tokio::time::timeout_at(deadline, appended).await;
            }
        }
        request::QUERY_CONSUMER_OFFSET => {
            let Ok(r) = header::decode::<QueueRequest>(&f.header) else {
                return error(&f, response::BAD_REQUEST, "bad header", "");
            };
            match st
                .offsets
                .lock()
                .unwrap()
                .get(&(r.group, r.topic, r.queue_id))
            {
                Some(&offset) => ok(&f, header::encode(&OffsetResponse { offset }), Bytes::new()),
                None => error(&f, response::QUERY_NOT_FOUND, "none", ""),
            }
        }
        request::UPDATE_CONSUMER_OFFSET => {
            let Ok(r) = header::decode::<QueueValueRequest>(&f.header) else {
                return error(&f, response::BAD_REQUEST, "bad header", "");
            };
            st.offsets
                .lock()
                .unwrap()
                .insert((r.group, r.topic, r.queue_id), r.value);
            ok(&f, Bytes::new(), Bytes::new())
        }
        request::GET_MIN_OFFSET | request::GET_MAX_OFFSET | request::SEARCH_OFFSET_BY_TIMESTAMP => {
            let (topic, q) = if f.code == request::SEARCH_OFFSET_BY_TIMESTAMP {
                match header::decode::<QueueValueRequest>(&f.header) {
                    Ok(r) => (r.topic, r.queue_id),
                    Err(_) => return error(&f, response::BAD_REQUEST, "bad header", ""),
                }
            } else {
                match header::decode::<QueueRequest>(&f.header) {
                    Ok(r) => (r.topic, r.queue_id),
                    Err(_) => return error(&f, response::BAD_REQUEST, "bad header", ""),
                }
            };
            if wrong(q) {
                let owner = &shards[(q % SHARDS) as usize];
                return error(&f, response::WRONG_SHARD, "not mine", owner);
            }
            let len = st
                .queues
                .lock()
                .unwrap()
                .get(&(topic, q))
                .map_or(0, |v| v.len() as u64);
            let offset = if f.code == request::GET_MAX_OFFSET {
                len
            } else {
                0
            };
            ok(&f, header::encode(&OffsetResponse { offset }), Bytes::new())
        }
        request::HEART_BEAT => {
            if header::decode::<HeartbeatRequest>(&f.header).is_err() {
                return error(&f, response::BAD_REQUEST, "bad header", "");
            }
            st.heartbeats.fetch_add(1, Ordering::Relaxed);
            ok(&f, Bytes::new(), Bytes::new())
        }
        _ => error(&f, response::REQUEST_CODE_NOT_SUPPORTED, "unknown", ""),
    }
}

fn pull_once(st: &State, me: u32, req: &PullRequest) -> (Vec<PullQueueResult>, Bytes, bool) {
    let qs = st.queues.lock().unwrap();
    let mut body = Vec::new();
    let mut results = Vec::new();
    let mut found = false;
    for pq in &req.queues {
        let empty = Vec::new();
        let stored = qs.get(&(pq.topic.clone(), pq.queue_id)).unwrap_or(&empty);
        let max = stored.len() as u64;
        let mut r = PullQueueResult {
            topic: pq.topic.clone(),
            queue_id: pq.queue_id,
            status: response::PULL_NOT_FOUND,
            next_offset: pq.offset,
            min_offset: 0,
            max_offset: max,
            count: 0,
            bytes: 0,
            redirect: String::new(),
        };
        if pq.queue_id % SHARDS != me {
            r.status = response::WRONG_SHARD;
        } else if pq.offset > max {
            r.status = response::PULL_OFFSET_MOVED;
            r.next_offset = max;
        } else if pq.offset < max {
            r.status = response::SUCCESS;
            let mut off = pq.offset;
            while off < max
                && (off - pq.offset) < u64::from(pq.max_msgs)
                && body.len() < req.max_bytes as usize
            {
                let rec = &stored[off as usize];
                body.extend_from_slice(rec);
                r.bytes += rec.len() as u32;
                r.count += 1;
                off += 1;
            }
            r.next_offset = off;
            found = true;
        }
        results.push(r);
    }
    (results, Bytes::from(body), found)
}
