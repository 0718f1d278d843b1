//! The per-shard storage engine: CommitLog segments written with O_DIRECT and group commit,
//! ConsumeQueues, recovery, retention and consumer offsets.

pub mod commitlog;
pub mod config;
pub mod cq;
pub mod error;
pub mod fsutil;
pub mod indexfile;
pub mod offsets;
pub mod recovery;
pub mod retention;
pub mod shape;
pub mod store;

pub use config::{FlushMode, StoreConfig};
pub use error::StoreError;
pub use store::{prepare_queue_files, AppendResult, ReadResult, ReadStatus, Store};
