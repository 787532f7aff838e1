//! Topology datasets: RTT matrices and time series, their parsers and
//! writers, summary statistics, and synthetic generators.
//!
//! Formats read (all from bytes; the caller opens files):
//!
//! * `ltm v1` dense matrices (`../shared/datasets/README.md`): `#` header
//!   lines (`# units: ms|us|s` sets the scale), then N rows of N values;
//!   `-1`, `0` off the diagonal or non-numbers mean missing. Also any
//!   King/p2psim-style whitespace (or comma) separated N×N matrix, with an
//!   optional leading label column, scaled by `scale` to milliseconds.
//! * `ltm v1` series: the same header, then blocks `@slice t` + N rows.
//! * Triples: `i j rtt` lines; repeated samples of a pair are reduced to their
//!   median.
//!
//! gzip input is recognised by its magic bytes. Values are milliseconds.
//! Parsing mirrors the serf peer harness so both engines see identical data.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::stats::quantile_sorted;

/// `ltm` files keep 3 decimals, so each side of a triangle may be off by
/// 0.5 µs: a triangle-inequality "violation" within 2 µs is rounding, not
/// routing.
const TIV_SLACK_MS: f64 = 2e-3;

/// Marks a missing RTT in [`Matrix::rtt`].
pub const MISSING: f64 = -1.0;

/// What can go wrong reading or generating a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The bytes are not valid gzip or UTF-8.
    #[error("cannot decode input: {0}")]
    Decode(String),
    /// The text does not have the expected shape.
    #[error("{0}")]
    Format(String),
    /// A generator was asked for something it cannot make.
    #[error("generator: {0}")]
    Generator(String),
}

/// An RTT matrix in milliseconds, row = source, column = destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Number of nodes.
    pub n: usize,
    /// Row-major `n × n` RTTs in ms; values `<= 0` are missing.
    pub rtt: Vec<f64>,
    /// Index of each node in the input as read (before truncation or
    /// dropping), used to find the node's rows in a matching series.
    pub orig: Vec<usize>,
    /// Optional datacenter / region label per node.
    pub labels: Option<Vec<String>>,
}

impl Matrix {
    /// A matrix with every entry missing.
    pub fn empty(n: usize) -> Self {
        Matrix {
            n,
            rtt: vec![MISSING; n * n],
            orig: (0..n).collect(),
            labels: None,
        }
    }

    /// RTT from `i` to `j` in ms (`<= 0` = missing).
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.rtt[i * self.n + j]
    }

    /// Sets both directions of a pair.
    #[inline]
    pub fn set_sym(&mut self, i: usize, j: usize, v: f64) {
        self.rtt[i * self.n + j] = v;
        self.rtt[j * self.n + i] = v;
    }

    /// Merges the two directions of every pair (mean when both are known,
    /// else whichever is) and marks the diagonal missing, as the serf
    /// harness does.
    pub fn symmetrize(&mut self) {
        let n = self.n;
        for i in 0..n {
            self.rtt[i * n + i] = MISSING;
            for j in i + 1..n {
                let (x, y) = (self.rtt[i * n + j], self.rtt[j * n + i]);
                let v = match (x > 0.0, y > 0.0) {
                    (true, true) => (x + y) / 2.0,
                    (true, false) => x,
                    (false, true) => y,
                    _ => MISSING,
                };
                self.set_sym(i, j, v);
            }
        }
    }

    /// Keeps only the first `k` nodes (no-op for `k == 0` or `k >= n`).
    pub fn truncate(&mut self, k: usize) {
        if k == 0 || k >= self.n {
            return;
        }
        self.select(&(0..k).collect::<Vec<_>>());
    }

    /// Keeps the listed nodes, in that order.
    fn select(&mut self, keep: &[usize]) {
        let k = keep.len();
        let mut a = vec![MISSING; k * k];
        for (x, &i) in keep.iter().enumerate() {
            for (y, &j) in keep.iter().enumerate() {
                a[x * k + y] = self.at(i, j);
            }
        }
        self.orig = keep.iter().map(|&i| self.orig[i]).collect();
        self.labels = self
            .labels
            .take()
            .map(|l| keep.iter().map(|&i| l[i].clone()).collect());
        self.rtt = a;
        self.n = k;
    }

    /// Drops nodes with fewer than `min_known` known peers; returns how many.
    pub fn drop_isolated(&mut self, min_known: usize) -> usize {
        let keep: Vec<usize> = (0..self.n)
            .filter(|&i| {
                (0..self.n)
                    .filter(|&j| j != i && self.at(i, j) > 0.0)
                    .count()
                    >= min_known
            })
            .collect();
        let dropped = self.n - keep.len();
        if dropped > 0 {
            self.select(&keep);
        }
        dropped
    }

    /// Number of unordered pairs with a known RTT (after symmetrizing).
    pub fn known_pairs(&self) -> usize {
        let mut c = 0;
        for i in 0..self.n {
            for j in i + 1..self.n {
                if self.at(i, j) > 0.0 || self.at(j, i) > 0.0 {
                    c += 1;
                }
            }
        }
        c
    }
}

/// A time series of RTT matrices (`@slice` blocks), ms, `<= 0` = missing.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Nodes per slice.
    pub n: usize,
    /// One row-major `n × n` matrix per slice.
    pub slices: Vec<Vec<f32>>,
}

impl Series {
    /// Sample from `i` to `j` in slice `t` (`<= 0` = missing).
    #[inline]
    pub fn at(&self, t: usize, i: usize, j: usize) -> f32 {
        self.slices[t][i * self.n + j]
    }

    /// The per-pair median over slices (both directions kept apart), as
    /// the shared `*.median.ltm` files were made.
    pub fn median_matrix(&self) -> Matrix {
        let mut m = Matrix::empty(self.n);
        let mut buf = Vec::with_capacity(self.slices.len());
        for i in 0..self.n {
            for j in 0..self.n {
                if i == j {
                    m.rtt[i * self.n + j] = 0.0;
                    continue;
                }
                buf.clear();
                buf.extend(
                    self.slices
                        .iter()
                        .map(|s| s[i * self.n + j] as f64)
                        .filter(|v| *v > 0.0),
                );
                if !buf.is_empty() {
                    buf.sort_by(f64::total_cmp);
                    m.rtt[i * self.n + j] = buf[buf.len() / 2];
                }
            }
        }
        m
    }
}

/// Returns the bytes as text, gunzipping them first if they start with the
/// gzip magic.
pub fn decode_text(bytes: &[u8]) -> Result<String, DatasetError> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut s = String::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_string(&mut s)
            .map_err(|e| DatasetError::Decode(format!("gzip: {e}")))?;
        Ok(s)
    } else {
        String::from_utf8(bytes.to_vec()).map_err(|e| DatasetError::Decode(format!("utf-8: {e}")))
    }
}

fn split_fields(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|s| !s.is_empty())
}

fn parse_val(s: &str) -> f64 {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => v,
        _ => MISSING,
    }
}

/// Scale given by an `ltm` `# units:` header line, if this is one.
fn units_scale(line: &str) -> Option<f64> {
    let h = line.trim_start_matches('#').trim();
    let u = h.strip_prefix("units:")?.trim();
    match u {
        "ms" => Some(1.0),
        "us" | "µs" => Some(0.001),
        "s" => Some(1000.0),
        _ => None,
    }
}

/// Parses a dense matrix (`ltm v1` or King-style). `scale` multiplies values
/// to get ms; `None` means 1 unless an `ltm` `# units:` header says otherwise.
pub fn parse_dense(text: &str, scale: Option<f64>) -> Result<Matrix, DatasetError> {
    let mut s = scale.unwrap_or(1.0);
    let mut rows: Vec<Vec<f64>> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            if scale.is_none()
                && let Some(u) = units_scale(line)
            {
                s = u;
            }
            continue;
        }
        if line.is_empty() || line.starts_with('%') || line.starts_with('@') {
            continue;
        }
        rows.push(
            split_fields(line)
                .map(|f| {
                    let v = parse_val(f);
                    if v > 0.0 { v * s } else { v }
                })
                .collect(),
        );
    }
    let n = rows.len();
    if n == 0 {
        return Err(DatasetError::Format("dense: no rows".into()));
    }
    let mut a = Vec::with_capacity(n * n);
    for (i, row) in rows.iter().enumerate() {
        if row.len() == n {
            a.extend_from_slice(row);
        } else if row.len() == n + 1 {
            a.extend_from_slice(&row[1..]);
        } else {
            return Err(DatasetError::Format(format!(
                "dense: row {} has {} fields, expected {n}",
                i + 1,
                row.len()
            )));
        }
    }
    Ok(Matrix {
        n,
        rtt: a,
        orig: (0..n).collect(),
        labels: None,
    })
}

/// Parses an `ltm v1` series (`@slice t` blocks of N rows).
pub fn parse_series(text: &str, scale: Option<f64>) -> Result<Series, DatasetError> {
    let mut s = scale.unwrap_or(1.0);
    let mut slices: Vec<Vec<f32>> = Vec::new();
    let mut cur: Option<Vec<f32>> = None;
    let mut n: Option<usize> = None;
    let mut flush =
        |cur: &mut Option<Vec<f32>>, slices: &mut Vec<Vec<f32>>| -> Result<(), DatasetError> {
            if let Some(c) = cur.take() {
                let nn = *n.get_or_insert_with(|| (c.len() as f64).sqrt().round() as usize);
                if c.len() != nn * nn || nn == 0 {
                    return Err(DatasetError::Format(format!(
                        "series: slice {} has {} values, expected {}",
                        slices.len() + 1,
                        c.len(),
                        nn * nn
                    )));
                }
                slices.push(c);
            }
            Ok(())
        };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            if scale.is_none()
                && let Some(u) = units_scale(line)
            {
                s = u;
            }
            continue;
        }
        if line.is_empty() || line.starts_with('%') {
            continue;
        }
        if line.starts_with('@') {
            flush(&mut cur, &mut slices)?;
            cur = Some(Vec::new());
            continue;
        }
        let c = cur.get_or_insert_with(Vec::new);
        for f in split_fields(line) {
            let v = parse_val(f);
            c.push(if v > 0.0 { (v * s) as f32 } else { v as f32 });
        }
    }
    flush(&mut cur, &mut slices)?;
    let Some(n) = n else {
        return Err(DatasetError::Format("series: no slices".into()));
    };
    Ok(Series { n, slices })
}

/// Parses `i j rtt` triples. Ids are arbitrary tokens numbered in order of
/// first appearance; repeated samples of a pair (either direction) become
/// their median.
pub fn parse_triples(text: &str, scale: Option<f64>) -> Result<Matrix, DatasetError> {
    let s = scale.unwrap_or(1.0);
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut ids: Vec<String> = Vec::new();
    let mut id = |t: &str, ids: &mut Vec<String>| -> usize {
        if let Some(&k) = index.get(t) {
            return k;
        }
        index.insert(t.to_string(), ids.len());
        ids.push(t.to_string());
        ids.len() - 1
    };
    let mut samples: HashMap<(usize, usize), Vec<f64>> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('%') {
            continue;
        }
        let f: Vec<&str> = split_fields(line).collect();
        if f.len() < 3 {
            continue;
        }
        let v = parse_val(f[2]);
        let (a, b) = (id(f[0], &mut ids), id(f[1], &mut ids));
        if v <= 0.0 || a == b {
            continue;
        }
        samples.entry((a.min(b), a.max(b))).or_default().push(v * s);
    }
    let n = ids.len();
    if n == 0 {
        return Err(DatasetError::Format("triples: no data".into()));
    }
    let mut m = Matrix::empty(n);
    for ((a, b), mut v) in samples {
        v.sort_by(f64::total_cmp);
        m.set_sym(a, b, v[v.len() / 2]);
    }
    Ok(m)
}

/// Input formats [`parse_matrix`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `ltm v1` or any dense N×N matrix.
    Dense,
    /// `i j rtt` lines.
    Triples,
}

impl std::str::FromStr for Format {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dense" | "ltm" | "king" => Ok(Format::Dense),
            "triples" => Ok(Format::Triples),
            o => Err(DatasetError::Format(format!(
                "unknown format {o:?} (ltm|dense|king|triples)"
            ))),
        }
    }
}

/// Parses matrix bytes (gzip or plain). A series file given as a matrix is
/// reduced to its per-pair median.
pub fn parse_matrix(
    bytes: &[u8],
    format: Format,
    scale: Option<f64>,
) -> Result<Matrix, DatasetError> {
    let text = decode_text(bytes)?;
    match format {
        Format::Triples => parse_triples(&text, scale),
        Format::Dense if text.lines().any(|l| l.starts_with("@slice")) => {
            Ok(parse_series(&text, scale)?.median_matrix())
        }
        Format::Dense => parse_dense(&text, scale),
    }
}

/// Reads datacenter/region labels from a `*.nodes.csv` (header with
/// `index` and one of `dc`, `datacenter`, `region`, `continent`).
pub fn parse_labels(csv: &str, n: usize) -> Option<Vec<String>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let idx = header.iter().position(|h| *h == "index")?;
    let col = ["dc", "datacenter", "continent", "region"]
        .iter()
        .find_map(|c| header.iter().position(|h| h == c))?;
    let mut labels = vec![String::new(); n];
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        let (Some(i), Some(v)) = (
            f.get(idx).and_then(|s| s.trim().parse::<usize>().ok()),
            f.get(col),
        ) else {
            continue;
        };
        if i < n {
            labels[i] = v.trim().to_string();
        }
    }
    Some(labels)
}

/// Summary of a matrix (`tomo dataset info`).
#[derive(Debug, Clone, Serialize)]
pub struct Info {
    /// Nodes.
    pub nodes: usize,
    /// Fraction of off-diagonal directed entries that are missing.
    pub missing_fraction: f64,
    /// RTT quantiles over present off-diagonal entries, ms:
    /// min, p10, p50, p90, p99, max.
    pub rtt_ms: RttQuantiles,
    /// Fraction of sampled triples (all sides known, symmetrized) whose
    /// longest side exceeds the sum of the other two.
    pub tiv_fraction: f64,
    /// Triples sampled for the TIV fraction.
    pub tiv_triples: usize,
    /// Median relative difference between the two directions of a pair.
    pub asymmetry_median: f64,
}

/// RTT quantiles in ms.
#[derive(Debug, Clone, Serialize)]
pub struct RttQuantiles {
    /// Minimum.
    pub min: f64,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// Computes [`Info`]; the TIV fraction samples `triples` random triples
/// with the given seed.
pub fn info(m: &Matrix, triples: usize, seed: u64) -> Info {
    let n = m.n;
    let mut vals = Vec::new();
    let mut asym = Vec::new();
    let mut missing = 0usize;
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let v = m.at(i, j);
            if v > 0.0 {
                vals.push(v);
                if j > i && m.at(j, i) > 0.0 {
                    let w = m.at(j, i);
                    asym.push((v - w).abs() / v.min(w));
                }
            } else {
                missing += 1;
            }
        }
    }
    vals.sort_by(f64::total_cmp);
    asym.sort_by(f64::total_cmp);
    let mut sym = m.clone();
    sym.symmetrize();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut tiv, mut tried) = (0usize, 0usize);
    if n >= 3 {
        let mut attempts = 0usize;
        while tried < triples && attempts < triples * 20 {
            attempts += 1;
            let a = rng.random_range(0..n);
            let b = rng.random_range(0..n);
            let c = rng.random_range(0..n);
            if a == b || b == c || a == c {
                continue;
            }
            let (x, y, z) = (sym.at(a, b), sym.at(b, c), sym.at(a, c));
            if x <= 0.0 || y <= 0.0 || z <= 0.0 {
                continue;
            }
            tried += 1;
            let mx = x.max(y).max(z);
            if mx > x + y + z - mx + TIV_SLACK_MS {
                tiv += 1;
            }
        }
    }
    let q = |p: f64| quantile_sorted(&vals, p);
    Info {
        nodes: n,
        missing_fraction: if n > 1 {
            missing as f64 / (n * (n - 1)) as f64
        } else {
            0.0
        },
        rtt_ms: RttQuantiles {
            min: vals.first().copied().unwrap_or(f64::NAN),
            p10: q(0.1),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: vals.last().copied().unwrap_or(f64::NAN),
        },
        tiv_fraction: if tried > 0 {
            tiv as f64 / tried as f64
        } else {
            0.0
        },
        tiv_triples: tried,
        asymmetry_median: quantile_sorted(&asym, 0.5),
    }
}

/// Writes a matrix as `ltm v1` text. `comments` become `#` lines.
pub fn to_ltm(m: &Matrix, name: &str, comments: &[String]) -> String {
    let mut s = header(m.n, name, comments);
    write_rows(&mut s, m.n, |i, j| m.at(i, j));
    s
}

/// Writes a series as `ltm v1` series text.
pub fn series_to_ltm(series: &Series, name: &str, comments: &[String]) -> String {
    let mut s = header(series.n, name, comments);
    let _ = writeln!(s, "# slices: {}", series.slices.len());
    for (t, sl) in series.slices.iter().enumerate() {
        let _ = writeln!(s, "@slice {}", t + 1);
        write_rows(&mut s, series.n, |i, j| sl[i * series.n + j] as f64);
    }
    s
}

fn header(n: usize, name: &str, comments: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# ltm v1");
    let _ = writeln!(s, "# name: {name}");
    let _ = writeln!(s, "# nodes: {n}");
    let _ = writeln!(s, "# units: ms");
    let _ = writeln!(s, "# missing: -1");
    let _ = writeln!(s, "# directed: yes (row = source, column = destination)");
    for c in comments {
        let _ = writeln!(s, "# {c}");
    }
    s
}

fn write_rows(s: &mut String, n: usize, at: impl Fn(usize, usize) -> f64) {
    for i in 0..n {
        for j in 0..n {
            if j > 0 {
                s.push(' ');
            }
            let v = at(i, j);
            if i == j {
                s.push('0');
            } else if v > 0.0 {
                let _ = write!(s, "{}", (v * 1000.0).round() / 1000.0);
            } else {
                s.push_str("-1");
            }
        }
        s.push('\n');
    }
}

/// Synthetic topology kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synthetic {
    /// Nodes on a line, 10 ms apart (serf phantom).
    Line,
    /// A ⌊√n⌋-wide grid, 10 ms spacing (serf phantom).
    Grid,
    /// Two 1 ms LANs joined by a 10 ms WAN hop (serf phantom).
    Split,
    /// n−1 nodes on a 100 ms circle, node 0 at 200 ms from all (serf phantom).
    Circle,
    /// i.i.d. N(100 ms, 10 ms) RTTs (serf phantom).
    Random,
    /// Internet-like: metros at real coordinates, fibre RTT over
    /// great-circle distance, route inflation, access delays, TIVs.
    Geo,
}

impl std::str::FromStr for Synthetic {
    type Err = DatasetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "line" => Synthetic::Line,
            "grid" => Synthetic::Grid,
            "split" => Synthetic::Split,
            "circle" => Synthetic::Circle,
            "random" => Synthetic::Random,
            "geo" => Synthetic::Geo,
            o => {
                return Err(DatasetError::Generator(format!(
                    "unknown kind {o:?} (line|grid|split|circle|random|geo)"
                )));
            }
        })
    }
}

impl Synthetic {
    /// Default node count (serf's phantom sizes; geo 300).
    pub fn default_nodes(self) -> usize {
        match self {
            Synthetic::Line => 10,
            Synthetic::Geo => 300,
            _ => 25,
        }
    }

    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Synthetic::Line => "line",
            Synthetic::Grid => "grid",
            Synthetic::Split => "split",
            Synthetic::Circle => "circle",
            Synthetic::Random => "random",
            Synthetic::Geo => "geo",
        }
    }
}

/// Options for the geo generator.
#[derive(Debug, Clone, Serialize)]
pub struct GeoOptions {
    /// Log-sd of the per-pair route inflation (0 = none, no TIVs from it).
    pub sigma: f64,
    /// Median route inflation over the great-circle fibre path.
    pub inflation: f64,
    /// Spread of nodes around their metro, degrees.
    pub spread_deg: f64,
    /// Mean of the exponential part of the per-node access delay, ms.
    pub access_mean_ms: f64,
    /// Time slices of per-sample jitter to generate (0 = none).
    pub slices: usize,
    /// Multiplicative one-sided jitter of the slices (queueing).
    pub jitter: f64,
    /// Probability that a sample is a congestion spike (×2–10).
    pub spike_prob: f64,
}

impl Default for GeoOptions {
    fn default() -> Self {
        GeoOptions {
            sigma: 0.15,
            inflation: 1.6,
            spread_deg: 1.5,
            access_mean_ms: 4.0,
            slices: 0,
            jitter: 0.1,
            spike_prob: 0.01,
        }
    }
}

/// Metros of the geo model: (name, datacenter label, latitude, longitude).
pub const METROS: &[(&str, &str, f64, f64)] = &[
    ("new-york", "us-east", 40.71, -74.01),
    ("ashburn", "us-east", 39.04, -77.49),
    ("chicago", "us-central", 41.88, -87.63),
    ("dallas", "us-central", 32.78, -96.80),
    ("san-francisco", "us-west", 37.77, -122.42),
    ("seattle", "us-west", 47.61, -122.33),
    ("sao-paulo", "sa-east", -23.55, -46.63),
    ("london", "eu-west", 51.51, -0.13),
    ("paris", "eu-west", 48.86, 2.35),
    ("frankfurt", "eu-central", 50.11, 8.68),
    ("stockholm", "eu-north", 59.33, 18.07),
    ("johannesburg", "af-south", -26.20, 28.05),
    ("dubai", "me-central", 25.20, 55.27),
    ("mumbai", "ap-south", 19.08, 72.88),
    ("singapore", "ap-southeast", 1.35, 103.82),
    ("hong-kong", "ap-east", 22.32, 114.17),
    ("tokyo", "ap-northeast", 35.68, 139.69),
    ("seoul", "ap-northeast", 37.57, 126.98),
    ("sydney", "ap-oceania", -33.87, 151.21),
    ("auckland", "ap-oceania", -36.85, 174.76),
];

/// A generated topology.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The (symmetric) RTT matrix.
    pub matrix: Matrix,
    /// Per-sample jitter series (geo with `slices > 0`).
    pub series: Option<Series>,
    /// Per-node metro name, latitude and longitude (geo only).
    pub places: Option<Vec<(String, f64, f64)>>,
}

/// Standard normal from two uniforms (Box–Muller).
pub(crate) fn normal<R: rand::Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Exponential with mean 1.
pub(crate) fn exp1<R: rand::Rng + ?Sized>(rng: &mut R) -> f64 {
    -(1.0 - rng.random::<f64>()).ln()
}

/// Great-circle distance in km.
pub fn great_circle_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let r = std::f64::consts::PI / 180.0;
    let (p1, p2) = (lat1 * r, lat2 * r);
    let dl = (lon2 - lon1) * r;
    let c = p1.sin() * p2.sin() + p1.cos() * p2.cos() * dl.cos();
    6371.0 * c.clamp(-1.0, 1.0).acos()
}

/// Generates a synthetic topology with `n` nodes.
pub fn generate(
    kind: Synthetic,
    n: usize,
    seed: u64,
    geo: &GeoOptions,
) -> Result<Generated, DatasetError> {
    if n < 2 {
        return Err(DatasetError::Generator("need at least 2 nodes".into()));
    }
    if n > 50_000 {
        return Err(DatasetError::Generator(format!(
            "{n} nodes would need {} GiB for the matrix; the limit is 50000",
            (n * n * 8) >> 30
        )));
    }
    let mut m = Matrix::empty(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut places = None;
    let mut series = None;
    match kind {
        Synthetic::Line => {
            for i in 0..n {
                for j in i + 1..n {
                    m.set_sym(i, j, (j - i) as f64 * 10.0);
                }
            }
        }
        Synthetic::Grid => {
            let s = ((n as f64).sqrt() as usize).max(1);
            for i in 0..n {
                for j in i + 1..n {
                    let dx = (j % s) as f64 - (i % s) as f64;
                    let dy = (j / s) as f64 - (i / s) as f64;
                    m.set_sym(i, j, 10.0 * dx.hypot(dy));
                }
            }
        }
        Synthetic::Split => {
            let half = n / 2;
            for i in 0..n {
                for j in i + 1..n {
                    let wan = (i <= half) != (j <= half);
                    m.set_sym(i, j, if wan { 11.0 } else { 1.0 });
                }
            }
        }
        Synthetic::Circle => {
            let radius = 100.0;
            for i in 0..n {
                for j in i + 1..n {
                    if i == 0 {
                        m.set_sym(i, j, 2.0 * radius);
                        continue;
                    }
                    let t = |k: usize| 2.0 * std::f64::consts::PI * k as f64 / n as f64;
                    let (t1, t2) = (t(i), t(j));
                    m.set_sym(
                        i,
                        j,
                        radius * (t2.cos() - t1.cos()).hypot(t2.sin() - t1.sin()),
                    );
                }
            }
        }
        Synthetic::Random => {
            for i in 0..n {
                for j in i + 1..n {
                    m.set_sym(i, j, (normal(&mut rng) * 10.0 + 100.0).max(1.0));
                }
            }
        }
        Synthetic::Geo => {
            let mut lat = vec![0.0; n];
            let mut lon = vec![0.0; n];
            let mut acc = vec![0.0; n];
            let mut labels = Vec::with_capacity(n);
            let mut pl = Vec::with_capacity(n);
            for i in 0..n {
                let (name, dc, la, lo) = METROS[rng.random_range(0..METROS.len())];
                lat[i] = (la + normal(&mut rng) * geo.spread_deg).clamp(-89.0, 89.0);
                lon[i] = lo + normal(&mut rng) * geo.spread_deg;
                acc[i] = 1.0 + exp1(&mut rng) * geo.access_mean_ms;
                labels.push(dc.to_string());
                pl.push((name.to_string(), lat[i], lon[i]));
            }
            let ln_infl = geo.inflation.max(1.0).ln();
            for i in 0..n {
                for j in i + 1..n {
                    let km = great_circle_km(lat[i], lon[i], lat[j], lon[j]);
                    // Light in fibre covers ~200 km per ms one way: 100 km per
                    // ms of RTT. Per-pair inflation makes TIVs.
                    let infl = (ln_infl + geo.sigma * normal(&mut rng)).exp().max(1.0);
                    m.set_sym(i, j, km / 100.0 * infl + acc[i] + acc[j]);
                }
            }
            m.labels = Some(labels);
            places = Some(pl);
            if geo.slices > 0 {
                let mut slices = Vec::with_capacity(geo.slices);
                for _ in 0..geo.slices {
                    let mut s = vec![0f32; n * n];
                    for i in 0..n {
                        for j in 0..n {
                            if i == j {
                                continue;
                            }
                            let base = m.at(i, j);
                            let mut v = base * (1.0 + geo.jitter * normal(&mut rng).abs());
                            if rng.random::<f64>() < geo.spike_prob {
                                v *= 2.0 + 8.0 * rng.random::<f64>();
                            }
                            s[i * n + j] = v as f32;
                        }
                    }
                    slices.push(s);
                }
                series = Some(Series { n, slices });
            }
        }
    }
    for i in 0..n {
        m.rtt[i * n + i] = 0.0;
    }
    Ok(Generated {
        matrix: m,
        series,
        places,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ltm_with_units_and_missing() {
        let t = "# ltm v1\n# units: s\n0 0.01 -1\n0.02 0 0.03\nx 0.03 0\n";
        let m = parse_dense(t, None).unwrap();
        assert_eq!(m.n, 3);
        assert_eq!(m.at(0, 1), 10.0);
        assert!(m.at(0, 2) < 0.0 && m.at(2, 0) < 0.0);
        let mut s = m.clone();
        s.symmetrize();
        assert_eq!(s.at(0, 1), 15.0);
        assert_eq!(s.at(1, 2), 30.0);
        assert!(s.at(0, 2) < 0.0);
    }

    #[test]
    fn explicit_scale_overrides_units_and_label_column_is_tolerated() {
        let t = "# units: s\na 0 1000\nb 1000 0\n";
        let m = parse_dense(t, Some(0.001)).unwrap();
        assert_eq!(m.at(0, 1), 1.0);
    }

    #[test]
    fn ragged_rows_are_an_error() {
        assert!(parse_dense("0 1\n1 0 3 4\n", None).is_err());
        assert!(parse_dense("# only comments\n", None).is_err());
    }

    #[test]
    fn series_and_triples() {
        let t = "# ltm v1\n# slices: 2\n@slice 1\n0 10\n20 0\n@slice 2\n0 30\n-1 0\n";
        let s = parse_series(t, None).unwrap();
        assert_eq!((s.n, s.slices.len()), (2, 2));
        assert_eq!(s.at(1, 0, 1), 30.0);
        let med = s.median_matrix();
        assert_eq!(med.at(0, 1), 30.0); // upper median of 10, 30
        assert_eq!(med.at(1, 0), 20.0);
        let tr = parse_triples("a b 10\nb a 30\na b 20\nc a -1\n", None).unwrap();
        assert_eq!(tr.n, 3);
        assert_eq!(tr.at(0, 1), 20.0);
        assert!(tr.at(0, 2) < 0.0);
        assert!(parse_series("0 1\n1 0 5\n", None).is_err());
    }

    #[test]
    fn ltm_round_trips_through_gzip() {
        let g = generate(Synthetic::Geo, 12, 3, &GeoOptions::default()).unwrap();
        let text = to_ltm(&g.matrix, "geo12", &["test".into()]);
        let mut gz = Vec::new();
        {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap();
        }
        let back = parse_matrix(&gz, Format::Dense, None).unwrap();
        assert_eq!(back.n, 12);
        for i in 0..12 {
            for j in 0..12 {
                if i != j {
                    assert!((back.at(i, j) - g.matrix.at(i, j)).abs() < 1e-3);
                }
            }
        }
    }

    #[test]
    fn geo_has_tivs_and_labels_and_is_deterministic() {
        let a = generate(Synthetic::Geo, 200, 9, &GeoOptions::default()).unwrap();
        let b = generate(Synthetic::Geo, 200, 9, &GeoOptions::default()).unwrap();
        assert_eq!(a.matrix, b.matrix);
        let inf = info(&a.matrix, 20_000, 1);
        assert!(inf.tiv_fraction > 0.001, "tiv {}", inf.tiv_fraction);
        assert_eq!(inf.missing_fraction, 0.0);
        assert!(inf.rtt_ms.min >= 2.0);
        assert_eq!(a.matrix.labels.as_ref().unwrap().len(), 200);
        let line = generate(Synthetic::Line, 10, 1, &GeoOptions::default()).unwrap();
        assert_eq!(info(&line.matrix, 1000, 1).tiv_fraction, 0.0);
        assert_eq!(line.matrix.at(0, 9), 90.0);
    }

    #[test]
    fn drop_isolated_and_truncate_keep_orig() {
        let mut m = parse_dense("0 1 -1\n1 0 -1\n-1 -1 0\n", None).unwrap();
        m.symmetrize();
        assert_eq!(m.drop_isolated(1), 1);
        assert_eq!(m.n, 2);
        assert_eq!(m.orig, vec![0, 1]);
        m.truncate(1);
        assert_eq!(m.n, 1);
    }
}
