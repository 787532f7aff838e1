//! Five `tomo agent` processes on loopback whose links get emulated
//! latencies (user-space delays from a dataset; one-way = RTT / 2): they
//! join, see each other alive, their coordinates converge on the emulated
//! RTTs, a killed agent is reported failed and comes back when restarted,
//! and a partition (emulated drops) heals into one cluster again.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{free_tcp, free_udp, http, http_body, json};

/// Node positions (ms) in a plane; RTT = distance + 2 ms of access delay.
const POS: [(f64, f64); 5] = [
    (0.0, 0.0),
    (20.0, 0.0),
    (0.0, 25.0),
    (30.0, 30.0),
    (10.0, 45.0),
];

fn rtt(i: usize, j: usize) -> f64 {
    let (a, b) = (POS[i], POS[j]);
    (a.0 - b.0).hypot(a.1 - b.1) + 2.0
}

fn write_dataset(path: &Path) {
    let mut s = String::from("# ltm v1\n# name: five\n# nodes: 5\n# units: ms\n# missing: -1\n");
    for i in 0..5 {
        let row: Vec<String> = (0..5)
            .map(|j| {
                if i == j {
                    "0".into()
                } else {
                    format!("{:.3}", rtt(i, j))
                }
            })
            .collect();
        s.push_str(&row.join(" "));
        s.push('\n');
    }
    std::fs::write(path, s).unwrap();
}

struct Cluster {
    gossip: Vec<u16>,
    http: Vec<u16>,
    dataset: std::path::PathBuf,
    children: Vec<Option<Child>>,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::TempDir::new().unwrap();
        let dataset = dir.path().join("five.ltm");
        write_dataset(&dataset);
        let mut c = Cluster {
            gossip: (0..5).map(|_| free_udp()).collect(),
            http: (0..5).map(|_| free_tcp()).collect(),
            dataset,
            children: (0..5).map(|_| None).collect(),
            dir,
        };
        for i in 0..5 {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let peers: Vec<String> = self
            .gossip
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tomo"));
        cmd.args(["agent", "-dev", "-node", &format!("node-{i}")])
            // Several agents at once: no DNS (8600 is one port).
            .args(["-dns-port", "0"])
            .args(["-serf-lan-port", &self.gossip[i].to_string()])
            .args(["-http-port", &self.http[i].to_string()])
            .args(["-probe-interval", "200ms"])
            .args(["-link-dataset", self.dataset.to_str().unwrap()])
            .args(["-link-index", &i.to_string()])
            .args(["-link-peers", &peers.join(",")])
            // -dev runs a server too: its Raft data in this test's temp dir
            // (a SIGKILL leaves nothing in /tmp), one per agent, kept
            // across a restart.
            .args([
                "-data-dir",
                self.dir.path().join(format!("data-{i}")).to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if i > 0 {
            cmd.args(["-join", &peers[0]]);
        } else {
            cmd.args(["-retry-join", &peers[1]]);
        }
        self.children[i] = Some(cmd.spawn().expect("start tomo agent"));
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Member statuses as agent `i` reports them, by node name.
    fn statuses(&self, i: usize) -> Vec<(String, u64)> {
        json(self.http[i], "/v1/agent/members")
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .map(|m| {
                            (
                                m["Name"].as_str().unwrap_or("").to_string(),
                                m["Status"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    fn alive_count(&self, i: usize) -> usize {
        self.statuses(i).iter().filter(|(_, s)| *s == 1).count()
    }

    /// Median relative error of the estimates agent `i` can make from its
    /// coordinate table.
    fn median_rel_err(&self, i: usize) -> Option<f64> {
        let v = json(self.http[i], "/v1/coordinate/nodes")?;
        let coords: Vec<(usize, tomo::vivaldi::Coordinate)> = v
            .as_array()?
            .iter()
            .filter_map(|e| {
                let k = e["Node"].as_str()?.strip_prefix("node-")?.parse().ok()?;
                Some((k, serde_json::from_value(e["Coord"].clone()).ok()?))
            })
            .collect();
        if coords.len() < 5 {
            return None;
        }
        let mut errs = Vec::new();
        for (a, (i, ci)) in coords.iter().enumerate() {
            for (j, cj) in &coords[a + 1..] {
                let act = rtt(*i, *j);
                errs.push((ci.distance_to(cj) * 1000.0 - act).abs() / act);
            }
        }
        errs.sort_by(f64::total_cmp);
        Some(errs[errs.len() / 2])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..5 {
            self.kill(i);
        }
    }
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cond()
}

#[test]
fn five_agents_join_converge_fail_rejoin_and_heal() {
    let mut c = Cluster::start();
    assert!(
        eventually(Duration::from_secs(20), || (0..5)
            .all(|i| c.alive_count(i) == 5)),
        "not all alive: {:?}",
        (0..5).map(|i| c.statuses(i)).collect::<Vec<_>>()
    );
    let mut last = None;
    assert!(
        eventually(Duration::from_secs(40), || {
            last = c.median_rel_err(0);
            last.is_some_and(|e| e <= 0.15)
        }),
        "coordinates did not converge: median relative error {last:?}"
    );

    // A killed agent is reported failed by every other one.
    c.kill(4);
    assert!(
        eventually(Duration::from_secs(20), || (0..4)
            .all(|i| c.statuses(i).contains(&("node-4".into(), 4)))),
        "node-4 not reported failed: {:?}",
        (0..4).map(|i| c.statuses(i)).collect::<Vec<_>>()
    );
    // Restarted, it is alive again everywhere.
    c.spawn(4);
    assert!(
        eventually(Duration::from_secs(30), || (0..5)
            .all(|i| c.alive_count(i) == 5)),
        "node-4 did not rejoin: {:?}",
        (0..5).map(|i| c.statuses(i)).collect::<Vec<_>>()
    );

    // Partition {0, 1} from {2, 3, 4} by dropping datagrams both ways.
    let side_a = [0usize, 1];
    let side_b = [2usize, 3, 4];
    let set = |c: &Cluster, enable: bool| {
        for (from, to) in side_a
            .iter()
            .flat_map(|a| side_b.iter().map(move |b| (*a, *b)))
        {
            for (x, y) in [(from, to), (to, from)] {
                let path = format!(
                    "/v1/tomo/link/drop/127.0.0.1:{}?enable={enable}",
                    c.gossip[y]
                );
                assert_eq!(http("PUT", c.http[x], &path).map(|r| r.0), Some(200));
            }
        }
    };
    set(&c, true);
    assert!(
        eventually(Duration::from_secs(30), || c.alive_count(0) == 2
            && c.alive_count(2) == 3),
        "the partition did not split the cluster: {:?} / {:?}",
        c.statuses(0),
        c.statuses(2)
    );
    set(&c, false);
    assert!(
        eventually(Duration::from_secs(60), || (0..5)
            .all(|i| c.alive_count(i) == 5)),
        "the healed partition did not merge: {:?}",
        (0..5).map(|i| c.statuses(i)).collect::<Vec<_>>()
    );
}

#[test]
fn coordinate_endpoints_follow_consul() {
    let c = Cluster::start();
    assert!(eventually(Duration::from_secs(20), || c.alive_count(0) == 5));
    let port = c.http[0];
    // Unknown node: 404 with an empty body.
    assert_eq!(
        http("GET", port, "/v1/coordinate/node/nope"),
        Some((404, String::new()))
    );
    // A member's coordinate shows up once it has measured and published
    // (404 until then, as in Consul).
    assert!(eventually(Duration::from_secs(20), || http(
        "GET",
        port,
        "/v1/coordinate/node/node-1"
    )
    .is_some_and(|(s, _)| s == 200)));
    let (status, body) = http("GET", port, "/v1/coordinate/node/node-1?pretty").unwrap();
    assert_eq!(status, 200);
    assert!(body.starts_with("[\n    {"), "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["Node"], "node-1");
    assert_eq!(v[0]["Coord"]["Vec"].as_array().unwrap().len(), 8);
    let me = json(port, "/v1/agent/self").unwrap();
    assert_eq!(me["Config"]["NodeName"], "node-0");
    for k in ["Config", "DebugConfig", "Coord", "Member", "Stats", "Meta"] {
        assert!(me[k].is_object(), "agent/self {k} is not an object");
    }
    // PUT /v1/coordinate/update: Consul's errors, then a good one shows up.
    let wrong_dim =
        r#"{"Node":"ext","Coord":{"Vec":[0.1,0.2],"Error":1.5,"Adjustment":0,"Height":0.00001}}"#;
    assert_eq!(
        http_body("PUT", port, "/v1/coordinate/update", wrong_dim),
        Some((500, "incompatible coordinate".into()))
    );
    let (status, body) = http_body("PUT", port, "/v1/coordinate/update", "{not json").unwrap();
    assert_eq!(status, 400);
    assert!(body.starts_with("Request decode failed"), "{body}");
    let good = r#"{"Node":"ext","Coord":{"Vec":[0.01,0,0,0,0,0,0,0],"Error":0.2,"Adjustment":0,"Height":0.00001}}"#;
    assert_eq!(
        http_body("PUT", port, "/v1/coordinate/update", good),
        Some((200, String::new()))
    );
    let v = json(port, "/v1/coordinate/node/ext").unwrap();
    assert_eq!(v[0]["Coord"]["Vec"][0], 0.01);

    // `-dev` is a server too: its KV store answers.
    assert!(eventually(Duration::from_secs(10), || http_body(
        "PUT",
        port,
        "/v1/kv/dev/key",
        "v1"
    ) == Some((
        200,
        "true".into()
    ))));
    assert_eq!(
        http("GET", port, "/v1/kv/dev/key?raw"),
        Some((200, "v1".into()))
    );

    // A graceful leave is "left" (3) everywhere, not "failed" (4).
    assert_eq!(
        http("PUT", c.http[4], "/v1/agent/leave").map(|r| r.0),
        Some(200)
    );
    assert!(
        eventually(Duration::from_secs(20), || (0..4)
            .all(|i| c.statuses(i).contains(&("node-4".into(), 3)))),
        "node-4 not reported left: {:?}",
        (0..4).map(|i| c.statuses(i)).collect::<Vec<_>>()
    );
    // …and, as Consul's, the agent that left shuts down.
    let mut c = c;
    let child = c.children[4].as_mut().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || child
            .try_wait()
            .is_ok_and(|s| s.is_some_and(|s| s.success()))),
        "the agent that left is still running"
    );
}
