//! Message queries (RocketMQ's queryMessage and viewMessage): by key, by unique key, and by
//! offset message id. Each broker shard answers from its own key index; the client asks every
//! shard that serves the topic and merges the answers by store time.

use std::net::SocketAddr;

use bytes::Bytes;
use orbitmq_proto::codes::{request, response};
use orbitmq_proto::header::{self, QueryMessageRequest, QueryMessageResponse, ViewMessageRequest};
use orbitmq_proto::limits::MAX_QUERY_MESSAGES;
use orbitmq_proto::msgid::OffsetId;
use orbitmq_proto::record;
use tokio::task::JoinSet;

use crate::error::bad_header;
use crate::{Client, ClientError, MessageExt, Result};

/// Messages a query by unique key asks each shard for: a producer's retries store one
/// unique key a few times at most.
pub const UNIQUE_KEY_QUERY_MAX: u32 = 32;

/// What a query asks of each shard.
#[derive(Clone, Debug)]
pub struct Query {
    pub topic: String,
    pub key: String,
    /// Match the unique key (`UNIQ_KEY`) instead of the keys.
    pub unique_key: bool,
    pub begin_ms: u64,
    pub end_ms: u64,
    /// At most this many from each shard (up to `MAX_QUERY_MESSAGES`): the newest.
    pub max_num: u32,
}

impl Query {
    fn matches(&self, v: &record::RecordView<'_>) -> bool {
        record::matches_key_query(
            v,
            &self.topic,
            &self.key,
            self.unique_key,
            self.begin_ms..=self.end_ms,
        )
    }
}

/// Checks a shard's answer to a query, which comes off the network: `count` whole records
/// filling the body, each matching the query. Returns the messages.
pub(crate) fn decode_answer(
    q: &Query,
    count: u32,
    body: &Bytes,
    broker_name: &str,
    addr: SocketAddr,
    shard: u16,
) -> std::result::Result<Vec<MessageExt>, String> {
    if count > MAX_QUERY_MESSAGES.min(q.max_num.max(1)) {
        return Err(format!(
            "{count} messages, over the {} asked for",
            q.max_num
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for i in 0..count {
        let v = record::decode(&body[at..]).map_err(|e| format!("record {i}: {e}"))?;
        if !q.matches(&v) {
            return Err(format!(
                "record {i} (topic {}, keys {:?}) does not match the query",
                v.topic, v.keys
            ));
        }
        out.push(MessageExt::from_record(&v, body, broker_name, addr, shard));
        at += v.total_size as usize;
    }
    if at != body.len() {
        return Err(format!("{count} records use {at} of {} bytes", body.len()));
    }
    Ok(out)
}

impl Client {
    /// Messages of `topic` whose keys include `key`, stored from `begin_ms` to `end_ms`
    /// (milliseconds), the newest `max_num` of each broker shard, oldest first.
    pub async fn query_messages(
        &self,
        topic: &str,
        key: &str,
        begin_ms: u64,
        end_ms: u64,
        max_num: u32,
    ) -> Result<Vec<MessageExt>> {
        self.query(Query {
            topic: topic.to_owned(),
            key: key.to_owned(),
            unique_key: false,
            begin_ms,
            end_ms,
            max_num,
        })
        .await
    }

    /// The messages of `topic` with this unique key (`MessageExt::uniq_key`, the same across
    /// a producer's retries: a retried send may have stored it more than once).
    pub async fn query_by_unique_key(
        &self,
        topic: &str,
        uniq_key: &str,
    ) -> Result<Vec<MessageExt>> {
        self.query(Query {
            topic: topic.to_owned(),
            key: uniq_key.to_owned(),
            unique_key: true,
            begin_ms: 0,
            end_ms: u64::MAX,
            max_num: UNIQUE_KEY_QUERY_MAX,
        })
        .await
    }

    /// Asks every shard endpoint of the topic's route. A shard that cannot be asked is
    /// skipped with a warning while another answers; if none answers, its error is returned.
    pub async fn query(&self, q: Query) -> Result<Vec<MessageExt>> {
        if q.max_num == 0 || q.begin_ms > q.end_ms || q.key.is_empty() {
            return Err(ClientError::InvalidArgument(format!(
                "a query needs a key, max_num of at least 1 and begin <= end: {q:?}"
            )));
        }
        let route = self.topic_route(&q.topic).await?;
        let mut shards: Vec<(String, String, u32)> = route
            .queues
            .iter()
            .map(|i| (i.endpoint.clone(), i.mq.broker_name.clone(), i.shard))
            .collect();
        shards.sort();
        shards.dedup();
        let mut asks = JoinSet::new();
        for (endpoint, broker, shard) in shards {
            let (c, q) = (self.clone(), q.clone());
            asks.spawn(async move { c.query_shard(&q, &endpoint, &broker, shard).await });
        }
        let mut out = Vec::new();
        let mut failed = None;
        let mut answered = false;
        while let Some(r) = asks.join_next().await {
            match r {
                Ok(Ok(ms)) => {
                    answered = true;
                    out.extend(ms);
                }
                Ok(Err(e)) => {
                    tracing::warn!(topic = %q.topic, error = %e, "a broker shard did not answer a query");
                    failed.get_or_insert(e);
                }
                Err(e) => {
                    failed.get_or_insert(ClientError::InvalidArgument(e.to_string()));
                }
            }
        }
        if let (false, Some(e)) = (answered, failed) {
            return Err(e);
        }
        out.sort_by(|a, b| {
            (a.store_timestamp, &a.broker_name, a.commit_log_offset).cmp(&(
                b.store_timestamp,
                &b.broker_name,
                b.commit_log_offset,
            ))
        });
        Ok(out)
    }

    async fn query_shard(
        &self,
        q: &Query,
        endpoint: &str,
        broker: &str,
        shard: u32,
    ) -> Result<Vec<MessageExt>> {
        let h = header::encode(&QueryMessageRequest {
            topic: q.topic.clone(),
            key: q.key.clone(),
            unique_key: q.unique_key,
            max_num: q.max_num.min(MAX_QUERY_MESSAGES),
            begin_ms: q.begin_ms,
            end_ms: q.end_ms,
        });
        let conn = self.connection(endpoint).await?;
        let f = conn
            .request(
                request::QUERY_MESSAGE,
                h,
                Bytes::new(),
                self.config().request_timeout,
            )
            .await?;
        if f.code != response::SUCCESS {
            return Err(ClientError::from_response(f.code, &f.header, &q.topic));
        }
        let r: QueryMessageResponse = header::decode(&f.header).map_err(bad_header(endpoint))?;
        if r.truncated {
            tracing::warn!(endpoint, topic = %q.topic, key = %q.key,
                "the shard reached the bounds of its search: the answer may be incomplete");
        }
        let shard = u16::try_from(shard).map_err(|_| ClientError::Protocol {
            endpoint: endpoint.to_owned(),
            reason: format!("shard {shard} is over u16"),
        })?;
        decode_answer(q, r.count, &f.body, broker, conn.addr(), shard).map_err(|reason| {
            ClientError::Protocol {
                endpoint: endpoint.to_owned(),
                reason,
            }
        })
    }

    /// The message an offset message id names (`MessageExt::msg_id`): asked of the broker
    /// shard the id encodes. `None`: no message starts there (deleted by retention, or an id
    /// of another store). Ids of IPv6 brokers hold a hash of the address and cannot be
    /// looked up this way.
    pub async fn view_message(&self, msg_id: &str) -> Result<Option<MessageExt>> {
        let id = OffsetId::decode(msg_id).ok_or_else(|| {
            ClientError::InvalidArgument(format!(
                "{msg_id:?} is not an offset message id (32 hex digits)"
            ))
        })?;
        let [a, b, c, d] = id.ip;
        let endpoint = format!("{a}.{b}.{c}.{d}:{}", id.port);
        let conn = self.connection(&endpoint).await?;
        let f = conn
            .request(
                request::VIEW_MESSAGE_BY_ID,
                header::encode(&ViewMessageRequest { offset: id.offset }),
                Bytes::new(),
                self.config().request_timeout,
            )
            .await?;
        match f.code {
            response::SUCCESS => {}
            response::QUERY_NOT_FOUND => return Ok(None),
            code => return Err(ClientError::from_response(code, &f.header, "")),
        }
        let protocol = |reason: String| ClientError::Protocol {
            endpoint: endpoint.clone(),
            reason,
        };
        let v = record::decode(&f.body).map_err(|e| protocol(e.to_string()))?;
        if v.physical_offset != id.offset || v.total_size as usize != f.body.len() {
            return Err(protocol(format!(
                "asked for the record at {}, got one at {} ({} of {} bytes)",
                id.offset,
                v.physical_offset,
                v.total_size,
                f.body.len()
            )));
        }
        // The broker's name, from the route of the message's topic when it can be had.
        let broker = match self.topic_route(v.topic).await {
            Ok(r) => r
                .queues
                .iter()
                .find(|q| q.endpoint == endpoint)
                .map(|q| q.mq.broker_name.clone()),
            Err(_) => None,
        };
        Ok(Some(MessageExt::from_record(
            &v,
            &f.body,
            broker.as_deref().unwrap_or(&endpoint),
            conn.addr(),
            id.shard,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orbitmq_proto::record::{Message, Placement};

    fn rec(topic: &str, keys: &str, uniq: &str, ts: u64, out: &mut Vec<u8>) {
        let m = Message {
            topic: topic.into(),
            keys: keys.into(),
            properties: vec![(orbitmq_proto::msgid::UNIQ_KEY.into(), uniq.into())],
            body: Bytes::from_static(b"hello"),
            born_host: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        };
        let at = Placement {
            queue_offset: 0,
            physical_offset: out.len() as u64,
            store_timestamp: ts,
        };
        record::encode_into(&m, at, out);
    }

    fn q(key: &str, unique_key: bool) -> Query {
        Query {
            topic: "T".into(),
            key: key.into(),
            unique_key,
            begin_ms: 10,
            end_ms: 20,
            max_num: 8,
        }
    }

    #[test]
    fn an_answer_must_hold_only_whole_records_that_match_the_query() {
        let addr: SocketAddr = "127.0.0.1:10911".parse().unwrap();
        let mut b = Vec::new();
        rec("T", "a b", "U1", 10, &mut b);
        rec("T", "b", "U2", 20, &mut b);
        let body = Bytes::from(b.clone());
        let ms = decode_answer(&q("b", false), 2, &body, "br", addr, 0).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[0].keys, ["a", "b"]);
        assert_eq!(ms[1].uniq_key.as_deref(), Some("U2"));
        // Another key, unique key, topic or time: refused.
        assert!(decode_answer(&q("a", false), 2, &body, "br", addr, 0).is_err());
        assert!(decode_answer(&q("U1", true), 2, &body, "br", addr, 0).is_err());
        let mut t = q("b", false);
        t.end_ms = 19;
        assert!(decode_answer(&t, 2, &body, "br", addr, 0).is_err());
        // Counts that do not fit the body, or exceed what was asked.
        assert!(decode_answer(&q("b", false), 1, &body, "br", addr, 0).is_err());
        assert!(decode_answer(&q("b", false), 3, &body, "br", addr, 0).is_err());
        assert!(decode_answer(&q("b", false), 9, &body, "br", addr, 0).is_err());
        let torn = Bytes::from(b[..b.len() - 1].to_vec());
        assert!(decode_answer(&q("b", false), 2, &torn, "br", addr, 0).is_err());
        assert!(
            decode_answer(&q("b", false), 0, &Bytes::new(), "br", addr, 0)
                .unwrap()
                .is_empty()
        );
    }
}
