//! Scoring throughput: `bench_score embed|embed-bf16|reward|reward-grouped MODEL_DIR TEXTS_FILE
//! BATCH_TOKENS [REPEATS]` (the fastest of REPEATS runs, default 1).
//!
//! `embed-bf16` loads the embedder with `dtype: bf16` (bf16 matrix products on AMX).
//! `reward-grouped` reads the file in groups of 17 lines, a prompt and its 16 responses, and
//! scores each group as the score stage does (one call per prompt). Reads one text
//! per line (for `reward`, the line is the response to a fixed question) and prints one line of
//! JSON; `scripts/bench-score.py` runs it beside sentence-transformers and transformers.

use std::time::Instant;

use rbon_core::Message;
use rbon_models::{DType, Device, TemplateChoice};
use rbon_score::{Embedder, RewardModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, model, texts, budget, repeats) = match args.as_slice() {
        [k, m, t, b] => (k, m, t, b, 1),
        [k, m, t, b, r] => (k, m, t, b, r.parse::<u32>()?.max(1)),
        _ => {
            let usage =
                "usage: bench_score embed|embed-bf16|reward|reward-grouped MODEL_DIR TEXTS_FILE BATCH_TOKENS [REPEATS]";
            return Err(usage.into());
        }
    };
    let best = |run: &mut dyn FnMut() -> Result<usize, Box<dyn std::error::Error>>| {
        let mut secs = f64::INFINITY;
        let mut n = 0;
        for _ in 0..repeats {
            let t = Instant::now();
            n = run()?;
            secs = secs.min(t.elapsed().as_secs_f64());
        }
        Ok::<_, Box<dyn std::error::Error>>((secs, n))
    };
    let texts: Vec<String> = std::fs::read_to_string(texts)?.lines().map(str::to_owned).collect();
    let budget: usize = budget.parse()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (secs, n) = match kind.as_str() {
        "embed" | "embed-bf16" => {
            let dtype = if kind == "embed" { DType::F32 } else { DType::BF16 };
            let e = Embedder::load(model, dtype, &Device::Cpu)?;
            e.embed(&refs[..refs.len().min(8)], budget)?;
            best(&mut || Ok(e.embed(&refs, budget)?.len()))?
        }
        "reward" => {
            let m = RewardModel::load(model, &TemplateChoice::None, DType::F32, &Device::Cpu)?;
            let prompt = [Message::user("Please answer the question.")];
            let inputs = refs.iter().map(|r| m.encode(&prompt, r)).collect::<Result<Vec<_>, _>>()?;
            m.score(&inputs[..inputs.len().min(8)], budget)?;
            best(&mut || Ok(m.score(&inputs, budget)?.len()))?
        }
        "reward-grouped" => {
            let m = RewardModel::load(model, &TemplateChoice::None, DType::F32, &Device::Cpu)?;
            let mut groups = Vec::new();
            for g in refs.chunks(17) {
                let prompt = [Message::user(g[0])];
                groups.push(g[1..].iter().map(|r| m.encode(&prompt, r)).collect::<Result<Vec<_>, _>>()?);
            }
            m.score(&groups[0][..groups[0].len().min(8)], budget)?;
            best(&mut || {
                let mut n = 0;
                for g in &groups {
                    n += m.score(g, budget)?.len();
                }
                Ok(n)
            })?
        }
        other => return Err(format!("unknown kind {other}").into()),
    };
    println!(
        "{{\"impl\": \"rbon\", \"kind\": \"{kind}\", \"items\": {n}, \"seconds\": {secs:.4}, \"per_s\": {:.2}}}",
        n as f64 / secs
    );
    Ok(())
}
