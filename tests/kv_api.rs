//! Consul's KV API on an agent running a single server (as `-dev` does):
//! values, flags, `cas`, `raw`, `keys` with a separator, `recurse`,
//! Consul's error statuses and texts, `X-Consul-Index` on every answer and
//! blocking queries that return promptly after a change and not before.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tomo::agent::{Agent, AgentConfig};
use tomo::server::ServerConfig;

/// One HTTP/1.1 exchange: (status, X-Consul-Index, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Option<u64>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let index = head
        .lines()
        .find_map(|l| l.strip_prefix("x-consul-index: "))
        .map(|v| v.trim().parse().unwrap());
    (status, index, body.to_string())
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Option<u64>, String) {
    let (m, p, b) = (method.to_string(), path.to_string(), body.to_vec());
    tokio::task::spawn_blocking(move || http(addr, &m, &p, &b))
        .await
        .unwrap()
}

/// `cfg` running a single bootstrapped server with its data in `dir`
/// (what `-dev` does).
fn with_server(mut cfg: AgentConfig, dir: &tempfile::TempDir) -> AgentConfig {
    cfg.server = Some(ServerConfig::new(
        1,
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
    ));
    cfg.bootstrap = true;
    cfg
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_follows_consul() {
    let dir = tempfile::TempDir::new().unwrap();
    let cfg = with_server(AgentConfig::dev("kv-node"), &dir);
    let agent = Agent::start(cfg).await.unwrap();
    let a = agent.http_addr;
    // The single server elects itself.
    let r = agent.registry.clone().unwrap();
    let start = Instant::now();
    while r.leader().await.is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A missing key: 404, empty body, still an index.
    let (st, idx, body) = call(a, "GET", "/v1/kv/web/a", b"").await;
    assert_eq!((st, body.as_str()), (404, ""));
    assert!(idx.is_some_and(|i| i >= 1));

    // Put with flags, read back as Consul's DirEntry.
    let (st, _, body) = call(a, "PUT", "/v1/kv/web/a?flags=7", b"hello").await;
    assert_eq!((st, body.as_str()), (200, "true"));
    let (st, idx, body) = call(a, "GET", "/v1/kv/web/a", b"").await;
    assert_eq!(st, 200);
    let e = &json(&body)[0];
    assert_eq!(e["Key"], "web/a");
    assert_eq!(e["Flags"], 7);
    assert_eq!(e["Value"], "aGVsbG8=");
    assert_eq!(e["LockIndex"], 0);
    assert!(e.get("Session").is_none());
    let modify = e["ModifyIndex"].as_u64().unwrap();
    assert_eq!(idx, Some(modify));

    // cas: 0 only creates; the right index writes.
    let (_, _, body) = call(a, "PUT", "/v1/kv/web/a?cas=0", b"x").await;
    assert_eq!(body, "false");
    let (_, _, body) = call(a, "PUT", &format!("/v1/kv/web/a?cas={modify}"), b"hello2").await;
    assert_eq!(body, "true");
    let (st, _, body) = call(a, "GET", "/v1/kv/web/a?raw", b"").await;
    assert_eq!((st, body.as_str()), (200, "hello2"));

    // An empty value is null.
    call(a, "PUT", "/v1/kv/web/sub/b", b"").await;
    call(a, "PUT", "/v1/kv/webby", b"1").await;
    let (_, _, body) = call(a, "GET", "/v1/kv/web/sub/b", b"").await;
    assert!(json(&body)[0]["Value"].is_null(), "{body}");

    // keys with a separator; recurse.
    let (_, _, body) = call(a, "GET", "/v1/kv/web/?keys&separator=/", b"").await;
    assert_eq!(json(&body), serde_json::json!(["web/a", "web/sub/"]));
    let (_, _, body) = call(a, "GET", "/v1/kv/?keys&separator=/", b"").await;
    assert_eq!(json(&body), serde_json::json!(["web/", "webby"]));
    let (_, _, body) = call(a, "GET", "/v1/kv/web?recurse", b"").await;
    let keys: Vec<String> = json(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["web/a", "web/sub/b", "webby"]);

    // Errors: Consul's statuses and texts, nothing written.
    let before = call(a, "GET", "/v1/kv/web?recurse", b"").await.2;
    for (method, path, body, status, text) in [
        (
            "PUT",
            "/v1/kv/web/a?cas=1&acquire=x",
            &b"v"[..],
            400,
            "Conflicting flags",
        ),
        (
            "PUT",
            "/v1/kv/web/a?acquire=nope",
            b"v",
            500,
            "invalid session \"nope\"",
        ),
        ("GET", "/v1/kv/", b"", 400, "Missing key name"),
        (
            "GET",
            "/v1/kv/web/a?index=1&wait=soon",
            b"",
            400,
            "Invalid wait time",
        ),
        (
            "DELETE",
            "/v1/kv/web?recurse&cas=3",
            b"",
            400,
            "Conflicting flags",
        ),
    ] {
        let (st, _, got) = call(a, method, path, body).await;
        assert_eq!((st, got.as_str()), (status, text), "{method} {path}");
    }
    let big = vec![b'x'; 512 * 1024 + 1];
    let (st, _, _) = call(a, "PUT", "/v1/kv/big", &big).await;
    assert_eq!(st, 413);
    assert_eq!(call(a, "GET", "/v1/kv/web?recurse", b"").await.2, before);

    // Blocking: no change → returns after the wait with the same index.
    let (_, idx, _) = call(a, "GET", "/v1/kv/web/a", b"").await;
    let idx = idx.unwrap();
    let t = Instant::now();
    let (st, again, _) = call(
        a,
        "GET",
        &format!("/v1/kv/web/a?index={idx}&wait=300ms"),
        b"",
    )
    .await;
    let waited = t.elapsed();
    assert_eq!((st, again), (200, Some(idx)));
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // A change wakes it promptly, with the new index.
    let blocked = tokio::spawn(async move {
        let t = Instant::now();
        let r = call(a, "GET", &format!("/v1/kv/web/a?index={idx}&wait=20s"), b"").await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!blocked.is_finished(), "returned before any change");
    call(a, "PUT", "/v1/kv/web/a", b"changed").await;
    let ((st, new_idx, body), took) = blocked.await.unwrap();
    assert_eq!(st, 200);
    assert!(new_idx.unwrap() > idx);
    assert_eq!(json(&body)[0]["Value"], "Y2hhbmdlZA==");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // ?consistent reads through the leader's quorum check; with ?stale it
    // is a conflict.
    let (st, _, body) = call(a, "GET", "/v1/kv/web/a?consistent", b"").await;
    assert_eq!(st, 200, "{body}");
    let (st, _, body) = call(a, "GET", "/v1/kv/web/a?consistent&stale", b"").await;
    assert_eq!(
        (st, body.as_str()),
        (
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics."
        )
    );
    // Raft status.
    let rpc = agent.registry.as_ref().unwrap().rpc_addr.to_string();
    let (_, _, body) = call(a, "GET", "/v1/status/leader", b"").await;
    assert_eq!(json(&body), serde_json::json!(rpc));
    let (_, _, body) = call(a, "GET", "/v1/status/peers", b"").await;
    assert_eq!(json(&body), serde_json::json!([rpc]));
    let (_, _, body) = call(a, "GET", "/v1/operator/raft/configuration", b"").await;
    let servers = &json(&body)["Servers"];
    assert_eq!(servers[0]["Address"], rpc.as_str());
    assert_eq!(servers[0]["Node"], "kv-node", "the node name, as Consul");
    assert_eq!(
        (
            servers[0]["Leader"].as_bool(),
            servers[0]["Voter"].as_bool()
        ),
        (Some(true), Some(true))
    );

    // Delete a prefix: true, then 404 with an index that went up.
    let (_, _, body) = call(a, "DELETE", "/v1/kv/web/?recurse", b"").await;
    assert_eq!(body, "true");
    let (st, after, _) = call(a, "GET", "/v1/kv/web/?recurse", b"").await;
    assert_eq!(st, 404);
    assert!(after.unwrap() > new_idx.unwrap());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_locks_follow_consul() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut cfg = with_server(AgentConfig::dev("lock-node"), &dir);
    // Short TTLs for the test (Consul's `session_ttl_min`).
    cfg.session_ttl_min = Duration::from_secs(1);
    let agent = Agent::start(cfg).await.unwrap();
    let a = agent.http_addr;
    // The agent registers its node; a session names it by default.
    let start = Instant::now();
    let sid = loop {
        let (st, _, body) = call(a, "PUT", "/v1/session/create", b"").await;
        if st == 200 {
            break json(&body)["ID"].as_str().unwrap().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{st} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Patroni's session: lowercase keys, TTL, delete, a 1 ms lock-delay.
    let (st, _, body) = call(
        a,
        "PUT",
        "/v1/session/create",
        br#"{"name":"patroni","ttl":"1s","behavior":"delete","lockdelay":"0.001s"}"#,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let leader_sid = json(&body)["ID"].as_str().unwrap().to_string();
    let (_, _, body) = call(a, "GET", &format!("/v1/session/info/{leader_sid}"), b"").await;
    let info = &json(&body)[0];
    assert_eq!(info["Name"], "patroni");
    assert_eq!(info["Node"], "lock-node");
    assert_eq!(info["Behavior"], "delete");
    assert_eq!(info["TTL"], "1s");
    assert_eq!(info["LockDelay"], 1_000_000);
    assert_eq!(info["NodeChecks"], serde_json::json!(["serfHealth"]));
    let (_, _, body) = call(a, "GET", "/v1/session/list", b"").await;
    assert_eq!(json(&body).as_array().unwrap().len(), 2);
    let (_, _, body) = call(a, "GET", "/v1/session/node/lock-node", b"").await;
    assert_eq!(json(&body).as_array().unwrap().len(), 2);

    // Locks: one holder at a time.
    let acquire = |sid: &str| format!("/v1/kv/service/leader?acquire={sid}");
    assert_eq!(call(a, "PUT", &acquire(&leader_sid), b"me").await.2, "true");
    assert_eq!(call(a, "PUT", &acquire(&sid), b"you").await.2, "false");
    let (_, _, body) = call(a, "GET", "/v1/kv/service/leader", b"").await;
    assert_eq!(json(&body)[0]["Session"], leader_sid.as_str());
    assert_eq!(json(&body)[0]["LockIndex"], 1);

    // Errors in Consul's words.
    for (path, body, status, text) in [
        (
            "/v1/session/create",
            &br#"{"TTL":"5ms"}"#[..],
            500,
            "Invalid Session TTL '5000000', must be between [1s=24h0m0s]",
        ),
        (
            "/v1/session/create",
            br#"{"Behavior":"explode"}"#,
            500,
            "Invalid Behavior setting 'explode'",
        ),
        (
            "/v1/session/create",
            br#"{"Node":"ghost"}"#,
            500,
            "Missing node registration",
        ),
        ("/v1/session/create", b"{nope", 400, ""),
        (
            "/v1/session/renew/no-such-id",
            b"",
            404,
            "Session id 'no-such-id' not found",
        ),
    ] {
        let (st, _, got) = call(a, "PUT", path, body).await;
        assert_eq!(st, status, "{path} {got}");
        assert!(got.starts_with(text), "{path}: {got}");
    }

    // Renewing keeps a session alive past its TTL × 2…
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (st, _, body) = call(a, "PUT", &format!("/v1/session/renew/{leader_sid}"), b"").await;
        assert_eq!(st, 200, "{body}");
        assert_eq!(json(&body)[0]["ID"], leader_sid.as_str());
    }
    assert_eq!(call(a, "GET", "/v1/kv/service/leader", b"").await.0, 200);
    // …and without renewals it expires: behavior=delete deletes the key.
    let start = Instant::now();
    loop {
        let (st, _, _) = call(a, "GET", "/v1/kv/service/leader", b"").await;
        if st == 404 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "the session never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    let (_, _, body) = call(a, "GET", &format!("/v1/session/info/{leader_sid}"), b"").await;
    assert_eq!(json(&body), serde_json::json!([]));
    // The other session takes the lock once free; destroying releases it.
    assert_eq!(call(a, "PUT", &acquire(&sid), b"you").await.2, "true");
    assert_eq!(
        call(a, "PUT", &format!("/v1/session/destroy/{sid}"), b"")
            .await
            .2,
        "true"
    );
    let (_, _, body) = call(a, "GET", "/v1/kv/service/leader", b"").await;
    assert!(json(&body)[0].get("Session").is_none(), "{body}");
    agent.shutdown().await;
}

/// `PUT /v1/coordinate/update` for `node` at `ms` milliseconds along x.
async fn place(a: SocketAddr, node: &str, ms: f64) {
    let body = format!(
        r#"{{"Node":"{node}","Coord":{{"Vec":[{},0,0,0,0,0,0,0],"Error":0.2,"Adjustment":0,"Height":0.00001}}}}"#,
        ms / 1000.0
    );
    let (st, _, got) = call(a, "PUT", "/v1/coordinate/update", body.as_bytes()).await;
    assert_eq!(st, 200, "{got}");
}

fn names(body: &str, node_key: &[&str]) -> Vec<String> {
    json(body)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut v = e;
            for k in node_key {
                v = &v[*k];
            }
            v.as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_and_health_sort_by_rtt_with_near() {
    let dir = tempfile::TempDir::new().unwrap();
    let cfg = with_server(AgentConfig::dev("agent-0"), &dir);
    let agent = Agent::start(cfg).await.unwrap();
    let a = agent.http_addr;
    // Four instances of web; n3's is failing.
    let start = Instant::now();
    for (node, tags, status) in [
        ("n1", r#"["v1","primary"]"#, "passing"),
        ("n2", r#"["v1"]"#, "passing"),
        ("n3", r#"["v2"]"#, "critical"),
        ("n4", r#"["v1"]"#, "warning"),
    ] {
        let body = format!(
            r#"{{"Node":"{node}","Address":"10.0.0.{}","Service":{{"Service":"web","Tags":{tags},"Port":80}},"Check":{{"Name":"http","Status":"{status}","ServiceID":"web"}}}}"#,
            &node[1..]
        );
        loop {
            let (st, _, got) = call(a, "PUT", "/v1/catalog/register", body.as_bytes()).await;
            if st == 200 {
                assert_eq!(got, "true");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{st} {got}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Coordinates: the client node at the origin; n2 10 ms away, n3 20,
    // n1 30; n4 has none.
    place(a, "client", 0.0).await;
    place(a, "n1", 30.0).await;
    place(a, "n2", 10.0).await;
    place(a, "n3", 20.0).await;

    let (_, _, body) = call(a, "GET", "/v1/catalog/service/web", b"").await;
    assert_eq!(names(&body, &["Node"]), ["n1", "n2", "n3", "n4"]);
    let (st, idx, body) = call(a, "GET", "/v1/catalog/service/web?near=client", b"").await;
    assert_eq!(st, 200);
    assert_eq!(
        names(&body, &["Node"]),
        ["n2", "n3", "n1", "n4"],
        "nearest first, no coordinate last"
    );
    let e = &json(&body)[0];
    assert_eq!(
        (e["ServiceName"].as_str(), e["ServicePort"].as_u64()),
        (Some("web"), Some(80))
    );
    assert_eq!(e["ServiceTags"], serde_json::json!(["v1"]));
    // tag filters (all must match); near never filters.
    let (_, _, body) = call(a, "GET", "/v1/catalog/service/web?tag=v1&tag=primary", b"").await;
    assert_eq!(names(&body, &["Node"]), ["n1"]);
    let (_, _, body) = call(a, "GET", "/v1/catalog/service/web?near=nobody", b"").await;
    assert_eq!(
        names(&body, &["Node"]),
        ["n1", "n2", "n3", "n4"],
        "unknown source: no sort"
    );
    // health: the same order; ?passing drops warning and critical.
    let (_, _, body) = call(a, "GET", "/v1/health/service/web?near=client", b"").await;
    assert_eq!(names(&body, &["Node", "Node"]), ["n2", "n3", "n1", "n4"]);
    let checks = &json(&body)[1]["Checks"];
    assert_eq!(checks[0]["Status"], "critical");
    assert_eq!(checks[0]["ServiceName"], "web");
    let (_, _, body) = call(
        a,
        "GET",
        "/v1/health/service/web?near=client&passing=1",
        b"",
    )
    .await;
    assert_eq!(names(&body, &["Node", "Node"]), ["n2", "n1"]);
    let (_, _, body) = call(a, "GET", "/v1/health/state/critical", b"").await;
    assert_eq!(names(&body, &["Node"]), ["n3"]);
    let (_, _, body) = call(a, "GET", "/v1/catalog/services", b"").await;
    assert_eq!(
        json(&body)["web"],
        serde_json::json!(["v1", "primary", "v2"])
    );
    let (_, _, body) = call(a, "GET", "/v1/catalog/node/n1", b"").await;
    assert_eq!(json(&body)["Services"]["web"]["Port"], 80);
    let (st, _, body) = call(a, "GET", "/v1/catalog/node/ghost", b"").await;
    assert_eq!((st, body.as_str()), (200, "null"));
    // `_agent` is this agent's node.
    place(a, "agent-0", 25.0).await;
    let (_, _, body) = call(a, "GET", "/v1/catalog/service/web?near=_agent", b"").await;
    assert_eq!(names(&body, &["Node"]), ["n1", "n3", "n2", "n4"]);

    // A prepared query with `Near: "_ip"`: the node whose address is the
    // caller's (the first X-Forwarded-For entry, else the connection's
    // peer) is the source; critical instances are left out.
    let (st, _, got) = call(
        a,
        "POST",
        "/v1/query",
        br#"{"Name":"webq","Service":{"Service":"web","Near":"_ip"}}"#,
    )
    .await;
    assert_eq!(st, 200, "{got}");
    let execute = |xff: Option<&'static str>| async move {
        let body = tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(a).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let extra = xff
                .map(|ip| format!("X-Forwarded-For: {ip}, 192.0.2.9\r\n"))
                .unwrap_or_default();
            write!(
                s,
                "GET /v1/query/webq/execute HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out.split_once("\r\n\r\n").unwrap().1.to_string()
        })
        .await
        .unwrap();
        json(&body)["Nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["Node"]["Node"].as_str().unwrap().to_string())
            .collect::<Vec<String>>()
    };
    for _ in 0..5 {
        // From n1 (10.0.0.1, at 30 ms): n1, n2 (20 ms), n4 (no coordinate).
        assert_eq!(execute(Some("10.0.0.1")).await, ["n1", "n2", "n4"]);
        // From n2 (at 10 ms): n2, n1.
        assert_eq!(execute(Some("10.0.0.2")).await, ["n2", "n1", "n4"]);
        // No header: the peer, 127.0.0.1, is agent-0's address (at 25 ms).
        assert_eq!(execute(None).await, ["n1", "n2", "n4"]);
    }

    // A blocking health read (with the index health gave) wakes on a
    // deregistration.
    assert!(idx.is_some());
    let idx = call(a, "GET", "/v1/health/service/web", b"")
        .await
        .1
        .unwrap();
    let blocked = tokio::spawn(async move {
        call(
            a,
            "GET",
            &format!("/v1/health/service/web?index={idx}&wait=20s"),
            b"",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished());
    let (_, _, got) = call(
        a,
        "PUT",
        "/v1/catalog/deregister",
        br#"{"Node":"n2","ServiceID":"web"}"#,
    )
    .await;
    assert_eq!(got, "true");
    let (st, new_idx, body) = blocked.await.unwrap();
    assert_eq!(st, 200);
    assert!(new_idx.unwrap() > idx);
    assert_eq!(names(&body, &["Node", "Node"]), ["n1", "n3", "n4"]);
    // Bad input: Consul's texts, nothing registered.
    let (st, _, got) = call(
        a,
        "PUT",
        "/v1/catalog/register",
        br#"{"Address":"1.2.3.4"}"#,
    )
    .await;
    assert_eq!((st, got.as_str()), (400, "Must provide node"));
    let (st, _, _) = call(a, "PUT", "/v1/catalog/register", b"{oops").await;
    assert_eq!(st, 400);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_services_run_ttl_and_tcp_checks() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut cfg = with_server(AgentConfig::dev("svc-node"), &dir);
    // Consul's floor is a minute; a second keeps the test short.
    cfg.deregister_critical_min = Duration::from_secs(1);
    let agent = Agent::start(cfg).await.unwrap();
    let a = agent.http_addr;
    // Something for the TCP check to reach.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    let body = format!(
        r#"{{"name":"pg","id":"pg-1","port":5432,"tags":["primary"],
            "checks":[{{"ttl":"2s"}},{{"tcp":"{target}","interval":"500ms","timeout":"1s"}}]}}"#
    );
    let start = Instant::now();
    loop {
        let (st, _, got) = call(a, "PUT", "/v1/agent/service/register", body.as_bytes()).await;
        if st == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{st} {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, _, got) = call(a, "GET", "/v1/agent/services", b"").await;
    assert_eq!(json(&got)["pg-1"]["Port"], 5432);
    let status = |got: &str, id: &str| json(got)[id]["Status"].as_str().unwrap_or("").to_string();
    // TTL checks start critical; the TCP one passes once run.
    let (_, _, got) = call(a, "GET", "/v1/agent/checks", b"").await;
    assert_eq!(status(&got, "service:pg-1:1"), "critical", "{got}");
    let start = Instant::now();
    loop {
        let (_, _, got) = call(a, "GET", "/v1/agent/checks", b"").await;
        if status(&got, "service:pg-1:2") == "passing" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // python-consul sends GET to pass a check.
    let (st, _, _) = call(a, "GET", "/v1/agent/check/pass/service:pg-1:1?note=ok", b"").await;
    assert_eq!(st, 200);
    let (_, _, got) = call(a, "GET", "/v1/health/service/pg?passing", b"").await;
    assert_eq!(json(&got).as_array().unwrap().len(), 1, "{got}");
    // Not renewed within its TTL: critical, and `passing` filters it out.
    let start = Instant::now();
    loop {
        let (_, _, got) = call(a, "GET", "/v1/agent/checks", b"").await;
        if status(&got, "service:pg-1:1") == "critical" {
            assert_eq!(json(&got)["service:pg-1:1"]["Output"], "TTL expired");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(6), "{got}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "expired too early"
    );
    let (_, _, got) = call(a, "GET", "/v1/health/service/pg?passing", b"").await;
    assert_eq!(json(&got), serde_json::json!([]));
    // Unknown check: 404; update with a status.
    let (st, _, _) = call(a, "PUT", "/v1/agent/check/pass/nope", b"").await;
    assert_eq!(st, 404);
    let (st, _, _) = call(
        a,
        "PUT",
        "/v1/agent/check/update/service:pg-1:1",
        br#"{"Status":"warning","Output":"slow"}"#,
    )
    .await;
    assert_eq!(st, 200);
    let (_, _, got) = call(a, "GET", "/v1/agent/checks", b"").await;
    assert_eq!(status(&got, "service:pg-1:1"), "warning");
    // Deregistering (GET, as python-consul does) takes the checks along.
    let (st, _, _) = call(a, "GET", "/v1/agent/service/deregister/pg-1", b"").await;
    assert_eq!(st, 200);
    let (_, _, got) = call(a, "GET", "/v1/agent/services", b"").await;
    assert_eq!(json(&got), serde_json::json!({}));
    let (_, _, got) = call(a, "GET", "/v1/agent/checks", b"").await;
    assert!(json(&got).get("service:pg-1:1").is_none(), "{got}");

    // DeregisterCriticalServiceAfter: a service whose TTL check stays
    // critical that long is deregistered, from the agent and the catalog.
    let body = r#"{"Name":"cache","ID":"cache-1","Check":{"TTL":"1s","DeregisterCriticalServiceAfter":"1s"}}"#;
    let (st, _, _) = call(a, "PUT", "/v1/agent/service/register", body.as_bytes()).await;
    assert_eq!(st, 200);
    let (_, _, got) = call(a, "GET", "/v1/catalog/service/cache", b"").await;
    assert_eq!(json(&got).as_array().unwrap().len(), 1, "{got}");
    let start = Instant::now();
    loop {
        let (_, _, got) = call(a, "GET", "/v1/catalog/service/cache", b"").await;
        if json(&got) == serde_json::json!([]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not reaped: {got}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "reaped too early"
    );
    let (_, _, got) = call(a, "GET", "/v1/agent/services", b"").await;
    assert!(json(&got).get("cache-1").is_none(), "{got}");
    // A bad duration is Consul's decode error, and registers nothing.
    let body = r#"{"Name":"bad","Check":{"TTL":"1s","DeregisterCriticalServiceAfter":"soon"}}"#;
    let (st, _, got) = call(a, "PUT", "/v1/agent/service/register", body.as_bytes()).await;
    assert_eq!(st, 400, "{got}");
    assert!(got.contains("Request decode failed"), "{got}");

    // node-meta filters catalog and health reads by node metadata.
    for (node, rack) in [("m1", "r1"), ("m2", "r2")] {
        let body = format!(
            r#"{{"Node":"{node}","ID":"40e4a748-2192-161a-0510-9bf59fe950b5","Address":"10.0.0.1","TaggedAddresses":{{"wan":"198.18.0.1"}},"NodeMeta":{{"rack":"{rack}"}},"Service":{{"Service":"db","Port":1}}}}"#
        );
        let (st, _, got) = call(a, "PUT", "/v1/catalog/register", body.as_bytes()).await;
        assert_eq!(st, 200, "{got}");
    }
    let nodes_of = |got: &str, key: &str| -> Vec<String> {
        json(got)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e.pointer(key)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    };
    // The node's ID and tagged addresses are kept (lan defaults to the
    // address).
    let (_, _, got) = call(a, "GET", "/v1/catalog/node/m1", b"").await;
    let n = &json(&got)["Node"];
    assert_eq!(n["ID"], "40e4a748-2192-161a-0510-9bf59fe950b5", "{got}");
    assert_eq!(n["TaggedAddresses"]["wan"], "198.18.0.1", "{got}");
    assert_eq!(n["TaggedAddresses"]["lan"], "10.0.0.1", "{got}");
    let (_, _, got) = call(a, "GET", "/v1/catalog/nodes?node-meta=rack:r2", b"").await;
    assert_eq!(nodes_of(&got, "/Node"), ["m2"]);
    let (_, _, got) = call(a, "GET", "/v1/catalog/service/db?node-meta=rack:r1", b"").await;
    assert_eq!(nodes_of(&got, "/Node"), ["m1"]);
    let (_, _, got) = call(a, "GET", "/v1/health/service/db?node-meta=rack:r1", b"").await;
    assert_eq!(nodes_of(&got, "/Node/Node"), ["m1"]);
    let (_, _, got) = call(a, "GET", "/v1/catalog/nodes?node-meta=rack:r3", b"").await;
    assert_eq!(json(&got), serde_json::json!([]));
    // Another datacenter: no path to it (not this one's data); its own
    // name is fine.
    let (st, _, got) = call(a, "GET", "/v1/catalog/nodes?dc=dc9", b"").await;
    assert_eq!((st, got.as_str()), (500, "No path to datacenter"));
    let (st, _, _) = call(a, "PUT", "/v1/kv/x?dc=dc9", b"v").await;
    assert_eq!(st, 500);
    let (st, _, _) = call(a, "GET", "/v1/kv/x", b"").await;
    assert_eq!(st, 404, "the PUT wrote nothing");
    let (st, _, _) = call(a, "GET", "/v1/catalog/nodes?dc=dc1", b"").await;
    assert_eq!(st, 200);
    // A lone agent has its own coordinate (it never publishes one: it has
    // nobody to probe): `near=_agent` puts it first, and it is listed.
    let (_, _, got) = call(a, "GET", "/v1/catalog/nodes?near=_agent", b"").await;
    assert_eq!(nodes_of(&got, "/Node"), ["svc-node", "m1", "m2"]);
    let (_, index, got) = call(a, "GET", "/v1/coordinate/nodes", b"").await;
    assert_eq!(nodes_of(&got, "/Node"), ["svc-node"]);
    // The coordinate endpoints block too: a lone agent's table does not
    // change by itself, an update wakes the query.
    let index = index.unwrap();
    let t = Instant::now();
    let (_, same, _) = call(
        a,
        "GET",
        &format!("/v1/coordinate/nodes?index={index}&wait=1s"),
        b"",
    )
    .await;
    assert!(t.elapsed() >= Duration::from_millis(900), "returned early");
    assert_eq!(same, Some(index));
    let path = format!("/v1/coordinate/nodes?index={index}&wait=20s");
    let waiter = tokio::spawn(async move { call(a, "GET", &path, b"").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "returned before a change");
    let update = br#"{"Node":"m1","Coord":{"Vec":[0.001,0,0,0,0,0,0,0],"Error":0.5,"Adjustment":0,"Height":0.0001}}"#;
    let (st, _, got) = call(a, "PUT", "/v1/coordinate/update", update).await;
    assert_eq!(st, 200, "{got}");
    let t = Instant::now();
    let (_, after, got) = waiter.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(after.unwrap() > index);
    assert_eq!(nodes_of(&got, "/Node"), ["m1", "svc-node"]);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_member_loses_its_sessions_and_locks() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut cfg = with_server(AgentConfig::dev("server-a"), &dir);
    cfg.probe_interval = Duration::from_millis(100);
    let server = Agent::start(cfg).await.unwrap();
    let a = server.http_addr;
    let mut cfg = AgentConfig::dev("client-b");
    cfg.probe_interval = Duration::from_millis(100);
    cfg.join = vec![server.gossip_addr];
    let client = Agent::start(cfg).await.unwrap();
    // client-b's node with its serfHealth, a session and a lock.
    let reg = br#"{"Node":"client-b","Address":"127.0.0.1","Check":{"CheckID":"serfHealth","Name":"Serf Health Status","Status":"passing"}}"#;
    let start = Instant::now();
    let sid = loop {
        let (st, _, _) = call(a, "PUT", "/v1/catalog/register", reg).await;
        let (cs, _, body) = call(a, "PUT", "/v1/session/create", br#"{"Node":"client-b"}"#).await;
        if st == 200 && cs == 200 {
            break json(&body)["ID"].as_str().unwrap().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{cs} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, _, got) = call(a, "PUT", &format!("/v1/kv/locks/db?acquire={sid}"), b"b").await;
    assert_eq!(got, "true");
    // While client-b is alive, its check stays passing and the lock held.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, _, body) = call(a, "GET", "/v1/kv/locks/db", b"").await;
    assert_eq!(json(&body)[0]["Session"], sid.as_str(), "{body}");
    // client-b dies: gossip declares it down, serfHealth goes critical and
    // the session and its lock go with it.
    client.abort();
    let start = Instant::now();
    loop {
        let (_, _, body) = call(a, "GET", &format!("/v1/session/info/{sid}"), b"").await;
        if json(&body) == serde_json::json!([]) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "session survived its node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, _, body) = call(a, "GET", "/v1/health/node/client-b", b"").await;
    assert_eq!(json(&body)[0]["Status"], "critical", "{body}");
    let (_, _, body) = call(a, "GET", "/v1/kv/locks/db", b"").await;
    assert!(json(&body)[0].get("Session").is_none(), "{body}");
    server.shutdown().await;
}

/// A request as a browser sends it from a page on another site.
fn from_page(addr: SocketAddr, method: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nSec-Fetch-Site: cross-site\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    String::from_utf8_lossy(&out)[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_from_pages_on_other_sites_are_refused() {
    let dir = tempfile::TempDir::new().unwrap();
    let agent = Agent::start(with_server(AgentConfig::dev("csrf-node"), &dir))
        .await
        .unwrap();
    let a = agent.http_addr;
    tokio::task::spawn_blocking(move || {
        // Writes (a GET that joins, a PUT, a POST) from a page: 403, and
        // nothing written.
        assert_eq!(from_page(a, "GET", "/v1/agent/join/127.0.0.1:1"), 403);
        assert_eq!(from_page(a, "PUT", "/v1/kv/csrf"), 403);
        assert_eq!(from_page(a, "POST", "/v1/query"), 403);
        assert_eq!(from_page(a, "GET", "/v1/agent/service/deregister/x"), 403);
        // Reads from a page pass (a browser keeps the answer from the page
        // anyway), and the same write from a client without the header
        // does happen.
        assert_eq!(from_page(a, "GET", "/v1/agent/self"), 200);
        let start = Instant::now();
        loop {
            let (st, _, _) = http(a, "PUT", "/v1/kv/csrf", b"v");
            if st == 200 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no leader");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(http(a, "GET", "/v1/kv/csrf?raw", b"").2, "v");
    })
    .await
    .unwrap();
    agent.shutdown().await;
}
