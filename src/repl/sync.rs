//! A slave's control loop (RocketMQ's SlaveSynchronize): find the master of `brokerName`
//! (`haMasterAddress`, else the name servers' cluster info), check that it can be copied
//! (same shard count, queue map and segment size), publish its shard endpoints to the
//! shards' copiers, and keep this broker's topic table the master's.
//!
//! It runs on its own thread with a small tokio runtime and the orbitmq client, as the
//! registrar does: control traffic, off the shards' cores.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use orbitmq_client::{Client, ClientConfig, TlsOptions};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, ClusterInfoResponse, HaInfoResponse, TopicConfigsResponse};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::nameserver::routes::MASTER_ID;
use crate::nameserver::topics::{TopicConfig, Topics};
use crate::shard::broker::BrokerShared;

/// How often the master is looked up and its topics copied (RocketMQ: every 10 s; the
/// master's endpoints matter sooner after a restart).
pub const SYNC_PERIOD: Duration = Duration::from_secs(2);
/// The topic table is copied only if the log was copied this recently.
const TOPICS_NEED_COPY_WITHIN: Duration = Duration::from_secs(3);
/// Timeout of each control request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What the slave is and where it looks for its master.
#[derive(Clone, Debug)]
pub struct SlaveSyncConfig {
    pub broker_name: String,
    pub shards: u32,
    pub queue_map: String,
    pub segment_size: u64,
    /// `haMasterAddress`: the master's shard 0 endpoint; `None`: ask the name servers.
    pub master_address: Option<String>,
    pub namesrv: Vec<String>,
    pub tls: TlsOptions,
}

/// The running loop; [`SlaveSync::stop`] ends it.
pub struct SlaveSync {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlaveSync {
    pub fn start(
        cfg: SlaveSyncConfig,
        shared: Arc<BrokerShared>,
        topics: Arc<Topics>,
    ) -> Result<SlaveSync, String> {
        let (stop, mut stopped) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("slave sync runtime: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("slave-sync".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut last = String::new();
                    // One client while it works (each holds a socket and its buffers).
                    let mut client: Option<Client> = None;
                    loop {
                        let outcome = tokio::select! {
                            r = round(&cfg, &shared, &topics, &mut client) => r,
                            _ = stopped.changed() => break,
                        };
                        let said = match &outcome {
                            Ok(master) => format!("following the master at {master}"),
                            Err(e) => e.clone(),
                        };
                        if said != last {
                            match &outcome {
                                Ok(_) => info!(broker = %cfg.broker_name, "{said}"),
                                Err(_) => warn!(broker = %cfg.broker_name, "slave: {said}"),
                            }
                            last = said;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(SYNC_PERIOD) => {}
                            _ = stopped.changed() => break,
                        }
                    }
                })
            })
            .map_err(|e| format!("slave sync thread: {e}"))?;
        Ok(SlaveSync {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A request whose answer must be SUCCESS; returns the answer's header.
async fn request(client: &Client, to: &str, code: u16) -> Result<Bytes, String> {
    let f = client
        .request(to, code, Bytes::new(), Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    if f.code != response::SUCCESS {
        return Err(orbitmq_client::ClientError::from_response(f.code, &f.header, "").to_string());
    }
    Ok(f.header)
}

fn bad_answer(from: &str) -> impl Fn(header::HeaderError) -> String + '_ {
    move |e| format!("bad answer from {from}: {e}")
}

/// The master's shard 0 endpoint: configured, or the name servers' master of our name.
async fn master_address(cfg: &SlaveSyncConfig, client: &Client) -> Result<String, String> {
    if let Some(a) = &cfg.master_address {
        return Ok(a.clone());
    }
    let mut last = "no name server configured".to_string();
    for ns in &cfg.namesrv {
        let info = request(client, ns, request::GET_BROKER_CLUSTER_INFO)
            .await
            .and_then(|h| header::decode::<ClusterInfoResponse>(&h).map_err(bad_answer(ns)));
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                last = format!("name server {ns}: {e}");
                continue;
            }
        };
        let master = info
            .clusters
            .iter()
            .flat_map(|(_, brokers)| brokers)
            .filter(|b| b.broker.broker_name == cfg.broker_name)
            .flat_map(|b| &b.broker.addrs)
            .find(|(id, _)| *id == MASTER_ID);
        match master {
            Some((_, addr)) => return Ok(addr.clone()),
            None => last = format!("name server {ns} knows no master of {}", cfg.broker_name),
        }
    }
    Err(last)
}

/// `endpoints` with their host replaced by `addr`'s (`host:port`).
fn with_host_of(addr: &str, endpoints: &[String]) -> Vec<String> {
    let Some((host, _)) = addr.rsplit_once(':') else {
        return endpoints.to_vec();
    };
    endpoints
        .iter()
        .map(|e| match e.rsplit_once(':') {
            Some((_, port)) => format!("{host}:{port}"),
            None => e.clone(),
        })
        .collect()
}

/// A client for the name servers and the master.
async fn control_client(cfg: &SlaveSyncConfig) -> Result<Client, String> {
    let first = cfg
        .master_address
        .clone()
        .or_else(|| cfg.namesrv.first().cloned())
        .ok_or("neither haMasterAddress nor a name server is configured")?;
    let mut cc = ClientConfig::new(&first).with_tls(cfg.tls.clone());
    cc.request_timeout = REQUEST_TIMEOUT;
    Client::new(cc).await.map_err(|e| e.to_string())
}

/// The master's shard 0 endpoint and what it says of itself (HA_INFO).
async fn master_info(
    cfg: &SlaveSyncConfig,
    client: &Client,
) -> Result<(String, HaInfoResponse), String> {
    let master = master_address(cfg, client).await?;
    let info = request(client, &master, request::HA_INFO)
        .await
        .and_then(|h| header::decode::<HaInfoResponse>(&h).map_err(bad_answer(&master)))
        .map_err(|e| format!("master {master}: {e}"))?;
    Ok((master, info))
}

/// Asks the master once for its shard count: a slave's new data directory takes it, so that
/// a slave needs no `shards` setting. `cfg`'s shape fields are not used.
pub fn master_shards(cfg: &SlaveSyncConfig) -> Result<u32, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = control_client(cfg).await?;
        let r = master_info(cfg, &client).await;
        client.shutdown().await;
        let (_, info) = r?;
        if info.broker_name != cfg.broker_name {
            return Err(format!("the master is broker {}", info.broker_name));
        }
        Ok(info.shards)
    })
}

/// One round: find and check the master, publish its endpoints, copy its topics.
async fn round(
    cfg: &SlaveSyncConfig,
    shared: &BrokerShared,
    topics: &Topics,
    kept: &mut Option<Client>,
) -> Result<String, String> {
    let client = match kept.take() {
        Some(c) => c,
        None => control_client(cfg).await?,
    };
    let r = async {
        let (master, info) = master_info(cfg, &client).await?;
        let mismatch = if info.broker_name != cfg.broker_name {
            Some(format!("it is broker {}", info.broker_name))
        } else if info.shards != cfg.shards || info.queue_map != cfg.queue_map {
            Some(format!(
                "it has {} shards mapped by {}, this slave {} by {} (start the slave with --shards {} on an empty data directory)",
                info.shards, info.queue_map, cfg.shards, cfg.queue_map, info.shards
            ))
        } else if info.segment_size != cfg.segment_size {
            Some(format!(
                "its mappedFileSizeCommitLog is {}, this slave's {}",
                info.segment_size, cfg.segment_size
            ))
        } else if info.shard_endpoints.len() != cfg.shards as usize {
            Some("it lists the wrong number of shard endpoints".into())
        } else {
            None
        };
        if let Some(why) = mismatch {
            *shared.master.lock().expect("master lock") = None;
            return Err(format!("cannot copy the master at {master}: {why}"));
        }
        // With haMasterAddress, the master is reached at that host (its shards' ports).
        let endpoints = match &cfg.master_address {
            Some(a) => with_host_of(a, &info.shard_endpoints),
            None => info.shard_endpoints.clone(),
        };
        *shared.master.lock().expect("master lock") = Some(endpoints);
        // The topic table follows the master only while its log is being copied: a master
        // that is not this slave's (wiped, or another broker's) must not empty it.
        let copied = shared.copied_at_ms.load(std::sync::atomic::Ordering::Relaxed);
        if orbitmq_proto::now_ms().saturating_sub(copied) > TOPICS_NEED_COPY_WITHIN.as_millis() as u64 {
            return Ok(format!("{master} (topics follow once its log is being copied)"));
        }
        let t = request(&client, &master, request::GET_ALL_TOPIC_CONFIG)
            .await
            .and_then(|h| header::decode::<TopicConfigsResponse>(&h).map_err(bad_answer(&master)))
            .map_err(|e| format!("master {master}'s topics: {e}"))?;
        let table = t
            .topics
            .into_iter()
            .map(|d| TopicConfig {
                name: d.name,
                read_queues: d.read_queues,
                write_queues: d.write_queues,
                perm: d.perm,
                auto_created: d.auto_created,
            })
            .collect();
        topics
            .replace_all(table)
            .map_err(|e| format!("master {master}'s topics: {e}"))?;
        Ok(master)
    }
    .await;
    // After a failure the next round connects afresh (a master restarted on the same address
    // is reached at once).
    if r.is_ok() {
        *kept = Some(client);
    } else {
        client.shutdown().await;
    }
    r
}
