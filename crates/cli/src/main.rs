//! `rbon`: builds DPO preference datasets with Regularized Best-of-N.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rbon_core::{Event, Progress};
use rbon_runtime::{RunOptions, RunReport};

/// Exit code for a configuration error (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Exit code for bad input data (sysexits EX_DATAERR).
const EXIT_DATA: u8 = 65;
/// Exit code after Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(name = "rbon", version, about = "Regularized Best-of-N preference datasets for DPO")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run (or resume) a pipeline: finished shards are reused, changed stages redone.
    Run {
        /// The pipeline YAML.
        file: PathBuf,
        /// Discard the run directory's earlier output and start over.
        #[arg(long)]
        force: bool,
        /// Print only errors and the final summary.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a pipeline YAML and its inputs without running anything; reports every problem.
    Validate {
        /// The pipeline YAML.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { file } => match rbon_runtime::load(&file) {
            Ok(p) => {
                println!("{}: ok ({} → {})", file.display(), p.config.name, p.config.output.display());
                ExitCode::SUCCESS
            }
            Err(d) => config_failure(&d),
        },
        Command::Run { file, force, quiet } => {
            let pipeline = match rbon_runtime::load(&file) {
                Ok(p) => p,
                Err(d) => return config_failure(&d),
            };
            let ui = std::sync::Arc::new(Ui::new(quiet));
            // First Ctrl-C: finish the shards in flight, then stop; the second quits at once.
            let handler_ui = ui.clone();
            let _ = ctrlc::set_handler(move || {
                if handler_ui.stop.swap(true, Ordering::SeqCst) {
                    std::process::exit(EXIT_INTERRUPTED.into());
                }
                handler_ui.line("interrupt: finishing the shards in flight (press Ctrl-C again to quit now)".into());
            });
            let res = rbon_runtime::run(&pipeline, RunOptions { force }, ui.as_ref());
            ui.clear();
            match res {
                Ok(report) => {
                    print_summary(&report);
                    ExitCode::SUCCESS
                }
                Err(e @ rbon_runtime::RunError::Interrupted { .. }) => {
                    eprintln!("{e}");
                    eprintln!("resume with: rbon run {}", file.display());
                    ExitCode::from(EXIT_INTERRUPTED)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(if e.is_data() { EXIT_DATA } else { 1 })
                }
            }
        }
    }
}

fn config_failure(d: &rbon_core::Diagnostics) -> ExitCode {
    for diag in d.iter() {
        eprintln!("error: {diag}");
    }
    let n = d.len();
    eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
    ExitCode::from(EXIT_CONFIG)
}

/// Draws progress events: bars on a terminal, plain lines otherwise.
struct Ui {
    quiet: bool,
    tty: bool,
    bar: Mutex<Option<ProgressBar>>,
    /// The current stage reused every shard: its summary line would repeat the skip line.
    all_skipped: AtomicBool,
    /// Tokens generated in the current stage, and when it started, for tokens/s.
    tokens: AtomicU64,
    started: Mutex<Option<std::time::Instant>>,
    /// Set by the first Ctrl-C.
    stop: AtomicBool,
}

impl Ui {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            tty: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
            all_skipped: AtomicBool::new(false),
            tokens: AtomicU64::new(0),
            started: Mutex::new(None),
            stop: AtomicBool::new(false),
        }
    }
    fn clear(&self) {
        if let Ok(mut b) = self.bar.lock()
            && let Some(b) = b.take()
        {
            b.finish_and_clear();
        }
    }
    fn line(&self, s: String) {
        if self.quiet {
            return;
        }
        match self.bar.lock().ok().as_ref().and_then(|b| b.as_ref()) {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

impl Progress for Ui {
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn event(&self, e: Event) {
        match e {
            Event::Invalidated { stage, reason } => self.line(format!("{stage}: earlier output discarded ({reason})")),
            Event::StageStarted { stage, total, skipped } => {
                self.all_skipped.store(skipped == total, Ordering::Relaxed);
                self.tokens.store(0, Ordering::Relaxed);
                if let Ok(mut s) = self.started.lock() {
                    *s = Some(std::time::Instant::now());
                }
                if skipped == total {
                    self.line(format!("{stage}: all {total} shards already done, skipped"));
                    return;
                }
                if skipped > 0 {
                    self.line(format!("{stage}: {skipped} of {total} shards already done, skipped"));
                }
                if self.tty && !self.quiet {
                    let bar = ProgressBar::new(total as u64).with_position(skipped as u64);
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} shards  eta {eta}  {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(stage);
                    bar.enable_steady_tick(Duration::from_millis(200));
                    if let Ok(mut b) = self.bar.lock() {
                        *b = Some(bar);
                    }
                }
            }
            Event::ShardDone { .. } => {
                if let Ok(b) = self.bar.lock()
                    && let Some(b) = b.as_ref()
                {
                    b.inc(1);
                }
            }
            Event::StageFinished { stage, counters, elapsed } => {
                self.clear();
                if self.all_skipped.load(Ordering::Relaxed) {
                    return;
                }
                let parts: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
                self.line(format!("{stage}: done in {:.2?} ({})", elapsed, parts.join(", ")));
            }
            Event::Wrote { .. } => {}
            Event::Tokens { tokens, .. } => {
                let total = self.tokens.fetch_add(tokens as u64, Ordering::Relaxed) + tokens as u64;
                let secs = self.started.lock().ok().and_then(|s| *s).map_or(0.0, |t| t.elapsed().as_secs_f64());
                if let Ok(b) = self.bar.lock()
                    && let Some(b) = b.as_ref()
                    && secs > 0.0
                {
                    b.set_message(format!("{:.0} tok/s", total as f64 / secs));
                }
            }
        }
    }
}

fn print_summary(r: &RunReport) {
    let get = |stage: &str, k: &str| {
        r.stages.iter().find(|s| s.stage == stage).and_then(|s| s.counters.get(k)).copied().unwrap_or(0)
    };
    println!("run: {}", r.run_dir.display());
    let prompts = get("prompts", "prompts").max(get("samples", "prompts"));
    print!("  prompts {prompts}, samples {}", get("samples", "samples"));
    if r.stages.iter().any(|s| s.counters.contains_key("tokens")) {
        print!(" ({} tokens, {} cut at max_new_tokens)", get("samples", "tokens"), get("samples", "truncated"));
    }
    if r.stages.iter().any(|s| s.stage == "selections") {
        print!(", selections {}", get("selections", "selections"));
    }
    println!();
    if !r.stages.iter().any(|s| s.stage == "pairs") {
        println!("  stopped after sampling: no `select` section");
        return;
    }
    println!(
        "  pairs written {}; dropped: same index {}, identical text {}, below min_margin {}",
        get("pairs", "pairs"),
        get("pairs", "dropped_same_index"),
        get("pairs", "dropped_identical_text"),
        get("pairs", "dropped_below_margin")
    );
    let files: usize = r.exports.iter().map(|e| e.files.len()).sum();
    let sft: usize = r.exports.iter().map(|e| e.sft_files.len()).sum();
    let state = if r.exports_reused { "up to date" } else { "written" };
    let sft = if sft > 0 { format!(" (+{sft} SFT files)") } else { String::new() };
    println!(
        "  exports {state}: {} (method, β) folders, {files} files{sft} under {}/pairs/",
        r.exports.len(),
        r.run_dir.display()
    );
    if !r.vbon_files.is_empty() {
        println!("  vBoN weights: {} files under {}/vbon/", r.vbon_files.len(), r.run_dir.display());
    }
}
