//! The broker's side of the name servers: register with every one of them on start, every
//! `registerNameServerPeriod`, and at once when the topic table changes; unregister on a clean
//! shutdown.
//!
//! It runs on its own thread with a small tokio runtime and the orbitmq client's connections:
//! this is control traffic, off the shards' cores. Each name server has its own loop, so a dead
//! one never delays the others. In standalone the in-process name server is one more target,
//! fed directly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use orbitmq_client::{Client, ClientConfig, TlsOptions};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, RegisterBrokerRequest, UnregisterBrokerRequest};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::routes::topic_data;
use super::topics::Topics;
use super::NameServerState;

/// RocketMQ's `registerNameServerPeriod`.
pub const DEFAULT_REGISTER_PERIOD: Duration = Duration::from_secs(30);
/// Shortest and longest registration period accepted (short ones are for tests).
pub const MIN_REGISTER_PERIOD: Duration = Duration::from_millis(100);
pub const MAX_REGISTER_PERIOD: Duration = Duration::from_secs(60);
/// How long start-up waits for the first round of registrations before going on.
pub const FIRST_ROUND_WAIT: Duration = Duration::from_secs(5);
/// Bounds of a registration request's timeout (the period, within them): a name server
/// answers in milliseconds, and a dead one must not hold up the next attempt for long.
pub const MIN_REGISTER_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_REGISTER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a clean shutdown waits for the name servers to take the unregistration.
pub const UNREGISTER_WAIT: Duration = Duration::from_secs(1);

/// Who the broker is and where it registers.
#[derive(Clone, Debug)]
pub struct RegistrarConfig {
    pub cluster: String,
    pub broker_name: String,
    pub broker_id: u64,
    /// Advertised `host:port` of every shard endpoint.
    pub shard_endpoints: Vec<String>,
    pub queue_map: String,
    pub auto_create: bool,
    pub default_queues: u32,
    /// Name servers reached over the network.
    pub namesrv: Vec<String>,
    /// How the broker verifies the name servers.
    pub tls: TlsOptions,
    pub period: Duration,
}

/// What to register now: the broker and its current topic table.
pub fn registration(c: &RegistrarConfig, topics: &Topics) -> RegisterBrokerRequest {
    RegisterBrokerRequest {
        cluster: c.cluster.clone(),
        broker_name: c.broker_name.clone(),
        broker_id: c.broker_id,
        shard_endpoints: c.shard_endpoints.clone(),
        queue_map: c.queue_map.clone(),
        topics: topics.snapshot().values().map(topic_data).collect(),
        auto_create_topic: c.auto_create,
        default_topic_queue_nums: c.default_queues,
    }
}

fn unregistration(c: &RegistrarConfig) -> UnregisterBrokerRequest {
    UnregisterBrokerRequest {
        cluster: c.cluster.clone(),
        broker_name: c.broker_name.clone(),
        broker_id: c.broker_id,
        addr: c.shard_endpoints[0].clone(),
    }
}

/// A name server reached over the network, with its own client: after any failure the client
/// is dropped and the next attempt connects afresh, so a name server restarted on the same
/// address is reached at the next period (QUIC cannot tell a dead peer from a quiet one until
/// its idle timeout).
struct RemoteTarget {
    addr: String,
    tls: TlsOptions,
    timeout: Duration,
    client: tokio::sync::Mutex<Option<Client>>,
}

/// Where registrations go.
#[derive(Clone)]
enum Target {
    Local(NameServerState),
    Remote(Arc<RemoteTarget>),
}

impl Target {
    fn name(&self) -> &str {
        match self {
            Target::Local(_) => "in-process",
            Target::Remote(r) => &r.addr,
        }
    }

    async fn send(&self, code: u16, h: Bytes) -> Result<(), String> {
        let Target::Remote(r) = self else {
            return Ok(());
        };
        let mut slot = r.client.lock().await;
        let client = match &*slot {
            Some(c) => c.clone(),
            None => {
                let mut cc = ClientConfig::new(&r.addr).with_tls(r.tls.clone());
                cc.request_timeout = r.timeout;
                let c = Client::new(cc).await.map_err(|e| e.to_string())?;
                *slot = Some(c.clone());
                c
            }
        };
        let res = client.request(&r.addr, code, h, Bytes::new()).await;
        let f = match res {
            Ok(f) => f,
            Err(e) => {
                if let Some(c) = slot.take() {
                    c.shutdown().await;
                }
                return Err(e.to_string());
            }
        };
        if f.code == response::SUCCESS {
            Ok(())
        } else {
            Err(orbitmq_client::ClientError::from_response(f.code, &f.header, "").to_string())
        }
    }

    async fn shutdown(&self) {
        if let Target::Remote(r) = self {
            if let Some(c) = r.client.lock().await.take() {
                c.shutdown().await;
            }
        }
    }

    async fn register(&self, cfg: &RegistrarConfig, topics: &Topics) -> Result<(), String> {
        let r = registration(cfg, topics);
        match self {
            Target::Local(s) => s.register(&r).map_err(|e| e.to_string()),
            _ => {
                self.send(request::REGISTER_BROKER, header::encode(&r))
                    .await
            }
        }
    }

    async fn unregister(&self, cfg: &RegistrarConfig) -> Result<(), String> {
        let u = unregistration(cfg);
        match self {
            Target::Local(s) => {
                s.routes.lock().expect("routes lock").unregister(
                    &u.broker_name,
                    u.broker_id,
                    &u.addr,
                );
                Ok(())
            }
            _ => {
                self.send(request::UNREGISTER_BROKER, header::encode(&u))
                    .await
            }
        }
    }
}

/// Registers, logging only changes between success and failure.
async fn register_logged(t: &Target, cfg: &RegistrarConfig, topics: &Topics, ok: &mut bool) {
    match t.register(cfg, topics).await {
        Ok(()) => {
            if !*ok {
                info!(namesrv = t.name(), "registered with the name server");
            }
            *ok = true;
        }
        Err(e) if *ok => {
            warn!(namesrv = t.name(), error = %e, "registration with the name server failed; retrying every period");
            *ok = false;
        }
        Err(e) => debug!(namesrv = t.name(), error = %e, "registration failed again"),
    }
}

async fn target_loop(
    t: Target,
    cfg: Arc<RegistrarConfig>,
    topics: Arc<Topics>,
    mut changed: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
    mut ok: bool,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.period) => {}
            r = changed.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        register_logged(&t, &cfg, &topics, &mut ok).await;
    }
}

/// The running registration thread.
pub struct Registrar {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registrar {
    /// Starts registering; returns after the first round (or [`FIRST_ROUND_WAIT`]), so a
    /// client that reads the ready line finds the broker in the routes.
    pub fn start(
        cfg: RegistrarConfig,
        topics: Arc<Topics>,
        local: Option<NameServerState>,
    ) -> Result<Registrar, String> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (first_tx, first_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let cfg = Arc::new(cfg);
        let thread = std::thread::Builder::new()
            .name("registrar".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = first_tx.send(Err(format!("registrar runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(run(cfg, topics, local, stop_rx, first_tx));
            })
            .map_err(|e| format!("cannot start the registrar thread: {e}"))?;
        // A timeout only means slow name servers: the loops go on registering.
        if let Ok(Err(e)) = first_rx.recv_timeout(FIRST_ROUND_WAIT) {
            let _ = thread.join();
            return Err(e);
        }
        Ok(Registrar {
            stop: stop_tx,
            thread: Some(thread),
        })
    }

    /// Unregisters from every name server (bounded) and stops.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn run(
    cfg: Arc<RegistrarConfig>,
    topics: Arc<Topics>,
    local: Option<NameServerState>,
    stop: watch::Receiver<bool>,
    first: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut targets: Vec<Target> = local.into_iter().map(Target::Local).collect();
    if !cfg.namesrv.is_empty() {
        // Check the TLS settings once, up front: a bad CA file is a start-up error.
        let cc = ClientConfig::new(&cfg.namesrv.join(";")).with_tls(cfg.tls.clone());
        match Client::new(cc).await {
            Ok(c) => c.shutdown().await,
            Err(e) => {
                let _ = first.send(Err(format!("cannot reach the name servers: {e}")));
                return;
            }
        }
        targets.extend(cfg.namesrv.iter().map(|a| {
            Target::Remote(Arc::new(RemoteTarget {
                addr: a.clone(),
                tls: cfg.tls.clone(),
                timeout: cfg.period.clamp(MIN_REGISTER_TIMEOUT, MAX_REGISTER_TIMEOUT),
                client: tokio::sync::Mutex::new(None),
            }))
        }));
    }
    // First round, all targets at once.
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in targets.iter().cloned().enumerate() {
        let (cfg, topics) = (cfg.clone(), topics.clone());
        set.spawn(async move {
            let mut ok = true;
            register_logged(&t, &cfg, &topics, &mut ok).await;
            (i, ok)
        });
    }
    let mut oks = vec![false; targets.len()];
    while let Some(r) = set.join_next().await {
        if let Ok((i, ok)) = r {
            oks[i] = ok;
        }
    }
    let _ = first.send(Ok(()));

    let (changed_tx, changed_rx) = watch::channel(0u64);
    let trigger = {
        let topics = topics.clone();
        tokio::spawn(async move {
            loop {
                topics.changed().await;
                changed_tx.send_modify(|g| *g += 1);
            }
        })
    };
    let mut loops = tokio::task::JoinSet::new();
    for (t, ok) in targets.iter().cloned().zip(oks) {
        loops.spawn(target_loop(
            t,
            cfg.clone(),
            topics.clone(),
            changed_rx.clone(),
            stop.clone(),
            ok,
        ));
    }
    let mut stop2 = stop.clone();
    let _ = stop2.wait_for(|s| *s).await;
    trigger.abort();
    while loops.join_next().await.is_some() {}
    let mut set = tokio::task::JoinSet::new();
    for t in &targets {
        let cfg = cfg.clone();
        let t2 = t.clone();
        set.spawn(async move {
            let t = t2;
            match tokio::time::timeout(UNREGISTER_WAIT, t.unregister(&cfg)).await {
                Ok(Ok(())) => info!(namesrv = t.name(), "unregistered"),
                Ok(Err(e)) => warn!(namesrv = t.name(), error = %e, "unregistration failed"),
                Err(_) => warn!(namesrv = t.name(), "unregistration timed out"),
            }
        });
    }
    while set.join_next().await.is_some() {}
    for t in &targets {
        t.shutdown().await;
    }
}
