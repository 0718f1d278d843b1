//! Networking: QUIC endpoints on the shards' glommio executors.

pub mod runtime;
pub mod server;
pub mod tls;
