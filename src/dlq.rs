//! `orbitmq admin dlq ...`: a consumer group's dead letters (`%DLQ%<group>`, queue 0 on each
//! broker that has one). `list` prints them; `resend` puts them back on their original topic
//! with the same keys, tags, unique key and user properties, so a consumer that deduplicates
//! by unique key sees one message. The DLQ is a log: a resent letter stays listed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use orbitmq_client::{Client, ClientError, MessageExt, PullStatus, PullTarget, QueueInfo, SubExpr};
use orbitmq_proto::codes::request;
use orbitmq_proto::header::{self, MessageMeta, SendRequest, SendResponse, TopicListResponse};
use orbitmq_proto::limits::MAX_PULL_MESSAGES;
use orbitmq_proto::msgid::UNIQ_KEY;
use orbitmq_proto::sys::{self, property};

use crate::cli::ClientArgs;

/// Bytes one pull of the DLQ may return.
pub const DLQ_PULL_BYTES: u32 = 4 * 1024 * 1024;
/// Most dead letters one command reads from one queue (a bound on a runaway listing).
pub const MAX_DLQ_LETTERS: usize = 1_000_000;
/// The producer group a resend names.
pub const RESEND_PRODUCER_GROUP: &str = "orbitmq-admin-dlq";
/// Attempts of one resend: the route's shard, then a WRONG_SHARD redirect.
pub const RESEND_ATTEMPTS: u32 = 2;

#[derive(Subcommand, Debug)]
pub enum DlqCmd {
    /// Prints each dead letter of a group across all brokers.
    List(DlqList),
    /// Sends dead letters back to their original topic.
    Resend(DlqResend),
}

#[derive(Args, Debug)]
pub struct DlqList {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub group: String,
}

#[derive(Args, Debug)]
#[group(id = "which", required = true, multiple = false, args = ["msg_id", "all"])]
pub struct DlqResend {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(long)]
    pub group: String,
    /// The dead letter's message id, its original message id (ORIGIN_MESSAGE_ID) or its
    /// unique key (UNIQ_KEY).
    #[arg(long)]
    pub msg_id: Option<String>,
    /// Every dead letter of the group.
    #[arg(long)]
    pub all: bool,
}

/// Whether `id` names this dead letter: its own message id, the id of its first delivery,
/// or its unique key.
pub fn matches_id(m: &MessageExt, id: &str) -> bool {
    m.msg_id == id
        || m.property(property::ORIGIN_MESSAGE_ID) == Some(id)
        || m.uniq_key.as_deref() == Some(id)
}

/// One letter per unique key, the newest (a message dead-lettered twice, after an earlier
/// resend or a retried send-back, goes back once), in the given order otherwise.
pub fn unique_letters(letters: Vec<&MessageExt>) -> Vec<&MessageExt> {
    let mut newest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, m) in letters.iter().enumerate() {
        if let Some(k) = m.uniq_key.as_deref() {
            let e = newest.entry(k).or_insert(i);
            if letters[*e].store_timestamp <= m.store_timestamp {
                *e = i;
            }
        }
    }
    letters
        .iter()
        .enumerate()
        .filter(|(i, m)| m.uniq_key.as_deref().is_none_or(|k| newest[k] == *i))
        .map(|(_, m)| *m)
        .collect()
}

/// The topic a dead letter goes back to (its RETRY_TOPIC; a letter without one was sent
/// to the DLQ topic directly and has no other home).
pub fn original_topic(m: &MessageExt) -> Option<&str> {
    m.retry_topic()
}

/// One line of `dlq list`.
pub fn describe(m: &MessageExt) -> String {
    format!(
        "msg_id={} origin_msg_id={} topic={} uniq_key={} keys={} tags={} reconsume_times={} store_time={} body_size={} broker={} offset={}",
        m.msg_id,
        m.origin_msg_id(),
        original_topic(m).unwrap_or("-"),
        m.uniq_key.as_deref().unwrap_or("-"),
        if m.keys.is_empty() { "-".to_string() } else { m.keys.join(",") },
        if m.tags.is_empty() { "-" } else { &m.tags },
        m.reconsume_times,
        m.store_timestamp,
        m.body.len(),
        m.broker_name,
        m.queue_offset,
    )
}

/// The send metadata of a resend: the same tags, keys, flag, unique key and user properties;
/// the broker's retry, delay and DLQ properties dropped (the message starts afresh).
pub fn resend_meta(m: &MessageExt, born_timestamp: u64) -> MessageMeta {
    let mut properties = Vec::new();
    if let Some(u) = &m.uniq_key {
        properties.push((UNIQ_KEY.to_owned(), u.clone()));
    }
    properties.extend(
        m.user_properties()
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    MessageMeta {
        flag: m.flag,
        sys_flag: 0,
        born_timestamp,
        tags: m.tags.clone(),
        keys: m.keys.join(" "),
        properties,
        body_len: m.body.len() as u32,
    }
}

use orbitmq_proto::now_ms;

/// The dead letters of a group read one pull at a time, broker by broker, in queue order: a
/// command holds at most one pull's letters (bodies included) at once, however many there are.
struct Pages<'a> {
    c: &'a Client,
    group: &'a str,
    all: Arc<SubExpr>,
    /// The DLQ's readable queues (none when no broker made the DLQ).
    queues: Vec<QueueInfo>,
    /// Reads no queue past this offset (the end a first pass saw), if set.
    until: Option<Vec<u64>>,
    /// Where each queue's reading ended.
    ends: Vec<u64>,
    /// The queue being read, its next offset, the end to read to, and letters read from it.
    at: usize,
    cursor: Option<(u64, u64, usize)>,
}

impl<'a> Pages<'a> {
    async fn open(c: &'a Client, group: &'a str) -> Result<Pages<'a>, String> {
        let topic = sys::dlq_topic(group);
        // Only brokers that made the DLQ register it: asking for its route otherwise would get
        // the auto-creating brokers' default route, and reading it would create the topic.
        let f = c
            .call_name_server(
                request::GET_ALL_TOPIC_LIST_FROM_NAMESERVER,
                Bytes::new(),
                "",
            )
            .await
            .map_err(|e| e.to_string())?;
        let known = header::decode::<TopicListResponse>(&f.header)
            .map_err(|e| format!("topic list: {e}"))?;
        let queues = if known.topics.contains(&topic) {
            let route = c.topic_route(&topic).await.map_err(|e| e.to_string())?;
            route.readable().into_iter().cloned().collect()
        } else {
            Vec::new()
        };
        Ok(Pages {
            c,
            group,
            all: Arc::new(SubExpr::parse("*").map_err(|e| e.to_string())?),
            queues,
            until: None,
            ends: Vec::new(),
            at: 0,
            cursor: None,
        })
    }

    /// The same letters again (a second pass, after this one ended): the same queues, each
    /// read to where this pass ended, so letters dead-lettered meanwhile are not included.
    fn again(&self) -> Pages<'a> {
        Pages {
            c: self.c,
            group: self.group,
            all: self.all.clone(),
            queues: self.queues.clone(),
            until: Some(self.ends.clone()),
            ends: Vec::new(),
            at: 0,
            cursor: None,
        }
    }

    /// The next pull's letters; `None` once every queue is read.
    async fn next(&mut self) -> Result<Option<Vec<MessageExt>>, String> {
        let c = self.c;
        while let Some(q) = self.queues.get(self.at) {
            let (offset, end, read) = match self.cursor {
                Some(cur) => cur,
                None => {
                    let mut end = c.max_offset(&q.mq).await.map_err(|e| e.to_string())?;
                    if let Some(until) = &self.until {
                        end = end.min(until[self.at]);
                    }
                    let start = c.min_offset(&q.mq).await.map_err(|e| e.to_string())?;
                    (start, end, 0)
                }
            };
            if offset >= end || read >= MAX_DLQ_LETTERS {
                self.ends.push(offset);
                self.at += 1;
                self.cursor = None;
                continue;
            }
            let target = PullTarget {
                queue: q.clone(),
                offset,
                max_msgs: MAX_PULL_MESSAGES,
                expr: self.all.clone(),
            };
            let r = c
                .pull(
                    &q.endpoint,
                    self.group,
                    &[target],
                    DLQ_PULL_BYTES,
                    Duration::ZERO,
                )
                .await
                .map_err(|e| format!("reading {}: {e}", q.mq))?;
            let Some(r) = r.into_iter().next() else {
                return Err(format!("reading {}: empty pull response", q.mq));
            };
            match r.status {
                PullStatus::Found | PullStatus::OffsetMoved if r.next_offset > offset => {}
                PullStatus::NoNewMessages => {
                    self.cursor = Some((offset, offset, read));
                    continue;
                }
                other => return Err(format!("reading {}: {other:?}", q.mq)),
            }
            // A second pass stops where the first did, mid-pull too.
            let mut letters = r.messages;
            letters.retain(|m| m.queue_offset < end);
            let next = r.next_offset.min(end);
            self.cursor = Some((next, end, read + letters.len()));
            if !letters.is_empty() {
                return Ok(Some(letters));
            }
        }
        Ok(None)
    }
}

/// Where a letter sits: one letter per (broker, queue, offset).
fn place_of(m: &MessageExt) -> (String, u32, u64) {
    (m.broker_name.clone(), m.queue_id, m.queue_offset)
}

/// Sends one dead letter to a writable queue of its original topic (the `n`th, round robin).
async fn resend_one(
    c: &Client,
    m: &MessageExt,
    n: usize,
) -> Result<(String, SendResponse), String> {
    let topic = original_topic(m).ok_or_else(|| {
        format!(
            "dead letter {} has no original topic (RETRY_TOPIC)",
            m.msg_id
        )
    })?;
    let route = c.topic_route(topic).await.map_err(|e| e.to_string())?;
    let writable = route.writable();
    if writable.is_empty() {
        return Err(format!("topic {topic} has no writable queue"));
    }
    let q = writable[n % writable.len()];
    let h = header::encode(&SendRequest {
        producer_group: RESEND_PRODUCER_GROUP.to_owned(),
        topic: topic.to_owned(),
        queue_id: q.mq.queue_id,
        messages: vec![resend_meta(m, now_ms())],
    });
    let mut endpoint = q.endpoint.clone();
    let mut attempt = 1;
    loop {
        let f = c
            .request(&endpoint, request::SEND_MESSAGE, h.clone(), m.body.clone())
            .await
            .map_err(|e| e.to_string())?;
        // A SYNC_MASTER's SLAVE_NOT_AVAILABLE / FLUSH_SLAVE_TIMEOUT stored it too.
        if let Some(status) = orbitmq_client::SendStatus::of_code(f.code) {
            if status != orbitmq_client::SendStatus::SendOk {
                eprintln!("resent {} with status {}", m.msg_id, status.name());
            }
            let r = header::decode::<SendResponse>(&f.header)
                .map_err(|e| format!("send response: {e}"))?;
            return Ok((format!("{}#{}", q.mq.broker_name, q.mq.queue_id), r));
        }
        match ClientError::from_response(f.code, &f.header, topic) {
            ClientError::WrongShard { redirect, .. }
                if !redirect.is_empty() && attempt < RESEND_ATTEMPTS =>
            {
                endpoint = redirect;
                attempt += 1;
            }
            e => return Err(format!("resending {} to {topic}: {e}", m.msg_id)),
        }
    }
}

async fn list(a: DlqList) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let mut pages = Pages::open(&c, &a.group).await?;
        let mut n = 0;
        while let Some(ls) = pages.next().await? {
            for m in &ls {
                println!("{}", describe(m));
            }
            n += ls.len();
        }
        println!("group={} dead_letters={n}", a.group);
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

async fn resend(a: DlqResend) -> Result<(), String> {
    let c = Client::new(a.client.config())
        .await
        .map_err(|e| e.to_string())?;
    let r = async {
        let mut pages = Pages::open(&c, &a.group).await?;
        // Each letter is tried; a failure is reported and the rest still go.
        let (mut sent, mut failed) = (0usize, 0usize);
        let mut resend_each = async |m: &MessageExt| match resend_one(&c, m, sent + failed).await
        {
            Ok((queue, r)) => {
                sent += 1;
                let new_id = r.results.first().map_or("-", |x| x.msg_id.as_str());
                println!(
                    "resent msg_id={} topic={} uniq_key={} queue={queue} new_msg_id={new_id}",
                    m.msg_id,
                    original_topic(m).unwrap_or("-"),
                    m.uniq_key.as_deref().unwrap_or("-"),
                );
            }
            Err(e) => {
                failed += 1;
                println!("failed msg_id={} error={e}", m.msg_id);
            }
        };
        match &a.msg_id {
            // The letters it names (a few: a message dead-lettered more than once).
            Some(id) => {
                let (mut named, mut seen) = (Vec::new(), 0usize);
                while let Some(ls) = pages.next().await? {
                    seen += ls.len();
                    named.extend(ls.into_iter().filter(|m| matches_id(m, id)));
                }
                let chosen = unique_letters(named.iter().collect());
                if chosen.is_empty() {
                    return Err(format!(
                        "no dead letter of group {} has the message id, original message id or unique key {id} ({seen} dead letters; see `orbitmq admin dlq list --group {}`)",
                        a.group, a.group
                    ));
                }
                for m in chosen {
                    resend_each(m).await;
                }
            }
            // Two passes, so no body is held: the newest letter of each unique key, then
            // each letter that is one (or has no unique key) is sent as it is read again.
            None => {
                let mut newest: HashMap<String, (u64, (String, u32, u64))> = HashMap::new();
                while let Some(ls) = pages.next().await? {
                    for m in ls {
                        if let Some(k) = m.uniq_key.clone() {
                            let e = newest.entry(k).or_insert((m.store_timestamp, place_of(&m)));
                            if e.0 <= m.store_timestamp {
                                *e = (m.store_timestamp, place_of(&m));
                            }
                        }
                    }
                }
                let mut again = pages.again();
                while let Some(ls) = again.next().await? {
                    for m in &ls {
                        let chosen = m
                            .uniq_key
                            .as_deref()
                            .is_none_or(|k| newest.get(k).is_some_and(|e| e.1 == place_of(m)));
                        if chosen {
                            resend_each(m).await;
                        }
                    }
                }
            }
        }
        println!("group={} resent={sent} failed={failed}", a.group);
        if failed > 0 {
            return Err(format!("{failed} dead letters were not resent"));
        }
        Ok(())
    }
    .await;
    c.shutdown().await;
    r
}

/// Runs a `dlq` subcommand (inside the admin runtime).
pub async fn run(cmd: DlqCmd) -> Result<(), String> {
    match cmd {
        DlqCmd::List(a) => list(a).await,
        DlqCmd::Resend(a) => resend(a).await,
    }
}
