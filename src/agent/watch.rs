//! Blocking reads shared by many watchers (user-asks #33, #34).
//!
//! The registry keeps one index per table, so any change to any service
//! moves the index that `/v1/health/service/<s>` blocks on. Answering every
//! watcher of every service on each such change wakes thousands of clients
//! for nothing, and each of them re-renders the same answer. Here a
//! blocking read is keyed by what it asks (endpoint, name and the
//! parameters that shape the answer) and:
//!
//! - the answer is rendered once per catalog index, whoever asks;
//! - a watcher whose index is that of an earlier rendering with the same
//!   content keeps waiting: it answers only when its answer would differ
//!   (an index this agent never rendered, from another agent or endpoint,
//!   answers at once, as before);
//! - the JSON body, sorted by `?near=`, is built once per source and
//!   reused for a second, so 10,000 watchers of one service cost one
//!   sort and one serialization per change, not 10,000.
//!
//! The answers' `X-Consul-Index` stays the table index (monotonic, as
//! clients expect); only when the answer comes changes.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::server::Server;

/// Renderings remembered per key: a watcher arriving with an index older
/// than all of them answers at once. (One already waiting keeps the hash
/// it arrived with.)
const HISTORY: usize = 64;
/// Keys beyond which those idle for [`IDLE`] are dropped, and beyond
/// four times which any idle one is.
const MAX_KEYS: usize = 1024;
/// How long an unused key keeps its history: longer than the longest
/// wait (10 minutes and its jitter), so a watcher coming back with its
/// index still finds it.
const IDLE: Duration = Duration::from_secs(11 * 60);
/// How long a sorted body is reused: coordinates move by the second, and
/// a watcher answered within the same second sees the same order.
const BODY_TTL: Duration = Duration::from_secs(1);
/// Sorted bodies kept per rendering: `near` names any node (a client
/// agent's `_agent` reaches the server as its own name), so the
/// least recently built go beyond this many, or beyond [`MAX_BODY_BYTES`].
const MAX_BODIES: usize = 1024;
/// The bytes of sorted bodies kept per rendering.
const MAX_BODY_BYTES: usize = 32 << 20;
/// The parameters that shape a read's answer, and so its key; any other
/// (`index`, `wait`, `near`, `stale`, `token`, a typo) does not.
const SHAPING: &[&str] = &[
    "tag",
    "node-meta",
    "passing",
    "filter",
    "ns",
    "partition",
    "peer",
];

/// The blocking reads of one agent, by key.
#[derive(Default)]
pub struct Watches {
    keys: Mutex<HashMap<String, Arc<Watch>>>,
}

/// One key's renderings.
struct Watch {
    /// A tokio lock: the first waiter after a change renders while the
    /// others wait without holding a worker thread.
    state: tokio::sync::Mutex<State>,
    /// When the key was last read.
    used: Mutex<Instant>,
}

#[derive(Default)]
struct State {
    current: Option<Arc<Rendered>>,
    /// (index, content hash) of recent renderings, oldest first.
    history: VecDeque<(u64, u64)>,
}

/// One rendering of an answer: `(node, entry)` pairs in catalog order.
pub struct Rendered {
    /// The index the answer carries.
    pub index: u64,
    hash: u64,
    /// The entries, each with the node `?near=` sorts it by.
    pub list: Vec<(String, Value)>,
    /// Serialized bodies by sort source ("" for none): when built, and
    /// the body.
    bodies: Mutex<HashMap<String, (Instant, Bytes)>>,
}

impl Rendered {
    /// The body as a JSON array, in the order `sort` gives; built once per
    /// `source` and reused for a second (`BODY_TTL`).
    pub fn body(&self, source: &str, sort: impl FnOnce(&mut [&(String, Value)])) -> Bytes {
        if let Some((at, b)) = self.bodies.lock().expect("not poisoned").get(source)
            && at.elapsed() < BODY_TTL
        {
            return b.clone();
        }
        // Built outside the lock: two callers may both build one (the same
        // bytes); none waits on another's sort.
        let mut items: Vec<&(String, Value)> = self.list.iter().collect();
        sort(&mut items);
        let mut out = Vec::with_capacity(256 * items.len() + 2);
        out.push(b'[');
        for (i, (_, v)) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Writing a Value to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, v);
        }
        out.push(b']');
        let b = Bytes::from(out);
        let mut bodies = self.bodies.lock().expect("not poisoned");
        bodies.insert(source.to_string(), (Instant::now(), b.clone()));
        let mut bytes: usize = bodies.values().map(|(_, b)| b.len()).sum();
        while bodies.len() > MAX_BODIES || bytes > MAX_BODY_BYTES {
            let Some(oldest) = bodies
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, gone)) = bodies.remove(&oldest) {
                bytes -= gone.len();
            }
        }
        b
    }
}

fn content_hash(list: &[(String, Value)]) -> u64 {
    let mut h = DefaultHasher::new();
    for (n, v) in list {
        h.write(n.as_bytes());
        h.write_u8(0);
        h.write(v.to_string().as_bytes());
        h.write_u8(0);
    }
    h.finish()
}

impl Watch {
    /// The rendering for the catalog as it is now (rendered here if the
    /// index moved), and the content hash of the rendering at `since`, if
    /// this key still remembers it.
    async fn latest(
        &self,
        server: &Server,
        index_of: &impl Fn(&Catalog) -> u64,
        render: &impl Fn(&Catalog) -> Vec<(String, Value)>,
        since: Option<u64>,
    ) -> (Arc<Rendered>, Option<u64>) {
        *self.used.lock().expect("not poisoned") = Instant::now();
        let now = server.read(index_of);
        let mut st = self.state.lock().await;
        let stale = st.current.as_ref().is_none_or(|r| r.index < now);
        if stale {
            let (list, index) = server.read(|c| (render(c), index_of(c)));
            let hash = content_hash(&list);
            if st.history.back().is_none_or(|(i, _)| *i < index) {
                st.history.push_back((index, hash));
                if st.history.len() > HISTORY {
                    st.history.pop_front();
                }
            }
            st.current = Some(Arc::new(Rendered {
                index,
                hash,
                list,
                bodies: Mutex::new(HashMap::new()),
            }));
        }
        let r = st.current.clone().expect("rendered above");
        let then = since.and_then(|i| st.history.iter().find(|(at, _)| *at == i).map(|(_, h)| *h));
        (r, then)
    }
}

impl Watches {
    fn watch(&self, key: String) -> Arc<Watch> {
        let mut keys = self.keys.lock().expect("not poisoned");
        if keys.len() > MAX_KEYS && !keys.contains_key(&key) {
            // Keys in use (a watcher holds them) always stay; idle ones go
            // after [`IDLE`], or at once when there are far too many.
            let idle = |w: &Arc<Watch>| {
                Arc::strong_count(w) == 1 && w.used.lock().expect("not poisoned").elapsed() >= IDLE
            };
            keys.retain(|_, w| !idle(w));
            if keys.len() > 4 * MAX_KEYS {
                keys.retain(|_, w| Arc::strong_count(w) > 1);
            }
        }
        keys.entry(key)
            .or_insert_with(|| {
                Arc::new(Watch {
                    state: tokio::sync::Mutex::new(State::default()),
                    used: Mutex::new(Instant::now()),
                })
            })
            .clone()
    }

    /// Answers a read of `key`: at once without `blocking`; with
    /// `Some((index, deadline))`, once the answer differs from the one
    /// rendered at `index` (at once if that one is unknown here), or at
    /// the deadline. `index_of` is the index the answer carries; `render`
    /// builds the entries in a stable order.
    pub async fn read(
        &self,
        server: &Server,
        key: String,
        blocking: Option<(u64, tokio::time::Instant)>,
        index_of: impl Fn(&Catalog) -> u64,
        render: impl Fn(&Catalog) -> Vec<(String, Value)>,
    ) -> Arc<Rendered> {
        let w = self.watch(key);
        let Some((since, deadline)) = blocking else {
            return w.latest(server, &index_of, &render, None).await.0;
        };
        let mut rx = server.subscribe();
        // The content at `since`, looked up once: renderings made while
        // this watcher waits may push it out of the history.
        let mut then: Option<Option<u64>> = None;
        loop {
            let (r, at_since) = w.latest(server, &index_of, &render, Some(since)).await;
            let then = *then.get_or_insert(at_since);
            // An index from the future (another agent's) also waits, as
            // Consul's blocking queries do, until the answer changes.
            if r.index > since && then != Some(r.hash) {
                return r;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return r;
            }
        }
    }
}

/// The key of a read: the endpoint, the name and the parameters that shape
/// the answer (not the blocking, consistency or sort ones), sorted.
pub fn key(endpoint: &str, name: &str, p: &[(String, String)]) -> String {
    let mut shaping: Vec<&(String, String)> = p
        .iter()
        .filter(|(k, _)| SHAPING.contains(&k.as_str()))
        .collect();
    shaping.sort();
    // JSON, so that no name or value (decoded from the URL, so it may hold
    // any character) can pass for another query's separator.
    serde_json::json!([endpoint, name, shaping]).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_ignore_blocking_and_sorting_but_not_filters() {
        let p = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let a = key(
            "h",
            "web",
            &p(&[("tag", "x"), ("index", "5"), ("near", "_agent")]),
        );
        let b = key("h", "web", &p(&[("wait", "1s"), ("tag", "x")]));
        assert_eq!(a, b);
        assert_ne!(a, key("h", "web", &p(&[("tag", "y")])));
        assert_ne!(a, key("h", "api", &p(&[("tag", "x")])));
        assert_ne!(
            key("h", "web", &p(&[("tag", "x"), ("tag", "y")])),
            key("h", "web", &p(&[("tag", "x")]))
        );
        // Parameters that shape nothing share the key; separators in names
        // and values (URL-decoded, so anything) cannot forge another's.
        assert_eq!(a, key("h", "web", &p(&[("tag", "x"), ("junk", "1")])));
        assert_ne!(
            key("h", "web", &p(&[("passing", "1\u{0}tag=x")])),
            key("h", "web", &p(&[("passing", "1"), ("tag", "x")]))
        );
        assert_ne!(
            key("h", "web\u{0}tag=x", &p(&[])),
            key("h", "web", &p(&[("tag", "x")]))
        );
    }

    #[test]
    fn the_hash_follows_content_and_order() {
        let a = vec![("n1".to_string(), serde_json::json!({"Port": 1}))];
        let b = vec![("n1".to_string(), serde_json::json!({"Port": 2}))];
        assert_eq!(content_hash(&a), content_hash(&a.clone()));
        assert_ne!(content_hash(&a), content_hash(&b));
    }

    #[test]
    fn bodies_are_sorted_once_per_source() {
        let r = Rendered {
            index: 1,
            hash: 0,
            list: vec![
                ("a".into(), serde_json::json!(1)),
                ("b".into(), serde_json::json!(2)),
            ],
            bodies: Mutex::new(HashMap::new()),
        };
        assert_eq!(&r.body("", |_| {})[..], b"[1,2]");
        assert_eq!(&r.body("x", |v| v.reverse())[..], b"[2,1]");
        // Reused within the TTL: the sort is not run again.
        assert_eq!(&r.body("x", |_| panic!("sorted twice"))[..], b"[2,1]");
    }
}
