//! The p50/p99 layer on the measured time series (issue 3's acceptance):
//! replay Seattle's and PlanetLab's series with 20 % of pairs held out and
//! check the calibration figures of the `tail` block, and that tomo's p99
//! beats the coordinate estimate used as a p99 (what Consul offers).
//!
//! Needs `../shared/datasets`; skips with a message when it is absent
//! (fails instead under `TOMO_REQUIRE_EXTERNAL=1`).

use std::path::PathBuf;

use serde_json::Value;

mod common;
use common::{path_str, tomo_ok};

fn datasets() -> Option<PathBuf> {
    let d = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/datasets"));
    if d.join("seattle99.series.ltm.gz").exists() && d.join("planetlab490.series.ltm.gz").exists() {
        return Some(d);
    }
    let msg = format!("the measured series are not in {}", d.display());
    if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
        panic!("TOMO_REQUIRE_EXTERNAL=1 but {msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

/// Runs the acceptance simulation (1000 rounds, k 1, seed 1, 20 % held out)
/// and returns its `tail` block.
fn tail(dir: &std::path::Path, name: &str) -> Value {
    let m = dir.join(format!("{name}.median.ltm"));
    let s = dir.join(format!("{name}.series.ltm.gz"));
    let out = tomo_ok(&[
        "sim",
        "--dataset",
        path_str(&m),
        "--observe",
        path_str(&s),
        "--bench-updates",
        "0",
    ]);
    let v: Value = serde_json::from_str(&out).expect("one JSON line");
    v["tail"].clone()
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

fn check(name: &str, t: &Value) {
    eprintln!("{name}: {}", serde_json::to_string_pretty(t).unwrap());
    let probed_exceed = num(t, &["probed", "p99_exceed_rate"]);
    let held_exceed = num(t, &["held_out", "p99_exceed_rate"]);
    assert!(
        (0.005..=0.02).contains(&probed_exceed),
        "{name} probed exceed {probed_exceed}"
    );
    assert!(
        (0.003..=0.03).contains(&held_exceed),
        "{name} held-out exceed {held_exceed}"
    );
    assert!(
        num(t, &["probed", "p99_log_ratio_median"]) <= 0.25,
        "{name} probed p99 log ratio"
    );
    assert!(
        num(t, &["held_out", "p99_log_ratio_median"]) <= 0.5,
        "{name} held-out p99 log ratio"
    );
    // Held-out pairs were never probed: every estimate for them is predicted.
    assert_eq!(num(t, &["held_out", "measured_pairs"]), 0.0, "{name}");
    let total = num(t, &["probed", "pairs"]) + num(t, &["held_out", "pairs"]);
    let frac = num(t, &["held_out", "pairs"]) / total;
    assert!(
        (0.17..0.23).contains(&frac),
        "{name} held-out fraction {frac}"
    );
    // The coordinate as a p99 is exceeded by about half the samples.
    assert!(
        num(t, &["coordinate_as_p99", "held_out", "p99_exceed_rate"]) > 0.3,
        "{name}"
    );
    assert!(num(t, &["bytes_per_peer"]) <= 2048.0);
}

#[test]
fn seattle_and_planetlab_tails_are_calibrated() {
    let Some(dir) = datasets() else { return };
    for name in ["seattle99", "planetlab490"] {
        check(name, &tail(&dir, name));
    }
}
