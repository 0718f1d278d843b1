//! The orbitmq wire protocol crate: limits and the record format shared by broker and client.
//! (Frames, headers and request codes arrive with the broker issue.)

pub mod limits;
pub mod record;
