//! Patroni 3.0.2 (Debian's `patroni`, unchanged) running two PostgreSQL
//! nodes with `tomo agent -dev` as its Consul DCS: the initialize key
//! (`initialize?cas=0`; both nodes start at once), the leader lock
//! (`leader?acquire=` with a `behavior=delete` session renewed every
//! loop), member keys, the blocking watch on the leader key and, with
//! `register_service`, the catalog service whose HTTP checks and role tags
//! make `primary.<scope>.service.consul` work.
//!
//! It proves that with tomo as DCS exactly one node is primary and the
//! other streams from it; that the lock and the members outlive the
//! session TTL in a steady state (renewals); that a graceful stop of the
//! primary's Patroni hands the lock over (the leader key, read from tomo,
//! names the other node, which is promoted and takes writes that follow
//! the earlier ones); that the stopped node's service is deregistered (its
//! ID holds a `/`); that the stopped node rejoins as a replica; that when
//! the primary then crashes (Patroni and postgres killed) tomo's session
//! TTL frees the lock, neither early nor late, the survivor is promoted and
//! the crashed node's HTTP check drops it from the passing primaries; and,
//! from a sampler polling both REST APIs and the leader key all along,
//! that no sample ever saw two nodes answering 200 on `/primary` and the
//! leader key never named a node that was not primary for much longer
//! than the TTL.
//!
//! Skips with a message when Patroni, PostgreSQL or python-consul is
//! missing; CI sets `TOMO_REQUIRE_EXTERNAL=1` (and installs them) to make
//! that a failure. PostgreSQL refuses to run as root, so as root Patroni
//! (and with it postgres) runs as the `postgres` user, in a directory
//! under /tmp given to it. `TOMO_PATRONI_LOG=DEBUG` sets Patroni's log
//! level and `TOMO_PATRONI_KEEP=1` keeps that directory (logs, data).

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{free_tcp, free_udp, http_full, json};
use serde_json::Value;

const SCOPE: &str = "tomo-pg";
/// Patroni's `ttl`; its minimum. The leader's lock lives this long
/// without renewal, and Patroni asks tomo for sessions of half of it.
const TTL: u64 = 20;
/// Patroni's `loop_wait`. Above one second, so that a replica spends the
/// rest of each loop in a blocking read of the leader key (Patroni only
/// watches when a second or more is left).
const LOOP_WAIT: u64 = 2;

/// The outside programs the test drives.
struct Tools {
    patroni: PathBuf,
    /// PostgreSQL's `bin_dir` (initdb, postgres, psql, pg_basebackup).
    pg_bin: PathBuf,
    /// `Some((uid, gid))` of `postgres` when running as root.
    run_as: Option<(u32, u32)>,
}

fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Debian keeps each major version under /usr/lib/postgresql/<v>/bin;
/// take the newest with a `postgres`.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, b)| b)
}

/// The uid and gid of `user` from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || f[0] != user {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

fn tools() -> Result<Tools, String> {
    let patroni = in_path("patroni").ok_or("no `patroni` in PATH (apt-get install patroni)")?;
    // Patroni's interpreter must find Patroni's Consul DCS, which imports
    // python-consul.
    let script = std::fs::read_to_string(&patroni).unwrap_or_default();
    let python = script
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .ok_or_else(|| format!("{} is not a Python script", patroni.display()))?;
    let imports = Command::new(python[0])
        .args(&python[1..])
        .args(["-c", "import patroni.dcs.consul"])
        .output()
        .map_err(|e| format!("{}: {e}", python[0]))?;
    if !imports.status.success() {
        return Err(format!(
            "Patroni cannot import its Consul DCS (apt-get install python3-consul): {}",
            String::from_utf8_lossy(&imports.stderr).trim()
        ));
    }
    let pg_bin = pg_bin_dir().ok_or(
        "no PostgreSQL under /usr/lib/postgresql/<version>/bin (apt-get install postgresql)",
    )?;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let run_as = if root {
        Some(user_ids("postgres").ok_or("running as root and there is no `postgres` user")?)
    } else {
        None
    };
    Ok(Tools {
        patroni,
        pg_bin,
        run_as,
    })
}

/// `kill -SIG target` (a pid, or `-pgid` for a process group); whether
/// it was delivered.
fn signal(sig: &str, target: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.starts_with(" Z"))
    })
}

/// The process group of `pid`.
fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ..."; comm may hold spaces.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// One Patroni node.
struct Node {
    name: String,
    rest: u16,
    pg: u16,
    dir: PathBuf,
    patroni: Option<Child>,
}

impl Node {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("patroni.log")
    }

    /// Its Patroni configuration: tomo as the Consul DCS, Patroni's
    /// shortest timings, initdb bootstrap, password auth on loopback.
    fn config(&self, consul_port: u16, pg_bin: &Path) -> String {
        let (name, rest, pg, dir) = (&self.name, self.rest, self.pg, self.dir.display());
        let bin = pg_bin.display();
        format!(
            r#"scope: {SCOPE}
name: {name}
log:
  level: {level}
restapi:
  listen: 127.0.0.1:{rest}
  connect_address: 127.0.0.1:{rest}
consul:
  host: 127.0.0.1:{consul_port}
  register_service: true
bootstrap:
  dcs:
    ttl: {TTL}
    loop_wait: {LOOP_WAIT}
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: false
      use_slots: true
      parameters:
        max_connections: 20
        max_wal_senders: 5
        max_replication_slots: 5
        wal_level: replica
        hot_standby: 'on'
  initdb:
  - encoding: UTF8
  pg_hba:
  - local all all trust
  - host replication replicator 127.0.0.1/32 md5
  - host all all 127.0.0.1/32 md5
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {dir}/data
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  authentication:
    replication:
      username: replicator
      password: rep-secret
    superuser:
      username: postgres
      password: su-secret
  parameters:
    unix_socket_directories: '{dir}'
    shared_buffers: 16MB
    fsync: 'off'
"#,
            level = std::env::var("TOMO_PATRONI_LOG").unwrap_or_else(|_| "INFO".into()),
        )
    }

    /// The Patroni log's last lines, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills whatever is left of this node: Patroni's process group (with
    /// initdb or pg_basebackup), then postgres, which Patroni starts in a
    /// session of its own so that it outlives Patroni.
    fn kill(&mut self) {
        if let Some(mut p) = self.patroni.take() {
            signal("KILL", &format!("-{}", p.id()));
            let _ = p.kill();
            let _ = p.wait();
        }
        let pid_file = self.data_dir().join("postmaster.pid");
        let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
        else {
            return;
        };
        // A postmaster killed outright leaves its pid file behind, and the
        // pid may since be another process's: only ours runs `-D <data>`.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let data = self.data_dir();
        if !cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == data.as_os_str().as_encoded_bytes())
        {
            return;
        }
        let group = pgid(pid);
        // SIGQUIT: PostgreSQL's immediate shutdown, children included.
        if alive(pid) && signal("QUIT", &pid.to_string()) {
            let end = Instant::now() + Duration::from_secs(5);
            while alive(pid) && Instant::now() < end {
                thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(g) = group.filter(|&g| g > 1) {
            signal("KILL", &format!("-{g}"));
        }
        if alive(pid) {
            signal("KILL", &pid.to_string());
        }
    }
}

/// tomo, the two nodes and their directory; everything is killed on drop,
/// panics included.
struct Cluster {
    tools: Tools,
    consul_port: u16,
    tomo: Child,
    tomo_log: PathBuf,
    nodes: Vec<Node>,
    // Dropped after `drop` has killed everything that writes into it.
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = self.tomo.kill();
        let _ = self.tomo.wait();
    }
}

impl Cluster {
    fn start(tools: Tools) -> Cluster {
        // postgres must reach its directories: /tmp is traversable by all.
        let base = if tools.run_as.is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        // TOMO_PATRONI_KEEP=1 keeps it (the logs, the data directories).
        let keep = std::env::var("TOMO_PATRONI_KEEP").is_ok_and(|v| v == "1");
        let dir = tempfile::Builder::new()
            .prefix("tomo-patroni")
            .disable_cleanup(keep)
            .tempdir_in(base)
            .unwrap();
        if keep {
            eprintln!("keeping {}", dir.path().display());
        }
        let consul_port = free_tcp();
        let tomo_log = dir.path().join("tomo.log");
        let tomo = Command::new(env!("CARGO_BIN_EXE_tomo"))
            .args(["agent", "-dev", "-node", "dcs", "-dns-port", "0"])
            .args(["-http-port", &consul_port.to_string()])
            .args(["-serf-lan-port", &free_udp().to_string()])
            .args(["-data-dir", dir.path().join("tomo").to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(File::create(&tomo_log).unwrap())
            .spawn()
            .expect("start tomo agent -dev");
        let nodes = (0..2)
            .map(|i| Node {
                name: format!("pg{i}"),
                rest: free_tcp(),
                pg: free_tcp(),
                dir: dir.path().join(format!("pg{i}")),
                patroni: None,
            })
            .collect();
        let c = Cluster {
            tools,
            consul_port,
            tomo,
            tomo_log,
            nodes,
            _dir: dir,
        };
        for n in &c.nodes {
            std::fs::create_dir(&n.dir).unwrap();
            std::fs::write(
                n.dir.join("patroni.yml"),
                n.config(consul_port, &c.tools.pg_bin),
            )
            .unwrap();
        }
        if let Some((uid, gid)) = c.tools.run_as {
            let chown = Command::new("chown")
                .args(["-R", &format!("{uid}:{gid}")])
                .arg(c._dir.path())
                .status()
                .unwrap();
            assert!(chown.success(), "chown the test directory to postgres");
        }
        // A single server elects itself and registers its node; Patroni's
        // first calls need both.
        let ready = wait_for(Duration::from_secs(30), || {
            json(consul_port, "/v1/catalog/node/dcs").filter(|v| !v.is_null())
        });
        if ready.is_none() {
            panic!("tomo never became ready");
        }
        c
    }

    /// A command run as the user postgres runs as, in `dir`.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>, dir: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(dir)
            .env("HOME", dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.tools.run_as {
            // std drops the supplementary groups when root changes uid.
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn start_node(&mut self, i: usize) {
        let n = &self.nodes[i];
        let log = File::options()
            .create(true)
            .append(true)
            .open(n.log())
            .unwrap();
        let mut cmd = self.command(&self.tools.patroni, &n.dir);
        cmd.arg(n.dir.join("patroni.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // Its own process group, so that cleanup reaches its children.
            .process_group(0);
        let child = cmd.spawn().expect("start patroni");
        self.nodes[i].patroni = Some(child);
    }

    /// SIGTERM to node `i`'s Patroni (a graceful stop: postgres is shut
    /// down, then the leader key released) and waits for it to exit.
    fn stop_node(&mut self, i: usize) {
        let mut p = self.nodes[i].patroni.take().expect("node is running");
        assert!(signal("TERM", &p.id().to_string()), "SIGTERM to Patroni");
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = p.try_wait().unwrap() {
                eprintln!("{} stopped: {status}", self.nodes[i].name);
                return;
            }
            if Instant::now() > end {
                self.nodes[i].patroni = Some(p);
                panic!("{}'s Patroni did not stop", self.nodes[i].name);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `psql -c sql` against node `i`, as the superuser over TCP.
    fn psql(&self, i: usize, sql: &str) -> Result<String, String> {
        let n = &self.nodes[i];
        let out = self
            .command(self.tools.pg_bin.join("psql"), &n.dir)
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &n.pg.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", "su-secret")
            .env("PGCONNECT_TIMEOUT", "3")
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// The logs' last lines, printed when the test fails.
    fn logs(&self) -> String {
        let tomo = std::fs::read_to_string(&self.tomo_log).unwrap_or_default();
        let tomo: Vec<&str> = tomo.lines().collect();
        let mut msg = format!(
            "--- tomo log (tail)\n{}",
            tomo[tomo.len().saturating_sub(30)..].join("\n")
        );
        for n in &self.nodes {
            msg += &format!("\n--- {} Patroni log (tail)\n{}", n.name, n.log_tail());
        }
        msg
    }

    /// The leader key: (name, session), read from tomo.
    fn leader_key(&self) -> Option<(String, String)> {
        leader_key(self.consul_port)
    }

    /// The catalog's `tomo-pg` instances passing their checks, as
    /// (service ID, tags), sorted by ID.
    fn passing_services(&self, tag: Option<&str>) -> Vec<(String, Vec<String>)> {
        let path = match tag {
            Some(t) => format!("/v1/health/service/{SCOPE}?passing=1&tag={t}"),
            None => format!("/v1/health/service/{SCOPE}?passing=1"),
        };
        let mut out: Vec<(String, Vec<String>)> = json(self.consul_port, &path)
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let s = &e["Service"];
                let tags = s["Tags"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| t.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                (s["ID"].as_str().unwrap_or_default().to_string(), tags)
            })
            .collect();
        out.sort();
        out
    }

    /// The catalog's `tomo-pg` service IDs, whatever their health.
    fn catalog_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = json(self.consul_port, &format!("/v1/catalog/service/{SCOPE}"))
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e["ServiceID"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }
}

/// Polls `f` every 200 ms until it gives a value or `within` passes;
/// fails the test then.
fn wait<T>(what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
    match wait_for(within, f) {
        Some(v) => v,
        None => panic!("timed out after {within:?}: {what}"),
    }
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// `GET path` on a Patroni REST API: its status, if it answered.
fn rest_status(port: u16, path: &str) -> Option<u16> {
    http_full("GET", port, path, "", Duration::from_secs(2)).map(|a| a.status)
}

/// `GET path` on a Patroni REST API as JSON, whatever the status (503
/// bodies carry the state too).
fn rest_json(port: u16, path: &str) -> Option<Value> {
    let a = http_full("GET", port, path, "", Duration::from_secs(2))?;
    serde_json::from_str(&a.body).ok()
}

fn leader_key(consul_port: u16) -> Option<(String, String)> {
    let v = json(consul_port, &format!("/v1/kv/service/{SCOPE}/leader"))?;
    let e = v.get(0)?;
    let value = base64::engine::general_purpose::STANDARD
        .decode(e["Value"].as_str()?)
        .ok()?;
    Some((
        String::from_utf8(value).ok()?,
        e["Session"].as_str().unwrap_or_default().to_string(),
    ))
}

/// One look at both REST APIs (at once) and the leader key.
struct Sample {
    at: Instant,
    /// Status of `GET /primary` per node; `None`: no answer.
    primary: [Option<u16>; 2],
    leader: Option<String>,
}

/// Polls `/primary` on both nodes and the leader key every 150 ms until
/// `stop`.
fn sampler(
    rest: [u16; 2],
    consul_port: u16,
    stop: Arc<AtomicBool>,
    out: Arc<Mutex<Vec<Sample>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let at = Instant::now();
            // Both nodes asked at the same moment, so that two 200s mean
            // two primaries at once, not one after the other.
            let (a, b) = thread::scope(|s| {
                let a = s.spawn(|| rest_status(rest[0], "/primary"));
                let b = s.spawn(|| rest_status(rest[1], "/primary"));
                (a.join().unwrap(), b.join().unwrap())
            });
            let leader = leader_key(consul_port).map(|(name, _)| name);
            out.lock().unwrap().push(Sample {
                at,
                primary: [a, b],
                leader,
            });
            thread::sleep(Duration::from_millis(150).saturating_sub(at.elapsed()));
        }
    })
}

/// The node whose `/primary` answers 200 while the other's `/replica`
/// does: `Some(leader index)`.
fn roles(c: &Cluster) -> Option<usize> {
    let p: Vec<Option<u16>> = c
        .nodes
        .iter()
        .map(|n| rest_status(n.rest, "/primary"))
        .collect();
    let r: Vec<Option<u16>> = c
        .nodes
        .iter()
        .map(|n| rest_status(n.rest, "/replica"))
        .collect();
    (0..2).find(|&i| p[i] == Some(200) && r[1 - i] == Some(200) && p[1 - i] != Some(200))
}

#[test]
fn patroni_two_nodes_fail_over_through_tomo() {
    let tools = match tools() {
        Ok(t) => t,
        Err(msg) => {
            if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
                panic!("TOMO_REQUIRE_EXTERNAL=1: {msg}");
            }
            eprintln!("skipping: {msg} (set TOMO_REQUIRE_EXTERNAL=1 to make this a failure)");
            return;
        }
    };
    let t0 = Instant::now();
    let mut c = Cluster::start(tools);
    let names = [c.nodes[0].name.clone(), c.nodes[1].name.clone()];
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = sampler(
        [c.nodes[0].rest, c.nodes[1].rest],
        c.consul_port,
        stop.clone(),
        samples.clone(),
    );

    // Both at once: they race for `initialize` (a cas=0 create), one runs
    // initdb and takes the leader key, the other copies it with
    // pg_basebackup.
    c.start_node(0);
    c.start_node(1);
    let leader = wait(
        "one primary and one streaming replica",
        Duration::from_secs(90),
        || roles(&c),
    );
    let replica = 1 - leader;
    eprintln!("{} is primary after {:?}", names[leader], t0.elapsed());

    // The lock in tomo: the leader's name under a session, Patroni's.
    let (name, session) = c.leader_key().expect("the leader key");
    assert_eq!(name, names[leader], "the leader key names the primary");
    assert!(!session.is_empty(), "the leader key is held by a session");
    let info = json(c.consul_port, &format!("/v1/session/info/{session}")).unwrap();
    assert_eq!(
        info[0]["Name"],
        format!("{SCOPE}-{}", names[leader]),
        "{info}"
    );
    assert_eq!(info[0]["Behavior"], "delete", "{info}");
    // Both members registered, each under its own session.
    for n in &names {
        let m = json(
            c.consul_port,
            &format!("/v1/kv/service/{SCOPE}/members/{n}"),
        )
        .unwrap_or_else(|| panic!("no member key for {n}"));
        assert!(
            m[0]["Session"].as_str().is_some_and(|s| !s.is_empty()),
            "{m}"
        );
    }

    // Streaming replication: a row written on the primary reaches the
    // replica, and the primary reports the replica as streaming.
    if let Err(e) = c.psql(
        leader,
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('before failover')",
    ) {
        panic!("write on the primary: {e}");
    }
    wait("the row on the replica", Duration::from_secs(30), || {
        c.psql(replica, "SELECT v FROM t")
            .ok()
            .filter(|v| v == "before failover")
    });
    let state = rest_json(c.nodes[replica].rest, "/patroni").unwrap();
    assert_eq!(state["state"], "running", "{state}");
    assert_eq!(state["role"], "replica", "{state}");
    wait(
        "the primary reports a streaming replica",
        Duration::from_secs(20),
        || {
            let p = rest_json(c.nodes[leader].rest, "/patroni")?;
            p["replication"]
                .as_array()?
                .iter()
                .any(|r| {
                    r["application_name"] == names[replica].as_str() && r["state"] == "streaming"
                })
                .then_some(())
        },
    );

    // register_service: each node in tomo's catalog under `<scope>/<name>`,
    // tagged with its role, its HTTP check on `/<role>` of its REST API
    // passing. `?tag=primary` (what DNS's primary.tomo-pg.service.consul
    // answers) is the primary alone.
    let ids = [
        format!("{SCOPE}/{}", names[0]),
        format!("{SCOPE}/{}", names[1]),
    ];
    wait(
        "both services passing in tomo's catalog",
        Duration::from_secs(30),
        || {
            let s = c.passing_services(None);
            let tagged = |i: usize, role: &str| {
                s.iter()
                    .any(|(id, tags)| *id == ids[i] && tags.iter().any(|t| t == role))
            };
            (s.len() == 2
                && tagged(leader, "master")
                && tagged(leader, "primary")
                && tagged(replica, "replica"))
            .then_some(())
        },
    );
    let primaries = c.passing_services(Some("primary"));
    assert_eq!(primaries.len(), 1, "{primaries:?}");
    assert_eq!(primaries[0].0, ids[leader]);

    // Steady state for TTL, past the point where the sessions, TTL/2 each
    // and created before the roles settled, would be gone even at twice
    // their TTL (Consul's multiplier) without renewals: only Patroni's
    // renewals every loop keep them, hence the lock and the member keys,
    // alive. The replica meanwhile blocks on the leader key between loops.
    // Nothing may move.
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(TTL) {
        if c.leader_key() != Some((names[leader].clone(), session.clone())) {
            panic!(
                "the leader key changed in a steady state: {:?}",
                c.leader_key()
            );
        }
        if roles(&c) != Some(leader) {
            panic!("the roles changed in a steady state");
        }
        thread::sleep(Duration::from_millis(500));
    }
    for n in &names {
        let m = json(
            c.consul_port,
            &format!("/v1/kv/service/{SCOPE}/members/{n}"),
        );
        assert!(m.is_some(), "{n}'s member key expired in a steady state");
    }

    // A graceful stop of the primary's Patroni: it stops postgres, deletes
    // the leader key, and the replica, watching that key, takes the lock
    // and is promoted.
    let stopped_at = Instant::now();
    c.stop_node(leader);
    let (new_leader, old) = (replica, leader);
    wait(
        "the replica promoted (`/primary` 200)",
        Duration::from_secs(45),
        || (rest_status(c.nodes[new_leader].rest, "/primary") == Some(200)).then_some(()),
    );
    eprintln!(
        "{} is primary {:?} after the stop began",
        names[new_leader],
        stopped_at.elapsed()
    );
    wait(
        "the leader key names the new primary",
        Duration::from_secs(10),
        || {
            c.leader_key()
                .filter(|(n, s)| *n == names[new_leader] && !s.is_empty())
        },
    );
    // It takes writes, after the ones it had replicated.
    wait(
        "a write on the new primary",
        Duration::from_secs(30),
        || {
            c.psql(new_leader, "INSERT INTO t VALUES ('after failover')")
                .ok()
        },
    );
    let rows = c
        .psql(new_leader, "SELECT string_agg(v, ',' ORDER BY v) FROM t")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows, "after failover,before failover");
    // The stopped node deregistered its service (a GET with the `/` of
    // its ID in the path); the new primary re-registered as primary.
    wait(
        "the stopped node's service deregistered",
        Duration::from_secs(20),
        || (c.catalog_ids() == [ids[new_leader].clone()]).then_some(()),
    );
    wait(
        "the new primary tagged primary",
        Duration::from_secs(30),
        || {
            let p = c.passing_services(Some("primary"));
            (p.len() == 1 && p[0].0 == ids[new_leader]).then_some(())
        },
    );

    // The old primary comes back as a replica of the new one, and gets
    // the row written while it was away.
    c.start_node(old);
    wait(
        "the old primary back as a replica",
        Duration::from_secs(60),
        || (roles(&c) == Some(new_leader)).then_some(()),
    );
    wait(
        "the new row on the rejoined node",
        Duration::from_secs(30),
        || {
            c.psql(old, "SELECT count(*) FROM t WHERE v = 'after failover'")
                .ok()
                .filter(|v| v == "1")
        },
    );
    assert_eq!(
        c.leader_key().map(|(n, _)| n),
        Some(names[new_leader].clone()),
        "the rejoined node did not take the lock"
    );

    // A crash of the primary (Patroni and postgres killed at once, as when
    // its machine dies): nobody releases the lock, so it goes only when
    // tomo invalidates the session, which deletes the leader key
    // (`behavior=delete`); then the survivor takes it. Not before the
    // session's TTL (TTL/2) since its last renewal, at most a loop before
    // the crash; not long after twice that (the wait's limit).
    let crashed_at = Instant::now();
    c.nodes[new_leader].kill();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", c.nodes[new_leader].pg)).is_err(),
        "the crashed node's postgres still listens"
    );
    let survivor = old;
    wait(
        "the survivor promoted after the crash",
        Duration::from_secs(TTL + 25),
        || (rest_status(c.nodes[survivor].rest, "/primary") == Some(200)).then_some(()),
    );
    let took = crashed_at.elapsed();
    eprintln!("{} is primary {took:?} after the crash", names[survivor]);
    assert!(
        took >= Duration::from_secs(TTL / 2 - LOOP_WAIT - 1),
        "the crashed primary's lock went after {took:?}, before its session's TTL"
    );
    wait(
        "the leader key names the survivor",
        Duration::from_secs(10),
        || {
            c.leader_key()
                .filter(|(n, s)| *n == names[survivor] && !s.is_empty())
        },
    );
    wait("a write on the survivor", Duration::from_secs(30), || {
        c.psql(survivor, "INSERT INTO t VALUES ('after crash')")
            .ok()
    });
    let rows = c
        .psql(survivor, "SELECT string_agg(v, ',' ORDER BY v) FROM t")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows, "after crash,after failover,before failover");
    // The crashed node's service stays (nothing deregistered it) but its
    // check fails: `?tag=primary&passing` is the survivor alone.
    wait(
        "the survivor the only passing primary",
        Duration::from_secs(30),
        || {
            let p = c.passing_services(Some("primary"));
            (p.len() == 1 && p[0].0 == ids[survivor]).then_some(())
        },
    );

    stop.store(true, Ordering::Relaxed);
    sampling.join().unwrap();
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    eprintln!("{} samples over {:?}", samples.len(), t0.elapsed());

    // Never two primaries at once.
    if let Some(s) = samples.iter().find(|s| s.primary == [Some(200), Some(200)]) {
        panic!("both nodes answered 200 on /primary at {:?}", s.at - t0);
    }
    // Each node was seen as primary by the sampler (it did look).
    for (i, n) in names.iter().enumerate() {
        assert!(
            samples.iter().any(|s| s.primary[i] == Some(200)),
            "the sampler never saw {n} as primary"
        );
    }
    // The leader key never named a node that was not primary for much
    // longer than the TTL: a lock that outlived its holder would. The
    // crashed primary's name stays until its session, TTL/2, is
    // invalidated at twice that (Consul's multiplier) after its last
    // renewal; the 5 s are for the sampler and Patroni's loop. (Other
    // spans are short: bootstrap and promotion take the key before
    // `/primary` says so, a stopping primary stops postgres first.)
    let mut span: Option<(String, Instant)> = None;
    for s in &samples {
        let stale = s.leader.as_ref().filter(|l| {
            let i = names.iter().position(|n| n == *l);
            i.is_none_or(|i| s.primary[i] != Some(200))
        });
        match (stale, &span) {
            (Some(l), Some((held, since))) if l == held => {
                if s.at - *since > Duration::from_secs(TTL + 5) {
                    panic!(
                        "the leader key named {l} for {:?} while it was not primary",
                        s.at - *since
                    );
                }
            }
            (Some(l), _) => span = Some((l.clone(), s.at)),
            (None, _) => span = None,
        }
    }
    eprintln!("done in {:?}", t0.elapsed());
}
