//! `tomo bench watchers`: many blocking queries on
//! `/v1/health/service/<s>?near=_agent` held against one agent, the way
//! Prometheus, consul-template and sidecars watch a service.
//!
//! It starts one `tomo agent -dev` (a single server) and a few client
//! agents, each registering one instance of the service, so that the
//! instances sit on nodes with real coordinates and `near=_agent` has
//! something to sort; more instances go in through the catalog on nodes of
//! their own. Then it opens `--watchers` keep-alive connections, each one
//! parked on a blocking query, and measures:
//!
//! - the agent's resident memory before and after the watchers park, per
//!   watcher (what the kernel keeps for the sockets is not in it);
//! - for each change to the service (a tag set on one instance), the time
//!   from sending the write to every watcher's answer: p50 and p99 over
//!   all answers, and when the last watcher heard;
//! - wake-ups without a change to the service: after each change it writes
//!   a KV key and registers an unrelated service, and counts the watchers
//!   that answer anyway (an answer with an unchanged payload wastes a
//!   round trip for every watcher, consul#4984 and PR#4720);
//! - the agent's CPU time per change.
//!
//! Prints one JSON line.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use super::bench_cmd::{Conn, Procs, free_port, free_udp_port, until};

/// `tomo bench watchers` options.
#[derive(Args, Debug)]
pub struct WatchBenchArgs {
    /// Concurrent blocking queries (each one keep-alive connection; this
    /// process and the agent each need an open file per watcher).
    #[arg(long, default_value_t = 10_000)]
    watchers: usize,
    /// Changes to the watched service, one after another.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Client agents, each with one instance of the service (nodes with
    /// coordinates, so `near=_agent` sorts).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Further instances registered through the catalog (nodes without
    /// coordinates; they make the answer the size of a real one).
    #[arg(long, default_value_t = 16)]
    instances: usize,
    /// How long to wait for every watcher to hear of one change.
    #[arg(long, default_value = "60s")]
    timeout: String,
    /// The tomo binary the agents run [default: this one]; another build
    /// (an earlier commit) compares against this one on the same machine.
    #[arg(long)]
    agent_bin: Option<std::path::PathBuf>,
}

/// Counters the watcher tasks share with the driver.
#[derive(Default)]
struct Board {
    /// Watchers that have their first answer and have sent the blocking
    /// query.
    parked: AtomicUsize,
    /// The change being waited for (0 before the first).
    change: AtomicUsize,
    /// When each change's write was acknowledged.
    t0: Mutex<Vec<Instant>>,
    /// Per change: seconds from the write to each watcher's answer.
    latencies: Mutex<Vec<Vec<f64>>>,
    /// Answers with a new index but no change to hear of.
    spurious: AtomicUsize,
    /// Answers that were not a JSON array of the expected length.
    bad: AtomicUsize,
    /// Failed requests (each retried).
    errors: AtomicUsize,
    stop: AtomicBool,
}

/// The agent's resident memory, bytes.
fn rss(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// The agent's CPU time (user + system), seconds.
fn cpu(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = s.rsplit_once(')').context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f
        .get(11)
        .zip(f.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .context("bad stat")?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// The soft open-files limit of this process (the agents inherit it).
fn open_files_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    s.lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    crate::stats::quantile_sorted(sorted, q)
}

fn ms(s: f64) -> f64 {
    (s * 1e5).round() / 100.0
}

async fn put(c: &mut Conn, path: &str, body: &Value) -> Result<()> {
    let (status, b) = c.request("PUT", path, body.to_string().as_bytes()).await?;
    if status != 200 {
        bail!("PUT {path}: {status} {}", String::from_utf8_lossy(&b));
    }
    Ok(())
}

/// One watcher: a first read, then blocking reads for ever.
async fn watch(
    addr: SocketAddr,
    path: String,
    expected: usize,
    board: Arc<Board>,
    opening: Arc<tokio::sync::Semaphore>,
) {
    let mut conn = Conn::new(addr);
    // At most so many watchers connect at once, so the listen backlog does
    // not overflow into SYN retries.
    let permit = opening.acquire_owned().await;
    let mut index = loop {
        match conn.request("GET", &path, b"").await {
            Ok((200, _)) if conn.index.is_some() => break conn.index.unwrap_or(0),
            _ => {
                board.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    drop(permit);
    board.parked.fetch_add(1, Ordering::Relaxed);
    let mut heard = board.change.load(Ordering::Acquire);
    while !board.stop.load(Ordering::Relaxed) {
        let blocking = format!("{path}&index={index}&wait=5m");
        let answer = conn.request("GET", &blocking, b"").await;
        let at = Instant::now();
        let body = match answer {
            Ok((200, body)) => body,
            _ => {
                board.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(new) = conn.index.filter(|i| *i != index) else {
            continue; // The wait ran out.
        };
        index = new;
        // An answer counts for change N only if it carries change N's tag:
        // a late wake-up from an earlier write must not pass for it.
        let change = board.change.load(Ordering::Acquire);
        let tag = format!("\"change-{change}\"");
        if change == heard || !body.windows(tag.len()).any(|w| w == tag.as_bytes()) {
            board.spurious.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        heard = change;
        // A cheap look at the answer; parsing every one would take the
        // machine's CPU from the agent being measured.
        if body.first() != Some(&b'[') || (new % 97 == 0 && !is_array_of(&body, expected)) {
            board.bad.fetch_add(1, Ordering::Relaxed);
        }
        let t0 = board.t0.lock().expect("not poisoned")[change - 1];
        board.latencies.lock().expect("not poisoned")[change - 1]
            .push(at.duration_since(t0).as_secs_f64());
    }
}

fn is_array_of(body: &[u8], n: usize) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        == Some(n)
}

/// `tomo bench watchers`.
pub fn watchers(a: WatchBenchArgs) -> Result<()> {
    let timeout = super::agent_cmd::parse_duration(&a.timeout)?;
    if a.watchers == 0 || a.changes == 0 {
        bail!("--watchers and --changes must be at least 1");
    }
    let need = a.watchers as u64 + 256;
    if let Some(limit) = open_files_limit()
        && limit < need
    {
        bail!(
            "{} watchers need about {need} open files in this process and in the agent; the limit is {limit} \
             (raise it with `ulimit -n {need}`)",
            a.watchers
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let v = rt.block_on(run(&a, timeout))?;
    println!("{v}");
    Ok(())
}

async fn run(a: &WatchBenchArgs, timeout: Duration) -> Result<Value> {
    let exe = match &a.agent_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?,
    };
    let dir = std::env::temp_dir().join(format!("tomo-bench-watchers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let v = measure(a, timeout, &exe, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    v
}

async fn measure(
    a: &WatchBenchArgs,
    timeout: Duration,
    exe: &std::path::Path,
    dir: &std::path::Path,
) -> Result<Value> {
    let gossip = free_udp_port()?;
    let http = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    let mut procs = Procs(Vec::new());
    let spawn = |args: Vec<String>| {
        Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tomo agent")
    };
    let common = |name: &str, gossip: u16, http: u16| -> Vec<String> {
        [
            "agent",
            "-node",
            name,
            "-bind",
            "127.0.0.1",
            "-dns-port",
            "0",
            "-probe-interval",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "-serf-lan-port".into(),
            gossip.to_string(),
            "-http-port".into(),
            http.to_string(),
            "-data-dir".into(),
            dir.join(name).display().to_string(),
        ])
        .collect()
    };
    let mut args = common("watch-server", gossip, http);
    args.extend(["-dev", "-serf-wan-port", "-1"].map(String::from));
    procs.0.push(spawn(args)?);
    let pid = procs.0[0].id();
    eprintln!(
        "tomo bench watchers: starting an agent and {} client agents",
        a.agents
    );
    until("a leader", Duration::from_secs(30), || async {
        let mut c = Conn::new(addr);
        matches!(c.request("GET", "/v1/status/leader", b"").await, Ok((200, b)) if b.len() > 2)
    })
    .await?;
    let mut clients = Vec::new();
    for i in 0..a.agents {
        let http = free_port()?;
        let mut args = common(&format!("watch-client-{i}"), free_udp_port()?, http);
        args.extend(["-retry-join".into(), format!("127.0.0.1:{gossip}")]);
        procs.0.push(spawn(args)?);
        clients.push(SocketAddr::from(([127, 0, 0, 1], http)));
    }
    for (i, c) in clients.iter().enumerate() {
        let body = json!({"Name": "web", "ID": format!("web-{i}"), "Port": 8000 + i});
        until("a client agent", Duration::from_secs(30), || async {
            put(&mut Conn::new(*c), "/v1/agent/service/register", &body)
                .await
                .is_ok()
        })
        .await?;
    }
    let mut ctl = Conn::new(addr);
    for i in 0..a.instances {
        let body = json!({"Node": format!("ext-{i}"), "Address": format!("10.1.{}.{}", i / 250, i % 250 + 1),
                          "Service": {"Service": "web", "ID": "web", "Port": 9000 + i}});
        put(&mut ctl, "/v1/catalog/register", &body).await?;
    }
    let expected = a.agents + a.instances;
    let path = "/v1/health/service/web?near=_agent".to_string();
    until(
        "every instance in the catalog and every agent's coordinate",
        Duration::from_secs(60),
        || async {
            let mut c = Conn::new(addr);
            let n = |b: &[u8]| {
                serde_json::from_slice::<Value>(b)
                    .ok()
                    .and_then(|v| v.as_array().map(Vec::len))
            };
            let ok_h = matches!(c.request("GET", &path, b"").await, Ok((200, b)) if n(&b) == Some(expected));
            let ok_c = matches!(c.request("GET", "/v1/coordinate/nodes", b"").await,
                                Ok((200, b)) if n(&b) == Some(a.agents + 1));
            ok_h && ok_c
        },
    )
    .await?;
    let (_, body) = ctl.request("GET", &path, b"").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_base = rss(pid)?;

    eprintln!("tomo bench watchers: parking {} watchers", a.watchers);
    let board = Arc::new(Board::default());
    let opening = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(a.watchers);
    for _ in 0..a.watchers {
        let (board, path, opening) = (board.clone(), path.clone(), opening.clone());
        tasks.push(tokio::spawn(watch(addr, path, expected, board, opening)));
    }
    until("every watcher parked", Duration::from_secs(300), || async {
        board.parked.load(Ordering::Relaxed) >= a.watchers
    })
    .await?;
    // Let the last blocking queries reach the agent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_parked = rss(pid)?;

    let mut heard_all = Vec::new();
    let mut cpu_per_change = Vec::new();
    let mut write_ms = Vec::new();
    for change in 1..=a.changes {
        board
            .latencies
            .lock()
            .expect("not poisoned")
            .push(Vec::with_capacity(a.watchers));
        let cpu0 = cpu(pid)?;
        let body = json!({"Node": "ext-0", "Address": "10.1.0.1",
                          "Service": {"Service": "web", "ID": "web", "Port": 9000, "Tags": [format!("change-{change}")]}});
        // The clock starts when the write is sent (its commit is part of
        // the time), and watchers must know of the change before any of
        // them can answer.
        let t0 = Instant::now();
        board.t0.lock().expect("not poisoned").push(t0);
        board.change.store(change, Ordering::Release);
        put(&mut ctl, "/v1/catalog/register", &body).await?;
        write_ms.push(t0.elapsed().as_secs_f64());
        let heard = || board.latencies.lock().expect("not poisoned")[change - 1].len();
        until("every watcher to hear of a change", timeout, || async {
            heard() >= a.watchers
        })
        .await?;
        cpu_per_change.push(cpu(pid)? - cpu0);
        // The last watcher's answer (the driver only polls the count).
        let last = board.latencies.lock().expect("not poisoned")[change - 1]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        heard_all.push(last);
        // Writes that do not touch the service: no watcher should answer.
        let before = board.spurious.load(Ordering::Relaxed);
        put(&mut ctl, "/v1/kv/bench/unrelated", &json!(change)).await?;
        let other = json!({"Node": "ext-other", "Address": "10.2.0.1",
                           "Service": {"Service": "other", "ID": "other", "Port": change}});
        put(&mut ctl, "/v1/catalog/register", &other).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let woke = board.spurious.load(Ordering::Relaxed) - before;
        eprintln!(
            "tomo bench watchers: change {change}: every watcher answered in {:.1} ms; {woke} woke without a change",
            heard_all.last().copied().unwrap_or(0.0) * 1e3
        );
    }
    board.stop.store(true, Ordering::Relaxed);
    let rss_after = rss(pid)?;
    // Watchers first, so that stopping the agents is not counted as
    // failed requests.
    for t in &tasks {
        t.abort();
    }
    drop(procs);

    let mut all: Vec<f64> = board
        .latencies
        .lock()
        .expect("not poisoned")
        .iter()
        .flatten()
        .copied()
        .collect();
    all.sort_by(f64::total_cmp);
    heard_all.sort_by(f64::total_cmp);
    let per_watcher = (rss_parked.saturating_sub(rss_base)) as f64 / a.watchers as f64;
    Ok(json!({
        "params": {"watchers": a.watchers, "agent_bin": exe.display().to_string(), "changes": a.changes, "instances": expected,
                   "agents_with_coordinates": a.agents + 1, "path": path},
        "answer_bytes": body.len(),
        "rss_base_mib": (rss_base as f64 / 1048576.0 * 10.0).round() / 10.0,
        "rss_parked_mib": (rss_parked as f64 / 1048576.0 * 10.0).round() / 10.0,
        "rss_after_mib": (rss_after as f64 / 1048576.0 * 10.0).round() / 10.0,
        "bytes_per_watcher": per_watcher.round(),
        "answer_ms": {"p50": ms(percentile(&all, 0.5)), "p99": ms(percentile(&all, 0.99)),
                      "max": ms(all.last().copied().unwrap_or(f64::NAN))},
        "every_watcher_ms": {"p50": ms(percentile(&heard_all, 0.5)),
                             "max": ms(heard_all.last().copied().unwrap_or(f64::NAN))},
        "write_ms": ms(crate::stats::mean(&write_ms)),
        "agent_cpu_s_per_change": (crate::stats::mean(&cpu_per_change) * 1000.0).round() / 1000.0,
        "woke_without_change": board.spurious.load(Ordering::Relaxed),
        "bad_answers": board.bad.load(Ordering::Relaxed),
        "request_errors": board.errors.load(Ordering::Relaxed),
    }))
}
