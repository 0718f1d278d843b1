//! Message queries a shard answers from its own store: QUERY_MESSAGE (by key or unique key,
//! through the shard's key index) and VIEW_MESSAGE_BY_ID (the record at a CommitLog offset,
//! which an offset message id names). A client asks every shard of a topic's brokers and
//! merges the answers.

use bytes::BytesMut;
use orbitmq_proto::codes::response;
use orbitmq_proto::frame::Frame;
use orbitmq_proto::header::{self, QueryMessageRequest, QueryMessageResponse, ViewMessageRequest};
use orbitmq_proto::limits::{self, MAX_KEYS_LEN, MAX_QUERY_MESSAGES};

use crate::log::indexfile::KEY_SEPARATOR;
use crate::net::server::{error_frame, ok_frame};
use crate::shard::broker::{store_error_code, ShardHandler};

/// Why a query is refused before the store is asked; the text goes back with BAD_REQUEST
/// (TOPIC_NOT_EXIST for an unknown topic).
pub fn check_query(q: &QueryMessageRequest) -> Result<(), String> {
    limits::validate_topic(&q.topic).map_err(|e| e.to_string())?;
    if q.key.is_empty() || q.key.len() > MAX_KEYS_LEN {
        return Err(format!(
            "a key is 1..={MAX_KEYS_LEN} bytes, got {}",
            q.key.len()
        ));
    }
    if !q.unique_key && q.key.contains(KEY_SEPARATOR) {
        return Err(format!(
            "key {:?} holds a space, which separates a message's keys: no key matches it",
            q.key
        ));
    }
    if q.max_num == 0 {
        return Err("max_num must be at least 1".into());
    }
    if q.begin_ms > q.end_ms {
        return Err(format!(
            "the time range ends ({}) before it begins ({})",
            q.end_ms, q.begin_ms
        ));
    }
    Ok(())
}

impl ShardHandler {
    pub(crate) async fn query_message(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let q: QueryMessageRequest = match header::decode(&req.header) {
            Ok(q) => q,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        if let Err(why) = check_query(&q) {
            return error_frame(id, response::BAD_REQUEST, why);
        }
        if self.shared.topics.get(&q.topic).is_none() {
            return error_frame(
                id,
                response::TOPIC_NOT_EXIST,
                format!("topic {} does not exist on this broker", q.topic),
            );
        }
        let found = self
            .store
            .query_key(
                &q.topic,
                &q.key,
                q.unique_key,
                q.begin_ms,
                q.end_ms,
                q.max_num.min(MAX_QUERY_MESSAGES) as usize,
            )
            .await;
        match found {
            Ok((records, truncated)) => {
                let mut body = BytesMut::with_capacity(records.iter().map(|r| r.len()).sum());
                for r in &records {
                    body.extend_from_slice(r);
                }
                ok_frame(
                    id,
                    header::encode(&QueryMessageResponse {
                        count: records.len() as u32,
                        truncated,
                    }),
                    body.freeze(),
                )
            }
            Err(e) => error_frame(id, store_error_code(&e), e.to_string()),
        }
    }

    pub(crate) async fn view_message(&self, req: &Frame) -> Frame {
        let id = req.request_id;
        let v: ViewMessageRequest = match header::decode(&req.header) {
            Ok(v) => v,
            Err(e) => return error_frame(id, response::BAD_REQUEST, e.to_string()),
        };
        match self.store.record_by_offset(v.offset).await {
            Ok(Some(record)) => ok_frame(id, bytes::Bytes::new(), record),
            Ok(None) => error_frame(
                id,
                response::QUERY_NOT_FOUND,
                format!(
                    "no message starts at CommitLog offset {} of shard {}",
                    v.offset, self.shard
                ),
            ),
            Err(e) => error_frame(id, store_error_code(&e), e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(key: &str, unique_key: bool) -> QueryMessageRequest {
        QueryMessageRequest {
            topic: "T".into(),
            key: key.into(),
            unique_key,
            max_num: 32,
            begin_ms: 0,
            end_ms: u64::MAX,
        }
    }

    #[test]
    fn a_query_names_a_topic_one_key_and_a_time_range() {
        assert_eq!(check_query(&q("k1", false)), Ok(()));
        assert!(check_query(&q("", false)).is_err());
        assert!(check_query(&q(&"k".repeat(MAX_KEYS_LEN + 1), false)).is_err());
        assert!(check_query(&q("a b", false)).unwrap_err().contains("space"));
        let bad_topic = QueryMessageRequest {
            topic: "a b".into(),
            ..q("k", false)
        };
        assert!(check_query(&bad_topic).is_err());
        let zero = QueryMessageRequest {
            max_num: 0,
            ..q("k", false)
        };
        assert!(check_query(&zero).is_err());
        let backwards = QueryMessageRequest {
            begin_ms: 2,
            end_ms: 1,
            ..q("k", false)
        };
        assert!(check_query(&backwards).unwrap_err().contains("ends"));
    }
}
