//! Transactional messages (RocketMQ's TransactionMQProducer): a half message is sent, the local
//! transaction runs, and its outcome commits the message (consumers see it) or rolls it back.
//! If the outcome is unknown, or never arrives, the broker asks back later
//! ([`TransactionListener::check_local_transaction`]) until it gets one.

use std::sync::Arc;

use bytes::Bytes;
use orbitmq_proto::codes::{push, request, response};
use orbitmq_proto::header::{self, CheckTransactionNotice, EndTransactionRequest};
use orbitmq_proto::msgid::OffsetId;
use orbitmq_proto::record;
use orbitmq_proto::sys::{property, TRANS_HALF_TOPIC};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::{Client, ClientConfig, ClientError, Message, MessageExt, Producer, Result, SendResult};

/// How a local transaction ended, as the listener reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalTransactionState {
    CommitMessage,
    RollbackMessage,
    /// Not known yet: the broker asks again later.
    Unknown,
}

/// The application's side of a transaction. Both are called on tokio's blocking pool, so
/// they may block; a panic counts as [`LocalTransactionState::Unknown`].
pub trait TransactionListener: Send + Sync + 'static {
    /// Runs the local transaction of a half message just stored.
    fn execute_local_transaction(&self, msg: &Message) -> LocalTransactionState;
    /// Says how the local transaction of a half message ended (asked by the broker when the
    /// outcome did not arrive). `msg` shows the message's real topic and queue.
    fn check_local_transaction(&self, msg: &MessageExt) -> LocalTransactionState;
}

/// A transactional send's result: the half message's send, and the local outcome.
#[derive(Clone, Debug)]
pub struct TransactionSendResult {
    pub send: SendResult,
    pub local_state: LocalTransactionState,
}

/// A producer of transactional messages.
pub struct TransactionProducer {
    producer: Producer,
    listener: Arc<dyn TransactionListener>,
    checks: JoinHandle<()>,
    /// Shard endpoints this producer has announced itself to (a heartbeat naming its group),
    /// so their check-backs reach it without waiting for the periodic heartbeat.
    announced: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl TransactionProducer {
    pub async fn new(
        group: &str,
        config: ClientConfig,
        listener: Arc<dyn TransactionListener>,
    ) -> Result<TransactionProducer> {
        let producer = Producer::new(group, config).await?;
        let pushes = producer.client().pushes();
        let checks = tokio::spawn(answer_checks(
            producer.client().clone(),
            group.to_owned(),
            listener.clone(),
            pushes,
        ));
        Ok(TransactionProducer {
            producer,
            listener,
            checks,
            announced: Default::default(),
        })
    }

    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// Sends `msg` as a half message, runs the local transaction, and sends its outcome.
    /// `Unknown` (or an outcome that could not be delivered) leaves the message to the
    /// broker's check-back. An error here means the half message was not stored.
    pub async fn send_message_in_transaction(&self, msg: Message) -> Result<TransactionSendResult> {
        let send = self.producer.send_half(&msg).await?;
        let client = self.producer.client();
        // The shard that stored it: the one that owns its queue.
        let endpoint = match client.topic_route(&send.queue.topic).await {
            Ok(r) => r.find(&send.queue).map(|q| q.endpoint.clone()),
            Err(_) => None,
        };
        if let Some(e) = &endpoint {
            // Announced once; the periodic heartbeat covers a round that failed.
            let new = self
                .announced
                .lock()
                .expect("announced lock")
                .insert(e.clone());
            if new {
                if let Err(err) = client.heartbeat().await {
                    tracing::debug!(error = %err, "heartbeat after a half message failed");
                }
            }
        }
        let listener = self.listener.clone();
        // As RocketMQ: a half message a SYNC_MASTER could not copy to its slave is rolled
        // back, and the local transaction is not run.
        let local_state = if send.status != crate::producer::SendStatus::SendOk {
            LocalTransactionState::RollbackMessage
        } else {
            tokio::task::spawn_blocking(move || listener.execute_local_transaction(&msg))
                .await
                .unwrap_or(LocalTransactionState::Unknown)
        };
        if local_state != LocalTransactionState::Unknown {
            let half_offset = OffsetId::decode(&send.msg_id).map(|id| id.offset);
            match (endpoint, half_offset) {
                (Some(endpoint), Some(half_offset)) => {
                    let r = end_transaction(
                        client,
                        &endpoint,
                        self.producer.group(),
                        half_offset,
                        send.queue_offset,
                        local_state == LocalTransactionState::CommitMessage,
                        false,
                    )
                    .await;
                    if let Err(e) = r {
                        tracing::warn!(msg_id = %send.msg_id, error = %e,
                            "transaction outcome not delivered: the broker will check back");
                    }
                }
                _ => tracing::warn!(msg_id = %send.msg_id,
                    "no route to the half message's shard: the broker will check back"),
            }
        }
        Ok(TransactionSendResult { send, local_state })
    }

    pub async fn shutdown(&self) {
        self.checks.abort();
        self.producer.shutdown().await;
    }
}

impl Drop for TransactionProducer {
    fn drop(&mut self) {
        // The check-back task holds the client: it ends with the producer.
        self.checks.abort();
    }
}

async fn end_transaction(
    client: &Client,
    endpoint: &str,
    group: &str,
    half_offset: u64,
    half_queue_offset: u64,
    commit: bool,
    from_check: bool,
) -> Result<()> {
    let h = header::encode(&EndTransactionRequest {
        producer_group: group.to_owned(),
        half_offset,
        half_queue_offset,
        commit,
        from_check,
    });
    let f = client
        .request(endpoint, request::END_TRANSACTION, h, Bytes::new())
        .await?;
    if f.code != response::SUCCESS {
        return Err(ClientError::from_response(
            f.code,
            &f.header,
            TRANS_HALF_TOPIC,
        ));
    }
    Ok(())
}

/// The message a check-back shows the listener: the half message with its real topic and
/// queue; `None` if the record does not match its notice.
fn checked_message(n: &CheckTransactionNotice, body: &Bytes, endpoint: &str) -> Option<MessageExt> {
    let v = record::decode(body).ok()?;
    if v.physical_offset != n.half_offset
        || v.queue_offset != n.half_queue_offset
        || v.topic != TRANS_HALF_TOPIC
        || v.property(property::PGROUP) != Some(n.producer_group.as_str())
    {
        return None;
    }
    let id = OffsetId::decode(&n.msg_id)?;
    let addr = std::net::SocketAddr::from((id.ip, id.port));
    let mut m = MessageExt::from_record(&v, body, endpoint, addr, id.shard);
    m.topic = v.property(property::REAL_TOPIC)?.to_owned();
    m.queue_id = v.property(property::REAL_QID)?.parse().ok()?;
    Some(m)
}

/// Answers the broker's check-backs for `group` until the producer shuts down.
async fn answer_checks(
    client: Client,
    group: String,
    listener: Arc<dyn TransactionListener>,
    mut pushes: broadcast::Receiver<crate::remoting::Push>,
) {
    loop {
        let p = match pushes.recv().await {
            Ok(p) => p,
            // Missed ones are asked again at the next check round.
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if p.code != push::CHECK_TRANSACTION_STATE {
            continue;
        }
        let Some((n, body)) = p.check else { continue };
        if n.producer_group != group {
            continue;
        }
        let Some(msg) = checked_message(&n, &body, &p.endpoint) else {
            tracing::warn!(endpoint = %p.endpoint, "a transaction check names a record that does not match");
            continue;
        };
        let (client, group, listener) = (client.clone(), group.clone(), listener.clone());
        tokio::spawn(async move {
            let state = tokio::task::spawn_blocking(move || listener.check_local_transaction(&msg))
                .await
                .unwrap_or(LocalTransactionState::Unknown);
            if state == LocalTransactionState::Unknown {
                return;
            }
            let commit = state == LocalTransactionState::CommitMessage;
            if let Err(e) = end_transaction(
                &client,
                &p.endpoint,
                &group,
                n.half_offset,
                n.half_queue_offset,
                commit,
                true,
            )
            .await
            {
                tracing::warn!(msg_id = %n.msg_id, error = %e, "check-back answer not delivered");
            }
        });
    }
}
