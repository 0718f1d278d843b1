//! The name server: brokers register with it, clients ask it for routes.
//!
//! Stateless and independent (as RocketMQ's): several name servers run with no link between
//! them and each holds only what brokers tell it ([`routes::RouteInfoManager`]), so a restarted
//! one is whole again after the next round of registrations. The only state of its own is the
//! KV config ([`kv`]). In `orbitmq standalone` it runs in the broker's process and the broker
//! registers with it directly, without the network.

pub mod kv;
pub mod registrar;
pub mod routes;
pub mod topics;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{
    self, ClusterRequest, KvConfigRequest, KvConfigResponse, RegisterBrokerRequest, RouteRequest,
    TopicListResponse, UnregisterBrokerRequest,
};
use tracing::{info, warn};

use crate::net::server::{error_frame, ok_frame, Handler, HandlerFuture, Peer};
use kv::KvConfig;
use routes::{RouteError, RouteInfoManager};

/// The tables of one name server, shared by its request handler, its expiry scan and (in
/// standalone) the broker that registers in-process.
#[derive(Clone)]
pub struct NameServerState {
    pub routes: Arc<Mutex<RouteInfoManager>>,
    pub kv: Arc<Mutex<KvConfig>>,
}

impl NameServerState {
    pub fn new(kv: KvConfig) -> NameServerState {
        NameServerState {
            routes: Arc::new(Mutex::new(RouteInfoManager::new())),
            kv: Arc::new(Mutex::new(kv)),
        }
    }

    /// Records a registration (from the network or in-process) and logs a newcomer.
    pub fn register(&self, r: &RegisterBrokerRequest) -> Result<(), routes::RegisterError> {
        let new = self
            .routes
            .lock()
            .expect("routes lock")
            .register(r, Instant::now())?;
        if new {
            info!(cluster = %r.cluster, broker = %r.broker_name, id = r.broker_id,
                addr = %r.shard_endpoints[0], topics = r.topics.len(), "broker registered");
        }
        Ok(())
    }
}

/// Timings of a name server.
#[derive(Clone, Copy, Debug)]
pub struct NameServerTimings {
    /// A broker silent this long is dropped.
    pub broker_expiry: Duration,
    /// How often silent brokers are looked for.
    pub scan_interval: Duration,
}

impl Default for NameServerTimings {
    fn default() -> Self {
        NameServerTimings {
            broker_expiry: routes::DEFAULT_BROKER_EXPIRY,
            scan_interval: routes::DEFAULT_SCAN_INTERVAL,
        }
    }
}

/// Serves the name server requests.
pub struct NameServer {
    pub state: NameServerState,
}

fn bad(id: u64, e: impl ToString) -> Frame {
    error_frame(id, response::BAD_REQUEST, e.to_string())
}

impl NameServer {
    fn dispatch(&self, req: &Frame, peer: &Peer) -> Frame {
        let id = req.request_id;
        let routes = || self.state.routes.lock().expect("routes lock");
        match req.code {
            request::GET_ROUTEINFO_BY_TOPIC => {
                let h: RouteRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return bad(id, e),
                };
                match routes().route(&h.topic) {
                    Ok(r) => ok_frame(id, header::encode(&r), Bytes::new()),
                    Err(e @ RouteError::NotExist(_)) => {
                        error_frame(id, response::TOPIC_NOT_EXIST, e.to_string())
                    }
                    Err(e) => error_frame(id, response::MESSAGE_ILLEGAL, e.to_string()),
                }
            }
            request::REGISTER_BROKER => {
                let h: RegisterBrokerRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return bad(id, e),
                };
                match self.state.register(&h) {
                    Ok(()) => ok_frame(id, Bytes::new(), Bytes::new()),
                    Err(e) => {
                        warn!(remote = %peer.remote, error = %e, "registration refused");
                        bad(id, e)
                    }
                }
            }
            request::UNREGISTER_BROKER => {
                let h: UnregisterBrokerRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return bad(id, e),
                };
                if routes().unregister(&h.broker_name, h.broker_id, &h.addr) {
                    info!(cluster = %h.cluster, broker = %h.broker_name, id = h.broker_id,
                        addr = %h.addr, "broker unregistered");
                }
                ok_frame(id, Bytes::new(), Bytes::new())
            }
            request::GET_BROKER_CLUSTER_INFO => {
                let info = routes().cluster_info(Instant::now());
                ok_frame(id, header::encode(&info), Bytes::new())
            }
            request::GET_TOPICS_BY_CLUSTER | request::GET_ALL_TOPIC_LIST_FROM_NAMESERVER => {
                let cluster = if req.code == request::GET_TOPICS_BY_CLUSTER {
                    match header::decode::<ClusterRequest>(&req.header) {
                        Ok(h) => h.cluster,
                        Err(e) => return bad(id, e),
                    }
                } else {
                    String::new()
                };
                let topics = routes().topics(&cluster);
                ok_frame(
                    id,
                    header::encode(&TopicListResponse { topics }),
                    Bytes::new(),
                )
            }
            request::PUT_KV_CONFIG | request::GET_KV_CONFIG | request::DELETE_KV_CONFIG => {
                let h: KvConfigRequest = match header::decode(&req.header) {
                    Ok(h) => h,
                    Err(e) => return bad(id, e),
                };
                let mut kv = self.state.kv.lock().expect("kv lock");
                match req.code {
                    request::PUT_KV_CONFIG => match kv.put(&h.namespace, &h.key, &h.value) {
                        Ok(()) => ok_frame(id, Bytes::new(), Bytes::new()),
                        Err(e) => bad(id, e),
                    },
                    request::GET_KV_CONFIG => match kv.get(&h.namespace, &h.key) {
                        Some(v) => ok_frame(
                            id,
                            header::encode(&KvConfigResponse {
                                value: v.to_owned(),
                            }),
                            Bytes::new(),
                        ),
                        None => error_frame(
                            id,
                            response::QUERY_NOT_FOUND,
                            format!("no KV config {} in namespace {}", h.key, h.namespace),
                        ),
                    },
                    _ => match kv.delete(&h.namespace, &h.key) {
                        Ok(_) => ok_frame(id, Bytes::new(), Bytes::new()),
                        Err(e) => error_frame(id, response::SYSTEM_ERROR, e.to_string()),
                    },
                }
            }
            request::HEART_BEAT => ok_frame(id, Bytes::new(), Bytes::new()),
            other => error_frame(
                id,
                response::REQUEST_CODE_NOT_SUPPORTED,
                format!("request code {other} is not supported by the name server"),
            ),
        }
    }
}

impl Handler for NameServer {
    fn handle(self: Rc<Self>, req: Frame, peer: &Peer) -> HandlerFuture {
        let resp = self.dispatch(&req, peer);
        Box::pin(async move { resp })
    }
}

/// Drops silent brokers every `scan_interval`.
async fn expiry_scan(state: NameServerState, t: NameServerTimings) {
    loop {
        glommio::timer::sleep(t.scan_interval).await;
        let gone = state
            .routes
            .lock()
            .expect("routes lock")
            .expire(Instant::now(), t.broker_expiry);
        for g in gone {
            warn!(cluster = %g.cluster, broker = %g.broker_name, id = g.broker_id, addr = %g.addr,
                expiry = ?t.broker_expiry, "broker silent too long: dropped");
        }
    }
}

/// A name server running on its own executor thread.
pub struct NameServerHandle {
    pub addr: SocketAddr,
    pub state: NameServerState,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: glommio::ExecutorJoinHandle<()>,
}

/// How often the name server thread checks for the stop request.
const STOP_POLL: Duration = Duration::from_millis(50);
/// Registered I/O memory of the name server's executor (it does no disk I/O).
const NAMESRV_IO_MEMORY: usize = 64 * 1024;

impl NameServerHandle {
    /// Binds `listen` and serves on a new (unpinned) executor thread.
    pub fn start(
        listen: SocketAddr,
        server: quinn::ServerConfig,
        state: NameServerState,
        timings: NameServerTimings,
    ) -> Result<NameServerHandle, String> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
        let state2 = state.clone();
        let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .name("namesrv")
            .io_memory(NAMESRV_IO_MEMORY)
            .spawn(move || async move {
                let endpoint = match crate::net::runtime::server_endpoint(listen, server) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(format!("name server cannot listen on {listen}: {e}")));
                        return;
                    }
                };
                let _ = tx.send(endpoint.local_addr().map_err(|e| e.to_string()));
                let conns = Rc::new(crate::net::server::Connections::default());
                let scan = glommio::spawn_local(expiry_scan(state2.clone(), timings));
                let server = glommio::spawn_local(crate::net::server::serve(
                    endpoint.clone(),
                    Rc::new(NameServer { state: state2 }),
                    conns,
                ));
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    glommio::timer::sleep(STOP_POLL).await;
                }
                scan.cancel().await;
                endpoint.close(orbitmq_proto::codes::quic::SHUTDOWN.into(), b"shutdown");
                futures_lite::future::or(
                    endpoint.wait_idle(),
                    glommio::timer::sleep(crate::shard::SHUTDOWN_GRACE),
                )
                .await;
                server.await;
            })
            .map_err(|e| e.to_string())?;
        let addr = rx
            .recv()
            .map_err(|_| "name server thread exited".to_string())??;
        Ok(NameServerHandle {
            addr,
            state,
            stop,
            handle,
        })
    }

    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.handle.join();
    }
}
