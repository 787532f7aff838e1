//! The client side: threads that read, write and compare-and-set a few
//! keys through random servers, recording every operation with its
//! invocation and completion times and its outcome, and that also write
//! write-once `ack/<client>/<n>` keys whose acknowledged values must all
//! survive.
//!
//! Checked reads are `GET ?consistent`, Consul's linearizable mode (the
//! leader confirms its leadership with a quorum before answering). tomo's
//! default reads are leader reads without that check: an old leader cut
//! off by a partition may still answer them with stale data, as Consul's
//! default mode may, so they are not part of the checked history.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use base64::Engine as _;

use crate::checker::{Action, Outcome, Record};
use crate::http::{self, Reply};
use crate::rng::Rng;

/// What the clients share.
pub struct Shared {
    /// Servers' HTTP ports.
    pub http: Vec<u16>,
    /// The checked keys.
    pub keys: Vec<String>,
    /// Time zero of the history.
    pub start: Instant,
    /// Set when the clients must finish.
    pub stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A write-once key's write.
#[derive(Clone, Debug)]
pub struct AckWrite {
    pub key: String,
    pub value: String,
    pub outcome: Outcome,
}

/// What a client did.
#[derive(Default)]
pub struct ClientLog {
    pub records: Vec<Record>,
    pub acks: Vec<AckWrite>,
}

/// The outcome of a write (`PUT`): `true` is done, `false` (a cas that
/// did not match) and 4xx are certainly not done, no connection is not
/// done, anything else may be.
pub fn write_outcome(reply: &Reply) -> (Outcome, String) {
    match reply {
        Reply::Answer(a) if a.status == 200 && a.body.trim() == "true" => {
            (Outcome::Ok, String::new())
        }
        Reply::Answer(a) if a.status == 200 && a.body.trim() == "false" => {
            (Outcome::Fail, "cas: false".into())
        }
        Reply::Answer(a) if (400..500).contains(&a.status) => {
            (Outcome::Fail, format!("{}: {}", a.status, a.body.trim()))
        }
        Reply::Answer(a) => (Outcome::Unknown, format!("{}: {}", a.status, a.body.trim())),
        Reply::NotSent(e) => (Outcome::Fail, e.clone()),
        Reply::Lost(e) => (Outcome::Unknown, e.clone()),
    }
}

/// One KV entry of a `GET` answer: (key, value, ModifyIndex).
pub fn entries(body: &str) -> Option<Vec<(String, Option<String>, u64)>> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.as_array()?
        .iter()
        .map(|e| {
            let key = e.get("Key")?.as_str()?.to_string();
            let index = e.get("ModifyIndex")?.as_u64()?;
            let value = match e.get("Value")? {
                serde_json::Value::Null => None,
                serde_json::Value::String(b) => Some(
                    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).ok()?)
                        .ok()?,
                ),
                _ => return None,
            };
            Some((key, value, index))
        })
        .collect()
}

/// A `GET ?consistent` of `key` through server `s`, as a record (`id`
/// and `client` filled in by the caller).
pub fn read(shared: &Shared, s: usize, key: &str) -> Record {
    let call = shared.now();
    let reply = http::request(
        "GET",
        shared.http[s],
        &format!("/v1/kv/{key}?consistent"),
        "",
    );
    let ret = shared.now();
    let (action, outcome, note) = match &reply {
        Reply::Answer(a) if a.status == 200 => match entries(&a.body).as_deref() {
            Some([(_, value, index)]) => (
                Action::Read {
                    value: value.clone(),
                    index: Some(*index),
                },
                Outcome::Ok,
                String::new(),
            ),
            _ => (
                Action::Read {
                    value: None,
                    index: None,
                },
                Outcome::Unknown,
                format!("unexpected body {}", a.body),
            ),
        },
        Reply::Answer(a) if a.status == 404 => (
            Action::Read {
                value: None,
                index: None,
            },
            Outcome::Ok,
            String::new(),
        ),
        // A read that failed tells nothing: unknown (the checker drops
        // it).
        Reply::Answer(a) => (
            Action::Read {
                value: None,
                index: None,
            },
            Outcome::Unknown,
            format!("{}: {}", a.status, a.body.trim()),
        ),
        Reply::NotSent(e) | Reply::Lost(e) => (
            Action::Read {
                value: None,
                index: None,
            },
            Outcome::Unknown,
            e.clone(),
        ),
    };
    Record {
        id: 0,
        client: 0,
        server: s,
        key: key.to_string(),
        action,
        call,
        ret,
        outcome,
        note,
    }
}

/// A `PUT` of `value` to `key` through server `s`, with `?cas=` if given.
fn put(
    shared: &Shared,
    s: usize,
    key: &str,
    value: &str,
    cas: Option<u64>,
) -> (u64, u64, Outcome, String) {
    let path = match cas {
        Some(i) => format!("/v1/kv/{key}?cas={i}"),
        None => format!("/v1/kv/{key}"),
    };
    let call = shared.now();
    let reply = http::request("PUT", shared.http[s], &path, value);
    let ret = shared.now();
    let (outcome, note) = write_outcome(&reply);
    (call, ret, outcome, note)
}

/// Client `c`'s loop, until `shared.stop`.
pub fn client(shared: Arc<Shared>, c: usize, mut rng: Rng) -> ClientLog {
    let mut log = ClientLog::default();
    // The last value (and its index) this client read of each key: what
    // its cas operations expect. `None` inside: read absent.
    let mut known: HashMap<usize, (Option<String>, u64)> = HashMap::new();
    let mut n = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        n += 1;
        let s = rng.below(shared.http.len());
        let k = rng.below(shared.keys.len());
        let key = shared.keys[k].clone();
        let value = format!("c{c}-{n}");
        let roll = rng.below(100);
        let mut rec = if roll < 10 {
            // A write-once key: acknowledged means it must be there at
            // the end.
            let key = format!("ack/{c}/{n}");
            let (_, _, outcome, _) = put(&shared, s, &key, &value, None);
            log.acks.push(AckWrite {
                key,
                value,
                outcome,
            });
            continue;
        } else if roll < 45 {
            let r = read(&shared, s, &key);
            if let (Outcome::Ok, Action::Read { value: v, index }) = (r.outcome, &r.action) {
                known.insert(k, (v.clone(), index.unwrap_or(0)));
            }
            r
        } else if roll < 70 {
            let (call, ret, outcome, note) = put(&shared, s, &key, &value, None);
            Record {
                id: 0,
                client: c,
                server: s,
                key,
                action: Action::Write { value },
                call,
                ret,
                outcome,
                note,
            }
        } else {
            // A read-modify-write half the time (the read is an operation
            // of its own), so that many cas operations can succeed; else a
            // cas on what this client last read (stale at times), or
            // create-only.
            if rng.chance(50) {
                let mut r = read(&shared, s, &key);
                if let (Outcome::Ok, Action::Read { value: v, index }) = (r.outcome, &r.action) {
                    known.insert(k, (v.clone(), index.unwrap_or(0)));
                }
                r.client = c;
                log.records.push(r);
            }
            let (expected, index) = match known.get(&k) {
                Some((Some(v), i)) if roll < 92 => (Some(v.clone()), *i),
                _ => (None, 0),
            };
            let (call, ret, outcome, note) = put(&shared, s, &key, &value, Some(index));
            Record {
                id: 0,
                client: c,
                server: s,
                key,
                action: Action::Cas {
                    index,
                    expected,
                    value,
                },
                call,
                ret,
                outcome,
                note,
            }
        };
        rec.client = c;
        log.records.push(rec);
    }
    log
}
