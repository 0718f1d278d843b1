//! Errors of the store. Cloneable, because one failed group-commit write fails every append
//! waiting on it.

use std::sync::Arc;

use orbitmq_proto::record::{DecodeError, EncodeError};
use thiserror::Error;

#[derive(Clone, Debug, Error)]
pub enum StoreError {
    /// The producer's message is invalid; nothing was written.
    #[error("message rejected: {0}")]
    BadMessage(#[from] EncodeError),
    /// A batch send must be one topic and queue and fit one write.
    #[error("batch rejected: {0}")]
    BadBatch(String),
    /// An I/O error hit the log's write or fdatasync: nothing more is acknowledged until a
    /// restart recovers the log (an fdatasync is never retried as if it had succeeded).
    #[error("commit log is fenced after an I/O error ({0}); restart the broker to recover")]
    Fenced(String),
    /// No room to prepare the next segment; earlier data is untouched.
    #[error("disk full: cannot prepare the next CommitLog segment ({0})")]
    DiskFull(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A stored record failed its check; it is never served.
    #[error("corrupt record at log offset {offset}: {source}")]
    Corrupt {
        offset: u64,
        #[source]
        source: DecodeError,
    },
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("the store is closed")]
    Closed,
    /// Bytes copied from a master do not continue this log (replication).
    #[error("replication: {0}")]
    Replica(String),
    /// Queries by key need the key index (`messageIndexEnable`).
    #[error("the message key index is off on this broker (messageIndexEnable=false)")]
    IndexDisabled,
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}

/// glommio's errors carry the path and operation; the conversion keeps them and the error kind.
pub fn gio(context: &str, e: glommio::GlommioError<()>) -> StoreError {
    StoreError::io(context, std::io::Error::from(e))
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
