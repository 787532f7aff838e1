//! tomo against HashiCorp serf's own Go code, on real data, in the same run.
//!
//! The serf peer harness (`../shared/peers/serf-vivaldi`) drives serf's
//! `coordinate` package over a latency matrix and prints the same JSON keys
//! as `tomo sim`. Two claims are checked here:
//!
//! * `--profile serf` reproduces serf: its accuracy figures, averaged over
//!   five seeds, are within 10 % of the harness's. The two sides draw peers
//!   from different RNGs, so single runs differ; seed means do not.
//! * the default profile beats serf on the same data and seed.
//!
//! Prerequisites are Go and Debian's serf source (to build the harness) and
//! the shared datasets. Without them the tests print `skipping: …` and pass,
//! unless `TOMO_REQUIRE_EXTERNAL=1`, in which case they fail and say what to
//! install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

const DATASETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/datasets");
const HARNESS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/peers/serf-vivaldi");
/// Under `target/` so repeated test runs reuse the binary and Go's build
/// cache; the shared folder itself is read-only.
const HARNESS_BIN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/serf-vivaldi-bin");
const SERF_PKG: &str = "/usr/share/gocode/src/github.com/hashicorp/serf/coordinate";
const INSTALL: &str =
    "apt-get update && apt-get install -y golang-go golang-github-hashicorp-serf-dev";

/// The run both sides make: serf's phantom-test length, one probe per node
/// per round (memberlist's one probe per interval), uniform peer choice.
/// The throughput loop is skipped: only accuracy is compared here.
const ROUNDS: &str = "1000";
const K: &str = "1";
const SELECT: &str = "random";

/// Figures compared in the fidelity test.
const FIDELITY_KEYS: [&str; 4] = [
    "median_rel_err",
    "p90_rel_err",
    "p99_rel_err",
    "nn_recall_at_5",
];
const FIDELITY_SEEDS: std::ops::RangeInclusive<u64> = 1..=5;
/// Allowed relative gap between the seed means of the two sides.
const FIDELITY_TOLERANCE: f64 = 0.10;

/// Whether a missing prerequisite fails the test instead of skipping it.
fn external_required() -> bool {
    std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1")
}

/// Reports a missing prerequisite: panics when it is required, otherwise
/// prints why the test is skipped.
fn missing(what: &str) {
    if external_required() {
        panic!("TOMO_REQUIRE_EXTERNAL=1 but {what}");
    }
    eprintln!("skipping: {what}");
}

/// What the harness build needs but this machine lacks, if anything.
fn missing_toolchain() -> Option<String> {
    let has_go = Command::new("go")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_go {
        return Some(format!("the Go toolchain is missing (install: {INSTALL})"));
    }
    if !Path::new(SERF_PKG).is_dir() {
        return Some(format!(
            "serf's Go source {SERF_PKG} is missing (install: {INSTALL})"
        ));
    }
    let run_sh = Path::new(HARNESS_DIR).join("run.sh");
    if !run_sh.is_file() {
        return Some(format!("the serf harness {} is missing", run_sh.display()));
    }
    None
}

/// Builds the harness once per test process (`run.sh build` itself skips the
/// build when the binary is newer than `main.go`). `Err` holds why it cannot
/// be built.
fn build_harness() -> Result<PathBuf, String> {
    if let Some(why) = missing_toolchain() {
        return Err(why);
    }
    let out = Command::new("bash")
        .arg(Path::new(HARNESS_DIR).join("run.sh"))
        .arg("build")
        .env("BIN_DIR", HARNESS_BIN_DIR)
        .output()
        .expect("run bash");
    // Go and serf are present, so a failed build is a real error.
    assert!(
        out.status.success(),
        "building the serf harness failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Path::new(HARNESS_BIN_DIR).join("serf-vivaldi"))
}

/// The harness binary, or `None` (after reporting) when it cannot be built.
fn harness() -> Option<&'static Path> {
    static HARNESS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match HARNESS.get_or_init(build_harness) {
        Ok(bin) => Some(bin),
        Err(why) => {
            missing(why);
            None
        }
    }
}

/// A file of the shared dataset folder, or `None` (after reporting).
fn dataset(name: &str) -> Option<PathBuf> {
    let p = Path::new(DATASETS).join(name);
    if p.is_file() {
        Some(p)
    } else {
        missing(&format!("dataset {} is missing", p.display()));
        None
    }
}

/// Runs a program and returns its stdout lines parsed as JSON.
fn json_lines(cmd: &mut Command) -> Vec<Value> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}

/// serf's `result` for one seed: 1000 rounds, k = 1, uniform peers.
fn serf_result(bin: &Path, matrix: &Path, seed: u64) -> Value {
    let seed = seed.to_string();
    let mut cmd = Command::new(bin);
    cmd.arg("-matrix").arg(matrix).args([
        "-rounds",
        ROUNDS,
        "-k",
        K,
        "-select",
        SELECT,
        "-seed",
        &seed,
        "-bench-updates",
        "0",
    ]);
    let mut lines = json_lines(&mut cmd);
    assert_eq!(lines.len(), 1, "the harness prints one line");
    lines.remove(0)["result"].take()
}

/// tomo's `result`s with the harness's run flags plus `extra`, one per
/// printed line.
fn tomo_results(matrix: &Path, extra: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tomo"));
    cmd.arg("sim").arg("--dataset").arg(matrix).args([
        "--rounds",
        ROUNDS,
        "--k",
        K,
        "--select",
        SELECT,
        "--bench-updates",
        "0",
    ]);
    cmd.args(extra);
    json_lines(&mut cmd)
        .into_iter()
        .map(|mut l| l["result"].take())
        .collect()
}

fn num(result: &Value, key: &str) -> f64 {
    result[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {result}"))
}

fn mean(results: &[Value], key: &str) -> f64 {
    results.iter().map(|r| num(r, key)).sum::<f64>() / results.len() as f64
}

/// Prints `key  serf  tomo  tomo/serf` rows so a failure is readable.
fn print_table(title: &str, tomo_label: &str, rows: &[(&str, f64, f64)]) {
    eprintln!("\n{title}");
    eprintln!(
        "{:<16} {:>10} {:>14} {:>10}",
        "metric", "serf (Go)", tomo_label, "tomo/serf"
    );
    for (key, serf, tomo) in rows {
        eprintln!("{key:<16} {serf:>10.4} {tomo:>14.4} {:>10.3}", tomo / serf);
    }
}

#[test]
fn serf_profile_matches_serf_on_azure() {
    let (Some(bin), Some(azure)) = (harness(), dataset("azure.ltm")) else {
        return;
    };
    let serf: Vec<Value> = FIDELITY_SEEDS
        .map(|s| serf_result(bin, &azure, s))
        .collect();
    let sweep = format!("seed={}..{}", FIDELITY_SEEDS.start(), FIDELITY_SEEDS.end());
    let tomo = tomo_results(&azure, &["--profile", "serf", "--sweep", &sweep]);
    assert_eq!(tomo.len(), serf.len(), "one tomo line per seed");

    // Same keys and the same data preparation on both sides.
    for key in serf[0].as_object().expect("result is an object").keys() {
        assert!(tomo[0].get(key).is_some(), "tomo lacks result.{key}");
    }
    assert_eq!(tomo[0]["pairs"], serf[0]["pairs"]);
    assert_eq!(tomo[0]["nn_nodes"], serf[0]["nn_nodes"]);

    let rows: Vec<(&str, f64, f64)> = FIDELITY_KEYS
        .iter()
        .map(|&k| (k, mean(&serf, k), mean(&tomo, k)))
        .collect();
    print_table(
        "azure.ltm, mean over seeds 1..=5, 1000 rounds, k=1, random peers",
        "--profile serf",
        &rows,
    );
    for (key, s, t) in rows {
        assert!(
            (t / s - 1.0).abs() <= FIDELITY_TOLERANCE,
            "{key}: tomo --profile serf {t:.4} vs serf {s:.4} differ by more than 10 %"
        );
    }
}

#[test]
fn tomo_profile_beats_serf_on_real_data() {
    let Some(bin) = harness() else {
        return;
    };
    for name in ["azure.ltm", "planetlab490.median.ltm"] {
        let Some(matrix) = dataset(name) else {
            return;
        };
        let serf = serf_result(bin, &matrix, 1);
        let tomo = tomo_results(&matrix, &["--seed", "1"]).remove(0);
        assert_eq!(tomo["pairs"], serf["pairs"], "{name}: same pairs scored");
        let rows: Vec<(&str, f64, f64)> = [
            "median_rel_err",
            "p99_rel_err",
            "nn_accuracy",
            "nn_recall_at_5",
        ]
        .iter()
        .map(|&k| (k, num(&serf, k), num(&tomo, k)))
        .collect();
        print_table(&format!("{name}, seed 1"), "tomo", &rows);
        beats(name, &serf, &tomo);
    }
}

/// The margins by which the default profile must beat serf.
fn beats(name: &str, serf: &Value, tomo: &Value) {
    let (s, t) = (|k| num(serf, k), |k| num(tomo, k));
    assert!(
        t("median_rel_err") <= s("median_rel_err"),
        "{name}: median_rel_err {} > serf's {}",
        t("median_rel_err"),
        s("median_rel_err")
    );
    assert!(
        t("p99_rel_err") <= 0.6 * s("p99_rel_err"),
        "{name}: p99_rel_err {} > 0.6 × serf's {}",
        t("p99_rel_err"),
        s("p99_rel_err")
    );
    assert!(
        t("nn_accuracy") >= 1.5 * s("nn_accuracy"),
        "{name}: nn_accuracy {} < 1.5 × serf's {}",
        t("nn_accuracy"),
        s("nn_accuracy")
    );
    assert!(
        t("nn_recall_at_5") >= 0.8,
        "{name}: nn_recall_at_5 {} < 0.8",
        t("nn_recall_at_5")
    );
}
