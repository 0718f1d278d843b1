//! orbitmq client: the RocketMQ programming model over QUIC, with tokio.
//!
//! - [`Producer`]: sync, callback, one-way, batch and selector (ordered) sends, retried on
//!   another queue with the same unique key.
//! - [`LitePullConsumer`]: subscribe or assign, `poll`, `commit`, `seek`.
//! - [`PushConsumer`]: a concurrent listener fed by long-polling pulls, offsets committed
//!   every 5 s and on shutdown.
//! - [`TransactionProducer`]: transactional messages (half message, local transaction, commit
//!   or rollback, the broker's check-back answered by a [`TransactionListener`]).
//! - [`Client`]: the shared instance (connections, routes, heartbeats), the low-level
//!   requests (offsets, pulls) and message queries (by key, unique key or message id).
//!
//! ```no_run
//! # async fn demo() -> orbitmq_client::Result<()> {
//! use orbitmq_client::{ClientConfig, Message, Producer, TlsOptions};
//! let config = ClientConfig::new("127.0.0.1:9876")
//!     .with_tls(TlsOptions::with_ca("orbitmq-data/tls/ca.pem"));
//! let producer = Producer::new("pg", config).await?;
//! let r = producer.send(Message::new("Orders", "hello").with_tags("TagA")).await?;
//! println!("msgId={} queue={} offset={}", r.msg_id, r.queue.queue_id, r.queue_offset);
//! producer.shutdown().await;
//! # Ok(()) }
//! ```

pub mod allocate;
pub mod client;
pub mod config;
pub mod consumer;
pub mod error;
pub mod filter;
pub mod latency;
pub mod lite;
pub mod local_offsets;
pub mod message;
pub mod offset;
pub mod producer;
pub mod pull;
pub mod push;
pub mod query;
pub mod quic;
pub mod rebalance;
pub mod remoting;
pub mod route;
pub mod tls;
pub mod transaction;

pub use allocate::Strategy;
pub use client::{Client, PullTarget};
pub use config::{ClientConfig, TlsOptions};
pub use consumer::{ConsumeOrderlyStatus, ConsumeStatus, ConsumerOptions, MessageModel};
pub use error::{ClientError, Result};
pub use filter::SubExpr;
pub use latency::LatencyFaultTolerance;
pub use lite::LitePullConsumer;
pub use message::{Message, MessageExt};
pub use offset::{ConsumeFromWhere, OffsetTracker};
pub use producer::{Producer, SendResult, SendStatus};
pub use pull::{PullStatus, QueuePullResult};
pub use push::PushConsumer;
pub use query::Query;
pub use remoting::Push;
pub use route::{MessageQueue, QueueInfo, TopicRoute};
pub use transaction::{
    LocalTransactionState, TransactionListener, TransactionProducer, TransactionSendResult,
};
