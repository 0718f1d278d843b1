//! `orbitmq send` and `orbitmq consume`: small clients for people at a terminal.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use orbitmq_client::{
    ClientConfig, ConsumeFromWhere, ConsumerOptions, LitePullConsumer, Message, MessageQueue,
    Producer, SubExpr, TlsOptions,
};

/// How long `consume` waits in one poll.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// Producer group of `orbitmq send`.
const SEND_GROUP: &str = "orbitmq-cli";

/// Options every client command takes.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// Name server address(es), `;`-separated.
    #[arg(long, default_value = "127.0.0.1:9876")]
    pub namesrv: String,
    /// CA certificate to verify the servers (default: $ORBITMQ_TLS_CA, else
    /// ./orbitmq-data/tls/ca.pem when it exists).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Skip certificate verification (tests only: the connection is still encrypted).
    #[arg(long)]
    pub insecure: bool,
}

impl ClientArgs {
    pub fn config(&self) -> ClientConfig {
        ClientConfig::new(&self.namesrv).with_tls(TlsOptions {
            ca: self.tls_ca.clone(),
            insecure: self.insecure,
        })
    }
}

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub tag: Option<String>,
    #[arg(long)]
    pub key: Option<String>,
    /// Delay level (1..=18 with the default `messageDelayLevel`; above the top: the top).
    #[arg(long, conflicts_with_all = ["deliver_at", "deliver_in_ms"])]
    pub delay_level: Option<u32>,
    /// Deliver at this time, ms since the epoch (up to the broker's `timerMaxDelaySec` ahead).
    #[arg(long, conflicts_with = "deliver_in_ms")]
    pub deliver_at: Option<u64>,
    /// Deliver this many ms from now.
    #[arg(long)]
    pub deliver_in_ms: Option<u64>,
    /// A user property `NAME=VALUE` (repeatable), as SQL92 filters read them.
    #[arg(long = "prop", value_parser = parse_property)]
    pub props: Vec<(String, String)>,
    #[arg(long)]
    pub body: String,
}

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    pub group: String,
    /// Tag expression: `*`, `TagA`, `TagA || TagB`.
    #[arg(long, default_value = "*", conflicts_with = "sql")]
    pub tag: String,
    /// An SQL92 filter on the messages' properties instead of tags:
    /// `"a BETWEEN 1 AND 3 AND TAGS = 'TagA'"`.
    #[arg(long)]
    pub sql: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit when nothing arrives for this long.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Where a group with no committed offset starts: first, last, or a timestamp in ms.
    #[arg(long, default_value = "first")]
    pub from: String,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))
}

/// `NAME=VALUE` of `orbitmq send --prop`.
fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

pub fn send(a: SendArgs) -> Result<(), String> {
    runtime()?.block_on(async move {
        let producer = Producer::new(SEND_GROUP, a.client.config())
            .await
            .map_err(|e| e.to_string())?;
        let mut m = Message::new(&a.topic, a.body.into_bytes());
        if let Some(t) = &a.tag {
            m = m.with_tags(t);
        }
        if let Some(k) = &a.key {
            m = m.with_key(k);
        }
        if let Some(d) = a.delay_level {
            m = m.with_delay_level(d);
        }
        for (k, v) in &a.props {
            m = m.with_property(k, v);
        }
        let now = orbitmq_proto::now_ms();
        if let Some(at) = a
            .deliver_at
            .or(a.deliver_in_ms.map(|d| now.saturating_add(d)))
        {
            m = m.with_deliver_at(at);
        }
        let r = producer.send(m).await;
        producer.shutdown().await;
        let r = r.map_err(|e| e.to_string())?;
        println!(
            "msgId={} queue={} offset={} status={}",
            r.msg_id,
            r.queue.queue_id,
            r.queue_offset,
            r.status.name()
        );
        Ok(())
    })
}

fn parse_from(s: &str) -> Result<ConsumeFromWhere, String> {
    match s {
        "first" => Ok(ConsumeFromWhere::FirstOffset),
        "last" => Ok(ConsumeFromWhere::LastOffset),
        t => t
            .parse::<u64>()
            .map(ConsumeFromWhere::Timestamp)
            .map_err(|_| {
                format!("--from {t:?}: expected first, last or a timestamp in milliseconds")
            }),
    }
}

pub fn consume(a: ConsumeArgs) -> Result<(), String> {
    let from = parse_from(&a.from)?;
    runtime()?.block_on(async move {
        let options = ConsumerOptions {
            consume_from_where: from,
            ..ConsumerOptions::default()
        };
        let c = LitePullConsumer::with_options(&a.group, a.client.config(), options)
            .await
            .map_err(|e| e.to_string())?;
        let selector = match &a.sql {
            Some(sql) => SubExpr::sql(sql),
            None => SubExpr::parse(&a.tag),
        }
        .map_err(|e| e.to_string())?;
        c.subscribe_with(&a.topic, selector)
            .await
            .map_err(|e| e.to_string())?;
        let idle = Duration::from_secs(a.timeout_secs);
        let mut last = Instant::now();
        let mut seen = 0u64;
        let mut out = std::io::stdout().lock();
        let result: Result<(), String> = async {
            'outer: while last.elapsed() < idle {
                let batch = c
                    .poll(POLL_WAIT.min(idle))
                    .await
                    .map_err(|e| e.to_string())?;
                if !batch.is_empty() {
                    last = Instant::now();
                }
                for (i, m) in batch.iter().enumerate() {
                    writeln!(
                        out,
                        "queue={} offset={} tag={} key={} body={}",
                        m.queue_id,
                        m.queue_offset,
                        m.tags,
                        m.keys.join(" "),
                        String::from_utf8_lossy(&m.body)
                    )
                    .map_err(|e| e.to_string())?;
                    seen += 1;
                    if a.count.is_some_and(|n| seen >= n) {
                        // Commit exactly what was printed: move each queue back to its first
                        // message of the batch that was not printed.
                        let mut rewind: std::collections::BTreeMap<u32, (MessageQueue, u64)> =
                            Default::default();
                        for r in &batch[i + 1..] {
                            rewind
                                .entry(r.queue_id)
                                .or_insert((r.message_queue(), r.queue_offset));
                        }
                        for (mq, off) in rewind.into_values() {
                            c.seek(&mq, off).await.map_err(|e| e.to_string())?;
                        }
                        break 'outer;
                    }
                }
                out.flush().map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        .await;
        let committed = c.commit().await.map_err(|e| e.to_string());
        let _ = c.shutdown().await;
        result.and(committed)
    })
}
