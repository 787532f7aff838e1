//! `tomo agent`, `tomo demo` and the agent clients `tomo members`,
//! `tomo rtt` and `tomo info`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::Value;

use crate::agent::link::LinkEmulator;
use crate::agent::{Agent, AgentConfig, WanConfig};
use crate::dataset::Matrix;
use crate::vivaldi::Coordinate;

/// `tomo agent`: Consul's flag names (one dash or two).
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Node name [default: the host name, or `tomo-dev` with -dev].
    #[arg(long)]
    node: Option<String>,
    /// Datacenter.
    #[arg(long, default_value = "dc1")]
    datacenter: String,
    /// Address gossip binds to.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Address announced to other members [default: the bind address; 127.0.0.1 with -dev].
    #[arg(long)]
    advertise: Option<IpAddr>,
    /// Address the HTTP API binds to.
    #[arg(long, default_value = "127.0.0.1")]
    client: IpAddr,
    /// HTTP API port.
    #[arg(long, default_value_t = 8500)]
    http_port: u16,
    /// Gossip (Serf LAN) UDP port.
    #[arg(long, default_value_t = 8301)]
    serf_lan_port: u16,
    /// DNS port, UDP and TCP on the -client address [default: 8600, with
    /// -dev too]; 0 (or Consul's -1) turns the DNS interface off.
    #[arg(long, allow_negative_numbers = true)]
    dns_port: Option<i32>,
    /// The configuration file's `dns_config` (TTLs, `udp_answer_limit`,
    /// `only_passing`, `enable_truncate`, ...).
    #[arg(skip)]
    dns_config: Option<Value>,
    /// Join these members at start (host:port; repeatable).
    #[arg(long)]
    join: Vec<String>,
    /// Keep trying to join these until one answers (repeatable).
    #[arg(long)]
    retry_join: Vec<String>,
    /// Servers: WAN gossip (Serf WAN) UDP port, where the servers of every
    /// datacenter meet [default: 8302; ephemeral with -dev]; -1 disables
    /// the WAN pool.
    #[arg(long, allow_negative_numbers = true)]
    serf_wan_port: Option<i32>,
    /// Servers: join these WAN members (another datacenter's servers,
    /// host:port of their Serf WAN port) at start (repeatable).
    #[arg(long)]
    join_wan: Vec<String>,
    /// Servers: keep trying to join these WAN members until one answers.
    #[arg(long)]
    retry_join_wan: Vec<String>,
    /// Servers: address announced to the other datacenters [default: -advertise].
    #[arg(long)]
    advertise_wan: Option<IpAddr>,
    /// Servers: WAN probe interval (tomo; Consul's WAN pool probes every 5s).
    #[arg(long, default_value = "5s")]
    wan_probe_interval: String,
    /// Data directory (created if missing).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Configuration file, JSON or HCL as Consul's (node_name, datacenter,
    /// data_dir, bind_addr, client_addr, ports.http, ports.serf_lan,
    /// start_join, retry_join).
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Development mode: loopback addresses, no data directory needed.
    #[arg(long)]
    dev: bool,
    /// Run a registry server (Raft member) in this agent; its log and
    /// snapshots go under -data-dir.
    #[arg(long)]
    server: bool,
    /// Servers expected before the Raft group is initialized: once gossip
    /// shows this many servers (-join them to each other) and none is in a
    /// group yet, the one with the lowest node name initializes it with
    /// all of them, exactly once. Servers started later without it join
    /// the existing group. 1: a single server initializing itself.
    #[arg(long)]
    bootstrap_expect: Option<u32>,
    /// Server RPC (Raft) TCP port [default: 8300; ephemeral with -dev].
    #[arg(long)]
    server_port: Option<u16>,
    /// Log entries between snapshots; the log is compacted behind each
    /// (Consul's `raft_snapshot_threshold`).
    #[arg(long, default_value_t = 16384)]
    raft_snapshot_threshold: u64,
    /// Log entries kept behind a snapshot so that a slow follower catches
    /// up from the log, not a whole snapshot (Consul's `raft_trailing_logs`).
    #[arg(long, default_value_t = 10240)]
    raft_trailing_logs: u64,
    /// Log level (trace, debug, info, warn, err).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Probe interval (tomo; LAN default 1s; e.g. 200ms for tests).
    #[arg(long, default_value = "1s")]
    probe_interval: String,
    /// Emulate link latencies from this dataset (tomo; one-way = RTT / 2).
    #[arg(long, requires_all = ["link_index", "link_peers"])]
    link_dataset: Option<PathBuf>,
    /// This agent's row in --link-dataset.
    #[arg(long)]
    link_index: Option<usize>,
    /// Gossip addresses of the dataset's nodes, in row order (comma-separated).
    #[arg(long, value_delimiter = ',')]
    link_peers: Vec<SocketAddr>,
}

/// `tomo demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// RTT matrix whose latencies the agents' links get (ltm, triples with --format).
    #[arg(long)]
    dataset: PathBuf,
    /// Agents to start [default: every node of the dataset, at most 50].
    #[arg(long)]
    nodes: Option<usize>,
    /// Probe interval.
    #[arg(long, default_value = "1s")]
    probe_interval: String,
    /// Agent i serves HTTP on this port + i [default: ephemeral ports].
    #[arg(long)]
    http_port_base: Option<u16>,
    /// Stop after this long (e.g. 60s) [default: run until Ctrl-C].
    #[arg(long)]
    duration: Option<String>,
    /// Seconds between table refreshes.
    #[arg(long, default_value_t = 2)]
    every: u64,
}

/// `tomo members`, `tomo rtt`, `tomo info`: the agent to ask.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The agent's HTTP address.
    #[arg(long, env = "CONSUL_HTTP_ADDR", default_value = "127.0.0.1:8500")]
    http_addr: String,
}

/// Parses `500ms`, `2s`, `10m`, `1h` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow!("invalid duration {s:?} (e.g. 500ms, 2s, 10m, 1h)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => bail!("invalid duration unit in {s:?} (ms, s, m, h)"),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        bail!("invalid duration {s:?}");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_addrs(list: &[String], default_port: u16) -> Result<Vec<SocketAddr>> {
    list.iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<IpAddr>()
                        .map(|ip| SocketAddr::new(ip, default_port))
                })
                .with_context(|| format!("invalid address {s:?} (want host:port)"))
        })
        .collect()
}

/// Reads a Consul configuration file: HCL for `.hcl`, JSON for `.json`,
/// and for any other name JSON first, then HCL.
fn read_config_file(path: &std::path::Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let hcl = |t: &str| -> Result<Value> {
        hcl::from_str::<Value>(t).with_context(|| format!("{}: invalid HCL", path.display()))
    };
    match ext {
        "hcl" => hcl(&text),
        "json" => {
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
        }
        _ => serde_json::from_str(&text).or_else(|_| {
            hcl(&text).with_context(|| format!("{}: neither JSON nor HCL", path.display()))
        }),
    }
}

/// Fields of a configuration file (JSON or HCL, Consul's keys), applied
/// under the flags.
fn apply_config_file(a: &mut AgentArgs, path: &std::path::Path) -> Result<()> {
    let v = read_config_file(path)?;
    if !v.is_object() {
        anyhow::bail!("{}: the configuration is not an object", path.display());
    }
    if let Some(n) = v["node_name"].as_str() {
        a.node.get_or_insert(n.to_string());
    }
    if let Some(d) = v["datacenter"].as_str() {
        a.datacenter = d.to_string();
    }
    if let Some(b) = v["bind_addr"].as_str() {
        a.bind = b.parse().with_context(|| format!("bind_addr {b:?}"))?;
    }
    if let Some(c) = v["client_addr"].as_str() {
        a.client = c.parse().with_context(|| format!("client_addr {c:?}"))?;
    }
    if let Some(d) = v["data_dir"].as_str() {
        a.data_dir.get_or_insert(PathBuf::from(d));
    }
    if let Some(p) = v["ports"]["http"].as_u64() {
        a.http_port = p as u16;
    }
    if let Some(p) = v["ports"]["serf_lan"].as_u64() {
        a.serf_lan_port = p as u16;
    }
    if let Some(p) = v["ports"]["dns"].as_i64() {
        a.dns_port.get_or_insert(p as i32);
    }
    if v["dns_config"].is_object() {
        a.dns_config = Some(v["dns_config"].clone());
    }
    if let Some(p) = v["ports"]["serf_wan"].as_i64() {
        a.serf_wan_port.get_or_insert(p as i32);
    }
    if let Some(ip) = v["advertise_addr_wan"].as_str() {
        a.advertise_wan.get_or_insert(
            ip.parse()
                .with_context(|| format!("advertise_addr_wan {ip:?}"))?,
        );
    }
    if let Some(p) = v["ports"]["server"].as_u64() {
        a.server_port.get_or_insert(p as u16);
    }
    if v["server"].as_bool() == Some(true) {
        a.server = true;
    }
    if let Some(n) = v["bootstrap_expect"].as_u64() {
        a.bootstrap_expect.get_or_insert(n as u32);
    }
    if let Some(n) = v["raft_snapshot_threshold"].as_u64() {
        a.raft_snapshot_threshold = n;
    }
    if let Some(n) = v["raft_trailing_logs"].as_u64() {
        a.raft_trailing_logs = n;
    }
    for (key, list) in [
        ("start_join", &mut a.join),
        ("retry_join", &mut a.retry_join),
        ("start_join_wan", &mut a.join_wan),
        ("retry_join_wan", &mut a.retry_join_wan),
    ] {
        if let Some(arr) = v[key].as_array() {
            list.extend(arr.iter().filter_map(|x| x.as_str().map(str::to_string)));
        }
    }
    Ok(())
}

fn load_matrix(path: &std::path::Path) -> Result<Matrix> {
    let mut m = super::load_matrix(path, "ltm", None)?;
    m.symmetrize();
    Ok(m)
}

/// This server's Raft node ID: kept in `<dir>/node-id` (made on first
/// start), so a restarted server rejoins its group as itself and no two
/// servers share one.
fn raft_id(dir: &std::path::Path) -> Result<u64> {
    let path = dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(t) => t
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|id| *id != 0)
            .with_context(|| {
                format!(
                    "{} is damaged (want a non-zero decimal Raft node ID, found {:?}); \
                     restore it or start over with an empty -data-dir",
                    path.display(),
                    t.trim()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Below 2^53, so JSON clients read it exactly.
            let id = rand::random::<u64>() % (1 << 53) + 1;
            std::fs::write(&path, format!("{id}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Runs an agent until SIGINT/SIGTERM, then leaves gracefully.
pub fn agent(mut a: AgentArgs) -> Result<()> {
    if let Some(p) = a.config_file.clone() {
        apply_config_file(&mut a, &p)?;
    }
    // Consul's rule (letters, digits, `-`, `_`), lowercased: WAN member
    // names are `<node>.<datacenter>`, so a dot would split them wrongly.
    if a.datacenter.is_empty()
        || !a
            .datacenter
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!(
            "-datacenter {:?}: use letters, digits, '-' and '_' only",
            a.datacenter
        );
    }
    a.datacenter = a.datacenter.to_ascii_lowercase();
    if let Some(d) = &a.data_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    } else if !a.dev {
        bail!("-data-dir is required (or use -dev)");
    }
    let bind_ip = if a.dev && a.bind.is_unspecified() {
        "127.0.0.1".parse()?
    } else {
        a.bind
    };
    let node = a.node.clone().unwrap_or_else(|| {
        if a.dev {
            "tomo-dev".into()
        } else {
            host_name()
        }
    });
    let advertise_ip = a.advertise.unwrap_or(if bind_ip.is_unspecified() {
        "127.0.0.1".parse()?
    } else {
        bind_ip
    });
    let probe_interval = parse_duration(&a.probe_interval)?;
    if probe_interval < Duration::from_millis(10) {
        bail!("-probe-interval must be at least 10ms");
    }
    let link = match (&a.link_dataset, a.link_index) {
        (Some(path), Some(i)) => {
            let m = load_matrix(path)?;
            if i >= m.n || a.link_peers.len() > m.n {
                bail!(
                    "--link-index {i} / {} peers do not fit a {}-node dataset",
                    a.link_peers.len(),
                    m.n
                );
            }
            let delays = a
                .link_peers
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != i && m.at(i, *k) > 0.0)
                .map(|(k, addr)| (*addr, Duration::from_secs_f64(m.at(i, k) / 2000.0)))
                .collect();
            Some(Arc::new(LinkEmulator::with_delays(delays)))
        }
        _ => None,
    };
    // -dev: a single server and agent, its Raft data in a fresh temporary
    // directory unless -data-dir says otherwise.
    let server = if a.server || a.dev {
        if a.dev && a.bootstrap_expect.is_some_and(|n| n > 1) {
            bail!("-dev is a single server: -bootstrap-expect cannot be more than 1");
        }
        let data = match &a.data_dir {
            Some(d) => d.join("raft"),
            None => std::env::temp_dir().join(format!(
                "tomo-dev-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            )),
        };
        let port = a.server_port.unwrap_or(if a.dev { 0 } else { 8300 });
        let id = if a.dev && a.data_dir.is_none() {
            1
        } else {
            raft_id(&data)?
        };
        let mut sc = crate::server::ServerConfig::new(id, SocketAddr::new(bind_ip, port), data);
        sc.snapshot_threshold = a.raft_snapshot_threshold.max(1);
        sc.trailing_logs = a.raft_trailing_logs;
        Some(sc)
    } else {
        None
    };
    let wan = match (&server, a.serf_wan_port) {
        (None, _) | (_, Some(-1)) => None,
        (Some(_), port) => {
            let port = match port {
                Some(p) => u16::try_from(p)
                    .map_err(|_| anyhow!("-serf-wan-port {p}: want 0..65535, or -1 (off)"))?,
                None if a.dev => 0,
                None => 8302,
            };
            let mut w = WanConfig::new(SocketAddr::new(bind_ip, port));
            let ip = a.advertise_wan.unwrap_or(advertise_ip);
            w.advertise = Some(SocketAddr::new(ip, port))
                .filter(|_| port != 0 && (!bind_ip.is_unspecified() || a.advertise_wan.is_some()));
            w.join = parse_addrs(&a.join_wan, 8302)?;
            w.retry_join = parse_addrs(&a.retry_join_wan, 8302)?;
            w.probe_interval = parse_duration(&a.wan_probe_interval)?;
            if w.probe_interval < Duration::from_millis(10) {
                bail!("-wan-probe-interval must be at least 10ms");
            }
            Some(w)
        }
    };
    if wan.is_none() && !(a.join_wan.is_empty() && a.retry_join_wan.is_empty()) {
        bail!("-join-wan and -retry-join-wan need a server (-server) with a WAN pool");
    }
    let dns = match a.dns_port.unwrap_or(8600) {
        0 | -1 => None,
        p => {
            let port = u16::try_from(p)
                .map_err(|_| anyhow!("-dns-port {p}: want 1..65535, or 0 (off)"))?;
            let mut d = crate::agent::dns::DnsConfig::new(SocketAddr::new(a.client, port));
            if let Some(v) = &a.dns_config {
                d.apply_consul_json(v)?;
            }
            Some(d)
        }
    };
    let dev_data = server
        .as_ref()
        .filter(|_| a.dev && a.data_dir.is_none())
        .map(|s| s.data_dir.clone());
    let cfg = AgentConfig {
        server,
        bootstrap: a.dev || a.bootstrap_expect == Some(1),
        bootstrap_expect: a.bootstrap_expect.unwrap_or(0),
        session_ttl_min: crate::agent::session::DEFAULT_TTL_MIN,
        deregister_critical_min: crate::agent::services::DEREGISTER_CRITICAL_MIN,
        node,
        datacenter: a.datacenter.clone(),
        bind: SocketAddr::new(bind_ip, a.serf_lan_port),
        advertise: Some(SocketAddr::new(advertise_ip, a.serf_lan_port))
            .filter(|_| !bind_ip.is_unspecified() || a.advertise.is_some()),
        http: SocketAddr::new(a.client, a.http_port),
        join: parse_addrs(&a.join, 8301)?,
        retry_join: parse_addrs(&a.retry_join, 8301)?,
        probe_interval,
        cluster_size: 16,
        seed: std::process::id() as u64,
        link,
        wan,
        dns,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = Agent::start(cfg).await?;
        eprintln!(
            "tomo agent {}: gossip on {}, HTTP on http://{} (log level {})",
            agent.shared.node, agent.gossip_addr, agent.http_addr, a.log_level
        );
        if let Some(d) = agent.dns_addr {
            eprintln!("tomo agent: DNS on {d} (UDP and TCP)");
        }
        let shared = agent.shared.clone();
        let registry = agent.registry.clone();
        let failed = async {
            match &registry {
                Some(r) => r.failed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            why = failed => {
                // Crash-only: a supervisor restarts the agent from its
                // data dir, which is what Raft recovers from.
                eprintln!("tomo agent: the registry server stopped ({why}); exiting");
                agent.abort();
                bail!("the registry server stopped: {why}");
            }
            _ = wait_for_signal() => {
                eprintln!("tomo agent: leaving");
                agent.shutdown().await;
            }
            _ = shared.left.notified() => {
                // Left through the API (`PUT /v1/agent/leave`): as Consul,
                // shut down once the goodbye has gone out.
                eprintln!("tomo agent: left the cluster, shutting down");
                agent.step_down().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                agent.abort();
            }
        }
        if let Some(d) = dev_data {
            // -dev keeps nothing.
            let _ = std::fs::remove_dir_all(d);
        }
        Ok::<(), anyhow::Error>(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tomo".into())
}

/// Starts N agents in this process with emulated links and prints a live
/// convergence table.
pub fn demo(a: DemoArgs) -> Result<()> {
    let m = load_matrix(&a.dataset)?;
    let n = a.nodes.unwrap_or(m.n.min(50));
    if n < 2 || n > m.n {
        bail!("--nodes must be between 2 and the dataset's {} nodes", m.n);
    }
    let probe_interval = parse_duration(&a.probe_interval)?;
    if probe_interval < Duration::from_millis(10) {
        bail!("--probe-interval must be at least 10ms");
    }
    // The probe timeout is half the interval: a link slower than that
    // always fails its direct probe, and its member is suspected over and
    // over. Say so, with the interval that would fit.
    let slowest = (0..n)
        .flat_map(|i| (0..n).map(move |k| (i, k)))
        .map(|(i, k)| m.at(i, k))
        .fold(0.0f64, f64::max);
    if slowest > 0.0 && probe_interval.as_secs_f64() * 1000.0 / 2.0 < slowest {
        eprintln!(
            "warning: the probe timeout ({:.0} ms, half of --probe-interval) is under the \
             slowest of these links ({slowest:.0} ms RTT): members will be suspected; \
             use --probe-interval {:.0}ms or more",
            probe_interval.as_secs_f64() * 500.0,
            (slowest * 2.0 / 100.0).ceil() * 100.0
        );
    }
    let stop = a.duration.as_deref().map(parse_duration).transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let links: Vec<Arc<LinkEmulator>> =
            (0..n).map(|_| Arc::new(LinkEmulator::default())).collect();
        let mut agents = Vec::with_capacity(n);
        for (i, link) in links.iter().enumerate() {
            let mut cfg = AgentConfig::dev(&format!("node-{i}"));
            if let Some(base) = a.http_port_base {
                cfg.http.set_port(
                    base.checked_add(i as u16)
                        .ok_or_else(|| anyhow!("--http-port-base too high"))?,
                );
            }
            cfg.probe_interval = probe_interval;
            cfg.cluster_size = n as u32;
            cfg.seed = i as u64 + 1;
            cfg.link = Some(link.clone());
            agents.push(Agent::start(cfg).await?);
        }
        for (i, link) in links.iter().enumerate() {
            for (k, other) in agents.iter().enumerate() {
                if k != i && m.at(i, k) > 0.0 {
                    link.set_delay(
                        other.gossip_addr,
                        Duration::from_secs_f64(m.at(i, k) / 2000.0),
                    );
                }
            }
        }
        let seed = agents[0].gossip_addr;
        for ag in &agents[1..] {
            ag.shared.join(crate::agent::Pool::Lan, seed).await?;
        }
        println!(
            "{n} agents (one-way link delay = RTT / 2 from {}):",
            a.dataset.display()
        );
        for ag in &agents {
            println!(
                "  {}  http://{}  gossip {}",
                ag.shared.node, ag.http_addr, ag.gossip_addr
            );
        }
        println!(
            "try: curl -s http://{}/v1/coordinate/nodes?pretty",
            agents[0].http_addr
        );
        println!(
            "{:>7}  {:>8}  {:>14}  {:>14}",
            "time", "members", "median rel err", "p90 rel err"
        );
        let start = Instant::now();
        loop {
            let sleep = tokio::time::sleep(Duration::from_secs(a.every.max(1)));
            tokio::select! {
                _ = sleep => {}
                _ = tokio::signal::ctrl_c() => break,
            }
            let (members, med, p90) = demo_figures(&agents, &m);
            println!(
                "{:>6.0}s  {:>8}  {:>14.4}  {:>14.4}",
                start.elapsed().as_secs_f64(),
                members,
                med,
                p90
            );
            if stop.is_some_and(|d| start.elapsed() >= d) {
                break;
            }
        }
        for ag in agents {
            ag.shutdown().await;
        }
        Ok::<(), anyhow::Error>(())
    })
}

/// Smallest member count any agent sees (itself included) and the
/// relative error of estimates between agents' published coordinates.
fn demo_figures(agents: &[Agent], m: &Matrix) -> (usize, f64, f64) {
    let coords: Vec<Coordinate> = agents
        .iter()
        .map(|a| {
            a.shared
                .gossip
                .lock()
                .expect("not poisoned")
                .engine()
                .published()
                .clone()
        })
        .collect();
    let members = agents
        .iter()
        .map(|a| {
            a.shared
                .gossip
                .lock()
                .expect("not poisoned")
                .members()
                .count()
                + 1
        })
        .min()
        .unwrap_or(0);
    let mut errs = Vec::new();
    for i in 0..coords.len() {
        for j in i + 1..coords.len() {
            let act = m.at(i, j);
            if act > 0.0 {
                errs.push((coords[i].distance_to(&coords[j]) * 1000.0 - act).abs() / act);
            }
        }
    }
    errs.sort_by(f64::total_cmp);
    let q = |p: f64| crate::stats::quantile_sorted(&errs, p);
    (members, q(0.5), q(0.9))
}

/// A minimal HTTP/1.1 GET against the agent: (status, body).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let addr = addr.trim_start_matches("http://");
    let mut s =
        TcpStream::connect(addr).with_context(|| format!("cannot reach the agent at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP reply"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP status line"))?;
    Ok((status, body.to_string()))
}

fn get_json(c: &ClientArgs, path: &str) -> Result<Value> {
    let (status, body) = http_get(&c.http_addr, path)?;
    if status != 200 {
        bail!("{path}: HTTP {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{path}: not JSON"))
}

/// `tomo members`: the agent's view of the cluster, like `consul members`.
pub fn members(c: &ClientArgs) -> Result<()> {
    let v = get_json(c, "/v1/agent/members")?;
    println!("{:<20} {:<22} {:<8} DC", "Node", "Address", "Status");
    for m in v.as_array().into_iter().flatten() {
        let status = match m["Status"].as_u64() {
            Some(1) => "alive",
            Some(2) => "leaving",
            Some(3) => "left",
            Some(4) => "failed",
            _ => "none",
        };
        println!(
            "{:<20} {:<22} {:<8} {}",
            m["Name"].as_str().unwrap_or(""),
            format!("{}:{}", m["Addr"].as_str().unwrap_or(""), m["Port"]),
            status,
            m["Tags"]["dc"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Prints the agent's p50/p99 estimate for a pair (`/v1/rtt`).
fn print_distribution(c: &ClientArgs, from: &str, to: &str) -> Result<()> {
    let enc = |s: &str| {
        s.replace('%', "%25")
            .replace('&', "%26")
            .replace(' ', "%20")
    };
    let e = get_json(c, &format!("/v1/rtt?from={}&to={}", enc(from), enc(to)))?;
    let ms = |k: &str| e[k].as_f64().unwrap_or(f64::NAN) * 1000.0;
    println!(
        "  p50 {:.3} ms, p99 {:.3} ms ({}, {} samples, confidence {:.2})",
        ms("P50"),
        ms("P99"),
        e["Source"].as_str().unwrap_or("?"),
        e["Samples"],
        e["Confidence"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

/// `tomo rtt N1 [N2]`: the estimate between two nodes' LAN coordinates,
/// printed as `consul rtt` does, then tomo's p50/p99 for the pair.
/// `dc:NAME` on both sides: the datacenters' p50/p99 (WAN).
pub fn rtt(c: &ClientArgs, n1: &str, n2: Option<&str>) -> Result<()> {
    if n1.starts_with("dc:") || n2.is_some_and(|n| n.starts_with("dc:")) {
        let n2 = match n2 {
            Some(n) => n.to_string(),
            None => format!(
                "dc:{}",
                get_json(c, "/v1/agent/self")?["Config"]["Datacenter"]
                    .as_str()
                    .unwrap_or("")
            ),
        };
        println!("Estimated {n1} <-> {n2} (using WAN coordinates and probes):");
        return print_distribution(c, n1, &n2);
    }
    let n2 = match n2 {
        Some(n) => n.to_string(),
        None => get_json(c, "/v1/agent/self")?["Config"]["NodeName"]
            .as_str()
            .ok_or_else(|| anyhow!("agent/self has no Config.NodeName"))?
            .to_string(),
    };
    let table = get_json(c, "/v1/coordinate/nodes")?;
    let find = |name: &str| -> Result<Coordinate> {
        let e = table
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["Node"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .ok_or_else(|| anyhow!("could not find a coordinate for node {name:?}"))?;
        Ok(serde_json::from_value(e["Coord"].clone())?)
    };
    let (a, b) = (find(n1)?, find(&n2)?);
    if a.vec.len() != b.vec.len() {
        bail!("coordinates of {n1} and {n2} have different dimensions");
    }
    println!(
        "Estimated {n1} <-> {n2} rtt: {:.3} ms (using LAN coordinates)",
        a.distance_to(&b) * 1000.0
    );
    print_distribution(c, n1, &n2)
}

/// `tomo rtt -wan N1.DC1 [N2.DC2]`: the estimate between two servers'
/// WAN coordinates, printed as `consul rtt -wan` does.
pub fn rtt_wan(c: &ClientArgs, n1: &str, n2: Option<&str>) -> Result<()> {
    let n2 = match n2 {
        Some(n) => n.to_string(),
        None => {
            let me = get_json(c, "/v1/agent/self")?;
            format!(
                "{}.{}",
                me["Config"]["NodeName"].as_str().unwrap_or(""),
                me["Config"]["Datacenter"].as_str().unwrap_or("")
            )
        }
    };
    let table = get_json(c, "/v1/coordinate/datacenters")?;
    let find = |name: &str| -> Result<Coordinate> {
        let (node, dc) = name
            .rsplit_once('.')
            .ok_or_else(|| anyhow!("{name:?}: WAN names are <node>.<datacenter>"))?;
        let e = table
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["Datacenter"].as_str() == Some(dc))
            .flat_map(|d| d["Coordinates"].as_array().into_iter().flatten())
            .find(|e| {
                e["Node"]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(node))
            })
            .ok_or_else(|| anyhow!("could not find a WAN coordinate for {name:?}"))?;
        Ok(serde_json::from_value(e["Coord"].clone())?)
    };
    let (a, b) = (find(n1)?, find(&n2)?);
    if a.vec.len() != b.vec.len() {
        bail!("coordinates of {n1} and {n2} have different dimensions");
    }
    println!(
        "Estimated {n1} <-> {n2} rtt: {:.3} ms (using WAN coordinates)",
        a.distance_to(&b) * 1000.0
    );
    Ok(())
}

/// `tomo info`: the agent's self description.
pub fn info(c: &ClientArgs) -> Result<()> {
    let v = get_json(c, "/v1/agent/self")?;
    let mut keys: HashMap<&str, String> = HashMap::new();
    keys.insert(
        "node",
        v["Config"]["NodeName"].as_str().unwrap_or("").into(),
    );
    keys.insert(
        "datacenter",
        v["Config"]["Datacenter"].as_str().unwrap_or("").into(),
    );
    keys.insert(
        "version",
        v["Config"]["Version"].as_str().unwrap_or("").into(),
    );
    println!("agent:");
    for k in ["node", "datacenter", "version"] {
        println!("\t{k} = {}", keys[k]);
    }
    println!("coordinate:");
    println!("\t{}", v["Coord"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: AgentArgs,
    }

    fn args() -> AgentArgs {
        Cli::parse_from(["agent"]).a
    }

    #[test]
    fn config_files_in_hcl_and_json_set_the_same_fields() {
        let dir = tempfile::TempDir::new().unwrap();
        let hcl = dir.path().join("agent.hcl");
        std::fs::write(
            &hcl,
            r#"
node_name  = "web-1"
datacenter = "east"
data_dir   = "/var/lib/tomo"
bind_addr  = "127.0.0.2"
ports {
  http     = 18500
  serf_lan = 18301
  server   = 18300
}
retry_join = ["127.0.0.1:8301", "127.0.0.3:8301"]
server = true
bootstrap_expect = 3
raft_snapshot_threshold = 500
raft_trailing_logs = 100
"#,
        )
        .unwrap();
        let json = dir.path().join("agent.conf");
        std::fs::write(
            &json,
            r#"{"node_name":"web-1","datacenter":"east","bind_addr":"127.0.0.2","data_dir":"/var/lib/tomo",
                "ports":{"http":18500,"serf_lan":18301,"server":18300},
                "retry_join":["127.0.0.1:8301","127.0.0.3:8301"],
                "server":true,"bootstrap_expect":3,
                "raft_snapshot_threshold":500,"raft_trailing_logs":100}"#,
        )
        .unwrap();
        for path in [&hcl, &json] {
            let mut a = args();
            apply_config_file(&mut a, path).unwrap();
            assert_eq!(a.node.as_deref(), Some("web-1"), "{}", path.display());
            assert_eq!(a.datacenter, "east");
            assert_eq!(
                a.data_dir.as_deref(),
                Some(std::path::Path::new("/var/lib/tomo"))
            );
            assert_eq!(a.bind, "127.0.0.2".parse::<IpAddr>().unwrap());
            assert_eq!((a.http_port, a.serf_lan_port), (18500, 18301));
            assert_eq!(a.retry_join, ["127.0.0.1:8301", "127.0.0.3:8301"]);
            assert!(a.server);
            assert_eq!((a.bootstrap_expect, a.server_port), (Some(3), Some(18300)));
            assert_eq!(
                (a.raft_snapshot_threshold, a.raft_trailing_logs),
                (500, 100)
            );
        }
        let bad = dir.path().join("bad.hcl");
        std::fs::write(&bad, "node_name = \"unterminated").unwrap();
        let err = format!("{:#}", apply_config_file(&mut args(), &bad).unwrap_err());
        assert!(err.contains("invalid HCL"), "{err}");
        let neither = dir.path().join("x.cfg");
        std::fs::write(&neither, "{{{").unwrap();
        let err = format!(
            "{:#}",
            apply_config_file(&mut args(), &neither).unwrap_err()
        );
        assert!(err.contains("neither JSON nor HCL"), "{err}");
        let list = dir.path().join("list.json");
        std::fs::write(&list, "[1]").unwrap();
        assert!(apply_config_file(&mut args(), &list).is_err());
    }
}
