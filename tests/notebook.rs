//! Executes `notebooks/rtt_accuracy.ipynb` on fresh `tomo sim --out` runs, so a
//! change to the output files (names, columns, `run.json` keys) that breaks the
//! notebook breaks a test instead of the next person who opens it.
//!
//! It needs a Python with the packages of `notebooks/requirements.txt`. Without
//! them the test prints why and passes, so a plain `cargo test` works anywhere;
//! CI sets `TOMO_REQUIRE_EXTERNAL=1` to turn that skip into a failure.
//! `TOMO_PYTHON` picks the interpreter (default `python3`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NOTEBOOK: &str = "notebooks/rtt_accuracy.ipynb";
const INSTALL_HINT: &str = "python3 -m pip install -r notebooks/requirements.txt";

/// The PNGs the notebook writes; its last cell asserts the same list.
const FIGURES: [&str; 5] = [
    "rel_err_cdf.png",
    "convergence.png",
    "predicted_vs_measured.png",
    "stretch_cdf.png",
    "coords_pca.png",
];

/// Any real plot is tens of KB; a few KB means an empty or broken canvas.
const MIN_PNG_BYTES: usize = 5 * 1024;
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

fn python() -> String {
    std::env::var("TOMO_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `python -c code`; `Err` says what went wrong in one line.
fn python_check(python: &str, code: &str) -> Result<(), String> {
    let out = Command::new(python)
        .args(["-c", code])
        .output()
        .map_err(|e| format!("cannot run `{python}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // The last stderr line of a failed import is the useful one
    // ("ModuleNotFoundError: No module named 'papermill'").
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or("no output");
    Err(format!("`{python} -c {code:?}` failed: {last}"))
}

/// `None` when the notebook can run, else what is missing.
fn missing_python_stack(python: &str) -> Option<String> {
    python_check(
        python,
        "import papermill, matplotlib, pandas, numpy, ipykernel",
    )
    // Papermill resolves `-k python3` through jupyter_client exactly like this,
    // so this finds both an installed kernelspec and ipykernel's built-in one.
    .and_then(|()| {
        python_check(
            python,
            "from jupyter_client.kernelspec import KernelSpecManager; \
                 KernelSpecManager().get_kernel_spec('python3')",
        )
    })
    .err()
}

/// Runs a command to completion and panics with its output if it fails, so a
/// failure in CI shows the traceback rather than only an exit code.
fn run_ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({})\ncommand: {cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    out
}

/// A small geo run: 60 nodes keeps pairs.csv tiny and the sim well under a second,
/// while the region labels still exercise the coloured PCA map.
fn simulate(out_dir: &Path, profile: &str) {
    run_ok(
        &format!("tomo sim --profile {profile}"),
        Command::new(env!("CARGO_BIN_EXE_tomo")).args([
            "sim",
            "--synthetic",
            "geo",
            "--nodes",
            "60",
            "--rounds",
            "100",
            "--bench-updates",
            "0",
            "--profile",
            profile,
            "--out",
            path_str(out_dir),
        ]),
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[test]
fn rtt_accuracy_notebook_draws_every_figure() {
    let python = python();
    if let Some(missing) = missing_python_stack(&python) {
        let msg = format!(
            "notebook test needs Python packages: {missing}; install with `{INSTALL_HINT}`"
        );
        if std::env::var("TOMO_REQUIRE_EXTERNAL").is_ok_and(|v| v == "1") {
            panic!("TOMO_REQUIRE_EXTERNAL=1: {msg}");
        }
        eprintln!("skipping: {msg} (set TOMO_REQUIRE_EXTERNAL=1 to make this a failure)");
        return;
    }

    let tmp = tempfile::tempdir().expect("tempdir");
    let runs: Vec<PathBuf> = ["tomo", "serf"]
        .iter()
        .map(|profile| {
            let dir = tmp.path().join(profile);
            simulate(&dir, profile);
            dir
        })
        .collect();
    let fig_dir = tmp.path().join("fig");

    // All parameters as one YAML document (JSON is YAML): serde_json quotes any
    // path correctly, which `-p run_dirs '[...]'` string splicing would not.
    let params = serde_json::json!({
        "run_dirs": runs.iter().map(|d| path_str(d)).collect::<Vec<_>>(),
        "fig_dir": path_str(&fig_dir),
    });
    let executed = tmp.path().join("rtt_accuracy.out.ipynb");
    run_ok(
        "papermill",
        Command::new(&python)
            .current_dir(repo_root())
            .args(["-m", "papermill", NOTEBOOK, path_str(&executed)])
            .args(["-y", &params.to_string(), "-k", "python3"])
            // The kernel starts in notebooks/, as under Jupyter, so the notebook's
            // default relative paths mean the same thing here as for a person.
            .args(["--cwd", "notebooks", "--no-progress-bar"])
            // A wedged kernel should fail the test, not hang CI.
            .args(["--execution-timeout", "120"]),
    );

    for name in FIGURES {
        let path = fig_dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(bytes.starts_with(PNG_SIGNATURE), "{name} is not a PNG");
        assert!(
            bytes.len() > MIN_PNG_BYTES,
            "{name} is only {} bytes: an empty plot?",
            bytes.len()
        );
    }

    // fig_dir evidently reached the kernel; check run_dirs did too, because a
    // dropped parameter would silently plot the defaults (../out/*) if they exist.
    let printed = stream_text(&executed);
    for dir in &runs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("run dir name");
        let line = format!("{name} <- {}", dir.display());
        assert!(
            printed.contains(&line),
            "notebook did not load {}:\n{printed}",
            dir.display()
        );
    }
}

/// Everything the executed notebook's cells printed (nbformat stores stream text
/// as a string or a list of lines).
fn stream_text(notebook: &Path) -> String {
    let text = std::fs::read_to_string(notebook).expect("papermill wrote the executed notebook");
    let nb: serde_json::Value = serde_json::from_str(&text).expect("executed notebook is JSON");
    let mut printed = String::new();
    for cell in nb["cells"].as_array().into_iter().flatten() {
        for output in cell["outputs"].as_array().into_iter().flatten() {
            if output["output_type"] == "stream" {
                match &output["text"] {
                    serde_json::Value::String(s) => printed.push_str(s),
                    serde_json::Value::Array(lines) => lines
                        .iter()
                        .filter_map(|l| l.as_str())
                        .for_each(|l| printed.push_str(l)),
                    _ => {}
                }
            }
        }
    }
    printed
}
