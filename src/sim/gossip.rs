//! The gossip-driven simulator behind `tomo sim --protocol gossip`: the
//! real [`Gossip`] nodes (foca SWIM + the coordinate engine, exactly the
//! code the agent runs) on a discrete-event network.
//!
//! The network is an event queue ordered by (time, sequence number), so
//! equal-time events run in the order they were scheduled and a run depends
//! only on the seed. Every datagram a node emits is delivered after a
//! one-way delay of RTT / 2, the RTT being the symmetrized truth matrix's
//! value for the pair (or, with an observation series, slice
//! `⌊t / probe_interval⌋ mod T` of the series at send time `t`), optionally
//! times a per-datagram jitter factor, plus the sender's extra processing
//! delay if it is a slow node. A datagram is dropped when the pair has no
//! RTT (unreachable), when the series has no sample for it, when a
//! partition separates the two ends at send time, with the loss probability,
//! or when its destination is down on arrival. foca's timers come back as
//! events of their own.
//!
//! Node `i` is named `node-i` and listens on `10.x.y.z:7946` with `x.y.z`
//! the index in base 256. Node 0 is the seed: every other node announces to
//! it at `join_window · i / n`. A kill stops a node (its timers and inbound
//! datagrams are discarded); a restart brings it back under a renewed
//! identity (rejoin counter + 1) with a fresh engine, announcing to node 0
//! (or the first live node).
//!
//! Membership figures (the [`Membership`] block):
//!
//! - each node's view of which members are up is tracked from its
//!   `MemberUp`/`MemberDown` events, by name (a rename to a newer identity
//!   keeps the member up);
//! - **detection time** of a kill, per observer that saw the victim up when
//!   it died: time until that observer's `MemberDown` for it;
//! - **false deaths**: `MemberDown` about a node that is alive, under an
//!   identity of its current life (the rejoins foca makes after a false
//!   death included), outside any partition window; a **partition window**
//!   runs from a partition's start until the cluster has healed after it
//!   (deaths in it are counted as `partition_deaths`);
//! - **false suspicions**: foca does not notify suspicion, so every node's
//!   membership is sampled periodically; a live member (in its current
//!   life, outside partition windows) held `Suspect` by some node at a
//!   sample and by none at the previous one is one false suspicion, and
//!   each (observer, member) pair newly holding it is one suspicion pair
//!   (a suspicion reaches most of the cluster before it is refuted);
//! - **heal time** of a partition: from its end until every live node sees
//!   every live node up;
//! - **bytes per second per node**: bytes sent (`GossipStats::bytes_out`,
//!   dropped datagrams included) / nodes / duration;
//! - **table staleness**: at the end, for every live node's
//!   coordinate-table entry about every other live member, how long it has
//!   been out of date: 0 if it holds the member's latest publication, else
//!   the time since the member published the first newer one (members
//!   publish when their coordinate moves significantly); `table_coverage`
//!   is the fraction of live pairs with an entry at all.
//!
//! Accuracy at the end comes from [`evaluate`] over the live nodes'
//! published coordinates, so its keys and definitions are the round-based
//! simulator's.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use foca::{State, Timer};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{Evaluation, JitterMode, SimError, evaluate};
use crate::dataset::{Matrix, Series, normal};
use crate::gossip::{Event, Gossip, GossipConfig, Id, MAX_DIMENSIONS, Output};
use crate::stats::{mean, quantiles_unsorted};
use crate::vivaldi::{self, Coordinate, Node};

/// Port every simulated node listens on.
const PORT: u16 = 7946;
/// Most nodes the addressing scheme (`10.x.y.z`) can name.
const MAX_NODES: usize = 1 << 24;
/// False-death examples kept for the report.
const MAX_EXAMPLES: usize = 10;
/// A node that knows no member announces again after this many probe
/// intervals.
const RETRY_JOIN_INTERVALS: u32 = 2;

/// A network partition: nodes with an index below `fraction · n` on one
/// side, the rest on the other, from `start` to `end`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Partition {
    /// Share of the nodes (the lowest indices) on the first side.
    pub fraction: f64,
    /// When the link between the sides is cut.
    #[serde(serialize_with = "secs")]
    pub start: Duration,
    /// When it is restored.
    #[serde(serialize_with = "secs")]
    pub end: Duration,
}

impl Partition {
    /// Nodes with an index below this are on the first side.
    fn split(&self, n: usize) -> usize {
        ((self.fraction * n as f64).round() as usize).clamp(1, n.saturating_sub(1).max(1))
    }
}

impl std::str::FromStr for Partition {
    type Err = SimError;
    /// `half@5m..8m` or `0.3@300s..480s`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            SimError::Param(format!(
                "partition wants SIDE@START..END with SIDE `half` or a fraction in (0, 1), e.g. half@5m..8m; got {s:?}"
            ))
        };
        let (side, window) = s.split_once('@').ok_or_else(bad)?;
        let fraction = match side {
            "half" => 0.5,
            f => f.parse::<f64>().map_err(|_| bad())?,
        };
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(bad());
        }
        let (a, b) = window.split_once("..").ok_or_else(bad)?;
        let (start, end) = (parse_duration(a)?, parse_duration(b)?);
        if end <= start {
            return Err(SimError::Param(format!(
                "partition {s:?} ends before it starts"
            )));
        }
        Ok(Partition {
            fraction,
            start,
            end,
        })
    }
}

/// Parses a duration like `600s`, `30m`, `1h`, `1h30m`, `250ms` or `1.5s`;
/// a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, SimError> {
    let bad = || {
        SimError::Param(format!(
            "cannot parse duration {s:?} (use e.g. 500ms, 600s, 30m, 1h, 1h30m)"
        ))
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = t.parse::<f64>() {
        return secs_to_duration(v).ok_or_else(bad);
    }
    let mut total = 0.0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let v: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += v * mult;
        rest = &rest[unit_end..];
    }
    secs_to_duration(total).ok_or_else(bad)
}

fn secs_to_duration(v: f64) -> Option<Duration> {
    (0.0..1e12).contains(&v).then(|| Duration::from_secs_f64(v))
}

/// Parses `NODE@TIME` (`--kill 3@10m`).
pub fn parse_node_at(s: &str) -> Result<(usize, Duration), SimError> {
    let (node, at) = s
        .split_once('@')
        .ok_or_else(|| SimError::Param(format!("want NODE@TIME, e.g. 3@10m; got {s:?}")))?;
    let node = node
        .trim()
        .parse()
        .map_err(|_| SimError::Param(format!("bad node index in {s:?}")))?;
    Ok((node, parse_duration(at)?))
}

/// Parses `NODE:DELAY` (`--slow 7:2s`).
pub fn parse_node_delay(s: &str) -> Result<(usize, Duration), SimError> {
    let (node, d) = s
        .split_once(':')
        .ok_or_else(|| SimError::Param(format!("want NODE:DELAY, e.g. 7:2s; got {s:?}")))?;
    let node = node
        .trim()
        .parse()
        .map_err(|_| SimError::Param(format!("bad node index in {s:?}")))?;
    Ok((node, parse_duration(d)?))
}

/// Parameters of a gossip-driven run.
#[derive(Debug, Clone)]
pub struct GossipSimConfig {
    /// Simulated time.
    pub duration: Duration,
    /// foca's probe period; the other SWIM periods scale with it (see
    /// [`GossipSimConfig::gossip_config`]).
    pub probe_interval: Duration,
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Multiplicative jitter J of each datagram's one-way delay.
    pub jitter: f64,
    /// Jitter shape.
    pub jitter_mode: JitterMode,
    /// Slow nodes: extra delay added to every datagram the node sends.
    pub slow: Vec<(usize, Duration)>,
    /// Kills: node, time.
    pub kills: Vec<(usize, Duration)>,
    /// Restarts (of killed nodes, under a renewed identity): node, time.
    pub restarts: Vec<(usize, Duration)>,
    /// Partitions (non-overlapping).
    pub partitions: Vec<Partition>,
    /// Seed of every random choice (network and nodes).
    pub seed: u64,
    /// The coordinate engine's parameters.
    pub engine: vivaldi::Config,
    /// Node `i` joins at `join_window · i / n`.
    pub join_window: Duration,
    /// Instead of announcing, node `i` starts (at the same time) knowing
    /// every node alive (foca's `apply_many`, no broadcast): a formed
    /// cluster's steady state without the n-node join storm.
    pub warm_start: bool,
    /// Record accuracy every this much simulated time (zero: only at the end).
    pub eval_every: Duration,
    /// Sample every node's membership for suspicions this often; `None`:
    /// every probe interval up to 1,000 nodes, `(n / 1000)²` intervals above
    /// (a sample costs n² work); zero: never.
    pub suspicion_sample: Option<Duration>,
}

impl Default for GossipSimConfig {
    fn default() -> Self {
        GossipSimConfig {
            duration: Duration::from_secs(600),
            probe_interval: Duration::from_secs(1),
            loss: 0.0,
            jitter: 0.0,
            jitter_mode: JitterMode::Queue,
            slow: Vec::new(),
            kills: Vec::new(),
            restarts: Vec::new(),
            partitions: Vec::new(),
            seed: 1,
            engine: vivaldi::Config::tomo(),
            join_window: Duration::from_secs(1),
            warm_start: false,
            eval_every: Duration::ZERO,
            suspicion_sample: None,
        }
    }
}

impl GossipSimConfig {
    /// The nodes' configuration for `n` nodes: foca's LAN profile for that
    /// cluster size with every period scaled by `probe_interval / 1 s`
    /// (probe RTT = half the interval, suspicion = max(10, 4 · log10 n)
    /// intervals, gossip every 0.2, announce every 30, announce to down
    /// members every 65), and this run's engine.
    pub fn gossip_config(&self, n: usize) -> GossipConfig {
        let mut g = GossipConfig::lan(n.min(u32::MAX as usize) as u32);
        let s = self.probe_interval.as_secs_f64();
        let f = &mut g.foca;
        f.probe_period = self.probe_interval;
        f.probe_rtt = self.probe_interval / 2;
        f.suspect_to_down_after = f.suspect_to_down_after.mul_f64(s);
        for p in [
            &mut f.periodic_gossip,
            &mut f.periodic_announce,
            &mut f.periodic_announce_to_down_members,
        ]
        .into_iter()
        .flatten()
        {
            p.frequency = p.frequency.mul_f64(s);
        }
        g.engine = self.engine.clone();
        g.fit_packet();
        g
    }

    fn suspicion_period(&self, n: usize) -> Duration {
        if let Some(d) = self.suspicion_sample {
            return d;
        }
        let k = (n as f64 / 1000.0).powi(2).ceil().max(1.0);
        self.probe_interval.mul_f64(k)
    }
}

/// Datagram counters of the simulated network.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NetStats {
    /// Datagrams nodes sent.
    pub sent: u64,
    /// Datagrams handed to a live destination.
    pub delivered: u64,
    /// Lost with the loss probability.
    pub dropped_loss: u64,
    /// The pair has no RTT in the matrix.
    pub dropped_unreachable: u64,
    /// The series has no sample for the pair in that slice.
    pub dropped_series_missing: u64,
    /// Cut by a partition.
    pub dropped_partition: u64,
    /// The destination was down on arrival.
    pub dropped_dead: u64,
    /// Addressed to no simulated node.
    pub dropped_unknown: u64,
}

/// What happened after one kill.
#[derive(Debug, Clone, Serialize)]
pub struct KillReport {
    /// The node killed.
    pub node: usize,
    /// When, s.
    pub at_s: f64,
    /// Live nodes that saw it up when it died.
    pub observers: usize,
    /// Of those, how many saw it go down (and how many, still alive at the
    /// end in the same life, never did).
    pub detected: usize,
    /// Observers alive at the end that never saw it go down.
    pub undetected: usize,
    /// Median detection time over its observers, s.
    pub detection_s_p50: Option<f64>,
    /// Time until the last observer saw it go down, s.
    pub detection_s_max: Option<f64>,
}

/// What happened around one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// The partition.
    #[serde(flatten)]
    pub partition: Partition,
    /// Time from its end until every live node saw every live node up
    /// again, s (`null`: not healed by the end of the run).
    pub heal_s: Option<f64>,
}

/// A `MemberDown` about a live node, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct DeathExample {
    /// When, s.
    pub at_s: f64,
    /// The node that declared it.
    pub observer: usize,
    /// The node declared down.
    pub member: usize,
    /// The identity's rejoin counter.
    pub bump: u16,
    /// The member's rejoin counter at the time (greater: the identity
    /// declared down had already been superseded).
    pub current_bump: u16,
}

/// Membership figures of a gossip-driven run.
#[derive(Debug, Clone, Serialize)]
pub struct Membership {
    /// Nodes simulated.
    pub nodes: usize,
    /// Nodes alive at the end.
    pub live_nodes: usize,
    /// foca's probe period, s.
    pub probe_interval_s: f64,
    /// foca's suspicion timeout, s.
    pub suspect_to_down_s: f64,
    /// When every node first saw every other up, s (`null`: never).
    pub join_converged_s: Option<f64>,
    /// Whether every live node sees every live node up at the end.
    pub converged_at_end: bool,
    /// Live (observer, member) pairs not seen up at the end.
    pub view_missing_pairs_at_end: u64,
    /// Per kill.
    pub kills: Vec<KillReport>,
    /// (observer, kill) pairs detected.
    pub detections: usize,
    /// (observer, kill) pairs never detected by a node alive at the end.
    pub detections_missing: usize,
    /// Median detection time over (observer, kill) pairs, s.
    pub detection_s_p50: Option<f64>,
    /// 99th percentile detection time, s.
    pub detection_s_p99: Option<f64>,
    /// Longest detection time, s.
    pub detection_s_max: Option<f64>,
    /// `MemberDown` events about live nodes outside partition windows.
    pub false_deaths: u64,
    /// Of those, about an identity the member had already replaced by a
    /// rejoin (the member's own announcement that its old identity is down,
    /// reaching an observer before the new identity does).
    pub false_deaths_of_superseded_identities: u64,
    /// The first few of them.
    pub false_death_examples: Vec<DeathExample>,
    /// `MemberDown` events about live nodes inside partition windows.
    pub partition_deaths: u64,
    /// Times a node was told it had been declared down and rejoined under
    /// a renewed identity (foca 2.0 also tells a member whose suspicion was
    /// refuted, when the suspicion timer fires).
    pub rejoins: u64,
    /// Suspicions of live members (in their current life, outside
    /// partition windows): a member held `Suspect` by at least one node at
    /// a sample and by none at the previous one (`null`: sampling off).
    pub false_suspicions: Option<u64>,
    /// Of those, of slow nodes.
    pub false_suspicions_of_slow_nodes: Option<u64>,
    /// (observer, member) pairs newly holding a live member `Suspect` at a
    /// sample (one suspicion counts once per node it reaches).
    pub false_suspicion_pairs: Option<u64>,
    /// Of those, held by slow nodes (whose own probes time out before
    /// their pings leave).
    pub false_suspicion_pairs_by_slow_nodes: Option<u64>,
    /// (observer, member, sample) triples with a live member `Suspect`.
    pub false_suspicion_samples: Option<u64>,
    /// Membership samples taken.
    pub suspicion_samples: u64,
    /// Time between samples, s.
    pub suspicion_sample_period_s: f64,
    /// Per partition.
    pub partitions: Vec<PartitionReport>,
    /// Longest heal time over the partitions, s (`null`: no partition, or
    /// one never healed).
    pub partition_heal_s: Option<f64>,
    /// Mean over nodes of bytes sent per second.
    pub bytes_per_s_per_node: f64,
    /// 99th percentile over nodes.
    pub bytes_per_s_per_node_p99: f64,
    /// Busiest node.
    pub bytes_per_s_per_node_max: f64,
    /// Mean over nodes of bytes sent per second in the run's second half
    /// (a cluster's steady state, once the join has settled).
    pub bytes_per_s_per_node_second_half: Option<f64>,
    /// Mean over nodes of datagrams sent per second.
    pub datagrams_per_s_per_node: f64,
    /// Coordinate publications (significant moves) per node per minute,
    /// over the live nodes' current lives.
    pub publications_per_min_per_node: f64,
    /// Table changes (rumors) waiting to be piggybacked at the end, mean
    /// over live nodes.
    pub rumors_pending_mean: f64,
    /// Table entries received per node per second that were newer than
    /// the receiver's (live nodes, current lives).
    pub entries_applied_per_s_per_node: f64,
    /// Mean over nodes of RTT samples fed to the engine.
    pub rtt_samples_per_node: f64,
    /// Fewest samples a node alive at the end took (this life).
    pub rtt_samples_per_node_min: u64,
    /// Median time live nodes' table entries for live members have been out
    /// of date (0 while an entry is the latest publication), s.
    pub table_staleness_s_p50: Option<f64>,
    /// 99th percentile of the same, s.
    pub table_staleness_s_p99: Option<f64>,
    /// Most out-of-date entry, s.
    pub table_staleness_s_max: Option<f64>,
    /// Share of live (observer, member) pairs with a table entry.
    pub table_coverage: f64,
    /// Median relative error of the RTT estimates a node serves from its
    /// table (its own published coordinate and its entry for the member,
    /// what `/v1/coordinate` clients compute) against the dataset, over
    /// live pairs with an entry (observers subsampled past 1M pairs).
    pub table_median_rel_err: Option<f64>,
    /// 99th percentile of the same.
    pub table_p99_rel_err: Option<f64>,
    /// Datagram counters.
    pub network: NetStats,
    /// Events processed.
    pub events: u64,
}

enum Ev {
    Deliver {
        to: u32,
        from: SocketAddr,
        bytes: Vec<u8>,
    },
    Timer {
        node: u32,
        life: u32,
        timer: Timer<Id>,
    },
    Join(u32),
    /// Announce again if this life of the node still knows no member.
    RetryJoin {
        node: u32,
        life: u32,
    },
    Kill(u32),
    Restart(u32),
    PartitionStart(usize),
    PartitionEnd(usize),
    Sample,
    Eval,
    /// Halfway: record what every node has sent so far.
    Halfway,
}

/// A queue entry: the time and sequence number it is ordered by, and the
/// slot of its event (events are large; the heap moves only these).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Scheduled {
    at: Duration,
    seq: u64,
    slot: u32,
}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap's top is the earliest (time, sequence).
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct KillRecord {
    node: usize,
    at: Duration,
    bump: u16,
    /// Per observer: its life + 1 when it saw the victim up at the kill, else 0.
    expected: Vec<u32>,
    detected: Vec<Option<Duration>>,
}

struct PartitionState {
    p: Partition,
    split: usize,
    ended: bool,
    healed: Option<Duration>,
}

/// A running gossip-driven simulation.
pub struct GossipSim<'a> {
    truth: &'a Matrix,
    series: Option<&'a Series>,
    cfg: GossipSimConfig,
    gcfg: GossipConfig,
    n: usize,
    nodes: Vec<Gossip>,
    alive: Vec<bool>,
    life: Vec<u32>,
    /// Identity bump each node's current life started with.
    life_bump: Vec<u16>,
    slow: Vec<Duration>,
    /// Bytes and datagrams sent and RTT samples taken by earlier lives.
    retired: Vec<[u64; 3]>,
    queue: BinaryHeap<Scheduled>,
    /// Events by slot; `free` lists the empty slots.
    slots: Vec<Option<Ev>>,
    free: Vec<u32>,
    seq: u64,
    now: Duration,
    events: u64,
    rng: ChaCha8Rng,
    net: NetStats,
    /// Bit `obs * n + j`: `obs` sees `j` up.
    view: Vec<u64>,
    /// Per observer: live members it does not see up.
    missing: Vec<u32>,
    /// Live observers with `missing > 0`.
    incomplete: usize,
    live: usize,
    last_join: Duration,
    join_converged: Option<Duration>,
    kills: Vec<KillRecord>,
    partitions: Vec<PartitionState>,
    active_partition: Option<usize>,
    false_deaths: u64,
    false_deaths_superseded: u64,
    false_death_examples: Vec<DeathExample>,
    partition_deaths: u64,
    rejoins: u64,
    /// (observer, member) pairs and members suspected at the last sample.
    suspected: HashSet<(u32, u32)>,
    suspected_members: HashSet<u32>,
    false_suspicions: u64,
    false_suspicions_slow: u64,
    false_suspicion_pairs: u64,
    false_suspicion_pairs_by_slow: u64,
    false_suspicion_samples: u64,
    suspicion_samples: u64,
    suspicion_period: Duration,
    convergence: Vec<[f64; 2]>,
    /// Bytes every node had sent halfway through the run.
    halfway_bytes: Option<Vec<u64>>,
}

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
        PORT,
    ))
}

fn index_of(a: SocketAddr) -> Option<usize> {
    match a {
        SocketAddr::V4(v) if v.port() == PORT => {
            let o = v.ip().octets();
            (o[0] == 10).then(|| (o[1] as usize) << 16 | (o[2] as usize) << 8 | o[3] as usize)
        }
        _ => None,
    }
}

fn name_of(i: usize) -> String {
    format!("node-{i}")
}

fn index_of_name(s: &str) -> Option<usize> {
    s.strip_prefix("node-")?.parse().ok()
}

/// A node's seed for one life (splitmix64 of the run seed, index and life).
fn node_seed(seed: u64, i: usize, life: u32) -> u64 {
    let mut z = seed
        ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (life as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl<'a> GossipSim<'a> {
    /// Sets up `truth.n` nodes (none joined yet). `truth` must be
    /// symmetrized; `series`, when given, must cover its nodes.
    pub fn new(
        truth: &'a Matrix,
        series: Option<&'a Series>,
        cfg: GossipSimConfig,
    ) -> Result<Self, SimError> {
        let n = truth.n;
        if n < 2 {
            return Err(SimError::TooFewNodes(n));
        }
        if n > MAX_NODES {
            return Err(SimError::Param(format!("at most {MAX_NODES} nodes")));
        }
        let param = |m: String| Err(SimError::Param(m));
        if cfg.duration.is_zero() {
            return param("duration must be positive".into());
        }
        if cfg.probe_interval < Duration::from_millis(1) {
            return param("probe interval must be at least 1ms".into());
        }
        if !(0.0..1.0).contains(&cfg.loss) {
            return param(format!("loss must be in [0, 1), got {}", cfg.loss));
        }
        if !(cfg.jitter.is_finite() && cfg.jitter >= 0.0) {
            return param("jitter must be finite and >= 0".into());
        }
        let dim = cfg.engine.dimensionality;
        if dim == 0 || dim > MAX_DIMENSIONS {
            return param(format!(
                "gossip carries 1 to {MAX_DIMENSIONS} coordinate dimensions, not {dim}"
            ));
        }
        let check_node = |what: &str, i: usize| {
            if i >= n {
                Err(SimError::Param(format!(
                    "{what}: node {i} does not exist (nodes 0..{})",
                    n - 1
                )))
            } else {
                Ok(())
            }
        };
        let check_time = |what: &str, t: Duration| {
            if t > cfg.duration {
                Err(SimError::Param(format!(
                    "{what}: time {:?} is after the end of the run ({:?})",
                    t, cfg.duration
                )))
            } else {
                Ok(())
            }
        };
        let mut slow = vec![Duration::ZERO; n];
        for &(i, d) in &cfg.slow {
            check_node("slow", i)?;
            slow[i] = d;
        }
        // Kills and restarts must alternate per node, starting with a kill.
        let mut lifecycle: Vec<(usize, Duration, bool)> = Vec::new();
        for &(i, t) in &cfg.kills {
            check_node("kill", i)?;
            check_time("kill", t)?;
            lifecycle.push((i, t, true));
        }
        for &(i, t) in &cfg.restarts {
            check_node("restart", i)?;
            check_time("restart", t)?;
            lifecycle.push((i, t, false));
        }
        lifecycle.sort_by_key(|&(i, t, kill)| (i, t, !kill));
        let mut down: Vec<bool> = vec![false; n];
        for &(i, t, kill) in &lifecycle {
            if kill == down[i] {
                return param(format!(
                    "node {i} at {t:?}: {}",
                    if kill {
                        "killed while already down"
                    } else {
                        "restarted while up (restart needs an earlier kill)"
                    }
                ));
            }
            down[i] = kill;
        }
        if down.iter().all(|&d| d) {
            return param("every node is killed".into());
        }
        let mut parts = cfg.partitions.clone();
        parts.sort_by_key(|p| p.start);
        for (k, p) in parts.iter().enumerate() {
            if !(p.fraction > 0.0 && p.fraction < 1.0) || p.end <= p.start {
                return param(format!("bad partition {p:?}"));
            }
            check_time("partition", p.start)?;
            if k > 0 && parts[k - 1].end > p.start {
                return param("partitions overlap".into());
            }
        }
        if let Some(s) = series {
            let needed = truth.orig.iter().max().map_or(0, |m| m + 1);
            if s.n < needed {
                return Err(SimError::SeriesTooSmall {
                    series: s.n,
                    needed,
                });
            }
            if s.slices.is_empty() {
                return param("the observation series has no slices".into());
            }
        }
        cfg.engine.validate()?;
        let gcfg = cfg.gossip_config(n);
        let nodes = (0..n)
            .map(|i| {
                let id = Id {
                    name: name_of(i),
                    addr: addr_of(i),
                    bump: 0,
                    server: None,
                };
                Gossip::new(id, gcfg.clone(), node_seed(cfg.seed, i, 0))
                    .map_err(|e| SimError::Param(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let suspicion_period = cfg.suspicion_period(n);
        let mut sim = GossipSim {
            truth,
            series,
            gcfg,
            n,
            nodes,
            alive: vec![true; n],
            life: vec![0; n],
            life_bump: vec![0; n],
            slow,
            retired: vec![[0; 3]; n],
            queue: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            seq: 0,
            now: Duration::ZERO,
            events: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6055_1900_0000_0001),
            net: NetStats::default(),
            view: vec![0; (n * n).div_ceil(64)],
            missing: vec![(n - 1) as u32; n],
            incomplete: n,
            live: n,
            last_join: Duration::ZERO,
            join_converged: None,
            kills: Vec::new(),
            partitions: parts
                .iter()
                .map(|&p| PartitionState {
                    p,
                    split: p.split(n),
                    ended: false,
                    healed: None,
                })
                .collect(),
            active_partition: None,
            false_deaths: 0,
            false_deaths_superseded: 0,
            false_death_examples: Vec::new(),
            partition_deaths: 0,
            rejoins: 0,
            suspected: HashSet::new(),
            suspected_members: HashSet::new(),
            false_suspicions: 0,
            false_suspicions_slow: 0,
            false_suspicion_pairs: 0,
            false_suspicion_pairs_by_slow: 0,
            false_suspicion_samples: 0,
            suspicion_samples: 0,
            suspicion_period,
            convergence: Vec::new(),
            halfway_bytes: None,
            cfg,
        };
        sim.schedule_scenario();
        Ok(sim)
    }

    fn schedule_scenario(&mut self) {
        let n = self.n;
        self.push(self.cfg.duration / 2, Ev::Halfway);
        // Node 0 is the seed the others announce to; with a warm start it
        // restores its membership like everyone else.
        let first = usize::from(!self.cfg.warm_start);
        for i in first..n {
            let at = self.cfg.join_window.mul_f64(i as f64 / n as f64);
            self.last_join = self.last_join.max(at);
            self.push(at, Ev::Join(i as u32));
        }
        for k in 0..self.partitions.len() {
            let p = self.partitions[k].p;
            self.push(p.start, Ev::PartitionStart(k));
            self.push(p.end, Ev::PartitionEnd(k));
        }
        // Kills before restarts at the same instant (validated order).
        let mut kills = self.cfg.kills.clone();
        kills.sort_by_key(|&(i, t)| (t, i));
        for (i, t) in kills {
            self.push(t, Ev::Kill(i as u32));
        }
        let mut restarts = self.cfg.restarts.clone();
        restarts.sort_by_key(|&(i, t)| (t, i));
        for (i, t) in restarts {
            self.push(t, Ev::Restart(i as u32));
        }
        if !self.suspicion_period.is_zero() {
            self.push(self.suspicion_period, Ev::Sample);
        }
        if !self.cfg.eval_every.is_zero() {
            self.push(self.cfg.eval_every, Ev::Eval);
        }
    }

    /// Number of nodes.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Simulated time reached.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The run's parameters.
    pub fn config(&self) -> &GossipSimConfig {
        &self.cfg
    }

    /// The nodes' configuration (foca's and the engine's).
    pub fn node_config(&self) -> &GossipConfig {
        &self.gcfg
    }

    /// The nodes (current lives).
    pub fn nodes(&self) -> &[Gossip] {
        &self.nodes
    }

    /// Whether node `i` is up.
    pub fn is_alive(&self, i: usize) -> bool {
        self.alive[i]
    }

    /// `[seconds, median_rel_err]` pairs recorded with `eval_every`.
    pub fn convergence(&self) -> &[[f64; 2]] {
        &self.convergence
    }

    /// Datagram counters so far.
    pub fn network(&self) -> NetStats {
        self.net
    }

    /// Bytes each node has sent, every life.
    fn bytes_sent(&self) -> Vec<u64> {
        (0..self.n)
            .map(|i| self.nodes[i].stats().bytes_out + self.retired[i][0])
            .collect()
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(k) => {
                self.slots[k as usize] = Some(ev);
                k
            }
            None => {
                self.slots.push(Some(ev));
                (self.slots.len() - 1) as u32
            }
        };
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            slot,
        });
    }

    #[inline]
    fn sees(&self, obs: usize, j: usize) -> bool {
        let k = obs * self.n + j;
        self.view[k / 64] & (1 << (k % 64)) != 0
    }

    #[inline]
    fn set_sees(&mut self, obs: usize, j: usize, v: bool) {
        let k = obs * self.n + j;
        if v {
            self.view[k / 64] |= 1 << (k % 64);
        } else {
            self.view[k / 64] &= !(1 << (k % 64));
        }
    }

    /// Runs every remaining event up to the configured duration, calling
    /// `progress(t)` after each simulated second.
    pub fn run(&mut self, mut progress: impl FnMut(Duration)) {
        let end = self.cfg.duration;
        let step = Duration::from_secs(1);
        let mut t = self.now;
        while t < end {
            t = (t + step).min(end);
            self.run_until(t);
            progress(t);
        }
    }

    /// Runs every event scheduled at or before `end`.
    pub fn run_until(&mut self, end: Duration) {
        while self.queue.peek().is_some_and(|s| s.at <= end) {
            let s = self.queue.pop().expect("peeked");
            let ev = self.slots[s.slot as usize].take().expect("scheduled");
            self.free.push(s.slot);
            self.now = s.at;
            self.events += 1;
            self.dispatch(ev);
            self.check_converged();
        }
        self.now = self.now.max(end);
    }

    fn dispatch(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Deliver { to, from, bytes } => {
                let to = to as usize;
                if !self.alive[to] {
                    self.net.dropped_dead += 1;
                    return;
                }
                self.net.delivered += 1;
                let outs = self.nodes[to].handle_datagram(now, from, &bytes);
                self.apply(to, outs);
            }
            Ev::Timer { node, life, timer } => {
                let node = node as usize;
                if self.alive[node] && self.life[node] == life {
                    let outs = self.nodes[node].handle_timer(now, timer);
                    self.apply(node, outs);
                }
            }
            Ev::Join(i) => self.join(i as usize, self.life[i as usize]),
            Ev::RetryJoin { node, life } => self.join(node as usize, life),
            Ev::Kill(i) => self.kill(i as usize),
            Ev::Restart(i) => self.restart(i as usize),
            Ev::PartitionStart(k) => self.active_partition = Some(k),
            Ev::PartitionEnd(k) => {
                self.active_partition = None;
                self.partitions[k].ended = true;
            }
            Ev::Sample => {
                self.sample_suspicions();
                let next = now + self.suspicion_period;
                if next <= self.cfg.duration {
                    self.push(next, Ev::Sample);
                }
            }
            Ev::Halfway => {
                self.halfway_bytes = Some(self.bytes_sent());
            }
            Ev::Eval => {
                let ev = self.evaluate();
                self.convergence
                    .push([now.as_secs_f64(), ev.median_rel_err]);
                let next = now + self.cfg.eval_every;
                if next <= self.cfg.duration {
                    self.push(next, Ev::Eval);
                }
            }
        }
    }

    /// Announces node `i` (in life `life`) to the seed, and checks again
    /// after [`RETRY_JOIN_INTERVALS`] probe intervals: like an agent's
    /// `-retry-join`, a node that knows no member keeps announcing (a lost
    /// announce or feed would otherwise leave it out for good).
    fn join(&mut self, i: usize, life: u32) {
        if !self.alive[i] || self.life[i] != life {
            return;
        }
        if self.cfg.warm_start && life == 0 {
            let all = (0..self.n).map(|j| Id {
                name: name_of(j),
                addr: addr_of(j),
                bump: 0,
                server: None,
            });
            let outs = self.nodes[i].restore(self.now, all);
            self.apply(i, outs);
            return;
        }
        if self.nodes[i].members().next().is_none() {
            if let Some(seed) = self.seed_for(i) {
                let outs = self.nodes[i].announce(self.now, addr_of(seed));
                self.apply(i, outs);
            }
            let at = self.now + self.cfg.probe_interval * RETRY_JOIN_INTERVALS;
            if at <= self.cfg.duration {
                self.push(
                    at,
                    Ev::RetryJoin {
                        node: i as u32,
                        life,
                    },
                );
            }
        }
    }

    /// The node a (re)joining node announces to: node 0, else the first
    /// live node.
    fn seed_for(&self, i: usize) -> Option<usize> {
        (0..self.n).find(|&s| s != i && self.alive[s])
    }

    fn apply(&mut self, node: usize, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, bytes } => self.send(node, to, bytes),
                Output::Timer { at, timer } => {
                    let life = self.life[node];
                    self.push(
                        at,
                        Ev::Timer {
                            node: node as u32,
                            life,
                            timer,
                        },
                    );
                }
                Output::Event(e) => self.on_event(node, e),
            }
        }
    }

    /// The RTT node `i` would see to `j` now, ms, or why there is none.
    fn rtt_ms(&mut self, i: usize, j: usize) -> Option<f64> {
        if let Some(s) = self.series {
            let t = (self.now.as_nanos() / self.cfg.probe_interval.as_nanos()) as usize
                % s.slices.len();
            let (oi, oj) = (self.truth.orig[i], self.truth.orig[j]);
            let mut x = s.at(t, oi, oj) as f64;
            if x <= 0.0 {
                x = s.at(t, oj, oi) as f64;
            }
            if x <= 0.0 {
                self.net.dropped_series_missing += 1;
                return None;
            }
            return Some(x);
        }
        let v = self.truth.at(i, j);
        if v <= 0.0 {
            self.net.dropped_unreachable += 1;
            return None;
        }
        Some(v)
    }

    fn separated(&self, a: usize, b: usize) -> bool {
        self.active_partition.is_some_and(|k| {
            let s = self.partitions[k].split;
            (a < s) != (b < s)
        })
    }

    fn send(&mut self, from: usize, to: SocketAddr, bytes: Vec<u8>) {
        self.net.sent += 1;
        let Some(dst) = index_of(to).filter(|&d| d < self.n && d != from) else {
            self.net.dropped_unknown += 1;
            return;
        };
        if self.separated(from, dst) {
            self.net.dropped_partition += 1;
            return;
        }
        let Some(rtt) = self.rtt_ms(from, dst) else {
            return;
        };
        if self.cfg.loss > 0.0 && self.rng.random::<f64>() < self.cfg.loss {
            self.net.dropped_loss += 1;
            return;
        }
        let mut one_way = rtt / 2.0;
        if self.cfg.jitter > 0.0 {
            let j = self.cfg.jitter;
            one_way *= match self.cfg.jitter_mode {
                JitterMode::Sym => 1.0 + j * (2.0 * self.rng.random::<f64>() - 1.0),
                JitterMode::Queue => 1.0 + j * normal(&mut self.rng).abs(),
            };
        }
        let delay = Duration::from_secs_f64(one_way.max(0.0) / 1000.0) + self.slow[from];
        let from_addr = addr_of(from);
        self.push(
            self.now + delay,
            Ev::Deliver {
                to: dst as u32,
                from: from_addr,
                bytes,
            },
        );
    }

    /// Whether `now` lies in a partition window (start until healed).
    fn in_partition_window(&self) -> bool {
        self.partitions
            .iter()
            .any(|p| self.now >= p.p.start && p.healed.is_none_or(|h| self.now <= h))
    }

    fn on_event(&mut self, obs: usize, e: Event) {
        match e {
            Event::MemberUp(id) => {
                let Some(j) = index_of(id.addr).filter(|&j| j < self.n && j != obs) else {
                    return;
                };
                if !self.sees(obs, j) {
                    self.set_sees(obs, j, true);
                    if self.alive[j] {
                        self.missing[obs] -= 1;
                        if self.missing[obs] == 0 {
                            self.incomplete -= 1;
                        }
                    }
                }
            }
            Event::MemberDown(id) => {
                let Some(j) = index_of(id.addr).filter(|&j| j < self.n && j != obs) else {
                    return;
                };
                if self.sees(obs, j) {
                    self.set_sees(obs, j, false);
                    if self.alive[j] {
                        self.missing[obs] += 1;
                        if self.missing[obs] == 1 {
                            self.incomplete += 1;
                        }
                    }
                }
                // Detection of a kill: the record of the victim's identity
                // (the earliest kill whose identity is at least this one).
                let now = self.now;
                let life = self.life[obs];
                if let Some(rec) = self
                    .kills
                    .iter_mut()
                    .filter(|r| r.node == j && r.at <= now && r.bump >= id.bump)
                    .min_by_key(|r| r.bump)
                    && rec.expected[obs] == life + 1
                    && rec.detected[obs].is_none()
                {
                    rec.detected[obs] = Some(now - rec.at);
                }
                if self.alive[j] && id.bump >= self.life_bump[j] {
                    if self.in_partition_window() {
                        self.partition_deaths += 1;
                    } else {
                        self.false_deaths += 1;
                        let current_bump = self.nodes[j].identity().bump;
                        if id.bump != current_bump {
                            self.false_deaths_superseded += 1;
                        }
                        if self.false_death_examples.len() < MAX_EXAMPLES {
                            self.false_death_examples.push(DeathExample {
                                at_s: now.as_secs_f64(),
                                observer: obs,
                                member: j,
                                bump: id.bump,
                                current_bump,
                            });
                        }
                    }
                }
            }
            Event::Rejoined(_) => self.rejoins += 1,
            Event::Idle | Event::Active => {}
        }
    }

    fn check_converged(&mut self) {
        if self.incomplete != 0 {
            return;
        }
        if self.join_converged.is_none() && self.now >= self.last_join {
            self.join_converged = Some(self.now);
        }
        for p in &mut self.partitions {
            if p.ended && p.healed.is_none() {
                p.healed = Some(self.now);
            }
        }
    }

    fn kill(&mut self, j: usize) {
        if !self.alive[j] {
            return;
        }
        let mut expected = vec![0u32; self.n];
        for (obs, e) in expected.iter_mut().enumerate() {
            if obs != j && self.alive[obs] && self.sees(obs, j) {
                *e = self.life[obs] + 1;
            }
        }
        self.kills.push(KillRecord {
            node: j,
            at: self.now,
            bump: self.nodes[j].identity().bump,
            expected,
            detected: vec![None; self.n],
        });
        self.alive[j] = false;
        self.live -= 1;
        if self.missing[j] > 0 {
            self.incomplete -= 1;
        }
        for obs in 0..self.n {
            if obs != j && self.alive[obs] && !self.sees(obs, j) {
                self.missing[obs] -= 1;
                if self.missing[obs] == 0 {
                    self.incomplete -= 1;
                }
            }
        }
    }

    fn restart(&mut self, j: usize) {
        if self.alive[j] {
            return;
        }
        let old = &self.nodes[j];
        let s = old.stats();
        let r = &mut self.retired[j];
        r[0] += s.bytes_out;
        r[1] += s.datagrams_out;
        r[2] += s.rtt_samples;
        let bump = old.identity().bump.wrapping_add(1);
        self.life[j] += 1;
        let id = Id {
            name: name_of(j),
            addr: addr_of(j),
            bump,
            server: None,
        };
        self.nodes[j] = Gossip::new(
            id,
            self.gcfg.clone(),
            node_seed(self.cfg.seed, j, self.life[j]),
        )
        .expect("the configuration was validated");
        self.life_bump[j] = bump;
        self.alive[j] = true;
        self.live += 1;
        for k in 0..self.n {
            self.set_sees(j, k, false);
        }
        self.missing[j] = (self.live - 1) as u32;
        if self.missing[j] > 0 {
            self.incomplete += 1;
        }
        for obs in 0..self.n {
            if obs != j && self.alive[obs] && !self.sees(obs, j) {
                self.missing[obs] += 1;
                if self.missing[obs] == 1 {
                    self.incomplete += 1;
                }
            }
        }
        self.join(j, self.life[j]);
    }

    fn sample_suspicions(&mut self) {
        self.suspicion_samples += 1;
        if self.in_partition_window() {
            self.suspected.clear();
            self.suspected_members.clear();
            return;
        }
        let mut now_suspected = HashSet::new();
        let mut now_members = HashSet::new();
        for obs in 0..self.n {
            if !self.alive[obs] {
                continue;
            }
            for (id, state) in self.nodes[obs].membership_iter() {
                if state != State::Suspect {
                    continue;
                }
                let Some(j) = index_of(id.addr).filter(|&j| j < self.n) else {
                    continue;
                };
                if self.alive[j] && id.bump >= self.life_bump[j] {
                    self.false_suspicion_samples += 1;
                    let key = (obs as u32, j as u32);
                    if !self.suspected.contains(&key) {
                        self.false_suspicion_pairs += 1;
                        if !self.slow[obs].is_zero() {
                            self.false_suspicion_pairs_by_slow += 1;
                        }
                    }
                    now_suspected.insert(key);
                    if now_members.insert(j as u32) && !self.suspected_members.contains(&(j as u32))
                    {
                        self.false_suspicions += 1;
                        if !self.slow[j].is_zero() {
                            self.false_suspicions_slow += 1;
                        }
                    }
                }
            }
        }
        self.suspected = now_suspected;
        self.suspected_members = now_members;
    }

    /// Scores the live nodes' published coordinates against the truth
    /// (the round-based simulator's figures).
    pub fn evaluate(&self) -> Evaluation {
        let live: Vec<usize> = (0..self.n).filter(|&i| self.alive[i]).collect();
        let coords: Vec<Coordinate> = live
            .iter()
            .map(|&i| self.nodes[i].engine().published().clone())
            .collect();
        let none: &[Node<String>] = &[];
        let mut ev = if live.len() == self.n {
            evaluate(self.truth, &coords, none, None, None)
        } else {
            let k = live.len();
            let mut rtt = Vec::with_capacity(k * k);
            for &i in &live {
                for &j in &live {
                    rtt.push(self.truth.at(i, j));
                }
            }
            let sub = Matrix {
                n: k,
                rtt,
                orig: live.iter().map(|&i| self.truth.orig[i]).collect(),
                labels: self
                    .truth
                    .labels
                    .as_ref()
                    .map(|l| live.iter().map(|&i| l[i].clone()).collect()),
            };
            evaluate(&sub, &coords, none, None, None)
        };
        ev.resets = live
            .iter()
            .map(|&i| self.nodes[i].engine().stats().resets)
            .sum();
        ev
    }

    /// The membership figures so far.
    pub fn membership(&self) -> Membership {
        let n = self.n;
        let dur = self.now.as_secs_f64().max(1e-9);
        // Detection.
        let mut all = Vec::new();
        let mut kills = Vec::new();
        let mut missing_total = 0usize;
        for r in &self.kills {
            let mut times = Vec::new();
            let mut undetected = 0usize;
            let mut observers = 0usize;
            for obs in 0..n {
                if r.expected[obs] == 0 {
                    continue;
                }
                observers += 1;
                match r.detected[obs] {
                    Some(d) => times.push(d.as_secs_f64()),
                    None if self.alive[obs] && self.life[obs] + 1 == r.expected[obs] => {
                        undetected += 1;
                    }
                    None => {}
                }
            }
            missing_total += undetected;
            all.extend_from_slice(&times);
            let max = times.iter().copied().reduce(f64::max);
            let p50 = opt(quantiles_unsorted(&mut times, &[0.5])[0]);
            kills.push(KillReport {
                node: r.node,
                at_s: r.at.as_secs_f64(),
                observers,
                detected: observers - undetected,
                undetected,
                detection_s_p50: p50,
                detection_s_max: if undetected == 0 { max } else { None },
            });
        }
        let detections = all.len();
        let dmax = all.iter().copied().reduce(f64::max);
        let q = quantiles_unsorted(&mut all, &[0.5, 0.99]);
        // Partitions.
        let partitions: Vec<PartitionReport> = self
            .partitions
            .iter()
            .map(|p| PartitionReport {
                partition: p.p,
                heal_s: p.healed.map(|h| (h - p.p.end).as_secs_f64()),
            })
            .collect();
        let partition_heal_s = if partitions.is_empty() {
            None
        } else {
            partitions
                .iter()
                .map(|p| p.heal_s)
                .collect::<Option<Vec<f64>>>()
                .and_then(|v| v.into_iter().reduce(f64::max))
        };
        // Traffic and samples, every life of every node.
        let mut rates = Vec::with_capacity(n);
        let (mut datagrams, mut samples) = (0u64, 0u64);
        let mut min_samples = u64::MAX;
        for (i, g) in self.nodes.iter().enumerate() {
            let s = g.stats();
            let r = self.retired[i];
            rates.push((s.bytes_out + r[0]) as f64 / dur);
            datagrams += s.datagrams_out + r[1];
            samples += s.rtt_samples + r[2];
            if self.alive[i] {
                min_samples = min_samples.min(s.rtt_samples);
            }
        }
        let bytes_mean = mean(&rates);
        let second_half = self.halfway_bytes.as_ref().map(|half| {
            let now = self.bytes_sent();
            let secs = dur - (self.cfg.duration / 2).as_secs_f64();
            let total: u64 = now.iter().zip(half).map(|(a, b)| a - b).sum();
            total as f64 / n as f64 / secs
        });
        let live_nodes: Vec<&Gossip> = (0..n)
            .filter(|&i| self.alive[i])
            .map(|i| &self.nodes[i])
            .collect();
        let per_live = |f: &dyn Fn(&Gossip) -> f64| {
            mean(&live_nodes.iter().map(|g| f(g)).collect::<Vec<f64>>())
        };
        let publications_per_min = per_live(&|g| g.stats().publications as f64) / dur * 60.0;
        let rumors_pending = per_live(&|g| g.pending_rumors() as f64);
        let entries_applied = per_live(&|g| g.stats().entries_applied as f64) / dur;
        let q_rates = quantiles_unsorted(&mut rates, &[0.99, 1.0]);
        // Table staleness.
        let mut ages = Vec::new();
        for (obs, g) in self.nodes.iter().enumerate() {
            if !self.alive[obs] {
                continue;
            }
            for (name, e) in g.table() {
                if let Some(j) = index_of_name(name)
                    && j < n
                    && j != obs
                    && self.alive[j]
                {
                    // Out of date since the member's first publication
                    // newer than the entry; 0 while it is the latest.
                    let pubs = self.nodes[j].publications();
                    let next = pubs.partition_point(|p| p.0 <= e.version);
                    let stale = pubs
                        .get(next)
                        .map_or(Duration::ZERO, |p| self.now.saturating_sub(p.1));
                    ages.push(stale.as_secs_f64());
                }
            }
        }
        let live_pairs = (self.live * self.live.saturating_sub(1)) as f64;
        let coverage = if live_pairs > 0.0 {
            ages.len() as f64 / live_pairs
        } else {
            0.0
        };
        let q_age = quantiles_unsorted(&mut ages, &[0.5, 0.99, 1.0]);
        let q_table = {
            let stride = (self.live * self.live / 1_000_000).max(1);
            let mut errs = Vec::new();
            for (obs, g) in self.nodes.iter().enumerate().step_by(stride) {
                if !self.alive[obs] {
                    continue;
                }
                let own = g.engine().published();
                for (name, e) in g.table() {
                    let Some(j) = index_of_name(name).filter(|&j| j < n && j != obs) else {
                        continue;
                    };
                    let truth = self.truth.at(obs, j);
                    if self.alive[j] && truth > 0.0 {
                        let est = own.distance_to(&e.coordinate) * 1000.0;
                        errs.push((est - truth).abs() / truth);
                    }
                }
            }
            quantiles_unsorted(&mut errs, &[0.5, 0.99])
        };
        let sampled = !self.suspicion_period.is_zero();
        let view_missing: u64 = (0..n)
            .filter(|&i| self.alive[i])
            .map(|i| self.missing[i] as u64)
            .sum();
        Membership {
            nodes: n,
            live_nodes: self.live,
            probe_interval_s: self.cfg.probe_interval.as_secs_f64(),
            suspect_to_down_s: self.gcfg.foca.suspect_to_down_after.as_secs_f64(),
            join_converged_s: self.join_converged.map(|d| d.as_secs_f64()),
            converged_at_end: self.incomplete == 0,
            view_missing_pairs_at_end: view_missing,
            kills,
            detections,
            detections_missing: missing_total,
            detection_s_p50: opt(q[0]),
            detection_s_p99: opt(q[1]),
            detection_s_max: dmax,
            false_deaths: self.false_deaths,
            false_deaths_of_superseded_identities: self.false_deaths_superseded,
            false_death_examples: self.false_death_examples.clone(),
            partition_deaths: self.partition_deaths,
            rejoins: self.rejoins,
            false_suspicions: sampled.then_some(self.false_suspicions),
            false_suspicions_of_slow_nodes: sampled.then_some(self.false_suspicions_slow),
            false_suspicion_pairs: sampled.then_some(self.false_suspicion_pairs),
            false_suspicion_pairs_by_slow_nodes: sampled
                .then_some(self.false_suspicion_pairs_by_slow),
            false_suspicion_samples: sampled.then_some(self.false_suspicion_samples),
            suspicion_samples: self.suspicion_samples,
            suspicion_sample_period_s: self.suspicion_period.as_secs_f64(),
            partitions,
            partition_heal_s,
            bytes_per_s_per_node: bytes_mean,
            bytes_per_s_per_node_p99: q_rates[0],
            bytes_per_s_per_node_max: q_rates[1],
            bytes_per_s_per_node_second_half: second_half,
            datagrams_per_s_per_node: datagrams as f64 / n as f64 / dur,
            publications_per_min_per_node: publications_per_min,
            rumors_pending_mean: rumors_pending,
            entries_applied_per_s_per_node: entries_applied,
            rtt_samples_per_node: samples as f64 / n as f64,
            rtt_samples_per_node_min: if min_samples == u64::MAX {
                0
            } else {
                min_samples
            },
            table_staleness_s_p50: opt(q_age[0]),
            table_staleness_s_p99: opt(q_age[1]),
            table_staleness_s_max: opt(q_age[2]),
            table_coverage: coverage,
            table_median_rel_err: opt(q_table[0]),
            table_p99_rel_err: opt(q_table[1]),
            network: self.net,
            events: self.events,
        }
    }
}

fn opt(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{GeoOptions, Synthetic, generate};

    fn geo(n: usize) -> Matrix {
        let mut m = generate(Synthetic::Geo, n, 3, &GeoOptions::default())
            .unwrap()
            .matrix;
        m.symmetrize();
        m
    }

    #[test]
    fn durations_parse() {
        let d = |s| parse_duration(s).unwrap();
        assert_eq!(d("600s"), Duration::from_secs(600));
        assert_eq!(d("30m"), Duration::from_secs(1800));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("1h30m"), Duration::from_secs(5400));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert_eq!(d("90"), Duration::from_secs(90));
        for bad in ["", "s", "10x", "-5s", "1..2s", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_node_at("3@10m").unwrap(),
            (3, Duration::from_secs(600))
        );
        assert_eq!(
            parse_node_delay("7:2s").unwrap(),
            (7, Duration::from_secs(2))
        );
        assert!(parse_node_at("3").is_err());
        assert!(parse_node_delay("x:2s").is_err());
        let p: Partition = "half@5m..8m".parse().unwrap();
        assert_eq!(
            (p.fraction, p.start, p.end),
            (0.5, Duration::from_secs(300), Duration::from_secs(480))
        );
        assert!("0.3@10s..5s".parse::<Partition>().is_err());
        assert!("1.5@1s..5s".parse::<Partition>().is_err());
        assert!("half@1s".parse::<Partition>().is_err());
    }

    #[test]
    fn addresses_round_trip() {
        for i in [0, 1, 255, 256, 70_000, MAX_NODES - 1] {
            assert_eq!(index_of(addr_of(i)), Some(i));
        }
        assert_eq!(index_of_name(&name_of(42)), Some(42));
    }

    #[test]
    fn join_kill_restart_and_partition() {
        let m = geo(12);
        let cfg = GossipSimConfig {
            duration: Duration::from_secs(400),
            kills: vec![(5, Duration::from_secs(60))],
            restarts: vec![(5, Duration::from_secs(120))],
            partitions: vec!["half@200s..230s".parse().unwrap()],
            ..Default::default()
        };
        let mut sim = GossipSim::new(&m, None, cfg).unwrap();
        sim.run(|_| {});
        let mb = sim.membership();
        assert!(mb.join_converged_s.is_some_and(|t| t < 20.0), "{mb:?}");
        assert_eq!(mb.kills.len(), 1);
        assert_eq!(mb.kills[0].observers, 11, "{mb:?}");
        assert_eq!(mb.kills[0].undetected, 0, "{mb:?}");
        assert!(mb.detection_s_p99.is_some_and(|t| t < 30.0), "{mb:?}");
        assert_eq!(mb.false_deaths, 0, "{mb:?}");
        assert!(mb.partition_heal_s.is_some(), "{mb:?}");
        assert!(mb.converged_at_end, "{mb:?}");
        assert_eq!(mb.live_nodes, 12);
        let ev = sim.evaluate();
        assert_eq!(ev.pairs, 66);
    }

    #[test]
    fn bad_scenarios_are_errors() {
        let m = geo(6);
        let with = |f: &dyn Fn(&mut GossipSimConfig)| {
            let mut c = GossipSimConfig::default();
            f(&mut c);
            GossipSim::new(&m, None, c).err()
        };
        assert!(with(&|c| c.kills = vec![(6, Duration::from_secs(1))]).is_some());
        assert!(with(&|c| c.restarts = vec![(1, Duration::from_secs(1))]).is_some());
        assert!(
            with(&|c| c.kills = vec![(1, Duration::from_secs(1)), (1, Duration::from_secs(2))])
                .is_some()
        );
        assert!(with(&|c| c.kills = vec![(1, Duration::from_secs(601))]).is_some());
        assert!(with(&|c| c.loss = 1.0).is_some());
        assert!(
            with(&|c| c.partitions = vec![
                "half@1s..10s".parse().unwrap(),
                "half@5s..20s".parse().unwrap()
            ])
            .is_some()
        );
        assert!(with(&|c| c.kills = vec![(1, Duration::from_secs(1))]).is_none());
    }
}
