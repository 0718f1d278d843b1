//! orbitmq: a RocketMQ-style message broker, thread-per-core on io_uring.

pub mod admin;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod dma;
pub mod log;
pub mod msgquery;
pub mod nameserver;
pub mod net;
pub mod node;
pub mod repl;
pub mod schedule;
pub mod shard;
pub mod sync;
pub mod tuning;
pub mod txn;

pub use orbitmq_proto as proto;
