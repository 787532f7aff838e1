//! The datacenter failover scenario behind `tomo sim-failover`.
//!
//! Does [`crate::routing`] send each datacenter's queries to the nearest
//! datacenter that can serve, when the only knowledge of "nearest" is the
//! Vivaldi coordinates? Datacenters come from a labelled matrix (the geo
//! model's datacenter labels, several nodes each; azure's regions, one node
//! each). Every node is at once a server of its datacenter and an instance
//! of the service. The real engine ([`crate::sim::Simulation`], tomo's
//! profile by default) turns probes over the true matrix (with jitter) into
//! coordinates; after a warm-up, a seeded script fails and restores
//! instances: whole-datacenter outages, some of them followed by a spell of
//! flapping, and independent instance failures. A failed instance's
//! service is down; its node keeps probing (a service failure, not a
//! server crash), so coordinates keep coming from every node.
//!
//! Health reaches the choosers the way a catalog learns it: each instance
//! is checked every `check_interval` rounds, at a phase of its own, and
//! the choosers see the last check's result. At every evaluation, each
//! datacenter's answering server (its lowest-numbered node) orders the
//! datacenters by [`routing::order_datacenters`] over its coordinate
//! distances to every server (or, with [`RttSource::Tomography`], the
//! distribution layer's p50s), builds the candidate list with the
//! [`FailoverPolicy`] and asks its [`Chooser`]. The decision is scored
//! against the truth: the same ordering rule over the true matrix, the
//! true health, and the same policy threshold (and p99 bound, against true
//! p99s). One round is one second (a 1 s probe interval).
//!
//! Deterministic for a seed: the script has an RNG of its own, so changing
//! the probe budget does not change which instances fail when.

use std::collections::HashMap;
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::dataset::{Matrix, exp1};
use crate::routing::{self, Chooser, FailoverPolicy, Reason};
use crate::sim::{JitterMode, Select, SimConfig, SimError, Simulation};
use crate::stats::quantile_sorted;
use crate::tomography::{TomographyConfig, pair_estimate};
use crate::vivaldi::{self, Coordinate};

/// The 99th percentile of |z| for z ~ N(0, 1): a pair's true p99 under
/// the queue jitter `rtt·(1 + J·|z|)` is `rtt·(1 + J·Z99)`.
const Z99_ABS: f64 = 2.5758;

/// A scripted outage: every instance of `datacenter` down over
/// `[start, end)` scenario rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outage {
    /// The datacenter's label.
    pub datacenter: String,
    /// First round down (counted from the end of the warm-up).
    pub start: usize,
    /// First round up again.
    pub end: usize,
}

/// Where the answering server's RTT to each server comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RttSource {
    /// The coordinates' distance: what Consul uses.
    Coordinates,
    /// The p50 of [`crate::tomography`]: the pair's measured median when it
    /// has samples, the calibrated coordinate estimate otherwise.
    Tomography,
}

impl std::str::FromStr for RttSource {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coordinates" => Ok(RttSource::Coordinates),
            "tomography" => Ok(RttSource::Tomography),
            o => Err(SimError::Param(format!(
                "unknown RTT source {o:?} (coordinates|tomography)"
            ))),
        }
    }
}

/// Parameters of a failover run.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// Rounds of probing before anything fails, so that decisions are made
    /// on converged coordinates (300 rounds: median error within 10 % of
    /// its final value, `sims/RESULTS.md` §4).
    pub warmup_rounds: usize,
    /// Rounds of the scenario after the warm-up.
    pub rounds: usize,
    /// Peers each node probes per round (uniformly at random).
    pub k: usize,
    /// One-sided probe jitter J: a probe sees `rtt·(1 + J·|z|)`.
    pub jitter: f64,
    /// The coordinate engine.
    pub engine: vivaldi::Config,
    /// Seed of the probes, the engine and the script.
    pub seed: u64,
    /// Rounds between two decisions of every datacenter.
    pub eval_every: usize,
    /// Rounds between two health checks of an instance (each instance at
    /// its own seeded phase): what the choosers know of health lags the
    /// truth by up to this.
    pub check_interval: usize,
    /// Mean rounds between two outages of one datacenter (exponential);
    /// 0 = none but the scripted ones.
    pub outage_gap_mean: f64,
    /// Mean outage length, rounds (1 + exponential).
    pub outage_mean: f64,
    /// Probability that an outage ends with a spell of flapping.
    pub flap_prob: f64,
    /// While flapping, the datacenter is up then down for this many rounds
    /// each, alternately.
    pub flap_period: usize,
    /// How long a spell of flapping lasts, rounds.
    pub flap_len: usize,
    /// Mean rounds between two failures of one instance (exponential);
    /// 0 = no independent instance failures.
    pub instance_gap_mean: f64,
    /// Mean time an instance stays down, rounds (1 + exponential).
    pub instance_down_mean: f64,
    /// Outages added to the random ones.
    pub outages: Vec<Outage>,
    /// What the datacenter ordering is computed from.
    pub estimate: RttSource,
    /// Rounds between two refreshes of the distribution layer's per-server
    /// p50/p99 estimates (an agent would cache them too: computing one
    /// costs microseconds, and every evaluation needs datacenters × nodes
    /// of them). Coordinate distances are always fresh.
    pub estimate_every: usize,
    /// The routing policy every datacenter applies.
    pub policy: FailoverPolicy,
    /// A decision also counts as correct (in `correct_within_tie_fraction`
    /// only) when its datacenter's true median RTT is within this many ms
    /// of the truly nearest one's.
    pub tie_ms: f64,
    /// A voluntary change of answer (a failback, or a reorder) is a flap
    /// when, within this many rounds, the answers are forced off the
    /// datacenter it chose or go back to the one it left.
    pub flap_window: usize,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            warmup_rounds: 300,
            rounds: 3600,
            k: 1,
            jitter: 0.1,
            engine: vivaldi::Config::tomo(),
            seed: 1,
            eval_every: 1,
            check_interval: 10,
            outage_gap_mean: 1800.0,
            outage_mean: 120.0,
            flap_prob: 0.3,
            flap_period: 5,
            flap_len: 60,
            instance_gap_mean: 3600.0,
            instance_down_mean: 60.0,
            outages: Vec::new(),
            estimate: RttSource::Coordinates,
            estimate_every: 10,
            policy: FailoverPolicy {
                nearest_n: usize::MAX,
                hysteresis: routing::Hysteresis {
                    hold: Duration::from_secs(30),
                    min_evaluations: 3,
                },
                ..Default::default()
            },
            tie_ms: 0.0,
            flap_window: 60,
        }
    }
}

/// A datacenter of the scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Datacenter {
    /// Its label.
    pub name: String,
    /// Its nodes (servers and instances), ascending.
    pub nodes: Vec<usize>,
}

impl Datacenter {
    /// The server that answers its queries: the lowest-numbered node.
    pub fn answering(&self) -> usize {
        self.nodes[0]
    }
}

/// Groups a labelled matrix's nodes into datacenters, sorted by name.
/// Unlabelled nodes (empty label) belong to none; they still probe.
pub fn datacenters(m: &Matrix) -> Result<Vec<Datacenter>, SimError> {
    let labels = m.labels.as_ref().ok_or_else(|| {
        SimError::Param(
            "the dataset has no datacenter labels (a `*.nodes.csv` with a dc/region column, \
             or --synthetic geo)"
                .into(),
        )
    })?;
    let mut by: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, l) in labels.iter().enumerate().take(m.n) {
        if !l.is_empty() {
            by.entry(l.as_str()).or_default().push(i);
        }
    }
    let mut dcs: Vec<Datacenter> = by
        .into_iter()
        .map(|(name, nodes)| Datacenter {
            name: name.to_string(),
            nodes,
        })
        .collect();
    dcs.sort_by(|a, b| a.name.cmp(&b.name));
    if dcs.len() < 2 {
        return Err(SimError::Param(format!(
            "need at least 2 labelled datacenters, have {}",
            dcs.len()
        )));
    }
    Ok(dcs)
}

/// Quantiles of a set of durations, seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Times {
    /// How many.
    pub count: usize,
    /// Median, s.
    pub p50_s: f64,
    /// 99th percentile, s.
    pub p99_s: f64,
    /// Largest, s.
    pub max_s: f64,
}

impl Times {
    fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Times {
            count: v.len(),
            p50_s: quantile_sorted(&v, 0.5),
            p99_s: quantile_sorted(&v, 0.99),
            max_s: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Why wrong decisions were wrong.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Misses {
    /// Right for the health the checks had reported: health-check lag.
    pub detection: usize,
    /// The chooser was holding on before failing back (hysteresis).
    pub hold: usize,
    /// The coordinates ranked another datacenter nearest (or the
    /// candidate list left the nearest out).
    pub ranking: usize,
}

/// One datacenter's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DcReport {
    /// Label.
    pub name: String,
    /// Servers (= instances).
    pub servers: usize,
    /// Decisions its answering server made.
    pub decisions: usize,
    /// Fraction of them that chose the truly nearest datacenter that can
    /// serve.
    pub correct_fraction: f64,
    /// Decisions made while its own datacenter could not truly serve.
    pub failover_decisions: usize,
    /// Fraction of those that were correct.
    pub failover_correct_fraction: f64,
    /// Its truly nearest other datacenter (by the true medians).
    pub true_nearest_other: String,
    /// That datacenter's true median RTT, ms.
    pub true_nearest_other_ms: f64,
    /// The nearest other datacenter by the coordinates at the last
    /// evaluation.
    pub est_nearest_other: String,
    /// Its true median RTT, ms: above `true_nearest_other_ms` when the
    /// coordinates misrank.
    pub est_nearest_other_true_ms: f64,
}

/// What a failover run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    /// Datacenters.
    pub datacenters: usize,
    /// Fewest servers in a datacenter.
    pub servers_min: usize,
    /// Most servers in a datacenter.
    pub servers_max: usize,
    /// Scripted datacenter outages (random and given).
    pub outages: usize,
    /// How many of them ended with a spell of flapping.
    pub flapping_recoveries: usize,
    /// Independent instance failures.
    pub instance_failures: usize,
    /// Decisions, over every datacenter and evaluation.
    pub decisions: usize,
    /// Fraction of decisions that chose the truly nearest datacenter able
    /// to serve (ties in true median RTT count only when exact).
    pub correct_fraction: f64,
    /// The same, counting as correct any datacenter within `tie_ms` of the
    /// truly nearest.
    pub correct_within_tie_fraction: f64,
    /// Decisions made while the deciding datacenter itself could not truly
    /// serve: the ones where failover matters.
    pub failover_decisions: usize,
    /// Fraction of those that were correct.
    pub failover_correct_fraction: f64,
    /// Wrong decisions by cause.
    pub misses: Misses,
    /// Fraction of evaluations whose coordinate ordering named the truly
    /// nearest other datacenter first (by the true medians; exact ties
    /// count).
    pub nearest_other_correct_fraction: f64,
    /// From the moment the datacenter answers came from could no longer
    /// serve until they came from one that could.
    pub move_away: Times,
    /// Failures that ended before the answers moved (shorter than the
    /// health-check lag).
    pub recovered_in_place: usize,
    /// From the start of the lasting recovery of a datacenter's own
    /// instances until its answers came from it again.
    pub move_back: Times,
    /// Recoveries that failed again before the answers returned (flapping
    /// the hysteresis sat out).
    pub failbacks_interrupted: usize,
    /// Changes of answer, every datacenter.
    pub changes: usize,
    /// Changes forced by the current datacenter failing.
    pub forced_changes: usize,
    /// Changes while the current datacenter could still serve (failbacks,
    /// reorders).
    pub voluntary_changes: usize,
    /// Voluntary changes undone within `flap_window` (forced off the
    /// datacenter they chose, or back to the one they left).
    pub flaps: usize,
    /// Median relative error of the coordinates at the end.
    pub coord_median_rel_err: f64,
    /// Per datacenter.
    pub per_dc: Vec<DcReport>,
}

/// Per-chooser bookkeeping of the timing figures.
#[derive(Debug, Clone, Default)]
struct Track {
    target: Option<usize>,
    /// Open move-away episode: (round the target stopped serving, target).
    bad: Option<(usize, usize)>,
    /// Round the own datacenter's current lasting-or-not recovery began,
    /// while the answers are elsewhere.
    back_since: Option<usize>,
    /// Last voluntary change, still inside the flap window: (round, the
    /// datacenter it left).
    voluntary_at: Option<(usize, Option<usize>)>,
    decisions: usize,
    correct: usize,
    failover_decisions: usize,
    failover_correct: usize,
    /// The coordinates' nearest other datacenter at the last evaluation.
    est_nearest_other: Option<usize>,
}

/// A running failover scenario.
pub struct FailoverSim<'a> {
    cfg: FailoverConfig,
    dcs: Vec<Datacenter>,
    index: HashMap<String, usize>,
    sim: Simulation<'a>,
    choosers: Vec<Chooser>,
    /// True medians, ms: `true_median[c][e]` from c's answering server.
    true_median: Vec<Vec<f64>>,
    /// True order from each datacenter (indices, nearest first, itself first).
    true_order: Vec<Vec<usize>>,
    /// True DC p99, ms (with a p99 bound only).
    true_p99: Vec<Vec<f64>>,
    /// Per datacenter: the distribution layer's (p50 s, p99 ms) toward
    /// every server and the round they were computed.
    tail_cache: Vec<(usize, Vec<(f64, f64)>)>,
    /// `up[r * n + i]`: instance i truly up in scenario round r.
    up: Vec<bool>,
    /// Each instance's health-check phase.
    phase: Vec<usize>,
    n: usize,
    round: usize,
    tracks: Vec<Track>,
    outages: usize,
    flapping: usize,
    instance_failures: usize,
    misses: Misses,
    correct_tie: usize,
    nearest_ok: usize,
    evaluations: usize,
    move_away: Vec<f64>,
    move_back: Vec<f64>,
    recovered_in_place: usize,
    interrupted: usize,
    changes: usize,
    forced: usize,
    voluntary: usize,
    flaps: usize,
}

impl<'a> FailoverSim<'a> {
    /// Sets up the scenario on `truth` (symmetrized, labelled).
    pub fn new(truth: &'a Matrix, cfg: FailoverConfig) -> Result<Self, SimError> {
        cfg.policy
            .validate()
            .map_err(|e| SimError::Param(e.to_string()))?;
        if cfg.eval_every == 0
            || cfg.check_interval == 0
            || cfg.flap_period == 0
            || cfg.estimate_every == 0
        {
            return Err(SimError::Param(
                "eval_every, check_interval, flap_period and estimate_every must be >= 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.flap_prob) {
            return Err(SimError::Param("flap_prob must be in [0, 1]".into()));
        }
        for x in [
            cfg.outage_gap_mean,
            cfg.outage_mean,
            cfg.instance_gap_mean,
            cfg.instance_down_mean,
            cfg.tie_ms,
        ] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(SimError::Param(
                    "means and tie_ms must be finite and >= 0".into(),
                ));
            }
        }
        let dcs = datacenters(truth)?;
        let index: HashMap<String, usize> = dcs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();
        for o in &cfg.outages {
            if !index.contains_key(&o.datacenter) {
                return Err(SimError::Param(format!(
                    "outage of unknown datacenter {:?}",
                    o.datacenter
                )));
            }
        }
        let sim = Simulation::new(
            truth,
            None,
            SimConfig {
                rounds: cfg.warmup_rounds + cfg.rounds,
                k: cfg.k,
                select: Select::Random,
                jitter: cfg.jitter,
                jitter_mode: JitterMode::Queue,
                seed: cfg.seed,
                engine: cfg.engine.clone(),
                eval_every: 0,
                holdout: 0.0,
                // The distribution layer only when something reads it.
                tomography: (cfg.policy.max_p99_ms.is_some()
                    || cfg.estimate == RttSource::Tomography)
                    .then(TomographyConfig::default),
            },
        )?;
        let choosers = dcs
            .iter()
            .map(|d| Chooser::new(d.name.clone(), cfg.policy.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SimError::Param(e.to_string()))?;

        // The truth, with the rule the choosers apply to their estimates.
        let nd = dcs.len();
        let mut true_median = vec![vec![0.0; nd]; nd];
        let mut true_p99 = Vec::new();
        let mut true_order = Vec::with_capacity(nd);
        for (c, dc) in dcs.iter().enumerate() {
            let a = dc.answering();
            let servers = server_rtts(&dcs, |s| {
                let r = truth.at(a, s);
                (s == a || r > 0.0).then_some(if s == a { 0.0 } else { r })
            });
            let order = routing::order_datacenters(&dc.name, &servers);
            for (name, d) in &order {
                true_median[c][index[name]] = *d;
            }
            true_order.push(order.iter().map(|(name, _)| index[name]).collect());
            if cfg.policy.max_p99_ms.is_some() {
                let row = dcs
                    .iter()
                    .map(|e| {
                        let mut v: Vec<f64> = e
                            .nodes
                            .iter()
                            .map(|&s| {
                                let r = truth.at(a, s);
                                if s == a {
                                    0.0
                                } else if r > 0.0 {
                                    r * (1.0 + cfg.jitter * Z99_ABS)
                                } else {
                                    f64::INFINITY
                                }
                            })
                            .collect();
                        if e.name == dc.name {
                            0.0
                        } else {
                            routing::upper_median(&mut v).unwrap_or(f64::INFINITY)
                        }
                    })
                    .collect();
                true_p99.push(row);
            }
        }

        let n = truth.n;
        let mut s = FailoverSim {
            up: vec![true; cfg.rounds * n],
            tail_cache: vec![(0, Vec::new()); nd],
            phase: vec![0; n],
            n,
            dcs,
            index,
            sim,
            choosers,
            true_median,
            true_order,
            true_p99,
            round: 0,
            tracks: vec![Track::default(); nd],
            outages: 0,
            flapping: 0,
            instance_failures: 0,
            misses: Misses::default(),
            correct_tie: 0,
            nearest_ok: 0,
            evaluations: 0,
            move_away: Vec::new(),
            move_back: Vec::new(),
            recovered_in_place: 0,
            interrupted: 0,
            changes: 0,
            forced: 0,
            voluntary: 0,
            flaps: 0,
            cfg,
        };
        s.script();
        Ok(s)
    }

    /// Draws the failure script into `up` and the check phases.
    fn script(&mut self) {
        let cfg = &self.cfg;
        let rounds = cfg.rounds;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xFA11_0FE2_5C21);
        let n = self.n;
        let up = &mut self.up;
        let mut down = |nodes: &[usize], from: usize, to: usize| {
            for r in from..to.min(rounds) {
                for &i in nodes {
                    up[r * n + i] = false;
                }
            }
        };
        for p in self.phase.iter_mut() {
            *p = rng.random_range(0..cfg.check_interval);
        }
        let mut outages: Vec<(usize, usize, usize, bool)> = cfg
            .outages
            .iter()
            .map(|o| (self.index[&o.datacenter], o.start, o.end, false))
            .collect();
        if cfg.outage_gap_mean > 0.0 {
            for d in 0..self.dcs.len() {
                let mut t = exp1(&mut rng) * cfg.outage_gap_mean;
                while (t as usize) < rounds {
                    let start = t as usize;
                    let end = start + 1 + (exp1(&mut rng) * cfg.outage_mean) as usize;
                    let flaps = rng.random::<f64>() < cfg.flap_prob;
                    outages.push((d, start, end, flaps));
                    let settled = end + if flaps { cfg.flap_len } else { 0 };
                    t = settled as f64 + exp1(&mut rng) * cfg.outage_gap_mean;
                }
            }
        }
        for &(d, start, end, flaps) in &outages {
            let nodes = &self.dcs[d].nodes;
            down(nodes, start, end);
            if flaps {
                // Up for a period, down for a period, …, then up for good.
                let p = cfg.flap_period;
                let mut t = end + p;
                while t < end + cfg.flap_len {
                    down(nodes, t, (t + p).min(end + cfg.flap_len));
                    t += 2 * p;
                }
            }
        }
        self.outages = outages.len();
        self.flapping = outages.iter().filter(|o| o.3).count();
        if cfg.instance_gap_mean > 0.0 {
            for dc in &self.dcs {
                for &i in &dc.nodes {
                    let mut t = exp1(&mut rng) * cfg.instance_gap_mean;
                    while (t as usize) < rounds {
                        let start = t as usize;
                        let end = start + 1 + (exp1(&mut rng) * cfg.instance_down_mean) as usize;
                        down(&[i], start, end);
                        self.instance_failures += 1;
                        t = end as f64 + exp1(&mut rng) * cfg.instance_gap_mean;
                    }
                }
            }
        }
    }

    /// The datacenters, sorted by name.
    pub fn datacenters(&self) -> &[Datacenter] {
        &self.dcs
    }

    /// Total rounds (warm-up and scenario).
    pub fn total_rounds(&self) -> usize {
        self.cfg.warmup_rounds + self.cfg.rounds
    }

    /// Whether instance `i` is truly up in scenario round `r`.
    fn is_up(&self, r: usize, i: usize) -> bool {
        self.up[r * self.n + i]
    }

    /// Whether the catalog believes instance `i` up in round `r`: the
    /// result of its last check (everything was up before the scenario).
    fn seen_up(&self, r: usize, i: usize) -> bool {
        let p = self.phase[i];
        if r < p {
            return true;
        }
        let ci = self.cfg.check_interval;
        self.is_up(r - (r - p) % ci, i)
    }

    fn fractions(&self, r: usize, seen: bool) -> Vec<f64> {
        self.dcs
            .iter()
            .map(|d| {
                let ok = d
                    .nodes
                    .iter()
                    .filter(|&&i| {
                        if seen {
                            self.seen_up(r, i)
                        } else {
                            self.is_up(r, i)
                        }
                    })
                    .count();
                ok as f64 / d.nodes.len() as f64
            })
            .collect()
    }

    /// Whether `e` can serve `c`'s queries by the truth at round `r`.
    fn truly_serves(&self, c: usize, e: usize, frac: &[f64]) -> bool {
        let p = &self.cfg.policy;
        p.can_serve(frac[e])
            && match (p.max_p99_ms, self.true_p99.get(c)) {
                (Some(max), Some(row)) => e == c || row[e] <= max,
                _ => true,
            }
    }

    /// The best datacenter for `c` given fractions: the truly nearest that
    /// can serve, else the nearest with any healthy instance (within the
    /// p99 bound), else none. Returns (datacenter, tier) with tier 0 for
    /// "can serve", 1 for "partial".
    fn best(&self, c: usize, frac: &[f64]) -> Option<(usize, u8)> {
        let order = &self.true_order[c];
        if let Some(&e) = order.iter().find(|&&e| self.truly_serves(c, e, frac)) {
            return Some((e, 0));
        }
        let within = |e: usize| match (self.cfg.policy.max_p99_ms, self.true_p99.get(c)) {
            (Some(max), Some(row)) => e == c || row[e] <= max,
            _ => true,
        };
        order
            .iter()
            .find(|&&e| frac[e] > 0.0 && within(e))
            .map(|&e| (e, 1))
    }

    /// Whether `chosen` is as good as `best` for `c` (same tier, true
    /// median no further than `tol` ms beyond).
    fn as_good(
        &self,
        c: usize,
        chosen: Option<usize>,
        best: Option<(usize, u8)>,
        frac: &[f64],
        tol: f64,
    ) -> bool {
        match (chosen, best) {
            (None, None) => true,
            (Some(x), Some((b, tier))) => {
                let same_tier = if tier == 0 {
                    self.truly_serves(c, x, frac)
                } else {
                    frac[x] > 0.0
                };
                let (dx, db) = (self.true_median[c][x], self.true_median[c][b]);
                x == b || (same_tier && dx <= db * (1.0 + 1e-9) + tol)
            }
            _ => false,
        }
    }

    /// The answering server of `c`'s view of every server, in
    /// [`server_rtts`] order: the RTT estimate (s) the ordering uses and,
    /// with the distribution layer on, the p99 estimate (ms; NaN without).
    fn estimates(&mut self, c: usize, r: usize, coords: &[Coordinate]) -> Vec<(f64, f64)> {
        let a = self.dcs[c].answering();
        let fresh: Vec<f64> = self
            .dcs
            .iter()
            .flat_map(|d| d.nodes.iter().map(|&s| coords[a].distance_to(&coords[s])))
            .collect();
        let tomos = self.sim.tomographies();
        if tomos.is_empty() {
            return fresh.into_iter().map(|d| (d, f64::NAN)).collect();
        }
        let (at, cached) = &self.tail_cache[c];
        if cached.is_empty() || r >= at + self.cfg.estimate_every {
            let tail: Vec<(f64, f64)> = self
                .dcs
                .iter()
                .flat_map(|d| d.nodes.iter().copied())
                .zip(&fresh)
                .map(|(s, &coord)| {
                    if s == a {
                        return (0.0, 0.0);
                    }
                    let e = pair_estimate(
                        &tomos[a],
                        &tomos[s],
                        tomos[a].sketch(&(s as u32)),
                        tomos[s].sketch(&(a as u32)),
                        coord,
                    );
                    (e.p50, e.p99 * 1000.0)
                })
                .collect();
            self.tail_cache[c] = (r, tail);
        }
        let tail = &self.tail_cache[c].1;
        match self.cfg.estimate {
            RttSource::Coordinates => fresh.into_iter().zip(tail).map(|(d, t)| (d, t.1)).collect(),
            RttSource::Tomography => tail.clone(),
        }
    }

    /// Runs one round: probes, then (on evaluation rounds, after the
    /// warm-up) every datacenter's decision. Returns false once done.
    pub fn step(&mut self) -> bool {
        if self.sim.round() >= self.total_rounds() {
            return false;
        }
        self.sim.step_round();
        if self.sim.round() <= self.cfg.warmup_rounds {
            return true;
        }
        let r = self.round;
        self.round += 1;
        if r.is_multiple_of(self.cfg.eval_every) {
            self.evaluate(r);
        }
        true
    }

    /// Runs every remaining round, calling `progress(round)` after each.
    pub fn run(&mut self, mut progress: impl FnMut(usize)) {
        while self.step() {
            progress(self.sim.round());
        }
    }

    fn evaluate(&mut self, r: usize) {
        let coords = self.sim.coordinates();
        let truth = self.fractions(r, false);
        let seen = self.fractions(r, true);
        let now = Duration::from_secs(r as u64);
        for c in 0..self.dcs.len() {
            let est = self.estimates(c, r, &coords);
            let servers: Vec<(&str, Option<f64>)> = self
                .dcs
                .iter()
                .flat_map(|d| d.nodes.iter().map(move |_| d.name.as_str()))
                .zip(&est)
                .map(|(name, e)| (name, Some(e.0)))
                .collect();
            let ordering = routing::order_datacenters(&self.dcs[c].name, &servers);
            // Each datacenter's p99: the upper median over its servers.
            let p99: Vec<f64> = if self.cfg.policy.max_p99_ms.is_some() {
                let mut k = 0;
                self.dcs
                    .iter()
                    .enumerate()
                    .map(|(e, d)| {
                        let mut v: Vec<f64> =
                            est[k..k + d.nodes.len()].iter().map(|x| x.1).collect();
                        k += d.nodes.len();
                        if e == c {
                            0.0
                        } else {
                            routing::upper_median(&mut v).unwrap_or(f64::INFINITY)
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let index = &self.index;
            let candidates = self
                .cfg
                .policy
                .candidates(&self.dcs[c].name, &ordering, |dc| {
                    p99.get(index[dc]).copied()
                });
            let d = self.choosers[c].choose(now, &candidates, |dc| seen[index[dc]]);
            let chosen = d.datacenter.as_deref().map(|x| index[x]);

            // Ordering quality: the nearest other datacenter.
            let est_other = ordering
                .iter()
                .find(|(o, _)| *o != self.dcs[c].name)
                .map(|(o, _)| index[o]);
            if let Some(o) = est_other {
                let best_other = self.true_order[c].iter().find(|&&e| e != c);
                if let Some(&b) = best_other
                    && self.true_median[c][o] <= self.true_median[c][b] * (1.0 + 1e-9)
                {
                    self.nearest_ok += 1;
                }
            }
            self.tracks[c].est_nearest_other = est_other;
            self.evaluations += 1;

            // Correctness against the truth.
            let best = self.best(c, &truth);
            let ok = self.as_good(c, chosen, best, &truth, 0.0);
            let ok_tie = self.as_good(c, chosen, best, &truth, self.cfg.tie_ms);
            let local_down = !self.truly_serves(c, c, &truth);
            let t = &mut self.tracks[c];
            t.decisions += 1;
            t.correct += usize::from(ok);
            self.correct_tie += usize::from(ok_tie);
            if local_down {
                t.failover_decisions += 1;
                t.failover_correct += usize::from(ok);
            }
            if !ok {
                let seen_best = self.best(c, &seen);
                if self.as_good(c, chosen, seen_best, &seen, 0.0) {
                    self.misses.detection += 1;
                } else if d.reason == Reason::Holding {
                    self.misses.hold += 1;
                } else {
                    self.misses.ranking += 1;
                }
            }
            self.track(c, r, chosen, d.changed, &truth, &seen);
        }
    }

    /// The first round of the run of rounds, ending at `r`, in which `e`'s
    /// ability to serve `c` (by the truth) has been `state`.
    fn run_start(&self, c: usize, e: usize, r: usize, state: bool) -> usize {
        let nodes = &self.dcs[e].nodes;
        let mut f = vec![0.0; self.dcs.len()];
        let mut s = r;
        while s > 0 {
            // Only e's entry matters to `truly_serves(c, e, ..)`.
            let up = nodes.iter().filter(|&&i| self.is_up(s - 1, i)).count();
            f[e] = up as f64 / nodes.len() as f64;
            if self.truly_serves(c, e, &f) != state {
                break;
            }
            s -= 1;
        }
        s
    }

    /// Timing and flap bookkeeping for datacenter `c` after a decision.
    fn track(
        &mut self,
        c: usize,
        r: usize,
        chosen: Option<usize>,
        changed: bool,
        truth: &[f64],
        seen: &[f64],
    ) {
        let serves = |e: usize| self.truly_serves(c, e, truth);
        let any_serves = (0..self.dcs.len()).any(serves);
        let chosen_serves = chosen.is_some_and(serves);
        let local_serves = serves(c);
        let prev = self.tracks[c].target;

        // Move away: an episode opens when the datacenter the answers came
        // from stops serving while another could, and closes when they come
        // from one that serves (the same one: it recovered in place).
        let mut bad = self.tracks[c].bad;
        if bad.is_none()
            && let Some(p) = prev
            && !serves(p)
            && any_serves
        {
            bad = Some((self.run_start(c, p, r, false), p));
        }
        let (mut away, mut in_place) = (None, false);
        if let Some((since, x)) = bad {
            if chosen_serves {
                if chosen == Some(x) {
                    in_place = true;
                } else {
                    away = Some(r - since);
                }
                bad = None;
            } else if !any_serves {
                bad = None;
            }
        }

        // Move back: open while the own datacenter serves and the answers
        // are elsewhere, from the start of its current run of health;
        // close when they return, or when it fails again first.
        let mut back = self.tracks[c].back_since;
        let (mut back_sample, mut interrupted) = (None, false);
        if chosen == Some(c) {
            // Also a return at the very evaluation that first saw the
            // recovery (no hold): the episode never got to open.
            if prev.is_some_and(|p| p != c) && local_serves {
                let since = back.unwrap_or_else(|| self.run_start(c, c, r, true));
                back_sample = Some(r - since);
            }
            back = None;
        } else if local_serves {
            if back.is_none() {
                back = Some(self.run_start(c, c, r, true));
            }
        } else if back.is_some() {
            interrupted = true;
            back = None;
        }
        // A change is voluntary when the datacenter left could still serve
        // as far as the health checks said.
        let prev_ok = prev.is_some_and(|p| self.cfg.policy.can_serve(seen[p]));

        if let Some(a) = away {
            self.move_away.push(a as f64);
        }
        if let Some(b) = back_sample {
            self.move_back.push(b as f64);
        }
        self.recovered_in_place += usize::from(in_place);
        self.interrupted += usize::from(interrupted);
        let window = self.cfg.flap_window;
        let t = &mut self.tracks[c];
        if t.voluntary_at.is_some_and(|(v, _)| r - v >= window) {
            t.voluntary_at = None;
        }
        if changed && prev.is_some() {
            self.changes += 1;
            // A voluntary move is undone when, within the window, the
            // answers are forced off its datacenter or go back to the one
            // it left; moving on up is not undoing it.
            if let Some((_, left)) = t.voluntary_at.take()
                && (!prev_ok || chosen == left)
            {
                self.flaps += 1;
            }
            if prev_ok {
                self.voluntary += 1;
                t.voluntary_at = Some((r, prev));
            } else {
                self.forced += 1;
            }
        }
        t.target = chosen;
        t.bad = bad;
        t.back_since = back;
    }

    /// The figures so far.
    pub fn report(&self) -> FailoverReport {
        let frac = |a: usize, b: usize| {
            if b == 0 {
                f64::NAN
            } else {
                a as f64 / b as f64
            }
        };
        let decisions: usize = self.tracks.iter().map(|t| t.decisions).sum();
        let correct: usize = self.tracks.iter().map(|t| t.correct).sum();
        let fo: usize = self.tracks.iter().map(|t| t.failover_decisions).sum();
        let fo_ok: usize = self.tracks.iter().map(|t| t.failover_correct).sum();
        let sizes: Vec<usize> = self.dcs.iter().map(|d| d.nodes.len()).collect();
        let per_dc = self
            .dcs
            .iter()
            .zip(&self.tracks)
            .enumerate()
            .map(|(c, (d, t))| {
                let true_other = |c: usize| self.true_order[c].iter().copied().find(|&e| e != c);
                let name =
                    |e: Option<usize>| e.map(|e| self.dcs[e].name.clone()).unwrap_or_default();
                let median = |e: Option<usize>| e.map_or(f64::NAN, |e| self.true_median[c][e]);
                DcReport {
                    name: d.name.clone(),
                    servers: d.nodes.len(),
                    decisions: t.decisions,
                    correct_fraction: frac(t.correct, t.decisions),
                    failover_decisions: t.failover_decisions,
                    failover_correct_fraction: frac(t.failover_correct, t.failover_decisions),
                    true_nearest_other: name(true_other(c)),
                    true_nearest_other_ms: median(true_other(c)),
                    est_nearest_other: name(t.est_nearest_other),
                    est_nearest_other_true_ms: median(t.est_nearest_other),
                }
            })
            .collect();
        FailoverReport {
            datacenters: self.dcs.len(),
            servers_min: sizes.iter().copied().min().unwrap_or(0),
            servers_max: sizes.iter().copied().max().unwrap_or(0),
            outages: self.outages,
            flapping_recoveries: self.flapping,
            instance_failures: self.instance_failures,
            decisions,
            correct_fraction: frac(correct, decisions),
            correct_within_tie_fraction: frac(self.correct_tie, decisions),
            failover_decisions: fo,
            failover_correct_fraction: frac(fo_ok, fo),
            misses: self.misses.clone(),
            nearest_other_correct_fraction: frac(self.nearest_ok, self.evaluations),
            move_away: Times::of(self.move_away.clone()),
            recovered_in_place: self.recovered_in_place,
            move_back: Times::of(self.move_back.clone()),
            failbacks_interrupted: self.interrupted,
            changes: self.changes,
            forced_changes: self.forced,
            voluntary_changes: self.voluntary,
            flaps: self.flaps,
            coord_median_rel_err: self.sim.evaluate(None, None).median_rel_err,
            per_dc,
        }
    }
}

/// `(datacenter, rtt)` for every server, from `rtt(server)`.
fn server_rtts(dcs: &[Datacenter], rtt: impl Fn(usize) -> Option<f64>) -> Vec<(&str, Option<f64>)> {
    dcs.iter()
        .flat_map(|d| d.nodes.iter().map(move |&s| (d.name.as_str(), s)))
        .map(|(name, s)| (name, rtt(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three datacenters of three nodes on a line: a at 0 ms, b at 30 ms,
    /// c at 70 ms (nodes 1 ms apart within each): from b, a (30) is nearer
    /// than c (40).
    fn line() -> Matrix {
        let pos = [0.0, 1.0, 2.0, 30.0, 31.0, 32.0, 70.0, 71.0, 72.0];
        let mut m = Matrix::empty(9);
        for i in 0..9 {
            for j in i + 1..9 {
                let d: f64 = pos[j] - pos[i];
                m.set_sym(i, j, d.abs() + 0.5);
            }
        }
        m.labels = Some(
            ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        m.symmetrize();
        m
    }

    fn quiet(outages: Vec<Outage>) -> FailoverConfig {
        FailoverConfig {
            warmup_rounds: 300,
            rounds: 400,
            outage_gap_mean: 0.0,
            instance_gap_mean: 0.0,
            check_interval: 1,
            outages,
            ..Default::default()
        }
    }

    #[test]
    fn fails_away_from_the_middle_to_the_truly_nearest_and_back() {
        let m = line();
        let cfg = quiet(vec![Outage {
            datacenter: "b".into(),
            start: 100,
            end: 200,
        }]);
        let hold = cfg.policy.hysteresis.hold.as_secs() as usize;
        let mut s = FailoverSim::new(&m, cfg).unwrap();
        let mut at = Vec::new();
        while s.step() {
            if s.round > 0 {
                at.push(s.tracks.iter().map(|t| t.target).collect::<Vec<_>>());
            }
        }
        let (a, b, c) = (Some(0), Some(1), Some(2));
        // a and c never move; b leaves for a (not c) at once and comes
        // back a hold after its recovery (checks every round).
        for (r, t) in at.iter().enumerate() {
            assert_eq!(t[0], a, "r={r}");
            assert_eq!(t[2], c, "r={r}");
            let want = if (100..200 + hold).contains(&r) { a } else { b };
            assert_eq!(t[1], want, "r={r}");
        }
        let rep = s.report();
        assert_eq!(rep.outages, 1);
        assert_eq!(rep.move_away.count, 1);
        assert_eq!(rep.move_away.p50_s, 0.0);
        assert_eq!(rep.move_back.count, 1);
        assert_eq!(rep.move_back.p50_s, hold as f64);
        assert_eq!(rep.changes, 2);
        assert_eq!(rep.flaps, 0);
        // Wrong only while holding: `hold` decisions of b's.
        assert_eq!(rep.misses.hold, hold);
        assert_eq!(rep.misses.ranking + rep.misses.detection, 0);
        assert_eq!(rep.failover_decisions, 100);
        assert_eq!(rep.failover_correct_fraction, 1.0);
        assert_eq!(rep.nearest_other_correct_fraction, 1.0);
        assert_eq!(rep.per_dc[1].true_nearest_other, "a");
    }

    #[test]
    fn flapping_recovery_is_sat_out_and_counted() {
        let m = line();
        let mut cfg = quiet(vec![Outage {
            datacenter: "b".into(),
            start: 50,
            end: 60,
        }]);
        // Flapping by hand: b up 5 / down 5 over [60, 120).
        for k in 0..6 {
            cfg.outages.push(Outage {
                datacenter: "b".into(),
                start: 65 + 10 * k,
                end: 70 + 10 * k,
            });
        }
        let damped = FailoverSim::new(&m, cfg.clone()).map(|mut s| {
            s.run(|_| {});
            s.report()
        });
        let damped = damped.unwrap();
        assert_eq!(damped.changes, 2, "{damped:?}");
        assert_eq!(damped.flaps, 0);
        assert_eq!(damped.failbacks_interrupted, 6);
        assert_eq!(damped.move_back.count, 1);
        cfg.policy.hysteresis = routing::Hysteresis::NONE;
        let mut s = FailoverSim::new(&m, cfg).unwrap();
        s.run(|_| {});
        let consul = s.report();
        // Without hysteresis the answers follow each of the 7 down spells.
        assert_eq!(consul.changes, 14, "{consul:?}");
        assert_eq!(consul.flaps, 6);
        assert_eq!(consul.misses.hold, 0);
    }

    #[test]
    fn health_check_lag_delays_the_move_and_is_blamed() {
        let m = line();
        let mut cfg = quiet(vec![Outage {
            datacenter: "b".into(),
            start: 100,
            end: 200,
        }]);
        cfg.check_interval = 10;
        let mut s = FailoverSim::new(&m, cfg).unwrap();
        s.run(|_| {});
        let rep = s.report();
        assert_eq!(rep.move_away.count, 1);
        assert!(
            rep.move_away.p50_s > 0.0 && rep.move_away.p50_s < 10.0,
            "{rep:?}"
        );
        assert!(rep.misses.detection > 0);
        assert_eq!(rep.misses.ranking, 0);
    }

    #[test]
    fn the_p99_bound_keeps_answers_out_of_slow_datacenters() {
        // True p99 = rtt·(1 + 0.1·2.58): from b, a is ~38 ms and c ~51 ms.
        // With a 45 ms bound, b fails over to a, and when a is down too b
        // has nowhere to go: c is never a candidate, nor the truth's answer.
        let m = line();
        let mut cfg = quiet(vec![
            Outage {
                datacenter: "b".into(),
                start: 100,
                end: 200,
            },
            Outage {
                datacenter: "a".into(),
                start: 150,
                end: 200,
            },
        ]);
        cfg.policy.max_p99_ms = Some(45.0);
        cfg.estimate = RttSource::Tomography;
        let mut s = FailoverSim::new(&m, cfg).unwrap();
        let mut b_target = Vec::new();
        while s.step() {
            if s.round > 0 {
                b_target.push(s.tracks[1].target);
            }
        }
        assert_eq!(b_target[120], Some(0));
        assert_eq!(b_target[170], None);
        let rep = s.report();
        assert_eq!(rep.failover_correct_fraction, 1.0, "{rep:?}");
        assert_eq!(rep.misses.ranking, 0);
    }

    #[test]
    fn deterministic_for_a_seed_and_rejects_bad_input() {
        let m = line();
        let run = |seed| {
            let mut s = FailoverSim::new(
                &m,
                FailoverConfig {
                    rounds: 600,
                    outage_gap_mean: 200.0,
                    seed,
                    ..Default::default()
                },
            )
            .unwrap();
            s.run(|_| {});
            let r = s.report();
            (r.decisions, r.correct_fraction, r.outages, r.changes)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        let mut unlabelled = line();
        unlabelled.labels = None;
        assert!(FailoverSim::new(&unlabelled, FailoverConfig::default()).is_err());
        let bad = FailoverConfig {
            outages: vec![Outage {
                datacenter: "zz".into(),
                start: 0,
                end: 1,
            }],
            ..Default::default()
        };
        assert!(FailoverSim::new(&m, bad).is_err());
    }
}
