//! `tomo plot` end to end: real `tomo sim --out` runs and a generated
//! dataset are drawn as PNG and SVG through the binary, and the images are
//! checked for format, size and the text the figures promise. Bad arguments
//! must fail with a non-zero exit and a message that names the problem.

use std::path::{Path, PathBuf};

mod common;
use common::{gen_dataset, path_str, tomo_err, tomo_ok};
use tempfile::TempDir;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// plotters writes a blank white 640 × 480 canvas in about 6 KB; the real
/// figures at that size are 70-190 KB (text, grid, data).
const MIN_PNG_BYTES: u64 = 24 * 1024;

/// Every kind with text its SVG must contain: an axis label and, where the
/// figure has one, a legend entry.
const KINDS: [(&str, &[&str]); 5] = [
    (
        "cdf",
        &["fraction of pairs", "relative error", "tomo (median"],
    ),
    ("convergence", &["round", "serf median"]),
    (
        "scatter",
        &["RTT measured (ms)", "RTT predicted (ms)", "y = x"],
    ),
    ("map", &["PC1 (ms)", "PC2 (ms)", "of variance"]),
    ("heatmap", &["destination node", "source node", "RTT (ms)"]),
];

/// A small simulator run of `profile` written to `dir/name`.
fn sim(dir: &Path, name: &str, profile: &str) -> PathBuf {
    let out = dir.join(name);
    tomo_ok(&[
        "sim",
        "--synthetic",
        "geo",
        "--nodes",
        "40",
        "--rounds",
        "60",
        "--bench-updates",
        "0",
        "--profile",
        profile,
        "--out",
        path_str(&out),
    ]);
    out
}

/// A run of a small generated dataset observed against its own generated
/// series (`tomo sim --observe`), so it has `tail_pairs.csv`; in `dir/observed`.
fn observed_sim(dir: &Path) -> PathBuf {
    let ltm = dir.join("g.ltm");
    tomo_ok(&[
        "dataset",
        "gen",
        "geo",
        "--nodes",
        "40",
        "--slices",
        "30",
        "-o",
        path_str(&ltm),
    ]);
    let out = dir.join("observed");
    tomo_ok(&[
        "sim",
        "--dataset",
        path_str(&ltm),
        "--observe",
        path_str(&dir.join("g.series.ltm.gz")),
        "--rounds",
        "200",
        "--bench-updates",
        "0",
        "--out",
        path_str(&out),
    ]);
    out
}

/// A temp dir holding a `tomo` and a `serf` run.
fn two_runs() -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new().expect("temp dir");
    let a = sim(tmp.path(), "tomo-run", "tomo");
    let b = sim(tmp.path(), "serf-run", "serf");
    (tmp, a, b)
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).expect("read png");
    assert!(bytes.len() > 24, "{} is truncated", path.display());
    assert_eq!(
        &bytes[..8],
        PNG_SIGNATURE,
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

fn read_svg(path: &Path) -> String {
    let svg = std::fs::read_to_string(path).expect("read svg");
    assert!(svg.contains("<svg"), "{} is not an SVG", path.display());
    assert!(
        svg.trim_end().ends_with("</svg>"),
        "{} is cut off",
        path.display()
    );
    svg
}

fn assert_contains_all(svg: &str, texts: &[&str], what: &str) {
    for t in texts {
        assert!(svg.contains(t), "{what}: SVG lacks the text {t:?}");
    }
}

#[test]
fn every_kind_renders_png_and_svg() {
    let (tmp, a, b) = two_runs();
    for (kind, texts) in KINDS {
        let png = tmp.path().join(format!("{kind}.png"));
        let svg = tmp.path().join(format!("{kind}.svg"));
        tomo_ok(&[
            "plot",
            kind,
            path_str(&a),
            path_str(&b),
            "-o",
            path_str(&png),
            "--width",
            "640",
            "--height",
            "480",
        ]);
        assert_eq!(png_size(&png), (640, 480), "{kind}");
        let bytes = std::fs::metadata(&png).expect("png written").len();
        assert!(
            bytes > MIN_PNG_BYTES,
            "{kind}: PNG of {bytes} bytes looks empty"
        );

        tomo_ok(&[
            "plot",
            kind,
            path_str(&a),
            path_str(&b),
            "-o",
            path_str(&svg),
        ]);
        let text = read_svg(&svg);
        assert!(
            text.contains(r#"width="1024" height="768""#),
            "{kind}: default size"
        );
        assert_contains_all(&text, texts, kind);
    }
}

#[test]
fn png_defaults_to_1024_by_768() {
    let tmp = TempDir::new().expect("temp dir");
    let run = sim(tmp.path(), "run", "tomo");
    let png = tmp.path().join("cdf.png");
    tomo_ok(&["plot", "cdf", path_str(&run), "-o", path_str(&png)]);
    assert_eq!(png_size(&png), (1024, 768));
}

#[test]
fn legend_names_inputs_by_profile_and_directory_when_profiles_collide() {
    let tmp = TempDir::new().expect("temp dir");
    let a = sim(tmp.path(), "alpha", "tomo");
    let b = sim(tmp.path(), "beta", "tomo");
    let c = sim(tmp.path(), "gamma", "serf");
    let svg = tmp.path().join("cdf.svg");
    tomo_ok(&[
        "plot",
        "cdf",
        path_str(&a),
        path_str(&b),
        path_str(&c),
        "-o",
        path_str(&svg),
    ]);
    let text = read_svg(&svg);
    assert_contains_all(
        &text,
        &["tomo (alpha)", "tomo (beta)", "serf (median"],
        "cdf",
    );
    assert!(
        !text.contains("serf (gamma)"),
        "a unique profile needs no directory"
    );
}

#[test]
fn kind_options_change_the_figure() {
    let (tmp, a, b) = two_runs();
    let out = |name: &str| tmp.path().join(name);

    tomo_ok(&[
        "plot",
        "convergence",
        path_str(&a),
        path_str(&b),
        "--p90",
        "-o",
        path_str(&out("c.svg")),
    ]);
    assert_contains_all(&read_svg(&out("c.svg")), &["tomo p90", "serf p90"], "--p90");

    tomo_ok(&[
        "plot",
        "heatmap",
        path_str(&a),
        "--estimate",
        "-o",
        path_str(&out("h.svg")),
    ]);
    assert_contains_all(
        &read_svg(&out("h.svg")),
        &["estimated RTT (ms)"],
        "--estimate",
    );

    tomo_ok(&[
        "plot",
        "cdf",
        path_str(&a),
        "--linear",
        "-o",
        path_str(&out("l.png")),
    ]);
    assert_eq!(png_size(&out("l.png")), (1024, 768));

    tomo_ok(&[
        "plot",
        "scatter",
        path_str(&a),
        "--title",
        "My own title",
        "-o",
        path_str(&out("t.svg")),
    ]);
    assert_contains_all(&read_svg(&out("t.svg")), &["My own title"], "--title");
}

#[test]
fn heatmap_reads_a_dataset_file() {
    let tmp = TempDir::new().expect("temp dir");
    let ltm = tmp.path().join("grid.ltm");
    gen_dataset("grid", 25, &ltm);

    let png = tmp.path().join("grid.png");
    tomo_ok(&[
        "plot",
        "heatmap",
        path_str(&ltm),
        "-o",
        path_str(&png),
        "--width",
        "800",
        "--height",
        "600",
    ]);
    assert_eq!(png_size(&png), (800, 600));

    let svg = tmp.path().join("grid.svg");
    tomo_ok(&["plot", "heatmap", path_str(&ltm), "-o", path_str(&svg)]);
    assert_contains_all(
        &read_svg(&svg),
        &["grid.ltm", "destination node", "RTT (ms)"],
        "dataset heatmap",
    );
}

#[test]
fn output_directories_are_created() {
    let tmp = TempDir::new().expect("temp dir");
    let run = sim(tmp.path(), "run", "tomo");
    let png = tmp.path().join("new/deeper/map.png");
    tomo_ok(&["plot", "map", path_str(&run), "-o", path_str(&png)]);
    assert_eq!(png_size(&png), (1024, 768));
}

#[test]
fn unknown_kind_lists_the_valid_ones() {
    let tmp = TempDir::new().expect("temp dir");
    let run = sim(tmp.path(), "run", "tomo");
    let err = tomo_err(&["plot", "pie", path_str(&run), "-o", "x.png"]);
    assert!(err.contains("pie"), "{err}");
    for kind in [
        "cdf",
        "convergence",
        "scatter",
        "map",
        "heatmap",
        "calibration",
    ] {
        assert!(err.contains(kind), "error does not list {kind}: {err}");
    }
}

#[test]
fn missing_input_is_named() {
    let tmp = TempDir::new().expect("temp dir");
    let missing = tmp.path().join("no-such-run");
    let png = tmp.path().join("x.png");
    let err = tomo_err(&["plot", "cdf", path_str(&missing), "-o", path_str(&png)]);
    assert!(
        err.contains("no-such-run") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!png.exists(), "no image is written on error");
}

#[test]
fn bad_output_extension_is_rejected() {
    let tmp = TempDir::new().expect("temp dir");
    let run = sim(tmp.path(), "run", "tomo");
    let pdf = tmp.path().join("figure.pdf");
    let err = tomo_err(&["plot", "cdf", path_str(&run), "-o", path_str(&pdf)]);
    assert!(
        err.contains("figure.pdf") && err.contains(".png or .svg"),
        "{err}"
    );
    assert!(!pdf.exists());
}

#[test]
fn missing_or_malformed_run_files_are_named() {
    let tmp = TempDir::new().expect("temp dir");
    let run = sim(tmp.path(), "run", "tomo");
    let out = tmp.path().join("x.png");
    let out = path_str(&out);

    std::fs::remove_file(run.join("rounds.csv")).expect("remove rounds.csv");
    let err = tomo_err(&["plot", "convergence", path_str(&run), "-o", out]);
    assert!(err.contains("rounds.csv"), "{err}");

    let pairs = run.join("pairs.csv");
    let mut text = std::fs::read_to_string(&pairs).expect("read pairs.csv");
    text.push_str("1,2,oops,3.0,0.5\n");
    std::fs::write(&pairs, text).expect("corrupt pairs.csv");
    let err = tomo_err(&["plot", "scatter", path_str(&run), "-o", out]);
    assert!(err.contains("pairs.csv") && err.contains("oops"), "{err}");

    std::fs::write(run.join("run.json"), "{ not json").expect("corrupt run.json");
    let err = tomo_err(&["plot", "cdf", path_str(&run), "-o", out]);
    assert!(err.contains("run.json"), "{err}");
}

#[test]
fn dataset_files_are_only_for_heatmaps() {
    let tmp = TempDir::new().expect("temp dir");
    let ltm = tmp.path().join("grid.ltm");
    gen_dataset("grid", 25, &ltm);
    let out = tmp.path().join("x.png");

    let err = tomo_err(&["plot", "cdf", path_str(&ltm), "-o", path_str(&out)]);
    assert!(
        err.contains("grid.ltm") && err.contains("tomo sim --out"),
        "{err}"
    );

    let err = tomo_err(&[
        "plot",
        "heatmap",
        path_str(&ltm),
        "--estimate",
        "-o",
        path_str(&out),
    ]);
    assert!(err.contains("--estimate"), "{err}");

    let garbage = tmp.path().join("garbage.ltm");
    std::fs::write(&garbage, "this is not a matrix\n").expect("write garbage");
    let err = tomo_err(&["plot", "heatmap", path_str(&garbage), "-o", path_str(&out)]);
    assert!(err.contains("garbage.ltm"), "{err}");
}

#[test]
fn calibration_renders_png_and_svg_from_an_observed_run() {
    let tmp = TempDir::new().expect("temp dir");
    let run = observed_sim(tmp.path());

    let png = tmp.path().join("calibration.png");
    tomo_ok(&[
        "plot",
        "calibration",
        path_str(&run),
        "-o",
        path_str(&png),
        "--width",
        "640",
        "--height",
        "480",
    ]);
    assert_eq!(png_size(&png), (640, 480));
    let bytes = std::fs::metadata(&png).expect("png written").len();
    assert!(
        bytes > MIN_PNG_BYTES,
        "calibration: PNG of {bytes} bytes looks empty"
    );

    // The legend counts the pairs of each group of tail_pairs.csv.
    let tail = std::fs::read_to_string(run.join("tail_pairs.csv")).expect("read tail_pairs.csv");
    let header: Vec<&str> = tail.lines().next().expect("header").split(',').collect();
    let held = header
        .iter()
        .position(|h| *h == "held_out")
        .expect("held_out column");
    let count = |flag: &str| {
        tail.lines()
            .skip(1)
            .filter(|l| l.split(',').nth(held) == Some(flag))
            .count()
    };
    let (probed, held_out) = (count("0"), count("1"));
    assert!(
        probed > 0 && held_out > 0,
        "{probed} probed, {held_out} held out"
    );

    let svg = tmp.path().join("calibration.svg");
    tomo_ok(&["plot", "calibration", path_str(&run), "-o", path_str(&svg)]);
    let text = read_svg(&svg);
    assert!(
        text.contains(r#"width="1024" height="768""#),
        "default size"
    );
    assert_contains_all(
        &text,
        &[
            "p99 calibration",
            "actual p99 (ms)",
            "predicted p99 (ms)",
            "share of samples",
            "fraction of pairs",
            &format!("probed ({probed})"),
            &format!("held out ({held_out})"),
            "coordinate as p99 (pooled",
            "y = x",
            "probed: pooled ",
            "held out: pooled ",
            "target 1 %",
        ],
        "calibration",
    );
}

#[test]
fn calibration_needs_one_observed_run() {
    let tmp = TempDir::new().expect("temp dir");
    let plain = sim(tmp.path(), "plain", "tomo");
    let out = tmp.path().join("x.png");

    let err = tomo_err(&[
        "plot",
        "calibration",
        path_str(&plain),
        "-o",
        path_str(&out),
    ]);
    assert!(
        err.contains("tail_pairs.csv") && err.contains("tomo sim --observe"),
        "{err}"
    );
    assert!(!out.exists(), "no image is written on error");

    let err = tomo_err(&[
        "plot",
        "calibration",
        path_str(&plain),
        path_str(&plain),
        "-o",
        path_str(&out),
    ]);
    assert!(
        err.contains("calibration") && err.contains("one run"),
        "{err}"
    );
}
