//! Three `tomo agent -server -bootstrap-expect 3` processes and two client
//! agents on loopback, each with its own data dir: the servers find each
//! other over gossip and form one Raft group, writes go through any node,
//! a leader SIGKILLed in the middle of a stream of acknowledged KV writes
//! loses none of them, a server restarted from its data dir comes back with
//! its state, a blocking query on a client returns after a change and not
//! before, a server that leaves is taken out of the group and a new one is
//! added.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::{free_tcp, free_udp, http, http_body, http_full, json};

const SERVERS: usize = 3;
const NODES: usize = 5;

struct Cluster {
    gossip: Vec<u16>,
    http: Vec<u16>,
    rpc: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let mut c = Cluster {
            gossip: (0..NODES).map(|_| free_udp()).collect(),
            http: (0..NODES).map(|_| free_tcp()).collect(),
            rpc: (0..NODES).map(|_| free_tcp()).collect(),
            children: (0..NODES).map(|_| None).collect(),
            dir: tempfile::TempDir::new().unwrap(),
        };
        for i in 0..NODES {
            c.spawn(i);
        }
        c
    }

    fn name(i: usize) -> String {
        if i < SERVERS {
            format!("server-{i}")
        } else {
            format!("client-{}", i - SERVERS)
        }
    }

    fn spawn(&mut self, i: usize) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tomo"));
        cmd.args(["agent", "-node", &Self::name(i), "-bind", "127.0.0.1"])
            .args(["-dns-port", "0"])
            .args(["-serf-lan-port", &self.gossip[i].to_string()])
            .args(["-http-port", &self.http[i].to_string()])
            .args(["-probe-interval", "500ms"])
            .args([
                "-data-dir",
                self.dir.path().join(Self::name(i)).to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for seed in [0, 1].into_iter().filter(|s| *s != i) {
            cmd.args(["-retry-join", &format!("127.0.0.1:{}", self.gossip[seed])]);
        }
        if i < SERVERS {
            cmd.args(["-server", "-bootstrap-expect", "3", "-serf-wan-port", "0"])
                .args(["-server-port", &self.rpc[i].to_string()]);
        }
        self.children[i] = Some(cmd.spawn().expect("start tomo agent"));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The leader's index as server `i` reports it.
    fn leader_seen_by(&self, i: usize) -> Option<usize> {
        let v = json(self.http[i], "/v1/status/leader")?;
        let port: u16 = v.as_str()?.rsplit(':').next()?.parse().ok()?;
        self.rpc[..SERVERS].iter().position(|p| *p == port)
    }

    /// Voters in server `i`'s Raft configuration.
    fn peers_seen_by(&self, i: usize) -> usize {
        json(self.http[i], "/v1/status/peers")
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0)
    }

    fn put(&self, i: usize, key: &str, value: &str) -> bool {
        matches!(
            http_body("PUT", self.http[i], &format!("/v1/kv/{key}"), value),
            Some((200, b)) if b.trim() == "true"
        )
    }

    fn get_raw(&self, i: usize, path: &str) -> Option<String> {
        match http("GET", self.http[i], path) {
            Some((200, b)) => Some(b),
            _ => None,
        }
    }
}

/// A GET answered within 5 s.
fn get(port: u16, path: &str) -> common::Answer {
    http_full("GET", port, path, "", Duration::from_secs(5)).expect("an answer")
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_servers_and_two_clients_keep_every_acknowledged_write() {
    let mut c = Cluster::start();

    // One group of three, the same leader seen by all servers, formed
    // exactly once.
    wait_for("a leader and three voters", Duration::from_secs(60), || {
        let l = c.leader_seen_by(0);
        l.is_some() && (0..SERVERS).all(|i| c.leader_seen_by(i) == l && c.peers_seen_by(i) == 3)
    });

    // Writes through every node, servers and clients; each read back
    // through every other node.
    wait_for(
        "the clients reach a server",
        Duration::from_secs(30),
        || (SERVERS..NODES).all(|i| c.put(i, &format!("probe/{i}"), "x")),
    );
    for i in 0..NODES {
        assert!(
            c.put(i, &format!("through/{i}"), &format!("v{i}")),
            "PUT via node {i}"
        );
    }
    for i in 0..NODES {
        for j in 0..NODES {
            assert_eq!(
                c.get_raw(j, &format!("/v1/kv/through/{i}?raw")).as_deref(),
                Some(format!("v{i}").as_str()),
                "key written via node {i}, read via node {j}"
            );
        }
    }

    // Every node is in the catalog (clients register themselves through a
    // server) with a passing serfHealth.
    wait_for("five nodes in the catalog", Duration::from_secs(30), || {
        json(c.http[3], "/v1/catalog/nodes").and_then(|v| v.as_array().map(|a| a.len()))
            == Some(NODES)
    });
    wait_for(
        "serfHealth passing everywhere",
        Duration::from_secs(30),
        || {
            json(c.http[4], "/v1/health/state/passing").and_then(|v| v.as_array().map(|a| a.len()))
                == Some(NODES)
        },
    );

    // Leader headers: a follower's stale read is answered locally with a
    // known leader and a recent contact; default reads come from the
    // leader (LastContact 0).
    let leader = c.leader_seen_by(0).unwrap();
    let follower = (0..SERVERS).find(|i| *i != leader).unwrap();
    let a = get(c.http[follower], "/v1/kv/through/0?stale");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("X-Consul-KnownLeader"), Some("true"));
    let contact: u64 = a.header("X-Consul-LastContact").unwrap().parse().unwrap();
    assert!(contact < 5000, "follower's last contact {contact} ms");
    let a = get(c.http[3], "/v1/kv/through/0?consistent");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("X-Consul-LastContact"), Some("0"));
    let a = get(c.http[3], "/v1/kv/through/0?stale&consistent");
    assert_eq!(a.status, 400);

    // A blocking query on a client returns after a change, not before.
    let index: u64 = get(c.http[4], "/v1/kv/block")
        .header("X-Consul-Index")
        .unwrap()
        .parse()
        .unwrap();
    let port = c.http[4];
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let a = http_full(
            "GET",
            port,
            &format!("/v1/kv/block?index={index}&wait=30s"),
            "",
            Duration::from_secs(40),
        );
        (t.elapsed(), a.map(|a| (a.status, a.body)))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !waiter.is_finished(),
        "blocking query returned before a change"
    );
    assert!(c.put(0, "block", "changed"));
    let (took, got) = waiter.join().unwrap();
    let (status, body) = got.expect("blocking query answered");
    assert_eq!(status, 200);
    assert!(body.contains("\"Key\":\"block\""), "{body}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(20),
        "blocking query took {took:?}"
    );

    // A stream of writes through client 0 (one writer per server it may
    // reach); the leader is SIGKILLed in the middle of it.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, port) = (acked.clone(), stop.clone(), c.http[3]);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("stream/{n:06}");
                if matches!(
                    http_body("PUT", port, &format!("/v1/kv/{key}"), &key),
                    Some((200, b)) if b.trim() == "true"
                ) {
                    acked.lock().unwrap().push(key);
                }
                n += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let before_kill = acked.lock().unwrap().len();
    c.kill(leader);
    let others: Vec<usize> = (0..SERVERS).filter(|i| *i != leader).collect();
    wait_for("a new leader", Duration::from_secs(30), || {
        let l = c.leader_seen_by(others[0]);
        l.is_some() && l != Some(leader) && c.leader_seen_by(others[1]) == l
    });
    let after_election = acked.lock().unwrap().len();
    wait_for("writes acknowledged again", Duration::from_secs(30), || {
        acked.lock().unwrap().len() > after_election + 20
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        before_kill > 10,
        "only {before_kill} writes before the kill"
    );
    // Every acknowledged write is there, read through the other client.
    let a = http_full(
        "GET",
        c.http[4],
        "/v1/kv/stream/?keys&consistent",
        "",
        Duration::from_secs(10),
    )
    .expect("an answer");
    assert_eq!(a.status, 200, "{}", a.body);
    let listed: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    let listed: std::collections::HashSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|k| !listed.contains(k.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {lost:?}",
        lost.len(),
        acked.len()
    );

    // The killed server comes back from its data dir: still a member, and
    // it catches up with everything written while it was down.
    c.spawn(leader);
    let last = acked.last().unwrap().clone();
    wait_for(
        "the restarted server caught up",
        Duration::from_secs(60),
        || {
            c.get_raw(leader, &format!("/v1/kv/{last}?stale&raw"))
                .as_deref()
                == Some(last.as_str())
                && c.get_raw(leader, "/v1/kv/through/0?stale&raw").as_deref() == Some("v0")
        },
    );
    assert_eq!(c.peers_seen_by(leader), 3);

    // A server that leaves gracefully is taken out of the group.
    let gone = (0..SERVERS)
        .find(|i| c.leader_seen_by(0) != Some(*i))
        .unwrap();
    assert_eq!(
        http("PUT", c.http[gone], "/v1/agent/leave").map(|r| r.0),
        Some(200)
    );
    let stay = (0..SERVERS).find(|i| *i != gone).unwrap();
    let t = Instant::now();
    while c.peers_seen_by(stay) != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "server-{gone} left but is still a voter: members {:?}, configuration {:?}",
            json(c.http[stay], "/v1/agent/members"),
            json(c.http[stay], "/v1/operator/raft/configuration")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        c.put(4, "after/leave", "ok"),
        "writes go on with two servers"
    );

    // A new server (an empty data dir) is added to the group: three voters
    // again, and it holds everything.
    c.kill(gone);
    std::fs::remove_dir_all(c.dir.path().join(Cluster::name(gone))).unwrap();
    c.spawn(gone);
    wait_for("the new server is a voter", Duration::from_secs(60), || {
        c.peers_seen_by(stay) == 3 && c.peers_seen_by(gone) == 3
    });
    wait_for(
        "the new server has the data",
        Duration::from_secs(30),
        || c.get_raw(gone, "/v1/kv/after/leave?stale&raw").as_deref() == Some("ok"),
    );

    // Catalog and health reads take ?stale too, answered by the server
    // asked, with its view of the leader.
    let a = get(c.http[gone], "/v1/catalog/nodes?stale");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("X-Consul-KnownLeader"), Some("true"));
    let nodes: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(nodes.as_array().map(|n| n.len()), Some(NODES));
    let a = get(c.http[3], "/v1/health/service/nope?consistent");
    assert_eq!((a.status, a.body.as_str()), (200, "[]"));
}
