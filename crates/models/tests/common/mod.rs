//! Helpers shared by the model tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use rbon_models::{Decoder, Device, Tensor};
use serde_json::Value;

/// The repository's `data/` folder.
pub fn data() -> PathBuf {
    std::env::var_os("RBON_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data"))
}

/// Where the models run: `RBON_TEST_DEVICE` (default cpu).
pub fn device() -> Device {
    rbon_models::path::test_device().unwrap()
}

/// Per-token log-prob tolerance against transformers (f32): 1e-4 on the CPU; 1e-3 on a GPU,
/// whose kernels sum in other orders.
pub fn logprob_tolerance(d: &Device) -> f64 {
    if d.is_cpu() { 1e-4 } else { 1e-3 }
}

/// Per-token bf16 log-prob tolerance against transformers in bf16. Measured on the fixtures on
/// the CPU: rbon's host decoder, which rounds where transformers does, 0.039 (Llama), 0.000
/// (Mistral), 0.091 (Qwen2), 0.038 (Qwen3); candle's layers (`RBON_KERNELS=candle`, and other
/// devices), which round in other places, 0.12, 0.14, 0.28 and 0.13. transformers' own bf16
/// differs from its f32 by up to 0.38 on them.
pub fn bf16_bound(m: &Decoder) -> f64 {
    if m.on_host() { 0.15 } else { 0.4 }
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Greedy decoding of `rows` copies of the prompt in lock-step from one shared prefill.
pub fn greedy(m: &Decoder, eos: &[u32], prompt: &[u32], max: usize, rows: usize) -> Vec<Vec<u32>> {
    let mut cache = m.new_cache();
    let logits = m.forward_last(&Tensor::new(prompt, m.device()).unwrap().unsqueeze(0).unwrap(), &mut cache).unwrap();
    let mut cache = cache.fork(rows).unwrap();
    let mut logits: Vec<Vec<f32>> = vec![logits.to_vec2::<f32>().unwrap().remove(0); rows];
    let mut out = vec![Vec::new(); rows];
    let mut active: Vec<usize> = (0..rows).collect();
    for _ in 0..max {
        let mut next = Vec::new();
        let mut keep = Vec::new();
        for (slot, &r) in active.iter().enumerate() {
            let row = &logits[slot];
            let tok = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32;
            out[r].push(tok);
            if !eos.contains(&tok) {
                next.push(tok);
                keep.push(slot as u32);
            }
        }
        if next.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache = cache.select(&keep).unwrap();
            active = keep.iter().map(|&s| active[s as usize]).collect();
        }
        let ids = Tensor::new(next.as_slice(), m.device()).unwrap().unsqueeze(1).unwrap();
        logits = m.forward_last(&ids, &mut cache).unwrap().to_vec2::<f32>().unwrap();
    }
    out
}
