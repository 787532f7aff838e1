//! `tomo plot`: PNG and SVG figures of simulator runs and RTT datasets.
//!
//! Every figure reads the files `tomo sim --out DIR` writes (`run.json`,
//! `pairs.csv`, `coords.csv`, `rounds.csv`, and `tail_pairs.csv` when the
//! run had `--observe`) and, for the heatmap, also a plain dataset file.
//! Loading and drawing are separate steps: the inputs are parsed into a
//! figure value first, so every file problem is a
//! [`PlotError`] naming the file before anything is drawn, and the drawing
//! code is generic over the plotters backend so PNG and SVG share it.
//!
//! Kinds:
//!
//! - `cdf`: CDF of per-pair relative error, one curve per input.
//! - `convergence`: median (and optionally p90) relative error per round.
//! - `scatter`: predicted vs measured RTT per pair, log-log, with `y = x`.
//! - `map`: the coordinates projected on their top two principal components.
//! - `heatmap`: the RTT matrix as a colour grid with a colour scale.
//! - `calibration`: how well the predicted per-pair p99 fits the observed
//!   series: predicted vs actual p99 per pair, and the CDF over pairs of the
//!   share of samples above the predicted p99.
//!
//! Text is rendered through plotters' `ttf` feature, which finds a system
//! sans-serif font with fontconfig (DejaVu Sans on Debian/Ubuntu).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::dataset::{self, DatasetError, Format};
use crate::stats;

/// What can go wrong drawing a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// An input path does not exist.
    #[error("input {0} does not exist")]
    MissingInput(PathBuf),
    /// An input that must be a `tomo sim --out` directory is not a directory.
    #[error(
        "{0} is not a directory written by `tomo sim --out` (only heatmap also takes a dataset file)"
    )]
    NotSimDir(PathBuf),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file was read but its content is not what `tomo sim --out` writes.
    #[error("{path}: {msg}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where it helps.
        msg: String,
    },
    /// A dataset file given to `heatmap` could not be parsed.
    #[error("{path}: {source}")]
    Dataset {
        /// The dataset file.
        path: PathBuf,
        /// The parser's complaint.
        source: DatasetError,
    },
    /// A calibration plot was asked of a run without per-pair tail scores.
    #[error(
        "{0} does not exist: the calibration plot needs a run made with `tomo sim --observe SERIES --out DIR`"
    )]
    NoTailPairs(PathBuf),
    /// The inputs hold nothing to draw (e.g. no pairs, no rounds).
    #[error("nothing to plot: {0}")]
    Empty(String),
    /// The arguments do not fit together.
    #[error("{0}")]
    Usage(String),
    /// The output file's extension names no supported format.
    #[error("cannot tell the image format of {0}: the output must end in .png or .svg")]
    OutputFormat(PathBuf),
    /// The output's parent directory could not be created.
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// plotters failed while drawing or writing the image.
    #[error("drawing {path}: {msg}")]
    Draw {
        /// The output file.
        path: PathBuf,
        /// plotters' message (font problems show up here too).
        msg: String,
    },
}

/// The figure kinds `tomo plot` draws.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Relative-error CDF, one curve per input.
    Cdf,
    /// Median relative error per round (rounds.csv), one line per input.
    Convergence,
    /// Predicted vs measured RTT per pair, log-log, with y = x.
    Scatter,
    /// Coordinates projected on their top two principal components.
    Map,
    /// RTT matrix as a colour grid (sim directory or dataset file); over 600
    /// nodes (SVG: 250) it is block-averaged.
    Heatmap,
    /// p99 calibration of one `tomo sim --observe` run (tail_pairs.csv):
    /// predicted vs actual p99 per pair (probed, held out, coordinate as
    /// baseline) and the CDF of each pair's share of samples above its
    /// predicted p99, with the 1 % target and the pooled rates of run.json.
    Calibration,
}

/// `tomo plot` arguments.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Figure to draw.
    #[arg(value_enum)]
    pub kind: Kind,
    /// `tomo sim --out` directories (heatmap also takes a dataset file);
    /// map and heatmap draw one panel per input; calibration takes exactly
    /// one (draw one figure per run to compare runs).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output file; `.png` or `.svg` (parent directories are created).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(200..=10_000))]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 768, value_parser = clap::value_parser!(u32).range(200..=10_000))]
    pub height: u32,
    /// Figure title (default: one per kind).
    #[arg(long)]
    pub title: Option<String>,
    /// cdf: linear x axis clipped at the largest p99 instead of a log axis.
    #[arg(long)]
    pub linear: bool,
    /// convergence: also draw the p90 relative error, dashed.
    #[arg(long)]
    pub p90: bool,
    /// heatmap: show the estimated RTTs (pairs.csv estimate_ms) instead of the measured ones.
    #[arg(long)]
    pub estimate: bool,
}

/// Draws the figure `args` asks for.
pub fn run(args: &PlotArgs) -> Result<(), PlotError> {
    // Cheap argument checks first, so a typo fails before any file is parsed.
    let format = output_format(&args.output)?;
    check_options(args)?;
    let figure = load_figure(args, format)?;
    create_parent(&args.output)?;
    render(&figure, &args.output, format, (args.width, args.height))
}

// ---------------------------------------------------------------------------
// Arguments and output
// ---------------------------------------------------------------------------

/// Image formats the output can be written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputFormat {
    Png,
    Svg,
}

/// Picks the image format from the output file's extension.
fn output_format(path: &Path) -> Result<OutputFormat, PlotError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(OutputFormat::Png),
        Some("svg") => Ok(OutputFormat::Svg),
        _ => Err(PlotError::OutputFormat(path.to_path_buf())),
    }
}

/// Rejects options given to a kind that would silently ignore them.
fn check_options(args: &PlotArgs) -> Result<(), PlotError> {
    let misplaced = [
        (args.linear, "--linear", Kind::Cdf),
        (args.p90, "--p90", Kind::Convergence),
        (args.estimate, "--estimate", Kind::Heatmap),
    ];
    for (given, flag, kind) in misplaced {
        if given && args.kind != kind {
            return Err(PlotError::Usage(format!(
                "{flag} only applies to `tomo plot {}`",
                kind_name(kind)
            )));
        }
    }
    if args.kind == Kind::Calibration && args.inputs.len() > 1 {
        return Err(PlotError::Usage(format!(
            "`tomo plot calibration` draws one run, got {} inputs: draw one figure per run",
            args.inputs.len()
        )));
    }
    Ok(())
}

/// The command-line spelling of a kind.
fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Cdf => "cdf",
        Kind::Convergence => "convergence",
        Kind::Scatter => "scatter",
        Kind::Map => "map",
        Kind::Heatmap => "heatmap",
        Kind::Calibration => "calibration",
    }
}

/// Creates the output's parent directory if it is missing.
fn create_parent(output: &Path) -> Result<(), PlotError> {
    match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|source| PlotError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// A loaded figure: everything needed to draw it, nothing read lazily.
struct Figure {
    title: String,
    body: Body,
}

/// The data of each kind of figure.
enum Body {
    Cdf(CdfFigure),
    Convergence(ConvergenceFigure),
    Scatter(Vec<ScatterSet>),
    Map(Vec<Projection>),
    Heatmap(HeatmapFigure),
    Calibration(CalibrationFigure),
}

/// Reads every input the figure needs.
fn load_figure(args: &PlotArgs, format: OutputFormat) -> Result<Figure, PlotError> {
    let labels = input_labels(&args.inputs, args.kind == Kind::Heatmap)?;
    let inputs: Vec<(&Path, &str)> = args
        .inputs
        .iter()
        .map(PathBuf::as_path)
        .zip(labels.iter().map(String::as_str))
        .collect();
    let body = match args.kind {
        Kind::Cdf => Body::Cdf(load_cdf(&inputs, args.linear)?),
        Kind::Convergence => Body::Convergence(load_convergence(&inputs, args.p90)?),
        Kind::Scatter => Body::Scatter(load_scatter(&inputs)?),
        Kind::Map => Body::Map(load_map(&inputs)?),
        Kind::Heatmap => Body::Heatmap(load_heatmap(&inputs, args.estimate, max_cells(format))?),
        Kind::Calibration => Body::Calibration(load_calibration(&inputs)?),
    };
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| default_title(args.kind, args.estimate).to_string());
    Ok(Figure { title, body })
}

/// The title used when `--title` is not given.
fn default_title(kind: Kind, estimate: bool) -> &'static str {
    match kind {
        Kind::Cdf => "Relative error CDF",
        Kind::Convergence => "Convergence: relative error by round",
        Kind::Scatter => "Predicted vs measured RTT",
        Kind::Map => "Coordinates, PCA projection",
        Kind::Heatmap if estimate => "Estimated RTT matrix",
        Kind::Heatmap => "RTT matrix",
        Kind::Calibration => "p99 calibration",
    }
}

/// Legend label of each input: the run's profile, plus the directory name
/// when two runs share a profile (e.g. two seeds of `tomo`). Dataset files
/// (allowed only when `allow_files`) are labelled by their file name.
fn input_labels(paths: &[PathBuf], allow_files: bool) -> Result<Vec<String>, PlotError> {
    let mut profiles = Vec::with_capacity(paths.len());
    for p in paths {
        if !p.exists() {
            return Err(PlotError::MissingInput(p.clone()));
        }
        if p.is_dir() {
            profiles.push(Some(read_profile(p)?));
        } else if allow_files {
            profiles.push(None);
        } else {
            return Err(PlotError::NotSimDir(p.clone()));
        }
    }
    let labels = paths
        .iter()
        .zip(&profiles)
        .map(|(p, profile)| match profile {
            None => last_component(p),
            Some(prof) if profiles.iter().flatten().filter(|q| *q == prof).count() > 1 => {
                format!("{prof} ({})", last_component(p))
            }
            Some(prof) => prof.clone(),
        })
        .collect();
    Ok(labels)
}

/// The last path component, or the whole path when it has none (`.`).
fn last_component(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// `params.profile` of a run's `run.json`.
fn read_profile(dir: &Path) -> Result<String, PlotError> {
    let path = dir.join("run.json");
    let v = read_json(&path)?;
    v["params"]["profile"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| PlotError::Malformed {
            path,
            msg: "no string params.profile".into(),
        })
}

/// Reads and parses a JSON file.
fn read_json(path: &Path) -> Result<serde_json::Value, PlotError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| PlotError::Malformed {
        path: path.to_path_buf(),
        msg: format!("not JSON: {e}"),
    })
}

/// Reads a whole text file.
fn read_text(path: &Path) -> Result<String, PlotError> {
    std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A comma-separated file with a header line, as `tomo sim --out` writes
/// them (no quoting: no field it writes contains a comma).
#[derive(Debug)]
struct Csv {
    path: PathBuf,
    header: Vec<String>,
    /// `(1-based line number, fields)` of every non-blank data line.
    rows: Vec<(usize, Vec<String>)>,
}

impl Csv {
    /// Reads and splits `path`.
    fn read(path: &Path) -> Result<Csv, PlotError> {
        Csv::parse(path, &read_text(path)?)
    }

    /// Splits `text`; every data line must have as many fields as the header.
    fn parse(path: &Path, text: &str) -> Result<Csv, PlotError> {
        let split = |l: &str| -> Vec<String> {
            l.trim_end_matches('\r')
                .split(',')
                .map(|f| f.trim().to_string())
                .collect()
        };
        let mut lines = text.lines().enumerate();
        let header = match lines.next() {
            Some((_, h)) if !h.trim().is_empty() => split(h),
            _ => return Err(malformed(path, "empty file, expected a CSV header")),
        };
        let mut rows = Vec::new();
        for (k, line) in lines {
            if line.trim().is_empty() {
                continue;
            }
            let fields = split(line);
            if fields.len() != header.len() {
                return Err(malformed(
                    path,
                    &format!(
                        "line {}: {} fields, the header has {}",
                        k + 1,
                        fields.len(),
                        header.len()
                    ),
                ));
            }
            rows.push((k + 1, fields));
        }
        Ok(Csv {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    /// Index of the column called `name`.
    fn column(&self, name: &str) -> Result<usize, PlotError> {
        self.header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| malformed(&self.path, &format!("no column {name:?} in the header")))
    }

    /// Column `name` parsed as numbers (NaN is accepted: the simulator
    /// writes it for undefined values; callers drop what they cannot draw).
    fn floats(&self, name: &str) -> Result<Vec<f64>, PlotError> {
        let c = self.column(name)?;
        self.parsed(c, name)
    }

    /// Column `name` parsed as node indices.
    fn indices(&self, name: &str) -> Result<Vec<usize>, PlotError> {
        let c = self.column(name)?;
        self.parsed(c, name)
    }

    /// Column `name` as text.
    fn texts(&self, name: &str) -> Result<Vec<String>, PlotError> {
        let c = self.column(name)?;
        Ok(self.rows.iter().map(|(_, f)| f[c].clone()).collect())
    }

    /// Column `c` parsed as `T`, naming the line of the first bad field.
    fn parsed<T: std::str::FromStr>(&self, c: usize, name: &str) -> Result<Vec<T>, PlotError> {
        self.rows
            .iter()
            .map(|(line, f)| {
                f[c].parse().map_err(|_| {
                    malformed(
                        &self.path,
                        &format!("line {line}: {name} is {:?}, not a number", f[c]),
                    )
                })
            })
            .collect()
    }
}

/// A [`PlotError::Malformed`] for `path`.
fn malformed(path: &Path, msg: &str) -> PlotError {
    PlotError::Malformed {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Relative-error CDF data.
struct CdfFigure {
    /// `(label, ascending finite relative errors)` per input.
    curves: Vec<(String, Vec<f64>)>,
    linear: bool,
}

/// Reads `pairs.csv`'s `rel_err` of every input.
fn load_cdf(inputs: &[(&Path, &str)], linear: bool) -> Result<CdfFigure, PlotError> {
    let mut curves = Vec::with_capacity(inputs.len());
    for &(dir, label) in inputs {
        let path = dir.join("pairs.csv");
        let mut errs: Vec<f64> = Csv::read(&path)?
            .floats("rel_err")?
            .into_iter()
            .filter(|e| e.is_finite() && *e >= 0.0)
            .collect();
        if errs.is_empty() {
            return Err(PlotError::Empty(format!(
                "{} has no pairs with a relative error",
                path.display()
            )));
        }
        errs.sort_by(f64::total_cmp);
        curves.push((label.to_string(), errs));
    }
    Ok(CdfFigure { curves, linear })
}

/// Per-round accuracy of one run.
struct RoundsSeries {
    label: String,
    rounds: Vec<f64>,
    median: Vec<f64>,
    p90: Vec<f64>,
}

/// Convergence data.
struct ConvergenceFigure {
    series: Vec<RoundsSeries>,
    p90: bool,
}

/// Reads `rounds.csv` of every input.
fn load_convergence(inputs: &[(&Path, &str)], p90: bool) -> Result<ConvergenceFigure, PlotError> {
    let mut series = Vec::with_capacity(inputs.len());
    for &(dir, label) in inputs {
        let path = dir.join("rounds.csv");
        let csv = Csv::read(&path)?;
        if csv.rows.is_empty() {
            return Err(PlotError::Empty(format!(
                "{} has no rounds",
                path.display()
            )));
        }
        series.push(RoundsSeries {
            label: label.to_string(),
            rounds: csv.floats("round")?,
            median: csv.floats("median_rel_err")?,
            p90: csv.floats("p90_rel_err")?,
        });
    }
    Ok(ConvergenceFigure { series, p90 })
}

/// Measured and predicted RTT of every pair of one run.
struct ScatterSet {
    label: String,
    /// `(measured ms, predicted ms)`, both positive.
    points: Vec<(f64, f64)>,
}

/// At most this many points per scatter input are drawn: beyond it the
/// cloud is saturated anyway and the SVG would grow to tens of megabytes.
const MAX_SCATTER_POINTS: usize = 20_000;

/// Reads `pairs.csv` of every input.
fn load_scatter(inputs: &[(&Path, &str)]) -> Result<Vec<ScatterSet>, PlotError> {
    let mut sets = Vec::with_capacity(inputs.len());
    for &(dir, label) in inputs {
        let path = dir.join("pairs.csv");
        let csv = Csv::read(&path)?;
        let measured = csv.floats("actual_ms")?;
        let predicted = csv.floats("estimate_ms")?;
        // A log axis cannot show zero or negative values.
        let points: Vec<(f64, f64)> = measured
            .into_iter()
            .zip(predicted)
            .filter(|&(m, p)| m > 0.0 && p > 0.0 && m.is_finite() && p.is_finite())
            .collect();
        if points.is_empty() {
            return Err(PlotError::Empty(format!(
                "{} has no pair with positive RTTs",
                path.display()
            )));
        }
        sets.push(ScatterSet {
            label: label.to_string(),
            points: thin(&points, MAX_SCATTER_POINTS),
        });
    }
    Ok(sets)
}

/// Every k-th element so that at most `max` remain (deterministic, keeps
/// the spread of the data unlike taking a prefix).
fn thin<T: Copy>(v: &[T], max: usize) -> Vec<T> {
    let stride = v.len().div_ceil(max.max(1)).max(1);
    v.iter().step_by(stride).copied().collect()
}

/// The per-pair tail scores `tomo sim --observe` writes.
const TAIL_PAIRS: &str = "tail_pairs.csv";

/// The pairs of one group (probed or held out) of a calibration figure.
struct TailGroup {
    /// `"probed"` or `"held out"`.
    name: &'static str,
    color: RGBColor,
    /// Pairs with a drawable p99, before thinning.
    pairs: usize,
    /// `(actual p99 ms, predicted p99 ms)`, both positive, thinned.
    points: Vec<(f64, f64)>,
    /// Ascending share of each pair's real samples above its predicted
    /// p99 (pairs without real samples left out).
    exceed: Vec<f64>,
    /// `tail.<group>.p99_exceed_rate` of run.json: the share over all the
    /// group's samples pooled, when run.json has it.
    pooled: Option<f64>,
}

/// Calibration data of one run.
struct CalibrationFigure {
    /// The groups that have pairs, probed first.
    groups: Vec<TailGroup>,
    /// `(actual p99 ms, coordinate estimate ms)` of every pair, thinned:
    /// the coordinate estimate taken as a p99, the baseline.
    baseline: Vec<(f64, f64)>,
    /// Pooled exceed rate of the baseline over both groups
    /// (`tail.coordinate_as_p99`), weighted by samples.
    baseline_pooled: Option<f64>,
}

/// Reads `tail_pairs.csv` and the pooled rates of `run.json` of the one
/// input (`check_options` rejects more).
fn load_calibration(inputs: &[(&Path, &str)]) -> Result<CalibrationFigure, PlotError> {
    let &(dir, _) = inputs
        .first()
        .ok_or_else(|| PlotError::Usage("calibration needs a run directory".into()))?;
    let path = dir.join(TAIL_PAIRS);
    if !path.is_file() {
        return Err(PlotError::NoTailPairs(path));
    }
    let csv = Csv::read(&path)?;
    let held_out = csv.indices("held_out")?;
    let predicted = csv.floats("pred_p99_ms")?;
    let actual = csv.floats("actual_p99_ms")?;
    let coordinate = csv.floats("coordinate_ms")?;
    let exceed = csv.floats("exceed")?;
    let real = csv.floats("real_samples")?;
    if let Some(k) = held_out.iter().position(|&h| h > 1) {
        return Err(malformed(
            &path,
            &format!(
                "line {}: held_out is {}, not 0 or 1",
                csv.rows[k].0, held_out[k]
            ),
        ));
    }
    let rates = pooled_rates(&dir.join("run.json"))?;
    let positive = |a: f64, b: f64| a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite();
    let held_out = &held_out;
    let groups: Vec<TailGroup> = [("probed", 0), ("held out", 1)]
        .into_iter()
        .zip(rates.groups)
        .filter_map(|((name, flag), pooled)| {
            let rows = move || (0..held_out.len()).filter(move |&k| held_out[k] == flag);
            let points: Vec<(f64, f64)> = rows()
                .map(|k| (actual[k], predicted[k]))
                .filter(|&(a, p)| positive(a, p))
                .collect();
            let mut shares: Vec<f64> = rows()
                .filter(|&k| real[k] > 0.0 && exceed[k].is_finite())
                .map(|k| (exceed[k] / real[k]).clamp(0.0, 1.0))
                .collect();
            shares.sort_by(f64::total_cmp);
            (!points.is_empty()).then(|| TailGroup {
                name,
                color: series_color(flag),
                pairs: points.len(),
                points: thin(&points, MAX_SCATTER_POINTS),
                exceed: shares,
                pooled,
            })
        })
        .collect();
    if groups.is_empty() {
        return Err(PlotError::Empty(format!(
            "{} has no pair with positive p99s",
            path.display()
        )));
    }
    let baseline: Vec<(f64, f64)> = actual
        .iter()
        .copied()
        .zip(coordinate)
        .filter(|&(a, c)| positive(a, c))
        .collect();
    Ok(CalibrationFigure {
        groups,
        baseline: thin(&baseline, MAX_SCATTER_POINTS),
        baseline_pooled: rates.baseline,
    })
}

/// Pooled exceed rates of a run's `run.json`.
struct PooledRates {
    /// Probed, held out.
    groups: [Option<f64>; 2],
    /// The coordinate taken as a p99, both groups together.
    baseline: Option<f64>,
}

/// The `tail` object of `run.json`: pooled p99 exceed rates per group, and
/// those of the coordinate baseline pooled over both groups. A group with
/// no pairs has no rate (null), which only drops it from the legend.
fn pooled_rates(path: &Path) -> Result<PooledRates, PlotError> {
    let json = read_json(path)?;
    let tail = &json["tail"];
    if !tail.is_object() {
        return Err(malformed(
            path,
            "no `tail` object: the calibration plot needs a run made with `tomo sim --observe`",
        ));
    }
    const GROUPS: [&str; 2] = ["probed", "held_out"];
    let rate = |g: &serde_json::Value| g["p99_exceed_rate"].as_f64().filter(|r| r.is_finite());
    let (mut above, mut samples) = (0.0, 0.0);
    for g in GROUPS.map(|g| &tail["coordinate_as_p99"][g]) {
        if let (Some(r), Some(n)) = (rate(g), g["samples"].as_f64()) {
            above += r * n;
            samples += n;
        }
    }
    Ok(PooledRates {
        groups: GROUPS.map(|g| rate(&tail[g])),
        baseline: (samples > 0.0).then(|| above / samples),
    })
}

/// The coordinates of one run projected on their top two principal components.
struct Projection {
    label: String,
    points: Vec<(f64, f64)>,
    /// Per node; empty strings when the run had no labels.
    node_labels: Vec<String>,
    /// Share of the total variance along each of the two axes.
    explained: [f64; 2],
}

/// Reads `coords.csv` of every input and projects it.
fn load_map(inputs: &[(&Path, &str)]) -> Result<Vec<Projection>, PlotError> {
    inputs
        .iter()
        .map(|&(dir, label)| {
            let path = dir.join("coords.csv");
            let csv = Csv::read(&path)?;
            let rows = coordinate_rows(&csv)?;
            if rows.is_empty() {
                return Err(PlotError::Empty(format!("{} has no nodes", path.display())));
            }
            let pca = Pca::fit(&rows);
            Ok(Projection {
                label: label.to_string(),
                points: rows.iter().map(|r| pca.project(r)).collect(),
                node_labels: csv.texts("label")?,
                explained: pca.explained(),
            })
        })
        .collect()
}

/// The `x0_ms, x1_ms, ...` columns of `coords.csv`, one row per node.
fn coordinate_rows(csv: &Csv) -> Result<Vec<Vec<f64>>, PlotError> {
    let dims: Vec<Vec<f64>> = (0..)
        .map(|d| format!("x{d}_ms"))
        .take_while(|name| csv.header.contains(name))
        .map(|name| csv.floats(&name))
        .collect::<Result<_, _>>()?;
    if dims.is_empty() {
        return Err(malformed(&csv.path, "no x0_ms column"));
    }
    let rows = (0..csv.rows.len())
        .map(|i| dims.iter().map(|col| col[i]).collect::<Vec<f64>>())
        .collect::<Vec<_>>();
    if let Some(k) = rows.iter().position(|r| r.iter().any(|v| !v.is_finite())) {
        return Err(malformed(
            &csv.path,
            &format!("line {}: non-finite coordinate", csv.rows[k].0),
        ));
    }
    Ok(rows)
}

/// The top two principal axes of a point cloud.
#[derive(Debug)]
struct Pca {
    mean: Vec<f64>,
    axes: [Vec<f64>; 2],
    /// Variance along each axis (the covariance's eigenvalues).
    variance: [f64; 2],
    /// Total variance (the covariance's trace).
    total: f64,
}

impl Pca {
    /// Fits the axes of `rows` (all of the same length, at least one row).
    fn fit(rows: &[Vec<f64>]) -> Pca {
        let d = rows[0].len();
        let n = rows.len() as f64;
        let mut mean = vec![0.0; d];
        for r in rows {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / n;
            }
        }
        let cov = covariance(rows, &mean);
        let total = (0..d).map(|k| cov[k * d + k]).sum();
        let (a1, v1) = top_eigenvector(&cov, d, None);
        let (a2, v2) = top_eigenvector(&cov, d, Some(&a1));
        Pca {
            mean,
            axes: [a1, a2],
            variance: [v1, v2],
            total,
        }
    }

    /// Coordinates of `row` along the two axes.
    fn project(&self, row: &[f64]) -> (f64, f64) {
        let along = |axis: &[f64]| {
            row.iter()
                .zip(&self.mean)
                .zip(axis)
                .map(|((x, m), a)| (x - m) * a)
                .sum::<f64>()
        };
        (along(&self.axes[0]), along(&self.axes[1]))
    }

    /// Share of the total variance along each axis (0 for a single point).
    fn explained(&self) -> [f64; 2] {
        if self.total > 0.0 {
            self.variance.map(|v| v / self.total)
        } else {
            [0.0, 0.0]
        }
    }
}

/// Row-major `d × d` covariance of `rows` around `mean`.
fn covariance(rows: &[Vec<f64>], mean: &[f64]) -> Vec<f64> {
    let d = mean.len();
    let mut cov = vec![0.0; d * d];
    for r in rows {
        for a in 0..d {
            let da = r[a] - mean[a];
            for b in 0..d {
                cov[a * d + b] += da * (r[b] - mean[b]);
            }
        }
    }
    let n = rows.len() as f64;
    cov.iter_mut().for_each(|c| *c /= n);
    cov
}

/// Unit eigenvector of the largest eigenvalue of the symmetric positive
/// semi-definite `cov`, and that eigenvalue, by power iteration. With
/// `orthogonal_to`, the search stays orthogonal to that unit vector, which
/// yields the second axis. Returns a zero vector when the remaining space
/// carries no variance (all points equal, or d = 1 for the second axis).
fn top_eigenvector(cov: &[f64], d: usize, orthogonal_to: Option<&[f64]>) -> (Vec<f64>, f64) {
    let deflate = |v: &mut Vec<f64>| {
        if let Some(u) = orthogonal_to {
            let dot: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(u).for_each(|(a, b)| *a -= dot * b);
        }
    };
    let normalize = |v: &mut Vec<f64>| -> bool {
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm <= 1e-300 {
            return false;
        }
        v.iter_mut().for_each(|a| *a /= norm);
        true
    };
    let mul = |v: &[f64]| -> Vec<f64> {
        (0..d)
            .map(|a| (0..d).map(|b| cov[a * d + b] * v[b]).sum())
            .collect()
    };
    // Unequal start components so the start is not orthogonal to the answer
    // for the symmetric clouds an all-ones start would miss.
    let mut v: Vec<f64> = (0..d).map(|k| 1.0 + k as f64 * 0.618).collect();
    deflate(&mut v);
    if !normalize(&mut v) {
        return (vec![0.0; d], 0.0);
    }
    for _ in 0..2000 {
        let mut next = mul(&v);
        deflate(&mut next);
        if !normalize(&mut next) {
            return (vec![0.0; d], 0.0);
        }
        let change: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
        v = next;
        if change < 1e-12 {
            break;
        }
    }
    // Eigenvectors have no sign; fix one so figures are reproducible.
    let largest = v
        .iter()
        .copied()
        .max_by(|a, b| a.abs().total_cmp(&b.abs()))
        .unwrap_or(0.0);
    if largest < 0.0 {
        v.iter_mut().for_each(|a| *a = -*a);
    }
    let lambda = v.iter().zip(mul(&v)).map(|(a, b)| a * b).sum();
    (v, lambda)
}

/// One RTT matrix, block-averaged down to a bounded number of cells.
struct Grid {
    label: String,
    /// Nodes of the matrix.
    nodes: usize,
    /// Cells per side.
    cells: usize,
    /// Nodes per cell side (1 unless block-averaged).
    block: usize,
    /// Row-major `cells × cells` mean RTT in ms; NaN where nothing is known.
    values: Vec<f64>,
    /// Whether rows and columns are ordered by node label.
    by_label: bool,
}

/// Heatmap data.
struct HeatmapFigure {
    grids: Vec<Grid>,
    estimate: bool,
}

/// Cells per side beyond which a matrix is block-averaged, so the image
/// stays legible. SVG gets fewer: every cell is an element there, and 600²
/// of them make a 30 MB file that browsers struggle with.
fn max_cells(format: OutputFormat) -> usize {
    match format {
        OutputFormat::Png => 600,
        OutputFormat::Svg => 250,
    }
}

/// Reads the matrix of every input (`pairs.csv` of a sim directory, or a
/// dataset file) into grids of at most `max_cells` per side.
fn load_heatmap(
    inputs: &[(&Path, &str)],
    estimate: bool,
    max_cells: usize,
) -> Result<HeatmapFigure, PlotError> {
    let mut grids = Vec::with_capacity(inputs.len());
    for &(path, label) in inputs {
        let grid = if path.is_dir() {
            sim_grid(path, label, estimate, max_cells)?
        } else if estimate {
            return Err(PlotError::Usage(format!(
                "--estimate needs `tomo sim --out` directories; {} is a dataset file",
                path.display()
            )));
        } else {
            dataset_grid(path, label, max_cells)?
        };
        if grid.values.iter().all(|v| v.is_nan()) {
            return Err(PlotError::Empty(format!(
                "{} has no known RTT",
                path.display()
            )));
        }
        grids.push(grid);
    }
    Ok(HeatmapFigure { grids, estimate })
}

/// No simulator run is anywhere near this large; a bigger index means a
/// corrupt file, and would make the label permutation absurdly large.
const MAX_NODES: usize = 1_000_000;

/// The heatmap grid of a sim directory, both directions of every pair set.
fn sim_grid(dir: &Path, label: &str, estimate: bool, max_cells: usize) -> Result<Grid, PlotError> {
    let path = dir.join("pairs.csv");
    let csv = Csv::read(&path)?;
    let (is, js) = (csv.indices("i")?, csv.indices("j")?);
    let values = csv.floats(if estimate { "estimate_ms" } else { "actual_ms" })?;
    let n = is.iter().chain(&js).max().map_or(0, |m| m + 1);
    if n == 0 {
        return Err(PlotError::Empty(format!("{} has no pairs", path.display())));
    }
    if n > MAX_NODES {
        return Err(malformed(
            &path,
            &format!("node index {} is too large", n - 1),
        ));
    }
    let labels = sim_node_labels(dir, n)?;
    let mut acc = GridBuilder::new(n, labels.as_deref(), max_cells);
    for ((&i, &j), &v) in is.iter().zip(&js).zip(&values) {
        acc.add(i, j, v);
        acc.add(j, i, v);
    }
    Ok(acc.finish(label))
}

/// Node labels from `coords.csv`, when the file exists: they only order the
/// heatmap, so a run without it still draws (unordered).
fn sim_node_labels(dir: &Path, n: usize) -> Result<Option<Vec<String>>, PlotError> {
    let path = dir.join("coords.csv");
    if !path.exists() {
        return Ok(None);
    }
    let csv = Csv::read(&path)?;
    let nodes = csv.indices("node")?;
    let texts = csv.texts("label")?;
    let mut labels = vec![String::new(); n];
    for (node, text) in nodes.into_iter().zip(texts) {
        if node < n {
            labels[node] = text;
        }
    }
    Ok(Some(labels))
}

/// The heatmap grid of a dataset file (directions kept as measured).
fn dataset_grid(path: &Path, label: &str, max_cells: usize) -> Result<Grid, PlotError> {
    let bytes = std::fs::read(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let m = dataset::parse_matrix(&bytes, Format::Dense, None).map_err(|source| {
        PlotError::Dataset {
            path: path.to_path_buf(),
            source,
        }
    })?;
    if m.n == 0 {
        return Err(PlotError::Empty(format!("{} has no nodes", path.display())));
    }
    let labels = match m.labels.clone() {
        Some(l) => Some(l),
        None => dataset_labels(path, m.n)?,
    };
    let mut acc = GridBuilder::new(m.n, labels.as_deref(), max_cells);
    for i in 0..m.n {
        for j in 0..m.n {
            acc.add(i, j, m.at(i, j));
        }
    }
    Ok(acc.finish(label))
}

/// Labels from a dataset's `X.nodes.csv` sibling (`tomo dataset gen` and
/// the converters write one, as `tomo sim` expects), when it exists.
fn dataset_labels(path: &Path, n: usize) -> Result<Option<Vec<String>>, PlotError> {
    let Some(stem) = path
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.split('.').next())
    else {
        return Ok(None);
    };
    let sibling = path.with_file_name(format!("{stem}.nodes.csv"));
    if !sibling.is_file() {
        return Ok(None);
    }
    Ok(dataset::parse_labels(&read_text(&sibling)?, n))
}

/// Accumulates RTTs into block-averaged cells, rows and columns ordered by
/// node label so regions show up as blocks.
struct GridBuilder {
    nodes: usize,
    /// Position of each node along the axes.
    position: Vec<usize>,
    block: usize,
    cells: usize,
    sum: Vec<f64>,
    count: Vec<u32>,
    by_label: bool,
}

impl GridBuilder {
    /// An empty grid for `n` nodes, ordered by `labels` when any is
    /// non-empty, with at most `max_cells` cells per side.
    fn new(n: usize, labels: Option<&[String]>, max_cells: usize) -> Self {
        let by_label = labels.is_some_and(|l| l.iter().any(|s| !s.is_empty()));
        let mut order: Vec<usize> = (0..n).collect();
        if let (true, Some(l)) = (by_label, labels) {
            // Stable: nodes of one label keep their index order.
            order.sort_by(|&a, &b| l[a].cmp(&l[b]));
        }
        let mut position = vec![0; n];
        for (pos, &node) in order.iter().enumerate() {
            position[node] = pos;
        }
        let block = n.div_ceil(max_cells.max(1)).max(1);
        let cells = n.div_ceil(block);
        GridBuilder {
            nodes: n,
            position,
            block,
            cells,
            sum: vec![0.0; cells * cells],
            count: vec![0; cells * cells],
            by_label,
        }
    }

    /// Adds the RTT from node `i` to node `j` (ignored unless positive).
    fn add(&mut self, i: usize, j: usize, rtt: f64) {
        if !(rtt > 0.0 && rtt.is_finite()) {
            return;
        }
        let r = self.position[i] / self.block;
        let c = self.position[j] / self.block;
        self.sum[r * self.cells + c] += rtt;
        self.count[r * self.cells + c] += 1;
    }

    /// The per-cell means.
    fn finish(self, label: &str) -> Grid {
        let values = self
            .sum
            .iter()
            .zip(&self.count)
            .map(|(&s, &k)| if k > 0 { s / f64::from(k) } else { f64::NAN })
            .collect();
        Grid {
            label: label.to_string(),
            nodes: self.nodes,
            cells: self.cells,
            block: self.block,
            values,
            by_label: self.by_label,
        }
    }
}

// ---------------------------------------------------------------------------
// Drawing
// ---------------------------------------------------------------------------

/// A plotters error flattened to its message; [`render`] adds the path.
struct DrawFailure(String);

/// Converts any plotters drawing error.
fn fail<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> DrawFailure {
    DrawFailure(e.to_string())
}

/// Draws `figure` into `output` with the backend of `format`.
fn render(
    figure: &Figure,
    output: &Path,
    format: OutputFormat,
    size: (u32, u32),
) -> Result<(), PlotError> {
    let result = match format {
        OutputFormat::Png => draw_and_present(
            figure,
            &BitMapBackend::new(output, size).into_drawing_area(),
        ),
        OutputFormat::Svg => {
            draw_and_present(figure, &SVGBackend::new(output, size).into_drawing_area())
        }
    };
    result.map_err(|DrawFailure(msg)| PlotError::Draw {
        path: output.to_path_buf(),
        msg,
    })
}

/// Draws `figure` on `root` and writes it out.
fn draw_and_present<DB: DrawingBackend>(
    figure: &Figure,
    root: &DrawingArea<DB, Shift>,
) -> Result<(), DrawFailure> {
    root.fill(&WHITE).map_err(fail)?;
    let title = figure.title.as_str();
    match &figure.body {
        Body::Cdf(c) => draw_cdf(root, title, c)?,
        Body::Convergence(c) => draw_convergence(root, title, c)?,
        Body::Scatter(s) => draw_scatter(root, title, s)?,
        Body::Map(m) => draw_map(root, title, m)?,
        Body::Heatmap(h) => draw_heatmap(root, title, h)?,
        Body::Calibration(c) => draw_calibration(root, title, c)?,
    }
    // The bitmap backend only writes the file here; dropping it would
    // swallow any write error.
    root.present().map_err(fail)
}

/// Text sizes and spacing, scaled with the image so small and large
/// renderings look alike.
struct Fonts {
    scale: f64,
}

impl Fonts {
    /// Sizes for an image of `area`'s size (1024 × 768 is scale 1).
    fn for_area<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>) -> Self {
        let (w, h) = area.dim_in_pixel();
        let scale = (f64::from(w)).min(f64::from(h) * 4.0 / 3.0) / 1024.0;
        Fonts {
            scale: scale.clamp(0.4, 5.0),
        }
    }

    /// `base` pixels at this scale (at least one).
    fn px(&self, base: f64) -> u32 {
        (base * self.scale).round().max(1.0) as u32
    }

    /// Sans-serif at `base` pixels, never below 9 px so text stays legible.
    fn font(&self, base: f64) -> FontDesc<'static> {
        let size = (base * self.scale).round().max(9.0);
        FontDesc::new(FontFamily::SansSerif, size, FontStyle::Normal)
    }

    /// Figure title.
    fn caption(&self) -> FontDesc<'static> {
        self.font(30.0)
    }

    /// Axis descriptions and panel captions.
    fn axis_desc(&self) -> FontDesc<'static> {
        self.font(21.0)
    }

    /// Tick labels.
    fn tick(&self) -> FontDesc<'static> {
        self.font(17.0)
    }

    /// Legend entries.
    fn legend(&self) -> FontDesc<'static> {
        self.font(17.0)
    }

    /// Space around a chart, in pixels.
    fn margin(&self) -> u32 {
        self.px(18.0)
    }

    /// Height for x tick labels and description.
    fn x_label_area(&self) -> u32 {
        self.px(62.0)
    }

    /// Width for y tick labels and description.
    fn y_label_area(&self) -> u32 {
        self.px(88.0)
    }
}

/// A 2-D chart with x coordinates `X` and y coordinates `Y`.
type Chart<'a, DB, X, Y> = ChartContext<'a, DB, Cartesian2d<X, Y>>;

/// A chart with a caption and room for axis labels on `area`.
fn build_chart<'a, DB, X, Y>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    fonts: &Fonts,
    x: X,
    y: Y,
) -> Result<Chart<'a, DB, X::CoordDescType, Y::CoordDescType>, DrawFailure>
where
    DB: DrawingBackend,
    X: AsRangedCoord,
    Y: AsRangedCoord,
{
    ChartBuilder::on(area)
        .caption(caption, fonts.caption())
        .margin(fonts.margin())
        .x_label_area_size(fonts.x_label_area())
        .y_label_area_size(fonts.y_label_area())
        .build_cartesian_2d(x, y)
        .map_err(fail)
}

/// Axis descriptions and tick labels of a chart.
struct Axes<'f> {
    x_desc: &'f str,
    y_desc: &'f str,
    x_fmt: &'f dyn Fn(&f64) -> String,
    y_fmt: &'f dyn Fn(&f64) -> String,
}

impl<'f> Axes<'f> {
    /// Axes with the default number formatting.
    fn new(x_desc: &'f str, y_desc: &'f str) -> Self {
        Axes {
            x_desc,
            y_desc,
            x_fmt: &tick_label,
            y_fmt: &tick_label,
        }
    }
}

/// Draws grid, axes, tick labels and axis descriptions.
fn draw_mesh<DB, X, Y>(
    chart: &mut Chart<'_, DB, X, Y>,
    fonts: &Fonts,
    axes: &Axes<'_>,
) -> Result<(), DrawFailure>
where
    DB: DrawingBackend,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_desc(axes.x_desc)
        .y_desc(axes.y_desc)
        .label_style(fonts.tick())
        .axis_desc_style(fonts.axis_desc())
        .x_label_formatter(axes.x_fmt)
        .y_label_formatter(axes.y_fmt)
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(210, 210, 210))
        .draw()
        .map_err(fail)
}

/// A log axis over `[lo, hi]` (both positive) ticked at 1-2-5 steps when
/// it spans few decades; plotters alone labels only powers of ten, which
/// leaves a 4-600 ms axis with two labels.
fn log_axis(lo: f64, hi: f64) -> WithKeyPoints<LogCoord<f64>> {
    let (bold, light) = log_ticks(lo, hi);
    (lo..hi)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light)
}

/// A log axis over `[lo, hi]` labelled at powers of ten only, for a
/// half-width panel where 1-2-5 labels would run into each other.
fn decade_axis(lo: f64, hi: f64) -> WithKeyPoints<LogCoord<f64>> {
    let (bold, light) = ticks_at(lo, hi, &[1]);
    (lo..hi)
        .log_scale()
        .with_key_points(bold)
        .with_light_points(light)
}

/// Labelled and unlabelled grid values of a log axis over `[lo, hi]`.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let labelled: &[u32] = if hi / lo > 1e3 { &[1] } else { &[1, 2, 5] };
    ticks_at(lo, hi, labelled)
}

/// Grid values `m × 10^e` within `[lo, hi]`, split into labelled (`m` in
/// `labelled`) and unlabelled ones.
fn ticks_at(lo: f64, hi: f64, labelled: &[u32]) -> (Vec<f64>, Vec<f64>) {
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    for e in first..=last {
        for m in 1..=9u32 {
            let v = f64::from(m) * 10f64.powi(e);
            if v < lo * (1.0 - 1e-9) || v > hi * (1.0 + 1e-9) {
                continue;
            }
            if labelled.contains(&m) {
                bold.push(v);
            } else {
                light.push(v);
            }
        }
    }
    (bold, light)
}

/// Short tick text: plain decimals in the usual range, exponent otherwise.
fn tick_label(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Draws the legend of every labelled series.
fn draw_legend<'a, DB, X, Y>(
    chart: &mut Chart<'a, DB, X, Y>,
    fonts: &Fonts,
    position: SeriesLabelPosition,
) -> Result<(), DrawFailure>
where
    DB: DrawingBackend + 'a,
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(position)
        .margin(fonts.px(10.0))
        .label_font(fonts.legend())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(fail)
}

/// A polyline to draw, with its legend entry.
struct Line {
    label: Option<String>,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Draws `lines` (2 px, solid or dashed) and registers their legend entries.
fn draw_lines<'a, DB, X, Y>(
    chart: &mut Chart<'a, DB, X, Y>,
    fonts: &Fonts,
    lines: &[Line],
) -> Result<(), DrawFailure>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let width = fonts.px(2.0);
    let (dash, gap) = (fonts.px(10.0), fonts.px(6.0));
    for line in lines {
        let style = line.color.stroke_width(width);
        let points = line.points.iter().copied();
        let anno = if line.dashed {
            chart.draw_series(DashedLineSeries::new(points, dash, gap, style))
        } else {
            chart.draw_series(LineSeries::new(points, style))
        }
        .map_err(fail)?;
        if let Some(label) = &line.label {
            let (dashed, legend_len) = (line.dashed, fonts.px(28.0) as i32);
            anno.label(label.as_str()).legend(move |(x, y)| {
                let ends = vec![(x, y), (x + legend_len, y)];
                if dashed {
                    DashedPathElement::new(ends, dash, gap, style).into_dyn()
                } else {
                    PathElement::new(ends, style).into_dyn()
                }
            });
        }
    }
    Ok(())
}

/// Categorical colours: matplotlib's tab10, then ten more that stay
/// distinguishable from them on white.
const PALETTE: [RGBColor; 20] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 128),
    RGBColor(128, 128, 0),
    RGBColor(0, 128, 128),
    RGBColor(128, 0, 0),
    RGBColor(230, 171, 2),
    RGBColor(0, 0, 0),
    RGBColor(240, 50, 230),
    RGBColor(102, 166, 30),
    RGBColor(250, 128, 114),
    RGBColor(70, 70, 160),
];

/// Colour of series `i` (the palette repeats after 20).
fn series_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The x-axis label shared by the relative-error figures.
const REL_ERR_DESC: &str = "relative error |est − rtt| / rtt";

/// Relative-error CDF figure.
fn draw_cdf<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    fig: &CdfFigure,
) -> Result<(), DrawFailure> {
    let fonts = Fonts::for_area(root);
    let axes = Axes::new(REL_ERR_DESC, "fraction of pairs");
    let (lo, hi) = cdf_x_range(&fig.curves, fig.linear);
    let lines: Vec<Line> = fig
        .curves
        .iter()
        .enumerate()
        .map(|(k, (label, errs))| Line {
            label: Some(format!(
                "{label} (median {:.3})",
                stats::quantile_sorted(errs, 0.5)
            )),
            color: series_color(k),
            dashed: false,
            points: cdf_points(errs, lo, hi),
        })
        .collect();
    // The two axis types are different Rust types, hence two arms.
    if fig.linear {
        let mut chart = build_chart(root, title, &fonts, lo..hi, 0.0..1.0)?;
        draw_mesh(&mut chart, &fonts, &axes)?;
        draw_lines(&mut chart, &fonts, &lines)?;
        draw_legend(&mut chart, &fonts, SeriesLabelPosition::LowerRight)
    } else {
        let mut chart = build_chart(root, title, &fonts, log_axis(lo, hi), 0.0..1.0)?;
        draw_mesh(&mut chart, &fonts, &axes)?;
        draw_lines(&mut chart, &fonts, &lines)?;
        // Log-x CDFs rise late: the upper left is the empty corner.
        draw_legend(&mut chart, &fonts, SeriesLabelPosition::UpperLeft)
    }
}

/// x range of the CDF: `[0, largest p99]` on a linear axis, otherwise
/// decades from the smallest p0.1 (at least 1e-4, so exact pairs do not
/// stretch the axis) to the largest error.
fn cdf_x_range(curves: &[(String, Vec<f64>)], linear: bool) -> (f64, f64) {
    let over = |q: f64, pick: fn(f64, f64) -> f64, init: f64| {
        curves
            .iter()
            .map(|(_, e)| stats::quantile_sorted(e, q))
            .fold(init, pick)
    };
    if linear {
        let hi = over(0.99, f64::max, 0.0);
        return (0.0, if hi > 0.0 { hi } else { 1.0 });
    }
    let lo = over(0.001, f64::min, f64::INFINITY).max(1e-4);
    let hi = over(1.0, f64::max, 0.0).max(lo * 10.0);
    (
        10f64.powf(lo.log10().floor()),
        10f64.powf(hi.log10().ceil()),
    )
}

/// At most this many steps per CDF curve; more is invisible and bloats SVGs.
const MAX_CDF_STEPS: usize = 2000;

/// Staircase points of the empirical CDF of ascending `errs`, clipped to
/// `[lo, hi]` (values beyond are folded into the edges).
fn cdf_points(errs: &[f64], lo: f64, hi: f64) -> Vec<(f64, f64)> {
    let n = errs.len();
    let stride = n.div_ceil(MAX_CDF_STEPS).max(1);
    let fraction = |k: usize| k as f64 / n as f64;
    let below_lo = errs.partition_point(|&e| e < lo);
    let mut points = vec![(lo, fraction(below_lo))];
    let mut k = below_lo;
    while k < n && errs[k] <= hi {
        points.push((errs[k], fraction(k)));
        // The last index of the stride, so the top of each step is exact.
        let last = (k + stride).min(n) - 1;
        let last = if errs[last] <= hi { last } else { k };
        points.push((errs[last], fraction(last + 1)));
        k = last + 1;
    }
    points.push((hi, fraction(k)));
    points
}

/// Convergence figure: median (solid) and optionally p90 (dashed) per round.
fn draw_convergence<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    fig: &ConvergenceFigure,
) -> Result<(), DrawFailure> {
    let fonts = Fonts::for_area(root);
    let mut lines = Vec::new();
    for (k, s) in fig.series.iter().enumerate() {
        let line = |values: &[f64], suffix: &str, dashed: bool| Line {
            label: Some(format!("{} {suffix}", s.label)),
            color: series_color(k),
            dashed,
            points: s
                .rounds
                .iter()
                .copied()
                .zip(values.iter().copied())
                .filter(|(r, v)| r.is_finite() && v.is_finite())
                .collect(),
        };
        lines.push(line(&s.median, "median", false));
        if fig.p90 {
            lines.push(line(&s.p90, "p90", true));
        }
    }
    let points = || lines.iter().flat_map(|l| l.points.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points().map(|p| p.1).fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.05 } else { 1.0 };
    let mut chart = build_chart(root, title, &fonts, 0.0..x_max, 0.0..y_max)?;
    draw_mesh(&mut chart, &fonts, &Axes::new("round", REL_ERR_DESC))?;
    draw_lines(&mut chart, &fonts, &lines)?;
    draw_legend(&mut chart, &fonts, SeriesLabelPosition::UpperRight)
}

/// Scatter figure: predicted vs measured RTT, log-log, with `y = x`.
fn draw_scatter<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    sets: &[ScatterSet],
) -> Result<(), DrawFailure> {
    let fonts = Fonts::for_area(root);
    let all = || sets.iter().flat_map(|s| s.points.iter());
    let lo = all().map(|&(m, p)| m.min(p)).fold(f64::INFINITY, f64::min) / 1.2;
    let hi = all().map(|&(m, p)| m.max(p)).fold(0.0, f64::max) * 1.2;
    // Same range on both axes so y = x is the diagonal.
    let mut chart = build_chart(root, title, &fonts, log_axis(lo, hi), log_axis(lo, hi))?;
    draw_mesh(
        &mut chart,
        &fonts,
        &Axes::new("RTT measured (ms)", "RTT predicted (ms)"),
    )?;
    let radius = fonts.px(2.5);
    for (k, set) in sets.iter().enumerate() {
        let color = series_color(k);
        // Translucent so dense regions read darker.
        let style = color.mix(0.35).filled();
        chart
            .draw_series(set.points.iter().map(|&p| Circle::new(p, radius, style)))
            .map_err(fail)?
            .label(format!("{} ({} pairs)", set.label, set.points.len()))
            .legend(move |p| Circle::new(p, radius + 2, color.filled()));
    }
    let reference = Line {
        label: Some("y = x".into()),
        color: BLACK,
        dashed: true,
        points: vec![(lo, lo), (hi, hi)],
    };
    draw_lines(&mut chart, &fonts, &[reference])?;
    draw_legend(&mut chart, &fonts, SeriesLabelPosition::UpperLeft)
}

/// Colour of the coordinate-as-p99 baseline: light grey, behind the groups.
const BASELINE_COLOR: RGBColor = RGBColor(150, 150, 150);

/// The share of samples a calibrated p99 leaves above it.
const P99_TARGET: f64 = 0.01;

/// Calibration figure: predicted vs actual p99 on the left, the CDF of the
/// per-pair share of samples above the predicted p99 on the right.
fn draw_calibration<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    fig: &CalibrationFigure,
) -> Result<(), DrawFailure> {
    let fonts = Fonts::for_area(root);
    let body = root.titled(title, fonts.caption()).map_err(fail)?;
    let panels = body.split_evenly((1, 2));
    draw_p99_panel(&panels[0], fig, &fonts)?;
    draw_exceed_panel(&panels[1], fig, &fonts)
}

/// A square panel chart centred in `area` (so `y = x` of a log-log plot is
/// the diagonal and both panels line up), with a panel-sized caption.
fn build_square_panel<'a, DB, X, Y>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
    fonts: &Fonts,
    x: X,
    y: Y,
) -> Result<Chart<'a, DB, X::CoordDescType, Y::CoordDescType>, DrawFailure>
where
    DB: DrawingBackend,
    X: AsRangedCoord,
    Y: AsRangedCoord,
{
    let SquareLayout { pad_w, pad_h, .. } = SquareLayout::of(area, fonts);
    let m = fonts.margin();
    ChartBuilder::on(area)
        .caption(caption, fonts.axis_desc())
        .margin_left(m + pad_w)
        .margin_right(m + pad_w)
        .margin_top(m + pad_h)
        .margin_bottom(m + pad_h)
        .x_label_area_size(fonts.x_label_area())
        .y_label_area_size(fonts.y_label_area())
        .build_cartesian_2d(x, y)
        .map_err(fail)
}

/// A rate as a percentage with two significant digits or so: `59 %`,
/// `1.5 %`, `0.76 %`.
fn percent(rate: f64) -> String {
    let p = rate * 100.0;
    let digits = if p >= 10.0 || p == 0.0 {
        0
    } else if p >= 1.0 {
        1
    } else {
        2
    };
    format!("{p:.digits$} %")
}

/// Left calibration panel: predicted vs actual p99 per pair, log-log, over
/// the coordinate baseline, with `y = x`.
fn draw_p99_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &CalibrationFigure,
    fonts: &Fonts,
) -> Result<(), DrawFailure> {
    let all = || {
        fig.baseline
            .iter()
            .chain(fig.groups.iter().flat_map(|g| g.points.iter()))
    };
    let lo = all().map(|&(a, p)| a.min(p)).fold(f64::INFINITY, f64::min) / 1.2;
    let hi = all().map(|&(a, p)| a.max(p)).fold(0.0, f64::max) * 1.2;
    // Same range on both axes so y = x is the diagonal.
    let mut chart = build_square_panel(
        area,
        "p99 per pair",
        fonts,
        log_axis(lo, hi),
        log_axis(lo, hi),
    )?;
    draw_mesh(
        &mut chart,
        fonts,
        &Axes::new("actual p99 (ms)", "predicted p99 (ms)"),
    )?;
    let radius = fonts.px(2.0);
    let baseline_label = match fig.baseline_pooled {
        Some(r) => format!("coordinate as p99 (pooled {})", percent(r)),
        None => "coordinate as p99".to_string(),
    };
    // The baseline first, so the groups are drawn over it.
    chart
        .draw_series(
            fig.baseline
                .iter()
                .map(|&p| Circle::new(p, radius, BASELINE_COLOR.mix(0.3).filled())),
        )
        .map_err(fail)?
        .label(baseline_label)
        .legend(move |p| Circle::new(p, radius + 2, BASELINE_COLOR.filled()));
    for group in &fig.groups {
        let color = group.color;
        chart
            .draw_series(
                group
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, radius, color.mix(0.4).filled())),
            )
            .map_err(fail)?
            .label(format!("{} ({})", group.name, group.pairs))
            .legend(move |p| Circle::new(p, radius + 2, color.filled()));
    }
    let reference = Line {
        label: Some("y = x".into()),
        color: BLACK,
        dashed: true,
        points: vec![(lo, lo), (hi, hi)],
    };
    draw_lines(&mut chart, fonts, &[reference])?;
    draw_legend(&mut chart, fonts, SeriesLabelPosition::UpperLeft)
}

/// Right calibration panel: CDF over pairs of the share of each pair's
/// samples above its predicted p99, log x with the zeros folded into the
/// left edge (labelled `≤`), and the 1 % target.
fn draw_exceed_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    fig: &CalibrationFigure,
    fonts: &Fonts,
) -> Result<(), DrawFailure> {
    let (lo, hi) = exceed_x_range(&fig.groups);
    let mut lines: Vec<Line> = fig
        .groups
        .iter()
        .filter(|g| !g.exceed.is_empty())
        .map(|g| Line {
            label: Some(match g.pooled {
                Some(r) => format!("{}: pooled {}", g.name, percent(r)),
                None => g.name.to_string(),
            }),
            color: g.color,
            dashed: false,
            points: cdf_points(&g.exceed, lo, hi),
        })
        .collect();
    lines.push(Line {
        label: Some(format!("target {} %", P99_TARGET * 100.0)),
        color: BLACK,
        dashed: true,
        points: vec![(P99_TARGET, 0.0), (P99_TARGET, 1.0)],
    });
    let x_fmt = move |v: &f64| {
        if *v <= lo * (1.0 + 1e-9) {
            format!("≤{}", tick_label(v))
        } else {
            tick_label(v)
        }
    };
    let axes = Axes {
        x_desc: "share of samples > predicted p99",
        y_desc: "fraction of pairs",
        x_fmt: &x_fmt,
        y_fmt: &tick_label,
    };
    let mut chart = build_square_panel(
        area,
        "samples above predicted p99",
        fonts,
        decade_axis(lo, hi),
        0.0..1.0,
    )?;
    draw_mesh(&mut chart, fonts, &axes)?;
    draw_lines(&mut chart, fonts, &lines)?;
    // The CDFs end at 1 on the right: the lower right is the empty corner.
    draw_legend(&mut chart, fonts, SeriesLabelPosition::LowerRight)
}

/// x range of the exceedance CDF: from the decade of the smallest non-zero
/// share (kept between 1e-5 and 1e-3, so the 1 % target always has a decade
/// to its left) to 1.
fn exceed_x_range(groups: &[TailGroup]) -> (f64, f64) {
    let smallest = groups
        .iter()
        .flat_map(|g| g.exceed.iter().copied())
        .filter(|&s| s > 0.0)
        .fold(1.0, f64::min);
    let lo = 10f64.powf(smallest.log10().floor()).clamp(1e-5, 1e-3);
    (lo, 1.0)
}

/// Map figure: one panel per input, points coloured by node label.
fn draw_map<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    projections: &[Projection],
) -> Result<(), DrawFailure> {
    let fonts = Fonts::for_area(root);
    let body = root.titled(title, fonts.caption()).map_err(fail)?;
    let groups = label_groups(projections);
    // One empty label means the run had none: nothing to tell apart.
    let labelled = groups.iter().any(|g| !g.is_empty());
    let (w, _) = body.dim_in_pixel();
    let key_width = if labelled {
        label_key_width(&body, &groups, &fonts)?.min(w / 3)
    } else {
        0
    };
    let (panels_area, key_area) = body.split_horizontally(w - key_width);
    let panels = panels_area.split_evenly((1, projections.len()));
    for (area, proj) in panels.iter().zip(projections) {
        draw_map_panel(area, proj, &groups, &fonts)?;
    }
    if labelled {
        draw_label_key(&key_area, &groups, &fonts)?;
    }
    Ok(())
}

/// Marker radius on the map, in pixels.
fn map_marker(fonts: &Fonts) -> u32 {
    fonts.px(4.5)
}

/// Name shown for a node label in the key.
fn group_name(group: &str) -> &str {
    if group.is_empty() {
        "(no label)"
    } else {
        group
    }
}

/// Width of the label key: marker, gap, longest name, margins.
fn label_key_width<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    groups: &[String],
    fonts: &Fonts,
) -> Result<u32, DrawFailure> {
    let style = TextStyle::from(fonts.legend());
    let mut widest = 0;
    for g in groups {
        let (tw, _) = area
            .estimate_text_size(group_name(g), &style)
            .map_err(fail)?;
        widest = widest.max(tw);
    }
    Ok(widest + 4 * map_marker(fonts) + 2 * fonts.margin())
}

/// The map's colour key, outside the panels so it never hides points.
fn draw_label_key<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    groups: &[String],
    fonts: &Fonts,
) -> Result<(), DrawFailure> {
    let (_, h) = area.dim_in_pixel();
    let r = map_marker(fonts) as i32;
    let row = (fonts.px(26.0) as i32).min(h as i32 / groups.len().max(1) as i32);
    let top = ((h as i32 - row * groups.len() as i32) / 2).max(0);
    let style = TextStyle::from(fonts.legend()).pos(Pos::new(HPos::Left, VPos::Center));
    for (g, group) in groups.iter().enumerate() {
        let y = top + row * g as i32 + row / 2;
        area.draw(&Circle::new((r, y), r as u32, series_color(g).filled()))
            .map_err(fail)?;
        area.draw(&Text::new(group_name(group), (3 * r, y), style.clone()))
            .map_err(fail)?;
    }
    Ok(())
}

/// The distinct node labels over all inputs, in first-seen order, so a
/// label has the same colour in every panel.
fn label_groups(projections: &[Projection]) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for l in projections.iter().flat_map(|p| &p.node_labels) {
        if !groups.contains(l) {
            groups.push(l.clone());
        }
    }
    groups
}

/// One map panel.
fn draw_map_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    proj: &Projection,
    groups: &[String],
    fonts: &Fonts,
) -> Result<(), DrawFailure> {
    let (pw, ph) = area.dim_in_pixel();
    // Approximate plotting-area size, for equal ms per pixel on both axes.
    let plot_w = f64::from(
        pw.saturating_sub(fonts.y_label_area() + 2 * fonts.margin())
            .max(1),
    );
    let plot_h = f64::from(
        ph.saturating_sub(fonts.x_label_area() + 2 * fonts.margin() + fonts.px(40.0))
            .max(1),
    );
    let (xr, yr) = equal_aspect(&proj.points, plot_w / plot_h);
    let x_desc = format!("PC1 (ms), {:.0}% of variance", proj.explained[0] * 100.0);
    let y_desc = format!("PC2 (ms), {:.0}% of variance", proj.explained[1] * 100.0);
    let mut chart = ChartBuilder::on(area)
        .caption(&proj.label, fonts.axis_desc())
        .margin(fonts.margin())
        .x_label_area_size(fonts.x_label_area())
        .y_label_area_size(fonts.y_label_area())
        .build_cartesian_2d(xr, yr)
        .map_err(fail)?;
    draw_mesh(&mut chart, fonts, &Axes::new(&x_desc, &y_desc))?;
    let radius = map_marker(fonts);
    for (g, group) in groups.iter().enumerate() {
        let color = series_color(g);
        let points = proj
            .points
            .iter()
            .zip(&proj.node_labels)
            .filter(|(_, l)| *l == group)
            .map(|(&p, _)| Circle::new(p, radius, color.mix(0.8).filled()));
        chart.draw_series(points).map_err(fail)?;
    }
    Ok(())
}

/// Axis ranges around `points` with 5 % padding, widened so one ms spans
/// the same number of pixels on both axes (`aspect` = plot width / height);
/// otherwise the projection would distort distances.
fn equal_aspect(
    points: &[(f64, f64)],
    aspect: f64,
) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        points
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
    };
    let (x0, x1) = bounds(|p| p.0);
    let (y0, y1) = bounds(|p| p.1);
    let span_x = (x1 - x0).max(1e-9) * 1.1;
    let span_y = (y1 - y0).max(1e-9) * 1.1;
    let (span_x, span_y) = if span_x / span_y < aspect {
        (span_y * aspect, span_y)
    } else {
        (span_x, span_x / aspect)
    };
    let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    (
        cx - span_x / 2.0..cx + span_x / 2.0,
        cy - span_y / 2.0..cy + span_y / 2.0,
    )
}

/// Colour of cells with no known RTT.
const MISSING_COLOR: RGBColor = RGBColor(200, 200, 200);

/// Heatmap figure: one panel per input and a shared colour scale.
fn draw_heatmap<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    fig: &HeatmapFigure,
) -> Result<(), DrawFailure> {
    let fonts = Fonts::for_area(root);
    let body = root.titled(title, fonts.caption()).map_err(fail)?;
    let (w, _) = body.dim_in_pixel();
    let bar_width = fonts.px(150.0).min(w / 3);
    let (panels_area, bar_area) = body.split_horizontally(w - bar_width);
    // One scale for all panels so colours compare across them.
    let range = value_range(&fig.grids);
    let panels = panels_area.split_evenly((1, fig.grids.len()));
    for (area, grid) in panels.iter().zip(&fig.grids) {
        draw_grid(area, grid, range, &fonts)?;
    }
    let desc = if fig.estimate {
        "estimated RTT (ms)"
    } else {
        "RTT (ms)"
    };
    // Align the bar with the panels' squares.
    let square = SquareLayout::of(&panels[0], &fonts);
    draw_colour_bar(&bar_area, &square, range, desc, &fonts)
}

/// Where a square plot sits in a heatmap panel, in pixels.
struct SquareLayout {
    side: u32,
    /// Extra left/right margin that centres the square.
    pad_w: u32,
    /// Extra top/bottom margin that centres the square.
    pad_h: u32,
    /// Height reserved for the panel caption (an estimate: plotters adds
    /// its own padding around the text).
    caption_h: u32,
}

impl SquareLayout {
    /// The largest square plot that fits `area` with axis labels around it.
    fn of<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, fonts: &Fonts) -> Self {
        let (pw, ph) = area.dim_in_pixel();
        let m = fonts.margin();
        let caption_h = fonts.px(36.0);
        let avail_w = pw.saturating_sub(fonts.y_label_area() + 2 * m);
        let avail_h = ph.saturating_sub(fonts.x_label_area() + 2 * m + caption_h);
        let side = avail_w.min(avail_h);
        SquareLayout {
            side,
            pad_w: (avail_w - side) / 2,
            pad_h: (avail_h - side) / 2,
            caption_h,
        }
    }
}

/// Smallest and largest known cell over all grids (never an empty range).
fn value_range(grids: &[Grid]) -> (f64, f64) {
    let known = || grids.iter().flat_map(|g| &g.values).filter(|v| !v.is_nan());
    let lo = known().copied().fold(f64::INFINITY, f64::min);
    let hi = known().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi > lo { (lo, hi) } else { (lo, lo + 1.0) }
}

/// One heatmap panel, as square as the area allows, row 0 at the top.
fn draw_grid<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    grid: &Grid,
    (lo, hi): (f64, f64),
    fonts: &Fonts,
) -> Result<(), DrawFailure> {
    let SquareLayout { pad_w, pad_h, .. } = SquareLayout::of(area, fonts);
    let m = fonts.margin();
    let nodes = grid.nodes as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(&grid.label, fonts.axis_desc())
        .margin_left(m + pad_w)
        .margin_right(m + pad_w)
        .margin_top(m + pad_h)
        .margin_bottom(m + pad_h)
        .x_label_area_size(fonts.x_label_area())
        .y_label_area_size(fonts.y_label_area())
        // Axes in node positions; the reversed y range puts row 0 on top,
        // as matrices are read.
        .build_cartesian_2d(0.0..nodes, nodes..0.0)
        .map_err(fail)?;
    let order = if grid.by_label { ", by label" } else { "" };
    let x_desc = format!("destination node{order}");
    let y_desc = format!("source node{order}");
    draw_mesh(&mut chart, fonts, &Axes::new(&x_desc, &y_desc))?;
    let (cells, block) = (grid.cells, grid.block as f64);
    // The last block may be partial when n is not a multiple of the block.
    let edge = |k: usize| (k as f64 * block).min(nodes);
    chart
        .draw_series(grid.values.iter().enumerate().map(|(k, &v)| {
            let (r, c) = (k / cells, k % cells);
            let color = if v.is_nan() {
                MISSING_COLOR
            } else {
                viridis((v - lo) / (hi - lo))
            };
            Rectangle::new(
                [(edge(c), edge(r)), (edge(c + 1), edge(r + 1))],
                color.filled(),
            )
        }))
        .map_err(fail)?;
    Ok(())
}

/// The colour scale of the heatmap, with a swatch for missing cells.
fn draw_colour_bar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    square: &SquareLayout,
    (lo, hi): (f64, f64),
    desc: &str,
    fonts: &Fonts,
) -> Result<(), DrawFailure> {
    let (w, h) = area.dim_in_pixel();
    let top = fonts.margin() + square.pad_h + square.caption_h;
    let bottom = top + square.side;
    let (bar_area, key_area) = area.split_vertically(bottom.min(h));
    let mut chart = ChartBuilder::on(&bar_area)
        .margin_top(top)
        .margin_right(fonts.margin())
        .y_label_area_size(fonts.px(75.0))
        .build_cartesian_2d(0.0..1.0, lo..hi)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .disable_x_axis()
        .disable_mesh()
        .y_desc(desc)
        .label_style(fonts.tick())
        .axis_desc_style(fonts.axis_desc())
        .y_label_formatter(&tick_label)
        .draw()
        .map_err(fail)?;
    const STEPS: usize = 256;
    let step = (hi - lo) / STEPS as f64;
    chart
        .draw_series((0..STEPS).map(|k| {
            let y = lo + step * k as f64;
            let t = k as f64 / (STEPS - 1) as f64;
            Rectangle::new([(0.0, y), (1.0, y + step)], viridis(t).filled())
        }))
        .map_err(fail)?;
    // The swatch sits under the bar, which starts after the label area.
    let sw = fonts.px(18.0) as i32;
    let x = (w as i32 - sw * 5).max(0) / 2;
    let y = fonts.margin() as i32;
    key_area
        .draw(&Rectangle::new(
            [(x, y), (x + sw, y + sw)],
            MISSING_COLOR.filled(),
        ))
        .map_err(fail)?;
    let style = TextStyle::from(fonts.tick()).pos(Pos::new(HPos::Left, VPos::Center));
    key_area
        .draw(&Text::new("missing", (x + sw + sw / 2, y + sw / 2), style))
        .map_err(fail)
}

/// Anchors of matplotlib's viridis (plotters' copy sits behind a feature
/// this crate does not enable).
const VIRIDIS: [(f64, f64, f64); 8] = [
    (68.0, 1.0, 84.0),
    (70.0, 50.0, 127.0),
    (54.0, 92.0, 141.0),
    (39.0, 127.0, 143.0),
    (31.0, 162.0, 136.0),
    (74.0, 194.0, 110.0),
    (160.0, 219.0, 57.0),
    (254.0, 232.0, 37.0),
];

/// Viridis at `t` in `[0, 1]` (clamped), linearly between anchors.
fn viridis(t: f64) -> RGBColor {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let pos = t * (VIRIDIS.len() - 1) as f64;
    let k = (pos.floor() as usize).min(VIRIDIS.len() - 2);
    let f = pos - k as f64;
    let (a, b) = (VIRIDIS[k], VIRIDIS[k + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pca_finds_the_direction_of_a_line() {
        // Points along (3, 4), each t once on either side of the line along
        // (-4, 3), so the spread across the line is uncorrelated with t.
        let rows: Vec<Vec<f64>> = (0..100)
            .map(|k| {
                let (t, e) = ((k / 2) as f64, if k % 2 == 0 { 0.1 } else { -0.1 });
                vec![3.0 * t - 4.0 * e, 4.0 * t + 3.0 * e]
            })
            .collect();
        let pca = Pca::fit(&rows);
        let a = &pca.axes[0];
        assert!(
            (a[0] - 0.6).abs() < 1e-6 && (a[1] - 0.8).abs() < 1e-6,
            "{a:?}"
        );
        let b = &pca.axes[1];
        assert!(
            (a[0] * b[0] + a[1] * b[1]).abs() < 1e-9,
            "axes orthogonal: {b:?}"
        );
        let [e1, e2] = pca.explained();
        assert!(e1 > 0.99 && e2 > 0.0 && (e1 + e2 - 1.0).abs() < 1e-9);
        // The mean projects to the origin.
        let (x, y) = pca.project(&pca.mean.clone());
        assert!(x.abs() < 1e-9 && y.abs() < 1e-9);
    }

    #[test]
    fn pca_of_identical_points_is_zero() {
        let pca = Pca::fit(&[vec![1.0, 2.0, 3.0], vec![1.0, 2.0, 3.0]]);
        assert_eq!(pca.explained(), [0.0, 0.0]);
        assert_eq!(pca.project(&[1.0, 2.0, 3.0]), (0.0, 0.0));
    }

    #[test]
    fn csv_reports_the_bad_line() {
        let p = Path::new("x.csv");
        let err = Csv::parse(p, "a,b\n1,2\n3\n").expect_err("short row");
        assert!(err.to_string().contains("line 3"), "{err}");
        let csv = Csv::parse(p, "a,b\n1,2\n3,zz\n").expect("parses");
        let err = csv.floats("b").expect_err("not a number");
        assert!(err.to_string().contains("line 3") && err.to_string().contains("zz"));
        assert!(csv.floats("c").is_err());
        assert_eq!(csv.floats("a").expect("numbers"), vec![1.0, 3.0]);
    }

    #[test]
    fn cdf_points_end_at_one_and_respect_the_clip() {
        let errs: Vec<f64> = (1..=10).map(f64::from).collect();
        let pts = cdf_points(&errs, 0.5, 100.0);
        assert_eq!(pts.first(), Some(&(0.5, 0.0)));
        assert_eq!(pts.last(), Some(&(100.0, 1.0)));
        let clipped = cdf_points(&errs, 0.5, 5.0);
        assert!(clipped.iter().all(|p| p.0 <= 5.0));
        assert_eq!(clipped.last(), Some(&(5.0, 0.5)));
        let many: Vec<f64> = (0..100_000).map(f64::from).collect();
        assert!(cdf_points(&many, 0.1, 1e6).len() <= 2 * MAX_CDF_STEPS + 2);
    }

    #[test]
    fn grid_block_averages_large_matrices() {
        let n = 1300;
        let mut b = GridBuilder::new(n, None, 600);
        assert_eq!((b.block, b.cells), (3, 434));
        b.add(0, 1, 10.0);
        b.add(1, 2, 20.0);
        b.add(5, 5, -1.0);
        let g = b.finish("x");
        assert_eq!(g.values[0], 15.0);
        assert!(g.values[1].is_nan() && g.values[g.cells + 1].is_nan());
    }

    #[test]
    fn grid_orders_nodes_by_label() {
        let labels: Vec<String> = ["b", "a", "b", "a"].map(String::from).to_vec();
        let mut b = GridBuilder::new(4, Some(&labels), 600);
        b.add(1, 3, 7.0); // both "a": the top-left block.
        let g = b.finish("x");
        assert!(g.by_label);
        assert_eq!(g.values[1], 7.0);
    }

    #[test]
    fn viridis_spans_its_anchors() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(254, 232, 37));
        assert_eq!(viridis(f64::NAN), viridis(0.0));
    }

    #[test]
    fn percent_keeps_about_two_digits() {
        assert_eq!(percent(0.5869), "59 %");
        assert_eq!(percent(0.015465), "1.5 %");
        assert_eq!(percent(0.0076105), "0.76 %");
        assert_eq!(percent(0.0), "0 %");
    }

    #[test]
    fn exceed_axis_keeps_a_decade_left_of_the_target() {
        let group = |exceed: Vec<f64>| TailGroup {
            name: "probed",
            color: BLACK,
            pairs: exceed.len(),
            points: Vec::new(),
            exceed,
            pooled: None,
        };
        assert_eq!(exceed_x_range(&[group(vec![0.0, 0.05, 1.0])]), (1e-3, 1.0));
        assert_eq!(exceed_x_range(&[group(vec![0.0, 7e-4])]), (1e-4, 1.0));
        assert_eq!(exceed_x_range(&[group(vec![1e-9])]), (1e-5, 1.0));
        assert_eq!(exceed_x_range(&[group(Vec::new())]), (1e-3, 1.0));
        let (bold, light) = ticks_at(1e-3, 1.0, &[1]);
        assert_eq!(bold.len(), 4);
        assert_eq!(light.len(), 3 * 8);
    }

    #[test]
    fn output_format_follows_the_extension() {
        assert_eq!(
            output_format(Path::new("a/b.PNG")).ok(),
            Some(OutputFormat::Png)
        );
        assert_eq!(
            output_format(Path::new("b.svg")).ok(),
            Some(OutputFormat::Svg)
        );
        assert!(output_format(Path::new("b.pdf")).is_err());
        assert!(output_format(Path::new("b")).is_err());
    }
}
