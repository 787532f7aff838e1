//! Many blocking queries on one service through one agent
//! (`agent::watch`): watchers of `/v1/health/service/web?near=_agent`
//! answer when web changes (an instance changed, added or removed) and not
//! when anything else in the catalog or KV does; they all get the same
//! body, sorted by `near`; an index this agent never answered with answers
//! at once, as Consul's blocking queries do. And `tomo bench watchers`
//! end to end, briefly (its figures are in `benches/RESULTS.md`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tomo::agent::{Agent, AgentConfig};
use tomo::server::ServerConfig;

/// One HTTP/1.1 exchange: (status, X-Consul-Index, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, u64, String) {
    let a = common::http_full(method, addr.port(), path, body, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{method} {path}: no answer"));
    let index = a.header("x-consul-index").map_or(0, |v| v.parse().unwrap());
    (a.status, index, a.body)
}

fn ok(addr: SocketAddr, method: &str, path: &str, body: &str) {
    let (st, _, got) = http(addr, method, path, body);
    assert_eq!(st, 200, "{method} {path}: {got}");
}

fn register(addr: SocketAddr, node: &str, service: &str, tags: &str) {
    let body = format!(
        r#"{{"Node":"{node}","Address":"10.0.0.{}","Service":{{"Service":"{service}","Tags":{tags},"Port":80}}}}"#,
        node.len()
    );
    ok(addr, "PUT", "/v1/catalog/register", &body);
}

fn place(addr: SocketAddr, node: &str, ms: f64) {
    let body = format!(
        r#"{{"Node":"{node}","Coord":{{"Vec":[{},0,0,0,0,0,0,0],"Error":0.2,"Adjustment":0,"Height":0.00001}}}}"#,
        ms / 1000.0
    );
    ok(addr, "PUT", "/v1/coordinate/update", &body);
}

fn nodes(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["Node"]["Node"].as_str().unwrap().to_string())
        .collect()
}

/// `n` watchers parked on `path` at `index`; each returns (index, body).
fn park(
    addr: SocketAddr,
    path: &str,
    index: u64,
    n: usize,
    done: &Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<(u64, String)>> {
    (0..n)
        .map(|_| {
            let (path, done) = (format!("{path}&index={index}&wait=60s"), done.clone());
            std::thread::spawn(move || {
                let (st, i, body) = http(addr, "GET", &path, "");
                assert_eq!(st, 200, "{body}");
                done.fetch_add(1, Ordering::SeqCst);
                (i, body)
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_answer_when_their_service_changes_and_only_then() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut cfg = AgentConfig::dev("agent-0");
    cfg.server = Some(ServerConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
    ));
    cfg.bootstrap = true;
    let agent = Agent::start(cfg).await.unwrap();
    let a = agent.http_addr;
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        while http(a, "GET", "/v1/status/leader", "").2.len() <= 2 {
            assert!(start.elapsed() < Duration::from_secs(10), "no leader");
            std::thread::sleep(Duration::from_millis(50));
        }
        register(a, "n1", "web", r#"["v1"]"#);
        register(a, "n22", "web", r#"["v1"]"#);
        // From this agent n22 is 10 ms away and n1 30 ms.
        place(a, "agent-0", 0.0);
        place(a, "n1", 30.0);
        place(a, "n22", 10.0);
        let path = "/v1/health/service/web?near=_agent";
        let (_, index, body) = http(a, "GET", path, "");
        assert_eq!(nodes(&body), ["n22", "n1"]);

        // 100 watchers park; writes elsewhere (KV, another service, a
        // check of another service) answer none of them.
        let done = Arc::new(AtomicUsize::new(0));
        let watchers = park(a, path, index, 100, &done);
        std::thread::sleep(Duration::from_millis(500));
        ok(a, "PUT", "/v1/kv/elsewhere", "x");
        register(a, "n333", "db", "[]");
        ok(
            a,
            "PUT",
            "/v1/catalog/register",
            r#"{"Node":"n333","Address":"10.0.0.3","Check":{"Name":"db-alive","Status":"critical","ServiceID":"db"}}"#,
        );
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "watchers of web answered a change to something else"
        );
        let (_, moved, _) = http(a, "GET", path, "");
        assert!(moved > index, "the table index moved ({index} -> {moved})");

        // A change to web answers every watcher, all alike and sorted.
        register(a, "n1", "web", r#"["v2"]"#);
        let answers: Vec<(u64, String)> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
        for (i, body) in &answers {
            assert!(*i > index, "index {i} after {index}");
            assert_eq!(body, &answers[0].1, "watchers got different answers");
        }
        let first = &answers[0].1;
        assert!(first.contains(r#""v2""#), "{first}");
        assert_eq!(nodes(first), ["n22", "n1"], "sorted by near");

        // Removing an instance answers watchers too.
        let now = answers[0].0;
        let done = Arc::new(AtomicUsize::new(0));
        let watchers = park(a, path, now, 5, &done);
        std::thread::sleep(Duration::from_millis(300));
        ok(
            a,
            "PUT",
            "/v1/catalog/deregister",
            r#"{"Node":"n22","ServiceID":"web"}"#,
        );
        for w in watchers {
            let (i, body) = w.join().unwrap();
            assert!(i > now);
            assert_eq!(nodes(&body), ["n1"]);
        }

        // An index this agent never answered with answers at once, and a
        // wait with nothing changing runs out with the same answer.
        let t = Instant::now();
        let (_, _, body) = http(a, "GET", &format!("{path}&index=1&wait=30s"), "");
        assert!(t.elapsed() < Duration::from_secs(20), "index=1 waited");
        assert_eq!(nodes(&body), ["n1"]);
        let (_, now, before) = http(a, "GET", path, "");
        let t = Instant::now();
        let (_, after_i, after) = http(a, "GET", &format!("{path}&index={now}&wait=1s"), "");
        assert!(t.elapsed() >= Duration::from_millis(900), "returned early");
        assert!(after_i >= now);
        assert_eq!(after, before);
        // The node list and checks by state work alike: a service added
        // on a known node answers no watcher of the nodes, a new node does.
        let (_, nodes_at, _) = http(a, "GET", "/v1/catalog/nodes?near=_agent", "");
        let done = Arc::new(AtomicUsize::new(0));
        let node_watchers = park(a, "/v1/catalog/nodes?near=_agent", nodes_at, 3, &done);
        let (_, crit_at, crit) = http(a, "GET", "/v1/health/state/critical", "");
        let crit_watchers = park(a, "/v1/health/state/critical?stale", crit_at, 3, &done);
        std::thread::sleep(Duration::from_millis(300));
        register(a, "n1", "cache", "[]");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(done.load(Ordering::SeqCst), 0, "woken by a new service on a known node");
        register(a, "n4444", "cache", "[]");
        for w in node_watchers {
            assert!(w.join().unwrap().1.contains("n4444"));
        }
        // n4444's registration changed no critical check: those wait on.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(done.load(Ordering::SeqCst), 3, "checks by state woke");
        ok(
            a,
            "PUT",
            "/v1/catalog/register",
            r#"{"Node":"n4444","Address":"10.0.0.4","Check":{"Name":"down","Status":"critical"}}"#,
        );
        for w in crit_watchers {
            let (_, body) = w.join().unwrap();
            assert_ne!(body, crit);
            assert!(body.contains("n4444"), "{body}");
        }

        // A bad wait is refused as before.
        let (st, _, _) = http(a, "GET", &format!("{path}&index={now}&wait=soon"), "");
        assert_eq!(st, 400);
    })
    .await
    .unwrap();
    agent.shutdown().await;
}

#[test]
fn bench_watchers_runs_end_to_end() {
    let out = common::tomo_ok(&[
        "bench",
        "watchers",
        "--watchers",
        "200",
        "--changes",
        "2",
        "--agents",
        "2",
        "--instances",
        "4",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["params"]["instances"], 6, "{v}");
    for k in ["woke_without_change", "bad_answers", "request_errors"] {
        assert_eq!(v[k], 0, "{k}: {v}");
    }
    assert!(
        v["answer_ms"]["p99"].as_f64().is_some_and(|p| p > 0.0),
        "{v}"
    );
    assert!(
        v["bytes_per_watcher"].as_f64().is_some_and(|b| b > 0.0),
        "{v}"
    );
    assert!(v["answer_bytes"].as_u64().is_some_and(|b| b > 100), "{v}");
}
