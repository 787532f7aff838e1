//! Fault injection with a linearizability checker, Jepsen-style, for
//! tomo's replicated KV store.
//!
//! Each run starts a group of `tomo agent -server -bootstrap-expect N`
//! processes on 127.0.0.1 (free ports, no DNS, own data dir, log and
//! partition file each in a temp dir, `-retry-join` each other) and waits
//! for a leader and all voters. Client threads ([`workload`]) then read
//! (`GET ?consistent`: Consul's linearizable mode; tomo's default reads are
//! leader reads, not linearizable under partitions, so they are not
//! checked), write and compare-and-set (`?cas=<ModifyIndex>`, `cas=0`) a
//! few keys through random servers over plain HTTP/1.1, recording each
//! operation's invocation, completion and outcome: ok, failed for sure
//! (`false` from a cas, a 4xx, no connection) or unknown (a timeout, a
//! reset, a 5xx: it may or may not have taken effect). They also write
//! write-once `ack/<client>/<n>` keys.
//!
//! Meanwhile a seeded fault schedule ([`nemesis`]) SIGKILLs servers and
//! restarts them (later, or at once) from the same data dir and ports,
//! SIGSTOPs and SIGCONTs
//! them, and partitions them through `TOMO_FAULT_BLOCK_FILE`, the hook in
//! `src/server.rs` (`tomo::server::fault`): each server refuses to open
//! peer RPC (Raft and forwarding) to the addresses its file lists. Gossip
//! (UDP) and the HTTP API are not partitioned by it. At the end everything
//! is healed, the group must settle (one leader, all voters, within 90 s),
//! and every key is read once more with `?consistent` (part of the
//! history).
//!
//! Checks: no server panicked (its log says so); each key's history is
//! linearizable ([`checker`]: Wing–Gong–Lowe
//! with memoization, unknown operations may or may not take effect); every
//! acknowledged write-once key is there with its value, and no key whose
//! write certainly failed is. On a violation or a lost write the history
//! (JSON lines), the fault log, a report and the servers' logs are saved
//! under `target/fault-histories/<seed>-<run>/` (printed) and the test
//! fails. `TOMO_FAULT_KEEP=1` saves them for passing runs too.
//!
//! A short run (3 servers, 25 s of faults) is part of `cargo test`. Longer
//! ones are the same test, driven by environment variables:
//!
//! ```text
//! TOMO_FAULT_SECONDS=300 TOMO_FAULT_RUNS=5 TOMO_FAULT_SERVERS=5 TOMO_FAULT_SEED=7 \
//!     cargo test --release --test faults -- --nocapture
//! ```
//!
//! | variable | default | meaning |
//! | --- | --- | --- |
//! | `TOMO_FAULT_SECONDS` | 25 | seconds of faults per run |
//! | `TOMO_FAULT_RUNS` | 1 | runs, each on a fresh group; run `r` uses seed + `r` |
//! | `TOMO_FAULT_SERVERS` | 3 | servers (3 or 5) |
//! | `TOMO_FAULT_SEED` | from the clock | the fault schedule's and the workload's seed (printed) |
//! | `TOMO_FAULT_CLIENTS` | 8 | client threads |
//! | `TOMO_FAULT_KEYS` | 5 | checked keys |
//! | `TOMO_FAULT_CHECK_BUDGET` | 20000000 | search steps per key before the checker gives up (reported as inconclusive, not a failure) |
//! | `TOMO_FAULT_KEEP` | unset | save the history of passing runs too |
//! | `TOMO_FAULT_BIN` | this build's `tomo` | the server binary (pin one for long runs) |
//!
//! Each run prints a summary: servers, seconds, operations (ok / failed /
//! unknown), faults by kind, keys, checker time, violations, lost writes.
//! The checker's own tests (hand-made histories, accepted and rejected)
//! are plain `#[test]`s in [`checker`] and need no cluster.

#[path = "../common/mod.rs"]
mod common;

mod checker;
mod cluster;
mod http;
mod nemesis;
mod rng;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use checker::{Action, Outcome, Record, Verdict};
use cluster::Cluster;
use nemesis::Nemesis;
use rng::Rng;
use workload::{AckWrite, Shared};

/// A run's parameters, from the environment.
#[derive(Clone, Debug)]
struct Config {
    servers: usize,
    seconds: u64,
    runs: u64,
    seed: u64,
    clients: usize,
    keys: usize,
    budget: u64,
    keep: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let c = Config {
            servers: env_or("TOMO_FAULT_SERVERS", 3),
            seconds: env_or("TOMO_FAULT_SECONDS", 25),
            runs: env_or("TOMO_FAULT_RUNS", 1),
            seed: env_or("TOMO_FAULT_SEED", clock % 1_000_000),
            clients: env_or("TOMO_FAULT_CLIENTS", 8),
            keys: env_or("TOMO_FAULT_KEYS", 5),
            budget: env_or("TOMO_FAULT_CHECK_BUDGET", 20_000_000),
            keep: std::env::var_os("TOMO_FAULT_KEEP").is_some(),
        };
        assert!(c.servers >= 3, "TOMO_FAULT_SERVERS: at least 3");
        assert!(c.clients >= 1 && c.keys >= 1 && c.runs >= 1);
        c
    }
}

/// Sets the clients' stop flag however the run ends (a panic included),
/// so that no client thread outlives it.
struct StopClients(Arc<Shared>);

impl Drop for StopClients {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// Counts of outcomes.
#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    failed: usize,
    unknown: usize,
}

impl Tally {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => self.ok += 1,
            Outcome::Fail => self.failed += 1,
            Outcome::Unknown => self.unknown += 1,
        }
    }
    fn total(&self) -> usize {
        self.ok + self.failed + self.unknown
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (ok {}, failed {}, unknown {})",
            self.total(),
            self.ok,
            self.failed,
            self.unknown
        )
    }
}

/// What a run found.
struct RunResult {
    summary: String,
    /// Why the run failed (empty: it passed).
    failures: Vec<String>,
}

/// Where failing histories go: `target/fault-histories/`.
fn histories_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(&tmp).join("fault-histories")
}

/// Saves what a run leaves for diagnosis; returns the directory.
fn save(
    cfg: &Config,
    run: u64,
    seed: u64,
    cluster: &Cluster,
    history: &[Record],
    faults: &[String],
    report: &str,
) -> PathBuf {
    let dir = histories_dir().join(format!("seed{seed}-run{run}-n{}", cfg.servers));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the history dir");
    let mut lines = String::new();
    for r in history {
        lines.push_str(&serde_json::to_string(r).expect("a record serializes"));
        lines.push('\n');
    }
    std::fs::write(dir.join("history.jsonl"), lines).expect("write the history");
    std::fs::write(dir.join("faults.txt"), faults.join("\n") + "\n").expect("write the faults");
    std::fs::write(dir.join("report.txt"), report).expect("write the report");
    for i in 0..cluster.n {
        let _ = std::fs::copy(cluster.log_path(i), dir.join(format!("server-{i}.log")));
    }
    dir
}

/// Reads `key` with `?consistent` until a read succeeds (each attempt is
/// part of the history), through the servers in turn.
fn final_read(shared: &Shared, client: usize, key: &str, out: &mut Vec<Record>) -> bool {
    let t = Instant::now();
    for attempt in 0.. {
        let mut r = workload::read(shared, attempt % shared.http.len(), key);
        r.client = client;
        let ok = r.outcome == Outcome::Ok;
        out.push(r);
        if ok {
            return true;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// The write-once keys: every acknowledged one with its value, none whose
/// write certainly failed. Returns (problems, acknowledged, unknown ones
/// found).
fn check_acks(cluster: &Cluster, acks: &[AckWrite]) -> Result<(Vec<String>, usize, usize), String> {
    let t = Instant::now();
    let stored = loop {
        let s = (t.elapsed().as_millis() / 200) as usize % cluster.n;
        if let http::Reply::Answer(a) =
            http::request("GET", cluster.http[s], "/v1/kv/ack/?recurse&consistent", "")
        {
            if a.status == 404 {
                break Vec::new();
            }
            if a.status == 200
                && let Some(e) = workload::entries(&a.body)
            {
                break e;
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err("no ?consistent read of ack/ in 30 s after settling".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stored: HashMap<String, Option<String>> =
        stored.into_iter().map(|(k, v, _)| (k, v)).collect();
    let mut problems = Vec::new();
    let (mut acked, mut unknown_found) = (0, 0);
    for a in acks {
        let got = stored.get(&a.key);
        match a.outcome {
            Outcome::Ok => {
                acked += 1;
                if got != Some(&Some(a.value.clone())) {
                    problems.push(format!(
                        "lost write: {} = {:?} was acknowledged, now {:?}",
                        a.key, a.value, got
                    ));
                }
            }
            Outcome::Fail if got.is_some() => problems.push(format!(
                "phantom write: {} is {:?} though its write certainly failed",
                a.key, got
            )),
            Outcome::Unknown if got.is_some() => unknown_found += 1,
            _ => {}
        }
        if let Some(Some(v)) = got
            && *v != a.value
        {
            problems.push(format!("{} holds {v:?}, never written to it", a.key));
        }
    }
    Ok((problems, acked, unknown_found))
}

/// One run on a fresh group.
fn run_once(cfg: &Config, run: u64) -> RunResult {
    let seed = cfg.seed.wrapping_add(run);
    println!(
        "faults run {}/{}: seed {seed} (TOMO_FAULT_SEED={} replays it as run 1), {} servers, \
         {} s of faults, {} clients, {} keys",
        run + 1,
        cfg.runs,
        seed,
        cfg.servers,
        cfg.seconds,
        cfg.clients,
        cfg.keys
    );
    let mut rng = Rng::new(seed);
    let mut cluster = Cluster::start(cfg.servers);
    if let Err(e) = cluster.wait_settled(Duration::from_secs(90)) {
        let dir = save(cfg, run, seed, &cluster, &[], &[], &e);
        panic!("the group did not form: {e}; logs in {}", dir.display());
    }
    let shared = Arc::new(Shared {
        http: cluster.http.clone(),
        keys: (0..cfg.keys).map(|k| format!("lin/k{k}")).collect(),
        start: Instant::now(),
        stop: Default::default(),
    });
    let stop_guard = StopClients(shared.clone());
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| {
            let (shared, rng) = (shared.clone(), rng.fork());
            std::thread::spawn(move || workload::client(shared, c, rng))
        })
        .collect();

    // Faults until the deadline, then everything healed while the clients
    // go on a little (recovery is part of the history too).
    let mut nemesis = Nemesis::new(rng.fork(), shared.start);
    let deadline = shared.start + Duration::from_secs(cfg.seconds);
    loop {
        let pause = nemesis.pause();
        let now = Instant::now();
        if now + pause >= deadline {
            std::thread::sleep(deadline.saturating_duration_since(now));
            break;
        }
        std::thread::sleep(pause);
        nemesis.step(&mut cluster);
    }
    nemesis.heal_all(&mut cluster);
    std::thread::sleep(Duration::from_secs(3));
    drop(stop_guard);
    let mut history = Vec::new();
    let mut acks = Vec::new();
    for h in clients {
        let log = h.join().expect("a client thread panicked");
        history.extend(log.records);
        acks.extend(log.acks);
    }

    let mut failures = Vec::new();
    let settled = cluster.wait_settled(Duration::from_secs(90));
    if let Err(e) = &settled {
        failures.push(format!("after healing, the group {e}"));
    }
    for key in &shared.keys {
        if !final_read(&shared, cfg.clients, key, &mut history) {
            failures.push(format!("no final ?consistent read of {key} in 30 s"));
        }
    }
    // A server whose Raft core panicked keeps running (and answering
    // HTTP) without it: worth a failure of its own, with the message.
    for i in 0..cluster.n {
        let log = std::fs::read_to_string(cluster.log_path(i)).unwrap_or_default();
        if let Some(at) = log.find("panicked at") {
            let msg: Vec<&str> = log[at..].lines().take(2).collect();
            failures.push(format!("server-{i} panicked: {}", msg.join(" ")));
        }
    }
    let (ack_problems, acked, unknown_found) = match check_acks(&cluster, &acks) {
        Ok(r) => r,
        Err(e) => (vec![e], 0, 0),
    };
    let lost = ack_problems.len();
    failures.extend(ack_problems);

    history.sort_by_key(|r| (r.call, r.client));
    for (i, r) in history.iter_mut().enumerate() {
        r.id = i;
    }
    let t = Instant::now();
    let reports = checker::check(&history, cfg.budget);
    let check_time = t.elapsed();
    let mut violations = 0;
    let mut inconclusive = 0;
    for r in &reports {
        match &r.verdict {
            Verdict::Linearizable => {}
            Verdict::Violation(why) => {
                violations += 1;
                failures.push(format!("key {}: {why}", r.key));
            }
            Verdict::Inconclusive(why) => {
                inconclusive += 1;
                println!("warning: key {}: {why}", r.key);
            }
        }
    }

    // The summary.
    let mut all = Tally::default();
    let mut by_op: BTreeMap<&str, Tally> = BTreeMap::new();
    for r in &history {
        all.add(r.outcome);
        let kind = match r.action {
            Action::Read { .. } => "read",
            Action::Write { .. } => "write",
            Action::Cas { index: 0, .. } => "cas=0",
            Action::Cas { .. } => "cas",
        };
        by_op.entry(kind).or_default().add(r.outcome);
    }
    let mut ack_tally = Tally::default();
    for a in &acks {
        ack_tally.add(a.outcome);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "faults run {}/{} summary: seed {seed}, {} servers, {} s of faults ({:.0} s in all), \
         {} clients, {} keys",
        run + 1,
        cfg.runs,
        cfg.servers,
        cfg.seconds,
        shared.start.elapsed().as_secs_f64(),
        cfg.clients,
        cfg.keys
    );
    let _ = writeln!(s, "  checked operations: {all}");
    for (k, t) in &by_op {
        let _ = writeln!(s, "    {k:6} {t}");
    }
    let _ = writeln!(
        s,
        "  write-once keys: {ack_tally}; acknowledged {acked}, unknown ones found {unknown_found}, \
         lost or phantom {lost}"
    );
    let faults: Vec<String> = nemesis
        .counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(s, "  faults: {}", faults.join(", "));
    let ops_checked: usize = reports.iter().map(|r| r.ops).sum();
    let steps: u64 = reports.iter().map(|r| r.steps).sum();
    let _ = writeln!(
        s,
        "  checker: {} keys, {ops_checked} operations searched, {steps} steps, {:.2} s; \
         violations {violations}, inconclusive {inconclusive}",
        reports.len(),
        check_time.as_secs_f64()
    );
    let _ = write!(
        s,
        "  settled after healing: {}",
        match &settled {
            Ok(l) => format!("yes (leader server-{l})"),
            Err(e) => format!("no: {e}"),
        }
    );
    println!("{s}");

    if !failures.is_empty() || cfg.keep {
        let report = format!("{s}\n\n{}\n", failures.join("\n"));
        let dir = save(cfg, run, seed, &cluster, &history, &nemesis.log, &report);
        println!("history saved in {}", dir.display());
        if !failures.is_empty() {
            failures.push(format!(
                "history, fault log, report and server logs: {}",
                dir.display()
            ));
        }
    }
    RunResult {
        summary: s,
        failures,
    }
}

#[test]
fn kv_is_linearizable_and_keeps_acknowledged_writes_under_faults() {
    let cfg = Config::from_env();
    let mut failed = Vec::new();
    for run in 0..cfg.runs {
        let r = run_once(&cfg, run);
        if !r.failures.is_empty() {
            failed.push(format!("{}\n{}", r.summary, r.failures.join("\n")));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} fault runs failed:\n\n{}",
        failed.len(),
        cfg.runs,
        failed.join("\n\n")
    );
}
