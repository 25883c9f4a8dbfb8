//! `rbon`: builds DPO preference datasets with Regularized Best-of-N.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "the binary owns the terminal; libraries never print")]

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rbon_core::stage::counter;
use rbon_core::{Event, Progress, StageName};
use rbon_runtime::DropReason;
use rbon_runtime::{RunError, RunOptions, RunReport};

/// Exit code for a configuration or usage error (sysexits EX_CONFIG).
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
        /// This process's rank (shard i belongs to rank i mod world size). Also read from
        /// SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or RANK.
        #[arg(long)]
        rank: Option<usize>,
        /// How many ranks share the run directory. Also read from SLURM_ARRAY_TASK_COUNT or WORLD_SIZE.
        #[arg(long)]
        world_size: Option<usize>,
    },
    /// Check a pipeline YAML and its inputs without running anything; reports every problem.
    Validate {
        /// The pipeline YAML.
        file: PathBuf,
    },
    /// Merge a run that several ranks made: check every shard and write the exports.
    Finalize {
        /// The run directory (the pipeline's `output`).
        run_dir: PathBuf,
        /// Print only errors and the final summary.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Summarise a run: per (method, β) the rewards of the pick against BoN, oracle and random;
    /// writes report/ (summary.parquet, report.md, plots) and prints the main table.
    Report {
        /// The run directory (the pipeline's `output`).
        run_dir: PathBuf,
        /// Skip the plots.
        #[arg(long)]
        no_plots: bool,
    },
    /// Show a run's progress per stage and per rank.
    Status {
        /// The run directory (the pipeline's `output`).
        run_dir: PathBuf,
    },
    /// Measure sampling or scoring throughput on a device (prints one line of JSON); the
    /// benchmark scripts under scripts/ run it beside transformers, vLLM and sentence-transformers.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// N samples from one prompt of ordinary token ids, at temperature 1 without truncation.
    Sample {
        /// A decoder folder (or cached hub id, or .gguf file).
        model: String,
        /// Samples per prompt.
        #[arg(long, default_value_t = 16)]
        n: u32,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens per sample at most (EOS included).
        #[arg(long, default_value_t = 128)]
        new_tokens: u32,
        #[command(flatten)]
        common: BenchCommon,
    },
    /// Embed, or score with a reward model, every line of a text file.
    Score {
        /// `embed`, `reward` (each line the response to one fixed question) or `reward-grouped`
        /// (groups of 17 lines: a prompt and its 16 responses, one call per prompt).
        #[arg(value_parser = ["embed", "reward", "reward-grouped"])]
        kind: String,
        /// The embedder or reward-model folder.
        model: String,
        /// One text per line.
        texts: PathBuf,
        /// Padded tokens per model batch.
        #[arg(long, default_value_t = 16384)]
        batch_tokens: usize,
        #[command(flatten)]
        common: BenchCommon,
    },
}

#[derive(clap::Args)]
struct BenchCommon {
    /// Timed repeats; the fastest counts.
    #[arg(long, default_value_t = 1)]
    repeats: u32,
    /// cpu, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16 (an embedder's `bf16` makes its products bf16, as in `score.embedding`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
    dtype: String,
}

impl BenchCommon {
    fn dtype(&self) -> rbon_runtime::bench::DTypeName {
        match self.dtype.as_str() {
            "bf16" => rbon_runtime::bench::DTypeName::Bf16,
            "f16" => rbon_runtime::bench::DTypeName::F16,
            _ => rbon_runtime::bench::DTypeName::F32,
        }
    }
}

fn bench(what: Bench) -> ExitCode {
    use rbon_runtime::bench::{self, SampleBench, ScoreBench, ScoreKind};
    let (res, what) = match what {
        Bench::Sample { model, n, prompt_tokens, new_tokens, common } => {
            let b = SampleBench {
                model,
                n,
                prompt_tokens,
                new_tokens,
                repeats: common.repeats,
                dtype: common.dtype(),
                device: common.device.clone(),
            };
            let json = format!(
                "\"kind\": \"sample\", \"device\": \"{}\", \"n\": {n}, \"prompt_tokens\": {prompt_tokens}, \"new_tokens\": {new_tokens}",
                common.device
            );
            (bench::sample(&b), json)
        }
        Bench::Score { kind, model, texts, batch_tokens, common } => {
            let k = match kind.as_str() {
                "embed" => ScoreKind::Embed,
                "reward" => ScoreKind::Reward,
                _ => ScoreKind::RewardGrouped,
            };
            let b = ScoreBench {
                kind: k,
                model,
                texts,
                batch_tokens,
                repeats: common.repeats,
                dtype: common.dtype(),
                device: common.device.clone(),
            };
            (bench::score(&b), format!("\"kind\": \"{kind}\", \"device\": \"{}\"", common.device))
        }
    };
    match res {
        Ok(m) => {
            println!(
                "{{\"impl\": \"rbon\", {what}, \"items\": {}, \"seconds\": {:.4}, \"per_s\": {:.2}}}",
                m.items,
                m.seconds,
                m.per_second()
            );
            ExitCode::SUCCESS
        }
        Err(e) => failure(&e),
    }
}

fn main() -> ExitCode {
    // A bad command line is a usage error (78), like a bad config; help and version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_CONFIG) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Validate { file } => match rbon_runtime::load(&file) {
            // The input's rows too, as `rbon run` reads them before writing anything.
            Ok(p) => match rbon_runtime::check_input(&p) {
                Ok(prompts) => {
                    println!(
                        "{}: ok ({} → {}, {prompts} prompts)",
                        file.display(),
                        p.config.name,
                        p.config.output.display()
                    );
                    let models = rbon_runtime::describe::describe_models(&p);
                    if !models.is_empty() {
                        println!("models it would load:");
                        for m in models {
                            println!("  {m}");
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => failure(&e),
            },
            Err(d) => config_failure(&d),
        },
        Command::Run { file, force, quiet, rank, world_size } => run(&file, force, quiet, rank, world_size),
        Command::Finalize { run_dir, quiet } => {
            let ui = Ui::new(quiet);
            let res = rbon_runtime::finalize(&run_dir, &ui);
            ui.clear();
            match res {
                Ok(report) => {
                    print_summary(&report);
                    ExitCode::SUCCESS
                }
                Err(e) => failure(&e),
            }
        }
        Command::Report { run_dir, no_plots } => {
            warn_if_partial(&run_dir);
            let opts = rbon_report::ReportOptions { plots: !no_plots };
            match rbon_report::build_report(&run_dir, opts) {
                Ok(r) => {
                    print!("{}", r.terminal_table());
                    println!("wrote {} files under {}", r.files.len(), r.dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Bench { what } => bench(what),
        Command::Status { run_dir } => match rbon_runtime::status(&run_dir) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => failure(&e),
        },
    }
}

/// A report of a run whose selections are not all written (ranks still running, or never run)
/// covers only part of the prompts: say so, and which ranks are behind.
fn warn_if_partial(run_dir: &Path) {
    let Ok(st) = rbon_runtime::status(run_dir) else { return };
    let Some(sel) = st.stages.iter().find(|s| s.stage == StageName::Selections) else { return };
    if sel.done >= sel.total {
        return;
    }
    let behind: Vec<String> =
        sel.ranks.iter().enumerate().filter(|(_, (done, owned))| done < owned).map(|(r, _)| r.to_string()).collect();
    let who = if st.world_size > 1 { format!(": rank {} not finished", behind.join(", ")) } else { String::new() };
    eprintln!(
        "warning: the report covers {} of {} selection shards{who} (`rbon status {}` shows each rank)",
        sel.done,
        sel.total,
        run_dir.display()
    );
}

fn run(file: &Path, force: bool, quiet: bool, rank: Option<usize>, world_size: Option<usize>) -> ExitCode {
    let pipeline = match rbon_runtime::load(file) {
        Ok(p) => p,
        Err(d) => return config_failure(&d),
    };
    let ranks = match rbon_runtime::ranks::resolve(rank, world_size, |k| std::env::var(k).ok()) {
        Ok(r) => r,
        Err(m) => {
            eprintln!("error: {m}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let ui = std::sync::Arc::new(Ui::new(quiet));
    // First Ctrl-C (or SIGTERM, SIGHUP): finish the shards in flight, then stop; the second
    // quits at once.
    let handler_ui = ui.clone();
    let _ = ctrlc::set_handler(move || {
        if handler_ui.stop.swap(true, Ordering::SeqCst) {
            std::process::exit(EXIT_INTERRUPTED.into());
        }
        handler_ui.line("interrupt: finishing the shards in flight (press Ctrl-C again to quit now)".into());
    });
    let res = rbon_runtime::run(&pipeline, RunOptions { force, ranks }, ui.as_ref());
    ui.clear();
    match res {
        Ok(report) => {
            print_summary(&report);
            ExitCode::SUCCESS
        }
        Err(e @ RunError::Interrupted { .. }) => {
            eprintln!("{e}");
            let mut cmd = format!("rbon run {}", file.display());
            if ranks.world_size > 1 {
                cmd.push_str(&format!(" --rank {} --world-size {}", ranks.rank, ranks.world_size));
            }
            eprintln!("resume with: {cmd}");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Err(e) => failure(&e),
    }
}

fn failure(e: &RunError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(match e {
        RunError::Usage(_) => EXIT_CONFIG,
        e if e.is_data() => EXIT_DATA,
        _ => 1,
    })
}

fn config_failure(d: &rbon_core::Diagnostics) -> ExitCode {
    for diag in d.iter() {
        eprintln!("error: {diag}");
    }
    let n = d.len();
    eprintln!("{n} problem{} found", if n == 1 { "" } else { "s" });
    ExitCode::from(EXIT_CONFIG)
}

/// One stage's live figures.
struct StageView {
    bar: Option<ProgressBar>,
    total: usize,
    done: usize,
    tokens: u64,
    rows: u64,
    busy: Duration,
    started: Instant,
    last_log: Instant,
    skipped_all: bool,
    /// Requests at an inference server not yet answered (the server engine).
    in_flight: Option<usize>,
}

impl StageView {
    /// Tokens/s while sampling, samples/s while scoring, from the time the workers spent.
    fn rate(&self, stage: &str) -> Option<String> {
        let secs = self.busy.as_secs_f64();
        match stage.parse::<StageName>() {
            Ok(StageName::Samples) if self.tokens > 0 => {
                let wall = self.started.elapsed().as_secs_f64();
                let flight = self.in_flight.map(|n| format!(", {n} requests in flight")).unwrap_or_default();
                (wall > 0.0).then(|| format!("{:.0} tok/s{flight}", self.tokens as f64 / wall))
            }
            Ok(StageName::Scores) if secs > 0.0 => Some(format!("{:.1} samples/s", self.rows as f64 / secs)),
            _ => None,
        }
    }
}

/// Draws progress events: a bar per running stage on a terminal; plain lines otherwise (at
/// most one per stage every ten seconds, for batch logs).
struct Ui {
    quiet: bool,
    tty: bool,
    multi: MultiProgress,
    stages: Mutex<BTreeMap<String, StageView>>,
    /// Set by the first Ctrl-C.
    stop: AtomicBool,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Ui {
    fn new(quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty && !quiet { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Self {
            quiet,
            tty,
            multi: MultiProgress::with_draw_target(target),
            stages: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
        }
    }

    fn clear(&self) {
        if let Ok(mut st) = self.stages.lock() {
            for v in st.values_mut() {
                if let Some(b) = v.bar.take() {
                    b.finish_and_clear();
                }
            }
        }
        let _ = self.multi.clear();
    }

    fn line(&self, s: String) {
        if self.quiet {
            return;
        }
        if self.tty {
            let _ = self.multi.println(&s);
        } else {
            eprintln!("{s}");
        }
    }

    fn bar(&self, stage: &str, total: usize, skipped: usize) -> Option<ProgressBar> {
        if !self.tty || self.quiet {
            return None;
        }
        let bar = self.multi.add(ProgressBar::new(total as u64).with_position(skipped as u64));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} shards  eta {eta}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(bar)
    }
}

impl Progress for Ui {
    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn event(&self, e: Event) {
        let mut log = None;
        match e {
            Event::Invalidated { stage, reason } => log = Some(format!("{stage}: earlier output discarded ({reason})")),
            Event::Info { message } => log = Some(message),
            Event::StageStarted { stage, total, skipped } => {
                if skipped == total {
                    log = Some(format!("{stage}: all {total} shards already done, skipped"));
                } else if skipped > 0 {
                    log = Some(format!("{stage}: {skipped} of {total} shards already done, skipped"));
                }
                let bar = if skipped < total { self.bar(&stage, total, skipped) } else { None };
                let now = Instant::now();
                let view = StageView {
                    bar,
                    total,
                    done: skipped,
                    tokens: 0,
                    rows: 0,
                    busy: Duration::ZERO,
                    started: now,
                    last_log: now,
                    skipped_all: skipped == total,
                    in_flight: None,
                };
                if let Ok(mut st) = self.stages.lock() {
                    st.insert(stage, view);
                }
            }
            Event::ShardDone { stage, rows, busy, .. } => {
                if let Ok(mut st) = self.stages.lock()
                    && let Some(v) = st.get_mut(&stage)
                {
                    v.done += 1;
                    v.rows += rows as u64;
                    v.busy += busy;
                    let rate = v.rate(&stage).unwrap_or_default();
                    if let Some(b) = &v.bar {
                        b.inc(1);
                        b.set_message(rate);
                    } else if !self.tty && v.last_log.elapsed() >= LOG_EVERY && v.done < v.total {
                        v.last_log = Instant::now();
                        log = Some(format!("{stage}: {}/{} shards {rate}", v.done, v.total));
                    }
                }
            }
            Event::StageFinished { stage, counters, elapsed } => {
                if let Ok(mut st) = self.stages.lock()
                    && let Some(v) = st.get_mut(&stage)
                {
                    if let Some(b) = v.bar.take() {
                        b.finish_and_clear();
                        self.multi.remove(&b);
                    }
                    v.in_flight = None;
                    if !v.skipped_all {
                        let parts: Vec<String> = counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
                        let rate = v.rate(&stage).map(|r| format!(", {r}")).unwrap_or_default();
                        log = Some(format!("{stage}: done in {:.2?}{rate} ({})", elapsed, parts.join(", ")));
                    }
                }
            }
            Event::Wrote { .. } => {}
            Event::InFlight { stage, requests } => {
                if let Ok(mut st) = self.stages.lock()
                    && let Some(v) = st.get_mut(&stage)
                {
                    v.in_flight = Some(requests);
                }
            }
            Event::Tokens { stage, tokens } => {
                if let Ok(mut st) = self.stages.lock()
                    && let Some(v) = st.get_mut(&stage)
                {
                    v.tokens += tokens as u64;
                    if let (Some(b), Some(rate)) = (&v.bar, v.rate(&stage)) {
                        b.set_message(rate);
                    }
                }
            }
        }
        if let Some(l) = log {
            self.line(l);
        }
    }
}

fn print_summary(r: &RunReport) {
    let get = |stage: StageName, k: &str| {
        r.stages.iter().find(|s| s.stage == stage).and_then(|s| s.counters.get(k)).copied().unwrap_or(0)
    };
    let has = |stage: StageName| r.stages.iter().any(|s| s.stage == stage);
    println!("run: {}", r.run_dir.display());
    if r.ranks.world_size > 1 && !r.finalized {
        println!("  rank {} of {}: its shards are done", r.ranks.rank, r.ranks.world_size);
    }
    let prompts = get(StageName::Prompts, counter::PROMPTS).max(get(StageName::Samples, counter::PROMPTS));
    print!("  prompts {prompts}, samples {}", get(StageName::Samples, counter::SAMPLES));
    if r.stages.iter().any(|s| s.counters.contains_key(counter::TOKENS)) {
        let (tokens, cut) = (get(StageName::Samples, counter::TOKENS), get(StageName::Samples, counter::TRUNCATED));
        print!(" ({tokens} tokens, {cut} cut at max_new_tokens)");
    }
    if has(StageName::Selections) {
        print!(", selections {}", get(StageName::Selections, counter::SELECTIONS));
    }
    println!();
    let busy: Vec<String> =
        r.stages.iter().filter(|s| !s.busy.is_zero()).map(|s| format!("{} {:.2?}", s.label, s.busy)).collect();
    if !busy.is_empty() {
        println!("  time per stage: {}", busy.join(", "));
    }
    if !has(StageName::Pairs) {
        let last = if has(StageName::Scores) { "scoring" } else { "sampling" };
        println!("  stopped after {last}: no `select` section");
        return;
    }
    println!(
        "  pairs written {}; dropped: same index {}, identical text {}, below min_margin {}",
        get(StageName::Pairs, counter::PAIRS),
        get(StageName::Pairs, DropReason::SameIndex.counter()),
        get(StageName::Pairs, DropReason::IdenticalText.counter()),
        get(StageName::Pairs, DropReason::BelowMargin.counter())
    );
    if !r.finalized {
        println!("  when every rank is done: rbon finalize {}", r.run_dir.display());
        return;
    }
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
    if let Some(rep) = &r.report {
        if let Some(t) = &rep.tuning {
            let best: Vec<String> = t.best().iter().map(|(m, b)| format!("{} β={b}", m.as_str())).collect();
            println!("  tuned β: {}", best.join(", "));
        }
        println!(
            "  report: {}/report.md ({} files; `rbon report {}` prints it)",
            rep.dir.display(),
            rep.files.len(),
            r.run_dir.display()
        );
    }
}
