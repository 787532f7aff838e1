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

/// A loopback UDP port that was free a moment ago (for a child process's
/// `-serf-lan-port`).
pub fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback port that was free a moment ago for both UDP and TCP (a DNS
/// server takes both).
pub fn free_udp_tcp() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP answer: status, headers (names lowercased), body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 request to 127.0.0.1:`port`, read to the end, waiting
/// up to `timeout` for the answer.
pub fn http_full(
    method: &str,
    port: u16,
    path: &str,
    body: &str,
    timeout: std::time::Duration,
) -> Option<Answer> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A raw HTTP/1.1 request with a body; returns (status, body).
pub fn http_body(method: &str, port: u16, path: &str, body: &str) -> Option<(u16, String)> {
    let a = http_full(method, port, path, body, std::time::Duration::from_secs(5))?;
    Some((a.status, a.body))
}

/// A raw HTTP/1.1 request; returns (status, body).
pub fn http(method: &str, port: u16, path: &str) -> Option<(u16, String)> {
    http_body(method, port, path, "")
}

/// GET `path` as JSON, if it answers 200.
pub fn json(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = http("GET", port, path)?;
    (status == 200)
        .then(|| serde_json::from_str(&body).ok())
        .flatten()
}
