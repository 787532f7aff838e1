//! RTT figures (being written).

use std::path::PathBuf;

/// What can go wrong drawing a figure.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Not yet available.
    #[error("{0}")]
    Other(String),
}

/// `tomo plot` arguments.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// cdf | convergence | scatter | map | heatmap.
    pub kind: String,
    /// `tomo sim --out` directories (heatmap also takes a dataset file).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output file; `.png` or `.svg`.
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Draws the figure `args` asks for.
pub fn run(args: &PlotArgs) -> Result<(), PlotError> {
    Err(PlotError::Other(format!(
        "plot {} is not available yet",
        args.kind
    )))
}
