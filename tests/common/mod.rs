//! Helpers shared by the integration tests that drive the real `tomo`
//! binary. Each test file uses a different subset, hence the `dead_code`
//! allowance.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `tomo` binary built for this test run.
pub fn tomo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tomo"))
        .args(args)
        .output()
        .expect("run the tomo binary")
}

/// Runs `tomo args`, fails the test with its stderr unless it succeeds, and
/// returns its stdout.
pub fn tomo_ok(args: &[&str]) -> String {
    let out = tomo(args);
    assert!(
        out.status.success(),
        "tomo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs `tomo args`, asserts it fails (argument errors from clap included)
/// and returns its stderr.
pub fn tomo_err(args: &[&str]) -> String {
    let out = tomo(args);
    assert!(
        !out.status.success(),
        "tomo {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Like [`tomo_err`], and also asserts it failed the way a user error
/// should: a `tomo:` message and no panic.
pub fn tomo_fails_cleanly(args: &[&str]) -> String {
    let stderr = tomo_err(args);
    assert!(
        stderr.starts_with("tomo:"),
        "tomo {args:?}: stderr should start with `tomo:`: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "tomo {args:?} panicked: {stderr}"
    );
    stderr
}

/// A temp path as `&str` for command lines.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Writes a synthetic `kind` dataset of `nodes` nodes to `path`.
pub fn gen_dataset(kind: &str, nodes: usize, path: &Path) {
    tomo_ok(&[
        "dataset",
        "gen",
        kind,
        "--nodes",
        &nodes.to_string(),
        "-o",
        path_str(path),
    ]);
}
