//! The real `rs-consul` client (0.15, unchanged) against a real
//! `tomo agent -dev`: KV reads, writes, `cas`, deletes and blocking watches;
//! sessions and locks (`get_lock`, release on drop, TTL expiry with both
//! behaviors); catalog registration, listing and deregistration; health
//! queries with `passing`, blocking on `index`, and `near` sorting by
//! coordinates.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rs_consul::{
    Config, Consul, ConsulError, CreateOrUpdateKeyRequest, DeleteKeyRequest,
    DeregisterEntityPayload, GetNodesRequest, GetServiceNodesRequest, LockExpirationBehavior,
    LockRequest, LockWatchRequest, QueryOptions, ReadKeyRequest, ReadKeyResponse,
    RegisterEntityCheck, RegisterEntityPayload, RegisterEntityService, ResponseMeta, ServiceNode,
    types::ConsistencyMode,
};

mod common;
use common::{free_tcp, free_udp, http_body, json};

/// A `tomo agent -dev` child process, killed on drop.
struct Agent {
    child: Child,
    port: u16,
    node: String,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts `tomo agent -dev -node node` and waits until it has elected
    /// itself and its node is in the catalog.
    fn start(node: &str) -> Agent {
        let dir = tempfile::TempDir::new().unwrap();
        let port = free_tcp();
        let child = Command::new(env!("CARGO_BIN_EXE_tomo"))
            .args([
                "agent",
                "-dev",
                "-node",
                node,
                "-http-port",
                &port.to_string(),
                "-serf-lan-port",
                &free_udp().to_string(),
                "-dns-port",
                "0",
                "-data-dir",
                dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tomo agent");
        let mut agent = Agent {
            child,
            port,
            node: node.to_string(),
            _dir: dir,
        };
        let start = Instant::now();
        loop {
            let leader = json(port, "/v1/status/leader")
                .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()));
            let listed = json(port, "/v1/catalog/nodes").is_some_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.iter().any(|n| n["Node"] == node))
            });
            if leader && listed {
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("tomo agent exited early: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent {node} not ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An rs-consul client for this agent.
    fn client(&self) -> Consul {
        Consul::new(Config {
            address: self.address(),
            token: None,
            ..Default::default()
        })
    }

    /// Gives `node` a LAN coordinate through `PUT /v1/coordinate/update`.
    fn set_coordinate(&self, node: &str, x: f64) {
        let body = format!(
            r#"{{"Node":"{node}","Coord":{{"Vec":[{x},0,0,0,0,0,0,0],"Error":1.5,"Adjustment":0,"Height":0.00001}}}}"#
        );
        let (status, text) = http_body("PUT", self.port, "/v1/coordinate/update", &body)
            .expect("coordinate update answered");
        assert_eq!(status, 200, "coordinate update for {node}: {text}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one key (no recursion intended; see `kv_round_trips`).
async fn read(
    consul: &Consul,
    key: &str,
) -> Result<ResponseMeta<Vec<ReadKeyResponse>>, ConsulError> {
    consul
        .read_key(ReadKeyRequest {
            key,
            ..Default::default()
        })
        .await
}

/// The single entry stored at `key`.
async fn entry(consul: &Consul, key: &str) -> (ReadKeyResponse, u64) {
    let meta = read(consul, key)
        .await
        .unwrap_or_else(|e| panic!("read {key}: {e}"));
    assert_eq!(meta.response.len(), 1, "{key}: {:?}", meta.response);
    (meta.response.into_iter().next().unwrap(), meta.index)
}

async fn put(consul: &Consul, req: CreateOrUpdateKeyRequest<'_>, value: &str) -> bool {
    let key = req.key.to_string();
    consul
        .create_or_update_key(req, value.as_bytes().to_vec())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
        .0
}

fn is_not_found(r: &Result<ResponseMeta<Vec<ReadKeyResponse>>, ConsulError>) -> bool {
    matches!(r, Err(ConsulError::UnexpectedResponseCode(s, Some(body))) if s.as_u16() == 404 && body.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_round_trips() {
    let agent = Agent::start("kv-node");
    let consul = agent.client();

    // A missing key: rs-consul's error for Consul's empty 404.
    let missing = read(&consul, "app/missing").await;
    assert!(is_not_found(&missing), "{missing:?}");

    // Put with flags, read back.
    let created = put(
        &consul,
        CreateOrUpdateKeyRequest {
            key: "app/config",
            flags: 42,
            ..Default::default()
        },
        "hello",
    )
    .await;
    assert!(created);
    let (e, index) = entry(&consul, "app/config").await;
    assert_eq!(e.key, "app/config");
    assert_eq!(e.value.as_deref(), Some("hello"));
    assert_eq!(e.flags, 42);
    assert_eq!(e.lock_index, 0);
    assert_eq!(e.session, None);
    assert!(e.create_index > 0);
    assert_eq!(e.create_index, e.modify_index);
    assert_eq!(index, e.modify_index as u64);
    let m1 = e.modify_index;

    // A plain overwrite moves ModifyIndex on and keeps CreateIndex.
    assert!(
        put(
            &consul,
            CreateOrUpdateKeyRequest {
                key: "app/config",
                ..Default::default()
            },
            "v2",
        )
        .await
    );
    let (e, _) = entry(&consul, "app/config").await;
    assert_eq!(e.value.as_deref(), Some("v2"));
    assert_eq!(e.flags, 0);
    let m2 = e.modify_index;
    assert!(m2 > m1);
    assert_eq!(e.create_index, m1);

    // CAS with a stale index: refused, value unchanged.
    let cas = |i: i64| CreateOrUpdateKeyRequest {
        key: "app/config",
        check_and_set: Some(i),
        ..Default::default()
    };
    assert!(!put(&consul, cas(m1), "stale").await);
    let (e, _) = entry(&consul, "app/config").await;
    assert_eq!(e.value.as_deref(), Some("v2"));
    assert_eq!(e.modify_index, m2);
    // cas=0 only creates.
    assert!(!put(&consul, cas(0), "create-only").await);
    // CAS with the current ModifyIndex: written.
    assert!(put(&consul, cas(m2), "v3").await);
    let (e, _) = entry(&consul, "app/config").await;
    assert_eq!(e.value.as_deref(), Some("v3"));
    assert!(e.modify_index > m2);
    assert!(
        put(
            &consul,
            CreateOrUpdateKeyRequest {
                key: "app/fresh",
                check_and_set: Some(0),
                ..Default::default()
            },
            "new",
        )
        .await
    );
    assert_eq!(
        entry(&consul, "app/fresh").await.0.value.as_deref(),
        Some("new")
    );

    // An empty value reads back as no value.
    assert!(
        put(
            &consul,
            CreateOrUpdateKeyRequest {
                key: "app/empty",
                ..Default::default()
            },
            "",
        )
        .await
    );
    assert_eq!(entry(&consul, "app/empty").await.0.value, None);

    // The blocking (ureq) put.
    let sync_client = agent.client();
    let ok = tokio::task::spawn_blocking(move || {
        sync_client.create_or_update_key_sync(
            CreateOrUpdateKeyRequest {
                key: "app/sync",
                flags: 7,
                ..Default::default()
            },
            b"from-ureq".to_vec(),
        )
    })
    .await
    .unwrap()
    .expect("sync put");
    assert!(ok);
    let (e, _) = entry(&consul, "app/sync").await;
    assert_eq!((e.value.as_deref(), e.flags), (Some("from-ureq"), 7));

    // Recursive reads, in key order, and the consistency modes.
    for (k, v) in [("app/list/b", "2"), ("app/list/a", "1")] {
        assert!(
            put(
                &consul,
                CreateOrUpdateKeyRequest {
                    key: k,
                    ..Default::default()
                },
                v,
            )
            .await
        );
    }
    for consistency in [
        ConsistencyMode::Default,
        ConsistencyMode::Consistent,
        ConsistencyMode::Stale,
    ] {
        let list = consul
            .read_key(ReadKeyRequest {
                key: "app/list/",
                recurse: true,
                consistency: consistency.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{consistency:?}: {e}"))
            .response;
        let got: Vec<(&str, Option<&str>)> = list
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_deref()))
            .collect();
        assert_eq!(
            got,
            [("app/list/a", Some("1")), ("app/list/b", Some("2"))],
            "{consistency:?}"
        );
    }
    // rs-consul always sends `recurse=<bool>` and Consul looks only at the
    // parameter's presence, so even `recurse: false` reads the prefix.
    let prefix = read(&consul, "app/list/a").await.unwrap().response;
    assert_eq!(prefix.len(), 1);
    let prefix = read(&consul, "app/list/").await.unwrap().response;
    assert_eq!(prefix.len(), 2, "{prefix:?}");

    // A blocking watch returns once the key changes...
    let (before, index) = entry(&consul, "app/config").await;
    let writer = agent.client();
    let change = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer
            .create_or_update_key(
                CreateOrUpdateKeyRequest {
                    key: "app/config",
                    ..Default::default()
                },
                b"watched".to_vec(),
            )
            .await
            .unwrap()
    });
    let t = Instant::now();
    let watched = consul
        .watch_lock(LockWatchRequest {
            key: "app/config",
            index: Some(index),
            wait: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "watch took {:?}",
        t.elapsed()
    );
    assert!(change.await.unwrap().0);
    assert!(watched.index > index);
    assert_eq!(watched.response[0].value.as_deref(), Some("watched"));
    assert!(watched.response[0].modify_index > before.modify_index);
    // ...and otherwise waits out `wait`, answering with the same index.
    let t = Instant::now();
    let idle = consul
        .watch_lock(LockWatchRequest {
            key: "app/config",
            index: Some(watched.index),
            wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_waited(t);
    assert_eq!(idle.index, watched.index);

    // Delete with `check_and_set`: rs-consul sends `recurse=false&cas=N`,
    // which Consul (and tomo) refuse as conflicting flags; nothing goes.
    let m = entry(&consul, "app/config").await.0.modify_index;
    let r = consul
        .delete_key(DeleteKeyRequest {
            key: "app/config",
            check_and_set: m as u32,
            ..Default::default()
        })
        .await;
    assert!(
        matches!(&r, Err(ConsulError::UnexpectedResponseCode(s, Some(b)))
            if s.as_u16() == 400 && b.starts_with("Conflicting flags")),
        "{r:?}"
    );
    assert_eq!(
        entry(&consul, "app/config").await.0.value.as_deref(),
        Some("watched")
    );

    // Delete, then the key is gone.
    let deleted = consul
        .delete_key(DeleteKeyRequest {
            key: "app/config",
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(deleted);
    let gone = read(&consul, "app/config").await;
    assert!(is_not_found(&gone), "{gone:?}");
    assert_eq!(
        entry(&consul, "app/fresh").await.0.value.as_deref(),
        Some("new")
    );
    // A recursive delete takes the prefix.
    assert!(
        consul
            .delete_key(DeleteKeyRequest {
                key: "app/list/",
                recurse: true,
                ..Default::default()
            })
            .await
            .unwrap()
    );
    let gone = read(&consul, "app/list/a").await;
    assert!(is_not_found(&gone), "{gone:?}");
    assert_eq!(
        entry(&consul, "app/sync").await.0.value.as_deref(),
        Some("from-ureq")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_and_sessions() {
    let agent = Agent::start("lock-node");
    let consul = agent.client();
    let req = LockRequest {
        key: "locks/leader",
        ..Default::default()
    };

    // Acquired: the key names the lock's session.
    let first = consul.get_lock(req, b"owner-1").await.expect("first lock");
    assert!(!first.session_id.is_empty());
    let (e, _) = entry(&consul, "locks/leader").await;
    assert_eq!(e.session.as_deref(), Some(first.session_id.as_str()));
    assert_eq!(e.lock_index, 1);
    assert_eq!(e.value.as_deref(), Some("owner-1"));

    // Held: a second get_lock fails with the key's index.
    match consul.get_lock(req, b"owner-2").await {
        Err(ConsulError::LockAcquisitionFailure(index)) => {
            assert_eq!(index, e.modify_index as u64);
        }
        other => panic!("second lock while held: {other:?}"),
    }
    let (e, _) = entry(&consul, "locks/leader").await;
    assert_eq!(e.session.as_deref(), Some(first.session_id.as_str()));
    assert_eq!(e.value.as_deref(), Some("owner-1"));

    // Dropping the lock releases it (blocking `?release=`); lock-delay
    // applies only to invalidated sessions, so it can be taken at once.
    let first_session = first.session_id.clone();
    tokio::task::block_in_place(|| drop(first));
    let (e, _) = entry(&consul, "locks/leader").await;
    assert_eq!(e.session, None);
    assert_eq!(e.lock_index, 1);
    assert_eq!(e.value.as_deref(), Some("owner-1"));

    let second = consul.get_lock(req, b"owner-2").await.expect("second lock");
    assert_ne!(second.session_id, first_session);
    let (e, _) = entry(&consul, "locks/leader").await;
    assert_eq!(e.session.as_deref(), Some(second.session_id.as_str()));
    assert_eq!(e.lock_index, 2);
    assert_eq!(e.value.as_deref(), Some("owner-2"));

    // Locks that are never released: their sessions (TTL 10 s) are
    // invalidated within TTL × 2, releasing one key and deleting the other.
    let delete_req = LockRequest {
        key: "locks/ephemeral",
        behavior: LockExpirationBehavior::Delete,
        ..Default::default()
    };
    let third = consul
        .get_lock(delete_req, b"doomed")
        .await
        .expect("delete-behavior lock");
    assert_eq!(
        entry(&consul, "locks/ephemeral").await.0.session.as_deref(),
        Some(third.session_id.as_str())
    );
    let held = Instant::now();
    std::mem::forget(second);
    std::mem::forget(third);
    loop {
        let released = entry(&consul, "locks/leader").await.0.session.is_none();
        let deleted = is_not_found(&read(&consul, "locks/ephemeral").await);
        if released && deleted {
            break;
        }
        assert!(
            held.elapsed() < Duration::from_secs(40),
            "sessions not invalidated (released {released}, deleted {deleted})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        held.elapsed() >= Duration::from_secs(9),
        "invalidated after only {:?}",
        held.elapsed()
    );
    let (e, _) = entry(&consul, "locks/leader").await;
    assert_eq!(e.value.as_deref(), Some("owner-2"));
    assert_eq!(e.lock_index, 2);

    // After the lock-delay (1 s) the lock can be acquired again.
    let freed = Instant::now();
    let fourth = loop {
        match consul.get_lock(req, b"owner-4").await {
            Ok(l) => break l,
            Err(ConsulError::LockAcquisitionFailure(_)) => {
                assert!(freed.elapsed() < Duration::from_secs(10), "lock-delay");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (e, _) = entry(&consul, "locks/leader").await;
    assert_eq!(e.session.as_deref(), Some(fourth.session_id.as_str()));
    assert_eq!(e.lock_index, 3);
    tokio::task::block_in_place(|| drop(fourth));
    assert_eq!(entry(&consul, "locks/leader").await.0.session, None);
}

fn service(id: &str, name: &str, port: u16, tags: &[&str]) -> RegisterEntityService {
    RegisterEntityService {
        ID: Some(id.into()),
        Service: name.into(),
        Tags: tags.iter().map(|t| t.to_string()).collect(),
        TaggedAddresses: HashMap::new(),
        Meta: HashMap::from([("version".to_string(), "1".to_string())]),
        Port: Some(port),
        Namespace: None,
    }
}

fn check(node: &str, service_id: &str, status: &str) -> RegisterEntityCheck {
    RegisterEntityCheck {
        Node: Some(node.into()),
        CheckID: Some(format!("{service_id}-alive")),
        Name: format!("{service_id} alive"),
        Notes: None,
        Status: Some(status.into()),
        ServiceID: Some(service_id.into()),
        Definition: HashMap::new(),
    }
}

fn registration(
    node: &str,
    address: &str,
    service: Option<RegisterEntityService>,
    checks: Vec<RegisterEntityCheck>,
) -> RegisterEntityPayload {
    RegisterEntityPayload {
        ID: None,
        Node: node.into(),
        Address: address.into(),
        Datacenter: Some("dc1".into()),
        TaggedAddresses: HashMap::new(),
        NodeMeta: HashMap::from([("rack".to_string(), "r1".to_string())]),
        Service: service,
        Checks: checks,
        SkipNodeUpdate: None,
    }
}

fn service_nodes(name: &str, passing: bool) -> GetServiceNodesRequest<'_> {
    GetServiceNodesRequest {
        service: name,
        passing,
        ..Default::default()
    }
}

fn nodes_of(list: &[ServiceNode]) -> Vec<&str> {
    list.iter().map(|s| s.node.node.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_and_health() {
    let agent = Agent::start("catalog-node");
    let consul = agent.client();

    consul
        .register_entity(&registration(
            "web-node-1",
            "10.0.0.1",
            Some(service("web-1", "web", 8080, &["v1", "primary"])),
            vec![check("web-node-1", "web-1", "passing")],
        ))
        .await
        .expect("register web-1");

    let names = consul.get_all_registered_service_names(None).await.unwrap();
    assert!(names.index > 0);
    assert!(names.response.contains(&"web".to_string()), "{names:?}");

    let nodes = consul
        .get_nodes(GetNodesRequest::default(), None)
        .await
        .unwrap();
    assert!(nodes.index > 0);
    let n = nodes
        .response
        .iter()
        .find(|n| n.node == "web-node-1")
        .unwrap_or_else(|| panic!("{:?}", nodes.response));
    assert_eq!(n.address, "10.0.0.1");
    assert_eq!(n.datacenter, "dc1");
    assert_eq!(
        n.Meta
            .as_ref()
            .and_then(|m| m.get("rack"))
            .map(String::as_str),
        Some("r1")
    );
    assert!(nodes.response.iter().any(|n| n.node == agent.node));

    let web = consul
        .get_service_nodes(service_nodes("web", false), None)
        .await
        .unwrap();
    assert!(web.index > 0);
    assert_eq!(web.response.len(), 1, "{:?}", web.response);
    let sn = &web.response[0];
    assert_eq!(sn.node.node, "web-node-1");
    assert_eq!(sn.node.address, "10.0.0.1");
    assert_eq!(sn.node.datacenter, "dc1");
    assert_eq!(sn.service.id, "web-1");
    assert_eq!(sn.service.service, "web");
    assert_eq!(sn.service.port, 8080);
    assert_eq!(sn.service.tags, ["v1", "primary"]);
    assert_eq!(sn.service.address, "");

    // A second instance with a critical check: listed, but not passing.
    consul
        .register_entity(&registration(
            "web-node-2",
            "10.0.0.2",
            Some(service("web-2", "web", 9090, &[])),
            vec![check("web-node-2", "web-2", "critical")],
        ))
        .await
        .expect("register web-2");
    let both = consul
        .get_service_nodes(service_nodes("web", false), None)
        .await
        .unwrap();
    assert!(both.index > web.index);
    let mut all = nodes_of(&both.response);
    all.sort();
    assert_eq!(all, ["web-node-1", "web-node-2"]);

    let passing = consul
        .get_service_nodes(service_nodes("web", true), None)
        .await
        .unwrap();
    assert_eq!(nodes_of(&passing.response), ["web-node-1"]);
    // No service address registered: the node's address with the
    // service's port, passing instances only.
    let addrs = consul
        .get_service_addresses_and_ports("web", None)
        .await
        .unwrap();
    assert_eq!(addrs, [("10.0.0.1".to_string(), 8080)]);

    // An explicit datacenter is this one.
    let in_dc = consul
        .get_service_nodes(
            service_nodes("web", false),
            Some(QueryOptions {
                datacenter: Some("dc1".into()),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert_eq!(in_dc.response.len(), 2);

    // An unknown service: no instances, no error.
    let none = consul
        .get_service_nodes(service_nodes("nope", false), None)
        .await
        .unwrap();
    assert!(none.response.is_empty());
    assert!(
        consul
            .get_service_addresses_and_ports("nope", None)
            .await
            .unwrap()
            .is_empty()
    );

    // Deregister one instance while a blocking query waits on the
    // current index: it returns once the instance is gone.
    let deregistrar = agent.client();
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        deregistrar
            .deregister_entity(&DeregisterEntityPayload {
                Node: Some("web-node-2".into()),
                Datacenter: None,
                CheckID: None,
                ServiceID: Some("web-2".into()),
                Namespace: None,
            })
            .await
    });
    let t = Instant::now();
    let web = consul
        .get_service_nodes(
            service_nodes("web", false),
            Some(QueryOptions {
                index: Some(in_dc.index),
                wait: Some(Duration::from_secs(10)),
                timeout: Some(Duration::from_secs(15)),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    late.await.unwrap().expect("deregister web-2");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(web.index > in_dc.index);
    assert_eq!(nodes_of(&web.response), ["web-node-1"]);
    // Without a change, the query waits out `wait` with the same index.
    let t = Instant::now();
    let idle = consul
        .get_service_nodes(
            service_nodes("web", false),
            Some(QueryOptions {
                index: Some(web.index),
                wait: Some(Duration::from_secs(1)),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert_waited(t);
    assert_eq!(idle.index, web.index);
    assert_eq!(nodes_of(&idle.response), ["web-node-1"]);
    // The node itself stays.
    let nodes = consul
        .get_nodes(GetNodesRequest::default(), None)
        .await
        .unwrap();
    assert!(nodes.response.iter().any(|n| n.node == "web-node-2"));

    consul
        .deregister_entity(&DeregisterEntityPayload {
            Node: Some("web-node-1".into()),
            Datacenter: Some("dc1".into()),
            CheckID: None,
            ServiceID: None,
            Namespace: None,
        })
        .await
        .expect("deregister web-node-1");
    let web = consul
        .get_service_nodes(service_nodes("web", false), None)
        .await
        .unwrap();
    assert!(web.response.is_empty(), "{:?}", web.response);
    let names = consul.get_all_registered_service_names(None).await.unwrap();
    assert!(!names.response.contains(&"web".to_string()), "{names:?}");
    let nodes = consul
        .get_nodes(GetNodesRequest::default(), None)
        .await
        .unwrap();
    let names: Vec<&str> = nodes.response.iter().map(|n| n.node.as_str()).collect();
    assert!(!names.contains(&"web-node-1"), "{names:?}");
    assert!(names.contains(&"web-node-2"), "{names:?}");
    assert!(names.contains(&agent.node.as_str()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_sorts_by_coordinates() {
    let agent = Agent::start("near-agent");
    let consul = agent.client();

    // Three instances; in name order the agent's node comes last.
    for (node, id) in [
        ("far-a", "cache-a"),
        ("far-b", "cache-b"),
        ("near-agent", "cache-agent"),
    ] {
        consul
            .register_entity(&registration(
                node,
                "127.0.0.1",
                Some(service(id, "cache", 6379, &[])),
                Vec::new(),
            ))
            .await
            .unwrap_or_else(|e| panic!("register {id}: {e}"));
    }
    // Coordinates for the agent's node and far-b (50 ms away); far-a has
    // none.
    agent.set_coordinate("near-agent", 0.0);
    agent.set_coordinate("far-b", 0.05);

    let mut unsorted = nodes_of(
        &consul
            .get_service_nodes(service_nodes("cache", false), None)
            .await
            .unwrap()
            .response,
    )
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    unsorted.sort();
    assert_eq!(unsorted, ["far-a", "far-b", "near-agent"]);

    let near = |from: &'static str| GetServiceNodesRequest {
        service: "cache",
        near: Some(from),
        ..Default::default()
    };
    for from in ["near-agent", "_agent"] {
        let sorted = consul.get_service_nodes(near(from), None).await.unwrap();
        assert_eq!(
            nodes_of(&sorted.response),
            ["near-agent", "far-b", "far-a"],
            "near={from}"
        );
    }
    let sorted = consul.get_service_nodes(near("far-b"), None).await.unwrap();
    assert_eq!(nodes_of(&sorted.response), ["far-b", "near-agent", "far-a"]);

    // The catalog's node list sorts the same way.
    let nodes = consul
        .get_nodes(
            GetNodesRequest {
                near: Some("near-agent"),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    let names: Vec<&str> = nodes.response.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["near-agent", "far-b", "far-a"]);
}

/// A blocking query with nothing changing waited out its 1 s.
fn assert_waited(t: Instant) {
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}
