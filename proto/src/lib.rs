//! The orbitmq wire protocol: frames, headers, codes, message ids, limits, and the stored
//! record format that a pull returns.

pub mod codes;
pub mod frame;
pub mod header;
pub mod limits;
pub mod msgid;
pub mod record;
pub mod sys;
