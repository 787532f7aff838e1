//! `tomo demo` as the README runs it: agents in one process on loopback,
//! links delayed by a dataset's RTTs, a convergence table on stdout, and
//! the Consul coordinate API answering while it runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::tomo;

/// The dataset the README's demo uses, from the repository.
const GEO60: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/datasets/geo60.ltm");

/// `GET path` on `addr` (host:port); the response body.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn demo_converges_and_serves_the_coordinate_api() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tomo"))
        .args([
            "demo",
            "--dataset",
            GEO60,
            "--nodes",
            "6",
            "--probe-interval",
            "700ms",
            "--duration",
            "16s",
            "--every",
            "4",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tomo demo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The agents' addresses come first: `node-i  http://ADDR  gossip ADDR`.
    let mut http = Vec::new();
    let mut table = Vec::new();
    let mut asked = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [name, url, "gossip", _] = words[..]
            && name.starts_with("node-")
        {
            http.push(url.trim_start_matches("http://").to_string());
        }
        // A table row: time, members, median, p90.
        if let [t, members, median, _p90] = words[..]
            && let (Some(t), Ok(members), Ok(median)) = (
                t.strip_suffix('s').and_then(|t| t.parse::<u64>().ok()),
                members.parse::<usize>(),
                median.parse::<f64>(),
            )
        {
            table.push((t, members, median));
            // While it runs, the API answers with every member's coordinate
            // once each has published.
            if !asked && t >= 12 {
                asked = true;
                let body = get(&http[0], "/v1/coordinate/nodes").expect("coordinate/nodes");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let nodes = v.as_array().unwrap();
                assert_eq!(nodes.len(), 6, "{body}");
                assert!(
                    nodes
                        .iter()
                        .all(|e| e["Coord"]["Vec"].as_array().unwrap().len() == 8)
                );
                let members = get(&http[3], "/v1/agent/members").expect("agent/members");
                let v: serde_json::Value = serde_json::from_str(&members).unwrap();
                assert!(
                    v.as_array().unwrap().iter().all(|m| m["Status"] == 1),
                    "{members}"
                );
            }
        }
    }
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(http.len(), 6, "agent addresses");
    assert!(asked, "the table never reached 12 s: {table:?}");
    assert!(table.len() >= 4, "{table:?}");
    // Everyone sees everyone the whole time, and the estimates improve.
    assert!(table.iter().all(|r| r.1 == 6), "{table:?}");
    let (first, last) = (table[0].2, table.last().unwrap().2);
    assert!(last < first, "{table:?}");
    assert!(last < 0.25, "{table:?}");
}

#[test]
fn demo_warns_when_probes_cannot_fit_the_links() {
    let out = tomo(&[
        "demo",
        "--dataset",
        GEO60,
        "--nodes",
        "4",
        "--probe-interval",
        "100ms",
        "--duration",
        "1s",
        "--every",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the probe timeout (50 ms"),
        "{stderr}"
    );
    assert!(stderr.contains("use --probe-interval"), "{stderr}");
}
