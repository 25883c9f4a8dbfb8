//! `rbon bench`: the sampler's and the scorers' throughput on one device, without a pipeline or
//! a run directory. The benchmark scripts (`scripts/bench-sample.py`, `bench-score.py`,
//! `gpu-bench.py`) time these beside the peers a user would pick instead.

use std::path::PathBuf;
use std::time::Instant;

use rbon_core::{CoreError, Message};
pub use rbon_models::DTypeName;
use rbon_models::{Device, TemplateChoice};
use rbon_sample::{Policy, PolicyConfig, SampleConfig, sample_seed};
use rbon_score::{Embedder, RewardModel};

use crate::outcome::RunError;

/// N samples of up to `new_tokens` from one prompt of `prompt_tokens` ordinary ids, at
/// temperature 1 without truncation, as `rbon run` draws them.
#[derive(Debug, Clone)]
pub struct SampleBench {
    pub model: String,
    pub n: u32,
    pub prompt_tokens: usize,
    pub new_tokens: u32,
    pub repeats: u32,
    pub device: String,
    pub dtype: DTypeName,
}

/// What a benchmark measured: its best repeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Tokens generated (EOS included) or items scored.
    pub items: usize,
    pub seconds: f64,
}

impl Measured {
    pub fn per_second(&self) -> f64 {
        self.items as f64 / self.seconds
    }
}

fn open(device: &str) -> Result<Device, RunError> {
    rbon_models::path::open_device(device).map_err(RunError::Usage)
}

/// The prompt both sides of the sampling benchmark use: `n` ordinary ids.
pub fn bench_prompt(n: usize, vocab: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(200).max(1) as u32;
    (0..n as u32).map(|i| 100 + (i * 7919) % span).collect()
}

/// Runs the sampling benchmark; the fastest of `repeats` draws (every repeat draws the same
/// tokens: samples are seeded one by one).
pub fn sample(b: &SampleBench) -> Result<Measured, RunError> {
    let device = open(&b.device)?;
    let cfg = PolicyConfig { dtype: b.dtype, chat_template: "none".into(), ..PolicyConfig::new(b.model.clone()) };
    let policy = Policy::load(&cfg, &device)?;
    let prompt = bench_prompt(b.prompt_tokens, policy.decoder().config().vocab_size);
    let sample = SampleConfig { n: b.n, max_new_tokens: b.new_tokens, ..Default::default() };
    let seeds: Vec<(u32, u64)> = (0..b.n).map(|k| (k, sample_seed(0, "bench", k))).collect();
    // Warm-up: pages the weights in and, on a GPU, loads the kernels.
    policy.sample(&prompt, &SampleConfig { n: 1, max_new_tokens: 2, ..Default::default() }, &seeds[..1], 1)?;
    let mut best = Measured { items: 0, seconds: f64::INFINITY };
    for _ in 0..b.repeats.max(1) {
        let t = Instant::now();
        let out = policy.sample(&prompt, &sample, &seeds, b.n as usize)?;
        let seconds = t.elapsed().as_secs_f64();
        if seconds < best.seconds {
            best = Measured { items: out.iter().map(|g| g.token_ids.len()).sum(), seconds };
        }
    }
    Ok(best)
}

/// What the scoring benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// Embed every line.
    Embed,
    /// Score every line as the response to one fixed question.
    Reward,
    /// Lines in groups of 17, a prompt and its 16 responses, one call per prompt as the score
    /// stage makes them.
    RewardGrouped,
}

/// Scoring throughput over a file of texts, one per line.
#[derive(Debug, Clone)]
pub struct ScoreBench {
    pub kind: ScoreKind,
    pub model: String,
    pub texts: PathBuf,
    pub batch_tokens: usize,
    pub repeats: u32,
    pub device: String,
    pub dtype: DTypeName,
}

/// Runs the scoring benchmark; the fastest of `repeats` passes over the texts.
pub fn score(b: &ScoreBench) -> Result<Measured, RunError> {
    let device = open(&b.device)?;
    let text = std::fs::read_to_string(&b.texts).map_err(|e| CoreError::io(&b.texts, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let budget = b.batch_tokens.max(1);
    let best = |run: &mut dyn FnMut() -> Result<usize, RunError>| -> Result<Measured, RunError> {
        let mut best = Measured { items: 0, seconds: f64::INFINITY };
        for _ in 0..b.repeats.max(1) {
            let t = Instant::now();
            let items = run()?;
            let seconds = t.elapsed().as_secs_f64();
            if seconds < best.seconds {
                best = Measured { items, seconds };
            }
        }
        Ok(best)
    };
    match b.kind {
        ScoreKind::Embed => {
            let e = Embedder::load(&b.model, b.dtype.dtype(), &device)?;
            e.embed(&lines[..lines.len().min(8)], budget)?;
            best(&mut || Ok(e.embed(&lines, budget)?.len()))
        }
        ScoreKind::Reward => {
            let m = RewardModel::load(&b.model, &TemplateChoice::None, b.dtype.dtype(), &device)?;
            let prompt = [Message::user("Please answer the question.")];
            let inputs = lines.iter().map(|r| m.encode(&prompt, r)).collect::<Result<Vec<_>, _>>()?;
            m.score(&inputs[..inputs.len().min(8)], budget)?;
            best(&mut || Ok(m.score(&inputs, budget)?.len()))
        }
        ScoreKind::RewardGrouped => {
            let m = RewardModel::load(&b.model, &TemplateChoice::None, b.dtype.dtype(), &device)?;
            let mut groups = Vec::new();
            for g in lines.chunks(17) {
                let prompt = [Message::user(g[0])];
                groups.push(g[1..].iter().map(|r| m.encode(&prompt, r)).collect::<Result<Vec<_>, _>>()?);
            }
            if let Some(g) = groups.first() {
                m.score(&g[..g.len().min(8)], budget)?;
            }
            best(&mut || {
                let mut n = 0;
                for g in &groups {
                    n += m.score(g, budget)?.len();
                }
                Ok(n)
            })
        }
    }
}
