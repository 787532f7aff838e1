//! Small pieces every Consul-shaped endpoint shares: plain-text error
//! bodies, request JSON read with keys matched without regard to case
//! (python-consul sends lowercase), the leader-clock reading a write
//! carries into the Raft log, and blocking queries' `index` and `wait`.

use std::time::{Duration, SystemTime};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use crate::catalog::{Catalog, Command, Service};
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

/// A request body that must be a JSON object (`Err`: Consul's 400 text).
pub fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("Request decode failed: not an object".into()),
        Err(e) => Err(format!("Request decode failed: {e}")),
    }
}

/// The strings of the array at `key` (any case).
pub fn string_list(m: &Map<String, Value>, key: &str) -> Vec<String> {
    field(m, key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The string values of the object at `key` (any case).
pub fn string_map(m: &Map<String, Value>, key: &str) -> std::collections::BTreeMap<String, String> {
    field(m, key)
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// A service definition (`catalog/register`'s `Service`, whose name key
/// is `Service`, or `agent/service/register`, whose is `Name`); the ID
/// defaults to the name. `None` without a name.
pub fn service_from(m: &Map<String, Value>, name_key: &str) -> Option<Service> {
    let name = str_of(m, name_key);
    if name.is_empty() {
        return None;
    }
    Some(Service {
        id: Some(str_of(m, "ID"))
            .filter(|i| !i.is_empty())
            .unwrap_or(name.clone()),
        name,
        tags: string_list(m, "Tags"),
        address: str_of(m, "Address"),
        port: field(m, "Port")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(65535) as u16,
        meta: string_map(m, "Meta"),
        create_index: 0,
        modify_index: 0,
    })
}

/// A blocking query's default wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest wait (Consul's cap).
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A blocking query's `index` and deadline from `?index=&wait=`: `wait`
/// is a Go duration (5 minutes by default, at most 10), plus a jitter of
/// up to wait/16 as Consul adds (clients time out at wait + wait/16 at the
/// earliest). `None` without `index` or with `index=0`.
pub fn blocking(
    index: Option<&str>,
    wait: Option<&str>,
) -> Result<Option<(u64, tokio::time::Instant)>, &'static str> {
    let Some(index) = index else {
        return Ok(None);
    };
    let index: u64 = index.parse().map_err(|_| "Invalid index")?;
    // Consul runs `index=0` once, without blocking.
    if index == 0 {
        return Ok(None);
    }
    let wait = match wait {
        Some(w) => super::kv::parse_go_duration(w).ok_or("Invalid wait time")?,
        None => DEFAULT_WAIT,
    }
    .min(MAX_WAIT);
    // Spread by the clock's nanoseconds.
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let jitter = (wait / 16).mul_f64(f64::from(nanos % 1000) / 1000.0);
    Ok(Some((index, tokio::time::Instant::now() + wait + jitter)))
}

/// Waits until `index_of(catalog)` passes `index` or the deadline comes.
pub async fn wait_catalog(
    server: &crate::server::Server,
    index: u64,
    deadline: tokio::time::Instant,
    index_of: impl Fn(&Catalog) -> u64,
) {
    let mut rx = server.subscribe();
    while server.read(&index_of) <= index {
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            break;
        }
    }
}
