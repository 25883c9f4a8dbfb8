//! The report of a finished run (DESIGN §3 `report/`): does regularization beat Best-of-N
//! against a held-out gold reward, and at which β? Per (method, β) the mean and standard error
//! of every reward of the pick, log π_ref, WD and length of the pick, win rates against BoN on
//! each gold reward, the oracle and random baselines, proxy–gold correlations, pair counts with
//! drop reasons, β tuned on a subset of prompts and evaluated on the rest, and plots.
//!
//! Everything is read from the run directory alone (`pipeline.yaml`, `manifest.json` and the
//! shards), so any finished run can be reported on. polars reads the shards with lazy scans;
//! what the report writes goes through arrow/parquet like every other table of the run.

mod data;
mod plots;
mod render;
pub mod stats;
mod summary;
mod tune;

use std::path::{Path, PathBuf};

pub use summary::{Correlation, ExportCounts, Summary, SummaryRow};
pub use tune::{TunedBeta, Tuning, tune};

/// Errors of the report; each names the file or folder it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: {source}", path.display())]
    Polars { path: PathBuf, source: polars::error::PolarsError },
    #[error("{}: no selections to report on (the run has not reached selection)", path.display())]
    NoSelections { path: PathBuf },
    #[error("{}: {message}", path.display())]
    Data { path: PathBuf, message: String },
    #[error("{}: cannot draw the plot: {message}", path.display())]
    Plot { path: PathBuf, message: String },
    #[error(transparent)]
    Core(#[from] rbon_core::CoreError),
}

impl ReportError {
    pub(crate) fn polars(path: &Path) -> impl FnOnce(polars::error::PolarsError) -> Self + '_ {
        move |source| Self::Polars { path: path.to_owned(), source }
    }
}

/// What to build besides the tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportOptions {
    /// Draw the plots (PNG and SVG).
    pub plots: bool,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self { plots: true }
    }
}

/// A built report: the tables it wrote and where.
#[derive(Debug, Clone)]
pub struct Report {
    /// `<run>/report`.
    pub dir: PathBuf,
    pub summary: Summary,
    /// β tuned on `select.tune`'s subset, when the pipeline has one.
    pub tuning: Option<Tuning>,
    /// Every file written (summary.parquet, report.md, plots).
    pub files: Vec<PathBuf>,
}

impl Report {
    /// The main table, laid out for a terminal: one row per (method, β).
    pub fn terminal_table(&self) -> String {
        render::terminal_table(&self.summary, self.tuning.as_ref())
    }
}

/// Builds the report of the run at `run_dir`: writes `report/summary.parquet`,
/// `report/report.md` and (with `opts.plots`) the plots, replacing earlier ones.
pub fn build_report(run_dir: &Path, opts: ReportOptions) -> Result<Report, ReportError> {
    let run = data::RunData::open(run_dir)?;
    let summary = summary::summarize(&run)?;
    let tuning = match &run.select.tune {
        Some(t) => Some(tune::tune_with(&run, t)?),
        None => None,
    };
    let dir = run_dir.join(rbon_core::rundir::REPORT_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| ReportError::Io { path: dir.clone(), source })?;
    // Plots of an earlier report (whose runs may have had other methods or gold rewards) go.
    let entries = std::fs::read_dir(&dir).map_err(|source| ReportError::Io { path: dir.clone(), source })?;
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "png" || x == "svg") {
            std::fs::remove_file(&p).map_err(|source| ReportError::Io { path: p.clone(), source })?;
        }
    }
    let mut files = Vec::new();
    let parquet = dir.join("summary.parquet");
    summary::write_summary(&summary, &parquet)?;
    files.push(parquet);
    if let Some(t) = &tuning {
        let p = dir.join("tuning.parquet");
        tune::write_tuning(t, &p)?;
        files.push(p);
    }
    let plot_files = if opts.plots { plots::draw_all(&run, &summary, &dir)? } else { Vec::new() };
    let md = dir.join("report.md");
    let text = render::markdown(&summary, tuning.as_ref(), &plot_files, &dir);
    rbon_core::shard::write_atomic(&md, text.as_bytes())?;
    files.push(md);
    files.extend(plot_files);
    Ok(Report { dir, summary, tuning, files })
}
