//! The producer: sync, callback, one-way, batch and selector sends, with retries on another
//! queue (of another broker when there is one) that keep the message's unique key. Sends
//! spread round robin over the writable queues of every broker of the topic, skipping a broker
//! that failed or was slow for a while (latency fault tolerance).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, MessageMeta, SendRequest, SendResponse};
use orbitmq_proto::limits::{MAX_BATCH_BYTES, MAX_BATCH_MESSAGES};
use orbitmq_proto::msgid::UniqKeyGen;
use orbitmq_proto::record::sys_flag;
use tokio::time::Instant;

use crate::client::{validate_group, Client};
use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::latency::LatencyFaultTolerance;
use crate::message::Message;
use crate::route::{select_send_queue, Avoid, MessageQueue, QueueInfo};

/// How a stored message stands (RocketMQ's `SendStatus`): every status means the broker
/// stored it; only `SendOk` means everything asked of it was done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SendStatus {
    #[default]
    SendOk,
    /// A `SYNC_MASTER` stored it, but its slave did not confirm the copy in time.
    FlushSlaveTimeout,
    /// A `SYNC_MASTER` stored it, but no slave was in sync to copy it.
    SlaveNotAvailable,
}

impl SendStatus {
    /// The status a send answer's code stands for, if it is one of a stored message.
    pub fn of_code(code: u16) -> Option<SendStatus> {
        match code {
            response::SUCCESS => Some(SendStatus::SendOk),
            response::FLUSH_SLAVE_TIMEOUT => Some(SendStatus::FlushSlaveTimeout),
            response::SLAVE_NOT_AVAILABLE => Some(SendStatus::SlaveNotAvailable),
            _ => None,
        }
    }

    /// RocketMQ's name of the status.
    pub fn name(self) -> &'static str {
        match self {
            SendStatus::SendOk => "SEND_OK",
            SendStatus::FlushSlaveTimeout => "FLUSH_SLAVE_TIMEOUT",
            SendStatus::SlaveNotAvailable => "SLAVE_NOT_AVAILABLE",
        }
    }
}

/// What a send returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendResult {
    /// Offset message id from the broker: encodes broker, shard and CommitLog offset.
    pub msg_id: String,
    /// The client's unique key (`UNIQ_KEY`), the same across retries.
    pub uniq_key: String,
    pub queue: MessageQueue,
    pub queue_offset: u64,
    /// Stored; whether its slave has it too (a `SYNC_MASTER`'s answer).
    pub status: SendStatus,
}

struct Inner {
    client: Client,
    owns_client: bool,
    group: String,
    /// Round-robin position over the writable queues.
    next_queue: AtomicUsize,
    keys: Mutex<UniqKeyGen>,
    faults: Mutex<LatencyFaultTolerance>,
    shut: AtomicBool,
}

/// A producer of one producer group. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

/// How a send picks its queue.
enum Target<'a> {
    /// Round robin, another queue on each retry.
    Any,
    /// This queue only.
    Queue(&'a MessageQueue),
}

/// A message ready to go: the request header with its unique keys, and its body. The header
/// is built once; an attempt only sets its queue id, so a retry clones nothing.
struct Prepared {
    req: SendRequest,
    uniq_keys: Vec<String>,
    body: Bytes,
}

impl Prepared {
    fn topic(&self) -> &str {
        &self.req.topic
    }

    /// The encoded header for `queue_id`.
    fn header(&mut self, queue_id: u32) -> Bytes {
        self.req.queue_id = queue_id;
        header::encode(&self.req)
    }
}

fn now_ms() -> u64 {
    Client::now_ms()
}

impl Producer {
    /// A producer with its own client.
    pub async fn new(group: &str, config: ClientConfig) -> Result<Producer> {
        validate_group("producer", group)?;
        let client = Client::new(config).await?;
        Ok(Self::build(group, client, true))
    }

    /// A producer sharing a client with others.
    pub fn with_client(group: &str, client: Client) -> Result<Producer> {
        validate_group("producer", group)?;
        Ok(Self::build(group, client, false))
    }

    fn build(group: &str, client: Client, owns_client: bool) -> Producer {
        client.register_producer(group);
        let keys = Mutex::new(UniqKeyGen::new(client.local_ip()));
        let faults = Mutex::new(LatencyFaultTolerance::new(client.config().fault_isolation));
        Producer {
            inner: Arc::new(Inner {
                client,
                owns_client,
                group: group.to_owned(),
                // A random start, as RocketMQ: many short-lived producers still spread.
                next_queue: AtomicUsize::new(random_start()),
                keys,
                faults,
                shut: AtomicBool::new(false),
            }),
        }
    }

    pub fn group(&self) -> &str {
        &self.inner.group
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.shut.load(Ordering::Acquire) {
            Err(ClientError::ShutDown)
        } else {
            Ok(())
        }
    }

    fn prepare(&self, msgs: &[Message]) -> Result<Prepared> {
        self.check_open()?;
        let Some(first) = msgs.first() else {
            return Err(ClientError::MessageIllegal(
                "a batch needs at least one message".into(),
            ));
        };
        for m in msgs {
            m.validate()?;
            if m.topic != first.topic {
                return Err(ClientError::MessageIllegal(format!(
                    "a batch goes to one topic: {} and {}",
                    first.topic, m.topic
                )));
            }
        }
        let batch = msgs.len() > 1;
        if batch {
            if msgs.len() > MAX_BATCH_MESSAGES {
                return Err(ClientError::MessageIllegal(format!(
                    "a batch holds at most {MAX_BATCH_MESSAGES} messages, got {}",
                    msgs.len()
                )));
            }
            let total: usize = msgs.iter().map(|m| m.body.len()).sum();
            if total > MAX_BATCH_BYTES {
                return Err(ClientError::MessageIllegal(format!(
                    "batch bodies are {total} bytes, over the limit of {MAX_BATCH_BYTES}"
                )));
            }
        }
        let born = now_ms();
        let flag = if batch { sys_flag::BATCH } else { 0 };
        let uniq_keys: Vec<String> = {
            let mut g = self.inner.keys.lock().expect("key generator lock");
            msgs.iter().map(|_| g.next_key()).collect()
        };
        let metas: Vec<MessageMeta> = msgs
            .iter()
            .zip(&uniq_keys)
            .map(|(m, k)| m.meta(k, born, flag))
            .collect();
        let body = if batch {
            // One copy for a batch: the frame body is the bodies back to back.
            let mut b = BytesMut::with_capacity(msgs.iter().map(|m| m.body.len()).sum());
            for m in msgs {
                b.extend_from_slice(&m.body);
            }
            b.freeze()
        } else {
            first.body.clone()
        };
        Ok(Prepared {
            req: SendRequest {
                producer_group: self.inner.group.clone(),
                topic: first.topic.clone(),
                queue_id: 0,
                messages: metas,
            },
            uniq_keys,
            body,
        })
    }

    /// Sends one message and waits for the broker's store result. On a transient failure
    /// it is sent again on another queue (up to `retry_times_when_send_failed` more times,
    /// within `send_timeout`), with the same unique key.
    pub async fn send(&self, msg: Message) -> Result<SendResult> {
        let mut p = self.prepare(std::slice::from_ref(&msg))?;
        let mut r = self.send_prepared(&mut p, Target::Any).await?;
        Ok(r.remove(0))
    }

    /// Sends a half message of a transaction (see `TransactionProducer`): marked `TRAN_MSG`
    /// and prepared, it waits on the broker until committed or rolled back.
    pub(crate) async fn send_half(&self, msg: &Message) -> Result<SendResult> {
        let mut p = self.prepare(std::slice::from_ref(msg))?;
        let meta = &mut p.req.messages[0];
        meta.properties.push((
            orbitmq_proto::sys::property::TRAN_MSG.to_owned(),
            "true".to_owned(),
        ));
        meta.sys_flag |= orbitmq_proto::record::sys_flag::TRANSACTION_PREPARED;
        let mut r = self.send_prepared(&mut p, Target::Any).await?;
        Ok(r.remove(0))
    }

    /// Sends to one queue (no retry on another queue: ordered messages stay in their queue).
    pub async fn send_to_queue(&self, msg: Message, mq: &MessageQueue) -> Result<SendResult> {
        let mut p = self.prepare(std::slice::from_ref(&msg))?;
        if mq.topic != p.topic() {
            return Err(ClientError::InvalidArgument(format!(
                "queue {mq} is not of the message's topic {}",
                p.topic()
            )));
        }
        let mut r = self.send_prepared(&mut p, Target::Queue(mq)).await?;
        Ok(r.remove(0))
    }

    /// Sends to the queue a selector picks among the topic's writable queues (sorted by
    /// broker and queue id, so the same index is the same queue while the route holds):
    /// messages with the same key stay in order when the selector maps the key to an index.
    pub async fn send_with_selector<F>(&self, msg: Message, selector: F) -> Result<SendResult>
    where
        F: FnOnce(&[MessageQueue], &Message) -> usize,
    {
        msg.validate()?;
        let route = self.inner.client.topic_route(&msg.topic).await?;
        let queues: Vec<MessageQueue> = route.writable().iter().map(|q| q.mq.clone()).collect();
        if queues.is_empty() {
            return Err(ClientError::NoQueue {
                topic: msg.topic.clone(),
                kind: "writable",
            });
        }
        let i = selector(&queues, &msg);
        let mq = queues.get(i).ok_or_else(|| {
            ClientError::InvalidArgument(format!(
                "selector chose queue index {i} of {}",
                queues.len()
            ))
        })?;
        self.send_to_queue(msg, &mq.clone()).await
    }

    /// Sends several messages of one topic to one queue in one request; they are stored
    /// together, in order, with consecutive offsets.
    pub async fn send_batch(&self, msgs: Vec<Message>) -> Result<Vec<SendResult>> {
        let mut p = self.prepare(&msgs)?;
        self.send_prepared(&mut p, Target::Any).await
    }

    /// Sends several messages of one topic to this queue in one request (RocketMQ's
    /// `send(Collection<Message>, MessageQueue)`); no retry on another queue.
    pub async fn send_batch_to_queue(
        &self,
        msgs: Vec<Message>,
        mq: &MessageQueue,
    ) -> Result<Vec<SendResult>> {
        let mut p = self.prepare(&msgs)?;
        if mq.topic != p.topic() {
            return Err(ClientError::InvalidArgument(format!(
                "queue {mq} is not of the messages' topic {}",
                p.topic()
            )));
        }
        self.send_prepared(&mut p, Target::Queue(mq)).await
    }

    /// Sends without waiting for the store result: returns once the request is queued on
    /// the connection. No retry; a failure after that point is not reported.
    pub async fn send_oneway(&self, msg: Message) -> Result<()> {
        let mut p = self.prepare(std::slice::from_ref(&msg))?;
        let route = self.inner.client.topic_route(p.topic()).await?;
        let writable = route.writable();
        let start = self.inner.next_queue.fetch_add(1, Ordering::Relaxed);
        let i = self
            .pick(&writable, start, None)
            .ok_or_else(|| ClientError::NoQueue {
                topic: p.topic().to_owned(),
                kind: "writable",
            })?;
        let qi = writable[i];
        let conn = self.inner.client.connection(&qi.endpoint).await?;
        let h = p.header(qi.mq.queue_id);
        conn.send_oneway(request::SEND_MESSAGE, h, p.body.clone())
            .await
    }

    /// Sends in the background and calls `callback` with the result.
    pub fn send_with_callback<F>(&self, msg: Message, callback: F)
    where
        F: FnOnce(Result<SendResult>) + Send + 'static,
    {
        let p = self.clone();
        tokio::spawn(async move {
            let r = p.send(msg).await;
            callback(r);
        });
    }

    /// A queue for a send: round robin, steering clear of `avoid` and of brokers the fault
    /// tolerance is avoiding.
    fn pick(&self, writable: &[&QueueInfo], start: usize, avoid: Option<&Avoid>) -> Option<usize> {
        let enabled = self.inner.client.config().send_latency_fault_enable;
        let faults = self.inner.faults.lock().expect("faults lock");
        let now = std::time::Instant::now();
        select_send_queue(writable, start, avoid, |b| {
            !enabled || faults.is_available(b, now)
        })
    }

    /// Feeds the fault tolerance with a send's outcome.
    fn record(&self, broker: &str, started: std::time::Instant, err: Option<&ClientError>) {
        if !self.inner.client.config().send_latency_fault_enable {
            return;
        }
        let now = std::time::Instant::now();
        let mut f = self.inner.faults.lock().expect("faults lock");
        match err {
            None => f.record_success(broker, now - started, now),
            Some(
                ClientError::Connect { .. }
                | ClientError::ConnectionLost { .. }
                | ClientError::Timeout { .. }
                | ClientError::SystemBusy(_)
                | ClientError::ServiceUnavailable(_),
            ) => {
                tracing::info!(%broker, error = ?err.map(|e| e.to_string()),
                    "broker avoided for a while after a failed send");
                f.record_failure(broker, now)
            }
            Some(_) => {}
        }
    }

    async fn send_prepared(&self, p: &mut Prepared, target: Target<'_>) -> Result<Vec<SendResult>> {
        let client = &self.inner.client;
        let budget = client.config().send_timeout;
        let deadline = Instant::now() + budget;
        let attempts = 1 + client.config().retry_times_when_send_failed;
        let mut avoid: Option<Avoid> = None;
        let mut last_err: Option<ClientError> = None;
        for attempt in 1..=attempts {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let res = self.attempt(p, &target, avoid.as_ref(), remaining).await;
            let (err, endpoint) = match res {
                Ok(r) => return Ok(r),
                Err(x) => x,
            };
            if err.invalidates_route() {
                client.invalidate_route(p.topic());
            }
            // A queue of our own choosing may move on; a fixed queue is retried only when
            // the message surely was not stored.
            let retry = match target {
                Target::Any => err.is_retriable_send(),
                Target::Queue(_) => matches!(
                    err,
                    ClientError::Connect { .. }
                        | ClientError::WrongShard { .. }
                        | ClientError::SystemBusy(_)
                        | ClientError::ServiceUnavailable(_)
                        | ClientError::NameServerUnavailable { .. }
                ),
            };
            if !retry || attempt == attempts {
                return Err(err);
            }
            tracing::warn!(topic = %p.topic(), uniq_key = %p.uniq_keys[0], attempt, error = %err,
                "send failed, retrying");
            avoid = endpoint;
            last_err = Some(err);
        }
        Err(last_err.unwrap_or_else(|| ClientError::Timeout {
            what: format!("send to {}", p.topic()),
            after: budget,
        }))
    }

    /// One attempt; on failure also returns the broker and endpoint that failed (to avoid
    /// next time).
    async fn attempt(
        &self,
        p: &mut Prepared,
        target: &Target<'_>,
        avoid: Option<&Avoid>,
        timeout: Duration,
    ) -> std::result::Result<Vec<SendResult>, (ClientError, Option<Avoid>)> {
        let client = &self.inner.client;
        let route = client.topic_route(p.topic()).await.map_err(|e| (e, None))?;
        // Borrowed from the route this attempt holds: nothing of it is cloned per attempt.
        let qi: &QueueInfo = match target {
            Target::Any => {
                let writable = route.writable();
                let start = self.inner.next_queue.fetch_add(1, Ordering::Relaxed);
                let i = self.pick(&writable, start, avoid).ok_or_else(|| {
                    (
                        ClientError::NoQueue {
                            topic: p.topic().to_owned(),
                            kind: "writable",
                        },
                        None,
                    )
                })?;
                writable[i]
            }
            Target::Queue(mq) => match route.find(mq) {
                Some(q) if q.writable() => q,
                Some(_) => {
                    return Err((
                        ClientError::InvalidArgument(format!("queue {mq} is not writable")),
                        None,
                    ))
                }
                None => {
                    return Err((
                        ClientError::InvalidArgument(format!("queue {mq} is not in the route")),
                        None,
                    ))
                }
            },
        };
        let fail = |e: ClientError| {
            (
                e,
                Some(Avoid {
                    broker: qi.mq.broker_name.clone(),
                    endpoint: qi.endpoint.clone(),
                }),
            )
        };
        let started = std::time::Instant::now();
        let h = p.header(qi.mq.queue_id);
        let res = client
            .call(
                &qi.endpoint,
                request::SEND_MESSAGE,
                h,
                p.body.clone(),
                timeout,
                &p.req.topic,
            )
            .await;
        self.record(&qi.mq.broker_name, started, res.as_ref().err());
        let f = res.map_err(|e| {
            if let ClientError::WrongShard { redirect, .. } = &e {
                client.redirect_queue(&qi.mq, redirect);
            }
            fail(e)
        })?;
        let status = SendStatus::of_code(f.code).unwrap_or_default();
        let resp: SendResponse = header::decode(&f.header).map_err(|e| {
            fail(ClientError::Protocol {
                endpoint: qi.endpoint.clone(),
                reason: format!("send response: {e}"),
            })
        })?;
        let sent = p.req.messages.len();
        if resp.queue_id != qi.mq.queue_id || resp.results.len() != sent {
            return Err(fail(ClientError::Protocol {
                endpoint: qi.endpoint.clone(),
                reason: format!(
                    "send to queue {} of {} messages answered for queue {} with {} results",
                    qi.mq.queue_id,
                    sent,
                    resp.queue_id,
                    resp.results.len()
                ),
            }));
        }
        // The send is over: its unique keys move into the results.
        Ok(resp
            .results
            .into_iter()
            .zip(std::mem::take(&mut p.uniq_keys))
            .map(|(r, uniq_key)| SendResult {
                msg_id: r.msg_id,
                uniq_key,
                queue: qi.mq.clone(),
                queue_offset: r.queue_offset,
                status,
            })
            .collect())
    }

    /// Stops the producer (and its client if it made its own). Sends in flight fail.
    pub async fn shutdown(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.client.unregister_producer(&self.inner.group);
        if self.inner.owns_client {
            self.inner.client.shutdown().await;
        }
    }
}

/// A start index that differs between processes and instances (no rand dependency needed).
fn random_start() -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as usize
}
