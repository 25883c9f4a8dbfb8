//! Times the decode-shaped linear layer against candle's matmul: `bench_linear M K N`.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark program prints its figures")]

use std::time::Instant;

use candle_core::{Device, Module, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let [m, k, n] = a.as_slice() else { return Err("usage: bench_linear M K N".into()) };
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (*m, *k), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (*n, *k), &dev)?;
    let ours = rbon_models::linear::Linear::new(w.clone(), None);
    let theirs = candle_nn::Linear::new(w, None);
    for (name, f) in [("rbon", &ours as &dyn Module), ("candle", &theirs as &dyn Module)] {
        f.forward(&x)?;
        let t = Instant::now();
        let reps = 50;
        for _ in 0..reps {
            f.forward(&x)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let gflops = 2.0 * (*m * *k * *n) as f64 / (ms * 1e6);
        println!("{name:>6} {m}x{k}x{n}: {ms:.3} ms ({gflops:.1} GFLOP/s)");
    }
    Ok(())
}
