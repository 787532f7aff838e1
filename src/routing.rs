//! Geo-routing policy: which datacenter answers a query.
//!
//! The agent (`/v1/catalog/datacenters`, prepared-query failover) and the
//! failover simulator ([`crate::sim::failover`]) must make the *same*
//! decision from the same inputs, or the simulator measures a policy the
//! agent does not run. So the policy lives here, pure: no I/O, no clock
//! (times are passed in as a [`Duration`] since any epoch the caller likes),
//! no dependency on where the RTTs or health figures come from.
//!
//! Three pieces:
//!
//! * [`order_datacenters`]: Consul's datacenter ordering
//!   (`consul-api.md` §2.5): per datacenter, the upper median of the
//!   estimated RTTs from the answering server to that datacenter's live
//!   servers, a missing coordinate counting +∞ and the own datacenter 0;
//!   names sorted alphabetically, then stable-sorted by that median.
//! * [`FailoverPolicy`]: Consul's `Failover {NearestN, Datacenters}`
//!   candidate list (§2.7) plus what users asked for beyond it
//!   (`user-asks.md` rows 19, 22, 24): fail over when the healthy fraction
//!   drops below a threshold rather than only at zero, skip datacenters
//!   whose estimated p99 exceeds a bound, and hysteresis.
//! * [`Chooser`]: the stateful part. Consul is stateless (every query takes
//!   the first datacenter with a healthy instance), so when a datacenter's
//!   health oscillates its answers oscillate with it, and so do they when
//!   two candidates' estimated RTTs are close enough for the order to
//!   flip. The chooser fails over at once, but moves the answers to a more
//!   preferred datacenter (failback, or a change of order) only once that
//!   has lasted for a hold time; the rule is on [`Chooser`].

use std::collections::HashMap;
use std::time::Duration;

/// What can be wrong with a failover policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoutingError {
    /// `min_healthy_fraction` outside [0, 1] (or NaN).
    #[error("min_healthy_fraction must be in [0, 1], got {0}")]
    HealthyFraction(f64),
    /// `max_p99_ms` not a finite positive number.
    #[error("max_p99_ms must be finite and > 0, got {0}")]
    MaxP99(f64),
    /// The local datacenter has no name.
    #[error("the local datacenter name is empty")]
    EmptyLocal,
}

/// Upper median of `values` (sorts them): `values[len / 2]` after sorting,
/// Consul's rule for a datacenter's distance. `None` when empty. NaN sorts
/// above +∞ ([`f64::total_cmp`]), so it never wins a median it is not
/// forced into.
pub fn upper_median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// Orders datacenters nearest first, as Consul's
/// `GetDatacentersByDistance` does (`consul-api.md` §2.5).
///
/// `servers` holds one `(datacenter, estimated RTT)` pair per live server
/// as seen from the answering server (callers leave out servers that have
/// left). An RTT of `None` (no coordinate), NaN or a negative value counts
/// as +∞. Each datacenter's distance is the [`upper_median`] of its
/// servers' RTTs; the `local` datacenter is always 0 and always present,
/// whatever its servers' RTTs (the answering server is one of them).
/// Names are sorted alphabetically first and then stable-sorted by
/// distance, so equal distances keep name order. The RTT unit is the
/// caller's (Consul uses seconds) and comes back unchanged.
pub fn order_datacenters<S: AsRef<str>>(
    local: &str,
    servers: &[(S, Option<f64>)],
) -> Vec<(String, f64)> {
    let mut by_dc: HashMap<&str, Vec<f64>> = HashMap::new();
    by_dc.entry(local).or_default();
    for (dc, rtt) in servers {
        // `>= 0.0` is false for NaN, so NaN becomes +∞ with the missing ones.
        let v = rtt.filter(|r| *r >= 0.0).unwrap_or(f64::INFINITY);
        by_dc.entry(dc.as_ref()).or_default().push(v);
    }
    let mut out: Vec<(String, f64)> = by_dc
        .into_iter()
        .map(|(dc, mut rtts)| {
            let d = if dc == local {
                0.0
            } else {
                upper_median(&mut rtts).unwrap_or(f64::INFINITY)
            };
            (dc.to_string(), d)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    // `sort_by` is stable: equal distances keep the alphabetical order.
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// How long a more preferred datacenter must have been able to serve (and
/// been preferred) before the answers move to it: after a failure, or
/// after a change of order (see [`Chooser`]). The default is no
/// hysteresis: Consul's stateless behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hysteresis {
    /// How long a datacenter must have been able to serve, without a
    /// break, before answers move back to it.
    pub hold: Duration,
    /// How many consecutive evaluations must have seen it able to serve
    /// (including the current one). Guards callers that evaluate rarely,
    /// where one gap longer than `hold` would otherwise suffice.
    pub min_evaluations: u32,
}

impl Hysteresis {
    /// No hysteresis: always the most preferred datacenter that can serve.
    pub const NONE: Hysteresis = Hysteresis {
        hold: Duration::ZERO,
        min_evaluations: 0,
    };
}

/// A prepared query's failover settings: Consul's `NearestN` and
/// `Datacenters`, and tomo's optional extensions. With the extensions left
/// at their defaults it behaves as Consul does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FailoverPolicy {
    /// Try the N nearest other datacenters first (Consul's `NearestN`).
    pub nearest_n: usize,
    /// Then these, in this order, skipping unknown ones and ones already
    /// listed (Consul's `Datacenters`).
    pub datacenters: Vec<String>,
    /// A datacenter serves only while at least this fraction of its
    /// instances is healthy (and at least one is): the local one fails over
    /// below it instead of only at zero. `None`: any healthy instance will
    /// do, as in Consul.
    pub min_healthy_fraction: Option<f64>,
    /// Skip candidate datacenters whose estimated p99 RTT exceeds this, ms.
    /// A candidate without a p99 estimate is kept.
    pub max_p99_ms: Option<f64>,
    /// Fail-back damping, used by [`Chooser`].
    pub hysteresis: Hysteresis,
}

impl FailoverPolicy {
    /// Checks the bounds of the optional fields.
    pub fn validate(&self) -> Result<(), RoutingError> {
        if let Some(f) = self.min_healthy_fraction
            && !(0.0..=1.0).contains(&f)
        {
            return Err(RoutingError::HealthyFraction(f));
        }
        if let Some(p) = self.max_p99_ms
            && !(p.is_finite() && p > 0.0)
        {
            return Err(RoutingError::MaxP99(p));
        }
        Ok(())
    }

    /// Whether a datacenter whose healthy fraction is `healthy_fraction`
    /// can serve: at least one healthy instance (a positive fraction) and,
    /// with [`Self::min_healthy_fraction`], at least that fraction. NaN
    /// cannot serve.
    pub fn can_serve(&self, healthy_fraction: f64) -> bool {
        healthy_fraction > 0.0 && healthy_fraction >= self.min_healthy_fraction.unwrap_or(0.0)
    }

    /// The failover candidates, in the order they are tried, as Consul's
    /// `queryFailover` builds them (`consul-api.md` §2.7): the
    /// [`Self::nearest_n`] nearest datacenters of `ordering` other than
    /// `local`, then each of [`Self::datacenters`] in order, skipping
    /// names absent from `ordering` ("unknown"), the local datacenter and
    /// names already listed. `ordering` is nearest first, as
    /// [`order_datacenters`] returns it.
    ///
    /// With [`Self::max_p99_ms`], a datacenter for which `p99_ms` returns
    /// an estimate above the bound is skipped in both parts, and
    /// `nearest_n` counts only datacenters within the bound (so it still
    /// yields N candidates when enough remain).
    pub fn candidates(
        &self,
        local: &str,
        ordering: &[(String, f64)],
        p99_ms: impl Fn(&str) -> Option<f64>,
    ) -> Vec<String> {
        let within_bound = |dc: &str| match (self.max_p99_ms, p99_ms(dc)) {
            (Some(max), Some(p)) => p <= max,
            _ => true,
        };
        let mut out: Vec<String> = ordering
            .iter()
            .map(|(dc, _)| dc.as_str())
            .filter(|dc| *dc != local && within_bound(dc))
            .take(self.nearest_n)
            .map(str::to_string)
            .collect();
        for dc in &self.datacenters {
            let known = dc != local && ordering.iter().any(|(o, _)| o == dc);
            if known && !out.contains(dc) && within_bound(dc) {
                out.push(dc.clone());
            }
        }
        out
    }
}

/// Why a [`Chooser`] picked what it picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The most preferred datacenter that can serve and has been able to
    /// for the hold (normally the local one).
    Preferred,
    /// A more preferred datacenter can serve again but has not been able
    /// to for the hold yet, so the answers stay where they are.
    Holding,
    /// No datacenter meets the healthy-fraction threshold: the most
    /// preferred one with any healthy instance.
    Partial,
    /// No datacenter has a healthy instance.
    NoneHealthy,
}

/// One [`Chooser::choose`] outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The datacenter to serve from; `None` when nothing is healthy.
    pub datacenter: Option<String>,
    /// Its place in the preference order: 0 for the local datacenter, `i`
    /// for the `i`-th failover candidate (Consul's `Failovers` count).
    pub rank: usize,
    /// Whether this differs from the previous decision.
    pub changed: bool,
    /// Why.
    pub reason: Reason,
}

/// How long a datacenter has been able to serve, without a break.
#[derive(Debug, Clone, Copy)]
struct Streak {
    /// When it started; `None` for "since before the first evaluation":
    /// what a chooser sees serving on its first evaluation is trusted.
    since: Option<Duration>,
    /// Consecutive evaluations that saw it able to serve.
    evaluations: u32,
}

/// The streaks of `order`'s datacenters for which `keep` holds: extended
/// from `old`, or started at `start`; the others end.
fn extend(
    old: &HashMap<String, Streak>,
    order: &[&str],
    keep: &[bool],
    start: Option<Duration>,
) -> HashMap<String, Streak> {
    order
        .iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(dc, _)| {
            let s = match old.get(*dc) {
                Some(s) => Streak {
                    since: s.since,
                    evaluations: s.evaluations.saturating_add(1),
                },
                None => Streak {
                    since: start,
                    evaluations: 1,
                },
            };
            (dc.to_string(), s)
        })
        .collect()
}

/// Picks the datacenter to serve from, with fail-back hysteresis.
///
/// The preference order is the local datacenter, then the failover
/// candidates ([`FailoverPolicy::candidates`]). A datacenter *can serve*
/// when [`FailoverPolicy::can_serve`] holds for its healthy fraction. It is
/// *settled* when it has been able to serve at every evaluation for at
/// least [`Hysteresis::hold`] and [`Hysteresis::min_evaluations`]
/// evaluations (datacenters able to serve at the chooser's first
/// evaluation count as settled: there is no history to distrust), and it
/// has *won* when, for as long, it has also been preferred over the
/// datacenter the answers came from (right after a forced move, the order
/// is taken as it stands: a datacenter preferred over the new one counts
/// as preferred for as long as it has been serving). Then:
///
/// 1. **Failing over is immediate.** If the current datacenter cannot
///    serve (or is no longer in the order), the answers move at once to
///    the most preferred settled datacenter, or, if none is settled, to
///    the most preferred one that can serve: a datacenter that has just
///    come back is only used when nothing steadier is available.
/// 2. **Moving up waits.** While the current datacenter can serve, the
///    answers move only to a *more* preferred datacenter that has won. So
///    a datacenter whose health oscillates faster than the hold does not
///    get the answers back until it stops oscillating (failback), and two
///    candidates whose estimated RTTs are so close that the order between
///    them keeps flipping do not trade the answers back and forth
///    (reorder): answers change once per failure (away) and once per
///    lasting recovery or lasting change of order.
/// 3. If no datacenter meets the threshold, the most preferred one with
///    any healthy instance ([`Reason::Partial`]); if none has one, `None`.
///
/// With [`Hysteresis::NONE`] everything that can serve is settled and wins
/// at once, so the choice is always the most preferred datacenter that can
/// serve: Consul's rule (with no threshold: the first with a healthy
/// instance).
///
/// Times are expected not to go backwards; if they do, moving up is only
/// delayed.
#[derive(Debug, Clone)]
pub struct Chooser {
    local: String,
    policy: FailoverPolicy,
    current: Option<String>,
    /// How long each datacenter has been able to serve.
    streaks: HashMap<String, Streak>,
    /// How long each datacenter has been able to serve *and* been
    /// preferred over the datacenter the answers come from.
    challenges: HashMap<String, Streak>,
    evaluated: bool,
}

impl Chooser {
    /// A chooser for queries answered in `local`, with `policy`'s threshold
    /// and hysteresis.
    pub fn new(local: impl Into<String>, policy: FailoverPolicy) -> Result<Self, RoutingError> {
        let local = local.into();
        if local.is_empty() {
            return Err(RoutingError::EmptyLocal);
        }
        policy.validate()?;
        Ok(Chooser {
            local,
            policy,
            current: None,
            streaks: HashMap::new(),
            challenges: HashMap::new(),
            evaluated: false,
        })
    }

    /// The local datacenter.
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The policy it applies.
    pub fn policy(&self) -> &FailoverPolicy {
        &self.policy
    }

    /// The datacenter of the last decision.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Decides where to serve from at `now`. `candidates` is the failover
    /// list (the local datacenter in it is ignored: it always comes first)
    /// and `healthy_fraction` gives each datacenter's fraction of healthy
    /// instances in [0, 1] (NaN counts as 0). The rule is on [`Chooser`].
    pub fn choose(
        &mut self,
        now: Duration,
        candidates: &[String],
        healthy_fraction: impl Fn(&str) -> f64,
    ) -> Decision {
        let mut order: Vec<&str> = Vec::with_capacity(candidates.len() + 1);
        let mut seen = std::collections::HashSet::with_capacity(candidates.len() + 1);
        for dc in std::iter::once(self.local.as_str()).chain(candidates.iter().map(String::as_str))
        {
            if seen.insert(dc) {
                order.push(dc);
            }
        }
        let fractions: Vec<f64> = order
            .iter()
            .map(|dc| {
                let f = healthy_fraction(dc);
                if f.is_nan() { 0.0 } else { f.clamp(0.0, 1.0) }
            })
            .collect();
        let serving: Vec<bool> = fractions
            .iter()
            .map(|&f| self.policy.can_serve(f))
            .collect();

        let current = self
            .current
            .as_deref()
            .and_then(|c| order.iter().position(|dc| *dc == c));
        // Health streaks: extend those still serving, drop the rest (and
        // those of datacenters no longer in the order: unobserved is not
        // healthy). What serves at the first evaluation is trusted.
        let first = !self.evaluated;
        self.streaks = extend(&self.streaks, &order, &serving, (!first).then_some(now));
        // Challenges: serving and preferred over where the answers are.
        let ahead: Vec<bool> = match current {
            Some(ci) if serving[ci] => (0..order.len()).map(|i| i < ci && serving[i]).collect(),
            _ => vec![false; order.len()],
        };
        self.challenges = extend(&self.challenges, &order, &ahead, Some(now));
        self.evaluated = true;

        let h = self.policy.hysteresis;
        let held = |s: Option<&Streak>| {
            s.is_some_and(|s| match s.since {
                None => true,
                Some(t) => now.saturating_sub(t) >= h.hold && s.evaluations >= h.min_evaluations,
            })
        };
        let settled: Vec<bool> = order.iter().map(|dc| held(self.streaks.get(*dc))).collect();
        let pick = match current {
            Some(ci) if serving[ci] => {
                // Rule 2: only a datacenter that has been serving and
                // preferred for the hold takes the answers.
                let won: Vec<bool> = order
                    .iter()
                    .map(|dc| held(self.challenges.get(*dc)))
                    .collect();
                match (0..ci).find(|&i| won[i]) {
                    // Moving up, maybe not all the way: say so if a still
                    // more preferred one is waiting out its hold.
                    Some(bi) if (0..bi).any(|i| serving[i]) => Some((bi, Reason::Holding)),
                    Some(bi) => Some((bi, Reason::Preferred)),
                    None if (0..ci).any(|i| serving[i]) => Some((ci, Reason::Holding)),
                    None => Some((ci, Reason::Preferred)),
                }
            }
            _ => {
                // Rule 1: move now, preferring a datacenter that has been
                // steady over one that has just come back.
                let steady = (0..order.len()).find(|&i| settled[i]);
                let any = (0..order.len()).find(|&i| serving[i]);
                match (steady, any) {
                    (Some(s), Some(a)) if a < s => Some((s, Reason::Holding)),
                    (Some(s), _) => Some((s, Reason::Preferred)),
                    (None, Some(a)) => Some((a, Reason::Preferred)),
                    (None, None) => (0..order.len())
                        .find(|&i| fractions[i] > 0.0)
                        .map(|i| (i, Reason::Partial)),
                }
            }
        };
        let forced = !matches!(current, Some(ci) if serving[ci]);
        if forced && let Some((pi, _)) = pick {
            // After a forced move the order between the new datacenter and
            // those preferred over it is taken as it stands: each of them
            // has been challenging for as long as it has been serving.
            self.challenges = order[..pi]
                .iter()
                .filter_map(|dc| self.streaks.get(*dc).map(|s| (dc.to_string(), *s)))
                .collect();
        }
        let (datacenter, rank, reason) = match pick {
            Some((i, r)) => (Some(order[i].to_string()), i, r),
            None => (None, 0, Reason::NoneHealthy),
        };
        let changed = datacenter != self.current;
        self.current.clone_from(&datacenter);
        Decision {
            datacenter,
            rank,
            changed,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(v: &[(String, f64)]) -> Vec<&str> {
        v.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn secs(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    #[test]
    fn median_is_the_upper_one() {
        // Even counts take the upper of the two middle values.
        assert_eq!(upper_median(&mut [4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(upper_median(&mut [2.0, 1.0]), Some(2.0));
        assert_eq!(upper_median(&mut [5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(upper_median(&mut [7.0]), Some(7.0));
        assert_eq!(upper_median(&mut []), None);
    }

    #[test]
    fn orders_by_upper_median_with_local_first() {
        let servers = [
            ("dc2", Some(0.030)),
            ("dc2", Some(0.010)),
            ("dc3", Some(0.015)),
            ("dc3", Some(0.025)),
            ("dc3", Some(0.005)),
            // The local DC's own servers do not count: it is 0.
            ("dc1", Some(0.5)),
        ];
        let o = order_datacenters("dc1", &servers);
        // dc2: [0.010, 0.030] → 0.030; dc3: [0.005, 0.015, 0.025] → 0.015.
        assert_eq!(
            o,
            vec![
                ("dc1".to_string(), 0.0),
                ("dc3".to_string(), 0.015),
                ("dc2".to_string(), 0.030)
            ]
        );
    }

    #[test]
    fn missing_coordinates_count_as_infinity() {
        let servers = [
            // One of two missing: the upper median is the +∞ one.
            ("b", Some(0.010)),
            ("b", None),
            // One of three missing: the median is still finite.
            ("c", Some(0.020)),
            ("c", Some(0.040)),
            ("c", None),
            // All missing, NaN or negative: +∞.
            ("d", None),
            ("e", Some(f64::NAN)),
            ("f", Some(-1.0)),
        ];
        let o = order_datacenters("a", &servers);
        assert_eq!(names(&o), vec!["a", "c", "b", "d", "e", "f"]);
        assert_eq!(o[1].1, 0.040);
        assert!(o[2..].iter().all(|(_, d)| d.is_infinite()));
    }

    #[test]
    fn local_is_present_without_servers_and_ties_keep_name_order() {
        let servers = [("zz", Some(0.01)), ("aa", Some(0.01)), ("mm", Some(0.01))];
        let o = order_datacenters("local", &servers);
        assert_eq!(names(&o), vec!["local", "aa", "mm", "zz"]);
        assert_eq!(o[0].1, 0.0);
    }

    proptest! {
        #[test]
        fn ordering_is_sorted_stable_and_complete(
            servers in proptest::collection::vec(
                (0u8..6, proptest::option::of(0u32..50)), 0..40),
        ) {
            let servers: Vec<(String, Option<f64>)> = servers
                .into_iter()
                .map(|(d, r)| (format!("dc{d}"), r.map(|r| f64::from(r) / 1000.0)))
                .collect();
            let o = order_datacenters("dc0", &servers);
            // Every named datacenter once, the local one first at 0.
            let mut want: Vec<&str> = servers.iter().map(|(d, _)| d.as_str()).collect();
            want.push("dc0");
            want.sort();
            want.dedup();
            let mut got = names(&o);
            got.sort();
            prop_assert_eq!(got, want);
            prop_assert_eq!(o[0].0.as_str(), "dc0");
            prop_assert_eq!(o[0].1, 0.0);
            for w in o.windows(2) {
                // Nearest first; ties in name order.
                prop_assert!(w[0].1 < w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0));
            }
            // Each distance is its servers' upper median.
            for (dc, d) in o.iter().skip(1) {
                let mut v: Vec<f64> = servers
                    .iter()
                    .filter(|(n, _)| n == dc)
                    .map(|(_, r)| r.unwrap_or(f64::INFINITY))
                    .collect();
                v.sort_by(f64::total_cmp);
                prop_assert_eq!(*d, v[v.len() / 2]);
            }
            // Input order does not matter.
            let mut rev = servers.clone();
            rev.reverse();
            prop_assert_eq!(order_datacenters("dc0", &rev), o);
        }
    }

    fn ordering(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(n, d)| (n.to_string(), *d)).collect()
    }

    #[test]
    fn candidates_follow_consul() {
        let o = ordering(&[("dc1", 0.0), ("dc3", 0.01), ("dc2", 0.02), ("dc4", 0.03)]);
        let p = FailoverPolicy {
            nearest_n: 2,
            // dc3 is already there, dc9 is unknown, dc1 is local, dc4 twice.
            datacenters: s(&["dc4", "dc3", "dc9", "dc1", "dc4"]),
            ..Default::default()
        };
        assert_eq!(p.candidates("dc1", &o, |_| None), s(&["dc3", "dc2", "dc4"]));
        // NearestN 0: only the listed ones, in the listed order.
        let p = FailoverPolicy {
            datacenters: s(&["dc4", "dc2"]),
            ..Default::default()
        };
        assert_eq!(p.candidates("dc1", &o, |_| None), s(&["dc4", "dc2"]));
        // NearestN beyond the known datacenters: all others.
        let p = FailoverPolicy {
            nearest_n: 10,
            ..Default::default()
        };
        assert_eq!(p.candidates("dc1", &o, |_| None), s(&["dc3", "dc2", "dc4"]));
    }

    #[test]
    fn candidates_skip_datacenters_over_the_p99_bound() {
        let o = ordering(&[("dc1", 0.0), ("dc3", 0.01), ("dc2", 0.02), ("dc4", 0.03)]);
        let p99 = |dc: &str| match dc {
            "dc3" => Some(250.0),
            "dc2" => Some(90.0),
            _ => None, // unknown p99: kept
        };
        let p = FailoverPolicy {
            nearest_n: 2,
            datacenters: s(&["dc3"]),
            max_p99_ms: Some(100.0),
            ..Default::default()
        };
        // dc3 skipped in both parts; NearestN still yields two.
        assert_eq!(p.candidates("dc1", &o, p99), s(&["dc2", "dc4"]));
    }

    #[test]
    fn policy_validation() {
        let bad = |f: FailoverPolicy| f.validate().is_err();
        assert!(bad(FailoverPolicy {
            min_healthy_fraction: Some(1.5),
            ..Default::default()
        }));
        assert!(bad(FailoverPolicy {
            min_healthy_fraction: Some(f64::NAN),
            ..Default::default()
        }));
        assert!(bad(FailoverPolicy {
            max_p99_ms: Some(0.0),
            ..Default::default()
        }));
        assert!(matches!(
            Chooser::new("", FailoverPolicy::default()),
            Err(RoutingError::EmptyLocal)
        ));
        assert!(FailoverPolicy::default().validate().is_ok());
    }

    #[test]
    fn threshold_fails_over_before_zero() {
        let p = FailoverPolicy {
            min_healthy_fraction: Some(0.5),
            ..Default::default()
        };
        assert!(p.can_serve(0.5));
        assert!(!p.can_serve(0.4));
        assert!(!p.can_serve(f64::NAN));
        let consul = FailoverPolicy::default();
        assert!(consul.can_serve(0.01));
        assert!(!consul.can_serve(0.0));

        let mut c = Chooser::new("a", p).unwrap();
        let cands = s(&["b"]);
        let d = c.choose(secs(0), &cands, |dc| if dc == "a" { 0.4 } else { 1.0 });
        assert_eq!(d.datacenter.as_deref(), Some("b"));
        assert_eq!(d.rank, 1);
        // Nothing meets the threshold: the most preferred with any healthy.
        let d = c.choose(secs(1), &cands, |dc| if dc == "a" { 0.2 } else { 0.1 });
        assert_eq!(
            (d.datacenter.as_deref(), d.reason),
            (Some("a"), Reason::Partial)
        );
        let d = c.choose(secs(2), &cands, |_| 0.0);
        assert_eq!((d.datacenter, d.reason), (None, Reason::NoneHealthy));
    }

    fn hold(h: u64, n: u32) -> FailoverPolicy {
        FailoverPolicy {
            nearest_n: 5,
            hysteresis: Hysteresis {
                hold: secs(h),
                min_evaluations: n,
            },
            ..Default::default()
        }
    }

    /// Runs a chooser once per second over `health(t, dc)`; returns the
    /// chosen datacenter at each second.
    fn run(
        policy: FailoverPolicy,
        cands: &[&str],
        secs_total: u64,
        health: impl Fn(u64, &str) -> f64,
    ) -> Vec<Option<String>> {
        let mut c = Chooser::new("local", policy).unwrap();
        let cands = s(cands);
        (0..secs_total)
            .map(|t| {
                c.choose(Duration::from_secs(t), &cands, |dc| health(t, dc))
                    .datacenter
            })
            .collect()
    }

    #[test]
    fn fails_over_at_once_and_back_after_the_hold() {
        // local down over [10, 20): away at 10, back at 20 + 30 s hold.
        let got = run(hold(30, 3), &["b", "c"], 80, |t, dc| {
            f64::from(!(dc == "local" && (10..20).contains(&t)))
        });
        for (t, g) in got.iter().enumerate() {
            let want = if (10..50).contains(&t) { "b" } else { "local" };
            assert_eq!(g.as_deref(), Some(want), "t={t}");
        }
    }

    #[test]
    fn min_evaluations_guards_sparse_evaluations() {
        // Evaluated every 100 s with a 30 s hold: the hold alone would let
        // the answers back on the first evaluation that sees local again.
        let mut c = Chooser::new("local", hold(30, 3)).unwrap();
        let cands = s(&["b"]);
        let up = |t: u64| move |dc: &str| f64::from(dc != "local" || t != 100);
        let mut got = Vec::new();
        for t in (0..=600).step_by(100) {
            got.push(c.choose(secs(t), &cands, up(t)).datacenter.unwrap());
        }
        // 100: down → b; 200, 300: seen 1, 2 times; 400: third → back.
        assert_eq!(got, s(&["local", "b", "b", "b", "local", "local", "local"]));
    }

    #[test]
    fn no_flapping_when_health_oscillates_faster_than_the_hold() {
        // local fails at 10, then oscillates 3 s up / 3 s down until 100,
        // then stays up. Without hysteresis the answers follow every
        // oscillation; with a 30 s hold they leave once and return once.
        let health = |t: u64, dc: &str| {
            let down = dc == "local" && (10..100).contains(&t) && ((t - 10) / 3).is_multiple_of(2);
            f64::from(!down)
        };
        let changes = |v: &[Option<String>]| v.windows(2).filter(|w| w[0] != w[1]).count();
        let consul = run(hold(0, 0), &["b"], 200, health);
        assert!(changes(&consul) > 20, "{}", changes(&consul));
        let damped = run(hold(30, 3), &["b"], 200, health);
        assert_eq!(changes(&damped), 2);
        assert_eq!(damped[9].as_deref(), Some("local"));
        assert_eq!(damped[10].as_deref(), Some("b"));
        // Down runs are [10 + 6k, 13 + 6k): the last is [94, 97), so local
        // is up from 97 on and the answers return at 97 + 30.
        assert_eq!(damped[126].as_deref(), Some("b"));
        assert_eq!(damped[127].as_deref(), Some("local"));
    }

    #[test]
    fn prefers_a_steady_datacenter_when_forced_to_move() {
        // b (nearer) just came back from an outage when local fails; c has
        // been steady. The answers go to c, then to b once b is settled.
        let got = run(hold(30, 0), &["b", "c"], 120, |t, dc| match dc {
            "b" => f64::from(!(5..40).contains(&t)),
            "local" => f64::from(t < 45),
            _ => 1.0,
        });
        assert_eq!(got[44].as_deref(), Some("local"));
        assert_eq!(got[45].as_deref(), Some("c"));
        assert_eq!(got[69].as_deref(), Some("c"));
        assert_eq!(got[70].as_deref(), Some("b"));
        assert_eq!(got[119].as_deref(), Some("b"));
    }

    #[test]
    fn a_change_of_order_takes_over_only_once_it_lasts() {
        // The answers are in b (local down). The coordinates then put c
        // ahead of b, every other second for a while (near-equal RTTs):
        // the answers stay in b. Then c stays ahead: it wins after the hold.
        let mut ch = Chooser::new("local", hold(30, 3)).unwrap();
        let all_but_local = |dc: &str| f64::from(dc != "local");
        let (bc, cb) = (s(&["b", "c"]), s(&["c", "b"]));
        let d = ch.choose(secs(0), &bc, all_but_local);
        assert_eq!(d.datacenter.as_deref(), Some("b"));
        for t in 1..100 {
            let order = if t % 2 == 1 { &bc } else { &cb };
            let d = ch.choose(secs(t), order, all_but_local);
            assert_eq!(d.datacenter.as_deref(), Some("b"), "t={t}");
        }
        for t in 100..130 {
            let d = ch.choose(secs(t), &cb, all_but_local);
            assert_eq!(
                (d.datacenter.as_deref(), d.reason),
                (Some("b"), Reason::Holding),
                "t={t}"
            );
        }
        let d = ch.choose(secs(130), &cb, all_but_local);
        assert_eq!((d.datacenter.as_deref(), d.rank), (Some("c"), 1));
        assert!(d.changed);
        // Without hysteresis the new order applies at once.
        let mut consul = Chooser::new("local", FailoverPolicy::default()).unwrap();
        consul.choose(secs(0), &bc, all_but_local);
        let d = consul.choose(secs(1), &cb, all_but_local);
        assert_eq!(d.datacenter.as_deref(), Some("c"));
    }

    #[test]
    fn moving_up_but_not_all_the_way_is_holding() {
        // Answers in c; b has been ahead of c for the hold, local has just
        // recovered: the answers move to b, and that is still "holding".
        let mut ch = Chooser::new("local", hold(10, 0)).unwrap();
        let cands = s(&["b", "c"]);
        ch.choose(secs(0), &cands, |_| 1.0);
        // local and b fail; c takes the answers.
        let d = ch.choose(secs(1), &cands, |dc| f64::from(dc == "c"));
        assert_eq!(d.datacenter.as_deref(), Some("c"));
        // b is back at 2, local at 10.
        for t in 2..12 {
            let d = ch.choose(secs(t), &cands, |dc| f64::from(dc != "local" || t >= 10));
            assert_eq!(d.datacenter.as_deref(), Some("c"), "t={t}");
        }
        let d = ch.choose(secs(12), &cands, |_| 1.0);
        assert_eq!(
            (d.datacenter.as_deref(), d.reason),
            (Some("b"), Reason::Holding)
        );
        let d = ch.choose(secs(20), &cands, |_| 1.0);
        assert_eq!(
            (d.datacenter.as_deref(), d.reason),
            (Some("local"), Reason::Preferred)
        );
    }

    #[test]
    fn holding_is_reported_and_the_candidate_list_ignores_local() {
        let mut c = Chooser::new("local", hold(10, 0)).unwrap();
        // "local" in the candidate list is ignored: it always comes first.
        let cands = s(&["local", "b"]);
        c.choose(secs(0), &cands, |_| 1.0);
        let d = c.choose(secs(1), &cands, |dc| f64::from(dc != "local"));
        assert_eq!((d.datacenter.as_deref(), d.rank), (Some("b"), 1));
        let d = c.choose(secs(2), &cands, |_| 1.0);
        assert_eq!(
            (d.datacenter.as_deref(), d.reason, d.changed),
            (Some("b"), Reason::Holding, false)
        );
        let d = c.choose(secs(12), &cands, |_| 1.0);
        assert_eq!(
            (d.datacenter.as_deref(), d.reason, d.changed),
            (Some("local"), Reason::Preferred, true)
        );
    }

    proptest! {
        /// Without hysteresis the chooser is Consul's stateless rule: the
        /// first datacenter of the order that can serve.
        #[test]
        fn no_hysteresis_is_stateless(
            steps in proptest::collection::vec(proptest::collection::vec(0u8..4, 4), 1..30),
        ) {
            let mut c = Chooser::new("d0", FailoverPolicy::default()).unwrap();
            let cands = s(&["d1", "d2", "d3"]);
            for (t, h) in steps.iter().enumerate() {
                let frac = |dc: &str| f64::from(h[dc[1..].parse::<usize>().unwrap()]) / 3.0;
                let d = c.choose(secs(t as u64), &cands, frac);
                let want = ["d0", "d1", "d2", "d3"].into_iter().find(|dc| frac(dc) > 0.0);
                prop_assert_eq!(d.datacenter.as_deref(), want);
            }
        }

        /// With a hold, the chooser never serves from a datacenter that
        /// cannot serve while another can, and every move to a more
        /// preferred datacenter goes to one that has served for the hold.
        #[test]
        fn hysteresis_invariants(
            steps in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 3), 1..60),
        ) {
            let h = 5u64;
            let mut c = Chooser::new("d0", hold(h, 0)).unwrap();
            let cands = s(&["d1", "d2"]);
            let mut prev: Option<usize> = None;
            for (t, up) in steps.iter().enumerate() {
                let frac = |dc: &str| f64::from(up[dc[1..].parse::<usize>().unwrap()]);
                let d = c.choose(secs(t as u64), &cands, frac);
                let idx = d.datacenter.as_deref().map(|x| x[1..].parse::<usize>().unwrap());
                match idx {
                    Some(i) => prop_assert!(up[i]),
                    None => prop_assert!(up.iter().all(|u| !u)),
                }
                if let (Some(p), Some(i)) = (prev, idx)
                    && i < p && up[p]
                {
                    // A voluntary failback: i was up for the last h+1
                    // seconds (or since the start).
                    let from = (t as u64).saturating_sub(h) as usize;
                    prop_assert!(steps[from..=t].iter().all(|u| u[i]));
                }
                prev = idx;
            }
        }
    }
}
