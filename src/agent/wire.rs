//! Small pieces every Consul-shaped endpoint shares: plain-text error
//! bodies, request JSON read with keys matched without regard to case
//! (python-consul sends lowercase), and the leader-clock reading a write
//! carries into the Raft log.

use std::time::{Duration, SystemTime};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::catalog::Command;
use crate::raft::Request;

/// A `text/plain` body with this status (Consul's error replies).
pub fn text(status: StatusCode, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.to_string(),
    )
        .into_response()
}

/// The value of `key` in a JSON object, matched without regard to case.
pub fn field<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

/// The string at `key` (any case), empty when absent or not a string.
pub fn str_of(m: &Map<String, Value>, key: &str) -> String {
    field(m, key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Wall-clock time since the Unix epoch.
pub fn now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// `cmd` stamped with this server's clock, ready for the log.
pub fn request(cmd: Command) -> Request {
    Request { now: now(), cmd }
}
