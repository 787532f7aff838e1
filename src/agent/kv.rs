//! Consul's KV endpoints (`/v1/kv/*`, `consul-api.md` §4.1) on an agent
//! that runs a server: reads from the local catalog, writes through Raft,
//! blocking queries on `?index=&wait=`, `X-Consul-Index` on every answer
//! (404s included, never 0).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::wire::request;
use crate::catalog::{Catalog, CatalogError, Command, KvEntry, KvSet, Outcome};
use crate::server::Server;

/// Parses a Go duration (`time.ParseDuration`): a sequence of decimal
/// numbers with units ns, us, µs, ms, s, m, h, e.g. `1h2m`, `1.5s`,
/// `120000ms`; `0` alone is zero. `None` if malformed.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

fn text(status: StatusCode, msg: &str, index: u64) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.to_string(),
    )
        .into_response();
    set_index(&mut r, index);
    r
}

fn set_index(r: &mut Response, index: u64) {
    let h = r.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    // X-Consul-KnownLeader and LastContact: stamped by `forward::dispatch`.
}

fn json(v: &Value, pretty: bool, index: u64) -> Response {
    let body = if pretty {
        serde_json::to_string_pretty(v).map(|s| s + "\n")
    } else {
        serde_json::to_string(v)
    }
    .unwrap_or_default();
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    set_index(&mut r, index);
    r
}

/// Consul's DirEntry: an empty value is `null`, a lock holder only when
/// held.
fn dir_entry(e: &KvEntry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(s) = &e.session {
        v["Session"] = Value::String(s.clone());
    }
    v
}

/// The index a read of `key` reports and blocks on: the entry's own for an
/// existing single key, the KV table's otherwise (deletes raise it).
fn read_index(c: &Catalog, key: &str, single: bool) -> u64 {
    match c.kv_get(key) {
        Some(e) if single => e.modify_index,
        _ => c.indexes().kv,
    }
}

/// Blocks a read for `?index=N` until the key's (or prefix's) index passes
/// N or the wait runs out.
async fn block(
    server: &Server,
    p: &HashMap<String, String>,
    key: &str,
    single: bool,
) -> Result<(), String> {
    let q = |k: &str| p.get(k).map(|v| v.as_str());
    if let Some((index, deadline)) = super::wire::blocking(q("index"), q("wait"))? {
        super::wire::wait_catalog(server, index, deadline, |c| read_index(c, key, single)).await;
    }
    Ok(())
}

/// `GET /v1/kv/{*key}`.
pub async fn get(
    State(server): State<Arc<Server>>,
    key: Option<Path<String>>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let key = key.map(|k| k.0).unwrap_or_default();
    let recurse = p.contains_key("recurse");
    let keys = p.contains_key("keys");
    let single = !recurse && !keys;
    if single && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name", 1);
    }
    // ?stale with ?consistent is refused before it gets here
    // (`forward::dispatch`).
    if let Err(e) = block(&server, &p, &key, single).await {
        return text(StatusCode::BAD_REQUEST, &e, 1);
    }
    // ?consistent was confirmed by the leader before the request got here
    // (`forward::dispatch`).
    let pretty = p.contains_key("pretty");
    server.read(|c| {
        let index = read_index(c, &key, single);
        if keys {
            let sep = p
                .get("separator")
                .or(p.get("seperator"))
                .map(String::as_str);
            let list = c.kv_keys(&key, sep);
            if list.is_empty() && !key.is_empty() {
                return not_found(index);
            }
            return json(&json!(list), pretty, index);
        }
        if recurse {
            let list: Vec<Value> = c.kv_prefix(&key).map(dir_entry).collect();
            if list.is_empty() {
                return not_found(index);
            }
            return json(&Value::Array(list), pretty, index);
        }
        match c.kv_get(&key) {
            None => not_found(index),
            Some(e) if p.contains_key("raw") => {
                let mut r = (StatusCode::OK, e.value.clone()).into_response();
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                h.insert(
                    "X-Content-Type-Options",
                    HeaderValue::from_static("nosniff"),
                );
                h.insert(
                    "Content-Security-Policy",
                    HeaderValue::from_static("sandbox"),
                );
                set_index(&mut r, index);
                r
            }
            Some(e) => json(&json!([dir_entry(e)]), pretty, index),
        }
    })
}

fn not_found(index: u64) -> Response {
    let mut r = StatusCode::NOT_FOUND.into_response();
    set_index(&mut r, index);
    r
}

async fn commit(server: &Server, cmd: Command) -> Response {
    match server.write(request(cmd)).await {
        Ok(Ok(Outcome::Bool(b))) => {
            let index = server.applied();
            let mut r = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                if b { "true" } else { "false" },
            )
                .into_response();
            set_index(&mut r, index);
            r
        }
        Ok(Ok(_)) => text(StatusCode::OK, "", server.applied()),
        Ok(Err(e)) => {
            let status = match e {
                CatalogError::ValueTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                CatalogError::MissingKey => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            text(status, &e.to_string(), server.applied())
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), 1),
    }
}

/// `PUT /v1/kv/{*key}`: the body is the value.
pub async fn put(
    State(server): State<Arc<Server>>,
    key: Option<Path<String>>,
    Query(p): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let key = key.map(|k| k.0).unwrap_or_default();
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name", 1);
    }
    let given = ["cas", "acquire", "release"]
        .iter()
        .filter(|k| p.contains_key(**k))
        .count();
    if given > 1 {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags", 1);
    }
    if body.len() > crate::catalog::MAX_VALUE {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &CatalogError::ValueTooLarge.to_string(),
            1,
        );
    }
    // An unparsable number names its parameter.
    let num = |k: &str| -> Result<Option<u64>, String> {
        match p.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("Invalid {k} index")),
        }
    };
    let (flags, cas) = match (num("flags"), num("cas")) {
        (Ok(f), Ok(c)) => (f.unwrap_or(0), c),
        (Err(e), _) | (_, Err(e)) => return text(StatusCode::BAD_REQUEST, &e, 1),
    };
    let set = KvSet {
        key,
        value: body.to_vec(),
        flags,
        cas,
        acquire: p.get("acquire").cloned(),
        release: p.get("release").cloned(),
    };
    commit(&server, Command::KvSet(set)).await
}

/// `DELETE /v1/kv/{*key}`.
pub async fn delete(
    State(server): State<Arc<Server>>,
    key: Option<Path<String>>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let key = key.map(|k| k.0).unwrap_or_default();
    let recurse = p.contains_key("recurse");
    if recurse && p.contains_key("cas") {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags", 1);
    }
    if key.is_empty() && !recurse {
        return text(StatusCode::BAD_REQUEST, "Missing key name", 1);
    }
    let cas = match p.get("cas").map(|v| v.parse::<u64>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid cas index", 1),
    };
    commit(&server, Command::KvDelete { key, recurse, cas }).await
}

/// The KV routes.
pub fn router(server: Arc<Server>) -> axum::Router {
    use axum::routing::get as route_get;
    axum::Router::new()
        .route("/v1/kv/", route_get(get).put(put).delete(delete))
        .route("/v1/kv/{*key}", route_get(get).put(put).delete(delete))
        .with_state(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_go_does() {
        let d = |s| parse_go_duration(s);
        assert_eq!(d("0"), Some(Duration::ZERO));
        assert_eq!(d("15.0s"), Some(Duration::from_secs(15)));
        assert_eq!(d("0.001s"), Some(Duration::from_millis(1)));
        assert_eq!(d("120000ms"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h2m"), Some(Duration::from_secs(3720)));
        assert_eq!(d("1m30.5s"), Some(Duration::from_secs_f64(90.5)));
        assert_eq!(d("250us"), Some(Duration::from_micros(250)));
        for bad in ["", "15", "s", "1x", "1.2.3s", "-1s", "1 s"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }
}
