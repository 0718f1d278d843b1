//! `orbitmq admin message ...`: find messages by key, by unique key, or by offset message id
//! (RocketMQ's mqadmin queryMsgByKey, queryMsgByUniqueKey, queryMsgById). Every shard of
//! the topic's brokers answers from its key index.

use clap::{Args, Subcommand};
use orbitmq_client::{Client, MessageExt};
use orbitmq_proto::limits::MAX_QUERY_MESSAGES;

use crate::cli::ClientArgs;

/// Body bytes a listing shows of each message.
pub const SHOWN_BODY_BYTES: usize = 256;
/// Messages a query by key asks each shard for unless told (RocketMQ's mqadmin: 64).
pub const DEFAULT_QUERY_MAX: u32 = 64;

#[derive(Subcommand, Debug)]
pub enum MessageCmd {
    /// Messages of a topic whose keys include KEY, oldest first (the newest `--max` of each
    /// broker shard).
    Key(KeyArgs),
    /// The messages of a topic with a unique key (UNIQ_KEY, the same across a producer's
    /// retries).
    Unique(UniqueArgs),
    /// The message an offset message id names (the `msgId` a send prints).
    Id(IdArgs),
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub key: String,
    /// Stored at or after this time (milliseconds since the epoch).
    #[arg(long, default_value_t = 0)]
    pub begin_ms: u64,
    /// Stored at or before this time (milliseconds since the epoch; default: no end).
    #[arg(long, default_value_t = u64::MAX)]
    pub end_ms: u64,
    /// At most this many from each broker shard (1..=256).
    #[arg(long, default_value_t = DEFAULT_QUERY_MAX,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_QUERY_MESSAGES)))]
    pub max: u32,
}

#[derive(Args, Debug)]
pub struct UniqueArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub id: String,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub id: String,
}

/// One line per message; text from producers is escaped (no terminal control bytes).
pub fn describe(m: &MessageExt) -> String {
    let body = &m.body[..m.body.len().min(SHOWN_BODY_BYTES)];
    format!(
        "msg_id={} topic={} broker={} queue={} offset={} tags={} keys={} uniq_key={} store_time={} born_host={} body_size={} body={}",
        m.msg_id,
        m.topic,
        m.broker_name,
        m.queue_id,
        m.queue_offset,
        if m.tags.is_empty() { "-".to_string() } else { m.tags.escape_debug().to_string() },
        if m.keys.is_empty() { "-".to_string() } else { m.keys.join(",").escape_debug().to_string() },
        m.uniq_key.as_deref().unwrap_or("-").escape_debug(),
        m.store_timestamp,
        m.born_host,
        m.body.len(),
        String::from_utf8_lossy(body).escape_debug(),
    )
}

/// Runs a `message` subcommand (inside the admin runtime).
pub async fn run(cmd: MessageCmd) -> Result<(), String> {
    let client = match &cmd {
        MessageCmd::Key(a) => &a.client,
        MessageCmd::Unique(a) => &a.client,
        MessageCmd::Id(a) => &a.client,
    };
    let c = Client::new(client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let found = match &cmd {
            MessageCmd::Key(a) => c
                .query_messages(&a.topic, &a.key, a.begin_ms, a.end_ms, a.max)
                .await
                .map_err(|e| e.to_string())?,
            MessageCmd::Unique(a) => c
                .query_by_unique_key(&a.topic, &a.id)
                .await
                .map_err(|e| e.to_string())?,
            MessageCmd::Id(a) => match c.view_message(&a.id).await.map_err(|e| e.to_string())? {
                Some(m) => vec![m],
                None => return Err(format!("no message has the id {}", a.id)),
            },
        };
        for m in &found {
            println!("{}", describe(m));
        }
        println!("found={}", found.len());
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}
