//! Sampling throughput: N samples from one prompt of a given length, as `rbon run` draws them.
//! Prints one line of JSON per setting; `scripts/bench-sample.py` runs it beside transformers.
//!
//! cargo run --release -p rbon-sample --example bench_sample -- MODEL_DIR N PROMPT_TOKENS NEW_TOKENS [REPEATS]
//!
//! With REPEATS (default 1) the whole draw runs that many times and the fastest is reported.

use std::time::Instant;

use rbon_models::Device;
use rbon_sample::{Policy, PolicyConfig, SampleConfig, sample_seed};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, n, prompt_tokens, new_tokens, repeats) = match args.as_slice() {
        [m, n, p, t] => (m, n, p, t, 1),
        [m, n, p, t, r] => (m, n, p, t, r.parse::<u32>()?.max(1)),
        _ => return Err("usage: bench_sample MODEL_DIR N PROMPT_TOKENS NEW_TOKENS [REPEATS]".into()),
    };
    let (n, prompt_tokens, new_tokens): (u32, usize, u32) = (n.parse()?, prompt_tokens.parse()?, new_tokens.parse()?);
    let cfg = PolicyConfig {
        model: model.clone(),
        dtype: Default::default(),
        chat_template: "none".into(),
        system_prompt: None,
    };
    let policy = Policy::load(&cfg, &Device::Cpu)?;
    // A prompt of exactly `prompt_tokens` ordinary ids, the same as the Python side builds.
    let vocab = policy.decoder().config().vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_tokens as u32).map(|i| 100 + (i * 7919) % (vocab - 200)).collect();
    let sample = SampleConfig { n, max_new_tokens: new_tokens, ..Default::default() };
    let seeds: Vec<(u32, u64)> = (0..n).map(|k| (k, sample_seed(0, "bench", k))).collect();
    // Warm-up (page in the weights).
    policy.sample(&prompt, &SampleConfig { n: 1, max_new_tokens: 2, ..Default::default() }, &seeds[..1], 1)?;
    let mut secs = f64::INFINITY;
    let mut tokens = 0;
    for _ in 0..repeats {
        let t = Instant::now();
        let out = policy.sample(&prompt, &sample, &seeds, n as usize)?;
        secs = secs.min(t.elapsed().as_secs_f64());
        // Seeded per sample: every repeat draws the same tokens.
        tokens = out.iter().map(|g| g.token_ids.len()).sum();
    }
    println!(
        "{{\"impl\": \"rbon\", \"n\": {n}, \"prompt_tokens\": {prompt_tokens}, \"new_tokens\": {new_tokens}, \"generated\": {tokens}, \"seconds\": {secs:.4}, \"tokens_per_s\": {:.2}}}",
        tokens as f64 / secs
    );
    Ok(())
}
