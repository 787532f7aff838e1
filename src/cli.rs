//! The `tomo` command line: `tomo sim`, `tomo dataset info|gen`, `tomo plot`.
//!
//! This is the I/O shell around the sans-IO modules: it reads and writes
//! files, times the throughput loop, draws progress bars and runs sweeps on
//! a thread pool. `anyhow` is used here and only here.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Value, json};

mod agent_cmd;
mod bench_cmd;
mod failover_cmd;
mod watch_bench;

use crate::dataset::{self, Format, GeoOptions, Matrix, Series, Synthetic};
use crate::sim::gossip::{
    GossipSim, GossipSimConfig, Membership, Partition, parse_duration, parse_node_at,
    parse_node_delay,
};
use crate::sim::{
    Evaluation, JitterMode, NodeScore, PairScore, Select, SeriesTail, SimConfig, Simulation,
    TailEvaluation, TailPair,
};
use crate::tomography::TomographyConfig;
use crate::vivaldi::{self, Profile};

/// tomo: network coordinates, RTT tomography and geo-routing.
#[derive(Parser, Debug)]
#[command(name = "tomo", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `tomo bench` subcommands.
#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// KV PUT/s and `?consistent` GET/s of a 3-server tomo cluster and a
    /// 3-member etcd cluster on loopback, driven the same way; prints one
    /// JSON line with both and their ratio.
    Kv(bench_cmd::KvBenchArgs),
    /// Many blocking queries on `/v1/health/service/<s>?near=_agent` held
    /// against one agent: memory per watcher, the time from a change to
    /// every watcher's answer, and wake-ups without a change; prints one
    /// JSON line.
    Watchers(watch_bench::WatchBenchArgs),
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate the coordinate engine over a dataset and print one JSON line
    /// of accuracy figures (same keys as the serf peer harness).
    Sim(Box<SimArgs>),
    /// Simulate datacenter failover: labelled datacenters, instances failing and
    /// returning, each datacenter choosing where its answers come from by Vivaldi
    /// coordinates and the `routing` policy; scores the choices against the true RTTs.
    /// One JSON line per seed on stdout, a table on stderr.
    SimFailover(Box<failover_cmd::FailoverArgs>),
    /// Inspect or generate topology datasets.
    #[command(subcommand)]
    Dataset(DatasetCmd),
    /// Draw RTT figures from `tomo sim --out` directories or datasets.
    Plot(crate::plot::PlotArgs),
    /// Benchmarks against peers, started side by side on this machine.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run an agent: SWIM gossip over UDP feeding the coordinate engine, and
    /// the HTTP API. Takes Consul's flags (`-node`, `-bind`, `-join`, `-dev`, …).
    Agent(Box<agent_cmd::AgentArgs>),
    /// Start N agents in this process whose links get a dataset's latencies,
    /// and watch their coordinates converge.
    Demo(agent_cmd::DemoArgs),
    /// List the cluster's members as the local agent sees them.
    Members(agent_cmd::ClientArgs),
    /// Estimated RTT between two nodes from their coordinates (`consul rtt`).
    Rtt {
        /// First node (`<node>.<datacenter>` with -wan).
        node1: String,
        /// Second node [default: the agent's own].
        node2: Option<String>,
        /// Use the servers' WAN coordinates; names are `<node>.<datacenter>`.
        #[arg(long)]
        wan: bool,
        #[command(flatten)]
        client: agent_cmd::ClientArgs,
    },
    /// The local agent's configuration and coordinate.
    Info(agent_cmd::ClientArgs),
}

/// Consul spells long flags with one dash (`-node`, `-retry-join`): accept
/// that by doubling the dash of any `-word` argument of two or more letters.
fn normalize_args(args: impl Iterator<Item = String>) -> Vec<String> {
    args.enumerate()
        .map(|(i, a)| {
            let single = a.len() > 2
                && a.starts_with('-')
                && !a.starts_with("--")
                && a[1..].starts_with(|c: char| c.is_ascii_alphabetic());
            if i > 0 && single { format!("-{a}") } else { a }
        })
        .collect()
}

#[derive(Subcommand, Debug)]
enum DatasetCmd {
    /// Print nodes, missing fraction, RTT quantiles and TIV fraction (JSON).
    Info {
        /// Matrix file (`ltm v1`, `.gz`, series, triples or King-style).
        file: PathBuf,
        /// Input format: ltm (also dense/king) or triples.
        #[arg(long, default_value = "ltm")]
        format: String,
        /// Multiply values by this to get ms (default: from `# units:`, else 1).
        #[arg(long)]
        scale: Option<f64>,
        /// Random triples sampled for the TIV fraction.
        #[arg(long, default_value_t = 100_000)]
        triples: usize,
        /// Seed for the TIV sample.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Generate a synthetic topology and write it as `ltm v1`.
    Gen {
        /// line | grid | split | circle | random (serf's phantom shapes) | geo.
        kind: String,
        /// Number of nodes (default: serf's phantom sizes, geo 300).
        #[arg(long)]
        nodes: Option<usize>,
        /// Output file (`.gz` to compress).
        #[arg(short, long)]
        output: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// geo: also write this many jitter slices to OUTPUT's `.series.ltm.gz` sibling.
        #[arg(long, default_value_t = 0)]
        slices: usize,
        /// geo: log-sd of per-pair route inflation (TIVs).
        #[arg(long, default_value_t = 0.15)]
        geo_sigma: f64,
        /// geo: one-sided multiplicative jitter of the slices.
        #[arg(long, default_value_t = 0.1)]
        jitter: f64,
    },
}

/// `tomo sim` arguments.
#[derive(Args, Debug, Clone)]
struct SimArgs {
    /// Truth matrix (`ltm v1`, `.gz`, triples with --format triples, King-style with --scale).
    #[arg(long, conflicts_with = "synthetic")]
    dataset: Option<PathBuf>,
    /// Format of --dataset: ltm (also dense/king) or triples.
    #[arg(long, default_value = "ltm")]
    format: String,
    /// Multiply dataset values by this to get ms (default: `# units:` header, else 1).
    #[arg(long)]
    scale: Option<f64>,
    /// Generate instead: line | grid | split | circle | random | geo.
    #[arg(long)]
    synthetic: Option<String>,
    /// Nodes for --synthetic; for --dataset, keep only the first N.
    #[arg(long)]
    nodes: Option<usize>,
    /// Rounds; in each, every node probes --k peers (one round ≈ one probe interval).
    #[arg(long, default_value_t = 1000)]
    rounds: usize,
    /// Peers probed per node per round.
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// Peer selection: random (uniform) | shuffle (memberlist's shuffled walk).
    #[arg(long, default_value = "random")]
    select: String,
    /// Multiplicative RTT jitter J (0 = exact RTTs).
    #[arg(long, default_value_t = 0.0)]
    jitter: f64,
    /// queue: rtt·(1+J·|z|) one-sided | sym: rtt·(1+U(−J,J)).
    #[arg(long, default_value = "queue")]
    jitter_mode: String,
    /// Replay observations from this `ltm` series (same node order as --dataset); truth stays --dataset.
    /// Also scores p50/p99 estimates against each pair's samples (the `tail` block).
    #[arg(long)]
    observe: Option<PathBuf>,
    /// Fraction of pairs (seeded) never probed, to score predictions for unprobed pairs
    /// [default: 0.2 with --observe, else 0].
    #[arg(long)]
    holdout: Option<f64>,
    /// Coordinate dimensions (default 8).
    #[arg(long)]
    dim: Option<usize>,
    /// Engine profile: tomo (default) or serf (serf 0.9.4 exactly).
    #[arg(long, default_value = "tomo")]
    profile: String,
    /// Override an engine parameter, e.g. `--set short_link_alpha=0.5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Override a tomography (p50/p99 layer) parameter, e.g. `--tail-set excess_quantile=0.99`.
    #[arg(long = "tail-set", value_name = "KEY=VALUE")]
    tail_set: Vec<String>,
    /// Also record accuracy every E rounds (convergence).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Drop nodes with fewer known peers than this.
    #[arg(long, default_value_t = 1)]
    min_known: usize,
    /// Updates in the throughput loop (0 = skip).
    #[arg(long, default_value_t = 200_000)]
    bench_updates: usize,
    /// Repeats of the throughput loop (median and best reported).
    #[arg(long, default_value_t = 3)]
    bench_repeat: usize,
    /// Write run.json, pairs.csv, nodes.csv, coords.csv and rounds.csv here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sweep a parameter, e.g. `--sweep seed=1,2,3 --sweep profile=tomo,serf`;
    /// runs the cartesian product in parallel, one JSON line each, in order.
    #[arg(long, value_name = "KEY=V1,V2,..")]
    sweep: Vec<String>,
    /// Worker threads for --sweep (default: all cores). Results do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// Labels (`*.nodes.csv` with a dc/region/continent column); default: the dataset's sibling if present.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// rounds: the round-based engine simulator | gossip: the real SWIM gossip nodes
    /// (foca + engine) on a discrete-event network with one-way delay = RTT/2.
    #[arg(long, default_value = "rounds")]
    protocol: String,
    /// gossip: simulated time, e.g. 600s, 30m, 1h [default: --rounds probe intervals].
    #[arg(long)]
    duration: Option<String>,
    /// gossip: foca's probe period; probe timeout = half, suspicion and gossip periods
    /// scale with it [default: 1s].
    #[arg(long)]
    probe_interval: Option<String>,
    /// gossip: probability that a datagram is lost [default: 0].
    #[arg(long)]
    loss: Option<f64>,
    /// gossip: NODE:DELAY, add DELAY to every datagram NODE sends (repeatable).
    #[arg(long, value_name = "NODE:DELAY")]
    slow: Vec<String>,
    /// gossip: NODE@TIME, stop NODE at TIME, e.g. `--kill 3@10m` (repeatable).
    #[arg(long, value_name = "NODE@TIME")]
    kill: Vec<String>,
    /// gossip: NODE@TIME, restart a killed NODE under a renewed identity (repeatable).
    #[arg(long, value_name = "NODE@TIME")]
    restart: Vec<String>,
    /// gossip: SIDE@START..END, cut nodes [0, SIDE·n) off from the others, SIDE = `half` or a
    /// fraction, e.g. `--partition half@5m..8m` (repeatable, non-overlapping).
    #[arg(long, value_name = "SIDE@START..END")]
    partition: Vec<String>,
    /// gossip: node i announces to node 0 at WINDOW·i/n [default: 1s].
    #[arg(long)]
    join_window: Option<String>,
    /// gossip: start every node knowing every other alive (a formed cluster restored from
    /// its members' snapshots), to measure the steady state of thousands of nodes without
    /// the join storm.
    #[arg(long)]
    warm_start: bool,
    /// gossip: sample every node's membership for false suspicions this often, `off` to skip
    /// [default: every probe interval up to 1,000 nodes, (n/1000)² intervals above].
    #[arg(long)]
    suspicion_sample: Option<String>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args()));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tomo: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Sim(a) => sim_cmd(*a),
        Command::SimFailover(a) => failover_cmd::run(*a),
        Command::Dataset(d) => dataset_cmd(d),
        Command::Plot(p) => Ok(crate::plot::run(&p)?),
        Command::Agent(a) => agent_cmd::agent(*a),
        Command::Bench(BenchCmd::Kv(a)) => bench_cmd::kv(a),
        Command::Bench(BenchCmd::Watchers(a)) => watch_bench::watchers(a),
        Command::Demo(d) => agent_cmd::demo(d),
        Command::Members(c) => agent_cmd::members(&c),
        Command::Rtt {
            node1,
            node2,
            wan: false,
            client,
        } => agent_cmd::rtt(&client, &node1, node2.as_deref()),
        Command::Rtt {
            node1,
            node2,
            wan: true,
            client,
        } => agent_cmd::rtt_wan(&client, &node1, node2.as_deref()),
        Command::Info(c) => agent_cmd::info(&c),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Loads a matrix file.
pub fn load_matrix(path: &Path, format: &str, scale: Option<f64>) -> Result<Matrix> {
    let format: Format = format.parse()?;
    let bytes = read(path)?;
    dataset::parse_matrix(&bytes, format, scale)
        .with_context(|| format!("reading {}", path.display()))
}

fn load_series(path: &Path, scale: Option<f64>) -> Result<Series> {
    let bytes = read(path)?;
    let text =
        dataset::decode_text(&bytes).with_context(|| format!("reading {}", path.display()))?;
    dataset::parse_series(&text, scale).with_context(|| format!("reading {}", path.display()))
}

/// `X.ltm`, `X.median.ltm`, `X.series.ltm.gz`, `X.avg.ltm` → `X.nodes.csv`.
fn sibling_labels(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let stem = name.split('.').next()?;
    let p = path.with_file_name(format!("{stem}.nodes.csv"));
    p.exists().then_some(p)
}

fn dataset_cmd(d: DatasetCmd) -> Result<()> {
    match d {
        DatasetCmd::Info {
            file,
            format,
            scale,
            triples,
            seed,
        } => {
            let m = load_matrix(&file, &format, scale)?;
            let inf = dataset::info(&m, triples, seed);
            let mut v = serde_json::to_value(&inf)?;
            v["file"] = json!(file.display().to_string());
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        DatasetCmd::Gen {
            kind,
            nodes,
            output,
            seed,
            slices,
            geo_sigma,
            jitter,
        } => {
            let kind: Synthetic = kind.parse()?;
            let n = nodes.unwrap_or(kind.default_nodes());
            let opts = GeoOptions {
                sigma: geo_sigma,
                slices,
                jitter,
                ..GeoOptions::default()
            };
            if slices > 0 && kind != Synthetic::Geo {
                bail!("--slices is only for the geo generator");
            }
            let g = dataset::generate(kind, n, seed, &opts)?;
            let name = output
                .file_name()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split('.').next())
                .unwrap_or("synthetic")
                .to_string();
            let comments = vec![
                format!(
                    "source: tomo dataset gen {} --nodes {n} --seed {seed}",
                    kind.name()
                ),
                format!("generator: {}", serde_json::to_string(&opts)?),
            ];
            write_maybe_gz(
                &output,
                dataset::to_ltm(&g.matrix, &name, &comments).as_bytes(),
            )?;
            if let (Some(places), Some(labels)) = (&g.places, &g.matrix.labels) {
                let p = output.with_file_name(format!("{name}.nodes.csv"));
                let mut s = String::from("index,metro,dc,lat,lon\n");
                for (i, ((metro, lat, lon), dc)) in places.iter().zip(labels).enumerate() {
                    s.push_str(&format!("{i},{metro},{dc},{lat:.4},{lon:.4}\n"));
                }
                std::fs::write(&p, s).with_context(|| format!("writing {}", p.display()))?;
                eprintln!("wrote {}", p.display());
            }
            if let Some(series) = &g.series {
                let p = output.with_file_name(format!("{name}.series.ltm.gz"));
                write_maybe_gz(
                    &p,
                    dataset::series_to_ltm(series, &name, &comments).as_bytes(),
                )?;
                eprintln!("wrote {}", p.display());
            }
            eprintln!("wrote {} ({n} nodes)", output.display());
            Ok(())
        }
    }
}

fn write_maybe_gz(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        e.write_all(bytes)?;
        e.finish()?;
    } else {
        let mut w = std::io::BufWriter::new(f);
        w.write_all(bytes)?;
        w.flush()?;
    }
    Ok(())
}

/// Applies `KEY=VALUE` overrides to an engine configuration.
fn apply_sets(cfg: &mut vivaldi::Config, sets: &[String]) -> Result<()> {
    override_fields(cfg, sets)?;
    cfg.validate()?;
    Ok(())
}

/// Applies `KEY=VALUE` overrides to any configuration that round-trips
/// through JSON (values parse as JSON, else as strings).
fn override_fields<T: Serialize + serde::de::DeserializeOwned>(
    cfg: &mut T,
    sets: &[String],
) -> Result<()> {
    if sets.is_empty() {
        return Ok(());
    }
    let mut v = serde_json::to_value(&*cfg)?;
    for s in sets {
        let (k, val) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--set wants KEY=VALUE, got {s:?}"))?;
        let obj = v.as_object_mut().expect("config is an object");
        let Some(slot) = obj.get_mut(k) else {
            let keys: Vec<&String> = obj.keys().collect();
            bail!("unknown parameter {k:?}; known: {keys:?}");
        };
        *slot = serde_json::from_str(val).unwrap_or(Value::String(val.to_string()));
    }
    *cfg = serde_json::from_value(v).context("--set")?;
    Ok(())
}

/// The input of one simulation, loaded once and shared by sweep runs.
struct Input {
    matrix: Matrix,
    series: Option<Series>,
    params: Value,
}

fn load_input(a: &SimArgs) -> Result<Input> {
    let mut params = serde_json::Map::new();
    let (mut m, series) = match (&a.dataset, &a.synthetic) {
        (Some(path), None) => {
            let mut m = load_matrix(path, &a.format, a.scale)?;
            let labels = a.labels.clone().or_else(|| sibling_labels(path));
            if let Some(lp) = labels {
                let text = std::fs::read_to_string(&lp)
                    .with_context(|| format!("reading {}", lp.display()))?;
                m.labels = dataset::parse_labels(&text, m.n);
            }
            m.truncate(a.nodes.unwrap_or(0));
            params.insert("source".into(), json!(path.display().to_string()));
            params.insert("format".into(), json!(a.format));
            let series = match &a.observe {
                Some(o) => {
                    let s = load_series(o, a.scale)?;
                    params.insert("observe".into(), json!(o.display().to_string()));
                    params.insert("observe_slices".into(), json!(s.slices.len()));
                    Some(s)
                }
                None => None,
            };
            (m, series)
        }
        (None, Some(kind)) => {
            if a.observe.is_some() {
                bail!("--observe needs --dataset (the truth, in the same node order)");
            }
            let kind: Synthetic = kind.parse()?;
            let n = a.nodes.unwrap_or(kind.default_nodes());
            let g = dataset::generate(kind, n, a.seed, &GeoOptions::default())?;
            params.insert("source".into(), json!(format!("synthetic:{}", kind.name())));
            params.insert("synthetic".into(), json!(kind.name()));
            (g.matrix, None)
        }
        _ => bail!("give --dataset FILE or --synthetic KIND"),
    };
    m.symmetrize();
    let dropped = m.drop_isolated(a.min_known);
    let kp = m.known_pairs();
    params.insert("scale_to_ms".into(), json!(a.scale.unwrap_or(1.0)));
    params.insert("nodes".into(), json!(m.n));
    params.insert("dropped_isolated_nodes".into(), json!(dropped));
    params.insert("known_pairs".into(), json!(kp));
    params.insert(
        "known_pair_fraction".into(),
        json!(if m.n > 1 {
            2.0 * kp as f64 / (m.n * (m.n - 1)) as f64
        } else {
            0.0
        }),
    );
    Ok(Input {
        matrix: m,
        series,
        params: Value::Object(params),
    })
}

/// Everything `tomo sim` prints for one run.
#[derive(Serialize)]
struct Output {
    harness: &'static str,
    params: Value,
    result: Evaluation,
    updates_per_s: f64,
    updates_per_s_best: f64,
    ns_per_update: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    series_tail: Option<SeriesTail>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tail: Option<TailEvaluation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    convergence: Vec<[f64; 2]>,
}

/// What `tomo sim --protocol gossip` prints for one run.
#[derive(Serialize)]
struct GossipOutput {
    harness: &'static str,
    protocol: &'static str,
    params: Value,
    result: Evaluation,
    membership: Membership,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    convergence: Vec<[f64; 2]>,
}

/// One run's output line, either protocol.
#[derive(Serialize)]
#[serde(untagged)]
enum RunOutput {
    Rounds(Box<Output>),
    Gossip(Box<GossipOutput>),
}

/// One run's configuration, either protocol.
#[derive(Clone)]
enum RunConfig {
    Rounds(SimConfig),
    Gossip(GossipSimConfig),
}

/// The `--flag` names of gossip-only options given on the command line.
fn gossip_flags_given(a: &SimArgs) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (given, name) in [
        (a.duration.is_some(), "--duration"),
        (a.probe_interval.is_some(), "--probe-interval"),
        (a.loss.is_some(), "--loss"),
        (!a.slow.is_empty(), "--slow"),
        (!a.kill.is_empty(), "--kill"),
        (!a.restart.is_empty(), "--restart"),
        (!a.partition.is_empty(), "--partition"),
        (a.join_window.is_some(), "--join-window"),
        (a.warm_start, "--warm-start"),
        (a.suspicion_sample.is_some(), "--suspicion-sample"),
    ] {
        if given {
            v.push(name);
        }
    }
    v
}

fn engine_config(a: &SimArgs) -> Result<vivaldi::Config> {
    let profile: Profile = a.profile.parse()?;
    let mut engine = vivaldi::Config::for_profile(profile);
    if let Some(d) = a.dim {
        engine.dimensionality = d;
    }
    apply_sets(&mut engine, &a.set)?;
    Ok(engine)
}

fn sim_config(a: &SimArgs) -> Result<RunConfig> {
    match a.protocol.as_str() {
        "rounds" => {
            if let Some(f) = gossip_flags_given(a).first() {
                bail!("{f} needs --protocol gossip");
            }
            Ok(RunConfig::Rounds(rounds_config(a)?))
        }
        "gossip" => Ok(RunConfig::Gossip(gossip_config(a)?)),
        p => bail!("unknown --protocol {p:?} (rounds|gossip)"),
    }
}

/// Parses a duration flag, naming the flag in the error.
fn duration_arg(flag: &str, s: &str) -> Result<std::time::Duration> {
    parse_duration(s).with_context(|| format!("--{flag}"))
}

fn gossip_config(a: &SimArgs) -> Result<GossipSimConfig> {
    let engine = engine_config(a)?;
    let jitter_mode: JitterMode = a.jitter_mode.parse()?;
    if a.k != 1 {
        bail!("--k is for --protocol rounds: a gossip node probes one member per probe interval");
    }
    if a.select != "random" {
        bail!("--select is for --protocol rounds: foca picks the members it probes");
    }
    if a.holdout.is_some_and(|h| h != 0.0) {
        bail!("--holdout is for --protocol rounds: foca probes every member");
    }
    if !a.tail_set.is_empty() {
        bail!("--tail-set is for --protocol rounds (gossip nodes keep no p50/p99 layer yet)");
    }
    if a.out.is_some() {
        bail!("--out is not supported with --protocol gossip yet");
    }
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let probe_interval = match &a.probe_interval {
        Some(s) => duration_arg("probe-interval", s)?,
        None => std::time::Duration::from_secs(1),
    };
    if probe_interval < std::time::Duration::from_millis(1) {
        bail!("--probe-interval must be at least 1ms");
    }
    let duration = match &a.duration {
        Some(s) => duration_arg("duration", s)?,
        None => probe_interval * a.rounds as u32,
    };
    if duration.is_zero() {
        bail!("--duration must be positive");
    }
    let loss = a.loss.unwrap_or(0.0);
    if !(0.0..1.0).contains(&loss) {
        bail!("--loss must be in [0, 1), got {loss}");
    }
    if !(a.jitter.is_finite() && a.jitter >= 0.0) {
        bail!("--jitter must be finite and >= 0");
    }
    let slow = a
        .slow
        .iter()
        .map(|s| parse_node_delay(s).with_context(|| "--slow"))
        .collect::<Result<Vec<_>>>()?;
    let kills = a
        .kill
        .iter()
        .map(|s| parse_node_at(s).with_context(|| "--kill"))
        .collect::<Result<Vec<_>>>()?;
    let restarts = a
        .restart
        .iter()
        .map(|s| parse_node_at(s).with_context(|| "--restart"))
        .collect::<Result<Vec<_>>>()?;
    let partitions = a
        .partition
        .iter()
        .map(|s| s.parse::<Partition>().with_context(|| "--partition"))
        .collect::<Result<Vec<_>>>()?;
    let join_window = match &a.join_window {
        Some(s) => duration_arg("join-window", s)?,
        None => std::time::Duration::from_secs(1),
    };
    Ok(GossipSimConfig {
        duration,
        probe_interval,
        loss,
        jitter: a.jitter,
        jitter_mode,
        slow,
        kills,
        restarts,
        partitions,
        seed: a.seed,
        engine,
        join_window,
        warm_start: a.warm_start,
        eval_every: probe_interval * a.eval_every as u32,
        suspicion_sample: match a.suspicion_sample.as_deref() {
            None => None,
            Some("off") => Some(std::time::Duration::ZERO),
            Some(s) => Some(duration_arg("suspicion-sample", s)?),
        },
    })
}

fn rounds_config(a: &SimArgs) -> Result<SimConfig> {
    let engine = engine_config(a)?;
    let select: Select = a.select.parse()?;
    let jitter_mode: JitterMode = a.jitter_mode.parse()?;
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let mut eval_every = a.eval_every;
    if a.out.is_some() && eval_every == 0 {
        // rounds.csv wants a curve; evaluation never changes the run.
        eval_every = (a.rounds / 50).max(1);
    }
    let observing = a.observe.is_some();
    let tomography = if observing {
        let mut t = TomographyConfig::default();
        override_fields(&mut t, &a.tail_set)?;
        Some(t)
    } else if !a.tail_set.is_empty() {
        bail!("--tail-set needs --observe (the p50/p99 layer runs on a series)");
    } else {
        None
    };
    let holdout = a.holdout.unwrap_or(if observing { 0.2 } else { 0.0 });
    if !(0.0..1.0).contains(&holdout) {
        bail!("--holdout must be in [0, 1), got {holdout}");
    }
    Ok(SimConfig {
        rounds: a.rounds,
        k: a.k,
        select,
        jitter: a.jitter,
        jitter_mode,
        seed: a.seed,
        engine,
        eval_every,
        holdout,
        tomography,
    })
}

fn progress_bar(len: u64, show: bool, unit: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if !show || !std::io::stderr().is_terminal() || std::env::var_os("CI").is_some() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{eta}} left)"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

/// Runs one simulation (either protocol) and returns its output line.
fn run_one(input: &Input, a: &SimArgs, cfg: RunConfig, show_progress: bool) -> Result<RunOutput> {
    Ok(match cfg {
        RunConfig::Rounds(c) => {
            RunOutput::Rounds(Box::new(run_rounds(input, a, c, show_progress)?))
        }
        RunConfig::Gossip(c) => RunOutput::Gossip(Box::new(run_gossip(input, c, show_progress)?)),
    })
}

/// Runs the gossip nodes on the discrete-event network.
fn run_gossip(input: &Input, cfg: GossipSimConfig, show_progress: bool) -> Result<GossipOutput> {
    let mut params = input.params.clone();
    let n = input.matrix.n;
    let t0 = Instant::now();
    let mut sim = GossipSim::new(&input.matrix, input.series.as_ref(), cfg.clone())?;
    let secs = cfg.duration.as_secs_f64().ceil() as u64;
    let pb = progress_bar(
        secs,
        show_progress && n as u64 * secs >= 200_000,
        "simulated s",
    );
    pb.set_message(format!("gossip n={n}"));
    sim.run(|t| pb.set_position(t.as_secs()));
    pb.finish_and_clear();
    let wall = t0.elapsed().as_secs_f64();
    let result = sim.evaluate();
    let membership = sim.membership();
    let secs_of = |d: std::time::Duration| d.as_secs_f64();
    let p = params.as_object_mut().expect("object");
    p.insert("protocol".into(), json!("gossip"));
    p.insert("duration_s".into(), json!(secs_of(cfg.duration)));
    p.insert(
        "probe_interval_s".into(),
        json!(secs_of(cfg.probe_interval)),
    );
    p.insert(
        "probe_periods".into(),
        json!(cfg.duration.as_secs_f64() / cfg.probe_interval.as_secs_f64()),
    );
    p.insert("loss".into(), json!(cfg.loss));
    p.insert("jitter".into(), json!(cfg.jitter));
    p.insert("jitter_mode".into(), json!(cfg.jitter_mode));
    let node_times = |v: &[(usize, std::time::Duration)], key: &str| -> Value {
        v.iter()
            .map(|&(node, t)| json!({"node": node, key: secs_of(t)}))
            .collect()
    };
    p.insert("slow".into(), node_times(&cfg.slow, "extra_s"));
    p.insert("kills".into(), node_times(&cfg.kills, "at_s"));
    p.insert("restarts".into(), node_times(&cfg.restarts, "at_s"));
    p.insert("partitions".into(), serde_json::to_value(&cfg.partitions)?);
    p.insert("join_window_s".into(), json!(secs_of(cfg.join_window)));
    p.insert("warm_start".into(), json!(cfg.warm_start));
    p.insert("seed".into(), json!(cfg.seed));
    p.insert("dimensionality".into(), json!(cfg.engine.dimensionality));
    p.insert("profile".into(), json!(cfg.engine.profile));
    p.insert("engine_config".into(), serde_json::to_value(&cfg.engine)?);
    p.insert(
        "foca_config".into(),
        serde_json::to_value(&sim.node_config().foca)?,
    );
    if input.series.is_some() {
        p.insert("observe_slice_s".into(), json!(secs_of(cfg.probe_interval)));
    }
    p.insert("sim_wall_s".into(), json!(wall));
    p.insert("tomo_version".into(), json!(env!("CARGO_PKG_VERSION")));
    Ok(GossipOutput {
        harness: "tomo",
        protocol: "gossip",
        params,
        result,
        membership,
        convergence: sim.convergence().to_vec(),
    })
}

/// Runs the round-based simulator.
fn run_rounds(input: &Input, a: &SimArgs, cfg: SimConfig, show_progress: bool) -> Result<Output> {
    let mut params = input.params.clone();
    let t0 = Instant::now();
    let mut sim = Simulation::new(&input.matrix, input.series.as_ref(), cfg.clone())?;
    let pb = progress_bar(
        cfg.rounds as u64,
        show_progress && input.matrix.n * cfg.rounds >= 200_000,
        "rounds",
    );
    pb.set_message(format!("{} n={}", cfg.engine.profile, input.matrix.n));
    sim.run(|r| pb.set_position(r as u64));
    pb.finish_and_clear();
    let wall = t0.elapsed().as_secs_f64();
    let mut pairs = Vec::new();
    let mut nodes = Vec::new();
    let want_out = a.out.is_some();
    let result = sim.evaluate(
        want_out.then_some(&mut pairs),
        want_out.then_some(&mut nodes),
    );
    let series_tail = sim.tail_evaluation();
    let mut tail_pairs = Vec::new();
    let tail = sim.distribution_evaluation(want_out.then_some(&mut tail_pairs));
    let (updates, rejected) = sim.update_counts();
    // Throughput: pre-generated ops, timed loop only (the harness's method).
    let (mut ups, mut best) = (f64::NAN, f64::NAN);
    if a.bench_updates > 0 {
        let ops = sim.bench_ops(a.bench_updates);
        let snap = sim.bench_snapshot();
        let mut rates = Vec::new();
        for _ in 0..a.bench_repeat.max(1) {
            let t = Instant::now();
            sim.apply_bench_ops(&ops, &snap);
            rates.push(ops.len() as f64 / t.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        ups = rates[rates.len() / 2];
        best = rates[rates.len() - 1];
    }
    let p = params.as_object_mut().expect("object");
    p.insert("rounds".into(), json!(cfg.rounds));
    p.insert("peers_per_round".into(), json!(cfg.k));
    p.insert("select".into(), json!(cfg.select));
    p.insert("jitter".into(), json!(cfg.jitter));
    p.insert("jitter_mode".into(), json!(cfg.jitter_mode));
    p.insert("seed".into(), json!(cfg.seed));
    p.insert("dimensionality".into(), json!(cfg.engine.dimensionality));
    p.insert("profile".into(), json!(cfg.engine.profile));
    p.insert("engine_config".into(), serde_json::to_value(&cfg.engine)?);
    p.insert("updates_applied".into(), json!(updates));
    p.insert("updates_rejected".into(), json!(rejected));
    if input.series.is_some() {
        p.insert("observe_missing".into(), json!(sim.observe_missing()));
    }
    p.insert("holdout".into(), json!(cfg.holdout));
    if let Some(t) = &cfg.tomography {
        p.insert("tomography_config".into(), serde_json::to_value(t)?);
    }
    p.insert("sim_wall_s".into(), json!(wall));
    p.insert("bench_updates".into(), json!(a.bench_updates));
    p.insert("bench_repeat".into(), json!(a.bench_repeat));
    p.insert("tomo_version".into(), json!(env!("CARGO_PKG_VERSION")));
    let out = Output {
        harness: "tomo",
        params,
        result,
        updates_per_s: ups,
        updates_per_s_best: best,
        ns_per_update: 1e9 / ups,
        series_tail,
        tail,
        convergence: sim.convergence().to_vec(),
    };
    if let Some(dir) = &a.out {
        write_out_dir(dir, &out, &sim, &input.matrix, &pairs, &nodes)?;
        if out.tail.is_some() {
            write_tail_pairs(dir, &tail_pairs)?;
        }
    }
    Ok(out)
}

fn write_out_dir(
    dir: &Path,
    out: &Output,
    sim: &Simulation<'_>,
    m: &Matrix,
    pairs: &[PairScore],
    nodes: &[NodeScore],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let w = |name: &str, body: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))
    };
    w("run.json", serde_json::to_string_pretty(out)? + "\n")?;
    let mut s = String::from("i,j,actual_ms,estimate_ms,rel_err\n");
    for p in pairs {
        s.push_str(&format!(
            "{},{},{:.4},{:.4},{:.6}\n",
            p.i,
            p.j,
            p.actual_ms,
            p.estimate_ms,
            (p.estimate_ms - p.actual_ms).abs() / p.actual_ms
        ));
    }
    w("pairs.csv", s)?;
    let coords = sim.coordinates();
    let label = |i: usize| m.labels.as_ref().map(|l| l[i].clone()).unwrap_or_default();
    let mut s = String::from("node,label,true_nearest,predicted_nearest,stretch\n");
    for n in nodes {
        s.push_str(&format!(
            "{},{},{},{},{:.6}\n",
            n.node,
            label(n.node as usize),
            n.true_nearest,
            n.predicted_nearest,
            n.stretch
        ));
    }
    w("nodes.csv", s)?;
    let dim = coords.first().map_or(0, |c| c.vec.len());
    let mut s = String::from("node,label,error,height_ms,adjustment_ms");
    for d in 0..dim {
        s.push_str(&format!(",x{d}_ms"));
    }
    s.push('\n');
    for (i, c) in coords.iter().enumerate() {
        s.push_str(&format!(
            "{i},{},{:.6},{:.6},{:.6}",
            label(i),
            c.error,
            c.height * 1e3,
            c.adjustment * 1e3
        ));
        for v in &c.vec {
            s.push_str(&format!(",{:.6}", v * 1e3));
        }
        s.push('\n');
    }
    w("coords.csv", s)?;
    let mut s =
        String::from("round,median_rel_err,p90_rel_err,p99_rel_err,nn_accuracy,nn_recall_at_5\n");
    for r in sim.rounds_log() {
        s.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.6}\n",
            r.round,
            r.median_rel_err,
            r.p90_rel_err,
            r.p99_rel_err,
            r.nn_accuracy,
            r.nn_recall_at_5
        ));
    }
    w("rounds.csv", s)?;
    Ok(())
}

/// `tail_pairs.csv`: every pair scored by the `tail` block.
fn write_tail_pairs(dir: &Path, pairs: &[TailPair]) -> Result<()> {
    let mut s = String::from(
        "i,j,held_out,source,sketch_samples,pred_p50_ms,pred_p99_ms,actual_p50_ms,actual_p99_ms,coordinate_ms,exceed,real_samples\n",
    );
    for p in pairs {
        s.push_str(&format!(
            "{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{},{}\n",
            p.i,
            p.j,
            p.held_out as u8,
            serde_json::to_value(p.source)?.as_str().unwrap_or("?"),
            p.sketch_samples,
            p.pred_p50_ms,
            p.pred_p99_ms,
            p.actual_p50_ms,
            p.actual_p99_ms,
            p.coordinate_ms,
            p.exceed,
            p.real_samples
        ));
    }
    let path = dir.join("tail_pairs.csv");
    std::fs::write(&path, s).with_context(|| format!("writing {}", path.display()))
}

/// Expands `--sweep` specs into one argument set per run (cartesian product).
fn expand_sweep(a: &SimArgs) -> Result<Vec<SimArgs>> {
    let mut runs = vec![a.clone()];
    for spec in &a.sweep {
        let (k, vals) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--sweep wants KEY=V1,V2, got {spec:?}"))?;
        let vals: Vec<String> = if let Some((lo, hi)) = vals.split_once("..") {
            let (lo, hi): (u64, u64) = (lo.parse()?, hi.parse()?);
            (lo..=hi).map(|v| v.to_string()).collect()
        } else {
            vals.split(',').map(str::to_string).collect()
        };
        let mut next = Vec::new();
        for r in &runs {
            for v in &vals {
                let mut x = r.clone();
                match k {
                    "seed" => x.seed = v.parse()?,
                    "profile" => x.profile = v.clone(),
                    "dim" => x.dim = Some(v.parse()?),
                    "k" => x.k = v.parse()?,
                    "rounds" => x.rounds = v.parse()?,
                    "jitter" => x.jitter = v.parse()?,
                    "select" => x.select = v.clone(),
                    "holdout" => x.holdout = Some(v.parse()?),
                    "protocol" => x.protocol = v.clone(),
                    "loss" => x.loss = Some(v.parse()?),
                    "duration" => x.duration = Some(v.clone()),
                    "probe_interval" | "probe-interval" => x.probe_interval = Some(v.clone()),
                    engine => x.set.push(format!("{engine}={v}")),
                }
                x.out = r.out.as_ref().map(|o| o.join(format!("{k}={v}")));
                next.push(x);
            }
        }
        runs = next;
    }
    Ok(runs)
}

fn sim_cmd(a: SimArgs) -> Result<()> {
    let input = load_input(&a)?;
    if a.sweep.is_empty() {
        let cfg = sim_config(&a)?;
        let out = run_one(&input, &a, cfg, true)?;
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    if a.sweep.iter().any(|s| s.starts_with("seed=")) && a.synthetic.is_some() {
        eprintln!(
            "note: --synthetic topologies are generated once, with --seed {}",
            a.seed
        );
    }
    let runs = expand_sweep(&a)?;
    let cfgs = runs.iter().map(sim_config).collect::<Result<Vec<_>>>()?;
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let pb = ProgressBar::new(runs.len() as u64);
    if !std::io::stderr().is_terminal() || std::env::var_os("CI").is_some() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    // Each run is single-threaded and seeded, so the figures do not depend on
    // the thread count; only the throughput figures do.
    let outs: Vec<Result<RunOutput>> = pool.install(|| {
        runs.par_iter()
            .zip(cfgs)
            .map(|(r, c)| {
                let o = run_one(&input, r, c, false);
                pb.inc(1);
                o
            })
            .collect()
    });
    pb.finish_and_clear();
    for o in outs {
        println!("{}", serde_json::to_string(&o?)?);
    }
    Ok(())
}
