//! Client configuration and its defaults (RocketMQ's names where it has the setting).

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{ClientError, Result};

/// Name server address when none is given (as the `orbitmq` tools).
pub const DEFAULT_NAMESRV: &str = "127.0.0.1:9876";
/// RocketMQ's `sendMsgTimeout`: the budget of one send, retries included.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// RocketMQ's `retryTimesWhenSendFailed`: extra attempts after the first.
pub const DEFAULT_RETRY_TIMES_WHEN_SEND_FAILED: u32 = 2;
/// RocketMQ's `pollNameServerInterval`: how often cached routes are fetched again.
pub const DEFAULT_POLL_NAME_SERVER_INTERVAL: Duration = Duration::from_secs(30);
/// RocketMQ's `heartbeatBrokerInterval`.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Timeout of the small requests: routes, offsets, heartbeats.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of the QUIC handshake: short, so that within one 3 s send an attempt on a dead
/// broker (nothing answers a QUIC handshake there) still leaves time to retry on another.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// QUIC keep-alive: well below the 30 s idle timeout, so an idle connection stays open.
pub const DEFAULT_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// QUIC idle timeout (quinn's default, RocketMQ's heartbeat period).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable naming the CA certificate file.
pub const TLS_CA_ENV: &str = "ORBITMQ_TLS_CA";
/// Where a standalone broker started in the current directory keeps its CA certificate.
pub const DEFAULT_TLS_CA_PATH: &str = "./orbitmq-data/tls/ca.pem";

/// How the client checks the server's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA certificate(s) in PEM. When `None`: `ORBITMQ_TLS_CA`, else
    /// `./orbitmq-data/tls/ca.pem` if it exists.
    pub ca: Option<PathBuf>,
    /// Skip certificate verification (explicit opt-in; the connection is still encrypted).
    pub insecure: bool,
}

impl TlsOptions {
    pub fn with_ca(ca: impl Into<PathBuf>) -> TlsOptions {
        TlsOptions {
            ca: Some(ca.into()),
            insecure: false,
        }
    }

    pub fn insecure() -> TlsOptions {
        TlsOptions {
            ca: None,
            insecure: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Name server addresses, `host:port`; the first that answers is used, the next on failure.
    pub namesrv: Vec<String>,
    pub tls: TlsOptions,
    pub send_timeout: Duration,
    pub retry_times_when_send_failed: u32,
    pub poll_name_server_interval: Duration,
    pub heartbeat_interval: Duration,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub keep_alive_interval: Duration,
    pub idle_timeout: Duration,
    /// Names this client in heartbeats; generated (`ip@pid@n`) when empty.
    pub client_id: String,
    /// RocketMQ's `sendLatencyFaultEnable` (on here by default): avoid a broker whose send
    /// failed or was slow for a while.
    pub send_latency_fault_enable: bool,
    /// How long a broker whose send failed is avoided.
    pub fault_isolation: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            namesrv: vec![DEFAULT_NAMESRV.to_owned()],
            tls: TlsOptions::default(),
            send_timeout: DEFAULT_SEND_TIMEOUT,
            retry_times_when_send_failed: DEFAULT_RETRY_TIMES_WHEN_SEND_FAILED,
            poll_name_server_interval: DEFAULT_POLL_NAME_SERVER_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keep_alive_interval: DEFAULT_KEEP_ALIVE_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            client_id: String::new(),
            send_latency_fault_enable: true,
            fault_isolation: crate::latency::DEFAULT_FAILURE_ISOLATION,
        }
    }
}

impl ClientConfig {
    /// A configuration for the name servers `"a:9876;b:9876"` (RocketMQ's `namesrvAddr`).
    pub fn new(namesrv: &str) -> ClientConfig {
        ClientConfig {
            namesrv: parse_namesrv(namesrv),
            ..ClientConfig::default()
        }
    }

    pub fn with_tls(mut self, tls: TlsOptions) -> ClientConfig {
        self.tls = tls;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.namesrv.is_empty() {
            return Err(ClientError::InvalidArgument(
                "no name server address (namesrv \"host:port[;host:port]\")".into(),
            ));
        }
        for a in &self.namesrv {
            crate::remoting::split_host_port(a)?;
        }
        if self.keep_alive_interval >= self.idle_timeout {
            return Err(ClientError::InvalidArgument(format!(
                "keep-alive interval {:?} must be below the idle timeout {:?}",
                self.keep_alive_interval, self.idle_timeout
            )));
        }
        Ok(())
    }
}

/// Splits `"a:1;b:2"` (also `,` and whitespace) into addresses.
pub fn parse_namesrv(s: &str) -> Vec<String> {
    s.split([';', ',', ' ', '\t', '\n'])
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namesrv_lists_split_on_semicolons() {
        assert_eq!(
            parse_namesrv("a:1;b:2; c:3;"),
            vec!["a:1".to_string(), "b:2".into(), "c:3".into()]
        );
        assert!(parse_namesrv(" ; ").is_empty());
        assert!(ClientConfig::new("").validate().is_err());
        assert!(ClientConfig::new("127.0.0.1:9876").validate().is_ok());
        assert!(ClientConfig::new("nohost").validate().is_err());
    }
}
