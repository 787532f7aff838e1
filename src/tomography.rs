//! RTT distributions: per-peer quantile sketches and calibrated p50/p99
//! estimates for pairs a node has probed and pairs it never has.
//!
//! A coordinate gives one number per pair and tracks the middle of the RTT
//! distribution. This module keeps what the tail needs:
//!
//! * per probed peer, an [`RttSketch`]: a log-bucketed histogram (buckets
//!   2 % wide, 10 µs to 10 s, 16-bit counts: 1 420 bytes) that
//!   forgets by halving every count after a fixed number of samples, so a
//!   changed path takes over the estimate within a few hundred samples;
//! * per node, the **tail excess** of its links: how far each sample lies
//!   above its peer's current median goes into a second sketch. On the
//!   measured series a pair's p99 is its median plus an excess set by its
//!   worse end (an end host's bufferbloat or a busy responder shows on every
//!   path through it, whatever the path's length: `sims/RESULTS.md`), so a
//!   node's excess carries over to pairs it has few or no samples of;
//! * per node, how its measured medians relate to its coordinate estimates
//!   (a second factor, so a predicted p50 is calibrated too).
//!
//! [`pair_estimate`] combines both ends' views: measured percentiles where
//! there are samples (the pair's own median, the ends' tail factor for the
//! p99 until the pair has enough samples for its own), predicted ones from
//! the coordinate estimate otherwise. Every [`Estimate`] says how it was
//! obtained and how much to trust it. Sans-IO: no clock, no files.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What can go wrong feeding the tomography.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TomographyError {
    /// NaN, infinite, zero, negative or over 10 s: rejected, nothing changes.
    #[error("invalid RTT sample {0} s: must be finite, > 0 and <= 10 s")]
    InvalidRtt(f64),
    /// A coordinate estimate that is not a finite positive number.
    #[error("invalid coordinate estimate {0} s")]
    InvalidEstimate(f64),
}

/// Smallest RTT a sketch resolves, seconds; smaller samples count here.
pub const SKETCH_MIN_S: f64 = 10e-6;
/// Largest RTT accepted (as the engine), seconds.
pub const SKETCH_MAX_S: f64 = 10.0;
/// Ratio of consecutive bucket bounds: buckets 2 % wide, so a quantile is
/// known within ±1 % (PlanetLab's whole p99/p50 spread is 3 %).
const GAMMA: f64 = 1.02;
/// Buckets from 10 µs to 10 s at ratio `GAMMA`: ⌈ln(1e6) / ln(1.02)⌉.
pub const SKETCH_BUCKETS: usize = 698;

/// A log-bucketed histogram of values in a fixed range with 16-bit counts
/// that forgets: once `halve_every` samples have arrived since the last
/// halving, every count is halved (rounding down), so old samples fade
/// geometrically and no count can overflow.
#[derive(Debug, Clone, PartialEq)]
pub struct RttSketch {
    counts: Box<[u16; SKETCH_BUCKETS]>,
    /// Sum of `counts`.
    total: u32,
    since_halving: u32,
    /// Lower bound of bucket 0 (10 µs for RTTs; other sketches shift it).
    floor: f32,
    /// Lowest bucket that may be non-empty: quantile walks start here, so a
    /// peer's samples (a narrow band) cost a few dozen steps, not hundreds.
    lo: u16,
    /// Halvings so far (their parity picks the rounding direction).
    halvings: u16,
    /// When the current half-life period began (time-based forgetting).
    decayed_at: Option<Duration>,
}

impl RttSketch {
    /// An empty sketch of RTTs (seconds, 10 µs … 10 s).
    pub fn new() -> Self {
        Self::with_floor(SKETCH_MIN_S)
    }

    /// An empty sketch covering `floor … floor·1e6`.
    pub fn with_floor(floor: f64) -> Self {
        RttSketch {
            counts: Box::new([0; SKETCH_BUCKETS]),
            total: 0,
            since_halving: 0,
            floor: floor as f32,
            lo: SKETCH_BUCKETS as u16,
            halvings: 0,
            decayed_at: None,
        }
    }

    /// Bytes this sketch occupies (struct plus its bucket array).
    pub fn bytes() -> usize {
        std::mem::size_of::<Self>() + std::mem::size_of::<[u16; SKETCH_BUCKETS]>()
    }

    fn bucket(&self, v: f64) -> usize {
        let x = (v / self.floor as f64).max(1.0);
        ((x.ln() / GAMMA.ln()) as usize).min(SKETCH_BUCKETS - 1)
    }

    /// Geometric middle of bucket `b`.
    fn value(&self, b: usize) -> f64 {
        self.floor as f64 * GAMMA.powf(b as f64 + 0.5)
    }

    /// Records one value (the caller has validated it), forgetting old ones
    /// every `halve_every` samples (0 = never).
    pub fn record(&mut self, v: f64, halve_every: u32) {
        let b = self.bucket(v);
        self.counts[b] = self.counts[b].saturating_add(1);
        self.lo = self.lo.min(b as u16);
        self.total += 1;
        self.since_halving += 1;
        if halve_every > 0 && self.since_halving >= halve_every {
            self.halve();
        }
    }

    fn halve(&mut self) {
        // Alternate rounding down and up between halvings: always rounding
        // down would wipe out sparse buckets (a tail of single samples)
        // while dense ones keep half, biasing every upper quantile low.
        let up = self.halvings & 1;
        self.halvings = self.halvings.wrapping_add(1);
        let mut total = 0u32;
        for c in self.counts.iter_mut() {
            *c = c.saturating_add(up) >> 1;
            total += *c as u32;
        }
        self.total = total;
        self.since_halving = 0;
    }

    /// Halves the counts once per `half_life` elapsed since the last time
    /// (a zero half-life never decays). After 16 half-lives nothing of the
    /// old weight is left and the sketch is cleared.
    pub fn decay_to(&mut self, now: Duration, half_life: Duration) {
        if half_life.is_zero() {
            return;
        }
        let Some(at) = self.decayed_at else {
            self.decayed_at = Some(now);
            return;
        };
        // The common case, checked without a (128-bit) division.
        if now < at + half_life {
            return;
        }
        let periods = now.saturating_sub(at).as_nanos() / half_life.as_nanos();
        if periods == 0 {
            return;
        }
        if periods >= 16 {
            self.counts.fill(0);
            self.total = 0;
            self.lo = SKETCH_BUCKETS as u16;
        } else {
            for _ in 0..periods {
                self.halve();
            }
        }
        self.decayed_at = Some(at + half_life * periods as u32);
    }

    /// Samples currently weighing in (after forgetting).
    pub fn count(&self) -> u32 {
        self.total
    }

    /// The nearest-rank `q` quantile (its bucket's geometric middle), or
    /// `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_bucket(q).map(|b| self.value(b))
    }

    /// The upper bound of the `q` quantile's bucket: never below the true
    /// quantile of the recorded values (used for tails, where erring low
    /// is the costly mistake).
    pub fn quantile_upper(&self, q: f64) -> Option<f64> {
        self.quantile_bucket(q)
            .map(|b| self.floor as f64 * GAMMA.powf(b as f64 + 1.0))
    }

    fn quantile_bucket(&self, q: f64) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u32).clamp(1, self.total);
        let mut seen = 0u32;
        let lo = self.lo as usize;
        for (b, c) in self.counts.iter().enumerate().skip(lo) {
            seen += *c as u32;
            if seen >= rank {
                return Some(b);
            }
        }
        Some(SKETCH_BUCKETS - 1)
    }

    /// Adds `other`'s counts to this one (both must share a floor).
    pub fn merge(&mut self, other: &RttSketch) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a = a.saturating_add(*b);
        }
        self.lo = self.lo.min(other.lo);
        self.total = self.counts.iter().map(|c| *c as u32).sum();
    }
}

impl Default for RttSketch {
    fn default() -> Self {
        Self::new()
    }
}

/// Parameters of a node's tomography.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TomographyConfig {
    /// Half-life of a peer's samples, seconds: after a path changes, its
    /// new RTTs outweigh the old within a few half-lives.
    pub peer_half_life_s: f64,
    /// Half-life of the node-wide tail excess and coordinate calibration,
    /// seconds (they pool every peer, so they can remember longer).
    pub node_half_life_s: f64,
    /// Also halve a peer's sketch after this many samples (bounds the 16-bit
    /// counts when samples come fast).
    pub peer_halve_every: u32,
    /// The same bound for the node-wide sketches.
    pub node_halve_every: u32,
    /// A pair's own p99 is trusted alone from this many samples on; below,
    /// it is blended with the ends' tail factor.
    pub direct_p99_samples: u32,
    /// The quantile called "p99".
    pub tail_quantile: f64,
    /// Which quantile of a node's pooled excesses is its tail excess. The
    /// pool mixes many links, so the per-link 99th percentile sits lower in
    /// it; 0.98 is what calibrates on the measured series (`sims/RESULTS.md`).
    pub excess_quantile: f64,
    /// Which quantile of measured p50 / coordinate estimate bounds a
    /// predicted pair's median from above, for its p99.
    pub coordinate_quantile: f64,
}

impl Default for TomographyConfig {
    fn default() -> Self {
        TomographyConfig {
            peer_half_life_s: 300.0,
            node_half_life_s: 1800.0,
            peer_halve_every: 1024,
            node_halve_every: 16384,
            direct_p99_samples: 400,
            tail_quantile: 0.99,
            excess_quantile: 0.98,
            coordinate_quantile: 0.9,
        }
    }
}

/// How an estimate was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// From samples of this pair (its own p99 or its median times the
    /// ends' tail factor).
    Measured,
    /// From the coordinate estimate and the ends' learned factors.
    Predicted,
}

/// A p50/p99 estimate for one pair, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// Median RTT, seconds.
    pub p50: f64,
    /// Tail RTT at [`TomographyConfig::tail_quantile`], seconds.
    pub p99: f64,
    /// Measured or predicted.
    pub source: Source,
    /// Samples of this pair behind it (both directions).
    pub samples: u32,
    /// 0..1: how much the figure is backed by data (grows with the pair's
    /// samples; predictions get at most 0.5, scaled by how much the ends
    /// have learned).
    pub confidence: f64,
}

/// One node's view of the RTT distributions to its peers.
#[derive(Debug, Clone)]
pub struct Tomography<K: Hash + Eq + Clone> {
    cfg: TomographyConfig,
    peers: HashMap<K, RttSketch>,
    /// How far samples lie above their peer's median, seconds: the node's
    /// tail excess.
    excess: RttSketch,
    /// Measured peer medians divided by the coordinate estimate at the time.
    coord_ratio: RttSketch,
    rejected: u64,
}

/// Floor of the ratio sketches: ratios from 0.001 to 1000.
const RATIO_FLOOR: f64 = 1e-3;

impl<K: Hash + Eq + Clone> Tomography<K> {
    /// An empty tomography.
    pub fn new(cfg: TomographyConfig) -> Self {
        Tomography {
            cfg,
            peers: HashMap::new(),
            excess: RttSketch::new(),
            coord_ratio: RttSketch::with_floor(RATIO_FLOOR),
            rejected: 0,
        }
    }

    /// The parameters.
    pub fn config(&self) -> &TomographyConfig {
        &self.cfg
    }

    /// Samples rejected so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }

    /// Number of peers with a sketch.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Records one raw RTT sample (seconds) to `peer` taken at `now` (any
    /// monotonic clock); `coordinate_estimate` is what the coordinates
    /// predicted for the pair at the time, if known. Invalid input is
    /// rejected and changes nothing.
    pub fn record(
        &mut self,
        peer: &K,
        rtt: f64,
        coordinate_estimate: Option<f64>,
        now: Duration,
    ) -> Result<(), TomographyError> {
        if !(rtt.is_finite() && rtt > 0.0 && rtt <= SKETCH_MAX_S) {
            self.rejected += 1;
            return Err(TomographyError::InvalidRtt(rtt));
        }
        if let Some(e) = coordinate_estimate
            && !(e.is_finite() && e > 0.0)
        {
            self.rejected += 1;
            return Err(TomographyError::InvalidEstimate(e));
        }
        let halve = self.cfg.peer_halve_every;
        let peer_hl = Duration::from_secs_f64(self.cfg.peer_half_life_s.max(0.0));
        let node_hl = Duration::from_secs_f64(self.cfg.node_half_life_s.max(0.0));
        self.excess.decay_to(now, node_hl);
        self.coord_ratio.decay_to(now, node_hl);
        let sketch = self.peers.entry(peer.clone()).or_default();
        sketch.decay_to(now, peer_hl);
        sketch.record(rtt, halve);
        let median = sketch.quantile(0.5).expect("just recorded");
        // A single sample says nothing about the spread (it is the median).
        if sketch.count() >= 2 {
            self.excess
                .record((rtt - median).max(0.0), self.cfg.node_halve_every);
        }
        if let Some(e) = coordinate_estimate {
            self.coord_ratio
                .record(median / e, self.cfg.node_halve_every);
        }
        Ok(())
    }

    /// The sketch of one peer.
    pub fn sketch(&self, peer: &K) -> Option<&RttSketch> {
        self.peers.get(peer)
    }

    /// Forgets a peer that left.
    pub fn forget(&mut self, peer: &K) {
        self.peers.remove(peer);
    }

    /// This node's tail excess, seconds: the `excess_quantile` of how far
    /// its samples lie above their peer's median (0 until it has seen any
    /// spread).
    pub fn tail_excess(&self) -> f64 {
        match self.excess.quantile_upper(self.cfg.excess_quantile) {
            // Bucket 0 holds the zeros (samples at or below the median).
            Some(e) if e > 2.0 * SKETCH_MIN_S => e,
            _ => 0.0,
        }
    }

    /// How far this node's tail excess is learned (0..1).
    pub fn shape_confidence(&self) -> f64 {
        (self.excess.count() as f64 / 500.0).min(1.0)
    }

    /// Median of measured p50 / coordinate estimate over the peers it has
    /// probed (1 until it has any).
    pub fn coordinate_factor(&self) -> f64 {
        self.coord_ratio.quantile(0.5).unwrap_or(1.0)
    }

    /// How far above the median ratio a pair's median may lie:
    /// `coordinate_quantile` / median of measured p50 / coordinate estimate.
    pub fn coordinate_spread(&self) -> f64 {
        match (
            self.coord_ratio
                .quantile_upper(self.cfg.coordinate_quantile),
            self.coord_ratio.quantile(0.5),
        ) {
            (Some(hi), Some(mid)) => (hi / mid).max(1.0),
            _ => 1.0,
        }
    }
}

/// The estimate for the pair (a, b): `ab` is a's sketch of b, `ba` b's of a
/// (either may be missing), `ta`/`tb` the two ends' tomographies, and
/// `coordinate_estimate` the coordinates' RTT estimate in seconds.
pub fn pair_estimate<K: Hash + Eq + Clone>(
    ta: &Tomography<K>,
    tb: &Tomography<K>,
    ab: Option<&RttSketch>,
    ba: Option<&RttSketch>,
    coordinate_estimate: f64,
) -> Estimate {
    let cfg = &ta.cfg;
    // The pair's excess is its worse end's: a heavy-tailed end (bufferbloat,
    // a busy host) shows on all its links.
    let excess = ta.tail_excess().max(tb.tail_excess());
    let merged = match (ab, ba) {
        (Some(x), Some(y)) => {
            let mut m = x.clone();
            m.merge(y);
            Some(m)
        }
        (Some(x), None) | (None, Some(x)) => Some(x.clone()),
        (None, None) => None,
    };
    if let Some(m) = merged.filter(|m| m.count() > 0) {
        let n = m.count();
        let p50 = m.quantile(0.5).expect("non-empty");
        let modelled = p50 + excess;
        // Blend the pair's own tail with the modelled one by sample count:
        // a handful of samples cannot show a 1 % tail.
        let w = (n as f64 / cfg.direct_p99_samples as f64).min(1.0);
        let own = m.quantile_upper(cfg.tail_quantile).expect("non-empty");
        let p99 = (w * own.ln() + (1.0 - w) * modelled.ln()).exp().max(p50);
        return Estimate {
            p50,
            p99,
            source: Source::Measured,
            samples: n,
            confidence: 1.0 - 1.0 / (1.0 + n as f64 / 8.0),
        };
    }
    let c = (ta.coordinate_factor() * tb.coordinate_factor()).sqrt();
    let spread = (ta.coordinate_spread() * tb.coordinate_spread()).sqrt();
    let p50 = coordinate_estimate * c;
    Estimate {
        p50,
        // The median itself is uncertain here: take its plausible upper
        // value before adding the excess.
        p99: p50 * spread + excess,
        source: Source::Predicted,
        samples: 0,
        confidence: 0.5 * ta.shape_confidence().min(tb.shape_confidence()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketch_quantiles_are_within_resolution() {
        let mut s = RttSketch::new();
        for i in 1..=1000 {
            s.record(i as f64 * 1e-3, 0);
        }
        for (q, want) in [(0.5, 0.5), (0.9, 0.9), (0.99, 0.99)] {
            let got = s.quantile(q).unwrap();
            assert!((got / want - 1.0).abs() < 0.03, "q{q}: {got} vs {want}");
        }
        assert_eq!(s.count(), 1000);
        assert!(RttSketch::bytes() <= 2048, "{} bytes", RttSketch::bytes());
    }

    #[test]
    fn sketch_forgets_a_changed_path() {
        let mut s = RttSketch::new();
        for _ in 0..2000 {
            s.record(0.010, 256);
        }
        for _ in 0..1024 {
            s.record(0.100, 256);
        }
        let p50 = s.quantile(0.5).unwrap();
        assert!((p50 / 0.100 - 1.0).abs() < 0.03, "{p50}");
        assert!(s.count() < 600);
    }

    #[test]
    fn a_changed_path_takes_over_within_minutes() {
        // One sample a second to one peer: 10 ms for an hour, then 100 ms.
        let mut t: Tomography<u32> = Tomography::new(TomographyConfig::default());
        for s in 0..3600u64 {
            t.record(&1, 0.010, None, Duration::from_secs(s)).unwrap();
        }
        let mut took = None;
        for s in 3600..7200u64 {
            t.record(&1, 0.100, None, Duration::from_secs(s)).unwrap();
            if took.is_none() && t.sketch(&1).unwrap().quantile(0.5).unwrap() > 0.09 {
                took = Some(s - 3600);
            }
        }
        let took = took.expect("the new path never took over");
        // The median flips once the new samples outweigh the decayed old
        // ones: about one peer half-life.
        assert!(took <= 600, "took {took} s");
        // Decay with no samples: a long silence clears the sketch.
        let mut s = RttSketch::new();
        s.decay_to(Duration::ZERO, Duration::from_secs(10));
        s.record(0.01, 0);
        s.decay_to(Duration::from_secs(1000), Duration::from_secs(10));
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn extremes_land_in_the_end_buckets() {
        let mut s = RttSketch::new();
        s.record(1e-9, 0);
        s.record(10.0, 0);
        assert!(s.quantile(0.0).unwrap() < 11e-6);
        assert!(s.quantile(1.0).unwrap() > 9.5);
    }

    #[test]
    fn bad_samples_change_nothing() {
        let mut t: Tomography<u32> = Tomography::new(TomographyConfig::default());
        t.record(&1, 0.05, Some(0.04), Duration::ZERO).unwrap();
        t.record(&1, 0.07, Some(0.04), Duration::ZERO).unwrap();
        let before = (
            t.sketch(&1).cloned(),
            t.tail_excess(),
            t.coordinate_factor(),
        );
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0, 11.0] {
            assert!(t.record(&1, bad, None, Duration::ZERO).is_err());
            assert!(t.record(&2, bad, None, Duration::ZERO).is_err());
        }
        assert!(t.record(&1, 0.05, Some(f64::NAN), Duration::ZERO).is_err());
        assert!(t.record(&1, 0.05, Some(-1.0), Duration::ZERO).is_err());
        assert_eq!(
            (
                t.sketch(&1).cloned(),
                t.tail_excess(),
                t.coordinate_factor()
            ),
            before
        );
        assert_eq!(t.peer_count(), 1);
        assert_eq!(t.rejected(), 12);
    }

    #[test]
    fn heavy_tailed_node_predicts_a_heavy_tail_for_a_new_pair() {
        // Node a sees 5 % of samples at 8× the median on every link: an
        // excess of 7× the link's median.
        let mut a: Tomography<u32> = Tomography::new(TomographyConfig::default());
        let b: Tomography<u32> = Tomography::new(TomographyConfig::default());
        for i in 0..5000u32 {
            let peer = i % 50;
            let base = 0.02 + peer as f64 * 1e-3;
            let rtt = if (i / 50) % 20 == 7 { base * 8.0 } else { base };
            a.record(&peer, rtt, Some(base), Duration::from_secs((i / 50) as u64))
                .unwrap();
        }
        let x = a.tail_excess();
        assert!(x > 0.1 && x < 0.5, "tail excess {x}");
        assert_eq!(b.tail_excess(), 0.0);
        let e = pair_estimate(&a, &b, None, None, 0.05);
        assert_eq!(e.source, Source::Predicted);
        assert!((e.p50 / 0.05 - 1.0).abs() < 0.05, "{e:?}");
        // The pair's excess is its worse end's.
        assert!(
            ((e.p99 - e.p50) / x - 1.0).abs() < 0.1,
            "{e:?} vs excess {x}"
        );
        let measured = pair_estimate(&a, &b, a.sketch(&3), None, 0.05);
        assert_eq!(measured.source, Source::Measured);
        assert!(measured.p99 > measured.p50 * 2.0, "{measured:?}");
        assert!(measured.confidence > e.confidence);
    }
}
