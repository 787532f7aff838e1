//! `tomo` command line end to end: dataset generation and inspection, `sim`
//! output keys and accuracy, determinism across seeds and thread counts,
//! `--out` files, engine overrides, the alternative input formats, clean
//! failures on bad input, and the help texts.
//!
//! Every run goes through the real binary. Sizes are small so the whole file
//! takes a few seconds on a 2-core CI machine.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{gen_dataset, path_str, tomo_fails_cleanly, tomo_ok};
use tempfile::TempDir;

/// The keys of the serf peer harness's `result` object, which `tomo sim`
/// promises to print too so the two can be compared line by line.
const HARNESS_RESULT_KEYS: &[&str] = &[
    "pairs",
    "median_rel_err",
    "p90_rel_err",
    "p99_rel_err",
    "mean_rel_err",
    "max_rel_err",
    "median_abs_err_ms",
    "p99_abs_err_ms",
    "nn_nodes",
    "nn_accuracy",
    "stretch_median",
    "stretch_p90",
    "stretch_p99",
    "stretch_mean",
    "nn_true_rank_median",
    "nn_true_rank_p90",
    "nn_recall_at_3",
    "nn_recall_at_5",
    "nn_extra_ms_median",
    "nn_extra_ms_p90",
    "coord_error_estimate_median",
    "height_median_ms",
    "adjustment_median_ms",
    "resets",
];

/// Every stdout line of `tomo args` as JSON (one per simulation run).
fn json_lines(args: &[&str]) -> Vec<Value> {
    tomo_ok(args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// The single JSON line `tomo sim args` prints.
fn sim(args: &[&str]) -> Value {
    let mut full = vec!["sim", "--bench-updates", "0"];
    full.extend_from_slice(args);
    let mut lines = json_lines(&full);
    assert_eq!(lines.len(), 1, "tomo {full:?} should print one line");
    lines.remove(0)
}

/// `result` objects of a `tomo sim` sweep, in printed order.
fn sweep_results(args: &[&str]) -> Vec<Value> {
    let mut full = vec!["sim", "--bench-updates", "0"];
    full.extend_from_slice(args);
    json_lines(&full)
        .into_iter()
        .map(|l| l["result"].clone())
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// `tomo dataset info` of a file, parsed.
fn info(file: &Path) -> Value {
    serde_json::from_str(&tomo_ok(&["dataset", "info", path_str(file)]))
        .expect("dataset info prints JSON")
}

/// Generates a 60-node geo matrix with its labels and a 4-slice series.
fn gen_geo(dir: &Path) -> PathBuf {
    let m = dir.join("geo.ltm");
    tomo_ok(&[
        "dataset",
        "gen",
        "geo",
        "--nodes",
        "60",
        "--slices",
        "4",
        "-o",
        path_str(&m),
    ]);
    m
}

/// Reads a CSV into its header line and data rows.
fn read_csv(path: &Path) -> (String, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().to_string();
    let rows = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (header, rows)
}

#[test]
fn grid_dataset_is_complete_and_metric() {
    let dir = TempDir::new().unwrap();
    let g = dir.path().join("g.ltm");
    gen_dataset("grid", 25, &g);
    let inf = info(&g);
    assert_eq!(inf["nodes"], 25, "{inf}");
    assert_eq!(num(&inf, "missing_fraction"), 0.0, "{inf}");
    // A grid is a Euclidean point set: no triangle may be violated.
    assert_eq!(num(&inf, "tiv_fraction"), 0.0, "{inf}");
    assert_eq!(num(&inf["rtt_ms"], "min"), 10.0, "{inf}");
}

#[test]
fn geo_dataset_has_labels_series_and_tivs_and_replays() {
    let dir = TempDir::new().unwrap();
    let m = gen_geo(dir.path());
    let (header, rows) = read_csv(&dir.path().join("geo.nodes.csv"));
    assert_eq!(header, "index,metro,dc,lat,lon");
    assert_eq!(rows.len(), 60);
    let series = dir.path().join("geo.series.ltm.gz");
    assert!(series.is_file(), "gen --slices must write {series:?}");
    // Per-pair route inflation breaks the triangle inequality on purpose.
    let inf = info(&m);
    assert_eq!(inf["nodes"], 60);
    assert!(num(&inf, "tiv_fraction") > 0.0, "{inf}");

    let out = sim(&[
        "--dataset",
        path_str(&m),
        "--observe",
        path_str(&series),
        "--rounds",
        "50",
    ]);
    assert_eq!(out["params"]["observe_slices"], 4, "{out}");
    let tail = &out["series_tail"];
    assert_eq!(tail["pairs"], 60 * 59 / 2, "series_tail: {tail}");
}

#[test]
fn sim_prints_every_harness_key_and_both_profiles_embed_a_grid() {
    let lines = json_lines(&[
        "sim",
        "--synthetic",
        "grid",
        "--nodes",
        "25",
        "--rounds",
        "300",
        "--bench-updates",
        "0",
        "--sweep",
        "profile=tomo,serf",
    ]);
    assert_eq!(lines.len(), 2);
    for (line, profile) in lines.iter().zip(["tomo", "serf"]) {
        assert_eq!(line["harness"], "tomo");
        for key in ["updates_per_s", "updates_per_s_best", "ns_per_update"] {
            assert!(line.get(key).is_some(), "missing top-level {key}: {line}");
        }
        let p = &line["params"];
        assert_eq!(p["profile"], profile, "{p}");
        assert_eq!(p["nodes"], 25, "{p}");
        assert_eq!(p["rounds"], 300, "{p}");
        assert_eq!(p["seed"], 1, "{p}");
        assert!(p["engine_config"].is_object(), "{p}");
        let r = &line["result"];
        for key in HARNESS_RESULT_KEYS {
            assert!(r.get(key).is_some(), "{profile}: missing result.{key}: {r}");
        }
        assert_eq!(r["pairs"], 300, "{profile}: {r}");
        assert!(num(r, "median_rel_err") < 0.05, "{profile}: {r}");
        assert!(num(r, "nn_accuracy") > 0.9, "{profile}: {r}");
    }
}

#[test]
fn same_seed_same_figures_other_seed_other_figures() {
    let run = |seed: &str| {
        sim(&[
            "--synthetic",
            "geo",
            "--nodes",
            "40",
            "--rounds",
            "100",
            "--seed",
            seed,
        ])["result"]
            .clone()
    };
    let a = run("7");
    assert_eq!(a, run("7"), "the same seed must reproduce every figure");
    assert_ne!(a, run("8"), "another seed must give another run");
}

#[test]
fn sweep_figures_do_not_depend_on_thread_count() {
    let with_threads = |t: &str| {
        sweep_results(&[
            "--synthetic",
            "geo",
            "--nodes",
            "40",
            "--rounds",
            "100",
            "--sweep",
            "seed=1..3",
            "--threads",
            t,
        ])
    };
    let one = with_threads("1");
    assert_eq!(one.len(), 3);
    assert_ne!(one[0], one[1], "the seeds must give different runs");
    assert_eq!(one, with_threads("2"));
}

#[test]
fn out_dir_has_run_json_and_csvs() {
    let dir = TempDir::new().unwrap();
    let out_dir = dir.path().join("run");
    let line = sim(&[
        "--synthetic",
        "geo",
        "--nodes",
        "30",
        "--rounds",
        "100",
        "--out",
        path_str(&out_dir),
    ]);
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["result"], line["result"], "run.json must match stdout");

    let (header, pairs) = read_csv(&out_dir.join("pairs.csv"));
    assert_eq!(header, "i,j,actual_ms,estimate_ms,rel_err");
    assert_eq!(pairs.len(), 30 * 29 / 2, "one row per known pair");
    assert_eq!(line["result"]["pairs"], pairs.len());

    let (header, nodes) = read_csv(&out_dir.join("nodes.csv"));
    assert_eq!(header, "node,label,true_nearest,predicted_nearest,stretch");
    assert_eq!(nodes.len(), 30);
    assert!(
        nodes.iter().all(|r| !r[1].is_empty()),
        "geo nodes have labels"
    );

    let (header, coords) = read_csv(&out_dir.join("coords.csv"));
    assert_eq!(header, coords_header(8));
    assert_eq!(coords.len(), 30);

    let (header, rounds) = read_csv(&out_dir.join("rounds.csv"));
    assert_eq!(
        header,
        "round,median_rel_err,p90_rel_err,p99_rel_err,nn_accuracy,nn_recall_at_5"
    );
    assert_eq!(rounds.last().map(|r| r[0].as_str()), Some("100"));
}

/// The `coords.csv` header for `dim` coordinate dimensions.
fn coords_header(dim: usize) -> String {
    let xs: String = (0..dim).map(|d| format!(",x{d}_ms")).collect();
    format!("node,label,error,height_ms,adjustment_ms{xs}")
}

#[test]
fn set_overrides_an_engine_parameter_and_names_unknown_ones() {
    let base = ["--synthetic", "geo", "--nodes", "40", "--rounds", "100"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        sim(&args)
    };
    let default = run(&[]);
    let changed = run(&["--set", "short_link_alpha=0"]);
    assert_eq!(changed["params"]["engine_config"]["short_link_alpha"], 0.0);
    assert_ne!(default["result"], changed["result"]);

    let err = tomo_fails_cleanly(&[
        "sim",
        "--synthetic",
        "grid",
        "--set",
        "nonsense=1",
        "--bench-updates",
        "0",
    ]);
    assert!(err.contains("nonsense"), "{err}");
}

#[test]
fn dim_sets_the_coordinate_columns() {
    let dir = TempDir::new().unwrap();
    let out_dir = dir.path().join("dim4");
    let line = sim(&[
        "--synthetic",
        "grid",
        "--rounds",
        "50",
        "--dim",
        "4",
        "--out",
        path_str(&out_dir),
    ]);
    assert_eq!(line["params"]["dimensionality"], 4);
    let (header, rows) = read_csv(&out_dir.join("coords.csv"));
    assert_eq!(header, coords_header(4));
    assert!(rows.iter().all(|r| r.len() == 5 + 4), "{rows:?}");
}

#[test]
fn triples_reduce_repeats_to_the_median_and_skip_missing() {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("t.txt");
    // a–b is sampled three times (both directions): its median is 20 ms.
    // d–a and b–d are missing values, so 4 of the 6 pairs are known.
    std::fs::write(
        &file,
        "# i j rtt_ms\na b 10\nb a 30\na b 20\nb c 15\na c 25\nc d 10\nd a nan\nb d -1\n",
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let line = sim(&[
        "--dataset",
        path_str(&file),
        "--format",
        "triples",
        "--rounds",
        "50",
        "--out",
        path_str(&out_dir),
    ]);
    assert_eq!(line["params"]["nodes"], 4, "{line}");
    assert_eq!(line["params"]["known_pairs"], 4, "{line}");
    assert_eq!(line["result"]["pairs"], 4, "{line}");
    let (_, pairs) = read_csv(&out_dir.join("pairs.csv"));
    let ab = pairs
        .iter()
        .find(|r| r[0] == "0" && r[1] == "1")
        .expect("pair a-b is scored");
    assert_eq!(ab[2].parse::<f64>().unwrap(), 20.0, "{ab:?}");
}

#[test]
fn king_matrix_in_microseconds_with_scale_equals_ms_matrix() {
    let dir = TempDir::new().unwrap();
    let (us, ms) = (dir.path().join("king.txt"), dir.path().join("ms.ltm"));
    let (king_text, ms_text) = king_and_ms_matrices(12);
    std::fs::write(&us, king_text).unwrap();
    std::fs::write(&ms, ms_text).unwrap();
    let run = |file: &Path, extra: &[&str]| {
        let mut args = vec!["--dataset", path_str(file), "--rounds", "100"];
        args.extend_from_slice(extra);
        sim(&args)["result"].clone()
    };
    let from_ms = run(&ms, &[]);
    assert_eq!(from_ms["pairs"], 12 * 11 / 2 - 1, "one pair is missing");
    assert_eq!(run(&us, &["--format", "king", "--scale", "0.001"]), from_ms);
}

/// The same points-in-a-plane matrix twice: King-style (a label column,
/// integer microseconds, `-1` missing) and plain ms. The ms values are written
/// as the exact doubles `µs × 0.001` gives, so both parse to identical inputs.
fn king_and_ms_matrices(n: usize) -> (String, String) {
    let us = |i: usize, j: usize| -> i64 {
        if i == j {
            return 0;
        }
        if (i, j) == (0, 1) || (i, j) == (1, 0) {
            return -1;
        }
        let (x, y) = (
            |k: usize| (k * 37 % 11) as f64,
            |k: usize| (k * 7 % 5) as f64,
        );
        let d = (x(i) - x(j)).hypot(y(i) - y(j));
        (d * 7_300.0) as i64 + 1_100
    };
    let (mut king, mut ms) = (String::new(), String::from("# units: ms\n"));
    for i in 0..n {
        let row: Vec<i64> = (0..n).map(|j| us(i, j)).collect();
        let king_row: Vec<String> = row.iter().map(i64::to_string).collect();
        let ms_row: Vec<String> = row
            .iter()
            .map(|&v| {
                if v > 0 {
                    (v as f64 * 0.001).to_string()
                } else {
                    v.to_string()
                }
            })
            .collect();
        king.push_str(&format!("node{i} {}\n", king_row.join(" ")));
        ms.push_str(&ms_row.join(" "));
        ms.push('\n');
    }
    (king, ms)
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let ragged = d.join("ragged.ltm");
    std::fs::write(&ragged, "0 1 2\n1 0\n2 3 0\n").unwrap();
    // Invalid UTF-8 (0x80..) and a gzip header followed by junk.
    let garbage = d.join("garbage.bin");
    std::fs::write(&garbage, (0..=255u8).cycle().take(4096).collect::<Vec<_>>()).unwrap();
    let bad_gz = d.join("bad.ltm.gz");
    std::fs::write(&bad_gz, b"\x1f\x8b\x08\x00 not really gzip").unwrap();
    let missing = d.join("nope.ltm");

    let sim_err = |args: &[&str]| {
        let mut full = vec!["sim", "--bench-updates", "0"];
        full.extend_from_slice(args);
        tomo_fails_cleanly(&full)
    };
    let cases: Vec<(String, &str)> = vec![
        (sim_err(&["--dataset", path_str(&missing)]), "nope.ltm"),
        (sim_err(&["--dataset", path_str(&ragged)]), "row 2"),
        (
            sim_err(&["--synthetic", "grid", "--select", "bogus"]),
            "bogus",
        ),
        (
            sim_err(&["--synthetic", "grid", "--rounds", "0"]),
            "--rounds",
        ),
        (
            sim_err(&["--synthetic", "grid", "--observe", path_str(&ragged)]),
            "--observe",
        ),
        (sim_err(&[]), "--dataset"),
        (sim_err(&["--dataset", path_str(&garbage)]), "decode"),
        (
            tomo_fails_cleanly(&["dataset", "info", path_str(&garbage)]),
            "decode",
        ),
        (sim_err(&["--dataset", path_str(&bad_gz)]), "gzip"),
        (
            tomo_fails_cleanly(&[
                "dataset",
                "gen",
                "nosuchkind",
                "-o",
                path_str(&d.join("x.ltm")),
            ]),
            "nosuchkind",
        ),
    ];
    for (stderr, expected) in &cases {
        assert!(stderr.contains(expected), "want {expected:?} in: {stderr}");
    }
}

#[test]
fn series_with_fewer_nodes_than_the_matrix_is_refused() {
    let dir = TempDir::new().unwrap();
    let m = gen_geo(dir.path());
    let small = dir.path().join("small.ltm");
    tomo_ok(&[
        "dataset",
        "gen",
        "geo",
        "--nodes",
        "20",
        "--slices",
        "2",
        "-o",
        path_str(&small),
    ]);
    let err = tomo_fails_cleanly(&[
        "sim",
        "--bench-updates",
        "0",
        "--dataset",
        path_str(&m),
        "--observe",
        path_str(&dir.path().join("small.series.ltm.gz")),
    ]);
    assert!(err.contains("series") && err.contains("20"), "{err}");
}

#[test]
fn help_texts_name_the_main_flags() {
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--help"], &["sim", "dataset", "plot"]),
        (
            &["sim", "--help"],
            &[
                "--dataset",
                "--synthetic",
                "--rounds",
                "--profile",
                "--seed",
                "--sweep",
                "--out",
            ],
        ),
        (&["dataset", "--help"], &["info", "gen"]),
        (&["plot", "--help"], &["--output", "cdf", "heatmap"]),
    ];
    for (args, words) in cases {
        let help = tomo_ok(args);
        for w in words {
            assert!(help.contains(w), "tomo {args:?} should mention {w}: {help}");
        }
    }
}

#[test]
fn observe_adds_a_tail_block_with_a_held_out_set() {
    let dir = TempDir::new().unwrap();
    let g = dir.path().join("geo.ltm");
    tomo_ok(&[
        "dataset",
        "gen",
        "geo",
        "--nodes",
        "40",
        "--slices",
        "30",
        "-o",
        path_str(&g),
    ]);
    let series = dir.path().join("geo.series.ltm.gz");
    let out_dir = dir.path().join("run");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--dataset",
            path_str(&g),
            "--observe",
            path_str(&series),
            "--rounds",
            "300",
        ];
        args.extend_from_slice(extra);
        sim(&args)
    };
    let v = run(&["--out", path_str(&out_dir)]);
    let t = &v["tail"];
    let pairs = |g: &str| t[g]["pairs"].as_u64().unwrap();
    assert_eq!(pairs("probed") + pairs("held_out"), 40 * 39 / 2);
    let frac = pairs("held_out") as f64 / 780.0;
    assert!((0.12..0.28).contains(&frac), "held-out fraction {frac}");
    // Held-out pairs are never probed, so none of them has samples.
    assert_eq!(t["held_out"]["measured_pairs"], 0);
    assert!(t["probed"]["measured_pairs"].as_u64().unwrap() > 0);
    for g in ["probed", "held_out"] {
        let e = num(&t[g], "p99_exceed_rate");
        assert!((0.0..=1.0).contains(&e), "{g} {e}");
    }
    // geo sets carry datacenter labels: datacenter pairs are scored too.
    assert!(t["dc"]["pairs"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(v["params"]["holdout"], 0.2);
    let (header, rows) = read_csv(&out_dir.join("tail_pairs.csv"));
    assert_eq!(
        header,
        "i,j,held_out,source,sketch_samples,pred_p50_ms,pred_p99_ms,actual_p50_ms,actual_p99_ms,coordinate_ms,exceed,real_samples"
    );
    assert_eq!(rows.len(), 780);
    assert!(rows.iter().all(|r| r[2] == "0" || r[3] == "predicted"));
    // --holdout 0 probes every pair.
    let all = run(&["--holdout", "0"]);
    assert_eq!(all["tail"]["held_out"]["pairs"], 0);
    // Without a series there is no tail block.
    let plain = sim(&["--dataset", path_str(&g), "--rounds", "50"]);
    assert!(plain.get("tail").is_none());
    tomo_fails_cleanly(&[
        "sim",
        "--dataset",
        path_str(&g),
        "--observe",
        path_str(&series),
        "--holdout",
        "1.5",
    ]);
}

#[test]
fn a_damaged_data_dir_stops_the_agent_with_a_clear_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let data = dir.path().join("data");
    let port = common::free_tcp().to_string();
    let serf = common::free_udp().to_string();
    let rpc = common::free_tcp().to_string();
    let args = |d: &str| {
        vec![
            "agent".to_string(),
            "-server".into(),
            "-serf-wan-port".into(),
            "0".into(),
            "-dns-port".into(),
            "0".into(),
            "-bootstrap-expect".into(),
            "1".into(),
            "-bind".into(),
            "127.0.0.1".into(),
            "-http-port".into(),
            port.clone(),
            "-serf-lan-port".into(),
            serf.clone(),
            "-server-port".into(),
            rpc.clone(),
            "-data-dir".into(),
            d.to_string(),
        ]
    };
    // A Raft store that is not a database at all.
    std::fs::create_dir_all(data.join("raft")).unwrap();
    std::fs::write(data.join("raft/node-id"), "42\n").unwrap();
    std::fs::write(data.join("raft/raft.redb"), b"not a database").unwrap();
    let a = args(common::path_str(&data));
    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
    let err = common::tomo_fails_cleanly(&a);
    assert!(err.contains("raft.redb"), "{err}");
    // A damaged node ID.
    std::fs::remove_file(data.join("raft/raft.redb")).unwrap();
    std::fs::write(data.join("raft/node-id"), "forty-two").unwrap();
    let err = common::tomo_fails_cleanly(&a);
    assert!(err.contains("node-id") && err.contains("damaged"), "{err}");
    // -dev is one server: -bootstrap-expect 3 makes no sense with it.
    let err =
        common::tomo_fails_cleanly(&["agent", "-dev", "-dns-port", "0", "-bootstrap-expect", "3"]);
    assert!(err.contains("-bootstrap-expect"), "{err}");
    // A datacenter name with a dot would split WAN member names wrongly.
    let err =
        common::tomo_fails_cleanly(&["agent", "-dev", "-dns-port", "0", "-datacenter", "us.east"]);
    assert!(err.contains("-datacenter"), "{err}");
    // -join-wan on a client agent.
    let err = common::tomo_fails_cleanly(&[
        "agent",
        "-data-dir",
        common::path_str(dir.path()),
        "-dns-port",
        "0",
        "-join-wan",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("-join-wan"), "{err}");
}
