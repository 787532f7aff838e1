//! `tomo bench kv`: KV write and linearizable-read throughput of a
//! three-server tomo cluster and of a three-member etcd cluster, started
//! side by side on loopback and driven the same way (the same number of
//! concurrent HTTP/1.1 keep-alive clients, the same keys and values, the
//! same spread over the members), so one run compares them on one
//! machine.
//!
//! tomo: `PUT /v1/kv/<key>` and `GET /v1/kv/<key>?consistent`. etcd (its
//! v3 JSON gateway): `POST /v3/kv/put` and `POST /v3/kv/range` (a range
//! is linearizable unless `serializable` is asked for). Both clusters
//! write every commit to disk before answering (redb's durable commit,
//! etcd's WAL fsync).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `tomo bench kv` options.
#[derive(Args, Debug)]
pub struct KvBenchArgs {
    /// How long each phase (PUT, then GET) runs per system.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Concurrent clients (each one keep-alive connection).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Value size, bytes.
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Distinct keys written and read.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Where clients send requests: every member in turn (followers
    /// forward to the leader), or the leader only.
    #[arg(long, value_enum, default_value_t = Spread::All)]
    to: Spread,
    /// The etcd binary (Debian: `etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Run tomo only.
    #[arg(long)]
    no_etcd: bool,
    /// Where the clusters keep their data [default: a temporary directory,
    /// removed afterwards].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// Which members clients talk to.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Spread {
    /// Clients spread over all members.
    All,
    /// Every client talks to the leader.
    Leader,
}

/// Child processes killed on drop.
pub(super) struct Procs(pub(super) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(super) fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 keep-alive connection.
pub(super) struct Conn {
    addr: SocketAddr,
    s: Option<TcpStream>,
    buf: Vec<u8>,
    /// The last answer's `X-Consul-Index`, if it had one.
    pub(super) index: Option<u64>,
}

impl Conn {
    pub(super) fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            s: None,
            buf: Vec::with_capacity(8192),
            index: None,
        }
    }

    /// Sends a request and reads the whole answer: (status, body).
    pub(super) async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        let r = self.try_request(method, path, body).await;
        if r.is_err() {
            self.s = None;
        }
        r
    }

    async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>)> {
        if self.s.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.s = Some(s);
        }
        let s = self.s.as_mut().expect("connected");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        s.write_all(&req).await?;
        self.buf.clear();
        // Headers.
        let end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("bad status line")?;
        let mut rest = self.buf[end + 4..].to_vec();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        self.index = header("x-consul-index:").and_then(|v| v.parse().ok());
        let body = if let Some(len) = header("content-length:") {
            let len: usize = len.parse().context("bad content-length")?;
            while rest.len() < len {
                let mut chunk = vec![0u8; len - rest.len()];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed");
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            rest.truncate(len);
            rest
        } else if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            // Read to the terminating chunk, then decode.
            while find(&rest, b"0\r\n\r\n").is_none() {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed");
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            dechunk(&rest)?
        } else {
            Vec::new()
        };
        Ok((status, body))
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let p = find(b, b"\r\n").context("bad chunk")?;
        let len = usize::from_str_radix(std::str::from_utf8(&b[..p])?.trim(), 16)?;
        if len == 0 {
            return Ok(out);
        }
        let start = p + 2;
        out.extend_from_slice(b.get(start..start + len).context("short chunk")?);
        b = &b[(start + len + 2).min(b.len())..];
    }
}

/// What a system under test is asked to do.
trait Target: Send + Sync {
    fn put(&self, key: &str, value: &str) -> (&'static str, String, Vec<u8>);
    fn get(&self, key: &str) -> (&'static str, String, Vec<u8>);
    /// Whether a PUT answer means the write was committed.
    fn put_ok(&self, status: u16, body: &[u8]) -> bool;
    /// Whether a GET answer carries the value.
    fn get_ok(&self, status: u16, body: &[u8]) -> bool;
}

struct Tomo;

impl Target for Tomo {
    fn put(&self, key: &str, value: &str) -> (&'static str, String, Vec<u8>) {
        (
            "PUT",
            format!("/v1/kv/bench/{key}"),
            value.as_bytes().to_vec(),
        )
    }
    fn get(&self, key: &str) -> (&'static str, String, Vec<u8>) {
        ("GET", format!("/v1/kv/bench/{key}?consistent"), Vec::new())
    }
    fn put_ok(&self, status: u16, body: &[u8]) -> bool {
        status == 200 && body.starts_with(b"true")
    }
    fn get_ok(&self, status: u16, _body: &[u8]) -> bool {
        status == 200
    }
}

struct Etcd;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl Target for Etcd {
    fn put(&self, key: &str, value: &str) -> (&'static str, String, Vec<u8>) {
        let body = json!({"key": b64(&format!("bench/{key}")), "value": b64(value)});
        ("POST", "/v3/kv/put".into(), body.to_string().into_bytes())
    }
    fn get(&self, key: &str) -> (&'static str, String, Vec<u8>) {
        let body = json!({"key": b64(&format!("bench/{key}"))});
        ("POST", "/v3/kv/range".into(), body.to_string().into_bytes())
    }
    fn put_ok(&self, status: u16, body: &[u8]) -> bool {
        status == 200 && find(body, b"\"header\"").is_some()
    }
    fn get_ok(&self, status: u16, body: &[u8]) -> bool {
        status == 200 && find(body, b"\"kvs\"").is_some()
    }
}

/// One phase's figures.
#[derive(Debug, Default)]
struct Phase {
    ok: u64,
    failed: u64,
    secs: f64,
    /// Latencies of successful requests, µs, sorted.
    lat: Vec<u32>,
}

impl Phase {
    fn json(&self) -> Value {
        let q = |p: f64| {
            if self.lat.is_empty() {
                return 0.0;
            }
            let i = ((self.lat.len() - 1) as f64 * p).round() as usize;
            self.lat[i] as f64 / 1000.0
        };
        json!({
            "ops_per_s": (self.ok as f64 / self.secs * 10.0).round() / 10.0,
            "ok": self.ok,
            "failed": self.failed,
            "p50_ms": q(0.5), "p99_ms": q(0.99),
        })
    }
}

/// Runs `clients` workers against `endpoints` for `dur`: PUTs when `write`.
async fn phase(
    target: Arc<dyn Target>,
    endpoints: &[SocketAddr],
    a: &KvBenchArgs,
    dur: Duration,
    write: bool,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let value: String = "v".repeat(a.value_size);
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let addr = endpoints[c % endpoints.len()];
        let (target, stop, value, keys) = (target.clone(), stop.clone(), value.clone(), a.keys);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut p = Phase::default();
            let mut k = c;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("{:06}", k % keys);
                k += 7919;
                let (m, path, body) = if write {
                    target.put(&key, &value)
                } else {
                    target.get(&key)
                };
                let t = Instant::now();
                match conn.request(m, &path, &body).await {
                    Ok((status, b))
                        if (write && target.put_ok(status, &b))
                            || (!write && target.get_ok(status, &b)) =>
                    {
                        p.ok += 1;
                        p.lat
                            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    _ => p.failed += 1,
                }
            }
            p
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Phase::default();
    for h in tasks {
        if let Ok(p) = h.await {
            all.ok += p.ok;
            all.failed += p.failed;
            all.lat.extend(p.lat);
        }
    }
    all.secs = t.elapsed().as_secs_f64();
    all.lat.sort_unstable();
    all
}

/// Polls until `f` is true or `limit` passes.
pub(super) async fn until<F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !f().await {
        if t.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Starts three tomo servers; returns them and (HTTP endpoints, leader's
/// index).
async fn start_tomo(dir: &Path) -> Result<(Procs, Vec<SocketAddr>, usize)> {
    let exe = std::env::current_exe()?;
    let gossip: Vec<u16> = (0..3).map(|_| free_udp_port()).collect::<Result<_>>()?;
    let http: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let rpc: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "agent",
            "-server",
            "-bootstrap-expect",
            "3",
            "-serf-wan-port",
            "0",
        ])
        .args(["-node", &format!("bench-{i}"), "-bind", "127.0.0.1"])
        .args(["-dns-port", "0"])
        .args(["-serf-lan-port", &gossip[i].to_string()])
        .args(["-http-port", &http[i].to_string()])
        .args(["-server-port", &rpc[i].to_string()])
        .args([
            "-data-dir",
            dir.join(format!("tomo-{i}")).to_str().unwrap_or("."),
        ])
        .args(["-retry-join", &format!("127.0.0.1:{}", gossip[(i + 1) % 3])])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        procs.0.push(cmd.spawn().context("starting tomo agent")?);
    }
    let endpoints: Vec<SocketAddr> = http
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let leader = Arc::new(std::sync::Mutex::new(None));
    until(
        "a tomo leader with 3 voters",
        Duration::from_secs(60),
        || {
            let (endpoints, leader, rpc) = (endpoints.clone(), leader.clone(), rpc.clone());
            async move {
                let mut seen = Vec::new();
                for e in &endpoints {
                    let mut c = Conn::new(*e);
                    let Ok((200, b)) = c.request("GET", "/v1/status/leader", b"").await else {
                        return false;
                    };
                    let Ok((200, p)) = c.request("GET", "/v1/status/peers", b"").await else {
                        return false;
                    };
                    let peers: Value = serde_json::from_slice(&p).unwrap_or(Value::Null);
                    if peers.as_array().map(|a| a.len()) != Some(3) {
                        return false;
                    }
                    seen.push(String::from_utf8_lossy(&b).trim_matches('"').to_string());
                }
                let l = seen[0]
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse::<u16>().ok());
                if seen.iter().all(|s| *s == seen[0])
                    && let Some(i) = l.and_then(|l| rpc.iter().position(|p| *p == l))
                {
                    *leader.lock().expect("not poisoned") = Some(i);
                    return true;
                }
                false
            }
        },
    )
    .await?;
    let l = leader.lock().expect("not poisoned").unwrap_or(0);
    Ok((procs, endpoints, l))
}

/// Starts a three-member etcd cluster; returns it and (client endpoints,
/// leader's index).
async fn start_etcd(bin: &Path, dir: &Path) -> Result<(Procs, Vec<SocketAddr>, usize)> {
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let peer: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_>>()?;
    let cluster: Vec<String> = (0..3)
        .map(|i| format!("e{i}=http://127.0.0.1:{}", peer[i]))
        .collect();
    let mut procs = Procs(Vec::new());
    for i in 0..3 {
        let mut cmd = Command::new(bin);
        cmd.args(["--name", &format!("e{i}")])
            .args([
                "--data-dir",
                dir.join(format!("etcd-{i}")).to_str().unwrap_or("."),
            ])
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", client[i]),
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peer[i]),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "tomo-bench"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        procs.0.push(
            cmd.spawn()
                .with_context(|| format!("starting {} (Debian: etcd-server)", bin.display()))?,
        );
    }
    let endpoints: Vec<SocketAddr> = client
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let leader = Arc::new(std::sync::Mutex::new(None));
    until("an etcd leader", Duration::from_secs(60), || {
        let (endpoints, leader) = (endpoints.clone(), leader.clone());
        async move {
            for (i, e) in endpoints.iter().enumerate() {
                let mut c = Conn::new(*e);
                let Ok((200, b)) = c.request("POST", "/v3/maintenance/status", b"{}").await else {
                    return false;
                };
                let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                let (me, l) = (&v["header"]["member_id"], &v["leader"]);
                if l.is_null() || l.as_str() == Some("0") {
                    return false;
                }
                if me == l {
                    *leader.lock().expect("not poisoned") = Some(i);
                }
            }
            leader.lock().expect("not poisoned").is_some()
        }
    })
    .await?;
    let l = leader.lock().expect("not poisoned").unwrap_or(0);
    Ok((procs, endpoints, l))
}

/// Fills the keys once (so reads find them), then runs both phases.
async fn measure(
    target: Arc<dyn Target>,
    endpoints: Vec<SocketAddr>,
    leader: usize,
    a: &KvBenchArgs,
    dur: Duration,
) -> Result<Value> {
    let endpoints = match a.to {
        Spread::All => endpoints,
        Spread::Leader => vec![endpoints[leader]],
    };
    let mut c = Conn::new(endpoints[0]);
    let value = "v".repeat(a.value_size);
    for k in 0..a.keys {
        let (m, path, body) = target.put(&format!("{k:06}"), &value);
        let (status, b) = c.request(m, &path, &body).await?;
        if !target.put_ok(status, &b) {
            bail!("filling key {k}: {status} {}", String::from_utf8_lossy(&b));
        }
    }
    let put = phase(target.clone(), &endpoints, a, dur, true).await;
    let get = phase(target, &endpoints, a, dur, false).await;
    Ok(json!({"put": put.json(), "get": get.json()}))
}

/// `tomo bench kv`.
pub fn kv(a: KvBenchArgs) -> Result<()> {
    let dur = super::agent_cmd::parse_duration(&a.duration)?;
    if a.clients == 0 || a.keys == 0 {
        bail!("--clients and --keys must be at least 1");
    }
    let tmp;
    let dir = match &a.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("tomo-bench-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        eprintln!("tomo bench kv: starting 3 tomo servers");
        let (procs, endpoints, leader) = start_tomo(&dir).await?;
        eprintln!(
            "tomo bench kv: tomo, {} clients for {:?} per phase",
            a.clients, dur
        );
        let tomo = measure(Arc::new(Tomo), endpoints, leader, &a, dur).await?;
        drop(procs);
        let etcd = if a.no_etcd {
            Value::Null
        } else {
            eprintln!("tomo bench kv: starting 3 etcd members");
            let (procs, endpoints, leader) = start_etcd(&a.etcd, &dir).await?;
            eprintln!("tomo bench kv: etcd");
            let v = measure(Arc::new(Etcd), endpoints, leader, &a, dur).await?;
            drop(procs);
            v
        };
        let ratio = |phase: &str| {
            let t = tomo[phase]["ops_per_s"].as_f64()?;
            let e = etcd[phase]["ops_per_s"].as_f64()?;
            (e > 0.0).then(|| (t / e * 100.0).round() / 100.0)
        };
        Ok::<Value, anyhow::Error>(json!({
            "params": {"duration_s": dur.as_secs_f64(), "clients": a.clients,
                       "value_size": a.value_size, "keys": a.keys,
                       "to": format!("{:?}", a.to).to_lowercase()},
            "tomo": tomo,
            "etcd": etcd,
            "ratio_put": ratio("put"),
            "ratio_get": ratio("get"),
        }))
    });
    if a.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", result?);
    Ok(())
}
