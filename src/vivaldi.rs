//! The Vivaldi network-coordinate engine.
//!
//! A [`Coordinate`] is a point in a low-dimensional Euclidean space plus a
//! non-Euclidean height, an adjustment term and an error estimate; the
//! estimated RTT between two nodes is the distance between their coordinates.
//! A [`Node`] owns one node's coordinate and learns it from RTT samples to
//! peers (the sample plus the peer's coordinate, which rides in the probe's
//! ack).
//!
//! Two profiles share the code:
//!
//! * [`Profile::Serf`]: HashiCorp serf 0.9.4's `DefaultConfig()` and update
//!   rule exactly (`../shared/docs/vivaldi.md` §1), kept as the yardstick.
//! * [`Profile::Tomo`] (the default): the same spring model with the changes
//!   that `sims/RESULTS.md` justifies by measurement: a monotone distance
//!   (no serf adjustment fallback), gravity expressed in milliseconds, a
//!   low-percentile latency filter over a longer window, steps weighted so that
//!   short links are not drowned out by long ones, replay of the closest known
//!   peers (local refinement, no extra probes) and a smoothed published
//!   coordinate.
//!
//! Everything here is sans-IO: time and randomness come in as arguments.
//! Lengths are seconds (`f64`), as in Consul's `Coord` JSON.

use std::hash::{Hash, Hasher};

mod peer_table;
use peer_table::PeerTable;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// The Euclidean part of a coordinate. Up to 8 dimensions (the default)
/// live inline, so a coordinate is one cache-friendly block; more spill to
/// the heap.
pub type Vector = SmallVec<[f64; 8]>;

/// Largest RTT accepted as a sample, in seconds (serf's `maxRTT`).
pub const MAX_RTT_S: f64 = 10.0;

/// Below this (1 µs) two lengths are treated as equal (serf's `zeroThreshold`).
const ZERO_THRESHOLD: f64 = 1.0e-6;

/// Most samples a per-peer latency filter can hold.
pub const MAX_FILTER_SIZE: usize = 4;

/// What can go wrong when feeding the engine. Every error leaves the node's
/// state exactly as it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VivaldiError {
    /// The RTT was NaN, infinite, zero, negative or above [`MAX_RTT_S`].
    #[error("invalid RTT {0} s: must be finite, > 0 and <= {MAX_RTT_S} s")]
    InvalidRtt(f64),
    /// The peer's coordinate has another dimensionality than ours.
    #[error("dimensionality mismatch: ours is {expected}, the peer's is {got}")]
    DimensionMismatch {
        /// Our dimensionality.
        expected: usize,
        /// The peer's.
        got: usize,
    },
    /// The peer's coordinate has a NaN or infinite field.
    #[error("peer coordinate has a non-finite field")]
    NonFiniteCoordinate,
    /// The configuration is unusable (for example zero dimensions).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

/// A network coordinate, serialized exactly like Consul's `Coord`
/// (`{"Vec":[…],"Error":…,"Adjustment":…,"Height":…}`, lengths in seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coordinate {
    /// Euclidean part, seconds.
    #[serde(rename = "Vec")]
    pub vec: Vector,
    /// The node's confidence in its own coordinate (dimensionless relative error).
    #[serde(rename = "Error")]
    pub error: f64,
    /// Additive correction learned from residuals (serf's adjustment), seconds.
    #[serde(rename = "Adjustment")]
    pub adjustment: f64,
    /// Non-Euclidean access-link height, seconds.
    #[serde(rename = "Height")]
    pub height: f64,
}

impl Coordinate {
    /// A fresh coordinate at the origin, as serf's `NewCoordinate`.
    pub fn origin(config: &Config) -> Self {
        Coordinate {
            vec: smallvec::smallvec![0.0; config.dimensionality],
            error: config.error_max,
            adjustment: 0.0,
            height: config.height_min,
        }
    }

    /// True when every field is finite (serf's `IsValid`).
    pub fn is_valid(&self) -> bool {
        // x * 0 is 0 for finite x and NaN for NaN or ±Inf, so one branch-free
        // sum checks every field.
        let rest = (self.error + self.adjustment + self.height) * 0.0;
        if let Ok(v) = <&[f64; 8]>::try_from(&self.vec[..]) {
            // Pairwise so the compiler can vectorize it (a left fold may not
            // be reordered).
            let z = v.map(|x| x * 0.0);
            return ((z[0] + z[1]) + (z[2] + z[3])) + ((z[4] + z[5]) + (z[6] + z[7])) + rest == 0.0;
        }
        self.vec.iter().fold(rest, |a, v| a + v * 0.0) == 0.0
    }

    /// Checks that `other` can be compared with a coordinate of `dim` dimensions.
    pub fn check(&self, dim: usize) -> Result<(), VivaldiError> {
        if self.vec.len() != dim {
            return Err(VivaldiError::DimensionMismatch {
                expected: dim,
                got: self.vec.len(),
            });
        }
        if !self.is_valid() {
            return Err(VivaldiError::NonFiniteCoordinate);
        }
        Ok(())
    }

    /// Euclidean distance plus both heights, seconds (no adjustment).
    pub fn raw_distance_to(&self, other: &Coordinate) -> f64 {
        // Pairwise sums first so that a→b and b→a round identically.
        euclid(&self.vec, &other.vec) + (self.height + other.height)
    }

    /// Estimated RTT in seconds, exactly as serf's `DistanceTo`: the raw
    /// distance plus both adjustments, falling back to the raw distance when
    /// the adjusted one is not positive. With zero adjustments (tomo's
    /// profile) this is the raw distance, which is monotone in the embedding.
    /// Symmetric and never negative.
    pub fn distance_to(&self, other: &Coordinate) -> f64 {
        let raw = self.raw_distance_to(other);
        let adjusted = raw + (self.adjustment + other.adjustment);
        if adjusted > 0.0 { adjusted } else { raw }
    }
}

/// `(i + 1) % n` without a division (the hot path avoids them).
#[inline]
fn wrap_next(i: usize, n: usize) -> usize {
    if i + 1 >= n { 0 } else { i + 1 }
}

/// Euclidean distance between two equally long vectors.
#[inline]
fn euclid(a: &[f64], b: &[f64]) -> f64 {
    // The default 8 dimensions get a fixed-length loop the compiler unrolls
    // and vectorizes; this is most of an update's arithmetic.
    if let (Ok(a), Ok(b)) = (<&[f64; 8]>::try_from(a), <&[f64; 8]>::try_from(b)) {
        return euclid_fixed(a, b);
    }
    let mut s = 0.0;
    for (x, y) in a.iter().zip(b) {
        let d = x - y;
        s += d * d;
    }
    s.sqrt()
}

#[inline]
fn euclid_fixed<const D: usize>(a: &[f64; D], b: &[f64; D]) -> f64 {
    let mut s = 0.0;
    for k in 0..D {
        let d = a[k] - b[k];
        s += d * d;
    }
    s.sqrt()
}

/// `x += (x - y) * s` element-wise (a move along the line through y and x).
#[inline]
fn push_from(x: &mut [f64], y: &[f64], s: f64) {
    if let (Ok(x), Ok(y)) = (<&mut [f64; 8]>::try_from(&mut *x), <&[f64; 8]>::try_from(y)) {
        for k in 0..8 {
            x[k] += (x[k] - y[k]) * s;
        }
        return;
    }
    for (x, y) in x.iter_mut().zip(y) {
        *x += (*x - y) * s;
    }
}

/// Euclidean norm.
#[inline]
fn norm(x: &[f64]) -> f64 {
    if let Ok(x) = <&[f64; 8]>::try_from(x) {
        return euclid_fixed(x, &[0.0; 8]);
    }
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// Copies a coordinate into another of the same dimensionality without
/// reallocating.
#[inline]
fn copy_coord(dst: &mut Coordinate, src: &Coordinate) {
    if dst.vec.len() == src.vec.len() {
        dst.vec.copy_from_slice(&src.vec);
    } else {
        dst.vec.clone_from(&src.vec);
    }
    dst.error = src.error;
    dst.adjustment = src.adjustment;
    dst.height = src.height;
}

/// Which rule set a [`Node`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// serf 0.9.4, exactly.
    Serf,
    /// tomo's measured improvements (the default).
    #[default]
    Tomo,
}

impl std::str::FromStr for Profile {
    type Err = VivaldiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "serf" => Ok(Profile::Serf),
            "tomo" => Ok(Profile::Tomo),
            other => Err(VivaldiError::InvalidConfig(format!(
                "unknown profile {other:?} (serf|tomo)"
            ))),
        }
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::Serf => "serf",
            Profile::Tomo => "tomo",
        })
    }
}

/// Engine parameters. [`Config::serf`] and [`Config::tomo`] give the two
/// profiles; every field can be changed for experiments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Which profile these values started from (informational).
    pub profile: Profile,
    /// Euclidean dimensions (plus the height).
    pub dimensionality: usize,
    /// Initial error and its upper clamp.
    pub error_max: f64,
    /// Lower clamp of the error (serf: none, i.e. 0).
    pub error_min: f64,
    /// Max weight of one observation on the error EWMA (Vivaldi's c_e).
    pub ce: f64,
    /// Max fraction of the residual applied to the position (Vivaldi's c_c).
    pub cc: f64,
    /// Ring of residuals for serf's adjustment term; 0 disables it.
    pub adjustment_window: usize,
    /// Floor of the height, seconds.
    pub height_min: f64,
    /// Samples kept per peer by the latency filter (1..=4; serf uses 3).
    pub latency_filter_size: usize,
    /// Which order statistic of the kept samples is used: 0.5 is serf's
    /// (upper) median, 0.25 the 25th-percentile "MP" filter of Ledlie et al.
    pub latency_filter_quantile: f64,
    /// Gravity strength towards the origin, **seconds** (serf: 150).
    pub gravity_rho: f64,
    /// Short-link weighting exponent: the step on a link of RTT `r` is scaled
    /// by `min(1, (r_ref / r)^alpha)`, `r_ref` being the node's running
    /// geometric mean of filtered RTTs. 0 = serf (no weighting).
    pub short_link_alpha: f64,
    /// Closest peers remembered for local refinement (0 = off).
    pub neighbors: usize,
    /// Replay one remembered close peer after every this many real
    /// updates (0 = never).
    pub refine_every: usize,
    /// Weight of a replayed step relative to a real one.
    pub refine_weight: f64,
    /// Apply gravity on every this many real updates, with that many times
    /// the force (serf: 1). Gravity is a slow drift correction; batching it
    /// saves a square root per update without changing its strength.
    pub gravity_every: usize,
    /// EWMA weight of the newest position in the published coordinate
    /// (1.0 = publish the raw coordinate, as serf does).
    pub publish_smoothing: f64,
    /// Real updates over which a new node phases in short-link weighting and
    /// published smoothing (linearly from off to fully on): the long links
    /// that place a node first get full force while it finds its region,
    /// so it converges as fast as serf's, then the short ones refine it.
    /// 0 = fully on from the start.
    pub ramp_updates: u64,
}

impl Config {
    /// serf 0.9.4 `DefaultConfig()`.
    pub fn serf() -> Self {
        Config {
            profile: Profile::Serf,
            dimensionality: 8,
            error_max: 1.5,
            error_min: 0.0,
            ce: 0.25,
            cc: 0.25,
            adjustment_window: 20,
            height_min: 10.0e-6,
            latency_filter_size: 3,
            latency_filter_quantile: 0.5,
            gravity_rho: 150.0,
            short_link_alpha: 0.0,
            neighbors: 0,
            refine_every: 0,
            refine_weight: 0.0,
            gravity_every: 1,
            publish_smoothing: 1.0,
            ramp_updates: 0,
        }
    }

    /// tomo's default profile (each departure from serf is justified in
    /// `sims/RESULTS.md`).
    pub fn tomo() -> Self {
        Config {
            profile: Profile::Tomo,
            dimensionality: 8,
            error_max: 1.5,
            error_min: 0.01,
            ce: 0.25,
            cc: 0.25,
            adjustment_window: 0,
            height_min: 10.0e-6,
            latency_filter_size: 4,
            latency_filter_quantile: 0.25,
            // 512 ms expressed the way the force formula wants it (seconds
            // units): rho_s = rho_ms / sqrt(1000).
            gravity_rho: gravity_rho_from_ms(512.0),
            short_link_alpha: 2.0,
            neighbors: 8,
            refine_every: 4,
            refine_weight: 0.4,
            gravity_every: 8,
            publish_smoothing: 0.05,
            ramp_updates: 200,
        }
    }

    /// The configuration of a profile.
    pub fn for_profile(profile: Profile) -> Self {
        match profile {
            Profile::Serf => Config::serf(),
            Profile::Tomo => Config::tomo(),
        }
    }

    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), VivaldiError> {
        let bad = |m: &str| Err(VivaldiError::InvalidConfig(m.to_string()));
        if self.dimensionality == 0 || self.dimensionality > 64 {
            return bad("dimensionality must be 1..=64");
        }
        if !(1..=MAX_FILTER_SIZE).contains(&self.latency_filter_size) {
            return bad("latency_filter_size must be 1..=4");
        }
        if !(0.0..=1.0).contains(&self.latency_filter_quantile) {
            return bad("latency_filter_quantile must be in [0, 1]");
        }
        if !(self.error_max > 0.0 && self.error_min >= 0.0 && self.error_min <= self.error_max) {
            return bad("need 0 <= error_min <= error_max, error_max > 0");
        }
        if !(self.ce > 0.0 && self.ce <= 1.0 && self.cc > 0.0 && self.cc <= 1.0) {
            return bad("ce and cc must be in (0, 1]");
        }
        if !(self.gravity_rho > 0.0 && self.height_min > 0.0) {
            return bad("gravity_rho and height_min must be > 0");
        }
        if self.gravity_every == 0 || self.gravity_every > 1024 || self.refine_every > 1024 {
            return bad("gravity_every must be 1..=1024 and refine_every 0..=1024");
        }
        if !(self.publish_smoothing > 0.0 && self.publish_smoothing <= 1.0) {
            return bad("publish_smoothing must be in (0, 1]");
        }

        if !(self.short_link_alpha >= 0.0 && self.refine_weight >= 0.0) {
            return bad("short_link_alpha and refine_weight must be >= 0");
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::tomo()
    }
}

/// Converts a gravity constant given in milliseconds (as in Ledlie et al.)
/// to the seconds-based `gravity_rho` the force formula `(d/rho)^2` uses.
pub fn gravity_rho_from_ms(rho_ms: f64) -> f64 {
    rho_ms / 1000f64.sqrt()
}

/// Counters a node keeps about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Samples accepted.
    pub updates: u64,
    /// Samples rejected (bad RTT or bad peer coordinate).
    pub rejected: u64,
    /// Times the coordinate became non-finite and was reset (serf's `Resets`).
    pub resets: u64,
}

/// Per-peer latency filter: a ring of the last samples.
#[derive(Debug, Clone)]
struct PeerFilter {
    // f32 and at most 4 samples keep a peer's slot at 24 bytes, so a
    // 500-node simulation's tables mostly stay in the CPU caches (0.1 µs
    // resolution at 1 s is far below any RTT we can measure).
    samples: [f32; MAX_FILTER_SIZE],
    len: u8,
    next: u8,
}

impl PeerFilter {
    fn new() -> Self {
        PeerFilter {
            samples: [0.0; MAX_FILTER_SIZE],
            len: 0,
            next: 0,
        }
    }

    /// Adds a sample and returns the filtered value: the order statistic at
    /// `q` of the last `size` samples (`q = 0.5` gives serf's upper median,
    /// `sorted[len / 2]`).
    fn push(&mut self, rtt: f64, size: usize, pick: &[u8; MAX_FILTER_SIZE]) -> f64 {
        let size = size.clamp(1, MAX_FILTER_SIZE);
        let rtt = rtt as f32;
        if (self.len as usize) < size {
            self.samples[self.len as usize] = rtt;
            self.len += 1;
            self.next = if self.len as usize == size {
                0
            } else {
                self.len
            };
        } else {
            self.samples[self.next as usize] = rtt;
            self.next = if self.next as usize + 1 == size {
                0
            } else {
                self.next + 1
            };
        }
        let n = self.len as usize;
        let mut sorted = [f32::INFINITY; MAX_FILTER_SIZE];
        sorted[..n].copy_from_slice(&self.samples[..n]);
        {
            // A 5-comparator sorting network for 4 values (branch-free
            // min/max); the +Inf padding sorts to the end.
            let cs = |a: &mut [f32; MAX_FILTER_SIZE], i: usize, j: usize| {
                let (x, y) = (a[i], a[j]);
                // Written as selects so they compile to minss/maxss (no NaN
                // handling needed: samples are validated).
                a[i] = if y < x { y } else { x };
                a[j] = if y < x { x } else { y };
            };
            cs(&mut sorted, 0, 1);
            cs(&mut sorted, 2, 3);
            cs(&mut sorted, 0, 2);
            cs(&mut sorted, 1, 3);
            cs(&mut sorted, 1, 2);
        }
        sorted[pick[n - 1] as usize] as f64
    }
}

/// For each sample count n = 1..=4, the index of the order statistic at
/// quantile `q` among n sorted samples, rounding half up (`q = 0.5` gives
/// serf's upper median, `sorted[n / 2]`).
fn filter_pick(q: f64) -> [u8; MAX_FILTER_SIZE] {
    let mut t = [0u8; MAX_FILTER_SIZE];
    for (i, slot) in t.iter_mut().enumerate() {
        let idx = (q * i as f64 + 0.5).floor() as usize;
        *slot = idx.min(i) as u8;
    }
    t
}

/// A fast, deterministic hasher for peer keys (FNV-1a over the key's bytes,
/// then a SplitMix64 finalizer). Peer names come from the membership layer,
/// and the per-update cost matters more than resistance to chosen collisions.
#[derive(Default, Clone, Copy)]
pub struct PeerHasher(u64);

impl Hasher for PeerHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
    fn write_u32(&mut self, i: u32) {
        self.0 = self.0.rotate_left(5) ^ i as u64;
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = self.0.rotate_left(5) ^ i;
    }
    fn write_usize(&mut self, i: usize) {
        self.0 = self.0.rotate_left(5) ^ i as u64;
    }
}

type PeerMap<K> = PeerTable<K, PeerFilter>;

/// The closest peers by filtered RTT (tomo's local refinement), unordered,
/// as parallel arrays: the membership scan done on every update touches one
/// cache line of keys, and an update moves nothing (a replaced or refreshed
/// peer is overwritten in place; eviction scans the few RTTs for the
/// largest).
#[derive(Debug, Clone)]
struct CloseSet<K> {
    keys: Vec<K>,
    /// Filtered RTT, seconds.
    rtts: Vec<f64>,
    /// Each peer's coordinate when it was last probed.
    coords: Vec<Coordinate>,
    /// Index of the largest RTT (the next to evict).
    worst: usize,
}

impl<K: Eq + Clone> CloseSet<K> {
    fn with_capacity(n: usize) -> Self {
        CloseSet {
            keys: Vec::with_capacity(n),
            rtts: Vec::with_capacity(n),
            coords: Vec::with_capacity(n),
            worst: 0,
        }
    }

    fn find_worst(&mut self) {
        let mut worst = 0;
        for (i, r) in self.rtts.iter().enumerate() {
            if *r > self.rtts[worst] {
                worst = i;
            }
        }
        self.worst = worst;
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    /// Records `peer` at `rtt` with coordinate `other`, keeping at most `cap`
    /// peers, the closest ones.
    fn note(&mut self, cap: usize, peer: &K, other: &Coordinate, rtt: f64) {
        if let Some(at) = self.keys.iter().position(|k| k == peer) {
            self.rtts[at] = rtt;
            copy_coord(&mut self.coords[at], other);
        } else if self.len() < cap {
            self.keys.push(peer.clone());
            self.rtts.push(rtt);
            self.coords.push(other.clone());
        } else if self.rtts.get(self.worst).is_some_and(|w| rtt < *w) {
            let at = self.worst;
            self.keys[at] = peer.clone();
            self.rtts[at] = rtt;
            copy_coord(&mut self.coords[at], other);
        } else {
            // Farther than every remembered peer: nothing changes.
            return;
        }
        self.find_worst();
    }

    fn forget(&mut self, peer: &K) {
        if let Some(at) = self.keys.iter().position(|k| k == peer) {
            self.keys.swap_remove(at);
            self.rtts.swap_remove(at);
            self.coords.swap_remove(at);
            self.find_worst();
        }
    }
}

/// The part of a node the spring model moves; kept apart from the peer
/// tables so a replay can borrow a remembered coordinate while moving.
#[derive(Debug, Clone)]
struct Position {
    coord: Coordinate,
    adjustment_samples: Vec<f64>,
    adjustment_index: usize,
    resets: u64,
}

/// One node's Vivaldi state (serf's `coordinate.Client`), keyed by peer
/// identifiers of type `K` (node names in the agent, indices in the
/// simulator).
#[derive(Debug, Clone)]
pub struct Node<K: Hash + Eq + Clone> {
    config: Config,
    pos: Position,
    /// What is published to consumers (equal to the moving coordinate
    /// unless `publish_smoothing < 1`).
    published: Coordinate,
    peers: PeerMap<K>,
    /// Closest peers by filtered RTT, at most `config.neighbors`.
    close: CloseSet<K>,
    refine_cursor: usize,
    /// Running mean of the bit patterns of the filtered RTTs and the RTT it
    /// stands for: the reference for short-link weighting. The bits of a
    /// positive float are close to linear in its logarithm, so this is the
    /// geometric mean (within a few percent) without a `ln`/`exp` per update.
    mean_rtt_bits: f64,
    ref_rtt: f64,
    rtt_count: u64,
    updates: u64,
    rejected: u64,
    /// Which sorted sample the latency filter returns when it holds
    /// 1, 2, … samples (from `latency_filter_quantile`).
    filter_pick: [u8; MAX_FILTER_SIZE],
    /// Real updates left until the next gravity step / close-peer replay.
    gravity_countdown: u32,
    refine_countdown: u32,
}

impl<K: Hash + Eq + Clone> Node<K> {
    /// A node at the origin.
    pub fn new(config: Config) -> Result<Self, VivaldiError> {
        config.validate()?;
        let coord = Coordinate::origin(&config);
        Ok(Node {
            pos: Position {
                adjustment_samples: vec![0.0; config.adjustment_window],
                adjustment_index: 0,
                coord: coord.clone(),
                resets: 0,
            },
            published: coord,
            peers: PeerMap::default(),
            close: CloseSet::with_capacity(config.neighbors),
            refine_cursor: 0,
            mean_rtt_bits: 0.0,
            ref_rtt: 0.0,
            rtt_count: 0,
            updates: 0,
            rejected: 0,
            filter_pick: filter_pick(config.latency_filter_quantile),
            gravity_countdown: config.gravity_every as u32,
            refine_countdown: config.refine_every.max(1) as u32,
            config,
        })
    }

    /// The engine's parameters.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The coordinate to put in probe acks (the one the spring model moves).
    pub fn coordinate(&self) -> &Coordinate {
        &self.pos.coord
    }

    /// The coordinate to publish to consumers (`/v1/coordinate`, estimates).
    pub fn published(&self) -> &Coordinate {
        &self.published
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            updates: self.updates,
            rejected: self.rejected,
            resets: self.pos.resets,
        }
    }

    /// Number of peers with filter state.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Estimated RTT to `other` in seconds, from the published coordinate.
    pub fn distance_to(&self, other: &Coordinate) -> f64 {
        self.published.distance_to(other)
    }

    /// Replaces the coordinate (for example one restored from disk) after
    /// validating it.
    pub fn set_coordinate(&mut self, c: Coordinate) -> Result<(), VivaldiError> {
        c.check(self.config.dimensionality)?;
        self.published = c.clone();
        self.pos.coord = c;
        Ok(())
    }

    /// Drops what is known about a peer that left (serf's `ForgetNode`).
    pub fn forget(&mut self, peer: &K) {
        self.peers.remove(peer);
        self.close.forget(peer);
    }

    /// Feeds one RTT sample (seconds) to `peer`, whose current coordinate is
    /// `other`. Invalid input returns an error and changes nothing.
    /// `rng` is only used when two coordinates coincide (always at start) to
    /// pick a random direction.
    pub fn update<R: Rng + ?Sized>(
        &mut self,
        peer: &K,
        other: &Coordinate,
        rtt: f64,
        rng: &mut R,
    ) -> Result<(), VivaldiError> {
        if !(rtt.is_finite() && rtt > 0.0 && rtt <= MAX_RTT_S) {
            self.rejected += 1;
            return Err(VivaldiError::InvalidRtt(rtt));
        }
        if let Err(e) = other.check(self.config.dimensionality) {
            self.rejected += 1;
            return Err(e);
        }
        let (size, pick) = (self.config.latency_filter_size, &self.filter_pick);
        let filtered = match self.peers.get_mut(peer) {
            Some(f) => f.push(rtt, size, pick),
            None => self
                .peers
                .get_or_insert_with(peer.clone(), PeerFilter::new)
                .push(rtt, size, pick),
        };
        self.updates += 1;
        let weight = self.link_weight(filtered);
        // Countdowns rather than `updates % every`: a 64-bit division costs
        // more than the rest of the bookkeeping.
        self.gravity_countdown -= 1;
        let gravity = if self.gravity_countdown == 0 {
            self.gravity_countdown = self.config.gravity_every as u32;
            self.config.gravity_every as f64
        } else {
            0.0
        };
        let how = Step {
            weight,
            evidence: true,
            gravity,
        };
        self.pos.step(&self.config, other, filtered, how, rng);
        if self.config.neighbors > 0 {
            self.close
                .note(self.config.neighbors, peer, other, filtered);
            if self.config.refine_every > 0 {
                self.refine_countdown -= 1;
                if self.refine_countdown == 0 {
                    self.refine_countdown = self.config.refine_every as u32;
                    if self.close.len() > 1 {
                        self.refine_one(peer, rng);
                    }
                }
            }
        }
        self.publish();
        Ok(())
    }

    /// Scale of a step on a link with filtered RTT `rtt`: 1 in serf's
    /// profile; in tomo's, links longer than the node's typical link get
    /// `(r_ref / r)^alpha` of the force so the few short links are not
    /// drowned out by the many long ones.
    fn link_weight(&mut self, rtt: f64) -> f64 {
        if self.config.short_link_alpha <= 0.0 {
            return 1.0;
        }
        self.rtt_count += 1;
        // A running mean that becomes an EWMA after 64 samples, so the
        // reference follows a changing network.
        let x = rtt.max(ZERO_THRESHOLD).to_bits() as f64 - self.mean_rtt_bits;
        self.mean_rtt_bits += if self.rtt_count >= 64 {
            x * (1.0 / 64.0)
        } else {
            x / self.rtt_count as f64
        };
        self.ref_rtt = f64::from_bits(self.mean_rtt_bits as u64);
        self.link_weight_of(rtt)
    }

    /// The short-link weight of `rtt` against the current reference,
    /// phased in as the node gains confidence (see [`Config::ramp_error`]).
    fn link_weight_of(&self, rtt: f64) -> f64 {
        let alpha = self.config.short_link_alpha;
        if alpha <= 0.0 || rtt <= self.ref_rtt {
            return 1.0;
        }
        let ratio = self.ref_rtt / rtt;
        let w = if alpha == 2.0 {
            ratio * ratio
        } else {
            ratio.powf(alpha)
        };
        let c = self.confidence();
        (1.0 - c) + c * w
    }

    /// How far the node is through its start-up: `updates / ramp_updates`,
    /// capped at 1 (always 1 when `ramp_updates` is 0).
    #[inline]
    fn confidence(&self) -> f64 {
        let r = self.config.ramp_updates;
        if self.updates >= r {
            return 1.0;
        }
        self.updates as f64 / r as f64
    }

    /// Replays the spring towards one remembered close peer (not `skip`,
    /// which was just updated) with its filtered RTT and last coordinate.
    /// Replays are not new evidence: they move the coordinate but leave the
    /// error estimate to real samples.
    fn refine_one<R: Rng + ?Sized>(&mut self, skip: &K, rng: &mut R) {
        let n = self.close.len();
        self.refine_cursor = wrap_next(self.refine_cursor, n);
        if &self.close.keys[self.refine_cursor] == skip {
            self.refine_cursor = wrap_next(self.refine_cursor, n);
        }
        let at = self.refine_cursor;
        let rtt = self.close.rtts[at];
        let w = self.config.refine_weight * self.link_weight_of(rtt);
        let how = Step {
            weight: w,
            evidence: false,
            gravity: 0.0,
        };
        self.pos
            .step(&self.config, &self.close.coords[at], rtt, how, rng);
    }

    fn publish(&mut self) {
        let s = self.config.publish_smoothing;
        // Follow the moving coordinate closely while the node is unsure of
        // it, smooth fully once it is confident.
        let a = s + (1.0 - s) * (1.0 - self.confidence());
        let c = &self.pos.coord;
        if a >= 1.0 {
            copy_coord(&mut self.published, c);
            return;
        }
        for (p, x) in self.published.vec.iter_mut().zip(&c.vec) {
            *p += a * (x - *p);
        }
        self.published.height += a * (c.height - self.published.height);
        self.published.adjustment = c.adjustment;
        self.published.error = c.error;
    }
}

/// How a spring step is taken.
#[derive(Debug, Clone, Copy)]
struct Step {
    /// Scale of the spring force (short-link weighting, replay weight).
    weight: f64,
    /// A real sample (updates the error estimate) rather than a replay.
    evidence: bool,
    /// Multiple of serf's gravity to apply (0 = none this step).
    gravity: f64,
}

impl Position {
    /// One spring step towards/away from `other` for filtered RTT `rtt`,
    /// scaled by `weight`: serf's `updateVivaldi`, `updateAdjustment` and
    /// `updateGravity` (with `gravity` times serf's force; 0 skips it), then
    /// the NaN reset. `evidence` is false for replays, which leave the error
    /// estimate alone.
    fn step<R: Rng + ?Sized>(
        &mut self,
        cfg: &Config,
        other: &Coordinate,
        rtt: f64,
        how: Step,
        rng: &mut R,
    ) {
        let Step {
            weight,
            evidence,
            gravity,
        } = how;
        let c = &mut self.coord;
        // updateVivaldi
        let mag = euclid(&c.vec, &other.vec);
        let raw = mag + (c.height + other.height);
        let adjusted = raw + (c.adjustment + other.adjustment);
        let dist = if adjusted > 0.0 { adjusted } else { raw };
        let rtt = rtt.max(ZERO_THRESHOLD);
        let total = (c.error + other.error).max(ZERO_THRESHOLD);
        let w = c.error / total;
        if evidence {
            let wrongness = (dist - rtt).abs() / rtt;
            let ce = cfg.ce * w;
            let e = ce * wrongness + c.error * (1.0 - ce);
            c.error = e.min(cfg.error_max).max(cfg.error_min);
        }
        let force = cfg.cc * w * weight * (rtt - dist);
        apply_force(c, cfg.height_min, force, &other.vec, other.height, mag, rng);
        // updateAdjustment (the raw distance after the move)
        let win = cfg.adjustment_window;
        if win > 0 {
            let raw = c.raw_distance_to(other);
            self.adjustment_samples[self.adjustment_index] = rtt - raw;
            self.adjustment_index = wrap_next(self.adjustment_index, win);
            let sum: f64 = self.adjustment_samples.iter().sum();
            c.adjustment = sum / (2.0 * win as f64);
        }
        // updateGravity: towards the origin (height height_min, no
        // adjustment).
        if gravity == 0.0 {
            if !c.is_valid() {
                self.resets += 1;
                *c = Coordinate::origin(cfg);
            }
            return;
        }
        let norm = norm(&c.vec);
        let raw = norm + cfg.height_min + c.height;
        let adjusted = raw + c.adjustment;
        let d = if adjusted > 0.0 { adjusted } else { raw };
        let g = -gravity * (d / cfg.gravity_rho).powi(2);
        apply_force_to_origin(c, cfg.height_min, g, norm, rng);
        if !c.is_valid() {
            self.resets += 1;
            *c = Coordinate::origin(cfg);
        }
    }
}

/// serf's `ApplyForce`: moves `c` by `force` along the unit vector from the
/// point (`other`, `other_height`) to `c`, `mag` being their Euclidean
/// distance (a random direction if they coincide), and scales the height.
fn apply_force<R: Rng + ?Sized>(
    c: &mut Coordinate,
    height_min: f64,
    force: f64,
    other: &[f64],
    other_height: f64,
    mag: f64,
    rng: &mut R,
) {
    if mag > ZERO_THRESHOLD {
        push_from(&mut c.vec, other, force / mag);
        c.height = ((c.height + other_height) * force / mag + c.height).max(height_min);
    } else {
        random_push(c, force, rng);
    }
}

/// [`apply_force`] with the origin (height `height_min`) as the other point.
fn apply_force_to_origin<R: Rng + ?Sized>(
    c: &mut Coordinate,
    height_min: f64,
    force: f64,
    norm: f64,
    rng: &mut R,
) {
    if norm > ZERO_THRESHOLD {
        let s = 1.0 + force / norm;
        if let Ok(x) = <&mut [f64; 8]>::try_from(&mut c.vec[..]) {
            for v in x.iter_mut() {
                *v *= s;
            }
        } else {
            for v in c.vec.iter_mut() {
                *v *= s;
            }
        }
        c.height = ((c.height + height_min) * force / norm + c.height).max(height_min);
    } else {
        random_push(c, force, rng);
    }
}

/// Coincident points: push along a random direction (serf draws from Go's
/// global math/rand; ours is the caller's seeded RNG).
fn random_push<R: Rng + ?Sized>(c: &mut Coordinate, force: f64, rng: &mut R) {
    let dim = c.vec.len();
    let mut u = [0.0f64; 64];
    let mut m = 0.0;
    for v in u.iter_mut().take(dim) {
        *v = rng.random::<f64>() - 0.5;
        m += *v * *v;
    }
    let m = m.sqrt();
    if m > ZERO_THRESHOLD {
        for (x, v) in c.vec.iter_mut().zip(&u[..dim]) {
            *x += v / m * force;
        }
    } else if let Some(x) = c.vec.first_mut() {
        *x += force;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(7)
    }

    #[test]
    fn json_matches_consul_coord() {
        let c = Coordinate {
            vec: smallvec::smallvec![0.5, -0.25],
            error: 1.5,
            adjustment: 0.0,
            height: 1e-5,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(
            s,
            r#"{"Vec":[0.5,-0.25],"Error":1.5,"Adjustment":0.0,"Height":0.00001}"#
        );
        let back: Coordinate = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn serf_distance_falls_back_to_raw_when_adjusted_is_not_positive() {
        let mut a = Coordinate::origin(&Config::serf());
        let mut b = a.clone();
        b.vec[0] = 0.010;
        a.adjustment = -0.020;
        b.height = 0.0;
        a.height = 0.0;
        assert!((a.distance_to(&b) - 0.010).abs() < 1e-12);
        a.adjustment = -0.002;
        assert!((a.distance_to(&b) - 0.008).abs() < 1e-12);
    }

    #[test]
    fn filter_picks_match_serf_and_the_mp_filter() {
        // serf: sorted[len / 2] for 1, 2, 3 samples.
        assert_eq!(&filter_pick(0.5)[..3], &[0, 1, 1]);
        // 25th percentile of 4: the second smallest.
        assert_eq!(filter_pick(0.25)[3], 1);
        assert_eq!(filter_pick(0.0), [0; 4]);
        assert_eq!(filter_pick(1.0), [0, 1, 2, 3]);
    }

    #[test]
    fn filter_is_upper_median_of_three_for_serf() {
        let mut p = PeerFilter::new();
        assert_eq!(p.push(3.0, 3, &filter_pick(0.5)), 3.0);
        assert_eq!(p.push(1.0, 3, &filter_pick(0.5)), 3.0); // upper median of two
        assert_eq!(p.push(2.0, 3, &filter_pick(0.5)), 2.0);
        assert_eq!(p.push(10.0, 3, &filter_pick(0.5)), 2.0); // window 1,2,10
        assert_eq!(p.push(10.0, 3, &filter_pick(0.5)), 10.0); // window 2,10,10
    }

    #[test]
    fn low_percentile_filter_ignores_one_sided_spikes() {
        let mut p = PeerFilter::new();
        let mut last = 0.0;
        for v in [0.1, 0.5, 0.1, 0.9] {
            last = p.push(v, 4, &filter_pick(0.25));
        }
        assert!((last - 0.1).abs() < 1e-7, "{last}");
    }

    #[test]
    fn bad_input_is_rejected_and_changes_nothing() {
        for cfg in [Config::serf(), Config::tomo()] {
            let mut n: Node<u32> = Node::new(cfg.clone()).unwrap();
            let mut r = rng();
            let peer = Coordinate::origin(&cfg);
            n.update(&1, &peer, 0.05, &mut r).unwrap();
            let before = n.coordinate().clone();
            for bad in [f64::NAN, f64::INFINITY, -0.01, 0.0, 10.5] {
                let got = n.update(&1, &peer, bad, &mut r);
                assert!(
                    matches!(got, Err(VivaldiError::InvalidRtt(_))),
                    "{bad}: {got:?}"
                );
                assert_eq!(n.coordinate(), &before);
            }
            let mut short = peer.clone();
            short.vec.pop();
            assert_eq!(
                n.update(&1, &short, 0.05, &mut r),
                Err(VivaldiError::DimensionMismatch {
                    expected: cfg.dimensionality,
                    got: cfg.dimensionality - 1
                })
            );
            let mut nan = peer.clone();
            nan.height = f64::NAN;
            assert_eq!(
                n.update(&1, &nan, 0.05, &mut r),
                Err(VivaldiError::NonFiniteCoordinate)
            );
            let mut inf = peer.clone();
            inf.vec[3] = f64::INFINITY;
            assert_eq!(
                n.update(&1, &inf, 0.05, &mut r),
                Err(VivaldiError::NonFiniteCoordinate)
            );
            assert_eq!(n.coordinate(), &before);
            assert_eq!(n.stats().updates, 1);
        }
    }

    #[test]
    fn two_nodes_converge_to_their_rtt() {
        for cfg in [Config::serf(), Config::tomo()] {
            let mut a: Node<u32> = Node::new(cfg.clone()).unwrap();
            let mut b: Node<u32> = Node::new(cfg.clone()).unwrap();
            let mut r = rng();
            for _ in 0..200 {
                let cb = b.coordinate().clone();
                a.update(&2, &cb, 0.100, &mut r).unwrap();
                let ca = a.coordinate().clone();
                b.update(&1, &ca, 0.100, &mut r).unwrap();
            }
            let est = a.published().distance_to(b.published());
            assert!(
                (est - 0.100).abs() < 0.005,
                "{:?}: estimate {est}",
                cfg.profile
            );
        }
    }
}
