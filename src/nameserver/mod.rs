//! The name server: topic routes. In `orbitmq standalone` it runs in the broker's process and
//! reads the broker's topic table and shard endpoints directly; registration of remote brokers
//! over the network comes with the cluster issue.

pub mod topics;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{self, QueueRoute, RouteRequest, RouteResponse};

use crate::log::shape::Shape;
use crate::net::server::{error_frame, ok_frame, Handler, HandlerFuture, Peer};
use crate::shard::broker::BrokerShared;
use topics::{TopicConfig, PERM_READ, PERM_WRITE};

/// The route of a topic on one broker: every queue with the shard endpoint that owns it.
pub fn route(
    broker_name: &str,
    t: &TopicConfig,
    shape: &Shape,
    endpoints: &[SocketAddr],
) -> RouteResponse {
    let queues = (0..t.queues())
        .map(|q| {
            let shard = shape.shard_of(&t.name, q);
            let mut perm = 0;
            if q < t.read_queues {
                perm |= PERM_READ & t.perm;
            }
            if q < t.write_queues {
                perm |= PERM_WRITE & t.perm;
            }
            QueueRoute {
                broker_name: broker_name.to_owned(),
                queue_id: q,
                shard,
                endpoint: endpoints
                    .get(shard as usize)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                perm,
            }
        })
        .collect();
    RouteResponse {
        topic: t.name.clone(),
        queues,
    }
}

/// Serves routes for the brokers of this process.
pub struct NameServer {
    pub broker_name: String,
    pub broker: Arc<BrokerShared>,
}

impl NameServer {
    fn get_route(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let h: RouteRequest = match header::decode(&req.header) {
            Ok(h) => h,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        let t = match self.broker.topics.get_or_auto_create(&h.topic) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return error_frame(
                    id,
                    response::TOPIC_NOT_EXIST,
                    format!("no route for topic {}: it does not exist", h.topic),
                )
            }
            Err(e) => return error_frame(id, response::MESSAGE_ILLEGAL, e.to_string()),
        };
        let endpoints = self
            .broker
            .endpoints
            .get()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let r = route(&self.broker_name, &t, &self.broker.shape, endpoints);
        ok_frame(id, header::encode(&r), Bytes::new())
    }
}

impl Handler for NameServer {
    fn handle(self: Rc<Self>, req: Frame, _peer: &Peer) -> HandlerFuture {
        let resp = match req.code {
            request::GET_ROUTEINFO_BY_TOPIC => self.get_route(&req),
            request::HEART_BEAT => ok_frame(req.request_id, Bytes::new(), Bytes::new()),
            other => error_frame(
                req.request_id,
                response::REQUEST_CODE_NOT_SUPPORTED,
                format!("request code {other} is not supported by the name server"),
            ),
        };
        Box::pin(async move { resp })
    }
}

/// A name server running on its own executor thread.
pub struct NameServerHandle {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: glommio::ExecutorJoinHandle<()>,
}

/// How often the name server thread checks for the stop request.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(50);
/// Registered I/O memory of the name server's executor (it does no disk I/O).
const NAMESRV_IO_MEMORY: usize = 64 * 1024;

impl NameServerHandle {
    /// Binds `listen` and serves routes on a new (unpinned) executor thread.
    pub fn start(
        listen: SocketAddr,
        server: quinn::ServerConfig,
        ns: NameServer,
    ) -> Result<NameServerHandle, String> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop2 = stop.clone();
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
                let server = glommio::spawn_local(crate::net::server::serve(
                    endpoint.clone(),
                    Rc::new(ns),
                    conns,
                ));
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    glommio::timer::sleep(STOP_POLL).await;
                }
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
        Ok(NameServerHandle { addr, stop, handle })
    }

    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::shape::QueueMap;

    #[test]
    fn a_route_names_the_owning_shard_endpoint_of_each_queue() {
        let shape = Shape {
            shards: 2,
            map: QueueMap::TopicHashPlusQueue,
        };
        let eps: Vec<SocketAddr> = vec![
            "127.0.0.1:10911".parse().unwrap(),
            "127.0.0.1:10912".parse().unwrap(),
        ];
        let mut t = TopicConfig::new("T", 8);
        t.write_queues = 4;
        let r = route("b", &t, &shape, &eps);
        assert_eq!(r.queues.len(), 8);
        for q in &r.queues {
            assert_eq!(q.shard, shape.shard_of("T", q.queue_id));
            assert_eq!(q.endpoint, eps[q.shard as usize].to_string());
            let want = if q.queue_id < 4 {
                PERM_READ | PERM_WRITE
            } else {
                PERM_READ
            };
            assert_eq!(q.perm, want);
        }
        assert_eq!(r.queues.iter().filter(|q| q.shard == 0).count(), 4);
    }
}
