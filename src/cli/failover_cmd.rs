//! `tomo sim-failover`: the datacenter failover scenario
//! ([`crate::sim::failover`]) from the command line: one JSON line per
//! seed on stdout, a readable table on stderr.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use rayon::prelude::*;
use serde_json::{Value, json};

use super::{apply_sets, load_matrix, progress_bar, sibling_labels};
use crate::dataset::{self, GeoOptions, Matrix, Synthetic};
use crate::routing::{FailoverPolicy, Hysteresis};
use crate::sim::failover::{FailoverConfig, FailoverReport, FailoverSim, Outage};
use crate::vivaldi::{self, Profile};

/// `tomo sim-failover` arguments. Times take units (`90s`, `30m`, `1h`);
/// one simulated round is one second.
#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Labelled truth matrix (`ltm v1`); its datacenters come from --labels.
    #[arg(long, conflicts_with = "synthetic")]
    dataset: Option<PathBuf>,
    /// `*.nodes.csv` with a dc/datacenter/region column [default: the dataset's sibling,
    /// e.g. azure.ltm → azure.nodes.csv]. Each label is a datacenter, its nodes its servers.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Generate the topology instead: `geo` (metros grouped into 14 labelled datacenters).
    /// Generated per seed, so each seed is another world.
    #[arg(long)]
    synthetic: Option<String>,
    /// Nodes for --synthetic (default 300); for --dataset, keep only the first N.
    #[arg(long)]
    nodes: Option<usize>,
    /// Probing before anything fails, so decisions are made on converged coordinates.
    #[arg(long, default_value = "300s")]
    warmup: String,
    /// Length of the scenario after the warm-up.
    #[arg(long, default_value = "1h")]
    duration: String,
    /// Peers each node probes per second (uniformly at random among all nodes).
    #[arg(long, default_value_t = 1)]
    k: usize,
    /// One-sided probe jitter J: a probe sees rtt·(1 + J·|z|), z ~ N(0,1).
    #[arg(long, default_value_t = 0.1)]
    jitter: f64,
    /// Engine profile: tomo (default) or serf.
    #[arg(long, default_value = "tomo")]
    profile: String,
    /// Override an engine parameter, e.g. `--set short_link_alpha=0.5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Seeds: one run each, in parallel, one JSON line each: `1`, `1,2,3` or `1..5`.
    /// A seed drives the probes, the failure script and (with --synthetic) the topology.
    #[arg(long, default_value = "1")]
    seed: String,
    /// How often every datacenter decides where its answers come from.
    #[arg(long, default_value = "1s")]
    eval_every: String,
    /// Health-check interval of each instance (own random phase): the choosers see
    /// the last check, so they learn of a failure up to this late.
    #[arg(long, default_value = "10s")]
    check_interval: String,
    /// Mean time between two outages (all instances down) of one datacenter,
    /// exponential; `0s` for none.
    #[arg(long, default_value = "30m")]
    outage_every: String,
    /// Mean outage length (1 s + exponential).
    #[arg(long, default_value = "2m")]
    outage_mean: String,
    /// Probability that an outage ends with a spell of flapping health.
    #[arg(long, default_value_t = 0.3)]
    flap_prob: f64,
    /// While flapping, the datacenter is up, then down, for this long each, alternately.
    #[arg(long, default_value = "5s")]
    flap_period: String,
    /// How long a spell of flapping lasts.
    #[arg(long, default_value = "1m")]
    flap_len: String,
    /// Mean time between two failures of one instance (exponential); `0s` for none.
    #[arg(long, default_value = "1h")]
    instance_mtbf: String,
    /// Mean time a failed instance stays down (1 s + exponential).
    #[arg(long, default_value = "1m")]
    instance_down: String,
    /// DC@START..END: also take every instance of DC down over that span of the
    /// scenario, e.g. `--outage eu-west@10m..15m` (repeatable).
    #[arg(long, value_name = "DC@START..END")]
    outage: Vec<String>,
    /// What orders the datacenters: coordinates (Consul's way: coordinate distances) or
    /// tomography (each pair's measured median where probed, else the calibrated coordinate
    /// estimate; turns on the distribution layer).
    #[arg(long, default_value = "coordinates")]
    estimate: String,
    /// How often the distribution layer's per-server p50/p99 estimates are recomputed
    /// (--estimate tomography, --max-p99-ms); coordinate distances are always fresh.
    #[arg(long, default_value = "10s")]
    estimate_every: String,
    /// Failover NearestN: try the N nearest other datacenters [default: all].
    #[arg(long)]
    nearest_n: Option<usize>,
    /// Failover Datacenters: then these, in order (repeatable; unknown ones skipped).
    #[arg(long = "failover-dc", value_name = "DC")]
    failover_dc: Vec<String>,
    /// Fail over when a datacenter's healthy fraction drops below this (not only at 0).
    #[arg(long)]
    min_healthy: Option<f64>,
    /// Skip candidate datacenters whose estimated p99 RTT exceeds this (ms); turns on
    /// the p99 layer (tomography). Scored against true p99s under the jitter model.
    #[arg(long)]
    max_p99_ms: Option<f64>,
    /// Fail back only to a datacenter that has served without a break this long
    /// (`0s`: Consul's stateless choice).
    #[arg(long, default_value = "30s")]
    hold: String,
    /// ... and for at least this many consecutive evaluations.
    #[arg(long, default_value_t = 3)]
    hold_evals: u32,
    /// Also report the fraction of decisions within this many ms (true median RTT)
    /// of the truly nearest datacenter (`correct_within_tie_fraction`).
    #[arg(long, default_value_t = 0.0)]
    tie_ms: f64,
    /// A voluntary change of answer (failback, reorder) is a flap when within this the
    /// answers are forced off its datacenter or go back to the one it left.
    #[arg(long, default_value = "1m")]
    flap_window: String,
    /// Print only the JSON lines, no table on stderr.
    #[arg(long)]
    quiet: bool,
    /// Worker threads for several seeds (default: all cores). Results do not depend on it.
    #[arg(long)]
    threads: Option<usize>,
}

/// Whole seconds (= rounds) of a duration flag.
fn secs(flag: &str, s: &str) -> Result<usize> {
    Ok(super::duration_arg(flag, s)?.as_secs_f64().round() as usize)
}

/// `1`, `1,2,3` or `1..5` (inclusive).
fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let bad = || anyhow::anyhow!("--seed: expected N, N,M,… or A..B, got {s:?}");
    if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u64, u64) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a > b {
            return Err(bad());
        }
        return Ok((a..=b).collect());
    }
    s.split(',')
        .map(|x| x.trim().parse().map_err(|_| bad()))
        .collect()
}

/// `DC@START..END`; the DC may contain spaces and `@` (split at the last one).
fn parse_outage(s: &str) -> Result<Outage> {
    let bad =
        || anyhow::anyhow!("--outage: expected DC@START..END, e.g. eu-west@10m..15m, got {s:?}");
    let (dc, span) = s.rsplit_once('@').ok_or_else(bad)?;
    let (a, b) = span.split_once("..").ok_or_else(bad)?;
    let (start, end) = (secs("outage", a)?, secs("outage", b)?);
    if dc.is_empty() || end <= start {
        return Err(bad());
    }
    Ok(Outage {
        datacenter: dc.to_string(),
        start,
        end,
    })
}

/// The scenario configuration for one seed.
fn config(a: &FailoverArgs, seed: u64) -> Result<FailoverConfig> {
    let profile: Profile = a.profile.parse()?;
    let mut engine = vivaldi::Config::for_profile(profile);
    apply_sets(&mut engine, &a.set)?;
    let policy = FailoverPolicy {
        nearest_n: a.nearest_n.unwrap_or(usize::MAX),
        datacenters: a.failover_dc.clone(),
        min_healthy_fraction: a.min_healthy,
        max_p99_ms: a.max_p99_ms,
        hysteresis: Hysteresis {
            hold: Duration::from_secs(secs("hold", &a.hold)? as u64),
            min_evaluations: a.hold_evals,
        },
    };
    policy.validate()?;
    if !(a.jitter.is_finite() && a.jitter >= 0.0) {
        bail!("--jitter must be finite and >= 0");
    }
    Ok(FailoverConfig {
        warmup_rounds: secs("warmup", &a.warmup)?,
        rounds: secs("duration", &a.duration)?,
        k: a.k,
        jitter: a.jitter,
        engine,
        seed,
        eval_every: secs("eval-every", &a.eval_every)?,
        check_interval: secs("check-interval", &a.check_interval)?,
        outage_gap_mean: secs("outage-every", &a.outage_every)? as f64,
        outage_mean: secs("outage-mean", &a.outage_mean)? as f64,
        flap_prob: a.flap_prob,
        flap_period: secs("flap-period", &a.flap_period)?,
        flap_len: secs("flap-len", &a.flap_len)?,
        instance_gap_mean: secs("instance-mtbf", &a.instance_mtbf)? as f64,
        instance_down_mean: secs("instance-down", &a.instance_down)? as f64,
        outages: a
            .outage
            .iter()
            .map(|s| parse_outage(s))
            .collect::<Result<_>>()?,
        estimate: a.estimate.parse()?,
        estimate_every: secs("estimate-every", &a.estimate_every)?,
        policy,
        tie_ms: a.tie_ms,
        flap_window: secs("flap-window", &a.flap_window)?,
    })
}

/// The labelled, symmetrized truth for one seed, and where it came from.
fn load(a: &FailoverArgs, seed: u64) -> Result<(Matrix, String)> {
    let mut m = match (&a.dataset, &a.synthetic) {
        (Some(path), None) => {
            let mut m = load_matrix(path, "ltm", None)?;
            let labels = a.labels.clone().or_else(|| sibling_labels(path));
            let Some(lp) = labels else {
                bail!(
                    "{} has no datacenter labels: give --labels FILE.nodes.csv",
                    path.display()
                );
            };
            let text = std::fs::read_to_string(&lp)
                .with_context(|| format!("reading {}", lp.display()))?;
            m.labels = dataset::parse_labels(&text, m.n);
            if m.labels.is_none() {
                bail!(
                    "{}: needs a header with `index` and a dc/datacenter/region column",
                    lp.display()
                );
            }
            m.truncate(a.nodes.unwrap_or(0));
            (m, path.display().to_string())
        }
        (None, Some(kind)) => {
            let kind: Synthetic = kind.parse()?;
            if kind != Synthetic::Geo {
                bail!(
                    "--synthetic {}: only geo has datacenter labels",
                    kind.name()
                );
            }
            let n = a.nodes.unwrap_or(kind.default_nodes());
            let g = dataset::generate(kind, n, seed, &GeoOptions::default())?;
            (g.matrix, "synthetic:geo".to_string())
        }
        _ => bail!("give --dataset FILE (with labels) or --synthetic geo"),
    };
    m.0.symmetrize();
    // Nodes with no known RTT cannot be placed; drop them as `tomo sim` does.
    m.0.drop_isolated(1);
    Ok(m)
}

/// One seed's run: the JSON line's value.
fn run_seed(a: &FailoverArgs, seed: u64, show_progress: bool) -> Result<(Value, FailoverReport)> {
    let (m, source) = load(a, seed)?;
    let cfg = config(a, seed)?;
    let t0 = Instant::now();
    let mut sim = FailoverSim::new(&m, cfg.clone())?;
    let total = sim.total_rounds() as u64;
    let pb = progress_bar(
        total,
        show_progress && m.n as u64 * total >= 200_000,
        "rounds",
    );
    pb.set_message(format!("failover n={} seed={seed}", m.n));
    sim.run(|r| pb.set_position(r as u64));
    pb.finish_and_clear();
    let report = sim.report();
    let p = &cfg.policy;
    let params = json!({
        "source": source,
        "nodes": m.n,
        "datacenter_names": sim.datacenters().iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
        "seed": seed,
        "warmup_s": cfg.warmup_rounds,
        "duration_s": cfg.rounds,
        "round_s": 1,
        "peers_per_round": cfg.k,
        "jitter": cfg.jitter,
        "profile": cfg.engine.profile,
        "engine_config": cfg.engine,
        "eval_every_s": cfg.eval_every,
        "check_interval_s": cfg.check_interval,
        "outage_every_s": cfg.outage_gap_mean,
        "outage_mean_s": cfg.outage_mean,
        "flap_prob": cfg.flap_prob,
        "flap_period_s": cfg.flap_period,
        "flap_len_s": cfg.flap_len,
        "instance_mtbf_s": cfg.instance_gap_mean,
        "instance_down_s": cfg.instance_down_mean,
        "outages": cfg.outages,
        "estimate": cfg.estimate,
        "estimate_every_s": cfg.estimate_every,
        "nearest_n": (p.nearest_n != usize::MAX).then_some(p.nearest_n),
        "failover_datacenters": p.datacenters,
        "min_healthy_fraction": p.min_healthy_fraction,
        "max_p99_ms": p.max_p99_ms,
        "hold_s": p.hysteresis.hold.as_secs_f64(),
        "hold_evaluations": p.hysteresis.min_evaluations,
        "tie_ms": cfg.tie_ms,
        "flap_window_s": cfg.flap_window,
        "sim_wall_s": t0.elapsed().as_secs_f64(),
        "tomo_version": env!("CARGO_PKG_VERSION"),
    });
    let line = json!({
        "harness": "tomo",
        "scenario": "failover",
        "params": params,
        "result": report,
    });
    Ok((line, report))
}

fn pct(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{:.2} %", 100.0 * x)
    }
}

fn s1(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.0}")
    }
}

/// The readable summary: one row per seed (and their mean), then the first
/// seed's datacenters.
fn table(seeds: &[u64], reports: &[FailoverReport]) -> String {
    let mut s = String::new();
    s.push_str(
        "seed  decisions  correct  within-tie  failover-correct  nearest-other  \
         away p50/p99 s  back p50/p99 s  changes  flaps  misses det/hold/rank\n",
    );
    for (seed, r) in seeds.iter().zip(reports) {
        s.push_str(&format!(
            "{seed:<5} {:>9}  {:>7}  {:>10}  {:>16}  {:>13}  {:>14}  {:>14}  {:>7}  {:>5}  {}/{}/{}\n",
            r.decisions,
            pct(r.correct_fraction),
            pct(r.correct_within_tie_fraction),
            format!("{} of {}", pct(r.failover_correct_fraction), r.failover_decisions),
            pct(r.nearest_other_correct_fraction),
            format!("{}/{}", s1(r.move_away.p50_s), s1(r.move_away.p99_s)),
            format!("{}/{}", s1(r.move_back.p50_s), s1(r.move_back.p99_s)),
            r.changes,
            r.flaps,
            r.misses.detection,
            r.misses.hold,
            r.misses.ranking,
        ));
    }
    if reports.len() > 1 {
        let k = reports.len() as f64;
        let mean = |f: &dyn Fn(&FailoverReport) -> f64| reports.iter().map(f).sum::<f64>() / k;
        s.push_str(&format!(
            "mean  {:>9}  {:>7}  {:>10}  {:>16}  {:>13}\n",
            "",
            pct(mean(&|r| r.correct_fraction)),
            pct(mean(&|r| r.correct_within_tie_fraction)),
            pct(mean(&|r| r.failover_correct_fraction)),
            pct(mean(&|r| r.nearest_other_correct_fraction)),
        ));
    }
    if let Some(r) = reports.first() {
        s.push_str(&format!(
            "\nseed {}: {} datacenters ({}–{} servers), {} outages ({} flapping), {} instance failures\n",
            seeds[0],
            r.datacenters,
            r.servers_min,
            r.servers_max,
            r.outages,
            r.flapping_recoveries,
            r.instance_failures
        ));
        s.push_str(
            "datacenter            servers  correct   failover-correct  \
             true nearest other (ms)  coordinates' nearest (true ms)\n",
        );
        for d in &r.per_dc {
            s.push_str(&format!(
                "{:<21} {:>7}  {:>8}  {:>16}  {:<23}  {} ({:.1})\n",
                d.name,
                d.servers,
                pct(d.correct_fraction),
                format!(
                    "{} of {}",
                    pct(d.failover_correct_fraction),
                    d.failover_decisions
                ),
                format!("{} ({:.1})", d.true_nearest_other, d.true_nearest_other_ms),
                d.est_nearest_other,
                d.est_nearest_other_true_ms,
            ));
        }
    }
    s
}

/// Runs `tomo sim-failover`.
pub fn run(a: FailoverArgs) -> Result<()> {
    let seeds = parse_seeds(&a.seed)?;
    // Fail on bad flags before any work.
    config(&a, seeds[0])?;
    let results: Vec<Result<(Value, FailoverReport)>> = if seeds.len() == 1 {
        vec![run_seed(&a, seeds[0], true)]
    } else {
        let threads = a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let pb = progress_bar(seeds.len() as u64, true, "seeds");
        // Each run is single-threaded and seeded: figures do not depend on
        // the thread count.
        let out = pool.install(|| {
            seeds
                .par_iter()
                .map(|&s| {
                    let r = run_seed(&a, s, false);
                    pb.inc(1);
                    r
                })
                .collect()
        });
        pb.finish_and_clear();
        out
    };
    let mut reports = Vec::with_capacity(results.len());
    for r in results {
        let (line, report) = r?;
        println!("{}", serde_json::to_string(&line)?);
        reports.push(report);
    }
    if !a.quiet {
        eprint!("{}", table(&seeds, &reports));
    }
    Ok(())
}
