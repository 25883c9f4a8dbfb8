//! Scoring throughput: `bench_score embed|reward MODEL_DIR TEXTS_FILE BATCH_TOKENS`. Reads one text
//! per line (for `reward`, the line is the response to a fixed question) and prints one line of
//! JSON; `scripts/bench-score.py` runs it beside sentence-transformers and transformers.

use std::time::Instant;

use rbon_core::Message;
use rbon_models::{DType, Device, TemplateChoice};
use rbon_score::{Embedder, RewardModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, model, texts, budget] = args.as_slice() else {
        return Err("usage: bench_score embed|reward MODEL_DIR TEXTS_FILE BATCH_TOKENS".into());
    };
    let texts: Vec<String> = std::fs::read_to_string(texts)?.lines().map(str::to_owned).collect();
    let budget: usize = budget.parse()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (secs, n) = match kind.as_str() {
        "embed" => {
            let e = Embedder::load(model, DType::F32, &Device::Cpu)?;
            e.embed(&refs[..refs.len().min(8)], budget)?;
            let t = Instant::now();
            let out = e.embed(&refs, budget)?;
            (t.elapsed().as_secs_f64(), out.len())
        }
        "reward" => {
            let m = RewardModel::load(model, &TemplateChoice::None, DType::F32, &Device::Cpu)?;
            let prompt = [Message::user("Please answer the question.")];
            let inputs = refs.iter().map(|r| m.encode(&prompt, r)).collect::<Result<Vec<_>, _>>()?;
            m.score(&inputs[..inputs.len().min(8)], budget)?;
            let t = Instant::now();
            let out = m.score(&inputs, budget)?;
            (t.elapsed().as_secs_f64(), out.len())
        }
        other => return Err(format!("unknown kind {other}").into()),
    };
    println!(
        "{{\"impl\": \"rbon\", \"kind\": \"{kind}\", \"items\": {n}, \"seconds\": {secs:.4}, \"per_s\": {:.2}}}",
        n as f64 / secs
    );
    Ok(())
}
