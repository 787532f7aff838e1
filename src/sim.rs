//! The round-based coordinate simulator behind `tomo sim`.
//!
//! It mirrors the serf peer harness (`../shared/peers/serf-vivaldi`) so the
//! two print comparable JSON lines: N nodes each run a [`vivaldi::Node`];
//! in every round every node probes `k` peers with a known RTT (chosen
//! uniformly at random, or by a memberlist-style shuffled walk) and feeds the
//! observed RTT (the matrix value, optionally with jitter, or a value replayed
//! from a measured time series) together with the peer's current coordinate
//! to its engine. One round stands for one probe interval.
//!
//! Accuracy and nearest-neighbour figures come from the published
//! coordinates alone and are defined exactly as in the harness (nearest-rank
//! quantiles, ties counted as correct). No I/O and no clock: the caller times
//! the throughput loop and writes files.
//!
//! [`vivaldi::Node`]: crate::vivaldi::Node

use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::dataset::{Matrix, Series, normal};
use crate::stats::{mean, quantile_sorted, quantiles_unsorted};
use crate::tomography::{Tomography, TomographyConfig};
use crate::vivaldi::{self, Coordinate, Node, VivaldiError};

pub mod failover;
pub mod gossip;
mod tail;
pub use tail::{PointGroups, TailEvaluation, TailGroup, TailPair};

/// What can go wrong setting up a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// Fewer than two connected nodes.
    #[error("need at least 2 connected nodes, have {0}")]
    TooFewNodes(usize),
    /// The observation series does not cover the matrix's nodes.
    #[error("the observation series has {series} nodes, fewer than the matrix needs ({needed})")]
    SeriesTooSmall {
        /// Nodes in the series.
        series: usize,
        /// Nodes the matrix refers to.
        needed: usize,
    },
    /// Bad parameters.
    #[error("invalid parameter: {0}")]
    Param(String),
    /// The engine refused its configuration.
    #[error(transparent)]
    Engine(#[from] VivaldiError),
}

/// How a node picks the peers it probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// Uniform with replacement among peers with a known RTT.
    Random,
    /// memberlist-style: walk a shuffled list, reshuffle after each pass.
    Shuffle,
}

impl std::str::FromStr for Select {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(Select::Random),
            "shuffle" => Ok(Select::Shuffle),
            o => Err(SimError::Param(format!(
                "unknown selection {o:?} (random|shuffle)"
            ))),
        }
    }
}

/// Shape of the synthetic jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JitterMode {
    /// `rtt·(1 + J·|z|)`, z ~ N(0,1): one-sided, like queueing.
    Queue,
    /// `rtt·(1 + U(−J, J))`.
    Sym,
}

impl std::str::FromStr for JitterMode {
    type Err = SimError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queue" => Ok(JitterMode::Queue),
            "sym" => Ok(JitterMode::Sym),
            o => Err(SimError::Param(format!(
                "unknown jitter mode {o:?} (queue|sym)"
            ))),
        }
    }
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Rounds (probe intervals).
    pub rounds: usize,
    /// Peers probed per node per round.
    pub k: usize,
    /// Peer selection.
    pub select: Select,
    /// Multiplicative jitter J (0 = exact RTTs).
    pub jitter: f64,
    /// Jitter shape.
    pub jitter_mode: JitterMode,
    /// Seed of every random choice.
    pub seed: u64,
    /// The engine's parameters.
    pub engine: vivaldi::Config,
    /// Record accuracy every this many rounds (0 = only at the end).
    pub eval_every: usize,
    /// Fraction of pairs (seeded) that are never probed, to score
    /// predictions for pairs without samples.
    pub holdout: f64,
    /// Keep RTT distributions per node ([`crate::tomography`]); off means
    /// no `tail` evaluation.
    pub tomography: Option<TomographyConfig>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            rounds: 1000,
            k: 1,
            select: Select::Random,
            jitter: 0.0,
            jitter_mode: JitterMode::Queue,
            seed: 1,
            engine: vivaldi::Config::tomo(),
            eval_every: 0,
            holdout: 0.0,
            tomography: None,
        }
    }
}

/// Accuracy and nearest-neighbour figures, with the harness's keys.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Evaluation {
    /// Known pairs scored.
    pub pairs: usize,
    /// Median relative error |est − actual| / actual over pairs.
    pub median_rel_err: f64,
    /// 90th percentile relative error.
    pub p90_rel_err: f64,
    /// 99th percentile relative error.
    pub p99_rel_err: f64,
    /// Mean relative error.
    pub mean_rel_err: f64,
    /// Largest relative error.
    pub max_rel_err: f64,
    /// Median absolute error, ms.
    pub median_abs_err_ms: f64,
    /// 99th percentile absolute error, ms.
    pub p99_abs_err_ms: f64,
    /// Nodes scored for nearest-neighbour selection.
    pub nn_nodes: usize,
    /// Fraction of nodes whose coordinate-nearest peer is a true nearest.
    pub nn_accuracy: f64,
    /// Median of actual RTT to predicted nearest / to true nearest.
    pub stretch_median: f64,
    /// 90th percentile stretch.
    pub stretch_p90: f64,
    /// 99th percentile stretch.
    pub stretch_p99: f64,
    /// Mean stretch.
    pub stretch_mean: f64,
    /// Median true rank of the predicted nearest (1 = best).
    pub nn_true_rank_median: f64,
    /// 90th percentile true rank.
    pub nn_true_rank_p90: f64,
    /// Fraction of nodes whose true nearest is among the 3 best estimates.
    pub nn_recall_at_3: f64,
    /// Same among the 5 best.
    pub nn_recall_at_5: f64,
    /// Median extra RTT of the predicted nearest over the true nearest, ms.
    pub nn_extra_ms_median: f64,
    /// 90th percentile of the same.
    pub nn_extra_ms_p90: f64,
    /// Median of the nodes' own error estimates.
    pub coord_error_estimate_median: f64,
    /// Median height, ms.
    pub height_median_ms: f64,
    /// Median adjustment, ms.
    pub adjustment_median_ms: f64,
    /// NaN/Inf resets over all nodes.
    pub resets: u64,
}

/// Estimates against each pair's own sample distribution in the series
/// (the harness's `series_tail`).
#[derive(Debug, Clone, Serialize)]
pub struct SeriesTail {
    /// Pairs with at least two samples.
    pub pairs: usize,
    /// Median relative error of the estimate against the pair's p50.
    pub rel_err_vs_pair_p50_median: f64,
    /// 99th percentile of the same.
    pub rel_err_vs_pair_p50_p99: f64,
    /// Median of estimate / pair p99.
    pub est_over_pair_p99_median: f64,
    /// 10th percentile of estimate / pair p99.
    pub est_over_pair_p99_p10: f64,
    /// Fraction of pairs whose estimate is below their p99.
    pub frac_pairs_est_below_pair_p99: f64,
    /// Median over pairs of p99 / p50.
    pub pair_p99_over_p50_median: f64,
}

/// One scored pair, for `--out` CSVs and plots.
#[derive(Debug, Clone, Copy)]
pub struct PairScore {
    /// Lower node index.
    pub i: u32,
    /// Higher node index.
    pub j: u32,
    /// Truth, ms.
    pub actual_ms: f64,
    /// Estimate, ms.
    pub estimate_ms: f64,
}

/// One node's nearest-neighbour outcome, for `--out` CSVs.
#[derive(Debug, Clone, Copy)]
pub struct NodeScore {
    /// The node.
    pub node: u32,
    /// Its true nearest peer.
    pub true_nearest: u32,
    /// The peer its coordinates call nearest.
    pub predicted_nearest: u32,
    /// RTT to the predicted / RTT to the true nearest.
    pub stretch: f64,
}

/// A running simulation.
pub struct Simulation<'a> {
    truth: &'a Matrix,
    series: Option<&'a Series>,
    cfg: SimConfig,
    nodes: Vec<Node<u32>>,
    known: Vec<Vec<u32>>,
    order: Vec<Vec<u32>>,
    pos: Vec<usize>,
    /// Peer choice and jitter.
    rng: ChaCha8Rng,
    /// Randomness the engines draw (coincident points).
    engine_rng: ChaCha8Rng,
    round: usize,
    updates: u64,
    rejected: u64,
    observe_missing: u64,
    convergence: Vec<[f64; 2]>,
    rounds_log: Vec<RoundRecord>,
    /// Per-node RTT distributions (with `cfg.tomography`).
    tomos: Vec<Tomography<u32>>,
    /// Held-out pairs: bit `i * n + j` set for both orders.
    held_out: Vec<u64>,
}

/// Accuracy after a round, for `rounds.csv`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoundRecord {
    /// Rounds done.
    pub round: usize,
    /// Median relative error.
    pub median_rel_err: f64,
    /// 90th percentile relative error.
    pub p90_rel_err: f64,
    /// 99th percentile relative error.
    pub p99_rel_err: f64,
    /// Nearest-neighbour accuracy.
    pub nn_accuracy: f64,
    /// Recall@5.
    pub nn_recall_at_5: f64,
}

/// One pre-generated update for the throughput loop.
#[derive(Debug, Clone, Copy)]
pub struct BenchOp {
    i: u32,
    j: u32,
    rtt_s: f64,
}

impl<'a> Simulation<'a> {
    /// Sets up `truth.n` nodes at the origin. `truth` must be symmetrized.
    pub fn new(
        truth: &'a Matrix,
        series: Option<&'a Series>,
        cfg: SimConfig,
    ) -> Result<Self, SimError> {
        let n = truth.n;
        if n < 2 {
            return Err(SimError::TooFewNodes(n));
        }
        if cfg.k == 0 {
            return Err(SimError::Param("k must be >= 1".into()));
        }
        if !(cfg.jitter.is_finite() && cfg.jitter >= 0.0) {
            return Err(SimError::Param("jitter must be finite and >= 0".into()));
        }
        if !(0.0..1.0).contains(&cfg.holdout) {
            return Err(SimError::Param("holdout must be in [0, 1)".into()));
        }
        if let Some(s) = series {
            let needed = truth.orig.iter().max().map_or(0, |m| m + 1);
            if s.n < needed {
                return Err(SimError::SeriesTooSmall {
                    series: s.n,
                    needed,
                });
            }
        }
        let held_out = hold_out(n, cfg.holdout, cfg.seed);
        let mut known = vec![Vec::new(); n];
        for (i, row) in known.iter_mut().enumerate() {
            for j in 0..n {
                if j != i && truth.at(i, j) > 0.0 && !bit(&held_out, i * n + j) {
                    row.push(j as u32);
                }
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let engine_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x5EED_0FE1_617E);
        let mut order = Vec::new();
        if cfg.select == Select::Shuffle {
            order = known.clone();
            for o in order.iter_mut() {
                o.shuffle(&mut rng);
            }
        }
        let nodes = (0..n)
            .map(|_| Node::new(cfg.engine.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let tomos = match &cfg.tomography {
            Some(t) => (0..n).map(|_| Tomography::new(t.clone())).collect(),
            None => Vec::new(),
        };
        Ok(Simulation {
            truth,
            series,
            nodes,
            tomos,
            held_out,
            pos: vec![0; n],
            known,
            order,
            rng,
            engine_rng,
            round: 0,
            updates: 0,
            rejected: 0,
            observe_missing: 0,
            convergence: Vec::new(),
            rounds_log: Vec::new(),
            cfg,
        })
    }

    /// Number of nodes.
    pub fn n(&self) -> usize {
        self.nodes.len()
    }

    /// Rounds done.
    pub fn round(&self) -> usize {
        self.round
    }

    /// Updates applied and rejected so far.
    pub fn update_counts(&self) -> (u64, u64) {
        (self.updates, self.rejected)
    }

    /// Probes that found no sample in the observation series.
    pub fn observe_missing(&self) -> u64 {
        self.observe_missing
    }

    /// `[round, median_rel_err]` pairs recorded with `eval_every`.
    pub fn convergence(&self) -> &[[f64; 2]] {
        &self.convergence
    }

    /// Per-round accuracy records (with `eval_every`).
    pub fn rounds_log(&self) -> &[RoundRecord] {
        &self.rounds_log
    }

    /// The published coordinates, one per node.
    pub fn coordinates(&self) -> Vec<Coordinate> {
        self.nodes.iter().map(|n| n.published().clone()).collect()
    }

    /// Nodes' engines (read-only).
    pub fn nodes(&self) -> &[Node<u32>] {
        &self.nodes
    }

    fn pick(&mut self, i: usize) -> u32 {
        match self.cfg.select {
            Select::Random => {
                let k = &self.known[i];
                k[self.rng.random_range(0..k.len())]
            }
            Select::Shuffle => {
                if self.pos[i] >= self.order[i].len() {
                    self.order[i].shuffle(&mut self.rng);
                    self.pos[i] = 0;
                }
                let j = self.order[i][self.pos[i]];
                self.pos[i] += 1;
                j
            }
        }
    }

    /// The RTT node `i` observes to `j` in the current round, ms; `None`
    /// when the series has no sample (a lost probe).
    fn observe(&mut self, i: usize, j: usize) -> Option<f64> {
        let mut v = self.truth.at(i, j);
        if let Some(s) = self.series {
            let t = self.round % s.slices.len();
            let (oi, oj) = (self.truth.orig[i], self.truth.orig[j]);
            let mut x = s.at(t, oi, oj) as f64;
            if x <= 0.0 {
                x = s.at(t, oj, oi) as f64;
            }
            if x <= 0.0 {
                self.observe_missing += 1;
                return None;
            }
            v = x;
        }
        if self.cfg.jitter > 0.0 {
            let jt = self.cfg.jitter;
            v *= match self.cfg.jitter_mode {
                JitterMode::Sym => 1.0 + jt * (2.0 * self.rng.random::<f64>() - 1.0),
                JitterMode::Queue => 1.0 + jt * normal(&mut self.rng).abs(),
            };
        }
        Some(v.max(0.0))
    }

    /// Feeds node `i` one sample from `j` (ms). Returns false if rejected.
    fn feed(&mut self, i: usize, j: usize, rtt_ms: f64) -> bool {
        if let Some(t) = self.tomos.get_mut(i) {
            // The distribution layer sees the raw sample and what the
            // coordinates predicted just before it.
            let est = self.nodes[i]
                .published()
                .distance_to(self.nodes[j].published());
            let now = std::time::Duration::from_secs(self.round as u64);
            let _ = t.record(
                &(j as u32),
                rtt_ms / 1000.0,
                (est > 0.0).then_some(est),
                now,
            );
        }
        let (a, b) = two_mut(&mut self.nodes, i, j);
        let ok = a
            .update(
                &(j as u32),
                b.coordinate(),
                rtt_ms / 1000.0,
                &mut self.engine_rng,
            )
            .is_ok();
        if ok {
            self.updates += 1;
        } else {
            self.rejected += 1;
        }
        ok
    }

    /// Runs one round: every node probes `k` peers.
    pub fn step_round(&mut self) {
        for i in 0..self.nodes.len() {
            if self.known[i].is_empty() {
                continue;
            }
            for _ in 0..self.cfg.k {
                let j = self.pick(i) as usize;
                if let Some(rtt) = self.observe(i, j) {
                    self.feed(i, j, rtt);
                }
            }
        }
        self.round += 1;
        let e = self.cfg.eval_every;
        if e > 0 && (self.round.is_multiple_of(e) || self.round == 1) {
            let ev = self.evaluate(None, None);
            self.convergence
                .push([self.round as f64, ev.median_rel_err]);
            self.rounds_log.push(RoundRecord {
                round: self.round,
                median_rel_err: ev.median_rel_err,
                p90_rel_err: ev.p90_rel_err,
                p99_rel_err: ev.p99_rel_err,
                nn_accuracy: ev.nn_accuracy,
                nn_recall_at_5: ev.nn_recall_at_5,
            });
        }
    }

    /// Runs every remaining round, calling `progress(round)` after each.
    pub fn run(&mut self, mut progress: impl FnMut(usize)) {
        while self.round < self.cfg.rounds {
            self.step_round();
            progress(self.round);
        }
    }

    /// Scores the published coordinates against the truth. When given,
    /// `pairs_out` receives every scored pair (or every `stride`-th when
    /// there are more than its capacity) and `nodes_out` every node's
    /// nearest-neighbour outcome.
    pub fn evaluate(
        &self,
        pairs_out: Option<&mut Vec<PairScore>>,
        nodes_out: Option<&mut Vec<NodeScore>>,
    ) -> Evaluation {
        evaluate(
            self.truth,
            &self.coordinates(),
            &self.nodes,
            pairs_out,
            nodes_out,
        )
    }

    /// Compares final estimates with each pair's sample distribution in the
    /// observation series (both directions pooled), as the harness does.
    pub fn tail_evaluation(&self) -> Option<SeriesTail> {
        let s = self.series?;
        let n = self.truth.n;
        let coords = self.coordinates();
        let (mut e50, mut rat, mut r9950) = (Vec::new(), Vec::new(), Vec::new());
        let mut below = 0usize;
        let mut buf = Vec::with_capacity(2 * s.slices.len());
        for i in 0..n {
            for j in i + 1..n {
                buf.clear();
                let (oi, oj) = (self.truth.orig[i], self.truth.orig[j]);
                for t in 0..s.slices.len() {
                    let a = s.at(t, oi, oj);
                    if a > 0.0 {
                        buf.push(a as f64);
                    }
                    let b = s.at(t, oj, oi);
                    if b > 0.0 {
                        buf.push(b as f64);
                    }
                }
                if buf.len() < 2 {
                    continue;
                }
                buf.sort_by(f64::total_cmp);
                let (p50, p99) = (quantile_sorted(&buf, 0.5), quantile_sorted(&buf, 0.99));
                let est = coords[i].distance_to(&coords[j]) * 1000.0;
                e50.push((est - p50).abs() / p50);
                rat.push(est / p99);
                r9950.push(p99 / p50);
                if est < p99 {
                    below += 1;
                }
            }
        }
        if e50.is_empty() {
            return None;
        }
        let pairs = e50.len();
        let q1 = quantiles_unsorted(&mut e50, &[0.5, 0.99]);
        let q2 = quantiles_unsorted(&mut rat, &[0.1, 0.5]);
        let q3 = quantiles_unsorted(&mut r9950, &[0.5]);
        Some(SeriesTail {
            pairs,
            rel_err_vs_pair_p50_median: q1[0],
            rel_err_vs_pair_p50_p99: q1[1],
            est_over_pair_p99_median: q2[1],
            est_over_pair_p99_p10: q2[0],
            frac_pairs_est_below_pair_p99: below as f64 / pairs as f64,
            pair_p99_over_p50_median: q3[0],
        })
    }

    /// Whether the pair was held out (never probed).
    pub fn is_held_out(&self, i: usize, j: usize) -> bool {
        bit(&self.held_out, i * self.nodes.len() + j)
    }

    /// Per-node RTT distributions (empty without `cfg.tomography`).
    pub fn tomographies(&self) -> &[Tomography<u32>] {
        &self.tomos
    }

    /// Scores p50/p99 estimates against each pair's samples in the
    /// observation series (the `tail` block); `None` without a series or
    /// tomography. `pairs_out` receives every scored pair.
    pub fn distribution_evaluation(
        &self,
        pairs_out: Option<&mut Vec<TailPair>>,
    ) -> Option<TailEvaluation> {
        let series = self.series?;
        if self.tomos.is_empty() {
            return None;
        }
        Some(tail::evaluate(self, series, pairs_out))
    }

    /// Pre-generates `count` updates (random node, random known peer, the
    /// RTT it would observe now) for a throughput loop, as the harness does.
    pub fn bench_ops(&mut self, count: usize) -> Vec<BenchOp> {
        let n = self.nodes.len();
        let mut ops = Vec::with_capacity(count);
        if self.known.iter().all(Vec::is_empty) {
            return ops;
        }
        while ops.len() < count {
            let i = self.rng.random_range(0..n);
            if self.known[i].is_empty() {
                continue;
            }
            let j = self.known[i][self.rng.random_range(0..self.known[i].len())] as usize;
            let rtt = self.observe(i, j).unwrap_or_else(|| self.truth.at(i, j));
            ops.push(BenchOp {
                i: i as u32,
                j: j as u32,
                rtt_s: rtt / 1000.0,
            });
        }
        ops
    }

    /// Snapshot of the coordinates the throughput loop feeds as peers'.
    pub fn bench_snapshot(&self) -> Vec<Coordinate> {
        self.nodes.iter().map(|n| n.coordinate().clone()).collect()
    }

    /// Applies pre-generated updates against a fixed coordinate snapshot
    /// (the loop the caller times). Returns how many were accepted.
    pub fn apply_bench_ops(&mut self, ops: &[BenchOp], snapshot: &[Coordinate]) -> usize {
        let mut ok = 0;
        for o in ops {
            if self.nodes[o.i as usize]
                .update(&o.j, &snapshot[o.j as usize], o.rtt_s, &mut self.engine_rng)
                .is_ok()
            {
                ok += 1;
            }
        }
        ok
    }
}

/// The held-out pair set: each unordered pair is held out with probability
/// `fraction`, from an RNG of its own so the choice depends only on the seed.
fn hold_out(n: usize, fraction: f64, seed: u64) -> Vec<u64> {
    let mut bits = vec![0u64; (n * n).div_ceil(64)];
    if fraction <= 0.0 {
        return bits;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4001_D000);
    for i in 0..n {
        for j in i + 1..n {
            if rng.random::<f64>() < fraction {
                for k in [i * n + j, j * n + i] {
                    bits[k / 64] |= 1 << (k % 64);
                }
            }
        }
    }
    bits
}

#[inline]
fn bit(bits: &[u64], k: usize) -> bool {
    bits[k / 64] & (1 << (k % 64)) != 0
}

/// Mutable and shared borrows of two different elements.
fn two_mut<T>(v: &mut [T], i: usize, j: usize) -> (&mut T, &T) {
    assert_ne!(i, j);
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        (&mut lo[i], &hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(i);
        (&mut hi[0], &lo[j])
    }
}

/// Most pairs kept for `pairs.csv`; larger runs keep an even sample.
pub const MAX_PAIR_SCORES: usize = 250_000;

/// Scores coordinates against a symmetrized truth matrix (harness
/// definitions).
pub fn evaluate<K: std::hash::Hash + Eq + Clone>(
    m: &Matrix,
    coords: &[Coordinate],
    nodes: &[Node<K>],
    mut pairs_out: Option<&mut Vec<PairScore>>,
    mut nodes_out: Option<&mut Vec<NodeScore>>,
) -> Evaluation {
    let n = m.n;
    let total_pairs = m.known_pairs();
    let stride = total_pairs.div_ceil(MAX_PAIR_SCORES).max(1);
    let mut rel = Vec::with_capacity(total_pairs);
    let mut abs = Vec::with_capacity(total_pairs);
    let mut row = vec![0.0f64; n];
    let (mut stretch, mut ranks, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    let (mut correct, mut hit3, mut hit5) = (0usize, 0usize, 0usize);
    let mut seen = 0usize;
    for i in 0..n {
        for (j, r) in row.iter_mut().enumerate() {
            *r = if j == i {
                0.0
            } else {
                coords[i].distance_to(&coords[j]) * 1000.0
            };
        }
        for (j, &e) in row.iter().enumerate().skip(i + 1) {
            let act = m.at(i, j);
            if act <= 0.0 {
                continue;
            }
            rel.push((e - act).abs() / act);
            abs.push((e - act).abs());
            if let Some(p) = pairs_out.as_deref_mut()
                && seen.is_multiple_of(stride)
            {
                {
                    p.push(PairScore {
                        i: i as u32,
                        j: j as u32,
                        actual_ms: act,
                        estimate_ms: e,
                    });
                }
            }
            seen += 1;
        }
        // Nearest neighbour among peers with a known RTT.
        let (mut best_true, mut best_est) = (usize::MAX, usize::MAX);
        let (mut true_min, mut est_min) = (0.0, 0.0);
        for (j, &e) in row.iter().enumerate() {
            let act = m.at(i, j);
            if j == i || act <= 0.0 {
                continue;
            }
            if best_true == usize::MAX || act < true_min {
                best_true = j;
                true_min = act;
            }
            if best_est == usize::MAX || e < est_min {
                best_est = j;
                est_min = e;
            }
        }
        if best_true == usize::MAX {
            continue;
        }
        let picked = m.at(i, best_est);
        let tol = true_min * (1.0 + 1e-9);
        if picked <= tol {
            correct += 1;
        }
        stretch.push(picked / true_min);
        let mut rank = 1.0;
        let mut est_true = f64::INFINITY;
        for (j, &e) in row.iter().enumerate() {
            let act = m.at(i, j);
            if j == i || act <= 0.0 {
                continue;
            }
            if act < picked * (1.0 - 1e-9) {
                rank += 1.0;
            }
            if act <= tol {
                est_true = est_true.min(e);
            }
        }
        ranks.push(rank);
        let mut closer = 0usize;
        for (j, &e) in row.iter().enumerate() {
            let act = m.at(i, j);
            if j != i && act > tol && e < est_true {
                closer += 1;
            }
        }
        extra.push(picked - true_min);
        if closer < 3 {
            hit3 += 1;
        }
        if closer < 5 {
            hit5 += 1;
        }
        if let Some(o) = nodes_out.as_deref_mut() {
            o.push(NodeScore {
                node: i as u32,
                true_nearest: best_true as u32,
                predicted_nearest: best_est as u32,
                stretch: picked / true_min,
            });
        }
    }
    let mut ev = Evaluation {
        pairs: rel.len(),
        mean_rel_err: mean(&rel),
        max_rel_err: rel.iter().copied().fold(f64::NAN, f64::max),
        ..Default::default()
    };
    let q = quantiles_unsorted(&mut rel, &[0.5, 0.9, 0.99]);
    (ev.median_rel_err, ev.p90_rel_err, ev.p99_rel_err) = (q[0], q[1], q[2]);
    let q = quantiles_unsorted(&mut abs, &[0.5, 0.99]);
    (ev.median_abs_err_ms, ev.p99_abs_err_ms) = (q[0], q[1]);
    ev.nn_nodes = stretch.len();
    if !stretch.is_empty() {
        let k = stretch.len() as f64;
        ev.nn_accuracy = correct as f64 / k;
        ev.nn_recall_at_3 = hit3 as f64 / k;
        ev.nn_recall_at_5 = hit5 as f64 / k;
    }
    ev.stretch_mean = mean(&stretch);
    let q = quantiles_unsorted(&mut stretch, &[0.5, 0.9, 0.99]);
    (ev.stretch_median, ev.stretch_p90, ev.stretch_p99) = (q[0], q[1], q[2]);
    let q = quantiles_unsorted(&mut extra, &[0.5, 0.9]);
    (ev.nn_extra_ms_median, ev.nn_extra_ms_p90) = (q[0], q[1]);
    let q = quantiles_unsorted(&mut ranks, &[0.5, 0.9]);
    (ev.nn_true_rank_median, ev.nn_true_rank_p90) = (q[0], q[1]);
    let mut ce: Vec<f64> = coords.iter().map(|c| c.error).collect();
    let mut hs: Vec<f64> = coords.iter().map(|c| c.height * 1e3).collect();
    let mut ad: Vec<f64> = coords.iter().map(|c| c.adjustment * 1e3).collect();
    ev.coord_error_estimate_median = quantiles_unsorted(&mut ce, &[0.5])[0];
    ev.height_median_ms = quantiles_unsorted(&mut hs, &[0.5])[0];
    ev.adjustment_median_ms = quantiles_unsorted(&mut ad, &[0.5])[0];
    ev.resets = nodes.iter().map(|n| n.stats().resets).sum();
    ev
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{GeoOptions, Synthetic, generate};

    fn sym(kind: Synthetic, n: usize) -> Matrix {
        let mut m = generate(kind, n, 1, &GeoOptions::default()).unwrap().matrix;
        m.symmetrize();
        m
    }

    #[test]
    fn deterministic_for_a_seed() {
        let m = sym(Synthetic::Geo, 40);
        let run = |seed| {
            let mut s = Simulation::new(
                &m,
                None,
                SimConfig {
                    rounds: 50,
                    seed,
                    ..Default::default()
                },
            )
            .unwrap();
            s.run(|_| {});
            s.coordinates()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn both_profiles_embed_a_grid_accurately() {
        let m = sym(Synthetic::Grid, 25);
        for engine in [vivaldi::Config::serf(), vivaldi::Config::tomo()] {
            let p = engine.profile;
            let mut s = Simulation::new(
                &m,
                None,
                SimConfig {
                    engine,
                    ..Default::default()
                },
            )
            .unwrap();
            s.run(|_| {});
            let ev = s.evaluate(None, None);
            assert_eq!(ev.pairs, 300);
            assert!(ev.median_rel_err < 0.02, "{p}: {ev:?}");
            assert!(ev.nn_accuracy > 0.9, "{p}: {ev:?}");
        }
    }

    #[test]
    fn perfect_coordinates_score_perfectly() {
        // Nodes on a line with exact coordinates: zero error, NN always right.
        let m = sym(Synthetic::Line, 10);
        let cfg = vivaldi::Config::serf();
        let coords: Vec<Coordinate> = (0..10)
            .map(|i| {
                let mut c = Coordinate::origin(&cfg);
                c.height = 0.0;
                c.vec[0] = i as f64 * 0.010;
                c
            })
            .collect();
        let nodes: Vec<Node<u32>> = (0..10).map(|_| Node::new(cfg.clone()).unwrap()).collect();
        let ev = evaluate(&m, &coords, &nodes, None, None);
        assert!(ev.max_rel_err < 1e-9);
        assert_eq!(ev.nn_accuracy, 1.0);
        assert_eq!(ev.nn_recall_at_3, 1.0);
        assert_eq!(ev.stretch_p99, 1.0);
    }

    #[test]
    fn rejects_bad_parameters() {
        let m = sym(Synthetic::Line, 10);
        assert!(
            Simulation::new(
                &m,
                None,
                SimConfig {
                    k: 0,
                    ..Default::default()
                }
            )
            .is_err()
        );
        assert!(
            Simulation::new(
                &m,
                None,
                SimConfig {
                    jitter: f64::NAN,
                    ..Default::default()
                }
            )
            .is_err()
        );
        let one = Matrix::empty(1);
        assert!(matches!(
            Simulation::new(&one, None, SimConfig::default()),
            Err(SimError::TooFewNodes(1))
        ));
    }
}
