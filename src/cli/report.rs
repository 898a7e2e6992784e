//! `vfmig report`: a migration's timeline as a phase table and an SVG.

use std::path::PathBuf;

use anyhow::Result;

use super::init_logging;

/// The arguments of `vfmig report`.
#[derive(clap::Args)]
pub struct Args {
    /// The trace file (Chrome trace-event JSON).
    pub file: PathBuf,
    /// Where to write the SVG (default: FILE with the extension .svg).
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// Prints the phase table and writes the picture.
pub fn run(args: Args) -> Result<()> {
    let Args { file, svg } = args;
    init_logging("warn");
    let svg = svg.unwrap_or_else(|| file.with_extension("svg"));
    let report = vfmig::trace::run_report(&file, &svg)?;
    println!("{}", report.markdown());
    eprintln!("report: picture written to {}", svg.display());
    Ok(())
}
