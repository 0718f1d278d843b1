//! broker.conf: RocketMQ's property format and keys, plus orbitmq's own.
//!
//! An unknown key or a malformed value is an error naming the key and line. A RocketMQ key that
//! orbitmq knows but does not act on yet is a warning. A value orbitmq cannot honour is an
//! error.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::log::retention::{self, RetentionPolicy};
use crate::log::FlushMode;

/// RocketMQ's default broker port.
pub const DEFAULT_LISTEN_PORT: u16 = 10911;
/// RocketMQ's default cluster and broker names.
pub const DEFAULT_CLUSTER: &str = "DefaultCluster";
pub const DEFAULT_BROKER_NAME: &str = "broker-a";
/// Longest property file accepted.
const MAX_CONF_LEN: u64 = 1 << 20;
/// Shortest `channelExpiredTimeout` accepted (tests use a few seconds).
const MIN_CLIENT_EXPIRY_MS: u64 = 1000;
use crate::nameserver::registrar::{MAX_REGISTER_PERIOD, MIN_REGISTER_PERIOD};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}:{line}: unknown key {key:?} (see the README for the keys orbitmq reads)")]
    UnknownKey {
        path: String,
        line: usize,
        key: String,
    },
    #[error("{path}:{line}: {key} = {value:?}: {why}")]
    BadValue {
        path: String,
        line: usize,
        key: String,
        value: String,
        why: String,
    },
    #[error("{path}:{line}: expected `key = value`")]
    Syntax { path: String, line: usize },
    #[error("{path}: {why}")]
    Io { path: String, why: String },
}

/// RocketMQ's broker roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerRole {
    AsyncMaster,
    SyncMaster,
    Slave,
}

/// Settings read from broker.conf (defaults as RocketMQ's).
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub cluster_name: String,
    pub broker_name: String,
    pub broker_id: u64,
    pub namesrv_addr: Vec<String>,
    pub listen_port: u16,
    pub store_path_root_dir: Option<PathBuf>,
    pub flush_disk_type: FlushMode,
    pub flush_interval: Duration,
    pub segment_size: u64,
    pub broker_role: BrokerRole,
    pub retention: RetentionPolicy,
    pub auto_create_topic: bool,
    /// `enablePropertyFilter`: serve SQL92 filter subscriptions (on unless set false).
    pub property_filter: bool,
    pub default_topic_queue_nums: u32,
    pub shards: Option<u32>,
    pub cores: Option<String>,
    pub tuning_profile: Option<String>,
    /// `brokerIP1`: the address advertised for the shard endpoints when listening on 0.0.0.0.
    pub broker_ip1: Option<IpAddr>,
    /// `registerNameServerPeriod` (ms): how often the broker registers with the name servers.
    pub register_period: Duration,
    /// `channelExpiredTimeout` (ms): a client silent this long leaves its groups.
    pub client_expiry: Duration,
    /// `tlsCertFile`, `tlsKeyFile`: this node's certificate (chain) and key, in PEM.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// `tlsCaFile`: the cluster CA; clients are pointed at it and name servers verified by it.
    pub tls_ca_file: Option<PathBuf>,
    /// `messageDelayLevel` and `timerMaxDelaySec`.
    pub schedule: crate::schedule::ScheduleConfig,
    /// `messageIndexEnable`, `maxHashSlotNum`, `maxIndexNum`: the key index (`None`: off).
    pub index: Option<crate::log::config::IndexConfig>,
    /// `transactionCheckInterval` (ms), `transactionTimeOut` (ms), `transactionCheckMax`.
    pub txn: crate::txn::TxConfig,
    /// `haMasterAddress`, `haMaxGapNotInSync`, `syncFlushTimeout`: replication.
    pub ha: crate::repl::HaConfig,
    /// Warnings to log at start (keys known but not acted on).
    pub warnings: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            cluster_name: DEFAULT_CLUSTER.into(),
            broker_name: DEFAULT_BROKER_NAME.into(),
            broker_id: 0,
            namesrv_addr: Vec::new(),
            listen_port: DEFAULT_LISTEN_PORT,
            store_path_root_dir: None,
            flush_disk_type: FlushMode::Async,
            flush_interval: crate::log::config::DEFAULT_FLUSH_INTERVAL,
            segment_size: crate::log::config::DEFAULT_SEGMENT_SIZE,
            broker_role: BrokerRole::AsyncMaster,
            retention: RetentionPolicy::default(),
            auto_create_topic: true,
            property_filter: true,
            default_topic_queue_nums: crate::nameserver::topics::DEFAULT_TOPIC_QUEUE_NUMS,
            shards: None,
            cores: None,
            tuning_profile: None,
            broker_ip1: None,
            register_period: crate::nameserver::registrar::DEFAULT_REGISTER_PERIOD,
            client_expiry: crate::shard::clients::DEFAULT_CLIENT_EXPIRY,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            schedule: crate::schedule::ScheduleConfig::default(),
            index: Some(crate::log::config::IndexConfig::default()),
            txn: crate::txn::TxConfig::default(),
            ha: crate::repl::HaConfig::default(),
            warnings: Vec::new(),
        }
    }
}

/// RocketMQ keys orbitmq accepts but does not act on yet.
const KNOWN_NOT_ACTED_ON: &[&str] = &[
    "brokerIP2",
    "haListenPort",
    "sendMessageThreadPoolNums",
    "pullMessageThreadPoolNums",
    "storePathCommitLog",
    "storePathConsumeQueue",
    "maxMessageSize",
    "mappedFileSizeConsumeQueue",
    "transientStorePoolEnable",
    "autoCreateSubscriptionGroup",
    "aclEnable",
];

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

fn parse_num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| "expected a whole number".to_string())
}

impl BrokerConfig {
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let io = |why: String| ConfigError::Io {
            path: path.display().to_string(),
            why,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| io(e.to_string()))?
            .len();
        if len > MAX_CONF_LEN {
            return Err(io(format!(
                "{len} bytes is over the limit of {MAX_CONF_LEN}"
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| io(e.to_string()))?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses property text (`key = value`, `#` and `!` comments).
    pub fn parse(path: &str, text: &str) -> Result<BrokerConfig, ConfigError> {
        let mut c = BrokerConfig::default();
        let mut index = crate::log::config::IndexConfig::default();
        let mut index_enable = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((k, v)) = line.split_once(['=', ':']) else {
                return Err(ConfigError::Syntax {
                    path: path.into(),
                    line: i + 1,
                });
            };
            let (k, v) = (k.trim(), v.trim());
            let bad = |why: String| ConfigError::BadValue {
                path: path.into(),
                line: i + 1,
                key: k.into(),
                value: v.into(),
                why,
            };
            match k {
                "brokerClusterName" => c.cluster_name = v.into(),
                "brokerName" => c.broker_name = v.into(),
                "brokerId" => c.broker_id = parse_num(v).map_err(bad)?,
                "namesrvAddr" => {
                    c.namesrv_addr = v
                        .split(';')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }
                "listenPort" => c.listen_port = parse_num(v).map_err(bad)?,
                "storePathRootDir" => c.store_path_root_dir = Some(PathBuf::from(v)),
                "flushDiskType" => c.flush_disk_type = v.parse().map_err(bad)?,
                "flushIntervalCommitLog" => {
                    c.flush_interval = Duration::from_millis(parse_num(v).map_err(bad)?)
                }
                "mappedFileSizeCommitLog" => c.segment_size = parse_num(v).map_err(bad)?,
                "brokerRole" => {
                    c.broker_role = match v {
                        "ASYNC_MASTER" => BrokerRole::AsyncMaster,
                        "SYNC_MASTER" => BrokerRole::SyncMaster,
                        "SLAVE" => BrokerRole::Slave,
                        _ => return Err(bad("expected ASYNC_MASTER, SYNC_MASTER or SLAVE".into())),
                    }
                }
                "deleteWhen" => {
                    c.retention.delete_when_hours =
                        retention::parse_delete_when(v).map_err(|e| bad(e.to_string()))?
                }
                "fileReservedTime" => {
                    c.retention.file_reserved_hours = parse_num(v).map_err(bad)?
                }
                "diskMaxUsedSpaceRatio" => {
                    let pct: u32 = parse_num(v).map_err(bad)?;
                    if !(10..=95).contains(&pct) {
                        return Err(bad("expected a percentage from 10 to 95".into()));
                    }
                    c.retention.disk_max_used_ratio = pct as f64 / 100.0;
                }
                "diskSpaceCleanForciblyRatio" => {
                    let pct: u32 = parse_num(v).map_err(bad)?;
                    if !(10..=99).contains(&pct) {
                        return Err(bad("expected a percentage from 10 to 99".into()));
                    }
                    c.retention.disk_force_clean_ratio = pct as f64 / 100.0;
                }
                "autoCreateTopicEnable" => c.auto_create_topic = parse_bool(v).map_err(bad)?,
                "enablePropertyFilter" => c.property_filter = parse_bool(v).map_err(bad)?,
                "messageIndexEnable" => index_enable = Some(parse_bool(v).map_err(bad)?),
                "transactionCheckInterval" => {
                    let ms: u64 = parse_num(v).map_err(bad)?;
                    let min = crate::txn::MIN_CHECK_INTERVAL.as_millis() as u64;
                    if ms < min {
                        return Err(bad(format!("must be at least {min} ms")));
                    }
                    c.txn.check_interval = Duration::from_millis(ms);
                }
                "transactionTimeOut" => c.txn.timeout_ms = parse_num(v).map_err(bad)?,
                "transactionCheckMax" => {
                    let n: u32 = parse_num(v).map_err(bad)?;
                    if n > crate::txn::MAX_CHECK_MAX {
                        return Err(bad(format!(
                            "must be at most {}",
                            crate::txn::MAX_CHECK_MAX
                        )));
                    }
                    c.txn.check_max = n;
                }
                "maxHashSlotNum" | "maxIndexNum" => {
                    use crate::log::indexfile::{MAX_HASH_SLOTS, MAX_INDEX_NUM};
                    let n: u32 = parse_num(v).map_err(bad)?;
                    let max = if k == "maxHashSlotNum" {
                        MAX_HASH_SLOTS
                    } else {
                        MAX_INDEX_NUM
                    };
                    if n == 0 || n > max {
                        return Err(bad(format!("must be 1..={max}")));
                    }
                    if k == "maxHashSlotNum" {
                        index.hash_slots = n;
                    } else {
                        index.max_entries = n;
                    }
                }
                "defaultTopicQueueNums" => {
                    let n: u32 = parse_num(v).map_err(bad)?;
                    if n == 0 || n > orbitmq_proto::limits::MAX_QUEUES_PER_TOPIC {
                        return Err(bad(format!(
                            "expected 1..={}",
                            orbitmq_proto::limits::MAX_QUEUES_PER_TOPIC
                        )));
                    }
                    c.default_topic_queue_nums = n;
                }
                "shards" => {
                    let n: u32 = parse_num(v).map_err(bad)?;
                    if n == 0 {
                        return Err(bad("expected at least 1".into()));
                    }
                    c.shards = Some(n);
                }
                "cores" => {
                    crate::shard::parse_cores(v).map_err(bad)?;
                    c.cores = Some(v.into());
                }
                "tuningProfile" => c.tuning_profile = Some(v.into()),
                "brokerIP1" => {
                    c.broker_ip1 = Some(
                        v.parse()
                            .map_err(|_| bad("expected an IP address".into()))?,
                    )
                }
                "registerNameServerPeriod" => {
                    let ms: u64 = parse_num(v).map_err(bad)?;
                    let d = Duration::from_millis(ms);
                    let (lo, hi) = (MIN_REGISTER_PERIOD, MAX_REGISTER_PERIOD);
                    if d < lo || d > hi {
                        return Err(bad(format!(
                            "expected {}..={} milliseconds",
                            lo.as_millis(),
                            hi.as_millis()
                        )));
                    }
                    c.register_period = d;
                }
                "channelExpiredTimeout" => {
                    let ms: u64 = parse_num(v).map_err(bad)?;
                    if ms < MIN_CLIENT_EXPIRY_MS {
                        return Err(bad(format!(
                            "expected at least {MIN_CLIENT_EXPIRY_MS} milliseconds"
                        )));
                    }
                    c.client_expiry = Duration::from_millis(ms);
                }
                "messageDelayLevel" => {
                    c.schedule.levels_ms =
                        crate::schedule::parse_levels(v).map_err(|e| bad(e.to_string()))?
                }
                "timerMaxDelaySec" => {
                    let secs: u64 = parse_num(v).map_err(bad)?;
                    let max = crate::schedule::MAX_TIMER_MAX_DELAY_SEC;
                    if !(1..=max).contains(&secs) {
                        return Err(bad(format!("expected 1..={max} seconds")));
                    }
                    c.schedule.timer_max_delay_ms = secs * 1000;
                }
                "haMasterAddress" => {
                    if v.rsplit_once(':')
                        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                    {
                        return Err(bad(
                            "expected host:port of the master's broker address".into()
                        ));
                    }
                    c.ha.master_address = Some(v.into())
                }
                "haMaxGapNotInSync" => {
                    c.ha.max_gap = parse_num(v).map_err(bad)?;
                    if c.ha.max_gap == 0 {
                        return Err(bad("expected a number of bytes above 0".into()));
                    }
                }
                "syncFlushTimeout" => {
                    let ms: u64 = parse_num(v).map_err(bad)?;
                    if ms < crate::repl::MIN_SLAVE_TIMEOUT_MS {
                        return Err(bad(format!(
                            "expected at least {} ms",
                            crate::repl::MIN_SLAVE_TIMEOUT_MS
                        )));
                    }
                    c.ha.slave_timeout = Duration::from_millis(ms)
                }
                "tlsCertFile" => c.tls_cert_file = Some(PathBuf::from(v)),
                "tlsKeyFile" => c.tls_key_file = Some(PathBuf::from(v)),
                "tlsCaFile" => c.tls_ca_file = Some(PathBuf::from(v)),
                k if KNOWN_NOT_ACTED_ON.contains(&k) => c.warnings.push(format!(
                    "{path}:{}: {k} is a RocketMQ setting orbitmq does not act on yet; ignored",
                    i + 1
                )),
                _ => {
                    return Err(ConfigError::UnknownKey {
                        path: path.into(),
                        line: i + 1,
                        key: k.into(),
                    })
                }
            }
        }
        c.index = index_enable.unwrap_or(true).then_some(index);
        if c.broker_role == BrokerRole::Slave {
            if c.broker_id == crate::nameserver::routes::MASTER_ID {
                return Err(ConfigError::Io {
                    path: path.into(),
                    why: "brokerRole = SLAVE needs a brokerId of 1 or more (0 is the master's)"
                        .into(),
                });
            }
        } else if c.broker_id != crate::nameserver::routes::MASTER_ID {
            c.warnings.push(format!(
                "{path}: brokerId = {}: a master's id is 0 (as RocketMQ), so 0 is used",
                c.broker_id
            ));
            c.broker_id = crate::nameserver::routes::MASTER_ID;
        }
        if c.tls_cert_file.is_some() != c.tls_key_file.is_some() {
            return Err(ConfigError::Io {
                path: path.into(),
                why: "tlsCertFile and tlsKeyFile go together".into(),
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "#broker.conf\nbrokerClusterName = DefaultCluster\nbrokerName = broker-a\nbrokerId = 0\ndeleteWhen = 04\nfileReservedTime = 48\nbrokerRole = ASYNC_MASTER\nflushDiskType = ASYNC_FLUSH\nmessageDelayLevel = 1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h\n";

    #[test]
    fn the_shipped_examples_parse() {
        let c = BrokerConfig::parse("broker.conf", include_str!("../conf/broker.conf")).unwrap();
        assert_eq!(c.broker_role, BrokerRole::AsyncMaster);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = BrokerConfig::parse("broker-a-s.conf", include_str!("../conf/broker-a-s.conf"))
            .unwrap();
        assert_eq!((c.broker_role, c.broker_id), (BrokerRole::Slave, 1));
        assert_eq!(c.broker_name, "broker-a");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn the_seed_example_parses() {
        let c = BrokerConfig::parse("broker.conf", SEED).unwrap();
        assert_eq!(c.broker_name, "broker-a");
        assert_eq!(c.retention.file_reserved_hours, 48);
        assert_eq!(c.retention.delete_when_hours, vec![4]);
        assert_eq!(c.flush_disk_type, FlushMode::Async);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.schedule.levels_ms.len(), 18);
        assert_eq!(c.schedule.levels_ms[17], 2 * 3600 * 1000);
        let c = BrokerConfig::parse(
            "b.conf",
            "messageDelayLevel = 200ms 1s\ntimerMaxDelaySec = 60\n",
        )
        .unwrap();
        assert_eq!(c.schedule.levels_ms, vec![200, 1000]);
        assert_eq!(c.schedule.timer_max_delay_ms, 60_000);
        let e = BrokerConfig::parse("b.conf", "\nmessageDelayLevel = 1s 5q\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.conf:2") && e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = BrokerConfig::parse("b.conf", "brokerId = 0\nflushDiskType = FAST\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.conf:2") && e.contains("flushDiskType"), "{e}");
        let e = BrokerConfig::parse("b.conf", "\nbrokerNam = x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.conf:2") && e.contains("brokerNam"), "{e}");
        let e = BrokerConfig::parse("b.conf", "brokerRole = SLAVE\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokerId of 1 or more"), "{e}");
        let c = BrokerConfig::parse(
            "b.conf",
            "brokerRole = SLAVE\nbrokerId = 2\nhaMasterAddress = 10.0.0.1:10911\nsyncFlushTimeout = 800\n",
        )
        .unwrap();
        assert_eq!((c.broker_role, c.broker_id), (BrokerRole::Slave, 2));
        assert_eq!(c.ha.master_address.as_deref(), Some("10.0.0.1:10911"));
        assert_eq!(c.ha.slave_timeout, Duration::from_millis(800));
        assert!(BrokerConfig::parse("b.conf", "haMasterAddress = nowhere\n").is_err());
        assert!(BrokerConfig::parse("b.conf", "syncFlushTimeout = 1\n").is_err());
        assert!(BrokerConfig::parse("b.conf", "listenPort = 99999\n").is_err());
        assert!(BrokerConfig::parse("b.conf", "just words\n").is_err());
    }

    #[test]
    fn orbitmq_keys() {
        let c = BrokerConfig::parse(
            "b",
            "shards = 2\ncores = 0-1\nflushDiskType = SYNC_FLUSH\nnamesrvAddr = a:1;b:2\n",
        )
        .unwrap();
        assert_eq!(c.shards, Some(2));
        assert_eq!(c.cores.as_deref(), Some("0-1"));
        assert_eq!(c.flush_disk_type, FlushMode::Sync);
        assert_eq!(c.namesrv_addr, vec!["a:1", "b:2"]);
        assert!(BrokerConfig::parse("b", "shards = 0\n").is_err());
    }

    #[test]
    fn transaction_keys() {
        let c = BrokerConfig::parse(
            "b",
            "transactionCheckInterval = 500\ntransactionTimeOut = 1000\ntransactionCheckMax = 3\n",
        )
        .unwrap();
        assert_eq!(c.txn.check_interval, Duration::from_millis(500));
        assert_eq!((c.txn.timeout_ms, c.txn.check_max), (1000, 3));
        for bad in [
            "transactionCheckInterval = 5\n",
            "transactionCheckMax = 5000\n",
        ] {
            let e = BrokerConfig::parse("b", bad).unwrap_err().to_string();
            assert!(e.contains("b:1"), "{bad}: {e}");
        }
    }

    #[test]
    fn index_keys() {
        use crate::log::config::IndexConfig;
        let c = BrokerConfig::parse("b", "").unwrap();
        assert_eq!(c.index, Some(IndexConfig::default()), "on by default");
        let c = BrokerConfig::parse(
            "b",
            "maxHashSlotNum = 1000
maxIndexNum = 4000
",
        )
        .unwrap();
        assert_eq!(
            c.index,
            Some(IndexConfig {
                hash_slots: 1000,
                max_entries: 4000
            })
        );
        let c = BrokerConfig::parse(
            "b",
            "messageIndexEnable = false
",
        )
        .unwrap();
        assert_eq!(c.index, None);
        for bad in [
            "maxHashSlotNum = 0
",
            "maxIndexNum = 100000001
",
            "messageIndexEnable = yes
",
        ] {
            let e = BrokerConfig::parse("b", bad).unwrap_err().to_string();
            assert!(e.contains("b:1"), "{bad}: {e}");
        }
    }

    #[test]
    fn cluster_keys() {
        let c = BrokerConfig::parse(
            "b",
            "brokerIP1 = 10.0.0.7\nregisterNameServerPeriod = 500\nchannelExpiredTimeout = 3000\n\
             tlsCertFile = /c/n.pem\ntlsKeyFile = /c/n.key\ntlsCaFile = /c/ca.pem\nbrokerId = 3\n",
        )
        .unwrap();
        assert_eq!(c.broker_ip1, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(c.register_period, Duration::from_millis(500));
        assert_eq!(c.client_expiry, Duration::from_secs(3));
        assert_eq!(c.tls_ca_file.as_deref(), Some(Path::new("/c/ca.pem")));
        assert_eq!(c.broker_id, 0, "a master is id 0");
        assert_eq!(c.warnings.len(), 1);
        let e = BrokerConfig::parse("b", "x = 1\n").unwrap_err().to_string();
        assert!(e.contains("b:1") && e.contains("\"x\""), "{e}");
        assert!(BrokerConfig::parse("b", "brokerIP1 = host\n").is_err());
        assert!(BrokerConfig::parse("b", "registerNameServerPeriod = 5\n").is_err());
        assert!(BrokerConfig::parse("b", "tlsCertFile = a\n").is_err());
    }
}
