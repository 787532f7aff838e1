//! Scoring p50/p99 estimates against real per-pair sample distributions:
//! the `tail` block of `tomo sim --observe SERIES`.
//!
//! Each pair's actual distribution is every sample the series holds for it
//! (both directions pooled, as the serf harness's `series_tail` does); the
//! prediction is [`pair_estimate`] from the two ends' tomographies. Pairs
//! are scored in two groups: probed (the engine could sample them) and held
//! out (never probed), plus datacenter pairs where nodes carry labels, and
//! the coordinate estimate used as a p99 for comparison.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Simulation;
use crate::dataset::Series;
use crate::stats::quantiles_unsorted;
use crate::tomography::{RttSketch, Source, pair_estimate};

/// Figures for one group of pairs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TailGroup {
    /// Pairs scored (with at least two real samples).
    pub pairs: usize,
    /// Real samples behind them.
    pub samples: u64,
    /// Pooled fraction of real samples above their pair's predicted p99
    /// (1 % is perfect calibration).
    pub p99_exceed_rate: f64,
    /// Median over pairs of |ln(predicted p99 / actual p99)|.
    pub p99_log_ratio_median: f64,
    /// 90th percentile of the same.
    pub p99_log_ratio_p90: f64,
    /// Median over pairs of |ln(predicted p50 / actual p50)|.
    pub p50_log_ratio_median: f64,
    /// Fraction of pairs whose predicted p99 is below their actual p99.
    pub p99_under_fraction: f64,
    /// Pairs whose estimate was measured (had samples) rather than predicted.
    pub measured_pairs: usize,
}

/// The coordinate estimate used as a p99 (what Consul offers), per group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PointGroups {
    /// Probed pairs.
    pub probed: TailGroup,
    /// Held-out pairs.
    pub held_out: TailGroup,
}

/// The `tail` block.
#[derive(Debug, Clone, Serialize)]
pub struct TailEvaluation {
    /// Fraction of pairs held out.
    pub holdout: f64,
    /// The tail quantile predicted ("p99").
    pub quantile: f64,
    /// Pairs the engine could probe.
    pub probed: TailGroup,
    /// Pairs it never probed.
    pub held_out: TailGroup,
    /// Datacenter pairs (all samples of all their node pairs pooled), when
    /// nodes carry labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dc: Option<TailGroup>,
    /// The same figures with the coordinate estimate as both p50 and p99.
    pub coordinate_as_p99: PointGroups,
    /// Bytes of one per-peer sketch.
    pub bytes_per_peer: usize,
}

/// One scored pair, for `tail_pairs.csv` and the calibration plot.
#[derive(Debug, Clone, Copy)]
pub struct TailPair {
    /// Lower node index.
    pub i: u32,
    /// Higher node index.
    pub j: u32,
    /// Never probed.
    pub held_out: bool,
    /// How the estimate was obtained.
    pub source: Source,
    /// Samples of the pair the tomographies hold.
    pub sketch_samples: u32,
    /// Predicted p50 and p99, ms.
    pub pred_p50_ms: f64,
    /// Predicted p99, ms.
    pub pred_p99_ms: f64,
    /// Actual p50 and p99 over the series, ms.
    pub actual_p50_ms: f64,
    /// Actual p99, ms.
    pub actual_p99_ms: f64,
    /// The coordinate estimate, ms.
    pub coordinate_ms: f64,
    /// Real samples above the predicted p99.
    pub exceed: u32,
    /// Real samples.
    pub real_samples: u32,
}

/// Accumulates one group's figures.
#[derive(Default)]
struct Acc {
    exceed: u64,
    samples: u64,
    under: usize,
    measured: usize,
    p99_ratios: Vec<f64>,
    p50_ratios: Vec<f64>,
}

impl Acc {
    /// Adds a pair with sorted real samples `s` and predictions.
    fn add(&mut self, s: &[f64], pred_p50: f64, pred_p99: f64, measured: bool, tail_q: f64) -> u32 {
        let exceed = s.len() - s.partition_point(|v| *v <= pred_p99);
        let (p50, p99) = (quantile(s, 0.5), quantile(s, tail_q));
        self.exceed += exceed as u64;
        self.samples += s.len() as u64;
        self.p99_ratios.push((pred_p99 / p99).ln().abs());
        self.p50_ratios.push((pred_p50 / p50).ln().abs());
        if pred_p99 < p99 {
            self.under += 1;
        }
        if measured {
            self.measured += 1;
        }
        exceed as u32
    }

    fn finish(mut self) -> TailGroup {
        let pairs = self.p99_ratios.len();
        let q99 = quantiles_unsorted(&mut self.p99_ratios, &[0.5, 0.9]);
        let q50 = quantiles_unsorted(&mut self.p50_ratios, &[0.5]);
        TailGroup {
            pairs,
            samples: self.samples,
            p99_exceed_rate: if self.samples > 0 {
                self.exceed as f64 / self.samples as f64
            } else {
                f64::NAN
            },
            p99_log_ratio_median: q99[0],
            p99_log_ratio_p90: q99[1],
            p50_log_ratio_median: q50[0],
            p99_under_fraction: if pairs > 0 {
                self.under as f64 / pairs as f64
            } else {
                f64::NAN
            },
            measured_pairs: self.measured,
        }
    }
}

/// Nearest-rank quantile of a sorted slice.
fn quantile(s: &[f64], q: f64) -> f64 {
    crate::stats::quantile_sorted(s, q)
}

/// A datacenter pair's pooled real samples and its node pairs' (p50, p99)
/// predictions, ms.
type DcPool = (Vec<f64>, Vec<(f64, f64)>);

/// Scores every pair with at least two real samples.
pub(super) fn evaluate(
    sim: &Simulation<'_>,
    series: &Series,
    mut pairs_out: Option<&mut Vec<TailPair>>,
) -> TailEvaluation {
    let truth = sim.truth;
    let n = truth.n;
    let tq = sim.tomos[0].config().tail_quantile;
    let coords = sim.coordinates();
    let (mut probed, mut held) = (Acc::default(), Acc::default());
    let (mut point_probed, mut point_held) = (Acc::default(), Acc::default());
    // Datacenter pairs: pooled samples and each node pair's prediction.
    let mut dcs: BTreeMap<(String, String), DcPool> = BTreeMap::new();
    let mut buf = Vec::with_capacity(2 * series.slices.len());
    for i in 0..n {
        for j in i + 1..n {
            buf.clear();
            let (oi, oj) = (truth.orig[i], truth.orig[j]);
            for t in 0..series.slices.len() {
                for v in [series.at(t, oi, oj), series.at(t, oj, oi)] {
                    if v > 0.0 {
                        buf.push(v as f64);
                    }
                }
            }
            if buf.len() < 2 {
                continue;
            }
            buf.sort_by(f64::total_cmp);
            let (ti, tj) = (&sim.tomos[i], &sim.tomos[j]);
            let coord_s = coords[i].distance_to(&coords[j]);
            let e = pair_estimate(
                ti,
                tj,
                ti.sketch(&(j as u32)),
                tj.sketch(&(i as u32)),
                coord_s,
            );
            let (p50, p99, coord_ms) = (e.p50 * 1e3, e.p99 * 1e3, coord_s * 1e3);
            let is_held = sim.is_held_out(i, j);
            let measured = e.source == Source::Measured;
            let (acc, point) = if is_held {
                (&mut held, &mut point_held)
            } else {
                (&mut probed, &mut point_probed)
            };
            let exceed = acc.add(&buf, p50, p99, measured, tq);
            point.add(&buf, coord_ms, coord_ms, false, tq);
            if let Some(labels) = &truth.labels {
                let (a, b) = (&labels[i], &labels[j]);
                let key = if a <= b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                };
                let entry = dcs.entry(key).or_default();
                entry.0.extend_from_slice(&buf);
                entry.1.push((p50, p99));
            }
            if let Some(out) = pairs_out.as_deref_mut() {
                out.push(TailPair {
                    i: i as u32,
                    j: j as u32,
                    held_out: is_held,
                    source: e.source,
                    sketch_samples: e.samples,
                    pred_p50_ms: p50,
                    pred_p99_ms: p99,
                    actual_p50_ms: quantile(&buf, 0.5),
                    actual_p99_ms: quantile(&buf, tq),
                    coordinate_ms: coord_ms,
                    exceed,
                    real_samples: buf.len() as u32,
                });
            }
        }
    }
    let dc = (!dcs.is_empty()).then(|| {
        let mut acc = Acc::default();
        for (mut samples, preds) in dcs.into_values() {
            if samples.len() < 2 {
                continue;
            }
            samples.sort_by(f64::total_cmp);
            let p50 = mixture_quantile(&preds, 0.5, tq);
            let p99 = mixture_quantile(&preds, tq, tq);
            acc.add(&samples, p50, p99, true, tq);
        }
        acc.finish()
    });
    TailEvaluation {
        holdout: sim.cfg.holdout,
        quantile: tq,
        probed: probed.finish(),
        held_out: held.finish(),
        dc,
        coordinate_as_p99: PointGroups {
            probed: point_probed.finish(),
            held_out: point_held.finish(),
        },
        bytes_per_peer: RttSketch::bytes(),
    }
}

/// Standard normal quantile of the tail quantile `q` (for 0.99: 2.326).
fn z_of(q: f64) -> f64 {
    // Bisection on the CDF: called a handful of times per evaluation.
    let (mut lo, mut hi) = (-8.0, 8.0);
    for _ in 0..80 {
        let mid = 0.5 * (lo + hi);
        if normal_cdf(mid) < q {
            lo = mid
        } else {
            hi = mid
        }
    }
    0.5 * (lo + hi)
}

/// Standard normal CDF (Abramowitz & Stegun 7.1.26, error < 1.5e-7).
fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs() / std::f64::consts::SQRT_2);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The `q` quantile of an equal-weight mixture of log-normal pair
/// distributions, each fixed by its (p50, tail-quantile `tq`) prediction.
fn mixture_quantile(preds: &[(f64, f64)], q: f64, tq: f64) -> f64 {
    let z = z_of(tq);
    let params: Vec<(f64, f64)> = preds
        .iter()
        .map(|(p50, p99)| (p50.ln(), ((p99 / p50).ln() / z).max(1e-4)))
        .collect();
    let cdf = |x: f64| {
        params
            .iter()
            .map(|(mu, s)| normal_cdf((x - mu) / s))
            .sum::<f64>()
            / params.len() as f64
    };
    let lo0 = params
        .iter()
        .map(|(m, s)| m - 8.0 * s)
        .fold(f64::INFINITY, f64::min);
    let hi0 = params
        .iter()
        .map(|(m, s)| m + 8.0 * s)
        .fold(f64::NEG_INFINITY, f64::max);
    let (mut lo, mut hi) = (lo0, hi0);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if cdf(mid) < q { lo = mid } else { hi = mid }
    }
    (0.5 * (lo + hi)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantiles() {
        assert!((z_of(0.99) - 2.3263).abs() < 1e-3);
        assert!((z_of(0.5)).abs() < 1e-6);
        assert!((normal_cdf(1.0) - 0.841_344_7).abs() < 1e-6);
    }

    #[test]
    fn mixture_of_one_is_the_component() {
        let q = mixture_quantile(&[(10.0, 30.0)], 0.99, 0.99);
        assert!((q / 30.0 - 1.0).abs() < 1e-3, "{q}");
        let m = mixture_quantile(&[(10.0, 30.0)], 0.5, 0.99);
        assert!((m / 10.0 - 1.0).abs() < 1e-3, "{m}");
        // Two far-apart components: the median sits between them.
        let mid = mixture_quantile(&[(10.0, 11.0), (100.0, 110.0)], 0.5, 0.99);
        assert!(mid > 11.0 && mid < 100.0, "{mid}");
    }

    #[test]
    fn exceedance_counts_samples_above_the_prediction() {
        let mut acc = Acc::default();
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(acc.add(&s, 50.0, 95.0, true, 0.99), 5);
        let g = acc.finish();
        assert_eq!(g.samples, 100);
        assert!((g.p99_exceed_rate - 0.05).abs() < 1e-12);
        assert!((g.p99_log_ratio_median - (99.0f64 / 95.0).ln()).abs() < 1e-12);
        assert_eq!(g.p99_under_fraction, 1.0);
    }
}
