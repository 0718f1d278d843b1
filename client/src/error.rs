//! Client errors, one variant per thing a caller may want to react to, mapped from the
//! broker's response codes where they come from the broker.

use std::time::Duration;

use orbitmq_proto::codes::response;
use orbitmq_proto::header::{self, ErrorResponse};
use thiserror::Error;

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The topic is unknown to the name server or the broker (and not auto-created).
    #[error("topic does not exist: {0}")]
    TopicNotExist(String),
    /// The message (or a request argument) breaks a rule: refused locally or by the broker.
    #[error("message illegal: {0}")]
    MessageIllegal(String),
    /// An argument or the configuration is wrong (group names, queues, options).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No answer in time. A send that timed out may still have been stored: its unique key
    /// (`UNIQ_KEY`) lets consumers deduplicate.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// The store cannot take writes now (fenced by an I/O error, disk full).
    #[error("service not available: {0}")]
    ServiceUnavailable(String),
    /// The broker is overloaded; try later or elsewhere.
    #[error("system busy: {0}")]
    SystemBusy(String),
    /// The broker stored the message but could not flush it in time (SYNC_FLUSH).
    #[error("flush disk timeout: {0}")]
    FlushDiskTimeout(String),
    /// The broker stored the message but no slave is in sync to copy it (SYNC_MASTER).
    #[error("slave not available: {0}")]
    SlaveNotAvailable(String),
    /// The broker stored the message but its slave did not confirm the copy in time
    /// (SYNC_MASTER).
    #[error("flush slave timeout: {0}")]
    FlushSlaveTimeout(String),
    /// The queue lives on another shard; `redirect` is its endpoint (may be empty).
    #[error("wrong shard: {message} (owner: {redirect})")]
    WrongShard { message: String, redirect: String },
    /// Any other non-success response.
    #[error("broker error {name} ({code}): {message}")]
    Broker {
        code: u16,
        name: &'static str,
        message: String,
    },
    /// The connection to an endpoint could not be made.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// An established connection failed or was closed while a request was in flight.
    #[error("connection to {endpoint} lost: {reason}")]
    ConnectionLost { endpoint: String, reason: String },
    /// TLS could not be set up (CA file missing or unreadable, bad certificate).
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer sent something that does not follow the protocol.
    #[error("protocol error from {endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
    /// No queue of the topic can take the request (none writable / readable).
    #[error("no {kind} queue for topic {topic}")]
    NoQueue { topic: String, kind: &'static str },
    /// Every name server failed; the last error is included.
    #[error("no name server answered ({addrs}): {last}")]
    NameServerUnavailable { addrs: String, last: String },
    /// The client, producer or consumer was shut down.
    #[error("client is shut down")]
    ShutDown,
}

/// Maps a header that failed validation from `endpoint` to [`ClientError::Protocol`].
pub(crate) fn bad_header(
    endpoint: &str,
) -> impl FnOnce(orbitmq_proto::header::HeaderError) -> ClientError + '_ {
    move |e| ClientError::Protocol {
        endpoint: endpoint.to_owned(),
        reason: e.to_string(),
    }
}

impl ClientError {
    /// Maps a non-success response (its code and `ErrorResponse` header bytes) to an error.
    /// `topic` names the topic for TOPIC_NOT_EXIST when the broker's message is empty.
    pub fn from_response(code: u16, header_bytes: &[u8], topic: &str) -> ClientError {
        let (message, redirect) = match header::decode::<ErrorResponse>(header_bytes) {
            Ok(e) => (e.message, e.redirect),
            Err(_) => (String::new(), String::new()),
        };
        Self::from_code(code, message, redirect, topic)
    }

    pub(crate) fn from_code(code: u16, message: String, redirect: String, topic: &str) -> Self {
        match code {
            response::TOPIC_NOT_EXIST => ClientError::TopicNotExist(if message.is_empty() {
                topic.to_owned()
            } else {
                format!("{topic} ({message})")
            }),
            response::MESSAGE_ILLEGAL => ClientError::MessageIllegal(message),
            response::SERVICE_NOT_AVAILABLE => ClientError::ServiceUnavailable(message),
            response::SYSTEM_BUSY => ClientError::SystemBusy(message),
            response::FLUSH_DISK_TIMEOUT => ClientError::FlushDiskTimeout(message),
            response::SLAVE_NOT_AVAILABLE => ClientError::SlaveNotAvailable(message),
            response::FLUSH_SLAVE_TIMEOUT => ClientError::FlushSlaveTimeout(message),
            response::WRONG_SHARD => ClientError::WrongShard { message, redirect },
            _ => ClientError::Broker {
                code,
                name: response::name(code),
                message,
            },
        }
    }

    /// Whether a send that failed this way may be tried again on another queue (as RocketMQ:
    /// transport failures and the broker codes that say "not here, not now"). A message that
    /// was refused as illegal, or that was stored but not flushed or replicated, is not resent.
    pub fn is_retriable_send(&self) -> bool {
        match self {
            ClientError::Timeout { .. }
            | ClientError::Connect { .. }
            | ClientError::ConnectionLost { .. }
            | ClientError::ServiceUnavailable(_)
            | ClientError::SystemBusy(_)
            | ClientError::TopicNotExist(_)
            | ClientError::WrongShard { .. }
            | ClientError::NameServerUnavailable { .. } => true,
            ClientError::Broker { code, .. } => *code == response::SYSTEM_ERROR,
            _ => false,
        }
    }

    /// Whether the route of the topic should be fetched again after this error. A
    /// WRONG_SHARD that names the owner is followed instead (until the periodic refresh).
    pub(crate) fn invalidates_route(&self) -> bool {
        match self {
            ClientError::WrongShard { redirect, .. } => redirect.is_empty(),
            ClientError::Connect { .. }
            | ClientError::ConnectionLost { .. }
            | ClientError::TopicNotExist(_)
            | ClientError::ServiceUnavailable(_) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_codes_map_to_errors() {
        let h = header::encode(&ErrorResponse {
            message: "body too large".into(),
            redirect: String::new(),
        });
        assert_eq!(
            ClientError::from_response(response::MESSAGE_ILLEGAL, &h, "T"),
            ClientError::MessageIllegal("body too large".into())
        );
        let h = header::encode(&ErrorResponse {
            message: "moved".into(),
            redirect: "127.0.0.1:10912".into(),
        });
        assert_eq!(
            ClientError::from_response(response::WRONG_SHARD, &h, "T"),
            ClientError::WrongShard {
                message: "moved".into(),
                redirect: "127.0.0.1:10912".into()
            }
        );
        // A header that fails validation still yields the code's error.
        assert_eq!(
            ClientError::from_response(response::TOPIC_NOT_EXIST, &[1, 2, 3], "Orders"),
            ClientError::TopicNotExist("Orders".into())
        );
        assert!(matches!(
            ClientError::from_response(99, &[], "T"),
            ClientError::Broker {
                code: 99,
                name: "UNKNOWN",
                ..
            }
        ));
        assert!(matches!(
            ClientError::from_response(response::SYSTEM_ERROR, &[], "T"),
            ClientError::Broker {
                name: "SYSTEM_ERROR",
                ..
            }
        ));
    }

    #[test]
    fn only_transient_send_failures_are_retried() {
        assert!(ClientError::SystemBusy(String::new()).is_retriable_send());
        assert!(ClientError::Connect {
            endpoint: "a".into(),
            reason: "b".into()
        }
        .is_retriable_send());
        assert!(!ClientError::MessageIllegal(String::new()).is_retriable_send());
        assert!(!ClientError::FlushDiskTimeout(String::new()).is_retriable_send());
        assert!(!ClientError::ShutDown.is_retriable_send());
    }
}
