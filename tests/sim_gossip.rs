//! `tomo sim --protocol gossip` end to end: the real gossip nodes on the
//! simulator's discrete-event network. A small geo cluster joins, every node
//! sees every other, coordinates become accurate; kills are detected without
//! false deaths, with and without loss; slow nodes, restarts, partitions and
//! replayed series run; runs are deterministic for a seed; bad flags fail
//! with a `tomo:` message.
//!
//! Every run goes through the real binary, 30 nodes for a few simulated
//! minutes: well under a second each in the test profile.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tempfile::TempDir;

mod common;
use common::{path_str, tomo, tomo_fails_cleanly, tomo_ok};

/// A 30-node geo dataset (with `slices` jittered series slices when > 0).
fn geo30(dir: &TempDir, slices: usize) -> PathBuf {
    let p = dir.path().join("geo30.ltm");
    tomo_ok(&[
        "dataset",
        "gen",
        "geo",
        "--nodes",
        "30",
        "--slices",
        &slices.to_string(),
        "-o",
        path_str(&p),
    ]);
    p
}

/// The JSON line of `tomo sim --protocol gossip --dataset FILE args`.
fn gossip(file: &Path, args: &[&str]) -> Value {
    let mut full = vec!["sim", "--protocol", "gossip", "--dataset", path_str(file)];
    full.extend_from_slice(args);
    let out = tomo_ok(&full);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line: {out}");
    serde_json::from_str(lines[0]).expect("JSON")
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn cluster_joins_sees_everyone_and_coordinates_are_accurate() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 0);
    let v = gossip(&f, &["--duration", "300s"]);
    assert_eq!(v["protocol"], "gossip");
    assert_eq!(v["params"]["protocol"], "gossip");
    assert_eq!(num(&v["params"], "duration_s"), 300.0);
    assert_eq!(num(&v["params"], "probe_interval_s"), 1.0);
    let m = &v["membership"];
    assert_eq!(num(m, "nodes"), 30.0);
    assert_eq!(num(m, "live_nodes"), 30.0);
    assert!(num(m, "join_converged_s") < 60.0, "{m}");
    assert_eq!(m["converged_at_end"], true, "{m}");
    assert_eq!(num(m, "view_missing_pairs_at_end"), 0.0);
    assert_eq!(num(m, "false_deaths"), 0.0, "{m}");
    assert_eq!(num(m, "false_suspicions"), 0.0, "{m}");
    // One probe per node per interval: ~300 samples each.
    assert!(num(m, "rtt_samples_per_node") > 250.0, "{m}");
    assert!(num(m, "bytes_per_s_per_node") > 0.0);
    assert!(num(m, "table_coverage") > 0.99, "{m}");
    assert!(num(m, "table_staleness_s_p99") < 300.0, "{m}");
    // What a node serves from its table is about as good as the engines'
    // own coordinates.
    assert!(num(m, "table_median_rel_err") < 0.25, "{m}");
    assert!(num(m, "publications_per_min_per_node") > 0.0, "{m}");
    let r = &v["result"];
    assert!(
        num(m, "table_median_rel_err") < 2.0 * num(r, "median_rel_err") + 0.05,
        "{m} {r}"
    );
    assert_eq!(num(r, "pairs"), 435.0);
    assert!(num(r, "median_rel_err") < 0.2, "{r}");
    for k in [
        "p99_rel_err",
        "nn_accuracy",
        "nn_recall_at_5",
        "stretch_median",
    ] {
        assert!(r[k].is_number(), "{k} in {r}");
    }
}

#[test]
fn a_kill_is_detected_by_everyone_without_false_deaths() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 0);
    for extra in [&[][..], &["--loss", "0.05"][..]] {
        let mut args = vec!["--duration", "300s", "--kill", "3@100s"];
        args.extend_from_slice(extra);
        let v = gossip(&f, &args);
        let m = &v["membership"];
        let k = &m["kills"][0];
        assert_eq!(num(k, "node"), 3.0);
        assert_eq!(num(k, "at_s"), 100.0);
        assert_eq!(num(k, "observers"), 29.0, "{m}");
        assert_eq!(num(k, "detected"), 29.0, "{m}");
        let (p50, p99) = (num(m, "detection_s_p50"), num(m, "detection_s_p99"));
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 30.0, "{extra:?}: {m}");
        assert_eq!(num(m, "detections"), 29.0);
        assert_eq!(num(m, "detections_missing"), 0.0);
        assert_eq!(num(m, "false_deaths"), 0.0, "{extra:?}: {m}");
        assert_eq!(num(m, "live_nodes"), 29.0);
        assert_eq!(m["converged_at_end"], true, "{m}");
        // Accuracy is scored over the 29 live nodes.
        assert_eq!(num(&v["result"], "pairs"), 406.0);
        let dropped = num(&m["network"], "dropped_loss");
        if extra.is_empty() {
            assert_eq!(dropped, 0.0);
        } else {
            let sent = num(&m["network"], "sent");
            assert!((dropped / sent - 0.05).abs() < 0.01, "{dropped}/{sent}");
        }
    }
}

#[test]
fn slow_node_restart_and_partition_heal() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 0);
    let v = gossip(
        &f,
        &[
            "--duration",
            "400s",
            "--slow",
            "5:1s",
            "--kill",
            "9@60s",
            "--restart",
            "9@120s",
            "--partition",
            "half@200s..230s",
        ],
    );
    let m = &v["membership"];
    assert_eq!(num(m, "live_nodes"), 30.0);
    assert_eq!(num(m, "false_deaths"), 0.0, "{m}");
    assert_eq!(num(&m["kills"][0], "detected"), 29.0, "{m}");
    let p = &m["partitions"][0];
    assert_eq!(num(p, "fraction"), 0.5);
    assert_eq!((num(p, "start"), num(p, "end")), (200.0, 230.0));
    let heal = num(m, "partition_heal_s");
    assert!((0.0..170.0).contains(&heal), "{m}");
    assert!(num(&m["network"], "dropped_partition") > 0.0);
    assert_eq!(m["converged_at_end"], true, "{m}");
    assert_eq!(num(&v["result"], "pairs"), 435.0);
    assert_eq!(v["params"]["slow"][0]["node"], 5);
    assert_eq!(num(&v["params"]["slow"][0], "extra_s"), 1.0);
    // A slow node is suspected (its acks come after the probe timeout) and
    // suspects others (its pings leave after its own timeout), but its
    // refutations arrive within the suspicion timeout.
    assert!(num(m, "false_suspicions_of_slow_nodes") > 0.0, "{m}");
    assert!(num(m, "false_suspicion_pairs_by_slow_nodes") > 0.0, "{m}");
    assert!(num(m, "false_suspicion_pairs") >= num(m, "false_suspicions"));
}

#[test]
fn replays_a_series() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 10);
    let series = dir.path().join("geo30.series.ltm.gz");
    let v = gossip(
        &f,
        &[
            "--duration",
            "200s",
            "--observe",
            path_str(&series),
            "--probe-interval",
            "500ms",
        ],
    );
    assert_eq!(num(&v["params"], "probe_interval_s"), 0.5);
    assert_eq!(num(&v["params"], "observe_slices"), 10.0);
    let m = &v["membership"];
    assert_eq!(m["converged_at_end"], true, "{m}");
    assert!(num(m, "rtt_samples_per_node") > 300.0, "{m}");
    assert!(num(&v["result"], "median_rel_err") < 0.3, "{v}");
}

#[test]
fn same_seed_same_figures() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 0);
    let args = [
        "--duration",
        "150s",
        "--loss",
        "0.05",
        "--jitter",
        "0.1",
        "--kill",
        "4@60s",
    ];
    let a = gossip(&f, &args);
    let b = gossip(&f, &args);
    assert_eq!(a["result"], b["result"]);
    assert_eq!(a["membership"], b["membership"]);
    let mut other = args.to_vec();
    other.extend_from_slice(&["--seed", "2"]);
    let c = gossip(&f, &other);
    assert_ne!(a["result"], c["result"]);
}

#[test]
fn rounds_mode_is_the_default_and_rejects_gossip_flags() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 0);
    let out = tomo_ok(&[
        "sim",
        "--dataset",
        path_str(&f),
        "--rounds",
        "50",
        "--bench-updates",
        "0",
    ]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v.get("membership").is_none());
    assert!(v["updates_per_s"].is_null() || v["updates_per_s"].is_number());
    let e = tomo_fails_cleanly(&["sim", "--dataset", path_str(&f), "--kill", "3@10s"]);
    assert!(e.contains("--kill needs --protocol gossip"), "{e}");
}

#[test]
fn bad_flags_fail_cleanly() {
    let dir = TempDir::new().unwrap();
    let f = geo30(&dir, 0);
    let base = ["sim", "--dataset", path_str(&f), "--protocol", "gossip"];
    let cases: &[(&[&str], &str)] = &[
        (&["--duration", "abc"], "duration"),
        (&["--duration", "0s"], "--duration"),
        (&["--probe-interval", "5x"], "probe-interval"),
        (&["--loss", "1.5"], "--loss"),
        (&["--kill", "3"], "NODE@TIME"),
        (&["--kill", "30@10s"], "node 30 does not exist"),
        (&["--duration", "100s", "--kill", "3@200s"], "after the end"),
        (&["--kill", "3@10s", "--kill", "3@20s"], "already down"),
        (&["--restart", "3@10s"], "restart"),
        (&["--slow", "3-2s"], "NODE:DELAY"),
        (&["--partition", "half@10s..5s"], "ends before it starts"),
        (&["--partition", "most@10s..50s"], "SIDE@START..END"),
        (&["--k", "2"], "--k"),
        (&["--select", "shuffle"], "--select"),
        (&["--out", "/tmp/x"], "--out"),
    ];
    for (extra, want) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let e = tomo_fails_cleanly(&args);
        assert!(e.contains(want), "{extra:?}: want {want:?} in {e}");
    }
    let e = tomo_fails_cleanly(&["sim", "--dataset", path_str(&f), "--protocol", "swim"]);
    assert!(e.contains("unknown --protocol"), "{e}");
    // Help mentions the protocol and the gossip flags.
    let help = tomo(&["sim", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--protocol",
        "--duration",
        "--kill",
        "--partition",
        "--slow",
    ] {
        assert!(help.contains(flag), "{flag} in help");
    }
}
