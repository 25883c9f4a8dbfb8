//! Times rbon's linear layer against candle's matmul: `bench_linear M K N [f32|bf16|f16]`.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark program prints its figures")]

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_linear M K N [f32|bf16|f16]";
    let dims: Vec<usize> = args.iter().take(3).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let [m, k, n] = dims.as_slice() else { return Err(usage.into()) };
    let dtype = match args.get(3).map(String::as_str) {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        Some(_) => return Err(usage.into()),
    };
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (*m, *k), &dev)?.to_dtype(dtype)?;
    let w = Tensor::randn(0f32, 1.0, (*n, *k), &dev)?.to_dtype(dtype)?;
    let ours = rbon_models::linear::Linear::new(w.clone(), None);
    let theirs = candle_nn::Linear::new(w, None);
    for (name, f) in [("rbon", &ours as &dyn Module), ("candle", &theirs as &dyn Module)] {
        f.forward(&x)?;
        let t = Instant::now();
        let mut reps = 0;
        while reps < 5 || t.elapsed().as_secs_f64() < 1.0 {
            f.forward(&x)?;
            reps += 1;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let gflops = 2.0 * (*m * *k * *n) as f64 / (ms * 1e6);
        println!("{name:>6} {dtype:?} {m}x{k}x{n}: {ms:.3} ms ({gflops:.1} GFLOP/s)");
    }
    Ok(())
}
