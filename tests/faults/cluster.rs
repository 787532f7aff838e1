//! The servers under test: `tomo agent -server` processes on loopback, each
//! with its own data dir, ports, log file and partition file, and the
//! faults done to them (SIGKILL and restart, SIGSTOP and SIGCONT, block
//! files). Dropping a [`Cluster`] continues stopped servers and kills
//! every process, so a failing test leaves nothing behind.

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{free_tcp, free_udp};
use crate::http;

/// A group of `tomo` servers.
pub struct Cluster {
    /// Servers in the group.
    pub n: usize,
    /// HTTP API ports.
    pub http: Vec<u16>,
    /// Peer RPC (`-server-port`) ports: what block files name.
    pub rpc: Vec<u16>,
    gossip: Vec<u16>,
    children: Vec<Option<Child>>,
    stopped: Vec<bool>,
    /// Data dirs, logs and block files.
    pub dir: tempfile::TempDir,
    started: Instant,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.n {
            // A stopped process is continued first: it dies at once then,
            // and nothing is left stopped if a kill went astray.
            if self.stopped[i] {
                self.cont(i);
            }
            self.kill(i);
        }
    }
}

impl Cluster {
    /// Starts `n` servers expecting each other.
    pub fn start(n: usize) -> Cluster {
        let mut c = Cluster {
            n,
            http: (0..n).map(|_| free_tcp()).collect(),
            rpc: (0..n).map(|_| free_tcp()).collect(),
            gossip: (0..n).map(|_| free_udp()).collect(),
            children: (0..n).map(|_| None).collect(),
            stopped: vec![false; n],
            dir: tempfile::TempDir::new().expect("a temp dir"),
            started: Instant::now(),
        };
        c.set_blocks(&vec![Vec::new(); n]);
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    /// Server `i`'s log (stdout and stderr of every incarnation).
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("server-{i}.log"))
    }

    fn block_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("block-{i}"))
    }

    fn spawn(&mut self, i: usize) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("open the log");
        // A marker between incarnations.
        let _ = writeln!(
            &log,
            "==== harness: starting server-{i} at {:.3} s",
            self.started.elapsed().as_secs_f64()
        );
        // `TOMO_FAULT_BIN` pins another build (a long run then does not
        // pick up a rebuild of target/debug/tomo halfway).
        let bin =
            std::env::var_os("TOMO_FAULT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_tomo").into());
        let mut cmd = Command::new(bin);
        cmd.args([
            "agent",
            "-node",
            &format!("server-{i}"),
            "-bind",
            "127.0.0.1",
        ])
        .args(["-server", "-bootstrap-expect", &self.n.to_string()])
        .args(["-dns-port", "0", "-serf-wan-port", "0"])
        .args(["-serf-lan-port", &self.gossip[i].to_string()])
        .args(["-http-port", &self.http[i].to_string()])
        .args(["-server-port", &self.rpc[i].to_string()])
        .args(["-probe-interval", "500ms"])
        .args([
            "-data-dir",
            self.dir.path().join(format!("data-{i}")).to_str().unwrap(),
        ])
        .env("TOMO_FAULT_BLOCK_FILE", self.block_path(i))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the log"))
        .stderr(log);
        for j in (0..self.n).filter(|j| *j != i) {
            cmd.args(["-retry-join", &format!("127.0.0.1:{}", self.gossip[j])]);
        }
        self.children[i] = Some(cmd.spawn().expect("start tomo agent"));
    }

    /// Whether server `i` runs (not killed; perhaps stopped).
    pub fn is_running(&self, i: usize) -> bool {
        self.children[i].is_some()
    }

    /// Whether server `i` is SIGSTOPped.
    pub fn is_stopped(&self, i: usize) -> bool {
        self.stopped[i]
    }

    /// SIGKILLs server `i` (a crash: nothing is flushed or handed over).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped[i] = false;
    }

    /// Starts server `i` again from its data dir, on the same ports.
    pub fn restart(&mut self, i: usize) {
        if self.children[i].is_none() {
            self.spawn(i);
        }
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.children[i] {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} server-{i}");
        }
    }

    /// SIGSTOPs server `i`: it keeps its sockets but answers nothing.
    pub fn stop(&mut self, i: usize) {
        if self.children[i].is_some() && !self.stopped[i] {
            self.signal(i, "-STOP");
            self.stopped[i] = true;
        }
    }

    /// SIGCONTs server `i`.
    pub fn cont(&mut self, i: usize) {
        if self.stopped[i] {
            self.signal(i, "-CONT");
            self.stopped[i] = false;
        }
    }

    /// Sets who may not send to whom: server `i` opens no peer RPC to the
    /// servers in `blocks[i]`. Each file is replaced by a rename, so a
    /// server never reads half of one.
    pub fn set_blocks(&self, blocks: &[Vec<usize>]) {
        for (i, b) in blocks.iter().enumerate() {
            let text: String = b
                .iter()
                .map(|j| format!("127.0.0.1:{}\n", self.rpc[*j]))
                .collect();
            let tmp = self.dir.path().join(format!("block-{i}.tmp"));
            std::fs::write(&tmp, text).expect("write a block file");
            std::fs::rename(&tmp, self.block_path(i)).expect("rename a block file");
        }
    }

    /// The leader's index as server `i` reports it.
    pub fn leader_seen_by(&self, i: usize) -> Option<usize> {
        let v = http::get_json(self.http[i], "/v1/status/leader")?;
        let port: u16 = v.as_str()?.rsplit(':').next()?.parse().ok()?;
        self.rpc.iter().position(|p| *p == port)
    }

    /// Voters in server `i`'s Raft configuration.
    pub fn peers_seen_by(&self, i: usize) -> usize {
        http::get_json(self.http[i], "/v1/status/peers")
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0)
    }

    /// Waits until every server sees the same leader and `n` voters.
    pub fn wait_settled(&self, limit: Duration) -> Result<usize, String> {
        let t = Instant::now();
        loop {
            let leaders: Vec<Option<usize>> = (0..self.n).map(|i| self.leader_seen_by(i)).collect();
            let peers: Vec<usize> = (0..self.n).map(|i| self.peers_seen_by(i)).collect();
            if let Some(l) = leaders[0]
                && leaders.iter().all(|x| *x == Some(l))
                && peers.iter().all(|p| *p == self.n)
            {
                return Ok(l);
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "not settled after {limit:?}: leaders seen {leaders:?}, voters seen {peers:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
