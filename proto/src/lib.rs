//! The orbitmq wire protocol: frames, headers, codes, message ids, limits, and the stored
//! record format that a pull returns.

pub mod codes;
pub mod frame;
pub mod header;
pub mod limits;
pub mod msgid;
pub mod record;
pub mod sql;
pub mod sys;

/// Wall-clock milliseconds since the Unix epoch: born, store and delivery times (0 if the
/// clock is before the epoch).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
