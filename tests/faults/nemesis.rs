//! The fault schedule: every half second to three seconds, a seeded choice
//! among crashing a server (SIGKILL; restarted later from its data dir, or
//! at once: a "bounce"),
//! pausing one (SIGSTOP; SIGCONT later), cutting the peer RPC between
//! servers (block files: a server isolated, a minority split off, a bridge
//! node that alone sees both halves, a server that cannot send or one no
//! one sends to), and undoing one of those. At most a minority of the
//! servers is crashed or paused at once, so that the majority that is left
//! can make progress unless a partition also cuts it; the leader is the
//! target half the time, since that is where consistency bugs hide.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::rng::Rng;

/// The injector's state: what is broken now, and what was done.
pub struct Nemesis {
    rng: Rng,
    started: Instant,
    /// The partition in force (`blocks[i]`: whom `i` cannot reach).
    partition: Option<Vec<Vec<usize>>>,
    /// Faults done, by kind.
    pub counts: BTreeMap<String, usize>,
    /// What was done when, one line each.
    pub log: Vec<String>,
}

impl Nemesis {
    /// A schedule from `rng`; times are logged from `started`.
    pub fn new(rng: Rng, started: Instant) -> Nemesis {
        Nemesis {
            rng,
            started,
            partition: None,
            counts: BTreeMap::new(),
            log: Vec::new(),
        }
    }

    /// How long to wait before the next step.
    pub fn pause(&mut self) -> Duration {
        self.rng.millis(500, 3000)
    }

    fn note(&mut self, kind: &str, what: String) {
        *self.counts.entry(kind.to_string()).or_default() += 1;
        let line = format!("{:8.3} s  {what}", self.started.elapsed().as_secs_f64());
        println!("fault: {line}");
        self.log.push(line);
    }

    /// A server to crash, pause or isolate: the leader half the time (if
    /// it is a candidate), else any candidate.
    fn target(&mut self, c: &Cluster, candidates: &[usize]) -> usize {
        if self.rng.chance(50) {
            let healthy: Vec<usize> = (0..c.n)
                .filter(|i| c.is_running(*i) && !c.is_stopped(*i))
                .collect();
            if !healthy.is_empty() {
                let ask = healthy[self.rng.below(healthy.len())];
                if let Some(l) = c.leader_seen_by(ask)
                    && candidates.contains(&l)
                {
                    return l;
                }
            }
        }
        candidates[self.rng.below(candidates.len())]
    }

    fn leader_tag(c: &Cluster, i: usize) -> &'static str {
        // Asked of the server itself: cheap, and right often enough for
        // a log line.
        if c.leader_seen_by(i) == Some(i) {
            " (leader)"
        } else {
            ""
        }
    }

    /// Does one fault or undoes one.
    pub fn step(&mut self, c: &mut Cluster) {
        let killed: Vec<usize> = (0..c.n).filter(|i| !c.is_running(*i)).collect();
        let stopped: Vec<usize> = (0..c.n).filter(|i| c.is_stopped(*i)).collect();
        let healthy: Vec<usize> = (0..c.n)
            .filter(|i| c.is_running(*i) && !c.is_stopped(*i))
            .collect();
        let budget = (c.n - 1) / 2;
        let mut choices: Vec<&str> = Vec::new();
        if killed.len() + stopped.len() < budget {
            choices.extend(["kill", "stop", "bounce"]);
        }
        if !killed.is_empty() {
            choices.extend(["restart", "restart"]);
        }
        if !stopped.is_empty() {
            choices.extend(["cont", "cont"]);
        }
        if self.partition.is_none() {
            choices.extend(["partition", "partition"]);
        } else {
            choices.extend(["heal", "heal"]);
        }
        match choices[self.rng.below(choices.len())] {
            "kill" => {
                let i = self.target(c, &healthy);
                let tag = Self::leader_tag(c, i);
                c.kill(i);
                self.note("kill", format!("SIGKILL server-{i}{tag}"));
            }
            "bounce" => {
                // A crash and an immediate restart: back before the others
                // time out, with whatever its disk kept.
                let i = self.target(c, &healthy);
                let tag = Self::leader_tag(c, i);
                c.kill(i);
                c.restart(i);
                self.note("bounce", format!("SIGKILL and restart server-{i}{tag}"));
            }
            "stop" => {
                let i = self.target(c, &healthy);
                let tag = Self::leader_tag(c, i);
                c.stop(i);
                self.note("stop", format!("SIGSTOP server-{i}{tag}"));
            }
            "restart" => {
                let i = killed[self.rng.below(killed.len())];
                c.restart(i);
                self.note("restart", format!("restart server-{i}"));
            }
            "cont" => {
                let i = stopped[self.rng.below(stopped.len())];
                c.cont(i);
                self.note("cont", format!("SIGCONT server-{i}"));
            }
            "partition" => self.partition(c),
            _ => {
                c.set_blocks(&vec![Vec::new(); c.n]);
                self.partition = None;
                self.note("heal", "heal the partition".into());
            }
        }
    }

    /// Cuts the peer RPC in one of several shapes.
    fn partition(&mut self, c: &mut Cluster) {
        let n = c.n;
        let mut blocks = vec![Vec::new(); n];
        let cut = |blocks: &mut Vec<Vec<usize>>, a: &[usize], b: &[usize]| {
            for &x in a {
                for &y in b {
                    blocks[x].push(y);
                    blocks[y].push(x);
                }
            }
        };
        // Servers in a random order.
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, self.rng.below(i + 1));
        }
        let all: Vec<usize> = (0..n).collect();
        let (kind, what) = match self.rng.below(5) {
            0 => {
                let x = self.target(c, &all);
                let rest: Vec<usize> = all.iter().copied().filter(|y| *y != x).collect();
                cut(&mut blocks, &[x], &rest);
                ("partition-isolate", format!("isolate server-{x}"))
            }
            1 => {
                let k = (n - 1) / 2;
                let (a, b) = order.split_at(k);
                cut(&mut blocks, a, b);
                ("partition-split", format!("split {a:?} | {b:?}"))
            }
            2 => {
                // order[0] sees both halves; the halves do not see each
                // other.
                let k = (n - 1) / 2;
                let (a, b) = order[1..].split_at(k);
                cut(&mut blocks, a, b);
                (
                    "partition-bridge",
                    format!("bridge server-{} between {a:?} and {b:?}", order[0]),
                )
            }
            3 => {
                let x = self.target(c, &all);
                blocks[x] = all.iter().copied().filter(|y| *y != x).collect();
                (
                    "partition-mute",
                    format!("server-{x} cannot send to anyone (one-way)"),
                )
            }
            _ => {
                let x = self.target(c, &all);
                for y in all.iter().copied().filter(|y| *y != x) {
                    blocks[y].push(x);
                }
                (
                    "partition-deaf",
                    format!("no one can send to server-{x} (one-way)"),
                )
            }
        };
        c.set_blocks(&blocks);
        self.partition = Some(blocks);
        self.note(kind, what);
    }

    /// Undoes every fault in force.
    pub fn heal_all(&mut self, c: &mut Cluster) {
        for i in 0..c.n {
            if c.is_stopped(i) {
                c.cont(i);
                self.note("cont", format!("SIGCONT server-{i} (final heal)"));
            }
            if !c.is_running(i) {
                c.restart(i);
                self.note("restart", format!("restart server-{i} (final heal)"));
            }
        }
        if self.partition.take().is_some() {
            c.set_blocks(&vec![Vec::new(); c.n]);
            self.note("heal", "heal the partition (final heal)".into());
        }
    }
}
